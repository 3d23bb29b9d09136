//! Operating-system specifics: memory maps, preallocation, and directory syncs. The only
//! module of the engine allowed to use `unsafe`; everything it exports is safe to call.
//!
//! Memory-map contract (docs/FORMAT.md, "Assumptions about the disk and the OS"):
//! - A map never extends past the end of its file, and no file that is mapped is ever
//!   shortened (shortening a mapped file turns the next access into SIGBUS). Tally never
//!   truncates segment files; recovery zeroes torn bytes with `pwrite` before mapping.
//! - Only one process writes a data directory (the advisory lock in `tally.lock`).
//! - A [`SegmentMap`] hands out `&[u8]` only below its published watermark; its single
//!   [`MapWriter`] writes only at or above it. Published bytes are never written again.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Mmap, MmapOptions, MmapRaw};

/// A shared, writable map of a whole segment file.
#[derive(Debug)]
pub(crate) struct SegmentMap {
    raw: MmapRaw,
    /// Bytes `0..published` are complete and will never be written through this map again.
    published: AtomicU64,
}

/// The one handle allowed to write through a [`SegmentMap`].
#[derive(Debug)]
pub(crate) struct MapWriter {
    map: Arc<SegmentMap>,
}

impl SegmentMap {
    /// Maps `len` bytes of `file` for reading and writing, with `published` bytes already
    /// complete (for a recovered segment, the valid prefix).
    ///
    /// Returns the map and its only writer.
    ///
    /// # Errors
    /// The file is shorter than `len`, or `mmap` fails.
    pub(crate) fn map(
        file: &File,
        len: u64,
        published: u64,
    ) -> io::Result<(Arc<SegmentMap>, MapWriter)> {
        let file_len = file.metadata()?.len();
        if file_len < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("segment file is {file_len} bytes, expected {len}"),
            ));
        }
        assert!(
            published <= len,
            "published {published} beyond map length {len}"
        );
        let len_usize = usize::try_from(len)
            .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "map too large"))?;
        let raw = MmapOptions::new().len(len_usize).map_raw(file)?;
        let map = Arc::new(SegmentMap {
            raw,
            published: AtomicU64::new(published),
        });
        Ok((Arc::clone(&map), MapWriter { map }))
    }

    /// Maps `len` bytes of `file`, of which `published` are complete, for reading only:
    /// sealed segments, and every segment of a log opened read-only. The file may be opened
    /// read-only.
    ///
    /// # Errors
    /// The file is shorter than `len`, or `mmap` fails.
    pub(crate) fn map_read_only(
        file: &File,
        len: u64,
        published: u64,
    ) -> io::Result<Arc<SegmentMap>> {
        let file_len = file.metadata()?.len();
        if file_len < len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("segment file is {file_len} bytes, expected {len}"),
            ));
        }
        assert!(
            published <= len,
            "published {published} beyond map length {len}"
        );
        let len_usize = usize::try_from(len)
            .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "map too large"))?;
        let raw = MmapOptions::new().len(len_usize).map_raw_read_only(file)?;
        Ok(Arc::new(SegmentMap {
            raw,
            published: AtomicU64::new(published),
        }))
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> u64 {
        self.raw.len() as u64
    }

    /// Bytes that are complete and readable.
    pub(crate) fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    /// The published bytes `start..start+len`, or `None` if any of them is not published.
    pub(crate) fn read(&self, start: u64, len: u64) -> Option<&[u8]> {
        let end = start.checked_add(len)?;
        if end > self.published() {
            return None;
        }
        // Both fit in usize: end <= published <= raw.len().
        let (start, len) = (start as usize, len as usize);
        // SAFETY: `start..start+len` lies inside the map (end <= published <= raw.len()) and
        // below the published watermark, which the only writer never writes below (see
        // MapWriter::write). The file is never truncated while mapped and no other process
        // writes it (advisory lock), so the bytes stay valid and unchanged for the lifetime
        // of `&self`, which keeps the map alive.
        Some(unsafe { std::slice::from_raw_parts(self.raw.as_ptr().add(start), len) })
    }

    /// Writes the pages covering `start..end` back to the file and waits for the device
    /// (`msync(MS_SYNC)`).
    ///
    /// # Errors
    /// Whatever `msync` reports; after an error the caller must assume nothing reached the disk.
    pub(crate) fn sync_range(&self, start: u64, end: u64) -> io::Result<()> {
        assert!(
            start <= end && end <= self.len(),
            "sync range {start}..{end} outside map"
        );
        if start == end {
            return Ok(());
        }
        self.raw.flush_range(start as usize, (end - start) as usize)
    }
}

impl MapWriter {
    /// Copies `bytes` into the map at `offset`, which must be at or above the published
    /// watermark.
    ///
    /// # Panics
    /// If the range lies below the published watermark or beyond the map: both are bugs in
    /// the caller's bookkeeping, and writing there could change bytes a reader holds.
    pub(crate) fn write(&mut self, offset: u64, bytes: &[u8]) {
        let end = offset + bytes.len() as u64;
        assert!(
            offset >= self.map.published(),
            "write at {offset} below published bytes"
        );
        assert!(
            end <= self.map.len(),
            "write {offset}..{end} beyond the map"
        );
        // SAFETY: the destination lies inside the map (checked above) and at or above the
        // published watermark, so no `&[u8]` handed out by `SegmentMap::read` overlaps it;
        // `MapWriter` is the only writer and `&mut self` serialises its writes. The source
        // is a distinct Rust slice, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.raw.as_mut_ptr().add(offset as usize),
                bytes.len(),
            );
        }
    }

    /// Declares `0..upto` complete; readers may borrow it from now on.
    ///
    /// # Panics
    /// If `upto` moves the watermark backwards or beyond the map.
    pub(crate) fn publish(&mut self, upto: u64) {
        assert!(upto <= self.map.len(), "publish beyond the map");
        let before = self.map.published.swap(upto, Ordering::Release);
        assert!(
            before <= upto,
            "published watermark moved back from {before} to {upto}"
        );
    }

    /// The map written to.
    pub(crate) fn map(&self) -> &Arc<SegmentMap> {
        &self.map
    }
}

/// A read-only map of an immutable file (a sealed segment's index sidecar).
#[derive(Debug)]
pub(crate) struct ReadOnlyMap {
    map: Mmap,
}

impl ReadOnlyMap {
    /// Maps the whole of `file` for reading.
    ///
    /// # Errors
    /// Whatever `mmap` reports.
    pub(crate) fn map_immutable(file: &File) -> io::Result<ReadOnlyMap> {
        // SAFETY: only index sidecars are mapped here. They are written under a temporary
        // name, synced, and renamed into place, and never modified or truncated afterwards
        // (a rewrite renames a new file over the name; this map keeps the old inode), so the
        // mapped bytes cannot change under us.
        let map = unsafe { Mmap::map(file)? };
        Ok(ReadOnlyMap { map })
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Creates `path` with `len` zero bytes written by ordinary 4 KiB writes, then syncs it.
///
/// Why written zeros rather than `fallocate`: an `fdatasync` after writing into blocks that
/// were written before needs no journal commit, while unwritten (fallocated) extents must be
/// converted on first write, which costs a journal commit per sync (measured: nearly 2x
/// slower). 4 KiB writes keep page-cache folios small, so an `msync` of a few records writes
/// back 4 KiB rather than a large folio. See docs/adr/0002-write-path-and-preallocation.md.
///
/// # Errors
/// Whatever the file system reports (including a full disk).
pub(crate) fn create_zeroed(path: &Path, len: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    write_zeros(&file, len)?;
    file.sync_all()?;
    Ok(file)
}

/// Writes `len` zero bytes from offset 0 with 4 KiB writes.
fn write_zeros(file: &File, len: u64) -> io::Result<()> {
    let page = [0u8; 4096];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(page.len() as u64) as usize;
        file.write_all_at(&page[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Creates `path` with `len` bytes reserved by `fallocate` (no data written), then syncs
/// it; falls back to written zeros where the file system has no `fallocate`.
///
/// For logs that sync rarely (`Durability::None` and `Batched`): reserving costs no write
/// bandwidth, while written zeros double every byte written; the cost of converting
/// unwritten extents at each sync is paid rarely. Reserved blocks cannot run out, so a
/// store into the map never meets a full disk (which would be SIGBUS).
///
/// # Errors
/// Whatever the file system reports (including a full disk).
pub(crate) fn create_allocated(path: &Path, len: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let len_off = libc::off_t::try_from(len)
        .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: `fallocate` takes a file descriptor that `file` keeps open for the duration
    // of the call and plain integers; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, len_off) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(err);
        }
        write_zeros(&file, len)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// Syncs a directory, making the creation, rename or removal of its entries durable.
///
/// # Errors
/// Whatever `open` or `fsync` reports.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dir/name` atomically: a temporary file is written and synced, renamed
/// over `name`, and the directory is synced.
///
/// # Errors
/// Whatever the file system reports; the old file, if any, is then unchanged.
pub(crate) fn write_file_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    file.write_all_at(bytes, 0)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Lowers the calling thread's scheduling priority (nice 10), for background work that must
/// not take the CPU from appenders and the flusher when both cores are busy. Best effort:
/// a failure leaves the priority as it was.
pub(crate) fn lower_thread_priority() {
    // SAFETY: `gettid` has no preconditions. `setpriority` with `PRIO_PROCESS` and a thread
    // id changes that thread's nice value on Linux and touches no memory of ours.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_only_published_bytes_and_writes_only_above_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = create_zeroed(&dir.path().join("a"), 8192).unwrap();
        let (map, mut writer) = SegmentMap::map(&file, 8192, 0).unwrap();
        assert_eq!(map.read(0, 1), None);
        writer.write(0, b"hello");
        writer.publish(5);
        assert_eq!(map.read(0, 5), Some(&b"hello"[..]));
        assert_eq!(map.read(0, 6), None);
        assert_eq!(
            map.read(u64::MAX, 2),
            None,
            "overflow is refused, not wrapped"
        );
        map.sync_range(0, 5).unwrap();
        let mut back = [0u8; 5];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, b"hello", "stores through the map reach the file");
    }

    #[test]
    #[should_panic(expected = "below published")]
    fn writing_below_the_watermark_panics() {
        let dir = tempfile::tempdir().unwrap();
        let file = create_zeroed(&dir.path().join("a"), 8192).unwrap();
        let (_map, mut writer) = SegmentMap::map(&file, 8192, 100).unwrap();
        writer.write(99, b"x");
    }

    #[test]
    fn allocated_files_read_as_zeros_and_have_their_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = create_allocated(&dir.path().join("b"), 16384).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 16384);
        let mut buf = vec![1u8; 16384];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            create_allocated(&dir.path().join("b"), 16384).is_err(),
            "never replaces a file"
        );
    }

    #[test]
    fn refuses_to_map_beyond_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = create_zeroed(&dir.path().join("a"), 4096).unwrap();
        assert!(SegmentMap::map(&file, 8192, 0).is_err());
    }
}
