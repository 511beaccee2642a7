//! The K/V client: learns the view from any contact, sends each request to a member of the
//! owning shard (spreading requests over its members), and retries on another member when one
//! fails, resending a write with the same request number so it applies once.
//!
//! It follows view changes: when a member fails, is wedged by a view change, or answers that it
//! no longer replicates the shard, the client asks any member for the current view and resends
//! to a member of it, for up to [`RETRY_WINDOW_MS`]. A change that keeps a majority therefore
//! shows no error; a node that lost its majority answers `NoMajority`, which the client reports
//! once no member it can reach does better.
//!
//! Links are pipelined: a [`Links`] holds one link per member, and any number of requests may
//! be in flight on it at once, each under its own tag. A writer task sends every request queued
//! since its last write in one write (yielding once to the runtime before that write, so that
//! the callers woken by the same replies queue theirs first), and a reader task hands each reply
//! to its caller by tag.
//! Several clients may share one [`Links`] ([`Client::connect_shared`]): each keeps its own
//! client id and request numbers (a client has one write outstanding), and they share the
//! connections, so one read at the node takes many requests and one write carries many replies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use derechofs_core::kv::{KvOp, KvReply, KvRequest, ReadAt, Versioned};
use derechofs_core::transport::{
    ClientConn, ClientId, ClientReceiver, ClientSender, LinkKind, Secret,
};
use derechofs_core::{Hlc, NodeId, Version};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::protocol::{
    write_member_index, Change, ErrorCode, Event, LayoutInfo, NodeStatus, Reply, Request, ShardInfo,
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
/// Requests waiting for a link's writer; more callers wait for room.
pub const LINK_QUEUE_MAX: usize = 1024;
/// Requests in flight on one link (sent or queued, not answered); beyond it a call fails.
pub const LINK_IN_FLIGHT_MAX: usize = 1 << 14;
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
    /// The directory of the nodes' local sockets (`None`: TCP only).
    local_dir: Option<PathBuf>,
    layout: LayoutInfo,
    /// The links to the members, possibly shared with other clients.
    links: Arc<Links>,
    /// The contacts it started from, to learn the view again if every known member fails.
    contacts: Vec<SocketAddr>,
    /// Members that could not be reached, and when.
    down: HashMap<NodeId, tokio::time::Instant>,
    next_number: u64,
    /// The newest stamp seen.
    seen: Hlc,
    /// Per shard, the newest version this client wrote: reads wait for it.
    written: HashMap<u16, Version>,
    spread: usize,
    /// The key of the last conditional put of this client that was answered with a conflict.
    contended: Option<Vec<u8>>,
}

/// Which member of the owning shard a request goes to first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The next in this client's rotation over the members: requests spread over them.
    Spread,
    /// The key's own member (`write_member_index`), the same for every client. Conditional
    /// puts of a contended key go there: the attempts of all its clients reach one member and
    /// leave in one multicast message per turn, rather than one message from each member, so
    /// the round after which the next attempt can succeed is shorter. Writes of keys without
    /// contention stay spread: clients that move over the members in step share the members'
    /// turns and their links' writes, which random placement by key would scatter.
    KeyMember,
}

impl Route {
    /// The route of the write `op` from a client whose last conditional put that lost a race
    /// was of `contended`: a conditional put of that key goes to the key's member, where the
    /// other clients' attempts at it go too; every other write is spread.
    fn of_write(op: &KvOp, contended: Option<&[u8]>) -> Route {
        match op {
            KvOp::CondPut { key, .. } if contended == Some(&key[..]) => Route::KeyMember,
            _ => Route::Spread,
        }
    }
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

/// Sends `request` on a link of its own and waits at most `timeout_ms` for its reply: for
/// watches and probes, whose links carry nothing else.
async fn call_alone(
    conn: &mut ClientConn,
    request: &Request,
    timeout_ms: u64,
) -> Result<Reply, String> {
    const TAG: u64 = 1;
    let bytes = request.encode(TAG);
    let exchange = async {
        conn.send(0, &bytes).await.map_err(|e| e.to_string())?;
        loop {
            let (_, frame) = conn.recv().await.map_err(|e| e.to_string())?;
            let (got, reply) = Reply::decode(frame).map_err(|e| e.to_string())?;
            if got == TAG {
                return Ok(reply);
            }
        }
    };
    tokio::time::timeout(Duration::from_millis(timeout_ms), exchange)
        .await
        .unwrap_or_else(|_| Err("timed out".to_string()))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent whatever panicked while holding them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a link's writer task is asked to do.
#[derive(Debug)]
enum Outgoing {
    /// Send this encoded request.
    Request(Bytes),
    /// Close the link in order (a bye), then say so.
    Close(oneshot::Sender<()>),
}

/// Callers waiting for replies on one link, by tag; `broken` once the link ended.
#[derive(Debug, Default)]
struct Waiting {
    calls: HashMap<u64, oneshot::Sender<Reply>>,
    broken: Option<String>,
}

/// One pipelined link to a node.
#[derive(Debug)]
struct Link {
    node: NodeId,
    /// The address it was made to.
    addr: SocketAddr,
    /// The kind of connection it runs on.
    kind: LinkKind,
    queue: mpsc::Sender<Outgoing>,
    waiting: Arc<Mutex<Waiting>>,
    next_tag: AtomicU64,
    reader: AbortHandle,
    writer: AbortHandle,
}

impl Link {
    /// Starts the writer and reader tasks of an established connection.
    fn start(conn: ClientConn, addr: SocketAddr) -> Link {
        let node = conn.node_id();
        let kind = conn.kind();
        let (sender, receiver) = conn.into_split();
        let (queue, queued) = mpsc::channel(LINK_QUEUE_MAX);
        let waiting = Arc::new(Mutex::new(Waiting::default()));
        let writer = tokio::spawn(write_requests(sender, queued, waiting.clone())).abort_handle();
        let reader = tokio::spawn(read_replies(receiver, waiting.clone())).abort_handle();
        Link {
            node,
            addr,
            kind,
            queue,
            waiting,
            next_tag: AtomicU64::new(1),
            reader,
            writer,
        }
    }

    fn is_broken(&self) -> bool {
        lock(&self.waiting).broken.is_some()
    }

    /// Sends `request` and waits at most `timeout_ms` for its reply.
    async fn call(&self, request: &Request, timeout_ms: u64) -> Result<Reply, String> {
        tokio::time::timeout(Duration::from_millis(timeout_ms), self.exchange(request))
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()))
    }

    /// Sends `request` and waits for its reply, however long: the caller bounds the wait (a
    /// caller that stops waiting, by dropping this future, leaves no tag behind).
    async fn exchange(&self, request: &Request) -> Result<Reply, String> {
        /// Forgets the tag of a call that ends without its reply, whichever way it ends.
        struct Forget<'a> {
            waiting: &'a Mutex<Waiting>,
            tag: u64,
            answered: bool,
        }
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                if !self.answered {
                    lock(self.waiting).calls.remove(&self.tag);
                }
            }
        }
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = lock(&self.waiting);
            if let Some(why) = &waiting.broken {
                return Err(why.clone());
            }
            if waiting.calls.len() >= LINK_IN_FLIGHT_MAX {
                return Err(format!("too many requests in flight to node {}", self.node));
            }
            waiting.calls.insert(tag, tx);
        }
        let mut forget = Forget {
            waiting: &self.waiting,
            tag,
            answered: false,
        };
        self.queue
            .send(Outgoing::Request(request.encode(tag)))
            .await
            .map_err(|_| format!("the link to node {} closed", self.node))?;
        let reply = rx.await.map_err(|_| {
            lock(&self.waiting)
                .broken
                .clone()
                .unwrap_or_else(|| format!("the link to node {} closed", self.node))
        })?;
        // The reader took the tag out when it handed the reply over.
        forget.answered = true;
        Ok(reply)
    }

    /// Ends the link at once: its tasks stop, the connection closes, every caller fails.
    fn kill(&self, why: &str) {
        fail_all(&self.waiting, why.to_string());
        self.reader.abort();
        self.writer.abort();
    }

    /// Closes the link in order: requests queued before are sent, then a bye.
    async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.queue.send(Outgoing::Close(done)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), closed).await;
        }
        self.kill("the link was closed");
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// Marks the link broken and fails every caller waiting on it.
fn fail_all(waiting: &Mutex<Waiting>, why: String) {
    let mut waiting = lock(waiting);
    if waiting.broken.is_none() {
        waiting.broken = Some(why);
    }
    // Dropping the senders wakes the callers, which read why.
    waiting.calls.clear();
}

/// The writer task of a link: writes every request queued since its last write in one write.
/// When the queue is empty it yields once before writing and takes what was queued meanwhile:
/// the clients sharing the link, woken by one batch of replies, queue their next requests on
/// the same worker threads, and without the yield most of them left in writes of their own
/// (docs/PERFORMANCE.md, "Coalescing a link's requests").
async fn write_requests(
    mut sender: ClientSender,
    mut queue: mpsc::Receiver<Outgoing>,
    waiting: Arc<Mutex<Waiting>>,
) {
    let mut closing = None;
    let result = async {
        while let Some(first) = queue.recv().await {
            let mut next = Some(first);
            let mut yielded = false;
            while let Some(outgoing) = next.take() {
                match outgoing {
                    Outgoing::Request(bytes) => {
                        sender
                            .queue_payload(0, std::slice::from_ref(&bytes))
                            .await?
                    }
                    Outgoing::Close(done) => {
                        closing = Some(done);
                        break;
                    }
                }
                next = queue.try_recv().ok();
                if next.is_none() && !yielded {
                    yielded = true;
                    // Once, before writing: let the tasks that are about to queue (the other
                    // clients sharing this link, woken by the same batch of replies) run first.
                    tokio::task::yield_now().await;
                    next = queue.try_recv().ok();
                    if next.is_none() {
                        break;
                    }
                }
            }
            sender.flush().await?;
            if closing.is_some() {
                break;
            }
        }
        Ok::<_, derechofs_core::transport::ClientSendError>(())
    }
    .await;
    match result {
        Ok(()) => {
            let _ = sender.close().await;
            fail_all(&waiting, "the link was closed".to_string());
        }
        Err(e) => fail_all(&waiting, format!("link broken: {e}")),
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// The reader task of a link: hands each reply to the caller waiting for its tag (a reply
/// nobody waits for any more, after a timeout, is dropped).
async fn read_replies(mut receiver: ClientReceiver, waiting: Arc<Mutex<Waiting>>) {
    let why = loop {
        let frame = match receiver.recv().await {
            Ok((_, frame)) => frame,
            Err(e) => break e.to_string(),
        };
        match Reply::decode(frame) {
            Ok((tag, reply)) => {
                let caller = lock(&waiting).calls.remove(&tag);
                if let Some(caller) = caller {
                    let _ = caller.send(reply);
                }
            }
            Err(e) => break format!("undecodable reply: {e}"),
        }
    };
    fail_all(&waiting, why);
}

/// The links of one or more clients to the members: one pipelined link per member, made on
/// first use under one link id (the client id of the handshake).
#[derive(Debug)]
pub struct Links {
    id: ClientId,
    secret: Secret,
    /// The directory of the nodes' local sockets (`None`: TCP only).
    local_dir: Option<PathBuf>,
    links: tokio::sync::Mutex<HashMap<NodeId, Arc<Link>>>,
}

impl Links {
    /// No link yet; links are made on first use, as `id` (unique among a node's clients), to
    /// the nodes that have a socket file in `local_dir` through it and to the others over TCP.
    pub fn new(id: ClientId, secret: Secret, local_dir: Option<PathBuf>) -> Arc<Links> {
        Arc::new(Links {
            id,
            secret,
            local_dir,
            links: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The link to `node` at `addr`, connecting if there is none or it broke.
    async fn link(&self, node: NodeId, addr: SocketAddr) -> Result<Arc<Link>, String> {
        // Held while connecting: a second connection under the same id would be refused.
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(&node) {
            if !link.is_broken() {
                return Ok(link.clone());
            }
            links.remove(&node);
        }
        let local_dir = self.local_dir.as_deref();
        let connect = ClientConn::connect_via(addr, local_dir, self.id, &self.secret, Some(node));
        let conn =
            match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(format!("node {node} at {addr}: {e}")),
                Err(_) => return Err(format!("node {node} at {addr}: no answer to the handshake")),
            };
        let link = Arc::new(Link::start(conn, addr));
        links.insert(node, link.clone());
        Ok(link)
    }

    /// The link to `addr`, whichever node answers there: the live link made to that address,
    /// or a new one (kept unless a link to that node exists). Returns the node and the link.
    async fn link_any(&self, addr: SocketAddr) -> Result<(NodeId, Arc<Link>), String> {
        let mut links = self.links.lock().await;
        if let Some(link) = links.values().find(|l| l.addr == addr && !l.is_broken()) {
            return Ok((link.node, link.clone()));
        }
        let local_dir = self.local_dir.as_deref();
        let connect = ClientConn::connect_via(addr, local_dir, self.id, &self.secret, None);
        let conn =
            match tokio::time::timeout(Duration::from_millis(CONNECT_TIMEOUT_MS), connect).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(format!("{addr}: {e}")),
                Err(_) => return Err(format!("{addr}: no answer to the handshake")),
            };
        let node = conn.node_id();
        let link = Arc::new(Link::start(conn, addr));
        match links.get(&node) {
            Some(existing) if !existing.is_broken() => {
                link.close().await;
                Ok((node, existing.clone()))
            }
            _ => {
                links.insert(node, link.clone());
                Ok((node, link))
            }
        }
    }

    /// Drops the link to `node` if it is `link` (after a failure on it), closing its connection.
    async fn drop_link(&self, node: NodeId, link: &Arc<Link>, why: &str) {
        let mut links = self.links.lock().await;
        if links.get(&node).is_some_and(|l| Arc::ptr_eq(l, link)) {
            links.remove(&node);
        }
        link.kill(why);
    }

    /// Keeps only the links to `members`.
    async fn retain(&self, members: &[NodeId]) {
        let mut links = self.links.lock().await;
        links.retain(|node, link| {
            let keep = members.contains(node);
            if !keep {
                link.kill("the node left the view");
            }
            keep
        });
    }

    /// Closes every link in order, so the nodes see a goodbye rather than a broken link.
    pub async fn close(&self) {
        let links: Vec<Arc<Link>> = self.links.lock().await.drain().map(|(_, l)| l).collect();
        for link in links {
            link.close().await;
        }
    }
}

impl Client {
    /// Connects over TCP through the first contact that answers and learns the layout from
    /// it; the client has links of its own.
    pub async fn connect(contacts: &[String], secret: Secret) -> Result<Client, ClientError> {
        Client::connect_via(contacts, secret, None).await
    }

    /// As [`Client::connect`], reaching the nodes that have a socket file in `local_dir`
    /// through it and the others over TCP.
    pub async fn connect_via(
        contacts: &[String],
        secret: Secret,
        local_dir: Option<PathBuf>,
    ) -> Result<Client, ClientError> {
        let id = random_id();
        Client::connect_as(id, contacts, Links::new(id, secret, local_dir)).await
    }

    /// As [`Client::connect`], sharing `links` (and their connections) with other clients.
    pub async fn connect_shared(
        contacts: &[String],
        links: Arc<Links>,
    ) -> Result<Client, ClientError> {
        Client::connect_as(random_id(), contacts, links).await
    }

    async fn connect_as(
        id: ClientId,
        contacts: &[String],
        links: Arc<Links>,
    ) -> Result<Client, ClientError> {
        let mut last = "no contact given".to_string();
        let resolved = resolve(contacts).await;
        for &addr in &resolved {
            match links.link_any(addr).await {
                Ok((node, link)) => match link.call(&Request::Layout, REQUEST_TIMEOUT_MS).await {
                    Ok(Reply::Layout(layout)) => {
                        return Ok(Client {
                            id,
                            secret: links.secret.clone(),
                            local_dir: links.local_dir.clone(),
                            layout,
                            links,
                            contacts: resolved.clone(),
                            down: HashMap::new(),
                            next_number: 1,
                            seen: Hlc::ZERO,
                            written: HashMap::new(),
                            spread: id as usize,
                            contended: None,
                        });
                    }
                    Ok(other) => last = format!("{addr}: unexpected reply {other:?}"),
                    Err(e) => {
                        links.drop_link(node, &link, &e).await;
                        last = format!("{addr}: {e}");
                    }
                },
                Err(e) => last = e,
            }
        }
        Err(ClientError::Unreachable(last))
    }

    /// Closes the client's links in order, so the nodes see a goodbye rather than a broken
    /// link; links shared with other clients stay up until the last of them closes.
    pub async fn close(self) {
        if let Some(links) = Arc::into_inner(self.links) {
            links.close().await;
        }
    }

    /// The view and layout learnt from the contact.
    pub fn layout(&self) -> &LayoutInfo {
        &self.layout
    }

    /// Asks the members, then the contacts, for the view again, and adopts it if it is later
    /// than the one held. Returns whether the view changed.
    pub async fn learn_layout(&mut self) -> bool {
        self.refresh_layout().await
    }

    fn shard_of(&self, key: &[u8]) -> Result<&ShardInfo, ClientError> {
        self.layout
            .shard_of(key)
            .ok_or_else(|| ClientError::Protocol("the layout has no data shard".into()))
    }

    /// The link to `node`, connecting if needed; a node that cannot be reached is marked down.
    async fn link(&mut self, node: NodeId) -> Result<Arc<Link>, String> {
        let addr = self
            .layout
            .addr_of(node)
            .ok_or_else(|| format!("node {node} has no address"))?;
        match self.links.link(node, addr).await {
            Ok(link) => {
                self.down.remove(&node);
                Ok(link)
            }
            Err(e) => {
                self.down.insert(node, tokio::time::Instant::now());
                Err(e)
            }
        }
    }

    /// Sends `request` to `node`, once.
    async fn call_node(&mut self, node: NodeId, request: &Request) -> Result<Reply, String> {
        self.call_node_within(node, request, REQUEST_TIMEOUT_MS)
            .await
    }

    /// Sends `request` to `node`, once, waiting at most `timeout_ms` for the reply. A link that
    /// fails or times out is closed, so the next call connects again.
    async fn call_node_within(
        &mut self,
        node: NodeId,
        request: &Request,
        timeout_ms: u64,
    ) -> Result<Reply, String> {
        let link = self.link(node).await?;
        let result = link.call(request, timeout_ms).await;
        if let Err(e) = &result {
            self.links.drop_link(node, &link, e).await;
        }
        result
    }

    /// Sends `request` to `node` once, like [`Client::call_node`], but while the reply is late
    /// asks the other members for the view every [`SLOW_REPLY_MS`]: if `node` left the view (it
    /// hangs, and the others removed it), the request is abandoned, to be resent elsewhere.
    async fn call_watching(&mut self, node: NodeId, request: &Request) -> Result<Reply, String> {
        let link = self.link(node).await?;
        let result = {
            // One timer per request, for both the check and the timeout: most replies come
            // long before either, and a timer costs its registration and its removal.
            let exchange = link.exchange(request);
            tokio::pin!(exchange);
            let now = tokio::time::Instant::now();
            let deadline = now + Duration::from_millis(REQUEST_TIMEOUT_MS);
            let slow = Duration::from_millis(SLOW_REPLY_MS);
            let timer = tokio::time::sleep_until((now + slow).min(deadline));
            tokio::pin!(timer);
            loop {
                tokio::select! {
                    result = &mut exchange => break result,
                    _ = &mut timer => {
                        if tokio::time::Instant::now() >= deadline {
                            break Err("timed out".to_string());
                        }
                        if self.refresh_layout_without(Some(node)).await
                            && !self.layout.members.iter().any(|(m, _)| *m == node)
                        {
                            break Err(format!("node {node} left the view while the request waited"));
                        }
                        timer.as_mut().reset((tokio::time::Instant::now() + slow).min(deadline));
                    }
                }
            }
        };
        if let Err(e) = &result {
            self.links.drop_link(node, &link, e).await;
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
        let mut known: Vec<NodeId> = self.links.links.lock().await.keys().copied().collect();
        for (node, _) in &self.layout.members {
            if !known.contains(node) {
                known.push(*node);
            }
        }
        let asked_before = known.clone();
        for node in known {
            if self.is_down(node) || Some(node) == skip {
                continue;
            }
            let asked = self.call_node_within(node, &Request::Layout, LAYOUT_TIMEOUT_MS);
            if let Ok(Reply::Layout(layout)) = asked.await {
                return self.adopt(layout).await;
            }
        }
        for addr in self.contacts.clone() {
            let Ok((node, link)) = self.links.link_any(addr).await else {
                continue;
            };
            if Some(node) == skip || asked_before.contains(&node) {
                // Already asked (or the one being waited on).
                continue;
            }
            if let Ok(Reply::Layout(layout)) = link.call(&Request::Layout, LAYOUT_TIMEOUT_MS).await
            {
                return self.adopt(layout).await;
            }
        }
        false
    }

    fn is_down(&self, node: NodeId) -> bool {
        self.down
            .get(&node)
            .is_some_and(|at| at.elapsed() < Duration::from_millis(DOWN_SKIP_MS))
    }

    async fn adopt(&mut self, layout: LayoutInfo) -> bool {
        if layout.view_id <= self.layout.view_id {
            return false;
        }
        // Links to nodes that left the view are of no more use.
        let members: Vec<NodeId> = layout.members.iter().map(|(m, _)| *m).collect();
        self.links.retain(&members).await;
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
        route: Route,
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
            // The member to ask, the shard's number of members, and whether to skip it.
            let (node, members, skip) = {
                let pinned;
                let members: &[NodeId] = match pin {
                    Some(node) => {
                        pinned = [node];
                        &pinned
                    }
                    None => &self.shard_of(key)?.members,
                };
                if members.is_empty() {
                    return Err(ClientError::Unreachable("the shard has no members".into()));
                }
                let first = match route {
                    Route::Spread => self.spread,
                    Route::KeyMember => write_member_index(key, members.len()),
                };
                let node = members[(first + attempt) % members.len()];
                let skip = self.is_down(node) && members.iter().any(|m| !self.is_down(*m));
                (node, members.len(), skip)
            };
            attempt += 1;
            let relearn;
            if skip {
                // Counts as an unreachable answer, without the wait.
                hopeless += 1;
                let give_up = refused.is_some() && hopeless >= REFUSING_PASSES_MAX * members;
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
                || (refused.is_some() && hopeless >= REFUSING_PASSES_MAX * members);
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
        let conditional = matches!(op, KvOp::CondPut { .. });
        let route = Route::of_write(&op, self.contended.as_deref());
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
        let (_, reply) = self.call_shard(&key, &request, None, route).await?;
        match reply {
            Reply::Written(reply) => {
                // A contended run loses race after race on one key: kept, not copied again.
                let lost = conditional && matches!(reply, KvReply::Conflict { .. });
                if lost && self.contended.as_deref() != Some(&key[..]) {
                    self.contended = Some(key.clone());
                }
                if let KvReply::Written { version, hlc } = reply {
                    self.saw(hlc);
                    let shard = self.shard_of(&key)?.id;
                    let w = self.written.entry(shard).or_insert(version);
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
        let shard = self.shard_of(key)?.id;
        let after = match at {
            ReadAt::Latest => self.written.get(&shard).copied(),
            _ => None,
        };
        let request = Request::Get {
            key: Bytes::copy_from_slice(key),
            at,
            after,
        };
        let (node, reply) = self
            .call_shard(key, &request, member, Route::Spread)
            .await?;
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
        match self.call_shard(key, &request, None, Route::Spread).await?.1 {
            Reply::History { truncated, changes } => Ok((truncated, changes)),
            other => Err(ClientError::Protocol(format!("{other:?}"))),
        }
    }

    /// The kind of connection of this client's link to `node`, if one is up.
    pub async fn link_kind(&self, node: NodeId) -> Option<LinkKind> {
        let links = self.links.links.lock().await;
        links
            .get(&node)
            .filter(|link| !link.is_broken())
            .map(|link| link.kind)
    }

    /// The status of one member.
    pub async fn status_of(&mut self, node: NodeId) -> Result<NodeStatus, ClientError> {
        match self.call_node(node, &Request::Status).await {
            Ok(Reply::Status(s)) => Ok(s),
            Ok(other) => Err(ClientError::Protocol(format!("{other:?}"))),
            Err(e) => Err(ClientError::Unreachable(format!("node {node}: {e}"))),
        }
    }

    /// Watches `prefix` in every data shard, on one member of each; events arrive on the
    /// returned receiver in version order per shard (and in key order within a version). When
    /// the member's link ends (it died, or a view change removed it), the watch resumes on
    /// another member of the shard strictly after the last event delivered: no event is lost
    /// or repeated. It ends with an error only when no member can resume it (for a bounded
    /// time), or the log no longer holds the versions to replay.
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
            let mut watch = ShardWatch {
                prefix: Bytes::copy_from_slice(prefix),
                index: shard.index,
                layout: self.layout.clone(),
                secret: self.secret.clone(),
                local_dir: self.local_dir.clone(),
                spread: self.spread,
                cursor: None,
            };
            let conn = watch.start().await?;
            tokio::spawn(watch.run(conn, tx.clone()));
        }
        Ok(rx)
    }
}

/// Rounds over a shard's members a watch tries to resume in, before it gives up.
pub const WATCH_RESUME_ROUNDS_MAX: u32 = 50;
/// Pause between two such rounds, in milliseconds (a view change takes about a second).
pub const WATCH_RESUME_PAUSE_MS: u64 = 200;

/// One data shard's watch, which follows view changes.
struct ShardWatch {
    prefix: Bytes,
    index: u16,
    layout: LayoutInfo,
    secret: Secret,
    local_dir: Option<PathBuf>,
    spread: usize,
    /// The last event delivered: its version and key; or, before the first event, the version
    /// the watch started after and no key.
    cursor: Option<(Version, Option<Bytes>)>,
}

impl ShardWatch {
    /// The shard's members, in the order to try them.
    fn members(&self) -> Vec<NodeId> {
        let Some(shard) = self
            .layout
            .shards
            .iter()
            .find(|s| s.data && s.index == self.index)
        else {
            return Vec::new();
        };
        let n = shard.members.len();
        (0..n)
            .map(|i| shard.members[(self.spread + i) % n])
            .collect()
    }

    /// Registers the watch on one member, first after the cursor when there is one.
    async fn start(&mut self) -> Result<ClientConn, ClientError> {
        let mut last = String::from("no member");
        // Events within a version come in key order: resuming in the middle of a version
        // replays the whole version, and `run` skips the keys already delivered.
        let after = self
            .cursor
            .as_ref()
            .map(|(v, key)| if key.is_some() { v - 1 } else { *v });
        for node in self.members() {
            let Some(addr) = self.layout.addr_of(node) else {
                continue;
            };
            // A link of its own, so its events do not mix with this client's replies.
            let local_dir = self.local_dir.as_deref();
            let conn =
                ClientConn::connect_via(addr, local_dir, random_id(), &self.secret, Some(node))
                    .await;
            let mut conn = match conn {
                Ok(conn) => conn,
                Err(e) => {
                    last = format!("node {node}: {e}");
                    continue;
                }
            };
            if let Ok(Reply::Layout(layout)) =
                call_alone(&mut conn, &Request::Layout, REQUEST_TIMEOUT_MS).await
            {
                if layout.view_id > self.layout.view_id {
                    self.layout = layout;
                }
            }
            let request = Request::Watch {
                prefix: self.prefix.clone(),
                shard: self.index,
                after,
            };
            match call_alone(&mut conn, &request, REQUEST_TIMEOUT_MS).await {
                Ok(Reply::Watching { from }) => {
                    tracing::info!(shard = self.index, node, ?after, from, "watching");
                    if self.cursor.is_none() {
                        self.cursor = Some((from, None));
                    }
                    return Ok(conn);
                }
                Ok(Reply::Error {
                    code: ErrorCode::Trimmed,
                    message,
                }) => return Err(ClientError::Protocol(format!("node {node}: {message}"))),
                Ok(other) => last = format!("node {node}: {other:?}"),
                Err(e) => last = format!("node {node}: {e}"),
            }
        }
        Err(ClientError::Unreachable(last))
    }

    /// Forwards the events, resuming on another member whenever the link ends.
    async fn run(
        mut self,
        mut conn: ClientConn,
        tx: tokio::sync::mpsc::Sender<Result<Event, ClientError>>,
    ) {
        loop {
            let ended = match conn.recv().await {
                Ok((_, frame)) => match Reply::decode(frame) {
                    Ok((1, Reply::Event(e))) => {
                        let seen = self.cursor.as_ref().is_some_and(|(v, key)| {
                            e.version < *v
                                || (e.version == *v && key.as_ref().is_none_or(|k| e.key <= *k))
                        });
                        if seen {
                            continue;
                        }
                        self.cursor = Some((e.version, Some(e.key.clone())));
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Ok((1, Reply::Error { code, message })) => format!("{code:?}: {message}"),
                    Ok(_) => continue,
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            tracing::info!(shard = self.index, reason = %ended, "watch link ended: resuming");
            let mut rounds = 0;
            conn = loop {
                match self.start().await {
                    Ok(conn) => break conn,
                    Err(ClientError::Unreachable(_)) if rounds < WATCH_RESUME_ROUNDS_MAX => {
                        rounds += 1;
                        self.spread = self.spread.wrapping_add(1);
                        tokio::time::sleep(Duration::from_millis(WATCH_RESUME_PAUSE_MS)).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            };
        }
    }
}

/// Watch events buffered for the reader.
pub const WATCH_EVENTS_MAX: usize = 1024;

#[cfg(test)]
mod tests {
    //! The pipelined links against a node played by the real transport: it answers requests
    //! in whatever order the test chooses.
    use super::*;
    use derechofs_core::transport::{LinkEvent, Peer, Transport};

    const NODE: NodeId = 1;

    #[test]
    fn only_conditional_puts_of_the_key_last_lost_on_go_to_the_keys_member() {
        let k = Bytes::from_static(b"hot");
        let other = Bytes::from_static(b"cold");
        let cput = |key: &Bytes| KvOp::CondPut {
            key: key.clone(),
            value: Bytes::from_static(b"v"),
            expected: Some(7),
        };
        assert_eq!(Route::of_write(&cput(&k), Some(b"hot")), Route::KeyMember);
        assert_eq!(Route::of_write(&cput(&other), Some(b"hot")), Route::Spread);
        assert_eq!(Route::of_write(&cput(&k), None), Route::Spread);
        let put = KvOp::Put {
            key: k.clone(),
            value: Bytes::from_static(b"v"),
        };
        assert_eq!(Route::of_write(&put, Some(b"hot")), Route::Spread);
        assert_eq!(
            Route::of_write(&KvOp::Delete { key: k }, Some(b"hot")),
            Route::Spread
        );
    }

    fn secret() -> Secret {
        Secret::new(b"a cluster secret of enough bytes".to_vec()).expect("a valid secret")
    }

    fn layout(addr: SocketAddr) -> LayoutInfo {
        LayoutInfo {
            view_id: 1,
            members: vec![(NODE, addr)],
            shards: vec![ShardInfo {
                id: 0,
                data: true,
                index: 0,
                members: vec![NODE],
            }],
            chunk_size: 1 << 20,
        }
    }

    /// A write as the node received it: the link and tag it came by, and the request.
    type Write = (Peer, u64, KvRequest);

    /// A node on 127.0.0.1 that answers `Layout` at once and hands every write to the test.
    async fn node() -> (Arc<Transport>, tokio::sync::mpsc::Receiver<Write>) {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        let (transport, mut events) = Transport::bind(addr, NODE, secret()).await.expect("bind");
        let transport = Arc::new(transport);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let serving = transport.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let LinkEvent::Frame { peer, bytes, .. } = event else {
                    continue;
                };
                match Request::decode(bytes).expect("a well-formed request") {
                    (tag, Request::Layout) => {
                        let reply = Reply::Layout(layout(serving.local_addr()));
                        serving
                            .send(peer, 1, reply.encode(tag))
                            .await
                            .expect("sent");
                    }
                    (tag, Request::Write { payload, .. }) => {
                        let request = KvRequest::decode(payload).expect("a K/V request");
                        if tx.send((peer, tag, request)).await.is_err() {
                            return;
                        }
                    }
                    (_, other) => panic!("unexpected request {other:?}"),
                }
            }
        });
        (transport, rx)
    }

    async fn writes(received: &mut tokio::sync::mpsc::Receiver<Write>, n: usize) -> Vec<Write> {
        let mut got = Vec::new();
        while got.len() < n {
            got.push(received.recv().await.expect("the node runs"));
        }
        got
    }

    /// A durable write of client `client`, request 1: a delete of `k`.
    fn delete_of(client: u64) -> Request {
        let payload = KvRequest {
            client,
            number: 1,
            op: KvOp::Delete {
                key: Bytes::from_static(b"k"),
            },
        }
        .encode();
        Request::Write {
            hlc: Hlc::ZERO,
            durable: true,
            payload,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_sharing_links_each_get_their_own_reply_whatever_the_order_of_answers() {
        let (transport, mut events) = node().await;
        let contacts = vec![transport.local_addr().to_string()];
        let links = Links::new(random_id(), secret(), None);
        const CLIENTS: u64 = 8;
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let mut client = Client::connect_shared(&contacts, links.clone())
                .await
                .expect("connected");
            tasks.push(tokio::spawn(async move {
                let op = KvOp::Put {
                    key: Bytes::from(format!("key{i}")),
                    value: Bytes::from_static(b"v"),
                };
                (i, client.id, client.write(op).await)
            }));
        }
        let got = writes(&mut events, CLIENTS as usize).await;
        // Every client's request came on the one shared link, under its own client id.
        assert!(got.iter().all(|(peer, _, _)| *peer == got[0].0));
        let mut ids: Vec<u64> = got.iter().map(|(_, _, r)| r.client).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), CLIENTS as usize, "one client id per client");
        // Answer in reverse order of arrival, each with a version naming its key.
        for (peer, tag, request) in got.into_iter().rev() {
            let key = std::str::from_utf8(request.op.key())
                .expect("utf-8")
                .to_string();
            let version: u64 = key.trim_start_matches("key").parse().expect("a number");
            let reply = Reply::Written(KvReply::Written {
                version: 100 + version,
                hlc: Hlc::ZERO,
            });
            transport
                .send(peer, 1, reply.encode(tag))
                .await
                .expect("sent");
        }
        for task in tasks {
            let (i, _, reply) = task.await.expect("the client ran");
            match reply.expect("answered") {
                KvReply::Written { version, .. } => assert_eq!(version, 100 + i),
                other => panic!("client {i} got {other:?}"),
            }
        }
        links.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_that_breaks_fails_every_request_waiting_on_it_at_once() {
        let (transport, mut events) = node().await;
        let links = Links::new(random_id(), secret(), None);
        let link = links
            .link(NODE, transport.local_addr())
            .await
            .expect("linked");
        let mut calls = Vec::new();
        for i in 0..4u64 {
            let link = link.clone();
            calls.push(tokio::spawn(async move {
                link.call(&delete_of(i + 1), REQUEST_TIMEOUT_MS).await
            }));
        }
        let got = writes(&mut events, 4).await;
        assert!(transport.disconnect(got[0].0));
        for call in calls {
            // The end of the link, not the timeout, ends each call.
            let error = call
                .await
                .expect("the call ran")
                .expect_err("no reply came");
            assert_ne!(error, "timed out");
        }
        assert!(link.is_broken());
        let request = Request::Layout;
        assert!(link.call(&request, REQUEST_TIMEOUT_MS).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_that_stops_waiting_leaves_no_tag_and_its_late_reply_is_dropped() {
        let (transport, mut events) = node().await;
        let links = Links::new(random_id(), secret(), None);
        let link = links
            .link(NODE, transport.local_addr())
            .await
            .expect("linked");
        // One call times out, one is dropped by its caller while it waits.
        assert_eq!(
            link.call(&delete_of(1), 50)
                .await
                .expect_err("no reply came"),
            "timed out"
        );
        let second = delete_of(2);
        let dropped = tokio::time::timeout(Duration::from_millis(50), link.exchange(&second));
        assert!(dropped.await.is_err(), "no reply came");
        let late = writes(&mut events, 2).await;
        assert!(lock(&link.waiting).calls.is_empty(), "no tag left behind");
        // Their replies, late, go nowhere; the link still carries the next call.
        for (peer, tag, _) in late {
            let reply = Reply::Written(KvReply::Conflict { current: None });
            transport
                .send(peer, 1, reply.encode(tag))
                .await
                .expect("sent");
        }
        let next = tokio::spawn({
            let link = link.clone();
            async move { link.call(&delete_of(3), REQUEST_TIMEOUT_MS).await }
        });
        let (peer, tag, request) = writes(&mut events, 1).await.remove(0);
        assert_eq!(request.client, 3);
        let reply = Reply::Written(KvReply::Written {
            version: 9,
            hlc: Hlc::ZERO,
        });
        transport
            .send(peer, 1, reply.encode(tag))
            .await
            .expect("sent");
        match next.await.expect("the call ran").expect("answered") {
            Reply::Written(KvReply::Written { version, .. }) => assert_eq!(version, 9),
            other => panic!("the third call got {other:?}"),
        }
        assert!(!link.is_broken());
        assert!(lock(&link.waiting).calls.is_empty());
        links.close().await;
    }
}
