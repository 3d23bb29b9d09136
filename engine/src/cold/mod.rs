//! The cold tier's object store, as the engine sees it: a small synchronous trait
//! ([`ColdStore`]) with a directory implementation ([`DirStore`]) through the storage seam,
//! and (with the `internals` feature) a store that fails on command ([`FaultyStore`]) for
//! the crash and fault tests.
//!
//! An adapter over the `object_store` crate (its local file system and S3 backends) lives
//! above the engine, which stays synchronous and free of networking; it implements the same
//! trait. Keys are relative paths such as `<log id>/00000000000000000003.cold`
//! ([`crate::format::files::cold_object_key`]).

#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::sys::OpenMode;

#[cfg(feature = "internals")]
mod faulty;
#[cfg(feature = "internals")]
pub use faulty::{FaultyStore, StoreOp};

/// An object store holding cold segments. Every method is blocking; errors are
/// `io::Error`s whose kind is [`io::ErrorKind::NotFound`] for a missing object.
pub trait ColdStore: Send + Sync + fmt::Debug {
    /// Where the store is, as an operator would write it (`file:///path`,
    /// `s3://bucket/prefix`).
    fn url(&self) -> String;
    /// Writes the object `key`, replacing it whole when it exists (never a partial object).
    ///
    /// # Errors
    /// What the store reports.
    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()>;
    /// [`ColdStore::put`] of bytes the caller shares (a large blob): a store that needs an
    /// owned copy for its request (an HTTP body) takes a reference to these instead, so that
    /// they are held in memory once.
    ///
    /// # Errors
    /// What the store reports.
    fn put_shared(&self, key: &str, bytes: &Arc<Vec<u8>>) -> io::Result<()> {
        self.put(key, bytes)
    }
    /// The whole object `key`.
    ///
    /// # Errors
    /// `NotFound` when missing; what the store reports otherwise.
    fn get(&self, key: &str) -> io::Result<Vec<u8>>;
    /// Bytes `range` of the object `key`, exactly.
    ///
    /// # Errors
    /// `NotFound` when missing, `UnexpectedEof` when the object is shorter.
    fn get_range(&self, key: &str, range: Range<u64>) -> io::Result<Vec<u8>>;
    /// The object's length, or `None` when it does not exist.
    ///
    /// # Errors
    /// What the store reports.
    fn head(&self, key: &str) -> io::Result<Option<u64>>;
    /// Removes the object `key` (no error when it does not exist).
    ///
    /// # Errors
    /// What the store reports.
    fn delete(&self, key: &str) -> io::Result<()>;
}

/// A store in a local directory (`file:///path`), reached through the storage seam: the
/// embedded default, and the one the simulated-disk tests use. Objects are written under a
/// temporary name, synced and renamed, so a reader never sees part of one.
#[derive(Debug, Clone)]
pub struct DirStore {
    root: PathBuf,
    fs: crate::Storage,
}

impl DirStore {
    /// A store rooted at `root` (created when missing) on the operating system's disk.
    ///
    /// # Errors
    /// When `root` cannot be created.
    pub fn new(root: impl Into<PathBuf>) -> io::Result<DirStore> {
        DirStore::with_storage(root, crate::Storage::os())
    }

    /// A store rooted at `root` on `fs` (a simulated disk in tests).
    ///
    /// # Errors
    /// When `root` cannot be created.
    pub fn with_storage(root: impl Into<PathBuf>, fs: crate::Storage) -> io::Result<DirStore> {
        let root = root.into();
        fs.create_dir_all(&root)?;
        Ok(DirStore { root, fs })
    }

    /// The store's directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        // Keys are ours (`<hex>/<digits>.cold`); refuse anything that could leave the root.
        let ok = !key.is_empty()
            && key.split('/').all(|part| {
                !part.is_empty()
                    && part != "."
                    && part != ".."
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
            });
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("object key {key:?} is not a relative path of plain names"),
            ));
        }
        Ok(self.root.join(key))
    }
}

impl ColdStore for DirStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(key)?;
        let dir = path.parent().unwrap_or(&self.root).to_owned();
        if !self.fs.exists(&dir) {
            // The new directories' entries are durable before the object is trusted.
            self.fs.create_dir_all(&dir)?;
            let mut at = dir.as_path();
            while let Some(parent) = at.parent() {
                self.fs.sync_dir(parent)?;
                if at == self.root {
                    break;
                }
                at = parent;
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.fs.write_file_atomic(&dir, &name, bytes, false)
    }

    fn get(&self, key: &str) -> io::Result<Vec<u8>> {
        self.fs.read(&self.path(key)?)
    }

    fn get_range(&self, key: &str, range: Range<u64>) -> io::Result<Vec<u8>> {
        let file = self.fs.open(&self.path(key)?, OpenMode::Read)?;
        let len = range
            .end
            .checked_sub(range.start)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "reversed range"))?;
        if range.end > file.len()? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("range {range:?} past the end of object {key}"),
            ));
        }
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }

    fn head(&self, key: &str) -> io::Result<Option<u64>> {
        match self.fs.file_len(&self.path(key)?) {
            Ok(len) => Ok(Some(len)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key)?;
        match self.fs.remove_file(&path) {
            Ok(()) => self.fs.sync_dir(path.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Opens the store a URL names, for the stores the engine itself can reach: `file:///path`
/// (a [`DirStore`]). Other schemes (`s3://`) need a store from above the engine.
///
/// # Errors
/// [`io::ErrorKind::Unsupported`] for another scheme, `InvalidInput` for a malformed URL.
pub fn open_url(url: &str, fs: &crate::Storage) -> io::Result<DirStore> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{url}: a file:// store needs an absolute path (file:///path)"),
            ));
        }
        return DirStore::with_storage(path, fs.clone());
    }
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{url}: the engine opens only file:// stores; s3:// stores come from tally or tallyd"
        ),
    ))
}

/// Retries `op` on errors other than `NotFound` and `InvalidInput`, `attempts` times in
/// all, waiting `first_wait` and then four times longer before each new attempt.
pub(crate) fn with_retries<T>(
    attempts: u32,
    first_wait: Duration,
    mut op: impl FnMut() -> io::Result<T>,
) -> io::Result<T> {
    let mut wait = first_wait;
    let mut tries = 0;
    loop {
        tries += 1;
        match op() {
            Ok(v) => return Ok(v),
            Err(e)
                if tries < attempts
                    && !matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::InvalidInput
                    ) =>
            {
                std::thread::sleep(wait);
                wait = wait.saturating_mul(4);
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_store_keeps_objects_whole_and_refuses_keys_that_leave_it() {
        let dir = std::env::temp_dir().join(format!(
            "tally-dirstore-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let store = DirStore::new(&dir).expect("store");
        store.put("ab/1.cold", b"hello world").expect("put");
        assert_eq!(store.get("ab/1.cold").expect("get"), b"hello world");
        assert_eq!(
            store.get_range("ab/1.cold", 6..11).expect("range"),
            b"world"
        );
        assert_eq!(
            store.get_range("ab/1.cold", 6..12).map_err(|e| e.kind()),
            Err(io::ErrorKind::UnexpectedEof)
        );
        assert_eq!(store.head("ab/1.cold").expect("head"), Some(11));
        assert_eq!(store.head("ab/2.cold").expect("head"), None);
        assert_eq!(
            store.get("ab/2.cold").map_err(|e| e.kind()),
            Err(io::ErrorKind::NotFound)
        );
        for bad in ["../x", "/etc/passwd", "a//b", "a/./b", "", "a b"] {
            assert_eq!(
                store.put(bad, b"x").map_err(|e| e.kind()),
                Err(io::ErrorKind::InvalidInput),
                "{bad}"
            );
        }
        store.delete("ab/1.cold").expect("delete");
        store.delete("ab/1.cold").expect("delete again");
        assert_eq!(store.head("ab/1.cold").expect("head"), None);
        assert!(store.url().starts_with("file:///"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn retries_stop_at_the_limit_and_never_retry_a_missing_object() {
        let mut calls = 0;
        let r: io::Result<()> = with_retries(3, Duration::ZERO, || {
            calls += 1;
            Err(io::Error::other("down"))
        });
        assert!(r.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let r: io::Result<()> = with_retries(3, Duration::ZERO, || {
            calls += 1;
            Err(io::Error::from(io::ErrorKind::NotFound))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
        let mut calls = 0;
        let r = with_retries(3, Duration::ZERO, || {
            calls += 1;
            if calls < 2 {
                Err(io::Error::other("blip"))
            } else {
                Ok(7)
            }
        });
        assert_eq!(r.expect("second try"), 7);
    }
}
