//! `tally audit`: the forensic view of one stream (one trade): every event with who
//! (actor), what (type and payload), when (record and event time) and why (its causation
//! chain back to the origin, and the events of other streams that share its correlation
//! id).
//!
//! It reads the stream a page at a time and prints each event's entry as soon as it is
//! complete (the JSON document is written element by element), so that its memory does not
//! grow with the stream. Correlation ids and causes (event ids) are looked up through the
//! attribute indexes, locally or with the server's FIND, and the answers are kept in
//! caches bounded in bytes ([`cache::Lru`]) for the events that share them: the cost is
//! proportional to the answer, not to the log. A correlation id shared by many events is
//! counted in full once, but only its first `--correlated-max` events are kept and listed
//! (each entry states the count).
//!
//! Memory: `--buffer-mb` (64 by default) is split into a quarter for a page of events being
//! read, a quarter each for the two caches, and a quarter for the entry being written
//! (its causation chain holds at most [`CHAIN_MAX`] events).

mod cache;
mod source;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;
use serde_json::Value;
use tally_engine::{EventId, EventView, Field};

use crate::support::{envelope_json, json_output, rfc3339};
use cache::Lru;
use source::Source;

/// Causes followed back from one event, at most.
const CHAIN_MAX: usize = 64;
/// Bytes counted for a kept event summary besides its text.
const KEPT_OVERHEAD_BYTES: usize = 64;

/// Options of `tally audit`.
#[derive(Args, Debug)]
pub struct AuditArgs {
    /// Data directory (opened read-only). Not with --server.
    dir: Option<PathBuf>,
    /// The stream to explain, for example `trade-42`.
    #[arg(long)]
    stream: String,
    /// Ask a running server instead of reading a data directory.
    #[arg(long)]
    server: Option<String>,
    /// Memory for the events being read and the lookups remembered, in MiB: the audit stays
    /// within about this much whatever the length of the stream.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    buffer_mb: u64,
    /// Correlated events listed per event, at most (their count is always given).
    #[arg(long, default_value_t = 20)]
    correlated_max: usize,
}

/// An event of another stream that shares a correlation id, as an entry lists it.
struct Related {
    position: u64,
    /// Its summary as JSON.
    json: String,
    /// `stream type`, for the table.
    label: String,
}

/// The summary's JSON form.
#[derive(Serialize)]
struct RelatedJson<'a> {
    position: u64,
    stream: &'a str,
    version: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    actor: &'a str,
    record_time: String,
}

impl Related {
    fn of(e: &dyn EventView) -> Related {
        let json = serde_json::to_string(&RelatedJson {
            position: e.position().0,
            stream: e.stream(),
            version: e.version(),
            event_type: e.event_type(),
            actor: e.actor(),
            record_time: rfc3339(e.record_time()),
        })
        .expect("a struct of strings and numbers serializes");
        Related {
            position: e.position().0,
            json,
            label: format!("{} {}", e.stream(), e.event_type()),
        }
    }

    fn bytes(&self) -> usize {
        KEPT_OVERHEAD_BYTES + self.json.len() + self.label.len()
    }
}

/// The events that share one correlation id (outside `$` streams).
struct Correlated {
    /// How many there are.
    count: u64,
    /// The first `correlated_max + 1` of them, in position order (one more than listed, in
    /// case the event explained is among them).
    first: Vec<Related>,
}

impl Correlated {
    fn bytes(&self) -> usize {
        KEPT_OVERHEAD_BYTES + self.first.iter().map(Related::bytes).sum::<usize>()
    }
}

/// An event that caused another, as a causation chain shows it.
struct Cause {
    position: u64,
    /// What caused it in turn.
    causation_id: String,
    /// The whole event as JSON.
    json: String,
    /// `type stream vN by actor at time`, for the table.
    line: String,
}

impl Cause {
    fn of(e: &dyn EventView) -> Cause {
        let json = envelope_json(e.position().0, e.version(), e.record_time(), &e.envelope());
        Cause {
            position: e.position().0,
            causation_id: e.causation_id().to_owned(),
            json: json.to_string(),
            line: format!(
                "{} {} v{} by {} at {}",
                e.event_type(),
                e.stream(),
                e.version(),
                or_dash(e.actor()),
                rfc3339(e.record_time())
            ),
        }
    }

    fn bytes(&self) -> usize {
        KEPT_OVERHEAD_BYTES + self.causation_id.len() + self.json.len() + self.line.len()
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// What the audit reads and remembers.
struct Audit {
    source: Source,
    /// Correlation id → its events.
    correlations: Lru<Rc<Correlated>>,
    /// Cause (an event id, or any text) → the event, or `None` when not in the log.
    causes: Lru<Option<Rc<Cause>>>,
    correlated_max: usize,
    bar: indicatif::ProgressBar,
}

impl Audit {
    /// The events with correlation id `id`: counted in full, the first few kept.
    fn correlated(&mut self, id: &str) -> Result<Rc<Correlated>> {
        if let Some(c) = self.correlations.get(id) {
            return Ok(c);
        }
        let mut c = Correlated {
            count: 0,
            first: Vec::new(),
        };
        let mut from = 0;
        loop {
            let page = self.source.find_page(Field::Correlation, id, from)?;
            for e in &page.events {
                if e.stream().starts_with('$') {
                    continue;
                }
                c.count += 1;
                if c.first.len() <= self.correlated_max {
                    c.first.push(Related::of(&**e));
                }
            }
            if page.end {
                break;
            }
            self.bar
                .set_message(format!("audit: {} events of correlation {id}", c.count));
            from = page.next;
        }
        self.bar.set_message("audit");
        let bytes = c.bytes();
        let c = Rc::new(c);
        self.correlations
            .insert(id.to_owned(), Rc::clone(&c), bytes);
        Ok(c)
    }

    /// The event whose id is `id`, if the log has it.
    fn cause(&mut self, id: &str) -> Result<Option<Rc<Cause>>> {
        if let Some(c) = self.causes.get(id) {
            return Ok(c);
        }
        let found = match id.parse::<EventId>() {
            Ok(_) => {
                let page = self.source.find_page(Field::EventId, id, 0)?;
                page.events.first().map(|e| Rc::new(Cause::of(&**e)))
            }
            Err(_) => None,
        };
        let bytes = found.as_ref().map_or(0, |c| c.bytes());
        self.causes.insert(id.to_owned(), found.clone(), bytes);
        Ok(found)
    }

    /// Why `e` happened: its causes back to the origin (bounded, and cycle-safe; a cause is
    /// the event id of the event that caused this one) and its correlated events.
    fn explain<'e>(&mut self, e: &'e dyn EventView) -> Result<Entry<'e>> {
        let mut chain: Vec<Rc<Cause>> = Vec::new();
        let mut cause = e.causation_id().to_owned();
        let mut unresolved = None;
        while !cause.is_empty() && chain.len() < CHAIN_MAX {
            match self.cause(&cause)? {
                Some(c)
                    if c.position != e.position().0
                        && !chain.iter().any(|x| x.position == c.position) =>
                {
                    cause.clone_from(&c.causation_id);
                    chain.push(c);
                }
                Some(_) => break,
                None => {
                    unresolved = Some(cause);
                    break;
                }
            }
        }
        let correlated = match e.correlation_id() {
            "" => None,
            id => Some(self.correlated(id)?),
        };
        Ok(Entry {
            e,
            json: envelope_json(e.position().0, e.version(), e.record_time(), &e.envelope()),
            chain,
            unresolved,
            correlated,
        })
    }
}

/// One event of the stream and why it happened: the report's unit, written as soon as it
/// is complete.
struct Entry<'e> {
    e: &'e dyn EventView,
    /// The whole event as JSON.
    json: Value,
    chain: Vec<Rc<Cause>>,
    unresolved: Option<String>,
    correlated: Option<Rc<Correlated>>,
}

impl Entry<'_> {
    /// The correlated events listed (not the event itself), and how many there are in all.
    fn related(&self, max: usize) -> (Vec<&Related>, u64) {
        let Some(c) = &self.correlated else {
            return (Vec::new(), 0);
        };
        let me = self.e.position().0;
        let listed = c.first.iter().filter(|r| r.position != me).take(max);
        // The event itself is among the events counted unless its stream is a `$` one.
        let itself = u64::from(!self.e.stream().starts_with('$'));
        (listed.collect(), c.count.saturating_sub(itself))
    }

    fn write_json(&self, out: &mut impl Write, max: usize) -> std::io::Result<()> {
        out.write_all(b"{\"event\":")?;
        serde_json::to_writer(&mut *out, &self.json)?;
        out.write_all(b",\"why\":{\"causation_chain\":[")?;
        for (k, c) in self.chain.iter().enumerate() {
            if k > 0 {
                out.write_all(b",")?;
            }
            out.write_all(c.json.as_bytes())?;
        }
        out.write_all(b"],\"unresolved_cause\":")?;
        serde_json::to_writer(&mut *out, &self.unresolved)?;
        out.write_all(b",\"correlated\":[")?;
        let (listed, count) = self.related(max);
        for (k, r) in listed.iter().enumerate() {
            if k > 0 {
                out.write_all(b",")?;
            }
            out.write_all(r.json.as_bytes())?;
        }
        write!(out, "],\"correlated_count\":{count}}}}}")
    }

    fn write_table(&self, out: &mut impl Write, max: usize) -> std::io::Result<()> {
        let e = self.e;
        writeln!(
            out,
            "v{:<4} {:<14} by {:<12} recorded {} (happened {})  position {}",
            e.version(),
            e.event_type(),
            or_dash(e.actor()),
            rfc3339(e.record_time()),
            rfc3339(e.event_time()),
            e.position().0
        )?;
        writeln!(out, "      what: {}", self.json["payload"])?;
        for c in &self.chain {
            writeln!(out, "      because: {}", c.line)?;
        }
        if let Some(u) = &self.unresolved {
            writeln!(out, "      because: event {u} (not in this log)")?;
        }
        let (listed, count) = self.related(max);
        if count > 0 {
            let list: Vec<&str> = listed.iter().map(|r| r.label.as_str()).collect();
            let more = match count > listed.len() as u64 {
                true => format!(", ... (first {} of {count} listed)", listed.len()),
                false => String::new(),
            };
            writeln!(
                out,
                "      correlated ({count} {}): {}{more}",
                e.correlation_id(),
                list.join(", "),
            )?;
        }
        Ok(())
    }
}

/// Runs `tally audit`.
pub fn audit(a: &AuditArgs) -> Result<ExitCode> {
    let buffer_bytes = usize::try_from(a.buffer_mb << 20).unwrap_or(usize::MAX);
    let quarter = buffer_bytes / 4;
    let source = Source::open(a.dir.as_deref(), a.server.as_deref(), quarter)?;
    // The versions up to the head now: a stream that grows on a server while it is read
    // is explained as it was when the audit started.
    let Some(head) = source.stream_head(&a.stream)? else {
        bail!("stream {} has no events", a.stream);
    };
    let mut audit = Audit {
        source,
        correlations: Lru::new(quarter),
        causes: Lru::new(quarter),
        correlated_max: a.correlated_max,
        bar: crate::support::output_progress(head.checked_add(1), "audit"),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = (|| -> Result<()> {
        if json_output() {
            out.write_all(b"{\"stream\":")?;
            serde_json::to_writer(&mut out, &a.stream)?;
            out.write_all(b",\"events\":[")?;
        } else {
            writeln!(out, "stream {}: last version {head}", a.stream)?;
            writeln!(out, "{}", crate::commands::find::INDEX_NOTE)?;
        }
        let mut explained = 0u64;
        let mut from = 0;
        'pages: loop {
            let page = audit.source.stream_page(&a.stream, from)?;
            for e in &page.events {
                if e.version() > head {
                    break 'pages;
                }
                let entry = audit.explain(&**e)?;
                if json_output() {
                    if explained > 0 {
                        out.write_all(b",")?;
                    }
                    entry.write_json(&mut out, a.correlated_max)?;
                } else {
                    entry.write_table(&mut out, a.correlated_max)?;
                }
                explained += 1;
                audit.bar.inc(1);
            }
            if page.end || page.next > head {
                break;
            }
            from = page.next;
        }
        let read = audit.source.events_read;
        if json_output() {
            write!(out, "],\"events_read\":{read},\"lookups\":")?;
            serde_json::to_writer(&mut out, crate::commands::find::INDEX_NOTE)?;
            writeln!(out, ",\"correlated_max\":{}}}", a.correlated_max)?;
        } else {
            writeln!(out, "{explained} events explained, {read} events read")?;
        }
        out.flush()?;
        Ok(())
    })();
    audit.bar.finish_and_clear();
    match written {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if crate::support::is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(e),
    }
}
