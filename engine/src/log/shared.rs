//! State shared by the API, the appenders and the background threads, and group commit.
//!
//! Locks, always taken in this order: `writer` -> `commit` -> (`segments`, a segment's
//! `state`). Nothing blocks on I/O while holding `commit`; the writer lock is held while
//! records are copied into the map, never across a sync (except while rolling to a spare
//! that is not ready yet).

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use super::append::Writer;
use super::background::SealJob;
use super::checkpoints::Checkpoints;
use super::order::{Ordered, OrderedGuard};
use super::tree::Tree;
use super::{Durability, Options, SegmentInfo};
use crate::error::{Error, Result};
use crate::format::meta::LogMeta;
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{Hash32, Position, SegmentSeq};
use crate::index::{ActiveIndex, SealedIndex};
use crate::sys::{FsFile, OpenMode, SegmentMap};

/// Locks a mutex, ignoring poisoning: every critical section leaves its data consistent
/// before anything that can panic, and a panicking appender must not take reads down.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One segment, as readers and the sealer see it.
#[derive(Debug)]
pub(crate) struct SegmentHandle {
    pub(crate) seq: SegmentSeq,
    pub(crate) path: PathBuf,
    /// The storage the segment's file is opened through.
    pub(crate) fs: crate::Storage,
    pub(crate) header: SegmentHeader,
    /// Mapped on first use for sealed segments, at activation for the active one.
    pub(crate) map: OnceLock<Arc<SegmentMap>>,
    pub(crate) state: RwLock<SegState>,
}

/// Where a segment's index is.
#[derive(Debug)]
pub(crate) enum SegState {
    /// Being written: the index is the writer's.
    Active,
    /// Rolled, not yet sealed: the index is frozen in memory.
    Frozen {
        index: Arc<ActiveIndex>,
        data_end: u64,
    },
    /// Sealed: the footer is written; the sidecar is loaded on first use.
    Sealed {
        footer: SegmentFooter,
        index: Arc<Mutex<Option<Arc<SealedIndex>>>>,
    },
}

impl SegmentHandle {
    /// The segment's map, mapping a sealed segment on first use.
    pub(crate) fn map(&self) -> Result<&Arc<SegmentMap>> {
        if let Some(m) = self.map.get() {
            return Ok(m);
        }
        let data_end = match &*self
            .state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
        {
            SegState::Sealed { footer, .. } => footer.data_end,
            SegState::Frozen { data_end, .. } => *data_end,
            SegState::Active => unreachable!("the active segment is mapped at activation"),
        };
        let file = self
            .fs
            .open(&self.path, OpenMode::Read)
            .map_err(Error::io("opening segment", &self.path))?;
        let map = SegmentMap::map_read_only(&*file, self.header.capacity, data_end)
            .map_err(Error::io("mapping segment", &self.path))?;
        let _ = self.map.set(map);
        Ok(self.map.get().expect("set above or by a racing reader"))
    }
}

/// A range of a segment written but not yet synced.
#[derive(Debug)]
pub(crate) struct DirtyRange {
    pub(crate) map: Arc<SegmentMap>,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

/// Group-commit state.
#[derive(Debug, Default)]
pub(crate) struct CommitState {
    /// Position after the last batch fully copied into a map.
    pub(crate) written: Position,
    /// Position after the last batch known durable.
    pub(crate) durable: Position,
    pub(crate) dirty: Vec<DirtyRange>,
    pub(crate) syncing: bool,
    /// Threads parked in `wait_durable`, with the position each waits for.
    pub(crate) parked: Vec<(Position, std::thread::Thread)>,
    /// The flusher thread is waiting for work (so appends must wake it).
    pub(crate) flusher_idle: bool,
    pub(crate) poisoned: Option<Arc<io::Error>>,
    /// Test hook: fail the next sync.
    pub(crate) fail_next_sync: bool,
}

impl CommitState {
    /// Adds a written range, merging with the previous one when contiguous.
    pub(crate) fn add_dirty(&mut self, map: &Arc<SegmentMap>, start: u64, end: u64) {
        if let Some(last) = self.dirty.last_mut()
            && Arc::ptr_eq(&last.map, map)
            && last.end == start
        {
            last.end = end;
            return;
        }
        self.dirty.push(DirtyRange {
            map: Arc::clone(map),
            start,
            end,
        });
    }
}

/// The commit lock's guard.
pub(crate) type CommitGuard<'a> = OrderedGuard<parking_lot::MutexGuard<'a, CommitState>>;

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

pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) opts: Options,
    pub(crate) meta: LogMeta,
    pub(crate) seed: Hash32,
    pub(crate) read_only: bool,
    /// The serial part of appends. `parking_lot`'s mutex, because with many appenders on
    /// few cores std's convoys (measured: see docs/adr/0004).
    pub(crate) writer: Ordered<parking_lot::Mutex<Option<Writer>>>,
    /// Group-commit state (`parking_lot`, like the writer lock).
    pub(crate) commit: Ordered<parking_lot::Mutex<CommitState>>,
    /// Signalled when `durable` advances, or on poison or close.
    pub(crate) commit_cv: parking_lot::Condvar,
    /// Wakes the flusher thread.
    pub(crate) flush_cv: parking_lot::Condvar,
    /// Records below this position are visible to readers.
    pub(crate) visible: AtomicU64,
    /// Mirror of `CommitState::durable`, read on the append path for `durable_lag` and by
    /// parked waiters.
    pub(crate) durable: AtomicU64,
    /// Mirror of `CommitState::poisoned.is_some()`, for parked waiters.
    pub(crate) poisoned: AtomicBool,
    pub(crate) tail_lock: Mutex<()>,
    pub(crate) tail_cv: Condvar,
    pub(crate) tail_waiters: AtomicUsize,
    pub(crate) segments: RwLock<Vec<Arc<SegmentHandle>>>,
    pub(crate) spares: Ordered<Mutex<Spares>>,
    pub(crate) spares_cv: Condvar,
    pub(crate) seal_tx: Mutex<Option<mpsc::Sender<SealJob>>>,
    /// Segments handed to the sealer and not yet sealed.
    pub(crate) sealing: Ordered<Mutex<u64>>,
    pub(crate) sealing_cv: Condvar,
    pub(crate) shutdown: AtomicBool,
    /// Set by a simulated crash: the sealer drops its queue.
    pub(crate) abandon_seals: AtomicBool,
    pub(crate) threads: Mutex<Vec<JoinHandle<()>>>,
    pub(crate) lock_file: Mutex<Option<Box<dyn FsFile>>>,
    pub(crate) closed: AtomicBool,
    /// Segments whose sidecar was rebuilt since open (for the recovery report).
    pub(crate) rebuilt: Mutex<Vec<SegmentSeq>>,
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
    /// Producer keys and the signing policy (`$producers`), read by every append and
    /// written only by the producer registration operations, which hold it for writing
    /// around their own append so that every append is ordered after or before them.
    pub(crate) producers: Ordered<parking_lot::RwLock<super::producers::ProducerPolicy>>,
    /// Set (and `checkpoint_cv` signalled) when a seal asks for a checkpoint.
    pub(crate) checkpoint_due: Mutex<bool>,
    pub(crate) checkpoint_cv: Condvar,
    /// The checkpoint thread, stopped before anything else on close (it reads through the
    /// writer lock that close holds).
    pub(crate) checkpointer: Mutex<Option<JoinHandle<()>>>,
    pub(crate) shutdown_checkpoints: AtomicBool,
    /// The attribute indexes. Lock order: `attrs`, then `writer`.
    pub(crate) attrs: Ordered<Mutex<super::attrs::Attrs>>,
    /// Set (and `indexer_cv` signalled) to wake the indexer thread.
    pub(crate) indexer_wake: Mutex<bool>,
    pub(crate) indexer_cv: Condvar,
    /// The indexer thread, stopped before close takes the writer lock (a catch-up may read
    /// the active segment's sparse index through it).
    pub(crate) indexer: Mutex<Option<JoinHandle<()>>>,
    pub(crate) shutdown_indexer: AtomicBool,
}

impl Shared {
    /// The storage every file of this log goes through.
    pub(crate) fn fs(&self) -> &crate::Storage {
        &self.opts.storage
    }

    /// The segments, oldest first, as they are now.
    pub(crate) fn segments_snapshot(&self) -> Vec<Arc<SegmentHandle>> {
        self.segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn visible_position(&self) -> Position {
        Position(self.visible.load(Ordering::Acquire))
    }

    /// Makes records below `upto` visible and wakes tailers.
    pub(crate) fn publish_visible(&self, upto: Position) {
        let before = self.visible.fetch_max(upto.0, Ordering::SeqCst);
        if before < upto.0 && self.tail_waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.tail_lock);
            self.tail_cv.notify_all();
        }
    }

    pub(crate) fn poison(&self, c: &mut CommitState, cause: io::Error) {
        if c.poisoned.is_none() {
            c.poisoned = Some(Arc::new(cause));
        }
        self.poisoned.store(true, Ordering::SeqCst);
        for (_, t) in c.parked.drain(..) {
            t.unpark();
        }
        self.commit_cv.notify_all();
    }

    /// Waits until every position below `target` is durable, leading a sync when none is
    /// running (group commit: the leader syncs everything written before it started, and
    /// every waiter covered by that returns together).
    pub(crate) fn wait_durable(&self, target: Position) -> Result<()> {
        let mut c = self.commit.lock();
        loop {
            if c.durable >= target {
                return Ok(());
            }
            if let Some(cause) = &c.poisoned {
                return Err(Error::Poisoned {
                    cause: Arc::clone(cause),
                });
            }
            // Alone, or the flusher is gone (closing): lead.
            let flusher_gone = self.shutdown.load(Ordering::SeqCst);
            if !c.syncing && (c.parked.is_empty() || flusher_gone) {
                // Alone: sync now, on this thread, rather than hand off to the flusher and
                // back (two wake-ups on the acknowledgement path).
                c = self.lead_sync(c);
                continue;
            }
            // Others are waiting too: the flusher thread leads the group's syncs back to
            // back, and each sync wakes exactly the waiters it covered (no herd).
            if !c.syncing && c.flusher_idle {
                self.flush_cv.notify_one();
            }
            c.parked.push((target, std::thread::current()));
            drop(c);
            while self.durable.load(Ordering::Acquire) < target.0
                && !self.poisoned.load(Ordering::SeqCst)
                && !self.shutdown.load(Ordering::SeqCst)
            {
                std::thread::park();
            }
            c = self.commit.lock();
        }
    }

    /// Syncs every dirty range as the leader. Called with the commit lock held and
    /// `syncing` false; returns with the lock held again.
    pub(crate) fn lead_sync<'a>(&'a self, mut c: CommitGuard<'a>) -> CommitGuard<'a> {
        debug_assert!(!c.syncing);
        let target = c.written;
        let ranges = std::mem::take(&mut c.dirty);
        let fail = std::mem::take(&mut c.fail_next_sync);
        c.syncing = true;
        drop(c);
        let result = if fail {
            Err(io::Error::other("injected sync failure"))
        } else {
            ranges
                .iter()
                .try_for_each(|r| r.map.sync_range(r.start, r.end))
        };
        let mut c = self.commit.lock();
        c.syncing = false;
        match result {
            Ok(()) => {
                debug_assert!(target <= c.written, "a sync covers only what was written");
                if target > c.durable {
                    c.durable = target;
                    self.durable.store(target.0, Ordering::Release);
                    if self.opts.durability == Durability::Fsync {
                        self.publish_visible(target);
                    }
                    // Wake exactly the waiters this sync covered.
                    let mut i = 0;
                    while i < c.parked.len() {
                        if c.parked[i].0 <= target {
                            c.parked.swap_remove(i).1.unpark();
                        } else {
                            i += 1;
                        }
                    }
                }
                self.commit_cv.notify_all();
                // Waiters this sync did not cover need a leader: the flusher (this thread
                // may be an appender about to return).
                if !c.parked.is_empty() && c.flusher_idle {
                    self.flush_cv.notify_one();
                }
            }
            Err(e) => self.poison(&mut c, e),
        }
        c
    }

    /// Makes everything written so far durable, including ranges that hold no record yet
    /// (the header of a segment that just became active).
    pub(crate) fn sync_all(&self) -> Result<()> {
        let target = {
            let mut c = self.commit.lock();
            while c.syncing {
                self.commit_cv.wait(c.inner());
            }
            if !c.dirty.is_empty() && c.poisoned.is_none() {
                c = self.lead_sync(c);
            }
            c.written
        };
        self.wait_durable(target)
    }

    #[cfg(any(test, feature = "internals"))]
    pub(crate) fn inject_sync_failure(&self) {
        self.commit.lock().fail_next_sync = true;
    }

    /// Waits until no rolled segment is waiting to be sealed.
    pub(crate) fn wait_sealed(&self) -> Result<()> {
        let mut pending = self.sealing.lock();
        loop {
            // Checked after the last seal too: a seal that failed counts as done.
            if let Some(cause) = &self.commit.lock().poisoned {
                return Err(Error::Poisoned {
                    cause: Arc::clone(cause),
                });
            }
            if *pending == 0 {
                return Ok(());
            }
            pending = pending.wait_timeout(&self.sealing_cv, Duration::from_millis(50));
        }
    }

    /// The poison, as the error every write gets, if the log is poisoned.
    pub(crate) fn poison_error(&self) -> Result<()> {
        match &self.commit.lock().poisoned {
            Some(cause) => Err(Error::Poisoned {
                cause: Arc::clone(cause),
            }),
            None => Ok(()),
        }
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
                        s.map
                            .get()
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
                }
            })
            .collect()
    }

    /// Stops the background threads and waits for them.
    fn stop_threads(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        *lock(&self.seal_tx) = None;
        {
            let _c = self.commit.lock();
            self.flush_cv.notify_all();
        }
        {
            let _s = self.spares.lock();
            self.spares_cv.notify_all();
        }
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }

    fn wake_everyone(&self) {
        let _t = lock(&self.tail_lock);
        self.tail_cv.notify_all();
        self.commit_cv.notify_all();
    }

    /// Closes cleanly: refuses new appends, syncs, finishes sealing, writes the active
    /// index and the stream snapshot, releases the lock.
    pub(crate) fn close(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Ok(());
        }
        // A last checkpoint covers everything acknowledged, before appends stop (it reads
        // through the writer lock).
        self.stop_indexer();
        self.stop_checkpointer();
        let checkpointed = if self.read_only
            || !self.opts.auto_checkpoints
            || self.poisoned.load(Ordering::SeqCst)
        {
            Ok(())
        } else {
            super::checkpoints::checkpoint(self, false).map(|_| ())
        };
        if self.closed.swap(true, Ordering::SeqCst) {
            return checkpointed;
        }
        // Holding the writer lock: no append is between its write and its registration.
        let mut writer = self.writer.lock();
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
        checkpointed.and(synced).and(written)
    }

    /// Stops the indexer thread and waits for it.
    pub(crate) fn stop_indexer(&self) {
        {
            let mut wake = lock(&self.indexer_wake);
            self.shutdown_indexer.store(true, Ordering::SeqCst);
            *wake = true;
            self.indexer_cv.notify_all();
        }
        if let Some(t) = lock(&self.indexer).take() {
            let _ = t.join();
        }
    }

    /// Stops the checkpoint thread and waits for it.
    pub(crate) fn stop_checkpointer(&self) {
        {
            let mut due = lock(&self.checkpoint_due);
            self.shutdown_checkpoints.store(true, Ordering::SeqCst);
            *due = true;
            self.checkpoint_cv.notify_all();
        }
        if let Some(t) = lock(&self.checkpointer).take() {
            let _ = t.join();
        }
    }

    /// Stops like a crash: nothing more is synced or written.
    #[cfg(any(test, feature = "internals"))]
    pub(crate) fn crash(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.stop_indexer();
        self.stop_checkpointer();
        let mut writer = self.writer.lock();
        self.stop_threads_without_sealing();
        *writer = None;
        drop(writer);
        self.wake_everyone();
        *lock(&self.lock_file) = None;
    }

    #[cfg(any(test, feature = "internals"))]
    fn stop_threads_without_sealing(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        super::background::abandon_seal_queue(self);
        self.stop_threads();
    }
}
