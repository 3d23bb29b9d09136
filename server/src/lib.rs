//! `tallyd`, Tally's TCP protocol server, and its Rust client.
//!
//! - [`protocol`]: the frames and messages of docs/PROTOCOL.md, encoded and decoded
//!   without I/O;
//! - [`server`]: the server that `tallyd` runs, in front of one engine log;
//! - [`client`]: an async client with pipelining, typed errors, idempotent retries and
//!   resuming subscriptions;
//! - [`projection`]: the engine's projections, run through a server.

#![forbid(unsafe_code)]

mod budget;
pub mod client;
#[cfg(feature = "cold-store")]
pub mod cold_store;
pub mod projection;
pub mod protocol;
pub mod server;
