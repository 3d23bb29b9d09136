//! `tally demo`: a day of trading on an embedded data directory, end to end.
//!
//! producer -> append-only store -> projection -> snapshots -> replay validation -> audit:
//! 1. books thousands of trades over many books (`--trades`, `--books`, `--seed`) with
//!    their lifecycles (AMEND, NOVATE, EXERCISE, SETTLE, CANCEL) and market prices; some
//!    amendments arrive late, some deliveries are duplicated (absorbed by idempotent
//!    appends), two desks amend one trade at once (the loser retries), and a fat-finger
//!    booking is corrected by a compensating event that references it;
//! 2. builds positions and realised / unrealised P&L per book and instrument (a projection
//!    with durable checkpoints), while trades are loaded through snapshots;
//! 3. replays everything from scratch, archives the result signed with the log's key, and
//!    validates the replay against the archive;
//! 4. explains the corrected trade (who, what, when, why), exports its audit extract and
//!    verifies it offline with the log's public key;
//! 5. governance: a retention policy prunes settled trades, a legal hold keeps one of them
//!    past its retention, a confirmation contact's personal data is erased on request (and
//!    refused while the hold covers it); the positions then validate from the signed
//!    archive over the pruned log, and the audit extracts still verify ([`governance`]);
//! 6. prints a report: counts, timings, the positions table (`--json` for a document).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tally_engine::aggregate::{Repository, SnapshotPolicy, correction_of};
use tally_engine::format::proof::hex;
use tally_engine::projection::{Projection, Projector, ProjectorOptions};
use tally_engine::replay::{Archive, Validation, trace, validate};
use tally_engine::{
    Direction, Error, EventData, EventId, ExpectedVersion, Log, Options, Position, Timestamp,
};

use crate::support::json_output;
use crate::trading::{
    Amend, Contact, NewTrade, Positions, Side, Trade, event_id, price_event, price_stream,
    trade_stream,
};

mod governance;

/// Options of `tally demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// An empty or missing directory for the demo's log. Default: a new directory under the
    /// system's temporary directory (kept, so that it can be inspected).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Trades to book.
    #[arg(long, default_value_t = 2000)]
    trades: u64,
    /// Books to spread them over.
    #[arg(long, default_value_t = 8)]
    books: u64,
    /// Seed of the generator (the same seed gives the same day).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// When the demo's appends are acknowledged: `fsync` (each append durable before the
    /// next, as a trading system would run) or `none` (the page cache; everything is
    /// synced when the log closes), for runs of a million trades whose one-at-a-time
    /// durable appends would measure the disk rather than the rest.
    #[arg(long, value_enum, default_value_t = DemoDurability::Fsync)]
    durability: DemoDurability,
    /// Skip step 5 (retention, legal hold, erasure): the log then keeps every event of the
    /// day, for a tool or a test that folds it from scratch.
    #[arg(long)]
    no_governance: bool,
}

/// `tally demo --durability`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DemoDurability {
    /// Every append is synced before it returns.
    Fsync,
    /// Appends return once written; the log syncs when it closes.
    None,
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

const INSTRUMENTS: [&str; 5] = [
    "BRENT-DEC26",
    "WTI-JAN27",
    "NBP-Q1-27",
    "TTF-CAL27",
    "EUA-DEC26",
];
const COUNTERPARTIES: [&str; 4] = ["ACME BANK", "NORDIC POWER", "GULF TRADING", "ALPINE GAS"];
/// Two confirmation contacts per counterparty (same order): personal data.
const CONTACTS: [(&str, &str); 8] = [
    ("Maria Keller", "m.keller@acme-bank.example"),
    ("Tom Reyes", "t.reyes@acme-bank.example"),
    ("Ingrid Dahl", "ingrid.dahl@nordic-power.example"),
    ("Ola Berg", "ola.berg@nordic-power.example"),
    ("Samir Haddad", "s.haddad@gulf-trading.example"),
    ("Lena Fischer", "l.fischer@gulf-trading.example"),
    ("Marco Rossi", "marco.rossi@alpine-gas.example"),
    ("Anna Huber", "anna.huber@alpine-gas.example"),
];

fn contact(i: usize) -> Contact {
    Contact {
        name: CONTACTS[i].0.to_owned(),
        email: CONTACTS[i].1.to_owned(),
    }
}
/// 2026-11-23T08:00:00Z, the start of the demo's trading day (business time).
const DAY_START_NS: u64 = 1_795_420_800_000_000_000;

fn secs(s: u64) -> Timestamp {
    Timestamp(DAY_START_NS + s * 1_000_000_000)
}

#[derive(Default)]
struct Counts {
    events: u64,
    duplicates_absorbed: u64,
    conflicts_retried: u64,
    corrections: u64,
    late_amendments: u64,
    amendments: u64,
    cancels: u64,
    novations: u64,
    exercises: u64,
    settlements: u64,
    prices: u64,
}

struct Day<'a> {
    log: &'a Log,
    repo: Repository<'a, Trade>,
    rng: Rng,
    seed: u64,
    ids: u64,
    counts: Counts,
    marks: Vec<Decimal>,
}

impl Day<'_> {
    fn id(&mut self) -> EventId {
        self.ids += 1;
        event_id(self.seed, self.ids)
    }

    fn price(&mut self, instrument: usize, at: u64) -> anyhow::Result<()> {
        let step = Decimal::new(self.rng.below(101) as i64 - 50, 2);
        self.marks[instrument] = (self.marks[instrument] + step).max(Decimal::ONE);
        let ev = price_event(INSTRUMENTS[instrument], self.marks[instrument])
            .with_id(self.id())
            .event_time(secs(at))
            .actor("market-data");
        self.log.append(
            &price_stream(INSTRUMENTS[instrument]),
            ExpectedVersion::Any,
            &[ev],
        )?;
        self.counts.prices += 1;
        self.counts.events += 1;
        Ok(())
    }

    /// Appends `make(trade)` to the trade's stream, tagging it.
    fn act(
        &mut self,
        stream: &str,
        actor: &str,
        at: u64,
        cause: Option<EventId>,
        make: impl Fn(&Trade) -> Result<EventData, crate::trading::TradeError>,
    ) -> anyhow::Result<bool> {
        let mut t = self.repo.load(stream)?;
        let Ok(ev) = make(&t.state) else {
            return Ok(false);
        };
        let mut ev = ev
            .with_id(self.id())
            .actor(actor)
            .event_time(secs(at))
            .correlation_id(stream.replace("trade-", "deal-"));
        if let Some(c) = cause {
            ev = ev.causation_id(c.to_string());
        }
        self.repo.save(stream, &mut t, &[ev])?;
        self.counts.events += 1;
        Ok(true)
    }
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template("{msg:<22} [{bar:30}] {pos}/{len}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    b.set_message(what.to_owned());
    b
}

/// A spinner for a step whose length is not known in advance (hidden off a terminal).
fn spinner(what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new_spinner();
    b.set_message(what.to_owned());
    b.enable_steady_tick(std::time::Duration::from_millis(100));
    b
}

fn data_dir(args: &DemoArgs) -> anyhow::Result<PathBuf> {
    Ok(match &args.data {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "{} is not empty; the demo needs an empty or missing directory",
                    d.display()
                );
            }
            d.clone()
        }
        None => std::env::temp_dir().join(format!("tally-demo-{}", tally_engine::now().0)),
    })
}

#[allow(clippy::too_many_lines)]
pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    if args.trades < 2 || args.books == 0 {
        bail!("--trades must be at least 2 and --books at least 1");
    }
    let dir = data_dir(args)?;
    let say = |s: &str| {
        if !json_output() {
            println!("{s}");
        }
    };
    say(&format!("Tally demo: data directory {}", dir.display()));
    // Personal data is sealed under keys kept outside the log's directory.
    let keys = governance::KeyStore::create(&dir)?;
    say(&format!(
        "           key store (outside the log) {}",
        keys.dir.display()
    ));
    let mut timings = BTreeMap::new();
    let options = Options {
        // Small segments show sealing and several sidecars at a demo's default size;
        // a million trades would make thousands of them.
        segment_bytes: if args.trades >= 100_000 {
            64 << 20
        } else {
            4 << 20
        },
        durability: match args.durability {
            DemoDurability::Fsync => tally_engine::Durability::Fsync,
            DemoDurability::None => tally_engine::Durability::None,
        },
        keys: Some(keys.store.clone()),
        ..Options::default()
    };
    let log =
        Log::open(&dir, options.clone()).with_context(|| format!("opening {}", dir.display()))?;

    // 1. The trading day.
    let started = Instant::now();
    let mut day = Day {
        log: &log,
        repo: Repository::new(&log, SnapshotPolicy::EveryEvents(2)),
        rng: Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        seed: args.seed,
        ids: 0,
        counts: Counts::default(),
        marks: (0..INSTRUMENTS.len())
            .map(|i| Decimal::new(8_000 + 1_250 * i as i64, 2))
            .collect(),
    };
    // Opening prices: every instrument has a mark from the start.
    for k in 0..INSTRUMENTS.len() {
        day.price(k, 0)?;
    }
    let bar = progress(args.trades * 2, "trading day");
    let mut new_ids = Vec::with_capacity(args.trades as usize);
    let mut contact_of = Vec::with_capacity(args.trades as usize);
    let mut settled = Vec::new();
    let mut fat_finger = None;
    for i in 0..args.trades {
        let at = i * 10;
        if i % 50 == 0 {
            let k = day.rng.below(INSTRUMENTS.len() as u64) as usize;
            day.price(k, at)?;
        }
        let k = day.rng.below(INSTRUMENTS.len() as u64) as usize;
        let mut price = day.marks[k] + Decimal::new(day.rng.below(21) as i64 - 10, 2);
        if i == 1 {
            // A fat finger: ten times the price. Corrected below.
            fat_finger = Some(price);
            price *= Decimal::TEN;
        }
        let book = format!("BOOK-{:02}", day.rng.below(args.books) + 1);
        let cp = day.rng.below(4) as usize;
        let terms = NewTrade {
            trade_id: format!("{i:06}"),
            book,
            counterparty: COUNTERPARTIES[cp].into(),
            instrument: INSTRUMENTS[k].into(),
            side: if day.rng.percent(50) {
                Side::Buy
            } else {
                Side::Sell
            },
            quantity: Decimal::from(100 * (day.rng.below(50) + 1)),
            price,
            trade_date: "2026-11-23".into(),
            settlement_date: "2026-11-25".into(),
        };
        let stream = trade_stream(&terms.trade_id);
        let id = day.id();
        // Alternate between the counterparty's two contacts.
        let who = cp * 2 + (i % 2) as usize;
        contact_of.push(who);
        let new = Trade::book_for(&terms, &contact(who))?
            .with_id(id)
            .actor(format!("trader-{}", day.rng.below(12) + 1))
            .event_time(secs(at))
            .correlation_id(stream.replace("trade-", "deal-"));
        let r = day.log.append(
            &stream,
            ExpectedVersion::NoStream,
            std::slice::from_ref(&new),
        )?;
        day.counts.events += 1;
        new_ids.push(id);
        // A duplicate delivery of the same event: absorbed, the same result comes back.
        if day.rng.percent(2) {
            let again = day.log.append(&stream, ExpectedVersion::NoStream, &[new])?;
            if again == r {
                day.counts.duplicates_absorbed += 1;
            }
        }
        bar.inc(1);
    }
    // Trades 0 and 1 are kept for the concurrent amendment and the correction below.
    bar.inc(2);
    for i in 2..args.trades {
        let stream = trade_stream(&format!("{i:06}"));
        let cause = Some(new_ids[i as usize]);
        let at = args.trades * 10 + i * 5;
        let roll = day.rng.below(100);
        let late = day.rng.percent(20);
        match roll {
            0..5 => {
                let done = day.act(&stream, "middle-office", at, cause, |t| {
                    t.cancel("booked in error")
                })?;
                day.counts.cancels += u64::from(done);
            }
            5..13 => {
                let q = Decimal::from(100 * (day.rng.below(50) + 1));
                // A late amendment happened right after the booking, hours ago.
                let when = if late { i * 10 + 1 } else { at };
                let amend = Amend {
                    quantity: Some(q),
                    ..Amend::default()
                };
                let done = day.act(&stream, "sales", when, cause, |t| t.amend(&amend))?;
                day.counts.amendments += u64::from(done);
                day.counts.late_amendments += u64::from(done && late);
            }
            13..18 => {
                let to = COUNTERPARTIES[day.rng.below(4) as usize];
                let done = day.act(&stream, "legal", at, cause, |t| t.novate(to))?;
                day.counts.novations += u64::from(done);
            }
            18..28 => {
                let done = day.act(&stream, "ops", at, cause, |t| {
                    t.exercise((t.open_quantity / Decimal::TWO).round())
                })?;
                day.counts.exercises += u64::from(done);
            }
            28..58 => {
                let done = day.act(&stream, "settlements", at, cause, |t| {
                    t.settle("2026-11-25")
                })?;
                day.counts.settlements += u64::from(done);
                if done {
                    settled.push(i);
                }
            }
            _ => {}
        }
        if i % 100 == 0 {
            let k = day.rng.below(INSTRUMENTS.len() as u64) as usize;
            day.price(k, at)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Two desks amend trade 0 from the same version: the second is refused and retries.
    let s0 = trade_stream("000000");
    let mut first = day.repo.load(&s0)?;
    let mut second = day.repo.load(&s0)?;
    let stamp = |e: EventData, day: &mut Day<'_>| e.with_id(day.id()).actor("desk-b");
    if let (Ok(a), Ok(b)) = (
        first.state.amend(&Amend {
            price: Some(day.marks[0]),
            ..Amend::default()
        }),
        second.state.amend(&Amend {
            quantity: Some(Decimal::from(700)),
            ..Amend::default()
        }),
    ) {
        let a = stamp(a, &mut day);
        day.repo.save(&s0, &mut first, &[a])?;
        let b = stamp(b, &mut day);
        match day.repo.save(&s0, &mut second, std::slice::from_ref(&b)) {
            Err(tally_engine::aggregate::AggregateError::Log(Error::WrongExpectedVersion {
                ..
            })) => {
                // Load again, decide again (against the state that now includes desk A's
                // amendment), retry.
                let mut fresh = day.repo.load(&s0)?;
                let again = fresh.state.amend(&Amend {
                    quantity: Some(Decimal::from(700)),
                    ..Amend::default()
                })?;
                let again = stamp(again, &mut day);
                day.repo.save(&s0, &mut fresh, &[again])?;
                day.counts.conflicts_retried += 1;
            }
            other => {
                other?;
            }
        }
        day.counts.events += 2;
        day.counts.amendments += 2;
    }
    // The fat finger on trade 1 is corrected by a compensating AMEND that references the
    // booking (its causation id), never by editing it.
    let s1 = trade_stream("000001");
    let booked = log.read_stream(&s1, 0, 1, Direction::Forward)?.remove(0);
    let t1 = day.repo.load(&s1)?;
    if let (Some(right), Some(terms)) = (fat_finger, t1.state.terms.as_ref())
        && t1.state.status == crate::trading::Status::Live
    {
        let fix = Amend {
            price: Some(right),
            ..Amend::default()
        };
        let body = serde_json::to_string(&fix)?;
        let ev = correction_of(&booked, "AMEND", &body)
            .with_id(day.id())
            .actor("middle-office")
            .event_time(secs(args.trades * 20));
        let mut t = t1.clone();
        day.repo.save(&s1, &mut t, &[ev])?;
        day.counts.corrections += 1;
        day.counts.events += 1;
        let _ = terms;
    }
    let counts = std::mem::take(&mut day.counts);
    let day_marks = day.marks.clone();
    timings.insert("trading_day_ms", started.elapsed().as_millis());

    // 2. Positions and P&L.
    let started = Instant::now();
    let mut projector = open_positions(&log)?;
    // Progress from the projector's status, read on another thread while it folds.
    let bar = progress(log.next_position().0, "positions and P&L");
    let status = projector.status_handle();
    let folding = std::sync::atomic::AtomicBool::new(true);
    /// Stops the progress thread however the fold ends (a panic included).
    struct Done<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            while folding.load(std::sync::atomic::Ordering::Relaxed) {
                bar.set_position(status.get().position);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let _done = Done(&folding);
        projector.catch_up()
    })?;
    bar.finish_and_clear();
    let positions = projector.shared_state();
    let table = positions.read().table();
    timings.insert("projection_ms", started.elapsed().as_millis());

    // 3. Replay from scratch, archive, validate.
    let started = Instant::now();
    let bar = spinner("replaying from scratch and validating");
    let key_text = std::fs::read_to_string(dir.join(tally_engine::KEY_FILE))
        .context("reading the log's signing key")?;
    let key = tally_engine::format::checkpoint::decode_secret_key(&key_text)?;
    let upto = projector.status().position;
    let (replayed, run) = trace::<Positions>(&log, "positions", upto)?;
    let incremental_equals_replay = replayed.encode_state() == positions.read().encode_state();
    let archive = sign_positions(&log, &replayed, run, &key);
    let archive_file = dir.join("positions.archive.json");
    write_archive(&archive_file, &archive)?;
    let snapshots = count_manifests(&log, "$snapshot-")?;
    let positions_read = log.next_position().0;
    let checkpoint = projector.status().checkpoint;
    log.close()?;
    // The archive, read back from its file, is checked against a second replay, from the
    // log as reopened from disk, and signed by the key the operator trusts: what an
    // auditor would run later.
    let archive = Archive::from_json(
        &std::fs::read_to_string(&archive_file)
            .with_context(|| format!("reading {}", archive_file.display()))?,
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", archive_file.display()))?;
    let reopened = Log::open(
        &dir,
        Options {
            recovery: tally_engine::RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )?;
    let validation = validate::<Positions>(&reopened, &archive, &[key.verifying_key().to_bytes()])?;
    let identical = matches!(validation, Validation::Identical { .. });
    drop(reopened);
    bar.finish_and_clear();
    timings.insert("replay_validation_ms", started.elapsed().as_millis());

    // 4. Forensics and the audit extract, through the tool's own commands.
    let started = Instant::now();
    let exe = std::env::current_exe().context("finding the tally binary")?;
    let forensic = Command::new(&exe)
        .args(keys.flags())
        .arg("audit")
        .arg(&dir)
        .args(["--stream", &s1])
        .output()?;
    let extract_file = dir.join(format!("{s1}.extract"));
    let pub_file = dir.join("tally.pub");
    let extracted = Command::new(&exe)
        .args(keys.flags())
        .arg("extract")
        .arg(&dir)
        .args(["--stream", &s1, "--out"])
        .arg(&extract_file)
        .output()?;
    let pubkey = Command::new(&exe).arg("pubkey").arg(&dir).output()?;
    std::fs::write(&pub_file, &pubkey.stdout)?;
    let verified = Command::new(&exe)
        .arg("verify-extract")
        .arg(&extract_file)
        .arg("--pubkey")
        .arg(&pub_file)
        .output()?;
    let extract_verified =
        extracted.status.success() && pubkey.status.success() && verified.status.success();
    timings.insert("audit_ms", started.elapsed().as_millis());

    // 5. Governance: retention, a legal hold and an erasure, then validation and audit again.
    let started = Instant::now();
    let bar = spinner("retention, legal hold, erasure");
    let governed = if args.no_governance {
        governance::Governed {
            report: Value::Null,
            passed: true,
        }
    } else {
        governance::run(&governance::Day1 {
            dir: &dir,
            options: &options,
            keys: &keys,
            key: &key,
            archive: &archive,
            archive_file: &archive_file,
            pub_file: &pub_file,
            exe: &exe,
            settled: &settled,
            contact_of: &contact_of,
            marks: &day_marks,
        })?
    };
    bar.finish_and_clear();
    timings.insert("governance_ms", started.elapsed().as_millis());

    // 6. The report.
    let rows: Vec<Value> = table
        .iter()
        .map(|((book, instrument), p)| {
            json!({
                "book": book, "instrument": instrument,
                "quantity": p.quantity.normalize().to_string(),
                "cost": p.cost.normalize().to_string(),
                "realised": p.realised.normalize().to_string(),
                "unrealised": p.unrealised.normalize().to_string(),
                "mark": p.mark.map(|m| m.normalize().to_string()),
            })
        })
        .collect();
    let report = json!({
        "data": dir.display().to_string(),
        "trades": args.trades,
        "books": args.books,
        "seed": args.seed,
        "events": counts.events,
        "log_records_including_snapshots_and_checkpoints": positions_read,
        "amendments": counts.amendments,
        "late_amendments": counts.late_amendments,
        "cancels": counts.cancels,
        "novations": counts.novations,
        "exercises": counts.exercises,
        "settlements": counts.settlements,
        "prices": counts.prices,
        "duplicates_absorbed": counts.duplicates_absorbed,
        "conflicts_retried": counts.conflicts_retried,
        "corrections": counts.corrections,
        "snapshots": snapshots,
        "projection_checkpoint": checkpoint,
        "replay": {
            "identical": identical,
            "incremental_equals_replay": incremental_equals_replay,
            "state_hash": hex(&archive.state_hash),
            "archive": dir.join("positions.archive.json").display().to_string(),
        },
        "forensic_stream": s1,
        "extract_verified": extract_verified,
        "governance": governed.report,
        "timings_ms": timings,
        "durability": format!("{:?}", args.durability).to_lowercase(),
        "peak_memory_mib": peak_memory_mib(),
        "positions": rows,
    });
    if json_output() {
        println!("{report}");
    } else {
        print_report(&report, &String::from_utf8_lossy(&forensic.stdout));
    }
    if !(identical && incremental_equals_replay && extract_verified && governed.passed) {
        bail!("the demo's checks failed: {report}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The signed archive of a replay of the positions.
fn sign_positions(
    log: &Log,
    replayed: &Positions,
    trace: tally_engine::replay::Trace,
    key: &tally_engine::format::checkpoint::SigningKey,
) -> Archive {
    Archive::sign(
        "positions",
        log.log_id(),
        Positions::STATE_VERSION,
        concat!("tally ", env!("CARGO_PKG_VERSION")),
        "NEW/AMEND/CANCEL/NOVATE/EXERCISE/SETTLE/PRICE v1",
        replayed.encode_state(),
        trace,
        key,
    )
}

/// Writes `archive` to `path` whole or not at all (a synced temporary, renamed).
fn write_archive(path: &std::path::Path, archive: &Archive) -> anyhow::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, archive.to_json())
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}

/// The positions and P&L read model, checkpointed every 1,000 events.
fn open_positions(
    log: &Log,
) -> Result<Projector<'_, Positions>, tally_engine::projection::ProjectionError> {
    Projector::<Positions>::open(
        log,
        "positions",
        ProjectorOptions {
            checkpoint_every: 1000,
            ..ProjectorOptions::default()
        },
    )
}

/// The process's peak resident memory in MiB (Linux: `VmHWM` of /proc/self/status), or
/// `None` where that is not known.
fn peak_memory_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The stored states (manifests) in streams starting with `prefix`: snapshots written.
fn count_manifests(log: &Log, prefix: &str) -> anyhow::Result<u64> {
    let mut n = 0;
    log.scan(Position(0), tally_engine::Verify::Checksums, |v| {
        if v.envelope().is_ok_and(|e| {
            e.stream.starts_with(prefix)
                && e.event_type == tally_engine::state_store::MANIFEST_EVENT_TYPE
        }) {
            n += 1;
        }
    })?;
    Ok(n)
}

fn print_report(r: &Value, forensic: &str) {
    println!();
    println!(
        "1. Trading day: {} trades over {} books, {} events ({} amendments, {} of them late; \
         {} novations, {} exercises, {} settlements, {} cancels, {} prices)",
        r["trades"],
        r["books"],
        r["events"],
        r["amendments"],
        r["late_amendments"],
        r["novations"],
        r["exercises"],
        r["settlements"],
        r["cancels"],
        r["prices"]
    );
    println!(
        "   duplicate deliveries absorbed: {}; concurrent amendments retried: {}; \
         corrections by compensating event: {}; snapshots written: {}",
        r["duplicates_absorbed"], r["conflicts_retried"], r["corrections"], r["snapshots"]
    );
    println!("2. Positions and P&L (exact decimals), projected incrementally with checkpoints:");
    println!(
        "   {:<8} {:<12} {:>10} {:>14} {:>14} {:>10}",
        "book", "instrument", "quantity", "realised", "unrealised", "mark"
    );
    for p in r["positions"].as_array().into_iter().flatten() {
        println!(
            "   {:<8} {:<12} {:>10} {:>14} {:>14} {:>10}",
            p["book"].as_str().unwrap_or_default(),
            p["instrument"].as_str().unwrap_or_default(),
            p["quantity"].as_str().unwrap_or_default(),
            p["realised"].as_str().unwrap_or_default(),
            p["unrealised"].as_str().unwrap_or_default(),
            p["mark"].as_str().unwrap_or("-"),
        );
    }
    println!(
        "3. Replay from scratch of the reopened log: identical to the signed archive: {}; \
         incremental state equals the replay: {} (state {})",
        r["replay"]["identical"],
        r["replay"]["incremental_equals_replay"],
        r["replay"]["state_hash"]
    );
    println!(
        "4. Who did what, when and why, for {}:",
        r["forensic_stream"]
    );
    for line in forensic.lines() {
        println!("   {line}");
    }
    println!(
        "   audit extract exported and verified offline with the public key: {}",
        r["extract_verified"]
    );
    if !r["governance"].is_null() {
        governance::print(&r["governance"]);
    }
    println!("6. Timings (ms): {}", r["timings_ms"]);
    match r["peak_memory_mib"].as_f64() {
        Some(m) => println!("   Peak memory (resident): {m:.1} MiB"),
        None => println!("   Peak memory: not known on this system"),
    }
    println!("Data directory (kept): {}", r["data"]);
}
