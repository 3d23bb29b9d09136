//! Shared helpers of the benchmark suites in `benches/`.
//!
//! - [`bench_dir`]: a temporary directory under `$TALLY_BENCH_DIR` (default: the system's
//!   temporary directory), removed when dropped.
//! - [`env_u64`] and [`env_bytes`]: dataset sizes that the environment may shrink for a
//!   smoke run.
//! - [`payload`], [`event`] and [`stream_name`]: the events every suite appends, and
//!   where; [`encoded_body_len`]: how many body bytes such an event takes in the log.
//! - [`TempLog`]: a log in its own [`bench_dir`].
//! - [`PreZeroedFile`]: the file the raw-I/O baselines write into.
//! - [`build_log`]: fills a log quickly (no sync on the append path) for the read, scan and
//!   open suites.
//! - [`print_environment`]: the hardware and file-system line recorded with results.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tally_engine::{EventData, ExpectedVersion, Log, Options, Result};
use tempfile::TempDir;

/// Environment variable naming the directory in which benchmark data directories are made.
pub const BENCH_DIR_ENV: &str = "TALLY_BENCH_DIR";

/// Page size of the raw-I/O baselines: files are pre-zeroed in writes of this size.
pub const ZERO_CHUNK: usize = 4096;

/// A fresh temporary directory inside `$TALLY_BENCH_DIR` if set, else inside the system's
/// temporary directory. Removed when dropped.
///
/// # Panics
/// If the directory cannot be created (a benchmark cannot run without it).
#[must_use]
pub fn bench_dir() -> TempDir {
    let made = match std::env::var_os(BENCH_DIR_ENV) {
        Some(parent) => tempfile::Builder::new()
            .prefix("tally-bench-")
            .tempdir_in(parent),
        None => tempfile::Builder::new().prefix("tally-bench-").tempdir(),
    };
    made.expect("create the benchmark directory (check $TALLY_BENCH_DIR)")
}

/// A log in a fresh [`bench_dir`], closed (and the directory removed) by
/// [`TempLog::close`] or, best effort, when dropped.
#[derive(Debug)]
pub struct TempLog {
    // Field order is drop order: the log goes before its directory.
    log: Option<Log>,
    dir: TempDir,
}

impl TempLog {
    /// Opens (creates) a log with `options` in a fresh [`bench_dir`].
    ///
    /// # Panics
    /// If the directory or the log cannot be created.
    #[must_use]
    pub fn open(options: Options) -> TempLog {
        let dir = bench_dir();
        let log = Log::open(dir.path(), options).expect("open the benchmark log");
        TempLog {
            log: Some(log),
            dir,
        }
    }

    /// The log.
    ///
    /// # Panics
    /// Never: the log is only taken by [`TempLog::close`], which consumes `self`.
    #[must_use]
    pub fn log(&self) -> &Log {
        self.log.as_ref().expect("the log is open until close")
    }

    /// The log's directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Closes the log cleanly and removes its directory.
    ///
    /// # Panics
    /// If the close fails.
    pub fn close(mut self) {
        if let Some(log) = self.log.take() {
            log.close().expect("close the benchmark log");
        }
    }
}

/// The unsigned integer in environment variable `name` (underscores allowed, as in
/// `1_000_000`), or `default` when it is unset.
///
/// # Panics
/// If the variable is set but is not an unsigned integer.
#[must_use]
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not an unsigned integer")),
        Err(_) => default,
    }
}

/// A byte count in environment variable `name`, or `default` when it is unset. Accepts a
/// plain number of bytes or a number with a binary suffix: `268435456`, `256MiB`, `256M`,
/// `4GiB`, `4G`, `512KiB`.
///
/// # Panics
/// If the variable is set but is not such a byte count.
#[must_use]
pub fn env_bytes(name: &str, default: u64) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    parse_bytes(&v).unwrap_or_else(|| panic!("{name}={v:?} is not a byte count like 256MiB"))
}

fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return None,
    };
    number.checked_mul(1 << shift)
}

/// `len` payload bytes: a fixed, non-constant pattern (so that nothing along the way can
/// treat it as zeros).
#[must_use]
pub fn payload(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// The benchmark event: a binary `TradeAmended` of aggregate type `Trade` by actor
/// `bench`, with a [`payload`] of `payload_len` bytes and no event id, so the engine
/// generates a fresh one on every append and the same value can be appended again and
/// again.
#[must_use]
pub fn event(payload_len: usize) -> EventData {
    EventData::new("TradeAmended", payload(payload_len))
        .aggregate_type("Trade")
        .actor("bench")
}

/// The length of `ev`'s record body (its encoded envelope, which includes the stream
/// name) when appended to `stream`, found by appending it to a small scratch log. Every
/// append of the same [`EventData`] (with a generated id and time) to a stream of a name
/// of the same length encodes to this length.
///
/// # Panics
/// If the scratch log cannot be made, appended to or scanned.
#[must_use]
pub fn encoded_body_len(ev: &EventData, stream: &str) -> u64 {
    let scratch = TempLog::open(Options {
        segment_bytes: 1 << 20,
        durability: tally_engine::Durability::None,
        ..Options::default()
    });
    let log = scratch.log();
    log.append(stream, ExpectedVersion::Any, std::slice::from_ref(ev))
        .expect("append to the scratch log");
    let mut len = 0;
    log.scan(
        tally_engine::Position(0),
        tally_engine::Verify::Checksums,
        |r| {
            len = r.body.len() as u64;
        },
    )
    .expect("scan the scratch log");
    scratch.close();
    len
}

/// The name of stream `i` in every suite: `trade-{i}`.
#[must_use]
pub fn stream_name(i: u64) -> String {
    format!("trade-{i}")
}

/// A file of fixed length, allocated and written with zeros (in [`ZERO_CHUNK`] writes)
/// and synced once, so that later overwrites change no file-system metadata and
/// `fdatasync` flushes data blocks only: the best case a log's pre-allocated segment can
/// reach.
#[derive(Debug)]
pub struct PreZeroedFile {
    file: File,
    path: PathBuf,
    len: u64,
}

impl PreZeroedFile {
    /// Creates `path` with `len` bytes (rounded up to [`ZERO_CHUNK`]) of zeros and syncs
    /// it (data and metadata) and its directory.
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(path: &Path, len: u64) -> std::io::Result<PreZeroedFile> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let zeros = [0u8; ZERO_CHUNK];
        let chunks = len.div_ceil(ZERO_CHUNK as u64);
        for _ in 0..chunks {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok(PreZeroedFile {
            file,
            path: path.to_path_buf(),
            len: chunks * ZERO_CHUNK as u64,
        })
    }

    /// The file's length in bytes.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty (never, for a file made by [`PreZeroedFile::create`] with
    /// a positive length).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes record number `seq` of `record.len()` bytes at `seq * record.len()`, wrapping
    /// around at the end of the file, with one `pwrite` (for records that divide the
    /// file's length).
    ///
    /// # Errors
    /// I/O errors.
    pub fn write_record(&self, seq: u64, record: &[u8]) -> std::io::Result<()> {
        let rec = record.len() as u64;
        let slots = (self.len / rec).max(1);
        self.file.write_all_at(record, (seq % slots) * rec)
    }

    /// `fdatasync`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync_data(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// The shape of a log built by [`build_log`].
#[derive(Clone, Copy, Debug)]
pub struct BuildSpec {
    /// Events to append in all.
    pub events: u64,
    /// Number of the first stream.
    pub first_stream: u64,
    /// Streams `trade-{first_stream}` .. `trade-{first_stream + streams - 1}`, appended to
    /// round-robin.
    pub streams: u64,
    /// Events per append (one stream per append).
    pub batch: u64,
    /// Payload bytes per event.
    pub payload_len: usize,
}

/// Appends `spec.events` events to `log` in rounds: each round appends one batch of
/// `spec.batch` events to every stream in turn (the last round may stop early), so that a
/// stream's events are spread over the whole log as independent aggregates' events are.
/// Then syncs and waits for every rolled segment to be sealed, so that neither writeback
/// nor sealing runs during the measurement. Open the log with
/// [`tally_engine::Durability::None`] to build fast.
///
/// # Errors
/// Errors of the appends, the sync or the sealing.
pub fn build_log(log: &Log, spec: BuildSpec) -> Result<()> {
    let batch_len = spec.batch.max(1);
    let streams = spec.streams.max(1);
    let names: Vec<String> = (spec.first_stream..spec.first_stream + streams)
        .map(stream_name)
        .collect();
    let one = event(spec.payload_len);
    let full_batch = vec![one; usize::try_from(batch_len).unwrap_or(usize::MAX)];
    let mut left = spec.events;
    'rounds: loop {
        for name in &names {
            if left == 0 {
                break 'rounds;
            }
            let n = left.min(batch_len);
            let n_usize = usize::try_from(n).unwrap_or(usize::MAX);
            log.append(name, ExpectedVersion::Any, &full_batch[..n_usize])?;
            left -= n;
        }
    }
    log.sync()?;
    log.wait_sealed()
}

/// Prints (to stderr) the machine, file system and directory a suite runs on, to be kept
/// with its results as the style guide's benchmark rules ask. Best effort: unknown fields print as
/// `?`.
pub fn print_environment(suite: &str, dir: &Path) {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "?".into(), |s| s.trim().to_string());
    let (device, fs) = mount_of(dir).unwrap_or_else(|| ("?".into(), "?".into()));
    eprintln!(
        "tally-benches {suite}: {cores} cores ({cpu}), Linux {kernel}, data in {} on {fs} ({device})",
        dir.display()
    );
}

/// The device and file-system type of the mount holding `dir`, from `/proc/self/mounts`.
fn mount_of(dir: &Path) -> Option<(String, String)> {
    let dir = dir.canonicalize().ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let device = f.next()?;
            let point = f.next()?;
            let fs = f.next()?;
            dir.starts_with(point)
                .then(|| (point.len(), device.to_string(), fs.to_string()))
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, device, fs)| (device, fs))
}

/// Reads the whole log forwards in pages of `page` events, as a replay does; returns the
/// number of events read.
///
/// # Panics
/// If a read fails (a benchmark has nothing better to do).
#[must_use]
pub fn replay_all(log: &Log, page: usize) -> u64 {
    let mut from = tally_engine::Position(0);
    let mut n = 0u64;
    loop {
        let events = log
            .read_all(from, page, tally_engine::Direction::Forward)
            .expect("read");
        let Some(last) = events.last() else { break };
        from = last.position.next();
        n += events.len() as u64;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_byte_counts() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("256MiB"), Some(256 << 20));
        assert_eq!(parse_bytes("256M"), Some(256 << 20));
        assert_eq!(parse_bytes("4GiB"), Some(4 << 30));
        assert_eq!(parse_bytes("1_024 KiB"), Some(1 << 20));
        assert_eq!(parse_bytes("4 TiB"), None);
        assert_eq!(parse_bytes("lots"), None);
    }

    #[test]
    fn pre_zeroed_file_wraps_records() {
        let dir = bench_dir();
        let f = PreZeroedFile::create(&dir.path().join("z"), 10_000).unwrap();
        assert_eq!(f.len(), 3 * 4096);
        f.write_record(0, &[1; 256]).unwrap();
        f.write_record(48, &[2; 256]).unwrap(); // 48 slots of 256 B: wraps to slot 0
        f.sync_data().unwrap();
        let bytes = std::fs::read(f.path()).unwrap();
        assert_eq!(&bytes[..256], &[2; 256]);
        assert!(bytes[256..].iter().all(|&b| b == 0));
    }
}
