//! What a durable append over loopback TCP costs on this machine before any server code:
//! the floor under `tally bench --server --connections 1 --inflight 1`
//! (docs/BENCHMARKS.md, "tallyd").
//!
//! Measures, for 3 s each, with plain blocking threads and no runtime:
//! 1. a loopback round trip of an append-sized request (342 B) and response (42 B);
//! 2. a 342 B `pwrite` and `fdatasync` on one thread (the embedded engine's floor);
//! 3. the two together: a server thread that writes and syncs each request before
//!    answering it (a durable append's floor).
//!
//! `cargo run --release -p tally-server --example latency_floor [DIR]` (default: the
//! system's temporary directory).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const REQUEST: usize = 342;
const RESPONSE: usize = 42;
const RUN: Duration = Duration::from_secs(3);

fn report(name: &str, mut ns: Vec<u64>) {
    ns.sort_unstable();
    let at = |q: f64| ns.get((ns.len() as f64 * q) as usize).copied().unwrap_or(0) / 1000;
    println!(
        "{name:<40} n {:>7}  p50 {:>4} us  p90 {:>4} us",
        ns.len(),
        at(0.5),
        at(0.9)
    );
}

/// Runs `op` for `RUN` and returns each call's duration in nanoseconds.
fn measure(mut op: impl FnMut() -> Result<()>) -> Result<Vec<u64>> {
    let mut ns = Vec::new();
    let start = Instant::now();
    while start.elapsed() < RUN {
        let t = Instant::now();
        op()?;
        ns.push(u64::try_from(t.elapsed().as_nanos())?);
    }
    Ok(ns)
}

/// A server thread answering each request; `sync` runs before the answer.
fn serve(mut sync: impl FnMut(&[u8]) -> Result<()> + Send + 'static) -> Result<TcpStream> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut req = [0u8; REQUEST];
        while s.read_exact(&mut req).is_ok() {
            sync(&req)?;
            s.write_all(&req[..RESPONSE])?;
        }
        Ok(())
    });
    let c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    Ok(c)
}

fn round_trips(mut c: TcpStream) -> Result<Vec<u64>> {
    let req = [7u8; REQUEST];
    let mut resp = [0u8; RESPONSE];
    measure(|| {
        c.write_all(&req)?;
        c.read_exact(&mut resp)?;
        Ok(())
    })
}

/// An appender of fixed-size records to a preallocated file, synced after each.
fn appender(path: &std::path::Path) -> Result<impl FnMut(&[u8]) -> Result<()> + Send + 'static> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; 1 << 20];
    for i in 0..64u64 {
        f.write_all_at(&zeros, i << 20)?;
    }
    f.sync_all()?;
    let mut at = 0u64;
    Ok(move |b: &[u8]| {
        f.write_all_at(b, at)?;
        at = (at + b.len() as u64) % (63 << 20);
        f.sync_data()?;
        Ok(())
    })
}

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(std::env::temp_dir, Into::into);
    let path = dir.join(format!("latency-floor-{}.dat", std::process::id()));
    report("loopback round trip", round_trips(serve(|_| Ok(()))?)?);
    let mut local = appender(&path)?;
    let rec = [1u8; REQUEST];
    report("write + fdatasync, one thread", measure(|| local(&rec))?);
    report(
        "round trip with write + fdatasync",
        round_trips(serve(appender(&path)?)?)?,
    );
    std::fs::remove_file(&path)?;
    Ok(())
}
