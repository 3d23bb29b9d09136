//! The hash chain and the Merkle tree hashing (docs/FORMAT.md, "Hash chain" and "Merkle
//! roots").
//!
//! Chain: `seed = BLAKE3-derive_key(CHAIN_SEED_CONTEXT, log_id)`, and for each record
//! `chain_hash = BLAKE3-keyed(key = previous chain_hash, link)` where `link` is 64 bytes:
//! the 32 header bytes `durable_lag..kind` exactly as stored, followed by `BLAKE3(body)`.
//! The body hash can be computed by the appending thread before the record's position is
//! known; the serial step then hashes one 64-byte block.
//!
//! Merkle: RFC 9162 section 2.1 with BLAKE3: the hash of an empty tree is `BLAKE3("")`, a
//! leaf is `BLAKE3(0x00 || chain_hash)`, an inner node is `BLAKE3(0x01 || left || right)`,
//! and a tree of `n > 1` leaves splits at the largest power of two below `n`.

use super::Hash32;
use super::record::{LINK_FROM, LINK_TO};

/// The BLAKE3 key-derivation context for a log's chain seed.
pub const CHAIN_SEED_CONTEXT: &str = "tally 2026-11 record chain seed v1";

/// Bytes hashed by one chain step.
pub const LINK_LEN: usize = 64;

/// The chain value before a log's first record: distinct for every log id, so that records
/// from another log (or stale bytes of a recycled file) never chain.
#[must_use]
pub fn chain_seed(log_id: &[u8; 16]) -> Hash32 {
    blake3::derive_key(CHAIN_SEED_CONTEXT, log_id)
}

/// The hash of a record body.
#[must_use]
pub fn body_hash(body: &[u8]) -> Hash32 {
    *blake3::hash(body).as_bytes()
}

/// One chain step: the record hash of a record whose header encodes to `header` (its
/// `chain_hash` field is ignored) and whose body hashes to `body_hash`. Both layouts link
/// header bytes 12..44.
///
/// # Panics
/// If `header` is shorter than 44 bytes.
#[must_use]
pub fn chain_step(prev: &Hash32, header: &[u8], body_hash: &Hash32) -> Hash32 {
    let mut link = [0u8; LINK_LEN];
    link[..32].copy_from_slice(&header[LINK_FROM..LINK_TO]);
    link[32..].copy_from_slice(body_hash);
    *blake3::keyed_hash(prev, &link).as_bytes()
}

/// RFC 9162 leaf hash of one record hash.
#[must_use]
pub fn leaf_hash(record_hash: &Hash32) -> Hash32 {
    // One contiguous input: `blake3::hash` of a short input skips the incremental hasher's
    // bookkeeping, which costs as much as the compression here.
    let mut input = [0u8; 33];
    input[1..].copy_from_slice(record_hash);
    *blake3::hash(&input).as_bytes()
}

/// RFC 9162 inner node hash.
#[must_use]
pub fn node_hash(left: &Hash32, right: &Hash32) -> Hash32 {
    let mut input = [0u8; 65];
    input[0] = 0x01;
    input[1..33].copy_from_slice(left);
    input[33..].copy_from_slice(right);
    *blake3::hash(&input).as_bytes()
}

/// The hash of a tree with no leaves.
#[must_use]
pub fn empty_root() -> Hash32 {
    *blake3::hash(b"").as_bytes()
}

/// Computes an RFC 9162 Merkle root over leaves pushed one at a time, in O(log n) memory:
/// it keeps the roots of the perfect subtrees seen so far (the "frontier").
#[derive(Clone, Debug, Default)]
pub struct MerkleBuilder {
    /// `(height, root)` of perfect subtrees, strictly decreasing heights.
    frontier: Vec<(u32, Hash32)>,
    leaves: u64,
}

impl MerkleBuilder {
    /// An empty tree.
    #[must_use]
    pub fn new() -> MerkleBuilder {
        MerkleBuilder::default()
    }

    /// A tree whose first leaves are summarised by `frontier`: the roots of the perfect
    /// subtrees that make it up, `(level, root)` with strictly decreasing levels (the binary
    /// digits of its size).
    #[must_use]
    pub fn from_frontier(frontier: Vec<(u32, Hash32)>) -> MerkleBuilder {
        let leaves = frontier.iter().map(|(level, _)| 1u64 << level).sum();
        MerkleBuilder { frontier, leaves }
    }

    /// Adds the next record hash as a leaf.
    pub fn push(&mut self, record_hash: &Hash32) {
        self.push_leaf(leaf_hash(record_hash));
    }

    /// Adds the next leaf, given its [`leaf_hash`].
    pub fn push_leaf(&mut self, leaf: Hash32) {
        self.push_perfect(0, leaf);
    }

    /// Adds the next `2^level` leaves at once, given the root of their perfect subtree.
    /// Returns `false` (and changes nothing) unless the tree's size is a multiple of
    /// `2^level`: only then are those leaves a subtree of the whole tree.
    pub fn push_perfect(&mut self, level: u32, root: Hash32) -> bool {
        self.push_perfect_reporting(level, root, u32::MAX, &mut |_, _, _| {})
    }

    /// [`MerkleBuilder::push_perfect`], also calling `made(level, index, root)` for every
    /// perfect subtree of `min_level` levels or more that the push completes by joining
    /// peaks: the subtree over leaves `index * 2^level .. (index + 1) * 2^level`.
    pub fn push_perfect_reporting(
        &mut self,
        level: u32,
        root: Hash32,
        min_level: u32,
        made: &mut dyn FnMut(u32, u64, &Hash32),
    ) -> bool {
        if level >= 64 || self.leaves & ((1u64 << level) - 1) != 0 {
            return false;
        }
        let end = self.leaves + (1 << level);
        let mut node = (level, root);
        while let Some(&(height, left)) = self.frontier.last() {
            if height != node.0 {
                break;
            }
            self.frontier.pop();
            node = (height + 1, node_hash(&left, &node.1));
            if node.0 >= min_level {
                made(node.0, (end >> node.0) - 1, &node.1);
            }
        }
        self.frontier.push(node);
        self.leaves = end;
        true
    }

    /// Leaves pushed so far.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.leaves
    }

    /// Whether no leaf was pushed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }

    /// The root of the tree over every leaf pushed so far.
    #[must_use]
    pub fn root(&self) -> Hash32 {
        let mut iter = self.frontier.iter().rev();
        let Some(&(_, mut acc)) = iter.next() else {
            return empty_root();
        };
        for (_, left) in iter {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

/// The aligned perfect subtrees of the whole log's tree that the leaves `start..` make up,
/// built one leaf at a time: what a worker that sees only one range of the log (a segment)
/// contributes to the whole tree. Pushing [`AlignedRange::subtrees`] in order into a
/// [`MerkleBuilder`] of size `start` gives the builder of size `start + len`.
#[derive(Clone, Debug)]
pub struct AlignedRange {
    start: u64,
    leaves: u64,
    /// `(level, root)` of the subtrees, in leaf order; each starts at a multiple of its size.
    subtrees: Vec<(u32, Hash32)>,
}

impl AlignedRange {
    /// No leaves yet; the first pushed is leaf `start` of the log.
    #[must_use]
    pub fn new(start: u64) -> AlignedRange {
        AlignedRange {
            start,
            leaves: 0,
            subtrees: Vec::new(),
        }
    }

    /// Adds the next leaf, given its [`leaf_hash`].
    pub fn push_leaf(&mut self, leaf: Hash32) {
        self.push_leaf_reporting(leaf, u32::MAX, &mut |_, _, _| {});
    }

    /// [`AlignedRange::push_leaf`], also calling `made(level, index, root)` for every
    /// perfect subtree of `min_level` levels or more that the leaf completes: the subtree
    /// over leaves `index * 2^level .. (index + 1) * 2^level` of the whole tree.
    pub fn push_leaf_reporting(
        &mut self,
        leaf: Hash32,
        min_level: u32,
        made: &mut dyn FnMut(u32, u64, &Hash32),
    ) {
        let mut node = (0u32, leaf);
        let end = self.start + self.leaves + 1;
        while let Some(&(height, left)) = self.subtrees.last() {
            if height != node.0 || height >= 63 || end & ((2u64 << height) - 1) != 0 {
                break;
            }
            self.subtrees.pop();
            node = (height + 1, node_hash(&left, &node.1));
            if node.0 >= min_level {
                made(node.0, (end >> node.0) - 1, &node.1);
            }
        }
        self.subtrees.push(node);
        self.leaves += 1;
    }

    /// Leaves pushed so far.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.leaves
    }

    /// Whether no leaf was pushed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }

    /// The aligned subtrees, in leaf order.
    #[must_use]
    pub fn subtrees(&self) -> &[(u32, Hash32)] {
        &self.subtrees
    }
}

/// The RFC 9162 root of `record_hashes`, computed recursively from the definition. Used to
/// check [`MerkleBuilder`] and by verifiers that hold all leaves.
#[must_use]
pub fn merkle_root(record_hashes: &[Hash32]) -> Hash32 {
    match record_hashes.len() {
        0 => empty_root(),
        1 => leaf_hash(&record_hashes[0]),
        n => {
            let k = (n - 1).checked_ilog2().map_or(1, |e| 1usize << e);
            node_hash(
                &merkle_root(&record_hashes[..k]),
                &merkle_root(&record_hashes[k..]),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::RECORD_HEADER_LEN;

    fn leaves(n: usize) -> Vec<Hash32> {
        (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
            .collect()
    }

    #[test]
    fn builder_matches_the_recursive_definition_for_every_size() {
        for n in 0..70 {
            let ls = leaves(n);
            let mut b = MerkleBuilder::new();
            for l in &ls {
                b.push(l);
            }
            assert_eq!(b.len(), n as u64);
            assert_eq!(b.root(), merkle_root(&ls), "size {n}");
        }
    }

    #[test]
    fn aligned_ranges_join_into_the_whole_tree() {
        let ls = leaves(200);
        for cut in [0usize, 1, 3, 7, 64, 65, 100, 128, 199] {
            let mut whole = MerkleBuilder::new();
            for l in &ls[..cut] {
                whole.push(l);
            }
            let mut range = AlignedRange::new(cut as u64);
            for (i, l) in ls[cut..].iter().enumerate() {
                range.push_leaf(leaf_hash(l));
                let mut joined = whole.clone();
                for &(level, root) in range.subtrees() {
                    assert!(joined.push_perfect(level, root), "cut {cut}, +{i}");
                }
                assert_eq!(joined.len(), (cut + i + 1) as u64);
                assert_eq!(
                    joined.root(),
                    merkle_root(&ls[..=cut + i]),
                    "cut {cut}, +{i}"
                );
            }
        }
    }

    #[test]
    fn reported_subtrees_are_the_perfect_subtrees_of_the_whole_tree() {
        let ls = leaves(200);
        for cut in [0usize, 5, 16, 37, 64, 100] {
            let mut made = Vec::new();
            let mut whole = MerkleBuilder::new();
            for l in &ls[..cut] {
                whole.push_perfect_reporting(0, leaf_hash(l), 2, &mut |lv, j, h| {
                    made.push((lv, j, *h));
                });
            }
            let mut range = AlignedRange::new(cut as u64);
            for l in &ls[cut..] {
                range.push_leaf_reporting(leaf_hash(l), 2, &mut |lv, j, h| made.push((lv, j, *h)));
            }
            for &(level, root) in range.subtrees() {
                assert!(
                    whole.push_perfect_reporting(level, root, 2, &mut |lv, j, h| {
                        made.push((lv, j, *h));
                    })
                );
            }
            made.sort_by_key(|&(lv, j, _)| (lv, j));
            let mut expected = Vec::new();
            for level in 2..8u32 {
                let width = 1usize << level;
                for j in 0..ls.len() / width {
                    expected.push((
                        level,
                        j as u64,
                        merkle_root(&ls[j * width..(j + 1) * width]),
                    ));
                }
            }
            assert_eq!(made, expected, "cut {cut}");
        }
    }

    #[test]
    fn push_perfect_refuses_a_misaligned_subtree() {
        let mut b = MerkleBuilder::new();
        b.push(&[1; 32]);
        assert!(!b.push_perfect(1, [2; 32]));
        assert_eq!(b.len(), 1);
        assert!(b.push_perfect(0, [2; 32]));
        assert!(b.push_perfect(1, [3; 32]));
        assert_eq!(b.len(), 4);
        assert!(!b.push_perfect(64, [3; 32]));
    }

    #[test]
    fn split_point_is_the_largest_power_of_two_below_n() {
        let ls = leaves(7);
        let left = merkle_root(&ls[..4]);
        let right = node_hash(
            &node_hash(&leaf_hash(&ls[4]), &leaf_hash(&ls[5])),
            &leaf_hash(&ls[6]),
        );
        assert_eq!(merkle_root(&ls), node_hash(&left, &right));
        let ls = leaves(4);
        assert_eq!(
            merkle_root(&ls),
            node_hash(
                &node_hash(&leaf_hash(&ls[0]), &leaf_hash(&ls[1])),
                &node_hash(&leaf_hash(&ls[2]), &leaf_hash(&ls[3]))
            )
        );
    }

    #[test]
    fn leaf_and_node_hashes_are_domain_separated() {
        let a = [1u8; 32];
        let b = [2u8; 32];
        let mut concat = [0u8; 64];
        concat[..32].copy_from_slice(&a);
        concat[32..].copy_from_slice(&b);
        // A node must not be confusable with a leaf over the same 64 bytes, nor with a plain
        // hash of them.
        assert_ne!(node_hash(&a, &b), *blake3::hash(&concat).as_bytes());
        assert_ne!(leaf_hash(&a), *blake3::hash(&a).as_bytes());
        assert_eq!(
            leaf_hash(&a),
            *blake3::hash(&[&[0u8][..], &a[..]].concat()).as_bytes()
        );
    }

    #[test]
    fn seed_depends_on_log_id_and_step_on_every_input() {
        assert_ne!(chain_seed(&[0; 16]), chain_seed(&[1; 16]));
        let seed = chain_seed(&[0; 16]);
        let header = [5u8; RECORD_HEADER_LEN];
        let body = body_hash(b"body");
        let base = chain_step(&seed, &header, &body);
        let mut other_header = header;
        other_header[LINK_FROM] ^= 1;
        assert_ne!(chain_step(&seed, &other_header, &body), base);
        assert_ne!(chain_step(&[9; 32], &header, &body), base);
        assert_ne!(chain_step(&seed, &header, &body_hash(b"bodz")), base);
        // Bytes outside the link (the CRC and the stored chain hash) do not enter it.
        let mut outside = header;
        outside[0] ^= 1;
        outside[RECORD_HEADER_LEN - 1] ^= 1;
        assert_eq!(chain_step(&seed, &outside, &body), base);
    }
}
