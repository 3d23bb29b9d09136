//! Helpers shared by the integration tests and their child processes: deterministic event
//! content (so that a parent can check what a killed child wrote, byte for byte) and a
//! small seeded random number generator (randomised tests print their seed and accept it
//! back through an environment variable).

pub mod forge;
pub mod ledger;
pub mod soak;

use tally_engine::{EventData, EventId};

/// Identifies one event written by a crash-test child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventKey {
    /// Which child run.
    pub cycle: u32,
    /// Which writer thread.
    pub thread: u16,
    /// The thread's append counter.
    pub counter: u32,
    /// Which stream of a multi-stream append.
    pub part: u8,
    /// Which event of that stream's part.
    pub index: u8,
}

impl EventKey {
    /// The event id that encodes this key.
    #[must_use]
    pub fn event_id(&self) -> EventId {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.cycle.to_le_bytes());
        b[4..6].copy_from_slice(&self.thread.to_le_bytes());
        b[6..10].copy_from_slice(&self.counter.to_le_bytes());
        b[10] = self.part;
        b[11] = self.index;
        b[12..16].copy_from_slice(b"TLLY");
        EventId(b)
    }

    /// Decodes an id made by [`EventKey::event_id`].
    #[must_use]
    pub fn from_event_id(id: EventId) -> Option<EventKey> {
        let b = id.0;
        if &b[12..16] != b"TLLY" {
            return None;
        }
        Some(EventKey {
            cycle: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            thread: u16::from_le_bytes([b[4], b[5]]),
            counter: u32::from_le_bytes([b[6], b[7], b[8], b[9]]),
            part: b[10],
            index: b[11],
        })
    }

    /// The batch this event belongs to.
    #[must_use]
    pub fn batch(&self) -> (u32, u16, u32) {
        (self.cycle, self.thread, self.counter)
    }
}

/// The event a child writes for `key`, in a batch of `batch_events` events in total. The
/// payload says how many events the whole batch has, so that a reader can tell a complete
/// batch from part of one.
#[must_use]
pub fn event_for(key: EventKey, batch_events: u32) -> EventData {
    let filler = (key.counter as usize * 7 + key.index as usize * 13) % 300;
    let mut payload = Vec::with_capacity(16 + filler);
    payload.extend_from_slice(&batch_events.to_le_bytes());
    payload.extend_from_slice(&key.counter.to_le_bytes());
    payload.extend((0..filler).map(|i| (i as u8) ^ (key.counter as u8)));
    EventData::new(
        if key.part == 0 {
            "TradeAmended"
        } else {
            "TradeNovated"
        },
        payload,
    )
    .with_id(key.event_id())
    .aggregate_type("Trade")
    .actor(format!("writer-{}", key.thread))
    .correlation_id(format!("c{}-{}-{}", key.cycle, key.thread, key.counter))
    .causation_id(format!("cause-{}", key.counter / 3))
    .event_time(tally_engine::Timestamp(
        1_700_000_000_000_000_000 + u64::from(key.counter),
    ))
}

/// The number of events in the batch an event's payload says it belongs to.
#[must_use]
pub fn batch_events_of(payload: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?))
}

/// xorshift64*: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (0 is replaced by a fixed non-zero value).
    #[must_use]
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A seed from the environment variable `var`, or from the clock; printed either way so
/// that a failure can be replayed.
#[must_use]
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("seed: {var}={seed}");
    seed
}

/// Runs `cmd` (its stdout and stderr piped) for `run_for`, then kills it with SIGKILL and
/// returns what it printed: (stdout, stderr).
///
/// # Panics
/// If the child cannot be spawned, or exits by itself before it is killed (a crash test's
/// child runs until it is killed; its stderr is in the message).
#[must_use]
pub fn run_then_kill(
    mut cmd: std::process::Command,
    run_for: std::time::Duration,
) -> (String, String) {
    use std::io::Read;
    let mut proc = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the crash-test child");
    let read = |r: Option<&mut dyn Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            r.read_to_string(&mut s).expect("read the child's output");
        }
        s
    };
    let started = std::time::Instant::now();
    while started.elapsed() < run_for {
        if let Some(status) = proc.try_wait().expect("poll the child") {
            let err = read(proc.stderr.as_mut().map(|e| e as &mut dyn Read));
            panic!("the child exited by itself with {status}: {err}");
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    proc.kill().expect("SIGKILL the child");
    proc.wait().expect("reap the child");
    let out = read(proc.stdout.as_mut().map(|o| o as &mut dyn Read));
    let err = read(proc.stderr.as_mut().map(|e| e as &mut dyn Read));
    (out, err)
}

/// The cold tier options of the crash tests: a `DirStore` at `store`, every sealed segment
/// but the newest moved, no retries; `background` compacts every millisecond.
///
/// # Panics
/// When the store's directory cannot be created.
#[must_use]
pub fn cold_options(store: &std::path::Path, background: bool) -> tally_engine::ColdOptions {
    let store = tally_engine::cold::DirStore::new(store).expect("the cold store's directory");
    tally_engine::ColdOptions {
        store: Some(std::sync::Arc::new(store)),
        policy: tally_engine::CompactPolicy {
            keep_local_segments: 1,
            ..tally_engine::CompactPolicy::default()
        },
        background: background.then(|| std::time::Duration::from_millis(1)),
        attempts: 1,
        first_retry_wait: std::time::Duration::ZERO,
        ..tally_engine::ColdOptions::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_event_ids() {
        let k = EventKey {
            cycle: 7,
            thread: 3,
            counter: 123_456,
            part: 1,
            index: 2,
        };
        assert_eq!(EventKey::from_event_id(k.event_id()), Some(k));
        assert_eq!(EventKey::from_event_id(EventId([0; 16])), None);
        let e = event_for(k, 5);
        assert_eq!(batch_events_of(&e.payload), Some(5));
    }
}
