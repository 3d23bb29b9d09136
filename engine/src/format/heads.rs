//! The stream heads map (docs/FORMAT.md, "Stream heads map"): for every stream with an event
//! among the first `tree_size` records, its last version and the position of its last event,
//! committed to by a version 2 checkpoint as `streams_root`. With it, a stream extract proves
//! that it ends at the stream's newest event, and so (with each record's `stream_prev`) that
//! it holds every event of the stream.
//!
//! The map is a compact sparse Merkle tree over 256-bit keys `BLAKE3(stream id)`, bits taken
//! from the most significant bit of the first byte:
//!
//! ```text
//! root(S)     = ZERO (32 zero bytes)                if S is empty
//!             = leaf(k, v, p)                        if S = {(k, v, p)}
//!             = node(root(S0), root(S1))             otherwise, S0 / S1: keys whose next bit is 0 / 1
//! leaf(k,v,p) = BLAKE3(0x02 || k || v (u64 LE) || p (u64 LE))
//! node(l, r)  = BLAKE3(0x03 || l || r)
//! ```
//!
//! The prefixes 0x02 and 0x03 keep these hashes apart from the log tree's leaves (0x00) and
//! nodes (0x01). A proof of a stream's head is the siblings on the path from the root to the
//! depth where the stream's leaf stands alone.
//!
//! In memory the leaves are kept sorted; subtree roots at a bucket depth chosen from the
//! number of streams (about 16 streams per bucket) and everything above are cached, so that
//! a new root costs about `changed streams * (16 + depth)` hashes.

use super::Hash32;

/// A key of the map: `BLAKE3(stream id)`.
pub type HeadKey = [u8; 32];

/// The root of an empty map (and of an empty subtree).
pub const EMPTY_ROOT: Hash32 = [0; 32];
/// Domain prefix of a map leaf.
pub const HEAD_LEAF_PREFIX: u8 = 0x02;
/// Domain prefix of a map node.
pub const HEAD_NODE_PREFIX: u8 = 0x03;

/// The key of a stream.
#[must_use]
pub fn stream_key(stream: &[u8]) -> HeadKey {
    *blake3::hash(stream).as_bytes()
}

/// The hash of a stream's leaf.
#[must_use]
pub fn head_leaf(key: &HeadKey, last_version: u64, last_position: u64) -> Hash32 {
    let mut b = [0u8; 49];
    b[0] = HEAD_LEAF_PREFIX;
    b[1..33].copy_from_slice(key);
    b[33..41].copy_from_slice(&last_version.to_le_bytes());
    b[41..49].copy_from_slice(&last_position.to_le_bytes());
    *blake3::hash(&b).as_bytes()
}

/// The hash of a node.
#[must_use]
pub fn head_node(left: &Hash32, right: &Hash32) -> Hash32 {
    let mut b = [0u8; 65];
    b[0] = HEAD_NODE_PREFIX;
    b[1..33].copy_from_slice(left);
    b[33..].copy_from_slice(right);
    *blake3::hash(&b).as_bytes()
}

/// The first 32 bits of a key, most significant first (the order of [`bit`]).
fn prefix32(key: &HeadKey) -> u32 {
    key[..4]
        .iter()
        .fold(0u32, |acc, &b| (acc << 8) | u32::from(b))
}

/// Bit `depth` of a key, most significant first.
fn bit(key: &HeadKey, depth: u32) -> bool {
    key[(depth / 8) as usize] & (0x80 >> (depth % 8)) != 0
}

/// A subtree's root and how many leaves it holds (0, 1, or more: only that matters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sub {
    hash: Hash32,
    leaves: u64,
}

const EMPTY_SUB: Sub = Sub {
    hash: EMPTY_ROOT,
    leaves: 0,
};

fn combine(l: Sub, r: Sub) -> Sub {
    let leaves = l.leaves + r.leaves;
    let hash = match (l.leaves, r.leaves) {
        (0, 0) => EMPTY_ROOT,
        (1, 0) => l.hash,
        (0, 1) => r.hash,
        _ => head_node(&l.hash, &r.hash),
    };
    Sub { hash, leaves }
}

/// The root of the leaves `items` (sorted by key, all sharing the first `depth` bits).
fn subroot(items: &[(HeadKey, u64, u64)], depth: u32) -> Sub {
    match items {
        [] => EMPTY_SUB,
        [(k, v, p)] => Sub {
            hash: head_leaf(k, *v, *p),
            leaves: 1,
        },
        _ => {
            // Distinct keys differ before bit 256, so the recursion ends.
            let split = items.partition_point(|(k, _, _)| !bit(k, depth));
            combine(
                subroot(&items[..split], depth + 1),
                subroot(&items[split..], depth + 1),
            )
        }
    }
}

/// A proof that a stream's leaf is in the map with a given root: the siblings from the
/// leaf's depth up to the root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadProof {
    /// Sibling subtree roots, nearest the leaf first.
    pub siblings: Vec<Hash32>,
}

impl HeadProof {
    /// Checks that `(key, last_version, last_position)` is a leaf of the map whose root is
    /// `root`.
    #[must_use]
    pub fn verify(
        &self,
        root: &Hash32,
        key: &HeadKey,
        last_version: u64,
        last_position: u64,
    ) -> bool {
        if self.siblings.len() > 256 {
            return false;
        }
        let depth = self.siblings.len() as u32;
        let mut h = head_leaf(key, last_version, last_position);
        for (i, sibling) in self.siblings.iter().enumerate() {
            let d = depth - 1 - i as u32;
            h = if bit(key, d) {
                head_node(sibling, &h)
            } else {
                head_node(&h, sibling)
            };
        }
        h == *root
    }
}

/// The stream heads map of a log, kept in step with its Merkle tree.
///
/// The leaves are kept in buckets by the first `bucket_depth` bits of their keys (about 16
/// per bucket), each bucket sorted by key; the roots of the buckets and of every subtree
/// above them are cached, and only buckets that changed, and their ancestors, are hashed
/// again.
#[derive(Clone, Debug)]
pub struct StreamHeads {
    /// Leaves by bucket, each sorted by key.
    buckets: Vec<Vec<(HeadKey, u64, u64)>>,
    len: usize,
    /// Depth of the cached buckets; `nodes[(1 << d) - 1 + i]` is subtree `i` at depth
    /// `d <= bucket_depth`.
    bucket_depth: u32,
    nodes: Vec<Sub>,
    /// Buckets whose root must be computed again, each listed once (`dirty[b]` marks them).
    dirty: Vec<bool>,
    dirty_list: Vec<usize>,
}

impl Default for StreamHeads {
    fn default() -> StreamHeads {
        StreamHeads::new()
    }
}

impl StreamHeads {
    /// An empty map.
    #[must_use]
    pub fn new() -> StreamHeads {
        let mut m = StreamHeads {
            buckets: Vec::new(),
            len: 0,
            bucket_depth: 0,
            nodes: Vec::new(),
            dirty: Vec::new(),
            dirty_list: Vec::new(),
        };
        m.reshape();
        m
    }

    /// A map of `entries` (`(key, last version, last position)`, in any order; of equal
    /// keys the last counts), built at once.
    #[must_use]
    pub fn from_entries(mut entries: Vec<(HeadKey, u64, u64)>) -> StreamHeads {
        // A stable sort keeps equal keys in their order: the last of each run counts.
        entries.sort_by_key(|e| e.0);
        let mut unique: Vec<(HeadKey, u64, u64)> = Vec::with_capacity(entries.len());
        for e in entries {
            match unique.last_mut() {
                Some(last) if last.0 == e.0 => *last = e,
                _ => unique.push(e),
            }
        }
        let mut m = StreamHeads::new();
        m.len = unique.len();
        m.buckets = vec![unique];
        m.reshape();
        m
    }

    /// Streams in the map.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the map is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A stream's head, if it is in the map.
    #[must_use]
    pub fn get(&self, key: &HeadKey) -> Option<(u64, u64)> {
        let bucket = &self.buckets[self.bucket_of(key)];
        let i = bucket.binary_search_by(|e| e.0.cmp(key)).ok()?;
        Some((bucket[i].1, bucket[i].2))
    }

    fn depth_for(streams: usize) -> u32 {
        // About 16 leaves per bucket; at most 2^20 buckets (64 MiB of cache at ~16M streams).
        (usize::BITS - streams.leading_zeros())
            .saturating_sub(4)
            .min(20)
    }

    fn bucket_of(&self, key: &HeadKey) -> usize {
        if self.bucket_depth == 0 {
            return 0;
        }
        (prefix32(key) >> (32 - self.bucket_depth)) as usize
    }

    /// Chooses the bucket depth for the current number of streams, spreads the leaves over
    /// the new buckets (the buckets in order hold the keys in order) and marks every
    /// bucket dirty.
    fn reshape(&mut self) {
        let depth = Self::depth_for(self.len);
        let leaves: Vec<(HeadKey, u64, u64)> = self.buckets.drain(..).flatten().collect();
        self.bucket_depth = depth;
        let count = 1usize << depth;
        self.buckets = vec![Vec::new(); count];
        for leaf in leaves {
            let b = self.bucket_of(&leaf.0);
            self.buckets[b].push(leaf);
        }
        self.nodes = vec![EMPTY_SUB; 2 * count - 1];
        self.dirty = vec![true; count];
        self.dirty_list = (0..count).collect();
    }

    fn touch(&mut self, b: usize) {
        if Self::depth_for(self.len) != self.bucket_depth {
            self.reshape();
        } else if !self.dirty[b] {
            self.dirty[b] = true;
            self.dirty_list.push(b);
        }
    }

    /// Sets a stream's head.
    pub fn set(&mut self, key: HeadKey, last_version: u64, last_position: u64) {
        let b = self.bucket_of(&key);
        let bucket = &mut self.buckets[b];
        match bucket.binary_search_by(|e| e.0.cmp(&key)) {
            Ok(i) => {
                if (bucket[i].1, bucket[i].2) == (last_version, last_position) {
                    return;
                }
                bucket[i] = (key, last_version, last_position);
            }
            Err(i) => {
                bucket.insert(i, (key, last_version, last_position));
                self.len += 1;
            }
        }
        self.touch(b);
    }

    /// Removes a stream (when rewinding to a tree in which it had no event yet).
    pub fn remove(&mut self, key: &HeadKey) {
        let b = self.bucket_of(key);
        let bucket = &mut self.buckets[b];
        if let Ok(i) = bucket.binary_search_by(|e| e.0.cmp(key)) {
            bucket.remove(i);
            self.len -= 1;
            self.touch(b);
        }
    }

    /// Hashes the dirty buckets again, then each of their ancestors once, level by level.
    fn refresh(&mut self) {
        if self.dirty_list.is_empty() {
            return;
        }
        let d = self.bucket_depth;
        let first_bucket = (1usize << d) - 1;
        let mut level: Vec<usize> = std::mem::take(&mut self.dirty_list);
        level.sort_unstable();
        for &b in &level {
            self.dirty[b] = false;
            self.nodes[first_bucket + b] = subroot(&self.buckets[b], d);
        }
        for i in &mut level {
            *i += first_bucket;
        }
        while level.first().is_some_and(|&i| i > 0) {
            // Sorted nodes of one level give sorted parents, equal ones side by side.
            level = level.iter().map(|&i| (i - 1) / 2).collect();
            level.dedup();
            for &parent in &level {
                self.nodes[parent] =
                    combine(self.nodes[2 * parent + 1], self.nodes[2 * parent + 2]);
            }
        }
    }

    /// The map's root.
    pub fn root(&mut self) -> Hash32 {
        self.refresh();
        self.nodes[0].hash
    }

    /// A proof of a stream's head, or `None` if the stream is not in the map.
    pub fn prove(&mut self, key: &HeadKey) -> Option<HeadProof> {
        self.get(key)?;
        self.refresh();
        let mut siblings = Vec::new();
        // Down the cached levels to the bucket, or to where the key's subtree holds it alone.
        let mut i = 0usize;
        let mut depth = 0u32;
        while depth < self.bucket_depth {
            if self.nodes[i].leaves == 1 {
                siblings.reverse();
                return Some(HeadProof { siblings });
            }
            let (l, r) = (2 * i + 1, 2 * i + 2);
            if bit(key, depth) {
                siblings.push(self.nodes[l].hash);
                i = r;
            } else {
                siblings.push(self.nodes[r].hash);
                i = l;
            }
            depth += 1;
        }
        // Inside the bucket.
        let mut slice = &self.buckets[self.bucket_of(key)][..];
        while slice.len() > 1 {
            let split = slice.partition_point(|(k, _, _)| !bit(k, depth));
            let (left, right) = slice.split_at(split);
            if bit(key, depth) {
                siblings.push(subroot(left, depth + 1).hash);
                slice = right;
            } else {
                siblings.push(subroot(right, depth + 1).hash);
                slice = left;
            }
            depth += 1;
        }
        siblings.reverse();
        Some(HeadProof { siblings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> HeadKey {
        stream_key(format!("trade-{i}").as_bytes())
    }

    /// The definition, computed directly.
    fn reference_root(entries: &[(HeadKey, u64, u64)]) -> Hash32 {
        let mut sorted = entries.to_vec();
        sorted.sort_by_key(|e| e.0);
        subroot(&sorted, 0).hash
    }

    #[test]
    fn roots_match_the_definition_through_growth_updates_and_removals() {
        let mut m = StreamHeads::new();
        assert_eq!(m.root(), EMPTY_ROOT);
        let mut entries: Vec<(HeadKey, u64, u64)> = Vec::new();
        for i in 0..600u64 {
            m.set(key(i), i % 7, i * 3);
            entries.push((key(i), i % 7, i * 3));
            if i % 37 == 0 || i < 20 {
                assert_eq!(m.root(), reference_root(&entries), "after {i} inserts");
            }
        }
        for i in (0..600u64).step_by(5) {
            m.set(key(i), 100 + i, 10_000 + i);
            entries[i as usize] = (key(i), 100 + i, 10_000 + i);
        }
        assert_eq!(m.root(), reference_root(&entries));
        for i in (0..600u64).step_by(3) {
            m.remove(&key(i));
        }
        entries.retain(|e| !(0..600u64).step_by(3).any(|i| key(i) == e.0));
        assert_eq!(m.len(), entries.len() as u64);
        assert_eq!(m.root(), reference_root(&entries));
        // Built at once from the same entries (shuffled, one stream given twice), the map
        // is the same.
        let mut shuffled = entries.clone();
        shuffled.reverse();
        shuffled.insert(0, (entries[0].0, 999, 999));
        let mut bulk = StreamHeads::from_entries(shuffled);
        assert_eq!(bulk.len(), entries.len() as u64);
        assert_eq!(bulk.root(), reference_root(&entries));
        bulk.set(key(1), 5, 5);
        m.set(key(1), 5, 5);
        assert_eq!(bulk.root(), m.root());
        // A single stream's root is its leaf.
        let mut one = StreamHeads::new();
        one.set(key(1), 2, 3);
        assert_eq!(one.root(), head_leaf(&key(1), 2, 3));
    }

    #[test]
    fn small_maps_hash_as_the_format_says() {
        let k = |first: u8| {
            let mut k = [7u8; 32];
            k[0] = first;
            k
        };
        // Keys 0b0000_0000.. and 0b1000_0000.. part at the first bit.
        let (a, b) = (k(0x00), k(0x80));
        let mut m = StreamHeads::new();
        m.set(b, 1, 10);
        m.set(a, 2, 20);
        assert_eq!(
            m.root(),
            head_node(&head_leaf(&a, 2, 20), &head_leaf(&b, 1, 10))
        );
        // Keys 0b00.. and 0b01..: both left of the root, so the root's right is empty.
        let (c, d) = (k(0x00), k(0x40));
        let mut m = StreamHeads::new();
        m.set(c, 1, 1);
        m.set(d, 2, 2);
        let inner = head_node(&head_leaf(&c, 1, 1), &head_leaf(&d, 2, 2));
        assert_eq!(m.root(), head_node(&inner, &EMPTY_ROOT));
        let p = m.prove(&d).unwrap();
        assert_eq!(p.siblings, vec![head_leaf(&c, 1, 1), EMPTY_ROOT]);
        // Domain separation from the log tree: a leaf is not BLAKE3(0x00 || ...).
        assert_ne!(head_leaf(&a, 0, 0), super::super::chain::leaf_hash(&a));
    }

    #[test]
    fn proofs_verify_for_every_stream_and_fail_for_anything_else() {
        for n in [1u64, 2, 3, 17, 100, 1000] {
            let mut m = StreamHeads::new();
            for i in 0..n {
                m.set(key(i), i, 2 * i);
            }
            let root = m.root();
            for i in 0..n {
                let p = m.prove(&key(i)).unwrap();
                assert!(p.verify(&root, &key(i), i, 2 * i), "n {n} stream {i}");
                assert!(!p.verify(&root, &key(i), i + 1, 2 * i), "a later version");
                assert!(!p.verify(&root, &key(i), i, 2 * i + 1), "another position");
                assert!(!p.verify(&root, &key(n + 1), i, 2 * i), "another stream");
            }
            assert!(m.prove(&key(n + 5)).is_none());
        }
    }
}
