//! One segment file: reading and validating its records, scanning for recovery, and the
//! header and footer pages (docs/FORMAT.md, "Segment file", "Recovery").
//!
//! Records are read through a [`ByteSource`]: the live map for the active and sealed
//! segments of an open log, or plain `pread`s ([`FileSource`]) for recovery, verification
//! and forensic reads of files that may be damaged or short, so that a short file is an
//! error and never a SIGBUS.

use std::io;

use crate::format::chain::{body_hash, chain_step};
use crate::format::envelope::EnvelopeRef;
use crate::format::pruned::{self, PrunedRef};
use crate::format::record::{
    BodyForm, Layout, RECORD_HEADER_MAX, RecordHeader, check_padding, flags,
};
use crate::format::{DecodeError, EventId, Hash32, PAGE_BYTES, Position};
use crate::sys::FsFile;

mod live;
pub(crate) use live::{ActiveSegment, MapSlot, SegState, SegmentHandle};

/// Bytes that a reader can borrow at a file offset.
pub(crate) trait ByteSource {
    /// `len` bytes at `offset`, or an error if they are not all available.
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]>;
}

/// Plain reads of a file through a window buffer.
pub(crate) struct FileSource<'f> {
    file: &'f dyn FsFile,
    file_len: u64,
    window_start: u64,
    window: Vec<u8>,
}

/// Bytes read per `pread` when scanning.
const WINDOW_BYTES: usize = 1 << 20;

impl<'f> FileSource<'f> {
    pub(crate) fn new(file: &'f dyn FsFile) -> io::Result<FileSource<'f>> {
        Ok(FileSource {
            file,
            file_len: file.len()?,
            window_start: 0,
            window: Vec::new(),
        })
    }
}

impl ByteSource for FileSource<'_> {
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if end > self.file_len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read {offset}..{end} past the end of a {} byte file",
                    self.file_len
                ),
            ));
        }
        let cached =
            offset >= self.window_start && end <= self.window_start + self.window.len() as u64;
        if !cached {
            // `len` is bounded by the callers (a header, or a body whose length was checked
            // against BODY_BYTES_MAX), so the window stays small.
            let want = (len.max(WINDOW_BYTES) as u64).min(self.file_len - offset) as usize;
            self.window.resize(want, 0);
            self.file.read_exact_at(&mut self.window, offset)?;
            self.window_start = offset;
        }
        let at = (offset - self.window_start) as usize;
        Ok(&self.window[at..at + len])
    }
}

/// A slice of published map bytes.
pub(crate) struct SliceSource<'a> {
    pub(crate) bytes: &'a [u8],
}

impl ByteSource for SliceSource<'_> {
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        let start = usize::try_from(offset).ok();
        start
            .and_then(|s| self.bytes.get(s..s.checked_add(len)?))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::UnexpectedEof, "read past published bytes")
            })
    }
}

/// Bytes of a segment from segment offset `base` on (one block of a cold segment).
pub(crate) struct OffsetSource<'a> {
    pub(crate) base: u64,
    pub(crate) bytes: &'a [u8],
}

impl ByteSource for OffsetSource<'_> {
    fn bytes(&mut self, offset: u64, len: usize) -> io::Result<&[u8]> {
        offset
            .checked_sub(self.base)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| self.bytes.get(at..at.checked_add(len)?))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read {offset}+{len} outside the block at {} of {} bytes",
                        self.base,
                        self.bytes.len()
                    ),
                )
            })
    }
}

/// Why a record could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The bytes could not be read.
    #[error("reading record at byte {offset}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// The bytes are not a valid record.
    #[error("invalid record at byte {offset}")]
    Invalid {
        offset: u64,
        #[source]
        source: DecodeError,
    },
}

/// A record whose header, body checksum and padding were checked.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordRef<'a> {
    pub(crate) offset: u64,
    pub(crate) header: RecordHeader,
    /// The header as stored: its first `header.header_len()` bytes.
    pub(crate) header_bytes: [u8; RECORD_HEADER_MAX],
    pub(crate) body: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// File offset of the next record.
    pub(crate) fn end(&self) -> u64 {
        self.offset + self.header.record_len()
    }

    /// The envelope's bytes: the body after the producer block of a signed batch's first
    /// record, the whole body otherwise.
    pub(crate) fn envelope_bytes(&self) -> &'a [u8] {
        self.header.envelope_of(self.body)
    }

    /// Decodes the body's envelope. A record whose event retention removed has none
    /// ([`RecordRef::content`] tells it).
    pub(crate) fn envelope(&self) -> Result<EnvelopeRef<'a>, RecordError> {
        if self.header.body_form == BodyForm::Pruned {
            return Err(RecordError::Invalid {
                offset: self.offset,
                source: DecodeError::Invalid {
                    what: "record",
                    detail: format!(
                        "the event at position {} was removed by retention",
                        self.header.position
                    ),
                },
            });
        }
        EnvelopeRef::decode_in(self.envelope_bytes(), self.header.layout).map_err(|source| {
            RecordError::Invalid {
                offset: self.offset,
                source,
            }
        })
    }

    /// Decodes what the body holds: the event's envelope, or what retention left of it.
    pub(crate) fn content(&self) -> Result<Content<'a>, RecordError> {
        match self.header.body_form {
            BodyForm::Envelope => self.envelope().map(Content::Event),
            BodyForm::Pruned => pruned::decode(self.body)
                .map(Content::Removed)
                .map_err(|source| RecordError::Invalid {
                    offset: self.offset,
                    source,
                }),
        }
    }

    /// The hash the chain links for the body: BLAKE3 of the body, or for a pruned record
    /// the original body's hash it keeps.
    pub(crate) fn body_hash(&self) -> Result<Hash32, RecordError> {
        match self.header.body_form {
            BodyForm::Envelope => Ok(body_hash(self.body)),
            BodyForm::Pruned => pruned::decode(self.body)
                .map(|p| p.body_hash)
                .map_err(|source| RecordError::Invalid {
                    offset: self.offset,
                    source,
                }),
        }
    }

    /// Checks the stored chain hash against `prev`.
    pub(crate) fn check_chain(&self, prev: &Hash32) -> Result<(), RecordError> {
        let computed = chain_step(prev, &self.header_bytes, &self.body_hash()?);
        if computed != self.header.chain_hash {
            return Err(RecordError::Invalid {
                offset: self.offset,
                source: DecodeError::ChainBroken {
                    position: self.header.position.0,
                },
            });
        }
        Ok(())
    }
}

/// What a record's body holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Content<'a> {
    /// The event.
    Event(EnvelopeRef<'a>),
    /// The event was removed by retention; this is what is left.
    Removed(PrunedRef<'a>),
}

impl<'a> Content<'a> {
    /// The event's stream.
    pub(crate) fn stream(&self) -> &'a str {
        match self {
            Content::Event(e) => e.stream,
            Content::Removed(p) => p.stream,
        }
    }

    /// The event's id, unless retention removed it.
    pub(crate) fn event_id(&self) -> Option<EventId> {
        match self {
            Content::Event(e) => Some(e.event_id),
            Content::Removed(_) => None,
        }
    }
}

/// Reads and checks the record at `offset`, which must end at or before `limit`.
pub(crate) fn read_record<'s, S: ByteSource>(
    src: &'s mut S,
    layout: Layout,
    offset: u64,
    limit: u64,
) -> Result<RecordRef<'s>, RecordError> {
    read_record_checked(src, layout, offset, limit, true)
}

/// [`read_record`], optionally without checking the body's CRC: for callers that check the
/// record's chain link, which covers the body through its BLAKE3 hash (a stronger check;
/// the header CRC still covers the stored `body_crc`).
pub(crate) fn read_record_checked<'s, S: ByteSource>(
    src: &'s mut S,
    layout: Layout,
    offset: u64,
    limit: u64,
    check_body_crc: bool,
) -> Result<RecordRef<'s>, RecordError> {
    let invalid = |source| RecordError::Invalid { offset, source };
    let header_len = layout.header_len();
    if offset + header_len as u64 > limit {
        return Err(invalid(DecodeError::Truncated {
            needed: header_len as u64,
            have: limit.saturating_sub(offset),
        }));
    }
    let io = |source| RecordError::Io { offset, source };
    let mut header_bytes = [0u8; RECORD_HEADER_MAX];
    header_bytes[..header_len].copy_from_slice(src.bytes(offset, header_len).map_err(io)?);
    let header = RecordHeader::decode_in(&header_bytes, layout).map_err(invalid)?;
    let record_len = header.record_len();
    if offset + record_len > limit {
        return Err(invalid(DecodeError::Truncated {
            needed: record_len,
            have: limit - offset,
        }));
    }
    let padded = (record_len - header_len as u64) as usize;
    let all = src.bytes(offset + header_len as u64, padded).map_err(io)?;
    let (body, padding) = all.split_at(header.body_len as usize);
    if check_body_crc {
        header.check_body(body).map_err(invalid)?;
    }
    check_padding(padding).map_err(invalid)?;
    Ok(RecordRef {
        offset,
        header,
        header_bytes,
        body,
    })
}

/// Where a scan starts: the record expected at `offset` has `position` and chains from
/// `chain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanFrom {
    /// The segment's record layout.
    pub(crate) layout: Layout,
    pub(crate) offset: u64,
    pub(crate) position: Position,
    pub(crate) chain: Hash32,
}

/// What a scan learned about one record.
#[derive(Debug, Clone)]
pub(crate) struct ScannedRecord {
    pub(crate) offset: u64,
    pub(crate) header: RecordHeader,
    /// `None` for an event retention removed.
    pub(crate) event_id: Option<EventId>,
    pub(crate) stream: String,
}

/// How a scan ended.
#[derive(Debug)]
pub(crate) enum ScanEnd {
    /// Zero bytes where the next header would be, or no room for one: the end of the data.
    Clean { offset: u64 },
    /// The bytes at `offset` are not the expected record.
    Break {
        offset: u64,
        position: Position,
        error: RecordError,
    },
}

/// The result of scanning a segment's records.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Every valid record, in order, including any after the last batch end.
    pub(crate) records: Vec<ScannedRecord>,
    /// How the run of valid records ended.
    pub(crate) end: ScanEnd,
    /// Records `0..complete` end with a batch end: the rest are an unfinished batch.
    pub(crate) complete: usize,
    /// Chain hash after `records[..complete]`.
    pub(crate) complete_chain: Hash32,
    /// File offset after `records[..complete]`.
    pub(crate) complete_end: u64,
}

/// Scans records from `from` up to `limit`, checking headers, bodies, envelopes, positions
/// and the chain, and stops at the first record that fails or at zero bytes.
///
/// # Errors
/// Only I/O errors that prevent reading at all; damaged bytes end the scan with
/// [`ScanEnd::Break`].
pub(crate) fn scan<S: ByteSource>(src: &mut S, from: ScanFrom, limit: u64) -> Scan {
    let mut records = Vec::new();
    let summary = scan_visit(src, from, limit, u64::MAX, &mut |rec, env| {
        records.push(ScannedRecord {
            offset: rec.offset,
            header: rec.header,
            event_id: env.event_id(),
            stream: env.stream().to_owned(),
        });
    });
    Scan {
        records,
        end: summary.end,
        complete: summary.complete as usize,
        complete_chain: summary.complete_chain,
        complete_end: summary.complete_end,
    }
}

/// How a [`scan_visit`] ended: [`Scan`] without the records.
#[derive(Debug)]
pub(crate) struct ScanSummary {
    /// Records visited.
    pub(crate) visited: u64,
    /// How the run of valid records ended (`Clean` also when `max_records` were visited).
    pub(crate) end: ScanEnd,
    /// Records `0..complete` end with a batch end: the rest are an unfinished batch.
    pub(crate) complete: u64,
    /// Chain hash after the first `complete` records.
    pub(crate) complete_chain: Hash32,
    /// File offset after the first `complete` records.
    pub(crate) complete_end: u64,
}

/// The checks of [`scan`], handing each valid record and its envelope to `visit` instead of
/// collecting them, and stopping after `max_records`.
pub(crate) fn scan_visit<S: ByteSource>(
    src: &mut S,
    from: ScanFrom,
    limit: u64,
    max_records: u64,
    visit: &mut dyn FnMut(&RecordRef<'_>, &Content<'_>),
) -> ScanSummary {
    let mut visited = 0u64;
    let mut offset = from.offset;
    let mut position = from.position;
    let mut chain = from.chain;
    let mut complete = 0;
    let mut complete_chain = chain;
    let mut complete_end = offset;
    let mut in_batch = false;
    let layout = from.layout;
    let header_len = layout.header_len();
    let end = loop {
        if visited == max_records || offset + header_len as u64 > limit {
            break ScanEnd::Clean { offset };
        }
        match src.bytes(offset, header_len) {
            Ok(b) if b.iter().all(|&x| x == 0) => break ScanEnd::Clean { offset },
            Ok(_) => {}
            Err(source) => {
                break ScanEnd::Break {
                    offset,
                    position,
                    error: RecordError::Io { offset, source },
                };
            }
        }
        let step = read_record(src, layout, offset, limit).and_then(|rec| {
            if rec.header.position != position {
                return Err(RecordError::Invalid {
                    offset,
                    source: DecodeError::Invalid {
                        what: "record position",
                        detail: format!("expected {position}, found {}", rec.header.position),
                    },
                });
            }
            let starts = rec.header.flags & flags::BATCH_START != 0;
            if starts == in_batch {
                return Err(RecordError::Invalid {
                    offset,
                    source: DecodeError::Invalid {
                        what: "record flags",
                        detail: if starts {
                            "batch start inside a batch".to_owned()
                        } else {
                            "record outside a batch".to_owned()
                        },
                    },
                });
            }
            rec.check_chain(&chain)?;
            let content = rec.content()?;
            visit(&rec, &content);
            Ok((rec.header, rec.end()))
        });
        match step {
            Ok((header, next)) => {
                chain = header.chain_hash;
                in_batch = header.flags & flags::BATCH_END == 0;
                visited += 1;
                offset = next;
                position = position.next();
                if !in_batch {
                    complete = visited;
                    complete_chain = chain;
                    complete_end = offset;
                }
            }
            Err(error) => {
                break ScanEnd::Break {
                    offset,
                    position,
                    error,
                };
            }
        }
    };
    ScanSummary {
        visited,
        end,
        complete,
        complete_chain,
        complete_end,
    }
}

/// Looks for evidence, after a break at `break_position`, that the break damaged data that
/// had been acknowledged durable: any record header in `offset..limit` (on 8-byte
/// boundaries) whose CRC holds and that says the log was durable beyond the break. Returns
/// the offset and header of the first such record, and the end of the last non-zero byte
/// in the range (so that a torn tail can be zeroed entirely).
pub(crate) fn find_durable_evidence<S: ByteSource>(
    src: &mut S,
    layout: Layout,
    offset: u64,
    limit: u64,
    break_position: Position,
) -> io::Result<(Option<(u64, RecordHeader)>, u64)> {
    let mut last_nonzero_end = offset;
    let mut evidence = None;
    let mut at = offset;
    let chunk = 64 * 1024u64;
    while at < limit {
        let n = chunk.min(limit - at);
        let bytes = src.bytes(at, n as usize)?.to_vec();
        for (i, word) in bytes.chunks(8).enumerate() {
            if word.iter().all(|&b| b == 0) {
                continue;
            }
            let word_at = at + (i * 8) as u64;
            last_nonzero_end = word_at + word.len() as u64;
            if word_at + layout.header_len() as u64 <= limit {
                let hb = src.bytes(word_at, layout.header_len())?;
                if evidence.is_none()
                    && let Ok(h) = RecordHeader::decode_in(hb, layout)
                    && h.durable_through() > break_position
                {
                    evidence = Some((word_at, h));
                }
            }
        }
        at += n;
    }
    Ok((evidence, last_nonzero_end))
}

/// Reads one page at `offset` with a plain read.
pub(crate) fn read_page(file: &dyn FsFile, offset: u64) -> io::Result<Vec<u8>> {
    let mut page = vec![0u8; PAGE_BYTES as usize];
    file.read_exact_at(&mut page, offset)?;
    Ok(page)
}

/// Whether every byte is zero.
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

/// Writes zeros over `start..end` with plain writes and syncs the file.
pub(crate) fn zero_range(file: &dyn FsFile, start: u64, end: u64) -> io::Result<()> {
    let zeros = [0u8; 4096];
    let mut at = start;
    while at < end {
        let n = (end - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Timestamp;
    use crate::format::chain::chain_seed;
    use crate::format::envelope::ContentType;
    use crate::format::record::{RECORD_HEADER_LEN, RecordKind, record_len};

    /// Builds `n` records in batches of `batch`, as the log would write them.
    fn build(n: u64, batch: u64) -> (Vec<u8>, Hash32) {
        let seed = chain_seed(&[1; 16]);
        let mut chain = seed;
        let mut out = Vec::new();
        for i in 0..n {
            let mut body = Vec::new();
            EnvelopeRef {
                event_id: EventId([i as u8; 16]),
                event_time: Timestamp(5),
                schema_version: 1,
                content_type: ContentType::Binary,
                stream: "s-1",
                aggregate_type: "",
                event_type: "T",
                correlation_id: "",
                causation_id: "",
                actor: "",
                payload: &vec![i as u8; (i % 5) as usize],
                payload_form: crate::format::envelope::PayloadForm::Inline,
            }
            .encode_into(&mut body)
            .unwrap();
            let mut fl = 0;
            if i % batch == 0 {
                fl |= flags::BATCH_START;
            }
            if i % batch == batch - 1 || i == n - 1 {
                fl |= flags::BATCH_END;
            }
            let mut h = RecordHeader {
                layout: Layout::V1,
                stream_prev: crate::format::record::NO_STREAM_PREV,
                body_len: body.len() as u32,
                body_crc: crc32fast::hash(&body),
                durable_lag: 0,
                position: Position(i),
                stream_version: i,
                record_time: Timestamp(i),
                flags: fl,
                kind: RecordKind::Event,
                chain_hash: [0; 32],
                body_form: crate::format::record::BodyForm::Envelope,
            };
            let mut hb = [0u8; RECORD_HEADER_LEN];
            h.encode_into(&mut hb);
            h.chain_hash = chain_step(&chain, &hb, &body_hash(&body));
            h.encode_into(&mut hb);
            chain = h.chain_hash;
            out.extend_from_slice(&hb);
            out.extend_from_slice(&body);
            out.resize(
                out.len() + (record_len(body.len() as u32) as usize - 80 - body.len()),
                0,
            );
        }
        (out, seed)
    }

    fn from(seed: Hash32) -> ScanFrom {
        ScanFrom {
            layout: Layout::V1,
            offset: 0,
            position: Position(0),
            chain: seed,
        }
    }

    #[test]
    fn scan_reads_everything_and_stops_at_zeros() {
        let (mut bytes, seed) = build(10, 3);
        let data_len = bytes.len() as u64;
        bytes.resize(bytes.len() + 4096, 0);
        let limit = bytes.len() as u64;
        let s = scan(&mut SliceSource { bytes: &bytes }, from(seed), limit);
        assert_eq!(s.records.len(), 10);
        assert_eq!(s.complete, 10);
        assert!(matches!(s.end, ScanEnd::Clean { offset } if offset == data_len));
        assert_eq!(s.complete_end, data_len);
        assert_eq!(s.records[9].event_id, Some(EventId([9; 16])));
        assert_eq!(s.records[4].stream, "s-1");
    }

    #[test]
    fn unfinished_batch_is_not_complete() {
        let (bytes, seed) = build(10, 4);
        // Cut the log after record 5: records 4 and 5 form half of the batch 4..8.
        let s = scan(
            &mut SliceSource { bytes: &bytes },
            from(seed),
            bytes.len() as u64,
        );
        let cut = s.records[6].offset as usize;
        let mut torn = bytes[..cut].to_vec();
        torn.resize(torn.len() + 4096, 0);
        let s = scan(
            &mut SliceSource { bytes: &torn },
            from(seed),
            torn.len() as u64,
        );
        assert_eq!(s.records.len(), 6);
        assert_eq!(s.complete, 4);
        assert_eq!(s.complete_chain, s.records[3].header.chain_hash);
    }

    #[test]
    fn a_flip_anywhere_breaks_the_scan_at_or_before_its_record() {
        let (bytes, seed) = build(6, 2);
        let full = scan(
            &mut SliceSource { bytes: &bytes },
            from(seed),
            bytes.len() as u64,
        );
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            let s = scan(&mut SliceSource { bytes: &b }, from(seed), b.len() as u64);
            let hit = full
                .records
                .iter()
                .rposition(|r| r.offset as usize <= i)
                .unwrap();
            assert!(
                s.records.len() <= hit,
                "flip at byte {i} (record {hit}) not detected"
            );
            assert!(matches!(s.end, ScanEnd::Break { .. }));
        }
    }

    #[test]
    fn wrong_seed_or_position_breaks_at_the_first_record() {
        let (bytes, seed) = build(3, 1);
        let s = scan(
            &mut SliceSource { bytes: &bytes },
            from([0; 32]),
            bytes.len() as u64,
        );
        assert!(s.records.is_empty());
        assert!(matches!(
            s.end,
            ScanEnd::Break {
                error: RecordError::Invalid {
                    source: DecodeError::ChainBroken { .. },
                    ..
                },
                ..
            }
        ));
        let start = ScanFrom {
            position: Position(1),
            ..from(seed)
        };
        let s = scan(
            &mut SliceSource { bytes: &bytes },
            start,
            bytes.len() as u64,
        );
        assert!(s.records.is_empty());
    }

    #[test]
    fn evidence_search_finds_records_claiming_durability_past_a_break() {
        let (bytes, _) = build(4, 1);
        let mut h = RecordHeader::decode(&bytes[..80]).unwrap();
        h.position = Position(10);
        h.durable_lag = 2;
        let mut hb = [0u8; RECORD_HEADER_LEN];
        h.encode_into(&mut hb);
        let mut area = vec![0u8; 4096];
        area[1024..1104].copy_from_slice(&hb);
        let (found, _) = find_durable_evidence(
            &mut SliceSource { bytes: &area },
            Layout::V1,
            0,
            4096,
            Position(5),
        )
        .unwrap();
        assert_eq!(found.map(|f| f.0), Some(1024), "durable through 8 > 5");
        let (_, end) = find_durable_evidence(
            &mut SliceSource { bytes: &area },
            Layout::V1,
            0,
            4096,
            Position(5),
        )
        .unwrap();
        assert_eq!(
            end,
            1024 + 80,
            "the search goes on past the evidence to the last non-zero byte"
        );
        let (found, end) = find_durable_evidence(
            &mut SliceSource { bytes: &area },
            Layout::V1,
            0,
            4096,
            Position(8),
        )
        .unwrap();
        assert_eq!(found, None, "durable through 8 is not past a break at 8");
        assert_eq!(
            end,
            1024 + 80,
            "the whole area was searched: the header ends at 1104"
        );
    }
}
