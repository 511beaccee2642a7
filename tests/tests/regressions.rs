//! Seeds that once found a bug, each kept with the story of the bug it found.

use derechofs_tests::{run, Fault, Options};

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

/// The first run of crash seeds stopped at seed 2 (7 nodes, node 2 crashed at 100 ms): node 3
/// refused the leader's Commit with "trim below what was delivered". It had already applied the
/// decision — the leader's Accept and a repeated Commit reached it — and delivering the trim
/// moves the delivered counter past the sequence numbers the trim leaves out (the crashed
/// sender's slots). The repeated decision was checked against that counter as if it were new.
/// A decision is now checked against the received and delivered counters only before its trims
/// are delivered; after that only its shape is checked.
#[test]
fn sim_seed_2_a_commit_repeated_after_the_trim_was_delivered_is_taken() {
    let mut options = Options::with_faults(2);
    options.faults = vec![Fault::Crash {
        node: 2,
        at_us: 100_000,
    }];
    options.heal_us = 100_000;
    run(&options).unwrap_or_else(|failure| panic!("{failure}"));
}

/// The first fault run with spare members refilling shards (seed 16: 6 nodes, shards of 3, the
/// leader and then node 1 crash) stopped at node 3 with "row of sender rank 1 goes back": a
/// spare added to shard 2 in view 2 was still catching up its log when the second crash changed
/// the view again. An old member's successor multicast started every member's row at the old
/// persistence frontier, but the spare had persisted nothing of the shard, and its first row of
/// view 3 said so — a persisted version going back, refused. Rows of the other members now
/// start empty in every view; the persistence frontier carries the old one over instead.
#[test]
fn sim_seed_16_a_member_still_catching_up_when_the_view_changes_again_is_not_refused() {
    let options = Options::with_faults(16);
    assert!(
        options.spec.replicas < options.nodes as u16,
        "seed 16 no longer leaves spares to refill a shard"
    );
    let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(report.shards_caught_up > 0, "no state transfer: {report:?}");
}

/// A wide run of fault seeds stopped at seed 131 (7 nodes, shards of 4, the links 0–1 and 1–2
/// break) with an assertion in the engine: "the trim was checked: trim beyond what was
/// received". Node 1 was removed, a spare refilled its shard, and node 1 asked to join again
/// while the spare was still catching up the shard. The spare reported no counters for that
/// shard to the change (it was catching up), so the trim was computed without it and could
/// exceed what it received; then its transfer finished while the change ran, it was no longer
/// catching up, and it delivered the trim. A transfer now finishes only in a view that is not
/// wedged: a member that reported a shard as catching up stays so until the next view.
#[test]
fn sim_seed_131_a_transfer_that_ends_during_a_view_change_does_not_deliver_the_trim() {
    run(&Options::with_faults(131)).unwrap_or_else(|failure| panic!("{failure}"));
}

/// The first wide run of total restart seeds stalled at seed 270 (5 nodes; node 3 back first,
/// node 2 about 100 ms before the others). Restarting nodes suspected the members not back yet
/// and, as in any view, never trusted them again: node 3 led a round with the three members it
/// had heard, accepted its own decision, then kept ignoring node 1, which came back, was heard
/// by the others and led a higher round that waited forever for node 3's answer. In a total
/// restart a suspicion now only says whom a leader waits for: a member heard from again is
/// trusted again, peers' suspicions are not adopted, and every member answers every leader.
#[test]
fn sim_restart_seed_270_a_member_back_after_being_suspected_is_heard_again() {
    let options = Options::with_total_restart(270);
    run(&options).unwrap_or_else(|failure| panic!("{failure}"));
}

/// Runs slow members seed `seed` and checks that the group made progress again and that no
/// node ended suspecting itself.
fn stall_seed_makes_progress(seed: u64) {
    let options = Options::with_stalls(seed);
    let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(report.probes_delivered > 0, "no progress after the stalls");
    for (node, suspected) in report.suspected.iter().enumerate() {
        assert!(
            !suspected.contains(&(node as u32 + 1)),
            "node {} suspects itself",
            node + 1
        );
    }
}

/// The first slow members seeds (every member stalls once for one to three suspicion timeouts,
/// staggered) all stalled for good; seed 1 is 3 nodes, as in the file system test that showed
/// it under load (all three nodes suspected each other within a second of starting, one
/// suspected itself, and no view formed). Each node suspected the others while they did not
/// run, then merged their reports, which named it: every node suspected every member, itself
/// included, so no leader existed and no majority was trusted anywhere, for ever. Now a node
/// never suspects itself, a node's own stall is not counted as its peers' silence, and a node
/// that trusts no majority trusts again a member it hears from.
#[test]
fn sim_stall_seed_1_members_that_suspected_each_other_falsely_form_a_view() {
    stall_seed_makes_progress(1);
}

/// With those rules, seed 7 (7 nodes) still stalled: members dropped the leader's proposal
/// while they suspected it and trusted it again later, and the leader, which sent its
/// proposal once, waited for their answers for ever. A leader whose change is stuck (see seed
/// 16) now sends its round again every heartbeat to the members that did not answer (the
/// proposal in phase 1, the decision in phase 2), as it already did in a total restart.
#[test]
fn sim_stall_seed_7_a_proposal_dropped_by_a_member_that_trusts_the_leader_again_is_resent() {
    stall_seed_makes_progress(7);
}

/// Seed 16 (6 nodes) then stalled with every node trusting a majority, but not one a leader
/// could gather: the lowest member each trusted was suspected by some of those it needed
/// (and a leader's trusted members may hold no replica of some shard). Suspicions only grew
/// there. A node wedged for `STUCK_CHANGE_TIMEOUTS` suspicion timeouts without a new view now
/// keeps only its own suspicions and trusts again those it hears from, so the live members
/// converge on one leader.
#[test]
fn sim_stall_seed_16_members_each_trusting_a_different_majority_end_the_change() {
    stall_seed_makes_progress(16);
}

/// With the rules above, seed 263 (6 nodes) stalled in phase 2: the leader had dropped a
/// member's echo of its decision while it suspected that member, trusted it again, and sent
/// the decision again, but the member had echoed that round once already and did not echo
/// again; one acceptance short of a majority, the leader waited for ever. A member now echoes
/// a decision sent again.
#[test]
fn sim_stall_seed_263_a_decision_sent_again_is_echoed_again() {
    stall_seed_makes_progress(263);
}

/// A fault schedule drawn from seed 551 (5 nodes, shards of 3), with node 3 crashing 1.7 ms
/// after it installed view 2, where it is new to shard 3 and still catching it up (nothing of it
/// on its disk yet), stopped with "node 0: persistence frontier Some(0x100000001) of shard 3
/// beyond what every member persisted (None)". The engine was right: node 0's frontier was the
/// one carried from view 1, persisted by every member that held the shard's log then (nodes 0
/// and 1). The simulator was not: a restart cleared the node's "new to the shard" marks, so when
/// node 0 installed view 3 (which removes node 3 and adds it back as the joiner it now is), the
/// checker counted node 3, listed in shard 3 of view 2 and not yet welcomed, as a member whose
/// persisted log bounds the frontier. A restarted node now stays new to the shards it was
/// catching up. (Drawn as is, seed 551 showed it only when a leader resends its round every
/// heartbeat: the faster change let node 3 install view 2 before its crash.)
#[test]
fn sim_fault_seed_551_a_node_restarted_while_catching_up_a_shard_does_not_bound_its_frontier() {
    let mut options = Options::with_faults(551);
    let mut moved = false;
    for fault in &mut options.faults {
        if let Fault::Crash { node: 3, at_us } = fault {
            *at_us = 246_000;
            moved = true;
        }
    }
    assert!(moved, "seed 551 no longer crashes node 3");
    assert!(
        options
            .faults
            .iter()
            .any(|f| matches!(f, Fault::Restart { node: 3, at_us } if *at_us > 246_000)),
        "seed 551 no longer restarts node 3 after its crash"
    );
    let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(report.restarts > 0, "no node restarted");
}

/// A wide run of fault seeds (2,000) stopped at seed 1732 (6 nodes, shards of 3, the links 4–1
/// and 1–2 break) with "ragged trim: node 2 leaves view 3 having delivered 14 versions of shard
/// 0, 15 were delivered somewhere". Node 2 (index; id 3, the slow one) installed view 4 at
/// 237.5 ms, after the others had installed view 5, which removed it: view 4 had ended without
/// it, and its two other members of shard 0 had delivered a version of view 4 (0x400000002) in
/// that view's trim. Node 2 had delivered every version of views 1–3, as it must; the checker
/// counted the view-4 version too. It now counts, for a member leaving view `v`, the versions of
/// views up to `v` delivered anywhere. Since a removal waits out the read lease the removed
/// member may hold (docs/ARCHITECTURE.md), from the last heartbeat taken from it or the start of
/// the view, this schedule no longer installs a view late, nor does any of the first 3,000 fault
/// seeds: the checker's rule is tested on its own
/// (`a_member_leaving_a_view_late_owes_only_that_views_versions` in `tests/src/checker.rs`), and
/// the seed stays as a run of its schedule.
#[test]
fn sim_fault_seed_1732_links_breaking_around_a_slow_member_hold_every_invariant() {
    let report = run(&Options::with_faults(1732)).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(
        report.rounds_led > 0,
        "seed 1732 no longer changes the view: {report:?}"
    );
}

/// A wide run of slow-members seeds (2,500) stopped at seed 966 (5 nodes, clock skews up to
/// ±92 ms, every member stalled past the suspicion timeout) with "time read: node 1 answers 2
/// versions of shard 2 at 1700000000.419083+0, but 3 are delivered somewhere". Node id 1, new to
/// shard 2 in view 2 with its clock 92 ms behind, stamped a version of view 3 below the floors the
/// shard's old members had published in view 1, from which node id 2 (removed, still in view 1)
/// had built its frontier. Each member now reports the floor it published per shard when it
/// acknowledges a view change, the decision carries the highest per shard, and every version of
/// the next view is stamped above it (members new to the shard learn it with the state transfer).
#[test]
fn sim_stall_seed_966_a_shards_new_member_with_a_clock_behind_stamps_above_every_frontier() {
    stall_seed_makes_progress(966);
}

/// Slow-members seed 2238 (5 nodes, every member stalled past the suspicion timeout) stopped
/// with "node 3: barrier Barrier { view_id: 1, seqs: 12 } of shard 1 reached with
/// Some(0x10000000b) delivered, below version 0x10000000d a member had delivered when it was
/// taken". Node id 4 stalled from 232 to 487 ms and was being removed; the trim of view 1
/// delivered node id 5's fifth message at node id 1, which node id 4 never received; back in view
/// 1, not yet told, node id 4 answered a barrier from its own counters. A member now takes a
/// barrier only while it holds its read lease (every other member echoed a heartbeat it sent
/// less than an eighth of the suspicion timeout ago), and a member delivers a trim that removes
/// a peer only once that lease, resting on its echo, has run out; the simulator checks every
/// barrier, the removed members' ones included.
#[test]
fn sim_stall_seed_2238_a_member_removed_while_stalled_answers_no_barrier_read_from_its_old_view() {
    let report = run(&Options::with_stalls(2238)).unwrap_or_else(|failure| panic!("{failure}"));
    assert!(report.probes_delivered > 0, "no progress after the stalls");
    assert!(
        report.barriers_refused > 0 && report.barriers_taken > 0,
        "seed 2238 no longer asks a member without its lease for a barrier: {report:?}"
    );
}
