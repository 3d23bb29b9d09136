//! Personal data sealed under its subject's key, and erased by destroying the key: reads
//! open it, then show markers naming the erasure event; no byte of a segment changes; every
//! check and proof still holds; legal holds refuse the erasure; a crash between the erasure
//! event and the key's destruction is finished by the next open.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use tally_engine::format::envelope::PayloadForm;
use tally_engine::format::sealed::subject_hash;
use tally_engine::governance::{HoldPlaced, HoldScope};
use tally_engine::keys::{FileKeyStore, KeyLookup, KeyStore, SecretKey};
use tally_engine::{
    Direction, ERASURE_STREAM, Error, EventData, ExpectedVersion, Log, Options, Personal, Position,
    SealState, Verify,
};

const MASTER: [u8; 32] = [0x42; 32];

fn store(dir: &Path) -> Arc<FileKeyStore> {
    Arc::new(FileKeyStore::open(dir, &SecretKey::from_hex(&hex(&MASTER)).unwrap(), true).unwrap())
}

/// The key store as a second process sees it: read-only, beside the log's.
fn peek(dir: &Path) -> FileKeyStore {
    FileKeyStore::open_read_only(dir, &SecretKey::from_hex(&hex(&MASTER)).unwrap()).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn open(dir: &Path, keys: &Path) -> Log {
    Log::open(
        dir,
        Options {
            keys: Some(store(keys)),
            ..Options::default()
        },
    )
    .unwrap()
}

fn confirmation(client: &str, n: u32) -> EventData {
    EventData::json(
        "TradeConfirmed",
        json!({
            "trade_id": format!("T-{n}"),
            "book": "RATES-1",
            "client": client,
            "client_name": format!("Name of {client}"),
            "client_email": format!("{client}@example.com"),
            "account": format!("ACC-{client}"),
        })
        .to_string(),
    )
    .aggregate_type("Trade")
    .actor("desk-7")
    .correlation_id(format!("corr-{n}"))
    .personal(Personal::fields(client, ["client_name", "client_email"]).with_tokens(["account"]))
}

fn payload(e: &tally_engine::RecordedEvent) -> Value {
    serde_json::from_slice(e.payload()).unwrap()
}

fn segment_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn sealed_fields_read_back_and_the_segment_holds_no_plaintext() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    let log = open(&d.path().join("log"), k.path());
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[confirmation("client-42", 1)],
    )
    .unwrap();
    let got = log
        .read_stream("trade-1", 0, 10, Direction::Forward)
        .unwrap();
    let p = payload(&got[0]);
    assert_eq!(p["client_name"], "Name of client-42");
    assert_eq!(p["client_email"], "client-42@example.com");
    assert_eq!(p["book"], "RATES-1");
    let token = p["account"].as_str().unwrap();
    assert!(token.starts_with("tok_"), "{token}");
    let s = got[0].sealing().unwrap();
    assert_eq!(s.state, SealState::Opened);
    assert_eq!(s.subject, subject_hash("client-42"));
    assert_eq!(
        s.fields.as_deref().unwrap(),
        ["client_email".to_owned(), "client_name".to_owned()]
    );
    assert_eq!(got[0].payload_form, PayloadForm::Inline);
    // The same value gives the same token (projections join on it).
    log.append(
        "trade-2",
        ExpectedVersion::NoStream,
        &[confirmation("client-42", 2)],
    )
    .unwrap();
    let again = log
        .read_stream("trade-2", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(payload(&again[0])["account"], token);
    log.sync().unwrap();
    for (name, bytes) in segment_bytes(&d.path().join("log")) {
        for secret in [
            &b"Name of client-42"[..],
            b"client-42@example.com",
            b"ACC-client-42",
        ] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{name} holds {:?} in clear",
                String::from_utf8_lossy(secret)
            );
        }
    }
    // The raw record is sealed; the scan sees its form.
    let mut forms = Vec::new();
    log.scan_range(Position(0), log.next_position(), Verify::Checksums, |r| {
        if let Ok(env) = r.envelope() {
            forms.push(env.payload_form);
        }
    })
    .unwrap();
    assert!(forms.contains(&PayloadForm::Sealed));
}

#[test]
fn forget_erases_in_every_read_without_changing_a_byte_and_proofs_still_verify() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    let dir = d.path().join("log");
    let log = open(&dir, k.path());
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[confirmation("client-42", 1)],
    )
    .unwrap();
    log.append(
        "trade-2",
        ExpectedVersion::NoStream,
        &[confirmation("client-7", 2)],
    )
    .unwrap();
    log.append(
        "kyc-42",
        ExpectedVersion::NoStream,
        &[
            EventData::new("PassportScanned", b"\x89PNG scan of a passport".to_vec())
                .personal(Personal::payload("client-42")),
        ],
    )
    .unwrap();
    let cp = log.checkpoint().unwrap();
    let size = cp.statement.tree_size;
    let hashes: Vec<_> = log
        .read_all(Position(0), 100, Direction::Forward)
        .unwrap()
        .iter()
        .map(|e| e.record_hash)
        .collect();
    log.sync().unwrap();
    let before = segment_bytes(&dir);

    let report = log
        .forget("client-42", "dpo@firm", "GDPR art. 17 request R-981")
        .unwrap();
    assert!(report.signed);
    assert!(!report.already_erased);
    assert_eq!(report.generation, 1);
    let by = Position(report.position);

    // No byte a record held changed: the only bytes written are the erasure event's, in
    // space that was empty (zeros) before.
    // A segment file made since (a spare prepared in the background) holds only zeros.
    let after = segment_bytes(&dir);
    for (n1, b1) in &after {
        match before.iter().find(|(n0, _)| n0 == n1) {
            Some((n0, b0)) => {
                for (at, (x, y)) in b0.iter().zip(b1).enumerate() {
                    assert!(
                        x == y || *x == 0,
                        "{n0}: byte {at} changed from {x:#04x} to {y:#04x}"
                    );
                }
            }
            None => assert!(b1.iter().all(|&x| x == 0), "{n1}: a new segment with data"),
        }
    }
    assert!(
        before
            .iter()
            .all(|(n0, _)| after.iter().any(|(n1, _)| n0 == n1))
    );
    let check = |log: &Log| {
        let t1 = log
            .read_stream("trade-1", 0, 10, Direction::Forward)
            .unwrap();
        let p = payload(&t1[0]);
        assert_eq!(p["client_name"]["$erased"]["by"], by.0);
        assert_eq!(p["client_email"]["$erased"]["by"], by.0);
        assert_eq!(p["book"], "RATES-1");
        assert_eq!(
            t1[0].sealing().unwrap().state,
            SealState::Erased { by: Some(by) }
        );
        // The other client is untouched.
        let t2 = log
            .read_stream("trade-2", 0, 10, Direction::Forward)
            .unwrap();
        assert_eq!(payload(&t2[0])["client_name"], "Name of client-7");
        // A sealed whole payload reads as a marker, in every read of the API.
        let kyc = log
            .read_stream("kyc-42", 0, 10, Direction::Forward)
            .unwrap();
        assert_eq!(payload(&kyc[0])["$erased"]["by"], by.0);
        let all = log.read_all(Position(0), 100, Direction::Forward).unwrap();
        let kyc_all = all.iter().find(|e| e.stream() == "kyc-42").unwrap();
        assert_eq!(payload(kyc_all)["$erased"]["by"], by.0);
        let found = log
            .find(&tally_engine::Query::field(
                tally_engine::Field::Correlation,
                "corr-1",
            ))
            .unwrap();
        assert_eq!(payload(&found[0])["client_name"]["$erased"]["by"], by.0);
        let mut tail = log.tail(Position(0));
        let first = tail
            .next_timeout(std::time::Duration::from_secs(1))
            .unwrap()
            .unwrap();
        assert_eq!(payload(&first)["client_email"]["$erased"]["by"], by.0);
        // The erasure event is in the log, with its actor.
        let er = log
            .read_stream(ERASURE_STREAM, 0, 10, Direction::Forward)
            .unwrap();
        assert_eq!(er.len(), 1);
        assert_eq!(er[0].actor(), "dpo@firm");
        // It is signed by the log's key, over the log, subject, generation and reason.
        let signed: tally_engine::SubjectErased = serde_json::from_slice(er[0].payload()).unwrap();
        let key = log.public_key().unwrap();
        assert!(signed.signature_verifies(&key));
        assert!(!signed.signature_verifies(&[9; 32]));
        let forged = tally_engine::SubjectErased {
            reason: "something else".into(),
            ..signed.clone()
        };
        assert!(!forged.signature_verifies(&key));
        let v = log.verify().unwrap();
        assert_eq!((v.erasures, v.erasures_unsigned), (1, 0));
        // Everything verifies, and the checkpoint taken before still proves the records.
        log.verify().unwrap();
        for (p, h) in hashes.iter().enumerate() {
            assert_eq!(
                log.read_all(Position(p as u64), 1, Direction::Forward)
                    .unwrap()[0]
                    .record_hash,
                *h
            );
            log.prove_inclusion(Position(p as u64), size)
                .unwrap()
                .verify(h, &cp.statement.root)
                .unwrap();
        }
        let cp2 = log.checkpoint().unwrap();
        log.prove_consistency(size, cp2.statement.tree_size)
            .unwrap()
            .verify(&cp.statement.root, &cp2.statement.root)
            .unwrap();
    };
    check(&log);
    drop(log);
    // After a reopen, and the key is gone from the store.
    let log = open(&dir, k.path());
    check(&log);
    assert_eq!(
        peek(k.path()).key(&subject_hash("client-42"), 1).unwrap(),
        KeyLookup::Destroyed
    );
    // A retry answers with the first erasure.
    let again = log.forget("client-42", "dpo@firm", "retry").unwrap();
    assert!(again.already_erased);
    assert_eq!(again.position, by.0);
    // The subject seen again gets a new key; the old data stays erased.
    log.append(
        "trade-3",
        ExpectedVersion::NoStream,
        &[confirmation("client-42", 3)],
    )
    .unwrap();
    let t3 = log
        .read_stream("trade-3", 0, 1, Direction::Forward)
        .unwrap();
    assert_eq!(payload(&t3[0])["client_name"], "Name of client-42");
    assert_eq!(t3[0].sealing().unwrap().generation, 2);
    let t1 = log
        .read_stream("trade-1", 0, 1, Direction::Forward)
        .unwrap();
    assert!(payload(&t1[0])["client_name"]["$erased"].is_object());
}

#[test]
fn a_legal_hold_refuses_the_erasure_naming_the_hold() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    let log = open(&d.path().join("log"), k.path());
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[confirmation("client-42", 1)],
    )
    .unwrap();
    log.append(
        "trade-2",
        ExpectedVersion::NoStream,
        &[confirmation("client-7", 2)],
    )
    .unwrap();
    log.place_legal_hold(
        &HoldPlaced {
            id: "case-17".into(),
            scope: HoldScope::CorrelationId("corr-1".into()),
            reason: "litigation with client-42".into(),
        },
        "legal@firm",
    )
    .unwrap();
    let err = log.forget("client-42", "dpo@firm", "request").unwrap_err();
    match &err {
        Error::ErasureHeld { hold, position, .. } => {
            assert_eq!(hold, "case-17");
            assert_eq!(*position, 0);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("case-17"), "{err}");
    // Nothing was erased or recorded.
    let t1 = log
        .read_stream("trade-1", 0, 1, Direction::Forward)
        .unwrap();
    assert_eq!(payload(&t1[0])["client_name"], "Name of client-42");
    assert!(log.erasures().is_empty());
    // A subject the hold does not cover is erased.
    log.forget("client-7", "dpo@firm", "request").unwrap();
    // Released, the erasure goes through.
    log.release_legal_hold("case-17", "legal@firm", "settled")
        .unwrap();
    log.forget("client-42", "dpo@firm", "request").unwrap();
}

/// A key store whose destruction fails: the crash between the erasure event and the key's
/// destruction, without killing the test.
#[derive(Debug)]
struct FailingDestroy(Arc<FileKeyStore>);

impl KeyStore for FailingDestroy {
    fn location(&self) -> &Path {
        self.0.location()
    }
    fn keys_at_least(
        &self,
        s: &[(tally_engine::format::sealed::SubjectHash, u32)],
    ) -> tally_engine::Result<Vec<(u32, SecretKey)>> {
        self.0.keys_at_least(s)
    }
    fn key(
        &self,
        s: &tally_engine::format::sealed::SubjectHash,
        g: u32,
    ) -> tally_engine::Result<KeyLookup> {
        self.0.key(s, g)
    }
    fn generation(
        &self,
        s: &tally_engine::format::sealed::SubjectHash,
    ) -> tally_engine::Result<Option<(u32, bool)>> {
        self.0.generation(s)
    }
    fn destroy(&self, _: &tally_engine::format::sealed::SubjectHash) -> tally_engine::Result<bool> {
        Err(Error::InvalidOptions {
            reason: "power cut".into(),
        })
    }
    fn token_key(&self) -> &SecretKey {
        self.0.token_key()
    }
    fn subjects(&self) -> usize {
        self.0.subjects()
    }
}

#[test]
fn an_erasure_interrupted_before_the_key_goes_is_finished_by_the_next_open() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    let dir = d.path().join("log");
    {
        let log = Log::open(
            &dir,
            Options {
                keys: Some(Arc::new(FailingDestroy(store(k.path())))),
                ..Options::default()
            },
        )
        .unwrap();
        log.append(
            "trade-1",
            ExpectedVersion::NoStream,
            &[confirmation("client-42", 1)],
        )
        .unwrap();
        assert!(log.forget("client-42", "dpo@firm", "request").is_err());
        // The erasure holds from its event on, though the key is still there.
        let t1 = log
            .read_stream("trade-1", 0, 1, Direction::Forward)
            .unwrap();
        assert!(payload(&t1[0])["client_name"]["$erased"].is_object());
    }
    let h = subject_hash("client-42");
    assert!(matches!(
        peek(k.path()).key(&h, 1).unwrap(),
        KeyLookup::Live(_)
    ));
    let log = open(&dir, k.path());
    assert_eq!(log.recovery_report().erasures_redone, 1);
    assert_eq!(peek(k.path()).key(&h, 1).unwrap(), KeyLookup::Destroyed);
    let t1 = log
        .read_stream("trade-1", 0, 1, Direction::Forward)
        .unwrap();
    assert!(payload(&t1[0])["client_name"]["$erased"].is_object());
}

#[test]
fn refusals_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    // No key store: personal data is refused, nothing is written.
    let plain = Log::open(d.path().join("plain"), Options::default()).unwrap();
    let err = plain
        .append("trade-1", ExpectedVersion::Any, &[confirmation("c", 1)])
        .unwrap_err();
    assert!(err.to_string().contains("no key store"), "{err}");
    assert_eq!(plain.next_position(), Position(0));
    assert!(plain.forget("c", "a", "r").is_err());
    drop(plain);
    // A key store inside the log's directory.
    let inside = d.path().join("inside");
    let err = Log::open(
        &inside,
        Options {
            keys: Some(store(&inside.join("keys"))),
            ..Options::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("inside the log's directory"),
        "{err}"
    );
    // A log of format version 4 cannot seal.
    let v4 = Log::open(
        d.path().join("v4"),
        Options {
            keys: Some(store(k.path())),
            format_version: 4,
            ..Options::default()
        },
    )
    .unwrap();
    let err = v4
        .append("trade-1", ExpectedVersion::Any, &[confirmation("c", 1)])
        .unwrap_err();
    assert!(err.to_string().contains("format version 4"), "{err}");
    drop(v4);
    let log = open(&d.path().join("log"), k.path());
    // Personal fields of a payload that is not a JSON object; a system stream; the erasure
    // stream written directly; an unknown subject.
    let bad = EventData::json("X", "[1,2]").personal(Personal::fields("c", ["a"]));
    assert!(log.append("s", ExpectedVersion::Any, &[bad]).is_err());
    assert!(
        log.append("$mine", ExpectedVersion::Any, &[confirmation("c", 1)])
            .is_err()
    );
    assert!(
        log.append(
            ERASURE_STREAM,
            ExpectedVersion::Any,
            &[EventData::json("X", "{}")]
        )
        .is_err()
    );
    let err = log.forget("nobody", "dpo", "r").unwrap_err();
    assert!(err.to_string().contains("no key of subject"), "{err}");
    assert!(log.forget("c", "", "r").is_err());
}

#[test]
fn without_its_key_store_a_log_reads_markers_not_ciphertext_or_errors() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    let dir = d.path().join("log");
    open(&dir, k.path())
        .append(
            "trade-1",
            ExpectedVersion::NoStream,
            &[confirmation("client-42", 1)],
        )
        .unwrap();
    let log = Log::open(&dir, Options::default()).unwrap();
    let t1 = log
        .read_stream("trade-1", 0, 1, Direction::Forward)
        .unwrap();
    let p = payload(&t1[0]);
    assert!(p["client_name"]["$sealed"]["reason"].is_string(), "{p}");
    assert_eq!(p["book"], "RATES-1");
    assert!(matches!(
        t1[0].sealing().unwrap().state,
        SealState::Unavailable { .. }
    ));
    log.verify().unwrap();
}

#[test]
fn a_large_batch_is_sealed_in_order_across_streams() {
    let d = tempfile::tempdir().unwrap();
    let k = tempfile::tempdir().unwrap();
    let log = open(&d.path().join("log"), k.path());
    // Over the size from which sealing is spread over the cores, mixed with plain events,
    // in two streams of one atomic append.
    let a: Vec<EventData> = (0..400)
        .map(|n| {
            if n % 7 == 0 {
                EventData::json("Plain", format!("{{\"n\":{n}}}"))
            } else {
                confirmation(&format!("client-{}", n % 50), n)
            }
        })
        .collect();
    let b: Vec<EventData> = (400..700).map(|n| confirmation("client-x", n)).collect();
    log.append_multi(&[
        tally_engine::AppendRequest {
            stream: "batch-a",
            expected: ExpectedVersion::NoStream,
            events: &a,
        },
        tally_engine::AppendRequest {
            stream: "batch-b",
            expected: ExpectedVersion::NoStream,
            events: &b,
        },
    ])
    .unwrap();
    let got = log
        .read_stream("batch-a", 0, 1000, Direction::Forward)
        .unwrap();
    assert_eq!(got.len(), 400);
    for (n, e) in got.iter().enumerate() {
        let p = payload(e);
        if n % 7 == 0 {
            assert_eq!(p["n"], n);
            assert!(e.sealing().is_none());
        } else {
            assert_eq!(p["trade_id"], format!("T-{n}"));
            assert_eq!(p["client_name"], format!("Name of client-{}", n % 50));
        }
    }
    let got = log
        .read_stream("batch-b", 0, 1000, Direction::Forward)
        .unwrap();
    assert_eq!(got.len(), 300);
    assert_eq!(payload(&got[299])["trade_id"], "T-699");
    assert_eq!(payload(&got[299])["client_name"], "Name of client-x");
}

/// A power cut at any disk operation of a forget (the simulated disk drops what was not
/// synced; the key store is on the real disk, whose writes a cut does not undo): after the
/// reopen the erasure is whole (its event is in the log, and the key is gone) or absent (the
/// data reads as before, the key is live), an acknowledged one is whole, and the other
/// subject's data is untouched.
#[test]
fn a_power_cut_at_any_step_of_a_forget_leaves_it_whole_or_absent() {
    use tally_engine::sim::{Cut, SimFs};
    let data = std::path::PathBuf::from("/erasure/data");
    let h = subject_hash("client-42");
    for seed in [41u64, 42] {
        let mut n = 1;
        loop {
            let sim = SimFs::new(seed);
            let k = tempfile::tempdir().unwrap();
            let options = |keys: Arc<FileKeyStore>| Options {
                durability: tally_engine::Durability::None,
                storage: tally_engine::Storage::simulated(&sim),
                checkpoint_interval: None,
                auto_checkpoints: false,
                index_attributes: false,
                keys: Some(keys),
                ..Options::default()
            };
            let log = Log::open(&data, options(store(k.path()))).unwrap();
            log.append(
                "trade-1",
                ExpectedVersion::NoStream,
                &[confirmation("client-42", 1)],
            )
            .unwrap();
            log.append(
                "trade-2",
                ExpectedVersion::NoStream,
                &[confirmation("client-7", 2)],
            )
            .unwrap();
            log.sync().unwrap();
            sim.cut_power_after(n, Cut::seeded_loss());
            let acked = log.forget("client-42", "dpo", "request").is_ok();
            let fired = sim.generation() > 0;
            log.crash();
            if !fired {
                assert!(acked);
                break;
            }
            let at = |what: &str| format!("seed {seed}, power cut at operation {n}: {what}");
            let log = Log::open(&data, options(store(k.path())))
                .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
            log.verify()
                .unwrap_or_else(|e| panic!("{}", at(&e.to_string())));
            let t1 = log
                .read_stream("trade-1", 0, 1, Direction::Forward)
                .unwrap();
            let p = payload(&t1[0]);
            let key = log.key_store().unwrap().key(&h, 1).unwrap();
            match log.erasures().get(&h) {
                Some(er) => {
                    assert_eq!(
                        p["client_name"]["$erased"]["by"],
                        er.position.0,
                        "{}",
                        at("marker")
                    );
                    assert_eq!(
                        key,
                        KeyLookup::Destroyed,
                        "{}",
                        at("a recorded erasure's key lives")
                    );
                }
                None => {
                    assert!(!acked, "{}", at("an acknowledged erasure was lost"));
                    assert_eq!(p["client_name"], "Name of client-42", "{}", at("data lost"));
                    assert!(
                        matches!(key, KeyLookup::Live(_)),
                        "{}",
                        at("a key destroyed with no erasure")
                    );
                }
            }
            let t2 = log
                .read_stream("trade-2", 0, 1, Direction::Forward)
                .unwrap();
            assert_eq!(
                payload(&t2[0])["client_name"],
                "Name of client-7",
                "{}",
                at("other subject")
            );
            log.close().unwrap();
            n += 1;
        }
        // The forget's own disk operations are few (its event's write and sync): at least
        // one cut landed among them.
        assert!(n >= 2, "seed {seed}: no cut landed in the forget");
    }
}

/// A forget racing appends of its subject: every event appended before the erasure event
/// reads erased, every one after reads whole under a new key (none is erased that the
/// forget never saw), and a held stream's event is never erased (the forget is refused
/// instead, or came before it).
#[test]
fn a_forget_racing_appends_erases_only_what_came_before_it_and_never_what_a_hold_covers() {
    for round in 0..6 {
        let d = tempfile::tempdir().unwrap();
        let k = tempfile::tempdir().unwrap();
        let log = Arc::new(open(&d.path().join("log"), k.path()));
        log.append(
            "trade-0",
            ExpectedVersion::NoStream,
            &[confirmation("client-42", 0)],
        )
        .unwrap();
        log.place_legal_hold(
            &HoldPlaced {
                id: "case-1".into(),
                scope: HoldScope::Stream("held".into()),
                reason: "litigation".into(),
            },
            "legal",
        )
        .unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let appender = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 1u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 400 {
                    // Every seventh into the held stream, from the middle of the round on.
                    let stream = if n.is_multiple_of(7) && n > 20 * round {
                        "held"
                    } else {
                        "trades"
                    };
                    log.append(
                        stream,
                        ExpectedVersion::Any,
                        &[confirmation("client-42", n)],
                    )
                    .unwrap();
                    n += 1;
                }
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(2 + 3 * round as u64));
        let forgot = log.forget("client-42", "dpo", "request");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        appender.join().unwrap();
        let by = match &forgot {
            Ok(r) => Some(r.position),
            Err(Error::ErasureHeld { hold, .. }) => {
                assert_eq!(hold, "case-1");
                None
            }
            Err(e) => panic!("{e}"),
        };
        for stream in ["trade-0", "trades", "held"] {
            for e in log
                .read_stream(stream, 0, 10_000, Direction::Forward)
                .unwrap()
            {
                let p = payload(&e);
                let erased = p["client_name"]["$erased"].is_object();
                match by {
                    Some(by) if e.position.0 < by => {
                        assert!(
                            erased,
                            "round {round}: {stream} at {} before the erasure at {by} reads {p}",
                            e.position
                        );
                        assert_ne!(stream, "held", "round {round}: a held event was erased");
                    }
                    _ => {
                        assert!(
                            !erased,
                            "round {round}: {stream} at {} reads {p}",
                            e.position
                        );
                        assert_eq!(e.sealing().unwrap().state, SealState::Opened);
                    }
                }
            }
        }
        log.verify().unwrap();
    }
}
