//! The lock order, written once and checked in debug builds.
//!
//! Every lock of [`super::shared::Shared`] that is ever held while another is taken has a
//! [`Rank`]; a thread may take a lock only if every ranked lock it holds has a lower rank.
//! Locks are wrapped in [`Ordered`], whose guards record the rank in a thread-local list
//! in debug builds and panic, naming both locks, on a lock taken out of order (a possible
//! deadlock, found by any test that takes the path, not only by the rare run that
//! deadlocks). Release builds keep only the wrapper, which compiles away.
//!
//! Unranked locks are leaves: held only to read or update a field, never while taking
//! another lock (`Visible`'s lock, the segment list, a segment's `state`, a sealed segment's
//! sidecar slot, `rebuilt`, a `Worker`'s wake flag, the thread and shutdown bookkeeping). docs/ARCHITECTURE.md, "Lock order",
//! explains the order and the paths that need it.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

/// A lock's place in the order: lower ranks are taken first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Rank {
    /// `governance`: held across a governance change's check and append, and across a
    /// retention run (which reads, appends and rewrites segments under it).
    Governance,
    /// `erasing`: read across an append that seals personal data (from sealing to its
    /// commit), written across a forget (its hold check, its event, the key's destruction),
    /// so that no sealed append interleaves with an erasure.
    Erasing,
    /// `producers`: held for reading across an append's writer step, for writing across a
    /// producer registration's own append.
    Producers,
    /// `checkpoints`: held across a whole checkpoint.
    Checkpoints,
    /// `tree`: taken under `checkpoints`, reaches `writer` through record reads.
    Tree,
    /// `attrs`: the attribute indexes, reaches `writer` through record reads.
    Attrs,
    /// `writer`: the serial part of appends.
    Writer,
    /// `spares`: taken under `writer` while rolling.
    Spares,
    /// `sealing`: taken under `writer` while rolling; holds `commit` in `wait_sealed`.
    Sealing,
    /// `commit`: group-commit state; nothing blocks on I/O while it is held.
    Commit,
    /// `signed`: the published checkpoints, a leaf taken under `checkpoints`.
    Signed,
}

#[cfg(debug_assertions)]
thread_local! {
    static HELD: std::cell::RefCell<Vec<Rank>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A ranked lock held by this thread (in debug builds).
#[derive(Debug)]
pub(crate) struct Held {
    #[cfg(debug_assertions)]
    rank: Rank,
}

impl Held {
    /// Checks that `rank` may be taken now and records it.
    ///
    /// # Panics
    /// In debug builds, when this thread holds a lock of the same or a higher rank.
    fn take(rank: Rank) -> Held {
        #[cfg(debug_assertions)]
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(top) = held.iter().max()
                && *top >= rank
            {
                panic!("lock order: taking {rank:?} while holding {top:?} (held: {held:?})");
            }
            held.push(rank);
        });
        #[cfg(not(debug_assertions))]
        let _ = rank;
        Held {
            #[cfg(debug_assertions)]
            rank,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(i) = held.iter().rposition(|r| *r == self.rank) {
                held.remove(i);
            }
        });
    }
}

/// A lock with a rank.
#[derive(Debug)]
pub(crate) struct Ordered<L> {
    rank: Rank,
    inner: L,
}

impl<L> Ordered<L> {
    pub(crate) fn new(rank: Rank, inner: L) -> Ordered<L> {
        Ordered { rank, inner }
    }

    fn held(&self) -> Held {
        Held::take(self.rank)
    }
}

/// A guard of an [`Ordered`] lock: the inner guard, and the rank it holds. The inner guard
/// is dropped first (fields drop in order), so the rank is released after the lock.
#[derive(Debug)]
pub(crate) struct OrderedGuard<G> {
    guard: G,
    _held: Held,
}

impl<G> OrderedGuard<G> {
    /// The inner guard, for a condition variable's wait.
    pub(crate) fn inner(&mut self) -> &mut G {
        &mut self.guard
    }
}

impl<G: Deref> Deref for OrderedGuard<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: DerefMut> DerefMut for OrderedGuard<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

impl<T> Ordered<parking_lot::Mutex<T>> {
    pub(crate) fn lock(&self) -> OrderedGuard<parking_lot::MutexGuard<'_, T>> {
        let held = self.held();
        OrderedGuard {
            guard: self.inner.lock(),
            _held: held,
        }
    }
}

impl<T> Ordered<parking_lot::Mutex<T>> {
    /// Locks, waiting at most `timeout`.
    pub(crate) fn try_lock_for(
        &self,
        timeout: Duration,
    ) -> Option<OrderedGuard<parking_lot::MutexGuard<'_, T>>> {
        let held = self.held();
        Some(OrderedGuard {
            guard: self.inner.try_lock_for(timeout)?,
            _held: held,
        })
    }
}

impl<T> Ordered<parking_lot::RwLock<T>> {
    /// Locks for reading, waiting at most `timeout`.
    pub(crate) fn try_read_for(
        &self,
        timeout: Duration,
    ) -> Option<OrderedGuard<parking_lot::RwLockReadGuard<'_, T>>> {
        let held = self.held();
        Some(OrderedGuard {
            guard: self.inner.try_read_for(timeout)?,
            _held: held,
        })
    }

    pub(crate) fn read(&self) -> OrderedGuard<parking_lot::RwLockReadGuard<'_, T>> {
        let held = self.held();
        OrderedGuard {
            guard: self.inner.read(),
            _held: held,
        }
    }

    pub(crate) fn write(&self) -> OrderedGuard<parking_lot::RwLockWriteGuard<'_, T>> {
        let held = self.held();
        OrderedGuard {
            guard: self.inner.write(),
            _held: held,
        }
    }
}

impl<T> Ordered<std::sync::Mutex<T>> {
    /// Locks, ignoring poisoning (see [`super::shared::lock`]).
    pub(crate) fn lock(&self) -> OrderedGuard<std::sync::MutexGuard<'_, T>> {
        let held = self.held();
        OrderedGuard {
            guard: super::shared::lock(&self.inner),
            _held: held,
        }
    }
}

impl<'a, T> OrderedGuard<std::sync::MutexGuard<'a, T>> {
    /// Waits on `cv`, which is used with this lock only.
    pub(crate) fn wait(self, cv: &std::sync::Condvar) -> Self {
        let OrderedGuard { guard, _held } = self;
        OrderedGuard {
            guard: cv
                .wait(guard)
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            _held,
        }
    }

    /// Waits on `cv` for at most `timeout`.
    pub(crate) fn wait_timeout(self, cv: &std::sync::Condvar, timeout: Duration) -> Self {
        let OrderedGuard { guard, _held } = self;
        let (guard, _timed_out) = cv
            .wait_timeout(guard, timeout)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        OrderedGuard { guard, _held }
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn locks_taken_in_order_pass_and_out_of_order_panic() {
        let writer = Ordered::new(Rank::Writer, parking_lot::Mutex::new(()));
        let commit = Ordered::new(Rank::Commit, parking_lot::Mutex::new(()));
        {
            let _w = writer.lock();
            let _c = commit.lock();
        }
        let c = commit.lock();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _w = writer.lock();
        }));
        drop(c);
        let message = caught.expect_err("writer under commit is out of order");
        let text = message
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        assert!(
            text.contains("taking Writer while holding Commit"),
            "{text}"
        );
        // The failed attempt left nothing recorded: both can be taken in order again.
        let _w = writer.lock();
        let _c = commit.lock();
    }
}
