//! The attribute indexes end to end: `Log::find` by event type, correlation id, causation id
//! and actor, in record-time and event-time windows, paged by position, compared with a full
//! scan of the log; sidecars written for sealed segments, rebuilt when missing or damaged,
//! kept in memory by a read-only open; a tampered sidecar with a valid checksum is named by
//! verify and rebuilt by the lookup it misleads; indexes survive a crash.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use tally_engine::{
    Direction, EventData, EventView, ExpectedVersion, Field, Log, Options, Position, Query,
    RecordedEvent, RecoveryMode, Timestamp, VerifyOptions,
};

fn opts() -> Options {
    Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    }
}

/// A small deterministic generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const TYPES: [&str; 5] = ["New", "Amend", "Cancel", "Settle", "Exercise"];
const ACTORS: [&str; 4] = ["", "alice", "bob", "desk-7"];

/// Appends `batches` batches of 1 to 4 events, with varied attributes and event times that
/// are sometimes far in the past (late arrivals). Pauses now and then so that record times
/// spread.
fn fill(log: &Log, rng: &mut Rng, batches: u64) {
    for b in 0..batches {
        let n = 1 + rng.below(4);
        let events: Vec<EventData> = (0..n)
            .map(|i| {
                let ty = TYPES[rng.below(TYPES.len() as u64) as usize];
                let mut e = EventData::json(ty, format!("{{\"b\":{b},\"i\":{i}}}"))
                    .actor(ACTORS[rng.below(ACTORS.len() as u64) as usize]);
                if rng.below(3) > 0 {
                    e = e.correlation_id(format!("corr-{}", rng.below(40)));
                }
                if rng.below(2) == 0 {
                    e = e.causation_id(format!("cause-{}", rng.below(60)));
                }
                if rng.below(5) == 0 {
                    // Late: a business time up to an hour before now.
                    let back = rng.below(3_600_000_000_000);
                    e = e.event_time(Timestamp(tally_engine::now().0 - back));
                }
                e
            })
            .collect();
        let stream = format!("trade-{}", rng.below(30));
        log.append(&stream, ExpectedVersion::Any, &events).unwrap();
        if b % 97 == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

fn everything(log: &Log) -> Vec<RecordedEvent> {
    log.read_all(Position(0), usize::MAX, Direction::Forward)
        .unwrap()
}

fn field_of(ev: &RecordedEvent, f: Field) -> String {
    match f {
        Field::EventType => ev.event_type().to_owned(),
        Field::Correlation => ev.correlation_id().to_owned(),
        Field::Causation => ev.causation_id().to_owned(),
        Field::Actor => ev.actor().to_owned(),
        Field::EventId => ev.event_id().to_string(),
    }
}

/// What a query should return, by brute force.
fn expected(all: &[RecordedEvent], q: &Query<'_>) -> Vec<Position> {
    all.iter()
        .filter(|e| q.positions.contains(&e.position))
        .filter(|e| {
            q.record_time
                .as_ref()
                .is_none_or(|r| r.contains(&e.record_time))
        })
        .filter(|e| {
            q.event_time
                .as_ref()
                .is_none_or(|r| r.contains(&e.event_time()))
        })
        .filter(|e| q.field.is_none_or(|(f, v)| field_of(e, f) == v))
        .take(q.limit)
        .map(|e| e.position)
        .collect()
}

fn found(log: &Log, q: &Query<'_>) -> Vec<Position> {
    let got = log.find(q).unwrap();
    got.iter().map(|e| e.position).collect()
}

/// Runs `count` random queries and compares each with a scan.
fn check_queries(log: &Log, rng: &mut Rng, count: usize) {
    let all = everything(log);
    assert!(!all.is_empty());
    let t0 = all[0].record_time.0;
    let t1 = all.last().unwrap().record_time.0 + 1;
    let span = (t1 - t0).max(1);
    let n = all.len() as u64;
    let values: Vec<(Field, String)> = TYPES
        .iter()
        .map(|t| (Field::EventType, (*t).to_owned()))
        .chain((0..45).map(|i| (Field::Correlation, format!("corr-{i}"))))
        .chain((0..62).map(|i| (Field::Causation, format!("cause-{i}"))))
        .chain(ACTORS[1..].iter().map(|a| (Field::Actor, (*a).to_owned())))
        .chain((0..30).map(|_| {
            let e = &all[rng.below(n) as usize];
            (Field::EventId, e.event_id().to_string())
        }))
        .chain([(Field::EventId, tally_engine::new_event_id().to_string())])
        .collect();
    let mut nonempty = 0;
    for _ in 0..count {
        let (f, v) = &values[rng.below(values.len() as u64) as usize];
        let mut q = Query::all();
        if rng.below(4) > 0 {
            q.field = Some((*f, v.as_str()));
        }
        if rng.below(3) == 0 {
            let a = t0 + rng.below(span);
            q = q.recorded(Timestamp(a)..Timestamp(a + rng.below(span)));
        }
        if rng.below(3) == 0 {
            let a = t0.saturating_sub(3_600_000_000_000) + rng.below(span + 3_600_000_000_000);
            q = q.happened(Timestamp(a)..Timestamp(a + rng.below(span)));
        }
        if rng.below(3) == 0 {
            let a = rng.below(n);
            q = q.positions(Position(a)..Position(a + rng.below(n)));
        }
        if rng.below(3) == 0 {
            q = q.limit(rng.below(20) as usize);
        }
        let want = expected(&all, &q);
        nonempty += usize::from(!want.is_empty());
        assert_eq!(found(log, &q), want, "query {q:?}");
    }
    assert!(
        nonempty > count / 3,
        "the queries must mostly find something"
    );
}

fn adx_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "adx"))
        .collect();
    v.sort();
    v
}

#[test]
fn lookups_agree_with_a_full_scan_across_segments_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, &mut rng, 1500);
    assert!(log.segments().len() > 4, "several segments");
    check_queries(&log, &mut rng, 300);
    fill(&log, &mut rng, 300);
    check_queries(&log, &mut rng, 100);
    log.wait_sealed().unwrap();
    // Every sealed segment gets its sidecar once a lookup (or the indexer) has caught up.
    log.find(&Query::field(Field::Actor, "nobody")).unwrap();
    let sealed = log.segments().iter().filter(|s| s.sealed).count();
    assert_eq!(adx_files(dir.path()).len(), sealed);
    log.close().unwrap();

    let log = Log::open(dir.path(), opts()).unwrap();
    check_queries(&log, &mut rng, 200);
    log.close().unwrap();

    // Without the background indexer, a lookup indexes what it has not seen.
    let log = Log::open(
        dir.path(),
        Options {
            index_attributes: false,
            ..opts()
        },
    )
    .unwrap();
    fill(&log, &mut rng, 200);
    check_queries(&log, &mut rng, 100);
    log.close().unwrap();
}

#[test]
fn pages_through_a_large_result_by_position() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    for i in 0..900u64 {
        let e =
            EventData::json(if i % 3 == 0 { "Wanted" } else { "Other" }, "{}").correlation_id("c");
        log.append(&format!("s-{}", i % 5), ExpectedVersion::Any, &[e])
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut from = Position(0);
    loop {
        let page = log
            .find(
                &Query::field(Field::EventType, "Wanted")
                    .positions(from..Position(u64::MAX))
                    .limit(64),
            )
            .unwrap();
        seen.extend(page.iter().map(|e| e.position.0));
        match page.last() {
            Some(last) if page.len() == 64 => from = last.position.next(),
            _ => break,
        }
    }
    assert_eq!(seen, (0..900).step_by(3).collect::<Vec<u64>>());
    assert!(log.find(&Query::all().limit(0)).unwrap().is_empty());
    // A byte budget stops the lookup once the events found hold that many bytes (at least
    // one event comes back).
    let q = Query::field(Field::EventType, "Wanted");
    let one = log.find(&q.clone().max_bytes(1)).unwrap();
    assert_eq!(one.len(), 1);
    let body = one[0].body().len();
    let five = log.find(&q.clone().max_bytes(5 * body)).unwrap();
    assert_eq!(
        five.iter().map(|e| e.position.0).collect::<Vec<_>>(),
        [0, 3, 6, 9, 12]
    );
    let err = log.find(&Query::field(Field::Actor, "")).unwrap_err();
    assert!(err.to_string().contains("empty actor"), "{err}");
    let err = log
        .find(&Query::field(Field::EventId, "not-a-uuid"))
        .unwrap_err();
    assert!(err.to_string().contains("not an event id"), "{err}");
}

#[test]
fn position_at_splits_the_log_by_record_time() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let mut rng = Rng(7);
    fill(&log, &mut rng, 800);
    let all = everything(&log);
    for probe in [0, 1, 17, 400, all.len() - 1] {
        let t = all[probe].record_time;
        let p = log.position_at(t).unwrap();
        let first = all.iter().find(|e| e.record_time >= t).unwrap().position;
        assert_eq!(p, first, "record time {t:?}");
    }
    assert_eq!(log.position_at(Timestamp(0)).unwrap(), Position(0));
    assert_eq!(
        log.position_at(Timestamp(u64::MAX)).unwrap(),
        log.next_position()
    );
}

/// Flips one byte of a file.
fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x55;
    std::fs::write(path, b).unwrap();
}

/// Rewrites a file with `edit` applied and its trailing CRC-32 recomputed.
fn reseal(path: &Path, edit: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    b.truncate(b.len() - 4);
    edit(&mut b);
    let crc = crc32(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

/// CRC-32 (IEEE), bit by bit: the test does not share the engine's implementation.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn missing_or_damaged_sidecars_are_rebuilt_from_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(11);
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, &mut rng, 1200);
    log.wait_sealed().unwrap();
    log.find(&Query::all().limit(1)).unwrap();
    log.close().unwrap();
    let files = adx_files(dir.path());
    assert!(files.len() >= 3);
    let originals: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    std::fs::remove_file(&files[0]).unwrap();
    flip(&files[1], 200);
    std::fs::write(&files[2], b"not an index").unwrap();

    let log = Log::open(dir.path(), opts()).unwrap();
    check_queries(&log, &mut rng, 100);
    for (f, original) in files.iter().zip(&originals) {
        assert_eq!(
            &std::fs::read(f).unwrap(),
            original,
            "{} rebuilt",
            f.display()
        );
    }
    let report = log
        .verify_with(
            &VerifyOptions {
                attribute_indexes: true,
                ..VerifyOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(report.attribute_indexes, files.len() as u64);
    log.close().unwrap();
}

#[test]
fn a_tampered_sidecar_is_named_by_verify_and_rebuilt_by_the_lookup_it_misleads() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    for i in 0..2000u64 {
        let e = EventData::json(if i % 2 == 0 { "Even" } else { "Odd" }, "{\"x\":1}")
            .actor(format!("actor-{}", i % 3));
        log.append(&format!("s-{}", i % 9), ExpectedVersion::Any, &[e])
            .unwrap();
    }
    log.wait_sealed().unwrap();
    log.find(&Query::all().limit(1)).unwrap();
    log.close().unwrap();
    let files = adx_files(dir.path());
    let path = &files[0];
    // The event_type section starts after the 128-byte header and the record times. Move
    // the first entry's offset to the second one's record: still a well-formed, sorted,
    // well-checksummed sidecar, but it points a lookup at the wrong record.
    let bytes = std::fs::read(path).unwrap();
    let records = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let types_at = 128 + records * 8;
    reseal(path, |b| {
        let second: [u8; 4] = b[types_at + 16 + 12..types_at + 16 + 16]
            .try_into()
            .unwrap();
        b[types_at + 12..types_at + 16].copy_from_slice(&second);
    });

    let log = Log::open(dir.path(), opts()).unwrap();
    let err = log
        .verify_with(
            &VerifyOptions {
                attribute_indexes: true,
                ..VerifyOptions::default()
            },
            &mut |_| {},
        )
        .unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains("attribute index does not match") && text.contains(".adx"),
        "{text}"
    );
    // Without the option, verify does not read the sidecars.
    log.verify().unwrap();
    // A lookup that meets the bad entry rebuilds the sidecar from the records and answers
    // exactly; the file on disk is repaired.
    let all = everything(&log);
    for ty in ["Even", "Odd"] {
        let q = Query::field(Field::EventType, ty);
        assert_eq!(found(&log, &q), expected(&all, &q), "{ty}");
    }
    log.verify_with(
        &VerifyOptions {
            attribute_indexes: true,
            ..VerifyOptions::default()
        },
        &mut |_| {},
    )
    .unwrap();
    log.close().unwrap();
}

#[test]
fn a_read_only_open_indexes_in_memory_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(5);
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, &mut rng, 800);
    log.wait_sealed().unwrap();
    log.close().unwrap();
    for f in adx_files(dir.path()) {
        std::fs::remove_file(f).unwrap();
    }
    let log = Log::open(
        dir.path(),
        Options {
            recovery: RecoveryMode::ReadOnly,
            ..opts()
        },
    )
    .unwrap();
    check_queries(&log, &mut rng, 100);
    assert!(adx_files(dir.path()).is_empty());
    drop(log);
}

#[test]
fn indexes_cover_every_acknowledged_event_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(3);
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, &mut rng, 600);
    log.find(&Query::all().limit(1)).unwrap();
    fill(&log, &mut rng, 200);
    let before = everything(&log).len();
    log.crash();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(everything(&log).len(), before);
    check_queries(&log, &mut rng, 150);
    log.close().unwrap();
}

/// A window whose end is before its start holds nothing: every lookup answers with no
/// events (a count over such a window once underflowed), in the active segment and in
/// sealed ones, with a field and without.
#[test]
fn reversed_windows_find_nothing_and_never_underflow() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let mut rng = Rng(0x5eed);
    fill(&log, &mut rng, 600);
    let (a, b) = (Timestamp(1), tally_engine::now());
    for q in [
        Query::all().happened(b..a),
        Query::all().recorded(b..a),
        Query::field(Field::EventType, "New").happened(b..a),
        Query::field(Field::Actor, "alice").recorded(b..a),
        Query::field(Field::Actor, "alice").happened(b..a),
        Query::all().positions(Position(500)..Position(100)),
    ] {
        assert_eq!(log.find(&q).unwrap(), Vec::new(), "{q:?}");
    }
    // The same window the right way round finds events.
    assert!(!log.find(&Query::all().happened(a..b)).unwrap().is_empty());
}
