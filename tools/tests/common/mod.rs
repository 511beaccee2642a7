//! A cluster of `derechofs node` processes on loopback for multi-process tests, driven through
//! the `derechofs kv`, `status` and `dump` commands as a person would.
//!
//! Each cluster takes its own address `127.0.0.X` (X from the process id and the test) and
//! ports the kernel picked, so tests and concurrent runs do not collide. Every process is
//! stopped by its pid when the test ends, failed or not, and every wait is bounded.

#![allow(dead_code)]

use std::cell::RefCell;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_derechofs");
/// Longest a single command may run before it is killed and the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a cluster may take to reach a state the test waits for.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(30);

static RUN: AtomicU64 = AtomicU64::new(0);

/// The secret the nodes use when none is configured (`docs/CONFIG.md`).
pub const DEVELOPMENT_SECRET: &[u8] = b"derechofs development secret: set secret_file";
/// Longest a cluster may take to serve its first file system request.
pub const FORMING_TIMEOUT: Duration = Duration::from_secs(30);

/// `RemoteShards` over `config` once the cluster answers (waiting at most `FORMING_TIMEOUT`).
pub fn connect_remote(config: derechofs_client::RemoteConfig) -> derechofs_client::RemoteShards {
    let deadline = Instant::now() + FORMING_TIMEOUT;
    loop {
        match derechofs_client::RemoteShards::connect(config.clone()) {
            Ok(remote) => return remote,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for the cluster: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("the cluster did not answer: {e}"),
        }
    }
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// Every node's address by id - 1: the members', then the joiners'.
    pub addrs: Vec<String>,
    /// Nodes 1..=members are the configured `members`; the others are not in it and join.
    members: usize,
    /// The node processes by id - 1; behind a lock so faults run beside client threads.
    nodes: Mutex<Vec<Option<Child>>>,
}

thread_local! {
    /// The last panic message of this thread, kept by the hook `keep_panic_messages` installs.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once per process) a panic hook that also keeps the message for this thread, so a
/// cluster dropped while its test fails can print the message again after the nodes' logs: a
/// runner that shows only the end of a failed test's output then still shows why it failed.
fn keep_panic_messages() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let location = info
                .location()
                .map_or(String::new(), |l| format!("at {}:{}: ", l.file(), l.line()));
            let message = info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{location}{message}")));
            default(info);
        }));
    });
}

fn pick_ip(test: u8) -> String {
    // Spread over 127.0.0.16..=127.0.0.250 by process and test.
    let x = 16 + (std::process::id() as u64 * 7 + u64::from(test) * 31) % 235;
    format!("127.0.0.{x}")
}

impl Cluster {
    /// Writes the configurations of an `n`-node cluster; `extra` is appended to every node's
    /// configuration (TOML lines, after the top-level keys it sets).
    pub fn new(test: u8, n: usize, extra: &str) -> Cluster {
        Cluster::with_joiners(test, n, 0, extra)
    }

    /// As `new`, with `joiners` more nodes (ids `n + 1`…) that are not in `members`: each
    /// joins through node 2 (its `contacts`), announcing its own `listen` address.
    pub fn with_joiners(test: u8, n: usize, joiners: usize, extra: &str) -> Cluster {
        keep_panic_messages();
        let dir = tempfile::tempdir().expect("temp dir");
        let ip = pick_ip(test);
        // Ports the kernel picks on this address, released just before the nodes bind them.
        let listeners: Vec<TcpListener> = (0..n + joiners)
            .map(|_| TcpListener::bind(format!("{ip}:0")).expect("a free port"))
            .collect();
        let addrs: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().expect("address").to_string())
            .collect();
        let members: Vec<String> = addrs[..n]
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  {{ id = {}, addr = \"{a}\" }},", i + 1))
            .collect();
        for (i, addr) in addrs.iter().enumerate() {
            let contacts = if i < n {
                String::new()
            } else {
                format!("contacts = [\"{}\"]\n", addrs[1.min(n - 1)])
            };
            // Socket files of its own, so nodes a test kills leave none behind elsewhere.
            let config = format!(
                "node_id = {}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\n{contacts}members = [\n{}\n]\n{extra}\n\n\
                 [transport]\nlocal_socket_dir = \"{}\"\n",
                i + 1,
                dir.path().join(format!("data{}", i + 1)).display(),
                members.join("\n"),
                dir.path().join("s").display()
            );
            std::fs::write(dir.path().join(format!("n{}.toml", i + 1)), config).expect("config");
        }
        drop(listeners);
        Cluster {
            dir,
            addrs,
            members: n,
            nodes: Mutex::new((0..n + joiners).map(|_| None).collect()),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, Vec<Option<Child>>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pid of node `node`, if it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes()[node - 1].as_ref().map(Child::id)
    }

    pub fn size(&self) -> usize {
        self.addrs.len()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client configuration for this cluster's members, with the development secret.
    pub fn remote_config(&self) -> derechofs_client::RemoteConfig {
        let secret = derechofs_core::transport::Secret::new(DEVELOPMENT_SECRET).expect("a secret");
        derechofs_client::RemoteConfig::new(self.addrs.clone(), secret)
    }

    /// The directory of the nodes' socket files (`transport.local_socket_dir`).
    pub fn socket_dir(&self) -> PathBuf {
        self.path("s")
    }

    /// Every configured member's address, `host:port,...`.
    pub fn contacts(&self) -> String {
        self.addrs[..self.members].join(",")
    }

    /// The addresses of `nodes` (1-based ids), `host:port,...`.
    pub fn contacts_of(&self, nodes: &[usize]) -> String {
        let addrs: Vec<&str> = nodes.iter().map(|&n| self.addrs[n - 1].as_str()).collect();
        addrs.join(",")
    }

    /// Starts node `node` (1-based); its output goes to `nodeN.log`.
    pub fn start(&self, node: usize) {
        assert!(self.nodes()[node - 1].is_none(), "node {node} runs already");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.path(&format!("node{node}.log")))
            .expect("log file");
        let child = Command::new(BIN)
            .arg("node")
            .arg("--config")
            .arg(self.path(&format!("n{node}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start derechofs node");
        self.nodes()[node - 1] = Some(child);
    }

    /// Starts the configured members (not the joiners).
    pub fn start_all(&self) {
        for node in 1..=self.members {
            self.start(node);
        }
    }

    /// Stops every node: SIGTERM, then SIGKILL if it has not exited within a few seconds.
    pub fn stop_all(&self) {
        let mut nodes = self.nodes();
        for child in nodes.iter().flatten() {
            signal(child, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for slot in nodes.iter_mut() {
            if let Some(mut child) = slot.take() {
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Waits until node `node` exits by itself; returns its exit code (None if killed by a
    /// signal). Fails the test if it still runs after `WAIT_TIMEOUT`.
    pub fn wait_exit(&self, node: usize) -> Option<i32> {
        poll(
            Duration::from_millis(20),
            || {
                let mut nodes = self.nodes();
                let child = nodes[node - 1].as_mut().expect("the node was started");
                match child.try_wait().expect("the node's status") {
                    Some(status) => {
                        nodes[node - 1] = None;
                        Ok(status.code())
                    }
                    None => Err(()),
                }
            },
            |()| format!("node {node} did not exit"),
        )
    }

    /// Kills every running node at once (SIGKILL to each, then reaps them): no node outlives
    /// the others long enough to act on their deaths (suspect them and log a decision).
    pub fn kill_all(&self) {
        let mut nodes = self.nodes();
        for child in nodes.iter_mut().flatten() {
            let _ = child.kill();
        }
        for slot in nodes.iter_mut() {
            if let Some(mut child) = slot.take() {
                let _ = child.wait();
            }
        }
    }

    /// Kills node `node` at once (SIGKILL) and reaps it.
    pub fn kill(&self, node: usize) {
        let child = self.nodes()[node - 1].take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `node` (SIGSTOP): it falls silent with its links open, as a hung machine.
    /// The process is killed when the cluster is dropped or `kill`ed.
    pub fn freeze(&self, node: usize) {
        if let Some(child) = &self.nodes()[node - 1] {
            signal(child, "STOP");
        }
    }

    /// Lets a frozen node go on (SIGCONT).
    pub fn thaw(&self, node: usize) {
        if let Some(child) = &self.nodes()[node - 1] {
            signal(child, "CONT");
        }
    }

    /// What node `node` has logged so far (every run of it).
    pub fn log_of(&self, node: usize) -> String {
        std::fs::read_to_string(self.path(&format!("node{node}.log"))).unwrap_or_default()
    }

    /// Waits until node `node` has logged a line containing `text`.
    pub fn wait_log(&self, node: usize, text: &str) {
        poll(
            Duration::from_millis(2),
            || self.log_of(node).contains(text).then_some(()).ok_or(()),
            |()| format!("node {node} did not log {text:?}"),
        )
    }

    /// Runs `derechofs ARGS…`, bounded by `COMMAND_TIMEOUT`.
    pub fn run(&self, args: &[&str]) -> Run {
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

    /// `derechofs kv --contacts CONTACTS ARGS…`.
    pub fn kv_via(&self, contacts: &str, args: &[&str]) -> Run {
        let mut all = vec!["kv", "--contacts", contacts];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// `derechofs kv ARGS…` through every member.
    pub fn kv(&self, args: &[&str]) -> Run {
        self.kv_via(&self.contacts(), args)
    }

    /// `kv ARGS` that must succeed; returns its output.
    pub fn kv_ok(&self, args: &[&str]) -> String {
        let run = self.kv(args);
        assert_eq!(run.code, 0, "kv {args:?}: {run:?}");
        run.stdout
    }

    /// `derechofs status` through `contacts`.
    pub fn status(&self, contacts: &str) -> Run {
        self.run(&["status", "--contacts", contacts])
    }

    /// Waits until `check` accepts the output of `status` through `contacts` (which fails
    /// when a member cannot be reached, and prints the table all the same).
    pub fn wait_status(&self, contacts: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        poll(
            Duration::from_millis(50),
            || {
                let run = self.status(contacts);
                if check(&run.stdout) {
                    Ok(run.stdout)
                } else {
                    Err(run)
                }
            },
            |run| format!("{what}: {run:?}"),
        )
    }

    /// Waits until every configured member reports `active`.
    pub fn wait_active(&self) {
        let n = self.members;
        self.wait_status(
            &self.contacts(),
            "the cluster did not become active",
            |out| out.lines().filter(|l| l.contains(" active ")).count() >= n,
        );
    }

    /// `derechofs dump` of node `node`'s data directory (the node must be stopped).
    pub fn dump(&self, node: usize) -> String {
        let dir = self.path(&format!("data{node}"));
        let run = self.run(&["dump", "--data-dir", dir.to_str().expect("utf-8 path")]);
        assert_eq!(run.code, 0, "dump of node {node}: {run:?}");
        run.stdout
    }

    /// The last lines of every node's log.
    pub fn logs(&self) -> String {
        (1..=self.size())
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

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.nodes().iter().flatten() {
            // A frozen node would not act on SIGTERM: let it go on first.
            signal(child, "CONT");
        }
        self.stop_all();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if let Some(message) = LAST_PANIC.with(|p| p.borrow_mut().take()) {
                // The message is long when it holds the logs too: its first lines say enough.
                let head: Vec<&str> = message.lines().take(12).collect();
                eprintln!("--- the test failed ---\n{}", head.join("\n"));
            }
        }
    }
}

/// The current time as Unix seconds with microseconds, for `--at`.
/// Calls `attempt` every `every` until it gives `Ok`, and returns what it gave; once
/// `WAIT_TIMEOUT` has passed, fails the test with `failed` of the last `Err`.
pub fn poll<T, E>(
    every: Duration,
    mut attempt: impl FnMut() -> Result<T, E>,
    failed: impl FnOnce(E) -> String,
) -> T {
    let deadline = Instant::now() + WAIT_TIMEOUT;
    loop {
        match attempt() {
            Ok(done) => return done,
            Err(last) if Instant::now() >= deadline => panic!("{}", failed(last)),
            Err(_) => std::thread::sleep(every),
        }
    }
}

pub fn unix_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

/// The version printed by a write: `version VIEW.SEQ stamp …`.
pub fn version_of(output: &str) -> String {
    output
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {output:?}"))
        .to_string()
}

/// Whether `path` (made canonical where it can be) is a mount point in this process's mount
/// table.
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}
