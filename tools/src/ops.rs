//! The operator's commands: init, pubkey, inspect, dump, verify, checkpoint, prove.
//!
//! Every command reads the data directory through the engine's public API. Those that only
//! read open the log read-only (no lock, nothing changed), so they run beside a live
//! server. Exit status: 0 success, 1 a verification problem, 2 usage or I/O errors.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tally_engine::format::checkpoint::{SignedCheckpoint, encode_public_key, fingerprint};
use tally_engine::format::envelope::{ContentType, EnvelopeRef};
use tally_engine::format::files::META_FILE;
use tally_engine::format::proof::hex;
use tally_engine::format::segment::{SegmentFooter, SegmentHeader};
use tally_engine::format::{PAGE_BYTES, Timestamp};
use tally_engine::index::SealedIndex;
use tally_engine::{Error, Log, Options, Position, RecoveryMode, VerifyOptions};

/// A problem that verification found: exit status 1.
#[derive(Debug)]
pub struct Finding(pub String);

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Finding {}

pub fn require_data_dir(dir: &Path) -> Result<()> {
    if !dir.join(META_FILE).exists() {
        bail!(
            "{} is not a Tally data directory (no tally.meta)",
            dir.display()
        );
    }
    Ok(())
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
    match Log::open(
        dir,
        Options {
            create: false,
            signing_key: key.key.clone(),
            cold: cold_options(dir)?,
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

pub fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// init, pubkey

/// `tally init DIR`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// The data directory to create.
    dir: PathBuf,
    /// Sign with this existing key file instead of creating DIR/tally.key; later writers
    /// must be given the same file (Options::signing_key, `--key`).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Register the new log with this witness (its directory, `tally witness init`) and
    /// have it cosign the first checkpoint at once.
    #[arg(long, value_name = "WDIR")]
    witness: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Creates a data directory and its signing key.
pub fn init(a: &InitArgs) -> Result<ExitCode> {
    if a.dir.join(META_FILE).exists() {
        bail!("{} already holds a Tally log", a.dir.display());
    }
    let log = Log::open(
        &a.dir,
        Options {
            signing_key: a.key.clone(),
            ..Options::default()
        },
    )
    .with_context(|| format!("creating {}", a.dir.display()))?;
    let key_file = a
        .key
        .clone()
        .unwrap_or_else(|| a.dir.join(tally_engine::KEY_FILE));
    let key = log.public_key().context("the new log has no signing key")?;
    let id = log.log_id();
    log.close()?;
    let witnessed = match &a.witness {
        Some(wdir) => {
            let w = tally_engine::witness::Witness::open(wdir)
                .with_context(|| format!("opening witness {}", wdir.display()))?;
            w.register(&id, &[key])?;
            match crate::witness::observe_dir(&w, &a.dir)? {
                Ok(_) => Some(w.key().name),
                Err(e) => bail!("the witness refused the new log's checkpoint: {e}"),
            }
        }
        None => None,
    };
    let export = open_read_only(&a.dir)?
        .checkpoint_note(None)?
        .context("the new log has no checkpoint")?
        .encode();
    if a.json {
        print_json(&json!({
            "dir": a.dir,
            "log_id": hex(&id),
            "public_key": hex(&key),
            "key_fingerprint": fingerprint(&key),
            "key_file": key_file,
            "witness": witnessed,
            "checkpoint_note": export,
        }))?;
    } else {
        println!("created {}", a.dir.display());
        println!("log id           {}", hex(&id));
        println!("signing key      {}", key_file.display());
        println!("public key       {}", hex(&key));
        println!("fingerprint      {}", fingerprint(&key));
        if let Some(name) = &witnessed {
            println!("witness          {name} cosigned the first checkpoint");
        }
        println!();
        println!("Keep this checkpoint outside the directory. It is of an empty log, so it proves");
        println!(
            "nothing about records yet: keep a later one too (`tally checkpoint DIR --export`),"
        );
        println!(
            "and check the log against them with `tally verify DIR --pubkey FILE --trusted NOTE`."
        );
        println!();
        print!("{export}");
    }
    Ok(ExitCode::SUCCESS)
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

/// `tally keygen FILE`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The key file to create (mode 0600; an existing file is never overwritten).
    file: PathBuf,
}

/// Creates a new signing key file and prints its public key.
pub fn keygen(a: &KeygenArgs) -> Result<ExitCode> {
    let key = tally_engine::create_signing_key(&a.file)
        .with_context(|| format!("creating signing key {}", a.file.display()))?;
    eprintln!(
        "created {} (mode 0600), fingerprint {}",
        a.file.display(),
        fingerprint(&key)
    );
    print!("{}", encode_public_key(&key));
    Ok(ExitCode::SUCCESS)
}

/// `tally pubkey DIR`.
#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// The data directory (its key is DIR/tally.key).
    #[arg(required_unless_present = "key")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArg,
}

/// Prints the public key in the form `--pubkey FILE` reads.
pub fn pubkey(a: &PubkeyArgs) -> Result<ExitCode> {
    let path = match (&a.key.key, &a.dir) {
        (Some(k), _) => k.clone(),
        (None, Some(d)) => d.join(tally_engine::KEY_FILE),
        (None, None) => bail!("name a data directory or --key FILE"),
    };
    let key = read_secret_key(&path)?;
    print!("{}", encode_public_key(&key.verifying_key().to_bytes()));
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// inspect

/// `tally inspect DIR`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The data directory.
    dir: PathBuf,
    /// Show one segment (by sequence number) in detail.
    #[arg(long)]
    segment: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn read_page(path: &Path, at: u64) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut page = vec![0u8; PAGE_BYTES as usize];
    f.read_exact_at(&mut page, at)
        .with_context(|| format!("reading {} at byte {at}", path.display()))?;
    Ok(page)
}

/// Prints the segments table, or one segment.
pub fn inspect(a: &InspectArgs) -> Result<ExitCode> {
    let log = open_read_only(&a.dir)?;
    let segs = log.segments();
    if let Some(n) = a.segment {
        let seg = segs
            .iter()
            .find(|s| s.seq.0 == n)
            .with_context(|| format!("no segment {n} in {}", a.dir.display()))?;
        if let Some(object) = &seg.cold {
            // No local file: what the manifest and the local sidecar say.
            let idx_path = seg.path.with_extension("idx");
            let idx = std::fs::read(&idx_path)
                .ok()
                .and_then(|b| SealedIndex::open(Arc::new(b)).ok());
            let v = json!({
                "state": "cold",
                "object": object,
                "records": seg.record_count,
                "first_position": seg.base_position.0,
                "data_end": seg.data_end,
                "first_record_time": seg.record_times.map(|t| rfc3339(t.0)),
                "last_record_time": seg.record_times.map(|t| rfc3339(t.1)),
                "merkle_root": seg.merkle_root.map(|r| hex(&r)),
                "index": idx.as_ref().map(|i| json!({
                    "file": idx_path,
                    "records": i.record_count(),
                    "streams": i.stream_count(),
                    "complete": i.is_complete(),
                })),
            });
            if a.json {
                print_json(&v)?;
            } else {
                print_tree(&v, 0);
            }
            return Ok(ExitCode::SUCCESS);
        }
        let header = SegmentHeader::decode_page(&read_page(&seg.path, 0)?)
            .with_context(|| format!("segment header of {}", seg.path.display()))?;
        let footer = if seg.sealed {
            Some(
                SegmentFooter::decode_page(&read_page(&seg.path, header.footer_offset())?)
                    .with_context(|| format!("segment footer of {}", seg.path.display()))?,
            )
        } else {
            None
        };
        let idx_path = seg.path.with_extension("idx");
        let idx = std::fs::read(&idx_path)
            .ok()
            .and_then(|b| SealedIndex::open(Arc::new(b)).ok());
        let v = json!({
            "file": seg.path,
            "state": if seg.sealed { "sealed" } else { "active" },
            "header": {
                "seq": header.seq.0,
                "log_id": hex(&header.log_id),
                "base_position": header.base_position.0,
                "created_time": rfc3339(header.created_time),
                "capacity": header.capacity,
                "prev_chain_hash": hex(&header.prev_chain_hash),
            },
            "footer": footer.map(|f| json!({
                "record_count": f.record_count,
                "first_position": f.first_position.0,
                "last_position": f.last_position.0,
                "data_end": f.data_end,
                "first_record_time": rfc3339(f.first_record_time),
                "last_record_time": rfc3339(f.last_record_time),
                "last_chain_hash": hex(&f.last_chain_hash),
                "merkle_root": hex(&f.merkle_root),
            })),
            "index": idx.as_ref().map(|i| json!({
                "file": idx_path,
                "records": i.record_count(),
                "streams": i.stream_count(),
                "complete": i.is_complete(),
            })),
            "records": seg.record_count,
            "data_end": seg.data_end,
        });
        if a.json {
            print_json(&v)?;
        } else {
            print_tree(&v, 0);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    for s in &segs {
        let times = if s.cold.is_some() {
            s.record_times
        } else if s.sealed {
            let header = SegmentHeader::decode_page(&read_page(&s.path, 0)?)?;
            SegmentFooter::decode_page(&read_page(&s.path, header.footer_offset())?)
                .ok()
                .map(|f| (f.first_record_time, f.last_record_time))
        } else if s.record_count > 0 {
            let first = log.read_all(s.base_position, 1, tally_engine::Direction::Forward)?;
            let last_pos = Position(s.base_position.0 + s.record_count - 1);
            let last = log.read_all(last_pos, 1, tally_engine::Direction::Forward)?;
            first
                .first()
                .zip(last.first())
                .map(|(a, b)| (a.record_time, b.record_time))
        } else {
            None
        };
        records += s.record_count;
        bytes += s.data_end.saturating_sub(PAGE_BYTES);
        rows.push(json!({
            "seq": s.seq.0,
            "file": s.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "state": if s.cold.is_some() { "cold" } else if s.sealed { "sealed" } else { "active" },
            "object": s.cold,
            "first_position": s.base_position.0,
            "last_position": (s.record_count > 0).then(|| s.base_position.0 + s.record_count - 1),
            "records": s.record_count,
            "bytes": s.data_end.saturating_sub(PAGE_BYTES),
            "first_time": times.map(|t| rfc3339(t.0)),
            "last_time": times.map(|t| rfc3339(t.1)),
            "merkle_root": s.merkle_root.map(|r| hex(&r)),
        }));
    }
    let cps = log.checkpoints();
    let v = json!({
        "dir": a.dir,
        "log_id": hex(&log.log_id()),
        "segments": rows,
        "totals": {
            "segments": segs.len(),
            "records": records,
            "bytes": bytes,
            "checkpoints": cps.len(),
            "latest_checkpoint": cps.last().map(checkpoint_json),
        },
    });
    if a.json {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("log {}  ({})", hex(&log.log_id()), a.dir.display());
    println!(
        "{:>6}  {:<26}  {:<6}  {:>10}  {:>10}  {:>9}  {:>12}  {:<30}  {:<30}  merkle root",
        "seq", "file", "state", "first", "last", "records", "bytes", "first time", "last time"
    );
    for r in &rows {
        let s = |k: &str| match &r[k] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let root = s("merkle_root");
        println!(
            "{:>6}  {:<26}  {:<6}  {:>10}  {:>10}  {:>9}  {:>12}  {:<30}  {:<30}  {}",
            s("seq"),
            s("file"),
            s("state"),
            s("first_position"),
            s("last_position"),
            s("records"),
            s("bytes"),
            s("first_time"),
            s("last_time"),
            if root.len() > 16 { &root[..16] } else { &root },
        );
    }
    println!(
        "total: {} segments, {records} records, {bytes} bytes, {} checkpoints",
        segs.len(),
        cps.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_tree(v: &Value, indent: usize) {
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

// ---------------------------------------------------------------------------------------
// dump

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

/// `tally dump DIR`.
#[derive(Args, Debug)]
pub struct DumpArgs {
    /// The data directory.
    dir: PathBuf,
    /// First position.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Last position (inclusive).
    #[arg(long)]
    to: Option<u64>,
    /// Only this stream.
    #[arg(long)]
    stream: Option<String>,
    /// Only this event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EventFormat::Table)]
    format: EventFormat,
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
fn payload_json(e: &EnvelopeRef<'_>) -> (Value, &'static str) {
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

/// Positions `tally dump` reads between two releases of the segments' mapped pages
/// ([`Log::release_mapped_memory`]).
const DUMP_CHUNK_POSITIONS: u64 = 4096;

/// Prints records in order.
pub fn dump(a: &DumpArgs) -> Result<ExitCode> {
    let log = open_read_only(&a.dir)?;
    let end = log.next_position().0;
    let to = a.to.map_or(end, |t| t.saturating_add(1).min(end));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if a.format == EventFormat::Table {
        writeln!(
            out,
            "{:>10}  {:<24}  {:>7}  {:<24}  {:<30}  {:<12}  payload",
            "position", "stream", "version", "type", "record time", "actor"
        )?;
    }
    let mut error = None;
    let mut write_err = None;
    let bar = output_progress(Some(to.saturating_sub(a.from)), "dump");
    let mut at = a.from;
    // A range of positions at a time, letting go of the segment pages it mapped after each:
    // the resident memory of a dump of the whole log stays bounded.
    let scanned = (|| -> Result<()> {
        while at < to && error.is_none() && write_err.is_none() {
            let chunk_end = at.saturating_add(DUMP_CHUNK_POSITIONS).min(to);
            log.scan_range(
                Position(at),
                Position(chunk_end),
                tally_engine::Verify::Checksums,
                |r| {
                    if error.is_some() || write_err.is_some() {
                        return;
                    }
                    let e = match r.envelope() {
                        Ok(e) => e,
                        Err(err) => {
                            error = Some(format!("position {}: {err}", r.position));
                            return;
                        }
                    };
                    if a.stream.as_deref().is_some_and(|s| s != e.stream)
                        || a.event_type.as_deref().is_some_and(|t| t != e.event_type)
                    {
                        return;
                    }
                    let res = match a.format {
                        EventFormat::Jsonl => {
                            let v = event_json(
                                r.position.0,
                                r.stream_version,
                                r.record_time,
                                r.record_hash,
                                &e,
                            );
                            serde_json::to_writer(&mut out, &v)
                                .map_err(std::io::Error::from)
                                .and_then(|()| writeln!(out))
                        }
                        EventFormat::Table => {
                            // A blob's reference is shown whole (its hash names it);
                            // a payload, cut to 60 characters.
                            let payload = match (payload_json(&e), e.blob()) {
                                (_, Some(b)) => format!("blob {} ({} bytes)", b.hex(), b.size),
                                ((Value::String(s), _), None) => s.chars().take(60).collect(),
                                ((v, _), None) => v.to_string().chars().take(60).collect(),
                            };
                            writeln!(
                                out,
                                "{:>10}  {:<24}  {:>7}  {:<24}  {:<30}  {:<12}  {payload}",
                                r.position.0,
                                e.stream,
                                r.stream_version,
                                e.event_type,
                                rfc3339(r.record_time),
                                e.actor
                            )
                        }
                    };
                    if let Err(err) = res {
                        write_err = Some(err);
                    }
                },
            )?;
            bar.inc(chunk_end - at);
            log.release_mapped_memory()?;
            at = chunk_end;
        }
        Ok(())
    })();
    bar.finish_and_clear();
    scanned?;
    if let Some(e) = write_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(e.into());
    }
    out.flush()?;
    if let Some(e) = error {
        return Err(Finding(e).into());
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// verify

/// `tally verify DIR`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The data directory.
    dir: PathBuf,
    /// Public key file: checkpoints must be signed by one of its keys, and there must be at
    /// least one checkpoint when the log has records.
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Check from this segment on only (for incremental daily runs).
    #[arg(long)]
    from_segment: Option<u64>,
    /// A checkpoint you kept (`tally checkpoint DIR --export`, or a witness's
    /// `latest.note`): the log must extend it. Repeatable; needs --pubkey.
    #[arg(long, value_name = "FILE", requires = "pubkey")]
    trusted: Vec<PathBuf>,
    /// A witness's public key file (its vkey line, from `tally witness init`): its
    /// cosignatures count, and one of a checkpoint that is now missing or changed fails.
    /// Repeatable.
    #[arg(long, value_name = "FILE")]
    witness: Vec<PathBuf>,
    /// Fail unless a checkpoint is cosigned by at least this many of the --witness keys.
    #[arg(long, default_value_t = 0, requires = "witness")]
    min_witnesses: usize,
    /// A producer trust file (lines `key NAME HEX [PREFIX...]` and `require PREFIX [from
    /// POSITION]`): check every batch's producer signature against these keys, and that the
    /// batches of the required prefixes are signed.
    #[arg(long, value_name = "FILE")]
    producers: Option<PathBuf>,
    /// Segments checked at once, each on its own thread (default: one per core).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Also rebuild each sealed segment's attribute index (the `.adx` sidecar that
    /// `tally audit` and lookups by type, correlation, causation, actor and time use) from
    /// its records and compare them byte for byte. Reads the segments a second time.
    #[arg(long)]
    attribute_indexes: bool,
    /// Do not read the blobs that events refer to (payloads stored in the cold tier's
    /// store). By default each is read once and checked against its hash.
    #[arg(long)]
    skip_blobs: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Verifies a data directory.
pub fn verify(a: &VerifyArgs) -> Result<ExitCode> {
    let trusted = match &a.pubkey {
        Some(p) => read_pubkeys(p)?,
        None => Vec::new(),
    };
    let kept = read_kept(&a.trusted, &trusted)?;
    let witnesses = read_witness_keys(&a.witness)?;
    let producers = a
        .producers
        .as_ref()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading producer trust file {}", p.display()))?;
            tally_engine::producers::ProducerTrust::parse(&text)
                .with_context(|| format!("producer trust file {}", p.display()))
        })
        .transpose()?;
    let log = open_read_only(&a.dir)?;
    let total: u64 = log
        .segments()
        .iter()
        .filter(|s| a.from_segment.is_none_or(|n| s.seq.0 >= n))
        .map(|s| s.data_end.saturating_sub(PAGE_BYTES))
        .sum();
    let bar = (!a.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let started = std::time::Instant::now();
    let options = VerifyOptions {
        trusted_keys: trusted.clone(),
        from_segment: a.from_segment.map(tally_engine::SegmentSeq),
        threads: a.threads,
        attribute_indexes: a.attribute_indexes,
        kept,
        witnesses,
        min_witnesses: a.min_witnesses,
        producers,
        skip_blobs: a.skip_blobs,
    };
    let result = log.verify_with(&options, &mut |done| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let outcome = match result {
        Ok(report) => {
            let cps = log.checkpoints();
            if !trusted.is_empty() && report.records > 0 && report.checkpoints == 0 {
                Err(json!({
                    "what": "no checkpoint signed by a trusted key covers this log",
                    "file": a.dir.join(tally_engine::CHECKPOINTS_FILE),
                }))
            } else {
                Ok((report, cps))
            }
        }
        Err(Error::Corrupt {
            file,
            offset,
            position,
            detail,
            source,
        }) => Err(json!({
            "file": file,
            "offset": offset,
            "position": position,
            "what": detail,
            "cause": source.map(|s| s.to_string()),
        })),
        Err(Error::Index { file, source }) => Err(json!({
            "file": file,
            "what": "index sidecar is unusable",
            "cause": source.to_string(),
        })),
        // A blob that is missing or does not match its reference is a finding; a store
        // that cannot be reached is not (exit 2, as for any I/O failure).
        Err(Error::Blob {
            hash,
            object,
            detail,
            source,
        }) if source
            .as_ref()
            .is_none_or(|s| s.kind() == std::io::ErrorKind::NotFound) =>
        {
            Err(json!({
                "blob": hash,
                "object": object,
                "what": detail,
                "cause": source.map(|s| s.to_string()),
            }))
        }
        Err(e) => return Err(e).context("verifying"),
    };
    match outcome {
        Ok((report, cps)) => {
            let mut v = json!({
                "ok": true,
                "segments": report.segments,
                "records": report.records,
                "bytes": report.bytes,
                "first_position": report.first_position.0,
                "checkpoints": report.checkpoints,
                "newest_checkpoint_checked": report.newest_checkpoint.map(|(id, size)| json!({"id": id, "tree_size": size})),
                "latest_checkpoint": cps.last().map(checkpoint_json),
                "kept": report.kept.iter().map(|(id, size)| json!({"id": id, "tree_size": size})).collect::<Vec<_>>(),
                "witnesses": {
                    "cosignatures": report.cosignatures,
                    "min_witnesses": a.min_witnesses,
                    "newest_witnessed": report.newest_witnessed.map(|(id, size)| json!({"id": id, "tree_size": size})),
                },
                "format_version": report.format_version,
                "blobs": {"references": report.blob_refs, "checked": report.blobs_checked, "skipped": a.skip_blobs},
                "producers": a.producers.as_ref().map(|_| json!({"signed_batches": report.signed_batches, "unsigned_batches": report.unsigned_batches})),
                "proves": if report.format_version >= 2 { "inclusion, stream completeness, window completeness" } else { "inclusion only" },
                "derived": {
                    "stream_links": report.stream_links,
                    "stream_snapshot_checked": report.snapshot_checked,
                    "merkle_nodes": report.tree_nodes,
                    "sidecars_missing": report.sidecars_missing.iter().map(|s| s.0).collect::<Vec<_>>(),
                },
                "last_chain_hash": hex(&report.last_chain_hash),
                "seconds": elapsed.as_secs_f64(),
                "signatures": if trusted.is_empty() { "checked against the keys stored with them" } else { "checked against --pubkey" },
            });
            if a.attribute_indexes {
                v["attribute_indexes"] = json!(report.attribute_indexes);
            }
            if a.json {
                print_json(&v)?;
            } else {
                if a.attribute_indexes {
                    println!(
                        "attribute indexes: {} sidecars match their segments' records",
                        report.attribute_indexes
                    );
                }
                println!(
                    "ok: {} segments, {} records, {} bytes from position {}, {} checkpoints verified ({}), in {:.2} s",
                    report.segments,
                    report.records,
                    report.bytes,
                    report.first_position.0,
                    report.checkpoints,
                    if trusted.is_empty() {
                        "signatures checked against their own keys; pass --pubkey to pin the key"
                    } else {
                        "signed by a trusted key"
                    },
                    elapsed.as_secs_f64()
                );
                match report.newest_checkpoint {
                    Some((id, size)) => {
                        println!("newest checkpoint checked: {id} (tree size {size})")
                    }
                    None => println!("no checkpoint checked"),
                }
                if report.blob_refs > 0 {
                    if a.skip_blobs {
                        println!(
                            "blobs: {} references, not read (--skip-blobs)",
                            report.blob_refs
                        );
                    } else {
                        println!(
                            "blobs: {} references, {} distinct blobs read from the store and matched",
                            report.blob_refs, report.blobs_checked
                        );
                    }
                }
                if a.producers.is_some() {
                    println!(
                        "producer signatures: {} signed batches verified, {} unsigned batches where the policy allows them",
                        report.signed_batches, report.unsigned_batches
                    );
                }
                for (id, size) in &report.kept {
                    println!("the log extends kept checkpoint {id} (tree size {size})");
                }
                if !a.witness.is_empty() {
                    match report.newest_witnessed {
                        Some((id, size)) => println!(
                            "newest checkpoint cosigned by {} of the witnesses: {id} (tree size {size}); {} cosignatures checked",
                            a.min_witnesses.max(1),
                            report.cosignatures
                        ),
                        None => println!("no checkpoint is cosigned by the given witnesses"),
                    }
                }
                println!(
                    "derived data checked against the records: {} index links, {} Merkle nodes, stream snapshot {}",
                    report.stream_links,
                    report.tree_nodes,
                    if report.snapshot_checked {
                        "checked"
                    } else {
                        "not checked (none, or newer than this view of a live log)"
                    }
                );
                if !report.sidecars_missing.is_empty() {
                    println!(
                        "note: {} sealed segment(s) have no index sidecar ({}); checked from their records, and the next writable open rebuilds them",
                        report.sidecars_missing.len(),
                        report
                            .sidecars_missing
                            .iter()
                            .map(|s| s.0.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if report.format_version < 2 {
                    println!(
                        "format version 1: its checkpoints commit to no stream heads, so this log's checkpoints and extracts prove inclusion only (not that a stream or a time window is complete)"
                    );
                }
                println!("chain head {}", hex(&report.last_chain_hash));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => {
            if a.json {
                print_json(&json!({"ok": false, "failure": failure}))?;
            } else {
                let f = &failure;
                println!(
                    "FAILED: {}",
                    f["what"].as_str().unwrap_or("verification failed")
                );
                if let Some(file) = f["file"].as_str() {
                    println!("  file      {file}");
                }
                if let Some(b) = f["blob"].as_str() {
                    println!("  blob      {b}");
                }
                if let Some(o) = f["object"].as_str() {
                    println!("  object    {o}");
                }
                if let Some(o) = f["offset"].as_u64() {
                    println!("  offset    {o}");
                }
                if let Some(p) = f["position"].as_u64() {
                    println!("  position  {p}");
                }
                if let Some(c) = f["cause"].as_str() {
                    println!("  cause     {c}");
                }
            }
            Ok(ExitCode::from(1))
        }
    }
}

// ---------------------------------------------------------------------------------------
// checkpoint, prove

/// `tally checkpoint DIR`.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The data directory.
    dir: PathBuf,
    /// List the checkpoints instead of writing one.
    #[arg(long)]
    list: bool,
    /// Print the latest checkpoint (or --id N) as a signed note to keep outside the
    /// directory (with the witnesses' cosignatures), instead of writing one. `tally verify
    /// --trusted FILE` later checks that the log still extends it.
    #[arg(long, conflicts_with = "list")]
    export: bool,
    /// With --export: the checkpoint to print.
    #[arg(long, requires = "export")]
    id: Option<u64>,
    #[command(flatten)]
    key: KeyArg,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Forces and prints a signed checkpoint, or lists them.
pub fn checkpoint(a: &CheckpointArgs) -> Result<ExitCode> {
    if a.export {
        let log = open_read_only(&a.dir)?;
        let Some(note) = log.checkpoint_note(a.id)? else {
            bail!(
                "{} has no checkpoint {}",
                a.dir.display(),
                a.id.map_or_else(|| "yet".to_owned(), |i| i.to_string())
            );
        };
        print!("{}", note.encode());
        return Ok(ExitCode::SUCCESS);
    }
    if a.list {
        let log = open_read_only(&a.dir)?;
        let cps: Vec<Value> = log.checkpoints().iter().map(checkpoint_json).collect();
        if a.json {
            print_json(&Value::Array(cps))?;
        } else {
            println!(
                "{:>6}  {:>12}  {:<30}  {:<16}  root",
                "id", "tree size", "time", "key"
            );
            for c in &cps {
                println!(
                    "{:>6}  {:>12}  {:<30}  {:<16}  {}",
                    c["id"],
                    c["tree_size"],
                    c["time_utc"].as_str().unwrap_or(""),
                    c["key_fingerprint"].as_str().unwrap_or(""),
                    c["root"].as_str().unwrap_or("")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (log, writable) = open_writable_if_free(&a.dir, &a.key)?;
    if !writable {
        bail!(
            "{} is open by another process (a running tallyd?): it writes checkpoints itself; use `tally checkpoint --list` to see them",
            a.dir.display()
        );
    }
    let cp = log.checkpoint()?;
    log.close()?;
    let v = checkpoint_json(&cp);
    if a.json {
        print_json(&v)?;
    } else {
        print_tree(&v, 0);
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally prove DIR`.
#[derive(Args, Debug)]
pub struct ProveArgs {
    /// The data directory.
    dir: PathBuf,
    /// Prove that the record at this position is in the log.
    #[arg(long, conflicts_with = "consistency")]
    position: Option<u64>,
    /// The checkpoint to prove against (default: the latest).
    #[arg(long)]
    checkpoint: Option<u64>,
    /// Prove that the tree of OLD_SIZE records is a prefix of the tree of NEW_SIZE.
    #[arg(long, num_args = 2, value_names = ["OLD_SIZE", "NEW_SIZE"])]
    consistency: Option<Vec<u64>>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Prints an inclusion or consistency proof.
pub fn prove(a: &ProveArgs) -> Result<ExitCode> {
    let log = open_read_only(&a.dir)?;
    let v = if let Some(sizes) = &a.consistency {
        let (old, new) = (sizes[0], sizes[1]);
        let p = log.prove_consistency(old, new)?;
        let (old_root, new_root) = (log.merkle_root(old)?, log.merkle_root(new)?);
        p.verify(&old_root, &new_root)
            .map_err(|e| Finding(format!("the proof does not verify: {e}")))?;
        json!({
            "kind": "consistency",
            "old_size": old,
            "new_size": new,
            "old_root": hex(&old_root),
            "new_root": hex(&new_root),
            "path": p.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        })
    } else {
        let position = a
            .position
            .context("give --position P or --consistency OLD_SIZE NEW_SIZE")?;
        let cps = log.checkpoints();
        let cp = match a.checkpoint {
            Some(id) => cps
                .iter()
                .find(|c| c.statement.id == id)
                .with_context(|| format!("no checkpoint {id}"))?,
            None => cps.last().context(
                "the log has no checkpoint yet: run `tally checkpoint DIR` (or wait for the server's)",
            )?,
        };
        let size = cp.statement.tree_size;
        if position >= size {
            bail!(
                "position {position} is not covered by checkpoint {} (size {size})",
                cp.statement.id
            );
        }
        let p = log.prove_inclusion(Position(position), size)?;
        let raw = log.read_raw(Position(position))?;
        let hash = tally_engine::format::record::RecordHeader::decode_in(&raw.header, raw.layout)?
            .chain_hash;
        p.verify(&hash, &cp.statement.root)
            .map_err(|e| Finding(format!("the proof does not verify: {e}")))?;
        json!({
            "kind": "inclusion",
            "position": position,
            "tree_size": size,
            "record_hash": hex(&hash),
            "root": hex(&cp.statement.root),
            "checkpoint": checkpoint_json(cp),
            "path": p.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        })
    };
    if a.json {
        print_json(&v)?;
    } else {
        print_tree(&v, 0);
        if let Some(path) = v["path"].as_array() {
            for (i, h) in path.iter().enumerate() {
                println!("  path[{i}] {}", h.as_str().unwrap_or(""));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
