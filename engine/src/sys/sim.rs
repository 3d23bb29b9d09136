//! A simulated disk for tests and fuzz targets: every file and directory keeps what was
//! written (the page cache) apart from what is durable (the device), so a test can cut the
//! power at any point and check that the engine recovers from what a real disk could have
//! kept. Faults (a full disk, I/O errors, short writes, slow syncs) can be injected by rule
//! or at seeded random.
//!
//! Nothing here touches the real disk. Paths are taken as names only: a file is its parent
//! directory's path plus its name, and directories exist only once `create_dir_all` made
//! them.
//!
//! # The model
//! - A directory has its entries as written and its entries as durable. Creating,
//!   renaming, hard-linking and removing change the written entries; `sync_dir` makes them
//!   durable. Simplification: directories themselves are durable as soon as they are
//!   created and are never removed; `read_dir` lists subdirectories along with files.
//! - A file (inode) has its content as written and its content as durable. `sync_data` and
//!   `sync_all` make the whole written content and length durable; neither makes the
//!   file's directory entry durable. Handles hold the inode, like a Unix file descriptor,
//!   so a removed or renamed file stays usable through them. `private` is not modelled.
//! - The first map of a file moves its written content into an anonymous memory region
//!   that every later map and every positional read and write of that file then uses, so
//!   maps and `read_exact_at`/`write_all_at` see the same bytes, as through a page cache.
//!   The length of a mapped file is frozen: `set_len` to another length, a write past the
//!   end and opening it with `Truncate` fail. The engine never does any of these (mapped
//!   segments are never shortened or grown).
//! - [`SimFs::power_cut`] starts a new generation built from the durable state, plus,
//!   with the probabilities of a [`Cut`], some of what was written but not synced. Every
//!   handle and map of an older generation then fails with a power-cut error
//!   ([`is_power_cut`]); stores through an old map pointer cannot be stopped, but they land
//!   in the old generation's memory, which no new file ever shares.
//! - All randomness (which unsynced pages and entries survive a cut, short-write lengths,
//!   random faults) comes from one SplitMix64 generator seeded by [`SimFs::new`], drawn
//!   under the world's mutex: the same seed and the same sequence of operations give the
//!   same result.

use std::collections::hash_map::Entry as HashEntry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use parking_lot::{Condvar, Mutex, MutexGuard};

use super::{Fs, FsFile, MapRegion, OpenMode, ReadOnlyMap, TryLock};

/// The unit in which unsynced bytes survive a power cut and in which `sync_range` makes
/// bytes durable, as the page cache writes back whole pages.
const PAGE: usize = 4096;
/// A torn page keeps one half of its new bytes: a 4 KiB page is written to the device as
/// more than one sector, and a power cut can stop between them.
const HALF: usize = PAGE / 2;
/// The message of every error from a handle or map of an older generation.
const POWER_CUT: &str = "simulated power cut";

/// What survives a power cut ([`SimFs::power_cut`]) beyond the durable state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cut {
    /// Probability (0.0..=1.0) that one 4 KiB page written but not synced reaches the
    /// disk anyway (the kernel may have written it back on its own). Also the probability
    /// that an unsynced shortening of a file survives.
    pub keep_unsynced_pages: f64,
    /// Whether a kept page may persist only one 2 KiB half, the other half keeping its
    /// durable bytes (a write torn between sectors).
    pub torn_pages: bool,
    /// Probability (0.0..=1.0) that one unsynced directory change (an added, removed or
    /// replaced name) survives.
    pub keep_unsynced_entries: f64,
}

impl Cut {
    /// Loses everything that was not synced: what [`SimFs::read_durable`] shows.
    pub fn clean() -> Cut {
        Cut {
            keep_unsynced_pages: 0.0,
            torn_pages: false,
            keep_unsynced_entries: 0.0,
        }
    }

    /// Keeps everything written, whole: a crash of the process rather than of the machine.
    pub fn keep_all() -> Cut {
        Cut {
            keep_unsynced_pages: 1.0,
            torn_pages: false,
            keep_unsynced_entries: 1.0,
        }
    }

    /// Keeps each unsynced page and entry with probability one half, pages possibly torn:
    /// the most varied outcome, for seeded crash tests.
    pub fn seeded_loss() -> Cut {
        Cut {
            keep_unsynced_pages: 0.5,
            torn_pages: true,
            keep_unsynced_entries: 0.5,
        }
    }
}

/// The operations a [`Fault`] can hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOp {
    /// `write_all_at`, and the zeros written by `create_zeroed` and `create_allocated`.
    Write,
    /// `sync_data`, `sync_all`, and a map's `sync_range`.
    Sync,
    /// `sync_dir`.
    SyncDir,
    /// Any open with a creating mode (whether or not the file existed), `create_zeroed`,
    /// `create_allocated`, and `hard_link` (which creates a name).
    Create,
    /// `rename`.
    Rename,
    /// `remove_file`.
    Remove,
}

/// What a [`Fault`] does to the operation it hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Fails with `ENOSPC`; nothing is done.
    NoSpace,
    /// Fails with `EIO`; nothing is done. On a sync the written bytes stay in the page
    /// cache while the durable ones are unchanged, as on Linux: the caller cannot tell
    /// what reached the disk.
    Eio,
    /// A write stores a prefix of seeded length (shorter than asked), then fails with
    /// `ENOSPC`. On any other operation it acts as [`FaultKind::NoSpace`].
    ShortWrite,
    /// Sleeps this long, then lets the operation succeed.
    SlowSync(Duration),
}

/// A rule that makes matching operations fail ([`SimFs::inject`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The operation hit.
    pub op: FaultOp,
    /// Only paths containing this text match (for a rename or hard link, either path; for
    /// an operation on a handle, the path it was opened with). `None`: every path.
    pub path_contains: Option<String>,
    /// How many matching operations succeed before the fault fires.
    pub skip: u64,
    /// What the fault does.
    pub kind: FaultKind,
    /// How many times the fault fires before it is removed; 0 never fires.
    pub times: u64,
}

impl Fault {
    /// A fault that hits the next matching operation on any path, once.
    pub fn once(op: FaultOp, kind: FaultKind) -> Fault {
        Fault {
            op,
            path_contains: None,
            skip: 0,
            kind,
            times: 1,
        }
    }
}

/// Whether `err` came from a handle or map of a generation that ended with a power cut.
///
/// Such errors carry the message "simulated power cut" rather than the raw `EIO` code:
/// `std::io::Error` cannot hold both, and the message tells a test's reader what happened.
pub fn is_power_cut(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Other && err.to_string() == POWER_CUT
}

fn power_cut_error() -> io::Error {
    io::Error::other(POWER_CUT)
}

fn os_error(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn frozen_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "the simulated disk cannot change the length of a mapped file",
    )
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n)
        .map_err(|_too_big| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

/// Splits a file path into its directory and name.
fn split(path: &Path) -> io::Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )),
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

/// SplitMix64: tiny, fast, and good enough to pick pages and faults reproducibly.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        let x = self.next_u64();
        if n == 0 { 0 } else { x % n }
    }

    /// True with probability `p`. Always draws, so that the sequence of draws does not
    /// depend on `p`.
    fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }
}

/// Memory holding a mapped file's written bytes: the file's page cache once it is mapped.
///
/// Accessed only through raw pointers (here, and by the engine's memcpy into a map), never
/// through a Rust reference that outlives one copy.
#[derive(Debug)]
struct Region {
    raw: MmapRaw,
    len: usize,
}

impl Region {
    fn new(bytes: &[u8]) -> io::Result<Region> {
        let mut map = MmapOptions::new().len(bytes.len()).map_anon()?;
        map[..].copy_from_slice(bytes);
        Ok(Region {
            raw: MmapRaw::from(map),
            len: bytes.len(),
        })
    }

    /// Copies `dst.len()` bytes from `start`.
    fn copy_out(&self, start: usize, dst: &mut [u8]) {
        assert!(
            start
                .checked_add(dst.len())
                .is_some_and(|end| end <= self.len),
            "copy out of the region"
        );
        // SAFETY: the source `start..start + dst.len()` lies inside the region (checked
        // above), which `self.raw` keeps mapped while `self` lives; `dst` is a distinct
        // Rust slice, so the ranges do not overlap. No Rust reference to the region's bytes
        // exists while we copy (see the type's doc). A store through a map pointer may race
        // with this copy, exactly as kernel writeback races with stores into a shared file
        // mapping; bytes have no invalid values, so the copy then holds old or new bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.raw.as_ptr().add(start),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
    }

    /// Copies `src` to `start`.
    fn copy_in(&self, start: usize, src: &[u8]) {
        assert!(
            start
                .checked_add(src.len())
                .is_some_and(|end| end <= self.len),
            "copy into the region"
        );
        // SAFETY: the destination lies inside the region (checked above), which stays
        // mapped read-write while `self` lives; `src` is a distinct Rust slice. As in
        // `copy_out`, no Rust reference to the region's bytes is alive, and a racing store
        // through a map pointer behaves as two writers of one page-cache page.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                self.raw.as_mut_ptr().add(start),
                src.len(),
            );
        }
    }

    fn to_vec(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.len];
        self.copy_out(0, &mut bytes);
        bytes
    }
}

/// A file's written bytes: a plain buffer, or, once mapped, the region every map shares.
enum Written {
    Buf(Vec<u8>),
    Mapped(Arc<Region>),
}

/// A file's content, guarded by the inode's mutex.
struct Data {
    written: Written,
    /// The durable bytes; their length is the durable length.
    durable: Vec<u8>,
}

impl Data {
    fn new(written: Vec<u8>, durable: Vec<u8>) -> Data {
        Data {
            written: Written::Buf(written),
            durable,
        }
    }

    fn len(&self) -> usize {
        match &self.written {
            Written::Buf(bytes) => bytes.len(),
            Written::Mapped(region) => region.len,
        }
    }

    fn written_vec(&self) -> Vec<u8> {
        match &self.written {
            Written::Buf(bytes) => bytes.clone(),
            Written::Mapped(region) => region.to_vec(),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = to_usize(offset)?;
        let in_file = start
            .checked_add(buf.len())
            .is_some_and(|end| end <= self.len());
        if !in_file {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the file",
            ));
        }
        match &self.written {
            Written::Buf(bytes) => buf.copy_from_slice(&bytes[start..start + buf.len()]),
            Written::Mapped(region) => region.copy_out(start, buf),
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = to_usize(offset)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "write too large"))?;
        match &mut self.written {
            Written::Buf(bytes) => {
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[start..end].copy_from_slice(buf);
            }
            Written::Mapped(region) => {
                if end > region.len {
                    return Err(frozen_error());
                }
                region.copy_in(start, buf);
            }
        }
        Ok(())
    }

    fn set_len(&mut self, len: usize) -> io::Result<()> {
        match &mut self.written {
            Written::Buf(bytes) => {
                bytes.resize(len, 0);
                Ok(())
            }
            Written::Mapped(region) if region.len == len => Ok(()),
            Written::Mapped(_) => Err(frozen_error()),
        }
    }

    /// The shared region, created from the written bytes on the first map.
    fn region(&mut self) -> io::Result<Arc<Region>> {
        let region = match &self.written {
            Written::Mapped(region) => return Ok(Arc::clone(region)),
            Written::Buf(bytes) => Arc::new(Region::new(bytes)?),
        };
        self.written = Written::Mapped(Arc::clone(&region));
        Ok(region)
    }
}

/// A file: its content, and the generation it belongs to.
struct Inode {
    /// Unique over all generations; keys the advisory locks.
    id: u64,
    generation: u64,
    data: Mutex<Data>,
}

/// A directory: its file entries as written and as durable.
#[derive(Default)]
struct Dir {
    written: BTreeMap<OsString, Arc<Inode>>,
    durable: BTreeMap<OsString, Arc<Inode>>,
}

/// The handles holding one file's advisory lock (`flock`: per open file description).
#[derive(Default)]
struct Holders {
    exclusive: Option<u64>,
    shared: BTreeSet<u64>,
}

impl Holders {
    fn conflicts(&self, handle: u64, exclusive: bool) -> bool {
        self.exclusive.is_some_and(|h| h != handle)
            || (exclusive && self.shared.iter().any(|&h| h != handle))
    }

    /// Gives `handle` the lock, converting a lock it already holds.
    fn grant(&mut self, handle: u64, exclusive: bool) {
        self.release(handle);
        if exclusive {
            self.exclusive = Some(handle);
        } else {
            self.shared.insert(handle);
        }
    }

    /// Whether `handle` held the lock.
    fn release(&mut self, handle: u64) -> bool {
        let was_exclusive = self.exclusive == Some(handle);
        if was_exclusive {
            self.exclusive = None;
        }
        self.shared.remove(&handle) || was_exclusive
    }

    fn is_free(&self) -> bool {
        self.exclusive.is_none() && self.shared.is_empty()
    }
}

/// A seeded random fault ([`SimFs::set_random_faults`]).
#[derive(Debug)]
struct RandomFault {
    op: FaultOp,
    kind: FaultKind,
    per_million: u32,
}

/// Everything behind the world's mutex.
struct State {
    rng: SplitMix64,
    generation: u64,
    dirs: BTreeMap<PathBuf, Dir>,
    faults: Vec<Fault>,
    random: Vec<RandomFault>,
    faults_fired: u64,
    /// The next inode or handle id.
    next_id: u64,
    /// Advisory locks by inode id. Holders are never empty.
    locks: HashMap<u64, Holders>,
    /// Operations that could fail (every one `World::fault` sees), counted for
    /// [`SimFs::cut_power_after`].
    faultable: u64,
    /// A power cut armed to happen at the operation with this count.
    cut_at: Option<(u64, Cut)>,
    /// The faultable operations and power cuts so far, when tracing ([`SimFs::trace`]).
    trace: Option<Vec<String>>,
}

impl State {
    fn alloc_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn new_inode(&mut self, data: Data) -> Arc<Inode> {
        Arc::new(Inode {
            id: self.alloc_id(),
            generation: self.generation,
            data: Mutex::new(data),
        })
    }

    fn entry(&self, path: &Path) -> Option<&Arc<Inode>> {
        let (dir, name) = split(path).ok()?;
        self.dirs.get(dir)?.written.get(name)
    }

    /// The fault that hits this operation, if any. Every injected fault that matches
    /// counts the operation (its `skip`); the first one due fires.
    fn pick_fault(&mut self, op: FaultOp, paths: &[&Path]) -> Option<FaultKind> {
        let texts: Vec<_> = paths.iter().map(|p| p.to_string_lossy()).collect();
        let mut fired = None;
        let mut i = 0;
        while i < self.faults.len() {
            let fault = &mut self.faults[i];
            let matches = fault.op == op
                && fault
                    .path_contains
                    .as_deref()
                    .is_none_or(|part| texts.iter().any(|t| t.contains(part)));
            if matches {
                if fault.skip > 0 {
                    fault.skip -= 1;
                } else if fired.is_none() {
                    fired = Some(fault.kind);
                    fault.times = fault.times.saturating_sub(1);
                    if fault.times == 0 {
                        self.faults.remove(i);
                        continue;
                    }
                }
            }
            i += 1;
        }
        for random in &self.random {
            if random.op == op
                && self.rng.below(1_000_000) < u64::from(random.per_million)
                && fired.is_none()
            {
                fired = Some(random.kind);
            }
        }
        if fired.is_some() {
            self.faults_fired += 1;
        }
        fired
    }

    /// A fresh inode of the new generation holding what `old` leaves after a cut.
    fn survivor(&mut self, old: &Inode, cut: &Cut) -> Arc<Inode> {
        let (written, durable) = {
            let data = old.data.lock();
            (data.written_vec(), data.durable.clone())
        };
        let content = self.surviving_bytes(&written, durable, cut);
        // A fresh buffer, never the old region: stores through an old map pointer must
        // not reach the new generation.
        self.new_inode(Data::new(content.clone(), content))
    }

    /// The durable bytes plus, page by page, the written bytes that survive.
    fn surviving_bytes(&mut self, written: &[u8], durable: Vec<u8>, cut: &Cut) -> Vec<u8> {
        let mut out = durable;
        if written.len() < out.len() && self.rng.chance(cut.keep_unsynced_pages) {
            out.truncate(written.len());
        }
        for page in (0..written.len()).step_by(PAGE) {
            let w_end = (page + PAGE).min(written.len());
            let new = &written[page..w_end];
            let old = out.get(page..w_end).unwrap_or(&[]);
            if old == new || !self.rng.chance(cut.keep_unsynced_pages) {
                continue;
            }
            let (from, to) = if !cut.torn_pages {
                (0, PAGE)
            } else {
                match self.rng.below(3) {
                    0 => (0, PAGE),
                    1 => (0, HALF),
                    _ => (HALF, PAGE),
                }
            };
            let (start, end) = (page + from, (page + to).min(w_end));
            if start >= end {
                continue;
            }
            if out.len() < end {
                out.resize(end, 0);
            }
            out[start..end].copy_from_slice(&written[start..end]);
        }
        out
    }
}

/// The state shared by a [`SimFs`] and every handle and map it gave out.
struct World {
    seed: u64,
    state: Mutex<State>,
    /// Signalled when an advisory lock is released (and at a power cut).
    unlocked: Condvar,
    /// The current generation, readable without the world's mutex. Written only under the
    /// world's mutex, and before any inode of the old generation is read for the cut, so a
    /// handle that checks it under its inode's mutex either finishes before the cut reads
    /// that inode or sees the new generation.
    generation: AtomicU64,
    ops: AtomicU64,
}

/// What an injected fault leaves an operation to do.
enum Go {
    /// Proceed normally.
    All,
    /// Write only this many bytes, then fail with `ENOSPC`.
    Prefix(usize),
}

impl World {
    /// Ends the generation: see [`SimFs::power_cut`].
    fn cut(&self, cut: &Cut) {
        let mut state = self.state.lock();
        let n = state.faultable;
        if let Some(t) = &mut state.trace {
            t.push(format!("{n} power cut {cut:?}"));
        }
        state.generation += 1;
        self.generation.store(state.generation, Ordering::SeqCst);
        state.locks.clear();
        let old_dirs = std::mem::take(&mut state.dirs);
        // Old inode id -> its survivor, so hard links stay one file.
        let mut revived: HashMap<u64, Arc<Inode>> = HashMap::new();
        for (path, dir) in &old_dirs {
            let names: BTreeSet<&OsString> = dir.written.keys().chain(dir.durable.keys()).collect();
            let mut entries = BTreeMap::new();
            for name in names {
                let written = dir.written.get(name);
                let durable = dir.durable.get(name);
                let synced = match (written, durable) {
                    (Some(w), Some(d)) => Arc::ptr_eq(w, d),
                    _ => false,
                };
                let kept = if synced || !state.rng.chance(cut.keep_unsynced_entries) {
                    durable
                } else {
                    written
                };
                let Some(old) = kept else { continue };
                let new = match revived.entry(old.id) {
                    HashEntry::Occupied(e) => Arc::clone(e.get()),
                    HashEntry::Vacant(e) => Arc::clone(e.insert(state.survivor(old, cut))),
                };
                entries.insert(name.clone(), new);
            }
            state.dirs.insert(
                path.clone(),
                Dir {
                    written: entries.clone(),
                    durable: entries,
                },
            );
        }
        drop(state);
        // Waiters in `lock()` of the old generation wake up and fail.
        self.unlocked.notify_all();
    }

    fn op(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    fn is_current(&self, inode: &Inode) -> bool {
        self.generation.load(Ordering::SeqCst) == inode.generation
    }

    /// Applies the fault, if any, that hits `op` on `paths`. `write_len`: the bytes a
    /// write would store (for a short write's prefix).
    fn fault(&self, op: FaultOp, paths: &[&Path], write_len: usize) -> io::Result<Go> {
        let (kind, prefix) = {
            let mut state = self.state.lock();
            state.faultable += 1;
            let n = state.faultable;
            if let Some(t) = &mut state.trace {
                t.push(format!("{n} {op:?} {paths:?} {write_len}"));
            }
            if let Some((at, _)) = state.cut_at
                && state.faultable >= at
            {
                let (_, cut) = state.cut_at.take().expect("checked above");
                state.faults_fired += 1;
                drop(state);
                self.cut(&cut);
                return Err(power_cut_error());
            }
            let Some(kind) = state.pick_fault(op, paths) else {
                return Ok(Go::All);
            };
            let prefix = state.rng.below(write_len as u64) as usize;
            (kind, prefix)
        };
        match kind {
            FaultKind::NoSpace => Err(os_error(libc::ENOSPC)),
            FaultKind::Eio => Err(os_error(libc::EIO)),
            FaultKind::ShortWrite if op == FaultOp::Write => Ok(Go::Prefix(prefix)),
            FaultKind::ShortWrite => Err(os_error(libc::ENOSPC)),
            FaultKind::SlowSync(pause) => {
                std::thread::sleep(pause);
                Ok(Go::All)
            }
        }
    }
}

/// A simulated disk shared by clones: give one to the engine with
/// `Storage::simulated(&sim)` and keep another to cut the power, inject faults and look
/// at what is durable.
#[derive(Clone)]
pub struct SimFs {
    world: Arc<World>,
    /// For the view a log runs on ([`SimFs::process_view`]): the generation it was made
    /// in. Once the power was cut, the process that used it is gone, so every operation
    /// fails, also the opening of new files by name (which would otherwise let a log that
    /// outlived the cut in the test write into the next generation).
    bound: Option<u64>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFs")
            .field("seed", &self.world.seed)
            .field("generation", &self.world.generation.load(Ordering::Relaxed))
            .field("ops", &self.ops())
            .finish()
    }
}

impl SimFs {
    /// An empty disk (no directories) whose random choices all derive from `seed`.
    pub fn new(seed: u64) -> SimFs {
        SimFs {
            bound: None,
            world: Arc::new(World {
                seed,
                state: Mutex::new(State {
                    rng: SplitMix64(seed),
                    generation: 0,
                    dirs: BTreeMap::new(),
                    faults: Vec::new(),
                    random: Vec::new(),
                    faults_fired: 0,
                    next_id: 0,
                    locks: HashMap::new(),
                    faultable: 0,
                    cut_at: None,
                    trace: None,
                }),
                unlocked: Condvar::new(),
                generation: AtomicU64::new(0),
                ops: AtomicU64::new(0),
            }),
        }
    }

    /// A view for one process (a log) that lives until the next power cut: what
    /// `Storage::simulated` gives the engine.
    pub fn process_view(&self) -> SimFs {
        SimFs {
            world: Arc::clone(&self.world),
            bound: Some(self.world.generation.load(Ordering::SeqCst)),
        }
    }

    /// The power-cut error when this view's process did not survive the last cut.
    fn alive(&self) -> io::Result<()> {
        match self.bound {
            Some(g) if g != self.world.generation.load(Ordering::SeqCst) => Err(power_cut_error()),
            _ => Ok(()),
        }
    }

    /// The seed this disk was created with, to print when a test fails.
    pub fn seed(&self) -> u64 {
        self.world.seed
    }

    /// File system operations performed so far (through the `Fs`, `FsFile` and map
    /// interfaces; the inspection methods here are not counted), for throughput figures.
    pub fn ops(&self) -> u64 {
        self.world.ops.load(Ordering::Relaxed)
    }

    /// How many faults (injected or random) have fired.
    pub fn faults_fired(&self) -> u64 {
        self.world.state.lock().faults_fired
    }

    /// Power cuts so far.
    pub fn generation(&self) -> u64 {
        self.world.generation.load(Ordering::SeqCst)
    }

    /// Adds a fault rule. Rules are checked in the order they were added.
    pub fn inject(&self, fault: Fault) {
        if fault.times > 0 {
            self.world.state.lock().faults.push(fault);
        }
    }

    /// Makes each `op` fail as `kind` with probability `per_million` / 1,000,000, drawn
    /// from the seeded generator; replaces an earlier setting for the same `op` and
    /// `kind`, and 0 removes it. Injected rules take precedence.
    pub fn set_random_faults(&self, op: FaultOp, kind: FaultKind, per_million: u32) {
        let mut state = self.world.state.lock();
        state.random.retain(|r| !(r.op == op && r.kind == kind));
        if per_million > 0 {
            state.random.push(RandomFault {
                op,
                kind,
                per_million,
            });
        }
    }

    /// Removes every injected and random fault.
    pub fn clear_faults(&self) {
        let mut state = self.world.state.lock();
        state.faults.clear();
        state.random.clear();
        state.cut_at = None;
    }

    /// Cuts the power: a new generation starts from the durable state plus what `cut`
    /// lets survive of the rest. Every directory gets its durable entries, and each
    /// unsynced difference (a name added, removed or pointed at another file) survives
    /// with probability `cut.keep_unsynced_entries`. Every file reachable from the new
    /// entries gets a fresh copy of its durable content, plus each 4 KiB page whose
    /// written bytes differ from the durable ones with probability
    /// `cut.keep_unsynced_pages` (only one half of it when torn); the length grows to
    /// cover kept pages. All advisory locks are released, and every handle and map of the
    /// old generation fails from now on.
    pub fn power_cut(&self, cut: &Cut) {
        self.world.cut(cut);
    }

    /// Arms a power cut in the middle of the workload: at the `n`th operation from now
    /// that could fail (a write, sync, map sync, directory sync, create, rename or
    /// removal), which then fails like every later operation of the old generation.
    /// Counts as a fired fault. Replaces a cut armed before.
    pub fn cut_power_after(&self, n: u64, cut: Cut) {
        let mut state = self.world.state.lock();
        let at = state.faultable + n.max(1);
        state.cut_at = Some((at, cut));
    }

    /// Starts recording every operation that could fail, and every power cut, for
    /// [`SimFs::trace`] (a failing simulation prints it).
    pub fn enable_trace(&self) {
        self.world.state.lock().trace.get_or_insert_with(Vec::new);
    }

    /// Adds a line to the trace (a test's own steps, between the disk's operations).
    pub fn note(&self, text: &str) {
        let mut state = self.world.state.lock();
        let n = state.faultable;
        if let Some(t) = &mut state.trace {
            t.push(format!("{n} note: {text}"));
        }
    }

    /// What was recorded since [`SimFs::enable_trace`].
    pub fn trace(&self) -> Vec<String> {
        self.world.state.lock().trace.clone().unwrap_or_default()
    }

    /// Disarms a power cut armed by [`SimFs::cut_power_after`] that has not happened.
    pub fn disarm_power_cut(&self) {
        self.world.state.lock().cut_at = None;
    }

    /// The file names in `dir`'s durable entries (empty when `dir` does not exist).
    pub fn durable_names(&self, dir: &Path) -> Vec<OsString> {
        let state = self.world.state.lock();
        state
            .dirs
            .get(dir)
            .map(|d| d.durable.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The file names in `dir`'s written entries (empty when `dir` does not exist).
    pub fn written_names(&self, dir: &Path) -> Vec<OsString> {
        let state = self.world.state.lock();
        state
            .dirs
            .get(dir)
            .map(|d| d.written.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The durable content of the file durably named `path`: what a power cut with
    /// [`Cut::clean`] would leave there. `None` when no durable entry has that name.
    pub fn read_durable(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.world.state.lock();
        let (dir, name) = split(path).ok()?;
        let inode = state.dirs.get(dir)?.durable.get(name)?;
        let bytes = inode.data.lock().durable.clone();
        Some(bytes)
    }

    /// The written content of the file at `path` (what a read sees now), or `None`.
    pub fn read_written(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.world.state.lock();
        let bytes = state.entry(path)?.data.lock().written_vec();
        Some(bytes)
    }

    /// Plants a file for a test: a new file at `path` holding `bytes`, content and entry
    /// durable, replacing any file of that name (open handles keep the old one). Creates
    /// the missing directories. Not counted as an operation, and never faulted.
    pub fn write_file(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        let (dir, name) = split(path)?;
        let mut state = self.world.state.lock();
        create_dirs(&mut state, dir)?;
        if state.dirs.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            ));
        }
        let inode = state.new_inode(Data::new(bytes.to_vec(), bytes.to_vec()));
        let dir = state.dirs.get_mut(dir).ok_or_else(|| not_found(dir))?;
        dir.written.insert(name.to_owned(), Arc::clone(&inode));
        dir.durable.insert(name.to_owned(), inode);
        Ok(())
    }

    /// Removes the name `path`, written and durable, for a test. Not counted as an
    /// operation, and never faulted.
    pub fn remove_durably(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = split(path)?;
        let mut state = self.world.state.lock();
        let d = state.dirs.get_mut(dir).ok_or_else(|| not_found(dir))?;
        let written = d.written.remove(name);
        let durable = d.durable.remove(name);
        if written.is_none() && durable.is_none() {
            return Err(not_found(path));
        }
        Ok(())
    }

    /// Creates `path` with `len` zeros, content and length durable, entry not.
    fn create_synced(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>> {
        self.world.op();
        let len = to_usize(len)?;
        self.world.fault(FaultOp::Create, &[path], 0)?;
        let write = self.world.fault(FaultOp::Write, &[path], len);
        let (dir, name) = split(path)?;
        let mut state = self.world.state.lock();
        if state.dirs.contains_key(path) || state.entry(path).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        if !state.dirs.contains_key(dir) {
            return Err(not_found(dir));
        }
        // A failed write leaves the file created with what was written, unsynced, as the
        // real backend's would be.
        let data = match &write {
            Ok(Go::All) => Data::new(vec![0; len], vec![0; len]),
            Ok(Go::Prefix(n)) => Data::new(vec![0; *n], Vec::new()),
            Err(_) => Data::new(Vec::new(), Vec::new()),
        };
        let inode = state.new_inode(data);
        let id = state.alloc_id();
        if let Some(d) = state.dirs.get_mut(dir) {
            d.written.insert(name.to_owned(), Arc::clone(&inode));
        }
        drop(state);
        match write? {
            Go::All => Ok(Box::new(self.handle(inode, id, path, true, true))),
            Go::Prefix(_) => Err(os_error(libc::ENOSPC)),
        }
    }

    fn handle(&self, inode: Arc<Inode>, id: u64, path: &Path, read: bool, write: bool) -> SimFile {
        SimFile {
            world: Arc::clone(&self.world),
            inode,
            id,
            path: path.to_owned(),
            read,
            write,
        }
    }
}

/// Creates `path` and its missing parents (durable at once).
fn create_dirs(state: &mut State, path: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = path
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .take_while(|p| !state.dirs.contains_key(*p))
        .collect();
    for dir in missing.into_iter().rev() {
        if state.entry(dir).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is a file", dir.display()),
            ));
        }
        state.dirs.insert(dir.to_owned(), Dir::default());
    }
    Ok(())
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        self.alive()?;
        self.world.op();
        let (read, write, creates) = match mode {
            OpenMode::Read => (true, false, false),
            OpenMode::ReadWrite => (true, true, false),
            OpenMode::Create | OpenMode::CreateNew { .. } => (true, true, true),
            OpenMode::Truncate { .. } => (false, true, true),
        };
        if creates {
            self.world.fault(FaultOp::Create, &[path], 0)?;
        }
        let (dir, name) = split(path)?;
        let mut state = self.world.state.lock();
        if state.dirs.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            ));
        }
        let id = state.alloc_id();
        let existing = state
            .dirs
            .get(dir)
            .ok_or_else(|| not_found(dir))?
            .written
            .get(name)
            .cloned();
        let inode = match (existing, mode) {
            (Some(_), OpenMode::CreateNew { .. }) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists", path.display()),
                ));
            }
            (Some(inode), OpenMode::Truncate { .. }) => {
                inode.data.lock().set_len(0)?;
                inode
            }
            (Some(inode), _) => inode,
            (None, OpenMode::Read | OpenMode::ReadWrite) => return Err(not_found(path)),
            (None, _) => {
                let inode = state.new_inode(Data::new(Vec::new(), Vec::new()));
                if let Some(d) = state.dirs.get_mut(dir) {
                    d.written.insert(name.to_owned(), Arc::clone(&inode));
                }
                inode
            }
        };
        drop(state);
        Ok(Box::new(self.handle(inode, id, path, read, write)))
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.alive()?;
        self.world.op();
        let state = self.world.state.lock();
        if state.dirs.contains_key(path) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", path.display()),
            ));
        }
        let inode = state.entry(path).ok_or_else(|| not_found(path))?;
        let len = inode.data.lock().len();
        Ok(len as u64)
    }

    fn exists(&self, path: &Path) -> bool {
        if self.alive().is_err() {
            return false;
        }
        self.world.op();
        let state = self.world.state.lock();
        state.dirs.contains_key(path) || state.entry(path).is_some()
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.alive()?;
        self.world.op();
        self.world.fault(FaultOp::Remove, &[path], 0)?;
        let (dir, name) = split(path)?;
        let mut state = self.world.state.lock();
        let d = state.dirs.get_mut(dir).ok_or_else(|| not_found(path))?;
        d.written
            .remove(name)
            .map(drop)
            .ok_or_else(|| not_found(path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.alive()?;
        self.world.op();
        self.world.fault(FaultOp::Rename, &[from, to], 0)?;
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        let mut state = self.world.state.lock();
        if state.entry(from).is_none() {
            return Err(not_found(from));
        }
        if state.dirs.contains_key(to) {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                format!("{} is a directory", to.display()),
            ));
        }
        if !state.dirs.contains_key(to_dir) {
            return Err(not_found(to_dir));
        }
        let inode = state
            .dirs
            .get_mut(from_dir)
            .and_then(|d| d.written.remove(from_name))
            .ok_or_else(|| not_found(from))?;
        let d = state
            .dirs
            .get_mut(to_dir)
            .ok_or_else(|| not_found(to_dir))?;
        d.written.insert(to_name.to_owned(), inode);
        Ok(())
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.alive()?;
        self.world.op();
        self.world.fault(FaultOp::Create, &[from, to], 0)?;
        let (to_dir, to_name) = split(to)?;
        let mut state = self.world.state.lock();
        let inode = state.entry(from).cloned().ok_or_else(|| not_found(from))?;
        if state.dirs.contains_key(to) || state.entry(to).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", to.display()),
            ));
        }
        let d = state
            .dirs
            .get_mut(to_dir)
            .ok_or_else(|| not_found(to_dir))?;
        d.written.insert(to_name.to_owned(), inode);
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.alive()?;
        self.world.op();
        create_dirs(&mut self.world.state.lock(), path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<OsString>> {
        self.alive()?;
        self.world.op();
        let state = self.world.state.lock();
        let dir = state.dirs.get(path).ok_or_else(|| not_found(path))?;
        let mut names: BTreeSet<OsString> = dir.written.keys().cloned().collect();
        names.extend(
            state
                .dirs
                .keys()
                .filter(|sub| sub.parent() == Some(path))
                .filter_map(|sub| sub.file_name().map(OsStr::to_owned)),
        );
        Ok(names.into_iter().collect())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.alive()?;
        self.world.op();
        self.world.fault(FaultOp::SyncDir, &[path], 0)?;
        let mut state = self.world.state.lock();
        let dir = state.dirs.get_mut(path).ok_or_else(|| not_found(path))?;
        dir.durable = dir.written.clone();
        Ok(())
    }

    fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>> {
        self.alive()?;
        self.create_synced(path, len)
    }

    /// The same as `create_zeroed`: reserving without writing is a performance matter the
    /// simulation has no use for.
    fn create_allocated(&self, path: &Path, len: u64) -> io::Result<Box<dyn FsFile>> {
        self.alive()?;
        self.create_synced(path, len)
    }
}

/// An open file of the simulated disk.
struct SimFile {
    world: Arc<World>,
    inode: Arc<Inode>,
    /// The handle's id, unique over all generations: the owner of advisory locks.
    id: u64,
    /// The path it was opened with, for faults that match paths.
    path: PathBuf,
    read: bool,
    write: bool,
}

impl fmt::Debug for SimFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimFile")
            .field("path", &self.path)
            .field("inode", &self.inode.id)
            .field("generation", &self.inode.generation)
            .finish()
    }
}

fn refuse(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("the file is not open for {what}"),
    )
}

impl SimFile {
    /// The file's content, or the power-cut error for a handle of an old generation.
    fn data(&self) -> io::Result<MutexGuard<'_, Data>> {
        let data = self.inode.data.lock();
        if self.world.is_current(&self.inode) {
            Ok(data)
        } else {
            Err(power_cut_error())
        }
    }

    fn sync(&self) -> io::Result<()> {
        self.world.op();
        self.world.fault(FaultOp::Sync, &[&self.path], 0)?;
        let mut data = self.data()?;
        data.durable = data.written_vec();
        Ok(())
    }

    fn try_lock_in(&self, state: &mut State, exclusive: bool) -> io::Result<TryLock> {
        if state.generation != self.inode.generation {
            return Err(power_cut_error());
        }
        let holders = state.locks.entry(self.inode.id).or_default();
        if holders.conflicts(self.id, exclusive) {
            Ok(TryLock::WouldBlock)
        } else {
            holders.grant(self.id, exclusive);
            Ok(TryLock::Acquired)
        }
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut state = self.world.state.lock();
        let released = match state.locks.get_mut(&self.inode.id) {
            Some(holders) => {
                let released = holders.release(self.id);
                if holders.is_free() {
                    state.locks.remove(&self.inode.id);
                }
                released
            }
            None => false,
        };
        drop(state);
        if released {
            self.world.unlocked.notify_all();
        }
    }
}

impl FsFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        self.world.op();
        Ok(self.data()?.len() as u64)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.world.op();
        if !self.read {
            return Err(refuse("reading"));
        }
        self.data()?.read_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.world.op();
        if !self.write {
            return Err(refuse("writing"));
        }
        match self.world.fault(FaultOp::Write, &[&self.path], buf.len())? {
            Go::All => self.data()?.write_at(buf, offset),
            Go::Prefix(n) => {
                self.data()?.write_at(&buf[..n], offset)?;
                Err(os_error(libc::ENOSPC))
            }
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.world.op();
        if !self.write {
            return Err(refuse("writing"));
        }
        let len = to_usize(len)?;
        self.data()?.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.sync()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync()
    }

    /// Simulated files have no holes: only an injected `Write` fault (a full disk) can
    /// make it fail.
    fn allocate(&self, _len: u64) -> io::Result<()> {
        self.world.op();
        if !self.write {
            return Err(refuse("writing"));
        }
        match self.world.fault(FaultOp::Write, &[&self.path], 0)? {
            Go::All => self.data().map(drop),
            Go::Prefix(_) => Err(os_error(libc::ENOSPC)),
        }
    }

    fn map(&self, len: u64, writable: bool) -> io::Result<Box<dyn MapRegion>> {
        self.world.op();
        if writable && !self.write {
            return Err(refuse("writing"));
        }
        let len = to_usize(len)?;
        let mut data = self.data()?;
        let file_len = data.len();
        if len > file_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("cannot map {len} bytes of a {file_len}-byte file"),
            ));
        }
        let region = data.region()?;
        drop(data);
        Ok(Box::new(SimMap {
            world: Arc::clone(&self.world),
            inode: Arc::clone(&self.inode),
            region,
            len,
            path: self.path.clone(),
        }))
    }

    fn map_immutable(&self) -> io::Result<ReadOnlyMap> {
        self.world.op();
        if !self.read {
            return Err(refuse("reading"));
        }
        Ok(ReadOnlyMap::owned(self.data()?.written_vec()))
    }

    fn try_lock(&self, exclusive: bool) -> io::Result<TryLock> {
        self.world.op();
        let mut state = self.world.state.lock();
        self.try_lock_in(&mut state, exclusive)
    }

    fn lock(&self) -> io::Result<()> {
        self.world.op();
        let mut state = self.world.state.lock();
        loop {
            match self.try_lock_in(&mut state, true)? {
                TryLock::Acquired => return Ok(()),
                TryLock::WouldBlock => self.world.unlocked.wait(&mut state),
            }
        }
    }
}

/// A map of a simulated file: a view of the file's shared region.
struct SimMap {
    world: Arc<World>,
    inode: Arc<Inode>,
    /// Keeps the memory behind `as_ptr` alive for the map's lifetime, even after a power
    /// cut.
    region: Arc<Region>,
    len: usize,
    path: PathBuf,
}

impl fmt::Debug for SimMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimMap")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("generation", &self.inode.generation)
            .finish()
    }
}

impl MapRegion for SimMap {
    fn as_ptr(&self) -> *mut u8 {
        self.region.raw.as_mut_ptr()
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Copies only the pages covering the range into the durable bytes (the durable
    /// length grows to cover them).
    fn sync_range(&self, start: usize, len: usize) -> io::Result<()> {
        self.world.op();
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.len)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "sync range outside the map")
            })?;
        self.world.fault(FaultOp::Sync, &[&self.path], 0)?;
        let mut data = self.inode.data.lock();
        if !self.world.is_current(&self.inode) {
            return Err(power_cut_error());
        }
        if len == 0 {
            return Ok(());
        }
        let first = start / PAGE * PAGE;
        let last = (end.div_ceil(PAGE) * PAGE).min(self.region.len);
        if data.durable.len() < last {
            data.durable.resize(last, 0);
        }
        self.region.copy_out(first, &mut data.durable[first..last]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Storage;
    use std::sync::mpsc;

    fn dir() -> PathBuf {
        PathBuf::from("/sim/data")
    }

    fn sim() -> SimFs {
        let sim = SimFs::new(42);
        sim.create_dir_all(&dir()).unwrap();
        sim
    }

    fn read_all(file: &dyn FsFile) -> Vec<u8> {
        let mut buf = vec![0u8; file.len().unwrap() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    fn open_read(sim: &SimFs, path: &Path) -> Vec<u8> {
        read_all(&*sim.open(path, OpenMode::Read).unwrap())
    }

    #[test]
    fn unsynced_bytes_vanish_on_a_clean_cut_while_synced_ones_stay() {
        let sim = sim();
        let path = dir().join("a");
        let file = sim
            .open(&path, OpenMode::CreateNew { private: false })
            .unwrap();
        sim.sync_dir(&dir()).unwrap();
        file.write_all_at(b"synced", 0).unwrap();
        file.sync_data().unwrap();
        file.write_all_at(b"+unsynced", 6).unwrap();
        assert_eq!(sim.read_written(&path).unwrap(), b"synced+unsynced");
        assert_eq!(sim.read_durable(&path).unwrap(), b"synced");
        sim.power_cut(&Cut::clean());
        assert_eq!(open_read(&sim, &path), b"synced");
    }

    #[test]
    fn a_synced_file_vanishes_without_a_dir_sync_and_stays_with_one() {
        let sim = sim();
        let path = dir().join("seg");
        drop(sim.create_zeroed(&path, 8192).unwrap());
        assert_eq!(sim.read_durable(&path), None, "entry not durable yet");
        sim.power_cut(&Cut::clean());
        assert!(!sim.exists(&path));
        assert_eq!(sim.read_dir(&dir()).unwrap(), Vec::<OsString>::new());

        drop(sim.create_zeroed(&path, 8192).unwrap());
        sim.sync_dir(&dir()).unwrap();
        sim.power_cut(&Cut::clean());
        assert_eq!(sim.file_len(&path).unwrap(), 8192);
        assert_eq!(open_read(&sim, &path), vec![0u8; 8192]);
    }

    #[test]
    fn rename_without_a_dir_sync_reverts_on_a_cut() {
        let sim = sim();
        let (old, new) = (dir().join("x.tmp"), dir().join("x"));
        sim.write_file(&old, b"tmp").unwrap();
        sim.write_file(&new, b"before").unwrap();
        sim.rename(&old, &new).unwrap();
        assert_eq!(sim.read_written(&new).unwrap(), b"tmp");
        assert!(!sim.exists(&old));
        sim.power_cut(&Cut::clean());
        assert_eq!(open_read(&sim, &new), b"before");
        assert_eq!(open_read(&sim, &old), b"tmp");

        sim.rename(&old, &new).unwrap();
        sim.sync_dir(&dir()).unwrap();
        sim.power_cut(&Cut::clean());
        assert_eq!(open_read(&sim, &new), b"tmp");
        assert_eq!(sim.durable_names(&dir()), vec![OsString::from("x")]);
    }

    #[test]
    fn map_sync_range_makes_only_the_covered_pages_durable() {
        let sim = sim();
        let path = dir().join("seg");
        let file = sim.create_zeroed(&path, 4 * PAGE as u64).unwrap();
        sim.sync_dir(&dir()).unwrap();
        let map = file.map(4 * PAGE as u64, true).unwrap();
        // SAFETY: the map is 4 pages long and alive; nothing else touches these bytes.
        unsafe { std::ptr::write_bytes(map.as_ptr(), 7, 4 * PAGE) };
        map.sync_range(PAGE + 10, PAGE).unwrap(); // touches pages 1 and 2
        let durable = sim.read_durable(&path).unwrap();
        let pages: Vec<bool> = durable
            .chunks(PAGE)
            .map(|p| p.iter().all(|&b| b == 7))
            .collect();
        assert_eq!(pages, [false, true, true, false]);
        assert!(durable[..PAGE].iter().all(|&b| b == 0));
        sim.power_cut(&Cut::clean());
        assert_eq!(open_read(&sim, &path), durable);
    }

    #[test]
    fn map_and_positional_io_are_coherent() {
        let sim = sim();
        let file = sim.create_zeroed(&dir().join("seg"), 8192).unwrap();
        file.write_all_at(b"before", 0).unwrap();
        let map = file.map(8192, true).unwrap();
        let mut buf = [0u8; 6];
        // SAFETY: reads 6 bytes inside the live 8192-byte map.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr(), buf.as_mut_ptr(), 6) };
        assert_eq!(&buf, b"before", "the map sees earlier pwrites");
        // SAFETY: writes 5 bytes inside the live map; nothing reads them concurrently.
        unsafe { std::ptr::copy_nonoverlapping(b"after".as_ptr(), map.as_ptr().add(100), 5) };
        let mut back = [0u8; 5];
        file.read_exact_at(&mut back, 100).unwrap();
        assert_eq!(&back, b"after", "pread sees stores through the map");
        file.write_all_at(b"pwrite", 200).unwrap();
        let second = file.map(4096, false).unwrap();
        assert_eq!(second.as_ptr(), map.as_ptr(), "every map shares one region");
        // SAFETY: reads 6 bytes inside the live map.
        unsafe { std::ptr::copy_nonoverlapping(second.as_ptr().add(200), buf.as_mut_ptr(), 6) };
        assert_eq!(&buf, b"pwrite", "maps see later pwrites");
        assert!(file.set_len(100).is_err(), "a mapped file keeps its length");
        assert!(file.write_all_at(b"x", 8192).is_err());
        assert_eq!(
            file.map(8193, false).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            file.read_exact_at(&mut buf, 8190).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn old_handles_and_maps_fail_after_a_cut_and_a_new_open_sees_the_durable_bytes() {
        let sim = sim();
        let path = dir().join("seg");
        let file = sim.create_zeroed(&path, 8192).unwrap();
        sim.sync_dir(&dir()).unwrap();
        file.write_all_at(b"durable", 0).unwrap();
        file.sync_data().unwrap();
        let map = file.map(8192, true).unwrap();
        file.write_all_at(b"lost", 4096).unwrap();
        sim.power_cut(&Cut::clean());

        assert!(is_power_cut(&map.sync_range(0, 10).unwrap_err()));
        assert!(is_power_cut(&file.sync_data().unwrap_err()));
        assert!(is_power_cut(&file.write_all_at(b"x", 0).unwrap_err()));
        assert!(is_power_cut(
            &file.read_exact_at(&mut [0u8; 1], 0).unwrap_err()
        ));
        assert!(is_power_cut(&file.len().unwrap_err()));
        assert!(is_power_cut(&file.try_lock(true).unwrap_err()));
        assert!(is_power_cut(&file.map(10, false).unwrap_err()));

        let fresh = open_read(&sim, &path);
        assert_eq!(&fresh[..7], b"durable");
        assert!(fresh[7..].iter().all(|&b| b == 0));
    }

    #[test]
    fn stores_through_an_old_map_pointer_stay_in_the_old_generation() {
        let sim = sim();
        let path = dir().join("seg");
        let file = sim.create_zeroed(&path, 4096).unwrap();
        sim.sync_dir(&dir()).unwrap();
        let map = file.map(4096, true).unwrap();
        sim.power_cut(&Cut::keep_all());
        let fresh = sim.open(&path, OpenMode::ReadWrite).unwrap();
        let fresh_map = fresh.map(4096, true).unwrap();
        assert_ne!(fresh_map.as_ptr(), map.as_ptr());
        // SAFETY: the old map is still alive, so its 4096 bytes are valid (the region
        // outlives the power cut); nothing else touches them.
        unsafe { std::ptr::write_bytes(map.as_ptr(), 0xAB, 4096) };
        assert_eq!(read_all(&*fresh), vec![0u8; 4096]);
        assert_eq!(sim.read_written(&path).unwrap(), vec![0u8; 4096]);
        sim.power_cut(&Cut::keep_all());
        assert_eq!(open_read(&sim, &path), vec![0u8; 4096]);
    }

    #[test]
    fn keeping_all_unsynced_pages_keeps_everything_written() {
        let sim = sim();
        let path = dir().join("a");
        sim.write_file(&path, &[1u8; 3 * PAGE]).unwrap();
        let file = sim.open(&path, OpenMode::ReadWrite).unwrap();
        file.write_all_at(&[2u8; 100], PAGE as u64 + 5).unwrap();
        file.write_all_at(&[3u8; 2 * PAGE], 3 * PAGE as u64)
            .unwrap();
        let written = sim.read_written(&path).unwrap();
        sim.power_cut(&Cut {
            keep_unsynced_pages: 1.0,
            torn_pages: false,
            keep_unsynced_entries: 0.0,
        });
        assert_eq!(open_read(&sim, &path), written);
    }

    /// Writes 32 pages of 2s over 32 synced pages of 1s, cuts with torn pages kept, and
    /// returns the surviving bytes.
    fn torn_outcome(seed: u64) -> Vec<u8> {
        let sim = SimFs::new(seed);
        sim.create_dir_all(&dir()).unwrap();
        let path = dir().join("a");
        sim.write_file(&path, &[1u8; 32 * PAGE]).unwrap();
        let file = sim.open(&path, OpenMode::ReadWrite).unwrap();
        file.write_all_at(&[2u8; 32 * PAGE], 0).unwrap();
        sim.power_cut(&Cut {
            keep_unsynced_pages: 1.0,
            torn_pages: true,
            keep_unsynced_entries: 0.0,
        });
        open_read(&sim, &path)
    }

    #[test]
    fn torn_pages_leave_some_page_half_old_half_new_reproducibly() {
        let bytes = torn_outcome(7);
        assert_eq!(bytes.len(), 32 * PAGE);
        let halves: Vec<(u8, u8)> = bytes
            .chunks(PAGE)
            .map(|p| {
                assert!(p[..HALF].iter().all(|&b| b == p[0]), "halves tear whole");
                assert!(p[HALF..].iter().all(|&b| b == p[HALF]));
                (p[0], p[HALF])
            })
            .collect();
        assert!(
            halves.contains(&(2, 1)) && halves.contains(&(1, 2)),
            "{halves:?}"
        );
        assert!(halves.contains(&(2, 2)));
        assert!(
            !halves.contains(&(1, 1)),
            "every page is kept at least in half"
        );
        assert_eq!(torn_outcome(7), bytes, "same seed, same tears");
        assert_ne!(torn_outcome(8), bytes, "another seed, other tears");
    }

    #[test]
    fn injected_eio_on_sync_leaves_the_durable_bytes_unchanged() {
        let sim = sim();
        let path = dir().join("a");
        sim.write_file(&path, b"old").unwrap();
        let file = sim.open(&path, OpenMode::ReadWrite).unwrap();
        file.write_all_at(b"new", 0).unwrap();
        sim.inject(Fault::once(FaultOp::Sync, FaultKind::Eio));
        let err = file.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(sim.read_durable(&path).unwrap(), b"old");
        assert_eq!(
            sim.read_written(&path).unwrap(),
            b"new",
            "still in the page cache"
        );

        let map = file.map(3, true).unwrap();
        sim.inject(Fault::once(FaultOp::Sync, FaultKind::Eio));
        assert!(map.sync_range(0, 3).is_err());
        assert_eq!(sim.read_durable(&path).unwrap(), b"old");
        map.sync_range(0, 3).unwrap();
        assert_eq!(sim.read_durable(&path).unwrap(), b"new");
        assert_eq!(sim.faults_fired(), 2);
    }

    #[test]
    fn no_space_and_short_writes() {
        let sim = sim();
        let path = dir().join("a");
        let file = sim.open(&path, OpenMode::Create).unwrap();
        sim.inject(Fault::once(FaultOp::Write, FaultKind::NoSpace));
        let err = file.write_all_at(&[9u8; 1000], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(file.len().unwrap(), 0, "nothing written");

        sim.inject(Fault::once(FaultOp::Write, FaultKind::ShortWrite));
        let err = file.write_all_at(&[9u8; 1000], 0).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let len = file.len().unwrap();
        assert!(len < 1000, "a prefix only: {len}");
        assert_eq!(read_all(&*file), vec![9u8; len as usize]);

        sim.inject(Fault::once(FaultOp::Write, FaultKind::NoSpace));
        let seg = dir().join("seg");
        let err = sim.create_zeroed(&seg, 4096).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            sim.read_written(&seg).unwrap(),
            b"",
            "created, nothing written"
        );
        file.write_all_at(&[1u8; 1000], 0).unwrap();
        assert_eq!(file.len().unwrap(), 1000, "the faults are used up");
    }

    #[test]
    fn skip_and_times_count_matching_operations() {
        let sim = sim();
        sim.inject(Fault {
            op: FaultOp::Create,
            path_contains: Some("target".into()),
            skip: 2,
            kind: FaultKind::Eio,
            times: 2,
        });
        let create = |name: &str| {
            sim.open(&dir().join(name), OpenMode::Create)
                .map(drop)
                .map_err(|e| e.raw_os_error())
        };
        assert_eq!(create("other"), Ok(()), "other paths do not match");
        assert_eq!(create("target1"), Ok(()));
        assert_eq!(create("target2"), Ok(()));
        assert_eq!(create("target3"), Err(Some(libc::EIO)));
        assert_eq!(create("target4"), Err(Some(libc::EIO)));
        assert_eq!(create("target5"), Ok(()), "removed after firing twice");
        assert_eq!(sim.faults_fired(), 2);
    }

    #[test]
    fn random_faults_are_seeded() {
        let run = |seed| {
            let sim = SimFs::new(seed);
            sim.create_dir_all(&dir()).unwrap();
            sim.set_random_faults(FaultOp::SyncDir, FaultKind::Eio, 300_000);
            (0..64)
                .map(|_| sim.sync_dir(&dir()).is_err())
                .collect::<Vec<_>>()
        };
        let outcome = run(3);
        assert!(outcome.contains(&true) && outcome.contains(&false));
        assert_eq!(run(3), outcome);
    }

    #[test]
    fn locks_conflict_and_are_released_on_drop_and_on_a_power_cut() {
        let sim = sim();
        let path = dir().join("tally.lock");
        sim.write_file(&path, b"").unwrap();
        let open = || sim.open(&path, OpenMode::ReadWrite).unwrap();
        let (a, b) = (open(), open());
        assert!(matches!(a.try_lock(false).unwrap(), TryLock::Acquired));
        assert!(
            matches!(b.try_lock(false).unwrap(), TryLock::Acquired),
            "shared locks share"
        );
        assert!(matches!(b.try_lock(true).unwrap(), TryLock::WouldBlock));
        drop(a);
        assert!(
            matches!(b.try_lock(true).unwrap(), TryLock::Acquired),
            "released on drop"
        );
        let c = open();
        assert!(matches!(c.try_lock(false).unwrap(), TryLock::WouldBlock));

        // lock() waits for the holder to go away.
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let sim = sim.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                let d = sim.open(&path, OpenMode::ReadWrite).unwrap();
                d.lock().unwrap();
                tx.send(()).unwrap();
                drop(d);
            })
        };
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "still waiting"
        );
        drop(b);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();

        assert!(matches!(c.try_lock(true).unwrap(), TryLock::Acquired));
        sim.power_cut(&Cut::clean());
        let e = open();
        assert!(
            matches!(e.try_lock(true).unwrap(), TryLock::Acquired),
            "a cut frees locks"
        );
        drop(c);
    }

    #[test]
    fn lock_waiters_wake_and_fail_at_a_power_cut() {
        let sim = sim();
        let path = dir().join("tally.lock");
        sim.write_file(&path, b"").unwrap();
        let holder = sim.open(&path, OpenMode::ReadWrite).unwrap();
        holder.lock().unwrap();
        let before = sim.ops();
        let waiter = {
            let sim = sim.clone();
            let path = path.clone();
            std::thread::spawn(move || sim.open(&path, OpenMode::ReadWrite).unwrap().lock())
        };
        // Wait until the waiter has opened its handle and called lock(): a handle opened
        // after the cut would belong to the new generation.
        while sim.ops() < before + 2 {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(20));
        sim.power_cut(&Cut::clean());
        let err = waiter.join().unwrap().unwrap_err();
        assert!(is_power_cut(&err));
    }

    /// A fixed sequence of operations with random faults and a lossy cut; returns every
    /// durable file's name and bytes.
    fn scenario(seed: u64) -> Vec<(OsString, Vec<u8>)> {
        let sim = SimFs::new(seed);
        sim.create_dir_all(&dir()).unwrap();
        sim.set_random_faults(FaultOp::Write, FaultKind::ShortWrite, 100_000);
        let storage = Storage::simulated(&sim);
        for i in 0..8u8 {
            let path = dir().join(format!("f{i}"));
            let file = storage.open(&path, OpenMode::Create).unwrap();
            for page in 0..6u64 {
                let _ = file.write_all_at(&[i + page as u8; PAGE], page * PAGE as u64);
                if page == 2 + u64::from(i % 3) {
                    file.sync_data().unwrap();
                }
            }
            if i % 2 == 0 {
                sim.sync_dir(&dir()).unwrap();
            }
        }
        sim.power_cut(&Cut::seeded_loss());
        let names = sim.durable_names(&dir());
        assert!(!names.is_empty());
        names
            .into_iter()
            .map(|n| {
                let bytes = sim.read_durable(&dir().join(&n)).unwrap();
                (n, bytes)
            })
            .collect()
    }

    #[test]
    fn the_same_seed_and_operations_give_the_same_durable_state() {
        let first = scenario(11);
        assert_eq!(scenario(11), first);
        assert_ne!(scenario(12), first, "the seed matters");
    }

    #[test]
    fn threads_share_a_file_and_a_cut_stops_them_cleanly() {
        let sim = sim();
        let path = dir().join("seg");
        let file: Arc<dyn FsFile> = Arc::from(sim.create_zeroed(&path, 64 * PAGE as u64).unwrap());
        sim.sync_dir(&dir()).unwrap();
        let map: Arc<dyn MapRegion> = Arc::from(file.map(64 * PAGE as u64, true).unwrap());
        let workers: Vec<_> = (0..4u8)
            .map(|t| {
                let (file, map) = (Arc::clone(&file), Arc::clone(&map));
                std::thread::spawn(move || {
                    for i in 0..16 {
                        let at = (usize::from(t) * 16 + i) * PAGE;
                        // SAFETY: each thread stores into its own pages of the live map.
                        unsafe { std::ptr::write_bytes(map.as_ptr().add(at), t + 1, PAGE) };
                        let synced = if i % 2 == 0 {
                            map.sync_range(at, PAGE)
                        } else {
                            file.sync_data()
                        };
                        if let Err(e) = synced {
                            assert!(is_power_cut(&e), "{e}");
                            return;
                        }
                    }
                })
            })
            .collect();
        sim.power_cut(&Cut::clean());
        for w in workers {
            w.join().unwrap();
        }
        let after = open_read(&sim, &path);
        assert_eq!(after.len(), 64 * PAGE);
        for (n, page) in after.chunks(PAGE).enumerate() {
            let owner = (n / 16) as u8 + 1;
            assert!(page.iter().all(|&b| b == 0) || page.iter().all(|&b| b == owner));
        }
    }

    #[test]
    fn directory_rules() {
        let sim = sim();
        let a = dir().join("a");
        assert_eq!(
            sim.read_dir(Path::new("/nope")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            sim.sync_dir(Path::new("/nope")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            sim.open(&a, OpenMode::Read).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            sim.rename(&a, &dir().join("b")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        sim.write_file(&a, b"1").unwrap();
        assert_eq!(
            sim.open(&a, OpenMode::CreateNew { private: true })
                .unwrap_err()
                .kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            sim.create_zeroed(&a, 1).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        sim.hard_link(&a, &dir().join("b")).unwrap();
        assert_eq!(
            sim.hard_link(&a, &dir().join("b")).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        sim.create_dir_all(&dir().join("sub")).unwrap();
        assert_eq!(sim.read_dir(&dir()).unwrap(), ["a", "b", "sub"]);

        // An open handle outlives its name, and read-only handles refuse writes.
        let held = sim.open(&a, OpenMode::Read).unwrap();
        assert_eq!(
            held.write_all_at(b"x", 0).unwrap_err().kind(),
            io::ErrorKind::PermissionDenied
        );
        sim.remove_file(&a).unwrap();
        assert!(!sim.exists(&a));
        assert_eq!(read_all(&*held), b"1");
        assert_eq!(open_read(&sim, &dir().join("b")), b"1");
        let truncated = sim
            .open(&dir().join("b"), OpenMode::Truncate { private: false })
            .unwrap();
        assert_eq!(truncated.len().unwrap(), 0);
        assert_eq!(read_all(&*held), b"", "hard links share one file");
        assert_eq!(
            sim.open(&dir().join("b"), OpenMode::Read)
                .unwrap()
                .map_immutable()
                .unwrap()
                .bytes(),
            b""
        );
        assert!(sim.ops() > 0);
    }
}
