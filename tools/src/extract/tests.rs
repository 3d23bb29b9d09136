//! Format 3 extracts written from real logs and verified: round trips at every boundary
//! of the proof's shape, and every change refused with a message that says what changed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Cursor;
use std::path::Path;

use clap::Parser;
use tally_engine::{Direction, Durability, EventData, ExpectedVersion, Log, Options, Position};

use super::check::{Tuning, verify};
use super::codec::Reader;
use crate::commands::audit::{Checked, Completeness, ExtractArgs};
use crate::support::Finding;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: ExtractArgs,
}

/// A log of `n` events: stream `a` holds positions `i % 3 != 1`, stream `b` the others;
/// even positions share correlation id `even`. One append per event (so record times
/// rise) up to 2,000 events, then batches of 1,000. Returns the log's public key.
fn log(dir: &Path, n: u64) -> [u8; 32] {
    let log = Log::open(
        dir,
        Options {
            durability: Durability::None,
            segment_bytes: 1 << 20,
            ..Options::default()
        },
    )
    .unwrap();
    let event = |i: u64| {
        let e = EventData::json("AMEND", format!(r#"{{"i":{i}}}"#));
        if i.is_multiple_of(2) {
            e.correlation_id("even")
        } else {
            e
        }
    };
    let stream = |i: u64| if i % 3 == 1 { "b" } else { "a" };
    let mut i = 0;
    while i < n {
        if n <= 2000 {
            log.append(stream(i), ExpectedVersion::Any, &[event(i)])
                .unwrap();
            i += 1;
        } else {
            let batch: Vec<EventData> = (i..(i + 1000).min(n)).map(event).collect();
            log.append("a", ExpectedVersion::Any, &batch).unwrap();
            i += batch.len() as u64;
        }
    }
    let key = log.public_key().unwrap();
    log.close().unwrap();
    key
}

fn extract(dir: &Path, out: &Path, args: &[&str]) -> Vec<u8> {
    let mut argv = vec!["x", dir.to_str().unwrap(), "--out", out.to_str().unwrap()];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    crate::commands::audit::extract(&cli.a).unwrap();
    std::fs::read(out).unwrap()
}

fn check(bytes: &[u8], key: &[u8; 32]) -> Result<Checked, Finding> {
    check_with_blobs(bytes, key, None)
}

fn check_with_blobs(
    bytes: &[u8],
    key: &[u8; 32],
    blobs: Option<&Path>,
) -> Result<Checked, Finding> {
    let mut input = Cursor::new(bytes);
    let Some(form) = Reader::sniff(&mut input).unwrap() else {
        return Err(Finding("not a format 3 extract".into()));
    };
    // Small batches over two workers, so that batches are folded out of the order they
    // finish in.
    let tuning = Tuning {
        workers: 2,
        buffer_bytes: 64 << 10,
    };
    verify(
        input,
        form,
        &[*key],
        tuning,
        None,
        blobs,
        &indicatif::ProgressBar::hidden(),
    )
}

fn record_time(dir: &Path, p: u64) -> u64 {
    let log = crate::support::open_read_only(dir).unwrap();
    log.read_all(Position(p), 1, Direction::Forward).unwrap()[0]
        .record_time
        .0
}

#[test]
fn round_trips_at_every_boundary_of_the_proof() {
    let tmp = tempfile::tempdir().unwrap();
    for n in [
        1u64, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65, 127, 128, 129, 1024, 1025,
    ] {
        let dir = tmp.path().join(format!("log-{n}"));
        let key = log(&dir, n);
        let out = dir.with_extension("x");
        let lines = ["--lines"];
        for form in [&[][..], &lines[..]] {
            let mut args = vec!["--stream", "a"];
            args.extend_from_slice(form);
            let c = check(&extract(&dir, &out, &args), &key).unwrap();
            let want = (0..n).filter(|i| i % 3 != 1).count();
            assert_eq!(c.events, want, "stream a of {n}");
            assert!(matches!(c.kind, Completeness::Stream(ref s) if s == "a"));
            if n >= 2 {
                let mut args = vec!["--stream", "b"];
                args.extend_from_slice(form);
                let c = check(&extract(&dir, &out, &args), &key).unwrap();
                assert_eq!(c.events, (0..n).filter(|i| i % 3 == 1).count(), "b of {n}");
            }
            let mut args = vec!["--correlation", "even"];
            args.extend_from_slice(form);
            let c = check(&extract(&dir, &out, &args), &key).unwrap();
            assert_eq!(c.events as u64, n.div_ceil(2), "correlation of {n}");
            assert!(matches!(c.kind, Completeness::Inclusion(_)));
            // Windows: the whole log, and its middle third (edges on both sides).
            for (a, b) in [(0, n), (n / 3, 2 * n / 3)] {
                if a >= b {
                    continue;
                }
                let from = record_time(&dir, a).to_string();
                let to = if b == n {
                    u64::MAX - 1
                } else {
                    record_time(&dir, b)
                }
                .to_string();
                let mut args = vec!["--from-time", &from, "--to-time", &to];
                args.extend_from_slice(form);
                let c = check(&extract(&dir, &out, &args), &key).unwrap();
                assert_eq!(c.events as u64, b - a, "window {a}..{b} of {n}");
                assert!(
                    matches!(c.kind, Completeness::Window(_, _, x, y) if (x, y) == (a, b)),
                    "{:?}",
                    c.kind
                );
            }
        }
    }
}

#[test]
fn a_hundred_thousand_events_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = log(&dir, 100_000);
    let out = tmp.path().join("x");
    let bytes = extract(&dir, &out, &["--stream", "a"]);
    let c = check(&bytes, &key).unwrap();
    assert_eq!(c.events, 100_000);
    let bytes = extract(&dir, &out, &["--correlation", "even", "--lines"]);
    let c = check(&bytes, &key).unwrap();
    assert_eq!(c.events, 50_000);
}

/// Positions and lengths of the frames after the head of a binary extract.
fn frames(bytes: &[u8]) -> (usize, Vec<(usize, usize)>) {
    let head_len = u32::from_le_bytes(bytes[13..17].try_into().unwrap()) as usize;
    let start = 17 + head_len;
    let mut at = start;
    let mut out = Vec::new();
    while bytes[at] != super::codec::FRAME_TRAILER {
        let gaps = bytes[at + 1] as usize;
        let header = at + 2 + 32 * gaps + 32;
        let body_len = u32::from_le_bytes(bytes[header + 4..header + 8].try_into().unwrap());
        let len = 2 + 32 * gaps + 32 + 88 + body_len as usize;
        out.push((at, len));
        at += len;
    }
    (start, out)
}

#[test]
fn every_byte_after_the_head_is_covered() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = log(&dir, 33);
    let out = tmp.path().join("x");
    let from = record_time(&dir, 10).to_string();
    let to = record_time(&dir, 20).to_string();
    for args in [
        &["--stream", "b"][..],
        &["--from-time", &from, "--to-time", &to][..],
        &["--correlation", "even"][..],
    ] {
        let bytes = extract(&dir, &out, args);
        check(&bytes, &key).unwrap();
        let (start, _) = frames(&bytes);
        for i in (0..start - 1).filter(|&i| i < 17).chain(start..bytes.len()) {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(
                check(&b, &key).is_err(),
                "{args:?}: flipping byte {i} of {} still verifies",
                bytes.len()
            );
        }
    }
}

fn failure(bytes: &[u8], key: &[u8; 32]) -> String {
    check(bytes, key).expect_err("must fail").0
}

#[test]
fn each_change_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = log(&dir, 40);
    let out = tmp.path().join("x");
    let bytes = extract(&dir, &out, &["--stream", "b"]);
    let (start, recs) = frames(&bytes);
    let (at, len) = recs[3];
    let gaps = bytes[at + 1] as usize;
    let body = at + 2 + 32 * gaps + 32 + 88;
    // A payload byte: the header's checksum of the body catches it.
    let mut b = bytes.clone();
    b[body + len - (body - at) - 2] ^= 0x20;
    assert!(failure(&b, &key).contains("events[3] (position 10): the body does not match"));
    // The record hash before it.
    let mut b = bytes.clone();
    b[at + 2 + 32 * gaps] ^= 1;
    assert!(failure(&b, &key).contains("events[3] (position 10): the record hash computed"));
    // A proof node.
    let (at1, _) = recs[1];
    assert!(bytes[at1 + 1] > 0);
    let mut b = bytes.clone();
    b[at1 + 2] ^= 1;
    assert!(failure(&b, &key).contains("the Merkle root computed from the extract's 13 records"));
    // A proof node left out: the count byte.
    let mut b = bytes.clone();
    b[at1 + 1] -= 1;
    let f = failure(&b, &key);
    assert!(f.starts_with("events[1]") || f.contains("record 1"), "{f}");
    // An event left out, with its proof nodes: the stream's versions show it.
    let mut b = bytes[..recs[3].0].to_vec();
    b.extend_from_slice(&bytes[recs[4].0..]);
    assert!(failure(&b, &key).contains("version 4 where version 3 must be"));
    // The newest event cut (and the trailer's count with it).
    let trailer = recs.last().map(|(a, l)| a + l).unwrap();
    let mut b = bytes[..recs.last().unwrap().0].to_vec();
    b.extend_from_slice(&bytes[trailer..]);
    let f = failure(&b, &key);
    assert!(
        f.contains("the trailer counts 13 events, the extract holds 12"),
        "{f}"
    );
    // The count alone.
    let text =
        String::from_utf8_lossy(&bytes[trailer + 5..]).replace("\"events\":13", "\"events\":14");
    let mut b = bytes[..trailer + 1].to_vec();
    b.extend_from_slice(&(text.len() as u32).to_le_bytes());
    b.extend_from_slice(text.as_bytes());
    assert!(failure(&b, &key).contains("the trailer counts 14 events"));
    // Truncated anywhere.
    for cut in [start + 10, recs[5].0 + 40, trailer + 3, bytes.len() - 1] {
        let f = failure(&bytes[..cut], &key);
        assert!(f.contains("truncated"), "cut at {cut}: {f}");
    }
    // The checkpoint: its readable copy, and its signed bytes.
    let head_len = u32::from_le_bytes(bytes[13..17].try_into().unwrap()) as usize;
    let head = std::str::from_utf8(&bytes[17..17 + head_len]).unwrap();
    let edit = |from: &str, to: &str| {
        let h = head.replacen(from, to, 1);
        assert_ne!(h, head);
        let mut b = bytes[..13].to_vec();
        b.extend_from_slice(&(h.len() as u32).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        b.extend_from_slice(&bytes[17 + head_len..]);
        failure(&b, &key)
    };
    assert!(
        edit("\"tree_size\":40", "\"tree_size\":39")
            .contains("checkpoint: the readable fields differ")
    );
    let entry = head.find("\"entry\":\"").unwrap() + 9;
    let digit = &head[entry + 100..entry + 101];
    let other = if digit == "0" { "1" } else { "0" };
    let mut h = head.to_owned();
    h.replace_range(entry + 100..entry + 101, other);
    assert!(edit(head, &h).starts_with("checkpoint"));
    // A wrong key.
    assert!(failure(&bytes, &[7; 32]).contains("checkpoint"));
}

#[test]
fn the_lines_form_names_changes_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = log(&dir, 40);
    let out = tmp.path().join("x");
    let bytes = extract(&dir, &out, &["--stream", "a", "--lines"]);
    let text = String::from_utf8(bytes.clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("{\"format\":\"tally-audit-extract/3\""));
    assert!(lines[1].starts_with("{\"event\":{\"gap\":["));
    assert!(lines.last().unwrap().starts_with("{\"trailer\":{"));
    // Two events swapped.
    let mut l = lines.clone();
    l.swap(3, 4);
    let f = failure((l.join("\n") + "\n").as_bytes(), &key);
    assert!(f.contains("events[2]"), "{f}");
    // A line dropped.
    let mut l = lines.clone();
    l.remove(5);
    let f = failure((l.join("\n") + "\n").as_bytes(), &key);
    assert!(f.contains("events[4]"), "{f}");
    // The trailer dropped.
    let l = &lines[..lines.len() - 1];
    let f = failure((l.join("\n") + "\n").as_bytes(), &key);
    assert!(f.contains("not a trailer"), "{f}");
}

/// The published test vectors (docs/EXTRACT.md 6.7): each file verifies to what
/// `expected.txt` says. `TALLY_WRITE_VECTORS=1` writes them anew from a fresh log first.
#[test]
fn the_published_vectors_verify_as_expected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/extract-v3");
    if std::env::var_os("TALLY_WRITE_VECTORS").is_some() {
        write_vectors(&dir);
    }
    let key = tally_engine::format::checkpoint::parse_public_keys(
        &std::fs::read_to_string(dir.join("log.pub")).unwrap(),
    )
    .unwrap()[0];
    let expected = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
    let mut checked = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (file, want) = line.split_once(' ').unwrap();
        let c = check(&std::fs::read(dir.join(file)).unwrap(), &key).unwrap();
        assert_eq!(describe(&c), want, "{file}");
        checked += 1;
    }
    assert_eq!(checked, 4);
}

/// `ok EVENTS KIND [DETAIL]`, as expected.txt has it.
fn describe(c: &Checked) -> String {
    match &c.kind {
        Completeness::Stream(s) => format!("ok {} stream {s}", c.events),
        Completeness::Window(_, _, a, b) => format!("ok {} window {a} {b}", c.events),
        Completeness::Inclusion(_) => format!("ok {} inclusion", c.events),
    }
}

fn write_vectors(dir: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = Log::open(&data, Options::default()).unwrap();
    for i in 0..37u64 {
        let mut e = EventData::json(
            ["NEW", "AMEND", "SETTLE"][(i % 3) as usize],
            format!(r#"{{"trade":"T-{}","qty":"{}.00"}}"#, i % 3 + 1, 100 + i),
        )
        .actor("alice");
        if i % 4 == 0 {
            e = e.correlation_id("order-7");
        }
        log.append(&format!("trade-{}", i % 3 + 1), ExpectedVersion::Any, &[e])
            .unwrap();
        if i == 11 || i == 24 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let key = log.public_key().unwrap();
    log.close().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("log.pub"),
        tally_engine::format::checkpoint::encode_public_key(&key),
    )
    .unwrap();
    let from = record_time(&data, 12).to_string();
    let to = record_time(&data, 25).to_string();
    let mut expected = String::from(
        "# file, then what it verifies to: ok EVENTS stream S | window A B | inclusion\n",
    );
    for (file, args) in [
        ("stream.tex", vec!["--stream", "trade-2"]),
        ("stream.jsonl", vec!["--stream", "trade-2", "--lines"]),
        ("window.tex", vec!["--from-time", &from, "--to-time", &to]),
        ("correlation.tex", vec!["--correlation", "order-7"]),
    ] {
        let bytes = extract(&data, &dir.join(file), &args);
        let c = check(&bytes, &key).unwrap();
        expected.push_str(&format!("{file} {}\n", describe(&c)));
    }
    std::fs::write(dir.join("expected.txt"), expected).unwrap();
}

/// The published vectors with blobs (docs/EXTRACT.md 6.7): a stream extract of a log whose
/// attachments are blobs, with the blobs copied beside it (`--blobs`), verifies to what
/// `expected.txt` says with every blob checked, and a changed blob file is a finding.
/// `TALLY_WRITE_VECTORS=1` writes them anew first.
#[test]
fn the_published_blob_vectors_verify_with_their_blobs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/extract-v3-blobs");
    if std::env::var_os("TALLY_WRITE_VECTORS").is_some() {
        write_blob_vectors(&dir);
    }
    let key = tally_engine::format::checkpoint::parse_public_keys(
        &std::fs::read_to_string(dir.join("log.pub")).unwrap(),
    )
    .unwrap()[0];
    let expected = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
    let (file, want) = expected
        .lines()
        .find(|l| !l.starts_with('#') && !l.is_empty())
        .and_then(|l| l.split_once(' '))
        .unwrap();
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let blobs = dir.join("blobs");
    let c = check_with_blobs(&bytes, &key, Some(&blobs)).unwrap();
    assert_eq!(describe(&c), want);
    // Each blob file is checked: a copy with one byte changed is a finding.
    let tmp = tempfile::tempdir().unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    for n in &names {
        std::fs::copy(blobs.join(n), tmp.path().join(n)).unwrap();
    }
    let victim = tmp.path().join(&names[0]);
    let mut b = std::fs::read(&victim).unwrap();
    b[0] ^= 1;
    std::fs::write(&victim, &b).unwrap();
    let f = check_with_blobs(&bytes, &key, Some(tmp.path())).unwrap_err();
    assert!(f.0.contains("do not match"), "{}", f.0);
}

fn write_blob_vectors(dir: &Path) {
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let store: Arc<dyn tally_engine::cold::ColdStore> =
        Arc::new(tally_engine::cold::DirStore::new(tmp.path().join("store")).unwrap());
    let log = Log::open(
        &data,
        Options {
            cold: tally_engine::ColdOptions {
                store: Some(store),
                blob_threshold: 256,
                ..tally_engine::ColdOptions::default()
            },
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..12u64 {
        let e = if i % 4 == 1 {
            // A confirmation document of a few hundred bytes: a blob.
            let doc: Vec<u8> = (0..300 + i * 50).map(|k| (k * 7 + i) as u8).collect();
            EventData::new("ConfirmationAttached", doc)
        } else {
            EventData::json(
                ["NEW", "AMEND", "SETTLE"][(i % 3) as usize],
                format!(r#"{{"trade":"T-{}","qty":"{}.00"}}"#, i % 2 + 1, 100 + i),
            )
        }
        .actor("alice");
        log.append(&format!("trade-{}", i % 2 + 1), ExpectedVersion::Any, &[e])
            .unwrap();
    }
    let key = log.public_key().unwrap();
    log.close().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("log.pub"),
        tally_engine::format::checkpoint::encode_public_key(&key),
    )
    .unwrap();
    let blobs = dir.join("blobs");
    let bytes = extract(
        &data,
        &dir.join("stream.tex"),
        &["--stream", "trade-2", "--blobs", blobs.to_str().unwrap()],
    );
    let c = check_with_blobs(&bytes, &key, Some(&blobs)).unwrap();
    std::fs::write(
        dir.join("expected.txt"),
        format!(
            "# file, then what it verifies to, with every blob in blobs/ checked\nstream.tex {}\n",
            describe(&c)
        ),
    )
    .unwrap();
}

/// The published vectors with removed events (docs/EXTRACT.md 6.7): a stream extract of a
/// format version 4 log whose older events retention removed verifies to what
/// `expected.txt` says, complete, with each removed event carried as its pruned record, and
/// every single-bit change after the head is a finding. `TALLY_WRITE_VECTORS=1` writes them
/// anew first.
#[test]
fn the_published_removed_vectors_verify_complete() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/extract-v4-removed");
    if std::env::var_os("TALLY_WRITE_VECTORS").is_some() {
        write_removed_vectors(&dir);
    }
    let key = tally_engine::format::checkpoint::parse_public_keys(
        &std::fs::read_to_string(dir.join("log.pub")).unwrap(),
    )
    .unwrap()[0];
    let expected = std::fs::read_to_string(dir.join("expected.txt")).unwrap();
    let (file, want) = expected
        .lines()
        .find(|l| !l.starts_with('#') && !l.is_empty())
        .and_then(|l| l.split_once(' '))
        .unwrap();
    let bytes = std::fs::read(dir.join(file)).unwrap();
    assert_eq!(describe(&check(&bytes, &key).unwrap()), want);
    // One bit of every byte after the head frame (preamble, kind, length, JSON: EXTRACT.md
    // 6.2): the records, pruned ones among them, and the trailer.
    let head_end = 17 + u32::from_le_bytes(bytes[13..17].try_into().unwrap()) as usize;
    // The trailer frame: kind 5 and a length that reaches the end. A hex digit's case in its
    // JSON is the same bytes read either way (EXTRACT.md 2), so that flip is not a change.
    let trailer = (head_end..bytes.len())
        .rev()
        .find(|&p| {
            bytes[p] == 5
                && p + 5 <= bytes.len()
                && u32::from_le_bytes(bytes[p + 1..p + 5].try_into().unwrap()) as usize
                    == bytes.len() - p - 5
        })
        .unwrap();
    let (mut caught, mut tried) = (0, 0);
    for i in head_end..bytes.len() {
        if i > trailer
            && i % 8 == 5
            && bytes[i].is_ascii_hexdigit()
            && bytes[i].is_ascii_alphabetic()
        {
            continue;
        }
        let mut t = bytes.clone();
        t[i] ^= 1 << (i % 8);
        tried += 1;
        caught += usize::from(check(&t, &key).is_err());
    }
    assert_eq!(caught, tried, "every flipped bit is a finding");
}

fn write_removed_vectors(dir: &Path) {
    use tally_engine::governance::{Keep, PolicyScope, PolicySet};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = Log::open(
        &data,
        Options {
            segment_bytes: 64 << 10,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..12u64 {
        let e = EventData::json(
            ["NEW", "AMEND", "SETTLE"][(i % 3) as usize],
            format!(
                r#"{{"trade":"T-{}","client":"Jane Doe","qty":"{}.00"}}"#,
                i % 2 + 1,
                100 + i
            ),
        )
        .actor("alice");
        log.append(&format!("trade-{}", i % 2 + 1), ExpectedVersion::Any, &[e])
            .unwrap();
    }
    // Filler seals the trades' segment; the policy keeps each trade's newest two events.
    for n in 0..300u64 {
        let e = EventData::json("Pad", format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(300)));
        log.append("filler", ExpectedVersion::Any, &[e]).unwrap();
    }
    log.wait_sealed().unwrap();
    log.set_retention_policy(
        &PolicySet {
            name: "trades-newest-2".into(),
            scope: PolicyScope::Prefix("trade-".into()),
            keep: Keep::Newest { count: 2 },
            reason: "vectors".into(),
        },
        "compliance",
    )
    .unwrap();
    let run = log
        .apply_retention(tally_engine::now(), "ops", "vectors")
        .unwrap();
    assert_eq!(run.removed, 8);
    let key = log.public_key().unwrap();
    log.close().unwrap();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("log.pub"),
        tally_engine::format::checkpoint::encode_public_key(&key),
    )
    .unwrap();
    let bytes = extract(&data, &dir.join("stream.tex"), &["--stream", "trade-2"]);
    let c = check(&bytes, &key).unwrap();
    std::fs::write(
        dir.join("expected.txt"),
        format!(
            "# file, then what it verifies to; versions 0 to 3 of trade-2 were removed by retention\nstream.tex {}\n",
            describe(&c)
        ),
    )
    .unwrap();
}

/// A format 2 extract kept as a file (a stream extract with its completeness proof,
/// docs/vectors/extract-v2, written by `tally extract --format 2`, whose writer is the one
/// format 2 shipped with) still verifies, to what it did then. `TALLY_WRITE_VECTORS=1`
/// writes it anew.
#[test]
fn a_format_2_extract_still_verifies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/extract-v2");
    if std::env::var_os("TALLY_WRITE_VECTORS").is_some() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let key = log(&data, 21);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("log.pub"),
            tally_engine::format::checkpoint::encode_public_key(&key),
        )
        .unwrap();
        extract(
            &data,
            &dir.join("stream-b.json"),
            &["--stream", "b", "--format", "2"],
        );
    }
    let key = tally_engine::format::checkpoint::parse_public_keys(
        &std::fs::read_to_string(dir.join("log.pub")).unwrap(),
    )
    .unwrap()[0];
    let text = std::fs::read_to_string(dir.join("stream-b.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = crate::commands::audit::check_extract(&doc, &[key]).unwrap();
    assert_eq!(describe(&c), "ok 7 stream b");
    let mut changed = doc.clone();
    changed["events"][3]["record"]["prev_record_hash"] = serde_json::json!("00".repeat(32));
    assert!(crate::commands::audit::check_extract(&changed, &[key]).is_err());
}

/// A version 1 log (no stream heads, record times that may decrease): every selection
/// proves inclusion only, and says why.
#[test]
fn a_version_1_log_gives_inclusion_only_extracts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v1");
    let log = Log::open(
        &dir,
        Options {
            format_version: 1,
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..20u64 {
        log.append(
            if i % 2 == 0 { "a" } else { "b" },
            ExpectedVersion::Any,
            &[EventData::json("NEW", "{}")],
        )
        .unwrap();
    }
    let key = log.public_key().unwrap();
    log.close().unwrap();
    let out = tmp.path().join("x");
    for (args, n) in [
        (vec!["--stream", "b"], 10),
        (
            vec!["--from-time", "0", "--to-time", "18446744073709551614"],
            20,
        ),
    ] {
        let c = check(&extract(&dir, &out, &args), &key).unwrap();
        assert_eq!(c.events, n);
        assert!(
            matches!(&c.kind, Completeness::Inclusion(why) if why.starts_with("format version 1 log")),
            "{:?}",
            c.kind
        );
    }
}

/// Hostile bytes give a finding, never a panic: a panic in the reader or a worker would
/// show as "the reader failed" or "a worker failed".
#[test]
fn hostile_bytes_give_findings_not_panics() {
    use proptest::prelude::*;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = log(&dir, 50);
    let out = tmp.path().join("x");
    let binary = extract(&dir, &out, &["--stream", "a"]);
    let lines = extract(&dir, &out, &["--stream", "a", "--lines"]);
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 300,
        ..Default::default()
    });
    let edits = proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6);
    runner
        .run(&(any::<bool>(), edits), |(text, edits)| {
            let mut b = if text { lines.clone() } else { binary.clone() };
            for (at, byte, how) in edits {
                // Edits stay after the 17-byte magic (a truncation may have left nothing
                // after it: no more edits then).
                if b.len() <= 17 {
                    break;
                }
                let at = 17 + at % (b.len() - 17);
                match how {
                    0 => b[at] = byte,
                    1 => b.insert(at, byte),
                    _ => b.truncate(at),
                }
            }
            if let Err(f) = check(&b, &key) {
                prop_assert!(
                    !f.0.contains("failed: a worker") && !f.0.contains("reader failed"),
                    "{}",
                    f.0
                );
                prop_assert!(!f.0.contains("a worker failed"), "{}", f.0);
            }
            Ok(())
        })
        .unwrap();
}

/// A window that holds no event (which `extract` never writes, but a verifier must judge):
/// its edge records prove it empty only at the positions the trailer names.
#[test]
fn an_empty_window_is_tied_to_its_edges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let key = log(&dir, 30);
    let out = tmp.path().join("x");
    let (t9, t10) = (record_time(&dir, 9), record_time(&dir, 10));
    assert!(t9 < t10);
    let bytes = extract(
        &dir,
        &out,
        &[
            "--from-time",
            &t10.to_string(),
            "--to-time",
            &record_time(&dir, 12).to_string(),
        ],
    );
    check(&bytes, &key).unwrap();
    let (start, recs) = frames(&bytes);
    // Keep the record before (position 9) and turn the first event (position 10) into the
    // record after: the window [t9 + 1, t10) holds no record, and its end is position 10.
    let (b_at, b_len) = recs[0];
    let (e_at, e_len) = recs[1];
    let head_len = u32::from_le_bytes(bytes[13..17].try_into().unwrap()) as usize;
    let head: serde_json::Value = serde_json::from_slice(&bytes[17..17 + head_len]).unwrap();
    let size = head["checkpoint"]["tree_size"].as_u64().unwrap();
    let rebuild = |first: u64, end: u64| {
        let mut h = head.clone();
        h["selection"]["from_time"] = serde_json::json!((t9 + 1).to_string());
        h["selection"]["to_time"] = serde_json::json!(t10.to_string());
        let h = serde_json::to_vec(&h).unwrap();
        let mut b = bytes[..13].to_vec();
        b.extend_from_slice(&(h.len() as u32).to_le_bytes());
        b.extend_from_slice(&h);
        assert_eq!(start, 17 + head_len);
        b.extend_from_slice(&bytes[b_at..b_at + b_len]);
        let mut after = bytes[e_at..e_at + e_len].to_vec();
        after[0] = super::codec::FRAME_AFTER;
        b.extend_from_slice(&after);
        let log = crate::support::open_read_only(&dir).unwrap();
        let gap: Vec<String> = log
            .prove_gap(11, size, size)
            .unwrap()
            .iter()
            .map(|g| tally_engine::format::proof::hex(g))
            .collect();
        let t = serde_json::to_vec(&serde_json::json!({
            "events": 0, "gap": gap, "first_position": first, "end_position": end,
        }))
        .unwrap();
        b.push(super::codec::FRAME_TRAILER);
        b.extend_from_slice(&(t.len() as u32).to_le_bytes());
        b.extend_from_slice(&t);
        b
    };
    let c = check(&rebuild(10, 10), &key).unwrap();
    assert_eq!(describe(&c), "ok 0 window 10 10");
    for (a, b) in [(4, 4), (20, 20), (10, 11)] {
        let f = failure(&rebuild(a, b), &key);
        assert!(f.contains("window"), "{a}..{b}: {f}");
    }
}
