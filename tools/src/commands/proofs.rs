//! `tally checkpoint` and `tally prove`: signed checkpoints and Merkle proofs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use tally_engine::Position;
use tally_engine::format::proof::hex;

use crate::support::{
    Finding, KeyArg, checkpoint_json, json_output, open_read_only, open_writable_if_free,
    print_json, print_tree,
};

/// `tally checkpoint DIR`.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The data directory.
    dir: PathBuf,
    /// List the checkpoints instead of writing one.
    #[arg(long)]
    list: bool,
    /// Print the latest checkpoint (or --id N) as a signed note to keep outside the
    /// directory (with the witnesses' cosignatures), instead of writing one. `tally verify
    /// --trusted FILE` later checks that the log still extends it.
    #[arg(long, conflicts_with = "list")]
    export: bool,
    /// With --export: the checkpoint to print.
    #[arg(long, requires = "export")]
    id: Option<u64>,
    #[command(flatten)]
    key: KeyArg,
}

/// Forces and prints a signed checkpoint, or lists them.
pub fn checkpoint(a: &CheckpointArgs) -> Result<ExitCode> {
    if a.export {
        crate::support::no_json("tally checkpoint --export (a signed note)")?;
        let log = open_read_only(&a.dir)?;
        let Some(note) = log.checkpoint_note(a.id)? else {
            bail!(
                "{} has no checkpoint {}",
                a.dir.display(),
                a.id.map_or_else(|| "yet".to_owned(), |i| i.to_string())
            );
        };
        print!("{}", note.encode());
        return Ok(ExitCode::SUCCESS);
    }
    if a.list {
        let log = open_read_only(&a.dir)?;
        let cps: Vec<Value> = log.checkpoints().iter().map(checkpoint_json).collect();
        if json_output() {
            print_json(&Value::Array(cps))?;
        } else {
            println!(
                "{:>6}  {:>12}  {:<30}  {:<16}  root",
                "id", "tree size", "time", "key"
            );
            for c in &cps {
                println!(
                    "{:>6}  {:>12}  {:<30}  {:<16}  {}",
                    c["id"],
                    c["tree_size"],
                    c["time_utc"].as_str().unwrap_or(""),
                    c["key_fingerprint"].as_str().unwrap_or(""),
                    c["root"].as_str().unwrap_or("")
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (log, writable) = open_writable_if_free(&a.dir, &a.key)?;
    if !writable {
        bail!(
            "{} is open by another process (a running tallyd?): it writes checkpoints itself; use `tally checkpoint --list` to see them",
            a.dir.display()
        );
    }
    let cp = log.checkpoint()?;
    log.close()?;
    let v = checkpoint_json(&cp);
    if json_output() {
        print_json(&v)?;
    } else {
        print_tree(&v, 0);
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally prove DIR`.
#[derive(Args, Debug)]
pub struct ProveArgs {
    /// The data directory.
    dir: PathBuf,
    /// Prove that the record at this position is in the log.
    #[arg(long, conflicts_with = "consistency")]
    position: Option<u64>,
    /// The checkpoint to prove against (default: the latest).
    #[arg(long)]
    checkpoint: Option<u64>,
    /// Prove that the tree of OLD_SIZE records is a prefix of the tree of NEW_SIZE.
    #[arg(long, num_args = 2, value_names = ["OLD_SIZE", "NEW_SIZE"])]
    consistency: Option<Vec<u64>>,
}

/// Prints an inclusion or consistency proof.
pub fn prove(a: &ProveArgs) -> Result<ExitCode> {
    let log = open_read_only(&a.dir)?;
    let v = if let Some(sizes) = &a.consistency {
        let (old, new) = (sizes[0], sizes[1]);
        let p = log.prove_consistency(old, new)?;
        let (old_root, new_root) = (log.merkle_root(old)?, log.merkle_root(new)?);
        p.verify(&old_root, &new_root)
            .map_err(|e| Finding(format!("the proof does not verify: {e}")))?;
        json!({
            "kind": "consistency",
            "old_size": old,
            "new_size": new,
            "old_root": hex(&old_root),
            "new_root": hex(&new_root),
            "path": p.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        })
    } else {
        let position = a
            .position
            .context("give --position P or --consistency OLD_SIZE NEW_SIZE")?;
        let cps = log.checkpoints();
        let cp = match a.checkpoint {
            Some(id) => cps
                .iter()
                .find(|c| c.statement.id == id)
                .with_context(|| format!("no checkpoint {id}"))?,
            None => cps.last().context(
                "the log has no checkpoint yet: run `tally checkpoint DIR` (or wait for the server's)",
            )?,
        };
        let size = cp.statement.tree_size;
        if position >= size {
            bail!(
                "position {position} is not covered by checkpoint {} (size {size})",
                cp.statement.id
            );
        }
        let p = log.prove_inclusion(Position(position), size)?;
        let raw = log.read_raw(Position(position))?;
        let hash = tally_engine::format::record::RecordHeader::decode_in(&raw.header, raw.layout)?
            .chain_hash;
        p.verify(&hash, &cp.statement.root)
            .map_err(|e| Finding(format!("the proof does not verify: {e}")))?;
        json!({
            "kind": "inclusion",
            "position": position,
            "tree_size": size,
            "record_hash": hex(&hash),
            "root": hex(&cp.statement.root),
            "checkpoint": checkpoint_json(cp),
            "path": p.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
        })
    };
    if json_output() {
        print_json(&v)?;
    } else {
        print_tree(&v, 0);
        if let Some(path) = v["path"].as_array() {
            for (i, h) in path.iter().enumerate() {
                println!("  path[{i}] {}", h.as_str().unwrap_or(""));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
