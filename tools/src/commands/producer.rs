//! `tally producer`: producer keys and the signing policy of a log (docs/OPERATIONS.md,
//! "Producer-signed batches"). Each change is an event of the system stream `$producers`
//! with its actor and reason, written by the engine's registration operations; the log
//! must not be open in another process (stop tallyd first).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use tally_engine::format::checkpoint::fingerprint;
use tally_engine::format::proof::hex;

use crate::support::{KeyArg, open_read_only, open_writable_if_free, read_pubkeys};

/// `tally producer`.
#[derive(Args, Debug)]
pub struct ProducerArgs {
    #[command(subcommand)]
    command: ProducerCommand,
}

#[derive(Subcommand, Debug)]
enum ProducerCommand {
    /// Register a producer's public key: it may sign batches (for the given prefixes).
    Register(RegisterArgs),
    /// Revoke a producer key: it signs nothing new.
    Revoke(RevokeArgs),
    /// Require signed appends for streams with a prefix.
    Require(RequireArgs),
    /// Show the keys and the policy.
    List(ListArgs),
}

/// Who makes the change, and why: recorded with it.
#[derive(Args, Debug)]
struct Why {
    /// Who makes the change.
    #[arg(long)]
    actor: String,
    /// Why.
    #[arg(long)]
    reason: String,
}

/// `tally producer register`.
#[derive(Args, Debug)]
struct RegisterArgs {
    /// The data directory.
    dir: PathBuf,
    /// The producer's public key file (`tally keygen` prints it).
    #[arg(long)]
    pubkey: PathBuf,
    /// The producer's name (an OMS, a booking service).
    #[arg(long)]
    name: String,
    /// A stream prefix it may sign for (repeatable; none: any stream).
    #[arg(long)]
    prefix: Vec<String>,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// `tally producer revoke`.
#[derive(Args, Debug)]
struct RevokeArgs {
    /// The data directory.
    dir: PathBuf,
    /// The producer's public key file.
    #[arg(long)]
    pubkey: PathBuf,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// `tally producer require`.
#[derive(Args, Debug)]
struct RequireArgs {
    /// The data directory.
    dir: PathBuf,
    /// Appends to streams starting with this must be signed.
    #[arg(long)]
    prefix: String,
    #[command(flatten)]
    why: Why,
    #[command(flatten)]
    key: KeyArg,
}

/// `tally producer list`.
#[derive(Args, Debug)]
struct ListArgs {
    /// The data directory.
    dir: PathBuf,
}

/// Runs `tally producer`.
pub fn run(a: &ProducerArgs) -> Result<ExitCode> {
    match &a.command {
        ProducerCommand::Register(a) => {
            let keys = read_pubkeys(&a.pubkey)?;
            let log = writable(&a.dir, &a.key)?;
            for k in keys {
                let r =
                    log.register_producer_key(k, &a.name, &a.prefix, &a.why.actor, &a.why.reason)?;
                println!(
                    "registered producer {} (key {}) at position {}",
                    a.name,
                    fingerprint(&k),
                    r.first_position
                );
            }
            log.close()?;
        }
        ProducerCommand::Revoke(a) => {
            let keys = read_pubkeys(&a.pubkey)?;
            let log = writable(&a.dir, &a.key)?;
            for k in keys {
                let r = log.revoke_producer_key(k, &a.why.actor, &a.why.reason)?;
                println!(
                    "revoked key {} at position {}",
                    fingerprint(&k),
                    r.first_position
                );
            }
            log.close()?;
        }
        ProducerCommand::Require(a) => {
            let log = writable(&a.dir, &a.key)?;
            let r = log.require_signatures(&a.prefix, &a.why.actor, &a.why.reason)?;
            println!(
                "appends to streams starting with {:?} must be signed from position {} on",
                a.prefix,
                r.first_position.0 + 1
            );
            println!(
                "for the auditors' trust file: require {} from {}",
                a.prefix,
                r.first_position.0 + 1
            );
            log.close()?;
        }
        ProducerCommand::List(a) => {
            let p = open_read_only(&a.dir)?.producer_policy();
            for (key, k) in &p.keys {
                println!(
                    "key {} {} ({}) {}{}",
                    k.name,
                    hex(key),
                    fingerprint(key),
                    if k.prefixes.is_empty() {
                        "any stream".to_owned()
                    } else {
                        k.prefixes.join(" ")
                    },
                    if k.revoked { " REVOKED" } else { "" }
                );
            }
            for prefix in &p.required {
                println!("require {prefix}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn writable(dir: &std::path::Path, key: &KeyArg) -> Result<tally_engine::Log> {
    let (log, writable) = open_writable_if_free(dir, key)?;
    if !writable {
        bail!(
            "{} is open by another process (a running tallyd?): stop it to change the producer policy",
            dir.display()
        );
    }
    Ok(log)
}
