//! `tally audit`: the forensic view of one stream (one trade): every event with who
//! (actor), what (type and payload), when (record and event time) and why (its causation
//! chain back to the origin, and the events of other streams that share its correlation
//! id).
//!
//! It reads the stream, then looks up each correlation id and each cause (an event id)
//! through the attribute indexes, locally or with the server's FIND: its cost is
//! proportional to the answer, not to the log.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tally_engine::{Direction, EventId, EventView, Field, Query};
use tally_server::client::Client;
use tally_server::protocol::FindQuery;

use crate::ops::{envelope_json, open_read_only, rfc3339};

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
    /// Print one JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// An event, owned, with what the audit needs.
#[derive(Clone, Debug)]
struct Ev {
    json: Value,
    position: u64,
    version: u64,
    stream: String,
    event_type: String,
    actor: String,
    correlation_id: String,
    causation_id: String,
    record_time: String,
    event_time: String,
}

fn owned(e: &dyn EventView) -> Ev {
    let env = e.envelope();
    Ev {
        json: envelope_json(e.position().0, e.version(), e.record_time(), &env),
        position: e.position().0,
        version: e.version(),
        stream: e.stream().to_owned(),
        event_type: e.event_type().to_owned(),
        actor: e.actor().to_owned(),
        correlation_id: e.correlation_id().to_owned(),
        causation_id: e.causation_id().to_owned(),
        record_time: rfc3339(e.record_time()),
        event_time: rfc3339(e.event_time()),
    }
}

/// Where the audit reads: a data directory (read-only) or a server, through the attribute
/// indexes either way.
enum Source {
    Local(tally_engine::Log),
    Remote {
        rt: tokio::runtime::Runtime,
        client: Client,
    },
}

/// Pages a FIND through the server until its end.
async fn find_all(c: &Client, mut q: FindQuery) -> Result<Vec<Ev>> {
    let mut out = Vec::new();
    loop {
        let (page, next, end) = c.find(&q).await?;
        out.extend(page.iter().map(|e| owned(e)));
        if end {
            return Ok(out);
        }
        if next <= q.from {
            bail!("the server's FIND did not advance from position {}", q.from);
        }
        q.from = next;
    }
}

impl Source {
    fn open(a: &AuditArgs) -> Result<Source> {
        match (&a.dir, &a.server) {
            (Some(dir), None) => Ok(Source::Local(open_read_only(dir)?)),
            (None, Some(addr)) => {
                let rt = crate::remote::runtime()?;
                let client = rt.block_on(async {
                    Client::connect(addr)
                        .await
                        .with_context(|| format!("connecting to {addr}"))
                })?;
                Ok(Source::Remote { rt, client })
            }
            _ => bail!("give a data directory or --server ADDR (one of them)"),
        }
    }

    /// Every event of `stream`, in order.
    fn stream(&self, stream: &str) -> Result<Vec<Ev>> {
        let mut out = Vec::new();
        match self {
            Source::Local(log) => {
                let mut next = 0u64;
                loop {
                    let page = log.read_stream(stream, next, 4096, Direction::Forward)?;
                    let Some(last) = page.last() else { break };
                    next = last.version + 1;
                    out.extend(page.iter().map(|e| owned(e)));
                }
            }
            Source::Remote { rt, client } => rt.block_on(async {
                let mut next = 0u64;
                loop {
                    let (page, n, end) = client
                        .read_stream(stream, next, 4096, Direction::Forward)
                        .await?;
                    out.extend(page.iter().map(|e| owned(e)));
                    next = n;
                    if end {
                        break;
                    }
                }
                anyhow::Ok(())
            })?,
        }
        Ok(out)
    }

    /// The events whose `field` is `value`, in order.
    fn find(&self, field: Field, value: &str) -> Result<Vec<Ev>> {
        match self {
            Source::Local(log) => Ok(log
                .find(&Query::field(field, value))?
                .iter()
                .map(|e| owned(e))
                .collect()),
            Source::Remote { rt, client } => rt.block_on(find_all(
                client,
                FindQuery {
                    field: Some((field, value.to_owned())),
                    record_time: None,
                    event_time: None,
                    from: 0,
                    max: 4096,
                },
            )),
        }
    }
}

pub fn audit(a: &AuditArgs) -> Result<ExitCode> {
    let source = Source::open(a)?;
    // Every event read is kept here once, by position; the report refers to them by index.
    let mut events: Vec<Ev> = Vec::new();
    let mut at: HashMap<u64, usize> = HashMap::new();
    let mut keep = |events: &mut Vec<Ev>, e: Ev| -> usize {
        *at.entry(e.position).or_insert_with(|| {
            events.push(e);
            events.len() - 1
        })
    };
    let mine: Vec<usize> = source
        .stream(&a.stream)?
        .into_iter()
        .map(|e| keep(&mut events, e))
        .collect();
    if mine.is_empty() {
        bail!("stream {} has no events", a.stream);
    }
    let mut read = mine.len();
    // Looked up once each: correlation ids shared by several events of the stream, and
    // causes shared by several chains.
    let mut correlated: HashMap<String, Vec<usize>> = HashMap::new();
    let mut causes: HashMap<String, Option<usize>> = HashMap::new();
    for &i in &mine {
        let c = events[i].correlation_id.clone();
        if !c.is_empty() && !correlated.contains_key(&c) {
            let found = source.find(Field::Correlation, &c)?;
            read += found.len();
            let ids = found
                .into_iter()
                .filter(|e| !e.stream.starts_with('$'))
                .map(|e| keep(&mut events, e))
                .collect();
            correlated.insert(c, ids);
        }
    }
    let mut report = Vec::new();
    for &i in &mine {
        // Why: follow causation ids back to the origin (bounded, and cycle-safe). A cause
        // is the event id of the event that caused this one.
        let mut chain = Vec::new();
        let mut cause = events[i].causation_id.clone();
        let mut unresolved = None;
        while !cause.is_empty() && chain.len() < 64 {
            let found = match causes.get(&cause) {
                Some(found) => *found,
                None => {
                    let found = if cause.parse::<EventId>().is_ok() {
                        let hits = source.find(Field::EventId, &cause)?;
                        read += hits.len();
                        hits.into_iter().next().map(|e| keep(&mut events, e))
                    } else {
                        None
                    };
                    causes.insert(cause.clone(), found);
                    found
                }
            };
            match found {
                Some(j) if !chain.contains(&j) && j != i => {
                    chain.push(j);
                    cause = events[j].causation_id.clone();
                }
                Some(_) => break,
                None => {
                    unresolved = Some(cause.clone());
                    break;
                }
            }
        }
        let related: Vec<usize> = correlated
            .get(events[i].correlation_id.as_str())
            .map(|v| v.iter().copied().filter(|&j| j != i).collect())
            .unwrap_or_default();
        report.push((i, chain, unresolved, related));
    }
    if a.json {
        let items: Vec<Value> = report
            .iter()
            .map(|(i, chain, unresolved, related)| {
                let e = &events[*i];
                json!({
                    "event": e.json,
                    "why": {
                        "causation_chain": chain.iter().map(|&j| events[j].json.clone()).collect::<Vec<_>>(),
                        "unresolved_cause": unresolved,
                        "correlated": related.iter().map(|&j| json!({
                            "position": events[j].position,
                            "stream": events[j].stream,
                            "version": events[j].version,
                            "type": events[j].event_type,
                            "actor": events[j].actor,
                            "record_time": events[j].record_time,
                        })).collect::<Vec<_>>(),
                    },
                })
            })
            .collect();
        println!(
            "{}",
            json!({"stream": a.stream, "events": items, "events_read": read, "lookups": crate::find::INDEX_NOTE})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("stream {}: {} events", a.stream, mine.len());
    println!("{}", crate::find::INDEX_NOTE);
    for (i, chain, unresolved, related) in &report {
        let e = &events[*i];
        println!(
            "v{:<4} {:<14} by {:<12} recorded {} (happened {})  position {}",
            e.version,
            e.event_type,
            if e.actor.is_empty() { "-" } else { &e.actor },
            e.record_time,
            e.event_time,
            e.position
        );
        println!("      what: {}", e.json["payload"]);
        for &j in chain {
            let c = &events[j];
            println!(
                "      because: {} {} v{} by {} at {}",
                c.event_type,
                c.stream,
                c.version,
                if c.actor.is_empty() { "-" } else { &c.actor },
                c.record_time
            );
        }
        if let Some(u) = unresolved {
            println!("      because: event {u} (not in this log)");
        }
        if !related.is_empty() {
            let list: Vec<String> = related
                .iter()
                .take(8)
                .map(|&j| format!("{} {}", events[j].stream, events[j].event_type))
                .collect();
            println!(
                "      correlated ({} {}): {}{}",
                related.len(),
                e.correlation_id,
                list.join(", "),
                if related.len() > 8 { ", ..." } else { "" }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
