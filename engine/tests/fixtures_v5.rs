//! Golden fixture of format version 5: a log written once by the engine and checked in under
//! `engine/tests/fixtures/v5/log/`, with the key store that seals its personal data
//! (`keys/subjects.keys`), the master key that wraps the store (`master.key`, fixed), the
//! checkpoint key (`log.key`, from a fixed seed), and what each event reads as
//! (`expected.jsonl`).
//!
//! Scenario: every later version of the code must still open, read and verify a version 5
//! directory byte for byte, and open its sealed data with its key store (docs/FORMAT.md,
//! "Version history"). The log holds what version 5 adds: envelopes whose payload is sealed
//! (`payload_form` 2), by fields and whole, a tokenised field, a subject erased by a signed
//! `$SubjectErased` event whose key the store destroyed, and plain events beside them.
//!
//! Method: the bytes are decoded here with the offsets of docs/FORMAT.md sections 6.6 and 22
//! written out as numbers: the sealed payload's fixed part, the subject's id hash, and the
//! key store's header and slots; a live subject key is unwrapped with the master key and a
//! sealed payload opened with it, by the cipher and associated data FORMAT.md names. Then a
//! copy of the fixture is opened read-only and read-write with its key store (each event
//! reads as `expected.jsonl` says), without it (markers), verified, and appended to.
//!
//! Written once with `TALLY_WRITE_FIXTURES=1 cargo test -p tally-engine --test fixtures_v5
//! write_fixture_when_asked`, which refuses to overwrite an existing fixture.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use serde_json::{Value, json};
use tally_engine::format::checkpoint::encode_secret_key;
use tally_engine::keys::{FileKeyStore, SecretKey};
use tally_engine::{
    Direction, EventData, EventId, ExpectedVersion, Log, Options, Personal, Position, RecoveryMode,
    Timestamp, VerifyOptions,
};

const SEGMENT_BYTES: u64 = 64 * 1024;
const LOG_KEY_SEED: [u8; 32] = [0x55; 32];
const MASTER: [u8; 32] = [0x5A; 32];

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v5")
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn master() -> SecretKey {
    SecretKey::from_hex(
        &MASTER
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
    .unwrap()
}

fn opts(recovery: RecoveryMode, root: &Path, keys: bool) -> Options {
    Options {
        segment_bytes: SEGMENT_BYTES,
        recovery,
        create: recovery != RecoveryMode::ReadOnly,
        signing_key: Some(root.join("log.key")),
        auto_checkpoints: false,
        index_attributes: false,
        format_version: 5,
        keys: keys.then(|| {
            let store = if recovery == RecoveryMode::ReadOnly {
                FileKeyStore::open_read_only(&root.join("keys"), &master()).unwrap()
            } else {
                FileKeyStore::open(&root.join("keys"), &master(), true).unwrap()
            };
            Arc::new(store) as Arc<dyn tally_engine::keys::KeyStore>
        }),
        ..Options::default()
    }
}

/// The fixture's events: client confirmations with two sealed fields and a token, KYC scans
/// sealed whole, and plain market data between them.
fn events() -> Vec<(String, EventData)> {
    let mut out = Vec::new();
    for n in 0u64..24 {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_le_bytes());
        id[8] = 0x55;
        let client = format!("client-{}", n % 3);
        let e = match n % 4 {
            0 | 1 => EventData::json(
                "TradeConfirmed",
                json!({
                    "trade_id": format!("T-{n}"),
                    "client_id": client,
                    "client_name": format!("Name {}", n % 3),
                    "client_email": format!("c{}@example.com", n % 3),
                    "account": format!("ACC-{}", n % 3),
                })
                .to_string(),
            )
            .personal(
                Personal::fields(&client, ["client_name", "client_email"]).with_tokens(["account"]),
            ),
            2 => EventData::new(
                "PassportScanned",
                format!("scan {n} of {client}").into_bytes(),
            )
            .personal(Personal::payload(&client)),
            _ => EventData::json("PricePublished", format!("{{\"px\":\"{n}.5\"}}")),
        }
        .with_id(EventId(id))
        .aggregate_type("Trade")
        .actor("desk-5")
        .correlation_id(format!("corr-{n}"))
        .event_time(Timestamp(1_765_100_000_000_000_000 + n));
        out.push((format!("s-{}", n % 5), e));
    }
    out
}

#[test]
fn write_fixture_when_asked() {
    if std::env::var("TALLY_WRITE_FIXTURES").as_deref() == Ok("1") {
        write_fixture(&fixture_dir());
    }
    // Writing one now gives a fixture that the checks below accept, so that the writer and
    // the checks cannot drift apart.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("v5");
    write_fixture(&root);
    check_bytes(&root);
    check_reads(&root);
}

fn write_fixture(root: &Path) {
    assert!(
        !root.exists(),
        "{} exists: a golden fixture is written once",
        root.display()
    );
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(
        root.join("log.key"),
        encode_secret_key(&SigningKey::from_bytes(&LOG_KEY_SEED)),
    )
    .unwrap();
    std::fs::write(root.join("master.key"), format!("{}\n", master().to_hex())).unwrap();
    let log = Log::open(root.join("log"), opts(RecoveryMode::Strict, root, true)).unwrap();
    for (i, (stream, e)) in events().into_iter().enumerate() {
        log.append(&stream, ExpectedVersion::Any, &[e]).unwrap();
        if i == 11 {
            log.checkpoint().unwrap();
        }
    }
    log.forget("client-2", "dpo@firm", "GDPR art. 17, request R-1")
        .unwrap();
    log.checkpoint().unwrap();
    let mut lines = Vec::new();
    for e in log.read_all(Position(0), 1000, Direction::Forward).unwrap() {
        let payload: Value = match serde_json::from_slice(e.payload()) {
            Ok(v) => v,
            Err(_) => Value::String(String::from_utf8_lossy(e.payload()).into_owned()),
        };
        lines.push(
            json!({"position": e.position.0, "stream": e.stream(), "payload": payload}).to_string(),
        );
    }
    log.close().unwrap();
    std::fs::write(root.join("expected.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn read_expected(root: &Path) -> Vec<Value> {
    std::fs::read_to_string(root.join("expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A live subject key from the key store file, unwrapped with the master key (FORMAT.md 22).
fn unwrap_key(store: &[u8], subject: &[u8; 32], generation: u32) -> Option<[u8; 32]> {
    assert_eq!(&store[..8], b"TALLYKEY");
    assert_eq!(u16_at(store, 8), 1);
    assert_eq!(u32_at(store, 12), 128);
    assert_eq!(crc32fast::hash(&store[..124]), u32_at(store, 124));
    let cipher = XChaCha20Poly1305::new(&Key::from(MASTER));
    for slot in store[128..].chunks_exact(128) {
        assert_eq!(crc32fast::hash(&slot[..124]), u32_at(slot, 124), "slot crc");
        if &slot[8..40] != subject || u32_at(slot, 4) != generation {
            continue;
        }
        if slot[0] == 2 {
            assert!(
                slot[40..112].iter().all(|&b| b == 0),
                "a destroyed key's zeros"
            );
            return None;
        }
        assert_eq!(slot[0], 1);
        let mut aad = b"tally subject key v1\0".to_vec();
        aad.extend_from_slice(subject);
        aad.extend_from_slice(&generation.to_le_bytes());
        let nonce: [u8; 24] = slot[40..64].try_into().unwrap();
        let key = cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &slot[64..112],
                    aad: &aad,
                },
            )
            .unwrap();
        return Some(key.try_into().unwrap());
    }
    panic!("no slot for the subject");
}

/// The bytes, by the offsets of docs/FORMAT.md: format version 5, sealed payloads (6.6), the
/// key store (22), and a sealed payload opened with the key the store holds.
fn check_bytes(root: &Path) {
    let log_dir = root.join("log");
    let meta = std::fs::read(log_dir.join("tally.meta")).unwrap();
    assert_eq!(u16_at(&meta, 8), 5, "tally.meta format_version");
    let store = std::fs::read(root.join("keys/subjects.keys")).unwrap();
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segs.sort();
    let (mut sealed, mut opened, mut erased) = (0, 0, 0);
    for seg in &segs {
        let b = std::fs::read(seg).unwrap();
        if b[..4096].iter().all(|&x| x == 0) {
            continue; // a spare
        }
        assert_eq!(u16_at(&b, 8), 5, "{} header format_version", seg.display());
        let mut off = 4096usize;
        while off + 88 <= b.len() && u32_at(&b, off + 4) != 0 {
            let h = &b[off..off + 88];
            let body_len = u32_at(h, 4) as usize;
            let body = &b[off + 88..off + 88 + body_len];
            off += (88 + body_len).next_multiple_of(8);
            // The envelope (6.1): payload_form at 29, the six u16 lengths from 30, the
            // payload's u32 length at 44.
            if body[29] != 2 {
                assert!(body[29] <= 1);
                continue;
            }
            sealed += 1;
            let lens: usize = (0..6).map(|i| usize::from(u16_at(body, 30 + 2 * i))).sum();
            let payload = &body[48 + lens..];
            assert_eq!(payload.len(), u32_at(body, 44) as usize);
            // The sealed payload (6.6).
            assert_eq!(payload[0], 1, "seal_version");
            let scope = payload[1];
            assert!(scope <= 1);
            assert_eq!(&payload[2..4], &[0, 0]);
            let generation = u32_at(payload, 4);
            assert_eq!(generation, 1);
            let subject: [u8; 32] = payload[8..40].try_into().unwrap();
            let client = (0..3)
                .map(|i| format!("client-{i}"))
                .find(|c| {
                    blake3::derive_key("tally 2026-12 data subject id", c.as_bytes()) == subject
                })
                .expect("the subject is one of the clients' id hashes");
            let clear_len = u32_at(payload, 64) as usize;
            let names_len = u32_at(payload, 68) as usize;
            let head = &payload[..72 + clear_len + names_len];
            let ct = &payload[72 + clear_len + names_len..];
            if scope == 0 {
                assert_eq!(clear_len + names_len, 0);
            } else {
                let clear: Value = serde_json::from_slice(&payload[72..72 + clear_len]).unwrap();
                assert!(clear.get("client_name").is_none(), "{clear}");
                assert!(clear["account"].as_str().unwrap().starts_with("tok_"));
                let names: Vec<String> =
                    serde_json::from_slice(&payload[72 + clear_len..72 + clear_len + names_len])
                        .unwrap();
                assert_eq!(names, ["client_email", "client_name"]);
            }
            match unwrap_key(&store, &subject, generation) {
                None => {
                    assert_eq!(client, "client-2", "only client-2 was erased");
                    erased += 1;
                }
                Some(key) => {
                    let mut aad = b"tally sealed v1\0".to_vec();
                    aad.extend_from_slice(&body[..16]); // event_id
                    aad.extend_from_slice(head);
                    let nonce: [u8; 24] = payload[40..64].try_into().unwrap();
                    let plain = XChaCha20Poly1305::new(&Key::from(key))
                        .decrypt(&XNonce::from(nonce), Payload { msg: ct, aad: &aad })
                        .unwrap();
                    let n = client.strip_prefix("client-").unwrap();
                    if scope == 1 {
                        let v: Value = serde_json::from_slice(&plain).unwrap();
                        assert_eq!(v["client_name"], format!("Name {n}"));
                    } else {
                        assert!(String::from_utf8(plain).unwrap().ends_with(&client));
                    }
                    opened += 1;
                }
            }
        }
    }
    assert_eq!((sealed, opened + erased), (18, 18));
    assert_eq!(erased, 6);
}

/// Opens a copy with and without its key store: reads, markers, verification, appends.
fn check_reads(root: &Path) {
    let expected = read_expected(root);
    let public = SigningKey::from_bytes(&LOG_KEY_SEED)
        .verifying_key()
        .to_bytes();
    let trusted = VerifyOptions {
        trusted_keys: vec![public],
        ..VerifyOptions::default()
    };
    for recovery in [RecoveryMode::ReadOnly, RecoveryMode::Strict] {
        let log = Log::open(root.join("log"), opts(recovery, root, true)).unwrap();
        let events = log
            .read_all(Position(0), 10_000, Direction::Forward)
            .unwrap();
        assert_eq!(events.len(), expected.len());
        for (e, x) in events.iter().zip(&expected) {
            assert_eq!(e.position.0, x["position"]);
            assert_eq!(e.stream(), x["stream"]);
            let payload: Value = serde_json::from_slice(e.payload())
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(e.payload()).into()));
            assert_eq!(payload, x["payload"], "position {}", e.position.0);
        }
        let erasures = log.erasures();
        assert_eq!(erasures.len(), 1);
        let report = log.verify_with(&trusted, &mut |_| {}).unwrap();
        assert_eq!(report.format_version, 5);
        assert_eq!(report.checkpoints, 2);
        if recovery == RecoveryMode::Strict {
            log.append(
                "s-9",
                ExpectedVersion::NoStream,
                &[EventData::json("TradeConfirmed", r#"{"client_name":"x"}"#)
                    .personal(Personal::fields("client-2", ["client_name"]))],
            )
            .unwrap();
            let e = log.read_stream("s-9", 0, 1, Direction::Forward).unwrap();
            assert_eq!(e[0].sealing().unwrap().generation, 2);
            log.verify().unwrap();
        }
        log.close().unwrap();
    }
    // Without its key store: markers in place of every sealed field, the rest as written.
    let log = Log::open(root.join("log"), opts(RecoveryMode::ReadOnly, root, false)).unwrap();
    let first = log.read_all(Position(0), 1, Direction::Forward).unwrap();
    let p: Value = serde_json::from_slice(first[0].payload()).unwrap();
    assert!(p["client_name"]["$sealed"].is_object(), "{p}");
    assert_eq!(p["trade_id"], "T-0");
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
fn the_fixture_opens_with_and_without_its_key_store_verifies_and_takes_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("v5");
    copy_dir(&fixture_dir(), &root);
    check_reads(&root);
}
