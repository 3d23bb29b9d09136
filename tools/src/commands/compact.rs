//! `tally compact`: moves sealed segments of a stopped log to its cold store
//! (docs/FORMAT.md section 21, OPERATIONS.md "The cold tier").

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use tally_engine::cold::ColdStore;
use tally_engine::{ColdOptions, CompactPolicy, Error, Log, Options};

use crate::support::{KeyArg, Report, render, require_data_dir};

/// `tally compact DIR`.
#[derive(Args, Debug)]
pub struct CompactArgs {
    /// The data directory (of a stopped log: tallyd compacts its own in the background).
    dir: PathBuf,
    /// The object store: `file:///path` or `s3://bucket/prefix` (credentials, region and
    /// endpoint from the AWS_* environment variables). Without it, the store the log's first
    /// compaction recorded in DIR/cold.store.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// Keep at least this many of the newest sealed segments local.
    #[arg(long, value_name = "N", default_value_t = CompactPolicy::default().keep_local_segments)]
    keep_local_segments: usize,
    /// Move only segments whose last record is older than this (`90s`, `45m`, `12h`, `30d`).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    older_than: Option<Duration>,
    /// Move the oldest segments until the local ones take at most this many MiB.
    #[arg(long, value_name = "MIB")]
    local_budget_mb: Option<u64>,
    /// Report what would move; move nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    key: KeyArg,
}

/// Parses `90s`, `45m`, `12h`, `30d` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 45m, 12h or 30d"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?} is not a duration such as 90s, 45m, 12h or 30d"))?;
    Ok(Duration::from_secs(secs))
}

/// Runs `tally compact`.
pub fn compact(a: &CompactArgs) -> Result<ExitCode> {
    require_data_dir(&a.dir)?;
    let store: Option<Arc<dyn ColdStore>> = match &a.store {
        Some(url) => Some(
            tally_server::cold_store::open_store(url)
                .with_context(|| format!("opening the store {url}"))?,
        ),
        None => crate::support::cold_options(&a.dir)?.store,
    };
    let policy = CompactPolicy {
        keep_local_segments: a.keep_local_segments,
        older_than: a.older_than,
        local_budget_bytes: a.local_budget_mb.map(|m| m << 20),
    };
    let log = match Log::open(
        &a.dir,
        Options {
            create: false,
            signing_key: a.key.key.clone(),
            cold: ColdOptions {
                store,
                policy: policy.clone(),
                ..ColdOptions::default()
            },
            ..Options::default()
        },
    ) {
        Ok(log) => log,
        Err(Error::Locked { .. }) => bail!(
            "{} is open in another process (tallyd compacts its own log with [cold] in its \
             configuration); stop it to compact from here",
            a.dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("opening {}", a.dir.display())),
    };
    let report = log.compact(Some(&policy), a.dry_run)?;
    let status = log.cold_status();
    log.close()?;
    render(&CompactOut {
        store: report.store.clone(),
        dry_run: report.dry_run,
        moved: report
            .moved
            .iter()
            .map(|m| MovedOut {
                seq: m.seq.0,
                first_position: m.positions.0.0,
                last_position: m.positions.1.0,
                record_bytes: m.record_bytes,
                object_bytes: m.object_bytes,
                key: m.key.clone(),
            })
            .collect(),
        finished: report.finished.iter().map(|s| s.0).collect(),
        cold_segments: status.cold_segments,
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What `tally compact` did (or would do, with `--dry-run`).
#[derive(serde::Serialize)]
struct CompactOut {
    store: String,
    dry_run: bool,
    moved: Vec<MovedOut>,
    /// Segments whose interrupted move this run finished.
    finished: Vec<u64>,
    cold_segments: usize,
}

/// One segment moved.
#[derive(serde::Serialize)]
struct MovedOut {
    seq: u64,
    first_position: u64,
    last_position: u64,
    record_bytes: u64,
    object_bytes: u64,
    key: String,
}

impl Report for CompactOut {
    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "store {}", self.store)?;
        for m in &self.moved {
            let to = if self.dry_run {
                String::new()
            } else {
                format!(" -> {} bytes ({})", m.object_bytes, m.key)
            };
            writeln!(
                out,
                "  segment {:>6}  positions {}..={}  {} bytes of records{to}",
                m.seq, m.first_position, m.last_position, m.record_bytes
            )?;
        }
        for s in &self.finished {
            writeln!(
                out,
                "  segment {s:>6}  finished (an earlier compaction was interrupted)"
            )?;
        }
        let (records, objects) = self.moved.iter().fold((0u64, 0u64), |(r, o), m| {
            (r + m.record_bytes, o + m.object_bytes)
        });
        let ratio = if self.dry_run || records == 0 {
            String::new()
        } else {
            format!(
                " in {objects} bytes, {:.2}x",
                records as f64 / objects.max(1) as f64
            )
        };
        writeln!(
            out,
            "{} {} segments ({records} bytes of records{ratio}); {} segments are cold",
            if self.dry_run { "would move" } else { "moved" },
            self.moved.len(),
            self.cold_segments,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_their_units_and_refuse_the_rest() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("45m"), Ok(Duration::from_secs(2700)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(2_592_000)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "d", "3w", "1.5h", "-1d", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
