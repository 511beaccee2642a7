//! Time travel through a real FUSE mount of DerechoFS over in-process shards in memory: a random
//! history of changes made through the mount, then every recorded time read back through `@T`
//! paths and compared with the model (`support/time_travel.rs`), twice, since a read at a time
//! never changes once answered. Needs root and `/dev/fuse`, as CI has. The seed is printed;
//! `DERECHOFS_SEED=N` replays one.

mod support {
    pub mod memory_mount;
    pub mod time_travel;
}

use support::memory_mount::MemoryMount;
use support::time_travel;

const STEPS: usize = 60;

fn seed() -> u64 {
    let seed = std::env::var("DERECHOFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(time_travel::now_us);
    eprintln!("seed {seed} (replay with DERECHOFS_SEED={seed})");
    seed
}

#[test]
fn every_past_time_reads_back_exactly_the_tree_of_that_time_and_never_changes() {
    let seed = seed();
    let m = MemoryMount::start();
    let history = time_travel::record(&m.path, "tree", STEPS, seed);
    time_travel::check(&m.path, "tree", &history, seed);
    // Later changes do not move the past.
    std::fs::write(m.path.join("tree/late"), b"after the history").expect("a late write");
    time_travel::check(&m.path, "tree", &history, seed);
}
