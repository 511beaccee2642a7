//! Measures what history costs reads: the latency of reading the current state of a 1 MiB file
//! that has 100,000 versions (4 KiB overwrites at random places) against the same read of a file
//! written once, and the same file read at a past time (`file@T`), over in-process shards on
//! real logs in memory. Prints a table; not a test.
//!
//! `cargo run --release -p derechofs-fs --example versions [-- VERSIONS [ROUNDS]]`

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use derechofs_fs::{Clock, Creds, FileSystem, FsConfig, LocalShards, ROOT_INO};

const FILE: usize = 1 << 20;
const WRITE: usize = 4096;

fn median_us(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn time<T>(rounds: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut xs = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        std::hint::black_box(f());
        xs.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median_us(xs)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let versions: usize = args
        .next()
        .map_or(100_000, |a| a.parse().expect("VERSIONS is a number"));
    let rounds: usize = args
        .next()
        .map_or(300, |a| a.parse().expect("ROUNDS is a number"));
    let start = 1_800_000_000_000_000u64;
    let shards =
        LocalShards::new(3, 1 << 20, Clock::Manual(AtomicU64::new(start))).expect("shards");
    let config = FsConfig {
        client_base: 1,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    let fs = FileSystem::new(shards, config).expect("file system");
    let me = Creds::default();
    let fresh = fs.create(ROOT_INO, b"fresh", 0o644, me).expect("create");
    let old = fs.create(ROOT_INO, b"old", 0o644, me).expect("create");
    let data: Vec<u8> = (0..FILE).map(|i| (i % 251) as u8).collect();
    fs.write(fresh.ino, 0, &data).expect("write");
    fs.write(old.ino, 0, &data).expect("write");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let t_write = Instant::now();
    let mut middle = 0;
    for v in 0..versions {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % (FILE / WRITE) as u64) * WRITE as u64;
        let now = start + 10 + v as u64 * 10;
        fs.shards().set_now_us(now);
        fs.write(old.ino, off, &[v as u8; WRITE])
            .expect("overwrite");
        if v == versions / 2 {
            middle = now;
        }
    }
    let write_s = t_write.elapsed().as_secs_f64();
    fs.shards()
        .set_now_us(start + 10 + versions as u64 * 10 + 1_000);
    let past = fs
        .lookup(ROOT_INO, format!("old@{middle}us").as_bytes())
        .expect("old@T");
    let len = FILE as u32;
    // The first reads assemble each chunk from its base and extents; later ones hit the cache.
    let mut colds = Vec::new();
    for i in 0..20 {
        let f = fs
            .create(ROOT_INO, format!("cold{i}").as_bytes(), 0o644, me)
            .expect("create");
        fs.write(f.ino, 0, &data).expect("write");
        colds.push(time(1, || fs.read(f.ino, 0, len).expect("read")));
    }
    let cold_fresh = median_us(colds);
    let cold_old = time(1, || fs.read(old.ino, 0, len).expect("read"));
    let cold_t = time(1, || fs.read(past.ino, 0, len).expect("read"));
    // The three reads take turns, so that each round's state of the caches and the allocator
    // weighs on all three alike: measured one after another in blocks of their own, the same
    // binary gave the read at T anywhere from 0.64 to 1.92 times the live one.
    let (mut fresh_us, mut old_us, mut t_us) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        fresh_us.push(time(1, || fs.read(fresh.ino, 0, len).expect("read")));
        old_us.push(time(1, || fs.read(old.ino, 0, len).expect("read")));
        t_us.push(time(1, || fs.read(past.ino, 0, len).expect("read")));
    }
    let live_fresh = median_us(fresh_us);
    let live_old = median_us(old_us);
    let at_t = median_us(t_us);
    let small_fresh = time(rounds * 10, || {
        fs.read(fresh.ino, 512 << 10, 4096).expect("read")
    });
    let small_old = time(rounds * 10, || {
        fs.read(old.ino, 512 << 10, 4096).expect("read")
    });
    let stat_live = time(rounds * 10, || fs.getattr(old.ino).expect("stat"));
    let stat_t = time(rounds * 10, || fs.getattr(past.ino).expect("stat"));
    println!("{versions} overwrites of {WRITE} B in a {FILE}-byte file: {write_s:.2} s ({:.1} µs each, data then size)", write_s * 1e6 / versions as f64);
    println!("| read | median µs | ratio |");
    println!("|---|---|---|");
    println!("| 1 MiB, file written once | {live_fresh:.1} | 1.00 |");
    println!(
        "| 1 MiB, file with {versions} versions, current state | {live_old:.1} | {:.2} |",
        live_old / live_fresh
    );
    println!(
        "| 1 MiB, same file at a past time (`old@T`) | {at_t:.1} | {:.2} |",
        at_t / live_fresh
    );
    println!(
        "| first 1 MiB read, file written once (assembles; median of 20 files) | {cold_fresh:.1} | {:.2} |",
        cold_fresh / live_fresh
    );
    println!(
        "| first 1 MiB read, file with {versions} versions (assembles) | {cold_old:.1} | {:.2} |",
        cold_old / live_fresh
    );
    println!(
        "| first 1 MiB read at T (assembles) | {cold_t:.1} | {:.2} |",
        cold_t / live_fresh
    );
    println!("| 4 KiB, file written once | {small_fresh:.1} | 1.00 |");
    println!(
        "| 4 KiB, file with {versions} versions | {small_old:.1} | {:.2} |",
        small_old / small_fresh
    );
    println!("| stat, live | {stat_live:.2} | 1.00 |");
    println!("| stat at T | {stat_t:.2} | {:.2} |", stat_t / stat_live);
}
