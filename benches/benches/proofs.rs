//! Tamper evidence: full verification against one core's BLAKE3, and Merkle proofs and
//! checkpoint signatures.
//!
//! # What it measures
//! - `verify/log_verify`: `Log::verify_with` over the whole log (every checksum, the chain,
//!   each sealed segment's footer, Merkle root and index, every checkpoint's signature and
//!   root) with one worker per core, reported in record-body bytes per second.
//! - `verify/log_verify_1_thread`: the same with one worker.
//! - `verify/blake3_records_1_thread` (baseline): `blake3::hash` of every record body once
//!   from one contiguous buffer, one thread: the floor of a chain check on one core.
//! - `proof/inclusion_generate`: `Log::prove_inclusion` of a pseudo-random position against
//!   the full tree (node file plus one chunk of record hashes read from the segments).
//! - `proof/inclusion_verify`: `InclusionProof::verify` (no signature).
//! - `proof/consistency_generate` and `proof/consistency_verify`: between half and the
//!   whole log.
//! - `checkpoint/sign` and `checkpoint/verify`: Ed25519 over the 120-byte statement.
//!
//! The log: 1,000,000 events of 256 B payload (`TALLY_BENCH_EVENTS` and
//! `TALLY_BENCH_PAYLOAD` change them) in 64 MiB segments, built once with
//! `Durability::None`, then checkpointed, in the page cache. `TALLY_BENCH_PROOFS_ONLY=1`
//! skips the `verify` group (which keeps every body in memory for its baseline), for
//! proofs over very large logs.
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench proofs
//! TALLY_BENCH_EVENTS=100000 cargo bench -p tally-benches --bench proofs -- --quick  # smoke
//! # proofs at 100M records (about 17 GiB of segments; build takes several minutes)
//! TALLY_BENCH_EVENTS=100000000 TALLY_BENCH_PAYLOAD=16 TALLY_BENCH_PROOFS_ONLY=1 \
//!     cargo bench -p tally-benches --bench proofs -- proof/
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use tally_benches::{BuildSpec, TempLog, build_log, env_u64, print_environment};
use tally_engine::format::checkpoint::SignedCheckpoint;
use tally_engine::{Durability, Options, Position, Verify, VerifyOptions};

const DEFAULT_EVENTS: u64 = 1_000_000;

struct Dataset {
    log: TempLog,
    records: u64,
    body_bytes: u64,
    bodies: Vec<u8>,
    ends: Vec<usize>,
}

fn build(events: u64, payload_len: usize, keep_bodies: bool) -> Dataset {
    let log = TempLog::open(Options {
        durability: Durability::None,
        ..Options::default()
    });
    print_environment("proofs", log.path());
    build_log(
        log.log(),
        BuildSpec {
            events,
            first_stream: 1000,
            streams: 1000,
            batch: 100,
            payload_len,
        },
    )
    .expect("build the dataset");
    log.log().checkpoint().expect("checkpoint");
    let (mut bodies, mut ends) = (Vec::new(), Vec::new());
    let records = if keep_bodies {
        log.log()
            .scan(Position(0), Verify::Checksums, |r| {
                bodies.extend_from_slice(r.body);
                ends.push(bodies.len());
            })
            .expect("scan")
    } else {
        log.log().next_position().0
    };
    Dataset {
        log,
        records,
        body_bytes: bodies.len() as u64,
        bodies,
        ends,
    }
}

fn bench(c: &mut Criterion) {
    let events = env_u64("TALLY_BENCH_EVENTS", DEFAULT_EVENTS).max(2);
    let payload_len = usize::try_from(env_u64("TALLY_BENCH_PAYLOAD", 256)).unwrap_or(256);
    let proofs_only = env_u64("TALLY_BENCH_PROOFS_ONLY", 0) != 0;
    let d = build(events, payload_len, !proofs_only);
    let log = d.log.log();
    let n = d.records;
    if !proofs_only {
        bench_verify(c, &d);
    }
    bench_proofs(c, log, n);
    d.log.close();
}

fn bench_verify(c: &mut Criterion, d: &Dataset) {
    let log = d.log.log();
    let n = d.records;
    let mut g = c.benchmark_group("verify");
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.throughput(Throughput::Bytes(d.body_bytes));
    g.bench_function("log_verify", |b| {
        b.iter(|| {
            let r = log
                .verify_with(&VerifyOptions::default(), &mut |_| {})
                .expect("verify");
            assert_eq!(r.records, n);
        });
    });
    g.bench_function("log_verify_1_thread", |b| {
        b.iter(|| {
            let options = VerifyOptions {
                threads: 1,
                ..VerifyOptions::default()
            };
            let r = log.verify_with(&options, &mut |_| {}).expect("verify");
            assert_eq!(r.records, n);
        });
    });
    g.bench_function("blake3_records_1_thread", |b| {
        b.iter(|| {
            let mut start = 0;
            for &end in &d.ends {
                black_box(blake3::hash(&d.bodies[start..end]));
                start = end;
            }
        });
    });
    g.finish();
}

fn bench_proofs(c: &mut Criterion, log: &tally_engine::Log, n: u64) {
    let mut g = c.benchmark_group("proof");
    let root = log.merkle_root(n).expect("root");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    g.bench_function("inclusion_generate", |b| {
        b.iter(|| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            black_box(log.prove_inclusion(Position(x % n), n).expect("prove"))
        });
    });
    let p = n / 3;
    let proof = log.prove_inclusion(Position(p), n).expect("prove");
    let raw = log.read_raw(Position(p)).expect("raw");
    let leaf = tally_engine::format::record::RecordHeader::decode_in(&raw.header, raw.layout)
        .expect("header")
        .chain_hash;
    g.bench_function("inclusion_verify", |b| {
        b.iter(|| proof.verify(black_box(&leaf), &root).expect("verifies"));
    });
    let half = log.merkle_root(n / 2).expect("root");
    g.bench_function("consistency_generate", |b| {
        b.iter(|| black_box(log.prove_consistency(n / 2, n).expect("prove")));
    });
    let cproof = log.prove_consistency(n / 2, n).expect("prove");
    g.bench_function("consistency_verify", |b| {
        b.iter(|| cproof.verify(black_box(&half), &root).expect("verifies"));
    });
    g.finish();

    let mut g = c.benchmark_group("checkpoint");
    let cp = *log.checkpoints().last().expect("a checkpoint");
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    g.bench_function("sign", |b| {
        b.iter(|| black_box(SignedCheckpoint::sign(black_box(cp.statement), &key)));
    });
    g.bench_function("verify", |b| {
        b.iter(|| black_box(&cp).verify(&[]).expect("verifies"));
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench
}
criterion_main!(benches);
