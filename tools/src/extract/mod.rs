//! Audit extracts of format 3 (docs/EXTRACT.md, section 6): written and verified as a
//! stream, in memory bounded whatever the number of events.
//!
//! Each selected record is stored once, as its bytes (header, body, and the record hash
//! before it), and the proof is one range multiproof against the extract's checkpoint
//! (`tally_engine::format::multiproof`): before each record, the gap nodes covering the
//! positions since the previous one, and in the trailer those after the last. Completeness
//! evidence (a stream's signed head, a window's edge records) travels in the same stream.
//! The verifier reads, checks and folds the records in batches spread over the machine's
//! cores ([`check`]).

pub mod check;
pub mod codec;
#[cfg(test)]
mod tests;

use std::io::BufWriter;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tally_engine::format::Hash32;
use tally_engine::format::checkpoint::{SignedCheckpoint, fingerprint};
use tally_engine::format::multiproof::RangeFolder;
use tally_engine::format::proof::hex;
use tally_engine::format::record::RecordHeader;
use tally_engine::{Direction, Field, Log, Position, Query, Verify};

use crate::commands::audit::{ExtractArgs, V1_WHY};
use crate::support::{parse_time, rfc3339};
use codec::{Form, Role, Writer};

/// The format 3 name, in the head of both forms.
pub const EXTRACT_FORMAT_V3: &str = "tally-audit-extract/3";

/// Why a correlation extract proves inclusion only.
pub const CORRELATION_WHY: &str = "which events share a correlation id is not committed to by the checkpoint (each event's own correlation id is): the events were selected through the attribute index (derived data; tally verify --attribute-indexes checks it), and the extract proves only that each of them is in the signed log";

/// Records read from the log per call when the selection is a run of positions.
const RUN_BATCH: u64 = 4096;
/// Events asked of an index per call.
const PAGE: usize = 1024;
/// Records written between two releases of the segment pages read
/// ([`Log::release_mapped_memory`]): what keeps resident memory bounded on a large log.
const RELEASE_EVERY: u64 = 1024;

/// A progress bar on standard error, drawn only when it is a terminal.
pub fn progress(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = match len {
        Some(_) => "{msg} {wide_bar} {pos}/{len} ({per_sec}, {eta} left)",
        None => "{msg} {spinner} {pos} ({per_sec})",
    };
    if let Ok(s) = indicatif::ProgressStyle::with_template(style) {
        bar.set_style(s);
    }
    bar.set_message(what.to_owned());
    bar
}

/// A progress bar over `len` bytes on standard error, drawn only when it is a terminal.
pub fn progress_bytes(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "{msg} {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
    ) {
        bar.set_style(s);
    }
    bar.set_message(what.to_owned());
    bar
}

/// The extract being written: records go out in position order, each with the gap nodes
/// since the previous one, and are folded as they go so that the writer checks its own
/// proof against the checkpoint before it keeps the file.
struct Out<'a> {
    log: &'a Log,
    size: u64,
    w: Writer<BufWriter<std::fs::File>>,
    folder: RangeFolder,
    events: u64,
    records: u64,
    /// The last event's stream version and position (stream extracts check the head).
    last: Option<(u64, u64)>,
    bar: indicatif::ProgressBar,
    /// Where the blobs the events refer to are copied (`--blobs`), and how many events refer
    /// to one and how many blobs were written.
    blobs: Option<&'a Path>,
    blob_refs: u64,
    /// Events retention removed: carried as their pruned records.
    removed: u64,
    blobs_written: u64,
}

impl Out<'_> {
    fn record(
        &mut self,
        role: Role,
        position: u64,
        prev: &Hash32,
        header: &[u8],
        body: &[u8],
    ) -> Result<()> {
        let h = RecordHeader::decode_in(header, self.log.layout())?;
        let gaps = if position > self.folder.next() {
            self.log
                .prove_gap(self.folder.next(), position, self.size)?
        } else {
            Vec::new()
        };
        self.folder
            .push_gap(position, &gaps)
            .and_then(|()| self.folder.push_record(&h.chain_hash))
            .with_context(|| format!("folding the proof at position {position}"))?;
        self.w.record(role, &gaps, prev, header, body)?;
        self.records += 1;
        if self.records.is_multiple_of(RELEASE_EVERY) {
            self.log.release_mapped_memory()?;
        }
        if role == Role::Event {
            self.events += 1;
            self.last = Some((h.stream_version, position));
            self.bar.inc(1);
            let (env, removed_by) = tally_engine::format::pruned::content(&h, body)
                .with_context(|| format!("the envelope at position {position}"))?;
            self.removed += u64::from(removed_by.is_some());
            if let Some(blob) = env.blob() {
                self.blob_refs += 1;
                if let Some(dir) = self.blobs {
                    let wrote = crate::commands::audit::copy_blob(self.log, &blob, dir)
                        .with_context(|| {
                            format!("copying the blob of the event at position {position}")
                        })?;
                    self.blobs_written += u64::from(wrote);
                }
            }
        }
        Ok(())
    }

    /// The record at `position`, read on its own.
    fn at(&mut self, role: Role, position: u64) -> Result<()> {
        let raw = self.log.read_raw(Position(position))?;
        self.record(role, position, &raw.prev_hash, &raw.header, &raw.body)
    }

    /// The events at `positions` (increasing): each run of adjacent positions read in one
    /// pass over the segments.
    fn events(&mut self, positions: &[u64]) -> Result<()> {
        let mut i = 0;
        while i < positions.len() {
            let mut j = i + 1;
            while j < positions.len() && positions[j] == positions[j - 1] + 1 {
                j += 1;
            }
            if j - i == 1 {
                self.at(Role::Event, positions[i])?;
            } else {
                self.run(positions[i], positions[j - 1] + 1)?;
            }
            i = j;
        }
        Ok(())
    }

    /// The records of positions `from..to`, read in runs.
    fn run(&mut self, from: u64, to: u64) -> Result<()> {
        if from >= to {
            return Ok(());
        }
        let raw = self.log.read_raw(Position(from))?;
        self.record(Role::Event, from, &raw.prev_hash, &raw.header, &raw.body)?;
        let mut prev = RecordHeader::decode_in(&raw.header, raw.layout)?.chain_hash;
        let mut at = from + 1;
        while at < to {
            let end = (at + RUN_BATCH).min(to);
            let mut failed = None;
            let log = self.log;
            log.scan_range(Position(at), Position(end), Verify::Checksums, |r| {
                if failed.is_some() {
                    return;
                }
                if let Err(e) =
                    self.record(Role::Event, r.position.0, &prev, r.header, r.record_body)
                {
                    failed = Some(e);
                }
                prev = *r.record_hash;
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            at = end;
        }
        Ok(())
    }
}

/// Writes a format 3 extract (docs/EXTRACT.md, section 6).
pub fn write(a: &ExtractArgs) -> Result<ExitCode> {
    let (query, log, writable, cp) = crate::commands::audit::open_for_extract(a)?;
    let tmp = a.out.with_extension("tmp");
    let result = write_to(a, &log, writable, &cp, query, &tmp);
    if writable {
        log.close()?;
    }
    let (events, blob_refs, blobs_written, removed) = match result {
        Ok(n) => n,
        Err(e) => {
            let _ignored = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {events} events to {} against checkpoint {} (tree size {}, key {})",
        a.out.display(),
        cp.statement.id,
        cp.statement.tree_size,
        fingerprint(&cp.public_key)
    );
    if removed > 0 {
        println!(
            "{removed} of them were removed by retention: carried as their pruned records (each record's hash and proof, no content), each naming the run that removed it"
        );
    }
    if blob_refs > 0 {
        match &a.blobs {
            Some(dir) => println!(
                "{blob_refs} events refer to blobs: {blobs_written} blobs written to {} (each checked against its hash; the others were there)",
                dir.display()
            ),
            None => println!(
                "{blob_refs} events refer to blobs: the extract holds their hashes; --blobs DIR copies the blobs"
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_to(
    a: &ExtractArgs,
    log: &Log,
    writable: bool,
    cp: &SignedCheckpoint,
    query: Value,
    tmp: &Path,
) -> Result<(u64, u64, u64, u64)> {
    let size = cp.statement.tree_size;
    let v2 = cp.statement.streams.is_some();
    // What the checkpoint lets the extract prove, decided before any record is written.
    let stream_head = match (&a.stream, v2) {
        (Some(s), true) => Some(
            log.prove_stream_head(s, size)?
                .with_context(|| format!("stream {s:?} has no events covered by the checkpoint"))?,
        ),
        _ => None,
    };
    let window = match (&a.from_time, &a.to_time, v2) {
        (Some(f), Some(t), true) => {
            let (from, to) = (parse_time(f)?, parse_time(t)?);
            let first_at_or_after = |t: tally_engine::Timestamp| -> Result<u64> {
                let (mut lo, mut hi) = (0u64, size);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    let time = log
                        .read_all(Position(mid), 1, Direction::Forward)?
                        .first()
                        .map(|e| e.record_time)
                        .with_context(|| format!("no record at position {mid}"))?;
                    if time < t {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                Ok(lo)
            };
            let first = first_at_or_after(from)?;
            let end = first_at_or_after(to)?.max(first);
            if first == end {
                bail!(
                    "no events were recorded in the window among the {size} records the checkpoint covers"
                );
            }
            Some((from, to, first, end))
        }
        _ => None,
    };
    let selection = if stream_head.is_some() {
        json!({"kind": "stream", "stream": a.stream})
    } else if let Some((from, to, _, _)) = window {
        json!({"kind": "window", "from_time": rfc3339(from), "to_time": rfc3339(to)})
    } else if a.correlation.is_some() {
        json!({"kind": "inclusion", "why": CORRELATION_WHY})
    } else {
        json!({"kind": "inclusion", "why": V1_WHY})
    };
    let mut head =
        crate::commands::audit::extract_head(EXTRACT_FORMAT_V3, a, log, writable, cp, query)?;
    head.insert("selection".into(), selection);
    let head = Value::Object(head);
    let file = std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let form = if a.lines { Form::Lines } else { Form::Binary };
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, file), form);
    w.head(&head)?;
    let expected = match (&stream_head, window) {
        (Some(h), _) => Some(h.version + 1),
        (None, Some((_, _, first, end))) => Some(end - first),
        _ => None,
    };
    let mut out = Out {
        log,
        size,
        w,
        folder: RangeFolder::new(size),
        events: 0,
        records: 0,
        last: None,
        bar: progress(expected, "extract"),
        blobs: a.blobs.as_deref(),
        blob_refs: 0,
        removed: 0,
        blobs_written: 0,
    };
    let mut trailer = serde_json::Map::new();
    if let Some(stream) = &a.stream {
        let mut from = 0;
        loop {
            let batch = log.read_stream(stream, from, PAGE, Direction::Forward)?;
            let Some(last) = batch.last() else { break };
            from = last.version + 1;
            let positions: Vec<u64> = batch
                .iter()
                .map(|e| e.position.0)
                .take_while(|&p| p < size)
                .collect();
            out.events(&positions)?;
            if positions.len() < batch.len() {
                break;
            }
        }
        if out.events == 0 {
            bail!("stream {stream:?} has no events covered by the checkpoint");
        }
        if let Some(h) = &stream_head {
            if out.last != Some((h.version, h.position.0)) || out.events != h.version + 1 {
                bail!(
                    "the stream's index gives {} events ending at {:?}, but its head in the checkpoint is version {} at position {}: run tally verify",
                    out.events,
                    out.last,
                    h.version,
                    h.position
                );
            }
            trailer.insert(
                "head".into(),
                json!({
                    "version": h.version,
                    "position": h.position.0,
                    "proof": h.proof.siblings.iter().map(|s| hex(s)).collect::<Vec<_>>(),
                }),
            );
        }
    } else if let Some((_, _, first, end)) = window {
        if first > 0 {
            out.at(Role::Before, first - 1)?;
        }
        out.run(first, end)?;
        if end < size {
            out.at(Role::After, end)?;
        }
        trailer.insert("first_position".into(), json!(first));
        trailer.insert("end_position".into(), json!(end));
    } else {
        // Through the attribute indexes, a page at a time: the correlation's events, or
        // (version 1 log) the records of the record-time window.
        let mut q = Query::all().positions(Position(0)..Position(size));
        if let Some(c) = &a.correlation {
            q.field = Some((Field::Correlation, c.as_str()));
        } else if let (Some(f), Some(t)) = (&a.from_time, &a.to_time) {
            q = q.recorded(parse_time(f)?..parse_time(t)?);
        }
        q.limit = PAGE;
        loop {
            let page = log.find(&q)?;
            let Some(last) = page.last() else { break };
            let next = last.position.next();
            let positions: Vec<u64> = page.iter().map(|e| e.position.0).collect();
            out.events(&positions)?;
            q.positions = next..Position(size);
        }
        if out.events == 0 {
            bail!("no events match the selection among the {size} records the checkpoint covers");
        }
    }
    let gaps = if out.folder.next() < size {
        log.prove_gap(out.folder.next(), size, size)?
    } else {
        Vec::new()
    };
    out.folder.push_gap(size, &gaps)?;
    let root = out.folder.root()?;
    if root != cp.statement.root {
        bail!(
            "the extract's proof folds to root {}, but checkpoint {} signs {}: the Merkle node file may be damaged; run tally verify",
            hex(&root),
            cp.statement.id,
            hex(&cp.statement.root)
        );
    }
    trailer.insert("events".into(), json!(out.events));
    trailer.insert(
        "gap".into(),
        json!(gaps.iter().map(|g| hex(g)).collect::<Vec<_>>()),
    );
    out.bar.finish_and_clear();
    let counts = (out.events, out.blob_refs, out.blobs_written, out.removed);
    let file = out
        .w
        .trailer(&Value::Object(trailer))?
        .into_inner()
        .map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(counts)
}
