//! Helpers shared by the `tally` integration tests that need a server in this process and
//! the real `tally` binary.

#![allow(clippy::unwrap_used, dead_code)]

use std::process::{Command, Output};
use std::time::Duration;

use tally_server::server::{Config, Server};

/// A server on an ephemeral port, running on its own runtime thread until dropped.
pub struct InProcess {
    pub addr: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    pub fn start(dir: &std::path::Path) -> InProcess {
        InProcess::start_with(dir, |_| {})
    }

    /// [`InProcess::start`] with the configuration changed by `edit` first.
    #[allow(dead_code)]
    pub fn start_with(dir: &std::path::Path, edit: impl FnOnce(&mut Config)) -> InProcess {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut cfg = Config::new(dir);
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        edit(&mut cfg);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = Server::bind(cfg).await.unwrap();
                addr_tx
                    .send(server.local_addr().unwrap().to_string())
                    .unwrap();
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        InProcess {
            addr: addr_rx.recv_timeout(Duration::from_secs(30)).unwrap(),
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What a command that must succeed printed (the test fails with its output otherwise).
pub fn succeeded(o: &Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o)
}

/// The JSON a successful command printed (the test fails with its output otherwise).
pub fn success_json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&succeeded(o)).unwrap()
}
