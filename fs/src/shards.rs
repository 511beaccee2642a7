//! How a file system client reaches the shards: the [`Shards`] seam, and [`LocalShards`], an
//! in-process implementation over real logs (one namespace shard and several data shards, one
//! replica each) for tests and for running the file system logic without a cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use derechofs_core::kv::ReadAt;
use derechofs_storage::backend::MemoryBackend;
use derechofs_storage::{version_of, Hlc, Log, LogConfig, SyncPolicy};

use crate::attr_cache::AttrCache;
use crate::chunk::{check_chunk_size, CHUNK_SIZE_DEFAULT};
use crate::error::{FsError, FsResult};
use crate::fs_err;
use crate::shard::FsShard;

/// Which shard a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShardRef {
    /// The namespace shard.
    Namespace,
    /// Data shard `i`, `0..data_shards`.
    Data(u32),
}

/// The parts of the layout a client needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FsLayout {
    /// Number of data shards (≥ 1).
    pub data_shards: u32,
    /// Bytes per chunk (a power of two, `CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX`).
    pub chunk_size: u32,
}

/// Space for `statfs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    /// Bytes in all.
    pub total_bytes: u64,
    /// Bytes free.
    pub free_bytes: u64,
}

/// A client's way to the shards of a cluster.
///
/// To ensure correctness, an implementation must:
/// - `submit`: deliver the encoded request to the shard's ordered multicast and return the reply
///   of the replica that answered, after the request was delivered (applied) there. On a failure
///   it may resend the *same bytes* (the request number makes a retry apply once); it returns an
///   error (EIO, or EAGAIN when the shard cannot make progress) only when it gives up. The client
///   stamp it carries is at least every stamp this client has seen (so an operation that follows
///   another through this client is stamped later, in any shard).
/// - `read`: answer the encoded read from one replica's state at `at`. For `ReadAt::Latest`, a
///   state that includes every request this client had answered (read-your-writes). For
///   `ReadAt::Time(t)`, only once the shard's stability frontier has passed `t`, so that the
///   answer can never change afterwards (EAGAIN if it cannot within the configured wait).
/// - `now_us`: the client's wall clock, used to refuse times in the future.
/// - `sync`: return only once every request this client had answered is durable on every
///   replica of its shard (`fsync`).
/// - `read_many`: as `read` for each element, in any order among themselves; the replies come
///   back in the order of the reads.
pub trait Shards: Send + Sync {
    /// The layout.
    fn layout(&self) -> FsLayout;
    /// Applies an encoded `Request` in `shard`'s order; returns the encoded `Reply`.
    fn submit(&self, shard: ShardRef, request: Bytes) -> FsResult<Bytes>;
    /// Answers an encoded read at `at`; returns the encoded read reply.
    fn read(&self, shard: ShardRef, at: ReadAt, request: Bytes) -> FsResult<Bytes>;
    /// As `submit`, with the version that applied the request when these shards know it
    /// (required of shards that keep an [`AttrCache`]).
    fn submit_versioned(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        Ok((self.submit(shard, request)?, None))
    }
    /// As `read`, with the version whose state answered a read at `Latest` when these shards
    /// know it (required of shards that keep an [`AttrCache`]).
    fn read_versioned(
        &self,
        shard: ShardRef,
        at: ReadAt,
        request: Bytes,
    ) -> FsResult<(Bytes, Option<u64>)> {
        Ok((self.read(shard, at, request)?, None))
    }
    /// A read of `shard` at the latest state that sees every version any replica of `shard`
    /// had delivered when the call began; and from then on, every read at the latest state of
    /// any shard sees every version any of its replicas had delivered when the call began:
    /// the barrier of an open (close-to-open consistency, docs/SEMANTICS.md). Returns the reply
    /// and the version it was answered at, as `read_versioned`. The default suits shards that
    /// answer every read from the one state every write changed (in process).
    fn read_barrier(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        self.read_versioned(shard, ReadAt::Latest, request)
    }
    /// A `DataRead::Plan` of `shard` at the latest state (with this client's writes and open
    /// barrier, as [`Shards::read`]), answered by a member on this machine: `None` when no
    /// member of the shard is linked to this client over a local socket, so that the files a
    /// plan names would not be this machine's (docs/ARCHITECTURE.md, "Local reads"). `ino` is
    /// the file the plan is of: the plans of one file are asked of one member, so that a file
    /// read in order is read from one member's log files, in order (which the kernel's
    /// readahead follows), and different files spread over the members.
    fn read_plan(&self, shard: ShardRef, ino: u64, request: Bytes) -> Option<FsResult<Bytes>> {
        let _ = (shard, ino, request);
        None
    }
    /// The cache of live attributes and names these shards keep coherent with a feed of the
    /// namespace shard's changes ([`crate::attr_cache`]), if they keep one. The file system
    /// answers from it, and fills it from replies tagged with their versions; the shards tell
    /// it every namespace version this client sees ([`AttrCache::saw`]: the version of each
    /// of its namespace writes and of each namespace read at `Latest`).
    fn attr_cache(&self) -> Option<&AttrCache> {
        None
    }
    /// Answers several encoded reads; their replies in the order of `reads`. The default reads
    /// one after the other; a cluster has them in flight at once.
    fn read_many(&self, reads: Vec<(ShardRef, ReadAt, Bytes)>) -> Vec<FsResult<Bytes>> {
        reads
            .into_iter()
            .map(|(shard, at, request)| self.read(shard, at, request))
            .collect()
    }
    /// As `submit_versioned` for each element, in any order among themselves (the caller gives
    /// each its own client id, so no order between them is needed); the replies come back in the
    /// order of `requests`. The default submits one after the other; a cluster has them in
    /// flight at once.
    fn submit_many(&self, requests: Vec<(ShardRef, Bytes)>) -> Vec<FsResult<(Bytes, Option<u64>)>> {
        requests
            .into_iter()
            .map(|(shard, request)| self.submit_versioned(shard, request))
            .collect()
    }
    /// The client's wall clock, in microseconds since the Unix epoch.
    fn now_us(&self) -> u64;
    /// Space for `statfs`.
    fn space(&self) -> FsResult<Space>;
    /// Waits until every request this client had answered is durable on every replica. The
    /// default suits shards whose answers are durable already (in process, in memory).
    fn sync(&self) -> FsResult<()> {
        Ok(())
    }
}

/// Where [`LocalShards`] take the time from.
#[derive(Debug)]
pub enum Clock {
    /// The system clock.
    System,
    /// A clock the caller sets (tests): starts at the value, moves only by [`LocalShards::set_now_us`].
    Manual(AtomicU64),
    /// A clock that moves one microsecond every time it is read (tests that need every
    /// operation in a microsecond of its own), and by [`LocalShards::set_now_us`].
    Ticking(AtomicU64),
}

#[derive(Debug)]
struct LocalShard {
    fs: FsShard,
    seq: u32,
}

/// Shards in this process: one log each on a [`MemoryBackend`], requests applied one version
/// each, stamps by the rule of DESIGN §2 (above the shard's last stamp, the client's stamp and
/// the clock). A read at a time `t` moves the stamp floor above `t`, which is what waiting for
/// the stability frontier guarantees in a cluster: nothing can be stamped at or below `t` later.
#[derive(Debug)]
pub struct LocalShards {
    namespace: Mutex<LocalShard>,
    data: Vec<Mutex<LocalShard>>,
    layout: FsLayout,
    clock: Clock,
    /// The highest stamp handed out or read at: every new stamp is above it.
    floor: Mutex<Hlc>,
    space: Space,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a shard is a bug elsewhere; the state is still the log's.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LocalShards {
    /// One namespace shard and `data_shards` data shards, with chunks of `chunk_size` bytes.
    pub fn new(data_shards: u32, chunk_size: u32, clock: Clock) -> Result<LocalShards, String> {
        check_chunk_size(chunk_size)?;
        if data_shards == 0 {
            return Err("a layout needs at least one data shard".into());
        }
        let shard = || -> Result<Mutex<LocalShard>, String> {
            let config = LogConfig {
                sync: SyncPolicy::None,
                segment_bytes: 1 << 20,
                ..LogConfig::default()
            };
            let log =
                Log::open(Arc::new(MemoryBackend::new()), config).map_err(|e| e.to_string())?;
            Ok(Mutex::new(LocalShard {
                fs: FsShard::new(log, chunk_size)?,
                seq: 0,
            }))
        };
        Ok(LocalShards {
            namespace: shard()?,
            data: (0..data_shards)
                .map(|_| shard())
                .collect::<Result<_, _>>()?,
            layout: FsLayout {
                data_shards,
                chunk_size,
            },
            clock,
            floor: Mutex::new(Hlc::ZERO),
            space: Space {
                total_bytes: 1 << 40,
                free_bytes: 1 << 40,
            },
        })
    }

    /// Default chunk size, the system clock.
    pub fn with_defaults(data_shards: u32) -> Result<LocalShards, String> {
        LocalShards::new(data_shards, CHUNK_SIZE_DEFAULT, Clock::System)
    }

    /// Sets a manual clock.
    pub fn set_now_us(&self, us: u64) {
        if let Clock::Manual(c) | Clock::Ticking(c) = &self.clock {
            c.store(us, Ordering::SeqCst);
        }
    }

    fn shard(&self, shard: ShardRef) -> FsResult<&Mutex<LocalShard>> {
        match shard {
            ShardRef::Namespace => Ok(&self.namespace),
            ShardRef::Data(i) => self
                .data
                .get(i as usize)
                .ok_or_else(|| fs_err!(libc::EIO, "no data shard {i}")),
        }
    }

    /// Runs `f` on the log of a shard (tests, tools).
    pub fn with_log<T>(&self, shard: ShardRef, f: impl FnOnce(&Log) -> T) -> FsResult<T> {
        Ok(f(lock(self.shard(shard)?).fs.log()))
    }

    /// Runs `f` on the log of a shard, to change it (tests: trim history).
    pub fn with_log_mut<T>(&self, shard: ShardRef, f: impl FnOnce(&mut Log) -> T) -> FsResult<T> {
        Ok(f(lock(self.shard(shard)?).fs.log_mut()))
    }
}

impl Shards for LocalShards {
    fn layout(&self) -> FsLayout {
        self.layout
    }

    fn submit(&self, shard: ShardRef, request: Bytes) -> FsResult<Bytes> {
        let mut s = lock(self.shard(shard)?);
        let hlc = {
            let mut floor = lock(&self.floor);
            let last = s.fs.log().latest().map_or(Hlc::ZERO, |l| l.1);
            let stamp = last.max(*floor).tick().max(Hlc::at(self.now_us()));
            *floor = stamp;
            stamp
        };
        s.seq = s
            .seq
            .checked_add(1)
            .ok_or_else(|| fs_err!(libc::ENOSPC, "the shard's view is full"))?;
        let version = version_of(1, s.seq);
        let mut replies =
            s.fs.apply(version, hlc, &[request])
                .map_err(|e| FsError::new(libc::EIO, e.to_string()))?;
        replies
            .pop()
            .ok_or_else(|| fs_err!(libc::EIO, "no reply from the shard"))
    }

    fn read(&self, shard: ShardRef, at: ReadAt, request: Bytes) -> FsResult<Bytes> {
        let s = lock(self.shard(shard)?);
        if let ReadAt::Time(t) = at {
            let mut floor = lock(&self.floor);
            *floor = (*floor).max(t);
        }
        Ok(s.fs.read(at, &request))
    }

    fn now_us(&self) -> u64 {
        match &self.clock {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            Clock::Manual(c) => c.load(Ordering::SeqCst),
            Clock::Ticking(c) => c.fetch_add(1, Ordering::SeqCst),
        }
    }

    fn space(&self) -> FsResult<Space> {
        Ok(self.space)
    }
}

/// Shards shared by several [`crate::FileSystem`]s, as several clients of one cluster.
impl<T: Shards> Shards for std::sync::Arc<T> {
    fn layout(&self) -> FsLayout {
        (**self).layout()
    }
    fn submit(&self, shard: ShardRef, request: Bytes) -> FsResult<Bytes> {
        (**self).submit(shard, request)
    }
    fn read(&self, shard: ShardRef, at: ReadAt, request: Bytes) -> FsResult<Bytes> {
        (**self).read(shard, at, request)
    }
    fn submit_versioned(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        (**self).submit_versioned(shard, request)
    }
    fn read_versioned(
        &self,
        shard: ShardRef,
        at: ReadAt,
        request: Bytes,
    ) -> FsResult<(Bytes, Option<u64>)> {
        (**self).read_versioned(shard, at, request)
    }
    fn read_many(&self, reads: Vec<(ShardRef, ReadAt, Bytes)>) -> Vec<FsResult<Bytes>> {
        (**self).read_many(reads)
    }
    fn submit_many(&self, requests: Vec<(ShardRef, Bytes)>) -> Vec<FsResult<(Bytes, Option<u64>)>> {
        (**self).submit_many(requests)
    }
    fn read_barrier(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        (**self).read_barrier(shard, request)
    }
    fn read_plan(&self, shard: ShardRef, ino: u64, request: Bytes) -> Option<FsResult<Bytes>> {
        (**self).read_plan(shard, ino, request)
    }
    fn attr_cache(&self) -> Option<&AttrCache> {
        (**self).attr_cache()
    }
    fn now_us(&self) -> u64 {
        (**self).now_us()
    }
    fn space(&self) -> FsResult<Space> {
        (**self).space()
    }
    fn sync(&self) -> FsResult<()> {
        (**self).sync()
    }
}
