//! Fuzz target: see `tally_server::protocol::check_decoders` (frame header, every request
//! decoder, the response decoder; a decoded request re-encodes to the same bytes).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tally_server::protocol::check_decoders(data);
});
