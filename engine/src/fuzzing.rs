//! Entry points for the fuzz targets in `fuzz/` (and their smoke run in the test suite).
//! Each takes arbitrary bytes, must never panic except on a broken invariant it asserts,
//! and checks that whatever decodes re-encodes to the same bytes.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::format::envelope::EnvelopeRef;
use crate::format::meta::LogMeta;
use crate::format::record::{Layout, RECORD_HEADER_MAX, RecordHeader};
use crate::format::segment::{SegmentFooter, SegmentHeader};
use crate::format::{Position, chain};
use crate::index::{SealedIndex, stream_hash};
use crate::segment::{ScanFrom, SliceSource, find_durable_evidence, scan};

/// A record header of either layout (the first byte chooses), then its body and
/// envelope. Returns whether the whole record decoded (so that a test on real bytes can
/// show the round trips were reached).
pub fn decode_record(data: &[u8]) -> bool {
    let Some((&pick, data)) = data.split_first() else {
        return false;
    };
    let layout = if pick & 1 == 0 {
        Layout::V1
    } else {
        Layout::V2
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
    let Ok(env) = EnvelopeRef::decode(body) else {
        return false;
    };
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
    let layout = if pick & 1 == 0 {
        Layout::V1
    } else {
        Layout::V2
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
