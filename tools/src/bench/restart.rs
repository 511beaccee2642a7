//! `derechofs bench restart`: total-restart time against log size.
//!
//! For each size, a fresh cluster of three `derechofs node` processes (this same executable) on
//! one loopback address takes closed-loop K/V writes until that many MiB of values are
//! acknowledged; then all three are SIGKILLed at once and started again on their data. It
//! measures, from the moment the processes are started again: the first write acknowledged
//! (the group restarted and takes writes) and every node reporting `active` in `status`.
//! Every process is stopped by its pid when the run ends.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use derechofs_core::kv::KvOp;
use derechofs_core::transport::Secret;

use crate::client::Client;
use crate::config::NodeConfig;
use crate::out::outln;
use crate::table::Table;

/// Nodes of each cluster.
const NODES: usize = 3;
/// Time a fresh cluster has to take its first write.
const FORMING_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a restarted cluster has to take a write and to be active again.
const RESTART_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest size accepted for one run, in MiB.
const MIB_MAX: u64 = 16 << 10;

/// Arguments of `derechofs bench restart`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB of K/V values to write before the kill, one run per size (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    mib: Vec<u64>,
    /// Bytes of each value (1..=1 MiB).
    #[arg(long, default_value_t = 64 << 10)]
    value_bytes: usize,
    /// Closed-loop writers filling the log, each its own client.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Loopback address the nodes listen on.
    #[arg(long, default_value = "127.0.0.92")]
    ip: String,
    /// Scratch directory for the nodes' data (created; each run uses and removes a
    /// subdirectory).
    #[arg(long, default_value = "/tmp/derechofs-bench-restart")]
    dir: PathBuf,
}

/// The node processes of one run (this same executable, `node --config DIR/nID.toml`), killed
/// by pid when dropped. Shared with `bench join`.
pub(super) struct Nodes {
    exe: PathBuf,
    dir: PathBuf,
    children: Vec<Option<Child>>,
}

impl Nodes {
    /// Room for `count` nodes whose configurations are in `dir`; none started yet.
    pub(super) fn new(exe: &Path, dir: &Path, count: usize) -> Nodes {
        Nodes {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            children: (0..count).map(|_| None).collect(),
        }
    }

    /// The process id of node `id` (1-based), if it runs.
    pub(super) fn pid(&self, id: usize) -> Option<u32> {
        self.children[id - 1].as_ref().map(Child::id)
    }

    /// Starts node `id` (1-based) on its configuration; its output is appended to its log.
    pub(super) fn start(&mut self, id: usize) -> anyhow::Result<()> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node{id}.log")))?;
        let child = Command::new(&self.exe)
            .arg("node")
            .arg("--config")
            .arg(self.dir.join(format!("n{id}.toml")))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a node")?;
        self.children[id - 1] = Some(child);
        Ok(())
    }

    /// SIGKILLs node `id` (1-based) and reaps it.
    pub(super) fn kill(&mut self, id: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.children[id - 1].take() {
            child.kill().with_context(|| format!("killing node {id}"))?;
            let _ = child.wait();
        }
        Ok(())
    }

    /// SIGKILLs every node and reaps it.
    pub(super) fn kill_all(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
        }
        for slot in &mut self.children {
            if let Some(mut child) = slot.take() {
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// What one run measured.
struct Run {
    written: u64,
    log_bytes: u64,
    fill: Duration,
    first_write: Duration,
    all_active: Duration,
}

/// Checks the options `bench restart` and `bench join` share: a loopback `ip`, values of 1 byte
/// to 1 MiB, at least one writer, each size in MiB between 1 and [`MIB_MAX`].
pub(super) fn check_fill_args(
    ip: &str,
    value_bytes: usize,
    writers: usize,
    mib: &[u64],
) -> anyhow::Result<()> {
    if !ip.starts_with("127.") {
        bail!("--ip must be a loopback address (127.x.y.z), not {ip}");
    }
    if value_bytes == 0 || value_bytes > 1 << 20 {
        bail!("--value-bytes must be between 1 and 1048576, not {value_bytes}");
    }
    if writers == 0 {
        bail!("--writers must be at least 1");
    }
    if let Some(m) = mib.iter().find(|&&m| m == 0 || m > MIB_MAX) {
        bail!("--mib: each size must be between 1 and {MIB_MAX}, not {m}");
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    check_fill_args(&args.ip, args.value_bytes, args.writers, &args.mib)?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let secret = NodeConfig::default().secret()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    outln!(
        "restart: {NODES} nodes, default configuration (fsync), values of {} bytes from {} \
         writers; all SIGKILLed, then started again",
        args.value_bytes,
        args.writers
    )?;
    let mut table = Table::new(&[
        "MiB written",
        "disk MiB/node",
        "fill s",
        "first write ms",
        "all active ms",
    ]);
    for &mib in &args.mib {
        let dir = args.dir.join(format!("run-{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let result = runtime.block_on(one_run(&args, &exe, &dir, &secret, mib));
        let _ = std::fs::remove_dir_all(&dir);
        let r = result.with_context(|| format!("the run of {mib} MiB"))?;
        table.row(vec![
            format!("{:.1}", r.written as f64 / f64::from(1 << 20)),
            format!("{:.1}", r.log_bytes as f64 / f64::from(1 << 20)),
            format!("{:.1}", r.fill.as_secs_f64()),
            ms(r.first_write),
            ms(r.all_active),
        ])?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Bytes of disk the files under `dir` take (allocated blocks: a log segment's file is longer
/// than what it holds until it fills).
fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Writes `key` until one write is acknowledged; returns when, or fails after `timeout`.
pub(super) async fn first_write(
    contacts: &[String],
    secret: &Secret,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = async {
            let mut client = Client::connect(contacts, secret.clone()).await?;
            let op = KvOp::Put {
                key: Bytes::from_static(b"ready"),
                value: Bytes::from_static(b"1"),
            };
            let done = client.write(op).await;
            client.close().await;
            done
        };
        if attempt.await.is_ok() {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the cluster took no write within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until every node reports `active`; returns when.
async fn all_active(
    contacts: &[String],
    secret: &Secret,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let check = async {
            let mut client = Client::connect(contacts, secret.clone()).await.ok()?;
            let mut active = 0;
            for node in 1..=NODES as u32 {
                if client
                    .status_of(node)
                    .await
                    .is_ok_and(|s| s.state == "active")
                {
                    active += 1;
                }
            }
            client.close().await;
            Some(active == NODES)
        };
        if check.await == Some(true) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("the nodes were not all active within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `count` node configurations under `dir`, starts every node and waits until the
/// cluster takes a write.
pub(super) async fn start_cluster(
    ip: &str,
    exe: &Path,
    dir: &Path,
    secret: &Secret,
    count: usize,
) -> anyhow::Result<(Vec<String>, Nodes)> {
    let addrs = write_configs(ip, dir, count)?;
    let mut nodes = Nodes::new(exe, dir, count);
    for id in 1..=count {
        nodes.start(id)?;
    }
    first_write(&addrs, secret, FORMING_TIMEOUT).await?;
    Ok((addrs, nodes))
}

/// Writes the configurations `DIR/n1.toml` … of `count` nodes, all in `members`, listening on
/// ports of `ip` the kernel picks, each with its data in `DIR/dataID`, linked over TCP only
/// (`transport.local_socket_dir = ""`) and the defaults for the rest; returns their addresses in
/// id order.
pub(super) fn write_configs(ip: &str, dir: &Path, count: usize) -> anyhow::Result<Vec<String>> {
    // Ports the kernel picks on the address, released just before the nodes bind them.
    let listeners: Vec<TcpListener> = (0..count)
        .map(|_| TcpListener::bind(format!("{ip}:0")))
        .collect::<Result<_, _>>()
        .with_context(|| format!("binding ports on {ip}"))?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()?;
    drop(listeners);
    let members: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  {{ id = {}, addr = \"{a}\" }},", i + 1))
        .collect();
    for (i, addr) in addrs.iter().enumerate() {
        std::fs::write(
            dir.join(format!("n{}.toml", i + 1)),
            // Over TCP, as these benchmarks always measured: the nodes they kill would leave
            // their socket files behind in the default local socket directory.
            format!(
                "node_id = {}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nmembers = [\n{}\n]\n\n\
                 [transport]\nlocal_socket_dir = \"\"\n",
                i + 1,
                dir.join(format!("data{}", i + 1)).display(),
                members.join("\n")
            ),
        )?;
    }
    Ok(addrs)
}

/// Closed-loop writers, each its own client, put values of `value_bytes` under fresh keys
/// `wW/N` until `target` bytes of values are acknowledged; returns the bytes acknowledged.
pub(super) async fn fill(
    contacts: &[String],
    secret: &Secret,
    target: u64,
    value_bytes: usize,
    writers: usize,
) -> anyhow::Result<u64> {
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = Client::connect(contacts, secret.clone()).await?;
        let written = written.clone();
        let value = Bytes::from(vec![b'x'; value_bytes]);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while written.load(Ordering::Relaxed) < target {
                let op = KvOp::Put {
                    key: Bytes::from(format!("w{w}/{n}")),
                    value: value.clone(),
                };
                n += 1;
                client
                    .write(op)
                    .await
                    .map_err(|e| anyhow::anyhow!("writer {w}: {e}"))?;
                written.fetch_add(value.len() as u64, Ordering::Relaxed);
            }
            client.close().await;
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("a writer task")??;
    }
    Ok(written.load(Ordering::Relaxed))
}

async fn one_run(
    args: &Args,
    exe: &Path,
    dir: &Path,
    secret: &Secret,
    mib: u64,
) -> anyhow::Result<Run> {
    let (addrs, mut nodes) = start_cluster(&args.ip, exe, dir, secret, NODES).await?;

    let filling = Instant::now();
    let written = fill(&addrs, secret, mib << 20, args.value_bytes, args.writers).await?;
    let fill = filling.elapsed();

    nodes.kill_all();
    let log_bytes = dir_bytes(&dir.join("data1"));
    let started = Instant::now();
    for id in 1..=NODES {
        nodes.start(id)?;
    }
    let (first, active) = tokio::join!(
        first_write(&addrs, secret, RESTART_TIMEOUT),
        all_active(&addrs, secret, RESTART_TIMEOUT)
    );
    Ok(Run {
        written,
        log_bytes,
        fill,
        first_write: first?.duration_since(started),
        all_active: active?.duration_since(started),
    })
}
