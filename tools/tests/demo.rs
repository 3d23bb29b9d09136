//! `tally demo` at a small size: its report's positions and P&L agree with an independent
//! computation from the log, and its checks (replay, extract) pass.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::Command;

use rust_decimal::Decimal;
use tally_engine::state_store::{Kind, MANIFEST_EVENT_TYPE, Manifest};
use tally_engine::{Direction, Log, Options, Position, RecoveryMode};

#[derive(Clone)]
struct Open {
    book: String,
    instrument: String,
    sign: Decimal,
    open: Decimal,
    price: Decimal,
    quantity: Decimal,
    closed: Decimal,
}

fn dec(v: &serde_json::Value) -> Decimal {
    v.as_str().unwrap().parse().unwrap()
}

#[test]
fn the_demo_report_matches_an_independent_computation() {
    check_demo(250, 4);
}

/// Past the old limit: at 50,000 trades the positions read model's state is about 4 MiB,
/// four times what one event can hold, so its checkpoints are stored in parts and deltas.
#[test]
fn the_demo_at_fifty_thousand_trades_checkpoints_its_positions_and_matches_the_log() {
    let (_dir, r) = check_demo(50_000, 8);
    let checkpoint = &r["projection_checkpoint"];
    assert!(checkpoint.as_u64().is_some(), "{checkpoint}");
    assert!(r["peak_memory_mib"].as_f64().is_some());
    let log = Log::open(
        r["data"].as_str().unwrap(),
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .unwrap();
    let manifests: Vec<Manifest> = log
        .read_stream("$projection-positions", 0, usize::MAX, Direction::Forward)
        .unwrap()
        .iter()
        .filter(|e| e.event_type() == MANIFEST_EVENT_TYPE)
        .map(|e| Manifest::decode(e.payload()).unwrap())
        .collect();
    let full = manifests
        .iter()
        .filter(|m| m.kind == Kind::Full)
        .max_by_key(|m| m.content_bytes)
        .unwrap();
    assert!(
        full.content_bytes > 2 << 20 && full.parts.len() > 2,
        "{}",
        full.content_bytes
    );
    let deltas: Vec<&Manifest> = manifests.iter().filter(|m| m.kind == Kind::Delta).collect();
    assert!(!deltas.is_empty());
    assert!(
        deltas
            .iter()
            .all(|d| d.content_bytes < full.content_bytes / 10)
    );
}

/// Runs the demo with `trades` trades over `books` books and checks its report against
/// the log; returns the report and the directory that holds the demo's log.
fn check_demo(n_trades: u64, books: u64) -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["demo", "--seed", "7", "--json", "--no-governance", "--data"])
        .arg(&data)
        .args([
            "--trades",
            &n_trades.to_string(),
            "--books",
            &books.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["replay"]["identical"], true);
    assert_eq!(r["replay"]["incremental_equals_replay"], true);
    assert_eq!(r["extract_verified"], true);
    assert_eq!(r["conflicts_retried"], 1);
    assert_eq!(r["corrections"], 1);
    assert!(r["snapshots"].as_u64().unwrap() > 0);
    assert!(r["late_amendments"].as_u64().unwrap() > 0);

    // Independently: fold the log's events with this test's own code.
    let log = Log::open(
        &data,
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .unwrap();
    let mut trades: BTreeMap<String, Open> = BTreeMap::new();
    let mut marks: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut realised: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let mut next = 0;
    let mut counted = BTreeMap::<String, u64>::new();
    let mut snapshots = 0u64;
    loop {
        let page = log
            .read_all(Position(next), 1000, Direction::Forward)
            .unwrap();
        let Some(last) = page.last() else { break };
        next = last.position.0 + 1;
        for e in &page {
            *counted.entry(e.event_type().to_owned()).or_default() += 1;
            if e.stream().starts_with("$snapshot-")
                && e.event_type() == tally_engine::state_store::MANIFEST_EVENT_TYPE
            {
                snapshots += 1;
            }
            let p: serde_json::Value = match serde_json::from_slice(e.payload()) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let id = e.stream().strip_prefix("trade-").map(str::to_owned);
            let mut close = |id: &str, x: Decimal, trades: &mut BTreeMap<String, Open>| {
                let t = trades.get_mut(id).unwrap();
                let m = marks.get(&t.instrument).copied().unwrap_or(t.price);
                let x = x.min(t.open);
                *realised
                    .entry((t.book.clone(), t.instrument.clone()))
                    .or_default() += t.sign * x * (m - t.price);
                t.open -= x;
                t.closed += x;
            };
            match (e.event_type(), id) {
                ("PRICE", _) => {
                    marks.insert(p["instrument"].as_str().unwrap().into(), dec(&p["price"]));
                }
                ("NEW", Some(id)) => {
                    let q = dec(&p["quantity"]);
                    trades.insert(
                        id,
                        Open {
                            book: p["book"].as_str().unwrap().into(),
                            instrument: p["instrument"].as_str().unwrap().into(),
                            sign: if p["side"] == "BUY" {
                                Decimal::ONE
                            } else {
                                Decimal::NEGATIVE_ONE
                            },
                            open: q,
                            price: dec(&p["price"]),
                            quantity: q,
                            closed: Decimal::ZERO,
                        },
                    );
                }
                ("AMEND", Some(id)) => {
                    let t = trades.get_mut(&id).unwrap();
                    if p.get("quantity").is_some() {
                        let q = dec(&p["quantity"]);
                        t.open = (q - t.closed).max(Decimal::ZERO);
                        t.quantity = q;
                    }
                    if p.get("price").is_some() {
                        t.price = dec(&p["price"]);
                    }
                }
                ("CANCEL", Some(id)) => {
                    trades.remove(&id);
                }
                ("EXERCISE", Some(id)) => close(&id, dec(&p["quantity"]), &mut trades),
                ("SETTLE", Some(id)) => {
                    let open = trades[&id].open;
                    close(&id, open, &mut trades);
                }
                _ => {}
            }
        }
    }
    let mut want: BTreeMap<(String, String), (Decimal, Decimal, Decimal)> = BTreeMap::new();
    for t in trades.values() {
        let w = want
            .entry((t.book.clone(), t.instrument.clone()))
            .or_default();
        w.0 += t.sign * t.open;
        w.1 += t.sign * t.open * t.price;
    }
    for k in realised.keys() {
        want.entry(k.clone()).or_default();
    }
    let rows = r["positions"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    for row in rows {
        let key = (
            row["book"].as_str().unwrap().to_owned(),
            row["instrument"].as_str().unwrap().to_owned(),
        );
        let (q, cost) = (want[&key].0, want[&key].1);
        let mark = marks[&key.1];
        assert_eq!(dec(&row["quantity"]), q, "{key:?} quantity");
        assert_eq!(dec(&row["cost"]), cost, "{key:?} cost");
        assert_eq!(
            dec(&row["realised"]),
            realised.get(&key).copied().unwrap_or_default(),
            "{key:?} realised"
        );
        assert_eq!(
            dec(&row["unrealised"]),
            q * mark - cost,
            "{key:?} unrealised"
        );
    }
    // The report's counts are the log's.
    assert_eq!(
        r["cancels"].as_u64().unwrap(),
        counted.get("CANCEL").copied().unwrap_or(0)
    );
    assert_eq!(
        r["settlements"].as_u64().unwrap(),
        counted.get("SETTLE").copied().unwrap_or(0)
    );
    assert_eq!(r["prices"].as_u64().unwrap(), counted["PRICE"]);
    assert_eq!(
        counted["NEW"], n_trades,
        "duplicates were absorbed, not written"
    );
    assert!(r["duplicates_absorbed"].as_u64().unwrap() > 0);
    let n = |k: &str| r[k].as_u64().unwrap();
    let got = |t: &str| counted.get(t).copied().unwrap_or(0);
    let business: u64 = counted
        .iter()
        .filter(|(t, _)| !t.starts_with('$'))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(n("events"), business, "every business event, once");
    // The correction is an AMEND too.
    assert_eq!(n("amendments") + n("corrections"), got("AMEND"));
    assert_eq!(n("novations"), got("NOVATE"));
    assert_eq!(n("exercises"), got("EXERCISE"));
    assert_eq!(n("snapshots"), snapshots);
    assert_eq!(
        n("log_records_including_snapshots_and_checkpoints"),
        counted.values().sum::<u64>(),
        "{counted:?}"
    );
    (dir, r)
}

/// Runs the demo with seed 7 over 250 trades into `dir/name`, with `extra` options.
fn demo(dir: &std::path::Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "demo", "--seed", "7", "--json", "--trades", "250", "--books", "4",
        ])
        .args(extra)
        .arg("--data")
        .arg(dir.join(name))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The governance step (retention, a legal hold, erasures) checked against the log it
/// leaves, read with this test's own code: the day's positions are those of the same day
/// without the step (which the test above checks independently); every settled trade is
/// pruned, reading markers that name the run and the policy, except the held one, which is
/// whole past its retention; every trade of the erased contact reads the erasure marker
/// where the contact was, and every other contact still opens; the validation from the
/// signed archive and the extracts passed, and a replay from scratch was refused.
#[test]
fn the_demo_governance_step_prunes_holds_and_erases_what_it_reports() {
    use std::sync::Arc;
    use tally_engine::keys::{FileKeyStore, SecretKey};

    let dir = tempfile::tempdir().unwrap();
    let plain = demo(dir.path(), "plain", &["--no-governance"]);
    let r = demo(dir.path(), "governed", &[]);
    assert!(plain["governance"].is_null());
    assert_eq!(plain["positions"], r["positions"], "the same day");
    let g = &r["governance"];
    assert_eq!(g["replay"]["window_from_signed_archive_identical"], true);
    assert_eq!(g["replay"]["incremental_equals_replay"], true);
    let scratch = g["replay"]["from_scratch"].as_str().unwrap();
    assert!(
        scratch.starts_with("refused") && scratch.contains("removed by retention"),
        "{scratch}"
    );
    for x in [
        "extract_after_erasure",
        "extract_of_erasures",
        "extract_of_pruned_trade",
    ] {
        assert_eq!(g[x]["verified"], true, "{x}");
    }
    let hold = g["hold"].as_str().unwrap();
    assert!(
        g["erasure_refused_by_hold"]
            .as_str()
            .unwrap()
            .contains(&format!("\"{hold}\"")),
        "{g}"
    );
    assert_eq!(g["retention"]["pending"], 0);

    // The log, read with the key store (read-only, as a tool beside the writer would).
    let keys = dir.path().join("governed.keys");
    let master = SecretKey::from_file(&keys.join("master.key")).unwrap();
    let store = FileKeyStore::open_read_only(&keys.join("store"), &master).unwrap();
    let log = Log::open(
        dir.path().join("governed"),
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            keys: Some(Arc::new(store)),
            ..Options::default()
        },
    )
    .unwrap();
    let governance = log.governance().unwrap();
    let held = g["held_trade"].as_str().unwrap();
    let erased = g["erased_subject"].as_str().unwrap();
    let (mut pruned_streams, mut pruned_events, mut erased_contacts, mut opened_contacts) =
        (0u64, 0u64, 0u64, 0u64);
    let mut next = 0;
    let mut streams = std::collections::BTreeSet::new();
    loop {
        let page = log
            .read_all(Position(next), 1000, Direction::Forward)
            .unwrap();
        let Some(last) = page.last() else { break };
        next = last.position.0 + 1;
        streams.extend(
            page.iter()
                .filter(|e| e.stream().starts_with("trade-"))
                .map(|e| e.stream().to_owned()),
        );
    }
    for stream in &streams {
        let events = log
            .read_stream(stream, 0, usize::MAX, Direction::Forward)
            .unwrap();
        let removed: Vec<_> = events.iter().filter(|e| e.removed_by().is_some()).collect();
        if !removed.is_empty() {
            // Removed whole, by the policy, and only a trade that settled on the day.
            assert_eq!(removed.len(), events.len(), "{stream}");
            assert_ne!(stream, held);
            for e in &removed {
                let (_, policy) = governance
                    .removal(e.removed_by().unwrap(), e.position)
                    .unwrap();
                assert_eq!(policy, g["policy"].as_str().unwrap());
            }
            pruned_streams += 1;
            pruned_events += removed.len() as u64;
            // Its snapshots went with it.
            let snapshots = log
                .read_stream(
                    &format!("$snapshot-{stream}"),
                    0,
                    usize::MAX,
                    Direction::Forward,
                )
                .unwrap();
            // A settled trade has at least two events, so the demo snapshotted it.
            assert!(!snapshots.is_empty(), "{stream}");
            assert!(
                snapshots.iter().all(|e| e.removed_by().is_some()),
                "{stream}"
            );
            pruned_events += snapshots.len() as u64;
            continue;
        }
        // Kept: it never settled, or it is the held trade.
        let settled = events.iter().any(|e| e.event_type() == "SETTLE");
        assert_eq!(settled, stream == held, "{stream}");
        let snapshots = log
            .read_stream(
                &format!("$snapshot-{stream}"),
                0,
                usize::MAX,
                Direction::Forward,
            )
            .unwrap();
        assert!(
            snapshots.iter().all(|e| e.removed_by().is_none()),
            "{stream}"
        );
        let new: serde_json::Value = serde_json::from_slice(events[0].payload()).unwrap();
        let c = &new["confirmation_contact"];
        match c.get("$erased") {
            Some(m) => {
                assert_eq!(m["subject"], erased, "{stream}");
                erased_contacts += 1;
            }
            None => {
                let email = c["email"].as_str().unwrap();
                let subject =
                    tally_engine::format::sealed::subject_hash(&format!("contact:{email}"));
                assert_ne!(subject.to_hex(), erased, "{stream}");
                opened_contacts += 1;
            }
        }
    }
    assert_eq!(g["retention"]["removed_streams"], pruned_streams);
    assert_eq!(g["retention"]["removed_snapshot_streams"], pruned_streams);
    assert_eq!(g["retention"]["removed_events"], pruned_events);
    assert_eq!(
        pruned_streams + 1,
        r["settlements"].as_u64().unwrap(),
        "every settled trade but the held one"
    );
    assert!(erased_contacts > 0 && opened_contacts > 0);
}
