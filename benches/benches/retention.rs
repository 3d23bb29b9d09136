//! Retention (issue 16, FORMAT.md 5.5): judging a log against its policies, applying a run,
//! and what a run costs the durable appends that go on beside it.
//!
//! # What it measures
//! A template log of `TALLY_BENCH_EVENTS` events (default 1,000,000) of 256 B in 10,000
//! trade streams, every other trade settled, written with `Durability::None` into 64 MiB
//! segments and sealed; a policy removes each settled trade's whole history (seven years
//! after `TradeSettled`, judged eight years on), so a run removes half the events.
//! - `retention/plan`: [`Log::retention_plan`] over the template (two passes over every
//!   record). Throughput in events examined.
//! - `retention/apply`: [`Log::apply_retention`] on a fresh copy of the template (the copy is
//!   made outside the timing): the plan, the run's event and its sync, and every sealed
//!   segment rewritten, synced and renamed. Throughput in events of the log.
//! - `retention/durable_appends/{alone,during_retention}`: 300 durable appends
//!   (`Durability::Fsync`, one appender) on a fresh copy, alone, and (the mean of batches of
//!   300 appended one after the other for as long as the run lasts) while another thread
//!   applies retention to the same log. The ratio is the run's cost to appends.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench retention
//! TALLY_BENCH_EVENTS=100000 cargo bench -p tally-benches --bench retention -- --quick  # smoke
//! ```
//! Run on an idle machine, or under `chrt -f 10`, and keep the environment line.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tally_benches::{bench_dir, env_u64, print_environment};
use tally_engine::governance::{Keep, PolicyScope, PolicySet};
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options, Timestamp};

const STREAMS: u64 = 10_000;
const APPENDS: u64 = 300;

fn options(durability: Durability) -> Options {
    Options {
        durability,
        auto_checkpoints: false,
        ..Options::default()
    }
}

fn template(dir: &Path, events: u64) {
    let log = Log::open(dir, options(Durability::None)).expect("open the template");
    let per_stream = (events / STREAMS).max(2);
    let payload = format!("{{\"trade\":0,\"pad\":\"{}\"}}", "x".repeat(230));
    for round in 0..per_stream {
        for s in 0..STREAMS {
            let t = match round {
                0 => "TradeNew",
                r if r + 1 == per_stream && s % 2 == 0 => "TradeSettled",
                _ => "TradeAmended",
            };
            let e = EventData::json(t, payload.clone()).aggregate_type("Trade");
            log.append(&format!("trade-{s}"), ExpectedVersion::Any, &[e])
                .expect("bench step");
        }
    }
    log.set_retention_policy(
        &PolicySet {
            name: "trades-7y".into(),
            scope: PolicyScope::Prefix("trade-".into()),
            keep: Keep::AfterEvent {
                event_type: "TradeSettled".into(),
                nanos: 1,
            },
            reason: "bench".into(),
        },
        "bench",
    )
    .expect("bench step");
    // Filler so that every trade event is in a sealed segment.
    let filler = "y".repeat(1000);
    for n in 0..70_000u64 {
        let e = EventData::json("Pad", format!("{{\"n\":{n},\"p\":\"{filler}\"}}"));
        log.append("filler", ExpectedVersion::Any, &[e])
            .expect("bench step");
    }
    log.wait_sealed().expect("bench step");
    log.close().expect("bench step");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("bench step");
    for e in std::fs::read_dir(from).expect("bench step") {
        let e = e.expect("bench step");
        let name = e.file_name();
        if name == "tally.lock" {
            continue;
        }
        if e.file_type().expect("bench step").is_dir() {
            copy_dir(&e.path(), &to.join(&name));
        } else {
            std::fs::copy(e.path(), to.join(&name)).expect("bench step");
        }
    }
}

/// Now: the policy keeps a settled trade for a nanosecond (a run is judged now).
fn far() -> Timestamp {
    tally_engine::now()
}

/// `APPENDS` durable appends, one at a time; their total time.
fn durable_appends(log: &Log, batch: u32) -> Duration {
    let start = Instant::now();
    for n in 0..APPENDS {
        let e = EventData::json("TradeNew", format!("{{\"n\":{n}}}"));
        log.append(&format!("new-{batch}-{n}"), ExpectedVersion::NoStream, &[e])
            .expect("bench step");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let events = env_u64("TALLY_BENCH_EVENTS", 1_000_000);
    let root = bench_dir();
    print_environment("retention", root.path());
    let base = root.path().join("template");
    template(&base, events);
    let work = root.path().join("work");
    let fresh = || {
        let _ = std::fs::remove_dir_all(&work);
        copy_dir(&base, &work);
    };

    let mut g = c.benchmark_group("retention");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(events));
    {
        let log = Log::open(&base, options(Durability::None)).expect("open the template");
        let plan = log.retention_plan(far()).expect("bench step");
        eprintln!(
            "retention: {} events examined, {} due",
            plan.examined,
            plan.removed_events()
        );
        g.bench_function("plan", |b| {
            b.iter(|| {
                black_box(
                    log.retention_plan(far())
                        .expect("bench step")
                        .removed_events(),
                )
            });
        });
        log.close().expect("bench step");
    }
    g.bench_function("apply", |b| {
        b.iter_batched(
            || {
                fresh();
                Log::open(&work, options(Durability::None)).expect("open the copy")
            },
            |log| {
                let done = log
                    .apply_retention(far(), "bench", "bench")
                    .expect("bench step");
                assert!(done.removed > 0);
                log
            },
            BatchSize::PerIteration,
        );
    });
    g.throughput(Throughput::Elements(APPENDS));
    g.bench_function("durable_appends/alone", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fresh();
                let log = Log::open(&work, options(Durability::Fsync)).expect("open the copy");
                total += durable_appends(&log, 0);
                log.close().expect("bench step");
            }
            total
        });
    });
    g.bench_function("durable_appends/during_retention", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                fresh();
                let log = Log::open(&work, options(Durability::Fsync)).expect("open the copy");
                // Batches of appends for as long as the run lasts; the mean batch time is the
                // sample, so the whole run (its scan and its rewrites) is covered.
                std::thread::scope(|s| {
                    let run = s.spawn(|| {
                        log.apply_retention(far(), "bench", "bench")
                            .expect("bench step")
                    });
                    let (mut spent, mut batches) = (Duration::ZERO, 0u32);
                    while !run.is_finished() || batches == 0 {
                        spent += durable_appends(&log, batches);
                        batches += 1;
                    }
                    total += spent / batches;
                    let done = run.join().expect("bench step");
                    assert!(done.removed > 0);
                });
                log.close().expect("bench step");
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
