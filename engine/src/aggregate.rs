//! Aggregates on the log: an aggregate's state is the fold of its stream's events; loading
//! starts from the latest usable snapshot at or below the wanted version and folds the
//! events after it; saving appends with the version that was loaded as the expectation, so
//! that a concurrent change surfaces as [`Error::WrongExpectedVersion`] and the caller can
//! load again and retry.
//!
//! This module uses only the log's public API.
//!
//! Snapshots are stored by the log itself, in the stream `$snapshot-STREAM`, as a state
//! manifest ([`crate::state_store`], docs/FORMAT.md 18.4: the aggregate's version, its
//! snapshot version, and the encoded state inline or in parts, so a snapshot has no size
//! limit, and every part is checked on load). Snapshots of the first layout (event type
//! `$Snapshot`, docs/FORMAT.md 18.1) still load. A snapshot is only a shortcut: one whose snapshot version is not the
//! aggregate's current [`Aggregate::SNAPSHOT_VERSION`], or that does not decode, is passed
//! over, and the state is folded from older snapshots or from the first event, so a
//! snapshot never changes what a load computes.

use crate::error::Error;
use crate::format::Timestamp;
use crate::format::envelope::STREAM_BYTES_MAX;
use crate::log::{
    AppendResult, Direction, EventData, EventView, ExpectedVersion, Log, RecordedEvent,
};

pub use crate::format::pruned::SNAPSHOT_STREAM_PREFIX;
/// The event type of a snapshot.
pub const SNAPSHOT_EVENT_TYPE: &str = "$Snapshot";
/// Bytes of a snapshot payload before the encoded state.
pub const SNAPSHOT_HEADER_BYTES: usize = 12;
/// Events read per page while folding.
const FOLD_PAGE: usize = 1024;

/// A type whose state is the fold of a stream's events.
pub trait Aggregate: Sized {
    /// Version of [`Aggregate::encode_snapshot`]'s encoding. Change it whenever the
    /// encoding or the meaning of the state changes: older snapshots are then ignored.
    const SNAPSHOT_VERSION: u32;

    /// The state before the first event.
    fn initial() -> Self;

    /// Folds one event into the state.
    ///
    /// # Errors
    /// A reason, when the event cannot be applied (the load stops there).
    fn apply(&mut self, event: &dyn EventView) -> std::result::Result<(), String>;

    /// The state, encoded for a snapshot.
    fn encode_snapshot(&self) -> Vec<u8>;

    /// The state from a snapshot of this [`Aggregate::SNAPSHOT_VERSION`]; `None` if the
    /// bytes do not decode (the snapshot is then ignored).
    fn decode_snapshot(bytes: &[u8]) -> Option<Self>;
}

/// Why a load or save failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// The log failed (including [`Error::WrongExpectedVersion`] on a save).
    #[error(transparent)]
    Log(#[from] Error),
    /// A snapshot could not be written.
    #[error("snapshot: {0}")]
    Snapshot(Box<crate::state_store::StateError>),
    /// The aggregate refused an event.
    #[error("stream {stream}, version {version}: the aggregate refused the event: {reason}")]
    Apply {
        /// The stream.
        stream: String,
        /// The event's version.
        version: u64,
        /// The aggregate's reason.
        reason: String,
    },
    /// A time-travel state cannot be saved or snapshotted: it may lack events below its
    /// version.
    #[error("stream {stream}: a state loaded as of a time is for reading, not for saving")]
    TimeTravel {
        /// The stream.
        stream: String,
    },
    /// An event does not match its registered schema; nothing was written.
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
    /// The stream's name leaves no room for the snapshot stream's prefix.
    #[error("stream {stream:?} is too long to have snapshots (at most {max} bytes)")]
    StreamTooLong {
        /// The stream.
        stream: String,
        /// The longest stream that can have snapshots.
        max: usize,
    },
}

/// An aggregate as loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded<A> {
    /// The state.
    pub state: A,
    /// The version of the last event folded into it (`None`: no event, the stream is new).
    pub version: Option<u64>,
    /// The version of the snapshot the load started from, if any.
    pub from_snapshot: Option<u64>,
    /// Events folded on top of the snapshot (or from the start).
    pub events_applied: u64,
    /// The view it was loaded in, for a time-travel load: such a state is for reading,
    /// and [`Repository::save`] and [`Repository::snapshot`] refuse it.
    pub as_of: Option<AsOf>,
}

impl<A> Loaded<A> {
    /// The expectation for appending to the stream as loaded.
    #[must_use]
    pub fn expected_version(&self) -> ExpectedVersion {
        self.version
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
    }
}

/// A point of view in time (bitemporal).
///
/// - `record_time`: "what did we know at T": only events the log had recorded by then.
/// - `event_time`: "what was true at T": only events whose business time is at or before
///   T, folded in business-time order (ties in log order), so that an event that arrived
///   late takes its place among the events it happened between.
///
/// Both together: what we knew at one time about another. Neither: the current state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AsOf {
    /// Only events recorded at or before this time.
    pub record_time: Option<Timestamp>,
    /// Only events that happened at or before this time, in event-time order.
    pub event_time: Option<Timestamp>,
}

impl AsOf {
    /// What the log knew at `t`.
    #[must_use]
    pub fn known_at(t: Timestamp) -> AsOf {
        AsOf {
            record_time: Some(t),
            event_time: None,
        }
    }

    /// What was true at `t`, as known now.
    #[must_use]
    pub fn true_at(t: Timestamp) -> AsOf {
        AsOf {
            record_time: None,
            event_time: Some(t),
        }
    }

    /// Whether `e` is part of this view.
    #[must_use]
    pub fn includes(&self, e: &RecordedEvent) -> bool {
        self.record_time.is_none_or(|t| e.record_time <= t)
            && self.event_time.is_none_or(|t| e.event_time <= t)
    }

    /// Puts events of this view in the order they are folded: log order, or event-time
    /// order (stable, so ties keep log order) when the view is by event time.
    pub fn order(&self, events: &mut [RecordedEvent]) {
        if self.event_time.is_some() {
            events.sort_by_key(|e| (e.event_time, e.position));
        }
    }
}

/// When a [`Repository`] writes snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// Only when asked ([`Repository::snapshot`]).
    OnDemand,
    /// After a save, when at least this many events were folded since the snapshot the
    /// state was loaded from (or since the first event).
    EveryEvents(u64),
}

/// The snapshot stream of `stream`.
///
/// # Errors
/// [`AggregateError::StreamTooLong`].
pub fn snapshot_stream(stream: &str) -> std::result::Result<String, AggregateError> {
    let max = STREAM_BYTES_MAX - SNAPSHOT_STREAM_PREFIX.len();
    if stream.len() > max {
        return Err(AggregateError::StreamTooLong {
            stream: stream.to_owned(),
            max,
        });
    }
    Ok(format!("{SNAPSHOT_STREAM_PREFIX}{stream}"))
}

/// Encodes a snapshot event's payload.
#[must_use]
pub fn encode_snapshot_payload(version: u64, snapshot_version: u32, state: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(SNAPSHOT_HEADER_BYTES + state.len());
    p.extend_from_slice(&version.to_le_bytes());
    p.extend_from_slice(&snapshot_version.to_le_bytes());
    p.extend_from_slice(state);
    p
}

/// Decodes a snapshot event's payload: `(aggregate version, snapshot version, state)`.
#[must_use]
pub fn decode_snapshot_payload(p: &[u8]) -> Option<(u64, u32, &[u8])> {
    let version = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let snapshot_version = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
    Some((version, snapshot_version, &p[SNAPSHOT_HEADER_BYTES..]))
}

/// An event that corrects `original`: its causation id is the original's event id and it
/// keeps the original's correlation id, so that the history shows both and how they
/// relate. Tally never changes a stored event; corrections are new events.
#[must_use]
pub fn correction_of(original: &dyn EventView, event_type: &str, json: &str) -> EventData {
    EventData::json(event_type, json)
        .aggregate_type(original.aggregate_type())
        .causation_id(original.event_id().to_string())
        .correlation_id(original.correlation_id())
}

/// An event that reverses `original` as a whole (a booking made in error): like
/// [`correction_of`] it names the original in its causation id and keeps its correlation
/// id, and its JSON payload carries what is reversed, so that the reversal reads on its own:
/// `{"reverses": EVENT_ID, "type": ORIGINAL_TYPE, "version": ORIGINAL_STREAM_VERSION,
/// "payload": ORIGINAL_PAYLOAD}` (the original's payload inline when it is JSON, else as a
/// base64 string under `"payload_base64"`). The aggregate's handler of `event_type` undoes
/// the original's effect.
#[must_use]
pub fn reversal_of(original: &dyn EventView, event_type: &str) -> EventData {
    // The original's JSON payload is quoted verbatim (after checking that it is JSON), so
    // that no number is rounded and no key reordered on the way.
    let quoted = match std::str::from_utf8(original.payload()) {
        Ok(text)
            if original.content_type() == crate::ContentType::Json
                && serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() =>
        {
            format!("\"payload\":{text}")
        }
        _ => format!(
            "\"payload_base64\":\"{}\"",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                original.payload()
            )
        ),
    };
    let text = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let body = format!(
        "{{\"reverses\":{},\"type\":{},\"version\":{},{quoted}}}",
        text(&original.event_id().to_string()),
        text(original.event_type()),
        original.version()
    );
    correction_of(original, event_type, &body)
}

/// Loads and saves aggregates of type `A` in one log.
#[derive(Debug)]
pub struct Repository<'a, A> {
    log: &'a Log,
    policy: SnapshotPolicy,
    registry: Option<crate::schema::Registry>,
    _aggregate: std::marker::PhantomData<fn() -> A>,
}

impl<'a, A: Aggregate> Repository<'a, A> {
    /// A repository over `log`.
    #[must_use]
    pub fn new(log: &'a Log, policy: SnapshotPolicy) -> Repository<'a, A> {
        Repository {
            log,
            policy,
            registry: None,
            _aggregate: std::marker::PhantomData,
        }
    }

    /// Checks every event [`Repository::save`] appends against the schema registry (for
    /// the schemas that ask for validation), and shows loaded events to the aggregate as
    /// their newest schema version.
    #[must_use]
    pub fn with_registry(mut self, registry: crate::schema::Registry) -> Repository<'a, A> {
        self.registry = Some(registry);
        self
    }

    fn apply(&self, state: &mut A, e: &RecordedEvent) -> std::result::Result<(), String> {
        crate::schema::with_newest(self.registry.as_ref(), e, |shown| state.apply(shown))
    }

    /// The current state of `stream`.
    ///
    /// # Errors
    /// [`AggregateError`].
    pub fn load(&self, stream: &str) -> std::result::Result<Loaded<A>, AggregateError> {
        self.load_at(stream, u64::MAX)
    }

    /// The state of `stream` after its event of version `version` (or its last, if it has
    /// fewer), starting from the latest usable snapshot at or below it.
    ///
    /// # Errors
    /// [`AggregateError`].
    pub fn load_at(
        &self,
        stream: &str,
        version: u64,
    ) -> std::result::Result<Loaded<A>, AggregateError> {
        let start = self.usable_snapshot(stream, version)?;
        self.fold(stream, version, start)
    }

    /// The state of `stream` after version `version`, folded from the first event without
    /// any snapshot: the reference a snapshot must agree with.
    ///
    /// # Errors
    /// [`AggregateError`].
    pub fn load_without_snapshots(
        &self,
        stream: &str,
        version: u64,
    ) -> std::result::Result<Loaded<A>, AggregateError> {
        self.fold(stream, version, None)
    }

    /// The state of `stream` in the view `as_of` (see [`AsOf`]), folded from its first
    /// event (snapshots are keyed by version, not time, and are not used). The loaded
    /// version is that of the newest event folded; such a state is for reading, not for
    /// saving.
    ///
    /// # Errors
    /// [`AggregateError`].
    pub fn load_as_of(
        &self,
        stream: &str,
        as_of: AsOf,
    ) -> std::result::Result<Loaded<A>, AggregateError> {
        let mut events = Vec::new();
        let mut next = 0;
        loop {
            let page = self
                .log
                .read_stream(stream, next, FOLD_PAGE, Direction::Forward)?;
            let full = page.len() == FOLD_PAGE;
            if let Some(last) = page.last() {
                next = last.version + 1;
            }
            events.extend(page.into_iter().filter(|e| as_of.includes(e)));
            if !full {
                break;
            }
        }
        as_of.order(&mut events);
        let mut state = A::initial();
        let mut version = None;
        for e in &events {
            self.apply(&mut state, e)
                .map_err(|reason| AggregateError::Apply {
                    stream: stream.to_owned(),
                    version: e.version,
                    reason,
                })?;
            version = version.max(Some(e.version));
        }
        Ok(Loaded {
            state,
            version,
            from_snapshot: None,
            events_applied: events.len() as u64,
            as_of: Some(as_of),
        })
    }

    /// The latest snapshot at or below `version` that has this aggregate's snapshot
    /// version, whose parts all check out against its manifest, and that decodes. The
    /// snapshot stream is read from its newest event back, one event at a time (parts
    /// are never held beyond one).
    fn usable_snapshot(
        &self,
        stream: &str,
        version: u64,
    ) -> std::result::Result<Option<(u64, A)>, AggregateError> {
        use crate::state_store::{Found, Kind, PartReader, fetch_from};
        let snaps = snapshot_stream(stream)?;
        let mut from = u64::MAX;
        loop {
            let page = self.log.read_stream(&snaps, from, 1, Direction::Backward)?;
            let Some(e) = page.first() else {
                return Ok(None);
            };
            let mut older = e.version.checked_sub(1);
            if e.event_type() == SNAPSHOT_EVENT_TYPE {
                if let Some((v, sv, state)) = decode_snapshot_payload(e.payload())
                    && v <= version
                    && v < u64::MAX
                    && sv == A::SNAPSHOT_VERSION
                    && let Some(a) = A::decode_snapshot(state)
                {
                    return Ok(Some((v, a)));
                }
            } else if let Ok(Some(found)) =
                Found::from_event(e.version, e.event_type(), e.payload())
            {
                let m = &found.manifest;
                older = m.previous.or(older);
                if m.kind == Kind::Whole
                    && m.at <= version
                    && m.at < u64::MAX
                    && m.state_version == A::SNAPSHOT_VERSION
                {
                    let mut bytes = Vec::new();
                    let read = std::io::Read::read_to_end(
                        &mut PartReader::new(m, |v| fetch_from(self.log, &snaps, v)),
                        &mut bytes,
                    );
                    if read.is_ok()
                        && let Some(a) = A::decode_snapshot(&bytes)
                    {
                        return Ok(Some((m.at, a)));
                    }
                }
            }
            match older {
                Some(v) => from = v,
                None => return Ok(None),
            }
        }
    }

    fn fold(
        &self,
        stream: &str,
        upto: u64,
        start: Option<(u64, A)>,
    ) -> std::result::Result<Loaded<A>, AggregateError> {
        let (mut next, from_snapshot, mut state) = match start {
            Some((v, a)) => (v + 1, Some(v), a),
            None => (0, None, A::initial()),
        };
        let mut version = from_snapshot;
        let mut applied = 0;
        while next <= upto {
            let left = (upto - next).saturating_add(1);
            let want = FOLD_PAGE.min(usize::try_from(left).unwrap_or(FOLD_PAGE));
            let page = self
                .log
                .read_stream(stream, next, want, Direction::Forward)?;
            for e in &page {
                self.apply(&mut state, e)
                    .map_err(|reason| AggregateError::Apply {
                        stream: stream.to_owned(),
                        version: e.version,
                        reason,
                    })?;
                version = Some(e.version);
                applied += 1;
            }
            if page.len() < want {
                break;
            }
            next = page.last().map_or(upto, |e| e.version) + 1;
        }
        Ok(Loaded {
            state,
            version,
            from_snapshot,
            events_applied: applied,
            as_of: None,
        })
    }

    /// Appends `events` to `stream` expecting the version `loaded` was loaded at, folds
    /// them into `loaded`, and writes a snapshot if the policy says so. On
    /// [`Error::WrongExpectedVersion`] nothing was written and `loaded` is unchanged: load
    /// again, decide again, retry. An error after the append (reading the events back, or
    /// the aggregate refusing its own events) leaves them written and `loaded` at their
    /// version, its state in doubt: load again. A snapshot that cannot be written is
    /// skipped.
    ///
    /// # Errors
    /// [`AggregateError`].
    pub fn save(
        &self,
        stream: &str,
        loaded: &mut Loaded<A>,
        events: &[EventData],
    ) -> std::result::Result<AppendResult, AggregateError> {
        if loaded.as_of.is_some() {
            return Err(AggregateError::TimeTravel {
                stream: stream.to_owned(),
            });
        }
        if let Some(reg) = &self.registry {
            for e in events {
                reg.check(e)?;
            }
        }
        let r = self.log.append(stream, loaded.expected_version(), events)?;
        if r.first_version != loaded.version.map_or(0, |v| v + 1) {
            // The log recognised the events as a retry of an earlier append and returned
            // its result: they are already in the state's past (or not where this state
            // expects them). Take the stream as it is instead of folding them again.
            *loaded = self.load(stream)?;
            return Ok(r);
        }
        // From here the events are in the log: the loaded version moves past them whatever
        // happens, so that a blind retry of this save meets WrongExpectedVersion instead of
        // writing them twice.
        let folded = self.fold_written(stream, loaded, r.first_version, events.len());
        loaded.version = Some(r.last_version);
        folded?;
        if let SnapshotPolicy::EveryEvents(n) = self.policy
            && loaded.events_applied >= n.max(1)
        {
            // Best effort: a snapshot only saves work, and the save has succeeded.
            let _ = self.snapshot(stream, loaded);
        }
        Ok(r)
    }

    /// Folds the `count` events just written from `first_version` into `loaded`.
    fn fold_written(
        &self,
        stream: &str,
        loaded: &mut Loaded<A>,
        first_version: u64,
        count: usize,
    ) -> std::result::Result<(), AggregateError> {
        let written = self
            .log
            .read_stream(stream, first_version, count, Direction::Forward)?;
        for e in &written {
            self.apply(&mut loaded.state, e)
                .map_err(|reason| AggregateError::Apply {
                    stream: stream.to_owned(),
                    version: e.version,
                    reason,
                })?;
            loaded.events_applied += 1;
        }
        Ok(())
    }

    /// Writes a snapshot of `loaded` now (nothing for a stream with no events).
    ///
    /// # Errors
    /// [`AggregateError`].
    pub fn snapshot(
        &self,
        stream: &str,
        loaded: &mut Loaded<A>,
    ) -> std::result::Result<(), AggregateError> {
        if loaded.as_of.is_some() {
            return Err(AggregateError::TimeTravel {
                stream: stream.to_owned(),
            });
        }
        let Some(version) = loaded.version else {
            return Ok(());
        };
        let state = loaded.state.encode_snapshot();
        let head = crate::state_store::ManifestHead {
            at: version,
            state_version: A::SNAPSHOT_VERSION,
            kind: crate::state_store::Kind::Whole,
            depth: 0,
            base: None,
            previous: None,
        };
        crate::state_store::write_parts(
            self.log,
            &snapshot_stream(stream)?,
            head,
            crate::state_store::PartOptions::default(),
            |w| w.write_all(&state),
        )
        .map_err(|e| match e {
            crate::state_store::StateError::Log(e) => AggregateError::Log(e),
            other => AggregateError::Snapshot(Box::new(other)),
        })?;
        loaded.from_snapshot = Some(version);
        loaded.events_applied = 0;
        Ok(())
    }
}
