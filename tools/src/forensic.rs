//! `tally audit`: the forensic view of one stream (one trade): every event with who
//! (actor), what (type and payload), when (record and event time) and why (its causation
//! chain back to the origin, and the events of other streams that share its correlation
//! id).
//!
//! Until the log has correlation and causation indexes (issue 5), the command reads the
//! whole log once to resolve causation ids and correlation ids: its cost is proportional
//! to the log, not to the answer.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tally_engine::{Direction, EventId, EventView, Position};
use tally_server::client::Client;
use tally_server::protocol::Filter;

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
    event_id: EventId,
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
        event_id: e.event_id(),
        correlation_id: e.correlation_id().to_owned(),
        causation_id: e.causation_id().to_owned(),
        record_time: rfc3339(e.record_time()),
        event_time: rfc3339(e.event_time()),
    }
}

/// Every event of the log, in order (`$` streams excepted).
fn all_events(a: &AuditArgs) -> Result<Vec<Ev>> {
    let mut out = Vec::new();
    match (&a.dir, &a.server) {
        (Some(dir), None) => {
            let log = open_read_only(dir)?;
            let mut next = 0u64;
            loop {
                let page = log.read_all(Position(next), 4096, Direction::Forward)?;
                let Some(last) = page.last() else { break };
                next = last.position.0 + 1;
                out.extend(
                    page.iter()
                        .filter(|e| !e.stream().starts_with('$'))
                        .map(|e| owned(e)),
                );
            }
        }
        (None, Some(addr)) => {
            let rt = crate::remote::runtime()?;
            rt.block_on(async {
                let c = Client::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                let mut next = 0u64;
                loop {
                    let (page, n, end) = c
                        .read_all(next, 4096, Direction::Forward, &Filter::default())
                        .await?;
                    out.extend(
                        page.iter()
                            .filter(|e| !e.stream().starts_with('$'))
                            .map(|e| owned(e)),
                    );
                    next = n;
                    if end {
                        break;
                    }
                }
                anyhow::Ok(())
            })?;
        }
        _ => bail!("give a data directory or --server ADDR (one of them)"),
    }
    Ok(out)
}

pub fn audit(a: &AuditArgs) -> Result<ExitCode> {
    let events = all_events(a)?;
    let by_id: HashMap<EventId, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.event_id, i))
        .collect();
    let mut by_correlation: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, e) in events.iter().enumerate() {
        if !e.correlation_id.is_empty() {
            by_correlation
                .entry(e.correlation_id.as_str())
                .or_default()
                .push(i);
        }
    }
    let mine: Vec<usize> = (0..events.len())
        .filter(|&i| events[i].stream == a.stream)
        .collect();
    if mine.is_empty() {
        bail!("stream {} has no events", a.stream);
    }
    let mut report = Vec::new();
    for &i in &mine {
        let e = &events[i];
        // Why: follow causation ids back to the origin (bounded, and cycle-safe).
        let mut chain = Vec::new();
        let mut cause = e.causation_id.clone();
        let mut unresolved = None;
        while !cause.is_empty() && chain.len() < 64 {
            match cause.parse::<EventId>().ok().and_then(|id| by_id.get(&id)) {
                Some(&j) if !chain.contains(&j) && j != i => {
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
        let related: Vec<usize> = by_correlation
            .get(e.correlation_id.as_str())
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
            json!({"stream": a.stream, "events": items, "log_events_read": events.len()})
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("stream {}: {} events", a.stream, mine.len());
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
