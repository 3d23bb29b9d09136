//! `tallyd`: Tally's TCP protocol server.
//!
//! ```text
//! tallyd --data DIR [--listen 127.0.0.1:7878] [--config tallyd.toml]
//! ```
//!
//! Settings come from, in order of precedence: command-line flags, `TALLYD_*` environment
//! variables, the TOML file given by `--config` (or `TALLYD_CONFIG`), and defaults. Logs go
//! to stderr through `tracing` (`RUST_LOG` or `--log` sets the level). SIGTERM and SIGINT
//! shut down gracefully: no new connections, in-flight requests finish, the log closes,
//! exit status 0.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde::Deserialize;
use tally_engine::{Durability, Options, RecoveryMode};
use tally_server::protocol::DEFAULT_PORT;
use tally_server::server::{Config, Server};

/// Tally's TCP protocol server.
#[derive(Parser, Debug)]
#[command(name = "tallyd", version, about)]
struct Cli {
    /// Data directory (created on first start).
    #[arg(long, env = "TALLYD_DATA")]
    data: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7878).
    #[arg(long, env = "TALLYD_LISTEN")]
    listen: Option<SocketAddr>,
    /// A TOML configuration file (keys as in docs/OPERATIONS.md, "tallyd").
    #[arg(long, env = "TALLYD_CONFIG")]
    config: Option<PathBuf>,
    /// When appends are acknowledged.
    #[arg(long, env = "TALLYD_DURABILITY", value_enum)]
    durability: Option<DurabilityArg>,
    /// Most open connections.
    #[arg(long, env = "TALLYD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Log level filter for stderr (for example `info`, `tallyd=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
    /// A witness's key file (vkey lines, as `tally verify --witness` reads): only the
    /// witnesses named take part in ADD_COSIGNATURE. Repeatable; with none, any
    /// cosignature that verifies is taken.
    #[arg(long = "witness-key")]
    witness_key: Vec<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum DurabilityArg {
    Fsync,
    Batched,
    None,
}

/// The TOML file. Every key is optional.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data: Option<PathBuf>,
    listen: Option<SocketAddr>,
    durability: Option<DurabilityArg>,
    batched_delay_ms: Option<u64>,
    segment_mib: Option<u64>,
    max_connections: Option<usize>,
    witness_keys: Option<Vec<PathBuf>>,
    max_inflight: Option<u32>,
    max_subscriptions: Option<u32>,
    max_frame_bytes: Option<u32>,
    max_append_events: Option<u32>,
    handshake_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    max_response_bytes: Option<usize>,
    max_connection_response_bytes: Option<usize>,
    response_wait_ms: Option<u64>,
    max_blob_upload_bytes: Option<u64>,
    /// Let GOVERN change retention policies and legal holds and apply retention.
    governance_changes: Option<bool>,
    /// Apply the retention policies in the background every this many seconds (and
    /// before each background compaction, always). Unset: on demand only.
    retention_interval_secs: Option<u64>,
    checkpoint_every_records: Option<u64>,
    checkpoint_interval_secs: Option<u64>,
    signing_key: Option<PathBuf>,
    cold: Option<ColdConfig>,
    /// The key store of data subjects' keys (a directory outside the data directory):
    /// personal data is sealed under them, and GOVERN `forget` destroys them.
    key_store: Option<PathBuf>,
    /// The file holding the key store's master key (64 hex digits), kept apart from both.
    master_key: Option<PathBuf>,
}

/// `[cold]`: the cold tier (docs/OPERATIONS.md section 9). With a table, tallyd moves sealed
/// segments to `store` in the background, at low priority, every `interval_secs`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ColdConfig {
    /// `file:///path` or `s3://bucket/prefix`.
    store: String,
    keep_local_segments: Option<usize>,
    older_than_secs: Option<u64>,
    local_budget_mib: Option<u64>,
    interval_secs: Option<u64>,
    cache_mib: Option<u64>,
    /// Payloads above this many KiB are stored as blobs in the store (FORMAT.md 6.5).
    blob_threshold_kib: Option<u64>,
}

/// The cold tier's options from `[cold]`, its store opened.
fn cold_options(c: &ColdConfig) -> anyhow::Result<tally_engine::ColdOptions> {
    let store = tally_server::cold_store::open_store(&c.store)
        .with_context(|| format!("[cold] store {}", c.store))?;
    let defaults = tally_engine::ColdOptions::default();
    let mib = |m: u64| {
        m.checked_mul(1 << 20)
            .ok_or_else(|| anyhow::anyhow!("[cold] {m} MiB is far too large"))
    };
    Ok(tally_engine::ColdOptions {
        store: Some(store),
        policy: tally_engine::CompactPolicy {
            keep_local_segments: c
                .keep_local_segments
                .unwrap_or(defaults.policy.keep_local_segments),
            older_than: c.older_than_secs.map(Duration::from_secs),
            local_budget_bytes: c.local_budget_mib.map(mib).transpose()?,
        },
        background: Some(Duration::from_secs(c.interval_secs.unwrap_or(300).max(1))),
        cache_bytes: c
            .cache_mib
            .map(mib)
            .transpose()?
            .unwrap_or(defaults.cache_bytes),
        blob_threshold: match c.blob_threshold_kib {
            Some(k) => usize::try_from(k.saturating_mul(1024))
                .context("[cold] blob_threshold_kib is far too large")?,
            None => defaults.blob_threshold,
        },
        ..defaults
    })
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    let file: FileConfig = match &cli.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?
        }
        None => FileConfig::default(),
    };
    let Some(data) = cli.data.clone().or(file.data) else {
        bail!("no data directory: give --data DIR (or TALLYD_DATA, or `data` in the config file)");
    };
    let mut cfg = Config::new(data);
    cfg.listen = cli
        .listen
        .or(file.listen)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)));
    let ms = Duration::from_millis;
    if let Some(v) = cli.max_connections.or(file.max_connections) {
        cfg.connections_max = v;
    }
    if let Some(v) = file.max_inflight {
        cfg.inflight_max = v;
    }
    if let Some(v) = file.max_subscriptions {
        cfg.subscriptions_max = v;
    }
    if let Some(v) = file.max_frame_bytes {
        cfg.frame_bytes_max = v;
    }
    if let Some(v) = file.max_append_events {
        cfg.append_events_max = v;
    }
    if let Some(v) = file.handshake_timeout_ms {
        cfg.handshake_timeout = ms(v);
    }
    if let Some(v) = file.idle_timeout_ms {
        cfg.idle_timeout = ms(v);
    }
    if let Some(v) = file.shutdown_timeout_ms {
        cfg.shutdown_timeout = ms(v);
    }
    if let Some(v) = file.max_response_bytes {
        cfg.response_bytes_max = v;
    }
    if let Some(v) = file.max_connection_response_bytes {
        cfg.connection_response_bytes_max = v;
    }
    if let Some(v) = file.response_wait_ms {
        cfg.response_wait = ms(v);
    }
    if let Some(v) = file.max_blob_upload_bytes {
        cfg.blob_upload_bytes_max = v;
    }
    if let Some(v) = file.governance_changes {
        cfg.governance_changes = v;
    }
    let mut options = Options {
        recovery: RecoveryMode::Strict,
        retention_every: file
            .retention_interval_secs
            .map(|s| Duration::from_secs(s.max(1))),
        ..Options::default()
    };
    options.durability = match cli.durability.or(file.durability) {
        None | Some(DurabilityArg::Fsync) => Durability::Fsync,
        Some(DurabilityArg::Batched) => Durability::Batched {
            max_delay: ms(file.batched_delay_ms.unwrap_or(5).max(1)),
        },
        Some(DurabilityArg::None) => Durability::None,
    };
    if let Some(m) = file.segment_mib {
        // Out-of-range sizes are refused by the log's own option check; this only must
        // not overflow on the way.
        options.segment_bytes = m
            .checked_mul(1 << 20)
            .ok_or_else(|| anyhow::anyhow!("segment_mib {m} is far too large"))?;
    }
    if let Some(n) = file.checkpoint_every_records {
        options.checkpoint_every_records = Some(n);
    }
    if let Some(s) = file.checkpoint_interval_secs {
        options.checkpoint_interval = Some(Duration::from_secs(s));
    }
    options.signing_key = file.signing_key;
    match (&file.key_store, &file.master_key) {
        (Some(dir), Some(master)) => {
            let master =
                tally_engine::keys::SecretKey::from_file(master).context("reading master_key")?;
            let store = tally_engine::keys::FileKeyStore::open(dir, &master, true)
                .with_context(|| format!("opening the key store {}", dir.display()))?;
            options.keys = Some(std::sync::Arc::new(store));
        }
        (None, None) => {}
        _ => anyhow::bail!("key_store and master_key go together"),
    }
    if let Some(c) = &file.cold {
        options.cold = cold_options(c)?;
    } else if let Some(store) = tally_server::cold_store::store_of_dir(&cfg.data)
        .context("opening the cold store named in the data directory's cold.store")?
    {
        // A log compacted before (by `tally compact`) reads its cold segments; no
        // background compaction without a [cold] table.
        options.cold.store = Some(store);
    }
    let witness_files: Vec<PathBuf> = cli
        .witness_key
        .iter()
        .cloned()
        .chain(file.witness_keys.unwrap_or_default())
        .collect();
    if !witness_files.is_empty() {
        options.witness_keys = Some(read_witness_keys(&witness_files)?);
    }
    cfg.options = options;
    Ok(cfg)
}

/// The public keys in witness key files: vkey lines; blank lines and `#` comments are
/// passed over.
fn read_witness_keys(files: &[PathBuf]) -> anyhow::Result<Vec<[u8; 32]>> {
    let mut keys = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("reading witness key {}: {e}", f.display()))?;
        let before = keys.len();
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let key = tally_engine::format::note::WitnessKey::parse(line)
                .map_err(|e| anyhow::anyhow!("witness key {}: {e}", f.display()))?;
            keys.push(key.public_key);
        }
        if keys.len() == before {
            anyhow::bail!("witness key file {} holds no key", f.display());
        }
    }
    Ok(keys)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tallyd: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let cfg = config(cli)?;
    // At least two workers: one may block in a sync it leads (see the server module).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    // One allocator arena per worker: the default (eight per core) lets each of the many
    // blocking-pool threads keep megabytes freed into its own arena after a burst of large
    // responses (measured: the heap stayed 12 MiB above its size before a client that did
    // not read, against 2 to 4 MiB with this).
    tally_engine::limit_allocator_arenas(workers);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("tallyd")
        .max_blocking_threads(64)
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let server = Server::bind(cfg.clone()).await?;
        let addr = server.local_addr()?;
        tracing::info!(%addr, data = %cfg.data.display(), "listening");
        server.run(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(toml: &str) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("tallyd.toml");
        std::fs::write(&file, toml)?;
        let data = dir.path().join("data");
        let cli = Cli::parse_from([
            "tallyd",
            "--data",
            data.to_str().unwrap_or_default(),
            "--config",
            file.to_str().unwrap_or_default(),
        ]);
        config(&cli)
    }

    #[test]
    fn governance_changes_are_off_unless_the_file_turns_them_on() {
        let off = config_of("").unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!off.governance_changes);
        let on = config_of("governance_changes = true\n").unwrap_or_else(|e| panic!("{e:#}"));
        assert!(on.governance_changes);
    }

    #[test]
    fn retention_runs_in_the_background_only_when_the_file_asks() {
        let off = config_of("").unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(off.options.retention_every, None);
        let on = config_of("retention_interval_secs = 3600\n").unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(on.options.retention_every, Some(Duration::from_secs(3600)));
    }

    #[test]
    fn a_cold_table_configures_background_compaction_to_its_store() {
        let store = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cfg = config_of(&format!(
            "max_blob_upload_bytes = 1000\n[cold]\nstore = \"file://{}\"\nblob_threshold_kib = 16\nkeep_local_segments = 8\nolder_than_secs = 86400\n\
             local_budget_mib = 100\ninterval_secs = 60\ncache_mib = 64\n",
            store.path().display()
        ))
        .unwrap_or_else(|e| panic!("{e:#}"));
        let c = &cfg.options.cold;
        assert!(
            c.store
                .as_ref()
                .is_some_and(|s| s.url().starts_with("file:///"))
        );
        assert_eq!(c.policy.keep_local_segments, 8);
        assert_eq!(c.policy.older_than, Some(Duration::from_secs(86_400)));
        assert_eq!(c.policy.local_budget_bytes, Some(100 << 20));
        assert_eq!(c.background, Some(Duration::from_secs(60)));
        assert_eq!(c.cache_bytes, 64 << 20);
        assert_eq!(c.blob_threshold, 16 << 10);
        assert_eq!(cfg.blob_upload_bytes_max, 1000);
        // Without the table: no store, no background compaction.
        let cfg = config_of("").unwrap_or_else(|e| panic!("{e:#}"));
        assert!(cfg.options.cold.store.is_none() && cfg.options.cold.background.is_none());
        // A bad store or an unknown key is refused.
        assert!(config_of("[cold]\nstore = \"ftp://x\"\n").is_err());
        assert!(config_of("[cold]\nstore = \"file:///tmp/x\"\nkeep = 1\n").is_err());
    }
}
