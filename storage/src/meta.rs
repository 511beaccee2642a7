//! The metadata file: small facts about the log that are replaced atomically as a whole.

use crate::record::{u32_at, u64_at};
use crate::{Hlc, Version};

/// Name of the metadata file.
pub(crate) const META_FILE: &str = "meta";
const META_MAGIC: [u8; 8] = *b"DFSMETA\x01";
/// Largest engine state blob, in bytes.
pub const ENGINE_STATE_MAX: usize = 16 << 20;

/// What the metadata file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// A version known to be persisted when the file was written (the log may hold more).
    pub persisted: Option<Version>,
    /// The trim horizon: history before this version was dropped.
    pub horizon: Option<(Version, Hlc)>,
    /// Opaque state of the group engine (the view, ragged trims), owned by the engine.
    pub engine: Vec<u8>,
}

impl Meta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(40 + self.engine.len());
        let flags = u8::from(self.persisted.is_some()) | (u8::from(self.horizon.is_some()) << 1);
        body.push(flags);
        body.extend_from_slice(&self.persisted.unwrap_or(0).to_le_bytes());
        let (hv, hs) = self.horizon.unwrap_or((0, Hlc::ZERO));
        body.extend_from_slice(&hv.to_le_bytes());
        body.extend_from_slice(&hs.wall_us.to_le_bytes());
        body.extend_from_slice(&hs.logical.to_le_bytes());
        body.extend_from_slice(&(self.engine.len() as u32).to_le_bytes());
        body.extend_from_slice(&self.engine);
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&META_MAGIC);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Meta, &'static str> {
        if bytes.len() < 16 || bytes[..8] != META_MAGIC {
            return Err("bad magic");
        }
        let len = u32_at(bytes, 8) as usize;
        let body = bytes
            .get(16..)
            .filter(|b| b.len() == len)
            .ok_or("length mismatch")?;
        if crc32c::crc32c(body) != u32_at(bytes, 12) {
            return Err("checksum mismatch");
        }
        if body.len() < 33 {
            return Err("body too short");
        }
        let flags = body[0];
        if flags & !3 != 0 {
            return Err("unknown flags");
        }
        let engine_len = u32_at(body, 29) as usize;
        if engine_len > ENGINE_STATE_MAX || body.len() != 33 + engine_len {
            return Err("bad engine state length");
        }
        Ok(Meta {
            persisted: (flags & 1 != 0).then(|| u64_at(body, 1)),
            horizon: (flags & 2 != 0).then(|| {
                (
                    u64_at(body, 9),
                    Hlc {
                        wall_us: u64_at(body, 17),
                        logical: u32_at(body, 25),
                    },
                )
            }),
            engine: body[33..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_round_trips_and_rejects_any_flip() {
        let m = Meta {
            persisted: Some(9),
            horizon: Some((
                3,
                Hlc {
                    wall_us: 4,
                    logical: 5,
                },
            )),
            engine: b"view".to_vec(),
        };
        let bytes = m.encode();
        assert_eq!(Meta::decode(&bytes), Ok(m));
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(Meta::decode(&b).is_err(), "flip of bit {i}");
        }
    }
}
