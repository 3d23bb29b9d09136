//! Tally's storage engine: a durable, checksummed, hash-chained, segmented event log.
//!
//! Events are appended to streams (one per aggregate, such as `trade-42`) with optimistic
//! concurrency, stored in memory-mapped segment files with CRC-checked headers and bodies,
//! chained with BLAKE3 so that any change to history is detected, and indexed per stream
//! so that reading one stream never scans the log. `docs/FORMAT.md` specifies every byte.
//!
//! ```no_run
//! use tally_engine::{Direction, EventData, ExpectedVersion, Log, Options};
//!
//! let log = Log::open("/tmp/tally-example", Options::default())?;
//! let new = EventData::json("TradeNew", r#"{"qty":"100","px":"101.25"}"#)
//!     .aggregate_type("Trade")
//!     .actor("alice");
//! let r = log.append("trade-42", ExpectedVersion::NoStream, &[new])?;
//! let amend = EventData::json("TradeAmended", r#"{"qty":"150"}"#).actor("bob");
//! log.append("trade-42", ExpectedVersion::Exact(r.last_version), &[amend])?;
//! for ev in log.read_stream("trade-42", 0, 100, Direction::Forward)? {
//!     println!("{} v{} {}", ev.stream(), ev.version, ev.event_type());
//! }
//! log.close()?;
//! # Ok::<(), tally_engine::Error>(())
//! ```

#![deny(unsafe_code)]

/// The README's example is compiled as a doctest so that it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub mod aggregate;
pub mod cold;
mod error;
pub mod format;
#[cfg(feature = "internals")]
pub mod fuzzing;
pub mod governance;
pub mod index;
pub mod keys;
mod log;
pub mod projection;
pub mod replay;
pub mod schema;
mod segment;
pub mod state_store;
mod sys;
pub mod witness;

pub use error::{Error, Result};
pub use format::envelope::ContentType;
pub use format::{EventId, Hash32, Position, SegmentSeq, Timestamp};
pub use index::attrs::Field;
pub use log::producers;
pub use log::{
    AppendHandle, AppendRequest, AppendResult, BackupOptions, BackupReport, CHECKPOINTS_FILE,
    COSIGNATURES_FILE, ColdBackup, ColdOptions, ColdStatus, CompactPolicy, CompactReport,
    Direction, Durability, ERASED_MARKER, ERASURE_STREAM, Erasure, EventData, EventView,
    ExpectedVersion, ForgetReport, IndexSummary, KEY_FILE, Log, MovedSegment, Options, Personal,
    PersonalScope, Query, RANGES_PER_EVENT, REMOVED_EVENT_TYPE, RawRecord, RecordView,
    RecordedEvent, RecoveryMode, RecoveryReport, RemovedRun, RetentionPlan, RetentionReport,
    RetentionStatus, SEALED_MARKER, SUBJECT_ERASED, SealState, Sealing, SegmentDetail, SegmentInfo,
    StreamHead, StreamHeld, StreamInfo, StreamRemoval, SubjectErased, TREE_FILE, Tail, Truncation,
    Verify, VerifyOptions, VerifyReport, add_cosignature, create_signing_key, fold_refusal,
    new_event_id, now, producer_signature,
};
#[cfg(feature = "internals")]
pub use sys::sim;
pub use sys::{Storage, limit_allocator_arenas, release_free_memory};
