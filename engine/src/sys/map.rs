//! Memory maps of segment files and index sidecars, over any backend's [`MapRegion`].

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Mapped bytes of a file, shared with the file: what is stored through the pointer is in
/// the file (the page cache), and `sync_range` makes a range durable.
///
/// # Safety contract for implementors
/// `as_ptr()` stays valid, and points at `len()` bytes, for the region's whole lifetime;
/// the bytes are not moved or freed before the region is dropped.
pub trait MapRegion: Send + Sync + fmt::Debug {
    /// The first mapped byte.
    fn as_ptr(&self) -> *mut u8;
    /// Bytes mapped.
    fn len(&self) -> usize;
    /// Whether nothing is mapped.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Makes `start..start+len` durable, waiting for the device (`msync(MS_SYNC)`).
    fn sync_range(&self, start: usize, len: usize) -> io::Result<()>;
    /// Lets go of the pages this process has touched (`madvise(MADV_DONTNEED)` on the
    /// shared file map): they stay in the page cache and the next access maps them again.
    /// A long read of many segments otherwise keeps every page it touched resident.
    fn release(&self) -> io::Result<()> {
        Ok(())
    }
}

/// A shared map of a whole segment file.
#[derive(Debug)]
pub(crate) struct SegmentMap {
    region: Box<dyn MapRegion>,
    /// `region.as_ptr()`, kept here: every read and write goes through it, and the region's
    /// is a dynamic call (two reads per record: a checksum scan measured 0.94x of the code
    /// before the storage seam with it, 1.00x without).
    base: std::ptr::NonNull<u8>,
    /// `region.len()`, kept here: the bounds checks on every write need it, and the
    /// region's is a dynamic call.
    len: u64,
    /// Bytes `0..published` are complete and will never be written through this map again.
    published: AtomicU64,
}

// SAFETY: `base` is `region.as_ptr()`, valid for the region's lifetime (MapRegion's
// contract), and the region is `Send + Sync`; the pointer is only read through (`read`,
// below the published watermark) or written through by the one `MapWriter` (`&mut`, above
// it), exactly as through `region.as_ptr()`.
unsafe impl Send for SegmentMap {}
// SAFETY: as for `Send`: shared readers only borrow published bytes, which nobody writes.
unsafe impl Sync for SegmentMap {}

/// The one handle allowed to write through a [`SegmentMap`].
#[derive(Debug)]
pub(crate) struct MapWriter {
    map: Arc<SegmentMap>,
}

impl SegmentMap {
    /// See [`MapRegion::release`].
    pub(crate) fn release(&self) -> io::Result<()> {
        self.region.release()
    }

    /// Maps `len` bytes of `file` for reading and writing, with `published` bytes already
    /// complete (for a recovered segment, the valid prefix).
    ///
    /// Returns the map and its only writer.
    ///
    /// # Errors
    /// The file is shorter than `len`, or mapping fails.
    pub(crate) fn map(
        file: &dyn super::FsFile,
        len: u64,
        published: u64,
    ) -> io::Result<(Arc<SegmentMap>, MapWriter)> {
        let map = Arc::new(Self::new(file, len, published, true)?);
        Ok((Arc::clone(&map), MapWriter { map }))
    }

    /// Maps `len` bytes of `file`, of which `published` are complete, for reading only:
    /// sealed segments, and every segment of a log opened read-only. The file may be opened
    /// read-only.
    ///
    /// # Errors
    /// The file is shorter than `len`, or mapping fails.
    pub(crate) fn map_read_only(
        file: &dyn super::FsFile,
        len: u64,
        published: u64,
    ) -> io::Result<Arc<SegmentMap>> {
        Ok(Arc::new(Self::new(file, len, published, false)?))
    }

    fn new(
        file: &dyn super::FsFile,
        len: u64,
        published: u64,
        writable: bool,
    ) -> io::Result<SegmentMap> {
        let file_len = file.len()?;
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
        let region = file.map(len, writable)?;
        assert_eq!(
            region.len() as u64,
            len,
            "the backend mapped what was asked"
        );
        let base = std::ptr::NonNull::new(region.as_ptr())
            .ok_or_else(|| io::Error::other("the backend mapped a null pointer"))?;
        Ok(SegmentMap {
            region,
            base,
            len,
            published: AtomicU64::new(published),
        })
    }

    /// Bytes mapped.
    pub(crate) fn len(&self) -> u64 {
        self.len
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
        // Both fit in usize: end <= published <= region.len().
        let (start, len) = (start as usize, len as usize);
        // SAFETY: `start..start+len` lies inside the region (end <= published <= len), whose
        // pointer stays valid while `self` lives (MapRegion's contract), and below the
        // published watermark, which the only writer never writes below (see
        // MapWriter::write). The file is never truncated while mapped and no other process
        // writes it (advisory lock), so the bytes stay valid and unchanged for the lifetime
        // of `&self`.
        Some(unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(start), len) })
    }

    /// Writes the pages covering `start..end` back to the file and waits for the device.
    ///
    /// # Errors
    /// Whatever the backend reports; after an error the caller must assume nothing reached
    /// the disk.
    pub(crate) fn sync_range(&self, start: u64, end: u64) -> io::Result<()> {
        assert!(
            start <= end && end <= self.len(),
            "sync range {start}..{end} outside map"
        );
        if start == end {
            return Ok(());
        }
        self.region
            .sync_range(start as usize, (end - start) as usize)
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
        // SAFETY: the destination lies inside the region (checked above), valid for the
        // map's lifetime (MapRegion's contract), and at or above the published watermark, so
        // no `&[u8]` handed out by `SegmentMap::read` overlaps it; `MapWriter` is the only
        // writer and `&mut self` serialises its writes. The source is a distinct Rust
        // slice, so the ranges do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.base.as_ptr().add(offset as usize),
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

/// The bytes of an immutable file (a sealed segment's index sidecar): mapped by the
/// operating system's backend, copied by the simulated one.
pub struct ReadOnlyMap {
    bytes: Bytes,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    Owned(Vec<u8>),
}

impl ReadOnlyMap {
    pub(crate) fn mapped(map: memmap2::Mmap) -> ReadOnlyMap {
        ReadOnlyMap {
            bytes: Bytes::Mapped(map),
        }
    }

    /// Bytes held in memory (the simulated backend).
    #[cfg_attr(not(feature = "internals"), allow(dead_code))]
    pub(crate) fn owned(bytes: Vec<u8>) -> ReadOnlyMap {
        ReadOnlyMap {
            bytes: Bytes::Owned(bytes),
        }
    }

    /// The file's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl fmt::Debug for ReadOnlyMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadOnlyMap")
            .field("len", &self.bytes().len())
            .finish()
    }
}
