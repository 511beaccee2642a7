//! `derechofs bench log`: the persistent versioned log on the directory given.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use derechofs_storage::backend::FileBackend;
use derechofs_storage::{Hlc, Log, LogConfig, SyncPolicy, Write};

use crate::alloc::live_bytes;
use crate::out::outln;
use crate::table::Table;

/// Arguments of `derechofs bench log`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the logs under (created; each run uses and removes a subdirectory).
    #[arg(long)]
    dir: PathBuf,
    /// Seconds each append run lasts at most.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Bytes each append run writes at most.
    #[arg(long, default_value_t = 1 << 30)]
    max_bytes: u64,
    /// The interval of the `batch_ms` sync policy.
    #[arg(long, default_value_t = 5)]
    batch_ms: u64,
    /// Versions in the log used for reads, reopen and memory.
    #[arg(long, default_value_t = 1_000_000)]
    versions: u64,
    /// Distinct keys those versions write (one key per version, round robin).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Random point reads and time lookups to time.
    #[arg(long, default_value_t = 2_000_000)]
    lookups: u64,
    /// Only the append table.
    #[arg(long)]
    appends_only: bool,
    /// Only the read, reopen and memory table.
    #[arg(long)]
    reads_only: bool,
}

/// A tiny deterministic generator for the random reads.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn now_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

fn key_of(i: u64, keys: u64) -> Vec<u8> {
    format!("key-{:08}", i % keys).into_bytes()
}

fn fresh(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let sub = dir.join(name);
    if sub.exists() {
        std::fs::remove_dir_all(&sub).with_context(|| format!("removing {}", sub.display()))?;
    }
    Ok(sub)
}

fn open(dir: &Path, sync: SyncPolicy, checkpoint_every_versions: u64) -> anyhow::Result<Log> {
    let backend = FileBackend::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    let config = LogConfig {
        sync,
        checkpoint_every_versions,
        ..LogConfig::default()
    };
    Log::open(Arc::new(backend), config)
        .with_context(|| format!("opening the log in {}", dir.display()))
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.seconds <= 0.0 || !args.seconds.is_finite() {
        bail!("--seconds must be a positive number, not {}", args.seconds);
    }
    if args.versions == 0 || args.keys == 0 || args.keys > args.versions {
        bail!("--versions and --keys must be positive with --keys ≤ --versions");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    outln!("derechofs bench log --dir {}", args.dir.display())?;
    if !args.reads_only {
        appends(&args)?;
    }
    if !args.appends_only {
        reads(&args)?;
    }
    Ok(())
}

fn appends(args: &Args) -> anyhow::Result<()> {
    outln!("\nAppends: one key per delta, commit after every append, final sync included.")?;
    let mut table = Table::new(&["delta", "policy", "records", "records/s", "MiB/s"]);
    let policies = [
        ("fsync", SyncPolicy::Fsync),
        ("batch_ms", SyncPolicy::BatchMs(args.batch_ms)),
        ("none", SyncPolicy::None),
    ];
    for (size_name, size) in [("100 B", 100usize), ("4 KiB", 4096), ("1 MiB", 1 << 20)] {
        for (policy_name, policy) in policies {
            let dir = fresh(&args.dir, "append")?;
            let mut log = open(&dir, policy, 0)?;
            let value = vec![0xA5u8; size];
            let limit = Duration::from_secs_f64(args.seconds);
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < limit && n * size as u64 <= args.max_bytes {
                n += 1;
                let key = key_of(n, 10_000);
                log.append(n, Hlc::at(n), &[Write::put(&key, &value)])?;
                log.commit(now_ms(start))?;
            }
            if policy != SyncPolicy::None {
                log.sync()?;
            } else {
                log.commit(now_ms(start))?;
            }
            let secs = start.elapsed().as_secs_f64();
            drop(log);
            std::fs::remove_dir_all(&dir).ok();
            table.row(vec![
                size_name.into(),
                policy_name.into(),
                n.to_string(),
                format!("{:.0}", n as f64 / secs),
                format!("{:.1}", (n * size as u64) as f64 / secs / (1 << 20) as f64),
            ])?;
        }
    }
    Ok(())
}

fn reads(args: &Args) -> anyhow::Result<()> {
    let (versions, keys) = (args.versions, args.keys);
    outln!("\nReads: {versions} versions of 100 B values over {keys} keys.")?;
    let dir = fresh(&args.dir, "reads")?;
    let mut log = open(&dir, SyncPolicy::None, 0)?;
    let value = [0x5Au8; 100];
    let start = Instant::now();
    for v in 1..=versions {
        let key = key_of(v, keys);
        log.append(v, Hlc::at(1_000 + v * 10), &[Write::put(&key, &value)])?;
    }
    log.checkpoint()?;
    let build = start.elapsed();
    let mut table = Table::new(&["measure", "value", "unit"]);
    table.row(vec![
        "build".into(),
        format!("{:.2}", build.as_secs_f64()),
        "s".into(),
    ])?;

    let key_list: Vec<Vec<u8>> = (0..keys).map(|i| key_of(i, keys)).collect();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let picks: Vec<(usize, u64)> = (0..args.lookups)
        .map(|_| ((rng.next() % keys) as usize, 1 + rng.next() % versions))
        .collect();
    let start = Instant::now();
    let mut found = 0usize;
    for (k, v) in &picks {
        if let Some(value) = log.get(&key_list[*k], *v)? {
            found += value.len();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(found);
    table.row(vec![
        "point reads".into(),
        format!("{:.0}", picks.len() as f64 / secs),
        "reads/s".into(),
    ])?;

    let times: Vec<Hlc> = (0..args.lookups)
        .map(|_| Hlc::at(1_000 + rng.next() % (versions * 10 + 20)))
        .collect();
    let start = Instant::now();
    let mut sum = 0u64;
    for t in &times {
        sum = sum.wrapping_add(log.version_at(*t)?.unwrap_or(0));
    }
    let secs = start.elapsed().as_secs_f64();
    black_box(sum);
    table.row(vec![
        "time lookups".into(),
        format!("{:.0}", times.len() as f64 / secs),
        "lookups/s".into(),
    ])?;
    drop(log);

    let before = live_bytes();
    let start = Instant::now();
    let log = open(&dir, SyncPolicy::None, 0)?;
    let reopen = start.elapsed();
    let index = live_bytes().saturating_sub(before);
    if !log.recovery_report().from_checkpoint || log.version_count() as u64 != versions {
        bail!("reopen did not recover the {versions} versions from the checkpoint");
    }
    table.row(vec![
        "reopen (checkpoint)".into(),
        format!("{:.3}", reopen.as_secs_f64()),
        "s".into(),
    ])?;
    table.row(vec![
        "index memory".into(),
        format!("{:.1}", index as f64 / versions as f64),
        "B/version".into(),
    ])?;
    drop(log);

    std::fs::remove_file(dir.join("index.ckpt")).context("removing the checkpoint")?;
    let start = Instant::now();
    let log = open(&dir, SyncPolicy::None, 0)?;
    let rescan = start.elapsed();
    if log.version_count() as u64 != versions {
        bail!(
            "the full rescan recovered {} of {versions} versions",
            log.version_count()
        );
    }
    table.row(vec![
        "reopen (full scan)".into(),
        format!("{:.3}", rescan.as_secs_f64()),
        "s".into(),
    ])?;
    drop(log);
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
