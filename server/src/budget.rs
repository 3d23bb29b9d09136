//! The memory budget for responses built and not yet written.
//!
//! Every read and every subscription batch reserves the most bytes its frame can take before
//! it is built, and keeps what the frame holds until the frame is written to the socket. Two
//! limits apply: the server's (`Config::response_bytes_max`, for all connections together)
//! and each connection's share (`Config::connection_response_bytes_max`). A reservation
//! waits while either is used up: that is the backpressure on a client that does not read
//! its socket, and on the server as a whole. A connection that waits longer than
//! `Config::response_wait` while it holds at least half its share is the one taking the
//! memory: it gets `LimitExceeded` and is closed, and what it held is released. A connection
//! that holds less keeps waiting for the others to be closed or to read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Permits count KiB, so that a budget of terabytes still fits the semaphore's `u32`.
const UNIT: usize = 1024;

fn units(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// The server's budget.
#[derive(Debug)]
pub(crate) struct Budget {
    server: Arc<Semaphore>,
    server_units: u32,
    share_units: u32,
    wait: Duration,
    /// Set when reservations reached [`TRIM_AFTER_BYTES`]: once they are released, the
    /// allocator is asked to return the freed memory ([`Budget::take_trim_due`]).
    trim_due: AtomicBool,
}

/// Reserved bytes from which the memory is worth returning to the system once released.
const TRIM_AFTER_BYTES: usize = 4 << 20;

/// Reserved bytes below which a burst counts as over.
const TRIM_WHEN_BELOW_BYTES: usize = 1 << 20;

impl Budget {
    pub(crate) fn new(server_bytes: usize, share_bytes: usize, wait: Duration) -> Arc<Budget> {
        let server_units = units(server_bytes);
        Arc::new(Budget {
            server: Arc::new(Semaphore::new(server_units as usize)),
            server_units,
            share_units: units(share_bytes).min(server_units),
            wait,
            trim_due: AtomicBool::new(false),
        })
    }

    /// Whether reservations reached [`TRIM_AFTER_BYTES`] since the last call and are now
    /// below [`TRIM_WHEN_BELOW_BYTES`]: the caller then returns freed memory to the system
    /// (`tally_engine::release_free_memory`).
    pub(crate) fn take_trim_due(&self) -> bool {
        self.used_bytes() < TRIM_WHEN_BELOW_BYTES && self.trim_due.swap(false, Ordering::SeqCst)
    }

    /// Bytes reserved now, over every connection.
    pub(crate) fn used_bytes(&self) -> usize {
        (self.server_units as usize - self.server.available_permits()) * UNIT
    }

    /// A connection's part of the budget.
    pub(crate) fn connection(self: &Arc<Budget>) -> Arc<ConnBudget> {
        Arc::new(ConnBudget {
            budget: Arc::clone(self),
            share: Arc::new(Semaphore::new(self.share_units as usize)),
            held: Arc::new(AtomicU64::new(0)),
            exceeded: AtomicBool::new(false),
            notify: Notify::new(),
        })
    }
}

/// One connection's part of the budget.
#[derive(Debug)]
pub(crate) struct ConnBudget {
    budget: Arc<Budget>,
    share: Arc<Semaphore>,
    held: Arc<AtomicU64>,
    exceeded: AtomicBool,
    /// Wakes the connection's task when `exceeded` is set.
    pub(crate) notify: Notify,
}

/// Why a reservation failed: the connection took more than its share for too long.
#[derive(Debug)]
pub(crate) struct Exceeded;

/// Bytes reserved for one frame; released when dropped (after the frame is written).
#[derive(Debug)]
pub(crate) struct Reserved {
    share: OwnedSemaphorePermit,
    server: OwnedSemaphorePermit,
    held: Arc<AtomicU64>,
}

impl ConnBudget {
    /// Reserves room for a frame of at most `bytes`.
    ///
    /// # Errors
    /// [`Exceeded`] when the connection waited longer than the budget's wait while holding
    /// at least half its share; the connection is then marked, and its task closes it.
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<Reserved, Exceeded> {
        let n = units(bytes).min(self.budget.share_units);
        let share = self.acquire(&self.share, n).await?;
        let server = self.acquire(&self.budget.server, n).await?;
        self.held.fetch_add(u64::from(n), Ordering::SeqCst);
        if self.budget.used_bytes() >= TRIM_AFTER_BYTES {
            self.budget.trim_due.store(true, Ordering::SeqCst);
        }
        Ok(Reserved {
            share,
            server,
            held: Arc::clone(&self.held),
        })
    }

    async fn acquire(
        &self,
        sem: &Arc<Semaphore>,
        n: u32,
    ) -> Result<OwnedSemaphorePermit, Exceeded> {
        loop {
            if self.exceeded.load(Ordering::SeqCst) {
                return Err(Exceeded);
            }
            match tokio::time::timeout(self.budget.wait, Arc::clone(sem).acquire_many_owned(n))
                .await
            {
                Ok(Ok(p)) => return Ok(p),
                Ok(Err(_closed)) => return Err(Exceeded),
                Err(_waited) => {
                    // Held at least half its share all that time: this connection is the
                    // one not reading. Otherwise others hold the memory: keep waiting.
                    if self.held.load(Ordering::SeqCst) * 2 >= u64::from(self.budget.share_units) {
                        self.exceeded.store(true, Ordering::SeqCst);
                        self.notify.notify_one();
                        return Err(Exceeded);
                    }
                }
            }
        }
    }

    /// Whether the connection took more than its share for too long (it must be closed).
    pub(crate) fn is_exceeded(&self) -> bool {
        self.exceeded.load(Ordering::SeqCst)
    }

    /// Bytes this connection holds now.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::SeqCst) * UNIT as u64
    }
}

impl Reserved {
    /// Keeps only what a frame of `bytes` needs, releasing the rest now.
    pub(crate) fn shrink_to(&mut self, bytes: usize) {
        let keep = units(bytes) as usize;
        let have = self.share.num_permits();
        if keep < have {
            let surplus = (have - keep) as u64;
            drop(self.share.split(have - keep));
            drop(self.server.split(have - keep));
            self.held.fetch_sub(surplus, Ordering::SeqCst);
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.held
            .fetch_sub(self.share.num_permits() as u64, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_over_its_share_waits_then_is_exceeded_and_others_go_on() {
        let budget = Budget::new(8 * UNIT, 4 * UNIT, Duration::from_millis(100));
        let hog = budget.connection();
        let a = hog.reserve(2 * UNIT).await.unwrap();
        let b = hog.reserve(2 * UNIT).await.unwrap();
        assert_eq!(hog.held_bytes(), 4 * UNIT as u64);
        // Its share is used up and it holds all of it: after the wait it is exceeded.
        assert!(hog.reserve(UNIT).await.is_err());
        assert!(hog.is_exceeded());
        // Another connection was never blocked by the hog's share.
        let other = budget.connection();
        let mut c = other.reserve(4 * UNIT).await.unwrap();
        assert_eq!(budget.used_bytes(), 8 * UNIT);
        c.shrink_to(100);
        assert_eq!(
            other.held_bytes(),
            UNIT as u64,
            "shrunk to what the frame holds"
        );
        assert_eq!(budget.used_bytes(), 5 * UNIT);
        drop((a, b, c));
        assert_eq!(budget.used_bytes(), 0, "everything is released");
        assert_eq!(other.held_bytes(), 0);
    }

    #[tokio::test]
    async fn a_connection_holding_little_waits_for_the_server_budget_without_being_closed() {
        let budget = Budget::new(4 * UNIT, 4 * UNIT, Duration::from_millis(100));
        let hog = budget.connection();
        let held = hog.reserve(4 * UNIT).await.unwrap();
        let small = budget.connection();
        let waiter = tokio::spawn({
            let small = Arc::clone(&small);
            async move { small.reserve(UNIT).await.map(drop) }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiter.is_finished(),
            "still waiting (five waits), not closed"
        );
        assert!(!small.is_exceeded());
        drop(held);
        waiter.await.unwrap().unwrap();
    }
}
