//! Fuzz target: see `tally_engine::fuzzing::open_attrs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tally_engine::fuzzing::open_attrs(data);
});
