//! Damage anywhere: random single-bit flips and truncations in a copy of a multi-segment
//! log (segments, index sidecars, the stream snapshot, the identity file), after a clean
//! close and after a crash. For every damaged copy:
//!
//! - nothing panics: not `open`, not `verify`, not reading everything back;
//! - `open` either succeeds, and then every record it returns is the original record at
//!   that position (the valid prefix), or fails with a typed error naming a file;
//! - a flip anywhere in a sealed segment file is always detected, by `open` or `verify`.
//!
//! `TALLY_CORRUPTION_CASES=N` runs more cases; `TALLY_CORRUPTION_SEED` replays a run.

// Tests unwrap: a failure is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use tally_engine::{Direction, Error, EventData, EventId, ExpectedVersion, Log, Options, Position};

fn opts() -> Options {
    Options {
        segment_bytes: 64 * 1024,
        ..Options::default()
    }
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn build(dir: &Path, crash: bool) -> Vec<EventId> {
    let log = Log::open(dir, opts()).unwrap();
    let mut ids = Vec::new();
    for i in 0..700u64 {
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&i.to_le_bytes());
        id[0] = 0xcc;
        let n = 1 + (i % 3) as usize;
        let events: Vec<EventData> = (0..n)
            .map(|j| {
                let mut id = id;
                id[1] = j as u8;
                ids.push(EventId(id));
                EventData::new("E", vec![(i % 251) as u8; (i * 37 % 300) as usize])
                    .with_id(EventId(id))
            })
            .collect();
        log.append(&format!("trade-{}", i % 12), ExpectedVersion::Any, &events)
            .unwrap();
    }
    log.wait_sealed().unwrap();
    assert!(log.segments().len() >= 5);
    if crash {
        log.crash();
    } else {
        log.close().unwrap();
    }
    ids
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != "tally.lock" {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Sealed segment files of a log: those whose footer page is not all zero.
fn is_sealed(path: &Path) -> bool {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut page = vec![0u8; 4096];
    f.read_exact_at(&mut page, len - 4096).unwrap();
    page.iter().any(|&b| b != 0)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != "tally.lock"))
        .collect();
    v.sort();
    v
}

fn typed(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. } | Error::Index { .. } | Error::Io { .. }
    )
}

/// Opens a damaged copy, reads everything, verifies. Returns whether damage was reported
/// (a refused open, a read or verify error, a rewritten footer or a cut tail) and how many
/// records were read back.
fn exercise(dir: &Path, ids: &[EventId], what: &str) -> (bool, usize) {
    let log = match Log::open(dir, opts()) {
        // A damaged footer on the newest sealed segment is taken for an interrupted seal:
        // reported, and rebuilt from the verified records.
        Ok(log) if !log.recovery_report().footers_rewritten.is_empty() => return (true, 0),
        Ok(log) => log,
        Err(e) => {
            assert!(typed(&e), "{what}: open failed with an untyped error {e:?}");
            return (true, 0);
        }
    };
    let mut detected = !log.recovery_report().truncations.is_empty();
    let mut read = 0usize;
    let mut from = Position(0);
    loop {
        match log.read_all(from, 1000, Direction::Forward) {
            Ok(chunk) => {
                let Some(last) = chunk.last() else { break };
                from = last.position.next();
                read += chunk.len();
                for e in &chunk {
                    let want = ids.get(e.position.0 as usize);
                    assert_eq!(
                        Some(&e.event_id),
                        want,
                        "{what}: wrong record at {}",
                        e.position
                    );
                }
            }
            Err(e) => {
                assert!(typed(&e), "{what}: read failed with an untyped error {e:?}");
                detected = true;
                break;
            }
        }
    }
    match log.verify() {
        Ok(_) => {}
        Err(e) => {
            assert!(
                typed(&e),
                "{what}: verify failed with an untyped error {e:?}"
            );
            detected = true;
        }
    }
    (detected, read)
}

fn run(crash: bool, cases: u64, rng: &mut Rng) {
    let base = tempfile::tempdir().unwrap();
    let ids = build(base.path(), crash);
    let all = files(base.path());
    for case in 0..cases {
        let work = tempfile::tempdir().unwrap();
        copy_dir(base.path(), work.path());
        // Segments take most of the damage; sidecars and the rest some.
        let segs: Vec<&PathBuf> = all
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        let target = if rng.below(4) == 0 {
            all[rng.below(all.len() as u64) as usize].clone()
        } else {
            segs[rng.below(segs.len() as u64) as usize].clone()
        };
        let target = work.path().join(target.file_name().unwrap());
        let len = std::fs::metadata(&target).unwrap().len();
        let sealed = target.extension().is_some_and(|e| e == "seg") && is_sealed(&target);
        let truncate = rng.below(5) == 0;
        let what;
        if truncate {
            let to = rng.below(len);
            what = format!(
                "case {case}: truncate {} to {to} of {len}",
                target.display()
            );
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .unwrap();
            f.set_len(to).unwrap();
        } else {
            // Half of the flips land in the used part of a segment, where records are.
            let at = if sealed || rng.below(2) == 0 {
                rng.below(len)
            } else {
                rng.below(len.min(64 * 1024))
            };
            let bit = rng.below(8);
            what = format!(
                "case {case}: flip bit {bit} of byte {at} in {}",
                target.display()
            );
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&target)
                .unwrap();
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at).unwrap();
            b[0] ^= 1 << bit;
            f.write_all_at(&b, at).unwrap();
        }
        let (detected, read) =
            catch_unwind(AssertUnwindSafe(|| exercise(work.path(), &ids, &what)))
                .unwrap_or_else(|_| panic!("{what}: panicked"));
        // Damage nobody reported lost nothing: every acknowledged record is read back (a
        // damaged sidecar or snapshot is rebuilt from the records, never a shorter log).
        if !detected {
            assert_eq!(
                read,
                ids.len(),
                "{what}: no damage was reported, yet acknowledged records are missing"
            );
        }
        if sealed {
            assert!(
                detected,
                "{what}: damage to a sealed segment went undetected"
            );
        }
    }
}

#[test]
fn damage_is_detected_or_recovered_never_a_panic() {
    let cases: u64 = std::env::var("TALLY_CORRUPTION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let seed: u64 = std::env::var("TALLY_CORRUPTION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("seed: TALLY_CORRUPTION_SEED={seed}");
    let mut rng = Rng(seed);
    run(false, cases, &mut rng);
    run(true, cases, &mut rng);
}
