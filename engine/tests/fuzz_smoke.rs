//! A smoke run of the fuzz targets (`fuzz/`) inside the normal test suite: each decoder
//! gets random bytes and mutations of real files (a record, a segment, an index sidecar,
//! header and footer pages) and must neither panic nor accept bytes that re-encode
//! differently. Crashes found by `cargo fuzz` become named cases here.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use tally_engine::fuzzing::{decode_pages, decode_record, open_attrs, open_index, recover_segment};
use tally_engine::{EventData, ExpectedVersion, Log, Options, Query};

struct Real {
    segment: Vec<u8>,
    index: Vec<u8>,
    attrs: Vec<u8>,
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
        log.close().unwrap();
        Real {
            segment: std::fs::read(dir.path().join("00000000000000000000.seg")).unwrap(),
            index: std::fs::read(dir.path().join("00000000000000000000.idx")).unwrap(),
            attrs: std::fs::read(dir.path().join("00000000000000000000.adx")).unwrap(),
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

#[test]
fn real_inputs_decode_and_round_trip() {
    let r = real_files();
    decode_record(&r.segment[4096..]);
    decode_pages(&r.segment[..4096]);
    decode_pages(&r.segment[r.segment.len() - 4096..]);
    open_index(&r.index);
    open_attrs(&r.attrs);
    recover_segment(&r.segment[4096..r.segment.len() - 4096]);
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
    }

    #[test]
    fn mutated_real_files_never_panic(
        flips in prop::collection::vec((any::<usize>(), 1u8..=255), 0..4),
        cut in prop::option::of(any::<usize>()),
    ) {
        let r = real_files();
        let records = r.segment[4096..r.segment.len() - 4096].to_vec();
        decode_record(&mutate(records.clone(), &flips, cut));
        recover_segment(&mutate(records, &flips, cut));
        open_index(&mutate(r.index.clone(), &flips, cut));
        open_attrs(&mutate(r.attrs.clone(), &flips, cut));
        decode_pages(&mutate(r.segment[..4096].to_vec(), &flips, cut));
        decode_pages(&mutate(r.segment[r.segment.len() - 4096..].to_vec(), &flips, cut));
    }
}
