//! Deterministic simulation: seeded random workloads against a log on the simulated disk
//! (`sys::sim`), with crashes, power cuts that keep only what was synced (and, when the seed
//! says so, some unsynced pages, torn pages and unsynced directory entries), and injected
//! disk faults, each followed by recovery and a check against a model of what was
//! acknowledged:
//!
//! - every acknowledged event is present, byte for byte, at its stream version;
//! - nothing is present that was never appended, and no batch is partly present (a batch
//!   whose append failed is "outcome unknown": all or nothing);
//! - stream versions are dense and a retried append is recognised, not duplicated;
//! - `verify` passes (chain, Merkle tree, checkpoints, sidecars).
//!
//! `TALLY_SIM_SEEDS=N` runs N seeds (default 24); `TALLY_SIM_SEED=S` runs only seed S (a
//! failure prints the seed); `TALLY_SIM_OPS=N` sets the operations per seed (default 160).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tally_engine::sim::{Cut, Fault, FaultKind, FaultOp, SimFs};
use tally_engine::{
    AppendRequest, Direction, Durability, EventData, EventId, ExpectedVersion, Log, Options,
    Position, Storage,
};

/// SplitMix64: the workload's only source of randomness besides the disk's own seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What an acknowledged event must read back as.
#[derive(Clone, Debug, PartialEq)]
struct Expected {
    stream: String,
    version: u64,
    event_type: String,
    payload: Vec<u8>,
}

/// An event as the workload made it.
#[derive(Clone, Debug)]
struct Made {
    id: EventId,
    stream: String,
    event_type: String,
    payload: Vec<u8>,
}

#[derive(Default)]
struct Model {
    acked: HashMap<EventId, Expected>,
    /// Batches whose append returned an error after which the outcome is unknown.
    unknown: Vec<Vec<Made>>,
    /// Every acknowledged batch, for retries: the events and the versions they got.
    batches: Vec<(Vec<Made>, Vec<u64>)>,
    /// Each stream's number of events.
    heads: BTreeMap<String, u64>,
    /// The run's durability. Under `Fsync` every acknowledged append is durable; under
    /// `Batched` and `None` only what a sync (a checkpoint, a close) covered is, and a power
    /// cut may lose a suffix of the rest, in whole batches, never a batch before a kept one.
    durability: Durability,
    /// Acknowledged batches no sync is known to have covered, in the order acknowledged
    /// (which is log order: the workload appends from one thread).
    unsynced: Vec<Vec<EventId>>,
    /// The disk's generation at the last check: a newer one means the power was cut since.
    checked_generation: u64,
}

#[derive(Default, Debug)]
struct Stats {
    appends: u64,
    events: u64,
    retries: u64,
    power_cuts: u64,
    crashes: u64,
    faults: u64,
    reopens: u64,
    unknown_found: u64,
    unknown_lost: u64,
    /// Acknowledged but unsynced events (under `Batched` or `None`) a power cut took.
    unsynced_lost: u64,
    /// Disk faults fired before the log was last opened.
    fired_at_open: u64,
    /// The disk's generation when the log was last opened.
    generation_at_open: u64,
    mid_operation_cuts: u64,
}

const STREAMS: [&str; 6] = [
    "trade-1",
    "trade-2",
    "trade-3",
    "book-A",
    "book-B",
    "$positions",
];

fn options(sim: &SimFs, rng: &mut Rng, durability: Durability) -> Options {
    Options {
        storage: Storage::simulated(sim),
        segment_bytes: 64 * 1024,
        durability,
        checkpoint_every_records: Some(40 + rng.below(60)),
        checkpoint_interval: None,
        index_attributes: rng.chance(50),
        idempotency_window: 1 << 12,
        ..Options::default()
    }
}

fn new_id(rng: &mut Rng) -> EventId {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&rng.next().to_le_bytes());
    b[8..].copy_from_slice(&rng.next().to_le_bytes());
    EventId(b)
}

fn make_event(rng: &mut Rng, stream: &str) -> Made {
    let types = ["TradeNew", "TradeAmended", "TradeCancelled", "TradeSettled"];
    // Mostly small payloads, sometimes several KiB so that records cross pages and segments
    // roll often.
    let len = if rng.chance(15) {
        2000 + rng.below(9000)
    } else {
        rng.below(300)
    } as usize;
    let mut payload = vec![0u8; len];
    for b in &mut payload {
        *b = rng.next() as u8;
    }
    Made {
        id: new_id(rng),
        stream: stream.to_owned(),
        event_type: types[rng.below(types.len() as u64) as usize].to_owned(),
        payload,
    }
}

fn data(m: &Made) -> EventData {
    EventData::new(m.event_type.clone(), m.payload.clone())
        .with_id(m.id)
        .actor("sim")
}

/// Opens the log. An open that an armed disk fault made fail is retried once the faults are
/// cleared (the operator fixed the disk); any other failure fails the test.
fn open(
    dir: &Path,
    sim: &SimFs,
    rng: &mut Rng,
    durability: Durability,
    seed: u64,
    stats: &mut Stats,
) -> Log {
    stats.reopens += 1;
    loop {
        sim.note("open");
        let fired = sim.faults_fired();
        match Log::open(dir, options(sim, rng, durability)) {
            Ok(log) => {
                // A fault that fires while the log opens (its threads start before open
                // returns) explains later failures too.
                stats.fired_at_open = fired;
                stats.generation_at_open = sim.generation();
                return log;
            }
            Err(e) if sim.faults_fired() > fired => {
                sim.note(&format!("open failed: {e}"));
                stats.faults += 1;
                let _ = e;
                sim.clear_faults();
            }
            Err(e) => {
                let footers: Vec<(String, usize, bool)> = sim
                    .written_names(dir)
                    .iter()
                    .filter(|n| n.to_string_lossy().ends_with(".seg"))
                    .map(|n| {
                        let b = sim.read_written(&dir.join(n)).unwrap_or_default();
                        let last = &b[b.len().saturating_sub(4096)..];
                        (
                            n.to_string_lossy().into_owned(),
                            b.len(),
                            last.iter().any(|&x| x != 0),
                        )
                    })
                    .collect();
                dump_trace(sim);
                if let Some(out) = std::env::var_os("TALLY_SIM_DUMP") {
                    let out = PathBuf::from(out);
                    std::fs::create_dir_all(&out).expect("dump directory");
                    for name in sim.written_names(dir) {
                        if let Some(bytes) = sim.read_written(&dir.join(&name)) {
                            std::fs::write(out.join(&name), bytes).expect("dump");
                        }
                    }
                }
                panic!(
                    "seed {seed}: open after {stats:?} failed: {e}\nfiles: {:?}\nfooters: {footers:?}",
                    sim.written_names(dir)
                )
            }
        }
    }
}

/// Prints the disk's trace (with `TALLY_SIM_TRACE=TEXT`: the lines naming TEXT, power cuts
/// and the test's own steps).
fn dump_trace(sim: &SimFs) {
    if let Some(part) = std::env::var_os("TALLY_SIM_TRACE") {
        let part = part.to_string_lossy();
        for line in sim
            .trace()
            .iter()
            .filter(|l| l.contains(&*part) || l.contains("power cut") || l.contains("note"))
        {
            eprintln!("{line}");
        }
    }
}

/// An operation failed: only a fault injected since the log was opened may have caused it
/// (in this call, or in a background thread whose failure poisoned the log).
fn expect_fault(sim: &SimFs, fired: u64, seed: u64, what: &str, e: &tally_engine::Error) {
    assert!(
        sim.faults_fired() > fired,
        "seed {seed}: {what} failed with no disk fault: {e}"
    );
}

/// Checks the log against the model, and settles batches of unknown outcome: found whole,
/// they are acknowledged now (recovery synced them); not found, they never happened. Every
/// read comes first: an error (a power cut armed earlier that struck during recovery or
/// the reads) returns before the model changes, and the caller starts over.
fn check(
    log: &Log,
    sim: &SimFs,
    model: &mut Model,
    seed: u64,
    stats: &mut Stats,
) -> tally_engine::Result<()> {
    let all = log.read_all(Position(0), usize::MAX, Direction::Forward)?;
    let mut by_stream = BTreeMap::new();
    for stream in STREAMS {
        by_stream.insert(
            stream.to_owned(),
            log.read_stream(stream, 0, usize::MAX, Direction::Forward)?,
        );
    }
    let verified = log.verify();
    if let Err(e) = &verified
        && !matches!(e, tally_engine::Error::Corrupt { .. })
    {
        // An I/O error, not a finding about the bytes.
        return verified.map(|_| ());
    }
    let mut present: HashMap<EventId, Expected> = HashMap::new();
    for ev in &all {
        let exp = Expected {
            stream: ev.stream().to_owned(),
            version: ev.version,
            event_type: ev.event_type().to_owned(),
            payload: ev.payload().to_vec(),
        };
        assert!(
            present.insert(ev.event_id, exp).is_none(),
            "seed {seed}: event {:?} stored twice",
            ev.event_id
        );
    }
    // Unsynced acknowledged batches (not under `Fsync`): a power cut may have taken a suffix
    // of them, whole batches only; a process crash keeps them all.
    let power_was_cut = sim.generation() != model.checked_generation;
    model.checked_generation = sim.generation();
    if power_was_cut {
        let mut lost_from = None;
        for (i, ids) in model.unsynced.iter().enumerate() {
            let found = ids.iter().filter(|id| present.contains_key(id)).count();
            assert!(
                found == 0 || found == ids.len(),
                "seed {seed}: an acknowledged unsynced batch of {} events is partly present ({found})",
                ids.len()
            );
            if found == 0 {
                lost_from.get_or_insert(i);
            } else {
                assert!(
                    lost_from.is_none(),
                    "seed {seed}: an unsynced batch survived a power cut that took an earlier one"
                );
            }
        }
        if let Some(i) = lost_from {
            for ids in model.unsynced.drain(i..) {
                for id in ids {
                    model.acked.remove(&id);
                    stats.unsynced_lost += 1;
                }
            }
            let acked = &model.acked;
            model
                .batches
                .retain(|(b, _)| b.iter().all(|m| acked.contains_key(&m.id)));
        }
    }
    for (id, exp) in &model.acked {
        match present.get(id) {
            Some(found) => assert_eq!(
                found, exp,
                "seed {seed}: acknowledged event {id:?} reads back differently"
            ),
            None => panic!(
                "seed {seed}: acknowledged event {id:?} ({} v{}) is lost ({stats:?})",
                exp.stream, exp.version
            ),
        }
    }
    for batch in std::mem::take(&mut model.unknown) {
        let found = batch.iter().filter(|m| present.contains_key(&m.id)).count();
        assert!(
            found == 0 || found == batch.len(),
            "seed {seed}: a batch of {} events is partly present ({found})",
            batch.len()
        );
        if found == 0 {
            stats.unknown_lost += 1;
            continue;
        }
        stats.unknown_found += 1;
        let mut versions = Vec::new();
        for m in &batch {
            let p = &present[&m.id];
            assert_eq!(
                (&p.stream, &p.event_type, &p.payload),
                (&m.stream, &m.event_type, &m.payload),
                "seed {seed}: a batch of unknown outcome came back changed"
            );
            versions.push(p.version);
            model.acked.insert(m.id, p.clone());
        }
        model.batches.push((batch, versions));
    }
    assert_eq!(
        present.len(),
        model.acked.len(),
        "seed {seed}: events present that were never appended"
    );
    // Versions are dense, and every stream reads back through its own index.
    let mut heads: BTreeMap<String, u64> = BTreeMap::new();
    for e in model.acked.values() {
        *heads.entry(e.stream.clone()).or_default() += 1;
    }
    for (stream, n) in &heads {
        let evs = &by_stream[stream];
        let versions: Vec<u64> = evs.iter().map(|e| e.version).collect();
        assert_eq!(
            versions,
            (0..*n).collect::<Vec<_>>(),
            "seed {seed}: stream {stream} versions are not dense"
        );
        for ev in evs {
            assert_eq!(
                model.acked[&ev.event_id].version, ev.version,
                "seed {seed}: {stream} read through its index disagrees with the log"
            );
        }
    }
    model.heads = heads;
    if let Err(e) = verified {
        dump_trace(sim);
        panic!("seed {seed}: verify failed after {stats:?}: {e} ({e:?})");
    }
    Ok(())
}

/// Opens the log and checks it; a check that a disk fault fired during (recovery or the
/// reads) starts over as after a crash.
fn reopen(
    dir: &Path,
    sim: &SimFs,
    rng: &mut Rng,
    model: &mut Model,
    seed: u64,
    stats: &mut Stats,
) -> Log {
    loop {
        let before = sim.faults_fired();
        let log = open(dir, sim, rng, model.durability, seed, stats);
        match check(&log, sim, model, seed, stats) {
            Ok(()) => return log,
            Err(e) => {
                if sim.faults_fired() == before {
                    dump_trace(sim);
                    panic!("seed {seed}: reading back after open failed with no disk fault: {e}");
                }
                log.crash();
                sim.clear_faults();
            }
        }
    }
}

fn expected_for(model: &Model, rng: &mut Rng, stream: &str) -> ExpectedVersion {
    let head = model.heads.get(stream).copied().unwrap_or(0);
    match rng.below(10) {
        0 => ExpectedVersion::Any,
        _ if head == 0 => ExpectedVersion::NoStream,
        _ => ExpectedVersion::Exact(head - 1),
    }
}

fn run(seed: u64, ops: u64) -> (Stats, u64) {
    let sim = SimFs::new(seed);
    // Notes are formatted only when traced: a step is a few microseconds of simulated I/O.
    let tracing = std::env::var_os("TALLY_SIM_TRACE").is_some();
    if tracing {
        sim.enable_trace();
    }
    let mut rng = Rng(seed ^ 0x5eed);
    let dir = PathBuf::from(format!("/sim/{seed}/log"));
    let mut model = Model {
        durability: match rng.below(5) {
            0 => Durability::None,
            1 => Durability::Batched {
                max_delay: std::time::Duration::from_micros(200 + rng.below(2000)),
            },
            _ => Durability::Fsync,
        },
        ..Model::default()
    };
    let mut stats = Stats::default();
    let mut log = open(&dir, &sim, &mut rng, model.durability, seed, &mut stats);
    for _ in 0..ops {
        let step = rng.below(100);
        if tracing {
            sim.note(&format!("step {step}"));
        }
        match step {
            // Appends to one stream, of one to four events.
            0..=44 => {
                let stream = STREAMS[rng.below(STREAMS.len() as u64) as usize];
                let n = 1 + rng.below(4);
                let batch: Vec<Made> = (0..n).map(|_| make_event(&mut rng, stream)).collect();
                let events: Vec<EventData> = batch.iter().map(data).collect();
                let expected = expected_for(&model, &mut rng, stream);
                let fired = stats.fired_at_open;
                match log.append(stream, expected, &events) {
                    Ok(r) => {
                        stats.appends += 1;
                        stats.events += n;
                        let versions: Vec<u64> = (r.first_version..=r.last_version).collect();
                        assert_eq!(versions.len() as u64, n, "seed {seed}");
                        for (m, v) in batch.iter().zip(&versions) {
                            model.acked.insert(
                                m.id,
                                Expected {
                                    stream: stream.to_owned(),
                                    version: *v,
                                    event_type: m.event_type.clone(),
                                    payload: m.payload.clone(),
                                },
                            );
                        }
                        model.heads.insert(stream.to_owned(), r.last_version + 1);
                        if model.durability != Durability::Fsync {
                            model.unsynced.push(batch.iter().map(|m| m.id).collect());
                        }
                        model.batches.push((batch, versions));
                    }
                    Err(e) => {
                        // A fault fired: the outcome is unknown until recovery.
                        expect_fault(&sim, fired, seed, "append", &e);
                        model.unknown.push(batch);
                        stats.faults += 1;
                        (log, stats) =
                            power_cut(log, &sim, &dir, &mut rng, &mut model, seed, stats);
                    }
                }
            }
            // An atomic append to two streams.
            45..=59 => {
                let a = STREAMS[rng.below(3) as usize];
                let b = STREAMS[3 + rng.below(3) as usize];
                let ea: Vec<Made> = (0..1 + rng.below(2))
                    .map(|_| make_event(&mut rng, a))
                    .collect();
                let eb: Vec<Made> = (0..1 + rng.below(2))
                    .map(|_| make_event(&mut rng, b))
                    .collect();
                let da: Vec<EventData> = ea.iter().map(data).collect();
                let db: Vec<EventData> = eb.iter().map(data).collect();
                let requests = [
                    AppendRequest {
                        stream: a,
                        expected: expected_for(&model, &mut rng, a),
                        events: &da,
                    },
                    AppendRequest {
                        stream: b,
                        expected: expected_for(&model, &mut rng, b),
                        events: &db,
                    },
                ];
                let all: Vec<Made> = ea.iter().chain(&eb).cloned().collect();
                let fired = stats.fired_at_open;
                match log.append_multi(&requests) {
                    Ok(rs) => {
                        stats.appends += 1;
                        stats.events += all.len() as u64;
                        let mut versions = Vec::new();
                        for (r, part) in rs.iter().zip([&ea, &eb]) {
                            for (m, v) in part.iter().zip(r.first_version..=r.last_version) {
                                model.acked.insert(
                                    m.id,
                                    Expected {
                                        stream: m.stream.clone(),
                                        version: v,
                                        event_type: m.event_type.clone(),
                                        payload: m.payload.clone(),
                                    },
                                );
                                versions.push(v);
                            }
                            model
                                .heads
                                .insert(part[0].stream.clone(), r.last_version + 1);
                        }
                        if model.durability != Durability::Fsync {
                            model.unsynced.push(all.iter().map(|m| m.id).collect());
                        }
                        model.batches.push((all, versions));
                    }
                    Err(e) => {
                        expect_fault(&sim, fired, seed, "append_multi", &e);
                        model.unknown.push(all);
                        stats.faults += 1;
                        (log, stats) =
                            power_cut(log, &sim, &dir, &mut rng, &mut model, seed, stats);
                    }
                }
            }
            // A retry of an acknowledged single-stream batch: recognised, nothing written.
            60..=67 if !model.batches.is_empty() => {
                let i = rng.below(model.batches.len() as u64) as usize;
                let (batch, versions) = model.batches[i].clone();
                if batch.iter().any(|m| m.stream != batch[0].stream) {
                    continue;
                }
                let events: Vec<EventData> = batch.iter().map(data).collect();
                let before = log.next_position();
                match log.append(&batch[0].stream, ExpectedVersion::Any, &events) {
                    Ok(r) => {
                        stats.retries += 1;
                        assert_eq!(
                            (r.first_version, r.last_version),
                            (versions[0], *versions.last().expect("non-empty")),
                            "seed {seed}: a retry got other versions"
                        );
                        assert_eq!(log.next_position(), before, "seed {seed}: a retry wrote");
                    }
                    // Older than the idempotency window: refused as a duplicate, also fine.
                    Err(tally_engine::Error::DuplicateEventId { .. }) => {}
                    Err(e) => {
                        expect_fault(&sim, stats.fired_at_open, seed, "retry", &e);
                        (log, stats) =
                            power_cut(log, &sim, &dir, &mut rng, &mut model, seed, stats);
                    }
                }
            }
            // Reads of an acknowledged stream.
            68..=74 => {
                let stream = STREAMS[rng.below(STREAMS.len() as u64) as usize];
                let evs = match log.read_stream(stream, 0, usize::MAX, Direction::Forward) {
                    Ok(evs) => evs,
                    Err(e) => {
                        // A sidecar load that met a power cut.
                        expect_fault(&sim, stats.fired_at_open, seed, "read", &e);
                        (log, stats) =
                            power_cut(log, &sim, &dir, &mut rng, &mut model, seed, stats);
                        continue;
                    }
                };
                assert_eq!(
                    evs.len() as u64,
                    model.heads.get(stream).copied().unwrap_or(0),
                    "seed {seed}: {stream} has a different number of events"
                );
                for ev in evs {
                    assert_eq!(
                        model.acked[&ev.event_id].payload,
                        ev.payload(),
                        "seed {seed}"
                    );
                }
            }
            75..=77 => {
                let fired = stats.fired_at_open;
                match log.checkpoint() {
                    // A checkpoint syncs everything it covers: all that was acknowledged.
                    Ok(_) => model.unsynced.clear(),
                    Err(e) => {
                        expect_fault(&sim, fired, seed, "checkpoint", &e);
                        stats.faults += 1;
                        (log, stats) =
                            power_cut(log, &sim, &dir, &mut rng, &mut model, seed, stats);
                    }
                }
            }
            // A clean close and reopen.
            78..=81 => {
                let fired = stats.fired_at_open;
                match log.close() {
                    Ok(()) => model.unsynced.clear(),
                    Err(e) => {
                        expect_fault(&sim, fired, seed, "close", &e);
                        stats.faults += 1;
                    }
                }
                log = reopen(&dir, &sim, &mut rng, &mut model, seed, &mut stats);
            }
            // A process crash: the page cache survives.
            82..=85 => {
                log.crash();
                stats.crashes += 1;
                log = reopen(&dir, &sim, &mut rng, &mut model, seed, &mut stats);
            }
            // A power cut in the middle of whatever the log does next (an append, a roll,
            // a seal, a checkpoint, a background sidecar).
            86..=88 => {
                let cut = random_cut(&mut rng);
                sim.cut_power_after(1 + rng.below(120), cut);
            }
            // A power cut between operations.
            89..=91 => {
                (log, stats) = power_cut(log, &sim, &dir, &mut rng, &mut model, seed, stats);
            }
            // A disk fault armed for a later operation.
            _ => {
                let op = [
                    FaultOp::Sync,
                    FaultOp::Write,
                    FaultOp::Create,
                    FaultOp::SyncDir,
                ][rng.below(4) as usize];
                let kind = match rng.below(3) {
                    0 => FaultKind::Eio,
                    1 => FaultKind::NoSpace,
                    _ => FaultKind::ShortWrite,
                };
                sim.inject(Fault {
                    op,
                    path_contains: None,
                    skip: rng.below(20),
                    kind,
                    times: 1,
                });
            }
        }
    }
    let fired = stats.fired_at_open;
    if let Err(e) = log.close() {
        expect_fault(&sim, fired, seed, "close", &e);
    }
    sim.clear_faults();
    let log = reopen(&dir, &sim, &mut rng, &mut model, seed, &mut stats);
    log.close()
        .unwrap_or_else(|e| panic!("seed {seed}: close: {e}"));
    (stats, sim.ops())
}

/// Crashes the log, cuts the power with a seeded loss model, and reopens and checks it.
fn power_cut(
    log: Log,
    sim: &SimFs,
    dir: &Path,
    rng: &mut Rng,
    model: &mut Model,
    seed: u64,
    mut stats: Stats,
) -> (Log, Stats) {
    log.crash();
    sim.clear_faults();
    if sim.generation() > stats.generation_at_open {
        // The power went out in the middle of an operation already.
        stats.mid_operation_cuts += 1;
    } else {
        let cut = random_cut(rng);
        sim.power_cut(&cut);
    }
    stats.power_cuts += 1;
    let log = reopen(dir, sim, rng, model, seed, &mut stats);
    (log, stats)
}

/// Lose everything unsynced, keep everything, or keep a seeded part (torn or not).
fn random_cut(rng: &mut Rng) -> Cut {
    match rng.below(4) {
        0 => Cut::clean(),
        1 => Cut::keep_all(),
        _ => Cut {
            keep_unsynced_pages: rng.below(100) as f64 / 100.0,
            torn_pages: rng.chance(50),
            keep_unsynced_entries: rng.below(100) as f64 / 100.0,
        },
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn acknowledged_appends_survive_seeded_crashes_power_cuts_and_disk_faults() {
    let ops = env_u64("TALLY_SIM_OPS").unwrap_or(160);
    let seeds: Vec<u64> = match env_u64("TALLY_SIM_SEED") {
        Some(s) => vec![s],
        None => (1..=env_u64("TALLY_SIM_SEEDS").unwrap_or(24)).collect(),
    };
    let started = Instant::now();
    let mut total = Stats::default();
    let mut sim_ops = 0;
    for seed in &seeds {
        let (s, o) = run(*seed, ops);
        sim_ops += o;
        total.appends += s.appends;
        total.events += s.events;
        total.retries += s.retries;
        total.power_cuts += s.power_cuts;
        total.crashes += s.crashes;
        total.faults += s.faults;
        total.reopens += s.reopens;
        total.unknown_found += s.unknown_found;
        total.unknown_lost += s.unknown_lost;
        total.unsynced_lost += s.unsynced_lost;
        total.mid_operation_cuts += s.mid_operation_cuts;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "simulation: {} seeds x {ops} ops in {secs:.1} s, {sim_ops} disk operations ({:.0}/s): {total:?}",
        seeds.len(),
        sim_ops as f64 / secs
    );
    assert!(
        total.power_cuts > 0 && total.appends > 0,
        "the workload exercised nothing"
    );
}
