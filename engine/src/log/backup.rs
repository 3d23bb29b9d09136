//! Backups: a copy of the log up to its newest signed checkpoint, made beside appends.
//!
//! Sealed segments are immutable and copied whole with their sidecars; the segment the
//! checkpoint ends in is copied up to the checkpoint's last record; the checkpoints file up
//! to that checkpoint, and the Merkle nodes of the complete chunks it covers. Every file is
//! written through the storage seam, synced, and the new directory synced, so a copy that
//! [`Log::backup_to`] returned is durable. The caller verifies the copy by opening it (a
//! copy whose segments are referenced in a cold store needs that store to open).

use std::collections::BTreeSet;
use std::path::Path;

use crate::error::{Error, Result};
use crate::format::Hash32;
use crate::format::cold::{
    MANIFEST_ENTRY_LEN, MANIFEST_HEADER_LEN, decode_manifest_entry, decode_manifest_header,
};
use crate::format::files::{COLD_MANIFEST_FILE, COLD_STORE_FILE, META_FILE, blob_object_key};
use crate::format::proof::hex;
use crate::format::tree::{CHUNK_LEAVES, TREE_HEADER_LEN, TREE_NODE_LEN, nodes_for_chunks};
use crate::format::{PAGE_BYTES, Position, SegmentSeq};
use crate::log::read::Verify;
use crate::sys::OpenMode;
use crate::{CHECKPOINTS_FILE, KEY_FILE, Log, Storage, TREE_FILE};

/// How a backup handles segments in the cold tier, and blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ColdBackup {
    /// Copy the cold manifest and the store's URL: the copy reads the same objects where
    /// they are. A cold segment the checkpoint does not cover is refused.
    #[default]
    Reference,
    /// Fetch every cold segment into the copy as an ordinary segment file, and every blob
    /// the copied events refer to into a store inside the copy (`blobs-store/`, named by the
    /// copy's `cold.store`), so that the copy needs no other store.
    Copy,
}

/// What [`Log::backup_to`] copies.
#[derive(Clone, Copy, Debug, Default)]
pub struct BackupOptions {
    /// Leave the secret signing key (`tally.key`) out of the copy.
    pub without_key: bool,
    /// Cold segments and blobs.
    pub cold: ColdBackup,
}

/// What [`Log::backup_to`] wrote.
#[derive(Clone, Debug)]
pub struct BackupReport {
    /// The checkpoint the copy ends at: its id, tree size (the copy's record count) and root.
    pub checkpoint_id: u64,
    /// Records in the copy.
    pub records: u64,
    /// Checkpoints in the copy (the source's, up to and including `checkpoint_id`).
    pub checkpoints: u64,
    /// The checkpoint's Merkle root.
    pub root: Hash32,
    /// Segment files written (a cold segment copied by reference is not one).
    pub segment_files: usize,
    /// Cold segments the copy names in its manifest, by reference.
    pub cold_referenced: usize,
    /// Distinct blobs the copied events refer to.
    pub blobs: usize,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(op, path)
}

fn refused(reason: impl Into<String>) -> Error {
    Error::InvalidOptions {
        reason: reason.into(),
    }
}

/// Copies the first `len` bytes of `from` into the new file `to`, of length `file_len`
/// (the rest zero), and syncs it.
fn copy_prefix(
    fs: &Storage,
    from: &Path,
    to: &Path,
    len: u64,
    file_len: u64,
    private: bool,
) -> Result<()> {
    let src = fs.open(from, OpenMode::Read).map_err(io("open", from))?;
    let dst = fs
        .open(to, OpenMode::CreateNew { private })
        .map_err(io("create", to))?;
    dst.set_len(file_len).map_err(io("set_len", to))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = usize::try_from((len - at).min(buf.len() as u64)).unwrap_or(buf.len());
        src.read_exact_at(&mut buf[..n], at)
            .map_err(io("read", from))?;
        dst.write_all_at(&buf[..n], at).map_err(io("write", to))?;
        at += n as u64;
    }
    dst.sync_all().map_err(io("sync", to))
}

/// Copies the whole file `from` to the new file `to`.
fn copy_file(fs: &Storage, from: &Path, to: &Path, private: bool) -> Result<()> {
    let len = fs.file_len(from).map_err(io("stat", from))?;
    copy_prefix(fs, from, to, len, len, private)
}

/// Writes `bytes` to the new file `to` and syncs it.
fn write_new(fs: &Storage, to: &Path, bytes: &[u8]) -> Result<()> {
    let f = fs
        .open(to, OpenMode::CreateNew { private: false })
        .map_err(io("create", to))?;
    f.write_all_at(bytes, 0).map_err(io("write", to))?;
    f.sync_all().map_err(io("sync", to))
}

impl Log {
    /// Copies the log, up to its newest signed checkpoint, into the new directory `dest`
    /// (which must not exist), beside appends: the copy holds exactly the records and
    /// checkpoints up to that checkpoint, the key ledger's evidence, and (with
    /// [`ColdBackup::Reference`]) the cold manifest entries and store URL of the cold
    /// segments it covers. A writer that wants the copy to reach its newest record calls
    /// [`Log::checkpoint`] first.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] when `dest` exists, the log has no checkpoint, or a cold
    /// segment past the checkpoint would have to be referenced; I/O, cold-store and blob
    /// errors as they happen (the partial copy is left for the caller to remove).
    pub fn backup_to(&self, dest: &Path, opts: &BackupOptions) -> Result<BackupReport> {
        let fs = self.shared.fs();
        if fs.exists(dest) {
            return Err(refused(format!("{} already exists", dest.display())));
        }
        let cps = self.checkpoints();
        let cp = cps
            .last()
            .ok_or_else(|| refused("the log has no checkpoint yet"))?;
        let size = cp.statement.tree_size;
        let dir = &self.shared.dir;
        fs.create_dir_all(dest).map_err(io("create", dest))?;
        copy_file(fs, &dir.join(META_FILE), &dest.join(META_FILE), false)?;
        let key = dir.join(KEY_FILE);
        if !opts.without_key && fs.exists(&key) {
            copy_file(fs, &key, &dest.join(KEY_FILE), true)?;
        }
        let cp_len = cps
            .iter()
            .map(|c| crate::format::checkpoint::entry_len(c.statement.version()) as u64)
            .sum();
        copy_prefix(
            fs,
            &dir.join(CHECKPOINTS_FILE),
            &dest.join(CHECKPOINTS_FILE),
            cp_len,
            cp_len,
            false,
        )?;
        // Stored Merkle nodes of the complete chunks the checkpoint covers (derived data: a
        // copy without them rebuilds them).
        let tree = dir.join(TREE_FILE);
        let nodes =
            TREE_HEADER_LEN as u64 + nodes_for_chunks(size / CHUNK_LEAVES) * TREE_NODE_LEN as u64;
        if fs.file_len(&tree).is_ok_and(|l| l >= nodes) {
            copy_prefix(fs, &tree, &dest.join(TREE_FILE), nodes, nodes, false)?;
        }
        let mut segment_files = 0;
        let mut referenced = Vec::new();
        for seg in self.segments() {
            let base = seg.base_position.0;
            if base >= size && base > 0 {
                break;
            }
            let name = seg
                .path
                .file_name()
                .ok_or_else(|| refused("a segment path without a file name"))?;
            let covered = seg.sealed && base + seg.record_count <= size;
            let source = match (&seg.cold, opts.cold) {
                (Some(_), ColdBackup::Copy) => Some(self.segment_file(seg.seq)?),
                (Some(_), ColdBackup::Reference) if covered => None,
                (Some(_), ColdBackup::Reference) => {
                    return Err(refused(format!(
                        "segment {} is cold but not covered by checkpoint {}: copy with a \
                         newer checkpoint",
                        seg.seq, cp.statement.id
                    )));
                }
                (None, _) => Some(seg.path.clone()),
            };
            if covered {
                // Sealed segments are immutable: a plain copy, with the index and the
                // attribute index (both derived). A cold segment by reference: its
                // sidecars, and its manifest entry below.
                match source {
                    Some(src) => {
                        copy_file(fs, &src, &dest.join(name), false)?;
                        segment_files += 1;
                    }
                    None => referenced.push(seg.seq),
                }
                for ext in ["idx", "adx"] {
                    let side = seg.path.with_extension(ext);
                    if fs.exists(&side)
                        && let Some(side_name) = side.file_name()
                    {
                        copy_file(fs, &side, &dest.join(side_name), false)?;
                    }
                }
            } else {
                // The segment the checkpoint ends in: its records up to the checkpoint, the
                // rest of the file zero (a spare's tail).
                let src = source.ok_or_else(|| refused("a cold segment that is not sealed"))?;
                let len = fs.file_len(&src).map_err(io("stat", &src))?;
                let mut end = PAGE_BYTES;
                self.scan_range(seg.base_position, Position(size), Verify::Checksums, |r| {
                    end = r.end;
                })?;
                copy_prefix(fs, &src, &dest.join(name), end, len, false)?;
                segment_files += 1;
            }
        }
        if !referenced.is_empty() {
            copy_cold_references(fs, dir, dest, &referenced)?;
        }
        let blobs = self.copy_blobs(size, dest, opts.cold)?;
        fs.sync_dir(dest).map_err(io("sync", dest))?;
        Ok(BackupReport {
            checkpoint_id: cp.statement.id,
            records: size,
            checkpoints: cps.len() as u64,
            root: cp.statement.root,
            segment_files,
            cold_referenced: referenced.len(),
            blobs,
        })
    }

    /// The blobs the first `size` records refer to. By reference, the store's URL
    /// (`cold.store`) is copied so that the copy reads them where they are; with
    /// [`ColdBackup::Copy`], each is read (and checked against its hash) into
    /// `dest/blobs-store`, which the copy's `cold.store` names. Returns how many distinct
    /// blobs the records refer to.
    fn copy_blobs(&self, size: u64, dest: &Path, cold: ColdBackup) -> Result<usize> {
        let fs = self.shared.fs();
        let mut blobs = BTreeSet::new();
        let mut bad = None;
        self.scan_range(Position(0), Position(size), Verify::Checksums, |r| match r
            .envelope_or_marker()
        {
            Ok(env) => {
                if let Some(b) = env.blob() {
                    blobs.insert((b.hash, b.size));
                }
            }
            Err(e) => {
                bad.get_or_insert((r.position, e));
            }
        })?;
        if let Some((position, e)) = bad {
            return Err(Error::Corrupt {
                file: self.shared.dir.clone(),
                offset: 0,
                position: Some(position.0),
                detail: "the record's envelope does not decode".to_owned(),
                source: Some(e),
            });
        }
        if blobs.is_empty() {
            return Ok(0);
        }
        let to = dest.join(COLD_STORE_FILE);
        match cold {
            ColdBackup::Reference => {
                if !fs.exists(&to) {
                    copy_file(fs, &self.shared.dir.join(COLD_STORE_FILE), &to, false)?;
                }
            }
            ColdBackup::Copy => {
                let root = std::path::absolute(dest.join("blobs-store"))
                    .map_err(io("absolute", &dest.join("blobs-store")))?;
                let log_id = self.log_id();
                for (hash, size) in &blobs {
                    let path = root.join(blob_object_key(&log_id, hash));
                    let bytes = self.read_blob(&crate::format::blob::BlobRef {
                        hash: *hash,
                        size: *size,
                    })?;
                    if let Some(parent) = path.parent() {
                        fs.create_dir_all(parent).map_err(io("create", parent))?;
                    }
                    write_new(fs, &path, &bytes)?;
                }
                let ours = root.join(hex(&log_id));
                for d in [ours.join("blobs"), ours, root.clone()] {
                    fs.sync_dir(&d).map_err(io("sync", &d))?;
                }
                write_new(fs, &to, format!("file://{}\n", root.display()).as_bytes())?;
            }
        }
        Ok(blobs.len())
    }
}

/// Writes the copy's `cold.manifest` (the source's entries of the `referenced` segments, in
/// their order) and copies `cold.store`.
fn copy_cold_references(
    fs: &Storage,
    dir: &Path,
    dest: &Path,
    referenced: &[SegmentSeq],
) -> Result<()> {
    let path = dir.join(COLD_MANIFEST_FILE);
    let bytes = fs.read(&path).map_err(io("read", &path))?;
    decode_manifest_header(&bytes).map_err(|e| Error::Corrupt {
        file: path.clone(),
        offset: 0,
        position: None,
        detail: "the cold manifest's header".to_owned(),
        source: Some(e),
    })?;
    let mut out = bytes[..MANIFEST_HEADER_LEN].to_vec();
    for raw in bytes[MANIFEST_HEADER_LEN..].chunks_exact(MANIFEST_ENTRY_LEN) {
        // A damaged or torn last entry names no segment that is cold (the open refused the
        // log otherwise); it is left out.
        if let Ok(e) = decode_manifest_entry(raw)
            && referenced.contains(&e.seq)
        {
            out.extend_from_slice(raw);
        }
    }
    let kept = (out.len() - MANIFEST_HEADER_LEN) / MANIFEST_ENTRY_LEN;
    if kept != referenced.len() {
        return Err(Error::Corrupt {
            file: path,
            offset: 0,
            position: None,
            detail: format!(
                "names {kept} of the {} cold segments the backup references",
                referenced.len()
            ),
            source: None,
        });
    }
    write_new(fs, &dest.join(COLD_MANIFEST_FILE), &out)?;
    let store = dir.join(COLD_STORE_FILE);
    if fs.exists(&store) {
        copy_file(fs, &store, &dest.join(COLD_STORE_FILE), false)?;
    }
    Ok(())
}
