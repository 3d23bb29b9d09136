//! The attacker suite: what someone with write access to a data directory, the public
//! format documents and no signing key can do, and proof that verification catches each
//! attack while the same check passes on the honest log.
//!
//! Method: build a real log (small segments, several streams, checkpoints signed by a key
//! kept outside the directory), then forge it with `tally_tests::forge`: the records after
//! a cut are written by the engine itself under a key the attacker made, so every
//! checksum, chain link, footer, sidecar, snapshot and node file is consistent. Each attack
//! is also run beside a process holding `tally.lock`, the normal state beside tallyd, where
//! a read-only verify used to drop checkpoints it could not reach and pass.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use tally_engine::{
    Direction, Error, EventData, ExpectedVersion, Log, Options, RecoveryMode, VerifyOptions,
    VerifyReport,
};
use tally_tests::forge;

/// A log of `n` events over 7 streams in 64 KiB segments, with checkpoints signed by a key
/// outside the directory every 300 events and after the last.
struct Honest {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key: PathBuf,
    public_key: [u8; 32],
}

fn event(i: u64) -> EventData {
    EventData::json(
        "AMEND",
        format!(r#"{{"qty":"{i}","pad":"{}"}}"#, "x".repeat(100)),
    )
    .actor("alice")
    .correlation_id(format!("corr-{}", i % 5))
}

fn stream_of(i: u64) -> String {
    format!("trade-{}", i % 7)
}

fn honest(n: u64) -> Honest {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let key = tmp.path().join("keys").join("log.key");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let public_key = tally_engine::create_signing_key(&key).unwrap();
    let log = Log::open(&dir, options(&key)).unwrap();
    for i in 0..n {
        log.append(&stream_of(i), ExpectedVersion::Any, &[event(i)])
            .unwrap();
        if i % 300 == 299 || i + 1 == n {
            log.checkpoint().unwrap();
        }
    }
    log.close().unwrap();
    Honest {
        _tmp: tmp,
        dir,
        key,
        public_key,
    }
}

fn options(key: &Path) -> Options {
    Options {
        segment_bytes: 64 * 1024,
        signing_key: Some(key.to_owned()),
        // Checkpoints only where the test writes them, so that their ids are known: every
        // 300 records and at the end (ids 1, 2, ... at 300, 600, ...).
        auto_checkpoints: false,
        ..Options::default()
    }
}

fn read_only(dir: &Path) -> Result<Log, Error> {
    Log::open(
        dir,
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
}

/// `tally verify --pubkey`: the engine's verify with the log's key as the only trusted one.
fn verify(dir: &Path, public_key: [u8; 32]) -> Result<VerifyReport, Error> {
    read_only(dir)?.verify_with(
        &VerifyOptions {
            trusted_keys: vec![public_key],
            ..VerifyOptions::default()
        },
        &mut |_| {},
    )
}

fn failure(r: Result<VerifyReport, Error>) -> String {
    match r {
        Ok(report) => panic!("verification passed: {report:?}"),
        Err(e) => format!("{e}"),
    }
}

#[test]
fn honest_log_verifies_with_every_derived_file_checked() {
    let h = honest(2000);
    let r = verify(&h.dir, h.public_key).unwrap();
    assert_eq!(r.records, 2000);
    assert!(r.segments > 3, "{r:?}");
    assert!(r.stream_links > 0, "{r:?}");
    assert!(r.snapshot_checked, "{r:?}");
    assert!(r.tree_nodes > 2000 / 16, "{r:?}");
    assert!(r.sidecars_missing.is_empty());
    assert_eq!(r.newest_checkpoint.map(|c| c.1), Some(2000));
    // And beside a process holding the lock.
    let _lock = forge::hold_lock(&h.dir);
    verify(&h.dir, h.public_key).unwrap();
}

#[test]
fn rollback_with_every_checkpoint_left_fails_beside_a_live_writer() {
    let h = honest(2000);
    forge::truncate_at(&h.dir, 1000);
    let _lock = forge::hold_lock(&h.dir);
    let log = read_only(&h.dir).unwrap();
    assert_eq!(log.next_position().0, 1000);
    // Nothing is hidden from the list either.
    let sizes: Vec<u64> = log
        .checkpoints()
        .iter()
        .map(|c| c.statement.tree_size)
        .collect();
    assert_eq!(sizes, forge::checkpoint_sizes(&h.dir));
    assert_eq!(sizes.last(), Some(&2000));
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(msg.contains("records were removed"), "{msg}");
}

#[test]
fn a_torn_last_checkpoint_beside_a_live_writer_is_damage_once_it_stays_torn() {
    let h = honest(700);
    let path = h.dir.join(tally_engine::CHECKPOINTS_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let _lock = forge::hold_lock(&h.dir);
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(msg.contains("damaged checkpoint"), "{msg}");
}

/// Rewrites the trailing CRC-32 of a sidecar (`.idx`, `.adx`, `streams.snap`) after an edit.
fn fix_trailing_crc(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let crc = crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&crc.to_le_bytes());
}

fn crc32(b: &[u8]) -> u32 {
    // IEEE CRC-32, bitwise (the attacker needs no library for it).
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
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

/// The newest sealed segment's sidecar, with one stream's `prev_segment` link set to
/// `link` (`u64::MAX`: "no earlier segment"). Returns the stream's name.
fn edit_index_link(dir: &Path, link: impl Fn(u64) -> u64) -> String {
    let segs = forge::segments(dir);
    let (_, h) = &segs[segs.len() - 2];
    let path = dir.join(h.seq.index_file_name());
    let mut b = std::fs::read(&path).unwrap();
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let record_count = u64_at(&b, 48) as usize;
    let stream_count = u32_at(&b, 96) as usize;
    let sparse_count = u32_at(&b, 100) as usize;
    let names_at =
        128 + stream_count * 72 + record_count * 16 + sparse_count * 8 + record_count * 16;
    let entry = (0..stream_count)
        .map(|i| 128 + i * 72)
        .find(|&e| u64_at(&b, e + 48) != u64::MAX)
        .expect("a stream with an earlier segment");
    let old = u64_at(&b, entry + 48);
    b[entry + 48..entry + 56].copy_from_slice(&link(old).to_le_bytes());
    let (name_at, name_len) = (
        u32_at(&b, entry + 64) as usize,
        u16::from_le_bytes([b[entry + 68], b[entry + 69]]) as usize,
    );
    let name =
        String::from_utf8(b[names_at + name_at..names_at + name_at + name_len].to_vec()).unwrap();
    fix_trailing_crc(&mut b);
    std::fs::write(&path, &b).unwrap();
    name
}

#[test]
fn index_entries_swapped_between_two_streams_are_found_by_verify() {
    // Two streams' entries for the same version trade their record: offsets, positions and
    // versions all still name real records, the CRC is right, and every record is named
    // once; only the stream each record belongs to differs.
    let h = honest(2000);
    let segs = forge::segments(&h.dir);
    let (_, seg) = &segs[segs.len() - 2];
    let path = h.dir.join(seg.seq.index_file_name());
    let mut b = std::fs::read(&path).unwrap();
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let stream_count = u32_at(&b, 96) as usize;
    let entries_at = 128 + stream_count * 72;
    // (first version, entry offsets) of the first two streams.
    let run = |i: usize| {
        let e = 128 + i * 72;
        let (first, start, count) = (u64_at(&b, e + 8), u32_at(&b, e + 56), u32_at(&b, e + 60));
        (first, entries_at + start as usize * 16, count as u64)
    };
    let ((fa, a_at, na), (fb, b_at, nb)) = (run(0), run(1));
    let v = fa.max(fb);
    assert!(v < fa + na && v < fb + nb, "the two runs share version {v}");
    let (ea, eb) = (
        a_at + ((v - fa) * 16) as usize,
        b_at + ((v - fb) * 16) as usize,
    );
    assert_eq!((u64_at(&b, ea), u64_at(&b, eb)), (v, v));
    let (pa, pb) = (b[ea + 8..ea + 16].to_vec(), b[eb + 8..eb + 16].to_vec());
    b[ea + 8..ea + 16].copy_from_slice(&pb);
    b[eb + 8..eb + 16].copy_from_slice(&pa);
    fix_trailing_crc(&mut b);
    std::fs::write(&path, &b).unwrap();
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(
        msg.contains(&format!("version {v} does not match its record"))
            && msg.contains(&seg.seq.index_file_name()),
        "{msg}"
    );
}

fn read_whole_stream(dir: &Path, stream: &str) -> Result<Vec<tally_engine::RecordedEvent>, Error> {
    read_only(dir)?.read_stream(stream, 0, usize::MAX, Direction::Forward)
}

#[test]
fn an_index_link_that_drops_a_streams_history_is_found_by_reads_and_verify() {
    let h = honest(2000);
    let name = edit_index_link(&h.dir, |_| u64::MAX);
    // A read never returns a silently shortened stream...
    let err = read_whole_stream(&h.dir, &name).unwrap_err();
    assert!(format!("{err}").contains("starts at version"), "{err}");
    let err = read_only(&h.dir)
        .unwrap()
        .read_stream(&name, u64::MAX, 5000, Direction::Backward)
        .unwrap_err();
    assert!(format!("{err}").contains(".idx"), "{err}");
    // ...and verify, by default, names the sidecar.
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(msg.contains(".idx") && msg.contains(&name), "{msg}");
    let _lock = forge::hold_lock(&h.dir);
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(msg.contains("links stream"), "{msg}");
}

#[test]
fn index_links_that_skip_a_segment_or_loop_are_errors_not_short_or_endless_reads() {
    let h = honest(3000);
    // Point the link at a later segment: a cycle.
    let segs = forge::segments(&h.dir);
    let newest_sealed = segs[segs.len() - 2].1.seq.0;
    let name = edit_index_link(&h.dir, |_| newest_sealed);
    let err = read_whole_stream(&h.dir, &name).unwrap_err();
    assert!(format!("{err}").contains("cycle"), "{err}");
    assert!(failure(verify(&h.dir, h.public_key)).contains("links stream"));

    let h = honest(3000);
    // Point it one segment further back than the truth: the versions between go missing.
    let name = edit_index_link(&h.dir, |old| old.saturating_sub(1));
    let err = read_whole_stream(&h.dir, &name).unwrap_err();
    assert!(format!("{err}").contains("versions are missing"), "{err}");
    assert!(failure(verify(&h.dir, h.public_key)).contains("links stream"));
}

#[test]
fn a_stream_snapshot_that_lies_is_found_by_verify() {
    let h = honest(2000);
    let path = h.dir.join("streams.snap");
    let mut b = std::fs::read(&path).unwrap();
    // The first entry's last_version (entry at 64, field at 16).
    let v = u64::from_le_bytes(b[80..88].try_into().unwrap());
    b[80..88].copy_from_slice(&(v - 10).to_le_bytes());
    fix_trailing_crc(&mut b);
    std::fs::write(&path, &b).unwrap();
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(
        msg.contains("streams.snap") && msg.contains("stream snapshot says"),
        "{msg}"
    );

    // Leaving a stream out of it hides the stream from reads just the same.
    let h = honest(2000);
    let mut b = std::fs::read(path_of(&h.dir)).unwrap();
    let count = u64::from_le_bytes(b[56..64].try_into().unwrap());
    b[56..64].copy_from_slice(&(count - 1).to_le_bytes());
    let first_len = 56 + u16::from_le_bytes([b[64 + 40], b[64 + 41]]) as usize;
    b.drain(64..64 + first_len);
    fix_trailing_crc(&mut b);
    std::fs::write(path_of(&h.dir), &b).unwrap();
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(msg.contains("stream snapshot"), "{msg}");
}

fn path_of(dir: &Path) -> PathBuf {
    dir.join("streams.snap")
}

#[test]
fn a_damaged_merkle_node_is_found_by_verify() {
    let h = honest(2000);
    let path = h.dir.join(tally_engine::TREE_FILE);
    let mut b = std::fs::read(&path).unwrap();
    // Node 5 (of the first 64 records): not on the path to the latest checkpoint's root.
    b[64 + 5 * 32] ^= 0x40;
    std::fs::write(&path, &b).unwrap();
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(
        msg.contains("merkle.tree") && msg.contains("node 5"),
        "{msg}"
    );
}

#[test]
fn a_missing_sidecar_is_checked_from_the_records_not_an_error() {
    let h = honest(2000);
    let segs = forge::segments(&h.dir);
    let seq = segs[1].1.seq;
    std::fs::remove_file(h.dir.join(seq.index_file_name())).unwrap();
    let r = verify(&h.dir, h.public_key).unwrap();
    assert_eq!(r.sidecars_missing, vec![seq]);
    assert_eq!(r.records, 2000);
}

/// Removes checkpoints after `keep_size` records, cuts the log there and grows a forged
/// history after it: every file consistent, no signature by the log's key.
fn rewrite_after(h: &Honest, keep_size: u64, forged: u64) {
    let keep = forge::checkpoint_sizes(&h.dir)
        .iter()
        .filter(|&&s| s <= keep_size)
        .count();
    forge::keep_checkpoints(&h.dir, keep);
    forge::truncate_at(&h.dir, keep_size);
    let events: Vec<(String, EventData)> = (0..forged)
        .map(|i| (stream_of(i), event(1_000_000 + i).actor("mallory")))
        .collect();
    let refs: Vec<(&str, EventData)> = events
        .iter()
        .map(|(s, e)| (s.as_str(), e.clone()))
        .collect();
    let attacker_key = h.dir.parent().unwrap().join("attacker.key");
    forge::regrow(&h.dir, &attacker_key, &refs);
}

#[test]
fn laundering_through_the_next_honest_checkpoint_is_refused_by_the_writer() {
    let h = honest(2000);
    rewrite_after(&h, 900, 1500);
    // The operator's routine open (tallyd starting, `tally checkpoint`, `extract`,
    // `backup`) would sign the forged history with the real key: the key's ledger refuses.
    let err = Log::open(&h.dir, options(&h.key)).unwrap_err();
    let msg = format!("{err}");
    assert!(
        msg.contains("checkpoints were removed") && msg.contains("ledger"),
        "{msg}"
    );
    // Nothing was signed.
    assert_eq!(forge::checkpoint_sizes(&h.dir).last(), Some(&900));
    // Replacing the newest checkpoint entry instead (same id, other content) is refused too.
    let h = honest(2000);
    let path = h.dir.join(tally_engine::CHECKPOINTS_FILE);
    let bytes = std::fs::read(&path).unwrap();
    let e = forge::checkpoint_entry_len(&h.dir);
    let n = bytes.len() / e;
    // Swap in the entry before it, renumbered: its signature no longer verifies, but the
    // writer refuses before anything is signed.
    let mut last = bytes[(n - 2) * e..(n - 1) * e].to_vec();
    last[32..40].copy_from_slice(&(n as u64).to_le_bytes());
    let crc = crc32(&last[..e - 8]);
    last[e - 8..e - 4].copy_from_slice(&crc.to_le_bytes());
    let mut forged = bytes[..(n - 1) * e].to_vec();
    forged.extend_from_slice(&last);
    std::fs::write(&path, &forged).unwrap();
    let msg = format!("{}", Log::open(&h.dir, options(&h.key)).unwrap_err());
    assert!(
        msg.contains("differs from the one the signing key signed"),
        "{msg}"
    );
}

#[test]
fn a_writer_refuses_to_sign_over_records_that_differ_from_its_last_checkpoint() {
    let h = honest(2000);
    let cps = h.dir.join(tally_engine::CHECKPOINTS_FILE);
    let kept_list = std::fs::read(&cps).unwrap();
    let signed = forge::checkpoint_sizes(&h.dir);
    // History after 900 rewritten and grown past the last checkpoint, then every
    // checkpoint put back, so that the key's ledger sees nothing removed, and the node file
    // deleted, so that open rebuilds it from the forged records.
    rewrite_after(&h, 900, 1500);
    std::fs::write(&cps, &kept_list).unwrap();
    std::fs::remove_file(h.dir.join(tally_engine::TREE_FILE)).unwrap();
    // The operator's next checkpoint (`tally checkpoint`, a seal, a close) would sign the
    // forged records with the real key: the writer refuses, and nothing is signed.
    let msg = match Log::open(&h.dir, options(&h.key)) {
        Err(e) => format!("{e}"),
        Ok(log) => format!("{}", log.checkpoint().unwrap_err()),
    };
    assert!(
        msg.contains("no longer match checkpoint") && msg.contains("nothing more is signed"),
        "{msg}"
    );
    assert_eq!(forge::checkpoint_sizes(&h.dir), signed);
}

// ---------------------------------------------------------------------------------------
// Kept checkpoints: an auditor's copy of a checkpoint, outside the directory.

use tally_engine::format::checkpoint::SignedCheckpoint;
use tally_engine::format::note::{Note, checkpoint_from_note};
use tally_engine::witness::{Observation, Witness, WitnessError};

/// What `tally checkpoint DIR --export` prints for checkpoint `id`, read back as
/// `tally verify --trusted` reads it.
fn kept(h: &Honest, id: u64) -> (PathBuf, SignedCheckpoint) {
    let note = read_only(&h.dir)
        .unwrap()
        .checkpoint_note(Some(id))
        .unwrap()
        .unwrap()
        .encode();
    let path = h.dir.parent().unwrap().join(format!("kept-{id}.note"));
    std::fs::write(&path, &note).unwrap();
    let cp = checkpoint_from_note(&Note::parse(&note).unwrap(), &[h.public_key]).unwrap();
    (path, cp)
}

fn verify_kept(h: &Honest, kept: &[(PathBuf, SignedCheckpoint)]) -> Result<VerifyReport, Error> {
    read_only(&h.dir)?.verify_with(
        &VerifyOptions {
            trusted_keys: vec![h.public_key],
            kept: kept.to_vec(),
            ..VerifyOptions::default()
        },
        &mut |_| {},
    )
}

#[test]
fn the_honest_log_extends_every_kept_checkpoint() {
    let h = honest(2000);
    let ks = [kept(&h, 1), kept(&h, 4), kept(&h, 7)];
    let r = verify_kept(&h, &ks).unwrap();
    assert_eq!(r.kept, vec![(1, 300), (4, 1200), (7, 2000)]);
    let _lock = forge::hold_lock(&h.dir);
    verify_kept(&h, &ks).unwrap();
}

#[test]
fn checkpoint_truncation_with_rewrite_fails_against_a_kept_checkpoint() {
    for beside_live_writer in [false, true] {
        let h = honest(2000);
        let k = kept(&h, 4); // tree size 1200
        rewrite_after(&h, 900, 1500);
        // Without the kept checkpoint the forgery is consistent: it verifies.
        let lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        let r = verify(&h.dir, h.public_key).unwrap();
        assert_eq!(r.newest_checkpoint.map(|c| c.1), Some(900));
        let msg = failure(verify_kept(&h, std::slice::from_ref(&k)));
        assert!(
            msg.contains("kept checkpoint 4") && msg.contains("is missing"),
            "{msg}"
        );
        drop(lock);
    }
}

#[test]
fn a_kept_checkpoint_fails_a_rollback_a_fork_and_a_rekeyed_log() {
    // Rollback: records removed, the checkpoints file cut to match, ids kept.
    let h = honest(2000);
    let k = kept(&h, 3); // 900
    let k7 = kept(&h, 7); // 2000
    forge::keep_checkpoints(&h.dir, 3);
    forge::truncate_at(&h.dir, 1500);
    verify_kept(&h, std::slice::from_ref(&k)).unwrap();
    let msg = failure(verify_kept(&h, std::slice::from_ref(&k7)));
    assert!(msg.contains("is missing"), "{msg}");
    // The same rollback with the checkpoints file left whole: the kept checkpoint names
    // the rollback itself.
    let h = honest(2000);
    let k7 = kept(&h, 7);
    forge::truncate_at(&h.dir, 1500);
    let msg = failure(verify_kept(&h, std::slice::from_ref(&k7)));
    assert!(
        msg.contains("fewer than the 2000 of kept checkpoint 7"),
        "{msg}"
    );

    // Fork: history rewritten after 900, then re-signed under the attacker's own key with
    // the ids of the deleted checkpoints (re-keying).
    let h = honest(2000);
    let k = kept(&h, 5); // 1500
    rewrite_after(&h, 900, 1500);
    let attacker_key = h.dir.parent().unwrap().join("attacker.key");
    let forged = Log::open(&h.dir, options(&attacker_key));
    // The attacker's key has no ledger for this log, so the writer signs.
    let forged = forged.unwrap();
    forged.checkpoint().unwrap();
    forged.checkpoint().unwrap();
    forged.close().unwrap();
    for beside_live_writer in [false, true] {
        let _lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        let msg = failure(verify_kept(&h, std::slice::from_ref(&k)));
        assert!(msg.contains("now names different content"), "{msg}");
        // And the log's own key does not sign the forged checkpoints.
        let msg = failure(verify(&h.dir, h.public_key));
        assert!(msg.contains("not among the trusted keys"), "{msg}");
    }
}

#[test]
fn deleting_whole_segments_is_found_by_verify_or_by_what_was_kept() {
    for beside_live_writer in [false, true] {
        // A segment deleted from the middle leaves a hole that verify names, with nothing
        // kept outside the directory.
        let h = honest(2000);
        let segs = forge::segments(&h.dir);
        assert!(segs.len() > 4, "{} segments", segs.len());
        let middle = segs[2].1.seq;
        std::fs::remove_file(&segs[2].0).unwrap();
        for ext in ["idx", "adx"] {
            let _ = std::fs::remove_file(h.dir.join(format!("{:020}.{ext}", middle.0)));
        }
        let lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        let msg = match read_only(&h.dir) {
            Err(e) => e.to_string(),
            Ok(log) => failure(log.verify_with(
                &VerifyOptions {
                    trusted_keys: vec![h.public_key],
                    ..VerifyOptions::default()
                },
                &mut |_| {},
            )),
        };
        assert!(
            msg.contains(&format!("segment {} is missing", middle.0)),
            "{msg}"
        );
        drop(lock);

        // The newest segments deleted whole, with the checkpoints that covered them: the
        // log is consistent again, and only a kept checkpoint or a witness knows.
        let h = honest(2000);
        let w = witness(&h);
        observe(&w, &h.dir).unwrap();
        let k = kept(&h, 7); // 2000
        let segs = forge::segments(&h.dir);
        let cut = segs[segs.len() - 3].1.base_position.0;
        let keep = forge::checkpoint_sizes(&h.dir)
            .iter()
            .filter(|&&s| s <= cut)
            .count();
        forge::keep_checkpoints(&h.dir, keep);
        forge::truncate_at(&h.dir, cut);
        let _ = std::fs::remove_file(h.dir.join(tally_engine::COSIGNATURES_FILE));
        let _lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        verify(&h.dir, h.public_key).unwrap();
        let msg = failure(verify_kept(&h, std::slice::from_ref(&k)));
        assert!(
            msg.contains("kept checkpoint 7") && msg.contains("is missing"),
            "{msg}"
        );
        let err = observe(&w, &h.dir).unwrap_err();
        assert!(matches!(err, WitnessError::Rollback(_)), "{err}");
        assert!(
            err.to_string()
                .contains("cosigned checkpoint 7 (tree size 2000"),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Witnesses.

fn witness(h: &Honest) -> Witness {
    let wdir = h.dir.parent().unwrap().join("witness");
    let w = if wdir.exists() {
        Witness::open(&wdir).unwrap()
    } else {
        Witness::init(&wdir, "witness.example/risk").unwrap()
    };
    let log_id = read_only(&h.dir).unwrap().log_id();
    w.register(&log_id, &[h.public_key]).unwrap();
    w
}

/// `tally witness observe WDIR --data DIR`.
fn observe(w: &Witness, dir: &Path) -> Result<Observation, WitnessError> {
    let log = read_only(dir).unwrap();
    let note = log.checkpoint_note(None).unwrap().unwrap();
    let obs = w.observe(&note, &mut |old, new| log.prove_consistency(old, new))?;
    let (Observation::Cosigned {
        checkpoint,
        cosignature,
        ..
    }
    | Observation::Unchanged {
        checkpoint,
        cosignature,
    }) = &obs;
    tally_engine::add_cosignature(dir, checkpoint, cosignature).unwrap();
    Ok(obs)
}

#[test]
fn a_flood_of_cosignatures_cannot_break_the_note_and_named_witnesses_keep_strangers_out() {
    use tally_engine::format::note::{Cosignature, checkpoint_body};
    let h = honest(300);
    let cp = {
        let log = read_only(&h.dir).unwrap();
        *log.checkpoints().last().unwrap()
    };
    let body = checkpoint_body(&cp.statement);
    let stranger = |i: u8| {
        let key = SigningKey::from_bytes(&[i; 32]);
        Cosignature::sign(&key, &format!("stranger-{i}"), 1_800_000_000, &body)
    };
    // Anyone who can reach the server can hand in cosignatures under keys of their own:
    // the log keeps 16 per checkpoint and refuses the rest, so its note still parses.
    let log = Log::open(&h.dir, options(&h.key)).unwrap();
    for i in 1..=16 {
        assert!(log.add_cosignature(cp.statement.id, &stranger(i)).unwrap());
    }
    let msg = format!(
        "{}",
        log.add_cosignature(cp.statement.id, &stranger(17))
            .unwrap_err()
    );
    assert!(msg.contains("16 cosignatures already"), "{msg}");
    let note = log.checkpoint_note(None).unwrap().unwrap();
    let reparsed = Note::parse(&note.encode()).unwrap();
    assert_eq!(reparsed.signatures.len(), note.signatures.len());
    log.close().unwrap();
    // A log that names its witnesses takes no one else's.
    let w = witness(&h);
    let mut opts = options(&h.key);
    opts.witness_keys = Some(vec![w.key().public_key]);
    let log = Log::open(&h.dir, opts).unwrap();
    let msg = format!(
        "{}",
        log.add_cosignature(cp.statement.id, &stranger(40))
            .unwrap_err()
    );
    assert!(msg.contains("not one of the witnesses"), "{msg}");
    log.close().unwrap();
}

fn verify_witnessed(h: &Honest, w: &Witness, min: usize) -> Result<VerifyReport, Error> {
    read_only(&h.dir)?.verify_with(
        &VerifyOptions {
            trusted_keys: vec![h.public_key],
            witnesses: vec![w.key()],
            min_witnesses: min,
            ..VerifyOptions::default()
        },
        &mut |_| {},
    )
}

fn grow(h: &Honest, from: u64, n: u64) {
    let log = Log::open(&h.dir, options(&h.key)).unwrap();
    for i in from..from + n {
        log.append(&stream_of(i), ExpectedVersion::Any, &[event(i)])
            .unwrap();
    }
    log.checkpoint().unwrap();
    log.close().unwrap();
}

#[test]
fn a_witness_cosigns_honest_growth_and_verify_counts_it() {
    let h = honest(600);
    let w = witness(&h);
    assert!(matches!(
        observe(&w, &h.dir),
        Ok(Observation::Cosigned { previous: None, .. })
    ));
    assert!(matches!(
        observe(&w, &h.dir),
        Ok(Observation::Unchanged { .. })
    ));
    grow(&h, 600, 700);
    match observe(&w, &h.dir).unwrap() {
        Observation::Cosigned {
            previous,
            checkpoint,
            ..
        } => {
            assert_eq!(previous.map(|p| p.tree_size), Some(600));
            assert_eq!(checkpoint.statement.tree_size, 1300);
        }
        o => panic!("{o:?}"),
    }
    let r = verify_witnessed(&h, &w, 1).unwrap();
    assert_eq!(r.newest_witnessed.map(|c| c.1), Some(1300));
    assert_eq!(r.cosignatures, 2);
    // The witness's own latest note is a kept checkpoint the log extends.
    let latest = w
        .latest(&read_only(&h.dir).unwrap().log_id())
        .unwrap()
        .unwrap();
    let cp = checkpoint_from_note(&latest, &[h.public_key]).unwrap();
    verify_kept(&h, &[(PathBuf::from("witness latest.note"), cp)]).unwrap();
    // Two witnesses are asked for, one signed.
    let msg = failure(verify_witnessed(&h, &w, 2));
    assert!(msg.contains("no checkpoint is cosigned by 2"), "{msg}");
}

#[test]
fn a_witness_history_line_torn_by_a_crash_does_not_stop_the_witness() {
    let h = honest(300);
    let w = witness(&h);
    observe(&w, &h.dir).unwrap();
    let log_id = read_only(&h.dir).unwrap().log_id();
    let history = h
        .dir
        .parent()
        .unwrap()
        .join("witness")
        .join(tally_engine::witness::LOGS_DIR)
        .join(hex(&log_id))
        .join(tally_engine::witness::HISTORY_FILE);
    // A crash in the middle of the next line's write.
    let mut bytes = std::fs::read(&history).unwrap();
    bytes.extend_from_slice(b"2 4");
    std::fs::write(&history, &bytes).unwrap();
    assert_eq!(w.history(&log_id).unwrap().len(), 1);
    grow(&h, 300, 100);
    assert!(matches!(
        observe(&w, &h.dir),
        Ok(Observation::Cosigned { .. })
    ));
    grow(&h, 400, 100);
    observe(&w, &h.dir).unwrap();
    let seen = w.history(&log_id).unwrap();
    assert_eq!(
        seen.iter().map(|s| s.tree_size).collect::<Vec<_>>(),
        vec![300, 400, 500]
    );
}

#[test]
fn a_witness_refuses_a_second_statement_for_a_checkpoint_it_cosigned() {
    let h = honest(300);
    let w = witness(&h);
    observe(&w, &h.dir).unwrap();
    // Whoever holds the log's key signs another statement for the same id, size and root
    // (another time): two signed checkpoints for one id.
    let key = tally_engine::format::checkpoint::decode_secret_key(
        &std::fs::read_to_string(&h.key).unwrap(),
    )
    .unwrap();
    let cp = *read_only(&h.dir).unwrap().checkpoints().last().unwrap();
    let mut other = cp.statement;
    other.time = tally_engine::Timestamp(other.time.0 + 1);
    let forged = SignedCheckpoint::sign(other, &key);
    let note = tally_engine::format::note::checkpoint_note(&forged, &[]);
    let err = w
        .observe(&note, &mut |_, _| {
            unreachable!("no proof for the same size")
        })
        .unwrap_err();
    let msg = format!("{err}");
    assert!(
        matches!(err, WitnessError::Equivocation(_))
            && msg.contains("a different statement under id 1"),
        "{msg}"
    );
}

#[test]
fn a_witness_refuses_a_rollback_and_names_both_checkpoints() {
    for beside_live_writer in [false, true] {
        let h = honest(1200);
        let w = witness(&h);
        observe(&w, &h.dir).unwrap();
        // Roll back to the checkpoint at 600: records, checkpoints and cosignatures.
        forge::keep_checkpoints(&h.dir, 2);
        forge::truncate_at(&h.dir, 600);
        let _ = std::fs::remove_file(h.dir.join(tally_engine::COSIGNATURES_FILE));
        let _lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        // verify alone is satisfied by the rolled-back log, and so is the witness policy
        // once its cosignatures are gone...
        verify(&h.dir, h.public_key).unwrap();
        // ...but the witness is not.
        let err = observe(&w, &h.dir).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, WitnessError::Rollback(_)), "{msg}");
        assert!(
            msg.contains("cosigned checkpoint 4 (tree size 1200")
                && msg.contains("offers checkpoint 2 (tree size 600"),
            "{msg}"
        );
    }
}

#[test]
fn a_witness_catches_laundering_through_the_next_honest_checkpoint() {
    for beside_live_writer in [false, true] {
        let h = honest(1200);
        let w = witness(&h);
        observe(&w, &h.dir).unwrap();
        // The attacker rewrites history after 600, removes checkpoints and cosignatures
        // after it, and the key's ledger too (as with a key kept in the directory).
        rewrite_after(&h, 600, 900);
        std::fs::remove_file(ledger_of(&h.key)).unwrap();
        let cos = h.dir.join(tally_engine::COSIGNATURES_FILE);
        let keep_cos = std::fs::read(&cos).unwrap();
        // The operator's routine checkpoint now signs the forged history with the real key.
        let log = Log::open(&h.dir, options(&h.key)).unwrap();
        let laundered = log.checkpoint().unwrap();
        log.close().unwrap();
        assert_eq!(laundered.statement.id, 3);
        assert_eq!(laundered.statement.tree_size, 1500);
        // With the old cosignatures still beside the log, verify sees that a witness
        // cosigned other content under ids that now name the forgery.
        std::fs::write(&cos, &keep_cos).unwrap();
        let lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        let msg = failure(verify_witnessed(&h, &w, 1));
        assert!(
            msg.contains("the checkpoint was replaced") || msg.contains("missing"),
            "{msg}"
        );
        drop(lock);
        // With them deleted too, the witness itself refuses the laundered checkpoint.
        std::fs::remove_file(&cos).unwrap();
        let _lock = beside_live_writer.then(|| forge::hold_lock(&h.dir));
        let err = observe(&w, &h.dir).unwrap_err();
        assert!(matches!(err, WitnessError::Equivocation(_)), "{err}");
        assert!(
            err.to_string()
                .contains("cosigned checkpoint 4 (tree size 1200")
                && err
                    .to_string()
                    .contains("offers checkpoint 3 (tree size 1500")
                && err.to_string().contains("whose id is below 4"),
            "{err}"
        );
    }
}

/// The key ledger beside a key file.
fn ledger_of(key: &Path) -> PathBuf {
    PathBuf::from(format!("{}.ledger", key.display()))
}

#[test]
fn a_witness_refuses_a_different_checkpoint_under_an_id_it_cosigned() {
    let h = honest(600);
    let w = witness(&h);
    observe(&w, &h.dir).unwrap(); // checkpoint 2, tree size 600
    grow(&h, 600, 600);
    observe(&w, &h.dir).unwrap(); // checkpoint 3, tree size 1200
    // History rewritten after 300 and grown back to the same size, signed by the real key
    // with the ids the witness saw (the ledger went with the key's directory).
    rewrite_after(&h, 300, 900);
    std::fs::remove_file(ledger_of(&h.key)).unwrap();
    let _ = std::fs::remove_file(h.dir.join(tally_engine::COSIGNATURES_FILE));
    let log = Log::open(&h.dir, options(&h.key)).unwrap();
    let forged = log.checkpoint().unwrap();
    log.close().unwrap();
    assert_eq!((forged.statement.id, forged.statement.tree_size), (2, 1200));
    let err = observe(&w, &h.dir).unwrap_err();
    assert!(matches!(err, WitnessError::Equivocation(_)), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("a different checkpoint under id 2"), "{msg}");
    // The evidence is the log's own signature over the forgery.
    let WitnessError::Equivocation(c) = err else {
        unreachable!()
    };
    let kept = Note::parse(&std::fs::read_to_string(&c.evidence).unwrap()).unwrap();
    assert_eq!(
        checkpoint_from_note(&kept, &[h.public_key]).unwrap(),
        forged
    );
}

#[test]
fn a_fresh_log_is_not_a_blank_cheque_until_a_non_empty_checkpoint_is_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let key = tmp.path().join("log.key");
    let public_key = tally_engine::create_signing_key(&key).unwrap();
    let log = Log::open(&dir, options(&key)).unwrap();
    log.checkpoint().unwrap();
    log.close().unwrap();
    let h = Honest {
        _tmp: tmp,
        dir,
        key,
        public_key,
    };
    let w = witness(&h);
    observe(&w, &h.dir).unwrap(); // checkpoint 1, tree size 0
    let empty = kept(&h, 1);
    // Replacing the whole history of a log whose only checkpoint is empty goes unnoticed:
    // a tree of size 0 proves nothing (docs/OPERATIONS.md, "A fresh log").
    let attacker_key = h.dir.parent().unwrap().join("attacker.key");
    let forged: Vec<(String, EventData)> = (0..50).map(|i| (stream_of(i), event(i))).collect();
    let refs: Vec<(&str, EventData)> = forged
        .iter()
        .map(|(s, e)| (s.as_str(), e.clone()))
        .collect();
    forge::regrow(&h.dir, &attacker_key, &refs);
    verify_kept(&h, std::slice::from_ref(&empty)).unwrap();
    // Once the honest log grows and a witness cosigns it, a later rewrite is caught.
    let h2 = honest(500);
    let w2 = witness(&h2);
    observe(&w2, &h2.dir).unwrap();
    forge::keep_checkpoints(&h2.dir, 0);
    forge::truncate_at(&h2.dir, 0);
    let refs: Vec<(&str, EventData)> = forged
        .iter()
        .map(|(s, e)| (s.as_str(), e.clone()))
        .collect();
    forge::regrow(&h2.dir, &attacker_key, &refs);
    std::fs::remove_file(ledger_of(&h2.key)).unwrap();
    let log = Log::open(&h2.dir, options(&h2.key)).unwrap();
    log.checkpoint().unwrap();
    log.close().unwrap();
    let err = observe(&w2, &h2.dir).unwrap_err();
    assert!(matches!(err, WitnessError::Rollback(_)), "{err}");
    assert!(
        err.to_string()
            .contains("cosigned checkpoint 2 (tree size 500"),
        "{err}"
    );
}

#[test]
fn a_forged_stream_link_in_the_tail_is_found_by_verify() {
    // Version 2 records name their stream's previous event. A forger who rewrites the tail
    // so that an event skips its predecessor (hiding it from a stream's chain) keeps every
    // checksum and chain link right, and verify still names the record.
    let h = honest(2000);
    let log = Log::open(&h.dir, options(&h.key)).unwrap();
    for i in 2000..2010 {
        log.append(&stream_of(i), ExpectedVersion::Any, &[event(i)])
            .unwrap();
    }
    log.close().unwrap();
    // Position 2009 is trade-0's; its previous event is 2002: point it at 1995 instead.
    forge::edit_tail_record(&h.dir, 2009, |r| {
        assert_eq!(r.stream_prev, 2002);
        r.stream_prev = 1995;
    });
    let msg = failure(verify(&h.dir, h.public_key));
    assert!(
        msg.contains("names position 1995 as its previous event, but that is at position 2002"),
        "{msg}"
    );
    // A stream read that passes both events refuses them, in either direction.
    for (from, direction) in [(0, Direction::Forward), (u64::MAX, Direction::Backward)] {
        let err = read_only(&h.dir)
            .unwrap()
            .read_stream("trade-0", from, usize::MAX, direction)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("version 287 names position 1995 as its previous event, but that is at position 2002"),
            "{direction:?}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Injection at the tail, and producer signatures.

use tally_engine::format::checkpoint::SigningKey;
use tally_engine::format::proof::hex;
use tally_engine::producers::ProducerTrust;

/// A log whose `trade-` streams take only batches signed by the OMS's key.
fn signed_log() -> (Honest, SigningKey) {
    let h = honest(600);
    let oms = SigningKey::from_bytes(&[7; 32]);
    let log = Log::open(&h.dir, options(&h.key)).unwrap();
    log.register_producer_key(
        oms.verifying_key().to_bytes(),
        "oms",
        &["trade-".into()],
        "alice",
        "go-live",
    )
    .unwrap();
    log.require_signatures("trade-", "alice", "signed at source")
        .unwrap();
    for i in 0..20u64 {
        let e = event(600 + i)
            .with_id(tally_engine::new_event_id())
            .event_time(tally_engine::now());
        log.append_signed(
            &stream_of(i),
            ExpectedVersion::Any,
            &[e.clone(), e.with_id(tally_engine::new_event_id())],
            &oms,
        )
        .unwrap();
    }
    log.checkpoint().unwrap();
    log.close().unwrap();
    (h, oms)
}

fn trust(oms: &SigningKey, required: bool) -> ProducerTrust {
    ProducerTrust::parse(&format!(
        "# the auditor's own list\nkey oms {} trade-\n{}",
        hex(&oms.verifying_key().to_bytes()),
        // The honest history before the policy (600 unsigned events, then the key's
        // registration and the policy) is admitted by the auditor's own `from`.
        if required {
            "require trade- from 602\n"
        } else {
            ""
        }
    ))
    .unwrap()
}

fn verify_producers(h: &Honest, trust: ProducerTrust) -> Result<VerifyReport, Error> {
    read_only(&h.dir)?.verify_with(
        &VerifyOptions {
            trusted_keys: vec![h.public_key],
            producers: Some(trust),
            ..VerifyOptions::default()
        },
        &mut |_| {},
    )
}

fn envelope(stream: &str, event_type: &str) -> Vec<u8> {
    envelope_with(stream, event_type, br#"{"qty":"1000000"}"#)
}

fn envelope_with(stream: &str, event_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    tally_engine::format::envelope::EnvelopeRef {
        event_id: tally_engine::new_event_id(),
        event_time: tally_engine::now(),
        schema_version: 1,
        content_type: tally_engine::ContentType::Json,
        stream,
        aggregate_type: "Trade",
        event_type,
        correlation_id: "",
        causation_id: "",
        actor: "oms",
        payload,
        payload_form: tally_engine::format::envelope::PayloadForm::Inline,
    }
    .encode_into(&mut out)
    .unwrap();
    out
}

#[test]
fn an_injected_tail_event_is_caught_only_where_signatures_are_required() {
    let (h, oms) = signed_log();
    let r = verify_producers(&h, trust(&oms, true)).unwrap();
    assert_eq!(r.signed_batches, 20);
    // An event written into the tail by hand, after the latest checkpoint: every checksum
    // and chain link right, the stream's links right.
    forge::append_raw(
        &h.dir,
        &[("trade-3".into(), envelope("trade-3", "AMEND"))],
        None,
    );
    let lock = forge::hold_lock(&h.dir);
    // Without producer signatures nothing tells it from a real append (it is after every
    // checkpoint, and the next honest one would sign it).
    verify(&h.dir, h.public_key).unwrap();
    verify_producers(&h, trust(&oms, false)).unwrap();
    // Where the auditor's policy requires signatures, verify names it.
    let msg = failure(verify_producers(&h, trust(&oms, true)));
    assert!(
        msg.contains("is not signed, but batches for prefix \"trade-\" must be"),
        "{msg}"
    );
    drop(lock);
    // And the writer itself would have refused it.
    let log = Log::open(&h.dir, options(&h.key)).unwrap();
    assert!(matches!(
        log.append("trade-3", ExpectedVersion::Any, &[event(1)]),
        Err(Error::SignatureRefused { .. })
    ));
}

#[test]
fn a_policy_event_forged_behind_an_injected_batch_does_not_move_where_signatures_are_required() {
    let h = honest(300);
    let oms = SigningKey::from_bytes(&[7; 32]);
    let trust = ProducerTrust::parse(&format!(
        "key oms {} risk-\nrequire risk-\n",
        hex(&oms.verifying_key().to_bytes())
    ))
    .unwrap();
    verify_producers(&h, trust.clone()).unwrap();
    // An unsigned `risk-` event at the tail, then a `$SignaturesRequired` for `risk-` after
    // it: were the policy's start taken from the log, the injected event would come before
    // it and pass.
    forge::append_raw(
        &h.dir,
        &[("risk-1".into(), envelope("risk-1", "LIMIT"))],
        None,
    );
    forge::append_raw(
        &h.dir,
        &[(
            tally_engine::producers::PRODUCERS_STREAM.into(),
            envelope_with(
                tally_engine::producers::PRODUCERS_STREAM,
                tally_engine::producers::SIGNATURES_REQUIRED,
                br#"{"prefix":"risk-","reason":"forged"}"#,
            ),
        )],
        None,
    );
    let msg = failure(verify_producers(&h, trust));
    assert!(
        msg.contains("stream risk-1 is not signed") && msg.contains("from position 0 on"),
        "{msg}"
    );
}

#[test]
fn a_replayed_or_altered_signed_batch_is_caught() {
    // A copy of a real signed batch appended again at the tail: valid signature, but the
    // same one as an earlier batch's.
    let (h, oms) = signed_log();
    let log = read_only(&h.dir).unwrap();
    let first_signed = log
        .read_stream("trade-5", 0, usize::MAX, Direction::Forward)
        .unwrap()
        .into_iter()
        .rev()
        .find(|e| e.event_type() == "AMEND")
        .unwrap()
        .position
        .0
        - 1;
    let a = log.read_raw(tally_engine::Position(first_signed)).unwrap();
    let b = log
        .read_raw(tally_engine::Position(first_signed + 1))
        .unwrap();
    drop(log);
    let block = a.body[..104].to_vec();
    let records = vec![
        ("trade-5".to_owned(), a.body[104..].to_vec()),
        ("trade-5".to_owned(), b.body.clone()),
    ];
    forge::append_raw(&h.dir, &records, Some(&block));
    let msg = failure(verify_producers(&h, trust(&oms, true)));
    assert!(msg.contains("repeats the producer signature"), "{msg}");

    // A signed batch with one event's payload changed (re-chained by the forger).
    let (h, oms) = signed_log();
    let log = read_only(&h.dir).unwrap();
    let last = log.next_position().0 - 2;
    let a = log.read_raw(tally_engine::Position(last)).unwrap();
    let b = log.read_raw(tally_engine::Position(last + 1)).unwrap();
    drop(log);
    let stream = {
        let env = tally_engine::format::envelope::EnvelopeRef::decode(&a.body[104..]).unwrap();
        env.stream.to_owned()
    };
    let mut changed = b.body.clone();
    let n = changed.len();
    changed[n - 3] = b'9';
    // Without the key, the forger's block can only be a copy with its signature bent (a
    // copy as it is would be a replay, above).
    let mut block = a.body[..104].to_vec();
    block[40] ^= 1;
    forge::append_raw(
        &h.dir,
        &[(stream.clone(), a.body[104..].to_vec()), (stream, changed)],
        Some(&block),
    );
    let msg = failure(verify_producers(&h, trust(&oms, true)));
    assert!(
        msg.contains("signature of producer oms does not verify"),
        "{msg}"
    );
}

#[test]
fn a_stream_version_gap_in_the_tail_is_refused_at_open_not_a_panic() {
    // Bytes from disk never reach an assertion: a record whose stream version skips ahead
    // (every checksum and chain link recomputed) is found by the open that indexes it.
    let h = honest(40);
    let last = read_only(&h.dir).unwrap().next_position().0 - 1;
    forge::edit_tail_record(&h.dir, last, |r| r.stream_version += 5);
    for opened in [Log::open(&h.dir, options(&h.key)), read_only(&h.dir)] {
        let msg = match opened {
            Err(e) => format!("{e}"),
            Ok(log) => format!(
                "{:?}",
                log.read_stream(&stream_of(last), 0, usize::MAX, Direction::Forward)
            ),
        };
        assert!(msg.contains("stream version"), "{msg}");
    }
}
