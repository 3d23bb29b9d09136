//! Starts the real `tallyd` binary on an ephemeral port with a data directory.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running `tallyd`.
pub struct Tallyd {
    child: Option<Child>,
    pub addr: String,
    pub data: PathBuf,
}

impl Tallyd {
    /// The server process's resident memory in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS:")
    }

    /// The server process's resident anonymous memory in bytes (`RssAnon`: the heap and
    /// stacks, without the pages of mapped segment files, which the kernel can drop).
    pub fn rss_anon_bytes(&self) -> u64 {
        self.status_bytes("RssAnon:")
    }

    fn status_bytes(&self, field: &str) -> u64 {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc");
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// Starts `tallyd --data DATA --listen 127.0.0.1:0` with `extra` arguments and waits
    /// until it listens.
    pub fn start(data: &Path, extra: &[&str]) -> Tallyd {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
        cmd.arg("--data").arg(data).args(["--log", "info"]);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(extra);
        Tallyd::spawn(cmd, data)
    }

    /// Starts `tallyd` with no flags but `--log info`, configured by the environment
    /// variables `env` alone (the data directory must be among them).
    pub fn start_with_env(data: &Path, env: &[(&str, &str)]) -> Tallyd {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
        cmd.args(["--log", "info"]);
        for var in [
            "TALLYD_DATA",
            "TALLYD_LISTEN",
            "TALLYD_CONFIG",
            "TALLYD_DURABILITY",
            "TALLYD_MAX_CONNECTIONS",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(env.iter().copied());
        Tallyd::spawn(cmd, data)
    }

    fn spawn(mut cmd: Command, data: &Path) -> Tallyd {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tallyd starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[tallyd] {line}");
                if line.contains("listening")
                    && let Some(at) = line.find("addr=")
                {
                    let addr: String = line[at + 5..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("tallyd reports its address");
        Tallyd {
            child: Some(child),
            addr,
            data: data.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(child.id(), "TERM");
        wait_timeout(&mut child, Duration::from_secs(30))
    }

    /// Waits for an exit caused by a signal sent otherwise.
    pub fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        wait_timeout(&mut child, Duration::from_secs(30))
    }

    /// SIGKILL.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

impl Drop for Tallyd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn wait_timeout(child: &mut Child, t: Duration) -> ExitStatus {
    let deadline = std::time::Instant::now() + t;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("tallyd did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A multi-threaded runtime for a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Writes a config file with a small segment size (so that tests roll segments).
pub fn small_segments_config(dir: &Path) -> PathBuf {
    let p = dir.join("tallyd.toml");
    std::fs::write(&p, "segment_mib = 1\nshutdown_timeout_ms = 5000\n").unwrap();
    p
}
