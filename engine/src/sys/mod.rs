//! The storage seam: every file and directory operation of the engine, and the operating
//! system's other specifics (memory maps, preallocation, thread priority).
//!
//! The log reaches the disk only through a [`Storage`], a handle to a [`Fs`] backend: the
//! operating system's ([`os`]) by default, or, for tests and fuzz targets, a simulated disk
//! that keeps written and durable bytes apart and can lose power ([`sim`], behind the
//! `internals` feature). Nothing in `log/` opens, syncs, renames or removes a file itself.
//!
//! This is the only module of the engine allowed to use `unsafe` (memory maps and
//! syscalls); everything it exports is safe to call.
//!
//! Memory-map contract (docs/FORMAT.md, "Assumptions about the disk and the OS"):
//! - A map never extends past the end of its file, and no file that is mapped is ever
//!   shortened (shortening a mapped file turns the next access into SIGBUS). Tally never
//!   truncates segment files; recovery zeroes torn bytes with `pwrite` before mapping.
//! - Only one process writes a data directory (the advisory lock in `tally.lock`).
//! - A [`SegmentMap`] hands out `&[u8]` only below its published watermark; its single
//!   [`MapWriter`] writes only at or above it. Published bytes are never written again.

#![allow(unsafe_code)]

mod map;
pub(crate) mod os;
#[cfg(feature = "internals")]
pub mod sim;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

pub use map::{MapRegion, ReadOnlyMap};
pub(crate) use map::{MapWriter, SegmentMap};

/// How [`Fs::open`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// An existing file, for reading.
    Read,
    /// An existing file, for reading and writing.
    ReadWrite,
    /// For reading and writing, created empty when missing, kept when present.
    Create,
    /// A new file for reading and writing; fails when the name exists. `private`: mode
    /// 0600 (secret keys).
    CreateNew { private: bool },
    /// For writing, created when missing, emptied when present.
    Truncate { private: bool },
}

/// What a non-blocking lock attempt found.
#[derive(Debug)]
pub enum TryLock {
    Acquired,
    WouldBlock,
}

/// An open file. Positional reads and writes only (no cursor), so that one handle can be
/// shared by threads.
pub trait FsFile: Send + Sync + fmt::Debug {
    /// The file's length.
    fn len(&self) -> io::Result<u64>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the file when needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Sets the length (shortens or extends with zeros). Never on a mapped file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the data and the length durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the data and all metadata durable (`fsync`).
    fn sync_all(&self) -> io::Result<()>;
    /// Makes sure every block of the first `len` bytes is allocated (`fallocate` without
    /// changing data), so that a store through a map never meets a hole on a full disk
    /// (SIGBUS): a file restored from a backup as a sparse file. A no-op on blocks already
    /// allocated and where the file system has no `fallocate`.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Maps the first `len` bytes, shared: stores reach the file, and `sync_range` makes
    /// them durable. `writable` false maps for reading only.
    fn map(&self, len: u64, writable: bool) -> io::Result<Box<dyn MapRegion>>;
    /// Maps the whole of an immutable file for reading.
    fn map_immutable(&self) -> io::Result<ReadOnlyMap>;
    /// Takes the file's advisory lock without waiting: exclusive, or shared.
    fn try_lock(&self, exclusive: bool) -> io::Result<TryLock>;
    /// Takes the file's exclusive advisory lock, waiting for it. Released when the handle
    /// is dropped.
    fn lock(&self) -> io::Result<()>;
}

/// A file system: the operating system's, or a simulated one.
pub trait Fs: Send + Sync + fmt::Debug {
    /// Opens `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>>;
    /// The length of the file at `path`.
    fn file_len(&self, path: &Path) -> io::Result<u64>;
    /// Whether `path` names a file or directory.
    fn exists(&self, path: &Path) -> bool;
    /// Removes the file at `path` (durable once its directory is synced).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, replacing `to` (durable once the directory is synced).
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Gives the file at `from` the second name `to`; fails when `to` exists.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates `path` and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names in the directory `path`.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>>;
    /// Makes the creation, rename and removal of `path`'s entries durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates `path` (which must not exist) with `len` zero bytes written, then syncs it.
    fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>>;
    /// Creates `path` (which must not exist) with `len` bytes reserved without writing
    /// them where the file system can, then syncs it.
    fn create_allocated(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>>;
}

/// Where a log keeps its files: the operating system's file system (the default), or a
/// simulated disk for tests ([`sim::SimFs`], with the `internals` feature).
#[derive(Clone)]
pub struct Storage(Arc<dyn Fs>);

impl Storage {
    /// The operating system's file system.
    pub fn os() -> Storage {
        Storage(Arc::new(os::OsFs))
    }

    /// A simulated disk, shared with `sim` (which controls faults and power cuts), for one
    /// process: after the next power cut every operation through it fails.
    #[cfg(feature = "internals")]
    pub fn simulated(sim: &sim::SimFs) -> Storage {
        Storage(Arc::new(sim.process_view()))
    }

    /// Reads the whole file at `path`.
    pub(crate) fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let file = self.0.open(path, OpenMode::Read)?;
        let len = usize::try_from(file.len()?)
            .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, 0)?;
        Ok(buf)
    }

    /// Reads the whole file at `path` as UTF-8.
    pub(crate) fn read_to_string(&self, path: &Path) -> io::Result<String> {
        String::from_utf8(self.read(path)?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes `bytes` to `dir/name` atomically: a temporary file is written and synced,
    /// renamed over `name`, and the directory is synced. `private`: mode 0600.
    ///
    /// # Errors
    /// Whatever the file system reports; the old file, if any, is then unchanged.
    pub(crate) fn write_file_atomic(
        &self,
        dir: &Path,
        name: &str,
        bytes: &[u8],
        private: bool,
    ) -> io::Result<()> {
        let tmp = dir.join(format!("{name}.tmp"));
        let file = self.0.open(&tmp, OpenMode::Truncate { private })?;
        file.write_all_at(bytes, 0)?;
        file.sync_all()?;
        drop(file);
        self.0.rename(&tmp, &dir.join(name))?;
        self.0.sync_dir(dir)
    }
}

impl std::ops::Deref for Storage {
    type Target = dyn Fs;
    fn deref(&self) -> &(dyn Fs + 'static) {
        &*self.0
    }
}

impl Default for Storage {
    fn default() -> Storage {
        Storage::os()
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Lowers the calling thread's scheduling priority (nice 10), for background work that must
/// not take the CPU from appenders and the flusher when both cores are busy. Best effort:
/// a failure leaves the priority as it was.
/// Returns the heap memory the allocator holds free to the operating system (glibc's
/// `malloc_trim`; elsewhere nothing). A server calls it after a burst of large buffers has
/// been freed: glibc keeps freed memory in its arenas otherwise, and resident memory stays
/// at the burst's peak. It walks the heap, so it is for occasional use.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` has no preconditions: it only returns free pages of the
    // allocator's own arenas to the kernel, and touches no memory in use.
    unsafe {
        let _ = libc::malloc_trim(0);
    }
}

/// Limits the allocator to `arenas` arenas (glibc's `M_ARENA_MAX`; elsewhere nothing). By
/// default glibc gives up to eight per core, one per thread that allocates while another
/// holds an arena, and each keeps the memory freed into it: after a burst across many
/// threads (a blocking pool), megabytes stay resident per arena even after
/// [`release_free_memory`]. A server calls this once, before it starts threads, with
/// about as many arenas as threads can run at once.
pub fn limit_allocator_arenas(arenas: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let n = libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `mallopt` only sets an allocator parameter; `M_ARENA_MAX` with a positive
        // value is valid at any time (it limits arenas created from then on).
        unsafe {
            let _ = libc::mallopt(libc::M_ARENA_MAX, n);
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = arenas;
}

pub(crate) fn lower_thread_priority() {
    // SAFETY: `gettid` has no preconditions. `setpriority` with `PRIO_PROCESS` and a thread
    // id changes that thread's nice value on Linux and touches no memory of ours.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}
