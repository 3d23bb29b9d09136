//! `tally policy`, `tally hold` and `tally retention`: retention policies, legal holds, and
//! what retention would remove (docs/OPERATIONS.md, "Retention and legal holds"). Each
//! change is an event of the system stream `$governance` with its actor and reason, written
//! by the engine's operations; the log must not be open in another process (stop tallyd
//! first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::{Value, json};
use tally_engine::Timestamp;
use tally_engine::governance::{
    Governance, HoldPlaced, HoldScope, Keep, LegalHold, PolicyScope, PolicySet, RetentionPolicy,
    parse_duration,
};

use crate::support::{
    KeyArg, Report, open_read_only, open_writable_if_free, parse_time, render, rfc3339,
};

/// Who makes the change, and why: recorded with it.
#[derive(Args, Debug)]
struct Why {
    /// Who makes the change.
    #[arg(long)]
    actor: String,
    /// Why.
    #[arg(long)]
    reason: String,
}

/// `tally policy`.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// Show the retention policies in force, with who set them and when.
    List(Target),
    /// Set a retention policy (a new one, or a new definition under its name).
    Set(PolicySetArgs),
    /// Remove a retention policy.
    Remove(WithdrawArgs),
}

/// `tally hold`.
#[derive(Args, Debug)]
pub struct HoldArgs {
    #[command(subcommand)]
    command: HoldCommand,
}

#[derive(Subcommand, Debug)]
enum HoldCommand {
    /// Show the legal holds that stand, with who placed them and when.
    List(Target),
    /// Place a legal hold: nothing it covers is removed or erased while it stands.
    Place(HoldPlaceArgs),
    /// Release a legal hold.
    Release(WithdrawArgs),
}

/// Where the rules are: a data directory (embedded), or a running tallyd.
#[derive(Args, Debug)]
struct Target {
    /// The data directory. Not with --server.
    #[arg(required_unless_present = "server")]
    dir: Option<PathBuf>,
    /// A running tallyd instead of a data directory (PROTOCOL.md 4.11d).
    #[arg(long, conflicts_with = "dir")]
    server: Option<String>,
}

/// `tally policy set`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["prefix", "aggregate_type", "default"])))]
#[command(group(clap::ArgGroup::new("keep").required(true).args(["keep_after_last", "keep_after", "keep_newest"])))]
struct PolicySetArgs {
    #[command(flatten)]
    target: Target,
    /// The policy's name.
    #[arg(long)]
    name: String,
    /// Streams whose name starts with this (a category such as `trade-`).
    #[arg(long)]
    prefix: Option<String>,
    /// Streams whose first event has this aggregate type.
    #[arg(long)]
    aggregate_type: Option<String>,
    /// Every stream no other policy covers.
    #[arg(long)]
    default: bool,
    /// Keep a stream this long after its last event (`30d`, `7y`), then remove it.
    #[arg(long, value_name = "DURATION")]
    keep_after_last: Option<String>,
    /// Keep a stream this long after its first event of a type, then remove it:
    /// `TYPE=DURATION`, such as `TradeSettled=7y`.
    #[arg(long, value_name = "TYPE=DURATION")]
    keep_after: Option<String>,
    /// Keep the newest N events of each stream; remove older ones.
    #[arg(long, value_name = "N")]
    keep_newest: Option<u64>,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// `tally hold place`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["stream", "prefix", "aggregate_type", "correlation_id", "held_actor"])))]
struct HoldPlaceArgs {
    #[command(flatten)]
    target: Target,
    /// The hold's id (a matter or case number).
    #[arg(long)]
    id: String,
    /// One stream.
    #[arg(long)]
    stream: Option<String>,
    /// Streams whose name starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Streams whose first event has this aggregate type.
    #[arg(long)]
    aggregate_type: Option<String>,
    /// Events with this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Events by this actor.
    #[arg(long = "of-actor", value_name = "ACTOR")]
    held_actor: Option<String>,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// `tally policy remove`, `tally hold release`.
#[derive(Args, Debug)]
struct WithdrawArgs {
    #[command(flatten)]
    target: Target,
    /// The policy's name, or the hold's id.
    #[arg(long, visible_alias = "id", value_name = "NAME|ID")]
    name: String,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// `tally retention`.
#[derive(Args, Debug)]
pub struct RetentionArgs {
    #[command(flatten)]
    target: Target,
    /// List what would be removed and why, and what holds keep; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Judge the policies as of this time (RFC 3339 or nanoseconds; `+DURATION` from now,
    /// such as `+8y`, to see what a policy will remove) instead of now.
    #[arg(long, value_name = "TIME")]
    as_of: Option<String>,
    /// Who runs it (recorded in the run's `$RetentionApplied` event; required unless
    /// --dry-run).
    #[arg(long)]
    actor: Option<String>,
    /// Why (recorded with the run; required unless --dry-run).
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    key: KeyArg,
}

fn writable(dir: &Path, key: &KeyArg) -> Result<tally_engine::Log> {
    let (log, writable) = open_writable_if_free(dir, key)?;
    if !writable {
        bail!(
            "{} is open by another process (a running tallyd?): stop it to change governance",
            dir.display()
        );
    }
    Ok(log)
}

fn duration(text: &str) -> Result<u64> {
    parse_duration(text).map_err(|e| anyhow!(e))
}

/// A policy as listed.
#[derive(Serialize)]
struct PolicyRow<'a> {
    name: &'a str,
    scope: &'a PolicyScope,
    keep: &'a Keep,
    reason: &'a str,
    set_by: &'a str,
    set_at: String,
    position: u64,
}

/// A hold as listed.
#[derive(Serialize)]
struct HoldRow<'a> {
    id: &'a str,
    scope: &'a HoldScope,
    reason: &'a str,
    placed_by: &'a str,
    placed_at: String,
    position: u64,
}

#[derive(Serialize)]
struct Policies<'a>(Vec<PolicyRow<'a>>);

#[derive(Serialize)]
struct Holds<'a>(Vec<HoldRow<'a>>);

fn scope_text(s: &PolicyScope) -> String {
    match s {
        PolicyScope::Default => "default".to_owned(),
        PolicyScope::Prefix(p) => format!("prefix {p}"),
        PolicyScope::AggregateType(t) => format!("aggregate type {t}"),
    }
}

fn hold_scope_text(s: &HoldScope) -> String {
    match s {
        HoldScope::Stream(x) => format!("stream {x}"),
        HoldScope::Prefix(x) => format!("prefix {x}"),
        HoldScope::AggregateType(x) => format!("aggregate type {x}"),
        HoldScope::CorrelationId(x) => format!("correlation id {x}"),
        HoldScope::Actor(x) => format!("actor {x}"),
    }
}

/// A duration in the largest whole unit.
fn span(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    for (unit, n) in [("y", 31_557_600), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

fn keep_text(k: &Keep) -> String {
    match k {
        Keep::AfterLastEvent { nanos } => format!("{} after the last event", span(*nanos)),
        Keep::AfterEvent { event_type, nanos } => {
            format!("{} after {event_type}", span(*nanos))
        }
        Keep::Newest { count } => format!("newest {count} events"),
    }
}

impl Report for Policies<'_> {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.0.is_empty() {
            return writeln!(out, "no retention policies: every event is kept");
        }
        for p in &self.0 {
            writeln!(
                out,
                "{}  {}  keep {}  (set by {} at {}, position {}: {})",
                p.name,
                scope_text(p.scope),
                keep_text(p.keep),
                p.set_by,
                p.set_at,
                p.position,
                p.reason
            )?;
        }
        Ok(())
    }
}

impl Report for Holds<'_> {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.0.is_empty() {
            return writeln!(out, "no legal holds stand");
        }
        for h in &self.0 {
            writeln!(
                out,
                "{}  {}  (placed by {} at {}, position {}: {})",
                h.id,
                hold_scope_text(h.scope),
                h.placed_by,
                h.placed_at,
                h.position,
                h.reason
            )?;
        }
        Ok(())
    }
}

fn policy_rows(g: &Governance) -> Policies<'_> {
    Policies(
        g.policies
            .values()
            .map(|RetentionPolicy { policy, set }| PolicyRow {
                name: &policy.name,
                scope: &policy.scope,
                keep: &policy.keep,
                reason: &policy.reason,
                set_by: &set.actor,
                set_at: rfc3339(set.at),
                position: set.position.0,
            })
            .collect(),
    )
}

fn hold_rows(g: &Governance) -> Holds<'_> {
    Holds(
        g.holds
            .values()
            .map(|LegalHold { hold, placed }| HoldRow {
                id: &hold.id,
                scope: &hold.scope,
                reason: &hold.reason,
                placed_by: &placed.actor,
                placed_at: rfc3339(placed.at),
                position: placed.position.0,
            })
            .collect(),
    )
}

/// A change written to `$governance`.
#[derive(Serialize)]
struct Changed {
    change: String,
    position: u64,
}

impl Report for Changed {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{} (position {})", self.change, self.position)
    }
}

fn changed(change: String, position: u64) -> Result<()> {
    render(&Changed { change, position })
}

/// A governance request to a running tallyd (PROTOCOL.md 4.11d) and its JSON answer.
fn ask(server: &str, request: &Value) -> Result<Value> {
    let text = crate::commands::remote::block_on(async {
        let c = crate::commands::remote::connect(server).await?;
        Ok(c.govern(&request.to_string()).await?)
    })?;
    serde_json::from_str(&text).context("the server's governance answer is not JSON")
}

/// The position a change was written at, from a server's answer.
fn position_of(answer: &Value) -> Result<u64> {
    answer["position"]
        .as_u64()
        .context("the server's answer names no position")
}

/// The rules in force, from a data directory or a server.
fn rules(t: &Target) -> Result<Governance> {
    match (&t.dir, &t.server) {
        (_, Some(server)) => Ok(serde_json::from_value(ask(server, &json!({"op": "list"}))?)
            .context("the server's rules")?),
        (Some(dir), None) => Ok(open_read_only(dir)?.governance()?),
        (None, None) => bail!("give a data directory or --server"),
    }
}

/// Makes one change: embedded through the engine, or as a GOVERN request.
fn change(
    t: &Target,
    key: &KeyArg,
    request: Value,
    embedded: impl FnOnce(&tally_engine::Log) -> tally_engine::Result<tally_engine::AppendResult>,
) -> Result<u64> {
    match (&t.dir, &t.server) {
        (_, Some(server)) => position_of(&ask(server, &request)?),
        (Some(dir), None) => {
            let log = writable(dir, key)?;
            let r = embedded(&log);
            log.close()?;
            Ok(r?.first_position.0)
        }
        (None, None) => bail!("give a data directory or --server"),
    }
}

/// Runs `tally policy`.
pub fn policy(a: &PolicyArgs) -> Result<ExitCode> {
    match &a.command {
        PolicyCommand::List(t) => render(&policy_rows(&rules(t)?))?,
        PolicyCommand::Set(a) => {
            let scope = match (&a.prefix, &a.aggregate_type) {
                (Some(p), _) => PolicyScope::Prefix(p.clone()),
                (None, Some(t)) => PolicyScope::AggregateType(t.clone()),
                (None, None) => PolicyScope::Default,
            };
            let keep = if let Some(d) = &a.keep_after_last {
                Keep::AfterLastEvent {
                    nanos: duration(d)?,
                }
            } else if let Some(spec) = &a.keep_after {
                let (event_type, d) = spec
                    .split_once('=')
                    .context("--keep-after takes TYPE=DURATION, such as TradeSettled=7y")?;
                Keep::AfterEvent {
                    event_type: event_type.to_owned(),
                    nanos: duration(d)?,
                }
            } else {
                Keep::Newest {
                    count: a.keep_newest.context("a --keep-* rule is required")?,
                }
            };
            let p = PolicySet {
                name: a.name.clone(),
                scope,
                keep,
                reason: a.why.reason.clone(),
            };
            let request = json!({"op": "policy_set", "policy": &p, "actor": a.why.actor});
            let at = change(&a.target, &a.key, request, |log| {
                log.set_retention_policy(&p, &a.why.actor)
            })?;
            changed(
                format!(
                    "policy {}: {} keep {}",
                    p.name,
                    scope_text(&p.scope),
                    keep_text(&p.keep)
                ),
                at,
            )?;
        }
        PolicyCommand::Remove(a) => {
            let request = json!({"op": "policy_remove", "name": a.name,
                "actor": a.why.actor, "reason": a.why.reason});
            let at = change(&a.target, &a.key, request, |log| {
                log.remove_retention_policy(&a.name, &a.why.actor, &a.why.reason)
            })?;
            changed(format!("policy {} removed", a.name), at)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `tally hold`.
pub fn hold(a: &HoldArgs) -> Result<ExitCode> {
    match &a.command {
        HoldCommand::List(t) => render(&hold_rows(&rules(t)?))?,
        HoldCommand::Place(a) => {
            let scope = if let Some(s) = &a.stream {
                HoldScope::Stream(s.clone())
            } else if let Some(p) = &a.prefix {
                HoldScope::Prefix(p.clone())
            } else if let Some(t) = &a.aggregate_type {
                HoldScope::AggregateType(t.clone())
            } else if let Some(c) = &a.correlation_id {
                HoldScope::CorrelationId(c.clone())
            } else {
                HoldScope::Actor(a.held_actor.clone().context("a hold needs a scope")?)
            };
            let h = HoldPlaced {
                id: a.id.clone(),
                scope,
                reason: a.why.reason.clone(),
            };
            let request = json!({"op": "hold_place", "hold": &h, "actor": a.why.actor});
            let at = change(&a.target, &a.key, request, |log| {
                log.place_legal_hold(&h, &a.why.actor)
            })?;
            changed(
                format!(
                    "legal hold {} placed on {}",
                    h.id,
                    hold_scope_text(&h.scope)
                ),
                at,
            )?;
        }
        HoldCommand::Release(a) => {
            let request = json!({"op": "hold_release", "id": a.name,
                "actor": a.why.actor, "reason": a.why.reason});
            let at = change(&a.target, &a.key, request, |log| {
                log.release_legal_hold(&a.name, &a.why.actor, &a.why.reason)
            })?;
            changed(format!("legal hold {} released", a.name), at)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `tally retention --dry-run` prints.
#[derive(Serialize)]
struct PlanOut {
    as_of: String,
    examined: u64,
    removed_events: u64,
    held_events: u64,
    #[serde(flatten)]
    plan: tally_engine::RetentionPlan,
}

impl Report for PlanOut {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(
            out,
            "as of {}: {} events examined, {} would be removed, {} kept by legal holds",
            self.as_of, self.examined, self.removed_events, self.held_events
        )?;
        for r in &self.plan.removals {
            writeln!(
                out,
                "remove {}  versions {}..={}  ({} events)  policy {}: {}",
                r.stream, r.versions.0, r.versions.1, r.events, r.policy, r.why
            )?;
        }
        for h in &self.plan.held {
            writeln!(
                out,
                "keep   {}  ({} events)  policy {} held by {}",
                h.stream,
                h.events,
                h.policy,
                h.holds.join(", ")
            )?;
        }
        Ok(())
    }
}

/// What `tally retention` (applying) prints.
#[derive(Serialize, serde::Deserialize)]
struct AppliedOut {
    #[serde(default)]
    as_of: String,
    removed: u64,
    pending: u64,
    held_events: u64,
    segments_rewritten: usize,
    recorded_at: Option<u64>,
    #[serde(default)]
    run_events: usize,
}

impl Report for AppliedOut {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        match self.recorded_at {
            None => writeln!(out, "as of {}: nothing to remove", self.as_of)?,
            Some(p) if self.run_events > 1 => writeln!(
                out,
                "as of {}: removed {} events in {} segments (the run is {} $RetentionApplied events from position {p})",
                self.as_of, self.removed, self.segments_rewritten, self.run_events
            )?,
            Some(p) => writeln!(
                out,
                "as of {}: removed {} events in {} segments (the run is the $RetentionApplied event at position {p})",
                self.as_of, self.removed, self.segments_rewritten
            )?,
        }
        if self.held_events > 0 {
            writeln!(out, "{} events kept by legal holds", self.held_events)?;
        }
        if self.pending > 0 {
            writeln!(
                out,
                "{} events due but not removed yet: in the active segment (removed once it is sealed) or in the cold tier",
                self.pending
            )?;
        }
        Ok(())
    }
}

/// Runs `tally retention`.
pub fn retention(a: &RetentionArgs) -> Result<ExitCode> {
    let as_of = match a.as_of.as_deref() {
        None => tally_engine::now(),
        Some(t) => match t.strip_prefix('+') {
            Some(d) => Timestamp(tally_engine::now().0.saturating_add(duration(d)?)),
            None => parse_time(t)?,
        },
    };
    if !a.dry_run {
        let (Some(actor), Some(reason)) = (&a.actor, &a.reason) else {
            bail!(
                "applying retention records who ran it and why: give --actor and --reason (or --dry-run)"
            );
        };
        let out = match (&a.target.dir, &a.target.server) {
            (_, Some(server)) => serde_json::from_value(ask(
                server,
                &json!({"op": "retention_apply", "as_of": as_of.0, "actor": actor, "reason": reason}),
            )?)
            .context("the server's answer")?,
            (Some(dir), None) => {
                let log = writable(dir, &a.key)?;
                let done = log.apply_retention(as_of, actor, reason);
                log.close()?;
                let done = done?;
                AppliedOut {
                    as_of: String::new(),
                    removed: done.removed,
                    pending: done.pending,
                    held_events: done.plan.held_events(),
                    segments_rewritten: done.segments_rewritten,
                    recorded_at: done.recorded_at.map(|p| p.0),
                    run_events: done.run_events,
                }
            }
            (None, None) => bail!("give a data directory or --server"),
        };
        render(&AppliedOut {
            as_of: rfc3339(as_of),
            ..out
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let plan: tally_engine::RetentionPlan = match (&a.target.dir, &a.target.server) {
        (_, Some(server)) => serde_json::from_value(ask(
            server,
            &json!({"op": "retention_plan", "as_of": as_of.0}),
        )?)
        .context("the server's plan")?,
        (Some(dir), None) => open_read_only(dir)?.retention_plan(as_of)?.summary(),
        (None, None) => bail!("give a data directory or --server"),
    };
    render(&PlanOut {
        as_of: rfc3339(as_of),
        examined: plan.examined,
        removed_events: plan.removed_events(),
        held_events: plan.held_events(),
        plan,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `tally forget`.
#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// The data subject's id (a client or trader id), or with --hash its id hash.
    subject: String,
    /// SUBJECT is the subject's 64-hex-digit id hash (as markers and erasure events show).
    #[arg(long)]
    hash: bool,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// What a forget did.
#[derive(Serialize, serde::Deserialize)]
struct Forgot {
    subject: String,
    generation: u32,
    position: u64,
    signed: bool,
    already_erased: bool,
}

impl Report for Forgot {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.already_erased {
            writeln!(
                out,
                "subject {} was already erased (position {})",
                self.subject, self.position
            )
        } else {
            writeln!(
                out,
                "subject {} erased: key generation {} destroyed, {} erasure event at position {}",
                self.subject,
                self.generation,
                if self.signed { "signed" } else { "unsigned" },
                self.position
            )
        }
    }
}

/// Runs `tally forget`.
pub fn forget(a: &ForgetArgs) -> Result<ExitCode> {
    let subject = if a.hash {
        tally_engine::format::sealed::SubjectHash::from_hex(&a.subject)?
    } else {
        tally_engine::format::sealed::subject_hash(&a.subject)
    };
    let done: Forgot = match (&a.target.dir, &a.target.server) {
        (_, Some(server)) => serde_json::from_value(ask(
            server,
            &json!({"op": "forget", "subject_hash": subject.to_hex(), "actor": a.why.actor, "reason": a.why.reason}),
        )?)
        .context("the server's answer")?,
        (Some(dir), None) => {
            if !crate::support::key_store_named() {
                bail!("forget destroys a key in the key store: give --key-store and --master-key");
            }
            let log = writable(dir, &a.key)?;
            let r = log.forget_hash(subject, &a.why.actor, &a.why.reason);
            log.close()?;
            let r = r?;
            Forgot {
                subject: r.subject,
                generation: r.generation,
                position: r.position,
                signed: r.signed,
                already_erased: r.already_erased,
            }
        }
        (None, None) => bail!("give a data directory or --server"),
    };
    render(&done)?;
    Ok(ExitCode::SUCCESS)
}

/// `tally key-store`.
#[derive(Args, Debug)]
pub struct KeyStoreArgs {
    #[command(subcommand)]
    command: KeyStoreCommand,
}

#[derive(Subcommand, Debug)]
enum KeyStoreCommand {
    /// Create an empty key store in DIR (outside any data directory) and, when FILE does not
    /// exist, a new random master key in it (mode 0600): keep the two apart.
    Init(KeyStoreInitArgs),
    /// How many subjects the store holds keys of (live or destroyed), and damaged slots.
    Info(KeyStoreInitArgs),
}

#[derive(Args, Debug)]
struct KeyStoreInitArgs {
    /// The key store's directory.
    dir: PathBuf,
    /// The master key file.
    #[arg(long = "master", value_name = "FILE")]
    master: PathBuf,
}

/// A key store's facts.
#[derive(Serialize)]
struct KeyStoreOut {
    dir: String,
    subjects: usize,
    damaged_slots: u64,
    master_key_created: bool,
}

impl Report for KeyStoreOut {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        if self.master_key_created {
            writeln!(
                out,
                "new master key written: keep it apart from the store and the log"
            )?;
        }
        writeln!(
            out,
            "key store {}: {} subjects, {} damaged slots",
            self.dir, self.subjects, self.damaged_slots
        )
    }
}

/// Runs `tally key-store`.
pub fn key_store(a: &KeyStoreArgs) -> Result<ExitCode> {
    use tally_engine::keys::{FileKeyStore, KeyStore as _, SecretKey};
    let (args, create) = match &a.command {
        KeyStoreCommand::Init(x) => (x, true),
        KeyStoreCommand::Info(x) => (x, false),
    };
    let mut created = false;
    let master = if create && !args.master.exists() {
        created = true;
        SecretKey::create_file(&args.master)?
    } else {
        SecretKey::from_file(&args.master)?
    };
    let store = if create {
        FileKeyStore::open(&args.dir, &master, true)?
    } else {
        FileKeyStore::open_read_only(&args.dir, &master)?
    };
    render(&KeyStoreOut {
        dir: args.dir.display().to_string(),
        subjects: store.subjects(),
        damaged_slots: store.damaged_slots(),
        master_key_created: created,
    })?;
    Ok(ExitCode::SUCCESS)
}
