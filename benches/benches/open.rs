//! Opening a large log: after a clean close, and after a crash.
//!
//! # What it measures
//! Both ids time `Log::open` alone, with the production options (`Options::default()`:
//! `Fsync`, `Strict`, 64 MiB segments), and report time per open.
//!
//! - `open/after_crash`: open after `Log::crash()` (no final sync, no index sidecar or
//!   stream-table snapshot written, lock released), with the active segment about half
//!   full (32 MiB of records, the expected fill at a crash at a random moment) and never
//!   closed cleanly, so open scans and checks all of its records. One iteration: the
//!   timed open, then, untimed, an append of 10 events of 256 B and a crash, which
//!   leaves the log as the next iteration expects. Each open must report an unclean
//!   start that scanned at least the active segment's records (asserted).
//! - `open/after_clean_close`: open of a log closed cleanly, which reads segment headers,
//!   footers, index sidecars and the stream-table snapshot, and no records. One
//!   iteration: the timed open, then an untimed `close` (which writes the active
//!   segment's index and the snapshot again). Each open must report a clean start.
//!
//! A clean close writes an index sidecar covering the active segment's records, and
//! later crashes then scan only what follows it; so `after_crash` runs first, on the log
//! as built, and `after_clean_close` closes the log cleanly once before measuring. (Run
//! alone after the other, `after_crash` rebuilds the log.)
//!
//! The log's files are in the page cache (they were just written): these are warm opens.
//! For cold ones, drop the caches between iterations (as root: `sync; echo 3 >
//! /proc/sys/vm/drop_caches`), which this suite does not do.
//!
//! The log is built once, outside the measurement, from `TALLY_BENCH_OPEN_BYTES` (default
//! 4 GiB, at least 128 MiB): that many bytes' worth of 64 MiB segments (64 by default),
//! all full and sealed but the last, which is filled half (so the log holds about
//! 63.5 × 64 MiB), with batches of 1000 events of 256 B payload to 10,000 streams
//! round-robin (`Durability::None`), then synced, sealed, and crashed. Building the
//! default takes a minute or so and 4 GiB of disk.
//!
//! # Baseline
//! None in this suite: compare `after_crash` with `after_clean_close` (the difference is
//! mostly the scan of the active segment), and each with earlier runs.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench open
//! TALLY_BENCH_OPEN_BYTES=256MiB cargo bench -p tally-benches --bench open -- --quick  # smoke
//! ```
//! Smoke runs use a 256 MiB log (4 segments); quote results with the log size. Data goes
//! to `$TALLY_BENCH_DIR` (default: the system's temporary directory). Run on an idle
//! machine (the reference machine has 2 cores, ext4 on a virtual disk), and record the
//! environment line printed first with the results.

use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use tally_benches::{bench_dir, env_bytes, event, print_environment, stream_name};
use tally_engine::{Durability, ExpectedVersion, Log, Options};
use tempfile::TempDir;

/// Log size unless `TALLY_BENCH_OPEN_BYTES` says otherwise.
const DEFAULT_BYTES: u64 = 4 << 30;
/// Segment size of the log.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Events per append while building.
const BUILD_BATCH: usize = 1000;
/// Streams written round-robin while building.
const STREAMS: u64 = 10_000;
/// Events appended before each crash.
const CRASH_BATCH: usize = 10;

/// The options of every timed open: the production defaults.
fn options() -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        ..Options::default()
    }
}

/// The log and the state it was left in.
struct Dataset {
    dir: TempDir,
    /// Records in the active segment when the log was built.
    active_records: u64,
    /// The log has been closed cleanly since it was built.
    clean: bool,
}

/// Builds the log (see the module documentation) and crashes it.
fn build() -> Dataset {
    let target = env_bytes("TALLY_BENCH_OPEN_BYTES", DEFAULT_BYTES);
    let segments = usize::try_from((target / SEGMENT_BYTES).max(2)).unwrap_or(usize::MAX);
    let dir = bench_dir();
    print_environment("open", dir.path());
    let t0 = Instant::now();
    let log = Log::open(
        dir.path(),
        Options {
            durability: Durability::None,
            ..options()
        },
    )
    .expect("open the new log");
    let batch = vec![event(256); BUILD_BATCH];
    let mut i = 0;
    let mut append = |log: &Log| {
        log.append(&stream_name(i % STREAMS), ExpectedVersion::Any, &batch)
            .expect("append while building");
        i += 1;
    };
    while log.segments().len() < segments {
        append(&log);
    }
    let full = log.segments()[0].record_count;
    let active = |log: &Log| log.segments().last().map_or(0, |s| s.record_count);
    while active(&log) < full / 2 {
        append(&log);
    }
    log.sync().expect("sync the new log");
    log.wait_sealed().expect("seal the new log");
    let segs = log.segments();
    let records: u64 = segs.iter().map(|s| s.record_count).sum();
    let active_records = active(&log);
    log.crash();
    let bytes: u64 = std::fs::read_dir(dir.path())
        .expect("list the log directory")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "open: built {records} records in {} segments ({active_records} in the active one), \
         {} MiB of files, in {:.1?}",
        segs.len(),
        bytes >> 20,
        t0.elapsed()
    );
    Dataset {
        dir,
        active_records,
        clean: false,
    }
}

fn open_after_crash(d: &Dataset, iters: u64) -> Duration {
    let batch = vec![event(256); CRASH_BATCH];
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        let log = Log::open(d.dir.path(), options()).expect("open after the crash");
        timed += t0.elapsed();
        let report = log.recovery_report();
        assert!(!report.clean, "open after a crash is not clean");
        assert!(
            report.records_scanned >= d.active_records,
            "open after a crash scanned {} records, fewer than the {} of the active segment",
            report.records_scanned,
            d.active_records
        );
        log.append("crash", ExpectedVersion::Any, &batch)
            .expect("append before the crash");
        log.crash();
    }
    timed
}

fn open_after_clean_close(d: &mut Dataset, iters: u64) -> Duration {
    if !d.clean {
        Log::open(d.dir.path(), options())
            .expect("recover")
            .close()
            .expect("close cleanly");
        d.clean = true;
    }
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let t0 = Instant::now();
        let log = Log::open(d.dir.path(), options()).expect("open");
        timed += t0.elapsed();
        assert!(log.recovery_report().clean, "the last close was clean");
        log.close().expect("close");
    }
    timed
}

fn bench_open(c: &mut Criterion) {
    let mut data: Option<Dataset> = None;
    let mut g = c.benchmark_group("open");
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("after_crash", |b| {
        if data.as_ref().is_some_and(|d| d.clean) {
            data = None; // see the module documentation
        }
        let d = data.get_or_insert_with(build);
        b.iter_custom(|iters| open_after_crash(d, iters));
    });
    g.bench_function("after_clean_close", |b| {
        let d = data.get_or_insert_with(build);
        b.iter_custom(|iters| open_after_clean_close(d, iters));
    });
    g.finish();
}

fn config() -> Criterion {
    // Each timed open has untimed work after it (a close, or an append and a crash), so a
    // sample takes longer than its measured time.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_open
}
criterion_main!(benches);
