//! Fuzz target: see `tally_engine::fuzzing::log_ops` (operation sequences with crashes,
//! power cuts and disk faults on a simulated disk, checked against a model).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tally_engine::fuzzing::log_ops(data);
});
