//! Fail-stop of a replica whose log fails (`tools/src/node/failed.rs`): a node whose disk fills
//! stops, naming the shard and version, while the others go on without it; started again, it
//! refuses with the recorded reason until the marker is removed. Needs root (a small tmpfs holds
//! the failing node's data), as CI has.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{connect_remote, Cluster};
use derechofs_client::RemoteShards;
use derechofs_fs::{Creds, FileSystem, FsConfig, ROOT_INO};

/// Room for the first 64 MiB segment of each of the two shards' logs and a little more: the
/// data shard's second segment does not fit.
const TMPFS_SIZE: &str = "size=136m";
/// Bytes written: more than one segment of the data shard's log.
const FILE_BYTES: usize = 72 << 20;

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf) -> Tmpfs {
        std::fs::create_dir_all(&path).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", TMPFS_SIZE, "tmpfs"])
            .arg(&path)
            .status()
            .expect("run mount");
        assert!(status.success(), "mounting a tmpfs at {}", path.display());
        Tmpfs(path)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn connect(cluster: &Cluster) -> RemoteShards {
    connect_remote(cluster.remote_config())
}

#[test]
fn t70_a_node_whose_disk_fills_stops_naming_the_shard_and_refuses_to_restart_until_told() {
    let cluster = Cluster::new(70, 3, "suspect_after_ms = 5000\n");
    let tmpfs = Tmpfs::mount(cluster.path("data3"));
    cluster.start_all();
    let fs = FileSystem::new(
        connect(&cluster),
        FsConfig {
            client_base: 70 << 32,
            skew_max_us: 1_000_000,
            root_owner: Creds { uid: 0, gid: 0 },
            dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
        },
    )
    .expect("the file system");
    let f = fs
        .create(ROOT_INO, b"big", 0o644, Creds::default())
        .expect("create");
    // Writes go on through node 3's failure: nodes 1 and 2 are a majority.
    let piece: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
    for (n, offset) in (0..FILE_BYTES).step_by(piece.len()).enumerate() {
        fs.write(f.ino, offset as u64, &piece)
            .unwrap_or_else(|e| panic!("write {n} at {offset}: {e}"));
    }
    let code = cluster.wait_exit(3);
    assert_eq!(code, Some(1), "node 3 exits with an error");
    let log = cluster.log_of(3);
    assert!(
        log.contains("the replica of shard") && log.contains("so this node stops"),
        "node 3 names the shard and version: {log}"
    );
    let marker = tmpfs.0.join("replica-failed");
    let reason = std::fs::read_to_string(&marker).expect("the marker is written");
    assert!(reason.contains("failed at version"), "{reason}");
    eprintln!("node 3 recorded: {}", reason.trim_end());
    // Nodes 1 and 2 still serve the whole file.
    let back = fs
        .read(f.ino, FILE_BYTES as u64 - 4096, 4096)
        .expect("read");
    assert_eq!(&back[..], &piece[piece.len() - 4096..]);
    // Started again, node 3 refuses at once with the reason, and stays out.
    cluster.start(3);
    assert_eq!(cluster.wait_exit(3), Some(1), "node 3 refuses to start");
    let log = cluster.log_of(3);
    assert!(
        log.contains("stopped earlier because a replica failed") && log.contains("replica-failed"),
        "node 3 says why it does not start: {log}"
    );
    cluster.stop_all();
    drop(tmpfs);
}
