//! Personal data through tallyd: the schema registry marks a confirmation's client fields
//! sealed and its account tokenised; tallyd (configured with a key store and a master key)
//! seals them at append, reads return them, GOVERN `forget` erases them (refused with
//! `ErasureHeld` while a legal hold covers the trade), and after a restart reads still show
//! the markers.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Tallyd, runtime};
use serde_json::{Value, json};
use tally_engine::{Direction, EventData, ExpectedVersion};
use tally_server::client::{Client, ClientError};
use tally_server::protocol::{ErrorCode, Filter};

const SCHEMA: &str = r#"{"event_type":"TradeConfirmed","version":1,"validate":true,
  "subject_field":"client_id",
  "fields":[
    {"name":"trade_id","kind":"string","required":true},
    {"name":"client_id","kind":"string","required":true},
    {"name":"client_name","kind":"string","required":true,"personal":"sealed"},
    {"name":"client_email","kind":"string","required":false,"personal":"sealed"},
    {"name":"account","kind":"string","required":false,"personal":"token"}]}"#;

fn confirmation(trade: u32, client: &str) -> EventData {
    EventData::json(
        "TradeConfirmed",
        json!({
            "trade_id": format!("T-{trade}"),
            "client_id": client,
            "client_name": format!("Name of {client}"),
            "client_email": format!("{client}@example.com"),
            "account": format!("ACC-{client}"),
        })
        .to_string(),
    )
    .aggregate_type("Trade")
    .correlation_id(format!("corr-{trade}"))
}

fn code(r: Result<String, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Server { code, message }) => (code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn payload(c: &Client, stream: &str) -> Value {
    let (events, _, _) = c
        .read_stream(stream, 0, 10, Direction::Forward)
        .await
        .unwrap();
    serde_json::from_slice(events[0].payload()).unwrap()
}

/// The payloads of the trades, by READ_ALL forward.
async fn read_all_payloads(c: &Client) -> Vec<Value> {
    let filter = Filter {
        stream_prefix: "trade-".into(),
        event_types: Vec::new(),
    };
    let (events, _, _) = c
        .read_all(0, 100, Direction::Forward, &filter)
        .await
        .unwrap();
    events
        .iter()
        .map(|e| serde_json::from_slice(e.payload()).unwrap())
        .collect()
}

#[test]
fn tallyd_seals_by_schema_forgets_on_request_and_refuses_under_a_hold() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let keys = dir.path().join("keys");
    let master = dir.path().join("master.key");
    tally_engine::keys::SecretKey::create_file(&master).unwrap();
    let cfg = dir.path().join("tallyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "governance_changes = true\nkey_store = {:?}\nmaster_key = {:?}\n",
            keys.display().to_string(),
            master.display().to_string()
        ),
    )
    .unwrap();
    let args = ["--config", cfg.to_str().unwrap()];
    let d = Tallyd::start(&data, &args);
    let position = runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        c.register_schema(SCHEMA).await.unwrap();
        c.append("trade-1", ExpectedVersion::NoStream, vec![confirmation(1, "client-42")])
            .await
            .unwrap();
        c.append("trade-2", ExpectedVersion::NoStream, vec![confirmation(2, "client-42")])
            .await
            .unwrap();
        let p = payload(&c, "trade-1").await;
        assert_eq!(p["client_name"], "Name of client-42");
        assert!(p["account"].as_str().unwrap().starts_with("tok_"), "{p}");
        // A forward read of the log sends them opened too (it reads records raw).
        let all = read_all_payloads(&c).await;
        assert_eq!(all[0]["client_email"], "client-42@example.com", "{all:?}");
        // A payload without its subject is refused by the schema.
        let err = c
            .append(
                "trade-3",
                ExpectedVersion::Any,
                vec![EventData::json(
                    "TradeConfirmed",
                    r#"{"trade_id":"T-3","client_name":"x"}"#,
                )],
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("client_id"), "{err}");
        // A hold on one of the client's trades refuses the erasure, naming the hold.
        c.govern(
            &json!({"op": "hold_place", "actor": "legal",
                "hold": {"id": "case-9", "scope": {"correlation_id": "corr-2"}, "reason": "dispute"}})
            .to_string(),
        )
        .await
        .unwrap();
        let forget = json!({"op": "forget", "subject": "client-42", "actor": "dpo", "reason": "GDPR R-1"})
            .to_string();
        let (code_, msg) = code(c.govern(&forget).await);
        assert_eq!(code_, ErrorCode::ErasureHeld.as_u16(), "{msg}");
        assert!(msg.contains("case-9"), "{msg}");
        assert_eq!(payload(&c, "trade-2").await["client_name"], "Name of client-42");
        c.govern(
            &json!({"op": "hold_release", "id": "case-9", "actor": "legal", "reason": "settled"})
                .to_string(),
        )
        .await
        .unwrap();
        let done: Value = serde_json::from_str(&c.govern(&forget).await.unwrap()).unwrap();
        assert_eq!(done["signed"], true);
        let position = done["position"].as_u64().unwrap();
        let all = read_all_payloads(&c).await;
        assert_eq!(all[1]["client_email"]["$erased"]["by"], position, "{all:?}");
        for stream in ["trade-1", "trade-2"] {
            let p = payload(&c, stream).await;
            assert_eq!(p["client_name"]["$erased"]["by"], position, "{p}");
            assert_eq!(p["trade_id"].as_str().unwrap().len(), 3);
        }
        position
    });
    drop(d);
    let d = Tallyd::start(&data, &args);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let p = payload(&c, "trade-1").await;
        assert_eq!(p["client_email"]["$erased"]["by"], position, "{p}");
        // A retry answers with the first erasure.
        let again: Value = serde_json::from_str(
            &c.govern(
                &json!({"op": "forget", "subject": "client-42", "actor": "dpo", "reason": "again"})
                    .to_string(),
            )
            .await
            .unwrap(),
        )
        .unwrap();
        assert_eq!(again["already_erased"], true);
        assert_eq!(again["position"], position);
    });
}

#[test]
fn a_key_store_needs_its_master_key_and_must_not_be_inside_the_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("tallyd.toml");
    std::fs::write(
        &cfg,
        format!(
            "key_store = {:?}\n",
            dir.path().join("k").display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "--data",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("go together"));
    let master = dir.path().join("master.key");
    tally_engine::keys::SecretKey::create_file(&master).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "key_store = {:?}\nmaster_key = {:?}\n",
            data.join("keys").display().to_string(),
            master.display().to_string()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "--data",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("inside the log's directory"), "{err}");
}
