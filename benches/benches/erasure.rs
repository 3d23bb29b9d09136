//! Personal data (issue 16, FORMAT.md 6.6 and 18.7): what sealing costs appends, and what an
//! erasure costs among many subjects.
//!
//! # What it measures
//! - `erasure/append/{plain,sealed}/{1,100}`: appends of 256-byte JSON payloads to a log with
//!   `Durability::None` (the engine's own cost, not the disk's), one event per append and
//!   batches of 100, without and with one field sealed under one of 10,000 subjects' keys
//!   (all made before the run). Throughput in events; the ratio is the cost of sealing.
//! - `erasure/forget`: [`Log::forget`] of one subject in a key store of
//!   `TALLY_BENCH_SUBJECTS` subjects (default 1,000,000), each iteration a different
//!   subject, in a log of 100,000 sealed events (no legal hold stands): the check, the
//!   signed `$SubjectErased` event made durable, and the key destroyed and synced.
//! - `erasure/durable_append`: one durable append (`Durability::Fsync`) to the same log, the
//!   baseline: a forget is two syncs (the event's and the key store's).
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench erasure
//! TALLY_BENCH_SUBJECTS=10000 cargo bench -p tally-benches --bench erasure -- --quick  # smoke
//! ```
//! Run on an idle machine, or under `chrt -f 10`, and keep the environment line.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tally_benches::{bench_dir, env_u64, print_environment};
use tally_engine::format::sealed::subject_hash;
use tally_engine::keys::{FileKeyStore, KeyStore, SecretKey};
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options, Personal};

const SEALED_SUBJECTS: u64 = 10_000;

fn payload() -> String {
    let head = r#"{"trade":"T-000001","book":"EU-GAS","qty":"1000.00","note":""#;
    format!("{head}{}\"}}", "x".repeat(256 - head.len() - 2))
}

fn event(sealed: bool, n: u64) -> EventData {
    let e = EventData::json("TradeConfirmed", payload());
    if sealed {
        e.personal(Personal::fields(
            format!("client-{}", n % SEALED_SUBJECTS),
            ["book"],
        ))
    } else {
        e
    }
}

fn key_store(dir: &std::path::Path, subjects: u64) -> Arc<FileKeyStore> {
    let store = FileKeyStore::open(
        dir,
        &SecretKey::from_hex(&"07".repeat(32)).expect("key"),
        true,
    )
    .expect("key store");
    let all: Vec<_> = (0..subjects)
        .map(|i| subject_hash(&format!("client-{i}")))
        .collect();
    for chunk in all.chunks(100_000) {
        store.keys_for_append(chunk).expect("keys");
    }
    Arc::new(store)
}

fn bench(c: &mut Criterion) {
    let root = bench_dir();
    print_environment("erasure", root.path());
    let subjects = env_u64("TALLY_BENCH_SUBJECTS", 1_000_000);

    let mut g = c.benchmark_group("erasure/append");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    let keys = key_store(&root.path().join("append-keys"), SEALED_SUBJECTS);
    for batch in [1u64, 100] {
        for (name, sealed) in [("plain", false), ("sealed", true)] {
            let dir = root.path().join(format!("append-{name}-{batch}"));
            let log = Log::open(
                &dir,
                Options {
                    durability: Durability::None,
                    auto_checkpoints: false,
                    keys: Some(keys.clone()),
                    ..Options::default()
                },
            )
            .expect("open");
            let events: Vec<EventData> = (0..batch).map(|n| event(sealed, n)).collect();
            let n = AtomicU64::new(0);
            g.throughput(Throughput::Elements(batch));
            g.bench_function(BenchmarkId::new(name, batch), |b| {
                b.iter(|| {
                    let i = n.fetch_add(1, Ordering::Relaxed);
                    black_box(
                        log.append(
                            &format!("trade-{}", i % 1000),
                            ExpectedVersion::Any,
                            &events,
                        )
                        .expect("append"),
                    )
                });
            });
        }
    }
    g.finish();

    let mut g = c.benchmark_group("erasure");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(10));
    let store = key_store(&root.path().join("forget-keys"), subjects);
    let log = Log::open(
        root.path().join("forget"),
        Options {
            durability: Durability::Fsync,
            auto_checkpoints: false,
            keys: Some(store.clone()),
            ..Options::default()
        },
    )
    .expect("open");
    let batch: Vec<Vec<EventData>> = (0..100)
        .map(|b| (0..1000).map(|n| event(true, b * 1000 + n)).collect())
        .collect();
    for (i, events) in batch.iter().enumerate() {
        log.append(&format!("trade-{i}"), ExpectedVersion::Any, events)
            .expect("fill");
    }
    eprintln!(
        "erasure: {} subjects in the key store, {} events in the log",
        store.subjects(),
        log.next_position().0
    );
    let next = AtomicU64::new(0);
    g.bench_function("forget", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            // Subjects from the far end of the store, one each time.
            let subject = format!("client-{}", subjects - 1 - i % subjects);
            black_box(log.forget(&subject, "dpo", "bench").expect("forget"))
        });
    });
    let plain = event(false, 0);
    g.bench_function("durable_append", |b| {
        b.iter(|| {
            black_box(
                log.append(
                    "baseline",
                    ExpectedVersion::Any,
                    std::slice::from_ref(&plain),
                )
                .expect("append"),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
