//! `tally append | read | tail | info | bench --server` against a server started in this
//! process (the `tally` binary is run for real).

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{InProcess, stdout, tally};

#[test]
fn client_commands_round_trip_through_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let s = InProcess::start(dir.path());
    let addr = s.addr.clone();
    let a = addr.as_str();

    let o = tally(&[
        "append",
        "--server",
        a,
        "trade-42",
        "--type",
        "NEW",
        "--data",
        r#"{"qty":100}"#,
        "--expected-version",
        "-1",
        "--actor",
        "alice",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        (v["position"].as_u64(), v["version"].as_u64()),
        (Some(0), Some(0))
    );

    let o = tally(&[
        "append",
        "--server",
        a,
        "trade-42",
        "--type",
        "AMEND",
        "--data",
        r#"{"qty":150}"#,
        "--expected-version",
        "0",
    ]);
    assert!(o.status.success(), "{o:?}");
    // A stale expectation: exit 2, one line naming the actual version.
    let o = tally(&[
        "append",
        "--server",
        a,
        "trade-42",
        "--type",
        "AMEND",
        "--data",
        "{}",
        "--expected-version",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("actual Some(1)"), "{err}");
    // A field too long for the wire is refused with one line, not a panic.
    let long = "T".repeat(70_000);
    let o = tally(&[
        "append", "--server", a, "t", "--type", &long, "--data", "{}",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot be sent") && !err.contains("panicked"),
        "{err}"
    );
    // Invalid JSON is refused before anything is sent.
    let o = tally(&[
        "append", "--server", a, "t", "--type", "X", "--data", "{nope",
    ]);
    assert_eq!(o.status.code(), Some(2));

    let o = tally(&["read", "--server", a, "trade-42", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["type"], "NEW");
    assert_eq!(lines[0]["actor"], "alice");
    assert_eq!(lines[0]["payload"]["qty"], 100);
    assert_eq!(lines[1]["version"], 1);

    let o = tally(&[
        "read",
        "--server",
        a,
        "trade-42",
        "--backward",
        "--limit",
        "1",
        "--json",
    ]);
    let last: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(last["type"], "AMEND");

    // tail from the start stops after --limit events.
    let o = tally(&[
        "tail", "--server", a, "--from", "0", "--limit", "2", "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o).lines().count(), 2);

    let o = tally(&["info", "--server", a, "--stream", "trade-42", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["next_position"], 2);
    assert_eq!(v["durability"], "fsync");
    assert_eq!(v["stream"]["last_version"], 1);

    // The load generator against the server, and its embedded baseline in the same run.
    let o = tally(&[
        "bench",
        "--server",
        a,
        "--connections",
        "2",
        "--inflight",
        "4",
        "--events",
        "400",
        "--embedded-baseline",
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["server"]["events"], 400);
    assert_eq!(v["embedded"]["events"], 400);
    assert!(v["throughput_ratio"].as_f64().unwrap() > 0.0);
    // Replay of what is there, read-only beside the server.
    let data = dir.path().to_str().unwrap();
    let o = tally(&[
        "bench",
        "--server",
        a,
        "--read",
        "all",
        "--events",
        "402",
        "--inflight",
        "2",
        "--embedded-baseline",
        "--data",
        data,
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["replay"]["events"], 402);
    assert_eq!(v["embedded"]["events"], 402);

    // The forensic view through the server.
    let o = tally(&["audit", "--server", a, "--stream", "trade-42", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["events"].as_array().map(Vec::len), Some(2));
    assert_eq!(v["events"][0]["event"]["actor"], "alice");

    // The "why" through the server: an order causes a booking, which causes an amendment,
    // all under one correlation id; the audit of the trade walks the causation chain back
    // to the order and lists the correlated events of both streams.
    let append = |stream: &str, ty: &str, actor: &str, cause: &str| {
        let o = tally(&[
            "append",
            "--server",
            a,
            stream,
            "--type",
            ty,
            "--data",
            "{}",
            "--actor",
            actor,
            "--correlation-id",
            "deal-77",
            "--causation-id",
            cause,
        ]);
        assert!(o.status.success(), "{o:?}");
        let o = tally(&["read", "--server", a, stream, "--json"]);
        let last: serde_json::Value =
            serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
        last["event_id"].as_str().unwrap().to_owned()
    };
    let order = append("order-77", "ORDER", "carol", "");
    let booked = append("trade-77", "NEW", "dave", &order);
    append("trade-77", "AMEND", "erin", &booked);
    let o = tally(&["audit", "--server", a, "--stream", "trade-77", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let chain: Vec<&str> = v["events"][1]["why"]["causation_chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["type"].as_str().unwrap())
        .collect();
    assert_eq!(chain, ["NEW", "ORDER"]);
    let correlated: Vec<&str> = v["events"][1]["why"]["correlated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["stream"].as_str().unwrap())
        .collect();
    assert_eq!(correlated, ["order-77", "trade-77"]);
    assert_eq!(v["events_read"], 2 + 3 + 2, "{v}");

    // Index lookups through the server: alice's events, one per line.
    let o = tally(&[
        "find", "--server", a, "--actor", "alice", "--format", "jsonl",
    ]);
    assert!(o.status.success(), "{o:?}");
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    assert!(lines.iter().all(|v| v["actor"] == "alice"), "{lines:?}");

    // No server there: exit 2 and a message naming the address.
    drop(s);
    let o = tally(&["info", "--server", a]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains(a));
}

/// `tally tail --stream` catches up, then prints events appended after it started, and
/// only that stream's; `tally bench --read stream` replays every bench stream.
#[test]
fn tail_follows_one_stream_live_and_bench_replays_streams() {
    use std::io::{BufRead, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let server = InProcess::start(dir.path());
    let a = server.addr.as_str();
    let append = |stream: &str, ty: &str| {
        let o = tally(&[
            "append", "--server", a, stream, "--type", ty, "--data", "{}",
        ]);
        assert!(o.status.success(), "{o:?}");
    };
    append("s1", "FIRST");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "tail", "--server", a, "--stream", "s1", "--from", "0", "--limit", "3", "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = |rx: &std::sync::mpsc::Receiver<String>| -> serde_json::Value {
        serde_json::from_str(&rx.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap()
    };
    // Caught up: the event from before it started.
    let first = line(&rx);
    assert_eq!(
        (first["stream"].as_str(), first["version"].as_u64()),
        (Some("s1"), Some(0))
    );
    // Live: appended after it printed the first, to its stream and to another.
    append("s2", "OTHER");
    append("s1", "SECOND");
    append("s2", "OTHER");
    append("s1", "THIRD");
    let (second, third) = (line(&rx), line(&rx));
    assert_eq!(second["type"], "SECOND");
    assert_eq!(third["type"], "THIRD");
    assert_eq!(third["version"], 2);
    // It stops after --limit events.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "tail did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");

    // Replay by stream: 1,000 events over 7 bench streams, read stream by stream.
    let o = tally(&[
        "bench",
        "--server",
        a,
        "--read",
        "stream",
        "--events",
        "1000",
        "--streams",
        "7",
        "--connections",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    // The log's first 5 events are the ones above; the bench fills it up to 1,000.
    assert_eq!(v["events"], 995, "{v}");
}
