//! Signed checkpoints: the signing key, the checkpoints file, and making a checkpoint
//! (docs/FORMAT.md, "Checkpoints").

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::shared::{Shared, lock};
use super::tree::Tree;
use crate::error::{Error, Result};
use crate::format::checkpoint::{
    ENTRY_LEN, SignedCheckpoint, Statement, decode_secret_key, encode_secret_key,
};
use crate::format::{DecodeError, Position};
use crate::sys::sync_dir;

/// The checkpoints file's name in the data directory.
pub const CHECKPOINTS_FILE: &str = "tally.checkpoints";
/// The signing key's default file name in the data directory.
pub const KEY_FILE: &str = "tally.key";

/// The checkpoints of a log and the key that signs new ones.
#[derive(Debug)]
pub(crate) struct Checkpoints {
    path: PathBuf,
    /// `None` for a read-only log.
    file: Option<File>,
    pub(crate) list: Vec<SignedCheckpoint>,
    /// A damaged entry found on open in a read-only log: `(byte offset, cause)`.
    pub(crate) damage: Option<(u64, DecodeError)>,
    /// Where a damaged last entry (an interrupted write) was cut off on open.
    pub(crate) truncated_at: Option<u64>,
    key: Option<SigningKey>,
}

/// Reads the signing key from `path`, creating it (mode 0600) when it does not exist and
/// `create` is set.
pub(crate) fn load_or_create_key(path: &Path, create: bool) -> Result<Option<SigningKey>> {
    match std::fs::read_to_string(path) {
        Ok(text) => decode_secret_key(&text)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                file: path.to_owned(),
                offset: 0,
                position: None,
                detail: "signing key file".into(),
                source: Some(e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            create_key_file(path).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            op: "reading signing key file",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Creates a new signing key file at `path` (mode 0600, synced, never overwriting a file)
/// and returns the key.
pub(crate) fn create_key_file(path: &Path) -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Io {
        op: "generating a signing key",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let key = SigningKey::from_bytes(&seed);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(Error::io("creating signing key file", path))?;
    f.write_all(encode_secret_key(&key).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(Error::io("writing signing key file", path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent).map_err(Error::io("syncing directory", parent))?;
    }
    Ok(key)
}

impl Checkpoints {
    /// No checkpoints and no key (replaced by [`Checkpoints::open`] on open).
    pub(crate) fn empty() -> Checkpoints {
        Checkpoints {
            path: PathBuf::new(),
            file: None,
            list: Vec::new(),
            damage: None,
            truncated_at: None,
            key: None,
        }
    }

    /// Loads the checkpoints file. A damaged last entry of a writable log is an interrupted
    /// write (never acknowledged) and is cut off; damage anywhere else refuses the open of a
    /// writable log and is kept for `verify` in a read-only one.
    /// With `newer_than`, checkpoints of larger trees are left out (written by a live log
    /// after this read-only view of it was taken).
    pub(crate) fn open(
        shared: &Shared,
        key: Option<SigningKey>,
        newer_than: Option<u64>,
    ) -> Result<Checkpoints> {
        let path = shared.dir.join(CHECKPOINTS_FILE);
        let file = if shared.read_only {
            None
        } else {
            Some(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(Error::io("opening checkpoints file", &path))?,
            )
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io("reading checkpoints file", &path)(e)),
        };
        let mut list = Vec::new();
        let mut damage = None;
        let mut truncated_at = None;
        let mut offset = 0usize;
        while offset < bytes.len() {
            let entry = &bytes[offset..bytes.len().min(offset + ENTRY_LEN)];
            let decoded = SignedCheckpoint::decode_entry(entry).and_then(|cp| {
                let s = &cp.statement;
                let expected_id = list.len() as u64 + 1;
                let prev_size = list.last().map_or(0, |p: &SignedCheckpoint| p.statement.tree_size);
                if s.log_id != shared.meta.log_id || s.id != expected_id || s.tree_size < prev_size {
                    return Err(DecodeError::Invalid {
                        what: "checkpoint",
                        detail: format!(
                            "checkpoint {} (size {}) does not follow checkpoint {} (size {prev_size}) of this log",
                            s.id, s.tree_size, expected_id - 1
                        ),
                    });
                }
                Ok(cp)
            });
            match decoded {
                Ok(cp) => list.push(cp),
                Err(e) => {
                    damage = Some((offset as u64, e));
                    break;
                }
            }
            offset += ENTRY_LEN;
        }
        if let Some((at, cause)) = &damage
            && let Some(f) = &file
        {
            if (*at as usize) + ENTRY_LEN >= bytes.len() {
                f.set_len(*at)
                    .and_then(|()| f.sync_all())
                    .map_err(Error::io("truncating checkpoints file", &path))?;
                truncated_at = Some(*at);
                damage = None;
            } else {
                return Err(Error::Corrupt {
                    file: path,
                    offset: *at,
                    position: None,
                    detail: "damaged checkpoint before the last one".into(),
                    source: Some(cause.clone()),
                });
            }
        }
        if let Some(limit) = newer_than {
            // A last entry being written as it was read is not damage either.
            let in_progress = |at: u64| at as usize + ENTRY_LEN >= bytes.len();
            if damage.as_ref().is_some_and(|(at, _)| in_progress(*at)) {
                damage = None;
            }
            list.retain(|c| c.statement.tree_size <= limit);
        }
        Ok(Checkpoints {
            path,
            file,
            list,
            damage,
            truncated_at,
            key,
        })
    }

    /// The signing key's public half.
    pub(crate) fn public_key(&self) -> Option<[u8; 32]> {
        self.key.as_ref().map(|k| k.verifying_key().to_bytes())
    }

    /// Signs and durably stores a checkpoint of the first `tree.size()` records.
    pub(crate) fn make(&mut self, shared: &Shared, tree: &mut Tree) -> Result<SignedCheckpoint> {
        let (Some(file), Some(key)) = (&self.file, &self.key) else {
            return Err(Error::ReadOnly);
        };
        let size = tree.size();
        // A log shorter than a checkpoint it signed lost records (or was truncated on
        // purpose): a smaller checkpoint would hide that, and the next open would take it
        // for a torn entry.
        if let Some(last) = self.list.last()
            && last.statement.tree_size > size
        {
            return Err(Error::Corrupt {
                file: self.path.clone(),
                offset: ((self.list.len() - 1) * ENTRY_LEN) as u64,
                position: Some(size),
                detail: format!(
                    "checkpoint {} covers {} records but the log has {size}: records were removed",
                    last.statement.id, last.statement.tree_size
                ),
                source: None,
            });
        }
        let root = crate::format::proof::root(&mut tree.source(shared), size)?;
        // Every node the checkpoint's root depends on is on disk before the checkpoint is.
        tree.sync()?;
        let statement = Statement {
            log_id: shared.meta.log_id,
            id: self.list.len() as u64 + 1,
            tree_size: size,
            time: super::now(),
            root,
            chain_head: tree.head,
        };
        let cp = SignedCheckpoint::sign(statement, key);
        let first = self.list.is_empty();
        file.write_all_at(&cp.encode_entry(), (self.list.len() * ENTRY_LEN) as u64)
            .and_then(|()| file.sync_data())
            .map_err(Error::io("writing checkpoints file", &self.path))?;
        if first {
            sync_dir(&shared.dir).map_err(Error::io("syncing directory", &shared.dir))?;
        }
        self.list.push(cp);
        Ok(cp)
    }
}

/// Makes a checkpoint of every acknowledged record: syncs them, brings the tree up to
/// them, and signs. Lock order: checkpoints, then tree, then the write path's locks.
pub(crate) fn checkpoint(shared: &Shared, force: bool) -> Result<SignedCheckpoint> {
    let mut cps = lock(&shared.checkpoints);
    let mut tree = lock(&shared.tree);
    let upto = shared.visible_position();
    // A checkpoint covers only durable records: one that a crash could take back would
    // make the log look tampered with.
    shared.sync_all()?;
    tree.catch_up(shared, upto)?;
    if !force
        && let Some(last) = cps.list.last()
        && last.statement.tree_size == upto.0
        && upto == Position(tree.size())
    {
        return Ok(*last);
    }
    cps.make(shared, &mut tree)
}
