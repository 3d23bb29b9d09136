//! Erasure under SIGKILL: a child process (`erasure_child`) appends confirmations with a
//! sealed client name for new subjects and now and then forgets an earlier one, printing
//! each acknowledged append and each finished forget; the parent kills it at a random
//! moment (while sealing, between an erasure's event and its key's destruction, while the
//! key store syncs), reopens the log with its key store, and checks that
//!
//! - every acknowledged event is there, and reads its name unless its subject was erased;
//! - every forget reported is in effect: its subject reads `$erased` naming the erasure
//!   event, and the key store holds no live key of it;
//! - a forget cut short is either whole (its event is in the log: the open destroyed any key
//!   left) or absent (the data reads as before), never half;
//! - the log verifies.
//!
//! 10 cycles by default; `TALLY_CRASH_CYCLES=N` for more; `TALLY_CRASH_SEED` replays a run.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tally_engine::format::sealed::subject_hash;
use tally_engine::keys::{FileKeyStore, KeyLookup, KeyStore, SecretKey};
use tally_engine::{Direction, Log, Options, SealState};
use tally_tests::{Rng, run_then_kill, seed_from_env};

#[test]
fn a_killed_erasure_is_whole_or_absent_and_every_acknowledged_event_stays() {
    let cycles: u32 = std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed = seed_from_env("TALLY_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().unwrap();
    let (dir, keys) = (tmp.path().join("log"), tmp.path().join("keys"));
    let master = SecretKey::from_hex(&"33".repeat(32)).unwrap();
    let child = env!("CARGO_BIN_EXE_erasure_child");
    let mut appended: BTreeSet<u64> = BTreeSet::new();
    let mut forgot: BTreeSet<u64> = BTreeSet::new();
    let mut next = 0u64;
    let mut cut_whole: BTreeSet<u64> = BTreeSet::new();
    let mut erasures_redone = 0u64;
    for cycle in 0..cycles {
        let mut cmd = Command::new(child);
        cmd.arg(&dir)
            .arg(&keys)
            .arg(next.to_string())
            .arg(rng.next_u64().to_string());
        let (out, err) = run_then_kill(cmd, Duration::from_millis(150 + rng.below(400)));
        assert!(
            err.is_empty(),
            "cycle {cycle} (seed {seed}): child reported: {err}"
        );
        for l in out.lines() {
            if let Some(n) = l.strip_prefix("APPENDED ") {
                appended.insert(n.parse().unwrap());
            } else if let Some(n) = l.strip_prefix("FORGOT ") {
                forgot.insert(n.parse().unwrap());
            }
        }
        let store: Arc<FileKeyStore> = Arc::new(FileKeyStore::open(&keys, &master, false).unwrap());
        let log = Log::open(
            &dir,
            Options {
                keys: Some(store.clone()),
                ..Options::default()
            },
        )
        .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): reopen failed: {e:?}"));
        erasures_redone += log.recovery_report().erasures_redone;
        let erasures = log.erasures();
        // Every reported forget is in effect.
        for n in &forgot {
            let h = subject_hash(&format!("client-{n}"));
            assert!(
                erasures.contains_key(&h),
                "cycle {cycle} (seed {seed}): forget of client-{n} lost"
            );
            assert_eq!(
                store.key(&h, 1).unwrap(),
                KeyLookup::Destroyed,
                "client-{n}'s key lives"
            );
        }
        // Every acknowledged event is there; its name reads unless its subject was erased,
        // and then the marker names the erasure event.
        let max = appended.last().copied().unwrap_or(0);
        for n in 0..=max + 1 {
            let events = log
                .read_stream(&format!("trade-{n}"), 0, 1, Direction::Forward)
                .unwrap();
            let Some(e) = events.first() else {
                assert!(
                    !appended.contains(&n),
                    "cycle {cycle} (seed {seed}): acknowledged trade-{n} lost"
                );
                continue;
            };
            let h = subject_hash(&format!("client-{n}"));
            let p: Value = serde_json::from_slice(e.payload()).unwrap();
            match erasures.get(&h) {
                Some(er) => {
                    assert_eq!(p["client_name"]["$erased"]["by"], er.position.0, "{p}");
                    assert_eq!(store.key(&h, 1).unwrap(), KeyLookup::Destroyed);
                    if !forgot.contains(&n) {
                        cut_whole.insert(n);
                    }
                }
                None => {
                    assert_eq!(p["client_name"], format!("Name {n}"), "cycle {cycle}: {p}");
                    assert_eq!(e.sealing().unwrap().state, SealState::Opened);
                }
            }
        }
        log.verify().unwrap();
        // The next child starts after every subject the log holds.
        next = max + 2;
        log.close().unwrap();
        drop(store);
    }
    assert!(
        appended.len() > 20,
        "too few appends to test anything: {}",
        appended.len()
    );
    assert!(!forgot.is_empty(), "no forget finished");
    eprintln!(
        "crash_erasure: {} appends, {} forgets reported, {} erasures found whole though unreported, {erasures_redone} key destructions redone at open",
        appended.len(),
        forgot.len(),
        cut_whole.len()
    );
}
