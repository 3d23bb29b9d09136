//! Retention under SIGKILL: a child process (`retention_child`) appends quotes under a policy
//! that keeps the newest 2 events of each `quote-` stream and a hold on `quote-held`, and now
//! and then seals its active segment and applies retention; the parent kills it at a random
//! moment (while it plans, between the run's event and the rewrites, while a segment is
//! rewritten or renamed), reopens the log, and checks that
//!
//! - every acknowledged event is there, whole or removed by a run that lists it;
//! - nothing the policy keeps was removed: each removed event had at least two newer events of
//!   its stream before the run that removed it, and no event of the held stream is removed;
//! - every run reported finished removed all it listed;
//! - no temporary segment survives the open, and the log verifies.
//!
//! 10 cycles by default; `TALLY_CRASH_CYCLES=N` for more; `TALLY_CRASH_SEED` replays a run.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use tally_engine::{Direction, Log, Options, Position};
use tally_tests::{Rng, run_then_kill, seed_from_env};

#[test]
fn a_killed_retention_run_removes_only_what_the_policy_lets_go() {
    let cycles: u32 = std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = seed_from_env("TALLY_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let child = env!("CARGO_BIN_EXE_retention_child");
    // The highest acknowledged version of each stream.
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    let mut runs_reported: BTreeSet<u64> = BTreeSet::new();
    let mut removed_total = 0usize;
    for cycle in 0..cycles {
        let mut cmd = Command::new(child);
        cmd.arg(&dir).arg(rng.next_u64().to_string());
        let (out, err) = run_then_kill(cmd, Duration::from_millis(200 + rng.below(500)));
        assert!(
            err.is_empty(),
            "cycle {cycle} (seed {seed}): child reported: {err}"
        );
        for l in out.lines() {
            let parts: Vec<&str> = l.split(' ').collect();
            match parts.as_slice() {
                ["APPENDED", stream, v] => {
                    let v: u64 = v.parse().unwrap();
                    let e = acked.entry((*stream).to_owned()).or_default();
                    *e = (*e).max(v);
                }
                ["RUN", at, _] => {
                    if let Ok(at) = at.parse() {
                        runs_reported.insert(at);
                    }
                }
                _ => {}
            }
        }
        let log = Log::open(&dir, Options::default())
            .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): reopen failed: {e:?}"));
        let leftovers: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg.tmp"))
            .collect();
        assert!(leftovers.is_empty(), "cycle {cycle}: {leftovers:?}");
        let g = log.governance().unwrap();
        let run_at: BTreeSet<u64> = g.runs.iter().map(|(p, _)| p.0).collect();
        for (stream, &max) in &acked {
            let events = log
                .read_stream(stream, 0, usize::MAX, Direction::Forward)
                .unwrap();
            assert!(
                events.len() as u64 > max,
                "cycle {cycle} (seed {seed}): {stream} lost acknowledged versions: {} <= {max}",
                events.len()
            );
            for (i, e) in events.iter().enumerate() {
                assert_eq!(e.version, i as u64, "versions stay dense");
                let Some(by) = e.removed_by() else {
                    assert_eq!(e.event_type(), "Quote");
                    continue;
                };
                removed_total += 1;
                assert_ne!(
                    stream, "quote-held",
                    "cycle {cycle}: a held event was removed"
                );
                assert!(run_at.contains(&by.0), "removed by no recorded run");
                assert!(g.removal(by, e.position).is_some(), "the run lists it");
                // The policy let it go: two newer events of its stream came before the run.
                let newer = events[i + 1..].iter().filter(|n| n.position < by).count();
                assert!(
                    newer >= 2,
                    "cycle {cycle} (seed {seed}): {stream} v{i} removed with {newer} newer events"
                );
            }
        }
        // Every run reported finished removed all it listed.
        for (at, run) in &g.runs {
            if !runs_reported.contains(&at.0) {
                continue;
            }
            for r in &run.removed {
                for p in r.from..r.to {
                    let e = log
                        .read_all(Position(p), 1, Direction::Forward)
                        .unwrap()
                        .remove(0);
                    assert!(
                        e.removed_by().is_some(),
                        "cycle {cycle} (seed {seed}): position {p} listed by the finished run at {} is whole",
                        at.0
                    );
                }
            }
        }
        log.verify().unwrap();
        log.close().unwrap();
    }
    let appended: u64 = acked.values().map(|v| v + 1).sum();
    assert!(
        appended > 50,
        "too few appends to test anything: {appended}"
    );
    assert!(
        !runs_reported.is_empty() && removed_total > 0,
        "no run finished or removed anything"
    );
    eprintln!(
        "crash_retention: {appended} appends, {} runs reported finished, {removed_total} removed events seen",
        runs_reported.len()
    );
}
