//! Mounts DerechoFS over in-process shards kept in memory (`derechofs_fs::LocalShards`: one
//! namespace shard and `DATA_SHARDS` data shards, one replica each, no network) and serves it in
//! the foreground until unmounted or interrupted. It exercises the FUSE adapter and the file
//! system logic through a real kernel mount without a cluster: the FUSE test harness runs its
//! suites on it (`scripts/fuse-tests.sh memory`). Everything is lost when it exits.
//!
//! Usage: memory_mount MOUNTPOINT [-o OPTIONS]

use std::path::PathBuf;
use std::process::ExitCode;

use derechofs_fs::{Creds, FileSystem, FsConfig, LocalShards};
use derechofs_mount::{DerechoFs, MountOptions};

const DATA_SHARDS: u32 = 3;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mountpoint, options) = match args.as_slice() {
        [m] => (PathBuf::from(m), String::new()),
        [m, o, opts] if o == "-o" => (PathBuf::from(m), opts.clone()),
        _ => {
            eprintln!("usage: memory_mount MOUNTPOINT [-o OPTIONS]");
            return ExitCode::from(2);
        }
    };
    match run(&mountpoint, &options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory_mount: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(mountpoint: &std::path::Path, options: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut options = MountOptions::parse(options)?;
    options.default_permissions = true;
    let shards = LocalShards::with_defaults(DATA_SHARDS)?;
    let config = FsConfig {
        client_base: u64::from(std::process::id()) << 16,
        skew_max_us: derechofs_fs::filesystem::SKEW_MAX_US_DEFAULT,
        root_owner: Creds { uid: 0, gid: 0 },
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    let fs = DerechoFs::new(FileSystem::new(shards, config)?);
    derechofs_mount::serve(fs, mountpoint, &options, "memory", "derechofs", |_| {
        eprintln!("memory_mount: mounted at {}", mountpoint.display())
    })?;
    Ok(())
}
