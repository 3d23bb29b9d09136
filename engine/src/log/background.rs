//! Background work: preparing spare segments, sealing rolled segments, the flusher for
//! batched and asynchronous appends, and full verification.
//!
//! Sealing a segment (docs/FORMAT.md, "Sealing"): sync its records, compute the Merkle
//! root over its record hashes, write and sync the footer, write the index sidecar
//! (temporary name, sync, rename, sync directory). A crash at any step leaves a segment
//! that `open` seals again.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Durability;
use super::append::segment_header;
use super::shared::{SegState, SegmentHandle, Shared, lock};
use super::streams::{SNAPSHOT_FILE, SnapshotCover, StreamTable, decode_snapshot};
use crate::Storage;
use crate::error::{Error, Result};
use crate::format::chain::MerkleBuilder;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{Hash32, PAGE_BYTES, Position, SEGMENT_DATA_START, SegmentSeq, Timestamp};
use crate::index::{ActiveIndex, IndexFileInfo, SealedIndex};
use crate::segment::{
    ByteSource, FileSource, RecordError, SliceSource, is_zero, read_page, read_record,
};
use crate::sys::{MapWriter, OpenMode, ReadOnlyMap, SegmentMap};

/// A rolled segment for the sealer.
pub(crate) struct SealJob {
    pub(crate) segment: Arc<SegmentHandle>,
    pub(crate) index: Arc<ActiveIndex>,
    pub(crate) data_end: u64,
    pub(crate) last_chain_hash: Hash32,
}

pub(crate) fn start_threads(shared: &Arc<Shared>) -> Result<()> {
    let (tx, rx) = mpsc::channel::<SealJob>();
    *lock(&shared.segments.seal_tx) = Some(tx);
    let mut threads = lock(&shared.threads);
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(format!("tally-{name}"))
            .spawn(f)
            .map_err(Error::io("spawning thread", &shared.dir))
    };
    let s = Arc::clone(shared);
    threads.push(spawn("prepare", Box::new(move || preparer(&s)))?);
    let s = Arc::clone(shared);
    threads.push(spawn("seal", Box::new(move || sealer(&s, &rx)))?);
    let s = Arc::clone(shared);
    threads.push(spawn("flush", Box::new(move || flusher(&s)))?);
    drop(threads);
    if shared.opts.index_attributes {
        let s = Arc::clone(shared);
        let t = spawn("index", Box::new(move || super::attrs::indexer(&s)))?;
        shared.indexing.indexer.set_thread(t);
    }
    if let Some(every) = shared.opts.retention_every.filter(|_| !shared.read_only) {
        let s = Arc::clone(shared);
        let t = spawn(
            "retention",
            Box::new(move || super::retention::retainer(&s, every)),
        )?;
        shared.retention.set_thread(t);
    }
    if let Some(every) = shared.opts.cold.background {
        let s = Arc::clone(shared);
        let t = spawn(
            "compact",
            Box::new(move || super::cold::compactor(&s, every)),
        )?;
        shared.cold.compactor.set_thread(t);
    }
    if !shared.opts.auto_checkpoints {
        return Ok(());
    }
    let s = Arc::clone(shared);
    let t = spawn("checkpoint", Box::new(move || checkpointer(&s)))?;
    shared.evidence.checkpointer.set_thread(t);
    Ok(())
}

/// Writes checkpoints when a segment is sealed, every `checkpoint_every_records` records,
/// and every `checkpoint_interval` while the log grows. Between checkpoints it keeps the
/// Merkle tree caught up, so that a checkpoint or proof rarely has much to hash.
fn checkpointer(shared: &Shared) {
    const POLL: Duration = Duration::from_millis(100);
    let every = shared.opts.checkpoint_every_records;
    let interval = shared.opts.checkpoint_interval;
    let mut last_time = Instant::now();
    loop {
        let due = shared.evidence.checkpointer.wait(POLL);
        if shared.evidence.checkpointer.stopping() || shared.commit.is_poisoned() {
            return;
        }
        let last = shared
            .evidence
            .checkpoints
            .lock()
            .list
            .last()
            .map_or(0, |c| c.statement.tree_size);
        let visible = shared.visible_position().0;
        let grown = visible.saturating_sub(last);
        let wanted = grown > 0
            && (due
                || every.is_some_and(|n| grown >= n)
                || interval.is_some_and(|t| last_time.elapsed() >= t));
        if wanted {
            // A failure here is retried at the next trigger; the log's own syncs report
            // disk failures to appenders.
            let _ = super::checkpoints::checkpoint(shared, false);
            last_time = Instant::now();
        } else if grown > 0 {
            let mut tree = shared.evidence.tree.lock();
            let _ = tree.catch_up(shared, Position(visible));
        }
    }
}

/// Asks the checkpoint thread for a checkpoint (after a seal).
pub(crate) fn request_checkpoint(shared: &Shared) {
    shared.evidence.checkpointer.signal();
}

/// Makes the sealer drop its queue instead of sealing (a simulated crash).
#[cfg(any(test, feature = "internals"))]
pub(crate) fn abandon_seal_queue(shared: &Shared) {
    shared.segments.abandon_seals.store(true, Ordering::SeqCst);
}

fn preparer(shared: &Shared) {
    let mut spares = shared.segments.spares.lock();
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        // Prepare only seqs above every segment that exists or was prepared: a spare that
        // was taken is active and must never be prepared (overwritten) again.
        let next = spares
            .wanted
            .filter(|w| spares.error.is_none() && spares.prepared.is_none_or(|p| *w > p));
        let Some(seq) = next else {
            spares = spares.wait(&shared.segments.spares_cv);
            continue;
        };
        drop(spares);
        let result = prepare_spare(
            shared.fs(),
            &shared.dir,
            seq,
            shared.opts.segment_bytes,
            shared.opts.durability,
        );
        spares = shared.segments.spares.lock();
        match result {
            Ok(path) => {
                spares.ready.push((seq, path));
                spares.prepared = Some(seq);
            }
            Err(e) => spares.error = Some(Arc::new(e)),
        }
        shared.segments.spares_cv.notify_all();
    }
}

/// Creates a zeroed, synced segment file under a temporary name and renames it into place.
///
/// Under `Durability::Fsync` the file is filled with written zeros, so that each small sync
/// needs no extent conversion (measured nearly 2x more syncs per second than into
/// fallocated space); otherwise space is only reserved (`fallocate`), which costs no write
/// bandwidth. See docs/adr/0002-write-path-and-preallocation.md.
pub(crate) fn prepare_spare(
    fs: &Storage,
    dir: &Path,
    seq: SegmentSeq,
    bytes: u64,
    durability: Durability,
) -> std::io::Result<std::path::PathBuf> {
    let tmp = dir.join(crate::format::files::spare_temp_name(seq));
    let _ = fs.remove_file(&tmp);
    let file = match durability {
        Durability::Fsync => fs.create_zeroed(&tmp, bytes)?,
        Durability::Batched { .. } | Durability::None => fs.create_allocated(&tmp, bytes)?,
    };
    drop(file);
    let path = dir.join(seq.file_name());
    // A hard link fails if the name exists, so an existing segment is never replaced; the
    // temporary name is removed after.
    match fs.hard_link(&tmp, &path) {
        Ok(()) => {}
        // An earlier attempt linked it and then failed: accept it if it is still an
        // untouched spare of the right size.
        Err(e)
            if e.kind() == std::io::ErrorKind::AlreadyExists
                && is_untouched_spare(fs, &path, bytes) => {}
        Err(e) => return Err(e),
    }
    fs.remove_file(&tmp)?;
    fs.sync_dir(dir)?;
    Ok(path)
}

fn is_untouched_spare(fs: &Storage, path: &Path, bytes: u64) -> bool {
    fs.open(path, OpenMode::Read).is_ok_and(|f| {
        f.len().is_ok_and(|len| len == bytes)
            && read_page(&*f, 0).is_ok_and(|p| is_zero(&p))
            && read_page(&*f, SEGMENT_DATA_START).is_ok_and(|p| is_zero(&p))
    })
}

pub(crate) fn request_spare(shared: &Shared, seq: SegmentSeq) {
    let mut s = shared.segments.spares.lock();
    if s.wanted.is_none_or(|w| w < seq) {
        s.wanted = Some(seq);
    }
    shared.segments.spares_cv.notify_all();
}

/// Waits, holding no lock of the write path, until the spare last asked for is prepared,
/// its preparation failed, or the log is closing (a roll found it not ready and let go of
/// the writer lock to wait).
pub(crate) fn wait_for_spare(shared: &Shared) {
    let mut s = shared.segments.spares.lock();
    loop {
        let ready = s
            .wanted
            .is_some_and(|w| s.ready.iter().any(|(q, _)| *q == w));
        if ready || s.error.is_some() || shared.shutdown.load(Ordering::SeqCst) {
            return;
        }
        s = s.wait(&shared.segments.spares_cv);
    }
}

/// Turns spare `seq` into the active segment: maps it and writes its header. With
/// [`super::append::Blocking::Refused`], fails with [`Error::WouldBlock`] (changing
/// nothing) if the spare is not prepared yet, instead of waiting for it.
pub(crate) fn activate_spare(
    shared: &Shared,
    seq: SegmentSeq,
    base_position: Position,
    prev_chain_hash: Hash32,
    may_block: super::append::Blocking,
) -> Result<(Arc<SegmentHandle>, MapWriter)> {
    request_spare(shared, seq);
    let path = {
        let mut s = shared.segments.spares.lock();
        loop {
            if let Some(i) = s.ready.iter().position(|(q, _)| *q == seq) {
                break s.ready.swap_remove(i).1;
            }
            if let Some(e) = s.error.take() {
                // Let the preparer try again on the next roll.
                return Err(Error::Io {
                    op: "preparing segment",
                    path: shared.dir.join(seq.file_name()),
                    source: std::io::Error::new(e.kind(), e.to_string()),
                });
            }
            if shared.shutdown.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            // A seq at or below the prepared mark that is not ready would never come.
            assert!(
                s.prepared.is_none_or(|p| p < seq),
                "spare {seq} was prepared and taken before, or removed without resetting the mark"
            );
            if may_block == super::append::Blocking::Refused {
                return Err(Error::WouldBlock);
            }
            s = s.wait(&shared.segments.spares_cv);
        }
    };
    let opened = shared
        .fs()
        .open(&path, OpenMode::ReadWrite)
        .and_then(|file| {
            let capacity = file.len()?;
            // A spare kept from before a restore may be sparse (see make_writer).
            file.allocate(capacity)?;
            let (map, writer) = SegmentMap::map(&*file, capacity, 0)?;
            Ok((capacity, map, writer))
        });
    let (capacity, map, mut writer) = match opened {
        Ok(o) => o,
        Err(e) => {
            // Keep the spare for the next attempt (a transient EMFILE or ENOMEM).
            shared
                .segments
                .spares
                .lock()
                .ready
                .push((seq, path.clone()));
            return Err(Error::Io {
                op: "opening segment",
                path,
                source: e,
            });
        }
    };
    let header = segment_header(shared, seq, base_position, prev_chain_hash, capacity);
    writer.write(0, &header.encode_page());
    writer.publish(PAGE_BYTES);
    let handle = Arc::new(SegmentHandle::new(
        seq,
        path,
        shared.fs().clone(),
        header,
        Some(map),
        SegState::Active,
    ));
    Ok((handle, writer))
}

pub(crate) fn send_seal(shared: &Shared, job: SealJob) {
    *shared.segments.sealing.lock() += 1;
    let sent = lock(&shared.segments.seal_tx)
        .as_ref()
        .map(|tx| tx.send(job));
    if !matches!(sent, Some(Ok(()))) {
        // No sealer (closing): the next open seals the segment.
        *shared.segments.sealing.lock() -= 1;
    }
}

fn sealer(shared: &Shared, rx: &mpsc::Receiver<SealJob>) {
    let mut policy = SnapshotPolicy {
        since: 0,
        streams: None,
    };
    // After a failure nothing more is sealed: a sealed segment after an unsealed one is
    // not a shape recovery accepts, and the log is poisoned anyway.
    let mut failed = false;
    while let Ok(job) = rx.recv() {
        if !failed && !shared.segments.abandon_seals.load(Ordering::SeqCst) {
            match seal(shared, &job) {
                Ok(streams) => {
                    request_checkpoint(shared);
                    policy.since += streams;
                    // A snapshot is an optimisation; failing to write one loses nothing.
                    let _ = maybe_snapshot(shared, job.segment.seq, &mut policy);
                }
                Err(e) => {
                    failed = true;
                    let mut c = shared.commit.lock();
                    let cause = match e {
                        Error::Io { source, .. } => source,
                        other => std::io::Error::other(other.to_string()),
                    };
                    shared.commit.poison(&mut c, cause);
                }
            }
        }
        *shared.segments.sealing.lock() -= 1;
        shared.segments.sealing_cv.notify_all();
    }
}

/// Computes a segment's footer from its records.
pub(crate) fn footer_from_records<S: ByteSource>(
    src: &mut S,
    header: &SegmentHeader,
    data_end: u64,
    path: &Path,
) -> Result<SegmentFooter> {
    let mut merkle = MerkleBuilder::new();
    let mut offset = SEGMENT_DATA_START;
    let (mut first_time, mut last_time) = (Timestamp(0), Timestamp(0));
    let mut last_chain = header.prev_chain_hash;
    while offset < data_end {
        let rec = read_record(src, header.layout, offset, data_end)
            .map_err(|e| corrupt_record(path, e))?;
        if merkle.is_empty() {
            first_time = rec.header.record_time;
        }
        last_time = rec.header.record_time;
        last_chain = rec.header.chain_hash;
        merkle.push(&rec.header.chain_hash);
        offset = rec.end();
    }
    if merkle.is_empty() {
        return Err(corrupt(
            path,
            offset,
            None,
            "a sealed segment must hold records".into(),
            None,
        ));
    }
    Ok(SegmentFooter {
        layout: header.layout,
        log_id: header.log_id,
        seq: header.seq,
        record_count: merkle.len(),
        first_position: header.base_position,
        last_position: Position(header.base_position.0 + merkle.len() - 1),
        data_end,
        first_record_time: first_time,
        last_record_time: last_time,
        last_chain_hash: last_chain,
        merkle_root: merkle.root(),
    })
}

/// Writes a footer and syncs the file.
pub(crate) fn write_footer(
    fs: &Storage,
    path: &Path,
    header: &SegmentHeader,
    footer: &SegmentFooter,
) -> Result<()> {
    let file = fs
        .open(path, OpenMode::ReadWrite)
        .map_err(Error::io("opening segment", path))?;
    file.write_all_at(&footer.encode_page(), header.footer_offset())
        .map_err(Error::io("writing footer", path))?;
    file.sync_data().map_err(Error::io("syncing footer", path))
}

/// Writes an index sidecar for a sealed segment and maps it back.
pub(crate) fn write_sealed_index(
    fs: &Storage,
    dir: &Path,
    seq: SegmentSeq,
    index: &ActiveIndex,
    info: &IndexFileInfo,
) -> Result<Arc<SealedIndex>> {
    let bytes = index.encode(info, true);
    let name = seq.index_file_name();
    fs.write_file_atomic(dir, &name, &bytes, false)
        .map_err(Error::io("writing index", dir.join(&name)))?;
    load_index(fs, &dir.join(&name))
}

/// Maps a sidecar file read-only.
pub(crate) fn load_map(fs: &Storage, path: &Path) -> Result<Arc<ReadOnlyMap>> {
    let file = fs
        .open(path, OpenMode::Read)
        .map_err(Error::io("opening index", path))?;
    let map = file
        .map_immutable()
        .map_err(Error::io("mapping index", path))?;
    Ok(Arc::new(map))
}

/// Maps and checks an index sidecar.
pub(crate) fn load_index(fs: &Storage, path: &Path) -> Result<Arc<SealedIndex>> {
    let map = load_map(fs, path)?;
    let idx = SealedIndex::open(map).map_err(|source| Error::Index {
        file: path.to_owned(),
        source,
    })?;
    Ok(Arc::new(idx))
}

impl AsRef<[u8]> for ReadOnlyMap {
    fn as_ref(&self) -> &[u8] {
        self.bytes()
    }
}

/// Seals a rolled segment; returns the number of streams in it.
fn seal(shared: &Shared, job: &SealJob) -> Result<u64> {
    let seg = &job.segment;
    let map = seg.map()?;
    // The records must be durable before the footer claims them. Under `Fsync` they are
    // synced through group commit, not here: a write-back error is reported to one sync of a
    // file only, and it must reach the sync whose success would acknowledge appends (it
    // poisons the log). Under `Batched` and `None` no acknowledgement waits for a sync, so
    // the sealer syncs just this segment (a failure poisons the log all the same) and the
    // durable watermark, which records carry as `durable_lag`, moves only with real
    // group-commit syncs.
    let synced = match shared.opts.durability {
        Durability::Fsync => shared
            .wait_durable(job.index.next_position())
            .map_err(|e| std::io::Error::other(e.to_string())),
        Durability::Batched { .. } | Durability::None => map.sync_range(0, job.data_end),
    };
    synced.map_err(|source| Error::Io {
        op: "syncing segment before sealing",
        path: seg.path.clone(),
        source,
    })?;
    let bytes = map.read(0, job.data_end).ok_or_else(|| {
        corrupt(
            &seg.path,
            job.data_end,
            None,
            "sealed range is not published".into(),
            None,
        )
    })?;
    let footer = footer_from_records(
        &mut SliceSource { bytes },
        &seg.header,
        job.data_end,
        &seg.path,
    )?;
    if footer.record_count != job.index.record_count()
        || footer.last_chain_hash != job.last_chain_hash
    {
        return Err(corrupt(
            &seg.path,
            job.data_end,
            Some(footer.last_position.0),
            format!(
                "the segment's records ({}) disagree with what was written ({} records)",
                footer.record_count,
                job.index.record_count()
            ),
            None,
        ));
    }
    // The footer describes exactly the records the writer wrote (checked just above, as an
    // error: those bytes were read back), and ends where the segment does.
    debug_assert_eq!(footer.data_end, job.data_end);
    debug_assert_eq!(
        footer.first_position, seg.header.base_position,
        "a sealed segment starts where its header says"
    );
    assert!(
        job.data_end <= seg.header.data_limit(),
        "sealing past the data limit"
    );
    zero_after_end(shared, seg, job.data_end)?;
    write_footer(shared.fs(), &seg.path, &seg.header, &footer)?;
    let info = IndexFileInfo {
        log_id: shared.meta.log_id,
        data_end: job.data_end,
        last_chain_hash: job.last_chain_hash,
    };
    let index = write_sealed_index(shared.fs(), &shared.dir, seg.seq, &job.index, &info)?;
    let streams = index.stream_count() as u64;
    *seg.state
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = SegState::Sealed {
        footer,
        index: Arc::new(Mutex::new(Some(index))),
    };
    Ok(streams)
}

/// Nothing after a sealed segment's end of data belongs to the log, and `verify` refuses a
/// non-zero byte there. A power cut can leave some behind records that end cleanly (pages of
/// an earlier tail whose zeroing was not synced, or torn halves of them, after zeros that end
/// recovery's scan), and the writer may roll before its appends cover them: they are zeroed,
/// durably, before the footer claims its end (what recovery does for a segment it seals).
fn zero_after_end(shared: &Shared, seg: &SegmentHandle, data_end: u64) -> Result<()> {
    let file = shared
        .fs()
        .open(&seg.path, OpenMode::ReadWrite)
        .map_err(Error::io("opening segment", &seg.path))?;
    let mut src = FileSource::new(&*file).map_err(Error::io("reading segment", &seg.path))?;
    let (_, last_nonzero) = crate::segment::find_durable_evidence(
        &mut src,
        seg.header.layout,
        data_end,
        seg.header.data_limit(),
        Position(u64::MAX),
    )
    .map_err(Error::io("reading segment", &seg.path))?;
    if last_nonzero > data_end {
        crate::segment::zero_range(&*file, data_end, last_nonzero)
            .map_err(Error::io("zeroing bytes after a segment's end", &seg.path))?;
    }
    Ok(())
}

/// Writes a new stream-table snapshot covering sealed segment `seq` when enough has
/// changed since the last one (as many stream entries in new sidecars as the snapshot
/// holds streams), so that the work of an open stays bounded by the number of streams,
/// not the number of segments.
/// When the sealer last wrote a snapshot, and how big it was.
struct SnapshotPolicy {
    /// Stream entries in sidecars sealed since the last snapshot.
    since: u64,
    /// Streams in the last snapshot (read from its header once, then remembered).
    streams: Option<u64>,
}

fn snapshot_streams_on_disk(fs: &Storage, path: &Path) -> u64 {
    use super::streams::{SN_STREAM_COUNT, SNAPSHOT_HEADER_LEN};
    let mut header = [0u8; SNAPSHOT_HEADER_LEN];
    fs.open(path, OpenMode::Read)
        .and_then(|f| f.read_exact_at(&mut header, 0))
        .map_or(0, |()| crate::format::le::u64_at(&header, SN_STREAM_COUNT))
}

fn maybe_snapshot(shared: &Shared, seq: SegmentSeq, policy: &mut SnapshotPolicy) -> Result<()> {
    let path = shared.dir.join(SNAPSHOT_FILE);
    let streams = *policy
        .streams
        .get_or_insert_with(|| snapshot_streams_on_disk(shared.fs(), &path));
    if policy.since < streams.max(1024) {
        return Ok(());
    }
    let old = shared
        .fs()
        .read(&path)
        .ok()
        .and_then(|b| decode_snapshot(&b).ok());
    // Folding is idempotent, so the snapshot's own segment (covered partially by a
    // clean-close snapshot) is folded again.
    let (mut table, from) = match old {
        Some((id, cover, entries)) if id == shared.meta.log_id && cover.seq <= seq => {
            (StreamTable::from_entries(entries), cover.seq)
        }
        _ => (StreamTable::default(), SegmentSeq(0)),
    };
    let segs = shared.segments_snapshot();
    let mut cover = None;
    for seg in segs.iter().filter(|s| s.seq >= from && s.seq <= seq) {
        let Some((index, footer)) = sealed_index(shared, seg)? else {
            return Ok(());
        };
        for s in index.stream_summaries() {
            table.apply_summary(seg.seq, &s);
        }
        cover = Some(SnapshotCover {
            seq: seg.seq,
            data_end: footer.data_end,
            next_position: footer.last_position.next(),
        });
    }
    let Some(cover) = cover else { return Ok(()) };
    let bytes = table.encode_snapshot(shared.meta.log_id, &cover);
    shared
        .fs()
        .write_file_atomic(&shared.dir, SNAPSHOT_FILE, &bytes, false)
        .map_err(Error::io("writing stream snapshot", &path))?;
    *policy = SnapshotPolicy {
        since: 0,
        streams: Some(table.len() as u64),
    };
    Ok(())
}

/// The sealed index and footer of a segment, loading (or rebuilding) the sidecar on first
/// use; `None` if the segment is not sealed yet.
pub(crate) fn sealed_index(
    shared: &Shared,
    seg: &SegmentHandle,
) -> Result<Option<(Arc<SealedIndex>, SegmentFooter)>> {
    let (footer, slot) = match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Sealed { footer, index } => (*footer, Arc::clone(index)),
        _ => return Ok(None),
    };
    let mut slot = lock(&slot);
    if let Some(idx) = &*slot {
        return Ok(Some((Arc::clone(idx), footer)));
    }
    let path = shared.dir.join(seg.seq.index_file_name());
    let idx = match load_index(shared.fs(), &path) {
        Ok(idx) if index_matches(&idx, shared, &seg.header, &footer) => idx,
        _ => rebuild_index(shared, seg, &footer)?,
    };
    *slot = Some(Arc::clone(&idx));
    Ok(Some((idx, footer)))
}

pub(crate) fn index_matches(
    idx: &SealedIndex,
    shared: &Shared,
    header: &SegmentHeader,
    footer: &SegmentFooter,
) -> bool {
    idx.is_complete()
        && idx.log_id() == shared.meta.log_id
        && idx.seq() == header.seq
        && idx.base_position() == header.base_position
        && idx.record_count() == footer.record_count
        && idx.data_end() == footer.data_end
        && idx.last_chain_hash() == footer.last_chain_hash
}

/// Rebuilds a sealed segment's sidecar from its records (read with plain reads).
pub(crate) fn rebuild_index(
    shared: &Shared,
    seg: &SegmentHandle,
    footer: &SegmentFooter,
) -> Result<Arc<SealedIndex>> {
    let (file, path) = seg.open_file()?;
    let mut src = FileSource::new(&*file).map_err(Error::io("reading segment", &path))?;
    let from = crate::segment::ScanFrom {
        layout: seg.header.layout,
        offset: SEGMENT_DATA_START,
        position: seg.header.base_position,
        chain: seg.header.prev_chain_hash,
    };
    let scan = crate::segment::scan(&mut src, from, footer.data_end);
    if scan.records.len() as u64 != footer.record_count || scan.complete_end != footer.data_end {
        let (offset, position, why) = match &scan.end {
            crate::segment::ScanEnd::Break {
                offset,
                position,
                error,
            } => {
                let cause = std::error::Error::source(error).map(ToString::to_string);
                (
                    *offset,
                    Some(position.0),
                    format!(": {}", cause.unwrap_or_default()),
                )
            }
            crate::segment::ScanEnd::Clean { offset } => (*offset, None, String::new()),
        };
        return Err(corrupt(
            &seg.path,
            offset,
            position,
            format!(
                "sealed segment holds {} valid records, its footer says {}{why}",
                scan.records.len(),
                footer.record_count
            ),
            None,
        ));
    }
    // Keys are local to this index; the previous segment holding each stream is found by
    // looking back through the earlier segments' indexes (this is a repair path).
    let mut keys: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let index = super::recover::index_from_scan(
        &seg.path,
        seg.header.seq,
        seg.header.base_position,
        &scan.records,
        |name: &str| {
            let n = keys.len() as u32;
            let key = crate::index::StreamKey(*keys.entry(name.to_owned()).or_insert(n));
            let hash = crate::index::stream_hash(name);
            let prev = previous_segment_with(shared, seg.seq, name, hash);
            (key, Arc::from(name), hash, prev)
        },
    )?;
    lock(&shared.segments.rebuilt).push(seg.seq);
    let info = IndexFileInfo {
        log_id: shared.meta.log_id,
        data_end: footer.data_end,
        last_chain_hash: footer.last_chain_hash,
    };
    if shared.read_only {
        let bytes = index.encode(&info, true);
        let idx = SealedIndex::open(Arc::new(bytes)).map_err(|source| Error::Index {
            file: seg.path.clone(),
            source,
        })?;
        return Ok(Arc::new(idx));
    }
    write_sealed_index(shared.fs(), &shared.dir, seg.seq, &index, &info)
}

/// The newest segment before `seq` whose index holds `name`.
pub(crate) fn previous_segment_with(
    shared: &Shared,
    seq: SegmentSeq,
    name: &str,
    hash: u64,
) -> Option<SegmentSeq> {
    let segs = shared.segments_snapshot();
    for seg in segs.iter().rev().filter(|s| s.seq < seq) {
        let found = match &*seg
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            SegState::Frozen { .. } | SegState::Active => None,
            SegState::Sealed { .. } => Some(()),
        };
        if found.is_none() {
            continue;
        }
        if let Ok(Some((idx, _))) = sealed_index(shared, seg)
            && idx.find_stream(hash, name).is_some()
        {
            return Some(seg.seq);
        }
    }
    None
}

fn flusher(shared: &Shared) {
    let mut c = shared.commit.lock();
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            // Parked waiters relied on this thread to lead: wake them to lead themselves.
            for (_, t) in &c.parked {
                t.unpark();
            }
            return;
        }
        let pending = c.written > c.durable && c.poisoned.is_none();
        match shared.opts.durability {
            Durability::Fsync if pending && !c.syncing => c = shared.lead_sync(c),
            Durability::Fsync if pending => {
                shared.commit.cv.wait(c.inner());
            }
            Durability::Batched { max_delay } if pending => {
                // Let the batch gather for max_delay, then sync everything written.
                shared.commit.flush_cv.wait_for(c.inner(), max_delay);
                while c.syncing {
                    shared.commit.cv.wait(c.inner());
                }
                if c.written > c.durable && !shared.shutdown.load(Ordering::SeqCst) {
                    c = shared.lead_sync(c);
                }
            }
            _ => {
                c.flusher_idle = true;
                shared
                    .commit
                    .flush_cv
                    .wait_for(c.inner(), Duration::from_millis(200));
                c.flusher_idle = false;
            }
        }
    }
}

pub(crate) fn corrupt(
    path: &Path,
    offset: u64,
    position: Option<u64>,
    detail: String,
    source: Option<crate::format::DecodeError>,
) -> Error {
    Error::Corrupt {
        file: path.to_owned(),
        offset,
        position,
        detail,
        source,
    }
}

pub(crate) fn corrupt_record(path: &Path, e: RecordError) -> Error {
    match e {
        RecordError::Io { offset, source } => Error::Io {
            op: "reading record",
            path: path.join(format!("@{offset}")),
            source,
        },
        RecordError::Invalid { offset, source } => {
            corrupt(path, offset, None, source.to_string(), Some(source))
        }
    }
}
