//! The whole-log Merkle tree, proofs and signed checkpoints, through the public API.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;
use tally_engine::format::chain::merkle_root;
use tally_engine::format::proof::ProofError;
use tally_engine::{
    Durability, Error, EventData, ExpectedVersion, Hash32, Log, Options, Position, RecoveryMode,
    VerifyOptions,
};

fn opts() -> Options {
    Options {
        segment_bytes: 64 << 10,
        durability: Durability::None,
        checkpoint_every_records: None,
        checkpoint_interval: None,
        ..Options::default()
    }
}

fn fill(log: &Log, n: usize) {
    for i in 0..n {
        let e = EventData::new("E", vec![i as u8; 40 + (i * 37) % 300]);
        log.append(&format!("s-{}", i % 5), ExpectedVersion::Any, &[e])
            .unwrap();
    }
}

fn record_hashes(log: &Log) -> Vec<Hash32> {
    let mut out = Vec::new();
    log.scan(Position(0), tally_engine::Verify::Checksums, |r| {
        out.push(*r.record_hash);
    })
    .unwrap();
    out
}

#[test]
fn roots_and_proofs_agree_with_the_records_across_chunks_and_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 700);
    assert!(log.segments().len() > 2, "the log spans several segments");
    let hashes = record_hashes(&log);
    assert_eq!(hashes.len(), 700);
    for n in [
        0u64, 1, 2, 63, 64, 65, 127, 128, 129, 300, 511, 512, 513, 699, 700,
    ] {
        let root = log.merkle_root(n).unwrap();
        assert_eq!(root, merkle_root(&hashes[..n as usize]), "size {n}");
        for p in [0, n / 3, n.saturating_sub(1)] {
            if p < n {
                let proof = log.prove_inclusion(Position(p), n).unwrap();
                proof.verify(&hashes[p as usize], &root).unwrap();
            }
        }
        for m in [0, 1.min(n), n / 2, n.saturating_sub(1), n] {
            let old = merkle_root(&hashes[..m as usize]);
            log.prove_consistency(m, n)
                .unwrap()
                .verify(&old, &root)
                .unwrap();
        }
    }
    assert!(matches!(
        log.merkle_root(701),
        Err(Error::Proof(ProofError::OutOfRange { .. }))
    ));
    assert!(matches!(
        log.prove_inclusion(Position(700), 700),
        Err(Error::Proof(ProofError::OutOfRange { .. }))
    ));
    assert!(matches!(
        log.prove_consistency(10, 5),
        Err(Error::Proof(ProofError::SizesOutOfOrder { .. }))
    ));
}

#[test]
fn checkpoints_are_written_on_seal_on_demand_and_on_close_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let key = std::fs::metadata(dir.path().join("tally.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
    fill(&log, 400);
    log.wait_sealed().unwrap();
    // Seals ask the checkpoint thread for a checkpoint.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log.checkpoints().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!log.checkpoints().is_empty(), "a seal wrote a checkpoint");
    let cp = log.checkpoint().unwrap();
    assert_eq!(cp.statement.tree_size, 400);
    let hashes = record_hashes(&log);
    assert_eq!(cp.statement.root, merkle_root(&hashes));
    assert_eq!(cp.statement.chain_head, hashes[399]);
    assert_eq!(Some(cp.public_key), log.public_key());
    cp.verify(&[cp.public_key]).unwrap();
    let ids: Vec<u64> = log.checkpoints().iter().map(|c| c.statement.id).collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    fill(&log, 10);
    let public = log.public_key().unwrap();
    log.close().unwrap();

    let log = Log::open(dir.path(), opts()).unwrap();
    let last = *log.checkpoints().last().unwrap();
    assert_eq!(last.statement.tree_size, 410, "close wrote a checkpoint");
    assert!(!log.recovery_report().merkle_tree_rebuilt);
    assert_eq!(log.public_key(), Some(public), "the key is kept");
    let report = log
        .verify_with(
            &VerifyOptions {
                trusted_keys: vec![public],
                ..VerifyOptions::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(report.checkpoints, log.checkpoints().len() as u64);
    // Another key is not trusted.
    let err = log
        .verify_with(
            &VerifyOptions {
                trusted_keys: vec![[7; 32]],
                ..VerifyOptions::default()
            },
            &mut |_| {},
        )
        .unwrap_err();
    assert!(err.to_string().contains("tally.checkpoints"), "{err}");
}

#[test]
fn periodic_checkpoints_follow_the_record_count() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            segment_bytes: 4 << 20,
            checkpoint_every_records: Some(50),
            ..opts()
        },
    )
    .unwrap();
    fill(&log, 120);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while log.checkpoints().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cps = log.checkpoints();
    assert!(!cps.is_empty());
    assert!(cps.iter().all(|c| c.statement.tree_size >= 50));
}

fn corrupt_tree_file(dir: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("merkle.tree"))
        .unwrap();
    f.write_all_at(&[0xAB; 32], 64).unwrap();
}

#[test]
fn a_damaged_node_file_is_noticed_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 300);
    log.close().unwrap();
    // The first chunk's root is not on the path to the checkpoint's root, but it is the
    // sibling in every proof of a record of the second chunk.
    corrupt_tree_file(dir.path());
    let log = Log::open(dir.path(), opts()).unwrap();
    let hashes = record_hashes(&log);
    let root = log.merkle_root(300).unwrap();
    assert_eq!(root, merkle_root(&hashes));
    let proof = log.prove_inclusion(Position(20), 300).unwrap();
    proof.verify(&hashes[20], &root).unwrap();
    // A damaged peak is noticed on open, against the checkpoint.
    log.close().unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("merkle.tree"))
        .unwrap();
    // The root of the first 256 records (16 chunks) is a peak of 300.
    let peak = tally_engine::format::tree::node_index(4, 0);
    f.write_all_at(&[0xAB; 32], 64 + peak * 32).unwrap();
    drop(f);
    let log = Log::open(dir.path(), opts()).unwrap();
    assert!(log.recovery_report().merkle_tree_rebuilt);
    assert_eq!(log.merkle_root(300).unwrap(), merkle_root(&hashes));
    log.verify().unwrap();
    drop(log);
    // A read-only open does the same in memory.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("merkle.tree"))
        .unwrap();
    f.write_all_at(&[0xAB; 32], 64 + peak * 32).unwrap();
    let ro = read_only(dir.path());
    assert!(ro.recovery_report().merkle_tree_rebuilt);
    assert_eq!(ro.merkle_root(300).unwrap(), merkle_root(&hashes));
    assert!(matches!(ro.checkpoint(), Err(Error::ReadOnly)));
}

#[test]
fn after_a_crash_the_tree_is_recomputed_past_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 150);
    log.checkpoint().unwrap();
    fill(&log, 150);
    log.sync().unwrap();
    log.crash();
    let log = Log::open(dir.path(), opts()).unwrap();
    let hashes = record_hashes(&log);
    assert_eq!(hashes.len(), 300);
    assert_eq!(log.merkle_root(300).unwrap(), merkle_root(&hashes));
    assert_eq!(log.merkle_root(150).unwrap(), merkle_root(&hashes[..150]));
    log.verify().unwrap();
}

#[test]
fn removed_records_fail_verification_against_an_earlier_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 300);
    log.checkpoint().unwrap();
    let last = log.segments().pop().unwrap().path;
    log.close().unwrap();
    // Drop the newest segment: the log now ends earlier than the checkpoint says.
    std::fs::remove_file(&last).unwrap();
    let _ = std::fs::remove_file(last.with_extension("idx"));
    let _ = std::fs::remove_file(dir.path().join("streams.snap"));
    let ro = read_only(dir.path());
    assert!(ro.next_position().0 < 300);
    let err = ro.verify().unwrap_err();
    assert!(err.to_string().contains("records were removed"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn proofs_for_random_sizes_verify_and_altered_ones_fail(
        n in 1u64..400,
        picks in proptest::collection::vec((0u64..1000, 0u64..1000), 4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), opts()).unwrap();
        fill(&log, n as usize);
        let hashes = record_hashes(&log);
        for (a, b) in picks {
            let size = 1 + b % n;
            let p = a % size;
            let root = log.merkle_root(size).unwrap();
            let proof = log.prove_inclusion(Position(p), size).unwrap();
            proof.verify(&hashes[p as usize], &root).unwrap();
            let mut bad = proof.clone();
            if let Some(h) = bad.path.first_mut() {
                h[0] ^= 1;
                prop_assert!(bad.verify(&hashes[p as usize], &root).is_err());
            }
            // The same path presented as a proof for a larger tree fails against its root.
            if size < n {
                let mut wrong_size = proof.clone();
                wrong_size.tree_size += 1;
                let bigger = log.merkle_root(size + 1).unwrap();
                prop_assert!(wrong_size.verify(&hashes[p as usize], &bigger).is_err());
            }
            let mut wrong_root = root;
            wrong_root[5] ^= 1;
            prop_assert!(proof.verify(&hashes[p as usize], &wrong_root).is_err());

            let m = a % (size + 1);
            let old = log.merkle_root(m).unwrap();
            let c = log.prove_consistency(m, size).unwrap();
            c.verify(&old, &root).unwrap();
            if m > 0 && m < size {
                let mut bad = c.clone();
                bad.path[0][0] ^= 1;
                prop_assert!(bad.verify(&old, &root).is_err());
                prop_assert!(c.verify(&old, &wrong_root).is_err());
                let mut wrong = c.clone();
                wrong.old_size = if m > 1 { m - 1 } else { m + 1 };
                let ok = wrong.old_size < size && wrong.verify(&old, &root).is_ok();
                prop_assert!(!ok);
            }
        }
    }
}

#[test]
fn an_interrupted_checkpoint_write_is_cut_off_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 50);
    log.checkpoint().unwrap();
    // The key's ledger is written only after an entry is durable, so a torn second entry
    // leaves it naming the first.
    let ledger = dir.path().join("tally.key.ledger");
    let after_first = std::fs::read(&ledger).unwrap();
    log.checkpoint().unwrap();
    log.crash();
    std::fs::write(&ledger, after_first).unwrap();
    let path = dir.path().join("tally.checkpoints");
    let len = std::fs::metadata(&path).unwrap().len();
    // The second entry's write was torn: only part of it reached the disk.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(
        log.recovery_report().checkpoint_tail_truncated,
        Some(len / 2)
    );
    assert_eq!(log.checkpoints().len(), 1);
    log.verify().unwrap();
}

/// Two checkpoints, and the log crashed; with `ledger_at_first`, the key's ledger is set
/// back to the first (as if the crash came between the second entry's sync and the ledger's
/// update: the second was never acknowledged).
fn two_checkpoints(dir: &Path, ledger_at_first: bool) -> (std::path::PathBuf, u64) {
    let log = Log::open(dir, opts()).unwrap();
    fill(&log, 50);
    log.checkpoint().unwrap();
    let ledger = dir.join("tally.key.ledger");
    let after_first = std::fs::read(&ledger).unwrap();
    fill(&log, 10);
    log.checkpoint().unwrap();
    log.crash();
    if ledger_at_first {
        std::fs::write(&ledger, after_first).unwrap();
    }
    let path = dir.join("tally.checkpoints");
    let len = std::fs::metadata(&path).unwrap().len();
    (path, len)
}

/// A changed byte in the middle of the second entry, which keeps its length.
fn damage_second_entry(path: &Path, len: u64) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[(len / 2 + len / 4) as usize] ^= 0x40;
    std::fs::write(path, &bytes).unwrap();
    bytes
}

/// A whole-length entry that does not decode is what a failed write leaves too (an EIO on
/// its sync, then a short write of the retry over it): if the ledger never recorded it, it
/// was never acknowledged, and is cut off.
#[test]
fn a_damaged_last_checkpoint_the_ledger_never_recorded_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (path, len) = two_checkpoints(dir.path(), true);
    damage_second_entry(&path, len);
    let log = Log::open(dir.path(), opts()).unwrap();
    assert_eq!(
        log.recovery_report().checkpoint_tail_truncated,
        Some(len / 2)
    );
    assert_eq!(log.checkpoints().len(), 1);
    log.verify().unwrap();
}

#[test]
fn a_damaged_last_checkpoint_the_ledger_recorded_is_refused_not_cut_off_and_its_id_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, len) = two_checkpoints(dir.path(), false);
    let bytes = damage_second_entry(&path, len);
    let err = Log::open(dir.path(), opts()).unwrap_err();
    assert!(
        matches!(err, tally_engine::Error::Corrupt { .. })
            && err.to_string().contains("ledger says it was signed"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was cut off");
}

fn verify_threads(log: &Log, threads: usize) -> tally_engine::Result<tally_engine::VerifyReport> {
    log.verify_with(
        &VerifyOptions {
            threads,
            ..VerifyOptions::default()
        },
        &mut |_| {},
    )
}

fn read_only(dir: &Path) -> Log {
    Log::open(
        dir,
        Options {
            recovery: RecoveryMode::ReadOnly,
            ..opts()
        },
    )
    .unwrap()
}

#[test]
fn parallel_verification_agrees_with_one_thread_and_checks_checkpoints_inside_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    // Checkpoints at sizes that fall inside segments, at their ends, and twice at one size.
    for n in [111, 3, 270, 192, 0, 600, 9] {
        fill(&log, n);
        log.checkpoint().unwrap();
    }
    log.checkpoint().unwrap();
    let segments = log.segments();
    assert!(segments.len() >= 4, "{} segments", segments.len());
    let one = verify_threads(&log, 1).unwrap();
    assert_eq!(one.records, 1185);
    assert_eq!(one.checkpoints, log.checkpoints().len() as u64);
    for threads in [2, 3, 8, 0] {
        let many = verify_threads(&log, threads).unwrap();
        assert_eq!(
            (many.segments, many.records, many.bytes, many.checkpoints),
            (one.segments, one.records, one.bytes, one.checkpoints),
            "{threads} threads"
        );
        assert_eq!(many.last_chain_hash, one.last_chain_hash);
    }
    // From any segment on, with the earlier checkpoints checked against the node file.
    for s in &segments {
        let report = log
            .verify_with(
                &VerifyOptions {
                    from_segment: Some(s.seq),
                    threads: 2,
                    ..VerifyOptions::default()
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(report.first_position, s.base_position);
        assert_eq!(report.checkpoints, one.checkpoints, "from {:?}", s.seq);
    }
    log.close().unwrap();

    // A checkpoint validly signed with the log's key but over a root the records do not
    // have, ending inside the first segment: caught, by any number of threads.
    let key = std::fs::read_to_string(dir.path().join(tally_engine::KEY_FILE)).unwrap();
    let key = tally_engine::format::checkpoint::decode_secret_key(&key).unwrap();
    let ro = read_only(dir.path());
    let first = ro.checkpoints()[0];
    assert!(first.statement.tree_size < segments[1].base_position.0);
    let forged = tally_engine::format::checkpoint::SignedCheckpoint::sign(
        tally_engine::format::checkpoint::Statement {
            root: [9; 32],
            ..first.statement
        },
        &key,
    );
    let inside = first.statement.tree_size;
    drop(ro);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(tally_engine::CHECKPOINTS_FILE))
        .unwrap();
    file.write_all_at(&forged.encode_entry(), 0).unwrap();
    drop(file);
    let ro = read_only(dir.path());
    for threads in [1, 2] {
        let err = verify_threads(&ro, threads).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("Merkle root") && text.contains(&format!("first {inside} records")),
            "{threads} threads: {text}"
        );
    }
}

#[test]
fn parallel_verification_reports_the_first_damage_in_log_order() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 2000);
    log.close().unwrap();
    let segments = read_only(dir.path()).segments();
    assert!(segments.len() >= 5 && segments[3].sealed);
    // Damage one payload byte in the second and the fourth segment.
    for s in [&segments[1], &segments[3]] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&s.path)
            .unwrap();
        let at = 4096 + 88 + 60;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }
    let ro = read_only(dir.path());
    for threads in [1, 2, 4] {
        match verify_threads(&ro, threads).unwrap_err() {
            Error::Corrupt { file, position, .. } => {
                assert_eq!(file, segments[1].path, "{threads} threads");
                assert_eq!(position, Some(segments[1].base_position.0));
            }
            e => panic!("{threads} threads: {e}"),
        }
    }
}

#[test]
fn a_node_file_of_another_chunk_level_is_recomputed() {
    use tally_engine::format::tree::{TH_CHUNK_LEVEL, TH_CRC, TREE_HEADER_LEN};
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 300);
    log.checkpoint().unwrap();
    let root = log.merkle_root(300).unwrap();
    log.close().unwrap();
    // Rewrite the header as the first node files had it: chunk level 6, valid CRC.
    let path = dir.path().join("merkle.tree");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut header = [0u8; TREE_HEADER_LEN];
    f.read_exact_at(&mut header, 0).unwrap();
    header[TH_CHUNK_LEVEL..TH_CHUNK_LEVEL + 2].copy_from_slice(&6u16.to_le_bytes());
    let crc = crc32fast::hash(&header[..TH_CRC]);
    header[TH_CRC..].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&header, 0).unwrap();
    drop(f);

    let ro = read_only(dir.path());
    assert_eq!(ro.merkle_root(300).unwrap(), root);
    drop(ro);
    let log = Log::open(dir.path(), opts()).unwrap();
    assert!(log.recovery_report().merkle_tree_rebuilt);
    assert_eq!(log.merkle_root(300).unwrap(), root);
    let hashes = record_hashes(&log);
    let proof = log.prove_inclusion(Position(123), 300).unwrap();
    proof.verify(&hashes[123], &root).unwrap();
    let mut header = [0u8; TREE_HEADER_LEN];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut header, 0)
        .unwrap();
    assert_eq!(
        header[TH_CHUNK_LEVEL], 4,
        "a writable open rewrote the header"
    );
}

#[test]
fn records_a_checkpoint_covers_count_as_acknowledged_in_recovery() {
    use tally_engine::format::record::RecordHeader;
    // A damaged record that only a checkpoint says was acknowledged: the last one it
    // covers, with no later record whose header claims durability.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        dir.path(),
        Options {
            segment_bytes: 4 << 20,
            ..opts()
        },
    )
    .unwrap();
    fill(&log, 100);
    assert_eq!(log.checkpoint().unwrap().statement.tree_size, 100);
    let seg = log.segments().pop().unwrap().path;
    log.crash();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    let mut offset = 4096u64;
    let layout = tally_engine::format::record::Layout::V2;
    for _ in 0..99 {
        let mut h = [0u8; 88];
        f.read_exact_at(&mut h, offset).unwrap();
        offset += RecordHeader::decode_in(&h, layout).unwrap().record_len();
    }
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset + 90).unwrap();
    f.write_all_at(&[b[0] ^ 1], offset + 90).unwrap();
    drop(f);
    let err = Log::open(dir.path(), opts()).unwrap_err();
    assert!(
        err.to_string().contains("checkpoint 1 covers 100 records"),
        "{err}"
    );
    let log = Log::open(
        dir.path(),
        Options {
            recovery: RecoveryMode::TruncateDamagedTail,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(log.next_position(), Position(99));
    let t = &log.recovery_report().truncations;
    assert!(t.len() == 1 && t[0].acknowledged_data_lost, "{t:?}");
    drop(log);

    // Whole segments gone: the log ends cleanly, but before the checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 600);
    log.close().unwrap();
    let last = read_only(dir.path()).segments().pop().unwrap();
    std::fs::remove_file(&last.path).unwrap();
    let _ = std::fs::remove_file(last.path.with_extension("idx"));
    let err = Log::open(dir.path(), opts()).unwrap_err();
    assert!(
        err.to_string()
            .contains("covers 600 records, but the segments end"),
        "{err}"
    );
    let ro = read_only(dir.path());
    assert!(
        ro.verify()
            .unwrap_err()
            .to_string()
            .contains("records were removed")
    );
}

#[test]
fn stream_head_proofs_match_every_signed_checkpoint_and_the_records() {
    use tally_engine::format::heads::stream_key;
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    let mut cps = Vec::new();
    for round in 0..6 {
        fill(&log, 37 + round * 11);
        // A stream that starts late, so that older trees do not hold it.
        if round == 3 {
            log.append(
                "late",
                ExpectedVersion::NoStream,
                &[EventData::new("E", vec![1])],
            )
            .unwrap();
        }
        cps.push(log.checkpoint().unwrap());
    }
    fill(&log, 50);
    let events = log
        .read_all(Position(0), usize::MAX, tally_engine::Direction::Forward)
        .unwrap();
    for cp in &cps {
        let (count, root) = cp.statement.streams.expect("a version 2 statement");
        let size = cp.statement.tree_size;
        for stream in ["s-0", "s-3", "late", "never"] {
            let want = events
                .iter()
                .rfind(|e| e.position.0 < size && e.stream() == stream)
                .map(|e| (e.version, e.position));
            let got = log.prove_stream_head(stream, size).unwrap();
            assert_eq!(
                got.as_ref().map(|h| (h.version, h.position)),
                want,
                "{stream} at {size}"
            );
            if let Some(h) = got {
                assert_eq!((h.stream_count, h.streams_root), (count, root), "at {size}");
                assert!(h.proof.verify(
                    &root,
                    &stream_key(stream.as_bytes()),
                    h.version,
                    h.position.0
                ));
            }
        }
    }
}

#[test]
fn verify_from_a_segment_checks_a_stream_heads_map_that_continues_the_trusted_records() {
    // A checkpoint one record into a segment: the heads map it signs holds every stream of
    // the earlier, trusted segments; verify from that segment must start from them.
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), opts()).unwrap();
    fill(&log, 50);
    let segments = log.segments().len();
    let mut i = 0u64;
    while log.segments().len() == segments {
        let e = EventData::new("E", vec![7; 200]);
        log.append(&format!("t-{}", i % 9), ExpectedVersion::Any, &[e])
            .unwrap();
        i += 1;
    }
    log.append(
        "late",
        ExpectedVersion::Any,
        &[EventData::new("E", vec![1])],
    )
    .unwrap();
    let cp = log.checkpoint().unwrap();
    log.wait_sealed().unwrap();
    let newest = log.segments().last().unwrap().clone();
    assert_eq!(newest.base_position.0 + 2, cp.statement.tree_size);
    assert!(cp.statement.streams.unwrap().0 > 10);
    for threads in [1, 2] {
        let report = log
            .verify_with(
                &VerifyOptions {
                    from_segment: Some(newest.seq),
                    threads,
                    ..VerifyOptions::default()
                },
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(
            report.newest_checkpoint.map(|c| c.1),
            Some(cp.statement.tree_size)
        );
    }
    log.close().unwrap();
}
