//! Latency of single file system calls through `RemoteShards` against a running cluster, one
//! call at a time from one thread, as the mount makes them:
//!
//! ```text
//! cargo run --release -p derechofs-client --example remote_latency -- CONTACTS [COUNT] [SECRET_FILE]
//! ```
//!
//! Prints the median and the fastest of COUNT (default 100) calls of each kind: a 4 KiB write
//! sent at once (the bytes, then the size update: `write_buffered` + `flush`), a 4 KiB read of
//! what was just written (read-your-writes), `getattr`, and `chmod`; then the rate of a 64 MiB
//! sequential write in 1 MiB buffered writes ended by `fsync`, and of reading it back in 128 KiB
//! reads (the kernel's usual read size).

use std::time::Instant;

use derechofs_client::{RemoteConfig, RemoteShards};
use derechofs_core::transport::Secret;
use derechofs_fs::{Creds, FileSystem, FsConfig, SetAttr, ROOT_INO};

/// The secret nodes on loopback use when none is configured (`docs/CONFIG.md`).
const DEVELOPMENT_SECRET: &[u8] = b"derechofs development secret: set secret_file";
/// Bytes of the small writes and reads.
const SMALL_BYTES: usize = 4096;
/// Bytes of the sequential file.
const BIG_BYTES: u64 = 64 << 20;
/// Bytes per sequential write.
const WRITE_PIECE: u64 = 1 << 20;
/// Bytes per sequential read.
const READ_PIECE: u64 = 128 << 10;

/// Median and fastest of `samples` (microseconds), as a string.
fn summary(mut samples: Vec<u128>) -> String {
    samples.sort_unstable();
    match (samples.get(samples.len() / 2), samples.first()) {
        (Some(median), Some(fastest)) => format!("median {median} us, fastest {fastest} us"),
        _ => "no samples".to_string(),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(contacts) = args.get(1) else {
        return Err("usage: remote_latency CONTACTS [COUNT] [SECRET_FILE]".into());
    };
    let count: usize = args.get(2).map_or(Ok(100), |c| c.parse())?;
    if count == 0 {
        return Err("COUNT must be at least 1".into());
    }
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
    let name = format!("remote-latency-{}", nanos.as_micros());
    let small = fs.create(ROOT_INO, name.as_bytes(), 0o644, c)?;

    let data = vec![7u8; SMALL_BYTES];
    let (mut writes, mut reads) = (Vec::new(), Vec::new());
    for i in 0..count {
        let offset = (i * SMALL_BYTES) as u64;
        let start = Instant::now();
        fs.write_buffered(small.ino, offset, &data)?;
        fs.flush(small.ino)?;
        writes.push(start.elapsed().as_micros());
        let start = Instant::now();
        fs.read(small.ino, offset, SMALL_BYTES as u32)?;
        reads.push(start.elapsed().as_micros());
    }
    println!("4 KiB write, sent: {}", summary(writes));
    println!("4 KiB read after it: {}", summary(reads));

    let mut stats = Vec::new();
    for _ in 0..count {
        let start = Instant::now();
        fs.getattr(small.ino)?;
        stats.push(start.elapsed().as_micros());
    }
    println!("getattr: {}", summary(stats));

    let mut chmods = Vec::new();
    for i in 0..count {
        let set = SetAttr {
            perm: Some(if i % 2 == 0 { 0o600 } else { 0o644 }),
            ..SetAttr::default()
        };
        let start = Instant::now();
        fs.setattr(small.ino, set)?;
        chmods.push(start.elapsed().as_micros());
    }
    println!("chmod: {}", summary(chmods));

    let big = fs.create(ROOT_INO, format!("{name}-big").as_bytes(), 0o644, c)?;
    let piece = vec![9u8; WRITE_PIECE as usize];
    let start = Instant::now();
    for offset in (0..BIG_BYTES).step_by(WRITE_PIECE as usize) {
        fs.write_buffered(big.ino, offset, &piece)?;
    }
    fs.fsync_file(big.ino)?;
    let mib = (BIG_BYTES >> 20) as f64;
    println!(
        "sequential write of {mib} MiB + fsync: {:.1} MiB/s",
        mib / start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    for offset in (0..BIG_BYTES).step_by(READ_PIECE as usize) {
        fs.read(big.ino, offset, READ_PIECE as u32)?;
    }
    println!(
        "sequential read of {mib} MiB in 128 KiB reads: {:.1} MiB/s",
        mib / start.elapsed().as_secs_f64()
    );
    Ok(())
}
