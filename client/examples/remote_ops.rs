//! Rates of file system operations through `RemoteShards` against a running cluster, one
//! operation at a time from one thread (so each is a full round trip through the shard's
//! ordered multicast):
//!
//! ```text
//! cargo run --release -p derechofs-client --example remote_ops -- CONTACTS [COUNT] [SECRET_FILE]
//! ```
//!
//! Creates COUNT (default 1000) files in a new directory, stats them, writes 4 KiB to each, reads
//! it back, removes them, then writes and reads one 64 MiB file in 1 MiB pieces, and prints one
//! line per phase.

use std::time::Instant;

use derechofs_client::{RemoteConfig, RemoteShards};
use derechofs_core::transport::Secret;
use derechofs_fs::{Creds, FileSystem, FsConfig, ROOT_INO};

/// The secret nodes on loopback use when none is configured (`docs/CONFIG.md`).
const DEVELOPMENT_SECRET: &[u8] = b"derechofs development secret: set secret_file";
/// Bytes of the large file.
const BIG_BYTES: usize = 64 << 20;
/// Bytes per write and read of the large file.
const PIECE_BYTES: usize = 1 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(contacts) = args.get(1) else {
        return Err("usage: remote_ops CONTACTS [COUNT] [SECRET_FILE]".into());
    };
    let count: usize = args.get(2).map_or(Ok(1000), |c| c.parse())?;
    let secret = match args.get(3) {
        Some(path) => std::fs::read(path)?.trim_ascii_end().to_vec(),
        None => DEVELOPMENT_SECRET.to_vec(),
    };
    let secret = Secret::new(secret).ok_or("the secret file is empty")?;
    let contacts = contacts.split(',').map(str::to_string).collect();
    let shards = RemoteShards::connect(RemoteConfig::new(contacts, secret))?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    let fs = FileSystem::new(
        shards,
        FsConfig {
            client_base: nanos.as_nanos() as u64,
            skew_max_us: 1_000_000,
            root_owner: Creds::default(),
            dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
        },
    )?;
    let c = Creds::default();
    let dir = fs.mkdir(
        ROOT_INO,
        format!("remote-ops-{}", nanos.as_micros()).as_bytes(),
        0o755,
        c,
    )?;
    let names: Vec<String> = (0..count).map(|i| format!("f{i}")).collect();
    let report = |phase: &str, n: usize, bytes: usize, start: Instant| {
        let s = start.elapsed().as_secs_f64();
        let mib = bytes as f64 / f64::from(1 << 20) / s;
        println!(
            "{phase:>8}: {n} in {s:.3} s, {:.0}/s, {:.0} us each{}",
            n as f64 / s,
            s * 1e6 / n as f64,
            if bytes > 0 {
                format!(", {mib:.1} MiB/s")
            } else {
                String::new()
            }
        );
    };

    let start = Instant::now();
    let mut inos = Vec::with_capacity(count);
    for n in &names {
        inos.push(fs.create(dir.ino, n.as_bytes(), 0o644, c)?.ino);
    }
    report("create", count, 0, start);

    let start = Instant::now();
    for n in &names {
        fs.lookup(dir.ino, n.as_bytes())?;
    }
    report("lookup", count, 0, start);

    let block = vec![0x5a_u8; 4096];
    let start = Instant::now();
    for &ino in &inos {
        fs.write(ino, 0, &block)?;
    }
    report("write 4k", count, count * block.len(), start);

    let start = Instant::now();
    for &ino in &inos {
        fs.read(ino, 0, 4096)?;
    }
    report("read 4k", count, count * block.len(), start);

    let start = Instant::now();
    for n in &names {
        fs.unlink(dir.ino, n.as_bytes())?;
    }
    report("unlink", count, 0, start);

    let big = fs.create(dir.ino, b"big", 0o644, c)?;
    let piece = vec![0xa5_u8; PIECE_BYTES];
    let pieces = BIG_BYTES / PIECE_BYTES;
    let start = Instant::now();
    for i in 0..pieces {
        fs.write(big.ino, (i * PIECE_BYTES) as u64, &piece)?;
    }
    fs.fsync()?;
    report("write 1m", pieces, BIG_BYTES, start);

    let start = Instant::now();
    for i in 0..pieces {
        fs.read(big.ino, (i * PIECE_BYTES) as u64, PIECE_BYTES as u32)?;
    }
    report("read 1m", pieces, BIG_BYTES, start);
    fs.unlink(dir.ino, b"big")?;
    Ok(())
}
