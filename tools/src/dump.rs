//! `derechofs dump --data-dir DIR`: a stopped node's shard logs as canonical text, so the
//! replicas of a shard can be compared line by line (every version with its stamp, every key
//! with its history and a digest of each value).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use derechofs_core::ShardId;
use derechofs_storage::{Log, SyncPolicy};

use crate::kv::show_version;
use crate::node::{open_log, EngineState};
use crate::out::{write_line, StdoutError};

/// Keys per scan page.
const SCAN_PAGE_KEYS: usize = 1024;

fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) && !s.contains(' ') => s.to_string(),
        _ => key.iter().map(|b| format!("{b:02x}")).collect::<String>() + "(hex)",
    }
}

fn digest(value: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in value {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Prints every `shard-N` log under `data_dir`. Run it only while the node is stopped: opening
/// a log recovers it.
pub fn run(data_dir: &Path) -> anyhow::Result<i32> {
    let mut shards: Vec<u16> = std::fs::read_dir(data_dir)
        .with_context(|| format!("reading {}", data_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("shard-")?.parse().ok())
        .collect();
    shards.sort_unstable();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for shard in shards {
        let log = open_log(data_dir, ShardId(shard), SyncPolicy::Fsync)
            .with_context(|| format!("opening the log of shard {shard}"))?;
        dump(shard, &log, &mut out)?;
    }
    out.flush().map_err(StdoutError)?;
    Ok(0)
}

fn dump(shard: u16, log: &Log, out: &mut impl Write) -> anyhow::Result<()> {
    let state = EngineState::of(log);
    write_line(
        out,
        format_args!(
            "shard {shard} versions {} latest {} view {} chunk {}",
            log.version_count(),
            log.latest()
                .map_or("-".into(), |(v, h)| format!("{}@{h}", show_version(v))),
            state.map_or("-".into(), |s| s.view_id.to_string()),
            state
                .and_then(|s| s.chunk_size)
                .map_or("-".into(), |c| c.to_string()),
        ),
    )?;
    let Some((latest, _)) = log.latest() else {
        return Ok(());
    };
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = log.scan(b"", latest, after.as_deref(), SCAN_PAGE_KEYS)?;
        for (key, _) in &page.items {
            let mut line = format!("  {}", show_key(key));
            for change in log.history(key) {
                let value = log.get(key, change.version)?;
                let what = value.map_or("deleted".to_string(), |v| {
                    format!("{}:{:016x}", v.len(), digest(&v))
                });
                line.push_str(&format!(
                    " {}@{}={what}",
                    show_version(change.version),
                    change.hlc
                ));
            }
            write_line(out, format_args!("{line}"))?;
        }
        match page.resume_after {
            Some(key) => after = Some(key),
            None => break,
        }
    }
    Ok(())
}
