//! `derechofs node`: one member of the group, a thin tokio driver around the sans-IO engine.
//!
//! - [`machine`]: a shard replica's state machines over its log: the K/V store and the file
//!   system, told apart by the first byte of each request payload.
//! - [`store`]: each replicated shard's machines, and the thread that syncs the log.
//! - [`state`]: the membership record (`DATA/view-state`): the last view and its logged decision.
//! - [`driver`]: the event loop: links, ticks, engine actions, view changes, client requests.
//! - [`clients`]: what the node keeps per client: pending writes, waiting reads, watches.
//! - [`failed`]: fail-stop when a shard's log fails to take a version (`DATA/replica-failed`).
//!
//! A node that never recorded a view starts the group with the configured `members`, in view
//! `stored + 1` where `stored` is the highest view id recorded in its logs (1 for a new group).
//! A node with a recorded view comes back in it: it cuts each shard log back to the ragged trim
//! it logged for that view, if any, and runs the engine's total restart (`Node::restarting`) in
//! it at once: whichever members of the recorded view come back (a majority) agree on where
//! each shard ends (the longest log) and install the next view; a shorter log catches up by
//! state transfer, a longer one is cut back. If a member already runs a view beyond what that
//! restart makes (or one without this node), the node joins again instead.
//!
//! Each shard log records the `layout.chunk_size` its machines used (its engine state,
//! [`store::EngineState`]); a node refuses to start over a log holding data written with
//! another one ([`store::check_chunk_size`]).
//!
//! A node that is not in `members` (and never recorded a view) joins: it asks the members
//! through `contacts` to add it, announcing its `listen` address, which the view that adds it
//! carries to every member (`View::addrs`); state transfer then brings its shards' logs.

mod clients;
mod driver;
mod failed;
mod machine;
mod state;
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Context};
use derechofs_core::View;
use tokio::sync::Notify;

use crate::config::NodeConfig;
pub use state::{trim_end, LoggedDecision, NodeState, STATE_FILE};
pub use store::{open_log, stored_view, EngineState};

/// Runs the node until it is interrupted (SIGINT or SIGTERM) or fails.
pub fn run(config: NodeConfig) -> anyhow::Result<()> {
    // One thread runs the driver and every link's reader and writer: a frame then goes from
    // socket to engine to socket without waking another thread, which on a small machine costs
    // more than the work itself. The disk waits in the persister threads, never here.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The node runs as a task, not as the future `block_on` polls: a link's reader task that
    // hands the driver a frame then schedules it in the same pass over the runtime's tasks,
    // where waking the `block_on` future makes the runtime poll its sockets once more (an
    // `epoll_wait` that finds nothing) before it polls that future.
    runtime.block_on(async {
        match tokio::spawn(start(config)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!("the node's task ended: {e}")),
        }
    })
}

/// How the node enters the group.
#[derive(Debug)]
pub enum Start {
    /// A new group (or one restarted from logs without a recorded view) in this view.
    Fresh(View),
    /// Back from the recorded view `recorded`: the engine restarts in it (total restart), or,
    /// if the group went on without this node, the node joins again.
    Restart {
        /// The view recorded on disk.
        recorded: View,
        /// The decision logged for it, if any (the logs are cut back to its trims).
        logged: Option<LoggedDecision>,
    },
    /// Not in `members` and never a member: it asks the members to add it
    /// (`NodeConfig::join_contacts`), and state transfer brings the logs of its shards.
    Join,
}

impl Start {
    /// The view whose shards this node opens (none for a joiner: the view that adds it
    /// says which).
    fn view(&self) -> Option<&View> {
        match self {
            Start::Fresh(view) => Some(view),
            Start::Restart { recorded, .. } => Some(recorded),
            Start::Join => None,
        }
    }
}

async fn start(config: NodeConfig) -> anyhow::Result<()> {
    let me = config.node_id;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating {}", config.data_dir.display()))?;
    failed::check(&config.data_dir)?;
    let recorded = NodeState::load(&config.data_dir)?;
    let start = match &recorded {
        Some(state) => restart_views(&config, state)?,
        None if config.joins() => Start::Join,
        None => {
            let ids: Vec<_> = config.initial_members().iter().map(|m| m.id).collect();
            // The layout of the initial view depends only on the members and the spec, so the
            // shards this node replicates are known before its view id is.
            let probe = View::initial(0, ids.clone(), config.layout_spec())
                .context("laying out the initial view")?;
            let mut stored = 0u32;
            for shard in probe.layout.shards_of(me) {
                let log = open_log(&config.data_dir, shard.id, config.persistence)
                    .with_context(|| format!("opening the log of {}", shard.id))?;
                stored = stored.max(stored_view(&log).unwrap_or(0));
            }
            let view_id = stored
                .checked_add(1)
                .context("the stored view id is at its maximum")?;
            Start::Fresh(View::initial(view_id, ids, config.layout_spec())?)
        }
    };
    let shards: Vec<_> = start
        .view()
        .map(|v| v.layout.shards_of(me).map(|s| s.id).collect())
        .unwrap_or_default();
    let view_id = start.view().map_or(0, |v| v.view_id);
    let notify = Arc::new(Notify::new());
    let chunk_size = fs_chunk_size(&config)?;
    // Every log is opened and checked before any is cut or records anything: a refused start
    // leaves them all as they were.
    let mut logs = Vec::new();
    for shard in shards {
        let log = open_log(&config.data_dir, shard, config.persistence)
            .with_context(|| format!("opening the log of {shard}"))?;
        store::check_chunk_size(&log, &config.data_dir, shard, chunk_size)
            .map_err(anyhow::Error::msg)?;
        logs.push((shard, log));
    }
    let mut stores = BTreeMap::new();
    for (shard, mut log) in logs {
        if let Some(logged) = recorded.as_ref().and_then(|s| s.decision.as_ref()) {
            // The decision that ends the recorded view was logged: nothing beyond its trim may
            // stay in the log. (What the engine delivered is always within it; this cuts what a
            // torn restart could have left.)
            let view_id = recorded.as_ref().map_or(0, |s| s.view_id);
            if let Some(trim) = logged.decision.trims.get(usize::from(shard.0)) {
                let end = trim_end(view_id, trim);
                if log.latest().is_some_and(|(latest, _)| latest > end) {
                    tracing::warn!(node = me, %shard, end = format!("{end:#x}"), "cutting the log back to the logged trim");
                }
                log.truncate_after(end)
                    .with_context(|| format!("cutting the log of {shard} to the logged trim"))?;
            }
        }
        let report = log.recovery_report();
        tracing::info!(
            node = me,
            shard = shard.0,
            versions = log.version_count(),
            latest = ?log.latest(),
            torn = ?report.torn,
            "recovered log"
        );
        let inline = store::syncs_inline(&config.data_dir, shard, config.persistence);
        if inline {
            tracing::info!(node = me, %shard, "the log is on tmpfs: synced on the event loop's thread");
        }
        let store = store::ShardStore::start(
            shard,
            log,
            view_id,
            config.persistence,
            inline,
            notify.clone(),
            chunk_size,
        )
        .with_context(|| format!("recording the view in the log of {shard}"))?;
        stores.insert(shard, store);
    }
    tracing::info!(node = me, start = ?start, "starting");
    driver::Driver::run(config, start, stores, notify).await
}

/// The views a node with a recorded state comes back with.
fn restart_views(config: &NodeConfig, state: &NodeState) -> anyhow::Result<Start> {
    let me = config.node_id;
    if state.spec != config.layout_spec() {
        bail!(
            "the layout parameters changed: the recorded view {} was made with {:?}, the \
             configuration says {:?}",
            state.view_id,
            state.spec,
            config.layout_spec()
        );
    }
    let recorded = state
        .view()
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.data_dir.join(STATE_FILE).display()))?;
    if recorded.rank_of(me).is_none() {
        bail!(
            "node {me} is not a member of its recorded view {} ({:?})",
            recorded.view_id,
            recorded.members
        );
    }
    let addresses = config.initial_members();
    if let Some(m) = recorded
        .members
        .iter()
        .find(|m| !addresses.iter().any(|a| a.id == **m) && recorded.addr_of(**m).is_none())
    {
        bail!(
            "member {m} of the recorded view has no address: not in `members`, and the view \
             carries none"
        );
    }
    Ok(Start::Restart {
        recorded,
        logged: state.decision.clone(),
    })
}

/// The file system's chunk size from `layout.chunk_size`, checked against what the file system
/// and one request can carry: a chunk's write travels as one request of at most
/// `REQUEST_BYTES_MAX`.
pub fn fs_chunk_size(config: &NodeConfig) -> anyhow::Result<u32> {
    let chunk = config.layout.chunk_size;
    let limit = (derechofs_core::REQUEST_BYTES_MAX / 2) as u64;
    if chunk > limit {
        bail!(
            "layout.chunk_size {chunk} is above {limit}: a chunk's write must fit in one request"
        );
    }
    let chunk = u32::try_from(chunk).context("layout.chunk_size is too large")?;
    derechofs_fs::chunk::check_chunk_size(chunk)
        .map_err(|e| anyhow::anyhow!("layout.chunk_size: {e}"))?;
    Ok(chunk)
}
