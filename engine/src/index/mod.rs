//! Per-segment indexes (docs/FORMAT.md, "Index sidecar").
//!
//! Each segment has an index that maps, for every stream with events in the segment, its
//! stream versions to positions and file offsets, plus a sparse position-to-offset table
//! for `read_all`, plus the event ids in position order (for the idempotency window).
//! While a segment is active its index is an [`ActiveIndex`] in memory; when the segment is
//! sealed the index is encoded into a `.idx` sidecar and read back through [`SealedIndex`]
//! without loading it (the caller maps the file).
//!
//! Each stream's part of a segment links to the previous segment that holds the same
//! stream (`prev_segment`), so reading one stream visits only the segments that hold it.
//!
//! Stream names are stored with a 64-bit hash for ordering and lookup; lookups compare the
//! name as well, so hash collisions cost a comparison, never a wrong answer.

#![forbid(unsafe_code)]

pub mod attrs;

use std::collections::HashMap;
use std::sync::Arc;

use crate::format::{DecodeError, EventId, Hash32, Position, SegmentSeq, Timestamp, le};

/// How many records apart the sparse position index samples.
pub const SPARSE_EVERY: u32 = 32;

/// Magic of an index sidecar.
pub const INDEX_MAGIC: &[u8; 8] = b"TALLYIDX";
/// Bytes in the sidecar header.
pub const INDEX_HEADER_LEN: usize = 128;
/// Bytes per stream-table entry.
pub const STREAM_ENTRY_LEN: usize = 72;
/// Bytes per event entry.
pub const EVENT_ENTRY_LEN: usize = 16;
/// Bytes per sparse entry.
pub const SPARSE_ENTRY_LEN: usize = 8;
/// Bytes per event id.
pub const EVENT_ID_LEN: usize = 16;
/// Bytes of the trailing CRC.
pub const INDEX_TRAILER_LEN: usize = 4;

/// Header flag: the sidecar describes a sealed segment completely.
pub const INDEX_FLAG_COMPLETE: u32 = 1;

// Header field offsets.
/// `format_version`.
pub const IH_VERSION: usize = 8;
/// `header_len`.
pub const IH_HEADER_LEN: usize = 10;
/// `flags`.
pub const IH_FLAGS: usize = 12;
/// `log_id`.
pub const IH_LOG_ID: usize = 16;
/// `seq`.
pub const IH_SEQ: usize = 32;
/// `base_position`.
pub const IH_BASE_POSITION: usize = 40;
/// `record_count`.
pub const IH_RECORD_COUNT: usize = 48;
/// `data_end`.
pub const IH_DATA_END: usize = 56;
/// `last_chain_hash`.
pub const IH_LAST_CHAIN_HASH: usize = 64;
/// `stream_count`.
pub const IH_STREAM_COUNT: usize = 96;
/// `sparse_count`.
pub const IH_SPARSE_COUNT: usize = 100;
/// `names_len`.
pub const IH_NAMES_LEN: usize = 104;
/// `sparse_every`.
pub const IH_SPARSE_EVERY: usize = 108;
/// `last_record_time`.
pub const IH_LAST_RECORD_TIME: usize = 112;
/// 8 reserved bytes.
pub const IH_RESERVED: usize = 120;
const _: () = assert!(IH_RESERVED + 8 == INDEX_HEADER_LEN);

// Stream entry field offsets.
/// `hash`.
pub const SE_HASH: usize = 0;
/// `first_version`.
pub const SE_FIRST_VERSION: usize = 8;
/// `last_version`.
pub const SE_LAST_VERSION: usize = 16;
/// `first_position`.
pub const SE_FIRST_POSITION: usize = 24;
/// `last_position`.
pub const SE_LAST_POSITION: usize = 32;
/// `first_record_time`.
pub const SE_FIRST_RECORD_TIME: usize = 40;
/// `prev_segment` (`u64::MAX` for none).
pub const SE_PREV_SEGMENT: usize = 48;
/// `entries_start`.
pub const SE_ENTRIES_START: usize = 56;
/// `entries_count`.
pub const SE_ENTRIES_COUNT: usize = 60;
/// `name_offset`.
pub const SE_NAME_OFFSET: usize = 64;
/// `name_len`.
pub const SE_NAME_LEN: usize = 68;
/// 2 reserved bytes.
pub const SE_RESERVED: usize = 70;
const _: () = assert!(SE_RESERVED + 2 == STREAM_ENTRY_LEN);

/// The checks every sidecar starts with: its length, magic, the trailing CRC-32 over every
/// byte before it, its `format_version` and its `header_len`.
pub(crate) fn check_sidecar_frame(
    b: &[u8],
    (magic, magic_name): (&'static [u8; 8], &'static str),
    (what, header_len_what): (&'static str, &'static str),
    header_len: usize,
    version_at: usize,
    header_len_at: usize,
) -> Result<(), DecodeError> {
    crate::format::need(b, header_len + INDEX_TRAILER_LEN)?;
    crate::format::check_magic(b, magic, magic_name)?;
    let body_end = b.len() - INDEX_TRAILER_LEN;
    crate::format::check_crc(le::u32_at(b, body_end), &b[..body_end], what)?;
    crate::format::check_version(le::u16_at(b, version_at), what)?;
    if le::u16_at(b, header_len_at) as usize != header_len {
        return Err(DecodeError::Invalid {
            what: header_len_what,
            detail: le::u16_at(b, header_len_at).to_string(),
        });
    }
    Ok(())
}

/// The 64-bit stream hash used to order and find streams in an index: the first 8 bytes of
/// `BLAKE3(stream id)`, little-endian.
#[must_use]
pub fn stream_hash(name: &str) -> u64 {
    let h = blake3::hash(name.as_bytes());
    le::u64_at(h.as_bytes(), 0)
}

/// One event in a stream's part of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    /// The event's stream version.
    pub version: u64,
    /// Its position minus the segment's base position.
    pub pos_delta: u32,
    /// File offset of its record.
    pub offset: u32,
}

/// A caller-chosen dense key for a stream (the log's stream table id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StreamKey(pub u32);

/// Hashes a [`StreamKey`] with one multiplication: keys are dense integers the log assigns,
/// not input anyone else chooses, and SipHash costs more than the rest of an index update.
#[derive(Default)]
pub struct StreamKeyHasher(u64);

impl std::hash::Hasher for StreamKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type KeyMap<V> = HashMap<StreamKey, V, std::hash::BuildHasherDefault<StreamKeyHasher>>;

/// One stream's part of one segment.
#[derive(Clone, Debug)]
pub struct StreamRun {
    /// The stream id.
    pub name: Arc<str>,
    /// [`stream_hash`] of the name.
    pub hash: u64,
    /// The previous segment holding this stream.
    pub prev_segment: Option<SegmentSeq>,
    /// Record time of the stream's first event in this segment.
    pub first_record_time: Timestamp,
    /// The stream's events in this segment, by version.
    pub entries: Vec<IndexEntry>,
}

/// What a stream's part of a segment says about the stream, from either kind of index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    /// The stream id.
    pub name: String,
    /// First version in the segment.
    pub first_version: u64,
    /// Last version in the segment.
    pub last_version: u64,
    /// Position of the first event in the segment.
    pub first_position: Position,
    /// Position of the last event in the segment.
    pub last_position: Position,
    /// Record time of the first event in the segment.
    pub first_record_time: Timestamp,
}

/// The index of the segment being written, in memory.
#[derive(Debug)]
pub struct ActiveIndex {
    seq: SegmentSeq,
    base_position: Position,
    streams: KeyMap<StreamRun>,
    sparse: Vec<(u32, u32)>,
    ids: Vec<EventId>,
    last_record_time: Timestamp,
}

impl ActiveIndex {
    /// An empty index for segment `seq` whose first record will be at `base_position`.
    #[must_use]
    pub fn new(seq: SegmentSeq, base_position: Position) -> ActiveIndex {
        ActiveIndex {
            seq,
            base_position,
            streams: KeyMap::default(),
            sparse: Vec::new(),
            ids: Vec::new(),
            last_record_time: Timestamp(0),
        }
    }

    /// The segment indexed.
    #[must_use]
    pub fn seq(&self) -> SegmentSeq {
        self.seq
    }

    /// Records indexed.
    #[must_use]
    pub fn record_count(&self) -> u64 {
        self.ids.len() as u64
    }

    /// Position of the next record.
    #[must_use]
    pub fn next_position(&self) -> Position {
        Position(self.base_position.0 + self.record_count())
    }

    /// Adds the next record. `prev_segment` is used only if this is the stream's first
    /// event in the segment.
    ///
    /// # Panics
    /// If `position` is not the next one, or versions of a stream do not increase by one:
    /// the log assigns both, so either is a bug.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        key: StreamKey,
        name: &Arc<str>,
        hash: u64,
        prev_segment: Option<SegmentSeq>,
        version: u64,
        position: Position,
        offset: u64,
        record_time: Timestamp,
        event_id: EventId,
    ) {
        assert_eq!(position, self.next_position(), "positions must be dense");
        let pos_delta = u32::try_from(position.0 - self.base_position.0)
            .expect("a segment holds fewer than 2^32 records");
        let offset = u32::try_from(offset).expect("segments are smaller than 4 GiB");
        if pos_delta % SPARSE_EVERY == 0 {
            self.sparse.push((pos_delta, offset));
        }
        let run = self.streams.entry(key).or_insert_with(|| StreamRun {
            name: Arc::clone(name),
            hash,
            prev_segment,
            first_record_time: record_time,
            entries: Vec::new(),
        });
        if let Some(last) = run.entries.last() {
            assert_eq!(last.version + 1, version, "stream versions must be dense");
        }
        run.entries.push(IndexEntry {
            version,
            pos_delta,
            offset,
        });
        self.ids.push(event_id);
        self.last_record_time = record_time;
    }

    /// The stream's part of this segment.
    #[must_use]
    pub fn stream_run(&self, key: StreamKey) -> Option<&StreamRun> {
        self.streams.get(&key)
    }

    /// Offset and position of the nearest sampled record at or before `position`.
    #[must_use]
    pub fn locate(&self, position: Position) -> Option<(Position, u64)> {
        locate_in(
            self.base_position,
            self.record_count(),
            self.sparse.len(),
            |i| self.sparse[i],
            position,
        )
    }

    /// Every stream's part of the segment.
    pub fn runs(&self) -> impl Iterator<Item = (StreamKey, &StreamRun)> {
        self.streams.iter().map(|(k, r)| (*k, r))
    }

    /// Record time of the last record.
    #[must_use]
    pub fn last_record_time(&self) -> Timestamp {
        self.last_record_time
    }

    /// Event ids in position order.
    #[must_use]
    pub fn event_ids(&self) -> &[EventId] {
        &self.ids
    }

    /// Encodes the sidecar for this index. `complete` marks a sealed segment.
    #[must_use]
    pub fn encode(&self, info: &IndexFileInfo, complete: bool) -> Vec<u8> {
        let mut runs: Vec<&StreamRun> = self.streams.values().collect();
        runs.sort_by(|a, b| (a.hash, &*a.name).cmp(&(b.hash, &*b.name)));
        let record_count = self.ids.len();
        let names_len: usize = runs.iter().map(|r| r.name.len()).sum();
        let total = INDEX_HEADER_LEN
            + runs.len() * STREAM_ENTRY_LEN
            + record_count * (EVENT_ENTRY_LEN + EVENT_ID_LEN)
            + self.sparse.len() * SPARSE_ENTRY_LEN
            + names_len
            + INDEX_TRAILER_LEN;
        let mut out = vec![0u8; INDEX_HEADER_LEN];
        out[..8].copy_from_slice(INDEX_MAGIC);
        le::put_u16(&mut out, IH_VERSION, crate::format::STRUCTURE_VERSION);
        le::put_u16(&mut out, IH_HEADER_LEN, INDEX_HEADER_LEN as u16);
        le::put_u32(
            &mut out,
            IH_FLAGS,
            if complete { INDEX_FLAG_COMPLETE } else { 0 },
        );
        out[IH_LOG_ID..IH_LOG_ID + 16].copy_from_slice(&info.log_id);
        le::put_u64(&mut out, IH_SEQ, self.seq.0);
        le::put_u64(&mut out, IH_BASE_POSITION, self.base_position.0);
        le::put_u64(&mut out, IH_RECORD_COUNT, record_count as u64);
        le::put_u64(&mut out, IH_DATA_END, info.data_end);
        out[IH_LAST_CHAIN_HASH..IH_LAST_CHAIN_HASH + 32].copy_from_slice(&info.last_chain_hash);
        le::put_u32(&mut out, IH_STREAM_COUNT, runs.len() as u32);
        le::put_u32(&mut out, IH_SPARSE_COUNT, self.sparse.len() as u32);
        le::put_u32(&mut out, IH_NAMES_LEN, names_len as u32);
        le::put_u32(&mut out, IH_SPARSE_EVERY, SPARSE_EVERY);
        le::put_u64(&mut out, IH_LAST_RECORD_TIME, self.last_record_time.0);
        out.reserve(total - INDEX_HEADER_LEN);
        let mut entries_start = 0u32;
        let mut name_offset = 0u32;
        for run in &runs {
            let first = run.entries.first().expect("a run has at least one entry");
            let last = run.entries.last().expect("a run has at least one entry");
            let mut e = [0u8; STREAM_ENTRY_LEN];
            le::put_u64(&mut e, SE_HASH, run.hash);
            le::put_u64(&mut e, SE_FIRST_VERSION, first.version);
            le::put_u64(&mut e, SE_LAST_VERSION, last.version);
            le::put_u64(
                &mut e,
                SE_FIRST_POSITION,
                self.base_position.0 + u64::from(first.pos_delta),
            );
            le::put_u64(
                &mut e,
                SE_LAST_POSITION,
                self.base_position.0 + u64::from(last.pos_delta),
            );
            le::put_u64(&mut e, SE_FIRST_RECORD_TIME, run.first_record_time.0);
            le::put_u64(
                &mut e,
                SE_PREV_SEGMENT,
                run.prev_segment.map_or(u64::MAX, |s| s.0),
            );
            le::put_u32(&mut e, SE_ENTRIES_START, entries_start);
            le::put_u32(&mut e, SE_ENTRIES_COUNT, run.entries.len() as u32);
            le::put_u32(&mut e, SE_NAME_OFFSET, name_offset);
            le::put_u16(&mut e, SE_NAME_LEN, run.name.len() as u16);
            out.extend_from_slice(&e);
            entries_start += run.entries.len() as u32;
            name_offset += run.name.len() as u32;
        }
        for run in &runs {
            for entry in &run.entries {
                let mut e = [0u8; EVENT_ENTRY_LEN];
                le::put_u64(&mut e, 0, entry.version);
                le::put_u32(&mut e, 8, entry.pos_delta);
                le::put_u32(&mut e, 12, entry.offset);
                out.extend_from_slice(&e);
            }
        }
        for &(pos_delta, offset) in &self.sparse {
            out.extend_from_slice(&pos_delta.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        for id in &self.ids {
            out.extend_from_slice(&id.0);
        }
        for run in &runs {
            out.extend_from_slice(run.name.as_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(out.len(), total);
        out
    }
}

/// What a sidecar records beyond the index itself.
#[derive(Clone, Copy, Debug)]
pub struct IndexFileInfo {
    /// The log's id.
    pub log_id: [u8; 16],
    /// File offset just past the last record covered.
    pub data_end: u64,
    /// Chain hash of the last record covered (the segment's `prev_chain_hash` if none).
    pub last_chain_hash: Hash32,
}

fn locate_in(
    base: Position,
    record_count: u64,
    sparse_len: usize,
    sparse_at: impl Fn(usize) -> (u32, u32),
    position: Position,
) -> Option<(Position, u64)> {
    if position < base || position.0 - base.0 >= record_count || sparse_len == 0 {
        return None;
    }
    let delta = position.0 - base.0;
    // The last sample whose delta is <= the wanted one.
    let (mut lo, mut hi) = (0usize, sparse_len);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if u64::from(sparse_at(mid).0) <= delta {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let (d, off) = sparse_at(lo);
    if u64::from(d) > delta {
        return None;
    }
    Some((Position(base.0 + u64::from(d)), u64::from(off)))
}

/// Why an index sidecar was refused. The log rebuilds a refused sidecar from its segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// The bytes do not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A stream-table entry points outside the file's sections.
    #[error("stream entry {entry} points outside the index ({detail})")]
    OutOfBounds {
        /// Which entry.
        entry: u32,
        /// What is out of bounds.
        detail: &'static str,
    },
}

/// A decoded, checked view of a sidecar's bytes.
#[derive(Clone)]
pub struct SealedIndex {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    log_id: [u8; 16],
    seq: SegmentSeq,
    base_position: Position,
    record_count: u64,
    data_end: u64,
    last_chain_hash: Hash32,
    last_record_time: Timestamp,
    complete: bool,
    stream_count: usize,
    sparse_count: usize,
    streams_at: usize,
    entries_at: usize,
    sparse_at: usize,
    ids_at: usize,
    names_at: usize,
}

impl std::fmt::Debug for SealedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedIndex")
            .field("seq", &self.seq)
            .field("base_position", &self.base_position)
            .field("record_count", &self.record_count)
            .field("stream_count", &self.stream_count)
            .finish_non_exhaustive()
    }
}

/// A stream's part of a sealed segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SealedRun {
    /// Index of the stream-table entry.
    pub entry: u32,
    /// First version in the segment.
    pub first_version: u64,
    /// Last version in the segment.
    pub last_version: u64,
    /// Previous segment holding the stream.
    pub prev_segment: Option<SegmentSeq>,
    entries_start: u32,
    entries_count: u32,
}

impl SealedRun {
    /// Events of the stream in the segment.
    #[must_use]
    pub fn len(&self) -> u32 {
        self.entries_count
    }

    /// Whether the run has no event (a sidecar that opened has none such).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries_count == 0
    }
}

impl SealedIndex {
    /// Checks and wraps a sidecar's bytes: magic, version, section sizes, and the CRC over
    /// the whole file.
    ///
    /// # Errors
    /// [`IndexError`] for anything that does not match the format.
    pub fn open(bytes: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Result<SealedIndex, IndexError> {
        let b: &[u8] = (*bytes).as_ref();
        check_sidecar_frame(
            b,
            (INDEX_MAGIC, "TALLYIDX"),
            ("index", "index header_len"),
            INDEX_HEADER_LEN,
            IH_VERSION,
            IH_HEADER_LEN,
        )?;
        let flags = le::u32_at(b, IH_FLAGS);
        if flags & !INDEX_FLAG_COMPLETE != 0 {
            return Err(DecodeError::Invalid {
                what: "index flags",
                detail: format!("{flags:#x}"),
            }
            .into());
        }
        crate::format::check_zero(b, IH_RESERVED..INDEX_HEADER_LEN, "index header")?;
        if le::u32_at(b, IH_SPARSE_EVERY) != SPARSE_EVERY {
            return Err(DecodeError::Invalid {
                what: "index sparse_every",
                detail: le::u32_at(b, IH_SPARSE_EVERY).to_string(),
            }
            .into());
        }
        let record_count = le::u64_at(b, IH_RECORD_COUNT);
        let stream_count = le::u32_at(b, IH_STREAM_COUNT) as u64;
        let sparse_count = le::u32_at(b, IH_SPARSE_COUNT) as u64;
        let names_len = le::u32_at(b, IH_NAMES_LEN) as u64;
        // In u128: the counts come from disk and must not overflow the size check.
        let declared = INDEX_HEADER_LEN as u128
            + u128::from(stream_count) * STREAM_ENTRY_LEN as u128
            + u128::from(record_count) * (EVENT_ENTRY_LEN + EVENT_ID_LEN) as u128
            + u128::from(sparse_count) * SPARSE_ENTRY_LEN as u128
            + u128::from(names_len)
            + INDEX_TRAILER_LEN as u128;
        if declared != b.len() as u128 {
            return Err(DecodeError::LengthMismatch {
                what: "index",
                declared: u64::try_from(declared).unwrap_or(u64::MAX),
                actual: b.len() as u64,
            }
            .into());
        }
        if sparse_count != record_count.div_ceil(u64::from(SPARSE_EVERY)) {
            return Err(DecodeError::Invalid {
                what: "index sparse_count",
                detail: format!("{sparse_count} samples for {record_count} records"),
            }
            .into());
        }
        let (stream_count, sparse_count) = (stream_count as usize, sparse_count as usize);
        let streams_at = INDEX_HEADER_LEN;
        let entries_at = streams_at + stream_count * STREAM_ENTRY_LEN;
        let sparse_at = entries_at + record_count as usize * EVENT_ENTRY_LEN;
        let ids_at = sparse_at + sparse_count * SPARSE_ENTRY_LEN;
        let names_at = ids_at + record_count as usize * EVENT_ID_LEN;
        let idx = SealedIndex {
            log_id: le::array_at(b, IH_LOG_ID),
            seq: SegmentSeq(le::u64_at(b, IH_SEQ)),
            base_position: Position(le::u64_at(b, IH_BASE_POSITION)),
            record_count,
            data_end: le::u64_at(b, IH_DATA_END),
            last_chain_hash: le::array_at(b, IH_LAST_CHAIN_HASH),
            last_record_time: Timestamp(le::u64_at(b, IH_LAST_RECORD_TIME)),
            complete: flags & INDEX_FLAG_COMPLETE != 0,
            stream_count,
            sparse_count,
            streams_at,
            entries_at,
            sparse_at,
            ids_at,
            names_at,
            bytes,
        };
        idx.check_stream_table(names_len)?;
        Ok(idx)
    }

    /// Checks that every stream entry's entries and name lie inside their sections, that the
    /// entries partition the event section, and that the table is sorted: the lookups below
    /// then index the sections without further checks.
    fn check_stream_table(&self, names_len: u64) -> Result<(), IndexError> {
        let mut next_start = 0u64;
        let mut prev_key: Option<(u64, &str)> = None;
        for i in 0..self.stream_count {
            let e = self.stream_entry(i);
            let entry = i as u32;
            let start = u64::from(le::u32_at(e, SE_ENTRIES_START));
            let count = u64::from(le::u32_at(e, SE_ENTRIES_COUNT));
            if start != next_start || count == 0 || start + count > self.record_count {
                return Err(IndexError::OutOfBounds {
                    entry,
                    detail: "entries",
                });
            }
            next_start = start + count;
            let name_off = u64::from(le::u32_at(e, SE_NAME_OFFSET));
            let name_len = u64::from(le::u16_at(e, SE_NAME_LEN));
            if name_off + name_len > names_len {
                return Err(IndexError::OutOfBounds {
                    entry,
                    detail: "name",
                });
            }
            crate::format::check_zero(e, SE_RESERVED..STREAM_ENTRY_LEN, "index stream entry")?;
            let first = le::u64_at(e, SE_FIRST_VERSION);
            let last = le::u64_at(e, SE_LAST_VERSION);
            if last.checked_sub(first) != Some(count - 1) {
                return Err(IndexError::OutOfBounds {
                    entry,
                    detail: "version range",
                });
            }
            let name = self.name_of(i).ok_or(IndexError::OutOfBounds {
                entry,
                detail: "utf-8",
            })?;
            // Every entry of the run: dense versions, a position inside the segment, an
            // offset inside the data written (readers check the record too, but a damaged
            // sidecar is caught here and rebuilt).
            let base = self.entries_at + start as usize * EVENT_ENTRY_LEN;
            for k in 0..count as usize {
                let at = base + k * EVENT_ENTRY_LEN;
                let b = self.b();
                let version = le::u64_at(b, at);
                let pos_delta = u64::from(le::u32_at(b, at + 8));
                let offset = u64::from(le::u32_at(b, at + 12));
                if version != first + k as u64
                    || pos_delta >= self.record_count
                    || offset < crate::format::SEGMENT_DATA_START
                    || offset >= self.data_end
                {
                    return Err(IndexError::OutOfBounds {
                        entry,
                        detail: "event entry",
                    });
                }
            }
            let key = (le::u64_at(e, SE_HASH), name);
            if prev_key.is_some_and(|p| p >= key) {
                return Err(IndexError::OutOfBounds {
                    entry,
                    detail: "order",
                });
            }
            prev_key = Some(key);
        }
        if next_start != self.record_count {
            return Err(IndexError::OutOfBounds {
                entry: self.stream_count as u32,
                detail: "entries do not cover every record",
            });
        }
        Ok(())
    }

    fn b(&self) -> &[u8] {
        (*self.bytes).as_ref()
    }

    fn stream_entry(&self, i: usize) -> &[u8] {
        let at = self.streams_at + i * STREAM_ENTRY_LEN;
        &self.b()[at..at + STREAM_ENTRY_LEN]
    }

    fn name_of(&self, i: usize) -> Option<&str> {
        let e = self.stream_entry(i);
        let off = self.names_at + le::u32_at(e, SE_NAME_OFFSET) as usize;
        let len = le::u16_at(e, SE_NAME_LEN) as usize;
        std::str::from_utf8(self.b().get(off..off + len)?).ok()
    }

    /// The segment indexed.
    #[must_use]
    pub fn seq(&self) -> SegmentSeq {
        self.seq
    }

    /// The log the index belongs to.
    #[must_use]
    pub fn log_id(&self) -> [u8; 16] {
        self.log_id
    }

    /// Position of the segment's first record.
    #[must_use]
    pub fn base_position(&self) -> Position {
        self.base_position
    }

    /// Records covered.
    #[must_use]
    pub fn record_count(&self) -> u64 {
        self.record_count
    }

    /// File offset just past the last record covered.
    #[must_use]
    pub fn data_end(&self) -> u64 {
        self.data_end
    }

    /// Chain hash of the last record covered.
    #[must_use]
    pub fn last_chain_hash(&self) -> Hash32 {
        self.last_chain_hash
    }

    /// Record time of the last record covered.
    #[must_use]
    pub fn last_record_time(&self) -> Timestamp {
        self.last_record_time
    }

    /// Whether the sidecar describes a sealed segment completely.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Streams in the segment.
    #[must_use]
    pub fn stream_count(&self) -> usize {
        self.stream_count
    }

    /// Finds a stream's part of the segment.
    #[must_use]
    pub fn find_stream(&self, hash: u64, name: &str) -> Option<SealedRun> {
        // First entry whose hash is >= the wanted one, then compare names among equals.
        let (mut lo, mut hi) = (0usize, self.stream_count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if le::u64_at(self.stream_entry(mid), SE_HASH) < hash {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let mut i = lo;
        while i < self.stream_count && le::u64_at(self.stream_entry(i), SE_HASH) == hash {
            if self.name_of(i) == Some(name) {
                return Some(self.run(i));
            }
            i += 1;
        }
        None
    }

    fn run(&self, i: usize) -> SealedRun {
        let e = self.stream_entry(i);
        let prev = le::u64_at(e, SE_PREV_SEGMENT);
        SealedRun {
            entry: i as u32,
            first_version: le::u64_at(e, SE_FIRST_VERSION),
            last_version: le::u64_at(e, SE_LAST_VERSION),
            prev_segment: (prev != u64::MAX).then_some(SegmentSeq(prev)),
            entries_start: le::u32_at(e, SE_ENTRIES_START),
            entries_count: le::u32_at(e, SE_ENTRIES_COUNT),
        }
    }

    /// The `i`th event entry of a run (by version).
    ///
    /// # Panics
    /// If `i` is not below the run's entry count.
    #[must_use]
    pub fn run_entry(&self, run: &SealedRun, i: u32) -> IndexEntry {
        assert!(i < run.entries_count, "entry {i} outside run");
        let at = self.entries_at + (run.entries_start + i) as usize * EVENT_ENTRY_LEN;
        let b = self.b();
        IndexEntry {
            version: le::u64_at(b, at),
            pos_delta: le::u32_at(b, at + 8),
            offset: le::u32_at(b, at + 12),
        }
    }

    /// Entry `i` of the stream table (`i < stream_count()`): its name (`None` when it is
    /// not UTF-8, which a sidecar that opened cannot hold), the hash stored with it, and
    /// its run.
    #[must_use]
    pub fn stream_at(&self, i: usize) -> (Option<&str>, u64, SealedRun) {
        (
            self.name_of(i),
            le::u64_at(self.stream_entry(i), SE_HASH),
            self.run(i),
        )
    }

    /// Every stream's summary, in table order.
    pub fn stream_summaries(&self) -> impl Iterator<Item = StreamSummary> + '_ {
        (0..self.stream_count).map(|i| {
            let e = self.stream_entry(i);
            StreamSummary {
                name: self.name_of(i).unwrap_or_default().to_owned(),
                first_version: le::u64_at(e, SE_FIRST_VERSION),
                last_version: le::u64_at(e, SE_LAST_VERSION),
                first_position: Position(le::u64_at(e, SE_FIRST_POSITION)),
                last_position: Position(le::u64_at(e, SE_LAST_POSITION)),
                first_record_time: Timestamp(le::u64_at(e, SE_FIRST_RECORD_TIME)),
            }
        })
    }

    /// Every stream's summary with its `prev_segment` link, in table order.
    pub fn stream_links(&self) -> impl Iterator<Item = (StreamSummary, Option<SegmentSeq>)> + '_ {
        self.stream_summaries().enumerate().map(|(i, s)| {
            let prev = le::u64_at(self.stream_entry(i), SE_PREV_SEGMENT);
            (s, (prev != u64::MAX).then_some(SegmentSeq(prev)))
        })
    }

    /// Offset and position of the nearest sampled record at or before `position`.
    #[must_use]
    pub fn locate(&self, position: Position) -> Option<(Position, u64)> {
        let b = self.b();
        locate_in(
            self.base_position,
            self.record_count,
            self.sparse_count,
            |i| {
                let at = self.sparse_at + i * SPARSE_ENTRY_LEN;
                (le::u32_at(b, at), le::u32_at(b, at + 4))
            },
            position,
        )
    }

    /// The id of the `i`th record of the segment.
    ///
    /// # Panics
    /// If `i` is not below the record count.
    #[must_use]
    pub fn event_id(&self, i: u64) -> EventId {
        assert!(i < self.record_count, "record {i} outside index");
        EventId(le::array_at(
            self.b(),
            self.ids_at + i as usize * EVENT_ID_LEN,
        ))
    }

    /// Rebuilds the in-memory index from this sidecar, so that a segment that was active at
    /// a clean close can go on being written. `key_of` maps a stream name to the log's key
    /// for it and the previous segment holding it.
    pub fn to_active(
        &self,
        mut key_of: impl FnMut(&str) -> (StreamKey, Arc<str>, u64),
    ) -> ActiveIndex {
        let mut active = ActiveIndex::new(self.seq, self.base_position);
        let b = self.b();
        for i in 0..self.sparse_count {
            let at = self.sparse_at + i * SPARSE_ENTRY_LEN;
            active
                .sparse
                .push((le::u32_at(b, at), le::u32_at(b, at + 4)));
        }
        active.ids = (0..self.record_count).map(|i| self.event_id(i)).collect();
        active.last_record_time = self.last_record_time;
        for i in 0..self.stream_count {
            let run = self.run(i);
            let e = self.stream_entry(i);
            let name = self.name_of(i).unwrap_or_default();
            let (key, name, hash) = key_of(name);
            let entries = (0..run.entries_count)
                .map(|j| self.run_entry(&run, j))
                .collect();
            active.streams.insert(
                key,
                StreamRun {
                    name,
                    hash,
                    prev_segment: run.prev_segment,
                    first_record_time: Timestamp(le::u64_at(e, SE_FIRST_RECORD_TIME)),
                    entries,
                },
            );
        }
        active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build() -> (ActiveIndex, Vec<u8>) {
        let mut idx = ActiveIndex::new(SegmentSeq(3), Position(100));
        let names: Vec<Arc<str>> = ["trade-1", "trade-2", "trade-3"].map(Arc::from).to_vec();
        let mut versions = [5u64, 0, 0];
        for i in 0..100u64 {
            let s = (i % 3) as usize;
            idx.push(
                StreamKey(s as u32),
                &names[s],
                stream_hash(&names[s]),
                (s == 0).then_some(SegmentSeq(1)),
                versions[s],
                Position(100 + i),
                4096 + i * 400,
                Timestamp(1000 + i),
                EventId([i as u8; 16]),
            );
            versions[s] += 1;
        }
        let info = IndexFileInfo {
            log_id: [1; 16],
            data_end: 4096 + 100 * 400,
            last_chain_hash: [4; 32],
        };
        let bytes = idx.encode(&info, true);
        (idx, bytes)
    }

    fn open(bytes: Vec<u8>) -> Result<SealedIndex, IndexError> {
        SealedIndex::open(Arc::new(bytes))
    }

    #[test]
    fn sealed_index_answers_like_the_active_one() {
        let (active, bytes) = build();
        let sealed = open(bytes).unwrap();
        assert_eq!(sealed.seq(), SegmentSeq(3));
        assert_eq!(sealed.record_count(), 100);
        assert!(sealed.is_complete());
        assert_eq!(sealed.last_chain_hash(), [4; 32]);
        assert_eq!(sealed.last_record_time(), Timestamp(1099));
        for (key, name) in [(0u32, "trade-1"), (1, "trade-2"), (2, "trade-3")] {
            let a = active.stream_run(StreamKey(key)).unwrap();
            let s = sealed.find_stream(stream_hash(name), name).unwrap();
            assert_eq!(s.first_version, a.entries[0].version);
            assert_eq!(s.prev_segment, a.prev_segment);
            let from_sealed: Vec<IndexEntry> = (0..a.entries.len() as u32)
                .map(|i| sealed.run_entry(&s, i))
                .collect();
            assert_eq!(from_sealed, a.entries);
        }
        assert_eq!(sealed.find_stream(stream_hash("trade-4"), "trade-4"), None);
        assert_eq!(
            sealed.find_stream(stream_hash("trade-1"), "trade-2"),
            None,
            "hash and name"
        );
        for p in [100u64, 101, 131, 132, 133, 199] {
            assert_eq!(
                sealed.locate(Position(p)),
                active.locate(Position(p)),
                "position {p}"
            );
        }
        let (pos, off) = sealed.locate(Position(133)).unwrap();
        assert_eq!((pos, off), (Position(132), 4096 + 32 * 400));
        assert_eq!(sealed.locate(Position(99)), None);
        assert_eq!(sealed.locate(Position(200)), None);
        assert_eq!(sealed.event_id(7), EventId([7; 16]));
        let summaries: Vec<StreamSummary> = sealed.stream_summaries().collect();
        let t1 = summaries.iter().find(|s| s.name == "trade-1").unwrap();
        assert_eq!((t1.first_version, t1.last_version), (5, 38));
        assert_eq!(
            (t1.first_position, t1.last_position),
            (Position(100), Position(199))
        );
    }

    #[test]
    fn to_active_round_trips() {
        let (active, bytes) = build();
        let sealed = open(bytes.clone()).unwrap();
        let names: Vec<Arc<str>> = ["trade-1", "trade-2", "trade-3"].map(Arc::from).to_vec();
        let back = sealed.to_active(|n| {
            let k = names.iter().position(|x| &**x == n).unwrap();
            (StreamKey(k as u32), Arc::clone(&names[k]), stream_hash(n))
        });
        let info = IndexFileInfo {
            log_id: [1; 16],
            data_end: 4096 + 100 * 400,
            last_chain_hash: [4; 32],
        };
        assert_eq!(back.encode(&info, true), bytes);
        assert_eq!(back.next_position(), active.next_position());
    }

    #[test]
    fn every_corruption_is_refused_without_panicking() {
        let (_, bytes) = build();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(open(b).is_err(), "flip at byte {i} accepted");
        }
        for len in [0, 10, 127, 128, 500, bytes.len() - 1] {
            assert!(
                open(bytes[..len].to_vec()).is_err(),
                "truncation to {len} accepted"
            );
        }
    }

    #[test]
    fn structural_lies_with_a_valid_crc_are_refused() {
        let (_, bytes) = build();
        let reseal = |mut b: Vec<u8>| {
            let end = b.len() - 4;
            let crc = crc32fast::hash(&b[..end]);
            b[end..].copy_from_slice(&crc.to_le_bytes());
            b
        };
        // An entry count that runs past the event section.
        let mut b = bytes.clone();
        le::put_u32(&mut b, INDEX_HEADER_LEN + SE_ENTRIES_COUNT, 1000);
        assert!(matches!(
            open(reseal(b)),
            Err(IndexError::OutOfBounds { .. })
        ));
        // A name that runs past the names blob.
        let mut b = bytes.clone();
        le::put_u16(&mut b, INDEX_HEADER_LEN + SE_NAME_LEN, 999);
        assert!(matches!(
            open(reseal(b)),
            Err(IndexError::OutOfBounds { .. })
        ));
        // A record count that disagrees with the file size.
        let mut b = bytes.clone();
        le::put_u64(&mut b, IH_RECORD_COUNT, u64::MAX);
        assert!(matches!(
            open(reseal(b)),
            Err(IndexError::Decode(DecodeError::LengthMismatch { .. }))
        ));
        // A wrong sparse interval.
        let mut b = bytes;
        le::put_u32(&mut b, IH_SPARSE_EVERY, 7);
        assert!(matches!(
            open(reseal(b)),
            Err(IndexError::Decode(DecodeError::Invalid { .. }))
        ));
    }
}
