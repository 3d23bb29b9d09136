//! Durable append latency against a running `tallyd` from the plainest possible client: one
//! blocking socket, one append at a time, no runtime. Set beside `tally bench --server ADDR
//! --connections 1 --inflight 1` it separates what the server adds from what the async
//! client adds (docs/BENCHMARKS.md, "tallyd").
//!
//! `cargo run --release -p tally-server --example blocking_append -- 127.0.0.1:7878 [SECONDS]`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tally_engine::{EventData, ExpectedVersion};
use tally_server::protocol::{AppendPart, LENGTH_BYTES, PROTOCOL_VERSION, Request, Response};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn read_response(c: &mut TcpStream) -> Result<Response> {
    let mut len = [0u8; LENGTH_BYTES];
    c.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > 1 << 20 {
        return Err(format!("response of {len} bytes").into());
    }
    let mut frame = vec![0u8; len];
    c.read_exact(&mut frame)?;
    Ok(Response::decode(&Bytes::from(frame))?.1)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().ok_or("usage: blocking_append ADDR [SECONDS]")?;
    let seconds: f64 = args.next().map_or(Ok(5.0), |s| s.parse())?;
    let mut c = TcpStream::connect(&addr)?;
    c.set_nodelay(true)?;
    let mut out = Vec::new();
    Request::Hello {
        min_version: 1,
        max_version: PROTOCOL_VERSION,
        client: "blocking_append".into(),
    }
    .encode(0, &mut out);
    c.write_all(&out)?;
    match read_response(&mut c)? {
        Response::Hello(_) => {}
        other => return Err(format!("handshake: {other:?}").into()),
    }
    let payload = vec![7u8; 256];
    let mut ns = Vec::new();
    let start = Instant::now();
    let mut id = 0u32;
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        id += 1;
        out.clear();
        // Event ids are left to the server, as `tally bench` leaves them.
        Request::Append(AppendPart {
            stream: format!("blocking-{}", id % 1000),
            expected: ExpectedVersion::Any,
            events: vec![EventData::new("BenchEvent", payload.clone())],
        })
        .encode(id, &mut out);
        let t = Instant::now();
        c.write_all(&out)?;
        match read_response(&mut c)? {
            Response::Appended(_) => {}
            other => return Err(format!("append: {other:?}").into()),
        }
        ns.push(u64::try_from(t.elapsed().as_nanos())?);
    }
    ns.sort_unstable();
    let at = |q: f64| ns.get((ns.len() as f64 * q) as usize).copied().unwrap_or(0) / 1000;
    println!(
        "blocking client, 1 append in flight: n {}  p50 {} us  p90 {} us  p99 {} us",
        ns.len(),
        at(0.5),
        at(0.9),
        at(0.99)
    );
    Ok(())
}
