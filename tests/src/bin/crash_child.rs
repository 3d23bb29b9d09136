//! The child process of `tests/tests/crash_sigkill.rs`.
//!
//! Usage: `crash_child DIR CYCLE THREADS SEED [COLD_STORE_DIR]`. Opens the log in DIR with
//! `Durability::Fsync` and small segments, and appends from THREADS threads until it is
//! killed. With COLD_STORE_DIR, a background compaction moves every sealed segment but the
//! newest to that store as fast as it can, so the kill often lands inside a compaction. After each acknowledged append it prints one line to stdout and flushes it:
//!
//! `ACK <thread> <counter> <parts>` followed, per part, by ` <stream> <first_version>
//! <first_position> <events>`.
//!
//! The events' content is a function of (cycle, thread, counter, part, index)
//! (`tally_tests::event_for`), so the parent can check every acknowledged event byte for
//! byte.

use std::io::Write;
use std::sync::Mutex;

use tally_engine::{AppendRequest, Durability, ExpectedVersion, Log, Options};
use tally_tests::{EventKey, Rng, event_for};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(5..=6).contains(&args.len()) {
        eprintln!("usage: crash_child DIR CYCLE THREADS SEED [COLD_STORE_DIR]");
        std::process::exit(2);
    }
    let dir = &args[1];
    let cycle: u32 = args[2].parse().expect("cycle");
    let threads: u16 = args[3].parse().expect("threads");
    let seed: u64 = args[4].parse().expect("seed");
    let cold = match args.get(5) {
        Some(store) => tally_tests::cold_options(std::path::Path::new(store), true),
        None => tally_engine::ColdOptions::default(),
    };
    let opts = Options {
        segment_bytes: 128 * 1024,
        durability: Durability::Fsync,
        cold,
        ..Options::default()
    };
    let log = match Log::open(dir, opts) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("crash_child: open failed: {e:?}");
            std::process::exit(3);
        }
    };
    println!("OPEN");
    let out = Mutex::new(std::io::stdout());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (log, out) = (&log, &out);
            s.spawn(move || {
                let mut rng = Rng::new(seed ^ (u64::from(t) << 32) ^ u64::from(cycle));
                for counter in 0u32.. {
                    // One stream in most appends; two streams atomically in some.
                    let parts: u8 = if rng.below(5) == 0 { 2 } else { 1 };
                    let sizes: Vec<u8> = (0..parts).map(|_| 1 + rng.below(4) as u8).collect();
                    let total: u32 = sizes.iter().map(|&n| u32::from(n)).sum();
                    let streams: Vec<String> = (0..parts)
                        .map(|p| format!("trade-{}", (rng.below(40) + u64::from(p) * 40)))
                        .collect();
                    let events: Vec<Vec<_>> = sizes
                        .iter()
                        .enumerate()
                        .map(|(p, &n)| {
                            (0..n)
                                .map(|i| {
                                    let key = EventKey {
                                        cycle,
                                        thread: t,
                                        counter,
                                        part: p as u8,
                                        index: i,
                                    };
                                    event_for(key, total)
                                })
                                .collect()
                        })
                        .collect();
                    let requests: Vec<AppendRequest<'_>> = streams
                        .iter()
                        .zip(&events)
                        .map(|(s, e)| AppendRequest {
                            stream: s,
                            expected: ExpectedVersion::Any,
                            events: e,
                        })
                        .collect();
                    match log.append_multi(&requests) {
                        Ok(results) => {
                            let mut line = format!("ACK {t} {counter} {parts}");
                            for ((s, e), r) in streams.iter().zip(&events).zip(&results) {
                                line.push_str(&format!(
                                    " {s} {} {} {}",
                                    r.first_version,
                                    r.first_position,
                                    e.len()
                                ));
                            }
                            let mut o = out
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            let _ = writeln!(o, "{line}");
                            let _ = o.flush();
                        }
                        Err(e) => {
                            eprintln!("crash_child: append failed: {e:?}");
                            std::process::exit(4);
                        }
                    }
                }
            });
        }
    });
}
