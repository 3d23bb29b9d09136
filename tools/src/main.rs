//! `tally`: the operator's command-line tool.
//!
//! - `tally demo`: an end-to-end run of the engine on an embedded data directory (trade
//!   lifecycle events, reads, reopen, chain verification).
//! - `tally bench`: the embedded load generator (throughput and acknowledgement latency).

#![forbid(unsafe_code)]

mod bench;
mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Tally: a tamper-evident event store.
#[derive(Parser, Debug)]
#[command(name = "tally", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the end-to-end demo: append trade-lifecycle events, read them back, reopen,
    /// verify the chain.
    Demo(demo::DemoArgs),
    /// Append to an embedded log from several threads and report throughput and
    /// acknowledgement latency.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tally: {e:#}");
            ExitCode::from(2)
        }
    }
}
