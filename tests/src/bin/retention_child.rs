//! The child process of `tests/tests/crash_retention.rs`.
//!
//! Usage: `retention_child DIR SEED`. Opens the log in DIR (`Durability::Fsync`, 256 KiB
//! segments); on the first run sets the policy `quotes` (streams `quote-`: the newest 2
//! events) and the hold `keep` (on `quote-held`). Until it is killed: appends a quote to
//! `quote-<k>` (k below 20) or to `quote-held`, printing `APPENDED STREAM VERSION` once
//! acknowledged; and now and then seals the active segment and applies retention, printing
//! `RUN POSITION REMOVED` once the run returned (POSITION is its first `$RetentionApplied`
//! event, `-` when nothing was due).

use std::io::Write;

use tally_engine::governance::{HoldPlaced, HoldScope, Keep, PolicyScope, PolicySet};
use tally_engine::{Durability, EventData, ExpectedVersion, Log, Options};
use tally_tests::Rng;

fn fail(what: &str, e: impl std::fmt::Display, code: i32) -> ! {
    eprintln!("retention_child: {what}: {e}");
    std::process::exit(code);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: retention_child DIR SEED");
        std::process::exit(2);
    }
    let seed: u64 = args[2].parse().expect("seed");
    let log = Log::open(
        &args[1],
        Options {
            segment_bytes: 256 << 10,
            durability: Durability::Fsync,
            ..Options::default()
        },
    )
    .unwrap_or_else(|e| fail("open", e, 3));
    let g = log
        .governance()
        .unwrap_or_else(|e| fail("governance", e, 3));
    if g.policies.is_empty() {
        log.set_retention_policy(
            &PolicySet {
                name: "quotes".into(),
                scope: PolicyScope::Prefix("quote-".into()),
                keep: Keep::Newest { count: 2 },
                reason: "crash test".into(),
            },
            "ops",
        )
        .unwrap_or_else(|e| fail("policy", e, 4));
    }
    if g.holds.is_empty() {
        log.place_legal_hold(
            &HoldPlaced {
                id: "keep".into(),
                scope: HoldScope::Stream("quote-held".into()),
                reason: "crash test".into(),
            },
            "legal",
        )
        .unwrap_or_else(|e| fail("hold", e, 4));
    }
    let mut rng = Rng::new(seed);
    let mut out = std::io::stdout();
    let pad = "q".repeat(200);
    loop {
        let stream = if rng.below(5) == 0 {
            "quote-held".to_owned()
        } else {
            format!("quote-{}", rng.below(20))
        };
        let e = EventData::json("Quote", format!(r#"{{"stream":"{stream}","pad":"{pad}"}}"#));
        let r = log
            .append(&stream, ExpectedVersion::Any, &[e])
            .unwrap_or_else(|e| fail("append", e, 5));
        let _ = writeln!(out, "APPENDED {stream} {}", r.last_version);
        let _ = out.flush();
        if rng.below(40) == 0 {
            log.seal_active_segment()
                .unwrap_or_else(|e| fail("seal", e, 6));
            let run = log
                .apply_retention(tally_engine::now(), "ops", "crash test")
                .unwrap_or_else(|e| fail("retention", e, 6));
            let at = run
                .recorded_at
                .map_or_else(|| "-".to_owned(), |p| p.0.to_string());
            let _ = writeln!(out, "RUN {at} {}", run.removed);
            let _ = out.flush();
        }
    }
}
