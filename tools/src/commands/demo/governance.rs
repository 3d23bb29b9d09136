//! The demo's governance step: what compliance does to a trading log after the day.
//!
//! 1. A retention policy keeps settled trades for a time after SETTLE (seven years on a
//!    desk; a nanosecond on the demo's compressed clock), and a legal hold keeps one settled
//!    trade, under dispute, past it.
//! 2. A confirmation contact asks to be forgotten. While the hold covers a trade that holds
//!    the contact's data the erasure is refused, naming the hold; another contact's
//!    erasure destroys the key, so every trade of theirs reads a marker in place of the
//!    contact, with no byte of a segment rewritten.
//! 3. The retention run prunes the settled trades (the held one stays whole), and the next
//!    day's prices and an amendment arrive.
//! 4. The positions projection goes on from its checkpoint. A replay from scratch is now
//!    refused (it would fold a shortened history); the replay starts instead from the
//!    archive signed before retention, is archived and signed again, equals the incremental
//!    state, and validates against the log reopened from disk.
//! 5. The audit extracts of the erased contact's trade and of a pruned trade verify offline,
//!    and say what was erased and what was removed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, bail};
use rust_decimal::Decimal;
use serde_json::{Value, json};
use tally_engine::aggregate::{Repository, SnapshotPolicy};
use tally_engine::format::checkpoint::SigningKey;
use tally_engine::format::proof::hex;
use tally_engine::governance::{HoldPlaced, HoldScope, Keep, PolicyScope, PolicySet};
use tally_engine::keys::{FileKeyStore, SecretKey};
use tally_engine::projection::Projection;
use tally_engine::replay::{Archive, Validation, trace_window, validate, validate_window};
use tally_engine::{Direction, Error, ExpectedVersion, Log, Options, RecoveryMode};

use super::{CONTACTS, INSTRUMENTS, contact};
use crate::trading::{Amend, CONTACT_FIELD, Positions, Trade, price_event, price_stream};

/// The demo's key store: beside the log's directory, never in it.
pub struct KeyStore {
    /// The folder holding the master key and the store.
    pub dir: PathBuf,
    /// The open store (this process writes it).
    pub store: Arc<dyn tally_engine::keys::KeyStore>,
}

impl KeyStore {
    /// A new master key and an empty store in `<data>.keys`, beside the demo's data
    /// directory.
    pub fn create(data: &Path) -> anyhow::Result<KeyStore> {
        let name = data
            .file_name()
            .context("the data directory has no name")?
            .to_string_lossy();
        let dir = data.with_file_name(format!("{name}.keys"));
        if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() {
            bail!(
                "{} is not empty; the demo keeps its key store there",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let master = SecretKey::create_file(&dir.join("master.key"))?;
        let store = FileKeyStore::open(&dir.join("store"), &master, true)?;
        Ok(KeyStore {
            dir,
            store: Arc::new(store),
        })
    }

    /// The global options that give a `tally` command the store (read-only beside the
    /// demo, which holds it).
    pub fn flags(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--key-store".into(),
            self.dir.join("store").into(),
            "--master-key".into(),
            self.dir.join("master.key").into(),
        ]
    }
}

/// What the day left for the governance step.
pub struct Day1<'a> {
    pub dir: &'a Path,
    pub options: &'a Options,
    pub keys: &'a KeyStore,
    pub key: &'a SigningKey,
    /// The positions archive signed after the day (before any retention).
    pub archive: &'a Archive,
    pub archive_file: &'a Path,
    pub pub_file: &'a Path,
    pub exe: &'a Path,
    /// Trades settled during the day, by number.
    pub settled: &'a [u64],
    /// Each trade's confirmation contact (an index of `CONTACTS`).
    pub contact_of: &'a [usize],
    /// Each instrument's last mark.
    pub marks: &'a [Decimal],
}

/// The step's report, and whether every check passed.
pub struct Governed {
    pub report: Value,
    pub passed: bool,
}

const POLICY: &str = "settled-trades";
const HOLD: &str = "LIT-2026-117";

fn stream_of(n: u64) -> String {
    crate::trading::trade_stream(&format!("{n:06}"))
}

#[allow(clippy::too_many_lines)]
pub fn run(day: &Day1<'_>) -> anyhow::Result<Governed> {
    let (Some(&held_n), Some(&pruned_n)) = (day.settled.first(), day.settled.get(1)) else {
        bail!("the day settled fewer than two trades: book more (--trades)");
    };
    let held = stream_of(held_n);
    let pruned = stream_of(pruned_n);
    let log = Log::open(day.dir, day.options.clone())?;

    // 1. The rules: a policy, and a hold that overrides it for one trade.
    log.set_retention_policy(
        &PolicySet {
            name: POLICY.into(),
            scope: PolicyScope::Prefix("trade-".into()),
            keep: Keep::AfterEvent {
                event_type: "SETTLE".into(),
                nanos: 1,
            },
            reason: "record keeping (MiFID II art. 16): a desk keeps a settled trade seven \
                     years; the demo's clock keeps it one nanosecond"
                .into(),
        },
        "compliance",
    )?;
    log.place_legal_hold(
        &HoldPlaced {
            id: HOLD.into(),
            scope: HoldScope::Stream(held.clone()),
            reason: "settlement dispute with the counterparty; keep every record".into(),
        },
        "legal",
    )?;

    // 2. Erasure requests. The held trade's contact cannot be erased while the hold stands.
    let held_contact = contact(day.contact_of[held_n as usize]);
    let refused = match log.forget(
        &held_contact.subject(),
        "privacy-office",
        "GDPR art. 17 request",
    ) {
        Err(e @ Error::ErasureHeld { .. }) => Some(e.to_string()),
        Err(e) => return Err(e.into()),
        Ok(_) => None,
    };
    // Another contact: one not on the held trade, with a trade the policy keeps (never
    // settled), so that the marker can be seen in place.
    let erased_who = (0..CONTACTS.len())
        .find(|&c| c != day.contact_of[held_n as usize])
        .context("only one contact")?;
    let erased_contact = contact(erased_who);
    let erased = log.forget(
        &erased_contact.subject(),
        "privacy-office",
        "GDPR art. 17 request from the contact",
    )?;
    let kept_with = |c: usize| {
        (0..day.contact_of.len() as u64)
            .find(|n| day.contact_of[*n as usize] == c && !day.settled.contains(n))
            .map(stream_of)
    };
    let erased_trade = kept_with(erased_who).context("no kept trade of the erased contact")?;
    let live_who = (0..CONTACTS.len())
        .find(|&c| c != erased_who && kept_with(c).is_some())
        .context("no other contact")?;
    let live_trade = kept_with(live_who).context("no kept trade of another contact")?;

    // 3. Retention: the run rewrites sealed segments only, so the day's last segment is
    // sealed first.
    log.seal_active_segment()?;
    let run = log.apply_retention(
        tally_engine::now(),
        "compliance",
        "end-of-day retention run",
    )?;
    // The next day: new marks, and an amendment of trade 0.
    let mut marks = day.marks.to_vec();
    for (k, mark) in marks.iter_mut().enumerate() {
        *mark += Decimal::new(25, 2);
        log.append(
            &price_stream(INSTRUMENTS[k]),
            ExpectedVersion::Any,
            &[price_event(INSTRUMENTS[k], *mark).actor("market-data")],
        )?;
    }
    let repo = Repository::<Trade>::new(&log, SnapshotPolicy::EveryEvents(2));
    let s0 = stream_of(0);
    let mut t0 = repo.load(&s0)?;
    let amended = match t0.state.amend(&Amend {
        quantity: Some(Decimal::from(900)),
        ..Amend::default()
    }) {
        Ok(e) => {
            repo.save(&s0, &mut t0, &[e.actor("sales")])?;
            true
        }
        Err(_) => false,
    };

    // 4. The projection goes on from its checkpoint; the replay goes on from the archive.
    let mut projector = super::open_positions(&log)?;
    projector.catch_up()?;
    let incremental = projector.shared_state().read().encode_state();
    let upto = projector.status().position;
    let start =
        Positions::decode_state(&day.archive.state).context("the day's archive does not decode")?;
    let (replayed, window) =
        trace_window::<Positions>(&log, "positions", start, day.archive.next, upto, None)?;
    let incremental_equals_replay = replayed.encode_state() == incremental;
    let later = super::sign_positions(&log, &replayed, window, day.key);
    let later_file = day
        .archive_file
        .with_file_name("positions.after-retention.archive.json");
    super::write_archive(&later_file, &later)?;

    // What reads show now.
    let g = log.governance()?;
    let pruned_events = log.read_stream(&pruned, 0, usize::MAX, Direction::Forward)?;
    let pruned_reads = pruned_events
        .iter()
        .map(|e| {
            e.removed_by()
                .and_then(|by| g.removal(by, e.position))
                .map(|(r, policy)| {
                    format!(
                        "removed by retention policy {policy} at {} (run at position {})",
                        crate::support::rfc3339(tally_engine::Timestamp(r.as_of)),
                        e.removed_by().map_or(0, |p| p.0)
                    )
                })
        })
        .collect::<Option<Vec<String>>>();
    let held_events = log.read_stream(&held, 0, usize::MAX, Direction::Forward)?;
    let held_whole = !held_events.is_empty()
        && held_events.iter().all(|e| e.removed_by().is_none())
        && held_events.iter().any(|e| e.event_type() == "SETTLE");
    let contact_read = |stream: &str| -> anyhow::Result<Value> {
        let new = log.read_stream(stream, 0, 1, Direction::Forward)?;
        let e = new.first().context("a kept trade has no events")?;
        let v: Value = serde_json::from_slice(e.payload())?;
        Ok(v[CONTACT_FIELD].clone())
    };
    let erased_read = contact_read(&erased_trade)?;
    let live_read = contact_read(&live_trade)?;
    let erased_marker = erased_read
        .get(tally_engine::ERASED_MARKER)
        .is_some_and(|m| m["subject"] == erased.subject.as_str());
    let live_opened = live_read["email"] == CONTACTS[live_who].1;
    drop(projector);
    log.close()?;

    // Validation from disk, as an auditor would run it: the window from the signed
    // archive validates; a replay from scratch is refused.
    let reopened = Log::open(
        day.dir,
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            ..Options::default()
        },
    )?;
    let trusted = [day.key.verifying_key().to_bytes()];
    let window_identical = matches!(
        validate_window::<Positions>(&reopened, day.archive, &later, &trusted, None)?,
        Validation::Identical { .. }
    );
    let from_scratch = match validate::<Positions>(&reopened, &later, &trusted) {
        Ok(v) => format!("not refused: {v:?}"),
        Err(e) => format!("refused: {e}"),
    };
    let scratch_refused = from_scratch.starts_with("refused") && from_scratch.contains("retention");
    let verify = reopened.verify()?;
    drop(reopened);

    // 5. The audit extracts, through the tool.
    let erased_extract = extract(day, &erased_trade)?;
    let erasures_extract = extract(day, tally_engine::ERASURE_STREAM)?;
    let pruned_extract = extract(day, &pruned)?;
    // The trade's extract proves whose data it seals; the `$erasures` extract proves the
    // erasure of that subject.
    let sealed_for_erased = erased_extract.report["personal"]["subjects"]
        .get(&erased.subject)
        .is_some();
    let erasure_proven = erasures_extract.report["personal"]["erasures"]
        .as_array()
        .is_some_and(|a| a.iter().any(|e| e["subject"] == erased.subject.as_str()));

    let passed = refused.as_deref().is_some_and(|m| m.contains(HOLD))
        && !erased.already_erased
        && run.removed > 0
        && pruned_reads.is_some()
        && held_whole
        && erased_marker
        && live_opened
        && incremental_equals_replay
        && window_identical
        && scratch_refused
        && amended
        && erased_extract.verified
        && erasures_extract.verified
        && pruned_extract.verified
        && sealed_for_erased
        && erasure_proven
        && pruned_extract.report["removed_by_retention"].as_u64()
            == Some(pruned_events.len() as u64);
    let (snapshot_streams, removed_streams): (Vec<_>, Vec<_>) = run
        .plan
        .removals
        .iter()
        .partition(|r| r.stream.starts_with('$'));
    let report = json!({
        "policy": POLICY,
        "hold": HOLD,
        "held_trade": held,
        "held_trade_whole": held_whole,
        "held_events": run.plan.held_events(),
        "erasure_refused_by_hold": refused,
        "erased_subject": erased.subject,
        "erased_contact_trade": erased_trade,
        "erased_contact_reads": erased_read,
        "other_contact_trade": live_trade,
        "other_contact_opens": live_opened,
        "erasure_position": erased.position,
        "erasure_signed": erased.signed,
        "retention": {
            "recorded_at": run.recorded_at.map(|p| p.0),
            "removed_events": run.removed,
            "removed_streams": removed_streams.len(),
            "removed_snapshot_streams": snapshot_streams.len(),
            "pending": run.pending,
            "segments_rewritten": run.segments_rewritten,
        },
        "pruned_trade": pruned,
        "pruned_trade_reads": pruned_reads.as_ref().and_then(|r| r.first()),
        "verify_removed_runs": verify.removed.len(),
        "replay": {
            "from_scratch": from_scratch,
            "window_from_signed_archive_identical": window_identical,
            "incremental_equals_replay": incremental_equals_replay,
            "state_hash": hex(&later.state_hash),
            "archive": later_file.display().to_string(),
        },
        "extract_after_erasure": erased_extract.summary(),
        "extract_of_erasures": erasures_extract.summary(),
        "extract_of_pruned_trade": pruned_extract.summary(),
    });
    Ok(Governed { report, passed })
}

struct Extracted {
    verified: bool,
    report: Value,
    file: PathBuf,
}

impl Extracted {
    fn summary(&self) -> Value {
        json!({
            "verified": self.verified,
            "file": self.file.display().to_string(),
            "events": self.report["events"],
            "personal": self.report["personal"],
            "removed_by_retention": self.report["removed_by_retention"],
        })
    }
}

/// `tally extract` of `stream`, then `tally verify-extract` of it with the log's public key.
fn extract(day: &Day1<'_>, stream: &str) -> anyhow::Result<Extracted> {
    let name = stream.trim_start_matches('$');
    let file = day.dir.join(format!("{name}.after-governance.extract"));
    let made = Command::new(day.exe)
        .args(day.keys.flags())
        .arg("extract")
        .arg(day.dir)
        .args(["--stream", stream, "--out"])
        .arg(&file)
        .output()?;
    let checked = Command::new(day.exe)
        .args(["--json", "verify-extract"])
        .arg(&file)
        .arg("--pubkey")
        .arg(day.pub_file)
        .output()?;
    let report = serde_json::from_slice(&checked.stdout).unwrap_or(Value::Null);
    Ok(Extracted {
        verified: made.status.success() && checked.status.success(),
        report,
        file,
    })
}

/// The step's lines of the text report.
pub fn print(g: &Value) {
    let s = |v: &Value| v.as_str().map_or_else(|| v.to_string(), str::to_owned);
    println!("5. Governance (retention, legal hold, erasure), then validation and audit again:");
    println!(
        "   policy {}: settled trades go after SETTLE; hold {} keeps {} past it (whole: {})",
        s(&g["policy"]),
        s(&g["hold"]),
        s(&g["held_trade"]),
        g["held_trade_whole"]
    );
    println!(
        "   erasing the held trade's contact: {}",
        s(&g["erasure_refused_by_hold"])
    );
    println!(
        "   another contact erased (subject {}, signed: {}); {} now reads {}",
        s(&g["erased_subject"]),
        g["erasure_signed"],
        s(&g["erased_contact_trade"]),
        g["erased_contact_reads"]
    );
    let r = &g["retention"];
    println!(
        "   retention run at position {}: {} events of {} trades and of their {} snapshot streams \
         removed, {} held, {} segments rewritten; {} reads \"{}\"",
        r["recorded_at"],
        r["removed_events"],
        r["removed_streams"],
        r["removed_snapshot_streams"],
        g["held_events"],
        r["segments_rewritten"],
        s(&g["pruned_trade"]),
        s(&g["pruned_trade_reads"])
    );
    let p = &g["replay"];
    println!("   replay from scratch: {}", s(&p["from_scratch"]));
    println!(
        "   replay from the archive signed before retention: identical to the new signed \
         archive: {}; incremental state equals it: {} (state {})",
        p["window_from_signed_archive_identical"],
        p["incremental_equals_replay"],
        s(&p["state_hash"])
    );
    let x = &g["extract_after_erasure"];
    println!(
        "   audit extract of {} verified offline: {}; it seals data of subjects {}",
        s(&g["erased_contact_trade"]),
        x["verified"],
        x["personal"]["subjects"]
    );
    let x = &g["extract_of_erasures"];
    println!(
        "   audit extract of $erasures verified offline: {}; erasures it proves: {}",
        x["verified"], x["personal"]["erasures"]
    );
    let x = &g["extract_of_pruned_trade"];
    println!(
        "   audit extract of {} verified offline: {}; {} of its {} events removed by retention",
        s(&g["pruned_trade"]),
        x["verified"],
        x["removed_by_retention"],
        x["events"]
    );
}
