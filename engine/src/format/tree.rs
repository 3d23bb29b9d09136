//! The Merkle node file `merkle.tree` (docs/FORMAT.md, "Merkle node file").
//!
//! It keeps the roots of the perfect subtrees of the log's Merkle tree whose size is at
//! least [`CHUNK_LEAVES`] records, so that roots and proofs for any tree size need only
//! O(log n) stored nodes plus at most a few chunks of record hashes read from the segments.
//! Nodes are stored in post-order (a Merkle mountain range over chunk roots): the file only
//! ever grows at its end, and the place of every node is a formula.
//!
//! The file is derived data: it is rebuilt from the records whenever it cannot be trusted,
//! and it never needs to be right for a proof to be safe (a proof is checked against a
//! signed root by whoever relies on it).

use super::{DecodeError, check_crc, check_magic, check_version, check_zero, le, need};

/// Magic of the node file.
pub const TREE_MAGIC: &[u8; 8] = b"TALLYMT1";
/// Bytes of the header; nodes follow it.
pub const TREE_HEADER_LEN: usize = 64;
/// Bytes per stored node.
pub const TREE_NODE_LEN: usize = 32;
/// Subtrees at this level (`2^CHUNK_LEVEL` leaves) and above are stored.
pub const CHUNK_LEVEL: u32 = 4;
/// Leaves under one stored chunk root.
pub const CHUNK_LEAVES: u64 = 1 << CHUNK_LEVEL;
/// `format_version` (u16).
pub const TH_VERSION: usize = 8;
/// `chunk_level` (u16).
pub const TH_CHUNK_LEVEL: usize = 10;
/// 4 reserved bytes.
pub const TH_RESERVED_A: usize = 12;
/// `log_id` (16 bytes).
pub const TH_LOG_ID: usize = 16;
/// 28 reserved bytes.
pub const TH_RESERVED_B: usize = 32;
/// `header_crc`: CRC-32 of bytes `0..60`.
pub const TH_CRC: usize = 60;
const _: () = assert!(TH_CRC + 4 == TREE_HEADER_LEN);

/// Encodes the header of the node file of log `log_id`.
#[must_use]
pub fn encode_header(log_id: &[u8; 16]) -> [u8; TREE_HEADER_LEN] {
    let mut b = [0u8; TREE_HEADER_LEN];
    b[..8].copy_from_slice(TREE_MAGIC);
    le::put_u16(&mut b, TH_VERSION, super::STRUCTURE_VERSION);
    le::put_u16(&mut b, TH_CHUNK_LEVEL, CHUNK_LEVEL as u16);
    b[TH_LOG_ID..TH_LOG_ID + 16].copy_from_slice(log_id);
    let crc = crc32fast::hash(&b[..TH_CRC]);
    le::put_u32(&mut b, TH_CRC, crc);
    b
}

/// Decodes a node file header, returning the log id it names.
///
/// # Errors
/// [`DecodeError`] on a wrong length, magic, version, CRC or chunk level.
pub fn decode_header(b: &[u8]) -> Result<[u8; 16], DecodeError> {
    need(b, TREE_HEADER_LEN)?;
    check_magic(b, TREE_MAGIC, "Merkle node file")?;
    check_crc(
        le::u32_at(b, TH_CRC),
        &b[..TH_CRC],
        "Merkle node file header",
    )?;
    check_version(le::u16_at(b, TH_VERSION), "Merkle node file")?;
    let level = le::u16_at(b, TH_CHUNK_LEVEL);
    if u32::from(level) != CHUNK_LEVEL {
        return Err(DecodeError::Invalid {
            what: "Merkle node file chunk level",
            detail: level.to_string(),
        });
    }
    check_zero(b, TH_RESERVED_A..TH_LOG_ID, "Merkle node file header")?;
    check_zero(b, TH_RESERVED_B..TH_CRC, "Merkle node file header")?;
    Ok(le::array_at(b, TH_LOG_ID))
}

/// Nodes stored once `chunks` chunk roots have been added: `2 * chunks - popcount(chunks)`.
#[must_use]
pub fn nodes_for_chunks(chunks: u64) -> u64 {
    2 * chunks - u64::from(chunks.count_ones())
}

/// The largest chunk count whose nodes fit in `nodes` stored nodes.
#[must_use]
pub fn chunks_for_nodes(nodes: u64) -> u64 {
    // nodes_for_chunks is increasing and at least `chunks`: search `0..=nodes`.
    let (mut lo, mut hi) = (0u64, nodes);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if nodes_for_chunks(mid) <= nodes {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Index in the node file of the root of the perfect subtree over chunks
/// `index * 2^height .. (index + 1) * 2^height` (`height` 0 is a chunk root).
#[must_use]
pub fn node_index(height: u32, index: u64) -> u64 {
    let last_chunk = ((index + 1) << height) - 1;
    nodes_for_chunks(last_chunk) + u64::from(height)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_positions_follow_post_order() {
        // Chunks c0 c1 -> p(0,1); c2 c3 -> p(2,3) -> p(0..4); c4 ...
        let order = [
            (0, 0),
            (0, 1),
            (1, 0),
            (0, 2),
            (0, 3),
            (1, 1),
            (2, 0),
            (0, 4),
        ];
        for (i, (h, n)) in order.iter().enumerate() {
            assert_eq!(node_index(*h, *n), i as u64, "({h}, {n})");
        }
        for chunks in 0..1000 {
            let nodes = nodes_for_chunks(chunks);
            assert_eq!(chunks_for_nodes(nodes), chunks);
            if chunks > 0 {
                // The last chunk's highest completed node is the last stored one.
                let h = chunks.trailing_zeros();
                assert_eq!(node_index(h, (chunks >> h) - 1), nodes - 1);
            }
        }
        assert_eq!(chunks_for_nodes(2), 1);
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let h = encode_header(&[3; 16]);
        assert_eq!(decode_header(&h), Ok([3; 16]));
        for i in 0..TREE_HEADER_LEN {
            let mut b = h;
            b[i] ^= 0x10;
            assert!(decode_header(&b).is_err(), "byte {i}");
        }
    }
}
