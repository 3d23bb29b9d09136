//! A witness (docs/FORMAT.md, "Witness state"): an independent party, another team or
//! another host, that remembers the newest checkpoint it has seen of each log it watches,
//! accepts a newer one only with a consistency proof from it, and cosigns it with its own
//! Ed25519 key (c2sp.org/tlog-cosignature). A log that rolls back, forks, or signs two
//! different checkpoints for one size or one id (equivocation) is refused, and the
//! conflicting signed note is kept as evidence.
//!
//! The witness reads nothing of the log's directory: it is handed a checkpoint note and asks
//! for consistency proofs, whether from a data directory (`tally witness observe --data`)
//! or from tallyd (`--server`). It trusts only its own state directory and the log keys
//! registered in it.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use crate::error::{Error, Result};
use crate::format::Hash32;
use crate::format::checkpoint::{
    SignedCheckpoint, decode_secret_key, encode_public_key, parse_public_keys,
};
use crate::format::note::{
    Cosignature, Note, NoteError, WitnessKey, checkpoint_from_note, checkpoint_note, valid_key_name,
};
use crate::format::proof::{ConsistencyProof, hex, parse_hex};

pub use crate::format::files::{
    WITNESS_EVIDENCE_DIR as EVIDENCE_DIR, WITNESS_HISTORY_FILE as HISTORY_FILE, WITNESS_KEY_FILE,
    WITNESS_LATEST_FILE as LATEST_FILE, WITNESS_LOG_KEYS_FILE as LOG_KEYS_FILE,
    WITNESS_LOGS_DIR as LOGS_DIR, WITNESS_VKEY_FILE,
};

/// A checkpoint as the witness remembers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Checkpoint id.
    pub id: u64,
    /// Tree size.
    pub tree_size: u64,
    /// Merkle root.
    pub root: Hash32,
}

impl Seen {
    fn of(cp: &SignedCheckpoint) -> Seen {
        Seen {
            id: cp.statement.id,
            tree_size: cp.statement.tree_size,
            root: cp.statement.root,
        }
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {} (tree size {}, root {})",
            self.id,
            self.tree_size,
            hex(&self.root)
        )
    }
}

/// Two checkpoints of one log that cannot both be true.
#[derive(Debug)]
pub struct Conflict {
    /// The log's origin.
    pub log: String,
    /// What the witness cosigned.
    pub seen: Seen,
    /// What the log offers now.
    pub offered: Seen,
    /// Which rule the offered one breaks.
    pub why: String,
    /// Where the offered signed note was kept.
    pub evidence: PathBuf,
}

/// Why a witness refused a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitnessError {
    /// The log offers a checkpoint older than one the witness cosigned.
    #[error(
        "log {} rolled back: the witness cosigned {}, and the log now offers {} (evidence kept in {})",
        .0.log, .0.seen, .0.offered, .0.evidence.display()
    )]
    Rollback(Box<Conflict>),
    /// The log signed two different checkpoints for one id or one tree size, or one that
    /// does not extend what the witness cosigned.
    #[error(
        "log {} equivocated (forked): the witness cosigned {}, and the log now offers {}, {} (evidence kept in {})",
        .0.log, .0.seen, .0.offered, .0.why, .0.evidence.display()
    )]
    Equivocation(Box<Conflict>),
    /// The log is not registered with this witness.
    #[error("log {log} is not registered with this witness (tally witness register)")]
    UnknownLog {
        /// The log's origin.
        log: String,
    },
    /// The note is not a checkpoint signed by a registered key of the log.
    #[error(transparent)]
    Note(#[from] NoteError),
    /// A file of the witness, or the source of checkpoints and proofs, failed.
    #[error(transparent)]
    Engine(#[from] Error),
}

/// What an observation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// A newer checkpoint was verified and cosigned.
    Cosigned {
        /// The checkpoint cosigned before it, if any.
        previous: Option<Seen>,
        /// The checkpoint.
        checkpoint: SignedCheckpoint,
        /// The cosignature, to hand back to the log.
        cosignature: Cosignature,
    },
    /// The log offers the checkpoint the witness cosigned last; its cosignature is given
    /// again.
    Unchanged {
        /// The checkpoint.
        checkpoint: SignedCheckpoint,
        /// The cosignature made when it was first seen.
        cosignature: Cosignature,
    },
}

/// A witness and its state directory.
#[derive(Debug)]
pub struct Witness {
    /// Where its files are (the operating system's, or a simulated disk in tests).
    fs: crate::Storage,
    dir: PathBuf,
    key: SigningKey,
    name: String,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(op, path)
}

fn corrupt(path: &Path, detail: String) -> Error {
    Error::Corrupt {
        file: path.to_owned(),
        offset: 0,
        position: None,
        detail,
        source: None,
    }
}

impl Witness {
    /// Creates a witness in `dir` (which must not hold one): a new key (mode 0600) and
    /// its public key as a vkey named `name`.
    ///
    /// # Errors
    /// [`Error::InvalidOptions`] for a name that is not a valid key name; I/O errors, or a
    /// key that exists already.
    pub fn init(dir: &Path, name: &str) -> Result<Witness> {
        Witness::init_in(crate::Storage::os(), dir, name)
    }

    /// [`Witness::init`] on `fs`.
    ///
    /// # Errors
    /// As [`Witness::init`].
    pub fn init_in(fs: crate::Storage, dir: &Path, name: &str) -> Result<Witness> {
        if !valid_key_name(name) {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "witness name {name:?}: at most 64 bytes, no spaces, no '+' (a schema-less URL such as witness.example/w1)"
                ),
            });
        }
        fs.create_dir_all(&dir.join(LOGS_DIR))
            .map_err(io("creating witness directory", dir))?;
        let key_path = dir.join(WITNESS_KEY_FILE);
        let key = crate::log::create_key_file(&fs, &key_path)?;
        let w = Witness {
            fs,
            dir: dir.to_owned(),
            key,
            name: name.to_owned(),
        };
        let vkey = format!("{}\n", w.key().encode());
        w.fs.write_file_atomic(dir, WITNESS_VKEY_FILE, vkey.as_bytes(), false)
            .map_err(io("writing witness key", &dir.join(WITNESS_VKEY_FILE)))?;
        Ok(w)
    }

    /// Opens the witness in `dir`.
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] for key files that do not decode or do not match.
    pub fn open(dir: &Path) -> Result<Witness> {
        Witness::open_in(crate::Storage::os(), dir)
    }

    /// [`Witness::open`] on `fs`.
    ///
    /// # Errors
    /// As [`Witness::open`].
    pub fn open_in(fs: crate::Storage, dir: &Path) -> Result<Witness> {
        let key_path = dir.join(WITNESS_KEY_FILE);
        let text = fs
            .read_to_string(&key_path)
            .map_err(io("reading witness key", &key_path))?;
        let key = decode_secret_key(&text)
            .map_err(|e| corrupt(&key_path, format!("witness key file: {e}")))?;
        let vkey_path = dir.join(WITNESS_VKEY_FILE);
        let vtext = fs
            .read_to_string(&vkey_path)
            .map_err(io("reading witness key", &vkey_path))?;
        let public = WitnessKey::parse(vtext.trim())
            .map_err(|e| corrupt(&vkey_path, format!("witness vkey: {e}")))?;
        if public.public_key != key.verifying_key().to_bytes() {
            return Err(corrupt(
                &vkey_path,
                "the vkey is not the public half of witness.key".into(),
            ));
        }
        Ok(Witness {
            fs,
            dir: dir.to_owned(),
            key,
            name: public.name,
        })
    }

    /// The witness's public key.
    #[must_use]
    pub fn key(&self) -> WitnessKey {
        WitnessKey {
            name: self.name.clone(),
            public_key: self.key.verifying_key().to_bytes(),
        }
    }

    fn log_dir(&self, log_id: &[u8; 16]) -> PathBuf {
        self.dir.join(LOGS_DIR).join(hex(log_id))
    }

    /// Registers a log: the keys that sign its checkpoints (added to those registered
    /// before). Its first observation after that is trusted as the start of its history.
    ///
    /// # Errors
    /// I/O errors.
    pub fn register(&self, log_id: &[u8; 16], log_keys: &[[u8; 32]]) -> Result<()> {
        let dir = self.log_dir(log_id);
        self.fs
            .create_dir_all(&dir)
            .map_err(io("creating witness log directory", &dir))?;
        let mut keys = self.log_keys(log_id)?.unwrap_or_default();
        for k in log_keys {
            if !keys.contains(k) {
                keys.push(*k);
            }
        }
        let text: String = keys.iter().map(encode_public_key).collect();
        self.fs
            .write_file_atomic(&dir, LOG_KEYS_FILE, text.as_bytes(), false)
            .map_err(io("writing log keys", &dir.join(LOG_KEYS_FILE)))
    }

    /// The keys registered for a log, or `None` when it is not registered.
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] for a key file that does not decode.
    pub fn log_keys(&self, log_id: &[u8; 16]) -> Result<Option<Vec<[u8; 32]>>> {
        let path = self.log_dir(log_id).join(LOG_KEYS_FILE);
        match self.fs.read_to_string(&path) {
            Ok(t) => parse_public_keys(&t)
                .map(Some)
                .map_err(|e| corrupt(&path, format!("log keys: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading log keys", &path)(e)),
        }
    }

    /// The newest checkpoint the witness cosigned of a log, as a signed note with its
    /// cosignature.
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] when the file does not parse.
    pub fn latest(&self, log_id: &[u8; 16]) -> Result<Option<Note>> {
        let path = self.log_dir(log_id).join(LATEST_FILE);
        match self.fs.read_to_string(&path) {
            Ok(t) => Note::parse(&t)
                .map(Some)
                .map_err(|e| corrupt(&path, format!("latest note: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading latest note", &path)(e)),
        }
    }

    /// Every checkpoint the witness cosigned of a log, oldest first.
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] for a line that does not decode.
    pub fn history(&self, log_id: &[u8; 16]) -> Result<Vec<Seen>> {
        Ok(self
            .history_lines(log_id)?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    /// The history with each checkpoint's time (nanoseconds), oldest first.
    fn history_lines(&self, log_id: &[u8; 16]) -> Result<Vec<(Seen, u64)>> {
        let path = self.log_dir(log_id).join(HISTORY_FILE);
        let text = match self.fs.read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("reading witness history", &path)(e)),
        };
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            let seen = match f[..] {
                [id, size, root, time] => (|| {
                    Some((
                        Seen {
                            id: id.parse().ok()?,
                            tree_size: size.parse().ok()?,
                            root: parse_hex::<32>(root)?,
                        },
                        time.parse().ok()?,
                    ))
                })(),
                _ => None,
            };
            // A torn last line (an interrupted append) is not part of the history.
            match seen {
                Some(s) => out.push(s),
                None if n + 1 == text.lines().count() && !text.ends_with('\n') => {}
                None => {
                    return Err(corrupt(
                        &path,
                        format!("witness history line {} does not decode", n + 1),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Observes a log's checkpoint: checks it is signed by a registered key, that it does
    /// not conflict with any checkpoint cosigned before, and (through `prove`, which gives
    /// the log's consistency proof between two tree sizes) that it extends the newest one;
    /// then cosigns it and remembers it.
    ///
    /// # Errors
    /// [`WitnessError`]: rollback and equivocation keep the offered note as evidence.
    pub fn observe(
        &self,
        note: &Note,
        prove: &mut dyn FnMut(u64, u64) -> Result<ConsistencyProof>,
    ) -> std::result::Result<Observation, WitnessError> {
        let statement = crate::format::note::parse_checkpoint_body(&note.body)?;
        let log = crate::format::note::origin(&statement.log_id);
        let Some(keys) = self.log_keys(&statement.log_id)? else {
            return Err(WitnessError::UnknownLog { log });
        };
        let dir = self.log_dir(&statement.log_id);
        // One observer at a time per log: the key file is never replaced.
        let lock = self
            .fs
            .open(&dir.join(LOG_KEYS_FILE), crate::sys::OpenMode::Read)
            .map_err(io("opening log keys", &dir.join(LOG_KEYS_FILE)))?;
        lock.lock()
            .map_err(io("locking witness log directory", &dir))?;
        let cp = checkpoint_from_note(note, &keys)?;
        let offered = Seen::of(&cp);
        let lines = self.history_lines(&statement.log_id)?;
        let history: Vec<Seen> = lines.iter().map(|(s, _)| *s).collect();
        let latest = history.last().copied();
        // The observation of the newest history line was cut short after its line and
        // before its note (power cut): finishing it writes the note, not another line.
        let mut finishing = false;
        let conflict =
            |seen: Seen, why: String| -> std::result::Result<Observation, WitnessError> {
                Err(WitnessError::Equivocation(Box::new(Conflict {
                    log: log.clone(),
                    seen,
                    offered,
                    why,
                    evidence: self.keep_evidence(&dir, note)?,
                })))
            };
        if let Some(same_id) = history.iter().find(|s| s.id == offered.id)
            && *same_id != offered
        {
            return conflict(
                *same_id,
                format!("a different checkpoint under id {}", offered.id),
            );
        }
        if let Some(same_size) = history
            .iter()
            .find(|s| s.tree_size == offered.tree_size && s.root != offered.root)
        {
            return conflict(
                *same_size,
                format!("a different root for tree size {}", offered.tree_size),
            );
        }
        if let Some(seen) = latest {
            if offered.tree_size >= seen.tree_size && offered.id < seen.id {
                return conflict(
                    seen,
                    format!(
                        "whose id is below {}, although its tree is not smaller: checkpoints after {} were removed and signed again",
                        seen.id,
                        offered.id.saturating_sub(1)
                    ),
                );
            }
            if offered.tree_size < seen.tree_size {
                return Err(WitnessError::Rollback(Box::new(Conflict {
                    log,
                    seen,
                    offered,
                    why: "an older checkpoint".into(),
                    evidence: self.keep_evidence(&dir, note)?,
                })));
            }
            let prev = if offered == seen {
                self.latest(&statement.log_id)?
            } else {
                None
            };
            let prev_id = prev
                .as_ref()
                .and_then(|p| crate::format::note::parse_checkpoint_body(&p.body).ok())
                .map(|st| st.id);
            if offered == seen && prev_id != Some(offered.id) {
                // The latest note lags the history: this checkpoint's observation stopped
                // between the two. The same statement (its time is on the line) is finished;
                // another one under the same id, size and root is a second statement.
                if lines.last().map(|(_, t)| *t) != Some(cp.statement.time.0) {
                    return conflict(
                        seen,
                        format!(
                            "a different statement under id {} for the same tree size and root",
                            offered.id
                        ),
                    );
                }
                finishing = true;
            } else if let Some(prev) = prev {
                // Same id, size and root, but another time, chain head or streams root:
                // two signed statements for one checkpoint.
                if prev.body != note.body {
                    return conflict(
                        seen,
                        format!(
                            "a different statement under id {} for the same tree size and root",
                            offered.id
                        ),
                    );
                }
                if let Some(c) = Cosignature::in_note(&prev, &[self.key()]).pop() {
                    return Ok(Observation::Unchanged {
                        checkpoint: cp,
                        cosignature: c,
                    });
                }
            }
            if offered.tree_size > seen.tree_size {
                let proof = prove(seen.tree_size, offered.tree_size)?;
                let ok = proof.old_size == seen.tree_size
                    && proof.new_size == offered.tree_size
                    && proof.verify(&seen.root, &offered.root).is_ok();
                if !ok {
                    return conflict(
                        seen,
                        format!(
                            "which does not extend it: no valid consistency proof from tree size {} to {}",
                            seen.tree_size, offered.tree_size
                        ),
                    );
                }
            }
        }
        let timestamp = crate::log::now().0 / 1_000_000_000;
        let cosignature = Cosignature::sign(
            &self.key,
            &self.name,
            timestamp,
            &crate::format::note::checkpoint_body(&cp.statement),
        );
        // The history first (synced), then the latest note: a crash between them leaves a
        // history that already refuses anything conflicting with the new checkpoint.
        let hist = dir.join(HISTORY_FILE);
        if !finishing {
            append_history_line(
                &self.fs,
                &hist,
                &format!(
                    "{} {} {} {}\n",
                    offered.id,
                    offered.tree_size,
                    hex(&offered.root),
                    cp.statement.time.0
                ),
            )?;
        }
        let latest_note = checkpoint_note(&cp, std::slice::from_ref(&cosignature)).encode();
        self.fs
            .write_file_atomic(&dir, LATEST_FILE, latest_note.as_bytes(), false)
            .map_err(io("writing latest note", &dir.join(LATEST_FILE)))?;
        Ok(Observation::Cosigned {
            previous: if finishing {
                history.iter().rev().nth(1).copied()
            } else {
                latest
            },
            checkpoint: cp,
            cosignature,
        })
    }

    /// Keeps a conflicting note as evidence; returns its path.
    fn keep_evidence(&self, dir: &Path, note: &Note) -> Result<PathBuf> {
        let ev = dir.join(EVIDENCE_DIR);
        self.fs
            .create_dir_all(&ev)
            .map_err(io("creating evidence directory", &ev))?;
        let text = note.encode();
        let name = format!(
            "{}.note",
            hex(&blake3::hash(text.as_bytes()).as_bytes()[..8])
        );
        let path = ev.join(&name);
        // Written atomically and durably (its name too): evidence of a fork or a rollback
        // must survive the power cut that may follow it.
        self.fs
            .write_file_atomic(&ev, &name, text.as_bytes(), false)
            .map_err(io("writing evidence", &path))?;
        Ok(path)
    }
}

/// Appends one whole line to a witness history and syncs it. A torn last line (an append
/// a crash interrupted, which [`Witness::history`] leaves out) is cut off first, so the new
/// line never joins it; the line is written in one call.
fn append_history_line(fs: &crate::Storage, path: &Path, line: &str) -> Result<()> {
    let created = !fs.exists(path);
    let f = fs
        .open(path, crate::sys::OpenMode::Create)
        .map_err(io("opening witness history", path))?;
    // A history created here is a durable name before its first line is relied on.
    if created && let Some(dir) = path.parent() {
        fs.sync_dir(dir)
            .map_err(io("syncing witness log directory", dir))?;
    }
    let bytes = fs.read(path).map_err(io("reading witness history", path))?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole != bytes.len() {
        f.set_len(whole as u64)
            .map_err(io("cutting a torn witness history line", path))?;
    }
    f.write_all_at(line.as_bytes(), whole as u64)
        .and_then(|()| f.sync_data())
        .map_err(io("writing witness history", path))
}
