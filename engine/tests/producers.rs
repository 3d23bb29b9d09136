//! Producer-signed batches (docs/FORMAT.md, "Producer-signed batches"): a batch signed with
//! a registered producer key is stored with its signature and reads back like any other;
//! under a per-prefix policy an unsigned batch, one signed by an unregistered, revoked or
//! out-of-prefix key, or one whose signature does not cover what is sent, is refused with
//! nothing written. The policy lives in `$producers` and survives a reopen; nothing else
//! may write that stream.

#![allow(clippy::unwrap_used)]

use ed25519_dalek::SigningKey;
use tally_engine::format::producer::ProducerSignature;
use tally_engine::{
    AppendRequest, Direction, Error, EventData, ExpectedVersion, Log, Options, Position,
    new_event_id, now,
};

fn opts() -> Options {
    Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    }
}

fn event(i: u64) -> EventData {
    EventData::json("AMEND", format!(r#"{{"qty":"{i}"}}"#))
        .with_id(new_event_id())
        .event_time(now())
        .actor("oms")
}

fn refused(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ Error::SignatureRefused { .. }) => e.to_string(),
        other => panic!("expected a refused signature, got {other:?}"),
    }
}

#[test]
fn signed_batches_are_stored_checked_and_enforced_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let oms = SigningKey::from_bytes(&[7; 32]);
    let rogue = SigningKey::from_bytes(&[8; 32]);
    let pk = oms.verifying_key().to_bytes();
    log.register_producer_key(pk, "oms", &["trade-".into()], "alice", "OMS go-live")
        .unwrap();
    log.require_signatures(
        "trade-",
        "alice",
        "MiFID II: every trade event signed at source",
    )
    .unwrap();
    // Signed by the OMS: stored, and read back like any event.
    let r = log
        .append_signed(
            "trade-1",
            ExpectedVersion::NoStream,
            &[event(1), event(2)],
            &oms,
        )
        .unwrap();
    assert_eq!(r.last_version, 1);
    let read = log
        .read_stream("trade-1", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].payload(), br#"{"qty":"1"}"#);
    // Unsigned, signed by a key nobody registered, or signed for other events: refused,
    // nothing written.
    let before = log.next_position();
    let msg = refused(log.append("trade-1", ExpectedVersion::Any, &[event(3)]));
    assert!(
        msg.contains("must be signed") && msg.contains("trade-"),
        "{msg}"
    );
    let msg = refused(log.append_signed("trade-1", ExpectedVersion::Any, &[event(3)], &rogue));
    assert!(msg.contains("not a registered producer key"), "{msg}");
    let sent = [event(4)];
    let other = [event(5)];
    let sig = tally_engine::producer_signature(
        &log.log_id(),
        &[AppendRequest {
            stream: "trade-1",
            expected: ExpectedVersion::Any,
            events: &other,
        }],
        &oms,
    )
    .unwrap();
    let msg = refused(log.append_multi_signed(
        &[AppendRequest {
            stream: "trade-1",
            expected: ExpectedVersion::Any,
            events: &sent,
        }],
        &sig,
    ));
    assert!(msg.contains("does not verify"), "{msg}");
    // A signature made for another log does not verify here either.
    let foreign = ProducerSignature::sign(&oms, &[0; 16], &[[0; 32]]);
    let msg = refused(log.append_multi_signed(
        &[AppendRequest {
            stream: "trade-1",
            expected: ExpectedVersion::Any,
            events: &sent,
        }],
        &foreign,
    ));
    assert!(msg.contains("does not verify"), "{msg}");
    // Out of the key's prefixes.
    let msg = refused(log.append_signed("order-1", ExpectedVersion::Any, &[event(6)], &oms));
    assert!(msg.contains("may not sign for stream order-1"), "{msg}");
    assert_eq!(log.next_position(), before, "nothing was written");
    // A signed batch must name its events' ids and times.
    let err = log
        .append_multi_signed(
            &[AppendRequest {
                stream: "trade-1",
                expected: ExpectedVersion::Any,
                events: &[EventData::json("AMEND", "{}")],
            }],
            &sig,
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAppend { .. }), "{err:?}");
    // Streams outside the policy take unsigned appends.
    log.append("order-1", ExpectedVersion::Any, &[event(7)])
        .unwrap();
    // Nobody writes $producers but the registration operations.
    let err = log
        .append(
            "$producers",
            ExpectedVersion::Any,
            &[EventData::json("$SignaturesRequired", "{}")],
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAppend { .. }), "{err:?}");
    log.close().unwrap();

    // The policy is in the log: after a reopen it holds, and a revocation takes effect.
    let log = Log::open(dir.path(), opts()).unwrap();
    refused(log.append("trade-2", ExpectedVersion::Any, &[event(8)]));
    log.append_signed("trade-2", ExpectedVersion::Any, &[event(9)], &oms)
        .unwrap();
    log.revoke_producer_key(pk, "bob", "key left with the OMS vendor")
        .unwrap();
    let msg = refused(log.append_signed("trade-2", ExpectedVersion::Any, &[event(10)], &oms));
    assert!(msg.contains("revoked"), "{msg}");
    let audit = log
        .read_stream("$producers", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(audit.len(), 3);
    assert_eq!(audit[2].actor(), "bob");
    assert!(
        std::str::from_utf8(audit[2].payload())
            .unwrap()
            .contains("vendor")
    );
    log.verify().unwrap();
    // Scans see the envelope, not the producer block.
    let mut types = Vec::new();
    log.scan(Position(0), tally_engine::Verify::Chain, |r| {
        types.push(r.envelope().unwrap().event_type.to_owned());
    })
    .unwrap();
    assert!(
        types.iter().all(|t| t == "AMEND" || t.starts_with('$')),
        "{types:?}"
    );
}

#[test]
fn a_version_1_log_cannot_require_signatures() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            format_version: 1,
            ..opts()
        },
    )
    .unwrap();
    assert!(matches!(
        log.require_signatures("trade-", "a", "b"),
        Err(Error::InvalidOptions { .. })
    ));
    let key = SigningKey::from_bytes(&[7; 32]);
    assert!(matches!(
        log.register_producer_key(key.verifying_key().to_bytes(), "oms", &[], "a", "b"),
        Err(Error::InvalidOptions { .. })
    ));
    refused(log.append_signed("t", ExpectedVersion::Any, &[event(1)], &key));
    assert_eq!(log.next_position().0, 0, "nothing was written");
}
