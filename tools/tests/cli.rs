//! The `tally` binary end to end: output, JSON shape and exit status of the operator
//! commands on a generated log, and tampering caught by `verify` and `verify-extract`.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tally_engine::{
    Direction, Durability, EventData, ExpectedVersion, Log, Options, Position, Timestamp,
};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn opts() -> Options {
    Options {
        segment_bytes: 64 << 10,
        durability: Durability::None,
        ..Options::default()
    }
}

fn event(i: usize) -> EventData {
    EventData::json(
        if i.is_multiple_of(3) {
            "TradeNew"
        } else {
            "TradeAmended"
        },
        format!(r#"{{"trade":{},"qty":"{}"}}"#, i % 7, 100 + i),
    )
    .actor(if i.is_multiple_of(2) { "alice" } else { "bob" })
    .correlation_id(format!("corr-{}", i % 5))
    .aggregate_type("Trade")
}

/// A log of `n` events over 7 trade streams, several sealed segments, closed (which
/// writes a checkpoint).
fn make_log(dir: &Path, n: usize) {
    let log = Log::open(dir, opts()).unwrap();
    for i in 0..n {
        log.append(
            &format!("trade-{}", i % 7),
            ExpectedVersion::Any,
            &[event(i)],
        )
        .unwrap();
    }
    log.wait_sealed().unwrap();
    log.close().unwrap();
}

fn pubkey_file(dir: &Path, out: &Path) -> PathBuf {
    let o = tally(&["pubkey", dir.to_str().unwrap()]);
    assert_eq!(code(&o), 0);
    let path = out.join("pub.key");
    std::fs::write(&path, &o.stdout).unwrap();
    path
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn init_creates_a_directory_and_key_and_pubkey_prints_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let o = tally(&["init", s(&dir), "--json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let v = json(&o);
    let key = std::fs::metadata(dir.join("tally.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    let o = tally(&["pubkey", s(&dir)]);
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o).trim(), v["public_key"].as_str().unwrap());
    assert_eq!(stdout(&o).trim().len(), 64);
    // Again: refused, with one line and no panic.
    let o = tally(&["init", s(&dir)]);
    assert_eq!(code(&o), 2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn inspect_dump_verify_checkpoint_and_prove_on_a_generated_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 1000);
    let pk = pubkey_file(&dir, tmp.path());

    let o = tally(&["inspect", s(&dir), "--json"]);
    assert_eq!(code(&o), 0);
    let v = json(&o);
    let segs = v["segments"].as_array().unwrap();
    assert!(segs.len() > 2);
    assert_eq!(v["totals"]["records"], 1000);
    assert_eq!(segs[0]["state"], "sealed");
    assert_eq!(segs[0]["first_position"], 0);
    assert!(segs[0]["merkle_root"].as_str().unwrap().len() == 64);
    let o = tally(&["inspect", s(&dir)]);
    assert_eq!(code(&o), 0);
    assert!(stdout(&o).contains("total:"), "{}", stdout(&o));
    let o = tally(&["inspect", s(&dir), "--segment", "0", "--json"]);
    assert_eq!(code(&o), 0);
    let v = json(&o);
    assert_eq!(v["header"]["base_position"], 0);
    assert_eq!(v["footer"]["first_position"], 0);
    assert!(v["index"]["streams"].as_u64().unwrap() > 0);

    let o = tally(&[
        "dump",
        s(&dir),
        "--from",
        "10",
        "--to",
        "40",
        "--stream",
        "trade-3",
        "--format",
        "jsonl",
    ]);
    assert_eq!(code(&o), 0);
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert_eq!(l["stream"], "trade-3");
        let p = l["position"].as_u64().unwrap();
        assert!((10..=40).contains(&p));
        assert_eq!(l["payload"]["trade"], 3, "JSON payloads inline: {l}");
        assert_eq!(l["aggregate_type"], "Trade");
        for k in [
            "version",
            "event_id",
            "type",
            "schema_version",
            "record_time",
            "event_time",
            "actor",
            "correlation_id",
            "causation_id",
            "record_hash",
        ] {
            assert!(l.get(k).is_some(), "{k} in {l}");
        }
    }
    let o = tally(&["dump", s(&dir), "--type", "TradeNew", "--to", "9"]);
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o).lines().count(), 1 + 4, "{}", stdout(&o));

    let o = tally(&["verify", s(&dir), "--pubkey", s(&pk), "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let v = json(&o);
    assert_eq!(v["ok"], true);
    assert_eq!(v["records"], 1000);
    assert!(v["checkpoints"].as_u64().unwrap() >= 1);
    let o = tally(&["verify", s(&dir), "--from-segment", "2"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    let o = tally(&["verify", s(&dir), "--from-segment", "999"]);
    assert_eq!(
        code(&o),
        2,
        "no such segment is a usage error: {}",
        stdout(&o)
    );

    let o = tally(&["checkpoint", s(&dir), "--json"]);
    assert_eq!(code(&o), 0);
    let cp = json(&o);
    assert_eq!(cp["tree_size"], 1000);
    let o = tally(&["checkpoint", s(&dir), "--list", "--json"]);
    assert_eq!(json(&o).as_array().unwrap().last().unwrap(), &cp);

    let o = tally(&["prove", s(&dir), "--position", "123", "--json"]);
    assert_eq!(code(&o), 0);
    let v = json(&o);
    assert_eq!(v["tree_size"], 1000);
    assert_eq!(v["root"], cp["root"]);
    assert!(!v["path"].as_array().unwrap().is_empty());
    let o = tally(&["prove", s(&dir), "--consistency", "100", "1000", "--json"]);
    assert_eq!(code(&o), 0);
    assert_eq!(json(&o)["new_root"], cp["root"]);
    let o = tally(&["prove", s(&dir), "--position", "1000"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn a_flipped_byte_in_a_sealed_segment_fails_verify_naming_the_place() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 400);
    let seg = dir.join("00000000000000000000.seg");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    // Inside the first record's payload (header 88 bytes, then the envelope).
    let at = 4096 + 88 + 60;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    let o = tally(&["verify", s(&dir), "--json"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let v = json(&o);
    assert_eq!(v["ok"], false);
    assert!(
        v["failure"]["file"]
            .as_str()
            .unwrap()
            .ends_with("00000000000000000000.seg"),
        "{v}"
    );
    assert_eq!(v["failure"]["offset"], 4096);
    assert!(v["failure"]["position"].as_u64().is_some());
    let o = tally(&["verify", s(&dir)]);
    assert_eq!(code(&o), 1);
    assert!(stdout(&o).starts_with("FAILED"), "{}", stdout(&o));
}

#[test]
fn a_careful_forger_who_rewrites_and_rechains_is_caught_by_the_signed_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 300);
    let pk = pubkey_file(&dir, tmp.path());
    // The forger writes a whole new log with the same identity (so the same chain seed),
    // changing one event: every checksum, chain link, footer, Merkle root and index is
    // valid. They keep the signed checkpoints, but cannot sign new ones with our key.
    let forged = tmp.path().join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    std::fs::copy(dir.join("tally.meta"), forged.join("tally.meta")).unwrap();
    {
        let src = Log::open(
            &dir,
            Options {
                recovery: tally_engine::RecoveryMode::ReadOnly,
                ..opts()
            },
        )
        .unwrap();
        let dst = Log::open(
            &forged,
            Options {
                auto_checkpoints: false,
                ..opts()
            },
        )
        .unwrap();
        for e in src.read_all(Position(0), 1000, Direction::Forward).unwrap() {
            let payload = if e.position.0 == 42 {
                br#"{"trade":0,"qty":"999999"}"#.to_vec()
            } else {
                e.payload().to_vec()
            };
            let mut d = EventData::json(e.event_type(), String::from_utf8(payload).unwrap())
                .with_id(e.event_id)
                .actor(e.actor())
                .correlation_id(e.correlation_id())
                .aggregate_type(e.aggregate_type())
                .event_time(Timestamp(e.event_time.0));
            d.schema_version = e.schema_version;
            dst.append(e.stream(), ExpectedVersion::Any, &[d]).unwrap();
        }
        dst.wait_sealed().unwrap();
        dst.close().unwrap();
    }
    std::fs::copy(
        dir.join("tally.checkpoints"),
        forged.join("tally.checkpoints"),
    )
    .unwrap();
    // The forged log is internally consistent...
    let forged_log = Log::open(
        &forged,
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(forged_log.next_position().0, 300);
    drop(forged_log);
    // ...but not with the checkpoints signed by our key.
    let o = tally(&["verify", s(&forged), "--pubkey", s(&pk), "--json"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let v = json(&o);
    let what = v["failure"]["what"].as_str().unwrap();
    assert!(what.contains("Merkle root"), "{what}");
    assert!(
        v["failure"]["file"]
            .as_str()
            .unwrap()
            .ends_with("tally.checkpoints"),
        "{v}"
    );
    // Without the checkpoints, verify --pubkey fails too: nothing our key signed covers it.
    std::fs::remove_file(forged.join("tally.checkpoints")).unwrap();
    let o = tally(&["verify", s(&forged), "--pubkey", s(&pk)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
}

#[test]
fn deleting_the_end_of_a_sealed_log_fails_against_an_earlier_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 300);
    let log = Log::open(&dir, opts()).unwrap();
    let last = log.segments().pop().unwrap().path;
    log.checkpoint().unwrap();
    log.close().unwrap();
    std::fs::remove_file(&last).unwrap();
    let o = tally(&["verify", s(&dir), "--json"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let what = json(&o)["failure"]["what"].as_str().unwrap().to_owned();
    assert!(what.contains("records were removed"), "{what}");
}

fn edit_json(path: &Path, out: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(out, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn extracts_verify_offline_and_any_change_fails_precisely() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 300);
    let pk = pubkey_file(&dir, tmp.path());
    let x = tmp.path().join("x.json");
    let o = tally(&[
        "extract",
        s(&dir),
        "--format",
        "2",
        "--stream",
        "trade-4",
        "--out",
        s(&x),
    ]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    // Offline: the data directory is gone.
    let moved = tmp.path().join("elsewhere");
    std::fs::rename(&dir, &moved).unwrap();
    let o = tally(&["verify-extract", s(&x), "--pubkey", s(&pk), "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert_eq!(json(&o)["events"], 43);
    let y = tmp.path().join("y.json");
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "actor",
            Box::new(|v| v["events"][2]["actor"] = "mallory".into()),
            "field actor",
        ),
        (
            "payload",
            Box::new(|v| v["events"][0]["payload"]["qty"] = "1".into()),
            "field payload",
        ),
        (
            "body",
            Box::new(|v| {
                let b = v["events"][1]["record"]["body"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let mut chars: Vec<char> = b.chars().collect();
                chars[10] = if chars[10] == 'A' { 'B' } else { 'A' };
                v["events"][1]["record"]["body"] = chars.into_iter().collect::<String>().into();
            }),
            "body does not match",
        ),
        (
            "proof",
            Box::new(|v| {
                let h = v["events"][3]["proof"]["path"][0]
                    .as_str()
                    .unwrap()
                    .to_owned();
                let first = if h.starts_with('0') { '1' } else { '0' };
                let flipped = format!("{first}{}", h.get(1..).unwrap());
                v["events"][3]["proof"]["path"][0] = flipped.into();
            }),
            "inclusion proof",
        ),
        (
            "checkpoint root",
            Box::new(|v| v["checkpoint"]["root"] = "00".repeat(32).into()),
            "readable fields differ",
        ),
        (
            "checkpoint entry",
            Box::new(|v| {
                let e = v["checkpoint"]["entry"].as_str().unwrap().to_owned();
                let flipped = format!(
                    "{}{}",
                    &e[..100],
                    if &e[100..101] == "0" { "1" } else { "0" }
                );
                v["checkpoint"]["entry"] = format!("{flipped}{}", &e[101..]).into();
            }),
            "checkpoint",
        ),
        (
            "dropped proof hash",
            Box::new(|v| {
                v["events"][5]["proof"]["path"]
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
            "inclusion proof",
        ),
    ];
    for (name, edit, expect) in cases {
        edit_json(&x, &y, edit);
        let o = tally(&["verify-extract", s(&y), "--pubkey", s(&pk)]);
        assert_eq!(code(&o), 1, "{name}: {}", stdout(&o));
        assert!(stdout(&o).contains(expect), "{name}: {}", stdout(&o));
    }
    // Another key: refused.
    let other = tmp.path().join("other.key");
    std::fs::write(
        &other,
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a\n",
    )
    .unwrap();
    let o = tally(&["verify-extract", s(&x), "--pubkey", s(&other)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert!(stdout(&o).contains("not among the trusted keys"));
    std::fs::rename(&moved, &dir).unwrap();
    let c = tmp.path().join("c.json");
    let o = tally(&[
        "extract",
        s(&dir),
        "--correlation",
        "corr-2",
        "--out",
        s(&c),
    ]);
    assert_eq!(code(&o), 0);
    let o = tally(&["verify-extract", s(&c), "--pubkey", s(&pk), "--json"]);
    assert_eq!(json(&o)["events"], 60);
}

#[test]
fn backup_copies_up_to_a_checkpoint_and_the_copy_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 500);
    let pk = pubkey_file(&dir, tmp.path());
    // Copy while the log is open by another opener (as under a server).
    let live = Log::open(&dir, opts()).unwrap();
    live.checkpoint().unwrap();
    live.append("trade-x", ExpectedVersion::Any, &[event(1)])
        .unwrap();
    let dest = tmp.path().join("copy");
    let o = tally(&["backup", s(&dir), s(&dest)]);
    assert_eq!(
        code(&o),
        0,
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    drop(live);
    let o = tally(&["verify", s(&dest), "--pubkey", s(&pk), "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert_eq!(json(&o)["records"], 500);
    // Restoring is opening it.
    let restored = Log::open(&dest, opts()).unwrap();
    assert_eq!(restored.next_position().0, 500);
    restored
        .append("trade-1", ExpectedVersion::Any, &[event(2)])
        .unwrap();
    restored.close().unwrap();
    let o = tally(&["backup", s(&dir), s(&dest)]);
    assert_eq!(code(&o), 2, "an existing destination is refused");
}

#[test]
fn bad_arguments_and_directories_give_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing");
    for args in [
        vec!["verify", s(&missing)],
        vec!["inspect", s(&missing)],
        vec!["dump", s(&missing)],
        vec!["prove", s(&missing), "--position", "1"],
    ] {
        let o = tally(&args);
        assert_eq!(code(&o), 2, "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // A damaged identity file.
    let dir = tmp.path().join("damaged");
    make_log(&dir, 10);
    std::fs::write(dir.join("tally.meta"), b"garbage").unwrap();
    // Damage is a finding (exit 1), reported in one line naming the file.
    let o = tally(&["verify", s(&dir)]);
    assert_eq!(code(&o), 1);
    let out = stdout(&o);
    assert!(
        !out.contains("panicked") && out.contains("tally.meta"),
        "{out}"
    );
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    // Usage errors.
    let o = tally(&["verify"]);
    assert_eq!(code(&o), 2);
    let o = tally(&["prove", s(&dir), "--consistency", "1"]);
    assert_eq!(code(&o), 2);
}

#[test]
fn a_log_whose_key_is_kept_elsewhere_never_gets_a_new_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let key = tmp.path().join("secure.key");
    let o = tally(&["keygen", s(&key)]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let public = stdout(&o);
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(code(&tally(&["keygen", s(&key)])), 2, "never overwrites");
    let o = tally(&["pubkey", "--key", s(&key)]);
    assert_eq!(stdout(&o), public);

    let o = tally(&["init", s(&dir), "--key", s(&key), "--json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!dir.join("tally.key").exists());
    let log = Log::open(
        &dir,
        Options {
            signing_key: Some(key.clone()),
            ..opts()
        },
    )
    .unwrap();
    for i in 0..50 {
        log.append("trade-1", ExpectedVersion::Any, &[event(i)])
            .unwrap();
    }
    log.close().unwrap();

    // Without the key, a writing command refuses instead of minting a new one.
    let o = tally(&["checkpoint", s(&dir)]);
    assert_eq!(code(&o), 2);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is missing") && err.contains("--key"), "{err}");
    assert!(!dir.join("tally.key").exists(), "no key was created");
    // So does the engine.
    let e = Log::open(&dir, opts()).unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
    // With it, the checkpoint is signed by that key.
    let o = tally(&["checkpoint", s(&dir), "--key", s(&key), "--json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let pk = tmp.path().join("pub.key");
    std::fs::write(&pk, &public).unwrap();
    let o = tally(&["verify", s(&dir), "--pubkey", s(&pk), "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(json(&o)["checkpoints"].as_u64().unwrap() >= 2);
}

#[test]
fn backup_after_a_key_rotation_verifies_and_keeps_every_signer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    make_log(&dir, 200);
    let old = stdout(&tally(&["pubkey", s(&dir)]));
    let new_key = tmp.path().join("new.key");
    let new = stdout(&tally(&["keygen", s(&new_key)]));
    let log = Log::open(
        &dir,
        Options {
            signing_key: Some(new_key.clone()),
            ..opts()
        },
    )
    .unwrap();
    log.append("trade-1", ExpectedVersion::Any, &[event(1)])
        .unwrap();
    log.close().unwrap();
    let dest = tmp.path().join("copy");
    let o = tally(&["backup", s(&dir), s(&dest), "--key", s(&new_key)]);
    assert_eq!(
        code(&o),
        0,
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    let keys = tmp.path().join("keys.pub");
    std::fs::write(&keys, format!("{old}{new}")).unwrap();
    let o = tally(&["verify", s(&dest), "--pubkey", s(&keys), "--json"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    // The old key alone does not cover the checkpoints after the rotation.
    let only_old = tmp.path().join("old.pub");
    std::fs::write(&only_old, &old).unwrap();
    let o = tally(&["verify", s(&dest), "--pubkey", s(&only_old)]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
}

#[test]
fn json_numbers_keep_every_digit_in_dump_and_extract() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let payload = r#"{"notional":123456789012345678901234.50,"rate":0.1000000000000000055511151231257827,"qty":18446744073709551617}"#;
    let log = Log::open(&dir, opts()).unwrap();
    log.append(
        "trade-9",
        ExpectedVersion::Any,
        &[EventData::json("TradeNew", payload)],
    )
    .unwrap();
    log.close().unwrap();
    let o = tally(&["dump", s(&dir), "--format", "jsonl"]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    for digits in [
        "123456789012345678901234.50",
        "0.1000000000000000055511151231257827",
        "18446744073709551617",
    ] {
        assert!(out.contains(digits), "{digits} in {out}");
    }
    let x = tmp.path().join("x.json");
    let o = tally(&[
        "extract",
        s(&dir),
        "--format",
        "2",
        "--stream",
        "trade-9",
        "--out",
        s(&x),
    ]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&x).unwrap();
    assert!(text.contains("123456789012345678901234.50"), "{text}");
    let pk = pubkey_file(&dir, tmp.path());
    let o = tally(&["verify-extract", s(&x), "--pubkey", s(&pk)]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}

/// An interrupted seal (footer synced, index sidecar not yet written) is a state recovery
/// accepts: a missing sidecar is rebuildable and never a reason for `verify` to fail to run.
#[test]
fn verify_runs_when_a_sealed_segments_sidecar_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    for i in 0..400 {
        log.append(
            &format!("trade-{}", i % 7),
            ExpectedVersion::Any,
            &[EventData::json(
                "TradeNew",
                format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(300)),
            )],
        )
        .unwrap();
    }
    log.wait_sealed().unwrap();
    let sealed: Vec<_> = log.segments().into_iter().filter(|s| s.sealed).collect();
    assert!(sealed.len() >= 2, "{} sealed", sealed.len());
    log.close().unwrap();
    // As if the seal of the newest sealed segment had stopped after its footer.
    let seq = sealed.last().unwrap().seq;
    std::fs::remove_file(dir.path().join(seq.index_file_name())).unwrap();
    let o = tally(&["verify", s(dir.path())]);
    assert_eq!(
        code(&o),
        0,
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    // A log opened for writing rebuilds the sidecar; verify passes after it too.
    Log::open(dir.path(), opts()).unwrap().close().unwrap();
    assert!(dir.path().join(seq.index_file_name()).exists());
    let o = tally(&["verify", s(dir.path())]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
}
