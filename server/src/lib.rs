//! `tallyd`, the TCP protocol server in front of the engine, and its Rust client.
//!
//! The protocol, server and client arrive with issue #4; the crate exists now so that the
//! workspace has its final shape and the layering (server -> engine's public API only) is
//! enforced by cargo from the start.

#![forbid(unsafe_code)]

/// The engine this server fronts, re-exported for the client's types.
pub use tally_engine as engine;
