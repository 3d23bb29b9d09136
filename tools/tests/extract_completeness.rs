//! Complete extracts (docs/EXTRACT.md, "Completeness"): a stream extract proves that it
//! holds every event of the stream up to its checkpoint, and a window extract every event
//! recorded in the window. Property tests: every proper subset, superset or reordering of
//! the events of a stream or window extract fails `tally verify-extract` (exit 1), and the
//! whole one passes; a correlation extract says it proves inclusion only.
//!
//! Method: a real version 2 log with interleaved streams, extracted with the `tally`
//! binary; the extract's JSON is then edited as a dishonest operator would (removing,
//! adding, duplicating, reordering or cutting events, each with its own valid proof).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::Value;
use tally_engine::{EventData, ExpectedVersion, Log, Options};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A log, its public key file, and extracts of stream `trade-1`, `trade-2`, a window and a
/// correlation.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    pubkey: PathBuf,
    stream: Value,
    other_stream: Value,
    window: Value,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let log = Log::open(
            &dir,
            Options {
                segment_bytes: 64 * 1024,
                ..Options::default()
            },
        )
        .unwrap();
        for i in 0..400u64 {
            let e = EventData::json("AMEND", format!(r#"{{"i":{i}}}"#))
                .correlation_id(format!("c-{}", i % 3));
            log.append(&format!("trade-{}", i % 4), ExpectedVersion::Any, &[e])
                .unwrap();
            if i == 150 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            if i == 250 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        log.close().unwrap();
        let pubkey = tmp.path().join("log.pub");
        std::fs::write(&pubkey, tally(&["pubkey", s(&dir)]).stdout).unwrap();
        let extract = |args: &[&str], name: &str| -> Value {
            let out = tmp.path().join(name);
            let mut a = vec!["extract", s(&dir), "--format", "2"];
            a.extend_from_slice(args);
            a.extend_from_slice(&["--out", s(&out)]);
            let o = tally(&a);
            assert!(o.status.success(), "{o:?}");
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
        };
        let stream = extract(&["--stream", "trade-1"], "stream.json");
        let other_stream = extract(&["--stream", "trade-2"], "other.json");
        // A window from the middle of the log: between the two pauses.
        let all = extract(
            &["--from-time", "0", "--to-time", "9999999999999999999"],
            "all.json",
        );
        let t = |i: usize| all["events"][i]["record_time"].as_str().unwrap().to_owned();
        let window = extract(
            &["--from-time", &t(151), "--to-time", &t(251)],
            "window.json",
        );
        Fixture {
            _tmp: tmp,
            dir,
            pubkey,
            stream,
            other_stream,
            window,
        }
    })
}

/// `tally verify-extract` on `doc`: the exit code and what it printed.
fn verify(doc: &Value) -> (i32, String) {
    let f = fixture();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(doc).unwrap()).unwrap();
    let o = tally(&["verify-extract", s(file.path()), "--pubkey", s(&f.pubkey)]);
    (
        o.status.code().unwrap(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

fn with_events(doc: &Value, events: Vec<Value>) -> Value {
    let mut d = doc.clone();
    d["events"] = Value::Array(events);
    d
}

#[test]
fn the_whole_extracts_verify_and_say_what_they_prove() {
    let f = fixture();
    let (code, out) = verify(&f.stream);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("complete: every event of stream trade-1"),
        "{out}"
    );
    assert_eq!(f.stream["events"].as_array().unwrap().len(), 100);
    let (code, out) = verify(&f.window);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("complete: every event recorded from"), "{out}");
    assert_eq!(f.window["events"].as_array().unwrap().len(), 100);
    let corr = f.dir.parent().unwrap().join("corr.json");
    let o = tally(&[
        "extract",
        s(&f.dir),
        "--correlation",
        "c-1",
        "--out",
        s(&corr),
    ]);
    assert!(o.status.success(), "{o:?}");
    let o = tally(&["verify-extract", s(&corr), "--pubkey", s(&f.pubkey)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("inclusion only") && out.contains("attribute index"),
        "{out}"
    );
}

/// Edits a list of events: `op` 0 removes one, 1 duplicates one, 2 swaps two, 3 cuts the
/// newest `k`, 4 inserts one from `foreign`.
fn edit(events: &[Value], foreign: &[Value], op: u8, i: usize, j: usize, k: usize) -> Vec<Value> {
    let mut e = events.to_vec();
    let n = e.len();
    match op {
        0 => {
            e.remove(i % n);
        }
        1 => {
            let d = e[i % n].clone();
            e.insert(j % (n + 1), d);
        }
        2 => {
            let (a, b) = (i % n, j % n);
            if a == b {
                e.swap(a, (a + 1) % n);
            } else {
                e.swap(a, b);
            }
        }
        3 => e.truncate(n - 1 - k % (n - 1)),
        _ => e.insert(j % (n + 1), foreign[i % foreign.len()].clone()),
    }
    e
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    #[test]
    fn any_proper_subset_superset_or_reordering_of_a_stream_extract_fails(
        op in 0u8..5, i in 0usize..1000, j in 0usize..1000, k in 0usize..1000
    ) {
        let f = fixture();
        let events = f.stream["events"].as_array().unwrap();
        let foreign = f.other_stream["events"].as_array().unwrap();
        let edited = edit(events, foreign, op, i, j, k);
        prop_assume!(&edited != events);
        let (code, out) = verify(&with_events(&f.stream, edited));
        prop_assert_eq!(code, 1, "op {} i {} j {} k {}: {}", op, i, j, k, out);
    }

    #[test]
    fn any_proper_subset_superset_or_reordering_of_a_window_extract_fails(
        op in 0u8..5, i in 0usize..1000, j in 0usize..1000, k in 0usize..1000
    ) {
        let f = fixture();
        let events = f.window["events"].as_array().unwrap();
        // Events from outside the window, each with its own valid proof.
        let foreign = f.stream["events"].as_array().unwrap();
        let edited = edit(events, foreign, op, i, j, k);
        prop_assume!(&edited != events);
        let (code, out) = verify(&with_events(&f.window, edited));
        prop_assert_eq!(code, 1, "op {} i {} j {} k {}: {}", op, i, j, k, out);
    }
}

#[test]
fn a_window_cannot_be_shrunk_or_its_edges_hidden() {
    let f = fixture();
    // Moving the window's start past its first event, with that event dropped.
    let mut d = f.window.clone();
    let events = d["events"].as_array().unwrap()[1..].to_vec();
    d["events"] = Value::Array(events);
    let first = d["completeness"]["first_position"].as_u64().unwrap();
    d["completeness"]["first_position"] = Value::from(first + 1);
    let (code, out) = verify(&d);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("completeness.before"), "{out}");
    // Dropping the record after the window.
    let mut d = f.window.clone();
    d["completeness"]["after"] = Value::Null;
    let (code, out) = verify(&d);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("completeness.after"), "{out}");
    // Cutting a stream extract's head proof to an older version.
    let mut d = f.stream.clone();
    let events = d["events"].as_array().unwrap().clone();
    let n = events.len();
    d["events"] = Value::Array(events[..n - 1].to_vec());
    d["completeness"]["head"]["version"] = Value::from(n as u64 - 2);
    d["completeness"]["head"]["position"] = events[n - 2]["position"].clone();
    let (code, out) = verify(&d);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not verify against the signed stream heads root"),
        "{out}"
    );
}

#[test]
fn the_same_edits_pass_as_inclusion_only_so_completeness_is_what_catches_them() {
    // Read as the inclusion-only format 1, an extract with an event removed still verifies:
    // every remaining event is in the signed log. Only the completeness proof of format 2
    // shows that one is missing.
    let f = fixture();
    for doc in [&f.stream, &f.window] {
        let events = doc["events"].as_array().unwrap();
        let cut = edit(events, events, 0, 7, 0, 0);
        let mut d = with_events(doc, cut);
        let (code, out) = verify(&d);
        assert_eq!(code, 1, "{out}");
        d["format"] = Value::from("tally-audit-extract/1");
        let (code, out) = verify(&d);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("inclusion only"), "{out}");
    }
}

#[test]
fn require_complete_refuses_an_extract_presented_as_inclusion_only() {
    // `format` and `completeness` are not signed: a complete extract relabelled as format 1
    // still verifies as inclusion only, unless the auditor asks for completeness.
    let f = fixture();
    let mut d = f.stream.clone();
    d["format"] = Value::from("tally-audit-extract/1");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), serde_json::to_vec(&d).unwrap()).unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec!["verify-extract", s(file.path()), "--pubkey", s(&f.pubkey)];
        a.extend_from_slice(extra);
        tally(&a)
    };
    assert_eq!(args(&[]).status.code(), Some(0));
    let o = args(&["--require-complete"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("inclusion only"));
    // The whole one passes with it.
    let file2 = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file2.path(), serde_json::to_vec(&f.stream).unwrap()).unwrap();
    let o = tally(&[
        "verify-extract",
        s(file2.path()),
        "--pubkey",
        s(&f.pubkey),
        "--require-complete",
    ]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
}
