//! `tally policy`, `tally hold` and `tally retention --dry-run` end to end: changes recorded
//! with actor and reason, listings in table and JSON, the plan honouring holds, refusals
//! with exit status 2 and nothing written.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};

use serde_json::Value;
use tally_engine::{Direction, EventData, ExpectedVersion, Log, Options};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap()
}

#[test]
fn policies_and_holds_are_recorded_listed_and_honoured_by_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    {
        let log = Log::open(
            &dir,
            Options {
                segment_bytes: 64 << 10,
                ..Options::default()
            },
        )
        .unwrap();
        for id in 1..=3 {
            let events = ["TradeNew", "TradeSettled"]
                .map(|t| EventData::json(t, format!("{{\"id\":{id}}}")).aggregate_type("Trade"));
            log.append(&format!("trade-{id}"), ExpectedVersion::NoStream, &events)
                .unwrap();
        }
        // Filler that seals the trades' segment: retention prunes sealed segments.
        for n in 0..300 {
            let pad = "x".repeat(300);
            log.append(
                "filler",
                ExpectedVersion::Any,
                &[EventData::json(
                    "Pad",
                    format!("{{\"n\":{n},\"pad\":\"{pad}\"}}"),
                )],
            )
            .unwrap();
        }
        log.close().unwrap();
    }
    let d = dir.to_str().unwrap();
    let why = [
        "--actor",
        "compliance@firm",
        "--reason",
        "MiFID II art. 16(6)",
    ];
    let set = [
        &[
            "policy",
            "set",
            d,
            "--name",
            "trades-7y",
            "--prefix",
            "trade-",
        ][..],
        &["--keep-after", "TradeSettled=7y"],
        &why,
    ]
    .concat();
    assert!(
        ok(&tally(&set)).contains("policy trades-7y: prefix trade- keep 7y after TradeSettled")
    );
    let place = [
        &["hold", "place", d, "--id", "case-17", "--stream", "trade-2"][..],
        &why,
    ]
    .concat();
    assert!(ok(&tally(&place)).contains("legal hold case-17 placed on stream trade-2"));

    let listed = json(&tally(&["policy", "list", d, "--json"]));
    assert_eq!(listed[0]["name"], "trades-7y");
    assert_eq!(listed[0]["scope"]["prefix"], "trade-");
    assert_eq!(
        listed[0]["keep"]["after_event"]["event_type"],
        "TradeSettled"
    );
    assert_eq!(listed[0]["set_by"], "compliance@firm");
    let holds = ok(&tally(&["hold", "list", d]));
    assert!(
        holds.contains("case-17  stream trade-2  (placed by compliance@firm"),
        "{holds}"
    );

    // Today nothing is due; in eight years two trades go and the held one stays.
    let now = json(&tally(&["retention", d, "--dry-run", "--json"]));
    assert_eq!(now["removed_events"], 0);
    let later = json(&tally(&[
        "retention",
        d,
        "--dry-run",
        "--as-of",
        "+8y",
        "--json",
    ]));
    assert_eq!(later["removed_events"], 4);
    assert_eq!(later["held_events"], 2);
    let removed: Vec<&str> = later["removals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["stream"].as_str().unwrap())
        .collect();
    assert_eq!(removed, ["trade-1", "trade-3"]);
    assert_eq!(later["held"][0]["holds"][0], "case-17");
    let text = ok(&tally(&["retention", d, "--dry-run", "--as-of", "+8y"]));
    assert!(
        text.contains("keep   trade-2  (2 events)  policy trades-7y held by case-17"),
        "{text}"
    );

    // Refusals: exit 2, nothing written.
    let bad = [&["hold", "release", d, "--id", "case-99"][..], &why].concat();
    assert_eq!(tally(&bad).status.code(), Some(2));
    let bad = [
        &[
            "policy",
            "set",
            d,
            "--name",
            "p",
            "--default",
            "--keep-newest",
            "0",
        ][..],
        &why,
    ]
    .concat();
    assert_eq!(tally(&bad).status.code(), Some(2));
    let release = [&["hold", "release", d, "--id", "case-17"][..], &why].concat();
    ok(&tally(&release));
    let later = json(&tally(&[
        "retention",
        d,
        "--dry-run",
        "--as-of",
        "+8y",
        "--json",
    ]));
    assert_eq!(later["removed_events"], 6);

    // Applying it needs who and why, and is judged now: a run in the future is refused.
    assert_eq!(tally(&["retention", d]).status.code(), Some(2));
    let early = [&["retention", d, "--as-of", "+8y"][..], &why].concat();
    assert_eq!(tally(&early).status.code(), Some(2));
    // Eight years later, in the test's terms: the policy, set again, keeps settled trades
    // no time at all. Then the trades read as markers, and verify reports the removal with
    // its policy.
    let again = [
        &[
            "policy",
            "set",
            d,
            "--name",
            "trades-7y",
            "--prefix",
            "trade-",
        ][..],
        &["--keep-after", "TradeSettled=0s"],
        &why,
    ]
    .concat();
    ok(&tally(&again));
    let applied = json(&tally(&[
        "retention",
        d,
        "--actor",
        "ops",
        "--reason",
        "quarterly",
        "--json",
    ]));
    assert_eq!(applied["removed"], 6);
    assert_eq!(applied["pending"], 0);
    let run = applied["recorded_at"].as_u64().unwrap();
    let v = json(&tally(&["verify", d, "--json"]));
    assert_eq!(v["removed"][0]["policy"], "trades-7y");
    assert_eq!(v["removed"][0]["removed_by"], run);
    let dump = ok(&tally(&["dump", d, "--stream", "trade-1", "--json"]));
    let first: Value = serde_json::from_str(dump.lines().next().unwrap()).unwrap();
    assert_eq!(first["removed_by"], run);
    assert_eq!(first["type"], "$Removed");
    let text = ok(&tally(&["verify", d]));
    assert!(text.contains("removed by retention: 6 events"), "{text}");

    // Extracts of a stream with removed events carry their pruned records: every proof
    // checks, each removed event names its run, and a complete extract stays complete.
    let pk = tmp.path().join("log.pub");
    std::fs::write(&pk, ok(&tally(&["pubkey", d]))).unwrap();
    let pk = pk.to_str().unwrap();
    for (format, lines) in [("3", false), ("3", true), ("2", false)] {
        let out = tmp.path().join(format!("trade-1.{format}.{lines}"));
        let out = out.to_str().unwrap();
        let mut args = vec![
            "extract", d, "--stream", "trade-1", "--format", format, "--out", out,
        ];
        if lines {
            args.push("--lines");
        }
        let wrote = ok(&tally(&args));
        if format == "3" {
            assert!(
                wrote.contains("2 of them were removed by retention"),
                "{wrote}"
            );
        }
        let events = tmp.path().join("events.jsonl");
        let mut check = vec![
            "verify-extract",
            out,
            "--pubkey",
            pk,
            "--require-complete",
            "--json",
        ];
        if format == "3" {
            check.extend(["--events", events.to_str().unwrap()]);
        }
        let v = json(&tally(&check));
        assert_eq!(v["events"], 2, "{v}");
        assert_eq!(v["removed_by_retention"], 2, "{v}");
        let shown = if format == "3" {
            std::fs::read_to_string(&events).unwrap()
        } else {
            let doc: Value = serde_json::from_slice(&std::fs::read(out).unwrap()).unwrap();
            doc["events"].to_string()
        };
        assert!(shown.contains(&format!("\"removed_by\":{run}")), "{shown}");
        assert!(shown.contains("$Removed"), "{shown}");
    }

    // The history, with who and why, is the system stream.
    let log = Log::open(
        &dir,
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .unwrap();
    let history = log
        .read_stream("$governance", 0, 100, Direction::Forward)
        .unwrap();
    let types: Vec<&str> = history.iter().map(|e| e.event_type()).collect();
    assert_eq!(
        types,
        [
            "$RetentionPolicySet",
            "$LegalHoldPlaced",
            "$LegalHoldReleased",
            "$RetentionPolicySet",
            "$RetentionApplied"
        ]
    );
    assert!(history[..4].iter().all(|e| e.actor() == "compliance@firm"));
    assert_eq!(history[4].actor(), "ops");
}

/// The same operations through a running tallyd (GOVERN, PROTOCOL.md 4.11d): changes land in
/// the server's `$governance` with the given actor, lists and plans come back, and a refused
/// change is exit status 2.
#[test]
fn policies_holds_and_retention_through_a_server() {
    let tmp = tempfile::tempdir().unwrap();
    // By default a server reads the rules but refuses changes (no authentication yet).
    let closed = tempfile::tempdir().unwrap();
    let server = common::InProcess::start(closed.path());
    let why = ["--actor", "compliance@firm", "--reason", "MiFID II"];
    let a = server.addr.as_str();
    let set = [
        &[
            "policy",
            "set",
            "--server",
            a,
            "--name",
            "p",
            "--default",
            "--keep-newest",
            "1",
        ][..],
        &why,
    ]
    .concat();
    let o = tally(&set);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("governance changes"),
        "{o:?}"
    );
    ok(&tally(&["policy", "list", "--server", a]));
    drop(server);
    let server = common::InProcess::start_with(tmp.path(), |c| c.governance_changes = true);
    let a = server.addr.as_str();
    let set = [
        &[
            "policy", "set", "--server", a, "--name", "quotes", "--prefix", "quote-",
        ][..],
        &["--keep-newest", "1"],
        &why,
    ]
    .concat();
    assert!(ok(&tally(&set)).contains("policy quotes: prefix quote- keep newest 1 events"));
    let place = [
        &[
            "hold",
            "place",
            "--server",
            a,
            "--id",
            "case-1",
            "--of-actor",
            "bob",
        ][..],
        &why,
    ]
    .concat();
    ok(&tally(&place));
    // The same hold again is refused, by the server, with nothing written.
    assert_eq!(tally(&place).status.code(), Some(2));
    for n in 0..3 {
        for actor in ["alice", "bob"] {
            let o = tally(&[
                "append",
                "--server",
                a,
                "quote-1",
                "--type",
                "Quoted",
                "--data",
                &format!(r#"{{"n":{n}}}"#),
                "--actor",
                actor,
            ]);
            assert!(o.status.success(), "{o:?}");
        }
    }
    let policies = json(&tally(&["policy", "list", "--server", a, "--json"]));
    assert_eq!(policies[0]["name"], "quotes");
    assert_eq!(policies[0]["set_by"], "compliance@firm");
    let holds = json(&tally(&["hold", "list", "--server", a, "--json"]));
    assert_eq!(holds[0]["id"], "case-1");
    // Six quotes, the newest (bob's) kept; of the five older, bob's two are held and
    // alice's three go.
    let plan = json(&tally(&["retention", "--server", a, "--dry-run", "--json"]));
    assert_eq!(plan["removed_events"], 3, "{plan}");
    assert_eq!(plan["held_events"], 2, "{plan}");
    let run = [&["retention", "--server", a, "--json"][..], &why].concat();
    let applied = json(&tally(&run));
    // The server's segment is still active: due, not yet removable.
    assert_eq!(applied["pending"], 3, "{applied}");
    let release = [
        &["hold", "release", "--server", a, "--id", "case-1"][..],
        &why,
    ]
    .concat();
    ok(&tally(&release));
    let holds = json(&tally(&["hold", "list", "--server", a, "--json"]));
    assert_eq!(holds, serde_json::json!([]));
    drop(server);
    // What the server wrote is the data directory's history.
    let log = Log::open(
        tmp.path(),
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .unwrap();
    let types: Vec<String> = log
        .read_stream("$governance", 0, 100, Direction::Forward)
        .unwrap()
        .iter()
        .map(|e| format!("{} by {}", e.event_type(), e.actor()))
        .collect();
    assert_eq!(
        types,
        [
            "$RetentionPolicySet by compliance@firm",
            "$LegalHoldPlaced by compliance@firm",
            "$LegalHoldReleased by compliance@firm",
        ]
    );
}

/// A log whose events retention removed, served by tallyd: READ_ALL forward (what `$all`
/// subscriptions and catch-up reads use) and backward, and stream reads, return the markers
/// naming the run, never an error.
#[test]
fn a_pruned_log_reads_through_a_server_with_markers() {
    let tmp = tempfile::tempdir().unwrap();
    let by = {
        let log = Log::open(
            tmp.path(),
            Options {
                segment_bytes: 64 << 10,
                ..Options::default()
            },
        )
        .unwrap();
        for n in 0..4 {
            log.append(
                "quote-1",
                ExpectedVersion::Any,
                &[EventData::json("Quoted", format!(r#"{{"n":{n}}}"#))],
            )
            .unwrap();
        }
        for n in 0..300 {
            let pad = "x".repeat(300);
            log.append(
                "filler",
                ExpectedVersion::Any,
                &[EventData::json(
                    "Pad",
                    format!(r#"{{"n":{n},"p":"{pad}"}}"#),
                )],
            )
            .unwrap();
        }
        log.wait_sealed().unwrap();
        log.set_retention_policy(
            &tally_engine::governance::PolicySet {
                name: "quotes".into(),
                scope: tally_engine::governance::PolicyScope::Prefix("quote-".into()),
                keep: tally_engine::governance::Keep::Newest { count: 1 },
                reason: "r".into(),
            },
            "c",
        )
        .unwrap();
        let run = log
            .apply_retention(tally_engine::now(), "ops", "r")
            .unwrap();
        assert_eq!(run.removed, 3);
        log.close().unwrap();
        run.recorded_at.unwrap().0
    };
    let server = common::InProcess::start(tmp.path());
    let addr = server.addr.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let c = tally_server::client::Client::connect(&addr).await.unwrap();
        let filter = tally_server::protocol::Filter::default();
        for direction in [Direction::Forward, Direction::Backward] {
            let from = if direction == Direction::Forward {
                0
            } else {
                u64::MAX
            };
            let (events, _, _) = c.read_all(from, 1000, direction, &filter).await.unwrap();
            let quotes: Vec<_> = events.iter().filter(|e| e.stream() == "quote-1").collect();
            assert_eq!(quotes.len(), 4, "{direction:?}");
            let removed: Vec<_> = quotes
                .iter()
                .filter(|e| e.event_type() == "$Removed")
                .collect();
            assert_eq!(removed.len(), 3, "{direction:?}");
            for e in removed {
                assert_eq!(e.payload(), format!(r#"{{"removed_by":{by}}}"#).as_bytes());
                // The client knows a marker, so that a remote fold stops at it.
                let by = tally_engine::Position(by);
                assert_eq!(tally_engine::EventView::removed_by(*e), Some(by));
                assert!(tally_engine::fold_refusal(*e).is_some());
            }
            // And no other event is taken for one.
            assert!(
                quotes
                    .iter()
                    .filter(|e| e.event_type() != "$Removed")
                    .all(|e| tally_engine::EventView::removed_by(*e).is_none())
            );
        }
    });
    drop(server);
}
