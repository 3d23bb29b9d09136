//! Aggregates and snapshots: a snapshot never changes what a load computes.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::time::Duration;
use tally_engine::aggregate::{
    Aggregate, AggregateError, Repository, SNAPSHOT_EVENT_TYPE, SnapshotPolicy, correction_of,
    encode_snapshot_payload, snapshot_stream,
};

use tally_engine::{Direction, Error, EventData, EventView, ExpectedVersion, Log, Options};

/// A position: quantity and cash, in integers (exact), and how many fills it has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Position {
    quantity: i64,
    cash: i64,
    fills: u64,
    /// Every event type seen, in order (makes the fold order-sensitive).
    trail: Vec<String>,
}

fn fill(qty: i64, px: i64) -> EventData {
    EventData::json("Fill", format!(r#"{{"qty":{qty},"px":{px}}}"#))
}

fn parse(e: &dyn EventView) -> (i64, i64) {
    let v: serde_json::Value = serde_json::from_slice(e.payload()).unwrap();
    (v["qty"].as_i64().unwrap(), v["px"].as_i64().unwrap())
}

impl Aggregate for Position {
    const SNAPSHOT_VERSION: u32 = 2;

    fn initial() -> Position {
        Position::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        match e.event_type() {
            "Fill" | "FillCorrected" => {
                let (q, p) = parse(e);
                self.quantity += q;
                self.cash -= q * p;
                self.fills += 1;
            }
            "FillReversed" => {
                // Undoes the quoted original.
                let v: serde_json::Value = serde_json::from_slice(e.payload()).unwrap();
                let (q, p) = (
                    v["payload"]["qty"].as_i64().ok_or("no quantity")?,
                    v["payload"]["px"].as_i64().ok_or("no price")?,
                );
                self.quantity -= q;
                self.cash += q * p;
            }
            "Poison" => return Err("poison event".into()),
            other => return Err(format!("unknown event type {other}")),
        }
        self.trail.push(e.event_type().to_owned());
        Ok(())
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&(self.quantity, self.cash, self.fills, &self.trail)).unwrap()
    }

    fn decode_snapshot(bytes: &[u8]) -> Option<Position> {
        let (quantity, cash, fills, trail) = serde_json::from_slice(bytes).ok()?;
        Some(Position {
            quantity,
            cash,
            fills,
            trail,
        })
    }
}

fn open(dir: &std::path::Path) -> Log {
    Log::open(
        dir,
        Options {
            segment_bytes: 1 << 20,
            ..Options::default()
        },
    )
    .unwrap()
}

/// The fold of the first `n` fills, computed without the log.
fn expected(fills: &[(i64, i64)], n: usize) -> (i64, i64, u64) {
    let mut q = 0;
    let mut c = 0;
    for &(qty, px) in &fills[..n] {
        q += qty;
        c -= qty * px;
    }
    (q, c, n as u64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every version of every aggregate loads to the same state with and without
    /// snapshots, and to the independently computed fold.
    #[test]
    fn snapshots_never_change_what_a_load_computes(
        streams in prop::collection::vec(
            prop::collection::vec((-50i64..50, 1i64..1000), 1..40), 1..4),
        every in 1u64..12,
        batch in 1usize..5,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let repo = Repository::<Position>::new(&log, SnapshotPolicy::EveryEvents(every));
        // Interleave the streams' appends, in batches.
        let mut cursors = vec![0usize; streams.len()];
        let mut loaded: Vec<_> = (0..streams.len())
            .map(|i| repo.load(&format!("book-{i}")).unwrap())
            .collect();
        loop {
            let mut progressed = false;
            for (i, fills) in streams.iter().enumerate() {
                let c = cursors[i];
                if c == fills.len() {
                    continue;
                }
                let end = (c + batch).min(fills.len());
                let events: Vec<_> = fills[c..end].iter().map(|&(q, p)| fill(q, p)).collect();
                repo.save(&format!("book-{i}"), &mut loaded[i], &events).unwrap();
                cursors[i] = end;
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        for (i, fills) in streams.iter().enumerate() {
            let stream = format!("book-{i}");
            for v in 0..fills.len() as u64 {
                let with = repo.load_at(&stream, v).unwrap();
                let without = repo.load_without_snapshots(&stream, v).unwrap();
                prop_assert_eq!(&with.state, &without.state);
                prop_assert_eq!(with.version, Some(v));
                let (q, c, n) = expected(fills, v as usize + 1);
                prop_assert_eq!((with.state.quantity, with.state.cash, with.state.fills), (q, c, n));
            }
            let latest = repo.load(&stream).unwrap();
            prop_assert_eq!(&latest.state, &loaded[i].state);
            if fills.len() as u64 > every {
                prop_assert!(latest.from_snapshot.is_some(), "a snapshot was used");
                prop_assert!(latest.events_applied < every, "{} events folded", latest.events_applied);
            }
        }
    }
}

#[test]
fn unusable_snapshots_are_passed_over_and_a_conflict_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let repo = Repository::<Position>::new(&log, SnapshotPolicy::OnDemand);
    let mut a = repo.load("t").unwrap();
    assert_eq!(a.version, None);
    repo.save("t", &mut a, &[fill(10, 100), fill(5, 101)])
        .unwrap();
    repo.snapshot("t", &mut a).unwrap();
    repo.save("t", &mut a, &[fill(-3, 102)]).unwrap();
    let good = repo.load("t").unwrap();
    assert_eq!(good.from_snapshot, Some(1));
    assert_eq!(good.events_applied, 1);
    // Newer snapshots that must not be used: an older snapshot version, and bytes that do
    // not decode. The load passes over both to the good one.
    let snaps = snapshot_stream("t").unwrap();
    for payload in [
        encode_snapshot_payload(2, 1, b"[999,0,0,[]]"),
        encode_snapshot_payload(2, 2, b"not json"),
        b"short".to_vec(),
    ] {
        log.append(
            &snaps,
            ExpectedVersion::Any,
            &[EventData::new(SNAPSHOT_EVENT_TYPE, payload)],
        )
        .unwrap();
    }
    let after = repo.load("t").unwrap();
    assert_eq!(after.state, good.state);
    assert_eq!(after.from_snapshot, Some(1));
    assert_eq!(after.state.quantity, 12);
    // A stale writer gets WrongExpectedVersion, writes nothing, and succeeds after
    // loading again.
    let mut stale = repo.load_at("t", 1).unwrap();
    let e = repo.save("t", &mut stale, &[fill(1, 1)]).unwrap_err();
    assert!(
        matches!(
            e,
            AggregateError::Log(Error::WrongExpectedVersion {
                actual: Some(2),
                ..
            })
        ),
        "{e}"
    );
    assert_eq!(stale.version, Some(1), "unchanged after a conflict");
    let mut fresh = repo.load("t").unwrap();
    repo.save("t", &mut fresh, &[fill(1, 1)]).unwrap();
    assert_eq!(repo.load("t").unwrap().state.quantity, 13);
    // An event the aggregate refuses stops the load with its version.
    log.append(
        "t",
        ExpectedVersion::Any,
        &[EventData::new("Poison", vec![])],
    )
    .unwrap();
    match repo.load("t") {
        Err(AggregateError::Apply {
            version, reason, ..
        }) => {
            assert_eq!(version, 4);
            assert_eq!(reason, "poison event");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrections_reference_the_original_and_history_keeps_both() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let repo = Repository::<Position>::new(&log, SnapshotPolicy::OnDemand);
    let mut a = repo.load("trade-7").unwrap();
    let booked = fill(100, 50)
        .correlation_id("desk-9")
        .aggregate_type("Trade");
    repo.save("trade-7", &mut a, &[booked]).unwrap();
    let original = log
        .read_stream("trade-7", 0, 1, Direction::Forward)
        .unwrap()
        .remove(0);
    // The booking error is reversed and rebooked, never edited.
    let fix = [
        correction_of(&original, "FillCorrected", r#"{"qty":-100,"px":50}"#),
        correction_of(&original, "FillCorrected", r#"{"qty":10,"px":50}"#),
    ];
    repo.save("trade-7", &mut a, &fix).unwrap();
    let history = log
        .read_stream("trade-7", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(
        history[0].payload(),
        br#"{"qty":100,"px":50}"#,
        "the original is unchanged"
    );
    for c in &history[1..] {
        assert_eq!(c.causation_id(), original.event_id.to_string());
        assert_eq!(c.correlation_id(), "desk-9");
        assert_eq!(c.aggregate_type(), "Trade");
    }
    assert_eq!(repo.load("trade-7").unwrap().state.quantity, 10);

    // A whole booking reversed: the reversal quotes what it undoes.
    let mut b = repo.load("trade-8").unwrap();
    repo.save("trade-8", &mut b, &[fill(30, 7).correlation_id("desk-9")])
        .unwrap();
    let wrong = log
        .read_stream("trade-8", 0, 1, Direction::Forward)
        .unwrap()
        .remove(0);
    repo.save(
        "trade-8",
        &mut b,
        &[tally_engine::aggregate::reversal_of(&wrong, "FillReversed")],
    )
    .unwrap();
    let history = log
        .read_stream("trade-8", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(
        history.len(),
        2,
        "the original stays; the reversal follows it"
    );
    let r = &history[1];
    assert_eq!(r.causation_id(), wrong.event_id.to_string());
    assert_eq!(r.correlation_id(), "desk-9");
    let quoted: serde_json::Value = serde_json::from_slice(r.payload()).unwrap();
    assert_eq!(quoted["reverses"], wrong.event_id.to_string());
    assert_eq!(quoted["type"], "Fill");
    assert_eq!(quoted["version"], 0);
    assert_eq!(quoted["payload"], serde_json::json!({"qty": 30, "px": 7}));
    let state = repo.load("trade-8").unwrap().state;
    assert_eq!((state.quantity, state.cash), (0, 0));
    // A binary original is quoted as base64.
    let bin = log
        .append(
            "bin-1",
            tally_engine::ExpectedVersion::Any,
            &[EventData::new("Blob", vec![0xff, 0, 1])],
        )
        .unwrap();
    let blob = log
        .read_stream("bin-1", 0, 1, Direction::Forward)
        .unwrap()
        .remove(0);
    assert_eq!(bin.first_version, 0);
    let rev = tally_engine::aggregate::reversal_of(&blob, "BlobReversed");
    let quoted: serde_json::Value = serde_json::from_slice(&rev.payload).unwrap();
    assert_eq!(quoted["payload_base64"], "/wAB");
    // A JSON original is quoted byte for byte: no number rounded, no key reordered.
    let exact = r#"{"z":1,"a":123456789012345678901234567890.125}"#;
    log.append(
        "exact-1",
        tally_engine::ExpectedVersion::Any,
        &[EventData::json("Big", exact)],
    )
    .unwrap();
    let big = log
        .read_stream("exact-1", 0, 1, Direction::Forward)
        .unwrap()
        .remove(0);
    let rev = tally_engine::aggregate::reversal_of(&big, "BigReversed");
    let text = String::from_utf8(rev.payload.clone()).unwrap();
    assert!(text.ends_with(&format!(",\"payload\":{exact}}}")), "{text}");
    serde_json::from_str::<serde_json::Value>(&text).unwrap();
}

#[test]
fn streams_too_long_for_a_snapshot_stream_are_refused() {
    let long = "x".repeat(250);
    assert!(matches!(
        snapshot_stream(&long),
        Err(AggregateError::StreamTooLong { max: 246, .. })
    ));
    assert!(snapshot_stream(&"x".repeat(246)).is_ok());
}

#[test]
fn time_travel_by_record_time_and_by_event_time_with_a_late_event() {
    use tally_engine::Timestamp;
    use tally_engine::aggregate::AsOf;
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let repo = Repository::<Position>::new(&log, SnapshotPolicy::EveryEvents(1));
    let secs = |s: u64| Timestamp(1_700_000_000_000_000_000 + s * 1_000_000_000);
    let recorded = |v: u64| log.read_stream("t", v, 1, Direction::Forward).unwrap()[0].record_time;
    let mut a = repo.load("t").unwrap();
    repo.save("t", &mut a, &[fill(10, 100).event_time(secs(1000))])
        .unwrap();
    repo.save("t", &mut a, &[fill(5, 100).event_time(secs(3000))])
        .unwrap();
    let r1 = recorded(1);
    std::thread::sleep(Duration::from_millis(2));
    // Arrives late: it happened between the two fills.
    let late = EventData::json("FillCorrected", r#"{"qty":-3,"px":100}"#).event_time(secs(2000));
    repo.save("t", &mut a, &[late]).unwrap();
    let r2 = recorded(2);
    assert!(r1 < r2);
    let view = |as_of: AsOf| {
        let l = repo.load_as_of("t", as_of).unwrap();
        (l.state.quantity, l.state.trail.join(","))
    };
    // Now, in log order.
    assert_eq!(
        view(AsOf::default()),
        (12, "Fill,Fill,FillCorrected".into())
    );
    // What we knew before the late event was recorded.
    assert_eq!(view(AsOf::known_at(r1)), (15, "Fill,Fill".into()));
    // What was true at 2500 s, as known now: the late correction counts, the 3000 s fill
    // does not.
    assert_eq!(
        view(AsOf::true_at(secs(2500))),
        (7, "Fill,FillCorrected".into())
    );
    // What was true at 3000 s: every event, in the order they happened.
    assert_eq!(
        view(AsOf::true_at(secs(3000))),
        (12, "Fill,FillCorrected,Fill".into())
    );
    // What we believed, before the late event arrived, was true at 3000 s.
    let bitemporal = AsOf {
        record_time: Some(r1),
        event_time: Some(secs(3000)),
    };
    assert_eq!(view(bitemporal), (15, "Fill,Fill".into()));
    // Before anything happened.
    assert_eq!(view(AsOf::true_at(secs(999))), (0, String::new()));
    // The current state through snapshots agrees with the log-order view.
    assert_eq!(repo.load("t").unwrap().state.quantity, 12);
}

#[test]
fn a_retried_save_is_not_folded_twice_and_time_travel_states_are_not_saved() {
    use tally_engine::aggregate::AsOf;
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let repo = Repository::<Position>::new(&log, SnapshotPolicy::EveryEvents(1));
    let mut a = repo.load("r").unwrap();
    let first = fill(10, 1).with_id(tally_engine::EventId([9; 16]));
    repo.save("r", &mut a, std::slice::from_ref(&first))
        .unwrap();
    repo.save("r", &mut a, &[fill(5, 1)]).unwrap();
    // The same command delivered again (same event id) from a fresh load: the log returns
    // the first result, and the state is the stream's, not the event folded twice.
    let mut b = repo.load("r").unwrap();
    let r = repo.save("r", &mut b, &[first]).unwrap();
    assert_eq!(r.first_version, 0);
    assert_eq!(b.version, Some(1));
    assert_eq!(b.state.quantity, 15);
    assert_eq!(repo.load("r").unwrap().state.quantity, 15);
    assert_eq!(
        repo.load_without_snapshots("r", u64::MAX)
            .unwrap()
            .state
            .quantity,
        15
    );
    // A state seen as of a time cannot be saved or snapshotted.
    let mut past = repo
        .load_as_of("r", AsOf::true_at(tally_engine::Timestamp(u64::MAX)))
        .unwrap();
    assert!(matches!(
        repo.save("r", &mut past, &[fill(1, 1)]),
        Err(AggregateError::TimeTravel { .. })
    ));
    assert!(matches!(
        repo.snapshot("r", &mut past),
        Err(AggregateError::TimeTravel { .. })
    ));
}

/// An aggregate whose state is every payload it saw, back to back: large on purpose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Blob(Vec<u8>);

impl Aggregate for Blob {
    const SNAPSHOT_VERSION: u32 = 1;

    fn initial() -> Blob {
        Blob::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        self.0.extend_from_slice(e.payload());
        Ok(())
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        self.0.clone()
    }

    fn decode_snapshot(bytes: &[u8]) -> Option<Blob> {
        Some(Blob(bytes.to_vec()))
    }
}

#[test]
fn a_snapshot_past_the_payload_limit_is_stored_in_parts_and_a_forged_one_is_passed_over() {
    use tally_engine::state_store::{MANIFEST_EVENT_TYPE, Manifest};
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            segment_bytes: 16 << 20,
            ..Options::default()
        },
    )
    .unwrap();
    let repo = Repository::<Blob>::new(&log, SnapshotPolicy::OnDemand);
    let mut a = repo.load("blob").unwrap();
    let events: Vec<EventData> = (0..6u8)
        .map(|i| EventData::new("Grow", vec![i; 512 * 1024]))
        .collect();
    repo.save("blob", &mut a, &events).unwrap();
    // A state of 3 MiB: three times what one event can hold.
    repo.snapshot("blob", &mut a).unwrap();
    let loaded = repo.load("blob").unwrap();
    assert_eq!(loaded.from_snapshot, Some(5));
    assert_eq!(loaded.events_applied, 0);
    assert_eq!(loaded.state.0.len(), 3 << 20);
    assert_eq!(loaded.state, a.state);
    let snaps = snapshot_stream("blob").unwrap();
    let newest = log
        .read_stream(&snaps, u64::MAX, 1, Direction::Backward)
        .unwrap()
        .remove(0);
    assert_eq!(newest.event_type(), MANIFEST_EVENT_TYPE);
    let m = Manifest::decode(newest.payload()).unwrap();
    assert_eq!((m.at, m.parts.len()), (5, 3));
    // A newer snapshot whose manifest names a part with another hash: passed over.
    let mut forged = m.clone();
    forged.parts[2].hash[0] ^= 1;
    log.append(
        &snaps,
        ExpectedVersion::Any,
        &[EventData::new(MANIFEST_EVENT_TYPE, forged.encode())],
    )
    .unwrap();
    let again = repo.load("blob").unwrap();
    assert_eq!(
        (again.from_snapshot, again.state),
        (Some(5), a.state.clone())
    );
    // A snapshot of the first layout (one event, so a small state) still loads.
    let mut small = repo.load("small").unwrap();
    repo.save(
        "small",
        &mut small,
        &[EventData::new("Grow", b"xy".to_vec())],
    )
    .unwrap();
    log.append(
        &snapshot_stream("small").unwrap(),
        ExpectedVersion::Any,
        &[EventData::new(
            SNAPSHOT_EVENT_TYPE,
            encode_snapshot_payload(0, 1, b"first layout"),
        )],
    )
    .unwrap();
    let v1 = repo.load("small").unwrap();
    assert_eq!(
        (v1.from_snapshot, v1.state),
        (Some(0), Blob(b"first layout".to_vec()))
    );
}
