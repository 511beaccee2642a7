//! A version may carry many requests: later ones must see the writes of earlier ones. A shard
//! that applies random requests in batches must answer and end exactly like one that applies
//! them one version each, and two replicas given the same versions must hold the same state.

use std::sync::Arc;

use bytes::Bytes;
use derechofs_core::VERSION_DELTA_BYTES_MAX;
use derechofs_fs::chunk::{CHUNK_SIZE_MAX, TRUNCATE_DELETES_MAX};
use derechofs_fs::key;
use derechofs_fs::op::{DataOp, DataReply, NsOp, Op, Reply, Request};
use derechofs_fs::{Creds, FileKind, FsShard, SetAttr, RENAME_EXCHANGE};
use derechofs_storage::backend::MemoryBackend;
use derechofs_storage::{version_of, Hlc, Log, LogConfig, SyncPolicy, Version};
use derechofs_tests::rng::Rng;

const CHUNK: u32 = 4096;
const NAMES: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];

fn shard() -> FsShard {
    let config = LogConfig {
        sync: SyncPolicy::None,
        segment_bytes: 1 << 20,
        ..LogConfig::default()
    };
    let log = Log::open(Arc::new(MemoryBackend::new()), config).unwrap();
    FsShard::new(log, CHUNK).unwrap()
}

fn random_request(rng: &mut Rng, client: u64, number: u64) -> Bytes {
    let ino = rng.between(1, 12);
    let parent = rng.between(1, 6);
    let name = Bytes::from_static(NAMES[rng.below(4) as usize]);
    let creds = Creds::default();
    let op = match rng.below(12) {
        0 => Op::Ns(NsOp::Init { creds }),
        1 | 2 => Op::Ns(NsOp::Create {
            parent,
            name,
            kind: FileKind::Regular,
            perm: 0o644,
            rdev: 0,
            creds,
        }),
        3 | 4 => Op::Ns(NsOp::Mkdir {
            parent,
            name,
            perm: 0o755,
            creds,
        }),
        5 => Op::Ns(NsOp::Unlink { parent, name }),
        6 => Op::Ns(NsOp::Rmdir { parent, name }),
        7 => Op::Ns(NsOp::Rename {
            parent,
            name,
            new_parent: rng.between(1, 6),
            new_name: Bytes::from_static(NAMES[rng.below(4) as usize]),
            flags: if rng.chance(20) { RENAME_EXCHANGE } else { 0 },
        }),
        8 => Op::Ns(NsOp::SetAttr {
            ino,
            set: SetAttr {
                size: rng.chance(50).then(|| rng.below(3 * u64::from(CHUNK))),
                perm: Some(0o600),
                ..SetAttr::default()
            },
        }),
        9 => Op::Data(DataOp::Write {
            ino,
            index: rng.below(3),
            offset: rng.below(4000) as u32,
            data: Bytes::from(vec![rng.next_u64() as u8; rng.between(1, 96) as usize]),
        }),
        10 => Op::Data(DataOp::Truncate {
            ino,
            size: rng.below(3 * u64::from(CHUNK)),
        }),
        _ => {
            // Garbage: answered with an errno, never applied.
            return Bytes::from(
                (0..rng.below(20))
                    .map(|_| rng.next_u64() as u8)
                    .collect::<Vec<u8>>(),
            );
        }
    };
    Request { client, number, op }.encode()
}

/// Every key of the file system's state at the latest version.
fn state(s: &FsShard) -> Vec<(Vec<u8>, Bytes)> {
    let mut out = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = s
            .log()
            .scan(&[0xFE], Version::MAX, after.as_deref(), 512)
            .unwrap();
        out.extend(page.items);
        match page.resume_after {
            Some(a) => after = Some(a),
            None => return out,
        }
    }
}

/// Asserts two shards hold the same keys and values, naming the first difference.
fn same_state(a: &FsShard, b: &FsShard, seed: u64) {
    let (a, b) = (state(a), state(b));
    if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
        panic!(
            "seed {seed}: states differ at key {i} of {}/{}: {:?} against {:?}",
            a.len(),
            b.len(),
            a.get(i).map(|x| &x.0),
            b.get(i).map(|x| &x.0)
        );
    }
}

#[test]
fn a_batched_version_answers_and_ends_like_one_version_per_request() {
    for seed in 1..=4u64 {
        let mut rng = Rng::new(seed);
        let (mut batched, mut replica, mut single) = (shard(), shard(), shard());
        let mut numbers = [0u64; 3];
        let mut seq = 0u32;
        for v in 1..=300u32 {
            let wall = 1_000_000 + u64::from(v) * 10;
            let n = rng.between(1, 6);
            let batch: Vec<Bytes> = (0..n)
                .map(|_| {
                    let client = rng.below(3);
                    // Sometimes a retry of the client's last request.
                    if numbers[client as usize] == 0 || !rng.chance(10) {
                        numbers[client as usize] += 1;
                    }
                    random_request(&mut rng, client, numbers[client as usize])
                })
                .collect();
            let a = batched
                .apply(version_of(1, v), Hlc::at(wall), &batch)
                .unwrap();
            let b = replica
                .apply(version_of(1, v), Hlc::at(wall), &batch)
                .unwrap();
            assert_eq!(a, b, "seed {seed}: replicas answer alike at version {v}");
            let mut c = Vec::new();
            for (i, request) in batch.iter().enumerate() {
                seq += 1;
                let stamp = Hlc {
                    wall_us: wall,
                    logical: i as u32,
                };
                c.extend(
                    single
                        .apply(version_of(1, seq), stamp, std::slice::from_ref(request))
                        .unwrap(),
                );
            }
            assert_eq!(
                a, c,
                "seed {seed}: batched and single answers differ at version {v}"
            );
        }
        same_state(&batched, &replica, seed);
        same_state(&batched, &single, seed);
    }
}

fn shard_with_chunks(chunk: u32) -> FsShard {
    let config = LogConfig {
        sync: SyncPolicy::None,
        segment_bytes: 64 << 20,
        ..LogConfig::default()
    };
    let log = Log::open(Arc::new(MemoryBackend::new()), config).unwrap();
    FsShard::new(log, chunk).unwrap()
}

fn data_request(client: u64, number: u64, op: DataOp) -> Bytes {
    Request {
        client,
        number,
        op: Op::Data(op),
    }
    .encode()
}

/// The largest record payload in `s`'s log.
fn largest_record(s: &mut FsShard) -> usize {
    s.log_mut().sync().unwrap();
    let (records, _) = s
        .log()
        .read_records(None, Version::MAX, usize::MAX, usize::MAX, None)
        .unwrap();
    records.iter().map(|r| r.payload.len()).max().unwrap_or(0)
}

#[test]
fn a_batch_of_compacting_writes_stays_within_the_budget_and_applies_every_request_once() {
    // Full chunks of the largest size: every small write to one of them compacts it into a new
    // base of a whole chunk, so a version of such writes from many clients would be many chunks
    // of delta. Each client has one request outstanding at a time and resends a request
    // answered `Retry`; a shard applying, one version each, the requests in the order the
    // batched shard applied them must answer and end alike.
    const CLIENTS: u64 = 10;
    const ROUNDS: u64 = 3;
    let chunk = CHUNK_SIZE_MAX;
    let (mut batched, mut single) = (shard_with_chunks(chunk), shard_with_chunks(chunk));
    let mut seq = 0u32;
    // Stamps: the batched shard's version `seq` at wall time `10 * seq`; the single shard
    // replays each request at the wall time of the version that applied it.
    let wall = |seq: u32| 1_000_000 + 10 * u64::from(seq);
    let next = |s: &mut FsShard, batch: &[Bytes], seq: u32| {
        s.apply(version_of(1, seq), Hlc::at(wall(seq)), batch)
            .unwrap()
    };
    for client in 0..CLIENTS {
        seq += 1;
        let full = data_request(
            client,
            1,
            DataOp::Write {
                ino: 10 + client,
                index: 0,
                offset: 0,
                data: Bytes::from(vec![1u8; chunk as usize]),
            },
        );
        let a = next(&mut batched, std::slice::from_ref(&full), seq);
        assert_eq!(a, next(&mut single, std::slice::from_ref(&full), seq));
    }
    // Each client's queue: a write to its chunk per round, the last client also making small
    // namespace changes in between.
    let mut queues: Vec<std::collections::VecDeque<Bytes>> = (0..CLIENTS)
        .map(|client| {
            (0..ROUNDS)
                .map(|round| {
                    data_request(
                        client,
                        2 + round,
                        // A whole chunk (which compacts, the chunk's extents being full),
                        // then one byte.
                        if round % 2 == 0 {
                            DataOp::Write {
                                ino: 10 + client,
                                index: 0,
                                offset: 0,
                                data: Bytes::from(vec![2 + round as u8; chunk as usize]),
                            }
                        } else {
                            DataOp::Write {
                                ino: 10 + client,
                                index: 0,
                                offset: (round * 7 + client) as u32,
                                data: Bytes::from(vec![2 + round as u8]),
                            }
                        },
                    )
                })
                .collect()
        })
        .collect();
    queues.push(
        (0..ROUNDS)
            .map(|round| {
                Request {
                    client: 99,
                    number: 1 + round,
                    op: Op::Ns(if round == 0 {
                        NsOp::Init {
                            creds: Creds::default(),
                        }
                    } else {
                        NsOp::Mkdir {
                            parent: 1,
                            name: Bytes::from(format!("d{round}")),
                            perm: 0o755,
                            creds: Creds::default(),
                        }
                    }),
                }
                .encode()
            })
            .collect(),
    );
    let total: usize = queues.iter().map(|q| q.len()).sum();
    let mut applied_order: Vec<(Bytes, Bytes, Hlc)> = Vec::new();
    let mut versions = 0u32;
    let mut retries = 0u64;
    while queues.iter().any(|q| !q.is_empty()) {
        versions += 1;
        assert!(versions as usize <= total, "a version applied nothing");
        // Each version carries the front request of every client, starting at a rotating one.
        let n = queues.len();
        let order: Vec<usize> = (0..n).map(|i| (i + versions as usize) % n).collect();
        let batch: Vec<Bytes> = order
            .iter()
            .filter_map(|&c| queues[c].front().cloned())
            .collect();
        let clients: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&c| !queues[c].is_empty())
            .collect();
        seq += 1;
        let replies = next(&mut batched, &batch, seq);
        let mut applied_here = 0;
        for ((request, reply), c) in batch.iter().zip(&replies).zip(clients) {
            if Reply::decode(reply).unwrap() == Reply::Retry {
                retries += 1;
                continue;
            }
            applied_here += 1;
            queues[c].pop_front();
            let stamp = Hlc {
                wall_us: wall(seq),
                logical: applied_here,
            };
            applied_order.push((request.clone(), reply.clone(), stamp));
        }
        assert!(applied_here >= 1, "version {versions} applied nothing");
    }
    let largest = largest_record(&mut batched);
    assert!(
        largest <= VERSION_DELTA_BYTES_MAX,
        "a record of {largest} bytes is above the budget of {VERSION_DELTA_BYTES_MAX}"
    );
    assert_eq!(applied_order.len(), total, "every request applied once");
    assert!(retries >= CLIENTS / 2, "the versions were meant to be full");
    for (request, reply, stamp) in &applied_order {
        seq += 1;
        let r = single
            .apply(version_of(1, seq), *stamp, std::slice::from_ref(request))
            .unwrap();
        assert_eq!(&r[0], reply, "batched and single answers differ");
    }
    same_state(&batched, &single, 0);
}

#[test]
fn a_truncation_of_more_chunks_than_one_request_may_remove_takes_several_requests() {
    let chunk = 4096u32;
    let mut s = shard_with_chunks(chunk);
    let chunks = TRUNCATE_DELETES_MAX as u64 + 100;
    let mut seq = 0u32;
    let mut apply = |s: &mut FsShard, request: Bytes| -> Reply {
        seq += 1;
        let replies = s
            .apply(version_of(1, seq), Hlc::at(u64::from(seq)), &[request])
            .unwrap();
        Reply::decode(&replies[0]).unwrap()
    };
    for index in 0..chunks {
        let write = DataOp::Write {
            ino: 5,
            index,
            offset: 0,
            data: Bytes::from_static(b"x"),
        };
        assert_eq!(
            apply(&mut s, data_request(1, 1 + index, write)),
            Reply::Data(Ok(DataReply::Done))
        );
    }
    let chunk_states = |s: &FsShard| {
        s.log()
            .scan(&key::chunks(5), Version::MAX, None, 100_000)
            .unwrap()
            .items
            .len() as u64
    };
    assert_eq!(chunk_states(&s), chunks);
    // Cut inside chunk 0: every later chunk goes, at most TRUNCATE_DELETES_MAX per request.
    let cut = |number| data_request(1, number, DataOp::Truncate { ino: 5, size: 1 });
    let mut number = chunks + 1;
    assert_eq!(apply(&mut s, cut(number)), Reply::Data(Ok(DataReply::More)));
    assert_eq!(chunk_states(&s), chunks - TRUNCATE_DELETES_MAX as u64);
    number += 1;
    assert_eq!(apply(&mut s, cut(number)), Reply::Data(Ok(DataReply::Done)));
    assert_eq!(chunk_states(&s), 1);
    number += 1;
    assert_eq!(apply(&mut s, cut(number)), Reply::Data(Ok(DataReply::Done)));
    assert_eq!(chunk_states(&s), 1);
}

/// Shards whose every version is full the first time a request arrives: it is answered `Retry`
/// without being applied, as a replica answers a request that would bring its version over the
/// budget; the same bytes sent again are applied.
struct FullOnce {
    inner: derechofs_fs::LocalShards,
    /// Every request seen, with how many times.
    seen: std::sync::Mutex<std::collections::HashMap<Bytes, u32>>,
}

impl derechofs_fs::Shards for FullOnce {
    fn layout(&self) -> derechofs_fs::FsLayout {
        self.inner.layout()
    }

    fn submit(
        &self,
        shard: derechofs_fs::ShardRef,
        request: Bytes,
    ) -> derechofs_fs::FsResult<Bytes> {
        let first = {
            let mut seen = self.seen.lock().unwrap();
            let n = seen.entry(request.clone()).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            return Ok(Reply::Retry.encode());
        }
        self.inner.submit(shard, request)
    }

    fn read(
        &self,
        shard: derechofs_fs::ShardRef,
        at: derechofs_fs::ReadAt,
        request: Bytes,
    ) -> derechofs_fs::FsResult<Bytes> {
        self.inner.read(shard, at, request)
    }

    fn now_us(&self) -> u64 {
        self.inner.now_us()
    }

    fn space(&self) -> derechofs_fs::FsResult<derechofs_fs::Space> {
        self.inner.space()
    }
}

#[test]
fn a_request_answered_retry_is_resent_with_the_same_bytes_and_applied_once() {
    use derechofs_fs::{Clock, FileSystem, FsConfig, LocalShards};
    let config = || FsConfig {
        client_base: 3 << 32,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    let local = || {
        LocalShards::new(
            3,
            CHUNK,
            Clock::Manual(std::sync::atomic::AtomicU64::new(1_800_000_000_000_000)),
        )
        .unwrap()
    };
    let full = FileSystem::new(
        FullOnce {
            inner: local(),
            seen: Default::default(),
        },
        config(),
    )
    .unwrap();
    let plain = FileSystem::new(local(), config()).unwrap();
    let (a, b) = (some_changes(&full), some_changes(&plain));
    // Every request was sent twice (refused, then applied) and the two file systems agree.
    let seen = full.shards().seen.lock().unwrap().clone();
    assert!(seen.len() > 10, "{} requests", seen.len());
    assert!(seen.values().all(|&n| n == 2), "{seen:?}");
    assert_eq!(a, b);
}

/// Makes a few changes through `fs` (namespace, writes across chunks, a truncation, a punch, a
/// rename); returns the file's bytes and size afterwards.
fn some_changes<S: derechofs_fs::Shards>(fs: &derechofs_fs::FileSystem<S>) -> (Vec<u8>, u64) {
    let root = derechofs_fs::ROOT_INO;
    let d = fs.mkdir(root, b"d", 0o755, Creds::default()).unwrap();
    let f = fs.create(d.ino, b"f", 0o644, Creds::default()).unwrap();
    fs.write(f.ino, 0, &[7u8; 3 * CHUNK as usize + 10]).unwrap();
    let size = Some(u64::from(CHUNK) + 5);
    fs.setattr(
        f.ino,
        SetAttr {
            size,
            ..SetAttr::default()
        },
    )
    .unwrap();
    fs.fallocate(f.ino, derechofs_fs::Fallocate::PunchHole, 10, 20)
        .unwrap();
    fs.rename(d.ino, b"f", root, b"g", 0).unwrap();
    let g = fs.lookup(root, b"g").unwrap();
    (fs.read(g.ino, 0, 3 * CHUNK).unwrap().to_vec(), g.size)
}
