//! `tally audit`: who, what, when and why for one stream.

#![allow(clippy::unwrap_used)]

use std::process::Command;

use tally_engine::{Direction, EventData, ExpectedVersion, Log, Options};

#[test]
fn audit_explains_a_trade_with_its_causation_chain_and_correlated_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let order = EventData::json("OrderPlaced", r#"{"qty":"100"}"#)
        .actor("alice")
        .correlation_id("deal-1");
    log.append("order-7", ExpectedVersion::NoStream, &[order])
        .unwrap();
    let placed = log
        .read_stream("order-7", 0, 1, Direction::Forward)
        .unwrap()
        .remove(0);
    let new = EventData::json("NEW", r#"{"qty":"100","px":"81.10"}"#)
        .actor("bob")
        .correlation_id("deal-1")
        .causation_id(placed.event_id.to_string());
    log.append("trade-42", ExpectedVersion::NoStream, &[new])
        .unwrap();
    let booked = log
        .read_stream("trade-42", 0, 1, Direction::Forward)
        .unwrap()
        .remove(0);
    let amend = EventData::json("AMEND", r#"{"qty":"150"}"#)
        .actor("carol")
        .correlation_id("deal-1")
        .causation_id(booked.event_id.to_string());
    log.append("trade-42", ExpectedVersion::Exact(0), &[amend])
        .unwrap();
    log.append(
        "trade-99",
        ExpectedVersion::NoStream,
        &[EventData::json("NEW", "{}").correlation_id("deal-2")],
    )
    .unwrap();
    // Unrelated business the audit must not read: it looks up through the indexes.
    for i in 0..3000u64 {
        let e = EventData::json("TICK", format!(r#"{{"i":{i}}}"#))
            .correlation_id(format!("deal-{}", 100 + i % 50))
            .causation_id(placed.event_id.to_string());
        log.append(&format!("other-{}", i % 40), ExpectedVersion::Any, &[e])
            .unwrap();
    }
    log.close().unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("audit")
        .arg(dir.path())
        .args(["--stream", "trade-42", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let events = v["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    // NEW: by bob, caused by alice's order, correlated with the order and the amendment.
    assert_eq!(events[0]["event"]["actor"], "bob");
    let chain = events[0]["why"]["causation_chain"].as_array().unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(chain[0]["type"], "OrderPlaced");
    assert_eq!(chain[0]["actor"], "alice");
    let correlated: Vec<&str> = events[0]["why"]["correlated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stream"].as_str().unwrap())
        .collect();
    assert_eq!(correlated, ["order-7", "trade-42"]);
    // AMEND: the chain goes back through the NEW to the order.
    let chain: Vec<&str> = events[1]["why"]["causation_chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(chain, ["NEW", "OrderPlaced"]);
    assert_eq!(events[1]["event"]["payload"]["qty"], "150");
    // The stream (2), the correlated events (3) and the causes (2): not the 3,004 events.
    assert_eq!(v["events_read"], 7, "{v}");

    // The table names who, what, when and why.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("audit")
        .arg(dir.path())
        .args(["--stream", "trade-42"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("AMEND") && text.contains("by carol"),
        "{text}"
    );
    assert!(text.contains("because: NEW trade-42 v0 by bob"), "{text}");
    assert!(
        text.contains("because: OrderPlaced order-7 v0 by alice"),
        "{text}"
    );

    // An unknown stream is an error.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("audit")
        .arg(dir.path())
        .args(["--stream", "trade-0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
