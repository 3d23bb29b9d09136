//! Projection checkpoints of any size (docs/FORMAT.md 18.4): states past the payload limit
//! stored as parts under a manifest, partitioned states checkpointed by delta, and loads
//! that refuse a damaged, misnamed or partial checkpoint and fall back to the one before.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use proptest::prelude::*;
use tally_engine::projection::{
    CHECKPOINT_EVENT_TYPE, PartitionVisitor, Partitions, Projection, Projector, ProjectorOptions,
    checkpoint_stream, encode_checkpoint_payload, fold_window, load_checkpoint,
};
use tally_engine::state_store::{
    self, Kind, MANIFEST_EVENT_TYPE, Manifest, PART_EVENT_TYPE, PartOptions, StateError,
};
use tally_engine::{Direction, EventData, EventView, ExpectedVersion, Log, Options};

fn open(dir: &std::path::Path) -> Log {
    Log::open(
        dir,
        Options {
            segment_bytes: 4 << 20,
            ..Options::default()
        },
    )
    .unwrap()
}

/// Balances per account: `Book` events add their payload (an i64) to the account named by
/// the stream, `Close` removes it. Partitioned by account when `PARTITIONED`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Balances<const PARTITIONED: bool> {
    accounts: BTreeMap<String, i64>,
    changed: BTreeSet<String>,
    /// Bytes of padding per account, so that states grow past a payload quickly.
    pad: usize,
}

type Whole = Balances<false>;
type Parted = Balances<true>;

const PAD: usize = 700;

impl<const P: bool> Balances<P> {
    fn value(&self, balance: i64) -> Vec<u8> {
        let mut v = balance.to_le_bytes().to_vec();
        v.resize(8 + self.pad, 0xA5);
        v
    }
}

impl<const P: bool> Projection for Balances<P> {
    const STATE_VERSION: u32 = 3;

    fn initial() -> Self {
        Balances {
            pad: PAD,
            ..Balances::default()
        }
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        let account = e.stream().to_owned();
        match e.event_type() {
            "Book" => {
                let d = i64::from_le_bytes(e.payload().try_into().map_err(|_| "payload")?);
                *self.accounts.entry(account.clone()).or_default() += d;
            }
            "Close" => {
                self.accounts.remove(&account);
            }
            other => return Err(format!("unknown event {other}")),
        }
        self.changed.insert(account);
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in &self.accounts {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&self.value(*v));
        }
        out
    }

    fn decode_state(mut bytes: &[u8]) -> Option<Self> {
        let mut s = Self::initial();
        while !bytes.is_empty() {
            let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
            let k = std::str::from_utf8(bytes.get(4..4 + n)?).ok()?.to_owned();
            let v = bytes.get(4 + n..4 + n + 8 + PAD)?;
            s.accounts
                .insert(k, i64::from_le_bytes(v[..8].try_into().ok()?));
            bytes = &bytes[4 + n + 8 + PAD..];
        }
        Some(s)
    }

    fn partitions(&self) -> Option<&dyn Partitions> {
        if P { Some(self) } else { None }
    }

    fn partitions_mut(&mut self) -> Option<&mut dyn Partitions> {
        if P { Some(self) } else { None }
    }
}

impl<const P: bool> Partitions for Balances<P> {
    fn each_partition(&self, f: &mut PartitionVisitor<'_>) -> std::io::Result<()> {
        for (k, v) in &self.accounts {
            f(k.as_bytes(), &self.value(*v))?;
        }
        Ok(())
    }

    fn encode_partition(&self, key: &[u8]) -> Option<Vec<u8>> {
        let k = std::str::from_utf8(key).ok()?;
        self.accounts.get(k).map(|v| self.value(*v))
    }

    fn load_partition(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let k = std::str::from_utf8(key)
            .map_err(|e| e.to_string())?
            .to_owned();
        match value {
            None => {
                self.accounts.remove(&k);
            }
            Some(v) if v.len() == 8 + self.pad => {
                let b = i64::from_le_bytes(v[..8].try_into().map_err(|_| "value")?);
                self.accounts.insert(k.clone(), b);
            }
            Some(v) => return Err(format!("a value of {} bytes", v.len())),
        }
        // Loading marks partitions changed like folding does; the loader takes them.
        self.changed.insert(k);
        Ok(())
    }

    fn take_changed(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(String::into_bytes)
            .collect()
    }
}

fn book(log: &Log, account: u64, amount: i64) {
    log.append(
        &format!("acct-{account:07}"),
        ExpectedVersion::Any,
        &[EventData::new("Book", amount.to_le_bytes().to_vec())],
    )
    .unwrap();
}

fn close(log: &Log, account: u64) {
    log.append(
        &format!("acct-{account:07}"),
        ExpectedVersion::Any,
        &[EventData::new("Close", Vec::new())],
    )
    .unwrap();
}

/// Small parts and batches, so that tests see many of each.
fn opts(checkpoint_every: u64) -> ProjectorOptions {
    ProjectorOptions {
        checkpoint_every,
        parts: PartOptions {
            part_bytes: 64 * 1024,
            batch_bytes: 256 * 1024,
        },
        deltas_max: 4,
    }
}

/// The manifests of `name`'s checkpoint stream that decode, oldest first.
fn manifests(log: &Log, name: &str) -> Vec<(u64, Manifest)> {
    log.read_stream(&checkpoint_stream(name), 0, usize::MAX, Direction::Forward)
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type() == MANIFEST_EVENT_TYPE)
        .filter_map(|e| Some((e.version, Manifest::decode(e.payload()).ok()?)))
        .collect()
}

fn state_of<P: Projection>(log: &Log, name: &str) -> P {
    load_checkpoint::<P>(log, name)
        .unwrap()
        .found
        .unwrap()
        .state
}

#[test]
fn a_whole_state_past_the_payload_limit_checkpoints_in_parts_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    // 3,000 accounts of ~720 bytes: a state of about 2.1 MiB, twice the payload limit.
    for a in 0..3000 {
        book(&log, a, a as i64);
    }
    let mut p = Projector::<Whole>::open(&log, "whole", opts(10_000)).unwrap();
    p.catch_up().unwrap();
    let encoded = p.shared_state().read().encode_state();
    assert!(encoded.len() > 2 << 20, "{}", encoded.len());
    let ms = manifests(&log, "whole");
    assert_eq!(ms.len(), 1);
    let (_, m) = &ms[0];
    assert_eq!(m.kind, Kind::Whole);
    assert_eq!(m.content_bytes, encoded.len() as u64);
    assert_eq!(m.parts.len(), encoded.len().div_ceil(64 * 1024));
    assert_eq!(m.at, log.next_position().0 - 1 - m.parts.len() as u64);
    drop(p);
    let reopened = Projector::<Whole>::open(&log, "whole", opts(10_000)).unwrap();
    assert_eq!(reopened.shared_state().read().encode_state(), encoded);
    assert!(reopened.refused_checkpoints().is_empty());
}

#[test]
fn a_partitioned_state_writes_only_what_changed_and_a_full_checkpoint_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for a in 0..1000 {
        book(&log, a, 1);
    }
    let mut p = Projector::<Parted>::open(&log, "parted", opts(1_000_000)).unwrap();
    p.catch_up().unwrap();
    let full = manifests(&log, "parted").pop().unwrap().1;
    assert_eq!(full.kind, Kind::Full);
    // Ten accounts change, one closes: the delta holds those eleven entries only.
    for a in 0..10 {
        book(&log, a * 7, 5);
    }
    close(&log, 999);
    p.catch_up().unwrap();
    let (_, delta) = manifests(&log, "parted").pop().unwrap();
    assert_eq!(delta.kind, Kind::Delta);
    assert_eq!(delta.depth, 1);
    let entry = 4 + 12 + 1 + 4 + 8 + PAD as u64;
    assert_eq!(delta.content_bytes, 10 * entry + (4 + 12 + 1));
    assert!(delta.content_bytes * 50 < full.content_bytes);
    // Loading applies the full checkpoint and the delta: the state a fold from zero gives.
    let folded: Parted = fold_window(&log, "parted", 0, log.next_position().0).unwrap();
    assert_eq!(
        state_of::<Parted>(&log, "parted").encode_state(),
        folded.encode_state()
    );
    // At most `deltas_max` (4) deltas follow a full checkpoint.
    for round in 0..9u64 {
        book(&log, round, 1);
        p.catch_up().unwrap();
    }
    let kinds: Vec<(Kind, u32)> = manifests(&log, "parted")
        .iter()
        .map(|(_, m)| (m.kind, m.depth))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (Kind::Full, 0),
            (Kind::Delta, 1),
            (Kind::Delta, 2),
            (Kind::Delta, 3),
            (Kind::Delta, 4),
            (Kind::Full, 0),
            (Kind::Delta, 1),
            (Kind::Delta, 2),
            (Kind::Delta, 3),
            (Kind::Delta, 4),
            (Kind::Full, 0),
        ]
    );
    // Deltas that add up to the full checkpoint's size call for a full one early (a
    // reopened projector goes on from the chain it loaded): two deltas of 600 of the 999
    // accounts are more than the full checkpoint, so the third checkpoint is full.
    let mut p = Projector::<Parted>::open(&log, "parted", opts(1_000_000)).unwrap();
    for _ in 0..3 {
        for a in 0..600 {
            book(&log, a, 1);
        }
        p.catch_up().unwrap();
    }
    let last: Vec<(Kind, u32)> = manifests(&log, "parted")
        .iter()
        .rev()
        .take(3)
        .map(|(_, m)| (m.kind, m.depth))
        .collect();
    assert_eq!(
        last,
        vec![(Kind::Full, 0), (Kind::Delta, 2), (Kind::Delta, 1)]
    );
}

/// Appends a forged manifest to `name`'s checkpoint stream: a copy of the newest one,
/// changed by `edit`, as a writer with a bug (or anyone who can append there) would.
fn forge_manifest(log: &Log, name: &str, edit: impl FnOnce(&mut Manifest)) {
    let (version, mut m) = manifests(log, name).pop().unwrap();
    m.previous = Some(version);
    edit(&mut m);
    log.append(
        &checkpoint_stream(name),
        ExpectedVersion::Any,
        &[EventData::new(MANIFEST_EVENT_TYPE, m.encode())],
    )
    .unwrap();
}

fn refusal(log: &Log, name: &str) -> String {
    let search = load_checkpoint::<Whole>(log, name).unwrap();
    assert_eq!(search.refused.len(), 1, "{:?}", search.refused);
    search.refused[0].1.to_string()
}

/// A log of 300 bookings and one whole checkpoint of projection `w` over them, in parts.
fn whole_checkpointed() -> (tempfile::TempDir, Log) {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for a in 0..300 {
        book(&log, a, 3);
    }
    Projector::<Whole>::open(&log, "w", opts(10_000))
        .unwrap()
        .catch_up()
        .unwrap();
    (dir, log)
}

#[test]
fn a_damaged_missing_or_misnamed_part_is_refused_and_the_checkpoint_before_loads() {
    let (_dir, log) = whole_checkpointed();
    let found = load_checkpoint::<Whole>(&log, "w").unwrap().found.unwrap();
    let (good, good_at) = (found.state.encode_state(), found.next);
    let stream = checkpoint_stream("w");

    // A part of the right length whose bytes differ from what the manifest says.
    let len = manifests(&log, "w")
        .pop()
        .unwrap()
        .1
        .parts
        .last()
        .unwrap()
        .len;
    let bad_part = log
        .append(
            &stream,
            ExpectedVersion::Any,
            &[EventData::new(PART_EVENT_TYPE, vec![0u8; len as usize])],
        )
        .unwrap()
        .last_version;
    let mut last = 0;
    forge_manifest(&log, "w", |m| {
        last = m.parts.len() - 1;
        m.parts[last].version = bad_part;
    });
    let msg = refusal(&log, "w");
    assert!(
        msg.contains(&format!("part {last} ")) && msg.contains("BLAKE3 hash"),
        "{msg}"
    );
    let search = load_checkpoint::<Whole>(&log, "w").unwrap();
    let found = search.found.unwrap();
    assert_eq!(
        (found.next, found.state.encode_state()),
        (good_at, good.clone())
    );

    // A part that is not a part (the manifest names another manifest).
    let (_dir, log) = whole_checkpointed();
    let (manifest_version, _) = manifests(&log, "w").pop().unwrap();
    let mut last = 0;
    forge_manifest(&log, "w", |m| {
        last = m.parts.len() - 1;
        m.parts[last].version = manifest_version;
    });
    let msg = refusal(&log, "w");
    assert!(
        msg.contains(&format!("part {last} ")) && msg.contains("not a part"),
        "{msg}"
    );

    // Parts of the right kind but in the wrong order: each part checks out on its own
    // only if the manifest's hashes move with them, and then the content hash differs.
    let (_dir, log) = whole_checkpointed();
    forge_manifest(&log, "w", |m| m.parts.swap(0, 1));
    let msg = refusal(&log, "w");
    assert!(msg.contains("stream order"), "{msg}");
    forge_manifest(&log, "w", |m| {
        let (a, b) = (m.parts[0], m.parts[1]);
        m.parts[0] = state_store::PartRef {
            version: a.version,
            len: b.len,
            hash: b.hash,
        };
        m.parts[1] = state_store::PartRef {
            version: b.version,
            len: a.len,
            hash: a.hash,
        };
    });
    let search = load_checkpoint::<Whole>(&log, "w").unwrap();
    assert!(
        search.refused[0].1.to_string().contains("part 0"),
        "{:?}",
        search.refused
    );
    assert_eq!(
        search.found.unwrap().state.encode_state(),
        good_at_state(&log)
    );
}

fn good_at_state(log: &Log) -> Vec<u8> {
    let m = manifests(log, "w").remove(0).1;
    let w: Whole = fold_window(log, "w", 0, m.at).unwrap();
    w.encode_state()
}

#[test]
fn a_checkpoint_whose_manifest_was_never_written_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for a in 0..300 {
        book(&log, a, 3);
    }
    let mut p = Projector::<Whole>::open(&log, "w", opts(10_000)).unwrap();
    p.catch_up().unwrap();
    let at = p.status().checkpoint.unwrap();
    drop(p);
    // A writer stopped after some parts of its next checkpoint: parts, no manifest.
    for _ in 0..3 {
        log.append(
            &checkpoint_stream("w"),
            ExpectedVersion::Any,
            &[EventData::new(PART_EVENT_TYPE, vec![1u8; 1000])],
        )
        .unwrap();
    }
    let search = load_checkpoint::<Whole>(&log, "w").unwrap();
    assert!(search.refused.is_empty());
    assert_eq!(search.found.unwrap().next, at);
}

#[test]
fn checkpoints_of_the_first_layout_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    for a in 0..20 {
        book(&log, a, 2);
    }
    let folded: Whole = fold_window(&log, "old", 0, 20).unwrap();
    log.append(
        &checkpoint_stream("old"),
        ExpectedVersion::Any,
        &[EventData::new(
            CHECKPOINT_EVENT_TYPE,
            encode_checkpoint_payload(20, Whole::STATE_VERSION, &folded.encode_state()),
        )],
    )
    .unwrap();
    let p = Projector::<Whole>::open(&log, "old", opts(10_000)).unwrap();
    assert_eq!(p.status().checkpoint, Some(20));
    assert_eq!(
        p.shared_state().read().encode_state(),
        folded.encode_state()
    );
    // A partitioned projection loads a whole checkpoint too, and its next one is full.
    let mut p = Projector::<Parted>::open(&log, "old", opts(10_000)).unwrap();
    assert_eq!(p.status().checkpoint, Some(20));
    book(&log, 1, 1);
    p.catch_up().unwrap();
    assert_eq!(manifests(&log, "old").pop().unwrap().1.kind, Kind::Full);
}

#[test]
fn manifests_that_do_not_decode_are_refused_with_a_reason() {
    let m = Manifest {
        at: 10,
        state_version: 1,
        kind: Kind::Delta,
        depth: 1,
        content_bytes: 5,
        content_hash: [1; 32],
        base: Some(state_store::Base {
            version: 0,
            hash: [2; 32],
        }),
        previous: Some(0),
        parts: vec![state_store::PartRef {
            version: 1,
            len: 5,
            hash: [3; 32],
        }],
        inline: Vec::new(),
    };
    let bytes = m.encode();
    assert_eq!(Manifest::decode(&bytes).unwrap(), m);
    let cases: Vec<(usize, u8, &str)> = vec![
        (0, b'X', "magic"),
        (16, 7, "unknown kind"),
        (17, 1, "reserved"),
        (20, 0, "depth"),
        (24, 6, "add up"),
        (112, 2, "part count"),
    ];
    for (at, byte, why) in cases {
        let mut b = bytes.clone();
        b[at] = byte;
        let e = Manifest::decode(&b).unwrap_err().to_string();
        assert!(e.contains(why), "byte {at}: {e}");
    }
    assert!(
        Manifest::decode(&bytes[..bytes.len() - 1])
            .unwrap_err()
            .to_string()
            .contains("part count")
    );
    assert!(
        m.check_placed(1)
            .unwrap_err()
            .to_string()
            .contains("at or after itself")
    );
    m.check_placed(2).unwrap();
}

/// The content of a whole checkpoint through the part writer and reader, for any bytes and
/// part size: what goes in comes out, and flipping any byte of any part is found.
fn roundtrip(content: &[u8], part_bytes: usize) -> (Manifest, Vec<Vec<u8>>) {
    let mut cutter = state_store::PartCutter::new(part_bytes);
    cutter.write_all(content).unwrap();
    let (len, hash, refs) = cutter.finish();
    let parts = cutter.take_ready();
    let m = Manifest {
        at: 0,
        state_version: 0,
        kind: Kind::Whole,
        depth: 0,
        content_bytes: len,
        content_hash: hash,
        base: None,
        previous: None,
        parts: refs
            .iter()
            .enumerate()
            .map(|(i, &(len, hash))| state_store::PartRef {
                version: i as u64,
                len,
                hash,
            })
            .collect(),
        inline: Vec::new(),
    };
    (m, parts)
}

fn read_back(m: &Manifest, parts: &[Vec<u8>]) -> Result<Vec<u8>, StateError> {
    let mut r = state_store::PartReader::new(m, |v| {
        Ok(parts
            .get(v as usize)
            .map(|p| (PART_EVENT_TYPE.to_owned(), p.clone())))
    });
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut out).map_err(StateError::from_io)?;
    Ok(out)
}

proptest! {
    #[test]
    fn parts_carry_any_content_and_any_changed_byte_is_found(
        content in proptest::collection::vec(any::<u8>(), 0..5000),
        part_bytes in 1usize..700,
        flip in any::<prop::sample::Index>(),
    ) {
        let (m, mut parts) = roundtrip(&content, part_bytes);
        prop_assert_eq!(Manifest::decode(&m.encode()).unwrap(), m.clone());
        prop_assert_eq!(read_back(&m, &parts).unwrap(), content.clone());
        if let Some(last) = parts.len().checked_sub(1) {
            // A part the stream does not hold.
            let err = read_back(&m, &parts[..last]).unwrap_err().to_string();
            prop_assert!(err.contains(&format!("part {last} ")) && err.contains("missing"), "{}", err);
        }
        if !content.is_empty() {
            let i = flip.index(content.len());
            let (p, o) = (i / part_bytes, i % part_bytes);
            parts[p][o] ^= 1;
            let err = read_back(&m, &parts).unwrap_err().to_string();
            prop_assert!(err.contains(&format!("part {p} ")), "{}", err);
        }
    }
}

/// One step of a random history: book an amount to an account, close one, or checkpoint.
#[derive(Clone, Debug)]
enum Step {
    Book(u64, i64),
    Close(u64),
    Checkpoint,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u64..60, -5i64..5).prop_map(|(a, d)| Step::Book(a, d)),
        1 => (0u64..60).prop_map(Step::Close),
        2 => Just(Step::Checkpoint),
        1 => Just(Step::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn a_partitioned_projection_always_loads_its_last_checkpoint_and_folds_on_to_the_truth(
        steps in proptest::collection::vec(step(), 1..80),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let opts = ProjectorOptions {
            checkpoint_every: u64::MAX,
            parts: PartOptions { part_bytes: 999, batch_bytes: 3000 },
            deltas_max: 3,
        };
        let mut p = Projector::<Parted>::open(&log, "prop", opts).unwrap();
        let mut last_checkpoint: Option<(u64, Vec<u8>)> = None;
        for s in steps {
            match s {
                Step::Book(a, d) => book(&log, a, d),
                Step::Close(a) => close(&log, a),
                Step::Checkpoint => {
                    p.catch_up().unwrap();
                    p.checkpoint().unwrap();
                    let st = p.shared_state().read().encode_state();
                    last_checkpoint = Some((p.status().checkpoint.unwrap(), st));
                }
                Step::Reopen => {
                    // A restart: the state is its last checkpoint's, folded on to the end.
                    p = Projector::<Parted>::open(&log, "prop", opts).unwrap();
                    prop_assert!(p.refused_checkpoints().is_empty());
                    match &last_checkpoint {
                        Some((at, st)) => {
                            prop_assert_eq!(p.status().checkpoint, Some(*at));
                            prop_assert_eq!(&p.shared_state().read().encode_state(), st);
                        }
                        None => prop_assert_eq!(p.status().checkpoint, None),
                    }
                }
            }
        }
        p.catch_up().unwrap();
        let truth: Parted = fold_window(&log, "prop", 0, log.next_position().0).unwrap();
        prop_assert_eq!(p.shared_state().read().encode_state(), truth.encode_state());
        let loaded = Projector::<Parted>::open(&log, "prop", opts).unwrap();
        prop_assert_eq!(loaded.shared_state().read().encode_state(), truth.encode_state());
    }
}

#[test]
fn no_delta_is_planned_deeper_than_a_load_follows() {
    use tally_engine::projection::{ChainHead, plan_checkpoint};
    let state = parking_lot::RwLock::new(Parted::initial());
    let head = ChainHead {
        newest: state_store::Base {
            version: 9,
            hash: [1; 32],
        },
        kind: Kind::Delta,
        depth: state_store::DELTA_DEPTH_MAX,
        full_bytes: 1 << 30,
        delta_bytes: 10,
    };
    let opts = ProjectorOptions {
        deltas_max: u32::MAX,
        ..ProjectorOptions::default()
    };
    assert_eq!(
        plan_checkpoint(&state, 5, Some(head), false, &opts)
            .head
            .kind,
        Kind::Full
    );
    let shallower = ChainHead {
        depth: state_store::DELTA_DEPTH_MAX - 1,
        ..head
    };
    let plan = plan_checkpoint(&state, 5, Some(shallower), false, &opts);
    assert_eq!(
        (plan.head.kind, plan.head.depth),
        (Kind::Delta, state_store::DELTA_DEPTH_MAX)
    );
}
