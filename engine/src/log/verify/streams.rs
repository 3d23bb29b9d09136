//! Verify's view of the streams: what each segment's records say about them, joined in log
//! order into the stream table the records give, so that the derived files that describe
//! streams (the `prev_segment` links of the index sidecars and `streams.snap`) are checked
//! against the records and never trusted.

use std::collections::HashMap;
use std::path::Path;

use super::super::background::corrupt;
use super::super::streams::{SnapshotCover, SnapshotEntry};
use crate::error::{Error, Result};
use crate::format::heads::{HeadKey, stream_key};
use crate::format::{Position, SegmentSeq, Timestamp};

/// Hashes a stream key (itself a BLAKE3 hash) for the tables here: its first 16 bytes,
/// with a seed drawn once per process, through the SplitMix64 finaliser. A key's bits are
/// uniform, and the seed keeps a client who grinds stream names from choosing collisions
/// in a table; SipHash over 32 bytes costs several times as much per lookup.
#[derive(Clone, Copy)]
pub(super) struct KeyHashing(u64);

impl Default for KeyHashing {
    fn default() -> KeyHashing {
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        KeyHashing(*SEED.get_or_init(|| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(0x0074_616c_6c79_u64)
        }))
    }
}

impl std::hash::BuildHasher for KeyHashing {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

/// See [`KeyHashing`].
pub(super) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(2) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(b)).rotate_left(29);
        }
    }

    fn write_usize(&mut self, _: usize) {
        // The length prefix of a key: always 32.
    }
}

/// A table keyed by stream key.
pub(super) type KeyMap<V> = HashMap<HeadKey, V, KeyHashing>;

/// One stream's part of one segment, as its records give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SegStream {
    pub(super) name: String,
    /// `BLAKE3(name)`: the stream's key in the heads map, and in the tables here.
    pub(super) key: HeadKey,
    pub(super) first_version: u64,
    pub(super) last_version: u64,
    pub(super) first_position: Position,
    pub(super) last_position: Position,
    pub(super) first_record_time: Timestamp,
    /// What the segment's index sidecar says of the stream's previous segment; `None` when
    /// the segment's streams were read from its records (no sidecar).
    pub(super) link: Option<Option<SegmentSeq>>,
    /// Format version 2: the `stream_prev` of the stream's first record in the segment (the
    /// others were checked against the record before them in the segment).
    pub(super) first_stream_prev: Option<u64>,
}

/// The streams of a run of records, built record by record (for a segment without a
/// sidecar, and for the part of a segment before the snapshot's end).
#[derive(Default)]
pub(super) struct SegStreams {
    list: Vec<SegStream>,
    by_key: KeyMap<usize>,
    last: Option<usize>,
}

impl SegStreams {
    /// Adds the next record. A version that does not follow the stream's previous one in
    /// this run is an error: versions are dense.
    pub(super) fn push(
        &mut self,
        stream: &str,
        key: HeadKey,
        version: u64,
        position: Position,
        record_time: Timestamp,
        stream_prev: Option<u64>,
    ) -> std::result::Result<(), String> {
        let i = match self.last.filter(|&i| self.list[i].key == key) {
            Some(i) => i,
            None => match self.by_key.get(&key) {
                Some(&i) => i,
                None => {
                    self.list.push(SegStream {
                        name: stream.to_owned(),
                        key,
                        first_version: version,
                        last_version: version,
                        first_position: position,
                        last_position: position,
                        first_record_time: record_time,
                        link: None,
                        first_stream_prev: stream_prev,
                    });
                    let i = self.list.len() - 1;
                    self.by_key.insert(key, i);
                    self.last = Some(i);
                    return Ok(());
                }
            },
        };
        self.last = Some(i);
        let s = &mut self.list[i];
        if version != s.last_version.wrapping_add(1) {
            return Err(format!(
                "stream {stream} has version {version} after version {} (versions are dense)",
                s.last_version
            ));
        }
        if let Some(prev) = stream_prev
            && prev != s.last_position.0
        {
            return Err(format!(
                "stream {stream} version {version} names position {prev} as its previous event, but that is at position {}",
                s.last_position
            ));
        }
        s.last_version = version;
        s.last_position = position;
        Ok(())
    }

    pub(super) fn into_list(self) -> Vec<SegStream> {
        self.list
    }
}

/// Where a stream stands after the records joined so far.
#[derive(Clone, Copy, Debug)]
struct Joined {
    first_position: Position,
    created: Timestamp,
    last_version: u64,
    last_position: Position,
    last_segment: SegmentSeq,
}

/// The stream table the records give, joined segment by segment in log order.
#[derive(Default)]
pub(super) struct StreamJoin {
    table: KeyMap<Joined>,
    /// Stream links checked (one per stream per segment).
    pub(super) links: u64,
}

impl StreamJoin {
    /// Joins one segment's streams, checking that each continues the stream where the
    /// records before left it, and that the index sidecar's link names the segment that
    /// holds the stream's previous event.
    pub(super) fn join(
        &mut self,
        seq: SegmentSeq,
        seg_path: &Path,
        idx_path: &Path,
        streams: &[SegStream],
    ) -> Result<()> {
        for s in streams {
            let prev = self.table.get(&s.key);
            let expected_version = prev.map_or(0, |p| p.last_version + 1);
            if s.first_version != expected_version {
                return Err(corrupt(
                    seg_path,
                    0,
                    Some(s.first_position.0),
                    format!(
                        "stream {} continues at version {} in segment {seq}, but its previous event is version {} (versions are dense)",
                        s.name,
                        s.first_version,
                        prev.map_or_else(|| "none".to_owned(), |p| p.last_version.to_string()),
                    ),
                    None,
                ));
            }
            if let Some(first_prev) = s.first_stream_prev {
                let wanted =
                    prev.map_or(crate::format::record::NO_STREAM_PREV, |p| p.last_position.0);
                if first_prev != wanted {
                    return Err(corrupt(
                        seg_path,
                        0,
                        Some(s.first_position.0),
                        format!(
                            "stream {} version {} names position {first_prev} as its previous event, but the records put it at {}",
                            s.name,
                            s.first_version,
                            prev.map_or_else(
                                || "none (version 0)".to_owned(),
                                |p| p.last_position.to_string()
                            )
                        ),
                        None,
                    ));
                }
            }
            if let Some(link) = s.link {
                self.links += 1;
                let wanted = prev.map(|p| p.last_segment);
                if link != wanted {
                    let show = |l: Option<SegmentSeq>| {
                        l.map_or_else(|| "none".to_owned(), |s| s.0.to_string())
                    };
                    return Err(corrupt(
                        idx_path,
                        0,
                        Some(s.first_position.0),
                        format!(
                            "the index links stream {} to previous segment {}, but the records put its previous event in segment {}: a wrong link hides events from stream reads",
                            s.name,
                            show(link),
                            show(wanted)
                        ),
                        None,
                    ));
                }
            }
            let entry = self.table.entry(s.key).or_insert(Joined {
                first_position: s.first_position,
                created: s.first_record_time,
                last_version: 0,
                last_position: s.first_position,
                last_segment: seq,
            });
            entry.last_version = s.last_version;
            entry.last_position = s.last_position;
            entry.last_segment = seq;
        }
        Ok(())
    }

    /// Compares a stream snapshot with the table the records give at its end: the table
    /// joined so far, plus `partial` (the streams of the records of segment `seq` before the
    /// snapshot's end, when it ends inside a segment).
    pub(super) fn check_snapshot(
        &self,
        path: &Path,
        cover: &SnapshotCover,
        entries: &[SnapshotEntry],
        partial: Option<(SegmentSeq, &[SegStream])>,
    ) -> Result<()> {
        let fail = |detail: String| corrupt(path, 0, Some(cover.next_position.0), detail, None);
        let overlay: KeyMap<Joined> = partial
            .map(|(seq, list)| {
                list.iter()
                    .map(|s| {
                        let before = self.table.get(&s.key);
                        (
                            s.key,
                            Joined {
                                first_position: before
                                    .map_or(s.first_position, |b| b.first_position),
                                created: before.map_or(s.first_record_time, |b| b.created),
                                last_version: s.last_version,
                                last_position: s.last_position,
                                last_segment: seq,
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let total = self.table.len()
            + overlay
                .keys()
                .filter(|k| !self.table.contains_key(*k))
                .count();
        for e in entries {
            let key = stream_key(e.name.as_bytes());
            let Some(j) = overlay.get(&key).or_else(|| self.table.get(&key)) else {
                return Err(fail(format!(
                    "the stream snapshot names stream {}, which has no event before position {}",
                    e.name, cover.next_position
                )));
            };
            let found = (
                e.first_position,
                e.created,
                e.last_version,
                e.last_position,
                e.last_segment,
            );
            let want = (
                j.first_position,
                j.created,
                j.last_version,
                j.last_position,
                j.last_segment,
            );
            if found != want {
                return Err(fail(format!(
                    "the stream snapshot says stream {} has last version {} at position {} in segment {} (first position {}, created {}), but the records give last version {} at position {} in segment {} (first position {}, created {})",
                    e.name,
                    e.last_version,
                    e.last_position,
                    e.last_segment.0,
                    e.first_position,
                    e.created.0,
                    j.last_version,
                    j.last_position,
                    j.last_segment.0,
                    j.first_position,
                    j.created.0
                )));
            }
        }
        if entries.len() != total {
            return Err(fail(format!(
                "the stream snapshot holds {} streams, but the records before position {} have {total}: a stream left out of the snapshot is hidden from reads",
                entries.len(),
                cover.next_position
            )));
        }
        Ok(())
    }
}

/// Reads `streams.snap` for verify: `Ok(None)` when there is none, an error (a finding)
/// when it does not decode or names another log.
pub(super) fn read_snapshot(
    fs: &crate::Storage,
    dir: &Path,
    log_id: &[u8; 16],
) -> Result<Option<(SnapshotCover, Vec<SnapshotEntry>)>> {
    let path = dir.join(super::super::streams::SNAPSHOT_FILE);
    let bytes = match fs.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading stream snapshot", &path)(e)),
    };
    let (id, cover, entries) = super::super::streams::decode_snapshot(&bytes)
        .map_err(|e| corrupt(&path, 0, None, "stream snapshot".into(), Some(e)))?;
    if id != *log_id {
        return Err(corrupt(
            &path,
            0,
            None,
            "the stream snapshot names another log".into(),
            None,
        ));
    }
    Ok(Some((cover, entries)))
}
