//! Projection checkpoints under SIGKILL: a child process (`projection_child`) books
//! amounts and checkpoints a partitioned read model in many small parts, printing each
//! completed checkpoint; the parent kills it at a random moment (between parts of a
//! checkpoint, between checkpoints, or while booking), then checks that
//!
//! - the newest checkpoint that loads is at least as new as the last one the child
//!   reported, and no checkpoint was refused (a killed checkpoint has parts but no
//!   manifest, and is never read);
//! - its state is exactly the fold of the log up to its position, and folding on from there
//!   gives the fold of the whole log;
//! - the next child resumes from it (the same directory is reused across cycles).
//!
//! 12 cycles by default; `TALLY_CRASH_CYCLES=N` for more; `TALLY_CRASH_SEED` replays a run.

#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use tally_engine::projection::{Projection, fold_window, load_checkpoint};
use tally_engine::{Log, Options};
use tally_tests::ledger::Ledger;
use tally_tests::{Rng, run_then_kill, seed_from_env};

#[test]
fn a_killed_checkpoint_never_loads_and_the_last_complete_one_always_does() {
    let cycles: u32 = std::env::var("TALLY_CRASH_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let seed = seed_from_env("TALLY_CRASH_SEED");
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let child = env!("CARGO_BIN_EXE_projection_child");
    let mut checkpoints = 0usize;
    let mut orphans = 0u64;
    for cycle in 0..cycles {
        let mut cmd = Command::new(child);
        cmd.arg(dir.path()).arg(rng.next_u64().to_string());
        let (out, err) = run_then_kill(cmd, Duration::from_millis(100 + rng.below(400)));
        assert!(err.is_empty(), "cycle {cycle}: child reported: {err}");
        let reported: Vec<u64> = out
            .lines()
            .filter_map(|l| l.strip_prefix("CKPT ")?.parse().ok())
            .collect();
        checkpoints += reported.len();

        let log = Log::open(dir.path(), Options::default())
            .unwrap_or_else(|e| panic!("cycle {cycle} (seed {seed}): reopen failed: {e:?}"));
        let search = load_checkpoint::<Ledger>(&log, "ledger").unwrap();
        assert!(
            search.refused.is_empty(),
            "cycle {cycle} (seed {seed}): refused {:?}",
            search.refused
        );
        let Some(found) = search.found else {
            assert!(
                reported.is_empty(),
                "cycle {cycle}: reported {reported:?}, none loads"
            );
            log.close().unwrap();
            continue;
        };
        if let Some(&last) = reported.last() {
            assert!(
                found.next >= last,
                "cycle {cycle}: loaded {} < reported {last}",
                found.next
            );
        }
        let folded: Ledger = fold_window(&log, "ledger", 0, found.next).unwrap();
        assert_eq!(
            found.state.encode_state(),
            folded.encode_state(),
            "cycle {cycle} (seed {seed}): the loaded state is not the fold up to {}",
            found.next
        );
        // Parts after the newest manifest: a checkpoint the kill cut short.
        let tail = log
            .read_stream(
                "$projection-ledger",
                u64::MAX,
                1,
                tally_engine::Direction::Backward,
            )
            .unwrap();
        if tail
            .first()
            .is_some_and(|e| e.event_type() == tally_engine::state_store::PART_EVENT_TYPE)
        {
            orphans += 1;
        }
        log.close().unwrap();
    }
    eprintln!(
        "{cycles} kill cycles (seed {seed}), {checkpoints} checkpoints reported, {orphans} cut between parts"
    );
    assert!(checkpoints > 0, "the children never completed a checkpoint");
}
