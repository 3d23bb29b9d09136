//! `tally.cosignatures`: witnesses' cosignatures of the log's checkpoints, kept beside them
//! (docs/FORMAT.md, "Cosignatures"). The file only grows, by whole entries appended under
//! an exclusive lock on the file itself, so that tallyd, a witness observing the
//! directory, and `tally` can add to it at once. A cosignature is accepted only if it
//! verifies over the note body of the checkpoint it names; the file is evidence for
//! verifiers, who decide which witnesses they trust, and is never trusted by the writer.

use std::path::Path;

use crate::Storage;
use crate::error::{Error, Result};
use crate::format::DecodeError;
use crate::format::checkpoint::SignedCheckpoint;
use crate::format::note::{COSIGNATURE_ENTRY_LEN, Cosignature, CosignatureEntry, checkpoint_body};
use crate::sys::OpenMode;

/// The cosignatures file's name in the data directory.
pub use crate::format::files::COSIGNATURES_FILE;

/// The most cosignatures of one checkpoint the file takes (and a note carries): far more
/// witnesses than any log has, and few enough that a note with the log's own signatures
/// stays within a note's signature limit whatever a client sends.
pub const COSIGNATURES_PER_CHECKPOINT_MAX: usize = 16;

/// Every entry of the file, in order: decoded, or why not, with its byte offset. A torn
/// last entry (an interrupted append) is left out.
pub(crate) fn read(
    fs: &Storage,
    dir: &Path,
) -> Result<Vec<(u64, std::result::Result<CosignatureEntry, DecodeError>)>> {
    let path = dir.join(COSIGNATURES_FILE);
    let bytes = match fs.read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading cosignatures file", &path)(e)),
    };
    Ok(bytes
        .chunks_exact(COSIGNATURE_ENTRY_LEN)
        .enumerate()
        .map(|(i, e)| {
            (
                (i * COSIGNATURE_ENTRY_LEN) as u64,
                CosignatureEntry::decode(e),
            )
        })
        .collect())
}

/// Adds a witness's cosignature of `cp`, after checking it over the checkpoint's note body.
/// Returns `false` when the file already holds a cosignature of that checkpoint by the same
/// key (nothing is written).
///
/// # Errors
/// [`Error::InvalidOptions`] when the cosignature does not verify, the witness name is
/// not a valid key name, or the checkpoint has [`COSIGNATURES_PER_CHECKPOINT_MAX`]
/// cosignatures already; I/O errors.
pub(crate) fn add(
    fs: &Storage,
    dir: &Path,
    cp: &SignedCheckpoint,
    cosig: &Cosignature,
) -> Result<bool> {
    if !crate::format::note::valid_key_name(&cosig.name) {
        return Err(Error::InvalidOptions {
            reason: format!("witness name {:?} is not a valid key name", cosig.name),
        });
    }
    cosig
        .verify(&checkpoint_body(&cp.statement))
        .map_err(|e| Error::InvalidOptions {
            reason: format!(
                "the cosignature by {} of checkpoint {} does not verify: {e}",
                cosig.name, cp.statement.id
            ),
        })?;
    let path = dir.join(COSIGNATURES_FILE);
    let file = fs
        .open(&path, OpenMode::Create)
        .map_err(Error::io("opening cosignatures file", &path))?;
    file.lock()
        .map_err(Error::io("locking cosignatures file", &path))?;
    let len = file
        .len()
        .map_err(Error::io("reading cosignatures file", &path))?;
    // A torn last entry (an append interrupted by a crash) is cut off, so that entries stay
    // aligned.
    let whole = len - len % COSIGNATURE_ENTRY_LEN as u64;
    if whole != len {
        file.set_len(whole)
            .map_err(Error::io("truncating cosignatures file", &path))?;
    }
    let mut keys = Vec::new();
    for (_, e) in read(fs, dir)? {
        if let Ok(e) = e
            && e.checkpoint_id == cp.statement.id
            && !keys.contains(&e.cosignature.public_key)
        {
            keys.push(e.cosignature.public_key);
        }
    }
    if keys.contains(&cosig.public_key) {
        return Ok(false);
    }
    if keys.len() >= COSIGNATURES_PER_CHECKPOINT_MAX {
        return Err(Error::InvalidOptions {
            reason: format!(
                "checkpoint {} has {COSIGNATURES_PER_CHECKPOINT_MAX} cosignatures already, the most it keeps",
                cp.statement.id
            ),
        });
    }
    let entry = CosignatureEntry {
        checkpoint_id: cp.statement.id,
        tree_size: cp.statement.tree_size,
        root: cp.statement.root,
        cosignature: cosig.clone(),
    };
    file.write_all_at(&entry.encode(), whole)
        .and_then(|()| file.sync_data())
        .map_err(Error::io("writing cosignatures file", &path))?;
    if whole == 0 {
        fs.sync_dir(dir)
            .map_err(Error::io("syncing directory", dir))?;
    }
    drop(file);
    Ok(true)
}

/// The cosignatures of checkpoint `cp` in the file that verify over its note body, one
/// per key, at most [`COSIGNATURES_PER_CHECKPOINT_MAX`] (the first in the file), so that a
/// note of them always parses.
pub(crate) fn of(fs: &Storage, dir: &Path, cp: &SignedCheckpoint) -> Result<Vec<Cosignature>> {
    let body = checkpoint_body(&cp.statement);
    let mut out: Vec<Cosignature> = Vec::new();
    for c in read(fs, dir)?
        .into_iter()
        .filter_map(|(_, e)| e.ok())
        .filter(|e| e.checkpoint_id == cp.statement.id)
        .map(|e| e.cosignature)
    {
        if out.len() == COSIGNATURES_PER_CHECKPOINT_MAX {
            break;
        }
        if !out.iter().any(|o| o.public_key == c.public_key) && c.verify(&body).is_ok() {
            out.push(c);
        }
    }
    Ok(out)
}
