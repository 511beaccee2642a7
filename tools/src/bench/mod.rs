//! `derechofs bench …`: benchmarks that print tables (the numbers go to docs/PERFORMANCE.md).

mod log;
mod passthrough;

use clap::Subcommand;

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// The persistent versioned log: appends per sync policy, point reads, time lookups, reopen
    /// time and index memory.
    Log(log::Args),
    /// Mount a FUSE passthrough of a local directory (the FUSE limit of `bench/fs.sh`) and
    /// serve it in the foreground until unmounted or interrupted.
    Passthrough(passthrough::Args),
}

/// Runs one benchmark.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Log(args) => log::run(args),
        Bench::Passthrough(args) => passthrough::run(args),
    }
}
