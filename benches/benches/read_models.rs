//! Read models of any size: what a projection checkpoint costs against how much of the
//! state changed, and what loading one costs in time and memory against the state's size.
//!
//! # What it measures
//! - `checkpoint/{1,10000,1000000}_of_1000000`: one checkpoint of a partitioned read model
//!   of 1,000,000 partitions of 100 B (about 120 MB encoded) after that many partitions
//!   changed: a delta (FORMAT.md 18.4), durable (`Durability::Fsync`). Bytes written per
//!   checkpoint are printed beside the times.
//! - `checkpoint/full_of_1000000`: the baseline, a full checkpoint of the same state, what
//!   every checkpoint cost before deltas.
//! - `load/{partitioned,whole}/{1,10,100,500}MiB`: `projection::load_checkpoint` of a full
//!   checkpoint of a state of that size (partitions of 1 KiB), by partition (one part and one
//!   entry held beside the state) and whole (the default decoder collects the content,
//!   then decodes it). The peak memory of one load in a fresh process (Linux `VmHWM` less
//!   the mapped segment pages), against the state's size, is printed beside.
//!
//! `TALLY_BENCH_LOAD_MIB` lists the load sizes (default `1,10,100,500`) and
//! `TALLY_BENCH_KEYS` the partitions of the checkpoint group (default 1,000,000).
//!
//! # Running
//! ```text
//! cargo bench -p tally-benches --bench read_models
//! TALLY_BENCH_KEYS=100000 TALLY_BENCH_LOAD_MIB=1,10 cargo bench -p tally-benches --bench read_models -- --quick
//! ```

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group};
use parking_lot::RwLock;
use tally_benches::{TempLog, env_u64, print_environment};
use tally_engine::projection::{
    ChainHead, ChangedKeys, PartitionVisitor, Partitions, Projection, ProjectorOptions,
    checkpoint_stream, load_checkpoint, write_checkpoint,
};
use tally_engine::{Durability, EventView, Options};

/// A map of fixed-size values, partitioned by key, or stored whole when `PARTITIONED` is
/// false (the same encoding, the default whole decoder).
#[derive(Default)]
struct Model<const PARTITIONED: bool> {
    values: BTreeMap<u64, Vec<u8>>,
    changed: ChangedKeys,
}

impl<const P: bool> Model<P> {
    fn filled(keys: u64, value_bytes: usize) -> Model<P> {
        let mut m = Model::default();
        for k in 0..keys {
            m.values.insert(k, vec![(k % 251) as u8; value_bytes]);
        }
        m
    }

    fn touch(&mut self, keys: impl Iterator<Item = u64>) {
        for k in keys {
            if let Some(v) = self.values.get_mut(&k) {
                v[0] = v[0].wrapping_add(1);
                self.changed.mark(key_bytes(k).to_vec());
            }
        }
    }
}

// Keys are big-endian so that their byte order is their numeric order: partitions are
// written in ascending order of key bytes.
#[allow(clippy::big_endian_bytes)]
fn key_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[allow(clippy::big_endian_bytes)]
fn key_bytes(k: u64) -> [u8; 8] {
    k.to_be_bytes()
}

impl<const P: bool> Projection for Model<P> {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Self {
        Model::default()
    }

    fn apply(&mut self, _: &dyn EventView) -> Result<(), String> {
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_state_to(&mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        out
    }

    fn encode_state_to(&self, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        for (k, v) in &self.values {
            out.write_all(&key_bytes(*k))?;
            out.write_all(&(v.len() as u32).to_le_bytes())?;
            out.write_all(v)?;
        }
        Ok(())
    }

    fn decode_state(mut bytes: &[u8]) -> Option<Self> {
        let mut m = Model::default();
        while !bytes.is_empty() {
            let k = key_of(bytes.get(..8)?)?;
            let n = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
            m.values.insert(k, bytes.get(12..12 + n)?.to_vec());
            bytes = &bytes[12 + n..];
        }
        Some(m)
    }

    fn partitions(&self) -> Option<&dyn Partitions> {
        if P { Some(self) } else { None }
    }

    fn partitions_mut(&mut self) -> Option<&mut dyn Partitions> {
        if P { Some(self) } else { None }
    }
}

impl<const P: bool> Partitions for Model<P> {
    fn each_partition(&self, f: &mut PartitionVisitor<'_>) -> std::io::Result<()> {
        for (k, v) in &self.values {
            f(&key_bytes(*k), v)?;
        }
        Ok(())
    }

    fn encode_partition(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.values.get(&key_of(key)?).cloned()
    }

    fn load_partition(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let k = key_of(key).ok_or("a key of 8 bytes")?;
        match value {
            Some(v) => self.values.insert(k, v.to_vec()),
            None => self.values.remove(&k),
        };
        Ok(())
    }

    fn take_changed(&mut self) -> Vec<Vec<u8>> {
        self.changed.take()
    }
}

fn log() -> TempLog {
    TempLog::open(Options {
        durability: Durability::Fsync,
        segment_bytes: 1 << 30,
        ..Options::default()
    })
}

/// A field of /proc/self/status, in KiB (Linux).
fn status_kib(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

/// The probe a load's memory is measured in: a fresh process (this binary, run again with
/// `PROBE_ENV` set to `KIND MIB DIR`) opens the log read-only, loads the checkpoint once,
/// and prints its peak resident memory less the segment pages it mapped (`VmHWM - RssFile`,
/// both Linux), beside what it held before the load. A fresh process, because one that
/// built and dropped states keeps their memory for reuse and would under-report.
const PROBE_ENV: &str = "TALLY_READ_MODELS_PROBE";

fn probe(spec: &str) {
    let mut f = spec.split(' ');
    let (kind, dir) = (f.next().unwrap_or_default(), f.nth(1).unwrap_or_default());
    let log = tally_engine::Log::open(
        dir,
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let before = status_kib("RssAnon:").unwrap_or(0);
    let n = if kind == "partitioned" {
        load_checkpoint::<Model<true>>(&log, kind)
            .map(|s| s.found.map_or(0, |f| f.state.values.len()))
    } else {
        load_checkpoint::<Model<false>>(&log, kind)
            .map(|s| s.found.map_or(0, |f| f.state.values.len()))
    }
    .unwrap_or_else(|e| panic!("{e}"));
    let peak = status_kib("VmHWM:").unwrap_or(0);
    let file = status_kib("RssFile:").unwrap_or(0);
    println!("{} {} {n}", before, peak.saturating_sub(file));
}

/// Runs [`probe`] in a fresh process: (anonymous memory before the load, peak less mapped
/// file pages), in KiB.
fn probe_child(kind: &str, mib: u64, dir: &std::path::Path) -> Option<(u64, u64)> {
    let out = std::process::Command::new(std::env::current_exe().ok()?)
        .env(PROBE_ENV, format!("{kind} {mib} {}", dir.display()))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut f = text.split_whitespace();
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

fn checkpoint(c: &mut Criterion) {
    let keys = env_u64("TALLY_BENCH_KEYS", 1_000_000);
    let log = log();
    print_environment("read_models", log.path());
    let stream = checkpoint_stream("bench");
    let opts = ProjectorOptions::default();
    let state = RwLock::new(Model::<true>::filled(keys, 100));
    state.write().changed.take();
    let full: ChainHead = write_checkpoint(log.log(), &stream, &state, 1, None, true, &opts)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "checkpoint: full of {keys} partitions: {} bytes",
        full.full_bytes
    );
    let mut g = c.benchmark_group("checkpoint");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10));
    let mut cases = vec![1, keys / 100, keys];
    cases.dedup();
    for changed in cases {
        let mut next = 0u64;
        let mut written = 0u64;
        g.bench_function(BenchmarkId::new(format!("{changed}_of"), keys), |b| {
            b.iter(|| {
                // Spread over the key space, and a different set each time.
                let step = (keys / changed).max(1);
                next += 1;
                let off = next % step;
                state
                    .write()
                    .touch((0..changed).map(|i| (i * step + off) % keys));
                // Each delta builds on the full checkpoint: the chain's bounds never call
                // for a full one here.
                let h = write_checkpoint(log.log(), &stream, &state, 1, Some(full), false, &opts)
                    .unwrap_or_else(|e| panic!("{e}"));
                written = h.delta_bytes;
                black_box(h)
            });
        });
        eprintln!("checkpoint: {changed} of {keys} partitions changed: {written} bytes written");
    }
    g.bench_function(BenchmarkId::new("full_of", keys), |b| {
        b.iter(|| {
            let h = write_checkpoint(log.log(), &stream, &state, 1, Some(full), true, &opts)
                .unwrap_or_else(|e| panic!("{e}"));
            black_box(h)
        });
    });
    g.finish();
    log.close();
}

fn load_sizes() -> Vec<u64> {
    std::env::var("TALLY_BENCH_LOAD_MIB")
        .unwrap_or_else(|_| "1,10,100,500".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn load_one<const P: bool>(c: &mut Criterion, mib: u64) {
    let kind = if P { "partitioned" } else { "whole" };
    let dir = tally_benches::bench_dir();
    let options = Options {
        segment_bytes: 1 << 30,
        ..Options::default()
    };
    {
        let log =
            tally_engine::Log::open(dir.path(), options.clone()).unwrap_or_else(|e| panic!("{e}"));
        // Partitions of 1 KiB (1 KiB of value, 12 bytes of key and length).
        let state = RwLock::new(Model::<P>::filled(mib * 1024 * 1024 / 1036, 1024));
        write_checkpoint(
            &log,
            &checkpoint_stream(kind),
            &state,
            1,
            None,
            true,
            &ProjectorOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        log.close().unwrap_or_else(|e| panic!("{e}"));
    }
    match probe_child(kind, mib, dir.path()) {
        Some((before, peak)) => eprintln!(
            "load: {kind} {mib} MiB: peak memory {:.1} MiB ({:.2}x the state), {:.1} MiB before the load",
            peak as f64 / 1024.0,
            peak.saturating_sub(before) as f64 / (mib as f64 * 1024.0),
            before as f64 / 1024.0
        ),
        None => eprintln!("load: {kind} {mib} MiB: peak memory not measurable here"),
    }
    let log = tally_engine::Log::open(dir.path(), options).unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("load");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    g.bench_function(BenchmarkId::new(kind, format!("{mib}MiB")), |b| {
        b.iter(|| {
            let loaded = load_checkpoint::<Model<P>>(&log, kind).unwrap_or_else(|e| panic!("{e}"));
            black_box(loaded.found.map_or(0, |f| f.state.values.len()))
        });
    });
    g.finish();
    log.close().unwrap_or_else(|e| panic!("{e}"));
}

fn load(c: &mut Criterion) {
    for mib in load_sizes() {
        load_one::<true>(c, mib);
        load_one::<false>(c, mib);
    }
}

criterion_group!(benches, checkpoint, load);

fn main() {
    if let Ok(spec) = std::env::var(PROBE_ENV) {
        probe(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
