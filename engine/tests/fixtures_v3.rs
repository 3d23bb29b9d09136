//! Golden fixture of format version 3: a log written once by the engine and checked in under
//! `engine/tests/fixtures/v3/log/`, with the blob store its events refer to
//! (`engine/tests/fixtures/v3/store/`), its expected contents (`expected.tsv`) and its
//! checkpoint key (`log.key`, from a fixed seed).
//!
//! Scenario: every later version of the code must still open, read and verify a version 3
//! directory byte for byte (docs/FORMAT.md, "Version history"). The log holds what version 3
//! adds: events whose envelope has `payload_form` 1 and a 40-byte blob reference (stored by
//! the append above the blob threshold, and given by the caller after `put_blob`), beside
//! inline events, over two segments.
//!
//! Method: the bytes are decoded here with the offsets of docs/FORMAT.md written out as
//! numbers (`tally.meta` and segment versions, record headers, envelopes, blob references),
//! the hash chain is recomputed from its definition, and every blob in the store is hashed
//! and compared with its reference. Then the fixture, copied to a temporary directory (its
//! `cold.store` pointed at the copy of the store), is opened read-write and read-only, read
//! back completely with every blob, verified with the trusted key, appended to, and found
//! out when one of its blobs is changed.
//!
//! Written once with `TALLY_WRITE_FIXTURES=1 cargo test -p tally-engine --test fixtures_v3
//! write_fixture_when_asked`, which refuses to overwrite an existing fixture.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ed25519_dalek::SigningKey;
use tally_engine::cold::{ColdStore, DirStore};
use tally_engine::format::blob::BlobRef;
use tally_engine::format::chain::{body_hash, chain_seed, chain_step};
use tally_engine::format::checkpoint::encode_secret_key;
use tally_engine::{
    ColdOptions, ContentType, Direction, Error, EventData, EventId, ExpectedVersion, Log, Options,
    Position, RecoveryMode, Timestamp, VerifyOptions,
};

const SEGMENT_BYTES: u64 = 64 * 1024;
const LOG_KEY_SEED: [u8; 32] = [0x33; 32];
/// The fixture's blob threshold: small, so that the blobs in git are small.
const BLOB_THRESHOLD: usize = 512;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v3")
}

fn opts(recovery: RecoveryMode, key: &Path, store: &Path) -> Options {
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store).unwrap());
    Options {
        segment_bytes: SEGMENT_BYTES,
        format_version: 3,
        recovery,
        signing_key: Some(key.to_owned()),
        auto_checkpoints: false,
        index_attributes: false,
        cold: ColdOptions {
            store: Some(store),
            blob_threshold: BLOB_THRESHOLD,
            ..ColdOptions::default()
        },
        ..Options::default()
    }
}

/// The payload of the event at `position`: part of the fixture's definition. Every fifth
/// is 600 to 1,199 bytes (a blob); the others are small JSON.
fn payload(position: u64) -> (ContentType, Vec<u8>) {
    if position % 5 == 2 {
        let len = 600 + (position as usize * 97) % 600;
        let bytes = (0..len)
            .map(|i| (i as u8).wrapping_mul(7) ^ position as u8)
            .collect();
        (ContentType::Binary, bytes)
    } else {
        (
            ContentType::Json,
            format!(
                "{{\"trade\":{},\"qty\":\"{}.5\"}}",
                position % 7,
                position * 3
            )
            .into_bytes(),
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
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

/// One line of `expected.tsv`: position, stream, version, event type, `inline` or `blob`,
/// and the payload (hex) or the blob's hash (hex) and size.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    position: u64,
    stream: String,
    version: u64,
    event_type: String,
    blob: Option<(String, u64)>,
    payload: Vec<u8>,
}

fn read_expected(root: &Path) -> Vec<Expected> {
    std::fs::read_to_string(root.join("expected.tsv"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let position: u64 = f[0].parse().unwrap();
            let blob = (f[4] == "blob").then(|| (f[5].to_owned(), f[6].parse().unwrap()));
            Expected {
                position,
                stream: f[1].to_owned(),
                version: f[2].parse().unwrap(),
                event_type: f[3].to_owned(),
                blob,
                payload: payload(position).1,
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
    let root = tmp.path().join("v3");
    write_fixture(&root);
    check_bytes(&root);
}

fn write_fixture(root: &Path) {
    assert!(
        !root.exists(),
        "{} exists: a golden fixture is written once",
        root.display()
    );
    std::fs::create_dir_all(root.join("store")).unwrap();
    let key = root.join("log.key");
    std::fs::write(
        &key,
        encode_secret_key(&SigningKey::from_bytes(&LOG_KEY_SEED)),
    )
    .unwrap();
    let log = Log::open(
        root.join("log"),
        opts(RecoveryMode::Strict, &key, &root.join("store")),
    )
    .unwrap();
    let mut lines =
        vec!["# position\tstream\tversion\ttype\tform\tpayload or blob hash\tsize".to_owned()];
    let mut position = 0u64;
    let streams = ["trade-1", "trade-2", "trade-3"];
    let mut versions = [0u64; 3];
    while log.segments().len() < 2 || !position.is_multiple_of(10) {
        let s = (position / 3 % 3) as usize;
        let (content_type, bytes) = payload(position);
        let mut e = EventData::new(
            if position % 5 == 2 {
                "DocumentAttached"
            } else {
                "TradeAmended"
            },
            bytes.clone(),
        )
        .with_id(EventId(u128::from(position + 1).to_le_bytes()))
        .event_time(Timestamp(1_700_000_000_000_000_000 + position));
        e.content_type = content_type;
        if position % 10 == 7 {
            // A reference the caller gives, after uploading the blob itself.
            let blob = log.put_blob(&bytes).unwrap();
            e = EventData {
                payload: Vec::new(),
                blob: Some(blob),
                ..e
            };
        }
        let expect = match versions[s] {
            0 => ExpectedVersion::NoStream,
            v => ExpectedVersion::Exact(v - 1),
        };
        log.append(streams[s], expect, &[e]).unwrap();
        let form = if bytes.len() > BLOB_THRESHOLD || position % 10 == 7 {
            let b = BlobRef::of(&bytes).unwrap();
            format!("blob\t{}\t{}", b.hex(), b.size)
        } else {
            format!("inline\t{}\t{}", hex(&bytes), bytes.len())
        };
        lines.push(format!(
            "{position}\t{}\t{}\t{}\t{form}",
            streams[s],
            versions[s],
            if position % 5 == 2 {
                "DocumentAttached"
            } else {
                "TradeAmended"
            }
        ));
        versions[s] += 1;
        position += 1;
        if position.is_multiple_of(40) {
            log.checkpoint().unwrap();
        }
    }
    log.checkpoint().unwrap();
    log.close().unwrap();
    std::fs::write(root.join("expected.tsv"), lines.join("\n") + "\n").unwrap();
    // The store's URL is the writer's; a reader points it at its own copy.
    std::fs::remove_file(root.join("log/cold.store")).unwrap();
}

/// The bytes, by the offsets of docs/FORMAT.md: versions, record headers (88 bytes),
/// envelopes and their blob references, the chain, and the blobs in the store.
fn check_bytes(root: &Path) {
    let expected = read_expected(root);
    let log_dir = root.join("log");
    let meta = std::fs::read(log_dir.join("tally.meta")).unwrap();
    assert_eq!(u16_at(&meta, 8), 3, "tally.meta format_version");
    let log_id: [u8; 16] = meta[16..32].try_into().unwrap();
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    assert!(segs.len() >= 2, "{segs:?}");
    let mut chain = chain_seed(&log_id);
    let mut at_event = 0usize;
    let mut blobs_seen = 0;
    for seg in &segs {
        let b = std::fs::read(seg).unwrap();
        if b[..4096].iter().all(|&x| x == 0) {
            // A spare prepared for the next roll, all zero (FORMAT.md section 2).
            continue;
        }
        assert_eq!(u16_at(&b, 8), 3, "{} header format_version", seg.display());
        let mut off = 4096usize;
        while off + 88 <= b.len() && u32_at(&b, off + 4) != 0 {
            let h = &b[off..off + 88];
            let body_len = u32_at(h, 4) as usize;
            let body = &b[off + 88..off + 88 + body_len];
            assert_eq!(crc32fast::hash(body), u32_at(h, 8), "body_crc");
            assert_eq!(crc32fast::hash(&h[4..88]), u32_at(h, 0), "header_crc");
            let position = u64_at(h, 48);
            let e = &expected[at_event];
            assert_eq!(position, e.position);
            assert_eq!(u64_at(h, 24), e.version, "stream_version");
            // The chain (FORMAT.md 7): keyed BLAKE3 of header bytes 12..44 and the body's hash.
            let hash = chain_step(&chain, h, &body_hash(body));
            assert_eq!(&hash[..], &h[56..88], "chain_hash at {position}");
            chain = hash;
            // The envelope (FORMAT.md 6): byte 29 is payload_form.
            let payload_len = u32_at(body, 44) as usize;
            let payload = &body[body.len() - payload_len..];
            match &e.blob {
                Some((hash_hex, size)) => {
                    assert_eq!(body[29], 1, "payload_form at {position}");
                    assert_eq!(payload_len, 40);
                    assert_eq!(&hex(&payload[..32]), hash_hex);
                    assert_eq!(u64_at(payload, 32), *size);
                    // The blob: `<log id hex>/blobs/<hash hex>`, BLAKE3 of its bytes.
                    let obj = root
                        .join("store")
                        .join(hex(&log_id))
                        .join("blobs")
                        .join(hash_hex);
                    let bytes = std::fs::read(&obj).unwrap();
                    assert_eq!(bytes, e.payload);
                    assert_eq!(&hex(blake3::hash(&bytes).as_bytes()), hash_hex);
                    blobs_seen += 1;
                }
                None => {
                    assert_eq!(body[29], 0, "payload_form at {position}");
                    assert_eq!(payload, &e.payload[..]);
                }
            }
            at_event += 1;
            off += (88 + body_len).next_multiple_of(8);
        }
    }
    assert_eq!(at_event, expected.len());
    assert!(blobs_seen >= 4, "{blobs_seen} blobs");
}

/// A copy of the fixture in a temporary directory, its `cold.store` naming the copy's store.
fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("v3");
    copy_dir(&fixture_dir(), &root);
    std::fs::write(
        root.join("log/cold.store"),
        format!("file://{}\n", root.join("store").display()),
    )
    .unwrap();
    (tmp, root)
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
fn the_fixture_opens_reads_every_blob_verifies_and_takes_appends() {
    let (_tmp, root) = copy_fixture();
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
        let log = Log::open(
            root.join("log"),
            Options {
                cold: ColdOptions {
                    blob_threshold: BLOB_THRESHOLD,
                    ..ColdOptions::default()
                },
                ..opts(recovery, &key, &root.join("store"))
            },
        )
        .unwrap();
        let all = log
            .read_all(Position(0), usize::MAX, Direction::Forward)
            .unwrap();
        assert_eq!(all.len(), expected.len());
        for (e, x) in all.iter().zip(&expected) {
            assert_eq!(
                (e.position.0, e.stream(), e.version, e.event_type()),
                (
                    x.position,
                    x.stream.as_str(),
                    x.version,
                    x.event_type.as_str()
                )
            );
            match (&x.blob, e.blob()) {
                (Some((h, size)), Some(b)) => {
                    assert_eq!((&b.hex(), b.size), (h, *size));
                    assert_eq!(log.read_blob(&b).unwrap(), x.payload);
                }
                (None, None) => assert_eq!(e.payload(), &x.payload[..]),
                other => panic!("position {}: {other:?}", x.position),
            }
        }
        let report = log.verify_with(&trusted, &mut |_| {}).unwrap();
        assert_eq!(report.format_version, 3);
        assert_eq!(
            report.blob_refs,
            expected.iter().filter(|x| x.blob.is_some()).count() as u64
        );
        assert!(report.checkpoints >= 1);
        if recovery == RecoveryMode::Strict {
            let big = vec![9u8; 4_000];
            log.append(
                "trade-9",
                ExpectedVersion::NoStream,
                &[EventData::new("DocumentAttached", big.clone())],
            )
            .unwrap();
            let e = &log
                .read_stream("trade-9", 0, 1, Direction::Forward)
                .unwrap()[0];
            assert_eq!(log.read_blob(&e.blob().unwrap()).unwrap(), big);
            log.checkpoint().unwrap();
            log.verify_with(&trusted, &mut |_| {}).unwrap();
        }
        log.close().unwrap();
    }
    // One blob changed in the store: verify names it.
    let x = expected.iter().find(|x| x.blob.is_some()).unwrap();
    let (hash, _) = x.blob.as_ref().unwrap();
    let log_dir = std::fs::read_dir(root.join("store"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let obj = log_dir.join("blobs").join(hash);
    let mut b = std::fs::read(&obj).unwrap();
    b[0] ^= 1;
    std::fs::write(&obj, &b).unwrap();
    let log = Log::open(
        root.join("log"),
        opts(RecoveryMode::ReadOnly, &key, &root.join("store")),
    )
    .unwrap();
    match log.verify() {
        Err(Error::Blob {
            hash: h, detail, ..
        }) => {
            assert_eq!(&h, hash);
            assert!(
                detail.contains(&format!("position {}", x.position)),
                "{detail}"
            );
        }
        other => panic!("{other:?}"),
    }
}
