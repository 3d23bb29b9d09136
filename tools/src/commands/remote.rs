//! `tally append | read | tail | info --server ADDR`: the client side of the tool, through
//! the `tally-server` client library.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::{Value, json};
use tally_engine::{Direction, EventData, EventView, ExpectedVersion};
use tally_server::client::{Client, SubscriptionItem};
use tally_server::protocol::{Event, Filter, SubscribeFrom, SubscribeTarget};

use crate::support::{envelope_json, json_output, rfc3339};

/// The server to talk to.
#[derive(Args, Debug, Clone)]
pub struct ServerArg {
    /// The server's address, `host:port`.
    #[arg(long, env = "TALLY_SERVER", default_value = "127.0.0.1:7878")]
    pub server: String,
}

/// Options of `tally append`.
#[derive(Args, Debug)]
pub struct AppendArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The stream.
    stream: String,
    /// The event type.
    #[arg(long = "type")]
    event_type: String,
    /// The payload, as JSON.
    #[arg(long)]
    data: String,
    /// Append only if the stream's last version is N (`-1`: only if the stream is new).
    #[arg(long, allow_negative_numbers = true)]
    expected_version: Option<i64>,
    /// Aggregate type.
    #[arg(long, default_value = "")]
    aggregate_type: String,
    /// Who is appending.
    #[arg(long, default_value = "")]
    actor: String,
    /// Correlation id.
    #[arg(long, default_value = "")]
    correlation_id: String,
    /// Causation id.
    #[arg(long, default_value = "")]
    causation_id: String,
    /// Schema version of the payload.
    #[arg(long, default_value_t = 1)]
    schema_version: u32,
    /// Sign the batch with this producer key file (a key file as `tally keygen` makes);
    /// the log must have the key registered (`tally producer register`).
    #[arg(long, value_name = "FILE")]
    sign_key: Option<std::path::PathBuf>,
}

/// Options of `tally read`.
#[derive(Args, Debug)]
pub struct ReadArgs {
    #[command(flatten)]
    server: ServerArg,
    /// The stream.
    stream: String,
    /// First version.
    #[arg(long, default_value_t = 0)]
    from: u64,
    /// Most events to print.
    #[arg(long, default_value_t = u64::MAX)]
    limit: u64,
    /// Newest first.
    #[arg(long)]
    backward: bool,
}

/// Options of `tally tail`.
#[derive(Args, Debug)]
pub struct TailArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Follow one stream instead of the whole log.
    #[arg(long)]
    stream: Option<String>,
    /// Start at this position (this version with --stream) instead of now.
    #[arg(long)]
    from: Option<u64>,
    /// Only streams starting with this (whole log only).
    #[arg(long)]
    prefix: Option<String>,
    /// Only these event types (whole log only; repeat the flag).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
}

/// Options of `tally info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Also show this stream's facts.
    #[arg(long)]
    stream: Option<String>,
}

/// A current-thread runtime: the tool's commands are one conversation each.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn connect_arg(s: &ServerArg) -> Result<Client> {
    connect(&s.server).await
}

/// Connects to a running tallyd.
pub async fn connect(addr: &str) -> Result<Client> {
    Client::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// Runs `f` to completion on a current-thread runtime.
pub fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    runtime()?.block_on(f)
}

fn expected(v: Option<i64>) -> Result<ExpectedVersion> {
    Ok(match v {
        None => ExpectedVersion::Any,
        Some(-1) => ExpectedVersion::NoStream,
        Some(n) if n >= 0 => ExpectedVersion::Exact(n as u64),
        Some(n) => bail!("--expected-version must be -1 (new stream) or a version, not {n}"),
    })
}

pub fn append(a: &AppendArgs) -> Result<ExitCode> {
    serde_json::from_str::<Value>(&a.data).context("--data is not valid JSON")?;
    let ev = EventData::json(&a.event_type, a.data.clone())
        .aggregate_type(&a.aggregate_type)
        .actor(&a.actor)
        .correlation_id(&a.correlation_id)
        .causation_id(&a.causation_id)
        .schema_version(a.schema_version);
    let expected = expected(a.expected_version)?;
    runtime()?.block_on(async {
        let c = connect_arg(&a.server).await?;
        let r = match &a.sign_key {
            Some(path) => {
                let key = crate::support::read_secret_key(path)?;
                c.append_signed(vec![(a.stream.clone(), expected, vec![ev])], &key)
                    .await?
                    .remove(0)
            }
            None => c.append(&a.stream, expected, vec![ev]).await?,
        };
        println!(
            "{}",
            json!({
                "stream": a.stream,
                "position": r.first_position.0,
                "version": r.last_version,
            })
        );
        Ok(ExitCode::SUCCESS)
    })
}

pub fn event_value(e: &Event) -> Value {
    envelope_json(
        e.position.0,
        e.version,
        e.record_time,
        &EventView::envelope(e),
    )
}

fn print_event(e: &Event, as_json: bool) {
    if as_json {
        println!("{}", event_value(e));
    } else {
        let payload = String::from_utf8_lossy(e.payload());
        let shown: String = payload.chars().take(80).collect();
        println!(
            "{:>10} {:<24} v{:<6} {:<20} {} {}",
            e.position.0,
            e.stream(),
            e.version,
            e.event_type(),
            rfc3339(e.record_time),
            shown
        );
    }
}

pub fn read(a: &ReadArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let c = connect_arg(&a.server).await?;
        let direction = if a.backward {
            Direction::Backward
        } else {
            Direction::Forward
        };
        let mut from = if a.backward && a.from == 0 {
            u64::MAX
        } else {
            a.from
        };
        let mut left = a.limit;
        while left > 0 {
            let (events, next, end) = c
                .read_stream(&a.stream, from, left.min(4096) as u32, direction)
                .await?;
            for e in &events {
                print_event(e, json_output());
            }
            left -= (events.len() as u64).min(left);
            if end || events.is_empty() {
                break;
            }
            from = next;
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn tail(a: &TailArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let c = connect_arg(&a.server).await?;
        let target = match &a.stream {
            Some(s) => {
                if a.prefix.is_some() || !a.types.is_empty() {
                    bail!("--prefix and --type filter the whole log; not with --stream");
                }
                SubscribeTarget::Stream(s.clone())
            }
            None => SubscribeTarget::All(Filter {
                stream_prefix: a.prefix.clone().unwrap_or_default(),
                event_types: a.types.clone(),
            }),
        };
        let from = a.from.map_or(SubscribeFrom::Now, SubscribeFrom::At);
        let mut sub = c.subscribe(target, from).await?;
        let mut n = 0;
        while a.limit.is_none_or(|l| n < l) {
            match sub.next().await? {
                SubscriptionItem::Event(e) => {
                    print_event(&e, json_output());
                    n += 1;
                }
                SubscriptionItem::CaughtUp(p) => {
                    if !json_output() {
                        eprintln!("-- caught up at {p}; following live --");
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn info(a: &InfoArgs) -> Result<ExitCode> {
    runtime()?.block_on(async {
        let c = connect_arg(&a.server).await?;
        let i = c.server_info().await?;
        let durability = match i.durability {
            0 => "fsync",
            1 => "batched",
            _ => "none",
        };
        let mut v = json!({
            "server": i.server,
            "protocol_version": i.protocol_version,
            "log_id": tally_engine::format::proof::hex(&i.log_id),
            "next_position": i.next_position,
            "segments": i.segments,
            "connections": i.connections,
            "uptime_ms": i.uptime_ms,
            "durability": durability,
            "checkpoints": i.checkpoints,
        });
        if let Some(s) = &a.stream {
            v["stream"] = match c.stream_info(s).await? {
                Some(si) => json!({
                    "stream": si.stream,
                    "last_version": si.last_version,
                    "first_position": si.first_position.0,
                    "last_position": si.last_position.0,
                    "created": rfc3339(si.created),
                }),
                None => json!(null),
            };
        }
        if json_output() {
            println!("{v}");
        } else if let Value::Object(m) = v {
            for (k, val) in m {
                println!("{k:<18} {val}");
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// What `tally bench --read` replays.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// The whole log, in order.
    All,
    /// Stream by stream.
    Stream,
}
