//! Soak: tallyd under mixed load for `TALLY_SOAK_MINUTES`, killed with SIGKILL and restarted
//! on the same directory every few minutes, its history checked after every restart and at
//! the end (docs/OPERATIONS.md, "Soak test"). Without `TALLY_SOAK_MINUTES` the test returns
//! at once.
//!
//! Method: `tallyd --durability fsync` with 1 MiB segments (rolls and seals all the time)
//! and frequent signed checkpoints. Writer tasks append single-stream batches with exact,
//! no-stream and stream-exists expectations, batches to shared streams with any version,
//! atomic multi-stream batches, producer-signed batches, retries of acknowledged batches
//! (same ids: the same places must come back, nothing written twice), and appends with a
//! stale expected version (refused, and never seen after). Reader tasks read streams and the
//! whole log and FIND batches by correlation id and event id; subscribers follow the whole
//! log, a stream prefix and one stream, resubscribe now and then (from where they were, from
//! their stored consumer checkpoint, or from now) and check that checkpoint after every
//! restart; a witness reads signed checkpoints, checks consistency and inclusion proofs
//! between them, and cosigns them.
//!
//! Before each kill the writers are let run into it: answers lost in the kill are unknown
//! outcomes. After the restart the writers wait while an independent checker
//! (`tally_tests::soak`) reads the whole log through the client and holds it to the history:
//! no acknowledged append lost or moved, no duplicate, dense stream versions, batches all
//! or nothing, unknown outcomes whole or absent, subscriptions without gaps. At the end the
//! directory is opened read-only with the engine, verified (chain, Merkle tree, checkpoints,
//! cosignatures, producer signatures, attribute indexes) and checked once more from the
//! engine's reads.
//!
//! Knobs: `TALLY_SOAK_MINUTES` (duration), `TALLY_SOAK_SEED` (replays the choices; timing
//! is the machine's), `TALLY_SOAK_KILL_SECS` (mean seconds between kills; default 120 to
//! 180). A failure panics with the seed and the discrepancy and keeps the data directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::Tallyd;
use tally_engine::format::checkpoint::{SignedCheckpoint, SigningKey};
use tally_engine::format::note::Note;
use tally_engine::format::proof::{InclusionProof, hex};
use tally_engine::witness::{Observation, Witness};
use tally_engine::{
    AppendRequest, AppendResult, Direction, ExpectedVersion, Field, Log, Options, Position,
    RecoveryMode, VerifyOptions,
};
use tally_server::client::{Client, ClientError, ClientOptions, SubscriptionItem};
use tally_server::protocol::{
    AppendPart, ErrorCode, Filter, FindQuery, Request, Response, SubscribeFrom, SubscribeTarget,
};
use tally_tests::Rng;
use tally_tests::soak::{
    Batch, BatchKey, Check, CheckReport, Discrepancy, Follow, History, Part, SessionId, SoakConfig,
    correlation_id, mib, own_peak_rss_bytes,
};
use tokio::sync::watch;

/// Writer tasks.
const WRITERS: u16 = 6;
/// Streams each writer owns (exact expected versions).
const OWNED: u64 = 3;
/// Streams all writers share (any version).
const SHARED: u64 = 4;
/// Retries of acknowledged batches are drawn from each writer's last this many.
const RECENT: usize = 32;

/// The server's state as the writers see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Phase {
    /// Restarts so far.
    generation: u64,
    /// Writers may write (false from just before a kill until the check after the restart).
    up: bool,
}

#[derive(Default)]
struct Counters {
    stream_reads: AtomicU64,
    all_reads: AtomicU64,
    finds: AtomicU64,
    stream_infos: AtomicU64,
    resubscriptions: AtomicU64,
    consumer_stores: AtomicU64,
    consumer_fetches: AtomicU64,
    checkpoint_reads: AtomicU64,
    consistency_proofs: AtomicU64,
    inclusion_proofs: AtomicU64,
    cosigned: AtomicU64,
    stale_refused: AtomicU64,
    retried_by_hand: AtomicU64,
    kills: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// What every task shares.
struct Run {
    seed: u64,
    history: Mutex<History>,
    failure: OnceLock<String>,
    phase: watch::Sender<Phase>,
    /// Writers waiting for the next restart.
    parked: AtomicUsize,
    stop: AtomicBool,
    /// Each writer's next batch counter (readers pick acknowledged batches below it).
    counters: Vec<AtomicU32>,
    /// The position after the last event the unfiltered subscriber delivered.
    all_next: AtomicU64,
    log_id: [u8; 16],
    log_key: [u8; 32],
    producer: SigningKey,
    n: Counters,
    /// The newest signed checkpoint seen.
    newest_checkpoint: Mutex<Option<SignedCheckpoint>>,
    /// Checkpoints the witness's cosignature was stored for.
    cosigned_ids: Mutex<BTreeSet<u64>>,
}

impl Run {
    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the first failure, prints it, and ends the calling task.
    fn fail(&self, what: impl std::fmt::Display) -> ! {
        let text = what.to_string();
        eprintln!("SOAK FAILURE (TALLY_SOAK_SEED={}): {text}", self.seed);
        let _ = self.failure.set(text.clone());
        panic!("seed {}: {text}", self.seed);
    }

    fn check<T>(&self, r: Result<T, Discrepancy>) -> T {
        r.unwrap_or_else(|d| self.fail(d))
    }

    fn up(&self) -> bool {
        self.phase.borrow().up
    }

    /// Waits for the server to come back after generation `seen`; `false` when the run stops.
    async fn wait_up(&self, seen: u64) -> bool {
        let mut rx = self.phase.subscribe();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            let p = *rx.borrow_and_update();
            if p.up && p.generation > seen {
                return true;
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
        }
    }

    fn generation(&self) -> u64 {
        self.phase.borrow().generation
    }

    /// Fails the test if a task failed.
    fn stop_on_failure(&self) {
        if let Some(f) = self.failure.get() {
            panic!("seed {}: {f}", self.seed);
        }
    }
}

/// Keeps the data directory of a failed run.
struct KeepOnFailure(Option<tempfile::TempDir>);

impl KeepOnFailure {
    fn path(&self) -> &Path {
        self.0.as_ref().unwrap().path()
    }
}

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = self.0.take()
        {
            eprintln!(
                "soak: the failed run's directory is kept: {}",
                d.keep().display()
            );
        }
    }
}

#[test]
fn soak_tallyd_under_mixed_load_sigkill_and_restart() {
    let Some(cfg) = SoakConfig::from_env("soak_tallyd") else {
        return;
    };
    let dir = KeepOnFailure(Some(tempfile::tempdir().unwrap()));
    let data = dir.path().join("data");
    let conf = dir.path().join("tallyd.toml");
    // 1 MiB segments roll every second or two under this load; a checkpoint every 2000
    // records or 5 s gives the witness something new on every visit.
    std::fs::write(
        &conf,
        "segment_mib = 1\ncheckpoint_every_records = 2000\ncheckpoint_interval_secs = 5\nshutdown_timeout_ms = 10000\n",
    )
    .unwrap();
    let mut rng = Rng::new(cfg.seed);
    // A producer key registered before tallyd starts (no request registers one): signed
    // batches are then accepted.
    let mut key_seed = [0u8; 32];
    for chunk in key_seed.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let producer = SigningKey::from_bytes(&key_seed);
    let (log_id, log_key) = {
        // The first segment is made here: as small as the rest (segment_mib applies to
        // new segments), or recovery would scan one large unsealed segment for a while.
        let options = Options {
            segment_bytes: 1 << 20,
            ..Options::default()
        };
        let log = Log::open(&data, options).unwrap();
        log.register_producer_key(
            producer.verifying_key().to_bytes(),
            "soak-producer",
            &[],
            "soak",
            "the soak test's signed batches",
        )
        .unwrap();
        let id = log.log_id();
        let key = log.public_key().unwrap();
        log.close().unwrap();
        (id, key)
    };
    let witness = Arc::new(Witness::init(&dir.path().join("witness"), "soak.example/w").unwrap());
    witness.register(&log_id, &[log_key]).unwrap();
    let args = ["--config", conf.to_str().unwrap(), "--durability", "fsync"];
    let tallyd = Tallyd::start(&data, &args);
    let (phase, _) = watch::channel(Phase {
        generation: 0,
        up: true,
    });
    let run = Arc::new(Run {
        seed: cfg.seed,
        history: Mutex::new(History::new()),
        failure: OnceLock::new(),
        phase,
        parked: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        counters: (0..WRITERS).map(|_| AtomicU32::new(0)).collect(),
        all_next: AtomicU64::new(0),
        log_id,
        log_key,
        producer,
        n: Counters::default(),
        newest_checkpoint: Mutex::new(None),
        cosigned_ids: Mutex::new(BTreeSet::new()),
    });
    let started = Instant::now();
    let end = common::runtime().block_on(coordinate(&run, &cfg, rng, tallyd, &args, &witness));
    let tallyd = end.tallyd;
    let rss_peak = end.rss_peak.max(tallyd.rss_bytes());
    let status = tallyd.terminate();
    assert!(
        status.success(),
        "seed {}: tallyd exited with {status}",
        cfg.seed
    );
    // Before the read-only open maps the whole log into this process.
    let own_rss = own_peak_rss_bytes();
    // The directory, read-only, through the engine: verified, and checked once more.
    let verify_started = Instant::now();
    let (verified, engine_report) = verify_read_only(&run, &data, &witness);
    let verify_time = verify_started.elapsed();
    let report = end.report;
    let h = run.history();
    let s = &h.stats;
    let n = &run.n;
    let downs = &end.downs;
    eprintln!(
        "\nsoak (tallyd) figures, TALLY_SOAK_SEED={seed}:
  duration                 {dur:.1} min (asked {asked:.1})
  appends                  {sent} batches sent, {acks} acknowledged answers; {acked_events} acknowledged events checked at their places
  log                      {events} events in {streams} streams, {segments} segments, {size} on disk
  idempotent retries       {retries} retries of acknowledged batches answered with the original places
  refusals                 {stale} stale expected versions refused (and never seen in the log)
  unknown outcomes         {unknown} answers lost in kills ({lost_retries} of retries of acknowledged batches): {found} found whole, {absent} found absent; {by_hand} sent again by hand
  kills                    {kills} SIGKILLs, {restart_n} restarts, down {down_mean:.1} s on average (max {down_max:.1} s) before the check
  checks                   {restart_n} after restarts, 1 at the end, 1 read-only through the engine
  subscriptions            {sub_events} events delivered, {sessions} sessions ({resubs} resubscriptions), all held against the log
  reads                    {stream_reads} stream reads, {all_reads} $all reads, {finds} FINDs, {infos} stream infos; {read_events} events checked
  consumer checkpoints     {stores} stored, {fetches} fetched and checked after restarts
  signed checkpoints       {cp_reads} read and verified, {cons} consistency and {incl} inclusion proofs verified, {cosigned} witness cosignatures
  verify (read-only)       {records} records, {vcp} checkpoints, {vcos} cosignatures, {signed} signed batches, {adx} attribute indexes, in {verify_secs:.1} s
  peak RSS                 tallyd {rss} ({anon} anonymous, the rest mapped files); the test (history, checker, client) {own}",
        seed = cfg.seed,
        dur = started.elapsed().as_secs_f64() / 60.0,
        asked = cfg.duration.as_secs_f64() / 60.0,
        sent = s.batches_sent,
        acks = s.acks,
        acked_events = report.acked_events,
        events = report.events,
        streams = report.streams,
        segments = end.segments,
        size = mib(dir_bytes(&data)),
        retries = s.retries_matched,
        stale = get(&n.stale_refused),
        unknown = s.unknown,
        lost_retries = s.unknown_retries,
        found = s.unknown_found,
        absent = s.unknown_absent,
        by_hand = get(&n.retried_by_hand),
        kills = get(&n.kills),
        restart_n = downs.len(),
        down_mean =
            downs.iter().map(Duration::as_secs_f64).sum::<f64>() / downs.len().max(1) as f64,
        down_max = downs.iter().map(Duration::as_secs_f64).fold(0.0, f64::max),
        sub_events = s.sub_events,
        sessions = s.sessions,
        resubs = get(&n.resubscriptions),
        stream_reads = get(&n.stream_reads),
        all_reads = get(&n.all_reads),
        finds = get(&n.finds),
        infos = get(&n.stream_infos),
        read_events = s.read_events,
        stores = get(&n.consumer_stores),
        fetches = get(&n.consumer_fetches),
        cp_reads = get(&n.checkpoint_reads),
        cons = get(&n.consistency_proofs),
        incl = get(&n.inclusion_proofs),
        cosigned = get(&n.cosigned),
        records = verified.records,
        vcp = verified.checkpoints,
        vcos = verified.cosignatures,
        signed = verified.signed_batches,
        adx = verified.attribute_indexes,
        verify_secs = verify_time.as_secs_f64(),
        rss = mib(rss_peak),
        anon = mib(end.anon_peak),
        own = mib(own_rss),
    );
    assert_eq!(
        engine_report.events, report.events,
        "seed {}: the engine reads another number of events than tallyd served",
        cfg.seed
    );
    assert!(
        s.acks > 0 && report.acked_events > 0 && report.sub_events > 0,
        "seed {}: the load did nothing",
        cfg.seed
    );
}

/// What the coordinator hands back.
struct End {
    tallyd: Tallyd,
    /// The last check through the client.
    report: CheckReport,
    segments: u64,
    rss_peak: u64,
    /// Of that, anonymous memory (the rest is mostly mapped segment files).
    anon_peak: u64,
    /// From each kill to the restarted tallyd listening.
    downs: Vec<Duration>,
}

/// Starts the load, kills and restarts tallyd, checks after each restart, and stops the
/// load at the end with one more check.
async fn coordinate(
    run: &Arc<Run>,
    cfg: &SoakConfig,
    mut rng: Rng,
    mut tallyd: Tallyd,
    args: &[&str],
    witness: &Arc<Witness>,
) -> End {
    let addr = tallyd.addr.clone();
    let data = tallyd.data.clone();
    let started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (run, addr) = (Arc::clone(run), addr.clone());
        writers.push(tokio::spawn(writer(
            run,
            addr,
            w,
            cfg.seed ^ (0x1000 + u64::from(w)),
        )));
    }
    let mut others = Vec::new();
    for r in 0..2u64 {
        let (run, addr) = (Arc::clone(run), addr.clone());
        others.push(tokio::spawn(reader(run, addr, cfg.seed ^ (0x2000 + r))));
    }
    {
        let (run, addr, w) = (Arc::clone(run), addr.clone(), Arc::clone(witness));
        others.push(tokio::spawn(witness_task(run, addr, w, cfg.seed ^ 0x4000)));
    }
    let follows = [
        Follow::All {
            stream_prefix: String::new(),
        },
        Follow::All {
            stream_prefix: "soak-any-".into(),
        },
        Follow::Stream("soak-any-0".into()),
    ];
    let mut subscribers = Vec::new();
    for (i, follow) in follows.into_iter().enumerate() {
        let (run, addr) = (Arc::clone(run), addr.clone());
        let seed = cfg.seed ^ (0x3000 + i as u64);
        subscribers.push(tokio::spawn(subscriber(run, addr, i, follow, seed)));
    }
    let checker = Client::connect(&addr).await.unwrap();
    let kill_mean = cfg.kill_secs.unwrap_or(150);
    let mut rss_peak = 0;
    let mut anon_peak = 0;
    let mut downs = Vec::new();
    let mut next_kill = started + kill_interval(&mut rng, kill_mean);
    let listen = with_listen(args, &addr);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        run.stop_on_failure();
        rss_peak = rss_peak.max(tallyd.rss_bytes());
        anon_peak = anon_peak.max(rss_anon_bytes(tallyd.pid()));
        let now = Instant::now();
        if now >= started + cfg.duration {
            break;
        }
        if now < next_kill {
            continue;
        }
        // The kill: writers run into it (their answers lost are unknown outcomes), then
        // wait for the restart and the check.
        run.phase.send_modify(|p| p.up = false);
        let t = Instant::now();
        tallyd.kill();
        bump(&run.n.kills);
        wait_parked(run).await;
        tallyd = Tallyd::start(&data, &listen);
        // Now and then it is killed again soon after it comes back (background sealing
        // and indexing, the first checkpoint, the recovery's own syncs).
        if rng.below(5) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
            tallyd.kill();
            bump(&run.n.kills);
            tallyd = Tallyd::start(&data, &listen);
        }
        let down = t.elapsed();
        let report = check_through_client(run, &checker).await;
        eprintln!(
            "soak: restart {} at {:.0} s: down {:.1} s; checked {} events in {:.1} s ({} acknowledged at their places; unknown outcomes {} found whole, {} absent; {} subscription deliveries)",
            downs.len() + 1,
            started.elapsed().as_secs_f64(),
            down.as_secs_f64(),
            report.events,
            (t.elapsed() - down).as_secs_f64(),
            report.acked_events,
            report.unknown_found,
            report.unknown_absent,
            report.sub_events
        );
        downs.push(down);
        let g = run.generation() + 1;
        run.phase.send_modify(|p| {
            p.generation = g;
            p.up = true;
        });
        next_kill = Instant::now() + kill_interval(&mut rng, kill_mean);
    }
    // The end: writers stop, subscribers catch up, one last check.
    run.stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let log_end = checker.server_info().await.unwrap().next_position;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && run.all_next.load(Ordering::SeqCst) < log_end {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in subscribers {
        s.abort();
        let _ = s.await;
    }
    for t in others {
        t.await.unwrap();
    }
    run.stop_on_failure();
    let report = check_through_client(run, &checker).await;
    let segments = checker.server_info().await.unwrap().segments;
    End {
        tallyd,
        report,
        segments,
        rss_peak,
        anon_peak,
        downs,
    }
}

/// A process's anonymous resident memory (`RssAnon`), 0 if it cannot be read.
fn rss_anon_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn with_listen<'a>(args: &[&'a str], addr: &'a str) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(["--listen", addr]);
    v
}

/// The wait before the next kill: `mean` seconds, give or take a quarter.
fn kill_interval(rng: &mut Rng, mean: u64) -> Duration {
    let ms = mean * 1000;
    Duration::from_millis(ms * 3 / 4 + rng.below(ms / 2 + 1))
}

/// Waits until every writer has seen the kill and waits for the restart.
async fn wait_parked(run: &Run) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while run.parked.load(Ordering::SeqCst) < usize::from(WRITERS) {
        run.stop_on_failure();
        assert!(
            Instant::now() < deadline,
            "seed {}: writers did not stop within 60 s of the kill",
            run.seed
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads the whole log through the client and checks it against the history.
async fn check_through_client(run: &Run, c: &Client) -> CheckReport {
    let mut check = Check::start(&mut run.history());
    loop {
        let from = check.next_position();
        let (events, _, end) = match c
            .read_all(from, 2048, Direction::Forward, &Filter::default())
            .await
        {
            Ok(r) => r,
            Err(e) => run.fail(format!("check: reading $all from {from}: {e}")),
        };
        {
            let h = run.history();
            for e in &events {
                run.check(check.event(&h, e));
            }
        }
        if end {
            break;
        }
    }
    run.check(check.finish(&mut run.history()))
}

/// Opens the directory read-only with the engine, verifies it, and checks its events.
fn verify_read_only(
    run: &Run,
    data: &Path,
    witness: &Witness,
) -> (tally_engine::VerifyReport, CheckReport) {
    let log = Log::open(
        data,
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| run.fail(format!("read-only open after the run: {e}")));
    let kept: Vec<(PathBuf, SignedCheckpoint)> = run
        .newest_checkpoint
        .lock()
        .unwrap()
        .iter()
        .map(|c| (PathBuf::from("seen by the soak's witness task"), *c))
        .collect();
    let producers = tally_engine::producers::ProducerTrust::parse(&format!(
        "key soak-producer {}\n",
        hex(&run.producer.verifying_key().to_bytes())
    ))
    .unwrap();
    let cosigned = get(&run.n.cosigned) > 0;
    let options = VerifyOptions {
        trusted_keys: vec![run.log_key],
        attribute_indexes: true,
        kept,
        witnesses: vec![witness.key()],
        min_witnesses: usize::from(cosigned),
        producers: Some(producers),
        threads: 1,
        ..VerifyOptions::default()
    };
    let verified = log
        .verify_with(&options, &mut |_| {})
        .unwrap_or_else(|e| run.fail(format!("verify after the run: {e}")));
    let stored = run.cosigned_ids.lock().unwrap().len() as u64;
    if verified.cosignatures < stored {
        run.fail(format!(
            "the witness's cosignatures of {stored} checkpoints were stored, verify found {}",
            verified.cosignatures
        ));
    }
    let mut check = Check::start(&mut run.history());
    loop {
        let from = check.next_position();
        let events = log
            .read_all(Position(from), 4096, Direction::Forward)
            .unwrap_or_else(|e| run.fail(format!("engine read from {from}: {e}")));
        if events.is_empty() {
            break;
        }
        let h = run.history();
        for e in &events {
            run.check(check.event(&h, e));
        }
    }
    let report = run.check(check.finish(&mut run.history()));
    (verified, report)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// How a request ended, for a writer.
enum Answer {
    Done(Response),
    /// Refused by the server; nothing written.
    Refused(ClientError),
    /// Sent; the answer was lost.
    Lost,
    /// Never sent (no connection).
    NotSent,
}

async fn send(c: &Client, req: &Request) -> Answer {
    match c.call(req).await {
        Ok(r) => Answer::Done(r),
        Err(ClientError::Io { .. }) => Answer::NotSent,
        Err(ClientError::Disconnected { .. }) => Answer::Lost,
        Err(e) => Answer::Refused(e),
    }
}

fn results_of(r: Response) -> Option<Vec<AppendResult>> {
    match r {
        Response::Appended(r) => Some(vec![r]),
        Response::AppendedMulti(rs) => Some(rs),
        _ => None,
    }
}

/// One writer: its own streams, its own connection (no automatic retries: a lost answer is
/// an unknown outcome), its own seeded choices.
struct Writer {
    run: Arc<Run>,
    client: Client,
    w: u16,
    rng: Rng,
    /// Events in each owned stream (the next version), as far as this writer knows.
    heads: Vec<u64>,
    /// Recently acknowledged batches and the requests that carried them.
    recent: std::collections::VecDeque<(Batch, Request)>,
    /// The batch whose answer the last kill took, its request, and whether it was sent
    /// with a stale expected version (refused if sent again).
    unknown: Option<(Batch, Request, bool)>,
}

fn owned(w: u16, k: u64) -> String {
    format!("soak-w{w}-{k}")
}

fn signed_stream(w: u16) -> String {
    format!("soak-sig-{w}")
}

impl Writer {
    fn next_key(&mut self) -> BatchKey {
        let counter = self.run.counters[usize::from(self.w)].fetch_add(1, Ordering::SeqCst);
        BatchKey {
            writer: self.w,
            counter,
        }
    }

    fn expect_exact(&self, k: usize) -> ExpectedVersion {
        match self.heads[k] {
            0 => ExpectedVersion::NoStream,
            n => ExpectedVersion::Exact(n - 1),
        }
    }

    /// Owned stream `k` (or the signed stream, `k == OWNED`) by name.
    fn stream(&self, k: usize) -> String {
        if k as u64 == OWNED {
            signed_stream(self.w)
        } else {
            owned(self.w, k as u64)
        }
    }

    fn reload_heads(&mut self) {
        let h = self.run.history();
        for k in 0..self.heads.len() {
            self.heads[k] = h.head(&self.stream(k));
        }
    }

    /// Builds the next batch and its request.
    fn make(&mut self) -> Option<(Batch, Request, bool)> {
        let roll = self.rng.below(100);
        let key = self.next_key();
        let mut parts = Vec::new();
        let mut expected = Vec::new();
        let mut signed = false;
        let mut stale = false;
        match roll {
            // One owned stream, exact expectation.
            0..=39 => {
                let k = self.rng.below(OWNED) as usize;
                parts.push(Part {
                    stream: self.stream(k),
                    events: 1 + self.rng.below(4) as usize,
                });
                let e = if self.heads[k] > 0 && self.rng.below(8) == 0 {
                    ExpectedVersion::StreamExists
                } else {
                    self.expect_exact(k)
                };
                expected.push(e);
            }
            // A shared stream, any version.
            40..=54 => {
                parts.push(Part {
                    stream: format!("soak-any-{}", self.rng.below(SHARED)),
                    events: 1 + self.rng.below(3) as usize,
                });
                expected.push(ExpectedVersion::Any);
            }
            // Atomic: an owned stream, a shared one, sometimes a second owned one.
            55..=71 => {
                let k = self.rng.below(OWNED) as usize;
                parts.push(Part {
                    stream: self.stream(k),
                    events: 1 + self.rng.below(3) as usize,
                });
                expected.push(self.expect_exact(k));
                parts.push(Part {
                    stream: format!("soak-any-{}", self.rng.below(SHARED)),
                    events: 1 + self.rng.below(2) as usize,
                });
                expected.push(ExpectedVersion::Any);
                if self.rng.below(3) == 0 {
                    let k2 = (k + 1) % OWNED as usize;
                    parts.push(Part {
                        stream: self.stream(k2),
                        events: 1,
                    });
                    expected.push(self.expect_exact(k2));
                }
            }
            // Producer-signed: the signed stream, sometimes with a shared one.
            72..=81 => {
                signed = true;
                let k = OWNED as usize;
                parts.push(Part {
                    stream: self.stream(k),
                    events: 1 + self.rng.below(3) as usize,
                });
                expected.push(self.expect_exact(k));
                if self.rng.below(2) == 0 {
                    parts.push(Part {
                        stream: format!("soak-any-{}", self.rng.below(SHARED)),
                        events: 1,
                    });
                    expected.push(ExpectedVersion::Any);
                }
            }
            // A stale expectation: refused, never written.
            82..=86 => {
                let k = self.rng.below(OWNED) as usize;
                let e = match self.heads[k] {
                    0 => ExpectedVersion::StreamExists,
                    1 => ExpectedVersion::NoStream,
                    n => ExpectedVersion::Exact(self.rng.below(n - 1)),
                };
                stale = true;
                parts.push(Part {
                    stream: self.stream(k),
                    events: 1,
                });
                expected.push(e);
            }
            // A retry of a recent acknowledged batch: the same request again.
            _ => {
                if self.recent.is_empty() {
                    return None;
                }
                let i = self.rng.below(self.recent.len() as u64) as usize;
                let (b, r) = self.recent[i].clone();
                return Some((b, r, false));
            }
        }
        let batch = Batch::new(key, parts);
        let append_parts: Vec<AppendPart> = batch
            .parts
            .iter()
            .enumerate()
            .zip(&expected)
            .map(|((i, p), e)| AppendPart {
                stream: p.stream.clone(),
                expected: *e,
                events: batch.events(i),
            })
            .collect();
        let req = if signed {
            let requests: Vec<AppendRequest<'_>> = append_parts
                .iter()
                .map(|p| AppendRequest {
                    stream: &p.stream,
                    expected: p.expected,
                    events: &p.events,
                })
                .collect();
            let signature =
                tally_engine::producer_signature(&self.run.log_id, &requests, &self.run.producer)
                    .unwrap();
            drop(requests);
            Request::AppendSigned {
                parts: append_parts,
                signature,
            }
        } else if append_parts.len() == 1 {
            Request::Append(append_parts.into_iter().next().unwrap())
        } else {
            Request::AppendMulti(append_parts)
        };
        Some((batch, req, stale))
    }

    /// Sends a batch and records what became of it. `false` when the connection failed.
    async fn send(&mut self, batch: &Batch, req: &Request, stale: bool) -> bool {
        let run = Arc::clone(&self.run);
        run.check(run.history().sending(batch));
        match send(&self.client, req).await {
            Answer::Done(resp) => {
                let Some(results) = results_of(resp) else {
                    run.fail(format!(
                        "{}: an append answered with something else",
                        batch.key
                    ));
                };
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
            Answer::Refused(e) => {
                let wrong_version = e.code() == Some(ErrorCode::WrongExpectedVersion);
                if !(stale && wrong_version) {
                    run.fail(format!("{}: refused: {e}", batch.key));
                }
                // The actual version the server names is the writer's own head.
                if let ClientError::WrongExpectedVersion { stream, actual, .. } = &e
                    && let Some(k) = (0..self.heads.len()).find(|&k| self.stream(k) == *stream)
                    && *actual != self.heads[k].checked_sub(1)
                {
                    run.fail(format!(
                        "{}: refused naming version {actual:?} of {stream}, which has {} events",
                        batch.key, self.heads[k]
                    ));
                }
                bump(&run.n.stale_refused);
                run.check(run.history().refused(batch.key, &e.to_string()));
                true
            }
            Answer::Lost => {
                if run.up() {
                    run.fail(format!(
                        "{}: the connection failed with no kill under way",
                        batch.key
                    ));
                }
                run.check(run.history().lost_answer(batch.key));
                self.unknown = Some((batch.clone(), req.clone(), stale));
                false
            }
            Answer::NotSent => {
                if run.up() {
                    run.fail(format!(
                        "{}: no connection with no kill under way",
                        batch.key
                    ));
                }
                run.check(run.history().not_sent(batch.key));
                false
            }
        }
    }
}

async fn writer(run: Arc<Run>, addr: String, w: u16, seed: u64) {
    let opts = ClientOptions {
        retries: 0,
        name: format!("soak-writer-{w}"),
        ..ClientOptions::default()
    };
    let client = Client::connect_with(&addr, opts).await.unwrap();
    let mut me = Writer {
        run: Arc::clone(&run),
        client,
        w,
        rng: Rng::new(seed),
        heads: vec![0; OWNED as usize + 1],
        recent: std::collections::VecDeque::new(),
        unknown: None,
    };
    loop {
        if run.stop.load(Ordering::SeqCst) {
            return;
        }
        if !run.up() {
            let seen = run.generation();
            run.parked.fetch_add(1, Ordering::SeqCst);
            let resumed = run.wait_up(seen).await;
            run.parked.fetch_sub(1, Ordering::SeqCst);
            if !resumed {
                return;
            }
            me.reload_heads();
            // Half the time, the batch whose answer was lost is sent again, as a client
            // library would: the same ids, so that it is written at most once.
            if let Some((b, r, stale)) = me.unknown.take()
                && me.rng.below(2) == 0
            {
                bump(&run.n.retried_by_hand);
                me.send(&b, &r, stale).await;
            }
            continue;
        }
        let Some((batch, req, stale)) = me.make() else {
            continue;
        };
        me.send(&batch, &req, stale).await;
    }
}

/// Reads streams and the whole log, and FINDs acknowledged batches, checking all it sees.
async fn reader(run: Arc<Run>, addr: String, seed: u64) {
    let mut rng = Rng::new(seed);
    let c = Client::connect_with(
        &addr,
        ClientOptions {
            retries: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    while !run.stop.load(Ordering::SeqCst) {
        let generation = run.generation();
        let r = read_once(&run, &c, &mut rng).await;
        if let Err(e) = r {
            if !e.is_retryable() || (run.up() && run.generation() == generation) {
                run.fail(format!("reader: {e} (no kill under way)"));
            }
            if !run.wait_up(generation).await {
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
    // Mostly recent batches, sometimes any.
    let counter = if rng.below(2) == 0 {
        n - 1 - rng.below(u64::from(n).min(200)) as u32
    } else {
        rng.below(u64::from(n)) as u32
    };
    let key = BatchKey { writer: w, counter };
    run.history().acked_places(key).map(|p| (key, p))
}

async fn read_once(run: &Run, c: &Client, rng: &mut Rng) -> Result<(), ClientError> {
    match rng.below(10) {
        // A writer's stream, forward from a version.
        0..=2 => {
            let w = rng.below(u64::from(WRITERS)) as u16;
            let stream = owned(w, rng.below(OWNED));
            let head = run.history().head(&stream);
            let from = if rng.below(2) == 0 {
                0
            } else {
                rng.below(head + 1)
            };
            let (events, _, _) = c
                .read_stream(&stream, from, 500, Direction::Forward)
                .await?;
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
                if i > 0 && e.position <= events[i - 1].position {
                    run.fail(format!("read of {stream}: positions not increasing at {i}"));
                }
                run.check(h.check_read(e));
            }
        }
        // A shared stream, backward from its end.
        3 => {
            let stream = format!("soak-any-{}", rng.below(SHARED));
            let (events, _, _) = c
                .read_stream(&stream, u64::MAX, 100, Direction::Backward)
                .await?;
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
        // The whole log from a position, unfiltered (dense) or by prefix.
        4..=5 => {
            let end = c.server_info().await?.next_position;
            let from = rng.below(end + 1);
            let filtered = rng.below(3) == 0;
            let filter = Filter {
                stream_prefix: if filtered {
                    "soak-w".into()
                } else {
                    String::new()
                },
                event_types: Vec::new(),
            };
            let (events, _, _) = c.read_all(from, 1000, Direction::Forward, &filter).await?;
            bump(&run.n.all_reads);
            let mut h = run.history();
            for (i, e) in events.iter().enumerate() {
                let ok = if filtered {
                    e.stream().starts_with("soak-w")
                        && (i == 0 || e.position > events[i - 1].position)
                        && e.position.0 >= from
                } else {
                    e.position.0 == from + i as u64
                };
                if !ok {
                    run.fail(format!(
                        "$all read from {from} (prefix {:?}): event {i} at {} in {}",
                        filter.stream_prefix,
                        e.position.0,
                        e.stream()
                    ));
                }
                run.check(h.check_read(e));
            }
        }
        // FIND an acknowledged batch by its correlation id, or one event by its id.
        6..=8 => {
            let Some((key, places)) = pick_acked(run, rng) else {
                return Ok(());
            };
            let by_id = rng.below(3) == 0;
            let (field, want) = if by_id {
                let i = rng.below(places.len() as u64) as usize;
                ((Field::EventId, places[i].1.to_string()), vec![places[i]])
            } else {
                ((Field::Correlation, correlation_id(key)), places)
            };
            let q = FindQuery {
                field: Some(field),
                record_time: None,
                event_time: None,
                from: 0,
                max: 64,
            };
            let (events, _, _) = c.find(&q).await?;
            bump(&run.n.finds);
            let got: Vec<(u64, tally_engine::EventId)> =
                events.iter().map(|e| (e.position.0, e.event_id)).collect();
            if got != want {
                run.fail(format!(
                    "FIND {:?} for {key} (acknowledged at {want:?}) returned {got:?}",
                    q.field
                ));
            }
            let mut h = run.history();
            for e in &events {
                run.check(h.check_read(e));
            }
        }
        // A stream's facts: no fewer events than the last check found, and its last event
        // where they say.
        _ => {
            let w = rng.below(u64::from(WRITERS)) as u16;
            let stream = owned(w, rng.below(OWNED));
            let before = run.history().head(&stream);
            let info = c.stream_info(&stream).await?;
            bump(&run.n.stream_infos);
            match info {
                None if before > 0 => run.fail(format!(
                    "stream info: no stream {stream}, where a check found {before} events"
                )),
                None => {}
                Some(i) => {
                    if i.last_version + 1 < before {
                        run.fail(format!(
                            "stream info of {stream}: last version {} below the {before} events a check found",
                            i.last_version
                        ));
                    }
                    let (events, _, _) = c
                        .read_stream(&stream, i.last_version, 1, Direction::Forward)
                        .await?;
                    let last = events.first().map(|e| (e.position, e.version));
                    if last != Some((i.last_position, i.last_version)) {
                        run.fail(format!(
                            "stream info of {stream} says its last event is version {} at {:?}; reading it gives {last:?}",
                            i.last_version, i.last_position
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Follows `follow`, resubscribing now and then, storing a consumer checkpoint, and checking
/// it after every restart.
async fn subscriber(run: Arc<Run>, addr: String, i: usize, follow: Follow, seed: u64) {
    let mut rng = Rng::new(seed);
    let name = format!("soak-sub-{i}");
    let c = Client::connect_with(
        &addr,
        ClientOptions {
            retries: 100_000,
            retry_delay: Duration::from_millis(20),
            name: name.clone(),
            subscription_window: 256,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let target = match &follow {
        Follow::All { stream_prefix } => SubscribeTarget::All(Filter {
            stream_prefix: stream_prefix.clone(),
            event_types: Vec::new(),
        }),
        Follow::Stream(s) => SubscribeTarget::Stream(s.clone()),
    };
    let mut stored: Option<u64> = None;
    let mut from = match follow {
        Follow::All { ref stream_prefix } if !stream_prefix.is_empty() => SubscribeFrom::Now,
        _ => SubscribeFrom::At(0),
    };
    let mut generation = run.generation();
    loop {
        let mut sub = loop {
            let seen = run.generation();
            match c.subscribe(target.clone(), from).await {
                Ok(sub) => break sub,
                // Subscribing needs the server; resuming a subscription does not.
                Err(e) if e.is_retryable() && !run.up() => {
                    if !run.wait_up(seen).await {
                        return;
                    }
                }
                Err(e) => run.fail(format!("{name}: subscribe from {from:?}: {e}")),
            }
        };
        let sid: SessionId = run.history().open_session(follow.clone(), sub.next_from());
        let session_events = 500 + rng.below(20_000);
        let session_until = Instant::now() + Duration::from_secs(5 + rng.below(60));
        let mut n = 0u64;
        loop {
            let item = sub
                .next()
                .await
                .unwrap_or_else(|e| run.fail(format!("{name}: {e}")));
            if let SubscriptionItem::Event(e) = item {
                run.check(run.history().delivered(sid, &e));
                if i == 0 {
                    run.all_next.store(e.position.0 + 1, Ordering::SeqCst);
                }
                n += 1;
            }
            // After a restart: the stored consumer checkpoint is the last one acknowledged.
            if run.generation() != generation && run.up() {
                generation = run.generation();
                let got = c
                    .fetch_checkpoint(&name)
                    .await
                    .unwrap_or_else(|e| run.fail(format!("{name}: fetch checkpoint: {e}")));
                bump(&run.n.consumer_fetches);
                if got != stored {
                    run.fail(format!(
                        "{name}: consumer checkpoint after a restart is {got:?}, the last stored {stored:?}"
                    ));
                }
            }
            if n > 0 && n.is_multiple_of(997) {
                let at = run.history().session_next(sid).unwrap_or(0);
                if stored.is_none_or(|s| at > s) {
                    c.store_checkpoint(&name, at)
                        .await
                        .unwrap_or_else(|e| run.fail(format!("{name}: store checkpoint: {e}")));
                    bump(&run.n.consumer_stores);
                    stored = Some(at);
                }
            }
            if n >= session_events || Instant::now() >= session_until {
                break;
            }
        }
        // Churn: drop the subscription and start again from where it was, from the stored
        // checkpoint, or from now.
        let next = run.history().session_next(sid).unwrap_or(0);
        run.history().close_session(sid);
        drop(sub);
        bump(&run.n.resubscriptions);
        from = match rng.below(10) {
            0..=5 => SubscribeFrom::At(next),
            6..=8 => match stored {
                Some(s) if matches!(follow, Follow::All { .. }) => SubscribeFrom::At(s),
                _ => SubscribeFrom::At(next),
            },
            _ => SubscribeFrom::Now,
        };
    }
}

/// Reads and verifies signed checkpoints, checks proofs between them, and cosigns them as a
/// witness would (c2sp.org/tlog-witness): a checkpoint seen must never be rolled back or
/// re-signed differently, kill or not.
async fn witness_task(run: Arc<Run>, addr: String, witness: Arc<Witness>, seed: u64) {
    let mut rng = Rng::new(seed);
    let c = Client::connect_with(
        &addr,
        ClientOptions {
            retries: 0,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    while !run.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(2000 + rng.below(4000))).await;
        let generation = run.generation();
        if let Err(e) = witness_once(&run, &c, &witness, &mut rng).await {
            if !e.is_retryable() || (run.up() && run.generation() == generation) {
                run.fail(format!("witness: {e}"));
            }
            if !run.wait_up(generation).await {
                return;
            }
        }
    }
}

async fn witness_once(
    run: &Run,
    c: &Client,
    witness: &Arc<Witness>,
    rng: &mut Rng,
) -> Result<(), ClientError> {
    let Some(cp) = c.latest_checkpoint().await? else {
        return Ok(());
    };
    bump(&run.n.checkpoint_reads);
    if let Err(e) = cp.verify(&[run.log_key]) {
        run.fail(format!("checkpoint {}: {e}", cp.statement.id));
    }
    let seen = *run.newest_checkpoint.lock().unwrap();
    if let Some(old) = seen {
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
            let p = c.consistency_proof(o.tree_size, n.tree_size).await?;
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
        let p = c.inclusion_proof(pos, size).await?;
        bump(&run.n.inclusion_proofs);
        let proof = InclusionProof {
            index: pos,
            tree_size: size,
            path: p.path.clone(),
        };
        if p.root != cp.statement.root || proof.verify(&p.record_hash, &cp.statement.root).is_err()
        {
            run.fail(format!(
                "inclusion proof of position {pos} in checkpoint {} does not verify",
                cp.statement.id
            ));
        }
    }
    // The witness: the latest note, a proof from what it cosigned last, its verdict.
    let Some(text) = c.checkpoint_note().await? else {
        return Ok(());
    };
    let note = Note::parse(&text).unwrap_or_else(|e| run.fail(format!("checkpoint note: {e}")));
    let offered = tally_engine::format::note::parse_checkpoint_body(&note.body)
        .unwrap_or_else(|e| run.fail(format!("checkpoint note body: {e}")));
    let last = witness
        .history(&run.log_id)
        .unwrap()
        .last()
        .map(|s| s.tree_size)
        .filter(|&s| s < offered.tree_size);
    let proof = match last {
        Some(old) => Some(c.consistency_proof(old, offered.tree_size).await?),
        None => None,
    };
    let w = Arc::clone(witness);
    let obs = tokio::task::spawn_blocking(move || {
        w.observe(&note, &mut |old, new| {
            proof
                .clone()
                .filter(|p| p.old_size == old && p.new_size == new)
                .ok_or_else(|| tally_engine::Error::InvalidOptions {
                    reason: format!("no proof fetched from {old} to {new}"),
                })
        })
        .map_err(|e| e.to_string())
    })
    .await
    .unwrap();
    let (id, cosignature) = match obs {
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
        ) => (checkpoint.statement.id, cosignature),
        Err(e) => run.fail(format!("witness: {e}")),
    };
    c.add_cosignature(id, &cosignature).await?;
    run.cosigned_ids.lock().unwrap().insert(id);
    bump(&run.n.cosigned);
    Ok(())
}
