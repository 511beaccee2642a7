//! The state machines of one shard replica, over its one log: the K/V store
//! (`derechofs_core::kv`) and the file system (`derechofs_fs::shard`).
//!
//! Every request payload the nodes multicast starts with a machine byte
//! ([`MACHINE_KV`] or [`MACHINE_FS`], `docs/FORMATS.md`); the rest is that machine's request.
//! A delivered version's requests are split by that byte, each machine decides its own in their
//! order against the log's latest state, and the two deltas are appended as the version's one
//! record. The machines' keys never overlap (file system keys start with `0xFE`, the K/V store's
//! own with `0xFF`, and K/V user keys may start with neither), so the order between the two
//! machines' requests inside a version changes nothing: every replica replies the same and
//! appends the same delta.

use bytes::Bytes;
use derechofs_core::kv::KV_VERSION_DELTA_BYTES_MAX;
use derechofs_core::kv::{KvReply, KvStore, ReadAt};
use derechofs_core::protocol::{MACHINE_FS, MACHINE_KV};
use derechofs_core::transport::Payload;
use derechofs_core::VERSION_DELTA_BYTES_MAX;
use derechofs_core::{Hlc, Version};
use derechofs_fs::chunk::{ChunkCache, CHUNK_CACHE_BYTES_DEFAULT};
use derechofs_fs::op::ReadReply;
use derechofs_fs::shard::{apply_batch_within, FS_REQUEST_DELTA_BYTES_MAX};
use derechofs_storage::record::payload_len;
use derechofs_storage::{Log, LogError, Write};

/// Bytes read from which a file system read's reply carries them as a part of their own, written
/// to the socket from where they are, instead of copying them into the message (below it, the
/// copy costs less than a part of its own: a 4 KiB read is copied).
pub const SHARED_READ_BYTES_MIN: usize = 64 << 10;

/// One request's reply, by the machine that applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A K/V reply (also the answer to a payload with an unknown machine byte: `Invalid`).
    Kv(KvReply),
    /// A file system reply, encoded.
    Fs(Bytes),
}

/// What applying one version produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// One reply per request, in order.
    pub replies: Vec<Outcome>,
    /// The K/V user keys the version changed, for watches.
    pub changed: Vec<(Bytes, Option<Bytes>)>,
    /// The file system inodes whose records the version changed (ascending, each once), for
    /// the namespace feed (`FsWatch`).
    pub fs_inodes: Vec<u64>,
    /// The directory entries (directory, name) the version changed, in key order, for the
    /// namespace feed.
    pub fs_entries: Vec<(u64, Bytes)>,
    /// The inodes any of whose extended attributes the version wrote or deleted (ascending,
    /// each once), for the namespace feed.
    pub fs_xattrs: Vec<u64>,
}

/// The machines of one shard replica.
#[derive(Debug)]
pub struct Machine {
    kv: KvStore,
    chunk_size: u32,
    /// Whole chunks assembled by earlier reads (keyed by version, so never stale).
    cache: ChunkCache,
}

impl Machine {
    /// The machines over `log`, in a layout with file chunks of `chunk_size` bytes, which the
    /// node checked at its start ([`super::fs_chunk_size`]).
    pub fn new(log: Log, chunk_size: u32) -> Machine {
        assert!(
            derechofs_fs::chunk::check_chunk_size(chunk_size).is_ok(),
            "chunk size {chunk_size} was not checked"
        );
        Machine {
            kv: KvStore::new(log),
            chunk_size,
            cache: ChunkCache::new(CHUNK_CACHE_BYTES_DEFAULT),
        }
    }

    /// The K/V store, for its reads.
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// The log.
    pub fn log(&self) -> &Log {
        self.kv.log()
    }

    /// The log, for persistence.
    pub fn log_mut(&mut self) -> &mut Log {
        self.kv.log_mut()
    }

    /// Applies one delivered version and appends its delta. `Err` is a failure of the log: the
    /// replica must stop.
    pub fn apply(
        &mut self,
        version: Version,
        hlc: Hlc,
        payloads: &[Bytes],
    ) -> Result<Applied, LogError> {
        let mut kv = Vec::new();
        let mut fs = Vec::new();
        for p in payloads {
            match p.first() {
                Some(&MACHINE_KV) => kv.push(p.slice(1..)),
                Some(&MACHINE_FS) => fs.push(p.slice(1..)),
                _ => {}
            }
        }
        let (kv_applied, kv_delta) = if kv.is_empty() {
            Default::default()
        } else {
            self.kv.decide(version, hlc, &kv)?
        };
        let kv_writes: Vec<Write<'_>> = kv_delta
            .iter()
            .map(|(k, v)| Write {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        // What the K/V requests use of the version's delta (with the record's 4-byte count);
        // by the bounds on a version's requests at most KV_VERSION_DELTA_BYTES_MAX, which leaves
        // the file system room for at least one request.
        let kv_len = payload_len(&kv_writes).map_err(|(what, len, max)| LogError::TooLarge {
            what,
            len,
            max,
        })?;
        debug_assert!(kv_len <= KV_VERSION_DELTA_BYTES_MAX);
        let fs_applied = if fs.is_empty() {
            Default::default()
        } else {
            let budget = VERSION_DELTA_BYTES_MAX
                .saturating_sub(kv_len)
                .max(FS_REQUEST_DELTA_BYTES_MAX);
            apply_batch_within(self.kv.log(), hlc, self.chunk_size, &fs, budget)?
        };
        let mut writes: Vec<Write<'_>> =
            Vec::with_capacity(kv_writes.len() + fs_applied.delta.len());
        writes.extend(fs_applied.delta.iter().map(|(k, v)| Write {
            key: k,
            value: v.as_deref(),
        }));
        writes.extend(kv_writes);
        self.kv.log_mut().append(version, hlc, &writes)?;
        let mut fs_inodes: Vec<u64> = fs_applied
            .delta
            .iter()
            .filter_map(|(k, _)| derechofs_fs::key::inode_of(k))
            .collect();
        fs_inodes.sort_unstable();
        fs_inodes.dedup();
        let mut fs_entries: Vec<(u64, Bytes)> = fs_applied
            .delta
            .iter()
            .filter_map(|(k, _)| {
                derechofs_fs::key::dirent_of(k)
                    .map(|(parent, name)| (parent, Bytes::copy_from_slice(name)))
            })
            .collect();
        fs_entries.sort_unstable();
        fs_entries.dedup();
        let mut fs_xattrs: Vec<u64> = fs_applied
            .delta
            .iter()
            .filter_map(|(k, _)| derechofs_fs::key::xattr_inode_of(k))
            .collect();
        fs_xattrs.sort_unstable();
        fs_xattrs.dedup();
        let mut kv_replies = kv_applied.replies.into_iter();
        let mut fs_replies = fs_applied.replies.into_iter();
        let replies = payloads
            .iter()
            .map(|p| {
                let next = match p.first() {
                    Some(&MACHINE_KV) => kv_replies.next().map(Outcome::Kv),
                    Some(&MACHINE_FS) => fs_replies.next().map(Outcome::Fs),
                    _ => None,
                };
                next.unwrap_or_else(|| {
                    Outcome::Kv(KvReply::Invalid {
                        reason: "unknown state machine byte".into(),
                    })
                })
            })
            .collect();
        Ok(Applied {
            replies,
            changed: kv_applied.changed,
            fs_inodes,
            fs_entries,
            fs_xattrs,
        })
    }

    /// Answers an encoded file system read at `at` from this replica's state, with the version
    /// read (for `Latest`, else 0) and a stamp the client may count as seen (the latest
    /// version's for `Latest`, the time for `Time`). The caller waits first, for a time, until
    /// the stability frontier passed it.
    #[cfg(test)]
    pub fn read_fs(&self, at: ReadAt, request: &Bytes) -> (Version, Hlc, Bytes) {
        let reply = derechofs_fs::shard::serve_read_cached(
            self.log(),
            at,
            self.chunk_size,
            &self.cache,
            request,
        );
        let (version, seen) = self.read_position(at);
        (version, seen, reply)
    }

    /// [`Machine::read_fs`] as the client's whole reply message with `tag` (`Reply::FsValue`):
    /// bytes read of at least [`SHARED_READ_BYTES_MIN`] as a part of their own (not copied),
    /// smaller ones copied once, straight into the message.
    pub fn read_fs_message(&mut self, tag: u64, at: ReadAt, request: &Bytes) -> Payload {
        if derechofs_fs::op::is_plan_read(request) {
            // A plan names bytes in the log's files: records still in its write buffer go
            // there first (a write, no sync). A failure poisons the log, which its next sync
            // reports; the plan then names nothing it cannot find.
            let _ = self.log_mut().flush_buffer();
        }
        let answer = derechofs_fs::shard::answer_read_cached(
            self.log(),
            at,
            self.chunk_size,
            &self.cache,
            request,
        );
        let (version, seen) = self.read_position(at);
        if let Ok(ReadReply::Bytes(bytes)) = &answer {
            if bytes.len() >= SHARED_READ_BYTES_MIN {
                // The bytes go to the socket from where they are (the log's mapping, the chunk
                // cache), not copied into the message: the same bytes on the wire.
                let len = bytes.len();
                let parts = derechofs_core::protocol::Reply::encode_fs_value_parts(
                    tag,
                    version,
                    seen,
                    |out| derechofs_fs::op::put_read_reply_bytes_head(out, len),
                    bytes.clone(),
                );
                return Payload::from_parts(parts.into());
            }
        }
        let hint = derechofs_fs::op::read_reply_len_hint(&answer);
        Payload::new(derechofs_core::protocol::Reply::encode_fs_value_with(
            tag,
            version,
            seen,
            hint,
            |out| derechofs_fs::op::put_read_reply(out, &answer),
        ))
    }

    /// The version read (for `Latest`, else 0) and the stamp a read at `at` answers (see
    /// [`Machine::read_fs`]).
    fn read_position(&self, at: ReadAt) -> (Version, Hlc) {
        match at {
            ReadAt::Latest => self.log().latest().unwrap_or((0, Hlc::ZERO)),
            ReadAt::Time(t) => (0, t),
            ReadAt::Version(_) => (0, Hlc::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use derechofs_core::kv::{KvOp, KvRequest};
    use derechofs_fs::op::{
        decode_read_reply, DataOp, DataRead, DataReply, NsOp, NsRead, Op, ReadReply, Reply, Request,
    };
    use derechofs_fs::Creds;
    use derechofs_storage::backend::MemoryBackend;
    use derechofs_storage::LogConfig;

    use super::*;

    #[test]
    fn a_read_message_is_the_whole_reply_whether_its_bytes_are_copied_or_a_part_of_their_own() {
        let mut m = machine();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let applied = m
            .apply(
                1,
                Hlc::at(1),
                &[write(1, 1, 100, 0, Bytes::from(data.clone()))],
            )
            .unwrap();
        assert!(matches!(&applied.replies[0], Outcome::Fs(_)));
        for (offset, len) in [
            (0u32, 4096u32),
            (100, (SHARED_READ_BYTES_MIN - 1) as u32),
            (0, SHARED_READ_BYTES_MIN as u32),
            (4096, 128 << 10),
            (0, 1 << 20),
        ] {
            let request = DataRead::Chunk {
                ino: 100,
                index: 0,
                offset,
                len,
            }
            .encode();
            let message = m.read_fs_message(42, ReadAt::Latest, &request);
            let joined: Vec<u8> = message.parts().iter().flat_map(|p| p.to_vec()).collect();
            assert_eq!(
                message.parts().len(),
                if len as usize >= SHARED_READ_BYTES_MIN {
                    2
                } else {
                    1
                },
                "parts of a read of {len} bytes"
            );
            let (read_version, read_hlc, reply) = m.read_fs(ReadAt::Latest, &request);
            let whole = derechofs_core::protocol::Reply::FsValue {
                read_version,
                read_hlc,
                reply: reply.clone(),
            }
            .encode(42);
            assert_eq!(joined, whole.to_vec(), "read of {len} bytes at {offset}");
            let Ok(ReadReply::Bytes(bytes)) = decode_read_reply(&reply).unwrap() else {
                panic!("the chunk did not read");
            };
            let range = offset as usize..(offset + len) as usize;
            assert!(bytes == data[range], "bytes of the read at {offset}");
        }
    }

    fn machine() -> Machine {
        let config = LogConfig {
            segment_bytes: 1 << 20,
            ..LogConfig::default()
        };
        let log = Log::open(Arc::new(MemoryBackend::new()), config).unwrap();
        Machine::new(log, 1 << 20)
    }

    fn tagged(machine: u8, body: &[u8]) -> Bytes {
        let mut b = vec![machine];
        b.extend_from_slice(body);
        Bytes::from(b)
    }

    /// File system request `number` of `client`, as the engine delivers it.
    fn fs_request(client: u64, number: u64, op: Op) -> Bytes {
        let r = Request { client, number, op };
        tagged(MACHINE_FS, &r.encode())
    }

    fn put(client: u64, number: u64, key: &[u8]) -> Bytes {
        let r = KvRequest {
            client,
            number,
            op: KvOp::Put {
                key: Bytes::copy_from_slice(key),
                value: Bytes::from_static(b"v"),
            },
        };
        tagged(MACHINE_KV, &r.encode())
    }

    fn mkdir(client: u64, number: u64, name: &str) -> Bytes {
        fs_request(
            client,
            number,
            Op::Ns(NsOp::Mkdir {
                parent: derechofs_fs::ROOT_INO,
                name: Bytes::copy_from_slice(name.as_bytes()),
                perm: 0o755,
                creds: Creds::default(),
            }),
        )
    }

    fn init(client: u64, number: u64) -> Bytes {
        fs_request(
            client,
            number,
            Op::Ns(NsOp::Init {
                creds: Creds::default(),
            }),
        )
    }

    fn write(client: u64, number: u64, ino: u64, offset: u32, data: Bytes) -> Bytes {
        fs_request(
            client,
            number,
            Op::Data(DataOp::Write {
                ino,
                index: 0,
                offset,
                data,
            }),
        )
    }

    #[test]
    fn a_version_reports_the_inodes_and_entries_its_file_system_delta_wrote_for_the_namespace_feed()
    {
        let mut m = machine();
        let h = |t| Hlc::at(t);
        let applied = m.apply(1, h(1), &[init(1, 1)]).unwrap();
        assert_eq!(applied.fs_inodes, vec![derechofs_fs::ROOT_INO]);
        assert!(applied.fs_entries.is_empty() && applied.fs_xattrs.is_empty());
        // Two directories and a K/V put in one version: the root (its nlink and times), both new
        // inodes, both entries; nothing of the K/V key.
        let applied = m
            .apply(
                2,
                h(2),
                &[mkdir(1, 2, "b"), put(9, 1, b"kv"), mkdir(2, 1, "a")],
            )
            .unwrap();
        assert_eq!(applied.fs_inodes.len(), 3, "{:?}", applied.fs_inodes);
        assert_eq!(applied.fs_inodes[0], derechofs_fs::ROOT_INO);
        assert!(applied.fs_inodes.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(
            applied.fs_entries,
            vec![
                (derechofs_fs::ROOT_INO, Bytes::from_static(b"a")),
                (derechofs_fs::ROOT_INO, Bytes::from_static(b"b")),
            ]
        );
        // A version of K/V requests only, and a refused change (the name exists): nothing.
        let applied = m.apply(3, h(3), &[put(9, 2, b"kv")]).unwrap();
        assert!(applied.fs_inodes.is_empty() && applied.fs_entries.is_empty());
        let applied = m.apply(4, h(4), &[mkdir(1, 3, "a")]).unwrap();
        assert!(applied.fs_inodes.is_empty() && applied.fs_entries.is_empty());
        assert!(applied.fs_xattrs.is_empty());
        // An extended attribute set and removed: its inode's attributes and record (ctime);
        // the versions before changed none.
        let root = derechofs_fs::ROOT_INO;
        let applied = m.apply(5, h(5), &[setxattr(1, 4, root)]).unwrap();
        assert_eq!(applied.fs_xattrs, vec![root]);
        assert_eq!(applied.fs_inodes, vec![root]);
        let applied = m.apply(6, h(6), &[removexattr(1, 5, root)]).unwrap();
        assert_eq!(applied.fs_xattrs, vec![root]);
        assert!(applied.fs_entries.is_empty());
    }

    fn setxattr(client: u64, number: u64, ino: u64) -> Bytes {
        fs_request(
            client,
            number,
            Op::Ns(NsOp::SetXattr {
                ino,
                name: Bytes::from_static(b"user.k"),
                value: Bytes::from_static(b"v"),
                flags: 0,
            }),
        )
    }

    fn removexattr(client: u64, number: u64, ino: u64) -> Bytes {
        fs_request(
            client,
            number,
            Op::Ns(NsOp::RemoveXattr {
                ino,
                name: Bytes::from_static(b"user.k"),
            }),
        )
    }

    /// The largest record payload of `m`'s log.
    fn largest_record(m: &mut Machine) -> usize {
        m.log_mut().sync().unwrap();
        let (records, _) = m
            .log()
            .read_records(None, Version::MAX, usize::MAX, usize::MAX, None)
            .unwrap();
        records.iter().map(|r| r.payload.len()).max().unwrap_or(0)
    }

    #[test]
    fn a_version_of_many_compacting_writes_stays_within_the_budget_and_applies_each_write_once() {
        // Chunks as large as a layout may have them, each full: a one-byte write to any of them
        // compacts it into a new base of a whole chunk. Without a budget, one version of such
        // writes (and two large K/V puts) makes a record above the log's 64 MiB limit: the
        // append fails on every replica.
        const FILES: u64 = 34;
        let chunk = derechofs_fs::chunk::CHUNK_SIZE_MAX;
        let config = LogConfig {
            segment_bytes: 256 << 20,
            ..LogConfig::default()
        };
        let log = Log::open(Arc::new(MemoryBackend::new()), config).unwrap();
        let mut m = Machine::new(log, chunk);
        let mut v = 0u64;
        for ino in 0..FILES {
            v += 1;
            let full = Bytes::from(vec![1u8; chunk as usize]);
            m.apply(v, Hlc::at(v), &[write(ino, 1, 100 + ino, 0, full)])
                .unwrap();
        }
        let big = |client: u64| {
            let r = KvRequest {
                client,
                number: 1,
                op: KvOp::Put {
                    key: Bytes::from(format!("big{client}")),
                    value: Bytes::from(vec![2u8; derechofs_core::REQUEST_BYTES_MAX - 64]),
                },
            };
            tagged(MACHINE_KV, &r.encode())
        };
        let mut pending: Vec<Bytes> = (0..FILES)
            .map(|ino| write(ino, 2, 100 + ino, ino as u32, Bytes::from(vec![9u8])))
            .collect();
        let mut first = vec![big(1000), big(1001)];
        first.extend(pending.iter().cloned());
        let mut batch = first;
        let mut versions = 0;
        while !batch.is_empty() {
            v += 1;
            versions += 1;
            assert!(versions <= FILES, "a version applied no write");
            let applied = m.apply(v, Hlc::at(v), &batch).unwrap();
            let mut retry = Vec::new();
            let mut applied_here = 0;
            for (p, r) in batch.iter().zip(&applied.replies) {
                match r {
                    Outcome::Kv(KvReply::Written { .. }) => {}
                    Outcome::Fs(bytes) => match Reply::decode(bytes).unwrap() {
                        Reply::Retry => retry.push(p.clone()),
                        Reply::Data(Ok(DataReply::Done)) => applied_here += 1,
                        other => panic!("unexpected reply {other:?}"),
                    },
                    other => panic!("unexpected reply {other:?}"),
                }
            }
            // The first file system request of every version applies, even beside 8 MiB of
            // K/V requests.
            assert!(applied_here >= 1, "version {v:#x} applied nothing");
            // Resent: later versions apply them, once each.
            pending.retain(|p| retry.contains(p));
            assert_eq!(pending, retry);
            batch = retry;
        }
        assert!(
            versions > 2,
            "the writes were meant to need several versions"
        );
        let largest = largest_record(&mut m);
        assert!(
            largest <= VERSION_DELTA_BYTES_MAX,
            "a record of {largest} bytes is above the budget"
        );
        // A repeat of an applied request (same client and number) is answered, not applied.
        let again = m
            .apply(
                v + 1,
                Hlc::at(v + 1),
                &[write(0, 2, 100, 0, Bytes::from(vec![7u8]))],
            )
            .unwrap();
        let Outcome::Fs(bytes) = &again.replies[0] else {
            panic!("a file system reply expected");
        };
        assert_eq!(
            Reply::decode(bytes).unwrap(),
            Reply::Data(Ok(DataReply::Done))
        );
        // Every write landed exactly once: each chunk reads as ones with one 9 at its offset,
        // as after one version per write.
        for ino in 0..FILES {
            let (_, _, reply) = m.read_fs(
                ReadAt::Latest,
                &DataRead::Chunk {
                    ino: 100 + ino,
                    index: 0,
                    offset: 0,
                    len: chunk,
                }
                .encode(),
            );
            let Ok(ReadReply::Bytes(bytes)) = decode_read_reply(&reply).unwrap() else {
                panic!("chunk {ino} did not read");
            };
            let mut expected = vec![1u8; chunk as usize];
            expected[ino as usize] = 9;
            assert!(bytes == expected, "chunk of inode {} differs", 100 + ino);
        }
    }

    #[test]
    fn a_version_mixing_kv_and_fs_requests_replies_in_order_and_replicas_agree() {
        let (mut a, mut b) = (machine(), machine());
        let batches = [
            vec![init(9, 1), put(1, 1, b"k")],
            vec![
                put(1, 2, b"k"),
                mkdir(9, 2, "d"),
                Bytes::from_static(b"\x07?"),
            ],
            vec![mkdir(9, 3, "d"), mkdir(9, 3, "d"), put(1, 2, b"k")],
        ];
        for (i, batch) in batches.iter().enumerate() {
            let v = i as u64 + 1;
            let ra = a.apply(v, Hlc::at(v), batch).unwrap();
            let rb = b.apply(v, Hlc::at(v), batch).unwrap();
            assert_eq!(ra, rb, "replicas differ at version {v}");
            assert_eq!(ra.replies.len(), batch.len());
            for (p, r) in batch.iter().zip(&ra.replies) {
                match (p[0], r) {
                    (MACHINE_KV, Outcome::Kv(KvReply::Written { .. })) => {}
                    (MACHINE_FS, Outcome::Fs(bytes)) => {
                        Reply::decode(bytes).expect("a file system reply");
                    }
                    (_, Outcome::Kv(KvReply::Invalid { .. })) => assert_eq!(p[0], 7),
                    other => panic!("unexpected reply {other:?} at version {v}"),
                }
            }
        }
        // The repeated mkdir (same client and number) got the first one's reply; a second
        // mkdir of the same name with a new number would be EEXIST.
        let third = a
            .apply(4, Hlc::at(4), &[mkdir(9, 3, "d"), mkdir(9, 4, "d")])
            .unwrap();
        let (Outcome::Fs(first), Outcome::Fs(second)) = (&third.replies[0], &third.replies[1])
        else {
            panic!("file system replies expected");
        };
        assert!(matches!(Reply::decode(first).unwrap(), Reply::Ns(Err(_))));
        match Reply::decode(second).unwrap() {
            Reply::Ns(Err(e)) => assert_eq!(e.errno, libc::EEXIST),
            other => panic!("expected EEXIST, got {other:?}"),
        }
        let (_, _, reply) = a.read_fs(
            ReadAt::Latest,
            &NsRead::Lookup {
                parent: derechofs_fs::ROOT_INO,
                name: Bytes::from_static(b"d"),
            }
            .encode(),
        );
        assert!(matches!(
            derechofs_fs::op::decode_read_reply(&reply).unwrap(),
            Ok(derechofs_fs::op::ReadReply::Attr(_))
        ));
        assert_eq!(
            a.kv().get(b"k", ReadAt::Latest).unwrap().unwrap().value,
            "v"
        );
        assert_eq!(a.log().version_count(), 4);
    }
}
