//! The life of a FUSE mount, through the passthrough mode (`derechofs bench passthrough`), which
//! shares the mount, options and unmount code with DerechoFS mounts: a mount serves files, ends
//! cleanly on SIGTERM and on an outside `umount`, a killed server leaves a mount that `umount -l`
//! removes, and bad options or mount points are refused before anything is mounted.
//!
//! These tests mount for real: they need root and `/dev/fuse`, as CI has. Every process is stopped
//! by its pid and every wait is bounded.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::is_mounted;

const BIN: &str = env!("CARGO_BIN_EXE_derechofs");
/// Longest a mount may take to appear or disappear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

/// Waits for the child to exit; returns its exit code (None: killed by a signal).
fn wait_exit(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + MOUNT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the mount process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A passthrough mount of a fresh directory; unmounted and stopped (by pid) when dropped.
struct Mount {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mount {
    fn start(options: &str) -> Mount {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(dir.path().join("src")).expect("src");
        std::fs::create_dir(dir.path().join("mnt")).expect("mnt");
        let child = Command::new(BIN)
            .args(["bench", "passthrough"])
            .arg(dir.path().join("src"))
            .arg(dir.path().join("mnt"))
            .args(["-o", options])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the passthrough");
        let mut m = Mount {
            dir,
            child: Some(child),
        };
        let mnt = m.mnt();
        wait_until("the passthrough is mounted", || {
            if let Some(Some(status)) = m.child.as_mut().map(|c| c.try_wait().expect("wait")) {
                panic!("the passthrough exited: {status}");
            }
            is_mounted(&mnt)
        });
        m
    }

    fn src(&self) -> PathBuf {
        self.dir.path().join("src")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt()) {
            let _ = Command::new("umount").arg("-l").arg(self.mnt()).status();
        }
    }
}

#[test]
fn passthrough_serves_the_directory_below_and_ends_cleanly_on_sigterm() {
    let mut m = Mount::start("default_permissions");
    std::fs::write(m.mnt().join("a"), b"through the mount").expect("write");
    std::fs::create_dir(m.mnt().join("d")).expect("mkdir");
    std::fs::rename(m.mnt().join("a"), m.mnt().join("d/b")).expect("rename");
    assert_eq!(
        std::fs::read(m.src().join("d/b")).expect("read below"),
        b"through the mount"
    );
    std::fs::write(m.src().join("c"), b"below").expect("write below");
    assert_eq!(std::fs::read(m.mnt().join("c")).expect("read"), b"below");

    signal(m.child(), "-TERM");
    assert_eq!(wait_exit(m.child()), Some(0), "exit code after SIGTERM");
    m.child = None;
    assert!(!is_mounted(&m.mnt()), "still mounted after SIGTERM");
}

#[test]
fn sigterm_unmounts_even_while_a_file_is_open() {
    let mut m = Mount::start("");
    let open = std::fs::File::create(m.mnt().join("held")).expect("create");
    signal(m.child(), "-TERM");
    assert_eq!(wait_exit(m.child()), Some(0), "exit code after SIGTERM");
    m.child = None;
    assert!(!is_mounted(&m.mnt()), "still mounted after SIGTERM");
    drop(open);
}

#[test]
fn outside_umount_ends_the_mount_process() {
    let mut m = Mount::start("");
    let status = Command::new("umount")
        .arg(m.mnt())
        .status()
        .expect("umount");
    assert!(status.success());
    assert_eq!(wait_exit(m.child()), Some(0), "exit code after umount");
    m.child = None;
}

#[test]
fn killed_server_leaves_a_mount_that_umount_lazy_removes() {
    let mut m = Mount::start("");
    let mut child = m.child.take().expect("running");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let err = std::fs::read_dir(m.mnt()).expect_err("a dead mount cannot be listed");
    assert_eq!(
        err.raw_os_error(),
        Some(107),
        "ENOTCONN expected, got {err}"
    );
    let status = Command::new("umount")
        .arg("-l")
        .arg(m.mnt())
        .status()
        .expect("umount -l");
    assert!(status.success(), "umount -l failed");
    assert!(!is_mounted(&m.mnt()));
    // The mount point is an ordinary empty directory again.
    assert_eq!(std::fs::read_dir(m.mnt()).expect("list").count(), 0);
}

/// The kernel's readahead window of the mount at `mnt`, in KiB, from its backing device in sysfs.
fn readahead_kb(mnt: &Path) -> Option<u32> {
    let wanted = mnt
        .canonicalize()
        .ok()?
        .to_string_lossy()
        .replace(' ', "\\040");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let device = mountinfo
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(wanted.as_str()))?
        .split(' ')
        .nth(2)?
        .to_string();
    std::fs::read_to_string(format!("/sys/class/bdi/{device}/read_ahead_kb"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[test]
fn the_mount_sets_the_kernels_readahead_window_by_default_and_as_readahead_kb_asks() {
    let m = Mount::start("");
    wait_until("the default readahead window is set", || {
        readahead_kb(&m.mnt()) == Some(derechofs_mount::options::READAHEAD_KB_DEFAULT)
    });
    let m = Mount::start("readahead_kb=2048");
    wait_until("the asked readahead window is set", || {
        readahead_kb(&m.mnt()) == Some(2048)
    });
}

#[test]
fn read_only_option_refuses_writes_with_erofs() {
    let m = Mount::start("ro");
    let err = std::fs::write(m.mnt().join("x"), b"x").expect_err("ro mount accepted a write");
    assert_eq!(err.raw_os_error(), Some(30), "EROFS expected, got {err}");
}

#[test]
fn unknown_option_and_missing_mount_point_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = |mnt: &Path, opts: &str| {
        let out = Command::new(BIN)
            .args(["bench", "passthrough"])
            .arg(dir.path())
            .arg(mnt)
            .args(["-o", opts])
            .stdin(Stdio::null())
            .output()
            .expect("run");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    let (code, err) = run(&mnt, "ro,frobnicate");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown mount option `frobnicate`"), "{err}");
    assert!(!is_mounted(&mnt));

    let (code, err) = run(&dir.path().join("nowhere"), "");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}
