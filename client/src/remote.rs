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
//! - `read_barrier` (an open) sends `FsReadBarrier`: the member answers once it delivered
//!   everything it had received when the read arrived; the next read at the latest state of
//!   every other shard is then a barrier read too, and later reads of a shard wait for the
//!   version its barrier read was answered at (close-to-open, docs/SEMANTICS.md).
//! - [`RemoteShards::sync`] waits until every version this client had answered is durable on
//!   every replica of its shard (the file system's `fsync`).
//! - With [`RemoteConfig::attr_cache`], a task keeps a feed of the namespace shard's changes
//!   (`FsWatch`) on a link of its own to a member of the namespace shard and applies it to an
//!   [`AttrCache`] (`derechofs_fs::attr_cache`); when the feed ends (the link broke, the member
//!   left the shard, a view change) the cache is cleared and the task subscribes again, to
//!   another member after a pause that doubles up to [`FEED_PAUSE_MAX_MS`].
//!
//! The seam is synchronous (the mount calls it from its threads). Each calling thread outside any
//! runtime has links of its own (under a client id of its own) and a single-threaded tokio
//! runtime it drives itself: a request writes itself to the socket and the thread sleeps in
//! `epoll_wait` until the reply is there, with no other thread woken (see `RemoteShards::block`).
//! Calls from inside other runtimes use shared links on a small runtime of the client's own.
//! Many requests may be in flight at once over one link, each under its own tag (`read_many`
//! sends several from one thread, to one member when one replicates every shard read).

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use derechofs_core::kv::ReadAt;
use derechofs_core::protocol::{
    write_member_index, ErrorCode, LayoutInfo, Reply, Request, SubgroupShard,
};
use derechofs_core::transport::{
    ClientConn, ClientId, ClientReceiver, ClientSender, LinkKind, Secret, LOCAL_SOCKET_DIR_DEFAULT,
};
use derechofs_core::{Hlc, NodeId, Version};
use derechofs_fs::attr_cache::CacheStats;
use derechofs_fs::chunk::check_chunk_size;
use derechofs_fs::{fs_err, AttrCache, FsError, FsLayout, FsResult, ShardRef, Shards, Space};
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
/// How long after a write was answered the reads of its shard go first to the member that
/// answered it. Every replica delivers a version within a few milliseconds of the others in a
/// healthy shard; a read sent to a replica that has not yet waits there until it has (it carries
/// the version), so this only saves that wait, while after it the reads are spread over the
/// replicas (a sequential reader then pulls from every replica at once).
pub const WRITER_FIRST_MS: u64 = 100;
/// Calling threads outside any runtime that get links and a runtime of their own (the
/// mount's FUSE threads, at most 64, fit); calls from further threads share the client's.
pub const THREAD_LINKS_MAX: usize = 64;
/// Worker threads of the client's runtime.
pub const RUNTIME_THREADS: usize = 2;
/// Longest pause before the namespace feed subscribes again after it ended.
pub const FEED_PAUSE_MAX_MS: u64 = 1_000;

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
    /// Acknowledge every operation only once durable on every replica (a `sync` mount).
    pub durable_writes: bool,
    /// Acknowledge every operation of the namespace shards (names, directories, attributes,
    /// a file's size and times) only once durable on every replica, file data once applied (a
    /// `dirsync` mount).
    pub durable_namespace: bool,
    /// Send requests to this member whenever it replicates the shard and is reachable (data
    /// locality, or a test that reads through one replica).
    pub prefer: Option<NodeId>,
    /// Keep a cache of live attributes and names coherent with the namespace feed, which the
    /// file system answers `getattr` and `lookup` from while the feed is caught up
    /// (docs/SEMANTICS.md). Off: every one is a read of the cluster.
    pub attr_cache: bool,
    /// The directory of the nodes' local sockets: a member that has its socket file there is
    /// reached through it, the others over TCP. `None`: TCP only.
    pub local_socket_dir: Option<PathBuf>,
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
            durable_namespace: false,
            prefer: None,
            attr_cache: true,
            local_socket_dir: Some(PathBuf::from(LOCAL_SOCKET_DIR_DEFAULT)),
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

/// The newest write this client had answered in a shard.
#[derive(Clone, Copy, Debug)]
struct Written {
    version: Version,
    /// The member that answered it, which had delivered it then.
    node: NodeId,
    at: Instant,
}

impl Written {
    /// The member that answered the write, while it is recent enough that another member may
    /// not have delivered it yet (a read sent there would wait for it): reads at the latest
    /// state go there first for [`WRITER_FIRST_MS`], and are spread over the members after.
    fn recent_node(&self) -> Option<NodeId> {
        (self.at.elapsed() < Duration::from_millis(WRITER_FIRST_MS)).then_some(self.node)
    }
}

/// One link to a member, shared by every request to it.
#[derive(Debug)]
struct Link {
    node: NodeId,
    /// TCP, or a local socket: a member on this machine.
    kind: LinkKind,
    sender: tokio::sync::Mutex<ClientSender>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    alive: AtomicBool,
    slots: tokio::sync::Semaphore,
}

/// One set of links to the members, under one client id, and what every set shares.
#[derive(Debug)]
struct Inner {
    /// The id this set of links introduces itself with (a node keeps one link per id).
    id: ClientId,
    links: tokio::sync::Mutex<HashMap<NodeId, Arc<Link>>>,
    shared: Arc<Shared>,
}

impl std::ops::Deref for Inner {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.shared
    }
}

/// What every set of links of one client shares: the view, the members down, the stamps, the
/// versions written (read-your-writes holds across the sets).
#[derive(Debug)]
struct Shared {
    config: RemoteConfig,
    contacts: Vec<SocketAddr>,
    layout: Mutex<LayoutInfo>,
    down: Mutex<HashMap<NodeId, Instant>>,
    /// The newest stamp this client has seen.
    seen: Mutex<Hlc>,
    /// Per shard, the newest version this client had answered, the member that answered it
    /// (which had delivered it then), and when.
    written: Mutex<HashMap<SubgroupShard, Written>>,
    next_tag: AtomicU64,
    spread: AtomicUsize,
    /// The turn of the next batch of reads going to one member ([`Inner::batch_member`]):
    /// a counter of its own, so that batches go to the members in turn whatever number of
    /// single requests [`Inner::call_shard`] counts meanwhile.
    batch_turn: AtomicUsize,
    /// Live attributes and names, kept coherent by the namespace feed.
    cache: AttrCache,
    /// The open barriers: one more at every `Shards::read_barrier` (every open). A read at the
    /// latest state of a shard whose last barrier read was sent before the newest open is a
    /// barrier read itself (close-to-open for the data shards at no extra round trip).
    barriers: AtomicU64,
    /// Per shard, the open barrier its last barrier read was sent under, and the version that
    /// read was answered at: every later read at the latest state waits for that version at any
    /// member (it is delivered everywhere in time), as for the client's own writes.
    barriered: Mutex<HashMap<SubgroupShard, (u64, Version)>>,
}

impl Shared {
    /// A client's shared state: nothing seen, written or marked down yet.
    fn new(config: RemoteConfig, contacts: Vec<SocketAddr>, layout: LayoutInfo) -> Shared {
        Shared {
            config,
            contacts,
            layout: Mutex::new(layout),
            down: Mutex::new(HashMap::new()),
            seen: Mutex::new(Hlc::ZERO),
            written: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(1),
            spread: AtomicUsize::new(0),
            batch_turn: AtomicUsize::new(0),
            cache: AttrCache::new(),
            barriers: AtomicU64::new(0),
            barriered: Mutex::new(HashMap::new()),
        }
    }
}

/// The shards of a running cluster; see the module documentation.
#[derive(Debug)]
pub struct RemoteShards {
    /// The links used from inside other runtimes, driven by `runtime`'s workers.
    inner: Arc<Inner>,
    fs_layout: FsLayout,
    runtime: tokio::runtime::Runtime,
    /// Per calling thread outside any runtime (at most [`THREAD_LINKS_MAX`]): its own links,
    /// driven by its own single-threaded runtime on the thread itself.
    locals: Mutex<HashMap<std::thread::ThreadId, Arc<Local>>>,
}

/// A calling thread's own links and the runtime it drives them with while it waits.
#[derive(Debug)]
struct Local {
    inner: Arc<Inner>,
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
        let empty = LayoutInfo {
            view_id: 0,
            members: Vec::new(),
            shards: Vec::new(),
            chunk_size: 0,
        };
        let shared = Arc::new(Shared::new(config, contacts, empty));
        let inner = Arc::new(Inner {
            id: random_id(),
            links: tokio::sync::Mutex::new(HashMap::new()),
            shared,
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
        if inner.config.attr_cache {
            runtime.spawn(run_feed(inner.clone()));
        }
        Ok(RemoteShards {
            inner,
            fs_layout,
            runtime,
            locals: Mutex::new(HashMap::new()),
        })
    }

    /// The view and layout as last learnt.
    pub fn layout_info(&self) -> LayoutInfo {
        lock(&self.inner.layout).clone()
    }

    /// This client's id on the links used from inside other runtimes (each calling thread
    /// outside a runtime has links of its own, under ids of their own).
    pub fn client_id(&self) -> ClientId {
        self.inner.id
    }

    /// The newest version of the namespace shard this client had answered (its own writes).
    pub fn namespace_version(&self) -> Option<Version> {
        let namespace = SubgroupShard {
            data: false,
            index: 0,
        };
        lock(&self.inner.written).get(&namespace).map(|w| w.version)
    }

    /// The attribute cache's counters and its feed's position (`None` while no feed is
    /// subscribed).
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The calling thread's own links and runtime, made on its first call; None once
    /// [`THREAD_LINKS_MAX`] threads have theirs (or a runtime cannot start).
    fn local(&self) -> Option<Arc<Local>> {
        let me = std::thread::current().id();
        let mut locals = lock(&self.locals);
        if let Some(local) = locals.get(&me) {
            return Some(local.clone());
        }
        if locals.len() >= THREAD_LINKS_MAX {
            return None;
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                tracing::warn!(error = %e, "no runtime of the calling thread's own; using the shared one");
                return None;
            }
        };
        let local = Arc::new(Local {
            inner: Arc::new(Inner {
                id: random_id(),
                links: tokio::sync::Mutex::new(HashMap::new()),
                shared: self.inner.shared.clone(),
            }),
            runtime,
        });
        locals.insert(me, local.clone());
        Some(local)
    }

    /// Runs `f` with a set of links and waits for it, from any thread. On a thread outside
    /// any runtime (the mount's threads), `f` runs on the calling thread itself, over the
    /// thread's own links, driven by the thread's own single-threaded runtime: it writes its
    /// request to the socket, sleeps in `epoll_wait` until the reply arrives, and reads it,
    /// with no other thread woken on the client's side. From inside another runtime (whose
    /// thread it then blocks), or past [`THREAD_LINKS_MAX`] threads, it runs as a task on the
    /// client's workers over the shared links.
    fn block<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> T
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            if let Some(local) = self.local() {
                return local.runtime.block_on(f(local.inner.clone()));
            }
            return self.runtime.block_on(f(self.inner.clone()));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let f = f(self.inner.clone());
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
        self.submit_versioned(shard, request)
            .map(|(reply, _)| reply)
    }

    fn read(&self, shard: ShardRef, at: ReadAt, request: Bytes) -> FsResult<Bytes> {
        self.read_versioned(shard, at, request)
            .map(|(reply, _)| reply)
    }

    fn submit_versioned(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        let shard = self.subgroup_shard(shard)?;
        self.block(|inner| async move { inner.submit(shard, request).await })
            .map(|(reply, version)| (reply, Some(version)))
    }

    fn read_versioned(
        &self,
        shard: ShardRef,
        at: ReadAt,
        request: Bytes,
    ) -> FsResult<(Bytes, Option<u64>)> {
        let shard = self.subgroup_shard(shard)?;
        self.block(|inner| async move { inner.read(shard, at, request).await })
            .map(|(reply, version)| (reply, (version > 0).then_some(version)))
    }

    fn attr_cache(&self) -> Option<&AttrCache> {
        self.inner.config.attr_cache.then_some(&self.inner.cache)
    }

    fn read_plan(&self, shard: ShardRef, ino: u64, request: Bytes) -> Option<FsResult<Bytes>> {
        let shard = match self.subgroup_shard(shard) {
            Ok(shard) => shard,
            Err(e) => return Some(Err(e)),
        };
        self.block(|inner| async move { inner.read_on_this_machine(shard, ino, request).await })
    }

    /// An `FsReadBarrier` of `shard`, after a new open barrier: the next read at the latest
    /// state of every other shard is a barrier read too ([`Shared::barriers`]).
    fn read_barrier(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        let shard = self.subgroup_shard(shard)?;
        self.inner.barriers.fetch_add(1, Ordering::SeqCst);
        self.block(|inner| async move { inner.read(shard, ReadAt::Latest, request).await })
            .map(|(reply, version)| (reply, (version > 0).then_some(version)))
    }

    /// Every read in flight at once, sent and awaited from the calling thread, all to one
    /// member when one replicates every shard read (a file read's attributes and chunk pieces
    /// then wake one node, not two or three): see [`Inner::batch_member`].
    fn read_many(&self, reads: Vec<(ShardRef, ReadAt, Bytes)>) -> Vec<FsResult<Bytes>> {
        let reads: Vec<_> = reads
            .into_iter()
            .map(|(shard, at, request)| (self.subgroup_shard(shard), at, request))
            .collect();
        let member = self.inner.batch_member(
            reads
                .iter()
                .filter_map(|(shard, at, _)| shard.as_ref().ok().map(|shard| (*shard, *at))),
        );
        // With more than one read, each queues its request on the link and the first to flush
        // writes them all: the member reads the batch in one turn and answers it in one write.
        let batched = reads.len() > 1;
        self.block(move |inner| {
            let calls: Vec<_> = reads
                .into_iter()
                .map(|(shard, at, request)| {
                    let inner = inner.clone();
                    async move {
                        inner
                            .read_via(shard?, at, request, member, batched)
                            .await
                            .map(|(reply, _, _)| reply)
                    }
                })
                .collect();
            join_all(calls)
        })
    }

    /// Every submission in flight at once, sent and awaited from the calling thread.
    fn submit_many(&self, requests: Vec<(ShardRef, Bytes)>) -> Vec<FsResult<(Bytes, Option<u64>)>> {
        let requests: Vec<_> = requests
            .into_iter()
            .map(|(shard, request)| (self.subgroup_shard(shard), request))
            .collect();
        self.block(move |inner| {
            let calls: Vec<_> = requests
                .into_iter()
                .map(|(shard, request)| {
                    let inner = inner.clone();
                    async move {
                        inner
                            .submit(shard?, request)
                            .await
                            .map(|(reply, version)| (reply, Some(version)))
                    }
                })
                .collect();
            join_all(calls)
        })
    }

    fn now_us(&self) -> u64 {
        wall_us()
    }

    /// Waits until every version this client had answered is durable on every replica of its
    /// shard: the file system's `fsync`. EIO or EAGAIN as for `submit`.
    fn sync(&self) -> FsResult<()> {
        let written: Vec<(SubgroupShard, Version)> = lock(&self.inner.written)
            .iter()
            .map(|(s, w)| (*s, w.version))
            .collect();
        for (shard, version) in written {
            let reply = self.block(|inner| async move {
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
        self.block(|inner| async move {
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

/// How a request is written to its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flush {
    /// Written and flushed at once.
    Now,
    /// One of a batch polled together on one task ([`join_all`]): queued in the link's buffer,
    /// flushed after the task has polled the batch's other requests once, so that a batch to one
    /// member leaves in one write (and the member takes it in one turn) instead of one each.
    Batch,
}

/// Pending once, with its waker woken at once: the task is polled again right away, after the
/// futures polled beside this one have had their turn. Not `tokio::task::yield_now`, which in a
/// runtime defers the wake until the runtime has polled its sockets: one more `epoll_wait` per
/// read on the FUSE thread.
#[derive(Debug, Default)]
struct PendOnce {
    pended: bool,
}

impl Future for PendOnce {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.pended {
            return std::task::Poll::Ready(());
        }
        self.pended = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
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

/// A request's bytes as written on a link: `head`, then `body` from its own memory.
#[derive(Clone, Debug)]
struct Message {
    head: Bytes,
    body: Bytes,
}

impl From<Bytes> for Message {
    fn from(head: Bytes) -> Message {
        Message {
            head,
            body: Bytes::new(),
        }
    }
}

/// Whether an operation on `shard` is answered only once durable on every replica.
fn durable_for(config: &RemoteConfig, shard: SubgroupShard) -> bool {
    config.durable_writes || (config.durable_namespace && !shard.data)
}

impl Inner {
    /// `Shards::submit` of one request to `shard`.
    async fn submit(
        self: Arc<Self>,
        shard: SubgroupShard,
        request: Bytes,
    ) -> FsResult<(Bytes, Version)> {
        let tag = self.tag();
        let hlc = lock(&self.seen).tick();
        let durable = durable_for(&self.config, shard);
        // The request goes behind its envelope from its own memory: a large write is not
        // copied again.
        let message = Message {
            head: Request::encode_fs_submit_head(tag, shard, hlc, durable, request.len()),
            body: request,
        };
        match self.call_shard(shard, tag, message, None).await? {
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
                let now = Instant::now();
                let w = written.entry(shard).or_insert(Written {
                    version,
                    node,
                    at: now,
                });
                if version >= w.version {
                    *w = Written {
                        version,
                        node,
                        at: now,
                    };
                }
                drop(written);
                if !shard.data {
                    self.cache.saw(version);
                }
                Ok((reply, version))
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
    ) -> FsResult<(Bytes, Version)> {
        self.read_via(shard, at, request, None, false)
            .await
            .map(|(reply, version, _)| (reply, version))
    }

    /// One member that replicates every shard of a batch of reads, for all of them to go to:
    /// the preferred member if it is one, else the member that answered this client's newest
    /// write in one of the shards read at the latest state (it has delivered that write, so
    /// it never waits for it), else the members in turn. None when no member replicates every
    /// shard (each read then chooses its own).
    fn batch_member(&self, reads: impl Iterator<Item = (SubgroupShard, ReadAt)>) -> Option<NodeId> {
        let reads: Vec<(SubgroupShard, ReadAt)> = reads.collect();
        let mut common: Option<Vec<NodeId>> = None;
        {
            let layout = lock(&self.layout);
            for (shard, _) in &reads {
                let members = layout.subgroup_shard(*shard)?.members.clone();
                common = Some(match common {
                    None => members,
                    Some(c) => c.into_iter().filter(|m| members.contains(m)).collect(),
                });
            }
        }
        let common = common.filter(|c| !c.is_empty())?;
        let usable = |m: NodeId| common.contains(&m) && !self.is_down(m);
        if let Some(p) = self.config.prefer.filter(|p| usable(*p)) {
            return Some(p);
        }
        let writer = {
            let written = lock(&self.written);
            reads
                .iter()
                .filter(|(_, at)| matches!(at, ReadAt::Latest))
                .filter_map(|(shard, _)| written.get(shard).and_then(Written::recent_node))
                .find(|node| usable(*node))
        };
        if writer.is_some() {
            return writer;
        }
        let turn = self.batch_turn.fetch_add(1, Ordering::Relaxed);
        Some(self.choose(&common, turn, 0))
    }

    /// A read of `shard`, to `member` first if given (else as [`Inner::read`] chooses); with
    /// `batched`, its first attempt is sent as one of a batch ([`Flush::Batch`]). Returns the
    /// reply, the version it was answered at and the member that answered.
    async fn read_via(
        self: Arc<Self>,
        shard: SubgroupShard,
        at: ReadAt,
        request: Bytes,
        member: Option<NodeId>,
        batched: bool,
    ) -> FsResult<(Bytes, Version, NodeId)> {
        // Read-your-writes: at the latest state, a replica answers once it delivered the newest
        // version this client had answered in the shard. The member that answered it had
        // delivered it, so the read goes there first instead of waiting at another replica
        // (unless the batch it belongs to goes to one member).
        let (mut after, writer) = match at {
            ReadAt::Latest => lock(&self.written)
                .get(&shard)
                .map_or((None, None), |w| (Some(w.version), w.recent_node())),
            _ => (None, None),
        };
        // Close-to-open: the first read at the latest state of a shard after an open is a
        // barrier read; the later ones wait for the version it was answered at.
        let mut barrier = None;
        if at == ReadAt::Latest {
            let open = self.barriers.load(Ordering::SeqCst);
            match lock(&self.barriered).get(&shard) {
                Some(&(done, _)) if done < open => barrier = Some(open),
                Some(&(_, version)) => after = after.max(Some(version)),
                None if open > 0 => barrier = Some(open),
                None => {}
            }
        }
        let first = member.or(writer);
        let tag = self.tag();
        let bytes = match barrier {
            Some(_) => Request::FsReadBarrier { shard, request }.encode(tag),
            None => Request::FsRead {
                shard,
                at,
                after,
                request,
            }
            .encode(tag),
        };
        let flush = if batched { Flush::Batch } else { Flush::Now };
        match self
            .call_shard_with(shard, tag, bytes.into(), first, flush)
            .await?
        {
            (
                node,
                Reply::FsValue {
                    read_version,
                    read_hlc,
                    reply,
                },
            ) => {
                self.saw(read_hlc);
                if let Some(open) = barrier {
                    let mut barriered = lock(&self.barriered);
                    let b = barriered.entry(shard).or_insert((open, read_version));
                    *b = (b.0.max(open), b.1.max(read_version));
                }
                if !shard.data && at == ReadAt::Latest {
                    // Every namespace state this client sees holds the cache back until the
                    // feed has reported it (docs/SEMANTICS.md).
                    self.cache.saw(read_version);
                }
                Ok((reply, read_version, node))
            }
            (_, other) => Err(unexpected(&other)),
        }
    }

    fn tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::Relaxed)
    }

    /// A read of `shard` at the latest state from a member this set of links already reaches
    /// over a local socket, if one does; `None` if none does, or if the read was answered by a member over TCP after all (a
    /// retry after the local one failed), whose answer is dropped: a plan names files of the
    /// member's machine. Of several such members, the one of `ino` (the same for every read of
    /// that file, [`write_member_index`] of its number): a file's plans then name one member's
    /// log files, which a reader in order reads in order.
    async fn read_on_this_machine(
        self: Arc<Self>,
        shard: SubgroupShard,
        ino: u64,
        request: Bytes,
    ) -> Option<FsResult<Bytes>> {
        let members = lock(&self.layout)
            .subgroup_shard(shard)
            .map(|s| s.members.clone())
            .unwrap_or_default();
        let local: Vec<NodeId> = {
            let links = self.links.lock().await;
            members
                .iter()
                .copied()
                .filter(|m| {
                    links.get(m).is_some_and(|l| {
                        l.kind == LinkKind::Local && l.alive.load(Ordering::SeqCst)
                    })
                })
                .collect()
        };
        // Only links already made (by this thread's other requests) are looked at: looking
        // for a local member opens no connection of its own.
        let member = match local.as_slice() {
            [] => return None,
            some => some[write_member_index(&ino.to_le_bytes(), some.len())],
        };
        let answered = self
            .clone()
            .read_via(shard, ReadAt::Latest, request, Some(member), false)
            .await;
        match answered {
            Ok((reply, _, node)) => {
                let here = self
                    .links
                    .lock()
                    .await
                    .get(&node)
                    .is_some_and(|l| l.kind == LinkKind::Local);
                here.then_some(Ok(reply))
            }
            Err(e) => Some(Err(e)),
        }
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
            let local_dir = self.config.local_socket_dir.as_deref();
            let secret = &self.config.secret;
            let conn = match ClientConn::connect_via(addr, local_dir, self.id, secret, None).await {
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
        let kind = conn.kind();
        // On a local link, the member's large replies (file data) are copied straight out of
        // its memory; `read_replies` answers them.
        conn.take_loans();
        let (sender, receiver) = conn.into_split();
        let link = Arc::new(Link {
            node,
            kind,
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
        let local_dir = self.config.local_socket_dir.as_deref();
        let secret = &self.config.secret;
        let conn = match ClientConn::connect_via(addr, local_dir, self.id, secret, Some(node)).await
        {
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
        self.exchange_with(link, tag, bytes.into(), Flush::Now)
            .await
    }

    /// [`Inner::exchange`], the request written as `flush` says.
    async fn exchange_with(
        &self,
        link: &Link,
        tag: u64,
        message: Message,
        flush: Flush,
    ) -> Result<Reply, String> {
        let parts = [message.head, message.body];
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
        let sent = match flush {
            Flush::Now => link.sender.lock().await.send_payload(0, &parts).await,
            Flush::Batch => {
                let queued = link.sender.lock().await.queue_payload(0, &parts).await;
                match queued {
                    Ok(()) => {
                        // The other requests of the batch, polled after this one in the same
                        // pass, queue theirs meanwhile; the first flush writes them all, the
                        // later ones find the buffer empty (no system call).
                        PendOnce::default().await;
                        link.sender.lock().await.flush().await
                    }
                    Err(e) => Err(e),
                }
            }
        };
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
        self.call_node_with(node, tag, bytes.into(), Flush::Now)
            .await
    }

    async fn call_node_with(
        self: &Arc<Self>,
        node: NodeId,
        tag: u64,
        message: Message,
        flush: Flush,
    ) -> Result<Reply, String> {
        let link = self.link(node).await?;
        self.exchange_with(&link, tag, message, flush).await
    }

    /// Sends the request `bytes` (with `tag`) to the members of `shard` in turn until one
    /// answers it (`first` first, if it is a member and up), learning the view again when
    /// members fail or refuse; see the module documentation for the errors. Returns the member
    /// that answered and its reply.
    async fn call_shard(
        self: &Arc<Self>,
        shard: SubgroupShard,
        tag: u64,
        message: impl Into<Message>,
        first: Option<NodeId>,
    ) -> FsResult<(NodeId, Reply)> {
        self.call_shard_with(shard, tag, message.into(), first, Flush::Now)
            .await
    }

    /// [`Inner::call_shard`], its first attempt written as `flush` says (the later ones, to
    /// other members, are written at once).
    async fn call_shard_with(
        self: &Arc<Self>,
        shard: SubgroupShard,
        tag: u64,
        message: Message,
        first: Option<NodeId>,
        flush: Flush,
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
            let flush = if attempt == 0 { flush } else { Flush::Now };
            let relearn = match self.call_node_with(node, tag, message.clone(), flush).await {
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

/// Keeps the namespace feed: subscribes on a link of its own to a member of the namespace
/// shard, applies what it reports to the cache, and when it ends clears the cache and
/// subscribes again (to the members in turn, after a pause). Runs until the runtime stops.
async fn run_feed(inner: Arc<Inner>) {
    let namespace = SubgroupShard {
        data: false,
        index: 0,
    };
    let spread = inner.spread.fetch_add(1, Ordering::Relaxed);
    let mut pause = RETRY_PAUSE_MS;
    for attempt in 0usize.. {
        let members = lock(&inner.layout)
            .subgroup_shard(namespace)
            .map(|s| s.members.clone())
            .unwrap_or_default();
        let why = if members.is_empty() {
            "the view has no member for the namespace shard".to_string()
        } else {
            let node = inner.choose(&members, spread, attempt);
            let (why, subscribed) = feed_once(&inner, node).await;
            if subscribed {
                pause = RETRY_PAUSE_MS;
            }
            why
        };
        inner.cache.broken();
        tracing::debug!(%why, "the namespace feed ended; the attribute cache is cleared");
        tokio::time::sleep(Duration::from_millis(pause)).await;
        pause = (pause * 2).min(FEED_PAUSE_MAX_MS);
        inner.refresh_layout().await;
    }
}

/// One subscription of the namespace feed at `node`, until it ends: why it ended, and whether
/// it was subscribed.
async fn feed_once(inner: &Arc<Inner>, node: NodeId) -> (String, bool) {
    let Some(addr) = lock(&inner.layout).addr_of(node) else {
        return (format!("node {node} has no address in the view"), false);
    };
    // A link of its own, under an id of its own: the feed's frames never queue behind replies.
    let local_dir = inner.config.local_socket_dir.as_deref();
    let secret = &inner.config.secret;
    let conn = match ClientConn::connect_via(addr, local_dir, random_id(), secret, Some(node)).await
    {
        Ok(conn) => conn,
        Err(e) => {
            lock(&inner.down).insert(node, Instant::now());
            return (format!("node {node} at {addr}: {e}"), false);
        }
    };
    let (mut sender, mut receiver) = conn.into_split();
    const FEED_TAG: u64 = 1;
    if let Err(e) = sender.send(0, &Request::FsWatch.encode(FEED_TAG)).await {
        return (format!("node {node}: {e}"), false);
    }
    let mut subscribed = false;
    loop {
        let frame = match receiver.recv().await {
            Ok((_, frame)) => frame,
            Err(e) => {
                return (
                    format!("the feed's link to node {node} ended: {e}"),
                    subscribed,
                )
            }
        };
        match Reply::decode(frame) {
            Ok((FEED_TAG, Reply::Watching { from })) if !subscribed => {
                inner.cache.subscribed(from);
                subscribed = true;
            }
            Ok((
                FEED_TAG,
                Reply::FsChanged {
                    version,
                    inodes,
                    entries,
                    xattrs,
                },
            )) if subscribed => inner.cache.changed(version, &inodes, &entries, &xattrs),
            Ok((_, Reply::Error { code, message })) => {
                return (format!("node {node}: {code:?}: {message}"), subscribed)
            }
            Ok((tag, other)) => {
                return (
                    format!("node {node} sent {other:?} under tag {tag} on the feed"),
                    subscribed,
                )
            }
            Err(e) => return (format!("node {node}: undecodable: {e}"), subscribed),
        }
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
                    // The reply's large parts were copied out of the member's memory, which
                    // keeps them until told so (`adopt_link` took its loans).
                    if receiver.loans_to_answer() {
                        if let Err(e) = link.sender.lock().await.answer_loans().await {
                            tracing::debug!(node = link.node, error = %e, "link to a member broke");
                            break;
                        }
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
    fn a_sync_mount_waits_for_every_operation_a_dirsync_mount_for_the_namespaces() {
        let secret = Secret::new(&b"s"[..]).unwrap();
        let data = SubgroupShard {
            data: true,
            index: 0,
        };
        let names = SubgroupShard {
            data: false,
            index: 0,
        };
        let mut config = RemoteConfig::new(vec![], secret);
        assert!(!durable_for(&config, data) && !durable_for(&config, names));
        config.durable_namespace = true;
        assert!(!durable_for(&config, data) && durable_for(&config, names));
        config.durable_writes = true;
        assert!(durable_for(&config, data) && durable_for(&config, names));
        config.durable_namespace = false;
        assert!(durable_for(&config, data) && durable_for(&config, names));
    }

    /// A client's state over `layout`, with no link.
    fn inner_over(layout: LayoutInfo) -> Inner {
        let secret = Secret::new(b"test".to_vec()).unwrap();
        Inner {
            id: 7,
            links: tokio::sync::Mutex::new(HashMap::new()),
            shared: Arc::new(Shared::new(
                RemoteConfig::new(Vec::new(), secret),
                Vec::new(),
                layout,
            )),
        }
    }

    #[test]
    fn a_batch_of_reads_goes_to_one_member_of_every_shard_read_in_turn_or_to_a_recent_writer() {
        let shard = |id: u16, data: bool, index: u16, members: Vec<NodeId>| ShardInfo {
            id,
            data,
            index,
            members,
        };
        let inner = inner_over(LayoutInfo {
            view_id: 1,
            members: (1..=5)
                .map(|n| (n, format!("127.0.0.1:{n}").parse().unwrap()))
                .collect(),
            shards: vec![
                shard(0, false, 0, vec![1, 2, 3]),
                shard(1, true, 0, vec![2, 3, 4]),
                shard(2, true, 1, vec![5]),
            ],
            chunk_size: 1 << 20,
        });
        let ns = SubgroupShard {
            data: false,
            index: 0,
        };
        let (d0, d1) = (
            SubgroupShard {
                data: true,
                index: 0,
            },
            SubgroupShard {
                data: true,
                index: 1,
            },
        );
        let latest = |shards: &[SubgroupShard]| {
            inner.batch_member(shards.iter().map(|s| (*s, ReadAt::Latest)))
        };
        let chosen: Vec<Option<NodeId>> = (0..4).map(|_| latest(&[ns, d0])).collect();
        assert!(
            chosen.iter().all(|m| matches!(m, Some(2 | 3))),
            "{chosen:?}"
        );
        assert!(
            chosen.contains(&Some(2)) && chosen.contains(&Some(3)),
            "{chosen:?}"
        );
        assert_eq!(latest(&[ns, d1]), None, "no member replicates both shards");
        // A write just answered by member 3 draws the reads at the latest state there...
        lock(&inner.written).insert(
            d0,
            Written {
                version: 9,
                node: 3,
                at: Instant::now(),
            },
        );
        for _ in 0..4 {
            assert_eq!(latest(&[ns, d0]), Some(3));
        }
        // ...but not reads at a time, nor once the write is no longer recent.
        let at_time = (0..4)
            .map(|_| {
                inner.batch_member(
                    [(ns, ReadAt::Time(Hlc::ZERO)), (d0, ReadAt::Time(Hlc::ZERO))].into_iter(),
                )
            })
            .collect::<Vec<_>>();
        assert!(at_time.contains(&Some(2)), "{at_time:?}");
        if let Some(old) = Instant::now().checked_sub(Duration::from_millis(WRITER_FIRST_MS + 1)) {
            lock(&inner.written).get_mut(&d0).unwrap().at = old;
            let chosen: Vec<Option<NodeId>> = (0..4).map(|_| latest(&[ns, d0])).collect();
            assert!(chosen.contains(&Some(2)), "{chosen:?}");
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
