//! `derechofs up [--nodes N] [--data DIR] MOUNTPOINT`: the embedded default. Starts a local
//! cluster of N `derechofs node` processes (default 3) on 127.0.0.1 with their configurations
//! and data under `DIR` (default `./derechofs-up`), mounts it at MOUNTPOINT, and stays in the
//! foreground until Ctrl-C or SIGTERM; then it unmounts and stops the nodes, each by its pid.
//!
//! The first run writes `DIR/nI.toml` for every node, with ports the kernel picked; later runs
//! with the same `DIR` reuse them, so the nodes find their data again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use derechofs_core::transport::LOCAL_SOCKET_DIR_DEFAULT;
use derechofs_mount::MountOptions;

use crate::out::errln;

/// Most nodes `up` starts.
const NODES_MAX: usize = 16;
/// Longest the nodes may take to link and become active.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a child may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Replicas per shard when there are enough nodes.
const REPLICAS: usize = 3;

/// Arguments of `derechofs up`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Nodes to start (1..=16); shards get min(3, N) replicas.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Directory of the nodes' configurations, data and logs (created if missing).
    #[arg(long, default_value = "derechofs-up")]
    data: PathBuf,
    /// Where to mount the file system.
    mountpoint: PathBuf,
    /// Mount options, as for `derechofs mount`.
    #[arg(short = 'o', default_value = "")]
    options: String,
    /// Directory of the local sockets the nodes and the mount link through (written into the
    /// nodes' configurations on every run); "" for loopback TCP.
    #[arg(long, default_value = LOCAL_SOCKET_DIR_DEFAULT, value_parser = crate::kv::parse_local_socket_dir_arg)]
    local_socket_dir: crate::kv::LocalSocketDir,
}

/// A started child, stopped by its pid when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Sends SIGTERM (if it still runs).
    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, then waits; SIGKILL if it has not exited within `STOP_TIMEOUT`.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            errln!("derechofs up: {} did not stop; killing it", self.name);
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}

/// `text`, a node configuration `derechofs up` wrote, with `local_socket_dir` set to `dir`: the
/// line replaced, or added under `[transport]` (configurations written before the key existed
/// have none), or with its table at the end.
fn with_socket_dir(text: &str, dir: &str) -> String {
    let wanted = format!("local_socket_dir = {dir:?}");
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if let Some(line) = lines
        .iter_mut()
        .find(|l| l.starts_with("local_socket_dir = "))
    {
        *line = wanted;
    } else if let Some(at) = lines.iter().position(|l| l.trim() == "[transport]") {
        lines.insert(at + 1, wanted);
    } else {
        lines.extend([String::new(), "[transport]".to_string(), wanted]);
    }
    lines.join("\n") + "\n"
}

/// The node configurations under `data`, written on the first run (later runs set only their
/// socket directory); returns their addresses.
fn configs(data: &Path, nodes: usize, local_dir: &str) -> anyhow::Result<Vec<String>> {
    let existing: Vec<PathBuf> = (1..=NODES_MAX)
        .map(|i| data.join(format!("n{i}.toml")))
        .filter(|p| p.exists())
        .collect();
    if !existing.is_empty() {
        if existing.len() != nodes {
            bail!(
                "{} holds a cluster of {} nodes: use --nodes {} or another --data",
                data.display(),
                existing.len(),
                existing.len()
            );
        }
        let mut addrs = Vec::new();
        for p in &existing {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let listen = text
                .lines()
                .find_map(|l| l.strip_prefix("listen = \""))
                .and_then(|l| l.strip_suffix('"'))
                .with_context(|| format!("{}: no `listen` line", p.display()))?;
            addrs.push(listen.to_string());
            // The socket directory of this run, for the nodes as for the mount: a node left
            // with an earlier run's directory would be reached over TCP only.
            let updated = with_socket_dir(&text, local_dir);
            if updated != text {
                std::fs::write(p, updated).with_context(|| format!("writing {}", p.display()))?;
            }
        }
        return Ok(addrs);
    }
    // Ports the kernel picks, released just before the nodes bind them.
    let listeners: Vec<std::net::TcpListener> = (0..nodes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("picking free ports on 127.0.0.1")?;
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()))
        .collect::<Result<_, _>>()
        .context("picking free ports")?;
    let members: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("  {{ id = {}, addr = \"{a}\" }},", i + 1))
        .collect();
    let data_abs = data.canonicalize().context("the data directory")?;
    for (i, addr) in addrs.iter().enumerate() {
        let config = format!(
            "# Written by `derechofs up`; docs/CONFIG.md lists every key.\n\
             node_id = {}\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nmembers = [\n{}\n]\n\n\
             [layout]\nreplicas = {}\n\n[transport]\nlocal_socket_dir = {local_dir:?}\n",
            i + 1,
            data_abs.join(format!("data{}", i + 1)).display(),
            members.join("\n"),
            REPLICAS.min(nodes)
        );
        let path = data.join(format!("n{}.toml", i + 1));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
    }
    drop(listeners);
    Ok(addrs)
}

/// Runs the cluster and the mount until interrupted.
pub fn run(args: Args) -> anyhow::Result<()> {
    if args.nodes == 0 || args.nodes > NODES_MAX {
        bail!(
            "--nodes must be between 1 and {NODES_MAX}, not {}",
            args.nodes
        );
    }
    MountOptions::parse(&args.options)?;
    derechofs_mount::session::check_mount_point(&args.mountpoint)?;
    let mountpoint = args.mountpoint.canonicalize().context("the mount point")?;
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating {}", args.data.display()))?;
    let local_dir = args
        .local_socket_dir
        .0
        .as_ref()
        .map_or(String::new(), |d| d.display().to_string());
    let addrs = configs(&args.data, args.nodes, &local_dir)?;
    let contacts = addrs.join(",");
    let exe = std::env::current_exe().context("finding this program")?;

    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handlers")?;
    }
    use std::os::unix::process::CommandExt;
    let mut nodes = Vec::new();
    for i in 1..=args.nodes {
        let log_path = args.data.join(format!("node{i}.log"));
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(args.data.join(format!("n{i}.toml")))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("log file")?)
            .stderr(log)
            // Its own process group: Ctrl-C reaches `up`, which stops the mount first.
            .process_group(0)
            .spawn()
            .context("starting a node")?;
        nodes.push(Proc {
            name: format!("node {i} (pid {})", child.id()),
            child,
        });
    }
    errln!("derechofs up: started {} nodes at {contacts}", args.nodes);

    // Wait until every node reports itself active.
    let deadline = Instant::now() + ACTIVE_TIMEOUT;
    loop {
        for (i, n) in nodes.iter_mut().enumerate() {
            if let Ok(Some(status)) = n.child.try_wait() {
                bail!(
                    "node {} exited ({status}):\n{}",
                    i + 1,
                    tail(&args.data.join(format!("node{}.log", i + 1)))
                );
            }
        }
        let out = Command::new(&exe)
            .args([
                "status",
                "--contacts",
                &contacts,
                "--local-socket-dir",
                &local_dir,
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("running derechofs status")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let active: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| l.contains(" active "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        if out.status.success() && active.len() >= args.nodes {
            break;
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the nodes did not become active within {} s; their logs are in {}",
                ACTIVE_TIMEOUT.as_secs(),
                args.data.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let child = Command::new(&exe)
        .arg("mount")
        .arg("--local-socket-dir")
        .arg(&local_dir)
        .arg(&contacts)
        .arg(&mountpoint)
        .arg("-o")
        .arg(&args.options)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .context("starting the mount")?;
    let mut mount = Proc {
        name: format!("the mount (pid {})", child.id()),
        child,
    };
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while !crate::mountinfo::is_mount_point(&mountpoint) {
        if let Ok(Some(status)) = mount.child.try_wait() {
            bail!("the mount exited ({status})");
        }
        if Instant::now() > deadline || stop.load(Ordering::SeqCst) {
            mount.stop();
            bail!(
                "the mount did not appear within {} s",
                MOUNT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    errln!(
        "derechofs up: mounted at {} (contacts {contacts}; data and logs in {}). Ctrl-C stops.",
        mountpoint.display(),
        args.data.display()
    );

    let mut failed = None;
    while !stop.load(Ordering::SeqCst) {
        if let Ok(Some(status)) = mount.child.try_wait() {
            failed = Some(format!("the mount ended ({status})"));
            break;
        }
        for (i, n) in nodes.iter_mut().enumerate() {
            if let Ok(Some(status)) = n.child.try_wait() {
                failed = Some(format!("node {} exited ({status})", i + 1));
            }
        }
        if failed.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    errln!("derechofs up: unmounting and stopping the nodes");
    mount.stop();
    if crate::mountinfo::is_mount_point(&mountpoint) {
        let _ = derechofs_mount::session::lazy_unmount(&mountpoint);
    }
    // Every node is told at once: nodes that see their peers stop one by one would change views
    // to go on without them, and the next `up` could not bring the first ones back.
    for n in nodes.iter_mut() {
        n.terminate();
    }
    for n in nodes.iter_mut() {
        n.stop();
    }
    match failed {
        // The mount ending because someone unmounted it is a normal way to stop.
        Some(why) if why.starts_with("the mount ended (exit status: 0)") => Ok(()),
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_run_sets_the_socket_directory_in_any_configuration_up_wrote() {
        let now = "node_id = 1\n\n[transport]\nlocal_socket_dir = \"/run/a\"\n";
        assert_eq!(
            with_socket_dir(now, "/run/b"),
            "node_id = 1\n\n[transport]\nlocal_socket_dir = \"/run/b\"\n"
        );
        assert_eq!(with_socket_dir(now, "/run/a"), now);
        // Written before the key existed: a `[transport]` table without it, or none at all.
        assert_eq!(
            with_socket_dir("node_id = 1\n[transport]\nkind = \"tcp\"\n", ""),
            "node_id = 1\n[transport]\nlocal_socket_dir = \"\"\nkind = \"tcp\"\n"
        );
        assert_eq!(
            with_socket_dir("node_id = 1\n[layout]\nreplicas = 3\n", "/run/b"),
            "node_id = 1\n[layout]\nreplicas = 3\n\n[transport]\nlocal_socket_dir = \"/run/b\"\n"
        );
    }
}
