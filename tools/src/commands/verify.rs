//! `tally verify`: every checksum, the hash chain, Merkle roots, checkpoints, derived files
//! and blobs, against the records.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;
use tally_engine::format::PAGE_BYTES;
use tally_engine::format::proof::hex;
use tally_engine::{Error, VerifyOptions};

use crate::support::{
    FindingReport, checkpoint_json, json_output, open_read_only, print_json, read_kept,
    read_pubkeys, read_witness_keys,
};

/// `tally verify DIR`.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The data directory.
    dir: PathBuf,
    /// Public key file: checkpoints must be signed by one of its keys, and there must be at
    /// least one checkpoint when the log has records.
    #[arg(long)]
    pubkey: Option<PathBuf>,
    /// Check from this segment on only (for incremental daily runs).
    #[arg(long)]
    from_segment: Option<u64>,
    /// A checkpoint you kept (`tally checkpoint DIR --export`, or a witness's
    /// `latest.note`): the log must extend it. Repeatable; needs --pubkey.
    #[arg(long, value_name = "FILE", requires = "pubkey")]
    trusted: Vec<PathBuf>,
    /// A witness's public key file (its vkey line, from `tally witness init`): its
    /// cosignatures count, and one of a checkpoint that is now missing or changed fails.
    /// Repeatable.
    #[arg(long, value_name = "FILE")]
    witness: Vec<PathBuf>,
    /// Fail unless a checkpoint is cosigned by at least this many of the --witness keys.
    #[arg(long, default_value_t = 0, requires = "witness")]
    min_witnesses: usize,
    /// A producer trust file (lines `key NAME HEX [PREFIX...]` and `require PREFIX [from
    /// POSITION]`): check every batch's producer signature against these keys, and that the
    /// batches of the required prefixes are signed.
    #[arg(long, value_name = "FILE")]
    producers: Option<PathBuf>,
    /// Segments checked at once, each on its own thread (default: one per core).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Also rebuild each sealed segment's attribute index (the `.adx` sidecar that
    /// `tally audit` and lookups by type, correlation, causation, actor and time use) from
    /// its records and compare them byte for byte. Reads the segments a second time.
    #[arg(long)]
    attribute_indexes: bool,
    /// Do not read the blobs that events refer to (payloads stored in the cold tier's
    /// store). By default each is read once and checked against its hash.
    #[arg(long)]
    skip_blobs: bool,
}

/// Verifies a data directory.
pub fn verify(a: &VerifyArgs) -> Result<ExitCode> {
    let trusted = match &a.pubkey {
        Some(p) => read_pubkeys(p)?,
        None => Vec::new(),
    };
    let kept = read_kept(&a.trusted, &trusted)?;
    let witnesses = read_witness_keys(&a.witness)?;
    let producers = a
        .producers
        .as_ref()
        .map(|p| {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading producer trust file {}", p.display()))?;
            tally_engine::producers::ProducerTrust::parse(&text)
                .with_context(|| format!("producer trust file {}", p.display()))
        })
        .transpose()?;
    let log = open_read_only(&a.dir)?;
    let total: u64 = log
        .segments()
        .iter()
        .filter(|s| a.from_segment.is_none_or(|n| s.seq.0 >= n))
        .map(|s| s.data_end.saturating_sub(PAGE_BYTES))
        .sum();
    let bar = (!json_output() && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let started = std::time::Instant::now();
    let options = VerifyOptions {
        trusted_keys: trusted.clone(),
        from_segment: a.from_segment.map(tally_engine::SegmentSeq),
        threads: a.threads,
        attribute_indexes: a.attribute_indexes,
        kept,
        witnesses,
        min_witnesses: a.min_witnesses,
        producers,
        skip_blobs: a.skip_blobs,
    };
    let result = log.verify_with(&options, &mut |done| {
        if let Some(b) = &bar {
            b.set_position(done);
        }
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let elapsed = started.elapsed();
    let outcome = match result {
        Ok(report) => {
            let cps = log.checkpoints();
            if !trusted.is_empty() && report.records > 0 && report.checkpoints == 0 {
                Err(json!({
                    "what": "no checkpoint signed by a trusted key covers this log",
                    "file": a.dir.join(tally_engine::CHECKPOINTS_FILE),
                }))
            } else {
                Ok((report, cps))
            }
        }
        Err(Error::Corrupt {
            file,
            offset,
            position,
            detail,
            source,
        }) => Err(json!({
            "file": file,
            "offset": offset,
            "position": position,
            "what": detail,
            "cause": source.map(|s| s.to_string()),
        })),
        Err(Error::Index { file, source }) => Err(json!({
            "file": file,
            "what": "index sidecar is unusable",
            "cause": source.to_string(),
        })),
        // A blob that is missing or does not match its reference is a finding; a store
        // that cannot be reached is not (exit 2, as for any I/O failure).
        Err(Error::Blob {
            hash,
            object,
            detail,
            source,
        }) if source
            .as_ref()
            .is_none_or(|s| s.kind() == std::io::ErrorKind::NotFound) =>
        {
            Err(json!({
                "blob": hash,
                "object": object,
                "what": detail,
                "cause": source.map(|s| s.to_string()),
            }))
        }
        Err(e) => return Err(e).context("verifying"),
    };
    match outcome {
        Ok((report, cps)) => {
            let mut v = json!({
                "ok": true,
                "segments": report.segments,
                "records": report.records,
                "bytes": report.bytes,
                "first_position": report.first_position.0,
                "checkpoints": report.checkpoints,
                "newest_checkpoint_checked": report.newest_checkpoint.map(|(id, size)| json!({"id": id, "tree_size": size})),
                "latest_checkpoint": cps.last().map(checkpoint_json),
                "kept": report.kept.iter().map(|(id, size)| json!({"id": id, "tree_size": size})).collect::<Vec<_>>(),
                "witnesses": {
                    "cosignatures": report.cosignatures,
                    "min_witnesses": a.min_witnesses,
                    "newest_witnessed": report.newest_witnessed.map(|(id, size)| json!({"id": id, "tree_size": size})),
                },
                "format_version": report.format_version,
                "blobs": {"references": report.blob_refs, "checked": report.blobs_checked, "skipped": a.skip_blobs},
                "producers": a.producers.as_ref().map(|_| json!({"signed_batches": report.signed_batches, "unsigned_batches": report.unsigned_batches, "pruned_batches": report.pruned_batches})),
                "removed": report.removed,
                "proves": if report.format_version >= 2 { "inclusion, stream completeness, window completeness" } else { "inclusion only" },
                "derived": {
                    "stream_links": report.stream_links,
                    "stream_snapshot_checked": report.snapshot_checked,
                    "merkle_nodes": report.tree_nodes,
                    "sidecars_missing": report.sidecars_missing.iter().map(|s| s.0).collect::<Vec<_>>(),
                },
                "last_chain_hash": hex(&report.last_chain_hash),
                "seconds": elapsed.as_secs_f64(),
                "signatures": if trusted.is_empty() { "checked against the keys stored with them" } else { "checked against --pubkey" },
            });
            if a.attribute_indexes {
                v["attribute_indexes"] = json!(report.attribute_indexes);
            }
            if json_output() {
                print_json(&v)?;
            } else {
                if a.attribute_indexes {
                    println!(
                        "attribute indexes: {} sidecars match their segments' records",
                        report.attribute_indexes
                    );
                }
                println!(
                    "ok: {} segments, {} records, {} bytes from position {}, {} checkpoints verified ({}), in {:.2} s",
                    report.segments,
                    report.records,
                    report.bytes,
                    report.first_position.0,
                    report.checkpoints,
                    if trusted.is_empty() {
                        "signatures checked against their own keys; pass --pubkey to pin the key"
                    } else {
                        "signed by a trusted key"
                    },
                    elapsed.as_secs_f64()
                );
                match report.newest_checkpoint {
                    Some((id, size)) => {
                        println!("newest checkpoint checked: {id} (tree size {size})")
                    }
                    None => println!("no checkpoint checked"),
                }
                if !report.removed.is_empty() {
                    let n: u64 = report.removed.iter().map(|r| r.to - r.from).sum();
                    println!(
                        "removed by retention: {n} events in {} ranges, each checked against the run that removed it",
                        report.removed.len()
                    );
                    // By run event and policy (the ranges themselves are in --json).
                    let mut groups: std::collections::BTreeMap<(u64, &str), (u64, u64, u64)> =
                        std::collections::BTreeMap::new();
                    for r in &report.removed {
                        let g = groups
                            .entry((r.removed_by, r.policy.as_str()))
                            .or_insert((0, r.from, r.to));
                        g.0 += r.to - r.from;
                        g.1 = g.1.min(r.from);
                        g.2 = g.2.max(r.to);
                    }
                    for ((by, policy), (events, from, to)) in &groups {
                        println!(
                            "  {events} events between positions {from} and {to}  policy {policy}  run at position {by}"
                        );
                    }
                }
                if report.blob_refs > 0 {
                    if a.skip_blobs {
                        println!(
                            "blobs: {} references, not read (--skip-blobs)",
                            report.blob_refs
                        );
                    } else {
                        println!(
                            "blobs: {} references, {} distinct blobs read from the store and matched",
                            report.blob_refs, report.blobs_checked
                        );
                    }
                }
                if a.producers.is_some() {
                    println!(
                        "producer signatures: {} signed batches verified, {} unsigned batches where the policy allows them",
                        report.signed_batches, report.unsigned_batches
                    );
                }
                for (id, size) in &report.kept {
                    println!("the log extends kept checkpoint {id} (tree size {size})");
                }
                if !a.witness.is_empty() {
                    match report.newest_witnessed {
                        Some((id, size)) => println!(
                            "newest checkpoint cosigned by {} of the witnesses: {id} (tree size {size}); {} cosignatures checked",
                            a.min_witnesses.max(1),
                            report.cosignatures
                        ),
                        None => println!("no checkpoint is cosigned by the given witnesses"),
                    }
                }
                println!(
                    "derived data checked against the records: {} index links, {} Merkle nodes, stream snapshot {}",
                    report.stream_links,
                    report.tree_nodes,
                    if report.snapshot_checked {
                        "checked"
                    } else {
                        "not checked (none, or newer than this view of a live log)"
                    }
                );
                if !report.sidecars_missing.is_empty() {
                    println!(
                        "note: {} sealed segment(s) have no index sidecar ({}); checked from their records, and the next writable open rebuilds them",
                        report.sidecars_missing.len(),
                        report
                            .sidecars_missing
                            .iter()
                            .map(|s| s.0.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                if report.format_version < 2 {
                    println!(
                        "format version 1: its checkpoints commit to no stream heads, so this log's checkpoints and extracts prove inclusion only (not that a stream or a time window is complete)"
                    );
                }
                println!("chain head {}", hex(&report.last_chain_hash));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(failure) => Err(FindingReport(failure).into()),
    }
}
