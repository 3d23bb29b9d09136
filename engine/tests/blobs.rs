//! Large payloads as content-addressed blobs (docs/FORMAT.md 6.5): an append stores a payload
//! above the threshold in the cold tier's store and the event refers to it by hash; reads
//! return the reference and the blob's bytes checked against it; verify reads every blob; a
//! blob changed, removed or never stored is caught by name; a store failing at any step of
//! an append leaves nothing acknowledged that refers to a missing blob; a power cut after an
//! acknowledged append keeps the blob; a version 2 log never writes a reference.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tally_engine::cold::{ColdStore, DirStore, FaultyStore};
use tally_engine::format::blob::{BLOB_REF_LEN, BlobRef};
use tally_engine::format::files::blob_object_key;
use tally_engine::{
    ColdOptions, ContentType, Direction, Error, EventData, EventId, ExpectedVersion, Log, Options,
    Position, VerifyOptions,
};

fn opts(store: Option<Arc<dyn ColdStore>>) -> Options {
    Options {
        segment_bytes: 256 * 1024,
        cold: ColdOptions {
            store,
            attempts: 1,
            first_retry_wait: Duration::ZERO,
            ..ColdOptions::default()
        },
        ..Options::default()
    }
}

/// `len` bytes that differ with `seed`.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
        .collect()
}

fn log_id(dir: &Path) -> [u8; 16] {
    let meta = std::fs::read(dir.join("tally.meta")).unwrap();
    meta[16..32].try_into().unwrap()
}

fn blob_path(store: &Path, dir: &Path, blob: &BlobRef) -> std::path::PathBuf {
    store.join(blob_object_key(&log_id(dir), &blob.hash))
}

#[test]
fn a_payload_above_the_threshold_is_stored_as_a_blob_and_read_back_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store_dir.path()).unwrap());
    let log = Log::open(dir.path(), opts(Some(Arc::clone(&store)))).unwrap();
    let term_sheet = bytes(200_000, 7);
    // Larger than an inline payload may be (1 MiB), as a blob it is accepted.
    let confirmation = bytes(3 << 20, 9);
    let small = bytes(1_000, 3);
    let events = [
        EventData::new("TermSheetAttached", term_sheet.clone()).aggregate_type("Trade"),
        EventData::json("TradeAmended", "{\"qty\":\"10\"}"),
        EventData::new("ConfirmationAttached", confirmation.clone()),
        EventData::new("Note", small.clone()),
    ];
    log.append("trade-1", ExpectedVersion::NoStream, &events)
        .unwrap();
    let read = log
        .read_stream("trade-1", 0, 10, Direction::Forward)
        .unwrap();
    assert_eq!(read.len(), 4);
    let blob = read[0].blob().expect("the term sheet is a blob");
    assert_eq!(blob, BlobRef::of(&term_sheet).unwrap());
    assert_eq!(read[0].payload(), &blob.encode()[..]);
    assert_eq!(read[0].payload().len(), BLOB_REF_LEN);
    assert_eq!(read[0].aggregate_type(), "Trade");
    assert_eq!(read[1].blob(), None);
    assert_eq!(read[1].payload(), b"{\"qty\":\"10\"}");
    assert_eq!(read[3].blob(), None, "1,000 bytes stay inline");
    assert_eq!(read[3].payload(), &small[..]);
    assert_eq!(log.read_blob(&blob).unwrap(), term_sheet);
    let big = read[2].blob().unwrap();
    assert_eq!(big.size, 3 << 20);
    assert_eq!(log.read_blob(&big).unwrap(), confirmation);
    // The object is where FORMAT.md says, holding the bytes themselves.
    assert_eq!(
        std::fs::read(blob_path(store_dir.path(), dir.path(), &blob)).unwrap(),
        term_sheet
    );
    assert_eq!(
        log.read_blob_range(&big, 10..20).unwrap(),
        confirmation[10..20]
    );
    assert!(log.read_blob_range(&big, 10..(3 << 20) + 1).is_err());
    let report = log
        .verify_with(&VerifyOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!((report.blob_refs, report.blobs_checked), (2, 2));
    assert_eq!(report.format_version, tally_engine::format::FORMAT_VERSION);
    log.close().unwrap();
    // The store was recorded: a later open without one finds it, and so does a read-only
    // view.
    assert!(
        std::fs::read_to_string(dir.path().join("cold.store"))
            .unwrap()
            .starts_with("file://")
    );
    let log = Log::open(dir.path(), opts(None)).unwrap();
    assert_eq!(log.read_blob(&blob).unwrap(), term_sheet);
    log.close().unwrap();
}

#[test]
fn the_same_bytes_are_stored_once_and_a_retry_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(
        DirStore::new(store_dir.path()).unwrap(),
    )));
    let log = Log::open(dir.path(), opts(Some(faulty.clone() as Arc<dyn ColdStore>))).unwrap();
    let payload = bytes(100_000, 1);
    let id = EventId([5; 16]);
    let e = EventData::new("TermSheetAttached", payload.clone()).with_id(id);
    let first = log
        .append(
            "trade-2",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&e),
        )
        .unwrap();
    let puts = |f: &FaultyStore| {
        f.ops()
            .iter()
            .filter(|(op, _)| format!("{op:?}") == "Put")
            .count()
    };
    assert_eq!(puts(&faulty), 1);
    // A retry of the same event: the same result, and the blob is not written again.
    let again = log
        .append(
            "trade-2",
            ExpectedVersion::NoStream,
            std::slice::from_ref(&e),
        )
        .unwrap();
    assert_eq!(again, first);
    // Another event with the same bytes refers to the same blob.
    log.append(
        "trade-3",
        ExpectedVersion::Any,
        &[EventData::new("TermSheetAttached", payload.clone())],
    )
    .unwrap();
    assert_eq!(puts(&faulty), 1, "{:?}", faulty.ops());
    let all = log.read_all(Position(0), 10, Direction::Forward).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].blob(), all[1].blob());
    log.close().unwrap();
}

#[test]
fn a_blob_altered_or_removed_in_the_store_is_named_by_reads_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store_dir.path()).unwrap());
    let log = Log::open(dir.path(), opts(Some(store))).unwrap();
    log.append(
        "trade-4",
        ExpectedVersion::Any,
        &[
            EventData::new("Small", b"x".to_vec()),
            EventData::new("TermSheetAttached", bytes(70_000, 2)),
        ],
    )
    .unwrap();
    let blob = log
        .read_stream("trade-4", 1, 1, Direction::Forward)
        .unwrap()[0]
        .blob()
        .unwrap();
    log.verify().unwrap();
    // Same length, one byte changed: the hash no longer matches.
    let path = blob_path(store_dir.path(), dir.path(), &blob);
    let mut b = std::fs::read(&path).unwrap();
    b[12_345] ^= 0x40;
    std::fs::write(&path, &b).unwrap();
    let hex = blob.hex();
    match log.read_blob(&blob) {
        Err(Error::Blob { hash, detail, .. }) => {
            assert_eq!(hash, hex);
            assert!(detail.contains("do not match"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    match log.verify() {
        Err(Error::Blob { hash, detail, .. }) => {
            assert_eq!(hash, hex);
            assert!(detail.contains("position 1"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // Skipping blob checks: the records verify, the reference is counted.
    let skip = VerifyOptions {
        skip_blobs: true,
        ..VerifyOptions::default()
    };
    let report = log.verify_with(&skip, &mut |_| {}).unwrap();
    assert_eq!((report.blob_refs, report.blobs_checked), (1, 0));
    // Removed: named as missing.
    std::fs::remove_file(&path).unwrap();
    match log.verify() {
        Err(Error::Blob {
            hash,
            source: Some(s),
            ..
        }) => {
            assert_eq!(hash, hex);
            assert_eq!(s.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    log.close().unwrap();
}

#[test]
fn an_append_refers_only_to_blobs_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store_dir.path()).unwrap());
    let log = Log::open(dir.path(), opts(Some(store))).unwrap();
    let doc = bytes(5_000, 4);
    // Uploaded first, then referred to (what a client does through tallyd).
    let blob = log.put_blob(&doc).unwrap();
    assert_eq!(blob, BlobRef::of(&doc).unwrap());
    log.append(
        "trade-5",
        ExpectedVersion::NoStream,
        &[EventData::with_blob(
            "ConfirmationAttached",
            ContentType::Binary,
            blob,
        )],
    )
    .unwrap();
    let e = &log
        .read_stream("trade-5", 0, 1, Direction::Forward)
        .unwrap()[0];
    assert_eq!(e.blob(), Some(blob));
    assert_eq!(log.read_blob(&blob).unwrap(), doc);
    // A reference to bytes the store never got, or with a wrong size: refused, nothing
    // written.
    let next = log.next_position();
    let missing = BlobRef::of(b"never uploaded").unwrap();
    let wrong_size = BlobRef {
        size: blob.size + 1,
        ..blob
    };
    for bad in [missing, wrong_size] {
        let r = log.append(
            "trade-5",
            ExpectedVersion::Any,
            &[EventData::with_blob(
                "ConfirmationAttached",
                ContentType::Binary,
                bad,
            )],
        );
        assert!(matches!(r, Err(Error::Blob { .. })), "{r:?}");
        assert_eq!(log.next_position(), next);
    }
    // A payload and a reference together are refused.
    let mut both = EventData::with_blob("X", ContentType::Binary, blob);
    both.payload = b"also".to_vec();
    assert!(matches!(
        log.append("trade-5", ExpectedVersion::Any, &[both]),
        Err(Error::InvalidAppend { .. })
    ));
    assert!(matches!(log.put_blob(&[]), Err(Error::InvalidEvent { .. })));
    log.close().unwrap();
}

#[test]
fn a_store_failing_at_any_step_of_an_append_leaves_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let faulty = Arc::new(FaultyStore::new(Arc::new(
        DirStore::new(store_dir.path()).unwrap(),
    )));
    let log = Log::open(dir.path(), opts(Some(faulty.clone() as Arc<dyn ColdStore>))).unwrap();
    let mut step = 1;
    loop {
        let payload = bytes(80_000, step as u8);
        faulty.fail_in(Some(step));
        let before = log.next_position();
        let r = log.append(
            "trade-6",
            ExpectedVersion::Any,
            &[EventData::new("TermSheetAttached", payload.clone())],
        );
        faulty.fail_in(None);
        match r {
            Ok(_) => {
                // The fault fell after the append's store operations: a look for the blob,
                // its write, and the check of what the store holds.
                assert_eq!(step, 4, "the append made {} store operations", step - 1);
                break;
            }
            Err(Error::Blob { detail, .. }) => {
                assert_eq!(log.next_position(), before, "step {step}: {detail}");
            }
            Err(e) => panic!("step {step}: {e}"),
        }
        step += 1;
    }
    // A store that keeps fewer bytes than it was given: the append fails, naming what the
    // store holds, and nothing is written.
    faulty.truncate_puts(Some(1_000));
    let before = log.next_position();
    match log.append(
        "trade-6",
        ExpectedVersion::Any,
        &[EventData::new("TermSheetAttached", bytes(80_000, 0xee))],
    ) {
        Err(Error::Blob { detail, .. }) => assert!(detail.contains("1000 bytes"), "{detail}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.next_position(), before);
    faulty.truncate_puts(None);
    // Local reads never needed the store; every acknowledged event's blob reads back.
    faulty.set_down(true);
    let events = log
        .read_stream("trade-6", 0, 100, Direction::Forward)
        .unwrap();
    assert_eq!(events.len(), 1);
    assert!(matches!(
        log.read_blob(&events[0].blob().unwrap()),
        Err(Error::Blob { .. })
    ));
    faulty.set_down(false);
    log.verify().unwrap();
    log.close().unwrap();
}

#[test]
fn without_a_store_or_in_a_version_2_log_payloads_stay_inline() {
    for (format_version, with_store) in [(3, false), (2, true)] {
        let dir = tempfile::tempdir().unwrap();
        let store_dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store_dir.path()).unwrap());
        let log = Log::open(
            dir.path(),
            Options {
                format_version,
                ..opts(with_store.then_some(store))
            },
        )
        .unwrap();
        let payload = bytes(200_000, 5);
        log.append(
            "trade-7",
            ExpectedVersion::Any,
            &[EventData::new("TermSheetAttached", payload.clone())],
        )
        .unwrap();
        let e = &log
            .read_stream("trade-7", 0, 1, Direction::Forward)
            .unwrap()[0];
        assert_eq!(e.blob(), None);
        assert_eq!(e.payload(), &payload[..]);
        // Above the inline limit there is nowhere to put it.
        let r = log.append(
            "trade-7",
            ExpectedVersion::Any,
            &[EventData::new("TermSheetAttached", bytes(2 << 20, 6))],
        );
        assert!(matches!(r, Err(Error::InvalidEvent { .. })), "{r:?}");
        if format_version == 2 {
            let r = log.append(
                "trade-7",
                ExpectedVersion::Any,
                &[EventData::with_blob(
                    "X",
                    ContentType::Binary,
                    BlobRef::of(b"x").unwrap(),
                )],
            );
            assert!(matches!(r, Err(Error::InvalidAppend { .. })), "{r:?}");
            assert!(matches!(
                log.put_blob(b"x"),
                Err(Error::InvalidAppend { .. })
            ));
            assert!(!dir.path().join("cold.store").exists());
        } else {
            assert!(matches!(log.put_blob(b"x"), Err(Error::Blob { .. })));
        }
        log.verify().unwrap();
        log.close().unwrap();
    }
}

/// A power cut at every disk operation of an append that stores a blob, in turn (the log
/// and the store on the simulated disk, unsynced bytes lost at random, pages torn): after
/// it, every acknowledged event is there with its blob, and no event that survived refers
/// to a blob the store lost.
#[test]
fn a_power_cut_at_any_step_of_a_blob_append_keeps_every_acknowledged_blob() {
    use tally_engine::sim::{Cut, SimFs};
    let data = std::path::PathBuf::from("/blobs/data");
    for seed in [21u64, 22] {
        let mut n = 1;
        loop {
            let sim = SimFs::new(seed);
            let options = || {
                let storage = tally_engine::Storage::simulated(&sim);
                let store = DirStore::with_storage("/blobs/store", storage.clone()).unwrap();
                let mut o = opts(Some(Arc::new(store)));
                o.storage = storage;
                o.checkpoint_interval = None;
                o.auto_checkpoints = false;
                o.index_attributes = false;
                o
            };
            let log = Log::open(&data, options()).unwrap();
            let first = bytes(70_000, seed as u8);
            log.append(
                "trade-8",
                ExpectedVersion::Any,
                &[EventData::new("TermSheetAttached", first.clone())],
            )
            .unwrap();
            let second = bytes(90_000, seed as u8 ^ 0x55);
            sim.cut_power_after(n, Cut::seeded_loss());
            let acked = log
                .append(
                    "trade-8",
                    ExpectedVersion::Any,
                    &[EventData::new("TermSheetAttached", second.clone())],
                )
                .is_ok();
            let fired = sim.generation() > 0;
            log.crash();
            if !fired {
                assert!(acked);
                break;
            }
            let log = Log::open(&data, options())
                .unwrap_or_else(|e| panic!("seed {seed}, power cut at operation {n}: {e}"));
            let events = log
                .read_stream("trade-8", 0, 100, Direction::Forward)
                .unwrap();
            assert!(
                events.len() == 2 || (!acked && events.len() == 1),
                "seed {seed}, cut at {n}: {} events, acknowledged: {acked}",
                events.len()
            );
            for (e, payload) in events.iter().zip([&first, &second]) {
                assert_eq!(
                    &log.read_blob(&e.blob().unwrap())
                        .unwrap_or_else(|err| panic!("seed {seed}, cut at {n}: {err}")),
                    payload
                );
            }
            log.verify()
                .unwrap_or_else(|e| panic!("seed {seed}, cut at {n}: {e}"));
            log.close().unwrap();
            n += 1;
        }
        assert!(
            n > 5,
            "seed {seed}: the append took only {n} disk operations"
        );
    }
}

/// System streams (`$...`: snapshots, projection checkpoints, policies) keep their payloads
/// inline whatever their size, because their readers take the payload itself; a registry's
/// view of a blob event keeps the reference (it cannot be upcast); a threshold above the
/// inline limit is refused.
#[test]
fn system_streams_stay_inline_and_views_keep_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn ColdStore> = Arc::new(DirStore::new(store_dir.path()).unwrap());
    let log = Log::open(dir.path(), opts(Some(Arc::clone(&store)))).unwrap();
    let state = bytes(200_000, 8);
    log.append(
        "$projection-positions",
        ExpectedVersion::Any,
        &[EventData::new("$ProjectionCheckpoint", state.clone())],
    )
    .unwrap();
    let e = &log
        .read_stream("$projection-positions", 0, 1, Direction::Forward)
        .unwrap()[0];
    assert_eq!(e.blob(), None);
    assert_eq!(e.payload(), &state[..]);

    log.append(
        "trade-10",
        ExpectedVersion::Any,
        &[EventData::new("TermSheetAttached", bytes(70_000, 9)).schema_version(1)],
    )
    .unwrap();
    let e = &log
        .read_stream("trade-10", 0, 1, Direction::Forward)
        .unwrap()[0];
    let registry = tally_engine::schema::Registry::default();
    let view = registry.view(e).unwrap();
    assert!(e.blob().is_some());
    assert_eq!(tally_engine::EventView::blob(&view), e.blob());
    log.close().unwrap();

    let r = Log::open(
        dir.path(),
        Options {
            cold: ColdOptions {
                blob_threshold: 2 << 20,
                ..ColdOptions::default()
            },
            ..opts(Some(store))
        },
    );
    assert!(matches!(r, Err(Error::InvalidOptions { .. })), "{r:?}");
}
