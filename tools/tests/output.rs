//! The global output flag: `--output json` (before or after the command) and its alias
//! `--json` give the same JSON; `--output jsonl` turns an event listing into JSON lines;
//! a command that prints no JSON refuses the flag instead of ignoring it.

#![allow(clippy::unwrap_used)]

mod common;

use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options};

use common::{stdout, succeeded, tally};

#[test]
fn the_output_flag_is_global_and_json_is_its_alias() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..3 {
        log.append(
            "trade-1",
            ExpectedVersion::Any,
            &[EventData::json("TradeAmended", format!("{{\"qty\":{i}}}"))],
        )
        .unwrap();
    }
    log.close().unwrap();
    let d = dir.path().to_str().unwrap();
    let strip = |o: &std::process::Output| {
        let mut v: serde_json::Value = serde_json::from_str(&succeeded(o)).unwrap();
        v["seconds"] = serde_json::Value::Null;
        v
    };
    let a = strip(&tally(&["--output", "json", "verify", d]));
    let b = strip(&tally(&["verify", d, "--json"]));
    let c = strip(&tally(&["verify", d, "--output", "json"]));
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a["records"], 3);
    // A listing as JSON lines, whatever its own --format says.
    let lines = stdout(&tally(&["dump", d, "--output", "jsonl"]));
    let events: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2]["payload"]["qty"], 2);
    // A typed report (compact's) as one JSON line, and as text.
    let store = tempfile::tempdir().unwrap();
    let url = format!("file://{}", store.path().display());
    let line = stdout(&tally(&[
        "compact",
        d,
        "--store",
        &url,
        "--dry-run",
        "--output",
        "jsonl",
    ]));
    assert_eq!(line.lines().count(), 1, "{line}");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["store"], url);
    let text = stdout(&tally(&["compact", d, "--store", &url, "--dry-run"]));
    assert!(text.starts_with(&format!("store {url}\n")), "{text}");
    assert!(text.contains("would move 0 segments"), "{text}");
    // A listing under jsonl: one object per line.
    let o = tally(&["checkpoint", d, "--list", "--output", "jsonl"]);
    let cps: Vec<serde_json::Value> = succeeded(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!cps.is_empty());
    assert!(cps.iter().all(|c| c["tree_size"].as_u64().is_some()));
    // A finding without details keeps its shape: `failure` and `what` hold its text.
    let bad = dir.path().join("not-an-extract");
    std::fs::write(&bad, b"{}").unwrap();
    let key = dir.path().join("log.pub");
    std::fs::write(&key, stdout(&tally(&["pubkey", d]))).unwrap();
    let o = tally(&[
        "verify-extract",
        bad.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["failure"].is_string() && v["failure"] == v["what"], "{v}");
    // No JSON from a note or a key: refused, not ignored.
    let o = tally(&["checkpoint", d, "--export", "--json"]);
    assert_eq!(o.status.code(), Some(2));
    // No JSON from pubkey: refused, not ignored.
    let o = tally(&["pubkey", d, "--json"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("prints no JSON"));
    // Both forms at once: a usage error.
    let o = tally(&["verify", d, "--json", "--output", "table"]);
    assert_eq!(o.status.code(), Some(2));
}
