//! Opening a log: the recovery rules of docs/FORMAT.md ("Recovery rules").
//!
//! 1. Lock the directory, read `tally.meta` (or create a new log).
//! 2. Read every segment's header and footer page with plain reads. Sealed segments must
//!    form a prefix, continue each other (positions and chain), and are trusted from their
//!    footers; their records are not read.
//! 3. Scan the unsealed segments (from the active segment's clean-close sidecar, if any):
//!    every record's checksums, position and chain. The log ends at the last complete
//!    batch. Whatever follows is a torn tail (zeroed or removed, and reported) unless a
//!    later record says the log had been durable beyond it, which proves acknowledged data
//!    was lost: then open fails with [`Error::Corrupt`] (unless the recovery mode says to
//!    truncate anyway).
//! 4. Only now that the end is known, restore the stream table: `streams.snap` if it does
//!    not claim more than was found, the sidecars of sealed segments after it, and the
//!    kept unsealed records.
//! 5. Seal unsealed segments that are complete, make the last one active, rebuild the
//!    idempotency window, sync, and start the background threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};

use super::Durability;
use super::append::Writer;
use super::background::{
    corrupt, footer_from_records, load_index, prepare_spare, request_spare, sealed_index,
    start_threads, write_footer, write_sealed_index,
};
use super::checkpoints::{Checkpoints, load_or_create_key};
use super::cold::{ColdPlace, ColdTier};
use super::ids::{IdSlot, IdWindow};
use super::order::{Ordered, Rank};
use super::shared::{
    CommitPath, Evidence, Indexing, SegState, SegmentHandle, SegmentSet, Shared, Spares, lock,
};
use super::streams::{SNAPSHOT_FILE, SnapshotCover, StreamTable, decode_snapshot};
use super::tree::open_tree;
use super::visible::Visible;
use super::{Options, RecoveryMode, RecoveryReport, Truncation, now};
use crate::Storage;
use crate::error::{Error, Result};
use crate::format::chain::chain_seed;
use crate::format::files::cold_object_key;
use crate::format::meta::LogMeta;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{
    EventId, Hash32, PAGE_BYTES, Position, SEGMENT_DATA_START, SegmentSeq, Timestamp,
};
use crate::index::{ActiveIndex, IndexFileInfo, SealedIndex, StreamKey, stream_hash};
use crate::segment::{
    ActiveSegment, FileSource, Scan, ScanEnd, ScanFrom, ScannedRecord, find_durable_evidence,
    is_zero, read_page, scan, zero_range,
};
use crate::sys::{FsFile, OpenMode, SegmentMap, TryLock};

/// The bytes of `tally.checkpoints`; an empty list when the file does not exist. Any other
/// read error stops the open: without them recovery could not tell acknowledged records
/// from a torn tail, nor whether the log already has a signing key.
fn read_checkpoints_file(fs: &Storage, dir: &Path) -> Result<Vec<u8>> {
    let path = dir.join(super::checkpoints::CHECKPOINTS_FILE);
    match fs.read(&path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io("reading checkpoints file", &path)(e)),
    }
}

/// The fingerprint of the key that signed the last whole entry of the checkpoints file, or
/// `"unknown"` if that entry does not decode; `None` when the file holds no entry.
fn last_checkpoint_signer(fs: &Storage, dir: &Path, entry_len: usize) -> Result<Option<String>> {
    use crate::format::checkpoint::{SignedCheckpoint, fingerprint};
    let bytes = read_checkpoints_file(fs, dir)?;
    Ok(bytes.chunks_exact(entry_len).last().map(|last| {
        SignedCheckpoint::decode_entry(last)
            .map_or_else(|_| "unknown".to_owned(), |cp| fingerprint(&cp.public_key))
    }))
}

/// `(id, tree_size)` of the largest checkpoint of this log among the entries of the
/// checkpoints file that decode (a damaged entry does not hide later ones). Every record a
/// checkpoint covers was synced before it was signed: it is evidence that those records
/// were acknowledged, whatever the records themselves say.
fn checkpointed_size(fs: &Storage, meta: &LogMeta, dir: &Path) -> Result<Option<(u64, u64)>> {
    use crate::format::checkpoint::{SignedCheckpoint, entry_len};
    let log_id = &meta.log_id;
    let bytes = read_checkpoints_file(fs, dir)?;
    Ok(bytes
        .chunks_exact(entry_len(meta.layout.statement_version()))
        .filter_map(|e| SignedCheckpoint::decode_entry(e).ok())
        .filter(|cp| cp.statement.log_id == *log_id)
        .map(|cp| (cp.statement.id, cp.statement.tree_size))
        .max_by_key(|&(_, size)| size))
}

pub use crate::format::files::{LOCK_FILE, META_FILE};

/// A segment file found on disk.
struct Found {
    seq: SegmentSeq,
    path: PathBuf,
    header: SegmentHeader,
    footer: Option<SegmentFooter>,
    /// The footer page is neither zero nor a valid footer.
    footer_damaged: bool,
    /// A cold segment: no local file, the manifest's entry.
    cold: Option<crate::format::cold::ManifestEntry>,
}

/// What the directory holds.
struct Listing {
    found: Vec<Found>,
    spares: Vec<(SegmentSeq, PathBuf)>,
    /// Segment files after the last usable one that hold data but cannot continue the log:
    /// the newest one if its header page does not decode (or is zero) while its first data
    /// page is not zero (a header write that did not reach the disk, or damage), and every
    /// file from an empty segment that used ones follow (the empty one's header and first
    /// records never reached the disk, while a later segment's pages did: writeback order is
    /// arbitrary when nothing was synced). Recovery removes them unless a record proves that
    /// acknowledged data is among them.
    torn: Vec<(SegmentSeq, PathBuf)>,
}

/// The log's end as recovery has established it so far.
#[derive(Clone, Copy)]
struct End {
    position: Position,
    chain: Hash32,
}

/// An unsealed segment after its scan.
struct Scanned<'a> {
    f: &'a Found,
    partial: Option<Arc<SealedIndex>>,
    scan: Scan,
}

/// What an index needs to know about a stream: its key, shared name, hash, and the previous
/// segment that holds it.
type StreamKeying = (StreamKey, Arc<str>, u64, Option<SegmentSeq>);

/// Builds an index from scanned records. `key_of` gives each stream's key, shared name,
/// hash, and the previous segment that holds it.
///
/// # Errors
/// [`Error::Corrupt`] when the records' positions or a stream's versions are not dense
/// (bytes from disk are checked here, never by the index's assertions).
pub(crate) fn index_from_scan(
    path: &Path,
    seq: SegmentSeq,
    base: Position,
    records: &[ScannedRecord],
    mut key_of: impl FnMut(&str) -> StreamKeying,
) -> Result<ActiveIndex> {
    let mut index = ActiveIndex::new(seq, base);
    extend_index(path, &mut index, records, &mut key_of)?;
    Ok(index)
}

fn extend_index(
    path: &Path,
    index: &mut ActiveIndex,
    records: &[ScannedRecord],
    key_of: &mut impl FnMut(&str) -> StreamKeying,
) -> Result<()> {
    let mut cache: HashMap<&str, StreamKeying> = HashMap::new();
    for r in records {
        let (key, name, hash, prev) = cache
            .entry(r.stream.as_str())
            .or_insert_with(|| key_of(&r.stream))
            .clone();
        let position = r.header.position;
        let version = r.header.stream_version;
        let last = index
            .stream_run(key)
            .and_then(|run| run.entries.last())
            .map(|e| e.version);
        let wrong = if position != index.next_position() {
            Some(format!(
                "record at position {} where {} comes next: positions must be dense",
                position.0,
                index.next_position().0
            ))
        } else if let Some(last) = last
            && last.checked_add(1) != Some(version)
        {
            Some(format!(
                "stream {:?}: stream version {version} follows version {last}: versions must be dense",
                r.stream
            ))
        } else {
            None
        };
        if let Some(detail) = wrong {
            return Err(corrupt(path, r.offset, Some(position.0), detail, None));
        }
        index.push(
            key,
            &name,
            hash,
            prev,
            r.header.stream_version,
            r.header.position,
            r.offset,
            r.header.record_time,
            // An event retention removed has lost its id; the nil id stands in (the
            // sidecar written when the segment was sealed keeps the real one).
            r.event_id.unwrap_or(EventId([0; 16])),
        );
    }
    Ok(())
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(op, path)
}

/// Whether another opener holds the directory's lock (a read-only open beside a live log).
fn held_by_another(fs: &Storage, dir: &Path) -> bool {
    fs.open(&dir.join(LOCK_FILE), OpenMode::Read)
        .is_ok_and(|f| matches!(f.try_lock(false), Ok(TryLock::WouldBlock)))
}

fn lock_dir(fs: &Storage, dir: &Path) -> Result<Box<dyn FsFile>> {
    let path = dir.join(LOCK_FILE);
    let f = fs
        .open(&path, OpenMode::Create)
        .map_err(io("opening lock file", &path))?;
    // A lock held a moment longer than its holder (a child process forked by another
    // thread keeps the open file description until it execs) is waited for briefly, so
    // that close-then-open is reliable; a live log holding it is refused after the wait.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match f.try_lock(true) {
            Ok(TryLock::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            other => break lock_outcome(other, f, dir, path),
        }
    }
}

/// How long an open waits for a lock that another holder is releasing.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

fn lock_outcome(
    tried: std::io::Result<TryLock>,
    f: Box<dyn FsFile>,
    dir: &Path,
    path: PathBuf,
) -> Result<Box<dyn FsFile>> {
    match tried {
        Ok(TryLock::Acquired) => Ok(f),
        Ok(TryLock::WouldBlock) => Err(Error::Locked {
            dir: dir.to_owned(),
        }),
        Err(e) => Err(Error::Io {
            op: "locking",
            path,
            source: e,
        }),
    }
}

pub(crate) fn open(dir: &Path, opts: Options) -> Result<(Arc<Shared>, RecoveryReport)> {
    opts.check()?;
    check_key_store_outside(dir, &opts)?;
    let fs = &opts.storage.clone();
    let mut report = RecoveryReport::default();
    // 1. The directory's lock and the log's identity.
    let Identity {
        read_only,
        lock_file,
        meta,
        checkpoints_read_before,
    } = identify(fs, dir, &opts)?;
    // 2. What the directory holds: segments, spares, a torn newest one, cold segments from
    // the cold manifest; the sealed prefix.
    let cold = Arc::new(ColdTier::open(fs, dir, &meta.log_id, &opts, read_only)?);
    let listing = list(fs, dir, &meta, &opts, read_only, &cold, &mut report)?;
    // 3. The shared state, with no segment yet.
    let shared = new_shared(dir, &opts, meta, read_only, lock_file, &listing, cold);
    // 4. Sealed segments, trusted from their footers.
    let (first_unsealed, end, last_sealed_time) = trust_sealed(&shared, &listing.found);
    // 5. Unsealed segments, scanned to find where the log ends; a torn tail cut off.
    let (scanned, end) = scan_unsealed(&shared, &listing, first_unsealed, end, &mut report)?;
    // 6. The end is not before what a signed checkpoint covers.
    check_checkpointed_end(&shared, end)?;
    // 7. The stream table, and the indexes of the kept unsealed segments.
    let (table, kept) = stream_table(&shared, &scanned, end)?;
    // 8. Complete unsealed segments sealed; the writer on the last one.
    seal_and_activate(&shared, kept, end, table, last_sealed_time, &mut report)?;
    // 9. The evidence: signing key, checkpoints and key ledger, Merkle tree.
    open_evidence(&shared, checkpoints_read_before, &mut report)?;
    // 10. The producer keys and signing policy; the recorded erasures (and the destruction
    // of any key one names that a crash left).
    load_producers(&shared)?;
    report.erasures_redone = super::personal::load_erasures(&shared)?;
    // 11. The idempotency window and the background threads.
    start(&shared)?;
    Ok((shared, report))
}

/// Refuses a key store inside the log's directory: a copy of the directory would carry the
/// keys, and destroying one would not erase the copy.
fn check_key_store_outside(dir: &Path, opts: &Options) -> Result<()> {
    let Some(store) = &opts.keys else {
        return Ok(());
    };
    let abs = |p: &Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            std::env::current_dir()
                .map(|c| c.join(p))
                .unwrap_or_else(|_| p.to_owned())
        })
    };
    let (d, k) = (abs(dir), abs(store.location()));
    if k.starts_with(&d) {
        return Err(Error::InvalidOptions {
            reason: format!(
                "the key store {} is inside the log's directory {}: keep it elsewhere, or a copy of the directory keeps every key",
                store.location().display(),
                dir.display()
            ),
        });
    }
    Ok(())
}

/// What stage 1 found.
struct Identity {
    read_only: bool,
    /// The directory's lock, held for the log's life (a writable open).
    lock_file: Option<Box<dyn FsFile>>,
    meta: LogMeta,
    /// A read-only view's checkpoints file, read before the segments.
    checkpoints_read_before: Option<Vec<u8>>,
}

/// Stage 1: creates the directory if asked, takes its lock (a writable open), reads or
/// creates `tally.meta`, and for a read-only view reads the checkpoints before the segments.
fn identify(fs: &Storage, dir: &Path, opts: &Options) -> Result<Identity> {
    let read_only = opts.recovery == RecoveryMode::ReadOnly;
    if !fs.exists(&dir.join(META_FILE)) && (!opts.create || read_only) {
        return Err(Error::NotFound {
            dir: dir.to_owned(),
        });
    }
    if !read_only {
        fs.create_dir_all(dir)
            .map_err(io("creating directory", dir))?;
    }
    let lock_file = if read_only {
        None
    } else {
        Some(lock_dir(fs, dir)?)
    };
    let meta = read_or_create_meta(fs, dir, read_only, opts)?;
    // A read-only view reads the checkpoints before the segments: each checkpoint then
    // covers only records the scan will find, even beside a live writer, so that one
    // covering more is evidence of removed records, never "newer than the view".
    let checkpoints_read_before = if read_only {
        Some(Checkpoints::read_for_view(
            fs,
            dir,
            &meta,
            held_by_another(fs, dir),
        )?)
    } else {
        None
    };
    Ok(Identity {
        read_only,
        lock_file,
        meta,
        checkpoints_read_before,
    })
}

/// Stage 2: lists the directory, accepts an interrupted seal, checks that the sealed
/// segments form a prefix that continues itself, and makes the newest footer durable.
fn list(
    fs: &Storage,
    dir: &Path,
    meta: &LogMeta,
    opts: &Options,
    read_only: bool,
    cold: &ColdTier,
    report: &mut RecoveryReport,
) -> Result<Listing> {
    let seed = chain_seed(&meta.log_id);
    let mut listing = list_segments(fs, dir, meta, opts, read_only, cold)?;
    add_cold_segments(dir, cold, &mut listing)?;
    accept_interrupted_seal(&mut listing.found, report)?;
    check_sealed_prefix(&listing.found, seed)?;
    if !read_only {
        sync_newest_footer(fs, &listing.found)?;
    }

    Ok(listing)
}

/// Stage 3: the shared state of a log with no segment, writer, checkpoint or tree yet.
fn new_shared(
    dir: &Path,
    opts: &Options,
    meta: LogMeta,
    read_only: bool,
    lock_file: Option<Box<dyn FsFile>>,
    listing: &Listing,
    cold: Arc<ColdTier>,
) -> Arc<Shared> {
    let seed = chain_seed(&meta.log_id);
    let (found, spares, torn) = (&listing.found, &listing.spares, &listing.torn);
    Arc::new(Shared {
        dir: dir.to_owned(),
        opts: opts.clone(),
        meta,
        seed,
        read_only,
        commit: CommitPath::new(opts.durability == Durability::Fsync),
        visible: Visible::default(),
        segments: SegmentSet::new(
            Spares {
                prepared: spares
                    .iter()
                    .map(|(s, _)| *s)
                    .chain(found.iter().map(|f| f.seq))
                    .chain(torn.iter().map(|t| t.0))
                    .max(),
                ready: spares.clone(),
                wanted: None,
                error: None,
            },
            Arc::clone(&cold),
        ),
        evidence: Evidence::new(seed),
        indexing: Indexing::new(),
        cold,
        producers: Ordered::new(
            Rank::Producers,
            parking_lot::RwLock::new(super::producers::ProducerPolicy::default()),
        ),
        governance: Ordered::new(Rank::Governance, parking_lot::Mutex::new(())),
        erasing: Ordered::new(Rank::Erasing, parking_lot::RwLock::new(())),
        shutdown: AtomicBool::new(false),
        threads: Mutex::new(Vec::new()),
        lock_file: Mutex::new(lock_file),
        closed: AtomicBool::new(false),
        erasures: parking_lot::RwLock::new(std::collections::HashMap::new()),
        retention: super::shared::Worker::default(),
        retention_status: Mutex::new(super::retention::RetentionStatus::default()),
    })
}

/// Stage 4: registers the sealed prefix, trusted from its footers. Returns the index of the
/// first unsealed segment, where the prefix ends, and its last record time.
fn trust_sealed(shared: &Shared, found: &[Found]) -> (usize, End, Timestamp) {
    let fs = shared.fs();
    let seed = shared.seed;
    let first_unsealed = found
        .iter()
        .position(|f| f.footer.is_none())
        .unwrap_or(found.len());
    let mut end = End {
        position: Position(0),
        chain: seed,
    };
    let mut last_sealed_time = Timestamp(0);
    {
        for f in &found[..first_unsealed] {
            let footer = f.footer.expect("sealed prefix");
            let handle = SegmentHandle::new(
                f.seq,
                f.path.clone(),
                fs.clone(),
                f.header,
                None,
                SegState::Sealed {
                    footer,
                    index: Arc::new(Mutex::new(None)),
                },
            );
            if let Some(entry) = f.cold {
                *handle
                    .cold
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ColdPlace {
                    entry,
                    key: cold_object_key(&shared.meta.log_id, f.seq),
                    tier: Arc::clone(&shared.cold),
                });
            }
            shared.segments.push(Arc::new(handle));
            end = End {
                position: footer.last_position.next(),
                chain: footer.last_chain_hash,
            };
            last_sealed_time = footer.last_record_time;
        }
    }

    (first_unsealed, end, last_sealed_time)
}

/// Stage 5: scans the unsealed segments to find where the log ends; a torn tail is cut off
/// (or refused, when the durable bytes prove acknowledged records lost) and spares past the
/// new end are removed. Returns the scanned segments kept, and the end.
fn scan_unsealed<'a>(
    shared: &Arc<Shared>,
    listing: &'a Listing,
    first_unsealed: usize,
    mut end: End,
    report: &mut RecoveryReport,
) -> Result<(Vec<Scanned<'a>>, End)> {
    let (fs, dir, read_only) = (shared.fs(), shared.dir.as_path(), shared.read_only);
    let (found, torn) = (&listing.found, listing.torn.as_slice());
    let unsealed = &found[first_unsealed..];
    let mut scanned: Vec<Scanned<'_>> = Vec::new();
    let mut truncated = false;
    for (j, f) in unsealed.iter().enumerate() {
        let continues =
            f.header.base_position == end.position && f.header.prev_chain_hash == end.chain;
        if !continues {
            if j == 0 {
                return Err(discontinuity(f, end));
            }
            // The previous segment ends before this one starts: the end of the previous
            // segment was lost after a roll (writeback order is arbitrary), so everything
            // from here on was never acknowledged, unless a record proves otherwise.
            let reason = format!(
                "segment {} starts at position {} but the log ends at {}",
                f.seq, f.header.base_position, end.position
            );
            // The previous segment's records end cleanly, but pages written after them may
            // have reached the disk while earlier ones did not: they are cut too (zeroed),
            // or a seal on open would leave them after the footer's end of data.
            let prev = scanned
                .last()
                .expect("j > 0: the previous segment was scanned");
            report.truncations.push(remove_tail(
                shared,
                Some((prev.f, prev.scan.complete_end, 0)),
                &unsealed[j..],
                torn,
                end.position,
                reason,
            )?);
            truncated = true;
            break;
        }
        if let Some(prev) = scanned.last() {
            zero_after_roll(shared, prev)?;
        }
        let (partial, from) = start_of_scan(shared, f);
        let file = fs
            .open(&f.path, OpenMode::Read)
            .map_err(io("opening segment", &f.path))?;
        let mut src = FileSource::new(&*file).map_err(io("reading segment", &f.path))?;
        let s = scan(&mut src, from, f.header.data_limit());
        report.records_scanned += s.records.len() as u64;
        let base_count = partial.as_ref().map_or(0, |p| p.record_count());
        end = End {
            position: Position(f.header.base_position.0 + base_count + s.complete as u64),
            chain: s.complete_chain,
        };
        let clean_end = matches!(s.end, ScanEnd::Clean { .. }) && s.complete == s.records.len();
        if j + 1 == unsealed.len() && partial.is_some() && clean_end && s.records.is_empty() {
            report.clean = true;
        }
        scanned.push(Scanned {
            f,
            partial,
            scan: s,
        });
        if !clean_end {
            let last = scanned.last().expect("pushed above");
            let reason = match &last.scan.end {
                ScanEnd::Break { error, .. } => error.to_string(),
                ScanEnd::Clean { .. } => "unfinished batch".to_owned(),
            };
            report.truncations.push(remove_tail(
                shared,
                Some((
                    f,
                    last.scan.complete_end,
                    (last.scan.records.len() - last.scan.complete) as u64
                        + u64::from(matches!(last.scan.end, ScanEnd::Break { .. })),
                )),
                &unsealed[j + 1..],
                torn,
                end.position,
                reason,
            )?);
            truncated = true;
            break;
        }
        if j + 1 == unsealed.len() && !report.clean {
            // The records end cleanly, but bytes may follow: pages of an unfinished write
            // that reached the disk out of order, or a zeroed header hiding acknowledged
            // records. Evidence decides, as for any torn tail.
            let last = scanned.last().expect("pushed above");
            let mut src = FileSource::new(&*file).map_err(io("reading segment", &f.path))?;
            let (_, last_nonzero) = find_durable_evidence(
                &mut src,
                f.header.layout,
                last.scan.complete_end,
                f.header.data_limit(),
                end.position,
            )
            .map_err(io("reading segment", &f.path))?;
            if last_nonzero > last.scan.complete_end {
                report.truncations.push(remove_tail(
                    shared,
                    Some((f, last.scan.complete_end, 0)),
                    &[],
                    &[],
                    end.position,
                    "bytes after the last complete record".to_owned(),
                )?);
            }
        }
    }
    if let Some(first) = torn.first().filter(|_| !truncated) {
        report.truncations.push(remove_tail(
            shared,
            None,
            &[],
            torn,
            end.position,
            format!("segment {} has no valid header", first.0),
        )?);
        truncated = true;
    }
    if truncated && !read_only {
        // Segment files after the new end are gone; spares prepared after them would leave
        // a gap in the numbering, so they go too and are prepared again.
        let mut spares = shared.segments.spares.lock();
        let removed_spares = !spares.ready.is_empty();
        for (_, path) in spares.ready.drain(..) {
            fs.remove_file(&path)
                .map_err(io("removing spare segment", &path))?;
        }
        // Durable before the log accepts appends: a spare that a second power cut brought
        // back after the segments before it were cut would number past a gap.
        if removed_spares {
            fs.sync_dir(dir).map_err(io("syncing directory", dir))?;
        }
        let last_kept = scanned
            .last()
            .map(|s| s.f.seq)
            .or_else(|| found[..first_unsealed].last().map(|f| f.seq));
        spares.prepared = last_kept;
    }
    // A clean-close sidecar vouches for a clean end once: records this session writes after
    // it may reach the disk out of order, and a power cut that kept a later page of them and
    // lost an earlier one would otherwise pass for a clean close (the scan after the sidecar
    // meets zeros at once), leaving bytes after the end that a seal would keep behind its
    // footer. Removed (durably, before any append) once its content is in memory; the next
    // clean close writes it again.
    if !read_only
        && let Some(last) = scanned.last()
        && last.partial.is_some()
    {
        let path = dir.join(last.f.seq.index_file_name());
        fs.remove_file(&path)
            .map_err(io("removing the clean-close index", &path))?;
        fs.sync_dir(dir).map_err(io("syncing directory", dir))?;
    }

    Ok((scanned, end))
}

/// A segment the log rolled out of ends where the next one starts (checked just before),
/// so nothing after its last record belongs to the log. A power cut can still bring back
/// bytes there behind records that end cleanly: pages of an earlier tail whose zeroing was
/// not synced, or torn halves of them, after zeros that end the scan. They are zeroed
/// (durably) before the segment is sealed, or its footer would keep them behind its end of
/// data.
fn zero_after_roll(shared: &Shared, prev: &Scanned<'_>) -> Result<()> {
    if shared.read_only {
        return Ok(());
    }
    let f = prev.f;
    let from = prev.scan.complete_end;
    let file = shared
        .fs()
        .open(&f.path, OpenMode::Read)
        .map_err(io("opening segment", &f.path))?;
    let mut src = FileSource::new(&*file).map_err(io("reading segment", &f.path))?;
    let (_, last_nonzero) = find_durable_evidence(
        &mut src,
        f.header.layout,
        from,
        f.header.data_limit(),
        Position(u64::MAX),
    )
    .map_err(io("reading segment", &f.path))?;
    if last_nonzero > from {
        let wf = shared
            .fs()
            .open(&f.path, OpenMode::ReadWrite)
            .map_err(io("opening segment", &f.path))?;
        zero_range(&*wf, from, last_nonzero)
            .map_err(io("zeroing bytes after a rolled segment's end", &f.path))?;
    }
    Ok(())
}

/// Stage 6: records a signed checkpoint covers were synced before it was signed: a log that
/// ends before them lost acknowledged records (whole segments gone, say), and a writable
/// open would write new history over them.
fn check_checkpointed_end(shared: &Shared, end: End) -> Result<()> {
    let (fs, dir, opts) = (shared.fs(), shared.dir.as_path(), &shared.opts);
    if opts.recovery == RecoveryMode::Strict
        && let Some((id, size)) = checkpointed_size(fs, &shared.meta, dir)?
        && size > end.position.0
    {
        return Err(corrupt(
            &dir.join(super::checkpoints::CHECKPOINTS_FILE),
            0,
            Some(end.position.0),
            format!(
                "checkpoint {id} covers {size} records, but the segments end at position {}: acknowledged records are missing (open read-only to investigate, or with TruncateDamagedTail to accept the loss)",
                end.position
            ),
            None,
        ));
    }

    Ok(())
}

/// A kept unsealed segment: its handle, index, data end and last chain hash.
type Kept = (SegmentHandle, ActiveIndex, u64, Hash32);

/// Stage 7: the stream table, now that the end is known (from the snapshot and the sealed
/// segments' summaries), and the indexes of the kept unsealed segments, each folded into
/// the table in log order.
fn stream_table(
    shared: &Arc<Shared>,
    scanned: &[Scanned<'_>],
    end: End,
) -> Result<(StreamTable, Vec<Kept>)> {
    let (fs, dir, opts, read_only) = (
        shared.fs(),
        shared.dir.as_path(),
        &shared.opts,
        shared.read_only,
    );
    // The stream table, now that the end is known. A snapshot written at a clean close or
    // by the sealer covers only durable data: if it claims more than recovery found,
    // acknowledged records are missing.
    let snapshot = fs
        .read(&dir.join(SNAPSHOT_FILE))
        .ok()
        .and_then(|b| decode_snapshot(&b).ok())
        .filter(|(id, _, _)| *id == shared.meta.log_id);
    let snapshot = match snapshot {
        Some((_, cover, _)) if cover.next_position > end.position => {
            if opts.recovery == RecoveryMode::Strict {
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
            // The snapshot describes data that is gone: never use it again (the sealer
            // folds new sidecars into the snapshot on disk).
            if !read_only {
                let path = dir.join(SNAPSHOT_FILE);
                fs.remove_file(&path)
                    .map_err(io("removing stale stream snapshot", &path))?;
                fs.sync_dir(dir).map_err(io("syncing directory", dir))?;
            }
            None
        }
        other => other,
    };
    let (mut table, cover) = match snapshot {
        Some((_, cover, entries)) => (StreamTable::from_entries(entries), Some(cover)),
        None => (StreamTable::default(), None),
    };
    apply_sealed_summaries(shared, &mut table, cover.as_ref())?;

    // Indexes of the kept unsealed segments, each folded into the table in log order.
    let mut kept: Vec<Kept> = Vec::new();
    for s in scanned {
        let seq = s.f.seq;
        let mut index = match &s.partial {
            Some(p) => {
                for summary in p.stream_summaries() {
                    table.apply_summary(seq, &summary);
                }
                p.to_active(|name| {
                    let key = table.key_or_insert(name);
                    let st = table.get(key);
                    (key, Arc::clone(&st.name), st.hash)
                })
            }
            None => ActiveIndex::new(seq, s.f.header.base_position),
        };
        let records = &s.scan.records[..s.scan.complete];
        extend_index(&s.f.path, &mut index, records, &mut |name: &str| {
            let key = table.key_or_insert(name);
            let st = table.get(key);
            let prev = if st.first_position.0 == u64::MAX {
                None
            } else if st.last_segment < seq {
                Some(st.last_segment)
            } else {
                // The snapshot already counts this segment (a clean close while it was
                // active): find the previous holder in the sealed indexes.
                super::background::previous_segment_with(shared, seq, name, st.hash)
            };
            (key, Arc::clone(&st.name), st.hash, prev)
        })?;
        for r in records {
            let key = table.key(&r.stream).expect("inserted by extend_index");
            table.apply_event(
                key,
                seq,
                r.header.position,
                r.header.stream_version,
                r.header.record_time,
            );
        }
        let data_end = s.scan.complete_end;
        kept.push((seg_handle(fs, s.f), index, data_end, s.scan.complete_chain));
    }

    Ok((table, kept))
}

/// Stage 8: seals the complete unsealed segments (a read-only view freezes them) and makes
/// the writer on the last kept one, or on a spare; the log's end becomes visible.
fn seal_and_activate(
    shared: &Arc<Shared>,
    mut kept: Vec<Kept>,
    end: End,
    table: StreamTable,
    mut last_sealed_time: Timestamp,
    report: &mut RecoveryReport,
) -> Result<()> {
    let read_only = shared.read_only;
    // Seal complete unsealed segments; the last kept one becomes active. Record time never
    // decreases: the writer starts from the newest record time of any segment before it.
    let last = kept.pop();
    for (_, index, _, _) in &kept {
        last_sealed_time = last_sealed_time.max(index.last_record_time());
    }
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
            seal_on_open(shared, &handle, &index, data_end, chain)?;
            report.sealed_on_open.push(handle.seq);
        }
        shared.segments.push(handle);
    }
    let writer = make_writer(shared, last, end, table, last_sealed_time)?;
    let next_position = writer.next_position;
    *shared.commit.writer.lock() = Some(writer);
    {
        let mut c = shared.commit.lock();
        shared.commit.start_at(&mut c, next_position);
    }
    shared.publish_visible(next_position);
    report.next_position = next_position;
    report.rebuilt_indexes = std::mem::take(&mut *lock(&shared.segments.rebuilt));
    Ok(())
}

/// Stage 9: the signing key (created only for a log that never signed), the checkpoints
/// (checked against the key's ledger), and the Merkle tree checked against the latest.
fn open_evidence(
    shared: &Arc<Shared>,
    checkpoints_read_before: Option<Vec<u8>>,
    report: &mut RecoveryReport,
) -> Result<()> {
    let (fs, dir, opts, read_only) = (
        shared.fs(),
        shared.dir.as_path(),
        &shared.opts,
        shared.read_only,
    );
    let key_path = opts
        .signing_key
        .clone()
        .unwrap_or_else(|| dir.join(super::checkpoints::KEY_FILE));
    // A new key is made only for a log that has never signed a checkpoint: minting one for a
    // log whose key was moved away would sign its future under a key nobody trusts.
    let signed_by = last_checkpoint_signer(
        fs,
        dir,
        crate::format::checkpoint::entry_len(shared.meta.layout.statement_version()),
    )?;
    let key = if read_only {
        None
    } else {
        load_or_create_key(
            fs,
            &key_path,
            opts.signing_key.is_none() && signed_by.is_none(),
        )?
    };
    if key.is_none()
        && !read_only
        && opts.signing_key.is_none()
        && let Some(signer) = signed_by
    {
        return Err(Error::InvalidOptions {
            reason: format!(
                "the signing key {} is missing, but this log's checkpoints are signed (the latest by key {signer}): restore the key file, or name the key to sign with (Options::signing_key; `--key FILE` in tally); a new key is created only for a log without checkpoints",
                key_path.display()
            ),
        });
    }
    if key.is_none() && !read_only {
        return Err(Error::Io {
            op: "reading signing key file",
            path: key_path,
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    // The last checkpoint the key's ledger says it signed for this log: entries up to it
    // were acknowledged, so damage there is never cut off as an interrupted write.
    let recorded = if read_only {
        None
    } else {
        let ledger = super::checkpoints::ledger::path_for(&key_path);
        super::checkpoints::ledger::read(fs, &ledger)?
            .get(&shared.meta.log_id)
            .map(|s| s.id)
    };
    let mut cps = Checkpoints::open(shared, key, checkpoints_read_before, recorded)?;
    if !read_only {
        // Refuse to sign after checkpoints were removed or replaced (laundering).
        let ledger = super::checkpoints::ledger::path_for(&key_path);
        super::checkpoints::ledger::check(
            fs,
            &ledger,
            &dir.join(super::checkpoints::CHECKPOINTS_FILE),
            &shared.meta.log_id,
            &cps.list,
        )?;
        cps.key_path = Some(key_path.clone());
    }
    let trusted = cps
        .list
        .last()
        .map(|c| (c.statement.tree_size, c.statement.root));
    report.checkpoint_tail_truncated = cps.truncated_at;
    shared.evidence.signed.write().clone_from(&cps.list);
    let _ = shared.evidence.public_key.set(cps.public_key());
    *shared.evidence.checkpoints.lock() = cps;
    let mut tree = open_tree(shared, trusted)?;
    report.merkle_tree_rebuilt = tree.rebuilt;
    if shared.meta.layout.links_stream_prev() {
        // The tree now covers the whole log, as the stream table does: its heads map is the
        // table's streams, from here on kept in step as the tree catches up.
        let entries = shared
            .commit
            .writer
            .lock()
            .as_ref()
            .map_or_else(Vec::new, |w| {
                w.streams
                    .iter()
                    .map(|st| {
                        (
                            crate::format::heads::stream_key(st.name.as_bytes()),
                            st.last_version,
                            st.last_position.0,
                        )
                    })
                    .collect()
            });
        let heads = crate::format::heads::StreamHeads::from_entries(entries);
        debug_assert_eq!(tree.size(), shared.visible_position().0);
        tree.heads = Some(heads);
    }
    *shared.evidence.tree.lock() = tree;
    Ok(())
}

/// Stage 10: the producer keys and signing policy, from their system stream.
fn load_producers(shared: &Arc<Shared>) -> Result<()> {
    {
        let mut policy = super::producers::ProducerPolicy::default();
        for e in super::read::read_stream(
            shared,
            super::producers::PRODUCERS_STREAM,
            0,
            usize::MAX,
            super::Direction::Forward,
        )? {
            policy.apply(e.event_type(), e.payload())?;
        }
        *shared.producers.write() = policy;
    }
    Ok(())
}

/// Stage 11: a writable log rebuilds its idempotency window, starts its threads and asks
/// for the next spare.
fn start(shared: &Arc<Shared>) -> Result<()> {
    let read_only = shared.read_only;
    if !read_only {
        rebuild_id_window(shared)?;
        start_threads(shared)?;
        let next = shared
            .commit
            .writer
            .lock()
            .as_ref()
            .map(|w| SegmentSeq(w.seg.handle.seq.0 + 1));
        if let Some(next) = next {
            request_spare(shared, next);
        }
    }
    Ok(())
}

/// Folds the stream tables of sealed segments into `table`: all of them, or those from the
/// snapshot's segment on (folding is idempotent, so the covered segment may be folded again).
fn apply_sealed_summaries(
    shared: &Shared,
    table: &mut StreamTable,
    cover: Option<&SnapshotCover>,
) -> Result<()> {
    let sealed: Vec<Arc<SegmentHandle>> = shared.segments_snapshot();
    for seg in &sealed {
        if cover.is_some_and(|c| seg.seq < c.seq) {
            continue;
        }
        let (index, _) = sealed_index(shared, seg)?.expect("sealed segments have an index");
        for s in index.stream_summaries() {
            table.apply_summary(seg.seq, &s);
        }
    }
    Ok(())
}

/// A damaged footer on the newest sealed segment, followed only by unsealed ones, is an
/// interrupted seal: the segment is scanned and sealed again. Anywhere else it is damage.
fn accept_interrupted_seal(found: &mut [Found], report: &mut RecoveryReport) -> Result<()> {
    let n = found.len();
    for i in 0..n {
        if !found[i].footer_damaged {
            continue;
        }
        if found[i + 1..]
            .iter()
            .any(|f| f.footer.is_some() || f.footer_damaged)
        {
            let f = &found[i];
            return Err(corrupt(
                &f.path,
                f.header.footer_offset(),
                None,
                "damaged footer on a segment followed by sealed segments".into(),
                None,
            ));
        }
        found[i].footer_damaged = false;
        report.footers_rewritten.push(found[i].seq);
    }
    Ok(())
}

fn seg_handle(fs: &Storage, f: &Found) -> SegmentHandle {
    SegmentHandle::new(
        f.seq,
        f.path.clone(),
        fs.clone(),
        f.header,
        None,
        SegState::Active,
    )
}

fn read_or_create_meta(
    fs: &Storage,
    dir: &Path,
    read_only: bool,
    opts: &Options,
) -> Result<LogMeta> {
    let path = dir.join(META_FILE);
    match fs.read(&path) {
        Ok(bytes) => LogMeta::decode(&bytes)
            .map_err(|e| corrupt(&path, 0, None, "log identity file".into(), Some(e))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !read_only => {
            let mut log_id = [0u8; 16];
            log_id[..8].copy_from_slice(&super::random_u64().to_le_bytes());
            log_id[8..].copy_from_slice(&super::random_u64().to_le_bytes());
            let meta = LogMeta {
                log_id,
                created_time: now(),
                layout: crate::format::record::Layout::of_version(opts.format_version).ok_or_else(
                    || Error::InvalidOptions {
                        reason: format!("format_version {} (1, 2 or 3)", opts.format_version),
                    },
                )?,
            };
            fs.write_file_atomic(dir, META_FILE, &meta.encode(), false)
                .map_err(io("writing log identity", &path))?;
            if let Some(parent) = dir.parent() {
                let _ = fs.sync_dir(parent);
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

/// Temporary files Tally itself leaves behind when interrupted.
fn is_our_temporary(name: &str) -> bool {
    crate::format::files::is_temporary(name)
}

/// Lists segment files: those with headers, in order, spare (all-zero) ones, and a newest
/// one whose header is missing but which holds data.
fn list_segments(
    fs: &Storage,
    dir: &Path,
    meta: &LogMeta,
    opts: &Options,
    read_only: bool,
    cold: &ColdTier,
) -> Result<Listing> {
    let cold_seqs: std::collections::HashSet<SegmentSeq> =
        cold.entries().iter().map(|e| e.seq).collect();
    let mut seqs = Vec::new();
    for name in fs.read_dir(dir).map_err(io("listing directory", dir))? {
        let name = name.to_string_lossy();
        if is_our_temporary(&name) {
            if !read_only {
                let _ = fs.remove_file(&dir.join(&*name));
            }
            continue;
        }
        if let Some(seq) = SegmentSeq::parse_file_name(&name) {
            seqs.push(seq);
        }
    }
    seqs.sort();
    // First pass: header pages, and whether the first data page is empty.
    let mut files = Vec::with_capacity(seqs.len());
    for seq in seqs {
        let path = dir.join(seq.file_name());
        let file = fs
            .open(&path, OpenMode::Read)
            .map_err(io("opening segment", &path))?;
        let len = file.len().map_err(io("reading segment size", &path))?;
        if len < crate::format::SEGMENT_BYTES_MIN {
            return Err(corrupt(
                &path,
                len,
                None,
                format!("segment file is only {len} bytes"),
                None,
            ));
        }
        let page = read_page(&*file, 0).map_err(io("reading segment header", &path))?;
        let first_data =
            read_page(&*file, SEGMENT_DATA_START).map_err(io("reading segment", &path))?;
        let empty = is_zero(&page) && is_zero(&first_data);
        files.push((seq, path, file, len, page, empty));
    }
    let newest_used = files.iter().rposition(|f| !f.5);
    let mut listing = Listing {
        found: Vec::new(),
        spares: Vec::new(),
        torn: Vec::new(),
    };
    for (i, (seq, path, file, len, page, empty)) in files.into_iter().enumerate() {
        if !listing.torn.is_empty() {
            listing.torn.push((seq, path));
            continue;
        }
        if empty {
            if newest_used.is_some_and(|n| i < n) {
                listing.torn.push((seq, path));
                continue;
            }
            let _ = len;
            listing.spares.push((seq, path));
            continue;
        }
        let header = match SegmentHeader::decode_page(&page) {
            Ok(h) => h,
            Err(e) if Some(i) == newest_used => {
                // The newest segment's header may not have reached the disk if the crash
                // came before its first sync; recovery decides once the log's end is known.
                let _ = e;
                listing.torn.push((seq, path));
                continue;
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
        if header.layout != meta.layout {
            return Err(corrupt(
                &path,
                0,
                None,
                format!(
                    "segment of format version {} in a log of format version {}",
                    header.layout.version(),
                    meta.layout.version()
                ),
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
        // A gap is allowed only where the cold manifest has the missing segments (local
        // files the manifest also has: an interrupted compaction). The whole sequence is
        // checked once the cold segments join the listing.
        if let Some(prev) = listing.found.last()
            && prev.seq.0 + 1 != seq.0
            && !(prev.seq.0 + 1..seq.0).all(|s| cold_seqs.contains(&SegmentSeq(s)))
        {
            return Err(corrupt(
                &path,
                0,
                None,
                format!("segment {} is missing", prev.seq.0 + 1),
                None,
            ));
        }
        let fpage =
            read_page(&*file, header.footer_offset()).map_err(io("reading footer", &path))?;
        let (footer, footer_damaged) = if is_zero(&fpage) {
            (None, false)
        } else {
            match SegmentFooter::decode_page(&fpage) {
                Ok(f)
                    if f.seq == seq
                        && f.log_id == meta.log_id
                        && f.layout == header.layout
                        && f.first_position == header.base_position
                        && f.data_end <= header.data_limit() =>
                {
                    (Some(f), false)
                }
                _ => (None, true),
            }
        };
        listing.found.push(Found {
            seq,
            path,
            header,
            footer,
            footer_damaged,
            cold: None,
        });
    }
    if let (Some((seq, path)), Some(last)) = (listing.torn.first(), listing.found.last())
        && seq.0 != last.seq.0 + 1
    {
        return Err(corrupt(path, 0, None, "segment header".into(), None));
    }
    // Spare files of another size (from an earlier segment_bytes) are removed: they hold
    // nothing.
    let next_seq = listing
        .torn
        .last()
        .map(|t| t.0.0)
        .or(listing.found.last().map(|f| f.seq.0))
        .map_or(0, |s| s + 1);
    // Kept spares must number on from the next segment without a gap: the preparer makes
    // only numbers above every spare, so a gap (whole segments removed from the directory)
    // would leave a number nobody prepares.
    let mut ready = Vec::new();
    let mut removed_spares = false;
    let mut spares = std::mem::take(&mut listing.spares);
    spares.sort_by_key(|(s, _)| *s);
    let mut want = next_seq;
    for (seq, path, len) in spares
        .into_iter()
        .map(|(s, p)| (s, p.clone(), fs.file_len(&p).unwrap_or(0)))
    {
        if len == opts.segment_bytes && seq.0 == want {
            ready.push((seq, path));
            want += 1;
        } else if !read_only {
            fs.remove_file(&path)
                .map_err(io("removing spare segment", &path))?;
            removed_spares = true;
        }
    }
    // Removals are durable before the log accepts appends (a spare brought back by a
    // power cut would be a spare past a gap again).
    if removed_spares {
        fs.sync_dir(dir).map_err(io("syncing directory", dir))?;
    }
    listing.spares = ready;
    Ok(listing)
}

/// The error for a segment that does not start where the log before it ends.
fn discontinuity(f: &Found, end: End) -> Error {
    corrupt(
        &f.path,
        0,
        Some(end.position.0),
        format!(
            "segment does not continue the log: it starts at position {} (expected {}) or its previous chain hash differs",
            f.header.base_position, end.position
        ),
        None,
    )
}

/// Stage 2, continued: the cold segments of the manifest whose local file is gone join the
/// listing in sequence order (a segment both local and in the manifest is read locally: a
/// compaction was interrupted before it removed the file). Together they must be
/// consecutive.
fn add_cold_segments(dir: &Path, cold: &ColdTier, listing: &mut Listing) -> Result<()> {
    let local: std::collections::HashSet<SegmentSeq> = listing
        .found
        .iter()
        .map(|f| f.seq)
        .chain(listing.torn.iter().map(|t| t.0))
        .chain(listing.spares.iter().map(|s| s.0))
        .collect();
    let mut found: Vec<Found> = cold
        .entries()
        .into_iter()
        .filter(|e| !local.contains(&e.seq))
        .map(|e| Found {
            seq: e.seq,
            path: dir.join(e.seq.file_name()),
            header: e.segment_header,
            footer: Some(e.segment_footer),
            footer_damaged: false,
            cold: Some(e),
        })
        .collect();
    if found.is_empty() {
        return Ok(());
    }
    found.append(&mut listing.found);
    found.sort_by_key(|f| f.seq);
    for w in found.windows(2) {
        if w[0].seq.0 + 1 != w[1].seq.0 {
            return Err(corrupt(
                &w[1].path,
                0,
                None,
                format!(
                    "segment {} is missing: it is neither in the directory nor in the cold manifest",
                    w[0].seq.0 + 1
                ),
                None,
            ));
        }
    }
    listing.found = found;
    Ok(())
}

/// Makes the newest sealed segment's footer durable before recovery builds on it. The
/// sealer syncs each footer before it seals the next segment, so only the newest can be
/// one that a crashed writer wrote and never synced (its sync failed, or it was killed
/// between the write and the sync): read from the page cache it looks sealed, and a
/// segment sealed after it by this open would be "sealed after an unsealed one" once a
/// power cut took the unsynced footer away (found by the simulation test).
fn sync_newest_footer(fs: &Storage, found: &[Found]) -> Result<()> {
    let Some(f) = found
        .iter()
        .rev()
        .find(|f| f.footer.is_some() && f.cold.is_none())
    else {
        return Ok(());
    };
    fs.open(&f.path, OpenMode::ReadWrite)
        .and_then(|file| file.sync_data())
        .map_err(io("syncing segment", &f.path))
}

/// Checks that the sealed segments form a prefix and continue each other.
fn check_sealed_prefix(found: &[Found], seed: Hash32) -> Result<()> {
    let mut seen_unsealed = false;
    let mut end = End {
        position: Position(0),
        chain: seed,
    };
    for f in found {
        let continues =
            f.header.base_position == end.position && f.header.prev_chain_hash == end.chain;
        if !continues && !seen_unsealed {
            return Err(discontinuity(f, end));
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

/// Where to start scanning an unsealed segment: after its clean-close sidecar if there is a
/// valid one, else at its first record.
fn start_of_scan(shared: &Shared, f: &Found) -> (Option<Arc<SealedIndex>>, ScanFrom) {
    let fresh = ScanFrom {
        layout: f.header.layout,
        offset: SEGMENT_DATA_START,
        position: f.header.base_position,
        chain: f.header.prev_chain_hash,
    };
    let path = shared.dir.join(f.seq.index_file_name());
    let Ok(idx) = load_index(shared.fs(), &path) else {
        return (None, fresh);
    };
    let plausible = !idx.is_complete()
        && idx.log_id() == shared.meta.log_id
        && idx.seq() == f.seq
        && idx.base_position() == f.header.base_position
        && idx.data_end() >= SEGMENT_DATA_START
        && idx.data_end() <= f.header.data_limit();
    if !plausible {
        return (None, fresh);
    }
    let from = ScanFrom {
        layout: f.header.layout,
        offset: idx.data_end(),
        position: Position(f.header.base_position.0 + idx.record_count()),
        chain: if idx.record_count() == 0 {
            f.header.prev_chain_hash
        } else {
            idx.last_chain_hash()
        },
    };
    (Some(idx), from)
}

/// Removes what follows the end of the log: the bytes after `cut` in a segment (zeroed),
/// every later segment file, and a newest segment without a header. First looks for
/// evidence that any of it was acknowledged (a record saying the log was durable beyond
/// `end`): with evidence, `Strict` refuses to open.
fn remove_tail(
    shared: &Shared,
    cut: Option<(&Found, u64, u64)>,
    later: &[Found],
    torn: &[(SegmentSeq, PathBuf)],
    end: Position,
    reason: String,
) -> Result<Truncation> {
    let mut regions: Vec<(PathBuf, u64, u64)> = Vec::new();
    if let Some((f, offset, _)) = cut {
        regions.push((f.path.clone(), offset, f.header.data_limit()));
    }
    for l in later {
        regions.push((l.path.clone(), SEGMENT_DATA_START, l.header.data_limit()));
    }
    for (_, path) in torn {
        let len = shared
            .fs()
            .file_len(path)
            .map_err(io("reading segment size", path))?;
        regions.push((path.clone(), SEGMENT_DATA_START, len - PAGE_BYTES));
    }
    let mut evidence = None;
    let mut cut_end = 0;
    for (i, (path, from, limit)) in regions.iter().enumerate() {
        let file = shared
            .fs()
            .open(path, OpenMode::Read)
            .map_err(io("opening segment", path))?;
        let mut src = FileSource::new(&*file).map_err(io("reading segment", path))?;
        let (e, last_nonzero) =
            find_durable_evidence(&mut src, shared.meta.layout, *from, *limit, end)
                .map_err(io("reading segment", path))?;
        if i == 0 && cut.is_some() {
            cut_end = last_nonzero;
        }
        if evidence.is_none() {
            evidence = e.map(|(at, h)| (path.clone(), at, h));
        }
    }
    let checkpointed = checkpointed_size(shared.fs(), &shared.meta, &shared.dir)?
        .filter(|&(_, size)| size > end.0);
    let acknowledged = evidence.is_some() || checkpointed.is_some();
    if let Some((id, size)) = checkpointed
        && shared.opts.recovery == RecoveryMode::Strict
    {
        let (file, offset) = cut.map_or_else(
            || {
                later
                    .first()
                    .map(|l| l.path.clone())
                    .or_else(|| torn.first().map(|(_, p)| p.clone()))
                    .map_or_else(|| (shared.dir.clone(), 0), |p| (p, 0))
            },
            |(f, o, _)| (f.path.clone(), o),
        );
        return Err(corrupt(
            &file,
            offset,
            Some(end.0),
            format!(
                "{reason}; acknowledged data follows: checkpoint {id} covers {size} records, and the records it covers were synced before it was signed"
            ),
            None,
        ));
    }
    if let Some((path, at, h)) = &evidence
        && shared.opts.recovery == RecoveryMode::Strict
    {
        let (file, offset) = cut.map_or((path.clone(), *at), |(f, o, _)| (f.path.clone(), o));
        return Err(corrupt(
            &file,
            offset,
            Some(end.0),
            format!(
                "{reason}; acknowledged data follows ({} byte {at}: record {} was written when the log was durable through position {})",
                path.display(),
                h.position,
                h.durable_through()
            ),
            None,
        ));
    }
    let (file, offset) = match (cut, later.first(), torn.first()) {
        (Some((f, o, _)), _, _) => (f.path.clone(), o),
        (None, Some(l), _) => (l.path.clone(), 0),
        (None, None, Some((_, p))) => (p.clone(), 0),
        (None, None, None) => unreachable!("remove_tail is called with something to remove"),
    };
    let mut bytes = 0;
    if let Some((f, o, _)) = cut {
        bytes += cut_end.saturating_sub(o);
        if !shared.read_only && cut_end > o {
            let wf = shared
                .fs()
                .open(&f.path, OpenMode::ReadWrite)
                .map_err(io("opening segment", &f.path))?;
            zero_range(&*wf, o, cut_end).map_err(io("zeroing torn tail", &f.path))?;
        }
    }
    let removed: Vec<(SegmentSeq, PathBuf)> = later
        .iter()
        .map(|l| (l.seq, l.path.clone()))
        .chain(torn.iter().cloned())
        .collect();
    for (seq, path) in &removed {
        let fs = shared.fs();
        bytes += fs.file_len(path).unwrap_or(0);
        if !shared.read_only {
            fs.remove_file(path)
                .map_err(io("removing segment after the end of the log", path))?;
            let _ = fs.remove_file(&shared.dir.join(seq.index_file_name()));
            let _ = fs.remove_file(&shared.dir.join(super::attrs::attr_file_name(*seq)));
        }
    }
    if !removed.is_empty() && !shared.read_only {
        shared
            .fs()
            .sync_dir(&shared.dir)
            .map_err(io("syncing directory", &shared.dir))?;
    }
    Ok(Truncation {
        file,
        offset,
        bytes,
        first_lost_position: end,
        records: cut.map_or(0, |c| c.2),
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
    let file = shared
        .fs()
        .open(path, OpenMode::Read)
        .map_err(io("opening segment", path))?;
    file.sync_data().map_err(io("syncing segment", path))?;
    let mut src = FileSource::new(&*file).map_err(io("reading segment", path))?;
    let footer = footer_from_records(&mut src, &handle.header, data_end, path)?;
    write_footer(shared.fs(), path, &handle.header, &footer)?;
    let info = IndexFileInfo {
        log_id: shared.meta.log_id,
        data_end,
        last_chain_hash: chain,
    };
    let sealed = write_sealed_index(shared.fs(), &shared.dir, handle.seq, index, &info)?;
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
    last_sealed_time: Timestamp,
) -> Result<Writer> {
    let ids = IdWindow::new(shared.opts.idempotency_window);
    let last_record_time = Timestamp(0);
    if let Some((handle, index, data_end, chain)) = last {
        let path = handle.path.clone();
        let (map, map_writer) = if shared.read_only {
            let file = shared
                .fs()
                .open(&path, OpenMode::Read)
                .map_err(io("opening segment", &path))?;
            let map = SegmentMap::map_read_only(&*file, handle.header.capacity, data_end)
                .map_err(io("mapping segment", &path))?;
            (map, None)
        } else {
            let file = shared
                .fs()
                .open(&path, OpenMode::ReadWrite)
                .map_err(io("opening segment", &path))?;
            // Whatever recovery read came from the page cache; make it durable before
            // anything new is acknowledged on top of it.
            file.sync_data().map_err(io("syncing segment", &path))?;
            // A segment restored from a backup may be a sparse file: a store into a hole on
            // a full disk would be SIGBUS, so the blocks are allocated now (or the open
            // fails with the disk's error).
            file.allocate(handle.header.capacity)
                .map_err(io("allocating segment", &path))?;
            let (map, writer) = SegmentMap::map(&*file, handle.header.capacity, data_end)
                .map_err(io("mapping segment", &path))?;
            (map, Some(writer))
        };
        *handle
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(map);
        let handle = Arc::new(handle);
        shared.segments.push(Arc::clone(&handle));
        // Record time never decreases, even across a reopen onto an empty segment.
        let last_time = index.last_record_time().max(last_sealed_time);
        return Ok(Writer {
            seg: ActiveSegment {
                handle,
                map_writer,
                index,
                write_offset: data_end,
            },
            next_position: end.position,
            chain,
            last_record_time: last_time,
            streams,
            ids,
        });
    }
    let next_seq = shared
        .segments
        .list()
        .last()
        .map_or(SegmentSeq(0), |s| SegmentSeq(s.seq.0 + 1));
    if shared.read_only {
        // Nothing to write to: a placeholder active segment that is in no list and is never
        // read (its index is empty).
        let handle = Arc::new(SegmentHandle {
            seq: next_seq,
            path: shared.dir.join(next_seq.file_name()),
            fs: shared.fs().clone(),
            header: super::append::segment_header(
                shared,
                next_seq,
                end.position,
                end.chain,
                shared.opts.segment_bytes,
            ),
            map: Arc::new(RwLock::new(None)),
            state: RwLock::new(SegState::Active),
            cold: RwLock::new(None),
            tier: std::sync::OnceLock::new(),
        });
        return Ok(Writer {
            seg: ActiveSegment {
                handle,
                map_writer: None,
                index: ActiveIndex::new(next_seq, end.position),
                write_offset: SEGMENT_DATA_START,
            },
            next_position: end.position,
            chain: end.chain,
            last_record_time,
            streams,
            ids,
        });
    }
    let have_spare = shared
        .segments
        .spares
        .lock()
        .ready
        .iter()
        .any(|(s, _)| *s == next_seq);
    if !have_spare {
        let path = prepare_spare(
            shared.fs(),
            &shared.dir,
            next_seq,
            shared.opts.segment_bytes,
            shared.opts.durability,
        )
        .map_err(io(
            "preparing segment",
            &shared.dir.join(next_seq.file_name()),
        ))?;
        let mut spares = shared.segments.spares.lock();
        spares.ready.push((next_seq, path));
        spares.prepared = spares.prepared.max(Some(next_seq));
    }
    let (handle, map_writer) = super::background::activate_spare(
        shared,
        next_seq,
        end.position,
        end.chain,
        super::append::Blocking::Allowed,
    )?;
    // The header must be durable with the first records; register it.
    shared
        .commit
        .lock()
        .add_dirty(map_writer.map(), 0, PAGE_BYTES);
    shared.segments.push(Arc::clone(&handle));
    let last_time = last_sealed_time;
    Ok(Writer {
        seg: ActiveSegment {
            handle,
            map_writer: Some(map_writer),
            index: ActiveIndex::new(next_seq, end.position),
            write_offset: SEGMENT_DATA_START,
        },
        next_position: end.position,
        chain: end.chain,
        last_record_time: last_time,
        streams,
        ids,
    })
}

/// Fills the idempotency window with the ids of the newest records, newest segment first.
fn rebuild_id_window(shared: &Shared) -> Result<()> {
    let mut guard = shared.commit.writer.lock();
    let w = guard.as_mut().expect("writer made above");
    let active_ids = slots_of_active(&w.seg.index, w.seg.handle.header.base_position);
    for (id, slot) in active_ids {
        w.ids.insert(id, slot);
    }
    let segs = shared.segments_snapshot();
    for seg in segs.iter().rev() {
        if w.ids.room() == 0 {
            break;
        }
        if seg.seq == w.seg.handle.seq {
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
            if let Some(slot) = slots.get_mut(e.pos_delta as usize) {
                *slot = Some((key, e.version));
            }
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
