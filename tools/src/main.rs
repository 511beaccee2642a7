//! `derechofs`: the command of the DerechoFS distributed versioned file system.

// Output goes through `out::outln!` and `out::errln!`, which do not panic on a closed pipe.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod alloc;
mod bench;
mod client;
mod config;
mod dump;
mod history;
mod kv;
mod mount;
mod mountinfo;
mod node;
mod out;
use derechofs_core::protocol;
mod table;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use out::{errln, StdoutError};

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
    /// Run one member of the group until interrupted.
    Node {
        /// The configuration file (`derechofs.toml`); without it, defaults and flags.
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        overrides: config::Overrides,
    },
    /// Use the replicated K/V store.
    Kv(kv::KvArgs),
    /// Show the view, the shards, their frontiers and lag at every member.
    Status(kv::ClientArgs),
    /// Show the history of a path in the file system: when it changed, by which version.
    Log(history::LogArgs),
    /// Print a stopped node's shard logs as text, to compare replicas.
    Dump {
        /// The node's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Mount a cluster's file system and serve it in the foreground until unmounted or
    /// interrupted (`mount.derechofs` is the daemonizing mount(8) helper).
    Mount(mount::Args),
    /// Start a local cluster of N nodes, mount it, and stay in the foreground until Ctrl-C,
    /// which unmounts and stops the nodes.
    Up(up::Args),
    /// Run a benchmark and print its table.
    #[command(subcommand)]
    Bench(bench::Bench),
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DERECHOFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        // A failed write to standard error has nowhere to be reported (the default would
        // report it with `eprintln!`, which panics when standard error is a closed pipe).
        .log_internal_errors(false)
        .try_init();
}

fn main() {
    alloc::keep_freed_memory();
    // Installed as /sbin/mount.derechofs, this program is mount(8)'s helper.
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(std::ffi::OsStr::new("mount.derechofs")) {
        init_logging("warn");
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        std::process::exit(mount::helper_main(&args));
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Node { config, overrides } => {
            init_logging("info");
            config::NodeConfig::resolve(config.as_deref(), &overrides)
                .map_err(anyhow::Error::from)
                .and_then(node::run)
                .map(|()| 0)
        }
        Command::Kv(args) => {
            init_logging("warn");
            kv::run(args)
        }
        Command::Status(args) => {
            init_logging("warn");
            kv::status(args)
        }
        Command::Log(args) => {
            init_logging("warn");
            history::run(args)
        }
        Command::Dump { data_dir } => dump::run(&data_dir),
        Command::Mount(args) => {
            init_logging("warn");
            mount::run(args).map(|()| 0)
        }
        Command::Up(args) => {
            init_logging("warn");
            up::run(args).map(|()| 0)
        }
        Command::Bench(b) => bench::run(b).map(|()| 0),
    };
    match result {
        Ok(code) => std::process::exit(code),
        // The reader of standard output has gone (`derechofs kv history K | head -1`).
        Err(e)
            if e.downcast_ref::<StdoutError>()
                .is_some_and(StdoutError::is_closed) =>
        {
            out::exit_closed_stdout()
        }
        Err(e) => {
            errln!("derechofs: error: {e:#}");
            std::process::exit(1);
        }
    }
}
