//! The primitives of the file system's byte encodings: LEB128 varints (at most 10 bytes, no
//! overlong final byte, as in the engine's wire format), fixed little-endian integers, and
//! length-prefixed byte strings. The [`Reader`] never panics and never allocates more than the
//! input justifies: every length is checked against its bound and the bytes left.

use bytes::Bytes;

/// Why bytes are not what a decoder expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ends inside a field.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A malformed varint, or a value outside its field's range.
    #[error("bad value in {0}")]
    Bad(&'static str),
    /// An unknown tag.
    #[error("unknown {what} tag {tag}")]
    UnknownTag {
        /// Which tag.
        what: &'static str,
        /// Its value.
        tag: u8,
    },
    /// A length beyond its bound.
    #[error("{0} beyond its bound")]
    TooLarge(&'static str),
    /// Bytes left over after the whole encoding.
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
}

/// Appends `v` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a varint length and the bytes.
pub fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// Appends a signed value zigzag-encoded as a varint.
pub fn put_signed(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Reads the encodings above from a frame; payloads share the frame's memory.
#[derive(Debug)]
pub struct Reader<'a> {
    frame: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `frame`.
    pub fn new(frame: &'a Bytes) -> Reader<'a> {
        Reader { frame, at: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.frame.len() - self.at
    }

    /// One byte.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let b = *self
            .frame
            .get(self.at)
            .ok_or(DecodeError::Truncated(what))?;
        self.at += 1;
        Ok(b)
    }

    /// A varint.
    pub fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8(what)?;
            if i == 9 && b > 1 {
                return Err(DecodeError::Bad(what));
            }
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Bad(what))
    }

    /// A varint that must fit in `u32`.
    pub fn varint_u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        u32::try_from(self.varint(what)?).map_err(|_| DecodeError::Bad(what))
    }

    /// A zigzag varint.
    pub fn signed(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let z = self.varint(what)?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// A length-prefixed byte string of at most `max` bytes, sharing the frame.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<Bytes, DecodeError> {
        let len = self.varint(what)?;
        if len > max as u64 {
            return Err(DecodeError::TooLarge(what));
        }
        let len = len as usize;
        if len > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        let b = self.frame.slice(self.at..self.at + len);
        self.at += len;
        Ok(b)
    }

    /// A count that each item needs at least `item_min` bytes for, at most `max`.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        item_min: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.varint(what)?;
        if n > max as u64 {
            return Err(DecodeError::TooLarge(what));
        }
        if (n as usize).saturating_mul(item_min.max(1)) > self.remaining() {
            return Err(DecodeError::Truncated(what));
        }
        Ok(n as usize)
    }

    /// Fails unless every byte was read.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::TrailingBytes(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_signed_values_round_trip_at_their_limits() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let b = Bytes::from(out);
            let mut r = Reader::new(&b);
            assert_eq!(r.varint("v"), Ok(v));
            r.finish().unwrap();
        }
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -1_000_000_007] {
            let mut out = Vec::new();
            put_signed(&mut out, v);
            let b = Bytes::from(out);
            assert_eq!(Reader::new(&b).signed("s"), Ok(v));
        }
    }

    #[test]
    fn an_overlong_varint_is_refused() {
        let b = Bytes::from(vec![0xFF; 10]);
        assert_eq!(Reader::new(&b).varint("v"), Err(DecodeError::Bad("v")));
        let mut ten = vec![0xFF; 9];
        ten.push(0x02);
        let b = Bytes::from(ten);
        assert_eq!(Reader::new(&b).varint("v"), Err(DecodeError::Bad("v")));
    }
}
