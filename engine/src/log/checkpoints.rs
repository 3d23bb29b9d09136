//! Signed checkpoints: the signing key, the checkpoints file, and making a checkpoint
//! (docs/FORMAT.md, "Checkpoints").

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::shared::Shared;
use super::tree::Tree;
use crate::Storage;
use crate::error::{Error, Result};
use crate::format::checkpoint::{
    SignedCheckpoint, Statement, decode_secret_key, encode_secret_key, entry_len,
};
use crate::format::{DecodeError, Position};
use crate::sys::{FsFile, OpenMode};

/// The checkpoints file's name in the data directory.
pub use crate::format::files::CHECKPOINTS_FILE;
/// The signing key's default file name in the data directory.
pub use crate::format::files::KEY_FILE;

/// The checkpoints of a log and the key that signs new ones.
#[derive(Debug)]
pub(crate) struct Checkpoints {
    path: PathBuf,
    /// `None` for a read-only log.
    file: Option<Box<dyn FsFile>>,
    pub(crate) list: Vec<SignedCheckpoint>,
    /// A damaged entry found on open in a read-only log: `(byte offset, cause)`.
    pub(crate) damage: Option<(u64, DecodeError)>,
    /// Where a damaged last entry (an interrupted write) was cut off on open.
    pub(crate) truncated_at: Option<u64>,
    key: Option<SigningKey>,
    /// The signing key's file, whose ledger is updated after each checkpoint (a writable
    /// log only).
    pub(crate) key_path: Option<PathBuf>,
}

/// Reads the signing key from `path`, creating it (mode 0600) when it does not exist and
/// `create` is set.
pub(crate) fn load_or_create_key(
    fs: &Storage,
    path: &Path,
    create: bool,
) -> Result<Option<SigningKey>> {
    match fs.read_to_string(path) {
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
            create_key_file(fs, path).map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io {
            op: "reading signing key file",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Creates a new signing key file at `path` (mode 0600, never overwriting a file) and
/// returns the key. The key is written and synced under a temporary name and linked into
/// place, and the directory is synced, so that a power cut leaves either no key file or a
/// whole one (never an empty or half-written key that the next open would refuse).
pub(crate) fn create_key_file(fs: &Storage, path: &Path) -> Result<SigningKey> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| Error::Io {
        op: "generating a signing key",
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let key = SigningKey::from_bytes(&seed);
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if fs.exists(path) {
        return Err(Error::io("creating signing key file", path)(
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        ));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(crate::format::files::TEMP_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let _ = fs.remove_file(&tmp);
    let written = fs
        .open(&tmp, OpenMode::CreateNew { private: true })
        .and_then(|f| {
            f.write_all_at(encode_secret_key(&key).as_bytes(), 0)?;
            f.sync_all()
        })
        .and_then(|()| fs.hard_link(&tmp, path));
    let _ = fs.remove_file(&tmp);
    written.map_err(Error::io("creating signing key file", path))?;
    fs.sync_dir(parent)
        .map_err(Error::io("syncing directory", parent))?;
    Ok(key)
}

impl Checkpoints {
    /// Signs `message` with the log's checkpoint key: the signature and the public key,
    /// `None` for a log without one (read-only).
    pub(crate) fn sign(&self, message: &[u8]) -> Option<([u8; 64], [u8; 32])> {
        use ed25519_dalek::Signer as _;
        let key = self.key.as_ref()?;
        Some((key.sign(message).to_bytes(), key.verifying_key().to_bytes()))
    }

    /// No checkpoints and no key (replaced by [`Checkpoints::open`] on open).
    pub(crate) fn empty() -> Checkpoints {
        Checkpoints {
            path: PathBuf::new(),
            file: None,
            list: Vec::new(),
            damage: None,
            truncated_at: None,
            key: None,
            key_path: None,
        }
    }

    /// Reads the checkpoints file as a read-only open must: before the segments, so that
    /// every checkpoint it holds was signed over records that the scan after it will find
    /// (a checkpoint is written only after its records are durable). Beside a live writer
    /// a last entry that does not decode may be a write in progress: the file is read
    /// again, for up to a second, until it decodes; if it never does, the damage stays
    /// and `verify` reports it.
    pub(crate) fn read_for_view(
        fs: &Storage,
        dir: &Path,
        meta: &crate::format::meta::LogMeta,
        live: bool,
    ) -> Result<Vec<u8>> {
        let entry_len = crate::format::checkpoint::entry_len(meta.layout.statement_version());
        let log_id = &meta.log_id;
        let path = dir.join(CHECKPOINTS_FILE);
        let mut tries = 0;
        loop {
            let bytes = match fs.read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(Error::io("reading checkpoints file", &path)(e)),
            };
            let last_ok = bytes.len().is_multiple_of(entry_len)
                && bytes.chunks_exact(entry_len).next_back().is_none_or(|e| {
                    SignedCheckpoint::decode_entry(e).is_ok_and(|c| c.statement.log_id == *log_id)
                });
            tries += 1;
            if !live || last_ok || tries >= 50 {
                return Ok(bytes);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Loads the checkpoints file (or, for a read-only open, the bytes
    /// [`Checkpoints::read_for_view`] read before the segments). A damaged last entry of a
    /// writable log that the key's ledger does not record (`recorded`: the last id it
    /// records for this log) is an interrupted or failed write, never acknowledged, and is
    /// cut off; one the ledger records was acknowledged, and refuses the open; damage
    /// anywhere else refuses the open of a writable log and is kept for `verify` in a
    /// read-only one. Nothing is ever left out: a checkpoint that covers more records than
    /// the log holds is kept, and `verify` fails on it.
    pub(crate) fn open(
        shared: &Shared,
        key: Option<SigningKey>,
        read_before: Option<Vec<u8>>,
        recorded: Option<u64>,
    ) -> Result<Checkpoints> {
        let path = shared.dir.join(CHECKPOINTS_FILE);
        let file = if shared.read_only {
            None
        } else {
            let created = !shared.fs().exists(&path);
            let file = shared
                .fs()
                .open(&path, OpenMode::Create)
                .map_err(Error::io("opening checkpoints file", &path))?;
            // A file created here is durable before the log accepts appends: a checkpoint
            // written into it later syncs its data, not its name.
            if created {
                shared
                    .fs()
                    .sync_dir(&shared.dir)
                    .map_err(Error::io("syncing directory", &shared.dir))?;
            }
            Some(file)
        };
        let bytes = match read_before {
            Some(b) => b,
            None => match shared.fs().read(&path) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(Error::io("reading checkpoints file", &path)(e)),
            },
        };
        let entry_len =
            crate::format::checkpoint::entry_len(shared.meta.layout.statement_version());
        let mut list = Vec::new();
        let mut damage = None;
        let mut truncated_at = None;
        let mut offset = 0usize;
        while offset < bytes.len() {
            let entry = &bytes[offset..bytes.len().min(offset + entry_len)];
            let decoded = SignedCheckpoint::decode_entry(entry).and_then(|cp| {
                let s = &cp.statement;
                let expected_id = list.len() as u64 + 1;
                let prev_size = list.last().map_or(0, |p: &SignedCheckpoint| p.statement.tree_size);
                if s.log_id != shared.meta.log_id
                    || s.version() != shared.meta.layout.statement_version()
                    || s.id != expected_id
                    || s.tree_size < prev_size
                {
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
            offset += entry_len;
        }
        if let Some((at, cause)) = &damage
            && let Some(f) = &file
        {
            let last = (*at as usize) + entry_len >= bytes.len();
            let id = *at / entry_len as u64 + 1;
            if last && recorded.is_some_and(|r| r >= id) {
                return Err(Error::Corrupt {
                    file: path,
                    offset: *at,
                    position: None,
                    detail: format!(
                        "checkpoint {id}, the last, is damaged, but the signing key's ledger says it was signed and stored: it is not an interrupted write, so it is not cut off and its id is not given to another checkpoint"
                    ),
                    source: Some(cause.clone()),
                });
            }
            if last {
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
        Ok(Checkpoints {
            path,
            file,
            list,
            damage,
            truncated_at,
            key,
            key_path: None,
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
                offset: ((self.list.len() - 1) * entry_len(shared.meta.layout.statement_version()))
                    as u64,
                position: Some(size),
                detail: format!(
                    "checkpoint {} covers {} records but the log has {size}: records were removed",
                    last.statement.id, last.statement.tree_size
                ),
                source: None,
            });
        }
        // The records a checkpoint signed must still be the records it signed: a history
        // rewritten below the last checkpoint (every checksum, link and derived file
        // recomputed, the checkpoints file put back) must not be signed over by the next
        // routine checkpoint with the real key.
        if let Some(last) = self.list.last()
            && last.statement.tree_size > 0
            && crate::format::proof::root(&mut tree.source(shared), last.statement.tree_size)?
                != last.statement.root
        {
            return Err(Error::Corrupt {
                file: self.path.clone(),
                offset: ((self.list.len() - 1) * entry_len(shared.meta.layout.statement_version()))
                    as u64,
                position: Some(last.statement.tree_size),
                detail: format!(
                    "the first {} records no longer match checkpoint {}, which signed them: history was changed, so nothing more is signed",
                    last.statement.tree_size, last.statement.id
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
            streams: tree.heads_mut().map(|h| (h.len(), h.root())),
        };
        let cp = SignedCheckpoint::sign(statement, key);
        let first = self.list.is_empty();
        let entry = cp.encode_entry();
        file.write_all_at(&entry, (self.list.len() * entry.len()) as u64)
            .and_then(|()| file.sync_data())
            .map_err(Error::io("writing checkpoints file", &self.path))?;
        if first {
            shared
                .fs()
                .sync_dir(&shared.dir)
                .map_err(Error::io("syncing directory", &shared.dir))?;
        }
        // Durable: the next checkpoint takes the next id (a durable entry is never written
        // over, so a ledger that recorded it always finds it). Published once the ledger
        // has it (with any before it whose ledger update failed), so that no reader or
        // witness sees a checkpoint that an open could still cut off as unrecorded.
        self.list.push(cp);
        if let Some(key_path) = &self.key_path {
            ledger::record(shared.fs(), key_path, &cp)?;
        }
        let mut signed = shared.evidence.signed.write();
        let from = signed.len();
        signed.extend_from_slice(&self.list[from..]);
        Ok(cp)
    }
}

/// Makes a checkpoint of every acknowledged record: syncs them, brings the tree up to
/// them, and signs. Lock order: checkpoints, then tree, then the write path's locks.
pub(crate) fn checkpoint(shared: &Shared, force: bool) -> Result<SignedCheckpoint> {
    let mut cps = shared.evidence.checkpoints.lock();
    let mut tree = shared.evidence.tree.lock();
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

/// The key ledger: beside the signing key, the latest checkpoint that key signed for each
/// log (docs/FORMAT.md, "Key ledger"). It lives where the key lives, not in the data
/// directory, so that someone who can rewrite the directory but not the key's location
/// cannot make the writer sign a history after removing checkpoints from
/// `tally.checkpoints` (laundering): a writable open refuses a checkpoints file that ends
/// before, or differs from, what the key signed.
pub(crate) mod ledger {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use crate::Storage;
    use crate::error::{Error, Result};
    use crate::format::Hash32;
    use crate::format::checkpoint::{SignedCheckpoint, entry_len};
    use crate::format::proof::hex;
    use crate::sys::OpenMode;

    /// The first line of a ledger file.
    pub const LEDGER_HEADER: &str = "tally-key-ledger v1";

    /// What the ledger remembers of one log.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Signed {
        pub(crate) id: u64,
        pub(crate) tree_size: u64,
        pub(crate) root: Hash32,
    }

    /// The ledger of the key at `key_path`: `<key file>.ledger`.
    pub(crate) fn path_for(key_path: &Path) -> PathBuf {
        let mut name = key_path.file_name().unwrap_or_default().to_os_string();
        name.push(crate::format::files::KEY_LEDGER_SUFFIX);
        key_path.with_file_name(name)
    }

    fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
        if s.len() != 2 * N {
            return None;
        }
        let mut out = [0u8; N];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    /// Reads a ledger; a missing file is an empty one.
    pub(crate) fn read(fs: &Storage, path: &Path) -> Result<BTreeMap<[u8; 16], Signed>> {
        let text = match fs.read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io("reading key ledger", path)(e)),
        };
        let bad = |line: usize| Error::Corrupt {
            file: path.to_owned(),
            offset: 0,
            position: None,
            detail: format!("key ledger line {line} does not decode"),
            source: None,
        };
        let mut lines = text.lines();
        if lines.next() != Some(LEDGER_HEADER) {
            return Err(bad(1));
        }
        let mut out = BTreeMap::new();
        for (i, line) in lines.enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            let [log_id, id, size, root] = f[..] else {
                return Err(bad(i + 2));
            };
            let entry = (|| {
                Some((
                    unhex::<16>(log_id)?,
                    Signed {
                        id: id.parse().ok()?,
                        tree_size: size.parse().ok()?,
                        root: unhex::<32>(root)?,
                    },
                ))
            })()
            .ok_or_else(|| bad(i + 2))?;
            out.insert(entry.0, entry.1);
        }
        Ok(out)
    }

    /// Checks a log's checkpoints against what its key signed.
    pub(crate) fn check(
        fs: &Storage,
        path: &Path,
        checkpoints_path: &Path,
        log_id: &[u8; 16],
        list: &[SignedCheckpoint],
    ) -> Result<()> {
        let Some(signed) = read(fs, path)?.get(log_id).copied() else {
            return Ok(());
        };
        let fail = |offset: u64, detail: String| Error::Corrupt {
            file: checkpoints_path.to_owned(),
            offset,
            position: Some(signed.tree_size),
            detail,
            source: None,
        };
        let Some(cp) = usize::try_from(signed.id - 1)
            .ok()
            .and_then(|i| list.get(i))
        else {
            return Err(fail(
                list.iter()
                    .map(|c| entry_len(c.statement.version()) as u64)
                    .sum(),
                format!(
                    "checkpoints were removed: the signing key's ledger ({}) says it signed checkpoint {} (tree size {}) of this log, but the checkpoints file ends at checkpoint {}. Restore the file; if this directory was restored from a backup on purpose, history after it was lost and witnesses will see a fork: move the ledger aside to go on",
                    path.display(),
                    signed.id,
                    signed.tree_size,
                    list.len()
                ),
            ));
        };
        if cp.statement.tree_size != signed.tree_size || cp.statement.root != signed.root {
            return Err(fail(
                (signed.id - 1) * entry_len(cp.statement.version()) as u64,
                format!(
                    "checkpoint {} differs from the one the signing key signed (ledger {}): tree size {} root {} on disk, tree size {} root {} signed",
                    signed.id,
                    path.display(),
                    cp.statement.tree_size,
                    hex(&cp.statement.root),
                    signed.tree_size,
                    hex(&signed.root)
                ),
            ));
        }
        Ok(())
    }

    /// Records that the key at `key_path` signed `cp`, replacing its ledger atomically. The
    /// update holds a lock on the key file (which is never replaced), since several logs may
    /// share a key.
    pub(crate) fn record(fs: &Storage, key_path: &Path, cp: &SignedCheckpoint) -> Result<()> {
        let path = &path_for(key_path);
        let lock = fs
            .open(key_path, OpenMode::Read)
            .map_err(Error::io("opening signing key file", key_path))?;
        lock.lock()
            .map_err(Error::io("locking signing key file", key_path))?;
        let mut all = read(fs, path)?;
        all.insert(
            cp.statement.log_id,
            Signed {
                id: cp.statement.id,
                tree_size: cp.statement.tree_size,
                root: cp.statement.root,
            },
        );
        let mut text = String::from(LEDGER_HEADER);
        text.push('\n');
        for (log_id, s) in &all {
            text.push_str(&format!(
                "{} {} {} {}\n",
                hex(log_id),
                s.id,
                s.tree_size,
                hex(&s.root)
            ));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        fs.write_file_atomic(dir, &name, text.as_bytes(), false)
            .map_err(Error::io("writing key ledger", path))
    }
}
