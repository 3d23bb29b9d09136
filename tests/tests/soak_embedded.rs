//! Soak, embedded: the engine on the simulated disk (`tally_engine::sim`) under mixed load
//! for `TALLY_SOAK_MINUTES`, with power cuts every so often, recovered and checked after
//! each (docs/OPERATIONS.md, "Soak test"). Without `TALLY_SOAK_MINUTES` the test returns at
//! once.
//!
//! Method: a log with `Durability::Fsync`, 256 KiB segments and frequent checkpoints.
//! Writer threads append single-stream batches (exact, no-stream, stream-exists and any
//! expectations), atomic multi-stream batches, producer-signed batches, retries of
//! acknowledged batches (same ids: same places, nothing written twice) and appends with a
//! stale expected version (refused, never seen after). A tail follows the whole log and is
//! dropped and re-created from where it was now and then; a reader reads streams and the
//! log and finds batches through the attribute indexes; a checkpointer signs checkpoints,
//! checks consistency and inclusion proofs between them, and has a witness (on the same
//! disk) cosign them.
//!
//! Power cuts come in three kinds, chosen by the seed: armed to strike at the nth disk
//! operation from now (inside an append, a roll, a seal, a checkpoint, a background
//! sidecar), cut at once with the threads running, or a process crash (everything written
//! survives). Each cut keeps a seeded share of what was not synced, pages possibly torn.
//! Some recoveries are cut again. After each, the log is checked from its own reads by the
//! same checker as tallyd's soak test (`tally_tests::soak`): every acknowledged append at
//! its place, byte for byte; no duplicate; dense stream versions; batches all or nothing;
//! unknown outcomes whole or absent; what the tail delivered (readers see only durable
//! records) still there, without gaps. `verify` runs too (chain, Merkle tree, checkpoints,
//! cosignatures, kept checkpoints). Every 150,000 events the run moves to a new disk so
//! memory stays bounded.
//!
//! Knobs: `TALLY_SOAK_MINUTES`, `TALLY_SOAK_SEED` (replays the choices, and each disk's
//! own; thread timing is the machine's), `TALLY_SOAK_CUT_SECS` (mean seconds between power
//! cuts; default 20). A failure panics with the seed and the discrepancy.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use tally_engine::format::checkpoint::{SignedCheckpoint, SigningKey};
use tally_engine::format::producer::ProducerSignature;
use tally_engine::sim::{Cut, SimFs};
use tally_engine::witness::{Observation, Witness, WitnessError};
use tally_engine::{
    AppendRequest, AppendResult, Direction, Durability, Error, EventData, ExpectedVersion, Field,
    Log, Options, Position, Query, Storage, VerifyOptions,
};
use tally_tests::Rng;
use tally_tests::soak::{
    Batch, BatchKey, Check, CheckReport, Discrepancy, Follow, History, HistoryStats, Part,
    SessionId, SoakConfig, correlation_id, mib, own_peak_rss_bytes,
};

const WRITERS: u16 = 4;
/// Writers, the tail, the reader, the checkpointer.
const THREADS: usize = WRITERS as usize + 3;
const OWNED: u64 = 3;
const SHARED: u64 = 4;
const RECENT: usize = 32;
/// A disk's log grows to this many events before the run moves to a new disk (about 45 s
/// of the paced load and 45 MB of records, which the simulated disk keeps twice, as
/// written and as durable).
const EPOCH_EVENTS: u64 = 150_000;

/// Where the threads are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phase {
    /// Opens of the log so far (the threads wait for a newer one after a cut).
    generation: u64,
    up: bool,
}

#[derive(Default)]
struct Counters {
    stream_reads: AtomicU64,
    all_reads: AtomicU64,
    finds: AtomicU64,
    tail_restarts: AtomicU64,
    checkpoints_made: AtomicU64,
    checkpoint_reads: AtomicU64,
    consistency_proofs: AtomicU64,
    inclusion_proofs: AtomicU64,
    cosigned: AtomicU64,
    stale_refused: AtomicU64,
    retried_by_hand: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The log the threads use, and the disk generation it was opened in.
#[derive(Clone)]
struct Current {
    log: Arc<Log>,
    disk_generation: u64,
    epoch: u64,
    /// The phase generation it was published in.
    generation: u64,
}

struct Run {
    seed: u64,
    history: Mutex<History>,
    failure: OnceLock<String>,
    phase: Mutex<Phase>,
    phase_changed: Condvar,
    parked: AtomicUsize,
    stop: AtomicBool,
    current: RwLock<Option<Current>>,
    sim: RwLock<SimFs>,
    witness: RwLock<Option<Arc<Witness>>>,
    counters: Vec<AtomicU32>,
    producer: SigningKey,
    log_id: Mutex<[u8; 16]>,
    log_key: Mutex<[u8; 32]>,
    newest_checkpoint: Mutex<Option<SignedCheckpoint>>,
    /// Checkpoint ids the witness's cosignature was stored for (this disk's log).
    cosigned_ids: Mutex<BTreeSet<u64>>,
    n: Counters,
}

impl Run {
    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let text = what.to_string();
        eprintln!("SOAK FAILURE (TALLY_SOAK_SEED={}): {text}", self.seed);
        let _ = self.failure.set(text.clone());
        self.stop.store(true, Ordering::SeqCst);
        self.phase_changed.notify_all();
        panic!("seed {}: {text}", self.seed);
    }

    fn check<T>(&self, r: Result<T, Discrepancy>) -> T {
        r.unwrap_or_else(|d| self.fail(d))
    }

    fn stop_on_failure(&self) {
        if let Some(f) = self.failure.get() {
            panic!("seed {}: {f}", self.seed);
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().unwrap()
    }

    fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap() = p;
        self.phase_changed.notify_all();
    }

    /// The log to use now, or `None` when the threads must wait.
    fn log(&self) -> Option<Current> {
        if !self.phase().up {
            return None;
        }
        self.current.read().unwrap().clone()
    }

    /// Publishes a log and lets the threads use it.
    fn publish(&self, log: Log, disk_generation: u64, epoch: u64) {
        let generation = self.phase().generation + 1;
        *self.current.write().unwrap() = Some(Current {
            log: Arc::new(log),
            disk_generation,
            epoch,
            generation,
        });
        self.set_phase(Phase {
            generation,
            up: true,
        });
    }

    /// Waits for a log opened after generation `seen`; `false` when the run stops.
    fn park(&self, seen: u64) -> bool {
        self.parked.fetch_add(1, Ordering::SeqCst);
        let mut p = self.phase.lock().unwrap();
        let resumed = loop {
            if self.stop.load(Ordering::SeqCst) {
                break false;
            }
            if p.up && p.generation > seen {
                break true;
            }
            p = self
                .phase_changed
                .wait_timeout(p, Duration::from_millis(200))
                .unwrap()
                .0;
        };
        drop(p);
        self.parked.fetch_sub(1, Ordering::SeqCst);
        resumed
    }

    /// An operation on a log failed: fine if the power was cut since the log was opened
    /// (the caller then parks), a failure otherwise.
    fn after_error(&self, what: &str, e: &dyn std::fmt::Display, disk_generation: u64) {
        if self.sim.read().unwrap().generation() == disk_generation {
            self.fail(format!("{what} failed with no power cut: {e}"));
        }
    }
}

#[test]
fn soak_embedded_engine_under_power_cuts() {
    let Some(cfg) = SoakConfig::from_env("soak_embedded") else {
        return;
    };
    let mut rng = Rng::new(cfg.seed);
    let mut key_seed = [0u8; 32];
    for chunk in key_seed.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let run = Arc::new(Run {
        seed: cfg.seed,
        history: Mutex::new(History::new()),
        failure: OnceLock::new(),
        phase: Mutex::new(Phase {
            generation: 0,
            up: false,
        }),
        phase_changed: Condvar::new(),
        parked: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        current: RwLock::new(None),
        sim: RwLock::new(SimFs::new(cfg.seed)),
        witness: RwLock::new(None),
        counters: (0..WRITERS).map(|_| AtomicU32::new(0)).collect(),
        producer: SigningKey::from_bytes(&key_seed),
        log_id: Mutex::new([0; 16]),
        log_key: Mutex::new([0; 32]),
        newest_checkpoint: Mutex::new(None),
        cosigned_ids: Mutex::new(BTreeSet::new()),
        n: Counters::default(),
    });
    let started = Instant::now();
    let mut threads = Vec::new();
    for w in 0..WRITERS {
        let run = Arc::clone(&run);
        let seed = cfg.seed ^ (0x1000 + u64::from(w));
        threads.push(thread::spawn(move || writer(&run, w, seed)));
    }
    {
        let run = Arc::clone(&run);
        let seed = cfg.seed ^ 0x2000;
        threads.push(thread::spawn(move || tail(&run, seed)));
    }
    {
        let run = Arc::clone(&run);
        let seed = cfg.seed ^ 0x3000;
        threads.push(thread::spawn(move || reader(&run, seed)));
    }
    {
        let run = Arc::clone(&run);
        let seed = cfg.seed ^ 0x4000;
        threads.push(thread::spawn(move || checkpointer(&run, seed)));
    }
    let mut c = Coordinator {
        run: Arc::clone(&run),
        rng,
        epoch: 0,
        dir: PathBuf::new(),
        wdir: PathBuf::new(),
        totals: HistoryStats::default(),
        figures: Figures::default(),
    };
    c.new_disk();
    let cut_mean = cfg.cut_secs.unwrap_or(20);
    let mut next_cut = Instant::now() + interval(&mut c.rng, cut_mean);
    while started.elapsed() < cfg.duration {
        thread::sleep(Duration::from_millis(100));
        run.stop_on_failure();
        let grown = run
            .current
            .read()
            .unwrap()
            .as_ref()
            .map_or(0, |cur| cur.log.next_position().0);
        if grown >= EPOCH_EVENTS {
            // The disk is full enough: a last cut, a clean close, a new disk.
            c.power_cut();
            c.end_disk();
            c.new_disk();
            next_cut = Instant::now() + interval(&mut c.rng, cut_mean);
        }
        if Instant::now() >= next_cut {
            c.power_cut();
            next_cut = Instant::now() + interval(&mut c.rng, cut_mean);
        }
    }
    // The end: one last cut, a clean close, a last check.
    c.power_cut();
    c.end_disk();
    run.stop.store(true, Ordering::SeqCst);
    run.phase_changed.notify_all();
    for t in threads {
        if t.join().is_err() {
            run.stop_on_failure();
            panic!("seed {}: a thread panicked", cfg.seed);
        }
    }
    run.stop_on_failure();
    let s = &c.totals;
    let f = &c.figures;
    let n = &run.n;
    eprintln!(
        "\nsoak (embedded, simulated disk) figures, TALLY_SOAK_SEED={seed}:
  duration                 {dur:.1} min (asked {asked:.1})
  disks                    {disks} (a new one every {EPOCH_EVENTS} events), {disk_ops} disk operations
  appends                  {sent} batches sent, {acks} acknowledged answers; {acked} acknowledged events checked at their places after the last cut of each disk
  idempotent retries       {retries} retries of acknowledged batches answered with the original places
  refusals                 {stale} stale expected versions refused (and never seen in the log)
  unknown outcomes         {unknown} answers lost in cuts ({lost_retries} of retries of acknowledged batches): {found} found whole, {absent} found absent; {by_hand} sent again by hand
  power cuts               {cuts} ({armed} armed mid-operation, {now} with the threads running, {crashes} process crashes); {recovery_armed} more armed during recovery, {recovery_cuts} struck
  checks                   {checks} (one per recovery and per clean close), {events_checked} events read back; {verifies} verifies
  tail                     {sub_events} events delivered, {sessions} sessions ({tail_restarts} re-created), all held against the log
  reads                    {stream_reads} stream reads, {all_reads} log reads, {finds} finds; {read_events} events checked
  checkpoints              {made} made, {cp_reads} read and verified, {cons} consistency and {incl} inclusion proofs verified, {cosigned} witness cosignatures
  peak RSS                 {rss} (the test: disk, history, checker)",
        seed = cfg.seed,
        dur = started.elapsed().as_secs_f64() / 60.0,
        asked = cfg.duration.as_secs_f64() / 60.0,
        disks = c.epoch,
        disk_ops = f.disk_ops,
        sent = s.batches_sent,
        acks = s.acks,
        acked = f.acked_events,
        retries = s.retries_matched,
        stale = get(&n.stale_refused),
        unknown = s.unknown,
        lost_retries = s.unknown_retries,
        found = s.unknown_found,
        absent = s.unknown_absent,
        by_hand = get(&n.retried_by_hand),
        cuts = f.armed + f.now + f.crashes,
        armed = f.armed,
        now = f.now,
        crashes = f.crashes,
        recovery_armed = f.recovery_cuts_armed,
        recovery_cuts = f.recovery_cuts,
        checks = f.checks,
        events_checked = f.events_checked,
        verifies = f.verifies,
        sub_events = s.sub_events,
        sessions = s.sessions,
        tail_restarts = get(&n.tail_restarts),
        stream_reads = get(&n.stream_reads),
        all_reads = get(&n.all_reads),
        finds = get(&n.finds),
        read_events = s.read_events,
        made = get(&n.checkpoints_made),
        cp_reads = get(&n.checkpoint_reads),
        cons = get(&n.consistency_proofs),
        incl = get(&n.inclusion_proofs),
        cosigned = get(&n.cosigned),
        rss = mib(own_peak_rss_bytes()),
    );
    assert!(
        s.acks > 0 && f.acked_events > 0 && f.armed + f.now + f.crashes > 0,
        "seed {}: the load did nothing",
        cfg.seed
    );
}

/// `mean` seconds, give or take a half.
fn interval(rng: &mut Rng, mean: u64) -> Duration {
    let ms = mean * 1000;
    Duration::from_millis(ms / 2 + rng.below(ms + 1))
}

#[derive(Default)]
struct Figures {
    armed: u64,
    now: u64,
    crashes: u64,
    recovery_cuts_armed: u64,
    recovery_cuts: u64,
    checks: u64,
    verifies: u64,
    events_checked: u64,
    acked_events: u64,
    disk_ops: u64,
}

struct Coordinator {
    run: Arc<Run>,
    rng: Rng,
    epoch: u64,
    dir: PathBuf,
    wdir: PathBuf,
    totals: HistoryStats,
    figures: Figures,
}

fn options(sim: &SimFs) -> Options {
    Options {
        storage: Storage::simulated(sim),
        segment_bytes: 256 * 1024,
        durability: Durability::Fsync,
        checkpoint_every_records: Some(1000),
        checkpoint_interval: Some(Duration::from_secs(1)),
        ..Options::default()
    }
}

/// Lose everything unsynced, or keep a seeded share of it, torn or not.
fn random_cut(rng: &mut Rng) -> Cut {
    match rng.below(4) {
        0 => Cut::clean(),
        1 => Cut::seeded_loss(),
        _ => Cut {
            keep_unsynced_pages: rng.below(100) as f64 / 100.0,
            torn_pages: rng.below(2) == 0,
            keep_unsynced_entries: rng.below(100) as f64 / 100.0,
        },
    }
}

impl Coordinator {
    /// A new disk, log and witness; a new history.
    fn new_disk(&mut self) {
        let run = &self.run;
        self.epoch += 1;
        let sim = SimFs::new(run.seed.wrapping_add(self.epoch));
        self.dir = PathBuf::from(format!("/sim/soak/{}/log", self.epoch));
        self.wdir = PathBuf::from(format!("/sim/soak/{}/witness", self.epoch));
        let log = Log::open(&self.dir, options(&sim))
            .unwrap_or_else(|e| run.fail(format!("creating the log: {e}")));
        log.register_producer_key(
            run.producer.verifying_key().to_bytes(),
            "soak-producer",
            &[],
            "soak",
            "the soak test's signed batches",
        )
        .unwrap();
        *run.log_id.lock().unwrap() = log.log_id();
        *run.log_key.lock().unwrap() = log.public_key().unwrap();
        let w = Witness::init_in(Storage::simulated(&sim), &self.wdir, "soak.example/w").unwrap();
        w.register(&log.log_id(), &[log.public_key().unwrap()])
            .unwrap();
        *run.witness.write().unwrap() = Some(Arc::new(w));
        *run.history() = History::new();
        *run.newest_checkpoint.lock().unwrap() = None;
        run.cosigned_ids.lock().unwrap().clear();
        for c in &run.counters {
            c.store(0, Ordering::SeqCst);
        }
        let disk_generation = sim.generation();
        *run.sim.write().unwrap() = sim;
        run.publish(log, disk_generation, self.epoch);
    }

    /// Cuts the power (or crashes the process) under the running threads, waits for them
    /// to stop, recovers, checks, and lets them go on.
    fn power_cut(&mut self) {
        let run = Arc::clone(&self.run);
        let sim = run.sim.read().unwrap().clone();
        let before = sim.generation();
        let cut = random_cut(&mut self.rng);
        match self.rng.below(10) {
            0..=3 => {
                self.figures.armed += 1;
                sim.cut_power_after(1 + self.rng.below(3000), cut);
                let deadline = Instant::now() + Duration::from_secs(30);
                while sim.generation() == before && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(5));
                }
                if sim.generation() == before {
                    sim.disarm_power_cut();
                    sim.power_cut(&cut);
                }
            }
            4..=7 => {
                self.figures.now += 1;
                sim.power_cut(&cut);
            }
            _ => {
                self.figures.crashes += 1;
                sim.power_cut(&Cut::keep_all());
            }
        }
        let p = run.phase();
        run.set_phase(Phase { up: false, ..p });
        self.stop_threads_and_crash();
        self.recover(&sim);
    }

    /// Waits until every thread waits, and crashes the log they used.
    fn stop_threads_and_crash(&self) {
        let run = &self.run;
        let deadline = Instant::now() + Duration::from_secs(60);
        while run.parked.load(Ordering::SeqCst) < THREADS {
            run.stop_on_failure();
            assert!(
                Instant::now() < deadline,
                "seed {}: the threads did not stop within 60 s of a power cut",
                run.seed
            );
            thread::sleep(Duration::from_millis(2));
        }
        let Some(cur) = run.current.write().unwrap().take() else {
            return;
        };
        let mut log = cur.log;
        let log = loop {
            match Arc::try_unwrap(log) {
                Ok(l) => break l,
                Err(l) => {
                    log = l;
                    thread::sleep(Duration::from_millis(2));
                }
            }
        };
        log.crash();
    }

    /// Opens the log again (a recovery may be cut too), checks it, verifies it, and lets
    /// the threads go on.
    fn recover(&mut self, sim: &SimFs) {
        let run = Arc::clone(&self.run);
        loop {
            let before = sim.generation();
            // Now and then the power goes again during the recovery or the check.
            // (A recovery does few operations that can fail: reads cannot.)
            if self.rng.below(4) == 0 {
                self.figures.recovery_cuts_armed += 1;
                sim.cut_power_after(1 + self.rng.below(8), random_cut(&mut self.rng));
            }
            let log = match Log::open(&self.dir, options(sim)) {
                Ok(log) => log,
                Err(e) if sim.generation() > before => {
                    let _ = e;
                    self.figures.recovery_cuts += 1;
                    continue;
                }
                Err(e) => run.fail(format!(
                    "recovery after a power cut failed: {e} (disk seed {})",
                    sim.seed()
                )),
            };
            let checked = self.check(&log);
            sim.disarm_power_cut();
            match checked {
                // The cut struck a background thread of the new log: start over.
                Ok(_) if sim.generation() > before => {
                    self.figures.recovery_cuts += 1;
                    log.crash();
                }
                Ok(_) => {
                    // The witness reopens from the disk as it is now.
                    let w = Witness::open_in(Storage::simulated(sim), &self.wdir)
                        .unwrap_or_else(|e| run.fail(format!("reopening the witness: {e}")));
                    *run.witness.write().unwrap() = Some(Arc::new(w));
                    run.publish(log, sim.generation(), self.epoch);
                    return;
                }
                Err(e) if sim.generation() > before => {
                    let _ = e;
                    self.figures.recovery_cuts += 1;
                    log.crash();
                }
                Err(e) => run.fail(format!(
                    "reading back or verifying after recovery failed with no power cut: {e} (disk seed {})",
                    sim.seed()
                )),
            }
        }
    }

    /// Checks the whole log against the history, and verifies it. An I/O error (a power
    /// cut during the check) leaves the history as it was.
    fn check(&mut self, log: &Log) -> Result<CheckReport, Error> {
        let run = &self.run;
        let mut check = Check::start(&mut run.history());
        loop {
            let from = check.next_position();
            let events = match log.read_all(Position(from), 4096, Direction::Forward) {
                Ok(e) => e,
                Err(e) => {
                    check.abandon(&mut run.history());
                    return Err(e);
                }
            };
            if events.is_empty() {
                break;
            }
            let h = run.history();
            for e in &events {
                run.check(check.event(&h, e));
            }
        }
        let report = run.check(check.finish(&mut run.history()));
        self.figures.checks += 1;
        self.figures.events_checked += report.events;
        let kept: Vec<(PathBuf, SignedCheckpoint)> = run
            .newest_checkpoint
            .lock()
            .unwrap()
            .iter()
            .map(|c| (PathBuf::from("seen by the checkpointer"), *c))
            .collect();
        let witness = run.witness.read().unwrap().as_ref().map(|w| w.key());
        let options = VerifyOptions {
            trusted_keys: vec![*run.log_key.lock().unwrap()],
            kept,
            witnesses: witness.into_iter().collect(),
            threads: 1,
            ..VerifyOptions::default()
        };
        // An error here is a finding unless the power went during the verify (the caller
        // tells them apart).
        let verified = log.verify_with(&options, &mut |_| {})?;
        self.figures.verifies += 1;
        let cosigned = run.cosigned_ids.lock().unwrap().len() as u64;
        if verified.cosignatures < cosigned {
            run.fail(format!(
                "{} witness cosignatures were stored, {} are in the log after recovery",
                cosigned, verified.cosignatures
            ));
        }
        Ok(report)
    }

    /// Closes this disk's log cleanly, checks it once more after a reopen, and adds its
    /// history's counts to the totals.
    fn end_disk(&mut self) {
        let run = Arc::clone(&self.run);
        let sim = run.sim.read().unwrap().clone();
        let p = run.phase();
        run.set_phase(Phase { up: false, ..p });
        let deadline = Instant::now() + Duration::from_secs(60);
        while run.parked.load(Ordering::SeqCst) < THREADS {
            run.stop_on_failure();
            assert!(
                Instant::now() < deadline,
                "seed {}: threads did not stop",
                run.seed
            );
            thread::sleep(Duration::from_millis(2));
        }
        if let Some(cur) = run.current.write().unwrap().take() {
            let mut log = cur.log;
            let log = loop {
                match Arc::try_unwrap(log) {
                    Ok(l) => break l,
                    Err(l) => {
                        log = l;
                        thread::sleep(Duration::from_millis(2));
                    }
                }
            };
            log.close()
                .unwrap_or_else(|e| run.fail(format!("closing the log: {e}")));
        }
        let log = Log::open(&self.dir, options(&sim))
            .unwrap_or_else(|e| run.fail(format!("reopening after a clean close: {e}")));
        if !log.recovery_report().clean {
            run.fail("the open after a clean close was not clean");
        }
        let report = self
            .check(&log)
            .unwrap_or_else(|e| run.fail(format!("checking after a clean close: {e}")));
        self.figures.acked_events += report.acked_events;
        log.close().unwrap();
        self.figures.disk_ops += sim.ops();
        self.totals.add(&run.history().stats);
    }
}

/// A request as a writer makes it, to send again as it was.
#[derive(Clone)]
struct Req {
    parts: Vec<(String, ExpectedVersion, Vec<EventData>)>,
    signature: Option<ProducerSignature>,
}

impl Req {
    fn send(&self, log: &Log) -> Result<Vec<AppendResult>, Error> {
        let requests: Vec<AppendRequest<'_>> = self
            .parts
            .iter()
            .map(|(s, e, ev)| AppendRequest {
                stream: s,
                expected: *e,
                events: ev,
            })
            .collect();
        match (&self.signature, requests.len()) {
            (Some(sig), _) => log.append_multi_signed(&requests, sig),
            (None, 1) => log
                .append(requests[0].stream, requests[0].expected, requests[0].events)
                .map(|r| vec![r]),
            (None, _) => log.append_multi(&requests),
        }
    }
}

struct Writer<'a> {
    run: &'a Run,
    w: u16,
    rng: Rng,
    heads: Vec<u64>,
    recent: VecDeque<(Batch, Req)>,
    /// The batch whose answer the last cut took, its request, and whether its expected
    /// version was stale (refused if sent again).
    unknown: Option<(Batch, Req, bool)>,
    epoch: u64,
}

impl Writer<'_> {
    fn stream(&self, k: usize) -> String {
        if k as u64 == OWNED {
            format!("soak-sig-{}", self.w)
        } else {
            format!("soak-w{}-{k}", self.w)
        }
    }

    fn expect_exact(&self, k: usize) -> ExpectedVersion {
        match self.heads[k] {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(n - 1),
        }
    }

    fn reload(&mut self, epoch: u64) {
        if epoch != self.epoch {
            self.epoch = epoch;
            self.recent.clear();
            self.unknown = None;
        }
        let h = self.run.history();
        for k in 0..self.heads.len() {
            self.heads[k] = h.head(&self.stream(k));
        }
    }

    fn make(&mut self, log_id: &[u8; 16]) -> Option<(Batch, Req, bool)> {
        let roll = self.rng.below(100);
        let shared = |rng: &mut Rng| format!("soak-any-{}", rng.below(SHARED));
        let mut parts = Vec::new();
        let mut expected = Vec::new();
        let mut signed = false;
        let mut stale = false;
        match roll {
            0..=39 => {
                let k = self.rng.below(OWNED) as usize;
                parts.push((self.stream(k), 1 + self.rng.below(4) as usize));
                expected.push(if self.heads[k] > 0 && self.rng.below(8) == 0 {
                    ExpectedVersion::StreamExists
                } else {
                    self.expect_exact(k)
                });
            }
            40..=54 => {
                parts.push((shared(&mut self.rng), 1 + self.rng.below(3) as usize));
                expected.push(ExpectedVersion::Any);
            }
            55..=71 => {
                let k = self.rng.below(OWNED) as usize;
                parts.push((self.stream(k), 1 + self.rng.below(3) as usize));
                expected.push(self.expect_exact(k));
                parts.push((shared(&mut self.rng), 1 + self.rng.below(2) as usize));
                expected.push(ExpectedVersion::Any);
                if self.rng.below(3) == 0 {
                    let k2 = (k + 1) % OWNED as usize;
                    parts.push((self.stream(k2), 1));
                    expected.push(self.expect_exact(k2));
                }
            }
            72..=81 => {
                signed = true;
                let k = OWNED as usize;
                parts.push((self.stream(k), 1 + self.rng.below(3) as usize));
                expected.push(self.expect_exact(k));
                if self.rng.below(2) == 0 {
                    parts.push((shared(&mut self.rng), 1));
                    expected.push(ExpectedVersion::Any);
                }
            }
            82..=86 => {
                let k = self.rng.below(OWNED) as usize;
                stale = true;
                parts.push((self.stream(k), 1));
                expected.push(match self.heads[k] {
                    0 => ExpectedVersion::StreamExists,
                    1 => ExpectedVersion::NoStream,
                    n => ExpectedVersion::Exact(self.rng.below(n - 1)),
                });
            }
            _ => {
                if self.recent.is_empty() {
                    return None;
                }
                let i = self.rng.below(self.recent.len() as u64) as usize;
                let (b, r) = self.recent[i].clone();
                return Some((b, r, false));
            }
        }
        let counter = self.run.counters[usize::from(self.w)].fetch_add(1, Ordering::SeqCst);
        let key = BatchKey {
            writer: self.w,
            counter,
        };
        let batch = Batch::new(
            key,
            parts
                .into_iter()
                .map(|(stream, events)| Part { stream, events })
                .collect(),
        );
        let mut req = Req {
            parts: batch
                .parts
                .iter()
                .enumerate()
                .zip(&expected)
                .map(|((i, p), e)| (p.stream.clone(), *e, batch.events(i)))
                .collect(),
            signature: None,
        };
        if signed {
            let requests: Vec<AppendRequest<'_>> = req
                .parts
                .iter()
                .map(|(s, e, ev)| AppendRequest {
                    stream: s,
                    expected: *e,
                    events: ev,
                })
                .collect();
            let sig =
                tally_engine::producer_signature(log_id, &requests, &self.run.producer).unwrap();
            drop(requests);
            req.signature = Some(sig);
        }
        Some((batch, req, stale))
    }

    /// Sends a batch; `false` when the power was cut under it.
    fn send(
        &mut self,
        log: &Log,
        disk_generation: u64,
        batch: &Batch,
        req: &Req,
        stale: bool,
    ) -> bool {
        let run = self.run;
        run.check(run.history().sending(batch));
        match req.send(log) {
            Ok(results) => {
                if stale {
                    run.fail(format!(
                        "{}: an append with a stale expected version was written at {results:?}",
                        batch.key
                    ));
                }
                run.check(run.history().acked(batch.key, &results));
                for (p, r) in batch.parts.iter().zip(&results) {
                    if let Some(k) = (0..self.heads.len()).find(|&k| self.stream(k) == p.stream) {
                        self.heads[k] = self.heads[k].max(r.last_version + 1);
                    }
                }
                if !self.recent.iter().any(|(b, _)| b.key == batch.key) {
                    if self.recent.len() == RECENT {
                        self.recent.pop_front();
                    }
                    self.recent.push_back((batch.clone(), req.clone()));
                }
                true
            }
            Err(Error::WrongExpectedVersion { stream, actual, .. }) if stale => {
                if let Some(k) = (0..self.heads.len()).find(|&k| self.stream(k) == stream)
                    && actual != self.heads[k].checked_sub(1)
                {
                    run.fail(format!(
                        "{}: refused naming version {actual:?} of {stream}, which has {} events",
                        batch.key, self.heads[k]
                    ));
                }
                bump(&run.n.stale_refused);
                run.check(run.history().refused(batch.key, "wrong expected version"));
                true
            }
            Err(e) => {
                run.after_error(&format!("append of {}", batch.key), &e, disk_generation);
                run.check(run.history().lost_answer(batch.key));
                self.unknown = Some((batch.clone(), req.clone(), stale));
                false
            }
        }
    }
}

fn writer(run: &Run, w: u16, seed: u64) {
    let mut me = Writer {
        run,
        w,
        rng: Rng::new(seed),
        heads: vec![0; OWNED as usize + 1],
        recent: VecDeque::new(),
        unknown: None,
        epoch: 0,
    };
    let mut seen = 0;
    loop {
        let Some(cur) = run.log() else {
            if !run.park(seen) {
                return;
            }
            continue;
        };
        if cur.generation != seen {
            // A new log (after a cut, or a new disk): the heads as the check found them.
            seen = cur.generation;
            me.reload(cur.epoch);
        }
        let log_id = *run.log_id.lock().unwrap();
        let ok = match me.unknown.take() {
            // After a cut, half the time the batch whose answer was lost is sent again
            // with the same ids, as a client would.
            Some((b, r, stale)) if me.rng.below(2) == 0 => {
                bump(&run.n.retried_by_hand);
                me.send(&cur.log, cur.disk_generation, &b, &r, stale)
            }
            _ => match me.make(&log_id) {
                Some((b, r, stale)) => me.send(&cur.log, cur.disk_generation, &b, &r, stale),
                None => true,
            },
        };
        drop(cur);
        if !ok && !run.park(seen) {
            return;
        }
        // Paced: a few thousand events a second over all writers, so that a disk holds a
        // minute or so of them and several power cuts.
        thread::sleep(Duration::from_micros(500 + me.rng.below(3000)));
    }
}

/// Follows the whole log with a tail, dropped and re-created from where it was now and then
/// (and after every cut, as a client's subscription resumes).
fn tail(run: &Run, seed: u64) {
    let mut rng = Rng::new(seed);
    let all = || Follow::All {
        stream_prefix: String::new(),
    };
    let mut seen = 0;
    let mut session: Option<(SessionId, u64)> = None;
    loop {
        let Some(cur) = run.log() else {
            if !run.park(seen) {
                return;
            }
            continue;
        };
        seen = cur.generation;
        let epoch = cur.epoch;
        let sid = match session {
            Some((sid, epoch)) if epoch == cur.epoch => sid,
            _ => {
                let sid = run.history().open_session(all(), 0);
                session = Some((sid, cur.epoch));
                sid
            }
        };
        let from = run.history().session_next(sid).unwrap_or(0);
        let mut tail = cur.log.tail(Position(from));
        let quota = 500 + rng.below(20_000);
        let until = Instant::now() + Duration::from_millis(2000 + rng.below(28_000));
        let mut n = 0;
        let churn = loop {
            if run.stop.load(Ordering::SeqCst) {
                return;
            }
            match tail.next_timeout(Duration::from_millis(100)) {
                Ok(Some(e)) => {
                    run.check(run.history().delivered(sid, &e));
                    n += 1;
                    if n >= quota || Instant::now() >= until {
                        break true;
                    }
                }
                Ok(None) if !run.phase().up => break false,
                Ok(None) => {}
                Err(e) => {
                    run.after_error("the tail", &e, cur.disk_generation);
                    break false;
                }
            }
        };
        drop(tail);
        drop(cur);
        if churn {
            let mut h = run.history();
            let next = h.session_next(sid).unwrap_or(0);
            h.close_session(sid);
            session = Some((h.open_session(all(), next), epoch));
            bump(&run.n.tail_restarts);
        } else if !run.park(seen) {
            return;
        }
    }
}

fn reader(run: &Run, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut seen = 0;
    loop {
        let Some(cur) = run.log() else {
            if !run.park(seen) {
                return;
            }
            continue;
        };
        seen = cur.generation;
        thread::sleep(Duration::from_millis(2));
        if let Err(e) = read_once(run, &cur.log, &mut rng) {
            run.after_error("a read", &e, cur.disk_generation);
            drop(cur);
            if !run.park(seen) {
                return;
            }
        }
    }
}

fn pick_acked(run: &Run, rng: &mut Rng) -> Option<(BatchKey, Vec<(u64, tally_engine::EventId)>)> {
    let w = rng.below(u64::from(WRITERS)) as u16;
    let n = run.counters[usize::from(w)].load(Ordering::SeqCst);
    if n == 0 {
        return None;
    }
    let counter = if rng.below(2) == 0 {
        n - 1 - rng.below(u64::from(n).min(200)) as u32
    } else {
        rng.below(u64::from(n)) as u32
    };
    let key = BatchKey { writer: w, counter };
    run.history().acked_places(key).map(|p| (key, p))
}

fn read_once(run: &Run, log: &Log, rng: &mut Rng) -> Result<(), Error> {
    match rng.below(8) {
        0..=1 => {
            let w = rng.below(u64::from(WRITERS));
            let stream = format!("soak-w{w}-{}", rng.below(OWNED));
            let head = run.history().head(&stream);
            let from = if rng.below(2) == 0 {
                0
            } else {
                rng.below(head + 1)
            };
            let events = log.read_stream(&stream, from, 200, Direction::Forward)?;
            bump(&run.n.stream_reads);
            let mut h = run.history();
            for (i, e) in events.iter().enumerate() {
                if e.version != from + i as u64 || e.stream() != stream {
                    run.fail(format!(
                        "read of {stream} from {from}: event {i} is {} version {}",
                        e.stream(),
                        e.version
                    ));
                }
                run.check(h.check_read(e));
            }
        }
        2 => {
            let stream = format!("soak-any-{}", rng.below(SHARED));
            let events = log.read_stream(&stream, u64::MAX, 50, Direction::Backward)?;
            bump(&run.n.stream_reads);
            let mut h = run.history();
            for (i, e) in events.iter().enumerate() {
                if i > 0
                    && (e.version + 1 != events[i - 1].version
                        || e.position >= events[i - 1].position)
                {
                    run.fail(format!("backward read of {stream}: not dense at {i}"));
                }
                run.check(h.check_read(e));
            }
        }
        3..=4 => {
            let from = rng.below(log.next_position().0 + 1);
            let events = log.read_all(Position(from), 256, Direction::Forward)?;
            bump(&run.n.all_reads);
            let mut h = run.history();
            for (i, e) in events.iter().enumerate() {
                if e.position.0 != from + i as u64 {
                    run.fail(format!(
                        "log read from {from}: event {i} at position {}",
                        e.position.0
                    ));
                }
                run.check(h.check_read(e));
            }
        }
        _ => {
            let Some((key, places)) = pick_acked(run, rng) else {
                return Ok(());
            };
            let (events, want) = if rng.below(3) == 0 {
                let i = rng.below(places.len() as u64) as usize;
                let id = places[i].1.to_string();
                (
                    log.find(&Query::field(Field::EventId, &id).limit(8))?,
                    vec![places[i]],
                )
            } else {
                let corr = correlation_id(key);
                (
                    log.find(&Query::field(Field::Correlation, &corr).limit(64))?,
                    places,
                )
            };
            bump(&run.n.finds);
            let got: Vec<(u64, tally_engine::EventId)> =
                events.iter().map(|e| (e.position.0, e.event_id)).collect();
            if got != want {
                run.fail(format!(
                    "find for {key} (acknowledged at {want:?}) returned {got:?}"
                ));
            }
            let mut h = run.history();
            for e in &events {
                run.check(h.check_read(e));
            }
        }
    }
    Ok(())
}

/// Makes, reads and proves checkpoints, and has the witness cosign them.
fn checkpointer(run: &Run, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut seen = 0;
    loop {
        let pause = Instant::now() + Duration::from_millis(200 + rng.below(1000));
        while Instant::now() < pause {
            if run.stop.load(Ordering::SeqCst) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let Some(cur) = run.log() else {
            if !run.park(seen) {
                return;
            }
            continue;
        };
        seen = cur.generation;
        if let Err(e) = checkpoint_once(run, &cur.log, &mut rng) {
            run.after_error("a checkpoint step", &e, cur.disk_generation);
            drop(cur);
            if !run.park(seen) {
                return;
            }
        }
    }
}

fn checkpoint_once(run: &Run, log: &Log, rng: &mut Rng) -> Result<(), Error> {
    let key = *run.log_key.lock().unwrap();
    let made = if rng.below(4) == 0 {
        bump(&run.n.checkpoints_made);
        Some(log.checkpoint()?)
    } else {
        None
    };
    let Some(cp) = log.latest_checkpoint() else {
        return Ok(());
    };
    bump(&run.n.checkpoint_reads);
    if let Some(m) = made
        && m.statement.id > cp.statement.id
    {
        run.fail(format!(
            "checkpoint {} was made, the latest is {}",
            m.statement.id, cp.statement.id
        ));
    }
    if let Err(e) = cp.verify(&[key]) {
        run.fail(format!("checkpoint {}: {e}", cp.statement.id));
    }
    let newest = *run.newest_checkpoint.lock().unwrap();
    if let Some(old) = newest {
        let (o, n) = (&old.statement, &cp.statement);
        if n.id < o.id || n.tree_size < o.tree_size {
            run.fail(format!(
                "the latest checkpoint went back: {} (size {}) after {} (size {})",
                n.id, n.tree_size, o.id, o.tree_size
            ));
        }
        if n.id == o.id && cp != old {
            run.fail(format!("checkpoint {} changed", n.id));
        }
        if n.tree_size > o.tree_size {
            let p = log.prove_consistency(o.tree_size, n.tree_size)?;
            bump(&run.n.consistency_proofs);
            if let Err(e) = p.verify(&o.root, &n.root) {
                run.fail(format!(
                    "consistency proof from checkpoint {} to {}: {e}",
                    o.id, n.id
                ));
            }
        }
    }
    *run.newest_checkpoint.lock().unwrap() = Some(cp);
    let size = cp.statement.tree_size;
    if size > 0 {
        let pos = rng.below(size);
        let ev = log.read_all(Position(pos), 1, Direction::Forward)?;
        let proof = log.prove_inclusion(Position(pos), size)?;
        bump(&run.n.inclusion_proofs);
        let Some(ev) = ev.first() else {
            run.fail(format!(
                "position {pos} of checkpoint {} is not readable",
                cp.statement.id
            ));
        };
        if let Err(e) = proof.verify(&ev.record_hash, &cp.statement.root) {
            run.fail(format!(
                "inclusion proof of position {pos} in checkpoint {}: {e}",
                cp.statement.id
            ));
        }
    }
    let Some(w) = run.witness.read().unwrap().clone() else {
        return Ok(());
    };
    let Some(note) = log.checkpoint_note(None)? else {
        return Ok(());
    };
    match w.observe(&note, &mut |old, new| log.prove_consistency(old, new)) {
        Ok(
            Observation::Cosigned {
                checkpoint,
                cosignature,
                ..
            }
            | Observation::Unchanged {
                checkpoint,
                cosignature,
            },
        ) => {
            log.add_cosignature(checkpoint.statement.id, &cosignature)?;
            run.cosigned_ids
                .lock()
                .unwrap()
                .insert(checkpoint.statement.id);
            bump(&run.n.cosigned);
            Ok(())
        }
        Err(WitnessError::Engine(e)) => Err(e),
        Err(e) => run.fail(format!("witness: {e}")),
    }
}
