//! `tally find`: events by event type, correlation id, causation id, actor or event id, in
//! record-time and event-time windows, through the attribute indexes (a data directory,
//! opened read-only, or a running server's FIND): the forensic query that reads the events
//! it prints, not the log.
//!
//! It asks for a page at a time (at most 4,096 events and `--buffer-mb` of them; a server
//! bounds its pages by its frame size) and prints each page before asking for the next, so
//! that its memory does not grow with the number of events found. Locally, it lets go of
//! the segment pages mapped after each page.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;
use tally_engine::{EventView, Field, Position, Query, Timestamp};
use tally_server::client::Client;
use tally_server::protocol::FindQuery;

use crate::support::{
    EventFormat, envelope_json, event_format, open_read_only, parse_time, rfc3339,
};

/// Options of `tally find`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("field").multiple(false)))]
pub struct FindArgs {
    /// Data directory (opened read-only). Not with --server.
    dir: Option<PathBuf>,
    /// Ask a running server instead of reading a data directory.
    #[arg(long)]
    server: Option<String>,
    /// Events of this type.
    #[arg(long = "type", group = "field")]
    event_type: Option<String>,
    /// Events with this correlation id, across streams.
    #[arg(long, group = "field")]
    correlation: Option<String>,
    /// Events with this causation id (the events an event caused, when causation ids are
    /// event ids).
    #[arg(long, group = "field")]
    causation: Option<String>,
    /// Events by this actor.
    #[arg(long, group = "field")]
    actor: Option<String>,
    /// The event with this id (UUID text).
    #[arg(long, group = "field")]
    id: Option<String>,
    /// Recorded at or after this time (RFC 3339 UTC, or nanoseconds since the epoch).
    #[arg(long)]
    recorded_from: Option<String>,
    /// Recorded before this time.
    #[arg(long)]
    recorded_to: Option<String>,
    /// Happened (event time) at or after this time.
    #[arg(long)]
    happened_from: Option<String>,
    /// Happened before this time.
    #[arg(long)]
    happened_to: Option<String>,
    /// Look from this position on.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Print at most this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = EventFormat::Table)]
    format: EventFormat,
    /// Memory for the page of events being read, in MiB (a data directory; a server's pages
    /// are bounded by its frame size): the events are printed a page at a time, so that
    /// this bounds the memory whatever their number.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    buffer_mb: u64,
}

fn window(from: Option<&String>, to: Option<&String>) -> Result<Option<(u64, u64)>> {
    if from.is_none() && to.is_none() {
        return Ok(None);
    }
    let a = from
        .map(|s| parse_time(s))
        .transpose()?
        .unwrap_or(Timestamp(0));
    let b = to
        .map(|s| parse_time(s))
        .transpose()?
        .unwrap_or(Timestamp(u64::MAX));
    Ok(Some((a.0, b.0)))
}

/// Events asked for in one page.
const PAGE_EVENTS_MAX: u64 = 4096;

/// Prints the events one page at a time.
struct Printer<W: Write> {
    out: W,
    format: EventFormat,
    printed: u64,
    bar: indicatif::ProgressBar,
}

impl<W: Write> Printer<W> {
    fn header(&mut self) -> std::io::Result<()> {
        if self.format == EventFormat::Table {
            writeln!(
                self.out,
                "{:>10}  {:<24}  {:>7}  {:<20}  {:<30}  {:<30}  {:<12}  correlation",
                "position", "stream", "version", "type", "record time", "event time", "actor"
            )?;
        }
        Ok(())
    }

    fn event(&mut self, e: &dyn EventView) -> std::io::Result<()> {
        self.printed += 1;
        self.bar.inc(1);
        match self.format {
            EventFormat::Jsonl => {
                let v: Value =
                    envelope_json(e.position().0, e.version(), e.record_time(), &e.envelope());
                serde_json::to_writer(&mut self.out, &v).map_err(std::io::Error::from)?;
                writeln!(self.out)
            }
            EventFormat::Table => writeln!(
                self.out,
                "{:>10}  {:<24}  {:>7}  {:<20}  {:<30}  {:<30}  {:<12}  {}",
                e.position().0,
                e.stream(),
                e.version(),
                e.event_type(),
                rfc3339(e.record_time()),
                rfc3339(e.event_time()),
                if e.actor().is_empty() { "-" } else { e.actor() },
                e.correlation_id()
            ),
        }
    }
}

/// What a lookup through the attribute indexes does and does not prove.
pub const INDEX_NOTE: &str = "note: selected through the attribute indexes (derived data, not covered by the signed checkpoints): every event shown is checked against its record, but one a damaged index leaves out is missing; tally verify --attribute-indexes checks them";

/// Runs `tally find`.
pub fn find(a: &FindArgs) -> Result<ExitCode> {
    let field = [
        (Field::EventType, &a.event_type),
        (Field::Correlation, &a.correlation),
        (Field::Causation, &a.causation),
        (Field::Actor, &a.actor),
        (Field::EventId, &a.id),
    ]
    .into_iter()
    .find_map(|(f, v)| v.clone().map(|v| (f, v)));
    if let Some((f, v)) = &field
        && v.is_empty()
    {
        bail!("--{} needs a value: empty values are not indexed", f.name());
    }
    let recorded = window(a.recorded_from.as_ref(), a.recorded_to.as_ref())?;
    let happened = window(a.happened_from.as_ref(), a.happened_to.as_ref())?;
    let limit = a.limit.unwrap_or(u64::MAX);
    let page_bytes = usize::try_from(a.buffer_mb << 20).unwrap_or(usize::MAX);
    let mut p = Printer {
        out: std::io::BufWriter::new(std::io::stdout().lock()),
        format: event_format(a.format),
        printed: 0,
        bar: crate::support::output_progress(a.limit, "find"),
    };
    let printed = (|| -> Result<()> {
        p.header()?;
        match (&a.dir, &a.server) {
            (Some(dir), None) => {
                let log = open_read_only(dir)?;
                let mut from = a.from;
                while p.printed < limit {
                    let mut q = Query::all()
                        .positions(Position(from)..Position(u64::MAX))
                        .limit((limit - p.printed).min(PAGE_EVENTS_MAX) as usize)
                        .max_bytes(page_bytes);
                    q.field = field.as_ref().map(|(f, v)| (*f, v.as_str()));
                    q.record_time = recorded.map(|(x, y)| Timestamp(x)..Timestamp(y));
                    q.event_time = happened.map(|(x, y)| Timestamp(x)..Timestamp(y));
                    let page = log.find(&q)?;
                    for e in &page {
                        p.event(e)?;
                    }
                    // Each page's segment pages are let go of (a page is a few thousand
                    // events at most), so that resident memory stays bounded too.
                    log.release_mapped_memory()?;
                    // A page stops at its limit or its bytes; short of both, the lookup
                    // found everything there is.
                    let bytes: usize = page.iter().map(|e| e.body().len()).sum();
                    match page.last() {
                        Some(last) if page.len() == q.limit || bytes >= q.max_bytes => {
                            from = last.position.0 + 1;
                        }
                        _ => break,
                    }
                }
            }
            (None, Some(addr)) => {
                let rt = crate::commands::remote::runtime()?;
                rt.block_on(async {
                    let c = Client::connect(addr)
                        .await
                        .with_context(|| format!("connecting to {addr}"))?;
                    let mut q = FindQuery {
                        field: field.clone(),
                        record_time: recorded,
                        event_time: happened,
                        from: a.from,
                        max: 0,
                    };
                    while p.printed < limit {
                        q.max = (limit - p.printed).min(PAGE_EVENTS_MAX) as u32;
                        let (page, next, end) = c.find(&q).await?;
                        for e in &page {
                            p.event(e)?;
                        }
                        if end {
                            break;
                        }
                        if next <= q.from {
                            bail!("the server's FIND did not advance from position {}", q.from);
                        }
                        q.from = next;
                    }
                    anyhow::Ok(())
                })?;
            }
            _ => bail!("give a data directory or --server ADDR (one of them)"),
        }
        Ok(())
    })();
    let printed = printed.and_then(|()| p.out.flush().map_err(anyhow::Error::from));
    p.bar.finish_and_clear();
    match printed {
        Ok(()) => {
            // Every event printed was read from its record and matched against the query,
            // but one the index leaves out is not printed: say so where it cannot be missed
            // and does not spoil the data on stdout.
            eprintln!("{INDEX_NOTE}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if crate::support::is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}
