//! One module per command family of `tally`. Each parses its arguments (clap) and runs on
//! the engine's public API (embedded) or a client (`--server`); what they share is in
//! [`crate::support`].

pub mod audit;
pub mod bench;
pub mod blob;
pub mod compact;
pub mod demo;
pub mod dump;
pub mod find;
pub mod forensic;
pub mod inspect;
pub mod keys;
pub mod producer;
pub mod proofs;
pub mod remote;
pub mod remote_bench;
pub mod verify;
pub mod witness;
