//! The node's event loop: it links the members, ticks the engine, carries out its actions, and
//! serves the clients' requests.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use derechofs_core::kv::{KvReply, KvRequest, ReadAt};
use derechofs_core::transport::frame::dials;
use derechofs_core::transport::{
    BreakReason, ClientConn, ClientId, ConnectError, LinkEvent, Payload, Peer, SendError, Transport,
};
use derechofs_core::{
    Action, Decision, Delivery, Hlc, Input, Membership, Message, Node, NodeId, Now, Record,
    ShardId, StepError, Subgroup, SubmitError, Version, View,
};
use derechofs_storage::{LogError, RecordCursor};
use tokio::sync::Notify;

use super::clients::{
    Clients, DurableWait, ReadWait, ReadWhat, Submitted, Until, Watch, DURABLE_WAITS_MAX,
    READ_WAITS_MAX, SUBMITTED_MAX, WATCHERS_MAX,
};
use super::failed::{self, ReplicaFailed};
use super::machine::{Machine, Outcome};
use super::state::{LoggedDecision, NodeState};
use super::store::{check_chunk_size, open_log, syncs_inline, ShardStore};
use super::Start;
use crate::config::{Member, NodeConfig};
use crate::protocol::{
    self, Change, ErrorCode, Event, LayoutInfo, NodeStatus, Reply, Request, ShardInfo,
    ShardStatusInfo, SubgroupShard, HISTORY_ENTRIES_MAX, MACHINE_KV, WATCHES_PER_CLIENT_MAX,
};

/// Longest interval between engine ticks. Ticks only drive timers (heartbeats, suspicion,
/// floors, grace periods and read deadlines), never the ordering of writes; each one wakes the
/// event loop, and re-arming the timer signals the runtime's eventfd (a system call).
pub const TICK_MS_MAX: u64 = 10;

/// Interval between engine ticks: half a heartbeat interval (so a heartbeat is at most that
/// late), at most [`TICK_MS_MAX`].
pub fn tick_ms(heartbeat_ms: u64) -> u64 {
    (heartbeat_ms / 2).clamp(1, TICK_MS_MAX)
}

/// Applying one version for this long or longer is logged: the event loop sent no heartbeat
/// meanwhile.
const SLOW_APPLY_MS: u64 = 100;
/// A wait of the event loop on a member's full link queue this long or longer is logged (the
/// loop takes no other event meanwhile).
pub const FULL_LINK_WARN_MS: u64 = 250;
/// Interval between attempts to dial a member that is not up yet.
pub const DIAL_RETRY_MS: u64 = 100;
/// Resume points of state transfers this node serves, one per member and shard at most; beyond
/// it they are dropped (a read then rescans its segment).
pub const TRANSFER_CURSORS_MAX: usize = 1024;
/// Peer messages held while the view forms (before every member is linked).
pub const EARLY_MESSAGES_MAX: usize = 1 << 16;
/// Time a member that closed its links in order (it was told to stop) has before the others
/// suspect it: long enough for an operator's "stop every node" to reach them all, so the whole
/// group stops in one view; far below `suspect_after_ms`. A member that dies is suspected at once.
pub const STOPPED_PEER_GRACE_MS: u64 = 250;
/// Link events the driver takes in one turn before it moves the engine on: client writes among
/// them are queued and leave together in one multicast message per shard.
pub const EVENTS_PER_TURN_MAX: usize = 256;

/// How many turns of the event loop the sync of a log on tmpfs may wait for a turn after which
/// no link event is waiting: under load, one sync then covers the deliveries of several turns.
const INLINE_SYNC_TURNS_MAX: usize = 4;

/// Bytes of messages held for members of the view that are not linked yet; beyond it the
/// member is treated as a broken link (suspected).
pub const HELD_BYTES_MAX: usize = 64 << 20;
/// Messages held for one member that is not linked yet; beyond it, as above.
pub const HELD_MESSAGES_MAX: usize = 1 << 16;
/// Probe answers waiting for the driver (one per member at most).
pub const PROBES_MAX: usize = 64;
/// Time a probe waits for a member's answer.
pub const PROBE_TIMEOUT_MS: u64 = 2_000;

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Within each run of sends, deliveries and persist requests (the engine's output of one step,
/// between any actions that change the view or the logs otherwise), puts the sends first, each
/// group in its order. The engine delivers before it sends what a step made ready (its window
/// may open with its own deliveries), and nothing it sends depends on the driver having applied
/// the deliveries: a row's `delivered` only bounds the peers' windows, and what was persisted
/// reaches the engine later, as an input. Sending first lets the peers act on the rows and
/// messages while this node applies.
fn sends_first(actions: &mut [Action]) {
    let movable = |a: &Action| {
        matches!(
            a,
            Action::Send { .. } | Action::Deliver { .. } | Action::Persist { .. }
        )
    };
    let mut start = 0;
    while start < actions.len() {
        if !movable(&actions[start]) {
            start += 1;
            continue;
        }
        let end = actions[start..]
            .iter()
            .position(|a| !movable(a))
            .map_or(actions.len(), |n| start + n);
        // Stable: sends keep their order, and so do the deliveries and persist requests. Most
        // runs are in that order already (sends alone, or no send at all).
        let run = &mut actions[start..end];
        let not_send = |a: &Action| !matches!(a, Action::Send { .. });
        if !run.is_sorted_by_key(not_send) {
            run.sort_by_key(not_send);
        }
        start = end;
    }
}

/// The engine's clocks now: the wall clock for stamps, and for timers a monotonic clock (never
/// stepped when the wall clock is set) counted from the wall clock's reading at the first call,
/// so that it is well above 0.
fn now() -> Now {
    static ORIGIN: std::sync::OnceLock<(Instant, u64)> = std::sync::OnceLock::new();
    let &(start, base_us) = ORIGIN.get_or_init(|| (Instant::now(), now_us().max(1)));
    let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    Now {
        wall_us: now_us(),
        mono_us: base_us.saturating_add(elapsed_us),
    }
}

/// The node's state outside the engine.
#[derive(Debug)]
pub struct Driver {
    me: NodeId,
    config: NodeConfig,
    node: Node,
    /// The view the engine runs, as of the last `InstallView` carried out.
    view: View,
    view_id: u32,
    transport: Arc<Transport>,
    stores: BTreeMap<ShardId, ShardStore>,
    /// Shards this node was newly assigned by a view change and whose log state transfer has
    /// not brought up to date yet: they serve no client until the engine says `CaughtUp`.
    incomplete: HashSet<ShardId>,
    notify: Arc<Notify>,
    /// Every configured member's address.
    addresses: Vec<Member>,
    layout: LayoutInfo,
    peers: Vec<NodeId>,
    linked: HashSet<NodeId>,
    /// The view each linked peer declared in its handshake.
    declared: HashMap<NodeId, u32>,
    /// A probed member runs a view without this node.
    left_out: bool,
    /// Coming back from a recorded view: it, until the node knows which view it runs.
    restart: Option<View>,
    /// The group runs this later view than the one this node came back in: it is behind.
    behind: Option<u32>,
    /// Every member is linked and the engine runs.
    formed: bool,
    /// Started outside `members`: joining the group for the first time, until welcomed.
    joining: bool,
    /// The engine left the view it ran (it was removed while running, or came back behind)
    /// and asks to join again; the transport relinks with any member until it is welcomed.
    outside: bool,
    early: Vec<(NodeId, Message)>,
    clients: Clients,
    next_request_id: u64,
    actions: Vec<Action>,
    /// Members that closed their links in order, and when to suspect them.
    stopping: Vec<(NodeId, Instant)>,
    /// Messages for members of the current view with no link yet (a restart or a join runs
    /// the view before every link is up), in send order: sent first once the link is up, so
    /// nothing sent in the view is lost while the peers' dial loops link them.
    held: HashMap<NodeId, VecDeque<Payload>>,
    held_bytes: usize,
    /// Members whose link broke in the current view: the engine suspects them; nothing is held
    /// for them.
    broke: HashSet<NodeId>,
    /// Inputs the driver owes the engine after carrying out its actions (`TrimLogged`,
    /// `RecordsRead`).
    followups: VecDeque<Input>,
    /// Turns since a log that syncs on this thread was asked to persist (0: nothing owed).
    inline_owed: usize,
    /// Where the last piece read for a member of a shard ended, to resume the next there.
    transfer_cursors: HashMap<(NodeId, ShardId), RecordCursor>,
    time_read_wait: Duration,
    /// Bytes of a file chunk, for the layout clients learn.
    chunk_size: u32,
    /// Within a turn of link events: client writes are queued in the engine, not sent, and
    /// the multicast's messages are taken without moving the engine on.
    in_turn: bool,
    /// Writes or messages were queued this turn: the engine must be moved on at its end.
    queued: bool,
}

impl Driver {
    /// Links the members and runs until SIGINT or SIGTERM.
    pub async fn run(
        config: NodeConfig,
        start: Start,
        stores: BTreeMap<ShardId, ShardStore>,
        notify: Arc<Notify>,
    ) -> anyhow::Result<()> {
        let me = config.node_id;
        let secret = config.secret()?;
        // What every member must share, stated in each handshake: a peer configured otherwise
        // never links, and both nodes log what differs.
        let settings = derechofs_core::transport::GroupSettings {
            spec: config.layout_spec(),
            chunk_size: super::fs_chunk_size(&config)?,
        };
        let (transport, mut events) = Transport::bind_with(
            config.listen,
            me,
            secret,
            config.local_socket_dir.as_deref(),
            Some(settings),
        )
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
        let mut joiner = None;
        let (view, restart, logged) = match start {
            Start::Fresh(view) => {
                transport.set_view(view.view_id);
                (view, None, None)
            }
            // The engine restarts in the recorded view; handshakes declare it.
            Start::Restart { recorded, logged } => {
                transport.set_view(recorded.view_id);
                (recorded.clone(), Some(recorded), logged)
            }
            // Not in `members`: the engine asks the members to add it; until it is welcomed
            // the node stands in the engine's one-node placeholder view 0.
            Start::Join => {
                let contacts: Vec<NodeId> = config.join_contacts().iter().map(|m| m.id).collect();
                tracing::info!(node = me, contacts = ?contacts, "not in `members`: joining the group");
                let node = Node::joining(config.engine_config(), contacts, Vec::new(), 0)
                    .context("starting the engine as a joiner")?;
                let view = node.view().clone();
                joiner = Some(node);
                (view, None, None)
            }
        };
        let transport = Arc::new(transport);
        // The configured members, and the members the view says joined with an address.
        let mut addresses = config.initial_members();
        for &(id, addr) in &view.addrs {
            match addresses.iter_mut().find(|m| m.id == id) {
                Some(member) => member.addr = addr,
                None => addresses.push(Member { id, addr }),
            }
        }
        transport.know(addresses.iter().map(|m| m.id).filter(|&id| id != me));
        // Every known node, member of the view or not: a member removed while it was down,
        // once restarted, joins again over these links.
        for member in &addresses {
            if dials(me, member.id) {
                tokio::spawn(dial(transport.clone(), member.id, member.addr));
            }
        }
        if joiner.is_some() {
            // The members do not know this node yet, so they cannot dial it: it dials those it
            // would not by the ids, until they know it (from the view that adds it).
            for member in config.join_contacts() {
                if !dials(me, member.id) {
                    tokio::spawn(dial_joining(transport.clone(), member.id, member.addr));
                }
            }
        }
        let (probed, mut probes) = tokio::sync::mpsc::channel(PROBES_MAX);
        if restart.is_some() {
            // Members that dial this node do not if they already removed it: ask them for
            // their view as a client does, so that a node left behind knows it.
            for member in &addresses {
                if member.id != me && view.members.contains(&member.id) && !dials(me, member.id) {
                    let secret = config.secret()?;
                    tokio::spawn(probe(member.id, member.addr, secret, probed.clone()));
                }
            }
        }
        drop(probed);
        let chunk_size = super::fs_chunk_size(&config)?;
        let layout = layout_info(&view, &addresses, chunk_size);
        let view_id = view.view_id;
        let peers: Vec<NodeId> = view
            .members
            .iter()
            .copied()
            .filter(|&id| id != me)
            .collect();
        let joining = joiner.is_some();
        let node = match &restart {
            None if joining => joiner.take().context("the joiner's engine")?,
            None => derechofs_core::Node::new(config.engine_config(), view.clone())?,
            Some(recorded) => {
                // The last record of each shard log, already cut back to the logged trim.
                let logs = stores
                    .iter()
                    .map(|(shard, store)| (*shard, store.kv().log().latest()))
                    .collect();
                let logged = logged.map(|l| (l.round, l.decision));
                Node::restarting(config.engine_config(), recorded.clone(), logged, logs)
                    .context("starting the engine in the recorded view")?
            }
        };
        let time_read_wait = Duration::from_millis(config.time_read_wait_ms);
        let mut driver = Driver {
            me,
            config,
            node,
            view,
            view_id,
            transport,
            stores,
            incomplete: HashSet::new(),
            notify: notify.clone(),
            addresses,
            layout,
            formed: false,
            outside: false,
            joining,
            peers,
            linked: HashSet::new(),
            declared: HashMap::new(),
            left_out: false,
            restart,
            behind: None,
            early: Vec::new(),
            clients: Clients::default(),
            next_request_id: 1,
            actions: Vec::new(),
            followups: VecDeque::new(),
            inline_owed: 0,
            transfer_cursors: HashMap::new(),
            stopping: Vec::new(),
            held: HashMap::new(),
            held_bytes: 0,
            broke: HashSet::new(),
            time_read_wait,
            chunk_size,
            in_turn: false,
            queued: false,
        };
        driver.check_formed().await?;
        let mut ticker =
            tokio::time::interval(Duration::from_millis(tick_ms(driver.config.heartbeat_ms)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let mut interrupt =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("installing the SIGINT handler")?;
        // The signals are awaited by a task of their own, which says so once: the loop below
        // polls every branch of its `select!` on every turn, and a oneshot is cheaper to poll
        // than the two signal streams.
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        let signals = tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            let _ = stop_tx.send(());
        })
        .abort_handle();
        // Whichever way the loop ends, the task ends with it.
        struct Abort(tokio::task::AbortHandle);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _signals = Abort(signals);
        loop {
            let result = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => {
                        // Every event already waiting is taken in this turn, so the client
                        // writes among them leave in one message instead of one each.
                        driver.in_turn = true;
                        let mut result = driver.link_event(event).await;
                        for _ in 1..EVENTS_PER_TURN_MAX {
                            if result.is_err() {
                                break;
                            }
                            match events.try_recv() {
                                Ok(event) => result = driver.link_event(event).await,
                                Err(_) => break,
                            }
                        }
                        driver.in_turn = false;
                        if result.is_ok() && std::mem::take(&mut driver.queued) {
                            result = driver.flush().await;
                        }
                        result
                    }
                    None => anyhow::bail!("the transport stopped"),
                },
                Some((peer, layout)) = probes.recv() => driver.probed(peer, layout).await,
                _ = ticker.tick() => driver.tick().await,
                _ = notify.notified() => driver.persisted().await,
                _ = &mut stop => break,
            };
            // The syncs of logs on tmpfs run once the loop finds no link event waiting (or
            // after `INLINE_SYNC_TURNS_MAX` turns), so under load one covers several turns;
            // the rows they change leave before the loop waits again.
            let result = match result {
                Ok(()) if driver.inline_owed > 0 => {
                    if events.is_empty() || driver.inline_owed >= INLINE_SYNC_TURNS_MAX {
                        driver.sync_inline().await
                    } else {
                        driver.inline_owed += 1;
                        Ok(())
                    }
                }
                other => other,
            };
            if let Err(e) = result {
                if let Some(failed) = e.downcast_ref::<ReplicaFailed>() {
                    // Fail-stop (see `failed`): record why, then stop; dropping the driver
                    // closes every link, and the other members remove this node at once.
                    let reason = failed.to_string();
                    tracing::error!(node = me, "{reason}");
                    if let Err(m) = failed::record(&driver.config.data_dir, &reason) {
                        tracing::error!(node = me, error = %format!("{m:#}"), "the failure could not be recorded");
                    }
                }
                return Err(e);
            }
        }
        tracing::info!(node = me, "stopping");
        // Say bye on every link, so the members see an orderly stop (and give it
        // `STOPPED_PEER_GRACE_MS`) rather than a dead connection they suspect at once.
        driver.transport.close().await;
        Ok(())
    }

    /// Steps the engine and carries out its actions, then the inputs those actions owe it;
    /// returns the first step's own error, if any.
    async fn step(&mut self, input: Input) -> anyhow::Result<Option<StepError>> {
        self.advance(Some(input)).await
    }

    /// Hands the engine `input` without moving it on (`Node::step_queued`); the turn's
    /// `flush` does. Carries out the actions the input itself caused.
    async fn take_queued(&mut self, input: Input) -> anyhow::Result<Option<StepError>> {
        let mut actions = std::mem::take(&mut self.actions);
        let error = self.node.step_queued(now(), input, &mut actions).err();
        self.queued = true;
        let result = self.carry_out(&mut actions).await;
        actions.clear();
        self.actions = actions;
        result?;
        Ok(error)
    }

    /// Moves the engine on without a new input (sending the writes queued this turn), and
    /// carries out its actions.
    async fn flush(&mut self) -> anyhow::Result<()> {
        self.advance(None).await.map(|_| ())
    }

    async fn advance(&mut self, input: Option<Input>) -> anyhow::Result<Option<StepError>> {
        let mut next = Some(input);
        let mut first = true;
        let mut error = None;
        while let Some(input) = next.take().or_else(|| self.followups.pop_front().map(Some)) {
            let mut actions = std::mem::take(&mut self.actions);
            let e = match input {
                Some(input) => self.node.step(now(), input, &mut actions).err(),
                None => {
                    self.node.flush(now(), &mut actions);
                    None
                }
            };
            match e {
                Some(e) if first => error = Some(e),
                Some(e) => tracing::debug!(node = self.me, error = %e, "follow-up input refused"),
                None => {}
            }
            first = false;
            let result = self.carry_out(&mut actions).await;
            actions.clear();
            self.actions = actions;
            result?;
        }
        self.follow_membership();
        self.progress();
        Ok(error)
    }

    /// Takes the addresses `view` carries for members that joined with one: clients learn
    /// them, and this node links with those members (it dials those with higher ids; the
    /// transport refuses their dials the other way from now on).
    fn learn_addresses(&mut self, view: &View) {
        for &(id, addr) in &view.addrs {
            match self.addresses.iter_mut().find(|m| m.id == id) {
                Some(member) => {
                    // A known node that announced another address (it moved): dial there
                    // from now on; the dial loop already running keeps the old one.
                    member.addr = addr;
                }
                None => {
                    self.addresses.push(Member { id, addr });
                    if id != self.me {
                        tracing::info!(node = self.me, peer = id, %addr, "learned a member's address from the view");
                        self.transport.know([id]);
                        if dials(self.me, id) {
                            tokio::spawn(dial(self.transport.clone(), id, addr));
                        }
                    }
                }
            }
        }
    }

    /// A message for `to`, which has no link: kept for when it links if it is a member of the
    /// view whose link did not break in it (the engine relies on reliable FIFO links in a
    /// view); beyond the bounds the member is treated as a broken link.
    fn hold(&mut self, to: NodeId, payload: Payload) {
        if to == self.me || !self.view.members.contains(&to) || self.broke.contains(&to) {
            tracing::debug!(node = self.me, peer = to, "message not sent: no link");
            return;
        }
        let queue = self.held.entry(to).or_default();
        if queue.len() >= HELD_MESSAGES_MAX || self.held_bytes + payload.len() > HELD_BYTES_MAX {
            tracing::warn!(
                node = self.me,
                peer = to,
                "too many messages wait for a member that does not link; suspecting it"
            );
            self.held_bytes -= queue.iter().map(Payload::len).sum::<usize>();
            self.held.remove(&to);
            self.broke.insert(to);
            self.followups.push_back(Input::LinkBroken { peer: to });
            return;
        }
        self.held_bytes += payload.len();
        queue.push_back(payload);
    }

    /// Sends what was held for `peer`, now linked, in order.
    async fn flush_held(&mut self, peer: NodeId) {
        let Some(queue) = self.held.remove(&peer) else {
            return;
        };
        self.held_bytes -= queue.iter().map(Payload::len).sum::<usize>();
        tracing::info!(
            node = self.me,
            peer,
            messages = queue.len(),
            "sending what waited for the link"
        );
        for payload in queue {
            if let Err(e) = self
                .transport
                .send_payload(Peer::Node(peer), self.view_id, &payload)
                .await
            {
                tracing::debug!(node = self.me, peer, error = %e, "held message not sent");
                break;
            }
        }
    }

    /// Notices the engine leaving its view: a view change that removed this node while it ran
    /// (its peers suspected it, or a total restart adopted a decision made before a stop that
    /// removed it). The engine then asks the members of the next view to add it again by
    /// itself; for its requests to reach them the transport must relink links that broke in
    /// the view it left, which the ordinary rule forbids until a later view.
    fn follow_membership(&mut self) {
        let outside = self.node.membership() == Membership::Joining;
        if outside && !self.outside {
            if self.behind.is_none() && !self.joining {
                tracing::warn!(
                    node = self.me,
                    view_id = self.view_id,
                    "removed from the group by a view change; asking to join again"
                );
            }
            self.transport.leave_view();
        }
        self.outside = outside;
    }

    async fn carry_out(&mut self, actions: &mut Vec<Action>) -> anyhow::Result<()> {
        sends_first(actions);
        // A data message goes to every peer of its shard as the same bytes: encoded (without
        // copying large payloads) and checksummed once.
        let mut last_data: Option<((u32, ShardId, u64), Payload)> = None;
        // Messages queued for members and not written yet: the link writers are tasks of this
        // thread, which write only when the loop lets them run.
        let mut queued_for_members = false;
        for action in actions.drain(..) {
            if queued_for_members && matches!(action, Action::Deliver { .. }) {
                // Applying a delivery (and then syncing a log on tmpfs) is the longest part of
                // a turn: the messages go out first, so the members that wait for them (for a
                // row, to deliver themselves) go on meanwhile, on the other CPU.
                queued_for_members = false;
                tokio::task::yield_now().await;
            }
            match action {
                Action::Send { to, message } => {
                    let payload = match (&message, &last_data) {
                        (
                            Message::Data {
                                view_id,
                                shard,
                                index,
                                ..
                            },
                            Some((key, payload)),
                        ) if *key == (*view_id, *shard, *index) => payload.clone(),
                        (
                            Message::Data {
                                view_id,
                                shard,
                                index,
                                ..
                            },
                            _,
                        ) => {
                            let payload = Payload::from_parts(message.to_parts());
                            last_data = Some(((*view_id, *shard, *index), payload.clone()));
                            payload
                        }
                        _ => Payload::new(Bytes::from(message.to_bytes())),
                    };
                    match self.send_to_member(to, &payload).await {
                        Ok(()) => queued_for_members = true,
                        Err(SendError::NoLink(_)) => self.hold(to, payload),
                        Err(e) => {
                            tracing::debug!(node = self.me, peer = to, error = %e, "message not sent")
                        }
                    }
                }
                Action::Deliver { shard, deliveries } => self.deliver(shard, deliveries)?,
                Action::Persist { shard, version } => match self.stores.get_mut(&shard) {
                    Some(store) => {
                        store.persist(version);
                        if store.syncs_inline() {
                            // A log on tmpfs: synced by this thread at the end of the turn
                            // (`sync_inline`), with no persister thread to wake and be woken by.
                            self.inline_owed = self.inline_owed.max(1);
                        }
                    }
                    None => tracing::warn!(node = self.me, %shard, "persist of a shard not here"),
                },
                Action::Suspect { node } => {
                    tracing::warn!(node = self.me, suspect = node, "suspecting a member");
                }
                Action::Wedge => {
                    tracing::warn!(
                        node = self.me,
                        view_id = self.view_id,
                        "wedged: the view changes; writes are refused until it does, reads go on"
                    );
                    // A write the trim keeps is applied all the same; the client's retry,
                    // with the same request number, then gets the reply it had.
                    self.fail_submitted(wedged_error());
                }
                Action::LogTrim {
                    view_id,
                    round,
                    decision,
                } => self.log_trim(view_id, round, decision).await?,
                Action::InstallView { view } => self.install(view).await?,
                Action::ReadRecords {
                    to,
                    shard,
                    view_id,
                    after,
                    end,
                    bytes_max,
                    records_max,
                } => {
                    self.read_records(to, shard, view_id, after, end, (bytes_max, records_max))
                        .await?
                }
                Action::AppendRecords { shard, records } => {
                    self.append_records(shard, records).await?
                }
                Action::TruncateLog { shard, after } => {
                    let Some(store) = self.stores.get(&shard) else {
                        anyhow::bail!("asked to cut {shard}, which this node does not keep");
                    };
                    tracing::warn!(node = self.me, %shard, ?after, "cutting the log back to where a total restart ended it");
                    store
                        .kv()
                        .log_mut()
                        .truncate_after(after.unwrap_or(0))
                        .with_context(|| format!("cutting the log of {shard}"))?;
                }
                Action::CaughtUp { shard } => {
                    tracing::info!(node = self.me, %shard, "caught up by state transfer: serving");
                    self.incomplete.remove(&shard);
                }
            }
        }
        Ok(())
    }

    /// Sends `payload` to member `to`, waiting while its link's queue is full. The event loop
    /// does nothing else meanwhile (no tick, no heartbeat, no peer message taken), so a wait
    /// of [`FULL_LINK_WARN_MS`] or more is logged when it starts and when it ends: a member
    /// that reads nothing while its link stays up holds this node.
    async fn send_to_member(&self, to: NodeId, payload: &Payload) -> Result<(), SendError> {
        let send = self
            .transport
            .send_payload(Peer::Node(to), self.view_id, payload);
        tokio::pin!(send);
        let warn_after = Duration::from_millis(FULL_LINK_WARN_MS);
        match tokio::time::timeout(warn_after, &mut send).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    node = self.me,
                    peer = to,
                    waited_ms = FULL_LINK_WARN_MS,
                    "the link to a member is full; the event loop waits for it to drain"
                );
                let started = Instant::now();
                let result = send.await;
                tracing::warn!(
                    node = self.me,
                    peer = to,
                    waited_ms = FULL_LINK_WARN_MS + started.elapsed().as_millis() as u64,
                    "the link to a member drained"
                );
                result
            }
        }
    }

    /// State transfer, serving side: reads the next piece of `shard`'s log for member `to` and
    /// owes the engine the answer. The log holds every version up to `end` persisted. The read
    /// (up to a piece from disk) runs on the blocking pool: the links go on meanwhile.
    async fn read_records(
        &mut self,
        to: NodeId,
        shard: ShardId,
        view_id: u32,
        after: Option<Version>,
        end: Version,
        (bytes_max, records_max): (usize, usize),
    ) -> anyhow::Result<()> {
        let Some(store) = self.stores.get(&shard) else {
            anyhow::bail!("asked to serve {shard}, which this node does not keep");
        };
        let resume = self.transfer_cursors.get(&(to, shard)).copied();
        let machine = store.machine();
        let (stored, cursor) = tokio::task::spawn_blocking(move || {
            machine
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .log()
                .read_records(after, end, bytes_max, records_max, resume)
        })
        .await
        .context("the log reader failed")?
        .with_context(|| format!("reading {shard} for node {to}"))?;
        match cursor {
            Some(cursor) => {
                if self.transfer_cursors.len() >= TRANSFER_CURSORS_MAX {
                    self.transfer_cursors.clear();
                }
                self.transfer_cursors.insert((to, shard), cursor);
            }
            None => {
                self.transfer_cursors.remove(&(to, shard));
            }
        }
        let records: Vec<Record> = stored
            .into_iter()
            .map(|r| Record {
                version: r.version,
                hlc: r.hlc,
                payload: r.payload,
            })
            .collect();
        anyhow::ensure!(
            !records.is_empty(),
            "the log of {shard} holds nothing after {after:?} up to {end:#x}"
        );
        self.followups.push_back(Input::RecordsRead {
            to,
            shard,
            view_id,
            after,
            records,
        });
        Ok(())
    }

    /// State transfer, receiving side: appends the records to the shard's log as they are. A
    /// record the log already holds (a node given back a shard whose log it kept) is skipped:
    /// that log is a prefix of the shard's. The appends run on the blocking pool: the links go
    /// on meanwhile.
    async fn append_records(&mut self, shard: ShardId, records: Vec<Record>) -> anyhow::Result<()> {
        let Some(store) = self.stores.get(&shard) else {
            anyhow::bail!("records of {shard}, which this node does not keep");
        };
        let machine = store.machine();
        tokio::task::spawn_blocking(move || {
            let mut kv = machine.lock().unwrap_or_else(|p| p.into_inner());
            let log = kv.log_mut();
            let last = log.latest().map(|(v, _)| v);
            for record in records.iter().filter(|r| Some(r.version) > last) {
                log.append_payload(record.version, record.hlc, &record.payload)
                    .map_err(|e| ReplicaFailed {
                        shard,
                        version: record.version,
                        cause: anyhow::anyhow!("appending a transferred record: {e}"),
                    })?;
            }
            Ok::<(), ReplicaFailed>(())
        })
        .await
        .context("the log appender failed")??;
        Ok(())
    }

    /// Answers every write submitted and not delivered with `reply`: the client resends it.
    fn fail_submitted(&mut self, reply: Reply) {
        let submitted: Vec<Submitted> = self.clients.submitted.drain().map(|(_, s)| s).collect();
        for s in submitted {
            self.send_client(s.client, reply.encode(s.tag));
        }
    }

    /// Makes the decision that ends the current view durable with the view, then tells the
    /// engine. The node cannot go on without its disk, so a failure stops it.
    async fn log_trim(
        &mut self,
        view_id: u32,
        round: u64,
        decision: Decision,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(
            view_id == self.view.view_id,
            "asked to log a decision of view {view_id} in view {}",
            self.view.view_id
        );
        let state = NodeState {
            decision: Some(LoggedDecision {
                round,
                decision: decision.clone(),
            }),
            ..NodeState::of_view(&self.view)
        };
        self.save_state(state).await?;
        tracing::info!(
            node = self.me,
            view_id,
            round,
            removed = ?removed_members(&self.view, decision.removed),
            trims = ?decision.trims,
            "logged the decision that ends the view"
        );
        self.followups
            .push_back(Input::TrimLogged { view_id, round });
        Ok(())
    }

    async fn save_state(&self, state: NodeState) -> anyhow::Result<()> {
        let dir = self.config.data_dir.clone();
        tokio::task::spawn_blocking(move || state.save(&dir))
            .await
            .context("the state writer failed")?
            .context("recording the view state")
    }

    /// The engine installed `view`: record it, follow it in the transport and the stores, and
    /// show it to clients.
    async fn install(&mut self, view: View) -> anyhow::Result<()> {
        self.save_state(NodeState::of_view(&view)).await?;
        let removed: Vec<NodeId> = self
            .view
            .members
            .iter()
            .copied()
            .filter(|m| !view.members.contains(m))
            .collect();
        self.view_id = view.view_id;
        self.transport.set_view(view.view_id);
        // Messages held for the old view are of no use in the new one; links that broke in
        // the old view may open again.
        self.held.clear();
        self.held_bytes = 0;
        self.broke.clear();
        // Links with removed members stay up: a member removed while it runs (its peers
        // suspected it, or a restart adopted a decision made before a stop) joins again over
        // them, and the view that adds it back must reach it over a link that did not break in
        // between (a message to a member with no link is lost, and nothing would tell).
        // Orderly stops seen in the old view concern the new one only if the link is still
        // down.
        let linked = &self.linked;
        self.stopping
            .retain(|(peer, _)| view.members.contains(peer) && !linked.contains(peer));
        self.peers = view
            .members
            .iter()
            .copied()
            .filter(|&id| id != self.me)
            .collect();
        self.learn_addresses(&view);
        if std::mem::take(&mut self.joining) {
            tracing::info!(
                node = self.me,
                view_id = view.view_id,
                "welcomed into the group"
            );
        }
        self.layout = layout_info(&view, &self.addresses, self.chunk_size);
        // A restart that adopted a decision logged before the stop installs its view still
        // restarting, and restarts again from it.
        self.restart = self.node.is_restarting().then(|| view.clone());
        let mine: Vec<ShardId> = view.layout.shards_of(self.me).map(|s| s.id).collect();
        // Closing a store joins its persister thread, which may be in an fsync: on the
        // blocking pool, so the links go on meanwhile.
        let gone: Vec<ShardId> = self
            .stores
            .keys()
            .filter(|shard| !mine.contains(shard))
            .copied()
            .collect();
        for &shard in &gone {
            let message = format!("a view change took {shard} away from node {}", self.me);
            self.end_watches(Some(shard), &error(ErrorCode::NotReplica, &message));
        }
        // Namespace feeds end at every view change: their clients clear what they cached and
        // subscribe again (docs/SEMANTICS.md), so no cache outlives a view unchecked.
        self.end_fs_watches(&error(
            ErrorCode::Wedged,
            &format!("view {} installed: subscribe again", view.view_id),
        ));
        let closed: Vec<ShardStore> = gone
            .iter()
            .filter_map(|shard| self.stores.remove(shard))
            .collect();
        if !closed.is_empty() {
            tokio::task::spawn_blocking(move || drop(closed))
                .await
                .context("closing the stores of shards this node no longer replicates")?;
        }
        self.incomplete.retain(|shard| mine.contains(shard));
        if self.behind.take().is_some() {
            tracing::info!(
                node = self.me,
                view_id = view.view_id,
                "welcomed back into the group"
            );
        }
        for shard in mine {
            if self.stores.contains_key(&shard) {
                // A joiner's log (kept from before it was removed) lacks the versions the
                // group delivered since: it serves no client until the transfer ends.
                if self.node.status(shard).is_some_and(|s| s.catching_up) {
                    tracing::info!(node = self.me, %shard, view_id = view.view_id, "catching up the log it kept by state transfer");
                    self.incomplete.insert(shard);
                }
                continue;
            }
            // A shard new to this node: state transfer brings its log (resuming after what the
            // log kept, if this node had the shard before); it serves no client until then.
            let dir = self.config.data_dir.clone();
            let sync = self.config.persistence;
            let notify = self.notify.clone();
            let chunk_size = self.chunk_size;
            let view_id = view.view_id;
            // Opening recovers the log and starting records the view in its metadata (an
            // fsync): both on the blocking pool.
            let store = tokio::task::spawn_blocking(move || -> anyhow::Result<ShardStore> {
                let log = open_log(&dir, shard, sync)?;
                // A log this node kept from an earlier assignment, written with other chunks.
                check_chunk_size(&log, &dir, shard, chunk_size).map_err(anyhow::Error::msg)?;
                let inline = syncs_inline(&dir, shard, sync);
                Ok(ShardStore::start(
                    shard, log, view_id, sync, inline, notify, chunk_size,
                )?)
            })
            .await
            .context("the log opener failed")?
            .with_context(|| format!("opening the log of {shard}"))?;
            tracing::info!(node = self.me, %shard, view_id = view.view_id, "newly assigned shard: catching up by state transfer");
            self.stores.insert(shard, store);
            self.incomplete.insert(shard);
        }
        tracing::info!(
            node = self.me,
            view_id = view.view_id,
            members = ?view.members,
            removed = ?removed,
            "installed the next view"
        );
        self.view = view;
        // Writes sent in the old view and cut by the trim will never be delivered: the clients
        // resend them (applied once, by their request numbers).
        self.fail_submitted(error(
            ErrorCode::Wedged,
            "the view changed before the write was delivered; resend it",
        ));
        Ok(())
    }

    /// Applies delivered versions, answers the writes this node submitted, and notifies watchers.
    fn deliver(&mut self, shard: ShardId, deliveries: Vec<Delivery>) -> anyhow::Result<()> {
        let Some(store) = self.stores.get(&shard) else {
            tracing::warn!(node = self.me, %shard, "delivery for a shard not here");
            return Ok(());
        };
        let mut out: Vec<(ClientId, Bytes)> = Vec::new();
        // Whether a client may wait for these versions to be durable, here or at the member
        // that submitted a request: every replica computes the same replies, so decides alike.
        let mut waited = false;
        for d in deliveries {
            let payloads: Vec<Bytes> = d.requests.iter().map(|r| r.payload.clone()).collect();
            let started = Instant::now();
            let applied =
                store
                    .kv()
                    .apply(d.version, d.hlc, &payloads)
                    .map_err(|e| ReplicaFailed {
                        shard,
                        version: d.version,
                        cause: anyhow::anyhow!("applying and appending the version: {e}"),
                    })?;
            waited |= applied
                .replies
                .iter()
                .any(|reply| waits_for_durability(true, reply));
            let took = started.elapsed();
            if took >= Duration::from_millis(SLOW_APPLY_MS) {
                // The event loop sent no heartbeat meanwhile; the engine does not count this
                // pause as its peers' silence, but they may count it as this node's.
                tracing::warn!(
                    node = self.me,
                    %shard,
                    version = d.version,
                    ms = took.as_millis() as u64,
                    "applying one version held the event loop"
                );
            }
            if d.sender == self.me {
                for (request, reply) in d.requests.iter().zip(&applied.replies) {
                    let Some(s) = self.clients.submitted.remove(&request.id) else {
                        continue;
                    };
                    let durable = waits_for_durability(s.durable, reply);
                    let bytes = match reply {
                        Outcome::Kv(reply) => Reply::Written(reply.clone()).encode(s.tag),
                        Outcome::Fs(reply) => {
                            let written = Reply::FsWritten {
                                version: d.version,
                                hlc: d.hlc,
                                reply: reply.clone(),
                            };
                            written.encode(s.tag)
                        }
                    };
                    let waits = self.clients.durable.entry(shard).or_default();
                    if durable && waits.len() < DURABLE_WAITS_MAX {
                        waits.push_back(DurableWait {
                            version: d.version,
                            client: s.client,
                            reply: bytes,
                        });
                    } else {
                        out.push((s.client, bytes));
                    }
                }
            }
            for (&client, watches) in &self.clients.watches {
                for w in watches
                    .iter()
                    .filter(|w| w.fs && w.shard == shard && d.version > w.after)
                {
                    let changed = Reply::FsChanged {
                        version: d.version,
                        inodes: applied.fs_inodes.clone(),
                        entries: applied.fs_entries.clone(),
                        xattrs: applied.fs_xattrs.clone(),
                    };
                    out.push((client, changed.encode(w.tag)));
                }
            }
            for (key, value) in applied.changed {
                for (&client, watches) in &self.clients.watches {
                    for w in watches.iter().filter(|w| {
                        !w.fs
                            && w.shard == shard
                            && d.version > w.after
                            && key.starts_with(&w.prefix)
                    }) {
                        let event = Event {
                            version: d.version,
                            hlc: d.hlc,
                            key: key.clone(),
                            value: value.clone(),
                        };
                        out.push((client, Reply::Event(event).encode(w.tag)));
                    }
                }
            }
        }
        if let Some(store) = self.stores.get_mut(&shard) {
            store.delivered(waited);
        }
        for (client, bytes) in out {
            self.send_client(client, bytes);
        }
        Ok(())
    }

    /// After the engine moved: answers the writes now durable and the reads now possible.
    fn progress(&mut self) {
        // A member removed from the group, or left in a minority, delivers nothing more: its
        // watchers resume on another member.
        if !self.clients.watches.is_empty() {
            let membership = self.membership();
            if matches!(membership, Membership::Joining | Membership::NoMajority) {
                let reply = self.membership_error(membership);
                self.end_watches(None, &reply);
            }
        }
        let mut out = Vec::new();
        for (shard, waits) in &mut self.clients.durable {
            let frontier = self.node.persistence_frontier(*shard);
            while waits.front().is_some_and(|w| Some(w.version) <= frontier) {
                if let Some(w) = waits.pop_front() {
                    out.push((w.client, w.reply));
                }
            }
        }
        let mut served = Vec::new();
        if !self.clients.reads.is_empty() {
            let reads = std::mem::take(&mut self.clients.reads);
            for mut read in reads {
                if read.until == Until::Lease {
                    // Removed meanwhile, or left in a minority: the client asks another member.
                    if let Some(refusal) = self.read_refusal(read.shard, read.at) {
                        out.push((read.client, refusal.encode(read.tag)));
                        continue;
                    }
                    if let Some(barrier) = self.leased_barrier(read.shard) {
                        read.until = barrier;
                    }
                }
                if self.ready(read.shard, read.until) {
                    let reply = self.serve(read.tag, read.shard, &read.what, read.at);
                    served.push((read.client, reply));
                } else {
                    self.clients.reads.push(read);
                }
            }
        }
        for (client, bytes) in out {
            self.send_client(client, bytes);
        }
        for (client, payload) in served {
            self.send_client_payload(client, payload);
        }
    }

    fn ready(&self, shard: ShardId, until: Until) -> bool {
        match until {
            Until::Delivered(v) => self
                .stores
                .get(&shard)
                .and_then(|s| s.kv().log().latest())
                .is_some_and(|(latest, _)| latest >= v),
            Until::Stable(t) => self.node.stability_frontier(shard).is_some_and(|f| f >= t),
            Until::Barrier(barrier) => self.node.barrier_reached(shard, barrier),
            Until::Lease => false,
        }
    }

    /// A barrier of `shard` to wait for, taken now if this member holds its read lease
    /// (`Node::holds_read_lease`, checked on the clock read now, not at the last step).
    fn leased_barrier(&self, shard: ShardId) -> Option<Until> {
        if self.node.holds_read_lease(now()) {
            self.node.barrier(shard).map(Until::Barrier)
        } else {
            None
        }
    }

    /// The reply message with `tag` to a read that can be answered now.
    fn serve(&self, tag: u64, shard: ShardId, what: &ReadWhat, at: ReadAt) -> Payload {
        match what {
            ReadWhat::Kv(key) => Payload::new(self.serve_read(shard, key, at).encode(tag)),
            ReadWhat::Fs(request) => match self.stores.get(&shard) {
                // The bytes read go into the message without an intermediate reply (large ones
                // as a part of their own, not copied).
                Some(store) => store.kv().read_fs_message(tag, at, request),
                None => Payload::new(
                    error(
                        ErrorCode::NotReplica,
                        "this node does not replicate the shard",
                    )
                    .encode(tag),
                ),
            },
        }
    }

    fn serve_read(&self, shard: ShardId, key: &[u8], at: ReadAt) -> Reply {
        let Some(store) = self.stores.get(&shard) else {
            return error(
                ErrorCode::NotReplica,
                "this node does not replicate the shard",
            );
        };
        let kv = store.kv();
        let kv = kv.kv();
        match (kv.version_of(at), kv.get(key, at)) {
            (Ok(read_version), Ok(found)) => Reply::Value {
                read_version,
                found,
            },
            (Err(e @ LogError::Trimmed { .. }), _) | (_, Err(e @ LogError::Trimmed { .. })) => {
                error(ErrorCode::Trimmed, &e.to_string())
            }
            (Err(e), _) | (_, Err(e)) => error(ErrorCode::Internal, &e.to_string()),
        }
    }

    fn send_client(&mut self, client: ClientId, bytes: Bytes) {
        let sent = self
            .transport
            .try_send(Peer::Client(client), self.view_id, bytes);
        self.sent_client(client, sent);
    }

    /// [`Driver::send_client`] of a message in parts.
    fn send_client_payload(&mut self, client: ClientId, payload: Payload) {
        let sent = self
            .transport
            .try_send_payload(Peer::Client(client), self.view_id, payload);
        self.sent_client(client, sent);
    }

    /// Closes the link of a client whose queue is full.
    fn sent_client(&mut self, client: ClientId, sent: Result<(), SendError>) {
        match sent {
            Ok(()) | Err(SendError::NoLink(_)) => {}
            Err(e) => {
                tracing::warn!(node = self.me, client, error = %e, "closing the link of a client that does not keep up");
                self.transport.disconnect(Peer::Client(client));
                self.clients.forget(client);
            }
        }
    }

    async fn link_event(&mut self, event: LinkEvent) -> anyhow::Result<()> {
        match event {
            LinkEvent::Connected {
                peer: Peer::Node(id),
                addr,
                view_id,
            } => {
                tracing::info!(node = self.me, peer = id, %addr, view_id, "linked");
                self.linked.insert(id);
                self.flush_held(id).await;
                // A member that closed its link in order and linked again did not stop.
                self.stopping.retain(|(peer, _)| *peer != id);
                self.declared.insert(id, view_id);
                self.check_formed().await?;
            }
            LinkEvent::Connected {
                peer: Peer::Client(_),
                ..
            } => {}
            LinkEvent::Frame {
                peer: Peer::Node(from),
                bytes,
                ..
            } => match Message::decode(&bytes) {
                Ok(message) if self.formed => {
                    // Within a turn, the multicast's data and rows are taken without moving
                    // the engine on: what they make stable is delivered, persisted and
                    // counted in one row per peer at the end of the turn, not once each.
                    let queued = self.in_turn
                        && matches!(message, Message::Data { .. } | Message::Row { .. });
                    let input = Input::Message { from, message };
                    let refused = if queued {
                        self.take_queued(input).await?
                    } else {
                        self.step(input).await?
                    };
                    if let Some(e) = refused {
                        tracing::debug!(node = self.me, error = %e, "message refused");
                    }
                }
                Ok(message) => {
                    if self.early.len() >= EARLY_MESSAGES_MAX {
                        anyhow::bail!("too many messages from peers while the view forms");
                    }
                    self.early.push((from, message));
                }
                Err(e) => {
                    tracing::warn!(node = self.me, peer = from, error = %e, "undecodable message")
                }
            },
            LinkEvent::Frame {
                peer: Peer::Client(client),
                bytes,
                ..
            } => self.client_frame(client, bytes).await?,
            LinkEvent::Broken {
                peer: Peer::Node(id),
                reason,
            } => {
                self.linked.remove(&id);
                self.broke.insert(id);
                if let Some(queue) = self.held.remove(&id) {
                    self.held_bytes -= queue.iter().map(Payload::len).sum::<usize>();
                }
                if self.formed && self.view.members.contains(&id) {
                    if reason == BreakReason::PeerClosed {
                        // The member stops in order (SIGTERM): give the others a moment to
                        // stop too, so that stopping the whole group at once changes no view.
                        tracing::warn!(
                            node = self.me,
                            peer = id,
                            grace_ms = STOPPED_PEER_GRACE_MS,
                            "a member stopped; suspecting it unless this node stops too"
                        );
                        let due = Instant::now() + Duration::from_millis(STOPPED_PEER_GRACE_MS);
                        self.stopping.push((id, due));
                        return Ok(());
                    }
                    tracing::warn!(node = self.me, peer = id, %reason, "link broke; suspecting the member");
                    if let Some(e) = self.step(Input::LinkBroken { peer: id }).await? {
                        tracing::debug!(node = self.me, error = %e, "link break refused");
                    }
                } else {
                    tracing::warn!(node = self.me, peer = id, %reason, "link broke");
                }
            }
            LinkEvent::Broken {
                peer: Peer::Client(client),
                ..
            } => self.clients.forget(client),
        }
        Ok(())
    }

    /// A member answered a probe with the view it runs. It counts only if that view left this
    /// node out: a member restarting with this node may already run the next view with it.
    async fn probed(&mut self, peer: NodeId, layout: LayoutInfo) -> anyhow::Result<()> {
        let view_id = layout.view_id;
        tracing::info!(node = self.me, peer, view_id, "a member runs this view");
        if layout.members.iter().any(|(m, _)| *m == self.me) {
            return Ok(());
        }
        self.left_out = true;
        let seen = self.declared.entry(peer).or_insert(view_id);
        *seen = (*seen).max(view_id);
        self.check_formed().await
    }

    async fn check_formed(&mut self) -> anyhow::Result<()> {
        if self.formed && self.restart.is_none() {
            return Ok(());
        }
        if self.joining {
            // Its engine asks its contacts once linked with one (a join sent without a link
            // would wait `suspect_after_ms` to be asked again).
            if self.addresses.iter().any(|m| self.linked.contains(&m.id)) {
                return self.form().await;
            }
            return Ok(());
        }
        // While restarting, a member one view ahead may have installed the view this restart
        // makes (the engine learns its decision); a view beyond it, or one that left this node
        // out (`left_out`), means the group went on without this node.
        let reference = self.restart.as_ref().unwrap_or(&self.view);
        let ahead = u32::from(self.restart.is_some());
        let left_out = self.left_out;
        let later = self
            .declared
            .values()
            .copied()
            .filter(|&v| {
                v > reference.view_id.saturating_add(ahead) || (left_out && v > reference.view_id)
            })
            .max();
        if let Some(later) = later {
            // The group went on without this node: it joins again, keeping its logs, and
            // takes no request until it is welcomed and has caught up. It asks once linked
            // with a node to ask (a probe may tell it first); a join sent without a link
            // would wait `suspect_after_ms` to be asked again.
            if !self.addresses.iter().any(|m| self.linked.contains(&m.id)) {
                return Ok(());
            }
            let recorded = reference.clone();
            tracing::warn!(
                node = self.me,
                recorded = recorded.view_id,
                group = later,
                "the group runs a later view than this node's; it is behind and joins again"
            );
            self.node = self.joiner(recorded.view_id)?;
            self.layout = layout_info(&recorded, &self.addresses, self.chunk_size);
            self.view_id = recorded.view_id;
            self.view = recorded;
            self.behind = Some(later);
            self.restart = None;
            return self.form().await;
        }
        if self.formed {
            return Ok(());
        }
        if let Some(recorded) = &self.restart {
            // The engine restarts at once, with whichever members come back.
            tracing::info!(
                node = self.me,
                recorded = recorded.view_id,
                "restarting from the recorded view"
            );
            return self.form().await;
        }
        if !self.peers.iter().all(|p| self.linked.contains(p)) {
            return Ok(());
        }
        if self.behind.is_none() {
            self.save_state(NodeState::of_view(&self.view)).await?;
        }
        self.form().await
    }

    /// The engine of this node asking to join again after view `last_view_id`, through every
    /// other configured node (linked ones first, then those that declared the latest view,
    /// then the lowest id, likely the leader), resuming state transfer after the last record
    /// of each shard log it holds.
    fn joiner(&self, last_view_id: u32) -> anyhow::Result<Node> {
        let mut contacts: Vec<NodeId> = self
            .addresses
            .iter()
            .map(|m| m.id)
            .filter(|&id| id != self.me)
            .collect();
        contacts.sort_by_key(|id| {
            let declared = std::cmp::Reverse(self.declared.get(id).copied());
            (!self.linked.contains(id), declared, *id)
        });
        let held = self
            .stores
            .iter()
            .filter_map(|(shard, store)| {
                let (version, hlc) = store.kv().log().latest()?;
                Some((*shard, version, hlc))
            })
            .collect();
        tracing::info!(node = self.me, contacts = ?contacts, held = ?held, "joining");
        Node::joining(self.config.engine_config(), contacts, held, last_view_id)
            .context("starting the engine as a joiner")
    }

    /// Starts the engine and replays what peers sent before.
    async fn form(&mut self) -> anyhow::Result<()> {
        self.formed = true;
        tracing::info!(node = self.me, view_id = self.view_id, "the view runs");
        self.step(Input::Tick).await?;
        for (from, message) in std::mem::take(&mut self.early) {
            if let Some(e) = self.step(Input::Message { from, message }).await? {
                tracing::debug!(node = self.me, error = %e, "message refused");
            }
        }
        Ok(())
    }

    async fn tick(&mut self) -> anyhow::Result<()> {
        if self.formed {
            self.step(Input::Tick).await?;
        }
        let now = Instant::now();
        if self.stopping.iter().any(|(_, due)| *due <= now) {
            let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stopping)
                .into_iter()
                .partition(|(_, due)| *due <= now);
            self.stopping = waiting;
            for (peer, _) in due {
                if self.view.members.contains(&peer) && !self.linked.contains(&peer) {
                    if let Some(e) = self.step(Input::LinkBroken { peer }).await? {
                        tracing::debug!(node = self.me, error = %e, "link break refused");
                    }
                }
            }
        }
        if self.clients.reads.iter().any(|r| r.deadline <= now) {
            let (late, waiting): (Vec<ReadWait>, Vec<ReadWait>) =
                std::mem::take(&mut self.clients.reads)
                    .into_iter()
                    .partition(|r| r.deadline <= now);
            self.clients.reads = waiting;
            for r in late {
                let (code, message) = match r.until {
                    Until::Stable(t) => (
                        ErrorCode::TimedOut,
                        format!("the stability frontier did not pass {t} in time"),
                    ),
                    Until::Delivered(v) => (
                        ErrorCode::TimedOut,
                        format!("version {v:#x} was not delivered here in time"),
                    ),
                    Until::Barrier(b) => (
                        ErrorCode::TimedOut,
                        format!(
                            "what this member had received in view {} (sequence numbers below \
                             {}) was not delivered here in time",
                            b.view_id, b.seqs
                        ),
                    ),
                    // Not an EAGAIN for the application: the client asks another member.
                    Until::Lease => (
                        ErrorCode::Wedged,
                        "this member has not heard from every member of its view recently \
                         enough to answer a read of the latest state (it may have been removed \
                         from the view): ask another member"
                            .to_string(),
                    ),
                };
                self.send_client(r.client, error(code, &message).encode(r.tag));
            }
        }
        Ok(())
    }

    /// Syncs the logs that sync on this thread and hands the engine what they made durable.
    async fn sync_inline(&mut self) -> anyhow::Result<()> {
        self.inline_owed = 0;
        // What the turn queued for members and clients (rows, replies given at delivery)
        // leaves before the sync, which nothing of it waits for.
        tokio::task::yield_now().await;
        let mut done = Vec::new();
        for (shard, store) in &mut self.stores {
            if store.syncs_inline() {
                store.sync_inline();
                if let Some(version) = take_persisted(*shard, store)? {
                    done.push((*shard, version));
                }
            }
        }
        for (shard, version) in done {
            self.step(Input::Persisted { shard, version }).await?;
        }
        Ok(())
    }

    async fn persisted(&mut self) -> anyhow::Result<()> {
        let mut done = Vec::new();
        for (shard, store) in &mut self.stores {
            if let Some(version) = take_persisted(*shard, store)? {
                done.push((*shard, version));
            }
        }
        for (shard, version) in done {
            self.step(Input::Persisted { shard, version }).await?;
        }
        Ok(())
    }

    async fn client_frame(&mut self, client: ClientId, bytes: Bytes) -> anyhow::Result<()> {
        let (tag, request) = match Request::decode(bytes.clone()) {
            Ok(decoded) => decoded,
            Err(e) => {
                let tag = protocol::tag_of(&bytes).unwrap_or(0);
                self.send_client(
                    client,
                    error(ErrorCode::Malformed, &e.to_string()).encode(tag),
                );
                return Ok(());
            }
        };
        let reply = match request {
            Request::Layout => Some(Reply::Layout(self.layout.clone())),
            Request::Status => Some(Reply::Status(self.status())),
            Request::Write {
                hlc,
                durable,
                payload,
            } => self.write(client, tag, hlc, durable, payload).await?,
            Request::Get { key, at, after } => self.get(client, tag, key, at, after),
            Request::History { key } => Some(self.history(&key)),
            Request::Watch {
                prefix,
                shard,
                after,
            } => self.watch(client, tag, prefix, shard, after),
            Request::FsWatch => self.fs_watch(client, tag),
            Request::FsSubmit {
                shard,
                hlc,
                durable,
                payload,
            } => match self.fs_shard_here(shard) {
                Ok(id) => match check_fs_request(shard, &payload) {
                    Ok(()) => self.submit(client, tag, id, hlc, durable, payload).await?,
                    Err(reply) => Some(reply),
                },
                Err(reply) => Some(reply),
            },
            Request::FsRead {
                shard,
                at,
                after,
                request,
            } => match self.fs_shard_here(shard) {
                Ok(id) => self.read(client, tag, id, ReadWhat::Fs(request), at, after),
                Err(reply) => Some(reply),
            },
            // Back from a total restart, a member's log may lack what the others delivered
            // until the view that ends the restart is formed: no barrier read until then.
            Request::FsReadBarrier { .. } if !self.formed => self.write_refusal(),
            Request::FsReadBarrier { shard, request } => match self.fs_shard_here(shard) {
                Ok(id) => {
                    let barrier = self.leased_barrier(id).unwrap_or(Until::Lease);
                    self.read_until(
                        client,
                        tag,
                        id,
                        ReadWhat::Fs(request),
                        ReadAt::Latest,
                        Some(barrier),
                    )
                }
                Err(reply) => Some(reply),
            },
            Request::FsSync { shard, version } => match self.fs_shard_here(shard) {
                Ok(id) => {
                    let reply = self.sync(client, tag, id, version);
                    if reply.is_none() {
                        // The members push their rows as their logs persist it.
                        let want = Input::WantPersisted { shard: id, version };
                        if self.in_turn {
                            self.take_queued(want).await?;
                        } else {
                            self.step(want).await?;
                        }
                    }
                    reply
                }
                Err(reply) => Some(reply),
            },
            Request::Space => Some(self.space()),
        };
        if let Some(reply) = reply {
            self.send_client(client, reply.encode(tag));
        }
        Ok(())
    }

    /// The shard that owns `key`, if this node replicates it.
    fn shard_here(&self, key: &[u8]) -> Result<ShardId, Reply> {
        let shard = self
            .layout
            .shard_of(key)
            .map(|s| ShardId(s.id))
            .ok_or_else(|| error(ErrorCode::Internal, "the layout has no data shard"))?;
        self.serves(shard)
    }

    /// The shard a file system request names, if this node replicates it. The file system uses
    /// the namespace subgroup's first shard and every shard of the data subgroup.
    fn fs_shard_here(&self, shard: SubgroupShard) -> Result<ShardId, Reply> {
        let Some(info) = self.layout.subgroup_shard(shard) else {
            let message = format!("the layout has no shard {shard:?}");
            return Err(error(ErrorCode::Malformed, &message));
        };
        self.serves(ShardId(info.id))
    }

    /// `shard`, if this node replicates it with its history.
    fn serves(&self, shard: ShardId) -> Result<ShardId, Reply> {
        if !self.stores.contains_key(&shard) {
            return Err(error(
                ErrorCode::NotReplica,
                &format!("node {} does not replicate {shard}", self.me),
            ));
        }
        if self.incomplete.contains(&shard) {
            return Err(error(
                ErrorCode::NotReplica,
                &format!(
                    "node {} was assigned {shard} by a view change and is still receiving its \
                     history by state transfer",
                    self.me
                ),
            ));
        }
        Ok(shard)
    }

    /// Where this node stands, as a client sees it.
    fn membership(&self) -> Membership {
        if self.behind.is_some() {
            return Membership::Joining;
        }
        self.node.membership()
    }

    /// Why this node takes no write now, if it does not.
    fn write_refusal(&self) -> Option<Reply> {
        if !self.formed {
            return Some(match &self.restart {
                Some(recorded) => error(
                    ErrorCode::Forming,
                    &format!(
                        "restarting from view {}: waiting for a majority of it to come back",
                        recorded.view_id
                    ),
                ),
                None => error(ErrorCode::Forming, "the view is still forming"),
            });
        }
        match self.membership() {
            Membership::Active => None,
            Membership::Wedged => Some(wedged_error()),
            other => Some(self.membership_error(other)),
        }
    }

    fn membership_error(&self, membership: Membership) -> Reply {
        match membership {
            Membership::NoMajority => error(
                ErrorCode::NoMajority,
                &format!(
                    "node {} lost the majority of view {} (it suspects {:?}): it takes no write, \
                     and reads only at times at or below its last stability frontier",
                    self.me,
                    self.view_id,
                    self.node.suspected()
                ),
            ),
            Membership::Joining => match self.behind {
                Some(later) => error(
                    ErrorCode::Removed,
                    &format!(
                        "node {} came back in view {} after the group moved to view {later}; \
                         it is joining again",
                        self.me, self.view_id
                    ),
                ),
                None if self.joining => error(
                    ErrorCode::Removed,
                    &format!(
                        "node {} is not a member yet: it is joining the group",
                        self.me
                    ),
                ),
                None => error(
                    ErrorCode::Removed,
                    &format!(
                        "node {} was removed from the group at the end of view {}",
                        self.me, self.view_id
                    ),
                ),
            },
            Membership::Inadequate => error(
                ErrorCode::Inadequate,
                &format!(
                    "the view after {} leaves a shard below its minimum size: writes wait for \
                     joins",
                    self.view_id
                ),
            ),
            Membership::Wedged => wedged_error(),
            Membership::Active => error(ErrorCode::Internal, "no refusal"),
        }
    }

    /// Why a read at `at` of `shard` cannot be answered here, if it cannot: a node that lost
    /// its majority or left the group answers only what can no longer change.
    fn read_refusal(&self, shard: ShardId, at: ReadAt) -> Option<Reply> {
        let membership = self.membership();
        if !matches!(membership, Membership::NoMajority | Membership::Joining) {
            return None;
        }
        match at {
            ReadAt::Version(_) => None,
            ReadAt::Time(t) if self.node.stability_frontier(shard).is_some_and(|f| t <= f) => None,
            ReadAt::Time(_) | ReadAt::Latest => Some(self.membership_error(membership)),
        }
    }

    async fn write(
        &mut self,
        client: ClientId,
        tag: u64,
        hlc: Hlc,
        durable: bool,
        payload: Bytes,
    ) -> anyhow::Result<Option<Reply>> {
        if let Some(refusal) = self.write_refusal() {
            return Ok(Some(refusal));
        }
        let request = match KvRequest::decode(payload.clone()) {
            Ok(r) => r,
            Err(e) => return Ok(Some(error(ErrorCode::Malformed, &e.to_string()))),
        };
        // The request's client id names its exactly-once sequence, not the link: one link may
        // carry the requests of several clients (a process that shares its connections among
        // many clients), and the reply goes back on the link the request came by.
        let shard = match self.shard_here(request.op.key()) {
            Ok(shard) => shard,
            Err(reply) => return Ok(Some(reply)),
        };
        let mut tagged = Vec::with_capacity(1 + payload.len());
        tagged.push(MACHINE_KV);
        tagged.extend_from_slice(&payload);
        self.submit(client, tag, shard, hlc, durable, Bytes::from(tagged))
            .await
    }

    /// Multicasts an engine payload (machine byte first) in `shard`; the reply goes out once it
    /// is delivered (or durable).
    async fn submit(
        &mut self,
        client: ClientId,
        tag: u64,
        shard: ShardId,
        hlc: Hlc,
        durable: bool,
        payload: Bytes,
    ) -> anyhow::Result<Option<Reply>> {
        if let Some(refusal) = self.write_refusal() {
            return Ok(Some(refusal));
        }
        if self.clients.submitted.len() >= SUBMITTED_MAX {
            return Ok(Some(error(ErrorCode::Busy, "too many writes in flight")));
        }
        let id = self.next_request_id;
        self.next_request_id += 1;
        self.clients.submitted.insert(
            id,
            Submitted {
                client,
                tag,
                durable,
            },
        );
        let request = derechofs_core::Request {
            id,
            client_hlc: hlc,
            payload,
        };
        let refused = if self.in_turn {
            // Sent with the other writes of this turn, when it ends.
            let queued = self.node.queue(shard, request, durable);
            self.queued |= queued.is_ok();
            queued.err().map(StepError::Submit)
        } else {
            self.step(Input::Submit {
                shard,
                request,
                durable,
            })
            .await?
        };
        match refused {
            Some(StepError::Submit(e)) => {
                self.clients.submitted.remove(&id);
                let code = match e {
                    SubmitError::Wedged(_) => ErrorCode::Wedged,
                    SubmitError::QueueFull(_) => ErrorCode::Busy,
                    SubmitError::NotReplica(_) => ErrorCode::NotReplica,
                    SubmitError::NoMajority => ErrorCode::NoMajority,
                    SubmitError::Joining => ErrorCode::Removed,
                    SubmitError::CatchingUp(_) => ErrorCode::NotReplica,
                    SubmitError::Inadequate => ErrorCode::Inadequate,
                    _ => ErrorCode::Malformed,
                };
                Ok(Some(error(code, &e.to_string())))
            }
            _ => Ok(None),
        }
    }

    fn get(
        &mut self,
        client: ClientId,
        tag: u64,
        key: Bytes,
        at: ReadAt,
        after: Option<derechofs_core::Version>,
    ) -> Option<Reply> {
        let shard = match self.shard_here(&key) {
            Ok(shard) => shard,
            Err(reply) => return Some(reply),
        };
        self.read(client, tag, shard, ReadWhat::Kv(key), at, after)
    }

    /// Answers a read now (sending the reply itself: None), or once this replica delivered
    /// `after` (or the version read at), or once the stability frontier passed the time read at.
    fn read(
        &mut self,
        client: ClientId,
        tag: u64,
        shard: ShardId,
        what: ReadWhat,
        at: ReadAt,
        after: Option<derechofs_core::Version>,
    ) -> Option<Reply> {
        let until = match at {
            ReadAt::Latest => after.map(Until::Delivered),
            ReadAt::Version(v) => Some(Until::Delivered(v)),
            ReadAt::Time(t) => Some(Until::Stable(t)),
        };
        self.read_until(client, tag, shard, what, at, until)
    }

    /// Answers the read of `what` at `at` once `until` holds here (at once without one).
    fn read_until(
        &mut self,
        client: ClientId,
        tag: u64,
        shard: ShardId,
        what: ReadWhat,
        at: ReadAt,
        until: Option<Until>,
    ) -> Option<Reply> {
        if let Some(refusal) = self.read_refusal(shard, at) {
            return Some(refusal);
        }
        match until {
            Some(until) if !self.ready(shard, until) => {
                if self.clients.reads.len() >= READ_WAITS_MAX {
                    return Some(error(ErrorCode::Busy, "too many reads waiting"));
                }
                self.clients.reads.push(ReadWait {
                    client,
                    tag,
                    shard,
                    what,
                    at,
                    until,
                    deadline: Instant::now() + self.time_read_wait,
                });
                None
            }
            _ => {
                let reply = self.serve(tag, shard, &what, at);
                self.send_client_payload(client, reply);
                None
            }
        }
    }

    /// The size and free space of the file system that holds the data directory.
    fn space(&self) -> Reply {
        match rustix::fs::statvfs(&self.config.data_dir) {
            Ok(s) => Reply::Space {
                total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
                free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
            },
            Err(e) => error(
                ErrorCode::Internal,
                &format!("statvfs of {}: {e}", self.config.data_dir.display()),
            ),
        }
    }

    /// Answers `FsSynced` once the persistence frontier of `shard` covers `version`.
    fn sync(
        &mut self,
        client: ClientId,
        tag: u64,
        shard: ShardId,
        version: derechofs_core::Version,
    ) -> Option<Reply> {
        // A version of an earlier view is durable on every member: a view is installed only
        // once everything delivered in the one before is persisted at every member of it.
        let earlier_view = version >> 32 < u64::from(self.view.view_id);
        if earlier_view || self.node.persistence_frontier(shard) >= Some(version) {
            return Some(Reply::FsSynced);
        }
        let waits = self.clients.durable.entry(shard).or_default();
        if waits.len() >= DURABLE_WAITS_MAX {
            return Some(error(
                ErrorCode::Busy,
                "too many replies wait for durability",
            ));
        }
        // The queue stays in version order: answers leave from its front.
        let at = waits.partition_point(|w| w.version <= version);
        waits.insert(
            at,
            DurableWait {
                version,
                client,
                reply: Reply::FsSynced.encode(tag),
            },
        );
        None
    }

    fn history(&self, key: &[u8]) -> Reply {
        let shard = match self.shard_here(key) {
            Ok(shard) => shard,
            Err(reply) => return reply,
        };
        if let Some(refusal) = self.read_refusal(shard, ReadAt::Latest) {
            return refusal;
        }
        let Some(store) = self.stores.get(&shard) else {
            return error(
                ErrorCode::NotReplica,
                "this node does not replicate the shard",
            );
        };
        let all = store.kv().kv().history(key);
        let skip = all.len().saturating_sub(HISTORY_ENTRIES_MAX);
        let changes = all[skip..]
            .iter()
            .map(|c| Change {
                version: c.version,
                hlc: c.hlc,
                value_len: c.value_len,
            })
            .collect();
        Reply::History {
            truncated: skip > 0,
            changes,
        }
    }

    /// Ends the watches of `shard` (every shard: `None`) with `reply`, which tells their
    /// clients to resume on another member.
    fn end_watches(&mut self, shard: Option<ShardId>, reply: &Reply) {
        let mut out = Vec::new();
        for (&client, watches) in &mut self.clients.watches {
            watches.retain(|w| {
                let ends = shard.is_none_or(|s| s == w.shard);
                if ends {
                    out.push((client, reply.encode(w.tag)));
                }
                !ends
            });
        }
        self.clients
            .watches
            .retain(|_, watches| !watches.is_empty());
        for (client, bytes) in out {
            self.send_client(client, bytes);
        }
    }

    /// Ends every namespace feed with `reply`.
    fn end_fs_watches(&mut self, reply: &Reply) {
        let mut out = Vec::new();
        for (&client, watches) in &mut self.clients.watches {
            watches.retain(|w| {
                if w.fs {
                    out.push((client, reply.encode(w.tag)));
                }
                !w.fs
            });
        }
        self.clients
            .watches
            .retain(|_, watches| !watches.is_empty());
        for (client, bytes) in out {
            self.send_client(client, bytes);
        }
    }

    /// What a watch of either kind needs before it registers: this node is a member, it holds a
    /// replica of `at`, and the bounds on watching clients and on watches per link leave room.
    /// The shard and the latest version its replica here delivered, or the refusal.
    fn watch_room(&self, client: ClientId, at: SubgroupShard) -> Result<(ShardId, Version), Reply> {
        let membership = self.membership();
        if matches!(membership, Membership::Joining | Membership::NoMajority) {
            return Err(self.membership_error(membership));
        }
        let shard = self.fs_shard_here(at)?;
        if !self.clients.watches.contains_key(&client) && self.clients.watches.len() >= WATCHERS_MAX
        {
            return Err(error(ErrorCode::Busy, "too many clients watch this node"));
        }
        if self.clients.watches.get(&client).map_or(0, Vec::len) >= WATCHES_PER_CLIENT_MAX {
            return Err(error(ErrorCode::Busy, "too many watches on this link"));
        }
        let Some(store) = self.stores.get(&shard) else {
            return Err(error(ErrorCode::NotReplica, "the shard is not here"));
        };
        Ok((shard, store.kv().log().latest().map_or(0, |(v, _)| v)))
    }

    /// Registers a namespace feed (`FsWatch`): from the version this node delivered now on,
    /// every delivered version of the namespace shard is sent as the inodes it changed. No
    /// replay: a client whose feed ended clears its cache and subscribes again.
    fn fs_watch(&mut self, client: ClientId, tag: u64) -> Option<Reply> {
        let namespace = SubgroupShard {
            data: false,
            index: 0,
        };
        let (shard, delivered) = match self.watch_room(client, namespace) {
            Ok(found) => found,
            Err(reply) => return Some(reply),
        };
        self.clients.watches.entry(client).or_default().push(Watch {
            tag,
            prefix: Bytes::new(),
            shard,
            after: delivered,
            fs: true,
        });
        self.send_client(client, Reply::Watching { from: delivered }.encode(tag));
        None
    }

    /// Registers a watch of `prefix` in data shard `index`; with `after`, first sends every
    /// change of a watched key in the versions after it this node delivered, read from the log
    /// in pieces. Replay and registration happen in this one turn of the event loop, so no
    /// delivery falls between them: the events are exactly the versions after `after`, in order.
    fn watch(
        &mut self,
        client: ClientId,
        tag: u64,
        prefix: Bytes,
        index: u16,
        after: Option<Version>,
    ) -> Option<Reply> {
        let (shard, delivered) = match self.watch_room(client, SubgroupShard { data: true, index })
        {
            Ok(found) => found,
            Err(reply) => return Some(reply),
        };
        let from = after.unwrap_or(delivered);
        let mut events = Vec::new();
        if let Some(after) = after.filter(|&a| a < delivered) {
            let store = self
                .stores
                .get(&shard)
                .expect("watch_room found the replica");
            match replay(&mut store.kv(), &prefix, after, delivered) {
                Ok(replayed) => events = replayed,
                Err(reply) => return Some(reply),
            }
        }
        // Registered first (live events only after `delivered`), so a link the replay overflows
        // forgets it; then the reply, the replayed events, and later the live ones, in order.
        self.clients.watches.entry(client).or_default().push(Watch {
            tag,
            prefix,
            shard,
            after: from.max(delivered),
            fs: false,
        });
        self.send_client(client, Reply::Watching { from }.encode(tag));
        for event in events {
            self.send_client(client, Reply::Event(event).encode(tag));
        }
        None
    }

    fn status(&self) -> NodeStatus {
        let state = if self.restart.is_some() && self.behind.is_none() {
            "restarting"
        } else if !self.formed {
            "forming"
        } else {
            match self.membership() {
                Membership::Active => "active",
                Membership::Wedged => "wedged",
                Membership::NoMajority => "no-majority",
                Membership::Joining if self.behind.is_some() => "behind",
                Membership::Joining if self.joining => "joining",
                Membership::Joining => "removed",
                Membership::Inadequate => "inadequate",
            }
        };
        let shards = self
            .stores
            .iter()
            .filter_map(|(shard, store)| {
                let s = self.node.status(*shard)?;
                let kv = store.kv();
                Some(ShardStatusInfo {
                    id: shard.0,
                    members: s.members,
                    last_delivered: s.last_delivered,
                    persistence_frontier: s.persistence_frontier,
                    stability_frontier: s.stability_frontier,
                    persisted_here: kv.log().persisted(),
                    pending_requests: s.pending_requests as u64,
                    versions: kv.log().version_count() as u64,
                    keys: kv.log().key_count() as u64,
                    catching_up: self.incomplete.contains(shard),
                })
            })
            .collect();
        NodeStatus {
            node_id: self.me,
            view_id: self.view_id,
            state: state.to_string(),
            suspected: self.node.suspected(),
            shards,
        }
    }
}

fn error(code: ErrorCode, message: &str) -> Reply {
    Reply::Error {
        code,
        message: message.to_string(),
    }
}

/// Refuses a file system request that does not decode, or whose operation is not for the kind
/// of shard it is sent to (namespace operations to the namespace shard, data operations to data
/// shards), before it is multicast.
fn check_fs_request(shard: SubgroupShard, payload: &Bytes) -> Result<(), Reply> {
    use derechofs_fs::op::{Op, Request as FsRequest};
    let request = FsRequest::decode(&payload.slice(1..)).map_err(|e| {
        error(
            ErrorCode::Malformed,
            &format!("bad file system request: {e}"),
        )
    })?;
    match (&request.op, shard.data) {
        (Op::Ns(_), false) | (Op::Data(_), true) => Ok(()),
        _ => Err(error(
            ErrorCode::Malformed,
            "a namespace operation goes to the namespace shard, a data operation to a data shard",
        )),
    }
}

fn wedged_error() -> Reply {
    error(
        ErrorCode::Wedged,
        "the shard is wedged: a member is suspected and the view must change; reads still work",
    )
}

/// Asks a member for its view, as a client, until it answers; sends the answer to the driver.
async fn probe(
    peer: NodeId,
    addr: SocketAddr,
    secret: derechofs_core::transport::Secret,
    report: tokio::sync::mpsc::Sender<(NodeId, LayoutInfo)>,
) {
    loop {
        let id = crate::client::random_id();
        if let Ok(mut conn) = ClientConn::connect(addr, id, &secret, Some(peer)).await {
            let asked = async {
                conn.send(0, &Request::Layout.encode(1)).await.ok()?;
                let (_, frame) = conn.recv().await.ok()?;
                match Reply::decode(frame).ok()? {
                    (1, Reply::Layout(layout)) => Some(layout),
                    _ => None,
                }
            };
            let answer = tokio::time::timeout(Duration::from_millis(PROBE_TIMEOUT_MS), asked).await;
            let (sender, _) = conn.into_split();
            let _ = sender.close().await;
            if let Ok(Some(layout)) = answer {
                let _ = report.send((peer, layout)).await;
                return;
            }
        }
        if report.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(DIAL_RETRY_MS)).await;
    }
}

/// A joining node dials a member that does not know it (and so cannot dial it) whatever the
/// ids, until linked; it stops once the member refuses the direction: the member learned this
/// node's address from the view that added it, and dials it itself.
async fn dial_joining(transport: Arc<Transport>, peer: NodeId, addr: SocketAddr) {
    use derechofs_core::transport::{HandshakeError, Refusal};
    let mut refused_for_settings: u64 = 0;
    loop {
        if !transport.is_linked(Peer::Node(peer)) {
            match transport.connect_joining(peer, addr).await {
                Err(ConnectError::Handshake(HandshakeError::Refused(Refusal::WrongDirection)))
                | Err(ConnectError::Closing) => return,
                Err(e @ ConnectError::Handshake(HandshakeError::SettingsDiffer { .. })) => {
                    // A configuration to fix, not a member still starting.
                    if refused_for_settings % 50 == 0 {
                        let me = transport.node_id();
                        tracing::warn!(node = me, peer, %addr, error = %e, "cannot join through member");
                    }
                    refused_for_settings += 1;
                }
                Ok(()) | Err(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(DIAL_RETRY_MS)).await;
    }
}

/// Keeps a link with a configured node up for as long as the node runs: dials it until the
/// link is up (it may not have started yet), and again after the link breaks (it may restart).
async fn dial(transport: Arc<Transport>, peer: NodeId, addr: SocketAddr) {
    use derechofs_core::transport::HandshakeError;
    let me = transport.node_id();
    let mut attempts: u64 = 0;
    loop {
        if transport.is_linked(Peer::Node(peer)) {
            attempts = 0;
            tokio::time::sleep(Duration::from_millis(DIAL_RETRY_MS)).await;
            continue;
        }
        match transport.connect(peer, addr).await {
            Ok(()) | Err(ConnectError::AlreadyLinked(_)) => attempts = 0,
            // Not again in the view its link broke in; the next view allows it.
            Err(ConnectError::BrokenInView { .. }) => {
                tokio::time::sleep(Duration::from_millis(DIAL_RETRY_MS)).await;
            }
            Err(e) => {
                attempts += 1;
                if attempts % 50 == 1 {
                    if matches!(
                        e,
                        ConnectError::Handshake(HandshakeError::SettingsDiffer { .. })
                    ) {
                        // Not a member that is still starting: a configuration to fix.
                        tracing::warn!(node = me, peer, %addr, error = %e, "cannot link with member");
                    } else {
                        tracing::info!(node = me, peer, %addr, error = %e, "waiting for member");
                    }
                }
                tokio::time::sleep(Duration::from_millis(DIAL_RETRY_MS)).await;
            }
        }
    }
}

fn layout_info(view: &View, addresses: &[Member], chunk_size: u32) -> LayoutInfo {
    LayoutInfo {
        view_id: view.view_id,
        members: view
            .members
            .iter()
            .filter_map(|id| addresses.iter().find(|m| m.id == *id))
            .map(|m| (m.id, m.addr))
            .collect(),
        shards: view
            .layout
            .shards()
            .iter()
            .map(|s| ShardInfo {
                id: s.id.0,
                data: s.subgroup == Subgroup::Data,
                index: s.index,
                members: s.members.clone(),
            })
            .collect(),
        chunk_size,
    }
}

/// The members of `view` whose ranks are set in `mask`.
fn removed_members(view: &View, mask: u64) -> Vec<NodeId> {
    view.members
        .iter()
        .enumerate()
        .filter(|&(rank, _)| mask & (1 << rank) != 0)
        .map(|(_, &node)| node)
        .collect()
}

/// Record payload a watch's replay reads from the log at most, in all; a watch further behind
/// is refused (`Trimmed`), as if the log no longer held its versions.
pub const WATCH_REPLAY_BYTES_MAX: usize = 64 << 20;
/// Record payload one read of a watch's replay takes from the log at most.
pub const WATCH_REPLAY_PIECE_BYTES_MAX: usize = 1 << 20;
/// Records one read of a watch's replay takes from the log at most.
pub const WATCH_REPLAY_PIECE_RECORDS_MAX: usize = 1024;

/// The changes of K/V user keys starting with `prefix` in the versions after `after` up to
/// `end` (delivered, so appended to the log), read from `machine`'s log in pieces, in version
/// order, or the error reply to give.
fn replay(
    machine: &mut Machine,
    prefix: &[u8],
    after: Version,
    end: Version,
) -> Result<Vec<Event>, Reply> {
    // Records still in the write buffer are not readable: hand them to the backend first.
    machine
        .log_mut()
        .flush_buffer()
        .map_err(|e| error(ErrorCode::Internal, &format!("flushing the log: {e}")))?;
    let mut events = Vec::new();
    let mut at = after;
    let mut cursor = None;
    let mut bytes = 0usize;
    while at < end {
        let (records, next) = match machine.log().read_records(
            Some(at),
            end,
            WATCH_REPLAY_PIECE_BYTES_MAX,
            WATCH_REPLAY_PIECE_RECORDS_MAX,
            cursor,
        ) {
            Ok(read) => read,
            Err(LogError::Trimmed { horizon, .. }) => {
                return Err(error(
                    ErrorCode::Trimmed,
                    &format!(
                        "cannot resume the watch after version {after}: the log holds only the \
                         versions from {horizon} on"
                    ),
                ))
            }
            Err(e) => return Err(error(ErrorCode::Internal, &format!("reading the log: {e}"))),
        };
        let Some(last) = records.last() else {
            return Err(error(
                ErrorCode::Internal,
                &format!("the log ends before delivered version {end}"),
            ));
        };
        at = last.version;
        cursor = next;
        for r in records {
            bytes += r.payload.len();
            if bytes > WATCH_REPLAY_BYTES_MAX {
                return Err(error(
                    ErrorCode::Trimmed,
                    &format!(
                        "cannot resume the watch after version {after}: more than \
                         {WATCH_REPLAY_BYTES_MAX} bytes of log to replay"
                    ),
                ));
            }
            let writes = parse_delta(&r.payload).map_err(|why| {
                error(
                    ErrorCode::Internal,
                    &format!("the log record of version {}: {why}", r.version),
                )
            })?;
            // In key order, the later of two writes of a key in force, as live events are.
            let changed: std::collections::BTreeMap<Bytes, Option<Bytes>> = writes
                .into_iter()
                .filter(|(key, _)| is_kv_user_key(key) && key.starts_with(prefix))
                .collect();
            for (key, value) in changed {
                {
                    events.push(Event {
                        version: r.version,
                        hlc: r.hlc,
                        key,
                        value,
                    });
                }
            }
        }
    }
    Ok(events)
}

/// K/V user keys start with neither `0xFE` (file system) nor `0xFF` (the K/V store's own).
fn is_kv_user_key(key: &[u8]) -> bool {
    !matches!(key.first(), Some(0xFE | 0xFF))
}

/// The writes of a record's delta payload (`docs/FORMATS.md`, "Delta payload"), in order.
fn parse_delta(payload: &Bytes) -> Result<Vec<(Bytes, Option<Bytes>)>, &'static str> {
    let mut header = vec![0u8; derechofs_storage::record::RECORD_HEADER_LEN];
    header.extend_from_slice(payload);
    let mut spans = Vec::new();
    derechofs_storage::record::parse_payload(&header, |w| spans.push(w))?;
    let base = derechofs_storage::record::RECORD_HEADER_LEN;
    Ok(spans
        .into_iter()
        .map(|w| {
            let key_at = w.key_at as usize - base;
            let key = payload.slice(key_at..key_at + w.key_len as usize);
            let value = w.value_len.map(|len| {
                let value_at = w.value_at as usize - base;
                payload.slice(value_at..value_at + len as usize)
            });
            (key, value)
        })
        .collect())
}

/// Whether the reply to a write this node submitted, asked durable (`asked`), waits until the
/// persistence frontier covers the version it was delivered in. A K/V write that wrote (a
/// `Written`, also the original reply resent to a retried request) and every file system reply
/// wait; a K/V reply that wrote nothing (`Conflict`, `Stale`, `Invalid`) is a read of delivered
/// state and goes out at delivery, as a read at the latest version does (docs/SEMANTICS.md,
/// "A failed conditional put is answered at delivery").
fn waits_for_durability(asked: bool, reply: &Outcome) -> bool {
    asked
        && match reply {
            Outcome::Kv(reply) => matches!(reply, KvReply::Written { .. }),
            Outcome::Fs(_) => true,
        }
}

/// A version of `shard` newly made durable, to report to the engine; a failed sync fails the
/// replica.
fn take_persisted(shard: ShardId, store: &mut ShardStore) -> anyhow::Result<Option<Version>> {
    store.take_persisted().map_err(|e| {
        let version = store.kv().log().latest().map_or(0, |(v, _)| v);
        ReplicaFailed {
            shard,
            version,
            cause: anyhow::anyhow!("making the log durable: {e}"),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    //! The watch's replay against the live events of the same versions, the reference.
    use std::sync::Arc;

    use derechofs_core::kv::{KvOp, KvRequest};
    use derechofs_storage::backend::MemoryBackend;
    use derechofs_storage::{Log, LogConfig};

    use super::*;

    #[test]
    fn sends_go_first_within_each_run_and_never_across_another_action() {
        let send = |after: u64| Action::Send {
            to: 2,
            message: Message::Fetch {
                view_id: 1,
                shard: ShardId(0),
                after: Some(after),
            },
        };
        let deliver = |n: u64| Action::Deliver {
            shard: ShardId(n as u16),
            deliveries: Vec::new(),
        };
        let persist = |version: u64| Action::Persist {
            shard: ShardId(0),
            version,
        };
        let mut actions = vec![
            deliver(1),
            persist(10),
            send(1),
            deliver(2),
            send(2),
            Action::Wedge,
            deliver(3),
            send(3),
            send(4),
            persist(11),
            Action::Suspect { node: 3 },
            send(5),
        ];
        sends_first(&mut actions);
        let shown: Vec<String> = actions
            .iter()
            .map(|a| match a {
                Action::Send {
                    message:
                        Message::Fetch {
                            after: Some(after), ..
                        },
                    ..
                } => format!("send {after}"),
                Action::Deliver { shard, .. } => format!("deliver {}", shard.0),
                Action::Persist { version, .. } => format!("persist {version}"),
                Action::Wedge => "wedge".into(),
                Action::Suspect { .. } => "suspect".into(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "send 1",
                "send 2",
                "deliver 1",
                "persist 10",
                "deliver 2",
                "wedge",
                "send 3",
                "send 4",
                "deliver 3",
                "persist 11",
                "suspect",
                "send 5",
            ]
        );
    }

    #[test]
    fn ticks_come_at_least_twice_per_heartbeat_and_at_most_every_tick_ms_max() {
        for heartbeat_ms in [1, 2, 3, 5, 19, 20, 21, 50, 1_000, u64::MAX] {
            let tick = tick_ms(heartbeat_ms);
            assert!(tick >= 1, "heartbeat {heartbeat_ms}: tick {tick}");
            assert!(tick <= TICK_MS_MAX, "heartbeat {heartbeat_ms}: tick {tick}");
            assert!(
                heartbeat_ms < 2 || tick * 2 <= heartbeat_ms,
                "heartbeat {heartbeat_ms}: tick {tick}"
            );
        }
    }

    fn kv(client: u64, number: u64, op: KvOp) -> Bytes {
        let mut b = vec![MACHINE_KV];
        b.extend_from_slice(&KvRequest { client, number, op }.encode());
        Bytes::from(b)
    }

    /// A machine that applied `versions` versions of puts and deletes under `a/` and `b/`;
    /// the events a live watch of `a/` got, by version.
    fn applied(versions: u64) -> (Machine, Vec<Event>) {
        let config = LogConfig {
            segment_bytes: 1 << 16,
            ..LogConfig::default()
        };
        let log = Log::open(Arc::new(MemoryBackend::new()), config).unwrap();
        let mut m = Machine::new(log, 1 << 20);
        let mut live = Vec::new();
        for v in 1..=versions {
            let key = |p: &str, i: u64| Bytes::from(format!("{p}/{}", i % 7));
            let mut payloads = vec![kv(
                1,
                v,
                KvOp::Put {
                    key: key("a", v),
                    value: Bytes::from(format!("v{v}")),
                },
            )];
            payloads.push(kv(
                2,
                v,
                KvOp::Put {
                    key: key("b", v),
                    value: Bytes::from_static(b"x"),
                },
            ));
            if v % 3 == 0 {
                payloads.push(kv(
                    3,
                    v,
                    KvOp::Delete {
                        key: key("a", v + 2),
                    },
                ));
            }
            let hlc = Hlc {
                wall_us: v,
                logical: 0,
            };
            let done = m.apply(v, hlc, &payloads).unwrap();
            live.extend(
                done.changed
                    .into_iter()
                    .filter(|(k, _)| k.starts_with(b"a/"))
                    .map(|(key, value)| Event {
                        version: v,
                        hlc,
                        key,
                        value,
                    }),
            );
        }
        (m, live)
    }

    fn cput(client: u64, number: u64, expected: Option<Version>) -> Bytes {
        kv(
            client,
            number,
            KvOp::CondPut {
                key: Bytes::from_static(b"k"),
                value: Bytes::from(format!("from {client}")),
                expected,
            },
        )
    }

    #[test]
    fn a_conflict_is_answered_at_delivery_a_success_once_durable_and_a_retry_gets_the_same_answer()
    {
        let log = Log::open(Arc::new(MemoryBackend::new()), LogConfig::default()).unwrap();
        let mut m = Machine::new(log, 1 << 20);
        let hlc = |v: u64| Hlc {
            wall_us: v,
            logical: 0,
        };
        let first = m.apply(1, hlc(1), &[cput(1, 1, None)]).unwrap();
        assert_eq!(
            first.replies,
            vec![Outcome::Kv(KvReply::Written {
                version: 1,
                hlc: hlc(1)
            })]
        );
        // Two clients expect version 1 in the same version: the first ordered wins.
        let raced = m
            .apply(2, hlc(2), &[cput(2, 1, Some(1)), cput(3, 1, Some(1))])
            .unwrap();
        let won = Outcome::Kv(KvReply::Written {
            version: 2,
            hlc: hlc(2),
        });
        let lost = Outcome::Kv(KvReply::Conflict { current: Some(2) });
        assert_eq!(raced.replies, vec![won.clone(), lost.clone()]);
        // Nothing was synced: neither version is persisted when the replies are decided.
        assert_eq!(m.log().persisted(), None);
        assert!(waits_for_durability(true, &won));
        assert!(!waits_for_durability(true, &lost));
        // Both clients resend the same requests (their replies were lost), after a third
        // client moved the key on: each gets its original answer, with the original versions,
        // and nothing is applied again.
        let retried = m
            .apply(
                3,
                hlc(3),
                &[
                    cput(4, 1, Some(2)),
                    cput(3, 1, Some(1)),
                    cput(2, 1, Some(1)),
                ],
            )
            .unwrap();
        let moved = Outcome::Kv(KvReply::Written {
            version: 3,
            hlc: hlc(3),
        });
        assert_eq!(retried.replies, vec![moved, lost.clone(), won.clone()]);
        assert!(!waits_for_durability(true, &retried.replies[1]));
        assert!(waits_for_durability(true, &retried.replies[2]));
        // A request numbered below the client's last is stale, answered at once.
        let stale = m.apply(4, hlc(4), &[cput(3, 0, Some(3))]).unwrap();
        assert_eq!(stale.replies, vec![Outcome::Kv(KvReply::Stale { last: 1 })]);
        assert!(!waits_for_durability(true, &stale.replies[0]));
        // A write not asked durable never waits; a file system reply asked durable does.
        assert!(!waits_for_durability(false, &won));
        assert!(waits_for_durability(true, &Outcome::Fs(Bytes::new())));
    }

    #[test]
    fn a_replay_after_any_version_equals_the_live_events_of_the_later_versions() {
        // More records than one piece holds, and records still in the write buffer.
        let (mut m, live) = applied(2500);
        for after in [0, 1, 2, 1023, 1024, 1500, 2499, 2500] {
            let replayed = replay(&mut m, b"a/", after, 2500).unwrap();
            let expected: Vec<Event> = live.iter().filter(|e| e.version > after).cloned().collect();
            assert_eq!(replayed, expected, "after {after}");
        }
    }

    #[test]
    fn a_replay_from_before_the_trim_horizon_is_refused_as_trimmed() {
        let (mut m, _) = applied(50);
        m.log_mut().sync().unwrap();
        m.log_mut().trim(20).unwrap();
        let horizon = m.log().horizon().map(|(v, _)| v).unwrap();
        match replay(&mut m, b"a/", horizon - 1, 50) {
            Err(Reply::Error {
                code: ErrorCode::Trimmed,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(replay(&mut m, b"a/", horizon, 50).is_ok());
    }
}
