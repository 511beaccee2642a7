//! `derechofs bench transfer`: the storage side of state transfer on the directory given. A
//! source log of the size asked is written and synced; then it is copied to a fresh log the way
//! a node serves and takes a transfer: pieces of at most `TRANSFER_PIECE_BYTES_MAX` bytes read
//! with `Log::read_records` (resuming from the cursor), appended with `Log::append_payload`, and
//! synced once per piece (the joiner persists each piece before it may ask for more than
//! `TRANSFER_PIECES_UNPERSISTED_MAX`). No network: over loopback the transport is not the bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use derechofs_core::{TRANSFER_PIECE_BYTES_MAX, TRANSFER_PIECE_RECORDS_MAX};
use derechofs_storage::backend::FileBackend;
use derechofs_storage::{version_of, Hlc, Log, LogConfig, SyncPolicy, Write};

use crate::table::Table;

/// Arguments of `derechofs bench transfer`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the logs under (created; each run uses and removes subdirectories).
    #[arg(long)]
    dir: PathBuf,
    /// Sizes of the source log to copy, in MiB.
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 256, 1024])]
    mib: Vec<u64>,
    /// Bytes of the value each version writes.
    #[arg(long, default_value_t = 4096)]
    value_bytes: usize,
}

fn open(dir: &Path) -> anyhow::Result<Log> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let backend = FileBackend::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let config = LogConfig {
        sync: SyncPolicy::Fsync,
        ..LogConfig::default()
    };
    Log::open(Arc::new(backend), config).with_context(|| format!("log in {}", dir.display()))
}

/// Runs the benchmark and prints one row per size.
pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.value_bytes > 0, "--value-bytes must be positive");
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut table = Table::new(&[
        "log MiB",
        "versions",
        "pieces",
        "transfer s",
        "MiB/s",
        "source fill s",
    ]);
    let value = vec![0x5au8; args.value_bytes];
    for &mib in &args.mib {
        let bytes = mib << 20;
        let versions = (bytes / args.value_bytes as u64).max(1);
        let mut source = open(&args.dir.join("transfer-source"))?;
        let filled = Instant::now();
        for i in 0..versions {
            let key = format!("key-{:08}", i % 100_000);
            let version = version_of(1, i as u32);
            source.append(
                version,
                Hlc::at(1_000_000 + i),
                &[Write::put(key.as_bytes(), &value)],
            )?;
        }
        source.sync()?;
        let fill_s = filled.elapsed().as_secs_f64();
        let end = version_of(1, (versions - 1) as u32);
        let mut joiner = open(&args.dir.join("transfer-joiner"))?;
        let started = Instant::now();
        let (mut after, mut cursor, mut pieces) = (None, None, 0u64);
        loop {
            let (records, next) = source.read_records(
                after,
                end,
                TRANSFER_PIECE_BYTES_MAX,
                TRANSFER_PIECE_RECORDS_MAX,
                cursor,
            )?;
            let Some(last) = records.last() else { break };
            after = Some(last.version);
            cursor = next;
            for record in &records {
                joiner.append_payload(record.version, record.hlc, &record.payload)?;
            }
            joiner.sync()?;
            pieces += 1;
        }
        let transfer_s = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            joiner.latest().map(|l| l.0) == Some(end),
            "the copy ends at {:?}, not {end:#x}",
            joiner.latest()
        );
        let mib_s = (versions * args.value_bytes as u64) as f64 / (1 << 20) as f64 / transfer_s;
        table.row(vec![
            mib.to_string(),
            versions.to_string(),
            pieces.to_string(),
            format!("{transfer_s:.2}"),
            format!("{mib_s:.0}"),
            format!("{fill_s:.2}"),
        ])?;
        drop(source);
        drop(joiner);
        for name in ["transfer-source", "transfer-joiner"] {
            std::fs::remove_dir_all(args.dir.join(name)).ok();
        }
    }
    Ok(())
}
