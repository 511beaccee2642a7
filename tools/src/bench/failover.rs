//! `derechofs bench failover`: time from a SIGKILL of one member to writes flowing again in a
//! new view.
//!
//! Each trial starts a fresh cluster of `derechofs node` processes (this same executable) on
//! one loopback address, runs closed-loop K/V writers against it, kills one member with
//! SIGKILL (or freezes it with SIGSTOP, `--fault stop`), and measures, as the writers see it, the time from the kill to the first write
//! acknowledged in the next view, and the longest pause between two acknowledgements. Every
//! process is stopped by its pid when the trial ends.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use derechofs_core::kv::KvOp;
use derechofs_core::transport::Secret;

use crate::client::Client;
use crate::config::NodeConfig;
use crate::out::outln;
use crate::table::Table;

/// Time a fresh cluster has to take its first write.
const FORMING_TIMEOUT: Duration = Duration::from_secs(30);
/// Time writes have to flow again after the kill before the trial fails.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `derechofs bench failover`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Trials, each on a fresh cluster.
    #[arg(long, default_value_t = 6)]
    trials: usize,
    /// Nodes of the cluster (at least 3: the survivors must be a majority).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Which member each trial kills: `leader` (node 1, which leads the view change until it
    /// is suspected), `follower` (the last node), or `alternate`.
    #[arg(long, default_value = "alternate")]
    victim: String,
    /// How the victim fails: `kill` (SIGKILL: the process dies and its connections close) or
    /// `stop` (SIGSTOP: it hangs with its connections open, as a machine that froze or was cut
    /// off, and is suspected only after `suspect_after_ms` of silence).
    #[arg(long, default_value = "kill")]
    fault: String,
    /// Closed-loop writers, each its own client with one write outstanding.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Loopback address the nodes listen on.
    #[arg(long, default_value = "127.0.0.91")]
    ip: String,
    /// Scratch directory for the nodes' data (created; each trial uses and removes a
    /// subdirectory).
    #[arg(long, default_value = "/tmp/derechofs-bench-failover")]
    dir: PathBuf,
    /// Milliseconds of writes before the kill, and after recovery.
    #[arg(long, default_value_t = 500)]
    steady_ms: u64,
}

/// The node processes of one trial, killed by pid when dropped.
struct Nodes {
    children: Vec<Option<Child>>,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One acknowledged write: when, and in which view.
#[derive(Clone, Copy, Debug)]
struct Ack {
    at: Instant,
    view_id: u32,
}

/// What one trial measured.
struct Trial {
    victim: usize,
    /// From the kill to the first write acknowledged in a later view.
    recovery: Duration,
    /// The longest time between two consecutive acknowledgements (over all writers) around the
    /// kill.
    stall: Duration,
    acks_before: usize,
    acks_after: usize,
    errors: usize,
}

/// Runs the benchmark.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3, so that the survivors of one kill are a majority");
    }
    if !args.ip.starts_with("127.") {
        bail!(
            "--ip must be a loopback address (127.x.y.z), not {}",
            args.ip
        );
    }
    let victims: Vec<usize> = match args.victim.as_str() {
        "leader" => vec![1],
        "follower" => vec![args.nodes],
        "alternate" => vec![1, args.nodes],
        other => bail!("--victim must be leader, follower or alternate, not {other}"),
    };
    if !["kill", "stop"].contains(&args.fault.as_str()) {
        bail!("--fault must be kill or stop, not {}", args.fault);
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let secret = NodeConfig::default().secret()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    outln!(
        "failover: {} nodes, {} writers, SIG{} of one member per trial, default timeouts",
        args.nodes,
        args.writers,
        args.fault.to_uppercase()
    )?;
    let mut table = Table::new(&[
        "trial",
        "victim",
        "recovery ms",
        "stall ms",
        "acks before",
        "acks after",
        "errors",
    ]);
    let mut recoveries = Vec::new();
    let mut stalls = Vec::new();
    for trial in 0..args.trials {
        let victim = victims[trial % victims.len()];
        let dir = args.dir.join(format!("trial-{trial}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let result = runtime.block_on(one_trial(&args, &exe, &dir, &secret, victim));
        let _ = std::fs::remove_dir_all(&dir);
        let t = result.with_context(|| format!("trial {trial}"))?;
        table.row(vec![
            trial.to_string(),
            if t.victim == 1 {
                "1 (leader)".to_string()
            } else {
                t.victim.to_string()
            },
            ms(t.recovery),
            ms(t.stall),
            t.acks_before.to_string(),
            t.acks_after.to_string(),
            t.errors.to_string(),
        ])?;
        recoveries.push(t.recovery);
        stalls.push(t.stall);
    }
    recoveries.sort();
    stalls.sort();
    let median = |v: &[Duration]| v[v.len() / 2];
    if !recoveries.is_empty() {
        table.row(vec![
            "median".into(),
            String::new(),
            ms(median(&recoveries)),
            ms(median(&stalls)),
            String::new(),
            String::new(),
            String::new(),
        ])?;
        table.row(vec![
            "max".into(),
            String::new(),
            ms(recoveries[recoveries.len() - 1]),
            ms(stalls[stalls.len() - 1]),
            String::new(),
            String::new(),
            String::new(),
        ])?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn one_trial(
    args: &Args,
    exe: &Path,
    dir: &Path,
    secret: &Secret,
    victim: usize,
) -> anyhow::Result<Trial> {
    let addrs = super::restart::write_configs(&args.ip, dir, args.nodes)?;
    let mut nodes = Nodes {
        children: Vec::new(),
    };
    for i in 0..addrs.len() {
        let config = dir.join(format!("n{}.toml", i + 1));
        let log = std::fs::File::create(dir.join(format!("node{}.log", i + 1)))?;
        let child = Command::new(exe)
            .arg("node")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a node")?;
        nodes.children.push(Some(child));
    }
    // Writers connect through every member but the victim, as clients that knew the cluster.
    let contacts: Vec<String> = addrs
        .iter()
        .enumerate()
        .filter(|(i, _)| i + 1 != victim)
        .map(|(_, a)| a.clone())
        .collect();
    let deadline = Instant::now() + FORMING_TIMEOUT;
    loop {
        let attempt = async {
            let mut client = Client::connect(&contacts, secret.clone()).await?;
            let op = KvOp::Put {
                key: Bytes::from_static(b"ready"),
                value: Bytes::from_static(b"1"),
            };
            let done = client.write(op).await;
            client.close().await;
            done
        };
        if attempt.await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cluster took no write within {FORMING_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let errors: Arc<Mutex<usize>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let mut client = Client::connect(&contacts, secret.clone()).await?;
        let (acks, errors, stop) = (acks.clone(), errors.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let op = KvOp::Put {
                    key: Bytes::from(format!("w{w}/{n}")),
                    value: Bytes::from(format!("v{n}")),
                };
                n += 1;
                match client.write(op).await {
                    Ok(derechofs_core::kv::KvReply::Written { version, .. }) => {
                        let ack = Ack {
                            at: Instant::now(),
                            view_id: (version >> 32) as u32,
                        };
                        acks.lock().unwrap_or_else(|p| p.into_inner()).push(ack);
                    }
                    _ => *errors.lock().unwrap_or_else(|p| p.into_inner()) += 1,
                }
            }
            client.close().await;
        }));
    }
    tokio::time::sleep(Duration::from_millis(args.steady_ms)).await;
    let first_view = acks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .last()
        .map_or(1, |a| a.view_id);
    let killed_at = Instant::now();
    if args.fault == "stop" {
        // The frozen process is killed with the others when the trial ends.
        let pid = nodes.children[victim - 1].as_ref().map(Child::id);
        if let Some(pid) = pid {
            let status = Command::new("kill")
                .args(["-STOP", &pid.to_string()])
                .status()
                .context("running kill -STOP")?;
            if !status.success() {
                bail!("kill -STOP {pid} failed");
            }
        }
    } else if let Some(mut child) = nodes.children[victim - 1].take() {
        child.kill().context("killing the victim")?;
        let _ = child.wait();
    }
    let recovered = loop {
        let found = acks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|a| a.view_id > first_view)
            .map(|a| a.at);
        if let Some(at) = found {
            break at;
        }
        if killed_at.elapsed() > RECOVERY_TIMEOUT {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            bail!("no write was acknowledged in a new view within {RECOVERY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    tokio::time::sleep(Duration::from_millis(args.steady_ms)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let mut acks = acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    acks.sort_by_key(|a| a.at);
    let stall = acks
        .windows(2)
        .filter(|w| w[1].at >= killed_at)
        .map(|w| w[1].at.duration_since(w[0].at))
        .max()
        .unwrap_or_default();
    let errors = *errors.lock().unwrap_or_else(|p| p.into_inner());
    Ok(Trial {
        victim,
        recovery: recovered.duration_since(killed_at),
        stall,
        acks_before: acks.iter().filter(|a| a.at < killed_at).count(),
        acks_after: acks.iter().filter(|a| a.at >= killed_at).count(),
        errors,
    })
}
