//! `tally bench`: the embedded load generator.
//!
//! N writer threads append to one embedded log. Each keeps `--inflight` appends outstanding
//! (1: a blocking `append`; more: `append_async` handles waited on oldest first) and records
//! the time from submitting an append to its acknowledgement in an HdrHistogram.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tally_engine::{AppendHandle, Durability, EventData, ExpectedVersion, Log, Options};

/// Options of `tally bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Data directory (created if missing). Default: a fresh temporary directory, removed
    /// afterwards.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Writer threads.
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Appends each writer keeps outstanding.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// Total events to append (ignored with --duration).
    #[arg(long, default_value_t = 100_000)]
    events: u64,
    /// Run for this many seconds instead of a number of events.
    #[arg(long)]
    duration: Option<f64>,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 256)]
    payload: usize,
    /// Streams to spread the events over.
    #[arg(long, default_value_t = 1000)]
    streams: u64,
    /// Events per append.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Durability of the log.
    #[arg(long, value_enum, default_value_t = DurabilityArg::Fsync)]
    durability: DurabilityArg,
    /// Max delay for --durability batched, in milliseconds.
    #[arg(long, default_value_t = 5)]
    batched_delay_ms: u64,
    /// Segment size in MiB.
    #[arg(long, default_value_t = 64)]
    segment_mib: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DurabilityArg {
    Fsync,
    Batched,
    None,
}

/// What one writer measured.
struct WriterResult {
    histogram: Histogram<u64>,
    events: u64,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    if args.writers == 0 || args.inflight == 0 || args.batch == 0 || args.streams == 0 {
        bail!("--writers, --inflight, --batch and --streams must be at least 1");
    }
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
    let opts = Options {
        segment_bytes: args.segment_mib << 20,
        durability,
        ..Options::default()
    };
    let log = Log::open(&dir, opts).with_context(|| format!("opening {}", dir.display()))?;
    let budget = AtomicU64::new(0);
    let total_appends = args.events.div_ceil(args.batch as u64);
    let deadline = args.duration.map(Duration::from_secs_f64);
    let started = Instant::now();
    let results: Vec<anyhow::Result<WriterResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.writers)
            .map(|w| {
                let (log, budget) = (&log, &budget);
                s.spawn(move || writer(log, w, args, budget, total_appends, deadline, started))
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
    log.close()?;
    let mb = events as f64 * args.payload as f64 / 1e6;
    let q = |p: f64| histogram.value_at_quantile(p);
    if args.json {
        let v = serde_json::json!({
            "events": events,
            "seconds": seconds,
            "events_per_sec": events as f64 / seconds,
            "mb_per_sec": mb / seconds,
            "latency_us": {
                "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
                "max": histogram.max(),
            },
        });
        println!("{v}");
    } else {
        println!(
            "writers {}  inflight {}  batch {}  payload {} B  streams {}  durability {:?}",
            args.writers, args.inflight, args.batch, args.payload, args.streams, args.durability
        );
        println!(
            "{:>12} {:>9} {:>13} {:>9}",
            "events", "seconds", "events/s", "MB/s"
        );
        println!(
            "{events:>12} {seconds:>9.3} {:>13.0} {:>9.1}",
            events as f64 / seconds,
            mb / seconds
        );
        println!("ack latency (us, per append):");
        println!(
            "{:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max"
        );
        println!(
            "{:>9} {:>9} {:>9} {:>9} {:>9}",
            q(0.50),
            q(0.90),
            q(0.99),
            q(0.999),
            histogram.max()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A temporary data directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> anyhow::Result<TempDir> {
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

fn writer(
    log: &Log,
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
    let batch: Vec<EventData> = (0..args.batch)
        .map(|_| EventData::new("BenchEvent", payload.clone()))
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
        if args.inflight == 1 {
            log.append(stream, ExpectedVersion::Any, &batch)?;
            record(&mut histogram, t);
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
