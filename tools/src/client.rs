//! The K/V client: learns the view from any contact, sends each request to a member of the
//! owning shard (spreading requests over its members), and retries on another member when one
//! fails, resending a write with the same request number so it applies once.

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
/// Attempts at one request, over the members of its shard.
pub const ATTEMPTS_MAX: usize = 6;
/// Pause between attempts.
pub const RETRY_PAUSE_MS: u64 = 200;

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
    tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

impl Client {
    /// Connects through the first contact that answers and learns the layout from it.
    pub async fn connect(contacts: &[String], secret: Secret) -> Result<Client, ClientError> {
        let id = random_id();
        let mut last = "no contact given".to_string();
        for addr in resolve(contacts).await {
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
            let conn = ClientConn::connect(addr, self.id, &self.secret, Some(node))
                .await
                .map_err(|e| format!("node {node} at {addr}: {e}"))?;
            self.conns.insert(node, conn);
        }
        self.conns
            .get_mut(&node)
            .ok_or_else(|| "connection lost".to_string())
    }

    /// Sends `request` to `node`, once.
    async fn call_node(&mut self, node: NodeId, request: &Request) -> Result<Reply, String> {
        let tag = self.next_tag;
        self.next_tag += 1;
        let conn = self.conn(node).await?;
        let result = call_on(conn, tag, request).await;
        if result.is_err() {
            self.conns.remove(&node);
        }
        result
    }

    /// Sends `request` to members of `shard` in turn until one answers; a member that fails or
    /// is busy is left for the next.
    async fn call_shard(
        &mut self,
        shard: &ShardInfo,
        request: &Request,
        pin: Option<NodeId>,
    ) -> Result<(NodeId, Reply), ClientError> {
        let members: Vec<NodeId> = match pin {
            Some(node) => vec![node],
            None => shard.members.clone(),
        };
        if members.is_empty() {
            return Err(ClientError::Unreachable("the shard has no members".into()));
        }
        self.spread = self.spread.wrapping_add(1);
        let mut last = String::new();
        for attempt in 0..ATTEMPTS_MAX {
            let node = members[(self.spread + attempt) % members.len()];
            match self.call_node(node, request).await {
                Ok(Reply::Error {
                    code: code @ (ErrorCode::Busy | ErrorCode::Forming),
                    message,
                }) => last = format!("node {node}: {code:?}: {message}"),
                Ok(Reply::Error { code, message }) => {
                    return Err(ClientError::Refused { code, message })
                }
                Ok(reply) => return Ok((node, reply)),
                Err(e) => last = format!("node {node}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
        }
        Err(ClientError::Unreachable(last))
    }

    fn saw(&mut self, hlc: Hlc) {
        self.seen = self.seen.max(hlc);
    }

    /// Writes: `Put`, `CondPut` or `Delete`; acknowledged once durable on every replica.
    pub async fn write(&mut self, op: KvOp) -> Result<KvReply, ClientError> {
        let shard = self.shard_of(op.key())?;
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
        let (_, reply) = self.call_shard(&shard, &request, None).await?;
        match reply {
            Reply::Written(reply) => {
                if let KvReply::Written { version, hlc } = reply {
                    self.saw(hlc);
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
        let (node, reply) = self.call_shard(&shard, &request, member).await?;
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
        let shard = self.shard_of(key)?;
        let request = Request::History {
            key: Bytes::copy_from_slice(key),
        };
        match self.call_shard(&shard, &request, None).await?.1 {
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
