//! The event-sourcing toolkit: aggregate loads with and without snapshots, and projection
//! rebuild speed.
//!
//! # What it measures
//! - `aggregate_load/{10,1000,100000}/snapshots`: `Repository::load` of a stream of that
//!   many events, with a snapshot written every 1,000 events (so at most 999 events are
//!   folded after the snapshot; a 10-event stream has none).
//! - `aggregate_load/{10,1000,100000}/no_snapshots`: `Repository::load_without_snapshots`
//!   of the same stream, the baseline: every event folded. The ratio of the two is the
//!   snapshots' gain.
//! - `projection_rebuild`: `projection::fold_window` of a whole log of 1,000,000 events of
//!   256 B in 1,000 streams (`TALLY_BENCH_EVENTS` changes the count), reported as events
//!   per second.
//!
//! The aggregate folds each event's 8-byte payload into a sum and a count; the projection
//! counts events and payload bytes per stream. Both are cheap, so the figures are the
//! toolkit's and the engine's cost, not the handler's.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench toolkit
//! TALLY_BENCH_EVENTS=100000 cargo bench -p tally-benches --bench toolkit -- --quick  # smoke
//! ```
//! Run on an idle machine; the logs are built before measuring, outside it, with
//! `Durability::None`, and read from the page cache.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tally_benches::{TempLog, env_u64, payload, print_environment};
use tally_engine::aggregate::{Aggregate, Repository, SnapshotPolicy};
use tally_engine::projection::{Projection, fold_window};
use tally_engine::{Durability, EventData, EventView, ExpectedVersion, Options};

/// A running sum of the events' 8-byte payloads.
struct Sum {
    total: u64,
    count: u64,
}

impl Aggregate for Sum {
    const SNAPSHOT_VERSION: u32 = 1;

    fn initial() -> Sum {
        Sum { total: 0, count: 0 }
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let b: [u8; 8] = e
            .payload()
            .try_into()
            .map_err(|_| "payload is not 8 bytes")?;
        self.total = self.total.wrapping_add(u64::from_le_bytes(b));
        self.count += 1;
        Ok(())
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let mut v = self.total.to_le_bytes().to_vec();
        v.extend_from_slice(&self.count.to_le_bytes());
        v
    }

    fn decode_snapshot(b: &[u8]) -> Option<Sum> {
        Some(Sum {
            total: u64::from_le_bytes(b.get(..8)?.try_into().ok()?),
            count: u64::from_le_bytes(b.get(8..16)?.try_into().ok()?),
        })
    }
}

/// Events and payload bytes per stream.
#[derive(Default)]
struct Volume(HashMap<String, (u64, u64)>);

impl Projection for Volume {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Volume {
        Volume::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let v = self.0.entry(e.stream().to_owned()).or_default();
        v.0 += 1;
        v.1 += e.payload().len() as u64;
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        Vec::new()
    }

    fn decode_state(_: &[u8]) -> Option<Volume> {
        None
    }
}

fn options() -> Options {
    Options {
        durability: Durability::None,
        auto_checkpoints: false,
        ..Options::default()
    }
}

fn aggregate_load(c: &mut Criterion) {
    let log = TempLog::open(options());
    print_environment("toolkit", log.path());
    let repo = Repository::<Sum>::new(log.log(), SnapshotPolicy::EveryEvents(1000));
    let lengths = [10u64, 1_000, 100_000];
    for &n in &lengths {
        let stream = format!("agg-{n}");
        let mut loaded = repo.load(&stream).unwrap_or_else(|e| panic!("{e}"));
        let mut i = 0;
        while i < n {
            let k = (n - i).min(100);
            let events: Vec<EventData> = (i..i + k)
                .map(|j| EventData::new("Added", j.to_le_bytes().to_vec()))
                .collect();
            repo.save(&stream, &mut loaded, &events)
                .unwrap_or_else(|e| panic!("{e}"));
            i += k;
        }
    }
    log.log().sync().unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("aggregate_load");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &n in &lengths {
        let stream = format!("agg-{n}");
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new(n.to_string(), "snapshots"),
            &stream,
            |b, s| {
                b.iter(|| {
                    let l = repo.load(s).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(l.state.count, n);
                    black_box(l.state.total)
                });
            },
        );
        g.bench_with_input(
            BenchmarkId::new(n.to_string(), "no_snapshots"),
            &stream,
            |b, s| {
                b.iter(|| {
                    let l = repo
                        .load_without_snapshots(s, u64::MAX)
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(l.state.count, n);
                    black_box(l.state.total)
                });
            },
        );
    }
    g.finish();
    log.close();
}

fn projection_rebuild(c: &mut Criterion) {
    let events = env_u64("TALLY_BENCH_EVENTS", 1_000_000).max(1);
    let log = TempLog::open(options());
    let body = payload(256);
    let mut i = 0;
    while i < events {
        let k = (events - i).min(1000);
        let batch: Vec<EventData> = (0..k)
            .map(|_| EventData::new("Tick", body.clone()))
            .collect();
        log.log()
            .append(
                &format!("s-{}", (i / 1000) % 1000),
                ExpectedVersion::Any,
                &batch,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        i += k;
    }
    log.log().sync().unwrap_or_else(|e| panic!("{e}"));
    let to = log.log().next_position().0;
    let mut g = c.benchmark_group("projection_rebuild");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(events));
    g.bench_function(BenchmarkId::from_parameter(events), |b| {
        b.iter(|| {
            let v =
                fold_window::<Volume>(log.log(), "bench", 0, to).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(v.0.values().map(|x| x.0).sum::<u64>(), events);
            black_box(v.0.len())
        });
    });
    g.finish();
    log.close();
}

criterion_group!(benches, aggregate_load, projection_rebuild);
criterion_main!(benches);
