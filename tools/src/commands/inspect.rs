//! `tally inspect`: the segments, or one segment's header, footer and index.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{Value, json};
use tally_engine::SegmentSeq;
use tally_engine::format::PAGE_BYTES;
use tally_engine::format::proof::hex;

use crate::support::{
    checkpoint_json, json_output, open_read_only, print_json, print_tree, rfc3339,
};

/// `tally inspect DIR`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The data directory.
    dir: PathBuf,
    /// Show one segment (by sequence number) in detail.
    #[arg(long)]
    segment: Option<u64>,
}

fn index_json(i: Option<&tally_engine::IndexSummary>) -> Value {
    i.map_or(Value::Null, |i| {
        json!({
            "file": i.file,
            "records": i.records,
            "streams": i.streams,
            "complete": i.complete,
        })
    })
}

/// Prints the segments table, or one segment.
pub fn inspect(a: &InspectArgs) -> Result<ExitCode> {
    let log = open_read_only(&a.dir)?;
    let segs = log.segments();
    if let Some(n) = a.segment {
        let d = log
            .segment_detail(SegmentSeq(n))
            .with_context(|| format!("segment {n} of {}", a.dir.display()))?;
        let seg = &d.info;
        let v = match &d.header {
            // No local file: what the manifest and the local sidecar say.
            None => json!({
                "state": "cold",
                "object": seg.cold,
                "records": seg.record_count,
                "first_position": seg.base_position.0,
                "data_end": seg.data_end,
                "first_record_time": d.record_times.map(|t| rfc3339(t.0)),
                "last_record_time": d.record_times.map(|t| rfc3339(t.1)),
                "merkle_root": seg.merkle_root.map(|r| hex(&r)),
                "index": index_json(d.index.as_ref()),
            }),
            Some(header) => json!({
                "file": seg.path,
                "state": if seg.sealed { "sealed" } else { "active" },
                "header": {
                    "seq": header.seq.0,
                    "log_id": hex(&header.log_id),
                    "base_position": header.base_position.0,
                    "created_time": rfc3339(header.created_time),
                    "capacity": header.capacity,
                    "prev_chain_hash": hex(&header.prev_chain_hash),
                },
                "footer": d.footer.map(|f| json!({
                    "record_count": f.record_count,
                    "first_position": f.first_position.0,
                    "last_position": f.last_position.0,
                    "data_end": f.data_end,
                    "first_record_time": rfc3339(f.first_record_time),
                    "last_record_time": rfc3339(f.last_record_time),
                    "last_chain_hash": hex(&f.last_chain_hash),
                    "merkle_root": hex(&f.merkle_root),
                })),
                "index": index_json(d.index.as_ref()),
                "records": seg.record_count,
                "data_end": seg.data_end,
            }),
        };
        if json_output() {
            print_json(&v)?;
        } else {
            print_tree(&v, 0);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    for s in &segs {
        let times = log.segment_detail(s.seq)?.record_times;
        records += s.record_count;
        bytes += s.data_end.saturating_sub(PAGE_BYTES);
        rows.push(json!({
            "seq": s.seq.0,
            "file": s.path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "state": if s.cold.is_some() { "cold" } else if s.sealed { "sealed" } else { "active" },
            "object": s.cold,
            "first_position": s.base_position.0,
            "last_position": (s.record_count > 0).then(|| s.base_position.0 + s.record_count - 1),
            "records": s.record_count,
            "bytes": s.data_end.saturating_sub(PAGE_BYTES),
            "first_time": times.map(|t| rfc3339(t.0)),
            "last_time": times.map(|t| rfc3339(t.1)),
            "merkle_root": s.merkle_root.map(|r| hex(&r)),
        }));
    }
    let cps = log.checkpoints();
    let v = json!({
        "dir": a.dir,
        "log_id": hex(&log.log_id()),
        "segments": rows,
        "totals": {
            "segments": segs.len(),
            "records": records,
            "bytes": bytes,
            "checkpoints": cps.len(),
            "latest_checkpoint": cps.last().map(checkpoint_json),
        },
    });
    if json_output() {
        print_json(&v)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("log {}  ({})", hex(&log.log_id()), a.dir.display());
    println!(
        "{:>6}  {:<26}  {:<6}  {:>10}  {:>10}  {:>9}  {:>12}  {:<30}  {:<30}  merkle root",
        "seq", "file", "state", "first", "last", "records", "bytes", "first time", "last time"
    );
    for r in &rows {
        let s = |k: &str| match &r[k] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let root = s("merkle_root");
        println!(
            "{:>6}  {:<26}  {:<6}  {:>10}  {:>10}  {:>9}  {:>12}  {:<30}  {:<30}  {}",
            s("seq"),
            s("file"),
            s("state"),
            s("first_position"),
            s("last_position"),
            s("records"),
            s("bytes"),
            s("first_time"),
            s("last_time"),
            if root.len() > 16 { &root[..16] } else { &root },
        );
    }
    println!(
        "total: {} segments, {records} records, {bytes} bytes, {} checkpoints",
        segs.len(),
        cps.len()
    );
    Ok(ExitCode::SUCCESS)
}
