//! Ties docs/PROTOCOL.md to the code: every hex example in the document is the exact
//! encoding of the message this test builds, and decodes back to it.
//!
//! An example in the document is an HTML comment naming it, followed by a fenced `hex`
//! block whose lines are `OFFSET: BYTES...`:
//!
//! ```text
//! <!-- example: ping-request -->
//! ```hex
//! 0000: 08 00 00 00 02 00 06 00 00 00 68 69
//! ```
//! ```
//!
//! `TALLY_PRINT_EXAMPLES=1 cargo test -p tally-server --test protocol_doc -- --nocapture`
//! prints every example in that form.

#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use tally_engine::format::envelope::EnvelopeRef;
use tally_engine::{
    AppendResult, ContentType, Direction, EventData, EventId, ExpectedVersion, Position, Timestamp,
};
use tally_server::protocol::{
    self, AppendPart, ErrorCode, Filter, FindQuery, HelloOk, Limits, Request, Response,
    SubscribeFrom, SubscribeTarget, WireError, op,
};

enum Msg {
    Req(Request),
    Resp(u8, Response),
    /// Bytes built by hand (server pushes and reads with events), checked by decoding.
    Raw(Response),
}

fn event_id() -> EventId {
    EventId([
        0x01, 0x93, 0x5b, 0x2a, 0x7c, 0x10, 0x70, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x2a,
    ])
}

const EVENT_TIME: u64 = 1_700_000_000_000_000_000;
const RECORD_TIME: u64 = 1_700_000_000_000_500_000;

fn envelope() -> EnvelopeRef<'static> {
    EnvelopeRef {
        event_id: event_id(),
        event_time: Timestamp(EVENT_TIME),
        schema_version: 1,
        content_type: ContentType::Json,
        stream: "trade-42",
        aggregate_type: "Trade",
        event_type: "TradeNew",
        correlation_id: "c-1",
        causation_id: "",
        actor: "alice",
        payload: br#"{"qty":100}"#,
        payload_form: tally_engine::format::envelope::PayloadForm::Inline,
    }
}

/// A frame of events as the server writes it (READ_STREAM response or SUB_EVENTS push).
fn events_frame(opcode: u8, id: u32, next: Option<(u64, bool)>) -> Vec<u8> {
    let mut out = Vec::new();
    let start = protocol::start_frame(&mut out, opcode, id);
    if let Some((next, end)) = next {
        out.extend_from_slice(&next.to_le_bytes());
        out.push(u8::from(end));
    }
    out.extend_from_slice(&1u32.to_le_bytes());
    protocol::put_event(
        &mut out,
        Position(0),
        0,
        Timestamp(RECORD_TIME),
        &envelope(),
    );
    protocol::finish_frame(&mut out, start);
    out
}

fn examples() -> Vec<(&'static str, Vec<u8>, Msg)> {
    let mut v = Vec::new();
    let mut add = |name: &'static str, id: u32, m: Msg| {
        let mut out = Vec::new();
        match &m {
            Msg::Req(r) => r.encode(id, &mut out),
            Msg::Resp(opcode, r) => r.encode(*opcode, id, &mut out),
            Msg::Raw(_) => unreachable!("raw examples are added below"),
        }
        v.push((name, out, m));
    };
    add(
        "hello-request",
        0,
        Msg::Req(Request::Hello {
            min_version: 1,
            max_version: 1,
            client: "doc".into(),
        }),
    );
    let defaults = tally_server::server::Config::new("unused");
    add(
        "hello-response",
        0,
        Msg::Resp(
            op::HELLO,
            Response::Hello(HelloOk {
                version: 1,
                server: "tallyd/0.1.0".into(),
                log_id: [0x11; 16],
                next_position: 0,
                // The example shows the server's default limits.
                limits: Limits {
                    frame_bytes_max: defaults.frame_bytes_max,
                    append_events_max: defaults.append_events_max,
                    inflight_max: defaults.inflight_max,
                    subscriptions_max: defaults.subscriptions_max,
                },
            }),
        ),
    );
    let ev = EventData::json("TradeNew", r#"{"qty":100}"#)
        .with_id(event_id())
        .aggregate_type("Trade")
        .correlation_id("c-1")
        .actor("alice")
        .event_time(Timestamp(EVENT_TIME));
    add(
        "append-request",
        1,
        Msg::Req(Request::Append(AppendPart {
            stream: "trade-42".into(),
            expected: ExpectedVersion::NoStream,
            events: vec![ev],
        })),
    );
    add(
        "append-response",
        1,
        Msg::Resp(
            op::APPEND,
            Response::Appended(AppendResult {
                first_position: Position(0),
                last_position: Position(0),
                first_version: 0,
                last_version: 0,
            }),
        ),
    );
    add(
        "projection-append-request",
        9,
        Msg::Req(Request::ProjectionAppend {
            name: "pnl".into(),
            manifest: false,
            payload: b"part".to_vec(),
        }),
    );
    add(
        "projection-append-response",
        9,
        Msg::Resp(
            op::PROJECTION_APPEND,
            Response::Appended(AppendResult {
                first_position: Position(40),
                last_position: Position(40),
                first_version: 3,
                last_version: 3,
            }),
        ),
    );
    add(
        "append-wrong-version",
        2,
        Msg::Resp(
            op::APPEND,
            Response::Error(WireError {
                code: ErrorCode::WrongExpectedVersion.as_u16(),
                message: "wrong version".into(),
                wrong_version: Some(("trade-42".into(), 5, Some(0))),
            }),
        ),
    );
    add(
        "read-stream-request",
        3,
        Msg::Req(Request::ReadStream {
            stream: "trade-42".into(),
            from_version: 0,
            max: 10,
            direction: Direction::Forward,
        }),
    );
    add(
        "find-request",
        9,
        Msg::Req(Request::Find(FindQuery {
            field: Some((tally_engine::Field::Correlation, "c-1".into())),
            record_time: None,
            event_time: Some((EVENT_TIME, EVENT_TIME + 1)),
            from: 0,
            max: 100,
        })),
    );
    add(
        "subscribe-request",
        4,
        Msg::Req(Request::Subscribe {
            target: SubscribeTarget::All(Filter {
                stream_prefix: "trade-".into(),
                event_types: vec!["TradeNew".into()],
            }),
            from: SubscribeFrom::At(0),
            credit: 100,
        }),
    );
    add(
        "subscribe-response",
        4,
        Msg::Resp(op::SUBSCRIBE, Response::Subscribed { start: 0 }),
    );
    add(
        "caught-up-push",
        4,
        Msg::Resp(op::SUBSCRIBE, Response::SubCaughtUp(1)),
    );
    add(
        "credit-request",
        5,
        Msg::Req(Request::Credit {
            subscription: 4,
            credit: 50,
        }),
    );
    add("ping-request", 6, Msg::Req(Request::Ping(b"hi".to_vec())));
    add(
        "ping-response",
        6,
        Msg::Resp(op::PING, Response::Pong(b"hi".to_vec())),
    );
    add(
        "checkpoint-store-request",
        7,
        Msg::Req(Request::CheckpointStore {
            name: "pnl".into(),
            position: 1,
        }),
    );
    add(
        "consistency-proof-request",
        11,
        Msg::Req(Request::ConsistencyProof {
            old_size: 4,
            new_size: 7,
        }),
    );
    add(
        "consistency-proof-response",
        11,
        Msg::Resp(
            op::CONSISTENCY_PROOF,
            Response::ConsistencyProof(tally_server::protocol::ConsistencyResponse {
                old_size: 4,
                new_size: 7,
                old_root: [0xaa; 32],
                new_root: [0xbb; 32],
                path: vec![[0xcc; 32]],
            }),
        ),
    );
    add(
        "unknown-operation",
        8,
        Msg::Resp(
            0x7f,
            Response::Error(WireError::new(
                ErrorCode::UnknownOperation,
                "unknown opcode 0x7f",
            )),
        ),
    );
    // A blob uploaded in one piece, read back, and referred to by an append.
    let blob_bytes = b"Confirmation of trade 42".to_vec();
    let blob = tally_engine::format::blob::BlobRef::of(&blob_bytes).unwrap();
    add(
        "blob-put-request",
        7,
        Msg::Req(Request::BlobPut {
            offset: 0,
            total: blob.size,
            chunk: blob_bytes.clone(),
        }),
    );
    add(
        "blob-put-response",
        7,
        Msg::Resp(
            op::BLOB_PUT,
            Response::BlobPut {
                received: blob.size,
                blob: Some(blob),
            },
        ),
    );
    add(
        "blob-read-request",
        8,
        Msg::Req(Request::BlobRead {
            blob,
            offset: 0,
            max: 65536,
        }),
    );
    add(
        "blob-read-response",
        8,
        Msg::Resp(op::BLOB_READ, Response::BlobPiece(blob_bytes)),
    );
    add(
        "govern-request",
        10,
        Msg::Req(Request::Govern {
            request: r#"{"op":"hold_release","id":"case-7","actor":"legal","reason":"closed"}"#
                .into(),
        }),
    );
    add(
        "govern-response",
        10,
        Msg::Resp(op::GOVERN, Response::Governed(r#"{"position":412}"#.into())),
    );
    add(
        "append-blob-request",
        9,
        Msg::Req(Request::Append(AppendPart {
            stream: "trade-42".into(),
            expected: ExpectedVersion::Exact(0),
            events: vec![
                EventData::with_blob(
                    "ConfirmationAttached",
                    tally_engine::ContentType::Binary,
                    blob,
                )
                .with_id(EventId([0x42; 16]))
                .event_time(Timestamp(EVENT_TIME)),
            ],
        })),
    );
    // Frames with events, as the server's encoder writes them.
    let decode = |b: &[u8]| {
        Response::decode(&Bytes::copy_from_slice(&b[4..]))
            .unwrap()
            .1
    };
    let read = events_frame(op::READ_STREAM | op::RESPONSE_BIT, 3, Some((1, true)));
    let push = events_frame(op::SUB_EVENTS, 4, None);
    v.push((
        "read-stream-response",
        read.clone(),
        Msg::Raw(decode(&read)),
    ));
    v.push(("events-push", push.clone(), Msg::Raw(decode(&push))));
    v
}

fn hex_block(bytes: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in bytes.chunks(16).enumerate() {
        s.push_str(&format!("{:04x}:", i * 16));
        for b in chunk {
            s.push_str(&format!(" {b:02x}"));
        }
        s.push('\n');
    }
    s
}

/// `name -> bytes` for every example in the document.
fn doc_examples(doc: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line
            .trim()
            .strip_prefix("<!-- example: ")
            .and_then(|l| l.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next().map(str::trim),
            Some("```hex"),
            "example {name}"
        );
        let mut bytes = Vec::new();
        for l in lines.by_ref() {
            if l.trim() == "```" {
                break;
            }
            let (_, hex) = l.split_once(':').unwrap_or_else(|| panic!("{name}: {l}"));
            for h in hex.split_whitespace() {
                bytes.push(u8::from_str_radix(h, 16).unwrap_or_else(|_| panic!("{name}: {h}")));
            }
        }
        out.push((name.to_owned(), bytes));
    }
    out
}

#[test]
fn protocol_md_hex_examples_match_the_code() {
    let examples = examples();
    if std::env::var_os("TALLY_PRINT_EXAMPLES").is_some() {
        for (name, bytes, _) in &examples {
            println!(
                "<!-- example: {name} -->\n```hex\n{}```\n",
                hex_block(bytes)
            );
        }
    }
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
        .unwrap();
    let in_doc = doc_examples(&doc);
    assert!(!in_doc.is_empty(), "PROTOCOL.md has hex examples");
    for (name, bytes) in &in_doc {
        let (_, code_bytes, msg) = examples
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("PROTOCOL.md example {name} is not built by this test"));
        assert_eq!(
            bytes,
            code_bytes,
            "PROTOCOL.md example {name} differs from the code's encoding:\n{}",
            hex_block(code_bytes)
        );
        // And the bytes decode to the message.
        let len = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4, "{name}: the length field");
        let body = &bytes[4..];
        match msg {
            Msg::Req(r) => {
                let (h, payload) = protocol::split_frame(body).unwrap();
                assert_eq!(
                    &Request::decode(h.opcode, payload, 10_000).unwrap(),
                    r,
                    "{name}"
                );
            }
            Msg::Resp(_, r) | Msg::Raw(r) => {
                let (_, back) = Response::decode(&Bytes::copy_from_slice(body)).unwrap();
                assert_eq!(&back, r, "{name}");
            }
        }
    }
    for (name, _, _) in &examples {
        assert!(
            in_doc.iter().any(|(n, _)| n == name),
            "example {name} is missing from PROTOCOL.md"
        );
    }
}

#[test]
fn every_error_code_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md"))
        .unwrap();
    for c in ErrorCode::ALL {
        let row = format!("| {} | `{c:?}` |", c.as_u16());
        assert!(
            doc.contains(&row),
            "PROTOCOL.md error table lacks the row {row:?}"
        );
    }
}
