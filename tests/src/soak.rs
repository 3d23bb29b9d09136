//! The soak tests' history and its checker (docs/OPERATIONS.md, "Soak test"): what a long
//! run under kills and power cuts sent, what it was told, what its subscriptions delivered,
//! and an independent check of a log's contents against all of it.
//!
//! Shared by `server/tests/soak.rs` (tallyd under SIGKILL and restart) and
//! `tests/tests/soak_embedded.rs` (the engine on the simulated disk under power cuts). The
//! checker sees the log only as a client does, through [`EventView`] (positions, versions,
//! ids and envelopes), never through engine internals. It holds a log to:
//!
//! - every acknowledged append present at its acknowledged positions and stream versions,
//!   with the envelope that was sent (type, payload byte for byte, ids, actor, event time);
//! - no event id twice; nothing present that was never sent, or that was refused;
//! - positions dense from 0; each stream's versions dense from 0, at increasing positions;
//! - each batch all or nothing, and contiguous; a batch whose answer was lost (a kill or a
//!   power cut during the request: "unknown outcome") whole or absent, and settled by the
//!   first check that sees the log after it;
//! - each subscription delivered exactly the events of the log it follows, in log order,
//!   from where it started: no gap, no repeat, nothing the log does not hold.
//!
//! Event content is a function of the event id ([`expected_content`]), so the history keeps
//! no payloads: a run of millions of events is checked in a few hundred bytes per batch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::time::Duration;

use tally_engine::{AppendResult, EventData, EventId, EventView, Timestamp};

/// The tag in bytes 12..16 of every event id a soak writer makes.
const ID_TAG: [u8; 4] = *b"SOAK";
/// The event types soak events have (chosen by the id's hash).
const EVENT_TYPES: [&str; 4] = ["Opened", "Amended", "Settled", "Cancelled"];
/// Event times start here (2027-01-15), so that they are recognisably the writer's.
const EVENT_TIME_BASE_NS: u64 = 1_800_000_000_000_000_000;
/// The most parts a batch has and events a part has (a batch's events fit a `u64` mask).
pub const PARTS_MAX: usize = 3;
/// See [`PARTS_MAX`].
pub const PART_EVENTS_MAX: usize = 8;
const _: () = assert!(PARTS_MAX * PART_EVENTS_MAX <= 64);

/// The run's settings, from the environment. `None` when `TALLY_SOAK_MINUTES` is unset:
/// the soak tests then return at once.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// How long the load runs (`TALLY_SOAK_MINUTES`, fractions allowed).
    pub duration: Duration,
    /// Seeds every random choice (`TALLY_SOAK_SEED`; from the clock when unset).
    pub seed: u64,
    /// Mean seconds between kills (`TALLY_SOAK_KILL_SECS`), or `None` for the default.
    pub kill_secs: Option<u64>,
    /// Mean seconds between power cuts in the embedded test (`TALLY_SOAK_CUT_SECS`).
    pub cut_secs: Option<u64>,
}

impl SoakConfig {
    /// Reads the settings; prints that the test is skipped when it is.
    ///
    /// # Panics
    /// When a variable is set but does not parse.
    #[must_use]
    pub fn from_env(test: &str) -> Option<SoakConfig> {
        let Ok(minutes) = std::env::var("TALLY_SOAK_MINUTES") else {
            eprintln!("{test}: skipped (set TALLY_SOAK_MINUTES to run it; docs/OPERATIONS.md)");
            return None;
        };
        let minutes: f64 = minutes
            .parse()
            .unwrap_or_else(|_| panic!("TALLY_SOAK_MINUTES={minutes:?} is not a number"));
        assert!(minutes > 0.0, "TALLY_SOAK_MINUTES must be positive");
        let var = |name: &str| {
            std::env::var(name).ok().map(|v| {
                v.parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number"))
            })
        };
        let seed = crate::seed_from_env("TALLY_SOAK_SEED");
        Some(SoakConfig {
            duration: Duration::from_secs_f64(minutes * 60.0),
            seed,
            kill_secs: var("TALLY_SOAK_KILL_SECS").filter(|&s| s > 0),
            cut_secs: var("TALLY_SOAK_CUT_SECS").filter(|&s| s > 0),
        })
    }
}

/// A check found the log (or a subscription) disagreeing with the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discrepancy(pub String);

impl fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn discrepancy<T>(text: String) -> Result<T, Discrepancy> {
    Err(Discrepancy(text))
}

/// SplitMix64, for event content: every byte of it follows from the event id.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Names one batch: which writer sent it, and that writer's counter. A batch keeps its key
/// (and its event ids) when it is sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchKey {
    /// The writer (a task or thread of the run).
    pub writer: u16,
    /// The writer's batch counter.
    pub counter: u32,
}

impl fmt::Display for BatchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch w{}#{}", self.writer, self.counter)
    }
}

/// The id of event `index` of part `part` of batch `key`.
#[must_use]
pub fn event_id(key: BatchKey, part: usize, index: usize) -> EventId {
    assert!(part < PARTS_MAX && index < PART_EVENTS_MAX);
    let mut b = [0u8; 16];
    b[0..2].copy_from_slice(&key.writer.to_le_bytes());
    b[2..6].copy_from_slice(&key.counter.to_le_bytes());
    b[6] = part as u8;
    b[7] = index as u8;
    b[12..16].copy_from_slice(&ID_TAG);
    EventId(b)
}

/// Decodes an id made by [`event_id`]: `(batch, part, index)`. `None` for any other id (the
/// server's own events: consumer checkpoints, producer keys).
#[must_use]
pub fn decode_event_id(id: EventId) -> Option<(BatchKey, usize, usize)> {
    let b = id.0;
    if b[12..16] != ID_TAG || b[8..12] != [0; 4] {
        return None;
    }
    let key = BatchKey {
        writer: u16::from_le_bytes([b[0], b[1]]),
        counter: u32::from_le_bytes([b[2], b[3], b[4], b[5]]),
    };
    Some((key, usize::from(b[6]), usize::from(b[7])))
}

/// What an event of the soak load holds besides its stream: all of it follows from the id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    /// The event type.
    pub event_type: &'static str,
    /// The payload: the id's 16 bytes, then seeded bytes; usually under 300 bytes, one
    /// event in 64 a few KiB (records cross pages, segments roll).
    pub payload: Vec<u8>,
    /// The correlation id: the batch's, so that FIND by it returns the whole batch.
    pub correlation_id: String,
    /// The actor: the writer.
    pub actor: String,
    /// The event time (a signed batch must give one; every soak event does).
    pub event_time: Timestamp,
}

/// The content of the event with id `id` ([`event_id`]).
#[must_use]
pub fn expected_content(key: BatchKey, part: usize, index: usize) -> Content {
    let id = event_id(key, part, index);
    let h = mix(u64::from_le_bytes(
        id.0[0..8].try_into().unwrap_or_default(),
    ));
    let len = if h.is_multiple_of(64) {
        2048 + (h >> 8) % 6144
    } else {
        16 + (h >> 8) % 280
    } as usize;
    let mut payload = Vec::with_capacity(len);
    payload.extend_from_slice(&id.0);
    let mut z = h;
    while payload.len() < len {
        z = mix(z);
        let take = (len - payload.len()).min(8);
        payload.extend_from_slice(&z.to_le_bytes()[..take]);
    }
    Content {
        event_type: EVENT_TYPES[(h >> 40) as usize % EVENT_TYPES.len()],
        payload,
        correlation_id: correlation_id(key),
        actor: format!("writer-{}", key.writer),
        event_time: Timestamp(
            EVENT_TIME_BASE_NS + u64::from(key.counter) * 1000 + (part * 16 + index) as u64,
        ),
    }
}

/// A batch's correlation id (FIND by it must return exactly the batch's events).
#[must_use]
pub fn correlation_id(key: BatchKey) -> String {
    format!("soak-{}-{}", key.writer, key.counter)
}

/// One stream's share of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The stream.
    pub stream: String,
    /// How many events (1 to [`PART_EVENTS_MAX`]).
    pub events: usize,
}

/// An append: one part (APPEND) or several (an atomic multi-stream append).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Its key.
    pub key: BatchKey,
    /// Its parts, in the order sent.
    pub parts: Vec<Part>,
}

impl Batch {
    /// A batch; panics when it is larger than the checker tracks.
    #[must_use]
    pub fn new(key: BatchKey, parts: Vec<Part>) -> Batch {
        assert!(
            !parts.is_empty() && parts.len() <= PARTS_MAX,
            "{key}: parts"
        );
        for p in &parts {
            assert!(
                p.events >= 1 && p.events <= PART_EVENTS_MAX,
                "{key}: events"
            );
        }
        Batch { key, parts }
    }

    /// Events in all parts.
    #[must_use]
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.events).sum()
    }

    /// Never: a batch has at least one event.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The events of part `part`, with their ids and content.
    #[must_use]
    pub fn events(&self, part: usize) -> Vec<EventData> {
        (0..self.parts[part].events)
            .map(|i| {
                let c = expected_content(self.key, part, i);
                EventData::new(c.event_type, c.payload)
                    .with_id(event_id(self.key, part, i))
                    .aggregate_type("Soak")
                    .correlation_id(c.correlation_id)
                    .actor(c.actor)
                    .event_time(c.event_time)
            })
            .collect()
    }
}

/// Where one part of a batch went: its first event's position and stream version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartResult {
    /// Position of the part's first event.
    pub first_position: u64,
    /// Stream version of the part's first event.
    pub first_version: u64,
}

/// What is known of a batch's effect on the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Not in the log: not sent yet, refused, never sent, or found absent by a check.
    Absent,
    /// Sent, and its answer lost: whole or absent.
    Unknown,
    /// Acknowledged (or found whole by a check) at the entry's places.
    Acked,
}

/// A part of a batch as the history keeps it: the stream interned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Slot {
    stream: u32,
    events: u8,
}

/// A batch in the history: fixed size, no allocation, so that millions fit (about 100
/// bytes each with the map's own).
struct Entry {
    parts: [Slot; PARTS_MAX],
    n_parts: u8,
    state: State,
    /// A request carrying it is on its way: readers may see it, whatever `state` says.
    in_flight: bool,
    /// For [`State::Acked`]: the position of the batch's first event (a batch's events
    /// are contiguous, part after part) and each part's first stream version.
    first_position: u64,
    first_versions: [u64; PARTS_MAX],
}

impl Entry {
    fn parts(&self) -> &[Slot] {
        &self.parts[..usize::from(self.n_parts)]
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|p| usize::from(p.events)).sum()
    }

    /// The index of event `index` of part `part` among all the batch's events.
    fn flat(&self, part: usize, index: usize) -> usize {
        self.parts()[..part]
            .iter()
            .map(|p| usize::from(p.events))
            .sum::<usize>()
            + index
    }

    /// Where event `index` of part `part` of an acknowledged batch is: (position, version).
    fn place(&self, part: usize, index: usize) -> (u64, u64) {
        (
            self.first_position + self.flat(part, index) as u64,
            self.first_versions[part] + index as u64,
        )
    }

    fn results(&self) -> Vec<PartResult> {
        (0..self.parts().len())
            .map(|p| {
                let (first_position, first_version) = self.place(p, 0);
                PartResult {
                    first_position,
                    first_version,
                }
            })
            .collect()
    }

    fn set_acked(&mut self, at: &[PartResult]) {
        self.state = State::Acked;
        self.first_position = at[0].first_position;
        for (v, r) in self.first_versions.iter_mut().zip(at) {
            *v = r.first_version;
        }
    }
}

/// A subscription session's handle ([`History::open_session`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId(u64);

/// What a subscription follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Follow {
    /// The whole log, only streams starting with the prefix (empty: every event).
    All {
        /// The stream prefix.
        stream_prefix: String,
    },
    /// One stream, by version.
    Stream(String),
}

impl Follow {
    /// Whether the subscription delivers an event when it is at `cursor` (a position for
    /// [`Follow::All`], a version for [`Follow::Stream`]).
    fn wants(&self, stream: &str, position: u64, version: u64, cursor: u64) -> bool {
        match self {
            Follow::All { stream_prefix } => {
                position >= cursor && stream.starts_with(stream_prefix.as_str())
            }
            Follow::Stream(s) => stream == s && version >= cursor,
        }
    }

    /// Where a subscription goes on after delivering an event.
    fn after(&self, d: &Delivered) -> u64 {
        match self {
            Follow::All { .. } => d.position + 1,
            Follow::Stream(_) => d.version + 1,
        }
    }
}

/// One event a subscription delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Delivered {
    position: u64,
    version: u64,
    event_id: EventId,
}

/// One subscription, from its start until it is dropped (a resume after a lost connection
/// is the same session; a new subscribe is a new one).
struct Session {
    follow: Follow,
    /// The position (all) or version (stream) the next unchecked event must be at or after.
    cursor: u64,
    /// Delivered, not yet held against a check's read of the log.
    pending: VecDeque<Delivered>,
    /// The last event delivered.
    last: Option<Delivered>,
    open: bool,
}

/// Counts of what the history saw and what the checks settled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryStats {
    /// Batches sent (a batch sent again counts once).
    pub batches_sent: u64,
    /// Appends acknowledged (a retry of an acknowledged batch included).
    pub acks: u64,
    /// Retries of an acknowledged batch answered with its original places.
    pub retries_matched: u64,
    /// Batches refused (wrong expected version), checked absent ever after.
    pub refused: u64,
    /// Answers lost (unknown outcome), retries of acknowledged batches included.
    pub unknown: u64,
    /// Of those, retries of batches acknowledged before (their outcome is known).
    pub unknown_retries: u64,
    /// Unknown outcomes a check found whole in the log.
    pub unknown_found: u64,
    /// Unknown outcomes a check found absent.
    pub unknown_absent: u64,
    /// Events delivered by subscriptions.
    pub sub_events: u64,
    /// Subscription sessions opened.
    pub sessions: u64,
    /// Events read and checked by readers while the load ran.
    pub read_events: u64,
}

impl HistoryStats {
    /// Adds another history's counts (the embedded test starts a new one per disk).
    pub fn add(&mut self, o: &HistoryStats) {
        self.batches_sent += o.batches_sent;
        self.acks += o.acks;
        self.retries_matched += o.retries_matched;
        self.refused += o.refused;
        self.unknown += o.unknown;
        self.unknown_retries += o.unknown_retries;
        self.unknown_found += o.unknown_found;
        self.unknown_absent += o.unknown_absent;
        self.sub_events += o.sub_events;
        self.sessions += o.sessions;
        self.read_events += o.read_events;
    }
}

/// What a run sent and was told; see the module docs.
pub struct History {
    batches: HashMap<BatchKey, Entry>,
    /// Stream names, interned.
    streams: Vec<String>,
    stream_ids: HashMap<String, u32>,
    sessions: HashMap<SessionId, Session>,
    next_session: u64,
    /// Each stream's event count, as of the last check.
    heads: HashMap<String, u64>,
    /// Counts.
    pub stats: HistoryStats,
}

impl Default for History {
    fn default() -> History {
        History::new()
    }
}

impl History {
    /// An empty history (an empty log).
    #[must_use]
    pub fn new() -> History {
        History {
            batches: HashMap::new(),
            streams: Vec::new(),
            stream_ids: HashMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            heads: HashMap::new(),
            stats: HistoryStats::default(),
        }
    }

    /// The number of events in `stream` found by the last check (0 for none).
    #[must_use]
    pub fn head(&self, stream: &str) -> u64 {
        self.heads.get(stream).copied().unwrap_or(0)
    }

    /// Events acknowledged (or found whole) so far.
    #[must_use]
    pub fn acked_events(&self) -> u64 {
        self.batches
            .values()
            .filter(|e| e.state == State::Acked)
            .map(|e| e.len() as u64)
            .sum()
    }

    fn intern(&mut self, stream: &str) -> u32 {
        if let Some(&id) = self.stream_ids.get(stream) {
            return id;
        }
        let id = u32::try_from(self.streams.len()).unwrap_or(u32::MAX);
        self.streams.push(stream.to_owned());
        self.stream_ids.insert(stream.to_owned(), id);
        id
    }

    fn describe(&self, e: &Entry) -> String {
        let parts: Vec<String> = e
            .parts()
            .iter()
            .map(|p| format!("{} x{}", self.streams[p.stream as usize], p.events))
            .collect();
        parts.join(" + ")
    }

    /// `batch` is about to be sent (for the first time, or again with the same ids).
    ///
    /// # Errors
    /// A batch sent again with another shape than before.
    pub fn sending(&mut self, batch: &Batch) -> Result<(), Discrepancy> {
        let mut parts = [Slot::default(); PARTS_MAX];
        for (slot, p) in parts.iter_mut().zip(&batch.parts) {
            *slot = Slot {
                stream: self.intern(&p.stream),
                events: p.events as u8,
            };
        }
        let n_parts = batch.parts.len() as u8;
        match self.batches.get_mut(&batch.key) {
            Some(e) => {
                if e.parts() != &parts[..usize::from(n_parts)] {
                    return discrepancy(format!("{}: sent again with other parts", batch.key));
                }
                e.in_flight = true;
            }
            None => {
                self.stats.batches_sent += 1;
                self.batches.insert(
                    batch.key,
                    Entry {
                        parts,
                        n_parts,
                        state: State::Absent,
                        in_flight: true,
                        first_position: 0,
                        first_versions: [0; PARTS_MAX],
                    },
                );
            }
        }
        Ok(())
    }

    fn entry(&mut self, key: BatchKey) -> Result<&mut Entry, Discrepancy> {
        match self.batches.get_mut(&key) {
            Some(e) => Ok(e),
            None => discrepancy(format!("{key}: answered but never sent")),
        }
    }

    /// The append of `key` was acknowledged with `results` (one per part).
    ///
    /// # Errors
    /// Results that do not describe the batch (counts, contiguity), or a retry of an
    /// acknowledged batch answered with other places than the first time.
    pub fn acked(&mut self, key: BatchKey, results: &[AppendResult]) -> Result<(), Discrepancy> {
        let e = self.entry(key)?;
        e.in_flight = false;
        let got = part_results(key, e, results)?;
        match e.state {
            State::Acked => {
                let first = e.results();
                if first != got {
                    return discrepancy(format!(
                        "{key}: acknowledged again (a retry with the same ids) at {got:?}, first at {first:?}"
                    ));
                }
                self.stats.retries_matched += 1;
            }
            State::Absent | State::Unknown => e.set_acked(&got),
        }
        self.stats.acks += 1;
        Ok(())
    }

    /// The append of `key` was refused (nothing written).
    ///
    /// # Errors
    /// The batch was acknowledged before: a retry must be recognised, not refused.
    pub fn refused(&mut self, key: BatchKey, why: &str) -> Result<(), Discrepancy> {
        let e = self.entry(key)?;
        e.in_flight = false;
        if e.state == State::Acked {
            return discrepancy(format!(
                "{key}: a retry of an acknowledged batch (at {:?}) was refused: {why}",
                e.results()
            ));
        }
        e.state = State::Absent;
        self.stats.refused += 1;
        Ok(())
    }

    /// The request carrying `key` was sent and its answer lost.
    ///
    /// # Errors
    /// Only for a batch never sent.
    pub fn lost_answer(&mut self, key: BatchKey) -> Result<(), Discrepancy> {
        let e = self.entry(key)?;
        e.in_flight = false;
        match e.state {
            State::Absent => e.state = State::Unknown,
            State::Acked => self.stats.unknown_retries += 1,
            State::Unknown => {}
        }
        self.stats.unknown += 1;
        Ok(())
    }

    /// The request carrying `key` was never sent (no connection): nothing changed.
    ///
    /// # Errors
    /// Only for a batch never sent.
    pub fn not_sent(&mut self, key: BatchKey) -> Result<(), Discrepancy> {
        self.entry(key)?.in_flight = false;
        Ok(())
    }

    /// Checks one event a reader saw while the load ran: its content, and, for an
    /// acknowledged batch, its place; a refused batch must never be seen.
    ///
    /// # Errors
    /// What disagrees.
    pub fn check_read<E: EventView>(&mut self, e: &E) -> Result<(), Discrepancy> {
        self.stats.read_events += 1;
        self.check_seen(e)
    }

    fn check_seen<E: EventView>(&self, e: &E) -> Result<(), Discrepancy> {
        let Some((key, part, index)) = decode_event_id(e.event_id()) else {
            return Ok(());
        };
        let Some(entry) = self.batches.get(&key) else {
            return discrepancy(format!(
                "read {} at position {} of {key}, which was never sent",
                e.event_id(),
                e.position().0
            ));
        };
        self.check_content(key, entry, part, index, e)?;
        if entry.in_flight {
            return Ok(());
        }
        match entry.state {
            State::Acked => {
                let want = entry.place(part, index);
                if (e.position().0, e.version()) != want {
                    return discrepancy(format!(
                        "read event {index} of part {part} of {key} at position {} version {}; acknowledged at position {} version {}",
                        e.position().0,
                        e.version(),
                        want.0,
                        want.1
                    ));
                }
                Ok(())
            }
            State::Unknown => Ok(()),
            State::Absent => discrepancy(format!(
                "read {key} (refused, or found absent, and not sent since) at position {}",
                e.position().0
            )),
        }
    }

    /// Checks an event's stream and envelope against what its batch sent.
    fn check_content<E: EventView>(
        &self,
        key: BatchKey,
        entry: &Entry,
        part: usize,
        index: usize,
        e: &E,
    ) -> Result<(), Discrepancy> {
        let Some(p) = entry
            .parts()
            .get(part)
            .filter(|p| index < usize::from(p.events))
        else {
            return discrepancy(format!(
                "event {} at position {}: {key} ({}) has no event {index} in part {part}",
                e.event_id(),
                e.position().0,
                self.describe(entry)
            ));
        };
        let want = expected_content(key, part, index);
        let fields = [
            ("stream", e.stream() == self.streams[p.stream as usize]),
            ("event type", e.event_type() == want.event_type),
            ("payload", e.payload() == want.payload.as_slice()),
            ("correlation id", e.correlation_id() == want.correlation_id),
            ("actor", e.actor() == want.actor),
            ("aggregate type", e.aggregate_type() == "Soak"),
            ("event time", e.event_time() == want.event_time),
        ];
        if let Some((what, _)) = fields.iter().find(|(_, ok)| !ok) {
            return discrepancy(format!(
                "event {index} of part {part} of {key} at position {} (stream {}) has another {what} than was sent (payload {} bytes, sent {})",
                e.position().0,
                e.stream(),
                e.payload().len(),
                want.payload.len()
            ));
        }
        Ok(())
    }

    /// The places of an acknowledged batch's events, in order: `(position, event id)`.
    #[must_use]
    pub fn acked_places(&self, key: BatchKey) -> Option<Vec<(u64, EventId)>> {
        let e = self.batches.get(&key)?;
        if e.state != State::Acked || e.in_flight {
            return None;
        }
        let mut out = Vec::with_capacity(e.len());
        for (p, part) in e.parts().iter().enumerate() {
            for i in 0..usize::from(part.events) {
                out.push((e.place(p, i).0, event_id(key, p, i)));
            }
        }
        Some(out)
    }

    /// A subscription started: it will deliver the events `follow` selects from `from` (a
    /// position or a version).
    pub fn open_session(&mut self, follow: Follow, from: u64) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        self.stats.sessions += 1;
        self.sessions.insert(
            id,
            Session {
                follow,
                cursor: from,
                pending: VecDeque::new(),
                last: None,
                open: true,
            },
        );
        id
    }

    /// A subscription delivered an event. Checked at once for order (and, when the history
    /// knows the event's place, against it), and at the next check against the log.
    ///
    /// # Errors
    /// An event at or before the one delivered last, a gap in a stream's versions or in an
    /// unfiltered subscription to the whole log, or an event the history places elsewhere.
    pub fn delivered<E: EventView>(&mut self, id: SessionId, e: &E) -> Result<(), Discrepancy> {
        self.check_seen(e)?;
        self.stats.sub_events += 1;
        let d = Delivered {
            position: e.position().0,
            version: e.version(),
            event_id: e.event_id(),
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return discrepancy(format!("subscription session {id:?} is not open"));
        };
        let start = s.last.map_or(s.cursor, |l| s.follow.after(&l));
        let (at, dense) = match &s.follow {
            Follow::All { stream_prefix } => (d.position, stream_prefix.is_empty()),
            Follow::Stream(_) => (d.version, true),
        };
        if at < start || (dense && at != start) {
            return discrepancy(format!(
                "subscription {:?} delivered position {} version {} after {:?} (expected from {start})",
                s.follow, d.position, d.version, s.last
            ));
        }
        s.last = Some(d);
        s.pending.push_back(d);
        Ok(())
    }

    /// A subscription ended; what it delivered is still checked.
    pub fn close_session(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.open = false;
        }
    }

    /// The position (all) or version (stream) after the last event a session delivered, or
    /// where it started.
    #[must_use]
    pub fn session_next(&self, id: SessionId) -> Option<u64> {
        let s = self.sessions.get(&id)?;
        Some(s.last.map_or(s.cursor, |l| s.follow.after(&l)))
    }
}

fn part_results(
    key: BatchKey,
    entry: &Entry,
    results: &[AppendResult],
) -> Result<Vec<PartResult>, Discrepancy> {
    if results.len() != entry.parts().len() {
        return discrepancy(format!(
            "{key}: {} results for {} parts",
            results.len(),
            entry.parts().len()
        ));
    }
    let mut out = Vec::with_capacity(results.len());
    let mut next_position = None;
    for (p, (r, part)) in results.iter().zip(entry.parts()).enumerate() {
        let n = u64::from(part.events);
        if r.last_position.0.checked_sub(r.first_position.0) != Some(n - 1)
            || r.last_version.checked_sub(r.first_version) != Some(n - 1)
        {
            return discrepancy(format!(
                "{key}: result {r:?} does not describe the {n} events of part {p}"
            ));
        }
        if let Some(at) = next_position
            && r.first_position.0 != at
        {
            return discrepancy(format!(
                "{key}: part {p} starts at position {}, not right after the part before ({at})",
                r.first_position.0
            ));
        }
        next_position = Some(r.last_position.0 + 1);
        out.push(PartResult {
            first_position: r.first_position.0,
            first_version: r.first_version,
        });
    }
    Ok(out)
}

/// One session's share of a check.
struct SessionCheck {
    id: SessionId,
    follow: Follow,
    cursor: u64,
    pending: VecDeque<Delivered>,
    checked: u64,
}

/// What one check of a whole log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Events in the log.
    pub events: u64,
    /// Acknowledged events found at their places.
    pub acked_events: u64,
    /// Events of the server's own (consumer checkpoints, producer keys).
    pub system_events: u64,
    /// Unknown outcomes settled: found whole.
    pub unknown_found: u64,
    /// Unknown outcomes settled: found absent.
    pub unknown_absent: u64,
    /// Subscription deliveries held against the log.
    pub sub_events: u64,
    /// Streams in the log.
    pub streams: u64,
}

/// A check of a whole log against a [`History`], fed the log's events in position order
/// ([`Check::event`]) page by page, without holding the history between pages (the run
/// goes on meanwhile: readers and subscribers record into it).
pub struct Check {
    next_position: u64,
    /// Per stream: the next version, and the position of the last event.
    streams: HashMap<String, (u64, u64)>,
    /// Per batch seen: bit `i` is its event `i` (in part order).
    found: HashMap<BatchKey, u64>,
    /// For batches of unknown outcome: where each part's first event was found.
    unknown_parts: HashMap<BatchKey, [Option<PartResult>; PARTS_MAX]>,
    system_ids: HashSet<EventId>,
    sessions: Vec<SessionCheck>,
    report: CheckReport,
}

impl Check {
    /// Starts a check. Takes what subscriptions delivered so far; what they deliver during
    /// the check waits for the next one.
    #[must_use]
    pub fn start(history: &mut History) -> Check {
        let sessions = history
            .sessions
            .iter_mut()
            .map(|(id, s)| SessionCheck {
                id: *id,
                follow: s.follow.clone(),
                cursor: s.cursor,
                pending: std::mem::take(&mut s.pending),
                checked: 0,
            })
            .collect();
        Check {
            next_position: 0,
            streams: HashMap::new(),
            found: HashMap::new(),
            unknown_parts: HashMap::new(),
            system_ids: HashSet::new(),
            sessions,
            report: CheckReport::default(),
        }
    }

    /// The position of the next event the check expects (where the next page starts).
    #[must_use]
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    /// The next event of the log.
    ///
    /// # Errors
    /// What disagrees with the history.
    pub fn event<E: EventView>(&mut self, history: &History, e: &E) -> Result<(), Discrepancy> {
        let position = e.position().0;
        let version = e.version();
        let id = e.event_id();
        if position != self.next_position {
            return discrepancy(format!(
                "the log has position {position} where {} was next: positions are not dense",
                self.next_position
            ));
        }
        self.next_position += 1;
        self.report.events += 1;
        let stream = e.stream();
        match self.streams.get_mut(stream) {
            Some((next, last)) => {
                if version != *next {
                    return discrepancy(format!(
                        "stream {stream} has version {version} at position {position} where {next} was next (previous event at position {last})"
                    ));
                }
                *next += 1;
                *last = position;
            }
            None => {
                if version != 0 {
                    return discrepancy(format!(
                        "stream {stream} starts with version {version} at position {position}"
                    ));
                }
                self.streams.insert(stream.to_owned(), (1, position));
            }
        }
        self.sessions_see(stream, position, version, id)?;
        let Some((key, part, index)) = decode_event_id(id) else {
            self.report.system_events += 1;
            if !self.system_ids.insert(id) {
                return discrepancy(format!("event id {id} twice in the log (at {position})"));
            }
            return Ok(());
        };
        let Some(entry) = history.batches.get(&key) else {
            return discrepancy(format!(
                "position {position} holds an event of {key}, which was never sent"
            ));
        };
        history.check_content(key, entry, part, index, e)?;
        let bit = 1u64 << entry.flat(part, index);
        let mask = self.found.entry(key).or_default();
        if *mask & bit != 0 {
            return discrepancy(format!(
                "event {index} of part {part} of {key} ({id}) is in the log twice, the second time at position {position}"
            ));
        }
        *mask |= bit;
        match entry.state {
            State::Acked => {
                let want = entry.place(part, index);
                if (position, version) != want {
                    return discrepancy(format!(
                        "event {index} of part {part} of {key} ({}) is at position {position} version {version}; it was acknowledged at position {} version {}",
                        history.describe(entry),
                        want.0,
                        want.1
                    ));
                }
                self.report.acked_events += 1;
            }
            State::Unknown => {
                let parts = self.unknown_parts.entry(key).or_default();
                let first = PartResult {
                    first_position: position - index as u64,
                    first_version: version.wrapping_sub(index as u64),
                };
                match parts[part] {
                    None if index == 0 => parts[part] = Some(first),
                    Some(f) if f == first => {}
                    _ => {
                        return discrepancy(format!(
                            "{key} (unknown outcome; {}): event {index} of part {part} at position {position} version {version} does not follow the part's earlier events ({:?})",
                            history.describe(entry),
                            parts[part]
                        ));
                    }
                }
            }
            State::Absent => {
                return discrepancy(format!(
                    "{key} ({}) was refused, never sent, or found absent earlier, yet its event {index} of part {part} is at position {position}",
                    history.describe(entry)
                ));
            }
        }
        Ok(())
    }

    /// Holds the subscriptions' deliveries against the log's next event.
    fn sessions_see(
        &mut self,
        stream: &str,
        position: u64,
        version: u64,
        event_id: EventId,
    ) -> Result<(), Discrepancy> {
        for s in &mut self.sessions {
            if s.pending.is_empty() || !s.follow.wants(stream, position, version, s.cursor) {
                continue;
            }
            let have = Delivered {
                position,
                version,
                event_id,
            };
            let Some(d) = s.pending.pop_front() else {
                continue;
            };
            if d != have {
                return discrepancy(format!(
                    "subscription {:?} (session {:?}, checked up to {}): the log's next event for it is {have:?} in {stream}, it delivered {d:?}",
                    s.follow, s.id, s.cursor
                ));
            }
            s.checked += 1;
            s.cursor = s.follow.after(&d);
        }
        Ok(())
    }

    /// Gives up a check (the log failed under it: a power cut during recovery): the history
    /// is as before it started.
    pub fn abandon(self, history: &mut History) {
        for s in self.sessions {
            if let Some(live) = history.sessions.get_mut(&s.id) {
                for d in s.pending.into_iter().rev() {
                    live.pending.push_front(d);
                }
            }
        }
    }

    /// Ends the check at the log's end: every acknowledged batch must have been seen whole;
    /// unknown outcomes are settled (found whole: acknowledged at the places found; found
    /// absent: absent); subscriptions' deliveries not matched are discrepancies unless they
    /// lie past the log's end (delivered during the check); the history's stream heads are
    /// updated.
    ///
    /// # Errors
    /// What disagrees with the history.
    pub fn finish(mut self, history: &mut History) -> Result<CheckReport, Discrepancy> {
        let end = self.next_position;
        let mut lost = Vec::new();
        let mut settled = Vec::new();
        for (key, entry) in &history.batches {
            let n = entry.len();
            let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
            let mask = self.found.get(key).copied().unwrap_or(0);
            match entry.state {
                State::Acked if mask != all => {
                    lost.push(format!(
                        "{key} ({}; {} of {n} events missing; acknowledged at {:?})",
                        history.describe(entry),
                        n - mask.count_ones() as usize,
                        entry.results()
                    ));
                }
                State::Unknown if entry.in_flight => {
                    return discrepancy(format!("{key}: in flight during a check"));
                }
                State::Unknown if mask == 0 => settled.push((*key, None)),
                State::Unknown if mask == all => {
                    let parts: Vec<PartResult> = self
                        .unknown_parts
                        .get(key)
                        .map(|p| p.iter().flatten().copied().collect())
                        .unwrap_or_default();
                    let contiguous = parts.len() == entry.parts().len()
                        && parts.windows(2).zip(entry.parts()).all(|(w, p)| {
                            w[1].first_position == w[0].first_position + u64::from(p.events)
                        });
                    if !contiguous {
                        return discrepancy(format!(
                            "{key} (unknown outcome; {}) is whole but not contiguous: parts at {parts:?}",
                            history.describe(entry)
                        ));
                    }
                    settled.push((*key, Some(parts)));
                }
                State::Unknown => {
                    return discrepancy(format!(
                        "{key} (unknown outcome; {}) is partly in the log: {} of {n} events (mask {mask:b})",
                        history.describe(entry),
                        mask.count_ones()
                    ));
                }
                _ => {}
            }
        }
        if !lost.is_empty() {
            lost.sort();
            let shown: Vec<&String> = lost.iter().take(10).collect();
            return discrepancy(format!(
                "{} acknowledged batches lost (log of {end} events), for example {shown:?}",
                lost.len()
            ));
        }
        for (key, parts) in settled {
            if let Some(e) = history.batches.get_mut(&key) {
                match parts {
                    Some(p) => {
                        e.set_acked(&p);
                        self.report.unknown_found += 1;
                        history.stats.unknown_found += 1;
                    }
                    None => {
                        e.state = State::Absent;
                        self.report.unknown_absent += 1;
                        history.stats.unknown_absent += 1;
                    }
                }
            }
        }
        for s in self.sessions {
            if let Some(d) = s.pending.iter().find(|d| d.position < end) {
                return discrepancy(format!(
                    "subscription {:?} (session {:?}) delivered {d:?}, which the log (of {end} events) does not hold where the subscription was (checked up to {})",
                    s.follow, s.id, s.cursor
                ));
            }
            self.report.sub_events += s.checked;
            let Some(live) = history.sessions.get_mut(&s.id) else {
                continue;
            };
            live.cursor = s.cursor;
            for d in s.pending.into_iter().rev() {
                live.pending.push_front(d);
            }
            if !live.open && live.pending.is_empty() {
                history.sessions.remove(&s.id);
            }
        }
        self.report.streams = self.streams.len() as u64;
        history.heads = self
            .streams
            .into_iter()
            .map(|(s, (next, _))| (s, next))
            .collect();
        Ok(self.report)
    }
}

/// This process's peak resident memory (`VmHWM`), for the figures: mostly the history.
#[must_use]
pub fn own_peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// `bytes` in MiB, for the figures.
#[must_use]
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_content_follows_from_them() {
        let key = BatchKey {
            writer: 7,
            counter: 123_456,
        };
        let id = event_id(key, 2, 5);
        assert_eq!(decode_event_id(id), Some((key, 2, 5)));
        assert_eq!(decode_event_id(EventId([0; 16])), None);
        assert_eq!(expected_content(key, 2, 5), expected_content(key, 2, 5));
        assert_ne!(
            expected_content(key, 2, 5).payload,
            expected_content(key, 2, 4).payload
        );
        assert_eq!(&expected_content(key, 2, 5).payload[..16], &id.0);
    }
}
