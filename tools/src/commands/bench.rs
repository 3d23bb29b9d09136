//! `tally bench`: the load generator, embedded or against a running server.
//!
//! Embedded: N writer threads append to one embedded log. Each keeps `--inflight` appends
//! outstanding (1: a blocking `append`; more: `append_async` handles waited on oldest first)
//! and records the time from submitting an append to its acknowledgement in an
//! HdrHistogram.
//!
//! With `--server ADDR`: `--connections` connections each keep `--inflight` pipelined
//! appends outstanding, measured the same way; `--embedded-baseline` then runs the same
//! load through the embedded engine in a temporary directory, in the same process, and
//! prints both with their ratio. `--read all|stream` measures replay instead.
//!
//! Embedded, `--compare format-v1|unsigned` runs the same load again in the same process
//! as a baseline (a log of format version 1; the same batches without producer
//! signatures), `--rounds` pairs of runs alternating which goes first, and prints the
//! medians and their ratio.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tally_engine::{AppendHandle, Durability, EventData, ExpectedVersion, Log, Options};

use crate::support::json_output;

/// Options of `tally bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Data directory (created if missing). Default: a fresh temporary directory, removed
    /// afterwards. With --server --read --embedded-baseline: the server's data directory.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Writer threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) writers: usize,
    /// Appends each writer keeps outstanding.
    #[arg(long, default_value_t = 1)]
    pub(crate) inflight: usize,
    /// Total events to append (ignored with --duration).
    #[arg(long, default_value_t = 100_000)]
    pub(crate) events: u64,
    /// Run for this many seconds instead of a number of events.
    #[arg(long)]
    pub(crate) duration: Option<f64>,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 256)]
    pub(crate) payload: usize,
    /// Embedded: payloads are JSON objects of --payload bytes (content type json), not
    /// binary: what a trading system writes, and what extracts and dumps render readable.
    #[arg(long)]
    pub(crate) json_payload: bool,
    /// Embedded: every event carries this correlation id (indexed, as extracts and audits
    /// by correlation read it).
    #[arg(long)]
    pub(crate) correlation: Option<String>,
    /// Streams to spread the events over.
    #[arg(long, default_value_t = 1000)]
    pub(crate) streams: u64,
    /// Events per append.
    #[arg(long, default_value_t = 1)]
    pub(crate) batch: usize,
    /// Durability of the log (with --server: the server's is used, for the baseline too).
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    pub(crate) durability: DurabilityArg,
    /// Max delay for --durability batched, in milliseconds.
    #[arg(long, default_value_t = 5)]
    pub(crate) batched_delay_ms: u64,
    /// Segment size in MiB.
    #[arg(long, default_value_t = 64)]
    pub(crate) segment_mib: u64,
    /// Embedded, one append in flight: spin this many microseconds between appends (a
    /// remote client's round trip leaves the disk idle that long between syncs).
    #[arg(long, default_value_t = 0)]
    pub(crate) think_us: u64,
    /// Load a running server at this address instead of an embedded log.
    #[arg(long)]
    pub(crate) server: Option<String>,
    /// Connections to the server (with --server; each keeps --inflight requests).
    #[arg(long, default_value_t = 1)]
    pub(crate) connections: usize,
    /// With --server: measure replay (the whole log in order, or stream by stream)
    /// instead of appends. The first --events events are read; if the log has fewer, the
    /// rest are appended first (not measured).
    #[arg(long, value_enum)]
    pub(crate) read: Option<crate::commands::remote::ReadMode>,
    /// With --server: afterwards run the same load (writers = connections) through the
    /// embedded engine in a temporary directory, and print both and their ratio. With
    /// --read, replay the server's data directory (--data DIR, opened read-only) in
    /// process instead.
    #[arg(long)]
    pub(crate) embedded_baseline: bool,
    /// Embedded: the on-disk format version of the log (1, 2 or 3; default: the engine's).
    #[arg(long)]
    pub(crate) format_version: Option<u16>,
    /// Embedded: each append is a batch signed by a producer key registered at the start
    /// (ids and event times given, the batch statement signed on the writer thread, the
    /// signature checked by the engine); needs format version 2.
    #[arg(long)]
    pub(crate) sign: bool,
    /// Embedded: also run the same load as a baseline in the same process (a log of format
    /// version 1, or the same batches unsigned) and print both and their ratio.
    #[arg(long, value_enum)]
    pub(crate) compare: Option<CompareArg>,
    /// With --compare: pairs of runs, alternating which goes first; medians are printed.
    #[arg(long, default_value_t = 1)]
    pub(crate) rounds: usize,
    /// Embedded: while the load runs, a background compaction (at low priority, as
    /// tallyd's `[cold]` runs it) moves every sealed segment but the newest to a directory
    /// store in a temporary directory, checking every step; compare with
    /// `--compare no-compaction`.
    #[arg(long)]
    pub(crate) cold_compaction: bool,
    /// Embedded, with --json-payload: seal one field (`book`) of every event as personal
    /// data of one of this many data subjects (keys in a key store in a temporary directory,
    /// made before the run); compare with `--compare unsealed`.
    #[arg(long, value_name = "SUBJECTS", requires = "json_payload")]
    pub(crate) seal_field: Option<u64>,
}

/// The baseline of `--compare`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompareArg {
    /// The same load on a log of format version 1.
    FormatV1,
    /// The same load without producer signatures.
    Unsigned,
    /// The same load without a background compaction (use with --cold-compaction).
    NoCompaction,
    /// The same load without sealing (use with --seal-field).
    Unsealed,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum DurabilityArg {
    Fsync,
    Batched,
    None,
}

/// What one writer measured.
pub(crate) struct WriterResult {
    pub(crate) histogram: Histogram<u64>,
    pub(crate) events: u64,
}

/// One measured run.
pub(crate) struct Measured {
    pub(crate) label: &'static str,
    pub(crate) events: u64,
    pub(crate) seconds: f64,
    /// Bytes counted for MB/s: payload bytes.
    pub(crate) bytes: u64,
    pub(crate) histogram: Histogram<u64>,
}

impl Measured {
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }

    fn json(&self) -> serde_json::Value {
        let q = |p: f64| self.histogram.value_at_quantile(p);
        serde_json::json!({
            "events": self.events,
            "seconds": self.seconds,
            "events_per_sec": self.events_per_sec(),
            "mb_per_sec": self.mb_per_sec(),
            "latency_us": {
                "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
                "max": self.histogram.max(),
            },
        })
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.writers == 0
        || args.inflight == 0
        || args.batch == 0
        || args.streams == 0
        || args.connections == 0
    {
        bail!("--writers, --connections, --inflight, --batch and --streams must be at least 1");
    }
    let Some(addr) = &args.server else {
        if args.read.is_some() || args.embedded_baseline {
            bail!("--read and --embedded-baseline need --server ADDR");
        }
        if let Some(c) = args.compare {
            return compare(args, c);
        }
        let m = embedded(args, args.writers)?;
        print(args, &[m], args.writers);
        return Ok(ExitCode::SUCCESS);
    };
    if args.compare.is_some() || args.sign || args.format_version.is_some() {
        bail!("--compare, --sign and --format-version are for the embedded engine");
    }
    let (server, durability) = crate::commands::remote_bench::run(addr, args)?;
    // What the table says and what the baseline runs with is the server's durability.
    let args = &BenchArgs {
        durability: match durability {
            0 => DurabilityArg::Fsync,
            1 => DurabilityArg::Batched,
            _ => DurabilityArg::None,
        },
        ..args.clone()
    };
    let mut runs = vec![server];
    if args.embedded_baseline {
        let m = match (args.read, &args.data) {
            (None, _) => embedded(args, args.connections)?,
            (Some(mode), Some(dir)) => {
                crate::commands::remote_bench::embedded_replay(dir, args, mode)?
            }
            (Some(_), None) => bail!(
                "--read with --embedded-baseline needs --data DIR: the server's data directory, \
                 opened read-only beside it"
            ),
        };
        runs.push(m);
    }
    print(args, &runs, args.connections);
    Ok(ExitCode::SUCCESS)
}

fn print(args: &BenchArgs, runs: &[Measured], writers: usize) {
    if json_output() {
        let mut v = serde_json::Map::new();
        for m in runs {
            v.insert(m.label.into(), m.json());
        }
        if runs.len() == 1 {
            println!("{}", runs[0].json());
        } else {
            let ratio = runs[0].events_per_sec() / runs[1].events_per_sec();
            let added = runs[0].histogram.value_at_quantile(0.5) as i64
                - runs[1].histogram.value_at_quantile(0.5) as i64;
            v.insert("throughput_ratio".into(), serde_json::json!(ratio));
            v.insert("added_p50_us".into(), serde_json::json!(added));
            println!("{}", serde_json::Value::Object(v));
        }
        return;
    }
    let what = match (&args.server, args.read) {
        (Some(_), Some(r)) => format!(
            "server replay ({r:?})  connections {}  inflight {}",
            args.connections, args.inflight
        ),
        (Some(_), None) => format!(
            "server  connections {}  inflight {}",
            args.connections, args.inflight
        ),
        (None, _) => format!("embedded  writers {writers}  inflight {}", args.inflight),
    };
    println!(
        "{what}  batch {}  payload {} B  streams {}  durability {:?}",
        args.batch, args.payload, args.streams, args.durability
    );
    println!(
        "{:<10} {:>10} {:>8} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "run", "events", "seconds", "events/s", "MB/s", "p50 us", "p90", "p99", "p99.9", "max"
    );
    for m in runs {
        let q = |p: f64| m.histogram.value_at_quantile(p);
        println!(
            "{:<10} {:>10} {:>8.3} {:>11.0} {:>8.1} {:>8} {:>8} {:>8} {:>8} {:>8}",
            m.label,
            m.events,
            m.seconds,
            m.events_per_sec(),
            m.mb_per_sec(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            m.histogram.max()
        );
    }
    if runs.len() == 2 {
        println!(
            "{}/{} throughput {:.3}x; p50 added {} us",
            runs[0].label,
            runs[1].label,
            runs[0].events_per_sec() / runs[1].events_per_sec(),
            runs[0].histogram.value_at_quantile(0.5) as i64
                - runs[1].histogram.value_at_quantile(0.5) as i64
        );
    }
}

/// `--compare`: `--rounds` pairs of the load and its baseline, alternating which runs
/// first, then the medians and their ratio.
fn compare(args: &BenchArgs, c: CompareArg) -> anyhow::Result<ExitCode> {
    if args.data.is_some() {
        bail!("--compare runs each load in a fresh temporary directory: leave out --data");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let (main, base) = match c {
        CompareArg::FormatV1 => (
            BenchArgs {
                compare: None,
                ..args.clone()
            },
            BenchArgs {
                compare: None,
                format_version: Some(1),
                ..args.clone()
            },
        ),
        CompareArg::Unsigned => (
            BenchArgs {
                compare: None,
                sign: true,
                ..args.clone()
            },
            BenchArgs {
                compare: None,
                sign: false,
                ..args.clone()
            },
        ),
        CompareArg::NoCompaction => (
            BenchArgs {
                compare: None,
                cold_compaction: true,
                ..args.clone()
            },
            BenchArgs {
                compare: None,
                cold_compaction: false,
                ..args.clone()
            },
        ),
        CompareArg::Unsealed => {
            if args.seal_field.is_none() {
                bail!("--compare unsealed compares with --seal-field: give it");
            }
            (
                BenchArgs {
                    compare: None,
                    ..args.clone()
                },
                BenchArgs {
                    compare: None,
                    seal_field: None,
                    ..args.clone()
                },
            )
        }
    };
    let labels = match c {
        CompareArg::FormatV1 => ("main", "format-v1"),
        CompareArg::Unsigned => ("signed", "unsigned"),
        CompareArg::NoCompaction => ("compacting", "no-compaction"),
        CompareArg::Unsealed => ("sealed", "unsealed"),
    };
    let (mut mains, mut bases) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let order: [(&BenchArgs, bool); 2] = if round % 2 == 0 {
            [(&main, true), (&base, false)]
        } else {
            [(&base, false), (&main, true)]
        };
        for (a, is_main) in order {
            let mut m = embedded(a, a.writers)?;
            if is_main {
                m.label = labels.0;
                mains.push(m);
            } else {
                m.label = labels.1;
                bases.push(m);
            }
        }
    }
    let ratios: Vec<f64> = mains
        .iter()
        .zip(&bases)
        .map(|(m, b)| m.events_per_sec() / b.events_per_sec())
        .collect();
    let median_run = |runs: &mut Vec<Measured>| -> Measured {
        runs.sort_by(|a, b| a.events_per_sec().total_cmp(&b.events_per_sec()));
        runs.remove(runs.len() / 2)
    };
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let median_ratio = sorted[sorted.len() / 2];
    let (m, b) = (median_run(&mut mains), median_run(&mut bases));
    if json_output() {
        println!(
            "{}",
            serde_json::json!({
                labels.0: m.json(),
                labels.1: b.json(),
                "rounds": args.rounds,
                "round_ratios": ratios,
                "median_round_ratio": median_ratio,
                "throughput_ratio": m.events_per_sec() / b.events_per_sec(),
            })
        );
    } else {
        print(args, &[m, b], args.writers);
        let list: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
        println!(
            "{} rounds (median runs shown); per-round ratio {}, median {median_ratio:.3}",
            args.rounds,
            list.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The embedded load with `writers` threads.
fn embedded(args: &BenchArgs, writers: usize) -> anyhow::Result<Measured> {
    let args = &BenchArgs {
        writers,
        ..args.clone()
    };
    let temp;
    let dir = match &args.data {
        Some(d) => d.clone(),
        None => {
            temp = tempfile_dir()?;
            temp.0.clone()
        }
    };
    let durability = match args.durability {
        DurabilityArg::Fsync => Durability::Fsync,
        DurabilityArg::Batched => Durability::Batched {
            max_delay: Duration::from_millis(args.batched_delay_ms.max(1)),
        },
        DurabilityArg::None => Durability::None,
    };
    let mut opts = Options {
        segment_bytes: args.segment_mib << 20,
        durability,
        ..Options::default()
    };
    if let Some(v) = args.format_version {
        opts.format_version = v;
    }
    let store_dir = if args.cold_compaction {
        let d = tempfile_dir()?;
        opts.cold = tally_engine::ColdOptions {
            store: Some(std::sync::Arc::new(tally_engine::cold::DirStore::new(
                &d.0,
            )?)),
            policy: tally_engine::CompactPolicy {
                keep_local_segments: 1,
                ..tally_engine::CompactPolicy::default()
            },
            background: Some(Duration::from_millis(10)),
            ..tally_engine::ColdOptions::default()
        };
        Some(d)
    } else {
        None
    };
    // The key store lives beside the log's temporary directory, never inside it; every
    // subject's key is made before the run (a new subject's first append syncs the store).
    let _key_dir = match args.seal_field {
        Some(subjects) => {
            let d = tempfile_dir()?;
            let store = tally_engine::keys::FileKeyStore::open(
                &d.0,
                &tally_engine::keys::SecretKey::random()?,
                true,
            )?;
            let hashes: Vec<_> = (0..subjects.max(1))
                .map(|i| tally_engine::format::sealed::subject_hash(&format!("client-{i}")))
                .collect();
            for chunk in hashes.chunks(100_000) {
                tally_engine::keys::KeyStore::keys_for_append(&store, chunk)?;
            }
            opts.keys = Some(std::sync::Arc::new(store));
            Some(d)
        }
        None => None,
    };
    let log = Log::open(&dir, opts).with_context(|| format!("opening {}", dir.display()))?;
    let producer = if args.sign {
        let keys = tempfile_dir()?;
        let path = keys.0.join("producer.key");
        let public = tally_engine::create_signing_key(&path)?;
        let key = crate::support::read_secret_key(&path)?;
        log.register_producer_key(public, "bench", &[], "tally bench", "signed-batch load")
            .context(
                "registering the bench's producer key (signed appends need format version 2)",
            )?;
        Some(key)
    } else {
        None
    };
    let producer = producer.as_ref();
    let budget = AtomicU64::new(0);
    let total_appends = args.events.div_ceil(args.batch as u64);
    let deadline = args.duration.map(Duration::from_secs_f64);
    let started = Instant::now();
    let results: Vec<anyhow::Result<WriterResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.writers)
            .map(|w| {
                let (log, budget) = (&log, &budget);
                s.spawn(move || {
                    writer(
                        log,
                        producer,
                        w,
                        args,
                        budget,
                        total_appends,
                        deadline,
                        started,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("writer panicked")))
            .collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut events = 0;
    for r in results {
        let r = r?;
        histogram.add(&r.histogram)?;
        events += r.events;
    }
    if store_dir.is_some() {
        let status = log.cold_status();
        eprintln!(
            "bench: the background compaction moved {} segments during the run{}",
            status.cold_segments,
            status
                .last_error
                .map(|e| format!(" (last error: {e})"))
                .unwrap_or_default()
        );
    }
    log.close()?;
    drop(store_dir);
    Ok(Measured {
        label: "embedded",
        events,
        seconds,
        bytes: events * args.payload as u64,
        histogram,
    })
}

/// A temporary data directory, removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tempfile_dir() -> anyhow::Result<TempDir> {
    let base = std::env::temp_dir();
    for i in 0..1000u32 {
        let p = base.join(format!("tally-bench-{}-{i}", std::process::id()));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(TempDir(p));
        }
    }
    bail!(
        "could not create a temporary directory in {}",
        base.display()
    )
}

#[allow(clippy::too_many_arguments)]
fn writer(
    log: &Log,
    producer: Option<&tally_engine::format::checkpoint::SigningKey>,
    w: usize,
    args: &BenchArgs,
    budget: &AtomicU64,
    total_appends: u64,
    deadline: Option<Duration>,
    started: Instant,
) -> anyhow::Result<WriterResult> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let payload: Vec<u8> = (0..args.payload)
        .map(|i| (i as u8).wrapping_mul(31))
        .collect();
    // The same events are appended every time: ids are left to the engine (a fresh v7 id
    // per event), so nothing is allocated per append on this side.
    let json = args.json_payload.then(|| {
        // {"trade":"T-...","qty":...,"note":"xxx..."} padded to the payload size.
        let head = r#"{"trade":"T-000001","book":"EU-GAS","qty":"1000.00","note":""#;
        let pad = args.payload.saturating_sub(head.len() + 2).max(1);
        format!("{head}{}\"}}", "x".repeat(pad))
    });
    let batch: Vec<EventData> = (0..args.batch)
        .map(|i| {
            let e = match &json {
                Some(j) => EventData::json("BenchEvent", j.clone()),
                None => EventData::new("BenchEvent", payload.clone()),
            };
            let e = match args.seal_field {
                Some(n) => e.personal(tally_engine::Personal::fields(
                    format!("client-{}", (i as u64 + w as u64) % n.max(1)),
                    ["book"],
                )),
                None => e,
            };
            match &args.correlation {
                Some(c) => e.correlation_id(c.clone()),
                None => e,
            }
        })
        .collect();
    let streams: Vec<String> = (0..args.streams.min(1 << 20))
        .map(|i| format!("bench-{i}"))
        .collect();
    let mut pending: VecDeque<(AppendHandle, Instant)> = VecDeque::with_capacity(args.inflight);
    let mut events = 0u64;
    let mut k = w as u64;
    let record = |h: &mut Histogram<u64>, t: Instant| {
        let us = u64::try_from(t.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        h.record(us.min(h.high())).ok();
    };
    loop {
        let more = match deadline {
            Some(d) => started.elapsed() < d,
            None => budget.fetch_add(1, Ordering::Relaxed) < total_appends,
        };
        if !more {
            break;
        }
        let stream = &streams[(k % streams.len() as u64) as usize];
        k += args.writers as u64;
        let t = Instant::now();
        if let Some(key) = producer {
            // A producer gives each event its id and time, signs, and appends.
            let signed = (args.inflight == 1)
                .then(|| log.append_signed(stream, ExpectedVersion::Any, &batch, key));
            match signed {
                Some(r) => {
                    r?;
                    record(&mut histogram, t);
                }
                None => {
                    if pending.len() == args.inflight {
                        let (h, t0) = pending.pop_front().expect("window is full");
                        h.wait()?;
                        record(&mut histogram, t0);
                    }
                    let time = tally_engine::now();
                    let events: Vec<EventData> = batch
                        .iter()
                        .map(|e| {
                            e.clone()
                                .with_id(tally_engine::new_event_id())
                                .event_time(time)
                        })
                        .collect();
                    let requests = [tally_engine::AppendRequest {
                        stream,
                        expected: ExpectedVersion::Any,
                        events: &events,
                    }];
                    let sig = tally_engine::producer_signature(&log.log_id(), &requests, key)?;
                    pending.push_back((log.append_deferred_multi_signed(&requests, &sig)?, t));
                }
            }
        } else if args.inflight == 1 {
            log.append(stream, ExpectedVersion::Any, &batch)?;
            record(&mut histogram, t);
            if args.think_us > 0 {
                // Busy, not asleep: only the disk idles, as it does between a remote
                // client's appends.
                let until = Instant::now() + Duration::from_micros(args.think_us);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        } else {
            if pending.len() == args.inflight {
                let (h, t0) = pending.pop_front().expect("window is full");
                h.wait()?;
                record(&mut histogram, t0);
            }
            pending.push_back((log.append_async(stream, ExpectedVersion::Any, &batch)?, t));
        }
        events += args.batch as u64;
    }
    for (h, t0) in pending {
        h.wait()?;
        record(&mut histogram, t0);
    }
    Ok(WriterResult { histogram, events })
}
