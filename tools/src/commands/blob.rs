//! `tally blob`: payloads stored as blobs in the log's cold store (docs/FORMAT.md 6.5).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tally_engine::format::blob::BlobRef;

use crate::support::open_read_only;

/// `tally blob ...`.
#[derive(Args, Debug)]
pub struct BlobArgs {
    #[command(subcommand)]
    command: BlobCommand,
}

#[derive(Subcommand, Debug)]
enum BlobCommand {
    /// Write a blob's bytes (to standard output, or --out), after checking them against its
    /// BLAKE3 hash. The hash is the one an event's reference gives (`tally dump`).
    Get {
        /// The data directory (its cold.store names the store).
        dir: PathBuf,
        /// The blob's BLAKE3 hash, 64 hexadecimal digits.
        hash: String,
        /// Write the bytes to this file instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
}

fn parse_hash(s: &str) -> Result<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{s:?} is not a BLAKE3 hash (64 hexadecimal digits)");
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}

/// Runs `tally blob`.
pub fn run(a: &BlobArgs) -> Result<ExitCode> {
    match &a.command {
        BlobCommand::Get { dir, hash, out } => {
            let hash = parse_hash(hash)?;
            let log = open_read_only(dir)?;
            // The store's length is only a hint: the read checks the bytes against the hash.
            let probe = BlobRef { hash, size: 1 };
            let Some(size) = log.blob_stored_len(&probe)? else {
                bail!(
                    "the log's store has no blob {}",
                    tally_engine::format::proof::hex(&hash)
                );
            };
            if size == 0 || size > tally_engine::format::blob::BLOB_BYTES_MAX {
                bail!(
                    "the store's object for blob {} has {size} bytes, which no blob has",
                    tally_engine::format::proof::hex(&hash)
                );
            }
            let blob = BlobRef { hash, size };
            let bytes = log.read_blob(&blob)?;
            match out {
                Some(p) => {
                    std::fs::write(p, &bytes)
                        .with_context(|| format!("writing {}", p.display()))?;
                    eprintln!("{} bytes, BLAKE3 {} matches", bytes.len(), blob.hex());
                }
                None => std::io::stdout().lock().write_all(&bytes)?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
