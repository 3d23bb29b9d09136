//! The idempotency window: the ids of the most recent events of the log, with where they
//! were written, so that a retried append is recognised and answered with its original
//! result instead of being written twice.
//!
//! Memory: about 64 bytes per id (a 40-byte hash-map slot at 7/8 load plus a 16-byte entry
//! in the eviction queue); the default window of 262,144 ids takes about 16 MiB.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

use crate::format::{EventId, Position};
use crate::index::StreamKey;

/// Where an event id was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdSlot {
    pub(crate) position: Position,
    pub(crate) stream: StreamKey,
    pub(crate) version: u64,
}

/// Event ids are 128-bit values chosen by clients: random, time-ordered (a timestamp or a
/// counter in their first bytes), or anything else. A keyed multiply-fold with a full
/// finalizer spreads every input bit over the whole hash, at a fraction of SipHash's cost
/// on the append path; the key is random per process, so ids chosen to collide cannot be
/// computed in advance. (A plain multiply-fold sent ids that differ only in their high bits,
/// such as a counter in the first bytes, to one bucket group: every insert then probed the
/// whole group, and a million-trade demo spent three quarters of its time there.)
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // SplitMix64's finalizer: every bit of the state reaches the low bits the table
        // indexes by.
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(29) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_u128(&mut self, v: u128) {
        self.write_u64(v as u64);
        self.write_u64((v >> 64) as u64);
    }
}

/// Builds [`IdHasher`]s keyed with this process's random key.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IdHashBuilder(u64);

impl Default for IdHashBuilder {
    fn default() -> IdHashBuilder {
        static KEY: OnceLock<u64> = OnceLock::new();
        IdHashBuilder(*KEY.get_or_init(|| {
            let mut b = [0u8; 8];
            // Without randomness the key is fixed: the hash still spreads ordinary ids.
            let _ = getrandom::fill(&mut b);
            u64::from_le_bytes(b) | 1
        }))
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

/// The most recent `capacity` event ids of the log.
#[derive(Debug)]
pub(crate) struct IdWindow {
    map: HashMap<u128, IdSlot, IdHashBuilder>,
    order: VecDeque<u128>,
    capacity: usize,
}

impl IdWindow {
    pub(crate) fn new(capacity: usize) -> IdWindow {
        IdWindow {
            map: HashMap::with_capacity_and_hasher(capacity.min(1 << 16), IdHashBuilder::default()),
            order: VecDeque::new(),
            capacity,
        }
    }

    pub(crate) fn get(&self, id: EventId) -> Option<IdSlot> {
        self.map.get(&id.as_u128()).copied()
    }

    /// Records the next written event, forgetting the oldest beyond the capacity.
    pub(crate) fn insert(&mut self, id: EventId, slot: IdSlot) {
        if self.capacity == 0 {
            return;
        }
        let key = id.as_u128();
        self.map.insert(key, slot);
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                // Ids are unique within the window, so the slot is the old one.
                self.map.remove(&old);
            }
        }
    }

    /// Ids the window can still take before it forgets.
    pub(crate) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.order.len())
    }

    /// Puts older ids (oldest first) in front of the ones recorded so far, as long as there
    /// is room: used when rebuilding the window at open, newest segment first.
    pub(crate) fn prepend_older(&mut self, older: Vec<(EventId, IdSlot)>) {
        let take = older.len().min(self.room());
        for (id, slot) in older.into_iter().rev().take(take) {
            let key = id.as_u128();
            // An id seen twice (damage, or a client that reused one): keep the newer slot
            // and queue the key once, so evicting it cannot drop the newer entry early.
            if let std::collections::hash_map::Entry::Vacant(v) = self.map.entry(key) {
                v.insert(slot);
                self.order.push_front(key);
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(p: u64) -> IdSlot {
        IdSlot {
            position: Position(p),
            stream: StreamKey(0),
            version: p,
        }
    }

    /// The table indexes buckets by a hash's low bits: ids that differ only in a counter or
    /// timestamp in their first bytes (the high bits of the u128), or only in their last
    /// bytes, must still spread over them.
    #[test]
    fn ids_that_differ_in_few_bytes_spread_over_the_low_bits() {
        let b = IdHashBuilder::default();
        type MakeId = fn(u64) -> [u8; 16];
        let patterns: [(&str, MakeId); 3] = [
            ("a counter in the first bytes", |n| {
                let mut id = [0x5a; 16];
                id[..6].copy_from_slice(&n.to_le_bytes()[..6]);
                id
            }),
            ("a wide counter in the first bytes", |n| {
                let mut id = [0x11; 16];
                id[..8].copy_from_slice(&(n << 20).to_le_bytes());
                id
            }),
            ("a counter in the last bytes", |n| {
                let mut id = [0x77; 16];
                id[8..].copy_from_slice(&n.to_le_bytes());
                id
            }),
        ];
        for (what, make) in patterns {
            let mut buckets = std::collections::HashSet::new();
            for n in 0..100_000u64 {
                buckets.insert(b.hash_one(EventId(make(n)).as_u128()) & 0xfff);
            }
            // 100,000 keys over 4,096 buckets leave essentially none empty.
            assert!(
                buckets.len() > 4000,
                "{what}: {} of 4096 buckets",
                buckets.len()
            );
        }
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let mut w = IdWindow::new(3);
        for i in 0..5u8 {
            w.insert(EventId([i; 16]), slot(u64::from(i)));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.get(EventId([0; 16])), None);
        assert_eq!(w.get(EventId([1; 16])), None);
        assert_eq!(w.get(EventId([4; 16])), Some(slot(4)));
    }

    #[test]
    fn prepend_fills_only_the_room_left_with_the_newest_of_the_older() {
        let mut w = IdWindow::new(4);
        w.insert(EventId([10; 16]), slot(10));
        w.insert(EventId([11; 16]), slot(11));
        w.prepend_older(
            (5..10u8)
                .map(|i| (EventId([i; 16]), slot(u64::from(i))))
                .collect(),
        );
        assert_eq!(w.len(), 4);
        assert_eq!(w.get(EventId([9; 16])), Some(slot(9)));
        assert_eq!(w.get(EventId([8; 16])), Some(slot(8)));
        assert_eq!(w.get(EventId([7; 16])), None);
        // The oldest go first on the next insert.
        w.insert(EventId([12; 16]), slot(12));
        assert_eq!(w.get(EventId([8; 16])), None);
    }

    #[test]
    fn zero_capacity_remembers_nothing() {
        let mut w = IdWindow::new(0);
        w.insert(EventId([1; 16]), slot(1));
        assert_eq!(w.get(EventId([1; 16])), None);
    }
}
