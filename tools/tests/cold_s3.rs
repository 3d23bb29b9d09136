//! The cold tier on a real S3-compatible server (moto's, on 127.0.0.1, started by
//! `scripts/s3-test-server`, which `.ci/run` runs): `tally compact --store s3://...` moves
//! segments through the `object_store` S3 client, and `dump`, `verify`, `inspect` and
//! `backup --cold copy` read them back through it; an object deleted from the bucket makes
//! `verify` fail naming it, while the newest (local) events still read.
//!
//! Without `TALLY_S3_ENDPOINT` the test prints `SKIPPED` with its name and returns (it cannot
//! pass silently); with `TALLY_REQUIRE_S3` set, as `.ci/run` sets it, a missing endpoint
//! fails it.

#![allow(clippy::unwrap_used)]

mod common;

use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options};

use common::{stdout, succeeded, success_json as json, tally};

/// The bucket URL to use, or `None` (after saying so) when no S3 server is configured.
fn s3_prefix(test: &str) -> Option<String> {
    match (
        std::env::var("TALLY_S3_ENDPOINT"),
        std::env::var("TALLY_S3_BUCKET"),
    ) {
        (Ok(_), Ok(bucket)) => Some(format!(
            "s3://{bucket}/{test}-{}-{}",
            std::process::id(),
            tally_engine::now().0
        )),
        _ if std::env::var_os("TALLY_REQUIRE_S3").is_some() => {
            panic!("{test}: TALLY_REQUIRE_S3 is set but no S3 server is configured")
        }
        _ => {
            // Straight to the process's stderr, past the test harness's capture, so that a
            // skip is seen in every run.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: no S3 server (scripts/test starts one)"
            );
            None
        }
    }
}

#[test]
fn segments_compacted_to_s3_read_back_through_every_tool() {
    let Some(url) = s3_prefix("segments_compacted_to_s3_read_back_through_every_tool") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(
            dir.path(),
            Options {
                segment_bytes: 64 << 10,
                durability: Durability::None,
                ..Options::default()
            },
        )
        .unwrap();
        for b in 0..150u64 {
            let events: Vec<EventData> = (0..10)
                .map(|i| EventData::json("TradeAmended", format!("{{\"trade\":{b},\"leg\":{i}}}")))
                .collect();
            log.append(&format!("trade-{}", b % 3), ExpectedVersion::Any, &events)
                .unwrap();
        }
        log.wait_sealed().unwrap();
        log.close().unwrap();
    }
    let d = dir.path().to_str().unwrap();
    let dump = stdout(&tally(&["dump", d]));
    let done = json(&tally(&[
        "compact",
        d,
        "--store",
        &url,
        "--json",
        "--keep-local-segments",
        "1",
    ]));
    let moved = done["moved"].as_array().unwrap().len();
    assert!(moved >= 2, "{done}");
    assert_eq!(done["store"], url.as_str());
    // Every tool reads through the bucket (DIR/cold.store names it).
    assert_eq!(stdout(&tally(&["dump", d])), dump);
    let v = tally(&["verify", d]);
    succeeded(&v);
    let inspect = json(&tally(&["inspect", d, "--json"]));
    let cold = inspect["segments"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "cold" && s["object"].as_str().unwrap().starts_with(&url))
        .count();
    assert_eq!(cold, moved);
    let copy = dir.path().join("backup");
    let o = tally(&["backup", d, copy.to_str().unwrap(), "--cold", "copy"]);
    succeeded(&o);

    // An object deleted from the bucket: verify fails and names it.
    let store = tally_server_store(&url);
    let log_id = json(&tally(&["inspect", d, "--json"]))["log_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = format!("{log_id}/00000000000000000000.cold");
    store.delete(&key).unwrap();
    let v = tally(&["verify", d]);
    assert_ne!(v.status.code(), Some(0));
    let text = format!("{}{}", stdout(&v), String::from_utf8_lossy(&v.stderr));
    assert!(
        text.contains("cold segment 0") && text.contains(&key),
        "{text}"
    );
    // The backup made with --cold copy does not need the bucket.
    assert_eq!(stdout(&tally(&["dump", copy.to_str().unwrap()])), dump);
}

fn tally_server_store(url: &str) -> std::sync::Arc<dyn tally_engine::cold::ColdStore> {
    tally_server::cold_store::open_store(url).unwrap()
}

/// Blobs on S3: an append stores a large payload through the S3 client, an upload shared
/// with its request (`put_blob_shared`, what tallyd does) stores another without a copy;
/// both read back checked, `tally verify` reads them through the store named in
/// `cold.store`, and a blob deleted from the bucket is a finding naming it.
#[test]
fn blobs_on_s3_are_stored_read_back_and_verified() {
    let Some(url) = s3_prefix("blobs_on_s3_are_stored_read_back_and_verified") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let store = tally_server::cold_store::open_store(&url).unwrap();
    let sheet: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let big = std::sync::Arc::new(
        (0..(3u32 << 20))
            .map(|i| (i % 241) as u8)
            .collect::<Vec<u8>>(),
    );
    let (a, b) = {
        let log = Log::open(
            dir.path(),
            Options {
                durability: Durability::None,
                cold: tally_engine::ColdOptions {
                    store: Some(std::sync::Arc::clone(&store)),
                    ..tally_engine::ColdOptions::default()
                },
                ..Options::default()
            },
        )
        .unwrap();
        let b = log.put_blob_shared(&big).unwrap();
        log.append(
            "trade-1",
            ExpectedVersion::NoStream,
            &[
                EventData::new("TermSheetAttached", sheet.clone()),
                EventData::with_blob("ConfirmationAttached", tally_engine::ContentType::Binary, b),
            ],
        )
        .unwrap();
        let events = log
            .read_stream("trade-1", 0, 2, tally_engine::Direction::Forward)
            .unwrap();
        let a = events[0].blob().unwrap();
        assert_eq!(log.read_blob(&a).unwrap(), sheet);
        assert_eq!(events[1].blob(), Some(b));
        assert_eq!(&log.read_blob(&b).unwrap(), &*big);
        log.close().unwrap();
        (a, b)
    };
    let d = dir.path().to_str().unwrap();
    let v = json(&tally(&["verify", d, "--json"]));
    assert_eq!(v["blobs"]["checked"], 2);
    let out = dir.path().join("sheet");
    succeeded(&tally(&[
        "blob",
        "get",
        d,
        &a.hex(),
        "--out",
        out.to_str().unwrap(),
    ]));
    assert_eq!(std::fs::read(&out).unwrap(), sheet);
    let log_id = {
        let meta = std::fs::read(dir.path().join("tally.meta")).unwrap();
        let id: [u8; 16] = meta[16..32].try_into().unwrap();
        id
    };
    store
        .delete(&tally_engine::format::files::blob_object_key(
            &log_id, &b.hash,
        ))
        .unwrap();
    let o = tally(&["verify", d]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let text = format!("{}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    assert!(text.contains(&b.hex()), "{text}");
}
