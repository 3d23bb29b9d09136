//! A smoke run of the fuzz targets (`fuzz/`) inside the normal test suite: each decoder
//! gets random bytes and mutations of real files (a record, a segment, an index sidecar,
//! header and footer pages) and must neither panic nor accept bytes that re-encode
//! differently; every checked-in seed corpus (`fuzz/corpus/<target>/`) runs through its
//! entry point; and `log_ops` (operation sequences on a log over the simulated disk,
//! checked against a model) runs its corpus and a few hundred seeded random inputs.
//! Crashes found by `cargo fuzz` become named cases here.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tally_engine::fuzzing::log_ops_input::{Cut, Event, Expect, LogOpsInput, Retry};
use tally_engine::fuzzing::{
    LogOpsOutcome, decode_evidence, decode_pages, decode_record, log_ops, open_attrs, open_index,
    recover_segment,
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

/// The fuzz crate's directory.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The fuzz targets, as `fuzz/Cargo.toml` names its `[[bin]]`s.
fn fuzz_targets() -> Vec<String> {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(name) = line.strip_prefix("name = ") {
            targets.push(name.trim_matches('"').to_owned());
        }
    }
    assert!(
        targets.len() >= 8,
        "fuzz/Cargo.toml lists its targets: {targets:?}"
    );
    targets
}

/// A target's checked-in seeds, by file name.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Seeds named so were added by hand (a crash's reproducer, minimised): they must not
/// panic, but need not get through their decoder. Every other seed is a real encoding
/// written by `fuzz/corpus-gen`, and must.
const HAND_ADDED_PREFIX: &str = "regression-";

#[test]
fn every_fuzz_target_has_a_seed_corpus_and_every_corpus_a_target() {
    let targets = fuzz_targets();
    for t in &targets {
        assert!(
            !corpus(t).is_empty(),
            "fuzz/corpus/{t} is empty: regenerate the corpora (fuzz/README.md)"
        );
    }
    for e in std::fs::read_dir(fuzz_dir().join("corpus")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            targets.contains(&name),
            "fuzz/corpus/{name} belongs to no target"
        );
    }
}

#[test]
fn seed_corpora_get_through_their_decoders() {
    for target in fuzz_targets() {
        let run: fn(&[u8]) -> bool = match target.as_str() {
            "decode_record" => decode_record,
            "open_index" => open_index,
            "open_attrs" => open_attrs,
            "decode_pages" => |b| decode_pages(b) > 0,
            "recover_segment" => |b| recover_segment(b) > 0,
            "decode_evidence" => |b| {
                decode_evidence(b);
                true
            },
            // The next test runs these, with its own checks.
            "log_ops" => continue,
            // `tally_server::protocol::check_decoders` is the server's, out of this crate's
            // reach: `.ci/run` runs this corpus through the fuzz binary, and the server's
            // own tests run the function under proptest.
            "decode_frame" => continue,
            other => panic!("fuzz target {other} has no entry point here: add it"),
        };
        for (name, bytes) in corpus(&target) {
            let through = run(&bytes);
            assert!(
                through || name.starts_with(HAND_ADDED_PREFIX),
                "fuzz/corpus/{target}/{name} does not get through its decoder: a seed that \
                 stops early tests only the first check (regenerate the corpora)"
            );
        }
    }
}

#[test]
fn log_ops_seed_corpus_reaches_every_kind_of_operation_and_outcome() {
    let mut total = LogOpsOutcome::default();
    for (name, bytes) in corpus("log_ops") {
        let o = log_ops(&bytes);
        eprintln!("{name}: {o:?}");
        total += o;
    }
    let reached = [
        ("acknowledged appends", total.appends),
        ("recognised retries", total.replays),
        ("refused appends", total.refusals),
        ("reads", total.reads),
        ("checkpoints", total.checkpoints),
        ("crashes", total.crashes),
        ("power cuts", total.power_cuts),
        ("operations failed by a fault", total.fault_errors),
        (
            "failed appends settled",
            total.unknown_found + total.unknown_lost,
        ),
    ];
    for (what, n) in reached {
        assert!(n > 0, "the log_ops corpus reaches no {what}: {total:?}");
    }
}

/// The input writer and the run agree: each operation written runs, with the outcome the
/// model predicts.
#[test]
fn log_ops_runs_what_its_input_writer_wrote() {
    let input = LogOpsInput::new(1, 0)
        .append(
            0,
            Expect::NoStream,
            &[Event::small(b"a"), Event::small(b"b")],
        )
        .retry(0, Retry::AsSent)
        .append(0, Expect::Exact(9), &[Event::small(b"wrong version")])
        .append_multi(&[
            (1, Expect::NoStream, vec![Event::small(b"c")]),
            (2, Expect::Right, vec![Event::large(4096, 1)]),
        ])
        .read_stream(0, 0, 0, false)
        .read_all(255, 0, true)
        .find(false, 0, 31)
        .checkpoint()
        .crash()
        .power_cut(Cut::Clean)
        .close()
        .into_bytes();
    assert_eq!(
        log_ops(&input),
        LogOpsOutcome {
            ops: 11,
            appends: 2,
            events: 4,
            replays: 1,
            refusals: 1,
            reads: 3,
            checkpoints: 1,
            // The first, after the crash, the cut and the close, and the final one.
            opens: 5,
            crashes: 1,
            power_cuts: 1,
            ..LogOpsOutcome::default()
        }
    );
}

/// SplitMix64.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `log_ops` on pseudo-random inputs of up to 700 bytes. `TALLY_FUZZ_SEED=S` picks the
/// inputs (a failure prints its seed, case and input), `TALLY_FUZZ_CASES=N` their number.
#[test]
fn log_ops_on_seeded_random_inputs() {
    let seed = env_u64("TALLY_FUZZ_SEED").unwrap_or(0x7a11_f022);
    let cases = env_u64("TALLY_FUZZ_CASES").unwrap_or(300);
    let mut state = seed;
    let mut total = LogOpsOutcome::default();
    let started = std::time::Instant::now();
    for case in 0..cases {
        let len = 16 + (splitmix(&mut state) % 700) as usize;
        let input: Vec<u8> = (0..len).map(|_| splitmix(&mut state) as u8).collect();
        match std::panic::catch_unwind(|| log_ops(&input)) {
            Ok(o) => total += o,
            Err(_) => {
                let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
                panic!(
                    "TALLY_FUZZ_SEED={seed}, case {case}: log_ops failed (above); to replay it \
                     under the fuzz target, write this input to a file and pass it to \
                     `fuzz/target/.../log_ops FILE`:\n{hex}"
                );
            }
        }
    }
    eprintln!(
        "log_ops: {cases} inputs from seed {seed} in {:.2} s: {total:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        total.appends > 0 && total.power_cuts > 0 && total.fault_errors > 0,
        "random inputs exercised nothing: {total:?}"
    );
}
