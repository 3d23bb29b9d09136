//! A smoke run of the fuzz targets (`fuzz/`) inside the normal test suite: each decoder
//! gets random bytes and mutations of real files (a record, a segment, an index sidecar,
//! header and footer pages) and must neither panic nor accept bytes that re-encode
//! differently. Crashes found by `cargo fuzz` become named cases here.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tally_engine::fuzzing::{
    decode_evidence, decode_pages, decode_record, open_attrs, open_index, recover_segment,
};
use tally_engine::{EventData, ExpectedVersion, Log, Options, Query};

struct Real {
    segment: Vec<u8>,
    index: Vec<u8>,
    attrs: Vec<u8>,
    log_id: [u8; 16],
}

fn real_files() -> &'static Real {
    static REAL: std::sync::OnceLock<Real> = std::sync::OnceLock::new();
    REAL.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(
            dir.path(),
            Options {
                segment_bytes: 64 * 1024,
                ..Options::default()
            },
        )
        .unwrap();
        for i in 0..400u32 {
            let e = EventData::json("E", format!("{{\"i\":{i}}}"))
                .actor("fuzz")
                .correlation_id("c");
            log.append(&format!("s-{}", i % 9), ExpectedVersion::Any, &[e])
                .unwrap();
        }
        log.wait_sealed().unwrap();
        // A lookup writes the sealed segments' attribute indexes.
        log.find(&Query::all().limit(1)).unwrap();
        let log_id = log.log_id();
        log.close().unwrap();
        Real {
            segment: std::fs::read(dir.path().join("00000000000000000000.seg")).unwrap(),
            index: std::fs::read(dir.path().join("00000000000000000000.idx")).unwrap(),
            attrs: std::fs::read(dir.path().join("00000000000000000000.adx")).unwrap(),
            log_id,
        }
    })
}

fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, x) in flips {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c % (bytes.len() + 1));
    }
    bytes
}

/// Real evidence, each prefixed with the byte that makes `decode_evidence` pick its decoder:
/// a checkpoint note with a cosignature, a witness key, a cosignature entry, a checkpoint
/// entry and a producer block.
fn real_evidence() -> &'static [Vec<u8>] {
    use tally_engine::format::checkpoint::SigningKey;
    use tally_engine::format::note::{Cosignature, CosignatureEntry, checkpoint_note};
    use tally_engine::format::producer::{ProducerBlock, ProducerSignature};
    static EVIDENCE: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    EVIDENCE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), Options::default()).unwrap();
        log.append("s-1", ExpectedVersion::Any, &[EventData::json("E", "{}")])
            .unwrap();
        let cp = log.checkpoint().unwrap();
        let witness = SigningKey::from_bytes(&[9; 32]);
        let body = log.checkpoint_note(None).unwrap().unwrap().body;
        let cosig = Cosignature::sign(&witness, "witness.example/1", 1_700_000_000, &body);
        let note = checkpoint_note(&cp, std::slice::from_ref(&cosig));
        let entry = CosignatureEntry {
            checkpoint_id: cp.statement.id,
            tree_size: cp.statement.tree_size,
            root: cp.statement.root,
            cosignature: cosig.clone(),
        };
        let producer = ProducerBlock {
            signature: ProducerSignature::sign(
                &SigningKey::from_bytes(&[7; 32]),
                &log.log_id(),
                &[[1; 32], [2; 32]],
            ),
            event_count: 2,
        };
        log.close().unwrap();
        let with = |pick: u8, bytes: &[u8]| [&[pick][..], bytes].concat();
        vec![
            with(0, note.encode().as_bytes()),
            with(1, cosig.witness().encode().as_bytes()),
            with(2, &entry.encode()),
            with(3, &cp.encode_entry()),
            with(4, &producer.encode()),
        ]
    })
}

#[test]
fn real_evidence_decodes_and_round_trips() {
    use tally_engine::format::checkpoint::SignedCheckpoint;
    use tally_engine::format::note::{CosignatureEntry, Note, WitnessKey};
    use tally_engine::format::producer::ProducerBlock;
    let e = real_evidence();
    // Each input is one its decoder accepts, so the round trips below are reached.
    let text = |b: &[u8]| std::str::from_utf8(&b[1..]).unwrap().to_owned();
    assert_eq!(Note::parse(&text(&e[0])).unwrap().signatures.len(), 2);
    WitnessKey::parse(&text(&e[1])).unwrap();
    CosignatureEntry::decode(&e[2][1..]).unwrap();
    SignedCheckpoint::decode_entry(&e[3][1..]).unwrap();
    ProducerBlock::decode(&e[4][1..]).unwrap();
    for e in e {
        decode_evidence(e);
    }
}

/// The byte that makes the record decoders read a version 2 record (the log's layout).
const V2: u8 = 1;

/// A segment's record area as `recover_segment` takes it: the layout byte, the log id that
/// seeds the chain, the records.
fn record_area(r: &Real, records: &[u8]) -> Vec<u8> {
    [&[V2][..], &r.log_id, records].concat()
}

#[test]
fn real_inputs_decode_and_round_trip() {
    let r = real_files();
    // Each real input must get through its decoder, so that the round trips the fuzz
    // targets check are reached here, not only for bytes that fail early.
    assert!(decode_record(&[&[V2][..], &r.segment[4096..]].concat()));
    assert_eq!(decode_pages(&r.segment[..4096]), 1, "the header page");
    let footer_page = &r.segment[r.segment.len() - 4096..];
    assert_eq!(decode_pages(footer_page), 1, "the footer page");
    assert!(open_index(&r.index));
    assert!(open_attrs(&r.attrs));
    let footer = tally_engine::format::segment::SegmentFooter::decode_page(footer_page).unwrap();
    let records = &r.segment[4096..r.segment.len() - 4096];
    assert_eq!(
        recover_segment(&record_area(r, records)) as u64,
        footer.record_count,
        "the scan follows the chain through every record of the segment"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..5000)) {
        decode_record(&data);
        open_index(&data);
        open_attrs(&data);
        decode_pages(&data);
        recover_segment(&data);
        decode_evidence(&data);
    }

    #[test]
    fn mutated_real_files_never_panic(
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 0..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let r = real_files();
        let records = r.segment[4096..r.segment.len() - 4096].to_vec();
        decode_record(&[&[V2][..], &mutate(records.clone(), &flips, cut)].concat());
        recover_segment(&record_area(r, &mutate(records, &flips, cut)));
        open_index(&mutate(r.index.clone(), &flips, cut));
        open_attrs(&mutate(r.attrs.clone(), &flips, cut));
        decode_pages(&mutate(r.segment[..4096].to_vec(), &flips, cut));
        decode_pages(&mutate(r.segment[r.segment.len() - 4096..].to_vec(), &flips, cut));
        for e in real_evidence() {
            // Keep the byte that picks the decoder.
            let mut m = vec![e[0]];
            m.extend(mutate(e[1..].to_vec(), &flips, cut));
            decode_evidence(&m);
        }
    }
}
