//! `derechofs`: the command of the DerechoFS distributed versioned file system.

mod alloc;
mod bench;
// The node configuration file; the `node` command will use it.
#[allow(dead_code)]
mod config;
mod table;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: alloc::Counting = alloc::Counting;

/// DerechoFS: a distributed, versioned POSIX file system.
#[derive(Debug, Parser)]
#[command(name = "derechofs", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a benchmark and print its table.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(b) => bench::run(b),
    };
    if let Err(e) = result {
        eprintln!("derechofs: error: {e:#}");
        std::process::exit(1);
    }
}
