//! `derechofs mount CONTACTS MOUNTPOINT [-o OPTIONS]` (in the foreground) and `mount.derechofs`,
//! the mount(8) helper (`mount -t derechofs CONTACTS DIR`, `/etc/fstab`), which daemonizes.
//!
//! Both check, before anything is mounted: the options (an unknown one is named), the mount
//! point (missing, not a directory), and that a contact answers within `connect_timeout_ms`
//! (default 5 s). Then they learn the view and layout from the cluster, make sure the root
//! exists, and serve the mount until it is unmounted or the process is signalled
//! (`derechofs_mount::serve`).

use std::ffi::OsString;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use derechofs_client::{RemoteConfig, RemoteShards};
use derechofs_core::transport::LOCAL_SOCKET_DIR_DEFAULT;
use derechofs_fs::{Creds, FileSystem, FsConfig};
use derechofs_mount::{DerechoFs, MountOptions};

use crate::out::errln;

/// Longest the helper waits for its daemon to have the mount in place, beyond the connect
/// timeout.
const DAEMON_READY_EXTRA: Duration = Duration::from_secs(30);
/// Where the helper's daemons write their logs.
const DAEMON_LOG_DIR: &str = "/var/log/derechofs";
/// Most contacts one mount takes.
const CONTACTS_MAX: usize = 64;

/// Arguments of `derechofs mount`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Members to reach the cluster through, `host:port,host:port…` (any member will do).
    contacts: String,
    /// Where to mount.
    mountpoint: PathBuf,
    /// Mount options, comma-separated: ro, rw, allow_other, allow_root, default_permissions,
    /// noatime, dev, nodev, suid, nosuid, exec, noexec, sync, async, dirsync, fsname=,
    /// threads=N, connect_timeout_ms=N, prefer=NODE, readahead_kb=N, ac/noac (and fstab-only
    /// ones, which are ignored).
    #[arg(short = 'o', default_value = "")]
    options: String,
    /// File holding the cluster secret (default: the development secret of loopback clusters).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Directory of the nodes' local sockets: members with a socket file there are reached
    /// through it, the others over TCP; "" for TCP only.
    #[arg(long, default_value = LOCAL_SOCKET_DIR_DEFAULT, value_parser = crate::kv::parse_local_socket_dir_arg)]
    local_socket_dir: crate::kv::LocalSocketDir,
}

/// Splits and checks a contact list.
fn contacts(spec: &str) -> anyhow::Result<Vec<String>> {
    let list: Vec<String> = spec
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if list.is_empty() {
        bail!("no contact given: expected host:port[,host:port…], got `{spec}`");
    }
    if list.len() > CONTACTS_MAX {
        bail!("{} contacts given; at most {CONTACTS_MAX}", list.len());
    }
    if let Some(c) = list.iter().find(|c| !is_host_port(c)) {
        bail!("contact `{c}` is not host:port");
    }
    Ok(list)
}

/// `HOST:PORT` with a port number: a contact, and what a mount's source lists.
pub fn is_host_port(contact: &str) -> bool {
    contact
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Waits until one contact accepts a connection, at most `timeout` in all.
fn reach_one(contacts: &[String], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut why = Vec::new();
    loop {
        why.clear();
        for c in contacts {
            let addrs = match c.to_socket_addrs() {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(e) => {
                    why.push(format!("{c}: {e}"));
                    continue;
                }
            };
            for addr in addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match TcpStream::connect_timeout(&addr, left) {
                    Ok(_) => return Ok(()),
                    Err(e) => why.push(format!("{c}: {e}")),
                }
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "the cluster is unreachable: no contact answered within {} ms ({})",
                timeout.as_millis(),
                why.join("; ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

/// Everything checked before a mount; the second step connects and serves.
struct Prepared {
    contacts: Vec<String>,
    mountpoint: PathBuf,
    options: MountOptions,
    spec: String,
}

fn prepare(spec: &str, mountpoint: &Path, options: &str) -> anyhow::Result<Prepared> {
    let mut options = MountOptions::parse(options)?;
    // The file system does not check permissions itself: the kernel does, from the attributes.
    options.default_permissions = true;
    let contacts = contacts(spec)?;
    derechofs_mount::session::check_mount_point(mountpoint)?;
    Ok(Prepared {
        contacts,
        mountpoint: mountpoint.to_path_buf(),
        options,
        spec: spec.to_string(),
    })
}

fn serve(
    p: Prepared,
    secret_file: &Option<PathBuf>,
    local_socket_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    reach_one(&p.contacts, p.options.connect_timeout)?;
    let secret = crate::kv::secret(secret_file)?;
    let mut config = RemoteConfig::new(p.contacts.clone(), secret);
    config.durable_writes = p.options.sync == Some(true);
    config.durable_namespace = p.options.dirsync;
    config.prefer = p.options.prefer;
    config.attr_cache = p.options.attr_cache;
    config.local_socket_dir = local_socket_dir;
    let shards = RemoteShards::connect(config)
        .with_context(|| format!("connecting to the cluster through {}", p.spec))?;
    if let Some(node) = p.options.prefer {
        let layout = shards.layout_info();
        if !layout.members.iter().any(|&(id, _)| id == node) {
            let members: Vec<String> = layout
                .members
                .iter()
                .map(|(id, _)| id.to_string())
                .collect();
            errln!(
                "derechofs: warning: prefer={node}: node {node} is not a member of view {} \
                 (members {}); requests go to the shards' members in turn until it is",
                layout.view_id,
                members.join(", ")
            );
        }
    }
    let fs = FileSystem::new(
        shards,
        FsConfig {
            client_base: random_u64(),
            skew_max_us: derechofs_fs::filesystem::SKEW_MAX_US_DEFAULT,
            root_owner: Creds { uid: 0, gid: 0 },
            dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
        },
    )
    .map_err(|e| anyhow::anyhow!("starting the file system on {}: {e}", p.spec))?;
    let mountpoint = p.mountpoint.clone();
    let adapter = DerechoFs::new(fs);
    let mounted = adapter.on_mounted();
    derechofs_mount::serve(
        adapter,
        &p.mountpoint,
        &p.options,
        &p.spec,
        "derechofs",
        |n| {
            mounted(n);
            errln!("derechofs: {} mounted at {}", p.spec, mountpoint.display())
        },
    )?;
    Ok(())
}

/// `derechofs mount`: mounts and serves in the foreground.
pub fn run(args: Args) -> anyhow::Result<()> {
    let p = prepare(&args.contacts, &args.mountpoint, &args.options)?;
    serve(p, &args.secret_file, args.local_socket_dir.0)
}

/// Exit statuses of mount(8) helpers.
const EX_USAGE: i32 = 1;
const EX_FAIL: i32 = 32;

/// The helper's command line: `mount.derechofs SPEC DIR [-sfnv] [-N NS] [-o OPTIONS]
/// [-t TYPE]`.
#[derive(Debug, Default)]
struct HelperArgs {
    spec: String,
    dir: PathBuf,
    options: String,
    sloppy: bool,
    fake: bool,
    verbose: bool,
    /// `-N NS`: the mount namespace to mount in (a path, or a pid).
    namespace: Option<String>,
}

fn helper_args(args: &[OsString]) -> Result<HelperArgs, String> {
    let mut h = HelperArgs::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a
            .to_str()
            .ok_or_else(|| format!("argument {a:?} is not UTF-8"))?;
        match a {
            "-o" => {
                let o = it
                    .next()
                    .and_then(|o| o.to_str())
                    .ok_or("-o needs options")?;
                if !h.options.is_empty() {
                    h.options.push(',');
                }
                h.options.push_str(o);
            }
            // A type (`derechofs` or `derechofs.SUB`) is accepted as given.
            "-t" => {
                it.next().ok_or(format!("{a} needs a value"))?;
            }
            "-N" => {
                let ns = it
                    .next()
                    .and_then(|n| n.to_str())
                    .ok_or("-N needs a namespace (a path or a pid)")?;
                h.namespace = Some(ns.to_string());
            }
            _ if a.starts_with('-') && a.len() > 1 => {
                for c in a[1..].chars() {
                    match c {
                        's' => h.sloppy = true,
                        'f' => h.fake = true,
                        'n' => {}
                        'v' => h.verbose = true,
                        _ => return Err(format!("unknown flag -{c}")),
                    }
                }
            }
            _ => positional.push(a.to_string()),
        }
    }
    match positional.as_slice() {
        [spec, dir] => {
            h.spec = spec.clone();
            h.dir = PathBuf::from(dir);
        }
        _ => return Err("expected SPEC (host:port,…) and DIR".into()),
    }
    Ok(h)
}

/// Moves this process into the mount namespace `ns` (mount(8)'s `-N`): a path to a namespace
/// file (mount(8) passes one), or the pid of a process in it. The helper is single-threaded
/// here, as `setns(2)` requires, and the daemon it starts inherits the namespace.
fn enter_mount_namespace(ns: &str) -> anyhow::Result<()> {
    let path = if !ns.is_empty() && ns.bytes().all(|b| b.is_ascii_digit()) {
        PathBuf::from(format!("/proc/{ns}/ns/mnt"))
    } else {
        PathBuf::from(ns)
    };
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    rustix::thread::move_into_link_name_space(
        std::os::fd::AsFd::as_fd(&file),
        Some(rustix::thread::LinkNameSpaceType::Mount),
    )
    .with_context(|| format!("entering the mount namespace of {}", path.display()))?;
    Ok(())
}

/// Drops options that `MountOptions` does not know (the helper's `-s`, sloppy).
fn sloppy(options: &str) -> String {
    options
        .split(',')
        .filter(|o| !o.is_empty() && MountOptions::parse(o).is_ok())
        .collect::<Vec<_>>()
        .join(",")
}

fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    crate::mountinfo::is_mount_point(&path)
}

/// `mount.derechofs`: mount(8)'s helper. Checks everything, then (unless `-f`, mount(8)'s fake
/// mount) starts `derechofs mount` as a daemon and returns once the mount is in place, or with
/// the daemon's error. Exit status 0, 1 (usage, options, mount point) or 32 (mount failure).
pub fn helper_main(args: &[OsString]) -> i32 {
    let usage = "usage: mount.derechofs HOST:PORT[,HOST:PORT…] DIR [-sfnv] [-N NS] [-o OPTIONS]";
    let mut h = match helper_args(args) {
        Ok(h) => h,
        Err(e) => {
            errln!("mount.derechofs: {e}\n{usage}");
            return EX_USAGE;
        }
    };
    // Before anything looks at the mount point: it is the namespace's. A relative one is
    // taken from here, since entering the namespace moves to its root.
    if let Some(ns) = &h.namespace {
        if h.dir.is_relative() {
            match std::env::current_dir() {
                Ok(cwd) => h.dir = cwd.join(&h.dir),
                Err(e) => {
                    errln!("mount.derechofs: the current directory: {e}");
                    return EX_USAGE;
                }
            }
        }
        if let Err(e) = enter_mount_namespace(ns) {
            errln!("mount.derechofs: -N {ns}: {e:#}");
            return EX_USAGE;
        }
    }
    let options = if h.sloppy {
        sloppy(&h.options)
    } else {
        h.options.clone()
    };
    let p = match prepare(&h.spec, &h.dir, &options) {
        Ok(p) => p,
        Err(e) => {
            errln!("mount.derechofs: {e:#}");
            return EX_USAGE;
        }
    };
    if let Err(e) = reach_one(&p.contacts, p.options.connect_timeout) {
        errln!("mount.derechofs: {e:#}");
        return EX_FAIL;
    }
    if h.fake {
        if h.verbose {
            errln!(
                "mount.derechofs: {} on {} checked (fake mount)",
                h.spec,
                h.dir.display()
            );
        }
        return 0;
    }
    let in_namespace = h.namespace.is_some();
    match daemonize(
        &h.spec,
        &h.dir,
        &options,
        p.options.connect_timeout,
        in_namespace,
    ) {
        Ok(()) => {
            if h.verbose {
                errln!("mount.derechofs: {} mounted on {}", h.spec, h.dir.display());
            }
            0
        }
        Err(e) => {
            errln!("mount.derechofs: {e:#}");
            EX_FAIL
        }
    }
}

/// Starts `derechofs mount` detached (its own process group, no terminal), its output in a log
/// file, and waits until the mount is in place or the daemon has exited.
fn daemonize(
    spec: &str,
    dir: &Path,
    options: &str,
    connect: Duration,
    in_namespace: bool,
) -> anyhow::Result<()> {
    // In another mount namespace this program's path may name nothing; the kernel's link to
    // the running executable always does.
    let exe = if in_namespace {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().context("finding this program")?
    };
    std::fs::create_dir_all(DAEMON_LOG_DIR)
        .with_context(|| format!("creating {DAEMON_LOG_DIR}"))?;
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name: String = canonical
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let log_path = PathBuf::from(DAEMON_LOG_DIR).join(format!("mount{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    use std::os::unix::process::CommandExt;
    // Named `derechofs`, not after the helper it may have been installed as.
    let mut child = Command::new(exe)
        .arg0("derechofs")
        .arg("mount")
        .arg(spec)
        .arg(&canonical)
        .arg("-o")
        .arg(options)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("log file")?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the mount daemon")?;
    let deadline = Instant::now() + connect + DAEMON_READY_EXTRA;
    loop {
        if is_mounted(&canonical) {
            return Ok(());
        }
        if let Some(status) = child.try_wait().context("waiting for the mount daemon")? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "the mount daemon exited ({status}): {}",
                text.trim().lines().last().unwrap_or("no message")
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the mount was not in place after {} s; see {}",
                (connect + DAEMON_READY_EXTRA).as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn a_contact_is_a_host_and_a_port_number() {
        assert!(is_host_port("127.0.0.1:7070"));
        assert!(is_host_port("node1:7070"));
        assert!(is_host_port("[::1]:7070"));
        assert!(!is_host_port("mydfs"));
        assert!(!is_host_port(":7070"));
        assert!(!is_host_port("node1:port"));
        assert!(!is_host_port("node1:70700"));
    }

    #[test]
    fn helper_takes_mount_conventions() {
        let h = helper_args(&os(&[
            "127.0.0.1:7071,127.0.0.2:7071",
            "/mnt/x",
            "-sv",
            "-o",
            "ro,noatime",
            "-n",
            "-o",
            "allow_other",
            "-t",
            "derechofs",
            "-N",
            "/proc/77/fd/3",
        ]))
        .unwrap();
        assert_eq!(h.spec, "127.0.0.1:7071,127.0.0.2:7071");
        assert_eq!(h.dir, PathBuf::from("/mnt/x"));
        assert_eq!(h.options, "ro,noatime,allow_other");
        assert!(h.sloppy && h.verbose && !h.fake);
        assert_eq!(h.namespace.as_deref(), Some("/proc/77/fd/3"));
        assert!(helper_args(&os(&["a:1", "/m", "-N"])).is_err());
        assert!(helper_args(&os(&["a:1"])).is_err());
        assert!(helper_args(&os(&["a:1", "/m", "-x"])).is_err());
        assert!(helper_args(&os(&["a:1", "/m", "-o"])).is_err());
    }

    #[test]
    fn sloppy_drops_only_unknown_options() {
        assert_eq!(sloppy("ro,frob,allow_other,x=1"), "ro,allow_other");
    }

    #[test]
    fn contacts_must_be_host_and_port() {
        assert_eq!(contacts("a:1,b:2").unwrap(), vec!["a:1", "b:2"]);
        for bad in ["", ",", "a", "a:", ":1", "a:99999", "a:x"] {
            assert!(contacts(bad).is_err(), "{bad:?}");
        }
    }
}
