//! A store that wraps another and fails, or damages what it returns, on command: the cold
//! tier's fault and crash tests use it to stop a compaction at every step.

use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::Mutex;

use super::ColdStore;

/// The operations of a [`ColdStore`], counted by a [`FaultyStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// [`ColdStore::put`].
    Put,
    /// [`ColdStore::get`] and [`ColdStore::get_range`].
    Get,
    /// [`ColdStore::head`].
    Head,
    /// [`ColdStore::delete`].
    Delete,
}

#[derive(Debug, Default)]
struct Plan {
    /// Every operation fails while set (an outage).
    down: bool,
    /// The operation with this number (counting every operation from 1) fails.
    fail_at: Option<u64>,
    /// Gets return their bytes with this byte flipped (when in range).
    corrupt_gets_at: Option<usize>,
    /// Puts store only this many bytes (a store that lost the end of an object).
    truncate_puts_to: Option<usize>,
    /// Operations so far.
    count: u64,
    /// The log of operations, in order.
    log: Vec<(StoreOp, String)>,
}

/// A [`ColdStore`] over another, with faults on command. Clones share the plan.
#[derive(Debug, Clone)]
pub struct FaultyStore {
    inner: Arc<dyn ColdStore>,
    plan: Arc<Mutex<Plan>>,
}

impl FaultyStore {
    /// Wraps `inner`, with no fault planned.
    pub fn new(inner: Arc<dyn ColdStore>) -> FaultyStore {
        FaultyStore {
            inner,
            plan: Arc::new(Mutex::new(Plan::default())),
        }
    }

    fn plan(&self) -> std::sync::MutexGuard<'_, Plan> {
        self.plan
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every operation fails from now until [`FaultyStore::set_down`] with `false`.
    pub fn set_down(&self, down: bool) {
        self.plan().down = down;
    }

    /// The `n`th operation from now (1 = the next) fails; `None` cancels.
    pub fn fail_in(&self, n: Option<u64>) {
        let mut p = self.plan();
        p.fail_at = n.map(|n| p.count + n);
    }

    /// Gets return their bytes with byte `at` flipped; `None` cancels.
    pub fn corrupt_gets(&self, at: Option<usize>) {
        self.plan().corrupt_gets_at = at;
    }

    /// Puts keep only the first `len` bytes; `None` cancels.
    pub fn truncate_puts(&self, len: Option<usize>) {
        self.plan().truncate_puts_to = len;
    }

    /// The operations so far, in order, with their keys.
    #[must_use]
    pub fn ops(&self) -> Vec<(StoreOp, String)> {
        self.plan().log.clone()
    }

    fn enter(&self, op: StoreOp, key: &str) -> io::Result<()> {
        let mut p = self.plan();
        p.count += 1;
        p.log.push((op, key.to_owned()));
        if p.down {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "the store is down (injected)",
            ));
        }
        if p.fail_at == Some(p.count) {
            return Err(io::Error::other(format!(
                "{op:?} {key} failed (injected at operation {})",
                p.count
            )));
        }
        Ok(())
    }

    fn damage(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        if let Some(at) = self.plan().corrupt_gets_at
            && let Some(b) = bytes.get_mut(at)
        {
            *b ^= 0x20;
        }
        bytes
    }
}

impl ColdStore for FaultyStore {
    fn url(&self) -> String {
        self.inner.url()
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        self.enter(StoreOp::Put, key)?;
        let keep = self.plan().truncate_puts_to;
        match keep {
            Some(n) => self.inner.put(key, &bytes[..n.min(bytes.len())]),
            None => self.inner.put(key, bytes),
        }
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        self.enter(StoreOp::Get, key)?;
        Ok(self.damage(self.inner.get(key)?))
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> io::Result<Vec<u8>> {
        self.enter(StoreOp::Get, key)?;
        Ok(self.damage(self.inner.get_range(key, range)?))
    }

    fn head(&self, key: &str) -> io::Result<Option<u64>> {
        self.enter(StoreOp::Head, key)?;
        self.inner.head(key)
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        self.enter(StoreOp::Delete, key)?;
        self.inner.delete(key)
    }
}
