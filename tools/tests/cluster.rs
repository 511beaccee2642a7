//! Multi-process tests: three `derechofs node` processes on loopback, driven through the
//! `derechofs kv` and `derechofs status` commands, as a person would from the README.
//!
//! Each cluster takes its own address `127.0.0.X` (X from the process id and the test) and
//! ports the kernel picked, so tests and concurrent runs do not collide. Every process is
//! stopped by its pid when the test ends, failed or not, and every wait is bounded.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{unix_now, version_of, Cluster, BIN, COMMAND_TIMEOUT};

const NODES: usize = 3;

/// A 3-node cluster; `suspect_after_ms` is generous so a loaded test machine does not change
/// views by accident.
fn cluster(test: u8) -> Cluster {
    Cluster::new(
        test,
        NODES,
        "suspect_after_ms = 5000\ntime_read_wait_ms = 5000\n",
    )
}

/// Starts `derechofs kv watch PREFIX --count N` and waits until its watch is registered;
/// returns the process and the file its output goes to.
fn watch(cluster: &Cluster, prefix: &str, count: usize) -> (Child, PathBuf) {
    let out = cluster.path("watch.out");
    let err = cluster.path("watch.err");
    let contacts = cluster.contacts();
    let n = count.to_string();
    let mut child = Command::new(BIN)
        .args([
            "kv",
            "--contacts",
            &contacts,
            "watch",
            prefix,
            "--count",
            &n,
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("output file"))
        .stderr(std::fs::File::create(&err).expect("output file"))
        .spawn()
        .expect("run derechofs kv watch");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("watching")
    {
        if Instant::now() > deadline || !matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the watch did not start: {:?}",
                std::fs::read_to_string(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, out)
}

/// What one client thread wrote: each key's last acknowledged value (`None`: deleted).
type Acked = Vec<(String, Option<String>)>;

fn workload(cluster: &Cluster, client: usize, keys: usize) -> Acked {
    let mut acked = Vec::new();
    for k in 0..keys {
        let key = format!("c{client}/k{k}");
        let value = format!("v{client}-{k}");
        cluster.kv_ok(&["put", &key, &value]);
        let mut last = Some(value);
        if k % 3 == 1 {
            // A conditional put on the version just read, which nobody else writes: succeeds.
            let got = cluster.kv_ok(&["get", "-l", &key]);
            let version = got.split_whitespace().nth(3).expect("version").to_string();
            let value = format!("w{client}-{k}");
            cluster.kv_ok(&["cput", &key, &value, "--expect", &version]);
            last = Some(value);
        }
        if k % 3 == 2 {
            cluster.kv_ok(&["delete", &key]);
            last = None;
        }
        // Contended conditional puts on one shared key: some win, the rest see a conflict.
        if k % 2 == 0 {
            let run = cluster.kv(&["get", "-l", "shared"]);
            let value = format!("s{client}-{k}");
            let cput = match run.code {
                0 => {
                    let version = run
                        .stdout
                        .split_whitespace()
                        .nth(3)
                        .expect("version")
                        .to_string();
                    cluster.kv(&["cput", "shared", &value, "--expect", &version])
                }
                _ => cluster.kv(&["cput", "shared", &value, "--absent"]),
            };
            assert!(cput.code == 0 || cput.code == 3, "cput: {cput:?}");
        }
        acked.push((key, last));
    }
    acked
}

/// Every member serves every acknowledged write at the latest version.
fn check_acked(cluster: &Cluster, acked: &Acked) {
    for (key, value) in acked {
        for member in 1..=NODES {
            let m = member.to_string();
            let run = cluster.kv(&["get", key, "--member", &m]);
            match value {
                Some(v) => assert_eq!(
                    (run.code, run.stdout.trim()),
                    (0, v.as_str()),
                    "{key} at node {member}: {run:?}"
                ),
                None => assert_eq!(run.code, 2, "{key} deleted, at node {member}: {run:?}"),
            }
        }
    }
}

#[test]
fn t10_cluster_three_nodes_concurrent_clients_replicas_agree_and_survive_restart() {
    let started = Instant::now();
    let cluster = cluster(10);
    cluster.start_all();
    cluster.wait_active();

    // Several clients at once, each a sequence of `derechofs kv` processes.
    let acked: Acked = std::thread::scope(|s| {
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let cluster = &cluster;
                s.spawn(move || workload(cluster, c, 9))
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().expect("client thread"))
            .collect()
    });
    check_acked(&cluster, &acked);

    // A watch streams the changes under its prefix after delivery, in version order.
    let (mut watcher, out) = watch(&cluster, "w/", 4);
    cluster.kv_ok(&["put", "w/a", "1"]);
    cluster.kv_ok(&["put", "elsewhere", "x"]);
    cluster.kv_ok(&["put", "w/b", "2"]);
    cluster.kv_ok(&["delete", "w/a"]);
    cluster.kv_ok(&["put", "w/a", "3"]);
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match watcher.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = watcher.kill();
                let _ = watcher.wait();
                panic!("the watch did not end after 4 changes");
            }
        }
    };
    assert!(status.success());
    let events = std::fs::read_to_string(&out).expect("watch output");
    let seen: Vec<(&str, &str, &str)> = events
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0], f[f.len() - 2], f[f.len() - 1])
        })
        .collect();
    let keys: Vec<(&str, &str)> = seen.iter().map(|&(_, k, v)| (k, v)).collect();
    assert_eq!(
        keys,
        [
            ("w/a", "1"),
            ("w/b", "2"),
            ("w/a", "(deleted)"),
            ("w/a", "3")
        ],
        "{events}"
    );
    let seqs: Vec<u64> = seen
        .iter()
        .map(|(v, _, _)| {
            v.split_once('.')
                .and_then(|(_, s)| s.parse().ok())
                .expect("version")
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{events}");

    // A read at a time answers the same at every member, and a later write does not change it.
    let before = cluster.kv_ok(&["put", "timed", "old"]);
    let t = unix_now();
    cluster.kv_ok(&["put", "timed", "new"]);
    let reads: Vec<String> = (1..=NODES)
        .map(|m| cluster.kv_ok(&["get", "timed", "--at", &t, "-l", "--member", &m.to_string()]))
        .collect();
    assert!(reads.iter().all(|r| r == &reads[0]), "{reads:?}");
    assert!(
        reads[0].contains(&format!("version {} ", version_of(&before))),
        "{reads:?}"
    );
    assert!(reads[0].trim_end().ends_with("value old"), "{reads:?}");

    // Every replica's log holds the same versions, stamps and values.
    cluster.stop_all();
    let dumps: Vec<String> = (1..=NODES).map(|n| cluster.dump(n)).collect();
    assert!(dumps[0].contains("c0/k0"), "{}", dumps[0]);
    for (n, dump) in dumps.iter().enumerate() {
        assert_eq!(dump, &dumps[0], "node {} differs from node 1", n + 1);
    }

    // All nodes restart from their data directories with every persisted version, in a later
    // view, and serve them, reads at the old time included.
    cluster.start_all();
    cluster.wait_active();
    check_acked(&cluster, &acked);
    let again = cluster.kv_ok(&["get", "timed", "--at", &t, "-l", "--member", "2"]);
    assert_eq!(again, reads[0]);
    // A later view: 2, or later if a stop that split the group logged a decision removing the
    // first node to stop (the restart adopts it; that node then joins again by itself).
    let after = cluster.kv_ok(&["put", "after-restart", "yes"]);
    let view: u32 = version_of(&after)
        .split_once('.')
        .and_then(|(v, _)| v.parse().ok())
        .expect("a version VIEW.SEQ");
    assert!(view >= 2, "{after}");
    cluster.kv_ok(&["history", "timed"]);
    eprintln!("t10 took {:?}", started.elapsed());
}

/// A cluster whose nodes have a socket directory links every pair of members over Unix-domain
/// sockets, serves clients that have the directory through them and clients that do not over
/// TCP, and removes its socket files when it stops cleanly.
#[test]
fn t11_cluster_with_a_socket_directory_links_locally_and_serves_tcp_clients_too() {
    let cluster = Cluster::new(11, NODES, "suspect_after_ms = 5000\n");
    let sockets = cluster.socket_dir();
    let dir = sockets.display().to_string();
    cluster.start_all();
    cluster.wait_active();
    for node in 1..=NODES {
        let log = cluster.log_of(node);
        let local = log
            .lines()
            .filter(|l| l.contains(" linked ") && l.contains("addr=local:"))
            .count();
        let tcp = log
            .lines()
            .filter(|l| l.contains(" linked ") && !l.contains("addr=local:"))
            .count();
        assert_eq!((local, tcp), (NODES - 1, 0), "node {node}: {log}");
    }
    let sockets_of = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&sockets)
            .expect("socket dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let mut expected: Vec<String> = cluster.addrs.iter().map(|a| format!("{a}.sock")).collect();
    expected.sort();
    assert_eq!(sockets_of(), expected);

    let contacts = cluster.contacts();
    let local = ["--contacts", &contacts, "--local-socket-dir", &dir];
    let run = cluster.run(&[&["kv"][..], &local[..], &["put", "k", "over a socket"]].concat());
    assert_eq!(run.code, 0, "{run:?}");
    let got = cluster.kv_ok(&["get", "k"]); // over TCP
    assert!(got.contains("over a socket"), "{got}");
    let status = cluster.run(&[&["status"][..], &local[..]].concat());
    assert_eq!(status.code, 0, "{status:?}");
    let links: Vec<&str> = status
        .stdout
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().rev().nth(1))
        .collect();
    assert!(
        !links.is_empty() && links.iter().all(|k| *k == "local"),
        "{}",
        status.stdout
    );
    let status = cluster.status(&contacts);
    assert!(
        status
            .stdout
            .lines()
            .skip(2)
            .all(|l| l.split_whitespace().rev().nth(1) == Some("tcp")),
        "{}",
        status.stdout
    );

    cluster.stop_all();
    assert_eq!(
        sockets_of(),
        Vec::<String>::new(),
        "a clean stop removes them"
    );
}

/// A node restarted over its data with another `layout.chunk_size` refuses to start, naming the
/// key and both values, and leaves its logs as they were; with the recorded chunk size again it
/// restarts with the others and serves what was written.
#[test]
fn t12_cluster_a_node_restarted_with_another_chunk_size_refuses_naming_it() {
    let cluster = Cluster::new(
        12,
        NODES,
        "suspect_after_ms = 5000\n\n[layout]\nchunk_size = 1048576\n",
    );
    cluster.start_all();
    cluster.wait_active();
    cluster.kv_ok(&["put", "k", "before"]);
    cluster.stop_all();
    let before = cluster.dump(1);
    assert!(
        before.contains(" chunk 1048576\n") && before.contains("\n  k "),
        "{before}"
    );

    let config = cluster.path("n1.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let changed = text.replace("chunk_size = 1048576", "chunk_size = 65536");
    assert_ne!(changed, text);
    std::fs::write(&config, changed).expect("config");
    cluster.start(1);
    assert_eq!(cluster.wait_exit(1), Some(1), "{}", cluster.log_of(1));
    let log = cluster.log_of(1);
    assert!(
        log.contains("layout.chunk_size = 1048576, the configuration says 65536"),
        "{log}"
    );
    assert_eq!(cluster.dump(1), before, "a refused start changes nothing");

    std::fs::write(&config, text).expect("config");
    cluster.start_all();
    cluster.wait_active();
    let got = cluster.kv_ok(&["get", "k", "--member", "1"]);
    assert_eq!(got.trim(), "before");
}

#[test]
fn t13_cluster_a_member_configured_with_another_chunk_size_links_with_no_one_and_both_sides_say_why(
) {
    let cluster = Cluster::new(13, NODES, "\n[layout]\nchunk_size = 1048576\n");
    let config = cluster.path("n3.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    let changed = text.replace("chunk_size = 1048576", "chunk_size = 65536");
    assert_ne!(changed, text);
    std::fs::write(&config, &changed).expect("config");
    cluster.start_all();
    // Node 3 dials no one (the lower id dials) and refuses nodes 1 and 2; each of them says
    // what differs when its dial is closed.
    for node in 1..=2 {
        cluster.wait_log(
            node,
            "group settings differ from this node's: layout.chunk_size is 1048576 here and 65536 there",
        );
    }
    cluster.wait_log(
        3,
        "group settings differ from this node's: layout.chunk_size is 65536 here and 1048576 there",
    );
    cluster.kill_all();

    std::fs::write(&config, &text).expect("config");
    cluster.start_all();
    cluster.wait_active();
    cluster.kv_ok(&["put", "k", "v"]);
    let got = cluster.kv_ok(&["get", "k", "--member", "3"]);
    assert_eq!(got.trim(), "v");
}
