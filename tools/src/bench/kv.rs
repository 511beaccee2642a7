//! `derechofs bench kv`: closed-loop K/V load on a cluster of three real `derechofs node`
//! processes that this command starts on loopback and stops by pid.
//!
//! Every client is a tokio task with its own [`Client`] (its own client id and request numbers)
//! and one request outstanding. The clients share `--conns` sets of links (default: one per
//! client up to 16, as `bench/etcd-load` shares its gRPC connections): client `i` uses set
//! `i mod conns`, which holds one pipelined link per member, so requests of several clients
//! travel on one connection. Writes are acknowledged once durable on every replica: the nodes run
//! with `persistence.policy = "fsync"` unless `--sync` says otherwise. Each run prints one
//! Markdown row in the format of `bench/etcd-load`, so `bench/kv.sh` puts both systems in one
//! table: `| system | workload | value | clients | ops/s | p50 ms | p99 ms |`.
//!
//! Workloads:
//! - `put`: each client puts random keys of a key space of `--keys`;
//! - `cas`: each client conditionally puts its own `--keys-per-client` keys in turn, expecting
//!   the version it read before the run or last wrote; ops/s counts successes;
//! - `contended-cas`: every client conditionally puts one shared key, expecting the version it
//!   last learned (by its own success, or from the conflict reply, which carries the key's
//!   current version); ops/s counts successes only, and the row says so.
//!
//! Latencies are those of every completed request (success or conflict), from a histogram.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use derechofs_core::kv::{KvOp, KvReply, ReadAt};
use derechofs_core::transport::Secret;
use derechofs_core::Version;

use super::histogram::Histogram;
use crate::client::{random_id, Client, Links};
use crate::out::{errln, outln};

/// Nodes of the benchmark cluster: one shard of three replicas.
const NODES: usize = 3;
/// Longest the cluster may take to start and link its members.
const FORMING_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a node may take to exit after SIGTERM before it gets SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the clients may run past the deadline (their last request, retries included).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(70);
/// Pause of a client after a failed request, so a failing cluster is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(20);
/// Sets of shared links when `--conns` is not given, at most: one per client up to this many
/// (what `bench/etcd-load` does with its gRPC connections).
const CONNS_DEFAULT_MAX: usize = 16;
/// Bounds of the arguments.
const CLIENTS_MAX: usize = 1024;
const VALUE_BYTES_MAX: usize = 1 << 20;
const SECONDS_MAX: f64 = 3600.0;

/// A K/V workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Unconditional puts of random keys.
    Put,
    /// Conditional puts, each client on its own keys.
    Cas,
    /// Conditional puts of one key by every client; counts successes.
    ContendedCas,
}

impl Workload {
    fn label(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Cas => "cas",
            Workload::ContendedCas => "contended-cas (successes/s)",
        }
    }
}

/// When the nodes make their logs durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sync {
    /// Every commit syncs: an acknowledged write is fsynced on all three replicas.
    Fsync,
    /// At most every 2 ms.
    Batch,
    /// Never (volatile; acknowledgements say nothing about the disk).
    None,
}

/// Arguments of `derechofs bench kv`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory for the nodes' configurations, data and logs (created; left in place).
    #[arg(long)]
    dir: PathBuf,
    /// The workload.
    #[arg(long, value_enum, default_value_t = Workload::Put)]
    workload: Workload,
    /// Bytes of each value.
    #[arg(long, default_value_t = 100)]
    value_bytes: usize,
    /// Closed-loop clients, one request outstanding each.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Sets of links the clients share (each a pipelined link per member); default
    /// min(clients, 16), as `bench/etcd-load` shares gRPC connections.
    #[arg(long)]
    conns: Option<usize>,
    /// Seconds each run lasts.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Run the whole matrix of the K/V benchmark (put 100 B and 4 KiB with 1 and 64 clients,
    /// cas with 1 and 64, contended-cas with 16), each on a fresh cluster, instead of one run.
    #[arg(long)]
    matrix: bool,
    /// The nodes' persistence policy.
    #[arg(long, value_enum, default_value_t = Sync::Fsync)]
    sync: Sync,
    /// Key space of the put workload.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Keys each client owns in the cas workload.
    #[arg(long, default_value_t = 8)]
    keys_per_client: u64,
    /// Loopback address the nodes listen on (ports are picked by the kernel).
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    address: IpAddr,
    /// Label of the first column.
    #[arg(long, default_value = "derechofs")]
    system: String,
    /// Print the table header before the row.
    #[arg(long)]
    header: bool,
    /// Link the nodes with each other and with the clients over Unix-domain sockets in this
    /// directory (`transport.local_socket_dir`). Default "": over loopback TCP, as etcd is
    /// measured.
    #[arg(long, default_value = "", value_parser = crate::kv::parse_local_socket_dir_arg)]
    local_socket_dir: crate::kv::LocalSocketDir,
}

/// One run of the matrix.
#[derive(Clone, Copy, Debug)]
struct RunSpec {
    workload: Workload,
    value_bytes: usize,
    clients: usize,
}

/// The matrix of the K/V benchmark, the same rows `bench/kv.sh` runs on etcd.
const MATRIX: [RunSpec; 7] = [
    RunSpec {
        workload: Workload::Put,
        value_bytes: 100,
        clients: 1,
    },
    RunSpec {
        workload: Workload::Put,
        value_bytes: 100,
        clients: 64,
    },
    RunSpec {
        workload: Workload::Put,
        value_bytes: 4096,
        clients: 1,
    },
    RunSpec {
        workload: Workload::Put,
        value_bytes: 4096,
        clients: 64,
    },
    RunSpec {
        workload: Workload::Cas,
        value_bytes: 100,
        clients: 1,
    },
    RunSpec {
        workload: Workload::Cas,
        value_bytes: 100,
        clients: 64,
    },
    RunSpec {
        workload: Workload::ContendedCas,
        value_bytes: 100,
        clients: 16,
    },
];

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.address.is_loopback() {
        bail!("--address must be a loopback address, got {}", args.address);
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= SECONDS_MAX) {
        bail!(
            "--seconds must be in (0, {SECONDS_MAX}], got {}",
            args.seconds
        );
    }
    if args.clients == 0 || args.clients > CLIENTS_MAX {
        bail!(
            "--clients must be in 1..={CLIENTS_MAX}, got {}",
            args.clients
        );
    }
    if args.value_bytes > VALUE_BYTES_MAX {
        bail!(
            "--value-bytes must be at most {VALUE_BYTES_MAX}, got {}",
            args.value_bytes
        );
    }
    if args.keys == 0 || args.keys_per_client == 0 {
        bail!("--keys and --keys-per-client must be at least 1");
    }
    if args.conns == Some(0) {
        bail!("--conns must be at least 1");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let specs: Vec<RunSpec> = if args.matrix {
        MATRIX.to_vec()
    } else {
        vec![RunSpec {
            workload: args.workload,
            value_bytes: args.value_bytes,
            clients: args.clients,
        }]
    };
    if args.header || args.matrix {
        outln!("| system | workload | value | clients | ops/s | p50 ms | p99 ms |")?;
        outln!("|---|---|---|---:|---:|---:|---:|")?;
    }
    for (i, spec) in specs.iter().enumerate() {
        let dir = if args.matrix {
            args.dir.join(format!("run{}", i + 1))
        } else {
            args.dir.clone()
        };
        let cluster = Cluster::start(&dir, args.address, args.sync, &args.local_socket_dir.0)?;
        let outcome = runtime.block_on(measure(&args, *spec, &cluster));
        cluster.stop();
        let outcome = outcome?;
        outln!(
            "| {} | {} | {} | {} | {:.0} | {:.3} | {:.3} |",
            args.system,
            spec.workload.label(),
            value_label(spec.value_bytes),
            spec.clients,
            outcome.successes as f64 / outcome.elapsed.as_secs_f64(),
            outcome.latency.percentile_ms(50.0),
            outcome.latency.percentile_ms(99.0),
        )?;
        errln!(
            "# {} {} {} x{}: {} successes, {} failed compares, {} errors in {:.1} s",
            args.system,
            spec.workload.label(),
            value_label(spec.value_bytes),
            spec.clients,
            outcome.successes,
            outcome.conflicts,
            outcome.errors,
            outcome.elapsed.as_secs_f64(),
        );
        if outcome.conflicts > 0 {
            errln!(
                "# failed compares: p50 {:.3} ms, p99 {:.3} ms",
                outcome.conflict_latency.percentile_ms(50.0),
                outcome.conflict_latency.percentile_ms(99.0),
            );
        }
        if let Some(e) = &outcome.last_error {
            errln!("# last error: {e}");
        }
        if outcome.successes == 0 {
            bail!(
                "no request succeeded; the nodes' logs are in {}",
                dir.display()
            );
        }
        if args.matrix {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// "100 B", "4 KiB".
pub fn value_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes % 1024 == 0 {
        if bytes >= 1 << 20 && bytes % (1 << 20) == 0 {
            return format!("{} MiB", bytes >> 20);
        }
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

/// Three node processes, stopped by pid when dropped.
#[derive(Debug)]
struct Cluster {
    dir: PathBuf,
    contacts: Vec<String>,
    /// The directory of the nodes' local sockets (`None`: TCP only).
    local_dir: Option<PathBuf>,
    children: Vec<Child>,
}

impl Cluster {
    /// Writes the configurations, starts the nodes, and waits until every one is active.
    fn start(
        dir: &Path,
        address: IpAddr,
        sync: Sync,
        local_dir: &Option<PathBuf>,
    ) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Ports the kernel picks, released just before the nodes bind them.
        let listeners = (0..NODES)
            .map(|_| TcpListener::bind(SocketAddr::new(address, 0)))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("picking ports on {address}"))?;
        let addrs = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<Vec<_>, _>>()
            .context("reading the picked ports")?;
        drop(listeners);
        let members: Vec<String> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("  {{ id = {}, addr = \"{a}\" }},", i + 1))
            .collect();
        let policy = match sync {
            Sync::Fsync => "policy = \"fsync\"",
            Sync::Batch => "policy = \"batch\"\nbatch_ms = 2",
            Sync::None => "policy = \"none\"",
        };
        let exe = std::env::current_exe().context("finding the derechofs executable")?;
        let mut cluster = Cluster {
            dir: dir.to_path_buf(),
            contacts: addrs.iter().map(|a| a.to_string()).collect(),
            local_dir: local_dir.clone(),
            children: Vec::new(),
        };
        for (i, addr) in addrs.iter().enumerate() {
            let id = i + 1;
            let data = dir.join(format!("data{id}"));
            let config = format!(
                "node_id = {id}\nlisten = \"{addr}\"\ndata_dir = {:?}\n\
                 # Generous, so a loaded machine does not wedge the cluster in a long run.\n\
                 suspect_after_ms = 5000\nmembers = [\n{}\n]\n\n[persistence]\n{policy}\n\n\
                 [transport]\nlocal_socket_dir = {:?}\n",
                data.display().to_string(),
                members.join("\n"),
                local_dir
                    .as_ref()
                    .map_or(String::new(), |d| d.display().to_string())
            );
            let path = dir.join(format!("n{id}.toml"));
            std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
            let log_path = dir.join(format!("node{id}.log"));
            let log = File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let child = Command::new(&exe)
                .arg("node")
                .arg("--config")
                .arg(&path)
                .env(
                    "DERECHOFS_LOG",
                    std::env::var("DERECHOFS_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone().context("opening the node log")?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {} node", exe.display()))?;
            cluster.children.push(child);
        }
        cluster.wait_active()?;
        Ok(cluster)
    }

    fn wait_active(&mut self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let deadline = Instant::now() + FORMING_TIMEOUT;
        loop {
            for (i, child) in self.children.iter_mut().enumerate() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!(
                        "node {} exited ({status}) while starting; its log:\n{}",
                        i + 1,
                        tail(&self.dir.join(format!("node{}.log", i + 1)))
                    );
                }
            }
            let last = match runtime.block_on(all_active(&self.contacts, &self.local_dir)) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!(
                    "the cluster did not become active within {} s: {last}",
                    FORMING_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops every node: SIGTERM, then SIGKILL if it has not exited in time.
    fn stop(mut self) {
        self.stop_children();
    }

    fn stop_children(&mut self) {
        for child in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for mut child in self.children.drain(..) {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                errln!("# node pid {} did not stop in time; killing it", child.id());
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_children();
    }
}

/// The last lines of a log, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn secret() -> anyhow::Result<Secret> {
    crate::kv::secret(&None)
}

async fn all_active(contacts: &[String], local_dir: &Option<PathBuf>) -> Result<(), String> {
    let secret = secret().map_err(|e| e.to_string())?;
    let mut client = Client::connect_via(contacts, secret, local_dir.clone())
        .await
        .map_err(|e| e.to_string())?;
    let nodes: Vec<_> = client.layout().members.iter().map(|m| m.0).collect();
    let mut result = Ok(());
    for node in nodes {
        match client.status_of(node).await {
            Ok(s) if s.state == "active" => {}
            Ok(s) => {
                result = Err(format!("node {node} is {}", s.state));
                break;
            }
            Err(e) => {
                result = Err(e.to_string());
                break;
            }
        }
    }
    client.close().await;
    result
}

/// What the clients measured together.
#[derive(Debug, Default)]
struct Outcome {
    latency: Histogram,
    /// Latency of the conditional puts that failed their compare (also in `latency`).
    conflict_latency: Histogram,
    successes: u64,
    conflicts: u64,
    errors: u64,
    last_error: Option<String>,
    elapsed: Duration,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.latency.merge(&other.latency);
        self.conflict_latency.merge(&other.conflict_latency);
        self.successes += other.successes;
        self.conflicts += other.conflicts;
        self.errors += other.errors;
        if other.last_error.is_some() {
            self.last_error = other.last_error;
        }
    }
}

/// A small xorshift generator, seeded per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One client's state: its keys and the versions it expects them at.
struct Load {
    client: Client,
    spec: RunSpec,
    id: usize,
    value: Bytes,
    keys: u64,
    /// The keys it conditionally puts, with the version it expects each at.
    owned: Vec<(Bytes, Option<Version>)>,
}

async fn measure(args: &Args, spec: RunSpec, cluster: &Cluster) -> anyhow::Result<Outcome> {
    let value = Bytes::from(vec![b'v'; spec.value_bytes]);
    let conns = args
        .conns
        .unwrap_or(CONNS_DEFAULT_MAX)
        .min(spec.clients)
        .max(1);
    let shared: Vec<Arc<Links>> = (0..conns)
        .map(|_| {
            Ok(Links::new(
                random_id(),
                secret()?,
                cluster.local_dir.clone(),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    // Connect every client and read the keys it will conditionally put, before the clock runs.
    let mut loads = Vec::with_capacity(spec.clients);
    for id in 0..spec.clients {
        let links = shared[id % conns].clone();
        let mut client = Client::connect_shared(&cluster.contacts, links)
            .await
            .context("connecting a client")?;
        let names: Vec<Bytes> = match spec.workload {
            Workload::Put => Vec::new(),
            Workload::Cas => (0..args.keys_per_client)
                .map(|k| Bytes::from(format!("bench/cas/{id:04}/{k:04}")))
                .collect(),
            Workload::ContendedCas => vec![Bytes::from_static(b"bench/contended")],
        };
        let mut owned = Vec::with_capacity(names.len());
        for key in names {
            let read = client
                .get(&key, ReadAt::Latest, None)
                .await
                .context("reading a key before the run")?;
            owned.push((key, read.found.map(|v| v.version)));
        }
        loads.push(Load {
            client,
            spec,
            id,
            value: value.clone(),
            keys: args.keys,
            owned,
        });
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let tasks: Vec<_> = loads
        .into_iter()
        .map(|load| tokio::spawn(run_client(load, deadline)))
        .collect();
    let mut total = Outcome::default();
    for task in tasks {
        match tokio::time::timeout_at((deadline + DRAIN_TIMEOUT).into(), task).await {
            Ok(Ok(outcome)) => total.merge(outcome),
            Ok(Err(e)) => bail!("a client task failed: {e}"),
            Err(_) => bail!(
                "a client did not finish {} s after the deadline",
                DRAIN_TIMEOUT.as_secs()
            ),
        }
    }
    total.elapsed = start.elapsed();
    for links in shared {
        links.close().await;
    }
    Ok(total)
}

async fn run_client(mut load: Load, deadline: Instant) -> Outcome {
    let mut out = Outcome::default();
    let mut rng =
        Rng(0x9E37_79B9_7F4A_7C15 ^ ((load.id as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)));
    let mut n: usize = 0;
    while Instant::now() < deadline {
        let slot = if load.owned.is_empty() {
            0
        } else {
            n % load.owned.len()
        };
        n = n.wrapping_add(1);
        let op = match load.spec.workload {
            Workload::Put => KvOp::Put {
                key: Bytes::from(format!("bench/put/{:08}", rng.next() % load.keys)),
                value: load.value.clone(),
            },
            Workload::Cas | Workload::ContendedCas => KvOp::CondPut {
                key: load.owned[slot].0.clone(),
                value: load.value.clone(),
                expected: load.owned[slot].1,
            },
        };
        let started = Instant::now();
        let result = load.client.write(op).await;
        match result {
            Ok(reply) => {
                out.latency.record(started.elapsed());
                match reply {
                    KvReply::Written { version, .. } => {
                        out.successes += 1;
                        if let Some(entry) = load.owned.get_mut(slot) {
                            entry.1 = Some(version);
                        }
                    }
                    KvReply::Conflict { current } => {
                        out.conflicts += 1;
                        out.conflict_latency.record(started.elapsed());
                        if let Some(entry) = load.owned.get_mut(slot) {
                            entry.1 = current;
                        }
                    }
                    other => {
                        out.errors += 1;
                        out.last_error = Some(format!("{other:?}"));
                    }
                }
            }
            Err(e) => {
                out.errors += 1;
                out.last_error = Some(e.to_string());
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    load.client.close().await;
    out
}
