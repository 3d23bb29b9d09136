//! Append throughput and latency, against the raw-I/O floor of the same machine.
//!
//! # What it measures
//! All ids are in the group `append` and report throughput in events per second
//! (`Throughput::Elements`); the mean time per iteration is the time per event across all
//! appenders, not one append's latency (latency percentiles come from `tally bench`).
//!
//! - `append/{fsync,none}/{256B,4KiB}/appenders_{1,4,16,64}`: N threads, each appending to
//!   its own stream (`trade-{thread}`) with a blocking `Log::append(stream,
//!   ExpectedVersion::Any, &[event])`, one event per call. One iteration is one append;
//!   the `iters` of a sample are split over the threads and the wall time from a common
//!   start (a barrier) to the last thread's end is measured. Under `fsync`, concurrent
//!   appends share syncs (group commit), so throughput should grow with N.
//! - `append/inflight`: one thread keeping a window of 1024 `Log::append_async` handles in
//!   flight (`Fsync`, 256 B), waiting for the oldest when the window is full.
//! - `append/none_batch_1000`: one thread appending batches of 1000 events of 256 B with
//!   `Durability::None` (one iteration is one batch, 1000 elements).
//!   `append/none_batch_1000/no_attribute_indexer` is the same with
//!   `Options::index_attributes` off: the ratio of the two is what the background thread
//!   that keeps the attribute indexes caught up costs the appender (on 2 cores it competes
//!   for the CPU). `append/fsync/256B/appenders_16/no_attribute_indexer` does the same for
//!   durable appends from 16 threads.
//!
//! One log (default options, 64 MiB segments) is made per benchmark id, created on its
//! first use and reused by every iteration of that id; it grows during the run (the
//! `4KiB`/`none` ids write a few GiB) and is removed afterwards.
//!
//! # Baselines
//! - `append/baseline/fdatasync_loop/256B`: one thread writing 256 B records at increasing
//!   offsets (`pwrite`) into a pre-zeroed 256 MiB file, with `fdatasync` after each: what
//!   a 256 B `fsync` append costs without group commit, on this disk.
//! - `append/baseline/ideal_group_commit/threads_{1,4,16,64}`: N threads `pwrite` 256 B
//!   records at atomically reserved offsets into the pre-zeroed file and wait until a sync
//!   covers their record; one flusher thread syncs back to back while anyone waits and
//!   wakes the waiters (a `Mutex` and `Condvar`s). No framing, checksums, hashing or
//!   indexes: the ideal group commit to read `append/fsync/256B/appenders_N` against.
//!
//! The pre-zeroed file is written in 4 KiB writes and synced once before any measurement,
//! so that overwrites change no metadata and `fdatasync` flushes data blocks only.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench append                      # everything (a few minutes)
//! cargo bench -p tally-benches --bench append -- 'append/fsync/256B' # a subset (regex)
//! cargo bench -p tally-benches --bench append -- append/baseline
//! ```
//! Data goes to `$TALLY_BENCH_DIR` (default: the system's temporary directory); put it on
//! the disk you want to measure. Latency and `fsync` numbers are only meaningful on an
//! idle machine (the reference machine has 2 cores, ext4 on a virtual disk): stop other
//! work, or run under `chrt -f 10`. Record the environment line printed first with the
//! results.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Barrier, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tally_benches::{PreZeroedFile, TempLog, bench_dir, event, print_environment, stream_name};
use tally_engine::{AppendHandle, Durability, EventData, ExpectedVersion, Log, Options};
use tempfile::TempDir;

/// Concurrent appender (or writer) threads.
const APPENDERS: [usize; 4] = [1, 4, 16, 64];
/// Payload sizes and their names in ids.
const PAYLOADS: [(usize, &str); 2] = [(256, "256B"), (4096, "4KiB")];
/// Size of the baselines' pre-zeroed file.
const BASELINE_FILE_BYTES: u64 = 256 << 20;
/// Record size of the baselines.
const BASELINE_RECORD: usize = 256;
/// Appends kept in flight by `append/inflight`.
const INFLIGHT_WINDOW: usize = 1024;
/// Events per append of `append/none_batch_1000`.
const BATCH: usize = 1000;

fn options(durability: Durability) -> Options {
    Options {
        durability,
        ..Options::default()
    }
}

/// How many of `iters` operations thread `t` of `threads` does.
fn share(iters: u64, threads: usize, t: usize) -> u64 {
    let threads = threads as u64;
    let t = t as u64;
    iters / threads + u64::from(t < iters % threads)
}

/// `iters` blocking one-event appends split over `threads` threads, each on its own
/// stream; the wall time from a common start to the last append's acknowledgement.
fn run_appenders(log: &Log, threads: usize, iters: u64, ev: &EventData) -> Duration {
    let names: Vec<String> = (0..threads as u64).map(stream_name).collect();
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let workers: Vec<_> = names
            .iter()
            .enumerate()
            .map(|(t, name)| {
                let n = share(iters, threads, t);
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    for _ in 0..n {
                        log.append(name, ExpectedVersion::Any, std::slice::from_ref(ev))
                            .expect("append");
                    }
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for w in workers {
            w.join().expect("an appender panicked");
        }
        t0.elapsed()
    })
}

fn bench_engine(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    for (mode, durability) in [("fsync", Durability::Fsync), ("none", Durability::None)] {
        // Syncs take milliseconds on a virtual disk: sample flat rather than linearly.
        g.sampling_mode(if durability == Durability::Fsync {
            SamplingMode::Flat
        } else {
            SamplingMode::Auto
        });
        for (len, size) in PAYLOADS {
            let ev = event(len);
            for threads in APPENDERS {
                let mut log: Option<TempLog> = None;
                g.throughput(Throughput::Elements(1));
                g.bench_function(format!("{mode}/{size}/appenders_{threads}"), |b| {
                    let log = log.get_or_insert_with(|| TempLog::open(options(durability)));
                    b.iter_custom(|iters| run_appenders(log.log(), threads, iters, &ev));
                });
                if let Some(log) = log {
                    log.close();
                }
            }
        }
    }
    // The durable case without the attribute indexer, to read `fsync/256B/appenders_16`
    // against.
    g.sampling_mode(SamplingMode::Flat);
    let ev = event(256);
    let mut log: Option<TempLog> = None;
    g.bench_function("fsync/256B/appenders_16/no_attribute_indexer", |b| {
        let log = log.get_or_insert_with(|| {
            TempLog::open(Options {
                index_attributes: false,
                ..options(Durability::Fsync)
            })
        });
        b.iter_custom(|iters| run_appenders(log.log(), 16, iters, &ev));
    });
    if let Some(log) = log {
        log.close();
    }

    g.sampling_mode(SamplingMode::Flat);
    let mut log: Option<TempLog> = None;
    let ev = event(256);
    g.throughput(Throughput::Elements(1));
    g.bench_function("inflight", |b| {
        let log = log.get_or_insert_with(|| TempLog::open(options(Durability::Fsync)));
        b.iter_custom(|iters| run_inflight(log.log(), iters, &ev));
    });
    if let Some(log) = log {
        log.close();
    }

    g.sampling_mode(SamplingMode::Auto);
    let batch = vec![event(256); BATCH];
    g.throughput(Throughput::Elements(BATCH as u64));
    for (id, index_attributes) in [
        ("none_batch_1000", true),
        ("none_batch_1000/no_attribute_indexer", false),
    ] {
        let mut log: Option<TempLog> = None;
        g.bench_function(id, |b| {
            let log = log.get_or_insert_with(|| {
                TempLog::open(Options {
                    index_attributes,
                    ..options(Durability::None)
                })
            });
            let name = stream_name(0);
            b.iter(|| {
                log.log()
                    .append(&name, ExpectedVersion::Any, &batch)
                    .expect("append")
            });
        });
        if let Some(log) = log {
            log.close();
        }
    }
    g.finish();
}

/// `iters` one-event `append_async` calls from one thread with at most
/// [`INFLIGHT_WINDOW`] unacknowledged; the time until the last is acknowledged.
fn run_inflight(log: &Log, iters: u64, ev: &EventData) -> Duration {
    let name = stream_name(0);
    let mut window: VecDeque<AppendHandle> = VecDeque::with_capacity(INFLIGHT_WINDOW);
    let t0 = Instant::now();
    for _ in 0..iters {
        if window.len() == INFLIGHT_WINDOW
            && let Some(oldest) = window.pop_front()
        {
            oldest.wait().expect("append acknowledged");
        }
        let handle = log
            .append_async(&name, ExpectedVersion::Any, std::slice::from_ref(ev))
            .expect("append_async");
        window.push_back(handle);
    }
    for handle in window {
        handle.wait().expect("append acknowledged");
    }
    t0.elapsed()
}

/// The baselines' pre-zeroed file and its directory.
struct BaselineFile {
    // Field order is drop order: the file goes before its directory.
    file: PreZeroedFile,
    _dir: TempDir,
}

impl BaselineFile {
    fn create() -> BaselineFile {
        let dir = bench_dir();
        let file = PreZeroedFile::create(&dir.path().join("baseline.dat"), BASELINE_FILE_BYTES)
            .expect("create the pre-zeroed baseline file");
        BaselineFile { file, _dir: dir }
    }
}

/// The ideal group commit's shared state.
struct GroupCommit<'f> {
    file: &'f PreZeroedFile,
    /// The next record number to reserve (its offset is `seq * 256`, wrapping).
    next: AtomicU64,
    syncs: Mutex<Syncs>,
    /// Signalled when a writer needs a sync the flusher has not started.
    work: Condvar,
    /// Signalled when a sync completes.
    done: Condvar,
}

/// Sync generations. A record written before sync `k` started is durable once
/// `completed >= k`. (Generations rather than an offset watermark: a reserved offset may
/// not have been written yet when the flusher reads the watermark, and a sync started
/// then would not cover it.)
#[derive(Default)]
struct Syncs {
    /// The highest generation a writer waits for.
    requested: u64,
    /// Syncs started.
    started: u64,
    /// The last sync completed.
    completed: u64,
    stop: bool,
}

impl<'f> GroupCommit<'f> {
    fn new(file: &'f PreZeroedFile) -> Self {
        GroupCommit {
            file,
            next: AtomicU64::new(0),
            syncs: Mutex::new(Syncs::default()),
            work: Condvar::new(),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Syncs> {
        self.syncs.lock().expect("group-commit state poisoned")
    }

    /// Writes one record and waits until a sync covers it.
    fn commit(&self, record: &[u8]) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        self.file.write_record(seq, record).expect("pwrite");
        let mut s = self.lock();
        // A sync in progress may have started before the write: wait for the next one.
        let target = s.started + 1;
        if s.requested < target {
            s.requested = target;
            self.work.notify_one();
        }
        while s.completed < target {
            s = self.done.wait(s).expect("group-commit state poisoned");
        }
    }

    /// The flusher: syncs back to back while a writer waits, until stopped.
    fn flusher(&self) {
        let mut s = self.lock();
        loop {
            while s.requested <= s.started && !s.stop {
                s = self.work.wait(s).expect("group-commit state poisoned");
            }
            if s.requested <= s.started {
                return; // stopped, and nobody waits
            }
            s.started += 1;
            let generation = s.started;
            drop(s);
            self.file.sync_data().expect("fdatasync");
            s = self.lock();
            s.completed = generation;
            self.done.notify_all();
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.work.notify_one();
    }
}

/// `iters` records committed by `threads` writers through the ideal group commit; the
/// wall time from a common start to the last acknowledgement.
fn run_ideal_group_commit(file: &PreZeroedFile, threads: usize, iters: u64) -> Duration {
    let gc = GroupCommit::new(file);
    let record = [0x5a_u8; BASELINE_RECORD];
    let start = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        let flusher = s.spawn(|| gc.flusher());
        let writers: Vec<_> = (0..threads)
            .map(|t| {
                let n = share(iters, threads, t);
                let (gc, start, record) = (&gc, &start, &record);
                s.spawn(move || {
                    start.wait();
                    for _ in 0..n {
                        gc.commit(record);
                    }
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for w in writers {
            w.join().expect("a writer panicked");
        }
        let elapsed = t0.elapsed();
        gc.stop();
        flusher.join().expect("the flusher panicked");
        elapsed
    })
}

fn bench_baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Elements(1));
    let mut file: Option<BaselineFile> = None;

    g.bench_function("baseline/fdatasync_loop/256B", |b| {
        let f = &file.get_or_insert_with(BaselineFile::create).file;
        let record = [0x5a_u8; BASELINE_RECORD];
        let mut seq = 0u64;
        b.iter(|| {
            f.write_record(seq, &record).expect("pwrite");
            f.sync_data().expect("fdatasync");
            seq += 1;
        });
    });

    for threads in APPENDERS {
        g.bench_function(
            format!("baseline/ideal_group_commit/threads_{threads}"),
            |b| {
                let f = &file.get_or_insert_with(BaselineFile::create).file;
                b.iter_custom(|iters| run_ideal_group_commit(f, threads, iters));
            },
        );
    }
    g.finish();
}

fn environment(_: &mut Criterion) {
    print_environment("append", bench_dir().path());
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = environment, bench_baseline, bench_engine
}
criterion_main!(benches);
