//! The simulator run over seeds. A failure prints its seed; `DERECHOFS_SIM_SEED=<seed>` reruns
//! exactly that run, and `DERECHOFS_SIM_SEEDS=<count>` widens the batch.

use std::time::Instant;

use derechofs_tests::{run, Options};

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
fn one_seed_from_the_environment() {
    let Some(seed) = env_u64("DERECHOFS_SIM_SEED") else {
        return;
    };
    let options = Options::from_seed(seed);
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
fn a_crashed_member_is_suspected_and_every_survivor_wedges_safely() {
    for seed in 0..10 {
        let mut options = Options::from_seed(seed);
        options.suspect_after_ms = 200;
        options.crash = Some((seed as usize % options.nodes, 100_000));
        options.time_limit_us = 1_500_000;
        let crashed = seed as usize % options.nodes;
        let report = run(&options).unwrap_or_else(|failure| panic!("{failure}"));
        for node in (0..options.nodes).filter(|&n| n != crashed) {
            assert!(
                report.wedged[node],
                "seed {seed}: node {node} did not wedge"
            );
            assert!(
                report.suspected[node].contains(&(crashed as u32 + 1)),
                "seed {seed}: node {node} suspects {:?}",
                report.suspected[node]
            );
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
