//! Projections (read models): a fold of the whole log, in log order, that keeps a durable
//! checkpoint, reports its status, and can be rebuilt while its current state keeps
//! serving readers.
//!
//! A checkpoint is the projection's state together with the position it has folded up to,
//! stored by the log itself in the stream `$projection-NAME`: the state's encoding cut into
//! parts of at most one payload, then a manifest naming the parts with the position
//! ([`crate::state_store`], docs/FORMAT.md 18.4), so a state has no size limit and is
//! never held twice while it is written. The manifest is appended last and is the commit
//! point: after any crash a restarted projection loads its last complete checkpoint,
//! resumes exactly where it was taken, and folds every later event once. Loading checks
//! every part against the manifest and falls back to the previous checkpoint on any
//! difference. A projection whose state is partitioned by key ([`Partitions`]) writes only
//! the partitions changed since its last checkpoint (a *delta*), and a *full* checkpoint
//! at least every [`ProjectorOptions::deltas_max`] deltas and whenever the deltas since the
//! full one add up to its size, so a load reads at most one full checkpoint and a bounded
//! chain of deltas. Checkpoints of the first layout (one `$ProjectionCheckpoint` event,
//! docs/FORMAT.md 18.2) still load.
//!
//! Streams whose names start with `$` (snapshots, checkpoints, consumer positions) are the
//! log's own bookkeeping and are not projected.
//!
//! This module uses only the log's public API.

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use crate::error::Error;
use crate::format::Position;
use crate::log::{Direction, EventView, Log, RecordedEvent};
use crate::state_store::{
    self, Base, EntryReader, EntryWriter, Found, Kind, ManifestHead, PartOptions, PartReader,
    StateError, StateSource, Stored,
};

/// The prefix of the stream that holds a projection's checkpoints.
pub const CHECKPOINT_STREAM_PREFIX: &str = "$projection-";
/// The event type of a projection checkpoint.
pub const CHECKPOINT_EVENT_TYPE: &str = "$ProjectionCheckpoint";
/// Bytes of a checkpoint payload before the encoded state.
pub const CHECKPOINT_HEADER_BYTES: usize = 12;
/// Events read per page while folding.
const PAGE: usize = 4096;

/// A read model folded from the log.
pub trait Projection: Sized {
    /// Version of [`Projection::encode_state`]'s encoding; checkpoints of another version
    /// are ignored (the projection then rebuilds from the start).
    const STATE_VERSION: u32;

    /// The state before the first event.
    fn initial() -> Self;

    /// Folds one event (events of `$` streams are never passed).
    ///
    /// # Errors
    /// A reason, when the event cannot be applied: the projection stops there, failed.
    fn apply(&mut self, event: &dyn EventView) -> std::result::Result<(), String>;

    /// The state, encoded for a checkpoint.
    fn encode_state(&self) -> Vec<u8>;

    /// The state from a checkpoint; `None` if the bytes do not decode.
    fn decode_state(bytes: &[u8]) -> Option<Self>;

    /// Writes the state's encoding ([`Projection::encode_state`]'s bytes) to `out`; a
    /// large state can write it piece by piece, so that a checkpoint never holds it whole.
    ///
    /// # Errors
    /// What `out` fails with.
    fn encode_state_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&self.encode_state())
    }

    /// The state decoded from `input` (the bytes [`Projection::encode_state_to`] wrote);
    /// `Ok(None)` if they do not decode. The default reads them whole, then calls
    /// [`Projection::decode_state`]; a large state can decode as it reads.
    ///
    /// # Errors
    /// What `input` fails with (a damaged part of the checkpoint).
    fn decode_state_from(input: &mut dyn Read) -> std::io::Result<Option<Self>> {
        let mut bytes = Vec::new();
        input.read_to_end(&mut bytes)?;
        Ok(Self::decode_state(&bytes))
    }

    /// The state's partitions, when it is partitioned by key: checkpoints then store it
    /// by partition and write only the partitions changed since the last one. `None`, the
    /// default, stores it whole.
    fn partitions(&self) -> Option<&dyn Partitions> {
        None
    }

    /// [`Projection::partitions`], to load and to take the changed keys.
    fn partitions_mut(&mut self) -> Option<&mut dyn Partitions> {
        None
    }
}

/// The keys of the partitions changed since the last checkpoint, for a [`Partitions`]
/// implementation to keep beside its state: bookkeeping, not state, so it never takes part
/// in equality.
#[derive(Clone, Debug, Default)]
pub struct ChangedKeys(std::collections::BTreeSet<Vec<u8>>);

impl ChangedKeys {
    /// Records that partition `key` changed (or was removed).
    pub fn mark(&mut self, key: impl Into<Vec<u8>>) {
        self.0.insert(key.into());
    }

    /// The keys recorded since the last call, in ascending order.
    pub fn take(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.0).into_iter().collect()
    }

    /// How many keys are recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PartialEq for ChangedKeys {
    fn eq(&self, _: &ChangedKeys) -> bool {
        true
    }
}

impl Eq for ChangedKeys {}

/// What [`Partitions::each_partition`] calls with each partition's key and value.
pub type PartitionVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> std::io::Result<()> + 'a;

/// A read model's state split into partitions by key (a trade, a book, an instrument), so
/// that a checkpoint costs what changed since the last one, not the size of the state.
/// Each partition is encoded on its own; the state is the set of its partitions, so
/// [`Projection::initial`] holds none (a load refuses a state that starts with some). Keys
/// are 1 to 65,536 bytes: a state whose key is longer cannot be checkpointed by partition.
pub trait Partitions {
    /// Calls `f` with every partition's key and encoded value, in ascending order of key
    /// bytes, and stops at its first error.
    ///
    /// # Errors
    /// What `f` fails with.
    fn each_partition(&self, f: &mut PartitionVisitor<'_>) -> std::io::Result<()>;

    /// Partition `key` encoded now; `None` when it has no partition (it was removed).
    fn encode_partition(&self, key: &[u8]) -> Option<Vec<u8>>;

    /// Sets partition `key` from a checkpoint; `None` removes it.
    ///
    /// # Errors
    /// A reason, when the bytes do not decode (the checkpoint is then refused).
    fn load_partition(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String>;

    /// The keys of the partitions changed (or removed) since the last call, each at least
    /// once, in any order. Every change folded since must be named: a delta checkpoint
    /// writes these partitions and no others.
    fn take_changed(&mut self) -> Vec<Vec<u8>>;
}

/// Why a projection stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] Error),
    /// A fold was asked to go past the end of the log.
    #[error("the log ends at position {end}, before {to}")]
    PastTheEnd {
        /// Where the fold was to end.
        to: u64,
        /// The log's next position.
        end: u64,
    },
    /// The projection refused an event; it stays at that event.
    #[error("projection {name}: the event at position {position} was refused: {reason}")]
    Apply {
        /// The projection.
        name: String,
        /// The event's position.
        position: u64,
        /// The projection's reason.
        reason: String,
    },
    /// A checkpoint could not be written.
    #[error("projection {name}: checkpoint: {source}")]
    Checkpoint {
        /// The projection.
        name: String,
        /// Why.
        source: Box<StateError>,
    },
}

/// What a projection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectionState {
    /// Folding, or waiting for new events.
    Running,
    /// Building a new state beside the one that serves.
    Rebuilding,
    /// Not folding.
    Stopped,
    /// Stopped at an event it refused.
    Failed,
}

/// A projection's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionStatus {
    /// What it is doing.
    pub state: ProjectionState,
    /// The next position it will fold.
    pub position: u64,
    /// Events folded since it was opened.
    pub events_applied: u64,
    /// Events refused since it was opened.
    pub errors: u64,
    /// The last refusal.
    pub last_error: Option<String>,
    /// The position its last checkpoint covers (the next position to fold after it).
    pub checkpoint: Option<u64>,
}

impl ProjectionStatus {
    /// A projection opened at `position`, from `checkpoint` (`None`: from the start).
    #[must_use]
    pub fn opened(position: u64, checkpoint: Option<u64>) -> ProjectionStatus {
        ProjectionStatus {
            state: ProjectionState::Stopped,
            position,
            events_applied: 0,
            errors: 0,
            last_error: None,
            checkpoint,
        }
    }
}

/// A checkpoint payload's position and state, if it is of `P`'s state version and decodes.
#[must_use]
pub fn usable_checkpoint<P: Projection>(payload: &[u8]) -> Option<(u64, P)> {
    let (next, version, bytes) = decode_checkpoint_payload(payload)?;
    if version != P::STATE_VERSION {
        return None;
    }
    Some((next, P::decode_state(bytes)?))
}

/// Options of a [`Projector`].
#[derive(Clone, Copy, Debug)]
pub struct ProjectorOptions {
    /// Write a checkpoint after this many events folded since the last one (and at the
    /// end of every catch-up that folded any).
    pub checkpoint_every: u64,
    /// How a checkpoint's content is cut into parts and batched.
    pub parts: PartOptions,
    /// For a partitioned state: the most delta checkpoints after a full one; the next is
    /// full. A full one is also written as soon as the deltas since the last full one add
    /// up to its size, so that what checkpoints write stays within about twice what
    /// changed. A load so reads one full checkpoint and at most this many deltas, together
    /// at most about twice the full one.
    pub deltas_max: u32,
}

impl Default for ProjectorOptions {
    fn default() -> ProjectorOptions {
        ProjectorOptions {
            checkpoint_every: 10_000,
            parts: PartOptions::default(),
            deltas_max: 256,
        }
    }
}

/// Where a projection's checkpoints stand: what a delta would build on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// The newest manifest's version in the checkpoint stream and its payload's hash.
    pub newest: Base,
    /// Its kind.
    pub kind: Kind,
    /// Deltas since the full checkpoint.
    pub depth: u32,
    /// Content bytes of the full (or whole) checkpoint.
    pub full_bytes: u64,
    /// Content bytes of the deltas since it.
    pub delta_bytes: u64,
}

impl ChainHead {
    /// Where the checkpoints stand once `stored` (of `kind`) was written after `previous`.
    #[must_use]
    pub fn after(previous: Option<ChainHead>, kind: Kind, stored: &Stored) -> ChainHead {
        let newest = Base {
            version: stored.version,
            hash: stored.hash,
        };
        match (kind, previous) {
            (Kind::Delta, Some(p)) => ChainHead {
                newest,
                kind,
                depth: p.depth + 1,
                full_bytes: p.full_bytes,
                delta_bytes: p.delta_bytes + stored.content_bytes,
            },
            _ => ChainHead {
                newest,
                kind,
                depth: 0,
                full_bytes: stored.content_bytes,
                delta_bytes: 0,
            },
        }
    }
}

/// A checkpoint found by [`load_checkpoint`].
#[derive(Debug)]
pub struct LoadedCheckpoint<P> {
    /// The first position its state has not folded.
    pub next: u64,
    /// The state.
    pub state: P,
    /// Where its manifests stand (`None` for a checkpoint of the first layout).
    pub head: Option<ChainHead>,
}

/// What [`load_checkpoint`] found: the newest usable checkpoint, if any, and every newer
/// one it refused, newest first, with the reason.
#[derive(Debug)]
pub struct CheckpointSearch<P> {
    /// The checkpoint to start from.
    pub found: Option<LoadedCheckpoint<P>>,
    /// Checkpoints passed over: the stream version of each manifest and why.
    pub refused: Vec<(u64, StateError)>,
}

/// The state readers see: shared, replaced whole by a rebuild.
pub type SharedState<P> = Arc<RwLock<P>>;

/// Runs one projection over one log.
#[derive(Debug)]
pub struct Projector<'a, P> {
    log: &'a Log,
    name: String,
    stream: String,
    state: SharedState<P>,
    next: u64,
    opts: ProjectorOptions,
    since_checkpoint: u64,
    status: StatusHandle,
    registry: Option<crate::schema::Registry>,
    head: Option<ChainHead>,
    force_full: bool,
    refused: Vec<(u64, StateError)>,
}

/// A projector's status, readable on any thread while the projector runs (a rebuild shows
/// [`ProjectionState::Rebuilding`] to readers while the old state serves them).
#[derive(Clone, Debug)]
pub struct StatusHandle(Arc<parking_lot::Mutex<ProjectionStatus>>);

impl StatusHandle {
    /// A handle holding `status`.
    #[must_use]
    pub fn new(status: ProjectionStatus) -> StatusHandle {
        StatusHandle(Arc::new(parking_lot::Mutex::new(status)))
    }

    /// The status now.
    #[must_use]
    pub fn get(&self) -> ProjectionStatus {
        self.0.lock().clone()
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, ProjectionStatus> {
        self.0.lock()
    }

    /// Records a failure: state, count and message together, so that a reader never sees
    /// one without the others.
    pub fn fail(&self, reason: &str) {
        let mut s = self.0.lock();
        s.state = ProjectionState::Failed;
        s.errors += 1;
        s.last_error = Some(reason.to_owned());
    }
}

/// The checkpoint stream of projection `name`.
#[must_use]
pub fn checkpoint_stream(name: &str) -> String {
    format!("{CHECKPOINT_STREAM_PREFIX}{name}")
}

/// Encodes a checkpoint payload.
#[must_use]
pub fn encode_checkpoint_payload(next: u64, state_version: u32, state: &[u8]) -> Vec<u8> {
    // The snapshot payload's layout (FORMAT.md 18.1 and 18.2): a u64, a u32, the state.
    crate::aggregate::encode_snapshot_payload(next, state_version, state)
}

/// Decodes a checkpoint payload: `(next position, state version, state)`.
#[must_use]
pub fn decode_checkpoint_payload(p: &[u8]) -> Option<(u64, u32, &[u8])> {
    crate::aggregate::decode_snapshot_payload(p)
}

fn is_system(e: &RecordedEvent) -> bool {
    e.stream().starts_with('$')
}

impl<'a, P: Projection> Projector<'a, P> {
    /// Opens projection `name`: from its latest usable checkpoint, or from the start.
    ///
    /// # Errors
    /// [`ProjectionError::Log`].
    pub fn open(
        log: &'a Log,
        name: &str,
        opts: ProjectorOptions,
    ) -> std::result::Result<Projector<'a, P>, ProjectionError> {
        let stream = checkpoint_stream(name);
        crate::format::envelope::check_stream_id(&stream).map_err(|e| Error::InvalidEvent {
            index: 0,
            source: e,
        })?;
        let search = load_checkpoint::<P>(log, name)?;
        let (next, state, checkpoint, head) = match search.found {
            Some(c) => (c.next, c.state, Some(c.next), c.head),
            None => (0, P::initial(), None, None),
        };
        Ok(Projector {
            log,
            name: name.to_owned(),
            stream,
            state: Arc::new(RwLock::new(state)),
            next,
            opts,
            since_checkpoint: 0,
            status: StatusHandle::new(ProjectionStatus::opened(next, checkpoint)),
            registry: None,
            head,
            force_full: false,
            refused: search.refused,
        })
    }

    /// The checkpoints [`Projector::open`] passed over because they did not load (a
    /// damaged, missing or misnamed part), newest first: the stream version of each
    /// manifest and why.
    #[must_use]
    pub fn refused_checkpoints(&self) -> &[(u64, StateError)] {
        &self.refused
    }

    /// Where the checkpoints stand: what the next delta builds on.
    #[must_use]
    pub fn chain_head(&self) -> Option<ChainHead> {
        self.head
    }

    /// The state, for readers on any thread (a rebuild replaces what it holds).
    #[must_use]
    pub fn shared_state(&self) -> SharedState<P> {
        Arc::clone(&self.state)
    }

    /// The status.
    #[must_use]
    pub fn status(&self) -> ProjectionStatus {
        self.status.get()
    }

    /// The status, for readers on any thread.
    #[must_use]
    pub fn status_handle(&self) -> StatusHandle {
        self.status.clone()
    }

    fn set_next(&mut self, next: u64) {
        self.next = next;
        self.status.lock().position = next;
    }

    /// Shows every event to the projection as its newest schema version (see
    /// [`crate::schema`]), so that it only ever handles the newest payloads.
    pub fn set_registry(&mut self, registry: crate::schema::Registry) {
        self.registry = Some(registry);
    }

    fn apply_event(&self, e: &RecordedEvent) -> std::result::Result<(), String> {
        crate::schema::with_newest(self.registry.as_ref(), e, |shown| {
            self.state.write().apply(shown)
        })
    }

    fn fold_one(&mut self, e: &RecordedEvent) -> std::result::Result<(), ProjectionError> {
        debug_assert_eq!(e.position.0, self.next);
        if !is_system(e)
            && let Err(reason) = self.apply_event(e)
        {
            self.status.fail(&reason);
            return Err(ProjectionError::Apply {
                name: self.name.clone(),
                position: e.position.0,
                reason,
            });
        }
        self.set_next(e.position.0 + 1);
        if is_system(e) {
            // Bookkeeping (this projection's own checkpoints among it) neither counts nor
            // calls for a checkpoint.
            return Ok(());
        }
        self.status.lock().events_applied += 1;
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.opts.checkpoint_every.max(1) {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Folds every event visible now, checkpointing as the options say and at the end.
    /// Returns the events folded.
    ///
    /// # Errors
    /// [`ProjectionError`]; after a refusal the projection stays at the refused event.
    pub fn catch_up(&mut self) -> std::result::Result<u64, ProjectionError> {
        self.status.lock().state = ProjectionState::Running;
        let before = self.status.lock().events_applied;
        loop {
            let page = self
                .log
                .read_all(Position(self.next), PAGE, Direction::Forward)?;
            for e in &page {
                self.fold_one(e)?;
            }
            if page.len() < PAGE {
                break;
            }
        }
        if self.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        Ok(self.status.lock().events_applied - before)
    }

    /// Folds events as they become visible until `stop` is set (checked at least every
    /// `poll`), then checkpoints.
    ///
    /// # Errors
    /// As [`Projector::catch_up`].
    pub fn follow(
        &mut self,
        stop: &AtomicBool,
        poll: Duration,
    ) -> std::result::Result<(), ProjectionError> {
        self.catch_up()?;
        let mut tail = self.log.tail(Position(self.next));
        while !stop.load(Ordering::SeqCst) {
            match tail.next_timeout(poll)? {
                Some(e) => self.fold_one(&e)?,
                None => {
                    if self.since_checkpoint > 0 {
                        self.checkpoint()?;
                    }
                }
            }
        }
        if self.since_checkpoint > 0 {
            self.checkpoint()?;
        }
        self.status.lock().state = ProjectionState::Stopped;
        Ok(())
    }

    /// Writes a checkpoint of the state and position now.
    ///
    /// # Errors
    /// [`ProjectionError::Log`].
    pub fn checkpoint(&mut self) -> std::result::Result<(), ProjectionError> {
        let written = write_checkpoint(
            self.log,
            &self.stream,
            &self.state,
            self.next,
            self.head,
            self.force_full,
            &self.opts,
        );
        match written {
            Ok(head) => {
                self.head = Some(head);
                self.force_full = false;
            }
            Err(source) => {
                // The changed keys were taken: only a full checkpoint is whole now.
                self.force_full = true;
                return Err(ProjectionError::Checkpoint {
                    name: self.name.clone(),
                    source: Box::new(source),
                });
            }
        }
        self.since_checkpoint = 0;
        self.status.lock().checkpoint = Some(self.next);
        Ok(())
    }

    /// Rebuilds the state from the first event into a new state, while the current one
    /// keeps serving readers, then replaces it and checkpoints. For a changed handler, or
    /// a state that is in doubt.
    ///
    /// # Errors
    /// As [`Projector::catch_up`]; on an error the old state keeps serving.
    pub fn rebuild(&mut self) -> std::result::Result<(), ProjectionError> {
        self.rebuild_from(0)
    }

    /// [`Projector::rebuild`] over the events from position `from` on only: a read model
    /// of a window of history (the day's P&L from the day's first position), built while
    /// the current state serves, then swapped in and checkpointed, and followed from there.
    ///
    /// # Errors
    /// As [`Projector::rebuild`].
    pub fn rebuild_from(&mut self, from: u64) -> std::result::Result<(), ProjectionError> {
        self.status.lock().state = ProjectionState::Rebuilding;
        let upto = self.log.next_position().0;
        let fresh = fold_window_with(self.log, &self.name, from, upto, self.registry.as_ref())
            .inspect_err(|e| self.status.fail(&e.to_string()))?;
        *self.state.write() = fresh;
        self.set_next(upto);
        self.since_checkpoint = 0;
        self.force_full = true;
        self.checkpoint()
            .inspect_err(|e| self.status.fail(&e.to_string()))?;
        // Events that arrived during the rebuild (a refusal there is recorded by the
        // catch-up itself).
        self.catch_up()?;
        Ok(())
    }
}

/// What a checkpoint about to be written holds: its manifest's fields besides the parts,
/// and for a delta the partitions it writes. Made by [`plan_checkpoint`]; the content is
/// written by [`write_checkpoint_content`], to the log ([`write_checkpoint`]) or through a
/// server.
#[derive(Clone, Debug)]
pub struct CheckpointPlan {
    /// The manifest's fields besides the parts.
    pub head: ManifestHead,
    /// For a delta: the keys of the partitions it writes, ascending.
    pub changed: Vec<Vec<u8>>,
}

/// Plans a checkpoint of `state` at `next`: whole, or for a partitioned state a delta of
/// the partitions changed since `head`, or a full one when `force_full`, when there is no
/// chain to build on, or when the options' bounds call for one. Takes the changed keys.
pub fn plan_checkpoint<P: Projection>(
    state: &RwLock<P>,
    next: u64,
    head: Option<ChainHead>,
    force_full: bool,
    opts: &ProjectorOptions,
) -> CheckpointPlan {
    let changed = state.write().partitions_mut().map(Partitions::take_changed);
    let whole = ManifestHead {
        at: next,
        state_version: P::STATE_VERSION,
        kind: Kind::Whole,
        depth: 0,
        base: None,
        previous: head.map(|h| h.newest.version),
    };
    let Some(mut changed) = changed else {
        return CheckpointPlan {
            head: whole,
            changed: Vec::new(),
        };
    };
    let delta_on = head.filter(|h| {
        !force_full
            && h.kind != Kind::Whole
            && h.depth < opts.deltas_max.min(state_store::DELTA_DEPTH_MAX)
            && h.delta_bytes < h.full_bytes
    });
    match delta_on {
        None => CheckpointPlan {
            head: ManifestHead {
                kind: Kind::Full,
                ..whole
            },
            changed: Vec::new(),
        },
        Some(h) => {
            changed.sort_unstable();
            changed.dedup();
            CheckpointPlan {
                head: ManifestHead {
                    kind: Kind::Delta,
                    depth: h.depth + 1,
                    base: Some(h.newest),
                    ..whole
                },
                changed,
            }
        }
    }
}

/// Writes the content `plan` calls for: the state's own encoding, every partition, or the
/// changed ones.
///
/// # Errors
/// What `out` fails with; `InvalidInput` when the plan is partitioned and the state is not.
pub fn write_checkpoint_content<P: Projection>(
    state: &P,
    plan: &CheckpointPlan,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    if plan.head.kind == Kind::Whole {
        return state.encode_state_to(out);
    }
    let parts = state.partitions().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a partitioned checkpoint of a state without partitions",
        )
    })?;
    let mut entries = EntryWriter::new(out);
    if plan.head.kind == Kind::Full {
        return parts.each_partition(&mut |k, v| entries.entry(k, Some(v)));
    }
    for k in &plan.changed {
        entries.entry(k, parts.encode_partition(k).as_deref())?;
    }
    Ok(())
}

/// Writes a checkpoint of `state` at `next` to `stream` as [`plan_checkpoint`] plans it,
/// and returns where the checkpoints then stand.
///
/// # Errors
/// [`StateError`]; a partitioned state's changed keys are taken even then.
pub fn write_checkpoint<P: Projection>(
    log: &Log,
    stream: &str,
    state: &RwLock<P>,
    next: u64,
    head: Option<ChainHead>,
    force_full: bool,
    opts: &ProjectorOptions,
) -> std::result::Result<ChainHead, StateError> {
    let plan = plan_checkpoint(state, next, head, force_full, opts);
    let guard = state.read();
    let stored = state_store::write_parts(log, stream, plan.head, opts.parts, |w| {
        write_checkpoint_content(&*guard, &plan, w)
    })?;
    Ok(ChainHead::after(head, plan.head.kind, &stored))
}

/// Finds projection `name`'s newest checkpoint that loads, reading its checkpoint stream
/// from the newest event back (one event at a time, so that parts are never held beyond
/// one): a manifest whose state version is `P`'s loads if every part and base it names
/// checks out and the projection takes the state, and is otherwise passed over with the
/// reason, for the one before it; a checkpoint of the first layout loads if it decodes.
///
/// # Errors
/// [`ProjectionError::Log`] when the log fails (a refused checkpoint is not an error).
pub fn load_checkpoint<P: Projection>(
    log: &Log,
    name: &str,
) -> std::result::Result<CheckpointSearch<P>, ProjectionError> {
    let stream = checkpoint_stream(name);
    search_checkpoints(&mut state_store::LogSource {
        log,
        stream: &stream,
    })
    .map_err(|e| match e {
        StateError::Log(e) => ProjectionError::Log(e),
        other => ProjectionError::Checkpoint {
            name: name.to_owned(),
            source: Box::new(other),
        },
    })
}

/// [`load_checkpoint`] from any source of the checkpoint stream (the server's client reads
/// it through a server).
///
/// # Errors
/// What the source fails with (a refused checkpoint is not an error).
pub fn search_checkpoints<P: Projection>(
    source: &mut dyn StateSource,
) -> std::result::Result<CheckpointSearch<P>, StateError> {
    let mut refused = Vec::new();
    let mut from = u64::MAX;
    while let Some((version, event_type, payload)) = source.at_or_before(from)? {
        let mut older = version.checked_sub(1);
        if event_type == CHECKPOINT_EVENT_TYPE {
            if let Some((next, state)) = usable_checkpoint::<P>(&payload) {
                return Ok(CheckpointSearch {
                    found: Some(LoadedCheckpoint {
                        next,
                        state,
                        head: None,
                    }),
                    refused,
                });
            }
        } else {
            match Found::from_event(version, &event_type, &payload) {
                Ok(None) => {}
                Err(why) => refused.push((version, why)),
                Ok(Some(found)) => {
                    older = found.manifest.previous.or(older);
                    if found.manifest.state_version == P::STATE_VERSION {
                        match load_manifest::<P>(source, found) {
                            Ok(c) => {
                                return Ok(CheckpointSearch {
                                    found: Some(c),
                                    refused,
                                });
                            }
                            // A source that cannot be reached: stop, rather than fold
                            // from an older checkpoint because of a network failure.
                            Err(e @ StateError::Unavailable(_)) => return Err(e),
                            // A part the log cannot read (damaged on disk) refuses this
                            // checkpoint like a part that differs: the one before may load.
                            Err(why) => refused.push((version, why)),
                        }
                    }
                }
            }
        }
        match older {
            Some(v) => from = v,
            None => break,
        }
    }
    Ok(CheckpointSearch {
        found: None,
        refused,
    })
}

/// Loads the state a manifest names: its chain of manifests, then every part of each,
/// checked as it is read.
fn load_manifest<P: Projection>(
    source: &mut dyn StateSource,
    newest: Found,
) -> std::result::Result<LoadedCheckpoint<P>, StateError> {
    let chain = state_store::chain(newest, |v| source.at(v))?;
    let (first, last) = match (chain.first(), chain.last()) {
        (Some(f), Some(l)) => (f, l),
        _ => return Err(StateError::Manifest("an empty chain")),
    };
    let head = ChainHead {
        newest: Base {
            version: last.version,
            hash: last.hash,
        },
        kind: last.manifest.kind,
        depth: last.manifest.depth,
        full_bytes: first.manifest.content_bytes,
        delta_bytes: chain[1..].iter().map(|f| f.manifest.content_bytes).sum(),
    };
    let state = if first.manifest.kind == Kind::Whole {
        let mut reader = PartReader::new(&first.manifest, |v| source.at(v));
        let state = P::decode_state_from(&mut reader)
            .map_err(StateError::from_io)?
            .ok_or_else(|| StateError::State("its bytes do not decode".to_owned()))?;
        state_store::drain(&mut reader)?;
        state
    } else {
        let mut state = P::initial();
        let mut initial_partitions = 0u64;
        if let Some(p) = state.partitions() {
            p.each_partition(&mut |_, _| {
                initial_partitions += 1;
                Ok(())
            })
            .map_err(StateError::from_io)?;
        }
        if initial_partitions > 0 {
            // A full checkpoint lists every partition and has no removals: loaded on top of
            // partitions it does not name, it would bring back ones the fold removed.
            return Err(StateError::State(format!(
                "the projection's initial state has {initial_partitions} partitions; a partitioned state must start with none"
            )));
        }
        let parts = state.partitions_mut().ok_or_else(|| {
            StateError::State("it is partitioned and the projection is not".to_owned())
        })?;
        for f in &chain {
            let mut entries = EntryReader::new(PartReader::new(&f.manifest, |v| source.at(v)));
            while let Some((key, value)) = entries.next_entry()? {
                if value.is_none() && f.manifest.kind == Kind::Full {
                    return Err(StateError::State(format!(
                        "the full checkpoint at stream version {} removes a partition",
                        f.version
                    )));
                }
                parts
                    .load_partition(key, value)
                    .map_err(StateError::State)?;
            }
        }
        parts.take_changed();
        state
    };
    Ok(LoadedCheckpoint {
        next: last.manifest.at,
        state,
        head: Some(head),
    })
}

/// Folds the events of positions `from..to` into a fresh state, without touching any
/// projector: a window of history (one day's P&L), or a rebuild's new state.
///
/// # Errors
/// [`ProjectionError`].
pub fn fold_window<P: Projection>(
    log: &Log,
    name: &str,
    from: u64,
    to: u64,
) -> std::result::Result<P, ProjectionError> {
    fold_window_with(log, name, from, to, None)
}

/// [`fold_window`], showing every event to the projection as its newest schema version
/// through `registry` when there is one (see [`crate::schema`]).
///
/// # Errors
/// [`ProjectionError`]; an event that cannot be upcast is an [`ProjectionError::Apply`].
pub fn fold_window_with<P: Projection>(
    log: &Log,
    name: &str,
    from: u64,
    to: u64,
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<P, ProjectionError> {
    let mut state = P::initial();
    each_projected_event(log, from, to, |e| {
        apply_viewed(&mut state, &e, name, registry)
    })?;
    Ok(state)
}

/// Folds one event into `state`, upcast through `registry` when there is one.
pub(crate) fn apply_viewed<P: Projection>(
    state: &mut P,
    e: &RecordedEvent,
    name: &str,
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<(), ProjectionError> {
    with_view(e, name, registry, |shown| apply_to(state, shown, name))
}

/// Calls `f` with `e` as a projection sees it: upcast through `registry` when there is one
/// (an event that cannot be upcast is refused, naming the projection and position).
pub(crate) fn with_view<T>(
    e: &RecordedEvent,
    name: &str,
    registry: Option<&crate::schema::Registry>,
    f: impl FnOnce(&dyn EventView) -> std::result::Result<T, ProjectionError>,
) -> std::result::Result<T, ProjectionError> {
    let refused = |reason| ProjectionError::Apply {
        name: name.to_owned(),
        position: e.position.0,
        reason,
    };
    if let Some(reason) = crate::log::fold_refusal(e) {
        return Err(refused(reason));
    }
    match registry {
        None => f(e),
        Some(r) => f(&r.view(e).map_err(|err| refused(err.to_string()))?),
    }
}

/// Calls `visit` with every event of positions `from..to` outside `$` streams, in log
/// order, reading the log a page at a time.
pub(crate) fn each_projected_event<E: From<Error>>(
    log: &Log,
    from: u64,
    to: u64,
    mut visit: impl FnMut(RecordedEvent) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let mut next = from;
    while next < to {
        let want = PAGE.min(usize::try_from(to - next).unwrap_or(PAGE));
        let page = log.read_all(Position(next), want, Direction::Forward)?;
        let full = page.len() == want;
        match page.last() {
            Some(last) => next = last.position.0 + 1,
            None => break,
        }
        for e in page
            .into_iter()
            .filter(|e| e.position.0 < to && !is_system(e))
        {
            visit(e)?;
        }
        if !full {
            break;
        }
    }
    Ok(())
}

/// Folds one event into `state`, naming the projection and position on a refusal.
pub(crate) fn apply_to<P: Projection>(
    state: &mut P,
    e: &dyn EventView,
    name: &str,
) -> std::result::Result<(), ProjectionError> {
    state.apply(e).map_err(|reason| ProjectionError::Apply {
        name: name.to_owned(),
        position: e.position().0,
        reason,
    })
}

/// A projection's state in the view `as_of` (see [`crate::aggregate::AsOf`]): what the
/// log knew at a record time, what was true at an event time (late events in their
/// business-time place), or both. Folded from the first event; the events of the view are
/// held in memory while they are put in event-time order.
///
/// # Errors
/// [`ProjectionError`].
pub fn fold_as_of<P: Projection>(
    log: &Log,
    name: &str,
    as_of: crate::aggregate::AsOf,
) -> std::result::Result<P, ProjectionError> {
    fold_as_of_with(log, name, as_of, None)
}

/// [`fold_as_of`], showing events through `registry` when there is one.
///
/// # Errors
/// As [`fold_window_with`].
pub fn fold_as_of_with<P: Projection>(
    log: &Log,
    name: &str,
    as_of: crate::aggregate::AsOf,
    registry: Option<&crate::schema::Registry>,
) -> std::result::Result<P, ProjectionError> {
    let mut events = Vec::new();
    each_projected_event(log, 0, u64::MAX, |e| {
        if as_of.includes(&e) {
            events.push(e);
        }
        Ok::<_, ProjectionError>(())
    })?;
    as_of.order(&mut events);
    let mut state = P::initial();
    for e in &events {
        apply_viewed(&mut state, e, name, registry)?;
    }
    Ok(state)
}
