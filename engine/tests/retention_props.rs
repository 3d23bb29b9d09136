//! Property: for random histories, retention policies and legal holds, a retention run
//! removes exactly what the policies say minus what the holds cover (an independent model
//! computes it), every proof made before the run verifies against the checkpoint signed
//! before it, `verify` passes and reports each removal, and the log extends that checkpoint.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use tally_engine::governance::{HoldPlaced, HoldScope, Keep, PolicyScope, PolicySet};
use tally_engine::{Direction, EventData, ExpectedVersion, Log, Options, Position};

const STREAMS: [&str; 6] = [
    "trade-0", "trade-1", "quote-0", "quote-1", "misc-0", "misc-1",
];
const TYPES: [&str; 4] = ["New", "Amend", "Settle", "Cancel"];

fn policy(name: &str, scope: PolicyScope, keep: Keep) -> PolicySet {
    PolicySet {
        name: name.into(),
        scope,
        keep,
        reason: "property".into(),
    }
}

fn hold_scope(kind: u8, v: u8) -> HoldScope {
    match kind {
        0 => HoldScope::Stream(STREAMS[usize::from(v) % 6].into()),
        1 => HoldScope::CorrelationId(format!("c{}", v % 3)),
        _ => HoldScope::Actor(format!("a{}", v % 3)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn a_run_removes_what_policies_say_keeps_what_holds_cover_and_every_proof_holds(
        events in prop::collection::vec((0u8..6, 0u8..4, 0u8..3, 0u8..3), 10..70),
        newest in 1u64..4,
        with_default in any::<bool>(),
        holds in prop::collection::vec((0u8..3, 0u8..6), 0..3),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), Options { segment_bytes: 64 << 10, ..Options::default() }).unwrap();
        // (position, stream, type, actor, correlation) of each event, in order.
        let mut written = Vec::new();
        for (s, t, a, c) in &events {
            let (stream, actor, corr) = (STREAMS[usize::from(*s)], format!("a{a}"), format!("c{c}"));
            let e = EventData::json(TYPES[usize::from(*t)], r#"{"client":"Jane Doe"}"#)
                .actor(actor.clone())
                .correlation_id(corr.clone());
            let r = log.append(stream, ExpectedVersion::Any, &[e]).unwrap();
            written.push((r.first_position.0, stream, TYPES[usize::from(*t)], actor, corr));
        }
        let cp = log.checkpoint().unwrap();
        let size = cp.statement.tree_size;
        let before = log.read_all(Position(0), 100_000, Direction::Forward).unwrap();
        let proofs: Vec<_> = (0..size).map(|p| log.prove_inclusion(Position(p), size).unwrap()).collect();
        for k in 0..250 {
            let e = EventData::json("Pad", format!(r#"{{"k":{k},"pad":"{}"}}"#, "x".repeat(250)));
            log.append("pad", ExpectedVersion::Any, &[e]).unwrap();
        }
        log.wait_sealed().unwrap();
        let ns = 1;
        log.set_retention_policy(&policy("trades", PolicyScope::Prefix("trade-".into()),
            Keep::AfterEvent { event_type: "Settle".into(), nanos: ns }), "c").unwrap();
        log.set_retention_policy(&policy("quotes", PolicyScope::Prefix("quote-".into()),
            Keep::Newest { count: newest }), "c").unwrap();
        if with_default {
            log.set_retention_policy(&policy("rest", PolicyScope::Prefix("misc-".into()),
                Keep::AfterLastEvent { nanos: ns }), "c").unwrap();
        }
        let scopes: Vec<HoldScope> = holds.iter().map(|(k, v)| hold_scope(*k, *v)).collect();
        for (i, scope) in scopes.iter().enumerate() {
            log.place_legal_hold(&HoldPlaced { id: format!("h{i}"), scope: scope.clone(), reason: "r".into() }, "l").unwrap();
        }
        // The model: per stream, what its policy removes; minus what a hold covers.
        let mut expected = BTreeSet::new();
        for stream in STREAMS {
            let mine: Vec<_> = written.iter().filter(|w| w.1 == stream).collect();
            let due: Vec<_> = if stream.starts_with("trade-") {
                if mine.iter().any(|w| w.2 == "Settle") { mine.clone() } else { Vec::new() }
            } else if stream.starts_with("quote-") {
                let keep_from = (mine.len() as u64).saturating_sub(newest) as usize;
                mine[..keep_from].to_vec()
            } else if with_default {
                mine.clone()
            } else {
                Vec::new()
            };
            for w in due {
                let held = scopes.iter().any(|h| match h {
                    HoldScope::Stream(s) => s == w.1,
                    HoldScope::CorrelationId(c) => *c == w.4,
                    HoldScope::Actor(a) => *a == w.3,
                    _ => false,
                });
                if !held {
                    expected.insert(w.0);
                }
            }
        }
        let as_of = tally_engine::now();
        let run = log.apply_retention(as_of, "ops", "property").unwrap();
        prop_assert_eq!(run.pending, 0);
        let removed: BTreeSet<u64> = before.iter()
            .filter(|e| log.read_all(e.position, 1, Direction::Forward).unwrap()[0].removed_by().is_some())
            .map(|e| e.position.0)
            .collect();
        prop_assert_eq!(&removed, &expected);
        prop_assert_eq!(run.removed, expected.len() as u64);
        // Kept events are untouched, removed ones keep their record hash.
        for e in &before {
            let now = &log.read_all(e.position, 1, Direction::Forward).unwrap()[0];
            prop_assert_eq!(now.record_hash, e.record_hash);
            if !expected.contains(&e.position.0) {
                prop_assert_eq!(now, e);
            }
        }
        for (p, proof) in proofs.iter().enumerate() {
            proof.verify(&before[p].record_hash, &cp.statement.root).unwrap();
        }
        let report = log.verify().unwrap();
        prop_assert_eq!(report.removed.iter().map(|r| r.to - r.from).sum::<u64>(), expected.len() as u64);
        let cp2 = log.checkpoint().unwrap();
        log.prove_consistency(size, cp2.statement.tree_size).unwrap()
            .verify(&cp.statement.root, &cp2.statement.root).unwrap();
        log.close().unwrap();
    }
}
