//! `derechofs bench …`: benchmarks that print tables (the numbers go to docs/PERFORMANCE.md).

mod log;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// The persistent versioned log: appends per sync policy, point reads, time lookups, reopen
    /// time and index memory.
    Log(log::Args),
}

/// Runs one benchmark.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Log(args) => log::run(args),
    }
}
