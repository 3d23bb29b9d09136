//! The engine's public error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::format::{DecodeError, EventId};
use crate::index::IndexError;
use crate::log::ExpectedVersion;

/// Everything the engine's public API can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file-system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process (or another `Log` in this one) has the data directory open.
    #[error("data directory {} is locked by another opener", dir.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
    },
    /// The directory does not hold a Tally log and `Options::create` is off.
    #[error("{} is not a Tally data directory (no tally.meta)", dir.display())]
    NotFound {
        /// The data directory.
        dir: PathBuf,
    },
    /// Bytes on disk are damaged or do not belong to this log. Nothing was changed.
    #[error(
        "corrupt data in {} at byte {offset}{}: {detail}",
        file.display(),
        position.map(|p| format!(" (position {p})")).unwrap_or_default()
    )]
    Corrupt {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damage within the file.
        offset: u64,
        /// The log position concerned, when known.
        position: Option<u64>,
        /// What is wrong, in words.
        detail: String,
        /// The decode error, when there is one.
        #[source]
        source: Option<DecodeError>,
    },
    /// An index sidecar is damaged and could not be rebuilt.
    #[error("index {} is unusable", file.display())]
    Index {
        /// The sidecar.
        file: PathBuf,
        /// The cause.
        #[source]
        source: IndexError,
    },
    /// The stream is not at the version the append expected. Nothing was written.
    #[error("wrong expected version for stream {stream}: expected {expected:?}, actual {actual:?}")]
    WrongExpectedVersion {
        /// The stream.
        stream: String,
        /// What the append expected.
        expected: ExpectedVersion,
        /// The stream's last version (`None`: the stream has no events).
        actual: Option<u64>,
    },
    /// An event in the batch breaks a documented limit. Nothing was written.
    #[error("event {index} of the batch is invalid")]
    InvalidEvent {
        /// Index of the event in the batch (counting across all streams of a multi-append).
        index: usize,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// The append itself is malformed (empty, a stream twice, an event id twice).
    #[error("invalid append: {reason}")]
    InvalidAppend {
        /// Why.
        reason: String,
    },
    /// The batch does not fit in one segment.
    #[error("batch of {bytes} bytes does not fit in a segment (at most {max} bytes of records)")]
    BatchTooLarge {
        /// Bytes the batch's records take.
        bytes: u64,
        /// Bytes of records one segment holds.
        max: u64,
    },
    /// Some, but not all, of the batch's event ids were already written: the batch is not a
    /// retry of an earlier one, and writing it would duplicate events.
    #[error(
        "event {event_id} was already written to stream {stream}, but other events of the batch were not"
    )]
    PartialDuplicate {
        /// The stream.
        stream: String,
        /// One of the ids already written.
        event_id: EventId,
    },
    /// An event id of the batch was already written to a different stream.
    #[error("event id {event_id} was already written to stream {existing_stream}")]
    DuplicateEventId {
        /// The id.
        event_id: EventId,
        /// The stream it was written to.
        existing_stream: String,
    },
    /// A sync to disk failed (now, or earlier); the log accepts no more writes (reads still
    /// work), because a retried sync cannot prove that earlier writes reached the disk. For
    /// the append that met the failed sync the outcome is unknown: its records may have
    /// reached the disk, and a restart finds the batch whole or not at all.
    #[error("the log stopped accepting writes after a failed sync")]
    Poisoned {
        /// The failure that poisoned the log.
        #[source]
        cause: Arc<io::Error>,
    },
    /// The log was closed.
    #[error("the log is closed")]
    Closed,
    /// An append that may not block ([`crate::Log::try_append_deferred_multi`]) would have
    /// waited: for a spare segment still being prepared, for the writer lock held across
    /// slow work, or for a producer registration. Nothing was written; the same append made
    /// through a blocking call (on a thread that may block) goes through.
    #[error(
        "the append would wait (for a segment being prepared or a lock held across slow work); nothing was written"
    )]
    WouldBlock,
    /// The log was opened read-only (`RecoveryMode::ReadOnly`).
    #[error("the log was opened read-only")]
    ReadOnly,
    /// A proof was asked for, or checked against, positions or sizes the log does not have.
    #[error(transparent)]
    Proof(#[from] crate::format::proof::ProofError),
    /// A producer signature is missing where the policy requires one, is by a key that is
    /// not registered (or was revoked, or may not sign for the stream), or does not verify.
    /// Nothing was written.
    #[error("producer signature refused: {reason}")]
    SignatureRefused {
        /// Why.
        reason: String,
    },
    /// A cold segment's object could not be written, read back, or trusted: it names the
    /// segment and the object (store URL and key).
    #[error("cold segment {seq} ({object}): {detail}")]
    Cold {
        /// The segment.
        seq: u64,
        /// The store's URL and the object's key.
        object: String,
        /// What went wrong.
        detail: String,
        /// The store's error, when it reported one.
        #[source]
        source: Option<io::Error>,
    },
    /// A blob (a payload stored in the cold tier's store by its hash) could not be written,
    /// found, or read back as the event refers to it.
    #[error("blob {hash} ({object}): {detail}")]
    Blob {
        /// The blob's BLAKE3 hash, in hexadecimal.
        hash: String,
        /// The store's URL and the object's key.
        object: String,
        /// What went wrong.
        detail: String,
        /// The store's error, when it reported one.
        #[source]
        source: Option<io::Error>,
    },
    /// The key store of personal data's subject keys ([`crate::keys`]) failed, or holds
    /// what it must not (a wrong master key, a damaged file).
    #[error("key store {}: {detail}", path.display())]
    Keys {
        /// The key store.
        path: PathBuf,
        /// What went wrong.
        detail: String,
        /// The I/O error, when there was one.
        #[source]
        source: Option<io::Error>,
    },
    /// An erasure refused because a legal hold covers an event that holds the subject's
    /// data.
    #[error(
        "subject {subject} cannot be erased: legal hold {hold:?} ({reason}) covers the event at position {position}"
    )]
    ErasureHeld {
        /// The subject's id hash, in hexadecimal.
        subject: String,
        /// The hold's id.
        hold: String,
        /// The hold's reason.
        reason: String,
        /// An event of the subject the hold covers.
        position: u64,
    },
    /// Options out of range.
    #[error("invalid options: {reason}")]
    InvalidOptions {
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Whether a failed append may still have written its batch: true for
    /// [`Error::Poisoned`] (the sync that was to make it durable failed, after the records
    /// were written), false for every refusal, which writes nothing. Find out after a
    /// restart by retrying with the same event ids (idempotent), as with any store whose
    /// acknowledgement was lost.
    #[must_use]
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Error::Poisoned { .. })
    }

    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { op, path, source }
    }
}

/// Shorthand for results of the engine's API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
