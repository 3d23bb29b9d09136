//! The same projection code through a server and embedded, sharing checkpoints.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Tallyd, runtime};
use tally_engine::projection::{Projection, Projector, ProjectorOptions};
use tally_engine::{EventData, EventView, ExpectedVersion};
use tally_server::client::Client;
use tally_server::projection::RemoteProjector;

/// Event count and payload bytes per stream prefix (before the first '-').
#[derive(Debug, Default, PartialEq, Eq)]
struct Volume(BTreeMap<String, (u64, u64)>);

impl Projection for Volume {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Volume {
        Volume::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let kind = e.stream().split('-').next().unwrap_or_default().to_owned();
        let v = self.0.entry(kind).or_default();
        v.0 += 1;
        v.1 += e.payload().len() as u64;
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        self.0
            .iter()
            .map(|(k, (n, b))| format!("{k} {n} {b}\n"))
            .collect::<String>()
            .into_bytes()
    }

    fn decode_state(bytes: &[u8]) -> Option<Volume> {
        let mut m = BTreeMap::new();
        for line in std::str::from_utf8(bytes).ok()?.lines() {
            let mut f = line.split(' ');
            let k = f.next()?.to_owned();
            m.insert(k, (f.next()?.parse().ok()?, f.next()?.parse().ok()?));
        }
        Some(Volume(m))
    }
}

#[test]
fn a_projection_runs_remote_and_embedded_and_resumes_from_either() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    let opts = ProjectorOptions {
        checkpoint_every: 25,
        ..ProjectorOptions::default()
    };
    let mut want: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    fn add(want: &mut BTreeMap<String, (u64, u64)>, kind: &str, n: usize) {
        let e = want.entry(kind.to_owned()).or_default();
        e.0 += n as u64;
        e.1 += 3 * n as u64;
    }
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        for i in 0..60 {
            let kind = if i % 3 == 0 { "order" } else { "trade" };
            c.append(
                &format!("{kind}-{i}"),
                ExpectedVersion::Any,
                vec![EventData::new("E", b"abc".to_vec())],
            )
            .await
            .unwrap();
        }
        add(&mut want, "order", 20);
        add(&mut want, "trade", 40);
        let mut p = RemoteProjector::<Volume>::open(&c, "volume", opts)
            .await
            .unwrap();
        let end = c.server_info().await.unwrap().next_position;
        p.run_until(end, Duration::from_secs(10)).await.unwrap();
        assert_eq!(p.shared_state().read().0, want);
        assert_eq!(p.status().events_applied, 60);
        assert_eq!(p.status().checkpoint, Some(p.status().position));
        // More events, and a new remote projector resumes from the checkpoint: only the
        // new ones are folded (the checkpoint events of `$projection-volume` are skipped).
        for i in 0..10 {
            c.append(
                &format!("order-x{i}"),
                ExpectedVersion::Any,
                vec![EventData::new("E", b"abc".to_vec())],
            )
            .await
            .unwrap();
        }
        let mut p = RemoteProjector::<Volume>::open(&c, "volume", opts)
            .await
            .unwrap();
        let end = c.server_info().await.unwrap().next_position;
        p.run_until(end, Duration::from_secs(10)).await.unwrap();
        assert_eq!(p.status().events_applied, 10);
    });
    add(&mut want, "order", 10);
    assert!(d.terminate().success());
    // The embedded projector resumes from the remote one's checkpoint.
    let log = tally_engine::Log::open(dir.path(), tally_engine::Options::default()).unwrap();
    let mut p = Projector::<Volume>::open(&log, "volume", opts).unwrap();
    assert_eq!(p.shared_state().read().0, want);
    assert_eq!(p.catch_up().unwrap(), 0, "nothing left to fold");
    log.append(
        "trade-late",
        ExpectedVersion::Any,
        &[EventData::new("E", b"abc".to_vec())],
    )
    .unwrap();
    assert_eq!(p.catch_up().unwrap(), 1);
    add(&mut want, "trade", 1);
    log.close().unwrap();
    // And the remote one resumes from the embedded one's.
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let mut p = RemoteProjector::<Volume>::open(&c, "volume", opts)
            .await
            .unwrap();
        assert_eq!(p.shared_state().read().0, want);
        let end = c.server_info().await.unwrap().next_position;
        p.run_until(end, Duration::from_millis(500)).await.unwrap();
        assert_eq!(p.status().events_applied, 0);
        assert_eq!(p.shared_state().read().0, want);
    });
}

/// `(quantity, unit)` of every `Qty` event, in order; refuses an event without a unit.
#[derive(Debug, Default, PartialEq, Eq)]
struct Units(Vec<(String, String)>);

impl Projection for Units {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Units {
        Units::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let v: serde_json::Value =
            serde_json::from_slice(e.payload()).map_err(|e| e.to_string())?;
        let q = v["qty"].as_str().ok_or("no qty")?;
        let u = v["unit"].as_str().ok_or("no unit")?;
        self.0.push((q.to_owned(), u.to_owned()));
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).unwrap()
    }

    fn decode_state(bytes: &[u8]) -> Option<Units> {
        serde_json::from_slice(bytes).ok().map(Units)
    }
}

#[test]
fn a_remote_projection_upcasts_rebuilds_and_reports_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    let opts = ProjectorOptions {
        checkpoint_every: 4,
        ..ProjectorOptions::default()
    };
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        c.register_schema(
            r#"{"event_type":"Qty","version":1,"validate":true,
                "fields":[{"name":"qty","kind":"decimal","required":true}]}"#,
        )
        .await
        .unwrap();
        let qty = |version: u32, body: String| {
            let mut e = EventData::json("Qty", body);
            e.schema_version = version;
            e
        };
        for i in 0..5 {
            c.append(
                "lot-a",
                ExpectedVersion::Any,
                vec![qty(1, format!(r#"{{"qty":"{i}"}}"#))],
            )
            .await
            .unwrap();
        }
        // Version 2 adds a unit, with a default for older events.
        c.register_schema(
            r#"{"event_type":"Qty","version":2,"validate":true,
                "fields":[{"name":"qty","kind":"decimal","required":true},
                          {"name":"unit","kind":"string","required":true,"default":"lots"}]}"#,
        )
        .await
        .unwrap();
        for i in 5..8 {
            c.append(
                "lot-b",
                ExpectedVersion::Any,
                vec![qty(2, format!(r#"{{"qty":"{i}","unit":"mwh"}}"#))],
            )
            .await
            .unwrap();
        }
        let end = c.server_info().await.unwrap().next_position;

        // Without the registry the handler meets version 1 payloads and refuses them: the
        // status says so, and the projection stays at the event.
        let mut p = RemoteProjector::<Units>::open(&c, "units", opts)
            .await
            .unwrap();
        let err = p.run_until(end, Duration::from_secs(10)).await.unwrap_err();
        assert!(err.to_string().contains("no unit"), "{err}");
        let s = p.status();
        assert_eq!(s.state, tally_engine::projection::ProjectionState::Failed);
        assert_eq!((s.errors, s.events_applied), (1, 0));
        assert_eq!(s.last_error.as_deref(), Some("no unit"));
        let first_qty = c
            .read_stream("lot-a", 0, 1, tally_engine::Direction::Forward)
            .await
            .unwrap()
            .0[0]
            .position
            .0;
        assert_eq!(s.position, first_qty);

        // With the server's registry every event arrives as version 2.
        let registry = tally_server::projection::load_registry(&c).await.unwrap();
        let mut p = RemoteProjector::<Units>::open(&c, "units", opts)
            .await
            .unwrap();
        p.set_registry(registry.clone());
        p.run_until(end, Duration::from_secs(10)).await.unwrap();
        let want: Vec<(String, String)> = (0..8)
            .map(|i| (i.to_string(), if i < 5 { "lots" } else { "mwh" }.to_owned()))
            .collect();
        assert_eq!(p.shared_state().read().0, want);

        // A rebuild reads everything again into a new state, swaps it in and checkpoints;
        // following events go on from there.
        p.rebuild().await.unwrap();
        assert_eq!(p.shared_state().read().0, want);
        let s = p.status();
        let at = c.server_info().await.unwrap().next_position;
        assert_eq!(s.checkpoint, Some(s.position));
        assert!(s.position <= at);
        c.append(
            "lot-b",
            ExpectedVersion::Any,
            vec![qty(2, r#"{"qty":"8","unit":"t"}"#.into())],
        )
        .await
        .unwrap();
        let end = c.server_info().await.unwrap().next_position;
        p.run_until(end, Duration::from_secs(10)).await.unwrap();
        assert_eq!(
            p.shared_state().read().0.last(),
            Some(&("8".to_owned(), "t".to_owned()))
        );
        assert_eq!(p.shared_state().read().0.len(), 9);
    });
    assert!(d.terminate().success());
}

/// The last payload of each stream: a state partitioned by stream, large on purpose.
#[derive(Debug, Default, PartialEq, Eq)]
struct Latest {
    values: BTreeMap<String, Vec<u8>>,
    changed: tally_engine::projection::ChangedKeys,
}

impl Projection for Latest {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Latest {
        Latest::default()
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        self.values
            .insert(e.stream().to_owned(), e.payload().to_vec());
        self.changed.mark(e.stream().as_bytes());
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        serde_json::to_vec(&self.values).unwrap()
    }

    fn decode_state(bytes: &[u8]) -> Option<Latest> {
        Some(Latest {
            values: serde_json::from_slice(bytes).ok()?,
            ..Latest::default()
        })
    }

    fn partitions(&self) -> Option<&dyn tally_engine::projection::Partitions> {
        Some(self)
    }

    fn partitions_mut(&mut self) -> Option<&mut dyn tally_engine::projection::Partitions> {
        Some(self)
    }
}

impl tally_engine::projection::Partitions for Latest {
    fn each_partition(
        &self,
        f: &mut tally_engine::projection::PartitionVisitor<'_>,
    ) -> std::io::Result<()> {
        for (k, v) in &self.values {
            f(k.as_bytes(), v)?;
        }
        Ok(())
    }

    fn encode_partition(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.values.get(std::str::from_utf8(key).ok()?).cloned()
    }

    fn load_partition(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let k = String::from_utf8(key.to_vec()).map_err(|e| e.to_string())?;
        match value {
            Some(v) => self.values.insert(k, v.to_vec()),
            None => self.values.remove(&k),
        };
        Ok(())
    }

    fn take_changed(&mut self) -> Vec<Vec<u8>> {
        self.changed.take()
    }
}

#[test]
fn a_remote_projection_of_fifty_mib_checkpoints_through_tallyd_and_resumes() {
    use tally_engine::state_store::{Kind, MANIFEST_EVENT_TYPE, Manifest};
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    let opts = ProjectorOptions {
        checkpoint_every: u64::MAX,
        ..ProjectorOptions::default()
    };
    let value = |i: u64| vec![(i % 251) as u8; 512 * 1024];
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        // 100 streams of 512 KiB each: a read model of 50 MiB, fifty times a frame's
        // payload limit.
        for i in 0..100 {
            c.append(
                &format!("doc-{i:03}"),
                ExpectedVersion::Any,
                vec![EventData::new("Put", value(i))],
            )
            .await
            .unwrap();
        }
        let mut p = RemoteProjector::<Latest>::open(&c, "latest", opts)
            .await
            .unwrap();
        let end = c.server_info().await.unwrap().next_position;
        p.run_until(end, Duration::from_secs(10)).await.unwrap();
        assert_eq!(p.status().checkpoint, Some(end));
        // Three documents change: the next checkpoint is a delta of those three.
        for i in [3, 50, 99] {
            c.append(
                &format!("doc-{i:03}"),
                ExpectedVersion::Any,
                vec![EventData::new("Put", value(i + 1))],
            )
            .await
            .unwrap();
        }
        let end = c.server_info().await.unwrap().next_position;
        p.run_until(end, Duration::from_secs(10)).await.unwrap();
        // The checkpoint stream, a page at a time (pages are bounded by the frame size).
        let mut manifests: Vec<Manifest> = Vec::new();
        let mut from = 0;
        loop {
            let (page, next, end) = c
                .read_stream(
                    "$projection-latest",
                    from,
                    1000,
                    tally_engine::Direction::Forward,
                )
                .await
                .unwrap();
            manifests.extend(
                page.iter()
                    .filter(|e| e.event_type() == MANIFEST_EVENT_TYPE)
                    .map(|e| Manifest::decode(e.payload()).unwrap()),
            );
            if end || page.is_empty() {
                break;
            }
            from = next;
        }
        assert_eq!(manifests.len(), 2);
        assert_eq!(manifests[0].kind, Kind::Full);
        assert!(manifests[0].content_bytes > 50 << 20);
        assert_eq!(manifests[0].parts.len(), 51);
        assert_eq!(manifests[1].kind, Kind::Delta);
        assert!(manifests[1].content_bytes < 2 << 20);
        // A new remote projector loads the full checkpoint and the delta through the
        // server, and holds the state the first one folded.
        let reopened = RemoteProjector::<Latest>::open(&c, "latest", opts)
            .await
            .unwrap();
        assert_eq!(reopened.status().checkpoint, Some(end));
        assert_eq!(
            reopened.shared_state().read().values,
            p.shared_state().read().values
        );
        assert_eq!(reopened.shared_state().read().values["doc-050"], value(51));
        // A manifest that does not decode is refused with the reason, and nothing is
        // written.
        let before = c.server_info().await.unwrap().next_position;
        let refused = c
            .call(&tally_server::protocol::Request::ProjectionAppend {
                name: "latest".into(),
                manifest: true,
                payload: b"not a manifest".to_vec(),
            })
            .await;
        let msg = match refused {
            Ok(tally_server::protocol::Response::Error(e)) => format!("{e:?}"),
            Err(e) => e.to_string(),
            Ok(other) => panic!("{other:?}"),
        };
        assert!(msg.contains("manifest does not decode"), "{msg}");
        assert_eq!(c.server_info().await.unwrap().next_position, before);
    });
    assert!(d.terminate().success());
}
