//! Drives a running cluster into versions whose file system delta would exceed the version
//! budget (`VERSION_DELTA_BYTES_MAX`), and checks that every write is applied, once:
//!
//! ```text
//! cargo run -p derechofs-client --example version_budget -- CONTACTS [CLIENTS] [ROUNDS]
//! ```
//!
//! CLIENTS threads (default 64), each its own client, fill one chunk each of data shard 0 with a
//! whole-chunk write, then all at once write one byte into it: each such write compacts the chunk
//! into a new base of a whole chunk, so a version that batches many of them carries a chunk of
//! delta per request. Requests go to node 1 (`prefer`). Against nodes with `window = 1` (so that
//! the sender batches what arrives while its one message is out) and `layout.chunk_size =
//! 2097152`, 64 clients make versions of up to 128 MiB of changes: the replica answers `Retry` to
//! the requests that do not fit, and this program resends them with the same bytes, as the file
//! system client does. Prints how many `Retry` answers it resent. Uses the development secret.

use std::sync::{Arc, Barrier};

use bytes::Bytes;
use derechofs_client::{RemoteConfig, RemoteShards};
use derechofs_core::transport::Secret;
use derechofs_fs::op::{DataOp, Op, Reply, Request};
use derechofs_fs::{ShardRef, Shards};

/// The secret nodes on loopback use when none is configured (`docs/CONFIG.md`).
const DEVELOPMENT_SECRET: &[u8] = b"derechofs development secret: set secret_file";
/// Inode numbers the program writes: far above what a file system allocates in a test cluster.
const INO_BASE: u64 = 1 << 30;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(contacts) = args.get(1) else {
        return Err("usage: version_budget CONTACTS [CLIENTS] [ROUNDS]".into());
    };
    let clients: u64 = args.get(2).map_or(Ok(64), |c| c.parse())?;
    let rounds: u64 = args.get(3).map_or(Ok(3), |c| c.parse())?;
    if clients == 0 || clients > 1024 || rounds == 0 || rounds > 250 {
        return Err("CLIENTS must be in 1..=1024 and ROUNDS in 1..=250".into());
    }
    let secret = Secret::new(DEVELOPMENT_SECRET.to_vec()).ok_or("empty secret")?;
    let mut config = RemoteConfig::new(contacts.split(',').map(str::to_string).collect(), secret);
    config.prefer = Some(1);
    let shards = Arc::new(RemoteShards::connect(config)?);
    let chunk = shards.layout().chunk_size as usize;
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let barrier = Arc::new(Barrier::new(clients as usize));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (shards, barrier) = (shards.clone(), barrier.clone());
            std::thread::spawn(move || -> Result<u64, String> {
                let client = base.wrapping_add(i);
                let mut number = 0;
                let mut retries = 0;
                let mut send = |op: DataOp| -> Result<(), String> {
                    number += 1;
                    let op = Op::Data(op);
                    let bytes = Request { client, number, op }.encode();
                    loop {
                        let reply = shards
                            .submit(ShardRef::Data(0), bytes.clone())
                            .map_err(|e| e.to_string())?;
                        match Reply::decode(&reply).map_err(|e| e.to_string())? {
                            Reply::Retry => retries += 1,
                            Reply::Data(Ok(_)) => return Ok(()),
                            other => return Err(format!("client {i}: {other:?}")),
                        }
                    }
                };
                // A client that fails stops the program: the others would wait at the barrier.
                let fail = |e: String| {
                    eprintln!("version_budget: {e}");
                    std::process::exit(1)
                };
                for round in 0..rounds {
                    let ino = INO_BASE + i;
                    let data = Bytes::from(vec![1u8; chunk]);
                    send(DataOp::Write {
                        ino,
                        index: 0,
                        offset: 0,
                        data,
                    })
                    .unwrap_or_else(fail);
                    barrier.wait();
                    let data = Bytes::from(vec![round as u8 + 2]);
                    let offset = (i as usize % chunk) as u32;
                    send(DataOp::Write {
                        ino,
                        index: 0,
                        offset,
                        data,
                    })
                    .unwrap_or_else(fail);
                    barrier.wait();
                }
                Ok(retries)
            })
        })
        .collect();
    let mut retries = 0;
    for t in threads {
        retries += t.join().map_err(|_| "a client thread panicked")??;
    }
    println!(
        "{clients} clients x {rounds} rounds: every write applied; {retries} Retry answers resent"
    );
    Ok(())
}
