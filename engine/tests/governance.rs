//! Retention policies and legal holds as events of `$governance`: their history with actor
//! and reason, the rules in force after a reopen, the stream written only through its
//! operations, and the retention plan judging every event against policies and holds.

#![allow(clippy::unwrap_used)]

use tally_engine::governance::{
    GOVERNANCE_STREAM, HoldPlaced, HoldScope, Keep, PolicyScope, PolicySet,
};
use tally_engine::{Direction, Error, EventData, ExpectedVersion, Log, Options, Timestamp};

const YEAR: u64 = 31_557_600 * 1_000_000_000;

fn policy(name: &str, scope: PolicyScope, keep: Keep) -> PolicySet {
    PolicySet {
        name: name.into(),
        scope,
        keep,
        reason: format!("{name}: MiFID II record keeping"),
    }
}

fn hold(id: &str, scope: HoldScope) -> HoldPlaced {
    HoldPlaced {
        id: id.into(),
        scope,
        reason: format!("{id}: litigation"),
    }
}

fn trade(log: &Log, id: u32, types: &[&str], corr: &str) {
    let events: Vec<EventData> = types
        .iter()
        .map(|t| {
            EventData::json(*t, format!("{{\"trade\":{id}}}"))
                .aggregate_type("Trade")
                .actor("desk-7")
                .correlation_id(corr)
        })
        .collect();
    log.append(&format!("trade-{id}"), ExpectedVersion::Any, &events)
        .unwrap();
}

#[test]
fn changes_are_events_with_actor_and_reason_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let p = policy(
        "trades-7y",
        PolicyScope::Prefix("trade-".into()),
        Keep::AfterEvent {
            event_type: "TradeSettled".into(),
            nanos: 7 * YEAR,
        },
    );
    log.set_retention_policy(&p, "compliance@firm").unwrap();
    log.place_legal_hold(
        &hold("case-1", HoldScope::Stream("trade-9".into())),
        "legal@firm",
    )
    .unwrap();
    // A second hold with the same id, and withdrawing what does not exist, are refused.
    let err = log
        .place_legal_hold(&hold("case-1", HoldScope::Actor("x".into())), "legal@firm")
        .unwrap_err();
    assert!(err.to_string().contains("already stands"), "{err}");
    let err = log
        .release_legal_hold("case-2", "legal@firm", "done")
        .unwrap_err();
    assert!(err.to_string().contains("no legal hold"), "{err}");
    let err = log
        .remove_retention_policy("nope", "compliance@firm", "typo")
        .unwrap_err();
    assert!(err.to_string().contains("no retention policy"), "{err}");
    // The stream is written only through the operations.
    let err = log
        .append(
            GOVERNANCE_STREAM,
            ExpectedVersion::Any,
            &[EventData::json(
                "$LegalHoldReleased",
                r#"{"name":"case-1","reason":"x"}"#,
            )],
        )
        .unwrap_err();
    assert!(matches!(err, Error::InvalidAppend { .. }), "{err}");
    // A second policy for the same scope is refused (which one applied would be left to
    // their names); setting the same name again replaces it.
    let mut twin = p.clone();
    twin.name = "trades-10y".into();
    let err = log
        .set_retention_policy(&twin, "compliance@firm")
        .unwrap_err();
    assert!(
        err.to_string().contains("already covers that scope"),
        "{err}"
    );
    // An invalid definition is refused before anything is written.
    let mut bad = p.clone();
    bad.keep = Keep::Newest { count: 0 };
    assert!(log.set_retention_policy(&bad, "compliance@firm").is_err());
    log.place_legal_hold(
        &hold("case-2", HoldScope::CorrelationId("order-5".into())),
        "legal@firm",
    )
    .unwrap();
    log.release_legal_hold("case-2", "legal@firm", "matter closed")
        .unwrap();
    log.close().unwrap();

    let log = Log::open(dir.path(), Options::default()).unwrap();
    let g = log.governance().unwrap();
    assert_eq!(g.policies.len(), 1);
    assert_eq!(g.policies["trades-7y"].policy, p);
    assert_eq!(g.policies["trades-7y"].set.actor, "compliance@firm");
    assert_eq!(g.holds.keys().collect::<Vec<_>>(), ["case-1"]);
    assert_eq!(g.holds["case-1"].placed.actor, "legal@firm");
    // The history: every change, in order, with who and why.
    let history = log
        .read_stream(GOVERNANCE_STREAM, 0, 100, Direction::Forward)
        .unwrap();
    let kinds: Vec<(&str, &str)> = history
        .iter()
        .map(|e| (e.event_type(), e.actor()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("$RetentionPolicySet", "compliance@firm"),
            ("$LegalHoldPlaced", "legal@firm"),
            ("$LegalHoldPlaced", "legal@firm"),
            ("$LegalHoldReleased", "legal@firm"),
        ]
    );
    let last: serde_json::Value = serde_json::from_slice(history[3].payload()).unwrap();
    assert_eq!(last["reason"], "matter closed");
    log.remove_retention_policy("trades-7y", "compliance@firm", "superseded")
        .unwrap();
    assert!(log.governance().unwrap().policies.is_empty());
}

#[test]
fn the_plan_removes_what_policies_say_and_keeps_what_holds_cover() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    // trade-1: settled, nothing holds it: goes whole.
    trade(
        &log,
        1,
        &["TradeNew", "TradeAmended", "TradeSettled"],
        "order-1",
    );
    // trade-2: not settled: its clock never started.
    trade(&log, 2, &["TradeNew", "TradeAmended"], "order-2");
    // trade-3: settled, under a stream hold: kept whole.
    trade(&log, 3, &["TradeNew", "TradeSettled"], "order-3");
    // trade-4: settled; one event carries a held correlation id.
    trade(&log, 4, &["TradeNew"], "order-4");
    trade(&log, 4, &["TradeAmended", "TradeSettled"], "order-held");
    // quote-*: the newest two kept.
    for n in 0..5 {
        log.append(
            "quote-1",
            ExpectedVersion::Any,
            &[EventData::json("Quoted", format!("{{\"n\":{n}}}"))],
        )
        .unwrap();
    }
    // No policy yet: nothing goes.
    let far = Timestamp(tally_engine::now().0 + 8 * YEAR);
    assert_eq!(log.retention_plan(far).unwrap().removed_events(), 0);
    log.set_retention_policy(
        &policy(
            "trades-7y",
            PolicyScope::Prefix("trade-".into()),
            Keep::AfterEvent {
                event_type: "TradeSettled".into(),
                nanos: 7 * YEAR,
            },
        ),
        "compliance",
    )
    .unwrap();
    log.set_retention_policy(
        &policy(
            "quotes",
            PolicyScope::Prefix("quote-".into()),
            Keep::Newest { count: 2 },
        ),
        "compliance",
    )
    .unwrap();
    log.set_retention_policy(
        &policy(
            "default-1d",
            PolicyScope::Default,
            Keep::AfterLastEvent {
                nanos: 86_400_000_000_000,
            },
        ),
        "compliance",
    )
    .unwrap();
    log.place_legal_hold(
        &hold("case-3", HoldScope::Stream("trade-3".into())),
        "legal",
    )
    .unwrap();
    log.place_legal_hold(
        &hold("case-4", HoldScope::CorrelationId("order-held".into())),
        "legal",
    )
    .unwrap();

    // Six years on: the trades are within their retention; the quotes' count rule applies.
    let soon = Timestamp(tally_engine::now().0 + 6 * YEAR);
    let plan = log.retention_plan(soon).unwrap();
    let streams: Vec<(&str, usize)> = plan
        .removals
        .iter()
        .map(|r| (r.stream.as_str(), r.positions.len()))
        .collect();
    assert_eq!(streams, [("quote-1", 3)]);
    assert_eq!(plan.removals[0].versions, (0, 2));
    assert_eq!(plan.removals[0].policy, "quotes");

    let plan = log.retention_plan(far).unwrap();
    let streams: Vec<(&str, &str, u64, u64)> = plan
        .removals
        .iter()
        .map(|r| {
            (
                r.stream.as_str(),
                r.policy.as_str(),
                r.versions.0,
                r.positions.len() as u64,
            )
        })
        .collect();
    assert_eq!(
        streams,
        [
            ("quote-1", "quotes", 0, 3),
            ("trade-1", "trades-7y", 0, 3),
            ("trade-4", "trades-7y", 0, 1),
        ]
    );
    assert!(
        plan.removals[1].why.contains("7y after TradeSettled"),
        "{}",
        plan.removals[1].why
    );
    let held: Vec<(&str, Vec<String>, u64)> = plan
        .held
        .iter()
        .map(|h| (h.stream.as_str(), h.holds.clone(), h.events))
        .collect();
    assert_eq!(
        held,
        [
            ("trade-3", vec!["case-3".to_owned()], 2),
            ("trade-4", vec!["case-4".to_owned()], 2),
        ]
    );
    // The positions are the streams' own.
    let t1 = log
        .read_stream("trade-1", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(
        plan.removals[1].positions,
        t1.iter().map(|e| e.position.0).collect::<Vec<_>>()
    );
    // System streams are never removed, whatever the default says.
    assert!(plan.removals.iter().all(|r| !r.stream.starts_with('$')));
    // Releasing a hold lets its policy apply.
    log.release_legal_hold("case-3", "legal", "settled out of court")
        .unwrap();
    let plan = log.retention_plan(far).unwrap();
    assert!(plan.removals.iter().any(|r| r.stream == "trade-3"));
    assert_eq!(plan.held_events(), 2);
}
