//! Cold segments and the cold manifest (docs/FORMAT.md, "Cold segment file" and "Cold
//! manifest").
//!
//! A cold segment is a sealed segment rewritten for an object store: its records, cut into
//! blocks of whole records, each block compressed as one independent zstd frame (zstd's
//! seekable layout), then a block index and a trailer with a BLAKE3 hash of everything
//! before it. The segment's header and footer structures travel verbatim in the cold
//! header, so a cold segment rehydrates byte for byte into the sealed segment it came from
//! (the zero bytes between `data_end` and the footer page are not stored): every record
//! hash, Merkle root, proof and checkpoint stays valid.
//!
//! A reader that has the whole object checks the trailer, the header, the index and the
//! hash ([`decode_cold`]); a reader with ranges reads the trailer (the last
//! [`COLD_TRAILER_LEN`] bytes), then the header and the index, then only the frames it
//! needs, each checked by its CRC-32 ([`decompress_block`]).
//!
//! The cold manifest (`cold.manifest`) says which segments are cold: a header, then one
//! fixed-size entry appended per segment moved, each with the segment's header and footer
//! structures and the hash and length of its cold object, so that open needs neither the
//! object store nor a listing of it.

use super::segment::{SEGMENT_FOOTER_LEN, SEGMENT_HEADER_LEN, SegmentFooter, SegmentHeader};
use super::{
    DecodeError, Hash32, PAGE_BYTES, Position, SEGMENT_DATA_START, SegmentSeq, Timestamp,
    check_crc, check_magic, check_zero, le, need,
};

/// Magic of a cold segment's header.
pub const COLD_MAGIC: &[u8; 8] = b"TALLYCLD";
/// Magic of a cold segment's trailer.
pub const COLD_TRAILER_MAGIC: &[u8; 8] = b"TALLYCLT";
/// The version of the cold segment layout this build writes and reads.
pub const COLD_VERSION: u16 = 1;
/// Bytes of the cold header.
pub const COLD_HEADER_LEN: usize = 352;
/// Bytes of one block index entry.
pub const COLD_BLOCK_ENTRY_LEN: usize = 40;
/// Bytes of the cold trailer.
pub const COLD_TRAILER_LEN: usize = 64;
/// The uncompressed size a block aims for, unless the writer is told otherwise.
pub const COLD_BLOCK_BYTES_DEFAULT: u32 = 256 << 10;
/// The largest uncompressed block a reader accepts (a block holds whole records, and one
/// record is far smaller).
pub const COLD_BLOCK_BYTES_MAX: u32 = 16 << 20;
/// The zstd level used unless the writer is told otherwise.
pub const COLD_ZSTD_LEVEL_DEFAULT: i32 = 3;

// Cold header field offsets.
/// `version`.
pub const CH_VERSION: usize = 8;
/// `header_len`.
pub const CH_HEADER_LEN: usize = 10;
/// `block_target`.
pub const CH_BLOCK_TARGET: usize = 12;
/// The segment header structure.
pub const CH_SEGMENT_HEADER: usize = 16;
/// The segment footer structure.
pub const CH_SEGMENT_FOOTER: usize = CH_SEGMENT_HEADER + SEGMENT_HEADER_LEN;
/// 12 reserved bytes.
pub const CH_RESERVED: usize = CH_SEGMENT_FOOTER + SEGMENT_FOOTER_LEN;
/// `header_crc`: CRC-32 of bytes `0..348`.
pub const CH_CRC: usize = 348;
const _: () = assert!(CH_RESERVED + 12 == CH_CRC);
const _: () = assert!(CH_CRC + 4 == COLD_HEADER_LEN);

// Block index entry field offsets.
/// `segment_offset`.
pub const CB_SEGMENT_OFFSET: usize = 0;
/// `first_position`.
pub const CB_FIRST_POSITION: usize = 8;
/// `object_offset`.
pub const CB_OBJECT_OFFSET: usize = 16;
/// `compressed_len`.
pub const CB_COMPRESSED_LEN: usize = 24;
/// `uncompressed_len`.
pub const CB_UNCOMPRESSED_LEN: usize = 28;
/// `record_count`.
pub const CB_RECORD_COUNT: usize = 32;
/// `frame_crc`.
pub const CB_FRAME_CRC: usize = 36;
const _: () = assert!(CB_FRAME_CRC + 4 == COLD_BLOCK_ENTRY_LEN);

// Cold trailer field offsets.
/// `index_offset`.
pub const CT_INDEX_OFFSET: usize = 0;
/// `block_count`.
pub const CT_BLOCK_COUNT: usize = 8;
/// 4 reserved bytes.
pub const CT_RESERVED_A: usize = 12;
/// `content_hash`: BLAKE3 of every byte before the trailer.
pub const CT_CONTENT_HASH: usize = 16;
/// `magic`.
pub const CT_MAGIC: usize = 48;
/// 4 reserved bytes.
pub const CT_RESERVED_B: usize = 56;
/// `trailer_crc`: CRC-32 of bytes `0..60`.
pub const CT_CRC: usize = 60;
const _: () = assert!(CT_CRC + 4 == COLD_TRAILER_LEN);

/// One compressed block: where its records are in the segment and its frame in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    /// Segment file offset of the block's first record.
    pub segment_offset: u64,
    /// Position of the block's first record.
    pub first_position: Position,
    /// Object offset of the block's zstd frame.
    pub object_offset: u64,
    /// Bytes of the frame.
    pub compressed_len: u32,
    /// Bytes of records the frame decompresses to.
    pub uncompressed_len: u32,
    /// Records in the block (at least 1).
    pub record_count: u32,
    /// CRC-32 of the frame's bytes.
    pub frame_crc: u32,
}

impl BlockEntry {
    /// The segment offset just past the block's last record.
    #[must_use]
    pub fn segment_end(&self) -> u64 {
        self.segment_offset + u64::from(self.uncompressed_len)
    }

    /// The position just past the block's last record.
    #[must_use]
    pub fn end_position(&self) -> Position {
        Position(self.first_position.0 + u64::from(self.record_count))
    }

    /// The object range of the block's frame.
    #[must_use]
    pub fn object_range(&self) -> std::ops::Range<u64> {
        self.object_offset..self.object_offset + u64::from(self.compressed_len)
    }
}

/// The cold trailer: where the index is, how many blocks, and the hash of everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColdTrailer {
    /// Object offset of the block index.
    pub index_offset: u64,
    /// Entries in the block index.
    pub block_count: u32,
    /// BLAKE3 of the object's bytes before the trailer.
    pub content_hash: Hash32,
}

/// A cold segment's header: the sealed segment's own header and footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColdHeader {
    /// The segment's header, as its header page held it.
    pub segment_header: SegmentHeader,
    /// The segment's footer, as its footer page held it.
    pub segment_footer: SegmentFooter,
    /// The uncompressed size the writer aimed each block at.
    pub block_target: u32,
}

/// A whole cold object, checked: its header, block index and trailer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColdLayout {
    /// The header.
    pub header: ColdHeader,
    /// The blocks, in segment order.
    pub blocks: Vec<BlockEntry>,
    /// The trailer.
    pub trailer: ColdTrailer,
}

impl ColdLayout {
    /// The blocks holding positions `from..to` (clamped to the segment).
    #[must_use]
    pub fn blocks_for(&self, from: Position, to: Position) -> &[BlockEntry] {
        let start = self.blocks.partition_point(|b| b.end_position() <= from);
        let end = self.blocks.partition_point(|b| b.first_position < to);
        &self.blocks[start..end.max(start)]
    }
}

/// How a cold segment is written.
#[derive(Clone, Copy, Debug)]
pub struct ColdEncodeOptions {
    /// The uncompressed size each block aims for; a record larger than this is a block of
    /// its own. At most [`COLD_BLOCK_BYTES_MAX`].
    pub block_target: u32,
    /// The zstd compression level.
    pub level: i32,
}

impl Default for ColdEncodeOptions {
    fn default() -> ColdEncodeOptions {
        ColdEncodeOptions {
            block_target: COLD_BLOCK_BYTES_DEFAULT,
            level: COLD_ZSTD_LEVEL_DEFAULT,
        }
    }
}

fn invalid(what: &'static str, detail: String) -> DecodeError {
    DecodeError::Invalid { what, detail }
}

/// The structure bytes of a page encoder's output.
fn structure_of(page: &[u8], len: usize) -> &[u8] {
    &page[..len]
}

/// A page holding `structure` at its start and zeros after it.
fn page_of(structure: &[u8]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_BYTES as usize];
    page[..structure.len()].copy_from_slice(structure);
    page
}

/// Encodes a cold header.
#[must_use]
pub fn encode_header(h: &ColdHeader) -> Vec<u8> {
    let mut b = vec![0u8; COLD_HEADER_LEN];
    b[..8].copy_from_slice(COLD_MAGIC);
    le::put_u16(&mut b, CH_VERSION, COLD_VERSION);
    le::put_u16(&mut b, CH_HEADER_LEN, COLD_HEADER_LEN as u16);
    le::put_u32(&mut b, CH_BLOCK_TARGET, h.block_target);
    b[CH_SEGMENT_HEADER..CH_SEGMENT_FOOTER].copy_from_slice(structure_of(
        &h.segment_header.encode_page(),
        SEGMENT_HEADER_LEN,
    ));
    b[CH_SEGMENT_FOOTER..CH_RESERVED].copy_from_slice(structure_of(
        &h.segment_footer.encode_page(),
        SEGMENT_FOOTER_LEN,
    ));
    let crc = crc32fast::hash(&b[..CH_CRC]);
    le::put_u32(&mut b, CH_CRC, crc);
    b
}

/// Decodes a segment header and footer stored as bare structures, and checks that they
/// describe the same sealed segment.
///
/// # Errors
/// [`DecodeError`] when either does not decode or they disagree.
pub fn decode_structures(
    header: &[u8],
    footer: &[u8],
) -> Result<(SegmentHeader, SegmentFooter), DecodeError> {
    need(header, SEGMENT_HEADER_LEN)?;
    need(footer, SEGMENT_FOOTER_LEN)?;
    let h = SegmentHeader::decode_page(&page_of(&header[..SEGMENT_HEADER_LEN]))?;
    let f = SegmentFooter::decode_page(&page_of(&footer[..SEGMENT_FOOTER_LEN]))?;
    if f.layout != h.layout
        || f.log_id != h.log_id
        || f.seq != h.seq
        || f.first_position != h.base_position
        || f.data_end > h.footer_offset()
    {
        return Err(invalid(
            "cold segment footer",
            format!(
                "the footer of segment {} does not belong to its header (seq {}, first position \
                 {} against base {}, data end {} against limit {})",
                h.seq,
                f.seq,
                f.first_position,
                h.base_position,
                f.data_end,
                h.footer_offset()
            ),
        ));
    }
    Ok((h, f))
}

/// Decodes and checks a cold header (its first [`COLD_HEADER_LEN`] bytes).
///
/// # Errors
/// [`DecodeError`] on a short buffer, wrong magic, CRC, version or length, non-zero
/// reserved bytes, a block target out of range, or a segment header and footer that do not
/// decode or do not belong together.
pub fn decode_header(b: &[u8]) -> Result<ColdHeader, DecodeError> {
    need(b, COLD_HEADER_LEN)?;
    check_magic(b, COLD_MAGIC, "TALLYCLD")?;
    check_crc(le::u32_at(b, CH_CRC), &b[..CH_CRC], "cold header")?;
    let version = le::u16_at(b, CH_VERSION);
    if version != COLD_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "cold segment",
            found: version,
            supported: COLD_VERSION,
        });
    }
    let header_len = le::u16_at(b, CH_HEADER_LEN);
    if header_len as usize != COLD_HEADER_LEN {
        return Err(DecodeError::LengthMismatch {
            what: "cold header",
            declared: u64::from(header_len),
            actual: COLD_HEADER_LEN as u64,
        });
    }
    let block_target = le::u32_at(b, CH_BLOCK_TARGET);
    if block_target == 0 || block_target > COLD_BLOCK_BYTES_MAX {
        return Err(invalid(
            "cold block target",
            format!("{block_target} is not in 1..={COLD_BLOCK_BYTES_MAX}"),
        ));
    }
    check_zero(b, CH_RESERVED..CH_CRC, "cold header")?;
    let (segment_header, segment_footer) = decode_structures(
        &b[CH_SEGMENT_HEADER..CH_SEGMENT_FOOTER],
        &b[CH_SEGMENT_FOOTER..CH_RESERVED],
    )?;
    Ok(ColdHeader {
        segment_header,
        segment_footer,
        block_target,
    })
}

/// Encodes a block index entry.
#[must_use]
pub fn encode_block_entry(e: &BlockEntry) -> [u8; COLD_BLOCK_ENTRY_LEN] {
    let mut b = [0u8; COLD_BLOCK_ENTRY_LEN];
    le::put_u64(&mut b, CB_SEGMENT_OFFSET, e.segment_offset);
    le::put_u64(&mut b, CB_FIRST_POSITION, e.first_position.0);
    le::put_u64(&mut b, CB_OBJECT_OFFSET, e.object_offset);
    le::put_u32(&mut b, CB_COMPRESSED_LEN, e.compressed_len);
    le::put_u32(&mut b, CB_UNCOMPRESSED_LEN, e.uncompressed_len);
    le::put_u32(&mut b, CB_RECORD_COUNT, e.record_count);
    le::put_u32(&mut b, CB_FRAME_CRC, e.frame_crc);
    b
}

/// Encodes a cold trailer.
#[must_use]
pub fn encode_trailer(t: &ColdTrailer) -> [u8; COLD_TRAILER_LEN] {
    let mut b = [0u8; COLD_TRAILER_LEN];
    le::put_u64(&mut b, CT_INDEX_OFFSET, t.index_offset);
    le::put_u32(&mut b, CT_BLOCK_COUNT, t.block_count);
    b[CT_CONTENT_HASH..CT_MAGIC].copy_from_slice(&t.content_hash);
    b[CT_MAGIC..CT_RESERVED_B].copy_from_slice(COLD_TRAILER_MAGIC);
    let crc = crc32fast::hash(&b[..CT_CRC]);
    le::put_u32(&mut b, CT_CRC, crc);
    b
}

/// Decodes and checks a cold trailer (exactly the object's last [`COLD_TRAILER_LEN`]
/// bytes) against the object's length.
///
/// # Errors
/// [`DecodeError`] on a wrong length, magic or CRC, non-zero reserved bytes, or an index
/// that does not end where the trailer starts.
pub fn decode_trailer(b: &[u8], object_len: u64) -> Result<ColdTrailer, DecodeError> {
    if b.len() != COLD_TRAILER_LEN {
        return Err(DecodeError::LengthMismatch {
            what: "cold trailer",
            declared: COLD_TRAILER_LEN as u64,
            actual: b.len() as u64,
        });
    }
    check_crc(le::u32_at(b, CT_CRC), &b[..CT_CRC], "cold trailer")?;
    let magic: [u8; 8] = le::array_at(b, CT_MAGIC);
    if &magic != COLD_TRAILER_MAGIC {
        return Err(DecodeError::BadMagic {
            expected: "TALLYCLT",
            found: magic,
        });
    }
    check_zero(b, CT_RESERVED_A..CT_CONTENT_HASH, "cold trailer")?;
    check_zero(b, CT_RESERVED_B..CT_CRC, "cold trailer")?;
    let t = ColdTrailer {
        index_offset: le::u64_at(b, CT_INDEX_OFFSET),
        block_count: le::u32_at(b, CT_BLOCK_COUNT),
        content_hash: le::array_at(b, CT_CONTENT_HASH),
    };
    let index_end = (COLD_BLOCK_ENTRY_LEN as u64)
        .checked_mul(u64::from(t.block_count))
        .and_then(|n| n.checked_add(t.index_offset));
    let trailer_at = object_len.checked_sub(COLD_TRAILER_LEN as u64);
    if t.block_count == 0
        || t.index_offset < COLD_HEADER_LEN as u64
        || index_end.is_none()
        || index_end != trailer_at
    {
        return Err(invalid(
            "cold trailer",
            format!(
                "an index of {} blocks at {} does not end at the trailer of a {object_len} byte \
                 object",
                t.block_count, t.index_offset
            ),
        ));
    }
    Ok(t)
}

/// Decodes and checks the block index (the object's bytes `index_offset..trailer`) against
/// the header it belongs to: frames follow the header and each other with no gap and end at
/// the index; blocks cover the segment's records from [`SEGMENT_DATA_START`] to `data_end`
/// and its positions in order, with no gap.
///
/// # Errors
/// [`DecodeError`] naming the first entry that breaks a rule.
pub fn decode_index(
    b: &[u8],
    header: &ColdHeader,
    trailer: &ColdTrailer,
) -> Result<Vec<BlockEntry>, DecodeError> {
    let count = trailer.block_count as usize;
    let want = count
        .checked_mul(COLD_BLOCK_ENTRY_LEN)
        .ok_or_else(|| invalid("cold block index", format!("{count} blocks")))?;
    if b.len() != want {
        return Err(DecodeError::LengthMismatch {
            what: "cold block index",
            declared: want as u64,
            actual: b.len() as u64,
        });
    }
    let footer = &header.segment_footer;
    // Each block holds at least one record: more blocks than records is a lie, and the
    // check bounds the allocation below by the footer's own count.
    if count as u64 > footer.record_count {
        return Err(invalid(
            "cold block index",
            format!("{count} blocks for {} records", footer.record_count),
        ));
    }
    let mut blocks = Vec::with_capacity(count);
    let mut object_at = COLD_HEADER_LEN as u64;
    let mut segment_at = SEGMENT_DATA_START;
    let mut position = header.segment_header.base_position;
    for (i, raw) in b.chunks_exact(COLD_BLOCK_ENTRY_LEN).enumerate() {
        let e = BlockEntry {
            segment_offset: le::u64_at(raw, CB_SEGMENT_OFFSET),
            first_position: Position(le::u64_at(raw, CB_FIRST_POSITION)),
            object_offset: le::u64_at(raw, CB_OBJECT_OFFSET),
            compressed_len: le::u32_at(raw, CB_COMPRESSED_LEN),
            uncompressed_len: le::u32_at(raw, CB_UNCOMPRESSED_LEN),
            record_count: le::u32_at(raw, CB_RECORD_COUNT),
            frame_crc: le::u32_at(raw, CB_FRAME_CRC),
        };
        let bad = |why: String| invalid("cold block index", format!("block {i}: {why}"));
        if e.object_offset != object_at {
            return Err(bad(format!(
                "frame at {} where {object_at} was expected",
                e.object_offset
            )));
        }
        if e.segment_offset != segment_at || e.first_position != position {
            return Err(bad(format!(
                "starts at segment offset {} position {}, where {segment_at} and {position} \
                 were expected",
                e.segment_offset, e.first_position
            )));
        }
        if e.compressed_len == 0
            || e.uncompressed_len == 0
            || e.uncompressed_len > COLD_BLOCK_BYTES_MAX
            || e.record_count == 0
        {
            return Err(bad(format!(
                "{} compressed, {} uncompressed bytes and {} records (each must be at least 1, \
                 uncompressed at most {COLD_BLOCK_BYTES_MAX})",
                e.compressed_len, e.uncompressed_len, e.record_count
            )));
        }
        let overflow = || bad("offsets or positions overflow".to_owned());
        object_at = object_at
            .checked_add(u64::from(e.compressed_len))
            .ok_or_else(overflow)?;
        segment_at = segment_at
            .checked_add(u64::from(e.uncompressed_len))
            .ok_or_else(overflow)?;
        position = Position(
            position
                .0
                .checked_add(u64::from(e.record_count))
                .ok_or_else(overflow)?,
        );
        blocks.push(e);
    }
    if object_at != trailer.index_offset
        || segment_at != footer.data_end
        || position != footer.last_position.next()
    {
        return Err(invalid(
            "cold block index",
            format!(
                "blocks end at object offset {object_at}, segment offset {segment_at} and \
                 position {position}; the index is at {}, the segment's data ends at {} and its \
                 last position is {}",
                trailer.index_offset, footer.data_end, footer.last_position
            ),
        ));
    }
    Ok(blocks)
}

/// Decodes and checks a whole cold object: trailer, content hash, header and index.
///
/// # Errors
/// [`DecodeError`] for the first thing that does not match the specification.
pub fn decode_cold(object: &[u8]) -> Result<ColdLayout, DecodeError> {
    let len = object.len() as u64;
    need(object, COLD_HEADER_LEN + COLD_TRAILER_LEN)?;
    let trailer_at = object.len() - COLD_TRAILER_LEN;
    let trailer = decode_trailer(&object[trailer_at..], len)?;
    let hash = *blake3::hash(&object[..trailer_at]).as_bytes();
    if hash != trailer.content_hash {
        return Err(invalid(
            "cold segment content hash",
            "the BLAKE3 hash of the object does not match its trailer".to_owned(),
        ));
    }
    let header = decode_header(&object[..COLD_HEADER_LEN])?;
    // `decode_trailer` checked `index_offset + count * entry == trailer_at`.
    let index_at = trailer.index_offset as usize;
    let blocks = decode_index(&object[index_at..trailer_at], &header, &trailer)?;
    Ok(ColdLayout {
        header,
        blocks,
        trailer,
    })
}

/// Checks a block's frame against its CRC and decompresses it to exactly its
/// `uncompressed_len` bytes (never more is allocated).
///
/// # Errors
/// [`DecodeError`] on a wrong frame length, CRC, a frame zstd refuses, or a different
/// decompressed length.
pub fn decompress_block(entry: &BlockEntry, frame: &[u8]) -> Result<Vec<u8>, DecodeError> {
    if frame.len() as u64 != u64::from(entry.compressed_len) {
        return Err(DecodeError::LengthMismatch {
            what: "cold block frame",
            declared: u64::from(entry.compressed_len),
            actual: frame.len() as u64,
        });
    }
    check_crc(entry.frame_crc, frame, "cold block frame")?;
    if entry.uncompressed_len > COLD_BLOCK_BYTES_MAX {
        return Err(DecodeError::TooLong {
            what: "cold block",
            len: u64::from(entry.uncompressed_len),
            max: u64::from(COLD_BLOCK_BYTES_MAX),
        });
    }
    let out = zstd::bulk::decompress(frame, entry.uncompressed_len as usize).map_err(|e| {
        invalid(
            "cold block frame",
            format!(
                "zstd refused the frame at object offset {}: {e}",
                entry.object_offset
            ),
        )
    })?;
    if out.len() != entry.uncompressed_len as usize {
        return Err(DecodeError::LengthMismatch {
            what: "cold block",
            declared: u64::from(entry.uncompressed_len),
            actual: out.len() as u64,
        });
    }
    Ok(out)
}

/// Writes a sealed segment as a cold object. `data` is the segment's bytes
/// `SEGMENT_DATA_START..data_end`, `record_lens` the length of each record in order (their
/// sum is `data.len()`, their count the footer's `record_count`).
///
/// # Errors
/// [`DecodeError::Invalid`] when the records do not add up to the footer, or when zstd
/// fails (which it does only when out of memory).
pub fn encode_cold(
    header: &SegmentHeader,
    footer: &SegmentFooter,
    data: &[u8],
    record_lens: &[u64],
    opts: ColdEncodeOptions,
) -> Result<Vec<u8>, DecodeError> {
    let total: u64 = record_lens.iter().sum();
    if total != data.len() as u64
        || record_lens.len() as u64 != footer.record_count
        || SEGMENT_DATA_START + total != footer.data_end
        || record_lens
            .iter()
            .any(|&l| l == 0 || l > u64::from(COLD_BLOCK_BYTES_MAX))
    {
        return Err(invalid(
            "cold segment input",
            format!(
                "{} records of {total} bytes against a footer of {} records ending at {}",
                record_lens.len(),
                footer.record_count,
                footer.data_end
            ),
        ));
    }
    let target = u64::from(opts.block_target.clamp(1, COLD_BLOCK_BYTES_MAX));
    let cold_header = ColdHeader {
        segment_header: *header,
        segment_footer: *footer,
        block_target: target as u32,
    };
    let mut out = encode_header(&cold_header);
    let mut blocks = Vec::new();
    let (mut start, mut i, mut position) = (0u64, 0usize, header.base_position);
    while i < record_lens.len() {
        let (mut len, mut count) = (record_lens[i], 1u32);
        i += 1;
        while i < record_lens.len() && len + record_lens[i] <= target {
            len += record_lens[i];
            count += 1;
            i += 1;
        }
        let raw = &data[start as usize..(start + len) as usize];
        let frame = zstd::bulk::compress(raw, opts.level)
            .map_err(|e| invalid("cold block", format!("zstd: {e}")))?;
        let entry = BlockEntry {
            segment_offset: SEGMENT_DATA_START + start,
            first_position: position,
            object_offset: out.len() as u64,
            compressed_len: u32::try_from(frame.len())
                .map_err(|_| invalid("cold block", "frame over 4 GiB".to_owned()))?,
            uncompressed_len: len as u32,
            record_count: count,
            frame_crc: crc32fast::hash(&frame),
        };
        out.extend_from_slice(&frame);
        blocks.push(entry);
        start += len;
        position = entry.end_position();
    }
    let index_offset = out.len() as u64;
    for b in &blocks {
        out.extend_from_slice(&encode_block_entry(b));
    }
    let trailer = ColdTrailer {
        index_offset,
        block_count: blocks.len() as u32,
        content_hash: *blake3::hash(&out).as_bytes(),
    };
    out.extend_from_slice(&encode_trailer(&trailer));
    Ok(out)
}

// -------------------------------------------------------------------------------------
// The cold manifest.

/// Magic of the cold manifest's header.
pub const MANIFEST_MAGIC: &[u8; 8] = b"TALLYCMF";
/// The version of the cold manifest layout.
pub const MANIFEST_VERSION: u16 = 1;
/// Bytes of the manifest header.
pub const MANIFEST_HEADER_LEN: usize = 64;
/// Bytes of one manifest entry.
pub const MANIFEST_ENTRY_LEN: usize = 400;

// Manifest header field offsets.
/// `version`.
pub const MH_VERSION: usize = 8;
/// `header_len`.
pub const MH_HEADER_LEN: usize = 10;
/// `entry_len`.
pub const MH_ENTRY_LEN: usize = 12;
/// `log_id`.
pub const MH_LOG_ID: usize = 16;
/// 28 reserved bytes.
pub const MH_RESERVED: usize = 32;
/// `header_crc`: CRC-32 of bytes `0..60`.
pub const MH_CRC: usize = 60;
const _: () = assert!(MH_CRC + 4 == MANIFEST_HEADER_LEN);

// Manifest entry field offsets.
/// `kind`.
pub const ME_KIND: usize = 0;
/// 6 reserved bytes.
pub const ME_RESERVED_A: usize = 2;
/// `seq`.
pub const ME_SEQ: usize = 8;
/// `recorded_time`.
pub const ME_RECORDED_TIME: usize = 16;
/// `object_len`.
pub const ME_OBJECT_LEN: usize = 24;
/// `object_hash`.
pub const ME_OBJECT_HASH: usize = 32;
/// The segment header structure.
pub const ME_SEGMENT_HEADER: usize = 64;
/// The segment footer structure.
pub const ME_SEGMENT_FOOTER: usize = ME_SEGMENT_HEADER + SEGMENT_HEADER_LEN;
/// 12 reserved bytes.
pub const ME_RESERVED_B: usize = ME_SEGMENT_FOOTER + SEGMENT_FOOTER_LEN;
/// `entry_crc`: CRC-32 of bytes `0..396`.
pub const ME_CRC: usize = 396;
const _: () = assert!(ME_RESERVED_B + 12 == ME_CRC);
const _: () = assert!(ME_CRC + 4 == MANIFEST_ENTRY_LEN);

/// The kind of a manifest entry: the segment's cold object was written, read back and
/// checked, and the segment may be read from it (its local file is removed after this).
pub const MANIFEST_KIND_COLD: u16 = 1;

/// One manifest entry: a segment moved to the cold tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    /// The segment's sequence number.
    pub seq: SegmentSeq,
    /// When the entry was written.
    pub recorded_time: Timestamp,
    /// Bytes of the cold object.
    pub object_len: u64,
    /// BLAKE3 of the whole cold object.
    pub object_hash: Hash32,
    /// The segment's header.
    pub segment_header: SegmentHeader,
    /// The segment's footer.
    pub segment_footer: SegmentFooter,
}

/// Encodes the manifest header.
#[must_use]
pub fn encode_manifest_header(log_id: &[u8; 16]) -> [u8; MANIFEST_HEADER_LEN] {
    let mut b = [0u8; MANIFEST_HEADER_LEN];
    b[..8].copy_from_slice(MANIFEST_MAGIC);
    le::put_u16(&mut b, MH_VERSION, MANIFEST_VERSION);
    le::put_u16(&mut b, MH_HEADER_LEN, MANIFEST_HEADER_LEN as u16);
    le::put_u32(&mut b, MH_ENTRY_LEN, MANIFEST_ENTRY_LEN as u32);
    b[MH_LOG_ID..MH_RESERVED].copy_from_slice(log_id);
    let crc = crc32fast::hash(&b[..MH_CRC]);
    le::put_u32(&mut b, MH_CRC, crc);
    b
}

/// Decodes and checks the manifest header, giving the log id it names.
///
/// # Errors
/// [`DecodeError`] on a short buffer, wrong magic, CRC, version or lengths, or non-zero
/// reserved bytes.
pub fn decode_manifest_header(b: &[u8]) -> Result<[u8; 16], DecodeError> {
    need(b, MANIFEST_HEADER_LEN)?;
    check_magic(b, MANIFEST_MAGIC, "TALLYCMF")?;
    check_crc(le::u32_at(b, MH_CRC), &b[..MH_CRC], "cold manifest header")?;
    let version = le::u16_at(b, MH_VERSION);
    if version != MANIFEST_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "cold manifest",
            found: version,
            supported: MANIFEST_VERSION,
        });
    }
    let (header_len, entry_len) = (le::u16_at(b, MH_HEADER_LEN), le::u32_at(b, MH_ENTRY_LEN));
    if header_len as usize != MANIFEST_HEADER_LEN || entry_len as usize != MANIFEST_ENTRY_LEN {
        return Err(DecodeError::LengthMismatch {
            what: "cold manifest header",
            declared: u64::from(header_len) + u64::from(entry_len),
            actual: (MANIFEST_HEADER_LEN + MANIFEST_ENTRY_LEN) as u64,
        });
    }
    check_zero(b, MH_RESERVED..MH_CRC, "cold manifest header")?;
    Ok(le::array_at(b, MH_LOG_ID))
}

/// Encodes a manifest entry.
#[must_use]
pub fn encode_manifest_entry(e: &ManifestEntry) -> [u8; MANIFEST_ENTRY_LEN] {
    let mut b = [0u8; MANIFEST_ENTRY_LEN];
    le::put_u16(&mut b, ME_KIND, MANIFEST_KIND_COLD);
    le::put_u64(&mut b, ME_SEQ, e.seq.0);
    le::put_u64(&mut b, ME_RECORDED_TIME, e.recorded_time.0);
    le::put_u64(&mut b, ME_OBJECT_LEN, e.object_len);
    b[ME_OBJECT_HASH..ME_SEGMENT_HEADER].copy_from_slice(&e.object_hash);
    b[ME_SEGMENT_HEADER..ME_SEGMENT_FOOTER].copy_from_slice(structure_of(
        &e.segment_header.encode_page(),
        SEGMENT_HEADER_LEN,
    ));
    b[ME_SEGMENT_FOOTER..ME_RESERVED_B].copy_from_slice(structure_of(
        &e.segment_footer.encode_page(),
        SEGMENT_FOOTER_LEN,
    ));
    let crc = crc32fast::hash(&b[..ME_CRC]);
    le::put_u32(&mut b, ME_CRC, crc);
    b
}

/// Decodes and checks one manifest entry.
///
/// # Errors
/// [`DecodeError`] on a short buffer, CRC, an unknown kind, non-zero reserved bytes, a
/// segment header and footer that do not decode or belong together, or a `seq` that is not
/// theirs.
pub fn decode_manifest_entry(b: &[u8]) -> Result<ManifestEntry, DecodeError> {
    need(b, MANIFEST_ENTRY_LEN)?;
    check_crc(le::u32_at(b, ME_CRC), &b[..ME_CRC], "cold manifest entry")?;
    let kind = le::u16_at(b, ME_KIND);
    if kind != MANIFEST_KIND_COLD {
        return Err(invalid(
            "cold manifest entry kind",
            format!("{kind} (this build knows {MANIFEST_KIND_COLD})"),
        ));
    }
    check_zero(b, ME_RESERVED_A..ME_SEQ, "cold manifest entry")?;
    check_zero(b, ME_RESERVED_B..ME_CRC, "cold manifest entry")?;
    let (segment_header, segment_footer) = decode_structures(
        &b[ME_SEGMENT_HEADER..ME_SEGMENT_FOOTER],
        &b[ME_SEGMENT_FOOTER..ME_RESERVED_B],
    )?;
    let seq = SegmentSeq(le::u64_at(b, ME_SEQ));
    if seq != segment_header.seq {
        return Err(invalid(
            "cold manifest entry",
            format!(
                "entry for segment {seq} holds segment {}",
                segment_header.seq
            ),
        ));
    }
    let object_len = le::u64_at(b, ME_OBJECT_LEN);
    if object_len < (COLD_HEADER_LEN + COLD_BLOCK_ENTRY_LEN + COLD_TRAILER_LEN) as u64 {
        return Err(invalid(
            "cold manifest entry",
            format!("segment {seq}: a cold object of {object_len} bytes is too short"),
        ));
    }
    Ok(ManifestEntry {
        seq,
        recorded_time: Timestamp(le::u64_at(b, ME_RECORDED_TIME)),
        object_len,
        object_hash: le::array_at(b, ME_OBJECT_HASH),
        segment_header,
        segment_footer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::Layout;

    pub(crate) fn sample(records: &[&[u8]]) -> (SegmentHeader, SegmentFooter, Vec<u8>, Vec<u64>) {
        let data: Vec<u8> = records.concat();
        let lens: Vec<u64> = records.iter().map(|r| r.len() as u64).collect();
        let header = SegmentHeader {
            layout: Layout::V2,
            log_id: [7; 16],
            seq: SegmentSeq(3),
            base_position: Position(100),
            created_time: Timestamp(5),
            capacity: 1 << 20,
            prev_chain_hash: [9; 32],
        };
        let footer = SegmentFooter {
            layout: Layout::V2,
            log_id: [7; 16],
            seq: SegmentSeq(3),
            record_count: records.len() as u64,
            first_position: Position(100),
            last_position: Position(100 + records.len() as u64 - 1),
            data_end: SEGMENT_DATA_START + data.len() as u64,
            first_record_time: Timestamp(6),
            last_record_time: Timestamp(8),
            last_chain_hash: [1; 32],
            merkle_root: [2; 32],
        };
        (header, footer, data, lens)
    }

    fn records(n: usize, len: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                (0..len)
                    .map(|j| ((i * 31 + j / 7) % 251) as u8)
                    .collect::<Vec<u8>>()
            })
            .collect()
    }

    fn rehydrate(object: &[u8]) -> Vec<u8> {
        let layout = decode_cold(object).unwrap();
        let mut out = Vec::new();
        for b in &layout.blocks {
            let frame = &object[b.object_offset as usize..b.object_range().end as usize];
            out.extend(decompress_block(b, frame).unwrap());
        }
        out
    }

    #[test]
    fn a_segment_round_trips_through_blocks_of_whole_records() {
        let recs = records(50, 1000);
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let (h, f, data, lens) = sample(&refs);
        let opts = ColdEncodeOptions {
            block_target: 4096,
            level: 3,
        };
        let object = encode_cold(&h, &f, &data, &lens, opts).unwrap();
        let layout = decode_cold(&object).unwrap();
        assert_eq!(layout.header.segment_header, h);
        assert_eq!(layout.header.segment_footer, f);
        // 4 records of 1000 bytes fit a 4096-byte block.
        assert_eq!(layout.blocks.len(), 13);
        assert!(layout.blocks.iter().all(|b| b.uncompressed_len % 1000 == 0));
        assert_eq!(rehydrate(&object), data);
        // A range needs only the blocks that hold it.
        let some = layout.blocks_for(Position(109), Position(113));
        assert_eq!(some.len(), 2);
        assert_eq!(some[0].first_position, Position(108));
        assert_eq!(some[1].first_position, Position(112));
        assert_eq!(layout.blocks_for(Position(109), Position(112)).len(), 1);
        assert!(layout.blocks_for(Position(150), Position(200)).is_empty());
        // A record larger than the target is a block of its own.
        let big = vec![5u8; 10_000];
        let (h, f, data, lens) = sample(&[&[1u8; 10], &big, &[2u8; 10]]);
        let object = encode_cold(&h, &f, &data, &lens, opts).unwrap();
        let layout = decode_cold(&object).unwrap();
        let counts: Vec<u32> = layout.blocks.iter().map(|b| b.record_count).collect();
        assert_eq!(counts, vec![1, 1, 1]);
        assert_eq!(rehydrate(&object), data);
    }

    #[test]
    fn every_altered_byte_of_a_cold_object_is_refused() {
        let recs = records(6, 300);
        let refs: Vec<&[u8]> = recs.iter().map(Vec::as_slice).collect();
        let (h, f, data, lens) = sample(&refs);
        let opts = ColdEncodeOptions {
            block_target: 700,
            level: 1,
        };
        let object = encode_cold(&h, &f, &data, &lens, opts).unwrap();
        for i in 0..object.len() {
            let mut bad = object.clone();
            bad[i] ^= 0x40;
            assert!(decode_cold(&bad).is_err(), "byte {i} altered and accepted");
        }
        for cut in [0, 1, COLD_TRAILER_LEN, object.len() - 1] {
            assert!(decode_cold(&object[..cut.min(object.len())]).is_err());
        }
        // A frame checked on its own (a range read) is refused when altered.
        let layout = decode_cold(&object).unwrap();
        let b = layout.blocks[1];
        let mut frame = object[b.object_offset as usize..b.object_range().end as usize].to_vec();
        assert!(decompress_block(&b, &frame).is_ok());
        frame[3] ^= 1;
        assert!(decompress_block(&b, &frame).is_err());
        assert!(decompress_block(&b, &frame[1..]).is_err());
    }

    #[test]
    fn inputs_that_do_not_add_up_to_the_footer_are_refused() {
        let (h, f, data, mut lens) = sample(&[&[1u8; 10], &[2u8; 20]]);
        lens[1] = 19;
        assert!(encode_cold(&h, &f, &data, &lens, ColdEncodeOptions::default()).is_err());
        assert!(encode_cold(&h, &f, &data, &lens[..1], ColdEncodeOptions::default()).is_err());
    }

    #[test]
    fn manifest_entries_round_trip_and_refuse_alteration() {
        let (h, f, _, _) = sample(&[&[1u8; 10]]);
        let e = ManifestEntry {
            seq: h.seq,
            recorded_time: Timestamp(77),
            object_len: 4242,
            object_hash: [3; 32],
            segment_header: h,
            segment_footer: f,
        };
        let bytes = encode_manifest_entry(&e);
        assert_eq!(decode_manifest_entry(&bytes).unwrap(), e);
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 1;
            assert!(decode_manifest_entry(&bad).is_err(), "byte {i}");
        }
        let header = encode_manifest_header(&[7; 16]);
        assert_eq!(decode_manifest_header(&header).unwrap(), [7; 16]);
        for i in 0..header.len() {
            let mut bad = header;
            bad[i] ^= 1;
            assert!(decode_manifest_header(&bad).is_err(), "byte {i}");
        }
    }
}
