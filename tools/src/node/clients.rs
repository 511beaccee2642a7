//! What a node keeps for its clients between a request and its reply.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use derechofs_core::kv::ReadAt;
use derechofs_core::transport::ClientId;
use derechofs_core::{Barrier, Hlc, ShardId, Version};

/// Writes this node submitted and not yet delivered.
pub const SUBMITTED_MAX: usize = 1 << 16;
/// Reads waiting for a version or a frontier.
pub const READ_WAITS_MAX: usize = 1 << 14;
/// Write replies waiting for durability, per shard.
pub const DURABLE_WAITS_MAX: usize = 1 << 16;
/// Clients with watches.
pub const WATCHERS_MAX: usize = 4096;

/// A write submitted to the engine by this node, until its delivery.
#[derive(Clone, Copy, Debug)]
pub struct Submitted {
    /// The client.
    pub client: ClientId,
    /// Its tag for the request.
    pub tag: u64,
    /// Reply once durable rather than once delivered.
    pub durable: bool,
}

/// A write reply waiting for the persistence frontier to cover its version.
#[derive(Clone, Debug)]
pub struct DurableWait {
    /// The version.
    pub version: Version,
    /// The client.
    pub client: ClientId,
    /// The encoded reply.
    pub reply: Bytes,
}

/// What a waiting read waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// This replica delivered this version.
    Delivered(Version),
    /// The shard's stability frontier here reached this stamp.
    Stable(Hlc),
    /// This replica delivered everything the barrier covers (`Request::FsReadBarrier`).
    Barrier(Barrier),
    /// This member holds its read lease, to take the barrier of a `Request::FsReadBarrier`
    /// (`Node::holds_read_lease`): until then it may have been removed without knowing.
    Lease,
}

/// What a read asks.
#[derive(Clone, Debug)]
pub enum ReadWhat {
    /// A K/V key.
    Kv(Bytes),
    /// A file system read encoding.
    Fs(Bytes),
}

/// A read that cannot be answered yet.
#[derive(Clone, Debug)]
pub struct ReadWait {
    /// The client.
    pub client: ClientId,
    /// Its tag.
    pub tag: u64,
    /// The shard.
    pub shard: ShardId,
    /// What it reads.
    pub what: ReadWhat,
    /// The read position.
    pub at: ReadAt,
    /// What it waits for.
    pub until: Until,
    /// When it fails with `TimedOut`.
    pub deadline: Instant,
}

/// A watch: changes of keys with `prefix` in `shard`'s versions after `after` go to `client`
/// with `tag`.
#[derive(Clone, Debug)]
pub struct Watch {
    /// The tag.
    pub tag: u64,
    /// The key prefix.
    pub prefix: Bytes,
    /// The shard.
    pub shard: ShardId,
    /// Versions up to this one were replayed or are not wanted.
    pub after: Version,
    /// A namespace feed (`FsWatch`): every version's changed inodes, not K/V keys.
    pub fs: bool,
}

/// Everything pending for clients.
#[derive(Debug, Default)]
pub struct Clients {
    /// By engine request id.
    pub submitted: HashMap<u64, Submitted>,
    /// Per shard, in version order.
    pub durable: HashMap<ShardId, VecDeque<DurableWait>>,
    /// Reads waiting.
    pub reads: Vec<ReadWait>,
    /// Watches per client.
    pub watches: HashMap<ClientId, Vec<Watch>>,
}

impl Clients {
    /// Forgets a client whose link ended (its pending replies are dropped when due).
    pub fn forget(&mut self, client: ClientId) {
        self.watches.remove(&client);
        self.reads.retain(|r| r.client != client);
    }
}
