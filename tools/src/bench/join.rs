//! `derechofs bench join`: the state transfer of a real joiner, end to end.
//!
//! For each size, a fresh cluster of four `derechofs node` processes (this same executable) on
//! one loopback address, with the default layout: one namespace shard and one data shard of
//! three replicas each. The data shard, which takes every K/V write, has three of the four nodes;
//! the fourth is its spare. Closed-loop writers fill the data shard's log with that many MiB of
//! values; then a member of the data shard is SIGKILLed (not the view's leader, and one that
//! holds as few other shards as possible), the next view gives its place to the spare, and state
//! transfer brings the spare the shard's whole log from the survivors, over the real transport,
//! in bounded pieces. From the kill it measures the spare's `status`, polled every
//! `POLL_INTERVAL`: when it first lists the data shard (the new view is installed there) and when
//! it reports the shard no longer catching up (its log complete: it serves the shard). A probe
//! writer puts small values through the survivors all along: the table says how many of its
//! writes were acknowledged while the spare caught up, and the longest pause between two
//! acknowledgements from the kill on. Every process is stopped by its pid when the run ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use derechofs_core::kv::KvOp;
use derechofs_core::transport::Secret;

use super::restart::{check_fill_args, fill, start_cluster};
use crate::client::Client;
use crate::config::NodeConfig;
use crate::out::outln;
use crate::table::Table;

/// Nodes of each cluster: three replicas of each shard and a spare for the data shard.
const NODES: usize = 4;
/// Time a fresh cluster has to take its first write.
const FORMING_TIMEOUT: Duration = Duration::from_secs(30);
/// Time the spare has, from the kill, to hold the data shard and catch it up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the spare's status is asked for.
const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// Bytes of each value the probe writer puts.
const PROBE_VALUE_BYTES: usize = 1024;

/// Arguments of `derechofs bench join`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// MiB of K/V values to write into the data shard before the kill, one run per size
    /// (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    mib: Vec<u64>,
    /// Bytes of each value written by the fill (1..=1 MiB).
    #[arg(long, default_value_t = 64 << 10)]
    value_bytes: usize,
    /// Closed-loop writers filling the log, each its own client.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Loopback address the nodes listen on.
    #[arg(long, default_value = "127.0.0.93")]
    ip: String,
    /// Scratch directory for the nodes' data (created; each run uses and removes a
    /// subdirectory).
    #[arg(long, default_value = "/tmp/derechofs-bench-join")]
    dir: PathBuf,
}

/// What one run measured.
struct Run {
    /// Bytes of values the fill wrote into the data shard.
    written: u64,
    /// Versions in the spare's copy of the data shard when it caught up (a version may hold
    /// several writes: the shard's sender batches requests).
    versions: u64,
    /// Keys in the spare's copy: every write of the fill and the probe is a fresh key.
    keys: u64,
    spare: usize,
    victim: usize,
    /// From the kill to the spare listing the data shard.
    new_view: Duration,
    /// From the kill to the spare serving the data shard.
    caught_up: Duration,
    /// Probe writes acknowledged between the spare listing the shard and it catching up.
    writes_during: usize,
    /// Probe writes that failed (after the client's own retries).
    write_errors: usize,
    /// The longest time between two probe acknowledgements from the kill to the catch-up (or
    /// from the last one to the catch-up).
    pause_max: Duration,
    /// The spare's peak resident memory (`VmHWM`), if the system tells it.
    spare_peak_rss: Option<u64>,
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
        "join: {NODES} nodes, default configuration (fsync, shards of 3), values of {} bytes \
         from {} writers; a member of the data shard SIGKILLed, its spare catches the shard up",
        args.value_bytes,
        args.writers
    )?;
    let mut table = Table::new(&[
        "MiB written",
        "versions",
        "keys",
        "killed → spare",
        "new view ms",
        "caught up s",
        "transfer MiB/s",
        "writes during",
        "write errors",
        "longest pause ms",
        "spare peak RSS MiB",
    ]);
    for &mib in &args.mib {
        let dir = args.dir.join(format!("run-{mib}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let result = runtime.block_on(one_run(&args, &exe, &dir, &secret, mib));
        let _ = std::fs::remove_dir_all(&dir);
        let r = result.with_context(|| format!("the run of {mib} MiB"))?;
        let mib_written = r.written as f64 / f64::from(1 << 20);
        let transfer = r.caught_up.saturating_sub(r.new_view).as_secs_f64();
        table.row(vec![
            format!("{mib_written:.1}"),
            r.versions.to_string(),
            r.keys.to_string(),
            format!("{} → {}", r.victim, r.spare),
            ms(r.new_view),
            format!("{:.2}", r.caught_up.as_secs_f64()),
            if transfer > 0.0 {
                format!("{:.0}", mib_written / transfer)
            } else {
                "-".into()
            },
            r.writes_during.to_string(),
            r.write_errors.to_string(),
            ms(r.pause_max),
            r.spare_peak_rss.map_or("-".into(), |b| {
                format!("{:.0}", b as f64 / f64::from(1 << 20))
            }),
        ])?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// The peak resident memory of process `pid` in bytes (`VmHWM` of `/proc/PID/status`), if it
/// can be read.
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// The probe writer's acknowledgements and failures.
#[derive(Default)]
struct Probe {
    acks: Vec<Instant>,
    errors: usize,
}

async fn one_run(
    args: &Args,
    exe: &Path,
    dir: &Path,
    secret: &Secret,
    mib: u64,
) -> anyhow::Result<Run> {
    let (addrs, mut nodes) = start_cluster(&args.ip, exe, dir, secret, NODES).await?;

    // Who holds the data shard, who is its spare, whom to kill.
    let mut watcher = Client::connect(&addrs, secret.clone()).await?;
    let layout = watcher.layout().clone();
    let data: Vec<_> = layout.shards.iter().filter(|s| s.data).collect();
    let [shard] = data.as_slice() else {
        bail!("the layout has {} data shards, not one", data.len());
    };
    let shard_id = shard.id;
    let ids: Vec<usize> = layout.members.iter().map(|&(n, _)| n as usize).collect();
    if ids.len() != NODES || ids.iter().any(|&n| n == 0 || n > NODES) {
        bail!("the view's members are {ids:?}, not the {NODES} nodes started");
    }
    let Some(&spare) = ids.iter().find(|&&n| !shard.members.contains(&(n as u32))) else {
        bail!("every node holds the data shard: there is no spare");
    };
    // The first member in rank order leads the view change.
    let leader = ids[0];
    let shards_held = |n: usize| {
        layout
            .shards
            .iter()
            .filter(|s| s.members.contains(&(n as u32)))
            .count()
    };
    let Some(victim) = shard
        .members
        .iter()
        .map(|&n| n as usize)
        .filter(|&n| n != leader)
        .min_by_key(|&n| (shards_held(n), std::cmp::Reverse(n)))
    else {
        bail!("the data shard has no member but the leader");
    };

    let written = fill(&addrs, secret, mib << 20, args.value_bytes, args.writers).await?;
    let before = watcher
        .status_of(spare as u32)
        .await
        .with_context(|| format!("the status of node {spare}"))?;
    if before.shards.iter().any(|s| s.id == shard_id) {
        bail!("node {spare} already holds the data shard before the kill");
    }

    // The probe writer, through the nodes that survive.
    let survivors: Vec<String> = addrs
        .iter()
        .enumerate()
        .filter(|&(i, _)| i + 1 != victim)
        .map(|(_, a)| a.clone())
        .collect();
    let probe: Arc<Mutex<Probe>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut client = Client::connect(&survivors, secret.clone()).await?;
        let (probe, stop) = (probe.clone(), stop.clone());
        let value = Bytes::from(vec![b'p'; PROBE_VALUE_BYTES]);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let op = KvOp::Put {
                    key: Bytes::from(format!("probe/{n}")),
                    value: value.clone(),
                };
                n += 1;
                let done = client.write(op).await;
                let mut record = probe.lock().unwrap_or_else(|p| p.into_inner());
                match done {
                    Ok(_) => record.acks.push(Instant::now()),
                    Err(_) => record.errors += 1,
                }
            }
            client.close().await;
        })
    };
    // The probe runs before the kill: its first acknowledgement shows the load is on.
    let deadline = Instant::now() + FORMING_TIMEOUT;
    while probe
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .acks
        .is_empty()
    {
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("the probe writer got no write acknowledged within {FORMING_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }

    let killed = Instant::now();
    nodes.kill(victim)?;
    let mut assigned = None;
    let (caught_up, versions, keys) = loop {
        if let Ok(status) = watcher.status_of(spare as u32).await {
            if let Some(s) = status.shards.iter().find(|s| s.id == shard_id) {
                let now = Instant::now();
                assigned.get_or_insert(now);
                if !s.catching_up {
                    break (now, s.versions, s.keys);
                }
            }
        }
        if killed.elapsed() > CATCH_UP_TIMEOUT {
            stop.store(true, Ordering::Relaxed);
            bail!(
                "node {spare} did not catch the data shard up within {CATCH_UP_TIMEOUT:?} of \
                 node {victim}'s kill"
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let assigned = assigned.expect("set when the shard was seen");
    let spare_peak_rss = nodes.pid(spare).and_then(peak_rss);
    stop.store(true, Ordering::Relaxed);
    writer.await.context("the probe writer")?;
    watcher.close().await;

    // Every write of the fill put a fresh key, each in the spare's copy (the probe adds more).
    let fill_writes = written / args.value_bytes as u64;
    if keys < fill_writes {
        bail!(
            "node {spare} caught up with {keys} keys, fewer than the {fill_writes} writes of \
             the fill"
        );
    }
    let probe = probe.lock().unwrap_or_else(|p| p.into_inner());
    let last_before = probe
        .acks
        .iter()
        .rev()
        .find(|&&a| a < killed)
        .copied()
        .unwrap_or(killed);
    let window: Vec<Instant> = std::iter::once(last_before)
        .chain(
            probe
                .acks
                .iter()
                .copied()
                .filter(|&a| a >= killed && a <= caught_up),
        )
        .chain(std::iter::once(caught_up))
        .collect();
    let pause_max = window
        .windows(2)
        .map(|w| w[1].saturating_duration_since(w[0]))
        .max()
        .unwrap_or_default();
    Ok(Run {
        written,
        versions,
        keys,
        spare,
        victim,
        new_view: assigned.duration_since(killed),
        caught_up: caught_up.duration_since(killed),
        writes_during: probe
            .acks
            .iter()
            .filter(|&&a| a >= assigned && a <= caught_up)
            .count(),
        write_errors: probe.errors,
        pause_max,
        spare_peak_rss,
    })
}
