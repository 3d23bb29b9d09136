//! `tally witness` against a real tallyd across restarts, and `tally verify --trusted`,
//! `--witness` from the command line (the `tally` binary is run for real; the server runs in
//! this process on an ephemeral port and is restarted between observations, since a close
//! writes a checkpoint).
//!
//! Scenario: honest growth is cosigned at each observation and the cosignatures reach the
//! log; `verify --witness --min-witnesses 1` and `--trusted` with the witness's own latest
//! note pass. Then the operator restores an old copy of the directory (a rollback) and the
//! witness refuses it with exit 1, naming both checkpoints; then grows the old copy
//! differently (a fork) and the witness refuses again.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;

use common::{InProcess, stdout, tally};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn append(addr: &str, n: u32, tag: &str) {
    for i in 0..n {
        let o = tally(&[
            "append",
            "--server",
            addr,
            &format!("trade-{}", i % 5),
            "--type",
            "AMEND",
            "--data",
            &format!(r#"{{"n":{i},"tag":"{tag}"}}"#),
        ]);
        assert!(o.status.success(), "{o:?}");
    }
}

/// Appends through a server and stops it: the close writes a checkpoint.
fn grow(dir: &Path, n: u32, tag: &str) {
    let server = InProcess::start(dir);
    append(&server.addr, n, tag);
}

fn observe(wdir: &Path, dir: &Path) -> Output {
    let server = InProcess::start(dir);
    tally(&["witness", "observe", s(wdir), "--server", &server.addr])
}

#[test]
fn a_witness_follows_tallyd_across_restarts_and_refuses_a_rollback_and_a_fork() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let wdir = tmp.path().join("witness");
    let o = tally(&[
        "witness",
        "init",
        s(&wdir),
        "--name",
        "witness.example/risk",
    ]);
    assert!(o.status.success(), "{o:?}");
    let vkey = wdir.join("witness.vkey");

    grow(&dir, 20, "honest");
    let pubkey = tmp.path().join("log.pub");
    let o = tally(&["pubkey", s(&dir)]);
    std::fs::write(&pubkey, &o.stdout).unwrap();
    {
        let server = InProcess::start(&dir);
        let o = tally(&[
            "witness",
            "register",
            s(&wdir),
            "--server",
            &server.addr,
            "--pubkey",
            s(&pubkey),
        ]);
        assert!(o.status.success(), "{o:?}");
    }
    let o = observe(&wdir, &dir);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("cosigned checkpoint"), "{}", stdout(&o));
    let old_copy = tmp.path().join("old-copy");
    copy_dir(&dir, &old_copy);

    grow(&dir, 30, "honest");
    let o = observe(&wdir, &dir);
    assert!(o.status.success(), "{o:?}");
    let out = stdout(&o);
    assert!(out.contains("it extends checkpoint"), "{out}");

    // The cosignatures reached the log: verify counts them, and the witness's own latest
    // note is a checkpoint the log extends.
    let o = tally(&[
        "verify",
        s(&dir),
        "--pubkey",
        s(&pubkey),
        "--witness",
        s(&vkey),
        "--min-witnesses",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["witnesses"]["cosignatures"], 2);
    assert_eq!(v["witnesses"]["newest_witnessed"]["tree_size"], 50);
    let latest = std::fs::read_dir(wdir.join("logs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("latest.note");
    let o = tally(&[
        "verify",
        s(&dir),
        "--pubkey",
        s(&pubkey),
        "--trusted",
        s(&latest),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("extends kept checkpoint"),
        "{}",
        stdout(&o)
    );

    // The operator restores the old copy: a rollback.
    std::fs::remove_dir_all(&dir).unwrap();
    copy_dir(&old_copy, &dir);
    let o = observe(&wdir, &dir);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = stdout(&o);
    assert!(
        out.contains("rolled back") && out.contains("tree size 50") && out.contains("tree size 20"),
        "{out}"
    );
    // The kept note fails it too.
    let o = tally(&[
        "verify",
        s(&dir),
        "--pubkey",
        s(&pubkey),
        "--trusted",
        s(&latest),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));

    // And grows it differently: a fork.
    grow(&dir, 30, "forked");
    let o = observe(&wdir, &dir);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    let out = stdout(&o);
    assert!(out.contains("equivocated"), "{out}");
}

#[test]
fn checkpoint_export_round_trips_through_verify_trusted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let o = tally(&["init", s(&dir)]);
    assert!(o.status.success(), "{o:?}");
    let note = tmp.path().join("empty.note");
    let o = tally(&["checkpoint", s(&dir), "--export"]);
    std::fs::write(&note, &o.stdout).unwrap();
    let pubkey = tmp.path().join("log.pub");
    std::fs::write(&pubkey, tally(&["pubkey", s(&dir)]).stdout).unwrap();
    let o = tally(&[
        "verify",
        s(&dir),
        "--pubkey",
        s(&pubkey),
        "--trusted",
        s(&note),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // --trusted needs --pubkey.
    let o = tally(&["verify", s(&dir), "--trusted", s(&note)]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // A changed note is refused (its signature fails).
    let text = std::fs::read_to_string(&note)
        .unwrap()
        .replacen("\n0\n", "\n1\n", 1);
    std::fs::write(&note, text).unwrap();
    let o = tally(&[
        "verify",
        s(&dir),
        "--pubkey",
        s(&pubkey),
        "--trusted",
        s(&note),
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("kept checkpoint"),
        "{o:?}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn producer_signed_appends_through_tallyd_and_verify_producers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    assert!(tally(&["init", s(&dir)]).status.success());
    let key = tmp.path().join("oms.key");
    let o = tally(&["keygen", s(&key)]);
    assert!(o.status.success(), "{o:?}");
    let pubkey = tmp.path().join("oms.pub");
    let o = tally(&["pubkey", "--key", s(&key)]);
    assert!(o.status.success(), "{o:?}");
    std::fs::write(&pubkey, &o.stdout).unwrap();
    let why = ["--actor", "alice", "--reason", "OMS go-live"];
    let mut args = vec![
        "producer",
        "register",
        s(&dir),
        "--pubkey",
        s(&pubkey),
        "--name",
        "oms",
        "--prefix",
        "trade-",
    ];
    args.extend_from_slice(&why);
    let o = tally(&args);
    assert!(o.status.success(), "{o:?}");
    let mut args = vec!["producer", "require", s(&dir), "--prefix", "trade-"];
    args.extend_from_slice(&why);
    assert!(tally(&args).status.success());
    let o = tally(&["producer", "list", s(&dir)]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("key oms") && out.contains("require trade-"),
        "{out}"
    );
    {
        let server = InProcess::start(&dir);
        let a = server.addr.as_str();
        let append = |extra: &[&str]| {
            let mut args = vec![
                "append", "--server", a, "trade-1", "--type", "NEW", "--data", "{}",
            ];
            args.extend_from_slice(extra);
            tally(&args)
        };
        let o = append(&["--sign-key", s(&key)]);
        assert!(o.status.success(), "{o:?}");
        let o = append(&[]);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("must be signed"),
            "{o:?}"
        );
        // Another key, not registered.
        let other = tmp.path().join("other.key");
        assert!(tally(&["keygen", s(&other)]).status.success());
        let o = append(&["--sign-key", s(&other)]);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("not a registered producer key"),
            "{o:?}"
        );
    }
    let trust = tmp.path().join("producers.trust");
    let pk = String::from_utf8_lossy(&std::fs::read(&pubkey).unwrap())
        .trim()
        .to_owned();
    std::fs::write(&trust, format!("key oms {pk} trade-\nrequire trade-\n")).unwrap();
    let o = tally(&["verify", s(&dir), "--producers", s(&trust), "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["producers"]["signed_batches"], 1);
}
