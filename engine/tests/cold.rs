//! The cold tier end to end on real directories: compaction moves sealed segments to a
//! store and every read still works across tiers; a store that fails at any step of a
//! compaction, truncates, corrupts or is down never loses a record and never gets a damaged
//! object trusted; a crash between the manifest entry and the removal is finished by the
//! next compaction; the manifest's rules at open; and an attacker who rewrites both a cold
//! object and the manifest consistently is still caught by the records' own checks.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tally_engine::cold::{ColdStore, DirStore, FaultyStore, StoreOp};
use tally_engine::format::cold::{
    ColdEncodeOptions, MANIFEST_ENTRY_LEN, MANIFEST_HEADER_LEN, decode_cold, decode_manifest_entry,
    decompress_block, encode_cold, encode_manifest_entry,
};
use tally_engine::format::files::{COLD_MANIFEST_FILE, cold_object_key};
use tally_engine::format::record::RecordHeader;
use tally_engine::{
    ColdOptions, CompactPolicy, Direction, Error, EventData, ExpectedVersion, Log, Options,
    Position, RecordedEvent, SegmentSeq,
};

const STREAMS: u64 = 5;

fn opts(store: Arc<dyn ColdStore>) -> Options {
    Options {
        segment_bytes: 64 * 1024,
        cold: ColdOptions {
            store: Some(store),
            policy: CompactPolicy {
                keep_local_segments: 2,
                ..CompactPolicy::default()
            },
            attempts: 1,
            first_retry_wait: Duration::ZERO,
            ..ColdOptions::default()
        },
        ..Options::default()
    }
}

/// Appends `n` events round robin over `STREAMS` streams, in batches of 10.
fn fill(log: &Log, n: u64) {
    for b in 0..n / 10 {
        let stream = format!("trade-{}", b % STREAMS);
        let events: Vec<EventData> = (0..10)
            .map(|i| {
                let k = b * 10 + i;
                EventData::json(
                    "TradeAmended",
                    format!(
                        "{{\"trade\":{k},\"book\":\"rates-{}\",\"qty\":\"{}.25\"}}",
                        k % 3,
                        k * 7
                    ),
                )
                .aggregate_type("Trade")
                .actor("desk-a")
                .correlation_id(format!("corr-{}", k % 11))
            })
            .collect();
        log.append(&stream, ExpectedVersion::Any, &events).unwrap();
    }
}

/// Everything a reader can see: the whole log both ways and every stream.
fn snapshot(
    log: &Log,
) -> (
    Vec<RecordedEvent>,
    Vec<RecordedEvent>,
    Vec<Vec<RecordedEvent>>,
) {
    let fwd = log
        .read_all(Position(0), usize::MAX, Direction::Forward)
        .unwrap();
    let back = log
        .read_all(Position(u64::MAX), usize::MAX, Direction::Backward)
        .unwrap();
    let streams = (0..STREAMS)
        .map(|s| {
            log.read_stream(&format!("trade-{s}"), 0, usize::MAX, Direction::Forward)
                .unwrap()
        })
        .collect();
    (fwd, back, streams)
}

fn local_segments(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".seg"))
        .collect();
    v.sort();
    v
}

fn cold_count(log: &Log) -> usize {
    log.segments().iter().filter(|s| s.cold.is_some()).count()
}

/// A log of several sealed segments, closed; returns its directory's store root too.
fn sealed_log(dir: &Path, store: &Arc<dyn ColdStore>, n: u64) {
    let log = Log::open(dir, opts(Arc::clone(store))).unwrap();
    fill(&log, n);
    log.wait_sealed().unwrap();
    assert!(
        log.segments().len() >= 6,
        "{} segments",
        log.segments().len()
    );
    log.close().unwrap();
}

/// What a reader sees of a log: forwards, backwards, and each stream.
type Snapshot = (
    Vec<RecordedEvent>,
    Vec<RecordedEvent>,
    Vec<Vec<RecordedEvent>>,
);

/// A log of several sealed segments, compacted by the test policy to a directory store.
struct Compacted {
    dir: tempfile::TempDir,
    root: tempfile::TempDir,
    store: Arc<dyn ColdStore>,
    /// What it read as before the compaction.
    before: Snapshot,
}

fn compacted(n: u64) -> Compacted {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, n);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let before = snapshot(&log);
    log.compact(None, false).unwrap();
    log.close().unwrap();
    Compacted {
        dir,
        root,
        store,
        before,
    }
}

#[test]
fn compaction_moves_sealed_segments_and_every_read_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, 3_000);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    log.wait_sealed().unwrap();
    let before = snapshot(&log);
    let segments = log.segments();
    let sealed = segments.iter().filter(|s| s.sealed).count();

    let files = local_segments(dir.path());
    let dry = log.compact(None, true).unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.moved.len(), sealed - 2, "all sealed but the newest two");
    assert_eq!(cold_count(&log), 0, "a dry run moves nothing");
    assert_eq!(local_segments(dir.path()), files);

    let report = log.compact(None, false).unwrap();
    assert_eq!(report.moved.len(), sealed - 2);
    assert!(
        report
            .moved
            .iter()
            .all(|m| m.object_bytes > 0 && m.object_bytes < m.record_bytes)
    );
    assert_eq!(cold_count(&log), sealed - 2);
    assert_eq!(
        local_segments(dir.path()).len(),
        files.len() - (sealed - 2),
        "the moved segments' files left the directory"
    );
    assert_eq!(log.segments().len(), segments.len());
    for m in &report.moved {
        assert_eq!(m.key, cold_object_key(&log.log_id(), m.seq));
        assert!(store.head(&m.key).unwrap().is_some());
    }
    // Reads in this open (served by the cache the local files moved into).
    assert_eq!(snapshot(&log), before);
    assert!(log.verify().is_ok());
    // A second run has nothing left to move.
    assert!(log.compact(None, false).unwrap().moved.is_empty());
    log.close().unwrap();

    // A subscriber catching up from position 0 reads through the cold segments.
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let mut tail = log.tail(Position(0));
    let mut caught_up = Vec::new();
    while caught_up.len() < before.0.len() {
        caught_up.push(tail.next().unwrap().unwrap());
    }
    assert_eq!(caught_up, before.0);
    drop(tail);
    log.close().unwrap();

    // A new open learns the cold segments from the manifest and fetches them on reads.
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    assert_eq!(cold_count(&log), sealed - 2);
    assert_eq!(log.cold_status().fetches, 0, "open fetches nothing");
    assert_eq!(snapshot(&log), before);
    assert!(log.cold_status().fetches >= (sealed - 2) as u64);
    let report = log.verify().unwrap();
    assert_eq!(report.records, before.0.len() as u64);
    // Appends go on, on top of a log whose oldest segments are cold.
    fill(&log, 200);
    assert_eq!(
        log.read_all(Position(0), usize::MAX, Direction::Forward)
            .unwrap()
            .len(),
        before.0.len() + 200
    );
    log.close().unwrap();

    // Without a store given, the open uses the `cold.store` the first compaction wrote.
    let plain = Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    };
    let log = Log::open(dir.path(), plain).unwrap();
    assert_eq!(
        log.read_all(Position(0), 10, Direction::Forward).unwrap(),
        before.0[..10]
    );
    log.close().unwrap();
}

#[test]
fn a_cache_smaller_than_the_log_evicts_and_fetches_again() {
    let Compacted {
        dir,
        root: _root,
        store,
        before,
    } = compacted(3_000);
    let mut o = opts(Arc::clone(&store));
    o.cold.cache_bytes = 1; // one segment at a time
    let log = Log::open(dir.path(), o).unwrap();
    assert_eq!(snapshot(&log), before);
    let status = log.cold_status();
    assert_eq!(status.cached.0, 1, "the budget keeps only the newest fetch");
    let cache: Vec<_> = std::fs::read_dir(dir.path().join("cold-cache"))
        .unwrap()
        .collect();
    assert_eq!(cache.len(), 1, "evicted copies are removed from the disk");
    assert!(
        status.fetches > log.segments().iter().filter(|s| s.cold.is_some()).count() as u64,
        "reading forwards, backwards and by stream fetched segments again"
    );
    log.close().unwrap();
}

#[test]
fn a_read_only_view_reads_cold_segments_through_a_private_cache() {
    let Compacted {
        dir,
        root: _root,
        store,
        before,
    } = compacted(2_000);
    let listing = |p: &Path| {
        let mut v: Vec<(String, u64)> = walk(p);
        v.sort();
        v
    };
    let files = listing(dir.path());
    let mut o = opts(Arc::clone(&store));
    o.recovery = tally_engine::RecoveryMode::ReadOnly;
    o.cold.cache_bytes = 1;
    let view = Log::open(dir.path(), o).unwrap();
    assert_eq!(snapshot(&view), before);
    assert!(
        view.cold_status().fetches > 0,
        "the view fetched what it read"
    );
    assert_eq!(
        listing(dir.path()),
        files,
        "a read-only view writes nothing into the data directory"
    );
    view.close().unwrap();
}

/// Opens with a store that fails at operation `k` of a compaction, runs it, crashes, and
/// checks that the reopened log holds every event and compacts completely afterwards.
#[test]
fn a_store_failing_at_any_step_of_a_compaction_loses_nothing() {
    let template = tempfile::tempdir().unwrap();
    let root0 = tempfile::tempdir().unwrap();
    let store0: Arc<dyn ColdStore> = Arc::new(DirStore::new(root0.path()).unwrap());
    sealed_log(template.path(), &store0, 1_500);
    let expected = {
        let log = Log::open(template.path(), opts(Arc::clone(&store0))).unwrap();
        let s = snapshot(&log);
        log.close().unwrap();
        s
    };
    // Count the store operations of an undisturbed compaction.
    let ops = {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let root = tempfile::tempdir().unwrap();
        let faulty = FaultyStore::new(Arc::new(DirStore::new(root.path()).unwrap()));
        let log = Log::open(dir.path(), opts(Arc::new(faulty.clone()))).unwrap();
        log.compact(None, false).unwrap();
        log.close().unwrap();
        faulty.ops()
    };
    assert!(ops.iter().any(|(op, _)| *op == StoreOp::Put));
    assert!(
        ops.iter().any(|(op, _)| *op == StoreOp::Get),
        "every put is read back"
    );
    for k in 1..=ops.len() as u64 {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let root = tempfile::tempdir().unwrap();
        let faulty = FaultyStore::new(Arc::new(DirStore::new(root.path()).unwrap()));
        let log = Log::open(dir.path(), opts(Arc::new(faulty.clone()))).unwrap();
        faulty.fail_in(Some(k));
        let r = log.compact(None, false);
        assert!(
            matches!(r, Err(Error::Cold { .. })),
            "operation {k} failed and the compaction said so: {r:?}"
        );
        log.crash();
        faulty.fail_in(None);
        let log = Log::open(dir.path(), opts(Arc::new(faulty.clone()))).unwrap();
        assert_eq!(
            snapshot(&log),
            expected,
            "after a failure at store operation {k}"
        );
        log.compact(None, false).unwrap();
        assert_eq!(snapshot(&log), expected);
        log.close().unwrap();
        let log = Log::open(dir.path(), opts(Arc::new(faulty))).unwrap();
        assert_eq!(
            snapshot(&log),
            expected,
            "reopened after the compaction finished"
        );
        log.verify().unwrap();
        log.close().unwrap();
    }
}

#[test]
fn a_store_that_truncates_or_corrupts_never_gets_a_segment_removed() {
    for fault in ["truncate", "corrupt"] {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        let faulty = FaultyStore::new(Arc::new(DirStore::new(root.path()).unwrap()));
        let store: Arc<dyn ColdStore> = Arc::new(faulty.clone());
        sealed_log(dir.path(), &store, 1_500);
        let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
        let before = snapshot(&log);
        let files = local_segments(dir.path());
        match fault {
            "truncate" => faulty.truncate_puts(Some(1000)),
            _ => faulty.corrupt_gets(Some(500)),
        }
        let err = log.compact(None, false).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, Error::Cold { seq: 0, .. }) && text.contains("00000000000000000000.cold"),
            "{fault}: the error names the segment and the object: {text}"
        );
        assert_eq!(
            local_segments(dir.path()),
            files,
            "{fault}: nothing removed"
        );
        assert_eq!(cold_count(&log), 0);
        assert!(!dir.path().join(COLD_MANIFEST_FILE).exists() || manifest_entries(dir.path()) == 0);
        assert_eq!(snapshot(&log), before);
        log.close().unwrap();
    }
}

#[test]
fn a_store_outage_leaves_local_reads_working_and_names_the_cold_segment() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let faulty = FaultyStore::new(Arc::new(DirStore::new(root.path()).unwrap()));
    let store: Arc<dyn ColdStore> = Arc::new(faulty.clone());
    sealed_log(dir.path(), &store, 2_000);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let before = snapshot(&log);
    log.compact(None, false).unwrap();
    log.close().unwrap();
    faulty.set_down(true);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    // The newest events are local: readable.
    let newest = log
        .read_all(Position(u64::MAX), 20, Direction::Backward)
        .unwrap();
    assert_eq!(newest, before.1[..20]);
    // The oldest are cold: a precise error, no panic, no partial result.
    let err = log
        .read_all(Position(0), 10, Direction::Forward)
        .unwrap_err();
    let text = format!("{err}: {:?}", std::error::Error::source(&err));
    assert!(matches!(err, Error::Cold { seq: 0, .. }), "{text}");
    assert!(
        text.contains("down"),
        "the store's own error is kept: {text}"
    );
    // Appends are unaffected.
    fill(&log, 50);
    faulty.set_down(false);
    assert_eq!(
        log.read_all(Position(0), 10, Direction::Forward).unwrap(),
        before.0[..10]
    );
    log.close().unwrap();
}

#[test]
fn a_crash_after_the_manifest_entry_is_finished_by_the_next_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, 2_000);
    let seg0 = dir.path().join(SegmentSeq(0).file_name());
    let saved = std::fs::read(&seg0).unwrap();
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let before = snapshot(&log);
    log.compact(None, false).unwrap();
    log.close().unwrap();
    // As if the rename of step 5 had not happened: the entry is there, so is the file.
    std::fs::write(&seg0, &saved).unwrap();
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    assert!(
        log.segments()[0].cold.is_none(),
        "a segment both local and cold is read locally"
    );
    assert_eq!(snapshot(&log), before);
    let report = log.compact(None, false).unwrap();
    assert_eq!(report.finished, vec![SegmentSeq(0)]);
    assert!(report.moved.is_empty());
    assert!(!seg0.exists());
    assert_eq!(
        manifest_entries(dir.path()),
        cold_count(&log),
        "no entry written twice"
    );
    assert_eq!(snapshot(&log), before);
    log.close().unwrap();
}

fn manifest_entries(dir: &Path) -> usize {
    let len = std::fs::metadata(dir.join(COLD_MANIFEST_FILE))
        .unwrap()
        .len() as usize;
    (len - MANIFEST_HEADER_LEN) / MANIFEST_ENTRY_LEN
}

#[test]
fn the_manifest_is_trusted_only_as_far_as_its_rules_allow() {
    let Compacted {
        dir,
        root: _root,
        store,
        before,
    } = compacted(2_000);
    let path = dir.path().join(COLD_MANIFEST_FILE);
    let good = std::fs::read(&path).unwrap();
    let open = || Log::open(dir.path(), opts(Arc::clone(&store)));

    // A partial entry at the end (an append cut short) is ignored.
    let mut torn = good.clone();
    torn.extend_from_slice(&[7u8; 100]);
    std::fs::write(&path, &torn).unwrap();
    let log = open().unwrap();
    assert_eq!(snapshot(&log), before);
    log.close().unwrap();

    // A damaged last entry whose segment is gone from the directory refuses the open.
    let mut bad = good.clone();
    let last = bad.len() - 10;
    bad[last] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    let err = open().unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    // So does a damaged entry before the last.
    let mut bad = good.clone();
    bad[MANIFEST_HEADER_LEN + 20] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(matches!(open().unwrap_err(), Error::Corrupt { .. }));
    // A manifest that lost its last entry leaves a segment unaccounted for.
    std::fs::write(&path, &good[..good.len() - MANIFEST_ENTRY_LEN]).unwrap();
    let err = open().unwrap_err();
    assert!(err.to_string().contains("is missing"), "{err}");
    std::fs::write(&path, &good).unwrap();
    let log = open().unwrap();
    assert_eq!(snapshot(&log), before);
    log.close().unwrap();
}

#[test]
fn a_cold_object_altered_in_the_store_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, 2_000);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    log.compact(None, false).unwrap();
    let key = cold_object_key(&log.log_id(), SegmentSeq(1));
    log.close().unwrap();
    let mut object = store.get(&key).unwrap();
    let mid = object.len() / 2;
    object[mid] ^= 0x10;
    store.put(&key, &object).unwrap();
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let err = log.verify().unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Cold { seq: 1, .. }) && text.contains(&key) && text.contains("hash"),
        "{text}"
    );
    log.close().unwrap();
}

/// Someone with write access to both the store and the data directory rewrites a cold
/// segment with an altered payload and fixes up the manifest to match: the object and
/// manifest checks pass, and the records' own checksums and chain still catch it.
#[test]
fn a_consistent_rewrite_of_object_and_manifest_is_still_caught_by_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, 2_000);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    log.compact(None, false).unwrap();
    let key = cold_object_key(&log.log_id(), SegmentSeq(1));
    log.close().unwrap();

    let object = store.get(&key).unwrap();
    let layout = decode_cold(&object).unwrap();
    let mut data = Vec::new();
    for b in &layout.blocks {
        let r = b.object_range();
        data.extend(decompress_block(b, &object[r.start as usize..r.end as usize]).unwrap());
    }
    // Change one digit of a quantity inside a payload.
    let at = data.windows(4).position(|w| w == b".25\"").unwrap() - 1;
    data[at] = if data[at] == b'1' { b'2' } else { b'1' };
    // Record lengths from the headers.
    let h = layout.header.segment_header;
    let f = layout.header.segment_footer;
    let mut lens = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        let header = RecordHeader::decode_in(&data[off..], h.layout).unwrap();
        lens.push(header.record_len());
        off += header.record_len() as usize;
    }
    let forged = encode_cold(&h, &f, &data, &lens, ColdEncodeOptions::default()).unwrap();
    store.put(&key, &forged).unwrap();
    // Fix up the manifest entry of segment 1 to the forged object.
    let path = dir.path().join(COLD_MANIFEST_FILE);
    let mut manifest = std::fs::read(&path).unwrap();
    let at = MANIFEST_HEADER_LEN + MANIFEST_ENTRY_LEN;
    let mut entry = decode_manifest_entry(&manifest[at..at + MANIFEST_ENTRY_LEN]).unwrap();
    assert_eq!(entry.seq, SegmentSeq(1));
    entry.object_len = forged.len() as u64;
    entry.object_hash = *blake3::hash(&forged).as_bytes();
    manifest[at..at + MANIFEST_ENTRY_LEN].copy_from_slice(&encode_manifest_entry(&entry));
    std::fs::write(&path, &manifest).unwrap();

    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let err = log.verify().unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains("cold-cache")
            && err.to_string().contains(&format!(
                "[cold tier: segment 1 from file://{}",
                root.path().display()
            )),
        "the finding names the tier, the object and the copy it read: {err}"
    );
    log.close().unwrap();
}

/// Every file under `dir` with its length.
fn walk(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push((e.path().display().to_string(), e.metadata().unwrap().len()));
        }
    }
    out
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() && e.file_name() != "tally.lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn background_compaction_moves_segments_while_appends_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    let mut o = opts(Arc::clone(&store));
    o.cold.background = Some(Duration::from_millis(5));
    let log = Log::open(dir.path(), o.clone()).unwrap();
    fill(&log, 3_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cold_count(&log) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            log.cold_status()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    fill(&log, 500);
    let before = snapshot(&log);
    assert_eq!(before.0.len(), 3_500);
    assert!(
        log.cold_status().last_error.is_none(),
        "{:?}",
        log.cold_status()
    );
    log.close().unwrap();
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    assert!(cold_count(&log) >= 3);
    assert_eq!(snapshot(&log), before);
    log.verify().unwrap();
    log.close().unwrap();
}

/// The options of a log and its directory store both on the simulated disk, for a process
/// that lives until the next power cut.
fn sim_options(sim: &tally_engine::sim::SimFs) -> Options {
    let storage = tally_engine::Storage::simulated(sim);
    let store = DirStore::with_storage("/cold/store", storage.clone()).unwrap();
    let mut o = opts(Arc::new(store));
    o.storage = storage;
    o.checkpoint_interval = None;
    o.index_attributes = false;
    o
}

/// A power cut (unsynced pages and directory entries kept or lost at random, pages torn)
/// at every disk operation of a compaction, in turn: after it the log holds every event,
/// the next compaction finishes, and the log verifies.
#[test]
fn a_power_cut_at_any_step_of_a_compaction_loses_nothing() {
    use tally_engine::sim::{Cut, SimFs};
    let data = std::path::PathBuf::from("/cold/data");
    for seed in [11u64, 12] {
        let mut n = 1;
        loop {
            let sim = SimFs::new(seed);
            let log = Log::open(&data, sim_options(&sim)).unwrap();
            fill(&log, 2_000);
            log.wait_sealed().unwrap();
            let expected = snapshot(&log);
            log.close().unwrap();
            let log = Log::open(&data, sim_options(&sim)).unwrap();
            log.wait_sealed().unwrap();
            sim.cut_power_after(n, Cut::seeded_loss());
            let done = log.compact(None, false);
            let fired = sim.generation() > 0;
            log.crash();
            if !fired {
                let report = done.unwrap();
                assert!(report.moved.len() >= 3, "{report:?}");
                break;
            }
            let log = Log::open(&data, sim_options(&sim))
                .unwrap_or_else(|e| panic!("seed {seed}, power cut at operation {n}: {e}"));
            assert_eq!(
                snapshot(&log),
                expected,
                "seed {seed}, power cut at operation {n}"
            );
            log.compact(None, false)
                .unwrap_or_else(|e| panic!("seed {seed}, cut at {n}: {e}"));
            log.verify()
                .unwrap_or_else(|e| panic!("seed {seed}, cut at {n}: {e}"));
            log.close().unwrap();
            let log = Log::open(&data, sim_options(&sim)).unwrap();
            assert_eq!(
                snapshot(&log),
                expected,
                "seed {seed}, cut at {n}, reopened"
            );
            assert!(
                cold_count(&log) >= 3,
                "seed {seed}, cut at {n}: {:?}",
                log.segments()
            );
            log.close().unwrap();
            n += 1;
        }
        assert!(
            n > 20,
            "seed {seed}: the compaction took only {n} disk operations"
        );
    }
}

/// A stream read of cold segments fetches only the blocks that hold its events (no whole
/// object), from a bounded block cache; a block altered in the store is refused by its CRC
/// and named, and a whole-segment read (replay) still works beside it.
#[test]
fn a_stream_read_fetches_only_the_blocks_it_needs() {
    let Compacted {
        dir,
        root: _root,
        store,
        before,
    } = compacted(3_000);

    let mut o = opts(Arc::clone(&store));
    o.cold.block_cache_bytes = 1 << 20;
    let log = Log::open(dir.path(), o.clone()).unwrap();
    let one = log
        .read_stream("trade-3", 0, usize::MAX, Direction::Forward)
        .unwrap();
    assert_eq!(one, before.2[3]);
    let status = log.cold_status();
    assert_eq!(status.fetches, 0, "no whole object was fetched: {status:?}");
    assert!(status.block_fetches > 0);
    // Again: served by the block cache.
    let again = log
        .read_stream("trade-3", u64::MAX, usize::MAX, Direction::Backward)
        .unwrap();
    assert_eq!(again.len(), one.len());
    assert_eq!(log.cold_status().block_fetches, status.block_fetches);
    log.close().unwrap();

    // Alter one byte inside the first frame of segment 0's object.
    let key = cold_object_key(&log_id(dir.path()), SegmentSeq(0));
    let mut object = store.get(&key).unwrap();
    let layout = decode_cold(&object).unwrap();
    let at = layout.blocks[0].object_offset as usize + 10;
    object[at] ^= 0x04;
    store.put(&key, &object).unwrap();
    let log = Log::open(dir.path(), o).unwrap();
    let err = log
        .read_stream("trade-0", 0, usize::MAX, Direction::Forward)
        .unwrap_err();
    assert!(
        matches!(err, Error::Cold { seq: 0, .. }) && err.to_string().contains("block at position"),
        "{err}"
    );
    log.close().unwrap();
}

fn log_id(dir: &Path) -> [u8; 16] {
    let bytes = std::fs::read(dir.join("tally.meta")).unwrap();
    bytes[16..32].try_into().unwrap()
}

/// A copy of a log (a backup restored by reference) shares the store and the log id. Once it
/// diverges (here: the same log id with another history from the start), its compaction must
/// never replace the original's objects: it refuses, and the original still reads. A store other than the one in `cold.store` is refused at open.
#[test]
fn objects_are_never_replaced_and_a_log_keeps_one_store() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, 2_000);
    let mut o = opts(Arc::clone(&store));
    o.cold.policy.keep_local_segments = 4;
    let log = Log::open(dir.path(), o.clone()).unwrap();
    let before = snapshot(&log);
    let moved = log.compact(None, false).unwrap().moved.len();
    assert!(moved >= 2);
    log.close().unwrap();

    // Rewrite the copy from scratch with other events: same log id, another history.
    let meta = std::fs::read(dir.path().join("tally.meta")).unwrap();
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("tally.meta"), &meta).unwrap();
    let c = Log::open(other.path(), opts(Arc::clone(&store))).unwrap();
    for i in 0..1_500u64 {
        c.append(
            "other",
            ExpectedVersion::Any,
            &[EventData::json(
                "X",
                format!("{{\"i\":{i},\"pad\":\"{}\"}}", "y".repeat(200)),
            )],
        )
        .unwrap();
    }
    c.wait_sealed().unwrap();
    let err = c.compact(None, false).unwrap_err();
    assert!(
        matches!(err, Error::Cold { seq: 0, .. }) && err.to_string().contains("never replaced"),
        "{err}"
    );
    c.close().unwrap();
    let log = Log::open(dir.path(), o).unwrap();
    assert_eq!(snapshot(&log), before, "the original's objects are intact");
    log.verify().unwrap();
    log.close().unwrap();

    // Another store than the one the log's cold segments are in.
    let elsewhere = tempfile::tempdir().unwrap();
    let other_store: Arc<dyn ColdStore> = Arc::new(DirStore::new(elsewhere.path()).unwrap());
    let err = Log::open(dir.path(), opts(other_store)).unwrap_err();
    assert!(matches!(err, Error::InvalidOptions { .. }), "{err}");
    assert!(err.to_string().contains("cold.store"), "{err}");
}

#[test]
fn a_manifest_entry_of_an_unknown_kind_refuses_the_open() {
    let Compacted {
        dir,
        root: _root,
        store,
        ..
    } = compacted(2_000);
    let path = dir.path().join(COLD_MANIFEST_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    // The last entry says kind 2 with a good CRC (a newer build's entry): never dropped.
    let at = bytes.len() - MANIFEST_ENTRY_LEN;
    bytes[at] = 2;
    let crc = crc32fast::hash(&bytes[at..at + MANIFEST_ENTRY_LEN - 4]);
    let end = bytes.len();
    bytes[end - 4..].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let err = Log::open(dir.path(), opts(store)).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
}

/// A read-only view opened beside a writer (as `tally verify` beside tallyd) reads a segment
/// that the writer moved to the cold tier after the view opened: the manifest is read
/// again, and the segment is read through the store.
#[test]
fn a_read_only_view_follows_a_compaction_after_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(root.path()).unwrap());
    sealed_log(dir.path(), &store, 2_000);
    let writer = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    writer.wait_sealed().unwrap();
    let before = snapshot(&writer);
    let mut o = opts(Arc::clone(&store));
    o.recovery = tally_engine::RecoveryMode::ReadOnly;
    let view = Log::open(dir.path(), o).unwrap();
    assert_eq!(cold_count(&view), 0);
    let moved = writer.compact(None, false).unwrap().moved.len();
    assert!(moved >= 3);
    assert_eq!(snapshot(&view), before, "the view reads what moved");
    assert!(view.cold_status().fetches + view.cold_status().block_fetches > 0);
    view.verify().unwrap();
    view.close().unwrap();
    writer.close().unwrap();
}

/// A segment holding the producer policy (`$producers`), which every open reads, stays local:
/// the log opens with the store down, its policy still holds (an unsigned append where
/// signatures are required is refused), and the segments around it moved.
#[test]
fn segments_an_open_reads_stay_local_so_a_log_opens_with_the_store_down() {
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let faulty = FaultyStore::new(Arc::new(DirStore::new(root.path()).unwrap()));
    let store: Arc<dyn ColdStore> = Arc::new(faulty.clone());
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    fill(&log, 500);
    log.require_signatures("settle-", "ops", "settlement instructions are signed")
        .unwrap();
    fill(&log, 2_000);
    log.wait_sealed().unwrap();
    let policy_seg = log
        .read_stream("$producers", 0, 1, Direction::Forward)
        .unwrap()[0]
        .position;
    let report = log.compact(None, false).unwrap();
    assert!(report.moved.len() >= 3, "{report:?}");
    let segs = log.segments();
    let holder = segs
        .iter()
        .find(|s| {
            s.base_position <= policy_seg && policy_seg.0 < s.base_position.0 + s.record_count
        })
        .unwrap();
    assert!(holder.cold.is_none(), "{holder:?}");
    assert!(segs.iter().any(|s| s.cold.is_some() && s.seq < holder.seq));
    assert!(segs.iter().any(|s| s.cold.is_some() && s.seq > holder.seq));
    log.close().unwrap();
    faulty.set_down(true);
    let log = Log::open(dir.path(), opts(Arc::clone(&store))).unwrap();
    let r = log.append(
        "settle-1",
        ExpectedVersion::Any,
        &[EventData::new("SettlementInstructed", b"x".to_vec())],
    );
    assert!(matches!(r, Err(Error::SignatureRefused { .. })), "{r:?}");
    fill(&log, 10);
    log.close().unwrap();
}
