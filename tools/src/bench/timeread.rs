//! `derechofs bench timeread`: the latency of `stat` and of reading a whole 1 MiB file at a past
//! time (`NAME@T`), against the same on the live file, for a file with `--versions` versions; and
//! the live reads of that file against a file of the same size with one version.
//!
//! It runs the file system facade (`derechofs_fs::FileSystem`) over shards in this process
//! (`LocalShards`: logs in memory, one replica each, no network, no FUSE), so it measures the
//! file system's own cost of reading the past: the FUSE cost is the same for both paths, and the
//! cluster's round trip comes on top of both.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use derechofs_fs::{Creds, FileSystem, FsConfig, LocalShards, Shards, ROOT_INO};

use crate::table::Table;

const FILE_BYTES: usize = 1 << 20;
/// Most versions one run may make.
const VERSIONS_MAX: u64 = 10_000_000;

/// Arguments of `derechofs bench timeread`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Versions of the file (each a 4 KiB write somewhere in it).
    #[arg(long, default_value_t = 100_000)]
    versions: u64,
    /// Timed repetitions of each measurement.
    #[arg(long, default_value_t = 2_000)]
    reps: u32,
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// Builds the files, then times the reads.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.versions == 0 || args.versions > VERSIONS_MAX || args.reps == 0 {
        bail!("--versions must be 1..={VERSIONS_MAX} and --reps at least 1");
    }
    let shards = LocalShards::with_defaults(1).map_err(anyhow::Error::msg)?;
    let config = FsConfig {
        client_base: 1 << 32,
        skew_max_us: derechofs_fs::filesystem::SKEW_MAX_US_DEFAULT,
        root_owner: Creds { uid: 0, gid: 0 },
    };
    let fs = FileSystem::new(shards, config).context("file system")?;
    let root = Creds { uid: 0, gid: 0 };
    let data = vec![7u8; FILE_BYTES];

    let one = fs.create(ROOT_INO, b"one-version", 0o644, root)?;
    fs.write(one.ino, 0, &data)?;
    let many = fs.create(ROOT_INO, b"many-versions", 0o644, root)?;
    fs.write(many.ino, 0, &data)?;
    let start = Instant::now();
    let mut times = Vec::new();
    let piece = vec![9u8; 4096];
    for v in 1..args.versions {
        let at = (v * 4096 * 7919) % (FILE_BYTES as u64 - 4096);
        fs.write(many.ino, at, &piece)?;
        if v % (args.versions / 64).max(1) == 0 {
            times.push(fs.shards().now_us());
        }
    }
    eprintln!(
        "made {} versions in {:.1} s",
        args.versions,
        start.elapsed().as_secs_f64()
    );
    if times.is_empty() {
        times.push(fs.shards().now_us());
    }

    let mut table = Table::new(&["measure", "p50 us", "p99 us"]);
    let time = |f: &mut dyn FnMut(u32) -> anyhow::Result<()>| -> anyhow::Result<Vec<Duration>> {
        let mut v = Vec::with_capacity(args.reps as usize);
        for i in 0..args.reps {
            let s = Instant::now();
            f(i)?;
            v.push(s.elapsed());
        }
        Ok(v)
    };
    let mut report = |name: &str, v: Vec<Duration>| {
        table.row(vec![
            name.to_string(),
            us(percentile(v.clone(), 0.5)),
            us(percentile(v, 0.99)),
        ]);
    };
    let snap_name = |i: u32| format!("many-versions@{}us", times[i as usize % times.len()]);

    report(
        "stat live",
        time(&mut |_| {
            fs.lookup(ROOT_INO, b"many-versions")
                .map(drop)
                .map_err(Into::into)
        })?,
    );
    report(
        "stat @T",
        time(&mut |i| {
            fs.lookup(ROOT_INO, snap_name(i).as_bytes())
                .map(drop)
                .map_err(Into::into)
        })?,
    );
    report(
        "read 1 MiB live",
        time(&mut |_| {
            let b = fs.read(many.ino, 0, FILE_BYTES as u32)?;
            anyhow::ensure!(b.len() == FILE_BYTES, "short read");
            Ok(())
        })?,
    );
    report(
        "read 1 MiB @T",
        time(&mut |i| {
            let a = fs.lookup(ROOT_INO, snap_name(i).as_bytes())?;
            let b = fs.read(a.ino, 0, FILE_BYTES as u32)?;
            anyhow::ensure!(b.len() == FILE_BYTES, "short read");
            Ok(())
        })?,
    );
    report(
        "read 1 MiB, 1 version",
        time(&mut |_| {
            let b = fs.read(one.ino, 0, FILE_BYTES as u32)?;
            anyhow::ensure!(b.len() == FILE_BYTES, "short read");
            Ok(())
        })?,
    );
    Ok(())
}
