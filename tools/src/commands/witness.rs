//! `tally witness`: run a witness (docs/OPERATIONS.md, "Witnesses"). A witness keeps its
//! own key and state in its own directory, on another host or under another team, and
//! cosigns a log's checkpoints only when each extends the last one it cosigned.
//!
//! - `tally witness init WDIR --name NAME`: a new witness (key, vkey).
//! - `tally witness register WDIR (--data DIR | --server ADDR) --pubkey FILE`: watch a log.
//! - `tally witness observe WDIR (--data DIR | --server ADDR) [--every SECS]`: fetch the
//!   log's latest checkpoint and the consistency proof from the last one cosigned, verify,
//!   cosign, keep, and hand the cosignature back to the log. Exit 1 when the log rolled
//!   back or forked, naming both checkpoints.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tally_engine::format::note::Note;
use tally_engine::format::proof::hex;
use tally_engine::witness::{Observation, Witness, WitnessError};

use crate::support::{Finding, json_output, open_read_only, read_pubkeys};

/// `tally witness`.
#[derive(Args, Debug)]
pub struct WitnessArgs {
    #[command(subcommand)]
    command: WitnessCommand,
}

#[derive(Subcommand, Debug)]
enum WitnessCommand {
    /// Create a witness: its Ed25519 key and its public key (vkey) in WDIR.
    Init(InitArgs),
    /// Register a log with the witness: its id and the keys that sign its checkpoints.
    Register(RegisterArgs),
    /// Verify and cosign the log's latest checkpoint, and hand the cosignature back.
    Observe(ObserveArgs),
}

/// `tally witness init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// The witness's directory (created).
    wdir: PathBuf,
    /// The witness's key name, a schema-less URL such as `witness.example/risk-team`.
    #[arg(long)]
    name: String,
}

/// Where the log is.
#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct Source {
    /// The log's data directory (read-only; safe beside a running tallyd).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// A running tallyd.
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
}

/// `tally witness register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The witness's directory.
    wdir: PathBuf,
    #[command(flatten)]
    source: Source,
    /// The log's public key file (`tally pubkey DIR`), obtained through a channel you trust.
    #[arg(long, value_name = "FILE")]
    pubkey: PathBuf,
}

/// `tally witness observe`.
#[derive(Args, Debug)]
pub struct ObserveArgs {
    /// The witness's directory.
    wdir: PathBuf,
    #[command(flatten)]
    source: Source,
    /// Observe again every SECS seconds, until stopped or until the log misbehaves.
    #[arg(long, value_name = "SECS")]
    every: Option<u64>,
}

/// Runs `tally witness`.
pub fn run(a: &WitnessArgs) -> Result<ExitCode> {
    match &a.command {
        WitnessCommand::Init(a) => init(a),
        WitnessCommand::Register(a) => register(a),
        WitnessCommand::Observe(a) => observe(a),
    }
}

fn init(a: &InitArgs) -> Result<ExitCode> {
    crate::support::no_json("tally witness init")?;
    if a.wdir
        .join(tally_engine::witness::WITNESS_KEY_FILE)
        .exists()
    {
        bail!("{} already holds a witness", a.wdir.display());
    }
    let w = Witness::init(&a.wdir, &a.name)
        .with_context(|| format!("creating witness {}", a.wdir.display()))?;
    println!("created witness {} in {}", a.name, a.wdir.display());
    println!(
        "its public key (give it to verifiers: tally verify --witness FILE):\n{}",
        w.key().encode()
    );
    println!(
        "written to {}",
        a.wdir
            .join(tally_engine::witness::WITNESS_VKEY_FILE)
            .display()
    );
    Ok(ExitCode::SUCCESS)
}

fn log_id_of(source: &Source) -> Result<[u8; 16]> {
    match (&source.data, &source.server) {
        (Some(dir), _) => Ok(open_read_only(dir)?.log_id()),
        (None, Some(addr)) => crate::commands::remote::block_on(async {
            let c = crate::commands::remote::connect(addr).await?;
            Ok(c.server_info().await?.log_id)
        }),
        (None, None) => bail!("give --data DIR or --server ADDR"),
    }
}

fn register(a: &RegisterArgs) -> Result<ExitCode> {
    crate::support::no_json("tally witness register")?;
    let w =
        Witness::open(&a.wdir).with_context(|| format!("opening witness {}", a.wdir.display()))?;
    let keys = read_pubkeys(&a.pubkey)?;
    let log_id = log_id_of(&a.source)?;
    w.register(&log_id, &keys)?;
    println!(
        "witness {} watches log {} ({} key(s)); its next observation starts its history",
        w.key().name,
        hex(&log_id),
        keys.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// What one observation printed.
enum Outcome {
    Done(String),
    Misbehaved(String),
}

/// Observes a data directory once: the latest checkpoint, proofs from the log's own tree,
/// and the cosignature written back to `tally.cosignatures`.
pub fn observe_dir(
    w: &Witness,
    dir: &Path,
) -> Result<std::result::Result<Observation, WitnessError>> {
    let log = open_read_only(dir)?;
    let Some(note) = log.checkpoint_note(None)? else {
        bail!("{} has no checkpoint yet", dir.display());
    };
    let obs = w.observe(&note, &mut |old, new| log.prove_consistency(old, new));
    if let Ok(
        Observation::Cosigned {
            checkpoint,
            cosignature,
            ..
        }
        | Observation::Unchanged {
            checkpoint,
            cosignature,
        },
    ) = &obs
    {
        tally_engine::add_cosignature(dir, checkpoint, cosignature)
            .with_context(|| format!("handing the cosignature back to {}", dir.display()))?;
    }
    Ok(obs)
}

fn observe_server(
    w: &Witness,
    addr: &str,
) -> Result<std::result::Result<Observation, WitnessError>> {
    crate::commands::remote::block_on(async {
        let c = crate::commands::remote::connect(addr).await?;
        let Some(text) = c.checkpoint_note().await? else {
            bail!("the log at {addr} has no checkpoint yet");
        };
        let note = Note::parse(&text).context("the server's checkpoint note")?;
        // Proofs are fetched before observing (the witness's lock is synchronous): the
        // one it needs is from its newest cosigned size to the offered one.
        let offered = tally_engine::format::note::parse_checkpoint_body(&note.body)?;
        let from = w
            .history(&offered.log_id)?
            .last()
            .map(|s| s.tree_size)
            .filter(|&s| s < offered.tree_size);
        let proof = match from {
            Some(old) => Some(c.consistency_proof(old, offered.tree_size).await?),
            None => None,
        };
        let obs = w.observe(&note, &mut |old, new| {
            proof
                .clone()
                .filter(|p| p.old_size == old && p.new_size == new)
                .ok_or_else(|| tally_engine::Error::InvalidOptions {
                    reason: format!("no consistency proof fetched from {old} to {new}"),
                })
        });
        if let Ok(
            Observation::Cosigned {
                checkpoint,
                cosignature,
                ..
            }
            | Observation::Unchanged {
                checkpoint,
                cosignature,
            },
        ) = &obs
        {
            c.add_cosignature(checkpoint.statement.id, cosignature)
                .await
                .context("handing the cosignature back to the server")?;
        }
        Ok(obs)
    })
}

fn describe(obs: std::result::Result<Observation, WitnessError>) -> Result<Outcome> {
    match obs {
        Ok(Observation::Cosigned {
            previous,
            checkpoint,
            ..
        }) => {
            let s = &checkpoint.statement;
            Ok(Outcome::Done(match previous {
                Some(p) => format!(
                    "cosigned checkpoint {} (tree size {}): it extends checkpoint {} (tree size {})",
                    s.id, s.tree_size, p.id, p.tree_size
                ),
                None => format!(
                    "cosigned checkpoint {} (tree size {}): the first of this log",
                    s.id, s.tree_size
                ),
            }))
        }
        Ok(Observation::Unchanged { checkpoint, .. }) => Ok(Outcome::Done(format!(
            "unchanged: checkpoint {} (tree size {}) is the one cosigned last",
            checkpoint.statement.id, checkpoint.statement.tree_size
        ))),
        Err(e @ (WitnessError::Rollback(_) | WitnessError::Equivocation(_))) => {
            Ok(Outcome::Misbehaved(e.to_string()))
        }
        Err(WitnessError::Note(e)) => Ok(Outcome::Misbehaved(format!(
            "the log's checkpoint is not signed by a key registered with this witness: {e}"
        ))),
        Err(e) => Err(e.into()),
    }
}

fn observe(a: &ObserveArgs) -> Result<ExitCode> {
    let w =
        Witness::open(&a.wdir).with_context(|| format!("opening witness {}", a.wdir.display()))?;
    loop {
        let started = std::time::Instant::now();
        let obs = match (&a.source.data, &a.source.server) {
            (Some(dir), _) => observe_dir(&w, dir)?,
            (None, Some(addr)) => observe_server(&w, addr)?,
            (None, None) => bail!("give --data DIR or --server ADDR"),
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match describe(obs)? {
            Outcome::Done(msg) => {
                if json_output() {
                    println!("{}", serde_json::json!({"ok": true, "what": msg, "ms": ms}));
                } else {
                    println!("{msg} ({ms:.1} ms)");
                }
            }
            Outcome::Misbehaved(msg) => return Err(Finding(msg).into()),
        }
        match a.every {
            Some(secs) => std::thread::sleep(std::time::Duration::from_secs(secs.max(1))),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}
