//! Golden fixture of format version 4: a log written once by the engine and checked in under
//! `engine/tests/fixtures/v4/log/`, with its expected contents (`expected.tsv`) and its
//! checkpoint key (`log.key`, from a fixed seed).
//!
//! Scenario: every later version of the code must still open, read and verify a version 4
//! directory byte for byte (docs/FORMAT.md, "Version history"). The log holds what version 4
//! adds: records whose body retention pruned (header byte 44 `body_form` 1, a pruned body
//! keeping the original body's hash), the `$governance` events of the policy, the hold and
//! the retention run that removed them, and events a hold kept, over several segments, with
//! checkpoints signed before and after the run.
//!
//! Method: the bytes are decoded here with the offsets of docs/FORMAT.md written out as
//! numbers (versions, record headers, pruned bodies), and the hash chain is recomputed from
//! its definition, with a pruned record's kept hash in place of its body's. Then a copy of
//! the fixture is opened read-only and read-write, read back (markers in place of removed
//! events), verified with the trusted key (every checkpoint, the removals and their policy),
//! appended to, and found out when a pruned body is changed.
//!
//! Written once with `TALLY_WRITE_FIXTURES=1 cargo test -p tally-engine --test fixtures_v4
//! write_fixture_when_asked`, which refuses to overwrite an existing fixture.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use tally_engine::format::chain::{body_hash, chain_seed, chain_step};
use tally_engine::format::checkpoint::encode_secret_key;
use tally_engine::governance::{HoldPlaced, HoldScope, Keep, PolicyScope, PolicySet};
use tally_engine::{
    Direction, EventData, EventId, ExpectedVersion, Log, Options, Position, REMOVED_EVENT_TYPE,
    RecoveryMode, Timestamp, VerifyOptions,
};

const SEGMENT_BYTES: u64 = 64 * 1024;
const LOG_KEY_SEED: [u8; 32] = [0x44; 32];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4")
}

fn opts(recovery: RecoveryMode, key: &Path) -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        recovery,
        create: recovery != RecoveryMode::ReadOnly,
        signing_key: Some(key.to_owned()),
        auto_checkpoints: false,
        index_attributes: false,
        format_version: 4,
        ..Options::default()
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The payload of the event at `position`: part of the fixture's definition.
fn payload(position: u64) -> String {
    format!(
        "{{\"n\":{position},\"client\":\"Client {}\",\"pad\":\"{}\"}}",
        position % 9,
        "x".repeat((position % 13) as usize * 20)
    )
}

/// The fixture's streams: quotes (a policy keeps the newest two), one of them held, a
/// trade no policy covers, and filler events that roll the segments.
fn stream_of(position: u64) -> &'static str {
    match position {
        0..60 => ["quote-1", "quote-2", "trade-1"][(position % 3) as usize],
        _ => "filler",
    }
}

/// One line of `expected.tsv`: position, stream, version, and `event` or `removed` with the
/// position of the run that removed it.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    position: u64,
    stream: String,
    version: u64,
    removed_by: Option<u64>,
}

fn read_expected(root: &Path) -> Vec<Expected> {
    std::fs::read_to_string(root.join("expected.tsv"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            Expected {
                position: f[0].parse().unwrap(),
                stream: f[1].to_owned(),
                version: f[2].parse().unwrap(),
                removed_by: (f[3] == "removed").then(|| f[4].parse().unwrap()),
            }
        })
        .collect()
}

#[test]
fn write_fixture_when_asked() {
    if std::env::var("TALLY_WRITE_FIXTURES").as_deref() == Ok("1") {
        write_fixture(&fixture_dir());
    }
    // Writing one now gives a fixture that the checks below accept, so that the writer and
    // the checks cannot drift apart.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("v4");
    write_fixture(&root);
    check_bytes(&root);
}

fn write_fixture(root: &Path) {
    assert!(
        !root.exists(),
        "{} exists: a golden fixture is written once",
        root.display()
    );
    std::fs::create_dir_all(root).unwrap();
    let key = root.join("log.key");
    std::fs::write(
        &key,
        encode_secret_key(&SigningKey::from_bytes(&LOG_KEY_SEED)),
    )
    .unwrap();
    let log = Log::open(root.join("log"), opts(RecoveryMode::Strict, &key)).unwrap();
    let mut position = 0u64;
    while position < 60 || log.segments().len() < 3 {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&position.to_le_bytes());
        id[8] = 0x44;
        let e = EventData::json("QuoteGiven", payload(position))
            .with_id(EventId(id))
            .aggregate_type("Quote")
            .actor(format!("trader-{}", position % 4))
            .correlation_id(format!("rfq-{}", position / 3))
            .event_time(Timestamp(1_765_000_000_000_000_000 + position));
        log.append(stream_of(position), ExpectedVersion::Any, &[e])
            .unwrap();
        position += 1;
        if position == 30 {
            log.checkpoint().unwrap();
        }
    }
    log.wait_sealed().unwrap();
    log.checkpoint().unwrap();
    log.set_retention_policy(
        &PolicySet {
            name: "quotes-newest-2".into(),
            scope: PolicyScope::Prefix("quote-".into()),
            keep: Keep::Newest { count: 2 },
            reason: "quotes are kept while they may be traded on".into(),
        },
        "compliance",
    )
    .unwrap();
    log.place_legal_hold(
        &HoldPlaced {
            id: "case-7".into(),
            scope: HoldScope::Stream("quote-2".into()),
            reason: "a client's complaint".into(),
        },
        "legal",
    )
    .unwrap();
    let run = log
        .apply_retention(tally_engine::now(), "ops", "fixture")
        .unwrap();
    assert_eq!(run.removed, 18, "quote-1 keeps 2 of its 20 events");
    log.checkpoint().unwrap();
    let mut lines = vec!["# position\tstream\tversion\tform\tremoved_by".to_owned()];
    for e in log
        .read_all(Position(0), 10_000, Direction::Forward)
        .unwrap()
    {
        lines.push(match e.removed_by() {
            Some(by) => format!(
                "{}\t{}\t{}\tremoved\t{}",
                e.position,
                e.stream(),
                e.version,
                by
            ),
            None => format!("{}\t{}\t{}\tevent\t-", e.position, e.stream(), e.version),
        });
    }
    log.close().unwrap();
    std::fs::write(root.join("expected.tsv"), lines.join("\n") + "\n").unwrap();
}

/// The bytes, by the offsets of docs/FORMAT.md: versions, record headers (88 bytes, byte 44
/// `body_form`), pruned bodies, and the chain.
fn check_bytes(root: &Path) {
    let expected = read_expected(root);
    let log_dir = root.join("log");
    let meta = std::fs::read(log_dir.join("tally.meta")).unwrap();
    assert_eq!(u16_at(&meta, 8), 4, "tally.meta format_version");
    let log_id: [u8; 16] = meta[16..32].try_into().unwrap();
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let mut chain = chain_seed(&log_id);
    let mut at = 0usize;
    let mut pruned = 0;
    for seg in &segs {
        let b = std::fs::read(seg).unwrap();
        if b[..4096].iter().all(|&x| x == 0) {
            continue; // a spare (FORMAT.md section 2)
        }
        assert_eq!(u16_at(&b, 8), 4, "{} header format_version", seg.display());
        let mut off = 4096usize;
        while off + 88 <= b.len() && u32_at(&b, off + 4) != 0 {
            let h = &b[off..off + 88];
            let body_len = u32_at(h, 4) as usize;
            let body = &b[off + 88..off + 88 + body_len];
            assert_eq!(crc32fast::hash(body), u32_at(h, 8), "body_crc");
            assert_eq!(crc32fast::hash(&h[4..88]), u32_at(h, 0), "header_crc");
            assert_eq!(&h[45..48], &[0, 0, 0], "reserved");
            let e = &expected[at];
            assert_eq!(u64_at(h, 48), e.position);
            assert_eq!(u64_at(h, 24), e.version, "stream_version");
            // FORMAT.md 5.5: a pruned body keeps the original body's hash, the run's
            // position and the stream; the chain links the kept hash.
            let hash = match (h[44], e.removed_by) {
                (0, None) => {
                    let stream_len = usize::from(u16_at(body, 30));
                    assert_eq!(&body[48..48 + stream_len], e.stream.as_bytes());
                    body_hash(body)
                }
                (1, Some(by)) => {
                    assert_eq!(u64_at(body, 32), by, "removed_by");
                    let stream_len = usize::from(u16_at(body, 40));
                    assert!(body[42..48].iter().all(|&x| x == 0));
                    assert_eq!(&body[48..48 + stream_len], e.stream.as_bytes());
                    assert!(body[48 + stream_len..].iter().all(|&x| x == 0), "zero tail");
                    pruned += 1;
                    body[..32].try_into().unwrap()
                }
                (form, by) => panic!("position {}: body_form {form}, expected {by:?}", e.position),
            };
            let linked = chain_step(&chain, h, &hash);
            assert_eq!(&linked[..], &h[56..88], "chain_hash at {}", e.position);
            chain = linked;
            at += 1;
            off += (88 + body_len).next_multiple_of(8);
        }
    }
    assert_eq!(at, expected.len());
    assert_eq!(pruned, 18);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn the_checked_in_bytes_are_what_format_md_says() {
    check_bytes(&fixture_dir());
}

#[test]
fn the_fixture_opens_reads_markers_verifies_and_takes_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("v4");
    copy_dir(&fixture_dir(), &root);
    let expected = read_expected(&root);
    let key = root.join("log.key");
    let public = SigningKey::from_bytes(&LOG_KEY_SEED)
        .verifying_key()
        .to_bytes();
    let trusted = VerifyOptions {
        trusted_keys: vec![public],
        ..VerifyOptions::default()
    };
    for recovery in [RecoveryMode::ReadOnly, RecoveryMode::Strict] {
        let log = Log::open(root.join("log"), opts(recovery, &key)).unwrap();
        let events = log
            .read_all(Position(0), 10_000, Direction::Forward)
            .unwrap();
        assert_eq!(events.len(), expected.len());
        for (e, x) in events.iter().zip(&expected) {
            assert_eq!(
                (e.position.0, e.stream(), e.version),
                (x.position, x.stream.as_str(), x.version)
            );
            assert_eq!(e.removed_by().map(|p| p.0), x.removed_by);
            if x.removed_by.is_some() {
                assert_eq!(e.event_type(), REMOVED_EVENT_TYPE);
            } else if !e.stream().starts_with('$') {
                assert_eq!(e.payload(), payload(e.position.0).as_bytes());
            }
        }
        let report = log.verify_with(&trusted, &mut |_| {}).unwrap();
        assert_eq!(report.format_version, 4);
        assert_eq!(report.checkpoints, 3);
        assert_eq!(
            report.removed.iter().map(|r| r.to - r.from).sum::<u64>(),
            18
        );
        assert!(report.removed.iter().all(|r| r.policy == "quotes-newest-2"));
        let g = log.governance().unwrap();
        assert_eq!(g.runs.len(), 1);
        assert!(g.holds.contains_key("case-7"));
        if recovery == RecoveryMode::Strict {
            log.append(
                "quote-1",
                ExpectedVersion::Exact(19),
                &[EventData::json("QuoteGiven", "{}")],
            )
            .unwrap();
            log.verify_with(&trusted, &mut |_| {}).unwrap();
        }
        log.close().unwrap();
    }
    // A pruned body whose kept hash is changed (its checksums fixed) breaks the chain: the
    // hash a pruned record keeps is exactly what its record hash commits to.
    let first_removed = expected.iter().find(|e| e.removed_by.is_some()).unwrap();
    let seg = root.join("log/00000000000000000000.seg");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut off = 4096u64;
    let mut h = [0u8; 88];
    loop {
        f.read_exact_at(&mut h, off).unwrap();
        let body_len = u64::from(u32_at(&h, 4));
        if u64_at(&h, 48) == first_removed.position {
            let mut body = vec![0u8; body_len as usize];
            f.read_exact_at(&mut body, off + 88).unwrap();
            body[0] ^= 1; // the kept hash
            f.write_all_at(&body, off + 88).unwrap();
            h[8..12].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
            let crc = crc32fast::hash(&h[4..88]);
            h[..4].copy_from_slice(&crc.to_le_bytes());
            f.write_all_at(&h, off).unwrap();
            break;
        }
        off += (88 + body_len).next_multiple_of(8);
    }
    drop(f);
    let log = Log::open(root.join("log"), opts(RecoveryMode::ReadOnly, &key)).unwrap();
    let err = log
        .verify_with(&trusted, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("chain"), "{err}");
}
