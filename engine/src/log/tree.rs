//! The log's Merkle tree: the node file kept up to date behind the appends, and the node
//! source proofs are built from (docs/FORMAT.md, "Merkle node file").
//!
//! Appends never wait for it: the tree catches up from the records when a checkpoint or a
//! proof needs it, reading only records it has not seen. Nodes are written to the node file
//! as they complete and synced before a checkpoint that covers them is written; on open,
//! the nodes up to the latest checkpoint are checked against that checkpoint's root, and
//! anything after it is recomputed from the records.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use super::read::{Verify, scan_range};
use super::shared::Shared;
use crate::error::{Error, Result};
use crate::format::chain::{merkle_root, node_hash};
use crate::format::proof::NodeSource;
use crate::format::tree::{
    CHUNK_LEAVES, CHUNK_LEVEL, TREE_HEADER_LEN, TREE_NODE_LEN, chunks_for_nodes, decode_header,
    encode_header, node_index, nodes_for_chunks,
};
use crate::format::{Hash32, Position};
use crate::sys::OpenMode;

/// The node file's name in the data directory.
pub use crate::format::files::TREE_FILE;

/// The tree over the first `size()` records.
#[derive(Debug)]
pub(crate) struct Tree {
    path: PathBuf,
    /// The node file, when there is one.
    file: Option<Box<dyn crate::sys::FsFile>>,
    /// Whether new nodes are written to the file (a read-only log keeps them in memory).
    writable: bool,
    /// Nodes in the file that belong to the tree.
    on_disk: u64,
    /// Nodes after those, not yet written.
    pending: Vec<Hash32>,
    /// Complete chunks.
    chunks: u64,
    /// Record hashes of the incomplete chunk.
    partial: Vec<Hash32>,
    /// Roots of the perfect subtrees of chunks so far, `(height, root)`, heights decreasing.
    peaks: Vec<(u32, Hash32)>,
    /// The record hash of the last leaf (the chain seed for an empty tree).
    pub(crate) head: Hash32,
    /// Whether the node file was found damaged or out of step and rebuilt on open.
    pub(crate) rebuilt: bool,
    /// Stored nodes of height [`CACHED_HEIGHT`] or more read so far, by node index.
    upper: RefCell<HashMap<u64, Hash32>>,
    /// Format version 2: the stream heads map (set after open, from the stream table).
    /// With `pending_heads` folded in, it is the map of the first `size()` records: read it
    /// through [`Tree::heads_mut`].
    pub(crate) heads: Option<crate::format::heads::StreamHeads>,
    /// Heads of the streams written since the map was last brought up to date, by stream
    /// id: catching up costs a table update per record, and only a root or a proof pays for
    /// hashing each changed stream once.
    pending_heads: HashMap<Box<[u8]>, (u64, u64)>,
}

/// Stored nodes this many levels above the chunk level or higher are kept in memory once
/// read: they are on the path of nearly every root and proof, and there are few of them
/// (two for every `2^CACHED_HEIGHT` chunks: 128 KiB per million records).
const CACHED_HEIGHT: u32 = 6;

impl Tree {
    /// Leaves in the tree.
    pub(crate) fn size(&self) -> u64 {
        self.chunks * CHUNK_LEAVES + self.partial.len() as u64
    }

    /// The stored root of the `index`-th perfect subtree of `2^height` chunks.
    fn node_at(&self, height: u32, index: u64) -> Result<Hash32> {
        let i = node_index(height, index);
        if height < CACHED_HEIGHT || i >= self.on_disk {
            return self.node(i);
        }
        if let Some(h) = self.upper.borrow().get(&i) {
            return Ok(*h);
        }
        let h = self.node(i)?;
        self.upper.borrow_mut().insert(i, h);
        Ok(h)
    }

    fn node(&self, i: u64) -> Result<Hash32> {
        if i >= self.on_disk {
            return self
                .pending
                .get((i - self.on_disk) as usize)
                .copied()
                .ok_or_else(|| self.corrupt(i, "node beyond the end of the tree"));
        }
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| self.corrupt(i, "no file"))?;
        let mut h = [0u8; 32];
        file.read_exact_at(&mut h, TREE_HEADER_LEN as u64 + i * TREE_NODE_LEN as u64)
            .map_err(Error::io("reading Merkle node file", &self.path))?;
        Ok(h)
    }

    fn corrupt(&self, node: u64, what: &str) -> Error {
        Error::Corrupt {
            file: self.path.clone(),
            offset: TREE_HEADER_LEN as u64 + node * TREE_NODE_LEN as u64,
            position: None,
            detail: what.into(),
            source: None,
        }
    }

    fn push_node(&mut self, h: Hash32) {
        self.pending.push(h);
    }

    fn push_chunk(&mut self, root: Hash32) {
        self.push_node(root);
        let mut node = (0u32, root);
        while let Some(&(height, left)) = self.peaks.last() {
            if height != node.0 {
                break;
            }
            self.peaks.pop();
            node = (height + 1, node_hash(&left, &node.1));
            self.push_node(node.1);
        }
        self.peaks.push(node);
        self.chunks += 1;
    }

    fn push_leaf(&mut self, record_hash: &Hash32) {
        self.partial.push(*record_hash);
        self.head = *record_hash;
        if self.partial.len() as u64 == CHUNK_LEAVES {
            let root = merkle_root(&self.partial);
            self.partial.clear();
            self.push_chunk(root);
        }
    }

    /// Writes pending nodes to the file (nothing for a read-only log).
    fn write_pending(&mut self) -> Result<()> {
        let (Some(file), true) = (&self.file, self.writable) else {
            return Ok(());
        };
        if self.pending.is_empty() {
            return Ok(());
        }
        let bytes: Vec<u8> = self.pending.iter().flatten().copied().collect();
        file.write_all_at(
            &bytes,
            TREE_HEADER_LEN as u64 + self.on_disk * TREE_NODE_LEN as u64,
        )
        .map_err(Error::io("writing Merkle node file", &self.path))?;
        self.on_disk += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Makes the nodes written so far durable.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.write_pending()?;
        if let (Some(file), true) = (&self.file, self.writable) {
            file.sync_data()
                .map_err(Error::io("syncing Merkle node file", &self.path))?;
        }
        Ok(())
    }

    /// Adds the visible records from `size()` up to `to`.
    pub(crate) fn catch_up(&mut self, shared: &Shared, to: Position) -> Result<()> {
        let from = Position(self.size());
        if to > from {
            scan_range(shared, from, to, Verify::Checksums, &mut |r| {
                self.push_leaf(r.record_hash);
                if self.heads.is_some()
                    && let Some(stream) = r.stream_bytes()
                {
                    let head = (r.stream_version, r.position.0);
                    match self.pending_heads.get_mut(stream) {
                        Some(h) => *h = head,
                        None => {
                            self.pending_heads.insert(stream.into(), head);
                        }
                    }
                }
            })?;
            if self.size() < to.0 {
                return Err(Error::Corrupt {
                    file: shared.dir.clone(),
                    offset: 0,
                    position: Some(self.size()),
                    detail: format!("the Merkle tree could not read records up to position {to}"),
                    source: None,
                });
            }
        }
        self.write_pending()
    }

    /// Format version 2: the stream heads map of the first `size()` records.
    pub(crate) fn heads_mut(&mut self) -> Option<&mut crate::format::heads::StreamHeads> {
        let heads = self.heads.as_mut()?;
        for (stream, (version, position)) in self.pending_heads.drain() {
            heads.set(crate::format::heads::stream_key(&stream), version, position);
        }
        Some(heads)
    }

    /// A node source for tree sizes up to `size()`.
    pub(crate) fn source<'a>(&'a self, shared: &'a Shared) -> TreeSource<'a> {
        TreeSource {
            tree: self,
            shared,
            cache: Vec::new(),
        }
    }
}

/// Perfect subtree roots from the node file, and below chunk level from the records.
pub(crate) struct TreeSource<'a> {
    tree: &'a Tree,
    shared: &'a Shared,
    /// Chunks of record hashes read so far: `(chunk, hashes)`.
    cache: Vec<(u64, Vec<Hash32>)>,
}

impl TreeSource<'_> {
    /// The record hash of leaf `index`.
    pub(crate) fn leaf(&mut self, index: u64) -> Result<Hash32> {
        let leaves = self.chunk_leaves(index / CHUNK_LEAVES)?;
        let i = (index % CHUNK_LEAVES) as usize;
        leaves.get(i).copied().ok_or_else(|| Error::Corrupt {
            file: PathBuf::new(),
            offset: 0,
            position: Some(index),
            detail: "leaf beyond the tree".into(),
            source: None,
        })
    }

    fn chunk_leaves(&mut self, chunk: u64) -> Result<&[Hash32]> {
        if chunk == self.tree.chunks {
            return Ok(&self.tree.partial);
        }
        if let Some(i) = self.cache.iter().position(|(c, _)| *c == chunk) {
            return Ok(&self.cache[i].1);
        }
        let mut hashes = Vec::with_capacity(CHUNK_LEAVES as usize);
        let from = Position(chunk * CHUNK_LEAVES);
        scan_range(
            self.shared,
            from,
            Position(from.0 + CHUNK_LEAVES),
            Verify::Checksums,
            &mut |r| hashes.push(*r.record_hash),
        )?;
        if hashes.len() as u64 != CHUNK_LEAVES {
            return Err(Error::Corrupt {
                file: self.shared.dir.clone(),
                offset: 0,
                position: Some(from.0 + hashes.len() as u64),
                detail: "records of a complete Merkle chunk are missing".into(),
                source: None,
            });
        }
        self.cache.push((chunk, hashes));
        Ok(&self.cache.last().expect("pushed").1)
    }
}

impl NodeSource for TreeSource<'_> {
    type Error = Error;
    fn perfect(&mut self, level: u32, index: u64) -> Result<Hash32> {
        if level >= CHUNK_LEVEL {
            let height = level - CHUNK_LEVEL;
            if ((index + 1) << height) > self.tree.chunks {
                return Err(self.tree.corrupt(0, "subtree beyond the tree"));
            }
            return self.tree.node_at(height, index);
        }
        let first = index << level;
        let chunk = first / CHUNK_LEAVES;
        let at = (first % CHUNK_LEAVES) as usize;
        let width = 1usize << level;
        let tree = self.tree;
        let leaves = self.chunk_leaves(chunk)?;
        let slice = leaves
            .get(at..at + width)
            .ok_or_else(|| tree.corrupt(0, "leaves beyond the tree"))?;
        Ok(merkle_root(slice))
    }
}

impl Tree {
    /// An empty tree that is not backed by a file (replaced by [`open_tree`] on open).
    pub(crate) fn empty(shared_seed: Hash32) -> Tree {
        Tree {
            path: PathBuf::new(),
            file: None,
            writable: false,
            on_disk: 0,
            pending: Vec::new(),
            chunks: 0,
            partial: Vec::new(),
            peaks: Vec::new(),
            head: shared_seed,
            rebuilt: false,
            upper: RefCell::new(HashMap::new()),
            heads: None,
            pending_heads: HashMap::new(),
        }
    }
}

/// Opens (or creates) the node file and brings the tree up to the visible records.
/// `trusted` is the latest checkpoint's `(tree_size, root)`: stored nodes are used only if
/// they reproduce it, and only up to it; the rest is recomputed from the records.
pub(crate) fn open_tree(shared: &Shared, trusted: Option<(u64, Hash32)>) -> Result<Tree> {
    let path = shared.dir.join(TREE_FILE);
    let visible = shared.visible_position();
    let mut tree = Tree {
        path: path.clone(),
        writable: !shared.read_only,
        ..Tree::empty(shared.seed)
    };
    let fs = shared.fs();
    let existing = if shared.read_only {
        fs.open(&path, OpenMode::Read).ok()
    } else {
        let created = !fs.exists(&path);
        let file = fs
            .open(&path, OpenMode::Create)
            .map_err(Error::io("opening Merkle node file", &path))?;
        // The node file's name is durable before anything relies on it (its nodes are
        // synced by checkpoints, which sync data, not names).
        if created {
            fs.sync_dir(&shared.dir)
                .map_err(Error::io("syncing directory", &shared.dir))?;
        }
        Some(file)
    };
    let mut stored_nodes = 0;
    if let Some(file) = existing {
        let len = file
            .len()
            .map_err(Error::io("reading Merkle node file", &path))?;
        let mut header = [0u8; TREE_HEADER_LEN];
        let header_ok = len >= TREE_HEADER_LEN as u64
            && file.read_exact_at(&mut header, 0).is_ok()
            && decode_header(&header).is_ok_and(|id| id == shared.meta.log_id);
        if header_ok {
            stored_nodes = (len - TREE_HEADER_LEN as u64) / TREE_NODE_LEN as u64;
        } else if !shared.read_only {
            tree.rebuilt = len > 0;
            file.set_len(0)
                .and_then(|()| file.write_all_at(&encode_header(&shared.meta.log_id), 0))
                .map_err(Error::io("writing Merkle node file", &path))?;
        }
        tree.file = Some(file);
    }
    // Stored nodes are used up to the trusted checkpoint only, and only if they reproduce
    // its root; everything after it is recomputed from the records.
    let usable = match trusted {
        Some((size, _)) if size <= visible.0 => {
            chunks_for_nodes(stored_nodes).min(size / CHUNK_LEAVES)
        }
        _ => 0,
    };
    tree.rebuilt |= stored_nodes > nodes_for_chunks(usable) && trusted.is_none();
    tree.restart(shared, usable)?;
    if let Some((size, root)) = trusted
        && size <= visible.0
    {
        tree.catch_up(shared, Position(size))?;
        if crate::format::proof::root(&mut tree.source(shared), size)? != root {
            tree.rebuilt = true;
            tree.restart(shared, 0)?;
        }
    }
    tree.catch_up(shared, visible)?;
    Ok(tree)
}

impl Tree {
    /// Recomputes the whole node file from the records.
    pub(crate) fn rebuild(&mut self, shared: &Shared) -> Result<()> {
        let size = Position(self.size());
        self.rebuilt = true;
        self.restart(shared, 0)?;
        self.catch_up(shared, size)
    }

    /// Forgets everything after the first `chunks` complete chunks of stored nodes. On any
    /// failure the tree is left empty (nothing kept from the file), so that a later
    /// catch-up starts over from the records.
    fn restart(&mut self, shared: &Shared, chunks: u64) -> Result<()> {
        self.reset(shared.seed, 0, 0);
        let on_disk = nodes_for_chunks(chunks);
        // Cut the file first: after a failure nothing is written after a stale end.
        if !shared.read_only
            && let Some(file) = &self.file
            && let Err(e) = file.set_len(TREE_HEADER_LEN as u64 + on_disk * TREE_NODE_LEN as u64)
        {
            self.writable = false;
            return Err(Error::io("truncating Merkle node file", &self.path)(e));
        }
        self.reset(shared.seed, chunks, on_disk);
        let restored = peaks(self, chunks).and_then(|peaks| {
            let head = match chunks {
                0 => shared.seed,
                _ => *self
                    .source(shared)
                    .chunk_leaves(chunks - 1)?
                    .last()
                    .unwrap_or(&shared.seed),
            };
            Ok((peaks, head))
        });
        match restored {
            Ok((peaks, head)) => {
                self.peaks = peaks;
                self.head = head;
                Ok(())
            }
            Err(e) => {
                self.reset(shared.seed, 0, 0);
                Err(e)
            }
        }
    }

    /// The tree of the first `chunks` chunks, whose `on_disk` nodes are in the file, with
    /// no peaks yet.
    fn reset(&mut self, seed: Hash32, chunks: u64, on_disk: u64) {
        self.on_disk = on_disk;
        self.upper.get_mut().clear();
        self.pending.clear();
        self.chunks = chunks;
        self.partial.clear();
        self.peaks.clear();
        self.head = seed;
    }
}

/// The peaks of the tree of `chunks` complete chunks, read from the stored nodes.
fn peaks(tree: &Tree, chunks: u64) -> Result<Vec<(u32, Hash32)>> {
    let mut out = Vec::new();
    let mut done = 0u64;
    for height in (0..64u32).rev() {
        if chunks & (1 << height) != 0 {
            out.push((height, tree.node_at(height, done >> height)?));
            done += 1 << height;
        }
    }
    Ok(out)
}
