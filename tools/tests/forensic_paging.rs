//! `tally audit`, `tally find` and `tally dump` of more than a page (issue 23): a stream
//! of 3,000 events sharing one correlation id with 101 events of other streams, read in
//! pages of at most 1,024 events (and, with `--buffer-mb 1`, lookups cut short by their
//! byte budget), locally and through a server.
//!
//! Method: the log is written here with known event ids, causes and correlation ids; the
//! commands' outputs are parsed and compared with what was appended: every event printed
//! exactly once and in order, the causation chains, the correlated lists capped with their
//! count stated, and the same answers with a cache small enough to forget. Guards against
//! paging that skips or repeats the events at a page's edge, and against a related list
//! that grows with the correlation id.

#![allow(clippy::unwrap_used)]

mod common;

use serde_json::Value;
use tally_engine::format::EventId;
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options};

use common::{InProcess, stdout, tally};

/// Events of the audited stream.
const BIG: u64 = 3000;
/// Events of other streams with the same correlation id: the order, and a hedge every 30.
const OTHERS: u64 = 1 + BIG / 30;
/// Events of an unrelated stream, one every second event of the audited one (enough for
/// `dump` to read more than one range of positions).
const NOISE: u64 = BIG / 2;

fn id(n: u64) -> EventId {
    // A UUID v7 shape, numbered in its last bytes.
    let mut b = [0x01; 16];
    b[6] = 0x70;
    b[8] = 0x80;
    b[12..].copy_from_slice(&u32::try_from(n).unwrap().to_le_bytes());
    EventId(b)
}

/// What `i`, the audited stream's event at version `i`, was caused by: the order (every
/// third event), the event before it (the next), or a ticket outside the log.
fn cause(i: u64) -> String {
    match i % 3 {
        0 => id(0).to_string(),
        1 => id(1 + i - 1).to_string(),
        _ => format!("ticket-{i}"),
    }
}

fn event_type(i: u64) -> &'static str {
    ["NEW", "AMEND", "FILL"][(i % 3) as usize]
}

/// Writes the log; returns the positions of the audited stream's events and of every
/// event with its correlation id.
fn write_log(dir: &std::path::Path) -> (Vec<u64>, Vec<u64>) {
    let log = Log::open(
        dir,
        Options {
            segment_bytes: 256 << 10,
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    let pad = "x".repeat(300);
    let mut big = Vec::new();
    let mut correlated = Vec::new();
    let append = |stream: &str, e: EventData| {
        log.append(stream, ExpectedVersion::Any, &[e])
            .unwrap()
            .first_position
            .0
    };
    let order = EventData::json("ORDER", "{}")
        .with_id(id(0))
        .actor("alice")
        .correlation_id("deal-big");
    correlated.push(append("order-1", order));
    for i in 0..BIG {
        let e = EventData::json(event_type(i), format!(r#"{{"i":{i},"pad":"{pad}"}}"#))
            .with_id(id(1 + i))
            .actor(format!("trader-{}", i % 5))
            .correlation_id("deal-big")
            .causation_id(cause(i));
        let p = append("big", e);
        big.push(p);
        correlated.push(p);
        if i % 30 == 29 {
            let h = EventData::json("HEDGE", "{}").correlation_id("deal-big");
            correlated.push(append(&format!("hedge-{}", i / 30), h));
        }
        if i % 2 == 0 {
            let n =
                EventData::json("TICK", format!(r#"{{"pad":"{pad}"}}"#)).correlation_id("other");
            append("noise", n);
        }
    }
    assert_eq!(correlated.len() as u64, BIG + OTHERS);
    assert!(log.segments().len() > 3, "the stream spans sealed segments");
    log.wait_sealed().unwrap();
    log.close().unwrap();
    (big, correlated)
}

fn json(o: &std::process::Output) -> Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

fn positions(v: &[Value]) -> Vec<u64> {
    v.iter().map(|e| e["position"].as_u64().unwrap()).collect()
}

/// Checks an audit's JSON document against the log written; returns its entries.
fn check_audit(v: &Value, big: &[u64], correlated: &[u64], listed: usize) -> Vec<Value> {
    assert_eq!(v["stream"], "big");
    assert_eq!(v["correlated_max"], listed as u64);
    let events = v["events"].as_array().unwrap();
    let got: Vec<u64> = events
        .iter()
        .map(|x| x["event"]["position"].as_u64().unwrap())
        .collect();
    assert_eq!(got, big, "every event once, in order");
    for (i, x) in events.iter().enumerate() {
        let i = i as u64;
        assert_eq!(x["event"]["version"], i);
        assert_eq!(x["event"]["type"], event_type(i));
        let why = &x["why"];
        let chain: Vec<&str> = why["causation_chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        let (want, unresolved): (&[&str], Value) = match i % 3 {
            0 => (&["ORDER"], Value::Null),
            1 => (&["NEW", "ORDER"], Value::Null),
            _ => (&[], Value::String(format!("ticket-{i}"))),
        };
        assert_eq!(chain, want, "chain of v{i}");
        assert_eq!(why["unresolved_cause"], unresolved, "v{i}");
        // All the others of the correlation id are counted; the first few are listed.
        assert_eq!(why["correlated_count"], BIG + OTHERS - 1, "v{i}");
        let me = big[i as usize];
        let want: Vec<u64> = correlated
            .iter()
            .copied()
            .filter(|&p| p != me)
            .take(listed)
            .collect();
        assert_eq!(
            positions(why["correlated"].as_array().unwrap()),
            want,
            "v{i}"
        );
    }
    events.clone()
}

#[test]
fn audit_find_and_dump_print_every_event_of_many_pages_once_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let (big, correlated) = write_log(&dir);
    let d = dir.to_str().unwrap();

    // The audit, with room to remember every lookup: each looked up once.
    let v = json(&tally(&["audit", d, "--stream", "big", "--json"]));
    let entries = check_audit(&v, &big, &correlated, 20);
    // The stream, the correlation id's events, the order and the 1,000 events that are
    // the cause of the next one.
    assert_eq!(
        v["events_read"],
        BIG + (BIG + OTHERS) + 1 + BIG / 3,
        "{}",
        v["events_read"]
    );

    // A cache too small to keep them all, and five listed: the same answers.
    let o = tally(&[
        "audit",
        d,
        "--stream",
        "big",
        "--json",
        "--buffer-mb",
        "1",
        "--correlated-max",
        "5",
    ]);
    let small = check_audit(&json(&o), &big, &correlated, 5);
    for (a, b) in entries.iter().zip(&small) {
        assert_eq!(a["event"], b["event"]);
        assert_eq!(a["why"]["causation_chain"], b["why"]["causation_chain"]);
    }

    // The table: one entry per event in order, and the cap stated.
    let o = tally(&["audit", d, "--stream", "big"]);
    assert!(o.status.success(), "{o:?}");
    let text = stdout(&o);
    let versions: Vec<u64> = text
        .lines()
        .filter_map(|l| l.strip_prefix('v'))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(versions, (0..BIG).collect::<Vec<_>>());
    let count = BIG + OTHERS - 1;
    let stated = format!(", ... (first 20 of {count} listed)");
    assert_eq!(
        text.lines().filter(|l| l.ends_with(&stated)).count() as u64,
        BIG,
        "{}",
        &text[..2000]
    );
    assert!(text.contains(&format!("correlated ({count} deal-big): order-1 ORDER, ")));
    assert!(
        text.contains(&format!("{BIG} events explained")),
        "{}",
        &text[text.len() - 300..]
    );

    // find: every event of the correlation id once, in order, in pages cut by their
    // count (4,096) or, with a 1 MiB buffer, their bytes.
    for buffer in ["64", "1"] {
        let o = tally(&[
            "find",
            d,
            "--correlation",
            "deal-big",
            "--format",
            "jsonl",
            "--buffer-mb",
            buffer,
        ]);
        assert!(o.status.success(), "{o:?}");
        let got: Vec<Value> = stdout(&o)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(positions(&got), correlated, "--buffer-mb {buffer}");
    }

    // dump: every record once, in order, over more than one range of positions.
    let o = tally(&["dump", d, "--format", "jsonl"]);
    assert!(o.status.success(), "{o:?}");
    let got: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let all = BIG + OTHERS + NOISE;
    assert!(all > 4096);
    assert_eq!(positions(&got), (0..all).collect::<Vec<_>>());

    // Through a server: the same entries and the same events.
    let server = InProcess::start(&dir);
    let a = server.addr.as_str();
    let o = tally(&["audit", "--server", a, "--stream", "big", "--json"]);
    let remote = check_audit(&json(&o), &big, &correlated, 20);
    assert_eq!(remote, entries);
    let o = tally(&[
        "find",
        "--server",
        a,
        "--correlation",
        "deal-big",
        "--format",
        "jsonl",
    ]);
    assert!(o.status.success(), "{o:?}");
    let got: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(positions(&got), correlated);
}
