//! Reads of byte ranges of chunks against a reference model of each chunk's bytes at every
//! version: ranges crossing extents, holes, cuts and the chunk's end, chunks with a base and
//! extents, small reads (assembled over their range only) and large ones (whole chunks through
//! the cache), at the current version and at every past one, on the memory backend and the file
//! backend (also after reopening the log), with writes of one batch read back through the
//! batch's overlay. `DERECHOFS_FS_SEED=N` reruns one seed.

use std::sync::Arc;

use bytes::Bytes;
use derechofs_fs::chunk::{self, ChunkCache, EXTENTS_PER_CHUNK_MAX};
use derechofs_fs::local::LocalFiles;
use derechofs_fs::op::{DataOp, DataRead, DataReply, ReadReply};
use derechofs_fs::store::{Delta, Overlay};
use derechofs_fs::Store;
use derechofs_storage::backend::{Backend, FileBackend, MemoryBackend};
use derechofs_storage::{Hlc, Log, LogConfig, SyncPolicy, Version, Write};
use derechofs_tests::rng::Rng;

const INO: u64 = 7;
const CHUNKS: u64 = 2;

/// The bytes of every chunk, as the model says.
type Model = Vec<Vec<u8>>;

fn model_apply(model: &mut Model, chunk_size: u32, op: &DataOp) {
    match op {
        DataOp::Write {
            index,
            offset,
            data,
            ..
        } => {
            let c = &mut model[*index as usize];
            let end = *offset as usize + data.len();
            if c.len() < end {
                c.resize(end, 0);
            }
            c[*offset as usize..end].copy_from_slice(data);
        }
        DataOp::Zero {
            index, offset, len, ..
        } => {
            let c = &mut model[*index as usize];
            let end = (*offset as usize + *len as usize).min(c.len());
            if (*offset as usize) < end {
                c[*offset as usize..end].fill(0);
            }
        }
        DataOp::Truncate { size, .. } => {
            let cs = u64::from(chunk_size);
            for (i, c) in model.iter_mut().enumerate() {
                let start = i as u64 * cs;
                let keep = size.saturating_sub(start).min(cs) as usize;
                c.truncate(keep);
            }
        }
        DataOp::Punch { .. } => unreachable!("not generated"),
    }
}

fn random_op(rng: &mut Rng, chunk_size: u32) -> DataOp {
    let cs = u64::from(chunk_size);
    let index = rng.below(CHUNKS);
    // Offsets and lengths often on 512-byte steps, so that ranges meet extents' edges exactly.
    let pos = |rng: &mut Rng, n: u64| {
        if rng.below(2) == 0 {
            rng.below(n / 512 + 1) * 512
        } else {
            rng.below(n + 1)
        }
    };
    match rng.below(10) {
        0..=6 => {
            let offset = pos(rng, cs - 1);
            let len = 1 + rng.below((cs - offset).min(cs / 3));
            let byte = rng.next_u64() as u8;
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8) | 1).collect();
            DataOp::Write {
                ino: INO,
                index,
                offset: offset as u32,
                data: Bytes::from(data),
            }
        }
        7..=8 => {
            let offset = pos(rng, cs - 1);
            let len = 1 + rng.below(cs - offset);
            DataOp::Zero {
                ino: INO,
                index,
                offset: offset as u32,
                len: len as u32,
            }
        }
        _ => DataOp::Truncate {
            ino: INO,
            size: pos(rng, CHUNKS * cs),
        },
    }
}

/// Ranges to read of a chunk whose model is `c`: the whole chunk, around its end, around every
/// 512-byte step, and random ones, small and large.
fn ranges(rng: &mut Rng, chunk_size: u32, c: &[u8]) -> Vec<(u32, u32)> {
    let cs = chunk_size;
    let end = c.len() as u32;
    let mut out = vec![
        (0, cs),
        (0, 1),
        (
            end.saturating_sub(7).min(cs - 1),
            14.min(cs - end.saturating_sub(7).min(cs - 1)),
        ),
        (end.min(cs - 1), (cs - end.min(cs - 1)).min(4096)),
    ];
    for _ in 0..12 {
        let step = rng.below(u64::from(cs / 512)) as u32 * 512;
        let from = step.saturating_sub(rng.below(40) as u32);
        out.push((from, (1 + rng.below(1100) as u32).min(cs - from)));
        let from = rng.below(u64::from(cs)) as u32;
        out.push((from, ((1 + rng.below(u64::from(cs))) as u32).min(cs - from)));
    }
    out
}

fn read(
    store: &dyn Store,
    cache: Option<&ChunkCache>,
    chunk_size: u32,
    version: Version,
    (index, offset, len): (u64, u32, u32),
) -> Vec<u8> {
    let request = DataRead::Chunk {
        ino: INO,
        index,
        offset,
        len,
    };
    match chunk::read(store, version, chunk_size, cache, &request) {
        Ok(ReadReply::Bytes(b)) => b.to_vec(),
        other => panic!("read of chunk {index} at {offset}+{len}, version {version}: {other:?}"),
    }
}

/// Checks every recorded version of `log` against its model, without a cache, through a fresh
/// cache and through `cache` (kept over the whole run), and through the chunk's plan read from
/// the log's files (local reads) wherever the log can give one: everywhere when
/// `plans_required`. Returns how many chunk versions were read by their plans.
fn check_versions(
    log: &Log,
    cache: &ChunkCache,
    chunk_size: u32,
    history: &[(Version, Model)],
    rng: &mut Rng,
    seed: u64,
    plans_required: bool,
) -> usize {
    let fresh = ChunkCache::new(chunk::CHUNK_CACHE_BYTES_DEFAULT);
    let files = LocalFiles::new();
    let mut planned = 0;
    for (version, model) in history {
        for (index, c) in model.iter().enumerate() {
            let plan = chunk::plan(log, INO, index as u64, *version).expect("plan");
            if plans_required {
                assert!(
                    plan.is_some(),
                    "seed {seed}: no plan of chunk {index} at version {version}"
                );
            }
            if let Some(plan) = &plan {
                plan.check().expect("a plan the node gives is well formed");
                assert_eq!(plan.len as usize, c.len(), "seed {seed}: plan length");
                planned += 1;
            }
            for (offset, len) in ranges(rng, chunk_size, c) {
                let from = (offset as usize).min(c.len());
                let to = (offset as usize + len as usize).min(c.len());
                let want = &c[from..to];
                let at = (index as u64, offset, len);
                if let Some(plan) = &plan {
                    let got = files.read(plan, offset, len).expect("local read");
                    assert!(
                        got == want,
                        "seed {seed}, chunk size {chunk_size}, by its plan: chunk {index} \
                         {offset}+{len} at version {version} is {} bytes, the model's {} \
                         (first difference at {:?})",
                        got.len(),
                        want.len(),
                        got.iter().zip(want).position(|(a, b)| a != b)
                    );
                }
                for (name, cache) in [
                    ("none", None),
                    ("fresh", Some(&fresh)),
                    ("kept", Some(cache)),
                ] {
                    let got = read(log, cache, chunk_size, *version, at);
                    assert!(
                        got == want,
                        "seed {seed}, chunk size {chunk_size}, cache {name}: chunk {index} \
                         {offset}+{len} at version {version} is {} bytes, the model's {} \
                         (first difference at {:?})",
                        got.len(),
                        want.len(),
                        got.iter().zip(want).position(|(a, b)| a != b)
                    );
                }
            }
        }
    }
    planned
}

/// Runs `steps` batches of 1 to 3 random operations on a log over `backend`, checking the
/// current state after every batch and every past version at the end; returns the history.
fn run(
    backend: Arc<dyn Backend>,
    chunk_size: u32,
    seed: u64,
    steps: usize,
) -> (Log, Vec<(Version, Model)>) {
    let config = LogConfig {
        sync: SyncPolicy::None,
        segment_bytes: 1 << 20,
        ..LogConfig::default()
    };
    let mut log = Log::open(backend, config).expect("log");
    let mut rng = Rng::new(seed);
    let cache = ChunkCache::new(chunk::CHUNK_CACHE_BYTES_DEFAULT);
    let mut model: Model = vec![Vec::new(); CHUNKS as usize];
    let mut history = Vec::new();
    let mut compactions = 0;
    for step in 0..steps {
        let version = step as Version + 1;
        let hlc = Hlc::at(1_000 + step as u64);
        // One batch: later operations see the earlier ones' writes through the overlay (a
        // compaction reads the chunk back through it).
        let mut overlay = Overlay::new(&log);
        for _ in 0..1 + rng.below(3) {
            let op = random_op(&mut rng, chunk_size);
            let (reply, delta): (_, Delta) =
                chunk::apply(&overlay, hlc, chunk_size, &op).expect("store");
            assert_eq!(reply, Ok(DataReply::Done), "seed {seed}: {op:?}");
            compactions += delta
                .iter()
                .filter(|(k, _)| {
                    *k == derechofs_fs::key::base(INO, 0) || *k == derechofs_fs::key::base(INO, 1)
                })
                .count();
            overlay.apply(delta);
            model_apply(&mut model, chunk_size, &op);
            // The batch's own writes, read through the overlay, are the model's.
            for (index, c) in model.iter().enumerate() {
                let (offset, len) = (rng.below(u64::from(chunk_size)) as u32, 700);
                let len = len.min(chunk_size - offset);
                let got = read(
                    &overlay,
                    None,
                    chunk_size,
                    Version::MAX,
                    (index as u64, offset, len),
                );
                let from = (offset as usize).min(c.len());
                let to = (offset as usize + len as usize).min(c.len());
                assert!(
                    got == c[from..to],
                    "seed {seed}: overlay read of chunk {index} {offset}+{len}"
                );
            }
        }
        let writes = overlay.into_writes();
        let writes: Vec<Write<'_>> = writes
            .iter()
            .map(|(k, v)| Write {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        log.append(version, hlc, &writes).expect("append");
        if step % 3 == 0 {
            // Records handed to the files: their chunks can be planned (on the file backend).
            log.flush_buffer().expect("flush");
        }
        history.push((version, model.clone()));
        let last = history.len() - 1;
        check_versions(
            &log,
            &cache,
            chunk_size,
            &history[last..],
            &mut rng,
            seed,
            false,
        );
    }
    check_versions(&log, &cache, chunk_size, &history, &mut rng, seed, false);
    assert!(
        compactions > 0,
        "seed {seed}: no chunk was compacted, so no read met a base with extents after it"
    );
    (log, history)
}

fn seeds() -> Vec<u64> {
    match std::env::var("DERECHOFS_FS_SEED") {
        Ok(s) => vec![s.parse().expect("DERECHOFS_FS_SEED is a number")],
        Err(_) => vec![1, 2],
    }
}

#[test]
fn chunk_range_reads_on_the_memory_backend_equal_the_model_at_every_version() {
    for seed in seeds() {
        // Small chunks: many extents, compactions, cuts; large ones: extents stored out of line.
        run(Arc::new(MemoryBackend::new()), 4096, seed, 80);
        run(Arc::new(MemoryBackend::new()), 256 << 10, seed, 16);
    }
}

#[test]
fn chunk_range_reads_on_the_file_backend_equal_the_model_at_every_version_and_after_reopening() {
    for seed in seeds() {
        for (chunk_size, steps) in [(4096, 80), (256 << 10, 16)] {
            let dir = tempfile::tempdir().expect("temporary directory");
            let backend = Arc::new(FileBackend::open(dir.path()).expect("file backend"));
            let (mut log, history) = run(backend, chunk_size, seed, steps);
            log.commit(0).expect("commit");
            drop(log);
            let backend = Arc::new(FileBackend::open(dir.path()).expect("file backend"));
            let log = Log::open(backend, LogConfig::default()).expect("reopened log");
            let cache = ChunkCache::new(chunk::CHUNK_CACHE_BYTES_DEFAULT);
            let mut rng = Rng::new(seed);
            // Reopened, every record is in the files: every chunk version has its plan.
            let planned = check_versions(&log, &cache, chunk_size, &history, &mut rng, seed, true);
            assert_eq!(planned, history.len() * CHUNKS as usize);
        }
    }
}

#[test]
fn a_chunk_of_the_most_extents_reads_the_same_in_every_range() {
    // A 4000-byte extent (read alone first), then one-byte writes: the 97th compacts (extent bytes past the chunk's
    // size) into a base, which then gathers up to EXTENTS_PER_CHUNK_MAX - 1 extents, more than a
    // small read assembles over its range only.
    let chunk_size = 4096u32;
    let mut log = Log::open(Arc::new(MemoryBackend::new()), LogConfig::default()).expect("log");
    let mut model: Model = vec![Vec::new(); CHUNKS as usize];
    let mut version = 0;
    let mut apply = |log: &mut Log, model: &mut Model, op: DataOp| {
        let (reply, delta) = chunk::apply(&*log, Hlc::ZERO, chunk_size, &op).expect("store");
        assert_eq!(reply, Ok(DataReply::Done));
        model_apply(model, chunk_size, &op);
        version += 1;
        let writes: Vec<Write<'_>> = delta
            .iter()
            .map(|(k, v)| Write {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        log.append(version, Hlc::at(version), &writes)
            .expect("append");
        version
    };
    let first = DataOp::Write {
        ino: INO,
        index: 0,
        offset: 0,
        data: Bytes::from(vec![9u8; 4000]),
    };
    // Written once from offset 0: the one extent's bytes are handed out without a copy.
    let v = apply(&mut log, &mut model, first);
    let mut history = vec![(v, model.clone())];
    for i in 0..(EXTENTS_PER_CHUNK_MAX as u64 * 2) {
        let op = DataOp::Write {
            ino: INO,
            index: 0,
            offset: (i * 13 % 4090) as u32,
            data: Bytes::from(vec![i as u8 | 1]),
        };
        let v = apply(&mut log, &mut model, op);
        if i % 8 == 0 {
            history.push((v, model.clone()));
        }
    }
    let cache = ChunkCache::new(chunk::CHUNK_CACHE_BYTES_DEFAULT);
    check_versions(
        &log,
        &cache,
        chunk_size,
        &history,
        &mut Rng::new(5),
        0,
        false,
    );
}
