//! One shard's file system state machine: applies a delivered version's requests in order, with
//! the per-client deduplication that makes a retried request apply once, and answers reads at a
//! version or a time.
//!
//! The same machine serves the namespace shard and the data shards: a request carries either a
//! namespace or a data operation, and the keys of the two never overlap. [`FsShard`] owns the
//! replica's [`Log`]; [`apply_batch`] and [`serve_read`] work over any [`Store`].

use bytes::Bytes;
use derechofs_core::kv::ReadAt;
use derechofs_core::VERSION_DELTA_BYTES_MAX;
use derechofs_storage::record::WRITE_HEADER_LEN;
use derechofs_storage::{Hlc, Log, LogError, Version, Write};

use crate::chunk::{self, ChunkCache, CHUNK_CACHE_BYTES_DEFAULT};
use crate::codec::{put_varint, Reader};
use crate::error::FsError;
use crate::fs_err;
use crate::key;
use crate::namespace;
use crate::op::{encode_read_reply, DataRead, NsRead, Op, Reply, Request};
use crate::store::{Delta, Overlay, Store};

/// Bytes one request's changes may add to a version's delta, at most (as the log counts a
/// record's payload): a chunk's new base and its state, the client record, and room for a
/// truncation's [`chunk::TRUNCATE_DELETES_MAX`] deletions. A request whose changes would be
/// larger is answered E2BIG and changes nothing; by the bounds on request sizes, the chunk size
/// and the deletions of a truncation, no request can get there.
pub const FS_REQUEST_DELTA_BYTES_MAX: usize = chunk::CHUNK_SIZE_MAX as usize + (256 << 10);

// A version full of K/V requests leaves room for any one file system request: the first file
// system request of a version always applies.
const _: () = assert!(
    derechofs_core::kv::KV_VERSION_DELTA_BYTES_MAX + FS_REQUEST_DELTA_BYTES_MAX
        <= VERSION_DELTA_BYTES_MAX
);

/// What applying one version produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// One encoded [`Reply`] per request, in order.
    pub replies: Vec<Bytes>,
    /// The version's delta, in key order.
    pub delta: Delta,
}

/// Bytes a write of `value` to `key` adds to a record's payload.
fn write_cost(key: &[u8], value: Option<&Bytes>) -> usize {
    WRITE_HEADER_LEN + key.len() + value.map_or(0, Bytes::len)
}

/// [`apply_batch_within`] with the whole of [`VERSION_DELTA_BYTES_MAX`] for the file system.
pub fn apply_batch<S: Store + ?Sized>(
    store: &S,
    hlc: Hlc,
    chunk_size: u32,
    payloads: &[Bytes],
) -> Result<Applied, LogError> {
    apply_batch_within(
        store,
        hlc,
        chunk_size,
        payloads,
        VERSION_DELTA_BYTES_MAX - 4,
    )
}

/// Decides every request of one version against `store` (its latest state) in order, later
/// requests seeing the writes of earlier ones. Deterministic: the same store and payloads give
/// the same replies and delta at every replica. `Err` is a failure of the store: the replica
/// must stop.
///
/// The delta's writes add at most `budget` bytes to the version's record payload (at least
/// [`FS_REQUEST_DELTA_BYTES_MAX`]): a request whose changes would go over is not applied,
/// nothing is recorded for its client, and it is answered [`Reply::Retry`], so that its client
/// resends it into a later version. The first request that changes anything always fits.
pub fn apply_batch_within<S: Store + ?Sized>(
    store: &S,
    hlc: Hlc,
    chunk_size: u32,
    payloads: &[Bytes],
    budget: usize,
) -> Result<Applied, LogError> {
    assert!(
        budget >= FS_REQUEST_DELTA_BYTES_MAX,
        "a version's budget of {budget} bytes leaves no room for one request"
    );
    let mut overlay = Overlay::new(store);
    let mut replies = Vec::with_capacity(payloads.len());
    // Bytes the applied requests' writes add, counting a key written twice twice: at least what
    // the merged delta encodes to.
    let mut used = 0usize;
    for payload in payloads {
        let request = match Request::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                // Undecodable bytes are answered, never applied; the errno says the request was bad.
                let e = fs_err!(libc::EINVAL, "bad request: {e}");
                replies.push(Reply::Ns(Err(e)).encode());
                continue;
            }
        };
        let client_key = key::client(request.client);
        if let Some(record) = overlay.get(&client_key, Version::MAX)? {
            if let Some((number, reply)) = decode_client_record(&record) {
                if request.number == number {
                    replies.push(reply);
                    continue;
                }
                if request.number < number {
                    replies.push(Reply::Stale { last: number }.encode());
                    continue;
                }
            }
        }
        let (mut reply, mut delta) = match &request.op {
            Op::Ns(op) => {
                let (r, d) = namespace::apply(&overlay, hlc, op)?;
                (Reply::Ns(r), d)
            }
            Op::Data(op) => {
                let (r, d) = chunk::apply_framed(&overlay, hlc, chunk_size, op, Some(payload))?;
                (Reply::Data(r), d)
            }
        };
        let mut encoded = reply.encode();
        let record_cost = |reply: &Bytes| WRITE_HEADER_LEN + client_key.len() + 10 + reply.len();
        let mut cost = delta
            .iter()
            .map(|(k, v)| write_cost(k, v.as_ref()))
            .sum::<usize>()
            + record_cost(&encoded);
        if cost > FS_REQUEST_DELTA_BYTES_MAX {
            let e = fs_err!(
                libc::E2BIG,
                "the request would change {cost} bytes, above {FS_REQUEST_DELTA_BYTES_MAX}"
            );
            reply = match request.op {
                Op::Ns(_) => Reply::Ns(Err(e)),
                Op::Data(_) => Reply::Data(Err(e)),
            };
            delta = Vec::new();
            encoded = reply.encode();
            cost = record_cost(&encoded);
        }
        if used + cost > budget {
            replies.push(Reply::Retry.encode());
            continue;
        }
        used += cost;
        overlay.apply(delta);
        let mut record = Vec::with_capacity(10 + encoded.len());
        put_varint(&mut record, request.number);
        record.extend_from_slice(&encoded);
        overlay.apply(vec![(client_key, Some(Bytes::from(record)))]);
        replies.push(encoded);
    }
    Ok(Applied {
        replies,
        delta: overlay.into_writes().into_iter().collect(),
    })
}

fn decode_client_record(record: &Bytes) -> Option<(u64, Bytes)> {
    let mut r = Reader::new(record);
    let number = r.varint("number").ok()?;
    let at = record.len() - r.remaining();
    Some((number, record.slice(at..)))
}

/// The version a read at `at` looks at: `None` when the shard had nothing yet then. Errors: a
/// time before the trim horizon is ENOENT.
pub fn version_for<S: Store + ?Sized>(store: &S, at: ReadAt) -> Result<Option<Version>, FsError> {
    match at {
        ReadAt::Latest => Ok(Some(Version::MAX)),
        ReadAt::Version(v) => Ok(Some(v)),
        ReadAt::Time(t) => Ok(store.version_at(t)?),
    }
}

/// Answers an encoded read ([`NsRead`] or [`DataRead`]) at `at` with an encoded read reply.
/// The caller (the node) waits, for a read at a time, until the shard's stability frontier has
/// passed that time; then the answer can never change. Data reads assemble their chunk each
/// time; [`serve_read_cached`] keeps whole chunks in a replica's [`ChunkCache`].
pub fn serve_read<S: Store + ?Sized>(
    store: &S,
    at: ReadAt,
    chunk_size: u32,
    request: &Bytes,
) -> Bytes {
    encode_read_reply(&answer(store, at, chunk_size, None, request))
}

/// [`serve_read`] with data reads served through `cache`, which must belong to this store (one
/// cache per shard replica): reading the current state of a file with a long history then costs
/// what reading a file written once does.
pub fn serve_read_cached<S: Store + ?Sized>(
    store: &S,
    at: ReadAt,
    chunk_size: u32,
    cache: &ChunkCache,
    request: &Bytes,
) -> Bytes {
    encode_read_reply(&answer(store, at, chunk_size, Some(cache), request))
}

/// [`serve_read_cached`]'s answer before encoding (its bytes shared with the log and the
/// cache, not copied), for a caller that encodes it into a message of its own
/// ([`crate::op::put_read_reply`]).
pub fn answer_read_cached<S: Store + ?Sized>(
    store: &S,
    at: ReadAt,
    chunk_size: u32,
    cache: &ChunkCache,
    request: &Bytes,
) -> Result<crate::op::ReadReply, FsError> {
    answer(store, at, chunk_size, Some(cache), request)
}

fn answer<S: Store + ?Sized>(
    store: &S,
    at: ReadAt,
    chunk_size: u32,
    cache: Option<&ChunkCache>,
    request: &Bytes,
) -> Result<crate::op::ReadReply, FsError> {
    let version = version_for(store, at)?;
    if let Ok(read) = DataRead::decode(request) {
        return match version {
            Some(v) => chunk::read(store, v, chunk_size, cache, &read),
            None => Ok(crate::op::ReadReply::Bytes(Bytes::new())),
        };
    }
    let read = NsRead::decode(request).map_err(|e| fs_err!(libc::EINVAL, "bad read: {e}"))?;
    match version {
        Some(v) => namespace::read(store, v, &read),
        None => Err(fs_err!(libc::ENOENT, "nothing existed yet at {at:?}")),
    }
}

/// The file system state machine of one shard replica, over that replica's log.
#[derive(Debug)]
pub struct FsShard {
    log: Log,
    chunk_size: u32,
    cache: ChunkCache,
}

impl FsShard {
    /// The shard whose state is `log`, in a layout with chunks of `chunk_size` bytes, with a
    /// chunk cache of [`CHUNK_CACHE_BYTES_DEFAULT`].
    pub fn new(log: Log, chunk_size: u32) -> Result<FsShard, String> {
        chunk::check_chunk_size(chunk_size)?;
        Ok(FsShard {
            log,
            chunk_size,
            cache: ChunkCache::new(CHUNK_CACHE_BYTES_DEFAULT),
        })
    }

    /// The log, for persistence and status.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The log, for persistence.
    pub fn log_mut(&mut self) -> &mut Log {
        &mut self.log
    }

    /// Applies one delivered version and appends its delta; returns one encoded [`Reply`] per
    /// payload.
    pub fn apply(
        &mut self,
        version: Version,
        hlc: Hlc,
        payloads: &[Bytes],
    ) -> Result<Vec<Bytes>, LogError> {
        let applied = apply_batch(&self.log, hlc, self.chunk_size, payloads)?;
        let writes: Vec<Write<'_>> = applied
            .delta
            .iter()
            .map(|(k, v)| Write {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        self.log.append(version, hlc, &writes)?;
        Ok(applied.replies)
    }

    /// Answers an encoded read at `at` (data reads through the replica's chunk cache).
    pub fn read(&self, at: ReadAt, request: &Bytes) -> Bytes {
        serve_read_cached(&self.log, at, self.chunk_size, &self.cache, request)
    }
}
