//! Optimistic concurrency under contention: many threads race `Exact(n)` appends on one
//! stream and on many streams. For every version exactly one append wins; the losers get
//! `WrongExpectedVersion` with the actual version; the stream ends up dense and each
//! winner's events are where its result says.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Barrier, Mutex};

use tally_engine::{Direction, Error, EventData, EventId, ExpectedVersion, Log, Options};

fn id(thread: u64, attempt: u64) -> EventId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&thread.to_le_bytes());
    b[8..].copy_from_slice(&attempt.to_le_bytes());
    EventId(b)
}

/// `threads` threads each try to append `target` versions to the streams in `streams`
/// with `Exact` expectations learnt from conflicts.
fn race(streams: usize, threads: u64, target: u64) {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        Log::open(
            dir.path(),
            Options {
                segment_bytes: 256 * 1024,
                ..Options::default()
            },
        )
        .unwrap(),
    );
    let barrier = Arc::new(Barrier::new(threads as usize));
    let wins = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (log, barrier, wins) = (Arc::clone(&log), Arc::clone(&barrier), Arc::clone(&wins));
            std::thread::spawn(move || {
                barrier.wait();
                let mut attempt = 0u64;
                let mut known: Vec<Option<u64>> = vec![None; streams];
                loop {
                    let s = (attempt as usize + t as usize) % streams;
                    let stream = format!("trade-{s}");
                    if known[s].is_some_and(|v| v + 1 >= target) {
                        if known.iter().all(|k| k.is_some_and(|v| v + 1 >= target)) {
                            return;
                        }
                        attempt += 1;
                        continue;
                    }
                    let expected =
                        known[s].map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
                    let e = EventData::new("Amend", attempt.to_le_bytes().to_vec())
                        .with_id(id(t, attempt));
                    match log.append(&stream, expected, &[e]) {
                        Ok(r) => {
                            assert_eq!(
                                Some(r.first_version),
                                known[s].map_or(Some(0), |v| Some(v + 1))
                            );
                            wins.lock()
                                .unwrap()
                                .push((stream, r.first_version, id(t, attempt)));
                            known[s] = Some(r.last_version);
                        }
                        Err(Error::WrongExpectedVersion {
                            actual,
                            expected: e,
                            ..
                        }) => {
                            assert_eq!(e, expected);
                            assert_ne!(actual, known[s], "a conflict reports a different version");
                            known[s] = actual;
                        }
                        Err(other) => panic!("unexpected error {other:?}"),
                    }
                    attempt += 1;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let wins = wins.lock().unwrap();
    let mut seen = HashSet::new();
    for (stream, version, _) in wins.iter() {
        assert!(
            seen.insert((stream.clone(), *version)),
            "two winners for {stream} v{version}"
        );
    }
    for s in 0..streams {
        let stream = format!("trade-{s}");
        let events = log
            .read_stream(&stream, 0, usize::MAX, Direction::Forward)
            .unwrap();
        assert_eq!(
            events.len() as u64,
            target,
            "{stream} is not dense up to the target"
        );
        for e in &events {
            let (_, _, winner) = wins
                .iter()
                .find(|(w, v, _)| *w == stream && *v == e.version)
                .unwrap_or_else(|| panic!("{stream} v{} has no recorded winner", e.version));
            assert_eq!(e.event_id, *winner);
        }
    }
    assert_eq!(wins.len() as u64, target * streams as u64);
    log.verify().unwrap();
}

#[test]
fn racing_exact_appends_on_one_stream() {
    race(1, 8, 400);
}

#[test]
fn racing_exact_appends_on_many_streams() {
    race(16, 8, 60);
}
