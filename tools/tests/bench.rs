//! `tally bench` on the embedded engine: producer-signed batches, a chosen format version,
//! and `--compare` baselines run in the same process. Only what was appended is checked
//! here (events, signatures, format); figures are for docs/BENCHMARKS.md, never asserted.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use serde_json::Value;

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> Value {
    assert!(o.status.success(), "{o:?}");
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn signed_batches_are_appended_signed_and_verify_under_the_producers_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let d = dir.to_str().unwrap();
    let args = [
        "bench",
        "--data",
        d,
        "--sign",
        "--batch",
        "10",
        "--events",
        "200",
        "--writers",
        "2",
        "--inflight",
        "3",
        "--durability",
        "none",
        "--segment-mib",
        "1",
        "--json",
    ];
    let v = json(&tally(&args));
    assert_eq!(v["events"], 200);
    // The bench registered its key in $producers: trust it, require signatures on its
    // streams, and every one of the 20 batches must verify as signed.
    let list = String::from_utf8(tally(&["producer", "list", d]).stdout).unwrap();
    let key = list
        .lines()
        .find_map(|l| l.strip_prefix("key bench "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("{list}"));
    let trust = tmp.path().join("producers.trust");
    std::fs::write(&trust, format!("key bench {key}\nrequire bench-\n")).unwrap();
    let v = json(&tally(&[
        "verify",
        d,
        "--producers",
        trust.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(v["producers"]["signed_batches"], 20, "{v}");
    assert_eq!(
        v["producers"]["unsigned_batches"], 1,
        "the registration: {v}"
    );
    // Another producer's key is not trusted: the same log fails.
    std::fs::write(
        &trust,
        format!("key other {}\nrequire bench-\n", "11".repeat(32)),
    )
    .unwrap();
    let o = tally(&["verify", d, "--producers", trust.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
}

#[test]
fn compare_runs_the_load_and_its_baseline_in_one_process() {
    let v = json(&tally(&[
        "bench",
        "--compare",
        "unsigned",
        "--batch",
        "100",
        "--events",
        "1000",
        "--rounds",
        "2",
        "--durability",
        "none",
        "--segment-mib",
        "1",
        "--json",
    ]));
    assert_eq!(v["signed"]["events"], 1000, "{v}");
    assert_eq!(v["unsigned"]["events"], 1000, "{v}");
    assert_eq!(v["round_ratios"].as_array().unwrap().len(), 2);
    let v = json(&tally(&[
        "bench",
        "--compare",
        "format-v1",
        "--events",
        "300",
        "--durability",
        "none",
        "--segment-mib",
        "1",
        "--json",
    ]));
    assert_eq!(v["main"]["events"], 300, "{v}");
    assert_eq!(v["format-v1"]["events"], 300, "{v}");
    // A version 1 log cannot hold signatures: refused (a usage error), not silently unsigned.
    let o = tally(&[
        "bench",
        "--sign",
        "--format-version",
        "1",
        "--events",
        "10",
        "--durability",
        "none",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("format version 2"),
        "{o:?}"
    );
}
