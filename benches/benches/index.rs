//! Forensic lookups through the attribute indexes (`Log::find`) on a large log.
//!
//! # The log
//! `TALLY_BENCH_EVENTS` events (default 10,000,000) of a simulated trading day: 100,000
//! trade streams, appended in batches of 10 events of one stream; event types `New`,
//! `Amend`, `Cancel`, `Novate`, `Settle`, `Exercise` in turn; 50 actors; each correlation id
//! shared by 5 events spread over the whole log (2,000,000 correlation ids at 10M); event
//! times spread evenly over 24 hours, so one hour holds 1/24 of the log; payloads of 120 B.
//! It is built with `Durability::None` before measuring, then the indexes are caught up
//! (the time that takes is printed), and everything is read from the page cache.
//!
//! # What it measures
//! - `lookup/correlation`: all events of one correlation id (5 events, in 5 different
//!   segments), a different id each iteration. Baseline `lookup/stream_5`: reading a
//!   5-event stream through the per-stream index (`read_stream`), the engine's primary
//!   lookup for the same number of events.
//! - `window/type_in_event_hour`: all `Amend` events whose event time is in one hour (1/144
//!   of the log), and `window/type_in_record_window`: all `Amend` events recorded in the
//!   1/24 of the log's record-time span, reported as events per second. Baseline
//!   `window/read_all_same_count`: `read_all` of as many consecutive events, the fastest way
//!   to read that many events. A lookup that scaled with the log instead of the result
//!   would be far below it (a scan touches 144 times more events).
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench index
//! TALLY_BENCH_EVENTS=200000 cargo bench -p tally-benches --bench index -- --quick  # smoke
//! ```
//! Run on an idle machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tally_benches::{TempLog, env_u64, payload, print_environment};
use tally_engine::{
    Direction, Durability, EventData, ExpectedVersion, Field, Options, Position, Query, Timestamp,
};

const TYPES: [&str; 6] = ["New", "Amend", "Cancel", "Novate", "Settle", "Exercise"];
const STREAMS: u64 = 100_000;
const BATCH: u64 = 10;
const DAY_NANOS: u64 = 86_400_000_000_000;
const HOUR_NANOS: u64 = 3_600_000_000_000;
/// 2026-11-23T00:00:00Z.
const DAY_START: u64 = 1_795_392_000_000_000_000;

/// The correlation id of event `i` of `n`: ids of 5 events each, the 5 spread over the log.
fn correlation(i: u64, n: u64) -> String {
    let groups = (n / 5).max(1);
    format!("corr-{}", i % groups)
}

fn build(n: u64) -> TempLog {
    let log = TempLog::open(Options {
        durability: Durability::None,
        auto_checkpoints: false,
        ..Options::default()
    });
    print_environment("index", log.path());
    let body = payload(120);
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let k = (n - i).min(BATCH);
        let batch: Vec<EventData> = (i..i + k)
            .map(|j| {
                EventData::new(TYPES[(j % 6) as usize], body.clone())
                    .correlation_id(correlation(j, n))
                    .causation_id(format!("cmd-{j}"))
                    .actor(format!("trader-{}", j % 50))
                    .event_time(Timestamp(DAY_START + j * (DAY_NANOS / n)))
            })
            .collect();
        let stream = format!("trade-{}", (i / BATCH) % STREAMS);
        log.log()
            .append(&stream, ExpectedVersion::Any, &batch)
            .unwrap_or_else(|e| panic!("{e}"));
        i += k;
    }
    log.log().sync().unwrap_or_else(|e| panic!("{e}"));
    log.log().wait_sealed().unwrap_or_else(|e| panic!("{e}"));
    let appended = started.elapsed();
    let started = Instant::now();
    log.log()
        .find(&Query::field(Field::Actor, "nobody"))
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "index: {n} events appended in {:.1} s; attribute indexes caught up {:.1} s later",
        appended.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    log
}

fn lookups(c: &mut Criterion) {
    let n = env_u64("TALLY_BENCH_EVENTS", 10_000_000).max(1000);
    let log = build(n);
    let l = log.log();

    let mut g = c.benchmark_group("lookup");
    g.sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    let mut k = 0u64;
    g.bench_function(BenchmarkId::from_parameter("correlation"), |b| {
        b.iter(|| {
            k = (k + 7919) % (n / 5);
            let id = format!("corr-{k}");
            let got = l
                .find(&Query::field(Field::Correlation, &id))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len(), 5);
            black_box(got)
        });
    });
    // A 5-event stream to read by the per-stream index.
    let five: Vec<EventData> = (0..5)
        .map(|_| EventData::new("New", payload(120)))
        .collect();
    let mut streams = Vec::new();
    for s in 0..1000 {
        let name = format!("five-{s}");
        l.append(&name, ExpectedVersion::NoStream, &five)
            .unwrap_or_else(|e| panic!("{e}"));
        streams.push(name);
    }
    let mut s = 0usize;
    g.bench_function(BenchmarkId::from_parameter("stream_5"), |b| {
        b.iter(|| {
            s = (s + 1) % streams.len();
            let got = l
                .read_stream(&streams[s], 0, 5, Direction::Forward)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len(), 5);
            black_box(got)
        });
    });
    g.finish();

    // Type in a window: the hour 10:00-11:00 of event time, and the matching 1/24 of the
    // record-time span.
    let hour = Timestamp(DAY_START + 10 * HOUR_NANOS)..Timestamp(DAY_START + 11 * HOUR_NANOS);
    let by_event = Query::field(Field::EventType, "Amend").happened(hour);
    let want = l.find(&by_event).unwrap_or_else(|e| panic!("{e}")).len() as u64;
    assert!(want > 0 && want < n / 100);
    let time_at = |p: u64| {
        l.read_all(Position(p), 1, Direction::Forward)
            .unwrap_or_else(|e| panic!("{e}"))[0]
            .record_time
    };
    let (t0, t1) = (time_at(n * 10 / 24), time_at(n * 11 / 24));
    let by_record = Query::field(Field::EventType, "Amend").recorded(t0..t1);
    let want_record = l.find(&by_record).unwrap_or_else(|e| panic!("{e}")).len() as u64;
    eprintln!(
        "index: {want} Amend events in the event-time hour, {want_record} in 1/24 of the record-time span"
    );

    let mut g = c.benchmark_group("window");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(want));
    g.bench_function(BenchmarkId::from_parameter("type_in_event_hour"), |b| {
        b.iter(|| {
            let got = l.find(&by_event).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len() as u64, want);
            assert!(got.iter().all(|e| e.event_type() == "Amend"));
            black_box(got)
        });
    });
    g.bench_function(BenchmarkId::from_parameter("read_all_same_count"), |b| {
        b.iter(|| {
            let got = l
                .read_all(Position(n / 3), want as usize, Direction::Forward)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len() as u64, want);
            black_box(got)
        });
    });
    g.throughput(Throughput::Elements(want_record));
    g.bench_function(BenchmarkId::from_parameter("type_in_record_window"), |b| {
        b.iter(|| {
            let got = l.find(&by_record).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got.len() as u64, want_record);
            black_box(got)
        });
    });
    g.finish();
    log.close();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
