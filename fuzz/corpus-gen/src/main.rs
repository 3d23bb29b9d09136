//! Writes the seed corpora of the fuzz targets, `fuzz/corpus/<target>/<name>`, from real
//! encodings: records, segments, index and attribute sidecars, pages and identity files
//! of real logs of both format versions (made on the simulated disk, byte for byte what
//! the OS backend writes), evidence of a real log, protocol frames, and `log_ops`
//! operation sequences. Files are overwritten by name; files it does not name are left
//! alone (a regression input added by hand stays).
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml -p tally-corpus-gen -- fuzz/corpus
//! ```
//!
//! Logs get fresh ids and keys on every run, so the bytes differ from run to run; the
//! structure they exercise does not.

use std::path::{Path, PathBuf};

use tally_engine::format::record::{Layout, RecordHeader};
use tally_engine::fuzzing::log_ops_input::{
    AUTO_CHECKPOINTS, AfterFailure, CHECKPOINT_EVERY_8, CHECKPOINT_EVERY_32, Cut, Event, Expect,
    FORMAT_V1, INDEX_ATTRIBUTES, Id, LogOpsInput, Retry,
};
use tally_engine::sim::{FaultKind, FaultOp, SimFs};
use tally_engine::{EventData, ExpectedVersion, Log, Options, Query, Storage};

/// Size of a segment's header page, and of its footer page.
const PAGE: usize = 4096;

fn main() {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".to_owned()),
    );
    let mut total = 0;
    for (target, files) in [
        ("decode_record", decode_record()),
        ("recover_segment", recover_segment()),
        ("open_index", open_index()),
        ("open_attrs", open_attrs()),
        ("decode_pages", decode_pages()),
        ("decode_evidence", decode_evidence()),
        ("decode_frame", decode_frame()),
        ("log_ops", log_ops()),
    ] {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (name, bytes) in files {
            std::fs::write(dir.join(name), &bytes).expect("write a corpus file");
            total += bytes.len();
            println!("{target}/{name}: {} bytes", bytes.len());
        }
    }
    println!("{total} bytes in all");
}

/// The files of a small real log: 64 KiB segments, the first sealed with its sidecars.
struct RealLog {
    layout: Layout,
    log_id: [u8; 16],
    /// The first (sealed) segment.
    segment: Vec<u8>,
    index: Vec<u8>,
    attrs: Option<Vec<u8>>,
    meta: Vec<u8>,
}

/// A log of `format_version` with `events` events over `streams` streams, each with a
/// payload of `payload_bytes`.
fn real_log(format_version: u16, streams: u32, events: u32, payload_bytes: usize) -> RealLog {
    let sim = SimFs::new(u64::from(format_version) << 32 | u64::from(streams));
    let dir = Path::new("/corpus/log");
    let log = Log::open(
        dir,
        Options {
            storage: Storage::simulated(&sim),
            segment_bytes: 64 * 1024,
            format_version,
            ..Options::default()
        },
    )
    .expect("open a log on the simulated disk");
    for i in 0..events {
        let e = if payload_bytes == 0 {
            EventData::json("TradeNew", format!("{{\"i\":{i}}}"))
        } else {
            EventData::new("TradeAmended", vec![i as u8; payload_bytes])
        };
        let e = e
            .actor("fuzz")
            .correlation_id(format!("c-{}", i % 3))
            .causation_id("k");
        log.append(&format!("s-{}", i % streams), ExpectedVersion::Any, &[e])
            .expect("append");
    }
    log.wait_sealed().expect("seal");
    // A lookup writes the sealed segments' attribute indexes.
    log.find(&Query::all().limit(1)).expect("find");
    let log_id = log.log_id();
    log.close().expect("close");
    let read = |name: &str| sim.read_written(&dir.join(name));
    RealLog {
        layout: Layout::of_version(format_version).expect("a known format version"),
        log_id,
        segment: read("00000000000000000000.seg").expect("the first segment"),
        index: read("00000000000000000000.idx").expect("its index sidecar"),
        attrs: read("00000000000000000000.adx"),
        meta: read("tally.meta").expect("the identity file"),
    }
}

fn v2() -> &'static RealLog {
    static LOG: std::sync::OnceLock<RealLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| real_log(2, 9, 400, 0))
}

fn v1() -> &'static RealLog {
    static LOG: std::sync::OnceLock<RealLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| real_log(1, 9, 400, 0))
}

/// One stream, binary payloads of 700 bytes: long runs in the index, few records a page.
fn one_stream() -> &'static RealLog {
    static LOG: std::sync::OnceLock<RealLog> = std::sync::OnceLock::new();
    LOG.get_or_init(|| real_log(2, 1, 100, 700))
}

impl RealLog {
    /// The byte that makes the record decoders read this log's layout.
    fn pick(&self) -> u8 {
        match self.layout {
            Layout::V1 => 0,
            _ => 1,
        }
    }

    /// The record area: from the header page to the footer page.
    fn records(&self) -> &[u8] {
        &self.segment[PAGE..self.segment.len() - PAGE]
    }

    /// Where each of the first `n` records ends in the record area.
    fn record_ends(&self, n: usize) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut at = 0;
        for _ in 0..n {
            let h = RecordHeader::decode_in(&self.records()[at..], self.layout)
                .expect("a real record header");
            at += h.record_len() as usize;
            ends.push(at);
        }
        ends
    }

    /// `recover_segment`'s input: the layout byte, the log id, the records.
    fn area(&self, records: &[u8]) -> Vec<u8> {
        [&[self.pick()][..], &self.log_id, records].concat()
    }
}

type Files = Vec<(&'static str, Vec<u8>)>;

fn decode_record() -> Files {
    let first = |l: &RealLog| {
        let end = l.record_ends(1)[0];
        [&[l.pick()][..], &l.records()[..end]].concat()
    };
    vec![
        ("v2-json-record", first(v2())),
        ("v1-json-record", first(v1())),
        ("v2-binary-record", first(one_stream())),
    ]
}

fn recover_segment() -> Files {
    let l = v2();
    let ends = l.record_ends(6);
    let torn = ends[4] + (ends[5] - ends[4]) / 2;
    let zeros_after = [&l.records()[..ends[2]], &[0u8; PAGE][..]].concat();
    let v1_ends = v1().record_ends(3);
    vec![
        ("v2-sealed-segment", l.area(l.records())),
        ("v2-three-records", l.area(&l.records()[..ends[2]])),
        ("v2-torn-sixth-record", l.area(&l.records()[..torn])),
        ("v2-zeros-after-records", l.area(&zeros_after)),
        ("v1-three-records", v1().area(&v1().records()[..v1_ends[2]])),
    ]
}

fn open_index() -> Files {
    vec![
        ("v2-nine-streams.idx", v2().index.clone()),
        ("v1-nine-streams.idx", v1().index.clone()),
        ("v2-one-stream.idx", one_stream().index.clone()),
    ]
}

fn open_attrs() -> Files {
    let mut files = Vec::new();
    for (name, l) in [
        ("v2-nine-streams.adx", v2()),
        ("v1-nine-streams.adx", v1()),
        ("v2-one-stream.adx", one_stream()),
    ] {
        if let Some(a) = &l.attrs {
            files.push((name, a.clone()));
        }
    }
    assert!(!files.is_empty(), "the logs wrote attribute sidecars");
    files
}

fn decode_pages() -> Files {
    let header = |l: &RealLog| l.segment[..PAGE].to_vec();
    let footer = |l: &RealLog| l.segment[l.segment.len() - PAGE..].to_vec();
    vec![
        ("v2-header-page", header(v2())),
        ("v2-footer-page", footer(v2())),
        ("v2-tally.meta", v2().meta.clone()),
        ("v1-header-page", header(v1())),
        ("v1-footer-page", footer(v1())),
        ("v1-tally.meta", v1().meta.clone()),
    ]
}

/// Each prefixed with the byte that picks its decoder in `decode_evidence`.
fn decode_evidence() -> Files {
    use tally_engine::format::checkpoint::SigningKey;
    use tally_engine::format::note::{Cosignature, CosignatureEntry, checkpoint_note};
    use tally_engine::format::producer::{ProducerBlock, ProducerSignature};
    let sim = SimFs::new(7);
    let log = Log::open(
        "/corpus/evidence",
        Options {
            storage: Storage::simulated(&sim),
            ..Options::default()
        },
    )
    .expect("open");
    log.append("s-1", ExpectedVersion::Any, &[EventData::json("E", "{}")])
        .expect("append");
    let cp = log.checkpoint().expect("checkpoint");
    let witness = SigningKey::from_bytes(&[9; 32]);
    let body = log
        .checkpoint_note(None)
        .expect("note")
        .expect("a checkpoint")
        .body;
    let cosig = Cosignature::sign(&witness, "witness.example/1", 1_700_000_000, &body);
    let note = checkpoint_note(&cp, std::slice::from_ref(&cosig));
    let entry = CosignatureEntry {
        checkpoint_id: cp.statement.id,
        tree_size: cp.statement.tree_size,
        root: cp.statement.root,
        cosignature: cosig.clone(),
    };
    let producer = ProducerBlock {
        signature: ProducerSignature::sign(
            &SigningKey::from_bytes(&[7; 32]),
            &log.log_id(),
            &[[1; 32], [2; 32]],
        ),
        event_count: 2,
    };
    log.close().expect("close");
    let with = |pick: u8, bytes: &[u8]| [&[pick][..], bytes].concat();
    vec![
        ("checkpoint-note", with(0, note.encode().as_bytes())),
        ("witness-key", with(1, cosig.witness().encode().as_bytes())),
        ("cosignature-entry", with(2, &entry.encode())),
        ("checkpoint-entry", with(3, &cp.encode_entry())),
        ("producer-block", with(4, &producer.encode())),
    ]
}

/// Frames as `check_decoders` takes them: without the 4-byte length.
fn decode_frame() -> Files {
    use tally_engine::{AppendResult, Direction, EventId, Field, Position, Timestamp};
    use tally_server::protocol::{
        AppendPart, Filter, FindQuery, LENGTH_BYTES, Request, Response, SubscribeFrom,
        SubscribeTarget, WireError, finish_frame, op, put_recorded, start_frame,
    };
    let event = EventData::json("TradeNew", r#"{"qty":"100"}"#)
        .aggregate_type("Trade")
        .actor("alice")
        .correlation_id("c-1")
        .causation_id("k-1")
        .schema_version(3)
        .with_id(EventId([7; 16]))
        .event_time(Timestamp(1_700_000_000_000_000_000));
    let part = AppendPart {
        stream: "trade-1".into(),
        expected: ExpectedVersion::Exact(4),
        events: vec![event, EventData::new("X", vec![1, 2, 3])],
    };
    let filter = Filter {
        stream_prefix: "trade-".into(),
        event_types: vec!["TradeNew".into()],
    };
    let request = |r: Request| {
        let mut out = Vec::new();
        r.encode(1, &mut out);
        out.split_off(LENGTH_BYTES)
    };
    let response = |opcode: u8, r: Response| {
        let mut out = Vec::new();
        r.encode(opcode, 1, &mut out);
        out.split_off(LENGTH_BYTES)
    };
    let result = AppendResult {
        first_position: Position(10),
        last_position: Position(11),
        first_version: 5,
        last_version: 6,
    };
    // READ_STREAM's response with two real events: next, end, count, then the events
    // (docs/PROTOCOL.md); `Response::Events` holds only decoded events.
    let events = {
        let l = one_stream_events();
        let mut out = Vec::new();
        let start = start_frame(&mut out, op::READ_STREAM | op::RESPONSE_BIT, 1);
        out.extend_from_slice(&2u64.to_le_bytes());
        out.push(1);
        out.extend_from_slice(&(l.len() as u32).to_le_bytes());
        for e in &l {
            put_recorded(&mut out, e);
        }
        finish_frame(&mut out, start);
        out.split_off(LENGTH_BYTES)
    };
    vec![
        (
            "hello",
            request(Request::Hello {
                min_version: 1,
                max_version: 1,
                client: "fuzz".into(),
            }),
        ),
        ("ping", request(Request::Ping(b"hi".to_vec()))),
        ("append", request(Request::Append(part.clone()))),
        (
            "append-multi",
            request(Request::AppendMulti(vec![
                part.clone(),
                AppendPart {
                    stream: "trade-2".into(),
                    expected: ExpectedVersion::NoStream,
                    ..part
                },
            ])),
        ),
        (
            "read-stream",
            request(Request::ReadStream {
                stream: "trade-1".into(),
                from_version: u64::MAX,
                max: 10,
                direction: Direction::Backward,
            }),
        ),
        (
            "read-all",
            request(Request::ReadAll {
                from: 5,
                max: 100,
                direction: Direction::Forward,
                filter: filter.clone(),
            }),
        ),
        (
            "find",
            request(Request::Find(FindQuery {
                field: Some((Field::Correlation, "c-1".into())),
                record_time: None,
                event_time: Some((10, 20)),
                from: 3,
                max: 50,
            })),
        ),
        (
            "subscribe",
            request(Request::Subscribe {
                target: SubscribeTarget::All(filter),
                from: SubscribeFrom::At(9),
                credit: 100,
            }),
        ),
        (
            "checkpoint-store",
            request(Request::CheckpointStore {
                name: "proj".into(),
                position: 77,
            }),
        ),
        (
            "response-appended",
            response(op::APPEND, Response::Appended(result)),
        ),
        (
            "response-appended-multi",
            response(
                op::APPEND_MULTI,
                Response::AppendedMulti(vec![result, result]),
            ),
        ),
        ("response-events", events),
        (
            "response-error",
            response(
                op::APPEND,
                Response::Error(WireError {
                    code: 3,
                    message: "wrong expected version".into(),
                    wrong_version: Some(("trade-1".into(), 4, Some(6))),
                }),
            ),
        ),
    ]
}

/// Two events read back from a real log.
fn one_stream_events() -> Vec<tally_engine::RecordedEvent> {
    let sim = SimFs::new(11);
    let log = Log::open(
        "/corpus/events",
        Options {
            storage: Storage::simulated(&sim),
            ..Options::default()
        },
    )
    .expect("open");
    let e = |t: &str| {
        EventData::json(t, r#"{"qty":"100"}"#)
            .actor("alice")
            .correlation_id("c-1")
    };
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[e("TradeNew"), e("TradeAmended")],
    )
    .expect("append");
    let evs = log
        .read_stream("trade-1", 0, 2, tally_engine::Direction::Forward)
        .expect("read");
    log.close().expect("close");
    evs
}

fn log_ops() -> Files {
    let small = |b: &[u8]| Event::small(b);
    let large = |len: usize, seed: u8| Event::large(len, seed);
    let options = INDEX_ATTRIBUTES | AUTO_CHECKPOINTS | CHECKPOINT_EVERY_32;
    vec![
        (
            "appends-reads-reopen",
            LogOpsInput::new(1, options)
                .append(0, Expect::NoStream, &[small(b"one"), small(b"two")])
                .append(1, Expect::Right, &[small(b"{}")])
                .append(0, Expect::Right, &[small(b"3"), large(64, 1), small(b"")])
                .read_stream(0, 0, 0, false)
                .read_stream(0, 255, 3, true)
                .read_all(0, 0, false)
                .read_all(255, 4, true)
                .find(false, 0, 8)
                .find(true, 0, 8)
                .close()
                .append(1, Expect::Right, &[small(b"after reopen")])
                .read_all(2, 0, false)
                .into_bytes(),
        ),
        (
            "retries-and-duplicates",
            LogOpsInput::new(2, options)
                .append(0, Expect::NoStream, &[small(b"a"), small(b"b")])
                .retry(0, Retry::AsSent)
                .retry(0, Retry::Right)
                .retry(0, Retry::Grown(small(b"c")))
                .append(1, Expect::Any, &[small(b"d").with_id(Id::Reuse(0))])
                .append(0, Expect::Exact(7), &[small(b"wrong version")])
                .append(0, Expect::StreamExists, &[])
                .append(0, Expect::Any, &[small(b"x").with_id(Id::Fixed(1))])
                .append(2, Expect::Any, &[small(b"y").with_id(Id::Fixed(1))])
                .append_multi(&[
                    (2, Expect::Right, vec![small(b"m1")]),
                    (2, Expect::Right, vec![small(b"same stream twice")]),
                ])
                .crash()
                .retry(1, Retry::AsSent)
                .into_bytes(),
        ),
        (
            "multi-stream-appends",
            LogOpsInput::new(3, options)
                .append_multi(&[
                    (0, Expect::NoStream, vec![small(b"p"), small(b"q")]),
                    (3, Expect::NoStream, vec![small(b"r")]),
                    (4, Expect::Any, vec![large(512, 2)]),
                ])
                .append_multi(&[
                    (0, Expect::Right, vec![small(b"s")]),
                    (
                        3,
                        Expect::Right,
                        vec![small(b"t"), small(b"u"), small(b"v")],
                    ),
                ])
                .retry(0, Retry::AsSent)
                .retry(1, Retry::Any)
                .power_cut(Cut::Clean)
                .read_stream(3, 0, 0, false)
                .into_bytes(),
        ),
        ("segment-rolls-and-seals", {
            let mut i = LogOpsInput::new(4, INDEX_ATTRIBUTES | CHECKPOINT_EVERY_8);
            for k in 0..20u8 {
                let events: Vec<Event> = (0..4).map(|j| large(4096, k * 4 + j)).collect();
                i = i.append(k % 5, Expect::Any, &events);
            }
            i.wait_sealed()
                .checkpoint()
                .crash()
                .read_all(100, 0, true)
                .find(false, 1, 31)
                .close()
                .into_bytes()
        }),
        ("power-cuts", {
            let mut i = LogOpsInput::new(5, options);
            for (k, cut) in [
                Cut::SeededLoss,
                Cut::Clean,
                Cut::KeepAll,
                Cut::Partial {
                    pages: 128,
                    entries: 64,
                    torn: true,
                },
            ]
            .into_iter()
            .enumerate()
            {
                i = i
                    .append(k as u8, Expect::Right, &[large(2048, k as u8), small(b"x")])
                    .append(4, Expect::Any, &[large(4096, 9)])
                    .power_cut(cut);
            }
            i.into_bytes()
        }),
        (
            "power-cut-mid-append",
            LogOpsInput::new(6, options)
                .append(0, Expect::NoStream, &[large(1024, 1)])
                .arm_cut(1, Cut::SeededLoss)
                .append(0, Expect::Right, &[large(1024, 2), large(1024, 3)])
                .after_failure(AfterFailure::PowerCut(Cut::SeededLoss))
                .append(1, Expect::Any, &[small(b"after")])
                .arm_cut(3, Cut::KeepAll)
                .checkpoint()
                .after_failure(AfterFailure::Crash)
                .read_all(0, 0, false)
                .into_bytes(),
        ),
        (
            "sync-failure",
            LogOpsInput::new(7, options)
                .append(0, Expect::NoStream, &[small(b"kept")])
                .inject_sync_failure()
                .append(0, Expect::Right, &[small(b"unknown")])
                .after_failure(AfterFailure::Crash)
                .read_stream(0, 0, 0, false)
                .append(0, Expect::Right, &[small(b"next")])
                .into_bytes(),
        ),
        (
            "disk-faults",
            LogOpsInput::new(8, options)
                .append(0, Expect::NoStream, &[small(b"a")])
                .fault(FaultOp::Sync, FaultKind::Eio, Some(".seg"), 0, 1)
                .append(0, Expect::Right, &[small(b"b")])
                .after_failure(AfterFailure::PowerCut(Cut::Clean))
                .fault(FaultOp::Create, FaultKind::NoSpace, None, 0, 2)
                .append(1, Expect::Any, &[large(4096, 1), large(4096, 2)])
                .after_failure(AfterFailure::CarryOn)
                .fault(FaultOp::Write, FaultKind::ShortWrite, Some(".idx"), 0, 1)
                .fault(FaultOp::Rename, FaultKind::Eio, Some("streams.snap"), 0, 1)
                .close()
                .into_bytes(),
        ),
        (
            "format-v1",
            LogOpsInput::new(9, FORMAT_V1 | options)
                .append(0, Expect::NoStream, &[small(b"v1"), large(3008, 4)])
                .append_multi(&[
                    (1, Expect::NoStream, vec![small(b"m")]),
                    (2, Expect::NoStream, vec![small(b"n")]),
                ])
                .checkpoint()
                .power_cut(Cut::SeededLoss)
                .retry(0, Retry::AsSent)
                .read_stream(0, 1, 0, true)
                .into_bytes(),
        ),
    ]
}
