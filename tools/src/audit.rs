//! Audit extracts (`tally extract`, `tally verify-extract`) and backups (`tally backup`).
//!
//! An extract is one JSON document (docs/EXTRACT.md): the selected events, each with its
//! stored record bytes, the record hash before it and an inclusion proof, all against one
//! signed checkpoint carried in the extract. `verify-extract` needs only the extract and a
//! trusted public key: it recomputes every record hash from the bytes, checks every proof
//! against the signed root, and checks that every readable field says what the signed bytes
//! say.

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::Args;
use serde_json::{Value, json};
use tally_engine::format::PAGE_BYTES;
use tally_engine::format::chain::{body_hash, chain_step};
use tally_engine::format::checkpoint::{SignedCheckpoint, fingerprint};
use tally_engine::format::envelope::EnvelopeRef;
use tally_engine::format::proof::{InclusionProof, hex, parse_hex};
use tally_engine::format::record::{Layout, RECORD_HEADER_LEN, RECORD_HEADER_V2_LEN, RecordHeader};
use tally_engine::format::tree::{CHUNK_LEAVES, TREE_HEADER_LEN, TREE_NODE_LEN, nodes_for_chunks};
use tally_engine::{Direction, Field, Log, Position, Query};

use crate::ops::{
    Finding, KeyArg, checkpoint_json, event_json, open_writable_if_free, parse_time, read_pubkeys,
    rfc3339,
};

/// The extract format's name and version.
pub const EXTRACT_FORMAT: &str = "tally-audit-extract/1";

/// `tally extract DIR`.
#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// The data directory.
    dir: PathBuf,
    /// Every event of this stream.
    #[arg(long, group = "select")]
    stream: Option<String>,
    /// Every event with this correlation id, across streams.
    #[arg(long, group = "select")]
    correlation: Option<String>,
    /// Events recorded at or after this time (RFC 3339 UTC or nanoseconds).
    #[arg(long, requires = "to_time", group = "select")]
    from_time: Option<String>,
    /// Events recorded before this time.
    #[arg(long, requires = "from_time")]
    to_time: Option<String>,
    /// The extract file to write.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    key: KeyArg,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Writes an audit extract.
pub fn extract(a: &ExtractArgs) -> Result<ExitCode> {
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
    // One checkpoint covers every selected event: a fresh one when the log is free, else
    // the latest the running server wrote.
    let cp = if writable {
        log.checkpoint()?
    } else {
        *log.checkpoints().last().context(
            "the log is open by another process and has no checkpoint yet; try again after its next checkpoint",
        )?
    };
    let size = cp.statement.tree_size;
    let positions = select(&log, a, size)?;
    let mut events = Vec::with_capacity(positions.len());
    for p in &positions {
        let raw = log.read_raw(*p)?;
        let header = RecordHeader::decode_in(&raw.header, raw.layout)?;
        let env = EnvelopeRef::decode(&raw.body)?;
        let proof = log.prove_inclusion(*p, size)?;
        let mut v = event_json(
            p.0,
            header.stream_version,
            header.record_time,
            &header.chain_hash,
            &env,
        );
        v["record"] = json!({
            "header": hex(&raw.header),
            "body": b64().encode(&raw.body),
            "prev_record_hash": hex(&raw.prev_hash),
        });
        v["proof"] = json!({
            "tree_size": proof.tree_size,
            "path": proof.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        });
        events.push(v);
    }
    let doc = json!({
        "format": EXTRACT_FORMAT,
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
        "checkpoint": checkpoint_json(&cp),
        "events": events,
    });
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

/// Positions of the selected events below `size`, in log order.
fn select(log: &Log, a: &ExtractArgs, size: u64) -> Result<Vec<Position>> {
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
        return Ok(out);
    }
    // Through the attribute indexes: the correlation's events, or the records of the
    // record-time window, and nothing else.
    let mut query = Query::all().positions(Position(0)..Position(size));
    match (&a.correlation, &a.from_time, &a.to_time) {
        (Some(c), _, _) => query.field = Some((Field::Correlation, c.as_str())),
        (None, Some(f), Some(t)) => query = query.recorded(parse_time(f)?..parse_time(t)?),
        _ => bail!("select events with --stream, --correlation or --from-time/--to-time"),
    }
    let out: Vec<Position> = log.find(&query)?.iter().map(|e| e.position).collect();
    if out.is_empty() {
        bail!("no events match the selection among the {size} records the checkpoint covers");
    }
    Ok(out)
}

/// `tally verify-extract FILE`.
#[derive(Args, Debug)]
pub struct VerifyExtractArgs {
    /// The extract.
    file: PathBuf,
    /// Public key file of the log's signing key (one or more keys).
    #[arg(long)]
    pubkey: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
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

/// Checks an extract; `Err(Finding)` names the first problem.
pub fn check_extract(
    doc: &Value,
    trusted: &[[u8; 32]],
) -> Result<(SignedCheckpoint, usize), Finding> {
    if doc.get("format").and_then(Value::as_str) != Some(EXTRACT_FORMAT) {
        return Err(Finding(format!("not a {EXTRACT_FORMAT} document")));
    }
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
    let events = field(doc, "extract", "events")?
        .as_array()
        .ok_or_else(|| Finding("events: not an array".into()))?;
    for (i, ev) in events.iter().enumerate() {
        let path = format!("events[{i}]");
        let rec = field(ev, &path, "record")?;
        // The header's length says its layout: 80 bytes (format version 1) or 88 (2).
        let header_hex = str_field(rec, &path, "header")?;
        let (header_bytes, layout) = match header_hex.len() {
            n if n == 2 * Layout::V1.header_len() => (
                parse_hex::<RECORD_HEADER_LEN>(header_hex).map(|b| b.to_vec()),
                Layout::V1,
            ),
            n if n == 2 * Layout::V2.header_len() => (
                parse_hex::<RECORD_HEADER_V2_LEN>(header_hex).map(|b| b.to_vec()),
                Layout::V2,
            ),
            _ => (None, Layout::V1),
        };
        let header_bytes = header_bytes
            .ok_or_else(|| Finding(format!("{path}.record.header: not 80 or 88 bytes in hex")))?;
        let header = RecordHeader::decode_in(&header_bytes, layout)
            .map_err(|e| Finding(format!("{path}.record.header: {e}")))?;
        let position = header.position.0;
        let at = format!("{path} (position {position})");
        let body = b64()
            .decode(str_field(rec, &path, "body")?)
            .map_err(|e| Finding(format!("{at}.record.body: {e}")))?;
        if body.len() != header.body_len as usize || crc32fast::hash(&body) != header.body_crc {
            return Err(Finding(format!(
                "{at}: the body does not match its header (length or checksum)"
            )));
        }
        let prev = hex32(rec, &at, "prev_record_hash")?;
        let hash = chain_step(&prev, &header_bytes, &body_hash(&body));
        if hash != header.chain_hash {
            return Err(Finding(format!(
                "{at}: the record hash computed from its bytes is {}, the header says {}",
                hex(&hash),
                hex(&header.chain_hash)
            )));
        }
        let pv = field(ev, &at, "proof")?;
        let tree_size = field(pv, &at, "tree_size")?.as_u64();
        if tree_size != Some(s.tree_size) {
            return Err(Finding(format!(
                "{at}: the proof is for a tree of {tree_size:?} records, the checkpoint has {}",
                s.tree_size
            )));
        }
        let mut proof_path = Vec::new();
        for (j, h) in field(pv, &at, "path")?
            .as_array()
            .ok_or_else(|| Finding(format!("{at}.proof.path: not an array")))?
            .iter()
            .enumerate()
        {
            proof_path.push(
                h.as_str()
                    .and_then(parse_hex::<32>)
                    .ok_or_else(|| Finding(format!("{at}.proof.path[{j}]: not 64 hex digits")))?,
            );
        }
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
        let env = EnvelopeRef::decode(&body).map_err(|e| Finding(format!("{at}: {e}")))?;
        let mut expected = event_json(
            position,
            header.stream_version,
            header.record_time,
            &hash,
            &env,
        );
        expected["record"] = rec.clone();
        expected["proof"] = pv.clone();
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
    }
    Ok((cp, events.len()))
}

/// Verifies an extract offline.
pub fn verify_extract(a: &VerifyExtractArgs) -> Result<ExitCode> {
    let trusted = read_pubkeys(&a.pubkey)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let doc: Value = serde_json::from_str(&text)
        .map_err(|e| Finding(format!("{}: not JSON: {e}", a.file.display())))?;
    match check_extract(&doc, &trusted) {
        Ok((cp, n)) => {
            if a.json {
                println!(
                    "{}",
                    json!({"ok": true, "events": n, "checkpoint": checkpoint_json(&cp)})
                );
            } else {
                println!(
                    "ok: {n} events, each proven against checkpoint {} (tree size {}, root {}) signed by key {} at {}",
                    cp.statement.id,
                    cp.statement.tree_size,
                    hex(&cp.statement.root),
                    fingerprint(&cp.public_key),
                    rfc3339(cp.statement.time)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            if a.json {
                println!("{}", json!({"ok": false, "failure": f.0}));
            } else {
                println!("FAILED: {f}");
            }
            Ok(ExitCode::from(1))
        }
    }
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
    #[command(flatten)]
    key: KeyArg,
}

fn copy_prefix(from: &Path, to: &Path, len: u64, file_len: u64, mode: Option<u32>) -> Result<()> {
    let src = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if let Some(m) = mode {
        opts.mode(m);
    }
    let dst = opts
        .open(to)
        .with_context(|| format!("creating {}", to.display()))?;
    dst.set_len(file_len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], at)
            .with_context(|| format!("reading {}", from.display()))?;
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    dst.sync_all()?;
    Ok(())
}

/// Copies a live data directory up to a signed checkpoint and verifies the copy.
pub fn backup(a: &BackupArgs) -> Result<ExitCode> {
    if a.dest.exists() {
        bail!("{} already exists", a.dest.display());
    }
    let (log, writable) = open_writable_if_free(&a.dir, &a.key)?;
    let cp = if writable {
        log.checkpoint()?
    } else {
        *log.checkpoints()
            .last()
            .context("the log is in use and has no checkpoint yet")?
    };
    let size = cp.statement.tree_size;
    let cps = log.checkpoints();
    let index = cps
        .iter()
        .position(|c| c.statement.id == cp.statement.id)
        .context("checkpoint vanished")?;
    std::fs::create_dir_all(&a.dest).with_context(|| format!("creating {}", a.dest.display()))?;
    let file_len = |p: &Path| std::fs::metadata(p).map(|m| m.len());
    let meta = a.dir.join("tally.meta");
    copy_prefix(
        &meta,
        &a.dest.join("tally.meta"),
        file_len(&meta)?,
        file_len(&meta)?,
        None,
    )?;
    let key = a.dir.join(tally_engine::KEY_FILE);
    if !a.without_key && key.exists() {
        let n = file_len(&key)?;
        copy_prefix(
            &key,
            &a.dest.join(tally_engine::KEY_FILE),
            n,
            n,
            Some(0o600),
        )?;
    }
    let cp_len =
        ((index + 1) * tally_engine::format::checkpoint::entry_len(cp.statement.version())) as u64;
    copy_prefix(
        &a.dir.join(tally_engine::CHECKPOINTS_FILE),
        &a.dest.join(tally_engine::CHECKPOINTS_FILE),
        cp_len,
        cp_len,
        None,
    )?;
    // Stored Merkle nodes of the complete chunks the checkpoint covers.
    let tree = a.dir.join(tally_engine::TREE_FILE);
    let nodes =
        TREE_HEADER_LEN as u64 + nodes_for_chunks(size / CHUNK_LEAVES) * TREE_NODE_LEN as u64;
    if file_len(&tree).is_ok_and(|l| l >= nodes) {
        copy_prefix(
            &tree,
            &a.dest.join(tally_engine::TREE_FILE),
            nodes,
            nodes,
            None,
        )?;
    }
    let mut files = 0;
    for seg in log.segments() {
        let base = seg.base_position.0;
        if base >= size && base > 0 {
            break;
        }
        let name = seg.path.file_name().context("segment file name")?;
        let len = file_len(&seg.path)?;
        if seg.sealed && base + seg.record_count <= size {
            // Sealed segments are immutable: a plain copy, with the index and the attribute
            // index (both derived; a restore that lacks them rebuilds them).
            copy_prefix(&seg.path, &a.dest.join(name), len, len, None)?;
            for ext in ["idx", "adx"] {
                let side = seg.path.with_extension(ext);
                if let Ok(n) = file_len(&side) {
                    copy_prefix(
                        &side,
                        &a.dest.join(side.file_name().context("sidecar name")?),
                        n,
                        n,
                        None,
                    )?;
                }
            }
        } else {
            // The segment the checkpoint ends in: its records up to the checkpoint.
            let mut end = PAGE_BYTES;
            log.scan_range(
                seg.base_position,
                Position(size),
                tally_engine::Verify::Checksums,
                |r| end = r.end,
            )?;
            copy_prefix(&seg.path, &a.dest.join(name), end, len, None)?;
        }
        files += 1;
    }
    if writable {
        log.close()?;
    } else {
        drop(log);
    }
    std::fs::File::open(&a.dest)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", a.dest.display()))?;
    // Verify the copy: it must be exactly the checkpointed log.
    let copy = crate::ops::open_read_only(&a.dest)?;
    let report = copy
        .verify_with(
            // Every checkpoint is checked under the key stored with it: the copy must be
            // exactly the source, whose keys may have been rotated; whoever relies on the
            // copy verifies it against their own key file.
            &tally_engine::VerifyOptions::default(),
            &mut |_| {},
        )
        .map_err(|e| Finding(format!("the copy does not verify: {e}")))?;
    if copy.next_position().0 != size || report.checkpoints != index as u64 + 1 {
        bail!(Finding(format!(
            "the copy holds {} records and {} checkpoints, expected {size} and {}",
            copy.next_position().0,
            report.checkpoints,
            index + 1
        )));
    }
    println!(
        "backed up {} segment files, {size} records, to {} up to checkpoint {} (root {}); verified",
        files,
        a.dest.display(),
        cp.statement.id,
        hex(&cp.statement.root)
    );
    Ok(ExitCode::SUCCESS)
}
