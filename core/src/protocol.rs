//! The client protocol: what clients (`derechofs kv`, `derechofs status`, the file system's
//! `RemoteShards`) and a node say to each other over a [`ClientConn`](crate::transport::ClientConn)
//! link. Both sides use this module: the node to decode requests and encode replies, clients the
//! other way round.
//!
//! Every message is one transport frame whose payload is
//!
//! ```text
//! version u8 (= PROTOCOL_VERSION) | kind u8 | tag u64 LE | body (by kind)
//! ```
//!
//! The client picks the tag; the node answers a request with replies carrying the same tag (a
//! watch gets one `Watching` reply, then an `Event` per change, all with its tag). Integers are
//! little-endian; a stamp is `wall_us u64 | logical u32`; bytes are `len u32 | bytes`; a string
//! is `len u16 | UTF-8`; an option is `0 | 1 value`. Writes carry the K/V request encoding of
//! [`KvRequest::encode`](crate::kv::KvRequest::encode) unchanged, and their replies the
//! [`KvReply::encode`] encoding, so a retried write is the same bytes. File system requests carry
//! the engine payload itself (the [`MACHINE_FS`] byte, then the file system's request encoding),
//! which the node multicasts unchanged. Decoding never panics and never allocates more than the
//! message's own length.

use std::net::SocketAddr;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::kv::{KvReply, ReadAt, Versioned};
use crate::{Hlc, NodeId, Version};

/// The protocol version this build speaks; a message with another one is refused.
pub const PROTOCOL_VERSION: u8 = 4;
/// Entries of a history reply; older ones are left out (the reply says so).
pub const HISTORY_ENTRIES_MAX: usize = 100_000;
/// Watches one client may have on one node.
pub const WATCHES_PER_CLIENT_MAX: usize = 64;

/// The first byte of every request payload the nodes multicast: which state machine of the shard
/// applies it. `MACHINE_KV`: the rest is a `KvRequest` encoding.
pub const MACHINE_KV: u8 = 1;
/// See [`MACHINE_KV`]. `MACHINE_FS`: the rest is a file system `Request` encoding (`derechofs-fs`).
pub const MACHINE_FS: u8 = 2;

/// A shard as the file system names it: the namespace subgroup's or the data subgroup's shard
/// with an index. The node maps it to its layout's shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SubgroupShard {
    /// `true`: the data subgroup; `false`: the namespace subgroup.
    pub data: bool,
    /// The shard's index in its subgroup.
    pub index: u16,
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad client protocol message: {0}")]
pub struct ProtocolError(pub &'static str);

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The view and its layout, with member addresses.
    Layout,
    /// A K/V write: `payload` is a `KvRequest` encoding for the client's own id.
    Write {
        /// The client's HLC, past every stamp it has seen.
        hlc: Hlc,
        /// Acknowledge once durable on every replica (otherwise once delivered here).
        durable: bool,
        /// The `KvRequest`.
        payload: Bytes,
    },
    /// Read one key.
    Get {
        /// The key.
        key: Bytes,
        /// Which state.
        at: ReadAt,
        /// With `Latest`: wait until this replica delivered this version (read-your-writes).
        after: Option<Version>,
    },
    /// Every change of a key still held.
    History {
        /// The key.
        key: Bytes,
    },
    /// Stream the changes of every key with this prefix in one data shard, in version order:
    /// with `after`, first every change in a version after it that the node delivered (replayed
    /// from its log), then live; without, live from the node's delivered version on.
    Watch {
        /// The prefix; empty: every key.
        prefix: Bytes,
        /// The data shard's index.
        shard: u16,
        /// Resume strictly after this version of the shard.
        after: Option<Version>,
    },
    /// This node's view, shards and frontiers.
    Status,
    /// A file system write: multicast `payload` in `shard` and answer once delivered here (or
    /// once durable on every replica with `durable`).
    FsSubmit {
        /// The shard.
        shard: SubgroupShard,
        /// The client's HLC, past every stamp it has seen.
        hlc: Hlc,
        /// Answer once durable on every replica rather than once delivered here.
        durable: bool,
        /// The engine payload: [`MACHINE_FS`], then the file system request.
        payload: Bytes,
    },
    /// A file system read, answered from this replica's state at `at`.
    FsRead {
        /// The shard.
        shard: SubgroupShard,
        /// Which state; a time waits for the stability frontier to pass it.
        at: ReadAt,
        /// With `Latest`: wait until this replica delivered this version (read-your-writes).
        after: Option<Version>,
        /// The file system read encoding.
        request: Bytes,
    },
    /// A file system read at the latest state behind a barrier: answered once this replica
    /// delivered every message of the shard it had received when the request arrived, so it
    /// sees every version any replica had delivered then (every write answered before it was
    /// sent, whichever member answered it): close-to-open consistency across clients.
    FsReadBarrier {
        /// The shard.
        shard: SubgroupShard,
        /// The file system read encoding.
        request: Bytes,
    },
    /// Answer once the shard's persistence frontier covers `version` (every replica holds every
    /// version up to it on disk): the file system's `fsync`.
    FsSync {
        /// The shard.
        shard: SubgroupShard,
        /// The version to wait for.
        version: Version,
    },
    /// The size and free space of the file system holding this node's data directory.
    Space,
    /// Stream, for every version of the file system's namespace shard (the namespace
    /// subgroup's shard 0) this node delivers after the registration, the inodes whose
    /// records that version changed ([`Reply::FsChanged`]), in version order: what keeps a
    /// client's attribute cache coherent. Answered `Watching { from }` first (the node's
    /// delivered version).
    FsWatch,
}

/// A reply or notification from a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The answer to `Layout`.
    Layout(LayoutInfo),
    /// The outcome of a write.
    Written(KvReply),
    /// The answer to `Get`.
    Value {
        /// The version the read looked at (`None`: before the first version).
        read_version: Option<Version>,
        /// The value with the version that wrote it; `None`: absent or deleted.
        found: Option<Versioned>,
    },
    /// The answer to `History`.
    History {
        /// Older changes were left out.
        truncated: bool,
        /// Oldest first.
        changes: Vec<Change>,
    },
    /// A watch is registered: the events that follow are those of the versions after `from`
    /// (the request's `after`, or the node's delivered version when it had none).
    Watching {
        /// The watch covers the versions after this one.
        from: Version,
    },
    /// A watched key changed.
    Event(Event),
    /// The answer to `Status`.
    Status(NodeStatus),
    /// The outcome of a file system write, applied as (part of) `version`.
    FsWritten {
        /// The version the request was delivered in.
        version: Version,
        /// Its stamp.
        hlc: Hlc,
        /// The file system reply encoding (the same at every replica).
        reply: Bytes,
    },
    /// The answer to `FsRead`.
    FsValue {
        /// The version whose state was read, for a read at the latest state (zero: before the
        /// first version, or a read at a time or version).
        read_version: Version,
        /// The stamp of the last version at or below the state read (zero: none).
        read_hlc: Hlc,
        /// The file system read reply encoding.
        reply: Bytes,
    },
    /// The answer to `FsSync`: the version is durable on every replica.
    FsSynced,
    /// A version of the namespace shard was delivered (`FsWatch`): the inodes whose records it
    /// changed, the directory entries it added, replaced or removed, and the inodes whose
    /// extended attributes it changed (all empty when it changed none of them).
    FsChanged {
        /// The version.
        version: Version,
        /// The inodes, ascending, each once.
        inodes: Vec<u64>,
        /// The entries as (directory inode, name), in key order, each once.
        entries: Vec<(u64, Bytes)>,
        /// The inodes any of whose extended attributes it wrote or deleted, ascending, each
        /// once.
        xattrs: Vec<u64>,
    },
    /// The answer to `Space`.
    Space {
        /// Bytes in all.
        total_bytes: u64,
        /// Bytes free for this node.
        free_bytes: u64,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// For people.
        message: String,
    },
}

/// One change in a history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The version that wrote it.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
    /// The new value's length; `None`: deleted.
    pub value_len: Option<u32>,
}

/// A change of a watched key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The version that changed it.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
    /// The key.
    pub key: Bytes,
    /// The new value; `None`: deleted.
    pub value: Option<Bytes>,
}

/// Kinds of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The request did not decode or is not allowed.
    Malformed = 1,
    /// This node does not replicate the key's shard.
    NotReplica = 2,
    /// The shard is wedged (a member is suspected) until the view changes; writes fail.
    Wedged = 3,
    /// The view is still forming (not every member is linked yet).
    Forming = 4,
    /// Too many requests waiting; retry later.
    Busy = 5,
    /// A read at a time or version could not be answered in time (EAGAIN).
    TimedOut = 6,
    /// The version or time is before the trim horizon.
    Trimmed = 7,
    /// The node failed to do it.
    Internal = 8,
    /// The node's shard lost its majority (partition safety): it takes no write, and reads only
    /// at times at or below its last stability frontier, until the majority side is reachable.
    NoMajority = 9,
    /// The node is no longer a member of the group (a view change removed it, or it restarted
    /// after the group moved on); ask another member.
    Removed = 10,
    /// The next view is inadequate (a shard below its minimum size): writes wait for joins.
    Inadequate = 11,
}

impl ErrorCode {
    fn from_u8(b: u8) -> Result<ErrorCode, ProtocolError> {
        Ok(match b {
            1 => ErrorCode::Malformed,
            2 => ErrorCode::NotReplica,
            3 => ErrorCode::Wedged,
            4 => ErrorCode::Forming,
            5 => ErrorCode::Busy,
            6 => ErrorCode::TimedOut,
            7 => ErrorCode::Trimmed,
            8 => ErrorCode::Internal,
            9 => ErrorCode::NoMajority,
            10 => ErrorCode::Removed,
            11 => ErrorCode::Inadequate,
            _ => return Err(ProtocolError("unknown error code")),
        })
    }
}

/// The view as clients need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutInfo {
    /// The view id.
    pub view_id: u32,
    /// Members in rank order with their addresses.
    pub members: Vec<(NodeId, SocketAddr)>,
    /// The shards.
    pub shards: Vec<ShardInfo>,
    /// Bytes of a file chunk (the file system's layout).
    pub chunk_size: u32,
}

/// One shard of the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardInfo {
    /// Its id.
    pub id: u16,
    /// `true` for the data subgroup, `false` for the namespace.
    pub data: bool,
    /// Its index in its subgroup.
    pub index: u16,
    /// Its members in rank order.
    pub members: Vec<NodeId>,
}

impl LayoutInfo {
    /// The data shard that owns `key`.
    pub fn shard_of(&self, key: &[u8]) -> Option<&ShardInfo> {
        let data = self.shards.iter().filter(|s| s.data).count();
        let index = data_shard_index(key, u16::try_from(data).ok()?);
        self.shards.iter().find(|s| s.data && s.index == index)
    }

    /// The shard of a subgroup with an index.
    pub fn subgroup_shard(&self, shard: SubgroupShard) -> Option<&ShardInfo> {
        self.shards
            .iter()
            .find(|s| s.data == shard.data && s.index == shard.index)
    }

    /// Shards of the data subgroup.
    pub fn data_shards(&self) -> usize {
        self.shards.iter().filter(|s| s.data).count()
    }

    /// The address of a member.
    pub fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        self.members.iter().find(|m| m.0 == node).map(|m| m.1)
    }
}

/// FNV-1a of `key` (64 bits), stable across builds and machines.
fn key_hash(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The index, among `data_shards` data shards, of the shard that owns `key`: FNV-1a, stable
/// across builds and machines.
pub fn data_shard_index(key: &[u8], data_shards: u16) -> u16 {
    (key_hash(key) % u64::from(data_shards.max(1))) as u16
}

/// The position, among a shard's `members` (in the layout's order), of `key`'s own member: the
/// one K/V clients send their conditional puts of a contended `key` to first, and (with a file's
/// inode number as the key) the one a file system client asks a file's read plans of. The same
/// for every client, so the attempts at one key meet at one member and leave in one multicast
/// message per turn, instead of one from each member, and a file is read from one member's log
/// files; different keys spread over the members. From the hash
/// mixed again (the finalizer of MurmurHash3): the shard index reduces the same hash, and a
/// residue of FNV-1a's bits alone would follow it, so the keys of one shard would all pick one
/// member.
pub fn write_member_index(key: &[u8], members: usize) -> usize {
    let mut h = key_hash(key);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h % members.max(1) as u64) as usize
}

/// A node's state for `derechofs status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node.
    pub node_id: NodeId,
    /// Its view.
    pub view_id: u32,
    /// `forming`, `restarting`, `active`, `wedged`, `no-majority`, `removed`, `inadequate`.
    pub state: String,
    /// The members it suspects.
    pub suspected: Vec<NodeId>,
    /// The shards it replicates.
    pub shards: Vec<ShardStatusInfo>,
}

/// One shard at one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardStatusInfo {
    /// The shard id.
    pub id: u16,
    /// Its members.
    pub members: Vec<NodeId>,
    /// Last version delivered here, with its stamp.
    pub last_delivered: Option<(Version, Hlc)>,
    /// Highest version durable on every member.
    pub persistence_frontier: Option<Version>,
    /// Stamp at or below which the history is final here.
    pub stability_frontier: Hlc,
    /// Highest version persisted in this node's log.
    pub persisted_here: Option<Version>,
    /// Local requests waiting for the window.
    pub pending_requests: u64,
    /// Versions held in the log.
    pub versions: u64,
    /// Keys with a history in the log.
    pub keys: u64,
    /// New to this node (or behind after a rejoin), its log still being brought up to date by
    /// state transfer: the node serves no client request for it until this turns false.
    pub catching_up: bool,
}

const KIND_LAYOUT: u8 = 1;
const KIND_WRITE: u8 = 2;
const KIND_GET: u8 = 3;
const KIND_HISTORY: u8 = 4;
const KIND_WATCH: u8 = 5;
const KIND_STATUS: u8 = 6;
const KIND_FS_SUBMIT: u8 = 7;
const KIND_FS_READ: u8 = 8;
const KIND_FS_SYNC: u8 = 9;
const KIND_SPACE: u8 = 10;
const KIND_FS_WATCH: u8 = 11;
const KIND_FS_READ_BARRIER: u8 = 12;

const REPLY_LAYOUT: u8 = 0x81;
const REPLY_WRITTEN: u8 = 0x82;
const REPLY_VALUE: u8 = 0x83;
const REPLY_HISTORY: u8 = 0x84;
const REPLY_WATCHING: u8 = 0x85;
const REPLY_EVENT: u8 = 0x86;
const REPLY_STATUS: u8 = 0x87;
const REPLY_ERROR: u8 = 0x88;
const REPLY_FS_WRITTEN: u8 = 0x89;
const REPLY_FS_VALUE: u8 = 0x8A;
const REPLY_FS_SYNCED: u8 = 0x8B;
const REPLY_SPACE: u8 = 0x8C;
const REPLY_FS_CHANGED: u8 = 0x8D;

const AT_LATEST: u8 = 0;
const AT_VERSION: u8 = 1;
const AT_TIME: u8 = 2;

fn header(kind: u8, tag: u64) -> BytesMut {
    header_for(kind, tag, 54)
}

/// The header of a message whose body is `body` bytes long: allocated once for the whole.
fn header_for(kind: u8, tag: u64, body: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(10 + body);
    b.put_u8(PROTOCOL_VERSION);
    b.put_u8(kind);
    b.put_u64_le(tag);
    b
}

fn put_hlc(b: &mut BytesMut, hlc: Hlc) {
    b.put_u64_le(hlc.wall_us);
    b.put_u32_le(hlc.logical);
}

fn put_bytes(b: &mut BytesMut, bytes: &[u8]) {
    b.put_u32_le(bytes.len() as u32);
    b.put_slice(bytes);
}

fn put_str(b: &mut BytesMut, s: &str) {
    // Cut at a character boundary so the string stays valid UTF-8.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    b.put_u16_le(end as u16);
    b.put_slice(&s.as_bytes()[..end]);
}

fn put_opt_version(b: &mut BytesMut, v: Option<Version>) {
    b.put_u8(u8::from(v.is_some()));
    b.put_u64_le(v.unwrap_or(0));
}

fn put_at(b: &mut BytesMut, at: ReadAt) {
    match at {
        ReadAt::Latest => b.put_u8(AT_LATEST),
        ReadAt::Version(v) => {
            b.put_u8(AT_VERSION);
            b.put_u64_le(v);
        }
        ReadAt::Time(t) => {
            b.put_u8(AT_TIME);
            put_hlc(b, t);
        }
    }
}

fn put_subgroup_shard(b: &mut BytesMut, shard: SubgroupShard) {
    b.put_u8(u8::from(shard.data));
    b.put_u16_le(shard.index);
}

fn put_nodes(b: &mut BytesMut, nodes: &[NodeId]) {
    b.put_u16_le(nodes.len() as u16);
    for &n in nodes {
        b.put_u32_le(n);
    }
}

/// Checked reads over a message.
struct Reader {
    b: Bytes,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), ProtocolError> {
        if self.b.remaining() < n {
            Err(ProtocolError("truncated"))
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        self.need(1)?;
        Ok(self.b.get_u8())
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.need(2)?;
        Ok(self.b.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.need(4)?;
        Ok(self.b.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.need(8)?;
        Ok(self.b.get_u64_le())
    }
    fn bool(&mut self) -> Result<bool, ProtocolError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtocolError("bad flag")),
        }
    }
    fn hlc(&mut self) -> Result<Hlc, ProtocolError> {
        Ok(Hlc {
            wall_us: self.u64()?,
            logical: self.u32()?,
        })
    }
    fn bytes(&mut self) -> Result<Bytes, ProtocolError> {
        let len = self.u32()? as usize;
        self.need(len)?;
        Ok(self.b.split_to(len))
    }
    fn string(&mut self) -> Result<String, ProtocolError> {
        let len = usize::from(self.u16()?);
        self.need(len)?;
        let raw = self.b.split_to(len);
        String::from_utf8(raw.to_vec()).map_err(|_| ProtocolError("string is not UTF-8"))
    }
    fn opt_version(&mut self) -> Result<Option<Version>, ProtocolError> {
        let has = self.bool()?;
        let v = self.u64()?;
        Ok(has.then_some(v))
    }
    /// A count of items each at least `item_bytes` long, checked against what remains.
    fn count(&mut self, n: usize, item_bytes: usize) -> Result<usize, ProtocolError> {
        self.need(n.saturating_mul(item_bytes))?;
        Ok(n)
    }
    fn at(&mut self) -> Result<ReadAt, ProtocolError> {
        Ok(match self.u8()? {
            AT_LATEST => ReadAt::Latest,
            AT_VERSION => ReadAt::Version(self.u64()?),
            AT_TIME => ReadAt::Time(self.hlc()?),
            _ => return Err(ProtocolError("unknown read position")),
        })
    }
    fn subgroup_shard(&mut self) -> Result<SubgroupShard, ProtocolError> {
        Ok(SubgroupShard {
            data: self.bool()?,
            index: self.u16()?,
        })
    }
    fn nodes(&mut self) -> Result<Vec<NodeId>, ProtocolError> {
        let n = usize::from(self.u16()?);
        let n = self.count(n, 4)?;
        (0..n).map(|_| self.u32()).collect()
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.b.has_remaining() {
            Err(ProtocolError("bytes after the message"))
        } else {
            Ok(())
        }
    }
}

/// Reads the version, kind and tag.
fn open(b: Bytes) -> Result<(Reader, u8, u64), ProtocolError> {
    let mut r = Reader { b };
    let version = r.u8()?;
    if version != PROTOCOL_VERSION {
        return Err(ProtocolError("unsupported protocol version"));
    }
    let kind = r.u8()?;
    let tag = r.u64()?;
    Ok((r, kind, tag))
}

/// The tag of a message, if its header is readable: to answer a request that does not decode.
pub fn tag_of(b: &[u8]) -> Option<u64> {
    let tag = b.get(2..10)?;
    Some(u64::from_le_bytes(tag.try_into().ok()?))
}

impl Request {
    /// Encodes the request with `tag`.
    pub fn encode(&self, tag: u64) -> Bytes {
        let mut b;
        match self {
            Request::Layout => b = header(KIND_LAYOUT, tag),
            Request::Write {
                hlc,
                durable,
                payload,
            } => {
                // The time, the flag, and the payload with its length.
                b = header_for(KIND_WRITE, tag, 12 + 1 + 4 + payload.len());
                put_hlc(&mut b, *hlc);
                b.put_u8(u8::from(*durable));
                put_bytes(&mut b, payload);
            }
            Request::Get { key, at, after } => {
                b = header(KIND_GET, tag);
                put_bytes(&mut b, key);
                put_at(&mut b, *at);
                put_opt_version(&mut b, *after);
            }
            Request::History { key } => {
                b = header(KIND_HISTORY, tag);
                put_bytes(&mut b, key);
            }
            Request::Watch {
                prefix,
                shard,
                after,
            } => {
                b = header(KIND_WATCH, tag);
                put_bytes(&mut b, prefix);
                b.put_u16_le(*shard);
                put_opt_version(&mut b, *after);
            }
            Request::Status => b = header(KIND_STATUS, tag),
            Request::FsSubmit {
                shard,
                hlc,
                durable,
                payload,
            } => {
                b = header(KIND_FS_SUBMIT, tag);
                put_subgroup_shard(&mut b, *shard);
                put_hlc(&mut b, *hlc);
                b.put_u8(u8::from(*durable));
                put_bytes(&mut b, payload);
            }
            Request::FsRead {
                shard,
                at,
                after,
                request,
            } => {
                b = header(KIND_FS_READ, tag);
                put_subgroup_shard(&mut b, *shard);
                put_at(&mut b, *at);
                put_opt_version(&mut b, *after);
                put_bytes(&mut b, request);
            }
            Request::FsReadBarrier { shard, request } => {
                b = header(KIND_FS_READ_BARRIER, tag);
                put_subgroup_shard(&mut b, *shard);
                put_bytes(&mut b, request);
            }
            Request::FsSync { shard, version } => {
                b = header(KIND_FS_SYNC, tag);
                put_subgroup_shard(&mut b, *shard);
                b.put_u64_le(*version);
            }
            Request::Space => b = header(KIND_SPACE, tag),
            Request::FsWatch => b = header(KIND_FS_WATCH, tag),
        }
        b.freeze()
    }

    /// Encodes an `FsSubmit` of the file system request `request` with `tag`, writing the
    /// engine payload ([`MACHINE_FS`], then `request`) straight into the message: the same bytes
    /// as `Request::FsSubmit { payload: [MACHINE_FS] ++ request, .. }.encode(tag)`.
    pub fn encode_fs_submit(
        tag: u64,
        shard: SubgroupShard,
        hlc: Hlc,
        durable: bool,
        request: &[u8],
    ) -> Bytes {
        let head = Request::encode_fs_submit_head(tag, shard, hlc, durable, request.len());
        let mut b = BytesMut::with_capacity(head.len() + request.len());
        b.put_slice(&head);
        b.put_slice(request);
        b.freeze()
    }

    /// The bytes of [`Request::FsSubmit`] that come before the file system request of
    /// `request_len` bytes: sent with the request behind them, they are the same message as
    /// [`Request::encode_fs_submit`]'s, without copying the request.
    pub fn encode_fs_submit_head(
        tag: u64,
        shard: SubgroupShard,
        hlc: Hlc,
        durable: bool,
        request_len: usize,
    ) -> Bytes {
        let mut b = header(KIND_FS_SUBMIT, tag);
        b.reserve(32);
        put_subgroup_shard(&mut b, shard);
        put_hlc(&mut b, hlc);
        b.put_u8(u8::from(durable));
        b.put_u32_le((request_len + 1) as u32);
        b.put_u8(MACHINE_FS);
        b.freeze()
    }

    /// Decodes a request and its tag; never panics, whatever the bytes.
    pub fn decode(b: Bytes) -> Result<(u64, Request), ProtocolError> {
        let (mut r, kind, tag) = open(b)?;
        let request = match kind {
            KIND_LAYOUT => Request::Layout,
            KIND_WRITE => Request::Write {
                hlc: r.hlc()?,
                durable: r.bool()?,
                payload: r.bytes()?,
            },
            KIND_GET => {
                let key = r.bytes()?;
                let at = r.at()?;
                let after = r.opt_version()?;
                Request::Get { key, at, after }
            }
            KIND_HISTORY => Request::History { key: r.bytes()? },
            KIND_WATCH => {
                let prefix = r.bytes()?;
                let shard = r.u16()?;
                let after = r.opt_version()?;
                Request::Watch {
                    prefix,
                    shard,
                    after,
                }
            }
            KIND_STATUS => Request::Status,
            KIND_FS_SUBMIT => {
                let shard = r.subgroup_shard()?;
                let hlc = r.hlc()?;
                let durable = r.bool()?;
                let payload = r.bytes()?;
                if payload.first() != Some(&MACHINE_FS) {
                    return Err(ProtocolError(
                        "a file system payload must start with MACHINE_FS",
                    ));
                }
                Request::FsSubmit {
                    shard,
                    hlc,
                    durable,
                    payload,
                }
            }
            KIND_FS_READ => Request::FsRead {
                shard: r.subgroup_shard()?,
                at: r.at()?,
                after: r.opt_version()?,
                request: r.bytes()?,
            },
            KIND_FS_READ_BARRIER => Request::FsReadBarrier {
                shard: r.subgroup_shard()?,
                request: r.bytes()?,
            },
            KIND_FS_SYNC => Request::FsSync {
                shard: r.subgroup_shard()?,
                version: r.u64()?,
            },
            KIND_SPACE => Request::Space,
            KIND_FS_WATCH => Request::FsWatch,
            _ => return Err(ProtocolError("unknown request kind")),
        };
        r.end()?;
        Ok((tag, request))
    }
}

impl Reply {
    /// The bytes [`Reply::encode`] gives for `Reply::FsValue { read_version, read_hlc, reply }`
    /// where `reply` is what `put` appends followed by `tail`, as two parts: the message's head
    /// with what `put` appended, and `tail` itself (not copied; the link writes both parts with
    /// one vectored write). For a large read's bytes, which then go from where they are (the
    /// log's mapping, the chunk cache) to the socket.
    pub fn encode_fs_value_parts(
        tag: u64,
        read_version: Version,
        read_hlc: Hlc,
        put: impl FnOnce(&mut Vec<u8>),
        tail: Bytes,
    ) -> [Bytes; 2] {
        let mut head_len = 0;
        let head = Reply::encode_fs_value_with(tag, read_version, read_hlc, 16, |out| {
            let start = out.len();
            put(out);
            head_len = out.len() - start;
        });
        // The length field counts the tail too: the reply is the head's part and the tail.
        let len = u32::try_from(head_len + tail.len()).unwrap_or(u32::MAX);
        let mut head = Vec::from(head);
        let len_at = head.len() - head_len - 4;
        head[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        [Bytes::from(head), tail]
    }

    /// The bytes [`Reply::encode`] gives for `Reply::FsValue { read_version, read_hlc, reply }`,
    /// with `reply`
    /// appended by `put` straight into the message's one buffer (of `reply_len_hint` bytes
    /// more than the header, to start with): a read's bytes are copied once on their way to the
    /// link instead of into a reply and then into the message.
    pub fn encode_fs_value_with(
        tag: u64,
        read_version: Version,
        read_hlc: Hlc,
        reply_len_hint: usize,
        put: impl FnOnce(&mut Vec<u8>),
    ) -> Bytes {
        const HEAD: usize = 1 + 1 + 8 + 8 + 8 + 4 + 4;
        let mut b = Vec::with_capacity(HEAD + reply_len_hint);
        b.push(PROTOCOL_VERSION);
        b.push(REPLY_FS_VALUE);
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&read_version.to_le_bytes());
        b.extend_from_slice(&read_hlc.wall_us.to_le_bytes());
        b.extend_from_slice(&read_hlc.logical.to_le_bytes());
        let len_at = b.len();
        b.extend_from_slice(&[0; 4]);
        put(&mut b);
        let len = b.len() - len_at - 4;
        // A reply this large cannot be sent in a frame anyway; the link refuses it by size.
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        b[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        Bytes::from(b)
    }

    /// Encodes the reply with `tag`.
    pub fn encode(&self, tag: u64) -> Bytes {
        let mut b;
        match self {
            Reply::Layout(layout) => {
                b = header(REPLY_LAYOUT, tag);
                b.put_u32_le(layout.view_id);
                b.put_u16_le(layout.members.len() as u16);
                for (id, addr) in &layout.members {
                    b.put_u32_le(*id);
                    put_str(&mut b, &addr.to_string());
                }
                b.put_u16_le(layout.shards.len() as u16);
                for shard in &layout.shards {
                    b.put_u16_le(shard.id);
                    b.put_u8(u8::from(shard.data));
                    b.put_u16_le(shard.index);
                    put_nodes(&mut b, &shard.members);
                }
                b.put_u32_le(layout.chunk_size);
            }
            Reply::Written(reply) => {
                b = header(REPLY_WRITTEN, tag);
                reply.encode_into(&mut b);
            }
            Reply::Value {
                read_version,
                found,
            } => {
                b = header(REPLY_VALUE, tag);
                put_opt_version(&mut b, *read_version);
                match found {
                    None => b.put_u8(0),
                    Some(v) => {
                        b.put_u8(1);
                        b.put_u64_le(v.version);
                        put_hlc(&mut b, v.hlc);
                        put_bytes(&mut b, &v.value);
                    }
                }
            }
            Reply::History { truncated, changes } => {
                b = header(REPLY_HISTORY, tag);
                b.put_u8(u8::from(*truncated));
                b.put_u32_le(changes.len() as u32);
                for c in changes {
                    b.put_u64_le(c.version);
                    put_hlc(&mut b, c.hlc);
                    b.put_u8(u8::from(c.value_len.is_some()));
                    b.put_u32_le(c.value_len.unwrap_or(0));
                }
            }
            Reply::Watching { from } => {
                b = header(REPLY_WATCHING, tag);
                b.put_u64_le(*from);
            }
            Reply::Event(e) => {
                b = header(REPLY_EVENT, tag);
                b.put_u64_le(e.version);
                put_hlc(&mut b, e.hlc);
                put_bytes(&mut b, &e.key);
                b.put_u8(u8::from(e.value.is_some()));
                put_bytes(&mut b, e.value.as_deref().unwrap_or_default());
            }
            Reply::Status(s) => {
                b = header(REPLY_STATUS, tag);
                b.put_u32_le(s.node_id);
                b.put_u32_le(s.view_id);
                put_str(&mut b, &s.state);
                put_nodes(&mut b, &s.suspected);
                b.put_u16_le(s.shards.len() as u16);
                for sh in &s.shards {
                    b.put_u16_le(sh.id);
                    put_nodes(&mut b, &sh.members);
                    b.put_u8(u8::from(sh.last_delivered.is_some()));
                    let (v, h) = sh.last_delivered.unwrap_or((0, Hlc::ZERO));
                    b.put_u64_le(v);
                    put_hlc(&mut b, h);
                    put_opt_version(&mut b, sh.persistence_frontier);
                    put_hlc(&mut b, sh.stability_frontier);
                    put_opt_version(&mut b, sh.persisted_here);
                    b.put_u64_le(sh.pending_requests);
                    b.put_u64_le(sh.versions);
                    b.put_u64_le(sh.keys);
                    b.put_u8(u8::from(sh.catching_up));
                }
            }
            Reply::Error { code, message } => {
                b = header(REPLY_ERROR, tag);
                b.put_u8(*code as u8);
                put_str(&mut b, message);
            }
            Reply::FsWritten {
                version,
                hlc,
                reply,
            } => {
                b = header(REPLY_FS_WRITTEN, tag);
                b.put_u64_le(*version);
                put_hlc(&mut b, *hlc);
                put_bytes(&mut b, reply);
            }
            Reply::FsValue {
                read_version,
                read_hlc,
                reply,
            } => {
                b = header(REPLY_FS_VALUE, tag);
                b.put_u64_le(*read_version);
                put_hlc(&mut b, *read_hlc);
                put_bytes(&mut b, reply);
            }
            Reply::FsSynced => b = header(REPLY_FS_SYNCED, tag),
            Reply::FsChanged {
                version,
                inodes,
                entries,
                xattrs,
            } => {
                b = header(REPLY_FS_CHANGED, tag);
                b.reserve(20 + 8 * inodes.len() + 16 * entries.len() + 8 * xattrs.len());
                b.put_u64_le(*version);
                b.put_u32_le(inodes.len() as u32);
                for ino in inodes {
                    b.put_u64_le(*ino);
                }
                b.put_u32_le(entries.len() as u32);
                for (parent, name) in entries {
                    b.put_u64_le(*parent);
                    put_bytes(&mut b, name);
                }
                b.put_u32_le(xattrs.len() as u32);
                for ino in xattrs {
                    b.put_u64_le(*ino);
                }
            }
            Reply::Space {
                total_bytes,
                free_bytes,
            } => {
                b = header(REPLY_SPACE, tag);
                b.put_u64_le(*total_bytes);
                b.put_u64_le(*free_bytes);
            }
        }
        b.freeze()
    }

    /// Decodes a reply and its tag; never panics, whatever the bytes.
    pub fn decode(b: Bytes) -> Result<(u64, Reply), ProtocolError> {
        let (mut r, kind, tag) = open(b)?;
        let reply = match kind {
            REPLY_LAYOUT => {
                let view_id = r.u32()?;
                let n = usize::from(r.u16()?);
                let n = r.count(n, 6)?;
                let mut members = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u32()?;
                    let addr = r
                        .string()?
                        .parse()
                        .map_err(|_| ProtocolError("bad member address"))?;
                    members.push((id, addr));
                }
                let n = usize::from(r.u16()?);
                let n = r.count(n, 7)?;
                let mut shards = Vec::with_capacity(n);
                for _ in 0..n {
                    shards.push(ShardInfo {
                        id: r.u16()?,
                        data: r.bool()?,
                        index: r.u16()?,
                        members: r.nodes()?,
                    });
                }
                let chunk_size = r.u32()?;
                Reply::Layout(LayoutInfo {
                    view_id,
                    members,
                    shards,
                    chunk_size,
                })
            }
            REPLY_WRITTEN => {
                let rest = r.b.split_off(0);
                let reply = KvReply::decode(rest).map_err(|_| ProtocolError("bad write reply"))?;
                Reply::Written(reply)
            }
            REPLY_VALUE => {
                let read_version = r.opt_version()?;
                let found = if r.bool()? {
                    let version = r.u64()?;
                    let hlc = r.hlc()?;
                    let value = r.bytes()?;
                    Some(Versioned {
                        value,
                        version,
                        hlc,
                    })
                } else {
                    None
                };
                Reply::Value {
                    read_version,
                    found,
                }
            }
            REPLY_HISTORY => {
                let truncated = r.bool()?;
                let n = r.u32()? as usize;
                let n = r.count(n, 25)?;
                let mut changes = Vec::with_capacity(n);
                for _ in 0..n {
                    let version = r.u64()?;
                    let hlc = r.hlc()?;
                    let has = r.bool()?;
                    let len = r.u32()?;
                    changes.push(Change {
                        version,
                        hlc,
                        value_len: has.then_some(len),
                    });
                }
                Reply::History { truncated, changes }
            }
            REPLY_WATCHING => Reply::Watching { from: r.u64()? },
            REPLY_EVENT => {
                let version = r.u64()?;
                let hlc = r.hlc()?;
                let key = r.bytes()?;
                let has = r.bool()?;
                let value = r.bytes()?;
                Reply::Event(Event {
                    version,
                    hlc,
                    key,
                    value: has.then_some(value),
                })
            }
            REPLY_STATUS => {
                let node_id = r.u32()?;
                let view_id = r.u32()?;
                let state = r.string()?;
                let suspected = r.nodes()?;
                let n = usize::from(r.u16()?);
                let n = r.count(n, 80)?;
                let mut shards = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = r.u16()?;
                    let members = r.nodes()?;
                    let has = r.bool()?;
                    let v = r.u64()?;
                    let h = r.hlc()?;
                    shards.push(ShardStatusInfo {
                        id,
                        members,
                        last_delivered: has.then_some((v, h)),
                        persistence_frontier: r.opt_version()?,
                        stability_frontier: r.hlc()?,
                        persisted_here: r.opt_version()?,
                        pending_requests: r.u64()?,
                        versions: r.u64()?,
                        keys: r.u64()?,
                        catching_up: r.bool()?,
                    });
                }
                Reply::Status(NodeStatus {
                    node_id,
                    view_id,
                    state,
                    suspected,
                    shards,
                })
            }
            REPLY_ERROR => Reply::Error {
                code: ErrorCode::from_u8(r.u8()?)?,
                message: r.string()?,
            },
            REPLY_FS_WRITTEN => Reply::FsWritten {
                version: r.u64()?,
                hlc: r.hlc()?,
                reply: r.bytes()?,
            },
            REPLY_FS_VALUE => Reply::FsValue {
                read_version: r.u64()?,
                read_hlc: r.hlc()?,
                reply: r.bytes()?,
            },
            REPLY_FS_SYNCED => Reply::FsSynced,
            REPLY_FS_CHANGED => {
                let version = r.u64()?;
                let n = r.u32()? as usize;
                let n = r.count(n, 8)?;
                let mut inodes = Vec::with_capacity(n);
                for _ in 0..n {
                    inodes.push(r.u64()?);
                }
                let n = r.u32()? as usize;
                let n = r.count(n, 12)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let parent = r.u64()?;
                    entries.push((parent, r.bytes()?));
                }
                let n = r.u32()? as usize;
                let n = r.count(n, 8)?;
                let mut xattrs = Vec::with_capacity(n);
                for _ in 0..n {
                    xattrs.push(r.u64()?);
                }
                Reply::FsChanged {
                    version,
                    inodes,
                    entries,
                    xattrs,
                }
            }
            REPLY_SPACE => Reply::Space {
                total_bytes: r.u64()?,
                free_bytes: r.u64()?,
            },
            _ => return Err(ProtocolError("unknown reply kind")),
        };
        r.end()?;
        Ok((tag, reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fs_value_in_two_parts_is_the_bytes_of_the_whole_reply() {
        let read_hlc = Hlc {
            wall_us: 0x0102_0304_0506,
            logical: 7,
        };
        for reply in [&b""[..], b"x", &[9u8; 70_000][..], &[3u8; 1 << 20][..]] {
            for cut in [0, reply.len() / 3, reply.len()] {
                let [head, tail] = Reply::encode_fs_value_parts(
                    42,
                    17,
                    read_hlc,
                    |out| out.extend_from_slice(&reply[..cut]),
                    Bytes::copy_from_slice(&reply[cut..]),
                );
                assert_eq!(tail, reply[cut..]);
                let mut joined = head.to_vec();
                joined.extend_from_slice(&tail);
                let whole = Reply::FsValue {
                    read_version: 17,
                    read_hlc,
                    reply: Bytes::copy_from_slice(reply),
                }
                .encode(42);
                assert_eq!(joined, whole, "reply of {} bytes cut at {cut}", reply.len());
            }
        }
    }

    #[test]
    fn an_fs_value_written_in_place_encodes_as_the_reply_does() {
        let read_hlc = Hlc {
            wall_us: 0x0102_0304_0506,
            logical: 7,
        };
        for reply in [&b""[..], b"x", &[9u8; 70_000][..]] {
            for hint in [0, 3, reply.len() + 100] {
                let direct = Reply::encode_fs_value_with(42, 17, read_hlc, hint, |out| {
                    out.extend_from_slice(&reply[..reply.len() / 2]);
                    out.extend_from_slice(&reply[reply.len() / 2..]);
                });
                let whole = Reply::FsValue {
                    read_version: 17,
                    read_hlc,
                    reply: Bytes::copy_from_slice(reply),
                }
                .encode(42);
                assert_eq!(direct, whole);
                assert_eq!(
                    Reply::decode(direct).unwrap(),
                    (
                        42,
                        Reply::FsValue {
                            read_version: 17,
                            read_hlc,
                            reply: Bytes::copy_from_slice(reply)
                        }
                    )
                );
            }
        }
    }

    fn requests() -> Vec<Request> {
        vec![
            Request::Layout,
            Request::Write {
                hlc: Hlc {
                    wall_us: 5,
                    logical: 2,
                },
                durable: true,
                payload: Bytes::from_static(b"payload"),
            },
            Request::Get {
                key: Bytes::from_static(b"k"),
                at: ReadAt::Time(Hlc::at(9)),
                after: Some(3),
            },
            Request::Get {
                key: Bytes::from_static(b"k"),
                at: ReadAt::Version(7),
                after: None,
            },
            Request::History {
                key: Bytes::from_static(b"k"),
            },
            Request::Watch {
                prefix: Bytes::new(),
                shard: 0,
                after: None,
            },
            Request::Watch {
                prefix: Bytes::from_static(b"p/"),
                shard: 3,
                after: Some(41),
            },
            Request::Status,
            Request::FsSubmit {
                shard: SubgroupShard {
                    data: true,
                    index: 3,
                },
                hlc: Hlc::at(11),
                durable: false,
                payload: Bytes::from_static(b"\x02request"),
            },
            Request::FsRead {
                shard: SubgroupShard {
                    data: false,
                    index: 0,
                },
                at: ReadAt::Latest,
                after: Some(12),
                request: Bytes::from_static(b"read"),
            },
            Request::FsReadBarrier {
                shard: SubgroupShard {
                    data: true,
                    index: 2,
                },
                request: Bytes::from_static(b"open"),
            },
            Request::FsSync {
                shard: SubgroupShard {
                    data: true,
                    index: 1,
                },
                version: 13,
            },
            Request::Space,
            Request::FsWatch,
        ]
    }

    fn replies() -> Vec<Reply> {
        vec![
            Reply::Layout(LayoutInfo {
                view_id: 3,
                members: vec![(1, "127.0.0.1:7071".parse().unwrap())],
                shards: vec![ShardInfo {
                    id: 1,
                    data: true,
                    index: 0,
                    members: vec![1, 2, 3],
                }],
                chunk_size: 1 << 20,
            }),
            Reply::Written(KvReply::Conflict { current: Some(4) }),
            Reply::Value {
                read_version: Some(9),
                found: Some(Versioned {
                    value: Bytes::from_static(b"v"),
                    version: 8,
                    hlc: Hlc::at(4),
                }),
            },
            Reply::History {
                truncated: false,
                changes: vec![Change {
                    version: 1,
                    hlc: Hlc::at(2),
                    value_len: None,
                }],
            },
            Reply::Watching { from: 9 },
            Reply::Event(Event {
                version: 1,
                hlc: Hlc::at(1),
                key: Bytes::from_static(b"a"),
                value: Some(Bytes::from_static(b"b")),
            }),
            Reply::Status(NodeStatus {
                node_id: 1,
                view_id: 2,
                state: "active".into(),
                suspected: vec![3],
                shards: vec![ShardStatusInfo {
                    id: 0,
                    members: vec![1, 2],
                    last_delivered: Some((5, Hlc::at(6))),
                    persistence_frontier: None,
                    stability_frontier: Hlc::at(3),
                    persisted_here: Some(5),
                    pending_requests: 0,
                    versions: 1,
                    keys: 2,
                    catching_up: true,
                }],
            }),
            Reply::Error {
                code: ErrorCode::Wedged,
                message: "wedged".into(),
            },
            Reply::FsWritten {
                version: 5,
                hlc: Hlc::at(6),
                reply: Bytes::from_static(b"reply"),
            },
            Reply::FsValue {
                read_version: 7,
                read_hlc: Hlc::ZERO,
                reply: Bytes::from_static(b"value"),
            },
            Reply::FsSynced,
            Reply::FsChanged {
                version: 9,
                inodes: vec![1, 5, u64::MAX],
                entries: vec![(1, Bytes::from_static(b"f")), (5, Bytes::new())],
                xattrs: vec![5, 9],
            },
            Reply::FsChanged {
                version: 10,
                inodes: vec![],
                entries: vec![],
                xattrs: vec![],
            },
            Reply::Space {
                total_bytes: 10,
                free_bytes: 3,
            },
        ]
    }

    #[test]
    fn protocol_requests_and_replies_round_trip() {
        for (tag, request) in requests().into_iter().enumerate() {
            let b = request.encode(tag as u64);
            assert_eq!(tag_of(&b), Some(tag as u64));
            assert_eq!(Request::decode(b).unwrap(), (tag as u64, request));
        }
        for (tag, reply) in replies().into_iter().enumerate() {
            let b = reply.encode(tag as u64);
            assert_eq!(Reply::decode(b).unwrap(), (tag as u64, reply));
        }
    }

    #[test]
    fn protocol_fs_submit_is_encoded_in_place_as_the_general_encoder_does() {
        let shard = SubgroupShard {
            data: false,
            index: 0,
        };
        let direct = Request::encode_fs_submit(4, shard, Hlc::at(2), true, b"op");
        let general = Request::FsSubmit {
            shard,
            hlc: Hlc::at(2),
            durable: true,
            payload: Bytes::from_static(b"\x02op"),
        }
        .encode(4);
        assert_eq!(direct, general);
        let head = Request::encode_fs_submit_head(4, shard, Hlc::at(2), true, 2);
        assert_eq!(
            [&head[..], b"op"].concat(),
            direct,
            "the head, then the request"
        );
        let kv = Request::FsSubmit {
            shard,
            hlc: Hlc::at(2),
            durable: true,
            payload: Bytes::from_static(b"\x01op"),
        };
        assert!(Request::decode(kv.encode(1)).is_err());
    }

    #[test]
    fn protocol_garbage_is_refused_never_a_panic() {
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut messages: Vec<Bytes> = requests().iter().map(|r| r.encode(1)).collect();
        messages.extend(replies().iter().map(|r| r.encode(1)));
        for message in &messages {
            // Every truncation, and random byte flips.
            for len in 0..message.len() {
                let cut = message.slice(..len);
                let _ = Request::decode(cut.clone());
                let _ = Reply::decode(cut);
            }
            for _ in 0..200 {
                let mut m = message.to_vec();
                let at = (next() as usize) % m.len();
                m[at] = next() as u8;
                let _ = Request::decode(Bytes::from(m.clone()));
                let _ = Reply::decode(Bytes::from(m));
            }
        }
        let mut wrong = requests()[0].encode(1).to_vec();
        wrong[0] = PROTOCOL_VERSION + 1;
        assert!(Request::decode(Bytes::from(wrong)).is_err());
    }

    #[test]
    fn protocol_keys_map_to_shards_stably() {
        assert_eq!(data_shard_index(b"", 4), data_shard_index(b"", 4));
        assert_eq!(data_shard_index(b"anything", 1), 0);
        assert_eq!(data_shard_index(b"a", 0), 0);
        // FNV-1a of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            data_shard_index(b"a", 7),
            (0xaf63_dc4c_8601_ec8c_u64 % 7) as u16
        );
        assert_eq!(write_member_index(b"a", 0), 0);
    }

    #[test]
    fn the_writes_of_the_keys_of_each_shard_spread_over_all_its_members() {
        // Keys as clients name them; three data shards of three members. Picked from FNV-1a's
        // high half, the member followed the shard: every key of shard 0 went to member 1 or 2.
        let mut counts = [[0usize; 3]; 3];
        for i in 0..9000 {
            let key = format!("key-{i:08}");
            let shard = usize::from(data_shard_index(key.as_bytes(), 3));
            counts[shard][write_member_index(key.as_bytes(), 3)] += 1;
        }
        for (shard, members) in counts.iter().enumerate() {
            let total: usize = members.iter().sum();
            for (member, &n) in members.iter().enumerate() {
                assert!(
                    n * 4 > total && n * 2 < total,
                    "shard {shard}: member {member} takes {n} of {total} keys' writes"
                );
            }
        }
    }
}
