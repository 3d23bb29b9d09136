//! `tally bench --server ADDR`: the load generator against a running server.
//!
//! Appends: `--connections` connections, each one task keeping `--inflight` pipelined
//! appends outstanding (waited on oldest first, as the embedded bench does with handles);
//! the latency of each append is from sending it to receiving its acknowledgement.
//!
//! Replay (`--read all`): pipelined READ_ALL requests of 4096 events over each connection,
//! covering the first `--events` positions; `--read stream`: every bench stream read to its
//! end, streams spread over the connections. The latency is per read request.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tally_engine::{Direction, EventData, ExpectedVersion};
use tally_server::client::{Client, PendingResponse};
use tally_server::protocol::{AppendPart, Filter, Request, Response};

use crate::commands::bench::{BenchArgs, Measured};
use crate::commands::remote::ReadMode;

const READ_PAGE: u32 = 4096;

fn histogram() -> Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?)
}

fn record(h: &mut Histogram<u64>, t: Instant) {
    let us = u64::try_from(t.elapsed().as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    h.record(us.min(h.high())).ok();
}

/// Runs the load against the server; returns what was measured and the server's
/// durability (0 fsync, 1 batched, 2 none, as SERVER_INFO reports it).
pub fn run(addr: &str, args: &BenchArgs) -> Result<(Measured, u8)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let mut clients = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            clients.push(
                Client::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?,
            );
        }
        let durability = clients[0].server_info().await?.durability;
        let m = match args.read {
            None => writes(clients, args).await?,
            Some(mode) => {
                prefill(&clients[0], args).await?;
                reads(clients, args, mode).await?
            }
        };
        Ok((m, durability))
    })
}

fn batch(args: &BenchArgs) -> Vec<EventData> {
    let payload: Vec<u8> = (0..args.payload)
        .map(|i| (i as u8).wrapping_mul(31))
        .collect();
    (0..args.batch)
        .map(|_| EventData::new("BenchEvent", payload.clone()))
        .collect()
}

async fn writes(clients: Vec<Client>, args: &BenchArgs) -> Result<Measured> {
    let budget = Arc::new(AtomicU64::new(0));
    let total = args.events.div_ceil(args.batch as u64);
    let deadline = args.duration.map(Duration::from_secs_f64);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let n = clients.len() as u64;
    for (w, c) in clients.into_iter().enumerate() {
        let (budget, args) = (Arc::clone(&budget), args.clone());
        tasks.push(tokio::spawn(async move {
            // Ids are left to the server (one v7 id per event), as the embedded bench
            // leaves them to the engine.
            let events = batch(&args);
            let mut h = histogram()?;
            let mut window: VecDeque<(PendingResponse, Instant)> = VecDeque::new();
            let mut appended = 0u64;
            let mut k = w as u64;
            loop {
                let more = match deadline {
                    Some(d) => started.elapsed() < d,
                    None => budget.fetch_add(1, Ordering::Relaxed) < total,
                };
                if !more {
                    break;
                }
                if window.len() == args.inflight {
                    let (p, t) = window.pop_front().expect("window is full");
                    expect_appended(p.wait().await?)?;
                    record(&mut h, t);
                }
                let req = Request::Append(AppendPart {
                    stream: format!("bench-{}", k % args.streams),
                    expected: ExpectedVersion::Any,
                    events: events.clone(),
                });
                k += n;
                let t = Instant::now();
                window.push_back((c.send(&req).await?, t));
                appended += args.batch as u64;
            }
            for (p, t) in window {
                expect_appended(p.wait().await?)?;
                record(&mut h, t);
            }
            anyhow::Ok((h, appended))
        }));
    }
    let mut h = histogram()?;
    let mut events = 0;
    for t in tasks {
        let (th, te) = t.await.context("bench task")??;
        h.add(&th)?;
        events += te;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Measured {
        label: "server",
        events,
        seconds,
        bytes: events * args.payload as u64,
        histogram: h,
    })
}

fn expect_appended(r: Response) -> Result<()> {
    match r {
        Response::Appended(_) => Ok(()),
        other => bail!("unexpected response to an append: {other:?}"),
    }
}

/// Appends until the log has `--events` events (not measured).
async fn prefill(c: &Client, args: &BenchArgs) -> Result<()> {
    let have = c.server_info().await?.next_position;
    if have >= args.events {
        return Ok(());
    }
    let per = 100usize;
    let one = batch(&BenchArgs {
        batch: per,
        ..args.clone()
    });
    let mut window = VecDeque::new();
    let mut k = 0u64;
    let mut left = args.events - have;
    while left > 0 {
        let n = left.min(per as u64) as usize;
        let req = Request::Append(AppendPart {
            stream: format!("bench-{}", k % args.streams),
            expected: ExpectedVersion::Any,
            events: one[..n].to_vec(),
        });
        k += 1;
        left -= n as u64;
        if window.len() == 64 {
            let p: PendingResponse = window.pop_front().expect("full");
            expect_appended(p.wait().await?)?;
        }
        window.push_back(c.send(&req).await?);
    }
    for p in window {
        expect_appended(p.wait().await?)?;
    }
    Ok(())
}

async fn reads(clients: Vec<Client>, args: &BenchArgs, mode: ReadMode) -> Result<Measured> {
    let started = Instant::now();
    let n = clients.len() as u64;
    let mut tasks = Vec::new();
    for (w, c) in clients.into_iter().enumerate() {
        let args = args.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = histogram()?;
            let (mut events, mut bytes) = (0u64, 0u64);
            let mut count =
                |r: Response, h: &mut Histogram<u64>, t: Instant| -> Result<(u64, bool)> {
                    record(h, t);
                    match r {
                        Response::Events {
                            events: es,
                            next,
                            end,
                        } => {
                            events += es.len() as u64;
                            bytes += es.iter().map(|e| e.payload().len() as u64).sum::<u64>();
                            Ok((next, end))
                        }
                        other => bail!("unexpected response to a read: {other:?}"),
                    }
                };
            match mode {
                ReadMode::All => {
                    // Pages w, w+n, w+2n, ... of READ_PAGE positions each, pipelined.
                    let mut window = VecDeque::new();
                    let mut page = w as u64;
                    loop {
                        let from = page * u64::from(READ_PAGE);
                        if from >= args.events {
                            break;
                        }
                        if window.len() == args.inflight {
                            let (p, t): (PendingResponse, Instant) =
                                window.pop_front().expect("full");
                            count(p.wait().await?, &mut h, t)?;
                        }
                        let max = (args.events - from).min(u64::from(READ_PAGE)) as u32;
                        let req = Request::ReadAll {
                            from,
                            max,
                            direction: Direction::Forward,
                            filter: Filter::default(),
                        };
                        window.push_back((c.send(&req).await?, Instant::now()));
                        page += n;
                    }
                    for (p, t) in window {
                        count(p.wait().await?, &mut h, t)?;
                    }
                }
                ReadMode::Stream => {
                    let mut s = w as u64;
                    while s < args.streams {
                        let stream = format!("bench-{s}");
                        let mut from = 0;
                        loop {
                            let t = Instant::now();
                            let req = Request::ReadStream {
                                stream: stream.clone(),
                                from_version: from,
                                max: READ_PAGE,
                                direction: Direction::Forward,
                            };
                            let (next, end) = count(c.call(&req).await?, &mut h, t)?;
                            if end {
                                break;
                            }
                            from = next;
                        }
                        s += n;
                    }
                }
            }
            anyhow::Ok((h, events, bytes))
        }));
    }
    let mut h = histogram()?;
    let (mut events, mut bytes) = (0, 0);
    for t in tasks {
        let (th, te, tb) = t.await.context("bench task")??;
        h.add(&th)?;
        events += te;
        bytes += tb;
    }
    Ok(Measured {
        label: "replay",
        events,
        seconds: started.elapsed().as_secs_f64(),
        bytes,
        histogram: h,
    })
}

/// The replay of `reads`, in process: the server's data directory opened read-only (no
/// lock, nothing changed), read through the engine's API in pages of the same size.
pub fn embedded_replay(
    dir: &std::path::Path,
    args: &BenchArgs,
    mode: ReadMode,
) -> Result<Measured> {
    let log = crate::support::open_read_only(dir)?;
    let mut h = histogram()?;
    let (mut events, mut bytes) = (0u64, 0u64);
    let started = Instant::now();
    match mode {
        ReadMode::All => {
            let mut from = 0u64;
            while from < args.events {
                let t = Instant::now();
                let max = (args.events - from).min(u64::from(READ_PAGE)) as usize;
                let page = log.read_all(tally_engine::Position(from), max, Direction::Forward)?;
                record(&mut h, t);
                let Some(last) = page.last() else { break };
                from = last.position.0 + 1;
                events += page.len() as u64;
                bytes += page.iter().map(|e| e.payload().len() as u64).sum::<u64>();
            }
        }
        ReadMode::Stream => {
            for s in 0..args.streams {
                let stream = format!("bench-{s}");
                let mut from = 0u64;
                loop {
                    let t = Instant::now();
                    let page =
                        log.read_stream(&stream, from, READ_PAGE as usize, Direction::Forward)?;
                    record(&mut h, t);
                    events += page.len() as u64;
                    bytes += page.iter().map(|e| e.payload().len() as u64).sum::<u64>();
                    match page.last() {
                        Some(last) if page.len() == READ_PAGE as usize => from = last.version + 1,
                        _ => break,
                    }
                }
            }
        }
    }
    Ok(Measured {
        label: "embedded",
        events,
        seconds: started.elapsed().as_secs_f64(),
        bytes,
        histogram: h,
    })
}
