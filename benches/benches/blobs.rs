//! Large payloads: the same attachments kept inline in the records, and stored as blobs in a
//! local-filesystem store with a 40-byte reference in the record (issue 15, FORMAT.md 6.5).
//!
//! # What it measures
//! Two logs of the same events: `TALLY_BENCH_ATTACHMENTS` attachments (default 200) of
//! 256 KiB, each followed by 20 trade events of 256 B, in 3 streams, appended with
//! `Durability::None`. One log has no store (every payload inline), the other a `DirStore`
//! next to it (the attachments go to blobs; the threshold is the default 64 KiB).
//! - `blobs/append_256k/{inline,blob}`: one durable append (`Durability::Fsync`) of a
//!   256 KiB payload. The blob path writes and syncs the object and its directory, checks
//!   its length, then appends and syncs the 112-byte record. Throughput in bytes.
//! - `blobs/replay/{inline,blob}`: `read_all` of the whole log in pages of 1,024 events,
//!   what every projection rebuild does. Throughput in events.
//! - `blobs/read_attachment/{inline,blob}`: one attachment event read by its stream version,
//!   and its bytes: `read_stream` alone inline; `read_stream` then `read_blob` (which reads
//!   the object and checks its BLAKE3 hash) for the blob. Throughput in bytes.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench blobs
//! TALLY_BENCH_ATTACHMENTS=20 cargo bench -p tally-benches --bench blobs -- --quick  # smoke
//! ```
//! Run on an idle machine, or under `chrt -f 10`, and keep the environment line.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tally_benches::{bench_dir, env_u64, print_environment, replay_all};
use tally_engine::cold::{ColdStore, DirStore};
use tally_engine::{ColdOptions, Direction, Durability, EventData, ExpectedVersion, Log, Options};

const ATTACHMENT: usize = 256 << 10;
const SMALL_PER_ATTACHMENT: u64 = 20;

fn options(store: Option<Arc<dyn ColdStore>>, durability: Durability) -> Options {
    Options {
        durability,
        cold: ColdOptions {
            store,
            ..ColdOptions::default()
        },
        ..Options::default()
    }
}

fn attachment(i: u64) -> Vec<u8> {
    (0..ATTACHMENT)
        .map(|k| (k as u8).wrapping_mul(31) ^ (i as u8) ^ (k >> 12) as u8)
        .collect()
}

fn fill(log: &Log, attachments: u64) {
    for i in 0..attachments {
        let stream = format!("trade-{}", i % 3);
        log.append(
            &stream,
            ExpectedVersion::Any,
            &[EventData::new("ConfirmationAttached", attachment(i))],
        )
        .expect("append");
        let small: Vec<EventData> = (0..SMALL_PER_ATTACHMENT)
            .map(|k| {
                EventData::json(
                    "TradeAmended",
                    format!(
                        "{{\"trade\":{i},\"leg\":{k},\"qty\":\"{}.25\",\"pad\":\"{}\"}}",
                        i * k,
                        "x".repeat(180)
                    ),
                )
            })
            .collect();
        log.append(&stream, ExpectedVersion::Any, &small)
            .expect("append");
    }
}

fn bench(c: &mut Criterion) {
    let attachments = env_u64("TALLY_BENCH_ATTACHMENTS", 200);
    let events = attachments * (1 + SMALL_PER_ATTACHMENT);
    let dir = bench_dir();
    print_environment("blobs", dir.path());
    let store: Arc<dyn ColdStore> =
        Arc::new(DirStore::new(dir.path().join("store")).expect("store"));
    let inline_dir = dir.path().join("inline");
    let blob_dir = dir.path().join("blob");
    let mut record_bytes = Vec::new();
    for (d, s) in [(&inline_dir, None), (&blob_dir, Some(Arc::clone(&store)))] {
        let log = Log::open(d, options(s, Durability::None)).expect("open");
        fill(&log, attachments);
        record_bytes.push(
            log.segments()
                .iter()
                .map(|s| s.data_end.saturating_sub(4096))
                .sum::<u64>(),
        );
        log.close().expect("close");
    }
    println!(
        "{attachments} attachments of {ATTACHMENT} B and {} small events: records inline {:.1} MB, with blobs {:.2} MB (+ {:.1} MB of blobs in the store)",
        attachments * SMALL_PER_ATTACHMENT,
        record_bytes[0] as f64 / 1e6,
        record_bytes[1] as f64 / 1e6,
        walk(&dir.path().join("store")) as f64 / 1e6
    );

    let mut g = c.benchmark_group("blobs/append_256k");
    g.throughput(Throughput::Bytes(ATTACHMENT as u64));
    g.sample_size(20);
    for (id, s) in [("inline", None), ("blob", Some(Arc::clone(&store)))] {
        let d = dir.path().join(format!("append-{id}"));
        let log = Log::open(&d, options(s, Durability::Fsync)).expect("open");
        let mut i = 1_000_000u64;
        g.bench_function(id, |b| {
            b.iter(|| {
                i += 1;
                // A new attachment each time (a blob already stored is not written again).
                let mut payload = attachment(i);
                payload[..8].copy_from_slice(&i.to_le_bytes());
                log.append(
                    "trade-9",
                    ExpectedVersion::Any,
                    &[EventData::new("ConfirmationAttached", payload)],
                )
                .expect("append")
            });
        });
        log.close().expect("close");
    }
    g.finish();

    let inline = Log::open(&inline_dir, options(None, Durability::None)).expect("open");
    let blob = Log::open(
        &blob_dir,
        options(Some(Arc::clone(&store)), Durability::None),
    )
    .expect("open");
    let mut g = c.benchmark_group("blobs/replay");
    g.throughput(Throughput::Elements(events));
    g.sample_size(10);
    for (id, log) in [("inline", &inline), ("blob", &blob)] {
        g.bench_function(id, |b| {
            b.iter(|| {
                let n = replay_all(log, 1024);
                assert_eq!(n, events);
                black_box(n)
            });
        });
    }
    g.finish();

    let mut g = c.benchmark_group("blobs/read_attachment");
    g.throughput(Throughput::Bytes(ATTACHMENT as u64));
    for (id, log) in [("inline", &inline), ("blob", &blob)] {
        let mut k = 0u64;
        g.bench_function(id, |b| {
            b.iter(|| {
                k = (k + 7) % attachments;
                let stream = format!("trade-{}", k % 3);
                // The attachment is the first event of each group of 21 in its stream.
                let version = (k / 3) * (1 + SMALL_PER_ATTACHMENT);
                let e = log
                    .read_stream(&stream, version, 1, Direction::Forward)
                    .expect("read");
                let bytes = match e[0].blob() {
                    Some(r) => log.read_blob(&r).expect("blob"),
                    None => e[0].payload().to_vec(),
                };
                assert_eq!(bytes.len(), ATTACHMENT);
                black_box(bytes)
            });
        });
    }
    g.finish();
    inline.close().expect("close");
    blob.close().expect("close");
}

fn walk(d: &std::path::Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(d).expect("list") {
        let e = e.expect("list");
        let m = e.metadata().expect("metadata");
        n += if m.is_dir() { walk(&e.path()) } else { m.len() };
    }
    n
}

criterion_group!(benches, bench);
criterion_main!(benches);
