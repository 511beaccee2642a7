//! The byte format of segments and records (drawn in `docs/FORMATS.md`).
//!
//! Every record's checksum is chained: it covers the previous record's checksum. A record that
//! was valid once but sits after a rewritten tail therefore never validates again, so recovery can
//! stop at the first record that does not check without zeroing the rest of the segment.

use crate::{Hlc, Version};

/// Bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"DFSLOG\x00\x01";
/// Length of the segment header.
pub const SEGMENT_HEADER_LEN: usize = 32;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 32;
/// Largest key, in bytes.
pub const KEY_LEN_MAX: usize = 4096;
/// Largest record payload, in bytes.
pub const RECORD_PAYLOAD_MAX: usize = 64 << 20;
/// Largest number of writes in one delta.
pub const DELTA_WRITES_MAX: usize = 1 << 20;
/// Bytes in front of each write inside a payload: key length, tag, value length.
pub const WRITE_HEADER_LEN: usize = 7;

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The delta of one version.
    Delta = 1,
    /// Part of the state at the trim horizon, written by trim into a base file.
    Base = 2,
}

impl RecordKind {
    fn from_byte(b: u8) -> Option<RecordKind> {
        match b {
            1 => Some(RecordKind::Delta),
            2 => Some(RecordKind::Base),
            _ => None,
        }
    }
}

/// One key write of a delta: a new value, or a tombstone (`value: None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write<'a> {
    /// The key, 1 to [`KEY_LEN_MAX`] bytes.
    pub key: &'a [u8],
    /// The new value, or `None` for a deletion.
    pub value: Option<&'a [u8]>,
}

impl<'a> Write<'a> {
    /// A write of `value` to `key`.
    pub fn put(key: &'a [u8], value: &'a [u8]) -> Write<'a> {
        Write {
            key,
            value: Some(value),
        }
    }

    /// A tombstone for `key`.
    pub fn delete(key: &'a [u8]) -> Write<'a> {
        Write { key, value: None }
    }
}

/// The fixed part of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Length of the payload after the header.
    pub payload_len: u32,
    /// The chained checksum.
    pub crc: u32,
    /// The version the record carries.
    pub version: Version,
    /// The stamp of that version.
    pub hlc: Hlc,
    /// What the payload holds.
    pub kind: RecordKind,
}

impl RecordHeader {
    /// Length of the whole record.
    pub fn record_len(&self) -> usize {
        RECORD_HEADER_LEN + self.payload_len as usize
    }
}

/// Where one write's value sits inside an encoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSpan {
    /// Offset of the key from the start of the record.
    pub key_at: u32,
    /// Key length.
    pub key_len: u16,
    /// Offset of the value from the start of the record.
    pub value_at: u32,
    /// Value length, or `None` for a tombstone.
    pub value_len: Option<u32>,
}

/// The payload length a delta of `writes` encodes to, or why it cannot be encoded.
pub fn payload_len(writes: &[Write<'_>]) -> Result<usize, (&'static str, usize, usize)> {
    if writes.len() > DELTA_WRITES_MAX {
        return Err((
            "number of writes in a delta",
            writes.len(),
            DELTA_WRITES_MAX,
        ));
    }
    let mut len = 4usize;
    for w in writes {
        if w.key.is_empty() || w.key.len() > KEY_LEN_MAX {
            return Err(("key", w.key.len(), KEY_LEN_MAX));
        }
        len += WRITE_HEADER_LEN + w.key.len() + w.value.map_or(0, <[u8]>::len);
        if len > RECORD_PAYLOAD_MAX {
            return Err(("delta", len, RECORD_PAYLOAD_MAX));
        }
    }
    Ok(len)
}

/// Appends one record to `out` and returns its checksum; `spans` receives where each write
/// landed, relative to the start of the record. The caller has checked `payload_len(writes)`.
pub fn encode_record(
    out: &mut Vec<u8>,
    spans: &mut Vec<WriteSpan>,
    prev_crc: u32,
    version: Version,
    hlc: Hlc,
    kind: RecordKind,
    writes: &[Write<'_>],
) -> u32 {
    encode_record_split(
        out,
        spans,
        &mut Vec::new(),
        prev_crc,
        version,
        hlc,
        kind,
        writes,
        usize::MAX,
    )
}

/// Like [`encode_record`], but every value of at least `out_of_line_min` bytes is left out of
/// `out`: `gaps` receives, in order, `(offset, write)` for each, the offset (from the start of
/// the record in `out`) where the bytes of `writes[write]`'s value belong. The record is `out`
/// from where it started with each such value inserted at its offset; `spans`, the length in
/// the header and the checksum are those of the whole record, as [`encode_record`] gives them.
/// For writing a large record from the caller's memory (`pwritev`) without copying it.
#[allow(clippy::too_many_arguments)] // The record's fields, and where its parts go.
pub fn encode_record_split(
    out: &mut Vec<u8>,
    spans: &mut Vec<WriteSpan>,
    gaps: &mut Vec<(usize, usize)>,
    prev_crc: u32,
    version: Version,
    hlc: Hlc,
    kind: RecordKind,
    writes: &[Write<'_>],
    out_of_line_min: usize,
) -> u32 {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER_LEN]);
    out.extend_from_slice(&(writes.len() as u32).to_le_bytes());
    spans.clear();
    gaps.clear();
    // Bytes of the record left out of `out` so far.
    let mut left_out = 0usize;
    for (i, w) in writes.iter().enumerate() {
        out.extend_from_slice(&(w.key.len() as u16).to_le_bytes());
        out.push(u8::from(w.value.is_some()));
        out.extend_from_slice(&(w.value.map_or(0, <[u8]>::len) as u32).to_le_bytes());
        let key_at = (out.len() - start + left_out) as u32;
        out.extend_from_slice(w.key);
        let value_at = (out.len() - start + left_out) as u32;
        if let Some(v) = w.value {
            if v.len() >= out_of_line_min {
                gaps.push((out.len() - start, i));
                left_out += v.len();
            } else {
                out.extend_from_slice(v);
            }
        }
        spans.push(WriteSpan {
            key_at,
            key_len: w.key.len() as u16,
            value_at,
            value_len: w.value.map(|v| v.len() as u32),
        });
    }
    let payload_len = (out.len() - start + left_out - RECORD_HEADER_LEN) as u32;
    let rec = &mut out[start..];
    rec[0..4].copy_from_slice(&payload_len.to_le_bytes());
    rec[8..16].copy_from_slice(&version.to_le_bytes());
    rec[16..24].copy_from_slice(&hlc.wall_us.to_le_bytes());
    rec[24..28].copy_from_slice(&hlc.logical.to_le_bytes());
    rec[28] = kind as u8;
    // The checksum of `record_crc`, over the parts in order.
    let mut crc = crc32c::crc32c(&prev_crc.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &rec[0..4]);
    let mut pos = 8;
    for &(at, i) in gaps.iter() {
        crc = crc32c::crc32c_append(crc, &rec[pos..at]);
        crc = crc32c::crc32c_append(crc, writes[i].value.unwrap_or_default());
        pos = at;
    }
    crc = crc32c::crc32c_append(crc, &rec[pos..]);
    rec[4..8].copy_from_slice(&crc.to_le_bytes());
    crc
}

fn record_crc(prev_crc: u32, rec: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&prev_crc.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &rec[0..4]);
    crc32c::crc32c_append(crc, &rec[8..])
}

/// What lies at a position of a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A valid record.
    Record(RecordHeader),
    /// Zeros where a header would be: the clean end of the written part.
    End,
    /// Something that is not a valid record: a torn write or garbage. Recovery stops here.
    Bad(&'static str),
}

/// Decodes the record at the start of `bytes`, whose predecessor had checksum `prev_crc`. Never
/// panics, whatever the bytes.
pub fn decode_record(bytes: &[u8], prev_crc: u32) -> Decoded {
    if bytes.len() < RECORD_HEADER_LEN {
        return if bytes.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Bad("short header")
        };
    }
    let head = &bytes[..RECORD_HEADER_LEN];
    if head.iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let payload_len = u32_at(head, 0);
    if payload_len as usize > RECORD_PAYLOAD_MAX {
        return Decoded::Bad("payload length above the limit");
    }
    let Some(kind) = RecordKind::from_byte(head[28]) else {
        return Decoded::Bad("unknown record kind");
    };
    if head[29..32] != [0, 0, 0] {
        return Decoded::Bad("reserved bytes not zero");
    }
    let len = RECORD_HEADER_LEN + payload_len as usize;
    if bytes.len() < len {
        return Decoded::Bad("record runs past the end of the segment");
    }
    let crc = u32_at(head, 4);
    if record_crc(prev_crc, &bytes[..len]) != crc {
        return Decoded::Bad("checksum mismatch");
    }
    Decoded::Record(RecordHeader {
        payload_len,
        crc,
        version: u64_at(head, 8),
        hlc: Hlc {
            wall_us: u64_at(head, 16),
            logical: u32_at(head, 24),
        },
        kind,
    })
}

/// Parses the payload of a record whose checksum was verified, calling `each` with every write's
/// span. Fails, without panicking, if the payload is not a well-formed delta.
pub fn parse_payload(record: &[u8], mut each: impl FnMut(WriteSpan)) -> Result<(), &'static str> {
    let payload = record
        .get(RECORD_HEADER_LEN..)
        .ok_or("record shorter than its header")?;
    if payload.len() < 4 {
        return Err("payload shorter than its count");
    }
    let count = u32_at(payload, 0) as usize;
    if count > DELTA_WRITES_MAX {
        return Err("too many writes");
    }
    let mut at = 4usize;
    for _ in 0..count {
        let head = payload
            .get(at..at + WRITE_HEADER_LEN)
            .ok_or("write header past the end")?;
        let key_len = u16::from_le_bytes([head[0], head[1]]) as usize;
        let tag = head[2];
        let value_len = u32_at(head, 3) as usize;
        if key_len == 0 || key_len > KEY_LEN_MAX {
            return Err("bad key length");
        }
        let value = match tag {
            0 if value_len == 0 => None,
            0 => return Err("tombstone with a value"),
            1 => Some(value_len as u32),
            _ => return Err("unknown write tag"),
        };
        let key_at = at + WRITE_HEADER_LEN;
        let value_at = key_at + key_len;
        let end = value_at
            .checked_add(value_len)
            .ok_or("value length overflows")?;
        if end > payload.len() {
            return Err("write past the end of the payload");
        }
        each(WriteSpan {
            key_at: (RECORD_HEADER_LEN + key_at) as u32,
            key_len: key_len as u16,
            value_at: (RECORD_HEADER_LEN + value_at) as u32,
            value_len: value,
        });
        at = end;
    }
    if at != payload.len() {
        return Err("bytes after the last write");
    }
    Ok(())
}

/// Encodes a segment header.
pub fn encode_segment_header(seq: u64, chain_seed: u32) -> [u8; SEGMENT_HEADER_LEN] {
    let mut h = [0u8; SEGMENT_HEADER_LEN];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&chain_seed.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes a segment header into `(seq, chain_seed)`.
pub fn decode_segment_header(bytes: &[u8]) -> Result<(u64, u32), &'static str> {
    let h = bytes
        .get(..SEGMENT_HEADER_LEN)
        .ok_or("segment shorter than its header")?;
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if crc32c::crc32c(&h[..28]) != u32_at(h, 28) {
        return Err("segment header checksum mismatch");
    }
    if h[20..28].iter().any(|&b| b != 0) {
        return Err("segment header reserved bytes not zero");
    }
    Ok((u64_at(h, 8), u32_at(h, 16)))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(writes: &[Write<'_>]) -> (Vec<u8>, u32) {
        let mut out = Vec::new();
        let crc = encode_record(
            &mut out,
            &mut Vec::new(),
            7,
            42,
            Hlc {
                wall_us: 9,
                logical: 1,
            },
            RecordKind::Delta,
            writes,
        );
        (out, crc)
    }

    #[test]
    fn a_record_split_around_its_large_values_is_the_record_with_them_cut_out() {
        let big = vec![5u8; 300];
        let mid = vec![6u8; 100];
        let writes = [
            Write::put(b"k1", &big),
            Write::put(b"k2", b"small"),
            Write::delete(b"k3"),
            Write::put(b"k4", &mid),
            Write::put(b"k5", &big),
        ];
        let stamp = Hlc {
            wall_us: 9,
            logical: 1,
        };
        let (whole, crc) = encode(&writes);
        let mut whole_spans = Vec::new();
        encode_record(
            &mut Vec::new(),
            &mut whole_spans,
            7,
            42,
            stamp,
            RecordKind::Delta,
            &writes,
        );
        for min in [0, 1, 100, 101, 300, 301, usize::MAX] {
            let (mut head, mut spans, mut gaps) = (vec![0xee; 3], Vec::new(), Vec::new());
            let split_crc = encode_record_split(
                &mut head,
                &mut spans,
                &mut gaps,
                7,
                42,
                stamp,
                RecordKind::Delta,
                &writes,
                min,
            );
            // Put the values back where the gaps say: the bytes of the whole record.
            let mut joined = Vec::new();
            let mut pos = 3;
            for &(at, i) in &gaps {
                joined.extend_from_slice(&head[pos..3 + at]);
                joined.extend_from_slice(writes[i].value.unwrap());
                pos = 3 + at;
            }
            joined.extend_from_slice(&head[pos..]);
            assert_eq!((joined, split_crc), (whole.clone(), crc), "threshold {min}");
            assert_eq!(spans, whole_spans, "threshold {min}");
            let expected = writes
                .iter()
                .filter(|w| w.value.is_some_and(|v| v.len() >= min))
                .count();
            assert_eq!(gaps.len(), expected, "threshold {min}");
        }
    }

    #[test]
    fn a_record_decodes_to_what_was_encoded() {
        let (bytes, crc) = encode(&[Write::put(b"a", b"xyz"), Write::delete(b"bb")]);
        let Decoded::Record(h) = decode_record(&bytes, 7) else {
            panic!("not a record")
        };
        assert_eq!((h.version, h.crc, h.record_len()), (42, crc, bytes.len()));
        let mut spans = Vec::new();
        parse_payload(&bytes, |s| spans.push(s)).unwrap();
        let s0 = spans[0];
        assert_eq!(&bytes[s0.value_at as usize..][..3], b"xyz");
        assert_eq!(spans[1].value_len, None);
    }

    #[test]
    fn the_chained_checksum_rejects_a_record_after_another_predecessor() {
        let (bytes, _) = encode(&[Write::put(b"a", b"1")]);
        assert_eq!(decode_record(&bytes, 8), Decoded::Bad("checksum mismatch"));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let (bytes, _) = encode(&[Write::put(b"key", b"value")]);
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(
                !matches!(decode_record(&b, 7), Decoded::Record(_)),
                "flip of bit {i}"
            );
        }
    }

    #[test]
    fn zeros_are_the_clean_end() {
        assert_eq!(decode_record(&[0; 40], 0), Decoded::End);
        assert_eq!(decode_record(&[0; 3], 0), Decoded::End);
    }
}
