//! Closed-loop K/V load on an etcd cluster, the peer measurement for `derechofs bench kv`.
//!
//! Every client is a tokio task with one request outstanding; clients run for a fixed time and
//! the run prints one Markdown table row in the format `derechofs bench kv` uses:
//! `| system | workload | value | clients | ops/s | p50 ms | p99 ms |`.
//! For the `cas` workloads ops/s counts successful compare-and-swaps and the latency is that of
//! one attempt: one txn that puts the key if its mod_revision is the one the client last learned,
//! and otherwise gets the key, so that a failed compare tells the client the current revision.
//! This is the client algorithm `derechofs bench kv` runs (there a conflict reply carries the
//! key's current version). Each key's revision is read once before the clock starts. Details
//! (failed compares, errors) go to stderr.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};

const USAGE: &str = "\
usage: etcd-load [options]
  --endpoints LIST     comma-separated host:port list (default 127.0.0.1:22379,127.0.0.1:22381,127.0.0.1:22383)
  --workload W         put | cas | contended-cas (default put)
  --clients N          closed-loop clients, one request outstanding each (default 1)
  --value-bytes N      value size in bytes (default 100)
  --seconds S          run time in seconds (default 10)
  --keys N             key space of the put workload (default 100000)
  --keys-per-client N  keys each client owns in the cas workload (default 8)
  --conns N            gRPC connections shared by the clients (default min(clients, 16))
  --system NAME        label of the first column (default etcd)
  --header             print the table header before the row";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    Put,
    Cas,
    ContendedCas,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Put => "put",
            Workload::Cas => "cas",
            Workload::ContendedCas => "contended-cas",
        }
    }

    /// The workload column of the table: contended rows count successes only, and say so.
    fn label(self) -> &'static str {
        match self {
            Workload::ContendedCas => "contended-cas (successes/s)",
            other => other.name(),
        }
    }
}

#[derive(Debug)]
struct Args {
    endpoints: Vec<String>,
    workload: Workload,
    clients: usize,
    value_bytes: usize,
    seconds: f64,
    keys: u64,
    keys_per_client: u64,
    conns: Option<usize>,
    system: String,
    header: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        endpoints: vec![
            "127.0.0.1:22379".into(),
            "127.0.0.1:22381".into(),
            "127.0.0.1:22383".into(),
        ],
        workload: Workload::Put,
        clients: 1,
        value_bytes: 100,
        seconds: 10.0,
        keys: 100_000,
        keys_per_client: 8,
        conns: None,
        system: "etcd".into(),
        header: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        if flag == "--header" {
            a.header = true;
            continue;
        }
        let val = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |what: &str| -> Result<u64, String> {
            val.parse::<u64>()
                .map_err(|_| format!("{what}: expected a non-negative integer, got {val:?}"))
        };
        match flag.as_str() {
            "--endpoints" => {
                a.endpoints = val
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                if a.endpoints.is_empty() {
                    return Err("--endpoints: empty list".into());
                }
            }
            "--workload" => {
                a.workload = match val.as_str() {
                    "put" => Workload::Put,
                    "cas" => Workload::Cas,
                    "contended-cas" => Workload::ContendedCas,
                    _ => {
                        return Err(format!(
                            "--workload: expected put, cas or contended-cas, got {val:?}"
                        ))
                    }
                }
            }
            "--clients" => a.clients = num("--clients")? as usize,
            "--value-bytes" => a.value_bytes = num("--value-bytes")? as usize,
            "--seconds" => {
                a.seconds = val
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| format!("--seconds: expected a positive number, got {val:?}"))?
            }
            "--keys" => a.keys = num("--keys")?,
            "--keys-per-client" => a.keys_per_client = num("--keys-per-client")?,
            "--conns" => a.conns = Some(num("--conns")? as usize),
            "--system" => a.system = val,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if a.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if a.keys == 0 || a.keys_per_client == 0 {
        return Err("--keys and --keys-per-client must be at least 1".into());
    }
    if a.conns == Some(0) {
        return Err("--conns must be at least 1".into());
    }
    Ok(a)
}

/// What one client measured.
#[derive(Debug, Default)]
struct Tally {
    /// Latency of every completed operation (put, or txn attempt), in microseconds.
    lat_us: Vec<u32>,
    successes: u64,
    failed_compares: u64,
    errors: u64,
    last_error: Option<String>,
}

/// A small xorshift generator: spreads put keys without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// One compare-and-swap attempt: a txn that writes only if the key's mod_revision is `known`
/// (0: absent), and otherwise reads it. Ok(true) when the txn succeeded; either way `known`
/// becomes the key's mod_revision after the txn (the put's revision, or the one read).
async fn cas_once(
    client: &mut Client,
    key: &str,
    value: &[u8],
    known: &mut i64,
) -> Result<bool, etcd_client::Error> {
    let txn = Txn::new()
        .when([Compare::mod_revision(key, CompareOp::Equal, *known)])
        .and_then([TxnOp::put(key, value.to_vec(), None)])
        .or_else([TxnOp::get(key, None)]);
    let resp = client.txn(txn).await?;
    if resp.succeeded() {
        *known = resp.header().map_or(0, |h| h.revision());
        return Ok(true);
    }
    *known = resp
        .op_responses()
        .into_iter()
        .find_map(|op| match op {
            TxnOpResponse::Get(got) => Some(got.kvs().first().map_or(0, |kv| kv.mod_revision())),
            _ => None,
        })
        .unwrap_or(0);
    Ok(false)
}

/// The key's mod_revision now (0 when absent), read before the clock starts.
async fn revision(client: &mut Client, key: &str) -> Result<i64, etcd_client::Error> {
    let got = client.get(key, None).await?;
    Ok(got.kvs().first().map_or(0, |kv| kv.mod_revision()))
}

/// The keys a client conditionally puts, in turn: its own for `cas`, the shared one for
/// `contended-cas`, none for `put`.
fn cas_keys(workload: Workload, id: usize, keys_per_client: u64) -> Vec<String> {
    match workload {
        Workload::Put => Vec::new(),
        Workload::Cas => (0..keys_per_client)
            .map(|k| format!("bench/cas/{id:04}/{k:04}"))
            .collect(),
        Workload::ContendedCas => vec!["bench/contended".to_string()],
    }
}

/// `owned`: the keys the client conditionally puts, each with the revision it last learned.
async fn run_client(
    mut client: Client,
    workload: Workload,
    id: usize,
    value: Vec<u8>,
    keys: u64,
    mut owned: Vec<(String, i64)>,
    deadline: Instant,
) -> Tally {
    let mut t = Tally::default();
    let mut rng =
        Rng(0x9E37_79B9_7F4A_7C15 ^ ((id as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)));
    let mut n: usize = 0;
    while Instant::now() < deadline {
        let started = Instant::now();
        let outcome = match workload {
            Workload::Put => {
                let key = format!("bench/put/{:08}", rng.next() % keys);
                client.put(key, value.clone(), None).await.map(|_| true)
            }
            Workload::Cas | Workload::ContendedCas => {
                let slot = n % owned.len();
                let (key, known) = &mut owned[slot];
                cas_once(&mut client, key, &value, known).await
            }
        };
        n = n.wrapping_add(1);
        match outcome {
            Ok(ok) => {
                let us = started.elapsed().as_micros().min(u32::MAX as u128) as u32;
                t.lat_us.push(us);
                if ok {
                    t.successes += 1;
                } else {
                    t.failed_compares += 1;
                }
            }
            Err(e) => {
                t.errors += 1;
                t.last_error = Some(e.to_string());
                // Do not spin on a failing cluster.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    t
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted_us.len() - 1) as f64).round() as usize;
    f64::from(sorted_us[idx.min(sorted_us.len() - 1)]) / 1000.0
}

fn value_label(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

async fn connect(endpoints: &[String]) -> Result<Client, etcd_client::Error> {
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5));
    Client::connect(endpoints, Some(opts)).await
}

async fn run(a: Args) -> Result<(), String> {
    let eps = a.endpoints.join(",");
    let conns = a.conns.unwrap_or(a.clients.min(16)).min(a.clients);
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(
            connect(&a.endpoints)
                .await
                .map_err(|e| format!("etcd unreachable at {eps}: {e}"))?,
        );
    }
    // The channel connects lazily: one request proves the cluster answers (and has a leader).
    let mut probe = clients[0].clone();
    match tokio::time::timeout(Duration::from_secs(5), probe.get("bench/probe", None)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("etcd unreachable at {eps}: {e}")),
        Err(_) => return Err(format!("etcd unreachable at {eps}: no answer within 5 s")),
    }

    // Every client reads the revisions of the keys it will conditionally put, before the clock.
    let mut owned = Vec::with_capacity(a.clients);
    for id in 0..a.clients {
        let mut client = clients[id % conns].clone();
        let mut revisions = Vec::new();
        for key in cas_keys(a.workload, id, a.keys_per_client) {
            let rev = revision(&mut client, &key)
                .await
                .map_err(|e| format!("reading {key} before the run: {e}"))?;
            revisions.push((key, rev));
        }
        owned.push(revisions);
    }

    let value = vec![b'v'; a.value_bytes];
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.seconds);
    let mut tasks = Vec::with_capacity(a.clients);
    for (id, owned) in owned.into_iter().enumerate() {
        tasks.push(tokio::spawn(run_client(
            clients[id % conns].clone(),
            a.workload,
            id,
            value.clone(),
            a.keys,
            owned,
            deadline,
        )));
    }
    let mut total = Tally::default();
    for task in tasks {
        // Each request times out after 5 s, so a task ends at most that long after the deadline.
        match tokio::time::timeout_at((deadline + Duration::from_secs(15)).into(), task).await {
            Ok(Ok(t)) => {
                total.lat_us.extend(t.lat_us);
                total.successes += t.successes;
                total.failed_compares += t.failed_compares;
                total.errors += t.errors;
                if t.last_error.is_some() {
                    total.last_error = t.last_error;
                }
            }
            Ok(Err(e)) => return Err(format!("a client task failed: {e}")),
            Err(_) => return Err("a client did not finish 15 s after the deadline".into()),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    total.lat_us.sort_unstable();

    if a.header {
        println!("| system | workload | value | clients | ops/s | p50 ms | p99 ms |");
        println!("|---|---|---|---:|---:|---:|---:|");
    }
    println!(
        "| {} | {} | {} | {} | {:.0} | {:.3} | {:.3} |",
        a.system,
        a.workload.label(),
        value_label(a.value_bytes),
        a.clients,
        total.successes as f64 / elapsed,
        percentile_ms(&total.lat_us, 50.0),
        percentile_ms(&total.lat_us, 99.0),
    );
    eprintln!(
        "# {} {} {} x{}: {} successes, {} failed compares, {} errors in {:.1} s",
        a.system,
        a.workload.name(),
        value_label(a.value_bytes),
        a.clients,
        total.successes,
        total.failed_compares,
        total.errors,
        elapsed
    );
    if let Some(e) = &total.last_error {
        eprintln!("# last error: {e}");
    }
    if total.successes == 0 && total.errors > 0 {
        return Err(format!("every request failed against {eps}"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("etcd-load: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("etcd-load: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("etcd-load: error: {msg}");
            ExitCode::FAILURE
        }
    }
}
