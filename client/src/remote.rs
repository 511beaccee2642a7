//! [`RemoteShards`]: the file system's shards in a running cluster, reached over the client
//! protocol.
//!
//! It learns the view and layout from any contact, sends each request to a member of the owning
//! shard (spreading requests over the members, or to a preferred member), carries the client's
//! HLC, and answers the [`Shards`] contract:
//! - `submit` sends `FsSubmit` (the engine payload is the file system request behind the
//!   `MACHINE_FS` byte) and returns the file system reply once a replica delivered it. When a
//!   member fails, is busy, wedged or no longer replicates the shard, it learns the view again
//!   and resends the *same request bytes* to another member: the request number makes the
//!   shard apply it once. It gives up after [`RemoteConfig::retry_window_ms`] with EAGAIN when
//!   members answered but could not take the request, EIO when none answered.
//! - `read` sends `FsRead`: at `Latest` with the newest version this client had answered in
//!   that shard, so the replica waits until it delivered it (read-your-writes); at a time, the
//!   replica waits until its stability frontier passed it, or answers `TimedOut` (EAGAIN).
//! - [`RemoteShards::sync`] waits until every version this client had answered is durable on
//!   every replica of its shard (the file system's `fsync`).
//!
//! The seam is synchronous (the mount calls it from its threads); the links run on a small tokio
//! runtime of the client's own. A request runs on the calling thread: it writes itself to the
//! link and sleeps until the link's reader hands it the reply. Many requests may be in flight at
//! once over one link per member, each under its own tag (`read_many` sends several from one
//! thread).

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use derechofs_core::kv::ReadAt;
use derechofs_core::protocol::{ErrorCode, LayoutInfo, Reply, Request, SubgroupShard};
use derechofs_core::transport::{ClientConn, ClientId, ClientReceiver, ClientSender, Secret};
use derechofs_core::{Hlc, NodeId, Version};
use derechofs_fs::chunk::check_chunk_size;
use derechofs_fs::{fs_err, FsError, FsLayout, FsResult, ShardRef, Shards, Space};
use tokio::sync::oneshot;

/// Default time one attempt at a request may take before the client tries another member; above
/// the nodes' `time_read_wait_ms` (2 s by default), which a read at a time may wait.
pub const REQUEST_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// Default time a request keeps being resent through failures and view changes.
pub const RETRY_WINDOW_MS_DEFAULT: u64 = 15_000;
/// Time a member that could not be reached is passed over while others of its shard remain.
pub const DOWN_SKIP_MS: u64 = 2_000;
/// First pause between attempts; it doubles up to [`RETRY_PAUSE_MAX_MS`].
pub const RETRY_PAUSE_MS: u64 = 5;
/// Longest pause between attempts.
pub const RETRY_PAUSE_MAX_MS: u64 = 200;
/// Requests in flight on one link; more callers wait for a slot.
pub const IN_FLIGHT_PER_LINK_MAX: usize = 1024;
/// Worker threads of the client's runtime.
pub const RUNTIME_THREADS: usize = 2;

/// How to reach a cluster.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    /// Contacts, `host:port`; any member will do.
    pub contacts: Vec<String>,
    /// The cluster secret.
    pub secret: Secret,
    /// Time one attempt may take (see [`REQUEST_TIMEOUT_MS_DEFAULT`]).
    pub request_timeout_ms: u64,
    /// Time a request keeps being resent (see [`RETRY_WINDOW_MS_DEFAULT`]).
    pub retry_window_ms: u64,
    /// Acknowledge every write only once durable on every replica (a `sync` mount).
    pub durable_writes: bool,
    /// Send requests to this member whenever it replicates the shard and is reachable (data
    /// locality, or a test that reads through one replica).
    pub prefer: Option<NodeId>,
}

impl RemoteConfig {
    /// The defaults, with `contacts` and `secret`.
    pub fn new(contacts: Vec<String>, secret: Secret) -> RemoteConfig {
        RemoteConfig {
            contacts,
            secret,
            request_timeout_ms: REQUEST_TIMEOUT_MS_DEFAULT,
            retry_window_ms: RETRY_WINDOW_MS_DEFAULT,
            durable_writes: false,
            prefer: None,
        }
    }
}

/// Why [`RemoteShards::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The client's runtime could not start.
    #[error("starting the client runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No contact answered with a layout.
    #[error("no contact answered: {0}")]
    Unreachable(String),
    /// The cluster's layout cannot serve a file system.
    #[error("the cluster's layout cannot serve the file system: {0}")]
    Layout(String),
}

/// One link to a member, shared by every request to it.
#[derive(Debug)]
struct Link {
    node: NodeId,
    sender: tokio::sync::Mutex<ClientSender>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    alive: AtomicBool,
    slots: tokio::sync::Semaphore,
}

#[derive(Debug)]
struct Inner {
    id: ClientId,
    config: RemoteConfig,
    contacts: Vec<SocketAddr>,
    layout: Mutex<LayoutInfo>,
    links: tokio::sync::Mutex<HashMap<NodeId, Arc<Link>>>,
    down: Mutex<HashMap<NodeId, Instant>>,
    /// The newest stamp this client has seen.
    seen: Mutex<Hlc>,
    /// Per shard, the newest version this client had answered, and the member that answered
    /// it (which had delivered it then).
    written: Mutex<HashMap<SubgroupShard, (Version, NodeId)>>,
    next_tag: AtomicU64,
    spread: AtomicUsize,
}

/// The shards of a running cluster; see the module documentation.
#[derive(Debug)]
pub struct RemoteShards {
    inner: Arc<Inner>,
    fs_layout: FsLayout,
    runtime: tokio::runtime::Runtime,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing holding these locks can leave them half changed.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return t ^ (u64::from(std::process::id()) << 32);
    }
    u64::from_le_bytes(b)
}

fn wall_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The file system's layout in a cluster's layout; an error says what is missing.
fn fs_layout(layout: &LayoutInfo) -> Result<FsLayout, String> {
    check_chunk_size(layout.chunk_size)?;
    let namespace = SubgroupShard {
        data: false,
        index: 0,
    };
    if layout.subgroup_shard(namespace).is_none() {
        return Err("it has no namespace shard".into());
    }
    let data_shards = layout.data_shards();
    if data_shards == 0 {
        return Err("it has no data shard".into());
    }
    for index in 0..data_shards {
        let shard = SubgroupShard {
            data: true,
            index: u16::try_from(index).map_err(|_| "too many data shards")?,
        };
        if layout.subgroup_shard(shard).is_none() {
            return Err(format!("data shard {index} is missing"));
        }
    }
    Ok(FsLayout {
        data_shards: u32::try_from(data_shards).map_err(|_| "too many data shards")?,
        chunk_size: layout.chunk_size,
    })
}

impl RemoteShards {
    /// Connects through the first contact that answers and learns the layout from it.
    pub fn connect(config: RemoteConfig) -> Result<RemoteShards, RemoteError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("derechofs-client")
            .enable_all()
            .build()
            .map_err(RemoteError::Runtime)?;
        let mut contacts = Vec::new();
        let mut last = "no contact given".to_string();
        for c in &config.contacts {
            match c.to_socket_addrs() {
                Ok(addrs) => contacts.extend(addrs),
                Err(e) => last = format!("{c}: {e}"),
            }
        }
        let inner = Arc::new(Inner {
            id: random_id(),
            config,
            contacts,
            layout: Mutex::new(LayoutInfo {
                view_id: 0,
                members: Vec::new(),
                shards: Vec::new(),
                chunk_size: 0,
            }),
            links: tokio::sync::Mutex::new(HashMap::new()),
            down: Mutex::new(HashMap::new()),
            seen: Mutex::new(Hlc::ZERO),
            written: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            spread: AtomicUsize::new(0),
        });
        inner.spread.store(inner.id as usize, Ordering::Relaxed);
        let learnt = {
            let inner = inner.clone();
            runtime.block_on(async move { inner.learn_from_contacts().await })
        };
        let layout = match learnt {
            Ok(layout) => layout,
            Err(e) => {
                if inner.contacts.is_empty() {
                    return Err(RemoteError::Unreachable(last));
                }
                return Err(RemoteError::Unreachable(e));
            }
        };
        let fs_layout = fs_layout(&layout).map_err(RemoteError::Layout)?;
        Ok(RemoteShards {
            inner,
            fs_layout,
            runtime,
        })
    }

    /// The view and layout as last learnt.
    pub fn layout_info(&self) -> LayoutInfo {
        lock(&self.inner.layout).clone()
    }

    /// This client's id on its links.
    pub fn client_id(&self) -> ClientId {
        self.inner.id
    }

    /// Runs `f` within the client's runtime and waits for it, from any thread. On a thread
    /// outside any runtime (the mount's threads), `f` runs on the calling thread itself: it
    /// writes its request to the link and sleeps until the link's reader hands it the reply,
    /// with no hop through a worker thread on either side. From inside another runtime (whose
    /// thread it then blocks) it runs as a task on the client's workers.
    fn block<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.runtime.block_on(f);
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = tx.send(f.await);
        });
        // The task always sends unless the runtime is shutting down, which only drop does.
        rx.recv()
            .expect("the client runtime runs while the client exists")
    }

    fn subgroup_shard(&self, shard: ShardRef) -> FsResult<SubgroupShard> {
        match shard {
            ShardRef::Namespace => Ok(SubgroupShard {
                data: false,
                index: 0,
            }),
            ShardRef::Data(i) if i < self.fs_layout.data_shards => Ok(SubgroupShard {
                data: true,
                index: i as u16,
            }),
            ShardRef::Data(i) => Err(fs_err!(libc::EIO, "no data shard {i}")),
        }
    }
}

fn unexpected(reply: &Reply) -> FsError {
    fs_err!(
        libc::EIO,
        "a node answered what this client did not ask: {reply:?}"
    )
}

impl Shards for RemoteShards {
    fn layout(&self) -> FsLayout {
        self.fs_layout
    }

    fn submit(&self, shard: ShardRef, request: Bytes) -> FsResult<Bytes> {
        let shard = self.subgroup_shard(shard)?;
        let inner = self.inner.clone();
        self.block(async move { inner.submit(shard, request).await })
    }

    fn read(&self, shard: ShardRef, at: ReadAt, request: Bytes) -> FsResult<Bytes> {
        let shard = self.subgroup_shard(shard)?;
        let inner = self.inner.clone();
        self.block(async move { inner.read(shard, at, request).await })
    }

    /// Every read in flight at once, sent and awaited from the calling thread.
    fn read_many(&self, reads: Vec<(ShardRef, ReadAt, Bytes)>) -> Vec<FsResult<Bytes>> {
        let inner = self.inner.clone();
        let calls: Vec<_> = reads
            .into_iter()
            .map(|(shard, at, request)| {
                let shard = self.subgroup_shard(shard);
                let inner = inner.clone();
                async move { inner.read(shard?, at, request).await }
            })
            .collect();
        self.block(join_all(calls))
    }

    fn now_us(&self) -> u64 {
        wall_us()
    }

    /// Waits until every version this client had answered is durable on every replica of its
    /// shard: the file system's `fsync`. EIO or EAGAIN as for `submit`.
    fn sync(&self) -> FsResult<()> {
        let written: Vec<(SubgroupShard, Version)> = lock(&self.inner.written)
            .iter()
            .map(|(s, (v, _))| (*s, *v))
            .collect();
        for (shard, version) in written {
            let inner = self.inner.clone();
            let reply = self.block(async move {
                let tag = inner.tag();
                let bytes = Request::FsSync { shard, version }.encode(tag);
                inner.call_shard(shard, tag, bytes, None).await
            })?;
            match reply {
                (_, Reply::FsSynced) => {}
                (_, other) => return Err(unexpected(&other)),
            }
        }
        Ok(())
    }

    /// The space of the fullest member: every member of the view answers the size and free
    /// space of the disk holding its data, and the smallest of each is the answer (each replica
    /// holds a whole copy of its shards). EIO if no member answers.
    fn space(&self) -> FsResult<Space> {
        let inner = self.inner.clone();
        self.block(async move {
            let members: Vec<NodeId> = lock(&inner.layout).members.iter().map(|m| m.0).collect();
            let mut space: Option<Space> = None;
            let mut last = String::from("the view has no members");
            for node in members {
                let tag = inner.tag();
                match inner.call_node(node, tag, Request::Space.encode(tag)).await {
                    Ok(Reply::Space {
                        total_bytes,
                        free_bytes,
                    }) => {
                        let s = space.get_or_insert(Space {
                            total_bytes,
                            free_bytes,
                        });
                        s.total_bytes = s.total_bytes.min(total_bytes);
                        s.free_bytes = s.free_bytes.min(free_bytes);
                    }
                    Ok(other) => last = format!("node {node}: {other:?}"),
                    Err(e) => last = format!("node {node}: {e}"),
                }
            }
            space.ok_or_else(|| fs_err!(libc::EIO, "no member reported its space: {last}"))
        })
    }
}

/// Runs `futures` together on the current task; their outputs in order.
async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

impl Inner {
    /// `Shards::submit` of one request to `shard`.
    async fn submit(self: Arc<Self>, shard: SubgroupShard, request: Bytes) -> FsResult<Bytes> {
        let tag = self.tag();
        let hlc = lock(&self.seen).tick();
        let durable = self.config.durable_writes;
        let bytes = Request::encode_fs_submit(tag, shard, hlc, durable, &request);
        match self.call_shard(shard, tag, bytes, None).await? {
            (
                node,
                Reply::FsWritten {
                    version,
                    hlc,
                    reply,
                },
            ) => {
                self.saw(hlc);
                let mut written = lock(&self.written);
                let w = written.entry(shard).or_insert((version, node));
                if version >= w.0 {
                    *w = (version, node);
                }
                Ok(reply)
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    /// `Shards::read` of one read of `shard`.
    async fn read(
        self: Arc<Self>,
        shard: SubgroupShard,
        at: ReadAt,
        request: Bytes,
    ) -> FsResult<Bytes> {
        // Read-your-writes: at the latest state, a replica answers once it delivered the newest
        // version this client had answered in the shard. The member that answered it had
        // delivered it, so the read goes there first instead of waiting at another replica.
        let (after, first) = match at {
            ReadAt::Latest => lock(&self.written)
                .get(&shard)
                .map_or((None, None), |&(v, node)| (Some(v), Some(node))),
            _ => (None, None),
        };
        let tag = self.tag();
        let bytes = Request::FsRead {
            shard,
            at,
            after,
            request,
        }
        .encode(tag);
        match self.call_shard(shard, tag, bytes, first).await? {
            (_, Reply::FsValue { read_hlc, reply }) => {
                self.saw(read_hlc);
                Ok(reply)
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    fn tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    fn saw(&self, hlc: Hlc) {
        let mut seen = lock(&self.seen);
        *seen = (*seen).max(hlc);
    }

    fn is_down(&self, node: NodeId) -> bool {
        lock(&self.down)
            .get(&node)
            .is_some_and(|at| at.elapsed() < Duration::from_millis(DOWN_SKIP_MS))
    }

    /// The layout from the first contact that gives one.
    async fn learn_from_contacts(self: &Arc<Self>) -> Result<LayoutInfo, String> {
        let mut last = "no contact resolved".to_string();
        for &addr in &self.contacts {
            let conn = match ClientConn::connect(addr, self.id, &self.config.secret, None).await {
                Ok(conn) => conn,
                Err(e) => {
                    last = format!("{addr}: {e}");
                    continue;
                }
            };
            let node = conn.node_id();
            let link = self.adopt_link(conn).await;
            let tag = self.tag();
            match self.exchange(&link, tag, Request::Layout.encode(tag)).await {
                Ok(Reply::Layout(layout)) => {
                    self.adopt_layout(layout.clone());
                    return Ok(layout);
                }
                Ok(other) => last = format!("{addr} (node {node}): unexpected {other:?}"),
                Err(e) => last = format!("{addr} (node {node}): {e}"),
            }
        }
        Err(last)
    }

    /// Asks the members it knows, then the contacts, for the view; adopts a later one.
    async fn refresh_layout(self: &Arc<Self>) {
        let members: Vec<NodeId> = lock(&self.layout).members.iter().map(|m| m.0).collect();
        for node in members {
            if self.is_down(node) {
                continue;
            }
            let tag = self.tag();
            if let Ok(Reply::Layout(layout)) =
                self.call_node(node, tag, Request::Layout.encode(tag)).await
            {
                self.adopt_layout(layout);
                return;
            }
        }
        let _ = self.learn_from_contacts().await;
    }

    fn adopt_layout(&self, layout: LayoutInfo) {
        let mut current = lock(&self.layout);
        if layout.view_id > current.view_id || current.members.is_empty() {
            *current = layout;
        }
    }

    async fn adopt_link(self: &Arc<Self>, conn: ClientConn) -> Arc<Link> {
        let node = conn.node_id();
        let (sender, receiver) = conn.into_split();
        let link = Arc::new(Link {
            node,
            sender: tokio::sync::Mutex::new(sender),
            pending: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            slots: tokio::sync::Semaphore::new(IN_FLIGHT_PER_LINK_MAX),
        });
        tokio::spawn(read_replies(link.clone(), receiver));
        self.links.lock().await.insert(node, link.clone());
        link
    }

    /// The link to `node`, connecting if there is none or it broke.
    async fn link(self: &Arc<Self>, node: NodeId) -> Result<Arc<Link>, String> {
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(&node) {
            if link.alive.load(Ordering::SeqCst) {
                return Ok(link.clone());
            }
            links.remove(&node);
        }
        let addr = lock(&self.layout)
            .addr_of(node)
            .ok_or_else(|| format!("node {node} has no address in the view"))?;
        let conn = match ClientConn::connect(addr, self.id, &self.config.secret, Some(node)).await {
            Ok(conn) => conn,
            Err(e) => {
                lock(&self.down).insert(node, Instant::now());
                return Err(format!("node {node} at {addr}: {e}"));
            }
        };
        lock(&self.down).remove(&node);
        drop(links);
        Ok(self.adopt_link(conn).await)
    }

    /// Sends `bytes` (a request with `tag`) on `link` and waits for the reply with that tag.
    async fn exchange(&self, link: &Link, tag: u64, bytes: Bytes) -> Result<Reply, String> {
        let _slot = link
            .slots
            .acquire()
            .await
            .map_err(|_| "the link closed".to_string())?;
        let (tx, rx) = oneshot::channel();
        lock(&link.pending).insert(tag, tx);
        // The reader marks the link dead before it drops the waiters, so a waiter added after
        // that sees it here.
        if !link.alive.load(Ordering::SeqCst) {
            lock(&link.pending).remove(&tag);
            return Err(format!("the link to node {} broke", link.node));
        }
        let sent = link.sender.lock().await.send(0, &bytes).await;
        if let Err(e) = sent {
            link.alive.store(false, Ordering::SeqCst);
            lock(&link.pending).remove(&tag);
            return Err(format!("node {}: {e}", link.node));
        }
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(format!("the link to node {} broke", link.node)),
            Err(_) => {
                lock(&link.pending).remove(&tag);
                Err(format!("node {} did not answer in time", link.node))
            }
        }
    }

    async fn call_node(
        self: &Arc<Self>,
        node: NodeId,
        tag: u64,
        bytes: Bytes,
    ) -> Result<Reply, String> {
        let link = self.link(node).await?;
        self.exchange(&link, tag, bytes).await
    }

    /// Sends the request `bytes` (with `tag`) to the members of `shard` in turn until one
    /// answers it (`first` first, if it is a member and up), learning the view again when
    /// members fail or refuse; see the module documentation for the errors. Returns the member
    /// that answered and its reply.
    async fn call_shard(
        self: &Arc<Self>,
        shard: SubgroupShard,
        tag: u64,
        bytes: Bytes,
        first: Option<NodeId>,
    ) -> FsResult<(NodeId, Reply)> {
        let deadline = Instant::now() + Duration::from_millis(self.config.retry_window_ms);
        let spread = self.spread.fetch_add(1, Ordering::Relaxed);
        let mut pause = RETRY_PAUSE_MS;
        let mut last = fs_err!(libc::EIO, "no member of {shard:?} was tried");
        for attempt in 0usize.. {
            let members = lock(&self.layout)
                .subgroup_shard(shard)
                .map(|s| s.members.clone())
                .unwrap_or_default();
            if members.is_empty() {
                return Err(fs_err!(libc::EIO, "the view has no member for {shard:?}"));
            }
            let node = match first {
                Some(f) if attempt == 0 && members.contains(&f) && !self.is_down(f) => f,
                _ => self.choose(&members, spread, attempt),
            };
            let relearn = match self.call_node(node, tag, bytes.clone()).await {
                Ok(Reply::Error { code, message }) => {
                    let why = format!("node {node}: {code:?}: {message}");
                    match code {
                        ErrorCode::Malformed | ErrorCode::Internal => {
                            return Err(fs_err!(libc::EIO, "{why}"))
                        }
                        ErrorCode::Trimmed => return Err(fs_err!(libc::ENOENT, "{why}")),
                        ErrorCode::TimedOut => return Err(fs_err!(libc::EAGAIN, "{why}")),
                        ErrorCode::Busy => {
                            last = fs_err!(libc::EAGAIN, "{why}");
                            false
                        }
                        // Forming, wedged, not a replica (and what later versions add): the
                        // view may have changed.
                        _ => {
                            last = fs_err!(libc::EAGAIN, "{why}");
                            true
                        }
                    }
                }
                Ok(reply) => return Ok((node, reply)),
                Err(e) => {
                    last = fs_err!(libc::EIO, "{e}");
                    true
                }
            };
            tracing::debug!(node, ?shard, attempt, error = %last, "attempt failed; trying again");
            if Instant::now() >= deadline {
                break;
            }
            if relearn {
                self.refresh_layout().await;
            }
            tokio::time::sleep(Duration::from_millis(pause)).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX_MS);
        }
        Err(last)
    }

    /// The member for the `attempt`-th try: the preferred one while it is up, otherwise the
    /// members in turn from a per-request starting point, passing over members recently down.
    fn choose(&self, members: &[NodeId], spread: usize, attempt: usize) -> NodeId {
        if let Some(p) = self.config.prefer {
            if members.contains(&p) && (attempt == 0 || !self.is_down(p)) {
                return p;
            }
        }
        let n = members.len();
        (0..n)
            .map(|i| members[(spread + attempt + i) % n])
            .find(|m| !self.is_down(*m))
            .unwrap_or(members[(spread + attempt) % n])
    }
}

/// Hands each reply on `link` to the request waiting for its tag, until the link ends; then
/// marks it dead and drops every waiter (who then try another member).
async fn read_replies(link: Arc<Link>, mut receiver: ClientReceiver) {
    loop {
        match receiver.recv().await {
            Ok((_, frame)) => match Reply::decode(frame) {
                Ok((tag, reply)) => {
                    if let Some(waiter) = lock(&link.pending).remove(&tag) {
                        let _ = waiter.send(reply);
                    }
                }
                Err(e) => {
                    tracing::warn!(node = link.node, error = %e, "undecodable reply; dropping the link");
                    break;
                }
            },
            Err(e) => {
                tracing::debug!(node = link.node, reason = %e, "link to a member ended");
                break;
            }
        }
    }
    link.alive.store(false, Ordering::SeqCst);
    lock(&link.pending).clear();
    link.slots.close();
}

#[cfg(test)]
mod tests {
    use derechofs_core::protocol::ShardInfo;

    use super::*;

    fn layout(shards: &[(bool, u16)], chunk_size: u32) -> LayoutInfo {
        LayoutInfo {
            view_id: 1,
            members: vec![(1, "127.0.0.1:1".parse().unwrap())],
            shards: shards
                .iter()
                .enumerate()
                .map(|(id, &(data, index))| ShardInfo {
                    id: id as u16,
                    data,
                    index,
                    members: vec![1],
                })
                .collect(),
            chunk_size,
        }
    }

    #[test]
    fn a_layout_serves_the_file_system_only_with_a_namespace_shard_every_data_shard_and_a_chunk_size(
    ) {
        let good = layout(&[(false, 0), (true, 0), (true, 1)], 1 << 20);
        assert_eq!(
            fs_layout(&good),
            Ok(FsLayout {
                data_shards: 2,
                chunk_size: 1 << 20
            })
        );
        assert!(fs_layout(&layout(&[(true, 0)], 1 << 20)).is_err());
        assert!(fs_layout(&layout(&[(false, 0)], 1 << 20)).is_err());
        assert!(fs_layout(&layout(&[(false, 0), (true, 1)], 1 << 20)).is_err());
        assert!(fs_layout(&layout(&[(false, 0), (true, 0)], 3000)).is_err());
        assert!(fs_layout(&layout(&[(false, 0), (true, 0)], 0)).is_err());
    }

    #[test]
    fn a_cluster_that_nobody_answers_for_is_unreachable_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let secret = Secret::new(b"test".to_vec()).unwrap();
        match RemoteShards::connect(RemoteConfig::new(vec![addr], secret.clone())) {
            Err(RemoteError::Unreachable(_)) => {}
            other => panic!("expected Unreachable, got {other:?}"),
        }
        match RemoteShards::connect(RemoteConfig::new(vec!["no port".into()], secret)) {
            Err(RemoteError::Unreachable(why)) => assert!(why.contains("no port"), "{why}"),
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}
