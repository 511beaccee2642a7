//! The node's event loop: it links the members, ticks the engine, carries out its actions, and
//! serves the clients' requests.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use derechofs_core::kv::{KvReply, KvRequest, ReadAt};
use derechofs_core::transport::frame::dials;
use derechofs_core::transport::{ClientId, ConnectError, LinkEvent, Peer, SendError, Transport};
use derechofs_core::{
    Action, Delivery, Hlc, Input, Message, Node, NodeId, ShardId, StepError, Subgroup, SubmitError,
    View,
};
use derechofs_storage::LogError;
use tokio::sync::Notify;

use super::clients::{
    Clients, DurableWait, ReadWait, Submitted, Until, Watch, DURABLE_WAITS_MAX, READ_WAITS_MAX,
    SUBMITTED_MAX, WATCHERS_MAX,
};
use super::store::ShardStore;
use crate::config::{Member, NodeConfig};
use crate::protocol::{
    self, Change, ErrorCode, Event, LayoutInfo, NodeStatus, Reply, Request, ShardInfo,
    ShardStatusInfo, HISTORY_ENTRIES_MAX, WATCHES_PER_CLIENT_MAX,
};

/// Interval between engine ticks.
pub const TICK_MS: u64 = 2;
/// Interval between attempts to dial a member that is not up yet.
pub const DIAL_RETRY_MS: u64 = 100;
/// Peer messages held while the view forms (before every member is linked).
pub const EARLY_MESSAGES_MAX: usize = 1 << 16;

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The node's state outside the engine.
#[derive(Debug)]
pub struct Driver {
    me: NodeId,
    node: Node,
    view_id: u32,
    transport: Arc<Transport>,
    stores: BTreeMap<ShardId, ShardStore>,
    layout: LayoutInfo,
    peers: Vec<NodeId>,
    linked: HashSet<NodeId>,
    /// Every member is linked and the engine runs.
    formed: bool,
    early: Vec<(NodeId, Message)>,
    clients: Clients,
    next_request_id: u64,
    actions: Vec<Action>,
    time_read_wait: Duration,
}

impl Driver {
    /// Links the members and runs until SIGINT or SIGTERM.
    pub async fn run(
        config: NodeConfig,
        members: Vec<Member>,
        view: View,
        stores: BTreeMap<ShardId, ShardStore>,
        notify: Arc<Notify>,
    ) -> anyhow::Result<()> {
        let me = config.node_id;
        let secret = config.secret()?;
        let (transport, mut events) = Transport::bind(config.listen, me, secret)
            .await
            .with_context(|| format!("listening on {}", config.listen))?;
        transport.set_view(view.view_id);
        let transport = Arc::new(transport);
        for member in &members {
            if dials(me, member.id) {
                tokio::spawn(dial(transport.clone(), member.id, member.addr));
            }
        }
        let layout = layout_info(&view, &members);
        let peers: Vec<NodeId> = members
            .iter()
            .map(|m| m.id)
            .filter(|&id| id != me)
            .collect();
        let view_id = view.view_id;
        let node = derechofs_core::Node::new(config.engine_config(), view)?;
        let mut driver = Driver {
            me,
            node,
            view_id,
            transport,
            stores,
            layout,
            formed: false,
            peers,
            linked: HashSet::new(),
            early: Vec::new(),
            clients: Clients::default(),
            next_request_id: 1,
            actions: Vec::new(),
            time_read_wait: Duration::from_millis(config.time_read_wait_ms),
        };
        driver.check_formed().await?;
        let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("installing the SIGTERM handler")?;
        let interrupt = tokio::signal::ctrl_c();
        tokio::pin!(interrupt);
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(event) => driver.link_event(event).await?,
                    None => anyhow::bail!("the transport stopped"),
                },
                _ = ticker.tick() => driver.tick().await?,
                _ = notify.notified() => driver.persisted().await?,
                _ = &mut interrupt => break,
                _ = terminate.recv() => break,
            }
        }
        tracing::info!(node = me, "stopping");
        Ok(())
    }

    /// Steps the engine and carries out its actions; returns the step's own error, if any.
    async fn step(&mut self, input: Input) -> anyhow::Result<Option<StepError>> {
        let mut actions = std::mem::take(&mut self.actions);
        let error = self.node.step(now_us(), input, &mut actions).err();
        let result = self.carry_out(&mut actions).await;
        actions.clear();
        self.actions = actions;
        result?;
        self.progress();
        Ok(error)
    }

    async fn carry_out(&mut self, actions: &mut Vec<Action>) -> anyhow::Result<()> {
        for action in actions.drain(..) {
            match action {
                Action::Send { to, message } => {
                    let bytes = Bytes::from(message.to_bytes());
                    if let Err(e) = self
                        .transport
                        .send(Peer::Node(to), self.view_id, bytes)
                        .await
                    {
                        tracing::debug!(node = self.me, peer = to, error = %e, "message not sent");
                    }
                }
                Action::Deliver { shard, deliveries } => self.deliver(shard, deliveries)?,
                Action::Persist { shard, version } => match self.stores.get(&shard) {
                    Some(store) => store.persist(version),
                    None => tracing::warn!(node = self.me, %shard, "persist of a shard not here"),
                },
                Action::Suspect { node } => {
                    tracing::warn!(node = self.me, suspect = node, "suspecting a member");
                }
                Action::Wedge => {
                    tracing::warn!(
                        node = self.me,
                        "wedged: writes fail until the view changes; reads go on"
                    );
                    let submitted: Vec<Submitted> =
                        self.clients.submitted.drain().map(|(_, s)| s).collect();
                    for s in submitted {
                        let reply = wedged_error();
                        self.send_client(s.client, reply.encode(s.tag));
                    }
                }
                #[allow(unreachable_patterns)]
                other => {
                    tracing::warn!(node = self.me, action = ?other, "unknown engine action ignored")
                }
            }
        }
        Ok(())
    }

    /// Applies delivered versions, answers the writes this node submitted, and notifies watchers.
    fn deliver(&mut self, shard: ShardId, deliveries: Vec<Delivery>) -> anyhow::Result<()> {
        let Some(store) = self.stores.get(&shard) else {
            tracing::warn!(node = self.me, %shard, "delivery for a shard not here");
            return Ok(());
        };
        let mut out: Vec<(ClientId, Bytes)> = Vec::new();
        for d in deliveries {
            let payloads: Vec<Bytes> = d.requests.iter().map(|r| r.payload.clone()).collect();
            let applied = store
                .kv()
                .apply(d.version, d.hlc, &payloads)
                .with_context(|| format!("applying version {:#x} of {shard}", d.version))?;
            if d.sender == self.me {
                for (request, reply) in d.requests.iter().zip(&applied.replies) {
                    let Some(s) = self.clients.submitted.remove(&request.id) else {
                        continue;
                    };
                    let bytes = Reply::Written(reply.clone()).encode(s.tag);
                    let durable = s.durable && matches!(reply, KvReply::Written { .. });
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
            for (key, value) in applied.changed {
                for (&client, watches) in &self.clients.watches {
                    for w in watches.iter().filter(|w| key.starts_with(&w.prefix)) {
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
        for (client, bytes) in out {
            self.send_client(client, bytes);
        }
        Ok(())
    }

    /// After the engine moved: answers the writes now durable and the reads now possible.
    fn progress(&mut self) {
        let mut out = Vec::new();
        for (shard, waits) in &mut self.clients.durable {
            let frontier = self.node.persistence_frontier(*shard);
            while waits.front().is_some_and(|w| Some(w.version) <= frontier) {
                if let Some(w) = waits.pop_front() {
                    out.push((w.client, w.reply));
                }
            }
        }
        if !self.clients.reads.is_empty() {
            let reads = std::mem::take(&mut self.clients.reads);
            for read in reads {
                if self.ready(read.shard, read.until) {
                    let reply = self.serve_read(read.shard, &read.key, read.at);
                    out.push((read.client, reply.encode(read.tag)));
                } else {
                    self.clients.reads.push(read);
                }
            }
        }
        for (client, bytes) in out {
            self.send_client(client, bytes);
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
        match self
            .transport
            .try_send(Peer::Client(client), self.view_id, bytes)
        {
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
                ..
            } => {
                tracing::info!(node = self.me, peer = id, %addr, "linked");
                self.linked.insert(id);
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
                    if let Some(e) = self.step(Input::Message { from, message }).await? {
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
                tracing::warn!(node = self.me, peer = id, %reason, "link broke; the member will be suspected");
                self.linked.remove(&id);
            }
            LinkEvent::Broken {
                peer: Peer::Client(client),
                ..
            } => self.clients.forget(client),
        }
        Ok(())
    }

    async fn check_formed(&mut self) -> anyhow::Result<()> {
        if self.formed || !self.peers.iter().all(|p| self.linked.contains(p)) {
            return Ok(());
        }
        self.formed = true;
        tracing::info!(
            node = self.me,
            view_id = self.view_id,
            "every member is linked; the view runs"
        );
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
        if self.clients.reads.iter().any(|r| r.deadline <= now) {
            let (late, waiting): (Vec<ReadWait>, Vec<ReadWait>) =
                std::mem::take(&mut self.clients.reads)
                    .into_iter()
                    .partition(|r| r.deadline <= now);
            self.clients.reads = waiting;
            for r in late {
                let message = match r.until {
                    Until::Stable(t) => format!("the stability frontier did not pass {t} in time"),
                    Until::Delivered(v) => format!("version {v:#x} was not delivered here in time"),
                };
                self.send_client(r.client, error(ErrorCode::TimedOut, &message).encode(r.tag));
            }
        }
        Ok(())
    }

    async fn persisted(&mut self) -> anyhow::Result<()> {
        let mut done = Vec::new();
        for (shard, store) in &mut self.stores {
            match store.take_persisted() {
                Ok(Some(version)) => done.push((*shard, version)),
                Ok(None) => {}
                Err(e) => anyhow::bail!("the log of {shard} failed, so this replica stops: {e}"),
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
            Request::Watch { prefix } => Some(self.watch(client, tag, prefix)),
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
        if !self.stores.contains_key(&shard) {
            return Err(error(
                ErrorCode::NotReplica,
                &format!("node {} does not replicate {shard}", self.me),
            ));
        }
        Ok(shard)
    }

    async fn write(
        &mut self,
        client: ClientId,
        tag: u64,
        hlc: Hlc,
        durable: bool,
        payload: Bytes,
    ) -> anyhow::Result<Option<Reply>> {
        if !self.formed {
            return Ok(Some(error(ErrorCode::Forming, "the view is still forming")));
        }
        if self.node.is_wedged() {
            return Ok(Some(wedged_error()));
        }
        let request = match KvRequest::decode(payload.clone()) {
            Ok(r) => r,
            Err(e) => return Ok(Some(error(ErrorCode::Malformed, &e.to_string()))),
        };
        if request.client != client {
            let message = "the request's client id is not the link's";
            return Ok(Some(error(ErrorCode::Malformed, message)));
        }
        let shard = match self.shard_here(request.op.key()) {
            Ok(shard) => shard,
            Err(reply) => return Ok(Some(reply)),
        };
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
        match self.step(Input::Submit { shard, request }).await? {
            Some(StepError::Submit(e)) => {
                self.clients.submitted.remove(&id);
                let code = match e {
                    SubmitError::Wedged(_) => ErrorCode::Wedged,
                    SubmitError::QueueFull(_) => ErrorCode::Busy,
                    SubmitError::NotReplica(_) => ErrorCode::NotReplica,
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
        let until = match at {
            ReadAt::Latest => after.map(Until::Delivered),
            ReadAt::Version(v) => Some(Until::Delivered(v)),
            ReadAt::Time(t) => Some(Until::Stable(t)),
        };
        match until {
            Some(until) if !self.ready(shard, until) => {
                if self.clients.reads.len() >= READ_WAITS_MAX {
                    return Some(error(ErrorCode::Busy, "too many reads waiting"));
                }
                self.clients.reads.push(ReadWait {
                    client,
                    tag,
                    shard,
                    key,
                    at,
                    until,
                    deadline: Instant::now() + self.time_read_wait,
                });
                None
            }
            _ => Some(self.serve_read(shard, &key, at)),
        }
    }

    fn history(&self, key: &[u8]) -> Reply {
        let shard = match self.shard_here(key) {
            Ok(shard) => shard,
            Err(reply) => return reply,
        };
        let Some(store) = self.stores.get(&shard) else {
            return error(
                ErrorCode::NotReplica,
                "this node does not replicate the shard",
            );
        };
        let all = store.kv().history(key);
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

    fn watch(&mut self, client: ClientId, tag: u64, prefix: Bytes) -> Reply {
        if !self.clients.watches.contains_key(&client) && self.clients.watches.len() >= WATCHERS_MAX
        {
            return error(ErrorCode::Busy, "too many clients watch this node");
        }
        let watches = self.clients.watches.entry(client).or_default();
        if watches.len() >= WATCHES_PER_CLIENT_MAX {
            return error(ErrorCode::Busy, "too many watches on this link");
        }
        watches.push(Watch { tag, prefix });
        Reply::Watching
    }

    fn status(&self) -> NodeStatus {
        let state = if !self.formed {
            "forming"
        } else if self.node.is_wedged() {
            "wedged"
        } else {
            "active"
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

fn wedged_error() -> Reply {
    error(
        ErrorCode::Wedged,
        "the shard is wedged: a member is suspected and the view must change; reads still work",
    )
}

/// Dials a member until the link is up (it may not have started yet).
async fn dial(transport: Arc<Transport>, peer: NodeId, addr: SocketAddr) {
    let me = transport.node_id();
    let mut attempts: u64 = 0;
    loop {
        match transport.connect(peer, addr).await {
            Ok(()) | Err(ConnectError::AlreadyLinked(_)) => return,
            Err(e @ ConnectError::BrokenInView { .. }) => {
                tracing::warn!(node = me, peer, error = %e, "not dialing again");
                return;
            }
            Err(e) => {
                attempts += 1;
                if attempts % 50 == 1 {
                    tracing::info!(node = me, peer, %addr, error = %e, "waiting for member");
                }
                tokio::time::sleep(Duration::from_millis(DIAL_RETRY_MS)).await;
            }
        }
    }
}

fn layout_info(view: &View, members: &[Member]) -> LayoutInfo {
    LayoutInfo {
        view_id: view.view_id,
        members: members.iter().map(|m| (m.id, m.addr)).collect(),
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
    }
}
