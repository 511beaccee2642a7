//! A version may carry many requests: later ones must see the writes of earlier ones. A shard
//! that applies random requests in batches must answer and end exactly like one that applies
//! them one version each, and two replicas given the same versions must hold the same state.

use std::sync::Arc;

use bytes::Bytes;
use derechofs_fs::op::{DataOp, NsOp, Op, Request};
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
