//! Fail-stop of a replica whose log failed: the node stops, and stays stopped until an operator
//! looks.
//!
//! A version that cannot be applied or appended to a shard's log, or a log that cannot be made
//! durable (a disk error, a full disk, or a defect), leaves this replica's state behind the
//! group's, and every version after it would be
//! applied to the wrong state. The node therefore stops: it records why in `DATA/replica-failed`
//! (written and synced before it exits), closes its links (the other members remove it from the
//! view at once, as for a crash, and the shard goes on with them), and exits with the error.
//! Started again while that file exists, it refuses at once with the recorded reason instead of
//! rejoining, failing again and looping; once the cause is fixed, removing the file lets it
//! rejoin, and state transfer brings its logs up to date (transferred records are appended as
//! they are, not applied again).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use derechofs_core::{ShardId, Version};

/// The marker's name in the data directory.
pub const FAILED_FILE: &str = "replica-failed";
/// Bytes of the marker read back at start, at most (a reason longer than this is cut).
const FAILED_FILE_BYTES_MAX: u64 = 64 << 10;

/// A shard's replica failed to apply or append a version (or records sent by state transfer):
/// the node must stop.
#[derive(Debug, thiserror::Error)]
#[error("the replica of {shard} failed at version {version:#x}, so this node stops: {cause}")]
pub struct ReplicaFailed {
    /// The shard.
    pub shard: ShardId,
    /// The version (or, for state transfer, the record) that failed; for a failure to make the
    /// log durable, the last version it holds.
    pub version: Version,
    /// Why.
    pub cause: anyhow::Error,
}

/// Writes the marker with `reason` and syncs it and its directory.
pub fn record(data_dir: &Path, reason: &str) -> anyhow::Result<()> {
    let path = data_dir.join(FAILED_FILE);
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(reason.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", data_dir.display()))?;
    Ok(())
}

/// Refuses to start while the marker exists, with the reason it records.
pub fn check(data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(FAILED_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    let mut reason = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, FAILED_FILE_BYTES_MAX),
        &mut reason,
    )
    .with_context(|| format!("reading {}", path.display()))?;
    anyhow::bail!(
        "this node stopped earlier because a replica failed: {}; once the cause is fixed, \
         remove {} to start it again (it rejoins and catches up by state transfer)",
        reason.trim_end(),
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_whose_replica_failed_refuses_to_start_until_the_marker_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path()).expect("no marker: the node starts");
        record(
            dir.path(),
            "the replica of shard 3 failed at version 0x100000002: disk full",
        )
        .unwrap();
        let e = format!("{:#}", check(dir.path()).unwrap_err());
        assert!(e.contains("disk full"), "{e}");
        assert!(e.contains(FAILED_FILE), "{e}");
        std::fs::remove_file(dir.path().join(FAILED_FILE)).unwrap();
        check(dir.path()).expect("marker removed: the node starts");
    }
}
