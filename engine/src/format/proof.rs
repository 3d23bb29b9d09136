//! Merkle proofs over the whole log (docs/FORMAT.md, "Log Merkle tree and proofs").
//!
//! The tree is the RFC 9162 tree of [`super::chain`] over every record hash of the log, in
//! position order: leaf `i` is `leaf_hash(record hash of position i)`. This module builds
//! inclusion and consistency proofs from any [`NodeSource`] (something that can produce
//! the root of a perfect, aligned subtree) and verifies them with the algorithms of RFC 9162
//! sections 2.1.3.2 and 2.1.4.2. Nothing here touches files: verifiers that hold only a
//! proof, a leaf and a signed root use it as it is.

use super::Hash32;
use super::chain::{empty_root, leaf_hash, node_hash};

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The leaf index is not inside the tree.
    #[error("leaf {index} is outside a tree of size {size}")]
    OutOfRange {
        /// The leaf index.
        index: u64,
        /// The tree size.
        size: u64,
    },
    /// The sizes of a consistency proof are not `old <= new`.
    #[error("old tree size {old} is larger than new tree size {new}")]
    SizesOutOfOrder {
        /// The old size.
        old: u64,
        /// The new size.
        new: u64,
    },
    /// The proof has the wrong number of hashes for its sizes.
    #[error("proof has {found} hashes, {expected} expected for these sizes")]
    WrongLength {
        /// Hashes in the proof.
        found: usize,
        /// Hashes a proof for these sizes has.
        expected: usize,
    },
    /// The proof does not lead to the root it was checked against.
    #[error("proof leads to root {computed}, expected {expected}")]
    RootMismatch {
        /// The root the proof computes (hex).
        computed: String,
        /// The root it was checked against (hex).
        expected: String,
    },
}

/// Produces the roots of perfect subtrees aligned to their size: `perfect(level, index)` is
/// the root over leaves `index * 2^level .. (index + 1) * 2^level`.
pub trait NodeSource {
    /// The error reading a node can fail with.
    type Error;
    /// The root of the perfect subtree at `level` and `index`.
    ///
    /// # Errors
    /// Whatever reading the node fails with.
    fn perfect(&mut self, level: u32, index: u64) -> Result<Hash32, Self::Error>;
}

/// A [`NodeSource`] over record hashes held in memory (tests, small verifiers).
#[derive(Clone, Debug)]
pub struct LeavesSource<'a>(pub &'a [Hash32]);

impl NodeSource for LeavesSource<'_> {
    type Error = std::convert::Infallible;
    fn perfect(&mut self, level: u32, index: u64) -> Result<Hash32, Self::Error> {
        let width = 1usize << level;
        let start = index as usize * width;
        Ok(super::chain::merkle_root(&self.0[start..start + width]))
    }
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (n - 1).ilog2()
}

/// The root over leaves `start..end` as RFC 9162 defines it for a tree cut at `start`:
/// `start` must be a multiple of the largest power of two not above `end - start` (every
/// subtree that appears in a proof is of this form).
///
/// # Errors
/// What the node source fails with.
pub fn subtree_root<S: NodeSource>(src: &mut S, start: u64, end: u64) -> Result<Hash32, S::Error> {
    let len = end - start;
    if len == 0 {
        return Ok(empty_root());
    }
    if len.is_power_of_two() && start.is_multiple_of(len) {
        return src.perfect(len.trailing_zeros(), start / len);
    }
    let k = split(len);
    let left = subtree_root(src, start, start + k)?;
    let right = subtree_root(src, start + k, end)?;
    Ok(node_hash(&left, &right))
}

/// The root of the tree of the first `size` leaves.
///
/// # Errors
/// What the node source fails with.
pub fn root<S: NodeSource>(src: &mut S, size: u64) -> Result<Hash32, S::Error> {
    subtree_root(src, 0, size)
}

/// An RFC 9162 inclusion proof: the record at `index` is leaf `index` of the tree of the
/// first `tree_size` records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InclusionProof {
    /// The leaf's index (the record's position).
    pub index: u64,
    /// The size of the tree the proof is for.
    pub tree_size: u64,
    /// Sibling hashes, from the leaf up to the root.
    pub path: Vec<Hash32>,
}

/// An RFC 9162 consistency proof: the tree of `old_size` leaves is a prefix of the tree of
/// `new_size` leaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsistencyProof {
    /// The smaller tree.
    pub old_size: u64,
    /// The larger tree.
    pub new_size: u64,
    /// The proof's hashes, in RFC 9162 order.
    pub path: Vec<Hash32>,
}

/// Builds the inclusion proof of leaf `index` in the tree of `tree_size` leaves.
///
/// # Errors
/// [`ProofError::OutOfRange`] (as `Ok(Err(..))`) for an index outside the tree; the node
/// source's error otherwise.
pub fn prove_inclusion<S: NodeSource>(
    src: &mut S,
    index: u64,
    tree_size: u64,
) -> Result<Result<InclusionProof, ProofError>, S::Error> {
    if index >= tree_size {
        return Ok(Err(ProofError::OutOfRange {
            index,
            size: tree_size,
        }));
    }
    let mut path = Vec::new();
    inclusion_path(src, index, 0, tree_size, &mut path)?;
    Ok(Ok(InclusionProof {
        index,
        tree_size,
        path,
    }))
}

fn inclusion_path<S: NodeSource>(
    src: &mut S,
    m: u64,
    start: u64,
    end: u64,
    out: &mut Vec<Hash32>,
) -> Result<(), S::Error> {
    if end - start == 1 {
        return Ok(());
    }
    let k = split(end - start);
    if m < start + k {
        inclusion_path(src, m, start, start + k, out)?;
        out.push(subtree_root(src, start + k, end)?);
    } else {
        inclusion_path(src, m, start + k, end, out)?;
        out.push(subtree_root(src, start, start + k)?);
    }
    Ok(())
}

/// Builds the consistency proof between the trees of `old_size` and `new_size` leaves.
///
/// # Errors
/// [`ProofError::SizesOutOfOrder`] (as `Ok(Err(..))`) when `old_size > new_size`; the node
/// source's error otherwise.
pub fn prove_consistency<S: NodeSource>(
    src: &mut S,
    old_size: u64,
    new_size: u64,
) -> Result<Result<ConsistencyProof, ProofError>, S::Error> {
    if old_size > new_size {
        return Ok(Err(ProofError::SizesOutOfOrder {
            old: old_size,
            new: new_size,
        }));
    }
    let mut path = Vec::new();
    if old_size > 0 && old_size < new_size {
        subproof(src, old_size, 0, new_size, true, &mut path)?;
    }
    Ok(Ok(ConsistencyProof {
        old_size,
        new_size,
        path,
    }))
}

fn subproof<S: NodeSource>(
    src: &mut S,
    m: u64,
    start: u64,
    end: u64,
    complete: bool,
    out: &mut Vec<Hash32>,
) -> Result<(), S::Error> {
    if m == end {
        if !complete {
            out.push(subtree_root(src, start, end)?);
        }
        return Ok(());
    }
    let k = split(end - start);
    if m <= start + k {
        subproof(src, m, start, start + k, complete, out)?;
        out.push(subtree_root(src, start + k, end)?);
    } else {
        subproof(src, m, start + k, end, false, out)?;
        out.push(subtree_root(src, start, start + k)?);
    }
    Ok(())
}

fn mismatch(computed: &Hash32, expected: &Hash32) -> ProofError {
    ProofError::RootMismatch {
        computed: hex(computed),
        expected: hex(expected),
    }
}

/// Lower-case hex of bytes.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses lower- or upper-case hex of any even length.
#[must_use]
pub fn parse_hex_vec(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| {
            let digit = |c: u8| (c as char).to_digit(16);
            u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()
        })
        .collect()
}

/// Parses exactly `N` bytes of hex (either case).
#[must_use]
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        out[i] = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

impl InclusionProof {
    /// Checks that `record_hash` is leaf `self.index` of the tree with `root` (RFC 9162
    /// section 2.1.3.2).
    ///
    /// # Errors
    /// [`ProofError`] saying why it is not.
    pub fn verify(&self, record_hash: &Hash32, root: &Hash32) -> Result<(), ProofError> {
        if self.index >= self.tree_size {
            return Err(ProofError::OutOfRange {
                index: self.index,
                size: self.tree_size,
            });
        }
        let expected = inclusion_len(self.index, self.tree_size);
        if self.path.len() != expected {
            return Err(ProofError::WrongLength {
                found: self.path.len(),
                expected,
            });
        }
        let mut f = self.index;
        let mut s = self.tree_size - 1;
        let mut r = leaf_hash(record_hash);
        for p in &self.path {
            if s == 0 {
                return Err(ProofError::WrongLength {
                    found: self.path.len(),
                    expected,
                });
            }
            if f & 1 == 1 || f == s {
                r = node_hash(p, &r);
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            } else {
                r = node_hash(&r, p);
            }
            f >>= 1;
            s >>= 1;
        }
        if s != 0 {
            return Err(ProofError::WrongLength {
                found: self.path.len(),
                expected,
            });
        }
        if r != *root {
            return Err(mismatch(&r, root));
        }
        Ok(())
    }
}

/// The number of hashes in an inclusion proof of leaf `index` in a tree of `size`.
#[must_use]
pub fn inclusion_len(index: u64, size: u64) -> usize {
    if index >= size {
        return 0;
    }
    let (mut f, mut s, mut n) = (index, size - 1, 0);
    while s > 0 {
        if f & 1 == 1 || f == s {
            n += 1;
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        } else {
            n += 1;
        }
        f >>= 1;
        s >>= 1;
    }
    n
}

impl ConsistencyProof {
    /// Checks that the tree with `old_root` and `old_size` leaves is a prefix of the tree
    /// with `new_root` and `new_size` leaves (RFC 9162 section 2.1.4.2). An empty old tree
    /// is a prefix of every tree; equal sizes need equal roots and an empty proof.
    ///
    /// # Errors
    /// [`ProofError`] saying why it is not.
    pub fn verify(&self, old_root: &Hash32, new_root: &Hash32) -> Result<(), ProofError> {
        let (m, n) = (self.old_size, self.new_size);
        if m > n {
            return Err(ProofError::SizesOutOfOrder { old: m, new: n });
        }
        if m == 0 || m == n {
            if !self.path.is_empty() {
                return Err(ProofError::WrongLength {
                    found: self.path.len(),
                    expected: 0,
                });
            }
            if m == 0 {
                return if *old_root == empty_root() {
                    Ok(())
                } else {
                    Err(mismatch(old_root, &empty_root()))
                };
            }
            return if old_root == new_root {
                Ok(())
            } else {
                Err(mismatch(old_root, new_root))
            };
        }
        let wrong_length = || ProofError::WrongLength {
            found: self.path.len(),
            expected: consistency_len(m, n),
        };
        if self.path.len() != consistency_len(m, n) {
            return Err(wrong_length());
        }
        let mut path = self.path.iter();
        let first = if m.is_power_of_two() {
            *old_root
        } else {
            *path.next().ok_or_else(wrong_length)?
        };
        let mut f = m - 1;
        let mut s = n - 1;
        while f & 1 == 1 {
            f >>= 1;
            s >>= 1;
        }
        let (mut fr, mut sr) = (first, first);
        for c in path {
            if s == 0 {
                return Err(wrong_length());
            }
            if f & 1 == 1 || f == s {
                fr = node_hash(c, &fr);
                sr = node_hash(c, &sr);
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            } else {
                sr = node_hash(&sr, c);
            }
            f >>= 1;
            s >>= 1;
        }
        if s != 0 {
            return Err(wrong_length());
        }
        if fr != *old_root {
            return Err(mismatch(&fr, old_root));
        }
        if sr != *new_root {
            return Err(mismatch(&sr, new_root));
        }
        Ok(())
    }
}

/// The number of hashes in a consistency proof between sizes `old` and `new`.
#[must_use]
pub fn consistency_len(old: u64, new: u64) -> usize {
    if old == 0 || old >= new {
        return 0;
    }
    // One hash per level walked from the old tree's rightmost leaf to the root, minus the
    // levels where the old tree's edge is a complete left subtree, plus the seed hash.
    let mut f = old - 1;
    let mut s = new - 1;
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let mut n = usize::from(!old.is_power_of_two());
    while s > 0 {
        n += 1;
        if f & 1 == 1 || f == s {
            while f & 1 == 0 && f != 0 {
                f >>= 1;
                s >>= 1;
            }
        }
        f >>= 1;
        s >>= 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::chain::merkle_root;

    fn leaves(n: usize) -> Vec<Hash32> {
        (0..n)
            .map(|i| *blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
            .collect()
    }

    #[test]
    fn roots_from_perfect_nodes_match_the_definition() {
        let ls = leaves(200);
        for n in 0..=200u64 {
            let r = root(&mut LeavesSource(&ls), n).unwrap();
            assert_eq!(r, merkle_root(&ls[..n as usize]), "size {n}");
        }
    }

    #[test]
    fn every_inclusion_proof_of_small_trees_verifies_and_has_the_predicted_length() {
        let ls = leaves(70);
        for n in 1..=70u64 {
            let root_n = merkle_root(&ls[..n as usize]);
            for i in 0..n {
                let p = prove_inclusion(&mut LeavesSource(&ls), i, n)
                    .unwrap()
                    .unwrap();
                assert_eq!(p.path.len(), inclusion_len(i, n));
                p.verify(&ls[i as usize], &root_n).unwrap();
                // Another leaf, or the right leaf against another root, fails.
                let other = ls[((i + 1) % n) as usize];
                if n > 1 {
                    assert!(p.verify(&other, &root_n).is_err());
                }
                assert!(p.verify(&ls[i as usize], &[0; 32]).is_err());
            }
        }
    }

    #[test]
    fn every_consistency_proof_of_small_trees_verifies_and_has_the_predicted_length() {
        let ls = leaves(70);
        for n in 0..=70u64 {
            let root_n = merkle_root(&ls[..n as usize]);
            for m in 0..=n {
                let root_m = merkle_root(&ls[..m as usize]);
                let p = prove_consistency(&mut LeavesSource(&ls), m, n)
                    .unwrap()
                    .unwrap();
                assert_eq!(p.path.len(), consistency_len(m, n), "{m} {n}");
                p.verify(&root_m, &root_n).unwrap();
                if m > 0 && m < n {
                    assert!(p.verify(&root_n, &root_n).is_err(), "{m} {n}");
                    assert!(p.verify(&root_m, &root_m).is_err(), "{m} {n}");
                }
            }
        }
    }

    #[test]
    fn rfc_9162_shapes_for_a_seven_leaf_tree() {
        // RFC 9162 section 2.1.5: the tree of leaves d0..d6 and its examples.
        let ls = leaves(7);
        let l = |i: usize| leaf_hash(&ls[i]);
        let (a, b, c, d) = (
            node_hash(&l(0), &l(1)),
            node_hash(&l(2), &l(3)),
            node_hash(&l(4), &l(5)),
            l(6),
        );
        let (g, h) = (node_hash(&a, &b), node_hash(&c, &d));
        let mut src = LeavesSource(&ls);
        // Inclusion of d0 in the 7-leaf tree: [b(leaf 1), h(2,3), i(4..7)].
        assert_eq!(
            prove_inclusion(&mut src, 0, 7).unwrap().unwrap().path,
            vec![l(1), b, h]
        );
        // Consistency between sizes 3 and 7: [c(leaf 2), d(leaf 3), a(0,1), i(4..7)].
        assert_eq!(
            prove_consistency(&mut src, 3, 7).unwrap().unwrap().path,
            vec![l(2), l(3), a, h]
        );
        // Between 4 and 7: [i(4..7)]; between 6 and 7: [i(4,5), j(6), g(0..4)].
        assert_eq!(
            prove_consistency(&mut src, 4, 7).unwrap().unwrap().path,
            vec![h]
        );
        assert_eq!(
            prove_consistency(&mut src, 6, 7).unwrap().unwrap().path,
            vec![c, d, g]
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_bad_input() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(parse_hex::<4>("0001ABff"), Some(b));
        assert_eq!(parse_hex::<4>("0001abf"), None);
        assert_eq!(parse_hex::<4>("0001abfg"), None);
        assert_eq!(parse_hex::<2>("é1"), None);
    }
}
