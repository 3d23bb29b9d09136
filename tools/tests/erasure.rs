//! Personal data through the `tally` binary: a key store made by `tally key-store init`;
//! `dump` opens sealed fields with it and shows markers without it (never ciphertext);
//! `forget` erases a subject (refused without a key store, and while a legal hold covers
//! its data); `verify` still passes; and an extract made after the erasure still verifies
//! offline, naming the sealed subjects and, in an extract of `$erasures`, the erasure.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::{Value, json};
use tally_engine::keys::{FileKeyStore, SecretKey};
use tally_engine::{EventData, ExpectedVersion, Log, Options, Personal};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env_remove("TALLY_KEY_STORE")
        .env_remove("TALLY_MASTER_KEY")
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

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_log(dir: &Path, keys: &Path, master: &Path) {
    let store = FileKeyStore::open(keys, &SecretKey::from_file(master).unwrap(), false).unwrap();
    let log = Log::open(
        dir,
        Options {
            keys: Some(Arc::new(store)),
            ..Options::default()
        },
    )
    .unwrap();
    for (n, client) in [(1, "client-42"), (2, "client-42"), (3, "client-7")] {
        log.append(
            &format!("trade-{n}"),
            ExpectedVersion::NoStream,
            &[EventData::json(
                "TradeConfirmed",
                json!({"trade_id": format!("T-{n}"), "client_name": format!("Name of {client}")})
                    .to_string(),
            )
            .correlation_id(format!("corr-{n}"))
            .personal(Personal::fields(client, ["client_name"]))],
        )
        .unwrap();
    }
    log.close().unwrap();
}

#[test]
fn dump_forget_verify_and_extracts_with_and_without_the_key_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let keys = tmp.path().join("keys");
    let master = tmp.path().join("master.key");
    let out = ok(&tally(&[
        "key-store",
        "init",
        s(&keys),
        "--master",
        s(&master),
    ]));
    assert!(out.contains("new master key"), "{out}");
    write_log(&dir, &keys, &master);
    let with_keys = |args: &[&str]| -> Output {
        let mut a = vec!["--key-store", s(&keys), "--master-key", s(&master)];
        a.extend_from_slice(args);
        tally(&a)
    };

    // With the key store, dump opens the fields; without it, markers, never ciphertext.
    let opened = lines(&ok(&with_keys(&["dump", s(&dir), "--output", "jsonl"])));
    assert_eq!(opened[0]["payload"]["client_name"], "Name of client-42");
    assert_eq!(opened[0]["sealed"]["state"], "opened");
    let closed = lines(&ok(&tally(&["dump", s(&dir), "--output", "jsonl"])));
    assert!(
        closed[0]["payload"]["client_name"]["$sealed"].is_object(),
        "{}",
        closed[0]
    );
    assert_eq!(closed[0]["payload"]["trade_id"], "T-1");
    assert_eq!(closed[0]["sealed"]["state"], "unavailable");

    // forget needs the key store; a hold on one of the subject's trades refuses it.
    let o = tally(&[
        "forget",
        "client-42",
        s(&dir),
        "--actor",
        "dpo",
        "--reason",
        "R-1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--key-store"));
    ok(&tally(&[
        "hold",
        "place",
        s(&dir),
        "--id",
        "case-3",
        "--correlation-id",
        "corr-2",
        "--actor",
        "legal",
        "--reason",
        "dispute",
    ]));
    let o = with_keys(&[
        "forget",
        "client-42",
        s(&dir),
        "--actor",
        "dpo",
        "--reason",
        "R-1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("case-3"), "{err}");
    ok(&tally(&[
        "hold",
        "release",
        s(&dir),
        "--id",
        "case-3",
        "--actor",
        "legal",
        "--reason",
        "settled",
    ]));
    let done = ok(&with_keys(&[
        "forget",
        "client-42",
        s(&dir),
        "--actor",
        "dpo",
        "--reason",
        "R-1",
        "--output",
        "json",
    ]));
    let done: Value = serde_json::from_str(&done).unwrap();
    assert_eq!(done["already_erased"], false);
    assert_eq!(done["signed"], true);
    let by = done["position"].as_u64().unwrap();

    let after = lines(&ok(&with_keys(&["dump", s(&dir), "--output", "jsonl"])));
    assert_eq!(after[0]["payload"]["client_name"]["$erased"]["by"], by);
    assert_eq!(after[1]["sealed"]["erased_by"], by);
    assert_eq!(after[2]["payload"]["client_name"], "Name of client-7");
    ok(&tally(&["verify", s(&dir)]));

    // Extracts made after the erasure verify offline and say what is sealed and erased.
    let pk = tmp.path().join("pub.key");
    std::fs::write(&pk, ok(&tally(&["pubkey", s(&dir)]))).unwrap();
    let x = tmp.path().join("trade-1.x");
    ok(&tally(&[
        "extract",
        s(&dir),
        "--stream",
        "trade-1",
        "--out",
        s(&x),
    ]));
    let events = tmp.path().join("events.jsonl");
    let v: Value = serde_json::from_str(&ok(&tally(&[
        "verify-extract",
        s(&x),
        "--pubkey",
        s(&pk),
        "--json",
        "--events",
        s(&events),
    ])))
    .unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["personal"]["sealed_events"], 1);
    let subject = tally_engine::format::sealed::subject_hash("client-42").to_hex();
    assert_eq!(v["personal"]["subjects"][&subject][0], "client_name");
    let ev = lines(&std::fs::read_to_string(&events).unwrap());
    assert!(
        ev[0]["payload"]["client_name"]["$sealed"].is_object(),
        "{}",
        ev[0]
    );
    assert_eq!(ev[0]["sealed"]["subject"], subject);
    let text = ok(&tally(&["verify-extract", s(&x), "--pubkey", s(&pk)]));
    assert!(
        text.contains("seal personal data of 1 data subjects"),
        "{text}"
    );
    let y = tmp.path().join("erasures.x");
    ok(&tally(&[
        "extract",
        s(&dir),
        "--stream",
        "$erasures",
        "--out",
        s(&y),
    ]));
    let v: Value = serde_json::from_str(&ok(&tally(&[
        "verify-extract",
        s(&y),
        "--pubkey",
        s(&pk),
        "--json",
    ])))
    .unwrap();
    assert_eq!(v["personal"]["erasures"][0]["subject"], subject);
    assert_eq!(v["personal"]["erasures"][0]["position"], by);

    // A second forget answers with the first.
    let again: Value = serde_json::from_str(&ok(&with_keys(&[
        "forget",
        "--hash",
        &subject,
        s(&dir),
        "--actor",
        "dpo",
        "--reason",
        "R-1",
        "--json",
    ])))
    .unwrap();
    assert_eq!(again["already_erased"], true);
    let info = ok(&tally(&[
        "key-store",
        "info",
        s(&keys),
        "--master",
        s(&master),
    ]));
    assert!(info.contains("2 subjects"), "{info}");
}
