//! The simulator run over seeds. A failure prints its seed; `DERECHOFS_SIM_SEED=<seed>` reruns
//! exactly that run (with `DERECHOFS_SIM_FAULTS=1` for a fault seed, `DERECHOFS_SIM_RESTART=1`
//! for a total restart seed, `DERECHOFS_SIM_STALL=1` for a slow members seed,
//! `DERECHOFS_SIM_HOST_STALL=1` for a host-wide stall seed, `DERECHOFS_SIM_CLOCK=1` for a clock
//! step seed), and `DERECHOFS_SIM_SEEDS=<count>`, `DERECHOFS_SIM_FAULT_SEEDS=<count>`,
//! `DERECHOFS_SIM_RESTART_SEEDS=<count>`, `DERECHOFS_SIM_STALL_SEEDS=<count>`,
//! `DERECHOFS_SIM_HOST_STALL_SEEDS=<count>` and `DERECHOFS_SIM_CLOCK_SEEDS=<count>` widen the
//! batches.

use std::time::Instant;

use derechofs_tests::{run, Fault, Options};

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {value:?}")),
    )
}

#[test]
fn seeds_hold_every_static_view_invariant_and_deliver_every_request() {
    let seeds = env_u64("DERECHOFS_SIM_SEEDS").unwrap_or(200);
    let started = Instant::now();
    let (mut steps, mut versions, mut reads) = (0, 0, 0);
    for seed in 0..seeds {
        match run(&Options::from_seed(seed)) {
            Ok(report) => {
                steps += report.steps;
                versions += report.versions;
                reads += report.time_reads;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    eprintln!(
        "{seeds} seeds: {steps} steps, {versions} versions, {reads} time reads in {:?}",
        started.elapsed()
    );
}

#[test]
fn seeds_with_crashes_breaks_partitions_and_clogs_hold_every_invariant_across_views() {
    let seeds = env_u64("DERECHOFS_SIM_FAULT_SEEDS").unwrap_or(100);
    let started = Instant::now();
    let (mut steps, mut views, mut recovered, mut refused, mut rounds) = (0, 0, 0, 0, 0);
    let (mut joins, mut transferred, mut caught_up, mut restarts) = (0, 0, 0, 0);
    for seed in 0..seeds {
        let options = Options::with_faults(seed);
        match run(&options) {
            Ok(report) => {
                steps += report.steps;
                views += u64::from(report.view_ids.iter().copied().max().unwrap_or(1) - 1);
                recovered += u64::from(options.must_recover());
                refused += report.refused_no_majority;
                rounds += report.rounds_led;
                joins += report.joins;
                transferred += report.records_transferred;
                caught_up += report.shards_caught_up;
                restarts += report.restarts;
            }
            Err(failure) => panic!("{failure}\n  (with faults: DERECHOFS_SIM_FAULTS=1)"),
        }
    }
    eprintln!(
        "{seeds} fault seeds: {steps} steps, {views} view changes in {rounds} rounds, {recovered} \
         runs recovered after healing, {refused} writes refused without a majority, {joins} \
         joins, {restarts} restarts, {caught_up} shards caught up by transferring \
         {transferred} records, in {:?}",
        started.elapsed()
    );
}

#[test]
fn seeds_with_wall_clocks_stepped_ahead_and_back_hold_every_invariant_and_make_progress() {
    let seeds = env_u64("DERECHOFS_SIM_CLOCK_SEEDS").unwrap_or(20);
    slow_member_seeds(
        seeds,
        Options::with_clock_steps,
        "clock step",
        "DERECHOFS_SIM_CLOCK=1",
    );
}

#[test]
fn one_seed_from_the_environment() {
    let Some(seed) = env_u64("DERECHOFS_SIM_SEED") else {
        return;
    };
    let options = if env_u64("DERECHOFS_SIM_FAULTS").unwrap_or(0) == 1 {
        Options::with_faults(seed)
    } else if env_u64("DERECHOFS_SIM_RESTART").unwrap_or(0) == 1 {
        Options::with_total_restart(seed)
    } else if env_u64("DERECHOFS_SIM_STALL").unwrap_or(0) == 1 {
        Options::with_stalls(seed)
    } else if env_u64("DERECHOFS_SIM_HOST_STALL").unwrap_or(0) == 1 {
        Options::with_host_stall(seed)
    } else if env_u64("DERECHOFS_SIM_CLOCK").unwrap_or(0) == 1 {
        Options::with_clock_steps(seed)
    } else {
        Options::from_seed(seed)
    };
    eprintln!("{options:#?}");
    match run(&options) {
        Ok(report) => eprintln!("{report:#?}"),
        Err(failure) => panic!("{failure}"),
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let first = run(&Options::from_seed(7)).unwrap();
    let second = run(&Options::from_seed(7)).unwrap();
    assert_eq!(first, second);
    assert_ne!(first.trace, run(&Options::from_seed(8)).unwrap().trace);
}

#[test]
fn a_crashed_member_is_removed_and_the_survivors_carry_on_in_the_next_view() {
    for seed in 0..10 {
        let mut options = Options::with_faults(seed);
        let crashed = seed as usize % options.nodes;
        options.faults = vec![Fault::Crash {
            node: crashed,
            at_us: 100_000,
        }];
        options.heal_us = 100_000;
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(report.probes_delivered > 0, "seed {seed}: {report:?}");
        for node in (0..options.nodes).filter(|&n| n != crashed) {
            assert!(
                !report.wedged[node],
                "seed {seed}: node {node} stayed wedged"
            );
            assert!(report.view_ids[node] >= 2, "seed {seed}: node {node}");
        }
    }
}

#[test]
fn a_single_busy_sender_is_carried_by_the_nulls_of_idle_members() {
    for seed in 0..10 {
        let mut options = Options::from_seed(seed);
        options.submit_to = Some(0);
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(report.nulls_sent > 0, "seed {seed}: no nulls");
        assert!(report.versions > 0);
    }
}

#[test]
fn a_window_of_one_message_still_delivers_every_request() {
    for seed in 0..10 {
        let mut options = Options::from_seed(seed);
        options.window = 1;
        options.outstanding_max = 16;
        run(&options).unwrap_or_else(|failure| panic!("{failure}"));
    }
}

#[test]
fn a_member_whose_links_clog_past_the_timeout_is_removed_and_its_late_messages_are_harmless() {
    for seed in 0..6 {
        let mut options = Options::with_faults(seed);
        let suspect_us = options.suspect_after_ms * 1_000;
        let clogged = 1 + seed as usize % (options.nodes - 1);
        options.faults = (0..options.nodes)
            .filter(|&to| to != clogged)
            .map(|to| Fault::Clog {
                from: clogged,
                to,
                start_us: 50_000,
                end_us: 50_000 + 2 * suspect_us,
            })
            .collect();
        options.heal_us = 50_000 + 2 * suspect_us;
        options.time_limit_us = options.heal_us + 40 * suspect_us + 2_000_000;
        assert!(options.must_recover());
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(report.probes_delivered > 0, "seed {seed}");
        for node in (0..options.nodes).filter(|&n| n != clogged) {
            assert!(report.view_ids[node] >= 2, "seed {seed}: {report:?}");
        }
    }
}

#[test]
fn a_partitioned_minority_installs_nothing_and_refuses_writes() {
    let mut checked = 0;
    for seed in 0..20 {
        let mut options = Options::with_faults(seed);
        if options.nodes < 5 {
            continue;
        }
        options.faults = vec![Fault::Partition {
            minority: vec![0, 1],
            at_us: 50_000,
        }];
        options.heal_us = 50_000 + 4 * options.suspect_after_ms * 1_000;
        options.think_us_max = 1_000;
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        for node in [0, 1] {
            assert_eq!(
                report.view_ids[node], 1,
                "seed {seed}: a minority installed a view"
            );
            assert!(report.wedged[node], "seed {seed}");
        }
        for node in 2..options.nodes {
            assert!(report.view_ids[node] >= 2, "seed {seed}: {report:?}");
        }
        checked += 1;
    }
    assert!(checked > 0);
}

/// Options for a scenario: the fault seed's cluster and timing, with `faults` instead of its
/// own, healed after the last of them.
fn scenario(seed: u64, spares: usize, faults: Vec<Fault>) -> Options {
    let mut options = Options::with_faults(seed);
    let suspect_us = options.suspect_after_ms * 1_000;
    options.spares = spares;
    options.heal_us = faults
        .iter()
        .map(|f| match f {
            Fault::Crash { at_us, .. }
            | Fault::Join { at_us, .. }
            | Fault::Restart { at_us, .. } => *at_us,
            _ => 0,
        })
        .max()
        .unwrap_or(0)
        + suspect_us;
    options.time_limit_us = options.heal_us + 40 * suspect_us + 2_000_000;
    options.faults = faults;
    options
}

#[test]
fn a_join_burst_adds_every_joiner_and_each_catches_up_the_shards_it_is_given() {
    for seed in 0..4 {
        let nodes = Options::with_faults(seed).nodes;
        let faults = (0..5)
            .map(|i| Fault::Join {
                node: nodes + i,
                at_us: 50_000 + 3_000 * i as u64,
            })
            .collect();
        let options = scenario(seed, 5, faults);
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert_eq!(report.joins, 5, "seed {seed}: {report:?}");
        for i in 0..5 {
            let id = (nodes + i + 1) as u32;
            assert!(report.last_members.contains(&id), "seed {seed}: {report:?}");
            assert!(!report.wedged[nodes + i], "seed {seed}");
        }
        assert!(report.probes_delivered > 0, "seed {seed}");
    }
}

#[test]
fn a_crashed_member_restarts_from_its_disk_rejoins_and_resumes_its_logs() {
    for seed in 0..6 {
        let nodes = Options::with_faults(seed).nodes;
        let node = 1 + seed as usize % (nodes - 1);
        let faults = vec![
            Fault::Crash {
                node,
                at_us: 100_000,
            },
            Fault::Restart {
                node,
                at_us: 700_000,
            },
        ];
        let options = scenario(seed, 0, faults);
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert_eq!(report.restarts, 1);
        assert!(
            report.last_members.contains(&(node as u32 + 1)),
            "seed {seed}: {report:?}"
        );
        assert!(!report.wedged[node], "seed {seed}");
        assert!(report.probes_delivered > 0, "seed {seed}");
    }
}

#[test]
fn joiners_that_crash_while_joining_are_removed_and_the_group_goes_on() {
    for seed in 0..4 {
        let nodes = Options::with_faults(seed).nodes;
        let mut faults = Vec::new();
        for i in 0..3 {
            faults.push(Fault::Join {
                node: nodes + i,
                at_us: 50_000,
            });
        }
        // One joiner dies while its logs are being transferred, one before it is even added.
        faults.push(Fault::Crash {
            node: nodes,
            at_us: 52_000,
        });
        faults.push(Fault::Crash {
            node: nodes + 1,
            at_us: 120_000,
        });
        let options = scenario(seed, 3, faults);
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(
            report.last_members.contains(&(nodes as u32 + 3)),
            "seed {seed}: the live joiner is a member: {report:?}"
        );
        for dead in [nodes, nodes + 1] {
            assert!(
                !report.last_members.contains(&(dead as u32 + 1)),
                "seed {seed}: a dead joiner stays: {report:?}"
            );
        }
        assert!(report.probes_delivered > 0, "seed {seed}");
    }
}

#[test]
fn an_inadequate_view_waits_wedged_until_a_join_refills_it() {
    for seed in 0..4 {
        let mut options = Options::with_faults(seed);
        let nodes = options.nodes;
        let faults = vec![
            Fault::Crash {
                node: nodes - 1,
                at_us: 50_000,
            },
            Fault::Join {
                node: nodes,
                at_us: 900_000,
            },
        ];
        options.spec.replicas = nodes as u16;
        options.spec.replicas_min = nodes as u16;
        let spec = options.spec;
        let mut options = scenario(seed, 1, faults);
        options.spec = spec;
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(
            report.last_members.contains(&(nodes as u32 + 1)),
            "seed {seed}: {report:?}"
        );
        assert!(report.probes_delivered > 0, "seed {seed}");
        assert!(report.shards_caught_up > 0, "seed {seed}");
    }
}

#[test]
fn seeds_with_a_total_restart_lose_nothing_durable_and_make_progress_again() {
    let seeds = env_u64("DERECHOFS_SIM_RESTART_SEEDS").unwrap_or(20);
    let started = Instant::now();
    let (mut steps, mut restarts, mut transferred, mut views) = (0, 0, 0, 0);
    for seed in 0..seeds {
        let options = Options::with_total_restart(seed);
        assert!(options.must_recover(), "seed {seed}: a quorum comes back");
        match run(&options) {
            Ok(report) => {
                assert!(report.probes_delivered > 0, "seed {seed}: no progress");
                steps += report.steps;
                restarts += report.restarts;
                transferred += report.records_transferred;
                views += u64::from(report.view_ids.iter().copied().max().unwrap_or(1) - 1);
            }
            Err(failure) => panic!("{failure}\n  (total restart: DERECHOFS_SIM_RESTART=1)"),
        }
    }
    eprintln!(
        "{seeds} total restart seeds: {steps} steps, {restarts} nodes back, {transferred} \
         records transferred, {views} views in {:?}",
        started.elapsed()
    );
}

#[test]
fn seeds_with_members_slow_past_the_suspicion_timeout_hold_every_invariant_and_make_progress() {
    let seeds = env_u64("DERECHOFS_SIM_STALL_SEEDS").unwrap_or(30);
    slow_member_seeds(
        seeds,
        Options::with_stalls,
        "slow members",
        "DERECHOFS_SIM_STALL=1",
    );
}

/// Runs `seeds` seeds of slow members (`Options::with_stalls` or a batch built on it): nothing
/// fails, so each must hold every invariant, make progress again, and leave no node suspecting
/// itself. `rerun` is the environment that reruns one failed seed.
fn slow_member_seeds(seeds: u64, options_of: fn(u64) -> Options, what: &str, rerun: &str) {
    let started = Instant::now();
    let (mut steps, mut views, mut joins) = (0, 0, 0);
    for seed in 0..seeds {
        let options = options_of(seed);
        assert!(
            options.must_recover(),
            "seed {seed}: stalled members are not faulty"
        );
        match run(&options) {
            Ok(report) => {
                assert!(report.probes_delivered > 0, "seed {seed}: no progress");
                for (node, suspected) in report.suspected.iter().enumerate() {
                    let me = node as u32 + 1;
                    assert!(
                        !suspected.contains(&me),
                        "seed {seed}: node {me} suspects itself"
                    );
                }
                steps += report.steps;
                joins += report.joins;
                views += u64::from(report.view_ids.iter().copied().max().unwrap_or(1) - 1);
            }
            Err(failure) => panic!("{failure}\n  ({what}: {rerun})"),
        }
    }
    eprintln!(
        "{seeds} {what} seeds: {steps} steps, {views} views, {joins} joins in {:?}",
        started.elapsed()
    );
}

#[test]
fn seeds_with_every_member_stalled_at_once_or_each_alone_in_turn_make_progress_again() {
    let seeds = env_u64("DERECHOFS_SIM_HOST_STALL_SEEDS").unwrap_or(12);
    let started = Instant::now();
    let (mut steps, mut views, mut forgiven) = (0, 0, 0);
    for seed in 0..seeds {
        let options = Options::with_host_stall(seed);
        assert!(
            options.must_recover(),
            "seed {seed}: stalled members are not faulty"
        );
        match run(&options) {
            Ok(report) => {
                assert!(report.probes_delivered > 0, "seed {seed}: no progress");
                if options.host_stall_in_turn() {
                    // Each member ran alone past the timeout: it suspected every other one,
                    // trusted no majority, and had to trust again whom it heard from.
                    assert!(
                        report.forgiven > 0,
                        "seed {seed}: no member was trusted again: {report:?}"
                    );
                }
                steps += report.steps;
                forgiven += report.forgiven;
                views += u64::from(report.view_ids.iter().copied().max().unwrap_or(1) - 1);
            }
            Err(failure) => panic!("{failure}\n  (host-wide stall: DERECHOFS_SIM_HOST_STALL=1)"),
        }
    }
    eprintln!(
        "{seeds} host-wide stall seeds: {steps} steps, {views} views, {forgiven} members \
         trusted again in {:?}",
        started.elapsed()
    );
}
