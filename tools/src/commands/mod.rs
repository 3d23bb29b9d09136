//! One module per command family of `tally`. Each parses its arguments (clap) and runs on
//! the engine's public API (embedded) or a client (`--server`); what they share is in
//! [`crate::support`]. Commands that only read open the log read-only (no lock, nothing
//! changed), so they run beside a live server. Exit status: 0 success, 1 a finding (printed
//! in one place, `support::print_finding`), 2 usage or I/O errors.

pub mod audit;
pub mod bench;
pub mod blob;
pub mod compact;
pub mod demo;
pub mod dump;
pub mod find;
pub mod forensic;
pub mod governance;
pub mod inspect;
pub mod keys;
pub mod producer;
pub mod proofs;
pub mod remote;
pub mod remote_bench;
pub mod verify;
pub mod witness;
