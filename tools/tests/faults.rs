//! Multi-process fault tests: real `derechofs node` processes on loopback, killed (SIGKILL) or
//! frozen (SIGSTOP) under load, checked through the `kv`, `status` and `dump` commands.
//!
//! What they check is what a user relies on: a failure that leaves a majority costs no error
//! and no acknowledged write, a retried write is applied once, a minority refuses writes rather
//! than splitting and still answers reads of the past it knows to be final, the view a node
//! installed survives its restart, and a whole-cluster kill restarts from a majority with every
//! acknowledged write, each shard continuing from its longest log.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{unix_now, version_of, Cluster};

/// Killed members are suspected at once (their links break); silence is given long enough that
/// a loaded test machine never gets a live member suspected.
const PATIENT: &str = "suspect_after_ms = 5000\n";

/// Every node in every shard, so that the view changes these tests cause move no shard (t50
/// tests the move and its state transfer).
const EVERY_NODE_IN_EVERY_SHARD: &str = "[layout]\nreplicas = 5\n";

/// What one client wrote: key → (value, version), for every write it saw acknowledged.
type Acked = BTreeMap<String, (String, String)>;

/// A client writing fresh keys `PREFIX/N` one after another until `stop`, then `min` more,
/// begun after it saw `stop` (so after the fault, however fast the machine); every write must be
/// acknowledged, view changes included.
fn writer(cluster: &Cluster, contacts: &str, prefix: &str, stop: &AtomicBool, min: usize) -> Acked {
    let mut acked = Acked::new();
    let mut n = 0;
    // Writes begun once `stop` was seen: after the fault, whatever the machine's speed.
    let mut after_stop = 0;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && after_stop >= min {
            break;
        }
        let key = format!("{prefix}/{n}");
        let value = format!("{prefix}-v{n}");
        let run = cluster.kv_via(contacts, &["put", &key, &value]);
        assert_eq!(run.code, 0, "put {key} failed: {run:?}");
        acked.insert(key, (value, version_of(&run.stdout)));
        n += 1;
        after_stop += usize::from(stopping);
    }
    acked
}

/// Every acknowledged write reads back, with its version, from every member in `members`, and
/// its key changed exactly once: a write retried across the view change was applied once.
fn check_acked(cluster: &Cluster, contacts: &str, members: &[usize], acked: &Acked) {
    for (key, (value, version)) in acked {
        for member in members {
            let m = member.to_string();
            let run = cluster.kv_via(contacts, &["get", key, "-l", "--member", &m]);
            assert_eq!(run.code, 0, "{key} at node {member}: {run:?}");
            let expected = format!("version {version} ");
            assert!(
                run.stdout.contains(&expected) && run.stdout.trim_end().ends_with(value.as_str()),
                "{key} at node {member}: want {value} at {version}, got {run:?}"
            );
        }
        let history = cluster.kv_via(contacts, &["history", key]);
        assert_eq!(history.code, 0, "history of {key}: {history:?}");
        assert_eq!(
            history.stdout.lines().count(),
            1,
            "{key} was written once but changed more often: {history:?}"
        );
    }
}

/// The view id `status` prints first.
fn view_of(status: &str) -> u32 {
    status
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("view "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no view in {status:?}"))
}

/// The view of the version a write printed (`version VIEW.SEQ …`).
fn view_of_version(output: &str) -> u32 {
    version_of(output)
        .split_once('.')
        .and_then(|(view, _)| view.parse().ok())
        .unwrap_or_else(|| panic!("no version in {output:?}"))
}

/// The node ids `status` lists with state `state`, in id order.
fn nodes_in(status: &str, state: &str) -> Vec<u32> {
    let mut nodes: Vec<u32> = status
        .lines()
        .skip(2)
        .filter(|l| l.split_whitespace().nth(2) == Some(state))
        // A member that answered from another view than the one in the first line.
        .filter(|l| !l.contains(" in view "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    nodes
}

/// Runs `writers` clients through `contacts` while `fault` runs, then lets each write `min`
/// more keys; returns every acknowledged write.
/// Tells the writers to stop when dropped: also when the fault panics, so the test ends
/// (with the panic) instead of waiting for writers that never stop.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn under_load(
    cluster: &Cluster,
    contacts: &str,
    writers: usize,
    min: usize,
    fault: impl FnOnce(&Cluster),
) -> Acked {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let stop = &stop;
                s.spawn(move || writer(cluster, contacts, &format!("w{w}"), stop, min))
            })
            .collect();
        let stopper = StopOnDrop(&stop);
        // Let the load run before the fault hits it.
        std::thread::sleep(Duration::from_millis(300));
        fault(cluster);
        drop(stopper);
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("writer thread"))
            .collect()
    })
}

#[test]
fn t10_faults_sigkill_one_of_three_under_load_writes_go_on_and_every_acked_write_is_on_every_survivor(
) {
    let cluster = Cluster::new(40, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let acked = under_load(&cluster, &contacts, 4, 10, |c| c.kill(3));

    // The survivors installed the next view without node 3, and writes flowed in it.
    let status = cluster.wait_status(
        &cluster.contacts_of(&[1, 2]),
        "no view without node 3",
        |s| nodes_in(s, "active") == [1, 2] && !s.lines().any(|l| l.starts_with("3 ")),
    );
    assert_eq!(view_of(&status), 2, "{status}");
    assert!(
        acked.values().any(|(_, version)| version.starts_with("2.")),
        "no write was acknowledged in the new view: {acked:?}"
    );
    check_acked(&cluster, &contacts, &[1, 2], &acked);

    // The survivors' logs are identical; the killed node's is a prefix of theirs.
    cluster.stop_all();
    let dumps: Vec<String> = (1..=3).map(|n| cluster.dump(n)).collect();
    let entries = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with("  "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        entries(&dumps[0]),
        entries(&dumps[1]),
        "nodes 1 and 2 differ"
    );
    let survivor = entries(&dumps[0]);
    for entry in entries(&dumps[2]) {
        // Node 3 holds older versions of some keys; each must be a version the survivors
        // held: its version is at most theirs for the key.
        let key = entry.split_whitespace().next().expect("key");
        assert!(
            survivor
                .iter()
                .any(|s| s.split_whitespace().next() == Some(key)),
            "node 3 holds {entry}, unknown to the survivors"
        );
    }
}

#[test]
fn t20_faults_five_nodes_leader_killed_during_a_view_change_the_remaining_three_form_a_view() {
    // The stalled member below is never suspected, however slowly a loaded machine runs.
    let cluster = Cluster::new(41, 5, &format!("{PATIENT}{EVERY_NODE_IN_EVERY_SHARD}"));
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts_of(&[2, 3, 4]);
    let acked = under_load(&cluster, &contacts, 3, 8, |c| {
        // Node 4 stalls for a moment (well below `suspect_after_ms`), so the change that node 1
        // leads once node 5 dies waits for node 4's answer: node 1 dies in the middle of it.
        c.freeze(4);
        c.kill(5);
        c.wait_log(1, "wedged");
        c.kill(1);
        c.thaw(4);
    });
    assert!(
        !cluster.log_of(1).contains("installed the next view"),
        "node 1 finished the change before it was killed: {}",
        cluster.log_of(1)
    );
    let status = cluster.wait_status(&contacts, "no view of nodes 2, 3, 4", |s| {
        nodes_in(s, "active") == [2, 3, 4]
            && s.lines().filter(|l| l.contains("data/0")).count() == 3
    });
    assert!(view_of(&status) >= 2, "{status}");
    check_acked(&cluster, &contacts, &[2, 3, 4], &acked);
    let after = cluster.kv_via(&contacts, &["put", "after", "yes"]);
    assert_eq!(after.code, 0, "{after:?}");
}

#[test]
fn t30_faults_five_nodes_losing_three_refuse_writes_and_still_answer_reads_below_the_frontier() {
    let cluster = Cluster::new(
        42,
        5,
        &format!("suspect_after_ms = 400\ntime_read_wait_ms = 1000\n{EVERY_NODE_IN_EVERY_SHARD}"),
    );
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts_of(&[1, 2]);
    cluster.kv_ok(&["put", "k", "old"]);
    let t = unix_now();
    cluster.kv_ok(&["put", "k", "new"]);
    // Read at `t` once while the group is whole: the frontier passed it.
    let before = cluster.kv_via(&contacts, &["get", "k", "--at", &t, "--member", "1"]);
    assert_eq!(
        (before.code, before.stdout.trim()),
        (0, "old"),
        "{before:?}"
    );

    // Three members fall silent at once, links open: the two others suspect all three and,
    // being no majority of the view, install nothing.
    for n in [3, 4, 5] {
        cluster.freeze(n);
    }
    let status = cluster.wait_status(&contacts, "no minority state", |s| {
        nodes_in(s, "no-majority") == [1, 2]
    });
    assert_eq!(
        view_of(&status),
        1,
        "the minority installed a view: {status}"
    );

    let put = cluster.kv_via(&contacts, &["put", "k", "split"]);
    assert_ne!(put.code, 0, "the minority took a write: {put:?}");
    assert!(put.stderr.contains("NoMajority"), "{put:?}");

    // The past below the frontier is final and still served, on both sides of the minority.
    for member in ["1", "2"] {
        let read = cluster.kv_via(&contacts, &["get", "k", "--at", &t, "--member", member]);
        assert_eq!((read.code, read.stdout.trim()), (0, "old"), "{read:?}");
    }
    // The present is not: a minority cannot know it.
    let latest = cluster.kv_via(&contacts, &["get", "k", "--member", "1"]);
    assert_ne!(latest.code, 0, "{latest:?}");
    assert!(latest.stderr.contains("NoMajority"), "{latest:?}");
    let now = unix_now();
    let recent = cluster.kv_via(&contacts, &["get", "k", "--at", &now, "--member", "2"]);
    assert_ne!(recent.code, 0, "{recent:?}");
    for n in [3, 4, 5] {
        cluster.kill(n);
    }
}

#[test]
fn t40_faults_every_node_killed_and_restarted_keeps_every_acked_write_and_the_recorded_view() {
    let cluster = Cluster::new(43, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let mut acked = under_load(&cluster, &contacts, 2, 5, |c| c.kill(3));
    let survivors = cluster.contacts_of(&[1, 2]);
    let status = cluster.wait_status(&survivors, "no view without node 3", |s| {
        nodes_in(s, "active") == [1, 2] && view_of(s) >= 2
    });
    assert_eq!(view_of(&status), 2, "{status}");

    // Everything stops at once; nodes 1 and 2 come back in the view they recorded, 2 — not in
    // the configured three-member one — and restart it as view 3.
    cluster.kill_all();
    cluster.start(1);
    cluster.start(2);
    let status = cluster.wait_status(&survivors, "the survivors did not restart", |s| {
        nodes_in(s, "active") == [1, 2] && view_of(s) >= 3
    });
    assert!(view_of(&status) >= 3, "{status}");
    check_acked(&cluster, &survivors, &[1, 2], &acked);
    let after = cluster.kv_via(&survivors, &["put", "after", "restart"]);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(view_of_version(&after.stdout) >= 3, "{after:?}");
    acked.insert(
        "after".into(),
        ("restart".into(), version_of(&after.stdout)),
    );

    // The removed node comes back behind the group and joins again: the view grows back to
    // three members, and once it caught up it holds every acknowledged write too.
    cluster.start(3);
    let status = cluster.wait_status(&contacts, "node 3 did not rejoin", |s| {
        nodes_in(s, "active") == [1, 2, 3] && view_of(s) >= 4
    });
    assert!(view_of(&status) >= 4, "{status}");
    wait_caught_up(&cluster, 3, 2);
    let alone = cluster.contacts_of(&[3]);
    let put = cluster.kv_via(&alone, &["put", "via-3", "ok"]);
    assert_eq!(put.code, 0, "{put:?}");
    assert!(view_of_version(&put.stdout) >= 4, "{put:?}");
    check_acked(&cluster, &contacts, &[1, 2, 3], &acked);
}

#[test]
fn t50_faults_a_spare_given_a_shard_by_a_view_change_gets_its_whole_history_by_state_transfer() {
    // Four nodes, shards of three: shard 0 is on nodes 1, 2 and 3, so killing node 3 gives
    // shard 0 to node 4, which never held it. State transfer brings it every version over the
    // real transport; then every acknowledged write reads back from node 4 too.
    let cluster = Cluster::new(44, 4, &format!("{PATIENT}[layout]\nreplicas = 3\n"));
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts_of(&[1, 2, 4]);
    let acked = under_load(&cluster, &contacts, 3, 40, |c| c.kill(3));
    let status = cluster.wait_status(&contacts, "node 4 serving every shard", |s| {
        nodes_in(s, "active") == [1, 2, 4] && !s.lines().any(|l| l.starts_with("3 "))
    });
    assert!(view_of(&status) >= 2, "{status}");
    let log = std::fs::read_to_string(cluster.path("node4.log")).unwrap_or_default();
    assert!(
        log.contains("caught up by state transfer"),
        "node 4 did not catch up by transfer: {}",
        cluster.logs()
    );
    // Caught up, node 4 says it serves the shard (`status`'s last column).
    let status = cluster.status(&contacts).stdout;
    let rows: Vec<&str> = status.lines().filter(|l| l.starts_with("4 ")).collect();
    assert!(
        !rows.is_empty() && rows.iter().all(|l| l.trim_end().ends_with(" yes")),
        "node 4 does not say it serves its shards: {status}"
    );
    check_acked(&cluster, &contacts, &[1, 2, 4], &acked);
    // The logs of the shards agree entry for entry: the spare's copy is the shard's log.
    cluster.stop_all();
    let entries = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with("  "))
            .map(str::to_string)
            .collect()
    };
    let reference = entries(&cluster.dump(1));
    assert_eq!(entries(&cluster.dump(4)), reference, "node 4's logs differ");
}

/// Waits until node `node` has logged that state transfer brought `shards` shards up to date.
fn wait_caught_up(cluster: &Cluster, node: usize, shards: usize) {
    let caught_up = || {
        cluster
            .log_of(node)
            .matches("caught up by state transfer")
            .count()
    };
    common::poll(
        Duration::from_millis(10),
        || (caught_up() >= shards).then_some(()).ok_or(()),
        |()| {
            format!(
                "node {node} did not catch up {shards} shards: {}",
                cluster.logs()
            )
        },
    )
}

#[test]
fn t60_faults_a_killed_node_restarted_with_its_config_rejoins_catches_up_and_holds_every_acked_write(
) {
    // Three nodes, both shards (namespace and data) on all three. Node 3 is killed under a
    // write load, the others go on without it; restarted with the same configuration, it finds
    // the group in a later view, joins again through the members, and catches its kept logs up
    // by state transfer, while the writes go on.
    let cluster = Cluster::new(45, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let acked = under_load(&cluster, &contacts, 2, 10, |c| {
        c.kill(3);
        let survivors = c.contacts_of(&[1, 2]);
        c.wait_status(&survivors, "no view without node 3", |s| {
            nodes_in(s, "active") == [1, 2] && !s.lines().any(|l| l.starts_with("3 "))
        });
        c.start(3);
        let status = c.wait_status(&c.contacts(), "node 3 did not rejoin", |s| {
            nodes_in(s, "active") == [1, 2, 3]
        });
        assert!(view_of(&status) >= 3, "{status}");
    });
    wait_caught_up(&cluster, 3, 2);
    let log = cluster.log_of(3);
    assert!(
        log.contains("behind and joins again") && log.contains("welcomed back into the group"),
        "node 3 did not join again: {}",
        cluster.logs()
    );
    check_acked(&cluster, &contacts, &[1, 2, 3], &acked);

    // Every replica holds the same logs, entry for entry.
    cluster.stop_all();
    let entries = |dump: &str| -> Vec<String> {
        dump.lines()
            .filter(|l| l.starts_with("  "))
            .map(str::to_string)
            .collect()
    };
    let reference = entries(&cluster.dump(1));
    assert!(!reference.is_empty(), "node 1 holds nothing");
    for node in [2, 3] {
        assert_eq!(
            entries(&cluster.dump(node)),
            reference,
            "node {node}'s logs differ from node 1's"
        );
    }
}

/// A client writing fresh keys `PREFIX/N` until `stop`, through a cluster that may be down
/// for a while: a write that fails has an unknown outcome and its key is not used again; every
/// write acknowledged is returned.
fn writer_through_outage(
    cluster: &Cluster,
    contacts: &str,
    prefix: &str,
    stop: &AtomicBool,
) -> Acked {
    let mut acked = Acked::new();
    let mut n = 0;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("{prefix}/{n}");
        let value = format!("{prefix}-v{n}");
        let run = cluster.kv_via(contacts, &["put", &key, &value]);
        if run.code == 0 {
            acked.insert(key, (value, version_of(&run.stdout)));
        } else {
            // Nothing answers while every node is down: pace the retries.
            std::thread::sleep(Duration::from_millis(20));
        }
        n += 1;
    }
    acked
}

/// Runs `writers` outage-tolerant clients through `contacts` while `fault` runs; returns every
/// acknowledged write.
fn through_outage(
    cluster: &Cluster,
    contacts: &str,
    writers: usize,
    fault: impl FnOnce(&Cluster),
) -> Acked {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                let stop = &stop;
                s.spawn(move || writer_through_outage(cluster, contacts, &format!("w{w}"), stop))
            })
            .collect();
        let stopper = StopOnDrop(&stop);
        std::thread::sleep(Duration::from_millis(300));
        fault(cluster);
        drop(stopper);
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("writer thread"))
            .collect()
    })
}

/// The log entries of `dump` (its indented lines).
fn entries(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| l.starts_with("  "))
        .map(str::to_string)
        .collect()
}

/// Stops every node and checks that every node's logs hold the same entries as node 1's.
fn logs_agree(cluster: &Cluster, nodes: &[usize]) {
    cluster.stop_all();
    let reference = entries(&cluster.dump(1));
    assert!(!reference.is_empty(), "node 1 holds nothing");
    for &node in nodes {
        assert_eq!(
            entries(&cluster.dump(node)),
            reference,
            "node {node}'s logs differ from node 1's"
        );
    }
}

#[test]
fn t70_faults_every_node_sigkilled_under_load_restarts_with_every_acked_write_on_every_replica() {
    // Three nodes, both shards on all three, two clients writing. All three are SIGKILLed at
    // once and started again: the total restart agrees where each shard ends (the longest
    // log), installs the next view, and the writes go on.
    let cluster = Cluster::new(46, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let mut acked = through_outage(&cluster, &contacts, 2, |c| {
        std::thread::sleep(Duration::from_millis(500));
        c.kill_all();
        for node in 1..=3 {
            c.start(node);
        }
        let status = c.wait_status(&contacts, "the group did not restart", |s| {
            nodes_in(s, "active") == [1, 2, 3] && view_of(s) >= 2
        });
        // View 2, or later if a node's death was acted on before the others died (a decision
        // removing it, which the restart adopts; that node then joins again by itself).
        assert!(view_of(&status) >= 2, "{status}");
        // Let the writes go on in the restarted view for a while.
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(!acked.is_empty(), "no write was acknowledged");
    for node in 1..=3 {
        assert!(
            cluster
                .log_of(node)
                .contains("restarting from the recorded view"),
            "node {node} did not restart from its recorded view: {}",
            cluster.logs()
        );
    }
    let after = cluster.kv_via(&contacts, &["put", "after", "restart"]);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(view_of_version(&after.stdout) >= 2, "{after:?}");
    acked.insert(
        "after".into(),
        ("restart".into(), version_of(&after.stdout)),
    );
    check_acked(&cluster, &contacts, &[1, 2, 3], &acked);
    logs_agree(&cluster, &[2, 3]);
}

#[test]
fn t80_faults_a_node_killed_earlier_restarting_with_everyone_catches_up_from_the_longest_log() {
    // Node 3 is killed under load and the others go on without it (view 2), writing more;
    // then nodes 1 and 2 are killed too, and all three start together. Nodes 1 and 2 restart
    // from view 2; node 3, back from view 1 with a shorter log, finds the group went on without
    // it, joins again and catches up by state transfer: every acknowledged write is on every
    // replica and the logs agree entry for entry.
    let cluster = Cluster::new(47, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let acked = through_outage(&cluster, &contacts, 2, |c| {
        c.kill(3);
        let survivors = c.contacts_of(&[1, 2]);
        c.wait_status(&survivors, "no view without node 3", |s| {
            nodes_in(s, "active") == [1, 2] && !s.lines().any(|l| l.starts_with("3 "))
        });
        std::thread::sleep(Duration::from_millis(300));
        c.kill_all();
        for node in 1..=3 {
            c.start(node);
        }
        let status = c.wait_status(&contacts, "the group did not come back whole", |s| {
            nodes_in(s, "active") == [1, 2, 3]
        });
        assert!(view_of(&status) >= 4, "{status}");
    });
    assert!(!acked.is_empty(), "no write was acknowledged");
    wait_caught_up(&cluster, 3, 2);
    assert!(
        cluster.log_of(3).contains("behind and joins again"),
        "node 3 did not join again: {}",
        cluster.logs()
    );
    check_acked(&cluster, &contacts, &[1, 2, 3], &acked);
    logs_agree(&cluster, &[2, 3]);
}

#[test]
fn t90_faults_a_majority_of_the_recorded_view_restarts_without_waiting_for_the_rest() {
    // Every node is killed; only nodes 1 and 2 come back. They restart without node 3 (view 2
    // of nodes 1 and 2) and take writes; node 3, started later, joins again and catches up.
    let cluster = Cluster::new(48, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let mut acked = under_load(&cluster, &contacts, 2, 5, |_| {});
    cluster.kill_all();
    cluster.start(1);
    cluster.start(2);
    let survivors = cluster.contacts_of(&[1, 2]);
    let status = cluster.wait_status(&survivors, "nodes 1 and 2 did not restart", |s| {
        nodes_in(s, "active") == [1, 2]
            && !s.lines().any(|l| l.starts_with("3 "))
            && view_of(s) >= 2
    });
    assert_eq!(view_of(&status), 2, "{status}");
    let put = cluster.kv_via(&survivors, &["put", "without-3", "ok"]);
    assert_eq!(put.code, 0, "{put:?}");
    acked.insert("without-3".into(), ("ok".into(), version_of(&put.stdout)));
    cluster.start(3);
    cluster.wait_status(&contacts, "node 3 did not rejoin", |s| {
        nodes_in(s, "active") == [1, 2, 3]
    });
    wait_caught_up(&cluster, 3, 2);
    check_acked(&cluster, &contacts, &[1, 2, 3], &acked);
    logs_agree(&cluster, &[2, 3]);
}

#[test]
fn t95_faults_a_node_not_in_members_joins_under_load_and_takes_a_killed_members_shards_by_transfer()
{
    // Three configured members, both shards on all three, three clients writing. Node 4 is not
    // in `members`: it joins through node 2, announcing its address, which the view that adds
    // it carries to every member (they did not know it). It is a spare until node 3 is killed;
    // then the layout gives it node 3's shards, whose logs it gets by state transfer while the
    // writes go on. Every acknowledged write is then on nodes 1, 2 and 4.
    let cluster = Cluster::with_joiners(49, 3, 1, &format!("{PATIENT}[layout]\nreplicas = 3\n"));
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts_of(&[1, 2]);
    let everyone = cluster.contacts_of(&[1, 2, 4]);
    let acked = under_load(&cluster, &contacts, 3, 40, |c| {
        c.start(4);
        let status = c.wait_status(&contacts, "node 4 did not join", |s| {
            nodes_in(s, "active") == [1, 2, 3, 4]
        });
        assert!(view_of(&status) >= 2, "{status}");
        c.kill(3);
    });
    let status = cluster.wait_status(&everyone, "node 4 serving node 3's shards", |s| {
        nodes_in(s, "active") == [1, 2, 4]
            && !s.lines().any(|l| l.starts_with("3 "))
            && s.lines().filter(|l| l.starts_with("4 ")).count() == 2
    });
    assert!(view_of(&status) >= 3, "{status}");
    wait_caught_up(&cluster, 4, 2);
    for node in [1, 2] {
        assert!(
            cluster
                .log_of(node)
                .contains("learned a member's address from the view"),
            "node {node} did not learn node 4's address: {}",
            cluster.logs()
        );
    }
    check_acked(&cluster, &everyone, &[1, 2, 4], &acked);
    logs_agree(&cluster, &[2, 4]);
}

/// A `derechofs kv watch` process, killed by its pid when dropped.
struct Watcher {
    child: std::process::Child,
    out: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Watcher {
    fn start(cluster: &Cluster, contacts: &str, prefix: &str, count: usize) -> Watcher {
        let out = cluster.path("watch.out");
        let err = cluster.path("watch.err");
        let count = count.to_string();
        let child = std::process::Command::new(common::BIN)
            .args([
                "kv",
                "--contacts",
                contacts,
                "watch",
                prefix,
                "--count",
                &count,
            ])
            .env("DERECHOFS_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output file"))
            .stderr(std::fs::File::create(&err).expect("output file"))
            .spawn()
            .expect("run derechofs kv watch");
        Watcher { child, out, err }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits, bounded, until `check` holds of what it printed.
    fn wait_for(&self, what: &str, check: impl Fn(&Watcher) -> bool) {
        common::poll(
            Duration::from_millis(10),
            || check(self).then_some(()).ok_or(()),
            |()| {
                format!(
                    "the watch never got {what}: {}\n{}",
                    self.stdout(),
                    self.stderr()
                )
            },
        )
    }

    /// Sends it a signal (`STOP`, `CONT`) by its pid.
    fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} of the watcher failed");
    }

    /// Waits, bounded, for it to exit; its exit code.
    fn wait_exit(&mut self) -> i32 {
        let deadline = std::time::Instant::now() + common::COMMAND_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code().unwrap_or(-1),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => panic!(
                    "the watch did not end: {}\n{}",
                    self.stdout(),
                    self.stderr()
                ),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes the test's watcher sees: `WRITERS` clients, each changing `KEYS` keys of its own
/// round-robin `PUTS` times, so keys change more than once and in many versions.
const WATCH_WRITERS: usize = 2;
const WATCH_KEYS: usize = 5;
const WATCH_PUTS: usize = 60;

#[test]
fn t97_faults_a_watch_whose_member_is_sigkilled_resumes_on_another_with_every_acked_change_once_in_version_order(
) {
    let cluster = Cluster::new(42, 3, PATIENT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let total = WATCH_WRITERS * WATCH_PUTS;
    let mut watcher = Watcher::start(&cluster, &contacts, "watched/", total);
    watcher.wait_for("registered", |w| w.stderr().contains(" watching"));
    let member: usize = watcher
        .stderr()
        .split_whitespace()
        .find_map(|word| word.strip_prefix("node=")?.parse().ok())
        .unwrap_or_else(|| panic!("no member in {}", watcher.stderr()));
    let written = std::sync::atomic::AtomicUsize::new(0);
    // Acknowledged changes: (version, key, value).
    let acked: Vec<(String, String, String)> = std::thread::scope(|s| {
        let writers: Vec<_> = (0..WATCH_WRITERS)
            .map(|w| {
                let (cluster, contacts, written) = (&cluster, &contacts, &written);
                s.spawn(move || {
                    (0..WATCH_PUTS)
                        .map(|n| {
                            let key = format!("watched/w{w}-{}", n % WATCH_KEYS);
                            let value = format!("w{w}-v{n}");
                            let run = cluster.kv_via(contacts, &["put", &key, &value]);
                            assert_eq!(run.code, 0, "put {key} failed: {run:?}");
                            written.fetch_add(1, Ordering::Relaxed);
                            (version_of(&run.stdout), key, value)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // Mid-stream: the watcher has seen some changes, and more are being written.
        watcher.wait_for("a third of the changes", |w| {
            w.stdout().lines().count() >= total / 3
        });
        // The watcher is frozen while its member dies and the survivors deliver more changes
        // in the next view: it finds its link ended only then, and must get the changes it
        // missed replayed from another member's log before the live ones.
        watcher.signal("STOP");
        cluster.kill(member);
        let at_kill = written.load(Ordering::Relaxed);
        let goal = (at_kill + WATCH_PUTS / 3).min(total);
        common::poll(
            Duration::from_millis(10),
            || {
                (written.load(Ordering::Relaxed) >= goal)
                    .then_some(())
                    .ok_or(())
            },
            |()| "the writes did not go on after the kill".to_string(),
        );
        watcher.signal("CONT");
        writers
            .into_iter()
            .flat_map(|h| h.join().expect("writer thread"))
            .collect()
    });
    let code = watcher.wait_exit();
    assert_eq!(code, 0, "the watch failed: {}", watcher.stderr());
    assert!(
        watcher
            .stderr()
            .lines()
            .filter(|l| l.contains(" watching"))
            .any(|l| !l.contains(&format!("node={member} "))),
        "the watch did not move to another member: {}",
        watcher.stderr()
    );
    // Every acknowledged change, in version order (keys in order within a version).
    let parse_version = |v: &str| -> (u64, u64) {
        let (view, seq) = v.split_once('.').expect("VIEW.SEQ");
        (view.parse().expect("view"), seq.parse().expect("seq"))
    };
    let mut expected: Vec<((u64, u64), String, String)> = acked
        .into_iter()
        .map(|(v, k, value)| (parse_version(&v), k, value))
        .collect();
    expected.sort();
    // `VERSION STAMP (TIME) KEY VALUE` per event, exactly as delivered.
    let got: Vec<((u64, u64), String, String)> = watcher
        .stdout()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 5, "event line {l:?}");
            (parse_version(f[0]), f[3].to_string(), f[4].to_string())
        })
        .collect();
    assert_eq!(
        got, expected,
        "the watch's events differ from the acknowledged changes"
    );
}

/// Suspicion for the stall tests below: the default, so that a stall past it takes a second or
/// two, and a member of a loaded test machine is rarely suspected for being slow (the tests
/// still hold if it is: the group recovers by itself).
const STALL_SUSPECT: &str = "suspect_after_ms = 1000\n";

/// As `check_acked`, once each member serves the key: a member suspected falsely on a loaded
/// machine after the stall is removed and joins again, and answers once it caught up.
fn check_acked_eventually(cluster: &Cluster, contacts: &str, members: &[usize], acked: &Acked) {
    for (key, (value, version)) in acked {
        for member in members {
            let m = member.to_string();
            let run = common::poll(
                Duration::from_millis(50),
                || {
                    let run = cluster.kv_via(contacts, &["get", key, "-l", "--member", &m]);
                    if run.code == 0 {
                        Ok(run)
                    } else {
                        Err(run)
                    }
                },
                |run| format!("{key} at node {member}: {run:?}"),
            );
            let expected = format!("version {version} ");
            assert!(
                run.stdout.contains(&expected) && run.stdout.trim_end().ends_with(value.as_str()),
                "{key} at node {member}: want {value} at {version}, got {run:?}"
            );
        }
        let history = cluster.kv_via(contacts, &["history", key]);
        assert_eq!(history.code, 0, "history of {key}: {history:?}");
        assert_eq!(
            history.stdout.lines().count(),
            1,
            "{key} was written once but changed more often: {history:?}"
        );
    }
}

/// Writes `key` through `contacts` until it is acknowledged (each try bounded by the client's
/// retry window); fails the test after `WAIT_TIMEOUT`.
fn put_eventually(cluster: &Cluster, contacts: &str, key: &str, value: &str) -> String {
    common::poll(
        Duration::from_millis(50),
        || {
            let run = cluster.kv_via(contacts, &["put", key, value]);
            if run.code == 0 {
                Ok(run.stdout)
            } else {
                Err(run)
            }
        },
        |run| format!("{key} was never acknowledged: {run:?}\n{}", cluster.logs()),
    )
}

#[test]
fn t92_faults_a_node_stopped_under_load_is_removed_the_others_go_on_and_once_resumed_it_joins_again(
) {
    // Node 3 is stopped (SIGSTOP, links open) while two clients write through nodes 1 and 2:
    // its peers' messages to it pile up in their link queues and it reads none. The others
    // must not block on it: they suspect it, install a view without it and go on taking
    // writes. Resumed, node 3 finds itself removed, joins again and catches up.
    let cluster = Cluster::new(55, 3, STALL_SUSPECT);
    cluster.start_all();
    cluster.wait_active();
    let survivors = cluster.contacts_of(&[1, 2]);
    let acked = under_load(&cluster, &survivors, 2, 5, |c| {
        c.freeze(3);
        let status = c.wait_status(&survivors, "no view without node 3", |s| {
            nodes_in(s, "active") == [1, 2] && !s.lines().any(|l| l.starts_with("3 "))
        });
        assert!(view_of(&status) >= 2, "{status}");
        // Writes in the view without node 3, before it runs again.
        put_eventually(c, &survivors, "while-stopped", "yes");
        c.thaw(3);
        let status = c.wait_status(&c.contacts(), "node 3 did not join again", |s| {
            nodes_in(s, "active") == [1, 2, 3]
        });
        assert!(view_of(&status) >= 3, "{status}");
    });
    assert!(
        cluster.log_of(3).contains("asking to join again"),
        "node 3 did not learn it was removed: {}",
        cluster.logs()
    );
    wait_caught_up(&cluster, 3, 2);
    let contacts = cluster.contacts();
    check_acked_eventually(&cluster, &contacts, &[1, 2, 3], &acked);
    logs_agree(&cluster, &[2, 3]);
}

#[test]
fn t98_faults_every_node_stopped_at_once_past_the_suspicion_timeout_serves_again_once_resumed() {
    // A host-wide stall: the three node processes are stopped together (SIGSTOP) for three
    // suspicion timeouts under a write load, then resumed. A pause of a node's own is not its
    // peers' silence; whatever each concludes, the three must serve writes again by themselves
    // and keep every acknowledged one. (Clients starting while every node is stopped find no
    // member that answers: their writes fail, and their keys are not used again.)
    let cluster = Cluster::new(53, 3, STALL_SUSPECT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let acked = through_outage(&cluster, &contacts, 2, |c| {
        for node in 1..=3 {
            c.freeze(node);
        }
        std::thread::sleep(Duration::from_millis(3_000));
        for node in 1..=3 {
            c.thaw(node);
        }
    });
    cluster.wait_status(&contacts, "the three do not serve together again", |s| {
        nodes_in(s, "active") == [1, 2, 3]
    });
    put_eventually(&cluster, &contacts, "after", "yes");
    check_acked_eventually(&cluster, &contacts, &[1, 2, 3], &acked);
    logs_agree(&cluster, &[2, 3]);
}

#[test]
fn t99_faults_each_node_running_alone_past_the_timeout_suspects_both_others_and_all_three_form_a_view_again(
) {
    // Every node suspects both others, no link breaks, every process lives: the state a
    // loaded host once left a cluster in (it stayed wedged). Made here by letting each node
    // run alone in turn (the other two stopped) until it has suspected both others. Each
    // then trusts no majority, so it trusts again whoever it hears from; once all run
    // again, a majority must install a view and take writes, and every acknowledged write
    // must survive.
    let cluster = Cluster::new(54, 3, STALL_SUSPECT);
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let acked = through_outage(&cluster, &contacts, 2, |c| {
        for node in 1..=3 {
            c.freeze(node);
        }
        for alone in 1..=3 {
            c.thaw(alone);
            for other in (1..=3).filter(|&o| o != alone) {
                c.wait_log(
                    alone,
                    &format!("suspecting a member node={alone} suspect={other}"),
                );
            }
            c.freeze(alone);
        }
        for node in 1..=3 {
            c.thaw(node);
        }
    });
    let status = cluster.wait_status(&contacts, "the three do not form a view again", |s| {
        // A member the new view added back serves once it caught up by state transfer.
        nodes_in(s, "active") == [1, 2, 3] && !s.contains("catching-up")
    });
    // All three were wedged: only a new view makes them active again.
    assert!(view_of(&status) >= 2, "{status}");
    put_eventually(&cluster, &contacts, "after", "yes");
    check_acked_eventually(&cluster, &contacts, &[1, 2, 3], &acked);
    logs_agree(&cluster, &[2, 3]);
}
