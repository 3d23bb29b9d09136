//! `docs/FORMAT.md` against the code.
//!
//! Scenario: the format document is the specification and the code mirrors it; nothing else
//! keeps the two in step. Method: parse the document, find each table by the heading above
//! it, and compare every row with the public constants of `tally_engine::format` and
//! `tally_engine::index` (offsets, sizes, field names, flag bits, kinds, limits, magics, the
//! chain seed context). Where an encoder is public, also encode a value whose fields are
//! all distinct and read each field back at the offset the document gives it, and check each
//! CRC field over the byte range its row names, with a CRC-32 written out here from the
//! definition in "Conventions".
//!
//! The stream snapshot constants (`engine/src/log/streams.rs`) are not reachable from an
//! integration test (the module is private); until they are re-exported, their values are read
//! from the source text, so a changed constant still fails this test.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;

use tally_engine::ContentType;
use tally_engine::format::chain::{CHAIN_SEED_CONTEXT, LINK_LEN};
use tally_engine::format::envelope::{self, EnvelopeRef};
use tally_engine::format::meta;
use tally_engine::format::record::{self, RecordKind, flags};
use tally_engine::format::segment;
use tally_engine::format::{self, EventId, Position, SegmentSeq, Timestamp};
use tally_engine::index::{self, ActiveIndex, IndexFileInfo, StreamKey};

const DOC: &str = include_str!("../../docs/FORMAT.md");
const STREAMS_RS: &str = include_str!("../src/log/streams.rs");

// ---------------------------------------------------------------------------------------
// Reading the document.

/// A markdown table: its header cells and its rows, cells trimmed and unquoted.
#[derive(Debug)]
struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

/// The title of a heading line with its section number removed ("10.2 Index header" gives
/// "Index header"), or `None` for other lines.
fn heading_title(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?.trim_start_matches('#').trim();
    let mut words = rest.splitn(2, ' ');
    let first = words.next().unwrap_or("");
    let numbered = !first.is_empty() && first.chars().all(|c| c.is_ascii_digit() || c == '.');
    Some(if numbered {
        words.next().unwrap_or("").trim()
    } else {
        rest
    })
}

/// The document's lines, each with the title of the section it is in (code fences skipped
/// when looking for headings).
fn lines_with_sections() -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut in_fence = false;
    for line in DOC.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && let Some(t) = heading_title(line) {
            section = t.to_owned();
            continue;
        }
        out.push((section.clone(), line));
    }
    out
}

/// The text of the section under the heading `title` (up to the next heading of any level).
/// Panics unless exactly one heading has that title.
fn section(title: &str) -> String {
    let count = DOC
        .lines()
        .filter(|l| heading_title(l) == Some(title))
        .count();
    assert_eq!(
        count, 1,
        "FORMAT.md must have exactly one heading {title:?}"
    );
    lines_with_sections()
        .into_iter()
        .filter(|(s, _)| s == title)
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The cells of a table row; a cell that is one code span (`` `name` ``) loses its quotes.
fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner
        .split('|')
        .map(|c| {
            let c = c.trim();
            let one_span = c.len() >= 2 && c.starts_with('`') && c.ends_with('`');
            if one_span && c.matches('`').count() == 2 {
                c[1..c.len() - 1].to_owned()
            } else {
                c.to_owned()
            }
        })
        .collect()
}

/// Every table of the document, titled by the heading above it.
fn all_tables() -> Vec<Table> {
    let mut tables: Vec<Table> = Vec::new();
    let mut current: Option<Table> = None;
    for (title, line) in lines_with_sections() {
        if line.trim_start().starts_with('|') {
            let row = cells(line);
            match &mut current {
                None => {
                    current = Some(Table {
                        title,
                        header: row,
                        rows: Vec::new(),
                    });
                }
                Some(t) => {
                    let separator = row
                        .iter()
                        .all(|c| !c.is_empty() && c.chars().all(|ch| ch == '-' || ch == ':'));
                    if !separator {
                        assert_eq!(
                            row.len(),
                            t.header.len(),
                            "table under {:?}: row {line:?} has the wrong number of cells",
                            t.title
                        );
                        t.rows.push(row);
                    }
                }
            }
        } else if let Some(t) = current.take() {
            tables.push(t);
        }
    }
    tables.extend(current);
    tables
}

/// The first table under the heading `title`.
fn table(title: &str) -> Table {
    section(title); // checks that the heading exists exactly once
    let t = all_tables()
        .into_iter()
        .find(|t| t.title == title)
        .unwrap_or_else(|| panic!("no table under the heading {title:?} in FORMAT.md"));
    assert!(!t.rows.is_empty(), "the table under {title:?} is empty");
    t
}

fn column(t: &Table, name: &str) -> usize {
    t.header
        .iter()
        .position(|h| h == name)
        .unwrap_or_else(|| panic!("table {:?} has no column {name:?}", t.title))
}

fn number(t: &Table, cell: &str) -> u64 {
    cell.parse()
        .unwrap_or_else(|_| panic!("table {:?}: {cell:?} is not a number", t.title))
}

fn fail_on(errors: Vec<String>) {
    assert!(
        errors.is_empty(),
        "FORMAT.md disagrees with the code:\n  {}",
        errors.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------
// Checks.

const LAYOUT_HEADER: [&str; 4] = ["Offset", "Size", "Field", "Meaning"];

/// Compares a field table with the code: `fields` lists each field's name and offset
/// constant in order, `total` is the structure's length constant; sizes follow from them.
fn check_layout(title: &str, total: usize, fields: &[(&str, usize)]) {
    let t = table(title);
    assert_eq!(t.header, LAYOUT_HEADER, "columns of the table {title:?}");
    let mut errors = Vec::new();
    if t.rows.len() != fields.len() {
        errors.push(format!(
            "{title}: {} rows in the document, {} fields in the code",
            t.rows.len(),
            fields.len()
        ));
    }
    for (i, (row, &(name, offset))) in t.rows.iter().zip(fields).enumerate() {
        let end = fields.get(i + 1).map_or(total, |f| f.1);
        let size = end - offset;
        let (doc_offset, doc_size) = (number(&t, &row[0]), number(&t, &row[1]));
        if row[2] != name || doc_offset != offset as u64 || doc_size != size as u64 {
            errors.push(format!(
                "{title}: document row {} {} {:?}, code {offset} {size} {name:?}",
                row[0], row[1], row[2]
            ));
        }
    }
    // The document's own arithmetic: rows are contiguous and fill the structure.
    let mut at = 0;
    for row in &t.rows {
        let offset = number(&t, &row[0]);
        if offset != at {
            errors.push(format!(
                "{title}: field {:?} starts at {offset}, the previous one ends at {at}",
                row[2]
            ));
        }
        at = offset + number(&t, &row[1]);
    }
    if at != total as u64 {
        errors.push(format!(
            "{title}: the fields end at {at}, the structure is {total} bytes"
        ));
    }
    fail_on(errors);
}

/// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), bit by bit from the definition.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The first code span of the form `a..b` in a cell.
fn range_in(cell: &str) -> Option<std::ops::Range<usize>> {
    cell.split('`').skip(1).step_by(2).find_map(|span| {
        let (a, b) = span.split_once("..")?;
        Some(a.parse().ok()?..b.parse().ok()?)
    })
}

/// Reads every field of an encoded structure at the offset its table row gives: reserved
/// fields must be zero, a magic must be the one the row names, a CRC field whose row names a
/// byte range must be the CRC-32 of that range, and every other field must hold
/// `values[name]`.
fn check_encoding(title: &str, bytes: &[u8], values: &[(&str, Vec<u8>)]) {
    let values: HashMap<&str, &Vec<u8>> = values.iter().map(|(k, v)| (*k, v)).collect();
    let t = table(title);
    let mut errors = Vec::new();
    for row in &t.rows {
        let (offset, size) = (number(&t, &row[0]) as usize, number(&t, &row[1]) as usize);
        let field = row[2].as_str();
        let Some(got) = bytes.get(offset..offset + size) else {
            errors.push(format!(
                "{title}: {field} lies outside the {} bytes",
                bytes.len()
            ));
            continue;
        };
        let meaning = &row[3];
        if field == "reserved" {
            if got.iter().any(|&b| b != 0) {
                errors.push(format!("{title}: reserved bytes at {offset} are not zero"));
            }
        } else if field == "magic" {
            let magic = String::from_utf8_lossy(got);
            if !meaning.contains(&format!("`{magic}`")) {
                errors.push(format!(
                    "{title}: the magic at {offset} is {magic:?}; the document says {meaning}"
                ));
            }
        } else if let Some(range) = range_in(meaning).filter(|_| field.ends_with("crc")) {
            let crc = crc32(&bytes[range.clone()]).to_le_bytes();
            if got != crc {
                errors.push(format!(
                    "{title}: {field} at {offset} is not the CRC-32 of bytes {range:?}"
                ));
            }
        } else {
            match values.get(field) {
                Some(v) if v.as_slice() == got => {}
                Some(v) => errors.push(format!(
                    "{title}: {field} at {offset}: encoded {got:02x?}, expected {v:02x?}"
                )),
                None => errors.push(format!("{title}: no test value for field {field:?}")),
            }
        }
    }
    fail_on(errors);
}

/// The value of `pub const NAME: usize = N;` (or a byte-string magic) in the source of the
/// private `log::streams` module.
fn streams_const(name: &str) -> u64 {
    let prefix = format!("pub const {name}: usize = ");
    let line = STREAMS_RS
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("log/streams.rs has no `{prefix}<literal>;`"));
    line.trim_end_matches(';')
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("log/streams.rs: {name} is not a plain literal: {line:?}"))
}

fn streams_magic() -> Vec<u8> {
    let line = STREAMS_RS
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("pub const SNAPSHOT_MAGIC: &[u8; 8] = b\"")
        })
        .expect("log/streams.rs defines SNAPSHOT_MAGIC");
    line.split('"').next().unwrap_or("").as_bytes().to_vec()
}

fn le16(v: u16) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
fn le32(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
fn le64(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
/// `n` distinct bytes starting at `from`.
fn ramp<const N: usize>(from: u8) -> [u8; N] {
    std::array::from_fn(|i| from.wrapping_add(i as u8))
}

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn every_field_table_is_checked() {
    let checked = [
        "Log identity file",
        "Segment header",
        "Segment footer",
        "Record header",
        "Record header version 2",
        "Envelope fixed part",
        "Blob references",
        "Index header",
        "Stream-table entry",
        "Event entry",
        "Sparse entry",
        "Snapshot header",
        "Snapshot entry",
        "Node file header",
        "Checkpoint statement",
        "Checkpoint statement version 2",
        "Checkpoint entry",
        "Cosignature entry",
        "Producer block",
        "Batch statement",
        "Snapshot payload header",
        "Projection checkpoint header",
        "State manifest",
        "Part reference",
        "Attribute index header",
        "Key entry",
        "Event-time entry",
        "Typed event-time entry",
        "Cold header",
        "Block index entry",
        "Cold trailer",
        "Record header version 4",
        "Pruned body",
        "Sealed payload",
        "Key store header",
        "Key store slot",
        "Cold manifest header",
        "Cold manifest entry",
    ];
    let field_tables: Vec<String> = all_tables()
        .into_iter()
        .filter(|t| t.header == LAYOUT_HEADER)
        .map(|t| t.title)
        .collect();
    for title in &field_tables {
        assert!(
            checked.contains(&title.as_str()),
            "the field table under {title:?} is not checked by this test"
        );
    }
    for title in checked {
        assert!(
            field_tables.iter().any(|t| t == title),
            "no field table under {title:?}"
        );
    }
}

#[test]
fn constants_table_matches_the_code() {
    let code: Vec<(&str, u64)> = vec![
        ("FORMAT_VERSION", u64::from(format::FORMAT_VERSION)),
        ("STRUCTURE_VERSION", u64::from(format::STRUCTURE_VERSION)),
        ("PAGE_BYTES", format::PAGE_BYTES),
        ("SEGMENT_DATA_START", format::SEGMENT_DATA_START),
        ("SEGMENT_FOOTER_BYTES", format::SEGMENT_FOOTER_BYTES),
        ("SEGMENT_BYTES_MIN", format::SEGMENT_BYTES_MIN),
        ("SEGMENT_BYTES_MAX", format::SEGMENT_BYTES_MAX),
        ("SEGMENT_BYTES_DEFAULT", format::SEGMENT_BYTES_DEFAULT),
        ("SEGMENT_HEADER_LEN", segment::SEGMENT_HEADER_LEN as u64),
        ("SEGMENT_FOOTER_LEN", segment::SEGMENT_FOOTER_LEN as u64),
        ("META_LEN", meta::META_LEN as u64),
        ("RECORD_HEADER_LEN", record::RECORD_HEADER_LEN as u64),
        ("RECORD_HEADER_V2_LEN", record::RECORD_HEADER_V2_LEN as u64),
        ("RECORD_ALIGN", record::RECORD_ALIGN as u64),
        ("ENVELOPE_FIXED_LEN", envelope::ENVELOPE_FIXED_LEN as u64),
        ("BODY_BYTES_MAX", u64::from(record::BODY_BYTES_MAX)),
        ("LINK_LEN", LINK_LEN as u64),
        ("INDEX_HEADER_LEN", index::INDEX_HEADER_LEN as u64),
        ("STREAM_ENTRY_LEN", index::STREAM_ENTRY_LEN as u64),
        ("EVENT_ENTRY_LEN", index::EVENT_ENTRY_LEN as u64),
        ("SPARSE_ENTRY_LEN", index::SPARSE_ENTRY_LEN as u64),
        ("EVENT_ID_LEN", index::EVENT_ID_LEN as u64),
        ("INDEX_TRAILER_LEN", index::INDEX_TRAILER_LEN as u64),
        ("SPARSE_EVERY", u64::from(index::SPARSE_EVERY)),
        ("SNAPSHOT_HEADER_LEN", streams_const("SNAPSHOT_HEADER_LEN")),
        ("SNAPSHOT_ENTRY_LEN", streams_const("SNAPSHOT_ENTRY_LEN")),
    ];
    let t = table("Constants");
    let (name_col, value_col) = (column(&t, "Name"), column(&t, "Value"));
    let mut errors = Vec::new();
    let doc: HashMap<&str, u64> = t
        .rows
        .iter()
        .map(|r| (r[name_col].as_str(), number(&t, &r[value_col])))
        .collect();
    for (name, value) in &code {
        match doc.get(name) {
            Some(v) if v == value => {}
            Some(v) => errors.push(format!("{name}: document {v}, code {value}")),
            None => errors.push(format!("{name} ({value}) is missing from the document")),
        }
    }
    for name in doc.keys() {
        if !code.iter().any(|(n, _)| n == name) {
            errors.push(format!("{name} is in the document but not checked here"));
        }
    }
    fail_on(errors);
}

#[test]
fn magic_numbers_match_the_code() {
    let code: Vec<(&str, Vec<u8>)> = vec![
        ("format::meta::META_MAGIC", meta::META_MAGIC.to_vec()),
        (
            "format::segment::SEGMENT_MAGIC",
            segment::SEGMENT_MAGIC.to_vec(),
        ),
        (
            "format::segment::FOOTER_MAGIC",
            segment::FOOTER_MAGIC.to_vec(),
        ),
        ("index::INDEX_MAGIC", index::INDEX_MAGIC.to_vec()),
        (
            "index::attrs::ATTR_MAGIC",
            index::attrs::ATTR_MAGIC.to_vec(),
        ),
        ("log::streams::SNAPSHOT_MAGIC", streams_magic()),
        (
            "format::cold::COLD_MAGIC",
            format::cold::COLD_MAGIC.to_vec(),
        ),
        (
            "format::cold::MANIFEST_MAGIC",
            format::cold::MANIFEST_MAGIC.to_vec(),
        ),
        (
            "keys::KEY_FILE_MAGIC",
            tally_engine::keys::KEY_FILE_MAGIC.to_vec(),
        ),
    ];
    let t = table("Magic numbers");
    let (magic_col, const_col) = (column(&t, "Magic"), column(&t, "Constant"));
    assert_eq!(t.rows.len(), code.len(), "rows of the magic table");
    let mut errors = Vec::new();
    for row in &t.rows {
        match code.iter().find(|(n, _)| *n == row[const_col]) {
            Some((_, m)) if m.as_slice() == row[magic_col].as_bytes() => {}
            Some((n, m)) => errors.push(format!(
                "{n}: document {:?}, code {:?}",
                row[magic_col],
                String::from_utf8_lossy(m)
            )),
            None => errors.push(format!("unknown constant {:?}", row[const_col])),
        }
    }
    fail_on(errors);
}

#[test]
fn file_names_match_the_code() {
    let dirs = section("Directory layout and file naming");
    let seg = SegmentSeq(42).file_name();
    let idx = SegmentSeq(42).index_file_name();
    assert!(dirs.contains(&format!("`{seg}`")), "example name {seg}");
    assert!(dirs.contains(&format!("`{idx}`")), "example name {idx}");
    let width = seg.len() - ".seg".len();
    assert!(
        dirs.contains(&format!("`{}.seg`", "N".repeat(width))),
        "the name pattern has {width} digits"
    );
    assert!(dirs.contains(&format!("exactly {width} digits")));
    assert_eq!(SegmentSeq::parse_file_name(&seg), Some(SegmentSeq(42)));
}

#[test]
fn log_identity_file_matches_the_code() {
    use meta::*;
    check_layout(
        "Log identity file",
        META_LEN,
        &[
            ("magic", 0),
            ("format_version", META_VERSION),
            ("meta_len", META_LEN_FIELD),
            ("reserved", META_RESERVED_A),
            ("log_id", META_LOG_ID),
            ("created_time", META_CREATED_TIME),
            ("reserved", META_RESERVED_B),
            ("meta_crc", META_CRC),
        ],
    );
    let m = LogMeta {
        layout: tally_engine::format::record::Layout::V5,
        log_id: ramp(0x10),
        created_time: Timestamp(0x0102_0304_0506_0708),
    };
    check_encoding(
        "Log identity file",
        &m.encode(),
        &[
            ("format_version", le16(format::FORMAT_VERSION)),
            ("meta_len", le16(META_LEN as u16)),
            ("log_id", m.log_id.to_vec()),
            ("created_time", le64(m.created_time.0)),
        ],
    );
}

#[test]
fn segment_header_matches_the_code() {
    use segment::*;
    check_layout(
        "Segment header",
        SEGMENT_HEADER_LEN,
        &[
            ("magic", 0),
            ("format_version", SH_VERSION),
            ("header_len", SH_HEADER_LEN),
            ("reserved", SH_RESERVED_A),
            ("log_id", SH_LOG_ID),
            ("seq", SH_SEQ),
            ("base_position", SH_BASE_POSITION),
            ("created_time", SH_CREATED_TIME),
            ("capacity", SH_CAPACITY),
            ("prev_chain_hash", SH_PREV_CHAIN_HASH),
            ("reserved", SH_RESERVED_B),
            ("header_crc", SH_CRC),
        ],
    );
    let h = SegmentHeader {
        layout: tally_engine::format::record::Layout::V5,
        log_id: ramp(0x10),
        seq: SegmentSeq(0x1111),
        base_position: Position(0x2222_3333),
        created_time: Timestamp(0x4444_5555_6666),
        capacity: 1 << 20,
        prev_chain_hash: ramp(0x80),
    };
    let page = h.encode_page();
    assert_eq!(page.len() as u64, format::PAGE_BYTES);
    assert!(
        page[SEGMENT_HEADER_LEN..].iter().all(|&b| b == 0),
        "the rest of the header page is zero"
    );
    check_encoding(
        "Segment header",
        &page,
        &[
            ("format_version", le16(format::FORMAT_VERSION)),
            ("header_len", le16(SEGMENT_HEADER_LEN as u16)),
            ("log_id", h.log_id.to_vec()),
            ("seq", le64(h.seq.0)),
            ("base_position", le64(h.base_position.0)),
            ("created_time", le64(h.created_time.0)),
            ("capacity", le64(h.capacity)),
            ("prev_chain_hash", h.prev_chain_hash.to_vec()),
        ],
    );
}

#[test]
fn segment_footer_matches_the_code() {
    use segment::*;
    check_layout(
        "Segment footer",
        SEGMENT_FOOTER_LEN,
        &[
            ("magic", 0),
            ("format_version", SF_VERSION),
            ("footer_len", SF_FOOTER_LEN),
            ("reserved", SF_RESERVED_A),
            ("log_id", SF_LOG_ID),
            ("seq", SF_SEQ),
            ("record_count", SF_RECORD_COUNT),
            ("first_position", SF_FIRST_POSITION),
            ("last_position", SF_LAST_POSITION),
            ("data_end", SF_DATA_END),
            ("first_record_time", SF_FIRST_TIME),
            ("last_record_time", SF_LAST_TIME),
            ("last_chain_hash", SF_LAST_CHAIN_HASH),
            ("merkle_root", SF_MERKLE_ROOT),
            ("reserved", SF_RESERVED_B),
            ("footer_crc", SF_CRC),
        ],
    );
    let f = SegmentFooter {
        layout: tally_engine::format::record::Layout::V5,
        log_id: ramp(0x10),
        seq: SegmentSeq(0x1111),
        record_count: 0x30,
        first_position: Position(0x2222_3333),
        last_position: Position(0x2222_3333 + 0x2f),
        data_end: 0x5_6000,
        first_record_time: Timestamp(0x7777_8888),
        last_record_time: Timestamp(0x9999_aaaa),
        last_chain_hash: ramp(0x40),
        merkle_root: ramp(0xc0),
    };
    let page = f.encode_page();
    assert!(
        page[SEGMENT_FOOTER_LEN..].iter().all(|&b| b == 0),
        "the rest of the footer page is zero"
    );
    check_encoding(
        "Segment footer",
        &page,
        &[
            ("format_version", le16(format::FORMAT_VERSION)),
            ("footer_len", le16(SEGMENT_FOOTER_LEN as u16)),
            ("log_id", f.log_id.to_vec()),
            ("seq", le64(f.seq.0)),
            ("record_count", le64(f.record_count)),
            ("first_position", le64(f.first_position.0)),
            ("last_position", le64(f.last_position.0)),
            ("data_end", le64(f.data_end)),
            ("first_record_time", le64(f.first_record_time.0)),
            ("last_record_time", le64(f.last_record_time.0)),
            ("last_chain_hash", f.last_chain_hash.to_vec()),
            ("merkle_root", f.merkle_root.to_vec()),
        ],
    );
}

#[test]
fn record_header_version_2_matches_the_code() {
    use record::*;
    check_layout(
        "Record header version 2",
        RECORD_HEADER_V2_LEN,
        &[
            ("header_crc", HEADER_CRC_OFFSET),
            ("body_len", BODY_LEN_OFFSET),
            ("body_crc", BODY_CRC_OFFSET),
            ("durable_lag", DURABLE_LAG_OFFSET),
            ("stream_prev", V2_STREAM_PREV_OFFSET),
            ("stream_version", STREAM_VERSION_OFFSET),
            ("record_time", RECORD_TIME_OFFSET),
            ("flags", FLAGS_OFFSET),
            ("kind", KIND_OFFSET),
            ("reserved", V2_RESERVED_OFFSET),
            ("position", V2_POSITION_OFFSET),
            ("chain_hash", V2_CHAIN_HASH_OFFSET),
        ],
    );
    let h = RecordHeader {
        layout: Layout::V2,
        stream_prev: 0x0a0b_0000,
        body_len: 0x0301,
        body_crc: 0xdead_beef,
        durable_lag: 0x0102,
        position: Position(0x0a0b_0c0d),
        stream_version: 0x0e0f,
        record_time: Timestamp(0x1700_0000_1234_5678),
        flags: flags::BATCH_START | flags::BATCH_END,
        kind: RecordKind::Event,
        chain_hash: ramp(0x60),
        body_form: record::BodyForm::Envelope,
    };
    let mut b = [0u8; RECORD_HEADER_MAX];
    assert_eq!(h.encode_into(&mut b), RECORD_HEADER_V2_LEN);
    check_encoding(
        "Record header version 2",
        &b[..RECORD_HEADER_V2_LEN],
        &[
            ("body_len", le32(h.body_len)),
            ("body_crc", le32(h.body_crc)),
            ("durable_lag", le32(h.durable_lag)),
            ("stream_prev", le64(h.stream_prev)),
            ("stream_version", le64(h.stream_version)),
            ("record_time", le64(h.record_time.0)),
            ("flags", le16(h.flags)),
            ("kind", le16(RecordKind::Event as u16)),
            ("position", le64(h.position.0)),
            ("chain_hash", h.chain_hash.to_vec()),
        ],
    );
    assert_eq!(RecordHeader::decode_in(&b, Layout::V2), Ok(h));
}

#[test]
fn record_header_v4_and_the_pruned_body_match_the_code() {
    use record::*;
    check_layout(
        "Record header version 4",
        RECORD_HEADER_V2_LEN,
        &[
            ("header_crc", HEADER_CRC_OFFSET),
            ("body_len", BODY_LEN_OFFSET),
            ("body_crc", BODY_CRC_OFFSET),
            ("durable_lag", DURABLE_LAG_OFFSET),
            ("stream_prev", V2_STREAM_PREV_OFFSET),
            ("stream_version", STREAM_VERSION_OFFSET),
            ("record_time", RECORD_TIME_OFFSET),
            ("flags", FLAGS_OFFSET),
            ("kind", KIND_OFFSET),
            ("body_form", BODY_FORM_OFFSET),
            ("reserved", BODY_FORM_OFFSET + 1),
            ("position", V2_POSITION_OFFSET),
            ("chain_hash", V2_CHAIN_HASH_OFFSET),
        ],
    );
    let h = RecordHeader {
        layout: Layout::V4,
        stream_prev: 0x0a0b_0000,
        body_len: 0x0301,
        body_crc: 0xdead_beef,
        durable_lag: 0x0102,
        position: Position(0x0a0b_0c0d),
        stream_version: 0x0e0f,
        record_time: Timestamp(0x1700_0000_1234_5678),
        flags: flags::BATCH_START | flags::BATCH_END,
        kind: RecordKind::Event,
        chain_hash: ramp(0x60),
        body_form: record::BodyForm::Pruned,
    };
    let mut b = [0u8; RECORD_HEADER_MAX];
    h.encode_into(&mut b);
    check_encoding(
        "Record header version 4",
        &b[..RECORD_HEADER_V2_LEN],
        &[
            ("body_len", le32(h.body_len)),
            ("body_crc", le32(h.body_crc)),
            ("durable_lag", le32(h.durable_lag)),
            ("stream_prev", le64(h.stream_prev)),
            ("stream_version", le64(h.stream_version)),
            ("record_time", le64(h.record_time.0)),
            ("flags", le16(h.flags)),
            ("kind", le16(RecordKind::Event as u16)),
            ("body_form", vec![1]),
            ("position", le64(h.position.0)),
            ("chain_hash", h.chain_hash.to_vec()),
        ],
    );
    assert_eq!(RecordHeader::decode_in(&b, Layout::V4), Ok(h));
    use tally_engine::format::pruned::*;
    check_layout(
        "Pruned body",
        PRUNED_FIXED_LEN,
        &[
            ("body_hash", PR_BODY_HASH),
            ("removed_by", PR_REMOVED_BY),
            ("stream_len", PR_STREAM_LEN),
            ("reserved", PR_RESERVED),
        ],
    );
    let body = encode(&ramp(0x10), Position(0x0102_0304), "trade-42", 120).unwrap();
    check_encoding(
        "Pruned body",
        &body,
        &[
            ("body_hash", ramp::<32>(0x10).to_vec()),
            ("removed_by", le64(0x0102_0304)),
            ("stream_len", le16(8)),
        ],
    );
    assert_eq!(&body[PRUNED_FIXED_LEN..PRUNED_FIXED_LEN + 8], b"trade-42");
    assert!(body[PRUNED_FIXED_LEN + 8..].iter().all(|&x| x == 0));
    assert!(section("Pruned body").contains("`format::pruned::PRUNED_FIXED_LEN`"));
}

/// FORMAT.md 6.6: the sealed payload's fixed part, by its table, from the code's encoder.
#[test]
fn sealed_payload_matches_the_code() {
    use tally_engine::format::sealed::*;
    check_layout(
        "Sealed payload",
        SEALED_FIXED_LEN,
        &[
            ("seal_version", SL_VERSION),
            ("scope", SL_SCOPE),
            ("reserved", SL_RESERVED),
            ("key_generation", SL_GENERATION),
            ("subject", SL_SUBJECT),
            ("nonce", SL_NONCE),
            ("clear_len", SL_CLEAR_LEN),
            ("names_len", SL_NAMES_LEN),
        ],
    );
    let subject = subject_hash("client-42");
    // The subject's id hash is BLAKE3's key derivation with the context the document names.
    assert_eq!(
        subject.0,
        blake3::derive_key("tally 2026-12 data subject id", b"client-42")
    );
    assert!(section("Sealed payload").contains("`tally 2026-12 data subject id`"));
    let (head, aad) = head(
        SealScope::Fields,
        0x0102_0304,
        &subject,
        &ramp::<24>(0x40),
        br#"{"book":"B"}"#,
        br#"["client"]"#,
        tally_engine::EventId(ramp::<16>(0x70)),
    )
    .unwrap();
    check_encoding(
        "Sealed payload",
        &head,
        &[
            ("seal_version", vec![1]),
            ("scope", vec![1]),
            ("key_generation", le32(0x0102_0304)),
            ("subject", subject.0.to_vec()),
            ("nonce", ramp::<24>(0x40).to_vec()),
            ("clear_len", le32(12)),
            ("names_len", le32(10)),
        ],
    );
    assert_eq!(&head[72..84], br#"{"book":"B"}"#);
    assert_eq!(&head[84..94], br#"["client"]"#);
    // The associated data: the prefix and a zero byte, the event id, every byte before the
    // ciphertext.
    let mut want = b"tally sealed v1\0".to_vec();
    want.extend_from_slice(&ramp::<16>(0x70));
    want.extend_from_slice(&head);
    assert_eq!(aad, want);
    assert!(section("Sealed payload").contains("`tally sealed v1`"));
}

/// FORMAT.md 22: the key store's header and slot, by their tables, from a store the code
/// wrote.
#[test]
fn key_store_matches_the_code() {
    use tally_engine::keys::*;
    check_layout(
        "Key store header",
        SLOT_LEN,
        &[
            ("magic", KH_MAGIC),
            ("version", KH_VERSION),
            ("reserved", KH_RESERVED),
            ("slot_len", KH_SLOT_LEN),
            ("nonce", KH_NONCE),
            ("token_key", KH_TOKEN_KEY),
            ("reserved", KH_RESERVED_B),
            ("crc", K_CRC),
        ],
    );
    check_layout(
        "Key store slot",
        SLOT_LEN,
        &[
            ("state", KS_STATE),
            ("reserved", KS_RESERVED),
            ("generation", KS_GENERATION),
            ("subject", KS_SUBJECT),
            ("nonce", KS_NONCE),
            ("wrapped_key", KS_WRAPPED_KEY),
            ("reserved", KS_RESERVED_B),
            ("crc", K_CRC),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let subject = tally_engine::format::sealed::subject_hash("client-42");
    {
        let store = FileKeyStore::open(
            dir.path(),
            &SecretKey::from_hex(&"11".repeat(32)).unwrap(),
            true,
        )
        .unwrap();
        store.keys_for_append(&[subject]).unwrap();
    }
    let bytes = std::fs::read(dir.path().join(KEY_FILE)).unwrap();
    assert_eq!(bytes.len(), 2 * SLOT_LEN);
    let (header, slot) = bytes.split_at(SLOT_LEN);
    check_encoding(
        "Key store header",
        header,
        &[
            ("version", le16(1)),
            ("slot_len", le32(128)),
            ("nonce", header[KH_NONCE..KH_TOKEN_KEY].to_vec()),
            ("token_key", header[KH_TOKEN_KEY..KH_RESERVED_B].to_vec()),
        ],
    );
    check_encoding(
        "Key store slot",
        slot,
        &[
            ("state", vec![1]),
            ("generation", le32(1)),
            ("subject", subject.0.to_vec()),
            ("nonce", slot[KS_NONCE..KS_WRAPPED_KEY].to_vec()),
            ("wrapped_key", slot[KS_WRAPPED_KEY..KS_RESERVED_B].to_vec()),
        ],
    );
}

#[test]
fn record_header_matches_the_code() {
    use record::*;
    check_layout(
        "Record header",
        RECORD_HEADER_LEN,
        &[
            ("header_crc", HEADER_CRC_OFFSET),
            ("body_len", BODY_LEN_OFFSET),
            ("body_crc", BODY_CRC_OFFSET),
            ("durable_lag", DURABLE_LAG_OFFSET),
            ("position", POSITION_OFFSET),
            ("stream_version", STREAM_VERSION_OFFSET),
            ("record_time", RECORD_TIME_OFFSET),
            ("flags", FLAGS_OFFSET),
            ("kind", KIND_OFFSET),
            ("reserved", RESERVED_OFFSET),
            ("chain_hash", CHAIN_HASH_OFFSET),
        ],
    );
    let h = RecordHeader {
        layout: tally_engine::format::record::Layout::V1,
        stream_prev: tally_engine::format::record::NO_STREAM_PREV,
        body_len: 0x0301,
        body_crc: 0xdead_beef,
        durable_lag: 0x0102,
        position: Position(0x0a0b_0c0d),
        stream_version: 0x0e0f,
        record_time: Timestamp(0x1700_0000_1234_5678),
        flags: flags::BATCH_START | flags::BATCH_END,
        kind: RecordKind::Event,
        chain_hash: ramp(0x60),
        body_form: record::BodyForm::Envelope,
    };
    let mut b = [0u8; RECORD_HEADER_LEN];
    h.encode_into(&mut b);
    check_encoding(
        "Record header",
        &b,
        &[
            ("body_len", le32(h.body_len)),
            ("body_crc", le32(h.body_crc)),
            ("durable_lag", le32(h.durable_lag)),
            ("position", le64(h.position.0)),
            ("stream_version", le64(h.stream_version)),
            ("record_time", le64(h.record_time.0)),
            ("flags", le16(h.flags)),
            ("kind", le16(RecordKind::Event as u16)),
            ("chain_hash", h.chain_hash.to_vec()),
        ],
    );
    // The chain link range named in the text.
    let text = section("Record header");
    assert!(
        text.contains(&format!("Bytes `{LINK_FROM}..{LINK_TO}`")),
        "the link range is bytes {LINK_FROM}..{LINK_TO}"
    );
    assert_eq!(h.link_prefix()[..], b[LINK_FROM..LINK_TO]);
    assert_eq!(record_len(h.body_len), (80 + 0x0301u64).next_multiple_of(8));
}

#[test]
fn record_flags_match_the_code() {
    let code = [
        ("BATCH_START", flags::BATCH_START),
        ("BATCH_END", flags::BATCH_END),
        ("TOMBSTONE", flags::TOMBSTONE),
        ("REDACTED", flags::REDACTED),
        ("ENCRYPTED", flags::ENCRYPTED),
        ("PRODUCER_SIGNED", flags::PRODUCER_SIGNED),
    ];
    let t = table("Record flags");
    let (bit, value, name) = (column(&t, "Bit"), column(&t, "Value"), column(&t, "Name"));
    assert_eq!(t.rows.len(), code.len(), "rows of the flags table");
    let mut errors = Vec::new();
    for row in &t.rows {
        let (b, v) = (number(&t, &row[bit]), number(&t, &row[value]));
        if v != 1 << b {
            errors.push(format!("{}: value {v} is not bit {b}", row[name]));
        }
        match code.iter().find(|(n, _)| *n == row[name]) {
            Some((_, c)) if u64::from(*c) == v => {}
            Some((n, c)) => errors.push(format!("{n}: document {v}, code {c}")),
            None => errors.push(format!("unknown flag {:?}", row[name])),
        }
    }
    let text = section("Record flags");
    if !text.contains(&format!("(`flags::KNOWN_V1` = {})", flags::KNOWN_V1)) {
        errors.push(format!("KNOWN_V1 is {}", flags::KNOWN_V1));
    }
    if !text.contains(&format!("(`flags::KNOWN_V2` = {})", flags::KNOWN_V2)) {
        errors.push(format!("KNOWN_V2 is {}", flags::KNOWN_V2));
    }
    fail_on(errors);
}

#[test]
fn record_kinds_match_the_code() {
    let t = table("Record kinds");
    let (value, name) = (column(&t, "Value"), column(&t, "Name"));
    assert_eq!(t.rows.len(), 1, "version 1 has one record kind");
    assert_eq!(t.rows[0][name], "Event");
    assert_eq!(
        number(&t, &t.rows[0][value]),
        u64::from(RecordKind::Event as u16)
    );
}

#[test]
fn envelope_fixed_part_matches_the_code() {
    use envelope::*;
    check_layout(
        "Envelope fixed part",
        ENVELOPE_FIXED_LEN,
        &[
            ("event_id", EVENT_ID_OFFSET),
            ("event_time", EVENT_TIME_OFFSET),
            ("schema_version", SCHEMA_VERSION_OFFSET),
            ("content_type", CONTENT_TYPE_OFFSET),
            ("payload_form", PAYLOAD_FORM_OFFSET),
            ("stream_len", STREAM_LEN_OFFSET),
            ("aggregate_type_len", AGGREGATE_TYPE_LEN_OFFSET),
            ("event_type_len", EVENT_TYPE_LEN_OFFSET),
            ("correlation_id_len", CORRELATION_ID_LEN_OFFSET),
            ("causation_id_len", CAUSATION_ID_LEN_OFFSET),
            ("actor_len", ACTOR_LEN_OFFSET),
            ("reserved", RESERVED_B_OFFSET),
            ("payload_len", PAYLOAD_LEN_OFFSET),
        ],
    );
    let (e, bytes) = sample_envelope();
    check_encoding(
        "Envelope fixed part",
        &bytes,
        &[
            ("event_id", e.event_id.0.to_vec()),
            ("event_time", le64(e.event_time.0)),
            ("schema_version", le32(e.schema_version)),
            ("content_type", vec![ContentType::Json as u8]),
            ("payload_form", vec![0]),
            ("stream_len", le16(e.stream.len() as u16)),
            ("aggregate_type_len", le16(e.aggregate_type.len() as u16)),
            ("event_type_len", le16(e.event_type.len() as u16)),
            ("correlation_id_len", le16(e.correlation_id.len() as u16)),
            ("causation_id_len", le16(e.causation_id.len() as u16)),
            ("actor_len", le16(e.actor.len() as u16)),
            ("payload_len", le32(e.payload.len() as u32)),
        ],
    );
}

#[test]
fn blob_reference_matches_the_code() {
    use tally_engine::format::blob::{
        BLOB_BYTES_MAX, BLOB_REF_LEN, BLOB_THRESHOLD_DEFAULT, BlobRef,
    };
    use tally_engine::format::files::blob_object_key;
    check_layout(
        "Blob references",
        BLOB_REF_LEN,
        &[("hash", 0), ("size", 32)],
    );
    let blob = BlobRef {
        hash: ramp(0x40),
        size: 0x0102_0304,
    };
    check_encoding(
        "Blob references",
        &blob.encode(),
        &[
            ("hash", ramp::<32>(0x40).to_vec()),
            ("size", le64(0x0102_0304)),
        ],
    );
    let text = section("Blob references");
    let mut errors = Vec::new();
    for (name, value) in [
        ("BLOB_BYTES_MAX", BLOB_BYTES_MAX),
        ("BLOB_THRESHOLD_DEFAULT", BLOB_THRESHOLD_DEFAULT as u64),
    ] {
        if !text.contains(&format!("`{name}` = {value}"))
            && !text.contains(&format!("`{name}` ({value}"))
        {
            errors.push(format!("6.5 does not give {name} as {value}"));
        }
    }
    let key = blob_object_key(&[0xab; 16], &blob.hash);
    if key
        != format!(
            "{}/blobs/{}",
            "ab".repeat(16),
            tally_engine::format::proof::hex(&ramp::<32>(0x40))
        )
    {
        errors.push(format!(
            "blob key {key} is not <log id hex>/blobs/<hash hex>"
        ));
    }
    // The blob's hash is BLAKE3 of its bytes, as 6.5 says.
    let of = BlobRef::of(b"confirmation").unwrap();
    if of.hash != *blake3::hash(b"confirmation").as_bytes() || of.size != 12 {
        errors.push("BlobRef::of is not BLAKE3 and length".into());
    }
    fail_on(errors);
}

/// An envelope whose variable fields all differ in length and content.
fn sample_envelope() -> (EnvelopeRef<'static>, Vec<u8>) {
    let e = EnvelopeRef {
        event_id: EventId(ramp(0x20)),
        event_time: Timestamp(0x1600_0000_0000_0001),
        schema_version: 0x0003_0201,
        content_type: ContentType::Json,
        stream: "trade-42",
        aggregate_type: "Trade",
        event_type: "TradeAmended",
        correlation_id: "corr-1",
        causation_id: "cause-19",
        actor: "alice@desk",
        payload: br#"{"qty":"150"}"#,
        payload_form: tally_engine::format::envelope::PayloadForm::Inline,
    };
    let mut out = Vec::new();
    e.encode_into(&mut out)
        .expect("the sample is within the limits");
    (e, out)
}

#[test]
fn envelope_variable_fields_are_in_the_documented_order() {
    let (e, bytes) = sample_envelope();
    let values: HashMap<&str, &[u8]> = HashMap::from([
        ("stream", e.stream.as_bytes()),
        ("aggregate_type", e.aggregate_type.as_bytes()),
        ("event_type", e.event_type.as_bytes()),
        ("correlation_id", e.correlation_id.as_bytes()),
        ("causation_id", e.causation_id.as_bytes()),
        ("actor", e.actor.as_bytes()),
        ("payload", e.payload),
    ]);
    let t = table("Envelope variable fields");
    let (order, field, length) = (
        column(&t, "Order"),
        column(&t, "Field"),
        column(&t, "Length"),
    );
    assert_eq!(
        t.rows.len(),
        values.len(),
        "rows of the variable-field table"
    );
    let fixed = table("Envelope fixed part");
    let mut at = envelope::ENVELOPE_FIXED_LEN;
    for (i, row) in t.rows.iter().enumerate() {
        assert_eq!(number(&t, &row[order]), i as u64 + 1, "order column");
        let name = row[field].as_str();
        let v = values
            .get(name)
            .unwrap_or_else(|| panic!("unknown variable field {name:?}"));
        assert_eq!(
            &bytes[at..at + v.len()],
            *v,
            "field {name} is not where the document's order puts it"
        );
        assert_eq!(
            row[length],
            format!("{name}_len"),
            "length column of {name}"
        );
        assert!(
            fixed.rows.iter().any(|r| r[2] == row[length]),
            "{} is in the fixed part",
            row[length]
        );
        at += v.len();
    }
    assert_eq!(at, bytes.len(), "the fields fill the envelope exactly");
    assert_eq!(EnvelopeRef::decode(&bytes), Ok(e));
}

#[test]
fn envelope_limits_match_the_code() {
    use envelope::*;
    let code: Vec<(&str, &str, u64)> = vec![
        ("stream", "STREAM_BYTES_MAX", STREAM_BYTES_MAX as u64),
        (
            "aggregate_type",
            "AGGREGATE_TYPE_BYTES_MAX",
            AGGREGATE_TYPE_BYTES_MAX as u64,
        ),
        (
            "event_type",
            "EVENT_TYPE_BYTES_MAX",
            EVENT_TYPE_BYTES_MAX as u64,
        ),
        (
            "correlation_id",
            "CORRELATION_ID_BYTES_MAX",
            CORRELATION_ID_BYTES_MAX as u64,
        ),
        (
            "causation_id",
            "CAUSATION_ID_BYTES_MAX",
            CAUSATION_ID_BYTES_MAX as u64,
        ),
        ("actor", "ACTOR_BYTES_MAX", ACTOR_BYTES_MAX as u64),
        ("payload", "PAYLOAD_BYTES_MAX", PAYLOAD_BYTES_MAX as u64),
        (
            "whole envelope",
            "BODY_BYTES_MAX",
            u64::from(envelope::BODY_BYTES_MAX),
        ),
    ];
    assert_eq!(envelope::BODY_BYTES_MAX, record::BODY_BYTES_MAX);
    let t = table("Envelope limits");
    let (field, max, constant) = (
        column(&t, "Field"),
        column(&t, "Max bytes"),
        column(&t, "Constant"),
    );
    assert_eq!(t.rows.len(), code.len(), "rows of the limits table");
    let mut errors = Vec::new();
    for (row, (f, c, v)) in t.rows.iter().zip(&code) {
        let doc = (
            row[field].as_str(),
            row[constant].as_str(),
            number(&t, &row[max]),
        );
        if doc != (*f, *c, *v) {
            errors.push(format!("document {doc:?}, code {:?}", (f, c, v)));
        }
    }
    fail_on(errors);
}

#[test]
fn content_types_match_the_code() {
    let t = table("Content types");
    let (value, name) = (column(&t, "Value"), column(&t, "Name"));
    let code = [
        ("Binary", ContentType::Binary as u8),
        ("Json", ContentType::Json as u8),
    ];
    assert_eq!(t.rows.len(), code.len(), "rows of the content-type table");
    for (row, (n, v)) in t.rows.iter().zip(code) {
        assert_eq!(
            (row[name].as_str(), number(&t, &row[value])),
            (n, u64::from(v))
        );
    }
}

#[test]
fn hash_chain_definition_matches_the_code() {
    let text = section("Hash chain");
    assert!(
        text.contains(&format!("context = \"{CHAIN_SEED_CONTEXT}\"")),
        "the definition names the seed context {CHAIN_SEED_CONTEXT:?}"
    );
    assert!(
        text.contains(&format!(
            "exactly `{CHAIN_SEED_CONTEXT}` (ASCII, {} bytes",
            CHAIN_SEED_CONTEXT.len()
        )),
        "the context string and its length in the text"
    );
    assert!(CHAIN_SEED_CONTEXT.is_ascii());
    let link = format!(
        "link(r)       = header(r)[{}..{}] || BLAKE3(body(r))",
        record::LINK_FROM,
        record::LINK_TO
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&link))
        .unwrap_or_else(|| panic!("the definition has the line {link:?}"));
    assert!(
        line.ends_with(&format!("-- 32 + 32 = {LINK_LEN} bytes")),
        "the link is {LINK_LEN} bytes: {line:?}"
    );
    assert_eq!(record::LINK_TO - record::LINK_FROM + 32, LINK_LEN);
}

/// An index of two streams and 40 records (two sparse samples), encoded complete.
fn sample_index() -> (Vec<u8>, Vec<(&'static str, u64)>, IndexFileInfo) {
    let names: [Arc<str>; 2] = [Arc::from("trade-1"), Arc::from("order-77")];
    let mut idx = ActiveIndex::new(SegmentSeq(0x0107), Position(0x1000));
    let mut versions = [5u64, 0];
    for i in 0..40u64 {
        let s = usize::from(i % 4 == 3);
        idx.push(
            StreamKey(s as u32),
            &names[s],
            index::stream_hash(&names[s]),
            (s == 0).then_some(SegmentSeq(0x0105)),
            versions[s],
            Position(0x1000 + i),
            4096 + i * 200,
            Timestamp(0x5000 + i),
            EventId([i as u8 + 1; 16]),
        );
        versions[s] += 1;
    }
    let info = IndexFileInfo {
        log_id: ramp(0x10),
        data_end: 4096 + 40 * 200,
        last_chain_hash: ramp(0x90),
    };
    let mut sorted: Vec<(&'static str, u64)> = vec![
        ("trade-1", index::stream_hash("trade-1")),
        ("order-77", index::stream_hash("order-77")),
    ];
    sorted.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
    (idx.encode(&info, true), sorted, info)
}

#[test]
fn index_header_matches_the_code() {
    use index::*;
    check_layout(
        "Index header",
        INDEX_HEADER_LEN,
        &[
            ("magic", 0),
            ("format_version", IH_VERSION),
            ("header_len", IH_HEADER_LEN),
            ("flags", IH_FLAGS),
            ("log_id", IH_LOG_ID),
            ("seq", IH_SEQ),
            ("base_position", IH_BASE_POSITION),
            ("record_count", IH_RECORD_COUNT),
            ("data_end", IH_DATA_END),
            ("last_chain_hash", IH_LAST_CHAIN_HASH),
            ("stream_count", IH_STREAM_COUNT),
            ("sparse_count", IH_SPARSE_COUNT),
            ("names_len", IH_NAMES_LEN),
            ("sparse_every", IH_SPARSE_EVERY),
            ("last_record_time", IH_LAST_RECORD_TIME),
            ("reserved", IH_RESERVED),
        ],
    );
    let (bytes, streams, info) = sample_index();
    let names_len: usize = streams.iter().map(|s| s.0.len()).sum();
    check_encoding(
        "Index header",
        &bytes,
        &[
            ("format_version", le16(format::STRUCTURE_VERSION)),
            ("header_len", le16(INDEX_HEADER_LEN as u16)),
            ("flags", le32(INDEX_FLAG_COMPLETE)),
            ("log_id", info.log_id.to_vec()),
            ("seq", le64(0x0107)),
            ("base_position", le64(0x1000)),
            ("record_count", le64(40)),
            ("data_end", le64(info.data_end)),
            ("last_chain_hash", info.last_chain_hash.to_vec()),
            ("stream_count", le32(2)),
            ("sparse_count", le32(2)),
            ("names_len", le32(names_len as u32)),
            ("sparse_every", le32(SPARSE_EVERY)),
            ("last_record_time", le64(0x5000 + 39)),
        ],
    );
    let t = table("Index header flags");
    assert_eq!(t.rows.len(), 1, "one index flag in version 1");
    let row = &t.rows[0];
    assert_eq!(row[column(&t, "Name")], "INDEX_FLAG_COMPLETE");
    assert_eq!(
        number(&t, &row[column(&t, "Value")]),
        u64::from(INDEX_FLAG_COMPLETE)
    );
    assert_eq!(
        1u64 << number(&t, &row[column(&t, "Bit")]),
        u64::from(INDEX_FLAG_COMPLETE)
    );
}

#[test]
fn index_entries_match_the_code() {
    use index::*;
    check_layout(
        "Stream-table entry",
        STREAM_ENTRY_LEN,
        &[
            ("hash", SE_HASH),
            ("first_version", SE_FIRST_VERSION),
            ("last_version", SE_LAST_VERSION),
            ("first_position", SE_FIRST_POSITION),
            ("last_position", SE_LAST_POSITION),
            ("first_record_time", SE_FIRST_RECORD_TIME),
            ("prev_segment", SE_PREV_SEGMENT),
            ("entries_start", SE_ENTRIES_START),
            ("entries_count", SE_ENTRIES_COUNT),
            ("name_offset", SE_NAME_OFFSET),
            ("name_len", SE_NAME_LEN),
            ("reserved", SE_RESERVED),
        ],
    );
    // Event and sparse entries have no offset constants in the code: their layout is
    // checked against the encoder below.
    check_layout(
        "Event entry",
        EVENT_ENTRY_LEN,
        &[("version", 0), ("pos_delta", 8), ("offset", 12)],
    );
    check_layout(
        "Sparse entry",
        SPARSE_ENTRY_LEN,
        &[("pos_delta", 0), ("offset", 4)],
    );

    // Walk the encoded sections in the order of the "Index file layout" table.
    let (bytes, streams, _) = sample_index();
    let layout = table("Index file layout");
    let sections: Vec<&str> = layout.rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        sections,
        [
            "header",
            "stream table",
            "event entries",
            "sparse entries",
            "event ids",
            "names blob",
            "trailer"
        ]
    );
    let streams_at = INDEX_HEADER_LEN;
    let entries_at = streams_at + 2 * STREAM_ENTRY_LEN;
    let sparse_at = entries_at + 40 * EVENT_ENTRY_LEN;
    let ids_at = sparse_at + 2 * SPARSE_ENTRY_LEN;
    let names_at = ids_at + 40 * EVENT_ID_LEN;
    let trailer_at = bytes.len() - INDEX_TRAILER_LEN;
    assert_eq!(
        names_at + streams.iter().map(|s| s.0.len()).sum::<usize>(),
        trailer_at
    );

    // "trade-1" has records i % 4 != 3 (30 of them, versions 5..=34); "order-77" the other
    // 10 (versions 0..=9). The stream table is sorted by (hash, name).
    let mut entries_start = 0u32;
    let mut name_offset = 0u32;
    for (k, &(name, hash)) in streams.iter().enumerate() {
        let trade = name == "trade-1";
        let deltas: Vec<u64> = (0..40).filter(|i| (i % 4 != 3) == trade).collect();
        let first_version = if trade { 5 } else { 0 };
        let count = deltas.len() as u64;
        let entry = &bytes[streams_at + k * STREAM_ENTRY_LEN..][..STREAM_ENTRY_LEN];
        check_encoding(
            "Stream-table entry",
            entry,
            &[
                ("hash", le64(hash)),
                ("first_version", le64(first_version)),
                ("last_version", le64(first_version + count - 1)),
                ("first_position", le64(0x1000 + deltas[0])),
                ("last_position", le64(0x1000 + deltas[deltas.len() - 1])),
                ("first_record_time", le64(0x5000 + deltas[0])),
                ("prev_segment", le64(if trade { 0x0105 } else { u64::MAX })),
                ("entries_start", le32(entries_start)),
                ("entries_count", le32(count as u32)),
                ("name_offset", le32(name_offset)),
                ("name_len", le16(name.len() as u16)),
            ],
        );
        for (j, &d) in deltas.iter().enumerate() {
            let at = entries_at + (entries_start as usize + j) * EVENT_ENTRY_LEN;
            check_encoding(
                "Event entry",
                &bytes[at..at + EVENT_ENTRY_LEN],
                &[
                    ("version", le64(first_version + j as u64)),
                    ("pos_delta", le32(d as u32)),
                    ("offset", le32(4096 + d as u32 * 200)),
                ],
            );
        }
        let n = names_at + name_offset as usize;
        assert_eq!(&bytes[n..n + name.len()], name.as_bytes(), "names blob");
        entries_start += count as u32;
        name_offset += name.len() as u32;
    }
    for (j, d) in [0u32, SPARSE_EVERY].into_iter().enumerate() {
        let at = sparse_at + j * SPARSE_ENTRY_LEN;
        check_encoding(
            "Sparse entry",
            &bytes[at..at + SPARSE_ENTRY_LEN],
            &[("pos_delta", le32(d)), ("offset", le32(4096 + d * 200))],
        );
    }
    for i in 0..40 {
        let at = ids_at + i * EVENT_ID_LEN;
        assert_eq!(
            &bytes[at..at + EVENT_ID_LEN],
            &[i as u8 + 1; 16],
            "event id {i}"
        );
    }
    assert_eq!(
        bytes[trailer_at..],
        crc32(&bytes[..trailer_at]).to_le_bytes(),
        "the trailer is the CRC-32 of everything before it"
    );
    let sealed = SealedIndex::open(Arc::new(bytes)).expect("the sample decodes");
    assert_eq!(sealed.record_count(), 40);
}

#[test]
fn stream_snapshot_tables_match_the_code() {
    // Not reachable as constants (private module `log::streams`): read from its source.
    let c = streams_const;
    check_layout(
        "Snapshot header",
        c("SNAPSHOT_HEADER_LEN") as usize,
        &[
            ("magic", 0),
            ("format_version", c("SN_VERSION") as usize),
            ("header_len", c("SN_HEADER_LEN") as usize),
            ("reserved", c("SN_RESERVED_A") as usize),
            ("log_id", c("SN_LOG_ID") as usize),
            ("covered_seq", c("SN_COVERED_SEQ") as usize),
            ("covered_data_end", c("SN_COVERED_DATA_END") as usize),
            ("next_position", c("SN_NEXT_POSITION") as usize),
            ("stream_count", c("SN_STREAM_COUNT") as usize),
        ],
    );
    check_layout(
        "Snapshot entry",
        c("SNAPSHOT_ENTRY_LEN") as usize,
        &[
            ("first_position", c("SNE_FIRST_POSITION") as usize),
            ("created_time", c("SNE_CREATED") as usize),
            ("last_version", c("SNE_LAST_VERSION") as usize),
            ("last_position", c("SNE_LAST_POSITION") as usize),
            ("last_segment", c("SNE_LAST_SEGMENT") as usize),
            ("name_len", c("SNE_NAME_LEN") as usize),
            ("reserved", c("SNE_RESERVED") as usize),
        ],
    );
    let magic = streams_magic();
    let t = table("Snapshot header");
    assert_eq!(
        t.rows[0][3],
        format!("ASCII `{}`", String::from_utf8_lossy(&magic)),
        "snapshot magic"
    );
    let when = section("When the snapshot is written");
    assert_eq!(
        tally_engine::format::files::SNAPSHOT_FILE,
        "streams.snap",
        "the snapshot file name"
    );
    assert!(when.contains("at least 1024"));
}

#[test]
fn merkle_node_file_and_checkpoint_tables_match_the_code() {
    use tally_engine::format::checkpoint::{self as cp, SignedCheckpoint, Statement};
    use tally_engine::format::tree as t;
    check_layout(
        "Node file header",
        t::TREE_HEADER_LEN,
        &[
            ("magic", 0),
            ("format_version", t::TH_VERSION),
            ("chunk_level", t::TH_CHUNK_LEVEL),
            ("reserved", t::TH_RESERVED_A),
            ("log_id", t::TH_LOG_ID),
            ("reserved", t::TH_RESERVED_B),
            ("header_crc", t::TH_CRC),
        ],
    );
    check_encoding(
        "Node file header",
        &t::encode_header(&[0x5A; 16]),
        &[
            ("format_version", 1u16.to_le_bytes().to_vec()),
            ("chunk_level", 4u16.to_le_bytes().to_vec()),
            ("log_id", vec![0x5A; 16]),
        ],
    );
    check_layout(
        "Checkpoint statement",
        cp::STATEMENT_LEN,
        &[
            ("magic", 0),
            ("version", cp::ST_VERSION),
            ("reserved", cp::ST_RESERVED),
            ("log_id", cp::ST_LOG_ID),
            ("checkpoint_id", cp::ST_ID),
            ("tree_size", cp::ST_TREE_SIZE),
            ("time", cp::ST_TIME),
            ("root", cp::ST_ROOT),
            ("chain_head", cp::ST_CHAIN_HEAD),
        ],
    );
    let statement = Statement {
        log_id: [1; 16],
        id: 9,
        tree_size: 1234,
        time: tally_engine::Timestamp(777),
        root: [2; 32],
        chain_head: [3; 32],
        streams: None,
    };
    let bytes = statement.encode();
    check_encoding(
        "Checkpoint statement",
        &bytes,
        &[
            ("version", 1u16.to_le_bytes().to_vec()),
            ("log_id", vec![1; 16]),
            ("checkpoint_id", 9u64.to_le_bytes().to_vec()),
            ("tree_size", 1234u64.to_le_bytes().to_vec()),
            ("time", 777u64.to_le_bytes().to_vec()),
            ("root", vec![2; 32]),
            ("chain_head", vec![3; 32]),
        ],
    );
    check_layout(
        "Checkpoint entry",
        cp::ENTRY_LEN,
        &[
            ("statement", 0),
            ("public_key", cp::ENTRY_PUBKEY),
            ("signature", cp::ENTRY_SIGNATURE),
            ("entry_crc", cp::ENTRY_CRC),
            ("reserved", cp::ENTRY_RESERVED),
        ],
    );
    let signed = SignedCheckpoint {
        statement,
        public_key: [4; 32],
        signature: [5; 64],
    };
    check_encoding(
        "Checkpoint entry",
        &signed.encode_entry(),
        &[
            ("statement", bytes.to_vec()),
            ("public_key", vec![4; 32]),
            ("signature", vec![5; 64]),
        ],
    );
    check_layout(
        "Checkpoint statement version 2",
        cp::STATEMENT_V2_LEN,
        &[
            ("magic", 0),
            ("version", cp::ST_VERSION),
            ("reserved", cp::ST_RESERVED),
            ("log_id", cp::ST_LOG_ID),
            ("checkpoint_id", cp::ST_ID),
            ("tree_size", cp::ST_TREE_SIZE),
            ("time", cp::ST_TIME),
            ("root", cp::ST_ROOT),
            ("chain_head", cp::ST_CHAIN_HEAD),
            ("stream_count", cp::ST_STREAM_COUNT),
            ("streams_root", cp::ST_STREAMS_ROOT),
        ],
    );
    let v2 = Statement {
        streams: Some((42, [6; 32])),
        ..statement
    };
    let v2_bytes = v2.encode();
    check_encoding(
        "Checkpoint statement version 2",
        &v2_bytes,
        &[
            ("version", 2u16.to_le_bytes().to_vec()),
            ("log_id", vec![1; 16]),
            ("checkpoint_id", 9u64.to_le_bytes().to_vec()),
            ("tree_size", 1234u64.to_le_bytes().to_vec()),
            ("time", 777u64.to_le_bytes().to_vec()),
            ("root", vec![2; 32]),
            ("chain_head", vec![3; 32]),
            ("stream_count", 42u64.to_le_bytes().to_vec()),
            ("streams_root", vec![6; 32]),
        ],
    );
    let signed_v2 = SignedCheckpoint {
        statement: v2,
        public_key: [4; 32],
        signature: [5; 64],
    };
    let entry_v2 = signed_v2.encode_entry();
    assert_eq!(entry_v2.len(), cp::ENTRY_V2_LEN);
    assert_eq!(&entry_v2[..cp::STATEMENT_V2_LEN], &v2_bytes[..]);
    assert_eq!(SignedCheckpoint::decode_entry(&entry_v2), Ok(signed_v2));
}

#[test]
fn cosignature_entry_matches_the_code() {
    use tally_engine::format::note::{self as n, Cosignature, CosignatureEntry};
    check_layout(
        "Cosignature entry",
        n::COSIGNATURE_ENTRY_LEN,
        &[
            ("magic", 0),
            ("version", n::CE_VERSION),
            ("name_len", n::CE_NAME_LEN),
            ("reserved", n::CE_RESERVED_A),
            ("checkpoint_id", n::CE_CHECKPOINT_ID),
            ("tree_size", n::CE_TREE_SIZE),
            ("root", n::CE_ROOT),
            ("public_key", n::CE_PUBLIC_KEY),
            ("timestamp", n::CE_TIMESTAMP),
            ("signature", n::CE_SIGNATURE),
            ("name", n::CE_NAME),
            ("reserved", n::CE_RESERVED_B),
            ("entry_crc", n::CE_CRC),
        ],
    );
    let e = CosignatureEntry {
        checkpoint_id: 9,
        tree_size: 1234,
        root: [2; 32],
        cosignature: Cosignature {
            name: "w.example/1".into(),
            public_key: [3; 32],
            timestamp: 1_700_000_000,
            signature: [4; 64],
        },
    };
    let mut name = b"w.example/1".to_vec();
    name.resize(64, 0);
    check_encoding(
        "Cosignature entry",
        &e.encode(),
        &[
            ("version", 1u16.to_le_bytes().to_vec()),
            ("name_len", 11u16.to_le_bytes().to_vec()),
            ("checkpoint_id", 9u64.to_le_bytes().to_vec()),
            ("tree_size", 1234u64.to_le_bytes().to_vec()),
            ("root", vec![2; 32]),
            ("public_key", vec![3; 32]),
            ("timestamp", 1_700_000_000u64.to_le_bytes().to_vec()),
            ("signature", vec![4; 64]),
            ("name", name),
        ],
    );
}

#[test]
fn producer_block_and_batch_statement_match_the_code() {
    use tally_engine::format::producer::{self as p, ProducerBlock, ProducerSignature};
    check_layout(
        "Producer block",
        p::PRODUCER_BLOCK_LEN,
        &[
            ("public_key", p::PB_PUBLIC_KEY),
            ("signature", p::PB_SIGNATURE),
            ("event_count", p::PB_EVENT_COUNT),
            ("reserved", p::PB_RESERVED),
        ],
    );
    let block = ProducerBlock {
        signature: ProducerSignature {
            public_key: ramp(0x10),
            signature: ramp(0x40),
        },
        event_count: 0x0102_0304,
    };
    check_encoding(
        "Producer block",
        &block.encode(),
        &[
            ("public_key", ramp::<32>(0x10).to_vec()),
            ("signature", ramp::<64>(0x40).to_vec()),
            ("event_count", le32(0x0102_0304)),
            ("reserved", vec![0; 4]),
        ],
    );
    assert_eq!(ProducerBlock::decode(&block.encode()), Ok(block));
    check_layout(
        "Batch statement",
        p::BATCH_STATEMENT_LEN,
        &[
            ("magic", 0),
            ("version", p::BS_VERSION),
            ("reserved", p::BS_RESERVED_A),
            ("log_id", p::BS_LOG_ID),
            ("event_count", p::BS_EVENT_COUNT),
            ("reserved", p::BS_RESERVED_B),
            ("batch_digest", p::BS_DIGEST),
        ],
    );
    let digest: [u8; 32] = ramp(0x80);
    check_encoding(
        "Batch statement",
        &p::batch_statement(&ramp(0x20), 7, &digest),
        &[
            ("magic", b"TALLYPSB".to_vec()),
            ("version", 1u16.to_le_bytes().to_vec()),
            ("log_id", ramp::<16>(0x20).to_vec()),
            ("event_count", le32(7)),
            ("batch_digest", digest.to_vec()),
        ],
    );
    assert!(
        section("Batch statement").contains("72 bytes"),
        "the statement's length is {}",
        p::BATCH_STATEMENT_LEN
    );
}

#[test]
fn snapshot_and_projection_checkpoint_headers_match_the_code() {
    use tally_engine::aggregate::{SNAPSHOT_HEADER_BYTES, encode_snapshot_payload};
    use tally_engine::projection::{CHECKPOINT_HEADER_BYTES, encode_checkpoint_payload};
    check_layout(
        "Snapshot payload header",
        SNAPSHOT_HEADER_BYTES,
        &[("version", 0), ("snapshot_version", 8)],
    );
    check_encoding(
        "Snapshot payload header",
        &encode_snapshot_payload(0x0102_0304_0506_0708, 9, b"state"),
        &[
            ("version", le64(0x0102_0304_0506_0708)),
            ("snapshot_version", le32(9)),
        ],
    );
    check_layout(
        "Projection checkpoint header",
        CHECKPOINT_HEADER_BYTES,
        &[("next", 0), ("state_version", 8)],
    );
    check_encoding(
        "Projection checkpoint header",
        &encode_checkpoint_payload(77, 3, b"state"),
        &[("next", le64(77)), ("state_version", le32(3))],
    );
}

#[test]
fn state_manifests_parts_and_entries_match_the_code() {
    use tally_engine::state_store::{
        Base, EntryWriter, Kind, MANIFEST_FIXED_BYTES, Manifest, PART_REF_BYTES, PARTS_MAX, PartRef,
    };
    check_layout(
        "State manifest",
        MANIFEST_FIXED_BYTES,
        &[
            ("magic", 0),
            ("at", 4),
            ("state_version", 12),
            ("kind", 16),
            ("reserved", 17),
            ("depth", 20),
            ("content_bytes", 24),
            ("content_hash", 32),
            ("base_version", 64),
            ("base_hash", 72),
            ("previous", 104),
            ("part_count", 112),
        ],
    );
    check_layout(
        "Part reference",
        PART_REF_BYTES,
        &[("version", 0), ("len", 8), ("hash", 12)],
    );
    let part = PartRef {
        version: 0x0B0A,
        len: 0x0C0D,
        hash: ramp(0x60),
    };
    let m = Manifest {
        at: 0x0102_0304_0506_0708,
        state_version: 0x1112_1314,
        kind: Kind::Delta,
        depth: 7,
        content_bytes: 0x0C0D,
        content_hash: ramp(0x20),
        base: Some(Base {
            version: 0x0909,
            hash: ramp(0x40),
        }),
        previous: Some(0x0A0A),
        parts: vec![part],
        inline: Vec::new(),
    };
    let bytes = m.encode();
    check_encoding(
        "State manifest",
        &bytes,
        &[
            ("at", le64(m.at)),
            ("state_version", le32(m.state_version)),
            ("kind", vec![2]),
            ("depth", le32(7)),
            ("content_bytes", le64(0x0C0D)),
            ("content_hash", ramp::<32>(0x20).to_vec()),
            ("base_version", le64(0x0909)),
            ("base_hash", ramp::<32>(0x40).to_vec()),
            ("previous", le64(0x0A0A)),
            ("part_count", le32(1)),
        ],
    );
    check_encoding(
        "Part reference",
        &bytes[MANIFEST_FIXED_BYTES..],
        &[
            ("version", le64(0x0B0A)),
            ("len", le32(0x0C0D)),
            ("hash", ramp::<32>(0x60).to_vec()),
        ],
    );
    let text = section("State manifest");
    assert_eq!(PARTS_MAX, 23_828);
    assert!(text.contains("at most 23,828"), "{text}");
    // Entries: key length, key, operation, and for a put the value's length and value.
    let mut out = Vec::new();
    let mut w = EntryWriter::new(&mut out);
    w.entry(b"k1", Some(b"vvv")).unwrap();
    w.entry(b"k2", None).unwrap();
    let mut want = le32(2);
    want.extend_from_slice(b"k1");
    want.push(1);
    want.extend(le32(3));
    want.extend_from_slice(b"vvv");
    want.extend(le32(2));
    want.extend_from_slice(b"k2");
    want.push(0);
    assert_eq!(out, want);
    let rows = all_tables()
        .into_iter()
        .find(|t| t.rows.first().is_some_and(|r| r[0] == "key_len"))
        .unwrap()
        .rows
        .iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect::<Vec<_>>();
    let rows: Vec<(&str, &str)> = rows.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    assert_eq!(
        rows,
        vec![
            ("key_len", "4"),
            ("key", "key_len"),
            ("op", "1"),
            ("value_len", "4"),
            ("value", "value_len"),
        ]
    );
}

/// An attribute index of 6 records whose fields and times are all distinct where they can be.
fn sample_attrs() -> Vec<u8> {
    use index::attrs::AttrBuilder;
    let mut b = AttrBuilder::new(SegmentSeq(0x0107), Position(0x1000), ramp(0x40));
    let types = ["New", "Amend", "New", "Cancel", "Amend", "New"];
    for (i, ty) in types.iter().enumerate() {
        let i = i as u64;
        let corr = format!("corr-{}", i % 2);
        let cause = if i.is_multiple_of(3) {
            String::new()
        } else {
            format!("cause-{i}")
        };
        let env = EnvelopeRef {
            event_id: EventId([i as u8; 16]),
            event_time: Timestamp(0x9000 - 0x10 * i),
            schema_version: 1,
            content_type: ContentType::Json,
            stream: "trade-1",
            aggregate_type: "Trade",
            event_type: ty,
            correlation_id: &corr,
            causation_id: &cause,
            actor: if i == 4 { "" } else { "alice" },
            payload: b"{}",
            payload_form: tally_engine::format::envelope::PayloadForm::Inline,
        };
        b.push(
            Position(0x1000 + i),
            4096 + 200 * i,
            4096 + 200 * (i + 1),
            Timestamp(0x5000 + i / 2),
            &[i as u8 + 0x80; 32],
            &env,
        );
    }
    b.prepare();
    b.encode(&ramp(0x10))
}

#[test]
fn attribute_index_matches_the_code() {
    use index::attrs::*;
    check_layout(
        "Attribute index header",
        ATTR_HEADER_LEN,
        &[
            ("magic", 0),
            ("format_version", AH_VERSION),
            ("header_len", AH_HEADER_LEN),
            ("flags", AH_FLAGS),
            ("log_id", AH_LOG_ID),
            ("seq", AH_SEQ),
            ("base_position", AH_BASE_POSITION),
            ("record_count", AH_RECORD_COUNT),
            ("data_end", AH_DATA_END),
            ("last_chain_hash", AH_LAST_CHAIN_HASH),
            ("event_type_count", AH_COUNTS),
            ("correlation_count", AH_COUNTS + 4),
            ("causation_count", AH_COUNTS + 8),
            ("actor_count", AH_COUNTS + 12),
            ("event_id_count", AH_COUNTS + 16),
            ("reserved", AH_RESERVED),
        ],
    );
    let entry = [("hash", 0), ("pos_delta", 8), ("offset", 12)];
    check_layout("Key entry", ATTR_ENTRY_LEN, &entry);
    check_layout(
        "Event-time entry",
        ATTR_ENTRY_LEN,
        &[("event_time", 0), ("pos_delta", 8), ("offset", 12)],
    );
    check_layout(
        "Typed event-time entry",
        TYPE_TIME_ENTRY_LEN,
        &[
            ("hash", 0),
            ("event_time", 8),
            ("pos_delta", 16),
            ("offset", 20),
        ],
    );
    let bytes = sample_attrs();
    assert_eq!(&bytes[..8], ATTR_MAGIC);
    check_encoding(
        "Attribute index header",
        &bytes,
        &[
            ("format_version", le16(format::STRUCTURE_VERSION)),
            ("header_len", le16(ATTR_HEADER_LEN as u16)),
            ("flags", le32(0)),
            ("log_id", ramp::<16>(0x10).to_vec()),
            ("seq", le64(0x0107)),
            ("base_position", le64(0x1000)),
            ("record_count", le64(6)),
            ("data_end", le64(4096 + 6 * 200)),
            ("last_chain_hash", vec![0x85; 32]),
            ("event_type_count", le32(6)),
            ("correlation_count", le32(6)),
            ("causation_count", le32(4)),
            ("actor_count", le32(5)),
            ("event_id_count", le32(6)),
        ],
    );

    // Walk the sections in the order of the layout table, rebuilding each from its rules.
    let layout = table("Attribute index file layout");
    let sections: Vec<&str> = layout.rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        sections,
        [
            "header",
            "record times",
            "event_type keys",
            "correlation_id keys",
            "causation_id keys",
            "actor keys",
            "event_id keys",
            "event times",
            "event type by event time",
            "trailer"
        ]
    );
    let h = |s: &str| index::stream_hash(s);
    let types = ["New", "Amend", "New", "Cancel", "Amend", "New"];
    let mut at = ATTR_HEADER_LEN;
    for i in 0..6u64 {
        assert_eq!(
            &bytes[at..at + 8],
            le64(0x5000 + i / 2).as_slice(),
            "record time {i}"
        );
        at += 8;
    }
    let key_section = |at: &mut usize, values: Vec<(u64, u64)>| {
        let mut rows: Vec<(u64, u64)> = values;
        rows.sort_unstable();
        for (hash, delta) in rows {
            let e = &bytes[*at..*at + 16];
            assert_eq!(&e[..8], le64(hash).as_slice());
            assert_eq!(&e[8..12], le32(delta as u32).as_slice());
            assert_eq!(&e[12..16], le32(4096 + 200 * delta as u32).as_slice());
            *at += 16;
        }
    };
    key_section(&mut at, (0..6).map(|i| (h(types[i as usize]), i)).collect());
    key_section(
        &mut at,
        (0..6).map(|i| (h(&format!("corr-{}", i % 2)), i)).collect(),
    );
    key_section(
        &mut at,
        (0..6)
            .filter(|i| i % 3 != 0)
            .map(|i| (h(&format!("cause-{i}")), i))
            .collect(),
    );
    key_section(
        &mut at,
        (0..6)
            .filter(|&i| i != 4)
            .map(|i| (h("alice"), i))
            .collect(),
    );
    // Event ids are indexed by the hash of their 16 bytes.
    let id = |i: u64| {
        let hash = blake3::hash(&[i as u8; 16]);
        u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap())
    };
    key_section(&mut at, (0..6).map(|i| (id(i), i)).collect());
    // Event times decrease with position, so the event-time section is in reverse.
    for i in (0..6u64).rev() {
        let e = &bytes[at..at + 16];
        assert_eq!(&e[..8], le64(0x9000 - 0x10 * i).as_slice());
        assert_eq!(&e[8..12], le32(i as u32).as_slice());
        assert_eq!(&e[12..16], le32(4096 + 200 * i as u32).as_slice());
        at += 16;
    }
    let mut typed: Vec<(u64, u64, u64)> = (0..6)
        .map(|i| (h(types[i as usize]), 0x9000 - 0x10 * i, i))
        .collect();
    typed.sort_unstable();
    for (hash, t, i) in typed {
        let e = &bytes[at..at + 24];
        assert_eq!(&e[..8], le64(hash).as_slice());
        assert_eq!(&e[8..16], le64(t).as_slice());
        assert_eq!(&e[16..20], le32(i as u32).as_slice());
        assert_eq!(&e[20..24], le32(4096 + 200 * i as u32).as_slice());
        at += 24;
    }
    assert_eq!(at + ATTR_TRAILER_LEN, bytes.len());
    assert_eq!(&bytes[at..], le32(crc32(&bytes[..at])).as_slice());
    assert!(SealedAttrs::open(Arc::new(bytes)).is_ok());
}

#[test]
fn stream_heads_map_definition_matches_the_code() {
    use tally_engine::format::heads::{StreamHeads, head_leaf, head_node, stream_key};
    let text = section("Stream heads map");
    for line in [
        "leaf(k,v,p) = BLAKE3(0x02 || k || v (u64 LE) || p (u64 LE))",
        "node(l, r)  = BLAKE3(0x03 || l || r)",
    ] {
        assert!(text.contains(line), "the definition has the line {line:?}");
    }
    // The definition, written out here from the document.
    fn leaf(k: &[u8; 32], v: u64, p: u64) -> [u8; 32] {
        let mut b = vec![0x02];
        b.extend_from_slice(k);
        b.extend_from_slice(&v.to_le_bytes());
        b.extend_from_slice(&p.to_le_bytes());
        *blake3::hash(&b).as_bytes()
    }
    fn node(l: &[u8; 32], r: &[u8; 32]) -> [u8; 32] {
        let mut b = vec![0x03];
        b.extend_from_slice(l);
        b.extend_from_slice(r);
        *blake3::hash(&b).as_bytes()
    }
    fn bit(k: &[u8; 32], d: usize) -> bool {
        k[d / 8] & (0x80 >> (d % 8)) != 0
    }
    fn root(s: &[([u8; 32], u64, u64)], depth: usize) -> [u8; 32] {
        match s {
            [] => [0; 32],
            [(k, v, p)] => leaf(k, *v, *p),
            _ => {
                let (s1, s0): (Vec<_>, Vec<_>) = s.iter().partition(|e| bit(&e.0, depth));
                node(&root(&s0, depth + 1), &root(&s1, depth + 1))
            }
        }
    }
    let k = stream_key(b"trade-1");
    assert_eq!(k, *blake3::hash(b"trade-1").as_bytes());
    assert_eq!(head_leaf(&k, 7, 99), leaf(&k, 7, 99));
    assert_eq!(head_node(&[1; 32], &[2; 32]), node(&[1; 32], &[2; 32]));
    let mut heads = StreamHeads::new();
    assert_eq!(heads.root(), [0; 32], "the empty map");
    let mut entries = Vec::new();
    for i in 0..200u64 {
        let key = stream_key(format!("trade-{i}").as_bytes());
        heads.set(key, i % 5, 1000 + i);
        entries.push((key, i % 5, 1000 + i));
        if [1, 2, 3, 50, 200].contains(&entries.len()) {
            assert_eq!(heads.root(), root(&entries, 0), "{} streams", entries.len());
        }
    }
    // A head proof, checked as the document says: siblings nearest the leaf first.
    let (key, v, p) = entries[17];
    let proof = heads.prove(&key).unwrap();
    let mut h = leaf(&key, v, p);
    let depth = proof.siblings.len();
    for (i, sibling) in proof.siblings.iter().enumerate() {
        let d = depth - 1 - i;
        h = if bit(&key, d) {
            node(sibling, &h)
        } else {
            node(&h, sibling)
        };
    }
    assert_eq!(h, heads.root());
    assert!(text.contains("nearest the leaf first; at most 256"));
}

/// Every file name the code uses (`format::files`) is in FORMAT.md's directory table or the
/// witness's, and the temporaries the document says open deletes are the ones the code
/// deletes.
#[test]
fn every_file_name_in_the_code_is_documented() {
    use tally_engine::format::files::*;
    let layout = section("Directory layout and file naming");
    let witness = section("Witness state");
    let mut errors = Vec::new();
    let seq = SegmentSeq(0);
    let data_files = [
        META_FILE.to_owned(),
        LOCK_FILE.to_owned(),
        CHECKPOINTS_FILE.to_owned(),
        KEY_FILE.to_owned(),
        key_ledger_name(KEY_FILE),
        COSIGNATURES_FILE.to_owned(),
        TREE_FILE.to_owned(),
        SNAPSHOT_FILE.to_owned(),
        COLD_MANIFEST_FILE.to_owned(),
        COLD_STORE_FILE.to_owned(),
        format!("{COLD_CACHE_DIR}/"),
        segment_file_name(seq).replace('0', "N"),
        index_file_name(seq).replace('0', "N"),
        attrs_file_name(seq).replace('0', "N"),
        spare_temp_name(seq).replace('0', "N"),
        temp_name(&segment_file_name(seq)).replace('0', "N"),
        temp_name("<name>"),
    ];
    for name in data_files {
        if !layout.contains(&format!("| `{name}` |")) {
            errors.push(format!("{name} is not a row of section 2's table"));
        }
    }
    for name in [
        WITNESS_KEY_FILE.to_owned(),
        WITNESS_VKEY_FILE.to_owned(),
        format!("{WITNESS_LOGS_DIR}/<log_id hex>/{WITNESS_LOG_KEYS_FILE}"),
        format!("{WITNESS_LOGS_DIR}/<log_id hex>/{WITNESS_HISTORY_FILE}"),
        format!("{WITNESS_LOGS_DIR}/<log_id hex>/{WITNESS_LATEST_FILE}"),
        format!("{WITNESS_LOGS_DIR}/<log_id hex>/{WITNESS_EVIDENCE_DIR}/<hash>.note"),
    ] {
        if !witness.contains(&format!("| `{name}` |")) {
            errors.push(format!("{name} is not a row of 17.11's table"));
        }
    }
    // "A writable open deletes the temporary files Tally makes (...; nothing else)".
    let para = layout
        .split("**Temporary files.**")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .expect("section 2's paragraph on temporary files")
        .to_owned();
    let listed: Vec<String> = para
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|n| n.replace("NNNNNNNNNNNNNNNNNNNN", &"0".repeat(20)))
        .collect();
    let in_code = [
        spare_temp_name(seq),
        temp_name(&segment_file_name(seq)),
        temp_name(&index_file_name(seq)),
        temp_name(&attrs_file_name(seq)),
        temp_name(SNAPSHOT_FILE),
        temp_name(META_FILE),
    ];
    if listed != in_code {
        errors.push(format!(
            "temporaries listed {listed:?}, the code's are {in_code:?}"
        ));
    }
    for name in &listed {
        if !is_temporary(name) {
            errors.push(format!("{name} is listed as deleted by open but is not"));
        }
    }
    fail_on(errors);
}

fn sample_segment() -> (segment::SegmentHeader, segment::SegmentFooter) {
    let h = segment::SegmentHeader {
        layout: tally_engine::format::record::Layout::V2,
        log_id: ramp(0x10),
        seq: SegmentSeq(0x1111),
        base_position: Position(0x2222_3333),
        created_time: Timestamp(0x4444_5555),
        capacity: 1 << 20,
        prev_chain_hash: ramp(0x60),
    };
    let f = segment::SegmentFooter {
        layout: h.layout,
        log_id: h.log_id,
        seq: h.seq,
        record_count: 3,
        first_position: h.base_position,
        last_position: Position(h.base_position.0 + 2),
        data_end: 4096 + 3 * 96,
        first_record_time: Timestamp(0x7777_8888),
        last_record_time: Timestamp(0x9999_aaaa),
        last_chain_hash: ramp(0x40),
        merkle_root: ramp(0xc0),
    };
    (h, f)
}

#[test]
fn cold_segment_tables_match_the_code() {
    use format::cold::*;
    check_layout(
        "Cold header",
        COLD_HEADER_LEN,
        &[
            ("magic", 0),
            ("version", CH_VERSION),
            ("header_len", CH_HEADER_LEN),
            ("block_target", CH_BLOCK_TARGET),
            ("segment_header", CH_SEGMENT_HEADER),
            ("segment_footer", CH_SEGMENT_FOOTER),
            ("reserved", CH_RESERVED),
            ("header_crc", CH_CRC),
        ],
    );
    check_layout(
        "Block index entry",
        COLD_BLOCK_ENTRY_LEN,
        &[
            ("segment_offset", CB_SEGMENT_OFFSET),
            ("first_position", CB_FIRST_POSITION),
            ("object_offset", CB_OBJECT_OFFSET),
            ("compressed_len", CB_COMPRESSED_LEN),
            ("uncompressed_len", CB_UNCOMPRESSED_LEN),
            ("record_count", CB_RECORD_COUNT),
            ("frame_crc", CB_FRAME_CRC),
        ],
    );
    check_layout(
        "Cold trailer",
        COLD_TRAILER_LEN,
        &[
            ("index_offset", CT_INDEX_OFFSET),
            ("block_count", CT_BLOCK_COUNT),
            ("reserved", CT_RESERVED_A),
            ("content_hash", CT_CONTENT_HASH),
            ("magic", CT_MAGIC),
            ("reserved", CT_RESERVED_B),
            ("trailer_crc", CT_CRC),
        ],
    );
    // A real object: three records of 96 bytes in blocks of at most two.
    let (h, f) = sample_segment();
    let data: Vec<u8> = (0..3 * 96).map(|i| (i % 251) as u8).collect();
    let object = encode_cold(
        &h,
        &f,
        &data,
        &[96, 96, 96],
        ColdEncodeOptions {
            block_target: 200,
            level: 3,
        },
    )
    .unwrap();
    let header_page = h.encode_page();
    let footer_page = f.encode_page();
    check_encoding(
        "Cold header",
        &object[..COLD_HEADER_LEN],
        &[
            ("version", le16(COLD_VERSION)),
            ("header_len", le16(COLD_HEADER_LEN as u16)),
            ("block_target", le32(200)),
            ("segment_header", header_page[..128].to_vec()),
            ("segment_footer", footer_page[..192].to_vec()),
        ],
    );
    let layout = decode_cold(&object).unwrap();
    assert_eq!(
        layout.blocks.len(),
        2,
        "blocks of whole records up to the target"
    );
    let b = layout.blocks[1];
    let at = layout.trailer.index_offset as usize + COLD_BLOCK_ENTRY_LEN;
    check_encoding(
        "Block index entry",
        &object[at..at + COLD_BLOCK_ENTRY_LEN],
        &[
            ("segment_offset", le64(4096 + 2 * 96)),
            ("first_position", le64(h.base_position.0 + 2)),
            ("object_offset", le64(b.object_offset)),
            ("compressed_len", le32(b.compressed_len)),
            ("uncompressed_len", le32(96)),
            ("record_count", le32(1)),
            (
                "frame_crc",
                le32(crc32(
                    &object[b.object_offset as usize..b.object_range().end as usize],
                )),
            ),
        ],
    );
    // The first frame follows the header; any zstd decoder reads a frame on its own.
    assert_eq!(layout.blocks[0].object_offset, COLD_HEADER_LEN as u64);
    let trailer_at = object.len() - COLD_TRAILER_LEN;
    check_encoding(
        "Cold trailer",
        &object[trailer_at..],
        &[
            ("index_offset", le64(layout.trailer.index_offset)),
            ("block_count", le32(2)),
            (
                "content_hash",
                blake3::hash(&object[..trailer_at]).as_bytes().to_vec(),
            ),
        ],
    );
    assert_eq!(
        layout.trailer.index_offset as usize + 2 * COLD_BLOCK_ENTRY_LEN,
        trailer_at,
        "the index ends where the trailer starts"
    );
}

#[test]
fn cold_manifest_tables_match_the_code() {
    use format::cold::*;
    check_layout(
        "Cold manifest header",
        MANIFEST_HEADER_LEN,
        &[
            ("magic", 0),
            ("version", MH_VERSION),
            ("header_len", MH_HEADER_LEN),
            ("entry_len", MH_ENTRY_LEN),
            ("log_id", MH_LOG_ID),
            ("reserved", MH_RESERVED),
            ("header_crc", MH_CRC),
        ],
    );
    check_layout(
        "Cold manifest entry",
        MANIFEST_ENTRY_LEN,
        &[
            ("kind", ME_KIND),
            ("reserved", ME_RESERVED_A),
            ("seq", ME_SEQ),
            ("recorded_time", ME_RECORDED_TIME),
            ("object_len", ME_OBJECT_LEN),
            ("object_hash", ME_OBJECT_HASH),
            ("segment_header", ME_SEGMENT_HEADER),
            ("segment_footer", ME_SEGMENT_FOOTER),
            ("reserved", ME_RESERVED_B),
            ("entry_crc", ME_CRC),
        ],
    );
    let log_id: [u8; 16] = ramp(0x10);
    check_encoding(
        "Cold manifest header",
        &encode_manifest_header(&log_id),
        &[
            ("version", le16(MANIFEST_VERSION)),
            ("header_len", le16(MANIFEST_HEADER_LEN as u16)),
            ("entry_len", le32(MANIFEST_ENTRY_LEN as u32)),
            ("log_id", log_id.to_vec()),
        ],
    );
    let (h, f) = sample_segment();
    let e = ManifestEntry {
        seq: h.seq,
        recorded_time: Timestamp(0x0102_0304_0506),
        object_len: 0x1_0000,
        object_hash: ramp(0xa0),
        segment_header: h,
        segment_footer: f,
    };
    check_encoding(
        "Cold manifest entry",
        &encode_manifest_entry(&e),
        &[
            ("kind", le16(MANIFEST_KIND_COLD)),
            ("seq", le64(h.seq.0)),
            ("recorded_time", le64(e.recorded_time.0)),
            ("object_len", le64(e.object_len)),
            ("object_hash", e.object_hash.to_vec()),
            ("segment_header", h.encode_page()[..128].to_vec()),
            ("segment_footer", f.encode_page()[..192].to_vec()),
        ],
    );
    // The object key as 21.7 spells it.
    let key = tally_engine::format::files::cold_object_key(&log_id, SegmentSeq(42));
    let hex: String = log_id.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(key, format!("{hex}/00000000000000000042.cold"));
    assert!(
        section("Object keys, the store file and the cache").contains("00000000000000000042.cold")
    );
}
