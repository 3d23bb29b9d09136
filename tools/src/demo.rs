//! `tally demo`: the engine end to end on an embedded data directory.
//!
//! Appends the lifecycle of a few trades (NEW, AMEND, CANCEL, NOVATE as one atomic
//! two-stream append, SETTLE, EXERCISE) with actors, correlation and causation ids, shows
//! optimistic concurrency refusing a stale write and a retried append being recognised,
//! reads every trade back, closes, reopens, and verifies the whole hash chain, every
//! checksum, the sealed segments' Merkle roots and the indexes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use tally_engine::format::proof::hex;
use tally_engine::{
    AppendRequest, Direction, Error, EventData, EventId, ExpectedVersion, Log, Options, Position,
    new_event_id,
};

/// Options of `tally demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// An empty or missing directory for the demo's log. Default: a new directory under the
    /// system's temporary directory (kept, so that it can be inspected).
    #[arg(long)]
    data: Option<PathBuf>,
}

struct Desk<'a> {
    log: &'a Log,
}

impl Desk<'_> {
    fn event(
        &self,
        kind: &str,
        json: String,
        actor: &str,
        corr: &str,
        cause: Option<EventId>,
    ) -> EventData {
        let mut e = EventData::json(kind, json)
            .with_id(new_event_id())
            .aggregate_type("Trade")
            .actor(actor)
            .correlation_id(corr);
        if let Some(c) = cause {
            e = e.causation_id(c.to_string());
        }
        e
    }

    fn append(
        &self,
        stream: &str,
        expected: ExpectedVersion,
        e: EventData,
    ) -> anyhow::Result<(EventId, u64)> {
        let id = e.event_id.context("demo events carry ids")?;
        let kind = e.event_type.clone();
        let r = self.log.append(stream, expected, &[e])?;
        println!(
            "  {:<9} {stream:<9} version {}  position {:>3}  ({})",
            kind,
            r.last_version,
            r.last_position,
            expected_text(expected)
        );
        Ok((id, r.last_version))
    }
}

fn expected_text(e: ExpectedVersion) -> String {
    match e {
        ExpectedVersion::Any => "any".into(),
        ExpectedVersion::NoStream => "new stream".into(),
        ExpectedVersion::StreamExists => "stream exists".into(),
        ExpectedVersion::Exact(n) => format!("expected version {n}"),
    }
}

fn trade(
    id: u32,
    book: &str,
    cpty: &str,
    instrument: &str,
    side: &str,
    qty: &str,
    px: &str,
) -> String {
    format!(
        r#"{{"trade_id":"{id}","book":"{book}","counterparty":"{cpty}","instrument":"{instrument}","side":"{side}","quantity":"{qty}","price":"{px}","trade_date":"2026-11-20","settlement_date":"2026-11-24"}}"#
    )
}

pub fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = match &args.data {
        Some(d) => {
            if d.exists() && std::fs::read_dir(d)?.next().is_some() {
                bail!(
                    "{} is not empty; the demo needs an empty or missing directory",
                    d.display()
                );
            }
            d.clone()
        }
        None => std::env::temp_dir().join(format!("tally-demo-{}", tally_engine::now().0)),
    };
    println!("Tally demo: data directory {}", dir.display());
    // Small segments, so that the demo log rolls and seals segments.
    let opts = || Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    };
    let log = Log::open(&dir, opts()).with_context(|| format!("opening {}", dir.display()))?;
    let desk = Desk { log: &log };

    println!("\n1. Trade lifecycle (each append is durable before it returns):");
    let (n1, v) = desk.append(
        "trade-1",
        ExpectedVersion::NoStream,
        desk.event(
            "NEW",
            trade(
                1,
                "RATES-LDN",
                "ACME BANK",
                "EUR 5Y IRS",
                "BUY",
                "10000000",
                "2.315",
            ),
            "alice",
            "deal-1",
            None,
        ),
    )?;
    let (a1, v) = desk.append(
        "trade-1",
        ExpectedVersion::Exact(v),
        desk.event(
            "AMEND",
            r#"{"trade_id":"1","quantity":"12000000","reason":"client call 09:14"}"#.into(),
            "alice",
            "deal-1",
            Some(n1),
        ),
    )?;
    let (n2, v2) = desk.append(
        "trade-2",
        ExpectedVersion::NoStream,
        desk.event(
            "NEW",
            trade(
                2,
                "FX-NY",
                "GLOBEX",
                "EURUSD 3M FWD",
                "SELL",
                "5000000",
                "1.0842",
            ),
            "bob",
            "deal-2",
            None,
        ),
    )?;
    desk.append(
        "trade-2",
        ExpectedVersion::Exact(v2),
        desk.event(
            "CANCEL",
            r#"{"trade_id":"2","reason":"booked twice"}"#.into(),
            "bob",
            "deal-2",
            Some(n2),
        ),
    )?;
    let (n3, v3) = desk.append(
        "trade-3",
        ExpectedVersion::NoStream,
        desk.event(
            "NEW",
            trade(
                3,
                "CREDIT-LDN",
                "INITECH",
                "ITRAXX MAIN S46",
                "BUY",
                "25000000",
                "61.5",
            ),
            "carol",
            "deal-3",
            None,
        ),
    )?;
    let (n4, v4) = desk.append(
        "trade-4",
        ExpectedVersion::NoStream,
        desk.event(
            "NEW",
            trade(
                4,
                "EQD-PAR",
                "HOOLI",
                "SX5E DEC26 5000 C",
                "BUY",
                "100",
                "142.0",
            ),
            "dave",
            "deal-4",
            None,
        ),
    )?;

    // Novation: trade-3 is closed and trade-5 opened with the new counterparty, atomically.
    let novated = desk.event(
        "NOVATE",
        r#"{"trade_id":"3","new_counterparty":"UMBRELLA CCP","new_trade_id":"5"}"#.into(),
        "erin",
        "deal-3",
        Some(n3),
    );
    let opened = desk.event(
        "NEW",
        trade(
            5,
            "CREDIT-LDN",
            "UMBRELLA CCP",
            "ITRAXX MAIN S46",
            "BUY",
            "25000000",
            "61.5",
        ),
        "erin",
        "deal-3",
        novated.event_id,
    );
    let rs = log.append_multi(&[
        AppendRequest {
            stream: "trade-3",
            expected: ExpectedVersion::Exact(v3),
            events: std::slice::from_ref(&novated),
        },
        AppendRequest {
            stream: "trade-5",
            expected: ExpectedVersion::NoStream,
            events: std::slice::from_ref(&opened),
        },
    ])?;
    println!(
        "  NOVATE    trade-3 -> trade-5, one atomic batch at positions {}..={}",
        rs[0].first_position, rs[1].last_position
    );
    desk.append(
        "trade-1",
        ExpectedVersion::Exact(v),
        desk.event(
            "SETTLE",
            r#"{"trade_id":"1","settled_amount":"12000000","currency":"EUR"}"#.into(),
            "ops-bot",
            "deal-1",
            Some(a1),
        ),
    )?;
    desk.append(
        "trade-4",
        ExpectedVersion::Exact(v4),
        desk.event(
            "EXERCISE",
            r#"{"trade_id":"4","exercised_quantity":"100","underlying_price":"5150.0"}"#.into(),
            "dave",
            "deal-4",
            Some(n4),
        ),
    )?;

    println!("\n2. Optimistic concurrency and idempotency:");
    let stale = desk.event(
        "AMEND",
        r#"{"trade_id":"1","quantity":"1"}"#.into(),
        "mallory",
        "deal-1",
        None,
    );
    match log.append("trade-1", ExpectedVersion::Exact(0), &[stale]) {
        Err(Error::WrongExpectedVersion { actual, .. }) => {
            println!(
                "  a stale AMEND expecting version 0 is refused: trade-1 is at version {actual:?}"
            );
        }
        other => bail!("a stale append was not refused: {other:?}"),
    }
    let retry = log.append(
        "trade-5",
        ExpectedVersion::NoStream,
        std::slice::from_ref(&opened),
    )?;
    println!(
        "  resending trade-5's NEW (same event id) returns the original position {} and writes nothing",
        retry.first_position
    );

    // Some volume, so that segments roll and get sealed.
    for i in 0..400u32 {
        let t = 100 + i % 40;
        let e = EventData::json(
            "PRICE",
            format!(
                r#"{{"trade_id":"{t}","mark":"{}.{:02}"}}"#,
                100 + i % 7,
                i % 100
            ),
        )
        .aggregate_type("Trade")
        .actor("pricing-engine");
        log.append(&format!("trade-{t}"), ExpectedVersion::Any, &[e])?;
    }
    log.wait_sealed()?;

    println!("\n3. Reading the trades back:");
    for stream in ["trade-1", "trade-2", "trade-3", "trade-4", "trade-5"] {
        for e in log.read_stream(stream, 0, 100, Direction::Forward)? {
            println!(
                "  {stream} v{} {:<9} by {:<7} corr {:<7} pos {:>3} hash {}..",
                e.version,
                e.event_type(),
                e.actor(),
                e.correlation_id(),
                e.position,
                &hex(&e.record_hash)[..16]
            );
        }
    }
    let next = log.next_position();
    log.close()?;

    println!("\n4. Reopening:");
    let log = Log::open(&dir, opts())?;
    let report = log.recovery_report();
    println!(
        "  clean close: {}, records scanned: {}, next position: {} (was {next})",
        report.clean, report.records_scanned, report.next_position
    );
    if report.next_position != next {
        bail!(
            "reopened log ends at {}, expected {next}",
            report.next_position
        );
    }
    let back = log.read_stream("trade-1", 0, 10, Direction::Forward)?;
    let kinds: Vec<&str> = back.iter().map(|e| e.event_type()).collect();
    println!("  trade-1 after reopen: {}", kinds.join(" -> "));

    println!("\n5. Verifying (plain reads of every byte):");
    let v = log.verify()?;
    println!(
        "  {} segments, {} records, {} bytes: checksums, hash chain, Merkle roots and indexes OK",
        v.segments, v.records, v.bytes
    );
    println!("  chain head {}", hex(&v.last_chain_hash));
    for s in log.segments() {
        println!(
            "  segment {:>2}  first position {:>4}  records {:>4}  {}",
            s.seq,
            s.base_position,
            s.record_count,
            s.merkle_root.map_or("active".to_owned(), |r| format!(
                "sealed, Merkle root {}..",
                &hex(&r)[..16]
            ))
        );
    }
    let all = log.read_all(Position(0), usize::MAX, Direction::Forward)?;
    if all.len() as u64 != next.0 {
        bail!(
            "read_all returned {} records, expected {}",
            all.len(),
            next.0
        );
    }
    log.close()?;
    println!("\nDone. The log is kept in {}", dir.display());
    Ok(ExitCode::SUCCESS)
}
