//! Projections: durable checkpoints, resume, status, rebuild while serving, windows.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tally_engine::projection::{
    Projection, ProjectionError, ProjectionState, Projector, ProjectorOptions, fold_window,
};
use tally_engine::{EventData, EventView, ExpectedVersion, Log, Options};

/// Net quantity per book, from `Fill` events whose payload is `book:qty`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Books {
    net: BTreeMap<String, i64>,
    /// A handler version: 2 counts fills twice (a "changed handler" for rebuilds).
    weight: i64,
}

thread_local! {
    static WEIGHT: std::cell::Cell<i64> = const { std::cell::Cell::new(1) };
    static PANIC_AT: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

impl Projection for Books {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Books {
        Books {
            net: BTreeMap::new(),
            weight: WEIGHT.with(std::cell::Cell::get),
        }
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        if PANIC_AT.with(std::cell::Cell::get) == Some(e.position().0) {
            panic!("simulated crash at position {}", e.position().0);
        }
        if e.event_type() == "Poison" {
            return Err("cannot apply Poison".into());
        }
        let text = std::str::from_utf8(e.payload()).map_err(|e| e.to_string())?;
        let (book, qty) = text.split_once(':').ok_or("no colon")?;
        let qty: i64 = qty
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())?;
        *self.net.entry(book.to_owned()).or_default() += qty * self.weight;
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        let mut out = format!("{};", self.weight);
        for (b, q) in &self.net {
            out.push_str(&format!("{b}={q};"));
        }
        out.into_bytes()
    }

    fn decode_state(bytes: &[u8]) -> Option<Books> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(';').filter(|p| !p.is_empty());
        let weight = parts.next()?.parse().ok()?;
        let mut net = BTreeMap::new();
        for p in parts {
            let (b, q) = p.split_once('=')?;
            net.insert(b.to_owned(), q.parse().ok()?);
        }
        Some(Books { net, weight })
    }
}

fn fill(book: &str, qty: i64) -> EventData {
    EventData::new("Fill", format!("{book}:{qty}").into_bytes())
}

fn open(dir: &std::path::Path) -> Log {
    Log::open(dir, Options::default()).unwrap()
}

fn append_fills(log: &Log, from: i64, n: i64) -> BTreeMap<String, i64> {
    let mut want = BTreeMap::new();
    for i in from..from + n {
        let book = format!("book-{}", i % 3);
        let qty = (i % 7) - 3;
        log.append(
            &format!("trade-{i}"),
            ExpectedVersion::NoStream,
            &[fill(&book, qty)],
        )
        .unwrap();
        *want.entry(book).or_default() += qty;
    }
    want
}

fn merge(a: &mut BTreeMap<String, i64>, b: BTreeMap<String, i64>) {
    for (k, v) in b {
        *a.entry(k).or_default() += v;
    }
}

#[test]
fn a_projection_resumes_from_its_checkpoint_and_folds_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let mut want = append_fills(&log, 0, 250);
    let opts = ProjectorOptions {
        checkpoint_every: 100,
        ..ProjectorOptions::default()
    };
    let mut p = Projector::<Books>::open(&log, "books", opts).unwrap();
    assert_eq!(p.catch_up().unwrap(), 250);
    assert_eq!(p.shared_state().read().net, want);
    let status = p.status();
    assert_eq!(status.checkpoint, Some(status.position));
    drop(p);
    // More events; a new projector (a restart) starts from the checkpoint and folds only
    // the new ones.
    merge(&mut want, append_fills(&log, 250, 40));
    let mut p = Projector::<Books>::open(&log, "books", opts).unwrap();
    assert_eq!(
        p.catch_up().unwrap(),
        40,
        "only the events after the checkpoint"
    );
    assert_eq!(p.shared_state().read().net, want);
    // Stopped abruptly between checkpoints (the handler panics 25 events after the last
    // checkpoint): the next run starts again from that checkpoint, so the 25 events
    // folded before the stop are not counted twice.
    merge(&mut want, append_fills(&log, 290, 30));
    let checkpointed = p.status().position;
    drop(p);
    PANIC_AT.with(|c| c.set(Some(checkpointed + 25)));
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut p = Projector::<Books>::open(&log, "books", opts).unwrap();
        p.catch_up()
    }));
    PANIC_AT.with(|c| c.set(None));
    assert!(crashed.is_err(), "the projection stopped mid-way");
    let mut p = Projector::<Books>::open(&log, "books", opts).unwrap();
    p.catch_up().unwrap();
    assert_eq!(p.shared_state().read().net, want);
    log.close().unwrap();
    // And across a reopen of the log.
    let log = open(dir.path());
    let mut p = Projector::<Books>::open(&log, "books", opts).unwrap();
    assert_eq!(p.catch_up().unwrap(), 0);
    assert_eq!(p.shared_state().read().net, want);
}

#[test]
fn following_live_events_and_a_refused_event_fails_the_projection() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let mut want = append_fills(&log, 0, 10);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let log = &log;
        let mut p = Projector::<Books>::open(log, "live", ProjectorOptions::default()).unwrap();
        // The follower's own state, watched from here.
        let state = p.shared_state();
        let follower = s.spawn(|| {
            p.follow(&stop, Duration::from_millis(20)).unwrap();
            p
        });
        merge(&mut want, append_fills(log, 10, 50));
        // Wait until the follower has seen everything, then stop it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if state.read().net == want {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the follower caught up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
        let p = follower.join().unwrap();
        assert_eq!(p.shared_state().read().net, want);
        assert_eq!(p.status().state, ProjectionState::Stopped);
        assert_eq!(p.status().events_applied, 60);
    });
    // A refused event: failed, counted, and the projection stays at it.
    log.append(
        "bad",
        ExpectedVersion::Any,
        &[EventData::new("Poison", vec![])],
    )
    .unwrap();
    let poison_at = log.next_position().0 - 1;
    append_fills(&log, 60, 5);
    let mut p = Projector::<Books>::open(&log, "live", ProjectorOptions::default()).unwrap();
    match p.catch_up() {
        Err(ProjectionError::Apply {
            position, reason, ..
        }) => {
            assert_eq!(position, poison_at);
            assert_eq!(reason, "cannot apply Poison");
        }
        other => panic!("{other:?}"),
    }
    let st = p.status();
    assert_eq!(st.state, ProjectionState::Failed);
    assert_eq!((st.errors, st.position), (1, poison_at));
    assert_eq!(st.last_error.as_deref(), Some("cannot apply Poison"));
}

#[test]
fn a_rebuild_serves_the_old_state_until_the_new_one_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let want = append_fills(&log, 0, 500);
    let mut p = Projector::<Books>::open(&log, "rb", ProjectorOptions::default()).unwrap();
    p.catch_up().unwrap();
    let readers = p.shared_state();
    assert_eq!(readers.read().net, want);
    // A changed handler (weight 2): rebuild from scratch.
    WEIGHT.with(|w| w.set(2));
    p.rebuild().unwrap();
    WEIGHT.with(|w| w.set(1));
    let doubled: BTreeMap<_, _> = want.iter().map(|(k, v)| (k.clone(), v * 2)).collect();
    assert_eq!(readers.read().net, doubled, "readers see the rebuilt state");
    // The checkpoint holds the rebuilt state: a restart continues from it.
    let p2 = Projector::<Books>::open(&log, "rb", ProjectorOptions::default()).unwrap();
    assert_eq!(p2.shared_state().read().net, doubled);
    // A window of history folds only its events, and no projector's state changes.
    let first_100 = fold_window::<Books>(&log, "window", 0, 100).unwrap();
    let mut w = BTreeMap::new();
    for i in 0..100i64 {
        *w.entry(format!("book-{}", i % 3)).or_default() += (i % 7) - 3;
    }
    assert_eq!(first_100.net, w);
    assert_eq!(readers.read().net, doubled);
}

#[test]
fn a_projection_as_of_a_record_time_and_an_event_time() {
    use tally_engine::Timestamp;
    use tally_engine::aggregate::AsOf;
    use tally_engine::projection::fold_as_of;
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let secs = |s: u64| Timestamp(1_700_000_000_000_000_000 + s * 1_000_000_000);
    let at = |s: u64, book: &str, q: i64| fill(book, q).event_time(secs(s));
    log.append("a", ExpectedVersion::Any, &[at(100, "x", 5)])
        .unwrap();
    log.append("b", ExpectedVersion::Any, &[at(300, "x", 7)])
        .unwrap();
    let known = log
        .read_all(
            tally_engine::Position(1),
            1,
            tally_engine::Direction::Forward,
        )
        .unwrap()[0]
        .record_time;
    std::thread::sleep(Duration::from_millis(2));
    // Late: happened at 200 s, recorded last.
    log.append("c", ExpectedVersion::Any, &[at(200, "x", -2)])
        .unwrap();
    let net = |as_of: AsOf| {
        fold_as_of::<Books>(&log, "pnl", as_of)
            .unwrap()
            .net
            .get("x")
            .copied()
    };
    assert_eq!(net(AsOf::default()), Some(10));
    assert_eq!(
        net(AsOf::known_at(known)),
        Some(12),
        "before the late event was recorded"
    );
    assert_eq!(
        net(AsOf::true_at(secs(250))),
        Some(3),
        "the late event counts where it happened"
    );
    assert_eq!(net(AsOf::true_at(secs(150))), Some(5));
    assert_eq!(
        net(AsOf {
            record_time: Some(known),
            event_time: Some(secs(250))
        }),
        Some(5)
    );
}

/// Counts events, each worth `GATED_WEIGHT`; while `GATED_ARMED`, the event of type `Gate`
/// meets the test at `GATED_BARRIER` twice (so the test can look while a rebuild is
/// halfway).
#[derive(Debug, Default)]
struct Gated(i64);

static GATED_WEIGHT: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(1);
static GATED_ARMED: AtomicBool = AtomicBool::new(false);
static GATED_BARRIER: std::sync::LazyLock<std::sync::Barrier> =
    std::sync::LazyLock::new(|| std::sync::Barrier::new(2));

impl Projection for Gated {
    const STATE_VERSION: u32 = 1;

    fn initial() -> Gated {
        Gated(0)
    }

    fn apply(&mut self, e: &dyn EventView) -> Result<(), String> {
        if e.event_type() == "Gate" && GATED_ARMED.load(Ordering::SeqCst) {
            GATED_BARRIER.wait();
            GATED_BARRIER.wait();
        }
        self.0 += GATED_WEIGHT.load(Ordering::SeqCst);
        Ok(())
    }

    fn encode_state(&self) -> Vec<u8> {
        self.0.to_le_bytes().to_vec()
    }

    fn decode_state(b: &[u8]) -> Option<Gated> {
        Some(Gated(i64::from_le_bytes(b.try_into().ok()?)))
    }
}

#[test]
fn readers_see_the_old_state_and_the_rebuilding_status_while_a_rebuild_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let ev = |t: &str| EventData::new(t, b"x".to_vec());
    for i in 0..300 {
        let t = if i == 150 { "Gate" } else { "Tick" };
        log.append("g", ExpectedVersion::Any, &[ev(t)]).unwrap();
    }
    let mut p = Projector::<Gated>::open(&log, "gated", ProjectorOptions::default()).unwrap();
    p.catch_up().unwrap();
    let state = p.shared_state();
    let status = p.status_handle();
    assert_eq!(state.read().0, 300);
    assert_eq!(status.get().state, ProjectionState::Running);

    // A changed handler (each event worth 10), rebuilt on another thread.
    GATED_WEIGHT.store(10, Ordering::SeqCst);
    GATED_ARMED.store(true, Ordering::SeqCst);
    std::thread::scope(|s| {
        let rebuild = s.spawn(|| p.rebuild());
        // The rebuild has folded the first 150 events into its new state.
        GATED_BARRIER.wait();
        assert_eq!(status.get().state, ProjectionState::Rebuilding);
        assert_eq!(
            state.read().0,
            300,
            "the old state serves during the rebuild"
        );
        GATED_BARRIER.wait();
        rebuild.join().unwrap().unwrap();
    });
    GATED_ARMED.store(false, Ordering::SeqCst);
    assert_eq!(state.read().0, 3000, "the rebuilt state replaced it");
    let s = p.status();
    assert_eq!(s.state, ProjectionState::Running);
    // 300 events and the first checkpoint's manifest (a small state is carried inline):
    // the rebuild's checkpoint covers them.
    assert_eq!(s.checkpoint, Some(301));
    assert_eq!(status.get(), s);

    // A rebuild over a window: only the events from position 200 on.
    p.rebuild_from(200).unwrap();
    assert_eq!(state.read().0, 1000);
    GATED_WEIGHT.store(1, Ordering::SeqCst);
    let reopened = Projector::<Gated>::open(&log, "gated", ProjectorOptions::default()).unwrap();
    assert_eq!(reopened.shared_state().read().0, 1000, "checkpointed");
}
