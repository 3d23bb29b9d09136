//! Full verification (see [`super::Log::verify_with`]).
//!
//! Segments are checked in parallel, each by one worker and independently of the others:
//! the header, every record's checksums, envelope, position, batch flags and chain link
//! (starting from the previous chain hash in the segment's own header), and for a sealed
//! segment the footer, the zero bytes after the records and the index. A worker also hashes
//! its records' leaves into the aligned subtrees of the whole-log Merkle tree they make up
//! ([`AlignedRange`]), with a snapshot wherever a checkpoint ends inside the segment.
//!
//! One thread joins the results in log order: each segment must continue the one before
//! (base position and previous chain hash), the whole tree grows by the segment's subtrees,
//! and each checkpoint's signature, root and chain head are checked. The first failure in
//! log order is reported, whichever worker found it.
//!
//! Derived files are checked against the records as well, never trusted: each segment's
//! streams (from its verified sidecar, or from its records) are joined into the stream
//! table the records give, which every sidecar's `prev_segment` link and the stream
//! snapshot must match ([`streams`]); and every stored node of the Merkle node file that
//! the records reach must be the root its records give ([`nodes`]).

mod nodes;
mod streams;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::background::{corrupt, index_matches, sealed_index};
use super::checkpoints::CHECKPOINTS_FILE;
use super::shared::{SegState, SegmentHandle, Shared, lock};
use super::{VerifyOptions, VerifyReport};
use crate::error::{Error, Result};
use crate::format::Timestamp;
use crate::format::chain::{AlignedRange, MerkleBuilder, leaf_hash};
use crate::format::checkpoint::{SignedCheckpoint, entry_len};
use crate::format::heads::{HeadKey, stream_key};
use crate::format::proof::{NodeSource, hex};
use crate::format::record::NO_STREAM_PREV;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::tree::CHUNK_LEVEL;
use crate::format::{Hash32, Position, SEGMENT_DATA_START};
use crate::index::SealedIndex;
use crate::segment::{Content, FileSource, RecordError, ScanEnd, ScanFrom, read_page, scan_visit};
use crate::sys::FsFile;
use nodes::NodeFile;
use streams::{SegStream, SegStreams, StreamJoin};

/// What one worker learned about one segment.
struct Checked {
    header: SegmentHeader,
    records: u64,
    bytes: u64,
    /// The chain hash of the last record (the header's previous chain hash if none).
    last_chain: Hash32,
    /// The segment's records as aligned subtrees of the whole tree.
    subtrees: Vec<(u32, Hash32)>,
    /// Every checkpoint whose tree ends inside the segment.
    at_checkpoints: Vec<InsideCheckpoint>,
    /// The segment's streams, in order of first appearance (from its verified sidecar, or
    /// from its records).
    streams: Vec<SegStream>,
    /// The streams of the records before the stream snapshot's end, when it ends inside
    /// this segment.
    before_snapshot: Option<Vec<SegStream>>,
    /// A sealed segment whose index sidecar is missing (checked from its records).
    sidecar_missing: bool,
    /// Stored Merkle nodes compared.
    nodes: u64,
    /// Version 2: the segment's streams in pieces that end at each checkpoint inside it and
    /// at its end, as `(tree size at the piece's end, streams of the piece)`, for the stream
    /// heads map a version 2 checkpoint commits to.
    pieces: Vec<(u64, Vec<Head>)>,
    /// With producer checks: the signatures of the segment's signed batches, by the
    /// position of their first record (the joiner finds replays across segments), and the
    /// number of unsigned batches.
    signatures: Vec<(u64, [u8; 64])>,
    unsigned_batches: u64,
    /// Record times of the first and last record (version 2 logs check that they never
    /// decrease across segments).
    first_time: Option<Timestamp>,
    last_time: Option<Timestamp>,
    /// The blobs the segment's events refer to, with the position of each event.
    blobs: Vec<(u64, crate::format::blob::BlobRef)>,
    /// Records whose event retention removed, as `(position, removed_by, of a system
    /// stream retention never prunes)`.
    pruned: Vec<(u64, u64, bool)>,
    /// Signed batches with a removed event: their signature can no longer be checked.
    pruned_batches: u64,
}

/// The streams of a segment before `from_segment` (trusted), from its sidecar, or from the
/// writer's in-memory index while the writer is still sealing it.
fn trusted_streams(shared: &Shared, seg: &SegmentHandle) -> Result<Vec<SegStream>> {
    if let Some((idx, _)) = sealed_index(shared, seg)? {
        return Ok(idx
            .stream_links()
            .map(|(s, link)| {
                let key = stream_key(s.name.as_bytes());
                seg_stream(s, key, Some(link))
            })
            .collect());
    }
    let frozen = match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Frozen { index, .. } => Arc::clone(index),
        _ => {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "verify from a later segment: segment {} before it is still being written",
                    seg.seq
                ),
            });
        }
    };
    let base = seg.header.base_position.0;
    Ok(frozen
        .runs()
        .filter_map(|(_, run)| {
            let (first, last) = (run.entries.first()?, run.entries.last()?);
            Some(SegStream {
                name: run.name.to_string(),
                key: stream_key(run.name.as_bytes()),
                first_version: first.version,
                last_version: last.version,
                first_position: Position(base + u64::from(first.pos_delta)),
                last_position: Position(base + u64::from(last.pos_delta)),
                first_record_time: run.first_record_time,
                link: Some(run.prev_segment),
                first_stream_prev: None,
            })
        })
        .collect())
}

/// A stream's head at the end of a piece: its key, last version and last position.
type Head = (HeadKey, u64, u64);

/// The heads of a piece's streams, sorted by key: the joiner then walks the heads map's
/// buckets in order instead of at random.
fn heads_of(list: &[SegStream]) -> Vec<Head> {
    let mut heads: Vec<Head> = list
        .iter()
        .map(|s| (s.key, s.last_version, s.last_position.0))
        .collect();
    heads.sort_unstable_by_key(|h| h.0);
    heads
}

/// What the workers share.
struct Context<'a> {
    shared: &'a Shared,
    checkpoint_sizes: &'a [u64],
    bytes_read: &'a AtomicU64,
    nodes: &'a NodeFile,
    /// Where the stream snapshot ends, when it is checked.
    snapshot_end: Option<u64>,
    /// The producers trusted, when batches' signatures are checked.
    producers: Option<&'a super::producers::ProducerTrust>,
}

/// A checkpoint's tree ending inside a segment: its size, the segment's subtrees up to
/// there, and the chain hash of its last record.
type InsideCheckpoint = (u64, Vec<(u32, Hash32)>, Hash32);

/// Checks every segment from `options.from_segment` with `options.threads` workers.
pub(crate) fn verify(
    shared: &Shared,
    options: &VerifyOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport> {
    // Checkpoints first: every one signed so far covers no more than the records visible
    // after it, so none is newer than the view of the log taken next.
    let cp_path = shared.dir.join(CHECKPOINTS_FILE);
    let checkpoints = {
        let cps = shared.evidence.checkpoints.lock();
        if let Some((offset, cause)) = cps.damage.clone() {
            return Err(corrupt(
                &cp_path,
                offset,
                None,
                "damaged checkpoint".into(),
                Some(cause),
            ));
        }
        cps.list.clone()
    };
    let snapshot = streams::read_snapshot(shared.fs(), &shared.dir, &shared.meta.log_id)?;
    let node_file = NodeFile::open(shared.fs(), &shared.dir, &shared.meta.log_id)?;
    let visible = shared.visible_position();
    let mut segs = shared.segments_snapshot();
    let mut report = VerifyReport {
        last_chain_hash: shared.seed,
        format_version: shared.meta.layout.version(),
        ..VerifyReport::default()
    };
    let snapshot_path = shared.dir.join(super::streams::SNAPSHOT_FILE);
    let producer_trust = options.producers.clone();
    let mut streams = StreamJoin::default();
    // The blobs the checked events refer to, with the position of each event.
    let mut blob_refs: Vec<(u64, crate::format::blob::BlobRef)> = Vec::new();
    // Records whose event retention removed, `(position, removed_by, of a system stream
    // retention never prunes)`.
    let mut pruned: Vec<(u64, u64, bool)> = Vec::new();
    // With `from_segment`: the heads of the trusted segments' streams, in log order.
    let mut trusted_heads: Vec<Head> = Vec::new();
    // The whole-log Merkle tree, recomputed from the records, checked at each checkpoint.
    let mut whole = MerkleBuilder::new();
    check_kept_ids(&cp_path, &checkpoints, &options.kept)?;
    let mut cps = CheckpointCheck {
        shared,
        options,
        targets: targets(&cp_path, &checkpoints, &options.kept),
        next: 0,
    };
    if let Some(from) = options.from_segment {
        let Some(first) = segs.iter().position(|s| s.seq >= from) else {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "verify from segment {}: the log has no such segment",
                    from.0
                ),
            });
        };
        let seg = &segs[first];
        report.last_chain_hash = seg.header.prev_chain_hash;
        report.first_position = seg.header.base_position;
        // Earlier records are trusted: start from the frontier the node file gives, and
        // check earlier checkpoints against the node file.
        let base = seg.header.base_position.0;
        let mut tree = shared.evidence.tree.lock();
        tree.catch_up(shared, Position(base))?;
        let mut src = tree.source(shared);
        let mut done = 0u64;
        for level in (0..64u32).rev() {
            if base & (1 << level) != 0 {
                whole.push_perfect(level, src.perfect(level, done >> level)?);
                done += 1 << level;
            }
        }
        while let Some(cp) = cps.pending(base) {
            let root = if cp.statement.tree_size == base {
                whole.root()
            } else {
                crate::format::proof::root(&mut src, cp.statement.tree_size)?
            };
            // The heads map of trusted records is not recomputed.
            let kept = cps.check(
                root,
                (cp.statement.tree_size == base).then_some(&report.last_chain_hash),
                None,
            )?;
            count(&mut report, &cps, kept);
        }
        // The streams of the trusted segments come from their indexes, and so does the
        // heads map the checked segments continue.
        drop(src);
        drop(tree);
        for seg in &segs[..first] {
            let list = trusted_streams(shared, seg)?;
            let idx_path = shared.dir.join(seg.seq.index_file_name());
            streams.join(seg.seq, &seg.path, &idx_path, &list)?;
            if shared.meta.layout.links_stream_prev() {
                trusted_heads.extend(heads_of(&list));
            }
        }
        segs.drain(..first);
    } else {
        while cps.pending(0).is_some() {
            let empty = (shared.meta.layout.links_stream_prev())
                .then_some((0, crate::format::heads::EMPTY_ROOT));
            let kept = cps.check(whole.root(), Some(&report.last_chain_hash), empty)?;
            count(&mut report, &cps, kept);
        }
    }
    // The segments to check: every sealed one, and the active one up to the visible records.
    let end = segs
        .iter()
        .position(|s| s.header.base_position >= visible && sealed_footer(s).is_none())
        .unwrap_or(segs.len());
    segs.truncate(end);
    // A snapshot written after this view of the log was taken (only beside a live writer)
    // is left for a later run, and so is one that ends before the records checked.
    let snapshot = snapshot.filter(|(cover, _)| {
        cover.next_position <= visible && cover.next_position >= report.first_position
    });
    report.snapshot_checked = snapshot.is_some();
    let sizes: Vec<u64> = cps
        .targets
        .iter()
        .map(|t| t.cp.statement.tree_size)
        .collect();
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
    .min(segs.len().max(1));

    let results: Mutex<Vec<Option<Result<Checked>>>> =
        Mutex::new(std::iter::repeat_with(|| None).take(segs.len()).collect());
    let ready = Condvar::new();
    let next = AtomicUsize::new(0);
    // Workers stop taking segments after one that failed, or once the joiner gave up.
    let stop_after = AtomicUsize::new(usize::MAX);
    let bytes_read = AtomicU64::new(0);
    let workers = AtomicUsize::new(threads);
    let ctx = Context {
        shared,
        checkpoint_sizes: &sizes,
        bytes_read: &bytes_read,
        nodes: &node_file,
        snapshot_end: snapshot.as_ref().map(|(c, _)| c.next_position.0),
        producers: producer_trust.as_ref(),
    };
    std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(threads);
        for _ in 0..threads {
            handles.push(s.spawn(|| {
                // Counts the worker out even if it panics, so that the joiner never waits
                // for a result that cannot come.
                let _exit = WorkerExit {
                    workers: &workers,
                    ready: &ready,
                    results: &results,
                    stop_after: &stop_after,
                };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= segs.len() || i > stop_after.load(Ordering::Relaxed) {
                        break;
                    }
                    // An unsealed segment before the last (rolled, its seal in progress)
                    // ends where the next one begins.
                    let end = segs
                        .get(i + 1)
                        .map_or(visible, |n| n.header.base_position.min(visible));
                    let r = check_segment(&ctx, &segs[i], end).map_err(|e| in_tier(&segs[i], e));
                    if r.is_err() {
                        stop_after.fetch_min(i, Ordering::Relaxed);
                    }
                    lock(&results)[i] = Some(r);
                    ready.notify_all();
                }
            }));
        }
        let joined = (|| -> Result<()> {
            let mut position = report.first_position;
            let mut snapshot_due = snapshot.as_ref();
            let mut prev_last_time: Option<Timestamp> = None;
            let mut heads =
                crate::format::heads::StreamHeads::from_entries(std::mem::take(&mut trusted_heads));
            let mut seen_signatures: std::collections::HashMap<[u8; 64], u64> =
                std::collections::HashMap::new();
            for i in 0..segs.len() {
                let checked = {
                    let mut slots = lock(&results);
                    loop {
                        if let Some(r) = slots[i].take() {
                            break r?;
                        }
                        if workers.load(Ordering::Acquire) == 0 {
                            return Err(Error::Io {
                                op: "verifying segment",
                                path: segs[i].path.clone(),
                                source: std::io::Error::other("the verification worker stopped"),
                            });
                        }
                        slots = ready
                            .wait_timeout(slots, Duration::from_millis(100))
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .0;
                        progress(bytes_read.load(Ordering::Relaxed));
                    }
                };
                let h = &checked.header;
                if h.base_position != position || h.prev_chain_hash != report.last_chain_hash {
                    return Err(corrupt(
                        &segs[i].path,
                        0,
                        Some(position.0),
                        format!(
                            "segment does not continue the log: base position {} (expected {position}) or previous chain hash differs",
                            h.base_position
                        ),
                        None,
                    ));
                }
                let mut pieces = checked.pieces.iter().peekable();
                for (size, subtrees, head) in &checked.at_checkpoints {
                    // Version 2: the heads map up to this checkpoint.
                    while let Some((end, list)) = pieces.next_if(|(end, _)| end <= size) {
                        debug_assert!(end <= size);
                        for (key, version, position) in list {
                            heads.set(*key, *version, *position);
                        }
                    }
                    let heads_at = h
                        .layout
                        .links_stream_prev()
                        .then(|| (heads.len(), heads.root()));
                    while cps.pending(*size).is_some() {
                        let mut at = whole.clone();
                        join(&mut at, subtrees);
                        debug_assert_eq!(at.len(), *size);
                        let kept = cps.check(at.root(), Some(head), heads_at)?;
                        count(&mut report, &cps, kept);
                    }
                }
                for (_, list) in pieces {
                    for (key, version, position) in list {
                        heads.set(*key, *version, *position);
                    }
                }
                let seg = &segs[i];
                let idx_path = shared.dir.join(seg.seq.index_file_name());
                if h.layout.links_stream_prev()
                    && let (Some(first), Some(prev)) = (checked.first_time, prev_last_time)
                    && first < prev
                {
                    return Err(corrupt(
                        &seg.path,
                        SEGMENT_DATA_START,
                        Some(position.0),
                        format!(
                            "record time {} of the segment's first record is before the previous segment's last, {}: record time never decreases in a version 2 log",
                            first.0, prev.0
                        ),
                        None,
                    ));
                }
                prev_last_time = checked.last_time.or(prev_last_time);
                if let Some((cover, entries)) = snapshot_due
                    && cover.next_position == position
                {
                    streams.check_snapshot(&snapshot_path, cover, entries, None)?;
                    snapshot_due = None;
                }
                if let (Some((cover, entries)), Some(partial)) =
                    (snapshot_due, &checked.before_snapshot)
                {
                    streams.check_snapshot(
                        &snapshot_path,
                        cover,
                        entries,
                        Some((seg.seq, partial)),
                    )?;
                    snapshot_due = None;
                }
                streams.join(seg.seq, &seg.path, &idx_path, &checked.streams)?;
                let mut made = Vec::new();
                for &(level, root) in &checked.subtrees {
                    let aligned =
                        whole.push_perfect_reporting(level, root, CHUNK_LEVEL, &mut |l, j, h| {
                            made.push((l, j, *h));
                        });
                    debug_assert!(aligned, "segment subtrees follow the whole tree");
                }
                report.tree_nodes += checked.nodes + node_file.check(&made)?;
                if checked.sidecar_missing {
                    report.sidecars_missing.push(seg.seq);
                }
                // A signed batch stored twice (a copy injected at the tail) carries the same
                // signature: only its first appearance is the producer's.
                for (first, sig) in &checked.signatures {
                    if let Some(earlier) = seen_signatures.insert(*sig, *first) {
                        return Err(corrupt(
                            &seg.path,
                            0,
                            Some(*first),
                            format!(
                                "batch at position {first} repeats the producer signature of the batch at position {earlier}: a replayed batch"
                            ),
                            None,
                        ));
                    }
                }
                report.signed_batches += checked.signatures.len() as u64;
                report.unsigned_batches += checked.unsigned_batches;
                blob_refs.extend_from_slice(&checked.blobs);
                pruned.extend_from_slice(&checked.pruned);
                report.pruned_batches += checked.pruned_batches;
                position = Position(position.0 + checked.records);
                report.records += checked.records;
                report.bytes += checked.bytes;
                report.last_chain_hash = checked.last_chain;
                report.segments += 1;
                progress(bytes_read.load(Ordering::Relaxed));
            }
            if let Some((cover, entries)) = snapshot_due {
                // Only a snapshot that ends at the last record checked is left.
                debug_assert_eq!(cover.next_position, position);
                streams.check_snapshot(&snapshot_path, cover, entries, None)?;
            }
            Ok(())
        })();
        if joined.is_err() {
            stop_after.store(0, Ordering::Relaxed);
        }
        // Joined here so that a worker's panic (a bug) is the error above, not a panic of
        // the caller.
        for h in handles {
            let _ = h.join();
        }
        joined
    })?;
    debug_assert_eq!(whole.len(), report.first_position.0 + report.records);
    report.stream_links = streams.links;
    if options.attribute_indexes {
        for seg in segs.iter().filter(|s| sealed_footer(s).is_some()) {
            report.attribute_indexes += u64::from(check_attrs(shared, seg)?);
        }
    }
    // A kept checkpoint the records do not reach is named first: it is the auditor's own
    // anchor, and the log's checkpoints may have been cut to match the rollback.
    let unreached = &cps.targets[cps.next.min(cps.targets.len())..];
    if let Some(t) = unreached.iter().find(|t| t.kept).or(unreached.first()) {
        let s = &t.cp.statement;
        let detail = if t.kept {
            format!(
                "the log holds {} records, fewer than the {} of kept checkpoint {}: records were removed (rolled back)",
                whole.len(),
                s.tree_size,
                s.id
            )
        } else {
            format!(
                "checkpoint {} covers {} records, but the log has only {}: records were removed",
                s.id,
                s.tree_size,
                whole.len()
            )
        };
        return Err(corrupt(&t.file, t.offset, Some(s.tree_size), detail, None));
    }
    if !options.witnesses.is_empty() || options.min_witnesses > 0 {
        check_witnesses(shared, &checkpoints, options, &mut report)?;
    }
    check_blobs(shared, options, &blob_refs, &mut report)?;
    check_removals(shared, &pruned, &mut report)?;
    check_erasures(shared, options, &checkpoints, &mut report)?;
    Ok(report)
}

/// Every `$SubjectErased` event must name this log and, when signed, be signed by a key
/// the verifier trusts ([`VerifyOptions::trusted_keys`]; without any, a key that signed the
/// log's checkpoints, or its signing key): an erasure is evidence, and one the log's key did not sign is
/// reported as a finding.
fn check_erasures(
    shared: &Shared,
    options: &VerifyOptions,
    checkpoints: &[crate::format::checkpoint::SignedCheckpoint],
    report: &mut VerifyReport,
) -> Result<()> {
    let checked_end = report.first_position.0 + report.records;
    let trusted: Vec<[u8; 32]> = if options.trusted_keys.is_empty() {
        checkpoints
            .iter()
            .map(|c| c.public_key)
            .chain(shared.evidence.public_key.get().copied().flatten())
            .collect()
    } else {
        options.trusted_keys.clone()
    };
    let log_id = crate::format::proof::hex(&shared.meta.log_id);
    for e in super::read::read_stream(
        shared,
        super::personal::ERASURE_STREAM,
        0,
        usize::MAX,
        super::Direction::Forward,
    )? {
        if e.position.0 >= checked_end {
            break;
        }
        let bad = |detail: String| Error::Corrupt {
            file: shared.dir.clone(),
            offset: 0,
            position: Some(e.position.0),
            detail,
            source: None,
        };
        let er: super::personal::SubjectErased = serde_json::from_slice(e.payload())
            .map_err(|err| bad(format!("an erasure event does not decode: {err}")))?;
        if er.log_id != log_id {
            return Err(bad(format!(
                "an erasure event names log {}, not this log",
                er.log_id
            )));
        }
        match &er.signature {
            None => report.erasures_unsigned += 1,
            Some(_) => {
                if !trusted.iter().any(|k| er.signature_verifies(k)) {
                    return Err(bad(
                        "an erasure event's signature does not verify under a trusted key of the log"
                            .into(),
                    ));
                }
            }
        }
        report.erasures += 1;
    }
    Ok(())
}

/// Every removed event must be covered by the `$RetentionApplied` event its pruned body
/// names: an event of `$governance`, within the checked records, whose ranges include the
/// position. Consecutive removals by the same event and policy are reported as one range.
fn check_removals(
    shared: &Shared,
    pruned: &[(u64, u64, bool)],
    report: &mut VerifyReport,
) -> Result<()> {
    if pruned.is_empty() {
        return Ok(());
    }
    let g = super::governance::fold(shared)?;
    // Each run event's ranges, by its position (they are ascending within an event), so that
    // a removal is found with one lookup and a binary search.
    let runs: std::collections::HashMap<u64, &[crate::governance::RemovedRange]> = g
        .runs
        .iter()
        .map(|(at, run)| (at.0, run.removed.as_slice()))
        .collect();
    let checked_end = report.first_position.0 + report.records;
    for &(position, by, system) in pruned {
        // The run comes after what it removes, and never removes a system stream's event
        // (a policy, a hold, a producer key; snapshots aside): such a removal is no run's.
        let policy = (by < checked_end && position < by && !system)
            .then(|| runs.get(&by))
            .flatten()
            .and_then(|ranges| {
                let i = ranges.partition_point(|r| r.from <= position);
                ranges
                    .get(i.checked_sub(1)?)
                    .filter(|r| position < r.to)
                    .map(|r| r.policy.clone())
            });
        let Some(policy) = policy else {
            return Err(Error::Corrupt {
                file: shared.dir.clone(),
                offset: 0,
                position: Some(position),
                detail: format!(
                    "the event at position {position} was removed, but position {by} holds no retention run that removed it: a removal no policy made"
                ),
                source: None,
            });
        };
        match report.removed.last_mut() {
            Some(r) if r.to == position && r.removed_by == by && r.policy == policy => {
                r.to += 1;
            }
            _ => report.removed.push(crate::log::RemovedRun {
                from: position,
                to: position + 1,
                removed_by: by,
                policy,
            }),
        }
    }
    Ok(())
}

/// Counts a checked checkpoint in the report.
fn count(report: &mut VerifyReport, cps: &CheckpointCheck<'_>, kept: bool) {
    let Some(t) = cps.next.checked_sub(1).and_then(|i| cps.targets.get(i)) else {
        return;
    };
    let s = &t.cp.statement;
    if kept {
        report.kept.push((s.id, s.tree_size));
    } else {
        report.checkpoints += 1;
        report.newest_checkpoint = Some((s.id, s.tree_size));
    }
}

/// The log's checkpoints and the kept ones, in order of tree size (kept ones first among
/// equal sizes, so that a rollback below a kept checkpoint is reported as such).
fn targets(
    cp_path: &std::path::Path,
    list: &[SignedCheckpoint],
    kept: &[(std::path::PathBuf, SignedCheckpoint)],
) -> Vec<Target> {
    let mut offset = 0u64;
    let mut out: Vec<Target> = list
        .iter()
        .map(|cp| {
            let t = Target {
                cp: *cp,
                file: cp_path.to_owned(),
                offset,
                kept: false,
            };
            offset += entry_len(cp.statement.version()) as u64;
            t
        })
        .collect();
    out.extend(kept.iter().map(|(file, cp)| Target {
        cp: *cp,
        file: file.clone(),
        offset: 0,
        kept: true,
    }));
    out.sort_by_key(|t| (t.cp.statement.tree_size, !t.kept));
    out
}

/// A kept checkpoint's id must still name it in the checkpoints file: one that is missing
/// (the file was cut) or names other content (the file was rewritten) is reported before
/// anything is read.
fn check_kept_ids(
    cp_path: &std::path::Path,
    list: &[SignedCheckpoint],
    kept: &[(std::path::PathBuf, SignedCheckpoint)],
) -> Result<()> {
    for (file, k) in kept {
        let s = &k.statement;
        let on_disk = usize::try_from(s.id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .and_then(|i| list.get(i));
        match on_disk {
            None => {
                return Err(corrupt(
                    cp_path,
                    0,
                    Some(s.tree_size),
                    format!(
                        "kept checkpoint {} (tree size {}, from {}) is missing: the checkpoints file ends at checkpoint {}, so checkpoints were removed",
                        s.id,
                        s.tree_size,
                        file.display(),
                        list.len()
                    ),
                    None,
                ));
            }
            Some(cp) if cp.statement != *s => {
                return Err(corrupt(
                    cp_path,
                    0,
                    Some(s.tree_size),
                    format!(
                        "checkpoint {} now names different content: kept (from {}) tree size {} root {}, the checkpoints file tree size {} root {}",
                        s.id,
                        file.display(),
                        s.tree_size,
                        hex(&s.root),
                        cp.statement.tree_size,
                        hex(&cp.statement.root)
                    ),
                    None,
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks the witnesses' cosignatures in `tally.cosignatures` against the checkpoints (all
/// of which the records have confirmed by now). A cosignature by a trusted witness of a
/// checkpoint that is missing, or whose content changed, is a failure: the witness saw
/// another history. With `min_witnesses`, at least one checkpoint must be cosigned by that
/// many trusted witnesses, and the newest such is reported.
fn check_witnesses(
    shared: &Shared,
    list: &[SignedCheckpoint],
    options: &VerifyOptions,
    report: &mut VerifyReport,
) -> Result<()> {
    let path = shared.dir.join(super::cosignatures::COSIGNATURES_FILE);
    let mut by_checkpoint: Vec<Vec<[u8; 32]>> = vec![Vec::new(); list.len()];
    for (offset, entry) in super::cosignatures::read(shared.fs(), &shared.dir)? {
        let Ok(e) = entry else { continue };
        let c = &e.cosignature;
        let Some(w) = options
            .witnesses
            .iter()
            .find(|w| w.public_key == c.public_key && w.name == c.name)
        else {
            continue;
        };
        let fail = |detail: String| corrupt(&path, offset, Some(e.tree_size), detail, None);
        let Some(cp) = usize::try_from(e.checkpoint_id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .and_then(|i| list.get(i))
        else {
            return Err(fail(format!(
                "witness {} cosigned checkpoint {} (tree size {}), which is missing from the checkpoints file (it ends at checkpoint {}): checkpoints were removed",
                w.name,
                e.checkpoint_id,
                e.tree_size,
                list.len()
            )));
        };
        if cp.statement.tree_size != e.tree_size || cp.statement.root != e.root {
            return Err(fail(format!(
                "witness {} cosigned checkpoint {} with tree size {} root {}, but the checkpoints file now says tree size {} root {}: the checkpoint was replaced",
                w.name,
                e.checkpoint_id,
                e.tree_size,
                hex(&e.root),
                cp.statement.tree_size,
                hex(&cp.statement.root)
            )));
        }
        c.verify(&crate::format::note::checkpoint_body(&cp.statement))
            .map_err(|err| {
                fail(format!(
                    "the cosignature by witness {} of checkpoint {} does not verify: {err}",
                    w.name, e.checkpoint_id
                ))
            })?;
        let seen = &mut by_checkpoint[(e.checkpoint_id - 1) as usize];
        if !seen.contains(&c.public_key) {
            seen.push(c.public_key);
            report.cosignatures += 1;
        }
    }
    let needed = options.min_witnesses.max(1);
    report.newest_witnessed = list
        .iter()
        .zip(&by_checkpoint)
        .rev()
        .find(|(_, w)| w.len() >= needed)
        .map(|(cp, _)| (cp.statement.id, cp.statement.tree_size));
    if options.min_witnesses > 0 && report.newest_witnessed.is_none() {
        return Err(corrupt(
            &path,
            0,
            None,
            format!(
                "no checkpoint is cosigned by {} of the {} trusted witnesses",
                options.min_witnesses,
                options.witnesses.len()
            ),
            None,
        ));
    }
    Ok(())
}

/// Compares a sealed segment's attribute sidecar, if it has one, with the one its records
/// give. Returns whether there was one.
fn check_attrs(shared: &Shared, seg: &super::shared::SegmentHandle) -> Result<bool> {
    let path = shared.dir.join(super::attrs::attr_file_name(seg.seq));
    let size = match shared.fs().file_len(&path) {
        Ok(len) => len,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("reading attribute index", &path)(e)),
    };
    let expected = super::attrs::Attrs::expected_sidecar(shared, seg)?;
    // Compared by size first, so that a file of any other size is never read (with plain
    // reads, like the rest of verify: a truncated file is an error, not a SIGBUS).
    let differs = if size == expected.len() as u64 {
        let found = shared
            .fs()
            .read(&path)
            .map_err(Error::io("reading attribute index", &path))?;
        found.iter().zip(&expected).position(|(a, b)| a != b)
    } else {
        Some(0)
    };
    if let Some(at) = differs {
        return Err(corrupt(
            &path,
            at as u64,
            None,
            format!(
                "attribute index does not match the records of segment {}: first difference at byte {at} ({size} bytes found, {} expected)",
                seg.seq.0,
                expected.len()
            ),
            None,
        ));
    }
    Ok(true)
}

/// Counts a verification worker out when it ends.
struct WorkerExit<'a, T> {
    workers: &'a AtomicUsize,
    ready: &'a Condvar,
    results: &'a Mutex<T>,
    stop_after: &'a AtomicUsize,
}

impl<T> Drop for WorkerExit<'_, T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.stop_after.store(0, Ordering::Relaxed);
        }
        // Under the results lock, so that the joiner cannot miss the wake-up between
        // checking the count and waiting.
        let _slots = lock(self.results);
        self.workers.fetch_sub(1, Ordering::AcqRel);
        self.ready.notify_all();
    }
}

/// Pushes a segment's aligned subtrees into the whole tree.
fn join(whole: &mut MerkleBuilder, subtrees: &[(u32, Hash32)]) {
    for &(level, root) in subtrees {
        let aligned = whole.push_perfect(level, root);
        debug_assert!(aligned, "segment subtrees follow the whole tree");
    }
}

/// A checkpoint to check against the records: one of the log's, or one an auditor kept.
struct Target {
    cp: SignedCheckpoint,
    /// Where it came from, for messages: the checkpoints file, or the kept note's file.
    file: std::path::PathBuf,
    /// Its byte offset in the checkpoints file (0 for a kept one).
    offset: u64,
    kept: bool,
}

/// The checkpoints, the log's and the kept ones, checked in order of tree size as the whole
/// tree reaches their sizes.
struct CheckpointCheck<'a> {
    shared: &'a Shared,
    options: &'a VerifyOptions,
    targets: Vec<Target>,
    next: usize,
}

impl CheckpointCheck<'_> {
    /// The next checkpoint, if its tree has exactly `size` records or fewer.
    fn pending(&self, size: u64) -> Option<&SignedCheckpoint> {
        self.targets
            .get(self.next)
            .map(|t| &t.cp)
            .filter(|cp| cp.statement.tree_size <= size)
    }

    /// Checks the next checkpoint against the root of its tree and, where known, the chain
    /// hash of its last record. Returns whether it was a kept one.
    fn check(
        &mut self,
        root: Hash32,
        head: Option<&Hash32>,
        heads: Option<(u64, Hash32)>,
    ) -> Result<bool> {
        let Some(t) = self.targets.get(self.next) else {
            return Ok(false);
        };
        self.next += 1;
        let s = &t.cp.statement;
        let what = if t.kept {
            format!("kept checkpoint {}", s.id)
        } else {
            format!("checkpoint {}", s.id)
        };
        let fail = |detail: String| corrupt(&t.file, t.offset, Some(s.tree_size), detail, None);
        t.cp.verify(&self.options.trusted_keys)
            .map_err(|e| fail(format!("{what}: {e}")))?;
        if s.log_id != self.shared.meta.log_id {
            return Err(fail(format!("{what} names another log")));
        }
        let not_extended = if t.kept {
            ": the log does not extend the kept checkpoint (history up to it was changed)"
        } else {
            ""
        };
        if root != s.root {
            return Err(fail(format!(
                "{what}: Merkle root {} of the first {} records differs from the signed root {}{not_extended}",
                hex(&root),
                s.tree_size,
                hex(&s.root)
            )));
        }
        if let Some(head) = head
            && *head != s.chain_head
        {
            return Err(fail(format!(
                "{what}: chain head {} differs from the signed chain head {}{not_extended}",
                hex(head),
                hex(&s.chain_head)
            )));
        }
        if let (Some((count, heads_root)), Some((signed_count, signed_root))) = (heads, s.streams)
            && (count, heads_root) != (signed_count, signed_root)
        {
            return Err(fail(format!(
                "{what}: the stream heads map of the first {} records has {count} streams and root {}, the signed one {signed_count} streams and root {}",
                s.tree_size,
                hex(&heads_root),
                hex(&signed_root)
            )));
        }
        Ok(t.kept)
    }
}

fn sealed_footer(seg: &SegmentHandle) -> Option<SegmentFooter> {
    match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Sealed { footer, .. } => Some(*footer),
        _ => None,
    }
}

/// What a record of a sealed segment says, kept for checking the sidecar's runs.
struct RecordFacts {
    offset: u64,
    version: u64,
    stream_prev: u64,
    key: HeadKey,
}

/// How a sidecar's runs disagree with the records.
enum RunsFailure {
    /// An entry does not describe its record: the sidecar is wrong.
    Index { position: u64, detail: String },
    /// A version 2 record does not name its stream's previous event: the records are wrong.
    Stream {
        position: u64,
        offset: u64,
        detail: String,
    },
}

/// Checks every run of a sealed segment's sidecar against the records, stream by stream:
/// each entry must name a record of its stream (the same stream key, version and offset).
/// Opening the sidecar checked that stream names are distinct, that each run's versions
/// are dense and that the runs add up to the segment's records; so entries name distinct
/// (stream, version) pairs, hence distinct records, and every record is named once. In a version 2 log, each
/// record after a stream's first in the segment must name the one before it; the first's
/// `stream_prev` is stored in `first_prev` by stream-table entry. Returns each entry's
/// stream key.
fn check_runs(
    idx: &SealedIndex,
    recs: &[RecordFacts],
    base: u64,
    v2: bool,
    first_prev: &mut [u64],
    cuts: &[u64],
) -> std::result::Result<(Vec<HeadKey>, Vec<Vec<Head>>), RunsFailure> {
    if recs.len() as u64 != idx.record_count() {
        return Err(RunsFailure::Index {
            position: base,
            detail: format!(
                "the index covers {} records, the segment holds {}",
                idx.record_count(),
                recs.len()
            ),
        });
    }
    let mut keys = Vec::with_capacity(idx.stream_count());
    // Version 2: each stream's head in each piece (the records before each cut, after the
    // previous one).
    let mut pieces: Vec<Vec<Head>> = if v2 {
        vec![Vec::new(); cuts.len() + 1]
    } else {
        Vec::new()
    };
    let mut last_in: Vec<Option<(u64, u64)>> = vec![None; pieces.len()];
    for i in 0..idx.stream_count() {
        let (name, stored_hash, run) = idx.stream_at(i);
        let name = name.unwrap_or_default();
        let key = stream_key(name.as_bytes());
        if stored_hash != u64::from_le_bytes(key[..8].try_into().unwrap_or_default()) {
            return Err(RunsFailure::Index {
                position: base,
                detail: format!("the index's hash of stream {name} is not its name's"),
            });
        }
        let mut before: Option<u64> = None;
        for k in 0..run.len() {
            let e = idx.run_entry(&run, k);
            let d = e.pos_delta as usize;
            let position = base + u64::from(e.pos_delta);
            let ok = recs.get(d).is_some_and(|r| {
                r.key == key && r.offset == u64::from(e.offset) && r.version == e.version
            });
            if !ok {
                return Err(RunsFailure::Index {
                    position,
                    detail: format!(
                        "index entry for {name} version {} does not match its record",
                        e.version
                    ),
                });
            }
            let r = &recs[d];
            if v2 {
                match before {
                    None => {
                        if let Some(slot) = first_prev.get_mut(i) {
                            *slot = r.stream_prev;
                        }
                    }
                    Some(b) if r.stream_prev != b => {
                        return Err(RunsFailure::Stream {
                            position,
                            offset: r.offset,
                            detail: format!(
                                "stream {name} version {} names position {} as its previous event, but that is at position {b}",
                                e.version, r.stream_prev
                            ),
                        });
                    }
                    Some(_) => {}
                }
            }
            before = Some(position);
            if let Some(slot) = last_in.get_mut(cuts.partition_point(|&c| c <= position)) {
                *slot = Some((e.version, position));
            }
        }
        for (piece, last) in pieces.iter_mut().zip(&mut last_in) {
            if let Some((version, position)) = last.take() {
                piece.push((key, version, position));
            }
        }
        keys.push(key);
    }
    for piece in &mut pieces {
        piece.sort_unstable_by_key(|h| h.0);
    }
    Ok((keys, pieces))
}

/// A finding in a cold segment says so, with the object it was fetched from (the file it
/// names is the copy in the cold cache).
fn in_tier(seg: &SegmentHandle, e: Error) -> Error {
    let Some(place) = seg.cold_place() else {
        return e;
    };
    match e {
        Error::Corrupt {
            file,
            offset,
            position,
            detail,
            source,
        } => Error::Corrupt {
            file,
            offset,
            position,
            detail: format!(
                "{detail} [cold tier: segment {} from {}/{}]",
                seg.seq,
                place.tier.store_url(),
                place.key
            ),
            source,
        },
        other => other,
    }
}

/// Checks one segment on its own (see the module comment).
fn check_segment(ctx: &Context<'_>, seg: &SegmentHandle, end: Position) -> Result<Checked> {
    let shared = ctx.shared;
    let bytes_read = ctx.bytes_read;
    // A cold segment is fetched, checked against its manifest entry and rehydrated into
    // the cache; its findings name the cached copy, so the tier is in every one of them.
    let (file, path) = seg.open_file()?;
    let path = &path;
    let page = read_page(&*file, 0).map_err(Error::io("reading segment header", path))?;
    let header = SegmentHeader::decode_page(&page)
        .map_err(|e| corrupt(path, 0, None, "segment header".into(), Some(e)))?;
    if header.log_id != shared.meta.log_id || header.seq != seg.seq {
        return Err(corrupt(
            path,
            0,
            None,
            "segment header names another log or segment".into(),
            None,
        ));
    }
    if header != seg.header {
        return Err(corrupt(
            path,
            0,
            Some(seg.header.base_position.0),
            "segment header on disk differs from the one read at open".into(),
            None,
        ));
    }
    let footer = sealed_footer(seg);
    // A sealed segment must end cleanly at its footer's `data_end`; the active one is
    // checked up to the visible records only (what follows may be a write in progress).
    let limit = footer.map_or(header.data_limit(), |f| f.data_end);
    let wanted = match footer {
        Some(f) => f.record_count,
        None => end.0.saturating_sub(header.base_position.0),
    };
    // The index is read first so that each record is checked against it as it is scanned;
    // a failure to read it is reported after the records and the footer.
    let idx_path = shared.dir.join(seg.seq.index_file_name());
    let index = match footer.map(|f| load_sealed_index(shared, &idx_path, &header, &f)) {
        Some(Ok(Some(idx))) => Some(Ok(idx)),
        // A sealed segment without a sidecar (its seal was interrupted after the footer, or
        // a live writer is writing it now) is checked from its records.
        Some(Ok(None)) | None => None,
        Some(Err(e)) => Some(Err(e)),
    };
    let sidecar_missing = footer.is_some() && index.is_none();
    // Streams from the records, unless the sidecar (checked record by record) gives them.
    let mut from_records = (!matches!(index, Some(Ok(_)))).then(SegStreams::default);
    let split = ctx
        .snapshot_end
        .filter(|&e| e > header.base_position.0 && e < header.base_position.0 + wanted);
    let mut before_split = split.map(|_| SegStreams::default());
    let mut stream_failure: Option<Error> = None;
    let mut made: Vec<(u32, u64, Hash32)> = Vec::new();
    let v2 = header.layout.links_stream_prev();
    // Version 2: the `stream_prev` of each stream's first record in the segment, by its
    // entry in the sidecar's stream table.
    let mut first_prev: Vec<u64> = match &index {
        Some(Ok(idx)) if v2 => vec![NO_STREAM_PREV; idx.stream_count()],
        _ => Vec::new(),
    };
    let (mut first_time, mut last_time) = (None, None);
    // Version 2: checkpoints strictly inside the segment split its streams into pieces,
    // built record by record; without any, the segment's streams are one piece.
    let inner: Vec<u64> = if v2 {
        let b = header.base_position.0;
        let mut v: Vec<u64> = ctx
            .checkpoint_sizes
            .iter()
            .copied()
            .filter(|&s| s > b && s < b + wanted)
            .collect();
        v.dedup();
        v
    } else {
        Vec::new()
    };
    let mut pieces: Vec<(u64, Vec<Head>)> = Vec::new();
    // Producer checks: the batch being read.
    let mut batch: Option<Batch> = None;
    let mut signatures: Vec<(u64, [u8; 64])> = Vec::new();
    let mut unsigned_batches = 0u64;
    let mut producer_failure: Option<Error> = None;
    // Pieces come from the records only without a sidecar; with one, from its runs.
    let mut piece = (!inner.is_empty() && !matches!(index, Some(Ok(_)))).then(SegStreams::default);
    let mut next_cut = inner.iter().copied().peekable();
    let mut index_failure: Option<Error> = None;
    // Sealed segments with a sidecar: what each record says, for checking the sidecar.
    let mut facts: Vec<RecordFacts> = Vec::new();
    let mut blobs = Vec::new();
    let mut pruned = Vec::new();
    let mut pruned_batches = 0u64;

    let base = header.base_position.0;
    let mut local = MerkleBuilder::new();
    let mut range = AlignedRange::new(base);
    let mut at_checkpoints = Vec::new();
    let mut sizes = ctx
        .checkpoint_sizes
        .iter()
        .copied()
        .filter(|&s| s > base && s <= base + wanted)
        .peekable();
    let mut last_chain = header.prev_chain_hash;
    let mut data_end = SEGMENT_DATA_START;
    let mut bytes = 0u64;
    let mut unreported = 0u64;

    let mut src = FileSource::new(&*file).map_err(Error::io("reading segment", path))?;
    let from = ScanFrom {
        layout: header.layout,
        offset: SEGMENT_DATA_START,
        position: header.base_position,
        chain: header.prev_chain_hash,
    };
    let scan = scan_visit(&mut src, from, limit, wanted, &mut |rec, env| {
        let h = &rec.header;
        let key = stream_key(env.stream().as_bytes());
        match env {
            Content::Event(e) => {
                if let Some(b) = e.blob() {
                    blobs.push((h.position.0, b));
                }
            }
            Content::Removed(p) => {
                pruned.push((
                    h.position.0,
                    p.removed_by.0,
                    !crate::format::pruned::prunable_stream(p.stream),
                ));
            }
        }
        let leaf = leaf_hash(&h.chain_hash);
        local.push_leaf(leaf);
        range.push_leaf_reporting(leaf, CHUNK_LEVEL, &mut |l, j, h| made.push((l, j, *h)));
        if v2 && last_time.is_some_and(|t| h.record_time < t) && stream_failure.is_none() {
            stream_failure = Some(corrupt(
                path,
                rec.offset,
                Some(h.position.0),
                format!(
                    "record time {} is before the previous record's {}: record time never decreases in a version 2 log",
                    h.record_time.0,
                    last_time.map_or(0, |t: Timestamp| t.0)
                ),
                None,
            ));
        }
        first_time.get_or_insert(h.record_time);
        last_time = Some(h.record_time);
        if let Some(trust) = ctx.producers
            && producer_failure.is_none()
        {
            use crate::format::record::flags;
            if h.flags & flags::BATCH_START != 0 {
                // A pruned first record has no producer block left (the batch is counted as
                // pruned below).
                let block = if h.flags & flags::PRODUCER_SIGNED != 0
                    && h.body_form == crate::format::record::BodyForm::Envelope
                {
                    match crate::format::producer::ProducerBlock::decode(rec.body) {
                        Ok(b) => Some(b),
                        Err(e) => {
                            producer_failure = Some(corrupt(
                                path,
                                rec.offset,
                                Some(h.position.0),
                                "the batch's producer block does not decode".into(),
                                Some(e),
                            ));
                            None
                        }
                    }
                } else {
                    None
                };
                batch = Some(Batch {
                    first: h.position.0,
                    block,
                    hashes: Vec::new(),
                    streams: Vec::new(),
                    pruned: false,
                });
            }
            if let Some(b) = &mut batch {
                match env {
                    Content::Event(_) => b
                        .hashes
                        .push(crate::format::chain::body_hash(rec.envelope_bytes())),
                    // The envelope is gone: the batch's signature cannot be checked. The
                    // removal itself is checked against its `$RetentionApplied` event.
                    Content::Removed(_) => b.pruned = true,
                }
                if !b.streams.iter().any(|s| s == env.stream()) {
                    b.streams.push(env.stream().to_owned());
                }
            }
            if h.flags & flags::BATCH_END != 0
                && let Some(b) = batch.take()
            {
                if b.pruned {
                    pruned_batches += 1;
                } else {
                    let streams: Vec<&str> = b.streams.iter().map(String::as_str).collect();
                    match trust.check_batch(
                        &shared.meta.log_id,
                        b.first,
                        &streams,
                        b.block.as_ref(),
                        &b.hashes,
                    ) {
                        Ok(()) => match b.block {
                            Some(block) => signatures.push((b.first, block.signature.signature)),
                            None => unsigned_batches += 1,
                        },
                        Err(detail) => {
                            producer_failure = Some(corrupt(
                                path,
                                0,
                                Some(b.first),
                                format!("batch at position {}: {detail}", b.first),
                                None,
                            ));
                        }
                    }
                }
            }
        }
        if let Some(p) = &mut piece {
            // Streams of a piece are only summarised; versions and links are checked above.
            let _ = p.push(
                env.stream(),
                key,
                h.stream_version,
                h.position,
                h.record_time,
                None,
            );
            if next_cut.peek() == Some(&(h.position.0 + 1)) {
                next_cut.next();
                pieces.push((h.position.0 + 1, heads_of(&std::mem::take(p).into_list())));
            }
        }
        if stream_failure.is_none() {
            let rt = h.record_time;
            let prev = v2.then_some(h.stream_prev);
            let mut note = |list: &mut SegStreams| {
                if let Err(detail) =
                    list.push(env.stream(), key, h.stream_version, h.position, rt, prev)
                {
                    stream_failure =
                        Some(corrupt(path, rec.offset, Some(h.position.0), detail, None));
                }
            };
            if let Some(list) = &mut from_records {
                note(list);
            }
            if let (Some(list), Some(split)) = (&mut before_split, split)
                && h.position.0 < split
            {
                note(list);
            }
        }
        let size = base + range.len();
        if sizes.peek() == Some(&size) {
            while sizes.next_if_eq(&size).is_some() {}
            at_checkpoints.push((size, range.subtrees().to_vec(), h.chain_hash));
        }
        last_chain = h.chain_hash;
        data_end = rec.end();
        let len = h.record_len();
        bytes += len;
        unreported += len;
        if unreported >= 4 << 20 {
            bytes_read.fetch_add(unreported, Ordering::Relaxed);
            unreported = 0;
        }
        if index_failure.is_some() {
            return;
        }
        if let Some(Ok(idx)) = &index {
            let i = h.position.0 - base;
            // A removed event's id is gone from the record; the sidecar keeps the one it had.
            if i >= idx.record_count() || env.event_id().is_some_and(|id| idx.event_id(i) != id) {
                index_failure = Some(corrupt(
                    &idx_path,
                    0,
                    Some(h.position.0),
                    format!(
                        "index entry for {} version {} does not match its record",
                        env.stream(),
                        h.stream_version
                    ),
                    None,
                ));
                return;
            }
            facts.push(RecordFacts {
                offset: rec.offset,
                version: h.stream_version,
                stream_prev: h.stream_prev,
                key,
            });
        }
    });
    bytes_read.fetch_add(unreported, Ordering::Relaxed);
    // The first `wanted` records must all be valid and end a batch.
    if scan.complete < wanted {
        let (offset, at, detail, source) = match scan.end {
            ScanEnd::Break {
                offset,
                position,
                error,
            } => match error {
                RecordError::Invalid { source, .. } => {
                    (offset, position, source.to_string(), Some(source))
                }
                RecordError::Io { source, .. } => {
                    return Err(Error::Io {
                        op: "reading segment",
                        path: path.clone(),
                        source,
                    });
                }
            },
            ScanEnd::Clean { offset } if scan.visited == wanted => (
                offset,
                Position(base + scan.complete),
                format!(
                    "unfinished batch: record {} does not end a batch, but the segment ends there",
                    base + wanted - 1
                ),
                None,
            ),
            ScanEnd::Clean { offset } => (
                offset,
                Position(base + scan.visited),
                format!("{} records where {wanted} were expected", scan.visited),
                None,
            ),
        };
        return Err(corrupt(path, offset, Some(at.0), detail, source));
    }
    let mut keys: Vec<HeadKey> = Vec::new();
    let mut run_pieces: Option<Vec<Vec<Head>>> = None;
    if let Some(footer) = footer {
        check_footer(
            path,
            &*file,
            &header,
            &footer,
            &local,
            data_end,
            &last_chain,
        )?;
        if let Some(Err(e)) = index {
            return Err(e);
        }
        if let Some(e) = index_failure {
            return Err(e);
        }
        if let Some(Ok(idx)) = &index {
            match check_runs(idx, &facts, base, v2, &mut first_prev, &inner) {
                Ok((k, p)) => {
                    keys = k;
                    run_pieces = Some(p);
                }
                Err(RunsFailure::Index { position, detail }) => {
                    return Err(corrupt(&idx_path, 0, Some(position), detail, None));
                }
                Err(RunsFailure::Stream {
                    position,
                    offset,
                    detail,
                }) => {
                    if stream_failure.is_none() {
                        stream_failure = Some(corrupt(path, offset, Some(position), detail, None));
                    }
                }
            }
        }
    }
    drop(facts);
    if let Some(e) = stream_failure {
        return Err(e);
    }
    if let Some(e) = producer_failure {
        return Err(e);
    }
    let streams = match (&index, from_records) {
        (Some(Ok(idx)), _) => idx
            .stream_links()
            .enumerate()
            .zip(keys)
            .map(|((i, (s, link)), key)| {
                let mut seg = seg_stream(s, key, Some(link));
                seg.first_stream_prev = first_prev.get(i).copied();
                seg
            })
            .collect(),
        (_, Some(list)) => list.into_list(),
        (_, None) => Vec::new(),
    };
    let nodes = ctx.nodes.check(&made)?;
    if v2 {
        let end = header.base_position.0 + wanted;
        match (run_pieces, piece) {
            // From the sidecar's runs: one piece before each inner cut, and the last.
            (Some(from_runs), _) => {
                let ends = inner.iter().copied().chain(std::iter::once(end));
                pieces = ends.zip(from_runs).collect();
            }
            (None, Some(p)) => pieces.push((end, heads_of(&p.into_list()))),
            (None, None) => pieces.push((end, heads_of(&streams))),
        }
    }
    Ok(Checked {
        header,
        records: wanted,
        bytes,
        last_chain,
        subtrees: range.subtrees().to_vec(),
        at_checkpoints,
        streams,
        before_snapshot: before_split.map(SegStreams::into_list),
        sidecar_missing,
        nodes,
        first_time,
        last_time,
        pieces,
        signatures,
        unsigned_batches,
        blobs,
        pruned,
        pruned_batches,
    })
}

/// Every blob the checked events refer to must be in the store with the bytes its reference
/// names (each distinct blob is read once; with `skip_blobs`, only counted).
fn check_blobs(
    shared: &Shared,
    options: &VerifyOptions,
    refs: &[(u64, crate::format::blob::BlobRef)],
    report: &mut VerifyReport,
) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    report.blob_refs = refs.len() as u64;
    for (position, blob) in refs {
        if !seen.insert(*blob) || options.skip_blobs {
            continue;
        }
        super::blobs::read(shared, blob).map_err(|e| match e {
            Error::Blob {
                hash,
                object,
                detail,
                source,
            } => Error::Blob {
                hash,
                object,
                detail: format!("the event at position {position} refers to it: {detail}"),
                source,
            },
            other => other,
        })?;
        report.blobs_checked += 1;
    }
    Ok(())
}

/// A batch being read, for its producer signature.
struct Batch {
    first: u64,
    block: Option<crate::format::producer::ProducerBlock>,
    hashes: Vec<Hash32>,
    streams: Vec<String>,
    /// An event of the batch was removed by retention.
    pruned: bool,
}

/// A stream's part of a segment as its (checked) sidecar gives it.
fn seg_stream(
    s: crate::index::StreamSummary,
    key: HeadKey,
    link: Option<Option<crate::format::SegmentSeq>>,
) -> SegStream {
    SegStream {
        name: s.name,
        key,
        first_version: s.first_version,
        last_version: s.last_version,
        first_position: s.first_position,
        last_position: s.last_position,
        first_record_time: s.first_record_time,
        link,
        first_stream_prev: None,
    }
}

/// Reads a sealed segment's index sidecar and checks its header against the footer.
fn load_sealed_index(
    shared: &Shared,
    idx_path: &std::path::Path,
    header: &SegmentHeader,
    footer: &SegmentFooter,
) -> Result<Option<SealedIndex>> {
    let bytes = match shared.fs().read(idx_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("reading index", idx_path)(e)),
    };
    let idx = SealedIndex::open(Arc::new(bytes)).map_err(|source| Error::Index {
        file: idx_path.to_owned(),
        source,
    })?;
    if !index_matches(&idx, shared, header, footer) {
        return Err(corrupt(
            idx_path,
            0,
            None,
            "index header does not match the segment footer".into(),
            None,
        ));
    }
    Ok(Some(idx))
}

/// Checks a sealed segment's footer against its records, and that only zero bytes lie
/// between the records and the footer.
fn check_footer(
    path: &std::path::Path,
    file: &dyn FsFile,
    header: &SegmentHeader,
    footer: &SegmentFooter,
    merkle: &MerkleBuilder,
    data_end: u64,
    last_chain: &Hash32,
) -> Result<()> {
    let page =
        read_page(file, header.footer_offset()).map_err(Error::io("reading footer", path))?;
    let on_disk = SegmentFooter::decode_page(&page).map_err(|e| {
        corrupt(
            path,
            header.footer_offset(),
            None,
            "segment footer".into(),
            Some(e),
        )
    })?;
    let checks = [
        (
            on_disk == *footer,
            "footer on disk differs from the one read at open",
        ),
        (
            footer.record_count == merkle.len(),
            "record count differs from the footer",
        ),
        (
            footer.data_end == data_end,
            "data end differs from the footer",
        ),
        (
            footer.merkle_root == merkle.root(),
            "Merkle root differs from the footer",
        ),
        (
            footer.record_count > 0 && footer.last_chain_hash == *last_chain,
            "last chain hash differs from the footer",
        ),
    ];
    if let Some((_, what)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(corrupt(
            path,
            header.footer_offset(),
            Some(footer.last_position.0),
            (*what).into(),
            None,
        ));
    }
    // The bytes between the records and the footer must be zero: a sealed segment has no
    // room for anything unaccounted for.
    let mut at = data_end;
    let end = header.footer_offset();
    let mut buf = vec![0u8; 1 << 20];
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)
            .map_err(Error::io("reading segment", path))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Err(corrupt(
                path,
                at + i as u64,
                None,
                "non-zero byte after the last record of a sealed segment".into(),
                None,
            ));
        }
        at += n as u64;
    }
    Ok(())
}
