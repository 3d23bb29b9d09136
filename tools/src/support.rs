//! What the commands share: findings (exit status 1), opening a data directory, the signing
//! key argument, key and checkpoint files, times, and events as JSON.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tally_engine::format::Timestamp;
use tally_engine::format::checkpoint::{SignedCheckpoint, fingerprint};
use tally_engine::format::envelope::{ContentType, EnvelopeRef};
use tally_engine::format::files::META_FILE;
use tally_engine::format::proof::hex;
use tally_engine::{Error, Log, Options, RecoveryMode};

/// How results are printed: the global `--output` (`--json` is `--output json`).
#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// Text for people: aligned columns, labelled lines.
    #[default]
    Table,
    /// One JSON document (a listing prints one JSON object per line).
    Json,
    /// One JSON object per line.
    Jsonl,
}

static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// Sets the output format for this run (once, from the command line).
pub fn set_output(o: Output) {
    let _ = OUTPUT.set(o);
}

/// The output format of this run.
#[must_use]
pub fn output() -> Output {
    OUTPUT.get().copied().unwrap_or_default()
}

/// Whether this run prints JSON (`--output json` or `jsonl`, or `--json`).
#[must_use]
pub fn json_output() -> bool {
    output() != Output::Table
}

/// A command's result as a typed value: serialized for `--output json` (one document) and
/// `jsonl` (one line), written as text for people otherwise ([`render`]).
pub trait Report: serde::Serialize {
    /// The text form.
    ///
    /// # Errors
    /// A failed write.
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()>;
}

/// Prints `report` in the run's output format: the one renderer of typed reports.
///
/// # Errors
/// A failed write or serialization.
pub fn render(report: &impl Report) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match output() {
        Output::Table => report.write_text(&mut out)?,
        Output::Json => {
            serde_json::to_writer_pretty(&mut out, report)?;
            writeln!(out)?;
        }
        Output::Jsonl => {
            serde_json::to_writer(&mut out, report)?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The format of an event listing: JSON lines when the run prints JSON, else `asked`.
#[must_use]
pub fn event_format(asked: EventFormat) -> EventFormat {
    if json_output() {
        EventFormat::Jsonl
    } else {
        asked
    }
}

/// A problem that verification found: exit status 1.
#[derive(Debug)]
pub struct Finding(pub String);

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Finding {}

/// A problem that verification found, with its details as an object (`what`, and `file`,
/// `offset`, `position`, `blob`, `object`, `cause` where they apply): exit status 1.
#[derive(Debug)]
pub struct FindingReport(pub Value);

impl std::fmt::Display for FindingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0["what"].as_str().unwrap_or("verification failed"))
    }
}

impl std::error::Error for FindingReport {}

/// Prints a finding (exit status 1 follows): `{"ok": false, "failure": {...}}` in JSON,
/// `FAILED: what` and a line per detail otherwise. The one place findings are printed.
pub fn print_finding(e: &anyhow::Error) {
    let details = match e.downcast_ref::<FindingReport>() {
        Some(r) => r.0.clone(),
        None => json!({ "what": format!("{e:#}") }),
    };
    if json_output() {
        // A finding without details keeps the shape commands gave it before: `failure` and
        // `what` hold its text.
        let v = match e.downcast_ref::<FindingReport>() {
            Some(_) => json!({"ok": false, "failure": details}),
            None => json!({"ok": false, "failure": details["what"], "what": details["what"]}),
        };
        if let Err(e) = print_json(&v) {
            eprintln!("tally: {e:#}");
        }
        return;
    }
    println!(
        "FAILED: {}",
        details["what"].as_str().unwrap_or("verification failed")
    );
    for key in ["file", "blob", "object", "offset", "position", "cause"] {
        match &details[key] {
            Value::String(s) => println!("  {key:<9} {s}"),
            Value::Number(n) => println!("  {key:<9} {n}"),
            _ => {}
        }
    }
}

/// Whether `e` is a finding (exit status 1) rather than a usage or I/O error (2).
#[must_use]
pub fn is_finding(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Finding>().is_some() || e.downcast_ref::<FindingReport>().is_some()
}

pub fn require_data_dir(dir: &Path) -> Result<()> {
    if !dir.join(META_FILE).exists() {
        bail!(
            "{} is not a Tally data directory (no tally.meta)",
            dir.display()
        );
    }
    Ok(())
}

/// The key store of this run (`--key-store` and `--master-key`, or `TALLY_KEY_STORE` and
/// `TALLY_MASTER_KEY`), set once from the command line.
static KEY_STORE: std::sync::OnceLock<(Option<PathBuf>, Option<PathBuf>)> =
    std::sync::OnceLock::new();

/// Sets the key store for this run.
pub fn set_key_store(dir: Option<PathBuf>, master: Option<PathBuf>) {
    let _ = KEY_STORE.set((dir, master));
}

/// Whether this run names a key store (without opening it: a store of a million subjects
/// takes a read of every slot).
pub fn key_store_named() -> bool {
    KEY_STORE.get().is_some_and(|(dir, _)| dir.is_some())
}

/// Opens this run's key store, if one was named: for reading only beside a writer that
/// holds it, or as its one writer.
///
/// # Errors
/// A key store without its master key (or the reverse), a wrong master key, or one another
/// process holds (when not `read_only`).
pub fn key_store(read_only: bool) -> Result<Option<Arc<dyn tally_engine::keys::KeyStore>>> {
    let (dir, master) = KEY_STORE.get().cloned().unwrap_or_default();
    let (dir, master) = match (dir, master) {
        (None, None) => return Ok(None),
        (Some(d), Some(m)) => (d, m),
        _ => bail!("--key-store and --master-key go together"),
    };
    let master = tally_engine::keys::SecretKey::from_file(&master)?;
    let store = if read_only {
        tally_engine::keys::FileKeyStore::open_read_only(&dir, &master)?
    } else {
        tally_engine::keys::FileKeyStore::open(&dir, &master, false)?
    };
    Ok(Some(Arc::new(store)))
}

/// Opens a log read-only: nothing on disk changes and no lock is taken.
pub fn open_read_only(dir: &Path) -> Result<Log> {
    require_data_dir(dir)?;
    match Log::open(
        dir,
        Options {
            recovery: RecoveryMode::ReadOnly,
            create: false,
            cold: cold_options(dir)?,
            keys: key_store(true)?,
            ..Options::default()
        },
    ) {
        Ok(log) => Ok(log),
        // Damage that stops even a read-only open is a finding, not a usage error.
        Err(e @ Error::Corrupt { .. }) => {
            Err(Finding(format!("opening {}: {e}", dir.display())).into())
        }
        Err(e) => Err(e).with_context(|| format!("opening {} read-only", dir.display())),
    }
}

/// The cold tier of a log with one: its store (`DIR/cold.store`, `file://` or `s3://`),
/// opened through the `object_store` adapter.
pub fn cold_options(dir: &Path) -> Result<tally_engine::ColdOptions> {
    let store = tally_server::cold_store::store_of_dir(dir).with_context(|| {
        format!(
            "opening the cold store {}",
            dir.join("cold.store").display()
        )
    })?;
    Ok(tally_engine::ColdOptions {
        store,
        ..tally_engine::ColdOptions::default()
    })
}

/// Opens a log for writing when no other process has it open; otherwise read-only.
/// Returns whether it is writable.
pub fn open_writable_if_free(dir: &Path, key: &KeyArg) -> Result<(Log, bool)> {
    require_data_dir(dir)?;
    let keys = match key_store(false) {
        Ok(k) => k,
        // The store's writer (tallyd) has the log too.
        Err(e)
            if e.downcast_ref::<Error>()
                .is_some_and(tally_engine::keys::is_held_elsewhere) =>
        {
            return Ok((open_read_only(dir)?, false));
        }
        Err(e) => return Err(e),
    };
    match Log::open(
        dir,
        Options {
            create: false,
            signing_key: key.key.clone(),
            cold: cold_options(dir)?,
            keys,
            ..Options::default()
        },
    ) {
        Ok(log) => Ok((log, true)),
        Err(Error::Locked { .. }) => Ok((open_read_only(dir)?, false)),
        Err(e) => Err(e).with_context(|| format!("opening {}", dir.display())),
    }
}

/// Reads kept checkpoint notes (`--trusted`), each signed by one of `log_keys`.
pub fn read_kept(
    files: &[PathBuf],
    log_keys: &[[u8; 32]],
) -> Result<Vec<(PathBuf, tally_engine::format::checkpoint::SignedCheckpoint)>> {
    files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading kept checkpoint {}", f.display()))?;
            let note = tally_engine::format::note::Note::parse(&text)
                .with_context(|| format!("kept checkpoint {}", f.display()))?;
            let cp = tally_engine::format::note::checkpoint_from_note(&note, log_keys)
                .with_context(|| {
                    format!("kept checkpoint {} (checked with --pubkey)", f.display())
                })?;
            Ok((f.clone(), cp))
        })
        .collect()
}

/// Reads witness key files (`--witness`): vkey lines; blank lines and `#` comments are
/// ignored.
pub fn read_witness_keys(files: &[PathBuf]) -> Result<Vec<tally_engine::format::note::WitnessKey>> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading witness key {}", f.display()))?;
        let before = out.len();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            out.push(
                tally_engine::format::note::WitnessKey::parse(line)
                    .with_context(|| format!("witness key {}", f.display()))?,
            );
        }
        if out.len() == before {
            bail!("witness key file {} holds no key", f.display());
        }
    }
    Ok(out)
}

/// Reads a public key file (`--pubkey`).
pub fn read_pubkeys(path: &Path) -> Result<Vec<[u8; 32]>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading public key file {}", path.display()))?;
    tally_engine::format::checkpoint::parse_public_keys(&text)
        .with_context(|| format!("public key file {}", path.display()))
}

/// A UTC timestamp as RFC 3339 with nanoseconds.
#[must_use]
pub fn rfc3339(t: Timestamp) -> String {
    let ns = t.0;
    let secs = ns / 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ns % 1_000_000_000
    )
}

/// Parses a time given as nanoseconds since the epoch or as RFC 3339 UTC
/// (`2026-11-22T10:00:00Z`, optionally with a fraction).
pub fn parse_time(s: &str) -> Result<Timestamp> {
    if let Ok(ns) = s.parse::<u64>() {
        return Ok(Timestamp(ns));
    }
    let bad = || {
        anyhow::anyhow!(
            "time {s:?} is neither nanoseconds nor RFC 3339 UTC (YYYY-MM-DDTHH:MM:SS[.fff]Z)"
        )
    };
    let s2 = s.strip_suffix('Z').ok_or_else(bad)?;
    let (date, time) = s2.split_once('T').ok_or_else(bad)?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (Some(Ok(y)), Some(Ok(m)), Some(Ok(day)), None) = (d.next(), d.next(), d.next(), d.next())
    else {
        return Err(bad());
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(str::parse::<u64>);
    let (Some(Ok(hh)), Some(Ok(mm)), Some(Ok(ss)), None) = (t.next(), t.next(), t.next(), t.next())
    else {
        return Err(bad());
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let nanos: u64 = if frac.is_empty() {
        0
    } else {
        frac.parse::<u64>().map_err(|_| bad())? * 10u64.pow(9 - frac.len() as u32)
    };
    // Days from civil (the inverse of the above).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let days = u64::try_from(days).map_err(|_| bad())?;
    Ok(Timestamp(
        ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000_000) + nanos,
    ))
}

/// JSON of a signed checkpoint.
#[must_use]
pub fn checkpoint_json(cp: &SignedCheckpoint) -> Value {
    let s = &cp.statement;
    let mut v = json!({
        "id": s.id,
        "log_id": hex(&s.log_id),
        "tree_size": s.tree_size,
        "root": hex(&s.root),
        "chain_head": hex(&s.chain_head),
        "time": s.time.0,
        "time_utc": rfc3339(s.time),
        "public_key": hex(&cp.public_key),
        "key_fingerprint": fingerprint(&cp.public_key),
        "signature": hex(&cp.signature),
        "entry": hex(&cp.encode_entry()),
    });
    if let Some((count, root)) = s.streams {
        v["statement_version"] = json!(s.version());
        v["stream_count"] = json!(count);
        v["streams_root"] = json!(hex(&root));
    }
    v
}

/// Prints a JSON result: one pretty document, or with `--output jsonl` one line (a list,
/// one line per element).
///
/// # Errors
/// A failed write.
pub fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match (output(), v) {
        (Output::Jsonl, Value::Array(items)) => {
            for item in items {
                serde_json::to_writer(&mut out, item)?;
                writeln!(out)?;
            }
        }
        (Output::Jsonl, _) => {
            serde_json::to_writer(&mut out, v)?;
            writeln!(out)?;
        }
        _ => {
            serde_json::to_writer_pretty(&mut out, v)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Refuses `--output json` for a command, or a form of one, that prints no JSON.
///
/// # Errors
/// When the run asks for JSON.
pub fn no_json(what: &str) -> Result<()> {
    if json_output() {
        bail!("{what} prints no JSON (--output {:?} was given)", output());
    }
    Ok(())
}

/// The signing key a command that may sign a checkpoint uses.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArg {
    /// The signing key file, when it is kept outside the data directory (default:
    /// DIR/tally.key). Used only when the command opens a stopped log for writing.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

pub fn read_secret_key(path: &Path) -> Result<tally_engine::format::checkpoint::SigningKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading signing key {}", path.display()))?;
    tally_engine::format::checkpoint::decode_secret_key(&text)
        .with_context(|| format!("signing key {}", path.display()))
}

/// A progress bar for a command that prints its results on standard output: drawn on
/// standard error when that is a terminal ([`crate::extract::progress`]) and standard output
/// is not (the bar would be drawn over the lines printed).
pub fn output_progress(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let bar = crate::extract::progress(len, what);
    if std::io::stdout().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Whether `e` is a write to a closed pipe (`tally find ... | head`): not an error for a
/// command that prints a listing.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    let kind = e
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
        .or_else(|| {
            e.downcast_ref::<serde_json::Error>()
                .and_then(serde_json::Error::io_error_kind)
        });
    kind == Some(std::io::ErrorKind::BrokenPipe)
}

/// Output formats of event listings.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum EventFormat {
    /// Aligned columns.
    Table,
    /// One JSON object per line.
    Jsonl,
}

/// JSON of one event as `dump --format jsonl` and extracts show it.
#[must_use]
pub fn event_json(
    position: u64,
    version: u64,
    record_time: Timestamp,
    record_hash: &[u8; 32],
    e: &EnvelopeRef<'_>,
) -> Value {
    let mut v = envelope_json(position, version, record_time, e);
    v["record_hash"] = Value::String(hex(record_hash));
    v
}

/// How a sealed event's personal data was read ([`tally_engine::Sealing`]), as JSON:
/// `{"subject", "generation", "fields", "state", "erased_by"?, "reason"?}`.
pub fn sealing_json(s: &tally_engine::Sealing) -> Value {
    let mut v = json!({
        "subject": s.subject.to_hex(),
        "generation": s.generation,
        "fields": s.fields,
    });
    match &s.state {
        tally_engine::SealState::Opened => v["state"] = "opened".into(),
        tally_engine::SealState::Erased { by } => {
            v["state"] = "erased".into();
            v["erased_by"] = json!(by.map(|p| p.0));
        }
        tally_engine::SealState::Unavailable { reason } => {
            v["state"] = "unavailable".into();
            v["reason"] = reason.clone().into();
        }
    }
    v
}

/// An event as JSON, without its record hash (what a server's read returns).
pub fn envelope_json(
    position: u64,
    version: u64,
    record_time: Timestamp,
    e: &EnvelopeRef<'_>,
) -> Value {
    let (payload, encoding) = payload_json(e);
    let mut v = json!({
        "position": position,
        "stream": e.stream,
        "version": version,
        "event_id": e.event_id.to_string(),
        "type": e.event_type,
        "schema_version": e.schema_version,
        "aggregate_type": e.aggregate_type,
        "record_time": rfc3339(record_time),
        "event_time": rfc3339(e.event_time),
        "actor": e.actor,
        "correlation_id": e.correlation_id,
        "causation_id": e.causation_id,
        "content_type": content_type_name(e.content_type),
        "payload": payload,
        "payload_encoding": encoding,
    });
    if let Some(b) = e.blob() {
        v["blob"] = json!({"hash": b.hex(), "size": b.size});
    }
    v
}

fn content_type_name(c: ContentType) -> &'static str {
    match c {
        ContentType::Json => "json",
        _ => "binary",
    }
}

/// The payload as JSON: parsed for a JSON payload, base64 otherwise; `null` with encoding
/// `blob` for a payload stored as a blob (the event's `blob` gives its hash and size).
pub fn payload_json(e: &EnvelopeRef<'_>) -> (Value, &'static str) {
    if e.blob().is_some() {
        return (Value::Null, "blob");
    }
    if e.content_type == ContentType::Json
        && let Ok(v) = serde_json::from_slice::<Value>(e.payload)
    {
        return (v, "json");
    }
    (
        Value::String(base64::engine::general_purpose::STANDARD.encode(e.payload)),
        "base64",
    )
}

pub fn print_tree(v: &Value, indent: usize) {
    if let Value::Object(m) = v {
        for (k, val) in m {
            match val {
                Value::Object(_) => {
                    println!("{:indent$}{k}:", "");
                    print_tree(val, indent + 2);
                }
                Value::String(s) => println!("{:indent$}{k:<20} {s}", ""),
                Value::Array(_) => {}
                other => println!("{:indent$}{k:<20} {other}", ""),
            }
        }
    }
}
