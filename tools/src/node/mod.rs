//! `derechofs node`: one member of the group, a thin tokio driver around the sans-IO engine.
//!
//! - [`store`]: each replicated shard's K/V store over its log, and the thread that syncs it.
//! - [`driver`]: the event loop: links, ticks, engine actions, client requests.
//! - [`clients`]: what the node keeps per client: pending writes, waiting reads, watches.
//!
//! The view is static for now: the configured `members`, in view `stored + 1`, where `stored` is
//! the highest view id recorded in this node's logs (see `docs/CONFIG.md`).

mod clients;
mod driver;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use derechofs_core::View;
use tokio::sync::Notify;

use crate::config::NodeConfig;
pub use store::{open_log, stored_view};

/// Runs the node until it is interrupted (SIGINT or SIGTERM) or fails.
pub fn run(config: NodeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(start(config))
}

async fn start(config: NodeConfig) -> anyhow::Result<()> {
    let members = config.initial_members();
    let ids: Vec<_> = members.iter().map(|m| m.id).collect();
    // The layout of the initial view depends only on the members and the spec, so the shards
    // this node replicates are known before its view id is.
    let probe = View::initial(0, ids.clone(), config.layout_spec())
        .context("laying out the initial view")?;
    let me = config.node_id;
    let shards: Vec<_> = probe.layout.shards_of(me).map(|s| s.id).collect();
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    let mut logs = BTreeMap::new();
    let mut stored = 0u32;
    for &shard in &shards {
        let log = open_log(&config.data_dir, shard, config.persistence)
            .with_context(|| format!("opening the log of {shard}"))?;
        let report = log.recovery_report();
        tracing::info!(
            node = me,
            shard = shard.0,
            versions = log.version_count(),
            latest = ?log.latest(),
            torn = ?report.torn,
            "recovered log"
        );
        stored = stored.max(stored_view(&log).unwrap_or(0));
        logs.insert(shard, log);
    }
    let view_id = stored
        .checked_add(1)
        .context("the stored view id is at its maximum")?;
    let view = View::initial(view_id, ids, config.layout_spec())?;
    let notify = Arc::new(Notify::new());
    let mut stores = BTreeMap::new();
    for (shard, log) in logs {
        let store =
            store::ShardStore::start(shard, log, view_id, config.persistence, notify.clone())
                .with_context(|| format!("recording the view in the log of {shard}"))?;
        stores.insert(shard, store);
    }
    tracing::info!(node = me, view_id, members = ?view.members, "starting");
    driver::Driver::run(config, members, view, stores, notify).await
}
