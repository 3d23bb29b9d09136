//! Fuzz target: see `tally_engine::fuzzing::recover_segment`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tally_engine::fuzzing::recover_segment(data);
});
