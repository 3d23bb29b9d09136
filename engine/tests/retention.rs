//! Applying retention (format version 4): removed events read as markers naming the run that
//! removed them, stream versions stay dense, held and undue events stay whole, every
//! checkpoint and proof made before still verifies, `verify` reports each removal with its
//! policy and refuses a removal no run made, and logs before version 4 refuse retention.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;

use tally_engine::governance::{HoldPlaced, HoldScope, Keep, PolicyScope, PolicySet};
use tally_engine::{
    Direction, EventData, ExpectedVersion, Log, Options, Position, REMOVED_EVENT_TYPE, Timestamp,
};

const YEAR: u64 = 31_557_600 * 1_000_000_000;

fn opts() -> Options {
    Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    }
}

/// Now: the policies keep settled trades for a nanosecond, so that a run judged now has
/// them due (a run may not be judged in the future).
fn far() -> Timestamp {
    tally_engine::now()
}

/// 60 trades of 4 events; even ones settled. Trade 10 is held.
fn history(log: &Log) {
    trades(log);
    rules(log);
}

/// [`history`]'s trades.
fn trades(log: &Log) {
    for round in 0..4 {
        for id in 0..60u32 {
            let t = match round {
                0 => "TradeNew",
                3 if id % 2 == 0 => "TradeSettled",
                _ => "TradeAmended",
            };
            let e = EventData::json(
                t,
                format!("{{\"trade\":{id},\"client\":\"Jane Doe {id}\"}}"),
            )
            .aggregate_type("Trade")
            .actor("trader-jane")
            .correlation_id(format!("order-{id}"));
            log.append(&format!("trade-{id}"), ExpectedVersion::Any, &[e])
                .unwrap();
        }
    }
}

/// [`history`]'s policy and hold.
fn rules(log: &Log) {
    log.set_retention_policy(
        &PolicySet {
            name: "trades".into(),
            scope: PolicyScope::Prefix("trade-".into()),
            keep: Keep::AfterEvent {
                event_type: "TradeSettled".into(),
                nanos: 1,
            },
            reason: "MiFID II".into(),
        },
        "compliance",
    )
    .unwrap();
    log.place_legal_hold(
        &HoldPlaced {
            id: "case-10".into(),
            scope: HoldScope::Stream("trade-10".into()),
            reason: "litigation".into(),
        },
        "legal",
    )
    .unwrap();
}

#[test]
fn removed_events_read_as_markers_and_every_proof_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    history(&log);
    let cp = log.checkpoint().unwrap();
    let size = cp.statement.tree_size;
    let before = log
        .read_all(Position(0), 100_000, Direction::Forward)
        .unwrap();
    let proofs: Vec<_> = [0u64, 7, 61, 130, size - 1]
        .iter()
        .map(|&p| (p, log.prove_inclusion(Position(p), size).unwrap()))
        .collect();
    // Roll so that every trade event is in a sealed segment.
    for n in 0..400 {
        log.append(
            "filler",
            ExpectedVersion::Any,
            &[EventData::json(
                "Pad",
                format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(200)),
            )],
        )
        .unwrap();
    }
    log.wait_sealed().unwrap();

    let plan = log.retention_plan(far()).unwrap();
    assert_eq!(
        plan.removed_events(),
        29 * 4,
        "the settled trades but the held one"
    );
    // A run is judged now, not in the future (a dry run may look ahead).
    let err = log
        .apply_retention(Timestamp(tally_engine::now().0 + YEAR), "ops", "early")
        .unwrap_err();
    assert!(err.to_string().contains("future"), "{err}");
    let report = log.apply_retention(far(), "ops", "quarterly run").unwrap();
    assert_eq!(report.removed, 29 * 4);
    assert_eq!(report.pending, 0);
    let by = report.recorded_at.unwrap();
    // A second run finds nothing left to do.
    let again = log.apply_retention(far(), "ops", "again").unwrap();
    assert_eq!((again.removed, again.recorded_at), (0, None));

    let check = |log: &Log| {
        for e in &before {
            let now = &log.read_all(e.position, 1, Direction::Forward).unwrap()[0];
            assert_eq!(
                (now.position, now.version, now.record_hash, now.record_time),
                (e.position, e.version, e.record_hash, e.record_time)
            );
            let id: u32 = e
                .stream()
                .strip_prefix("trade-")
                .map_or(u32::MAX, |s| s.parse().unwrap());
            let due = id != u32::MAX && id.is_multiple_of(2) && id != 10;
            if due {
                assert_eq!(now.event_type(), REMOVED_EVENT_TYPE);
                assert_eq!(now.removed_by(), Some(by));
                assert_eq!(now.stream(), e.stream());
                assert!(now.actor().is_empty() && now.correlation_id().is_empty());
                assert!(!String::from_utf8_lossy(now.payload()).contains("Jane"));
            } else {
                assert_eq!(now, e, "kept events are untouched");
            }
        }
        // Stream reads stay dense: four events, removed or not.
        let t2 = log
            .read_stream("trade-2", 0, 10, Direction::Forward)
            .unwrap();
        assert_eq!(
            t2.iter().map(|e| e.version).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert!(t2.iter().all(|e| e.removed_by() == Some(by)));
        assert_eq!(log.stream_info("trade-2").unwrap().unwrap().last_version, 3);
        // Proofs made before retention verify against the checkpoint signed before it.
        for (p, proof) in &proofs {
            proof
                .verify(&before[*p as usize].record_hash, &cp.statement.root)
                .unwrap();
            let again = log.prove_inclusion(Position(*p), size).unwrap();
            again
                .verify(&before[*p as usize].record_hash, &cp.statement.root)
                .unwrap();
        }
        let v = log.verify().unwrap();
        let removed: u64 = v.removed.iter().map(|r| r.to - r.from).sum();
        assert_eq!(removed, 29 * 4);
        assert!(
            v.removed
                .iter()
                .all(|r| r.policy == "trades" && r.removed_by == by.0)
        );
        assert!(v.checkpoints >= 1);
    };
    check(&log);
    // The run is an event of $governance with its actor, reason and ranges.
    let g = log.governance().unwrap();
    let (at, run) = g.runs.last().unwrap();
    assert_eq!(*at, by);
    assert_eq!(run.reason, "quarterly run");
    assert_eq!(run.held, 4);
    let cp2 = log.checkpoint().unwrap();
    log.prove_consistency(size, cp2.statement.tree_size)
        .unwrap()
        .verify(&cp.statement.root, &cp2.statement.root)
        .unwrap();
    log.close().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    check(&log);
}

#[test]
fn a_removal_no_run_made_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    history(&log);
    for n in 0..400 {
        log.append(
            "filler",
            ExpectedVersion::Any,
            &[EventData::json(
                "Pad",
                format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(200)),
            )],
        )
        .unwrap();
    }
    log.wait_sealed().unwrap();
    let report = log.apply_retention(far(), "ops", "run").unwrap();
    let by = report.recorded_at.unwrap().0;
    log.close().unwrap();
    // An attacker with write access prunes a kept event (trade-1, version 0, position 1)
    // the same way, naming the real run: the run's ranges do not hold it.
    let seg = dir.path().join("00000000000000000000.seg");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut header = [0u8; 88];
    // Find position 1's record: walk from the first record.
    let mut off = 4096u64;
    loop {
        f.read_exact_at(&mut header, off).unwrap();
        let pos = u64::from_le_bytes(header[48..56].try_into().unwrap());
        let body_len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as u64;
        if pos == 1 {
            let mut body = vec![0u8; body_len as usize];
            f.read_exact_at(&mut body, off + 88).unwrap();
            let hash = *blake3::hash(&body).as_bytes();
            let pruned =
                tally_engine::format::pruned::encode(&hash, Position(by), "trade-1", body.len())
                    .unwrap();
            f.write_all_at(&pruned, off + 88).unwrap();
            header[44] = 1;
            header[8..12].copy_from_slice(&crc32fast::hash(&pruned).to_le_bytes());
            let crc = crc32fast::hash(&header[4..88]);
            header[0..4].copy_from_slice(&crc.to_le_bytes());
            f.write_all_at(&header, off).unwrap();
            break;
        }
        off += (88 + body_len).next_multiple_of(8);
    }
    drop(f);
    let log = Log::open(
        dir.path(),
        Options {
            create: false,
            ..opts()
        },
    )
    .unwrap();
    let err = log.verify().unwrap_err().to_string();
    assert!(err.contains("a removal no policy made"), "{err}");
}

#[test]
fn logs_before_version_4_refuse_retention() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            format_version: 3,
            ..opts()
        },
    )
    .unwrap();
    history(&log);
    let err = log
        .apply_retention(far(), "ops", "run")
        .unwrap_err()
        .to_string();
    assert!(err.contains("format version 4"), "{err}");
    // The plan still says what a version 4 log would remove.
    assert_eq!(log.retention_plan(far()).unwrap().removed_events(), 29 * 4);
}

/// A power cut at any disk operation of a retention run (the simulated disk drops what was
/// not synced): the log opens, verifies, and every event is either whole or removed by the
/// run, and only if the plan removes it; an acknowledged run removed everything it planned;
/// no temporary is left after a writable open; the next run finishes the work.
#[test]
fn a_power_cut_at_any_step_of_a_run_removes_only_what_the_plan_said() {
    use tally_engine::sim::{Cut, SimFs};
    let data = std::path::PathBuf::from("/retention/data");
    for seed in [31u64, 32] {
        let mut n = 1;
        loop {
            let sim = SimFs::new(seed);
            // Nothing synced but what the run syncs itself: its event must be durable
            // before any segment is rewritten, whatever the log's durability.
            let options = || Options {
                durability: tally_engine::Durability::None,
                storage: tally_engine::Storage::simulated(&sim),
                checkpoint_interval: None,
                auto_checkpoints: false,
                index_attributes: false,
                ..opts()
            };
            let log = Log::open(&data, options()).unwrap();
            // Trades spread over several segments (filler between the rounds), so that a
            // cut can land after one segment's rewrite and before the next.
            for round in 0..3 {
                for id in 0..10u32 {
                    let t = if round == 2 && id % 2 == 0 {
                        "TradeSettled"
                    } else {
                        "TradeAmended"
                    };
                    let e = EventData::json(t, format!("{{\"trade\":{id},\"client\":\"Jane\"}}"))
                        .aggregate_type("Trade");
                    log.append(&format!("trade-{id}"), ExpectedVersion::Any, &[e])
                        .unwrap();
                }
                for k in 0..110 {
                    let e = EventData::json(
                        "Pad",
                        format!("{{\"k\":{k},\"pad\":\"{}\"}}", "x".repeat(250)),
                    );
                    log.append("filler", ExpectedVersion::Any, &[e]).unwrap();
                }
            }
            log.wait_sealed().unwrap();
            log.set_retention_policy(
                &PolicySet {
                    name: "trades".into(),
                    scope: PolicyScope::Prefix("trade-".into()),
                    keep: Keep::AfterEvent {
                        event_type: "TradeSettled".into(),
                        nanos: 1,
                    },
                    reason: "MiFID II".into(),
                },
                "compliance",
            )
            .unwrap();
            log.sync().unwrap();
            let before = log
                .read_all(Position(0), 100_000, Direction::Forward)
                .unwrap();
            let due: std::collections::HashSet<u64> = log
                .retention_plan(far())
                .unwrap()
                .removals
                .iter()
                .flat_map(|r| r.positions.clone())
                .collect();
            assert_eq!(due.len(), 15);
            sim.cut_power_after(n, Cut::seeded_loss());
            let acked = log.apply_retention(far(), "ops", "run").is_ok();
            let fired = sim.generation() > 0;
            log.crash();
            if !fired {
                assert!(acked);
                break;
            }
            let at = |what: &str| format!("seed {seed}, power cut at operation {n}: {what}");
            let log =
                Log::open(&data, options()).unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
            assert!(
                !sim.written_names(&data)
                    .iter()
                    .any(|f| f.to_string_lossy().ends_with(".seg.tmp")),
                "{}",
                at("a temporary survived the open")
            );
            log.verify()
                .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
            let runs: Vec<Position> = log.governance().unwrap().runs.iter().map(|r| r.0).collect();
            let mut removed = 0;
            for e in &before {
                let now = &log.read_all(e.position, 1, Direction::Forward).unwrap()[0];
                match now.removed_by() {
                    None => assert_eq!(now, e, "{}", at("a kept event changed")),
                    Some(by) => {
                        assert!(
                            due.contains(&e.position.0),
                            "{}",
                            at("removed outside the plan")
                        );
                        assert!(runs.contains(&by), "{}", at("removed by no recorded run"));
                        removed += 1;
                    }
                }
            }
            if acked {
                assert_eq!(
                    removed,
                    due.len(),
                    "{}",
                    at("an acknowledged run left events")
                );
            }
            // The next run finishes the work.
            log.apply_retention(far(), "ops", "again").unwrap();
            let left = log.retention_plan(far()).unwrap().removed_events();
            assert_eq!(left, 0, "{}", at("the next run left events"));
            log.verify()
                .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
            log.close().unwrap();
            n += 1;
        }
        assert!(n > 10, "seed {seed}: the run took only {n} disk operations");
    }
}

/// A run whose removals are scattered over more ranges than one event may list is recorded
/// as several `$RetentionApplied` events, each naming the positions it covers; every removed
/// record names the event that lists it, and `verify` checks each against it.
#[test]
fn a_run_of_many_scattered_removals_is_recorded_in_several_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            durability: tally_engine::Durability::None,
            segment_bytes: 1 << 20,
            ..Options::default()
        },
    )
    .unwrap();
    let n = tally_engine::RANGES_PER_EVENT as u64 + 900;
    for i in 0..n {
        for stream in ["quote-a", "keep-b"] {
            log.append(
                stream,
                ExpectedVersion::Any,
                &[EventData::json("Quoted", format!("{{\"i\":{i}}}"))],
            )
            .unwrap();
        }
    }
    for k in 0..4000 {
        let e = EventData::json(
            "Pad",
            format!("{{\"k\":{k},\"pad\":\"{}\"}}", "x".repeat(250)),
        );
        log.append("filler", ExpectedVersion::Any, &[e]).unwrap();
    }
    log.wait_sealed().unwrap();
    log.set_retention_policy(
        &PolicySet {
            name: "quotes".into(),
            scope: PolicyScope::Prefix("quote-".into()),
            keep: Keep::Newest { count: 1 },
            reason: "r".into(),
        },
        "c",
    )
    .unwrap();
    let done = log
        .apply_retention(tally_engine::now(), "ops", "big")
        .unwrap();
    assert_eq!(done.removed, n - 1);
    assert_eq!(done.run_events, 2);
    let g = log.governance().unwrap();
    assert_eq!(g.runs.len(), 2);
    assert_eq!(g.runs[0].1.removed.len(), tally_engine::RANGES_PER_EVENT);
    // The first and the last removed event name different events, each listing them.
    let first = log
        .read_stream("quote-a", 0, 1, Direction::Forward)
        .unwrap()[0]
        .clone();
    let last = log
        .read_stream("quote-a", n - 2, 1, Direction::Forward)
        .unwrap()[0]
        .clone();
    assert_eq!(first.removed_by(), Some(g.runs[0].0));
    assert_eq!(last.removed_by(), Some(g.runs[1].0));
    let v = log.verify().unwrap();
    assert_eq!(v.removed.iter().map(|r| r.to - r.from).sum::<u64>(), n - 1);
}

/// Counts events per stream: a projection that would give a wrong answer, silently, if it
/// folded a history retention shortened.
#[derive(Debug, Default)]
struct Counts(std::collections::BTreeMap<String, u64>);

impl tally_engine::projection::Projection for Counts {
    const STATE_VERSION: u32 = 1;
    fn initial() -> Self {
        Counts::default()
    }
    fn apply(&mut self, e: &dyn tally_engine::EventView) -> Result<(), String> {
        *self.0.entry(e.stream().to_owned()).or_default() += 1;
        Ok(())
    }
    fn encode_state(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap()
    }
    fn decode_state(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok().map(Counts)
    }
}

impl tally_engine::replay::Traced for Counts {
    fn key_of(e: &dyn tally_engine::EventView) -> Option<String> {
        Some(e.stream().to_owned())
    }
    fn encode_part(&self, key: &str) -> Vec<u8> {
        self.0.get(key).copied().unwrap_or(0).to_le_bytes().to_vec()
    }
}

/// The same fold as an aggregate, snapshotted as the projection is checkpointed.
impl tally_engine::aggregate::Aggregate for Counts {
    const SNAPSHOT_VERSION: u32 = 1;
    fn initial() -> Self {
        Counts::default()
    }
    fn apply(&mut self, e: &dyn tally_engine::EventView) -> Result<(), String> {
        tally_engine::projection::Projection::apply(self, e)
    }
    fn encode_snapshot(&self) -> Vec<u8> {
        tally_engine::projection::Projection::encode_state(self)
    }
    fn decode_snapshot(bytes: &[u8]) -> Option<Self> {
        tally_engine::projection::Projection::decode_state(bytes)
    }
}

/// A retention run rewrites sealed segments only; sealing the active segment lets the next
/// run remove what was appended a moment ago.
#[test]
fn sealing_the_active_segment_lets_a_run_remove_what_it_held() {
    let dir = tempfile::tempdir().unwrap();
    // Segments large enough that the whole history stays in the active one.
    let log = Log::open(dir.path(), Options::default()).unwrap();
    history(&log);
    assert_eq!(log.segments().len(), 1);
    let first = log
        .apply_retention(far(), "compliance", "first run")
        .unwrap();
    assert_eq!(first.removed, 0);
    assert_eq!(first.pending, 29 * 4, "{first:?}");
    assert!(log.seal_active_segment().unwrap());
    assert_eq!(log.segments().len(), 2);
    assert!(log.segments()[0].sealed, "{:?}", log.segments());
    let second = log
        .apply_retention(far(), "compliance", "after sealing")
        .unwrap();
    assert_eq!(second.removed, 29 * 4, "{second:?}");
    assert_eq!(second.pending, 0);
    let e = log
        .read_stream("trade-0", 0, usize::MAX, Direction::Forward)
        .unwrap();
    assert!(e.iter().all(|e| e.event_type() == REMOVED_EVENT_TYPE));
    // The new active segment holds the run's event only; sealed again, then nothing is left
    // to seal and the call says so, changing nothing.
    let appended_after = log.next_position();
    assert!(log.seal_active_segment().unwrap());
    assert!(!log.seal_active_segment().unwrap());
    assert_eq!(log.next_position(), appended_after);
    // The log appends and reopens as usual after the rolls.
    log.append(
        "trade-0",
        ExpectedVersion::Any,
        &[EventData::json("TradeAmended", "{}")],
    )
    .unwrap();
    log.verify().unwrap();
    drop(log);
    let log = Log::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.stream_info("trade-0").unwrap().unwrap().last_version, 4);
    log.verify().unwrap();
}

/// A projection, a replay or an aggregate that meets a removed event stops with an error
/// naming the run, instead of computing from a shortened history; a window replay that
/// starts from a signed archive taken before the run still validates.
#[test]
fn folds_stop_at_removed_events_and_resume_from_an_archive() {
    use tally_engine::aggregate::{Repository, SnapshotPolicy};
    use tally_engine::projection::{Projector, ProjectorOptions};
    use tally_engine::replay::{
        Archive, Validation, trace, trace_window, validate, validate_window,
    };

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    history(&log);
    let key = tally_engine::format::checkpoint::SigningKey::from_bytes(&[3; 32]);
    let (state, before) = trace::<Counts>(&log, "counts", log.next_position().0).unwrap();
    let earlier = Archive::sign(
        "counts",
        log.log_id(),
        1,
        "test",
        "v1",
        tally_engine::projection::Projection::encode_state(&state),
        before,
        &key,
    );
    log.seal_active_segment().unwrap();
    let report = log.apply_retention(far(), "compliance", "run").unwrap();
    assert!(report.removed > 0);
    let run = report.recorded_at.unwrap();
    for i in 0..5 {
        log.append(
            &format!("trade-{i}"),
            ExpectedVersion::Any,
            &[EventData::json("TradeAmended", "{}")],
        )
        .unwrap();
    }
    let removed = |reason: &str| {
        assert!(
            reason.contains("removed by retention")
                && reason.contains(&format!("position {}", run.0)),
            "{reason}"
        );
    };
    // A projection from the start.
    let mut p = Projector::<Counts>::open(&log, "counts", ProjectorOptions::default()).unwrap();
    let err = p.catch_up().unwrap_err();
    removed(&err.to_string());
    // A replay from the start, and a validation of an archive by one.
    let err = trace::<Counts>(&log, "counts", log.next_position().0).unwrap_err();
    removed(&err.to_string());
    let err = validate::<Counts>(&log, &earlier, &[]).unwrap_err();
    removed(&format!("{err:?}"));
    // An aggregate whose stream lost its events.
    let repo = Repository::<Counts>::new(&log, SnapshotPolicy::OnDemand);
    let err = repo.load("trade-0").unwrap_err();
    removed(&err.to_string());
    // A held stream folds as before.
    assert_eq!(repo.load("trade-10").unwrap().state.0["trade-10"], 4);
    // From the archive taken before the run, the window after it replays and validates.
    let start = earlier.next;
    let (after_state, window) = trace_window::<Counts>(
        &log,
        "counts",
        <Counts as tally_engine::projection::Projection>::decode_state(&earlier.state).unwrap(),
        start,
        log.next_position().0,
        None,
    )
    .unwrap();
    assert_eq!(after_state.0["trade-0"], 5, "4 before the run, 1 after");
    let later = Archive::sign(
        "counts",
        log.log_id(),
        1,
        "test",
        "v1",
        tally_engine::projection::Projection::encode_state(&after_state),
        window,
        &key,
    );
    assert!(matches!(
        validate_window::<Counts>(&log, &earlier, &later, &[], None).unwrap(),
        Validation::Identical { .. }
    ));
}

/// Snapshots are state derived from their stream: a run that removes a stream whole removes
/// its snapshots with it; a stream kept (not due, or held) keeps them; a load of the removed
/// stream is refused rather than answered from what is left.
#[test]
fn a_stream_removed_whole_takes_its_snapshots_with_it() {
    use tally_engine::aggregate::{Repository, SNAPSHOT_STREAM_PREFIX, SnapshotPolicy};

    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let repo = Repository::<Counts>::new(&log, SnapshotPolicy::EveryEvents(1));
    for round in 0..3 {
        for id in 0..4 {
            let stream = format!("trade-{id}");
            let mut t = repo.load(&stream).unwrap();
            let kind = if round == 2 && id != 1 {
                "TradeSettled"
            } else {
                "TradeAmended"
            };
            repo.save(&stream, &mut t, &[EventData::json(kind, "{}")])
                .unwrap();
        }
    }
    let snapshots = |id: u32| format!("{SNAPSHOT_STREAM_PREFIX}trade-{id}");
    assert!(
        log.stream_info(&snapshots(0)).unwrap().is_some(),
        "snapshots written"
    );
    log.set_retention_policy(
        &PolicySet {
            name: "trades".into(),
            scope: PolicyScope::Prefix("trade-".into()),
            keep: Keep::AfterEvent {
                event_type: "TradeSettled".into(),
                nanos: 1,
            },
            reason: "r".into(),
        },
        "c",
    )
    .unwrap();
    log.place_legal_hold(
        &HoldPlaced {
            id: "h".into(),
            scope: HoldScope::Stream("trade-2".into()),
            reason: "r".into(),
        },
        "c",
    )
    .unwrap();
    // A hold on trade-3's snapshots themselves keeps them, though trade-3 goes.
    log.place_legal_hold(
        &HoldPlaced {
            id: "snapshots".into(),
            scope: HoldScope::Stream(snapshots(3)),
            reason: "r".into(),
        },
        "c",
    )
    .unwrap();
    let plan = log.retention_plan(far()).unwrap();
    let planned: Vec<&str> = plan.removals.iter().map(|r| r.stream.as_str()).collect();
    assert_eq!(planned, [snapshots(0).as_str(), "trade-0", "trade-3"]);
    let held: Vec<(&str, &[String])> = plan
        .held
        .iter()
        .map(|h| (h.stream.as_str(), h.holds.as_slice()))
        .collect();
    assert_eq!(
        held,
        [
            (snapshots(3).as_str(), &["snapshots".to_owned()][..]),
            ("trade-2", &["h".to_owned()][..])
        ]
    );
    log.seal_active_segment().unwrap();
    let run = log.apply_retention(far(), "c", "r").unwrap();
    assert_eq!(run.pending, 0, "{run:?}");
    let all_removed = |s: &str| {
        let e = log
            .read_stream(s, 0, usize::MAX, Direction::Forward)
            .unwrap();
        assert!(!e.is_empty(), "{s}");
        e.iter().all(|e| e.removed_by().is_some())
    };
    let none_removed = |s: &str| {
        let e = log
            .read_stream(s, 0, usize::MAX, Direction::Forward)
            .unwrap();
        assert!(!e.is_empty(), "{s}");
        e.iter().all(|e| e.removed_by().is_none())
    };
    for id in [0, 3] {
        assert!(all_removed(&format!("trade-{id}")));
    }
    assert!(all_removed(&snapshots(0)));
    let err = repo.load("trade-0").unwrap_err().to_string();
    assert!(err.contains("removed by retention"), "{err}");
    // trade-3's held snapshot still loads the state it holds.
    assert!(none_removed(&snapshots(3)), "held");
    assert_eq!(repo.load("trade-3").unwrap().from_snapshot, Some(2));
    for id in [1, 2] {
        assert!(none_removed(&format!("trade-{id}")));
        assert!(none_removed(&snapshots(id)), "{id}");
        assert_eq!(repo.load(&format!("trade-{id}")).unwrap().state.0.len(), 1);
    }
    // verify accepts the snapshots' removals (a run names them) and reports them.
    let v = log.verify().unwrap();
    let removed: u64 = v.removed.iter().map(|r| r.to - r.from).sum();
    assert_eq!(removed, run.removed);
    drop(log);
    assert!(Log::open(dir.path(), opts()).unwrap().verify().is_ok());
}

/// The background thread (`Options::retention_every`) applies the policies as of now on
/// its own, as actor `tally` with reason `scheduled`, and says what it did; the log closes
/// with it running.
#[test]
fn the_background_thread_applies_retention_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            retention_every: Some(std::time::Duration::from_millis(20)),
            ..opts()
        },
    )
    .unwrap();
    // Several intervals pass with no policy: no run.
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(log.retention_status().runs, 0, "no policy, no run");
    history(&log);
    log.seal_active_segment().unwrap();
    // Waits for the thread (no timing is asserted: the bound only stops a hung test).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while log.retention_status().removed < 29 * 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            log.retention_status()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = log.retention_status();
    assert_eq!(status.removed, 29 * 4, "{status:?}");
    assert!(status.last_error.is_none());
    let at = status.last_recorded_at.unwrap();
    let run = log.read_all(at, 1, Direction::Forward).unwrap().remove(0);
    assert_eq!(run.event_type(), "$RetentionApplied");
    assert_eq!(run.actor(), "tally");
    let payload: serde_json::Value = serde_json::from_slice(run.payload()).unwrap();
    assert_eq!(payload["reason"], "scheduled");
    log.close().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let v = log.verify().unwrap();
    assert_eq!(v.removed.iter().map(|r| r.to - r.from).sum::<u64>(), 29 * 4);
}

/// Compaction applies retention first when the log has a policy: what is due is removed
/// before its segment moves to the cold tier, and reads from the cold tier show markers.
#[test]
fn compaction_applies_retention_before_moving_segments() {
    use std::sync::Arc;
    use tally_engine::cold::{ColdStore, DirStore};
    use tally_engine::{ColdOptions, CompactPolicy};

    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    let cold = || Options {
        cold: ColdOptions {
            store: Some(Arc::clone(&store)),
            policy: CompactPolicy {
                keep_local_segments: 1,
                ..CompactPolicy::default()
            },
            ..ColdOptions::default()
        },
        ..opts()
    };
    let log = Log::open(dir.path(), cold()).unwrap();
    // The trades in segments of their own: a segment holding `$governance` stays local.
    trades(&log);
    log.seal_active_segment().unwrap();
    rules(&log);
    log.seal_active_segment().unwrap();
    let report = log.compact(None, false).unwrap();
    assert_eq!(report.retention_removed, 29 * 4, "{report:?}");
    assert!(!report.moved.is_empty());
    let cold_first = log
        .segments()
        .iter()
        .filter(|s| s.cold.is_some())
        .map(|s| s.base_position)
        .min()
        .unwrap();
    assert_eq!(cold_first, Position(0));
    // trade-0's events are in the segments now cold: they read as markers from there.
    let e = log
        .read_stream("trade-0", 0, usize::MAX, Direction::Forward)
        .unwrap();
    assert_eq!(e.len(), 4);
    assert!(
        e.iter()
            .all(|e| e.removed_by() == report.retention_recorded_at)
    );
    // The held trade was kept whole, in the cold tier too.
    let held = log
        .read_stream("trade-10", 0, usize::MAX, Direction::Forward)
        .unwrap();
    assert!(held.iter().all(|e| e.removed_by().is_none()));
    log.verify().unwrap();
    // A dry run applies nothing.
    log.append(
        "trade-1",
        ExpectedVersion::Any,
        &[EventData::json("TradeSettled", "{}")],
    )
    .unwrap();
    log.seal_active_segment().unwrap();
    let dry = log.compact(None, true).unwrap();
    assert_eq!(dry.retention_removed, 0);
    assert_eq!(log.retention_status().runs, 1);
}
