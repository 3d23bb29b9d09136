//! The append path.
//!
//! 1. `prepare` (on the caller's thread, no lock): validate and encode each envelope, hash
//!    and checksum its body. This is the expensive part (BLAKE3 over the body), and it runs
//!    in parallel across appenders; large batches split it over two threads.
//! 2. `Writer::commit` (under the writer lock): check expected versions and idempotency,
//!    assign positions, versions and the record time, take one 64-byte chain step per
//!    record, copy the records into the active segment's map, update the index, the stream
//!    table and the id window, and register the written range for group commit.
//! 3. Wait for durability (`Shared::wait_durable`) if the log's durability asks for it.

use std::collections::HashSet;
use std::sync::Arc;

use super::background::SealJob;
use super::ids::{IdHashBuilder, IdSlot, IdWindow};
use super::shared::Shared;
use super::streams::{SNAPSHOT_FILE, SnapshotCover, StreamTable};
use super::{
    AppendRequest, AppendResult, Durability, EventData, ExpectedVersion, new_event_id, now,
};
use crate::error::{Error, Result};
use crate::format::blob::{BLOB_REF_LEN, BlobRef};
use crate::format::chain::{body_hash, chain_step};
use crate::format::envelope::{EnvelopeRef, PayloadForm};
use crate::format::producer::{PRODUCER_BLOCK_LEN, ProducerBlock, ProducerSignature};
use crate::format::record::{
    Layout, NO_STREAM_PREV, RECORD_HEADER_MAX, RecordHeader, RecordKind, flags, set_chain_hash,
};
use crate::format::segment::SegmentHeader;
use crate::format::{
    EventId, Hash32, PAGE_BYTES, Position, SEGMENT_DATA_START, SEGMENT_FOOTER_BYTES, SegmentSeq,
    Timestamp,
};
use crate::index::{ActiveIndex, IndexFileInfo, StreamKey};
use crate::segment::ActiveSegment;

/// A thread keeps its encoding buffer between appends up to this size, so that large
/// batches do not allocate (and, above the allocator's mmap threshold, map and unmap, which
/// costs a TLB shootdown on every core) each time.
const BODIES_KEPT_BYTES: usize = 8 << 20;

thread_local! {
    static BODIES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One event, encoded and hashed, waiting for its position.
struct PreparedEvent {
    body_start: usize,
    body_len: u32,
    body_hash: Hash32,
    body_crc: u32,
    event_id: EventId,
}

struct PreparedPart<'a> {
    stream: &'a str,
    expected: ExpectedVersion,
    events: Vec<PreparedEvent>,
}

pub(crate) struct Prepared<'a> {
    parts: Vec<PreparedPart<'a>>,
    bodies: Vec<u8>,
    record_bytes: u64,
    /// The batch's first body starts with a producer block (a signed batch).
    signed: bool,
}

/// Whether an append may block its thread for longer than copying records takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocking {
    /// It may wait for anything (a plain thread).
    Allowed,
    /// It fails with [`Error::WouldBlock`] instead (an async runtime's worker thread).
    Refused,
}

/// How long a non-blocking append waits for a lock before giving up: longer than any
/// append holds the writer lock to copy its records, shorter than a sync.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(5);

/// How an append is signed, and whether it may write the engine's own system streams.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Signing<'s> {
    /// The producer's signature of the batch.
    pub(crate) signature: Option<&'s ProducerSignature>,
    /// An append by the engine itself to `$producers` (a registration).
    pub(crate) system: bool,
}

fn invalid_append(reason: impl Into<String>) -> Error {
    Error::InvalidAppend {
        reason: reason.into(),
    }
}

/// Validates, encodes and hashes a request.
fn prepare<'a>(
    requests: &[AppendRequest<'a>],
    segment_bytes: u64,
    layout: Layout,
    signature: Option<(&ProducerSignature, &[u8; 16])>,
    offloaded: &[Option<BlobRef>],
    sealed: &[Option<super::personal::SealedPayload>],
    mut bodies: Vec<u8>,
) -> Result<Prepared<'a>> {
    if signature.is_some() && layout == Layout::V1 {
        return Err(Error::SignatureRefused {
            reason: "a log of format version 1 cannot store producer signatures".into(),
        });
    }
    if requests.is_empty() {
        return Err(invalid_append("no streams"));
    }
    bodies.clear();
    let mut streams_seen = HashSet::new();
    let events_total: usize = requests.iter().map(|r| r.events.len()).sum();
    let mut ids_seen: HashSet<u128, IdHashBuilder> = HashSet::default();
    if events_total > 1 {
        ids_seen.reserve(events_total);
    }
    let mut parts = Vec::with_capacity(requests.len());
    let mut record_bytes = 0u64;
    let mut index = 0usize;
    let default_time = now();
    for req in requests {
        if req.events.is_empty() {
            return Err(invalid_append(format!(
                "no events for stream {}",
                req.stream
            )));
        }
        if requests.len() > 1 && !streams_seen.insert(req.stream) {
            return Err(invalid_append(format!(
                "stream {} appears twice",
                req.stream
            )));
        }
        let mut events = Vec::with_capacity(req.events.len());
        for ev in req.events {
            let seal = sealed.get(index).and_then(Option::as_ref);
            let event_id = match seal {
                Some(s) => s.event_id,
                None => ev.event_id.unwrap_or_else(new_event_id),
            };
            if events_total > 1 && !ids_seen.insert(event_id.as_u128()) {
                return Err(invalid_append(format!("event id {event_id} appears twice")));
            }
            if signature.is_some() && (ev.event_id.is_none() || ev.event_time.is_none()) {
                return Err(invalid_append(format!(
                    "event {index} of a signed batch has no {}: the producer signs every event's id and event time",
                    if ev.event_id.is_none() {
                        "id"
                    } else {
                        "event time"
                    }
                )));
            }
            if ev.personal.is_some() && seal.is_none() {
                return Err(invalid_append(format!(
                    "event {index} marks personal data that was not sealed"
                )));
            }
            let blob = blob_of(ev, index, offloaded)?;
            let mut env = envelope_of(ev, req.stream, event_id, default_time, blob.as_ref());
            if let Some(s) = seal {
                env.payload = &s.payload;
                env.payload_form = s.form;
            }
            let body_start = bodies.len();
            if let Some((sig, _)) = signature
                && index == 0
            {
                let block = ProducerBlock {
                    signature: *sig,
                    event_count: u32::try_from(events_total).unwrap_or(u32::MAX),
                };
                bodies.extend_from_slice(&block.encode());
            }
            env.encode_into(&mut bodies)
                .map_err(|source| Error::InvalidEvent { index, source })?;
            let body_len = (bodies.len() - body_start) as u32;
            record_bytes += layout.record_len(body_len);
            events.push(PreparedEvent {
                body_start,
                body_len,
                body_hash: [0; 32],
                body_crc: 0,
                event_id,
            });
            index += 1;
        }
        parts.push(PreparedPart {
            stream: req.stream,
            expected: req.expected,
            events,
        });
    }
    let max = segment_bytes - SEGMENT_DATA_START - SEGMENT_FOOTER_BYTES;
    if record_bytes > max {
        return Err(Error::BatchTooLarge {
            bytes: record_bytes,
            max,
        });
    }
    hash_bodies(&mut parts, &bodies);
    if let Some((sig, log_id)) = signature {
        // The signature covers each envelope's hash: the first body's hash covers the
        // producer block too, so its envelope is hashed on its own.
        let mut hashes: Vec<Hash32> = parts
            .iter()
            .flat_map(|p| p.events.iter().map(|e| e.body_hash))
            .collect();
        let first = &parts[0].events[0];
        hashes[0] = body_hash(
            &bodies
                [first.body_start + PRODUCER_BLOCK_LEN..first.body_start + first.body_len as usize],
        );
        sig.verify(log_id, &hashes)
            .map_err(|e| Error::SignatureRefused {
                reason: format!("the batch's producer signature does not verify: {e}"),
            })?;
    }
    Ok(Prepared {
        parts,
        bodies,
        record_bytes,
        signed: signature.is_some(),
    })
}

/// The BLAKE3 hash of each event's envelope as the log will store it, in batch order: what a
/// producer signs. Every event must give its id and event time.
pub(crate) fn envelope_hashes(requests: &[AppendRequest<'_>]) -> Result<Vec<Hash32>> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for (index, (req, ev)) in requests
        .iter()
        .flat_map(|r| r.events.iter().map(move |e| (r, e)))
        .enumerate()
    {
        let (Some(id), Some(_)) = (ev.event_id, ev.event_time) else {
            return Err(invalid_append(format!(
                "event {index} has no id or event time: a producer signs both"
            )));
        };
        buf.clear();
        let blob = blob_of(ev, index, &[])?;
        envelope_of(ev, req.stream, id, Timestamp(0), blob.as_ref())
            .encode_into(&mut buf)
            .map_err(|source| Error::InvalidEvent { index, source })?;
        out.push(body_hash(&buf));
    }
    Ok(out)
}

/// The envelope of `ev`; `blob` holds its encoded blob reference when its payload is a blob.
fn envelope_of<'e>(
    ev: &'e EventData,
    stream: &'e str,
    event_id: EventId,
    default_time: Timestamp,
    blob: Option<&'e [u8; BLOB_REF_LEN]>,
) -> EnvelopeRef<'e> {
    EnvelopeRef {
        event_id,
        event_time: ev.event_time.unwrap_or(default_time),
        schema_version: ev.schema_version,
        content_type: ev.content_type,
        payload_form: if blob.is_some() {
            PayloadForm::Blob
        } else {
            PayloadForm::Inline
        },
        stream,
        aggregate_type: &ev.aggregate_type,
        event_type: &ev.event_type,
        correlation_id: &ev.correlation_id,
        causation_id: &ev.causation_id,
        actor: &ev.actor,
        payload: match blob {
            Some(b) => b,
            None => &ev.payload,
        },
    }
}

/// The encoded blob reference of `ev`, the event at `index` of its batch: the one it gives,
/// or the one `offloaded` stored for it.
fn blob_of(
    ev: &EventData,
    index: usize,
    offloaded: &[Option<BlobRef>],
) -> Result<Option<[u8; BLOB_REF_LEN]>> {
    let blob = ev.blob.or_else(|| offloaded.get(index).copied().flatten());
    if ev.blob.is_some() && !ev.payload.is_empty() {
        return Err(invalid_append(format!(
            "event {index} gives both a payload and a blob reference"
        )));
    }
    Ok(blob.map(|b| b.encode()))
}

fn hash_one(ev: &mut PreparedEvent, bodies: &[u8]) {
    let body = &bodies[ev.body_start..ev.body_start + ev.body_len as usize];
    ev.body_hash = body_hash(body);
    ev.body_crc = crc32fast::hash(body);
}

/// Hashes and checksums every body, on the appending thread (in parallel across
/// appenders, outside the writer lock).
fn hash_bodies(parts: &mut [PreparedPart<'_>], bodies: &[u8]) {
    for ev in parts.iter_mut().flat_map(|p| p.events.iter_mut()) {
        hash_one(ev, bodies);
    }
}

/// The writer: everything the serial part of an append touches.
pub(crate) struct Writer {
    /// The segment being written.
    pub(crate) seg: ActiveSegment,
    pub(crate) next_position: Position,
    pub(crate) chain: Hash32,
    pub(crate) last_record_time: Timestamp,
    pub(crate) streams: StreamTable,
    pub(crate) ids: IdWindow,
}

/// What `commit` hands back to be waited on.
struct Committed {
    results: Vec<AppendResult>,
    /// Every position below this must be durable before the results are acknowledged.
    durable_target: Position,
}

enum Resolution {
    /// Write the events with these first versions (and the streams' keys, if they exist).
    Write(Vec<(u64, Option<StreamKey>)>),
    /// A retry of an earlier append: return its results.
    Replay(Vec<AppendResult>),
}

impl Writer {
    /// The stream's last written version.
    fn current_version(&self, stream: &str) -> Option<(StreamKey, u64)> {
        let key = self.streams.key(stream)?;
        let st = self.streams.get(key);
        (st.first_position.0 != u64::MAX).then_some((key, st.last_version))
    }

    /// Checks expectations and idempotency for every part; nothing is changed.
    fn resolve(&self, shared: &Shared, prepared: &Prepared<'_>) -> Result<Resolution> {
        let mut replays = Vec::with_capacity(prepared.parts.len());
        let mut first_versions = Vec::with_capacity(prepared.parts.len());
        for part in &prepared.parts {
            let current = self.current_version(part.stream);
            match self.find_earlier_write(shared, part, current)? {
                Some(result) => replays.push(result),
                None => {
                    let ok = match (part.expected, current) {
                        (ExpectedVersion::Any, _) => true,
                        (ExpectedVersion::NoStream, c) => c.is_none(),
                        (ExpectedVersion::StreamExists, c) => c.is_some(),
                        (ExpectedVersion::Exact(n), Some((_, v))) => v == n,
                        (ExpectedVersion::Exact(_), None) => false,
                    };
                    if !ok {
                        return Err(Error::WrongExpectedVersion {
                            stream: part.stream.to_owned(),
                            expected: part.expected,
                            actual: current.map(|(_, v)| v),
                        });
                    }
                    first_versions
                        .push((current.map_or(0, |(_, v)| v + 1), current.map(|(k, _)| k)));
                }
            }
        }
        match (replays.len(), first_versions.len()) {
            (_, 0) => Ok(Resolution::Replay(replays)),
            (0, _) => Ok(Resolution::Write(first_versions)),
            _ => Err(invalid_append(
                "some streams of the batch repeat an earlier append and others do not",
            )),
        }
    }

    /// If `part` repeats an earlier append to the same stream, the earlier result.
    fn find_earlier_write(
        &self,
        shared: &Shared,
        part: &PreparedPart<'_>,
        current: Option<(StreamKey, u64)>,
    ) -> Result<Option<AppendResult>> {
        // The common case, no id seen before, costs one lookup per event and no allocation.
        if part
            .events
            .iter()
            .all(|e| self.ids.get(e.event_id).is_none())
        {
            return self.find_in_stream_history(shared, part, current);
        }
        let slots: Vec<Option<IdSlot>> = part
            .events
            .iter()
            .map(|e| self.ids.get(e.event_id))
            .collect();
        let found = slots.iter().filter(|s| s.is_some()).count();
        let key = current.map(|(k, _)| k);
        for (ev, slot) in part.events.iter().zip(&slots) {
            if let Some(slot) = slot
                && Some(slot.stream) != key
            {
                return Err(Error::DuplicateEventId {
                    event_id: ev.event_id,
                    existing_stream: self.streams.get(slot.stream).name.to_string(),
                });
            }
        }
        let first = slots[0];
        let consecutive = first.is_some_and(|f| {
            slots.iter().enumerate().all(|(i, s)| {
                s.is_some_and(|s| {
                    s.position.0 == f.position.0 + i as u64 && s.version == f.version + i as u64
                })
            })
        });
        match (found == slots.len(), consecutive, first) {
            (true, true, Some(f)) => {
                let n = slots.len() as u64;
                Ok(Some(AppendResult {
                    first_position: f.position,
                    last_position: Position(f.position.0 + n - 1),
                    first_version: f.version,
                    last_version: f.version + n - 1,
                }))
            }
            _ => {
                // Part of a retried batch may have left the window already: the stream's
                // history decides when the retry names its expected version.
                if let Some(result) = self.find_in_stream_history(shared, part, current)? {
                    return Ok(Some(result));
                }
                let dup = part.events.iter().zip(&slots).find(|(_, s)| s.is_some());
                Err(Error::PartialDuplicate {
                    stream: part.stream.to_owned(),
                    event_id: dup.map(|(e, _)| e.event_id).unwrap_or_default(),
                })
            }
        }
    }

    /// A retry older than the id window is still recognised when it names the version it
    /// expected: the events at the versions it would have written are read back and their
    /// ids compared.
    fn find_in_stream_history(
        &self,
        shared: &Shared,
        part: &PreparedPart<'_>,
        current: Option<(StreamKey, u64)>,
    ) -> Result<Option<AppendResult>> {
        let start = match part.expected {
            ExpectedVersion::Exact(n) => match n.checked_add(1) {
                Some(s) => s,
                None => return Ok(None),
            },
            ExpectedVersion::NoStream => 0,
            _ => return Ok(None),
        };
        let n = part.events.len() as u64;
        let Some((_, last)) = current else {
            return Ok(None);
        };
        if last < start || last - start + 1 < n {
            return Ok(None);
        }
        let written =
            super::read::read_stream_locked(shared, self, part.stream, start, part.events.len())?;
        if written.len() as u64 != n {
            return Ok(None);
        }
        let matches = written
            .iter()
            .zip(&part.events)
            .filter(|(w, p)| w.event_id == p.event_id)
            .count();
        if matches == 0 {
            return Ok(None);
        }
        if matches as u64 != n {
            let dup = written
                .iter()
                .zip(&part.events)
                .find(|(w, p)| w.event_id == p.event_id);
            return Err(Error::PartialDuplicate {
                stream: part.stream.to_owned(),
                event_id: dup.map(|(w, _)| w.event_id).unwrap_or_default(),
            });
        }
        Ok(Some(AppendResult {
            first_position: written[0].position,
            last_position: written[written.len() - 1].position,
            first_version: start,
            last_version: start + n - 1,
        }))
    }

    /// Writes a prepared batch. Called under the writer lock.
    fn commit(&mut self, shared: &Shared, prepared: &Prepared<'_>) -> Result<Committed> {
        // Poisoning is rare: look at the flag, and take the lock only for the cause. (A closed
        // log has no writer, so this point is never reached after `close`.)
        if shared.commit.is_poisoned()
            && let Some(cause) = &shared.commit.lock().poisoned
        {
            return Err(Error::Poisoned {
                cause: Arc::clone(cause),
            });
        }
        let first_versions = match self.resolve(shared, prepared)? {
            Resolution::Replay(results) => {
                let end = results.iter().map(|r| r.last_position.next()).max();
                return Ok(Committed {
                    results,
                    durable_target: end.unwrap_or_default(),
                });
            }
            Resolution::Write(v) => v,
        };
        if !self.seg.fits(prepared.record_bytes) {
            if self.seg.index.record_count() == 0 {
                // Even an empty segment of this size (made before `segment_bytes` was
                // raised) cannot hold the batch.
                return Err(Error::BatchTooLarge {
                    bytes: prepared.record_bytes,
                    max: self.seg.handle.header.data_limit() - SEGMENT_DATA_START,
                });
            }
            self.roll(shared)?;
        }
        let mw = self
            .seg
            .map_writer
            .as_mut()
            .expect("a read-only log never commits");
        let record_time = Timestamp(now().0.max(self.last_record_time.0));
        self.last_record_time = record_time;
        let durable = shared.commit.durable_position().0;
        let start_offset = self.seg.write_offset;
        let first_of_batch = self.next_position;
        let total: usize = prepared.parts.iter().map(|p| p.events.len()).sum();
        let mut n = 0usize;
        let mut results = Vec::with_capacity(prepared.parts.len());
        let seq = self.seg.handle.seq;
        for (part, &(first_version, known)) in prepared.parts.iter().zip(&first_versions) {
            // The key was looked up by `resolve`; only a new stream needs hashing.
            let key = match known {
                Some(k) => k,
                None => self.streams.key_or_insert(part.stream),
            };
            let prev_segment = {
                let st = self.streams.get(key);
                (st.first_position.0 != u64::MAX && st.last_segment != seq)
                    .then_some(st.last_segment)
            };
            let (name, hash, mut stream_prev) = {
                let st = self.streams.get(key);
                let prev = if st.first_position.0 == u64::MAX {
                    NO_STREAM_PREV
                } else {
                    st.last_position.0
                };
                (Arc::clone(&st.name), st.hash, prev)
            };
            let layout = self.seg.handle.header.layout;
            let first_position = self.next_position;
            for (i, ev) in part.events.iter().enumerate() {
                let position = self.next_position;
                let version = first_version + i as u64;
                let mut fl = 0;
                if n == 0 {
                    fl |= flags::BATCH_START;
                }
                if n + 1 == total {
                    fl |= flags::BATCH_END;
                }
                if n == 0 && prepared.signed {
                    fl |= flags::PRODUCER_SIGNED;
                }
                let header = RecordHeader {
                    layout,
                    stream_prev: match layout {
                        Layout::V1 => NO_STREAM_PREV,
                        Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => stream_prev,
                    },
                    body_len: ev.body_len,
                    body_crc: ev.body_crc,
                    durable_lag: u32::try_from(position.0 - durable.min(position.0))
                        .unwrap_or(u32::MAX),
                    position,
                    stream_version: version,
                    record_time,
                    flags: fl,
                    kind: RecordKind::Event,
                    chain_hash: [0; 32],
                    body_form: crate::format::record::BodyForm::Envelope,
                };
                let mut hb = [0u8; RECORD_HEADER_MAX];
                let header_len = header.encode_into(&mut hb);
                self.chain = chain_step(&self.chain, &hb, &ev.body_hash);
                set_chain_hash(&mut hb, layout, &self.chain);
                let offset = self.seg.write_offset;
                let body = &prepared.bodies[ev.body_start..ev.body_start + ev.body_len as usize];
                mw.write(offset, &hb[..header_len]);
                mw.write(offset + header_len as u64, body);
                let len = layout.record_len(ev.body_len);
                let pad = len as usize - header_len - body.len();
                if pad > 0 {
                    mw.write(offset + (len - pad as u64), &[0u8; 8][..pad]);
                }
                self.seg.index.push(
                    key,
                    &name,
                    hash,
                    prev_segment,
                    version,
                    position,
                    offset,
                    record_time,
                    ev.event_id,
                );
                self.ids.insert(
                    ev.event_id,
                    IdSlot {
                        position,
                        stream: key,
                        version,
                    },
                );
                self.seg.write_offset += len;
                self.next_position = position.next();
                stream_prev = position.0;
                n += 1;
            }
            self.streams.apply_events(
                key,
                seq,
                (first_position, first_version),
                (
                    Position(self.next_position.0 - 1),
                    first_version + part.events.len() as u64 - 1,
                ),
                record_time,
            );
            results.push(AppendResult {
                first_position,
                last_position: Position(self.next_position.0 - 1),
                first_version,
                last_version: first_version + part.events.len() as u64 - 1,
            });
        }
        // Invariants a violation of which would corrupt the log (none depends on bytes read
        // from disk or network): the batch stayed inside the segment's data area, positions
        // advanced by exactly its events, and the index knows every record of the segment.
        assert!(
            self.seg.write_offset <= self.seg.handle.header.data_limit(),
            "wrote to {} past the data limit {}",
            self.seg.write_offset,
            self.seg.handle.header.data_limit()
        );
        debug_assert_eq!(
            self.next_position.0 - first_of_batch.0,
            total as u64,
            "positions advance by the batch's events"
        );
        debug_assert_eq!(
            self.seg.index.record_count(),
            self.next_position.0 - self.seg.handle.header.base_position.0,
            "the active index holds every record of its segment"
        );
        mw.publish(self.seg.write_offset);
        let written = self.next_position;
        {
            let mut c = shared.commit.lock();
            debug_assert!(c.written <= written, "written moves forward only");
            c.written = written;
            c.add_dirty(mw.map(), start_offset, self.seg.write_offset);
            if matches!(shared.opts.durability, Durability::Batched { .. }) && c.flusher_idle {
                shared.commit.flush_cv.notify_one();
            }
        }
        if shared.opts.durability != Durability::Fsync {
            shared.publish_visible(written);
        }
        Ok(Committed {
            results,
            durable_target: written,
        })
    }

    /// Rolls to a fresh segment now if the active one holds a record; see
    /// [`seal_active_segment`].
    fn roll_now(&mut self, shared: &Shared) -> Result<bool> {
        if self.seg.index.record_count() == 0 {
            return Ok(false);
        }
        self.roll(shared)?;
        Ok(true)
    }

    /// Moves to a fresh segment: takes a prepared spare, writes its header, freezes the
    /// current index and hands the old segment to the sealer.
    ///
    /// Never waits for the spare: if it is not prepared yet, fails with
    /// [`Error::WouldBlock`] having changed nothing, and the caller waits for it without
    /// holding the writer lock ([`super::background::wait_for_spare`]) and tries again.
    fn roll(&mut self, shared: &Shared) -> Result<()> {
        assert!(
            self.seg.index.record_count() > 0,
            "an empty segment is never rolled"
        );
        let next_seq = SegmentSeq(self.seg.handle.seq.0 + 1);
        let (handle, map_writer) = super::background::activate_spare(
            shared,
            next_seq,
            self.next_position,
            self.chain,
            Blocking::Refused,
        )?;
        shared
            .commit
            .lock()
            .add_dirty(map_writer.map(), 0, PAGE_BYTES);
        let rolled = self.seg.roll_into(ActiveSegment {
            handle: Arc::clone(&handle),
            map_writer: Some(map_writer),
            index: ActiveIndex::new(next_seq, self.next_position),
            write_offset: SEGMENT_DATA_START,
        });
        shared.segments.push(handle);
        super::background::request_spare(shared, SegmentSeq(next_seq.0 + 1));
        super::background::send_seal(
            shared,
            SealJob {
                segment: rolled.handle,
                index: rolled.index,
                data_end: rolled.data_end,
                last_chain_hash: self.chain,
            },
        );
        Ok(())
    }

    /// At a clean close: writes the active segment's index (as an incomplete sidecar) and
    /// the stream-table snapshot, both covering everything written.
    pub(crate) fn write_clean_close_state(self, shared: &Shared) -> Result<()> {
        let seq = self.seg.handle.seq;
        let info = IndexFileInfo {
            log_id: shared.meta.log_id,
            data_end: self.seg.write_offset,
            last_chain_hash: self.chain,
        };
        let idx = self.seg.index.encode(&info, false);
        shared
            .fs()
            .write_file_atomic(&shared.dir, &seq.index_file_name(), &idx, false)
            .map_err(Error::io(
                "writing index",
                shared.dir.join(seq.index_file_name()),
            ))?;
        let cover = SnapshotCover {
            seq,
            data_end: self.seg.write_offset,
            next_position: self.next_position,
        };
        let snap = self.streams.encode_snapshot(shared.meta.log_id, &cover);
        shared
            .fs()
            .write_file_atomic(&shared.dir, SNAPSHOT_FILE, &snap, false)
            .map_err(Error::io(
                "writing stream snapshot",
                shared.dir.join(SNAPSHOT_FILE),
            ))
    }
}

/// A header for a segment becoming active.
pub(crate) fn segment_header(
    shared: &Shared,
    seq: SegmentSeq,
    base_position: Position,
    prev_chain_hash: Hash32,
    capacity: u64,
) -> SegmentHeader {
    SegmentHeader {
        layout: shared.meta.layout,
        log_id: shared.meta.log_id,
        seq,
        base_position,
        created_time: now(),
        capacity,
        prev_chain_hash,
    }
}

/// Runs the append up to the point of waiting.
///
/// `wake_flusher`: the caller will not wait at once (an async append), so the flusher
/// thread must see to durability; a blocking caller leads its own sync instead, which saves
/// two thread hand-offs per acknowledgement.
pub(crate) fn submit(
    shared: &Arc<Shared>,
    requests: &[AppendRequest<'_>],
    wake_flusher: bool,
) -> Result<AppendHandle> {
    submit_signed(
        shared,
        requests,
        wake_flusher,
        Signing::default(),
        Blocking::Allowed,
    )
}

/// [`submit`] of a batch signed by a producer, or of the engine's own registration events.
pub(crate) fn submit_signed(
    shared: &Arc<Shared>,
    requests: &[AppendRequest<'_>],
    wake_flusher: bool,
    signing: Signing<'_>,
    may_block: Blocking,
) -> Result<AppendHandle> {
    if shared.read_only {
        return Err(Error::ReadOnly);
    }
    // Personal data is sealed first (a new subject's key is made durable), holding only the
    // erasure order's read side until the commit: a forget of the subject is wholly before
    // this append (which then seals under a new key) or wholly after it (and erases it,
    // unless a hold that covers it refuses).
    let seals = may_block == Blocking::Allowed
        && requests
            .iter()
            .any(|r| r.events.iter().any(|e| e.personal.is_some()));
    let erasing = seals.then(|| shared.erasing.read());
    let sealed =
        super::personal::seal_requests(shared, requests, signing.signature.is_some(), may_block)?;
    // Blobs are stored first, holding no lock: an upload may take a while.
    let offloaded =
        super::blobs::offload(shared, requests, signing.signature.is_some(), may_block)?;
    // The policy is read for the whole append, so that it is ordered after or before any
    // registration (which holds it for writing around its own append and its sync).
    let policy = match (signing.system, may_block) {
        (true, _) => None,
        (false, Blocking::Allowed) => Some(shared.producers.read()),
        (false, Blocking::Refused) => Some(
            shared
                .producers
                .try_read_for(LOCK_PATIENCE)
                .ok_or(Error::WouldBlock)?,
        ),
    };
    if let Some(policy) = &policy {
        let streams: Vec<&str> = requests.iter().map(|r| r.stream).collect();
        if streams.contains(&super::producers::PRODUCERS_STREAM) {
            return Err(invalid_append(format!(
                "{} is written only by the producer registration operations",
                super::producers::PRODUCERS_STREAM
            )));
        }
        if streams.contains(&super::personal::ERASURE_STREAM) {
            return Err(invalid_append(format!(
                "{} is written only by the erasure operation (forget)",
                super::personal::ERASURE_STREAM
            )));
        }
        if streams.contains(&crate::governance::GOVERNANCE_STREAM) {
            return Err(invalid_append(format!(
                "{} is written only by the retention policy and legal hold operations",
                crate::governance::GOVERNANCE_STREAM
            )));
        }
        policy.check(&streams, signing.signature)?;
    }
    let bodies = BODIES.with(|b| std::mem::take(&mut *b.borrow_mut()));
    let prepared = prepare(
        requests,
        shared.opts.segment_bytes,
        shared.meta.layout,
        signing.signature.map(|s| (s, &shared.meta.log_id)),
        &offloaded,
        &sealed,
        bodies,
    )?;
    let committed = loop {
        let mut guard = match may_block {
            Blocking::Allowed => shared.commit.writer.lock(),
            Blocking::Refused => writer_lock_unless_stalled(shared)?,
        };
        let writer = guard.as_mut().ok_or(Error::Closed)?;
        let unwinding = PoisonOnUnwind(shared);
        let committed = writer.commit(shared, &prepared);
        std::mem::forget(unwinding);
        drop(guard);
        match committed {
            // The roll's spare is not prepared yet, and nothing was written: wait for it
            // holding no lock of the write path (readers and other appends go on), then
            // try again from the start (the stream versions may have moved meanwhile).
            Err(Error::WouldBlock) if may_block == Blocking::Allowed => {
                super::background::wait_for_spare(shared);
            }
            other => break other,
        }
    };
    drop(policy);
    drop(erasing);
    if prepared.bodies.capacity() <= BODIES_KEPT_BYTES {
        BODIES.with(|b| *b.borrow_mut() = prepared.bodies);
    }
    let committed = committed?;
    let wait = shared.opts.durability == Durability::Fsync;
    if wait && wake_flusher {
        // Only an idle flusher needs waking: a busy one looks for new work after each sync.
        let c = shared.commit.lock();
        if c.flusher_idle {
            shared.commit.flush_cv.notify_one();
        }
    }
    Ok(AppendHandle {
        shared: Arc::clone(shared),
        results: committed.results,
        durable_target: wait.then_some(committed.durable_target),
    })
}

/// [`super::Log::seal_active_segment`]: rolls to a fresh segment under the writer lock (waiting
/// for the spare without it, as an append does) and returns whether the active segment held
/// a record.
pub(crate) fn seal_active_segment(shared: &Shared) -> Result<bool> {
    loop {
        // A poisoned log writes nothing more, a new segment's header included.
        shared.poison_error()?;
        let mut guard = shared.commit.writer.lock();
        let writer = guard.as_mut().ok_or(Error::Closed)?;
        let unwinding = PoisonOnUnwind(shared);
        let rolled = writer.roll_now(shared);
        std::mem::forget(unwinding);
        drop(guard);
        match rolled {
            Err(Error::WouldBlock) => super::background::wait_for_spare(shared),
            other => return other,
        }
    }
}

/// The writer lock for an append that may not block: refused after [`LOCK_PATIENCE`] (it
/// is then held across something slow: a sidecar rebuilt by an idempotency check, a
/// close).
fn writer_lock_unless_stalled(
    shared: &Shared,
) -> Result<super::order::OrderedGuard<parking_lot::MutexGuard<'_, Option<Writer>>>> {
    shared
        .commit
        .writer
        .try_lock_for(LOCK_PATIENCE)
        .ok_or(Error::WouldBlock)
}

/// Poisons the log if an append panics half-way (a broken invariant): the writer's state
/// (chain, offsets, index) may then be half-updated and must not take more writes.
struct PoisonOnUnwind<'a>(&'a Shared);

impl Drop for PoisonOnUnwind<'_> {
    fn drop(&mut self) {
        let mut c = self.0.commit.lock();
        self.0.commit.poison(
            &mut c,
            std::io::Error::other("an append panicked; the log takes no more writes"),
        );
    }
}

/// An append whose records are written and ordered, waiting for its acknowledgement.
#[must_use = "an append is acknowledged only by waiting on its handle"]
pub struct AppendHandle {
    shared: Arc<Shared>,
    results: Vec<AppendResult>,
    durable_target: Option<Position>,
}

impl std::fmt::Debug for AppendHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendHandle")
            .field("results", &self.results)
            .finish_non_exhaustive()
    }
}

impl AppendHandle {
    /// Waits for the acknowledgement and returns one result per stream of the request.
    ///
    /// # Errors
    /// [`Error::Poisoned`] if the sync that would have made the records durable failed.
    pub fn wait(self) -> Result<Vec<AppendResult>> {
        if let Some(target) = self.durable_target {
            self.shared.wait_durable(target)?;
        }
        Ok(self.results)
    }

    /// Whether [`AppendHandle::wait`] would return without blocking.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.durable_target.is_none_or(|t| {
            let c = self.shared.commit.lock();
            c.durable >= t || c.poisoned.is_some()
        })
    }
}
