//! Integration tests against the real `tallyd` binary.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Tallyd, runtime, small_segments_config};
use tally_engine::{ContentType, Direction, EventData, EventId, ExpectedVersion, Timestamp};
use tally_server::client::{Client, ClientError, ClientOptions, SubscriptionItem};
use tally_server::protocol::{
    self, ErrorCode, Filter, PROTOCOL_VERSION, Request, Response, SubscribeFrom, SubscribeTarget,
    op,
};

fn payload(i: u64) -> String {
    format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(200))
}

#[test]
fn append_and_read_round_trip_the_full_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        c.ping().await.unwrap();
        let id = EventId([42; 16]);
        let ev = EventData::json("TradeNew", r#"{"qty":"100"}"#)
            .with_id(id)
            .aggregate_type("Trade")
            .schema_version(2)
            .correlation_id("corr-1")
            .causation_id("cause-1")
            .actor("alice")
            .event_time(Timestamp(1_700_000_000_123_456_789));
        let r = c
            .append("trade-1", ExpectedVersion::NoStream, vec![ev.clone()])
            .await
            .unwrap();
        assert_eq!((r.first_version, r.last_version), (0, 0));
        let amend = EventData::new("TradeAmended", vec![0, 1, 2, 255]);
        let r2 = c
            .append("trade-1", ExpectedVersion::Exact(0), vec![amend])
            .await
            .unwrap();
        assert_eq!(r2.last_version, 1);
        assert_eq!(r2.first_position.0, r.last_position.0 + 1);

        let (events, next, end) = c
            .read_stream("trade-1", 0, 100, Direction::Forward)
            .await
            .unwrap();
        assert_eq!((events.len(), next, end), (2, 2, true));
        let e = &events[0];
        assert_eq!(e.event_id, id);
        assert_eq!(e.event_type(), "TradeNew");
        assert_eq!(e.aggregate_type(), "Trade");
        assert_eq!(e.schema_version, 2);
        assert_eq!(e.content_type, ContentType::Json);
        assert_eq!(e.correlation_id(), "corr-1");
        assert_eq!(e.causation_id(), "cause-1");
        assert_eq!(e.actor(), "alice");
        assert_eq!(e.event_time, Timestamp(1_700_000_000_123_456_789));
        assert!(e.record_time.as_nanos() > 0);
        assert_eq!(e.payload(), br#"{"qty":"100"}"#);
        assert_eq!(events[1].payload(), &[0, 1, 2, 255]);
        assert_eq!(events[1].version, 1);

        // Backward from the newest.
        let (back, next, end) = c
            .read_stream("trade-1", u64::MAX, 1, Direction::Backward)
            .await
            .unwrap();
        assert_eq!(back[0].version, 1);
        assert_eq!((next, end), (0, false));

        // Multi-stream append, then read all with filters.
        let rs = c
            .append_multi(vec![
                (
                    "trade-2".into(),
                    ExpectedVersion::NoStream,
                    vec![EventData::new("TradeNew", b"a".to_vec())],
                ),
                (
                    "order-9".into(),
                    ExpectedVersion::Any,
                    vec![EventData::new("OrderPlaced", b"b".to_vec())],
                ),
            ])
            .await
            .unwrap();
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[1].first_position.0, rs[0].last_position.0 + 1);
        let all = Filter::default();
        let (events, next, end) = c.read_all(0, 100, Direction::Forward, &all).await.unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!((next, end), (4, true));
        let trades = Filter {
            stream_prefix: "trade-".into(),
            event_types: vec![],
        };
        let (events, _, _) = c
            .read_all(0, 100, Direction::Forward, &trades)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.stream()).collect::<Vec<_>>(),
            ["trade-1", "trade-1", "trade-2"]
        );
        let news = Filter {
            stream_prefix: String::new(),
            event_types: vec!["TradeNew".into()],
        };
        let (events, _, _) = c
            .read_all(u64::MAX, 100, Direction::Backward, &news)
            .await
            .unwrap();
        assert_eq!(
            events.iter().map(|e| e.position.0).collect::<Vec<_>>(),
            [2, 0]
        );

        let info = c.stream_info("trade-1").await.unwrap().unwrap();
        assert_eq!(
            (
                info.last_version,
                info.first_position.0,
                info.last_position.0
            ),
            (1, 0, 1)
        );
        assert!(c.stream_info("nope").await.unwrap().is_none());
        let si = c.server_info().await.unwrap();
        assert_eq!(si.next_position, 4);
        assert_eq!(si.protocol_version, PROTOCOL_VERSION);

        // Retrying an append with the same ids writes nothing new.
        let again = c
            .append("trade-1", ExpectedVersion::NoStream, vec![ev])
            .await
            .unwrap();
        assert_eq!(again, r);

        // Reserved streams.
        let e = c
            .append(
                "$consumer-x",
                ExpectedVersion::Any,
                vec![EventData::new("X", vec![])],
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ReservedStream), "{e}");
    });
}

#[test]
fn expected_version_conflicts_across_two_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let a = Client::connect(&d.addr).await.unwrap();
        let b = Client::connect(&d.addr).await.unwrap();
        a.append(
            "acct-1",
            ExpectedVersion::NoStream,
            vec![EventData::new("Opened", vec![])],
        )
        .await
        .unwrap();
        // Both read version 0 and both try to write version 1: exactly one wins.
        let (ra, rb) = tokio::join!(
            a.append(
                "acct-1",
                ExpectedVersion::Exact(0),
                vec![EventData::new("A", vec![])]
            ),
            b.append(
                "acct-1",
                ExpectedVersion::Exact(0),
                vec![EventData::new("B", vec![])]
            ),
        );
        let (ok, err) = match (ra, rb) {
            (Ok(o), Err(e)) | (Err(e), Ok(o)) => (o, e),
            other => panic!("exactly one append must win: {other:?}"),
        };
        assert_eq!(ok.last_version, 1);
        match err {
            ClientError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => {
                assert_eq!(stream, "acct-1");
                assert_eq!(expected, ExpectedVersion::Exact(0));
                assert_eq!(actual, Some(1));
            }
            other => panic!("expected WrongExpectedVersion, got {other:?}"),
        }
        let e = b
            .append(
                "acct-1",
                ExpectedVersion::NoStream,
                vec![EventData::new("C", vec![])],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::WrongExpectedVersion {
                    actual: Some(1),
                    ..
                }
            ),
            "{e}"
        );
        let e = b
            .append(
                "acct-2",
                ExpectedVersion::StreamExists,
                vec![EventData::new("C", vec![])],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::WrongExpectedVersion { actual: None, .. }),
            "{e}"
        );
        // A multi-stream append with one failing expectation writes nothing.
        let e = a
            .append_multi(vec![
                (
                    "acct-3".into(),
                    ExpectedVersion::NoStream,
                    vec![EventData::new("X", vec![])],
                ),
                (
                    "acct-1".into(),
                    ExpectedVersion::Exact(0),
                    vec![EventData::new("X", vec![])],
                ),
            ])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::WrongExpectedVersion));
        assert!(a.stream_info("acct-3").await.unwrap().is_none());
    });
}

#[test]
fn subscription_catches_up_across_a_segment_roll_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_segments_config(dir.path());
    let data = dir.path().join("data");
    let d = Tallyd::start(&data, &["--config", cfg.to_str().unwrap()]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        // About 1.7 MB of records: the 1 MiB segments roll at least once.
        let before = 6_000u64;
        for chunk in 0..before / 100 {
            let events = (0..100)
                .map(|i| EventData::json("Tick", payload(chunk * 100 + i)))
                .collect();
            c.append(&format!("s-{}", chunk % 7), ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
        let segments = c.server_info().await.unwrap().segments;
        assert!(segments >= 2, "the log rolled ({segments} segments)");
        let mut sub = c
            .subscribe(
                SubscribeTarget::All(Filter::default()),
                SubscribeFrom::At(0),
            )
            .await
            .unwrap();
        let writer = {
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..500u64 {
                    c.append(
                        "live",
                        ExpectedVersion::Any,
                        vec![EventData::json("Tick", payload(before + i))],
                    )
                    .await
                    .unwrap();
                }
            })
        };
        let mut expected = 0u64;
        let mut caught_up = 0;
        while expected < before + 500 {
            match tokio::time::timeout(Duration::from_secs(20), sub.next())
                .await
                .unwrap()
                .unwrap()
            {
                SubscriptionItem::Event(e) => {
                    assert_eq!(e.position.0, expected, "no gap and no duplicate");
                    let want = payload(expected);
                    assert_eq!(e.payload(), want.as_bytes());
                    expected += 1;
                }
                SubscriptionItem::CaughtUp(p) => {
                    assert_eq!(p, expected);
                    caught_up += 1;
                }
            }
        }
        assert_eq!(caught_up, 1, "one switch from catch-up to live");
        writer.await.unwrap();
        // And nothing more arrives.
        let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
        assert!(extra.is_err(), "no event after the last: {extra:?}");

        // A stream subscription from now sees only new events of its stream.
        let mut s = c
            .subscribe(SubscribeTarget::Stream("live".into()), SubscribeFrom::Now)
            .await
            .unwrap();
        assert_eq!(s.next_from(), 500);
        c.append(
            "other",
            ExpectedVersion::Any,
            vec![EventData::new("X", vec![])],
        )
        .await
        .unwrap();
        c.append(
            "live",
            ExpectedVersion::Any,
            vec![EventData::new("Y", vec![])],
        )
        .await
        .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .unwrap()
                .unwrap()
            {
                SubscriptionItem::CaughtUp(_) => {}
                SubscriptionItem::Event(e) => {
                    assert_eq!((e.stream(), e.version, e.event_type()), ("live", 500, "Y"));
                    break;
                }
            }
        }
        s.unsubscribe().await.unwrap();
    });
}

/// A raw protocol connection, for tests that look at frames.
struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(addr: &str) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Raw { s }
    }

    fn hello(addr: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.send(
            0,
            &Request::Hello {
                min_version: 1,
                max_version: PROTOCOL_VERSION,
                client: "raw".into(),
            },
        );
        let (_, resp) = r.recv().unwrap();
        assert!(matches!(resp, Response::Hello(_)), "{resp:?}");
        r
    }

    fn send(&mut self, id: u32, req: &Request) {
        let mut out = Vec::new();
        req.encode(id, &mut out);
        self.s.write_all(&out).unwrap();
    }

    /// The next frame, or `None` when the server closed the connection or nothing came
    /// within the read timeout.
    fn recv(&mut self) -> Option<(protocol::FrameHeader, Response)> {
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).ok()?;
        let mut body = vec![0; u32::from_le_bytes(len) as usize];
        self.s.read_exact(&mut body).ok()?;
        Some(Response::decode(&bytes::Bytes::from(body)).unwrap())
    }
}

/// One connection with many subscriptions that never reads its socket cannot take the
/// server's memory: its pushes wait for room in its share of the response budget, it is
/// closed once it has held that share for `response_wait_ms`, and other clients are served
/// all along. (Before the budget, such a connection took tallyd from 29 MB to 1 GB.)
#[test]
fn a_client_that_never_reads_is_held_to_its_share_of_response_memory_and_closed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("tallyd.toml");
    std::fs::write(
        &cfg,
        "max_frame_bytes = 2097152\nmax_connection_response_bytes = 8388608\n\
         max_response_bytes = 16777216\nresponse_wait_ms = 1000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let d = Tallyd::start(&data, &["--config", cfg.to_str().unwrap()]);
    let big = |i: u64| format!(r#"{{"i":{i},"pad":"{}"}}"#, "x".repeat(2000));
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        for i in 0..60 {
            c.append(
                "s",
                ExpectedVersion::Any,
                (0..100)
                    .map(|j| EventData::json("T", big(i * 100 + j)))
                    .collect(),
            )
            .await
            .unwrap();
        }
    });
    let before = d.rss_bytes();
    let anon_before = d.rss_anon_bytes();
    let mut hog = Raw::hello(&d.addr);
    for id in 1..=64 {
        hog.send(
            id,
            &Request::Subscribe {
                target: SubscribeTarget::All(Filter::default()),
                from: SubscribeFrom::At(0),
                credit: u32::MAX,
            },
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    // Others are served while the hog holds its share.
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let (es, _, _) = c
            .read_all(0, 100, Direction::Forward, &Filter::default())
            .await
            .unwrap();
        assert_eq!(es.len(), 100);
    });
    let during = d.rss_bytes();
    // The hog is closed: what was buffered for it arrives, then the end of the stream.
    hog.s
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match hog.s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the connection that never read was not closed: {e}"),
        }
    }
    assert!(
        during < before + (128 << 20),
        "tallyd grew from {before} to {during} bytes while one client did not read"
    );
    // And the server goes on.
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        c.ping().await.unwrap();
    });
    // Once it has left, the memory that was buffered for it goes back to the system (the
    // server trims the allocator after a burst): the heap returns near where it was. (The
    // pages of segment files read for it stay mapped; the kernel drops those as it needs.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut anon_after = d.rss_anon_bytes();
    while anon_after > anon_before + (10 << 20) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        anon_after = d.rss_anon_bytes();
    }
    eprintln!(
        "tallyd resident memory: {} MiB before the hog ({} MiB anonymous), {} MiB with it, {} MiB after it left ({} MiB anonymous)",
        before >> 20,
        anon_before >> 20,
        during >> 20,
        d.rss_bytes() >> 20,
        anon_after >> 20
    );
    assert!(
        anon_after <= anon_before + (10 << 20),
        "the heap stayed at {anon_after} bytes after the hog left (from {anon_before})"
    );
}

#[test]
fn a_slow_subscriber_is_held_by_flow_control() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        for i in 0..20 {
            c.append(
                "s",
                ExpectedVersion::Any,
                (0..100)
                    .map(|j| EventData::json("T", payload(i * 100 + j)))
                    .collect(),
            )
            .await
            .unwrap();
        }
    });
    let mut r = Raw::hello(&d.addr);
    r.send(
        7,
        &Request::Subscribe {
            target: SubscribeTarget::All(Filter::default()),
            from: SubscribeFrom::At(0),
            credit: 10,
        },
    );
    r.s.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut got = Vec::new();
    while let Some((h, resp)) = r.recv() {
        assert_eq!(h.request_id, 7);
        match resp {
            Response::Subscribed { start } => assert_eq!(start, 0),
            Response::SubEvents(es) => got.extend(es.iter().map(|e| e.position.0)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        got,
        (0..10).collect::<Vec<_>>(),
        "exactly the credit granted, no more"
    );
    r.send(
        8,
        &Request::Credit {
            subscription: 7,
            credit: 5,
        },
    );
    while let Some((_, resp)) = r.recv() {
        if let Response::SubEvents(es) = resp {
            got.extend(es.iter().map(|e| e.position.0));
        }
    }
    assert_eq!(
        got,
        (0..15).collect::<Vec<_>>(),
        "five more after a credit of five"
    );
    // A client that grants credit but never reads its socket: the server queues a bounded
    // number of frames and keeps serving others.
    let mut greedy = Raw::hello(&d.addr);
    greedy.send(
        1,
        &Request::Subscribe {
            target: SubscribeTarget::All(Filter::default()),
            from: SubscribeFrom::At(0),
            credit: u32::MAX,
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        c.ping().await.unwrap();
        let (es, _, _) = c
            .read_all(0, 10, Direction::Forward, &Filter::default())
            .await
            .unwrap();
        assert_eq!(es.len(), 10);
    });
    // Credit that exactly covers a stream's backlog: the caught-up marker needs none.
    let mut exact = Raw::hello(&d.addr);
    exact.send(
        3,
        &Request::Subscribe {
            target: SubscribeTarget::Stream("s".into()),
            from: SubscribeFrom::At(1990),
            credit: 10,
        },
    );
    let mut seen = Vec::new();
    let mut marker = None;
    while let Some((_, resp)) = exact.recv() {
        match resp {
            Response::Subscribed { start } => assert_eq!(start, 1990),
            Response::SubEvents(es) => seen.extend(es.iter().map(|e| e.version)),
            Response::SubCaughtUp(v) => {
                marker = Some(v);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, (1990..2000).collect::<Vec<_>>());
    assert_eq!(marker, Some(2000));
    r.send(9, &Request::Unsubscribe { subscription: 7 });
    r.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut unsubscribed = false;
    while let Some((h, resp)) = r.recv() {
        if h.request_id == 9 {
            assert_eq!(resp, Response::Unsubscribed);
            unsubscribed = true;
            break;
        }
    }
    assert!(unsubscribed);
    drop(greedy);
}

#[test]
fn named_checkpoints_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        assert_eq!(c.fetch_checkpoint("pnl-projection").await.unwrap(), None);
        c.store_checkpoint("pnl-projection", 41).await.unwrap();
        c.store_checkpoint("pnl-projection", 1234).await.unwrap();
        c.store_checkpoint("risk", 7).await.unwrap();
        assert_eq!(
            c.fetch_checkpoint("pnl-projection").await.unwrap(),
            Some(1234)
        );
    });
    assert!(d.terminate().success());
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        assert_eq!(
            c.fetch_checkpoint("pnl-projection").await.unwrap(),
            Some(1234)
        );
        assert_eq!(c.fetch_checkpoint("risk").await.unwrap(), Some(7));
        // They live in the log, as events of the server's own streams.
        let (es, _, _) = c
            .read_all(
                0,
                10,
                Direction::Forward,
                &Filter {
                    stream_prefix: "$consumer-".into(),
                    event_types: vec![],
                },
            )
            .await
            .unwrap();
        assert_eq!(es.len(), 3);
        // Signed checkpoint and an inclusion proof that verifies against it.
        let cp = c
            .latest_checkpoint()
            .await
            .unwrap()
            .expect("a checkpoint on close");
        let size = cp.statement.tree_size;
        assert!(size >= 3);
        let p = c.inclusion_proof(1, 0).await.unwrap();
        assert_eq!((p.position, p.tree_size), (1, size));
        assert_eq!(p.root, cp.statement.root);
        let proof = tally_engine::format::proof::InclusionProof {
            index: 1,
            tree_size: size,
            path: p.path.clone(),
        };
        proof.verify(&p.record_hash, &cp.statement.root).unwrap();
        let e = c.inclusion_proof(size + 5, size).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ProofUnavailable), "{e}");
    });
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_append() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the load rolls several, so the attribute indexes checked after the
    // restart come both from sealed segments' sidecars and from records indexed again.
    let cfg = small_segments_config(dir.path());
    let data = dir.path().join("data");
    let args = ["--config", cfg.to_str().unwrap()];
    let d = Tallyd::start(&data, &args);
    let acked = runtime().block_on(async {
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let addr = d.addr.clone();
            tasks.push(tokio::spawn(async move {
                let opts = ClientOptions {
                    retries: 0,
                    ..ClientOptions::default()
                };
                let c = Client::connect_with(&addr, opts).await.unwrap();
                let mut acked = Vec::new();
                for i in 0u64.. {
                    let id = tally_engine::new_event_id();
                    let ev = EventData::json("Tick", payload(i))
                        .with_id(id)
                        .correlation_id(format!("writer-{w}"));
                    let expected = if i == 0 {
                        ExpectedVersion::NoStream
                    } else {
                        ExpectedVersion::Exact(i - 1)
                    };
                    match c.append(&format!("w-{w}"), expected, vec![ev]).await {
                        Ok(r) => acked.push((r.last_position.0, id)),
                        Err(_) => break,
                    }
                }
                acked
            }));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        common::signal(d.pid(), "KILL");
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    drop(d);
    assert!(
        acked.len() > 50,
        "the load ran ({} acknowledged)",
        acked.len()
    );
    let d = Tallyd::start(&data, &args);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let mut found = std::collections::HashMap::new();
        let mut from = 0;
        loop {
            let (es, next, end) = c
                .read_all(from, 4096, Direction::Forward, &Filter::default())
                .await
                .unwrap();
            for e in es {
                found.insert(e.position.0, e.event_id);
            }
            from = next;
            if end {
                break;
            }
        }
        for (pos, id) in &acked {
            assert_eq!(
                found.get(pos),
                Some(id),
                "acknowledged append at {pos} survived"
            );
        }
        // The indexes find every acknowledged event too: by its writer's correlation id,
        // and (a sample) by its event id.
        assert!(
            c.server_info().await.unwrap().segments > 1,
            "segments rolled"
        );
        let mut by_correlation = HashSet::new();
        for w in 0..8u64 {
            let mut q = protocol::FindQuery {
                field: Some((tally_engine::Field::Correlation, format!("writer-{w}"))),
                record_time: None,
                event_time: None,
                from: 0,
                max: 4096,
            };
            loop {
                let (es, next, end) = c.find(&q).await.unwrap();
                by_correlation.extend(es.iter().map(|e| (e.position.0, e.event_id)));
                if end {
                    break;
                }
                q.from = next;
            }
        }
        for (pos, id) in &acked {
            assert!(
                by_correlation.contains(&(*pos, *id)),
                "acknowledged append at {pos} found by its correlation id"
            );
        }
        for (pos, id) in acked.iter().step_by(acked.len() / 50 + 1) {
            let q = protocol::FindQuery {
                field: Some((tally_engine::Field::EventId, id.to_string())),
                record_time: None,
                event_time: None,
                from: 0,
                max: 10,
            };
            let (es, _, _) = c.find(&q).await.unwrap();
            let got: Vec<(u64, EventId)> = es.iter().map(|e| (e.position.0, e.event_id)).collect();
            assert_eq!(
                got,
                [(*pos, *id)],
                "acknowledged append at {pos} found by its id"
            );
        }
    });
}

#[test]
fn graceful_shutdown_answers_in_flight_requests_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    let pid = d.pid();
    let (acked, sub_end) = runtime().block_on(async {
        let c = Client::connect_with(
            &d.addr,
            ClientOptions {
                retries: 0,
                ..ClientOptions::default()
            },
        )
        .await
        .unwrap();
        let mut sub = c
            .subscribe(SubscribeTarget::Stream("g".into()), SubscribeFrom::Now)
            .await
            .unwrap();
        let mut pending = Vec::new();
        for i in 0..200u64 {
            pending.push(
                c.send(&Client::append_request(
                    "g",
                    ExpectedVersion::Any,
                    vec![EventData::json("T", payload(i))],
                ))
                .await
                .unwrap(),
            );
        }
        // Signal once the server is working on them: some are done, some in flight, some
        // perhaps not read yet.
        let mut pending = pending.into_iter();
        let first = pending.next().unwrap().wait().await.unwrap();
        assert!(matches!(first, Response::Appended(_)));
        common::signal(pid, "TERM");
        let mut acked = 1;
        for p in pending {
            match p.wait().await {
                Ok(Response::Appended(_)) => acked += 1,
                Ok(other) => panic!("{other:?}"),
                Err(e) => assert!(
                    matches!(e, ClientError::Disconnected { .. })
                        || e.code() == Some(ErrorCode::ShuttingDown),
                    "a clear error: {e}"
                ),
            }
        }
        // The subscription ends with ShuttingDown (its resume then fails: no retries).
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .unwrap()
            {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        (acked, end)
    });
    assert!(acked >= 1);
    assert!(
        sub_end.code() == Some(ErrorCode::ShuttingDown)
            || matches!(
                sub_end,
                ClientError::Disconnected { .. } | ClientError::Io { .. }
            ),
        "{sub_end}"
    );
    let status = d.wait();
    assert!(status.success(), "exit status {status:?}");
    // The log was closed cleanly: the next open needs no recovery scan.
    let log = tally_engine::Log::open(dir.path(), tally_engine::Options::default()).unwrap();
    assert!(log.recovery_report().clean, "{:?}", log.recovery_report());
    // Every append the server executed was answered: none was written without its
    // acknowledgement reaching the client, and none acknowledged is missing.
    assert_eq!(
        log.stream_info("g").unwrap().unwrap().last_version + 1,
        acked
    );
}

#[test]
fn a_thousand_concurrent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let mut clients = Vec::new();
        for _ in 0..1000 {
            clients.push(Client::connect(&d.addr).await.unwrap());
        }
        // All open at once; each appends once, concurrently (one group commit covers many).
        let mut tasks = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                c.append(
                    &format!("c-{i}"),
                    ExpectedVersion::NoStream,
                    vec![EventData::new("Hi", vec![1])],
                )
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let info = clients[0].server_info().await.unwrap();
        assert_eq!(info.next_position, 1000);
        assert!(
            info.connections >= 1000,
            "{} connections open",
            info.connections
        );
    });
}

#[test]
fn malformed_input_gets_errors_and_never_hurts_other_clients() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        c.append(
            "keep",
            ExpectedVersion::NoStream,
            vec![EventData::new("A", vec![1, 2, 3])],
        )
        .await
        .unwrap();
    });
    let frame = |opcode: u8, id: u32, payload: &[u8]| {
        let mut out = Vec::new();
        let s = protocol::start_frame(&mut out, opcode, id);
        out.extend_from_slice(payload);
        protocol::finish_frame(&mut out, s);
        out
    };
    let expect_error = |r: &mut Raw, code: ErrorCode| match r.recv() {
        Some((_, Response::Error(e))) => assert_eq!(e.code(), Some(code), "{e}"),
        other => panic!("expected {code:?}, got {other:?}"),
    };
    // A first frame that is not HELLO.
    let mut r = Raw::connect(&d.addr);
    r.s.write_all(&frame(op::PING, 1, b"")).unwrap();
    expect_error(&mut r, ErrorCode::HandshakeRequired);
    assert!(r.recv().is_none(), "closed after a failed handshake");
    // No version in common.
    let mut r = Raw::connect(&d.addr);
    r.send(
        1,
        &Request::Hello {
            min_version: 7,
            max_version: 9,
            client: "future".into(),
        },
    );
    expect_error(&mut r, ErrorCode::UnsupportedVersion);
    // A HELLO with non-zero (reserved) flags: refused, and the connection closed.
    let mut r = Raw::connect(&d.addr);
    let mut hello = Vec::new();
    Request::Hello {
        min_version: 1,
        max_version: 1,
        client: "flags".into(),
    }
    .encode(1, &mut hello);
    hello[5] = 0x01;
    r.s.write_all(&hello).unwrap();
    expect_error(&mut r, ErrorCode::MalformedRequest);
    assert!(r.recv().is_none(), "closed after a failed handshake");
    // A bad magic.
    let mut r = Raw::connect(&d.addr);
    r.s.write_all(&frame(op::HELLO, 1, b"HTTP/1.1 \x01\x00"))
        .unwrap();
    expect_error(&mut r, ErrorCode::MalformedRequest);
    // An oversized length: error and close, without reading (or allocating) 4 GiB.
    let mut r = Raw::hello(&d.addr);
    r.s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    expect_error(&mut r, ErrorCode::BadFrame);
    assert!(r.recv().is_none());
    // A length shorter than the header.
    let mut r = Raw::hello(&d.addr);
    r.s.write_all(&[2, 0, 0, 0, 1, 2]).unwrap();
    expect_error(&mut r, ErrorCode::BadFrame);
    // Whole frames with bad payloads get an error each, and the connection goes on.
    let mut r = Raw::hello(&d.addr);
    r.s.write_all(&frame(0x77, 5, b"???")).unwrap();
    expect_error(&mut r, ErrorCode::UnknownOperation);
    r.s.write_all(&frame(op::STREAM_INFO, 6, &[3, 0, b'a', 0xff, b'b']))
        .unwrap();
    expect_error(&mut r, ErrorCode::InvalidUtf8);
    r.s.write_all(&frame(op::APPEND, 7, &[1, 0, b's', 1, 2]))
        .unwrap();
    expect_error(&mut r, ErrorCode::MalformedRequest);
    let mut too_many = Vec::new();
    protocol::put_str(&mut too_many, "s");
    too_many.extend_from_slice(&u64::MAX.to_le_bytes());
    too_many.extend_from_slice(&1_000_000u32.to_le_bytes());
    r.s.write_all(&frame(op::APPEND, 8, &too_many)).unwrap();
    expect_error(&mut r, ErrorCode::LimitExceeded);
    r.send(
        9,
        &Request::Append(protocol::AppendPart {
            stream: String::new(),
            expected: ExpectedVersion::Any,
            events: vec![EventData::new("X", vec![])],
        }),
    );
    expect_error(&mut r, ErrorCode::InvalidEvent);
    r.send(
        10,
        &Request::Append(protocol::AppendPart {
            stream: "s".into(),
            expected: ExpectedVersion::Any,
            events: vec![EventData::new(
                "X",
                vec![0; tally_engine::format::envelope::PAYLOAD_BYTES_MAX + 1],
            )],
        }),
    );
    expect_error(&mut r, ErrorCode::InvalidEvent);
    // Reserved flags, and a read of nothing.
    let mut flagged = frame(op::PING, 12, b"");
    flagged[5] = 0x80;
    r.s.write_all(&flagged).unwrap();
    expect_error(&mut r, ErrorCode::MalformedRequest);
    r.send(
        13,
        &Request::ReadAll {
            from: 0,
            max: 0,
            direction: Direction::Forward,
            filter: Filter::default(),
        },
    );
    expect_error(&mut r, ErrorCode::MalformedRequest);
    r.send(
        14,
        &Request::CheckpointFetch {
            name: String::new(),
        },
    );
    expect_error(&mut r, ErrorCode::MalformedRequest);
    r.send(11, &Request::Ping(b"still here".to_vec()));
    assert_eq!(r.recv().unwrap().1, Response::Pong(b"still here".to_vec()));
    // Request id 0 after the HELLO: a connection-level error, and the connection closes.
    let mut z = Raw::hello(&d.addr);
    z.s.write_all(&frame(op::PING, 0, b"")).unwrap();
    let (h, resp) = z.recv().unwrap();
    assert_eq!(h.request_id, 0);
    assert!(
        matches!(&resp, Response::Error(e) if e.code() == Some(ErrorCode::MalformedRequest)),
        "{resp:?}"
    );
    z.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(z.recv().is_none(), "the connection is closed after it");
    // A frame cut short by the client leaving.
    let mut r = Raw::hello(&d.addr);
    r.s.write_all(&[100, 0, 0, 0, op::PING, 0]).unwrap();
    drop(r);
    // Random bytes, with and without a handshake first.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..200 {
        let mut r = if round % 2 == 0 {
            Raw::connect(&d.addr)
        } else {
            Raw::hello(&d.addr)
        };
        let n = 1 + (round * 37) % 300;
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = r.s.write_all(&bytes);
        let _ = r.s.shutdown(std::net::Shutdown::Write);
        r.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // The server answers and/or closes; it never hangs on a finished connection.
        while r.recv_raw() {}
    }
    // The server still serves, and the data is intact.
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let (es, _, _) = c
            .read_stream("keep", 0, 10, Direction::Forward)
            .await
            .unwrap();
        assert_eq!(es.len(), 1);
        assert_eq!(es[0].payload(), &[1, 2, 3]);
        c.append(
            "keep",
            ExpectedVersion::Exact(0),
            vec![EventData::new("B", vec![])],
        )
        .await
        .unwrap();
        assert_eq!(c.server_info().await.unwrap().next_position, 2);
    });
    let status = d.terminate();
    assert!(status.success());
    let log = tally_engine::Log::open(dir.path(), tally_engine::Options::default()).unwrap();
    log.verify().unwrap();
}

impl Raw {
    /// Reads one frame's bytes without decoding; false at the end of the connection.
    fn recv_raw(&mut self) -> bool {
        let mut len = [0u8; 4];
        if self.s.read_exact(&mut len).is_err() {
            return false;
        }
        let mut body = vec![0; u32::from_le_bytes(len).min(1 << 20) as usize];
        self.s.read_exact(&mut body).is_ok()
    }
}

#[test]
fn handshake_timeout_closes_silent_connections() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, "handshake_timeout_ms = 200\nidle_timeout_ms = 400\n").unwrap();
    let d = Tallyd::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    let mut r = Raw::connect(&d.addr);
    match r.recv() {
        Some((h, Response::Error(e))) => {
            assert_eq!((h.request_id, e.code()), (0, Some(ErrorCode::Timeout)));
        }
        other => panic!("{other:?}"),
    }
    assert!(r.recv().is_none());
    let mut r = Raw::hello(&d.addr);
    match r.recv() {
        Some((_, Response::Error(e))) => assert_eq!(e.code(), Some(ErrorCode::Timeout)),
        other => panic!("idle connection: {other:?}"),
    }
    let seen: HashSet<u16> = ErrorCode::ALL.iter().map(|c| c.as_u16()).collect();
    assert_eq!(seen.len(), ErrorCode::ALL.len());
}

#[test]
fn a_subscription_resumes_after_a_server_restart_without_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    let addr = d.addr.clone();
    let rt = runtime();
    let c = rt.block_on(async {
        let opts = ClientOptions {
            subscription_window: 16,
            retries: 100,
            retry_delay: Duration::from_millis(20),
            ..ClientOptions::default()
        };
        let c = Client::connect_with(&addr, opts).await.unwrap();
        for i in 0..100 {
            c.append(
                "r",
                ExpectedVersion::Any,
                vec![EventData::json("T", payload(i))],
            )
            .await
            .unwrap();
        }
        c
    });
    let mut sub = rt.block_on(async {
        let mut sub = c
            .subscribe(
                SubscribeTarget::All(Filter::default()),
                SubscribeFrom::At(0),
            )
            .await
            .unwrap();
        for want in 0..50u64 {
            match sub.next().await.unwrap() {
                SubscriptionItem::Event(e) => assert_eq!(e.position.0, want),
                other => panic!("{other:?}"),
            }
        }
        sub
    });
    // The server goes away with events buffered and credit outstanding, and comes back.
    // An append made meanwhile is retried on a new connection, with the same event id.
    d.kill();
    let during = {
        let c = c.clone();
        rt.spawn(async move {
            c.append(
                "outage",
                ExpectedVersion::Any,
                vec![EventData::new("Kept", b"x".to_vec())],
            )
            .await
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let d = Tallyd::start(dir.path(), &["--listen", &addr]);
    rt.block_on(async {
        during.await.unwrap().unwrap();
        let (es, _, _) = c
            .read_stream("outage", 0, 10, Direction::Forward)
            .await
            .unwrap();
        assert_eq!(es.len(), 1, "written once");
        for i in 100..150 {
            c.append(
                "r",
                ExpectedVersion::Any,
                vec![EventData::json("T", payload(i))],
            )
            .await
            .unwrap();
        }
        // Positions 50..100 from before, the outage event at 100, then 101..151.
        let mut want = 50u64;
        while want < 151 {
            match tokio::time::timeout(Duration::from_secs(20), sub.next())
                .await
                .unwrap()
                .unwrap()
            {
                SubscriptionItem::Event(e) => {
                    assert_eq!(e.position.0, want, "resumed after the last delivered event");
                    if want == 100 {
                        assert_eq!(e.stream(), "outage");
                    } else {
                        let i = if want > 100 { want - 1 } else { want };
                        assert_eq!(e.payload(), payload(i).as_bytes());
                    }
                    want += 1;
                }
                SubscriptionItem::CaughtUp(_) => {}
            }
        }
    });
    drop(d);
}

#[test]
fn connections_beyond_the_limit_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(&dir.path().join("data"), &["--max-connections", "2"]);
    let a = Raw::hello(&d.addr);
    let b = Raw::hello(&d.addr);
    let mut c = Raw::connect(&d.addr);
    match c.recv() {
        Some((h, Response::Error(e))) => {
            assert_eq!(
                (h.request_id, e.code()),
                (0, Some(ErrorCode::TooManyConnections))
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(c.recv().is_none(), "closed");
    drop(a);
    // A slot frees when a connection closes.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut r = Raw::connect(&d.addr);
        r.send(
            0,
            &Request::Hello {
                min_version: 1,
                max_version: PROTOCOL_VERSION,
                client: "again".into(),
            },
        );
        if let Some((_, Response::Hello(_))) = r.recv() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a freed slot is reused"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(b);
}

#[test]
fn subscribe_from_now_means_when_the_request_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(dir.path(), &[]);
    for round in 0..20u32 {
        let mut r = Raw::hello(&d.addr);
        // SUBSCRIBE from now and an APPEND behind it, in one write.
        let mut bytes = Vec::new();
        Request::Subscribe {
            target: SubscribeTarget::All(Filter::default()),
            from: SubscribeFrom::Now,
            credit: 10,
        }
        .encode(1, &mut bytes);
        Client::append_request(
            "pipelined",
            ExpectedVersion::Any,
            vec![EventData::new("After", round.to_le_bytes().to_vec())],
        )
        .encode(2, &mut bytes);
        r.s.write_all(&bytes).unwrap();
        let mut got = None;
        while let Some((h, resp)) = r.recv() {
            match resp {
                Response::SubEvents(es) => {
                    got = Some(es[0].payload().to_vec());
                    break;
                }
                Response::Subscribed { .. } | Response::Appended(_) | Response::SubCaughtUp(_) => {}
                other => panic!("{h:?} {other:?}"),
            }
        }
        assert_eq!(
            got,
            Some(round.to_le_bytes().to_vec()),
            "round {round}: the append after SUBSCRIBE is delivered"
        );
    }
}

#[test]
fn the_client_refuses_oversized_requests_and_frees_dropped_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("t.toml");
    std::fs::write(&cfg, "max_subscriptions = 2\nmax_frame_bytes = 2097152\n").unwrap();
    let d = Tallyd::start(
        &dir.path().join("data"),
        &["--config", cfg.to_str().unwrap()],
    );
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        // 3 MB in one append: refused before sending; the connection stays up.
        let big: Vec<EventData> = (0..6)
            .map(|_| EventData::new("Big", vec![7; 500_000]))
            .collect();
        let e = c
            .append("big", ExpectedVersion::Any, big)
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::TooLarge { max: 2_097_152, .. }),
            "{e}"
        );
        c.ping().await.unwrap();
        // Subscriptions dropped without unsubscribe are ended on the server.
        for _ in 0..5 {
            let s = c
                .subscribe(SubscribeTarget::All(Filter::default()), SubscribeFrom::Now)
                .await
                .unwrap();
            drop(s);
            c.ping().await.unwrap();
        }
        let mut s = c
            .subscribe(SubscribeTarget::Stream("x".into()), SubscribeFrom::At(0))
            .await
            .unwrap();
        c.append("x", ExpectedVersion::Any, vec![EventData::new("X", vec![])])
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .unwrap()
                .unwrap()
            {
                SubscriptionItem::Event(e) => {
                    assert_eq!(e.stream(), "x");
                    break;
                }
                SubscriptionItem::CaughtUp(_) => {}
            }
        }
        s.unsubscribe().await.unwrap();
    });
}

#[test]
fn find_uses_the_indexes_across_segments_and_pages_by_position() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_segments_config(dir.path());
    let data = dir.path().join("data");
    let d = Tallyd::start(&data, &["--config", cfg.to_str().unwrap()]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        // About 2 MB: the 1 MiB segments roll, so lookups cross sealed and active ones.
        let n = 7_000u64;
        for chunk in 0..n / 100 {
            let events = (0..100)
                .map(|i| {
                    let k = chunk * 100 + i;
                    EventData::json(if k % 4 == 0 { "Amend" } else { "Tick" }, payload(k))
                        .with_id(EventId(u128::from(k + 1).to_le_bytes()))
                        .correlation_id(format!("corr-{}", k % 500))
                        .actor(format!("trader-{}", k % 3))
                        .event_time(Timestamp(1_000_000 + k))
                })
                .collect();
            c.append(&format!("s-{}", chunk % 7), ExpectedVersion::Any, events)
                .await
                .unwrap();
        }
        assert!(c.server_info().await.unwrap().segments > 1);
        let q = |field: Option<(tally_engine::Field, &str)>, max: u32| protocol::FindQuery {
            field: field.map(|(f, v)| (f, v.to_owned())),
            record_time: None,
            event_time: None,
            from: 0,
            max,
        };
        // One correlation id: 14 events spread over the log, in position order.
        let (events, next, end) = c
            .find(&q(Some((tally_engine::Field::Correlation, "corr-7")), 100))
            .await
            .unwrap();
        let positions: Vec<u64> = events.iter().map(|e| e.position.0).collect();
        assert_eq!(positions, (7..n).step_by(500).collect::<Vec<u64>>());
        assert!(events.iter().all(|e| e.correlation_id() == "corr-7"));
        assert_eq!((next, end), (n, true));

        // By event id.
        let id = EventId(u128::from(4242u64 + 1).to_le_bytes());
        let (events, _, _) = c
            .find(&q(
                Some((tally_engine::Field::EventId, &id.to_string())),
                10,
            ))
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!((events[0].event_id, events[0].position.0), (id, 4242));

        // An event type in an event-time window, paged 50 at a time.
        let mut window = q(Some((tally_engine::Field::EventType, "Amend")), 50);
        window.event_time = Some((1_000_000 + 1000, 1_000_000 + 3000));
        let mut got = Vec::new();
        loop {
            let (events, next, end) = c.find(&window).await.unwrap();
            got.extend(events.iter().map(|e| e.position.0));
            if end {
                break;
            }
            assert_eq!(events.len(), 50);
            window.from = next;
        }
        assert_eq!(got, (1000..3000).step_by(4).collect::<Vec<u64>>());

        // Bad queries are refused with a clear error, and the connection goes on.
        for bad in [
            q(Some((tally_engine::Field::EventId, "not-a-uuid")), 10),
            q(None, 0),
        ] {
            match c.find(&bad).await {
                Err(ClientError::Server { code, message }) => {
                    assert_eq!(code, ErrorCode::MalformedRequest.as_u16(), "{message}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        c.ping().await.unwrap();
    });
    d.terminate();
}

/// The code and message of a server's refusal.
fn server_code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Server { code, message }) => (code, message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn schemas_registered_through_the_server_validate_appends_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = r#"{"event_type":"TradeNew","version":1,"validate":true,"fields":[
        {"name":"qty","kind":"decimal","required":true},
        {"name":"book","kind":"string","required":false}]}"#;
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        // Before registration anything goes.
        c.append(
            "trade-1",
            ExpectedVersion::Any,
            vec![EventData::json("TradeNew", r#"{"px":1}"#)],
        )
        .await
        .unwrap();
        c.register_schema(v1).await.unwrap();
        // The same registration again (a retry whose first answer was lost) succeeds and
        // writes nothing more.
        c.register_schema(v1).await.unwrap();
        // A misspelt key is refused rather than ignored.
        let (code, msg) = server_code(
            c.register_schema(
                &v1.replace("\"version\":1", "\"version\":2")
                    .replace("validate", "valdiate"),
            )
            .await,
        );
        assert_eq!(code, ErrorCode::SchemaRefused.as_u16(), "{msg}");
        assert!(msg.contains("valdiate"), "{msg}");
        // Not a schema, a skipped version, and a breaking change are refused.
        let (code, msg) = server_code(c.register_schema("{").await);
        assert_eq!(code, ErrorCode::SchemaRefused.as_u16(), "{msg}");
        let (code, msg) = server_code(
            c.register_schema(&v1.replace("\"version\":1", "\"version\":3"))
                .await,
        );
        assert_eq!(code, ErrorCode::SchemaRefused.as_u16(), "{msg}");
        let breaking = v1
            .replace("\"version\":1", "\"version\":2")
            .replace("\"kind\":\"string\"", "\"kind\":\"integer\"");
        let (code, msg) = server_code(c.register_schema(&breaking).await);
        assert_eq!(code, ErrorCode::SchemaRefused.as_u16(), "{msg}");
        assert!(msg.contains("book"), "{msg}");

        // A valid event passes; a bad one is refused naming its field, with nothing of the
        // request written.
        c.append(
            "trade-1",
            ExpectedVersion::Any,
            vec![EventData::json("TradeNew", r#"{"qty":"100","book":"B1"}"#)],
        )
        .await
        .unwrap();
        let before = c.server_info().await.unwrap().next_position;
        let (code, msg) = server_code(
            c.append(
                "trade-2",
                ExpectedVersion::Any,
                vec![
                    EventData::json("TradeNew", r#"{"qty":"5"}"#),
                    EventData::json("TradeNew", r#"{"qty":"5","book":7}"#),
                ],
            )
            .await,
        );
        assert_eq!(code, ErrorCode::SchemaViolation.as_u16(), "{msg}");
        assert!(msg.contains("\"book\"") && msg.contains("event 1"), "{msg}");
        assert_eq!(c.server_info().await.unwrap().next_position, before);
        // Other types and versions are not checked.
        c.append(
            "trade-2",
            ExpectedVersion::Any,
            vec![
                EventData::json("TradeAmended", "[]"),
                EventData::json("TradeNew", "{}").schema_version(2),
            ],
        )
        .await
        .unwrap();
    });
    d.terminate();

    // After a restart the server reads the registry back from the log.
    let d = Tallyd::start(dir.path(), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let (code, msg) = server_code(
            c.append(
                "trade-3",
                ExpectedVersion::Any,
                vec![EventData::json("TradeNew", r#"{"book":"B1"}"#)],
            )
            .await,
        );
        assert_eq!(code, ErrorCode::SchemaViolation.as_u16(), "{msg}");
        assert!(msg.contains("\"qty\" is required"), "{msg}");
        let (events, _, _) = c
            .read_stream("$schemas", 0, 10, Direction::Forward)
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
    });
    d.terminate();
}

/// The client writes a frame straight to the socket when nothing is queued before it, and
/// queues it for its writer task when the socket is full: pipelined appends far larger than
/// the socket's buffers must still arrive whole and in order (each expects the version the
/// one before it made). A dropped client closes its connection once the requests it sent
/// are answered.
#[test]
fn pipelined_writes_stay_in_order_past_a_full_socket_and_a_dropped_client_disconnects() {
    let dir = tempfile::tempdir().unwrap();
    let d = Tallyd::start(&dir.path().join("data"), &[]);
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        let n = 96u64;
        let mut pending = Vec::new();
        for i in 0..n {
            let expected = if i == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(i - 1)
            };
            let req = Request::Append(protocol::AppendPart {
                stream: "ordered".into(),
                expected,
                events: vec![EventData::new("Big", vec![i as u8; 256 << 10])],
            });
            pending.push(c.send(&req).await.unwrap());
        }
        for (i, p) in pending.into_iter().enumerate() {
            match p.wait().await.unwrap() {
                Response::Appended(r) => assert_eq!(r.last_version, i as u64),
                other => panic!("append {i}: {other:?}"),
            }
        }
        let mut events = Vec::new();
        loop {
            let (batch, next, end) = c
                .read_stream("ordered", events.len() as u64, 1000, Direction::Forward)
                .await
                .unwrap();
            events.extend(batch);
            assert_eq!(next, events.len() as u64);
            if end {
                break;
            }
        }
        assert_eq!(events.len(), n as usize);
        for (i, e) in events.iter().enumerate() {
            assert!(e.payload().iter().all(|b| *b == i as u8), "event {i}");
        }

        let other = Client::connect(&d.addr).await.unwrap();
        assert_eq!(other.server_info().await.unwrap().connections, 2);
        // A request sent before the client is dropped still gets its answer.
        let last = c
            .send(&Request::Append(protocol::AppendPart {
                stream: "ordered".into(),
                expected: ExpectedVersion::Exact(n - 1),
                events: vec![EventData::new("Last", vec![])],
            }))
            .await
            .unwrap();
        drop(c);
        match last.wait().await.unwrap() {
            Response::Appended(r) => assert_eq!(r.last_version, n),
            other => panic!("{other:?}"),
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let open = other.server_info().await.unwrap().connections;
            if open == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{open} connections 10 s after the client was dropped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Every setting can come from the environment, which takes precedence over the file named
/// by `TALLYD_CONFIG`; the data directory is created on first start; SIGINT stops the server
/// as SIGTERM does (exit 0, the log closed cleanly).
#[test]
fn environment_variables_configure_tallyd_and_sigint_stops_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("created").join("here");
    let cfg = dir.path().join("tallyd.toml");
    std::fs::write(&cfg, "durability = \"batched\"\nmax_connections = 50\n").unwrap();
    let d = Tallyd::start_with_env(
        &data,
        &[
            ("TALLYD_DATA", data.to_str().unwrap()),
            ("TALLYD_LISTEN", "127.0.0.1:0"),
            ("TALLYD_CONFIG", cfg.to_str().unwrap()),
            ("TALLYD_DURABILITY", "none"),
            ("TALLYD_MAX_CONNECTIONS", "2"),
        ],
    );
    assert!(data.is_dir(), "TALLYD_DATA was created");
    let pid = d.pid();
    runtime().block_on(async {
        let c = Client::connect(&d.addr).await.unwrap();
        // The environment's durability, not the file's.
        assert_eq!(
            c.server_info().await.unwrap().durability,
            tally_server::server::durability_code(tally_engine::Durability::None)
        );
        c.append(
            "env",
            ExpectedVersion::NoStream,
            vec![EventData::new("E", vec![1])],
        )
        .await
        .unwrap();
    });
    // The environment's connection limit, not the file's: a third is refused.
    let _a = Raw::hello(&d.addr);
    let _b = Raw::hello(&d.addr);
    let mut c = Raw::connect(&d.addr);
    match c.recv() {
        Some((_, Response::Error(e))) => {
            assert_eq!(e.code(), Some(ErrorCode::TooManyConnections));
        }
        other => panic!("{other:?}"),
    }
    common::signal(pid, "INT");
    let status = d.wait();
    assert!(status.success(), "exit status {status:?}");
    let log = tally_engine::Log::open(&data, tally_engine::Options::default()).unwrap();
    assert!(log.recovery_report().clean, "{:?}", log.recovery_report());
    assert_eq!(log.stream_info("env").unwrap().unwrap().last_version, 0);
}
