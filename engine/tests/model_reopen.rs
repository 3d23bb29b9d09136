//! Model test (proptest): random sequences of appends (every `ExpectedVersion` kind, batches,
//! multi-stream batches, retries of earlier batches), reads (by stream and by position, both
//! directions), stream info, clean reopen, simulated crash, and a crash with a torn write at
//! the tail, all checked against an in-memory model of the log. Small segments make the
//! sequences cross segment rolls and sealing.
//!
//! `PROPTEST_CASES=N` runs more cases.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use proptest::prelude::*;
use tally_engine::{
    AppendRequest, AppendResult, Direction, Durability, Error, EventData, EventId, ExpectedVersion,
    Log, Options, Position, RecordedEvent,
};

const STREAMS: usize = 5;

#[derive(Clone, Debug)]
enum Expect {
    Any,
    NoStream,
    StreamExists,
    /// The model's current version plus this offset (negative: stale).
    Exact(i8),
}

#[derive(Clone, Debug)]
enum Op {
    Append {
        stream: usize,
        expect: Expect,
        sizes: Vec<u16>,
    },
    Multi {
        a: usize,
        b: usize,
        ea: Expect,
        eb: Expect,
        sizes: (u16, u16),
    },
    /// Re-send the `n`th earlier successful batch (modulo the count).
    Retry {
        n: usize,
    },
    ReadStream {
        stream: usize,
        from: u8,
        max: u8,
        backward: bool,
    },
    ReadAll {
        from: u16,
        max: u8,
        backward: bool,
    },
    Info {
        stream: usize,
    },
    Reopen,
    Crash,
    CrashTorn {
        garbage: Vec<u8>,
    },
}

fn expect() -> impl Strategy<Value = Expect> {
    prop_oneof![
        2 => Just(Expect::Any),
        1 => Just(Expect::NoStream),
        1 => Just(Expect::StreamExists),
        3 => (-2i8..=1).prop_map(Expect::Exact),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..STREAMS, expect(), prop::collection::vec(0u16..1500, 1..4))
            .prop_map(|(stream, expect, sizes)| Op::Append { stream, expect, sizes }),
        2 => (0..STREAMS, 0..STREAMS, expect(), expect(), (0u16..800, 0u16..800))
            .prop_map(|(a, b, ea, eb, sizes)| Op::Multi { a, b, ea, eb, sizes }),
        2 => any::<usize>().prop_map(|n| Op::Retry { n }),
        3 => (0..STREAMS, any::<u8>(), 1u8..20, any::<bool>())
            .prop_map(|(stream, from, max, backward)| Op::ReadStream { stream, from, max, backward }),
        2 => (any::<u16>(), 1u8..40, any::<bool>())
            .prop_map(|(from, max, backward)| Op::ReadAll { from, max, backward }),
        1 => (0..STREAMS).prop_map(|stream| Op::Info { stream }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => prop::collection::vec(any::<u8>(), 1..200).prop_map(|garbage| Op::CrashTorn { garbage }),
    ]
}

#[derive(Clone, Debug, PartialEq)]
struct ModelEvent {
    stream: usize,
    version: u64,
    id: EventId,
    payload: Vec<u8>,
}

/// A batch that succeeded: what to send again, and what it returned.
#[derive(Clone, Debug)]
struct Sent {
    parts: Vec<(usize, Vec<EventData>)>,
    results: Vec<AppendResult>,
}

#[derive(Default)]
struct Model {
    events: Vec<ModelEvent>,
    versions: HashMap<usize, u64>,
    sent: Vec<Sent>,
    next_id: u64,
}

impl Model {
    fn expected(&self, stream: usize, e: &Expect) -> ExpectedVersion {
        match e {
            Expect::Any => ExpectedVersion::Any,
            Expect::NoStream => ExpectedVersion::NoStream,
            Expect::StreamExists => ExpectedVersion::StreamExists,
            Expect::Exact(d) => {
                let cur = self.versions.get(&stream).map_or(-1, |v| *v as i64);
                ExpectedVersion::Exact((cur + i64::from(*d)).max(0) as u64)
            }
        }
    }

    fn accepts(&self, stream: usize, e: ExpectedVersion) -> bool {
        let cur = self.versions.get(&stream).copied();
        match e {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => cur.is_none(),
            ExpectedVersion::StreamExists => cur.is_some(),
            ExpectedVersion::Exact(n) => cur == Some(n),
        }
    }

    fn events(&mut self, sizes: &[u16]) -> Vec<EventData> {
        sizes
            .iter()
            .map(|&n| {
                self.next_id += 1;
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&self.next_id.to_le_bytes());
                let payload = (0..n)
                    .map(|i| (i as u8) ^ (self.next_id as u8))
                    .collect::<Vec<u8>>();
                EventData::new("E", payload)
                    .with_id(EventId(id))
                    .actor("model")
            })
            .collect()
    }

    fn apply(&mut self, parts: &[(usize, Vec<EventData>)]) -> Vec<AppendResult> {
        let mut results = Vec::new();
        for (stream, events) in parts {
            let first_version = self.versions.get(stream).map_or(0, |v| v + 1);
            let first_position = Position(self.events.len() as u64);
            for (i, e) in events.iter().enumerate() {
                self.events.push(ModelEvent {
                    stream: *stream,
                    version: first_version + i as u64,
                    id: e.event_id.unwrap(),
                    payload: e.payload.clone(),
                });
            }
            let last_version = first_version + events.len() as u64 - 1;
            self.versions.insert(*stream, last_version);
            results.push(AppendResult {
                first_position,
                last_position: Position(self.events.len() as u64 - 1),
                first_version,
                last_version,
            });
        }
        self.sent.push(Sent {
            parts: parts.to_vec(),
            results: results.clone(),
        });
        results
    }
}

fn name(stream: usize) -> String {
    format!("trade-{stream}")
}

fn same(got: &[RecordedEvent], want: &[(u64, &ModelEvent)]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), want.len());
    for (g, (pos, w)) in got.iter().zip(want) {
        prop_assert_eq!(g.position, Position(*pos));
        prop_assert_eq!(&g.stream(), &name(w.stream));
        prop_assert_eq!(g.version, w.version);
        prop_assert_eq!(g.event_id, w.id);
        prop_assert_eq!(&g.payload(), &w.payload);
    }
    Ok(())
}

fn append(
    log: &Log,
    model: &mut Model,
    parts: Vec<(usize, ExpectedVersion, Vec<EventData>)>,
) -> Result<(), TestCaseError> {
    let names: Vec<String> = parts.iter().map(|p| name(p.0)).collect();
    let requests: Vec<AppendRequest<'_>> = parts
        .iter()
        .zip(&names)
        .map(|((_, e, evs), n)| AppendRequest {
            stream: n,
            expected: *e,
            events: evs,
        })
        .collect();
    let got = log.append_multi(&requests);
    let distinct = parts.len() < 2 || parts[0].0 != parts[1].0;
    if !distinct {
        prop_assert!(matches!(got, Err(Error::InvalidAppend { .. })), "{:?}", got);
        return Ok(());
    }
    let ok = parts.iter().all(|(s, e, _)| model.accepts(*s, *e));
    if ok {
        let want = model.apply(
            &parts
                .into_iter()
                .map(|(s, _, e)| (s, e))
                .collect::<Vec<_>>(),
        );
        prop_assert_eq!(got.map_err(|e| e.to_string()), Ok(want));
    } else {
        prop_assert!(
            matches!(got, Err(Error::WrongExpectedVersion { .. })),
            "{:?}",
            got
        );
    }
    Ok(())
}

fn torn_tail(log: &Log, garbage: &[u8]) {
    let last = log.segments().pop().expect("a log has an active segment");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last.path)
        .unwrap();
    let room = (f.metadata().unwrap().len() - 4096).saturating_sub(last.data_end) as usize;
    let n = garbage.len().min(room);
    // Like a torn write: the bytes land where the next record would have gone.
    f.write_all_at(&garbage[..n], last.data_end).unwrap();
}

fn run(ops: Vec<Op>, durability: Durability) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        segment_bytes: 64 * 1024,
        durability,
        ..Options::default()
    };
    let mut log = Log::open(dir.path(), opts.clone()).unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append {
                stream,
                expect,
                sizes,
            } => {
                let e = model.expected(stream, &expect);
                let events = model.events(&sizes);
                append(&log, &mut model, vec![(stream, e, events)])?;
            }
            Op::Multi {
                a,
                b,
                ea,
                eb,
                sizes,
            } => {
                let (xa, xb) = (model.expected(a, &ea), model.expected(b, &eb));
                let (va, vb) = (model.events(&[sizes.0]), model.events(&[sizes.1]));
                append(&log, &mut model, vec![(a, xa, va), (b, xb, vb)])?;
            }
            Op::Retry { n } => {
                if model.sent.is_empty() {
                    continue;
                }
                let sent = model.sent[n % model.sent.len()].clone();
                let names: Vec<String> = sent.parts.iter().map(|p| name(p.0)).collect();
                let requests: Vec<AppendRequest<'_>> = sent
                    .parts
                    .iter()
                    .zip(&names)
                    .map(|((_, evs), n)| AppendRequest {
                        stream: n,
                        expected: ExpectedVersion::Any,
                        events: evs,
                    })
                    .collect();
                let got = log.append_multi(&requests).map_err(|e| e.to_string());
                prop_assert_eq!(
                    got,
                    Ok(sent.results.clone()),
                    "a retry returns the original result"
                );
            }
            Op::ReadStream {
                stream,
                from,
                max,
                backward,
            } => {
                let from = u64::from(from);
                let dir = if backward {
                    Direction::Backward
                } else {
                    Direction::Forward
                };
                let got = log
                    .read_stream(&name(stream), from, usize::from(max), dir)
                    .unwrap();
                let mut want: Vec<(u64, &ModelEvent)> = model
                    .events
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| {
                        e.stream == stream
                            && if backward {
                                e.version <= from
                            } else {
                                e.version >= from
                            }
                    })
                    .map(|(p, e)| (p as u64, e))
                    .collect();
                if backward {
                    want.reverse();
                }
                want.truncate(usize::from(max));
                same(&got, &want)?;
            }
            Op::ReadAll {
                from,
                max,
                backward,
            } => {
                let n = model.events.len() as u64;
                let from = u64::from(from) % (n + 2);
                let dir = if backward {
                    Direction::Backward
                } else {
                    Direction::Forward
                };
                let got = log.read_all(Position(from), usize::from(max), dir).unwrap();
                let want: Vec<(u64, &ModelEvent)> = if backward {
                    (0..n.min(from + 1))
                        .rev()
                        .take(usize::from(max))
                        .map(|p| (p, &model.events[p as usize]))
                        .collect()
                } else {
                    (from..n)
                        .take(usize::from(max))
                        .map(|p| (p, &model.events[p as usize]))
                        .collect()
                };
                same(&got, &want)?;
            }
            Op::Info { stream } => {
                let got = log.stream_info(&name(stream)).unwrap();
                let first = model.events.iter().position(|e| e.stream == stream);
                let last = model.events.iter().rposition(|e| e.stream == stream);
                match (got, first, last) {
                    (None, None, None) => {}
                    (Some(info), Some(f), Some(l)) => {
                        prop_assert_eq!(info.first_position, Position(f as u64));
                        prop_assert_eq!(info.last_position, Position(l as u64));
                        prop_assert_eq!(info.last_version, model.versions[&stream]);
                    }
                    (got, f, _) => prop_assert!(false, "info {:?} vs model first {:?}", got, f),
                }
            }
            Op::Reopen => {
                log.close().unwrap();
                log = Log::open(dir.path(), opts.clone()).unwrap();
                prop_assert!(log.recovery_report().clean);
            }
            Op::Crash => {
                log.crash();
                log = Log::open(dir.path(), opts.clone()).unwrap();
                prop_assert!(
                    log.recovery_report().truncations.is_empty(),
                    "{:?}",
                    log.recovery_report()
                );
            }
            Op::CrashTorn { garbage } => {
                let l = std::mem::replace(
                    &mut log,
                    Log::open(tempfile::tempdir().unwrap().path(), opts.clone()).unwrap(),
                );
                torn_tail(&l, &garbage);
                l.crash();
                log = Log::open(dir.path(), opts.clone()).unwrap();
                let report = log.recovery_report();
                prop_assert!(
                    report.truncations.iter().all(|t| !t.acknowledged_data_lost),
                    "{:?}",
                    report
                );
            }
        }
        prop_assert_eq!(log.next_position(), Position(model.events.len() as u64));
    }
    let v = log.verify().unwrap();
    prop_assert_eq!(v.records, model.events.len() as u64);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..60), fsync in prop::bool::weighted(0.25)) {
        let durability = if fsync { Durability::Fsync } else { Durability::None };
        run(ops, durability)?;
    }
}
