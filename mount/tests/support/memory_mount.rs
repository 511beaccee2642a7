//! A FUSE mount of DerechoFS over in-process shards in memory, served by threads of the test
//! process and unmounted when dropped. Needs root and `/dev/fuse`, as CI has.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use derechofs_fs::{Creds, FileSystem, FsConfig, LocalShards};
use derechofs_mount::{DerechoFs, MountOptions};

/// Longest the mount may take to appear or go away.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(20);

fn is_mounted(path: &Path) -> bool {
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

/// A mount served by threads of this test process; unmounted when dropped.
pub struct MemoryMount {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
    server: Option<std::thread::JoinHandle<()>>,
}

impl MemoryMount {
    pub fn start() -> MemoryMount {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().canonicalize().expect("path");
        let shards = LocalShards::with_defaults(3).expect("shards");
        let config = FsConfig {
            client_base: 1 << 32,
            skew_max_us: derechofs_fs::filesystem::SKEW_MAX_US_DEFAULT,
            root_owner: Creds { uid: 0, gid: 0 },
            dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
        };
        let fs = DerechoFs::new(FileSystem::new(shards, config).expect("file system"));
        let mut options = MountOptions::parse("default_permissions").expect("options");
        options.threads = 2;
        let mnt = path.clone();
        let server = std::thread::spawn(move || {
            derechofs_mount::serve(fs, &mnt, &options, "memory", "derechofs", |_| {})
                .expect("serve the mount");
        });
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(&path) {
            assert!(!server.is_finished(), "the mount ended before it appeared");
            assert!(Instant::now() < deadline, "the mount did not appear");
            std::thread::sleep(Duration::from_millis(10));
        }
        MemoryMount {
            _dir: dir,
            path,
            server: Some(server),
        }
    }
}

impl Drop for MemoryMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        if let Some(server) = self.server.take() {
            let _ = server.join();
        }
    }
}
