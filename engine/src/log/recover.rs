//! Opening a log: the recovery rules of docs/FORMAT.md ("Recovery").
//!
//! 1. Lock the directory, read `tally.meta` (or create a new log).
//! 2. Read every segment's header and footer page with plain reads. Sealed segments must
//!    form a prefix, continue each other (positions and chain), and are trusted from their
//!    footers; their records are not read.
//! 3. Restore the stream table from `streams.snap` plus the stream tables of the sealed
//!    segments' sidecars written after it.
//! 4. Scan the unsealed segments (from the active segment's clean-close sidecar, if any):
//!    every record's checksums, position and chain. The log ends at the last complete
//!    batch. Damage after it is a torn tail (zeroed and reported) unless a later record
//!    says the log had been durable beyond the damage, which proves acknowledged data was
//!    lost: then open fails with [`Error::Corrupt`] (unless the recovery mode says to
//!    truncate anyway).
//! 5. Seal unsealed segments that are complete, make the last one active, rebuild the
//!    idempotency window, sync, and start the background threads.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};

use super::append::Writer;
use super::background::{
    corrupt, footer_from_records, load_index, prepare_spare, request_spare, sealed_index,
    start_threads, write_footer, write_sealed_index,
};
use super::ids::{IdSlot, IdWindow};
use super::shared::{CommitState, SegState, SegmentHandle, Shared, Spares, lock};
use super::streams::{SNAPSHOT_FILE, StreamTable, decode_snapshot};
use super::{Options, RecoveryMode, RecoveryReport, Truncation, now};
use crate::error::{Error, Result};
use crate::format::chain::chain_seed;
use crate::format::meta::LogMeta;
use crate::format::record::RecordHeader;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{
    EventId, Hash32, PAGE_BYTES, Position, SEGMENT_DATA_START, SegmentSeq, Timestamp,
};
use crate::index::{ActiveIndex, IndexFileInfo, SealedIndex, StreamKey, stream_hash};
use crate::segment::{
    FileSource, ScanEnd, ScanFrom, ScannedRecord, find_durable_evidence, is_zero, read_page, scan,
    zero_range,
};
use crate::sys::{SegmentMap, sync_dir};

const META_FILE: &str = "tally.meta";
const LOCK_FILE: &str = "tally.lock";

/// A segment file found on disk.
struct Found {
    seq: SegmentSeq,
    path: PathBuf,
    header: SegmentHeader,
    footer: Option<SegmentFooter>,
}

/// The log's end as recovery has established it so far.
#[derive(Clone, Copy)]
struct End {
    position: Position,
    chain: Hash32,
}

/// Builds an index from scanned records. `key_of` gives each stream's key, shared name,
/// hash, and the previous segment that holds it.
pub(crate) fn index_from_scan(
    seq: SegmentSeq,
    base: Position,
    records: &[ScannedRecord],
    mut key_of: impl FnMut(&str) -> (StreamKey, Arc<str>, u64, Option<SegmentSeq>),
) -> ActiveIndex {
    let mut index = ActiveIndex::new(seq, base);
    extend_index(&mut index, records, &mut key_of);
    index
}

fn extend_index(
    index: &mut ActiveIndex,
    records: &[ScannedRecord],
    key_of: &mut impl FnMut(&str) -> (StreamKey, Arc<str>, u64, Option<SegmentSeq>),
) {
    let mut cache: HashMap<&str, (StreamKey, Arc<str>, u64, Option<SegmentSeq>)> = HashMap::new();
    for r in records {
        let (key, name, hash, prev) = cache
            .entry(r.stream.as_str())
            .or_insert_with(|| key_of(&r.stream))
            .clone();
        index.push(
            key,
            &name,
            hash,
            prev,
            r.header.stream_version,
            r.header.position,
            r.offset,
            r.header.record_time,
            r.event_id,
        );
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(op, path)
}

pub(crate) fn open(dir: &Path, opts: Options) -> Result<(Arc<Shared>, RecoveryReport)> {
    opts.check()?;
    let read_only = opts.recovery == RecoveryMode::ReadOnly;
    if !dir.join(META_FILE).exists() && !(opts.create && !read_only) {
        return Err(Error::NotFound {
            dir: dir.to_owned(),
        });
    }
    if !read_only {
        std::fs::create_dir_all(dir).map_err(io("creating directory", dir))?;
    }
    let lock_file = if read_only {
        None
    } else {
        let path = dir.join(LOCK_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening lock file", &path))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    dir: dir.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Io {
                    op: "locking",
                    path,
                    source: e,
                });
            }
        }
        Some(f)
    };
    let meta = read_or_create_meta(dir, read_only)?;
    let seed = chain_seed(&meta.log_id);
    let mut report = RecoveryReport::default();

    let (found, spares) = list_segments(dir, &meta, &opts, read_only)?;
    check_sealed_prefix(&found, seed)?;

    let shared = Arc::new(Shared {
        dir: dir.to_owned(),
        opts: opts.clone(),
        meta,
        seed,
        read_only,
        writer: Mutex::new(None),
        commit: Mutex::new(CommitState::default()),
        commit_cv: Condvar::new(),
        flush_cv: Condvar::new(),
        visible: AtomicU64::new(0),
        durable: AtomicU64::new(0),
        tail_lock: Mutex::new(()),
        tail_cv: Condvar::new(),
        tail_waiters: AtomicUsize::new(0),
        segments: RwLock::new(Vec::new()),
        spares: Mutex::new(Spares {
            prepared: spares
                .iter()
                .map(|(s, _)| *s)
                .chain(found.iter().map(|f| f.seq))
                .max(),
            ready: spares,
            wanted: None,
            error: None,
        }),
        spares_cv: Condvar::new(),
        seal_tx: Mutex::new(None),
        sealing: Mutex::new(0),
        sealing_cv: Condvar::new(),
        shutdown: AtomicBool::new(false),
        abandon_seals: AtomicBool::new(false),
        threads: Mutex::new(Vec::new()),
        lock_file: Mutex::new(lock_file),
        closed: AtomicBool::new(false),
        rebuilt: Mutex::new(Vec::new()),
    });

    // Sealed segments: trusted from their footers.
    let first_unsealed = found
        .iter()
        .position(|f| f.footer.is_none())
        .unwrap_or(found.len());
    let mut end = End {
        position: Position(0),
        chain: seed,
    };
    {
        let mut segs = shared
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for f in &found[..first_unsealed] {
            let footer = f.footer.expect("sealed prefix");
            segs.push(Arc::new(SegmentHandle {
                seq: f.seq,
                path: f.path.clone(),
                header: f.header,
                map: OnceLock::new(),
                state: RwLock::new(SegState::Sealed {
                    footer,
                    index: Arc::new(Mutex::new(None)),
                }),
            }));
            end = End {
                position: footer.last_position.next(),
                chain: footer.last_chain_hash,
            };
        }
    }

    // The stream table: snapshot, then the sidecars of sealed segments after it.
    let snapshot = std::fs::read(dir.join(SNAPSHOT_FILE))
        .ok()
        .and_then(|b| decode_snapshot(&b).ok())
        .filter(|(id, _, _)| *id == shared.meta.log_id);
    let (mut table, table_from) = match snapshot {
        Some((_, cover, entries)) => (StreamTable::from_entries(entries), Some(cover)),
        None => (StreamTable::default(), None),
    };
    let sealed: Vec<Arc<SegmentHandle>> = shared
        .segments
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for seg in &sealed {
        if table_from.is_some_and(|c| seg.seq < c.seq) {
            continue;
        }
        let (index, _) = sealed_index(&shared, seg)?.expect("sealed segments have an index");
        for s in index.stream_summaries() {
            table.apply_summary(seg.seq, &s);
        }
    }

    // Unsealed segments: scanned.
    let unsealed = &found[first_unsealed..];
    let mut kept: Vec<(SegmentHandle, ActiveIndex, u64, Hash32)> = Vec::new();
    for (j, f) in unsealed.iter().enumerate() {
        if f.header.base_position != end.position || f.header.prev_chain_hash != end.chain {
            return Err(corrupt(
                &f.path,
                0,
                Some(end.position.0),
                format!(
                    "segment does not continue the log: it starts at position {} (expected {})",
                    f.header.base_position, end.position
                ),
                None,
            ));
        }
        let (mut index, from, from_sidecar) = start_of_scan(&shared, f, &mut table);
        let file = File::open(&f.path).map_err(io("opening segment", &f.path))?;
        let mut src = FileSource::new(&file).map_err(io("reading segment", &f.path))?;
        let s = scan(&mut src, from, f.header.data_limit());
        report.records_scanned += s.records.len() as u64;
        let kept_records = &s.records[..s.complete];
        let seq = f.seq;
        extend_index(&mut index, kept_records, &mut |name: &str| {
            let key = table.key_or_insert(name);
            let st = table.get(key);
            let prev = (st.first_position.0 != u64::MAX && st.last_segment < seq)
                .then_some(st.last_segment);
            (key, Arc::clone(&st.name), st.hash, prev)
        });
        for r in kept_records {
            let key = table.key(&r.stream).expect("inserted by extend_index");
            table.apply_event(
                key,
                seq,
                r.header.position,
                r.header.stream_version,
                r.header.record_time,
            );
        }
        let data_end = s.complete_end;
        end = End {
            position: Position(f.header.base_position.0 + index.record_count()),
            chain: s.complete_chain,
        };
        let clean_end = matches!(s.end, ScanEnd::Clean { .. }) && s.complete == s.records.len();
        if j + 1 == unsealed.len() && from_sidecar && clean_end && s.records.is_empty() {
            report.clean = true;
        }
        if !clean_end {
            let truncation = truncate_tail(&shared, f, &s, &unsealed[j + 1..], end.position)?;
            report.truncations.push(truncation);
            kept.push((seg_handle(f), index, data_end, end.chain));
            break;
        }
        kept.push((seg_handle(f), index, data_end, end.chain));
    }

    // A snapshot (or sidecar) written at a clean close covers only durable data: if it
    // claims more than recovery found, acknowledged records are missing.
    if let Some(cover) = table_from {
        if cover.next_position > end.position && opts.recovery == RecoveryMode::Strict {
            return Err(corrupt(
                &dir.join(SNAPSHOT_FILE),
                0,
                Some(end.position.0),
                format!(
                    "the stream snapshot covers the log up to position {}, but the segments end at {}",
                    cover.next_position, end.position
                ),
                None,
            ));
        }
    }

    // Seal complete unsealed segments; the last kept one becomes active.
    let last = kept.pop();
    for (handle, index, data_end, chain) in kept {
        let handle = Arc::new(handle);
        if read_only {
            *handle
                .state
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = SegState::Frozen {
                index: Arc::new(index),
                data_end,
            };
        } else {
            seal_on_open(&shared, &handle, &index, data_end, chain)?;
            report.sealed_on_open.push(handle.seq);
        }
        shared
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(handle);
    }
    let writer = make_writer(&shared, last, end, table)?;
    let next_position = writer.next_position;
    *lock(&shared.writer) = Some(writer);
    {
        let mut c = lock(&shared.commit);
        c.written = next_position;
        c.durable = next_position;
    }
    shared
        .durable
        .store(next_position.0, std::sync::atomic::Ordering::Release);
    shared.publish_visible(next_position);
    report.next_position = next_position;
    report.rebuilt_indexes = std::mem::take(&mut *lock(&shared.rebuilt));
    if !read_only {
        rebuild_id_window(&shared)?;
        start_threads(&shared)?;
        let next = lock(&shared.writer)
            .as_ref()
            .map(|w| SegmentSeq(w.active.seq.0 + 1));
        if let Some(next) = next {
            request_spare(&shared, next);
        }
    }
    Ok((shared, report))
}

fn seg_handle(f: &Found) -> SegmentHandle {
    SegmentHandle {
        seq: f.seq,
        path: f.path.clone(),
        header: f.header,
        map: OnceLock::new(),
        state: RwLock::new(SegState::Active),
    }
}

fn read_or_create_meta(dir: &Path, read_only: bool) -> Result<LogMeta> {
    let path = dir.join(META_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => LogMeta::decode(&bytes)
            .map_err(|e| corrupt(&path, 0, None, "log identity file".into(), Some(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !read_only => {
            let mut log_id = [0u8; 16];
            log_id[..8].copy_from_slice(&super::random_u64().to_le_bytes());
            log_id[8..].copy_from_slice(&super::random_u64().to_le_bytes());
            let meta = LogMeta { log_id, created_time: now() };
            crate::sys::write_file_atomic(dir, META_FILE, &meta.encode())
                .map_err(io("writing log identity", &path))?;
            if let Some(parent) = dir.parent() {
                let _ = sync_dir(parent);
            }
            Ok(meta)
        }
        Err(e) => Err(Error::Io {
            op: "reading log identity",
            path,
            source: e,
        }),
    }
}

/// Lists segment files: those with headers, in order, and spare (all-zero) ones.
fn list_segments(
    dir: &Path,
    meta: &LogMeta,
    opts: &Options,
    read_only: bool,
) -> Result<(Vec<Found>, Vec<(SegmentSeq, PathBuf)>)> {
    let mut seqs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io("listing directory", dir))? {
        let entry = entry.map_err(io("listing directory", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".prep") || name.ends_with(".tmp") {
            if !read_only {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        }
        if let Some(seq) = SegmentSeq::parse_file_name(&name) {
            seqs.push(seq);
        }
    }
    seqs.sort();
    // First pass: which files are spares (an all-zero header page).
    let mut files = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let path = dir.join(seq.file_name());
        let file = File::open(&path).map_err(io("opening segment", &path))?;
        let len = file
            .metadata()
            .map_err(io("reading segment size", &path))?
            .len();
        if len < crate::format::SEGMENT_BYTES_MIN {
            return Err(corrupt(
                &path,
                len,
                None,
                format!("segment file is only {len} bytes"),
                None,
            ));
        }
        let page = read_page(&file, 0).map_err(io("reading segment header", &path))?;
        files.push((seq, path, file, len, page));
    }
    let newest_written = files.iter().rposition(|f| !is_zero(&f.4));
    let mut found: Vec<Found> = Vec::new();
    let mut spares = Vec::new();
    for (i, (seq, path, file, len, page)) in files.into_iter().enumerate() {
        if is_zero(&page) {
            if newest_written.is_some_and(|n| i < n) {
                return Err(corrupt(
                    &path,
                    0,
                    None,
                    format!("segment {seq} is empty but later ones are not"),
                    None,
                ));
            }
            spares.push((seq, path, len));
            continue;
        }
        let header = match SegmentHeader::decode_page(&page) {
            Ok(h) => h,
            Err(e) if Some(i) == newest_written => {
                // The newest segment's header may be torn if the crash came before its first
                // sync; then nothing in it was acknowledged, and it is removed.
                if torn_header_is_unacknowledged(&file, len, &path)? {
                    if !read_only {
                        std::fs::remove_file(&path).map_err(io("removing torn segment", &path))?;
                        sync_dir(dir).map_err(io("syncing directory", dir))?;
                    }
                    continue;
                }
                return Err(corrupt(&path, 0, None, "segment header".into(), Some(e)));
            }
            Err(e) => return Err(corrupt(&path, 0, None, "segment header".into(), Some(e))),
        };
        if header.log_id != meta.log_id {
            return Err(corrupt(
                &path,
                0,
                None,
                "segment belongs to another log".into(),
                None,
            ));
        }
        if header.seq != seq || header.capacity != len {
            return Err(corrupt(
                &path,
                0,
                None,
                format!(
                    "header says segment {} of {} bytes; the file is {} of {len} bytes",
                    header.seq, header.capacity, seq
                ),
                None,
            ));
        }
        if let Some(prev) = found.last() {
            if prev.seq.0 + 1 != seq.0 {
                return Err(corrupt(
                    &path,
                    0,
                    None,
                    format!("segment {} is missing", prev.seq.0 + 1),
                    None,
                ));
            }
        } else if seq.0 != 0 && header.base_position != Position(0) {
            return Err(corrupt(
                &path,
                0,
                None,
                "the first segment does not start the log".into(),
                None,
            ));
        }
        let fpage =
            read_page(&file, header.footer_offset()).map_err(io("reading footer", &path))?;
        let footer = if is_zero(&fpage) {
            None
        } else {
            let f = SegmentFooter::decode_page(&fpage).map_err(|e| {
                corrupt(
                    &path,
                    header.footer_offset(),
                    None,
                    "segment footer".into(),
                    Some(e),
                )
            })?;
            if f.seq != seq || f.log_id != meta.log_id || f.first_position != header.base_position {
                return Err(corrupt(
                    &path,
                    header.footer_offset(),
                    None,
                    "footer does not match the segment header".into(),
                    None,
                ));
            }
            if f.data_end > header.data_limit() {
                return Err(corrupt(
                    &path,
                    header.footer_offset(),
                    None,
                    "footer data_end beyond the data area".into(),
                    None,
                ));
            }
            Some(f)
        };
        found.push(Found {
            seq,
            path,
            header,
            footer,
        });
    }
    // Spare files of another size (from an earlier segment_bytes) are removed: they hold
    // nothing.
    let mut ready = Vec::new();
    let next_seq = found.last().map_or(0, |f| f.seq.0 + 1);
    for (seq, path, len) in spares {
        if len == opts.segment_bytes && seq.0 >= next_seq {
            ready.push((seq, path));
        } else if !read_only {
            std::fs::remove_file(&path).map_err(io("removing spare segment", &path))?;
        }
    }
    Ok((found, ready))
}

/// Whether a segment whose header does not decode holds no record that was acknowledged:
/// no CRC-valid record header in it says the log was durable beyond the smallest position
/// found in it (the segment's first).
fn torn_header_is_unacknowledged(file: &File, len: u64, path: &Path) -> Result<bool> {
    let mut src = FileSource::new(file).map_err(io("reading segment", path))?;
    let limit = len - PAGE_BYTES;
    let mut headers: Vec<RecordHeader> = Vec::new();
    let mut at = SEGMENT_DATA_START;
    while at + 80 <= limit {
        let (found, _) = find_durable_evidence(&mut src, at, limit, Position(0))
            .map_err(io("reading segment", path))?;
        match found {
            Some((off, h)) => {
                headers.push(h);
                at = off + 8;
            }
            None => break,
        }
    }
    let min = headers.iter().map(|h| h.position).min();
    Ok(headers
        .iter()
        .all(|h| min.is_some_and(|m| h.durable_through() <= m)))
}

/// Checks that the sealed segments form a prefix and continue each other.
fn check_sealed_prefix(found: &[Found], seed: Hash32) -> Result<()> {
    let mut seen_unsealed = false;
    let mut end = End {
        position: Position(0),
        chain: seed,
    };
    for f in found {
        if f.header.base_position != end.position || f.header.prev_chain_hash != end.chain {
            if f.footer.is_some() || !seen_unsealed {
                return Err(corrupt(
                    &f.path,
                    0,
                    Some(end.position.0),
                    format!(
                        "segment does not continue the log: starts at position {} (expected {}) or its previous chain hash differs",
                        f.header.base_position, end.position
                    ),
                    None,
                ));
            }
        }
        match (f.footer, seen_unsealed) {
            (Some(_), true) => {
                return Err(corrupt(
                    &f.path,
                    0,
                    None,
                    "sealed segment after an unsealed one".into(),
                    None,
                ));
            }
            (Some(footer), false) => {
                end = End {
                    position: footer.last_position.next(),
                    chain: footer.last_chain_hash,
                };
            }
            (None, _) => seen_unsealed = true,
        }
    }
    Ok(())
}

/// Where to start scanning an unsealed segment: after its clean-close sidecar if there is
/// a valid one, else at its first record.
fn start_of_scan(
    shared: &Shared,
    f: &Found,
    table: &mut StreamTable,
) -> (ActiveIndex, ScanFrom, bool) {
    let fresh = (
        ActiveIndex::new(f.seq, f.header.base_position),
        ScanFrom {
            offset: SEGMENT_DATA_START,
            position: f.header.base_position,
            chain: f.header.prev_chain_hash,
        },
        false,
    );
    let path = shared.dir.join(f.seq.index_file_name());
    let Ok(idx) = load_index(&path) else {
        return fresh;
    };
    let plausible = !idx.is_complete()
        && idx.log_id() == shared.meta.log_id
        && idx.seq() == f.seq
        && idx.base_position() == f.header.base_position
        && idx.data_end() >= SEGMENT_DATA_START
        && idx.data_end() <= f.header.data_limit();
    if !plausible {
        return fresh;
    }
    for s in idx.stream_summaries() {
        table.apply_summary(f.seq, &s);
    }
    let index = idx.to_active(|name| {
        let key = table.key_or_insert(name);
        let st = table.get(key);
        (key, Arc::clone(&st.name), st.hash)
    });
    let from = ScanFrom {
        offset: idx.data_end(),
        position: Position(f.header.base_position.0 + idx.record_count()),
        chain: if idx.record_count() == 0 {
            f.header.prev_chain_hash
        } else {
            idx.last_chain_hash()
        },
    };
    (index, from, true)
}

/// Decides what the damage at the end of segment `f` is, and removes it if it is a torn
/// tail (or the mode allows truncating damaged data).
fn truncate_tail(
    shared: &Shared,
    f: &Found,
    s: &crate::segment::Scan,
    later: &[Found],
    lost_from: Position,
) -> Result<Truncation> {
    let (break_offset, reason, decode) = match &s.end {
        ScanEnd::Break { offset, error, .. } => {
            let src = match error {
                crate::segment::RecordError::Invalid { source, .. } => Some(source.clone()),
                crate::segment::RecordError::Io { .. } => None,
            };
            (*offset, error.to_string(), src)
        }
        ScanEnd::Clean { offset } => (*offset, "unfinished batch".to_owned(), None),
    };
    let _ = break_offset;
    let file = File::open(&f.path).map_err(io("opening segment", &f.path))?;
    let mut src = FileSource::new(&file).map_err(io("reading segment", &f.path))?;
    let (mut evidence, last_nonzero) =
        find_durable_evidence(&mut src, s.complete_end, f.header.data_limit(), lost_from)
            .map_err(io("reading segment", &f.path))?;
    let mut evidence_file = f.path.clone();
    for l in later {
        if evidence.is_some() {
            break;
        }
        let lf = File::open(&l.path).map_err(io("opening segment", &l.path))?;
        let mut lsrc = FileSource::new(&lf).map_err(io("reading segment", &l.path))?;
        let (e, _) = find_durable_evidence(
            &mut lsrc,
            SEGMENT_DATA_START,
            l.header.data_limit(),
            lost_from,
        )
        .map_err(io("reading segment", &l.path))?;
        if e.is_some() {
            evidence = e;
            evidence_file = l.path.clone();
        }
    }
    let acknowledged = evidence.is_some();
    if let Some((at, h)) = evidence {
        if shared.opts.recovery == RecoveryMode::Strict {
            return Err(corrupt(
                &f.path,
                s.complete_end,
                Some(lost_from.0),
                format!(
                    "{reason}; acknowledged data follows it ({} byte {at}: record {} was written when the log was durable through position {})",
                    evidence_file.display(),
                    h.position,
                    h.durable_through()
                ),
                decode,
            ));
        }
    }
    let mut removed_bytes = last_nonzero.saturating_sub(s.complete_end);
    if !shared.read_only {
        if last_nonzero > s.complete_end {
            let wf = OpenOptions::new()
                .write(true)
                .open(&f.path)
                .map_err(io("opening segment", &f.path))?;
            zero_range(&wf, s.complete_end, last_nonzero)
                .map_err(io("zeroing torn tail", &f.path))?;
        }
        for l in later {
            let len = std::fs::metadata(&l.path).map(|m| m.len()).unwrap_or(0);
            removed_bytes += len;
            std::fs::remove_file(&l.path)
                .map_err(io("removing segment after torn tail", &l.path))?;
            let _ = std::fs::remove_file(shared.dir.join(l.seq.index_file_name()));
        }
        if !later.is_empty() {
            sync_dir(&shared.dir).map_err(io("syncing directory", &shared.dir))?;
        }
    }
    Ok(Truncation {
        file: f.path.clone(),
        offset: s.complete_end,
        bytes: removed_bytes,
        first_lost_position: lost_from,
        records: (s.records.len() - s.complete) as u64
            + u64::from(matches!(s.end, ScanEnd::Break { .. })),
        acknowledged_data_lost: acknowledged,
        reason,
    })
}

fn seal_on_open(
    shared: &Shared,
    handle: &Arc<SegmentHandle>,
    index: &ActiveIndex,
    data_end: u64,
    chain: Hash32,
) -> Result<()> {
    let path = &handle.path;
    let file = File::open(path).map_err(io("opening segment", path))?;
    file.sync_data().map_err(io("syncing segment", path))?;
    let mut src = FileSource::new(&file).map_err(io("reading segment", path))?;
    let footer = footer_from_records(&mut src, &handle.header, data_end, path)?;
    write_footer(path, &handle.header, &footer)?;
    let info = IndexFileInfo {
        log_id: shared.meta.log_id,
        data_end,
        last_chain_hash: chain,
    };
    let sealed = write_sealed_index(&shared.dir, handle.seq, index, &info)?;
    *handle
        .state
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = SegState::Sealed {
        footer,
        index: Arc::new(Mutex::new(Some(sealed))),
    };
    Ok(())
}

/// Makes the writer: the last kept unsealed segment stays active, or a spare becomes the
/// active segment.
fn make_writer(
    shared: &Arc<Shared>,
    last: Option<(SegmentHandle, ActiveIndex, u64, Hash32)>,
    end: End,
    streams: StreamTable,
) -> Result<Writer> {
    let ids = IdWindow::new(shared.opts.idempotency_window);
    let last_record_time = Timestamp(0);
    if let Some((handle, index, data_end, chain)) = last {
        let path = handle.path.clone();
        let (map, map_writer) = if shared.read_only {
            let file = File::open(&path).map_err(io("opening segment", &path))?;
            let map = SegmentMap::map_read_only(&file, handle.header.capacity, data_end)
                .map_err(io("mapping segment", &path))?;
            (map, None)
        } else {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io("opening segment", &path))?;
            // Whatever recovery read came from the page cache; make it durable before
            // anything new is acknowledged on top of it.
            file.sync_data().map_err(io("syncing segment", &path))?;
            let (map, writer) = SegmentMap::map(&file, handle.header.capacity, data_end)
                .map_err(io("mapping segment", &path))?;
            (map, Some(writer))
        };
        let _ = handle.map.set(map);
        let handle = Arc::new(handle);
        shared
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::clone(&handle));
        let last_time = index.last_record_time();
        return Ok(Writer {
            active: handle,
            map_writer,
            index,
            write_offset: data_end,
            next_position: end.position,
            chain,
            last_record_time: last_time,
            streams,
            ids,
        });
    }
    let next_seq = shared
        .segments
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .last()
        .map_or(SegmentSeq(0), |s| SegmentSeq(s.seq.0 + 1));
    if shared.read_only {
        // Nothing to write to: a placeholder active segment that is in no list and is never
        // read (its index is empty).
        let handle = Arc::new(SegmentHandle {
            seq: next_seq,
            path: shared.dir.join(next_seq.file_name()),
            header: super::append::segment_header(shared, next_seq, end.position, end.chain),
            map: OnceLock::new(),
            state: RwLock::new(SegState::Active),
        });
        return Ok(Writer {
            active: handle,
            map_writer: None,
            index: ActiveIndex::new(next_seq, end.position),
            write_offset: SEGMENT_DATA_START,
            next_position: end.position,
            chain: end.chain,
            last_record_time,
            streams,
            ids,
        });
    }
    let have_spare = lock(&shared.spares)
        .ready
        .iter()
        .any(|(s, _)| *s == next_seq);
    if !have_spare {
        let path = prepare_spare(&shared.dir, next_seq, shared.opts.segment_bytes).map_err(io(
            "preparing segment",
            &shared.dir.join(next_seq.file_name()),
        ))?;
        let mut spares = lock(&shared.spares);
        spares.ready.push((next_seq, path));
        spares.prepared = spares.prepared.max(Some(next_seq));
    }
    let (handle, map_writer) =
        super::background::activate_spare(shared, next_seq, end.position, end.chain)?;
    // The header must be durable with the first records; register it.
    lock(&shared.commit).add_dirty(map_writer.map(), 0, PAGE_BYTES);
    shared
        .segments
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Arc::clone(&handle));
    let last_time = shared
        .segments
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .rev()
        .find_map(|s| {
            match &*s
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                SegState::Sealed { footer, .. } => Some(footer.last_record_time),
                _ => None,
            }
        })
        .unwrap_or_default();
    Ok(Writer {
        active: handle,
        map_writer: Some(map_writer),
        index: ActiveIndex::new(next_seq, end.position),
        write_offset: SEGMENT_DATA_START,
        next_position: end.position,
        chain: end.chain,
        last_record_time: last_time,
        streams,
        ids,
    })
}

/// Fills the idempotency window with the ids of the newest records, newest segment first.
fn rebuild_id_window(shared: &Shared) -> Result<()> {
    let mut guard = lock(&shared.writer);
    let w = guard.as_mut().expect("writer made above");
    let active_ids = slots_of_active(&w.index, w.active.header.base_position);
    for (id, slot) in active_ids {
        w.ids.insert(id, slot);
    }
    let segs = shared
        .segments
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for seg in segs.iter().rev() {
        if w.ids.room() == 0 {
            break;
        }
        if seg.seq == w.active.seq {
            continue;
        }
        let older = match &*seg
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            SegState::Frozen { index, .. } => {
                Some(slots_of_active(index, seg.header.base_position))
            }
            _ => None,
        };
        let older = match older {
            Some(o) => o,
            None => match sealed_index(shared, seg)? {
                Some((idx, _)) => slots_of_sealed(&idx, &w.streams),
                None => continue,
            },
        };
        w.ids.prepend_older(older);
    }
    Ok(())
}

fn slots_of_active(index: &ActiveIndex, base: Position) -> Vec<(EventId, IdSlot)> {
    let ids = index.event_ids();
    let mut slots: Vec<Option<(StreamKey, u64)>> = vec![None; ids.len()];
    for (key, run) in index.runs() {
        for e in &run.entries {
            slots[e.pos_delta as usize] = Some((key, e.version));
        }
    }
    ids.iter()
        .zip(slots)
        .enumerate()
        .filter_map(|(i, (id, s))| {
            s.map(|(stream, version)| {
                (
                    *id,
                    IdSlot {
                        position: Position(base.0 + i as u64),
                        stream,
                        version,
                    },
                )
            })
        })
        .collect()
}

fn slots_of_sealed(idx: &SealedIndex, table: &StreamTable) -> Vec<(EventId, IdSlot)> {
    let n = idx.record_count() as usize;
    let mut slots: Vec<Option<(StreamKey, u64)>> = vec![None; n];
    for s in idx.stream_summaries() {
        let Some(key) = table.key(&s.name) else {
            continue;
        };
        let Some(run) = idx.find_stream(stream_hash(&s.name), &s.name) else {
            continue;
        };
        for i in 0..=(run.last_version - run.first_version) {
            let e = idx.run_entry(&run, i as u32);
            if let Some(slot) = slots.get_mut(e.pos_delta as usize) {
                *slot = Some((key, e.version));
            }
        }
    }
    let base = idx.base_position();
    slots
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.map(|(stream, version)| {
                (
                    idx.event_id(i as u64),
                    IdSlot {
                        position: Position(base.0 + i as u64),
                        stream,
                        version,
                    },
                )
            })
        })
        .collect()
}
