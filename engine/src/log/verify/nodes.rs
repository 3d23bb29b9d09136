//! Verify's check of the Merkle node file (`merkle.tree`) against the records: every stored
//! node within the records checked must equal the root of its perfect subtree as the
//! records give it. The node file is derived data, and open trusts the nodes that reproduce
//! the latest checkpoint's root, so a node that differs is a finding, not a detail.

use std::path::{Path, PathBuf};

use super::super::background::corrupt;
use crate::error::{Error, Result};
use crate::format::Hash32;
use crate::format::proof::hex;
use crate::format::tree::{CHUNK_LEVEL, TREE_HEADER_LEN, TREE_NODE_LEN, decode_header, node_index};

/// The node file as verify found it when it started.
pub(super) struct NodeFile {
    path: PathBuf,
    file: Option<Box<dyn crate::sys::FsFile>>,
    /// Nodes in the file when verify started (more may be written beside a live writer;
    /// those are checked by a later run).
    count: u64,
}

impl NodeFile {
    /// Opens `merkle.tree` for reading. A file that is missing, or whose header does not
    /// decode or names another log, holds no node any reader uses (open recomputes it), so
    /// there is nothing to check.
    pub(super) fn open(fs: &crate::Storage, dir: &Path, log_id: &[u8; 16]) -> Result<NodeFile> {
        let path = dir.join(super::super::tree::TREE_FILE);
        let none = |path: PathBuf| NodeFile {
            path,
            file: None,
            count: 0,
        };
        let file = match fs.open(&path, crate::sys::OpenMode::Read) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(none(path)),
            Err(e) => return Err(Error::io("opening Merkle node file", &path)(e)),
        };
        let len = file
            .len()
            .map_err(Error::io("reading Merkle node file", &path))?;
        let mut header = [0u8; TREE_HEADER_LEN];
        if len < TREE_HEADER_LEN as u64
            || file.read_exact_at(&mut header, 0).is_err()
            || decode_header(&header).ok() != Some(*log_id)
        {
            return Ok(none(path));
        }
        Ok(NodeFile {
            path,
            file: Some(file),
            count: (len - TREE_HEADER_LEN as u64) / TREE_NODE_LEN as u64,
        })
    }

    /// Checks subtrees the records give, `(level, index, root)`, against their stored nodes
    /// (those at the chunk level or above that the file holds). Returns how many were
    /// compared. The nodes of one segment sit close together in the file, so they are read
    /// in one piece.
    pub(super) fn check(&self, made: &[(u32, u64, Hash32)]) -> Result<u64> {
        let Some(file) = &self.file else {
            return Ok(0);
        };
        let stored: Vec<(u64, &Hash32)> = made
            .iter()
            .filter(|(level, _, _)| *level >= CHUNK_LEVEL)
            .map(|(level, j, h)| (node_index(level - CHUNK_LEVEL, *j), h))
            .filter(|(i, _)| *i < self.count)
            .collect();
        let (Some(lo), Some(hi)) = (
            stored.iter().map(|(i, _)| *i).min(),
            stored.iter().map(|(i, _)| *i).max(),
        ) else {
            return Ok(0);
        };
        let offset = |i: u64| TREE_HEADER_LEN as u64 + i * TREE_NODE_LEN as u64;
        let mut buf = vec![0u8; ((hi - lo + 1) as usize) * TREE_NODE_LEN];
        file.read_exact_at(&mut buf, offset(lo))
            .map_err(Error::io("reading Merkle node file", &self.path))?;
        for (i, want) in &stored {
            let at = ((i - lo) as usize) * TREE_NODE_LEN;
            let found = &buf[at..at + TREE_NODE_LEN];
            if found != want.as_slice() {
                return Err(corrupt(
                    &self.path,
                    offset(*i),
                    None,
                    format!(
                        "stored Merkle node {i} is {} but the records give {}",
                        hex(found),
                        hex(*want)
                    ),
                    None,
                ));
            }
        }
        Ok(stored.len() as u64)
    }
}
