//! The commit path: the writer lock (the serial part of appends), group commit and the
//! poison.
//!
//! An append copies its records into the active segment's map under `writer`, registers
//! the written range here, and (under `Durability::Fsync`) waits until a sync covers it.
//! One thread at a time leads a sync of every range written before it started; every
//! waiter that sync covers returns together. A failed sync poisons the log: no later
//! write or acknowledgement, ever, in this process.
//!
//! Locks: `writer` -> `state`. Nothing blocks on I/O while holding `state`; the writer lock
//! is held while records are copied into the map, never across a sync, and never while a
//! roll waits for its spare (the roll lets go, waits, and the append starts over).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::append::Writer;
use super::order::{Ordered, OrderedGuard, Rank};
use super::visible::Visible;
use crate::error::{Error, Result};
use crate::format::Position;
use crate::sys::SegmentMap;

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

/// The commit path's state and locks.
pub(crate) struct CommitPath {
    /// The serial part of appends: `None` once closed. `parking_lot`'s mutex, because with
    /// many appenders on few cores std's convoys (measured: see docs/adr/0004).
    pub(crate) writer: Ordered<parking_lot::Mutex<Option<Writer>>>,
    /// Group-commit state (`parking_lot`, like the writer lock).
    state: Ordered<parking_lot::Mutex<CommitState>>,
    /// Signalled when `durable` advances, or on poison or close.
    pub(crate) cv: parking_lot::Condvar,
    /// Wakes the flusher thread.
    pub(crate) flush_cv: parking_lot::Condvar,
    /// Mirror of `CommitState::durable`, read on the append path for `durable_lag` and by
    /// parked waiters.
    durable: AtomicU64,
    /// Mirror of `CommitState::poisoned.is_some()`, for parked waiters.
    poisoned: AtomicBool,
    /// A sync makes what it covered visible (`Durability::Fsync`: readers see only durable
    /// records).
    publish_on_sync: bool,
}

impl CommitPath {
    pub(crate) fn new(publish_on_sync: bool) -> CommitPath {
        CommitPath {
            writer: Ordered::new(Rank::Writer, parking_lot::Mutex::new(None)),
            state: Ordered::new(
                Rank::Commit,
                parking_lot::Mutex::new(CommitState::default()),
            ),
            cv: parking_lot::Condvar::new(),
            flush_cv: parking_lot::Condvar::new(),
            durable: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            publish_on_sync,
        }
    }

    /// Locks the group-commit state.
    pub(crate) fn lock(&self) -> CommitGuard<'_> {
        self.state.lock()
    }

    /// The position below which everything is durable (without taking the lock).
    pub(crate) fn durable_position(&self) -> Position {
        Position(self.durable.load(Ordering::Acquire))
    }

    /// Sets where recovery found the durable end: everything recovered is durable.
    pub(crate) fn start_at(&self, c: &mut CommitState, end: Position) {
        c.written = end;
        c.durable = end;
        self.durable.store(end.0, Ordering::Release);
    }

    /// Whether a sync failed (without taking the lock).
    pub(crate) fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::SeqCst)
    }

    /// Poisons the log: every waiter wakes to the error, and no write is ever made again.
    pub(crate) fn poison(&self, c: &mut CommitState, cause: io::Error) {
        if c.poisoned.is_none() {
            c.poisoned = Some(Arc::new(cause));
        }
        self.poisoned.store(true, Ordering::SeqCst);
        for (_, t) in c.parked.drain(..) {
            t.unpark();
        }
        self.cv.notify_all();
    }

    /// The poison, as the error every write gets, if the log is poisoned.
    pub(crate) fn poison_error(&self) -> Result<()> {
        match &self.lock().poisoned {
            Some(cause) => Err(Error::Poisoned {
                cause: Arc::clone(cause),
            }),
            None => Ok(()),
        }
    }

    /// Waits until every position below `target` is durable, leading a sync when none is
    /// running (group commit: the leader syncs everything written before it started, and
    /// every waiter covered by that returns together). `flusher_gone` is set once the
    /// flusher thread stops (closing): then waiters lead their own syncs.
    pub(crate) fn wait_durable(
        &self,
        target: Position,
        visible: &Visible,
        flusher_gone: &AtomicBool,
    ) -> Result<()> {
        let mut c = self.lock();
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
            let gone = flusher_gone.load(Ordering::SeqCst);
            if !c.syncing && (c.parked.is_empty() || gone) {
                // Alone: sync now, on this thread, rather than hand off to the flusher and
                // back (two wake-ups on the acknowledgement path).
                c = self.lead_sync(c, visible);
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
                && !flusher_gone.load(Ordering::SeqCst)
            {
                std::thread::park();
            }
            c = self.lock();
        }
    }

    /// Syncs every dirty range as the leader. Called with the commit lock held and
    /// `syncing` false; returns with the lock held again.
    pub(crate) fn lead_sync<'a>(
        &'a self,
        mut c: CommitGuard<'a>,
        visible: &Visible,
    ) -> CommitGuard<'a> {
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
        let mut c = self.lock();
        c.syncing = false;
        match result {
            Ok(()) => {
                debug_assert!(target <= c.written, "a sync covers only what was written");
                if target > c.durable {
                    c.durable = target;
                    self.durable.store(target.0, Ordering::Release);
                    if self.publish_on_sync {
                        visible.publish(target);
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
                self.cv.notify_all();
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
    pub(crate) fn sync_all(&self, visible: &Visible, flusher_gone: &AtomicBool) -> Result<()> {
        let target = {
            let mut c = self.lock();
            while c.syncing {
                self.cv.wait(c.inner());
            }
            if !c.dirty.is_empty() && c.poisoned.is_none() {
                c = self.lead_sync(c, visible);
            }
            c.written
        };
        self.wait_durable(target, visible, flusher_gone)
    }

    #[cfg(any(test, feature = "internals"))]
    pub(crate) fn inject_sync_failure(&self) {
        self.lock().fail_next_sync = true;
    }
}
