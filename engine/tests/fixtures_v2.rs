//! Golden fixture of format version 2: a log written once by the engine and checked in under
//! `engine/tests/fixtures/v2/log/`, with its expected contents in
//! `engine/tests/fixtures/v2/expected.tsv` and, beside `log/`, the files a verifier holds:
//! the checkpoint signing key (`log.key`, made from a fixed seed, and the key ledger the
//! engine keeps beside it), its public key (`log.pub`), a kept checkpoint note with the log's
//! signature and a witness's cosignature (`kept.note`), the witness's key (`witness.vkey`)
//! and the auditor's producer trust file (`producers.trust`).
//!
//! Scenario: every later version of the code must still open, read and verify a version 2
//! directory byte for byte (docs/FORMAT.md, "Version history"). The log holds what version
//! 2 adds: 88-byte record headers whose `stream_prev` links each stream's records across
//! segments, record times that never decrease, version 2 checkpoints that sign the stream
//! heads map, a witness cosignature in `tally.cosignatures`, and producer-signed batches
//! under a `$producers` policy.
//!
//! Method: the bytes of every file are decoded here with the offsets of docs/FORMAT.md
//! written out as numbers (not taken from the code's constants, which may move with a later
//! version); CRCs are recomputed with a CRC-32 written from the definition; the hash chain,
//! the Merkle roots, the stream heads map and the producers' batch statements are recomputed
//! here; every Ed25519 signature (checkpoints, cosignature, producer blocks, note lines) is
//! verified over a message built here from the documented layout. Then the fixture, copied to
//! a temporary directory, is opened read-write and read-only, read back completely, verified
//! with the trusted key, the kept note, the witness and the producer trust, its stream heads
//! are proven at every checkpoint, and it is appended to.
//!
//! The log's id, record times, checkpoint times and some event ids are random or time-based,
//! so the fixture cannot be regenerated identically. It was written once with
//! `TALLY_WRITE_FIXTURES=1 cargo test -p tally-engine --test fixtures_v2
//! write_fixture_when_asked`, which refuses to overwrite an existing fixture; a new format
//! version gets a new directory instead.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use tally_engine::format::chain::{body_hash, chain_seed, chain_step, merkle_root};
use tally_engine::format::checkpoint::{encode_secret_key, parse_public_keys};
use tally_engine::format::heads::stream_key;
use tally_engine::format::note::{Cosignature, Note, WitnessKey, checkpoint_from_note};
use tally_engine::index::SealedIndex;
use tally_engine::producers::ProducerTrust;
use tally_engine::witness::{LOGS_DIR, Observation, WITNESS_KEY_FILE, WITNESS_VKEY_FILE, Witness};
use tally_engine::{
    AppendRequest, AppendResult, ContentType, Direction, Error, EventData, EventId,
    ExpectedVersion, Log, Options, Position, RecoveryMode, Timestamp, Verify, VerifyOptions,
    VerifyReport, new_event_id, now, producer_signature,
};

/// The segment size the fixture was written with.
const SEGMENT_BYTES: u64 = 64 * 1024;

/// The first record header of the log: file offset 4096 of segment 0, 88 bytes.
const GOLDEN_FIRST_HEADER_HEX: &str = "2061a7719e010000ed0fb11000000000ffffffffffffffff0000000000000000ce4296d280d5ee180300010000000000000000000000000022ef3a23ab89056df4212391ea2231956aeaccc83756f3f11396a03cd540ca71";

/// Seed of the Ed25519 key that signs the fixture's checkpoints (`log.key`).
const LOG_KEY_SEED: [u8; 32] = [0x21; 32];
/// Seed of the producer's Ed25519 key (the OMS that signs the `oms-` batches).
const PRODUCER_SEED: [u8; 32] = [0x07; 32];
/// Seed of the witness's Ed25519 key.
const WITNESS_SEED: [u8; 32] = [0x57; 32];
/// The witness's key name.
const WITNESS_NAME: &str = "witness.example/fixture-v2";
/// The producer's name and the one stream prefix it signs for, which requires signatures.
const PRODUCER_NAME: &str = "oms";
const PRODUCER_PREFIX: &str = "oms-";
/// The checkpoint the witness cosigned and the auditor kept.
const WITNESSED_CHECKPOINT: u64 = 2;

/// Files beside `log/` (names relative to the fixture directory).
const KEY_FILE: &str = "log.key";
const LEDGER_FILE: &str = "log.key.ledger";
const PUBKEY_FILE: &str = "log.pub";
const KEPT_NOTE_FILE: &str = "kept.note";
const WITNESS_FILE: &str = "witness.vkey";
const TRUST_FILE: &str = "producers.trust";
/// Where the signing policy starts: the position after its `$SignaturesRequired` event,
/// as `tally producer require` prints it and the auditor's trust file says.
const POLICY_FROM: u64 = 18;
const MANIFEST_FILE: &str = "expected.tsv";

/// Record flags (docs/FORMAT.md 5.1), as numbers.
const BATCH_START: u16 = 1;
const BATCH_END: u16 = 2;
const PRODUCER_SIGNED: u16 = 32;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v2")
}

fn opts(recovery: RecoveryMode, key: &Path) -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        recovery,
        signing_key: Some(key.to_owned()),
        // Checkpoints only where the writer takes them, so that their ids and sizes are
        // known; no attribute index sidecars, which a background thread would write at a
        // time of its own.
        auto_checkpoints: false,
        index_attributes: false,
        format_version: 2,
        ..Options::default()
    }
}

/// The payload of the event at `position`. Part of the fixture's definition (the same as
/// version 1's): do not change.
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
// Small helpers: hex, CRC-32, little-endian reads at documented offsets, signatures.

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

fn blake3_of(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// Ed25519 (RFC 8032) with ed25519-dalek's `verify_strict`, as docs/FORMAT.md 17.1 says.
fn ed25519_verifies(public_key: &[u8; 32], message: &[u8], signature: &[u8]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(sig) = <[u8; 64]>::try_from(signature) else {
        return false;
    };
    key.verify_strict(message, &Signature::from_bytes(&sig))
        .is_ok()
}

fn public_of(seed: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(seed).verifying_key().to_bytes()
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
struct ExpectedCheckpoint {
    id: u64,
    tree_size: u64,
    time: u64,
    root: [u8; 32],
    chain_head: [u8; 32],
    stream_count: u64,
    streams_root: [u8; 32],
}

#[derive(Debug, Clone, PartialEq)]
struct ExpectedCosignature {
    checkpoint_id: u64,
    tree_size: u64,
    name: String,
    timestamp: u64,
    public_key: [u8; 32],
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
    /// `u64::MAX` for a stream's first event.
    stream_prev: u64,
    record_hash: [u8; 32],
    /// Events the producer signed, in the first record of a signed batch; 0 elsewhere.
    producer_count: u32,
    payload_len: usize,
    payload_crc: u32,
    /// The payload of an event not made by `payload(position)` (those of `$producers`).
    literal_payload: Option<Vec<u8>>,
}

impl ExpectedEvent {
    fn payload(&self) -> (ContentType, Vec<u8>) {
        match &self.literal_payload {
            Some(p) => (
                if self.content_type == 1 {
                    ContentType::Json
                } else {
                    ContentType::Binary
                },
                p.clone(),
            ),
            None => payload(self.position),
        }
    }
}

#[derive(Debug)]
struct Expected {
    log_id: [u8; 16],
    files: Vec<(String, u64)>,
    segments: Vec<ExpectedSegment>,
    checkpoints: Vec<ExpectedCheckpoint>,
    cosignatures: Vec<ExpectedCosignature>,
    events: Vec<ExpectedEvent>,
}

impl Expected {
    /// The batches of the log, as `(first position, event count)`, from the flags.
    fn batches(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for e in &self.events {
            if e.flags & BATCH_START != 0 {
                out.push((e.position, 0));
            }
            out.last_mut().expect("a batch is open").1 += 1;
        }
        out
    }

    fn signed_batches(&self) -> u64 {
        self.events.iter().filter(|e| e.producer_count > 0).count() as u64
    }

    fn streams(&self) -> Vec<&str> {
        let mut s: Vec<&str> = self.events.iter().map(|e| e.stream.as_str()).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The last event of `stream` among the first `tree_size` records.
    fn head(&self, stream: &str, tree_size: u64) -> Option<&ExpectedEvent> {
        self.events[..tree_size as usize]
            .iter()
            .rfind(|e| e.stream == stream)
    }

    fn checkpoint(&self, id: u64) -> &ExpectedCheckpoint {
        self.checkpoints
            .iter()
            .find(|c| c.id == id)
            .expect("a checkpoint of the manifest")
    }
}

const MANIFEST_HEAD: &str = "\
# Expected contents of the Tally format v2 golden fixture (see fixtures_v2.rs).
# Tab-separated. Lines:
#   log_id       <hex>
#   file         <path under fixtures/v2> <bytes>
#   segment      <seq> <base_position> <record_count> <sealed|active> <merkle_root hex or ->
#   checkpoint   <id> <tree_size> <time> <root hex> <chain_head hex> <stream_count>
#                <streams_root hex>
#   cosignature  <checkpoint_id> <tree_size> <witness name> <timestamp> <witness key hex>
#   event        <position> <stream> <version> <event_id> <event_type> <schema_version>
#                <aggregate_type> <content_type> <correlation_id> <causation_id> <actor>
#                <event_time> <record_time> <flags> <stream_prev or -> <record_hash hex>
#                <producer_count> <payload_len> <payload_crc32 hex> <payload hex or ->
# A payload of `-` is defined by `payload(position)` in fixtures_v2.rs; the events of the
# system stream $producers carry theirs in hex.
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
        if e.stream_prev == u64::MAX {
            "-".to_owned()
        } else {
            e.stream_prev.to_string()
        },
        hex(&e.record_hash),
        e.producer_count.to_string(),
        e.payload_len.to_string(),
        format!("{:08x}", e.payload_crc),
        e.literal_payload.as_deref().map_or("-".to_owned(), hex),
    ]
    .join("\t")
}

fn read_manifest() -> Expected {
    read_manifest_from(&fixture_dir())
}

/// The manifest in `root` (the golden fixture's, or a freshly written one's).
fn read_manifest_from(root: &Path) -> Expected {
    let text = std::fs::read_to_string(root.join(MANIFEST_FILE))
        .expect("engine/tests/fixtures/v2/expected.tsv");
    let mut log_id = None;
    let mut m = Expected {
        log_id: [0; 16],
        files: Vec::new(),
        segments: Vec::new(),
        checkpoints: Vec::new(),
        cosignatures: Vec::new(),
        events: Vec::new(),
    };
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        let num = |i: usize| -> u64 { f[i].parse().expect("a number") };
        match f[0] {
            "log_id" => log_id = Some(unhex(f[1]).try_into().expect("16 bytes")),
            "file" => m.files.push((f[1].to_owned(), num(2))),
            "segment" => m.segments.push(ExpectedSegment {
                seq: num(1),
                base_position: num(2),
                record_count: num(3),
                sealed: f[4] == "sealed",
                merkle_root: (f[5] != "-").then(|| hash32(f[5])),
            }),
            "checkpoint" => m.checkpoints.push(ExpectedCheckpoint {
                id: num(1),
                tree_size: num(2),
                time: num(3),
                root: hash32(f[4]),
                chain_head: hash32(f[5]),
                stream_count: num(6),
                streams_root: hash32(f[7]),
            }),
            "cosignature" => m.cosignatures.push(ExpectedCosignature {
                checkpoint_id: num(1),
                tree_size: num(2),
                name: f[3].to_owned(),
                timestamp: num(4),
                public_key: hash32(f[5]),
            }),
            "event" => {
                assert_eq!(f.len(), 21, "fields of {line:?}");
                m.events.push(ExpectedEvent {
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
                    stream_prev: if f[15] == "-" { u64::MAX } else { num(15) },
                    record_hash: hash32(f[16]),
                    producer_count: num(17) as u32,
                    payload_len: num(18) as usize,
                    payload_crc: u32::from_str_radix(f[19], 16).expect("hex"),
                    literal_payload: (f[20] != "-").then(|| unhex(f[20])),
                });
            }
            other => panic!("unknown manifest line kind {other:?}"),
        }
    }
    m.log_id = log_id.expect("a log_id line");
    // The manifest agrees with itself: dense positions, the payload generator, each
    // stream's versions and links, and signed batches only at batch starts.
    let mut heads: HashMap<&str, (u64, u64)> = HashMap::new();
    for (i, e) in m.events.iter().enumerate() {
        assert_eq!(
            e.position, i as u64,
            "manifest events are in position order"
        );
        let (ct, p) = e.payload();
        assert_eq!(
            (ct as u8, p.len(), crc32(&p)),
            (e.content_type, e.payload_len, e.payload_crc),
            "the payload of position {} is no longer the fixture's",
            e.position
        );
        let (version, prev) = match heads.get(e.stream.as_str()) {
            None => (0, u64::MAX),
            Some(&(v, p)) => (v + 1, p),
        };
        assert_eq!(
            (e.version, e.stream_prev),
            (version, prev),
            "manifest stream links at position {}",
            e.position
        );
        heads.insert(&e.stream, (e.version, e.position));
        assert_eq!(
            e.flags & PRODUCER_SIGNED != 0,
            e.producer_count > 0,
            "manifest producer_count at position {}",
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

/// The event at `position`. Part of the fixture's definition (the same as version 1's).
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

/// Appends the fixture's batches and remembers, per position, what the manifest says
/// about it beyond what the log reads back.
struct Writer<'a> {
    log: &'a Log,
    producer: SigningKey,
    versions: HashMap<String, u64>,
    position: u64,
    flags: Vec<u16>,
    producer_counts: Vec<u32>,
    literal: Vec<bool>,
}

impl Writer<'_> {
    fn expected(&self, stream: &str) -> ExpectedVersion {
        self.versions
            .get(stream)
            .map_or(ExpectedVersion::NoStream, |&v| ExpectedVersion::Exact(v))
    }

    /// One batch of `make_event`s: `parts` gives each stream and its number of events.
    fn append(&mut self, parts: &[(&str, usize)], signed: bool) {
        let mut events: Vec<Vec<EventData>> = Vec::new();
        let mut next = self.position;
        for &(_, n) in parts {
            events.push((0..n as u64).map(|i| make_event(next + i)).collect());
            next += n as u64;
        }
        let total = (next - self.position) as usize;
        let results: Vec<AppendResult> = match (signed, parts) {
            (false, _) => {
                let requests: Vec<AppendRequest<'_>> = parts
                    .iter()
                    .zip(&events)
                    .map(|(&(stream, _), evs)| AppendRequest {
                        stream,
                        expected: self.expected(stream),
                        events: evs,
                    })
                    .collect();
                self.log.append_multi(&requests).unwrap()
            }
            // One stream: the engine gives an event without an id or event time one
            // before the producer signs it.
            (true, [(stream, _)]) => vec![
                self.log
                    .append_signed(stream, self.expected(stream), &events[0], &self.producer)
                    .unwrap(),
            ],
            // Several streams: every event must carry its id and event time when signed.
            (true, _) => {
                let time = now();
                for e in events.iter_mut().flatten() {
                    e.event_id.get_or_insert_with(new_event_id);
                    e.event_time.get_or_insert(time);
                }
                let requests: Vec<AppendRequest<'_>> = parts
                    .iter()
                    .zip(&events)
                    .map(|(&(stream, _), evs)| AppendRequest {
                        stream,
                        expected: self.expected(stream),
                        events: evs,
                    })
                    .collect();
                let signature =
                    producer_signature(&self.log.log_id(), &requests, &self.producer).unwrap();
                self.log.append_multi_signed(&requests, &signature).unwrap()
            }
        };
        for (&(stream, _), r) in parts.iter().zip(&results) {
            self.versions.insert(stream.to_owned(), r.last_version);
        }
        assert_eq!(results[0].first_position, Position(self.position));
        for i in 0..total {
            let mut f = 0;
            if i == 0 {
                f |= BATCH_START;
            }
            if i + 1 == total {
                f |= BATCH_END;
            }
            if signed && i == 0 {
                f |= PRODUCER_SIGNED;
            }
            self.flags.push(f);
            self.producer_counts
                .push(if signed && i == 0 { total as u32 } else { 0 });
            self.literal.push(false);
        }
        self.position = next;
        assert_eq!(self.log.next_position(), Position(self.position));
    }

    /// An event of `$producers` the engine wrote as a batch of its own.
    fn system(&mut self, r: AppendResult) {
        assert_eq!(r.first_position, Position(self.position));
        self.flags.push(BATCH_START | BATCH_END);
        self.producer_counts.push(0);
        self.literal.push(true);
        self.position += 1;
    }
}

/// A witness with the fixed key observes checkpoint `id` (the log's newest at the time) as
/// the first of the log's history, and its cosignature is handed back to the log.
fn cosign(log: &Log, id: u64, log_key: [u8; 32]) -> Cosignature {
    let wtmp = tempfile::tempdir().unwrap();
    let wdir = wtmp.path();
    std::fs::create_dir_all(wdir.join(LOGS_DIR)).unwrap();
    let key = SigningKey::from_bytes(&WITNESS_SEED);
    std::fs::write(wdir.join(WITNESS_KEY_FILE), encode_secret_key(&key)).unwrap();
    let vkey = WitnessKey {
        name: WITNESS_NAME.to_owned(),
        public_key: key.verifying_key().to_bytes(),
    };
    std::fs::write(wdir.join(WITNESS_VKEY_FILE), format!("{}\n", vkey.encode())).unwrap();
    let witness = Witness::open(wdir).unwrap();
    witness.register(&log.log_id(), &[log_key]).unwrap();
    let note = log.checkpoint_note(Some(id)).unwrap().unwrap();
    let obs = witness
        .observe(&note, &mut |old, new| log.prove_consistency(old, new))
        .unwrap();
    let Observation::Cosigned { cosignature, .. } = obs else {
        panic!("a first observation is cosigned: {obs:?}");
    };
    assert!(log.add_cosignature(id, &cosignature).unwrap());
    cosignature
}

/// Every file under `root`, recursively, with its path relative to `root` ('/'-separated)
/// and its bytes, sorted by path.
fn files_under(root: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).expect("listing a directory") {
            let e = e.expect("a directory entry");
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under the root");
                let name = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                out.push((name, std::fs::read(&path).expect("reading a file")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// With `TALLY_WRITE_FIXTURES=1`, writes the golden fixture (once). Always, writes the same
/// kind of log into a temporary directory and holds it to the byte-level checks the golden
/// fixture passes, so that the generator and those checks cannot drift apart unnoticed.
#[test]
fn write_fixture_when_asked() {
    if std::env::var("TALLY_WRITE_FIXTURES").as_deref() == Ok("1") {
        write_fixture(&fixture_dir());
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("v2");
    write_fixture(&root);
    let m = read_manifest_from(&root);
    check_documented_offsets(&root, &m);
}

/// Writes a version 2 log with the fixture's events, keys, checkpoints and cosignatures, and
/// its manifest, into `dir`.
fn write_fixture(dir: &Path) {
    let dir = dir.to_owned();
    assert!(
        !dir.exists(),
        "{} exists: a golden fixture is written once (delete it to start over, and update \
         GOLDEN_FIRST_HEADER_HEX)",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap();
    let key_path = dir.join(KEY_FILE);
    let log_key = SigningKey::from_bytes(&LOG_KEY_SEED);
    let log_public = log_key.verifying_key().to_bytes();
    std::fs::write(&key_path, encode_secret_key(&log_key)).unwrap();
    let log_dir = dir.join("log");
    let log = Log::open(&log_dir, opts(RecoveryMode::Strict, &key_path)).unwrap();
    assert_eq!(log.public_key(), Some(log_public));
    let producer = SigningKey::from_bytes(&PRODUCER_SEED);
    let mut w = Writer {
        log: &log,
        producer: producer.clone(),
        versions: HashMap::new(),
        position: 0,
        flags: Vec::new(),
        producer_counts: Vec::new(),
        literal: Vec::new(),
    };
    let streams = ["trade-1", "trade-2", "konto-ø1", "audit"];
    let mut cosignature = None;
    let mut settled_late = false;
    for batch in 0usize.. {
        let segs = log.segments();
        if segs.len() >= 4 && segs[segs.len() - 1].record_count >= 12 {
            break;
        }
        // Checkpoint 1 just after the first roll; checkpoint 2 after the second, which the
        // witness cosigns while it is the newest.
        if segs.len() >= 2 && log.checkpoint_count() == 0 {
            log.checkpoint().unwrap();
        }
        if segs.len() >= 3 && log.checkpoint_count() == 1 {
            let cp = log.checkpoint().unwrap();
            assert_eq!(cp.statement.id, WITNESSED_CHECKPOINT);
            cosignature = Some(cosign(&log, cp.statement.id, log_public));
        }
        // A stream written in the first segment and next in the active one: its link
        // skips whole segments.
        if segs.len() >= 4 && !settled_late {
            settled_late = true;
            w.append(&[("settle-1", 1), ("trade-2", 1)], false);
            continue;
        }
        match batch {
            2 => w.append(&[("settle-1", 2)], false),
            3 => w.system(
                log.register_producer_key(
                    producer.verifying_key().to_bytes(),
                    PRODUCER_NAME,
                    &[PRODUCER_PREFIX.to_owned()],
                    "alice@desk",
                    "OMS go-live: the OMS signs its trade events",
                )
                .unwrap(),
            ),
            // Before the policy, the OMS's streams take unsigned batches.
            5 => w.append(&[("oms-7", 2)], false),
            8 => {
                let r = log
                    .require_signatures(
                        PRODUCER_PREFIX,
                        "alice@desk",
                        "MiFID II: OMS events signed at source",
                    )
                    .unwrap();
                assert_eq!(r.first_position.0 + 1, POLICY_FROM);
                w.system(r);
            }
            b if b > 8 && b % 4 == 2 => match b % 12 {
                2 => w.append(&[("oms-7", 2), ("oms-8", 1)], true),
                6 => w.append(&[("oms-8", 1)], true),
                _ => w.append(&[("oms-7", 3)], true),
            },
            // One stream per batch, a multi-stream batch now and then; 1 to 4 events.
            b if b % 9 == 5 => w.append(&[(streams[b % 4], 2), (streams[(b + 1) % 4], 1)], false),
            b => w.append(&[(streams[b % 4], [1, 3, 2, 1, 4, 2][b % 6])], false),
        }
    }
    log.wait_sealed().unwrap();
    let last = log.checkpoint().unwrap();
    assert_eq!(last.statement.tree_size, w.position);
    let cosignature = cosignature.expect("the witness cosigned a checkpoint");
    let kept_note = log
        .checkpoint_note(Some(WITNESSED_CHECKPOINT))
        .unwrap()
        .unwrap();
    assert_eq!(kept_note.signatures.len(), 2, "the log's and the witness's");
    let events = log
        .read_all(Position(0), usize::MAX, Direction::Forward)
        .unwrap();
    let segments = log.segments();
    let checkpoints = log.checkpoints();
    let log_id = log.log_id();
    let (flags, producer_counts, literal) = (w.flags, w.producer_counts, w.literal);
    log.close().unwrap();
    std::fs::remove_file(log_dir.join("tally.lock")).unwrap();

    // What a verifier holds beside the directory.
    std::fs::write(dir.join(KEPT_NOTE_FILE), kept_note.encode()).unwrap();
    std::fs::write(
        dir.join(PUBKEY_FILE),
        format!(
            "# The key that signs the checkpoints of the v2 fixture log.\n{}\n",
            hex(&log_public)
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join(WITNESS_FILE),
        format!("{}\n", cosignature.witness().encode()),
    )
    .unwrap();
    std::fs::write(
        dir.join(TRUST_FILE),
        format!(
            "# The auditor's producer trust file for the v2 fixture log.\nkey {PRODUCER_NAME} {} {PRODUCER_PREFIX}\nrequire {PRODUCER_PREFIX} from {POLICY_FROM}\n",
            hex(&producer.verifying_key().to_bytes())
        ),
    )
    .unwrap();

    let mut out = String::from(MANIFEST_HEAD);
    out.push_str(&format!("log_id\t{}\n", hex(&log_id)));
    for (name, bytes) in files_under(&dir) {
        out.push_str(&format!("file\t{name}\t{}\n", bytes.len()));
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
    for cp in &checkpoints {
        let s = &cp.statement;
        let (count, root) = s.streams.expect("a version 2 statement");
        out.push_str(&format!(
            "checkpoint\t{}\t{}\t{}\t{}\t{}\t{count}\t{}\n",
            s.id,
            s.tree_size,
            s.time.0,
            hex(&s.root),
            hex(&s.chain_head),
            hex(&root)
        ));
    }
    out.push_str(&format!(
        "cosignature\t{WITNESSED_CHECKPOINT}\t{}\t{}\t{}\t{}\n",
        checkpoints[WITNESSED_CHECKPOINT as usize - 1]
            .statement
            .tree_size,
        cosignature.name,
        cosignature.timestamp,
        hex(&cosignature.public_key)
    ));
    let mut heads: HashMap<String, u64> = HashMap::new();
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
        let p = e.position.0 as usize;
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
            flags: flags[p],
            stream_prev: heads
                .insert(e.stream().to_owned(), e.position.0)
                .unwrap_or(u64::MAX),
            record_hash: e.record_hash,
            producer_count: producer_counts[p],
            payload_len: e.payload().len(),
            payload_crc: crc32(e.payload()),
            literal_payload: literal[p].then(|| e.payload().to_vec()),
        });
        out.push_str(&line);
        out.push('\n');
    }
    std::fs::write(dir.join(MANIFEST_FILE), out).unwrap();
    let seg0 = std::fs::read(log_dir.join("00000000000000000000.seg")).unwrap();
    println!("GOLDEN_FIRST_HEADER_HEX = {}", hex(&seg0[4096..4096 + 88]));
}

// ---------------------------------------------------------------------------------------
// Checking the fixture: the files.

/// Copies the whole fixture directory (the log, the key and its ledger, the notes) to a
/// fresh temporary directory: tests open only copies, never the checked-in files.
fn copy_fixture() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    for (name, bytes) in files_under(&fixture_dir()) {
        let to = tmp.path().join(&name);
        std::fs::create_dir_all(to.parent().expect("a parent")).expect("a directory");
        std::fs::write(&to, bytes).expect("copying a fixture file");
    }
    tmp
}

#[test]
fn fixture_directory_is_as_the_engine_left_it() {
    let m = read_manifest();
    let on_disk: Vec<(String, u64)> = files_under(&fixture_dir())
        .into_iter()
        .filter(|(n, _)| n != MANIFEST_FILE)
        .map(|(n, b)| (n, b.len() as u64))
        .collect();
    assert_eq!(on_disk, m.files);
    // What the fixture is meant to hold.
    assert!(
        m.segments.iter().filter(|s| s.sealed).count() >= 3,
        "the fixture has sealed segments"
    );
    assert!(
        m.segments
            .last()
            .is_some_and(|s| !s.sealed && s.record_count > 0),
        "the fixture has an active segment with records"
    );
    let segment_of = |p: u64| {
        m.segments
            .iter()
            .rfind(|s| s.base_position <= p)
            .expect("a segment")
            .seq
    };
    assert!(
        m.events
            .iter()
            .filter(|e| e.stream_prev != u64::MAX)
            .any(|e| segment_of(e.stream_prev) + 1 < segment_of(e.position)),
        "a stream link skips a whole segment"
    );
    assert!(m.streams().len() >= 6, "several streams");
    let batches = m.batches();
    assert!(batches.iter().any(|b| b.1 >= 3), "multi-event batches");
    assert!(m.signed_batches() >= 5, "signed batches");
    assert!(
        m.events.iter().any(|e| e.producer_count >= 3),
        "a signed batch of several events"
    );
    assert!(m.checkpoints.len() >= 3, "checkpoints");
    assert_eq!(
        m.checkpoints.last().map(|c| c.tree_size),
        Some(m.events.len() as u64),
        "the last checkpoint covers the whole log"
    );
    assert_eq!(m.cosignatures.len(), 1, "one witness cosignature");
    let total: usize = files_under(&fixture_dir()).iter().map(|f| f.1.len()).sum();
    assert!(total < 400 * 1024, "the fixture directory is {total} bytes");
}

#[test]
fn first_record_header_matches_its_golden_hex() {
    let m = read_manifest();
    let seg0 = std::fs::read(fixture_dir().join("log/00000000000000000000.seg")).unwrap();
    let h = &seg0[4096..4096 + 88];
    assert_eq!(
        hex(h),
        GOLDEN_FIRST_HEADER_HEX,
        "bytes 4096..4184 of segment 0"
    );
    let golden = unhex(GOLDEN_FIRST_HEADER_HEX);
    let e = &m.events[0];
    // docs/FORMAT.md, "Record header version 2", field by field.
    assert_eq!(u32_at(&golden, 0), crc32(&golden[4..88]), "header_crc");
    let body_len = u32_at(&golden, 4) as usize;
    let body = &seg0[4096 + 88..4096 + 88 + body_len];
    assert_eq!(u32_at(&golden, 8), crc32(body), "body_crc");
    assert_eq!(u32_at(&golden, 12), 0, "durable_lag of the first record");
    assert_eq!(
        u64_at(&golden, 16),
        u64::MAX,
        "stream_prev of a first event"
    );
    assert_eq!(u64_at(&golden, 24), 0, "stream_version");
    assert_eq!(u64_at(&golden, 32), e.record_time, "record_time");
    assert_eq!(u16_at(&golden, 40), 3, "flags: BATCH_START | BATCH_END");
    assert_eq!(u16_at(&golden, 42), 1, "kind: Event");
    assert_eq!(u32_at(&golden, 44), 0, "reserved");
    assert_eq!(u64_at(&golden, 48), 0, "position");
    assert_eq!(h32_at(&golden, 56), e.record_hash, "chain_hash");
    let seed = chain_seed(&m.log_id);
    assert_eq!(
        chain_step(&seed, &golden, &body_hash(body)),
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

/// What one record's decoding yields for the batch checks.
struct Decoded {
    /// File offset of the next record.
    end: usize,
    /// The envelope: the body after the producer block, if any.
    envelope: Vec<u8>,
    /// The producer block: public key, signature, event count.
    producer: Option<([u8; 32], [u8; 64], u32)>,
}

/// Decodes one record at `at` with the documented offsets (docs/FORMAT.md 5.3, 5.4, 6) and
/// checks it against the manifest.
fn check_record(seg: &[u8], at: usize, prev: &[u8; 32], e: &ExpectedEvent) -> Decoded {
    let h = &seg[at..at + 88];
    let ctx = format!("record {} at byte {at}", e.position);
    assert_eq!(u32_at(h, 0), crc32(&h[4..88]), "{ctx}: header_crc");
    let body_len = u32_at(h, 4) as usize;
    let body = &seg[at + 88..at + 88 + body_len];
    assert_eq!(u32_at(h, 8), crc32(body), "{ctx}: body_crc");
    let durable_lag = u64::from(u32_at(h, 12));
    assert!(durable_lag <= e.position, "{ctx}: durable_lag");
    assert_eq!(u64_at(h, 16), e.stream_prev, "{ctx}: stream_prev");
    assert_eq!(u64_at(h, 24), e.version, "{ctx}: stream_version");
    if e.version == 0 {
        assert_eq!(u64_at(h, 16), u64::MAX, "{ctx}: stream_prev of version 0");
    } else {
        assert!(u64_at(h, 16) < e.position, "{ctx}: stream_prev is earlier");
    }
    assert_eq!(u64_at(h, 32), e.record_time, "{ctx}: record_time");
    let flags = u16_at(h, 40);
    assert_eq!(flags, e.flags, "{ctx}: flags");
    assert_eq!(flags & !35, 0, "{ctx}: only the flags version 2 knows");
    assert_eq!(u16_at(h, 42), 1, "{ctx}: kind");
    assert_eq!(u32_at(h, 44), 0, "{ctx}: reserved");
    assert_eq!(u64_at(h, 48), e.position, "{ctx}: position");
    assert_eq!(h32_at(h, 56), e.record_hash, "{ctx}: chain_hash");
    assert_eq!(
        chain_step(prev, h, &body_hash(body)),
        e.record_hash,
        "{ctx}: chain"
    );

    // The producer block (docs/FORMAT.md, "Producer block") of a signed batch's first record.
    let (producer, env) = if flags & PRODUCER_SIGNED != 0 {
        assert_ne!(
            flags & BATCH_START,
            0,
            "{ctx}: a signed record starts a batch"
        );
        assert!(body_len >= 104, "{ctx}: room for the producer block");
        let block = &body[..104];
        assert_eq!(u32_at(block, 96), e.producer_count, "{ctx}: event_count");
        assert_eq!(u32_at(block, 100), 0, "{ctx}: producer block reserved");
        (
            Some((
                h32_at(block, 0),
                block[32..96].try_into().expect("64 bytes"),
                u32_at(block, 96),
            )),
            &body[104..],
        )
    } else {
        (None, body)
    };

    // The envelope.
    assert_eq!(env[..16], e.event_id.0, "{ctx}: event_id");
    assert_eq!(u64_at(env, 16), e.event_time, "{ctx}: event_time");
    assert_eq!(u32_at(env, 24), e.schema_version, "{ctx}: schema_version");
    assert_eq!(env[28], e.content_type, "{ctx}: content_type");
    assert_eq!(env[29], 0, "{ctx}: reserved");
    assert_eq!(u16_at(env, 42), 0, "{ctx}: reserved");
    let (_, payload) = e.payload();
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
            usize::from(u16_at(env, 30 + 2 * i))
        } else {
            u32_at(env, 44) as usize
        };
        assert_eq!(len, f.len(), "{ctx}: length of variable field {i}");
        assert_eq!(
            &env[field_at..field_at + len],
            *f,
            "{ctx}: variable field {i}"
        );
        field_at += len;
    }
    assert_eq!(field_at, env.len(), "{ctx}: the envelope fills the body");
    let end = (at + 88 + body_len).next_multiple_of(8);
    assert!(is_zero(&seg[at + 88 + body_len..end]), "{ctx}: padding");
    Decoded {
        end,
        envelope: env.to_vec(),
        producer,
    }
}

/// The 72-byte batch statement a producer signs (docs/FORMAT.md, "Batch statement").
fn batch_statement(log_id: &[u8; 16], envelopes: &[Vec<u8>]) -> [u8; 72] {
    let mut digest = blake3::Hasher::new();
    for env in envelopes {
        digest.update(&blake3_of(env));
    }
    let mut s = [0u8; 72];
    s[..8].copy_from_slice(b"TALLYPSB");
    s[8..10].copy_from_slice(&1u16.to_le_bytes());
    s[16..32].copy_from_slice(log_id);
    s[32..36].copy_from_slice(&(envelopes.len() as u32).to_le_bytes());
    s[40..72].copy_from_slice(digest.finalize().as_bytes());
    s
}

/// A batch being decoded: its first position, record time, producer block and envelopes.
struct OpenBatch {
    first: u64,
    record_time: u64,
    producer: Option<([u8; 32], [u8; 64], u32)>,
    envelopes: Vec<Vec<u8>>,
}

#[test]
fn fixture_bytes_decode_with_the_documented_offsets() {
    check_documented_offsets(&fixture_dir(), &read_manifest());
}

/// Decodes the log under `root` (a fixture directory) with the offsets docs/FORMAT.md gives
/// and checks it against the manifest `m`.
fn check_documented_offsets(root: &Path, m: &Expected) {
    let dir = root.join("log");
    let producer_key = public_of(&PRODUCER_SEED);

    // tally.meta
    let meta = std::fs::read(dir.join("tally.meta")).unwrap();
    assert_eq!(meta.len(), 64, "tally.meta: length");
    assert_eq!(&meta[..8], b"TALLYLOG", "tally.meta: magic");
    assert_eq!(
        (u16_at(&meta, 8), u16_at(&meta, 10)),
        (2, 64),
        "tally.meta: format_version, meta_len"
    );
    assert!(
        is_zero(&meta[12..16]) && is_zero(&meta[40..60]),
        "tally.meta: reserved"
    );
    assert_eq!(meta[16..32], m.log_id, "tally.meta: log_id");
    let created = u64_at(&meta, 32);
    assert!(
        created > 0 && created <= m.events[0].record_time,
        "created_time"
    );
    assert_eq!(
        u32_at(&meta, 60),
        crc32(&meta[..60]),
        "tally.meta: meta_crc"
    );

    let mut chain = chain_seed(&m.log_id);
    let mut position = 0u64;
    let mut last_time = 0u64;
    let mut signed_batches = 0u64;
    for s in &m.segments {
        let name = format!("{:020}.seg", s.seq);
        let seg = std::fs::read(dir.join(&name)).unwrap();
        assert_eq!(seg.len() as u64, SEGMENT_BYTES, "{name}");
        // Segment header.
        assert_eq!(&seg[..8], b"TALLYSEG", "{name}");
        assert_eq!((u16_at(&seg, 8), u16_at(&seg, 10)), (2, 128), "{name}");
        assert!(is_zero(&seg[12..16]) && is_zero(&seg[96..124]), "{name}");
        assert_eq!(seg[16..32], m.log_id, "{name}: log_id");
        assert_eq!(u64_at(&seg, 32), s.seq, "{name}: seq");
        assert_eq!(u64_at(&seg, 40), s.base_position, "{name}: base_position");
        assert_eq!(s.base_position, position, "{name}: continues the log");
        assert!(u64_at(&seg, 48) >= created, "{name}: created_time");
        assert_eq!(u64_at(&seg, 56), SEGMENT_BYTES, "{name}: capacity");
        assert_eq!(h32_at(&seg, 64), chain, "{name}: prev_chain_hash");
        assert_eq!(u32_at(&seg, 124), crc32(&seg[..124]), "{name}: header_crc");
        assert!(is_zero(&seg[128..4096]), "{name}: header page");

        // Records, batch by batch.
        let footer_at = seg.len() - 4096;
        let mut at = 4096;
        let mut hashes = Vec::new();
        let mut batch: Option<OpenBatch> = None;
        for _ in 0..s.record_count {
            let e = &m.events[position as usize];
            let d = check_record(&seg, at, &chain, e);
            assert!(
                e.record_time >= last_time,
                "record {position}: record time decreases"
            );
            last_time = e.record_time;
            if e.flags & BATCH_START != 0 {
                assert!(
                    batch.is_none(),
                    "record {position}: batch start inside a batch"
                );
                batch = Some(OpenBatch {
                    first: position,
                    record_time: e.record_time,
                    producer: d.producer,
                    envelopes: Vec::new(),
                });
            }
            let b = batch
                .as_mut()
                .unwrap_or_else(|| panic!("record {position} outside a batch"));
            assert_eq!(
                e.record_time, b.record_time,
                "record {position}: one record time per batch"
            );
            b.envelopes.push(d.envelope);
            if e.flags & BATCH_END != 0 {
                let b = batch.take().expect("an open batch");
                if let Some((key, signature, count)) = b.producer {
                    let ctx = format!("signed batch at position {}", b.first);
                    assert_eq!(key, producer_key, "{ctx}: the producer's key");
                    assert_eq!(count as usize, b.envelopes.len(), "{ctx}: event_count");
                    let statement = batch_statement(&m.log_id, &b.envelopes);
                    assert!(
                        ed25519_verifies(&key, &statement, &signature),
                        "{ctx}: the producer's signature over the batch statement"
                    );
                    signed_batches += 1;
                }
            }
            at = d.end;
            chain = e.record_hash;
            hashes.push(chain);
            position += 1;
        }
        assert!(batch.is_none(), "{name}: a batch spans two segments");
        let data_end = at;
        assert!(
            is_zero(&seg[data_end..footer_at]),
            "{name}: zeros after data"
        );

        // Footer.
        let f = &seg[footer_at..];
        if s.sealed {
            assert_eq!(&f[..8], b"TALLYFTR", "{name}");
            assert_eq!((u16_at(f, 8), u16_at(f, 10)), (2, 192), "{name}");
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

        // Index sidecar (a structure of version 1 in both formats): header fields at the
        // documented offsets, then the decoder.
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
        assert_eq!(
            u64_at(&idx, 112),
            m.events[position as usize - 1].record_time,
            "{idx_name}: last_record_time"
        );
        assert!(is_zero(&idx[120..128]), "{idx_name}: reserved");
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
    assert_eq!(
        signed_batches,
        m.signed_batches(),
        "signed batches found in the records"
    );

    // Spare segments: all zero.
    for (name, _) in &m.files {
        let seq: Option<u64> = name
            .strip_prefix("log/")
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|d| d.parse().ok());
        if seq.is_some_and(|q| m.segments.iter().all(|s| s.seq != q)) {
            let bytes = std::fs::read(root.join(name)).unwrap();
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
    let mut streams: Vec<String> = m.streams().into_iter().map(str::to_owned).collect();
    streams.sort();
    seen.sort();
    assert_eq!(seen, streams, "one snapshot entry per stream");
}

// ---------------------------------------------------------------------------------------
// Checkpoints, the stream heads map, notes, cosignatures and the key files.

/// The root of the stream heads map (docs/FORMAT.md 15.5) of `entries` (key, last
/// version, last position), all sharing their first `depth` key bits, from the definition.
fn heads_root(entries: &[([u8; 32], u64, u64)], depth: usize) -> [u8; 32] {
    match entries {
        [] => [0; 32],
        [(k, v, p)] => {
            let mut b = vec![0x02];
            b.extend_from_slice(k);
            b.extend_from_slice(&v.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
            blake3_of(&b)
        }
        _ => {
            let bit = |k: &[u8; 32]| k[depth / 8] & (0x80 >> (depth % 8)) != 0;
            let (zeros, ones): (Vec<_>, Vec<_>) = entries.iter().copied().partition(|e| !bit(&e.0));
            let mut b = vec![0x03];
            b.extend_from_slice(&heads_root(&zeros, depth + 1));
            b.extend_from_slice(&heads_root(&ones, depth + 1));
            blake3_of(&b)
        }
    }
}

/// The stream count and heads map root of the first `tree_size` records of the manifest.
fn stream_heads(m: &Expected, tree_size: u64) -> (u64, [u8; 32]) {
    let entries: Vec<([u8; 32], u64, u64)> = m
        .streams()
        .into_iter()
        .filter_map(|s| m.head(s, tree_size))
        .map(|e| (blake3_of(e.stream.as_bytes()), e.version, e.position))
        .collect();
    (entries.len() as u64, heads_root(&entries, 0))
}

/// A checkpoint's note body (docs/FORMAT.md 17.9): what a version 2 checkpoint's signature
/// and a witness's cosignature cover.
fn note_body(log_id: &[u8; 16], cp: &ExpectedCheckpoint) -> String {
    format!(
        "tally/{}\n{}\n{}\nhash blake3\ncheckpoint {}\ntime {}\nchain-head {}\nstreams {} {}\n",
        hex(log_id),
        cp.tree_size,
        B64.encode(cp.root),
        cp.id,
        cp.time,
        B64.encode(cp.chain_head),
        cp.stream_count,
        B64.encode(cp.streams_root)
    )
}

/// A signed-note key ID (docs/FORMAT.md 17.9): SHA-256 over the key name, a newline, the
/// signature type and the public key, first 4 bytes.
fn note_key_id(name: &str, sig_type: u8, public_key: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([sig_type]);
    h.update(public_key);
    h.finalize()[..4].try_into().expect("4 bytes")
}

#[test]
fn checkpoint_entries_decode_and_verify_with_the_documented_offsets() {
    let m = read_manifest();
    let log_key = public_of(&LOG_KEY_SEED);
    let file = std::fs::read(fixture_dir().join("log/tally.checkpoints")).unwrap();
    assert_eq!(file.len(), 264 * m.checkpoints.len(), "264-byte entries");
    let hashes: Vec<[u8; 32]> = m.events.iter().map(|e| e.record_hash).collect();
    for (i, (entry, cp)) in file.chunks(264).zip(&m.checkpoints).enumerate() {
        let ctx = format!("checkpoint entry {i}");
        // The statement, docs/FORMAT.md "Checkpoint statement version 2".
        assert_eq!(&entry[..8], b"TALLYCKP", "{ctx}: magic");
        assert_eq!(u16_at(entry, 8), 2, "{ctx}: version");
        assert!(is_zero(&entry[10..16]), "{ctx}: reserved");
        assert_eq!(entry[16..32], m.log_id, "{ctx}: log_id");
        assert_eq!(u64_at(entry, 32), i as u64 + 1, "{ctx}: checkpoint_id");
        assert_eq!(u64_at(entry, 32), cp.id, "{ctx}: checkpoint_id");
        assert_eq!(u64_at(entry, 40), cp.tree_size, "{ctx}: tree_size");
        assert_eq!(u64_at(entry, 48), cp.time, "{ctx}: time");
        assert_eq!(h32_at(entry, 56), cp.root, "{ctx}: root");
        assert_eq!(h32_at(entry, 88), cp.chain_head, "{ctx}: chain_head");
        assert_eq!(u64_at(entry, 120), cp.stream_count, "{ctx}: stream_count");
        assert_eq!(h32_at(entry, 128), cp.streams_root, "{ctx}: streams_root");
        // The entry's tail after 160 statement bytes.
        assert_eq!(h32_at(entry, 160), log_key, "{ctx}: public_key");
        assert_eq!(u32_at(entry, 256), crc32(&entry[..256]), "{ctx}: entry_crc");
        assert!(is_zero(&entry[260..264]), "{ctx}: reserved");
        // What the statement says, recomputed from the records.
        let size = cp.tree_size as usize;
        assert!(
            size > 0 && size <= hashes.len(),
            "{ctx}: tree_size in range"
        );
        assert_eq!(
            merkle_root(&hashes[..size]),
            cp.root,
            "{ctx}: root of the records"
        );
        assert_eq!(hashes[size - 1], cp.chain_head, "{ctx}: chain head");
        assert_eq!(
            stream_heads(&m, cp.tree_size),
            (cp.stream_count, cp.streams_root),
            "{ctx}: stream heads map of the records"
        );
        // The signature: Ed25519 over the note body (docs/FORMAT.md 17.2, 17.9).
        assert!(
            ed25519_verifies(
                &log_key,
                note_body(&m.log_id, cp).as_bytes(),
                &entry[192..256]
            ),
            "{ctx}: signature over the note body"
        );
    }
    let sizes: Vec<u64> = m.checkpoints.iter().map(|c| c.tree_size).collect();
    assert!(
        sizes.windows(2).all(|w| w[0] < w[1]),
        "the checkpoints grow: {sizes:?}"
    );
}

#[test]
fn cosignature_entry_decodes_and_verifies_with_the_documented_offsets() {
    let m = read_manifest();
    let file = std::fs::read(fixture_dir().join("log/tally.cosignatures")).unwrap();
    assert_eq!(file.len(), 256 * m.cosignatures.len(), "256-byte entries");
    let witness_key = public_of(&WITNESS_SEED);
    for (entry, c) in file.chunks(256).zip(&m.cosignatures) {
        let cp = m.checkpoint(c.checkpoint_id);
        // docs/FORMAT.md, "Cosignature entry".
        assert_eq!(&entry[..8], b"TALLYCOS", "magic");
        assert_eq!(u16_at(entry, 8), 1, "version");
        let name_len = usize::from(u16_at(entry, 10));
        assert!(name_len <= 64, "name_len");
        assert!(is_zero(&entry[12..16]), "reserved");
        assert_eq!(u64_at(entry, 16), c.checkpoint_id, "checkpoint_id");
        assert_eq!(u64_at(entry, 24), c.tree_size, "tree_size");
        assert_eq!(
            u64_at(entry, 24),
            cp.tree_size,
            "the checkpoint's tree_size"
        );
        assert_eq!(h32_at(entry, 32), cp.root, "the checkpoint's root");
        assert_eq!(h32_at(entry, 64), c.public_key, "public_key");
        assert_eq!(h32_at(entry, 64), witness_key, "the witness's key");
        assert_eq!(u64_at(entry, 96), c.timestamp, "timestamp");
        assert_eq!(&entry[168..168 + name_len], c.name.as_bytes(), "name");
        assert_eq!(c.name, WITNESS_NAME);
        assert!(is_zero(&entry[168 + name_len..232]), "zeros after the name");
        assert!(is_zero(&entry[232..252]), "reserved");
        assert_eq!(u32_at(entry, 252), crc32(&entry[..252]), "entry_crc");
        let message = format!(
            "cosignature/v1\ntime {}\n{}",
            c.timestamp,
            note_body(&m.log_id, cp)
        );
        assert!(
            ed25519_verifies(&witness_key, message.as_bytes(), &entry[104..168]),
            "the witness's signature over the checkpoint's note body"
        );
    }
}

#[test]
fn key_files_and_kept_note_are_what_the_log_signed() {
    let m = read_manifest();
    let dir = fixture_dir();
    let log_key = public_of(&LOG_KEY_SEED);
    // The secret key file (docs/FORMAT.md 17.6), made from the fixed seed.
    assert_eq!(
        std::fs::read_to_string(dir.join(KEY_FILE)).unwrap(),
        format!("tally-ed25519-secret-key-v1\n{}\n", hex(&LOG_KEY_SEED)),
        "log.key"
    );
    // The public key file: comments, then the key.
    let pubs: Vec<String> = std::fs::read_to_string(dir.join(PUBKEY_FILE))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    assert_eq!(pubs, vec![hex(&log_key)], "log.pub");
    // The key ledger the engine keeps beside the key (docs/FORMAT.md 17.8).
    let last = m.checkpoints.last().unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join(LEDGER_FILE)).unwrap(),
        format!(
            "tally-key-ledger v1\n{} {} {} {}\n",
            hex(&m.log_id),
            last.id,
            last.tree_size,
            hex(&last.root)
        ),
        "log.key.ledger"
    );
    // The witness's vkey (docs/FORMAT.md 17.9): name, key ID, base64 of 0x04 and the key.
    let witness_key = public_of(&WITNESS_SEED);
    let mut raw = vec![0x04];
    raw.extend_from_slice(&witness_key);
    assert_eq!(
        std::fs::read_to_string(dir.join(WITNESS_FILE)).unwrap(),
        format!(
            "{WITNESS_NAME}+{}+{}\n",
            hex(&note_key_id(WITNESS_NAME, 0x04, &witness_key)),
            B64.encode(raw)
        ),
        "witness.vkey"
    );
    // The producer trust file.
    assert_eq!(
        std::fs::read_to_string(dir.join(TRUST_FILE))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        vec![
            format!(
                "key {PRODUCER_NAME} {} {PRODUCER_PREFIX}",
                hex(&public_of(&PRODUCER_SEED))
            ),
            format!("require {PRODUCER_PREFIX} from {POLICY_FROM}"),
        ],
        "producers.trust"
    );

    // The kept note: the witnessed checkpoint's body, the log's signature line and the
    // witness's cosignature line, decoded by hand (docs/FORMAT.md 17.9).
    let cp = m.checkpoint(WITNESSED_CHECKPOINT);
    let entries = std::fs::read(dir.join("log/tally.checkpoints")).unwrap();
    let entry = &entries[264 * (cp.id as usize - 1)..][..264];
    let cosig = &m.cosignatures[0];
    let cosig_entry = std::fs::read(dir.join("log/tally.cosignatures")).unwrap();
    let note = std::fs::read_to_string(dir.join(KEPT_NOTE_FILE)).unwrap();
    let body = note_body(&m.log_id, cp);
    let rest = note
        .strip_prefix(&body)
        .expect("the note starts with the checkpoint's body");
    let lines: Vec<&str> = rest
        .strip_prefix('\n')
        .expect("a blank line")
        .lines()
        .collect();
    assert_eq!(lines.len(), 2, "two signature lines: {lines:?}");
    let origin = format!("tally/{}", hex(&m.log_id));
    let mut log_sig = note_key_id(&origin, 0x01, &log_key).to_vec();
    log_sig.extend_from_slice(&entry[192..256]);
    assert_eq!(
        lines[0],
        format!("\u{2014} {origin} {}", B64.encode(log_sig)),
        "the log's signature line"
    );
    let mut witness_sig = note_key_id(WITNESS_NAME, 0x04, &witness_key).to_vec();
    // c2sp.org/tlog-cosignature writes the time big-endian.
    #[allow(clippy::big_endian_bytes)]
    witness_sig.extend_from_slice(&cosig.timestamp.to_be_bytes());
    witness_sig.extend_from_slice(&cosig_entry[104..168]);
    assert_eq!(
        lines[1],
        format!("\u{2014} {WITNESS_NAME} {}", B64.encode(witness_sig)),
        "the witness's cosignature line"
    );
}

#[test]
fn merkle_node_file_holds_the_roots_of_the_records() {
    let m = read_manifest();
    let tree = std::fs::read(fixture_dir().join("log/merkle.tree")).unwrap();
    // docs/FORMAT.md, "Node file header".
    assert_eq!(&tree[..8], b"TALLYMT1", "magic");
    assert_eq!(u16_at(&tree, 8), 1, "format_version");
    assert_eq!(u16_at(&tree, 10), 4, "chunk_level");
    assert!(is_zero(&tree[12..16]), "reserved");
    assert_eq!(tree[16..32], m.log_id, "log_id");
    assert!(is_zero(&tree[32..60]), "reserved");
    assert_eq!(u32_at(&tree, 60), crc32(&tree[..60]), "header_crc");
    assert_eq!((tree.len() - 64) % 32, 0, "whole nodes");
    // The nodes, in post-order over the complete 16-record chunks (16.3).
    let hashes: Vec<[u8; 32]> = m.events.iter().map(|e| e.record_hash).collect();
    let mut expected: Vec<[u8; 32]> = Vec::new();
    let mut peaks: Vec<(u32, [u8; 32])> = Vec::new();
    for chunk in hashes.chunks_exact(16) {
        let mut node = (0u32, merkle_root(chunk));
        expected.push(node.1);
        while let Some(&(h, left)) = peaks.last() {
            if h != node.0 {
                break;
            }
            peaks.pop();
            let mut b = vec![0x01];
            b.extend_from_slice(&left);
            b.extend_from_slice(&node.1);
            node = (h + 1, blake3_of(&b));
            expected.push(node.1);
        }
        peaks.push(node);
    }
    let stored: Vec<[u8; 32]> = tree[64..].chunks(32).map(|c| h32_at(c, 0)).collect();
    assert_eq!(
        stored.len(),
        expected.len(),
        "a node for every complete chunk"
    );
    for (i, (got, want)) in stored.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "node {i}");
    }
}

// ---------------------------------------------------------------------------------------
// Checking the fixture through the engine.

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
        let (content_type, payload) = e.payload();
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
    for stream in m.streams() {
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
    // The scan API with full chain verification: links, flags and the stored bodies.
    let mut scanned = 0u64;
    let visited = log
        .scan(Position(0), Verify::Chain, |r| {
            let e = &m.events[r.position.0 as usize];
            assert_eq!(r.record_hash, &e.record_hash);
            assert_eq!(
                r.stream_prev, e.stream_prev,
                "stream_prev of {}",
                e.position
            );
            assert_eq!(r.flags, e.flags, "flags of {}", e.position);
            let block = if e.producer_count > 0 { 104 } else { 0 };
            assert_eq!(r.record_body.len(), r.body.len() + block);
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
    // The checkpoints as the engine reads them.
    let cps: Vec<ExpectedCheckpoint> = log
        .checkpoints()
        .iter()
        .map(|c| {
            let s = &c.statement;
            let (stream_count, streams_root) = s.streams.expect("a version 2 statement");
            ExpectedCheckpoint {
                id: s.id,
                tree_size: s.tree_size,
                time: s.time.0,
                root: s.root,
                chain_head: s.chain_head,
                stream_count,
                streams_root,
            }
        })
        .collect();
    assert_eq!(cps, m.checkpoints, "checkpoints");
    // The producer policy from $producers.
    let policy = log.producer_policy();
    assert_eq!(policy.required, vec![PRODUCER_PREFIX.to_owned()]);
    let key = policy
        .keys
        .get(&public_of(&PRODUCER_SEED))
        .expect("the producer's key is registered");
    assert_eq!(
        (key.name.as_str(), key.prefixes.clone(), key.revoked),
        (PRODUCER_NAME, vec![PRODUCER_PREFIX.to_owned()], false)
    );
    let report = log.verify().expect("verify");
    assert_eq!(report.records, n);
    assert_eq!(report.segments, m.segments.len() as u64);
    assert_eq!(report.last_chain_hash, m.events[n as usize - 1].record_hash);
    assert_eq!(log.check_chain(2).expect("check_chain"), n);
}

/// What an auditor verifies with: the public key file, the kept note, the witness's key
/// (one cosignature required) and the producer trust file, all read from the fixture.
fn auditor_options() -> VerifyOptions {
    let dir = fixture_dir();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let keys = parse_public_keys(&read(PUBKEY_FILE)).unwrap();
    let kept = checkpoint_from_note(&Note::parse(&read(KEPT_NOTE_FILE)).unwrap(), &keys).unwrap();
    VerifyOptions {
        trusted_keys: keys,
        kept: vec![(dir.join(KEPT_NOTE_FILE), kept)],
        witnesses: vec![WitnessKey::parse(&read(WITNESS_FILE)).unwrap()],
        min_witnesses: 1,
        producers: Some(ProducerTrust::parse(&read(TRUST_FILE)).unwrap()),
        ..VerifyOptions::default()
    }
}

/// Checks a report of `auditor_options` on the fixture after `more` further records in
/// `more_batches` batches (`more_signed` of them signed) and `more_checkpoints`.
fn check_report(r: &VerifyReport, m: &Expected, more: (u64, u64, u64, u64)) {
    let (more_records, more_batches, more_signed, more_checkpoints) = more;
    let n = m.events.len() as u64 + more_records;
    let cps = m.checkpoints.len() as u64 + more_checkpoints;
    let witnessed = m.checkpoint(WITNESSED_CHECKPOINT);
    assert_eq!(r.format_version, 2, "format_version: {r:?}");
    assert_eq!(r.records, n, "records: {r:?}");
    assert_eq!(r.checkpoints, cps, "checkpoints: {r:?}");
    assert_eq!(
        r.newest_checkpoint.map(|c| c.0),
        Some(cps),
        "newest_checkpoint: {r:?}"
    );
    assert_eq!(
        r.kept,
        vec![(witnessed.id, witnessed.tree_size)],
        "kept: {r:?}"
    );
    assert_eq!(
        r.cosignatures,
        m.cosignatures.len() as u64,
        "cosignatures: {r:?}"
    );
    assert_eq!(
        r.newest_witnessed,
        Some((witnessed.id, witnessed.tree_size)),
        "newest_witnessed: {r:?}"
    );
    let signed = m.signed_batches() + more_signed;
    assert_eq!(r.signed_batches, signed, "signed_batches: {r:?}");
    assert_eq!(
        r.signed_batches + r.unsigned_batches,
        m.batches().len() as u64 + more_batches,
        "signed and unsigned batches: {r:?}"
    );
    assert!(r.stream_links > 0, "stream_links: {r:?}");
    assert!(r.snapshot_checked, "snapshot_checked: {r:?}");
    assert!(r.tree_nodes > 0, "tree_nodes: {r:?}");
    assert!(r.sidecars_missing.is_empty(), "sidecars_missing: {r:?}");
}

/// Every stream's head at every checkpoint, proven by the engine, is the manifest's, and
/// its proof leads to the checkpoint's signed `streams_root`.
fn check_stream_heads(log: &Log, m: &Expected) {
    for cp in &m.checkpoints {
        for stream in m.streams() {
            let got = log.prove_stream_head(stream, cp.tree_size).unwrap();
            let want = m.head(stream, cp.tree_size);
            assert_eq!(
                got.as_ref().map(|h| (h.version, h.position.0)),
                want.map(|e| (e.version, e.position)),
                "head of {stream} at checkpoint {}",
                cp.id
            );
            if let Some(h) = got {
                assert_eq!(
                    (h.stream_count, h.streams_root),
                    (cp.stream_count, cp.streams_root),
                    "map of checkpoint {}",
                    cp.id
                );
                assert!(
                    h.proof.verify(
                        &cp.streams_root,
                        &stream_key(stream.as_bytes()),
                        h.version,
                        h.position.0
                    ),
                    "head proof of {stream} at checkpoint {}",
                    cp.id
                );
            }
        }
    }
}

#[test]
fn fixture_opens_reads_back_verifies_and_takes_appends() {
    let m = read_manifest();
    let tmp = copy_fixture();
    let dir = tmp.path().join("log");
    let key = tmp.path().join(KEY_FILE);
    let log = Log::open(&dir, opts(RecoveryMode::Strict, &key)).unwrap();
    let r = log.recovery_report();
    assert!(r.clean, "the fixture was closed cleanly: {r:?}");
    assert!(r.truncations.is_empty(), "{r:?}");
    assert!(r.rebuilt_indexes.is_empty(), "{r:?}");
    assert!(r.sealed_on_open.is_empty(), "{r:?}");
    assert!(!r.merkle_tree_rebuilt, "{r:?}");
    assert_eq!(r.checkpoint_tail_truncated, None, "{r:?}");
    assert_eq!(r.records_scanned, 0, "{r:?}");
    assert_eq!(log.public_key(), Some(public_of(&LOG_KEY_SEED)));
    check_contents(&log, &m);
    let options = auditor_options();
    check_report(
        &log.verify_with(&options, &mut |_| {}).unwrap(),
        &m,
        (0, 0, 0, 0),
    );
    check_stream_heads(&log, &m);

    // The current code continues a version 2 log: an unsigned append where the policy
    // allows one, a refused one where it does not, and a signed one that links to its
    // stream's event in the fixture.
    let n = m.events.len() as u64;
    let last = m.events.iter().rfind(|e| e.stream == "trade-1").unwrap();
    let more = log
        .append(
            "trade-1",
            ExpectedVersion::Exact(last.version),
            &[EventData::json("TradeAmended", r#"{"qty":"1"}"#)],
        )
        .unwrap();
    assert_eq!(more.first_position, Position(n));
    assert_eq!(more.first_version, last.version + 1);
    let oms = m.events.iter().rfind(|e| e.stream == "oms-7").unwrap();
    assert!(matches!(
        log.append(
            "oms-7",
            ExpectedVersion::Any,
            &[EventData::json("TradeAmended", "{}")]
        ),
        Err(Error::SignatureRefused { .. })
    ));
    let signed = log
        .append_signed(
            "oms-7",
            ExpectedVersion::Exact(oms.version),
            &[EventData::json("TradeAmended", r#"{"qty":"2"}"#)],
            &SigningKey::from_bytes(&PRODUCER_SEED),
        )
        .unwrap();
    assert_eq!(signed.first_position, Position(n + 1));
    let mut link = None;
    log.scan(Position(n + 1), Verify::Chain, |r| {
        link = Some((r.stream_prev, r.flags))
    })
    .unwrap();
    assert_eq!(
        link,
        Some((oms.position, BATCH_START | BATCH_END | PRODUCER_SIGNED))
    );
    let cp = log.checkpoint().unwrap();
    assert_eq!(
        (cp.statement.id, cp.statement.tree_size),
        (m.checkpoints.len() as u64 + 1, n + 2)
    );
    check_report(
        &log.verify_with(&options, &mut |_| {}).unwrap(),
        &m,
        (2, 2, 1, 1),
    );
    let head = log.prove_stream_head("oms-7", n + 2).unwrap().unwrap();
    assert_eq!(
        (head.version, head.position),
        (oms.version + 1, Position(n + 1))
    );
    log.close().unwrap();

    let log = Log::open(&dir, opts(RecoveryMode::Strict, &key)).unwrap();
    assert!(log.recovery_report().clean);
    assert_eq!(log.next_position(), Position(n + 2));
    check_report(
        &log.verify_with(&options, &mut |_| {}).unwrap(),
        &m,
        (2, 2, 1, 1),
    );
    log.close().unwrap();
}

#[test]
fn fixture_opens_read_only_without_changing_a_byte() {
    let m = read_manifest();
    let tmp = copy_fixture();
    let before = files_under(tmp.path());
    let dir = tmp.path().join("log");
    let log = Log::open(
        &dir,
        opts(RecoveryMode::ReadOnly, &tmp.path().join(KEY_FILE)),
    )
    .unwrap();
    assert!(log.recovery_report().truncations.is_empty());
    check_contents(&log, &m);
    check_report(
        &log.verify_with(&auditor_options(), &mut |_| {}).unwrap(),
        &m,
        (0, 0, 0, 0),
    );
    check_stream_heads(&log, &m);
    assert!(matches!(
        log.append("trade-1", ExpectedVersion::Any, &[EventData::new("X", "y")]),
        Err(Error::ReadOnly)
    ));
    log.close().unwrap();
    assert_eq!(
        files_under(tmp.path()),
        before,
        "a read-only open changes nothing"
    );
}
