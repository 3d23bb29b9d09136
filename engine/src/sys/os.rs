//! The operating system's file system: `std::fs`, `pwrite`/`pread`, `fdatasync`, `flock`,
//! `mmap`/`msync` and `fallocate`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use memmap2::{Mmap, MmapOptions, MmapRaw};

use super::{Fs, FsFile, MapRegion, OpenMode, ReadOnlyMap, TryLock};

/// The operating system's file system.
#[derive(Debug)]
pub(crate) struct OsFs;

/// An open file of the operating system.
#[derive(Debug)]
pub(crate) struct OsFile(File);

/// A shared `mmap` of a file.
#[derive(Debug)]
struct OsMap(MmapRaw);

impl MapRegion for OsMap {
    fn as_ptr(&self) -> *mut u8 {
        self.0.as_mut_ptr()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn sync_range(&self, start: usize, len: usize) -> io::Result<()> {
        self.0.flush_range(start, len)
    }

    fn release(&self) -> io::Result<()> {
        // SAFETY: the map is a shared map of a file (`map_raw`, `map_raw_read_only`), so
        // MADV_DONTNEED discards no data: it drops this process's page table entries, and
        // the next access maps the file's page from the page cache again, with the same
        // bytes (writes through a shared map are in that page already). Only private maps
        // would lose writes, and none is made here.
        unsafe { self.0.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) }
    }
}

impl FsFile for OsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let len_off = libc::off_t::try_from(len)
            .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        // SAFETY: `fallocate` takes a file descriptor that `self.0` keeps open for the
        // duration of the call and plain integers; it touches no memory of ours. Mode 0
        // allocates holes and leaves written data as it is.
        let rc =
            unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&self.0), 0, 0, len_off) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(err),
        }
    }

    fn map(&self, len: u64, writable: bool) -> io::Result<Box<dyn MapRegion>> {
        let len = usize::try_from(len)
            .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "map too large"))?;
        let options = {
            let mut o = MmapOptions::new();
            o.len(len);
            o
        };
        let raw = if writable {
            options.map_raw(&self.0)?
        } else {
            options.map_raw_read_only(&self.0)?
        };
        Ok(Box::new(OsMap(raw)))
    }

    fn map_immutable(&self) -> io::Result<ReadOnlyMap> {
        // SAFETY: only index sidecars are mapped here. They are written under a temporary
        // name, synced, and renamed into place, and never modified or truncated afterwards
        // (a rewrite renames a new file over the name; this map keeps the old inode), so the
        // mapped bytes cannot change under us.
        let map = unsafe { Mmap::map(&self.0)? };
        Ok(ReadOnlyMap::mapped(map))
    }

    fn try_lock(&self, exclusive: bool) -> io::Result<TryLock> {
        let tried = if exclusive {
            self.0.try_lock()
        } else {
            self.0.try_lock_shared()
        };
        match tried {
            Ok(()) => Ok(TryLock::Acquired),
            Err(std::fs::TryLockError::WouldBlock) => Ok(TryLock::WouldBlock),
            Err(std::fs::TryLockError::Error(e)) => Err(e),
        }
    }

    fn lock(&self) -> io::Result<()> {
        self.0.lock()
    }
}

impl Fs for OsFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut o = OpenOptions::new();
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::Create => o.read(true).write(true).create(true).truncate(false),
            OpenMode::CreateNew { private } => {
                if private {
                    o.mode(0o600);
                }
                o.read(true).write(true).create_new(true)
            }
            OpenMode::Truncate { private } => {
                if private {
                    o.mode(0o600);
                }
                o.write(true).create(true).truncate(true)
            }
        };
        Ok(Box::new(OsFile(o.open(path)?)))
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        Ok(std::fs::metadata(path)?.len())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::hard_link(from, to)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect()
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    /// Why written zeros rather than `fallocate`: an `fdatasync` after writing into blocks
    /// that were written before needs no journal commit, while unwritten (fallocated)
    /// extents must be converted on first write, which costs a journal commit per sync
    /// (measured: nearly 2x slower). 4 KiB writes keep page-cache folios small, so an
    /// `msync` of a few records writes back 4 KiB rather than a large folio. See
    /// docs/adr/0002-write-path-and-preallocation.md.
    fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>> {
        let file = self.open(path, OpenMode::CreateNew { private: false })?;
        write_zeros(&*file, len)?;
        file.sync_all()?;
        Ok(file)
    }

    /// For logs that sync rarely (`Durability::None` and `Batched`): reserving costs no
    /// write bandwidth, while written zeros double every byte written; the cost of
    /// converting unwritten extents at each sync is paid rarely. Reserved blocks cannot run
    /// out, so a store into the map never meets a full disk (which would be SIGBUS). Falls
    /// back to written zeros where the file system has no `fallocate`.
    fn create_allocated(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let len_off = libc::off_t::try_from(len)
            .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
        // SAFETY: `fallocate` takes a file descriptor that `file` keeps open for the
        // duration of the call and plain integers; it touches no memory of ours.
        let rc = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, len_off) };
        let file = OsFile(file);
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(err);
            }
            write_zeros(&file, len)?;
        }
        file.sync_all()?;
        Ok(Box::new(file))
    }
}

/// Writes `len` zero bytes from offset 0 with 4 KiB writes.
pub(crate) fn write_zeros(file: &dyn FsFile, len: u64) -> io::Result<()> {
    let page = [0u8; 4096];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(page.len() as u64) as usize;
        file.write_all_at(&page[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::SegmentMap;
    use super::*;

    #[test]
    fn reads_only_published_bytes_and_writes_only_above_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = OsFs.create_zeroed(&dir.path().join("a"), 8192).unwrap();
        let (map, mut writer) = SegmentMap::map(&*file, 8192, 0).unwrap();
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
        let file = OsFs.create_zeroed(&dir.path().join("a"), 8192).unwrap();
        let (_map, mut writer) = SegmentMap::map(&*file, 8192, 100).unwrap();
        writer.write(99, b"x");
    }

    #[test]
    fn allocated_files_read_as_zeros_and_have_their_length() {
        let dir = tempfile::tempdir().unwrap();
        let file = OsFs.create_allocated(&dir.path().join("b"), 16384).unwrap();
        assert_eq!(file.len().unwrap(), 16384);
        let mut buf = vec![1u8; 16384];
        file.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            OsFs.create_allocated(&dir.path().join("b"), 16384).is_err(),
            "never replaces a file"
        );
    }

    #[test]
    fn refuses_to_map_beyond_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = OsFs.create_zeroed(&dir.path().join("a"), 4096).unwrap();
        assert!(SegmentMap::map(&*file, 8192, 0).is_err());
    }
}
