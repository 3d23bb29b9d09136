//! Entry points for the fuzz targets in `fuzz/` (and their smoke run in the test suite).
//! Each takes arbitrary bytes, must never panic except on a broken invariant it asserts,
//! and checks that whatever decodes re-encodes to the same bytes. [`log_ops`] reads its
//! bytes as operations on a whole log over a simulated disk instead, and checks the log
//! against a model of what was acknowledged.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::format::envelope::{EnvelopeRef, PayloadForm};
use crate::format::meta::LogMeta;
use crate::format::record::{Layout, RECORD_HEADER_MAX, RecordHeader};
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{Position, chain};
use crate::index::{SealedIndex, stream_hash};
use crate::segment::{ScanFrom, SliceSource, find_durable_evidence, scan};

pub use log_ops::{LogOpsOutcome, OPS_MAX, log_ops};

/// A record header of either layout (the first byte chooses), then its body and
/// envelope. Returns whether the whole record decoded (so that a test on real bytes can
/// show the round trips were reached).
pub fn decode_record(data: &[u8]) -> bool {
    let Some((&pick, data)) = data.split_first() else {
        return false;
    };
    let layout = match pick & 3 {
        0 => Layout::V1,
        1 => Layout::V2,
        2 => Layout::V3,
        // Version 5 reads everything versions 3 and 4 add (blobs, pruned bodies) and
        // sealed payloads.
        _ => Layout::V5,
    };
    let Ok(h) = RecordHeader::decode_in(data, layout) else {
        return false;
    };
    let len = layout.header_len();
    let mut again = [0u8; RECORD_HEADER_MAX];
    assert_eq!(h.encode_into(&mut again), len);
    assert_eq!(&again[..len], &data[..len], "header re-encodes differently");
    let Some(body) = data.get(len..len + h.body_len as usize) else {
        return false;
    };
    if h.check_body(body).is_err() {
        return false;
    }
    let Ok(env) = EnvelopeRef::decode_in(body, layout) else {
        return false;
    };
    // A blob reference only where the layout allows one, and then a valid one.
    assert!(env.payload_form == PayloadForm::Inline || layout.allows_blobs());
    assert!(env.payload_form != PayloadForm::Sealed || layout.allows_sealing());
    assert_eq!(env.payload_form == PayloadForm::Blob, env.blob().is_some());
    if env.payload_form == PayloadForm::Sealed {
        // A decoded envelope's sealed payload decodes, and its parts fit in it.
        let s = crate::format::sealed::decode(env.payload).expect("checked with the envelope");
        assert_eq!(
            s.head.len() + s.ciphertext.len(),
            env.payload.len(),
            "the sealed parts cover the payload"
        );
        let _ = s.field_names();
    }
    let mut out = Vec::new();
    env.encode_into(&mut out)
        .expect("a decoded envelope is within limits");
    assert_eq!(out, body, "envelope re-encodes differently");
    true
}

/// An index sidecar, then every lookup it offers.
pub fn open_index(data: &[u8]) -> bool {
    let Ok(idx) = SealedIndex::open(Arc::new(data.to_vec())) else {
        return false;
    };
    for s in idx.stream_summaries() {
        let run = idx.find_stream(stream_hash(&s.name), &s.name);
        // A sidecar whose hashes do not match its names (a CRC-valid lie) finds nothing;
        // one that matches must find every stream.
        if let Some(run) = run {
            for i in 0..=(run.last_version - run.first_version).min(64) {
                let _ = idx.run_entry(&run, i as u32);
            }
        }
    }
    let base = idx.base_position().0;
    for p in [
        base,
        base + 1,
        base + idx.record_count() / 2,
        base + idx.record_count(),
    ] {
        let _ = idx.locate(Position(p));
    }
    for i in 0..idx.record_count().min(64) {
        let _ = idx.event_id(i);
    }
    true
}

/// An attribute index sidecar, as given and with its trailing CRC made right (so that the
/// checks after the checksum are reached), then every lookup it offers.
pub fn open_attrs(data: &[u8]) -> bool {
    use crate::format::Timestamp;
    use crate::index::attrs::{ATTR_TRAILER_LEN, AttrSource, Field, SealedAttrs};
    let mut fixed = data.to_vec();
    if fixed.len() >= ATTR_TRAILER_LEN {
        let end = fixed.len() - ATTR_TRAILER_LEN;
        let crc = crc32fast::hash(&fixed[..end]);
        fixed[end..].copy_from_slice(&crc.to_le_bytes());
    }
    let mut opened = false;
    for bytes in [data.to_vec(), fixed] {
        let Ok(a) = SealedAttrs::open(Arc::new(bytes.clone())) else {
            continue;
        };
        opened = true;
        let n = a.record_count();
        let to = u32::try_from(n).unwrap_or(u32::MAX);
        // Hashes to look up: whatever 8-byte values the file holds at a few places.
        let probes: Vec<u64> = (0..8)
            .filter_map(|k| {
                let at = (bytes.len() / 8) * k;
                bytes
                    .get(at..at + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
            })
            .collect();
        for field in Field::ALL {
            for &h in &probes {
                let mut seen = 0u64;
                a.each_key(field, h, 0, to, &mut |hit| {
                    assert!(u64::from(hit.0) < n, "a hit outside the records");
                    seen += 1;
                    true
                });
                assert_eq!(seen, a.count_key(field, h, 0, to), "count and visit differ");
            }
        }
        let mut times = 0u64;
        a.each_event_time(Timestamp(0), Timestamp(u64::MAX), &mut |_| times += 1);
        assert_eq!(times, n, "every record has an event time");
        assert_eq!(a.count_event_time(Timestamp(0), Timestamp(u64::MAX)), n);
        for &h in &probes {
            a.each_type_event_time(h, Timestamp(0), Timestamp(u64::MAX), &mut |_| {});
            let _ = a.first_at_or_after(Timestamp(h));
        }
    }
    opened
}

/// Segment header and footer pages and the identity file. Returns how many of the three
/// decoded.
pub fn decode_pages(data: &[u8]) -> usize {
    let mut decoded = 0;
    if let Ok(h) = SegmentHeader::decode_page(data) {
        decoded += 1;
        assert_eq!(
            h.encode_page(),
            data[..4096],
            "header page re-encodes differently"
        );
    }
    if let Ok(f) = SegmentFooter::decode_page(data) {
        decoded += 1;
        assert_eq!(
            f.encode_page(),
            data[..4096],
            "footer page re-encodes differently"
        );
    }
    if let Ok(m) = LogMeta::decode(data) {
        decoded += 1;
        assert_eq!(
            &m.encode()[..],
            data,
            "identity file re-encodes differently"
        );
    }
    decoded
}

/// Bytes as a segment's record area, of either layout (the first byte chooses), chained
/// from the log id in the next 16 bytes: the scan yields a chain of valid records, in
/// order, within the bytes, and the evidence search stays in bounds. Returns the records
/// the scan accepted.
pub fn recover_segment(data: &[u8]) -> usize {
    let Some((&pick, data)) = data.split_first() else {
        return 0;
    };
    let Some((log_id, data)) = data.split_first_chunk::<16>() else {
        return 0;
    };
    let layout = match pick & 3 {
        0 | 2 => Layout::V1,
        1 => Layout::V2,
        _ => Layout::V3,
    };
    let seed = chain::chain_seed(log_id);
    let from = ScanFrom {
        layout,
        offset: 0,
        position: Position(0),
        chain: seed,
    };
    let limit = data.len() as u64;
    let s = scan(&mut SliceSource { bytes: data }, from, limit);
    let mut expect_offset = 0;
    for (i, r) in s.records.iter().enumerate() {
        assert_eq!(r.header.position, Position(i as u64));
        assert_eq!(r.offset, expect_offset);
        expect_offset = r.offset + r.header.record_len();
    }
    assert!(s.complete <= s.records.len());
    assert!(s.complete_end <= limit);
    let _ = find_durable_evidence(
        &mut SliceSource { bytes: data },
        layout,
        s.complete_end,
        limit,
        Position(s.complete as u64),
    );
    s.records.len()
}

/// The evidence formats that come from outside the log's own writer (docs/FORMAT.md 17):
/// signed notes and checkpoint bodies (kept files, a witness's state, a server's answer),
/// witness keys, cosignature and checkpoint entries, and producer blocks (the first byte
/// chooses). Each must decode without panicking, and whatever decodes must re-encode to
/// the same bytes.
pub fn decode_evidence(data: &[u8]) {
    use crate::format::checkpoint::SignedCheckpoint;
    use crate::format::note::{self, CosignatureEntry, Note, WitnessKey};
    use crate::format::producer::{PRODUCER_BLOCK_LEN, ProducerBlock};
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    match pick % 5 {
        0 => {
            let Ok(text) = std::str::from_utf8(data) else {
                return;
            };
            let Ok(n) = Note::parse(text) else {
                return;
            };
            assert_eq!(n.encode(), text, "a note re-encodes differently");
            if let Ok(s) = note::parse_checkpoint_body(&n.body) {
                assert_eq!(note::checkpoint_body(&s), n.body);
            }
            // Whatever the keys, a hostile note is refused, never a panic.
            let _ = note::checkpoint_from_note(&n, &[]);
        }
        1 => {
            let Ok(text) = std::str::from_utf8(data) else {
                return;
            };
            if let Ok(k) = WitnessKey::parse(text) {
                assert_eq!(WitnessKey::parse(&k.encode()), Ok(k));
            }
        }
        2 => {
            if let Ok(e) = CosignatureEntry::decode(data) {
                assert_eq!(&e.encode()[..], &data[..note::COSIGNATURE_ENTRY_LEN]);
            }
        }
        3 => {
            if let Ok(cp) = SignedCheckpoint::decode_entry(data) {
                let again = cp.encode_entry();
                assert_eq!(&again[..], &data[..again.len()]);
            }
        }
        _ => {
            if let Ok(b) = ProducerBlock::decode(data) {
                assert_eq!(&b.encode()[..], &data[..PRODUCER_BLOCK_LEN]);
            }
        }
    }
}

/// Writes [`log_ops`] inputs operation by operation: seed corpora and regression tests read
/// as the operations they run rather than as bytes.
pub mod log_ops_input {
    use super::log_ops::{APPEND_EVENTS, FAULT_KINDS, FAULT_OPS, FAULT_PATHS, op};
    use crate::sim::{FaultKind, FaultOp};

    /// Options byte: keep the attribute indexes caught up in the background.
    pub const INDEX_ATTRIBUTES: u8 = 1;
    /// Options byte: checkpoints on seals and close.
    pub const AUTO_CHECKPOINTS: u8 = 2;
    /// Options byte: a checkpoint every 8 records.
    pub const CHECKPOINT_EVERY_8: u8 = 1 << 2;
    /// Options byte: a checkpoint every 32 records.
    pub const CHECKPOINT_EVERY_32: u8 = 2 << 2;
    /// Options byte: a checkpoint every 100 records.
    pub const CHECKPOINT_EVERY_100: u8 = 3 << 2;
    /// Options byte: a log of format version 1.
    pub const FORMAT_V1: u8 = 0x10;

    /// An event's id.
    #[derive(Clone, Copy, Debug)]
    pub enum Id {
        /// One never used before in the run.
        Fresh,
        /// The id sent at this index (modulo their number) of all sent so far, in order.
        Reuse(u16),
        /// One of 16 fixed ids (the index modulo 16).
        Fixed(u8),
    }

    /// An event's payload.
    #[derive(Clone, Debug)]
    pub enum Payload {
        /// These bytes (at most 127).
        Inline(Vec<u8>),
        /// `len` generated bytes (a multiple of 32, from 32 to 4096) from a one-byte seed.
        Generated {
            /// Bytes.
            len: usize,
            /// Seed.
            seed: u8,
        },
    }

    /// An event.
    #[derive(Clone, Debug)]
    pub struct Event {
        /// Its id.
        pub id: Id,
        /// Its type, an index into the run's four event types.
        pub event_type: u8,
        /// Its correlation id, an index into none and two values.
        pub correlation: u8,
        /// Its payload.
        pub payload: Payload,
    }

    impl Event {
        /// A fresh event with `payload` inline.
        #[must_use]
        pub fn small(payload: &[u8]) -> Event {
            Event {
                id: Id::Fresh,
                event_type: 0,
                correlation: 0,
                payload: Payload::Inline(payload.to_vec()),
            }
        }

        /// A fresh event with `len` generated bytes.
        #[must_use]
        pub fn large(len: usize, seed: u8) -> Event {
            Event {
                id: Id::Fresh,
                event_type: 1,
                correlation: 1,
                payload: Payload::Generated { len, seed },
            }
        }

        /// This event with another id.
        #[must_use]
        pub fn with_id(mut self, id: Id) -> Event {
            self.id = id;
            self
        }
    }

    /// An append's expectation.
    #[derive(Clone, Copy, Debug)]
    pub enum Expect {
        /// `ExpectedVersion::Any`.
        Any,
        /// `ExpectedVersion::NoStream`.
        NoStream,
        /// `ExpectedVersion::StreamExists`.
        StreamExists,
        /// `ExpectedVersion::Exact` of this version.
        Exact(u8),
        /// The stream's current version (`NoStream` for an empty stream).
        Right,
    }

    /// How a retry differs from the batch it repeats.
    #[derive(Clone, Debug)]
    pub enum Retry {
        /// Not at all.
        AsSent,
        /// Every part expects `Any`.
        Any,
        /// Every part expects the version it was written after.
        Right,
        /// Its last part has one more event.
        Grown(Event),
    }

    /// What survives a power cut.
    #[derive(Clone, Copy, Debug)]
    pub enum Cut {
        /// Only what was synced.
        Clean,
        /// Everything written.
        KeepAll,
        /// Each unsynced page and entry with probability one half, pages possibly torn.
        SeededLoss,
        /// Unsynced pages and directory entries with probabilities `pages / 255` and
        /// `entries / 255`.
        Partial {
            /// Pages kept, out of 255.
            pages: u8,
            /// Entries kept, out of 255.
            entries: u8,
            /// Whether a kept page may be torn.
            torn: bool,
        },
    }

    /// What to do after an operation fails.
    #[derive(Clone, Copy, Debug)]
    pub enum AfterFailure {
        /// Go on with the log; after a failed append, whose outcome must be settled first,
        /// a power cut (a clean one) instead.
        CarryOn,
        /// A process crash and reopen.
        Crash,
        /// A power cut and reopen.
        PowerCut(Cut),
    }

    /// A [`super::log_ops`] input under construction.
    #[derive(Clone, Debug)]
    pub struct LogOpsInput {
        bytes: Vec<u8>,
    }

    impl LogOpsInput {
        /// An input whose disk has `seed` and whose log has `options` (the constants above,
        /// or-ed).
        #[must_use]
        pub fn new(seed: u64, options: u8) -> LogOpsInput {
            let mut bytes = seed.to_le_bytes().to_vec();
            bytes.push(options);
            LogOpsInput { bytes }
        }

        /// The input's bytes.
        #[must_use]
        pub fn into_bytes(self) -> Vec<u8> {
            self.bytes
        }

        fn put(mut self, b: &[u8]) -> LogOpsInput {
            self.bytes.extend_from_slice(b);
            self
        }

        fn expect(self, e: Expect) -> LogOpsInput {
            match e {
                Expect::Any => self.put(&[0]),
                Expect::NoStream => self.put(&[1]),
                Expect::StreamExists => self.put(&[2]),
                Expect::Exact(v) => self.put(&[3, v]),
                Expect::Right => self.put(&[4]),
            }
        }

        fn event(self, e: &Event) -> LogOpsInput {
            let (sel, reuse) = match e.id {
                Id::Fresh => (0, 0u16),
                Id::Reuse(i) => (0x80, i),
                Id::Fixed(k) => (0xc0 | (k & 0x0f), 0),
            };
            let this = self
                .put(&[sel])
                .put(&reuse.to_le_bytes())
                .put(&[e.event_type, e.correlation]);
            match &e.payload {
                Payload::Inline(b) => {
                    assert!(b.len() < 0x80, "an inline payload has at most 127 bytes");
                    this.put(&[b.len() as u8]).put(b)
                }
                Payload::Generated { len, seed } => {
                    assert!(
                        (32..=4096).contains(len) && len % 32 == 0,
                        "a generated payload has 32 to 4096 bytes, a multiple of 32"
                    );
                    this.put(&[0x80 | (len / 32 - 1) as u8, *seed])
                }
            }
        }

        fn part(self, stream: u8, expect: Expect, events: &[Event]) -> LogOpsInput {
            let mut this = self.put(&[stream]).expect(expect);
            for e in events {
                this = this.event(e);
            }
            this
        }

        fn cut(self, c: Cut) -> LogOpsInput {
            match c {
                Cut::Clean => self.put(&[0, 0, 0]),
                Cut::KeepAll => self.put(&[1, 0, 0]),
                Cut::SeededLoss => self.put(&[2, 0, 0]),
                Cut::Partial {
                    pages,
                    entries,
                    torn,
                } => self.put(&[if torn { 0x13 } else { 3 }, pages, entries]),
            }
        }

        /// `append` of up to four events to stream `stream` (an index into five).
        #[must_use]
        pub fn append(self, stream: u8, expect: Expect, events: &[Event]) -> LogOpsInput {
            let n = APPEND_EVENTS
                .iter()
                .position(|&n| n == events.len())
                .expect("an append has 0 to 4 events");
            self.put(&[op::APPEND, n as u8])
                .part(stream, expect, events)
        }

        /// `append_multi` of two or three parts of one to three events.
        #[must_use]
        pub fn append_multi(self, parts: &[(u8, Expect, Vec<Event>)]) -> LogOpsInput {
            assert!(matches!(parts.len(), 2 | 3), "two or three parts");
            let mut this = self.put(&[op::APPEND_MULTI, (parts.len() - 2) as u8]);
            for (stream, expect, events) in parts {
                assert!(matches!(events.len(), 1..=3), "one to three events a part");
                this = this
                    .put(&[(events.len() - 1) as u8])
                    .part(*stream, *expect, events);
            }
            this
        }

        /// A retry of the acknowledged batch at index `batch` (modulo their number).
        #[must_use]
        pub fn retry(self, batch: u16, how: Retry) -> LogOpsInput {
            let this = self.put(&[op::RETRY]).put(&batch.to_le_bytes());
            match how {
                Retry::AsSent => this.put(&[0]),
                Retry::Any => this.put(&[1]),
                Retry::Right => this.put(&[2]),
                Retry::Grown(e) => this.put(&[3]).event(&e),
            }
        }

        /// `read_stream`: `from` 255 is `u64::MAX`; `max` 0 is all, otherwise `max - 1`
        /// events (`max` below 16).
        #[must_use]
        pub fn read_stream(self, stream: u8, from: u8, max: u8, backward: bool) -> LogOpsInput {
            self.put(&[op::READ_STREAM, stream, from, max, u8::from(backward)])
        }

        /// `read_all`, with `from` and `max` as for [`LogOpsInput::read_stream`].
        #[must_use]
        pub fn read_all(self, from: u8, max: u8, backward: bool) -> LogOpsInput {
            self.put(&[op::READ_ALL, from, max, u8::from(backward)])
        }

        /// `find` of an event type (an index into four) or a correlation id (one of two),
        /// at most `limit + 1` events (`limit` below 32).
        #[must_use]
        pub fn find(self, by_correlation: bool, value: u8, limit: u8) -> LogOpsInput {
            self.put(&[op::FIND, u8::from(by_correlation), value, limit])
        }

        /// `checkpoint`.
        #[must_use]
        pub fn checkpoint(self) -> LogOpsInput {
            self.put(&[op::CHECKPOINT])
        }

        /// Close and reopen.
        #[must_use]
        pub fn close(self) -> LogOpsInput {
            self.put(&[op::CLOSE])
        }

        /// A process crash and reopen.
        #[must_use]
        pub fn crash(self) -> LogOpsInput {
            self.put(&[op::CRASH])
        }

        /// A power cut and reopen.
        #[must_use]
        pub fn power_cut(self, cut: Cut) -> LogOpsInput {
            self.put(&[op::POWER_CUT]).cut(cut)
        }

        /// A power cut at the `after`th disk operation from now (1 to 64).
        #[must_use]
        pub fn arm_cut(self, after: u8, cut: Cut) -> LogOpsInput {
            assert!(
                matches!(after, 1..=64),
                "a cut is armed 1 to 64 operations ahead"
            );
            self.put(&[op::ARM_CUT, after - 1]).cut(cut)
        }

        /// A fault on the `skip + 1`th matching operation (`skip` below 16), `times` (1 or
        /// 2) times, on files whose name contains `path`.
        ///
        /// # Panics
        /// For an operation, kind or path the input cannot express.
        #[must_use]
        pub fn fault(
            self,
            op_hit: FaultOp,
            kind: FaultKind,
            path: Option<&str>,
            skip: u8,
            times: u8,
        ) -> LogOpsInput {
            let o = FAULT_OPS
                .iter()
                .position(|&x| x == op_hit)
                .expect("fault op");
            let k = FAULT_KINDS
                .iter()
                .position(|&x| x == kind)
                .expect("fault kind");
            let p = FAULT_PATHS
                .iter()
                .position(|&x| x == path)
                .expect("fault path");
            assert!(skip < 16 && matches!(times, 1 | 2));
            self.put(&[op::FAULT, o as u8, k as u8, p as u8, skip, times - 1])
        }

        /// `sync`.
        #[must_use]
        pub fn sync(self) -> LogOpsInput {
            self.put(&[op::MISC, 0])
        }

        /// `wait_sealed`.
        #[must_use]
        pub fn wait_sealed(self) -> LogOpsInput {
            self.put(&[op::MISC, 1])
        }

        /// `inject_sync_failure`: the next sync fails and the log refuses writes.
        #[must_use]
        pub fn inject_sync_failure(self) -> LogOpsInput {
            self.put(&[op::MISC, 2])
        }

        /// The bytes the run reads after an operation fails: write them right after an
        /// operation that will fail (and only then, or they are read as operations).
        #[must_use]
        pub fn after_failure(self, how: AfterFailure) -> LogOpsInput {
            match how {
                AfterFailure::CarryOn => self.put(&[0]).cut(Cut::Clean),
                AfterFailure::Crash => self.put(&[1]).cut(Cut::Clean),
                AfterFailure::PowerCut(c) => self.put(&[2]).cut(c),
            }
        }
    }
}

/// Operation sequences on a log over a simulated disk, checked against a model of what was
/// acknowledged (the `log_ops` fuzz target).
mod log_ops {
    use std::collections::{HashMap, HashSet};
    use std::ops::AddAssign;

    use crate::sim::{Cut, Fault, FaultKind, FaultOp, SimFs};
    use crate::{
        AppendRequest, AppendResult, ContentType, Direction, Durability, Error, EventData, EventId,
        ExpectedVersion, Field, Log, Options, Position, Query, RecordedEvent, Result, Storage,
    };

    /// Operations one input runs at most: with the reopens and checks they cause, an input
    /// runs in a few milliseconds.
    pub const OPS_MAX: u32 = 64;
    /// Where the log lives on the simulated disk (nothing touches the real one).
    const DIR: &str = "/fuzz/log";
    const STREAMS: [&str; 5] = ["a", "b", "trade-1", "trade-2", "$positions"];
    const TYPES: [&str; 4] = ["TradeNew", "TradeAmended", "TradeCancelled", "X"];
    /// Correlation ids ("" is none): a second indexed field for `find`.
    const CORRELATIONS: [&str; 3] = ["", "corr-1", "corr-2"];
    const ACTOR: &str = "fuzz";
    /// Small segments, so that a few KiB-sized events roll and seal them.
    const SEGMENT_BYTES: u64 = 64 * 1024;
    /// The longest payload an input can ask for.
    const PAYLOAD_BYTES_MAX: usize = 4096;
    /// The most events one batch can have: a multi-append of three parts of three, retried
    /// with one more.
    const BATCH_EVENTS_MAX: usize = 10;
    /// The header, the envelope's fixed part and its texts take well under this per record.
    const RECORD_OVERHEAD_MAX: usize = 512;
    /// Every batch fits a segment (less its header and footer pages), so `BatchTooLarge`
    /// never needs predicting.
    const _: () = assert!(
        BATCH_EVENTS_MAX * (PAYLOAD_BYTES_MAX + RECORD_OVERHEAD_MAX)
            < SEGMENT_BYTES as usize - 8192
    );
    /// More ids than an input can append: the log remembers every earlier id, so the model
    /// can tell a retry from a duplicate exactly.
    const IDEMPOTENCY_WINDOW: usize = 4096;
    const _: () = assert!((OPS_MAX as usize) * BATCH_EVENTS_MAX < IDEMPOTENCY_WINDOW);
    /// Opens (and checks after them) that faults may fail before the run gives up; faults are
    /// cleared after each failure, so the second attempt meets none.
    const ATTEMPTS_MAX: u32 = 8;

    /// The first opcode of each operation (an opcode byte is taken modulo [`op::COUNT`]);
    /// [`super::log_ops_input::LogOpsInput`] writes these.
    pub(super) mod op {
        pub const APPEND: u8 = 0;
        pub const APPEND_MULTI: u8 = 6;
        pub const RETRY: u8 = 8;
        pub const READ_STREAM: u8 = 10;
        pub const READ_ALL: u8 = 11;
        pub const FIND: u8 = 12;
        pub const CHECKPOINT: u8 = 13;
        pub const CLOSE: u8 = 14;
        pub const CRASH: u8 = 15;
        pub const POWER_CUT: u8 = 16;
        pub const ARM_CUT: u8 = 17;
        pub const FAULT: u8 = 18;
        pub const MISC: u8 = 19;
        pub const COUNT: u8 = 20;
        // The harness's match takes every opcode from MISC on as MISC.
        const _: () = assert!(MISC == COUNT - 1);
    }

    /// Events per single-stream append, by the selector byte modulo 8: mostly one or two,
    /// and sometimes none (refused as malformed).
    pub(super) const APPEND_EVENTS: [usize; 8] = [1, 1, 2, 3, 4, 1, 2, 0];
    pub(super) const FAULT_OPS: [FaultOp; 6] = [
        FaultOp::Write,
        FaultOp::Sync,
        FaultOp::SyncDir,
        FaultOp::Create,
        FaultOp::Rename,
        FaultOp::Remove,
    ];
    pub(super) const FAULT_KINDS: [FaultKind; 3] =
        [FaultKind::NoSpace, FaultKind::Eio, FaultKind::ShortWrite];
    /// The files a fault may be limited to (`None`: any).
    pub(super) const FAULT_PATHS: [Option<&str>; 8] = [
        None,
        Some(".seg"),
        Some(".idx"),
        Some(".adx"),
        Some("tally.checkpoints"),
        Some("merkle.tree"),
        Some("streams.snap"),
        Some("tally.meta"),
    ];

    /// What one [`log_ops`] input exercised: counts, so that a test can show the corpus
    /// reaches each kind of operation and outcome.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct LogOpsOutcome {
        /// Operations run.
        pub ops: u32,
        /// Appends acknowledged that wrote events.
        pub appends: u32,
        /// Events those appends wrote.
        pub events: u32,
        /// Retries recognised (the earlier result returned, nothing written).
        pub replays: u32,
        /// Appends refused as the model predicted (wrong expected version, duplicate ids,
        /// malformed).
        pub refusals: u32,
        /// Reads (`read_stream`, `read_all`, `find`) checked against the model.
        pub reads: u32,
        /// Checkpoints written.
        pub checkpoints: u32,
        /// Opens of the log, each followed by a full check.
        pub opens: u32,
        /// Process crashes.
        pub crashes: u32,
        /// Power cuts (between operations, or armed and fired in the middle of one).
        pub power_cuts: u32,
        /// Disk faults and armed power cuts that fired.
        pub faults_fired: u64,
        /// Operations that failed, each explained by a fault.
        pub fault_errors: u32,
        /// Batches whose append failed and that recovery found whole.
        pub unknown_found: u32,
        /// Batches whose append failed and that recovery found no trace of.
        pub unknown_lost: u32,
    }

    impl AddAssign for LogOpsOutcome {
        fn add_assign(&mut self, o: LogOpsOutcome) {
            self.ops += o.ops;
            self.appends += o.appends;
            self.events += o.events;
            self.replays += o.replays;
            self.refusals += o.refusals;
            self.reads += o.reads;
            self.checkpoints += o.checkpoints;
            self.opens += o.opens;
            self.crashes += o.crashes;
            self.power_cuts += o.power_cuts;
            self.faults_fired += o.faults_fired;
            self.fault_errors += o.fault_errors;
            self.unknown_found += o.unknown_found;
            self.unknown_lost += o.unknown_lost;
        }
    }

    /// Reads `data` as a sequence of operations on a log over a fresh simulated disk and
    /// checks the log against a model of what was acknowledged.
    ///
    /// The input: 8 bytes seed the disk (which unsynced pages survive a cut, short-write
    /// lengths), 1 byte picks the options (bit 0 attribute indexing, bit 1 automatic
    /// checkpoints, bits 2-3 a checkpoint every 8, 32 or 100 records or none, bit 4 format
    /// version 1), then up to [`OPS_MAX`] operations, each an opcode byte (modulo 20) and
    /// its arguments; bytes past the end read as zero and no operation starts there:
    ///
    /// | opcode | operation |
    /// | --- | --- |
    /// | 0-5 | `append` to one stream: 0 to 4 events, expectation `Any`/`NoStream`/`StreamExists`/`Exact` (right or from the input) |
    /// | 6-7 | `append_multi` to 2 or 3 streams (possibly one twice) |
    /// | 8-9 | a retry of an acknowledged batch, as sent, with other expectations, or with one more event |
    /// | 10, 11, 12 | `read_stream`, `read_all`, `find` (range, count and direction from the input) |
    /// | 13 | `checkpoint` |
    /// | 14, 15, 16 | close, crash, or power cut (a [`Cut`] from the input), then reopen |
    /// | 17 | arm a power cut at one of the next 64 disk operations |
    /// | 18 | inject a disk fault (operation, kind, path, skip and count from the input) |
    /// | 19 | `sync`, `wait_sealed`, or `inject_sync_failure` |
    ///
    /// Each event takes an id selector (fresh; one used before, so that retries and
    /// duplicates happen; or one of 16 fixed ids), an event type, a correlation id and a
    /// payload (up to 127 bytes from the input, or 32 to 4096 generated bytes).
    ///
    /// The model predicts every append's outcome (written at which versions and positions,
    /// recognised as a retry, or refused, and why) and every read's result. After every
    /// open it checks that every acknowledged event is present byte for byte at its
    /// position and version, that nothing else is, that a batch whose append failed is
    /// whole or absent, that each stream reads back densely through its index, and that
    /// `verify` passes. Only an injected fault (or `inject_sync_failure`) since the log was
    /// opened may explain a failed operation, and never as corruption (`Error::Corrupt`):
    /// whatever a crash, cut or fault leaves, recovery must open and read. After a failed
    /// operation the input chooses to carry on, crash or cut the power. A run ends with a
    /// clean close and a final reopen and check.
    ///
    /// The log's background threads (sealing, indexing, checkpoints) make the point at which
    /// an armed fault fires vary a little between runs of the same input.
    ///
    /// # Panics
    /// On any difference from the model, and on any error no fault explains: each is a
    /// finding.
    pub fn log_ops(data: &[u8]) -> LogOpsOutcome {
        let mut input = Input { data, at: 0 };
        let seed = input.u64();
        let flags = input.byte();
        let mut h = Harness {
            input,
            sim: SimFs::new(seed),
            flags,
            model: Model::default(),
            pending: None,
            fired_before_open: 0,
            generation_at_open: 0,
            hook_poisoned: false,
            fresh_ids: 0,
            trace: Vec::new(),
            out: LogOpsOutcome::default(),
        };
        let mut log = h.reopen();
        while h.out.ops < OPS_MAX && !h.input.exhausted() {
            h.out.ops += 1;
            log = h.step(log);
        }
        h.note("final close, faults cleared, reopen".into());
        if let Err(e) = log.close() {
            h.explain("close", &e);
        }
        h.sim.clear_faults();
        let log = h.reopen();
        if let Err(e) = log.close() {
            h.bug(&format!("close with no fault armed failed: {e}"));
        }
        h.out.faults_fired = h.sim.faults_fired();
        h.out
    }

    /// The input, read a byte at a time; past its end every byte is zero.
    struct Input<'a> {
        data: &'a [u8],
        at: usize,
    }

    impl Input<'_> {
        fn byte(&mut self) -> u8 {
            let b = self.data.get(self.at).copied().unwrap_or(0);
            self.at = self.at.saturating_add(1);
            b
        }

        fn u16(&mut self) -> u16 {
            u16::from_le_bytes([self.byte(), self.byte()])
        }

        fn u64(&mut self) -> u64 {
            let mut b = [0u8; 8];
            for x in &mut b {
                *x = self.byte();
            }
            u64::from_le_bytes(b)
        }

        fn pick<T: Copy>(&mut self, from: &[T]) -> T {
            from[usize::from(self.byte()) % from.len()]
        }

        fn exhausted(&self) -> bool {
            self.at >= self.data.len()
        }
    }

    /// SplitMix64, for generated payloads.
    fn splitmix(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[derive(Clone, Debug)]
    struct Ev {
        id: EventId,
        event_type: &'static str,
        correlation: &'static str,
        payload: Vec<u8>,
    }

    impl Ev {
        fn data(&self) -> EventData {
            EventData::new(self.event_type, self.payload.clone())
                .with_id(self.id)
                .correlation_id(self.correlation)
                .actor(ACTOR)
        }
    }

    /// One stream's part of an append, as sent.
    #[derive(Clone, Debug)]
    struct Part {
        stream: usize,
        expected: ExpectedVersion,
        events: Vec<Ev>,
    }

    /// An event as the log must hold it.
    #[derive(Clone, Debug)]
    struct Stored {
        stream: usize,
        version: u64,
        ev: Ev,
    }

    /// An append's outcome as the model predicts it.
    #[derive(Debug)]
    enum Predicted {
        /// Written, each part's events from this version on.
        Write(Vec<u64>),
        /// A retry: these earlier results, nothing written.
        Replay(Vec<AppendResult>),
        /// Refused, nothing written.
        Refused(Refusal),
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Refusal {
        InvalidAppend,
        WrongExpectedVersion,
        DuplicateEventId,
        PartialDuplicate,
    }

    fn refusal_of(e: &Error) -> Option<Refusal> {
        match e {
            Error::InvalidAppend { .. } => Some(Refusal::InvalidAppend),
            Error::WrongExpectedVersion { .. } => Some(Refusal::WrongExpectedVersion),
            Error::DuplicateEventId { .. } => Some(Refusal::DuplicateEventId),
            Error::PartialDuplicate { .. } => Some(Refusal::PartialDuplicate),
            _ => None,
        }
    }

    /// What the log must hold: every acknowledged event by position.
    #[derive(Default)]
    struct Model {
        log: Vec<Stored>,
        by_id: HashMap<EventId, u64>,
        /// Each stream's positions, by version.
        streams: [Vec<u64>; STREAMS.len()],
        /// Acknowledged batches as sent, with each part's first version, for retries.
        batches: Vec<(Vec<Part>, Vec<u64>)>,
        /// Every id sent, to send again.
        ids: Vec<EventId>,
    }

    impl Model {
        fn head(&self, stream: usize) -> u64 {
            self.streams[stream].len() as u64
        }

        fn result(&self, first: u64, last: u64) -> AppendResult {
            AppendResult {
                first_position: Position(first),
                last_position: Position(last),
                first_version: self.log[first as usize].version,
                last_version: self.log[last as usize].version,
            }
        }

        /// The outcome of an append, as `append::prepare` and `Writer::resolve` decide it
        /// (docs/FORMAT.md does not cover this; the engine's code is the reference).
        fn predict(&self, parts: &[Part]) -> Predicted {
            let total: usize = parts.iter().map(|p| p.events.len()).sum();
            let mut streams = HashSet::new();
            let mut ids = HashSet::new();
            for p in parts {
                if p.events.is_empty() {
                    return Predicted::Refused(Refusal::InvalidAppend);
                }
                if parts.len() > 1 && !streams.insert(p.stream) {
                    return Predicted::Refused(Refusal::InvalidAppend);
                }
                for e in &p.events {
                    if total > 1 && !ids.insert(e.id) {
                        return Predicted::Refused(Refusal::InvalidAppend);
                    }
                }
            }
            let mut replays = Vec::new();
            let mut writes = Vec::new();
            for p in parts {
                match self.earlier_write(p) {
                    Err(r) => return Predicted::Refused(r),
                    Ok(Some(r)) => replays.push(r),
                    Ok(None) => {
                        let head = self.head(p.stream);
                        let holds = match p.expected {
                            ExpectedVersion::Any => true,
                            ExpectedVersion::NoStream => head == 0,
                            ExpectedVersion::StreamExists => head > 0,
                            ExpectedVersion::Exact(n) => head > 0 && head - 1 == n,
                        };
                        if !holds {
                            return Predicted::Refused(Refusal::WrongExpectedVersion);
                        }
                        writes.push(head);
                    }
                }
            }
            match (replays.is_empty(), writes.is_empty()) {
                (_, true) => Predicted::Replay(replays),
                (true, false) => Predicted::Write(writes),
                (false, false) => Predicted::Refused(Refusal::InvalidAppend),
            }
        }

        /// Whether `p` repeats an earlier append to its stream. The log remembers every id
        /// (`IDEMPOTENCY_WINDOW`), so ids it does not know were never written, and a
        /// look at the stream's history can find nothing for them.
        fn earlier_write(&self, p: &Part) -> Result<Option<AppendResult>, Refusal> {
            let slots: Vec<Option<u64>> = p
                .events
                .iter()
                .map(|e| self.by_id.get(&e.id).copied())
                .collect();
            if slots.iter().all(Option::is_none) {
                return Ok(None);
            }
            if slots
                .iter()
                .flatten()
                .any(|&s| self.log[s as usize].stream != p.stream)
            {
                return Err(Refusal::DuplicateEventId);
            }
            let n = p.events.len() as u64;
            if let Some(f) = slots[0] {
                let v = self.log[f as usize].version;
                let consecutive = slots.iter().zip(0..).all(|(s, i)| {
                    s.is_some_and(|s| s == f + i && self.log[s as usize].version == v + i)
                });
                if consecutive {
                    return Ok(Some(self.result(f, f + n - 1)));
                }
            }
            // Not one run of the log: the stream's history decides, when the retry names
            // the version it expected.
            let start = match p.expected {
                ExpectedVersion::Exact(v) => v.checked_add(1),
                ExpectedVersion::NoStream => Some(0),
                _ => None,
            };
            let positions = &self.streams[p.stream];
            let Some(start) = start.filter(|&s| s.saturating_add(n) <= positions.len() as u64)
            else {
                return Err(Refusal::PartialDuplicate);
            };
            let written = &positions[start as usize..(start + n) as usize];
            let same = written
                .iter()
                .zip(&p.events)
                .all(|(&w, e)| self.log[w as usize].ev.id == e.id);
            if !same {
                return Err(Refusal::PartialDuplicate);
            }
            Ok(Some(AppendResult {
                first_position: Position(written[0]),
                last_position: Position(written[written.len() - 1]),
                first_version: start,
                last_version: start + n - 1,
            }))
        }

        /// The events of a written batch, at the positions after the log's end.
        fn stored(parts: &[Part], first_versions: &[u64]) -> Vec<Stored> {
            let mut out = Vec::new();
            for (p, &v) in parts.iter().zip(first_versions) {
                for (e, i) in p.events.iter().zip(0..) {
                    out.push(Stored {
                        stream: p.stream,
                        version: v + i,
                        ev: e.clone(),
                    });
                }
            }
            out
        }

        /// Records a written batch; returns each part's result.
        fn apply(&mut self, parts: &[Part], first_versions: &[u64]) -> Vec<AppendResult> {
            let mut results = Vec::new();
            let mut at = self.log.len() as u64;
            for p in parts {
                let n = p.events.len() as u64;
                results.push((at, at + n - 1));
                at += n;
            }
            for s in Self::stored(parts, first_versions) {
                let position = self.log.len() as u64;
                assert_eq!(s.version, self.head(s.stream), "versions are dense");
                self.by_id.insert(s.ev.id, position);
                self.streams[s.stream].push(position);
                self.log.push(s);
            }
            self.batches.push((parts.to_vec(), first_versions.to_vec()));
            results
                .into_iter()
                .map(|(f, l)| self.result(f, l))
                .collect()
        }

        /// Positions `read_stream(stream, from, max, direction)` returns.
        fn read_stream(&self, stream: usize, from: u64, max: usize, d: Direction) -> Vec<u64> {
            window(&self.streams[stream], from, max, d)
        }

        /// Positions `read_all(from, max, direction)` returns.
        fn read_all(&self, from: u64, max: usize, d: Direction) -> Vec<u64> {
            let all: Vec<u64> = (0..self.log.len() as u64).collect();
            window(&all, from, max, d)
        }
    }

    /// The items of `list` from index `from` on, forward, or from `from` (at most the last)
    /// down, backward; at most `max` of them.
    fn window(list: &[u64], from: u64, max: usize, d: Direction) -> Vec<u64> {
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        match d {
            Direction::Forward => list.iter().skip(from).take(max).copied().collect(),
            Direction::Backward if list.is_empty() => Vec::new(),
            Direction::Backward => {
                let top = from.min(list.len() - 1);
                list[..=top].iter().rev().take(max).copied().collect()
            }
        }
    }

    /// Where `found` differs from what position `position` must hold, if anywhere.
    fn differs(found: &RecordedEvent, position: u64, s: &Stored) -> Option<String> {
        let checks = [
            ("position", found.position == Position(position)),
            ("version", found.version == s.version),
            ("event id", found.event_id == s.ev.id),
            ("stream", found.stream() == STREAMS[s.stream]),
            ("event type", found.event_type() == s.ev.event_type),
            ("correlation id", found.correlation_id() == s.ev.correlation),
            ("actor", found.actor() == ACTOR),
            ("payload", found.payload() == s.ev.payload),
            ("content type", found.content_type == ContentType::Binary),
            ("schema version", found.schema_version == 1),
        ];
        checks.iter().find(|(_, ok)| !ok).map(|(what, _)| {
            format!(
                "{what} differs at position {position}: found {} v{} {:?}, expected {} v{} {:?}",
                found.stream(),
                found.version,
                found.event_id,
                STREAMS[s.stream],
                s.version,
                s.ev.id
            )
        })
    }

    struct Harness<'a> {
        input: Input<'a>,
        sim: SimFs,
        flags: u8,
        model: Model,
        /// The batch whose append failed (its parts and predicted first versions): whole
        /// or absent at the next open.
        pending: Option<(Vec<Part>, Vec<u64>)>,
        /// Faults fired before the log was last opened: an error is explained only when
        /// more fired since (during that open, in an operation, or in a background thread).
        fired_before_open: u64,
        generation_at_open: u64,
        /// `inject_sync_failure` was called on the open log.
        hook_poisoned: bool,
        fresh_ids: u64,
        trace: Vec<String>,
        out: LogOpsOutcome,
    }

    impl Harness<'_> {
        fn note(&mut self, line: String) {
            self.trace.push(line);
        }

        /// A finding: panics with the seed and the operations so far.
        fn bug(&self, what: &str) -> ! {
            panic!(
                "log_ops: {what}\ndisk seed {:#x}, options {:#04x}; operations:\n  {}",
                self.sim.seed(),
                self.flags,
                self.trace.join("\n  ")
            )
        }

        fn explained(&self) -> bool {
            self.hook_poisoned || self.sim.faults_fired() > self.fired_before_open
        }

        /// An operation failed: a fault must explain it.
        fn explain(&mut self, what: &str, e: &Error) {
            if matches!(e, Error::Corrupt { .. }) || !self.explained() {
                self.bug(&format!("{what} failed, and no fault explains it: {e}"));
            }
            self.out.fault_errors += 1;
            self.note(format!("  {what} failed: {e}"));
        }

        fn options(&self) -> Options {
            Options {
                storage: Storage::simulated(&self.sim),
                segment_bytes: SEGMENT_BYTES,
                durability: Durability::Fsync,
                idempotency_window: IDEMPOTENCY_WINDOW,
                checkpoint_every_records: [None, Some(8), Some(32), Some(100)]
                    [usize::from(self.flags >> 2) & 3],
                checkpoint_interval: None,
                auto_checkpoints: self.flags & 2 != 0,
                index_attributes: self.flags & 1 != 0,
                format_version: if self.flags & 0x10 != 0 { 1 } else { 2 },
                ..Options::default()
            }
        }

        /// Opens the log; an open that a fault failed is retried with the faults cleared
        /// (the operator fixed the disk).
        fn open(&mut self) -> Log {
            for _ in 0..ATTEMPTS_MAX {
                let fired = self.sim.faults_fired();
                match Log::open(DIR, self.options()) {
                    Ok(log) => {
                        self.fired_before_open = fired;
                        self.generation_at_open = self.sim.generation();
                        self.hook_poisoned = false;
                        self.out.opens += 1;
                        return log;
                    }
                    Err(e)
                        if self.sim.faults_fired() > fired
                            && !matches!(e, Error::Corrupt { .. }) =>
                    {
                        self.note(format!("  open failed: {e}"));
                        self.sim.clear_faults();
                    }
                    Err(e) => self.bug(&format!("open failed, and no fault explains it: {e}")),
                }
            }
            self.bug("open failed after its faults were cleared")
        }

        /// Opens the log and checks it against the model.
        fn reopen(&mut self) -> Log {
            for _ in 0..ATTEMPTS_MAX {
                let log = self.open();
                match self.check(&log) {
                    Ok(()) => return log,
                    Err(e) => {
                        self.explain("a read after open", &e);
                        log.crash();
                        self.sim.clear_faults();
                    }
                }
            }
            self.bug("the check after open failed after its faults were cleared")
        }

        /// Compares the whole log with the model, and settles the batch of unknown outcome.
        /// Returns the error of a read or `verify` that failed (for the caller to explain);
        /// panics on any difference.
        fn check(&mut self, log: &Log) -> Result<()> {
            let all = log.read_all(Position(0), usize::MAX, Direction::Forward)?;
            let n = self.model.log.len();
            if all.len() < n {
                let s = &self.model.log[all.len()];
                self.bug(&format!(
                    "acknowledged event {:?} ({} v{}) at position {} is lost",
                    s.ev.id,
                    STREAMS[s.stream],
                    s.version,
                    all.len()
                ));
            }
            for (i, (found, s)) in all.iter().zip(&self.model.log).enumerate() {
                if let Some(d) = differs(found, i as u64, s) {
                    self.bug(&format!("an acknowledged event reads back wrong: {d}"));
                }
            }
            let extra = &all[n..];
            let found: Vec<Stored> = match &self.pending {
                None if extra.is_empty() => Vec::new(),
                None => self.bug(&format!(
                    "{} events at positions {n}.. that were never acknowledged",
                    extra.len()
                )),
                Some(_) if extra.is_empty() => Vec::new(),
                Some((parts, first_versions)) => {
                    let batch = Model::stored(parts, first_versions);
                    if extra.len() != batch.len() {
                        self.bug(&format!(
                            "a batch whose append failed is partly present: {} of {} events",
                            extra.len(),
                            batch.len()
                        ));
                    }
                    for (i, (f, s)) in extra.iter().zip(&batch).enumerate() {
                        if let Some(d) = differs(f, (n + i) as u64, s) {
                            self.bug(&format!("a batch whose append failed came back wrong: {d}"));
                        }
                    }
                    batch
                }
            };
            let at = |p: u64| -> &Stored {
                let p = p as usize;
                self.model.log.get(p).unwrap_or_else(|| &found[p - n])
            };
            for (s, name) in STREAMS.iter().enumerate() {
                let mut expect = self.model.streams[s].clone();
                expect.extend(
                    (n..n + found.len())
                        .filter(|&p| found[p - n].stream == s)
                        .map(|p| p as u64),
                );
                let evs = log.read_stream(name, 0, usize::MAX, Direction::Forward)?;
                if evs.len() != expect.len() {
                    self.bug(&format!(
                        "stream {name} reads back {} events, expected {}",
                        evs.len(),
                        expect.len()
                    ));
                }
                for (ev, &p) in evs.iter().zip(&expect) {
                    if let Some(d) = differs(ev, p, at(p)) {
                        self.bug(&format!("stream {name} reads back wrong: {d}"));
                    }
                }
            }
            let report = log.verify()?;
            let total = (n + found.len()) as u64;
            if report.records != total {
                self.bug(&format!(
                    "verify checked {} records, the log has {total}",
                    report.records
                ));
            }
            if log.next_position() != Position(total) {
                self.bug(&format!(
                    "the next position is {:?} with {total} events",
                    log.next_position()
                ));
            }
            if let Some((parts, first_versions)) = self.pending.take() {
                if found.is_empty() {
                    self.out.unknown_lost += 1;
                    self.note("  the failed batch is absent".into());
                } else {
                    self.out.unknown_found += 1;
                    self.note("  the failed batch is present".into());
                    self.model.apply(&parts, &first_versions);
                }
            }
            Ok(())
        }

        fn step(&mut self, log: Log) -> Log {
            match self.input.byte() % op::COUNT {
                op::APPEND..op::APPEND_MULTI => self.append_one(log),
                op::APPEND_MULTI..op::RETRY => self.append_multi(log),
                op::RETRY..op::READ_STREAM => self.retry(log),
                op::READ_STREAM => self.read_stream(log),
                op::READ_ALL => self.read_all(log),
                op::FIND => self.find(log),
                op::CHECKPOINT => {
                    self.note("checkpoint".into());
                    match log.checkpoint() {
                        Ok(cp) => {
                            self.out.checkpoints += 1;
                            let n = self.model.log.len() as u64;
                            if cp.statement.tree_size != n {
                                self.bug(&format!(
                                    "a checkpoint covers {} records, {n} were acknowledged",
                                    cp.statement.tree_size
                                ));
                            }
                            log
                        }
                        Err(e) => {
                            self.explain("checkpoint", &e);
                            self.after_failure(log)
                        }
                    }
                }
                op::CLOSE => {
                    self.note("close and reopen".into());
                    if let Err(e) = log.close() {
                        self.explain("close", &e);
                    }
                    self.reopen()
                }
                op::CRASH => self.crash(log),
                op::POWER_CUT => {
                    let cut = self.cut();
                    self.power_cut(log, cut)
                }
                op::ARM_CUT => {
                    let after = 1 + u64::from(self.input.byte() % 64);
                    let cut = self.cut();
                    self.note(format!("arm a power cut after {after} operations: {cut:?}"));
                    self.sim.cut_power_after(after, cut);
                    log
                }
                op::FAULT => {
                    let fault = self.fault();
                    self.note(format!("inject {fault:?}"));
                    self.sim.inject(fault);
                    log
                }
                _ => {
                    let (what, r) = match self.input.byte() % 3 {
                        0 => ("sync", log.sync()),
                        1 => ("wait_sealed", log.wait_sealed()),
                        _ => {
                            log.inject_sync_failure();
                            self.hook_poisoned = true;
                            ("inject_sync_failure", Ok(()))
                        }
                    };
                    self.note(what.into());
                    match r {
                        Ok(()) => log,
                        Err(e) => {
                            self.explain(what, &e);
                            self.after_failure(log)
                        }
                    }
                }
            }
        }

        /// After a failed operation: carry on (unless a batch's outcome is unknown), crash,
        /// or cut the power, as the input says.
        fn after_failure(&mut self, log: Log) -> Log {
            let how = self.input.byte() % 3;
            let cut = self.cut();
            match how {
                0 if self.pending.is_none() => {
                    self.note("  carry on".into());
                    log
                }
                1 => self.crash(log),
                _ => self.power_cut(log, cut),
            }
        }

        fn crash(&mut self, log: Log) -> Log {
            self.note("crash and reopen".into());
            log.crash();
            self.out.crashes += 1;
            self.reopen()
        }

        fn power_cut(&mut self, log: Log, cut: Cut) -> Log {
            log.crash();
            if self.sim.generation() == self.generation_at_open {
                self.note(format!("power cut {cut:?} and reopen"));
                self.sim.power_cut(&cut);
            } else {
                // An armed cut already fired in the middle of an operation.
                self.note("crash after a power cut, and reopen".into());
            }
            self.out.power_cuts += 1;
            self.reopen()
        }

        fn cut(&mut self) -> Cut {
            let kind = self.input.byte();
            let (pages, entries) = (self.input.byte(), self.input.byte());
            match kind % 4 {
                0 => Cut::clean(),
                1 => Cut::keep_all(),
                2 => Cut::seeded_loss(),
                _ => Cut {
                    keep_unsynced_pages: f64::from(pages) / 255.0,
                    torn_pages: kind & 0x10 != 0,
                    keep_unsynced_entries: f64::from(entries) / 255.0,
                },
            }
        }

        fn fault(&mut self) -> Fault {
            let op = self.input.pick(&FAULT_OPS);
            let kind = self.input.pick(&FAULT_KINDS);
            let path = self.input.pick(&FAULT_PATHS);
            let skip = u64::from(self.input.byte() % 16);
            let times = 1 + u64::from(self.input.byte() % 2);
            Fault {
                op,
                path_contains: path.map(str::to_owned),
                skip,
                kind,
                times,
            }
        }

        fn event(&mut self) -> Ev {
            let sel = self.input.byte();
            let reuse = self.input.u16();
            let id = match sel >> 6 {
                2 if !self.model.ids.is_empty() => {
                    self.model.ids[usize::from(reuse) % self.model.ids.len()]
                }
                3 => {
                    let mut b = [0u8; 16];
                    b[0] = 0x5e;
                    b[1] = sel & 0x0f;
                    EventId(b)
                }
                _ => {
                    self.fresh_ids += 1;
                    let mut b = [0u8; 16];
                    b[0] = 0xf0;
                    b[1..9].copy_from_slice(&self.fresh_ids.to_le_bytes());
                    EventId(b)
                }
            };
            let event_type = self.input.pick(&TYPES);
            let correlation = self.input.pick(&CORRELATIONS);
            let p = self.input.byte();
            let payload = if p < 0x80 {
                (0..p).map(|_| self.input.byte()).collect()
            } else {
                let len = (usize::from(p & 0x7f) + 1) * 32;
                let mut state = u64::from(self.input.byte()) << 16 | len as u64;
                let mut v = Vec::with_capacity(len);
                while v.len() < len {
                    v.extend_from_slice(&splitmix(&mut state).to_le_bytes());
                }
                v.truncate(len);
                v
            };
            debug_assert!(payload.len() <= PAYLOAD_BYTES_MAX);
            Ev {
                id,
                event_type,
                correlation,
                payload,
            }
        }

        fn expected(&mut self, stream: usize) -> ExpectedVersion {
            let head = self.model.head(stream);
            match self.input.byte() % 8 {
                0 => ExpectedVersion::Any,
                1 => ExpectedVersion::NoStream,
                2 => ExpectedVersion::StreamExists,
                3 => ExpectedVersion::Exact(u64::from(self.input.byte())),
                _ if head == 0 => ExpectedVersion::NoStream,
                _ => ExpectedVersion::Exact(head - 1),
            }
        }

        fn part(&mut self, events: usize) -> Part {
            let stream = usize::from(self.input.byte()) % STREAMS.len();
            let expected = self.expected(stream);
            Part {
                stream,
                expected,
                events: (0..events).map(|_| self.event()).collect(),
            }
        }

        fn append_one(&mut self, log: Log) -> Log {
            let n = APPEND_EVENTS[usize::from(self.input.byte() % 8)];
            let part = self.part(n);
            self.submit(log, vec![part])
        }

        fn append_multi(&mut self, log: Log) -> Log {
            let k = 2 + usize::from(self.input.byte() % 2);
            let parts = (0..k)
                .map(|_| {
                    let n = 1 + usize::from(self.input.byte() % 3);
                    self.part(n)
                })
                .collect();
            self.submit(log, parts)
        }

        fn retry(&mut self, log: Log) -> Log {
            let which = usize::from(self.input.u16());
            let how = self.input.byte() % 4;
            if self.model.batches.is_empty() {
                return self.append_one(log);
            }
            let (mut parts, first_versions) =
                self.model.batches[which % self.model.batches.len()].clone();
            match how {
                0 => {}
                1 => parts
                    .iter_mut()
                    .for_each(|p| p.expected = ExpectedVersion::Any),
                2 => {
                    for (p, &v) in parts.iter_mut().zip(&first_versions) {
                        p.expected = match v {
                            0 => ExpectedVersion::NoStream,
                            v => ExpectedVersion::Exact(v - 1),
                        };
                    }
                }
                _ => {
                    let ev = self.event();
                    if let Some(p) = parts.last_mut() {
                        p.events.push(ev);
                    }
                }
            }
            self.note("retry of an acknowledged batch:".into());
            self.submit(log, parts)
        }

        fn submit(&mut self, log: Log, parts: Vec<Part>) -> Log {
            let predicted = self.model.predict(&parts);
            let mut line = String::from("append");
            for p in &parts {
                let ids: Vec<String> = p
                    .events
                    .iter()
                    .map(|e| format!("{:x}", e.id.as_u128() >> 64))
                    .collect();
                line += &format!(
                    " [{} {:?} {}]",
                    STREAMS[p.stream],
                    p.expected,
                    ids.join(",")
                );
            }
            line += &format!(": predicted {predicted:?}");
            self.note(line);
            for p in &parts {
                self.model.ids.extend(p.events.iter().map(|e| e.id));
            }
            let data: Vec<Vec<EventData>> = parts
                .iter()
                .map(|p| p.events.iter().map(Ev::data).collect())
                .collect();
            let requests: Vec<AppendRequest<'_>> = parts
                .iter()
                .zip(&data)
                .map(|(p, d)| AppendRequest {
                    stream: STREAMS[p.stream],
                    expected: p.expected,
                    events: d,
                })
                .collect();
            let before = log.next_position();
            let result = if let [r] = &requests[..] {
                log.append(r.stream, r.expected, r.events).map(|r| vec![r])
            } else {
                log.append_multi(&requests)
            };
            match (predicted, result) {
                (Predicted::Write(first_versions), Ok(rs)) => {
                    let expect = self.model.apply(&parts, &first_versions);
                    if rs != expect {
                        self.bug(&format!("an append returned {rs:?}, expected {expect:?}"));
                    }
                    self.out.appends += 1;
                    self.out.events += parts.iter().map(|p| p.events.len() as u32).sum::<u32>();
                }
                (Predicted::Replay(expect), Ok(rs)) => {
                    if rs != expect {
                        self.bug(&format!("a retry returned {rs:?}, expected {expect:?}"));
                    }
                    if log.next_position() != before {
                        self.bug("a retry wrote");
                    }
                    self.out.replays += 1;
                }
                (Predicted::Refused(r), Err(e)) if refusal_of(&e) == Some(r) => {
                    if log.next_position() != before {
                        self.bug(&format!("a refused append ({e}) wrote"));
                    }
                    self.out.refusals += 1;
                }
                (Predicted::Write(first_versions), Err(e)) => {
                    self.explain("append", &e);
                    self.pending = Some((parts, first_versions));
                    return self.after_failure(log);
                }
                (p, Err(e)) if self.explained() => {
                    self.explain(&format!("append predicted {p:?}"), &e);
                    return self.after_failure(log);
                }
                (p, r) => self.bug(&format!("an append predicted {p:?} returned {r:?}")),
            }
            log
        }

        /// A read's range: a start (often 0, sometimes the end), a count and a direction.
        fn range(&mut self) -> (u64, usize, Direction) {
            let from = match self.input.byte() {
                255 => u64::MAX,
                b => u64::from(b),
            };
            let max = match self.input.byte() % 16 {
                0 => usize::MAX,
                m => usize::from(m) - 1,
            };
            let d = if self.input.byte() & 1 == 0 {
                Direction::Forward
            } else {
                Direction::Backward
            };
            (from, max, d)
        }

        /// Compares a read with the positions the model says it returns.
        fn compare(
            &mut self,
            what: &str,
            r: Result<Vec<RecordedEvent>>,
            expect: &[u64],
            log: Log,
        ) -> Log {
            let evs = match r {
                Ok(evs) => evs,
                Err(e) => {
                    self.explain(what, &e);
                    return self.after_failure(log);
                }
            };
            self.out.reads += 1;
            if evs.len() != expect.len() {
                self.bug(&format!(
                    "{what} returned {} events, expected {}",
                    evs.len(),
                    expect.len()
                ));
            }
            for (ev, &p) in evs.iter().zip(expect) {
                if let Some(d) = differs(ev, p, &self.model.log[p as usize]) {
                    self.bug(&format!("{what}: {d}"));
                }
            }
            log
        }

        fn read_stream(&mut self, log: Log) -> Log {
            let stream = usize::from(self.input.byte()) % STREAMS.len();
            let (from, max, d) = self.range();
            let what = format!("read_stream({}, {from}, {max}, {d:?})", STREAMS[stream]);
            self.note(what.clone());
            let expect = self.model.read_stream(stream, from, max, d);
            let r = log.read_stream(STREAMS[stream], from, max, d);
            self.compare(&what, r, &expect, log)
        }

        fn read_all(&mut self, log: Log) -> Log {
            let (from, max, d) = self.range();
            let what = format!("read_all({from}, {max}, {d:?})");
            self.note(what.clone());
            let expect = self.model.read_all(from, max, d);
            let r = log.read_all(Position(from), max, d);
            self.compare(&what, r, &expect, log)
        }

        fn find(&mut self, log: Log) -> Log {
            let (field, value) = if self.input.byte() & 1 == 0 {
                (Field::EventType, self.input.pick(&TYPES))
            } else {
                (Field::Correlation, self.input.pick(&CORRELATIONS[1..]))
            };
            let limit = 1 + usize::from(self.input.byte() % 32);
            let what = format!("find({field:?} = {value}, limit {limit})");
            self.note(what.clone());
            let expect: Vec<u64> = (0..)
                .zip(&self.model.log)
                .filter(|(_, s)| match field {
                    Field::EventType => s.ev.event_type == value,
                    _ => s.ev.correlation == value,
                })
                .map(|(p, _)| p)
                .take(limit)
                .collect();
            let r = log.find(&Query::field(field, value).limit(limit));
            self.compare(&what, r, &expect, log)
        }
    }
}
