//! Seeds that once found a bug, each kept with the story of the bug it found.

use derechofs_tests::{run, Options};

/// The first batch of seeds stopped with a panic, not a violation: with 5 nodes and two shards
/// of 2 replicas, one node replicates no shard at all, and the simulator's time reads picked a
/// random shard among the chosen node's shards, dividing by zero shards. The engine itself
/// handled the member without shards (it heartbeats and is never suspected); the simulator now
/// skips time reads at such a node. Seed 13 still lays out a node with no shard.
#[test]
fn sim_seed_13_a_member_that_replicates_no_shard_takes_part_without_a_time_read() {
    let options = Options::from_seed(13);
    let slots = usize::from(options.spec.replicas) * (1 + usize::from(options.spec.data_shards));
    assert!(
        options.nodes > slots,
        "seed 13 no longer leaves a node without a shard"
    );
    run(&options).unwrap_or_else(|failure| panic!("{failure}"));
}
