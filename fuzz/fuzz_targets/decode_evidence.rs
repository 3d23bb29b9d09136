//! Fuzz target: see `tally_engine::fuzzing::decode_evidence`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tally_engine::fuzzing::decode_evidence(data);
});
