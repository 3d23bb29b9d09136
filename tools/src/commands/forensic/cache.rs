//! A cache of lookups bounded in bytes: once its entries would hold more than its budget,
//! it forgets the least recently used first.
//!
//! The audit asks the attribute indexes about the same correlation id or cause for many
//! events of a stream; this keeps the answers it is likely to need again without letting
//! them grow with the number of events. An entry larger than the whole budget is not kept
//! (the caller still has it for the event at hand).

use std::collections::{BTreeMap, HashMap};

/// Bytes counted for an entry besides its value and its key: the two maps' nodes (a
/// conservative guess; what matters is that the count grows with the entries).
const ENTRY_OVERHEAD_BYTES: usize = 96;

/// One kept answer.
struct Slot<V> {
    value: V,
    /// When it was last used (a tick of [`Lru::tick`]); its key in [`Lru::order`].
    used: u64,
    /// What it counts against the budget.
    bytes: usize,
}

/// A map from text keys to values, bounded in bytes, least recently used out first.
pub struct Lru<V> {
    slots: HashMap<String, Slot<V>>,
    /// Last use → key, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
    budget_bytes: usize,
}

impl<V: Clone> Lru<V> {
    /// An empty cache that keeps at most `budget_bytes` (as counted by [`Lru::insert`]).
    pub fn new(budget_bytes: usize) -> Lru<V> {
        Lru {
            slots: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            budget_bytes,
        }
    }

    /// The value kept for `key`, now the most recently used.
    pub fn get(&mut self, key: &str) -> Option<V> {
        let slot = self.slots.get_mut(key)?;
        let k = self
            .order
            .remove(&slot.used)
            .expect("every slot is in the order map under its last use");
        self.tick += 1;
        slot.used = self.tick;
        self.order.insert(self.tick, k);
        Some(slot.value.clone())
    }

    /// Keeps `value` for `key`, counted as `value_bytes` plus the key, and forgets the least
    /// recently used entries until the whole fits the budget. A value that alone does not
    /// fit is not kept.
    pub fn insert(&mut self, key: String, value: V, value_bytes: usize) {
        self.remove(&key);
        let bytes = value_bytes
            .saturating_add(2 * key.len())
            .saturating_add(ENTRY_OVERHEAD_BYTES);
        if bytes > self.budget_bytes {
            return;
        }
        while self.bytes + bytes > self.budget_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            let gone = self
                .slots
                .remove(&oldest)
                .expect("every key in the order map has a slot");
            self.bytes -= gone.bytes;
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.slots.insert(
            key,
            Slot {
                value,
                used: self.tick,
                bytes,
            },
        );
        self.bytes += bytes;
        debug_assert!(self.bytes <= self.budget_bytes);
        debug_assert_eq!(self.slots.len(), self.order.len());
    }

    fn remove(&mut self, key: &str) {
        if let Some(old) = self.slots.remove(key) {
            self.order.remove(&old.used);
            self.bytes -= old.bytes;
        }
    }

    /// Bytes counted for the entries kept.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Entries kept.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// What one entry with a one-letter key and a 100-byte value counts.
    const ONE: usize = 100 + 2 + ENTRY_OVERHEAD_BYTES;

    #[test]
    fn forgets_the_least_recently_used_first() {
        let mut c = Lru::new(3 * ONE);
        c.insert("a".into(), 1, 100);
        c.insert("b".into(), 2, 100);
        c.insert("c".into(), 3, 100);
        assert_eq!(c.bytes(), 3 * ONE);
        // Using "a" makes "b" the oldest.
        assert_eq!(c.get("a"), Some(1));
        c.insert("d".into(), 4, 100);
        assert_eq!(c.get("b"), None);
        assert_eq!(c.get("a"), Some(1));
        assert_eq!(c.get("c"), Some(3));
        assert_eq!(c.get("d"), Some(4));
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn stays_within_its_budget_and_skips_what_cannot_fit() {
        let mut c = Lru::new(10 * ONE);
        for i in 0..1000u32 {
            c.insert(
                format!("{}", i % 10 + 10 * (i / 100)),
                i,
                100 + (i as usize % 7),
            );
            assert!(c.bytes() <= 10 * ONE, "{} after {i}", c.bytes());
        }
        // Too large for the whole budget: not kept, and nothing else is evicted for it.
        let before = c.len();
        c.insert("big".into(), 0, 10 * ONE);
        assert_eq!(c.get("big"), None);
        assert_eq!(c.len(), before);
        // Replacing a key counts it once.
        c.insert("x".into(), 1, 100);
        let bytes = c.bytes();
        c.insert("x".into(), 2, 100);
        assert_eq!(c.bytes(), bytes);
        assert_eq!(c.get("x"), Some(2));
    }
}
