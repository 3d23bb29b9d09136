//! Range multiproofs: many leaves of the log's Merkle tree proven against one root with each
//! needed node given once (docs/EXTRACT.md, format 3, "Proof nodes").
//!
//! A multiproof for a set of leaves, in position order, is the list of *gap nodes*: for each
//! run of positions between two proven leaves (and before the first and after the last), the
//! maximal nodes of the tree that lie inside the run, left to right. Leaves and gap nodes
//! together tile `0..size`, and a verifier folds them into the root with a stack, one item at
//! a time ([`RangeFolder`]), so that it never holds more than one path of the tree. For a
//! single leaf the gap nodes are exactly the hashes of its inclusion proof (in another
//! order); for a run of `k` adjacent leaves they are at most two per level, wherever the run
//! lies, so a dense extract carries almost no proof.

use super::Hash32;
use super::chain::{leaf_hash, node_hash};
use super::proof::{NodeSource, ProofError, subtree_root};

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    1 << (n - 1).ilog2()
}

/// Whether `start..end` (`end - start >= 1`) is a node of the tree of `size` leaves: a
/// perfect subtree aligned to its width, or a node on the tree's right edge.
#[must_use]
pub fn is_node(start: u64, end: u64, size: u64) -> bool {
    if start >= end || end > size {
        return false;
    }
    let width = end - start;
    if width.is_power_of_two() && start.is_multiple_of(width) {
        return true;
    }
    // The right edge: `size` with its low bits cleared, below the lowest set bit of `start`.
    end == size && (start == 0 || width < 1 << start.trailing_zeros())
}

/// The gap nodes of positions `from..to` in the tree of `size` leaves: the maximal nodes
/// inside that range, left to right, as `(start, end)` ranges. Empty when `from >= to`.
#[must_use]
pub fn gap_nodes(from: u64, to: u64, size: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    if from < to && to <= size {
        cover(0, size, from, to, &mut out);
    }
    out
}

/// The number of gap nodes of positions `from..to` (what [`gap_nodes`] returns, counted).
#[must_use]
pub fn gap_node_count(from: u64, to: u64, size: u64) -> usize {
    gap_nodes(from, to, size).len()
}

fn cover(start: u64, end: u64, from: u64, to: u64, out: &mut Vec<(u64, u64)>) {
    if to <= start || end <= from {
        return;
    }
    if from <= start && end <= to {
        out.push((start, end));
        return;
    }
    let mid = start + split(end - start);
    cover(start, mid, from, to, out);
    cover(mid, end, from, to, out);
}

/// The hashes of the gap nodes of `from..to`, from a node source.
///
/// # Errors
/// What the node source fails with.
pub fn gap_hashes<S: NodeSource>(
    src: &mut S,
    from: u64,
    to: u64,
    size: u64,
) -> Result<Vec<Hash32>, S::Error> {
    gap_nodes(from, to, size)
        .into_iter()
        .map(|(s, e)| subtree_root(src, s, e))
        .collect()
}

/// Folds leaves and gap nodes, given left to right, into the root of the tree of `size`
/// leaves. It holds at most one node per level.
#[derive(Clone, Debug)]
pub struct RangeFolder {
    size: u64,
    next: u64,
    stack: Vec<(u64, u64, Hash32)>,
}

impl RangeFolder {
    /// A folder for the tree of `size` leaves.
    #[must_use]
    pub fn new(size: u64) -> RangeFolder {
        RangeFolder {
            size,
            next: 0,
            stack: Vec::new(),
        }
    }

    /// The first position not yet covered.
    #[must_use]
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Adds the leaf of the record at the next position, given its record hash.
    ///
    /// # Errors
    /// [`ProofError::OutOfRange`] when the tree is already covered.
    pub fn push_record(&mut self, record_hash: &Hash32) -> Result<(), ProofError> {
        self.push_node(self.next, self.next + 1, leaf_hash(record_hash))
    }

    /// Adds the node covering `start..end`, which must start at [`RangeFolder::next`] and be
    /// a node of the tree.
    ///
    /// # Errors
    /// [`ProofError::OutOfRange`] when it does not start there, ends beyond the tree, or is
    /// not a node of it.
    pub fn push_node(&mut self, start: u64, end: u64, hash: Hash32) -> Result<(), ProofError> {
        if start != self.next || !is_node(start, end, self.size) {
            return Err(ProofError::OutOfRange {
                index: start,
                size: self.size,
            });
        }
        self.next = end;
        self.stack.push((start, end, hash));
        while let [.., (a, b, left), (b2, c, right)] = self.stack[..] {
            debug_assert_eq!(b, b2);
            if c - a < 2 || !is_node(a, c, self.size) || a + split(c - a) != b {
                break;
            }
            self.stack.truncate(self.stack.len() - 2);
            self.stack.push((a, c, node_hash(&left, &right)));
        }
        Ok(())
    }

    /// Adds the gap nodes of `next..to` with these hashes.
    ///
    /// # Errors
    /// [`ProofError::WrongLength`] when `hashes` is not one hash per gap node;
    /// [`ProofError::OutOfRange`] when `to` is beyond the tree or before `next`.
    pub fn push_gap(&mut self, to: u64, hashes: &[Hash32]) -> Result<(), ProofError> {
        if to < self.next || to > self.size {
            return Err(ProofError::OutOfRange {
                index: to,
                size: self.size,
            });
        }
        let nodes = gap_nodes(self.next, to, self.size);
        if nodes.len() != hashes.len() {
            return Err(ProofError::WrongLength {
                found: hashes.len(),
                expected: nodes.len(),
            });
        }
        for ((s, e), h) in nodes.into_iter().zip(hashes) {
            self.push_node(s, e, *h)?;
        }
        Ok(())
    }

    /// The root, once every position is covered.
    ///
    /// # Errors
    /// [`ProofError::OutOfRange`] when positions are left uncovered (or the tree is empty).
    pub fn root(&self) -> Result<Hash32, ProofError> {
        match self.stack[..] {
            [(0, end, root)] if end == self.size => Ok(root),
            _ => Err(ProofError::OutOfRange {
                index: self.next,
                size: self.size,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::chain::merkle_root;
    use crate::format::proof::{LeavesSource, prove_inclusion};
    use proptest::prelude::*;

    fn hashes(n: u64) -> Vec<Hash32> {
        (0..n)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect()
    }

    /// Folds the multiproof of `chosen` (sorted, distinct) and returns the root and the
    /// number of proof hashes it took.
    fn fold(leaves: &[Hash32], chosen: &[u64]) -> (Hash32, usize) {
        let size = leaves.len() as u64;
        let mut src = LeavesSource(leaves);
        let mut f = RangeFolder::new(size);
        let mut proof = 0;
        for &p in chosen {
            let gap = gap_hashes(&mut src, f.next(), p, size).unwrap();
            proof += gap.len();
            f.push_gap(p, &gap).unwrap();
            f.push_record(&leaves[p as usize]).unwrap();
        }
        let gap = gap_hashes(&mut src, f.next(), size, size).unwrap();
        proof += gap.len();
        f.push_gap(size, &gap).unwrap();
        (f.root().unwrap(), proof)
    }

    #[test]
    fn nodes_are_the_tree_nodes() {
        // Every node reached by descending from the root is a node, and nothing else is.
        fn walk(s: u64, e: u64, out: &mut Vec<(u64, u64)>) {
            out.push((s, e));
            if e - s > 1 {
                let m = s + split(e - s);
                walk(s, m, out);
                walk(m, e, out);
            }
        }
        for size in 1..=70u64 {
            let mut nodes = Vec::new();
            walk(0, size, &mut nodes);
            for s in 0..size {
                for e in s + 1..=size {
                    assert_eq!(
                        is_node(s, e, size),
                        nodes.contains(&(s, e)),
                        "{s}..{e} of {size}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_leaf_needs_exactly_its_inclusion_path() {
        for size in 1..=40u64 {
            let leaves = hashes(size);
            for p in 0..size {
                let mut src = LeavesSource(&leaves);
                let mut path = prove_inclusion(&mut src, p, size).unwrap().unwrap().path;
                let (root, n) = fold(&leaves, &[p]);
                assert_eq!(root, merkle_root(&leaves));
                let mut gaps = gap_hashes(&mut src, 0, p, size).unwrap();
                gaps.extend(gap_hashes(&mut src, p + 1, size, size).unwrap());
                path.sort_unstable();
                gaps.sort_unstable();
                assert_eq!((n, &gaps), (path.len(), &path), "leaf {p} of {size}");
            }
        }
    }

    #[test]
    fn a_run_needs_at_most_two_nodes_per_level() {
        let size = 1000u64;
        let leaves = hashes(size);
        for (a, b) in [
            (0, 1000),
            (1, 999),
            (333, 777),
            (512, 513),
            (0, 1),
            (999, 1000),
        ] {
            let chosen: Vec<u64> = (a..b).collect();
            let (root, n) = fold(&leaves, &chosen);
            assert_eq!(root, merkle_root(&leaves));
            assert!(n <= 2 * 10, "{a}..{b}: {n} proof nodes");
        }
    }

    #[test]
    fn wrong_counts_and_hashes_are_refused() {
        let leaves = hashes(13);
        let mut src = LeavesSource(&leaves);
        let mut f = RangeFolder::new(13);
        let gap = gap_hashes(&mut src, 0, 5, 13).unwrap();
        assert_eq!(
            f.push_gap(5, &gap[1..]),
            Err(ProofError::WrongLength {
                found: gap.len() - 1,
                expected: gap.len()
            })
        );
        f.push_gap(5, &gap).unwrap();
        assert!(f.root().is_err(), "positions 5.. are not covered");
        f.push_record(&leaves[5]).unwrap();
        let mut rest = gap_hashes(&mut src, 6, 13, 13).unwrap();
        rest[0][0] ^= 1;
        f.push_gap(13, &rest).unwrap();
        assert_ne!(f.root().unwrap(), merkle_root(&leaves));
        assert!(f.push_record(&leaves[0]).is_err(), "beyond the tree");
        assert!(RangeFolder::new(0).root().is_err());
    }

    proptest! {
        #[test]
        fn any_selection_folds_to_the_root(size in 1u64..300, picks in proptest::collection::vec(any::<u64>(), 1..40)) {
            let leaves = hashes(size);
            let mut chosen: Vec<u64> = picks.iter().map(|p| p % size).collect();
            chosen.sort_unstable();
            chosen.dedup();
            let (root, n) = fold(&leaves, &chosen);
            prop_assert_eq!(root, merkle_root(&leaves));
            // Never more than the separate inclusion proofs would hold together.
            let separate: usize = chosen.iter().map(|&p| super::super::proof::inclusion_len(p, size)).sum();
            prop_assert!(n <= separate);
        }
    }
}
