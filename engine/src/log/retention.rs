//! Applying retention (docs/FORMAT.md 5.5, docs/OPERATIONS.md "Retention and legal holds").
//!
//! A run judges every event against the policies and holds in force
//! ([`Log::retention_plan`]), records what it will remove as a `$RetentionApplied` event of
//! `$governance` and makes that event durable, and only then rewrites each sealed local
//! segment that holds a removed event: the segment is copied to `NNN.seg.tmp` with each such
//! record's body replaced by its pruned body (the original body's hash, the run's position,
//! the stream) and the header's `body_form` set, synced, renamed over the segment, and the
//! directory synced. Headers, positions, offsets and chain hashes do not change, so the
//! index sidecar, the Merkle tree, every checkpoint and every proof stay valid; the
//! attribute index (derived) is deleted and rebuilt from the markers.
//!
//! A crash before the rename leaves the segment as it was and a temporary that the next
//! writable open deletes; after it, the segment is complete. Either way the run's event
//! names every position that may have been removed, so `verify` can check each removal, and
//! the next run removes what this one did not reach.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::format::files::temp_name;
use crate::format::record::{BodyForm, RECORD_HEADER_MAX};
use crate::format::{PAGE_BYTES, Position, SEGMENT_DATA_START, Timestamp, pruned};
use crate::governance::{RETENTION_APPLIED, RemovedRange, RetentionApplied};
use crate::log::shared::Shared;
use crate::log::{Log, RetentionPlan};
use crate::segment::{
    Content, FileSource, ScanEnd, ScanFrom, SegState, SegmentHandle, read_page, scan_visit,
};
use crate::sys::OpenMode;

/// What [`Log::apply_retention`] did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RetentionReport {
    /// What the policies and holds said.
    pub plan: RetentionPlan,
    /// Where the run's first `$RetentionApplied` event is (`None` when nothing was due).
    pub recorded_at: Option<Position>,
    /// How many `$RetentionApplied` events record the run (one per [`RANGES_PER_EVENT`]
    /// ranges of removed positions).
    pub run_events: usize,
    /// Events removed now.
    pub removed: u64,
    /// Segment files rewritten.
    pub segments_rewritten: usize,
    /// Events due but not removed: in the active segment (removed once it is sealed) or in
    /// the cold tier.
    pub pending: u64,
}

/// What the retention runs made without being asked ([`Log::retention_status`]): those of
/// the background thread (`Options::retention_every`) and those before each compaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetentionStatus {
    /// Runs made (including those that found nothing due).
    pub runs: u64,
    /// Events they removed.
    pub removed: u64,
    /// Where the last run that removed anything recorded itself.
    pub last_recorded_at: Option<Position>,
    /// Events the last run left pending (in the active segment or the cold tier).
    pub pending: u64,
    /// The last run's error, if it failed (retried at the next interval).
    pub last_error: Option<String>,
}

/// The reason recorded by a run of the background thread.
pub const SCHEDULED_REASON: &str = "scheduled";
/// The reason recorded by a run before a compaction.
pub const BEFORE_COMPACTION_REASON: &str = "before compaction";
/// The actor of the runs the log makes itself.
pub const LOG_ACTOR: &str = "tally";

/// The background retention thread: a run as of now every `every` while the log has a
/// policy, until the log closes.
pub(crate) fn retainer(shared: &Arc<Shared>, every: std::time::Duration) {
    // Each run reads the whole log: an interval of zero would spin.
    let every = every.max(std::time::Duration::from_millis(10));
    loop {
        let _ = shared.retention.wait(every);
        if shared.retention.stopping() || shared.commit.is_poisoned() {
            return;
        }
        let _ = Log::handle(shared).retention_if_policies(SCHEDULED_REASON);
    }
}

/// One record to prune: where it is, and its pruned header and body.
struct Patch {
    offset: u64,
    header: [u8; RECORD_HEADER_MAX],
    header_len: usize,
    body: Vec<u8>,
}

/// Ranges of removed positions one `$RetentionApplied` event lists at most: with a policy
/// name of at most 128 bytes, an event stays under 1 MiB (about 200 bytes a range).
pub const RANGES_PER_EVENT: usize = 4096;

/// Runs `f` on a new thread whose scheduling priority is lowered (nice 10), and waits for it:
/// work that must not take the CPU from appenders and the flusher when the cores are busy.
pub(crate) fn at_low_priority<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let worker = s.spawn(|| {
            crate::sys::lower_thread_priority();
            f()
        });
        match worker.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

fn refused(reason: String) -> Error {
    Error::InvalidOptions { reason }
}

impl Log {
    /// Applies retention as of `as_of`: removes the body of every event a policy removes
    /// and no hold covers, in sealed local segments, keeping each record's hash, and records
    /// the run (with `actor` and `reason`) as a `$RetentionApplied` event before any byte
    /// is removed. Events due in the active segment or in the cold tier are counted as
    /// pending.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a log of a format version before 4 (its records cannot
    /// be pruned) or a read-only log; read, append and I/O errors. A failure after the
    /// run's event leaves every segment either as it was or completely rewritten.
    pub fn apply_retention(
        &self,
        as_of: Timestamp,
        actor: &str,
        reason: &str,
    ) -> Result<RetentionReport> {
        // The run reads every record and rewrites segments: it runs on a thread of its
        // own at low priority, so that appends and reads beside it keep their cores.
        at_low_priority(|| self.apply_retention_now(as_of, actor, reason))
    }

    /// What the runs the log made itself did: those of the background thread and those
    /// before each compaction.
    #[must_use]
    pub fn retention_status(&self) -> RetentionStatus {
        self.shared
            .retention_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// A run as of now, by the log itself, when the log can prune and has a policy;
    /// recorded in [`Log::retention_status`]. `None` when there was nothing to run.
    pub(crate) fn retention_if_policies(&self, reason: &str) -> Option<Result<RetentionReport>> {
        if !self.shared.meta.layout.allows_pruning() || self.shared.read_only {
            return None;
        }
        let has_policies = match self.governance() {
            Ok(g) => !g.policies.is_empty(),
            Err(e) => return Some(Err(e)),
        };
        if !has_policies {
            return None;
        }
        let r = self.apply_retention(crate::now(), LOG_ACTOR, reason);
        let mut status = self
            .shared
            .retention_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        status.runs += 1;
        match &r {
            Ok(report) => {
                status.removed += report.removed;
                status.pending = report.pending;
                if report.recorded_at.is_some() {
                    status.last_recorded_at = report.recorded_at;
                }
                status.last_error = None;
            }
            Err(e) => status.last_error = Some(e.to_string()),
        }
        Some(r)
    }

    fn apply_retention_now(
        &self,
        as_of: Timestamp,
        actor: &str,
        reason: &str,
    ) -> Result<RetentionReport> {
        if !self.shared.meta.layout.allows_pruning() {
            return Err(refused(format!(
                "retention needs a log of format version 4; this log is version {}",
                self.shared.meta.layout.version()
            )));
        }
        if self.shared.read_only {
            return Err(Error::ReadOnly);
        }
        if as_of > crate::now() {
            return Err(refused(
                "a retention run is judged as of now or earlier: a time in the future would \
                 remove events before their policies let them go (a plan may look ahead)"
                    .to_owned(),
            ));
        }
        let _order = self.shared.governance.lock();
        // No compaction while segments are rewritten: a segment moved to the cold tier
        // between its read and its rename would keep the removed events in its object.
        let _no_compaction = self
            .shared
            .cold
            .compacting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let g = self.governance()?;
        let plan = self.plan_with(&g, as_of)?;
        let mut report = RetentionReport::default();
        // Which due positions are in sealed local segments.
        let segs = self.shared.segments_snapshot();
        // The position ranges `[first, last]` of the sealed local segments, ascending,
        // found once; each due position is then a binary search.
        let local: Vec<(u64, u64)> = segs
            .iter()
            .filter(|s| s.cold_place().is_none() && !self.shared.cold.in_manifest(s.seq))
            .filter_map(|s| {
                match &*s
                    .state
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                {
                    SegState::Sealed { footer, .. } => {
                        Some((footer.first_position.0, footer.last_position.0))
                    }
                    _ => None,
                }
            })
            .collect();
        let prunable = |p: u64| {
            let i = local.partition_point(|(first, _)| *first <= p);
            i.checked_sub(1).is_some_and(|i| p <= local[i].1)
        };
        let mut by_policy: Vec<(u64, &str)> = Vec::new();
        // The streams removed whole by this run: a stream's snapshots go only with it.
        let mut whole: std::collections::HashSet<&str> = std::collections::HashSet::new();
        let (snapshot_removals, stream_removals): (Vec<_>, Vec<_>) = plan
            .removals
            .iter()
            .partition(|r| pruned::snapshot_base(&r.stream).is_some());
        for r in stream_removals.into_iter().chain(snapshot_removals) {
            if let Some(base) = pruned::snapshot_base(&r.stream)
                && !whole.contains(base)
            {
                // Its stream stays, or part of it (grown, or in the active segment or the
                // cold tier): so do its snapshots, until the run that removes it.
                report.pending += r.events;
                continue;
            }
            // A stream that grew after the plan read it is left for the next run: an event
            // appended meanwhile may restart its policy's clock.
            let grown = self
                .stream_info(&r.stream)?
                .is_none_or(|i| i.last_version != r.last_version);
            if grown {
                report.pending += r.events;
                continue;
            }
            let mut all = true;
            for &p in &r.positions {
                if prunable(p) {
                    by_policy.push((p, r.policy.as_str()));
                } else {
                    report.pending += 1;
                    all = false;
                }
            }
            // All of it removed now (the plan lists a stream's snapshots only when its policy
            // removes the whole stream).
            if all {
                whole.insert(r.stream.as_str());
            }
        }
        by_policy.sort_unstable();
        if by_policy.is_empty() {
            report.plan = plan;
            return Ok(report);
        }
        let mut removed: Vec<RemovedRange> = Vec::new();
        for &(p, policy) in &by_policy {
            match removed.last_mut() {
                Some(r) if r.to == p && r.policy == policy => r.to += 1,
                _ => removed.push(RemovedRange {
                    from: p,
                    to: p + 1,
                    policy: policy.to_owned(),
                }),
            }
        }
        // The run is recorded as one event per RANGES_PER_EVENT ranges, so that each
        // stays far below the payload limit however scattered the removals are.
        let mut recorded = Vec::new();
        // And small enough for the segment (a record never spans two): ranges are added to
        // an event while its JSON stays within the budget, measured, not estimated (a policy
        // name's escapes can triple its length).
        let room = usize::try_from(self.shared.opts.segment_bytes)
            .unwrap_or(usize::MAX)
            .saturating_sub(4 * crate::format::PAGE_BYTES as usize);
        let budget = room
            .min(crate::format::envelope::PAYLOAD_BYTES_MAX)
            .saturating_sub(1024 + 2 * reason.len());
        let mut chunks: Vec<Vec<RemovedRange>> = vec![Vec::new()];
        let mut used = 0;
        for r in removed {
            let len = serde_json::to_string(&r).map_or(512, |t| t.len() + 1);
            let last = chunks
                .last_mut()
                .filter(|c| !c.is_empty() && (c.len() == RANGES_PER_EVENT || used + len > budget));
            if last.is_some() {
                chunks.push(Vec::new());
                used = 0;
            }
            used += len;
            if let Some(c) = chunks.last_mut() {
                c.push(r);
            }
        }
        for chunk in &chunks {
            let run = RetentionApplied {
                as_of: as_of.0,
                removed: chunk.to_vec(),
                held: plan.held_events(),
                reason: reason.to_owned(),
            };
            let at = self
                .append_governance(RETENTION_APPLIED, &run, actor)?
                .first_position;
            recorded.push((chunk[0].from, at));
        }
        // The run is durable before any byte is removed, whatever the durability setting.
        self.shared.sync_all()?;
        // Each position is removed by the event whose ranges list it: the last one whose
        // first range starts at or before it (the ranges are ascending across events).
        let due: HashMap<u64, Position> = by_policy
            .iter()
            .map(|(p, _)| {
                let i = recorded.partition_point(|(from, _)| *from <= *p);
                (*p, recorded[i.saturating_sub(1)].1)
            })
            .collect();
        let mut per_segment: BTreeMap<u64, Arc<SegmentHandle>> = BTreeMap::new();
        for &(p, _) in &by_policy {
            // The segments are in position order: the last one starting at or before `p`.
            let i = segs.partition_point(|s| s.header.base_position.0 <= p);
            if let Some(s) = i.checked_sub(1).and_then(|i| segs.get(i)) {
                per_segment.insert(s.seq.0, Arc::clone(s));
            }
        }
        for seg in per_segment.values() {
            report.removed += prune_segment(&self.shared, seg, &due)?;
            report.segments_rewritten += 1;
        }
        report.recorded_at = recorded.first().map(|r| r.1);
        report.run_events = recorded.len();
        report.plan = plan;
        Ok(report)
    }
}

/// Rewrites sealed segment `seg` with the records at `due` positions pruned, each naming
/// the run event that lists it (those already pruned are left as they are). Returns how many
/// it pruned.
fn prune_segment(
    shared: &Shared,
    seg: &SegmentHandle,
    due: &HashMap<u64, Position>,
) -> Result<u64> {
    let fs = shared.fs();
    let path = &seg.path;
    // The local file stays the segment's while it is read and replaced.
    let cold = seg
        .cold
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if cold.is_some() {
        return Ok(0);
    }
    let corrupt = |offset: u64, position: Option<u64>, detail: String| Error::Corrupt {
        file: path.clone(),
        offset,
        position,
        detail,
        source: None,
    };
    let footer = match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Sealed { footer, .. } => *footer,
        _ => {
            return Err(corrupt(
                0,
                None,
                "retention reached an unsealed segment".into(),
            ));
        }
    };
    let file = fs
        .open(path, OpenMode::Read)
        .map_err(Error::io("opening segment", path))?;
    // Every record is checked (checksums, positions, the chain from the segment's header)
    // before any is pruned: a damaged segment is reported, never rewritten.
    let mut patches = Vec::new();
    let mut problem = None;
    let from = ScanFrom {
        layout: seg.header.layout,
        offset: SEGMENT_DATA_START,
        position: seg.header.base_position,
        chain: seg.header.prev_chain_hash,
    };
    let mut src = FileSource::new(&*file).map_err(Error::io("reading segment", path))?;
    let scan = scan_visit(
        &mut src,
        from,
        footer.data_end,
        footer.record_count,
        &mut |rec, content| {
            let p = rec.header.position.0;
            let Some(&removed_by) = due.get(&p) else {
                return;
            };
            if problem.is_some() {
                return;
            }
            let Content::Event(env) = content else {
                return;
            };
            if !pruned::prunable_stream(env.stream) {
                problem = Some((p, "a system stream's event is never removed".to_owned()));
                return;
            }
            let hash = match rec.body_hash() {
                Ok(h) => h,
                Err(e) => {
                    problem = Some((p, e.to_string()));
                    return;
                }
            };
            let body = match pruned::encode(&hash, removed_by, env.stream, rec.body.len()) {
                Ok(b) => b,
                Err(e) => {
                    problem = Some((p, e.to_string()));
                    return;
                }
            };
            let mut header = rec.header;
            header.body_form = BodyForm::Pruned;
            header.body_crc = crc32fast::hash(&body);
            let mut bytes = [0u8; RECORD_HEADER_MAX];
            let header_len = header.encode_into(&mut bytes);
            patches.push(Patch {
                offset: rec.offset,
                header: bytes,
                header_len,
                body,
            });
        },
    );
    if let ScanEnd::Break {
        offset,
        position,
        error,
    } = scan.end
    {
        return Err(corrupt(
            offset,
            Some(position.0),
            format!("retention found a damaged record: {error}"),
        ));
    }
    if scan.visited != footer.record_count {
        return Err(corrupt(
            SEGMENT_DATA_START,
            None,
            format!(
                "{} records where the footer says {}",
                scan.visited, footer.record_count
            ),
        ));
    }
    if let Some((p, detail)) = problem {
        return Err(corrupt(0, Some(p), detail));
    }
    if patches.is_empty() {
        return Ok(0);
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| corrupt(0, None, "a segment path without a name".into()))?;
    let tmp = path.with_file_name(temp_name(name));
    if fs.exists(&tmp) {
        fs.remove_file(&tmp).map_err(Error::io("removing", &tmp))?;
    }
    let out = fs
        .open(&tmp, OpenMode::CreateNew { private: false })
        .map_err(Error::io("creating", &tmp))?;
    let capacity = seg.header.capacity;
    out.set_len(capacity).map_err(Error::io("sizing", &tmp))?;
    // Copy in windows, apply the patches that fall in each, and write only pages that hold
    // a non-zero byte: the zeros a pruned body leaves are holes, so the space they took is
    // returned on file systems with sparse files.
    const WINDOW: u64 = 1 << 20;
    const REWRITE_BYTES_PER_SEC: u64 = 64 << 20;
    let mut buf = vec![0u8; WINDOW as usize];
    let mut at = 0u64;
    // Paced: the rewrite is a background job, and the disk it writes is the one appends
    // sync to.
    let started = std::time::Instant::now();
    let mut next = 0usize;
    while at < footer.data_end {
        let n = (footer.data_end - at).min(WINDOW);
        let window = &mut buf[..n as usize];
        file.read_exact_at(window, at)
            .map_err(Error::io("reading segment", path))?;
        let end = at + n;
        // Patches are in offset order; a record may span two windows.
        let mut i = next;
        while let Some(p) = patches.get(i) {
            if p.offset >= end {
                break;
            }
            for (start, bytes) in [
                (p.offset, &p.header[..p.header_len]),
                (p.offset + p.header_len as u64, &p.body[..]),
            ] {
                let lo = start.max(at);
                let hi = (start + bytes.len() as u64).min(end);
                if lo < hi {
                    window[(lo - at) as usize..(hi - at) as usize]
                        .copy_from_slice(&bytes[(lo - start) as usize..(hi - start) as usize]);
                }
            }
            if p.offset + (p.header_len + p.body.len()) as u64 <= end {
                next = i + 1;
            }
            i += 1;
        }
        for (k, page) in window.chunks(PAGE_BYTES as usize).enumerate() {
            if page.iter().any(|&b| b != 0) {
                out.write_all_at(page, at + (k as u64) * PAGE_BYTES)
                    .map_err(Error::io("writing", &tmp))?;
            }
        }
        at = end;
        let due = std::time::Duration::from_secs_f64(at as f64 / REWRITE_BYTES_PER_SEC as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let footer_at = seg.header.footer_offset();
    let page = read_page(&*file, footer_at).map_err(Error::io("reading segment", path))?;
    out.write_all_at(&page, footer_at)
        .map_err(Error::io("writing", &tmp))?;
    out.sync_all().map_err(Error::io("syncing", &tmp))?;
    drop(out);
    drop(file);
    // The attribute index goes first (it describes the old bodies), then the file is
    // replaced; readers map the new file from then on (a reader holding the old map reads
    // the old, consistent bytes until it lets go).
    super::attrs::replace_segment(shared, seg, || {
        fs.rename(&tmp, path).map_err(Error::io("renaming", &tmp))?;
        fs.sync_dir(&shared.dir)
            .map_err(Error::io("syncing", &shared.dir))?;
        *seg.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        Ok(())
    })?;
    Ok(patches.len() as u64)
}
