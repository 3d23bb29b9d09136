//! Defects found under power cuts, each pinned by a test on the simulated disk
//! (`tally_engine::sim`): what a power cut right after an operation leaves must be what the
//! log relies on.

use std::path::{Path, PathBuf};

use tally_engine::sim::{Cut, SimFs};
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options, Storage};

fn options(sim: &SimFs) -> Options {
    Options {
        storage: Storage::simulated(sim),
        segment_bytes: 64 * 1024,
        durability: Durability::Fsync,
        checkpoint_interval: None,
        ..Options::default()
    }
}

fn dir() -> PathBuf {
    PathBuf::from("/seam/log")
}

fn durable(sim: &SimFs, dir: &Path) -> Vec<String> {
    sim.durable_names(dir)
        .into_iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect()
}

/// Waits (up to 30 s) until `n` segment files are durable: spares are prepared by a
/// background thread.
fn wait_for_segment_files(sim: &SimFs, n: usize) {
    let ready = || {
        durable(sim, &dir())
            .iter()
            .filter(|f| f.ends_with(".seg"))
            .count()
            >= n
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

#[test]
fn files_an_open_creates_are_durable_names_before_it_returns() {
    let sim = SimFs::new(1);
    let log = Log::open(dir(), options(&sim)).unwrap();
    let names = durable(&sim, &dir());
    for f in [
        "tally.meta",
        "tally.key",
        "tally.checkpoints",
        "merkle.tree",
    ] {
        assert!(
            names.iter().any(|n| n == f),
            "{f} is not a durable name after open: {names:?}"
        );
    }
    log.crash();
}

#[test]
fn a_first_checkpoint_survives_a_power_cut_right_after_it() {
    let sim = SimFs::new(2);
    let log = Log::open(dir(), options(&sim)).unwrap();
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[EventData::json("TradeNew", "{}")],
    )
    .unwrap();
    let cp = log.checkpoint().unwrap();
    log.crash();
    sim.power_cut(&Cut::clean());
    let log = Log::open(dir(), options(&sim)).unwrap();
    assert_eq!(log.latest_checkpoint(), Some(cp));
    log.verify().unwrap();
    log.close().unwrap();
}

#[test]
fn a_key_write_cut_short_leaves_no_key_file_that_refuses_the_next_open() {
    use tally_engine::sim::{Fault, FaultKind, FaultOp};
    let sim = SimFs::new(3);
    sim.inject(Fault {
        op: FaultOp::Write,
        path_contains: Some("tally.key".into()),
        skip: 0,
        kind: FaultKind::ShortWrite,
        times: 1,
    });
    assert!(Log::open(dir(), options(&sim)).is_err());
    assert_eq!(sim.faults_fired(), 1);
    sim.power_cut(&Cut::keep_all());
    let log = Log::open(dir(), options(&sim)).expect("a half-written key must not stop the log");
    assert!(log.public_key().is_some());
    log.close().unwrap();
}

/// `Log::append` documents: on `Poisoned` the outcome is unknown, and a retry with the same
/// ids after a restart tells. Both outcomes happen: the records are in the page cache, so a
/// crash keeps them and a power cut loses them.
#[test]
fn an_append_whose_sync_failed_has_an_unknown_outcome_that_a_retry_settles() {
    for power_cut in [false, true] {
        let sim = SimFs::new(4);
        let log = Log::open(dir(), options(&sim)).unwrap();
        let first = log
            .append(
                "trade-1",
                ExpectedVersion::NoStream,
                &[EventData::json("TradeNew", "{}")],
            )
            .unwrap();
        let batch = [
            EventData::json("TradeAmended", r#"{"qty":"5"}"#).with_id(tally_engine::new_event_id()),
            EventData::json("TradeAmended", r#"{"qty":"6"}"#).with_id(tally_engine::new_event_id()),
        ];
        log.inject_sync_failure();
        let err = log
            .append("trade-1", ExpectedVersion::Exact(0), &batch)
            .unwrap_err();
        assert!(err.is_outcome_unknown(), "{err}");
        assert!(
            !tally_engine::Error::Closed.is_outcome_unknown(),
            "a refusal writes nothing"
        );
        log.crash();
        if power_cut {
            sim.power_cut(&Cut::clean());
        }
        let log = Log::open(dir(), options(&sim)).unwrap();
        let found = log
            .read_stream("trade-1", 0, 10, tally_engine::Direction::Forward)
            .unwrap()
            .len();
        assert_eq!(found, if power_cut { 1 } else { 3 }, "whole or not at all");
        let retried = log.append("trade-1", ExpectedVersion::Exact(0), &batch);
        let r = retried.unwrap_or_else(|e| panic!("power cut {power_cut}: {e}"));
        assert_eq!((r.first_version, r.last_version), (1, 2));
        assert_eq!(
            log.read_stream("trade-1", 0, 10, tally_engine::Direction::Forward)
                .unwrap()
                .len(),
            3,
            "the retry wrote the batch once"
        );
        assert_eq!(first.first_version, 0);
        log.close().unwrap();
    }
}

#[test]
fn verify_runs_after_a_seal_interrupted_before_its_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || Options {
        segment_bytes: 64 * 1024,
        durability: Durability::None,
        ..Options::default()
    };
    let log = Log::open(dir.path(), opts()).unwrap();
    for i in 0..400 {
        log.append(
            &format!("trade-{}", i % 7),
            ExpectedVersion::Any,
            &[EventData::json(
                "TradeNew",
                format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(300)),
            )],
        )
        .unwrap();
    }
    log.wait_sealed().unwrap();
    let seq = log.segments().iter().rfind(|s| s.sealed).unwrap().seq;
    log.crash();
    std::fs::remove_file(dir.path().join(seq.index_file_name())).unwrap();
    let ro = Log::open(
        dir.path(),
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            ..opts()
        },
    )
    .unwrap();
    let report = ro
        .verify()
        .unwrap_or_else(|e| panic!("verify could not run: {e}"));
    assert!(report.sidecars_missing.contains(&seq), "{report:?}");
}

/// SERVER_INFO, checkpoint lists and notes read the published checkpoints: they never wait
/// for a checkpoint in progress (which syncs the records and the Merkle tree first).
#[test]
fn checkpoint_readers_do_not_wait_for_a_checkpoint_in_progress() {
    use std::sync::Arc;
    use tally_engine::sim::{Fault, FaultKind, FaultOp};
    let sim = SimFs::new(5);
    let log = Arc::new(Log::open(dir(), options(&sim)).unwrap());
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[EventData::json("TradeNew", "{}")],
    )
    .unwrap();
    let first = log.checkpoint().unwrap();
    log.append(
        "trade-1",
        ExpectedVersion::Exact(0),
        &[EventData::json("TradeAmended", "{}")],
    )
    .unwrap();
    // The next checkpoint's tree sync takes three seconds.
    sim.inject(Fault {
        op: FaultOp::Sync,
        path_contains: Some("merkle.tree".into()),
        skip: 0,
        kind: FaultKind::SlowSync(std::time::Duration::from_secs(3)),
        times: 1,
    });
    let l = Arc::clone(&log);
    let slow = std::thread::spawn(move || l.checkpoint().unwrap());
    while sim.faults_fired() == 0 {
        std::thread::yield_now();
    }
    assert_eq!(log.checkpoint_count(), 1);
    assert_eq!(log.latest_checkpoint(), Some(first));
    assert_eq!(log.checkpoints(), vec![first]);
    assert!(log.checkpoint_note(None).unwrap().is_some());
    assert!(log.public_key().is_some());
    assert!(
        !slow.is_finished(),
        "the readers above returned while the checkpoint was still syncing"
    );
    let second = slow.join().unwrap();
    assert_eq!(log.latest_checkpoint(), Some(second));
    Arc::into_inner(log).unwrap().close().unwrap();
}

/// A spare numbered past a gap (brought back by a power cut after a truncating recovery
/// removed it and the segments before it) is discarded at open, durably, and rolls go on.
#[test]
fn a_spare_past_a_gap_is_discarded_at_open_and_rolls_go_on() {
    let sim = SimFs::new(6);
    let log = Log::open(dir(), options(&sim)).unwrap();
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[EventData::json("TradeNew", "{}")],
    )
    .unwrap();
    // Segment 0 and its spare 1 exist (the spare is prepared by a background thread, which
    // a close stops: wait for it); 5 is past a gap.
    wait_for_segment_files(&sim, 2);
    log.close().unwrap();
    let names = durable(&sim, &dir());
    let segs: Vec<&String> = names.iter().filter(|n| n.ends_with(".seg")).collect();
    assert_eq!(segs.len(), 2, "{names:?}");
    let past_gap = dir().join(tally_engine::SegmentSeq(5).file_name());
    sim.write_file(&past_gap, &vec![0u8; 64 * 1024]).unwrap();
    let log = Log::open(dir(), options(&sim)).unwrap();
    assert!(
        !durable(&sim, &dir())
            .iter()
            .any(|n| n.ends_with("00005.seg")),
        "the spare past the gap is removed, durably"
    );
    for v in 0..200 {
        log.append(
            "trade-1",
            ExpectedVersion::Exact(v),
            &[EventData::json(
                "TradeAmended",
                format!(r#"{{"pad":"{}"}}"#, "x".repeat(1500)),
            )],
        )
        .unwrap();
    }
    assert!(log.segments().len() >= 5, "rolled past the old gap");
    log.verify().unwrap();
    log.close().unwrap();
}

/// A log whose sealer failed (a footer write failed) is poisoned, and its close must
/// not write the clean-close state (the active segment's index and a stream snapshot that
/// counts it) over a segment that is still unsealed: the next open would link the active
/// segment's streams past the unsealed one.
#[test]
fn a_poisoned_log_closes_without_writing_clean_close_state() {
    use tally_engine::sim::{Fault, FaultKind, FaultOp};
    let sim = SimFs::new(8);
    let log = Log::open(dir(), options(&sim)).unwrap();
    let append = |s: usize| {
        log.append(
            ["trade-1", "trade-2"][s],
            ExpectedVersion::Any,
            &[EventData::json(
                "TradeAmended",
                format!(r#"{{"pad":"{}"}}"#, "x".repeat(900)),
            )],
        )
    };
    let mut versions = [0u64; 2];
    let mut i = 0usize;
    while log.segments().len() < 2 {
        append(i % 2).unwrap();
        versions[i % 2] += 1;
        i += 1;
    }
    // Segment 1 is active (its spare was made before): the next write to it is its footer.
    sim.inject(Fault {
        op: FaultOp::Write,
        path_contains: Some("00000000000000000001.seg".into()),
        skip: 0,
        kind: FaultKind::Eio,
        times: 1,
    });
    // Until segment 1 is rolled: its seal (in the background) fails at the footer.
    let mut i = 0usize;
    while log.segments().len() < 3 {
        let s = i % 2;
        i += 1;
        match log.append(
            ["trade-1", "trade-2"][s],
            ExpectedVersion::Any,
            &[EventData::json(
                "TradeAmended",
                format!(r#"{{"pad":"{}"}}"#, "x".repeat(900)),
            )],
        ) {
            Ok(_) => versions[s] += 1,
            // The seal of segment 0 or 1 failed already.
            Err(e) => {
                assert!(e.is_outcome_unknown(), "{e}");
                break;
            }
        }
    }
    // Everything appended is durable; only the poison tells the close that a seal failed.
    assert!(log.wait_sealed().is_err(), "the seal of segment 1 failed");
    assert_eq!(sim.faults_fired(), 1);
    let closed = log.close();
    assert!(
        matches!(closed, Err(tally_engine::Error::Poisoned { .. })),
        "a close after a failed seal is not clean: {closed:?}"
    );
    let log = Log::open(dir(), options(&sim)).unwrap();
    assert!(!log.recovery_report().clean);
    for (s, n) in ["trade-1", "trade-2"].iter().zip(versions) {
        let got = log
            .read_stream(s, 0, usize::MAX, tally_engine::Direction::Forward)
            .unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(got.len() as u64 >= n, "{s}: {} of {n}", got.len());
    }
    log.verify().unwrap();
    log.close().unwrap();
}

/// A witness keeps its state through the storage seam too: what `init` wrote survives a
/// power cut right after it.
#[test]
fn a_witness_created_on_the_simulated_disk_survives_a_power_cut() {
    use tally_engine::witness::Witness;
    let sim = SimFs::new(9);
    let dir = PathBuf::from("/seam/witness");
    let w = Witness::init_in(Storage::simulated(&sim), &dir, "witness.example/w1").unwrap();
    let key = w.key();
    sim.power_cut(&Cut::clean());
    let back = Witness::open_in(Storage::simulated(&sim), &dir).unwrap();
    assert_eq!(back.key(), key);
}

/// A roll never waits for its spare under the writer lock: an append that may not block
/// (tallyd's runtime threads) fails with `WouldBlock` having written nothing, and a blocking
/// append waits for the spare holding no lock, so that readers go on meanwhile.
#[test]
fn a_roll_never_waits_for_its_spare_under_the_writer_lock() {
    use tally_engine::sim::{Fault, FaultKind, FaultOp};
    use tally_engine::{AppendRequest, Direction, Error};
    let sim = SimFs::new(9);
    // The second spare (segment 2) takes three seconds to prepare.
    sim.inject(Fault {
        op: FaultOp::Create,
        path_contains: Some("00002.seg.prep".into()),
        skip: 0,
        kind: FaultKind::SlowSync(std::time::Duration::from_secs(3)),
        times: 1,
    });
    let log = std::sync::Arc::new(Log::open(dir(), options(&sim)).unwrap());
    // The first spare (segment 1) is prepared in the background after open: let it be.
    wait_for_segment_files(&sim, 2);
    let event = [EventData::json(
        "TradeAmended",
        format!(r#"{{"pad":"{}"}}"#, "x".repeat(1500)),
    )];
    let request = [AppendRequest {
        stream: "trade-1",
        expected: ExpectedVersion::Any,
        events: &event,
    }];
    let mut written = 0u64;
    let refused = loop {
        match log.try_append_deferred_multi(&request, None) {
            Ok(h) => {
                h.wait().unwrap();
                written += 1;
            }
            Err(e) => break e,
        }
        assert!(written < 200, "no roll reached the slow spare");
    };
    assert!(matches!(refused, Error::WouldBlock), "{refused}");
    assert_eq!(
        log.segments().len(),
        2,
        "refused at the roll to segment 2 (after {written} appends)"
    );
    let count = |log: &Log| {
        log.read_stream("trade-1", 0, 10_000, Direction::Forward)
            .unwrap()
            .len() as u64
    };
    assert_eq!(count(&log), written, "the refused append wrote nothing");
    // A blocking append waits for the spare ...
    let l = std::sync::Arc::clone(&log);
    let again = event.clone();
    let blocker = std::thread::spawn(move || {
        l.append("trade-1", ExpectedVersion::Exact(written - 1), &again)
            .unwrap()
    });
    while sim.faults_fired() == 0 {
        std::thread::yield_now();
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    // ... and meanwhile an append that may not block is refused instead of waiting, and
    // reads (which take the writer lock to read the active segment) are answered.
    let meanwhile = log.try_append_deferred_multi(&request, None);
    assert_eq!(count(&log), written);
    assert_eq!(
        log.stream_info("trade-1").unwrap().unwrap().last_version,
        written - 1
    );
    assert!(
        !blocker.is_finished(),
        "the refusal and the reads came while the blocking append still waited"
    );
    assert!(matches!(meanwhile, Err(Error::WouldBlock)), "{meanwhile:?}");
    let r = blocker.join().unwrap();
    assert_eq!(r.first_version, written);
    log.try_append_deferred_multi(&request, None)
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        count(&log),
        written + 2,
        "versions dense: nothing else was written"
    );
    std::sync::Arc::into_inner(log).unwrap().close().unwrap();
}

/// Overwrites `bytes` at `offset` of a file's durable content: a page that reached the disk
/// on its own.
fn write_durably_at(sim: &SimFs, path: &Path, offset: usize, bytes: &[u8]) {
    let mut content = sim.read_durable(path).expect("the file is durable");
    content[offset..offset + bytes.len()].copy_from_slice(bytes);
    sim.write_file(path, &content).expect("a simulated write");
}

/// A clean-close sidecar vouches for a clean end only once: after a session that reopened
/// the log crashed with a later page of its writes on disk and an earlier one lost, the
/// bytes after the end are found and cut, not kept behind a future footer.
#[test]
fn bytes_after_a_clean_close_end_written_by_a_later_session_are_cut() {
    let sim = SimFs::new(21);
    let opts = || Options {
        durability: Durability::None,
        ..options(&sim)
    };
    let log = Log::open(dir(), opts()).unwrap();
    log.append(
        "trade-1",
        ExpectedVersion::NoStream,
        &[EventData::json("TradeNew", "{}")],
    )
    .unwrap();
    log.close().unwrap();
    // The next session writes (nothing synced) and crashes: of its pages only a late one
    // reached the disk.
    let log = Log::open(dir(), opts()).unwrap();
    log.crash();
    let seg0 = dir().join(tally_engine::SegmentSeq(0).file_name());
    let late = 40 * 1024;
    write_durably_at(&sim, &seg0, late, &[0xAB; 64]);
    sim.power_cut(&Cut::clean());
    let log = Log::open(dir(), opts()).unwrap();
    let report = log.recovery_report();
    assert_eq!(report.truncations.len(), 1, "{report:?}");
    log.close().unwrap();
    let content = sim.read_durable(&seg0).unwrap();
    assert!(
        content[late..late + 64].iter().all(|&b| b == 0),
        "the bytes after the end are zeroed, durably"
    );
}

/// When nothing was synced (`Durability::None`), a segment's first pages can be lost while a
/// later segment's reached the disk: the empty segment and everything after it is a torn
/// tail, cut like any other (no record proves it acknowledged), not a reason to refuse to
/// open.
#[test]
fn an_empty_segment_before_used_ones_is_a_torn_tail_when_nothing_proves_it_acknowledged() {
    let sim = SimFs::new(22);
    let opts = || Options {
        durability: Durability::None,
        auto_checkpoints: false,
        ..options(&sim)
    };
    let log = Log::open(dir(), opts()).unwrap();
    wait_for_segment_files(&sim, 2);
    let event = [EventData::json(
        "TradeAmended",
        format!(r#"{{"pad":"{}"}}"#, "x".repeat(1500)),
    )];
    let mut v = 0;
    while log.segments().len() < 3 {
        log.append("trade-1", ExpectedVersion::Any, &event).unwrap();
        v += 1;
        assert!(v < 500, "three segments");
    }
    log.sync().unwrap();
    log.crash();
    // Segment 1's header and first records never reached the disk; segment 2's did.
    let seg1 = dir().join(tally_engine::SegmentSeq(1).file_name());
    write_durably_at(&sim, &seg1, 0, &[0; 8192]);
    sim.power_cut(&Cut::clean());
    let log = Log::open(dir(), opts()).unwrap();
    let report = log.recovery_report();
    assert_eq!(report.truncations.len(), 1, "{report:?}");
    assert_eq!(
        log.segments().len(),
        1 + 1,
        "segment 0 and a fresh segment 1"
    );
    log.verify().unwrap();
    log.close().unwrap();
}

/// A power cut in the middle of a witness's observation (after its history line, before its
/// latest note) is not mistaken for a log that signed two statements: observing the same
/// checkpoint again finishes the observation. Swept over every disk operation of the
/// observation.
#[test]
fn a_witness_cut_short_mid_observation_finishes_it_instead_of_crying_fork() {
    use tally_engine::witness::{Observation, Witness};
    let log_dir = Path::new("/seam/w/log");
    let witness_dir = Path::new("/seam/w/witness");
    let opts = |sim: &SimFs| Options {
        auto_checkpoints: false,
        ..options(sim)
    };
    let mut struck_mid_observation = 0;
    for k in 1..=30u64 {
        let sim = SimFs::new(100 + k);
        let log = Log::open(log_dir, opts(&sim)).unwrap();
        let append = |log: &Log, body: &[u8]| {
            log.append(
                "s",
                ExpectedVersion::Any,
                &[EventData::new("T", body.to_vec())],
            )
            .unwrap();
        };
        append(&log, b"a");
        log.checkpoint().unwrap();
        let w = Witness::init_in(Storage::simulated(&sim), witness_dir, "w.example/w").unwrap();
        w.register(&log.log_id(), &[log.public_key().unwrap()])
            .unwrap();
        let first = log.checkpoint_note(None).unwrap().unwrap();
        w.observe(&first, &mut |o, n| log.prove_consistency(o, n))
            .unwrap();
        append(&log, b"b");
        log.checkpoint().unwrap();
        let second = log.checkpoint_note(None).unwrap().unwrap();
        let before = sim.generation();
        sim.cut_power_after(k, Cut::clean());
        let _ = w.observe(&second, &mut |o, n| log.prove_consistency(o, n));
        if sim.generation() > before {
            struck_mid_observation += 1;
        } else {
            sim.disarm_power_cut();
            sim.power_cut(&Cut::clean());
        }
        log.crash();
        drop(w);
        let log = Log::open(log_dir, opts(&sim)).unwrap();
        let w = Witness::open_in(Storage::simulated(&sim), witness_dir).unwrap();
        let note = log.checkpoint_note(None).unwrap().unwrap();
        match w.observe(&note, &mut |o, n| log.prove_consistency(o, n)) {
            Ok(Observation::Cosigned { .. } | Observation::Unchanged { .. }) => {}
            other => panic!("cut at operation {k}: observing again gave {other:?}"),
        }
        assert_eq!(
            w.latest(&log.log_id()).unwrap().map(|n| n.body),
            Some(note.body.clone()),
            "cut at operation {k}: the latest note is the checkpoint observed"
        );
        assert_eq!(
            w.history(&log.log_id()).unwrap().len(),
            2,
            "cut at operation {k}: one history line per checkpoint"
        );
        log.close().unwrap();
    }
    assert!(
        struck_mid_observation > 0,
        "no cut landed inside an observation"
    );
}
