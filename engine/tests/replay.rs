//! Replay validation: an unchanged handler reproduces the archive exactly; a changed one is
//! caught at the first aggregate and event it affects; a tampered archive does not verify.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use tally_engine::format::checkpoint::SigningKey;
use tally_engine::projection::Projection;
use tally_engine::replay::{
    Archive, Divergence, Traced, Validation, ValidationError, trace, validate,
};
use tally_engine::{EventData, EventView, ExpectedVersion, Log, Options};

thread_local! {
    /// The "code version": 2 rounds quantities of book-2 differently (a changed handler).
    static CODE: std::cell::Cell<u32> = const { std::cell::Cell::new(1) };
}

/// Net quantity per book, from payloads `book:qty`.
#[derive(Default)]
struct Net(BTreeMap<String, i64>);

fn parse(e: &dyn EventView) -> (String, i64) {
    let t = std::str::from_utf8(e.payload()).unwrap();
    let (b, q) = t.split_once(':').unwrap();
    (b.to_owned(), q.parse().unwrap())
}

impl Projection for Net {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Net {
        Net::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let (book, mut q) = parse(e);
        if CODE.with(std::cell::Cell::get) == 2 && book == "book-2" && q < 0 {
            q -= 1;
        }
        *self.0.entry(book).or_default() += q;
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        self.0
            .iter()
            .map(|(k, v)| format!("{k}={v};"))
            .collect::<String>()
            .into_bytes()
    }

    fn decode_state(b: &[u8]) -> Option<Net> {
        let mut m = BTreeMap::new();
        for part in std::str::from_utf8(b)
            .ok()?
            .split(';')
            .filter(|p| !p.is_empty())
        {
            let (k, v) = part.split_once('=')?;
            m.insert(k.to_owned(), v.parse().ok()?);
        }
        Some(Net(m))
    }
}

impl Traced for Net {
    fn key_of(e: &dyn EventView) -> Option<String> {
        Some(parse(e).0)
    }

    fn encode_part(&self, key: &str) -> Vec<u8> {
        self.0.get(key).copied().unwrap_or(0).to_le_bytes().to_vec()
    }
}

fn log_with_fills(dir: &std::path::Path) -> Log {
    let log = Log::open(dir, Options::default()).unwrap();
    for i in 0..300i64 {
        let book = format!("book-{}", i % 4);
        let qty = (i % 9) - 4;
        log.append(
            &format!("t-{i}"),
            ExpectedVersion::NoStream,
            &[EventData::new("Fill", format!("{book}:{qty}").into_bytes())],
        )
        .unwrap();
    }
    log
}

fn archive_now(log: &Log, key: &SigningKey) -> Archive {
    let to = log.next_position().0;
    let (state, t) = trace::<Net>(log, "net", to).unwrap();
    Archive::sign(
        "net",
        log.log_id(),
        Net::STATE_VERSION,
        "code-1",
        "Fill v1",
        state.encode_state(),
        t,
        key,
    )
}

#[test]
fn an_unchanged_replay_is_identical_and_a_changed_handler_is_located() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_fills(dir.path());
    let key = SigningKey::from_bytes(&[3; 32]);
    let archive = archive_now(&log, &key);
    archive.verify(&[key.verifying_key().to_bytes()]).unwrap();
    // More events after the archive do not matter: the replay stops at its position.
    log.append(
        "t-late",
        ExpectedVersion::Any,
        &[EventData::new("Fill", b"book-2:-3".to_vec())],
    )
    .unwrap();
    match validate::<Net>(&log, &archive, &[]).unwrap() {
        Validation::Identical { steps, .. } => assert_eq!(steps, 300),
        other => panic!("{other:?}"),
    }
    // A changed handler: the first event it treats differently is book-2's first negative
    // quantity. Events i = 2, 6, 10, ... go to book-2 with qty (i % 9) - 4; the first
    // negative one is i = 2 (qty -2), at position 2.
    CODE.with(|c| c.set(2));
    let v = validate::<Net>(&log, &archive, &[]).unwrap();
    CODE.with(|c| c.set(1));
    match &v {
        Validation::Diverged(d @ Divergence::Step { index, .. }) => {
            assert_eq!(d.first(), Some(("book-2", 2)));
            assert_eq!(*index, 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tampered_or_foreign_archive_does_not_verify() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_fills(dir.path());
    let key = SigningKey::from_bytes(&[3; 32]);
    let good = archive_now(&log, &key);
    let mut a = good.clone();
    a.code_version = "code-2".into();
    assert!(a.verify(&[]).is_err(), "a signed field changed");
    let mut a = good.clone();
    a.state[0] ^= 1;
    assert!(
        a.verify(&[]).is_err(),
        "the stored state no longer matches its hash"
    );
    let mut a = good.clone();
    a.trace.steps[5].part_hash[0] ^= 1;
    assert!(
        a.verify(&[]).is_err(),
        "the stored trace no longer matches its digest"
    );
    let other = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
    assert!(good.verify(&[other]).is_err(), "an untrusted key");
    // A trace cannot claim positions the log does not have.
    let end = log.next_position().0;
    assert!(matches!(
        trace::<Net>(&log, "net", end + 1),
        Err(tally_engine::projection::ProjectionError::PastTheEnd { .. })
    ));
    // Another log's archive is refused.
    let dir2 = tempfile::tempdir().unwrap();
    let log2 = log_with_fills(dir2.path());
    assert!(matches!(
        validate::<Net>(&log2, &good, &[]),
        Err(ValidationError::OtherLog)
    ));
}

#[test]
fn an_archive_written_as_json_reads_back_and_validates_later() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_fills(dir.path());
    let key = SigningKey::from_bytes(&[3; 32]);
    let good = archive_now(&log, &key);
    let file = dir.path().join("net.archive.json");
    std::fs::write(&file, good.to_json()).unwrap();
    // Later, from the file alone.
    let text = std::fs::read_to_string(&file).unwrap();
    let back = tally_engine::replay::Archive::from_json(&text).unwrap();
    assert_eq!(back, good);
    let trusted = [key.verifying_key().to_bytes()];
    assert!(matches!(
        validate::<Net>(&log, &back, &trusted),
        Ok(tally_engine::replay::Validation::Identical { .. })
    ));
    // An edited file reads but does not verify; a truncated one does not read.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut edited = v.clone();
    edited["trace"]["steps"][3][1] = serde_json::json!("someone-else");
    let edited = tally_engine::replay::Archive::from_json(&edited.to_string()).unwrap();
    assert!(validate::<Net>(&log, &edited, &trusted).is_err());
    let mut edited = v.clone();
    edited["next"] = serde_json::json!(3);
    let edited = tally_engine::replay::Archive::from_json(&edited.to_string()).unwrap();
    assert!(edited.verify(&trusted).is_err());
    assert!(tally_engine::replay::Archive::from_json(&text[..text.len() / 2]).is_err());
    let mut wrong = v;
    wrong["format"] = serde_json::json!("something-else");
    let err = tally_engine::replay::Archive::from_json(&wrong.to_string()).unwrap_err();
    assert!(err.contains("tally-projection-archive-v1"), "{err}");
}

#[test]
fn a_window_between_two_archives_replays_from_the_earlier_state_only() {
    use tally_engine::replay::validate_window;
    let dir = tempfile::tempdir().unwrap();
    let log = log_with_fills(dir.path());
    let key = SigningKey::from_bytes(&[3; 32]);
    let earlier = archive_now(&log, &key);
    for i in 0..100i64 {
        log.append(
            &format!("u-{i}"),
            ExpectedVersion::NoStream,
            &[EventData::new(
                "Fill",
                format!("book-{}:{}", i % 4, (i % 9) - 4).into_bytes(),
            )],
        )
        .unwrap();
    }
    let later = archive_now(&log, &key);
    let trusted = [key.verifying_key().to_bytes()];
    match validate_window::<Net>(&log, &earlier, &later, &trusted, None).unwrap() {
        Validation::Identical { steps, .. } => assert_eq!(steps, 100, "the window only"),
        other => panic!("{other:?}"),
    }
    // A changed handler is found at the window's first event it treats differently:
    // u-2 (book-2, qty -2), at position 302.
    CODE.with(|c| c.set(2));
    let v = validate_window::<Net>(&log, &earlier, &later, &trusted, None).unwrap();
    CODE.with(|c| c.set(1));
    match &v {
        Validation::Diverged(d) => assert_eq!(d.first(), Some(("book-2", 302))),
        other => panic!("{other:?}"),
    }
    // Archives in the wrong order, or of another projection, are not a window.
    assert!(matches!(
        validate_window::<Net>(&log, &later, &earlier, &trusted, None),
        Err(ValidationError::Window(_))
    ));
    let (state, t) = trace::<Net>(&log, "net", earlier.next).unwrap();
    let other = Archive::sign(
        "other",
        log.log_id(),
        Net::STATE_VERSION,
        "code-1",
        "Fill v1",
        state.encode_state(),
        t,
        &key,
    );
    assert!(matches!(
        validate_window::<Net>(&log, &other, &later, &trusted, None),
        Err(ValidationError::Window(_))
    ));
}
