//! An attacker's toolkit, for the attacker suite (`tests/tests/attacks.rs`): what someone
//! with write access to a data directory, the public format documents and no signing key
//! can do to it. Every forgery leaves a directory that is consistent as FORMAT.md describes
//! (checksums, chain, footers, sidecars, snapshot, node file), because the records after the
//! cut are written by the engine itself, under a key the attacker made: the only thing the
//! attacker cannot produce is a signature by the log's key (or a witness's).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tally_engine::format::checkpoint::entry_len;
use tally_engine::format::record::RecordHeader;
use tally_engine::format::segment::SegmentHeader;
use tally_engine::format::{PAGE_BYTES, SEGMENT_DATA_START};
use tally_engine::{AppendRequest, EventData, Log, Options};

/// The segment files of a data directory, oldest first, with their headers.
#[must_use]
pub fn segments(dir: &Path) -> Vec<(PathBuf, SegmentHeader)> {
    let mut out: Vec<(PathBuf, SegmentHeader)> = std::fs::read_dir(dir)
        .expect("list the data directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .filter_map(|p| {
            let mut page = vec![0u8; PAGE_BYTES as usize];
            File::open(&p).ok()?.read_exact_at(&mut page, 0).ok()?;
            let h = SegmentHeader::decode_page(&page).ok()?;
            Some((p, h))
        })
        .collect();
    out.sort_by_key(|(_, h)| h.seq);
    out
}

/// Where each record of a segment starts: `(position, file offset)`, in order.
#[must_use]
pub fn record_offsets(path: &Path, header: &SegmentHeader) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut at = SEGMENT_DATA_START;
    let len = header.layout.header_len();
    while at + len as u64 <= header.data_limit() {
        let Ok(h) = RecordHeader::decode_in(&bytes[at as usize..at as usize + len], header.layout)
        else {
            break;
        };
        out.push((h.position.0, at));
        at += h.record_len();
    }
    out
}

/// Rolls the log back so that it ends just before `position`: zeroes that record and
/// everything after it in its segment (and the segment's footer page, unsealing it),
/// deletes every later segment, and every sidecar and snapshot that describes removed
/// records. The checkpoints file is left as it is.
pub fn truncate_at(dir: &Path, position: u64) {
    let segs = segments(dir);
    let mut cut = None;
    for (i, (path, h)) in segs.iter().enumerate() {
        if let Some(&(_, offset)) = record_offsets(path, h).iter().find(|(p, _)| *p == position) {
            cut = Some((i, offset));
            break;
        }
        if h.base_position.0 == position {
            cut = Some((i, SEGMENT_DATA_START));
            break;
        }
    }
    let (i, offset) = cut.unwrap_or_else(|| panic!("no record at position {position}"));
    let (path, h) = &segs[i];
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open segment");
    let zeros = vec![0u8; (h.capacity - offset) as usize];
    f.write_all_at(&zeros, offset).expect("zero the tail");
    f.sync_all().expect("sync segment");
    for (p, _) in &segs[i + 1..] {
        std::fs::remove_file(p).expect("remove segment");
    }
    for (p, h) in &segs[i..] {
        for ext in ["idx", "adx"] {
            let _ = std::fs::remove_file(dir.join(format!("{:020}.{ext}", h.seq.0)));
        }
        let _ = p;
    }
    let _ = std::fs::remove_file(dir.join("streams.snap"));
}

/// Bytes of an entry of the directory's `tally.checkpoints` (by its format version).
#[must_use]
pub fn checkpoint_entry_len(dir: &Path) -> usize {
    let meta = std::fs::read(dir.join("tally.meta")).expect("read tally.meta");
    let meta = tally_engine::format::meta::LogMeta::decode(&meta).expect("tally.meta");
    entry_len(meta.layout.version())
}

/// Cuts `tally.checkpoints` down to its first `keep` entries.
pub fn keep_checkpoints(dir: &Path, keep: usize) {
    let entry = checkpoint_entry_len(dir);
    let path = dir.join(tally_engine::CHECKPOINTS_FILE);
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open checkpoints");
    f.set_len((keep * entry) as u64)
        .expect("truncate checkpoints");
}

/// How many entries `tally.checkpoints` holds, and the tree size of each.
#[must_use]
pub fn checkpoint_sizes(dir: &Path) -> Vec<u64> {
    let bytes = std::fs::read(dir.join(tally_engine::CHECKPOINTS_FILE)).unwrap_or_default();
    bytes
        .chunks_exact(checkpoint_entry_len(dir))
        .map(|e| {
            tally_engine::format::checkpoint::SignedCheckpoint::decode_entry(e)
                .expect("checkpoint entry")
                .statement
                .tree_size
        })
        .collect()
}

/// Appends `events` (one batch each, with their streams) through the engine under a key
/// the attacker made, as a forger would to make the directory consistent again: records,
/// chain, footers, sidecars, snapshot and node file are all the engine's own. No
/// checkpoint is written.
pub fn regrow(dir: &Path, attacker_key: &Path, events: &[(&str, EventData)]) {
    if !attacker_key.exists() {
        tally_engine::create_signing_key(attacker_key).expect("attacker key");
    }
    let log = Log::open(
        dir,
        Options {
            create: false,
            signing_key: Some(attacker_key.to_owned()),
            auto_checkpoints: false,
            segment_bytes: segment_bytes(dir),
            ..Options::default()
        },
    )
    .expect("the forged directory opens");
    for (stream, e) in events {
        log.append_multi(&[AppendRequest {
            stream,
            expected: tally_engine::ExpectedVersion::Any,
            events: std::slice::from_ref(e),
        }])
        .expect("forged append");
    }
    log.close().expect("close the forged log");
}

/// The segment size the directory was made with.
#[must_use]
pub fn segment_bytes(dir: &Path) -> u64 {
    segments(dir)
        .first()
        .map_or(tally_engine::format::SEGMENT_BYTES_MIN, |(_, h)| h.capacity)
}

/// Holds `tally.lock` as a live writer (a running tallyd) does, until dropped.
#[must_use]
pub fn hold_lock(dir: &Path) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("tally.lock"))
        .expect("open lock file");
    f.try_lock().expect("take the lock");
    f
}

/// Copies a data directory (files only).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create copy");
    for e in std::fs::read_dir(from).expect("list") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy file");
        }
    }
}

/// Edits the header of the record at `position`, which must be in the newest segment (the
/// unsealed tail), and re-chains it and every record after it in that segment, as a forger
/// who rewrites the tail does: checksums and chain stay consistent.
pub fn edit_tail_record(dir: &Path, position: u64, edit: impl FnOnce(&mut RecordHeader)) {
    use tally_engine::format::chain::{body_hash, chain_step};
    use tally_engine::format::record::{RECORD_HEADER_MAX, set_chain_hash};
    let segs = segments(dir);
    let (path, h) = segs.last().expect("a segment");
    let offsets = record_offsets(path, h);
    let first = offsets
        .iter()
        .position(|(p, _)| *p == position)
        .expect("the record is in the newest segment");
    let mut bytes = std::fs::read(path).expect("read segment");
    let len = h.layout.header_len();
    let mut prev = if first == 0 {
        h.prev_chain_hash
    } else {
        let at = offsets[first - 1].1 as usize;
        RecordHeader::decode_in(&bytes[at..at + len], h.layout)
            .expect("header")
            .chain_hash
    };
    let mut edit = Some(edit);
    for &(_, at) in &offsets[first..] {
        let at = at as usize;
        let mut header = RecordHeader::decode_in(&bytes[at..at + len], h.layout).expect("header");
        if let Some(f) = edit.take() {
            f(&mut header);
        }
        let body = bytes[at + len..at + len + header.body_len as usize].to_vec();
        let mut hb = [0u8; RECORD_HEADER_MAX];
        header.encode_into(&mut hb);
        header.chain_hash = chain_step(&prev, &hb, &body_hash(&body));
        set_chain_hash(&mut hb, h.layout, &header.chain_hash);
        bytes[at..at + len].copy_from_slice(&hb[..len]);
        prev = header.chain_hash;
    }
    std::fs::write(path, &bytes).expect("write segment");
    // The clean-close sidecar of the active segment describes the old bytes.
    let _ = std::fs::remove_file(dir.join(h.seq.index_file_name()));
    let _ = std::fs::remove_file(dir.join("streams.snap"));
}

/// Appends records to the tail by hand, as a forger with write access but no producer key
/// would: each `(stream, body)` becomes one single-record batch (or, with `signed_block`,
/// the bodies form one batch whose first record carries that producer block, as copied
/// from a real signed batch), with positions, versions, `stream_prev`, record time and chain
/// continuing the log. The log must be of format version 2 and closed.
pub fn append_raw(dir: &Path, records: &[(String, Vec<u8>)], signed_block: Option<&[u8]>) {
    use tally_engine::format::chain::{body_hash, chain_step};
    use tally_engine::format::producer::PRODUCER_BLOCK_LEN;
    use tally_engine::format::record::{
        NO_STREAM_PREV, RECORD_HEADER_MAX, RecordKind, flags, set_chain_hash,
    };
    use tally_engine::{Position, Timestamp};
    let log = Log::open(
        dir,
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .expect("open read-only");
    let mut heads: std::collections::HashMap<String, (u64, u64)> = Default::default();
    let mut next = log.next_position().0;
    let last = log
        .read_all(Position(u64::MAX), 1, tally_engine::Direction::Backward)
        .expect("read last");
    let mut time = last.first().map_or(Timestamp(0), |e| e.record_time).0 + 1;
    let mut chain = last.first().expect("a record").record_hash;
    for (stream, _) in records {
        if let Some(i) = log.stream_info(stream).expect("stream info") {
            heads
                .entry(stream.clone())
                .or_insert((i.last_version, i.last_position.0));
        }
    }
    drop(log);
    let segs = segments(dir);
    let (path, h) = segs.last().expect("a segment");
    // The record header of version 2 is also version 3's.
    assert!(h.layout.links_stream_prev(), "{:?}", h.layout);
    let layout = h.layout;
    let end = record_offsets(path, h)
        .last()
        .map_or(SEGMENT_DATA_START, |&(_, at)| {
            let bytes = std::fs::read(path).expect("read");
            let hd = RecordHeader::decode_in(&bytes[at as usize..], h.layout).expect("header");
            at + hd.record_len()
        });
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open segment");
    let mut at = end;
    let n = records.len();
    for (i, (stream, envelope)) in records.iter().enumerate() {
        let mut body = Vec::new();
        let mut fl = 0;
        let batch = signed_block.is_some();
        if !batch || i == 0 {
            fl |= flags::BATCH_START;
        }
        if !batch || i + 1 == n {
            fl |= flags::BATCH_END;
        }
        if let (Some(block), 0) = (signed_block, i) {
            assert_eq!(block.len(), PRODUCER_BLOCK_LEN);
            body.extend_from_slice(block);
            fl |= flags::PRODUCER_SIGNED;
        }
        body.extend_from_slice(envelope);
        let (version, prev) = match heads.get(stream) {
            Some(&(v, p)) => (v + 1, p),
            None => (0, NO_STREAM_PREV),
        };
        heads.insert(stream.clone(), (version, next));
        let mut header = RecordHeader {
            layout,
            body_len: body.len() as u32,
            body_crc: crc32fast::hash(&body),
            durable_lag: 0,
            position: Position(next),
            stream_version: version,
            stream_prev: prev,
            record_time: Timestamp(time),
            flags: fl,
            kind: RecordKind::Event,
            chain_hash: [0; 32],
            body_form: tally_engine::format::record::BodyForm::Envelope,
        };
        let mut hb = [0u8; RECORD_HEADER_MAX];
        header.encode_into(&mut hb);
        header.chain_hash = chain_step(&chain, &hb, &body_hash(&body));
        set_chain_hash(&mut hb, layout, &header.chain_hash);
        chain = header.chain_hash;
        let mut rec = hb[..layout.header_len()].to_vec();
        rec.extend_from_slice(&body);
        rec.resize(header.record_len() as usize, 0);
        f.write_all_at(&rec, at).expect("write record");
        at += rec.len() as u64;
        next += 1;
        if !batch {
            time += 1;
        }
    }
    f.sync_all().expect("sync");
    let _ = std::fs::remove_file(dir.join(h.seq.index_file_name()));
    let _ = std::fs::remove_file(dir.join("streams.snap"));
}
