//! The log: many segments behind one API. Appends with optimistic concurrency, atomic
//! batches and multi-stream batches, idempotent retries, group commit, reads by stream and
//! by position, a blocking tail, recovery on open, and sealing of full segments.
//!
//! Contract (docs/FORMAT.md, "Recovery"; README, "Durability"):
//! - An append acknowledged under [`Durability::Fsync`] survives any crash, including a
//!   power loss, and so does everything before it in the log.
//! - A batch is atomic: after any crash, all of its events are in the log or none is.
//! - Readers see only acknowledged records (under `Fsync`, durable ones), and never part of
//!   a batch.
//! - After a failed sync the log refuses every later write ([`Error::Poisoned`]).

mod append;
mod attrs;
mod background;
mod backup;
mod blobs;
mod checkpoints;
mod cold;
mod commit;
mod cosignatures;
mod detail;
mod governance;
mod ids;
mod order;
mod personal;
pub mod producers;
mod read;
mod recover;
mod retention;
mod shared;
pub(crate) mod streams;
mod tree;
mod verify;
mod visible;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use append::AppendHandle;
pub use attrs::Query;
pub use backup::{BackupOptions, BackupReport, ColdBackup};
pub(crate) use checkpoints::create_key_file;
pub use checkpoints::{CHECKPOINTS_FILE, KEY_FILE};
pub use cold::{ColdOptions, ColdStatus, CompactPolicy, CompactReport, MovedSegment};
pub(crate) use cold::{ColdPlace, ColdTier};
pub use cosignatures::COSIGNATURES_FILE;
pub use detail::{IndexSummary, SegmentDetail};
pub use governance::{RetentionPlan, StreamHeld, StreamRemoval};
pub use personal::{
    ERASED_MARKER, ERASURE_STREAM, Erasure, ForgetReport, Personal, PersonalScope, SEALED_MARKER,
    SUBJECT_ERASED, SealState, Sealing, SubjectErased,
};
pub use read::{RecordView, Tail, Verify};
pub use retention::{RANGES_PER_EVENT, RetentionReport, RetentionStatus};
use shared::Shared;
pub use tree::TREE_FILE;

use crate::error::{Error, Result};
use crate::format::DecodeError;
use crate::format::checkpoint::SignedCheckpoint;
use crate::format::envelope::ContentType;
use crate::format::proof::{self, ConsistencyProof, InclusionProof, ProofError};
use crate::format::{EventId, Hash32, Position, SEGMENT_BYTES_DEFAULT, SegmentSeq, Timestamp};

/// When an append is acknowledged, and what survives a crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge only after the records, and everything needed to find them after a
    /// crash, are on stable storage. Concurrent appends share one sync (group commit).
    #[default]
    Fsync,
    /// Acknowledge once the records are in the page cache; a background flusher makes them
    /// durable within `max_delay`. A process crash loses nothing acknowledged; a power loss
    /// loses at most the last `max_delay` (plus one sync) of acknowledged appends.
    Batched {
        /// The longest an acknowledged append waits before a sync covers it.
        max_delay: Duration,
    },
    /// Acknowledge once the records are in the page cache and never sync on the append
    /// path. A process crash loses nothing acknowledged; a power loss may lose everything
    /// since the last segment was sealed.
    None,
}

/// What `open` does with damage it finds in the unsealed tail of the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Truncate a torn tail (an unfinished write that was never acknowledged) and report
    /// it; refuse to open when the damage lies in data that was acknowledged.
    #[default]
    Strict,
    /// Like `Strict`, but also truncate damaged acknowledged data at the end of the log,
    /// reporting it as lost. For an operator who has copied the directory first.
    TruncateDamagedTail,
    /// Change nothing on disk: read up to the first damage, refuse writes, take no lock.
    /// For forensics.
    ReadOnly,
}

/// Options for [`Log::open`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Size of each segment file, a multiple of 4096 between 64 KiB and 4 GiB.
    pub segment_bytes: u64,
    /// When appends are acknowledged.
    pub durability: Durability,
    /// What to do with damage found on open.
    pub recovery: RecoveryMode,
    /// How many of the most recent event ids are remembered to recognise retried appends.
    pub idempotency_window: usize,
    /// Create the directory and a new log if there is none.
    pub create: bool,
    /// The Ed25519 signing key file for checkpoints. `None`: `tally.key` in the data
    /// directory, created (mode 0600) when missing.
    pub signing_key: Option<PathBuf>,
    /// Write a signed checkpoint once this many records were appended since the last one.
    /// Checkpoints are also written on every segment seal, on close, and on demand.
    pub checkpoint_every_records: Option<u64>,
    /// Write a signed checkpoint when the log has grown and this long has passed since the
    /// last one.
    pub checkpoint_interval: Option<Duration>,
    /// Write checkpoints on seals, on close, and by the two settings above. Off, only
    /// [`Log::checkpoint`] writes them (for tests that simulate losing synced data, which
    /// a checkpoint would otherwise have covered).
    pub auto_checkpoints: bool,
    /// Keep the attribute indexes ([`Log::find`]) caught up in a background thread. Off,
    /// a lookup indexes the records it has not seen first.
    pub index_attributes: bool,
    /// The on-disk format version of a log this open creates (docs/FORMAT.md, "Version
    /// history"): 2, the default, or 1. An existing log keeps its own version.
    pub format_version: u16,
    /// The witnesses whose cosignatures [`Log::add_cosignature`] takes (their Ed25519
    /// public keys); `None` takes any cosignature that verifies. A server reachable by
    /// clients it does not know names its witnesses here.
    pub witness_keys: Option<Vec<[u8; 32]>>,
    /// Where the log's files are: the operating system's file system, or (for tests, with
    /// the `internals` feature) a simulated disk that can lose power.
    pub storage: crate::Storage,
    /// The cold tier: its store, its policy, its cache (docs/FORMAT.md, section 21).
    pub cold: ColdOptions,
    /// The key store of data subjects' keys ([`crate::keys`]): needed to append events
    /// that mark personal data ([`EventData::personal`]), to read it, and to forget a
    /// subject ([`Log::forget`]). It must not be inside the log's directory.
    pub keys: Option<std::sync::Arc<dyn crate::keys::KeyStore>>,
    /// Apply retention ([`Log::apply_retention`], as of now) in a background thread at this
    /// interval, at low priority, while the log has a retention policy. `None`: only on
    /// demand and before each compaction. A failure is kept for
    /// [`Log::retention_status`] and retried at the next interval.
    pub retention_every: Option<Duration>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            durability: Durability::Fsync,
            recovery: RecoveryMode::Strict,
            idempotency_window: 1 << 18,
            create: true,
            signing_key: None,
            checkpoint_every_records: Some(1 << 20),
            checkpoint_interval: Some(Duration::from_secs(60)),
            auto_checkpoints: true,
            index_attributes: true,
            format_version: crate::format::FORMAT_VERSION,
            witness_keys: None,
            storage: crate::Storage::os(),
            cold: ColdOptions::default(),
            keys: None,
            retention_every: None,
        }
    }
}

/// The condition an append places on its stream's current version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No condition.
    Any,
    /// The stream must have no events.
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream's last version must be exactly this (versions count from 0).
    Exact(u64),
}

/// Order of a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

/// An event to append: the envelope without what the engine assigns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventData {
    /// The event id; a v7 UUID is generated when `None`. Give ids to make retries
    /// idempotent.
    pub event_id: Option<EventId>,
    /// The event type, for example `TradeAmended`.
    pub event_type: String,
    /// Version of the payload's schema.
    pub schema_version: u32,
    /// The aggregate type, for example `Trade`.
    pub aggregate_type: String,
    /// How to read the payload (or the blob's bytes).
    pub content_type: ContentType,
    /// The payload. A payload longer than the log's blob threshold
    /// ([`ColdOptions::blob_threshold`]) is stored as a blob in the cold tier's store and the
    /// event refers to it by hash; up to [`crate::format::blob::BLOB_BYTES_MAX`] bytes then.
    /// A store that sends the bytes in a request (S3) copies such a payload once; to hold a
    /// large one in memory only once, store it with [`Log::put_blob_shared`] and append
    /// [`EventData::with_blob`].
    pub payload: Vec<u8>,
    /// A blob already in the log's store ([`Log::put_blob`]) that holds the payload: the
    /// event refers to it, and `payload` must be empty. The append checks that the store has
    /// it.
    pub blob: Option<crate::format::blob::BlobRef>,
    /// Correlation id (empty for none).
    pub correlation_id: String,
    /// Causation id (empty for none).
    pub causation_id: String,
    /// Who did it.
    pub actor: String,
    /// Business time; the time of the append when `None`.
    pub event_time: Option<Timestamp>,
    /// Personal data in the payload, sealed at append with a key of its data subject so
    /// that [`Log::forget`] can erase it (needs a log with a key store, format version 5).
    pub personal: Option<personal::Personal>,
}

impl EventData {
    /// An event with a binary payload and everything else empty or default.
    #[must_use]
    pub fn new(event_type: impl Into<String>, payload: impl Into<Vec<u8>>) -> EventData {
        EventData {
            event_id: None,
            event_type: event_type.into(),
            schema_version: 1,
            aggregate_type: String::new(),
            content_type: ContentType::Binary,
            payload: payload.into(),
            blob: None,
            correlation_id: String::new(),
            causation_id: String::new(),
            actor: String::new(),
            event_time: None,
            personal: None,
        }
    }

    /// An event with a JSON payload.
    #[must_use]
    pub fn json(event_type: impl Into<String>, json: impl Into<String>) -> EventData {
        EventData {
            content_type: ContentType::Json,
            ..EventData::new(event_type, json.into().into_bytes())
        }
    }

    /// An event whose payload is a blob already in the log's store ([`Log::put_blob`]).
    #[must_use]
    pub fn with_blob(
        event_type: impl Into<String>,
        content_type: ContentType,
        blob: crate::format::blob::BlobRef,
    ) -> EventData {
        EventData {
            content_type,
            blob: Some(blob),
            ..EventData::new(event_type, Vec::new())
        }
    }

    /// Sets the event id.
    #[must_use]
    pub fn with_id(mut self, id: EventId) -> EventData {
        self.event_id = Some(id);
        self
    }

    /// Sets the aggregate type.
    #[must_use]
    pub fn aggregate_type(mut self, t: impl Into<String>) -> EventData {
        self.aggregate_type = t.into();
        self
    }

    /// Sets the schema version.
    #[must_use]
    pub fn schema_version(mut self, v: u32) -> EventData {
        self.schema_version = v;
        self
    }

    /// Sets the correlation id.
    #[must_use]
    pub fn correlation_id(mut self, id: impl Into<String>) -> EventData {
        self.correlation_id = id.into();
        self
    }

    /// Sets the causation id.
    #[must_use]
    pub fn causation_id(mut self, id: impl Into<String>) -> EventData {
        self.causation_id = id.into();
        self
    }

    /// Sets the actor.
    #[must_use]
    pub fn actor(mut self, actor: impl Into<String>) -> EventData {
        self.actor = actor.into();
        self
    }

    /// Marks personal data in the payload ([`Personal`]): sealed at append under its
    /// subject's key, erased by [`Log::forget`].
    #[must_use]
    pub fn personal(mut self, personal: Personal) -> EventData {
        self.personal = Some(personal);
        self
    }

    /// Sets the business time.
    #[must_use]
    pub fn event_time(mut self, t: Timestamp) -> EventData {
        self.event_time = Some(t);
        self
    }
}

/// One stream's part of a (multi-stream) append.
#[derive(Clone, Copy, Debug)]
pub struct AppendRequest<'a> {
    /// The stream.
    pub stream: &'a str,
    /// The condition on its current version.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: &'a [EventData],
}

/// Where an append's events went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendResult {
    /// Position of the first event.
    pub first_position: Position,
    /// Position of the last event.
    pub last_position: Position,
    /// Stream version of the first event.
    pub first_version: u64,
    /// Stream version of the last event: the next append's `Exact` expectation.
    pub last_version: u64,
}

/// An event as stored. The variable fields (stream, types, ids, actor, payload) stay in the
/// record's encoded envelope, one allocation per event, and are read through accessors.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Position in the log.
    pub position: Position,
    /// Version in the stream.
    pub version: u64,
    /// The event id.
    pub event_id: EventId,
    /// Schema version of the payload.
    pub schema_version: u32,
    /// How to read the payload.
    pub content_type: ContentType,
    /// Whether the payload field holds the payload or a blob reference
    /// ([`RecordedEvent::blob`]).
    pub payload_form: crate::format::envelope::PayloadForm,
    /// Business time.
    pub event_time: Timestamp,
    /// When the engine wrote it.
    pub record_time: Timestamp,
    /// The record's chain hash.
    pub record_hash: Hash32,
    /// The encoded envelope, checked when read.
    body: Box<[u8]>,
    /// End offsets in `body` of stream, aggregate type, event type, correlation id,
    /// causation id, actor and payload (each starts where the previous ends; the first at
    /// the envelope's fixed length).
    ends: [u32; 7],
    /// For an event retention removed: the position of the `$RetentionApplied` event that
    /// removed it.
    removed_by: Option<Position>,
    /// For an event that sealed personal data: what became of it when read.
    sealing: Option<Box<personal::Sealing>>,
}

/// The event type of the marker a read returns in place of an event retention removed
/// ([`RecordedEvent::removed_by`]).
pub use crate::format::pruned::REMOVED_EVENT_TYPE;

impl RecordedEvent {
    /// Builds an event from a checked envelope.
    pub(crate) fn new(
        position: Position,
        version: u64,
        record_time: Timestamp,
        record_hash: Hash32,
        env: &crate::format::envelope::EnvelopeRef<'_>,
        body: &[u8],
    ) -> RecordedEvent {
        let mut ends = [0u32; 7];
        let mut at = crate::format::envelope::ENVELOPE_FIXED_LEN as u32;
        let lens = [
            env.stream.len(),
            env.aggregate_type.len(),
            env.event_type.len(),
            env.correlation_id.len(),
            env.causation_id.len(),
            env.actor.len(),
            env.payload.len(),
        ];
        for (end, len) in ends.iter_mut().zip(lens) {
            at += len as u32;
            *end = at;
        }
        debug_assert_eq!(at as usize, body.len());
        RecordedEvent {
            position,
            version,
            event_id: env.event_id,
            schema_version: env.schema_version,
            content_type: env.content_type,
            payload_form: env.payload_form,
            event_time: env.event_time,
            record_time,
            record_hash,
            body: body.into(),
            ends,
            removed_by: None,
            sealing: None,
        }
    }

    /// Replaces a sealed event's payload by what opening it gave (the payload, or markers),
    /// and records how.
    pub(crate) fn reopen(
        &mut self,
        payload: Vec<u8>,
        content_type: ContentType,
        sealing: personal::Sealing,
    ) {
        let Ok(env) = crate::format::envelope::EnvelopeRef::decode(&self.body) else {
            return;
        };
        let env = personal::reopened_envelope(&env, &payload, content_type);
        let mut body = Vec::with_capacity(env.encoded_len());
        if env.encode_into(&mut body).is_err() {
            // An opened payload longer than an envelope holds (fields re-serialised): a
            // short marker stands in its place, never the sealed bytes.
            let marker = serde_json::json!({ personal::SEALED_MARKER: {
                "subject": sealing.subject.to_hex(),
                "reason": "the opened payload exceeds the envelope's limit",
            }})
            .to_string();
            let sealing = personal::Sealing {
                state: personal::SealState::Unavailable {
                    reason: "the opened payload exceeds the envelope's limit".into(),
                },
                ..sealing
            };
            self.reopen(marker.into_bytes(), ContentType::Json, sealing);
            return;
        }
        let mut e = RecordedEvent::new(
            self.position,
            self.version,
            self.record_time,
            self.record_hash,
            &env,
            &body,
        );
        e.sealing = Some(Box::new(sealing));
        *self = e;
    }

    /// For an event that sealed personal data: whose it is, which fields, and whether it was
    /// opened, erased (and by which `$SubjectErased` event) or unavailable. The payload then
    /// reads as appended, or with markers in place of what could not be opened.
    #[must_use]
    pub fn sealing(&self) -> Option<&personal::Sealing> {
        self.sealing.as_deref()
    }

    /// The marker read in place of an event retention removed: its position, version,
    /// record time and record hash, its stream, the event type [`REMOVED_EVENT_TYPE`], a nil
    /// id, and a JSON payload `{"removed_by": P}` naming the `$RetentionApplied` event (which
    /// says which policy removed it, when and why). Nothing else of the event is left.
    pub(crate) fn removed(
        position: Position,
        version: u64,
        record_time: Timestamp,
        record_hash: Hash32,
        pruned: &crate::format::pruned::PrunedRef<'_>,
    ) -> RecordedEvent {
        let payload = crate::format::pruned::marker_payload(pruned.removed_by);
        let env =
            crate::format::pruned::marker_with_payload(pruned, record_time, payload.as_bytes());
        let mut body = Vec::with_capacity(env.encoded_len());
        // The fields are within every limit (a stream name that was stored, a short type
        // and payload), so encoding cannot fail; an empty body would only hide the marker.
        let _ = env.encode_into(&mut body);
        let mut e = RecordedEvent::new(position, version, record_time, record_hash, &env, &body);
        e.removed_by = Some(pruned.removed_by);
        e
    }

    /// For an event retention removed: the position of the `$RetentionApplied` event that
    /// removed it ([`Log::governance`] says which policy, when and why). The event then reads
    /// as a marker of type [`REMOVED_EVENT_TYPE`].
    #[must_use]
    pub fn removed_by(&self) -> Option<Position> {
        self.removed_by
    }

    fn field(&self, i: usize) -> &[u8] {
        let start = if i == 0 {
            crate::format::envelope::ENVELOPE_FIXED_LEN
        } else {
            self.ends[i - 1] as usize
        };
        &self.body[start..self.ends[i] as usize]
    }

    fn text(&self, i: usize) -> &str {
        // Checked as UTF-8 when the record was read; checking again costs little and keeps
        // this crate free of unchecked conversions.
        std::str::from_utf8(self.field(i)).unwrap_or_default()
    }

    /// The stream.
    #[must_use]
    pub fn stream(&self) -> &str {
        self.text(0)
    }

    /// The aggregate type.
    #[must_use]
    pub fn aggregate_type(&self) -> &str {
        self.text(1)
    }

    /// The event type.
    #[must_use]
    pub fn event_type(&self) -> &str {
        self.text(2)
    }

    /// Correlation id (empty for none).
    #[must_use]
    pub fn correlation_id(&self) -> &str {
        self.text(3)
    }

    /// Causation id (empty for none).
    #[must_use]
    pub fn causation_id(&self) -> &str {
        self.text(4)
    }

    /// Who did it.
    #[must_use]
    pub fn actor(&self) -> &str {
        self.text(5)
    }

    /// The payload field: the payload, or for an event whose payload is a blob
    /// ([`RecordedEvent::blob`]), the 40-byte reference to it.
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        self.field(6)
    }

    /// The blob holding this event's payload, when it is stored as one: read its bytes with
    /// [`Log::read_blob`].
    #[must_use]
    pub fn blob(&self) -> Option<crate::format::blob::BlobRef> {
        match self.payload_form {
            crate::format::envelope::PayloadForm::Inline
            | crate::format::envelope::PayloadForm::Sealed => None,
            crate::format::envelope::PayloadForm::Blob => {
                crate::format::blob::BlobRef::decode(self.payload()).ok()
            }
        }
    }

    /// The encoded envelope, as stored (what the record hash covers through its body hash).
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }
}

/// Read access to a stored event, whether the engine read it or it came over the wire, so
/// that aggregates and projections run unchanged on an embedded log and through a server.
pub trait EventView {
    /// Position in the log.
    fn position(&self) -> Position;
    /// Version in its stream.
    fn version(&self) -> u64;
    /// The event id.
    fn event_id(&self) -> EventId;
    /// The stream.
    fn stream(&self) -> &str;
    /// The event type.
    fn event_type(&self) -> &str;
    /// The aggregate type.
    fn aggregate_type(&self) -> &str;
    /// Schema version of the payload.
    fn schema_version(&self) -> u32;
    /// How to read the payload.
    fn content_type(&self) -> ContentType;
    /// Correlation id (empty for none).
    fn correlation_id(&self) -> &str;
    /// Causation id (empty for none).
    fn causation_id(&self) -> &str;
    /// Who did it.
    fn actor(&self) -> &str;
    /// The payload field: the payload, or for an event whose payload is a blob
    /// ([`EventView::blob`]), the 40-byte reference to it.
    fn payload(&self) -> &[u8];
    /// Whether the payload field holds the payload or a blob reference.
    fn payload_form(&self) -> crate::format::envelope::PayloadForm;
    /// The blob holding this event's payload, when it is stored as one (read it with
    /// [`Log::read_blob`] or a client's blob read).
    fn blob(&self) -> Option<crate::format::blob::BlobRef> {
        match self.payload_form() {
            crate::format::envelope::PayloadForm::Inline
            | crate::format::envelope::PayloadForm::Sealed => None,
            crate::format::envelope::PayloadForm::Blob => {
                crate::format::blob::BlobRef::decode(self.payload()).ok()
            }
        }
    }
    /// Business time.
    fn event_time(&self) -> Timestamp;
    /// When the log recorded it.
    fn record_time(&self) -> Timestamp;
    /// For an event retention removed (a marker in its place), the position of the
    /// `$RetentionApplied` event that removed it; `None` for every other event.
    fn removed_by(&self) -> Option<Position> {
        None
    }

    /// The envelope's fields, borrowed.
    fn envelope(&self) -> crate::format::envelope::EnvelopeRef<'_> {
        crate::format::envelope::EnvelopeRef {
            event_id: self.event_id(),
            event_time: self.event_time(),
            schema_version: self.schema_version(),
            content_type: self.content_type(),
            payload_form: self.payload_form(),
            stream: self.stream(),
            aggregate_type: self.aggregate_type(),
            event_type: self.event_type(),
            correlation_id: self.correlation_id(),
            causation_id: self.causation_id(),
            actor: self.actor(),
            payload: self.payload(),
        }
    }
}

impl EventView for RecordedEvent {
    fn position(&self) -> Position {
        self.position
    }
    fn version(&self) -> u64 {
        self.version
    }
    fn event_id(&self) -> EventId {
        self.event_id
    }
    fn stream(&self) -> &str {
        RecordedEvent::stream(self)
    }
    fn event_type(&self) -> &str {
        RecordedEvent::event_type(self)
    }
    fn aggregate_type(&self) -> &str {
        RecordedEvent::aggregate_type(self)
    }
    fn schema_version(&self) -> u32 {
        self.schema_version
    }
    fn content_type(&self) -> ContentType {
        self.content_type
    }
    fn payload_form(&self) -> crate::format::envelope::PayloadForm {
        self.payload_form
    }
    fn correlation_id(&self) -> &str {
        RecordedEvent::correlation_id(self)
    }
    fn causation_id(&self) -> &str {
        RecordedEvent::causation_id(self)
    }
    fn actor(&self) -> &str {
        RecordedEvent::actor(self)
    }
    fn payload(&self) -> &[u8] {
        RecordedEvent::payload(self)
    }
    fn event_time(&self) -> Timestamp {
        self.event_time
    }
    fn record_time(&self) -> Timestamp {
        self.record_time
    }
    fn removed_by(&self) -> Option<Position> {
        self.removed_by
    }
}

/// Why a fold (a projection, an aggregate, a replay) stops at `e`: an event retention
/// removed would make it compute from a shortened history without saying so, so it is
/// refused, naming the `$RetentionApplied` event. A fold of history that retention pruned
/// starts from a signed archive or a checkpoint after it ([`crate::replay::validate_window`],
/// a projection's checkpoint). `None` for every event a fold may take.
#[must_use]
pub fn fold_refusal(e: &dyn EventView) -> Option<String> {
    e.removed_by().map(|by| {
        format!(
            "the event at position {} (version {} of {}) was removed by retention (the \
             $RetentionApplied event at position {}); a fold of pruned history starts from a \
             signed archive or a checkpoint taken after it",
            e.position().0,
            e.version(),
            e.stream(),
            by.0
        )
    })
}

impl std::fmt::Debug for RecordedEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedEvent")
            .field("position", &self.position)
            .field("stream", &self.stream())
            .field("version", &self.version)
            .field("event_id", &self.event_id)
            .field("event_type", &self.event_type())
            .field("schema_version", &self.schema_version)
            .field("aggregate_type", &self.aggregate_type())
            .field("content_type", &self.content_type)
            .field("payload_len", &self.payload().len())
            .field("blob", &self.blob())
            .field("correlation_id", &self.correlation_id())
            .field("causation_id", &self.causation_id())
            .field("actor", &self.actor())
            .field("event_time", &self.event_time)
            .field("record_time", &self.record_time)
            .finish_non_exhaustive()
    }
}

/// What the log knows about a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream.
    pub stream: String,
    /// Version of its last event.
    pub last_version: u64,
    /// Position of its first event.
    pub first_position: Position,
    /// Position of its last event.
    pub last_position: Position,
    /// Record time of its first event.
    pub created: Timestamp,
}

/// Bytes removed from the end of the log when it was opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// The segment file.
    pub file: PathBuf,
    /// File offset where the kept data ends.
    pub offset: u64,
    /// Bytes zeroed after it (or the whole file's length when it was removed).
    pub bytes: u64,
    /// The first position that is no longer in the log.
    pub first_lost_position: Position,
    /// Records, whole or partial, that were removed (valid records of an unfinished batch
    /// count; torn ones count as one).
    pub records: u64,
    /// `true` when the removed data may have been acknowledged (only with
    /// [`RecoveryMode::TruncateDamagedTail`]).
    pub acknowledged_data_lost: bool,
    /// Why the data ended there.
    pub reason: String,
}

/// What `open` found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The last close was clean (no scan of the active segment was needed).
    pub clean: bool,
    /// Torn or damaged tails removed.
    pub truncations: Vec<Truncation>,
    /// Segments whose index sidecar was missing or damaged and was rebuilt.
    pub rebuilt_indexes: Vec<SegmentSeq>,
    /// Segments that were full but unsealed and were sealed during open.
    pub sealed_on_open: Vec<SegmentSeq>,
    /// Segments whose footer was damaged by an interrupted seal and was written again from
    /// their (verified) records.
    pub footers_rewritten: Vec<SegmentSeq>,
    /// Records read from segment files (not from indexes) to recover.
    pub records_scanned: u64,
    /// The Merkle node file was missing, damaged or disagreed with the latest checkpoint,
    /// and was recomputed from the records.
    pub merkle_tree_rebuilt: bool,
    /// The byte offset at which a damaged last entry of the checkpoints file (a checkpoint
    /// whose write was interrupted, so never returned) was cut off.
    pub checkpoint_tail_truncated: Option<u64>,
    /// Position of the next record to be written.
    pub next_position: Position,
    /// Keys of erased subjects that were still in the key store (a crash between an
    /// erasure's event and the key's destruction), destroyed during open.
    pub erasures_redone: u64,
}

/// A summary of one segment, for tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Sequence number.
    pub seq: SegmentSeq,
    /// The file.
    pub path: PathBuf,
    /// First position.
    pub base_position: Position,
    /// Records in it (visible ones, for the active segment).
    pub record_count: u64,
    /// File offset just past the last record written (for the active segment, including
    /// records not yet acknowledged).
    pub data_end: u64,
    /// Sealed (footer written).
    pub sealed: bool,
    /// Merkle root from the footer, for sealed segments.
    pub merkle_root: Option<Hash32>,
    /// For a segment in the cold tier: its object, as `<store URL>/<key>`.
    pub cold: Option<String>,
    /// Record times of the first and last record, from the footer of a sealed segment.
    pub record_times: Option<(Timestamp, Timestamp)>,
}

/// An open log. Share it between threads by reference or in an `Arc`; every method takes
/// `&self`. Dropping it closes it.
pub struct Log {
    shared: Arc<Shared>,
    report: RecoveryReport,
    /// Whether dropping this value closes the log: true for [`Log::open`]'s, false for a
    /// background thread's handle ([`Log::handle`]), which the log's close waits for.
    closes_on_drop: bool,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Log {
    /// Opens the log in `dir`, creating it if `options.create` is set, and recovers it.
    ///
    /// # Errors
    /// [`Error::Locked`] if another opener holds the directory, [`Error::Corrupt`] for
    /// damage that recovery may not repair (see [`RecoveryMode`]), [`Error::Io`] for
    /// file-system failures, [`Error::InvalidOptions`].
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Log> {
        let (shared, report) = recover::open(dir.as_ref(), options)?;
        Ok(Log {
            shared,
            report,
            closes_on_drop: true,
        })
    }

    /// A handle on an open log for one of its background threads: the whole API, and
    /// dropping it closes nothing.
    pub(crate) fn handle(shared: &Arc<Shared>) -> Log {
        Log {
            shared: Arc::clone(shared),
            report: RecoveryReport::default(),
            closes_on_drop: false,
        }
    }

    /// What `open` found and did.
    #[must_use]
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The data directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The log's 16-byte id.
    #[must_use]
    pub fn log_id(&self) -> [u8; 16] {
        self.shared.meta.log_id
    }

    /// Lets go of the pages of sealed segments that reads have mapped into this process
    /// (they stay in the page cache, and the next read maps them again): a tool that reads
    /// a large part of the log calls it now and then, so that its resident memory stays
    /// bounded whatever the log's size. The active segment is left as it is.
    ///
    /// # Errors
    /// What the operating system refuses.
    pub fn release_mapped_memory(&self) -> Result<()> {
        for seg in self.shared.segments.snapshot() {
            if matches!(
                *seg.state
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
                crate::segment::SegState::Active
            ) {
                continue;
            }
            if let Some(map) = seg.mapped() {
                map.release()
                    .map_err(Error::io("releasing a segment map", &seg.path))?;
            }
        }
        Ok(())
    }

    /// The layout of the log's record headers (its format version).
    #[must_use]
    pub fn layout(&self) -> crate::format::record::Layout {
        self.shared.meta.layout
    }

    /// Appends `events` to `stream` if its version matches `expected`, and waits for the
    /// acknowledgement the log's [`Durability`] asks for.
    ///
    /// A retry of an earlier append (same event ids, same stream) writes nothing and returns
    /// the earlier result.
    ///
    /// # Errors
    /// [`Error::WrongExpectedVersion`], [`Error::InvalidEvent`], [`Error::InvalidAppend`],
    /// [`Error::BatchTooLarge`], [`Error::PartialDuplicate`], [`Error::DuplicateEventId`],
    /// [`Error::Poisoned`], [`Error::Closed`], [`Error::ReadOnly`]. On
    /// [`Error::Poisoned`] the outcome is unknown ([`Error::is_outcome_unknown`]): the
    /// batch may have reached the disk before the sync failed, so after a restart it is
    /// found whole or not at all; retry it there with the same event ids, which returns the
    /// first result if it was written. On any other error nothing of the batch was written.
    pub fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendResult> {
        let mut results = self.append_multi(&[AppendRequest {
            stream,
            expected,
            events,
        }])?;
        Ok(results.remove(0))
    }

    /// Appends to several streams atomically: every request's expectation must hold, and
    /// then all events are written as one batch (all or none survive a crash).
    ///
    /// # Errors
    /// As [`Log::append`]; nothing is written if any request fails.
    pub fn append_multi(&self, requests: &[AppendRequest<'_>]) -> Result<Vec<AppendResult>> {
        append::submit(&self.shared, requests, false)?.wait()
    }

    /// Starts an append and returns at once with a handle to wait on; the records are
    /// already ordered in the log, so one thread can keep many appends in flight.
    ///
    /// # Errors
    /// As [`Log::append`] for everything checked before the write; durability errors are
    /// reported by [`AppendHandle::wait`].
    pub fn append_async(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
    ) -> Result<AppendHandle> {
        self.append_async_multi(&[AppendRequest {
            stream,
            expected,
            events,
        }])
    }

    /// Appends a batch signed by a producer ([`producer_signature`] makes the signature):
    /// the signature is checked over the events' envelopes before anything is written, and
    /// stored in the batch's first record, where the chain covers it. The batch must give
    /// every event's id and event time (they are part of what is signed), and the log must
    /// be of format version 2.
    ///
    /// # Errors
    /// As [`Log::append_multi`]; [`Error::SignatureRefused`] when the signature does not
    /// verify or its key is not registered, revoked, or not allowed for a stream.
    pub fn append_multi_signed(
        &self,
        requests: &[AppendRequest<'_>],
        signature: &crate::format::producer::ProducerSignature,
    ) -> Result<Vec<AppendResult>> {
        self.append_deferred_multi_signed(requests, signature)?
            .wait()
    }

    /// Signs and appends a batch to one stream with a producer's key: events without an id
    /// or event time get one first ([`Log::append_multi_signed`]).
    ///
    /// # Errors
    /// As [`Log::append_multi_signed`].
    pub fn append_signed(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        events: &[EventData],
        key: &ed25519_dalek::SigningKey,
    ) -> Result<AppendResult> {
        let time = now();
        let events: Vec<EventData> = events
            .iter()
            .map(|e| EventData {
                event_id: Some(e.event_id.unwrap_or_else(new_event_id)),
                event_time: Some(e.event_time.unwrap_or(time)),
                ..e.clone()
            })
            .collect();
        let requests = [AppendRequest {
            stream,
            expected,
            events: &events,
        }];
        let signature = producer_signature(&self.log_id(), &requests, key)?;
        let mut results = self.append_multi_signed(&requests, &signature)?;
        Ok(results.remove(0))
    }

    /// Registers a producer key in `$producers` (an event with `actor` and `reason`): from
    /// then on it may sign batches for streams with one of `prefixes` (any stream when
    /// empty). Returns where the registration was written.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a log of format version 1 (it cannot store
    /// signatures); as [`Log::append`].
    pub fn register_producer_key(
        &self,
        public_key: [u8; 32],
        name: &str,
        prefixes: &[String],
        actor: &str,
        reason: &str,
    ) -> Result<AppendResult> {
        self.needs_signing_layout()?;
        self.write_producers(
            producers::KEY_REGISTERED,
            producers::registered_payload(&public_key, name, prefixes, reason),
            actor,
        )
    }

    /// Revokes a producer key: it signs nothing new. Its earlier batches stay as they are.
    ///
    /// # Errors
    /// As [`Log::append`].
    pub fn revoke_producer_key(
        &self,
        public_key: [u8; 32],
        actor: &str,
        reason: &str,
    ) -> Result<AppendResult> {
        self.write_producers(
            producers::KEY_REVOKED,
            producers::revoked_payload(&public_key, reason),
            actor,
        )
    }

    /// Requires every later append to a stream starting with `prefix` to be signed by a
    /// registered producer key; unsigned ones are refused with nothing written.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a log of format version 1 (it cannot store
    /// signatures); as [`Log::append`].
    pub fn require_signatures(
        &self,
        prefix: &str,
        actor: &str,
        reason: &str,
    ) -> Result<AppendResult> {
        self.needs_signing_layout()?;
        self.write_producers(
            producers::SIGNATURES_REQUIRED,
            producers::required_payload(prefix, reason),
            actor,
        )
    }

    /// Refuses producer registrations and policies on a log of format version 1, which
    /// cannot store signatures.
    fn needs_signing_layout(&self) -> Result<()> {
        if self.shared.meta.layout == crate::format::record::Layout::V1 {
            return Err(invalid_options(
                "signed appends need a log of format version 2",
            ));
        }
        Ok(())
    }

    /// The producer keys and the signing policy now in force.
    #[must_use]
    pub fn producer_policy(&self) -> producers::ProducerPolicy {
        self.shared.producers.read().clone()
    }

    /// Appends one event to `$producers` and applies it, holding the policy for writing so
    /// that every other append is ordered before or after it.
    fn write_producers(
        &self,
        event_type: &str,
        payload: String,
        actor: &str,
    ) -> Result<AppendResult> {
        let mut policy = self.shared.producers.write();
        let event = EventData::json(event_type, payload.clone()).actor(actor);
        let events = [event];
        let result = append::submit_signed(
            &self.shared,
            &[AppendRequest {
                stream: producers::PRODUCERS_STREAM,
                expected: ExpectedVersion::Any,
                events: &events,
            }],
            false,
            append::Signing {
                signature: None,
                system: true,
            },
            append::Blocking::Allowed,
        )?
        .wait()?
        .remove(0);
        policy.apply(event_type, payload.as_bytes())?;
        Ok(result)
    }

    /// [`Log::append_multi`] without waiting.
    ///
    /// # Errors
    /// As [`Log::append_async`].
    pub fn append_async_multi(&self, requests: &[AppendRequest<'_>]) -> Result<AppendHandle> {
        append::submit(&self.shared, requests, true)
    }

    /// [`Log::append_async_multi`] for a caller that will wait on the handle itself soon,
    /// typically after submitting a few more appends: no background flusher is woken, and
    /// the first [`AppendHandle::wait`] leads the sync on the waiting thread, which saves
    /// two thread hand-offs per acknowledgement. A server that gathers the appends it has
    /// read and then waits once uses this. A handle that nobody waits on becomes durable
    /// only when another append's sync covers it.
    ///
    /// # Errors
    /// As [`Log::append_async`].
    pub fn append_deferred_multi(&self, requests: &[AppendRequest<'_>]) -> Result<AppendHandle> {
        append::submit(&self.shared, requests, false)
    }

    /// [`Log::append_deferred_multi`] of a batch signed by a producer
    /// ([`Log::append_multi_signed`]).
    ///
    /// # Errors
    /// As [`Log::append_multi_signed`].
    pub fn append_deferred_multi_signed(
        &self,
        requests: &[AppendRequest<'_>],
        signature: &crate::format::producer::ProducerSignature,
    ) -> Result<AppendHandle> {
        self.submit_deferred(requests, Some(signature), append::Blocking::Allowed)
    }

    /// A deferred append of a client's batch, signed or not, that may or may not block.
    fn submit_deferred(
        &self,
        requests: &[AppendRequest<'_>],
        signature: Option<&crate::format::producer::ProducerSignature>,
        blocking: append::Blocking,
    ) -> Result<AppendHandle> {
        append::submit_signed(
            &self.shared,
            requests,
            false,
            append::Signing {
                signature,
                system: false,
            },
            blocking,
        )
    }

    /// [`Log::append_deferred_multi`] (or, with a `signature`,
    /// [`Log::append_deferred_multi_signed`]) for a thread that must not block, such as an
    /// async runtime's worker: where the blocking call would wait for a spare segment
    /// still being prepared, for the writer lock held across slow work (more than a few
    /// milliseconds), or for a producer registration's sync, this returns
    /// [`Error::WouldBlock`] having written nothing; the caller then makes the same append
    /// through the blocking call on a thread that may block. Copying the records under a
    /// briefly contended writer lock is not waiting.
    ///
    /// # Errors
    /// [`Error::WouldBlock`]; otherwise as the blocking call.
    pub fn try_append_deferred_multi(
        &self,
        requests: &[AppendRequest<'_>],
        signature: Option<&crate::format::producer::ProducerSignature>,
    ) -> Result<AppendHandle> {
        self.submit_deferred(requests, signature, append::Blocking::Refused)
    }

    /// Reads up to `max` events of `stream`, starting at `from_version` and going in
    /// `direction` (`u64::MAX` with `Backward` reads from the newest).
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a record read is damaged; I/O errors.
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        max: usize,
        direction: Direction,
    ) -> Result<Vec<RecordedEvent>> {
        let mut events = read::read_stream(&self.shared, stream, from_version, max, direction)?;
        personal::open_events(&self.shared, &mut events);
        Ok(events)
    }

    /// Reads up to `max` events of the whole log, starting at `from` and going in
    /// `direction` (`Position(u64::MAX)` with `Backward` reads from the newest).
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a record read is damaged; I/O errors.
    pub fn read_all(
        &self,
        from: Position,
        max: usize,
        direction: Direction,
    ) -> Result<Vec<RecordedEvent>> {
        let mut events = read::read_all(&self.shared, from, max, direction)?;
        personal::open_events(&self.shared, &mut events);
        Ok(events)
    }

    /// The visible events `query` selects, in position order, through the attribute indexes
    /// (docs/FORMAT.md, "Attribute index sidecar"): a lookup by event type, correlation id,
    /// causation id or actor reads only the events with that value, in the record-time
    /// window when one is given; an event-time window reads only the events in it. Every
    /// event returned is read from its record, checked, and compared with the query.
    /// Records not indexed yet are indexed first.
    ///
    /// Page through a large result with [`Query::limit`] and [`Query::positions`] starting
    /// after the last position returned.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a field with an empty value; [`Error::Corrupt`] when a
    /// record read is damaged; I/O errors writing a sidecar.
    pub fn find(&self, query: &Query<'_>) -> Result<Vec<RecordedEvent>> {
        let mut events = self
            .shared
            .indexing
            .attrs
            .lock()
            .find(&self.shared, query)?;
        personal::open_events(&self.shared, &mut events);
        Ok(events)
    }

    /// The first position whose record time is at or after `t` (the next position if
    /// none). Record times never decrease along the log (unless the clock went back across
    /// a restart, docs/FORMAT.md section 5), so this splits it into the records before `t`
    /// and those from `t` on.
    ///
    /// # Errors
    /// As [`Log::find`].
    pub fn position_at(&self, t: Timestamp) -> Result<Position> {
        self.shared
            .indexing
            .attrs
            .lock()
            .position_at(&self.shared, t)
    }

    /// What the log knows about `stream`, or `None` if it has no visible events.
    ///
    /// # Errors
    /// As [`Log::read_stream`].
    pub fn stream_info(&self, stream: &str) -> Result<Option<StreamInfo>> {
        read::stream_info(&self.shared, stream)
    }

    /// Calls `visit` for every visible record from `from`, in order, without decoding
    /// envelopes or allocating: the fast path for replays and projections. Returns the
    /// number of records visited.
    ///
    /// # Errors
    /// [`Error::Corrupt`] at the first record that fails the checks `verify` asks for.
    pub fn scan(
        &self,
        from: Position,
        verify: Verify,
        mut visit: impl FnMut(RecordView<'_>),
    ) -> Result<u64> {
        read::scan_range(&self.shared, from, Position(u64::MAX), verify, &mut visit)
    }

    /// [`Log::scan`] of the records `from..to` only: it starts at the nearest indexed
    /// record and stops at `to`.
    ///
    /// # Errors
    /// As [`Log::scan`].
    pub fn scan_range(
        &self,
        from: Position,
        to: Position,
        verify: Verify,
        mut visit: impl FnMut(RecordView<'_>),
    ) -> Result<u64> {
        read::scan_range(&self.shared, from, to, verify, &mut visit)
    }

    /// Checks the checksums and chain links of every visible record, spreading segments
    /// over `threads` threads (links are independent given the stored previous hash).
    /// Returns the number of records checked.
    ///
    /// # Errors
    /// [`Error::Corrupt`] for the first damaged segment in log order.
    pub fn check_chain(&self, threads: usize) -> Result<u64> {
        read::check_chain_parallel(&self.shared, threads)
    }

    /// A blocking iterator over the log from `from`, yielding records as they become
    /// visible; it ends when the log is closed.
    #[must_use]
    pub fn tail(&self, from: Position) -> Tail {
        Tail::new(Arc::clone(&self.shared), from)
    }

    /// The position the next record will get, among visible records: every position below
    /// it can be read.
    #[must_use]
    pub fn next_position(&self) -> Position {
        self.shared.visible_position()
    }

    /// Moves sealed segments to the cold tier: those `policy` names (the configured
    /// `Options::cold.policy` when `None`), oldest first, each only after its cold object
    /// was written, read back and checked, and its manifest entry synced (docs/FORMAT.md,
    /// 21.6). `dry_run` moves nothing and reports what would move. A segment that a crash
    /// left half moved is finished first. When the log has a retention policy, a run as of
    /// now comes first ([`Log::apply_retention`], actor `tally`, reason `before
    /// compaction`), so that what is due then does not move; if it fails, the compaction
    /// goes on and [`Log::retention_status`] has the error.
    ///
    /// # Errors
    /// [`Error::ReadOnly`]; [`Error::InvalidOptions`] when no store is configured;
    /// [`Error::Cold`] naming the segment and object when the store fails (after retries)
    /// or returns something other than what was written; [`Error::Corrupt`] when a local
    /// segment does not match its footer (it is not moved). Segments moved before the error
    /// stay moved.
    pub fn compact(&self, policy: Option<&CompactPolicy>, dry_run: bool) -> Result<CompactReport> {
        let policy = policy.unwrap_or(&self.shared.opts.cold.policy);
        // Retention first, when the log has a policy: what is due is removed before its
        // segment moves (a cold segment is not pruned; see ADR 0011).
        // A failed run does not stop the compaction (a log whose retention keeps failing
        // must still free its disk): its error is in `Log::retention_status`.
        let retention = if dry_run || self.shared.cold.store.is_none() {
            None
        } else {
            self.retention_if_policies(retention::BEFORE_COMPACTION_REASON)
                .and_then(Result::ok)
        };
        let mut report = cold::compact(&self.shared, policy, dry_run)?;
        if let Some(r) = retention {
            report.retention_removed = r.removed;
            report.retention_recorded_at = r.recorded_at;
        }
        Ok(report)
    }

    /// Stores `bytes` as a blob in the cold tier's store (once: the key is its BLAKE3 hash)
    /// and returns the reference an event gives to hold it as its payload
    /// ([`EventData::with_blob`]). Appends do this themselves for payloads above
    /// [`ColdOptions::blob_threshold`].
    ///
    /// # Errors
    /// [`Error::InvalidEvent`] for an empty blob or one above
    /// [`crate::format::blob::BLOB_BYTES_MAX`]; [`Error::InvalidAppend`] on a log of format
    /// version 1 or 2; [`Error::Blob`] when there is no store or it fails;
    /// [`Error::ReadOnly`].
    pub fn put_blob(&self, bytes: &[u8]) -> Result<crate::format::blob::BlobRef> {
        blobs::put(&self.shared, blobs::Bytes::Borrowed(bytes))
    }

    /// [`Log::put_blob`] of bytes held in an `Arc`: a store that sends them in a request
    /// (S3) takes a reference instead of a copy, so that a large blob is in memory once
    /// (tallyd's uploads).
    ///
    /// # Errors
    /// As [`Log::put_blob`].
    pub fn put_blob_shared(
        &self,
        bytes: &std::sync::Arc<Vec<u8>>,
    ) -> Result<crate::format::blob::BlobRef> {
        blobs::put(&self.shared, blobs::Bytes::Shared(bytes))
    }

    /// Whether this log can store blobs ([`Log::put_blob`]): writable, of format version 3,
    /// with a cold store.
    ///
    /// # Errors
    /// What [`Log::put_blob`] would fail with for that reason.
    pub fn accepts_blobs(&self) -> Result<()> {
        blobs::accepts(&self.shared)
    }

    /// Reads a blob whole and checks it against its reference (length and BLAKE3).
    ///
    /// # Errors
    /// [`Error::Blob`] when there is no store, the store fails, the blob is missing, or its
    /// bytes do not match the reference.
    pub fn read_blob(&self, blob: &crate::format::blob::BlobRef) -> Result<Vec<u8>> {
        blobs::read(&self.shared, blob)
    }

    /// Reads bytes `range` of a blob as the store holds them, unchecked: for a reader that
    /// takes a blob in pieces and checks the whole against the reference itself (tallyd's
    /// blob reads).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a range outside the blob; [`Error::Blob`] as
    /// [`Log::read_blob`].
    pub fn read_blob_range(
        &self,
        blob: &crate::format::blob::BlobRef,
        range: std::ops::Range<u64>,
    ) -> Result<Vec<u8>> {
        blobs::read_range(&self.shared, blob, range)
    }

    /// The length of a blob's object in the store, `None` when the store has none.
    ///
    /// # Errors
    /// [`Error::Blob`] when there is no store or it fails.
    pub fn blob_stored_len(&self, blob: &crate::format::blob::BlobRef) -> Result<Option<u64>> {
        blobs::stored_len(&self.shared, blob)
    }

    /// The cold tier's state: its store, how many segments are cold, fetches since open,
    /// the cache, and the last background compaction's error.
    #[must_use]
    pub fn cold_status(&self) -> ColdStatus {
        self.shared.cold.status()
    }

    /// A path to a complete local copy of segment `seq`: its file, or for a segment in the
    /// cold tier its copy in the cold cache (fetched and checked against the manifest first
    /// when the cache has none). A cold copy lasts until the cache evicts it: copy it at
    /// once (what `tally backup --cold copy` does).
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a segment the log does not have; [`Error::Cold`] when
    /// the fetch fails.
    pub fn segment_file(&self, seq: SegmentSeq) -> Result<PathBuf> {
        let seg = self
            .shared
            .segments_snapshot()
            .into_iter()
            .find(|s| s.seq == seq)
            .ok_or_else(|| invalid_options(format!("the log has no segment {seq}")))?;
        Ok(seg.open_file()?.1)
    }

    /// The segments, oldest first.
    #[must_use]
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.shared.segment_infos()
    }

    /// Seals the active segment now, as if it were full, starts the next one, and waits
    /// until the sealed one has its footer and index. A retention run rewrites sealed
    /// segments only (it counts what is due in the active segment as pending), so a run
    /// that must remove events of the last minutes seals first; so may an operator before a
    /// backup. Returns `false`, changing nothing, when the active segment holds no record.
    ///
    /// # Errors
    /// [`Error::ReadOnly`]; [`Error::Closed`]; [`Error::Poisoned`] if sealing fails; I/O
    /// errors of the new segment.
    pub fn seal_active_segment(&self) -> Result<bool> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        let rolled = append::seal_active_segment(&self.shared)?;
        if rolled {
            self.wait_sealed()?;
        }
        Ok(rolled)
    }

    /// Waits until every segment that has been rolled is sealed (footer and index written).
    ///
    /// # Errors
    /// [`Error::Poisoned`] if sealing failed.
    pub fn wait_sealed(&self) -> Result<()> {
        self.shared.wait_sealed()
    }

    /// Makes every acknowledged record durable now, whatever the durability setting.
    ///
    /// # Errors
    /// [`Error::Poisoned`] if the sync fails (the log then refuses writes).
    pub fn sync(&self) -> Result<()> {
        self.shared.sync_all()
    }

    /// Reads the whole log from disk with plain reads and checks every header and body
    /// checksum, the hash chain across segments, each sealed segment's footer and Merkle
    /// root, and that each index agrees with the records. Runs beside appends.
    ///
    /// # Errors
    /// The first problem found, as [`Error::Corrupt`] or [`Error::Index`] naming the file,
    /// byte offset and position.
    pub fn verify(&self) -> Result<VerifyReport> {
        self.verify_with(&VerifyOptions::default(), &mut |_| {})
    }

    /// [`Log::verify`], plus every checkpoint: its signature (by one of
    /// `options.trusted_keys` when any are given), that it names this log, and that its
    /// root and chain head are those of the records it covers. `progress` is called with
    /// the bytes of records checked so far.
    ///
    /// # Errors
    /// As [`Log::verify`]; a bad checkpoint is [`Error::Corrupt`] in the checkpoints file,
    /// at the checkpoint's entry, with the position its tree ends at.
    pub fn verify_with(
        &self,
        options: &VerifyOptions,
        progress: &mut dyn FnMut(u64),
    ) -> Result<VerifyReport> {
        let report = verify::verify(&self.shared, options, progress)?;
        // The roots of the kept checkpoints were recomputed from the records; each is also
        // shown to be a prefix of the newest checkpoint by a consistency proof from the
        // log's own tree, as a witness or an auditor holding only the two would check it.
        let newest = report
            .newest_checkpoint
            .and_then(|(id, _)| self.checkpoints().get((id - 1) as usize).copied());
        for (_, kept) in &options.kept {
            let Some(newest) = newest.filter(|n| n.statement.tree_size >= kept.statement.tree_size)
            else {
                continue;
            };
            let (old, new) = (kept.statement.tree_size, newest.statement.tree_size);
            self.prove_consistency(old, new)?
                .verify(&kept.statement.root, &newest.statement.root)
                .map_err(|e| Error::Corrupt {
                    file: self.shared.dir.join(CHECKPOINTS_FILE),
                    offset: 0,
                    position: Some(old),
                    detail: format!(
                        "no consistency proof from kept checkpoint {} (size {old}) to checkpoint {} (size {new}): {e}",
                        kept.statement.id, newest.statement.id
                    ),
                    source: None,
                })?;
        }
        Ok(report)
    }

    /// Signs and durably stores a checkpoint of every acknowledged record now (syncing
    /// them first), and returns it.
    ///
    /// # Errors
    /// [`Error::ReadOnly`] for a read-only log; I/O errors writing the node or checkpoint
    /// files; [`Error::Poisoned`] if the sync fails.
    pub fn checkpoint(&self) -> Result<SignedCheckpoint> {
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        checkpoints::checkpoint(&self.shared, true)
    }

    /// Every signed checkpoint of the log, oldest first.
    #[must_use]
    pub fn checkpoints(&self) -> Vec<SignedCheckpoint> {
        self.shared.evidence.signed.read().clone()
    }

    /// The newest signed checkpoint, without copying the list.
    #[must_use]
    pub fn latest_checkpoint(&self) -> Option<SignedCheckpoint> {
        self.shared.evidence.signed.read().last().copied()
    }

    /// How many signed checkpoints the log has.
    #[must_use]
    pub fn checkpoint_count(&self) -> usize {
        self.shared.evidence.signed.read().len()
    }

    /// A damaged entry of the checkpoints file found by a read-only open: its byte offset
    /// and cause. (A writable open refuses such a file.)
    #[must_use]
    pub fn checkpoints_damage(&self) -> Option<(u64, DecodeError)> {
        self.shared.evidence.checkpoints.lock().damage.clone()
    }

    /// Checkpoint `id` (the latest when `None`) as a signed note: its body, the log's
    /// signature, and the witnesses' cosignatures from `tally.cosignatures` that verify.
    /// This is what an auditor keeps, and what a witness cosigns.
    ///
    /// # Errors
    /// I/O errors reading the cosignatures file.
    pub fn checkpoint_note(&self, id: Option<u64>) -> Result<Option<crate::format::note::Note>> {
        let cp = {
            let cps = self.shared.evidence.signed.read();
            match id {
                None => cps.last().copied(),
                Some(id) => usize::try_from(id)
                    .ok()
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| cps.get(i).copied()),
            }
        };
        let Some(cp) = cp else { return Ok(None) };
        let cosigs = cosignatures::of(self.shared.fs(), &self.shared.dir, &cp)?;
        Ok(Some(crate::format::note::checkpoint_note(&cp, &cosigs)))
    }

    /// Adds a witness's cosignature of checkpoint `checkpoint_id` (see
    /// [`add_cosignature`]). Returns `false` when that witness key had cosigned it already.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when the log has no such checkpoint, the cosignature does
    /// not verify over it, its key is not one of [`Options::witness_keys`], or the
    /// checkpoint has the most cosignatures it keeps; I/O errors.
    pub fn add_cosignature(
        &self,
        checkpoint_id: u64,
        cosignature: &crate::format::note::Cosignature,
    ) -> Result<bool> {
        if let Some(keys) = &self.shared.opts.witness_keys
            && !keys.contains(&cosignature.public_key)
        {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "{} is not one of the witnesses this log takes cosignatures from",
                    cosignature.name
                ),
            });
        }
        let cp = usize::try_from(checkpoint_id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .and_then(|i| self.shared.evidence.signed.read().get(i).copied())
            .ok_or_else(|| Error::InvalidOptions {
                reason: format!("the log has no checkpoint {checkpoint_id}"),
            })?;
        add_cosignature_in(self.shared.fs(), &self.shared.dir, &cp, cosignature)
    }

    /// The public half of the key that signs this log's new checkpoints (`None` for a
    /// read-only log).
    #[must_use]
    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.shared.evidence.public_key.get().copied().flatten()
    }

    /// The Merkle root over the record hashes of positions `0..tree_size`.
    ///
    /// # Errors
    /// [`Error::Proof`] when `tree_size` is beyond the visible records; read errors.
    pub fn merkle_root(&self, tree_size: u64) -> Result<Hash32> {
        self.with_tree(tree_size, |src| proof::root(src, tree_size).map(Some))
    }

    /// An inclusion proof of the record at `position` in the tree of size `tree_size`.
    ///
    /// # Errors
    /// [`Error::Proof`] when the position or size is out of range; read errors.
    pub fn prove_inclusion(&self, position: Position, tree_size: u64) -> Result<InclusionProof> {
        // Each proof is checked against the root before it is handed out: a damaged node
        // that is not on the path to the root (which open checks against the latest
        // checkpoint) is noticed here, and the node file is recomputed from the records.
        self.with_tree(tree_size, |src| {
            let root = proof::root(src, tree_size)?;
            let p = proof::prove_inclusion(src, position.0, tree_size)?.map_err(Error::from)?;
            let leaf = src.leaf(position.0)?;
            Ok(p.verify(&leaf, &root).is_ok().then_some(p))
        })
    }

    /// The hashes of the gap nodes of positions `from..to` in the tree of size `tree_size`
    /// (`format::multiproof`): what a range multiproof gives for a run of records it does
    /// not hold. Whoever relies on them folds them into the signed root.
    ///
    /// # Errors
    /// [`Error::Proof`] when `tree_size` is beyond the visible records; read errors.
    pub fn prove_gap(&self, from: u64, to: u64, tree_size: u64) -> Result<Vec<Hash32>> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.with_tree(tree_size, |src| {
            crate::format::multiproof::gap_hashes(src, from, to, tree_size).map(Some)
        })
    }

    /// A consistency proof that the tree of `old_size` records is a prefix of the tree of
    /// `new_size` records.
    ///
    /// # Errors
    /// [`Error::Proof`] when the sizes are out of order or range; read errors.
    pub fn prove_consistency(&self, old_size: u64, new_size: u64) -> Result<ConsistencyProof> {
        if old_size > new_size {
            return Err(Error::Proof(ProofError::SizesOutOfOrder {
                old: old_size,
                new: new_size,
            }));
        }
        self.with_tree(new_size, |src| {
            let old = proof::root(src, old_size)?;
            let new = proof::root(src, new_size)?;
            let p = proof::prove_consistency(src, old_size, new_size)?.map_err(Error::from)?;
            Ok(p.verify(&old, &new).is_ok().then_some(p))
        })
    }

    /// Format version 2: the head of `stream` in the tree of `tree_size` records (its last
    /// version there and that event's position), with a proof that it is the stream's leaf
    /// in the stream heads map that a version 2 checkpoint of that size signs, and the map's
    /// stream count and root. `None` when the stream has no event among those records.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a version 1 log; [`Error::Proof`] when `tree_size` is
    /// beyond the visible records; read errors.
    pub fn prove_stream_head(&self, stream: &str, tree_size: u64) -> Result<Option<StreamHead>> {
        use crate::format::heads::stream_key;
        use crate::format::record::NO_STREAM_PREV;
        let visible = self.shared.visible_position();
        if tree_size > visible.0 {
            return Err(Error::Proof(ProofError::OutOfRange {
                index: tree_size,
                size: visible.0,
            }));
        }
        let mut tree = self.shared.evidence.tree.lock();
        if tree.heads.is_none() {
            return Err(invalid_options(
                "a stream head proof needs a log of format version 2",
            ));
        }
        tree.catch_up(&self.shared, Position(tree_size))?;
        let now = tree.size();
        let heads = tree.heads_mut().expect("checked above");
        let key = stream_key(stream.as_bytes());
        let mut rewound;
        let map = if now == tree_size {
            heads
        } else {
            // Rewind to `tree_size`: a stream's head there is the one its first record after
            // it names as its previous event.
            rewound = heads.clone();
            let mut seen = std::collections::HashSet::new();
            drop(tree);
            read::scan_range(
                &self.shared,
                Position(tree_size),
                Position(now),
                Verify::Checksums,
                &mut |r| {
                    let Some(name) = r.stream_bytes() else {
                        return;
                    };
                    let k = stream_key(name);
                    if seen.insert(k) {
                        if r.stream_version == 0 || r.stream_prev == NO_STREAM_PREV {
                            rewound.remove(&k);
                        } else {
                            rewound.set(k, r.stream_version - 1, r.stream_prev);
                        }
                    }
                },
            )?;
            &mut rewound
        };
        let streams = (map.len(), map.root());
        let Some((version, position)) = map.get(&key) else {
            return Ok(None);
        };
        let proof = map.prove(&key).expect("the stream is in the map");
        debug_assert!(proof.verify(&streams.1, &key, version, position));
        Ok(Some(StreamHead {
            version,
            position: Position(position),
            proof,
            stream_count: streams.0,
            streams_root: streams.1,
        }))
    }

    /// Runs `f` over the tree of `tree_size` records; when it returns `None` (a proof that
    /// does not verify: a damaged node), recomputes the node file and runs it again.
    fn with_tree<T>(
        &self,
        tree_size: u64,
        f: impl Fn(&mut tree::TreeSource<'_>) -> Result<Option<T>>,
    ) -> Result<T> {
        let visible = self.shared.visible_position();
        if tree_size > visible.0 {
            return Err(Error::Proof(ProofError::OutOfRange {
                index: tree_size,
                size: visible.0,
            }));
        }
        let mut tree = self.shared.evidence.tree.lock();
        tree.catch_up(&self.shared, Position(tree_size))?;
        if let Some(out) = f(&mut tree.source(&self.shared))? {
            return Ok(out);
        }
        tree.rebuild(&self.shared)?;
        f(&mut tree.source(&self.shared))?.ok_or_else(|| Error::Corrupt {
            file: self.shared.dir.clone(),
            offset: 0,
            position: None,
            detail: "a Merkle proof computed from the records does not verify".into(),
            source: None,
        })
    }

    /// The stored bytes of the record at `position`, with the record hash before it: what
    /// an outside verifier needs to recompute the record's hash (docs/FORMAT.md, "Hash
    /// chain") and check it against a Merkle proof.
    ///
    /// # Errors
    /// [`Error::Proof`] when `position` is not visible; read errors.
    pub fn read_raw(&self, position: Position) -> Result<RawRecord> {
        let visible = self.shared.visible_position();
        if position >= visible {
            return Err(Error::Proof(ProofError::OutOfRange {
                index: position.0,
                size: visible.0,
            }));
        }
        let mut prev = self.shared.seed;
        let mut out = None;
        read::scan_range(
            &self.shared,
            Position(position.0.saturating_sub(1)),
            position.next(),
            Verify::Checksums,
            &mut |r| {
                if r.position == position {
                    out = Some(RawRecord {
                        position,
                        layout: self.shared.meta.layout,
                        header: r.header.to_vec(),
                        body: r.record_body.to_vec(),
                        prev_hash: prev,
                    });
                } else {
                    prev = *r.record_hash;
                }
            },
        )?;
        out.ok_or(Error::Proof(ProofError::OutOfRange {
            index: position.0,
            size: visible.0,
        }))
    }

    /// Flushes, seals nothing new, writes the active segment's index and the stream table
    /// snapshot (so the next open reads no records), and releases the directory.
    ///
    /// # Errors
    /// A failure to sync or to write the snapshot; the log is closed anyway, and the next
    /// open recovers by scanning.
    pub fn close(self) -> Result<()> {
        self.shared.close()
    }

    /// Makes the next sync fail, as a full or failing disk would (for tests of poisoning).
    #[cfg(any(test, feature = "internals"))]
    pub fn inject_sync_failure(&self) {
        self.shared.inject_sync_failure();
    }

    /// Stops the log as a crash would: no final sync, no index or snapshot written, lock
    /// released. What was acknowledged must be found by the next open.
    #[cfg(any(test, feature = "internals"))]
    pub fn crash(self) {
        self.shared.crash();
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        // Best effort: an explicit `close` reports errors; a dropped log is recovered by
        // the next open in the worst case.
        if self.closes_on_drop {
            let _ignored = self.shared.close();
        }
    }
}

/// A stream's head in a tree, proven against that tree's stream heads map
/// ([`Log::prove_stream_head`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHead {
    /// The stream's last version among the tree's records.
    pub version: u64,
    /// The position of that event.
    pub position: Position,
    /// The proof of the stream's leaf.
    pub proof: crate::format::heads::HeadProof,
    /// Streams in the map.
    pub stream_count: u64,
    /// The map's root (a version 2 checkpoint of that tree size signs it).
    pub streams_root: Hash32,
}

/// A record as stored, with the record hash it chains from (see [`Log::read_raw`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRecord {
    /// Its position.
    pub position: Position,
    /// The header's layout (the log's format version).
    pub layout: crate::format::record::Layout,
    /// The header bytes as stored (80 in format version 1, 88 in version 2).
    pub header: Vec<u8>,
    /// The body as stored, without padding: the encoded envelope, after the producer block
    /// in the first record of a signed batch (docs/FORMAT.md, "Producer-signed batches").
    pub body: Vec<u8>,
    /// The record hash of the previous position (the chain seed for position 0).
    pub prev_hash: Hash32,
}

/// What [`Log::verify`] checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Segments checked.
    pub segments: u64,
    /// Records checked.
    pub records: u64,
    /// Bytes of record data read.
    pub bytes: u64,
    /// The chain hash of the last record.
    pub last_chain_hash: Hash32,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The first position checked (non-zero with [`VerifyOptions::from_segment`]).
    pub first_position: Position,
    /// Attribute index sidecars compared with their segments' records
    /// ([`VerifyOptions::attribute_indexes`]).
    pub attribute_indexes: u64,
    /// The newest checkpoint checked, as `(checkpoint id, tree size)`.
    pub newest_checkpoint: Option<(u64, u64)>,
    /// Links between a stream's segments (`prev_segment` in the index sidecars) compared
    /// with the records.
    pub stream_links: u64,
    /// Whether the stream snapshot (`streams.snap`) was compared with the stream table the
    /// records give. It is not when there is none, or when it was written after this view
    /// of a live log was taken (a later run checks it).
    pub snapshot_checked: bool,
    /// Stored nodes of the Merkle node file compared with the roots the records give.
    pub tree_nodes: u64,
    /// Sealed segments whose index sidecar is missing: they were checked from their records,
    /// and the next writable open rebuilds the sidecar.
    pub sidecars_missing: Vec<SegmentSeq>,
    /// Kept checkpoints ([`VerifyOptions::kept`]) the log was found to extend, as
    /// `(checkpoint id, tree size)`.
    pub kept: Vec<(u64, u64)>,
    /// Cosignatures by trusted witnesses that verified (one per witness per checkpoint).
    pub cosignatures: u64,
    /// The newest checkpoint cosigned by at least [`VerifyOptions::min_witnesses`] (at
    /// least one) of the trusted witnesses, as `(checkpoint id, tree size)`.
    pub newest_witnessed: Option<(u64, u64)>,
    /// The log's format version. A version 1 log's checkpoints commit to no stream heads,
    /// so its extracts prove inclusion only.
    pub format_version: u16,
    /// With [`VerifyOptions::producers`]: batches whose producer signature was checked.
    pub signed_batches: u64,
    /// With [`VerifyOptions::producers`]: batches without a producer signature (allowed by
    /// the trust file's policy).
    pub unsigned_batches: u64,
    /// Events checked that refer to a blob.
    pub blob_refs: u64,
    /// Distinct blobs read from the store and found to match their references (0 with
    /// [`VerifyOptions::skip_blobs`]).
    pub blobs_checked: u64,
    /// Removed events (format version 4): runs of positions whose event retention removed,
    /// each checked against the `$RetentionApplied` event that removed it.
    pub removed: Vec<RemovedRun>,
    /// Producer-signed batches with a removed event, whose signature can no longer be
    /// checked (the removal is checked instead).
    pub pruned_batches: u64,
    /// `$SubjectErased` events checked: each names this log and, when signed, is signed by
    /// a trusted key of the log.
    pub erasures: u64,
    /// Of them, those without a signature (written by a log without a signing key).
    pub erasures_unsigned: u64,
}

/// A run of positions whose events retention removed ([`VerifyReport::removed`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RemovedRun {
    /// First position removed.
    pub from: u64,
    /// One past the last.
    pub to: u64,
    /// The position of the `$RetentionApplied` event that removed them.
    pub removed_by: u64,
    /// The policy that removed them.
    pub policy: String,
}

/// What [`Log::verify_with`] checks beyond the records.
#[derive(Clone, Debug, Default)]
pub struct VerifyOptions {
    /// Public keys a checkpoint must be signed by; empty: any key, as long as the signature
    /// verifies under the key stored with it.
    pub trusted_keys: Vec<[u8; 32]>,
    /// Check records from this segment on only, trusting the earlier ones (checked before)
    /// and the Merkle node file for them.
    pub from_segment: Option<SegmentSeq>,
    /// Segments checked at once, each by its own thread; 0: one per available core.
    pub threads: usize,
    /// Also rebuild every sealed segment's attribute index from its records and compare it
    /// with the `.adx` sidecar on disk, byte for byte. The sidecars are derived data (a
    /// lookup checks every event it returns), so a damaged one can hide events from a
    /// lookup but never change one; this check finds that. It reads the checked segments a
    /// second time.
    pub attribute_indexes: bool,
    /// Checkpoints an auditor kept outside the directory (`tally checkpoint --export`),
    /// with the file each came from. The log must extend each: its id must still name it in
    /// the checkpoints file, the log must hold at least its records, and their root and
    /// chain head must be its own. Their signatures are checked like the log's.
    pub kept: Vec<(PathBuf, SignedCheckpoint)>,
    /// Witnesses whose cosignatures (in `tally.cosignatures`) count. A cosignature by one
    /// of them of a checkpoint that is missing or changed is a failure.
    pub witnesses: Vec<crate::format::note::WitnessKey>,
    /// With a positive value, verify fails unless at least one checkpoint is cosigned by
    /// this many of [`VerifyOptions::witnesses`]; the newest such is reported.
    pub min_witnesses: usize,
    /// Check every batch's producer signature against these trusted producers: a signature
    /// that does not verify, is by a key not trusted (or not for the stream), or is the
    /// same as an earlier batch's (a replay) fails, and so does an unsigned batch for a
    /// stream whose prefix requires signatures. Hashes every record's envelope once more.
    pub producers: Option<producers::ProducerTrust>,
    /// Do not read the blobs events refer to (every blob is read and hashed otherwise).
    pub skip_blobs: bool,
}

/// Adds a witness's cosignature of checkpoint `cp` to the data directory `dir`
/// (`tally.cosignatures`), for a witness that observed the log and hands its cosignature
/// back (tallyd does this for a log it serves; `tally witness observe --data` for a
/// directory). The checkpoint must be the one `tally.checkpoints` holds under its id, and
/// the cosignature must verify over its note body. Safe beside a live writer: the file has
/// its own lock, and records are not touched. Returns `false` when the same witness key
/// had already cosigned that checkpoint.
///
/// # Errors
/// [`Error::InvalidOptions`] when the checkpoint is not the log's or the cosignature does
/// not verify; I/O errors.
pub fn add_cosignature(
    dir: &Path,
    cp: &SignedCheckpoint,
    cosignature: &crate::format::note::Cosignature,
) -> Result<bool> {
    add_cosignature_in(&crate::Storage::os(), dir, cp, cosignature)
}

fn add_cosignature_in(
    fs: &crate::Storage,
    dir: &Path,
    cp: &SignedCheckpoint,
    cosignature: &crate::format::note::Cosignature,
) -> Result<bool> {
    let path = dir.join(CHECKPOINTS_FILE);
    let bytes = fs
        .read(&path)
        .map_err(Error::io("reading checkpoints file", &path))?;
    let len = crate::format::checkpoint::entry_len(cp.statement.version());
    let on_disk = usize::try_from(cp.statement.id)
        .ok()
        .and_then(|id| id.checked_sub(1))
        .and_then(|i| bytes.get(i * len..(i + 1) * len))
        .and_then(|e| SignedCheckpoint::decode_entry(e).ok());
    if on_disk != Some(*cp) {
        return Err(Error::InvalidOptions {
            reason: format!(
                "checkpoint {} (tree size {}) is not the one {} holds under that id",
                cp.statement.id,
                cp.statement.tree_size,
                path.display()
            ),
        });
    }
    cosignatures::add(fs, dir, cp, cosignature)
}

/// A producer's signature of a batch for the log `log_id`: over the BLAKE3 hash of each
/// event's envelope as the log will store it (docs/FORMAT.md, "Producer-signed batches").
/// Every event must give its id and event time.
///
/// # Errors
/// [`Error::InvalidAppend`] for an event without an id or event time;
/// [`Error::InvalidEvent`] for one that breaks an envelope limit.
pub fn producer_signature(
    log_id: &[u8; 16],
    requests: &[AppendRequest<'_>],
    key: &ed25519_dalek::SigningKey,
) -> Result<crate::format::producer::ProducerSignature> {
    Ok(crate::format::producer::ProducerSignature::sign(
        key,
        log_id,
        &append::envelope_hashes(requests)?,
    ))
}

/// Creates a new Ed25519 signing key file at `path` (mode 0600; an existing file is never
/// overwritten), for a key kept outside the data directory ([`Options::signing_key`]) or a
/// key rotation. Returns its public key.
///
/// # Errors
/// [`Error::Io`] when the file exists or cannot be written.
pub fn create_signing_key(path: &Path) -> Result<[u8; 32]> {
    Ok(checkpoints::create_key_file(&crate::Storage::os(), path)?
        .verifying_key()
        .to_bytes())
}

/// A fresh v7 UUID (RFC 9562) as an event id: 48 bits of Unix milliseconds, a 12-bit
/// counter that keeps the ids of one thread increasing within a millisecond (method 1 of
/// section 6.2), and 62 random bits. The random bits come from a per-thread generator
/// seeded once from the OS, so making an id costs no system call.
#[must_use]
// RFC 9562 lays the timestamp and random bits out big-endian.
#[allow(clippy::big_endian_bytes)]
pub fn new_event_id() -> EventId {
    thread_local! {
        static STATE: std::cell::Cell<(u64, u16, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
    }
    let now_ms = now().0 / 1_000_000;
    STATE.with(|cell| {
        let (mut last_ms, mut counter, mut rng) = cell.get();
        if rng == 0 {
            rng = random_u64() | 1;
        }
        if now_ms > last_ms {
            last_ms = now_ms;
            // Start low in the counter's range so that it rarely overflows.
            counter = (splitmix64(&mut rng) & 0x1ff) as u16;
        } else if counter >= 0xfff {
            last_ms += 1;
            counter = 0;
        } else {
            counter += 1;
        }
        let rand_b = splitmix64(&mut rng);
        cell.set((last_ms, counter, rng));
        let mut b = [0u8; 16];
        b[..6].copy_from_slice(&last_ms.to_be_bytes()[2..]);
        b[6] = 0x70 | (counter >> 8) as u8;
        b[7] = counter as u8;
        b[8..].copy_from_slice(&rand_b.to_be_bytes());
        b[8] = 0x80 | (b[8] & 0x3f);
        EventId(b)
    })
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 random bits: std's `RandomState` keys come from the operating system's generator.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now().0);
    h.finish()
}

/// Nanoseconds since the Unix epoch, now.
#[must_use]
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn invalid_options(reason: impl Into<String>) -> Error {
    Error::InvalidOptions {
        reason: reason.into(),
    }
}

impl Options {
    fn check(&self) -> Result<()> {
        use crate::format::{PAGE_BYTES, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN};
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes)
            || !self.segment_bytes.is_multiple_of(PAGE_BYTES)
        {
            return Err(invalid_options(format!(
                "segment_bytes {} must be a multiple of {PAGE_BYTES} in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                self.segment_bytes
            )));
        }
        if let Durability::Batched { max_delay } = self.durability
            && max_delay.is_zero()
        {
            return Err(invalid_options("Batched max_delay must be positive"));
        }
        let inline_max = crate::format::envelope::PAYLOAD_BYTES_MAX;
        if self.cold.blob_threshold > inline_max {
            return Err(invalid_options(format!(
                "cold.blob_threshold {} is above the largest inline payload ({inline_max}): payloads between them could be stored neither way",
                self.cold.blob_threshold
            )));
        }
        Ok(())
    }
}
