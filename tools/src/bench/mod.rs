//! `derechofs bench …`: benchmarks that print tables (the numbers go to docs/PERFORMANCE.md).

mod failover;
mod files;
mod histogram;
mod join;
mod kv;
mod log;
mod multicast;
mod passthrough;
mod restart;
mod transfer;

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
    /// The K/V store on three node processes started on loopback: closed-loop put, conditional
    /// put and contended conditional put; one Markdown row per run.
    Kv(kv::Args),
    /// Raw ordered multicast in one shard of three members over loopback TCP, volatile:
    /// delivered throughput at every member and submit-to-delivery latency.
    Multicast(multicast::Args),
    /// Time from a SIGKILL of one member to writes flowing again in a new view, over several
    /// trials on fresh local clusters.
    Failover(failover::Args),
    /// Create, stat and remove many empty files in a directory; print the rate of each phase.
    Files(files::Args),
    /// The storage side of state transfer: copy a log of each size given, piece by piece as a
    /// node serves and takes a transfer, syncing each piece; print the rate.
    Transfer(transfer::Args),
    /// Total restart against log size: three node processes on loopback take writes until
    /// each size is written, are all SIGKILLed and started again; time to the first write and
    /// to every node active.
    Restart(restart::Args),
    /// State transfer of a real joiner: four node processes on loopback, the data shard filled
    /// to each size, one of its members SIGKILLed; time until the spare that takes its place
    /// has caught the shard up, while a probe writer goes on.
    Join(join::Args),
}

/// Runs one benchmark.
pub fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Log(args) => log::run(args),
        Bench::Passthrough(args) => passthrough::run(args),
        Bench::Kv(args) => kv::run(args),
        Bench::Multicast(args) => multicast::run(args),
        Bench::Failover(args) => failover::run(args),
        Bench::Files(args) => files::run(args),
        Bench::Transfer(args) => transfer::run(args),
        Bench::Restart(args) => restart::run(args),
        Bench::Join(args) => join::run(args),
    }
}
