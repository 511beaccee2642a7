//! Multi-process tests: three `derechofs node` processes on loopback, driven through the
//! `derechofs kv` and `derechofs status` commands, as a person would from the README.
//!
//! Each cluster takes its own address `127.0.0.X` (X from the process id and the test) and
//! ports the kernel picked, so tests and concurrent runs do not collide. Every process is
//! stopped by its pid when the test ends, failed or not, and every wait is bounded.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_derechofs");
/// Longest a single command may run before it is killed and the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a cluster may take to link its members.
const FORMING_TIMEOUT: Duration = Duration::from_secs(30);
const NODES: usize = 3;

static RUN: AtomicU64 = AtomicU64::new(0);

/// What a command printed and how it ended.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

struct Cluster {
    dir: tempfile::TempDir,
    addrs: Vec<String>,
    nodes: Vec<Option<Child>>,
}

fn pick_ip(test: u8) -> String {
    // Spread over 127.0.0.16..=127.0.0.250 by process and test.
    let x = 16 + (std::process::id() as u64 * 7 + u64::from(test) * 31) % 235;
    format!("127.0.0.{x}")
}

impl Cluster {
    /// Writes the configurations of a 3-node cluster; `suspect_after_ms` is generous so a
    /// loaded test machine does not wedge the cluster by accident.
    fn new(test: u8) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ip = pick_ip(test);
        // Ports the kernel picks on this address, released just before the nodes bind them.
        let listeners: Vec<TcpListener> = (0..NODES)
            .map(|_| TcpListener::bind(format!("{ip}:0")).expect("a free port"))
            .collect();
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("address").to_string())
            .collect();
        let members: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  {{ id = {}, addr = \"{a}\" }},", i + 1))
            .collect();
        for (i, addr) in addrs.iter().enumerate() {
            let config = format!(
                "node_id = {}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nsuspect_after_ms = 5000\n\
                 time_read_wait_ms = 5000\nmembers = [\n{}\n]\n",
                i + 1,
                dir.path().join(format!("data{}", i + 1)).display(),
                members.join("\n")
            );
            std::fs::write(dir.path().join(format!("n{}.toml", i + 1)), config).expect("config");
        }
        drop(listeners);
        Cluster {
            dir,
            addrs,
            nodes: (0..NODES).map(|_| None).collect(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn contacts(&self) -> String {
        self.addrs.join(",")
    }

    fn start_all(&mut self) {
        for i in 0..NODES {
            let log = File::options()
                .create(true)
                .append(true)
                .open(self.path(&format!("node{}.log", i + 1)))
                .expect("log file");
            let child = Command::new(BIN)
                .arg("node")
                .arg("--config")
                .arg(self.path(&format!("n{}.toml", i + 1)))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .spawn()
                .expect("start derechofs node");
            self.nodes[i] = Some(child);
        }
    }

    /// Stops every node: SIGTERM, then SIGKILL if it has not exited within a few seconds.
    fn stop_all(&mut self) {
        for child in self.nodes.iter().flatten() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for slot in &mut self.nodes {
            if let Some(mut child) = slot.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Kills one node at once.
    fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node - 1].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs `derechofs ARGS…`, bounded by `COMMAND_TIMEOUT`.
    fn run(&self, args: &[&str]) -> Run {
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let out = self.path(&format!("run{n}.out"));
        let err = self.path(&format!("run{n}.err"));
        let mut child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&out).expect("output file"))
            .stderr(File::create(&err).expect("output file"))
            .spawn()
            .expect("run derechofs");
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("derechofs {args:?} did not finish in {COMMAND_TIMEOUT:?}");
                }
            }
        };
        let run = Run {
            code: status.code().unwrap_or(-1),
            stdout: std::fs::read_to_string(&out).unwrap_or_default(),
            stderr: std::fs::read_to_string(&err).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(out);
        let _ = std::fs::remove_file(err);
        run
    }

    fn kv(&self, args: &[&str]) -> Run {
        let contacts = self.contacts();
        let mut all = vec!["kv", "--contacts", &contacts];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `kv ARGS` that must succeed; returns its output.
    fn kv_ok(&self, args: &[&str]) -> String {
        let run = self.kv(args);
        assert_eq!(run.code, 0, "kv {args:?}: {run:?}");
        run.stdout
    }

    /// Starts `derechofs kv watch PREFIX --count N` and waits until its watch is registered;
    /// returns the process and the file its output goes to.
    fn watch(&self, prefix: &str, count: usize) -> (Child, PathBuf) {
        let out = self.path("watch.out");
        let err = self.path("watch.err");
        let contacts = self.contacts();
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
            .stdout(File::create(&out).expect("output file"))
            .stderr(File::create(&err).expect("output file"))
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

    /// Waits until every member reports `active`.
    fn wait_active(&self) {
        let deadline = Instant::now() + FORMING_TIMEOUT;
        loop {
            let contacts = self.contacts();
            let run = self.run(&["status", "--contacts", &contacts]);
            let active = run
                .stdout
                .lines()
                .filter(|l| l.contains(" active "))
                .count();
            if run.code == 0 && active >= NODES {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not become active: {run:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn dump(&self, node: usize) -> String {
        let dir = self.path(&format!("data{node}"));
        let run = self.run(&["dump", "--data-dir", dir.to_str().expect("utf-8 path")]);
        assert_eq!(run.code, 0, "dump of node {node}: {run:?}");
        run.stdout
    }

    fn logs(&self) -> String {
        (1..=NODES)
            .map(|i| {
                let text =
                    std::fs::read_to_string(self.path(&format!("node{i}.log"))).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- node {i} ---\n{}\n", tail.join("\n"))
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

fn unix_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// The version printed by a write: `version VIEW.SEQ stamp …`.
fn version_of(output: &str) -> String {
    output
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {output:?}"))
        .to_string()
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
    let mut cluster = Cluster::new(10);
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
    let (mut watcher, out) = cluster.watch("w/", 4);
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
    let after = cluster.kv_ok(&["put", "after-restart", "yes"]);
    assert!(version_of(&after).starts_with("2."), "{after}");
    cluster.kv_ok(&["history", "timed"]);
    eprintln!("t10 took {:?}", started.elapsed());
}

#[test]
fn t20_cluster_a_lost_member_wedges_writes_and_reads_go_on() {
    let mut cluster = Cluster::new(20);
    cluster.start_all();
    cluster.wait_active();
    cluster.kv_ok(&["put", "k", "v"]);
    cluster.kill(3);
    // Suspicion comes after `suspect_after_ms` of silence.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut contacts = cluster.addrs.clone();
    contacts.truncate(2);
    let contacts = contacts.join(",");
    loop {
        let run = cluster.run(&["kv", "--contacts", &contacts, "put", "k", "w"]);
        if run.code != 0 && run.stderr.contains("Wedged") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes were not refused: {run:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for member in ["1", "2"] {
        let run = cluster.run(&[
            "kv",
            "--contacts",
            &contacts,
            "get",
            "k",
            "--member",
            member,
        ]);
        assert_eq!(run.code, 0, "{run:?}");
        assert!(["v", "w"].contains(&run.stdout.trim()), "{run:?}");
    }
}
