//! State shared by the API, the appenders and the background threads: the log's identity
//! and its parts ([`CommitPath`], [`Visible`], [`SegmentSet`], [`Evidence`], [`Indexing`]),
//! each owning its state and locks. The lock order across them is in [`super::order`];
//! docs/ARCHITECTURE.md draws the parts and who uses them.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::background::SealJob;
use super::checkpoints::Checkpoints;
pub(crate) use super::commit::{CommitGuard, CommitPath};
use super::order::{Ordered, Rank};
use super::tree::Tree;
use super::visible::Visible;
use super::{Options, SegmentInfo};
use crate::error::Result;
use crate::format::meta::LogMeta;
use crate::format::{Hash32, Position, SegmentSeq};
pub(crate) use crate::segment::{SegState, SegmentHandle};
use crate::sys::FsFile;

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent
/// before anything that can panic, and a panicking appender must not take reads down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Spare segment files prepared ahead of time.
#[derive(Debug, Default)]
pub(crate) struct Spares {
    /// Prepared, zeroed and synced: `(seq, path)`.
    pub(crate) ready: Vec<(SegmentSeq, PathBuf)>,
    /// The highest seq asked for.
    pub(crate) wanted: Option<SegmentSeq>,
    /// The highest seq that exists as a segment or spare: never prepared again.
    pub(crate) prepared: Option<SegmentSeq>,
    pub(crate) error: Option<Arc<io::Error>>,
}

/// What recovery opened, shared by the API, the appenders and the background threads:
/// the log's identity and one part per concern, each owning its state and locks.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) opts: Options,
    pub(crate) meta: LogMeta,
    pub(crate) seed: Hash32,
    pub(crate) read_only: bool,
    /// The writer lock, group commit and the poison.
    pub(crate) commit: CommitPath,
    /// The visible end and the tailers waiting past it.
    pub(crate) visible: Visible,
    /// The segments, the spares prepared ahead and the seals in flight.
    pub(crate) segments: SegmentSet,
    /// The Merkle tree, the signed checkpoints and the checkpoint thread.
    pub(crate) evidence: Evidence,
    /// The attribute indexes and the thread that keeps them caught up.
    pub(crate) indexing: Indexing,
    /// The cold tier: its store, manifest and cache.
    pub(crate) cold: Arc<super::cold::ColdTier>,
    /// Producer keys and the signing policy (`$producers`), read by every append and
    /// written only by the producer registration operations, which hold it for writing
    /// around their own append so that every append is ordered after or before them.
    pub(crate) producers: Ordered<parking_lot::RwLock<super::producers::ProducerPolicy>>,
    /// Orders governance changes and retention runs (`$governance`).
    pub(crate) governance: Ordered<parking_lot::Mutex<()>>,
    /// Orders appends that seal personal data against forgets.
    pub(crate) erasing: Ordered<parking_lot::RwLock<()>>,
    /// Set when the background threads (preparer, sealer, flusher) are told to stop.
    pub(crate) shutdown: AtomicBool,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    /// The directory's lock, released at close.
    pub(crate) lock_file: Mutex<Option<Box<dyn FsFile>>>,
    pub(crate) closed: AtomicBool,
    /// The recorded erasures (`$erasures`), by subject: a leaf lock, held only to look up
    /// or insert.
    pub(crate) erasures: parking_lot::RwLock<
        std::collections::HashMap<crate::format::sealed::SubjectHash, super::personal::Erasure>,
    >,
    /// The background retention thread (`Options::retention_every`).
    pub(crate) retention: Worker,
    /// What the background and compaction retention runs did (a leaf lock).
    pub(crate) retention_status: Mutex<super::retention::RetentionStatus>,
}

/// The segments of the log and their life from spare to sealed.
#[derive(Debug)]
pub(crate) struct SegmentSet {
    /// Oldest first; the last is the active segment (of a writable log).
    list: RwLock<Vec<Arc<SegmentHandle>>>,
    pub(crate) spares: Ordered<Mutex<Spares>>,
    pub(crate) spares_cv: Condvar,
    pub(crate) seal_tx: Mutex<Option<mpsc::Sender<SealJob>>>,
    /// Segments handed to the sealer and not yet sealed.
    pub(crate) sealing: Ordered<Mutex<u64>>,
    pub(crate) sealing_cv: Condvar,
    /// Set by a simulated crash: the sealer drops its queue.
    pub(crate) abandon_seals: AtomicBool,
    /// Segments whose sidecar was rebuilt since open (for the recovery report).
    pub(crate) rebuilt: Mutex<Vec<SegmentSeq>>,
    /// The cold tier, handed to every segment that joins the list.
    tier: Arc<super::cold::ColdTier>,
}

impl SegmentSet {
    pub(crate) fn new(spares: Spares, tier: Arc<super::cold::ColdTier>) -> SegmentSet {
        SegmentSet {
            list: RwLock::new(Vec::new()),
            spares: Ordered::new(Rank::Spares, Mutex::new(spares)),
            spares_cv: Condvar::new(),
            seal_tx: Mutex::new(None),
            sealing: Ordered::new(Rank::Sealing, Mutex::new(0)),
            sealing_cv: Condvar::new(),
            abandon_seals: AtomicBool::new(false),
            rebuilt: Mutex::new(Vec::new()),
            tier,
        }
    }

    /// The segments, oldest first, as they are now.
    pub(crate) fn snapshot(&self) -> Vec<Arc<SegmentHandle>> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The segments, oldest first, while the guard is held (a leaf lock).
    pub(crate) fn list(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<SegmentHandle>>> {
        self.list
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds the newest segment.
    pub(crate) fn push(&self, segment: Arc<SegmentHandle>) {
        let mut list = self
            .list
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        assert!(
            list.last().is_none_or(|l| l.seq < segment.seq),
            "segments are added in order"
        );
        let _ = segment.tier.set(Arc::clone(&self.tier));
        list.push(segment);
    }
}

/// The log's evidence: its Merkle tree and signed checkpoints, and the thread that writes
/// checkpoints as the log grows.
#[derive(Debug)]
pub(crate) struct Evidence {
    /// The log's Merkle tree. Lock order: `checkpoints`, then `tree`, then `writer`.
    pub(crate) tree: Ordered<Mutex<Tree>>,
    /// Signed checkpoints and the signing key. Held for a whole checkpoint (sync, tree,
    /// signature): readers use `signed` and `public_key` instead.
    pub(crate) checkpoints: Ordered<Mutex<Checkpoints>>,
    /// The signed checkpoints, published after each is durable: what readers (checkpoint
    /// lists, notes, SERVER_INFO) see without waiting for a checkpoint in progress. A leaf
    /// lock: taken last, held only to copy.
    pub(crate) signed:
        Ordered<parking_lot::RwLock<Vec<crate::format::checkpoint::SignedCheckpoint>>>,
    /// The public half of the signing key (`None` for a read-only log), set at open.
    pub(crate) public_key: OnceLock<Option<[u8; 32]>>,
    /// The checkpoint thread, stopped before anything else on close (it reads through the
    /// writer lock that close holds); woken when a seal asks for a checkpoint.
    pub(crate) checkpointer: Worker,
}

impl Evidence {
    pub(crate) fn new(seed: Hash32) -> Evidence {
        Evidence {
            tree: Ordered::new(Rank::Tree, Mutex::new(Tree::empty(seed))),
            checkpoints: Ordered::new(Rank::Checkpoints, Mutex::new(Checkpoints::empty())),
            signed: Ordered::new(Rank::Signed, parking_lot::RwLock::new(Vec::new())),
            public_key: OnceLock::new(),
            checkpointer: Worker::default(),
        }
    }
}

/// The attribute indexes and their indexer thread.
#[derive(Debug)]
pub(crate) struct Indexing {
    /// The attribute indexes. Lock order: `attrs`, then `writer`.
    pub(crate) attrs: Ordered<Mutex<super::attrs::Attrs>>,
    /// The indexer thread, stopped before close takes the writer lock (a catch-up may read
    /// the active segment's sparse index through it).
    pub(crate) indexer: Worker,
}

impl Indexing {
    pub(crate) fn new() -> Indexing {
        Indexing {
            attrs: Ordered::new(Rank::Attrs, Mutex::new(super::attrs::Attrs::default())),
            indexer: Worker::default(),
        }
    }
}

/// A background thread that sleeps until signalled or a poll interval passes, and stops
/// when asked.
#[derive(Debug, Default)]
pub(crate) struct Worker {
    due: Mutex<bool>,
    cv: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl Worker {
    pub(crate) fn set_thread(&self, thread: JoinHandle<()>) {
        *lock(&self.thread) = Some(thread);
    }

    /// Wakes the thread with work due.
    pub(crate) fn signal(&self) {
        *lock(&self.due) = true;
        self.cv.notify_all();
    }

    /// Sleeps until signalled or `poll` passes; whether work was signalled (and takes it).
    pub(crate) fn wait(&self, poll: Duration) -> bool {
        let mut due = lock(&self.due);
        if !*due {
            due = self
                .cv
                .wait_timeout(due, poll)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        std::mem::take(&mut *due)
    }

    /// Whether the thread is asked to stop.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Asks the thread to stop and waits for it.
    pub(crate) fn stop(&self) {
        {
            let mut due = lock(&self.due);
            self.stopping.store(true, Ordering::SeqCst);
            *due = true;
            self.cv.notify_all();
        }
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// The storage every file of this log goes through.
    pub(crate) fn fs(&self) -> &crate::Storage {
        &self.opts.storage
    }

    /// The segments, oldest first, as they are now.
    pub(crate) fn segments_snapshot(&self) -> Vec<Arc<SegmentHandle>> {
        self.segments.snapshot()
    }

    pub(crate) fn visible_position(&self) -> Position {
        self.visible.position()
    }

    /// Makes records below `upto` visible and wakes tailers.
    pub(crate) fn publish_visible(&self, upto: Position) {
        self.visible.publish(upto);
    }

    /// Waits until every position below `target` is durable (group commit, see
    /// [`CommitPath::wait_durable`]).
    pub(crate) fn wait_durable(&self, target: Position) -> Result<()> {
        self.commit
            .wait_durable(target, &self.visible, &self.shutdown)
    }

    /// Syncs every dirty range as the leader (see [`CommitPath::lead_sync`]).
    pub(crate) fn lead_sync<'a>(&'a self, c: CommitGuard<'a>) -> CommitGuard<'a> {
        self.commit.lead_sync(c, &self.visible)
    }

    /// Makes everything written so far durable (see [`CommitPath::sync_all`]).
    pub(crate) fn sync_all(&self) -> Result<()> {
        self.commit.sync_all(&self.visible, &self.shutdown)
    }

    #[cfg(any(test, feature = "internals"))]
    pub(crate) fn inject_sync_failure(&self) {
        self.commit.inject_sync_failure();
    }

    /// Waits until no rolled segment is waiting to be sealed.
    pub(crate) fn wait_sealed(&self) -> Result<()> {
        let mut pending = self.segments.sealing.lock();
        loop {
            // Checked after the last seal too: a seal that failed counts as done.
            self.poison_error()?;
            if *pending == 0 {
                return Ok(());
            }
            pending = pending.wait_timeout(&self.segments.sealing_cv, Duration::from_millis(50));
        }
    }

    /// The poison, as the error every write gets, if the log is poisoned.
    pub(crate) fn poison_error(&self) -> Result<()> {
        self.commit.poison_error()
    }

    pub(crate) fn segment_infos(&self) -> Vec<SegmentInfo> {
        let segs = self.segments_snapshot();
        let visible = self.visible_position();
        segs.iter()
            .map(|s| {
                let st = s
                    .state
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let record_times = match &*st {
                    SegState::Sealed { footer, .. } => {
                        Some((footer.first_record_time, footer.last_record_time))
                    }
                    _ => None,
                };
                let (record_count, sealed, merkle_root, data_end) = match &*st {
                    SegState::Sealed { footer, .. } => (
                        footer.record_count,
                        true,
                        Some(footer.merkle_root),
                        footer.data_end,
                    ),
                    SegState::Frozen { index, data_end } => {
                        (index.record_count(), false, None, *data_end)
                    }
                    SegState::Active => (
                        visible.0.saturating_sub(s.header.base_position.0),
                        false,
                        None,
                        s.mapped()
                            .map_or(crate::format::SEGMENT_DATA_START, |m| m.published()),
                    ),
                };
                SegmentInfo {
                    seq: s.seq,
                    path: s.path.clone(),
                    base_position: s.header.base_position,
                    record_count,
                    data_end,
                    sealed,
                    merkle_root,
                    cold: s
                        .cold_place()
                        .map(|c| format!("{}/{}", c.tier.store_url(), c.key)),
                    record_times,
                }
            })
            .collect()
    }

    /// Stops the background threads and waits for them.
    fn stop_threads(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        *lock(&self.segments.seal_tx) = None;
        {
            let _c = self.commit.lock();
            self.commit.flush_cv.notify_all();
        }
        {
            let _s = self.segments.spares.lock();
            self.segments.spares_cv.notify_all();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }

    fn wake_everyone(&self) {
        self.visible.wake_all();
        self.commit.cv.notify_all();
    }

    /// Closes cleanly: refuses new appends, syncs, finishes sealing, writes the active
    /// index and the stream snapshot, releases the lock.
    pub(crate) fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A last checkpoint covers everything acknowledged, before appends stop (it reads
        // through the writer lock).
        self.retention.stop();
        self.cold.compactor.stop();
        self.indexing.indexer.stop();
        self.evidence.checkpointer.stop();
        let checkpointed =
            if self.read_only || !self.opts.auto_checkpoints || self.commit.is_poisoned() {
                Ok(())
            } else {
                super::checkpoints::checkpoint(self, false).map(|_| ())
            };
        if self.closed.swap(true, Ordering::SeqCst) {
            return checkpointed;
        }
        // Holding the writer lock: no append is between its write and its registration.
        let mut writer = self.commit.writer.lock();
        let synced = if self.read_only {
            Ok(())
        } else {
            self.sync_all()
        };
        self.stop_threads();
        // A seal that failed (the sealer drained its queue above) poisoned the log: then
        // the state is not clean, and no index or snapshot may claim it is (they would
        // count the active segment while one before it is unsealed).
        let synced = synced.and_then(|()| self.poison_error());
        let written = match (&synced, writer.take()) {
            (Ok(()), Some(w)) if !self.read_only => w.write_clean_close_state(self),
            _ => Ok(()),
        };
        drop(writer);
        self.wake_everyone();
        *lock(&self.lock_file) = None;
        self.cold.close(self.fs());
        checkpointed.and(synced).and(written)
    }

    /// Stops like a crash: nothing more is synced or written.
    #[cfg(any(test, feature = "internals"))]
    pub(crate) fn crash(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.retention.stop();
        self.cold.compactor.stop();
        self.indexing.indexer.stop();
        self.evidence.checkpointer.stop();
        let mut writer = self.commit.writer.lock();
        self.shutdown.store(true, Ordering::SeqCst);
        super::background::abandon_seal_queue(self);
        self.stop_threads();
        *writer = None;
        drop(writer);
        self.wake_everyone();
        *lock(&self.lock_file) = None;
    }
}
