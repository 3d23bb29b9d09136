//! Reads: by stream through the per-segment indexes, by position through the sparse
//! position index, and the blocking tail.
//!
//! Every record read is checked (header CRC, body CRC, padding, envelope) and must agree
//! with the index entry that led to it (position, stream, version): a damaged record or
//! index is an error, never a wrong answer. Only positions below the visible watermark are
//! returned.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::append::Writer;
use super::background::{corrupt, corrupt_record, sealed_index};
use super::shared::{SegState, SegmentHandle, Shared, lock};
use super::{Direction, RecordedEvent, StreamInfo};
use crate::error::{Error, Result};
use crate::format::{Position, SegmentSeq};
use crate::index::{ActiveIndex, IndexEntry, SealedIndex, SealedRun, StreamKey};
use crate::segment::{RecordRef, SliceSource, read_record, read_record_checked};

/// A stream's part of a segment that is not the active one.
enum RunRef {
    Frozen(Arc<ActiveIndex>, StreamKey),
    Sealed(Arc<SealedIndex>, SealedRun),
}

impl RunRef {
    fn first_version(&self) -> u64 {
        match self {
            RunRef::Frozen(idx, key) => idx.stream_run(*key).map_or(0, |r| r.entries[0].version),
            RunRef::Sealed(_, run) => run.first_version,
        }
    }
    fn len(&self) -> u64 {
        match self {
            RunRef::Frozen(idx, key) => idx.stream_run(*key).map_or(0, |r| r.entries.len() as u64),
            RunRef::Sealed(_, run) => run.last_version - run.first_version + 1,
        }
    }
    fn last_version(&self) -> u64 {
        self.first_version() + self.len().saturating_sub(1)
    }
    fn prev(&self) -> Option<SegmentSeq> {
        match self {
            RunRef::Frozen(idx, key) => idx.stream_run(*key).and_then(|r| r.prev_segment),
            RunRef::Sealed(_, run) => run.prev_segment,
        }
    }
    fn entry(&self, i: u64) -> IndexEntry {
        match self {
            RunRef::Frozen(idx, key) => {
                idx.stream_run(*key).expect("run looked up before").entries[i as usize]
            }
            RunRef::Sealed(idx, run) => idx.run_entry(run, i as u32),
        }
    }
}

/// Indexes into a dense run of versions `first..first+len` for a read from `from`, in read
/// order, lazily.
fn pick(first: u64, len: u64, from: u64, max: usize, direction: Direction) -> PickIter {
    if len == 0 || max == 0 {
        return PickIter::Empty;
    }
    let last = first + len - 1;
    match direction {
        Direction::Forward if from <= last => {
            PickIter::Forward((from.saturating_sub(first)..len).take(max))
        }
        Direction::Backward if from >= first => {
            PickIter::Backward((0..=from.min(last) - first).rev().take(max))
        }
        _ => PickIter::Empty,
    }
}

/// What [`pick`] yields.
enum PickIter {
    Empty,
    Forward(std::iter::Take<std::ops::Range<u64>>),
    Backward(std::iter::Take<std::iter::Rev<std::ops::RangeInclusive<u64>>>),
}

impl Iterator for PickIter {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        match self {
            PickIter::Empty => None,
            PickIter::Forward(r) => r.next(),
            PickIter::Backward(r) => r.next(),
        }
    }
}

fn segment_by_seq(shared: &Shared, seq: SegmentSeq) -> Option<Arc<SegmentHandle>> {
    let segs = shared.segments.list();
    let first = segs.first()?.seq.0;
    segs.get(usize::try_from(seq.0.checked_sub(first)?).ok()?)
        .cloned()
}

fn run_in(
    shared: &Shared,
    seg: &SegmentHandle,
    key: StreamKey,
    name: &str,
    hash: u64,
) -> Result<Option<RunRef>> {
    let frozen = match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Frozen { index, .. } => Some(Arc::clone(index)),
        SegState::Sealed { .. } => None,
        SegState::Active => return Ok(None),
    };
    if let Some(index) = frozen {
        return Ok(index
            .stream_run(key)
            .is_some()
            .then_some(RunRef::Frozen(index, key)));
    }
    let Some((index, _)) = sealed_index(shared, seg)? else {
        // Sealed between the two looks: try again.
        return run_in(shared, seg, key, name, hash);
    };
    Ok(index
        .find_stream(hash, name)
        .map(|run| RunRef::Sealed(index, run)))
}

/// Records to read: the segment and the entry.
type Picks = Vec<(Arc<SegmentHandle>, IndexEntry)>;

/// What a stream read needs from under the writer lock.
struct StreamPlan {
    key: StreamKey,
    name: Arc<str>,
    hash: u64,
    active: Option<(Arc<SegmentHandle>, u64, u64, Vec<IndexEntry>)>,
    /// The newest segment before the active one that may hold the stream.
    walk_from: Option<SegmentSeq>,
    /// The version the newest run walked to must end at: the one before the active run's
    /// first, or the stream's last.
    walk_last_version: Option<u64>,
    /// The segment the walk starts below (the active one).
    walk_below: SegmentSeq,
}

fn plan(
    w: &Writer,
    stream: &str,
    from: u64,
    max: usize,
    direction: Direction,
    visible: Position,
) -> Option<StreamPlan> {
    let key = w.streams.key(stream)?;
    let st = w.streams.get(key);
    if st.first_position.0 == u64::MAX {
        return None;
    }
    let walk_below = w.seg.handle.seq;
    let (active, walk_from) = match w.seg.index.stream_run(key) {
        Some(run) => {
            let first = run.entries[0].version;
            let len = run.entries.len() as u64;
            // Written but not yet visible entries are the newest ones; pick past them so
            // that `max` visible ones remain after filtering.
            let base = w.seg.handle.header.base_position.0;
            let invisible = run
                .entries
                .iter()
                .rev()
                .take_while(|e| base + u64::from(e.pos_delta) >= visible.0)
                .count();
            let picked: Vec<IndexEntry> =
                pick(first, len, from, max.saturating_add(invisible), direction)
                    .map(|i| run.entries[i as usize])
                    .collect();
            (
                Some((Arc::clone(&w.seg.handle), first, len, picked)),
                run.prev_segment,
            )
        }
        None => (None, Some(st.last_segment)),
    };
    let walk_last_version = match &active {
        Some((_, first, _, _)) => first.checked_sub(1),
        None => Some(st.last_version),
    };
    Some(StreamPlan {
        key,
        name: Arc::clone(&st.name),
        hash: st.hash,
        active,
        walk_from,
        walk_last_version,
        walk_below,
    })
}

fn visible_entry(seg: &SegmentHandle, e: &IndexEntry, visible: Position) -> bool {
    seg.header.base_position.0 + u64::from(e.pos_delta) < visible.0
}

/// Chooses the records of a stream read.
fn walk(
    shared: &Shared,
    p: StreamPlan,
    from: u64,
    max: usize,
    direction: Direction,
    visible: Position,
) -> Result<Picks> {
    let mut out: Picks = Vec::new();
    let active_picks: Picks = p
        .active
        .as_ref()
        .map(|(seg, _, _, entries)| {
            entries
                .iter()
                .filter(|e| visible_entry(seg, e, visible))
                .map(|e| (Arc::clone(seg), *e))
                .collect()
        })
        .unwrap_or_default();
    let active_covers_from = p
        .active
        .as_ref()
        .is_some_and(|(_, first, _, _)| *first <= from);
    let mut active_picks = Some(active_picks);
    if direction == Direction::Backward || active_covers_from {
        out.extend(
            active_picks
                .take()
                .unwrap_or_default()
                .into_iter()
                .take(max),
        );
        if out.len() >= max || direction == Direction::Forward {
            return Ok(out);
        }
    }
    // Walk back through older segments that hold the stream. Each link must lead to an older
    // segment whose part of the stream ends just before the version reached so far: a
    // stream's versions are dense, so a link that skips a part shows as a gap, and one that
    // points forward (a cycle) as an older segment that is not older. Either is a damaged
    // index (the sidecar that holds the link), reported as an error: a read never returns
    // a silently shortened stream, and never loops.
    let mut older: Vec<(Arc<SegmentHandle>, RunRef)> = Vec::new();
    let mut next = p.walk_from;
    let mut below = p.walk_below;
    let mut want_last = p.walk_last_version;
    let mut linked_from = shared.dir.join(below.index_file_name());
    let link_error = |file: &std::path::Path, detail: String| corrupt(file, 0, None, detail, None);
    if next.is_some() != want_last.is_some() {
        return Err(link_error(
            &linked_from,
            format!(
                "stream {} starts at version {} in the active segment, but the index links it to {}",
                p.name,
                want_last.map_or(0, |v| v + 1),
                next.map_or_else(
                    || "no earlier segment".to_owned(),
                    |s| format!("segment {s}")
                )
            ),
        ));
    }
    while let Some(seq) = next {
        if seq >= below {
            return Err(link_error(
                &linked_from,
                format!(
                    "the index links stream {} from segment {below} to segment {seq}, which is not older: a cycle",
                    p.name
                ),
            ));
        }
        // A link to a segment that is missing or does not hold the stream is a damaged
        // index: an error, not a silently short read.
        let broken = || {
            link_error(
                &linked_from,
                format!(
                    "the index links stream {} to segment {seq}, which does not hold it",
                    p.name
                ),
            )
        };
        let Some(seg) = segment_by_seq(shared, seq) else {
            return Err(broken());
        };
        let Some(run) = run_in(shared, &seg, p.key, &p.name, p.hash)? else {
            return Err(broken());
        };
        if Some(run.last_version()) != want_last {
            return Err(link_error(
                &linked_from,
                format!(
                    "the index links stream {} to segment {seq}, whose part of it ends at version {}, but the part after it starts at version {}: versions are missing or repeated between them",
                    p.name,
                    run.last_version(),
                    want_last.map_or(0, |v| v + 1)
                ),
            ));
        }
        next = run.prev();
        want_last = run.first_version().checked_sub(1);
        below = seq;
        linked_from = shared.dir.join(seq.index_file_name());
        if next.is_some() != want_last.is_some() {
            return Err(link_error(
                &linked_from,
                format!(
                    "stream {} starts at version {} in segment {seq}, but the index links it to {}",
                    p.name,
                    run.first_version(),
                    next.map_or_else(
                        || "no earlier segment".to_owned(),
                        |s| format!("segment {s}")
                    )
                ),
            ));
        }
        match direction {
            Direction::Backward => {
                // Newest first; entries not yet visible (a batch written before a roll and
                // not yet durable) are skipped without counting against `max`.
                for i in pick(run.first_version(), run.len(), from, usize::MAX, direction) {
                    let e = run.entry(i);
                    if visible_entry(&seg, &e, visible) {
                        out.push((Arc::clone(&seg), e));
                        if out.len() >= max {
                            break;
                        }
                    }
                }
                if out.len() >= max {
                    break;
                }
            }
            Direction::Forward => {
                let reached = run.first_version() <= from;
                older.push((seg, run));
                if reached {
                    break;
                }
            }
        }
    }
    if direction == Direction::Forward {
        for (seg, run) in older.iter().rev() {
            let room = max - out.len();
            for i in pick(run.first_version(), run.len(), from, room, direction) {
                let e = run.entry(i);
                if visible_entry(seg, &e, visible) {
                    out.push((Arc::clone(seg), e));
                }
            }
            if out.len() >= max {
                return Ok(out);
            }
        }
        let room = max - out.len();
        out.extend(
            active_picks
                .take()
                .unwrap_or_default()
                .into_iter()
                .take(room),
        );
    }
    Ok(out)
}

fn read_picks(stream: &str, picks: &Picks) -> Result<Vec<RecordedEvent>> {
    // Version 2: each event names its stream's previous one. Of two events read one
    // version apart (in either direction), the later must name the earlier.
    let mut before: Option<(u64, Position, u64)> = None;
    picks
        .iter()
        .map(|(seg, e)| {
            let position = Position(seg.header.base_position.0 + u64::from(e.pos_delta));
            let (ev, stream_prev) = read_event_linked(seg, u64::from(e.offset), position)?;
            if seg.header.layout.links_stream_prev() {
                let this = (ev.version, position, stream_prev);
                if let Some(last) = before {
                    let (earlier, later) = if last.0 < this.0 { (last, this) } else { (this, last) };
                    if later.0 == earlier.0 + 1 && later.2 != earlier.1.0 {
                        return Err(corrupt(
                            &seg.path,
                            u64::from(e.offset),
                            Some(position.0),
                            format!(
                                "stream {stream} version {} names position {} as its previous event, but that is at position {}",
                                later.0, later.2, earlier.1
                            ),
                            None,
                        ));
                    }
                }
                before = Some(this);
            }
            if ev.stream() != stream || ev.version != e.version {
                return Err(corrupt(
                    &seg.path,
                    u64::from(e.offset),
                    Some(position.0),
                    format!(
                        "index says {stream} version {}, record says {} version {}",
                        e.version,
                        ev.stream(),
                        ev.version
                    ),
                    None,
                ));
            }
            Ok(ev)
        })
        .collect()
}

pub(crate) fn read_stream(
    shared: &Shared,
    stream: &str,
    from: u64,
    max: usize,
    direction: Direction,
) -> Result<Vec<RecordedEvent>> {
    if max == 0 {
        return Ok(Vec::new());
    }
    let visible = shared.visible_position();
    let plan = {
        let guard = shared.commit.writer.lock();
        let w = guard.as_ref().ok_or(Error::Closed)?;
        plan(w, stream, from, max, direction, visible)
    };
    let Some(plan) = plan else {
        return Ok(Vec::new());
    };
    let picks = walk(shared, plan, from, max, direction, visible)?;
    read_picks(stream, &picks)
}

/// A forward stream read by a caller that holds the writer lock (the idempotency check):
/// it sees every written record, visible or not.
pub(crate) fn read_stream_locked(
    shared: &Shared,
    w: &Writer,
    stream: &str,
    from: u64,
    max: usize,
) -> Result<Vec<RecordedEvent>> {
    let Some(plan) = plan(w, stream, from, max, Direction::Forward, Position(u64::MAX)) else {
        return Ok(Vec::new());
    };
    let picks = walk(
        shared,
        plan,
        from,
        max,
        Direction::Forward,
        Position(u64::MAX),
    )?;
    read_picks(stream, &picks)
}

pub(crate) fn stream_info(shared: &Shared, stream: &str) -> Result<Option<StreamInfo>> {
    let visible = shared.visible_position();
    let state = {
        let guard = shared.commit.writer.lock();
        let w = guard.as_ref().ok_or(Error::Closed)?;
        w.streams.key(stream).map(|k| w.streams.get(k).clone())
    };
    let Some(st) = state else { return Ok(None) };
    if st.first_position.0 == u64::MAX || st.first_position >= visible {
        return Ok(None);
    }
    let (last_version, last_position) = if st.last_position < visible {
        (st.last_version, st.last_position)
    } else {
        // The newest events are written but not yet acknowledged: report the newest visible.
        let last = read_stream(shared, stream, u64::MAX, 1, Direction::Backward)?;
        match last.first() {
            Some(ev) => (ev.version, ev.position),
            None => return Ok(None),
        }
    };
    Ok(Some(StreamInfo {
        stream: stream.to_owned(),
        last_version,
        first_position: st.first_position,
        last_position,
        created: st.created,
    }))
}

/// Reads and checks the record at `offset` of `seg`, which must be at `position`.
pub(crate) fn read_event(
    seg: &SegmentHandle,
    offset: u64,
    position: Position,
) -> Result<RecordedEvent> {
    Ok(read_event_linked(seg, offset, position)?.0)
}

/// [`read_event`], with the record's `stream_prev` (version 2; `NO_STREAM_PREV` in a
/// version 1 log).
fn read_event_linked(
    seg: &SegmentHandle,
    offset: u64,
    position: Position,
) -> Result<(RecordedEvent, u64)> {
    // A point read of a cold segment that is not in the segment cache needs only the block
    // that holds the record (records never cross blocks).
    if seg.mapped().is_none()
        && let Some(place) = seg.cold_place()
    {
        let (start, block) = place.tier.block_at(seg, &place, offset)?;
        let mut src = crate::segment::OffsetSource {
            base: start,
            bytes: &block,
        };
        let limit = start + block.len() as u64;
        let rec = read_record(&mut src, seg.header.layout, offset, limit)
            .map_err(|e| with_position(seg, e, position))?;
        return Ok((to_event(seg, &rec, position)?, rec.header.stream_prev));
    }
    let map = seg.map()?;
    let published = map.published();
    let bytes = map.read(0, published).unwrap_or_default();
    let mut src = SliceSource { bytes };
    let rec = read_record(&mut src, seg.header.layout, offset, published)
        .map_err(|e| with_position(seg, e, position))?;
    Ok((to_event(seg, &rec, position)?, rec.header.stream_prev))
}

fn with_position(seg: &SegmentHandle, e: crate::segment::RecordError, position: Position) -> Error {
    let mut err = corrupt_record(&seg.path, e);
    if let Error::Corrupt { position: p, .. } = &mut err {
        *p = Some(position.0);
    }
    err
}

/// Turns a checked record that must be at `position` into an event.
fn to_event(seg: &SegmentHandle, rec: &RecordRef<'_>, position: Position) -> Result<RecordedEvent> {
    if rec.header.position != position {
        return Err(corrupt(
            &seg.path,
            rec.offset,
            Some(position.0),
            format!("record at this offset has position {}", rec.header.position),
            None,
        ));
    }
    if let crate::segment::Content::Removed(p) =
        rec.content().map_err(|e| with_position(seg, e, position))?
    {
        return Ok(RecordedEvent::removed(
            position,
            rec.header.stream_version,
            rec.header.record_time,
            rec.header.chain_hash,
            &p,
        ));
    }
    let env = rec
        .envelope()
        .map_err(|e| with_position(seg, e, position))?;
    Ok(RecordedEvent::new(
        position,
        rec.header.stream_version,
        rec.header.record_time,
        rec.header.chain_hash,
        &env,
        rec.envelope_bytes(),
    ))
}

/// The nearest sampled record at or before `position` in `seg`, and the segment's end.
fn locate(
    shared: &Shared,
    seg: &SegmentHandle,
    position: Position,
) -> Result<Option<(Position, u64)>> {
    // The state's lock is released before the writer's is taken (lock order: writer, then
    // segment state).
    let state = match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Frozen { index, .. } => Some(Some(Arc::clone(index))),
        SegState::Sealed { .. } => Some(None),
        SegState::Active => None,
    };
    let Some(frozen) = state else {
        let guard = shared.commit.writer.lock();
        let w = guard.as_ref().ok_or(Error::Closed)?;
        if w.seg.handle.seq == seg.seq {
            return Ok(w.seg.index.locate(position));
        }
        // Rolled since: look again.
        drop(guard);
        return locate(shared, seg, position);
    };
    if let Some(index) = frozen {
        return Ok(index.locate(position));
    }
    match sealed_index(shared, seg)? {
        Some((index, _)) => Ok(index.locate(position)),
        None => locate(shared, seg, position),
    }
}

/// Reads the records of `seg` from `position` forward, stopping before `end` or after
/// `max`.
fn read_forward_in(
    shared: &Shared,
    seg: &SegmentHandle,
    position: Position,
    end: Position,
    max: usize,
    out: &mut Vec<RecordedEvent>,
) -> Result<()> {
    let Some((mut at, mut offset)) = locate(shared, seg, position)? else {
        return Ok(());
    };
    let map = seg.map()?;
    let published = map.published();
    let bytes = map.read(0, published).unwrap_or_default();
    let mut src = SliceSource { bytes };
    while at < end && out.len() < max {
        let rec = read_record(&mut src, seg.header.layout, offset, published)
            .map_err(|e| with_position(seg, e, at))?;
        if at >= position {
            out.push(to_event(seg, &rec, at)?);
        } else if rec.header.position != at {
            return Err(corrupt(
                &seg.path,
                offset,
                Some(at.0),
                "record out of place".into(),
                None,
            ));
        }
        offset = rec.end();
        at = at.next();
    }
    Ok(())
}

fn segment_index_of(segs: &[Arc<SegmentHandle>], position: Position) -> Option<usize> {
    let i = segs.partition_point(|s| s.header.base_position <= position);
    i.checked_sub(1)
}

pub(crate) fn read_all(
    shared: &Shared,
    from: Position,
    max: usize,
    direction: Direction,
) -> Result<Vec<RecordedEvent>> {
    let visible = shared.visible_position();
    let segs = shared.segments_snapshot();
    let mut out = Vec::new();
    if max == 0 || visible.0 == 0 {
        return Ok(out);
    }
    match direction {
        Direction::Forward => {
            if from >= visible {
                return Ok(out);
            }
            let Some(mut i) = segment_index_of(&segs, from) else {
                return Ok(out);
            };
            let mut position = from;
            while i < segs.len() && out.len() < max && position < visible {
                let end = segs
                    .get(i + 1)
                    .map_or(visible, |n| n.header.base_position.min(visible));
                read_forward_in(shared, &segs[i], position, end, max, &mut out)?;
                position = end;
                i += 1;
            }
        }
        Direction::Backward => {
            let mut top = Position(from.0.min(visible.0 - 1));
            while let Some(i) = segment_index_of(&segs, top) {
                let seg = &segs[i];
                // Read the sampled block that holds `top`, newest first.
                let Some((block_start, _)) = locate(shared, seg, top)? else {
                    break;
                };
                let mut block = Vec::new();
                read_forward_in(shared, seg, block_start, top.next(), usize::MAX, &mut block)?;
                out.extend(block.into_iter().rev().take(max - out.len()));
                if out.len() >= max || block_start.0 == 0 {
                    break;
                }
                top = Position(block_start.0 - 1);
            }
        }
    }
    Ok(out)
}

/// A blocking iterator over the log from a position; see [`super::Log::tail`].
pub struct Tail {
    shared: Arc<Shared>,
    next: Position,
    buf: VecDeque<RecordedEvent>,
}

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tail")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// Records fetched per read while tailing.
const TAIL_BATCH: usize = 512;

impl Tail {
    pub(crate) fn new(shared: Arc<Shared>, from: Position) -> Tail {
        Tail {
            shared,
            next: from,
            buf: VecDeque::new(),
        }
    }

    /// The position of the next record this tail yields.
    #[must_use]
    pub fn position(&self) -> Position {
        self.buf.front().map_or(self.next, |e| e.position)
    }

    /// The next record, waiting at most `timeout` for one to become visible. `Ok(None)` on
    /// timeout or when the log is closed.
    ///
    /// # Errors
    /// As [`super::Log::read_all`].
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<RecordedEvent>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.buf.pop_front() {
                return Ok(Some(ev));
            }
            if self.shared.visible_position() > self.next {
                let mut got = read_all(&self.shared, self.next, TAIL_BATCH, Direction::Forward)?;
                super::personal::open_events(&self.shared, &mut got);
                if let Some(last) = got.last() {
                    self.next = last.position.next();
                }
                self.buf.extend(got);
                continue;
            }
            if self.shared.closed.load(Ordering::SeqCst) {
                return Ok(None);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait_for_more(deadline - now);
        }
    }

    fn wait_for_more(&self, timeout: Duration) {
        let s = &self.shared;
        s.visible
            .wait_past(self.next, &s.closed, Instant::now() + timeout);
    }
}

impl Iterator for Tail {
    type Item = Result<RecordedEvent>;

    /// Blocks until the next record is visible; `None` once the log is closed.
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.next_timeout(Duration::from_secs(1)) {
                Ok(Some(ev)) => return Some(Ok(ev)),
                Ok(None) if self.shared.closed.load(Ordering::SeqCst) => return None,
                Ok(None) => {}
                Err(Error::Closed) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_walks_dense_versions_both_ways() {
        let p = |a, b, c, d, e| pick(a, b, c, d, e).collect::<Vec<u64>>();
        assert_eq!(p(10, 5, 0, 3, Direction::Forward), vec![0, 1, 2]);
        assert_eq!(p(10, 5, 12, 10, Direction::Forward), vec![2, 3, 4]);
        assert_eq!(p(10, 5, 15, 10, Direction::Forward), Vec::<u64>::new());
        assert_eq!(p(10, 5, u64::MAX, 2, Direction::Backward), vec![4, 3]);
        assert_eq!(p(10, 5, 11, 10, Direction::Backward), vec![1, 0]);
        assert_eq!(p(10, 5, 9, 10, Direction::Backward), Vec::<u64>::new());
        assert_eq!(p(10, 0, 0, 10, Direction::Forward), Vec::<u64>::new());
    }
}

/// How much a scan checks of each record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Header and body checksums, padding, and position.
    Checksums,
    /// The header checksum, and each record's chain hash recomputed from the previous
    /// one: this covers the body through its BLAKE3 hash, a stronger check than its CRC,
    /// which is then not computed.
    Chain,
}

/// A record seen by a scan: checked as the [`Verify`] level asks, not decoded.
#[derive(Clone, Copy, Debug)]
pub struct RecordView<'a> {
    /// Position in the log.
    pub position: Position,
    /// Version in its stream.
    pub stream_version: u64,
    /// When the engine wrote it.
    pub record_time: crate::format::Timestamp,
    /// The record's chain hash.
    pub record_hash: &'a crate::format::Hash32,
    /// The encoded envelope.
    pub body: &'a [u8],
    /// The record's whole body as stored (what `body_crc` and the chain's body hash cover):
    /// the envelope, after the producer block in the first record of a signed batch.
    pub record_body: &'a [u8],
    /// The record's flags (`format::record::flags`).
    pub flags: u16,
    /// The record's header bytes as stored (80 in format version 1, 88 in version 2).
    pub header: &'a [u8],
    /// Format version 2: the position of the previous event of the record's stream
    /// ([`crate::format::record::NO_STREAM_PREV`] for version 0, and in version 1 logs).
    pub stream_prev: u64,
    /// The record's layout (its segment's format version): it decides how the envelope is
    /// read ([`RecordView::envelope`]).
    pub layout: crate::format::record::Layout,
    /// File offset of the record in its segment.
    pub offset: u64,
    /// File offset just past the record (where the next one starts).
    pub end: u64,
    /// What the body holds: the envelope, or (format version 4) what retention left of it.
    pub body_form: crate::format::record::BodyForm,
}

impl<'a> RecordView<'a> {
    /// Decodes the envelope.
    ///
    /// # Errors
    /// The body is not a valid envelope.
    pub fn envelope(
        &self,
    ) -> Result<crate::format::envelope::EnvelopeRef<'a>, crate::format::DecodeError> {
        if self.body_form == crate::format::record::BodyForm::Pruned {
            return Err(crate::format::DecodeError::Invalid {
                what: "record",
                detail: format!(
                    "the event at position {} was removed by retention",
                    self.position
                ),
            });
        }
        crate::format::envelope::EnvelopeRef::decode_in(self.body, self.layout)
    }

    /// The envelope, or for an event retention removed, the marker's envelope (its stream,
    /// the type [`super::REMOVED_EVENT_TYPE`], a nil id, the record time as event time, no
    /// payload): what an attribute index holds for the record.
    ///
    /// # Errors
    /// The body does not decode.
    pub fn envelope_or_marker(
        &self,
    ) -> Result<crate::format::envelope::EnvelopeRef<'a>, crate::format::DecodeError> {
        match self.removed()? {
            None => self.envelope(),
            Some(p) => Ok(crate::format::pruned::marker(&p, self.record_time)),
        }
    }

    /// What retention left of the record, when it removed the event.
    ///
    /// # Errors
    /// The pruned body does not decode.
    pub fn removed(
        &self,
    ) -> Result<Option<crate::format::pruned::PrunedRef<'a>>, crate::format::DecodeError> {
        match self.body_form {
            crate::format::record::BodyForm::Envelope => Ok(None),
            crate::format::record::BodyForm::Pruned => {
                crate::format::pruned::decode(self.record_body).map(Some)
            }
        }
    }

    /// The record's stream, from its envelope or its pruned body, read without decoding the
    /// rest (the caller has checked the body's checksum). `None` when the body is too short.
    #[must_use]
    pub fn stream_bytes(&self) -> Option<&'a [u8]> {
        match self.body_form {
            crate::format::record::BodyForm::Envelope => {
                crate::format::envelope::EnvelopeRef::stream_bytes(self.body)
            }
            crate::format::record::BodyForm::Pruned => {
                crate::format::pruned::decode(self.record_body)
                    .ok()
                    .map(|p| p.stream.as_bytes())
            }
        }
    }
}

/// Visible records of one segment, `(first position, end position)`.
pub(crate) fn segment_range(seg: &SegmentHandle, visible: Position) -> (Position, Position) {
    let end = match &*seg
        .state
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        SegState::Sealed { footer, .. } => footer.last_position.next(),
        SegState::Frozen { index, .. } => index.next_position(),
        SegState::Active => visible,
    };
    (seg.header.base_position, end.min(visible))
}

/// Scans records of `seg` from `start = (position, offset, chain)` up to `end`. With a
/// chain value, the first record's link is checked against it; without one (a range that
/// starts mid-segment) the first record only provides the chain value for the next, and is
/// not passed to `visit`. Returns the number of records visited.
pub(crate) fn scan_records(
    seg: &SegmentHandle,
    start: (Position, u64, Option<crate::format::Hash32>),
    end: Position,
    verify: Verify,
    visit: &mut dyn FnMut(RecordView<'_>),
) -> Result<u64> {
    let map = seg.map()?;
    let published = map.published();
    let bytes = map.read(0, published).unwrap_or_default();
    let mut src = SliceSource { bytes };
    let (mut position, mut offset, first_chain) = start;
    let mut chain = first_chain.unwrap_or_default();
    let mut check_link = first_chain.is_some();
    let mut seen = 0;
    while position < end {
        let rec = read_record_checked(
            &mut src,
            seg.header.layout,
            offset,
            published,
            verify == Verify::Checksums,
        )
        .map_err(|e| with_position(seg, e, position))?;
        if rec.header.position != position {
            return Err(corrupt(
                &seg.path,
                offset,
                Some(position.0),
                "record out of place".into(),
                None,
            ));
        }
        if verify == Verify::Chain && check_link {
            rec.check_chain(&chain)
                .map_err(|e| with_position(seg, e, position))?;
        }
        chain = rec.header.chain_hash;
        if check_link || verify == Verify::Checksums {
            visit(RecordView {
                position,
                stream_version: rec.header.stream_version,
                record_time: rec.header.record_time,
                record_hash: &rec.header.chain_hash,
                body: rec.envelope_bytes(),
                record_body: rec.body,
                flags: rec.header.flags,
                header: &rec.header_bytes[..rec.header.header_len()],
                stream_prev: rec.header.stream_prev,
                layout: rec.header.layout,
                offset,
                end: rec.end(),
                body_form: rec.header.body_form,
            });
            seen += 1;
        }
        check_link = true;
        offset = rec.end();
        position = position.next();
    }
    Ok(seen)
}

/// Scans the visible records `from..to` in order, finding the start through the sparse
/// index instead of reading each segment from its beginning. Records are checked as
/// `verify` asks. Returns the number of records visited.
pub(crate) fn scan_range(
    shared: &Shared,
    from: Position,
    to: Position,
    verify: Verify,
    visit: &mut dyn FnMut(RecordView<'_>),
) -> Result<u64> {
    let visible = shared.visible_position();
    let to = to.min(visible);
    let segs = shared.segments_snapshot();
    let mut position = from;
    let mut seen = 0;
    while position < to {
        let Some(i) = segment_index_of(&segs, position) else {
            break;
        };
        let seg = &segs[i];
        let (first, end) = segment_range(seg, visible);
        let end = end.min(to);
        if end <= position {
            break;
        }
        // A start at the segment's first record checks its link from the header; any other
        // start re-reads the record before it (at or after a sparse entry) for its chain value.
        let start = if position == first {
            (
                first,
                crate::format::SEGMENT_DATA_START,
                Some(seg.header.prev_chain_hash),
            )
        } else {
            match locate(shared, seg, Position(position.0 - 1))? {
                Some((pos, off)) if pos >= first && pos < position => (pos, off, None),
                _ => (
                    first,
                    crate::format::SEGMENT_DATA_START,
                    Some(seg.header.prev_chain_hash),
                ),
            }
        };
        let want = position;
        scan_records(seg, start, end, verify, &mut |r| {
            if r.position >= want {
                visit(r);
                seen += 1;
            }
        })?;
        position = end;
    }
    Ok(seen)
}

/// Checks every visible record's checksums and chain link with `threads` threads, one
/// segment at a time each; the links between segments are checked from the headers.
pub(crate) fn check_chain_parallel(shared: &Shared, threads: usize) -> Result<u64> {
    let visible = shared.visible_position();
    let segs = shared.segments_snapshot();
    // Each segment is cut into ranges (twice as many as threads, at least 64 records each)
    // at sampled records of the sparse index: a range re-reads the record it starts at
    // (checked by the range before) for its chain value.
    let mut tasks = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        let (first, end) = segment_range(seg, visible);
        if end <= first {
            continue;
        }
        let chunk = ((end.0 - first.0) / (2 * threads.max(1) as u64)).max(64);
        let mut start = (
            first,
            crate::format::SEGMENT_DATA_START,
            Some(seg.header.prev_chain_hash),
        );
        let mut cut = first.0 + chunk;
        while cut < end.0 {
            match locate(shared, seg, Position(cut))? {
                Some((pos, off)) if pos > start.0 => {
                    tasks.push((i, start, pos.next()));
                    start = (pos, off, None);
                }
                _ => {}
            }
            cut += chunk;
        }
        tasks.push((i, start, end));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let total = std::sync::atomic::AtomicU64::new(0);
    let first_error: std::sync::Mutex<Option<(usize, Error)>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let t = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, start, end)) = tasks.get(t) else {
                        break;
                    };
                    match scan_records(&segs[i], start, end, Verify::Chain, &mut |_| {}) {
                        Ok(n) => {
                            total.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let mut slot = lock(&first_error);
                            if slot.as_ref().is_none_or(|(j, _)| t < *j) {
                                *slot = Some((t, e));
                            }
                        }
                    }
                }
            });
        }
    });
    if let Some((_, e)) = first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    // Each segment must continue the previous one.
    for pair in segs.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        if let SegState::Sealed { footer, .. } = &*prev
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            && (next.header.prev_chain_hash != footer.last_chain_hash
                || next.header.base_position != footer.last_position.next())
        {
            return Err(corrupt(
                &next.path,
                0,
                Some(next.header.base_position.0),
                "segment does not continue the chain of the previous one".into(),
                None,
            ));
        }
    }
    Ok(total.into_inner())
}
