//! `tally find`: index lookups on a data directory, compared with what was appended.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use serde_json::Value;
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options, Timestamp};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn jsonl(o: &Output) -> Vec<Value> {
    assert!(o.status.success(), "{o:?}");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn positions(v: &[Value]) -> Vec<u64> {
    v.iter().map(|e| e["position"].as_u64().unwrap()).collect()
}

/// 2026-11-23T00:00:00Z.
const DAY: u64 = 1_795_392_000_000_000_000;
const HOUR: u64 = 3_600_000_000_000;
const N: u64 = 1500;

#[test]
fn find_selects_by_field_and_time_through_the_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            segment_bytes: 64 << 10,
            durability: Durability::None,
            ..Options::default()
        },
    )
    .unwrap();
    // 1,500 events over several segments: a type per position modulo 3, a correlation id
    // shared by every 50th, one event an hour apart in event time from midnight.
    let mut ids = Vec::new();
    for i in 0..N {
        let ty = ["NEW", "AMEND", "SETTLE"][(i % 3) as usize];
        let e = EventData::json(ty, format!(r#"{{"i":{i}}}"#))
            .correlation_id(format!("deal-{}", i % 50))
            .actor(if i % 2 == 0 { "alice" } else { "bob" })
            .event_time(Timestamp(DAY + (i % 24) * HOUR));
        let r = log
            .append(&format!("trade-{}", i % 7), ExpectedVersion::Any, &[e])
            .unwrap();
        assert_eq!(r.first_position.0, i);
        ids.push(
            log.read_all(r.first_position, 1, tally_engine::Direction::Forward)
                .unwrap()[0]
                .event_id,
        );
    }
    assert!(log.segments().len() > 2);
    log.wait_sealed().unwrap();
    // A lookup writes the sealed segments' attribute sidecars.
    log.find(&tally_engine::Query::all().limit(1)).unwrap();
    let sealed = log.segments().iter().filter(|s| s.sealed).count() as u64;
    log.close().unwrap();
    let d = dir.path().to_str().unwrap();

    let got = jsonl(&tally(&[
        "find",
        d,
        "--correlation",
        "deal-7",
        "--format",
        "jsonl",
    ]));
    assert_eq!(positions(&got), (7..N).step_by(50).collect::<Vec<u64>>());
    assert!(got.iter().all(|v| v["correlation_id"] == "deal-7"));

    // AMEND events that happened between 03:00 and 05:00 (hours 3 and 4).
    let got = jsonl(&tally(&[
        "find",
        d,
        "--type",
        "AMEND",
        "--happened-from",
        "2026-11-23T03:00:00Z",
        "--happened-to",
        "2026-11-23T05:00:00Z",
        "--format",
        "jsonl",
    ]));
    let want: Vec<u64> = (0..N)
        .filter(|i| i % 3 == 1 && (3..5).contains(&(i % 24)))
        .collect();
    assert_eq!(positions(&got), want);

    // By event id, and a limit.
    let id = ids[123].to_string();
    let got = jsonl(&tally(&["find", d, "--id", &id, "--format", "jsonl"]));
    assert_eq!(positions(&got), [123]);
    let got = jsonl(&tally(&[
        "find", d, "--actor", "bob", "--limit", "5", "--from", "100", "--format", "jsonl",
    ]));
    assert_eq!(positions(&got), [101, 103, 105, 107, 109]);

    // The table names the columns; two fields at once and an empty value are usage errors.
    let o = tally(&["find", d, "--correlation", "deal-1"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.starts_with("  position") && text.contains("deal-1"),
        "{text}"
    );
    assert_eq!(
        tally(&["find", d, "--actor", "a", "--type", "NEW"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(tally(&["find", d, "--actor", ""]).status.code(), Some(2));
    assert_eq!(tally(&["find", d, "--id", "nope"]).status.code(), Some(2));

    // verify --attribute-indexes compares every sidecar with its records, and names one
    // that differs.
    let o = tally(&["verify", d, "--attribute-indexes", "--json"]);
    assert!(o.status.success(), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["attribute_indexes"], sealed);
    let adx = dir.path().join("00000000000000000001.adx");
    let mut bytes = std::fs::read(&adx).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&adx, bytes).unwrap();
    let o = tally(&["verify", d, "--attribute-indexes", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["failure"]["file"].as_str().unwrap().ends_with(".adx"),
        "{v}"
    );
    // Without the option the records alone are verified.
    assert!(tally(&["verify", d]).status.success());
}

/// Reads a little-endian `u64` / `u32` at `at`.
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

#[test]
fn a_crc_valid_attribute_index_edit_that_hides_an_event_is_never_silent() {
    use tally_engine::index::attrs::{ATTR_ENTRY_LEN, ATTR_HEADER_LEN, value_hash};
    // Scenario: an attacker with write access edits one correlation entry of a sealed
    // segment's .adx so that it points at a neighbouring record of another correlation,
    // keeps the section sorted and rewrites the trailer CRC. `find` and a correlation
    // extract then return one event fewer: each must say that it relies on an index the
    // checkpoint does not cover, the extract must prove inclusion only, and
    // `verify --attribute-indexes` must name the file.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let log = Log::open(
        &dir,
        Options {
            segment_bytes: 64 << 10,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..1200u64 {
        let e = EventData::json(
            "AMEND",
            format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(64)),
        )
        .correlation_id(format!("deal-{}", i % 50));
        log.append(&format!("trade-{}", i % 7), ExpectedVersion::Any, &[e])
            .unwrap();
    }
    // A lookup writes the sealed segments' attribute sidecars (the background indexer may
    // not have reached segment 1 before the close: the edit below needs its file).
    log.wait_sealed().unwrap();
    log.find(&tally_engine::Query::all().limit(1)).unwrap();
    log.close().unwrap();
    let d = dir.to_str().unwrap();
    let found = |corr: &str| -> (Vec<u64>, String) {
        let o = tally(&["find", d, "--correlation", corr, "--format", "jsonl"]);
        (
            positions(&jsonl(&o)),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (honest, note) = found("deal-1");
    assert_eq!(
        honest,
        (0..1200).filter(|i| i % 50 == 1).collect::<Vec<_>>()
    );
    assert!(
        note.contains("not covered by the signed checkpoints"),
        "{note}"
    );

    // The edit: the last entry of deal-1's run in segment 1 now names the record after it.
    let adx = dir.join("00000000000000000001.adx");
    let mut b = std::fs::read(&adx).unwrap();
    let records = u64_at(&b, 48) as usize;
    let types = u32_at(&b, 96) as usize;
    let corrs = u32_at(&b, 100) as usize;
    let (causes, actors) = (u32_at(&b, 104) as usize, u32_at(&b, 108) as usize);
    let corr_at = ATTR_HEADER_LEN + records * 8 + types * ATTR_ENTRY_LEN;
    let ids_at = corr_at + (corrs + causes + actors) * ATTR_ENTRY_LEN;
    let h = value_hash("deal-1");
    let last = (0..corrs)
        .map(|k| corr_at + k * ATTR_ENTRY_LEN)
        .rfind(|&at| u64_at(&b, at) == h)
        .expect("deal-1 in segment 1");
    let target = u32_at(&b, last + 8) + 1;
    assert!((target as usize) < records);
    let offset = (0..records)
        .map(|k| ids_at + k * ATTR_ENTRY_LEN)
        .find(|&at| u32_at(&b, at + 8) == target)
        .map(|at| u32_at(&b, at + 12))
        .unwrap();
    b[last + 8..last + 12].copy_from_slice(&target.to_le_bytes());
    b[last + 12..last + 16].copy_from_slice(&offset.to_le_bytes());
    let n = b.len() - 4;
    let crc = crc32fast::hash(&b[..n]);
    b[n..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&adx, &b).unwrap();

    // find: one event fewer, and the note says why that is possible.
    let (edited, note) = found("deal-1");
    assert_eq!(edited.len(), honest.len() - 1, "{edited:?}");
    assert!(
        note.contains("one a damaged index leaves out is missing"),
        "{note}"
    );
    // A correlation extract says it proves inclusion only, and --require-complete refuses it.
    let pk = tmp.path().join("log.pub");
    std::fs::write(&pk, tally(&["pubkey", d]).stdout).unwrap();
    let x = tmp.path().join("corr.json");
    let o = tally(&[
        "extract",
        d,
        "--format",
        "2",
        "--correlation",
        "deal-1",
        "--out",
        x.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{o:?}");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&x).unwrap()).unwrap();
    assert_eq!(doc["events"].as_array().unwrap().len(), honest.len() - 1);
    assert_eq!(doc["completeness"]["kind"], "inclusion");
    let xs = x.to_str().unwrap();
    let pks = pk.to_str().unwrap();
    let o = tally(&["verify-extract", xs, "--pubkey", pks, "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["proof"], "inclusion", "{v}");
    let o = tally(&["verify-extract", xs, "--pubkey", pks, "--require-complete"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    // verify --attribute-indexes compares the sidecar with the records and names it.
    let o = tally(&["verify", d, "--attribute-indexes", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["failure"]["file"]
            .as_str()
            .unwrap()
            .ends_with("00000000000000000001.adx"),
        "{v}"
    );
}
