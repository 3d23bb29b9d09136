//! The visible end of the log and the tailers waiting past it.
//!
//! Records below the visible position can be read: under `Durability::Fsync` a record
//! becomes visible once durable, otherwise once written. Tailers park on a condition
//! variable, and only while anyone waits does publishing take its (leaf) lock.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Instant;

use super::shared::lock;
use crate::format::Position;

#[derive(Debug, Default)]
pub(crate) struct Visible {
    /// Records below this position are visible to readers.
    position: AtomicU64,
    /// A leaf lock for `cv` alone.
    lock: Mutex<()>,
    cv: Condvar,
    waiters: AtomicUsize,
}

impl Visible {
    pub(crate) fn position(&self) -> Position {
        Position(self.position.load(Ordering::Acquire))
    }

    /// Makes records below `upto` visible and wakes tailers.
    pub(crate) fn publish(&self, upto: Position) {
        let before = self.position.fetch_max(upto.0, Ordering::SeqCst);
        if before < upto.0 && self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
    }

    /// Waits until a record at or after `next` is visible, `closed` is set, or `deadline`
    /// passes.
    pub(crate) fn wait_past(&self, next: Position, closed: &AtomicBool, deadline: Instant) {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.lock);
        while self.position() <= next && !closed.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
    }

    /// Wakes every tailer (to see a close).
    pub(crate) fn wake_all(&self) {
        let _g = lock(&self.lock);
        self.cv.notify_all();
    }
}
