//! Blocking work stays off tallyd's runtime threads: an append whose roll must wait for a
//! spare segment still being prepared runs on the blocking pool, so that the runtime keeps
//! serving every other connection meanwhile.
//!
//! The server runs in this process on a one-worker runtime over the simulated disk, where
//! the preparation of segment 2's spare is made to take seconds: if that wait happened on
//! the worker, no other request could be answered until it ended.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tally_engine::sim::{Fault, FaultKind, FaultOp, SimFs};
use tally_engine::{Durability, EventData, ExpectedVersion, Options, Storage};
use tally_server::client::Client;
use tally_server::server::{Config, Server};

const APPENDS: u64 = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_roll_waiting_for_its_spare_does_not_stall_other_connections() {
    let sim = SimFs::new(14);
    sim.inject(Fault {
        op: FaultOp::Create,
        path_contains: Some("00002.seg.prep".into()),
        skip: 0,
        kind: FaultKind::SlowSync(Duration::from_secs(4)),
        times: 1,
    });
    let mut cfg = Config::new("/tallyd/data");
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.options = Options {
        storage: Storage::simulated(&sim),
        segment_bytes: 64 * 1024,
        durability: Durability::Fsync,
        checkpoint_interval: None,
        ..Options::default()
    };
    let server = Server::bind(cfg).await.unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    // Segment 1's spare is prepared in the background after open: let it be.
    while sim
        .durable_names(std::path::Path::new("/tallyd/data"))
        .iter()
        .filter(|n| n.to_string_lossy().ends_with(".seg"))
        .count()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // One connection appends until it has rolled past segment 1 into segment 2.
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (addr, acked) = (addr.clone(), Arc::clone(&acked));
        tokio::spawn(async move {
            let c = Client::connect(&addr).await.unwrap();
            for v in 0..APPENDS {
                let e = EventData::json(
                    "TradeAmended",
                    format!(r#"{{"pad":"{}"}}"#, "x".repeat(1500)),
                );
                let expected = if v == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(v - 1)
                };
                c.append("trade-1", expected, vec![e]).await.unwrap();
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Wait until it stalls at the roll into segment 2 (its spare is still being made).
    let mut last = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = acked.load(Ordering::SeqCst);
        assert!(now < APPENDS, "the writer never stalled at a roll");
        if now == last && sim.faults_fired() > 0 {
            break;
        }
        last = now;
    }
    // Another connection is served meanwhile: a ping, a read, server info.
    let other = Client::connect(&addr).await.unwrap();
    other.ping().await.unwrap();
    let read = other
        .read_stream("trade-1", 0, 10, tally_engine::Direction::Forward)
        .await
        .unwrap();
    assert_eq!(read.0.len(), 10);
    other.server_info().await.unwrap();
    assert!(
        !writer.is_finished() && acked.load(Ordering::SeqCst) == last,
        "the other connection was answered while the append still waited for its spare"
    );
    // The stalled append completes once the spare is ready, in order, and the rest follow.
    writer.await.unwrap();
    let all = other
        .read_stream("trade-1", 0, 1000, tally_engine::Direction::Forward)
        .await
        .unwrap()
        .0;
    assert_eq!(all.len() as u64, APPENDS);
    assert!(all.iter().enumerate().all(|(i, e)| e.version == i as u64));
    stop_tx.send(()).unwrap();
    served.await.unwrap().unwrap();
}
