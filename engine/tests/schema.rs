//! The schema registry: versions kept in the log, compatibility, validation, upcasting.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use serde_json::json;
use tally_engine::projection::{Projection, Projector, ProjectorOptions};
use tally_engine::schema::{Field, FieldKind, Registry, Schema, SchemaError};
use tally_engine::{EventData, EventView, ExpectedVersion, Log, Options};

fn field(name: &str, kind: FieldKind, required: bool, default: Option<serde_json::Value>) -> Field {
    Field {
        name: name.into(),
        kind,
        required,
        default,
        personal: None,
    }
}

fn v1() -> Schema {
    Schema {
        event_type: "NEW".into(),
        version: 1,
        fields: vec![
            field("trade_id", FieldKind::String, true, None),
            field("qty", FieldKind::Decimal, true, None),
            field("px", FieldKind::Decimal, true, None),
            field("note", FieldKind::String, false, None),
        ],
        validate: true,
        subject_field: None,
    }
}

fn v2() -> Schema {
    let mut s = v1();
    s.version = 2;
    s.fields.retain(|f| f.name != "note");
    s.fields.push(field(
        "book",
        FieldKind::String,
        true,
        Some(json!("UNASSIGNED")),
    ));
    s
}

#[test]
fn versions_are_kept_in_the_log_and_breaking_changes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let mut r = Registry::load(&log).unwrap();
    r.register(&log, v1()).unwrap();
    r.register(&log, v2()).unwrap();
    // A kind change.
    let mut bad = v2();
    bad.version = 3;
    bad.fields[1].kind = FieldKind::Integer;
    match r.register(&log, bad) {
        Err(SchemaError::Breaking {
            reason, version: 3, ..
        }) => {
            assert_eq!(reason, "field \"qty\" changes kind from Decimal to Integer");
        }
        other => panic!("{other:?}"),
    }
    // A new required field without a default.
    let mut bad = v2();
    bad.version = 3;
    bad.fields
        .push(field("desk", FieldKind::String, true, None));
    assert!(matches!(
        r.register(&log, bad),
        Err(SchemaError::Breaking { .. })
    ));
    // A default that is not of its field's kind.
    let mut bad = v2();
    bad.version = 3;
    bad.fields
        .push(field("desk", FieldKind::String, true, Some(json!(5))));
    match r.register(&log, bad) {
        Err(SchemaError::Breaking { reason, .. }) => {
            assert_eq!(reason, "the default of \"desk\" is not a String");
        }
        other => panic!("{other:?}"),
    }
    // Not the next version.
    let mut skip = v2();
    skip.version = 5;
    assert!(matches!(
        r.register(&log, skip),
        Err(SchemaError::WrongVersion { expected: 3, .. })
    ));
    // A rename is allowed with an upcaster that does it.
    r.set_upcaster(
        "NEW",
        2,
        Arc::new(|mut v| {
            let o = v.as_object_mut().ok_or("not an object")?;
            let q = o.remove("qty").ok_or("no qty")?;
            o.insert("quantity".into(), q);
            Ok(v)
        }),
    );
    let mut v3 = v2();
    v3.version = 3;
    v3.fields[1].name = "quantity".into();
    r.register(&log, v3).unwrap();
    log.close().unwrap();
    // The registry's history is in the log.
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let again = Registry::load(&log).unwrap();
    assert_eq!(again.latest("NEW").map(|s| s.version), Some(3));
    assert_eq!(again.get("NEW", 1), Some(&v1()));
    // Without the rename's upcaster, this process refuses to lift version 2 payloads
    // rather than lose `qty`.
    let old = br#"{"trade_id":"T1","qty":"5","px":"1","book":"B"}"#;
    match again.upcast("NEW", 2, old) {
        Err(SchemaError::Upcast {
            from: 2, reason, ..
        }) => assert!(reason.contains("quantity"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // With it, the payload is lifted.
    let mut with = again.clone();
    with.set_upcaster(
        "NEW",
        2,
        Arc::new(|mut v| {
            let o = v.as_object_mut().ok_or("not an object")?;
            let q = o.remove("qty").ok_or("no qty")?;
            o.insert("quantity".into(), q);
            Ok(v)
        }),
    );
    let (version, lifted) = with.upcast("NEW", 2, old).unwrap();
    assert_eq!(version, 3);
    let lifted: serde_json::Value = serde_json::from_slice(&lifted).unwrap();
    assert_eq!(lifted["quantity"], "5");
}

#[test]
fn appends_are_checked_and_old_payloads_are_upcast_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let mut r = Registry::load(&log).unwrap();
    r.register(&log, v1()).unwrap();
    let ok = EventData::json(
        "NEW",
        r#"{"trade_id":"T1","qty":"10","px":"101","note":null}"#,
    );
    r.check(&ok).unwrap();
    for (payload, bad_field) in [
        (r#"{"trade_id":"T1","px":"1"}"#, "qty"),
        (r#"{"trade_id":"T1","qty":"10","px":101.5}"#, "px"),
        (r#"{"trade_id":7,"qty":"10","px":"1"}"#, "trade_id"),
        (r#"{"trade_id":"T1","qty":"1e5","px":"1"}"#, "qty"),
        (r#"{"trade_id":"T1","qty":10,"px":"1"}"#, "qty"),
        (
            r#"{"trade_id":"T1","qty":"12345678901234567890123456789","px":"1"}"#,
            "qty",
        ),
        (r#"[1,2]"#, ""),
    ] {
        match r.check(&EventData::json("NEW", payload)) {
            Err(SchemaError::Invalid { field, .. }) => assert_eq!(field, bad_field, "{payload}"),
            other => panic!("{payload}: {other:?}"),
        }
    }
    // Version 1 events are written, then the schema moves on.
    for i in 0..3 {
        let e = EventData::json(
            "NEW",
            format!(r#"{{"trade_id":"T{i}","qty":"{i}","px":"1","note":"n"}}"#),
        );
        r.check(&e).unwrap();
        log.append(&format!("trade-{i}"), ExpectedVersion::NoStream, &[e])
            .unwrap();
    }
    r.register(&log, v2()).unwrap();
    let v2_event = EventData::json(
        "NEW",
        r#"{"trade_id":"T9","qty":"9","px":"1","book":"OIL"}"#,
    )
    .schema_version(2);
    r.check(&v2_event).unwrap();
    log.append("trade-9", ExpectedVersion::NoStream, &[v2_event])
        .unwrap();
    // A projection that knows only version 2 sees every event as version 2.
    #[derive(Default)]
    struct Books(Vec<(u32, String)>);
    impl Projection for Books {
        const STATE_VERSION: u32 = 1;
        fn initial() -> Books {
            Books::default()
        }
        fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
            let v: serde_json::Value =
                serde_json::from_slice(e.payload()).map_err(|e| e.to_string())?;
            if v.get("note").is_some() {
                return Err("saw a field version 2 dropped".into());
            }
            let book = v["book"].as_str().ok_or("no book")?.to_owned();
            self.0.push((e.schema_version(), book));
            Ok(())
        }
        fn encode_state(&self) -> Vec<u8> {
            Vec::new()
        }
        fn decode_state(_: &[u8]) -> Option<Books> {
            None
        }
    }
    let mut p = Projector::<Books>::open(&log, "books", ProjectorOptions::default()).unwrap();
    p.set_registry(Registry::load(&log).unwrap());
    p.catch_up().unwrap();
    let state = p.shared_state();
    let seen = &state.read().0;
    assert_eq!(
        seen.iter()
            .map(|(v, b)| (*v, b.as_str()))
            .collect::<Vec<_>>(),
        [
            (2, "UNASSIGNED"),
            (2, "UNASSIGNED"),
            (2, "UNASSIGNED"),
            (2, "OIL")
        ]
    );
    // The bytes on disk are unchanged.
    let first = log
        .read_stream("trade-0", 0, 1, tally_engine::Direction::Forward)
        .unwrap();
    assert_eq!(first[0].schema_version, 1);
    assert!(
        std::str::from_utf8(first[0].payload())
            .unwrap()
            .contains("\"note\"")
    );
}

#[test]
fn a_repository_with_a_registry_checks_saves_and_upcasts_loads() {
    use tally_engine::aggregate::{Aggregate, AggregateError, Repository, SnapshotPolicy};
    /// The books a trade stream has been seen in, newest schema only.
    struct Seen(Vec<String>);
    impl Aggregate for Seen {
        const SNAPSHOT_VERSION: u32 = 1;
        fn initial() -> Seen {
            Seen(Vec::new())
        }
        fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
            let v: serde_json::Value =
                serde_json::from_slice(e.payload()).map_err(|e| e.to_string())?;
            self.0
                .push(v["book"].as_str().ok_or("no book: not upcast")?.to_owned());
            Ok(())
        }
        fn encode_snapshot(&self) -> Vec<u8> {
            self.0.join(",").into_bytes()
        }
        fn decode_snapshot(b: &[u8]) -> Option<Seen> {
            Some(Seen(
                std::str::from_utf8(b)
                    .ok()?
                    .split(',')
                    .map(str::to_owned)
                    .collect(),
            ))
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let mut r = Registry::load(&log).unwrap();
    r.register(&log, v1()).unwrap();
    // A version 1 event, written before version 2 existed.
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[EventData::json(
            "NEW",
            r#"{"trade_id":"1","qty":"1","px":"2"}"#,
        )],
    )
    .unwrap();
    r.register(&log, v2()).unwrap();
    let repo = Repository::<Seen>::new(&log, SnapshotPolicy::OnDemand).with_registry(r);
    let mut a = repo.load("trade-1").unwrap();
    assert_eq!(a.state.0, ["UNASSIGNED"]);
    // An invalid version 2 event is refused and nothing is written.
    let bad = EventData::json("NEW", r#"{"trade_id":"1","qty":"x","px":"2","book":"B"}"#)
        .schema_version(2);
    match repo.save("trade-1", &mut a, &[bad]) {
        Err(AggregateError::Schema(SchemaError::Invalid { field, .. })) => assert_eq!(field, "qty"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert_eq!(log.stream_info("trade-1").unwrap().unwrap().last_version, 0);
    let good = EventData::json("NEW", r#"{"trade_id":"1","qty":"3","px":"2","book":"B"}"#)
        .schema_version(2);
    repo.save("trade-1", &mut a, &[good]).unwrap();
    assert_eq!(repo.load("trade-1").unwrap().state.0, ["UNASSIGNED", "B"]);
}

/// A version 1 payload read as version 3 goes through both steps in order: the generic
/// step 1 -> 2 (drops `note`, fills `book`) and the registered rename 2 -> 3 (`qty` to
/// `quantity`); a version 2 payload goes through the second step only; a version 3 payload
/// is left alone; and the bytes on disk are never rewritten.
#[test]
fn an_upcaster_chain_lifts_every_old_version_to_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let rename = || -> tally_engine::schema::Upcaster {
        Arc::new(|mut v| {
            let o = v.as_object_mut().ok_or("not an object")?;
            let q = o.remove("qty").ok_or("no qty")?;
            o.insert("quantity".into(), q);
            Ok(v)
        })
    };
    let mut r = Registry::load(&log).unwrap();
    r.register(&log, v1()).unwrap();
    r.register(&log, v2()).unwrap();
    r.set_upcaster("NEW", 2, rename());
    let mut v3 = v2();
    v3.version = 3;
    v3.fields[1].name = "quantity".into();
    r.register(&log, v3).unwrap();

    let old1 = br#"{"trade_id":"T1","qty":"5","px":"1.5","note":"phone"}"#;
    let old2 = br#"{"trade_id":"T2","qty":"6","px":"2","book":"B7"}"#;
    let new3 = br#"{"trade_id":"T3","quantity":"7","px":"3","book":"B8"}"#;
    let lift = |version, payload: &[u8]| {
        let (v, bytes) = r.upcast("NEW", version, payload).unwrap();
        (
            v,
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
        )
    };
    assert_eq!(
        lift(1, old1),
        (
            3,
            json!({"trade_id": "T1", "quantity": "5", "px": "1.5", "book": "UNASSIGNED"})
        )
    );
    assert_eq!(
        lift(2, old2),
        (
            3,
            json!({"trade_id": "T2", "quantity": "6", "px": "2", "book": "B7"})
        )
    );
    assert_eq!(
        lift(3, new3),
        (
            3,
            serde_json::from_slice::<serde_json::Value>(new3).unwrap()
        )
    );

    // Through a projection: it sees only version 3, whatever was written.
    for (i, (version, payload)) in [(1, &old1[..]), (2, &old2[..]), (3, &new3[..])]
        .into_iter()
        .enumerate()
    {
        let e = EventData::new("NEW", payload.to_vec())
            .schema_version(version)
            .aggregate_type("Trade");
        let e = EventData {
            content_type: tally_engine::ContentType::Json,
            ..e
        };
        log.append(&format!("trade-{i}"), ExpectedVersion::NoStream, &[e])
            .unwrap();
    }
    #[derive(Default)]
    struct Quantities(Vec<(u32, String)>);
    impl Projection for Quantities {
        const STATE_VERSION: u32 = 1;
        fn initial() -> Quantities {
            Quantities::default()
        }
        fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
            let v: serde_json::Value =
                serde_json::from_slice(e.payload()).map_err(|e| e.to_string())?;
            let q = v["quantity"].as_str().ok_or("no quantity")?;
            self.0.push((e.schema_version(), q.to_owned()));
            Ok(())
        }
        fn encode_state(&self) -> Vec<u8> {
            Vec::new()
        }
        fn decode_state(_: &[u8]) -> Option<Quantities> {
            None
        }
    }
    let mut p = Projector::<Quantities>::open(&log, "qty", ProjectorOptions::default()).unwrap();
    p.set_registry(r.clone());
    p.catch_up().unwrap();
    let seen = p.shared_state().read().0.clone();
    assert_eq!(
        seen,
        [
            (3, "5".to_owned()),
            (3, "6".to_owned()),
            (3, "7".to_owned())
        ]
    );
    // Windows, time travel and replay traces see the same, given the registry; without
    // it the version 1 and 2 payloads have no `quantity`.
    impl tally_engine::replay::Traced for Quantities {
        fn key_of(e: &dyn EventView) -> Option<String> {
            Some(e.stream().to_owned())
        }
        fn encode_part(&self, key: &str) -> Vec<u8> {
            format!("{key}:{:?}", self.0).into_bytes()
        }
    }
    let end = log.next_position().0;
    let w: Quantities =
        tally_engine::projection::fold_window_with(&log, "qty", 0, end, Some(&r)).unwrap();
    assert_eq!(w.0, seen);
    assert!(tally_engine::projection::fold_window::<Quantities>(&log, "qty", 0, end).is_err());
    let now = tally_engine::now();
    for as_of in [
        tally_engine::aggregate::AsOf::known_at(now),
        tally_engine::aggregate::AsOf::true_at(now),
    ] {
        let a: Quantities =
            tally_engine::projection::fold_as_of_with(&log, "qty", as_of, Some(&r)).unwrap();
        assert_eq!(a.0, seen);
    }
    let (t, trace) =
        tally_engine::replay::trace_with::<Quantities>(&log, "qty", end, Some(&r)).unwrap();
    assert_eq!(t.0, seen);
    assert_eq!(trace.steps.len(), 3);
    assert!(tally_engine::replay::trace::<Quantities>(&log, "qty", end).is_err());

    // The stored bytes are the ones written.
    let stored = log
        .read_stream("trade-0", 0, 1, tally_engine::Direction::Forward)
        .unwrap();
    assert_eq!(stored[0].payload(), old1);
    assert_eq!(stored[0].schema_version(), 1);
}

#[test]
fn a_schema_no_payload_or_event_could_meet_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), Options::default()).unwrap();
    let mut r = Registry::load(&log).unwrap();
    // Two required fields of one name and different kinds: every payload would fail one.
    let mut twice = v1();
    twice
        .fields
        .push(field("qty", FieldKind::Integer, true, None));
    // An event type no event can carry.
    let mut untyped = v1();
    untyped.event_type = String::new();
    let mut long = v1();
    long.event_type = "T".repeat(129);
    for (schema, why) in [
        (twice, "field \"qty\" is named twice"),
        (untyped, "event_type"),
        (long, "event_type"),
    ] {
        match r.register(&log, schema) {
            Err(e @ SchemaError::Malformed { .. }) => {
                assert!(e.to_string().contains(why), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(log.next_position().0, 0, "nothing was registered");
    r.register(&log, v1()).unwrap();
}
