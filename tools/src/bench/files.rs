//! `derechofs bench files DIR`: the metadata test of `bench/fs.sh` — create, stat and remove
//! `--count` empty files in one directory, one system call at a time, and print the rate of each
//! phase on one line (`create_per_s=… stat_per_s=… unlink_per_s=…`) for the script to read.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};

use crate::out::outln;

/// Most files one run may create.
const COUNT_MAX: usize = 10_000_000;

/// Arguments of `derechofs bench files`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to work in (a subdirectory is created and removed).
    dir: PathBuf,
    /// Files to create, stat and remove.
    #[arg(long, default_value_t = 10_000)]
    count: usize,
}

/// Runs the three phases and prints their rates.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.count == 0 || args.count > COUNT_MAX {
        bail!(
            "--count must be between 1 and {COUNT_MAX}, not {}",
            args.count
        );
    }
    let dir = args
        .dir
        .join(format!("derechofs-files-{}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let names: Vec<PathBuf> = (0..args.count).map(|i| dir.join(format!("f{i}"))).collect();
    let rate = |start: Instant| args.count as f64 / start.elapsed().as_secs_f64();

    let start = Instant::now();
    for n in &names {
        std::fs::File::create(n).with_context(|| format!("creating {}", n.display()))?;
    }
    let create = rate(start);

    let start = Instant::now();
    for n in &names {
        std::fs::symlink_metadata(n).with_context(|| format!("stat of {}", n.display()))?;
    }
    let stat = rate(start);

    let start = Instant::now();
    for n in &names {
        std::fs::remove_file(n).with_context(|| format!("removing {}", n.display()))?;
    }
    let unlink = rate(start);
    std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
    outln!("create_per_s={create:.0} stat_per_s={stat:.0} unlink_per_s={unlink:.0}")?;
    Ok(())
}
