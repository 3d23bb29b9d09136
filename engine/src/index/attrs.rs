//! Attribute indexes (docs/FORMAT.md, "Attribute index sidecar"): for one segment, where each
//! event type, correlation id, causation id and actor occurs, every record's record time in
//! position order, and the records sorted by event time. Forensic reads ("every event of
//! correlation C", "every `TradeAmended` recorded between 10:00 and 11:00") use them instead of
//! scanning the log.
//!
//! Values are stored as a 64-bit hash ([`value_hash`]); a lookup returns candidate records and
//! the caller compares the value in the record itself, so a collision costs a read, never a
//! wrong answer. While a segment is active its attributes are an [`AttrBuilder`] in memory;
//! once sealed they are encoded into a `.adx` sidecar and read through [`SealedAttrs`]
//! without copying (the caller maps the file).

#![forbid(unsafe_code)]

use std::sync::Arc;

use super::IndexError;
use crate::format::envelope::EnvelopeRef;
use crate::format::{DecodeError, EventId, Hash32, Position, SegmentSeq, Timestamp, le};

/// Magic of an attribute index sidecar.
pub const ATTR_MAGIC: &[u8; 8] = b"TALLYADX";
/// Bytes in the sidecar header.
pub const ATTR_HEADER_LEN: usize = 128;
/// Bytes per key entry and per event-time entry.
pub const ATTR_ENTRY_LEN: usize = 16;
/// Bytes per entry of the event-type-by-event-time section.
pub const TYPE_TIME_ENTRY_LEN: usize = 24;
/// Bytes per record time.
pub const RECORD_TIME_LEN: usize = 8;
/// Bytes of the trailing CRC.
pub const ATTR_TRAILER_LEN: usize = 4;
const _: () = assert!(ATTR_TRAILER_LEN == super::INDEX_TRAILER_LEN);

// Header field offsets.
/// `format_version`.
pub const AH_VERSION: usize = 8;
/// `header_len`.
pub const AH_HEADER_LEN: usize = 10;
/// `flags`.
pub const AH_FLAGS: usize = 12;
/// `log_id`.
pub const AH_LOG_ID: usize = 16;
/// `seq`.
pub const AH_SEQ: usize = 32;
/// `base_position`.
pub const AH_BASE_POSITION: usize = 40;
/// `record_count`.
pub const AH_RECORD_COUNT: usize = 48;
/// `data_end`.
pub const AH_DATA_END: usize = 56;
/// `last_chain_hash`.
pub const AH_LAST_CHAIN_HASH: usize = 64;
/// `counts`: one `u32` per [`Field`] in [`Field::ALL`] order.
pub const AH_COUNTS: usize = 96;
/// 12 reserved bytes.
pub const AH_RESERVED: usize = 116;
const _: () = assert!(AH_COUNTS + 4 * FIELDS == AH_RESERVED);
const _: () = assert!(AH_RESERVED + 12 == ATTR_HEADER_LEN);

/// Number of indexed fields.
pub const FIELDS: usize = 5;

/// An indexed envelope field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// `event_type`.
    EventType,
    /// `correlation_id`.
    Correlation,
    /// `causation_id`.
    Causation,
    /// `actor`.
    Actor,
    /// `event_id`, written as a query value in the UUID text form ([`crate::EventId`]'s
    /// `Display`).
    EventId,
}

impl Field {
    /// Every indexed field, in the order of the sidecar's sections.
    pub const ALL: [Field; FIELDS] = [
        Field::EventType,
        Field::Correlation,
        Field::Causation,
        Field::Actor,
        Field::EventId,
    ];

    /// The field's name in the envelope.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Field::EventType => "event_type",
            Field::Correlation => "correlation_id",
            Field::Causation => "causation_id",
            Field::Actor => "actor",
            Field::EventId => "event_id",
        }
    }

    /// The field's text in `env` (`None` for the event id, which is bytes).
    #[must_use]
    pub fn text<'a>(self, env: &EnvelopeRef<'a>) -> Option<&'a str> {
        match self {
            Field::EventType => Some(env.event_type),
            Field::Correlation => Some(env.correlation_id),
            Field::Causation => Some(env.causation_id),
            Field::Actor => Some(env.actor),
            Field::EventId => None,
        }
    }

    /// The hash under which `env` is indexed for this field; `None` for an empty value,
    /// which is not indexed.
    #[must_use]
    pub fn key_of(self, env: &EnvelopeRef<'_>) -> Option<u64> {
        match self.text(env) {
            Some("") => None,
            Some(v) => Some(value_hash(v)),
            None => Some(id_hash(&env.event_id)),
        }
    }

    /// The hash a query for `value` looks up; `None` when nothing can match (an empty
    /// value, or an event id that is not a UUID's text).
    #[must_use]
    pub fn key_for(self, value: &str) -> Option<u64> {
        match self {
            _ if value.is_empty() => None,
            Field::EventId => value.parse::<EventId>().ok().map(|id| id_hash(&id)),
            _ => Some(value_hash(value)),
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// The 64-bit hash under which an event id is indexed: the first 8 bytes of `BLAKE3` of its
/// 16 bytes, little-endian.
#[must_use]
pub fn id_hash(id: &EventId) -> u64 {
    le::u64_at(blake3::hash(&id.0).as_bytes(), 0)
}

/// The 64-bit hash under which a value is indexed: the first 8 bytes of `BLAKE3(value)`,
/// little-endian (the same function as the stream hash).
#[must_use]
pub fn value_hash(value: &str) -> u64 {
    super::stream_hash(value)
}

/// Where a record is in its segment: `(pos_delta, offset)`.
pub type Hit = (u32, u32);

/// What both kinds of attribute index answer.
pub trait AttrSource {
    /// Records indexed.
    fn record_count(&self) -> u64;
    /// The first `pos_delta` whose record time is at or after `t` (`record_count` if none).
    fn first_at_or_after(&self, t: Timestamp) -> u64;
    /// Calls `f` with every record in `from..to` (position deltas) whose `field` hashes to
    /// `hash`, in position order, until `f` returns `false`.
    fn each_key(&self, field: Field, hash: u64, from: u32, to: u32, f: &mut dyn FnMut(Hit) -> bool);
    /// How many records [`AttrSource::each_key`] would visit.
    fn count_key(&self, field: Field, hash: u64, from: u32, to: u32) -> u64;
    /// How many records have an event time in `lo..hi`.
    fn count_event_time(&self, lo: Timestamp, hi: Timestamp) -> u64;
    /// Calls `f` with every record whose event time is in `lo..hi`, in event-time order.
    fn each_event_time(&self, lo: Timestamp, hi: Timestamp, f: &mut dyn FnMut(Hit));
    /// Calls `f` with every record whose event type hashes to `hash` and whose event time
    /// is in `lo..hi`, in event-time order.
    fn each_type_event_time(&self, hash: u64, lo: Timestamp, hi: Timestamp, f: &mut dyn FnMut(Hit));
}

/// Entries a [`Runs`] list keeps unsorted at least; it merges them into its sorted run
/// once they reach this many or a sixteenth of the run.
const TAIL_MIN: usize = 1024;

/// A list of entries kept as a sorted run and a short tail of the newest ones. A push is
/// O(1); the tail is merged into the run when it reaches a sixteenth of it (so an entry is
/// moved about 17 times over a segment, with no allocation per entry); a lookup
/// binary-searches the run and, once [`Runs::prepare`] has sorted it, the tail, and visits
/// the two ranges merged, in order.
#[derive(Clone, Debug)]
struct Runs<T> {
    run: Vec<T>,
    tail: Vec<T>,
    tail_sorted: bool,
}

impl<T> Default for Runs<T> {
    fn default() -> Runs<T> {
        Runs {
            run: Vec::new(),
            tail: Vec::new(),
            tail_sorted: true,
        }
    }
}

impl<T: Ord + Copy> Runs<T> {
    fn len(&self) -> usize {
        self.run.len() + self.tail.len()
    }

    fn push(&mut self, x: T) {
        if self.tail.last().is_some_and(|last| *last > x) {
            self.tail_sorted = false;
        }
        self.tail.push(x);
        if self.tail.len() >= TAIL_MIN.max(self.run.len() / 16) {
            self.merge();
        }
    }

    /// Sorts the tail, for lookups: about linear when few entries came since the last call.
    fn prepare(&mut self) {
        if !self.tail_sorted {
            self.tail.sort();
            self.tail_sorted = true;
        }
    }

    fn merge(&mut self) {
        self.prepare();
        let mut merged = Vec::with_capacity(self.len());
        let (mut i, mut j) = (0, 0);
        while i < self.run.len() && j < self.tail.len() {
            if self.tail[j] < self.run[i] {
                merged.push(self.tail[j]);
                j += 1;
            } else {
                merged.push(self.run[i]);
                i += 1;
            }
        }
        merged.extend_from_slice(&self.run[i..]);
        merged.extend_from_slice(&self.tail[j..]);
        self.run = merged;
        self.tail.clear();
    }

    /// Calls `f` with the entries `e` with `lo <= e < hi`, in order, until `f` returns
    /// `false`: the run's range and the tail's (sorted here if [`Runs::prepare`] has not
    /// sorted it, which costs a copy of the tail's matches) merged.
    fn each_in(&self, lo: T, hi: T, f: &mut dyn FnMut(T) -> bool) {
        let range = |v: &[T]| {
            let a = v.partition_point(|e| *e < lo);
            let b = v.partition_point(|e| *e < hi);
            a..b.max(a)
        };
        let run = &self.run[range(&self.run)];
        let unsorted;
        let tail: &[T] = if self.tail_sorted {
            &self.tail[range(&self.tail)]
        } else {
            let mut m: Vec<T> = self
                .tail
                .iter()
                .copied()
                .filter(|e| *e >= lo && *e < hi)
                .collect();
            m.sort_unstable();
            unsorted = m;
            &unsorted
        };
        let (mut i, mut j) = (0, 0);
        while i < run.len() || j < tail.len() {
            let e = if j == tail.len() || (i < run.len() && run[i] <= tail[j]) {
                i += 1;
                run[i - 1]
            } else {
                j += 1;
                tail[j - 1]
            };
            if !f(e) {
                return;
            }
        }
    }

    fn count_in(&self, lo: T, hi: T) -> usize {
        // An empty or reversed range counts nothing.
        let run = self
            .run
            .partition_point(|e| *e < hi)
            .saturating_sub(self.run.partition_point(|e| *e < lo));
        let tail = if self.tail_sorted {
            self.tail
                .partition_point(|e| *e < hi)
                .saturating_sub(self.tail.partition_point(|e| *e < lo))
        } else {
            self.tail.iter().filter(|e| **e >= lo && **e < hi).count()
        };
        run + tail
    }

    /// Every entry, sorted.
    fn sorted(&self) -> Vec<T> {
        let mut all = self.clone();
        all.merge();
        all.run
    }
}

/// The attributes of the segment being written, in memory.
#[derive(Debug)]
pub struct AttrBuilder {
    seq: SegmentSeq,
    base_position: Position,
    /// Per field, `(value hash, pos_delta, offset)`.
    keys: [Runs<(u64, u32, u32)>; FIELDS],
    /// The last value hashed per text field and its hash: events of one batch or one
    /// producer repeat their type, actor and correlation, and BLAKE3 is most of the cost
    /// of indexing a record.
    last: [(String, u64); FIELDS],
    record_times: Vec<u64>,
    /// `(event_time, pos_delta, offset)`.
    event_times: Runs<(u64, u32, u32)>,
    /// `(event type hash, event_time, pos_delta, offset)`.
    type_times: Runs<(u64, u64, u32, u32)>,
    data_end: u64,
    last_chain_hash: Hash32,
}

impl AttrBuilder {
    /// An empty index for segment `seq`, whose first record is at `base_position` and file
    /// offset [`crate::format::SEGMENT_DATA_START`], chained from `prev_chain_hash`.
    #[must_use]
    pub fn new(seq: SegmentSeq, base_position: Position, prev_chain_hash: Hash32) -> AttrBuilder {
        AttrBuilder {
            seq,
            base_position,
            keys: Default::default(),
            last: Default::default(),
            record_times: Vec::new(),
            event_times: Runs::default(),
            type_times: Runs::default(),
            data_end: crate::format::SEGMENT_DATA_START,
            last_chain_hash: prev_chain_hash,
        }
    }

    /// The segment indexed.
    #[must_use]
    pub fn seq(&self) -> SegmentSeq {
        self.seq
    }

    /// Position of the next record.
    #[must_use]
    pub fn next_position(&self) -> Position {
        Position(self.base_position.0 + self.record_times.len() as u64)
    }

    /// File offset just past the last record indexed (where the next one starts).
    #[must_use]
    pub fn data_end(&self) -> u64 {
        self.data_end
    }

    /// Chain hash of the last record indexed (the segment's `prev_chain_hash` if none).
    #[must_use]
    pub fn last_chain_hash(&self) -> Hash32 {
        self.last_chain_hash
    }

    /// Sorts the entries added since the last call, so that lookups binary-search them
    /// rather than scan them. Lookups are correct without it.
    pub fn prepare(&mut self) {
        for k in &mut self.keys {
            k.prepare();
        }
        self.event_times.prepare();
        self.type_times.prepare();
    }

    /// Adds the next record: at `offset`, ending at `end`, with chain hash `chain_hash`.
    ///
    /// # Panics
    /// If `position` is not the next one or the segment outgrows `u32` offsets: the log
    /// assigns both, so either is a bug.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        position: Position,
        offset: u64,
        end: u64,
        record_time: Timestamp,
        chain_hash: &Hash32,
        env: &EnvelopeRef<'_>,
    ) {
        assert_eq!(position, self.next_position(), "positions must be dense");
        let pos_delta = u32::try_from(position.0 - self.base_position.0)
            .expect("a segment holds fewer than 2^32 records");
        let offset = u32::try_from(offset).expect("segments are smaller than 4 GiB");
        let mut type_hash = 0;
        for field in Field::ALL {
            let hash = match field.text(env) {
                Some("") => continue,
                Some(v) => {
                    let last = &mut self.last[field.slot()];
                    if last.0 != v {
                        last.0.clear();
                        last.0.push_str(v);
                        last.1 = value_hash(v);
                    }
                    last.1
                }
                None => id_hash(&env.event_id),
            };
            if field == Field::EventType {
                type_hash = hash;
            }
            self.keys[field.slot()].push((hash, pos_delta, offset));
        }
        self.type_times
            .push((type_hash, env.event_time.0, pos_delta, offset));
        self.record_times.push(record_time.0);
        self.event_times.push((env.event_time.0, pos_delta, offset));
        self.data_end = end;
        self.last_chain_hash = *chain_hash;
    }

    /// Encodes the sidecar for a sealed segment of the log `log_id`.
    #[must_use]
    pub fn encode(&self, log_id: &[u8; 16]) -> Vec<u8> {
        let record_count = self.record_times.len();
        let keys: usize = self.keys.iter().map(Runs::len).sum();
        let total = ATTR_HEADER_LEN
            + record_count * (RECORD_TIME_LEN + ATTR_ENTRY_LEN + TYPE_TIME_ENTRY_LEN)
            + keys * ATTR_ENTRY_LEN
            + ATTR_TRAILER_LEN;
        let mut out = Vec::with_capacity(total);
        out.resize(ATTR_HEADER_LEN, 0);
        out[..8].copy_from_slice(ATTR_MAGIC);
        le::put_u16(&mut out, AH_VERSION, crate::format::STRUCTURE_VERSION);
        le::put_u16(&mut out, AH_HEADER_LEN, ATTR_HEADER_LEN as u16);
        out[AH_LOG_ID..AH_LOG_ID + 16].copy_from_slice(log_id);
        le::put_u64(&mut out, AH_SEQ, self.seq.0);
        le::put_u64(&mut out, AH_BASE_POSITION, self.base_position.0);
        le::put_u64(&mut out, AH_RECORD_COUNT, record_count as u64);
        le::put_u64(&mut out, AH_DATA_END, self.data_end);
        out[AH_LAST_CHAIN_HASH..AH_LAST_CHAIN_HASH + 32].copy_from_slice(&self.last_chain_hash);
        for (i, k) in self.keys.iter().enumerate() {
            // At most one entry per record per field, and a segment holds fewer than 2^32.
            le::put_u32(&mut out, AH_COUNTS + 4 * i, k.len() as u32);
        }
        for t in &self.record_times {
            out.extend_from_slice(&t.to_le_bytes());
        }
        let entry = |out: &mut Vec<u8>, key: u64, (pos_delta, offset): Hit| {
            out.extend_from_slice(&key.to_le_bytes());
            out.extend_from_slice(&pos_delta.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        };
        for k in &self.keys {
            for (key, pos_delta, offset) in k.sorted() {
                entry(&mut out, key, (pos_delta, offset));
            }
        }
        for (t, pos_delta, offset) in self.event_times.sorted() {
            entry(&mut out, t, (pos_delta, offset));
        }
        for (hash, t, pos_delta, offset) in self.type_times.sorted() {
            out.extend_from_slice(&hash.to_le_bytes());
            entry(&mut out, t, (pos_delta, offset));
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), total);
        out
    }
}

impl AttrSource for AttrBuilder {
    fn record_count(&self) -> u64 {
        self.record_times.len() as u64
    }

    fn first_at_or_after(&self, t: Timestamp) -> u64 {
        self.record_times.partition_point(|&r| r < t.0) as u64
    }

    fn each_key(
        &self,
        field: Field,
        hash: u64,
        from: u32,
        to: u32,
        f: &mut dyn FnMut(Hit) -> bool,
    ) {
        self.keys[field.slot()].each_in((hash, from, 0), (hash, to, 0), &mut |(_, d, o)| f((d, o)));
    }

    fn count_key(&self, field: Field, hash: u64, from: u32, to: u32) -> u64 {
        self.keys[field.slot()].count_in((hash, from, 0), (hash, to, 0)) as u64
    }

    fn count_event_time(&self, lo: Timestamp, hi: Timestamp) -> u64 {
        self.event_times.count_in((lo.0, 0, 0), (hi.0, 0, 0)) as u64
    }

    fn each_event_time(&self, lo: Timestamp, hi: Timestamp, f: &mut dyn FnMut(Hit)) {
        self.event_times
            .each_in((lo.0, 0, 0), (hi.0, 0, 0), &mut |(_, d, o)| {
                f((d, o));
                true
            });
    }

    fn each_type_event_time(
        &self,
        hash: u64,
        lo: Timestamp,
        hi: Timestamp,
        f: &mut dyn FnMut(Hit),
    ) {
        self.type_times
            .each_in((hash, lo.0, 0, 0), (hash, hi.0, 0, 0), &mut |(
                _,
                _,
                d,
                o,
            )| {
                f((d, o));
                true
            });
    }
}

/// What a sidecar's header says it covers: checked against the segment before use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttrCover {
    /// The log's id.
    pub log_id: [u8; 16],
    /// The segment.
    pub seq: SegmentSeq,
    /// The segment's first position.
    pub base_position: Position,
    /// Records covered.
    pub record_count: u64,
    /// File offset just past the last record covered.
    pub data_end: u64,
    /// Chain hash of the last record covered.
    pub last_chain_hash: Hash32,
}

/// A decoded, checked view of a `.adx` sidecar's bytes.
#[derive(Clone)]
pub struct SealedAttrs {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    cover: AttrCover,
    /// `(start, count)` of each field's section, in entries.
    sections: [(usize, usize); FIELDS],
    times_at: usize,
    event_times_at: usize,
    type_times_at: usize,
}

impl std::fmt::Debug for SealedAttrs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedAttrs")
            .field("cover", &self.cover)
            .finish_non_exhaustive()
    }
}

fn invalid(what: &'static str, detail: String) -> IndexError {
    IndexError::Decode(DecodeError::Invalid { what, detail })
}

impl SealedAttrs {
    /// Checks and wraps a sidecar's bytes: magic, CRC, version, header, section sizes, that
    /// every entry points inside the segment's records, that record times never decrease,
    /// and that every section is sorted, so lookups can binary-search without further checks.
    ///
    /// # Errors
    /// [`IndexError`] for anything that does not match the format.
    pub fn open(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<SealedAttrs, IndexError> {
        let b: &[u8] = (*bytes).as_ref();
        super::check_sidecar_frame(
            b,
            (ATTR_MAGIC, "TALLYADX"),
            ("attribute index", "attribute index header_len"),
            ATTR_HEADER_LEN,
            AH_VERSION,
            AH_HEADER_LEN,
        )?;
        if le::u32_at(b, AH_FLAGS) != 0 {
            return Err(invalid(
                "attribute index flags",
                format!("{:#x}", le::u32_at(b, AH_FLAGS)),
            ));
        }
        crate::format::check_zero(b, AH_RESERVED..ATTR_HEADER_LEN, "attribute index header")?;
        let record_count = le::u64_at(b, AH_RECORD_COUNT);
        let counts: [u64; FIELDS] =
            std::array::from_fn(|i| u64::from(le::u32_at(b, AH_COUNTS + 4 * i)));
        if let Some(i) = (0..FIELDS).find(|&i| counts[i] > record_count) {
            return Err(invalid(
                "attribute index count",
                format!(
                    "{} entries for {} exceed the {record_count} records",
                    counts[i],
                    Field::ALL[i].name()
                ),
            ));
        }
        // Every record has an event type and an event id.
        for field in [Field::EventType, Field::EventId] {
            if counts[field.slot()] != record_count {
                return Err(invalid(
                    "attribute index count",
                    format!(
                        "{} {} entries for {record_count} records",
                        counts[field.slot()],
                        field.name()
                    ),
                ));
            }
        }
        // In u128: the counts come from disk and must not overflow the size check.
        let declared = ATTR_HEADER_LEN as u128
            + u128::from(record_count)
                * (RECORD_TIME_LEN + ATTR_ENTRY_LEN + TYPE_TIME_ENTRY_LEN) as u128
            + counts.iter().map(|&c| u128::from(c)).sum::<u128>() * ATTR_ENTRY_LEN as u128
            + ATTR_TRAILER_LEN as u128;
        if declared != b.len() as u128 {
            return Err(DecodeError::LengthMismatch {
                what: "attribute index",
                declared: u64::try_from(declared).unwrap_or(u64::MAX),
                actual: b.len() as u64,
            }
            .into());
        }
        // The length matched, so every count fits in memory.
        let n = record_count as usize;
        let times_at = ATTR_HEADER_LEN;
        let mut at = times_at + n * RECORD_TIME_LEN;
        let mut sections = [(0, 0); FIELDS];
        for (i, &c) in counts.iter().enumerate() {
            sections[i] = (at, c as usize);
            at += c as usize * ATTR_ENTRY_LEN;
        }
        let attrs = SealedAttrs {
            cover: AttrCover {
                log_id: le::array_at(b, AH_LOG_ID),
                seq: SegmentSeq(le::u64_at(b, AH_SEQ)),
                base_position: Position(le::u64_at(b, AH_BASE_POSITION)),
                record_count,
                data_end: le::u64_at(b, AH_DATA_END),
                last_chain_hash: le::array_at(b, AH_LAST_CHAIN_HASH),
            },
            sections,
            times_at,
            event_times_at: at,
            type_times_at: at + n * ATTR_ENTRY_LEN,
            bytes: Arc::clone(&bytes),
        };
        attrs.check_sections()?;
        Ok(attrs)
    }

    fn check_sections(&self) -> Result<(), IndexError> {
        let n = self.cover.record_count;
        let data_end = self.cover.data_end;
        let mut prev = 0;
        for i in 0..n as usize {
            let t = self.record_time(i);
            if t < prev {
                return Err(invalid(
                    "attribute index record times",
                    format!("record {i} has a record time before the previous one"),
                ));
            }
            prev = t;
        }
        let check = |what: &'static str, at: usize, count: usize| -> Result<(), IndexError> {
            let mut last: Option<(u64, u32)> = None;
            for i in 0..count {
                let (key, (delta, offset)) = self.entry(at, i);
                if u64::from(delta) >= n
                    || u64::from(offset) < crate::format::SEGMENT_DATA_START
                    || u64::from(offset) >= data_end
                {
                    return Err(invalid(
                        what,
                        format!("entry {i} points outside the segment"),
                    ));
                }
                if last.is_some_and(|l| l >= (key, delta)) {
                    return Err(invalid(what, format!("entry {i} is out of order")));
                }
                last = Some((key, delta));
            }
            Ok(())
        };
        for (i, &(at, count)) in self.sections.iter().enumerate() {
            check(
                match Field::ALL[i] {
                    Field::EventType => "attribute index event_type section",
                    Field::Correlation => "attribute index correlation_id section",
                    Field::Causation => "attribute index causation_id section",
                    Field::Actor => "attribute index actor section",
                    Field::EventId => "attribute index event_id section",
                },
                at,
                count,
            )?;
        }
        check(
            "attribute index event_time section",
            self.event_times_at,
            n as usize,
        )?;
        let what = "attribute index event type by event_time section";
        let mut last: Option<(u64, u64, u32)> = None;
        for i in 0..n as usize {
            let (hash, t, (delta, offset)) = self.type_time(i);
            if u64::from(delta) >= n
                || u64::from(offset) < crate::format::SEGMENT_DATA_START
                || u64::from(offset) >= data_end
            {
                return Err(invalid(
                    what,
                    format!("entry {i} points outside the segment"),
                ));
            }
            if last.is_some_and(|l| l >= (hash, t, delta)) {
                return Err(invalid(what, format!("entry {i} is out of order")));
            }
            last = Some((hash, t, delta));
        }
        Ok(())
    }

    fn type_time(&self, i: usize) -> (u64, u64, Hit) {
        let b = self.bytes();
        let e = self.type_times_at + i * TYPE_TIME_ENTRY_LEN;
        (
            le::u64_at(b, e),
            le::u64_at(b, e + 8),
            (le::u32_at(b, e + 16), le::u32_at(b, e + 20)),
        )
    }

    /// What a sidecar's header says it covers, read without checking anything else, so
    /// that a stale or foreign sidecar is passed over before its checksum is computed.
    #[must_use]
    pub fn peek_cover(b: &[u8]) -> Option<AttrCover> {
        (b.len() >= ATTR_HEADER_LEN && &b[..8] == ATTR_MAGIC).then(|| AttrCover {
            log_id: le::array_at(b, AH_LOG_ID),
            seq: SegmentSeq(le::u64_at(b, AH_SEQ)),
            base_position: Position(le::u64_at(b, AH_BASE_POSITION)),
            record_count: le::u64_at(b, AH_RECORD_COUNT),
            data_end: le::u64_at(b, AH_DATA_END),
            last_chain_hash: le::array_at(b, AH_LAST_CHAIN_HASH),
        })
    }

    /// What the sidecar covers.
    #[must_use]
    pub fn cover(&self) -> &AttrCover {
        &self.cover
    }

    /// The file's bytes.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }

    fn record_time(&self, i: usize) -> u64 {
        le::u64_at(self.bytes(), self.times_at + i * RECORD_TIME_LEN)
    }

    fn entry(&self, at: usize, i: usize) -> (u64, Hit) {
        let b = self.bytes();
        let e = at + i * ATTR_ENTRY_LEN;
        (
            le::u64_at(b, e),
            (le::u32_at(b, e + 8), le::u32_at(b, e + 12)),
        )
    }

    /// The first entry index in `0..count` of the section at `at` not below `(key, delta)`.
    fn lower_bound(&self, at: usize, count: usize, key: (u64, u32)) -> usize {
        let (mut lo, mut hi) = (0, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (k, (d, _)) = self.entry(at, mid);
            if (k, d) < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

impl AttrSource for SealedAttrs {
    fn each_type_event_time(
        &self,
        hash: u64,
        lo: Timestamp,
        hi: Timestamp,
        f: &mut dyn FnMut(Hit),
    ) {
        let n = self.cover.record_count as usize;
        let (mut a, mut b) = (0, n);
        while a < b {
            let mid = a + (b - a) / 2;
            let (h, t, _) = self.type_time(mid);
            if (h, t) < (hash, lo.0) {
                a = mid + 1;
            } else {
                b = mid;
            }
        }
        while a < n {
            let (h, t, hit) = self.type_time(a);
            if h != hash || t >= hi.0 {
                return;
            }
            f(hit);
            a += 1;
        }
    }

    fn record_count(&self) -> u64 {
        self.cover.record_count
    }

    fn first_at_or_after(&self, t: Timestamp) -> u64 {
        let (mut lo, mut hi) = (0, self.cover.record_count as usize);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.record_time(mid) < t.0 {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo as u64
    }

    fn each_key(
        &self,
        field: Field,
        hash: u64,
        from: u32,
        to: u32,
        f: &mut dyn FnMut(Hit) -> bool,
    ) {
        let (at, count) = self.sections[field.slot()];
        let mut i = self.lower_bound(at, count, (hash, from));
        while i < count {
            let (k, hit) = self.entry(at, i);
            if k != hash || hit.0 >= to || !f(hit) {
                return;
            }
            i += 1;
        }
    }

    fn count_key(&self, field: Field, hash: u64, from: u32, to: u32) -> u64 {
        let (at, count) = self.sections[field.slot()];
        let a = self.lower_bound(at, count, (hash, from));
        let b = self.lower_bound(at, count, (hash, to));
        b.saturating_sub(a) as u64
    }

    fn count_event_time(&self, lo: Timestamp, hi: Timestamp) -> u64 {
        let n = self.cover.record_count as usize;
        let a = self.lower_bound(self.event_times_at, n, (lo.0, 0));
        let b = self.lower_bound(self.event_times_at, n, (hi.0, 0));
        b.saturating_sub(a) as u64
    }

    fn each_event_time(&self, lo: Timestamp, hi: Timestamp, f: &mut dyn FnMut(Hit)) {
        let n = self.cover.record_count as usize;
        let mut i = self.lower_bound(self.event_times_at, n, (lo.0, 0));
        while i < n {
            let (t, hit) = self.entry(self.event_times_at, i);
            if t >= hi.0 {
                return;
            }
            f(hit);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::envelope::{ContentType, EnvelopeRef};

    fn env<'a>(ty: &'a str, corr: &'a str, actor: &'a str, event_time: u64) -> EnvelopeRef<'a> {
        EnvelopeRef {
            event_id: crate::format::EventId([0; 16]),
            event_time: Timestamp(event_time),
            schema_version: 1,
            content_type: ContentType::Json,
            stream: "s",
            aggregate_type: "",
            event_type: ty,
            correlation_id: corr,
            causation_id: "",
            actor,
            payload: b"{}",
            payload_form: crate::format::envelope::PayloadForm::Inline,
        }
    }

    fn sample() -> AttrBuilder {
        let mut b = unsorted();
        b.prepare();
        b
    }

    fn unsorted() -> AttrBuilder {
        let mut b = AttrBuilder::new(SegmentSeq(3), Position(100), [7; 32]);
        let rows = [
            ("New", "c1", "alice", 50),
            ("Amend", "c1", "bob", 10),
            ("New", "c2", "", 30),
            ("Amend", "c2", "alice", 30),
            ("New", "", "alice", 5),
        ];
        for (i, (ty, corr, actor, et)) in rows.iter().enumerate() {
            let offset = 4096 + 100 * i as u64;
            b.push(
                Position(100 + i as u64),
                offset,
                offset + 100,
                Timestamp(1000 + 10 * (i as u64 / 2)),
                &[i as u8; 32],
                &env(ty, corr, actor, *et),
            );
        }
        b
    }

    fn keys(src: &dyn AttrSource, field: Field, value: &str, from: u32, to: u32) -> Vec<u32> {
        let mut out = Vec::new();
        src.each_key(field, value_hash(value), from, to, &mut |h| {
            out.push(h.0);
            true
        });
        out
    }

    fn times(src: &dyn AttrSource, lo: u64, hi: u64) -> Vec<u32> {
        let mut out = Vec::new();
        src.each_event_time(Timestamp(lo), Timestamp(hi), &mut |h| out.push(h.0));
        out
    }

    fn open(bytes: Vec<u8>) -> Result<SealedAttrs, IndexError> {
        SealedAttrs::open(Arc::new(bytes))
    }

    #[test]
    fn builder_and_sidecar_answer_the_same() {
        let b = sample();
        let s = open(b.encode(&[9; 16])).unwrap();
        assert_eq!(
            *s.cover(),
            AttrCover {
                log_id: [9; 16],
                seq: SegmentSeq(3),
                base_position: Position(100),
                record_count: 5,
                data_end: 4096 + 500,
                last_chain_hash: [4; 32],
            }
        );
        // A builder not sorted since its last push answers the same and encodes the same.
        let u = unsorted();
        assert_eq!(u.encode(&[9; 16]), b.encode(&[9; 16]));
        for src in [&b as &dyn AttrSource, &s, &u] {
            assert_eq!(keys(src, Field::EventType, "New", 0, 5), [0, 2, 4]);
            assert_eq!(keys(src, Field::EventType, "New", 1, 4), [2]);
            assert_eq!(keys(src, Field::Correlation, "c2", 0, 5), [2, 3]);
            assert_eq!(keys(src, Field::Actor, "alice", 0, 5), [0, 3, 4]);
            assert!(keys(src, Field::Actor, "", 0, 5).is_empty());
            assert!(keys(src, Field::Causation, "c1", 0, 5).is_empty());
            assert_eq!(times(src, 10, 31), [1, 2, 3]);
            let mut typed = Vec::new();
            src.each_type_event_time(value_hash("New"), Timestamp(6), Timestamp(51), &mut |h| {
                typed.push(h.0);
            });
            assert_eq!(typed, [2, 0]);
            assert_eq!(times(src, 0, u64::MAX), [4, 1, 2, 3, 0]);
            assert!(times(src, 31, 31).is_empty());
            assert_eq!(src.first_at_or_after(Timestamp(0)), 0);
            assert_eq!(src.first_at_or_after(Timestamp(1010)), 2);
            assert_eq!(src.first_at_or_after(Timestamp(1011)), 4);
            assert_eq!(src.first_at_or_after(Timestamp(2000)), 5);
        }
        let mut first = Vec::new();
        s.each_key(Field::EventType, value_hash("New"), 0, 5, &mut |h| {
            first.push(h);
            false
        });
        assert_eq!(first, [(0, 4096)]);
    }

    /// Enough records that the lists merge their tails several times, with event times
    /// out of order: every lookup agrees with a scan of what was pushed, before and after
    /// `prepare`, and with the encoded sidecar.
    #[test]
    fn lists_that_merge_their_tails_answer_like_a_scan() {
        let n = 5000u32;
        let mut b = AttrBuilder::new(SegmentSeq(1), Position(0), [0; 32]);
        let types = ["A", "B", "C"];
        let rows: Vec<(&str, String, u64)> = (0..n)
            .map(|i| {
                let t = types[(i % 3) as usize];
                let corr = format!("c{}", (i * 7919) % 300);
                let et = u64::from((i * 104_729) % 10_000);
                (t, corr, et)
            })
            .collect();
        for (i, (t, corr, et)) in rows.iter().enumerate() {
            let off = 4096 + 64 * i as u64;
            b.push(
                Position(i as u64),
                off,
                off + 64,
                Timestamp(1),
                &[0; 32],
                &env(t, corr, "", *et),
            );
        }
        let s = open(b.encode(&[1; 16])).unwrap();
        let want_corr: Vec<u32> = (0..n).filter(|&i| rows[i as usize].1 == "c17").collect();
        let want_time: Vec<u32> = {
            let mut v: Vec<u32> = (0..n)
                .filter(|&i| (2000..2500).contains(&rows[i as usize].2))
                .collect();
            v.sort_unstable();
            v
        };
        let want_typed: Vec<u32> = want_time
            .iter()
            .copied()
            .filter(|&i| rows[i as usize].0 == "B")
            .collect();
        let check = |src: &dyn AttrSource| {
            assert_eq!(keys(src, Field::Correlation, "c17", 0, n), want_corr);
            assert_eq!(
                src.count_key(Field::Correlation, value_hash("c17"), 0, n),
                want_corr.len() as u64
            );
            let mut t = times(src, 2000, 2500);
            t.sort_unstable();
            assert_eq!(t, want_time);
            assert_eq!(
                src.count_event_time(Timestamp(2000), Timestamp(2500)),
                want_time.len() as u64
            );
            let mut typed = Vec::new();
            src.each_type_event_time(
                value_hash("B"),
                Timestamp(2000),
                Timestamp(2500),
                &mut |h| {
                    typed.push(h.0);
                },
            );
            typed.sort_unstable();
            assert_eq!(typed, want_typed);
        };
        check(&b);
        check(&s);
        b.prepare();
        check(&b);
        assert_eq!(b.encode(&[1; 16]), s.bytes());
    }

    #[test]
    fn every_damaged_byte_is_refused() {
        let bytes = sample().encode(&[9; 16]);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(open(bad).is_err(), "byte {i} flipped");
        }
        for len in 0..bytes.len() {
            assert!(open(bytes[..len].to_vec()).is_err(), "truncated to {len}");
        }
    }

    fn resealed(mut bytes: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        bytes.truncate(bytes.len() - ATTR_TRAILER_LEN);
        edit(&mut bytes);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn a_well_checksummed_but_inconsistent_sidecar_is_refused() {
        let good = sample().encode(&[9; 16]);
        let times_at = ATTR_HEADER_LEN;
        let types_at = times_at + 5 * RECORD_TIME_LEN;
        type Edit = Box<dyn FnOnce(&mut Vec<u8>)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("flags", Box::new(|b| le::put_u32(b, AH_FLAGS, 1))),
            ("reserved", Box::new(|b| b[AH_RESERVED + 3] = 1)),
            (
                "count above records",
                Box::new(|b| le::put_u32(b, AH_COUNTS, 6)),
            ),
            (
                "event ids missing (the layout before event ids were indexed)",
                Box::new(|b| le::put_u32(b, AH_COUNTS + 16, 0)),
            ),
            (
                "huge record count",
                Box::new(|b| le::put_u64(b, AH_RECORD_COUNT, u64::MAX)),
            ),
            (
                "record time going back",
                Box::new(move |b| le::put_u64(b, times_at + 8, 0)),
            ),
            (
                "entry out of order",
                Box::new(move |b| {
                    let (first, second) = (types_at, types_at + ATTR_ENTRY_LEN);
                    let a: [u8; 16] = le::array_at(b, first);
                    let c: [u8; 16] = le::array_at(b, second);
                    b[first..first + 16].copy_from_slice(&c);
                    b[second..second + 16].copy_from_slice(&a);
                }),
            ),
            (
                "position delta beyond the records",
                Box::new(move |b| le::put_u32(b, types_at + 8, 5)),
            ),
            (
                "offset beyond the data",
                Box::new(move |b| le::put_u32(b, types_at + 12, 4096 + 500)),
            ),
        ];
        for (name, edit) in cases {
            assert!(open(resealed(good.clone(), edit)).is_err(), "{name}");
        }
        assert!(open(resealed(good, |_| {})).is_ok());
    }
}
