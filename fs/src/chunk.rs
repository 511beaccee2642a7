//! File data: chunks stored as a base and the extents written after it, on the data shards.
//!
//! A file's bytes are cut into chunks of `chunk_size` bytes (default 1 MiB); chunk `index` of
//! inode `ino` lives on data shard [`placement`]`(ino, index, data_shards)`. A write stores only
//! the bytes written, as an *extent* under its own key, and bumps the chunk's state (how many
//! extents follow the base), so a 4 KiB overwrite costs about 4 KiB of log and never copies the
//! chunk.
//!
//! **Compaction**, inside the order so that replicas agree: when a write would bring a chunk to
//! [`EXTENTS_PER_CHUNK_MAX`] extents, or its extents to more bytes than the chunk holds, the
//! write instead stores a new *base* (the whole chunk as it is after the write) and resets the
//! extent count. Reading the current state of a chunk, at any version, therefore reads one state
//! key, at most one base and at most [`EXTENTS_PER_CHUNK_MAX`] − 1 extents, each a B-tree lookup
//! and a binary search in the log's index: the work does not grow with the number of versions of
//! the file, only logarithmically in the index. Sequential writes that fill a chunk once never
//! compact (their extents add up to the chunk exactly); the price of compaction is one chunk copy
//! per [`EXTENTS_PER_CHUNK_MAX`] small overwrites, or per chunk's worth of overlapping writes.
//!
//! **Reads** of a whole chunk at a version are cached by each replica ([`ChunkCache`]), keyed by
//! the version of the chunk's state key in force: every change of a chunk rewrites that key, so
//! the key's version names the chunk's contents forever (versions are never reused). Reading the
//! current state of a file with a long history then costs one index lookup and a copy of the
//! bytes asked for, like reading a file written once. Only reads of at least
//! 1/[`WHOLE_CHUNK_READ_DIVISOR`] of a chunk fill the cache; a smaller read assembles just its
//! own bytes (reading only the parts of the base and of the extents that meet it), so that a
//! random 4 KiB read costs about 4 KiB of copies and leaves the cache to the reads that pay.
//!
//! A truncation cuts: chunks wholly past the new size lose their state (and read as holes), and
//! the chunk holding the new end gets a *cut* extent; bytes past a cut read as zeros even if the
//! file grows again. Holes, and whatever a chunk does not hold, read as zeros.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use derechofs_storage::backend::FilePlace;
use derechofs_storage::{Hlc, Location, Version};

use crate::codec::{put_varint, DecodeError, Reader};
use crate::error::{Fail, FsError};
use crate::inode::{Ino, FILE_SIZE_MAX};
use crate::key;
use crate::op::{DataOp, DataRead, DataReply, ReadReply};
use crate::store::{Delta, Store};
use crate::{fs_bail, fs_err};

/// The default chunk size: 1 MiB.
pub const CHUNK_SIZE_DEFAULT: u32 = 1 << 20;
/// Smallest chunk size a layout may have.
pub const CHUNK_SIZE_MIN: u32 = 4096;
/// Largest chunk size a layout may have: a chunk's write travels as one request (of at most
/// `REQUEST_BYTES_MAX`), and a write's changes (at most a chunk's new base) must fit in one
/// version's delta beside a full version of K/V requests (`shard::FS_REQUEST_DELTA_BYTES_MAX`).
pub const CHUNK_SIZE_MAX: u32 = (derechofs_core::REQUEST_BYTES_MAX / 2) as u32;
/// Chunk states one truncation request removes at most; it answers `DataReply::More` when more
/// remain, and the client sends it again. 4096 deletions are about 100 KiB of delta.
pub const TRUNCATE_DELETES_MAX: usize = 4096;
/// A chunk is compacted before it would have this many extents after its base.
pub const EXTENTS_PER_CHUNK_MAX: u32 = 256;

/// The data shard that holds chunk `index` of `ino`, among `data_shards` (≥ 1). A pure function
/// of its arguments, fixed by the format: every client and every node computes the same.
pub fn placement(ino: Ino, index: u64, data_shards: u32) -> u32 {
    assert!(data_shards > 0, "a layout has at least one data shard");
    (mix(ino ^ mix(index.wrapping_add(0x9E37_79B9_7F4A_7C15))) % u64::from(data_shards)) as u32
}

/// SplitMix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Checks a chunk size from a layout.
pub fn check_chunk_size(chunk_size: u32) -> Result<(), String> {
    if !(CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&chunk_size) || !chunk_size.is_power_of_two() {
        return Err(format!(
            "chunk size {chunk_size} is not a power of two in {CHUNK_SIZE_MIN}..={CHUNK_SIZE_MAX}"
        ));
    }
    Ok(())
}

/// What the state key of a chunk holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ChunkState {
    /// Bytes of the base (0: no base).
    base_len: u32,
    /// Extents after the base, in slots `0..extents`.
    extents: u32,
    /// Their total bytes.
    extent_bytes: u64,
}

const STATE_FORMAT: u8 = 1;
/// The kind byte of a data extent (also the head of a write's extent on the wire, `op`).
pub(crate) const EXTENT_DATA: u8 = 1;
const EXTENT_CUT: u8 = 2;
const EXTENT_ZERO: u8 = 3;

impl ChunkState {
    fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(12);
        out.push(STATE_FORMAT);
        put_varint(&mut out, u64::from(self.base_len));
        put_varint(&mut out, u64::from(self.extents));
        put_varint(&mut out, self.extent_bytes);
        Bytes::from(out)
    }

    fn decode(b: &Bytes) -> Result<ChunkState, DecodeError> {
        let mut r = Reader::new(b);
        let f = r.u8("chunk state")?;
        if f != STATE_FORMAT {
            return Err(DecodeError::UnknownTag {
                what: "chunk state",
                tag: f,
            });
        }
        let s = ChunkState {
            base_len: r.varint_u32("base length")?,
            extents: r.varint_u32("extent count")?,
            extent_bytes: r.varint("extent bytes")?,
        };
        r.finish()?;
        if s.extents > EXTENTS_PER_CHUNK_MAX {
            return Err(DecodeError::Bad("extent count"));
        }
        Ok(s)
    }
}

enum Extent {
    Data {
        offset: u32,
        data: Bytes,
    },
    Cut {
        offset: u32,
    },
    /// Zeros over `offset..offset + len`, up to the chunk's length at that point (a hole
    /// punched; the chunk does not grow).
    Zero {
        offset: u32,
        len: u32,
    },
}

fn encode_extent(e: &Extent) -> Bytes {
    let mut out = Vec::new();
    match e {
        Extent::Data { offset, data } => {
            out.reserve(6 + data.len());
            out.push(EXTENT_DATA);
            put_varint(&mut out, u64::from(*offset));
            out.extend_from_slice(data);
        }
        Extent::Cut { offset } => {
            out.push(EXTENT_CUT);
            put_varint(&mut out, u64::from(*offset));
        }
        Extent::Zero { offset, len } => {
            out.push(EXTENT_ZERO);
            put_varint(&mut out, u64::from(*offset));
            put_varint(&mut out, u64::from(*len));
        }
    }
    Bytes::from(out)
}

/// Writes of at least this many bytes are stored from the request's memory when it holds their
/// extent ([`apply_framed`]); smaller ones are copied, so that a small extent kept in a cache
/// does not hold a whole multicast message. The log writes values of this size from where they
/// are too.
const FRAMED_EXTENT_MIN: usize = derechofs_storage::OUT_OF_LINE_VALUE_MIN;

/// The data extent of `data` at `offset` as stored ([`encode_extent`]), as a slice of `frame`
/// if `data` lies in `frame`'s memory right after that extent's head; `None` otherwise.
fn framed_extent(frame: &Bytes, offset: u32, data: &Bytes) -> Option<Bytes> {
    let mut head = Vec::with_capacity(EXTENT_HEAD_MAX);
    head.push(EXTENT_DATA);
    put_varint(&mut head, u64::from(offset));
    // Addresses compared as numbers: `data` lies in `frame` only if its whole range does.
    let start = (data.as_ptr() as usize).checked_sub(frame.as_ptr() as usize)?;
    let end = start.checked_add(data.len())?;
    let from = start.checked_sub(head.len())?;
    if end > frame.len() || frame[from..start] != head[..] {
        return None;
    }
    Some(frame.slice(from..end))
}

fn decode_extent(b: &Bytes) -> Result<Extent, DecodeError> {
    let mut r = Reader::new(b);
    let kind = r.u8("extent")?;
    let offset = r.varint_u32("extent offset")?;
    let at = b.len() - r.remaining();
    Ok(match kind {
        EXTENT_DATA => Extent::Data {
            offset,
            data: b.slice(at..),
        },
        EXTENT_CUT => {
            r.finish()?;
            Extent::Cut { offset }
        }
        EXTENT_ZERO => {
            let len = r.varint_u32("extent length")?;
            r.finish()?;
            Extent::Zero { offset, len }
        }
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "extent",
                tag,
            })
        }
    })
}

fn state_at<S: Store + ?Sized>(
    store: &S,
    ino: Ino,
    index: u64,
    version: Version,
) -> Result<Option<ChunkState>, Fail> {
    match store.get(&key::chunk(ino, index), version)? {
        Some(v) => Ok(Some(ChunkState::decode(&v)?)),
        None => Ok(None),
    }
}

/// Bytes an extent's head takes at most: its tag and up to two varints of a `u32`.
const EXTENT_HEAD_MAX: usize = 16;

/// The bytes `[offset, offset + want)` of a chunk at `version`, cut at the chunk's end, with
/// what no write covered as zeros. The work is one base read and at most
/// [`EXTENT_HEAD_MAX`]-byte head reads of [`EXTENTS_PER_CHUNK_MAX`] extents, whatever the
/// chunk's history, and copies only the bytes asked for.
fn assemble<S: Store + ?Sized>(
    store: &S,
    ino: Ino,
    index: u64,
    version: Version,
    offset: u32,
    want: u32,
) -> Result<Bytes, Fail> {
    match state_at(store, ino, index, version)? {
        Some(state) => assemble_state(store, (ino, index), version, state, offset, want),
        None => Ok(Bytes::new()),
    }
}

/// [`assemble`] of a chunk whose state at `version` is `state`. Each piece (the base, an
/// extent's data) is read from the store only over the part that meets the range asked for.
fn assemble_state<S: Store + ?Sized>(
    store: &S,
    (ino, index): (Ino, u64),
    version: Version,
    state: ChunkState,
    offset: u32,
    want: u32,
) -> Result<Bytes, Fail> {
    let lo = u64::from(offset);
    let hi = lo + u64::from(want);
    let base = |lo: u64, want: usize| -> Result<Bytes, Fail> {
        let (b, total) = store
            .get_range(&key::base(ino, index), version, lo, want)?
            .ok_or(DecodeError::Bad("chunk base missing"))?;
        if total != u64::from(state.base_len) {
            return Err(DecodeError::Bad("chunk base length").into());
        }
        Ok(b)
    };
    // One piece covering the chunk from its start (a compacted chunk, or one written once from
    // offset 0): hand out its bytes without assembling a copy.
    match (state.base_len, state.extents) {
        (0, 0) => return Ok(Bytes::new()),
        (_, 0) => return base(lo, want as usize),
        (0, 1) => {
            let extent_key = key::extent(ino, index, 0);
            let head = extent_head(store, &extent_key, version)?;
            if let (Extent::Data { offset: 0, data }, data_at, total) = head {
                let data_len = total - data_at;
                let (from, to) = (lo.min(data_len), hi.min(data_len));
                return extent_data(store, &extent_key, version, (&data, data_at), from, to);
            }
        }
        _ => {}
    }
    let mut window = BytesMut::zeroed(want as usize);
    let mut len: u64 = 0;
    if state.base_len > 0 {
        let b = base(lo, want as usize)?;
        window[..b.len()].copy_from_slice(&b);
        len = u64::from(state.base_len);
    }
    for slot in 0..state.extents {
        let extent_key = key::extent(ino, index, slot);
        let (extent, data_at, total) = extent_head(store, &extent_key, version)?;
        match extent {
            Extent::Data { offset, data } => {
                let data_len = total - data_at;
                let at = u64::from(offset);
                let (from, to) = (at.max(lo), (at + data_len).min(hi));
                if from < to {
                    let part = extent_data(
                        store,
                        &extent_key,
                        version,
                        (&data, data_at),
                        from - at,
                        to - at,
                    )?;
                    window[(from - lo) as usize..(to - lo) as usize].copy_from_slice(&part);
                }
                len = len.max(at + data_len);
            }
            Extent::Cut { offset } => {
                let at = u64::from(offset);
                if at < len {
                    len = at;
                    if at < hi {
                        let from = at.max(lo);
                        window[(from - lo) as usize..].fill(0);
                    }
                }
            }
            Extent::Zero { offset, len: n } => {
                let from = u64::from(offset).max(lo);
                let to = (u64::from(offset) + u64::from(n)).min(len).min(hi);
                if from < to {
                    window[(from - lo) as usize..(to - lo) as usize].fill(0);
                }
            }
        }
    }
    let end = len.clamp(lo, hi);
    window.truncate((end - lo) as usize);
    Ok(window.freeze())
}

/// An extent of `key` at `version` read from its first [`EXTENT_HEAD_MAX`] bytes (a data
/// extent's `data` then holds only its first bytes), where its data starts in the value, and the
/// value's length.
fn extent_head<S: Store + ?Sized>(
    store: &S,
    key: &[u8],
    version: Version,
) -> Result<(Extent, u64, u64), Fail> {
    let (head, total) = store
        .get_range(key, version, 0, EXTENT_HEAD_MAX)?
        .ok_or(DecodeError::Bad("chunk extent missing"))?;
    let extent = decode_extent(&head)?;
    let data_at = match &extent {
        Extent::Data { data, .. } => (head.len() - data.len()) as u64,
        _ => head.len() as u64,
    };
    Ok((extent, data_at, total))
}

/// Bytes `from..to` of the data of the data extent `key`, given its first bytes and where its
/// data starts in the value ([`extent_head`]): from those first bytes when they hold the range,
/// else read from the store.
fn extent_data<S: Store + ?Sized>(
    store: &S,
    key: &[u8],
    version: Version,
    (first, data_at): (&Bytes, u64),
    from: u64,
    to: u64,
) -> Result<Bytes, Fail> {
    let part = if to <= first.len() as u64 {
        first.slice(from as usize..to as usize)
    } else {
        store
            .get_range(key, version, data_at + from, (to - from) as usize)?
            .ok_or(DecodeError::Bad("chunk extent missing"))?
            .0
    };
    if part.len() as u64 != to - from {
        return Err(DecodeError::Bad("chunk extent length").into());
    }
    Ok(part)
}

/// Applies one data operation at stamp `hlc` against `store` (its latest state), for a layout
/// with chunks of `chunk_size` bytes. Returns the reply and the writes; a failure of the store
/// itself is `Err`, and the replica must stop.
pub fn apply<S: Store + ?Sized>(
    store: &S,
    hlc: Hlc,
    chunk_size: u32,
    op: &DataOp,
) -> Result<(Result<DataReply, FsError>, Delta), derechofs_storage::LogError> {
    apply_framed(store, hlc, chunk_size, op, None)
}

/// [`apply`] of an operation decoded from `frame`: a large write whose extent `frame` holds as
/// stored (the wire encoding of a write puts it there) is stored from `frame`'s memory instead
/// of a copy.
pub fn apply_framed<S: Store + ?Sized>(
    store: &S,
    _hlc: Hlc,
    chunk_size: u32,
    op: &DataOp,
    frame: Option<&Bytes>,
) -> Result<(Result<DataReply, FsError>, Delta), derechofs_storage::LogError> {
    let mut delta = Vec::new();
    match run(store, chunk_size, op, frame, &mut delta) {
        Ok(reply) => Ok((Ok(reply), delta)),
        Err(Fail::Fs(e)) => Ok((Err(e), Vec::new())),
        Err(Fail::Store(e)) => Err(e),
    }
}

fn run<S: Store + ?Sized>(
    store: &S,
    chunk_size: u32,
    op: &DataOp,
    frame: Option<&Bytes>,
    delta: &mut Delta,
) -> Result<DataReply, Fail> {
    match op {
        DataOp::Write {
            ino,
            index,
            offset,
            data,
        } => {
            let end = u64::from(*offset) + data.len() as u64;
            if end > u64::from(chunk_size) {
                fs_bail!(
                    libc::EINVAL,
                    "a write to {offset}..{end} crosses the end of a {chunk_size}-byte chunk"
                );
            }
            let file_end = index
                .checked_mul(u64::from(chunk_size))
                .and_then(|s| s.checked_add(end));
            if file_end.is_none_or(|e| e > FILE_SIZE_MAX) {
                fs_bail!(libc::EFBIG, "chunk {index} is past the largest file");
            }
            if data.is_empty() {
                return Ok(DataReply::Done);
            }
            let mut state = state_at(store, *ino, *index, Version::MAX)?.unwrap_or_default();
            let framed = frame
                .filter(|_| data.len() >= FRAMED_EXTENT_MIN)
                .and_then(|f| framed_extent(f, *offset, data));
            let extent = Extent::Data {
                offset: *offset,
                data: data.clone(),
            };
            add(
                store,
                (*ino, *index),
                chunk_size,
                &mut state,
                extent,
                framed,
                delta,
            )?;
            Ok(DataReply::Done)
        }
        DataOp::Truncate { ino, size } => {
            if *size > FILE_SIZE_MAX {
                fs_bail!(libc::EFBIG, "size {size} is above the largest file");
            }
            let cs = u64::from(chunk_size);
            let (cut_index, cut_offset) = (size / cs, (size % cs) as u32);
            let first_dropped = if cut_offset == 0 {
                cut_index
            } else {
                cut_index + 1
            };
            // The chunks wholly past the cut lose their state, at most TRUNCATE_DELETES_MAX per
            // request so that the request's delta stays bounded; the client sends the
            // truncation again while the reply is `More`. The chunk holding the new end is cut
            // by the request that removes the last of them.
            let after = first_dropped.checked_sub(1).map(|i| key::chunk(*ino, i));
            let page = store.scan(
                &key::chunks(*ino),
                Version::MAX,
                after.as_deref(),
                TRUNCATE_DELETES_MAX + 1,
            )?;
            let more = page.len() > TRUNCATE_DELETES_MAX;
            for (k, _) in page.iter().take(TRUNCATE_DELETES_MAX) {
                if key::chunk_index_of(k).is_some_and(|i| i >= first_dropped) {
                    delta.push((k.clone(), None));
                }
            }
            if more {
                return Ok(DataReply::More);
            }
            if cut_offset > 0 {
                if let Some(mut state) = state_at(store, *ino, cut_index, Version::MAX)? {
                    let extent = Extent::Cut { offset: cut_offset };
                    let at = (*ino, cut_index);
                    add(store, at, chunk_size, &mut state, extent, None, delta)?;
                }
            }
            Ok(DataReply::Done)
        }
        DataOp::Zero {
            ino,
            index,
            offset,
            len,
        } => {
            let end = u64::from(*offset) + u64::from(*len);
            if end > u64::from(chunk_size) {
                fs_bail!(
                    libc::EINVAL,
                    "zeros at {offset}..{end} cross the end of a {chunk_size}-byte chunk"
                );
            }
            if *len == 0 {
                return Ok(DataReply::Done);
            }
            // A chunk this shard does not hold reads as zeros already.
            if let Some(mut state) = state_at(store, *ino, *index, Version::MAX)? {
                let extent = Extent::Zero {
                    offset: *offset,
                    len: *len,
                };
                add(
                    store,
                    (*ino, *index),
                    chunk_size,
                    &mut state,
                    extent,
                    None,
                    delta,
                )?;
            }
            Ok(DataReply::Done)
        }
        DataOp::Punch { ino, from, to } => {
            let after = from.checked_sub(1).map(|i| key::chunk(*ino, i));
            let page = store.scan(
                &key::chunks(*ino),
                Version::MAX,
                after.as_deref(),
                TRUNCATE_DELETES_MAX + 1,
            )?;
            let mut dropped = 0;
            for (k, _) in &page {
                let Some(i) = key::chunk_index_of(k) else {
                    continue;
                };
                if i < *from {
                    continue;
                }
                if i >= *to {
                    return Ok(DataReply::Done);
                }
                if dropped == TRUNCATE_DELETES_MAX {
                    return Ok(DataReply::More);
                }
                delta.push((k.clone(), None));
                dropped += 1;
            }
            Ok(DataReply::Done)
        }
    }
}

/// Adds an extent to a chunk, compacting it into a new base when it would hold too many
/// extents or more extent bytes than the chunk's size.
/// `framed`, if given, is `extent` already encoded as stored.
fn add<S: Store + ?Sized>(
    store: &S,
    (ino, index): (Ino, u64),
    chunk_size: u32,
    state: &mut ChunkState,
    extent: Extent,
    framed: Option<Bytes>,
    delta: &mut Delta,
) -> Result<(), Fail> {
    let bytes = match &extent {
        Extent::Data { data, .. } => data.len() as u64,
        Extent::Cut { .. } | Extent::Zero { .. } => 0,
    };
    let compact = state.extents + 1 >= EXTENTS_PER_CHUNK_MAX
        || state.extent_bytes + bytes > u64::from(chunk_size);
    if !compact {
        let encoded = framed.unwrap_or_else(|| encode_extent(&extent));
        delta.push((key::extent(ino, index, state.extents), Some(encoded)));
        state.extents += 1;
        state.extent_bytes += bytes;
        delta.push((key::chunk(ino, index), Some(state.encode())));
        return Ok(());
    }
    let mut current =
        BytesMut::from(assemble(store, ino, index, Version::MAX, 0, chunk_size)?.as_ref());
    match extent {
        Extent::Data { offset, data } => {
            let end = offset as usize + data.len();
            if current.len() < end {
                current.resize(end, 0);
            }
            current[offset as usize..end].copy_from_slice(&data);
        }
        Extent::Cut { offset } => current.truncate(current.len().min(offset as usize)),
        Extent::Zero { offset, len } => {
            let end = (offset as usize + len as usize).min(current.len());
            if (offset as usize) < end {
                current[offset as usize..end].fill(0);
            }
        }
    }
    *state = ChunkState {
        base_len: current.len() as u32,
        extents: 0,
        extent_bytes: 0,
    };
    delta.push((key::base(ino, index), Some(current.freeze())));
    delta.push((key::chunk(ino, index), Some(state.encode())));
    Ok(())
}

/// Whole chunks as assembled at some version, most recently used kept, up to a number of bytes.
/// A read-side cache of one replica: it never influences what any operation decides.
#[derive(Debug)]
pub struct ChunkCache {
    inner: Mutex<CacheInner>,
    bytes_max: usize,
}

/// The default size of a replica's chunk cache: 64 MiB.
pub const CHUNK_CACHE_BYTES_DEFAULT: usize = 64 << 20;

type CacheKey = (Ino, u64, Version);

#[derive(Debug, Default)]
struct CacheInner {
    chunks: HashMap<CacheKey, (Bytes, u64)>,
    by_use: BTreeMap<u64, CacheKey>,
    bytes: usize,
    tick: u64,
}

impl ChunkCache {
    /// A cache of at most `bytes_max` bytes of chunks.
    pub fn new(bytes_max: usize) -> ChunkCache {
        ChunkCache {
            inner: Mutex::new(CacheInner::default()),
            bytes_max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: CacheKey) -> Option<Bytes> {
        let mut c = self.lock();
        c.tick += 1;
        let tick = c.tick;
        let (bytes, used) = c.chunks.get_mut(&key)?;
        let (bytes, old) = (bytes.clone(), std::mem::replace(used, tick));
        c.by_use.remove(&old);
        c.by_use.insert(tick, key);
        Some(bytes)
    }

    fn put(&self, key: CacheKey, bytes: Bytes) {
        if bytes.len() > self.bytes_max {
            return;
        }
        let mut c = self.lock();
        c.tick += 1;
        let tick = c.tick;
        if let Some((old, used)) = c.chunks.insert(key, (bytes.clone(), tick)) {
            c.bytes -= old.len();
            c.by_use.remove(&used);
        }
        c.bytes += bytes.len();
        c.by_use.insert(tick, key);
        while c.bytes > self.bytes_max {
            let Some((_, oldest)) = c.by_use.pop_first() else {
                break;
            };
            if let Some((b, _)) = c.chunks.remove(&oldest) {
                c.bytes -= b.len();
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// A read of at least `chunk_size / WHOLE_CHUNK_READ_DIVISOR` bytes (128 KiB of a 1 MiB chunk:
/// the kernel's sequential read-ahead) assembles and caches the whole chunk on a cache miss, so
/// that the reads of the rest of the chunk find it; a smaller read assembles only its bytes and
/// leaves the cache alone (random small reads would otherwise copy a chunk per read and evict
/// the chunks that pay).
pub const WHOLE_CHUNK_READ_DIVISOR: u32 = 8;
/// A small read of a chunk with more extents than this assembles and caches the whole chunk
/// anyway: reading every extent's head per read would then cost more than the copy.
pub const RANGE_READ_EXTENTS_MAX: u32 = 16;

/// The bytes `[offset, offset + want)` of a chunk at `version` through `cache`.
fn assemble_cached<S: Store + ?Sized>(
    store: &S,
    cache: &ChunkCache,
    (ino, index): (Ino, u64),
    version: Version,
    chunk_size: u32,
    (offset, want): (u32, u32),
) -> Result<Bytes, Fail> {
    let Some(state_version) = store.key_version(&key::chunk(ino, index), version)? else {
        return Ok(Bytes::new());
    };
    let key = (ino, index, state_version);
    let chunk = match cache.get(key) {
        Some(c) => c,
        None => {
            let Some(state) = state_at(store, ino, index, version)? else {
                return Ok(Bytes::new());
            };
            let small =
                u64::from(want) * u64::from(WHOLE_CHUNK_READ_DIVISOR) < u64::from(chunk_size);
            if small && state.extents <= RANGE_READ_EXTENTS_MAX {
                return assemble_state(store, (ino, index), version, state, offset, want);
            }
            let c = assemble_state(store, (ino, index), version, state, 0, chunk_size)?;
            cache.put(key, c.clone());
            c
        }
    };
    let from = (offset as usize).min(chunk.len());
    let to = (offset as usize + want as usize).min(chunk.len());
    Ok(chunk.slice(from..to))
}

/// Where the bytes of a chunk at one version lie in one replica's log files: what a client on
/// the same machine needs to read them itself (`DataRead::Plan`, docs/ARCHITECTURE.md, "Local
/// reads"). The bytes a plan names never change (the log writes each record once), so a plan
/// stays true for that version as long as its files exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// The chunk's length at that version: a read stops there.
    pub len: u32,
    /// The files the pieces are in.
    pub files: Vec<FilePlace>,
    /// Pieces of the chunk, in order, not overlapping, all below `len`; what no piece covers
    /// below `len` reads as zeros.
    pub pieces: Vec<PlanPiece>,
}

/// Bytes `at..at + len` of a chunk, found at `offset` of file `file` of its plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanPiece {
    /// Where the piece starts in the chunk.
    pub at: u32,
    /// Its length.
    pub len: u32,
    /// Index of its file in [`ChunkPlan::files`].
    pub file: u32,
    /// Where its first byte is in that file.
    pub offset: u64,
}

/// Most pieces a plan may have: a base and [`EXTENTS_PER_CHUNK_MAX`] extents, each of which
/// can split one piece in two.
pub const PLAN_PIECES_MAX: usize = 2 * EXTENTS_PER_CHUNK_MAX as usize + 2;
/// Most files a plan may name: the base's and the extents'.
pub const PLAN_FILES_MAX: usize = EXTENTS_PER_CHUNK_MAX as usize + 1;

impl ChunkPlan {
    /// Checks what a decoder cannot: pieces in order, not overlapping, below `len`, each naming
    /// a file of the plan and not wrapping around in it.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut end = 0u32;
        for p in &self.pieces {
            let piece_end = p.at.checked_add(p.len).ok_or("a plan piece wraps")?;
            if p.len == 0 || p.at < end || piece_end > self.len {
                return Err("plan pieces out of order, overlapping or past the chunk");
            }
            if p.file as usize >= self.files.len() {
                return Err("a plan piece names no file of the plan");
            }
            p.offset
                .checked_add(u64::from(p.len))
                .ok_or("a plan piece wraps in its file")?;
            end = piece_end;
        }
        Ok(())
    }

    /// Bytes `offset..offset + want` of the chunk, cut at its length, read with `read_file`
    /// (file index, offset in the file, bytes to fill).
    pub fn read(
        &self,
        offset: u32,
        want: u32,
        mut read_file: impl FnMut(u32, u64, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Bytes> {
        let lo = offset.min(self.len);
        let hi = (u64::from(offset) + u64::from(want)).min(u64::from(self.len)) as u32;
        let mut out = BytesMut::zeroed((hi - lo) as usize);
        let first = self.pieces.partition_point(|p| p.at + p.len <= lo);
        for p in &self.pieces[first..] {
            if p.at >= hi {
                break;
            }
            let from = p.at.max(lo);
            let to = (p.at + p.len).min(hi);
            read_file(
                p.file,
                p.offset + u64::from(from - p.at),
                &mut out[(from - lo) as usize..(to - lo) as usize],
            )?;
        }
        Ok(out.freeze())
    }
}

/// Non-overlapping pieces of a chunk being planned, by start: `(end, file, offset)`.
#[derive(Default)]
struct Painter {
    pieces: BTreeMap<u32, (u32, u32, u64)>,
}

impl Painter {
    /// Removes whatever covers `lo..hi`, keeping the parts of pieces outside it.
    fn clear(&mut self, lo: u32, hi: u32) {
        if lo >= hi {
            return;
        }
        // A piece starting before `lo` that reaches into the range keeps its head (and its
        // tail past `hi`, if it spans the whole range).
        if let Some((&at, &(end, file, offset))) = self.pieces.range(..lo).next_back() {
            if end > lo {
                self.pieces.insert(at, (lo, file, offset));
                if end > hi {
                    self.pieces
                        .insert(hi, (end, file, offset + u64::from(hi - at)));
                }
            }
        }
        let inside: Vec<u32> = self.pieces.range(lo..hi).map(|(&at, _)| at).collect();
        for at in inside {
            if let Some((end, file, offset)) = self.pieces.remove(&at) {
                if end > hi {
                    self.pieces
                        .insert(hi, (end, file, offset + u64::from(hi - at)));
                }
            }
        }
    }

    fn paint(&mut self, lo: u32, hi: u32, file: u32, offset: u64) {
        if lo >= hi {
            return;
        }
        self.clear(lo, hi);
        self.pieces.insert(lo, (hi, file, offset));
    }
}

/// The plan of chunk `index` of `ino` at `version` ([`ChunkPlan`]); `None` when some of its
/// bytes are not where another process could read them (still in the log's write buffer, or a
/// store without files).
pub fn plan<S: Store + ?Sized>(
    store: &S,
    ino: Ino,
    index: u64,
    version: Version,
) -> Result<Option<ChunkPlan>, FsError> {
    match plan_of(store, ino, index, version) {
        Ok(p) => Ok(p),
        Err(Fail::Fs(e)) => Err(e),
        Err(Fail::Store(e)) => Err(FsError::from(e)),
    }
}

fn plan_of<S: Store + ?Sized>(
    store: &S,
    ino: Ino,
    index: u64,
    version: Version,
) -> Result<Option<ChunkPlan>, Fail> {
    let empty = ChunkPlan {
        len: 0,
        files: Vec::new(),
        pieces: Vec::new(),
    };
    let Some(state) = state_at(store, ino, index, version)? else {
        return Ok(Some(empty));
    };
    let mut files: Vec<FilePlace> = Vec::new();
    let mut file_of = |place: FilePlace| -> u32 {
        match files.iter().position(|f| *f == place) {
            Some(i) => i as u32,
            None => {
                files.push(place);
                (files.len() - 1) as u32
            }
        }
    };
    let mut painter = Painter::default();
    let mut len: u64 = 0;
    if state.base_len > 0 {
        let located = match store.locate(&key::base(ino, index), version)? {
            Location::File(l) => l,
            Location::Elsewhere => return Ok(None),
            Location::Absent => return Err(DecodeError::Bad("chunk base missing").into()),
        };
        if located.len != state.base_len {
            return Err(DecodeError::Bad("chunk base length").into());
        }
        let file = file_of(located.place);
        painter.paint(0, state.base_len, file, located.offset);
        len = u64::from(state.base_len);
    }
    for slot in 0..state.extents {
        let extent_key = key::extent(ino, index, slot);
        let (extent, data_at, total) = extent_head(store, &extent_key, version)?;
        match extent {
            Extent::Data { offset, .. } => {
                let located = match store.locate(&extent_key, version)? {
                    Location::File(l) => l,
                    Location::Elsewhere => return Ok(None),
                    Location::Absent => return Err(DecodeError::Bad("chunk extent missing").into()),
                };
                if u64::from(located.len) != total {
                    return Err(DecodeError::Bad("chunk extent length").into());
                }
                let data_len = total - data_at;
                let end = u64::from(offset) + data_len;
                let end32 = u32::try_from(end).map_err(|_| DecodeError::Bad("chunk extent end"))?;
                let file = file_of(located.place);
                painter.paint(offset, end32, file, located.offset + data_at);
                len = len.max(end);
            }
            Extent::Cut { offset } => {
                if u64::from(offset) < len {
                    len = u64::from(offset);
                    painter.clear(offset, u32::MAX);
                }
            }
            Extent::Zero { offset, len: n } => {
                let to = (u64::from(offset) + u64::from(n)).min(len);
                if u64::from(offset) < to {
                    painter.clear(offset, to as u32);
                }
            }
        }
    }
    let len = u32::try_from(len).map_err(|_| DecodeError::Bad("chunk length"))?;
    painter.clear(len, u32::MAX);
    let pieces = painter
        .pieces
        .into_iter()
        .map(|(at, (end, file, offset))| PlanPiece {
            at,
            len: end - at,
            file,
            offset,
        })
        .collect();
    Ok(Some(ChunkPlan { len, files, pieces }))
}

/// Answers a data read at `version`, through the replica's chunk cache when given.
pub fn read<S: Store + ?Sized>(
    store: &S,
    version: Version,
    chunk_size: u32,
    cache: Option<&ChunkCache>,
    read: &DataRead,
) -> Result<ReadReply, FsError> {
    match read {
        DataRead::Chunk {
            ino,
            index,
            offset,
            len,
        } => {
            let end = u64::from(*offset) + u64::from(*len);
            if end > u64::from(chunk_size) {
                return Err(fs_err!(
                    libc::EINVAL,
                    "a read of {offset}..{end} crosses the end of a {chunk_size}-byte chunk"
                ));
            }
            let bytes = match cache {
                Some(c) => assemble_cached(
                    store,
                    c,
                    (*ino, *index),
                    version,
                    chunk_size,
                    (*offset, *len),
                ),
                None => assemble(store, *ino, *index, version, *offset, *len),
            };
            match bytes {
                Ok(b) => Ok(ReadReply::Bytes(b)),
                Err(Fail::Fs(e)) => Err(e),
                Err(Fail::Store(e)) => Err(FsError::from(e)),
            }
        }
        DataRead::Plan { ino, index } => plan(store, *ino, *index, version).map(ReadReply::Plan),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The delta of one write applied to an empty log, decoded from its wire encoding.
    fn write_delta(frame: bool, offset: u32, data: &[u8]) -> (Bytes, Delta) {
        use crate::op::{Op, Request};
        use derechofs_storage::backend::MemoryBackend;
        use derechofs_storage::{Log, LogConfig};
        let log = Log::open(
            std::sync::Arc::new(MemoryBackend::new()),
            LogConfig::default(),
        )
        .expect("log");
        let op = Op::Data(DataOp::Write {
            ino: 7,
            index: 3,
            offset,
            data: Bytes::copy_from_slice(data),
        });
        let wire = Request {
            client: 1,
            number: 1,
            op,
        }
        .encode();
        let request = Request::decode(&wire).expect("decodes");
        let Op::Data(op) = &request.op else {
            panic!("a data op");
        };
        let (reply, delta) =
            apply_framed(&log, Hlc::ZERO, 1 << 20, op, frame.then_some(&wire)).expect("store");
        assert_eq!(reply, Ok(DataReply::Done));
        (wire, delta)
    }

    fn extent_value(delta: &Delta) -> Bytes {
        let (_, v) = delta
            .iter()
            .find(|(k, _)| k[..] == key::extent(7, 3, 0)[..])
            .expect("an extent written");
        v.clone().expect("a value")
    }

    fn within(inner: &Bytes, outer: &Bytes) -> bool {
        let (i, o) = (inner.as_ptr() as usize, outer.as_ptr() as usize);
        i >= o && i + inner.len() <= o + outer.len()
    }

    #[test]
    fn a_large_write_is_stored_from_the_request_and_as_a_copy_would_store_it() {
        let data: Vec<u8> = (0..FRAMED_EXTENT_MIN + 999)
            .map(|i| (i % 251) as u8)
            .collect();
        for offset in [0, 5, 300, 70_000] {
            let (wire, framed) = write_delta(true, offset, &data);
            let (_, copied) = write_delta(false, offset, &data);
            assert_eq!(framed, copied, "the same delta either way");
            let stored = extent_value(&framed);
            assert!(
                within(&stored, &wire),
                "offset {offset}: stored from the request"
            );
            assert!(!within(&extent_value(&copied), &wire));
            let expected = encode_extent(&Extent::Data {
                offset,
                data: Bytes::copy_from_slice(&data),
            });
            assert_eq!(stored, expected);
        }
        // A small write is copied: its extent would otherwise hold the whole message.
        let (wire, small) = write_delta(true, 10, &data[..FRAMED_EXTENT_MIN - 1]);
        assert!(!within(&extent_value(&small), &wire));
    }

    #[test]
    fn an_extent_is_taken_from_a_frame_only_where_the_frame_holds_its_head() {
        let mut raw = vec![EXTENT_DATA];
        put_varint(&mut raw, 300);
        raw.extend_from_slice(b"payload");
        let frame = Bytes::from(raw);
        let data = frame.slice(3..);
        assert_eq!(framed_extent(&frame, 300, &data), Some(frame.clone()));
        assert_eq!(framed_extent(&frame, 301, &data), None, "another offset");
        assert_eq!(framed_extent(&frame, 300, &frame.slice(2..)), None);
        let elsewhere = Bytes::copy_from_slice(&data);
        assert_eq!(framed_extent(&frame, 300, &elsewhere), None);
        assert_eq!(
            framed_extent(&frame.slice(3..), 300, &data),
            None,
            "no head in front"
        );
    }

    #[test]
    fn the_chunk_cache_keeps_the_most_recently_used_chunks_within_its_bytes() {
        let cache = ChunkCache::new(10);
        cache.put((1, 0, 1), Bytes::from_static(b"aaaa"));
        cache.put((1, 1, 1), Bytes::from_static(b"bbbb"));
        assert!(cache.get((1, 0, 1)).is_some());
        cache.put((1, 2, 1), Bytes::from_static(b"cccc"));
        assert_eq!(cache.bytes(), 8);
        assert!(
            cache.get((1, 1, 1)).is_none(),
            "the least recently used went first"
        );
        assert_eq!(cache.get((1, 0, 1)), Some(Bytes::from_static(b"aaaa")));
        cache.put((9, 9, 9), Bytes::from(vec![0; 11]));
        assert!(
            cache.get((9, 9, 9)).is_none(),
            "a chunk larger than the cache is not kept"
        );
    }

    #[test]
    fn placement_spreads_chunks_over_every_data_shard_and_never_changes() {
        let mut counts = [0u32; 5];
        for ino in 2..50 {
            for index in 0..40 {
                counts[placement(ino, index, 5) as usize] += 1;
            }
        }
        assert!(counts.iter().all(|&c| c > 300), "{counts:?}");
        // Fixed by the format: a change here moves every file's data.
        // The values FORMATS.md's formula gives.
        let fixed = [
            placement(2, 0, 7),
            placement(2, 1, 7),
            placement(1 << 39, 123_456, 7),
            placement(12_345, 0, 3),
        ];
        assert_eq!(fixed, [3, 0, 3, 2]);
        assert_eq!(placement(5, 5, 1), 0);
    }
}
