//! The stream table: for every stream, its last version and where it lives, in memory; and
//! its snapshot file `streams.snap` (docs/FORMAT.md, "Stream table snapshot"), which lets
//! `open` restore the table without reading every segment's index.
//!
//! Memory: per stream, one [`StreamState`] (72 bytes), the name once (shared by the map key
//! and the state through an `Arc<str>`: 16 bytes of counts plus the name), and one hash-map
//! slot (about 24 bytes plus control bytes at 7/8 load): about 130 bytes plus the name.

use std::collections::HashMap;
use std::sync::Arc;

use crate::format::{
    DecodeError, Position, STRUCTURE_VERSION, SegmentSeq, Timestamp, check_crc, check_magic,
    check_version, check_zero, le, need,
};
use crate::index::{StreamKey, StreamSummary, stream_hash};

/// What the log knows about one stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamState {
    pub(crate) name: Arc<str>,
    pub(crate) hash: u64,
    pub(crate) first_position: Position,
    pub(crate) created: Timestamp,
    pub(crate) last_version: u64,
    pub(crate) last_position: Position,
    /// The newest segment holding an event of the stream.
    pub(crate) last_segment: SegmentSeq,
}

/// Every stream of the log.
#[derive(Debug, Default)]
pub(crate) struct StreamTable {
    by_name: HashMap<Arc<str>, StreamKey>,
    states: Vec<StreamState>,
}

impl StreamTable {
    pub(crate) fn key(&self, name: &str) -> Option<StreamKey> {
        self.by_name.get(name).copied()
    }

    pub(crate) fn get(&self, key: StreamKey) -> &StreamState {
        &self.states[key.0 as usize]
    }

    pub(crate) fn get_mut(&mut self, key: StreamKey) -> &mut StreamState {
        &mut self.states[key.0 as usize]
    }

    pub(crate) fn len(&self) -> usize {
        self.states.len()
    }

    /// Every stream that has an event.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &StreamState> {
        self.states
            .iter()
            .filter(|s| s.first_position.0 != u64::MAX)
    }

    /// Adds a stream that has no events yet; its fields are set by the first event.
    pub(crate) fn insert_new(&mut self, name: &str, hash: u64) -> StreamKey {
        assert!(self.key(name).is_none(), "stream {name} inserted twice");
        let key = StreamKey(u32::try_from(self.states.len()).expect("fewer than 2^32 streams"));
        let name: Arc<str> = Arc::from(name);
        self.by_name.insert(Arc::clone(&name), key);
        self.states.push(StreamState {
            name,
            hash,
            first_position: Position(u64::MAX),
            created: Timestamp(0),
            last_version: 0,
            last_position: Position(0),
            last_segment: SegmentSeq(0),
        });
        key
    }

    /// The key of `name`, adding the stream if it is new.
    pub(crate) fn key_or_insert(&mut self, name: &str) -> StreamKey {
        match self.key(name) {
            Some(k) => k,
            None => self.insert_new(name, stream_hash(name)),
        }
    }

    /// Folds what one segment says about a stream into the table. Idempotent: applying the
    /// same summary twice, or an older one after a newer one, changes nothing.
    pub(crate) fn apply_summary(&mut self, seq: SegmentSeq, s: &StreamSummary) {
        let key = self.key_or_insert(&s.name);
        let st = self.get_mut(key);
        apply(
            st,
            seq,
            s.first_position,
            s.first_record_time,
            s.first_version,
            s.last_version,
            s.last_position,
        );
    }

    /// Folds one event into the table (idempotent like [`StreamTable::apply_summary`]).
    pub(crate) fn apply_event(
        &mut self,
        key: StreamKey,
        seq: SegmentSeq,
        position: Position,
        version: u64,
        record_time: Timestamp,
    ) {
        self.apply_events(
            key,
            seq,
            (position, version),
            (position, version),
            record_time,
        );
    }

    /// Folds a run of consecutive events of one stream, all written at `record_time`, given
    /// the `(position, version)` of the first and the last.
    pub(crate) fn apply_events(
        &mut self,
        key: StreamKey,
        seq: SegmentSeq,
        first: (Position, u64),
        last: (Position, u64),
        record_time: Timestamp,
    ) {
        let st = self.get_mut(key);
        apply(st, seq, first.0, record_time, first.1, last.1, last.0);
    }

    /// Encodes the snapshot of the whole table, covering the log up to `cover`.
    pub(crate) fn encode_snapshot(&self, log_id: [u8; 16], cover: &SnapshotCover) -> Vec<u8> {
        encode_snapshot(
            log_id,
            cover,
            self.states.iter().map(|s| SnapshotEntry {
                name: s.name.to_string(),
                first_position: s.first_position,
                created: s.created,
                last_version: s.last_version,
                last_position: s.last_position,
                last_segment: s.last_segment,
            }),
        )
    }

    /// Restores a table from snapshot entries.
    pub(crate) fn from_entries(entries: Vec<SnapshotEntry>) -> StreamTable {
        let mut t = StreamTable::default();
        for e in entries {
            let key = t.key_or_insert(&e.name);
            let st = t.get_mut(key);
            st.first_position = e.first_position;
            st.created = e.created;
            st.last_version = e.last_version;
            st.last_position = e.last_position;
            st.last_segment = e.last_segment;
        }
        t
    }
}

fn apply(
    st: &mut StreamState,
    seq: SegmentSeq,
    first_position: Position,
    first_time: Timestamp,
    first_version: u64,
    last_version: u64,
    last_position: Position,
) {
    // A stream inserted by `insert_new` has no event yet: its first position is the
    // sentinel u64::MAX, so any event replaces it.
    let fresh = st.first_position == Position(u64::MAX);
    if first_position < st.first_position {
        st.first_position = first_position;
        if first_version == 0 {
            st.created = first_time;
        }
    }
    if fresh || last_position > st.last_position {
        st.last_position = last_position;
        st.last_version = last_version;
    }
    if seq > st.last_segment {
        st.last_segment = seq;
    }
}

/// How far a snapshot covers the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SnapshotCover {
    /// The last segment covered (wholly if sealed, up to `data_end` if it was active).
    pub(crate) seq: SegmentSeq,
    /// File offset in that segment just past the last record covered.
    pub(crate) data_end: u64,
    /// The first position not covered.
    pub(crate) next_position: Position,
}

/// One stream in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotEntry {
    pub(crate) name: String,
    pub(crate) first_position: Position,
    pub(crate) created: Timestamp,
    pub(crate) last_version: u64,
    pub(crate) last_position: Position,
    pub(crate) last_segment: SegmentSeq,
}

/// File name of the snapshot.
pub(crate) use crate::format::files::SNAPSHOT_FILE;
/// Magic of the snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"TALLYSNP";
/// Bytes of the snapshot header.
pub const SNAPSHOT_HEADER_LEN: usize = 64;
/// Bytes of the fixed part of each entry (the name follows).
pub const SNAPSHOT_ENTRY_LEN: usize = 56;

// Header offsets.
/// `format_version`.
pub const SN_VERSION: usize = 8;
/// `header_len`.
pub const SN_HEADER_LEN: usize = 10;
/// 4 reserved bytes.
pub const SN_RESERVED_A: usize = 12;
/// `log_id`.
pub const SN_LOG_ID: usize = 16;
/// `covered_seq`.
pub const SN_COVERED_SEQ: usize = 32;
/// `covered_data_end`.
pub const SN_COVERED_DATA_END: usize = 40;
/// `next_position`.
pub const SN_NEXT_POSITION: usize = 48;
/// `stream_count`.
pub const SN_STREAM_COUNT: usize = 56;
const _: () = assert!(SN_STREAM_COUNT + 8 == SNAPSHOT_HEADER_LEN);

// Entry offsets.
/// `first_position`.
pub const SNE_FIRST_POSITION: usize = 0;
/// `created_time`.
pub const SNE_CREATED: usize = 8;
/// `last_version`.
pub const SNE_LAST_VERSION: usize = 16;
/// `last_position`.
pub const SNE_LAST_POSITION: usize = 24;
/// `last_segment`.
pub const SNE_LAST_SEGMENT: usize = 32;
/// `name_len`.
pub const SNE_NAME_LEN: usize = 40;
/// 14 reserved bytes.
pub const SNE_RESERVED: usize = 42;
const _: () = assert!(SNE_RESERVED + 14 == SNAPSHOT_ENTRY_LEN);

pub(crate) fn encode_snapshot(
    log_id: [u8; 16],
    cover: &SnapshotCover,
    entries: impl Iterator<Item = SnapshotEntry>,
) -> Vec<u8> {
    let mut out = vec![0u8; SNAPSHOT_HEADER_LEN];
    out[..8].copy_from_slice(SNAPSHOT_MAGIC);
    le::put_u16(&mut out, SN_VERSION, STRUCTURE_VERSION);
    le::put_u16(&mut out, SN_HEADER_LEN, SNAPSHOT_HEADER_LEN as u16);
    out[SN_LOG_ID..SN_LOG_ID + 16].copy_from_slice(&log_id);
    le::put_u64(&mut out, SN_COVERED_SEQ, cover.seq.0);
    le::put_u64(&mut out, SN_COVERED_DATA_END, cover.data_end);
    le::put_u64(&mut out, SN_NEXT_POSITION, cover.next_position.0);
    let mut count = 0u64;
    for e in entries {
        let mut fixed = [0u8; SNAPSHOT_ENTRY_LEN];
        le::put_u64(&mut fixed, SNE_FIRST_POSITION, e.first_position.0);
        le::put_u64(&mut fixed, SNE_CREATED, e.created.0);
        le::put_u64(&mut fixed, SNE_LAST_VERSION, e.last_version);
        le::put_u64(&mut fixed, SNE_LAST_POSITION, e.last_position.0);
        le::put_u64(&mut fixed, SNE_LAST_SEGMENT, e.last_segment.0);
        le::put_u16(&mut fixed, SNE_NAME_LEN, e.name.len() as u16);
        out.extend_from_slice(&fixed);
        out.extend_from_slice(e.name.as_bytes());
        count += 1;
    }
    le::put_u64(&mut out, SN_STREAM_COUNT, count);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a snapshot file: its log id, coverage, and entries.
pub(crate) fn decode_snapshot(
    b: &[u8],
) -> Result<([u8; 16], SnapshotCover, Vec<SnapshotEntry>), DecodeError> {
    need(b, SNAPSHOT_HEADER_LEN + 4)?;
    check_magic(b, SNAPSHOT_MAGIC, "TALLYSNP")?;
    let body_end = b.len() - 4;
    check_crc(le::u32_at(b, body_end), &b[..body_end], "stream snapshot")?;
    check_version(le::u16_at(b, SN_VERSION), "stream snapshot")?;
    if le::u16_at(b, SN_HEADER_LEN) as usize != SNAPSHOT_HEADER_LEN {
        return Err(DecodeError::Invalid {
            what: "snapshot header_len",
            detail: le::u16_at(b, SN_HEADER_LEN).to_string(),
        });
    }
    check_zero(b, SN_RESERVED_A..SN_RESERVED_A + 4, "stream snapshot")?;
    let cover = SnapshotCover {
        seq: SegmentSeq(le::u64_at(b, SN_COVERED_SEQ)),
        data_end: le::u64_at(b, SN_COVERED_DATA_END),
        next_position: Position(le::u64_at(b, SN_NEXT_POSITION)),
    };
    let count = le::u64_at(b, SN_STREAM_COUNT);
    // Each entry takes at least its fixed part, so the count is bounded by the file size
    // before anything is allocated for it.
    let max = ((body_end - SNAPSHOT_HEADER_LEN) / SNAPSHOT_ENTRY_LEN) as u64;
    if count > max {
        return Err(DecodeError::LengthMismatch {
            what: "stream snapshot",
            declared: count,
            actual: max,
        });
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut names = std::collections::HashSet::with_capacity(count as usize);
    let mut at = SNAPSHOT_HEADER_LEN;
    for _ in 0..count {
        let fixed = b
            .get(at..at + SNAPSHOT_ENTRY_LEN)
            .ok_or(DecodeError::Truncated {
                needed: (at + SNAPSHOT_ENTRY_LEN) as u64,
                have: body_end as u64,
            })?;
        check_zero(
            fixed,
            SNE_RESERVED..SNAPSHOT_ENTRY_LEN,
            "stream snapshot entry",
        )?;
        let name_len = le::u16_at(fixed, SNE_NAME_LEN) as usize;
        let name_at = at + SNAPSHOT_ENTRY_LEN;
        if name_at + name_len > body_end {
            return Err(DecodeError::Truncated {
                needed: (name_at + name_len) as u64,
                have: body_end as u64,
            });
        }
        let name = std::str::from_utf8(&b[name_at..name_at + name_len]).map_err(|_utf8| {
            DecodeError::NotUtf8 {
                what: "snapshot stream name",
            }
        })?;
        crate::format::envelope::check_stream_id(name)?;
        if !names.insert(name) {
            return Err(DecodeError::Invalid {
                what: "stream snapshot",
                detail: format!("stream {name} appears twice"),
            });
        }
        entries.push(SnapshotEntry {
            name: name.to_owned(),
            first_position: Position(le::u64_at(fixed, SNE_FIRST_POSITION)),
            created: Timestamp(le::u64_at(fixed, SNE_CREATED)),
            last_version: le::u64_at(fixed, SNE_LAST_VERSION),
            last_position: Position(le::u64_at(fixed, SNE_LAST_POSITION)),
            last_segment: SegmentSeq(le::u64_at(fixed, SNE_LAST_SEGMENT)),
        });
        at = name_at + name_len;
    }
    if at != body_end {
        return Err(DecodeError::LengthMismatch {
            what: "stream snapshot",
            declared: at as u64,
            actual: body_end as u64,
        });
    }
    Ok((le::array_at(b, SN_LOG_ID), cover, entries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> StreamTable {
        let mut t = StreamTable::default();
        let a = t.key_or_insert("trade-1");
        t.apply_event(a, SegmentSeq(0), Position(0), 0, Timestamp(10));
        t.apply_event(a, SegmentSeq(1), Position(5), 1, Timestamp(20));
        let b = t.key_or_insert("trade-2");
        t.apply_event(b, SegmentSeq(1), Position(6), 0, Timestamp(30));
        t
    }

    #[test]
    fn events_fold_into_state() {
        let t = table();
        let s = t.get(t.key("trade-1").unwrap());
        assert_eq!((s.first_position, s.created), (Position(0), Timestamp(10)));
        assert_eq!(
            (s.last_version, s.last_position, s.last_segment),
            (1, Position(5), SegmentSeq(1))
        );
    }

    #[test]
    fn folding_is_idempotent_and_order_independent() {
        let mut t = table();
        let a = t.key("trade-1").unwrap();
        t.apply_event(a, SegmentSeq(0), Position(0), 0, Timestamp(10));
        let s = t.get(a);
        assert_eq!(
            (s.last_version, s.last_position),
            (1, Position(5)),
            "older event ignored"
        );
        t.apply_summary(
            SegmentSeq(1),
            &StreamSummary {
                name: "trade-1".into(),
                first_version: 1,
                last_version: 1,
                first_position: Position(5),
                last_position: Position(5),
                first_record_time: Timestamp(20),
            },
        );
        let s = t.get(a);
        assert_eq!(
            (s.first_position, s.created, s.last_version),
            (Position(0), Timestamp(10), 1)
        );
    }

    #[test]
    fn snapshot_round_trips_and_rejects_damage() {
        let t = table();
        let cover = SnapshotCover {
            seq: SegmentSeq(1),
            data_end: 9000,
            next_position: Position(7),
        };
        let bytes = t.encode_snapshot([4; 16], &cover);
        let (id, c, entries) = decode_snapshot(&bytes).unwrap();
        assert_eq!((id, c), ([4; 16], cover));
        let back = StreamTable::from_entries(entries);
        assert_eq!(back.len(), 2);
        let s = back.get(back.key("trade-2").unwrap());
        assert_eq!(
            (s.first_position, s.last_segment, s.created),
            (Position(6), SegmentSeq(1), Timestamp(30))
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(decode_snapshot(&b).is_err(), "flip at {i} accepted");
        }
        for len in [0, 63, 64, bytes.len() - 1] {
            assert!(decode_snapshot(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn snapshot_with_a_huge_count_is_refused_before_allocating() {
        let t = table();
        let cover = SnapshotCover {
            seq: SegmentSeq(1),
            data_end: 9000,
            next_position: Position(7),
        };
        let mut b = t.encode_snapshot([4; 16], &cover);
        le::put_u64(&mut b, SN_STREAM_COUNT, u64::MAX);
        let end = b.len() - 4;
        let crc = crc32fast::hash(&b[..end]);
        b[end..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode_snapshot(&b),
            Err(DecodeError::LengthMismatch { .. })
        ));
    }
}
