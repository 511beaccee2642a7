//! `derechofs up`: a local cluster mounted in the foreground; SIGTERM unmounts it and stops every
//! node; a second `up` on the same data directory finds the files again.
//!
//! Needs root and `/dev/fuse`, as CI has. Every process is stopped by its pid; every wait is
//! bounded.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::is_mounted;

const BIN: &str = env!("CARGO_BIN_EXE_derechofs");
/// Longest `up` may take to mount, or to stop after SIGTERM.
const UP_TIMEOUT: Duration = Duration::from_secs(90);

/// A running `derechofs up`; killed, with its nodes (which a killed `up` cannot stop), and its
/// mount detached, if the test fails.
struct Up {
    child: Option<Child>,
    mnt: std::path::PathBuf,
    data: std::path::PathBuf,
}

impl Up {
    fn start(data: &Path, mnt: &Path, log: &Path, args: &[&str]) -> Up {
        let log = std::fs::File::create(log).expect("log");
        let child = Command::new(BIN)
            .arg("up")
            .args(args)
            .arg("--data")
            .arg(data)
            .arg(mnt)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start derechofs up");
        let mut up = Up {
            child: Some(child),
            mnt: mnt.to_path_buf(),
            data: data.to_path_buf(),
        };
        let deadline = Instant::now() + UP_TIMEOUT;
        while !is_mounted(mnt) {
            if let Some(status) = up.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                panic!("derechofs up exited before mounting: {status}");
            }
            assert!(Instant::now() < deadline, "derechofs up did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        up
    }

    /// SIGTERM, and the exit status once it has stopped.
    fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill");
        let deadline = Instant::now() + UP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("derechofs up did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            for pid in node_pids(&self.data) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// The node processes of the cluster under `data`.
fn node_pids(data: &Path) -> Vec<u32> {
    // The nodes' command lines name their configuration under `data`.
    let needle = data.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(" node ") && cmdline.contains(&needle)).then_some(pid)
        })
        .collect()
}

fn node_processes(data: &Path) -> usize {
    node_pids(data).len()
}

#[test]
fn up_mounts_a_cluster_stops_it_on_sigterm_and_finds_the_files_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mount point");

    let mut up = Up::start(&data, &mnt, &dir.path().join("up1.log"), &[]);
    assert_eq!(node_processes(&data), 3, "three nodes run");
    std::fs::write(mnt.join("kept"), b"across a restart").expect("write");
    // A file large enough that its writes cross the local links lent (docs/ARCHITECTURE.md):
    // every node says its peers read its memory, and the bytes come back whole.
    let big: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(mnt.join("big"), &big).expect("write a large file");
    assert!(std::fs::read(mnt.join("big")).expect("read it back") == big);
    for i in 1..=3 {
        let log = std::fs::read_to_string(data.join(format!("node{i}.log"))).expect("node log");
        for peer in (1..=3).filter(|&p| p != i) {
            assert!(
                log.lines().any(|l| l.contains("large parts are lent")
                    && l.contains(&format!("node {i} to Node({peer})"))),
                "node {i} does not lend to node {peer}:\n{log}"
            );
        }
    }
    assert_eq!(up.stop(), Some(0), "exit status after SIGTERM");
    assert!(!is_mounted(&mnt), "still mounted after SIGTERM");
    assert_eq!(node_processes(&data), 0, "nodes left running");

    // The second run with another socket directory: the nodes take it too (their socket
    // files are there), not only the mount.
    let sockets = dir.path().join("sockets2");
    let sockets_arg = sockets.to_str().expect("a UTF-8 path");
    let mut up = Up::start(
        &data,
        &mnt,
        &dir.path().join("up2.log"),
        &["--local-socket-dir", sockets_arg],
    );
    assert_eq!(
        std::fs::read(mnt.join("kept")).expect("read after the restart"),
        b"across a restart"
    );
    let socket_files = std::fs::read_dir(&sockets)
        .map(|d| d.filter(|e| e.is_ok()).count())
        .unwrap_or(0);
    assert_eq!(
        socket_files, 3,
        "each node listens in the new socket directory"
    );
    assert_eq!(up.stop(), Some(0));
}
