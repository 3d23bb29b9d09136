//! Blobs through tallyd (PROTOCOL.md 4.1a, 4.17, 4.18): a payload larger than a frame is
//! uploaded in pieces and referred to by an append; a payload above the threshold inside an
//! APPEND is stored as a blob by the server; reads return the reference and the blob reads
//! back checked; a reference to a blob the store lacks, pieces out of order, and uploads past
//! the server's upload memory are refused with their documented codes, and nothing is written.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use tally_engine::cold::{ColdStore, DirStore};
use tally_engine::format::blob::BlobRef;
use tally_engine::{ColdOptions, ContentType, Direction, EventData, ExpectedVersion, Options};
use tally_server::client::{Client, ClientError};
use tally_server::protocol::{ErrorCode, Request, Response};
use tally_server::server::{Config, Server};

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29) ^ seed ^ (i >> 11) as u8)
        .collect()
}

fn code(e: &ClientError) -> Option<ErrorCode> {
    match e {
        ClientError::Server { code, .. } => ErrorCode::from_u16(*code),
        _ => None,
    }
}

struct Running {
    addr: String,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), tally_server::server::ServerError>>,
}

async fn start(data: &std::path::Path, store: &std::path::Path, upload_max: u64) -> Running {
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store).unwrap());
    let mut cfg = Config::new(data);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.blob_upload_bytes_max = upload_max;
    cfg.options = Options {
        checkpoint_interval: None,
        cold: ColdOptions {
            store: Some(store),
            ..ColdOptions::default()
        },
        ..Options::default()
    };
    let server = Server::bind(cfg).await.unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running { addr, stop, served }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_larger_than_a_frame_go_up_and_down_in_pieces_and_are_checked() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = start(data.path(), store.path(), 64 << 20).await;
    let c = Client::connect(&s.addr).await.unwrap();
    let frame = c.hello().await.unwrap().limits.frame_bytes_max as usize;
    // Larger than a frame: uploaded in several pieces.
    let doc = bytes(frame * 2 + 12_345, 1);
    let blob = c.put_blob(&doc).await.unwrap();
    assert_eq!(blob, BlobRef::of(&doc).unwrap());
    c.append(
        "trade-1",
        ExpectedVersion::NoStream,
        vec![
            EventData::with_blob("ConfirmationAttached", ContentType::Binary, blob)
                .aggregate_type("Trade"),
            // Above the threshold, inside the APPEND: the server stores it as a blob.
            EventData::json(
                "TermSheetAttached",
                format!("{{\"text\":\"{}\"}}", "x".repeat(100_000)),
            ),
            EventData::json("TradeAmended", "{\"qty\":\"5\"}"),
        ],
    )
    .await
    .unwrap();
    let (events, _, _) = c
        .read_stream("trade-1", 0, 10, Direction::Forward)
        .await
        .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].blob(), Some(blob));
    assert_eq!(events[0].aggregate_type(), "Trade");
    assert_eq!(c.read_blob(&blob).await.unwrap(), doc);
    let sheet = events[1].blob().expect("stored as a blob by the server");
    assert_eq!(events[1].content_type, ContentType::Json);
    let text = c.read_blob(&sheet).await.unwrap();
    assert!(text.starts_with(b"{\"text\":\"xxx"));
    assert_eq!(events[2].blob(), None);
    assert_eq!(events[2].payload(), b"{\"qty\":\"5\"}");

    // A blob changed in the store: the client's check refuses it.
    let key = std::fs::read_dir(store.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("blobs")
        .join(blob.hex());
    let mut b = std::fs::read(&key).unwrap();
    b[frame + 7] ^= 1;
    std::fs::write(&key, &b).unwrap();
    assert!(matches!(
        c.read_blob(&blob).await,
        Err(ClientError::Unexpected(m)) if m.contains("do not match")
    ));

    // A reference to bytes never uploaded: BlobUnavailable, nothing written.
    let missing = BlobRef::of(b"never uploaded").unwrap();
    let e = c
        .append(
            "trade-1",
            ExpectedVersion::Any,
            vec![EventData::with_blob("X", ContentType::Binary, missing)],
        )
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BlobUnavailable), "{e}");
    let e = c.read_blob(&missing).await.unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::BlobUnavailable), "{e}");
    assert_eq!(
        c.stream_info("trade-1")
            .await
            .unwrap()
            .unwrap()
            .last_version,
        2
    );
    let _ = s.stop.send(());
    s.served.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_out_of_order_and_uploads_past_the_memory_limit_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let s = start(data.path(), store.path(), 1 << 20).await;
    let c = Client::connect(&s.addr).await.unwrap();
    let call = |req: Request| {
        let c = c.clone();
        async move { c.call(&req).await }
    };
    // A continuation with no upload in progress.
    let r = call(Request::BlobPut {
        offset: 10,
        total: 20,
        chunk: vec![0; 10],
    })
    .await
    .unwrap_err();
    assert_eq!(code(&r), Some(ErrorCode::MalformedRequest), "{r}");
    // An upload of 20 bytes: its first piece, then a piece at the wrong offset, then one
    // past the end, then the right one.
    let r = call(Request::BlobPut {
        offset: 0,
        total: 20,
        chunk: vec![1; 10],
    })
    .await
    .unwrap();
    assert_eq!(
        r,
        Response::BlobPut {
            received: 10,
            blob: None
        }
    );
    for (offset, len) in [(5u64, 5usize), (10, 11)] {
        let r = call(Request::BlobPut {
            offset,
            total: 20,
            chunk: vec![1; len],
        })
        .await
        .unwrap_err();
        assert_eq!(code(&r), Some(ErrorCode::MalformedRequest), "{r}");
    }
    let r = call(Request::BlobPut {
        offset: 10,
        total: 20,
        chunk: vec![1; 10],
    })
    .await
    .unwrap();
    assert_eq!(
        r,
        Response::BlobPut {
            received: 20,
            blob: Some(BlobRef::of(&[1; 20]).unwrap())
        }
    );
    // Empty, too large for the format, or more than the server's upload memory holds.
    for total in [0u64, (256 << 20) + 1, 2 << 20] {
        let r = call(Request::BlobPut {
            offset: 0,
            total,
            chunk: Vec::new(),
        })
        .await
        .unwrap_err();
        assert_eq!(code(&r), Some(ErrorCode::LimitExceeded), "{total}: {r}");
    }
    // Two connections each holding an unfinished upload share the memory: the second one
    // that would pass it waits its turn (refused now), and the first one's end frees it.
    let other = Client::connect(&s.addr).await.unwrap();
    let half = 600 << 10;
    call(Request::BlobPut {
        offset: 0,
        total: half,
        chunk: vec![2; 1],
    })
    .await
    .unwrap();
    let r = other
        .call(&Request::BlobPut {
            offset: 0,
            total: half,
            chunk: vec![3; 1],
        })
        .await
        .unwrap_err();
    assert_eq!(code(&r), Some(ErrorCode::LimitExceeded), "{r}");
    // A new upload on the first connection replaces (and frees) its unfinished one.
    call(Request::BlobPut {
        offset: 0,
        total: 10,
        chunk: vec![4; 10],
    })
    .await
    .unwrap();
    other
        .call(&Request::BlobPut {
            offset: 0,
            total: half,
            chunk: vec![3; 1],
        })
        .await
        .unwrap();
    // A connection that closes with an unfinished upload gives its memory back.
    drop(other);
    let mut freed = false;
    for _ in 0..200 {
        match call(Request::BlobPut {
            offset: 0,
            total: 900 << 10,
            chunk: vec![5; 1],
        })
        .await
        {
            Ok(_) => {
                freed = true;
                break;
            }
            Err(e) => {
                assert_eq!(code(&e), Some(ErrorCode::LimitExceeded), "{e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    assert!(
        freed,
        "the closed connection's upload still holds its memory"
    );
    let _ = s.stop.send(());
    s.served.await.unwrap().unwrap();
}

/// A log that cannot store blobs (format version 2) refuses an upload at its first piece,
/// before the server keeps any byte of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_log_refuses_an_upload_at_once() {
    let data = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store.path()).unwrap());
    let mut cfg = Config::new(data.path());
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.options = Options {
        format_version: 2,
        checkpoint_interval: None,
        cold: ColdOptions {
            store: Some(store),
            ..ColdOptions::default()
        },
        ..Options::default()
    };
    let server = Server::bind(cfg).await.unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    let c = Client::connect(&addr).await.unwrap();
    let e = c
        .call(&Request::BlobPut {
            offset: 0,
            total: 100 << 20,
            chunk: vec![1; 10],
        })
        .await
        .unwrap_err();
    assert_eq!(code(&e), Some(ErrorCode::InvalidAppend), "{e}");
    let _ = stop.send(());
    served.await.unwrap().unwrap();
}
