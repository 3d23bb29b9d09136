//! Golden fixture of format version 1: a log written once by the engine and checked in under
//! `engine/tests/fixtures/v1/log/`, with its expected contents in
//! `engine/tests/fixtures/v1/expected.tsv`.
//!
//! Scenario: every later version of the code must still open, read and verify a version 1
//! directory byte for byte (docs/FORMAT.md, "Version history"). Method: the bytes of every
//! file are decoded here with the offsets of docs/FORMAT.md written out as numbers (not
//! taken from the code's constants, which may move with a later version), CRCs are
//! recomputed with a CRC-32 written from the definition, the hash chain and Merkle roots are
//! recomputed, and then the fixture (copied to a temporary directory) is opened read-write
//! and read-only, read back completely, verified, and appended to.
//!
//! The log's id, record times and some event ids are random or time-based, so the fixture
//! cannot be regenerated identically. It was written once with
//! `TALLY_WRITE_FIXTURES=1 cargo test -p tally-engine --test fixtures_v1`, which refuses to
//! overwrite an existing fixture; a new format version gets a new directory instead.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tally_engine::format::chain::{body_hash, chain_seed, chain_step, merkle_root};
use tally_engine::index::SealedIndex;
use tally_engine::{
    AppendRequest, ContentType, Direction, EventData, EventId, ExpectedVersion, Log, Options,
    Position, RecoveryMode, Timestamp, Verify,
};

/// The segment size the fixture was written with.
const SEGMENT_BYTES: u64 = 64 * 1024;

/// The first record header of the log: file offset 4096 of segment 0, 80 bytes.
const GOLDEN_FIRST_HEADER_HEX: &str = "d368de109e010000ed0fb11000000000000000000000000000000000000000005f6447a1007cea1803000100000000001e14c765a9964dd78352cd12659290c1e81bb7b1c570ed4b32809a7e775948a9";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

fn opts(recovery: RecoveryMode) -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        recovery,
        ..Options::default()
    }
}

/// The payload of the event at `position`. Part of the fixture's definition: do not change.
fn payload(position: u64) -> (ContentType, Vec<u8>) {
    let p = position as usize;
    match position % 9 {
        // Every byte value, from a varying start.
        4 => (
            ContentType::Binary,
            (0..=255u8)
                .cycle()
                .skip(p % 256)
                .take(300 + p * 53 % 700)
                .collect(),
        ),
        7 => (ContentType::Binary, Vec::new()),
        _ => (
            ContentType::Json,
            format!(
                r#"{{"n":{position},"qty":"{}","px":"{}.{:02}","note":"{}"}}"#,
                position * 25 % 1000,
                100 + position % 7,
                position * 13 % 100,
                "ab-".repeat(100 + p * 37 % 200)
            )
            .into_bytes(),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers: hex, CRC-32, little-endian reads at documented offsets.

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex string {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digits"))
        .collect()
}

fn hash32(s: &str) -> [u8; 32] {
    unhex(s).try_into().expect("32 bytes")
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit by bit from the definition.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn h32_at(b: &[u8], at: usize) -> [u8; 32] {
    b[at..at + 32].try_into().expect("32 bytes")
}
fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

// ---------------------------------------------------------------------------------------
// The manifest `expected.tsv`.

#[derive(Debug, Clone, PartialEq)]
struct ExpectedSegment {
    seq: u64,
    base_position: u64,
    record_count: u64,
    sealed: bool,
    merkle_root: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq)]
struct ExpectedEvent {
    position: u64,
    stream: String,
    version: u64,
    event_id: EventId,
    event_type: String,
    schema_version: u32,
    aggregate_type: String,
    content_type: u8,
    correlation_id: String,
    causation_id: String,
    actor: String,
    event_time: u64,
    record_time: u64,
    flags: u16,
    record_hash: [u8; 32],
    payload_len: usize,
    payload_crc: u32,
}

#[derive(Debug)]
struct Expected {
    log_id: [u8; 16],
    files: Vec<(String, u64)>,
    segments: Vec<ExpectedSegment>,
    events: Vec<ExpectedEvent>,
}

const MANIFEST_HEAD: &str = "\
# Expected contents of the Tally format v1 golden fixture in log/ (see fixtures_v1.rs).
# Tab-separated. Lines:
#   log_id   <hex>
#   file     <name> <bytes>
#   segment  <seq> <base_position> <record_count> <sealed|active> <merkle_root hex or ->
#   event    <position> <stream> <version> <event_id> <event_type> <schema_version>
#            <aggregate_type> <content_type> <correlation_id> <causation_id> <actor>
#            <event_time> <record_time> <flags> <record_hash hex> <payload_len>
#            <payload_crc32 hex>
# Payload bytes are defined by `payload(position)` in fixtures_v1.rs.
";

fn manifest_line(e: &ExpectedEvent) -> String {
    [
        "event".to_owned(),
        e.position.to_string(),
        e.stream.clone(),
        e.version.to_string(),
        e.event_id.to_string(),
        e.event_type.clone(),
        e.schema_version.to_string(),
        e.aggregate_type.clone(),
        e.content_type.to_string(),
        e.correlation_id.clone(),
        e.causation_id.clone(),
        e.actor.clone(),
        e.event_time.to_string(),
        e.record_time.to_string(),
        e.flags.to_string(),
        hex(&e.record_hash),
        e.payload_len.to_string(),
        format!("{:08x}", e.payload_crc),
    ]
    .join("\t")
}

fn read_manifest() -> Expected {
    read_manifest_from(&fixture_dir())
}

/// The manifest `expected.tsv` in `dir` (the golden fixture's, or a freshly written one's).
fn read_manifest_from(dir: &Path) -> Expected {
    let text = std::fs::read_to_string(dir.join("expected.tsv"))
        .expect("engine/tests/fixtures/v1/expected.tsv");
    let mut log_id = None;
    let (mut files, mut segments, mut events) = (Vec::new(), Vec::new(), Vec::new());
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        let num = |i: usize| -> u64 { f[i].parse().expect("a number") };
        match f[0] {
            "log_id" => log_id = Some(unhex(f[1]).try_into().expect("16 bytes")),
            "file" => files.push((f[1].to_owned(), num(2))),
            "segment" => segments.push(ExpectedSegment {
                seq: num(1),
                base_position: num(2),
                record_count: num(3),
                sealed: f[4] == "sealed",
                merkle_root: (f[5] != "-").then(|| hash32(f[5])),
            }),
            "event" => {
                assert_eq!(f.len(), 18, "fields of {line:?}");
                events.push(ExpectedEvent {
                    position: num(1),
                    stream: f[2].to_owned(),
                    version: num(3),
                    event_id: f[4].parse().expect("an event id"),
                    event_type: f[5].to_owned(),
                    schema_version: num(6) as u32,
                    aggregate_type: f[7].to_owned(),
                    content_type: num(8) as u8,
                    correlation_id: f[9].to_owned(),
                    causation_id: f[10].to_owned(),
                    actor: f[11].to_owned(),
                    event_time: num(12),
                    record_time: num(13),
                    flags: num(14) as u16,
                    record_hash: hash32(f[15]),
                    payload_len: num(16) as usize,
                    payload_crc: u32::from_str_radix(f[17], 16).expect("hex"),
                });
            }
            other => panic!("unknown manifest line kind {other:?}"),
        }
    }
    let m = Expected {
        log_id: log_id.expect("a log_id line"),
        files,
        segments,
        events,
    };
    for (i, e) in m.events.iter().enumerate() {
        assert_eq!(
            e.position, i as u64,
            "manifest events are in position order"
        );
        let (ct, p) = payload(e.position);
        assert_eq!(
            (ct as u8, p.len(), crc32(&p)),
            (e.content_type, e.payload_len, e.payload_crc),
            "payload({}) no longer generates the fixture's payload",
            e.position
        );
    }
    m
}

// ---------------------------------------------------------------------------------------
// Writing the fixture (once).

fn fixed_event_id(position: u64) -> EventId {
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&[0x01, 0x8b, 0xcf, 0x10, 0x20, 0x30]);
    b[6] = 0x70; // version 7
    b[8] = 0x80; // RFC 9562 variant
    // The position, big-endian, so that the ids sort like the positions.
    for (i, b) in b[12..].iter_mut().enumerate() {
        *b = (position >> (8 * (3 - i))) as u8;
    }
    EventId(b)
}

fn make_event(position: u64) -> EventData {
    let (content_type, bytes) = payload(position);
    let types = [
        "TradeNew",
        "TradeAmended",
        "TradeCancelled",
        "Posted",
        "Audited",
    ];
    let mut e = EventData::new(types[(position % 5) as usize], bytes)
        .schema_version(1 + (position % 3) as u32)
        .actor(["alice@desk", "bob", "", "système"][(position % 4) as usize]);
    e.content_type = content_type;
    if !position.is_multiple_of(4) {
        e = e.aggregate_type("Trade");
    }
    if !position.is_multiple_of(3) {
        e = e.correlation_id(format!("corr-{}", position / 10));
    }
    if position % 2 == 1 {
        e = e.causation_id(format!("cause-{}", position - 1));
    }
    if position % 13 != 6 {
        e = e.with_id(fixed_event_id(position));
    }
    if position % 17 != 9 {
        e = e.event_time(Timestamp(
            1_700_000_000_000_000_000 + position * 1_000_000_007,
        ));
    }
    e
}

/// With `TALLY_WRITE_FIXTURES=1`, writes the golden fixture (once). Always, writes the same
/// kind of log into a temporary directory and holds it to the checks the golden fixture
/// passes (documented offsets, chain, contents), so that the generator and those checks
/// cannot drift apart unnoticed.
#[test]
fn write_fixture_when_asked() {
    if std::env::var("TALLY_WRITE_FIXTURES").as_deref() == Ok("1") {
        write_fixture(&fixture_dir());
    }
    let tmp = tempfile::tempdir().unwrap();
    write_fixture(tmp.path());
    let m = read_manifest_from(tmp.path());
    check_shape(&m);
    check_documented_offsets(&tmp.path().join("log"), &m);
    let log = Log::open(tmp.path().join("log"), opts(RecoveryMode::ReadOnly)).unwrap();
    check_contents(&log, &m);
}

/// Writes a version 1 log with the fixture's events and its manifest into `dir`.
fn write_fixture(dir: &Path) {
    let log_dir = dir.join("log");
    assert!(
        !log_dir.exists(),
        "{} exists: a golden fixture is written once (delete it to start over, and update \
         GOLDEN_FIRST_HEADER_HEX)",
        log_dir.display()
    );
    let log = Log::open(
        &log_dir,
        Options {
            format_version: 1,
            ..opts(RecoveryMode::Strict)
        },
    )
    .unwrap();
    let streams = ["trade-1", "trade-2", "konto-ø1", "audit"];
    let mut versions: HashMap<&str, u64> = HashMap::new();
    let mut flags: Vec<u16> = Vec::new();
    let mut position = 0u64;
    for batch in 0usize.. {
        let segs = log.segments();
        if segs.len() >= 3 && segs[segs.len() - 1].record_count >= 12 {
            break;
        }
        // One stream per batch, a multi-stream batch now and then; 1 to 4 events.
        let parts: Vec<(&str, usize)> = if batch % 9 == 5 {
            vec![(streams[batch % 4], 2), (streams[(batch + 1) % 4], 1)]
        } else {
            vec![(streams[batch % 4], [1, 3, 2, 1, 4, 2][batch % 6])]
        };
        let mut events: Vec<Vec<EventData>> = Vec::new();
        let total: usize = parts.iter().map(|p| p.1).sum();
        for &(_, n) in &parts {
            events.push((0..n).map(|i| make_event(position + i as u64)).collect());
            position += n as u64;
        }
        let requests: Vec<AppendRequest<'_>> = parts
            .iter()
            .zip(&events)
            .map(|(&(stream, _), evs)| AppendRequest {
                stream,
                expected: versions
                    .get(stream)
                    .map_or(ExpectedVersion::NoStream, |&v| ExpectedVersion::Exact(v)),
                events: evs,
            })
            .collect();
        let results = log.append_multi(&requests).unwrap();
        for (&(stream, _), r) in parts.iter().zip(&results) {
            versions.insert(stream, r.last_version);
        }
        for i in 0..total {
            let mut f = 0;
            if i == 0 {
                f |= 1;
            }
            if i + 1 == total {
                f |= 2;
            }
            flags.push(f);
        }
        assert_eq!(log.next_position(), Position(position));
    }
    log.wait_sealed().unwrap();
    let events = log
        .read_all(Position(0), usize::MAX, Direction::Forward)
        .unwrap();
    let segments = log.segments();
    let log_id = log.log_id();
    log.close().unwrap();
    std::fs::remove_file(log_dir.join("tally.lock")).unwrap();

    let mut out = String::from(MANIFEST_HEAD);
    out.push_str(&format!("log_id\t{}\n", hex(&log_id)));
    let mut files: Vec<(String, u64)> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    files.sort();
    for (name, len) in &files {
        out.push_str(&format!("file\t{name}\t{len}\n"));
    }
    for s in &segments {
        out.push_str(&format!(
            "segment\t{}\t{}\t{}\t{}\t{}\n",
            s.seq.0,
            s.base_position.0,
            s.record_count,
            if s.sealed { "sealed" } else { "active" },
            s.merkle_root.map_or("-".to_owned(), |r| hex(&r))
        ));
    }
    for e in &events {
        let text = [
            &e.stream(),
            &e.event_type(),
            &e.aggregate_type(),
            &e.correlation_id(),
            &e.causation_id(),
            &e.actor(),
        ];
        assert!(text.iter().all(|t| !t.contains(['\t', '\n'])));
        let line = manifest_line(&ExpectedEvent {
            position: e.position.0,
            stream: e.stream().to_owned(),
            version: e.version,
            event_id: e.event_id,
            event_type: e.event_type().to_owned(),
            schema_version: e.schema_version,
            aggregate_type: e.aggregate_type().to_owned(),
            content_type: e.content_type as u8,
            correlation_id: e.correlation_id().to_owned(),
            causation_id: e.causation_id().to_owned(),
            actor: e.actor().to_owned(),
            event_time: e.event_time.0,
            record_time: e.record_time.0,
            flags: flags[e.position.0 as usize],
            record_hash: e.record_hash,
            payload_len: e.payload().len(),
            payload_crc: crc32(e.payload()),
        });
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(dir.join("expected.tsv"), out).unwrap();
    let seg0 = std::fs::read(log_dir.join("00000000000000000000.seg")).unwrap();
    println!("GOLDEN_FIRST_HEADER_HEX = {}", hex(&seg0[4096..4176]));
}

/// The fixture has sealed segments and an active one with records.
fn check_shape(m: &Expected) {
    assert!(
        m.segments.iter().filter(|s| s.sealed).count() >= 2,
        "the fixture has sealed segments"
    );
    assert!(
        m.segments
            .last()
            .is_some_and(|s| !s.sealed && s.record_count > 0),
        "the fixture has an active segment with records"
    );
}

// ---------------------------------------------------------------------------------------
// Checking the fixture.

/// Copies the fixture's log directory (flat) to a fresh temporary directory.
fn copy_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    for entry in std::fs::read_dir(fixture_dir().join("log")).expect("the fixture directory") {
        let entry = entry.expect("a directory entry");
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name()))
            .expect("copying a fixture file");
    }
    tmp
}

fn dir_contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("listing a directory")
        .map(|e| {
            let e = e.expect("a directory entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("reading a file"),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn fixture_directory_is_as_the_engine_left_it() {
    let m = read_manifest();
    let on_disk: Vec<(String, u64)> = dir_contents(&fixture_dir().join("log"))
        .into_iter()
        .map(|(n, b)| (n, b.len() as u64))
        .collect();
    assert_eq!(on_disk, m.files);
    check_shape(&m);
}

#[test]
fn first_record_header_matches_its_golden_hex() {
    let m = read_manifest();
    let seg0 = std::fs::read(fixture_dir().join("log/00000000000000000000.seg")).unwrap();
    let h = &seg0[4096..4096 + 80];
    assert_eq!(
        hex(h),
        GOLDEN_FIRST_HEADER_HEX,
        "bytes 4096..4176 of segment 0"
    );
    let golden = unhex(GOLDEN_FIRST_HEADER_HEX);
    let e = &m.events[0];
    // docs/FORMAT.md, "Record header", field by field.
    assert_eq!(u32_at(&golden, 0), crc32(&golden[4..80]), "header_crc");
    let body_len = u32_at(&golden, 4) as usize;
    let body = &seg0[4096 + 80..4096 + 80 + body_len];
    assert_eq!(u32_at(&golden, 8), crc32(body), "body_crc");
    assert_eq!(u32_at(&golden, 12), 0, "durable_lag of the first record");
    assert_eq!(u64_at(&golden, 16), 0, "position");
    assert_eq!(u64_at(&golden, 24), 0, "stream_version");
    assert_eq!(u64_at(&golden, 32), e.record_time, "record_time");
    assert_eq!(u16_at(&golden, 40), 3, "flags: BATCH_START | BATCH_END");
    assert_eq!(u16_at(&golden, 42), 1, "kind: Event");
    assert_eq!(u32_at(&golden, 44), 0, "reserved");
    assert_eq!(h32_at(&golden, 48), e.record_hash, "chain_hash");
    let seed = chain_seed(&m.log_id);
    let link_key: [u8; 80] = golden.clone().try_into().unwrap();
    assert_eq!(
        chain_step(&seed, &link_key, &body_hash(body)),
        e.record_hash,
        "the first record chains from the seed"
    );
    // The envelope's fixed part, docs/FORMAT.md "Envelope fixed part".
    assert_eq!(body[..16], e.event_id.0, "event_id");
    assert_eq!(u64_at(body, 16), e.event_time, "event_time");
    assert_eq!(u32_at(body, 24), e.schema_version, "schema_version");
    assert_eq!(body[28], e.content_type, "content_type");
    assert_eq!(u16_at(body, 30) as usize, e.stream.len(), "stream_len");
    assert_eq!(
        &body[48..48 + e.stream.len()],
        e.stream.as_bytes(),
        "stream"
    );
}

/// Decodes one record at `at` with the documented offsets and checks it against the
/// manifest; returns the offset of the next record.
fn check_record(seg: &[u8], at: usize, prev: &[u8; 32], e: &ExpectedEvent) -> usize {
    let h = &seg[at..at + 80];
    let ctx = format!("record {} at byte {at}", e.position);
    assert_eq!(u32_at(h, 0), crc32(&h[4..80]), "{ctx}: header_crc");
    let body_len = u32_at(h, 4) as usize;
    let body = &seg[at + 80..at + 80 + body_len];
    assert_eq!(u32_at(h, 8), crc32(body), "{ctx}: body_crc");
    let durable_lag = u64::from(u32_at(h, 12));
    assert!(durable_lag <= e.position, "{ctx}: durable_lag");
    assert_eq!(u64_at(h, 16), e.position, "{ctx}: position");
    assert_eq!(u64_at(h, 24), e.version, "{ctx}: stream_version");
    assert_eq!(u64_at(h, 32), e.record_time, "{ctx}: record_time");
    assert_eq!(u16_at(h, 40), e.flags, "{ctx}: flags");
    assert_eq!(u16_at(h, 42), 1, "{ctx}: kind");
    assert_eq!(u32_at(h, 44), 0, "{ctx}: reserved");
    assert_eq!(h32_at(h, 48), e.record_hash, "{ctx}: chain_hash");
    let header: [u8; 80] = h.try_into().expect("80 bytes");
    assert_eq!(
        chain_step(prev, &header, &body_hash(body)),
        e.record_hash,
        "{ctx}: chain"
    );

    // The envelope.
    assert_eq!(body[..16], e.event_id.0, "{ctx}: event_id");
    assert_eq!(u64_at(body, 16), e.event_time, "{ctx}: event_time");
    assert_eq!(u32_at(body, 24), e.schema_version, "{ctx}: schema_version");
    assert_eq!(body[28], e.content_type, "{ctx}: content_type");
    assert_eq!(body[29], 0, "{ctx}: reserved");
    assert_eq!(u16_at(body, 42), 0, "{ctx}: reserved");
    let (_, payload) = payload(e.position);
    let fields: [&[u8]; 7] = [
        e.stream.as_bytes(),
        e.aggregate_type.as_bytes(),
        e.event_type.as_bytes(),
        e.correlation_id.as_bytes(),
        e.causation_id.as_bytes(),
        e.actor.as_bytes(),
        &payload,
    ];
    let mut field_at = 48;
    for (i, f) in fields.iter().enumerate() {
        let len = if i < 6 {
            usize::from(u16_at(body, 30 + 2 * i))
        } else {
            u32_at(body, 44) as usize
        };
        assert_eq!(len, f.len(), "{ctx}: length of variable field {i}");
        assert_eq!(
            &body[field_at..field_at + len],
            *f,
            "{ctx}: variable field {i}"
        );
        field_at += len;
    }
    assert_eq!(field_at, body_len, "{ctx}: the envelope fills the body");
    let end = (at + 80 + body_len).next_multiple_of(8);
    assert!(is_zero(&seg[at + 80 + body_len..end]), "{ctx}: padding");
    end
}

#[test]
fn fixture_bytes_decode_with_the_documented_offsets() {
    check_documented_offsets(&fixture_dir().join("log"), &read_manifest());
}

/// Decodes every byte of the log in `dir` with the offsets docs/FORMAT.md gives and checks
/// it against the manifest `m`.
fn check_documented_offsets(dir: &Path, m: &Expected) {
    // tally.meta
    let meta = std::fs::read(dir.join("tally.meta")).unwrap();
    assert_eq!(meta.len(), 64);
    assert_eq!(&meta[..8], b"TALLYLOG");
    assert_eq!((u16_at(&meta, 8), u16_at(&meta, 10)), (1, 64));
    assert!(is_zero(&meta[12..16]) && is_zero(&meta[40..60]));
    assert_eq!(meta[16..32], m.log_id);
    assert_eq!(u32_at(&meta, 60), crc32(&meta[..60]));

    let mut chain = chain_seed(&m.log_id);
    let mut position = 0u64;
    for s in &m.segments {
        let name = format!("{:020}.seg", s.seq);
        let seg = std::fs::read(dir.join(&name)).unwrap();
        assert_eq!(seg.len() as u64, SEGMENT_BYTES, "{name}");
        // Segment header.
        assert_eq!(&seg[..8], b"TALLYSEG", "{name}");
        assert_eq!((u16_at(&seg, 8), u16_at(&seg, 10)), (1, 128), "{name}");
        assert!(is_zero(&seg[12..16]) && is_zero(&seg[96..124]), "{name}");
        assert_eq!(seg[16..32], m.log_id, "{name}: log_id");
        assert_eq!(u64_at(&seg, 32), s.seq, "{name}: seq");
        assert_eq!(u64_at(&seg, 40), s.base_position, "{name}: base_position");
        assert_eq!(s.base_position, position, "{name}: continues the log");
        assert_eq!(u64_at(&seg, 56), SEGMENT_BYTES, "{name}: capacity");
        assert_eq!(h32_at(&seg, 64), chain, "{name}: prev_chain_hash");
        assert_eq!(u32_at(&seg, 124), crc32(&seg[..124]), "{name}: header_crc");
        assert!(is_zero(&seg[128..4096]), "{name}: header page");

        // Records.
        let footer_at = seg.len() - 4096;
        let mut at = 4096;
        let mut hashes = Vec::new();
        for _ in 0..s.record_count {
            let e = &m.events[position as usize];
            at = check_record(&seg, at, &chain, e);
            chain = e.record_hash;
            hashes.push(chain);
            position += 1;
        }
        let data_end = at;
        assert!(
            is_zero(&seg[data_end..footer_at]),
            "{name}: zeros after data"
        );

        // Footer.
        let f = &seg[footer_at..];
        if s.sealed {
            assert_eq!(&f[..8], b"TALLYFTR", "{name}");
            assert_eq!((u16_at(f, 8), u16_at(f, 10)), (1, 192), "{name}");
            assert!(is_zero(&f[12..16]) && is_zero(&f[152..188]), "{name}");
            assert_eq!(f[16..32], m.log_id, "{name}: footer log_id");
            assert_eq!(u64_at(f, 32), s.seq, "{name}: footer seq");
            assert_eq!(u64_at(f, 40), s.record_count, "{name}: record_count");
            assert_eq!(u64_at(f, 48), s.base_position, "{name}: first_position");
            assert_eq!(u64_at(f, 56), position - 1, "{name}: last_position");
            assert_eq!(u64_at(f, 64), data_end as u64, "{name}: data_end");
            let first = &m.events[s.base_position as usize];
            assert_eq!(
                u64_at(f, 72),
                first.record_time,
                "{name}: first_record_time"
            );
            let last = &m.events[position as usize - 1];
            assert_eq!(u64_at(f, 80), last.record_time, "{name}: last_record_time");
            assert_eq!(h32_at(f, 88), chain, "{name}: last_chain_hash");
            assert_eq!(Some(h32_at(f, 120)), s.merkle_root, "{name}: merkle_root");
            assert_eq!(
                merkle_root(&hashes),
                h32_at(f, 120),
                "{name}: recomputed root"
            );
            assert_eq!(u32_at(f, 188), crc32(&f[..188]), "{name}: footer_crc");
            assert!(is_zero(&f[192..]), "{name}: footer page");
        } else {
            assert!(is_zero(f), "{name}: the active segment has no footer");
        }

        // Index sidecar: header fields at the documented offsets, then the decoder.
        let idx_name = format!("{:020}.idx", s.seq);
        let idx = std::fs::read(dir.join(&idx_name)).unwrap();
        assert_eq!(&idx[..8], b"TALLYIDX", "{idx_name}");
        assert_eq!((u16_at(&idx, 8), u16_at(&idx, 10)), (1, 128), "{idx_name}");
        assert_eq!(
            u32_at(&idx, 12),
            u32::from(s.sealed),
            "{idx_name}: complete flag"
        );
        assert_eq!(idx[16..32], m.log_id, "{idx_name}: log_id");
        assert_eq!(u64_at(&idx, 32), s.seq, "{idx_name}: seq");
        assert_eq!(
            u64_at(&idx, 40),
            s.base_position,
            "{idx_name}: base_position"
        );
        assert_eq!(u64_at(&idx, 48), s.record_count, "{idx_name}: record_count");
        assert_eq!(u64_at(&idx, 56), data_end as u64, "{idx_name}: data_end");
        assert_eq!(h32_at(&idx, 64), chain, "{idx_name}: last_chain_hash");
        assert_eq!(
            u32_at(&idx, 100) as u64,
            s.record_count.div_ceil(32),
            "{idx_name}: sparse_count"
        );
        assert_eq!(u32_at(&idx, 108), 32, "{idx_name}: sparse_every");
        let trailer = idx.len() - 4;
        assert_eq!(
            u32_at(&idx, trailer),
            crc32(&idx[..trailer]),
            "{idx_name}: CRC"
        );
        let ids_at = idx.len() - 4 - u32_at(&idx, 104) as usize - s.record_count as usize * 16;
        for i in 0..s.record_count as usize {
            let e = &m.events[s.base_position as usize + i];
            assert_eq!(
                idx[ids_at + 16 * i..][..16],
                e.event_id.0,
                "{idx_name}: id {i}"
            );
        }
        let sealed = SealedIndex::open(std::sync::Arc::new(idx)).unwrap();
        assert_eq!(sealed.is_complete(), s.sealed, "{idx_name}");
    }
    assert_eq!(
        position,
        m.events.len() as u64,
        "every event is in a segment"
    );

    // Spare segments: all zero.
    for (name, _) in &m.files {
        let seq: Option<u64> = name.strip_suffix(".seg").and_then(|d| d.parse().ok());
        if seq.is_some_and(|q| m.segments.iter().all(|s| s.seq != q)) {
            let bytes = std::fs::read(dir.join(name)).unwrap();
            assert!(is_zero(&bytes), "spare {name} is all zero");
        }
    }

    // streams.snap (docs/FORMAT.md, "Stream table snapshot"): written at the clean close.
    let snap = std::fs::read(dir.join("streams.snap")).unwrap();
    let active = m.segments.last().unwrap();
    assert_eq!(&snap[..8], b"TALLYSNP");
    assert_eq!((u16_at(&snap, 8), u16_at(&snap, 10)), (1, 64));
    assert!(is_zero(&snap[12..16]));
    assert_eq!(snap[16..32], m.log_id);
    assert_eq!(u64_at(&snap, 32), active.seq, "covered_seq");
    let active_idx = std::fs::read(dir.join(format!("{:020}.idx", active.seq))).unwrap();
    assert_eq!(
        u64_at(&snap, 40),
        u64_at(&active_idx, 56),
        "covered_data_end"
    );
    assert_eq!(u64_at(&snap, 48), m.events.len() as u64, "next_position");
    let trailer = snap.len() - 4;
    assert_eq!(
        u32_at(&snap, trailer),
        crc32(&snap[..trailer]),
        "snapshot CRC"
    );
    let count = u64_at(&snap, 56) as usize;
    let mut at = 64;
    let mut seen = Vec::new();
    for _ in 0..count {
        let e = &snap[at..at + 56];
        let name_len = usize::from(u16_at(e, 40));
        assert!(is_zero(&e[42..56]), "snapshot entry reserved bytes");
        let name = std::str::from_utf8(&snap[at + 56..at + 56 + name_len]).unwrap();
        let of_stream: Vec<&ExpectedEvent> =
            m.events.iter().filter(|ev| ev.stream == name).collect();
        let (first, last) = (of_stream[0], of_stream[of_stream.len() - 1]);
        let last_seg = m
            .segments
            .iter()
            .filter(|s| s.base_position <= last.position)
            .map(|s| s.seq)
            .max();
        assert_eq!(u64_at(e, 0), first.position, "{name}: first_position");
        assert_eq!(u64_at(e, 8), first.record_time, "{name}: created_time");
        assert_eq!(u64_at(e, 16), last.version, "{name}: last_version");
        assert_eq!(u64_at(e, 24), last.position, "{name}: last_position");
        assert_eq!(Some(u64_at(e, 32)), last_seg, "{name}: last_segment");
        seen.push(name.to_owned());
        at += 56 + name_len;
    }
    assert_eq!(at, trailer, "the entries end at the trailer");
    let mut streams: Vec<String> = m.events.iter().map(|e| e.stream.clone()).collect();
    streams.sort();
    streams.dedup();
    seen.sort();
    assert_eq!(seen, streams, "one snapshot entry per stream");
}

/// Reads the whole log back through the API and compares it with the manifest.
fn check_contents(log: &Log, m: &Expected) {
    let n = m.events.len() as u64;
    assert_eq!(log.next_position(), Position(n));
    assert_eq!(log.log_id(), m.log_id);
    let all = log
        .read_all(Position(0), usize::MAX, Direction::Forward)
        .expect("reading the fixture log");
    assert_eq!(all.len(), m.events.len());
    for (got, e) in all.iter().zip(&m.events) {
        let (content_type, payload) = payload(e.position);
        let got_place = (
            got.position.0,
            got.stream(),
            got.version,
            got.event_id,
            got.record_time.0,
            got.record_hash,
        );
        let want_place = (
            e.position,
            e.stream.as_str(),
            e.version,
            e.event_id,
            e.record_time,
            e.record_hash,
        );
        assert_eq!(got_place, want_place, "event at position {}", e.position);
        let got_fields = (
            got.event_type(),
            got.schema_version,
            got.aggregate_type(),
            got.content_type,
            got.correlation_id(),
            got.causation_id(),
            got.actor(),
            got.event_time.0,
        );
        let want_fields = (
            e.event_type.as_str(),
            e.schema_version,
            e.aggregate_type.as_str(),
            content_type,
            e.correlation_id.as_str(),
            e.causation_id.as_str(),
            e.actor.as_str(),
            e.event_time,
        );
        assert_eq!(got_fields, want_fields, "event at position {}", e.position);
        assert_eq!(got.payload(), payload, "payload at position {}", e.position);
    }
    // By stream, both directions, and the stream table.
    let mut streams: Vec<&str> = m.events.iter().map(|e| e.stream.as_str()).collect();
    streams.sort_unstable();
    streams.dedup();
    for stream in streams {
        let want: Vec<&ExpectedEvent> = m.events.iter().filter(|e| e.stream == stream).collect();
        let got = log
            .read_stream(stream, 0, usize::MAX, Direction::Forward)
            .expect("reading the fixture log");
        let got: Vec<(u64, u64, EventId)> = got
            .iter()
            .map(|g| (g.version, g.position.0, g.event_id))
            .collect();
        let expected: Vec<(u64, u64, EventId)> = want
            .iter()
            .enumerate()
            .map(|(v, e)| (v as u64, e.position, e.event_id))
            .collect();
        assert_eq!(got, expected, "stream {stream}");
        let back = log
            .read_stream(stream, u64::MAX, usize::MAX, Direction::Backward)
            .expect("reading the fixture log");
        assert_eq!(back.len(), want.len(), "stream {stream} backwards");
        let info = log
            .stream_info(stream)
            .expect("stream_info")
            .expect("the stream exists");
        let last = want[want.len() - 1];
        assert_eq!(
            (
                info.last_version,
                info.last_position.0,
                info.first_position.0
            ),
            (last.version, last.position, want[0].position),
            "stream_info({stream})"
        );
        assert_eq!(info.created.0, want[0].record_time, "created of {stream}");
    }
    // The scan API with full chain verification.
    let mut scanned = 0u64;
    let visited = log
        .scan(Position(0), Verify::Chain, |r| {
            assert_eq!(r.record_hash, &m.events[r.position.0 as usize].record_hash);
            scanned += 1;
        })
        .expect("reading the fixture log");
    assert_eq!((visited, scanned), (n, n));
    // Segments and their Merkle roots.
    let segs = log.segments();
    assert_eq!(segs.len(), m.segments.len());
    for (got, want) in segs.iter().zip(&m.segments) {
        assert_eq!(
            (
                got.seq.0,
                got.base_position.0,
                got.record_count,
                got.sealed,
                got.merkle_root
            ),
            (
                want.seq,
                want.base_position,
                want.record_count,
                want.sealed,
                want.merkle_root
            ),
            "segment {}",
            want.seq
        );
    }
    let report = log.verify().expect("verify");
    assert_eq!(report.records, n);
    assert_eq!(report.segments, m.segments.len() as u64);
    assert_eq!(report.last_chain_hash, m.events[n as usize - 1].record_hash);
    assert_eq!(log.check_chain(2).expect("check_chain"), n);
}

#[test]
fn fixture_opens_reads_back_verifies_and_takes_appends() {
    let m = read_manifest();
    let tmp = copy_fixture();
    let log = Log::open(tmp.path(), opts(RecoveryMode::Strict)).unwrap();
    let r = log.recovery_report();
    assert!(r.clean, "the fixture was closed cleanly: {r:?}");
    assert!(r.truncations.is_empty(), "{r:?}");
    assert!(r.rebuilt_indexes.is_empty(), "{r:?}");
    assert!(r.sealed_on_open.is_empty(), "{r:?}");
    assert_eq!(r.records_scanned, 0, "{r:?}");
    check_contents(&log, &m);

    // The current code continues a version 1 log.
    let last = m.events.iter().rfind(|e| e.stream == "trade-1").unwrap();
    let more = log
        .append(
            "trade-1",
            ExpectedVersion::Exact(last.version),
            &[EventData::json("TradeAmended", r#"{"qty":"1"}"#)],
        )
        .unwrap();
    assert_eq!(more.first_position, Position(m.events.len() as u64));
    assert_eq!(more.first_version, last.version + 1);
    log.verify().unwrap();
    log.close().unwrap();

    let log = Log::open(tmp.path(), opts(RecoveryMode::Strict)).unwrap();
    assert!(log.recovery_report().clean);
    assert_eq!(log.next_position(), Position(m.events.len() as u64 + 1));
    log.verify().unwrap();
    log.close().unwrap();
}

#[test]
fn fixture_opens_read_only_without_changing_a_byte() {
    let m = read_manifest();
    let tmp = copy_fixture();
    let before = dir_contents(tmp.path());
    let log = Log::open(tmp.path(), opts(RecoveryMode::ReadOnly)).unwrap();
    assert!(log.recovery_report().truncations.is_empty());
    check_contents(&log, &m);
    assert!(matches!(
        log.append("trade-1", ExpectedVersion::Any, &[EventData::new("X", "y")]),
        Err(tally_engine::Error::ReadOnly)
    ));
    log.close().unwrap();
    assert_eq!(
        dir_contents(tmp.path()),
        before,
        "a read-only open changes nothing"
    );
}
