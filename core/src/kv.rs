//! The replicated K/V object store: the first state machine a shard runs.
//!
//! Every replica applies the same delivered versions in the same order, and [`KvStore::apply`]
//! decides each request against the state at its position in that order: a conditional put
//! succeeds only if the key's current version is the one the client read (as ZooKeeper's
//! versioned `setData` and Cascade's `previous_version`). The writes of a version become its
//! delta in the shard's log. Each client numbers its requests; the shard remembers, in the log
//! itself, the last number applied per client with its reply, so a request retried after a
//! failure is applied once and answered with the original reply.

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use derechofs_storage::{Hlc, Log, LogError, Version, Write};

/// Largest user key, in bytes (the log allows a little more for internal keys).
pub const KV_KEY_LEN_MAX: usize = 1024;
/// Largest value, in bytes.
pub const KV_VALUE_LEN_MAX: usize = 16 << 20;
/// First byte of the keys the store keeps for itself; user keys may not start with it.
pub const INTERNAL_KEY_PREFIX: u8 = 0xFF;
/// First byte of the keys of the other state machine that shares a shard's log (the file
/// system, `derechofs-fs`); user keys may not start with it either.
pub const SHARED_KEY_PREFIX: u8 = 0xFE;

/// Bytes one request may add to its version's delta beyond the bytes of its own payload: a
/// request carries its key and value with at least 17 bytes of header, and adds the key and value
/// (7 bytes of write header) and one client record (7 + 10 bytes of key, 8 of number, at most 21
/// of reply): 28 bytes more than its payload at most, rounded up.
pub const KV_REQUEST_DELTA_OVERHEAD_MAX: usize = 64;

/// Bytes of the delta [`KvStore::decide`] makes of one version's requests, at most, as the log
/// counts a record's payload: a version carries at most `BATCH_BYTES_MAX` bytes of requests and
/// `BATCH_REQUESTS_MAX` requests. The file system's share of a version is what this leaves of
/// `VERSION_DELTA_BYTES_MAX`.
pub const KV_VERSION_DELTA_BYTES_MAX: usize = 4
    + crate::bounds::BATCH_BYTES_MAX
    + crate::bounds::BATCH_REQUESTS_MAX * KV_REQUEST_DELTA_OVERHEAD_MAX;

const _: () = assert!(KV_VERSION_DELTA_BYTES_MAX < crate::bounds::VERSION_DELTA_BYTES_MAX);

/// A K/V operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvOp {
    /// Write `value` to `key`.
    Put {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
    },
    /// Write `value` to `key` only if the key's current version is `expected` (`None`: only if
    /// the key does not exist).
    CondPut {
        /// The key.
        key: Bytes,
        /// The new value.
        value: Bytes,
        /// The version the client read.
        expected: Option<Version>,
    },
    /// Delete `key`.
    Delete {
        /// The key.
        key: Bytes,
    },
}

impl KvOp {
    /// The key the operation writes.
    pub fn key(&self) -> &Bytes {
        match self {
            KvOp::Put { key, .. } | KvOp::CondPut { key, .. } | KvOp::Delete { key } => key,
        }
    }
}

/// A request: the operation with the client's id and its request number (from 1, one request
/// outstanding per client id at a time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvRequest {
    /// The client.
    pub client: u64,
    /// The request number.
    pub number: u64,
    /// The operation.
    pub op: KvOp,
}

/// The outcome of a request, identical at every replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvReply {
    /// The write was applied as (part of) `version`.
    Written {
        /// The version.
        version: Version,
        /// Its stamp.
        hlc: Hlc,
    },
    /// A conditional put found another current version (`None`: the key does not exist).
    Conflict {
        /// The key's current version.
        current: Option<Version>,
    },
    /// The request number is below the last one applied for this client: a stale retry whose
    /// reply is no longer kept.
    Stale {
        /// The last number applied for the client.
        last: u64,
    },
    /// The request was not well formed; nothing was written.
    Invalid {
        /// What is wrong.
        reason: String,
    },
}

/// What applying one version produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// One reply per request, in order.
    pub replies: Vec<KvReply>,
    /// The user keys the version changed, in key order, with their new values (`None`: deleted);
    /// the driver notifies watchers of them after delivery.
    pub changed: Vec<(Bytes, Option<Bytes>)>,
}

/// The writes of one version: keys with their new values (`None`: deleted), in key order.
pub type KvDelta = Vec<(Bytes, Option<Bytes>)>;

/// A value with the version that wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    /// The value.
    pub value: Bytes,
    /// The version that wrote it.
    pub version: Version,
    /// That version's stamp.
    pub hlc: Hlc,
}

/// Which state a read looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadAt {
    /// The latest delivered state.
    Latest,
    /// The state at a version.
    Version(Version),
    /// The state produced by exactly the versions stamped at or before a time.
    Time(Hlc),
}

/// Why a request could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad K/V request: {0}")]
pub struct KvDecodeError(pub &'static str);

const OP_PUT: u8 = 1;
const OP_CPUT: u8 = 2;
const OP_DELETE: u8 = 3;

impl KvRequest {
    /// Encodes the request as a request payload for the engine.
    pub fn encode(&self) -> Bytes {
        let key = self.op.key();
        let value_len = match &self.op {
            KvOp::Put { value, .. } | KvOp::CondPut { value, .. } => value.len(),
            KvOp::Delete { .. } => 0,
        };
        // Client and number, the op and a conditional put's expected version, then the two
        // lengths: allocated once, not grown as the value is copied in.
        let mut b = BytesMut::with_capacity(34 + key.len() + value_len);
        b.put_u64_le(self.client);
        b.put_u64_le(self.number);
        match &self.op {
            KvOp::Put { .. } => b.put_u8(OP_PUT),
            KvOp::CondPut { expected, .. } => {
                b.put_u8(OP_CPUT);
                b.put_u8(u8::from(expected.is_some()));
                b.put_u64_le(expected.unwrap_or(0));
            }
            KvOp::Delete { .. } => b.put_u8(OP_DELETE),
        }
        b.put_u32_le(key.len() as u32);
        b.put_slice(key);
        if let KvOp::Put { value, .. } | KvOp::CondPut { value, .. } = &self.op {
            b.put_u32_le(value.len() as u32);
            b.put_slice(value);
        }
        b.freeze()
    }

    /// Decodes a request payload; never panics, whatever the bytes.
    pub fn decode(mut b: Bytes) -> Result<KvRequest, KvDecodeError> {
        fn need(b: &Bytes, n: usize) -> Result<(), KvDecodeError> {
            if b.remaining() < n {
                Err(KvDecodeError("truncated"))
            } else {
                Ok(())
            }
        }
        need(&b, 17)?;
        let client = b.get_u64_le();
        let number = b.get_u64_le();
        let kind = b.get_u8();
        let expected = if kind == OP_CPUT {
            need(&b, 9)?;
            match b.get_u8() {
                0 => {
                    b.advance(8);
                    None
                }
                1 => Some(b.get_u64_le()),
                _ => return Err(KvDecodeError("bad expected-version flag")),
            }
        } else {
            None
        };
        need(&b, 4)?;
        let key_len = b.get_u32_le() as usize;
        if key_len == 0 || key_len > KV_KEY_LEN_MAX {
            return Err(KvDecodeError("key length out of range"));
        }
        need(&b, key_len)?;
        let key = b.split_to(key_len);
        if key[0] == INTERNAL_KEY_PREFIX || key[0] == SHARED_KEY_PREFIX {
            return Err(KvDecodeError(
                "keys starting with byte 0xFE or 0xFF are reserved",
            ));
        }
        let value = if kind == OP_PUT || kind == OP_CPUT {
            need(&b, 4)?;
            let len = b.get_u32_le() as usize;
            if len > KV_VALUE_LEN_MAX {
                return Err(KvDecodeError("value too large"));
            }
            need(&b, len)?;
            Some(b.split_to(len))
        } else {
            None
        };
        if b.has_remaining() {
            return Err(KvDecodeError("bytes after the request"));
        }
        let op = match (kind, value) {
            (OP_PUT, Some(value)) => KvOp::Put { key, value },
            (OP_CPUT, Some(value)) => KvOp::CondPut {
                key,
                value,
                expected,
            },
            (OP_DELETE, None) => KvOp::Delete { key },
            _ => return Err(KvDecodeError("unknown operation")),
        };
        Ok(KvRequest { client, number, op })
    }
}

impl KvReply {
    /// Encodes the reply (for the client, and for the per-client record in the log).
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(24);
        self.encode_into(&mut b);
        b.freeze()
    }

    /// Appends the encoded reply to `b` (as [`KvReply::encode`] gives it).
    pub fn encode_into(&self, b: &mut BytesMut) {
        match self {
            KvReply::Written { version, hlc } => {
                b.put_u8(1);
                b.put_u64_le(*version);
                b.put_u64_le(hlc.wall_us);
                b.put_u32_le(hlc.logical);
            }
            KvReply::Conflict { current } => {
                b.put_u8(2);
                b.put_u8(u8::from(current.is_some()));
                b.put_u64_le(current.unwrap_or(0));
            }
            KvReply::Stale { last } => {
                b.put_u8(3);
                b.put_u64_le(*last);
            }
            KvReply::Invalid { reason } => {
                b.put_u8(4);
                let r = &reason.as_bytes()[..reason.len().min(1024)];
                b.put_u16_le(r.len() as u16);
                b.put_slice(r);
            }
        }
    }

    /// Decodes a reply; never panics, whatever the bytes.
    pub fn decode(mut b: Bytes) -> Result<KvReply, KvDecodeError> {
        let short = KvDecodeError("truncated reply");
        if !b.has_remaining() {
            return Err(short);
        }
        let reply = match b.get_u8() {
            1 if b.remaining() == 20 => KvReply::Written {
                version: b.get_u64_le(),
                hlc: Hlc {
                    wall_us: b.get_u64_le(),
                    logical: b.get_u32_le(),
                },
            },
            2 if b.remaining() == 9 => {
                let has = b.get_u8();
                let v = b.get_u64_le();
                match has {
                    0 => KvReply::Conflict { current: None },
                    1 => KvReply::Conflict { current: Some(v) },
                    _ => return Err(KvDecodeError("bad conflict flag")),
                }
            }
            3 if b.remaining() == 8 => KvReply::Stale {
                last: b.get_u64_le(),
            },
            4 if b.remaining() >= 2 => {
                let len = b.get_u16_le() as usize;
                if b.remaining() != len {
                    return Err(short);
                }
                KvReply::Invalid {
                    reason: String::from_utf8_lossy(&b).into_owned(),
                }
            }
            _ => return Err(KvDecodeError("unknown or malformed reply")),
        };
        Ok(reply)
    }
}

fn client_key(client: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = INTERNAL_KEY_PREFIX;
    k[1] = b'c';
    k[2..].copy_from_slice(&client.to_be_bytes());
    k
}

/// The K/V state machine of one shard replica, over that replica's log.
#[derive(Debug)]
pub struct KvStore {
    log: Log,
}

impl KvStore {
    /// The store whose state is `log`.
    pub fn new(log: Log) -> KvStore {
        KvStore { log }
    }

    /// The log, for persistence and status.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The log, for persistence.
    pub fn log_mut(&mut self) -> &mut Log {
        &mut self.log
    }

    /// Applies one delivered version: decides every request in order against the state at this
    /// point of the log, then appends the version's delta. Deterministic: replicas that apply the
    /// same versions reply the same and hold the same log.
    pub fn apply(
        &mut self,
        version: Version,
        hlc: Hlc,
        payloads: &[Bytes],
    ) -> Result<Applied, LogError> {
        let (applied, delta) = self.decide(version, hlc, payloads)?;
        let writes: Vec<Write<'_>> = delta
            .iter()
            .map(|(k, v)| Write {
                key: k.as_ref(),
                value: v.as_deref(),
            })
            .collect();
        self.log.append(version, hlc, &writes)?;
        Ok(applied)
    }

    /// Decides every request of one version in order, as [`KvStore::apply`] does, without
    /// appending: returns the replies and the version's delta (user keys and the per-client
    /// records, in key order), for a caller that appends it together with the delta of another
    /// machine sharing the log (whose keys start with [`SHARED_KEY_PREFIX`]).
    pub fn decide(
        &self,
        version: Version,
        hlc: Hlc,
        payloads: &[Bytes],
    ) -> Result<(Applied, KvDelta), LogError> {
        // Writes of this version so far, which later requests of the same version must see.
        let mut writes: BTreeMap<Bytes, Option<Bytes>> = BTreeMap::new();
        let mut clients: BTreeMap<u64, (u64, KvReply)> = BTreeMap::new();
        let mut replies = Vec::with_capacity(payloads.len());
        for payload in payloads {
            let request = match KvRequest::decode(payload.clone()) {
                Ok(r) => r,
                Err(e) => {
                    replies.push(KvReply::Invalid {
                        reason: e.0.to_owned(),
                    });
                    continue;
                }
            };
            let last = match clients.get(&request.client) {
                Some(x) => Some(x.clone()),
                None => self.last_of(request.client)?,
            };
            if let Some((number, reply)) = last {
                if request.number == number {
                    replies.push(reply);
                    continue;
                }
                if request.number < number {
                    replies.push(KvReply::Stale { last: number });
                    continue;
                }
            }
            let written = KvReply::Written { version, hlc };
            let reply = match request.op {
                KvOp::Put { key, value } => {
                    writes.insert(key, Some(value));
                    written
                }
                KvOp::Delete { key } => {
                    writes.insert(key, None);
                    written
                }
                KvOp::CondPut {
                    key,
                    value,
                    expected,
                } => {
                    let current = match writes.get(&key) {
                        Some(Some(_)) => Some(version),
                        Some(None) => None,
                        None => self.current_version(&key)?,
                    };
                    if current == expected {
                        writes.insert(key, Some(value));
                        written
                    } else {
                        KvReply::Conflict { current }
                    }
                }
            };
            clients.insert(request.client, (request.number, reply.clone()));
            replies.push(reply);
        }
        let changed: Vec<(Bytes, Option<Bytes>)> = writes.into_iter().collect();
        // User keys never start with 0xFF, so the client records sort after them.
        let mut delta = changed.clone();
        delta.extend(clients.iter().map(|(client, (number, reply))| {
            let mut b = BytesMut::with_capacity(8 + 24);
            b.put_u64_le(*number);
            reply.encode_into(&mut b);
            (
                Bytes::copy_from_slice(&client_key(*client)),
                Some(b.freeze()),
            )
        }));
        Ok((Applied { replies, changed }, delta))
    }

    fn last_of(&self, client: u64) -> Result<Option<(u64, KvReply)>, LogError> {
        let Some(mut record) = self.log.get_latest(&client_key(client))? else {
            return Ok(None);
        };
        if record.len() < 8 {
            return Ok(None);
        }
        let number = record.get_u64_le();
        // The record was written by this code; one that does not decode is treated as absent.
        Ok(KvReply::decode(record).ok().map(|reply| (number, reply)))
    }

    fn current_version(&self, key: &[u8]) -> Result<Option<Version>, LogError> {
        if self.log.get_latest(key)?.is_none() {
            return Ok(None);
        }
        Ok(self.log.key_version(key, Version::MAX)?.map(|(v, _)| v))
    }

    /// The version that reads at `at` look at, or `None` when nothing existed yet.
    pub fn version_of(&self, at: ReadAt) -> Result<Option<Version>, LogError> {
        match at {
            ReadAt::Latest => Ok(self.log.latest().map(|l| l.0)),
            ReadAt::Version(v) => Ok(Some(v)),
            ReadAt::Time(t) => self.log.version_at(t),
        }
    }

    /// The value of `key` at `at`, with the version that wrote it.
    pub fn get(&self, key: &[u8], at: ReadAt) -> Result<Option<Versioned>, LogError> {
        if matches!(
            key.first(),
            Some(&(INTERNAL_KEY_PREFIX | SHARED_KEY_PREFIX))
        ) {
            return Ok(None);
        }
        let Some(v) = self.version_of(at)? else {
            return Ok(None);
        };
        let Some(value) = self.log.get(key, v)? else {
            return Ok(None);
        };
        let Some((version, hlc)) = self.log.key_version(key, v)? else {
            return Ok(None);
        };
        Ok(Some(Versioned {
            value,
            version,
            hlc,
        }))
    }

    /// Every change of `key` still held, oldest first.
    pub fn history(&self, key: &[u8]) -> Vec<derechofs_storage::Change> {
        if matches!(
            key.first(),
            Some(&(INTERNAL_KEY_PREFIX | SHARED_KEY_PREFIX))
        ) {
            return Vec::new();
        }
        self.log.history(key)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use derechofs_storage::backend::MemoryBackend;
    use derechofs_storage::LogConfig;

    use super::*;

    fn store() -> KvStore {
        let config = LogConfig {
            segment_bytes: 1 << 20,
            ..LogConfig::default()
        };
        let log = Log::open(Arc::new(MemoryBackend::new()), config).unwrap();
        KvStore::new(log)
    }

    fn put(client: u64, number: u64, key: &str, value: &str) -> Bytes {
        KvRequest {
            client,
            number,
            op: KvOp::Put {
                key: key.to_owned().into(),
                value: value.to_owned().into(),
            },
        }
        .encode()
    }

    fn cput(client: u64, number: u64, key: &str, value: &str, expected: Option<u64>) -> Bytes {
        KvRequest {
            client,
            number,
            op: KvOp::CondPut {
                key: key.to_owned().into(),
                value: value.to_owned().into(),
                expected,
            },
        }
        .encode()
    }

    fn delta_len(delta: &KvDelta) -> usize {
        let writes: Vec<Write<'_>> = delta
            .iter()
            .map(|(k, v)| Write {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        derechofs_storage::record::payload_len(&writes).unwrap()
    }

    #[test]
    fn a_version_delta_stays_within_its_payload_plus_the_per_request_overhead() {
        let s = store();
        let bound = |payloads: &[Bytes]| {
            4 + payloads.iter().map(Bytes::len).sum::<usize>()
                + payloads.len() * KV_REQUEST_DELTA_OVERHEAD_MAX
        };
        // Many tiny requests of distinct clients: the overhead per request dominates.
        let tiny: Vec<Bytes> = (0..crate::bounds::BATCH_REQUESTS_MAX as u64)
            .map(|c| put(c, u64::MAX, &format!("{c:x}"), ""))
            .chain((0..64).map(|c| {
                KvRequest {
                    client: 1 << 40 | c,
                    number: 1,
                    op: KvOp::Delete {
                        key: Bytes::from_static(b"d"),
                    },
                }
                .encode()
            }))
            .chain((0..64).map(|c| cput(1 << 41 | c, 1, "k", "", None)))
            .collect();
        let (_, delta) = s.decide(1, Hlc::at(1), &tiny).unwrap();
        assert!(delta_len(&delta) <= bound(&tiny));
        // One request as large as a request may be.
        let big = vec![KvRequest {
            client: 7,
            number: 1,
            op: KvOp::Put {
                key: Bytes::from_static(b"big"),
                value: Bytes::from(vec![1u8; crate::bounds::REQUEST_BYTES_MAX - 64]),
            },
        }
        .encode()];
        let (_, delta) = s.decide(2, Hlc::at(2), &big).unwrap();
        assert!(delta_len(&delta) <= bound(&big));
    }

    #[test]
    fn a_conditional_put_succeeds_only_against_the_version_the_client_read() {
        let mut s = store();
        let h = |w| Hlc::at(w);
        let a = s.apply(10, h(1), &[put(1, 1, "k", "a")]).unwrap();
        assert_eq!(
            a.replies,
            vec![KvReply::Written {
                version: 10,
                hlc: h(1)
            }]
        );
        let b = s.apply(
            11,
            h(2),
            &[
                cput(2, 1, "k", "b", Some(10)),
                cput(3, 1, "k", "c", Some(10)),
            ],
        );
        let b = b.unwrap();
        // The second request sees the first one's write inside the same version.
        assert_eq!(
            b.replies[0],
            KvReply::Written {
                version: 11,
                hlc: h(2)
            }
        );
        assert_eq!(b.replies[1], KvReply::Conflict { current: Some(11) });
        assert_eq!(s.get(b"k", ReadAt::Latest).unwrap().unwrap().value, "b");
        assert_eq!(
            s.get(b"k", ReadAt::Version(10)).unwrap().unwrap().value,
            "a"
        );
        assert_eq!(
            s.get(b"k", ReadAt::Time(h(1))).unwrap().unwrap().version,
            10
        );
    }

    #[test]
    fn a_conditional_create_fails_when_the_key_exists_and_succeeds_after_a_delete() {
        let mut s = store();
        s.apply(1, Hlc::at(1), &[put(1, 1, "k", "a")]).unwrap();
        let r = s
            .apply(2, Hlc::at(2), &[cput(1, 2, "k", "b", None)])
            .unwrap();
        assert_eq!(r.replies[0], KvReply::Conflict { current: Some(1) });
        let del = KvRequest {
            client: 1,
            number: 3,
            op: KvOp::Delete { key: "k".into() },
        };
        s.apply(3, Hlc::at(3), &[del.encode()]).unwrap();
        assert_eq!(s.get(b"k", ReadAt::Latest).unwrap(), None);
        let r = s
            .apply(4, Hlc::at(4), &[cput(1, 4, "k", "c", None)])
            .unwrap();
        assert_eq!(
            r.replies[0],
            KvReply::Written {
                version: 4,
                hlc: Hlc::at(4)
            }
        );
    }

    #[test]
    fn a_retried_request_applies_once_and_gets_the_original_reply() {
        let mut s = store();
        let first = s.apply(1, Hlc::at(1), &[put(7, 1, "k", "a")]).unwrap();
        s.apply(2, Hlc::at(2), &[put(8, 1, "k", "b")]).unwrap();
        let retry = s.apply(3, Hlc::at(3), &[put(7, 1, "k", "a")]).unwrap();
        assert_eq!(retry.replies, first.replies);
        assert!(retry.changed.is_empty());
        assert_eq!(s.get(b"k", ReadAt::Latest).unwrap().unwrap().value, "b");
        let stale = s
            .apply(4, Hlc::at(4), &[put(7, 2, "k", "c"), put(7, 1, "k", "d")])
            .unwrap();
        assert_eq!(stale.replies[1], KvReply::Stale { last: 2 });
    }

    /// A reference for the store: the latest value and version of each key, and the last request
    /// number and reply of each client.
    #[derive(Default)]
    struct Model {
        keys: BTreeMap<String, (String, u64)>,
        clients: BTreeMap<u64, (u64, KvReply)>,
    }

    #[test]
    fn replicas_agree_with_each_other_and_with_a_reference_model() {
        let (mut a, mut b, mut model) = (store(), store(), Model::default());
        let mut history: Vec<BTreeMap<String, (String, u64)>> = vec![BTreeMap::new()];
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let next = |x: &mut u64| {
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *x
        };
        let mut numbers = [0u64; 5];
        for v in 1..300u64 {
            let mut batch = Vec::new();
            let mut expect = Vec::new();
            for _ in 0..(1 + v % 4) {
                let r = next(&mut x);
                let key = format!("k{}", r % 7);
                let client = (r >> 8) % 5;
                // Mostly fresh numbers, sometimes a retry of the last one.
                if r % 11 != 0 || numbers[client as usize] == 0 {
                    numbers[client as usize] += 1;
                }
                let number = numbers[client as usize];
                let value = format!("{v}.{r}");
                let expected = match (r >> 16) % 3 {
                    0 => None,
                    1 => model.keys.get(&key).map(|e| e.1),
                    _ => Some(v.saturating_sub(2)),
                };
                let is_put = r % 2 == 0;
                batch.push(if is_put {
                    put(client, number, &key, &value)
                } else {
                    cput(client, number, &key, &value, expected)
                });
                let reply = match model.clients.get(&client) {
                    Some((n, reply)) if *n == number => reply.clone(),
                    _ => {
                        let current = model.keys.get(&key).map(|e| e.1);
                        let reply = if is_put || current == expected {
                            model.keys.insert(key.clone(), (value, v));
                            KvReply::Written {
                                version: v,
                                hlc: Hlc::at(v),
                            }
                        } else {
                            KvReply::Conflict { current }
                        };
                        model.clients.insert(client, (number, reply.clone()));
                        reply
                    }
                };
                expect.push(reply);
            }
            let ra = a.apply(v, Hlc::at(v), &batch).unwrap();
            let rb = b.apply(v, Hlc::at(v), &batch).unwrap();
            assert_eq!(ra, rb, "replicas differ at version {v}");
            assert_eq!(ra.replies, expect, "store and model differ at version {v}");
            history.push(model.keys.clone());
        }
        for (v, state) in history.iter().enumerate().skip(1) {
            for k in 0..7 {
                let key = format!("k{k}");
                let got = a.get(key.as_bytes(), ReadAt::Version(v as u64)).unwrap();
                let got = got.map(|g| (String::from_utf8(g.value.to_vec()).unwrap(), g.version));
                assert_eq!(got, state.get(&key).cloned(), "key {key} at version {v}");
            }
        }
    }

    #[test]
    fn garbage_requests_are_invalid_and_write_nothing_but_the_version() {
        let mut s = store();
        let mut x = 99u64;
        for v in 1..300u64 {
            let mut junk = Vec::new();
            for _ in 0..(x % 40) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                junk.push(x as u8);
            }
            let r = s.apply(v, Hlc::at(v), &[Bytes::from(junk)]).unwrap();
            assert!(matches!(
                r.replies[0],
                KvReply::Invalid { .. } | KvReply::Written { .. }
            ));
        }
        assert_eq!(s.log().version_count(), 299);
    }

    #[test]
    fn keys_of_the_store_and_of_the_file_system_are_refused_as_user_keys() {
        for first in [INTERNAL_KEY_PREFIX, SHARED_KEY_PREFIX] {
            let r = KvRequest {
                client: 1,
                number: 1,
                op: KvOp::Delete {
                    key: Bytes::from(vec![first, b'I']),
                },
            };
            assert!(
                KvRequest::decode(r.encode()).is_err(),
                "first byte {first:#x}"
            );
        }
        let mut s = store();
        let fs_key = [SHARED_KEY_PREFIX, b'I'];
        s.log_mut()
            .append(1, Hlc::at(1), &[Write::put(&fs_key, b"inode")])
            .unwrap();
        assert_eq!(s.get(&fs_key, ReadAt::Latest).unwrap(), None);
        assert!(s.history(&fs_key).is_empty());
    }

    #[test]
    fn every_request_and_reply_round_trips() {
        let reqs = [
            KvRequest {
                client: 1,
                number: 2,
                op: KvOp::Put {
                    key: "a".into(),
                    value: "".into(),
                },
            },
            KvRequest {
                client: u64::MAX,
                number: 0,
                op: KvOp::CondPut {
                    key: "b".into(),
                    value: "v".into(),
                    expected: Some(5),
                },
            },
            KvRequest {
                client: 0,
                number: 1,
                op: KvOp::Delete { key: "c".into() },
            },
        ];
        for r in reqs {
            assert_eq!(KvRequest::decode(r.encode()), Ok(r));
        }
        let replies = [
            KvReply::Written {
                version: 3,
                hlc: Hlc {
                    wall_us: 4,
                    logical: 5,
                },
            },
            KvReply::Conflict { current: None },
            KvReply::Conflict { current: Some(9) },
            KvReply::Stale { last: 3 },
            KvReply::Invalid { reason: "x".into() },
        ];
        for r in replies {
            assert_eq!(KvReply::decode(r.encode()), Ok(r));
        }
    }
}
