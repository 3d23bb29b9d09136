//! `tally dump`: records in order, as a table or JSON lines.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde_json::Value;
use tally_engine::Position;

use crate::support::{
    EventFormat, Finding, event_format, event_json, open_read_only, output_progress, payload_json,
    rfc3339,
};

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

/// Positions `tally dump` reads between two releases of the segments' mapped pages
/// ([`Log::release_mapped_memory`]).
const DUMP_CHUNK_POSITIONS: u64 = 4096;

/// Prints records in order.
pub fn dump(a: &DumpArgs) -> Result<ExitCode> {
    let log = open_read_only(&a.dir)?;
    let end = log.next_position().0;
    let to = a.to.map_or(end, |t| t.saturating_add(1).min(end));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let format = event_format(a.format);
    if format == EventFormat::Table {
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
                    // An event retention removed shows as its marker, naming the run.
                    let removed_by = r.removed().ok().flatten().map(|p| p.removed_by.0);
                    let e = match r.envelope_or_marker() {
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
                    // Sealed personal data shows as every read returns it: opened with the
                    // key store, else markers; never ciphertext.
                    let opened = log.open_sealed(&e);
                    let e = match &opened {
                        Some((payload, content_type, _)) => {
                            tally_engine::format::envelope::EnvelopeRef {
                                payload,
                                content_type: *content_type,
                                payload_form: tally_engine::format::envelope::PayloadForm::Inline,
                                ..e
                            }
                        }
                        None => e,
                    };
                    let res = match format {
                        EventFormat::Jsonl => {
                            let mut v = event_json(
                                r.position.0,
                                r.stream_version,
                                r.record_time,
                                r.record_hash,
                                &e,
                            );
                            if let Some(by) = removed_by {
                                v["removed_by"] = by.into();
                            }
                            if let Some((_, _, s)) = &opened {
                                v["sealed"] = crate::support::sealing_json(s);
                            }
                            serde_json::to_writer(&mut out, &v)
                                .map_err(std::io::Error::from)
                                .and_then(|()| writeln!(out))
                        }
                        EventFormat::Table => {
                            // A blob's reference is shown whole (its hash names it);
                            // a payload, cut to 60 characters.
                            let payload = match (payload_json(&e), e.blob()) {
                                _ if removed_by.is_some() => format!(
                                    "removed by retention (run at position {})",
                                    removed_by.unwrap_or_default()
                                ),
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
