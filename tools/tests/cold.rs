//! `tally compact` and the operator's tools across tiers: a log of several segments is
//! compacted to a `file://` store with a dry run first; `inspect` then shows which segments
//! are cold and where, and `dump`, `verify`, `extract` and `verify-extract` read every
//! event through the store exactly as before; a cold object altered in the store makes
//! `verify` fail and name it.

#![allow(clippy::unwrap_used)]

mod common;

use serde_json::Value;
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options};

use common::{stdout, succeeded, success_json as json, tally};

fn write_log(dir: &std::path::Path) -> u64 {
    let log = Log::open(
        dir,
        Options {
            segment_bytes: 64 << 10,
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    let mut n = 0;
    for b in 0..200u64 {
        let events: Vec<EventData> = (0..10)
            .map(|i| {
                EventData::json(
                    "TradeAmended",
                    format!("{{\"trade\":{b},\"leg\":{i},\"qty\":\"{}.5\"}}", b * 10 + i),
                )
                .aggregate_type("Trade")
                .actor("desk-a")
            })
            .collect();
        log.append(&format!("trade-{}", b % 4), ExpectedVersion::Any, &events)
            .unwrap();
        n += 10;
    }
    log.wait_sealed().unwrap();
    log.close().unwrap();
    n
}

#[test]
fn compact_moves_segments_and_every_tool_reads_across_tiers() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let n = write_log(dir.path());
    let d = dir.path().to_str().unwrap();
    let url = format!("file://{}", store.path().display());
    let dump_before = stdout(&tally(&["dump", d]));

    // A store URL of another kind is refused with a reason, and nothing moves.
    let o = tally(&["compact", d, "--store", "ftp://host/x"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("file:///path or s3://"));

    let dry = json(&tally(&[
        "compact",
        d,
        "--store",
        &url,
        "--dry-run",
        "--json",
        "--keep-local-segments",
        "1",
    ]));
    let would = dry["moved"].as_array().unwrap().len();
    assert!(would >= 3, "{dry}");
    assert_eq!(dry["cold_segments"], 0);
    let done = json(&tally(&[
        "compact",
        d,
        "--store",
        &url,
        "--json",
        "--keep-local-segments",
        "1",
    ]));
    assert_eq!(done["moved"].as_array().unwrap().len(), would);
    assert_eq!(done["cold_segments"], would);
    for m in done["moved"].as_array().unwrap() {
        assert!(m["object_bytes"].as_u64().unwrap() < m["record_bytes"].as_u64().unwrap());
    }

    // inspect: cold segments with their objects.
    let inspect = json(&tally(&["inspect", d, "--json"]));
    let segs = inspect["segments"].as_array().unwrap();
    let cold: Vec<&Value> = segs.iter().filter(|s| s["state"] == "cold").collect();
    assert_eq!(cold.len(), would);
    assert!(cold[0]["object"].as_str().unwrap().starts_with(&url));
    assert!(
        cold[0]["first_time"].is_string(),
        "times come from the manifest: {}",
        cold[0]
    );
    let one = json(&tally(&["inspect", d, "--segment", "0", "--json"]));
    assert_eq!(one["state"], "cold");
    assert!(
        one["index"]["records"].as_u64().unwrap() > 0,
        "the sidecar stays local"
    );

    // dump and verify read through the store (the open uses DIR/cold.store).
    assert_eq!(stdout(&tally(&["dump", d])), dump_before);
    let v = tally(&["verify", d]);
    assert!(v.status.success(), "{}", stdout(&v));

    // prove, find and audit reach the cold events too.
    let proof = json(&tally(&["prove", d, "--position", "5", "--json"]));
    assert!(proof.to_string().contains("\"position\":5"), "{proof}");
    let found = tally(&["find", d, "--type", "TradeAmended", "--format", "jsonl"]);
    assert!(
        found.status.success(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );
    let first: Value = serde_json::from_str(stdout(&found).lines().next().unwrap()).unwrap();
    assert_eq!(
        first["position"], 0,
        "the first event, cold, is found: {first}"
    );
    assert_eq!(stdout(&found).lines().count() as u64, n);
    let audit = tally(&["audit", d, "--stream", "trade-0", "--json"]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(stdout(&audit).matches("TradeAmended").count() >= (n / 4) as usize);

    // An extract of a stream whose oldest events are cold verifies offline.
    let ext = dir.path().join("t0.tex");
    let o = tally(&[
        "extract",
        d,
        "--stream",
        "trade-0",
        "--out",
        ext.to_str().unwrap(),
    ]);
    succeeded(&o);
    let pubkey = stdout(&tally(&["pubkey", d]));
    let key = dir.path().join("log.pub");
    std::fs::write(&key, pubkey).unwrap();
    let o = tally(&[
        "verify-extract",
        ext.to_str().unwrap(),
        "--pubkey",
        key.to_str().unwrap(),
    ]);
    succeeded(&o);
    assert!(stdout(&o).contains(&format!("{}", n / 4)), "{}", stdout(&o));

    // A cold object altered in the store: verify fails and names it.
    let obj = walk(store.path())
        .into_iter()
        .find(|p| p.ends_with("00000000000000000001.cold"))
        .unwrap();
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&obj, &bytes).unwrap();
    let o = tally(&["verify", d]);
    assert_ne!(o.status.code(), Some(0));
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains("cold segment 1") && text.contains("00000000000000000001.cold"),
        "{text}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

#[test]
fn backup_takes_cold_segments_by_reference_or_by_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    write_log(dir.path());
    let d = dir.path().to_str().unwrap();
    let url = format!("file://{}", store.path().display());
    json(&tally(&[
        "compact",
        d,
        "--store",
        &url,
        "--json",
        "--keep-local-segments",
        "1",
    ]));
    let dump = stdout(&tally(&["dump", d]));

    let out = tempfile::tempdir().unwrap();
    let by_ref = out.path().join("ref");
    let o = tally(&["backup", d, by_ref.to_str().unwrap()]);
    succeeded(&o);
    assert!(by_ref.join("cold.manifest").exists() && by_ref.join("cold.store").exists());
    assert!(
        !by_ref.join("00000000000000000000.seg").exists(),
        "by reference: no copy"
    );
    let r = by_ref.to_str().unwrap();
    assert_eq!(
        stdout(&tally(&["dump", r])),
        dump,
        "the copy reads the same objects"
    );

    let by_copy = out.path().join("copy");
    let o = tally(&["backup", d, by_copy.to_str().unwrap(), "--cold", "copy"]);
    succeeded(&o);
    assert!(!by_copy.join("cold.manifest").exists());
    assert!(by_copy.join("00000000000000000000.seg").exists());
    // The copy needs no store: it verifies and dumps with the store gone.
    std::fs::remove_dir_all(store.path()).unwrap();
    let c = by_copy.to_str().unwrap();
    let v = tally(&["verify", c]);
    assert!(v.status.success(), "{}", stdout(&v));
    assert_eq!(stdout(&tally(&["dump", c])), dump);
    // ...while the reference backup now fails, naming the missing object.
    let v = tally(&["verify", r]);
    assert_ne!(v.status.code(), Some(0));
}
