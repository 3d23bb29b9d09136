//! The on-disk format: constants, shared id types, and the encoders and decoders of every
//! fixed layout Tally writes. `docs/FORMAT.md` is the specification; this module mirrors it,
//! and `engine/tests/format_doc.rs` checks that the two agree.
//!
//! Contract: nothing in here touches files, clocks or threads. Every decoder takes untrusted
//! bytes and returns a [`DecodeError`] for anything that does not match the specification
//! exactly (wrong magic, checksum, length, reserved bytes, unknown flags); none of them
//! panics or allocates more than a length it has already checked against a maximum.
//!
//! All integers are little-endian. Checksums are CRC-32 (IEEE 802.3, as computed by
//! `crc32fast`); hashes are BLAKE3 with 32-byte outputs.

#![forbid(unsafe_code)]

pub mod blob;
pub mod chain;
pub mod checkpoint;
pub mod cold;
pub mod envelope;
pub mod files;
pub mod heads;
pub mod meta;
pub mod multiproof;
pub mod note;
pub mod producer;
pub mod proof;
pub mod pruned;
pub mod record;
pub mod sealed;
pub mod segment;
pub mod tree;

use std::fmt;

/// The format version of the logs this code creates, written into `tally.meta` and every
/// segment header and footer. Readers accept exactly the versions listed in
/// `docs/FORMAT.md` ("Version history"): 1 and 2. A log keeps the version it was created
/// with.
pub const FORMAT_VERSION: u16 = 5;

/// The version of the structures that format version 2 left as version 1 defined them (index
/// and attribute index sidecars, stream snapshot, Merkle node file header, cosignature
/// entries): written as, and required to be, 1 in logs of either version.
pub const STRUCTURE_VERSION: u16 = 1;

/// The unit of preallocation and of the segment header and footer areas.
pub const PAGE_BYTES: u64 = 4096;

/// Records start at this file offset in every segment (the header page precedes them).
pub const SEGMENT_DATA_START: u64 = PAGE_BYTES;

/// The footer page at the end of every segment file.
pub const SEGMENT_FOOTER_BYTES: u64 = PAGE_BYTES;

/// The smallest segment file: header page, footer page, and room for records.
pub const SEGMENT_BYTES_MIN: u64 = 16 * PAGE_BYTES;

/// The largest segment file. Offsets inside a segment are stored as `u32` in the index.
pub const SEGMENT_BYTES_MAX: u64 = 1 << 32;

/// The default segment size.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 << 20;

const _: () = assert!(SEGMENT_BYTES_MIN.is_multiple_of(PAGE_BYTES));
const _: () = assert!(SEGMENT_BYTES_MAX.is_multiple_of(PAGE_BYTES));
const _: () = assert!(SEGMENT_BYTES_DEFAULT.is_multiple_of(PAGE_BYTES));
const _: () = assert!(SEGMENT_BYTES_MIN >= SEGMENT_DATA_START + SEGMENT_FOOTER_BYTES + PAGE_BYTES);

/// A record's place in the whole log: 0 for the first record ever written, dense after that.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Position(pub u64);

impl Position {
    /// The position after this one.
    #[must_use]
    pub fn next(self) -> Position {
        Position(self.0 + 1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Which segment file: 0 for the first, +1 for each roll. Also the file's name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentSeq(pub u64);

impl SegmentSeq {
    /// The file name of this segment: the zero-padded sequence number, so that lexical
    /// order equals log order.
    #[must_use]
    pub fn file_name(self) -> String {
        files::segment_file_name(self)
    }

    /// The file name of this segment's index sidecar.
    #[must_use]
    pub fn index_file_name(self) -> String {
        files::index_file_name(self)
    }

    /// Parses a segment file name produced by [`SegmentSeq::file_name`].
    #[must_use]
    pub fn parse_file_name(name: &str) -> Option<SegmentSeq> {
        files::parse_segment_file_name(name)
    }
}

impl fmt::Display for SegmentSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Nanoseconds since the Unix epoch (UTC).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Nanoseconds since the Unix epoch.
    #[must_use]
    pub fn as_nanos(self) -> u64 {
        self.0
    }
}

/// A 32-byte BLAKE3 output: a record's chain hash, a Merkle node, a body hash.
pub type Hash32 = [u8; 32];

/// A 16-byte event id, stored raw. Conventionally a UUID (v7 when the engine makes one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(pub [u8; 16]);

impl EventId {
    /// The id as one integer, big-endian so that v7 ids sort by time.
    #[must_use]
    // UUIDs are big-endian by definition (RFC 9562); this is not an on-disk integer.
    #[allow(clippy::big_endian_bytes)]
    pub fn as_u128(self) -> u128 {
        u128::from_be_bytes(self.0)
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[0],
            b[1],
            b[2],
            b[3],
            b[4],
            b[5],
            b[6],
            b[7],
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl std::str::FromStr for EventId {
    type Err = DecodeError;

    /// Parses the hyphenated (36 characters) or plain (32 hex digits) form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
        let hyphens = s.len() - hex.len();
        if hex.len() != 32 || !(hyphens == 0 || hyphens == 4) {
            return Err(DecodeError::BadEventId);
        }
        let mut out = [0u8; 16];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char)
                .to_digit(16)
                .ok_or(DecodeError::BadEventId)?;
            let lo = (pair[1] as char)
                .to_digit(16)
                .ok_or(DecodeError::BadEventId)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(EventId(out))
    }
}

/// Why bytes read from disk were refused. Offsets are relative to the buffer handed to the
/// decoder; callers that know the file add the file offset when they report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Fewer bytes than the layout needs.
    #[error("truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the layout needs.
        needed: u64,
        /// Bytes available.
        have: u64,
    },
    /// The magic bytes do not name this kind of structure.
    #[error("bad magic: expected {expected:?}, found {found:02x?}")]
    BadMagic {
        /// The magic this structure must start with.
        expected: &'static str,
        /// What was found instead.
        found: [u8; 8],
    },
    /// A format version this build cannot read.
    #[error("unsupported {what} format version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Which structure.
        what: &'static str,
        /// The version in the bytes.
        found: u16,
        /// The version this build reads.
        supported: u16,
    },
    /// A CRC-32 over a header or body does not match.
    #[error("{what} checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Which checksum.
        what: &'static str,
        /// The stored value.
        stored: u32,
        /// The value computed from the bytes.
        computed: u32,
    },
    /// Reserved or padding bytes that must be zero are not.
    #[error("non-zero reserved bytes in {what} at byte {at}")]
    NonZeroReserved {
        /// Which structure.
        what: &'static str,
        /// Offset of the first non-zero byte.
        at: u64,
    },
    /// A length field exceeds its documented maximum.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// The length found.
        len: u64,
        /// The documented maximum.
        max: u64,
    },
    /// Lengths inside a structure do not add up.
    #[error("inconsistent lengths in {what}: declared {declared}, actual {actual}")]
    LengthMismatch {
        /// Which structure.
        what: &'static str,
        /// The total the fields declare.
        declared: u64,
        /// The size of the structure.
        actual: u64,
    },
    /// Flag bits that this version does not define.
    #[error("unknown record flags {flags:#06x}")]
    UnknownFlags {
        /// The flags field.
        flags: u16,
    },
    /// A record kind this version does not define.
    #[error("unknown record kind {kind}")]
    UnknownKind {
        /// The kind field.
        kind: u16,
    },
    /// A field that must be UTF-8 is not.
    #[error("{what} is not valid UTF-8")]
    NotUtf8 {
        /// Which field.
        what: &'static str,
    },
    /// A field that must not be empty is.
    #[error("{what} must not be empty")]
    Empty {
        /// Which field.
        what: &'static str,
    },
    /// A field value outside its documented range.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// Which field.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A recomputed chain hash does not match the stored one.
    #[error("chain hash mismatch at position {position}")]
    ChainBroken {
        /// The record whose stored hash is wrong.
        position: u64,
    },
    /// Not a UUID.
    #[error("event id must be 32 hex digits, optionally hyphenated as a UUID")]
    BadEventId,
}

/// Little-endian reads at fixed offsets of a slice whose length the caller has checked.
/// Each accessor panics on an out-of-range offset, which is a bug in the layout code (a
/// broken invariant), never a property of the input: decoders check the length first.
pub(crate) mod le {
    pub fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    pub fn u32_at(b: &[u8], at: usize) -> u32 {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[at..at + 4]);
        u32::from_le_bytes(a)
    }
    pub fn u64_at(b: &[u8], at: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(a)
    }
    pub fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
        let mut a = [0u8; N];
        a.copy_from_slice(&b[at..at + N]);
        a
    }
    pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// Checks that `buf` holds at least `needed` bytes.
pub(crate) fn need(buf: &[u8], needed: usize) -> Result<(), DecodeError> {
    if buf.len() < needed {
        return Err(DecodeError::Truncated {
            needed: needed as u64,
            have: buf.len() as u64,
        });
    }
    Ok(())
}

/// Checks that `buf[range]` is all zero.
pub(crate) fn check_zero(
    buf: &[u8],
    range: std::ops::Range<usize>,
    what: &'static str,
) -> Result<(), DecodeError> {
    let start = range.start;
    match buf[range].iter().position(|&b| b != 0) {
        None => Ok(()),
        Some(i) => Err(DecodeError::NonZeroReserved {
            what,
            at: (start + i) as u64,
        }),
    }
}

/// Checks an 8-byte magic.
pub(crate) fn check_magic(
    buf: &[u8],
    magic: &'static [u8; 8],
    what: &'static str,
) -> Result<(), DecodeError> {
    let found: [u8; 8] = le::array_at(buf, 0);
    if &found != magic {
        return Err(DecodeError::BadMagic {
            expected: what,
            found,
        });
    }
    Ok(())
}

/// Checks the version field of a structure that both format versions share
/// ([`STRUCTURE_VERSION`]).
pub(crate) fn check_version(found: u16, what: &'static str) -> Result<(), DecodeError> {
    if found != STRUCTURE_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what,
            found,
            supported: STRUCTURE_VERSION,
        });
    }
    Ok(())
}

/// Checks the format version of `tally.meta` or a segment header or footer (1, 2 or 3), and
/// gives the record layout it implies.
pub(crate) fn check_format_version(
    found: u16,
    what: &'static str,
) -> Result<record::Layout, DecodeError> {
    record::Layout::of_version(found).ok_or(DecodeError::UnsupportedVersion {
        what,
        found,
        supported: FORMAT_VERSION,
    })
}

/// Checks a stored CRC-32 against the bytes it covers.
pub(crate) fn check_crc(
    stored: u32,
    covered: &[u8],
    what: &'static str,
) -> Result<(), DecodeError> {
    let computed = crc32fast::hash(covered);
    if stored != computed {
        return Err(DecodeError::Checksum {
            what,
            stored,
            computed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_file_names_round_trip_and_sort() {
        assert_eq!(SegmentSeq(42).file_name(), "00000000000000000042.seg");
        assert_eq!(
            SegmentSeq::parse_file_name("00000000000000000042.seg"),
            Some(SegmentSeq(42))
        );
        assert_eq!(SegmentSeq::parse_file_name("42.seg"), None);
        assert_eq!(
            SegmentSeq::parse_file_name("0000000000000000004x.seg"),
            None
        );
        assert_eq!(
            SegmentSeq::parse_file_name("00000000000000000042.idx"),
            None
        );
        assert!(SegmentSeq(9).file_name() < SegmentSeq(10).file_name());
    }

    #[test]
    fn event_id_parses_and_prints_uuid_form() {
        let s = "0190f2a1-7b3c-7d4e-8f00-112233445566";
        let id: EventId = s.parse().unwrap();
        assert_eq!(id.to_string(), s);
        let plain: EventId = "0190f2a17b3c7d4e8f00112233445566".parse().unwrap();
        assert_eq!(plain, id);
        assert_eq!(
            "0190f2a1-7b3c".parse::<EventId>(),
            Err(DecodeError::BadEventId)
        );
        assert_eq!(
            "zz90f2a1-7b3c-7d4e-8f00-112233445566".parse::<EventId>(),
            Err(DecodeError::BadEventId)
        );
        assert_eq!(
            "0190f2a1-7b3c7d4e8f00112233445566".parse::<EventId>(),
            Err(DecodeError::BadEventId),
            "one hyphen is neither form"
        );
    }
}
