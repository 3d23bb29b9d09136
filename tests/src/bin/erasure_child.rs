//! The child process of `tests/tests/crash_erasure.rs`.
//!
//! Usage: `erasure_child DIR KEYS FIRST SEED`. Opens the log in DIR (`Durability::Fsync`)
//! with the key store in KEYS (master key all 0x33), and until it is killed: appends a
//! confirmation for a new subject `client-N` (N from FIRST on) with its name sealed, printing
//! `APPENDED N` once acknowledged; and now and then forgets an earlier subject, printing
//! `FORGOT N` once `forget` returned.

use std::io::Write;
use std::sync::Arc;

use tally_engine::keys::{FileKeyStore, SecretKey};
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options, Personal};
use tally_tests::Rng;

fn fail(what: &str, e: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("erasure_child: {what}: {e}");
    std::process::exit(code);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: erasure_child DIR KEYS FIRST SEED");
        std::process::exit(2);
    }
    let first: u64 = args[3].parse().expect("first");
    let seed: u64 = args[4].parse().expect("seed");
    let master = SecretKey::from_hex(&"33".repeat(32)).expect("master");
    let store = FileKeyStore::open(std::path::Path::new(&args[2]), &master, true)
        .unwrap_or_else(|e| fail("key store", e, 3));
    let log = Log::open(
        &args[1],
        Options {
            segment_bytes: 1 << 20,
            durability: Durability::Fsync,
            keys: Some(Arc::new(store)),
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| fail("open", e, 3));
    let mut rng = Rng::new(seed);
    let mut out = std::io::stdout();
    let mut n = first;
    loop {
        let e = EventData::json(
            "TradeConfirmed",
            format!(r#"{{"client_id":"client-{n}","client_name":"Name {n}"}}"#),
        )
        .personal(Personal::fields(format!("client-{n}"), ["client_name"]));
        log.append(&format!("trade-{n}"), ExpectedVersion::NoStream, &[e])
            .unwrap_or_else(|e| fail("append", e, 5));
        let _ = writeln!(out, "APPENDED {n}");
        let _ = out.flush();
        if n > first && rng.below(3) == 0 {
            let victim = first + rng.below(n - first);
            log.forget(&format!("client-{victim}"), "dpo", "crash test")
                .unwrap_or_else(|e| fail("forget", e, 6));
            let _ = writeln!(out, "FORGOT {victim}");
            let _ = out.flush();
        }
        n += 1;
    }
}
