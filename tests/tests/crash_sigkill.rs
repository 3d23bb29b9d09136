//! Durability under SIGKILL: a child process (`crash_child`) appends with
//! `Durability::Fsync` from several threads, printing each acknowledged append; the parent
//! kills it with SIGKILL at a random moment, reopens the log, and checks that
//!
//! - every acknowledged event is present, byte-identical, at its acknowledged position and
//!   stream version;
//! - no batch is partly visible (each event's payload says how many events its batch had);
//! - the whole chain, every checksum, the Merkle roots and the indexes verify.
//!
//! The same directory is reused across cycles, so each child recovers what the previous
//! one left. 50 cycles by default; `TALLY_CRASH_CYCLES=N` for more; `TALLY_CRASH_SEED`
//! replays a run.
//!
//! This models a process crash: the page cache survives. Power loss is covered by the
//! recovery rules' tests (torn tails, damaged data), not here.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use tally_engine::{Direction, Log, Options, Position};
use tally_tests::{EventKey, Rng, batch_events_of, event_for, run_then_kill, seed_from_env};

#[derive(Debug)]
struct Ack {
    thread: u16,
    counter: u32,
    parts: Vec<(String, u64, u64, u8)>,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut it = line.split_whitespace();
    if it.next()? != "ACK" {
        return None;
    }
    let thread = it.next()?.parse().ok()?;
    let counter = it.next()?.parse().ok()?;
    let n: usize = it.next()?.parse().ok()?;
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        parts.push((
            it.next()?.to_owned(),
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        ));
    }
    Some(Ack {
        thread,
        counter,
        parts,
    })
}

#[test]
fn every_acknowledged_append_survives_sigkill() {
    let cycles: u32 = std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    kill_cycles(cycles, None);
}

/// The same, with a background compaction moving every sealed segment but the newest to a
/// cold store while the children append: a kill lands before, during and after the steps of
/// a move, and every acknowledged event must still be readable (through the store) and
/// the whole log verify.
#[test]
fn every_acknowledged_append_survives_sigkill_during_compaction() {
    let cycles: u32 = std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(25, |n: u32| n.div_ceil(2));
    let store = tempfile::tempdir().unwrap();
    let cold = kill_cycles(cycles, Some(store.path()));
    assert!(
        cold > 0,
        "no segment ever went cold: the test exercised nothing"
    );
}

/// Runs `cycles` kill cycles; returns how many segments are cold at the end.
fn kill_cycles(cycles: u32, store: Option<&std::path::Path>) -> usize {
    let seed = seed_from_env("TALLY_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let child = env!("CARGO_BIN_EXE_crash_child");
    let opts = Options {
        segment_bytes: 128 * 1024,
        cold: store.map_or_else(tally_engine::ColdOptions::default, |s| {
            tally_tests::cold_options(s, false)
        }),
        ..Options::default()
    };
    let mut total_acked = 0usize;
    let mut acked_so_far: Vec<(u32, Ack)> = Vec::new();
    let mut cold = 0;
    for cycle in 0..cycles {
        let mut cmd = Command::new(child);
        cmd.arg(dir.path())
            .arg(cycle.to_string())
            .arg("4")
            .arg(rng.next_u64().to_string());
        if let Some(s) = store {
            cmd.arg(s);
        }
        // Kill at a random moment: sometimes during open, mostly while appending (and,
        // with a store, compacting: longer runs so that segments fill and move).
        let longer = if store.is_some() { 150 } else { 0 };
        let run_for = Duration::from_millis(if rng.below(8) == 0 {
            rng.below(15)
        } else {
            20 + longer + rng.below(250)
        });
        let (out, err) = run_then_kill(cmd, run_for);
        assert!(err.is_empty(), "cycle {cycle}: child reported: {err}");
        let acks: Vec<Ack> = out.lines().filter_map(parse_ack).collect();
        total_acked += acks.len();
        acked_so_far.extend(acks.into_iter().map(|a| (cycle, a)));

        let log = Log::open(dir.path(), opts.clone())
            .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e:?}"));
        for t in &log.recovery_report().truncations {
            assert!(!t.acknowledged_data_lost, "cycle {cycle}: {t:?}");
        }
        check_acknowledged(&log, &acked_so_far, cycle);
        check_no_partial_batches(&log, cycle);
        log.verify()
            .unwrap_or_else(|e| panic!("cycle {cycle}: verify failed: {e:?}"));
        assert_eq!(log.check_chain(2).unwrap(), log.next_position().0);
        cold = log.segments().iter().filter(|s| s.cold.is_some()).count();
        log.close().unwrap();
    }
    eprintln!(
        "{cycles} kill cycles, {total_acked} acknowledged appends checked, {cold} segments cold"
    );
    assert!(total_acked > 0, "the children never acknowledged anything");
    cold
}

/// Checks every acknowledged event in one pass over the log.
fn check_acknowledged(log: &Log, acks: &[(u32, Ack)], cycle: u32) {
    // position -> (stream, version, key, events in the batch)
    let mut want: HashMap<u64, (&str, u64, EventKey, u32)> = HashMap::new();
    for (c, ack) in acks {
        let total: u32 = ack.parts.iter().map(|p| u32::from(p.3)).sum();
        for (part, (stream, first_version, first_position, n)) in ack.parts.iter().enumerate() {
            for i in 0..u64::from(*n) {
                let key = EventKey {
                    cycle: *c,
                    thread: ack.thread,
                    counter: ack.counter,
                    part: part as u8,
                    index: i as u8,
                };
                want.insert(
                    first_position + i,
                    (stream.as_str(), first_version + i, key, total),
                );
            }
        }
    }
    let mut found = 0usize;
    let mut from = Position(0);
    loop {
        let chunk = log.read_all(from, 4096, Direction::Forward).unwrap();
        let Some(last) = chunk.last() else { break };
        from = last.position.next();
        for e in &chunk {
            let Some(&(stream, version, key, total)) = want.get(&e.position.0) else {
                continue;
            };
            found += 1;
            let w = event_for(key, total);
            let at = format!(
                "cycle {cycle}: acknowledged {stream} v{version} at {}",
                e.position
            );
            assert_eq!(e.event_id, key.event_id(), "{at}: wrong event");
            assert_eq!(
                (e.stream(), e.version),
                (stream, version),
                "{at}: wrong place"
            );
            assert_eq!(e.payload(), &w.payload[..], "{at}: payload");
            assert_eq!(e.event_type(), w.event_type, "{at}");
            assert_eq!(e.actor(), w.actor, "{at}");
            assert_eq!(e.correlation_id(), w.correlation_id, "{at}");
            assert_eq!(e.causation_id(), w.causation_id, "{at}");
            assert_eq!(Some(e.event_time), w.event_time, "{at}");
            assert_eq!(e.aggregate_type(), w.aggregate_type, "{at}");
        }
    }
    assert_eq!(
        found,
        want.len(),
        "cycle {cycle}: acknowledged events are missing"
    );
    // The stream index agrees: spot-check reads by stream for this cycle's acknowledgements.
    for (_, ack) in acks.iter().filter(|(c, _)| *c == cycle) {
        for (stream, first_version, first_position, n) in &ack.parts {
            let got = log
                .read_stream(stream, *first_version, usize::from(*n), Direction::Forward)
                .unwrap();
            assert_eq!(
                got.len(),
                usize::from(*n),
                "cycle {cycle}: {stream} from v{first_version}"
            );
            assert_eq!(got[0].position, Position(*first_position));
        }
    }
}

fn check_no_partial_batches(log: &Log, cycle: u32) {
    let mut batches: HashMap<(u32, u16, u32), (u32, u32)> = HashMap::new();
    let mut from = Position(0);
    loop {
        let chunk = log.read_all(from, 4096, Direction::Forward).unwrap();
        let Some(last) = chunk.last() else { break };
        from = last.position.next();
        for e in &chunk {
            let key = EventKey::from_event_id(e.event_id).expect("only crash-test events");
            let want = batch_events_of(e.payload()).expect("payload carries the batch size");
            let entry = batches.entry(key.batch()).or_insert((0, want));
            entry.0 += 1;
        }
    }
    for (batch, (seen, want)) in batches {
        assert_eq!(
            seen, want,
            "cycle {cycle}: batch {batch:?} is partly visible"
        );
    }
}
