//! Checkpoints of the indexes, so reopening a log reads the tail after the checkpoint instead of
//! every record.

use crate::index::{Entry, Key, KeyIndex, VersionTable};
use crate::record::{u32_at, u64_at, KEY_LEN_MAX};
use crate::{Hlc, Version};

/// Name of the checkpoint file.
pub(crate) const CHECKPOINT_FILE: &str = "index.ckpt";
const CHECKPOINT_MAGIC: [u8; 8] = *b"DFSCKPT\x01";

/// Where in the log a checkpoint stops, and the check that the log still holds that record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Position {
    /// The segment holding the last covered record.
    pub(crate) segment: u32,
    /// Offset just after the last covered record.
    pub(crate) end: u64,
    /// Offset of the last covered record.
    pub(crate) last_at: u64,
    /// Checksum of the last covered record; it also seeds the chain of the next one.
    pub(crate) last_crc: u32,
}

/// The sequence number of a segment with its first and last versions, if it holds any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SegmentRange {
    pub(crate) seq: u32,
    pub(crate) versions: Option<(Version, Version)>,
}

/// A decoded checkpoint.
#[derive(Debug)]
pub(crate) struct Checkpoint {
    pub(crate) position: Position,
    pub(crate) segments: Vec<SegmentRange>,
    pub(crate) horizon: Option<(Version, Hlc)>,
    pub(crate) versions: VersionTable,
    pub(crate) keys: KeyIndex,
}

pub(crate) fn encode(
    position: Position,
    segments: &[SegmentRange],
    horizon: Option<(Version, Hlc)>,
    versions: &VersionTable,
    keys: &KeyIndex,
) -> Vec<u8> {
    let n = versions.len();
    let mut out = Vec::with_capacity(80 + n * 20 + keys.len() * 32);
    out.extend_from_slice(&CHECKPOINT_MAGIC);
    out.extend_from_slice(&position.segment.to_le_bytes());
    out.extend_from_slice(&position.last_crc.to_le_bytes());
    out.extend_from_slice(&position.end.to_le_bytes());
    out.extend_from_slice(&position.last_at.to_le_bytes());
    out.extend_from_slice(&(segments.len() as u64).to_le_bytes());
    for s in segments {
        out.extend_from_slice(&s.seq.to_le_bytes());
        out.push(u8::from(s.versions.is_some()));
        let (first, last) = s.versions.unwrap_or((0, 0));
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&last.to_le_bytes());
    }
    out.push(u8::from(horizon.is_some()));
    let (hv, hs) = horizon.unwrap_or((0, Hlc::ZERO));
    out.extend_from_slice(&hv.to_le_bytes());
    out.extend_from_slice(&hs.wall_us.to_le_bytes());
    out.extend_from_slice(&hs.logical.to_le_bytes());
    out.extend_from_slice(&(n as u64).to_le_bytes());
    for v in &versions.versions {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for w in &versions.walls {
        out.extend_from_slice(&w.to_le_bytes());
    }
    for l in &versions.logicals {
        out.extend_from_slice(&l.to_le_bytes());
    }
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for (key, entries) in keys.iter() {
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for e in entries {
            for w in e.to_words() {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// A reader that fails instead of panicking when the bytes run out.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("length overflow")?;
        let s = self.b.get(self.at..end).ok_or("truncated")?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, &'static str> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64_at(self.take(8)?, 0))
    }
    /// A count of items of `size` bytes each, checked against the bytes that remain.
    fn count(&mut self, size: usize) -> Result<usize, &'static str> {
        let n = self.u64()?;
        let left = (self.b.len() - self.at) as u64;
        if n.checked_mul(size as u64).is_none_or(|need| need > left) {
            return Err("count larger than the file");
        }
        Ok(n as usize)
    }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Checkpoint, &'static str> {
    if bytes.len() < 12 || bytes[..8] != CHECKPOINT_MAGIC {
        return Err("bad magic");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32_at(crc, 0) {
        return Err("checksum mismatch");
    }
    let mut r = Reader { b: body, at: 8 };
    let segment = r.u32()?;
    let last_crc = r.u32()?;
    let end = r.u64()?;
    let last_at = r.u64()?;
    let nsegments = r.count(21)?;
    let mut segments = Vec::with_capacity(nsegments);
    for _ in 0..nsegments {
        let seq = r.u32()?;
        let has = r.u8()?;
        let (first, last) = (r.u64()?, r.u64()?);
        let versions = match has {
            0 => None,
            1 if first <= last => Some((first, last)),
            _ => return Err("bad segment range"),
        };
        segments.push(SegmentRange { seq, versions });
    }
    if segments.windows(2).any(|w| w[0].seq >= w[1].seq) {
        return Err("segments out of order");
    }
    let has_horizon = r.u8()?;
    let hv = r.u64()?;
    let hs = Hlc {
        wall_us: r.u64()?,
        logical: r.u32()?,
    };
    let horizon = match has_horizon {
        0 => None,
        1 => Some((hv, hs)),
        _ => return Err("bad horizon flag"),
    };
    let n = r.count(20)?;
    let versions = VersionTable {
        versions: r
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| u64_at(c, 0))
            .collect(),
        walls: r
            .take(n * 8)?
            .chunks_exact(8)
            .map(|c| u64_at(c, 0))
            .collect(),
        logicals: r
            .take(n * 4)?
            .chunks_exact(4)
            .map(|c| u32_at(c, 0))
            .collect(),
    };
    for i in 1..n {
        if versions.versions[i] <= versions.versions[i - 1]
            || versions.stamp_at(i) <= versions.stamp_at(i - 1)
        {
            return Err("versions or stamps out of order");
        }
    }
    let nkeys = r.count(7)?;
    let mut sorted = Vec::with_capacity(nkeys);
    for _ in 0..nkeys {
        let klen = r.u16()? as usize;
        if klen == 0 || klen > KEY_LEN_MAX {
            return Err("bad key length");
        }
        let key = Key::new(r.take(klen)?);
        let count = r.u32()? as usize;
        let raw = r.take(count.checked_mul(20).ok_or("entry count overflow")?)?;
        let entries: Vec<Entry> = raw
            .chunks_exact(20)
            .map(|c| {
                Entry::from_words([
                    u32_at(c, 0),
                    u32_at(c, 4),
                    u32_at(c, 8),
                    u32_at(c, 12),
                    u32_at(c, 16),
                ])
            })
            .collect();
        if entries.is_empty() || entries.windows(2).any(|w| w[0].version() >= w[1].version()) {
            return Err("key history empty or out of order");
        }
        sorted.push((key, entries));
    }
    if sorted.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err("keys out of order");
    }
    if r.at != body.len() {
        return Err("bytes after the last key");
    }
    let keys = KeyIndex::from_sorted(sorted);
    let position = Position {
        segment,
        end,
        last_at,
        last_crc,
    };
    Ok(Checkpoint {
        position,
        segments,
        horizon,
        versions,
        keys,
    })
}
