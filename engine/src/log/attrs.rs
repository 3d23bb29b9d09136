//! The log's attribute indexes kept up to date behind the appends (docs/FORMAT.md,
//! "Attribute index sidecar"), and the forensic lookups that use them.
//!
//! Appends never wait for them: a background thread (and any lookup) catches up from the
//! records, reading only records it has not seen. A sealed segment's attributes are written
//! to its `.adx` sidecar; the unsealed segments' are in memory and rebuilt from the records on
//! open. A sidecar that is missing, damaged or out of step with its segment is rebuilt from
//! the segment's records. Every record a lookup returns is read and checked, and its value
//! compared, so a damaged sidecar or a hash collision can cost time but never give a wrong
//! answer.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::RecordedEvent;
use super::background::load_map;
use super::read::{Verify, read_event, scan_records, segment_range};
use super::shared::{SegState, SegmentHandle, Shared};
use crate::error::{Error, Result};
use crate::format::segment::SegmentFooter;
use crate::format::{Position, SegmentSeq, Timestamp};
use crate::index::attrs::{AttrBuilder, AttrSource, Field, Hit, SealedAttrs};

/// What a [`crate::Log::find`] looks for. Every condition given must hold; results come in
/// position order.
#[derive(Clone, Debug)]
pub struct Query<'a> {
    /// An indexed field and the exact value it must have (not empty: empty values are not
    /// indexed).
    pub field: Option<(Field, &'a str)>,
    /// Record times in this range (start included, end excluded).
    pub record_time: Option<Range<Timestamp>>,
    /// Event times in this range (start included, end excluded).
    pub event_time: Option<Range<Timestamp>>,
    /// Positions in this range.
    pub positions: Range<Position>,
    /// At most this many events.
    pub limit: usize,
    /// Stop once the events found hold this many bytes of envelope (at least one event is
    /// returned): a caller that sends them in one frame bounds what it reads. Page on from
    /// the last position returned, as with `limit`.
    pub max_bytes: usize,
}

impl<'a> Query<'a> {
    /// Events whose `field` is `value`.
    #[must_use]
    pub fn field(field: Field, value: &'a str) -> Query<'a> {
        Query {
            field: Some((field, value)),
            ..Query::all()
        }
    }

    /// Every event (narrow it with the other conditions).
    #[must_use]
    pub fn all() -> Query<'a> {
        Query {
            field: None,
            record_time: None,
            event_time: None,
            positions: Position(0)..Position(u64::MAX),
            limit: usize::MAX,
            max_bytes: usize::MAX,
        }
    }

    /// Only events recorded in `range`.
    #[must_use]
    pub fn recorded(mut self, range: Range<Timestamp>) -> Query<'a> {
        self.record_time = Some(range);
        self
    }

    /// Only events whose event time is in `range`.
    #[must_use]
    pub fn happened(mut self, range: Range<Timestamp>) -> Query<'a> {
        self.event_time = Some(range);
        self
    }

    /// Only events at positions in `range`.
    #[must_use]
    pub fn positions(mut self, range: Range<Position>) -> Query<'a> {
        self.positions = range;
        self
    }

    /// Stop at `max_bytes` of envelopes (the field of the same name).
    #[must_use]
    pub fn max_bytes(mut self, max_bytes: usize) -> Query<'a> {
        self.max_bytes = max_bytes;
        self
    }

    /// At most `limit` events.
    #[must_use]
    pub fn limit(mut self, limit: usize) -> Query<'a> {
        self.limit = limit;
        self
    }

    /// Whether `ev` meets every condition.
    fn matches(&self, ev: &RecordedEvent) -> bool {
        use super::EventView;
        let within =
            |r: &Option<Range<Timestamp>>, t: Timestamp| r.as_ref().is_none_or(|r| r.contains(&t));
        self.positions.contains(&ev.position)
            && within(&self.record_time, ev.record_time)
            && within(&self.event_time, ev.event_time())
            && self
                .field
                .is_none_or(|(f, v)| match f.text(&ev.envelope()) {
                    Some(value) => value == v,
                    None => v.parse::<crate::format::EventId>().ok() == Some(ev.event_id()),
                })
    }
}

/// Why a lookup failed: reading a record a sealed segment's sidecar pointed at, or
/// anything else.
enum FindError {
    Sidecar(SegmentSeq, Error),
    Other(Error),
}

impl FindError {
    fn into_error(self) -> Error {
        match self {
            FindError::Sidecar(_, e) | FindError::Other(e) => e,
        }
    }
}

/// The attribute indexes of the log.
#[derive(Debug, Default)]
pub(crate) struct Attrs {
    /// Sealed segments' sidecars, loaded or built so far.
    sealed: BTreeMap<SegmentSeq, Arc<SealedAttrs>>,
    /// Unsealed segments (and sealed ones whose sidecar is being built), in memory.
    building: BTreeMap<SegmentSeq, AttrBuilder>,
}

/// Replaces segment `seg`'s file by `replace` with its attribute index forgotten and its
/// sidecar deleted (durably) first, the attribute indexes held meanwhile: after retention
/// pruned records of the segment, whose attributes are gone, no crash and no lookup can
/// leave a sidecar of the old records beside the new file. The indexer builds it again
/// from the records (the markers) when it next catches up.
pub(crate) fn replace_segment(
    shared: &Shared,
    seg: &SegmentHandle,
    replace: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let mut attrs = shared.indexing.attrs.lock();
    attrs.sealed.remove(&seg.seq);
    attrs.building.remove(&seg.seq);
    let path = shared.dir.join(attr_file_name(seg.seq));
    let fs = shared.fs();
    if fs.exists(&path) {
        fs.remove_file(&path)
            .map_err(Error::io("removing the attribute index", &path))?;
        fs.sync_dir(&shared.dir)
            .map_err(Error::io("syncing", &shared.dir))?;
    }
    replace()?;
    drop(attrs);
    shared.indexing.indexer.signal();
    Ok(())
}

/// The sidecar's file name for segment `seq`.
#[must_use]
pub(crate) fn attr_file_name(seq: SegmentSeq) -> String {
    crate::format::files::attrs_file_name(seq)
}

/// A visitor of index hits.
type Visit<'a> = &'a mut dyn FnMut(Hit);

enum Source<'a> {
    Sealed(&'a SealedAttrs),
    Building(&'a AttrBuilder),
}

impl Source<'_> {
    fn get(&self) -> &dyn AttrSource {
        match self {
            Source::Sealed(s) => *s,
            Source::Building(b) => *b,
        }
    }
}

impl Attrs {
    /// Indexes every visible record not indexed yet, and writes the sidecar of every sealed
    /// segment that has none (a read-only log keeps them in memory). Returns the visible
    /// position it indexed up to.
    pub(crate) fn catch_up(&mut self, shared: &Shared) -> Result<Position> {
        let visible = shared.visible_position();
        while self.catch_up_step(shared, visible)? {}
        Ok(visible)
    }

    /// One step of [`Attrs::catch_up`]: the sidecar of the oldest sealed segment that has
    /// none loaded (loaded, or built from the records), then, when there is none left,
    /// the unsealed segments' records up to `visible`. Returns whether a sealed segment
    /// was done (and so there may be more), so that a caller can let go of the lock
    /// between segments.
    pub(crate) fn catch_up_step(&mut self, shared: &Shared, visible: Position) -> Result<bool> {
        let segs = shared.segments_snapshot();
        for seg in &segs {
            if self.sealed.contains_key(&seg.seq) {
                continue;
            }
            let footer = match &*seg
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                SegState::Sealed { footer, .. } => *footer,
                _ => continue,
            };
            let found = if self.building.contains_key(&seg.seq) {
                None
            } else {
                self.load(shared, seg, &footer)
            };
            let attrs = match found {
                Some(a) => a,
                None => self.build_sealed(shared, seg, footer.last_position.next())?,
            };
            self.sealed.insert(seg.seq, attrs);
            return Ok(true);
        }
        for seg in &segs {
            if !self.sealed.contains_key(&seg.seq) {
                let (_, end) = segment_range(seg, visible);
                self.extend(seg, end)?;
            }
        }
        Ok(false)
    }

    /// Forgets segment `seq`'s sidecar and builds it again from the records (writing it
    /// over the file): for a sidecar that led a lookup to a record that is not there.
    fn rebuild(&mut self, shared: &Shared, seq: SegmentSeq) -> Result<()> {
        self.sealed.remove(&seq);
        self.building.remove(&seq);
        let Some(seg) = shared
            .segments_snapshot()
            .into_iter()
            .find(|s| s.seq == seq)
        else {
            return Ok(());
        };
        let end = match &*seg
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            SegState::Sealed { footer, .. } => footer.last_position.next(),
            _ => return Ok(()),
        };
        let attrs = self.build_sealed(shared, &seg, end)?;
        self.sealed.insert(seq, attrs);
        Ok(())
    }

    /// Indexes sealed segment `seg` up to its end (continuing an unsealed builder if there
    /// is one), and stores its sidecar.
    fn build_sealed(
        &mut self,
        shared: &Shared,
        seg: &SegmentHandle,
        end: Position,
    ) -> Result<Arc<SealedAttrs>> {
        self.extend(seg, end)?;
        let bytes = self.building[&seg.seq].encode(&shared.meta.log_id);
        let attrs = self.store(shared, seg, bytes)?;
        self.building.remove(&seg.seq);
        Ok(attrs)
    }

    /// A sidecar on disk that describes the sealed segment `seg` exactly. Its header is
    /// compared with the segment before the rest of it is checked.
    fn load(
        &self,
        shared: &Shared,
        seg: &SegmentHandle,
        footer: &SegmentFooter,
    ) -> Option<Arc<SealedAttrs>> {
        let path = shared.dir.join(attr_file_name(seg.seq));
        let map = load_map(shared.fs(), &path).ok()?;
        let c = SealedAttrs::peek_cover((*map).as_ref())?;
        let describes = c.log_id == shared.meta.log_id
            && c.seq == seg.seq
            && c.base_position == seg.header.base_position
            && c.record_count == footer.record_count
            && c.data_end == footer.data_end
            && c.last_chain_hash == footer.last_chain_hash;
        if !describes {
            return None;
        }
        SealedAttrs::open(map).ok().map(Arc::new)
    }

    /// Writes a sealed segment's sidecar (atomically) and maps it. A read-only log keeps the
    /// bytes in memory, and so does a log that cannot write the file (a full disk, say):
    /// lookups go on, and a later open writes it.
    fn store(
        &self,
        shared: &Shared,
        seg: &SegmentHandle,
        bytes: Vec<u8>,
    ) -> Result<Arc<SealedAttrs>> {
        let name = attr_file_name(seg.seq);
        let path = shared.dir.join(&name);
        let written = !shared.read_only
            && shared
                .fs()
                .write_file_atomic(&shared.dir, &name, &bytes, false)
                .is_ok();
        let source: Arc<dyn AsRef<[u8]> + Send + Sync> = match written {
            true => match load_map(shared.fs(), &path) {
                Ok(map) => map,
                Err(_) => Arc::new(bytes),
            },
            false => Arc::new(bytes),
        };
        let attrs =
            SealedAttrs::open(source).map_err(|source| Error::Index { file: path, source })?;
        Ok(Arc::new(attrs))
    }

    /// Indexes `seg`'s records up to `end`.
    fn extend(&mut self, seg: &SegmentHandle, end: Position) -> Result<()> {
        let builder = self.building.entry(seg.seq).or_insert_with(|| {
            AttrBuilder::new(
                seg.seq,
                seg.header.base_position,
                seg.header.prev_chain_hash,
            )
        });
        let from = builder.next_position();
        if end <= from {
            return Ok(());
        }
        let start = (from, builder.data_end(), Some(builder.last_chain_hash()));
        let mut bad = None;
        scan_records(seg, start, end, Verify::Checksums, &mut |r| {
            if bad.is_some() {
                return;
            }
            match r.envelope_or_marker() {
                Ok(env) => builder.push(
                    r.position,
                    r.offset,
                    r.end,
                    r.record_time,
                    r.record_hash,
                    &env,
                ),
                Err(e) => bad = Some((r.position, r.offset, e)),
            }
        })?;
        if let Some((position, offset, e)) = bad {
            return Err(super::background::corrupt(
                &seg.path,
                offset,
                Some(position.0),
                e.to_string(),
                Some(e),
            ));
        }
        Ok(())
    }

    fn source(&self, seq: SegmentSeq) -> Option<Source<'_>> {
        if let Some(s) = self.sealed.get(&seq) {
            return Some(Source::Sealed(s));
        }
        self.building.get(&seq).map(Source::Building)
    }

    /// The events `query` selects.
    pub(crate) fn find(
        &mut self,
        shared: &Shared,
        query: &Query<'_>,
    ) -> Result<Vec<RecordedEvent>> {
        let key = match query.field {
            None => None,
            Some((field, value)) => {
                let hash = field.key_for(value).ok_or_else(|| Error::InvalidOptions {
                    reason: if value.is_empty() {
                        format!(
                            "find by an empty {}: empty values are not indexed",
                            field.name()
                        )
                    } else {
                        format!("find by event_id: {value:?} is not an event id (UUID text)")
                    },
                })?;
                Some((field, hash))
            }
        };
        // A window whose end is not after its start holds nothing.
        let empty = |r: &Option<Range<Timestamp>>| r.as_ref().is_some_and(|r| r.start >= r.end);
        if query.limit == 0
            || empty(&query.record_time)
            || empty(&query.event_time)
            || query.positions.start >= query.positions.end
        {
            return Ok(Vec::new());
        }
        self.catch_up(shared)?;
        for b in self.building.values_mut() {
            b.prepare();
        }
        match self.find_in(shared, query, key) {
            Ok(out) => Ok(out),
            // A sidecar that passed its checks but led to a record that is not where it
            // says (a bug that wrote it, or an edit with a recomputed checksum): build it
            // again from the records and look again. A second failure is the records'.
            Err(FindError::Sidecar(seq, _)) => {
                self.rebuild(shared, seq)?;
                self.find_in(shared, query, key)
                    .map_err(FindError::into_error)
            }
            Err(FindError::Other(e)) => Err(e),
        }
    }

    fn find_in(
        &self,
        shared: &Shared,
        query: &Query<'_>,
        key: Option<(Field, u64)>,
    ) -> std::result::Result<Vec<RecordedEvent>, FindError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for seg in shared.segments_snapshot() {
            let Some(source) = self.source(seg.seq) else {
                continue;
            };
            let from_sidecar = matches!(source, Source::Sealed(_));
            let src = source.get();
            let base = seg.header.base_position.0;
            let n = src.record_count();
            // The candidate records, as position deltas in the segment.
            let lo = query.positions.start.0.saturating_sub(base).min(n);
            let hi = query.positions.end.0.saturating_sub(base).min(n);
            let (lo, hi) = match &query.record_time {
                Some(r) => (
                    lo.max(src.first_at_or_after(r.start)),
                    hi.min(src.first_at_or_after(r.end)),
                ),
                None => (lo, hi),
            };
            if lo >= hi {
                if base >= query.positions.end.0 {
                    break;
                }
                continue;
            }
            let (lo, hi) = (lo as u32, hi as u32);
            let mut failed = None;
            let mut take = |hit: Hit| -> bool {
                match read_event(&seg, u64::from(hit.1), Position(base + u64::from(hit.0))) {
                    Ok(ev) => {
                        if query.matches(&ev) {
                            bytes = bytes.saturating_add(ev.body().len());
                            out.push(ev);
                        }
                        out.len() < query.limit && bytes < query.max_bytes
                    }
                    Err(e) => {
                        failed = Some(e);
                        false
                    }
                }
            };
            // The index that reads the fewest records: an event type in an event-time window
            // has its own section; a field with an event-time window reads whichever of the
            // field's and the window's records are fewer; otherwise the field's, else the
            // event times'.
            let mut by_time = |each: &mut dyn FnMut(Visit<'_>)| {
                let mut hits = Vec::new();
                each(&mut |h| {
                    if (lo..hi).contains(&h.0) {
                        hits.push(h);
                    }
                });
                hits.sort_unstable();
                for h in hits {
                    if !take(h) {
                        break;
                    }
                }
            };
            let window_is_smaller = |field: Field, hash: u64, r: &Range<Timestamp>| {
                src.count_event_time(r.start, r.end) < src.count_key(field, hash, lo, hi)
            };
            match (key, &query.event_time) {
                (Some((Field::EventType, hash)), Some(r)) => {
                    by_time(&mut |f| src.each_type_event_time(hash, r.start, r.end, f));
                }
                (Some((field, hash)), Some(r)) if window_is_smaller(field, hash, r) => {
                    by_time(&mut |f| src.each_event_time(r.start, r.end, f));
                }
                (Some((field, hash)), _) => src.each_key(field, hash, lo, hi, &mut take),
                (None, Some(r)) => by_time(&mut |f| src.each_event_time(r.start, r.end, f)),
                (None, None) => {
                    let from = Position(base + u64::from(lo));
                    let to = Position(base + u64::from(hi));
                    let mut stop = false;
                    super::read::scan_range(shared, from, to, Verify::Checksums, &mut |r| {
                        if stop {
                            return;
                        }
                        stop = !take((
                            u32::try_from(r.position.0 - base).unwrap_or(u32::MAX),
                            u32::try_from(r.offset).unwrap_or(u32::MAX),
                        ));
                    })
                    .map_err(FindError::Other)?;
                }
            }
            if let Some(e) = failed {
                return Err(if from_sidecar {
                    FindError::Sidecar(seg.seq, e)
                } else {
                    FindError::Other(e)
                });
            }
            if out.len() >= query.limit || bytes >= query.max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The first position whose record time is at or after `t` (the next position if none).
    pub(crate) fn position_at(&mut self, shared: &Shared, t: Timestamp) -> Result<Position> {
        let visible = self.catch_up(shared)?;
        for seg in shared.segments_snapshot() {
            let Some(src) = self.source(seg.seq) else {
                continue;
            };
            let src = src.get();
            let d = src.first_at_or_after(t);
            if d < src.record_count() {
                return Ok(Position(seg.header.base_position.0 + d));
            }
        }
        Ok(visible)
    }

    /// The sidecar bytes the records of sealed segment `seq` give, for verification.
    pub(crate) fn expected_sidecar(shared: &Shared, seg: &SegmentHandle) -> Result<Vec<u8>> {
        let mut fresh = Attrs::default();
        let end = match &*seg
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            SegState::Sealed { footer, .. } => footer.last_position.next(),
            _ => return Ok(Vec::new()),
        };
        fresh.extend(seg, end)?;
        let builder = fresh.building.remove(&seg.seq).expect("extended above");
        Ok(builder.encode(&shared.meta.log_id))
    }
}

/// Keeps the attribute indexes caught up while the log grows, so that a lookup rarely has
/// records to index first.
pub(crate) fn indexer(shared: &Shared) {
    const POLL: Duration = Duration::from_millis(100);
    // Indexing can lag: a lookup catches up on what the indexer has not done. Appends
    // cannot wait, so they go first when the cores are busy.
    crate::sys::lower_thread_priority();
    loop {
        shared.indexing.indexer.wait(POLL);
        // One segment at a time, letting go of the lock in between (lookups wait for at
        // most one segment) and stopping early at close. A pass with nothing to do (no
        // new records, no newly sealed segment) looks at each segment's state once.
        let visible = shared.visible_position();
        loop {
            if shared.indexing.indexer.stopping() {
                return;
            }
            // A failure (damage in a record) is not this thread's to report: the next
            // lookup meets the same damage and returns it, and verify names it.
            match shared.indexing.attrs.lock().catch_up_step(shared, visible) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
        }
    }
}
