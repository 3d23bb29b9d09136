//! The child process of `tests/tests/crash_projection.rs`.
//!
//! Usage: `projection_child DIR SEED`. Opens the log in DIR (`Durability::Fsync`), opens
//! the `ledger` projection from its last checkpoint, and until it is killed: appends a
//! batch of bookings to random accounts, then catches the projection up, which writes a
//! checkpoint in parts of 4 KiB (a delta, or a full one within the projector's bounds).
//! After each checkpoint it prints `CKPT <next>` and flushes, so the parent knows a
//! checkpoint at least that new is complete.

use std::io::Write;

use tally_engine::projection::{Projector, ProjectorOptions};
use tally_engine::state_store::PartOptions;
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options};
use tally_tests::Rng;
use tally_tests::ledger::Ledger;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: projection_child DIR SEED");
        std::process::exit(2);
    }
    let seed: u64 = args[2].parse().expect("seed");
    let log = match Log::open(
        &args[1],
        Options {
            segment_bytes: 1 << 20,
            durability: Durability::Fsync,
            ..Options::default()
        },
    ) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("projection_child: open failed: {e:?}");
            std::process::exit(3);
        }
    };
    let opts = ProjectorOptions {
        checkpoint_every: u64::MAX,
        parts: PartOptions {
            part_bytes: 4096,
            batch_bytes: 16 * 1024,
        },
        deltas_max: 4,
    };
    let mut p = match Projector::<Ledger>::open(&log, "ledger", opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("projection_child: projector open failed: {e}");
            std::process::exit(4);
        }
    };
    let mut rng = Rng::new(seed);
    let mut out = std::io::stdout();
    loop {
        for _ in 0..1 + rng.below(40) {
            let account = rng.below(3000);
            let amount = rng.below(1000) as i64 - 500;
            if let Err(e) = log.append(
                &format!("acct-{account:05}"),
                ExpectedVersion::Any,
                &[EventData::new("Book", amount.to_le_bytes().to_vec())],
            ) {
                eprintln!("projection_child: append failed: {e}");
                std::process::exit(5);
            }
        }
        if let Err(e) = p.catch_up() {
            eprintln!("projection_child: catch-up failed: {e}");
            std::process::exit(6);
        }
        let next = p.status().checkpoint.unwrap_or(0);
        let _ = writeln!(out, "CKPT {next}");
        let _ = out.flush();
    }
}
