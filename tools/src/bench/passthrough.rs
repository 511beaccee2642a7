//! `derechofs bench passthrough SOURCE MOUNTPOINT`: mounts a FUSE passthrough of a local
//! directory and serves it in the foreground until unmounted or interrupted. It is the "FUSE
//! passthrough" limit of `bench/fs.sh` (the cost of FUSE alone) and the reference the FUSE test
//! harness is checked against.

use std::path::PathBuf;

use anyhow::Context;
use derechofs_mount::{MountOptions, Passthrough};

use crate::out::errln;

/// The passthrough's arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The directory to pass through.
    source: PathBuf,
    /// Where to mount it.
    mountpoint: PathBuf,
    /// Mount options, comma-separated (as for `derechofs mount`).
    #[arg(short = 'o', default_value = "")]
    options: String,
}

/// Mounts and serves until unmounted.
pub fn run(args: Args) -> anyhow::Result<()> {
    let options = MountOptions::parse(&args.options)?;
    // What only a DerechoFS client acts on would be taken and ignored here.
    let client_only = ["prefer", "connect_timeout_ms", "ac", "noac"];
    if let Some(name) = args
        .options
        .split(',')
        .map(|o| o.split_once('=').map_or(o, |(name, _)| name))
        .find(|name| client_only.contains(name))
    {
        anyhow::bail!("mount option `{name}` is a DerechoFS client's; the passthrough has none");
    }
    let fs = Passthrough::new(&args.source)?;
    let fsname = args.source.display().to_string();
    derechofs_mount::serve(
        fs,
        &args.mountpoint,
        &options,
        &fsname,
        "passthrough",
        |_| {
            errln!(
                "derechofs: {} passed through at {}",
                args.source.display(),
                args.mountpoint.display()
            );
        },
    )
    .with_context(|| format!("passthrough of {}", args.source.display()))
}
