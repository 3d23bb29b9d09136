//! `tally`: the operator's command-line tool.
//!
//! - `tally demo`: an end-to-end run of the engine on an embedded data directory (trade
//!   lifecycle events, reads, reopen, chain verification).
//! - `tally bench`: the embedded load generator (throughput and acknowledgement latency).
//! - `tally init | pubkey | inspect | dump | verify | checkpoint | prove`: the operator's
//!   inspection and verification commands ([`commands`]).
//! - `tally extract | verify-extract | backup`: audit extracts and backups ([`audit`]).
//! - `tally append | read | tail | info --server ADDR`: a running server's client
//!   ([`remote`]); `tally bench --server ADDR` loads one ([`remote_bench`]).
//!
//! Exit status: 0 success, 1 when verification finds a problem, 2 on usage or I/O errors.

#![forbid(unsafe_code)]

mod commands;
mod extract;
mod support;
mod trading;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{
    audit, bench, blob, compact, demo, dump, find, forensic, governance, inspect, keys, producer,
    proofs, remote, witness,
};

/// Tally: a tamper-evident event store.
#[derive(Parser, Debug)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How results are printed: `table` (text for people), `json` (one document; listings
    /// print one object per line) or `jsonl`.
    #[arg(long, global = true, value_enum)]
    output: Option<support::Output>,
    /// The same as `--output json`.
    #[arg(long, global = true, conflicts_with = "output")]
    json: bool,
    /// The key store of data subjects' keys (a directory outside the data directory): reads
    /// open sealed personal data with it, and `forget` destroys keys in it.
    #[arg(long, global = true, env = "TALLY_KEY_STORE", value_name = "DIR")]
    key_store: Option<std::path::PathBuf>,
    /// The file holding the key store's master key (64 hex digits).
    #[arg(long, global = true, env = "TALLY_MASTER_KEY", value_name = "FILE")]
    master_key: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the end-to-end demo: append trade-lifecycle events, read them back, reopen,
    /// verify the chain.
    Demo(demo::DemoArgs),
    /// Append to an embedded log (or a running server, with --server) and report
    /// throughput and acknowledgement latency; --read measures replay.
    Bench(bench::BenchArgs),
    /// Create a data directory and its signing key.
    Init(keys::InitArgs),
    /// Print the log's public key, in the form `--pubkey FILE` reads.
    Pubkey(keys::PubkeyArgs),
    /// Create a new signing key file (for a key kept outside the data directory, or a rotation).
    Keygen(keys::KeygenArgs),
    /// Show the segments (or one segment's header, footer and index).
    Inspect(inspect::InspectArgs),
    /// Print records in order.
    Dump(dump::DumpArgs),
    /// Check every checksum, the hash chain, Merkle roots, checkpoints and indexes.
    Verify(commands::verify::VerifyArgs),
    /// Write and print a signed checkpoint now (or list them with --list).
    Checkpoint(proofs::CheckpointArgs),
    /// Print an inclusion or consistency proof.
    Prove(proofs::ProveArgs),
    /// Write an audit extract: events with inclusion proofs against a signed checkpoint.
    Extract(audit::ExtractArgs),
    /// Verify an audit extract offline, with only the log's public key.
    VerifyExtract(audit::VerifyExtractArgs),
    /// Copy a (live) data directory up to a signed checkpoint, and verify the copy.
    Backup(audit::BackupArgs),
    /// Append one event through a running server.
    Append(remote::AppendArgs),
    /// Read a stream from a running server.
    Read(remote::ReadArgs),
    /// Follow the log (or a stream) on a running server: catch up, then live.
    Tail(remote::TailArgs),
    /// A running server's facts (and a stream's, with --stream).
    Info(remote::InfoArgs),
    /// Explain one stream: who did what, when and why (causation chain, correlated events).
    Audit(forensic::AuditArgs),
    /// Producer keys and the signing policy: register, revoke, require, list.
    Producer(producer::ProducerArgs),
    /// Run a witness: cosign a log's checkpoints only as long as each extends the last.
    Witness(witness::WitnessArgs),
    /// Find events by type, correlation id, causation id, actor or event id, in record-time
    /// and event-time windows, through the attribute indexes.
    Find(find::FindArgs),
    /// Move sealed segments of a stopped log to its cold store (an object store), each
    /// only after its copy was read back and checked.
    Compact(compact::CompactArgs),
    /// Payloads stored as blobs in the log's cold store: read one, checked against its hash.
    Blob(blob::BlobArgs),
    /// Retention policies per stream category, kept as events of `$governance`.
    Policy(governance::PolicyArgs),
    /// Legal holds: nothing a hold covers is removed or erased while it stands.
    Hold(governance::HoldArgs),
    /// What the retention policies remove, and what legal holds keep.
    Retention(governance::RetentionArgs),
    /// Erase a data subject's personal data: destroy their key, record a signed erasure.
    Forget(governance::ForgetArgs),
    /// Create a key store (and its master key file) for personal data.
    KeyStore(governance::KeyStoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let output = match (cli.output, cli.json) {
        (Some(o), _) => o,
        (None, true) => support::Output::Json,
        (None, false) => support::Output::Table,
    };
    if output != support::Output::Table && !prints_json(&cli.command) {
        eprintln!("tally: this command prints no JSON (--output {output:?} was given)");
        return ExitCode::from(2);
    }
    support::set_output(output);
    support::set_key_store(cli.key_store.clone(), cli.master_key.clone());
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Init(a) => keys::init(&a),
        Command::Pubkey(a) => keys::pubkey(&a),
        Command::Keygen(a) => keys::keygen(&a),
        Command::Inspect(a) => inspect::inspect(&a),
        Command::Dump(a) => dump::dump(&a),
        Command::Blob(a) => blob::run(&a),
        Command::Verify(a) => commands::verify::verify(&a),
        Command::Checkpoint(a) => proofs::checkpoint(&a),
        Command::Prove(a) => proofs::prove(&a),
        Command::Extract(a) => audit::extract(&a),
        Command::VerifyExtract(a) => audit::verify_extract(&a),
        Command::Backup(a) => audit::backup(&a),
        Command::Append(a) => remote::append(&a),
        Command::Read(a) => remote::read(&a),
        Command::Tail(a) => remote::tail(&a),
        Command::Info(a) => remote::info(&a),
        Command::Audit(a) => forensic::audit(&a),
        Command::Find(a) => find::find(&a),
        Command::Compact(a) => compact::compact(&a),
        Command::Witness(a) => witness::run(&a),
        Command::Producer(a) => producer::run(&a),
        Command::Policy(a) => governance::policy(&a),
        Command::Hold(a) => governance::hold(&a),
        Command::Retention(a) => governance::retention(&a),
        Command::Forget(a) => governance::forget(&a),
        Command::KeyStore(a) => governance::key_store(&a),
    };
    match result {
        Ok(code) => code,
        Err(e) if support::is_finding(&e) => {
            support::print_finding(&e);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("tally: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Whether `c` can print its results as JSON.
fn prints_json(c: &Command) -> bool {
    !matches!(
        c,
        Command::Keygen(_)
            | Command::Pubkey(_)
            | Command::Blob(_)
            | Command::Extract(_)
            | Command::Backup(_)
            | Command::Append(_)
            | Command::Producer(_)
    )
}
