//! Reading one stream's latest events from a large log.
//!
//! # What it measures
//! - `read/stream_latest_100`: `Log::read_stream(stream, u64::MAX, 100,
//!   Direction::Backward)` (an aggregate's newest 100 events, decoded), cycling over the
//!   streams with a prime stride so that consecutive reads hit different streams. Reports
//!   the time per read and, as throughput, events read per second.
//!
//! The log is built once, before the first measurement and outside it: 1,000,000 events
//! of 256 B payload in 10,000 streams (`trade-0` .. `trade-9999`), appended round-robin
//! one event per stream per round with `Durability::None`, so that each stream's 100
//! events are spread over the whole log (about 400 MiB, several 64 MiB segments) as
//! independent aggregates' events are. It is synced and every rolled segment sealed
//! before measuring. Reads are served from the page cache (the log was just written).
//!
//! `TALLY_BENCH_EVENTS` shrinks (or grows) the dataset; the number of streams follows it
//! (events / 100, at most 10,000) so that each stream still has 100 events.
//!
//! # Baseline
//! None in this suite: compare with earlier runs of the same id (criterion keeps the last
//! run as its baseline; `--save-baseline` / `--baseline` name them).
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench read
//! TALLY_BENCH_EVENTS=100000 cargo bench -p tally-benches --bench read -- --quick  # smoke
//! ```
//! Building the default dataset takes a few seconds. Data goes to `$TALLY_BENCH_DIR`
//! (default: the system's temporary directory). Run on an idle machine (the reference
//! machine has 2 cores, ext4 on a virtual disk), or under `chrt -f 10`, and record the
//! environment line printed first with the results.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally_benches::{BuildSpec, TempLog, build_log, env_u64, print_environment, stream_name};
use tally_engine::{Direction, Durability, Options};

/// Events in the log unless `TALLY_BENCH_EVENTS` says otherwise.
const DEFAULT_EVENTS: u64 = 1_000_000;
/// Events read per call.
const LATEST: usize = 100;
/// Stride between the streams of consecutive reads: a prime, so the reads visit every
/// stream (of any count that is not a multiple of it) before repeating.
const STRIDE: usize = 7919;

/// The read dataset.
struct Dataset {
    log: TempLog,
    /// The stream names, `trade-0` ..
    names: Vec<String>,
}

fn build() -> Dataset {
    let events = env_u64("TALLY_BENCH_EVENTS", DEFAULT_EVENTS).max(1);
    let streams = (events / LATEST as u64).clamp(1, 10_000);
    let log = TempLog::open(Options {
        durability: Durability::None,
        ..Options::default()
    });
    print_environment("read", log.path());
    let t0 = Instant::now();
    build_log(
        log.log(),
        BuildSpec {
            events,
            first_stream: 0,
            streams,
            batch: 1,
            payload_len: 256,
        },
    )
    .expect("build the read dataset");
    eprintln!(
        "read: built {events} events of 256 B in {streams} streams, {} segments, in {:.1?}",
        log.log().segments().len(),
        t0.elapsed()
    );
    let names: Vec<String> = (0..streams).map(stream_name).collect();
    let last = log
        .log()
        .read_stream(
            &names[names.len() - 1],
            u64::MAX,
            LATEST,
            Direction::Backward,
        )
        .expect("read the last stream");
    let per_stream = usize::try_from(events / streams).unwrap_or(usize::MAX);
    assert_eq!(last.len(), per_stream.min(LATEST), "every stream is full");
    Dataset { log, names }
}

fn bench_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("read");
    let mut data: Option<Dataset> = None;
    g.throughput(Throughput::Elements(LATEST as u64));
    g.bench_function("stream_latest_100", |b| {
        let d = data.get_or_insert_with(build);
        let (log, names) = (d.log.log(), &d.names);
        let mut k = 0;
        b.iter(|| {
            k = (k + STRIDE) % names.len();
            let events = log
                .read_stream(&names[k], u64::MAX, LATEST, Direction::Backward)
                .expect("read_stream");
            black_box(events)
        });
    });
    g.finish();
    if let Some(d) = data {
        d.log.close();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_read
}
criterion_main!(benches);
