//! The fixed-size record header (docs/FORMAT.md, "Record header"): 80 bytes in format
//! version 1, 88 in version 2, which adds `stream_prev` (the position of the previous event
//! of the record's stream) to the bytes the chain links and moves `position` out of them.
//!
//! A record is the header, the body (an encoded [`super::envelope`]), and zero padding up to
//! the next multiple of [`RECORD_ALIGN`]. The header carries its own CRC so that a reader can
//! trust `body_len` before it reads the body, and a separate CRC of the body so that a scan
//! can check the body without hashing it.

use super::{DecodeError, Hash32, Position, Timestamp, check_crc, check_zero, le, need};

/// Bytes in a version 1 record header.
pub const RECORD_HEADER_LEN: usize = 80;
/// Bytes in a version 2 record header.
pub const RECORD_HEADER_V2_LEN: usize = 88;
/// The largest record header of any version.
pub const RECORD_HEADER_MAX: usize = RECORD_HEADER_V2_LEN;
/// Records start at offsets that are multiples of this.
pub const RECORD_ALIGN: usize = 8;

/// `header_crc`: CRC-32 of bytes `HEADER_CRC_COVERS_FROM..RECORD_HEADER_LEN`.
pub const HEADER_CRC_OFFSET: usize = 0;
/// `body_len`: bytes of body after the header, excluding padding.
pub const BODY_LEN_OFFSET: usize = HEADER_CRC_OFFSET + 4;
/// `body_crc`: CRC-32 of the body.
pub const BODY_CRC_OFFSET: usize = BODY_LEN_OFFSET + 4;
/// `durable_lag`: how far behind this record the durable watermark was when it was written.
pub const DURABLE_LAG_OFFSET: usize = BODY_CRC_OFFSET + 4;
/// `position`: the record's position in the log.
pub const POSITION_OFFSET: usize = DURABLE_LAG_OFFSET + 4;
/// `stream_version`: the event's version in its stream (0 for the first event).
pub const STREAM_VERSION_OFFSET: usize = POSITION_OFFSET + 8;
/// `record_time`: nanoseconds since the Unix epoch, assigned by the engine.
pub const RECORD_TIME_OFFSET: usize = STREAM_VERSION_OFFSET + 8;
/// `flags`: see [`flags`].
pub const FLAGS_OFFSET: usize = RECORD_TIME_OFFSET + 8;
/// `kind`: see [`RecordKind`].
pub const KIND_OFFSET: usize = FLAGS_OFFSET + 2;
/// `reserved`: zero.
pub const RESERVED_OFFSET: usize = KIND_OFFSET + 2;
/// `chain_hash`: this record's hash in the chain (docs/FORMAT.md, "Hash chain").
pub const CHAIN_HASH_OFFSET: usize = RESERVED_OFFSET + 4;

/// The header CRC covers everything after itself.
pub const HEADER_CRC_COVERS_FROM: usize = BODY_LEN_OFFSET;
/// The chain link takes header bytes `LINK_FROM..LINK_TO` verbatim (32 bytes).
pub const LINK_FROM: usize = DURABLE_LAG_OFFSET;
/// End of the header bytes that go into the chain link.
pub const LINK_TO: usize = RESERVED_OFFSET;

const _: () = assert!(CHAIN_HASH_OFFSET + 32 == RECORD_HEADER_LEN);
const _: () = assert!(LINK_TO - LINK_FROM == 32);
const _: () = assert!(RECORD_HEADER_LEN.is_multiple_of(RECORD_ALIGN));

/// Version 2: `stream_prev`, where version 1 has `position` (inside the link).
pub const V2_STREAM_PREV_OFFSET: usize = POSITION_OFFSET;
/// Version 2: `reserved` (4 bytes), as in version 1.
pub const V2_RESERVED_OFFSET: usize = RESERVED_OFFSET;
/// Version 2: `position`, after the linked bytes.
pub const V2_POSITION_OFFSET: usize = V2_RESERVED_OFFSET + 4;
/// Version 2: `chain_hash`.
pub const V2_CHAIN_HASH_OFFSET: usize = V2_POSITION_OFFSET + 8;
const _: () = assert!(V2_CHAIN_HASH_OFFSET + 32 == RECORD_HEADER_V2_LEN);
const _: () = assert!(RECORD_HEADER_V2_LEN.is_multiple_of(RECORD_ALIGN));
// The linked bytes are 12..44 in both versions, so a chain step hashes one 64-byte block.
const _: () = assert!(V2_STREAM_PREV_OFFSET >= LINK_FROM && V2_STREAM_PREV_OFFSET + 8 <= LINK_TO);

/// `stream_prev` of a stream's first event (version 0): no previous event.
pub const NO_STREAM_PREV: u64 = u64::MAX;

/// How a segment's records are laid out: by the format version of its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Format version 1: an 80-byte header, `position` linked.
    V1,
    /// Format version 2: an 88-byte header, `stream_prev` linked, `position` after the link.
    V2,
    /// Format version 3: the record header of version 2; an envelope may refer to its payload
    /// as a content-addressed blob (docs/FORMAT.md, 6.5).
    V3,
    /// Format version 4: the layout of version 3, and the header's byte 44 says what the
    /// body holds ([`BodyForm`]): the envelope, or what retention left of it
    /// (docs/FORMAT.md 5.5).
    V4,
    /// Format version 5: the layout of version 4, and an envelope may seal personal data
    /// with a key of its data subject (docs/FORMAT.md 6.6).
    V5,
}

/// What a record's body holds (format version 4, header byte 44; earlier versions always
/// hold the envelope).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BodyForm {
    /// The event envelope (after the producer block in a signed batch's first record).
    Envelope = 0,
    /// Removed by retention: the body is a pruned body ([`super::pruned`]) that keeps the
    /// original body's hash, so the chain still links.
    Pruned = 1,
}

/// Version 4: `body_form` ([`BodyForm`]), the first byte of what earlier versions reserve.
/// It is outside the chain link (bytes 12..44), so pruning a record never changes its hash.
pub const BODY_FORM_OFFSET: usize = RESERVED_OFFSET;

impl Layout {
    /// The layout of format version `version` (1, 2 or 3).
    #[must_use]
    pub fn of_version(version: u16) -> Option<Layout> {
        match version {
            1 => Some(Layout::V1),
            2 => Some(Layout::V2),
            3 => Some(Layout::V3),
            4 => Some(Layout::V4),
            5 => Some(Layout::V5),
            _ => None,
        }
    }

    /// The format version of this layout.
    #[must_use]
    pub fn version(self) -> u16 {
        match self {
            Layout::V1 => 1,
            Layout::V2 => 2,
            Layout::V3 => 3,
            Layout::V4 => 4,
            Layout::V5 => 5,
        }
    }

    /// Bytes of a record header.
    #[must_use]
    pub fn header_len(self) -> usize {
        match self {
            Layout::V1 => RECORD_HEADER_LEN,
            Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => RECORD_HEADER_V2_LEN,
        }
    }

    fn position_offset(self) -> usize {
        match self {
            Layout::V1 => POSITION_OFFSET,
            Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => V2_POSITION_OFFSET,
        }
    }

    fn chain_hash_offset(self) -> usize {
        match self {
            Layout::V1 => CHAIN_HASH_OFFSET,
            Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => V2_CHAIN_HASH_OFFSET,
        }
    }

    /// The layout version of the checkpoint statements of a log of this format
    /// (docs/FORMAT.md 17.1): 1 for version 1, 2 (with the stream heads map) from version 2.
    #[must_use]
    pub fn statement_version(self) -> u16 {
        match self {
            Layout::V1 => 1,
            Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => 2,
        }
    }

    /// Whether records link their stream's previous record (`stream_prev`, version 2 on).
    #[must_use]
    pub fn links_stream_prev(self) -> bool {
        self != Layout::V1
    }

    /// Whether an envelope may hold a blob reference instead of its payload (version 3 on).
    #[must_use]
    pub fn allows_blobs(self) -> bool {
        matches!(self, Layout::V3 | Layout::V4 | Layout::V5)
    }

    /// Whether a record's body may be pruned by retention (version 4 on).
    #[must_use]
    pub fn allows_pruning(self) -> bool {
        matches!(self, Layout::V4 | Layout::V5)
    }

    /// Whether an envelope may seal personal data (version 5 on).
    #[must_use]
    pub fn allows_sealing(self) -> bool {
        self == Layout::V5
    }

    /// Bytes a record with a body of `body_len` occupies, padding included.
    #[must_use]
    pub fn record_len(self, body_len: u32) -> u64 {
        let raw = self.header_len() as u64 + u64::from(body_len);
        raw.next_multiple_of(RECORD_ALIGN as u64)
    }
}

/// The largest body a record may carry: the envelope's fixed part and string limits plus
/// the largest payload.
pub const BODY_BYTES_MAX: u32 = super::envelope::BODY_BYTES_MAX;

/// Record flag bits. Version 1 defines the batch markers; the others are reserved for later
/// versions and must be zero.
pub mod flags {
    /// First record of an atomic batch.
    pub const BATCH_START: u16 = 1 << 0;
    /// Last record of an atomic batch. Readers see a batch only once its end is durable.
    pub const BATCH_END: u16 = 1 << 1;
    /// Reserved: the record marks a deleted stream.
    pub const TOMBSTONE: u16 = 1 << 2;
    /// Reserved: the body was redacted (crypto-shredded).
    pub const REDACTED: u16 = 1 << 3;
    /// Reserved: the body is encrypted.
    pub const ENCRYPTED: u16 = 1 << 4;
    /// Format version 2: the first record of a producer-signed batch; its body starts with
    /// the producer block (`format::producer`) before the envelope.
    pub const PRODUCER_SIGNED: u16 = 1 << 5;
    /// The bits version 1 accepts.
    pub const KNOWN_V1: u16 = BATCH_START | BATCH_END;
    /// The bits version 2 accepts.
    pub const KNOWN_V2: u16 = BATCH_START | BATCH_END | PRODUCER_SIGNED;
}

/// What a record holds. Version 1 has events only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RecordKind {
    /// An event envelope.
    Event = 1,
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Which layout it has (its segment's format version).
    pub layout: Layout,
    /// Bytes of body that follow the header.
    pub body_len: u32,
    /// CRC-32 of the body.
    pub body_crc: u32,
    /// `position - durable_through` at the time of writing, saturated at `u32::MAX`; see
    /// docs/FORMAT.md, "Recovery". Lets recovery tell a torn tail from damage to data that
    /// was already acknowledged.
    pub durable_lag: u32,
    /// The record's position in the log.
    pub position: Position,
    /// The event's version in its stream.
    pub stream_version: u64,
    /// Version 2: the position of the previous event of the same stream ([`NO_STREAM_PREV`]
    /// for version 0). Version 1 records have none: [`NO_STREAM_PREV`].
    pub stream_prev: u64,
    /// When the engine wrote it.
    pub record_time: Timestamp,
    /// [`flags`] bits.
    pub flags: u16,
    /// What the body holds.
    pub kind: RecordKind,
    /// The record's chain hash.
    pub chain_hash: Hash32,
    /// What the body holds (always [`BodyForm::Envelope`] before version 4).
    pub body_form: BodyForm,
}

impl RecordHeader {
    /// Bytes the whole record occupies in a segment, padding included.
    #[must_use]
    pub fn record_len(&self) -> u64 {
        self.layout.record_len(self.body_len)
    }

    /// Bytes of the header itself.
    #[must_use]
    pub fn header_len(&self) -> usize {
        self.layout.header_len()
    }

    /// The 32 header bytes that enter the chain link, as they are laid out on disk.
    #[must_use]
    pub fn link_prefix(&self) -> [u8; 32] {
        let mut buf = [0u8; RECORD_HEADER_MAX];
        self.encode_into(&mut buf);
        le::array_at(&buf, LINK_FROM)
    }

    /// The position the durable watermark had reached when this record was written: every
    /// record before it had been acknowledged durable.
    #[must_use]
    pub fn durable_through(&self) -> Position {
        Position(self.position.0.saturating_sub(u64::from(self.durable_lag)))
    }

    /// Writes the header into the first [`RecordHeader::header_len`] bytes of `out`,
    /// computing `header_crc` last. Returns the bytes written.
    ///
    /// # Panics
    /// If `out` is shorter than the header.
    pub fn encode_into(&self, out: &mut [u8]) -> usize {
        let len = self.layout.header_len();
        let out = &mut out[..len];
        le::put_u32(out, BODY_LEN_OFFSET, self.body_len);
        le::put_u32(out, BODY_CRC_OFFSET, self.body_crc);
        le::put_u32(out, DURABLE_LAG_OFFSET, self.durable_lag);
        le::put_u64(out, self.layout.position_offset(), self.position.0);
        if self.layout.links_stream_prev() {
            le::put_u64(out, V2_STREAM_PREV_OFFSET, self.stream_prev);
        }
        le::put_u64(out, STREAM_VERSION_OFFSET, self.stream_version);
        le::put_u64(out, RECORD_TIME_OFFSET, self.record_time.0);
        le::put_u16(out, FLAGS_OFFSET, self.flags);
        le::put_u16(out, KIND_OFFSET, self.kind as u16);
        le::put_u32(out, RESERVED_OFFSET, 0);
        out[BODY_FORM_OFFSET] = self.body_form as u8;
        let at = self.layout.chain_hash_offset();
        out[at..at + 32].copy_from_slice(&self.chain_hash);
        let crc = crc32fast::hash(&out[HEADER_CRC_COVERS_FROM..]);
        le::put_u32(out, HEADER_CRC_OFFSET, crc);
        len
    }

    /// Decodes and checks a version 1 header ([`RecordHeader::decode_in`]).
    ///
    /// # Errors
    /// As [`RecordHeader::decode_in`].
    pub fn decode(buf: &[u8]) -> Result<RecordHeader, DecodeError> {
        RecordHeader::decode_in(buf, Layout::V1)
    }

    /// Decodes and checks a header of `layout`: its CRC first, then every field against
    /// the format.
    ///
    /// # Errors
    /// [`DecodeError`] when the header is short, its CRC does not match, the reserved bytes
    /// are not zero, a flag, kind or length is outside the format, or (version 2) a
    /// `stream_prev` that is not before the record (or is set on a stream's first event).
    pub fn decode_in(buf: &[u8], layout: Layout) -> Result<RecordHeader, DecodeError> {
        let len = layout.header_len();
        need(buf, len)?;
        let buf = &buf[..len];
        check_crc(
            le::u32_at(buf, HEADER_CRC_OFFSET),
            &buf[HEADER_CRC_COVERS_FROM..],
            "record header",
        )?;
        let body_form = match (layout, buf[BODY_FORM_OFFSET]) {
            (_, 0) => BodyForm::Envelope,
            (Layout::V4 | Layout::V5, 1) => BodyForm::Pruned,
            (Layout::V4 | Layout::V5, other) => {
                return Err(DecodeError::Invalid {
                    what: "body_form",
                    detail: format!("{other} is neither 0 (envelope) nor 1 (pruned)"),
                });
            }
            _ => {
                return Err(DecodeError::NonZeroReserved {
                    what: "record header",
                    at: BODY_FORM_OFFSET as u64,
                });
            }
        };
        check_zero(
            buf,
            BODY_FORM_OFFSET + 1..RESERVED_OFFSET + 4,
            "record header",
        )?;
        let body_len = le::u32_at(buf, BODY_LEN_OFFSET);
        if body_len > BODY_BYTES_MAX {
            return Err(DecodeError::TooLong {
                what: "record body",
                len: u64::from(body_len),
                max: u64::from(BODY_BYTES_MAX),
            });
        }
        let flags = le::u16_at(buf, FLAGS_OFFSET);
        let known = match layout {
            Layout::V1 => flags::KNOWN_V1,
            Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => flags::KNOWN_V2,
        };
        if flags & !known != 0 {
            return Err(DecodeError::UnknownFlags { flags });
        }
        if flags & flags::PRODUCER_SIGNED != 0
            && (flags & flags::BATCH_START == 0
                || (body_len as usize) < super::producer::PRODUCER_BLOCK_LEN)
        {
            return Err(DecodeError::Invalid {
                what: "record flags",
                detail: "a producer signature outside a batch's first record, or without its block"
                    .into(),
            });
        }
        let kind = match le::u16_at(buf, KIND_OFFSET) {
            1 => RecordKind::Event,
            other => return Err(DecodeError::UnknownKind { kind: other }),
        };
        let position = le::u64_at(buf, layout.position_offset());
        let durable_lag = le::u32_at(buf, DURABLE_LAG_OFFSET);
        if u64::from(durable_lag) > position {
            return Err(DecodeError::Invalid {
                what: "durable_lag",
                detail: format!("{durable_lag} exceeds position {position}"),
            });
        }
        let stream_version = le::u64_at(buf, STREAM_VERSION_OFFSET);
        let stream_prev = match layout {
            Layout::V1 => NO_STREAM_PREV,
            Layout::V2 | Layout::V3 | Layout::V4 | Layout::V5 => {
                let prev = le::u64_at(buf, V2_STREAM_PREV_OFFSET);
                let ok = if stream_version == 0 {
                    prev == NO_STREAM_PREV
                } else {
                    prev < position
                };
                if !ok {
                    return Err(DecodeError::Invalid {
                        what: "stream_prev",
                        detail: format!(
                            "{prev} for version {stream_version} at position {position}"
                        ),
                    });
                }
                prev
            }
        };
        Ok(RecordHeader {
            layout,
            body_len,
            body_crc: le::u32_at(buf, BODY_CRC_OFFSET),
            durable_lag,
            position: Position(position),
            stream_version,
            stream_prev,
            record_time: Timestamp(le::u64_at(buf, RECORD_TIME_OFFSET)),
            flags,
            kind,
            chain_hash: le::array_at(buf, layout.chain_hash_offset()),
            body_form,
        })
    }

    /// The envelope within a record's body: after the producer block in the first record
    /// of a signed batch, the whole body otherwise. `body` is the checked body.
    #[must_use]
    pub fn envelope_of<'b>(&self, body: &'b [u8]) -> &'b [u8] {
        if self.flags & flags::PRODUCER_SIGNED != 0 {
            body.get(super::producer::PRODUCER_BLOCK_LEN..)
                .unwrap_or_default()
        } else {
            body
        }
    }

    /// Checks `body` (exactly `body_len` bytes) against `body_crc`.
    ///
    /// # Errors
    /// [`DecodeError::LengthMismatch`] or [`DecodeError::Checksum`].
    pub fn check_body(&self, body: &[u8]) -> Result<(), DecodeError> {
        if body.len() as u64 != u64::from(self.body_len) {
            return Err(DecodeError::LengthMismatch {
                what: "record body",
                declared: u64::from(self.body_len),
                actual: body.len() as u64,
            });
        }
        check_crc(self.body_crc, body, "record body")
    }
}

/// Stores `chain_hash` into an encoded header of `layout` (its first
/// [`Layout::header_len`] bytes) and recomputes its CRC.
pub fn set_chain_hash(header: &mut [u8], layout: Layout, chain_hash: &Hash32) {
    let header = &mut header[..layout.header_len()];
    let at = layout.chain_hash_offset();
    header[at..at + 32].copy_from_slice(chain_hash);
    let crc = crc32fast::hash(&header[HEADER_CRC_COVERS_FROM..]);
    le::put_u32(header, HEADER_CRC_OFFSET, crc);
}

/// Bytes a version 1 record with a body of `body_len` occupies, padding included.
#[must_use]
pub fn record_len(body_len: u32) -> u64 {
    Layout::V1.record_len(body_len)
}

/// Checks that the padding after a body (`record_len - header - body_len` bytes) is zero.
///
/// # Errors
/// [`DecodeError::NonZeroReserved`] naming the first non-zero byte.
pub fn check_padding(padding: &[u8]) -> Result<(), DecodeError> {
    check_zero(padding, 0..padding.len(), "record padding")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordHeader {
        RecordHeader {
            layout: Layout::V1,
            stream_prev: NO_STREAM_PREV,
            body_len: 301,
            body_crc: 0xdead_beef,
            durable_lag: 3,
            position: Position(1234),
            stream_version: 7,
            record_time: Timestamp(1_700_000_000_123_456_789),
            flags: flags::BATCH_START | flags::BATCH_END,
            kind: RecordKind::Event,
            chain_hash: [0xab; 32],
            body_form: crate::format::record::BodyForm::Envelope,
        }
    }

    fn encoded() -> [u8; RECORD_HEADER_LEN] {
        let mut buf = [0u8; RECORD_HEADER_LEN];
        sample().encode_into(&mut buf);
        buf
    }

    /// Re-seals a header whose bytes a test has edited, so that the check under test is
    /// reached rather than the CRC check.
    fn reseal(buf: &mut [u8; RECORD_HEADER_LEN]) {
        let crc = crc32fast::hash(&buf[HEADER_CRC_COVERS_FROM..]);
        le::put_u32(buf, HEADER_CRC_OFFSET, crc);
    }

    #[test]
    fn round_trips_every_field() {
        let h = sample();
        assert_eq!(RecordHeader::decode(&encoded()), Ok(h));
        assert_eq!(h.record_len(), 384, "80 + 301 rounded up to 8");
        assert_eq!(h.durable_through(), Position(1231));
    }

    #[test]
    fn every_field_lands_at_its_documented_offset() {
        let b = encoded();
        assert_eq!(le::u32_at(&b, 4), 301);
        assert_eq!(le::u32_at(&b, 8), 0xdead_beef);
        assert_eq!(le::u32_at(&b, 12), 3);
        assert_eq!(le::u64_at(&b, 16), 1234);
        assert_eq!(le::u64_at(&b, 24), 7);
        assert_eq!(le::u64_at(&b, 32), 1_700_000_000_123_456_789);
        assert_eq!(le::u16_at(&b, 40), 3);
        assert_eq!(le::u16_at(&b, 42), 1);
        assert_eq!(le::u32_at(&b, 44), 0);
        assert_eq!(&b[48..80], &[0xab; 32]);
        assert_eq!(le::u32_at(&b, 0), crc32fast::hash(&b[4..80]));
        assert_eq!(sample().link_prefix()[..], b[12..44]);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let good = encoded();
        for bit in 0..RECORD_HEADER_LEN * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordHeader::decode(&b).is_err(),
                "flip of bit {bit} was accepted"
            );
        }
    }

    #[test]
    fn rejects_short_input() {
        let b = encoded();
        assert_eq!(
            RecordHeader::decode(&b[..79]),
            Err(DecodeError::Truncated {
                needed: 80,
                have: 79
            })
        );
    }

    #[test]
    fn rejects_bad_crc() {
        let mut b = encoded();
        b[0] ^= 1;
        assert!(matches!(
            RecordHeader::decode(&b),
            Err(DecodeError::Checksum { .. })
        ));
    }

    #[test]
    fn rejects_non_zero_reserved() {
        let mut b = encoded();
        b[RESERVED_OFFSET + 2] = 1;
        reseal(&mut b);
        assert_eq!(
            RecordHeader::decode(&b),
            Err(DecodeError::NonZeroReserved {
                what: "record header",
                at: 46
            })
        );
    }

    #[test]
    fn rejects_oversized_body_len() {
        let mut b = encoded();
        le::put_u32(&mut b, BODY_LEN_OFFSET, BODY_BYTES_MAX + 1);
        reseal(&mut b);
        assert!(matches!(
            RecordHeader::decode(&b),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn rejects_unknown_flags_and_kind() {
        for bit in [flags::TOMBSTONE, flags::REDACTED, flags::ENCRYPTED, 1 << 15] {
            let mut b = encoded();
            le::put_u16(&mut b, FLAGS_OFFSET, bit);
            reseal(&mut b);
            assert_eq!(
                RecordHeader::decode(&b),
                Err(DecodeError::UnknownFlags { flags: bit })
            );
        }
        let mut b = encoded();
        le::put_u16(&mut b, KIND_OFFSET, 2);
        reseal(&mut b);
        assert_eq!(
            RecordHeader::decode(&b),
            Err(DecodeError::UnknownKind { kind: 2 })
        );
    }

    #[test]
    fn rejects_durable_lag_beyond_position() {
        let mut b = encoded();
        le::put_u32(&mut b, DURABLE_LAG_OFFSET, 1235);
        reseal(&mut b);
        assert!(matches!(
            RecordHeader::decode(&b),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn body_check_catches_length_and_content() {
        let body = vec![9u8; 301];
        let h = RecordHeader {
            body_crc: crc32fast::hash(&body),
            ..sample()
        };
        assert_eq!(h.check_body(&body), Ok(()));
        assert!(matches!(
            h.check_body(&body[..300]),
            Err(DecodeError::LengthMismatch { .. })
        ));
        let mut bad = body.clone();
        bad[100] ^= 0x10;
        assert!(matches!(
            h.check_body(&bad),
            Err(DecodeError::Checksum { .. })
        ));
    }

    #[test]
    fn version_2_round_trips_links_stream_prev_and_checks_it() {
        let h = RecordHeader {
            layout: Layout::V2,
            stream_prev: 1000,
            ..sample()
        };
        let mut b = [0u8; RECORD_HEADER_MAX];
        assert_eq!(h.encode_into(&mut b), 88);
        assert_eq!(RecordHeader::decode_in(&b, Layout::V2), Ok(h));
        assert_eq!(le::u64_at(&b, 16), 1000, "stream_prev in the linked bytes");
        assert_eq!(le::u64_at(&b, 48), 1234, "position after them");
        assert_eq!(&b[56..88], &[0xab; 32]);
        assert_eq!(h.link_prefix()[4..12], 1000u64.to_le_bytes());
        assert_eq!(h.record_len(), 392, "88 + 301 rounded up to 8");
        for bit in 0..RECORD_HEADER_V2_LEN * 8 {
            let mut d = b;
            d[bit / 8] ^= 1 << (bit % 8);
            assert!(
                RecordHeader::decode_in(&d, Layout::V2).is_err(),
                "bit {bit}"
            );
        }
        // A stream_prev at or after the record, or one on version 0, is refused.
        for (version, prev) in [(7, 1234), (7, 5000), (0, 1000), (7, NO_STREAM_PREV)] {
            let bad = RecordHeader {
                stream_version: version,
                stream_prev: prev,
                ..h
            };
            let mut d = [0u8; RECORD_HEADER_MAX];
            bad.encode_into(&mut d);
            assert!(
                RecordHeader::decode_in(&d, Layout::V2).is_err(),
                "version {version} prev {prev}"
            );
        }
    }

    #[test]
    fn version_4_carries_the_body_form_outside_the_link() {
        let h = RecordHeader {
            layout: Layout::V4,
            stream_prev: 1000,
            ..sample()
        };
        let pruned = RecordHeader {
            body_form: BodyForm::Pruned,
            ..h
        };
        let (mut a, mut b) = ([0u8; RECORD_HEADER_MAX], [0u8; RECORD_HEADER_MAX]);
        h.encode_into(&mut a);
        pruned.encode_into(&mut b);
        assert_eq!(b[44], 1);
        assert_eq!(RecordHeader::decode_in(&b, Layout::V4), Ok(pruned));
        // Pruning changes no linked byte: the record's hash stays.
        assert_eq!(h.link_prefix(), pruned.link_prefix());
        assert_eq!(a[LINK_FROM..LINK_TO], b[LINK_FROM..LINK_TO]);
        // Earlier versions reserve the byte; an unknown form, or a set byte after it, fails.
        for layout in [Layout::V1, Layout::V2, Layout::V3] {
            let mut d = [0u8; RECORD_HEADER_MAX];
            RecordHeader { layout, ..pruned }.encode_into(&mut d);
            assert!(RecordHeader::decode_in(&d, layout).is_err(), "{layout:?}");
        }
        for (at, v) in [(44, 2u8), (45, 1)] {
            let mut d = b;
            d[at] = v;
            let crc = crc32fast::hash(&d[HEADER_CRC_COVERS_FROM..RECORD_HEADER_V2_LEN]);
            le::put_u32(&mut d, HEADER_CRC_OFFSET, crc);
            assert!(
                RecordHeader::decode_in(&d, Layout::V4).is_err(),
                "byte {at} = {v}"
            );
        }
    }

    #[test]
    fn padding_must_be_zero() {
        assert_eq!(check_padding(&[0, 0, 0]), Ok(()));
        assert_eq!(
            check_padding(&[0, 7, 0]),
            Err(DecodeError::NonZeroReserved {
                what: "record padding",
                at: 1
            })
        );
    }
}
