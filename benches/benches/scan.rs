//! Full forward scans of a log from the page cache, against one core's BLAKE3.
//!
//! # What it measures
//! Every id is in the group `scan` and reports throughput in record-body bytes per second
//! (`Throughput::Bytes` of the sum of every record's encoded envelope, the bytes the
//! chain hashes), so the ids read as ratios of each other:
//!
//! - `scan/checksums`: `Log::scan(Position(0), Verify::Checksums, |_| {})`: header and
//!   body CRCs, padding and positions of every record, one thread.
//! - `scan/chain`: `Log::scan(Position(0), Verify::Chain, |_| {})`: the checksums plus
//!   every record's chain hash recomputed (a BLAKE3 of the body, and one of the link),
//!   one thread.
//! - `scan/chain_2_threads`: `Log::check_chain(2)`: the same checks, segments spread
//!   over two threads.
//!
//! # Baseline
//! - `scan/blake3_records_1_thread`: `blake3::hash` of every record body once, one
//!   thread, with nothing else: the floor of `scan/chain` on one core. The bodies are
//!   copied out of the log once (by a scan, outside the measurement) into one contiguous
//!   buffer, in log order, and hashed one record at a time, so the baseline hashes the
//!   same bytes in the same record-sized pieces from memory, as the chain check does, but
//!   without the CRCs, the link hashes or the walk over the segment. (Hashing inside a
//!   `Verify::Checksums` scan would measure the checksum scan plus BLAKE3, not BLAKE3.)
//!
//! The log is built once, outside the measurement: 1,000,000 events of 256 B payload
//! (about 400 MiB in 64 MiB segments), appended with `Durability::None` in batches of 100
//! events to 1,000 streams (`trade-1000` .. `trade-1999`) round-robin, then synced and sealed. It stays in the page cache
//! (24 GiB of RAM on the reference machine), so the scans measure CPU, not the disk.
//! `TALLY_BENCH_EVENTS` changes the number of events.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench scan
//! TALLY_BENCH_EVENTS=100000 cargo bench -p tally-benches --bench scan -- --quick  # smoke
//! ```
//! Data goes to `$TALLY_BENCH_DIR` (default: the system's temporary directory). Run on an
//! idle machine (the reference machine has 2 cores, so `chain_2_threads` takes both), and
//! record the environment line printed first with the results.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tally_benches::{
    BuildSpec, TempLog, build_log, encoded_body_len, env_u64, event, print_environment, stream_name,
};
use tally_engine::{Durability, Options, Position, Verify};

/// Events in the log unless `TALLY_BENCH_EVENTS` says otherwise.
const DEFAULT_EVENTS: u64 = 1_000_000;
/// Payload bytes per event.
const PAYLOAD: usize = 256;
/// The streams: `trade-1000` .. `trade-1999`, names of one length, so that every record
/// body has the same length.
const FIRST_STREAM: u64 = 1000;
/// Number of streams.
const STREAMS: u64 = 1000;

/// The scanned log and what a full scan sees.
struct Dataset {
    log: TempLog,
    records: u64,
    body_bytes: u64,
}

fn build(events: u64, expected_body_bytes: u64) -> Dataset {
    let log = TempLog::open(Options {
        durability: Durability::None,
        ..Options::default()
    });
    print_environment("scan", log.path());
    let t0 = Instant::now();
    build_log(
        log.log(),
        BuildSpec {
            events,
            first_stream: FIRST_STREAM,
            streams: STREAMS,
            batch: 100,
            payload_len: PAYLOAD,
        },
    )
    .expect("build the scan dataset");
    let mut body_bytes = 0;
    let records = log
        .log()
        .scan(Position(0), Verify::Checksums, |r| {
            body_bytes += r.body.len() as u64;
        })
        .expect("scan the new log");
    assert_eq!(records, events, "every appended event is scanned");
    assert_eq!(
        body_bytes, expected_body_bytes,
        "the reported throughput assumes bodies of equal length"
    );
    eprintln!(
        "scan: built {records} records, {body_bytes} body bytes, {} segments, in {:.1?}",
        log.log().segments().len(),
        t0.elapsed()
    );
    Dataset {
        log,
        records,
        body_bytes,
    }
}

/// Every record body of `log`, in order: one buffer and the end offset of each body.
fn collect_bodies(d: &Dataset) -> (Vec<u8>, Vec<usize>) {
    let mut bytes = Vec::with_capacity(usize::try_from(d.body_bytes).unwrap_or(0));
    let mut ends = Vec::with_capacity(usize::try_from(d.records).unwrap_or(0));
    d.log
        .log()
        .scan(Position(0), Verify::Checksums, |r| {
            bytes.extend_from_slice(r.body);
            ends.push(bytes.len());
        })
        .expect("scan for the bodies");
    (bytes, ends)
}

fn bench_scan(c: &mut Criterion) {
    // The dataset is built on first use, so that a run filtered to other ids skips it; the
    // throughput must be set before, from the (fixed) size of one record body. `build`
    // checks that the log holds exactly that many bytes.
    let events = env_u64("TALLY_BENCH_EVENTS", DEFAULT_EVENTS).max(1);
    let body_bytes = events * encoded_body_len(&event(PAYLOAD), &stream_name(FIRST_STREAM));
    let mut data: Option<Dataset> = None;
    let mut g = c.benchmark_group("scan");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(Throughput::Bytes(body_bytes));

    for (id, verify) in [("checksums", Verify::Checksums), ("chain", Verify::Chain)] {
        g.bench_function(id, |b| {
            let d = data.get_or_insert_with(|| build(events, body_bytes));
            let log = d.log.log();
            b.iter(|| {
                let n = log.scan(Position(0), verify, |_| {}).expect("scan the log");
                assert_eq!(n, d.records);
            });
        });
    }

    g.bench_function("chain_2_threads", |b| {
        let d = data.get_or_insert_with(|| build(events, body_bytes));
        let log = d.log.log();
        b.iter(|| {
            let n = log.check_chain(2).expect("check the chain");
            assert_eq!(n, d.records);
        });
    });

    let mut bodies: Option<(Vec<u8>, Vec<usize>)> = None;
    g.bench_function("blake3_records_1_thread", |b| {
        let d = data.get_or_insert_with(|| build(events, body_bytes));
        let (bytes, ends) = bodies.get_or_insert_with(|| collect_bodies(d));
        b.iter(|| {
            let mut start = 0;
            for &end in &*ends {
                black_box(blake3::hash(&bytes[start..end]));
                start = end;
            }
        });
    });
    g.finish();
    drop(bodies);
    if let Some(d) = data {
        d.log.close();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_scan
}
criterion_main!(benches);
