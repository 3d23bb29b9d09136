//! Audit extracts (`tally extract`, `tally verify-extract`) and backups (`tally backup`).
//!
//! An extract is one JSON document (docs/EXTRACT.md): the selected events, each with its
//! stored record bytes, the record hash before it and an inclusion proof, all against one
//! signed checkpoint carried in the extract. `verify-extract` needs only the extract and a
//! trusted public key: it recomputes every record hash from the bytes, checks every proof
//! against the signed root, and checks that every readable field says what the signed bytes
//! say.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Args;
use serde_json::{Value, json};
use tally_engine::format::chain::chain_step;
use tally_engine::format::checkpoint::{SignedCheckpoint, fingerprint};
use tally_engine::format::proof::{InclusionProof, hex, parse_hex};
use tally_engine::format::record::{Layout, RecordHeader};
use tally_engine::{Direction, Field, Log, Position, Query};

use crate::support::{
    Finding, KeyArg, checkpoint_json, event_json, json_output, open_writable_if_free, parse_time,
    read_pubkeys, rfc3339,
};

/// The extract format's name and version written now (docs/EXTRACT.md).
pub const EXTRACT_FORMAT: &str = "tally-audit-extract/2";
/// The first version of the format, still verified (it proves inclusion only).
pub const EXTRACT_FORMAT_V1: &str = "tally-audit-extract/1";

/// `tally extract DIR`.
#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The data directory.
    pub(crate) dir: PathBuf,
    /// Every event of this stream.
    #[arg(long, group = "select")]
    pub(crate) stream: Option<String>,
    /// Every event with this correlation id, across streams.
    #[arg(long, group = "select")]
    pub(crate) correlation: Option<String>,
    /// Events recorded at or after this time (RFC 3339 UTC or nanoseconds).
    #[arg(long, requires = "to_time", group = "select")]
    pub(crate) from_time: Option<String>,
    /// Events recorded before this time.
    #[arg(long, requires = "from_time")]
    pub(crate) to_time: Option<String>,
    /// The extract file to write.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Extract format: 3 (compact, streamed; docs/EXTRACT.md section 6) or 2 (one JSON
    /// document with a proof per event, for verifiers that read only format 2).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=3))]
    pub(crate) format: u8,
    /// Format 3: write the JSON-lines form instead of the binary one.
    #[arg(long)]
    pub(crate) lines: bool,
    /// Copy every blob an extracted event refers to (a payload stored in the log's cold
    /// store) into this directory, named by its BLAKE3 hash and checked against it first.
    /// Without it, the extract holds each blob's hash and size only (in the event's
    /// envelope, which the proofs cover).
    #[arg(long, value_name = "DIR")]
    pub(crate) blobs: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) key: KeyArg,
}

/// Writes `blob` into `dir` under its hash, read from the log and checked, unless it is there
/// already. Returns whether it wrote it.
pub(crate) fn copy_blob(
    log: &tally_engine::Log,
    blob: &tally_engine::format::blob::BlobRef,
    dir: &std::path::Path,
) -> Result<bool> {
    let path = dir.join(blob.hex());
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == blob.size)
        && std::fs::read(&path).is_ok_and(|b| blob.matches(&b))
    {
        return Ok(false);
    }
    let bytes = log.read_blob(blob)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!("{}.tmp", blob.hex()));
    std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Checks the file named by `blob`'s hash in `dir` against it.
pub(crate) fn check_blob_file(
    blob: &tally_engine::format::blob::BlobRef,
    dir: &std::path::Path,
) -> std::result::Result<(), String> {
    let path = dir.join(blob.hex());
    match std::fs::read(&path) {
        Ok(b) if blob.matches(&b) => Ok(()),
        Ok(b) => Err(format!(
            "blob {} ({} bytes): {} holds {} bytes that do not match its hash",
            blob.hex(),
            blob.size,
            path.display(),
            b.len()
        )),
        Err(e) => Err(format!(
            "blob {} ({} bytes): {}: {e}",
            blob.hex(),
            blob.size,
            path.display()
        )),
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The fields both extract formats open with, in this order: the format, the provenance
/// (query, time, tool, directory, whether events after the checkpoint were left out), the
/// log's id, the signer's key and fingerprint, the checkpoint and its signed note.
pub(crate) fn extract_head(
    format: &str,
    a: &ExtractArgs,
    log: &tally_engine::Log,
    writable: bool,
    cp: &SignedCheckpoint,
    query: Value,
) -> Result<serde_json::Map<String, Value>> {
    let note = log
        .checkpoint_note(Some(cp.statement.id))?
        .map(|n| n.encode());
    let Value::Object(head) = json!({
        "format": format,
        "provenance": {
            "query": query,
            "created": rfc3339(tally_engine::now()),
            "tool": format!("tally {}", env!("CARGO_PKG_VERSION")),
            "data_dir": a.dir,
            "events_after_checkpoint_left_out": !writable,
        },
        "log_id": hex(&log.log_id()),
        "public_key": hex(&cp.public_key),
        "key_fingerprint": fingerprint(&cp.public_key),
        "checkpoint": checkpoint_json(cp),
        "checkpoint_note": note,
    }) else {
        unreachable!("a JSON object literal")
    };
    Ok(head)
}

/// Writes an audit extract of format 3 (`crate::extract`), or with `--format 2` one of the
/// format before it.
/// What an extract selects (as its JSON query), the log opened for it (writable when no
/// other process holds it), and the one checkpoint that covers every selected event: a
/// fresh one when the log is free, else the latest the running writer wrote. Both extract
/// formats start here.
pub(crate) fn open_for_extract(
    a: &ExtractArgs,
) -> Result<(
    Value,
    Log,
    bool,
    tally_engine::format::checkpoint::SignedCheckpoint,
)> {
    let query = if let Some(s) = &a.stream {
        json!({"stream": s})
    } else if let Some(c) = &a.correlation {
        json!({"correlation_id": c})
    } else if let (Some(f), Some(t)) = (&a.from_time, &a.to_time) {
        json!({"from_time": rfc3339(parse_time(f)?), "to_time": rfc3339(parse_time(t)?)})
    } else {
        bail!("select events with --stream, --correlation or --from-time/--to-time");
    };
    let (log, writable) = open_writable_if_free(&a.dir, &a.key)?;
    let cp = if writable {
        log.checkpoint()?
    } else {
        *log.checkpoints().last().context(
            "the log is open by another process and has no checkpoint yet; try again after its next checkpoint",
        )?
    };
    Ok((query, log, writable, cp))
}

pub fn extract(a: &ExtractArgs) -> Result<ExitCode> {
    if a.format == 3 {
        return crate::extract::write(a);
    }
    if a.blobs.is_some() {
        bail!("--blobs needs format 3 (the default)");
    }
    let (query, log, writable, cp) = open_for_extract(a)?;
    let size = cp.statement.tree_size;
    let v2 = cp.statement.streams.is_some();
    let (positions, completeness) = select(&log, a, size, v2)?;
    let mut events = Vec::with_capacity(positions.len());
    for p in &positions {
        let (obj, header, body) = record_object(&log, *p, size)?;
        let (env, removed_by) = tally_engine::format::pruned::content(&header, &body)?;
        let mut v = event_json(
            p.0,
            header.stream_version,
            header.record_time,
            &header.chain_hash,
            &env,
        );
        if let Some(by) = removed_by {
            v["removed_by"] = by.0.into();
        }
        v["record"] = obj["record"].clone();
        v["proof"] = obj["proof"].clone();
        events.push(v);
    }
    let mut doc = extract_head(EXTRACT_FORMAT, a, &log, writable, &cp, query)?;
    doc.insert("completeness".into(), completeness);
    doc.insert("events".into(), json!(events));
    let doc = Value::Object(doc);
    if writable {
        log.close()?;
    }
    let tmp = a.out.with_extension("tmp");
    let mut f =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    serde_json::to_writer_pretty(&mut f, &doc)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} events to {} against checkpoint {} (tree size {size}, key {})",
        positions.len(),
        a.out.display(),
        cp.statement.id,
        fingerprint(&cp.public_key)
    );
    Ok(ExitCode::SUCCESS)
}

/// A record with what an extract carries to prove it (`position`, `record`: header, body and
/// previous record hash; `proof`: its inclusion proof in the tree of `size`), with its
/// decoded header and body.
fn record_object(log: &Log, p: Position, size: u64) -> Result<(Value, RecordHeader, Vec<u8>)> {
    let raw = log.read_raw(p)?;
    let header = RecordHeader::decode_in(&raw.header, raw.layout)?;
    let proof = log.prove_inclusion(p, size)?;
    let v = json!({
        "position": p.0,
        "record": {
            "header": hex(&raw.header),
            "body": b64().encode(&raw.body),
            "prev_record_hash": hex(&raw.prev_hash),
        },
        "proof": {
            "tree_size": proof.tree_size,
            "path": proof.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        },
    });
    Ok((v, header, raw.body))
}

/// The record time of position `p`.
fn record_time_at(log: &Log, p: u64) -> Result<tally_engine::Timestamp> {
    log.read_all(Position(p), 1, Direction::Forward)?
        .first()
        .map(|e| e.record_time)
        .with_context(|| format!("no record at position {p}"))
}

/// Positions of the selected events below `size`, in log order, and the extract's
/// `completeness`: what the checkpoint lets a verifier check about the selection.
fn select(log: &Log, a: &ExtractArgs, size: u64, v2: bool) -> Result<(Vec<Position>, Value)> {
    if let Some(stream) = &a.stream {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let batch = log.read_stream(stream, from, 1000, Direction::Forward)?;
            let Some(last) = batch.last() else { break };
            from = last.version + 1;
            out.extend(batch.iter().map(|e| e.position).filter(|p| p.0 < size));
        }
        if out.is_empty() {
            bail!("stream {stream:?} has no events covered by the checkpoint");
        }
        if !v2 {
            return Ok((out, inclusion_only(V1_WHY)));
        }
        // The stream's head in the checkpoint's tree, proven against its signed map: the
        // extract must end there.
        let head = log
            .prove_stream_head(stream, size)?
            .context("the stream is not in the checkpoint's stream heads map")?;
        if out.last() != Some(&head.position) || out.len() as u64 != head.version + 1 {
            bail!(
                "the stream's index gives {} events ending at position {:?}, but its head in the checkpoint is version {} at position {}: run tally verify",
                out.len(),
                out.last().map(|p| p.0),
                head.version,
                head.position
            );
        }
        let completeness = json!({
            "kind": "stream",
            "stream": stream,
            "head": {
                "version": head.version,
                "position": head.position.0,
                "proof": head.proof.siblings.iter().map(|h| hex(h)).collect::<Vec<_>>(),
            },
            "stream_count": head.stream_count,
            "streams_root": hex(&head.streams_root),
        });
        return Ok((out, completeness));
    }
    if let (true, Some(f), Some(t)) = (v2, &a.from_time, &a.to_time) {
        // Record time never decreases in a version 2 log: the window is the positions from
        // the first record at or after `from` to the first at or after `to`, found by binary
        // search over the records themselves (no index).
        let (from, to) = (parse_time(f)?, parse_time(t)?);
        let first_at_or_after = |t: tally_engine::Timestamp| -> Result<u64> {
            let (mut lo, mut hi) = (0u64, size);
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if record_time_at(log, mid)? < t {
                    lo = mid + 1;
                } else {
                    hi = mid;
                }
            }
            Ok(lo)
        };
        let a_pos = first_at_or_after(from)?;
        let b_pos = first_at_or_after(to)?.max(a_pos);
        if a_pos == b_pos {
            bail!(
                "no events were recorded in the window among the {size} records the checkpoint covers"
            );
        }
        let edge = |p: Option<u64>| -> Result<Value> {
            match p {
                Some(p) => Ok(record_object(log, Position(p), size)?.0),
                None => Ok(Value::Null),
            }
        };
        let completeness = json!({
            "kind": "window",
            "from_time": rfc3339(from),
            "to_time": rfc3339(to),
            "first_position": a_pos,
            "end_position": b_pos,
            "before": edge(a_pos.checked_sub(1))?,
            "after": edge((b_pos < size).then_some(b_pos))?,
        });
        return Ok(((a_pos..b_pos).map(Position).collect(), completeness));
    }
    // Through the attribute indexes: the correlation's events, or (version 1) the records
    // of the record-time window.
    let mut query = Query::all().positions(Position(0)..Position(size));
    let why = match (&a.correlation, &a.from_time, &a.to_time) {
        (Some(c), _, _) => {
            query.field = Some((Field::Correlation, c.as_str()));
            "which events share a correlation id is not committed to by the checkpoint (each event's own correlation id is): the events were selected through the attribute index (derived data; tally verify --attribute-indexes checks it), and the extract proves only that each of them is in the signed log"
        }
        (None, Some(f), Some(t)) => {
            query = query.recorded(parse_time(f)?..parse_time(t)?);
            V1_WHY
        }
        _ => bail!("select events with --stream, --correlation or --from-time/--to-time"),
    };
    let out: Vec<Position> = log.find(&query)?.iter().map(|e| e.position).collect();
    if out.is_empty() {
        bail!("no events match the selection among the {size} records the checkpoint covers");
    }
    Ok((out, inclusion_only(why)))
}

/// Why a version 1 log's extract proves inclusion only.
pub const V1_WHY: &str = "format version 1 log: its checkpoints commit to no stream heads and its record times may decrease, so the extract proves only that each event is in the signed log";

fn inclusion_only(why: &str) -> Value {
    json!({"kind": "inclusion", "why": why})
}

/// `tally verify-extract FILE`.
#[derive(Args, Debug)]
pub struct VerifyExtractArgs {
    /// The extract.
    file: PathBuf,
    /// Public key file of the log's signing key (one or more keys).
    #[arg(long)]
    pubkey: PathBuf,
    /// A witness's public key file (vkey): its cosignature of the extract's checkpoint
    /// counts. Repeatable.
    #[arg(long, value_name = "FILE")]
    witness: Vec<PathBuf>,
    /// Fail unless the checkpoint is cosigned by at least this many --witness keys.
    #[arg(long, default_value_t = 0, requires = "witness")]
    min_witnesses: usize,
    /// Fail (exit 1) unless the extract proves completeness (of a stream or a time window),
    /// not only inclusion: the `format` and `completeness` fields are not signed, so an
    /// extract can be presented as inclusion-only without failing otherwise.
    #[arg(long)]
    require_complete: bool,
    /// Format 3: write each verified event, readable, as a JSON line to this file (`-` for
    /// standard output, which then carries no summary).
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Format 3: mebibytes of records read ahead at most while verifying.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    buffer_mb: u64,
    /// Format 3: worker threads (default: one per core, at most 8).
    #[arg(long)]
    threads: Option<usize>,
    /// Format 3: check every blob an event refers to against the file named by its hash in
    /// this directory (written by `tally extract --blobs DIR`); a missing or different one is
    /// a finding. Without it, blobs are not checked (their hashes are, as part of the
    /// events).
    #[arg(long, value_name = "DIR")]
    blobs: Option<PathBuf>,
}

fn field<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a Value, Finding> {
    v.get(key)
        .ok_or_else(|| Finding(format!("{path}: missing field {key:?}")))
}

fn str_field<'a>(v: &'a Value, path: &str, key: &str) -> Result<&'a str, Finding> {
    field(v, path, key)?
        .as_str()
        .ok_or_else(|| Finding(format!("{path}.{key}: not a string")))
}

fn hex32(v: &Value, path: &str, key: &str) -> Result<[u8; 32], Finding> {
    parse_hex::<32>(str_field(v, path, key)?)
        .ok_or_else(|| Finding(format!("{path}.{key}: not 64 hex digits")))
}

/// Checks what every format's top level holds: the signed checkpoint (entry, signature
/// under a trusted key, readable copies), the signer's key and fingerprint and the log id.
/// Returns the checkpoint and the record layout its statement version implies.
pub fn check_head(
    doc: &Value,
    trusted: &[[u8; 32]],
) -> Result<(SignedCheckpoint, Layout), Finding> {
    let cpv = field(doc, "extract", "checkpoint")?;
    let entry = str_field(cpv, "checkpoint", "entry")?;
    let bytes = tally_engine::format::proof::parse_hex_vec(entry)
        .ok_or_else(|| Finding("checkpoint.entry: not hex".into()))?;
    let cp = SignedCheckpoint::decode_entry(&bytes)
        .map_err(|e| Finding(format!("checkpoint.entry: {e}")))?;
    if bytes.len() != tally_engine::format::checkpoint::entry_len(cp.statement.version()) {
        return Err(Finding(format!(
            "checkpoint.entry: {} bytes, not a version {} entry",
            bytes.len(),
            cp.statement.version()
        )));
    }
    cp.verify(trusted)
        .map_err(|e| Finding(format!("checkpoint {}: {e}", cp.statement.id)))?;
    // The readable copies must say what the signed bytes say.
    if *cpv != checkpoint_json(&cp) {
        return Err(Finding(
            "checkpoint: the readable fields differ from the signed entry".into(),
        ));
    }
    let s = cp.statement;
    if hex32(doc, "extract", "public_key")? != cp.public_key
        || str_field(doc, "extract", "key_fingerprint")? != fingerprint(&cp.public_key)
    {
        return Err(Finding(
            "public_key: differs from the checkpoint's signer".into(),
        ));
    }
    if str_field(doc, "extract", "log_id")? != hex(&s.log_id) {
        return Err(Finding("log_id: differs from the signed checkpoint".into()));
    }
    // A version 2 statement signs a log of format version 2, 3, 4 or 5, whose records share
    // one layout; version 3's envelopes may hold a blob reference, version 4's records may
    // be pruned, and version 5's envelopes may seal personal data, which older writers never
    // write. The records are authenticated by the proofs either way, so they are read by
    // version 5's rules.
    let layout = match s.version() {
        2 => Layout::V5,
        v => Layout::of_version(v)
            .ok_or_else(|| Finding(format!("checkpoint of statement version {v}")))?,
    };
    Ok((cp, layout))
}

/// Checks an extract of format 1 or 2; `Err(Finding)` names the first problem.
pub fn check_extract(doc: &Value, trusted: &[[u8; 32]]) -> Result<Checked, Finding> {
    let format = doc.get("format").and_then(Value::as_str);
    if format != Some(EXTRACT_FORMAT) && format != Some(EXTRACT_FORMAT_V1) {
        return Err(Finding(format!(
            "not a {} (or {EXTRACT_FORMAT}, {EXTRACT_FORMAT_V1}) document",
            crate::extract::EXTRACT_FORMAT_V3
        )));
    }
    let (cp, layout) = check_head(doc, trusted)?;
    let s = cp.statement;
    let events = field(doc, "extract", "events")?
        .as_array()
        .ok_or_else(|| Finding("events: not an array".into()))?;
    let mut checked = Vec::with_capacity(events.len());
    let mut removed = 0;
    for (i, ev) in events.iter().enumerate() {
        let path = format!("events[{i}]");
        let r = check_record(ev, &path, &s, layout)?;
        let at = format!("{path} (position {})", r.header.position);
        let (env, removed_by) = tally_engine::format::pruned::content(&r.header, &r.body)
            .map_err(|e| Finding(format!("{at}: {e}")))?;
        removed += usize::from(removed_by.is_some());
        let mut expected = event_json(
            r.header.position.0,
            r.header.stream_version,
            r.header.record_time,
            &r.header.chain_hash,
            &env,
        );
        if let Some(by) = removed_by {
            expected["removed_by"] = by.0.into();
        }
        expected["record"] = field(ev, &path, "record")?.clone();
        expected["proof"] = field(ev, &path, "proof")?.clone();
        if *ev != expected {
            let differing = expected
                .as_object()
                .into_iter()
                .flatten()
                .find(|(k, v)| ev.get(k.as_str()) != Some(v))
                .map(|(k, v)| (k.clone(), v.clone()));
            let (k, v) = differing.unwrap_or_else(|| ("(extra field)".into(), Value::Null));
            return Err(Finding(format!(
                "{at}: field {k} is {} in the extract but {v} in the signed record",
                ev.get(&k).map_or("missing".into(), Value::to_string)
            )));
        }
        let stream = env.stream.to_owned();
        checked.push((r, stream));
    }
    let kind = if doc.get("format").and_then(Value::as_str) == Some(EXTRACT_FORMAT_V1) {
        Completeness::Inclusion("an extract of format tally-audit-extract/1".into())
    } else {
        check_completeness(doc, &s, layout, &checked)?
    };
    Ok(Checked {
        checkpoint: cp,
        events: events.len(),
        removed,
        personal: Personal::default(),
        kind,
        note: doc
            .get("checkpoint_note")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// What an extract was found to prove.
#[derive(Debug)]
pub enum Completeness {
    /// Every event of the stream up to the checkpoint.
    Stream(String),
    /// Every event recorded in the window (RFC 3339 times), at positions `a..b`.
    Window(String, String, u64, u64),
    /// Only that each event is in the signed log; why no more.
    Inclusion(String),
}

/// A verified extract.
#[derive(Debug)]
pub struct Checked {
    /// The checkpoint every proof is against.
    pub checkpoint: SignedCheckpoint,
    /// Events in it.
    pub events: usize,
    /// What it proves.
    pub kind: Completeness,
    /// The checkpoint as a signed note, with the witnesses' cosignatures (format 2).
    pub note: Option<String>,
    /// Events retention removed: carried as their pruned records (hash and place, no
    /// content), each naming the run that removed it.
    pub removed: usize,
    /// Personal data in the extract: events that seal some, their subjects, and the
    /// erasures the extract itself proves.
    pub personal: Personal,
}

/// The personal data an extract carries sealed (FORMAT.md 6.6): only ciphertext, which
/// nobody reads without the subject's key, and nobody once an erasure destroyed it.
#[derive(Debug, Default, serde::Serialize)]
pub struct Personal {
    /// Events with sealed fields or a sealed payload.
    pub sealed_events: u64,
    /// Their subjects (id hashes), each with the fields sealed in its events.
    pub subjects: std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    /// `$SubjectErased` events the extract proves: subject, key generation, position.
    pub erasures: Vec<(String, u32, u64)>,
    /// The newest key generation each subject's events are sealed under.
    #[serde(skip)]
    pub generations: std::collections::BTreeMap<String, u32>,
}

impl Personal {
    /// The erasure in the extract that covers every sealed event of `subject` (one of a
    /// generation at least that of its newest sealed event).
    #[must_use]
    pub fn erasure_of(&self, subject: &str) -> Option<&(String, u32, u64)> {
        let newest = self.generations.get(subject).copied().unwrap_or(0);
        self.erasures
            .iter()
            .find(|(s, g, _)| s == subject && *g >= newest)
    }

    /// Subjects of sealed events an erasure in the extract covers.
    #[must_use]
    pub fn erased_subjects(&self) -> usize {
        self.subjects
            .keys()
            .filter(|s| self.erasure_of(s).is_some())
            .count()
    }
}

/// A record of an extract whose bytes, record hash and inclusion proof were checked.
#[derive(Debug)]
pub struct CheckedRecord {
    header: RecordHeader,
    body: Vec<u8>,
}

/// Checks one record object (`record` and `proof` fields of `v`): its header (in the
/// checkpoint's layout), body, record hash and inclusion proof against the statement.
fn check_record(
    v: &Value,
    path: &str,
    s: &tally_engine::format::checkpoint::Statement,
    layout: Layout,
) -> Result<CheckedRecord, Finding> {
    let rec = field(v, path, "record")?;
    let header_bytes = tally_engine::format::proof::parse_hex_vec(str_field(rec, path, "header")?)
        .filter(|b| b.len() == layout.header_len())
        .ok_or_else(|| {
            Finding(format!(
                "{path}.record.header: not {} bytes in hex (format version {})",
                layout.header_len(),
                layout.version()
            ))
        })?;
    let header = RecordHeader::decode_in(&header_bytes, layout)
        .map_err(|e| Finding(format!("{path}.record.header: {e}")))?;
    let position = header.position.0;
    let at = format!("{path} (position {position})");
    let body = b64()
        .decode(str_field(rec, path, "body")?)
        .map_err(|e| Finding(format!("{at}.record.body: {e}")))?;
    if body.len() != header.body_len as usize || crc32fast::hash(&body) != header.body_crc {
        return Err(Finding(format!(
            "{at}: the body does not match its header (length or checksum)"
        )));
    }
    let prev = hex32(rec, &at, "prev_record_hash")?;
    let linked = tally_engine::format::pruned::linked_body_hash(&header, &body)
        .map_err(|e| Finding(format!("{at}: pruned body: {e}")))?;
    let hash = chain_step(&prev, &header_bytes, &linked);
    if hash != header.chain_hash {
        return Err(Finding(format!(
            "{at}: the record hash computed from its bytes is {}, the header says {}",
            hex(&hash),
            hex(&header.chain_hash)
        )));
    }
    let pv = field(v, &at, "proof")?;
    let tree_size = field(pv, &at, "tree_size")?.as_u64();
    if tree_size != Some(s.tree_size) {
        return Err(Finding(format!(
            "{at}: the proof is for a tree of {tree_size:?} records, the checkpoint has {}",
            s.tree_size
        )));
    }
    let proof_path = hash_list(field(pv, &at, "path")?, &format!("{at}.proof.path"))?;
    InclusionProof {
        index: position,
        tree_size: s.tree_size,
        path: proof_path,
    }
    .verify(&hash, &s.root)
    .map_err(|e| {
        Finding(format!(
            "{at}: inclusion proof against checkpoint {}: {e}",
            s.id
        ))
    })?;
    Ok(CheckedRecord { header, body })
}

/// A JSON array of at most 256 64-hex-digit hashes (no proof has more).
pub(crate) fn hash_list(v: &Value, path: &str) -> Result<Vec<[u8; 32]>, Finding> {
    let items = v
        .as_array()
        .ok_or_else(|| Finding(format!("{path}: not an array")))?;
    if items.len() > 256 {
        return Err(Finding(format!(
            "{path}: {} hashes, more than any proof has",
            items.len()
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(j, h)| {
            h.as_str()
                .and_then(parse_hex::<32>)
                .ok_or_else(|| Finding(format!("{path}[{j}]: not 64 hex digits")))
        })
        .collect()
}

/// Checks the `completeness` of a format 2 extract against its (already checked) events.
fn check_completeness(
    doc: &Value,
    s: &tally_engine::format::checkpoint::Statement,
    layout: Layout,
    events: &[(CheckedRecord, String)],
) -> Result<Completeness, Finding> {
    let c = field(doc, "extract", "completeness")?;
    match str_field(c, "completeness", "kind")? {
        "inclusion" => Ok(Completeness::Inclusion(
            str_field(c, "completeness", "why")?.to_owned(),
        )),
        "stream" => {
            let stream = str_field(c, "completeness", "stream")?;
            let Some((_, streams_root)) = s.streams else {
                return Err(Finding(
                    "completeness: a stream proof needs a version 2 checkpoint".into(),
                ));
            };
            let mut prev_position = tally_engine::format::record::NO_STREAM_PREV;
            for (i, (r, ev_stream)) in events.iter().enumerate() {
                let h = &r.header;
                let at = format!("events[{i}] (position {})", h.position);
                if ev_stream != stream {
                    return Err(Finding(format!(
                        "{at}: an event of stream {ev_stream}, not of {stream}"
                    )));
                }
                if h.stream_version != i as u64 {
                    return Err(Finding(format!(
                        "{at}: version {} where version {i} must be: events are missing, added or out of order",
                        h.stream_version
                    )));
                }
                if h.stream_prev != prev_position {
                    return Err(Finding(format!(
                        "{at}: its previous event is at position {}, but the extract's is {}",
                        h.stream_prev,
                        if prev_position == tally_engine::format::record::NO_STREAM_PREV {
                            "none".to_owned()
                        } else {
                            prev_position.to_string()
                        }
                    )));
                }
                prev_position = h.position.0;
            }
            let head = field(c, "completeness", "head")?;
            let version = field(head, "completeness.head", "version")?.as_u64();
            let position = field(head, "completeness.head", "position")?.as_u64();
            let siblings = hash_list(
                field(head, "completeness.head", "proof")?,
                "completeness.head.proof",
            )?;
            let (Some(version), Some(position)) = (version, position) else {
                return Err(Finding(
                    "completeness.head: version and position must be integers".into(),
                ));
            };
            let last = events
                .last()
                .map(|(r, _)| (r.header.stream_version, r.header.position.0));
            if last != Some((version, position)) {
                return Err(Finding(format!(
                    "the stream's head at checkpoint {} is version {version} at position {position}, but the extract ends at {}: its newest events are missing",
                    s.id,
                    last.map_or_else(
                        || "no event".to_owned(),
                        |(v, p)| format!("version {v} at position {p}")
                    )
                )));
            }
            // The readable copies of the signed map's facts must be the signed ones.
            let count = field(c, "completeness", "stream_count")?.as_u64();
            let root = str_field(c, "completeness", "streams_root")?;
            if count != s.streams.map(|(n, _)| n) || root != hex(&streams_root) {
                return Err(Finding(
                    "completeness: stream_count or streams_root differs from the signed checkpoint"
                        .into(),
                ));
            }
            let key = tally_engine::format::heads::stream_key(stream.as_bytes());
            let proof = tally_engine::format::heads::HeadProof { siblings };
            if !proof.verify(&streams_root, &key, version, position) {
                return Err(Finding(format!(
                    "completeness.head: the proof that stream {stream} ends at version {version} does not verify against the signed stream heads root"
                )));
            }
            Ok(Completeness::Stream(stream.to_owned()))
        }
        "window" => {
            if !layout.links_stream_prev() {
                return Err(Finding(
                    "completeness: a window proof needs a version 2 log".into(),
                ));
            }
            let time = |key: &str| -> Result<tally_engine::Timestamp, Finding> {
                let text = str_field(c, "completeness", key)?;
                parse_time(text).map_err(|e| Finding(format!("completeness.{key}: {e}")))
            };
            let (from, to) = (time("from_time")?, time("to_time")?);
            if from >= to {
                return Err(Finding(
                    "completeness: the window's from_time is not before its to_time".into(),
                ));
            }
            let pos = |key: &str| {
                field(c, "completeness", key)?
                    .as_u64()
                    .ok_or_else(|| Finding(format!("completeness.{key}: not an integer")))
            };
            let (a, b) = (pos("first_position")?, pos("end_position")?);
            if a > b || b > s.tree_size || events.len() as u64 != b - a {
                return Err(Finding(format!(
                    "the window is positions {a}..{b} of a tree of {}, but the extract holds {} events",
                    s.tree_size,
                    events.len()
                )));
            }
            for (i, (r, _)) in events.iter().enumerate() {
                let h = &r.header;
                if h.position.0 != a + i as u64 {
                    return Err(Finding(format!(
                        "events[{i}]: position {} where {} must be: events are missing, added or out of order",
                        h.position,
                        a + i as u64
                    )));
                }
                if h.record_time < from || h.record_time >= to {
                    return Err(Finding(format!(
                        "events[{i}] (position {}): recorded at {}, outside the window",
                        h.position,
                        rfc3339(h.record_time)
                    )));
                }
            }
            // The records just outside: proven, and outside the window.
            let edge = |key: &str, want: u64| -> Result<Option<CheckedRecord>, Finding> {
                match field(c, "completeness", key)? {
                    Value::Null => Ok(None),
                    v => {
                        let r = check_record(v, &format!("completeness.{key}"), s, layout)?;
                        if r.header.position.0 != want
                            || v.get("position").and_then(Value::as_u64) != Some(want)
                        {
                            return Err(Finding(format!(
                                "completeness.{key}: position {} where {want} must be",
                                r.header.position
                            )));
                        }
                        Ok(Some(r))
                    }
                }
            };
            match (a, edge("before", a.wrapping_sub(1))?) {
                (0, None) => {}
                (_, Some(r)) if r.header.record_time < from => {}
                _ => {
                    return Err(Finding(format!(
                        "completeness.before: the record before position {a} must be proven and recorded before the window: the window may start earlier"
                    )));
                }
            }
            match (b == s.tree_size, edge("after", b)?) {
                (true, None) => {}
                (false, Some(r)) if r.header.record_time >= to => {}
                _ => {
                    return Err(Finding(format!(
                        "completeness.after: the record at position {b} must be proven and recorded at or after the window's end: the window may end later"
                    )));
                }
            }
            Ok(Completeness::Window(rfc3339(from), rfc3339(to), a, b))
        }
        other => Err(Finding(format!(
            "completeness.kind: unknown kind {other:?}"
        ))),
    }
}

/// Verifies an extract offline.
pub fn verify_extract(a: &VerifyExtractArgs) -> Result<ExitCode> {
    let trusted = read_pubkeys(&a.pubkey)?;
    let witnesses = crate::support::read_witness_keys(&a.witness)?;
    let file =
        std::fs::File::open(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let mut input = std::io::BufReader::with_capacity(1 << 20, file);
    let checked = match crate::extract::codec::Reader::sniff(&mut input)
        .with_context(|| format!("reading {}", a.file.display()))?
    {
        Some(form) => {
            let tuning = crate::extract::check::Tuning {
                workers: a
                    .threads
                    .unwrap_or(crate::extract::check::Tuning::default().workers),
                buffer_bytes: usize::try_from(a.buffer_mb << 20).unwrap_or(usize::MAX),
            };
            let mut sink: Option<Box<dyn Write>> = match &a.events {
                None => None,
                Some(p) if p.as_os_str() == "-" => {
                    Some(Box::new(std::io::BufWriter::new(std::io::stdout().lock())))
                }
                Some(p) => Some(Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("creating {}", p.display()))?,
                ))),
            };
            let len = std::fs::metadata(&a.file).map_or(0, |m| m.len());
            let bar = crate::extract::progress_bytes(len, "verify-extract");
            let r = crate::extract::check::verify(
                input,
                form,
                &trusted,
                tuning,
                sink.as_mut().map(|w| w as &mut dyn Write),
                a.blobs.as_deref(),
                &bar,
            );
            bar.finish_and_clear();
            if let Some(mut w) = sink {
                w.flush()?;
            }
            r
        }
        None => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut input, &mut text)
                .with_context(|| format!("reading {}", a.file.display()))?;
            if a.blobs.is_some() {
                bail!("--blobs checks format 3 extracts; this one is format 1 or 2");
            }
            let doc: Value = serde_json::from_str(&text)
                .map_err(|e| Finding(format!("{}: not JSON: {e}", a.file.display())))?;
            check_extract(&doc, &trusted)
        }
    };
    let result = checked.and_then(|c| {
        let cosigned = check_witnesses(&c, &witnesses, a.min_witnesses)?;
        if a.require_complete
            && let Completeness::Inclusion(why) = &c.kind
        {
            return Err(Finding(format!(
                "the extract proves inclusion only ({why}), and --require-complete was given"
            )));
        }
        Ok((c, cosigned))
    });
    if a.events.as_ref().is_some_and(|p| p.as_os_str() == "-") {
        // Standard output carried the events: the verdict is the exit status, and a
        // failure goes to standard error.
        return Ok(match result {
            Ok(_) => ExitCode::SUCCESS,
            Err(f) => {
                eprintln!("FAILED: {f}");
                ExitCode::from(1)
            }
        });
    }
    match result {
        Ok((c, cosigned)) => {
            let cp = &c.checkpoint;
            let (kind, what) = match &c.kind {
                Completeness::Stream(stream) => (
                    "stream",
                    format!("complete: every event of stream {stream} up to the checkpoint"),
                ),
                Completeness::Window(from, to, first, end) => (
                    "window",
                    format!(
                        "complete: every event recorded from {from} to {to} (positions {first}..{end})"
                    ),
                ),
                Completeness::Inclusion(why) => ("inclusion", format!("inclusion only: {why}")),
            };
            if json_output() {
                println!(
                    "{}",
                    json!({
                        "ok": true,
                        "events": c.events,
                        "removed_by_retention": c.removed,
                        "personal": {
                            "sealed_events": c.personal.sealed_events,
                            "subjects": c.personal.subjects,
                            "erasures": c.personal.erasures.iter().map(|(s, g, p)| json!({"subject": s, "generation": g, "position": p})).collect::<Vec<_>>(),
                        },
                        "proof": kind,
                        "what": what,
                        "witnesses": cosigned,
                        "checkpoint": checkpoint_json(cp),
                    })
                );
            } else {
                println!(
                    "ok: {} events, each proven against checkpoint {} (tree size {}, root {}) signed by key {} at {}",
                    c.events,
                    cp.statement.id,
                    cp.statement.tree_size,
                    hex(&cp.statement.root),
                    fingerprint(&cp.public_key),
                    rfc3339(cp.statement.time)
                );
                println!("{what}");
                if c.removed > 0 {
                    println!(
                        "{} of them were removed by retention: their record hashes and places are proven, their content is gone; each names the $RetentionApplied event that removed it (prove that event with an extract of $governance)",
                        c.removed
                    );
                }
                if c.personal.sealed_events > 0 {
                    println!(
                        "{} of them seal personal data of {} data subjects: only ciphertext is carried, readable with the subject's key and by nobody once an erasure destroyed it",
                        c.personal.sealed_events,
                        c.personal.subjects.len()
                    );
                    for (subject, fields) in &c.personal.subjects {
                        let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
                        let erased = c.personal.erasure_of(subject);
                        println!(
                            "  subject {subject}: {}{}",
                            if fields.is_empty() {
                                "whole payloads".to_owned()
                            } else {
                                format!("fields {}", fields.join(", "))
                            },
                            match erased {
                                Some((_, g, p)) => format!(
                                    "; erased (key generations up to {g}) by the $SubjectErased event at position {p}, proven in this extract"
                                ),
                                None => String::new(),
                            }
                        );
                    }
                    if c.personal.erased_subjects() < c.personal.subjects.len() {
                        println!(
                            "  (whether the others were erased is in $erasures: prove it with an extract of that stream)"
                        );
                    }
                }
                if !c.personal.erasures.is_empty() && c.personal.sealed_events == 0 {
                    println!(
                        "{} of them are erasures ($SubjectErased), each proven like every event",
                        c.personal.erasures.len()
                    );
                }
                if !witnesses.is_empty() {
                    println!(
                        "cosigned by {cosigned} of the {} given witnesses",
                        witnesses.len()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => Err(f.into()),
    }
}

/// Counts the witnesses that cosigned the extract's checkpoint (in its note), failing when
/// fewer than `min` did.
fn check_witnesses(
    c: &Checked,
    witnesses: &[tally_engine::format::note::WitnessKey],
    min: usize,
) -> Result<usize, Finding> {
    use tally_engine::format::note::{Cosignature, Note, checkpoint_body};
    if witnesses.is_empty() {
        return Ok(0);
    }
    let Some(text) = &c.note else {
        return Err(Finding(
            "the extract carries no checkpoint note, so no cosignature can be checked".into(),
        ));
    };
    let note = Note::parse(text).map_err(|e| Finding(format!("checkpoint_note: {e}")))?;
    let body = checkpoint_body(&c.checkpoint.statement);
    if note.body != body {
        return Err(Finding(
            "checkpoint_note: its body is not the extract's checkpoint".into(),
        ));
    }
    let mut good: Vec<[u8; 32]> = Vec::new();
    for cosig in Cosignature::in_note(&note, witnesses) {
        cosig.verify(&body).map_err(|e| {
            Finding(format!(
                "checkpoint_note: the cosignature by witness {} does not verify: {e}",
                cosig.name
            ))
        })?;
        if !good.contains(&cosig.public_key) {
            good.push(cosig.public_key);
        }
    }
    if good.len() < min {
        return Err(Finding(format!(
            "the checkpoint is cosigned by {} of the given witnesses, fewer than {min}",
            good.len()
        )));
    }
    Ok(good.len())
}

/// `tally backup DIR DEST`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    /// The data directory (may be in use by a server).
    dir: PathBuf,
    /// The new directory to copy it to (must not exist).
    dest: PathBuf,
    /// Leave the secret signing key out of the copy.
    #[arg(long)]
    without_key: bool,
    /// Segments in the cold tier and blobs: `reference` copies the cold manifest and store
    /// URL, so the copy reads the same objects; `copy` fetches each cold segment into the
    /// copy as an ordinary segment file, and each blob the copied events refer to into a
    /// store inside the copy (`DEST/blobs-store`, named in its `cold.store`), so that the
    /// copy needs no other store.
    #[arg(long, value_enum, default_value_t = ColdBackup::Reference)]
    cold: ColdBackup,
    #[command(flatten)]
    key: KeyArg,
}

/// How `tally backup` handles segments in the cold tier.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColdBackup {
    /// Copy the manifest and the store's URL: the objects stay where they are.
    Reference,
    /// Fetch every cold segment into the copy.
    Copy,
}

/// Copies a live data directory up to a signed checkpoint and verifies the copy.
pub fn backup(a: &BackupArgs) -> Result<ExitCode> {
    if a.dest.exists() {
        bail!("{} already exists", a.dest.display());
    }
    let (log, writable) = open_writable_if_free(&a.dir, &a.key)?;
    if writable {
        log.checkpoint()?;
    } else if log.checkpoints().is_empty() {
        bail!("the log is in use and has no checkpoint yet");
    }
    let done = log.backup_to(
        &a.dest,
        &tally_engine::BackupOptions {
            without_key: a.without_key,
            cold: match a.cold {
                ColdBackup::Reference => tally_engine::ColdBackup::Reference,
                ColdBackup::Copy => tally_engine::ColdBackup::Copy,
            },
        },
    );
    if writable {
        log.close()?;
    } else {
        drop(log);
    }
    let done = done.with_context(|| format!("backing up to {}", a.dest.display()))?;
    let size = done.records;
    // Verify the copy: it must be exactly the checkpointed log.
    let copy = crate::support::open_read_only(&a.dest)?;
    let report = copy
        .verify_with(
            // Every checkpoint is checked under the key stored with it: the copy must be
            // exactly the source, whose keys may have been rotated; whoever relies on the
            // copy verifies it against their own key file.
            &tally_engine::VerifyOptions::default(),
            &mut |_| {},
        )
        .map_err(|e| Finding(format!("the copy does not verify: {e}")))?;
    if copy.next_position().0 != size || report.checkpoints != done.checkpoints {
        bail!(Finding(format!(
            "the copy holds {} records and {} checkpoints, expected {size} and {}",
            copy.next_position().0,
            report.checkpoints,
            done.checkpoints
        )));
    }
    println!(
        "backed up {} segment files{}, {size} records, to {} up to checkpoint {} (root {}); verified",
        done.segment_files,
        if done.cold_referenced > 0 {
            format!(" and {} cold segments by reference", done.cold_referenced)
        } else {
            String::new()
        },
        a.dest.display(),
        done.checkpoint_id,
        hex(&done.root)
    );
    if done.blobs > 0 {
        println!(
            "{} blobs {}",
            done.blobs,
            match a.cold {
                ColdBackup::Reference => "referred to where they are (the copy's cold.store)",
                ColdBackup::Copy =>
                    "copied into blobs-store/ (named by the copy's cold.store), each checked against its hash",
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
