//! Segment header and footer (docs/FORMAT.md, "Segment file").
//!
//! A segment file is `capacity` bytes: the header page (`0..4096`), records from
//! [`super::SEGMENT_DATA_START`], zeros, and the footer page (`capacity-4096..capacity`),
//! which is all zero until the segment is sealed. The structures below occupy the start of
//! their page; the rest of the page is zero and checked.

use super::record::Layout;
use super::{
    DecodeError, Hash32, PAGE_BYTES, Position, SEGMENT_BYTES_MAX, SEGMENT_BYTES_MIN, SegmentSeq,
    Timestamp, check_crc, check_format_version, check_magic, check_zero, le, need,
};

/// Magic of a segment header.
pub const SEGMENT_MAGIC: &[u8; 8] = b"TALLYSEG";
/// Magic of a segment footer.
pub const FOOTER_MAGIC: &[u8; 8] = b"TALLYFTR";

/// Bytes of the header structure at the start of the header page.
pub const SEGMENT_HEADER_LEN: usize = 128;
/// Bytes of the footer structure at the start of the footer page.
pub const SEGMENT_FOOTER_LEN: usize = 192;

// Header field offsets.
/// `format_version`.
pub const SH_VERSION: usize = 8;
/// `header_len`.
pub const SH_HEADER_LEN: usize = 10;
/// 4 reserved bytes.
pub const SH_RESERVED_A: usize = 12;
/// `log_id`.
pub const SH_LOG_ID: usize = 16;
/// `seq`.
pub const SH_SEQ: usize = 32;
/// `base_position`.
pub const SH_BASE_POSITION: usize = 40;
/// `created_time`.
pub const SH_CREATED_TIME: usize = 48;
/// `capacity`.
pub const SH_CAPACITY: usize = 56;
/// `prev_chain_hash`.
pub const SH_PREV_CHAIN_HASH: usize = 64;
/// 28 reserved bytes.
pub const SH_RESERVED_B: usize = 96;
/// `header_crc`: CRC-32 of bytes `0..124`.
pub const SH_CRC: usize = 124;
const _: () = assert!(SH_CRC + 4 == SEGMENT_HEADER_LEN);
const _: () = assert!(SH_PREV_CHAIN_HASH + 32 == SH_RESERVED_B);

// Footer field offsets.
/// `format_version`.
pub const SF_VERSION: usize = 8;
/// `footer_len`.
pub const SF_FOOTER_LEN: usize = 10;
/// 4 reserved bytes.
pub const SF_RESERVED_A: usize = 12;
/// `log_id`.
pub const SF_LOG_ID: usize = 16;
/// `seq`.
pub const SF_SEQ: usize = 32;
/// `record_count`.
pub const SF_RECORD_COUNT: usize = 40;
/// `first_position`.
pub const SF_FIRST_POSITION: usize = 48;
/// `last_position`.
pub const SF_LAST_POSITION: usize = 56;
/// `data_end`: file offset just after the last record.
pub const SF_DATA_END: usize = 64;
/// `first_record_time`.
pub const SF_FIRST_TIME: usize = 72;
/// `last_record_time`.
pub const SF_LAST_TIME: usize = 80;
/// `last_chain_hash`.
pub const SF_LAST_CHAIN_HASH: usize = 88;
/// `merkle_root`.
pub const SF_MERKLE_ROOT: usize = 120;
/// 36 reserved bytes.
pub const SF_RESERVED_B: usize = 152;
/// `footer_crc`: CRC-32 of bytes `0..188`.
pub const SF_CRC: usize = 188;
const _: () = assert!(SF_CRC + 4 == SEGMENT_FOOTER_LEN);
const _: () = assert!(SF_MERKLE_ROOT + 32 == SF_RESERVED_B);

/// The header at the start of every segment file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The format version, as the layout of the segment's records.
    pub layout: Layout,
    /// The log this segment belongs to.
    pub log_id: [u8; 16],
    /// The segment's sequence number (also its file name).
    pub seq: SegmentSeq,
    /// Position of the segment's first record.
    pub base_position: Position,
    /// When the segment became active.
    pub created_time: Timestamp,
    /// The file's size in bytes.
    pub capacity: u64,
    /// The chain hash of the record before this segment's first record (the log's seed for
    /// segment 0).
    pub prev_chain_hash: Hash32,
}

fn check_capacity(capacity: u64) -> Result<(), DecodeError> {
    if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&capacity)
        || !capacity.is_multiple_of(PAGE_BYTES)
    {
        return Err(DecodeError::Invalid {
            what: "segment capacity",
            detail: format!(
                "{capacity} is not a multiple of {PAGE_BYTES} in {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}"
            ),
        });
    }
    Ok(())
}

impl SegmentHeader {
    /// Encodes the header page.
    #[must_use]
    pub fn encode_page(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_BYTES as usize];
        page[..8].copy_from_slice(SEGMENT_MAGIC);
        le::put_u16(&mut page, SH_VERSION, self.layout.version());
        le::put_u16(&mut page, SH_HEADER_LEN, SEGMENT_HEADER_LEN as u16);
        page[SH_LOG_ID..SH_LOG_ID + 16].copy_from_slice(&self.log_id);
        le::put_u64(&mut page, SH_SEQ, self.seq.0);
        le::put_u64(&mut page, SH_BASE_POSITION, self.base_position.0);
        le::put_u64(&mut page, SH_CREATED_TIME, self.created_time.0);
        le::put_u64(&mut page, SH_CAPACITY, self.capacity);
        page[SH_PREV_CHAIN_HASH..SH_PREV_CHAIN_HASH + 32].copy_from_slice(&self.prev_chain_hash);
        let crc = crc32fast::hash(&page[..SH_CRC]);
        le::put_u32(&mut page, SH_CRC, crc);
        page
    }

    /// Decodes and checks a header page.
    ///
    /// # Errors
    /// [`DecodeError`] on a short page, wrong magic or version, CRC mismatch, non-zero
    /// reserved or padding bytes, or an impossible capacity.
    pub fn decode_page(page: &[u8]) -> Result<SegmentHeader, DecodeError> {
        need(page, PAGE_BYTES as usize)?;
        check_magic(page, SEGMENT_MAGIC, "TALLYSEG")?;
        check_crc(le::u32_at(page, SH_CRC), &page[..SH_CRC], "segment header")?;
        let layout = check_format_version(le::u16_at(page, SH_VERSION), "segment")?;
        let header_len = le::u16_at(page, SH_HEADER_LEN);
        if header_len as usize != SEGMENT_HEADER_LEN {
            return Err(DecodeError::LengthMismatch {
                what: "segment header",
                declared: u64::from(header_len),
                actual: SEGMENT_HEADER_LEN as u64,
            });
        }
        check_zero(page, SH_RESERVED_A..SH_RESERVED_A + 4, "segment header")?;
        check_zero(page, SH_RESERVED_B..SH_CRC, "segment header")?;
        check_zero(
            page,
            SEGMENT_HEADER_LEN..PAGE_BYTES as usize,
            "segment header page",
        )?;
        let capacity = le::u64_at(page, SH_CAPACITY);
        check_capacity(capacity)?;
        Ok(SegmentHeader {
            layout,
            log_id: le::array_at(page, SH_LOG_ID),
            seq: SegmentSeq(le::u64_at(page, SH_SEQ)),
            base_position: Position(le::u64_at(page, SH_BASE_POSITION)),
            created_time: Timestamp(le::u64_at(page, SH_CREATED_TIME)),
            capacity,
            prev_chain_hash: le::array_at(page, SH_PREV_CHAIN_HASH),
        })
    }

    /// File offset of the footer page.
    #[must_use]
    pub fn footer_offset(&self) -> u64 {
        self.capacity - super::SEGMENT_FOOTER_BYTES
    }

    /// The first file offset records may not reach (the footer page).
    #[must_use]
    pub fn data_limit(&self) -> u64 {
        self.footer_offset()
    }
}

/// Written into the last page when a segment is sealed: what it holds, and the hashes that
/// let a verifier check it without the rest of the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentFooter {
    /// The format version, as a layout: the same as the segment header's.
    pub layout: Layout,
    /// The log this segment belongs to.
    pub log_id: [u8; 16],
    /// The segment's sequence number.
    pub seq: SegmentSeq,
    /// Records in the segment (at least one).
    pub record_count: u64,
    /// Position of the first record.
    pub first_position: Position,
    /// Position of the last record (`first_position + record_count - 1`).
    pub last_position: Position,
    /// File offset just past the last record.
    pub data_end: u64,
    /// Record time of the first record.
    pub first_record_time: Timestamp,
    /// Record time of the last record.
    pub last_record_time: Timestamp,
    /// Chain hash of the last record.
    pub last_chain_hash: Hash32,
    /// RFC 9162 Merkle root over the segment's record hashes, in order.
    pub merkle_root: Hash32,
}

impl SegmentFooter {
    /// Encodes the footer page.
    #[must_use]
    pub fn encode_page(&self) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_BYTES as usize];
        page[..8].copy_from_slice(FOOTER_MAGIC);
        le::put_u16(&mut page, SF_VERSION, self.layout.version());
        le::put_u16(&mut page, SF_FOOTER_LEN, SEGMENT_FOOTER_LEN as u16);
        page[SF_LOG_ID..SF_LOG_ID + 16].copy_from_slice(&self.log_id);
        le::put_u64(&mut page, SF_SEQ, self.seq.0);
        le::put_u64(&mut page, SF_RECORD_COUNT, self.record_count);
        le::put_u64(&mut page, SF_FIRST_POSITION, self.first_position.0);
        le::put_u64(&mut page, SF_LAST_POSITION, self.last_position.0);
        le::put_u64(&mut page, SF_DATA_END, self.data_end);
        le::put_u64(&mut page, SF_FIRST_TIME, self.first_record_time.0);
        le::put_u64(&mut page, SF_LAST_TIME, self.last_record_time.0);
        page[SF_LAST_CHAIN_HASH..SF_LAST_CHAIN_HASH + 32].copy_from_slice(&self.last_chain_hash);
        page[SF_MERKLE_ROOT..SF_MERKLE_ROOT + 32].copy_from_slice(&self.merkle_root);
        let crc = crc32fast::hash(&page[..SF_CRC]);
        le::put_u32(&mut page, SF_CRC, crc);
        page
    }

    /// Decodes and checks a footer page.
    ///
    /// # Errors
    /// [`DecodeError`] on a short page, wrong magic or version, CRC mismatch, non-zero
    /// reserved bytes, or counts and positions that contradict each other.
    pub fn decode_page(page: &[u8]) -> Result<SegmentFooter, DecodeError> {
        need(page, PAGE_BYTES as usize)?;
        check_magic(page, FOOTER_MAGIC, "TALLYFTR")?;
        check_crc(le::u32_at(page, SF_CRC), &page[..SF_CRC], "segment footer")?;
        let layout = check_format_version(le::u16_at(page, SF_VERSION), "segment footer")?;
        let footer_len = le::u16_at(page, SF_FOOTER_LEN);
        if footer_len as usize != SEGMENT_FOOTER_LEN {
            return Err(DecodeError::LengthMismatch {
                what: "segment footer",
                declared: u64::from(footer_len),
                actual: SEGMENT_FOOTER_LEN as u64,
            });
        }
        check_zero(page, SF_RESERVED_A..SF_RESERVED_A + 4, "segment footer")?;
        check_zero(page, SF_RESERVED_B..SF_CRC, "segment footer")?;
        check_zero(
            page,
            SEGMENT_FOOTER_LEN..PAGE_BYTES as usize,
            "segment footer page",
        )?;
        let footer = SegmentFooter {
            layout,
            log_id: le::array_at(page, SF_LOG_ID),
            seq: SegmentSeq(le::u64_at(page, SF_SEQ)),
            record_count: le::u64_at(page, SF_RECORD_COUNT),
            first_position: Position(le::u64_at(page, SF_FIRST_POSITION)),
            last_position: Position(le::u64_at(page, SF_LAST_POSITION)),
            data_end: le::u64_at(page, SF_DATA_END),
            first_record_time: Timestamp(le::u64_at(page, SF_FIRST_TIME)),
            last_record_time: Timestamp(le::u64_at(page, SF_LAST_TIME)),
            last_chain_hash: le::array_at(page, SF_LAST_CHAIN_HASH),
            merkle_root: le::array_at(page, SF_MERKLE_ROOT),
        };
        let span = footer.last_position.0.checked_sub(footer.first_position.0);
        if footer.record_count == 0
            || span != Some(footer.record_count - 1)
            || footer.last_position.0 == u64::MAX
        {
            return Err(DecodeError::Invalid {
                what: "segment footer",
                detail: format!(
                    "{} records cannot span positions {}..={}",
                    footer.record_count, footer.first_position, footer.last_position
                ),
            });
        }
        if footer.data_end < super::SEGMENT_DATA_START || footer.data_end > SEGMENT_BYTES_MAX {
            return Err(DecodeError::Invalid {
                what: "segment footer",
                detail: format!("data_end {} outside the segment", footer.data_end),
            });
        }
        Ok(footer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SegmentHeader {
        SegmentHeader {
            layout: Layout::V2,
            log_id: [3; 16],
            seq: SegmentSeq(5),
            base_position: Position(1000),
            created_time: Timestamp(1_700_000_000_000_000_000),
            capacity: 1 << 20,
            prev_chain_hash: [0x5a; 32],
        }
    }

    fn footer() -> SegmentFooter {
        SegmentFooter {
            layout: Layout::V2,
            log_id: [3; 16],
            seq: SegmentSeq(5),
            record_count: 10,
            first_position: Position(1000),
            last_position: Position(1009),
            data_end: 8192,
            first_record_time: Timestamp(1),
            last_record_time: Timestamp(2),
            last_chain_hash: [1; 32],
            merkle_root: [2; 32],
        }
    }

    fn reseal(page: &mut [u8], crc_at: usize) {
        let crc = crc32fast::hash(&page[..crc_at]);
        le::put_u32(page, crc_at, crc);
    }

    #[test]
    fn header_round_trips_and_fields_sit_at_documented_offsets() {
        let page = header().encode_page();
        assert_eq!(SegmentHeader::decode_page(&page), Ok(header()));
        assert_eq!(&page[0..8], b"TALLYSEG");
        assert_eq!(le::u16_at(&page, 8), 2);
        assert_eq!(le::u16_at(&page, 10), 128);
        assert_eq!(le::u64_at(&page, 32), 5);
        assert_eq!(le::u64_at(&page, 40), 1000);
        assert_eq!(le::u64_at(&page, 56), 1 << 20);
        assert_eq!(&page[64..96], &[0x5a; 32]);
        assert_eq!(le::u32_at(&page, 124), crc32fast::hash(&page[..124]));
    }

    #[test]
    fn header_rejections() {
        let good = header().encode_page();
        let mut p = good.clone();
        p[0] = b'X';
        assert!(matches!(
            SegmentHeader::decode_page(&p),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut p = good.clone();
        p[40] ^= 1;
        assert!(matches!(
            SegmentHeader::decode_page(&p),
            Err(DecodeError::Checksum { .. })
        ));
        let mut p = good.clone();
        le::put_u16(&mut p, SH_VERSION, 6);
        reseal(&mut p, SH_CRC);
        assert!(matches!(
            SegmentHeader::decode_page(&p),
            Err(DecodeError::UnsupportedVersion { found: 6, .. })
        ));
        // Version 1 decodes, as the version 1 layout.
        let mut p = good.clone();
        le::put_u16(&mut p, SH_VERSION, 1);
        reseal(&mut p, SH_CRC);
        assert_eq!(
            SegmentHeader::decode_page(&p).map(|h| h.layout),
            Ok(Layout::V1)
        );
        let mut p = good.clone();
        p[SH_RESERVED_B + 3] = 1;
        reseal(&mut p, SH_CRC);
        assert!(matches!(
            SegmentHeader::decode_page(&p),
            Err(DecodeError::NonZeroReserved { .. })
        ));
        let mut p = good.clone();
        p[2000] = 1;
        assert!(matches!(
            SegmentHeader::decode_page(&p),
            Err(DecodeError::NonZeroReserved { at: 2000, .. })
        ));
        let mut p = good.clone();
        le::put_u64(&mut p, SH_CAPACITY, (1 << 20) + 1);
        reseal(&mut p, SH_CRC);
        assert!(matches!(
            SegmentHeader::decode_page(&p),
            Err(DecodeError::Invalid { .. })
        ));
        assert!(matches!(
            SegmentHeader::decode_page(&good[..4095]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            SegmentHeader::decode_page(&vec![0u8; 4096]),
            Err(DecodeError::BadMagic { .. })
        ));
    }

    #[test]
    fn footer_round_trips_and_rejects_inconsistency() {
        let page = footer().encode_page();
        assert_eq!(SegmentFooter::decode_page(&page), Ok(footer()));
        assert_eq!(&page[0..8], b"TALLYFTR");
        assert_eq!(le::u64_at(&page, 40), 10);
        assert_eq!(&page[120..152], &[2; 32]);
        let mut p = page.clone();
        le::put_u64(&mut p, SF_RECORD_COUNT, 11);
        reseal(&mut p, SF_CRC);
        assert!(matches!(
            SegmentFooter::decode_page(&p),
            Err(DecodeError::Invalid { .. })
        ));
        let mut p = page.clone();
        le::put_u64(&mut p, SF_RECORD_COUNT, 0);
        reseal(&mut p, SF_CRC);
        assert!(matches!(
            SegmentFooter::decode_page(&p),
            Err(DecodeError::Invalid { .. })
        ));
        let mut p = page.clone();
        p[SF_MERKLE_ROOT] ^= 1;
        assert!(matches!(
            SegmentFooter::decode_page(&p),
            Err(DecodeError::Checksum { .. })
        ));
        let mut p = page;
        p[SF_RESERVED_B] = 1;
        reseal(&mut p, SF_CRC);
        assert!(matches!(
            SegmentFooter::decode_page(&p),
            Err(DecodeError::NonZeroReserved { .. })
        ));
    }
}
