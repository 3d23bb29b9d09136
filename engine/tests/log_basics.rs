//! The engine API end to end on a real directory: appends with every expected-version kind,
//! multi-stream batches, idempotent retries, reads in both directions across segment rolls,
//! stream info, reopen after close and after a simulated crash, the directory lock, the
//! tail, and poisoning after a failed sync.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use tally_engine::{
    AppendRequest, Direction, Durability, Error, EventData, EventId, ExpectedVersion, Log, Options,
    Position, Verify,
};

fn opts() -> Options {
    Options {
        segment_bytes: 256 * 1024,
        ..Options::default()
    }
}

fn ev(t: &str, n: u64) -> EventData {
    EventData::json(
        t,
        format!(
            "{{\"n\":{n},\"pad\":\"{}\"}}",
            "x".repeat((n % 50) as usize)
        ),
    )
    .aggregate_type("Trade")
    .actor("alice")
    .correlation_id(format!("corr-{}", n % 7))
}

fn id(n: u64) -> EventId {
    let mut b = [0u8; 16];
    b[8..].copy_from_slice(&n.to_le_bytes());
    b[0] = 0x42;
    EventId(b)
}

#[test]
fn append_and_read_round_trip_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let e = EventData::json("TradeNew", r#"{"qty":"100"}"#)
        .with_id(id(1))
        .aggregate_type("Trade")
        .schema_version(3)
        .correlation_id("corr-9")
        .causation_id("cause-1")
        .actor("alice@desk")
        .event_time(tally_engine::Timestamp(1_000));
    let r = log
        .append(
            "trade-42",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&e),
        )
        .unwrap();
    assert_eq!(
        (r.first_position, r.first_version, r.last_version),
        (Position(0), 0, 0)
    );
    let got = log
        .read_stream("trade-42", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(got.len(), 1);
    let g = &got[0];
    assert_eq!(g.event_id, id(1));
    assert_eq!(g.event_type(), "TradeNew");
    assert_eq!(g.schema_version, 3);
    assert_eq!(g.aggregate_type(), "Trade");
    assert_eq!(g.payload(), br#"{"qty":"100"}"#);
    assert_eq!(g.correlation_id(), "corr-9");
    assert_eq!(g.causation_id(), "cause-1");
    assert_eq!(g.actor(), "alice@desk");
    assert_eq!(g.event_time, tally_engine::Timestamp(1_000));
    assert!(
        g.record_time.0 > 1_000,
        "record time is assigned by the engine"
    );
    assert_eq!(g.stream(), "trade-42");
    let info = log.stream_info("trade-42").unwrap().unwrap();
    assert_eq!(
        (info.last_version, info.first_position, info.last_position),
        (0, Position(0), Position(0))
    );
    assert_eq!(info.created, g.record_time);
    assert_eq!(log.stream_info("trade-43").unwrap(), None);
    assert!(
        log.read_stream("trade-43", 0, 10, Direction::Forward)
            .unwrap()
            .is_empty()
    );
}

#[test]
fn expected_versions_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let wev = |r: Result<_, Error>| match r {
        Err(Error::WrongExpectedVersion { actual, .. }) => actual,
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    };
    assert_eq!(
        wev(log.append("s", ExpectedVersion::StreamExists, &[ev("A", 0)])),
        None
    );
    assert_eq!(
        wev(log.append("s", ExpectedVersion::Exact(0), &[ev("A", 0)])),
        None
    );
    log.append("s", ExpectedVersion::NoStream, &[ev("A", 0), ev("A", 1)])
        .unwrap();
    assert_eq!(
        wev(log.append("s", ExpectedVersion::NoStream, &[ev("A", 2)])),
        Some(1)
    );
    assert_eq!(
        wev(log.append("s", ExpectedVersion::Exact(0), &[ev("A", 2)])),
        Some(1)
    );
    let r = log
        .append("s", ExpectedVersion::Exact(1), &[ev("A", 2)])
        .unwrap();
    assert_eq!((r.first_version, r.last_version), (2, 2));
    log.append("s", ExpectedVersion::StreamExists, &[ev("A", 3)])
        .unwrap();
    let r = log
        .append("s", ExpectedVersion::Any, &[ev("A", 4)])
        .unwrap();
    assert_eq!(r.last_version, 4);
    let all = log.read_stream("s", 0, 100, Direction::Forward).unwrap();
    assert_eq!(
        all.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
}

#[test]
fn multi_stream_append_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    log.append("trade-1", ExpectedVersion::NoStream, &[ev("New", 0)])
        .unwrap();
    let novate_old = [ev("Novated", 1)];
    let novate_new = [ev("New", 2)];
    // The second expectation fails: nothing is written to either stream.
    let err = log
        .append_multi(&[
            AppendRequest {
                stream: "trade-1",
                expected: ExpectedVersion::Exact(0),
                events: &novate_old,
            },
            AppendRequest {
                stream: "trade-2",
                expected: ExpectedVersion::Exact(5),
                events: &novate_new,
            },
        ])
        .unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { .. }), "{err:?}");
    assert_eq!(log.stream_info("trade-1").unwrap().unwrap().last_version, 0);
    assert_eq!(log.stream_info("trade-2").unwrap(), None);
    let rs = log
        .append_multi(&[
            AppendRequest {
                stream: "trade-1",
                expected: ExpectedVersion::Exact(0),
                events: &novate_old,
            },
            AppendRequest {
                stream: "trade-2",
                expected: ExpectedVersion::NoStream,
                events: &novate_new,
            },
        ])
        .unwrap();
    assert_eq!(rs.len(), 2);
    assert_eq!(
        (rs[0].first_position, rs[1].first_position),
        (Position(1), Position(2))
    );
    assert_eq!((rs[0].last_version, rs[1].last_version), (1, 0));
    let dup = log.append_multi(&[
        AppendRequest {
            stream: "a",
            expected: ExpectedVersion::Any,
            events: &novate_old,
        },
        AppendRequest {
            stream: "a",
            expected: ExpectedVersion::Any,
            events: &novate_new,
        },
    ]);
    assert!(matches!(dup, Err(Error::InvalidAppend { .. })));
}

#[test]
fn retries_are_idempotent_and_mixed_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let batch = [ev("A", 0).with_id(id(1)), ev("A", 1).with_id(id(2))];
    let first = log.append("s", ExpectedVersion::NoStream, &batch).unwrap();
    log.append("other", ExpectedVersion::Any, &[ev("B", 0)])
        .unwrap();
    // The same batch again, with the same or another expectation: the original result.
    assert_eq!(
        log.append("s", ExpectedVersion::NoStream, &batch).unwrap(),
        first
    );
    assert_eq!(
        log.append("s", ExpectedVersion::Any, &batch).unwrap(),
        first
    );
    assert_eq!(
        log.read_stream("s", 0, 10, Direction::Forward)
            .unwrap()
            .len(),
        2
    );
    // Half old, half new.
    let mixed = [ev("A", 1).with_id(id(2)), ev("A", 2).with_id(id(3))];
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &mixed),
        Err(Error::PartialDuplicate { .. })
    ));
    // An id already used by another stream.
    assert!(matches!(
        log.append("t", ExpectedVersion::Any, &[ev("A", 0).with_id(id(1))]),
        Err(Error::DuplicateEventId { .. })
    ));
    // Twice in one batch.
    let twice = [ev("A", 0).with_id(id(9)), ev("A", 1).with_id(id(9))];
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &twice),
        Err(Error::InvalidAppend { .. })
    ));
    // Still a retry after reopening.
    log.close().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(
        log.append("s", ExpectedVersion::NoStream, &batch).unwrap(),
        first
    );
    assert_eq!(
        log.read_stream("s", 0, 10, Direction::Forward)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn retries_older_than_the_window_are_recognised_by_expected_version() {
    let dir = tempfile::tempdir().unwrap();
    let o = Options {
        idempotency_window: 4,
        ..opts()
    };
    let log = Log::open(dir.path(), o).unwrap();
    let batch = [ev("A", 0).with_id(id(100))];
    let first = log.append("s", ExpectedVersion::NoStream, &batch).unwrap();
    for i in 0..10 {
        log.append("filler", ExpectedVersion::Any, &[ev("F", i)])
            .unwrap();
    }
    assert_eq!(
        log.append("s", ExpectedVersion::NoStream, &batch).unwrap(),
        first
    );
    assert_eq!(log.stream_info("s").unwrap().unwrap().last_version, 0);
}

#[test]
fn reads_span_segment_rolls_in_both_directions_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let n = 5000u64;
    for i in 0..n {
        let stream = format!("trade-{}", i % 13);
        log.append(&stream, ExpectedVersion::Any, &[ev("E", i).with_id(id(i))])
            .unwrap();
    }
    log.wait_sealed().unwrap();
    let segs = log.segments();
    assert!(
        segs.len() >= 4,
        "expected several segments, got {}",
        segs.len()
    );
    assert!(segs[..segs.len() - 1].iter().all(|s| s.sealed));
    let check = |log: &Log| {
        let all = log
            .read_all(Position(0), usize::MAX, Direction::Forward)
            .unwrap();
        assert_eq!(all.len() as u64, n);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, e)| e.position.0 == i as u64 && e.event_id == id(i as u64))
        );
        let back = log
            .read_all(Position(u64::MAX), 100, Direction::Backward)
            .unwrap();
        assert_eq!(
            back.iter().map(|e| e.position.0).collect::<Vec<_>>(),
            (n - 100..n).rev().collect::<Vec<_>>()
        );
        let mid = log
            .read_all(Position(1234), 10, Direction::Backward)
            .unwrap();
        assert_eq!(mid.first().unwrap().position, Position(1234));
        assert_eq!(mid.last().unwrap().position, Position(1225));
        let s = log
            .read_stream("trade-5", 0, usize::MAX, Direction::Forward)
            .unwrap();
        let expect: Vec<u64> = (0..n).filter(|i| i % 13 == 5).collect();
        assert_eq!(s.iter().map(|e| e.position.0).collect::<Vec<_>>(), expect);
        assert!(s.iter().enumerate().all(|(v, e)| e.version == v as u64));
        let latest = log
            .read_stream("trade-5", u64::MAX, 7, Direction::Backward)
            .unwrap();
        assert_eq!(
            latest.iter().map(|e| e.position.0).collect::<Vec<_>>(),
            expect.iter().rev().take(7).copied().collect::<Vec<_>>()
        );
        let from_mid = log
            .read_stream("trade-5", 100, 3, Direction::Forward)
            .unwrap();
        assert_eq!(
            from_mid.iter().map(|e| e.version).collect::<Vec<_>>(),
            vec![100, 101, 102]
        );
        let back_mid = log
            .read_stream("trade-5", 100, 3, Direction::Backward)
            .unwrap();
        assert_eq!(
            back_mid.iter().map(|e| e.version).collect::<Vec<_>>(),
            vec![100, 99, 98]
        );
        let info = log.stream_info("trade-12").unwrap().unwrap();
        assert_eq!(info.first_position, Position(12));
        assert_eq!(
            info.last_version,
            (0..n).filter(|i| i % 13 == 12).count() as u64 - 1
        );
    };
    check(&log);
    let report = log.verify().unwrap();
    assert_eq!(report.records, n);
    let mut positions = Vec::new();
    assert_eq!(
        log.scan(Position(10), Verify::Chain, |r| positions
            .push(r.position.0))
            .unwrap(),
        n - 10
    );
    assert_eq!(positions, (10..n).collect::<Vec<_>>());
    assert_eq!(log.scan(Position(0), Verify::Checksums, |_| {}).unwrap(), n);
    assert_eq!(log.check_chain(2).unwrap(), n);
    log.close().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert!(log.recovery_report().clean, "{:?}", log.recovery_report());
    assert_eq!(log.recovery_report().records_scanned, 0);
    check(&log);
    let expect_last = (0..n).filter(|i| i % 13 == 5).count() as u64 - 1;
    log.append(
        "trade-5",
        ExpectedVersion::Exact(expect_last),
        &[ev("E", n)],
    )
    .unwrap();
    log.crash();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert!(!log.recovery_report().clean);
    assert_eq!(log.next_position(), Position(n + 1));
    assert_eq!(
        log.stream_info("trade-5").unwrap().unwrap().last_version,
        expect_last + 1
    );
    log.verify().unwrap();
}

/// A lock being released (by a child process that inherited the lock's open file
/// description between its fork and exec, as a test harness or tallyd spawning a process
/// does) is waited for briefly: close-then-open in one process is reliable.
#[test]
fn an_open_waits_briefly_for_a_lock_being_released() {
    let dir = tempfile::tempdir().unwrap();
    Log::open(dir.path(), opts()).unwrap().close().unwrap();
    let held = std::fs::File::open(dir.path().join("tally.lock")).unwrap();
    held.try_lock().unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(150));
        drop(held);
    });
    let log = Log::open(dir.path(), opts()).expect("the lock was released within the wait");
    release.join().unwrap();
    log.close().unwrap();
}

#[test]
fn a_second_opener_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert!(matches!(
        Log::open(dir.path(), opts()),
        Err(Error::Locked { .. })
    ));
    log.close().unwrap();
    Log::open(dir.path(), opts()).unwrap();
}

#[test]
fn tail_catches_up_and_then_follows_live_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(Log::open(dir.path(), opts()).unwrap());
    for i in 0..500 {
        log.append("s", ExpectedVersion::Any, &[ev("E", i)])
            .unwrap();
    }
    let mut tail = log.tail(Position(0));
    let writer = {
        let log = Arc::clone(&log);
        std::thread::spawn(move || {
            for i in 500..1500 {
                log.append("s", ExpectedVersion::Any, &[ev("E", i)])
                    .unwrap();
            }
        })
    };
    for expect in 0..1500u64 {
        let e = tail
            .next_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("record within 10 s");
        assert_eq!(e.position, Position(expect));
    }
    writer.join().unwrap();
    assert_eq!(tail.next_timeout(Duration::from_millis(20)).unwrap(), None);
}

#[test]
fn a_failed_sync_poisons_writes_but_not_reads() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    log.append("s", ExpectedVersion::Any, &[ev("E", 0)])
        .unwrap();
    log.inject_sync_failure();
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &[ev("E", 1)]),
        Err(Error::Poisoned { .. })
    ));
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &[ev("E", 2)]),
        Err(Error::Poisoned { .. })
    ));
    let read = log.read_stream("s", 0, 10, Direction::Forward).unwrap();
    assert_eq!(read.len(), 1, "the unacknowledged event is not visible");
}

#[test]
fn none_and_batched_durability_acknowledge_without_waiting() {
    for durability in [
        Durability::None,
        Durability::Batched {
            max_delay: Duration::from_millis(5),
        },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(
            dir.path(),
            Options {
                durability,
                ..opts()
            },
        )
        .unwrap();
        for i in 0..2000 {
            log.append("s", ExpectedVersion::Any, &[ev("E", i)])
                .unwrap();
        }
        assert_eq!(
            log.read_stream("s", 0, usize::MAX, Direction::Forward)
                .unwrap()
                .len(),
            2000
        );
        log.crash();
        let log = Log::open(
            dir.path(),
            Options {
                durability,
                ..opts()
            },
        )
        .unwrap();
        assert_eq!(
            log.next_position(),
            Position(2000),
            "{durability:?}: a process crash loses nothing acknowledged"
        );
    }
}

#[test]
fn async_appends_keep_many_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let handles: Vec<_> = (0..1000)
        .map(|i| {
            log.append_async("s", ExpectedVersion::Any, &[ev("E", i)])
                .unwrap()
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.wait().unwrap();
        assert_eq!(r[0].first_position, Position(i as u64));
    }
}

#[test]
fn invalid_events_and_oversized_batches_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert!(matches!(
        log.append("", ExpectedVersion::Any, &[ev("E", 0)]),
        Err(Error::InvalidEvent { .. })
    ));
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &[]),
        Err(Error::InvalidAppend { .. })
    ));
    let long_type = EventData::new("x".repeat(200), vec![]);
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &[long_type]),
        Err(Error::InvalidEvent { index: 0, .. })
    ));
    let big: Vec<EventData> = (0..300)
        .map(|_| EventData::new("E", vec![0u8; 1000]))
        .collect();
    assert!(matches!(
        log.append("s", ExpectedVersion::Any, &big),
        Err(Error::BatchTooLarge { .. })
    ));
    assert_eq!(log.next_position(), Position(0));
}

#[test]
fn generated_ids_are_v7_and_increase_within_a_thread() {
    let ids: Vec<EventId> = (0..10_000).map(|_| tally_engine::new_event_id()).collect();
    for w in ids.windows(2) {
        assert!(w[0].as_u128() < w[1].as_u128(), "{} then {}", w[0], w[1]);
    }
    for id in &ids {
        assert_eq!(id.0[6] >> 4, 7, "version 7");
        assert_eq!(id.0[8] >> 6, 0b10, "RFC variant");
    }
    // The first 48 bits, most significant byte first.
    let ms = ids[0].0[..6]
        .iter()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let now_ms = tally_engine::now().0 / 1_000_000;
    assert!(
        now_ms.abs_diff(ms) < 60_000,
        "timestamp is Unix milliseconds"
    );
    let other: Vec<EventId> =
        std::thread::spawn(|| (0..1000).map(|_| tally_engine::new_event_id()).collect())
            .join()
            .unwrap();
    let mine: std::collections::HashSet<_> = ids.iter().collect();
    assert!(other.iter().all(|id| !mine.contains(id)));
}

#[test]
fn parallel_chain_check_finds_a_flip_in_any_range() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            segment_bytes: 1 << 20,
            ..opts()
        },
    )
    .unwrap();
    for i in 0..12_000u64 {
        log.append("s", ExpectedVersion::Any, &[ev("E", i)])
            .unwrap();
    }
    log.wait_sealed().unwrap();
    assert_eq!(log.check_chain(2).unwrap(), 12_000);
    let seg = log.segments()[0].clone();
    assert!(seg.sealed && seg.record_count > 1000);
    // Flip one payload byte of records spread over the whole segment, one at a time.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .unwrap();
    for frac in [1u64, 3, 5, 7, 9] {
        let at = 4096 + (seg.data_end - 4096) * frac / 10;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x04], at).unwrap();
        assert!(
            matches!(log.check_chain(2), Err(Error::Corrupt { .. })),
            "flip at {frac}/10 missed"
        );
        assert!(log.scan(Position(0), Verify::Chain, |_| {}).is_err());
        f.write_all_at(&b, at).unwrap();
        assert_eq!(log.check_chain(2).unwrap(), 12_000);
    }
}

#[test]
fn a_tail_ends_when_the_log_closes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    log.append("s", ExpectedVersion::Any, &[ev("E", 0)])
        .unwrap();
    let mut tail = log.tail(Position(0));
    assert!(tail.next().is_some());
    let closer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        log.close().unwrap();
    });
    assert!(tail.next().is_none(), "a closed log ends the tail");
    closer.join().unwrap();
}

#[test]
fn a_retry_straddling_the_window_is_still_recognised() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            idempotency_window: 4,
            ..opts()
        },
    )
    .unwrap();
    let batch = [
        ev("A", 0).with_id(id(500)),
        ev("A", 1).with_id(id(501)),
        ev("A", 2).with_id(id(502)),
    ];
    let first = log.append("s", ExpectedVersion::NoStream, &batch).unwrap();
    // Two more events push the first two ids of the batch out of the window.
    log.append("f", ExpectedVersion::Any, &[ev("F", 0), ev("F", 1)])
        .unwrap();
    assert_eq!(
        log.append("s", ExpectedVersion::NoStream, &batch).unwrap(),
        first
    );
    assert_eq!(log.stream_info("s").unwrap().unwrap().last_version, 2);
}

/// A data directory restored from a backup as sparse files (`cp --sparse=always`, most
/// backup tools) gets its active segment's blocks allocated at open, so that a store
/// through the map never meets a hole on a full disk (SIGBUS).
#[test]
fn an_open_allocates_a_sparse_restored_active_segment() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("original");
    let log = Log::open(&original, opts()).unwrap();
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[EventData::json("TradeNew", "{}")],
    )
    .unwrap();
    log.close().unwrap();
    let restored = dir.path().join("restored");
    let status = std::process::Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(&original)
        .arg(&restored)
        .status()
        .unwrap();
    assert!(status.success());
    let seg = restored.join("00000000000000000000.seg");
    let allocated = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.blocks() * 512, m.len())
    };
    let (before, len) = allocated(&seg);
    assert!(
        before < len,
        "the copy is sparse: {before} of {len} bytes allocated"
    );
    let log = Log::open(&restored, opts()).unwrap();
    let (after, len) = allocated(&seg);
    assert!(after >= len, "{after} of {len} bytes allocated after open");
    log.close().unwrap();
}

#[test]
fn backup_copies_exactly_the_checkpointed_log_and_refuses_what_it_cannot_copy() {
    let dir = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    // No checkpoint yet: nothing to copy up to.
    let err = log
        .backup_to(
            &out.path().join("early"),
            &tally_engine::BackupOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("no checkpoint"), "{err}");
    assert!(!out.path().join("early").exists());
    for n in 0..3_000 {
        let s = format!("trade-{}", n % 40);
        log.append(&s, ExpectedVersion::Any, &[ev("TradeAmended", n)])
            .unwrap();
    }
    let cp = log.checkpoint().unwrap();
    // Records after the checkpoint are not in the copy.
    log.append("trade-late", ExpectedVersion::Any, &[ev("TradeNew", 1)])
        .unwrap();
    let copy = out.path().join("copy");
    let done = log
        .backup_to(
            &copy,
            &tally_engine::BackupOptions {
                without_key: true,
                ..tally_engine::BackupOptions::default()
            },
        )
        .unwrap();
    assert_eq!(done.records, cp.statement.tree_size);
    assert_eq!(done.checkpoint_id, cp.statement.id);
    assert!(done.segment_files > 1, "the log rolled: {done:?}");
    assert!(!copy.join(tally_engine::KEY_FILE).exists());
    let err = log
        .backup_to(&copy, &tally_engine::BackupOptions::default())
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let back = Log::open(
        &copy,
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            create: false,
            ..opts()
        },
    )
    .unwrap();
    let report = back.verify().unwrap();
    assert_eq!(back.next_position().0, cp.statement.tree_size);
    assert_eq!(report.checkpoints, done.checkpoints);
    let a = log
        .read_all(Position(0), 100_000, Direction::Forward)
        .unwrap();
    let b = back
        .read_all(Position(0), 100_000, Direction::Forward)
        .unwrap();
    assert_eq!(b.len() as u64, cp.statement.tree_size);
    assert_eq!(a[..b.len()], b[..]);
}
