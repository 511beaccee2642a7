//! The K/V client: learns the view from any contact, sends each request to a member of the
//! owning shard (spreading requests over its members), and retries on another member when one
//! fails, resending a write with the same request number so it applies once.
//!
//! It follows view changes: when a member fails, is wedged by a view change, or answers that it
//! no longer replicates the shard, the client asks any member for the current view and resends
//! to a member of it, for up to [`RETRY_WINDOW_MS`]. A change that keeps a majority therefore
//! shows no error; a node that lost its majority answers `NoMajority`, which the client reports
//! once no member it can reach does better.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use derechofs_core::kv::{KvOp, KvReply, KvRequest, ReadAt, Versioned};
use derechofs_core::transport::{ClientConn, ClientId, Secret};
use derechofs_core::{Hlc, NodeId, Version};

use crate::protocol::{
    Change, ErrorCode, Event, LayoutInfo, NodeStatus, Reply, Request, ShardInfo,
};

/// Time a request may take before the client tries another member.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Time the client gives a member to accept its link (TCP and handshake); a hung member
/// must not hold a request for long when others can take it.
pub const CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Time a member has to answer a request for the view, which it answers at once when it runs.
pub const LAYOUT_TIMEOUT_MS: u64 = 500;
/// Time a request may wait for its reply before the client checks, every as long again,
/// whether the member it waits on is still in the view.
pub const SLOW_REPLY_MS: u64 = 200;
/// Time a member that could not be reached is skipped while others of its shard remain.
pub const DOWN_SKIP_MS: u64 = 2_000;
/// Time a request keeps being resent through failures and view changes before the client
/// reports the last refusal.
pub const RETRY_WINDOW_MS: u64 = 15_000;
/// First pause between attempts; it doubles up to [`RETRY_PAUSE_MAX_MS`].
pub const RETRY_PAUSE_MS: u64 = 5;
/// Longest pause between attempts.
pub const RETRY_PAUSE_MAX_MS: u64 = 200;
/// Full passes over a shard's members that all refuse with `NoMajority` or `Removed` (or cannot
/// be reached) before the client gives up early: no member can take the request.
pub const REFUSING_PASSES_MAX: usize = 2;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No contact or member could be reached, or none answered in time.
    #[error("no member answered: {0}")]
    Unreachable(String),
    /// The node refused the request.
    #[error("{code:?}: {message}")]
    Refused {
        /// The kind of failure.
        code: ErrorCode,
        /// The node's explanation.
        message: String,
    },
    /// The node answered something that makes no sense for the request.
    #[error("unexpected reply: {0}")]
    Protocol(String),
}

/// The result of a read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The version the read looked at.
    pub read_version: Option<Version>,
    /// The value with the version that wrote it; `None`: absent.
    pub found: Option<Versioned>,
    /// The member that answered.
    pub member: NodeId,
}

/// A K/V client.
#[derive(Debug)]
pub struct Client {
    id: ClientId,
    secret: Secret,
    layout: LayoutInfo,
    conns: HashMap<NodeId, ClientConn>,
    /// The contacts it started from, to learn the view again if every known member fails.
    contacts: Vec<SocketAddr>,
    /// Members that could not be reached, and when.
    down: HashMap<NodeId, tokio::time::Instant>,
    next_number: u64,
    next_tag: u64,
    /// The newest stamp seen.
    seen: Hlc,
    /// Per shard, the newest version this client wrote: reads wait for it.
    written: HashMap<u16, Version>,
    spread: usize,
}

/// A random id, for clients.
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Without the OS generator, the time and pid are still unlikely to collide.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

async fn resolve(contacts: &[String]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for c in contacts {
        if let Ok(addrs) = tokio::net::lookup_host(c.as_str()).await {
            out.extend(addrs);
        }
    }
    out
}

async fn call_on(conn: &mut ClientConn, tag: u64, request: &Request) -> Result<Reply, String> {
    call_within(conn, tag, request, REQUEST_TIMEOUT_MS).await
}

/// Sends `request` on `conn` and waits at most `timeout_ms` for its reply.
async fn call_within(
    conn: &mut ClientConn,
    tag: u64,
    request: &Request,
    timeout_ms: u64,
) -> Result<Reply, String> {
    let bytes = request.encode(tag);
    let exchange = async {
        conn.send(0, &bytes).await.map_err(|e| e.to_string())?;
        loop {
            let (_, frame) = conn.recv().await.map_err(|e| e.to_string())?;
            let (got, reply) = Reply::decode(frame).map_err(|e| e.to_string())?;
            if got == tag {
                return Ok(reply);
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

impl Client {
    /// Connects through the first contact that answers and learns the layout from it.
    pub async fn connect(contacts: &[String], secret: Secret) -> Result<Client, ClientError> {
        let id = random_id();
        let mut last = "no contact given".to_string();
        let resolved = resolve(contacts).await;
        for &addr in &resolved {
            match ClientConn::connect(addr, id, &secret, None).await {
                Ok(mut conn) => match call_on(&mut conn, 1, &Request::Layout).await {
                    Ok(Reply::Layout(layout)) => {
                        let mut conns = HashMap::new();
                        conns.insert(conn.node_id(), conn);
                        return Ok(Client {
                            id,
                            secret,
                            layout,
                            conns,
                            contacts: resolved.clone(),
                            down: HashMap::new(),
                            next_number: 1,
                            next_tag: 2,
                            seen: Hlc::ZERO,
                            written: HashMap::new(),
                            spread: id as usize,
                        });
                    }
                    Ok(other) => last = format!("{addr}: unexpected reply {other:?}"),
                    Err(e) => last = format!("{addr}: {e}"),
                },
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(ClientError::Unreachable(last))
    }

    /// Closes every link in order, so the nodes see a goodbye rather than a broken link.
    pub async fn close(mut self) {
        for (_, conn) in self.conns.drain() {
            let (sender, _receiver) = conn.into_split();
            let _ = sender.close().await;
        }
    }

    /// The view and layout learnt from the contact.
    pub fn layout(&self) -> &LayoutInfo {
        &self.layout
    }

    fn shard_of(&self, key: &[u8]) -> Result<ShardInfo, ClientError> {
        self.layout
            .shard_of(key)
            .cloned()
            .ok_or_else(|| ClientError::Protocol("the layout has no data shard".into()))
    }

    async fn conn(&mut self, node: NodeId) -> Result<&mut ClientConn, String> {
        if !self.conns.contains_key(&node) {
            let addr = self
                .layout
                .addr_of(node)
                .ok_or_else(|| format!("node {node} has no address"))?;
            let connect = ClientConn::connect(addr, self.id, &self.secret, Some(node));
            let conn = match tokio::time::timeout(
                Duration::from_millis(CONNECT_TIMEOUT_MS),
                connect,
            )
            .await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    self.down.insert(node, tokio::time::Instant::now());
                    return Err(format!("node {node} at {addr}: {e}"));
                }
                Err(_) => {
                    self.down.insert(node, tokio::time::Instant::now());
                    return Err(format!("node {node} at {addr}: no answer to the handshake"));
                }
            };
            self.down.remove(&node);
            self.conns.insert(node, conn);
        }
        self.conns
            .get_mut(&node)
            .ok_or_else(|| "connection lost".to_string())
    }

    /// Sends `request` to `node`, once.
    async fn call_node(&mut self, node: NodeId, request: &Request) -> Result<Reply, String> {
        self.call_node_within(node, request, REQUEST_TIMEOUT_MS)
            .await
    }

    /// Sends `request` to `node`, once, waiting at most `timeout_ms` for the reply.
    async fn call_node_within(
        &mut self,
        node: NodeId,
        request: &Request,
        timeout_ms: u64,
    ) -> Result<Reply, String> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let conn = self.conn(node).await?;
        let result = call_within(conn, tag, request, timeout_ms).await;
        if result.is_err() {
            self.conns.remove(&node);
        }
        result
    }

    /// Sends `request` to `node` once, like [`Client::call_node`], but while the reply is late
    /// asks the other members for the view every [`SLOW_REPLY_MS`]: if `node` left the view (it
    /// hangs, and the others removed it), the request is abandoned, to be resent elsewhere.
    async fn call_watching(&mut self, node: NodeId, request: &Request) -> Result<Reply, String> {
        let tag = self.next_tag;
        self.next_tag += 1;
        self.conn(node).await?;
        let Some(mut conn) = self.conns.remove(&node) else {
            return Err("connection lost".into());
        };
        let result = {
            let exchange = call_on(&mut conn, tag, request);
            tokio::pin!(exchange);
            let mut check = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_millis(SLOW_REPLY_MS),
                Duration::from_millis(SLOW_REPLY_MS),
            );
            loop {
                tokio::select! {
                    result = &mut exchange => break result,
                    _ = check.tick() => {
                        if self.refresh_layout_without(Some(node)).await
                            && !self.layout.members.iter().any(|(m, _)| *m == node)
                        {
                            break Err(format!("node {node} left the view while the request waited"));
                        }
                    }
                }
            }
        };
        if result.is_ok() {
            self.conns.insert(node, conn);
        }
        result
    }

    /// Asks the members it knows, then its contacts, for the view, and adopts it if it is later
    /// than the one it has. Returns whether the view changed.
    async fn refresh_layout(&mut self) -> bool {
        self.refresh_layout_without(None).await
    }

    /// [`Client::refresh_layout`], asking anyone but `skip`.
    async fn refresh_layout_without(&mut self, skip: Option<NodeId>) -> bool {
        let mut known: Vec<NodeId> = self.conns.keys().copied().collect();
        for (node, _) in &self.layout.members {
            if !known.contains(node) {
                known.push(*node);
            }
        }
        for node in known {
            if self.is_down(node) || Some(node) == skip {
                continue;
            }
            let asked = self.call_node_within(node, &Request::Layout, LAYOUT_TIMEOUT_MS);
            if let Ok(Reply::Layout(layout)) = asked.await {
                return self.adopt(layout);
            }
        }
        for addr in self.contacts.clone() {
            let connect = ClientConn::connect(addr, self.id, &self.secret, None);
            let timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
            let Ok(Ok(mut conn)) = tokio::time::timeout(timeout, connect).await else {
                continue;
            };
            let node = conn.node_id();
            if Some(node) == skip || self.conns.contains_key(&node) {
                // Already asked (or the one being waited on).
                continue;
            }
            let tag = self.next_tag;
            self.next_tag += 1;
            let asked = call_within(&mut conn, tag, &Request::Layout, LAYOUT_TIMEOUT_MS);
            if let Ok(Reply::Layout(layout)) = asked.await {
                self.conns.entry(node).or_insert(conn);
                return self.adopt(layout);
            }
        }
        false
    }

    fn is_down(&self, node: NodeId) -> bool {
        self.down
            .get(&node)
            .is_some_and(|at| at.elapsed() < Duration::from_millis(DOWN_SKIP_MS))
    }

    fn adopt(&mut self, layout: LayoutInfo) -> bool {
        if layout.view_id <= self.layout.view_id {
            return false;
        }
        // Links to nodes that left the view are of no more use.
        self.conns
            .retain(|node, _| layout.members.iter().any(|(m, _)| m == node));
        self.layout = layout;
        true
    }

    /// Sends `request` to the members of the shard holding `key` (or to `pin` only) in turn
    /// until one answers, following view changes on the way: a member that fails, is busy or
    /// wedged, or no longer replicates the shard is left for the next, and the view is learnt
    /// again. Gives up after [`RETRY_WINDOW_MS`], or earlier when every member refuses for good.
    async fn call_shard(
        &mut self,
        key: &[u8],
        request: &Request,
        pin: Option<NodeId>,
    ) -> Result<(NodeId, Reply), ClientError> {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(RETRY_WINDOW_MS);
        let mut pause = RETRY_PAUSE_MS;
        let mut refused: Option<(ErrorCode, String)> = None;
        let mut last: String;
        // Consecutive answers that say this member can never take the request.
        let mut hopeless = 0usize;
        self.spread = self.spread.wrapping_add(1);
        let mut attempt = 0usize;
        loop {
            let shard = self.shard_of(key)?;
            let members: Vec<NodeId> = match pin {
                Some(node) => vec![node],
                None => shard.members.clone(),
            };
            if members.is_empty() {
                return Err(ClientError::Unreachable("the shard has no members".into()));
            }
            let node = members[(self.spread + attempt) % members.len()];
            attempt += 1;
            let relearn;
            let skip = self.is_down(node) && members.iter().any(|m| !self.is_down(*m));
            if skip {
                // Counts as an unreachable answer, without the wait.
                hopeless += 1;
                let give_up = refused.is_some() && hopeless >= REFUSING_PASSES_MAX * members.len();
                if give_up || tokio::time::Instant::now() >= deadline {
                    return Err(match refused {
                        Some((code, message)) => ClientError::Refused { code, message },
                        None => ClientError::Unreachable(format!("node {node}: not reachable")),
                    });
                }
                continue;
            }
            match self.call_watching(node, request).await {
                Ok(Reply::Error { code, message }) => match code {
                    ErrorCode::Busy | ErrorCode::Forming | ErrorCode::Wedged => {
                        hopeless = 0;
                        relearn = code == ErrorCode::Wedged;
                        last = format!("node {node}: {code:?}: {message}");
                    }
                    ErrorCode::NoMajority
                    | ErrorCode::Removed
                    | ErrorCode::NotReplica
                    | ErrorCode::Inadequate => {
                        hopeless += 1;
                        relearn = true;
                        last = format!("node {node}: {code:?}: {message}");
                        if refused
                            .as_ref()
                            .is_none_or(|(c, _)| *c != ErrorCode::NoMajority)
                        {
                            refused = Some((code, message));
                        }
                    }
                    _ => return Err(ClientError::Refused { code, message }),
                },
                Ok(reply) => return Ok((node, reply)),
                Err(e) => {
                    hopeless += 1;
                    relearn = true;
                    last = format!("node {node}: {e}");
                }
            }
            if relearn && pin.is_none() && self.refresh_layout().await {
                // A new view: its members get a fresh chance.
                hopeless = 0;
                attempt = 0;
                pause = RETRY_PAUSE_MS;
                continue;
            }
            let give_up = tokio::time::Instant::now() >= deadline
                || (refused.is_some() && hopeless >= REFUSING_PASSES_MAX * members.len());
            if give_up {
                return Err(match refused {
                    Some((code, message)) => ClientError::Refused { code, message },
                    None => ClientError::Unreachable(last),
                });
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX_MS);
        }
    }

    fn saw(&mut self, hlc: Hlc) {
        self.seen = self.seen.max(hlc);
    }

    /// Writes: `Put`, `CondPut` or `Delete`; acknowledged once durable on every replica.
    pub async fn write(&mut self, op: KvOp) -> Result<KvReply, ClientError> {
        let key = op.key().to_vec();
        let number = self.next_number;
        self.next_number += 1;
        let payload = KvRequest {
            client: self.id,
            number,
            op,
        }
        .encode();
        let request = Request::Write {
            hlc: self.seen.tick(),
            durable: true,
            payload,
        };
        // A retry resends the same request number, so the write applies once.
        let (_, reply) = self.call_shard(&key, &request, None).await?;
        match reply {
            Reply::Written(reply) => {
                if let KvReply::Written { version, hlc } = reply {
                    self.saw(hlc);
                    let shard = self.shard_of(&key)?;
                    let w = self.written.entry(shard.id).or_insert(version);
                    *w = (*w).max(version);
                }
                Ok(reply)
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Reads `key` at `at`; at latest, sees this client's own writes. `member` pins the replica.
    pub async fn get(
        &mut self,
        key: &[u8],
        at: ReadAt,
        member: Option<NodeId>,
    ) -> Result<ReadResult, ClientError> {
        let shard = self.shard_of(key)?;
        let after = match at {
            ReadAt::Latest => self.written.get(&shard.id).copied(),
            _ => None,
        };
        let request = Request::Get {
            key: Bytes::copy_from_slice(key),
            at,
            after,
        };
        let (node, reply) = self.call_shard(key, &request, member).await?;
        match reply {
            Reply::Value {
                read_version,
                found,
            } => {
                if let Some(v) = &found {
                    self.saw(v.hlc);
                }
                Ok(ReadResult {
                    read_version,
                    found,
                    member: node,
                })
            }
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// Every change of `key` still held, oldest first, and whether older ones were left out.
    pub async fn history(&mut self, key: &[u8]) -> Result<(bool, Vec<Change>), ClientError> {
        let request = Request::History {
            key: Bytes::copy_from_slice(key),
        };
        match self.call_shard(key, &request, None).await?.1 {
            Reply::History { truncated, changes } => Ok((truncated, changes)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The status of one member.
    pub async fn status_of(&mut self, node: NodeId) -> Result<NodeStatus, ClientError> {
        match self.call_node(node, &Request::Status).await {
            Ok(Reply::Status(s)) => Ok(s),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(e) => Err(ClientError::Unreachable(format!("node {node}: {e}"))),
        }
    }

    /// Watches `prefix` on one member of every data shard; events arrive on the returned
    /// receiver in version order per shard. The watch ends when a link ends.
    pub async fn watch(
        &mut self,
        prefix: &[u8],
    ) -> Result<tokio::sync::mpsc::Receiver<Result<Event, ClientError>>, ClientError> {
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_EVENTS_MAX);
        let shards: Vec<ShardInfo> = self
            .layout
            .shards
            .iter()
            .filter(|s| s.data)
            .cloned()
            .collect();
        for shard in shards {
            let mut last = String::from("no member");
            let mut watching = None;
            for i in 0..shard.members.len() {
                let node = shard.members[(self.spread + i) % shard.members.len()];
                let Some(addr) = self.layout.addr_of(node) else {
                    continue;
                };
                // A link of its own, so its events do not mix with this client's replies.
                let conn = ClientConn::connect(addr, random_id(), &self.secret, Some(node)).await;
                let mut conn = match conn {
                    Ok(conn) => conn,
                    Err(e) => {
                        last = format!("node {node}: {e}");
                        continue;
                    }
                };
                let request = Request::Watch {
                    prefix: Bytes::copy_from_slice(prefix),
                };
                match call_on(&mut conn, 1, &request).await {
                    Ok(Reply::Watching) => {
                        watching = Some(conn);
                        break;
                    }
                    Ok(other) => last = format!("node {node}: {other:?}"),
                    Err(e) => last = format!("node {node}: {e}"),
                }
            }
            let Some(mut conn) = watching else {
                return Err(ClientError::Unreachable(last));
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let event = match conn.recv().await {
                        Ok((_, frame)) => match Reply::decode(frame) {
                            Ok((1, Reply::Event(e))) => Ok(e),
                            Ok(_) => continue,
                            Err(e) => Err(ClientError::Protocol(e.to_string())),
                        },
                        Err(e) => Err(ClientError::Unreachable(e.to_string())),
                    };
                    let end = event.is_err();
                    if tx.send(event).await.is_err() || end {
                        return;
                    }
                }
            });
        }
        Ok(rx)
    }
}

/// Watch events buffered for the reader.
pub const WATCH_EVENTS_MAX: usize = 1024;
