//! `tally init`, `keygen`, `pubkey`: a data directory and its signing keys.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use tally_engine::format::checkpoint::{encode_public_key, fingerprint};
use tally_engine::format::files::META_FILE;
use tally_engine::format::proof::hex;
use tally_engine::{Log, Options};

use crate::support::{KeyArg, json_output, open_read_only, print_json, read_secret_key};

/// `tally init DIR`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// The data directory to create.
    dir: PathBuf,
    /// Sign with this existing key file instead of creating DIR/tally.key; later writers
    /// must be given the same file (Options::signing_key, `--key`).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Register the new log with this witness (its directory, `tally witness init`) and
    /// have it cosign the first checkpoint at once.
    #[arg(long, value_name = "WDIR")]
    witness: Option<PathBuf>,
}

/// Creates a data directory and its signing key.
pub fn init(a: &InitArgs) -> Result<ExitCode> {
    if a.dir.join(META_FILE).exists() {
        bail!("{} already holds a Tally log", a.dir.display());
    }
    let log = Log::open(
        &a.dir,
        Options {
            signing_key: a.key.clone(),
            ..Options::default()
        },
    )
    .with_context(|| format!("creating {}", a.dir.display()))?;
    let key_file = a
        .key
        .clone()
        .unwrap_or_else(|| a.dir.join(tally_engine::KEY_FILE));
    let key = log.public_key().context("the new log has no signing key")?;
    let id = log.log_id();
    log.close()?;
    let witnessed = match &a.witness {
        Some(wdir) => {
            let w = tally_engine::witness::Witness::open(wdir)
                .with_context(|| format!("opening witness {}", wdir.display()))?;
            w.register(&id, &[key])?;
            match crate::commands::witness::observe_dir(&w, &a.dir)? {
                Ok(_) => Some(w.key().name),
                Err(e) => bail!("the witness refused the new log's checkpoint: {e}"),
            }
        }
        None => None,
    };
    let export = open_read_only(&a.dir)?
        .checkpoint_note(None)?
        .context("the new log has no checkpoint")?
        .encode();
    if json_output() {
        print_json(&json!({
            "dir": a.dir,
            "log_id": hex(&id),
            "public_key": hex(&key),
            "key_fingerprint": fingerprint(&key),
            "key_file": key_file,
            "witness": witnessed,
            "checkpoint_note": export,
        }))?;
    } else {
        println!("created {}", a.dir.display());
        println!("log id           {}", hex(&id));
        println!("signing key      {}", key_file.display());
        println!("public key       {}", hex(&key));
        println!("fingerprint      {}", fingerprint(&key));
        if let Some(name) = &witnessed {
            println!("witness          {name} cosigned the first checkpoint");
        }
        println!();
        println!("Keep this checkpoint outside the directory. It is of an empty log, so it proves");
        println!(
            "nothing about records yet: keep a later one too (`tally checkpoint DIR --export`),"
        );
        println!(
            "and check the log against them with `tally verify DIR --pubkey FILE --trusted NOTE`."
        );
        println!();
        print!("{export}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally keygen FILE`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// The key file to create (mode 0600; an existing file is never overwritten).
    file: PathBuf,
}

/// Creates a new signing key file and prints its public key.
pub fn keygen(a: &KeygenArgs) -> Result<ExitCode> {
    let key = tally_engine::create_signing_key(&a.file)
        .with_context(|| format!("creating signing key {}", a.file.display()))?;
    eprintln!(
        "created {} (mode 0600), fingerprint {}",
        a.file.display(),
        fingerprint(&key)
    );
    print!("{}", encode_public_key(&key));
    Ok(ExitCode::SUCCESS)
}

/// `tally pubkey DIR`.
#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// The data directory (its key is DIR/tally.key).
    #[arg(required_unless_present = "key")]
    dir: Option<PathBuf>,
    #[command(flatten)]
    key: KeyArg,
}

/// Prints the public key in the form `--pubkey FILE` reads.
pub fn pubkey(a: &PubkeyArgs) -> Result<ExitCode> {
    let path = match (&a.key.key, &a.dir) {
        (Some(k), _) => k.clone(),
        (None, Some(d)) => d.join(tally_engine::KEY_FILE),
        (None, None) => bail!("name a data directory or --key FILE"),
    };
    let key = read_secret_key(&path)?;
    print!("{}", encode_public_key(&key.verifying_key().to_bytes()));
    Ok(ExitCode::SUCCESS)
}
