//! The operator's tools and blobs (docs/FORMAT.md 6.5, OPERATIONS.md "Large payloads"):
//! `dump` shows each event's blob reference; `blob get` writes a blob checked against its
//! hash; `verify` reads every blob, names a changed or missing one (exit 1) and counts them
//! with `--skip-blobs`; `extract --blobs DIR` copies the blobs beside the extract and
//! `verify-extract --blobs DIR` checks them, catching one changed after the extract.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use serde_json::Value;
use tally_engine::cold::{ColdStore, DirStore};
use tally_engine::{ColdOptions, Durability, EventData, ExpectedVersion, Log, Options};

use common::{stdout, succeeded, success_json as json, tally};

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 10) as u8)
        .collect()
}

/// A log whose stream `trade-1` holds two blobs (one twice) and small events.
fn write_log(dir: &std::path::Path, store: &std::path::Path) -> Vec<Vec<u8>> {
    let s: Arc<dyn ColdStore> = Arc::new(DirStore::new(store).unwrap());
    let log = Log::open(
        dir,
        Options {
            durability: Durability::None,
            cold: ColdOptions {
                store: Some(s),
                ..ColdOptions::default()
            },
            ..Options::default()
        },
    )
    .unwrap();
    let docs = vec![bytes(150_000, 1), bytes(90_000, 2)];
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[
            EventData::json("TradeNew", "{\"qty\":\"1\"}"),
            EventData::new("TermSheetAttached", docs[0].clone()),
            EventData::new("ConfirmationAttached", docs[1].clone()),
            EventData::new("TermSheetAttached", docs[0].clone()),
        ],
    )
    .unwrap();
    log.append(
        "trade-2",
        ExpectedVersion::NoStream,
        &[EventData::json("TradeNew", "{\"qty\":\"2\"}")],
    )
    .unwrap();
    log.close().unwrap();
    docs
}

fn blob_file(store: &std::path::Path, hash: &str) -> std::path::PathBuf {
    let log_dir = std::fs::read_dir(store)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    log_dir.join("blobs").join(hash)
}

#[test]
fn every_tool_shows_checks_and_carries_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let docs = write_log(dir.path(), store.path());
    let d = dir.path().to_str().unwrap();

    // dump: the reference, no payload.
    let o = tally(&["dump", d, "--format", "jsonl"]);
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let hashes: Vec<String> = lines
        .iter()
        .filter_map(|v| {
            v.get("blob")
                .map(|b| b["hash"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(hashes.len(), 3);
    assert_eq!(lines[1]["payload_encoding"], "blob");
    assert_eq!(lines[1]["blob"]["size"], 150_000);
    assert_eq!(hashes[0], hashes[2]);
    assert_eq!(
        hashes[0],
        tally_engine::format::blob::BlobRef::of(&docs[0])
            .unwrap()
            .hex()
    );
    let table = stdout(&tally(&["dump", d]));
    assert!(
        table.contains(&format!("blob {} (150000 bytes)", hashes[0])),
        "{table}"
    );

    // blob get: the bytes, checked.
    let out = dir.path().join("sheet.bin");
    succeeded(&tally(&[
        "blob",
        "get",
        d,
        &hashes[1],
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), docs[1]);

    // verify reads each distinct blob once.
    let v = json(&tally(&["verify", d, "--json"]));
    assert_eq!(v["blobs"]["references"], 3);
    assert_eq!(v["blobs"]["checked"], 2);
    assert_eq!(v["format_version"], 5);

    // extract with the blobs beside it; verify-extract checks them.
    let ext = dir.path().join("trade-1.ext");
    let blobs = dir.path().join("ext-blobs");
    let o = tally(&[
        "extract",
        d,
        "--stream",
        "trade-1",
        "--out",
        ext.to_str().unwrap(),
        "--blobs",
        blobs.to_str().unwrap(),
    ]);
    succeeded(&o);
    assert!(
        stdout(&o).contains("3 events refer to blobs: 2 blobs written"),
        "{}",
        stdout(&o)
    );
    let key = dir.path().join("log.pub");
    std::fs::write(&key, stdout(&tally(&["pubkey", d]))).unwrap();
    let check = |with_blobs: bool| {
        let mut args = vec![
            "verify-extract",
            ext.to_str().unwrap(),
            "--pubkey",
            key.to_str().unwrap(),
        ];
        if with_blobs {
            args.extend(["--blobs", blobs.to_str().unwrap()]);
        }
        tally(&args)
    };
    succeeded(&check(true));
    let copied = blobs.join(&hashes[1]);
    let mut b = std::fs::read(&copied).unwrap();
    b[77] ^= 1;
    std::fs::write(&copied, &b).unwrap();
    let o = check(true);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains(&hashes[1]) && text.contains("do not match"),
        "{text}"
    );
    // Without --blobs, the extract's own proofs still hold (they cover the references).
    succeeded(&check(false));

    // A blob changed in the store: verify fails naming it and the event's position.
    let stored = blob_file(store.path(), &hashes[1]);
    let mut b = std::fs::read(&stored).unwrap();
    b[5] ^= 0x10;
    std::fs::write(&stored, &b).unwrap();
    let o = tally(&["verify", d]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(
        text.contains(&hashes[1]) && text.contains("position 2"),
        "{text}"
    );
    let o = tally(&["blob", "get", d, &hashes[1]]);
    assert_ne!(o.status.code(), Some(0));
    // --skip-blobs: the records verify, the references are counted.
    let v = json(&tally(&["verify", d, "--json", "--skip-blobs"]));
    assert_eq!(v["blobs"]["references"], 3);
    assert_eq!(v["blobs"]["checked"], 0);
    // Removed from the store: a finding too.
    std::fs::remove_file(&stored).unwrap();
    let o = tally(&["verify", d]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let o = tally(&["blob", "get", d, &hashes[1]]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no blob"));
}

/// `tally backup` of a log with blobs: by reference the copy reads them from the same store;
/// with `--cold copy` they are copied into the backup, which verifies (reading every blob)
/// with the original store gone.
#[test]
fn backup_takes_blobs_by_reference_or_by_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let docs = write_log(dir.path(), store.path());
    let d = dir.path().to_str().unwrap();
    let by_ref = dir.path().join("by-ref");
    let o = tally(&["backup", d, by_ref.to_str().unwrap()]);
    succeeded(&o);
    assert!(stdout(&o).contains("2 blobs referred to"), "{}", stdout(&o));
    let v = json(&tally(&["verify", by_ref.to_str().unwrap(), "--json"]));
    assert_eq!(v["blobs"]["checked"], 2);

    let copied = tempfile::tempdir().unwrap();
    let copy = copied.path().join("copy");
    let o = tally(&["backup", d, copy.to_str().unwrap(), "--cold", "copy"]);
    succeeded(&o);
    assert!(stdout(&o).contains("2 blobs copied"), "{}", stdout(&o));
    // The original store is gone: the copy has its own.
    drop(store);
    let c = copy.to_str().unwrap();
    let v = json(&tally(&["verify", c, "--json"]));
    assert_eq!(v["blobs"]["checked"], 2);
    let hash = tally_engine::format::blob::BlobRef::of(&docs[1])
        .unwrap()
        .hex();
    let out = copied.path().join("doc");
    succeeded(&tally(&[
        "blob",
        "get",
        c,
        &hash,
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), docs[1]);
    // And the by-reference copy, whose store went with the original, names the blob.
    let o = tally(&["verify", by_ref.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
}
