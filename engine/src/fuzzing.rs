//! Entry points for the fuzz targets in `fuzz/` (and their smoke run in the test suite).
//! Each takes arbitrary bytes, must never panic except on a broken invariant it asserts,
//! and checks that whatever decodes re-encodes to the same bytes.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::format::envelope::EnvelopeRef;
use crate::format::meta::LogMeta;
use crate::format::record::{RECORD_HEADER_LEN, RecordHeader};
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{Position, chain};
use crate::index::{SealedIndex, stream_hash};
use crate::segment::{ScanFrom, SliceSource, find_durable_evidence, scan};

/// A record header, then its body and envelope.
pub fn decode_record(data: &[u8]) {
    let Ok(h) = RecordHeader::decode(data) else {
        return;
    };
    let mut again = [0u8; RECORD_HEADER_LEN];
    h.encode_into(&mut again);
    assert_eq!(
        &again[..],
        &data[..RECORD_HEADER_LEN],
        "header re-encodes differently"
    );
    let Some(body) = data.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + h.body_len as usize) else {
        return;
    };
    if h.check_body(body).is_err() {
        return;
    }
    let Ok(env) = EnvelopeRef::decode(body) else {
        return;
    };
    let mut out = Vec::new();
    env.encode_into(&mut out)
        .expect("a decoded envelope is within limits");
    assert_eq!(out, body, "envelope re-encodes differently");
}

/// An index sidecar, then every lookup it offers.
pub fn open_index(data: &[u8]) {
    let Ok(idx) = SealedIndex::open(Arc::new(data.to_vec())) else {
        return;
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
}

/// Segment header and footer pages and the identity file.
pub fn decode_pages(data: &[u8]) {
    if let Ok(h) = SegmentHeader::decode_page(data) {
        assert_eq!(
            h.encode_page(),
            data[..4096],
            "header page re-encodes differently"
        );
    }
    if let Ok(f) = SegmentFooter::decode_page(data) {
        assert_eq!(
            f.encode_page(),
            data[..4096],
            "footer page re-encodes differently"
        );
    }
    if let Ok(m) = LogMeta::decode(data) {
        assert_eq!(
            &m.encode()[..],
            data,
            "identity file re-encodes differently"
        );
    }
}

/// Bytes as a segment's record area: the scan yields a chain of valid records, in order,
/// within the bytes, and the evidence search stays in bounds.
pub fn recover_segment(data: &[u8]) {
    let seed = chain::chain_seed(&[0; 16]);
    let from = ScanFrom {
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
        s.complete_end,
        limit,
        Position(s.complete as u64),
    );
}
