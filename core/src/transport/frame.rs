//! The frame codec of a link: pure functions over bytes, with no runtime, so the simulator's
//! network and fuzzers can use exactly the code the TCP transport runs.
//!
//! After the handshake (see [`super::handshake`]) each direction of a link is a stream of frames.
//! Every integer is little-endian. A frame is a 24-byte header and then `len` payload bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | `len`: payload length, at most [`FRAME_PAYLOAD_MAX`] |
//! | 4 | 4 | CRC-32C of the payload, then bytes 0..4, then bytes 8..24 |
//! | 8 | 1 | kind: 1 = message, 2 = bye, 3 = lent message, 4 = offer, 5 = read (the last three on local links only, [`super::lend`]); any other value is malformed |
//! | 9 | 3 | reserved, zero |
//! | 12 | 4 | view id of the sender when it sent the frame |
//! | 16 | 8 | sequence number: 1 for the first frame in each direction, then strictly +1 |
//! | 24 | `len` | payload: for a message, the engine's encoded bytes, opaque to the transport |
//!
//! The checksum covers the length, so a corrupted length is caught once the bytes it claims are
//! read. It runs over the payload first so that a message sent on several links is checksummed
//! once: each link appends only its own header fields ([`encode_header_with_crc`]). A length
//! above [`FRAME_PAYLOAD_MAX`] is rejected before anything is allocated. A receiver
//! rejects a sequence number other than the next one, and a view id lower than an earlier frame's
//! or than the view the peer declared in the handshake: view ids on a link never go back.

use crate::view::NodeId;

/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 24;

/// Bytes of one frame's payload. Above the engine's largest message (a batch of at most
/// [`crate::BATCH_BYTES_MAX`] bytes of requests plus its header), so every message fits one frame.
pub const FRAME_PAYLOAD_MAX: usize = 16 << 20;

const _: () = assert!(FRAME_PAYLOAD_MAX > crate::BATCH_BYTES_MAX + (64 << 10));
const _: () = assert!(FRAME_PAYLOAD_MAX <= u32::MAX as usize);

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// An engine message (between nodes) or a client request or reply.
    Message = 1,
    /// The sender closes the link in order: nothing follows. Its payload is ignored.
    Bye = 2,
    /// A message whose large parts stay in the sender's memory: the payload is a descriptor
    /// ([`super::lend`]).
    Lent = 3,
    /// The sender offers to lend: the address of a probe in its memory, and the probe.
    Offer = 4,
    /// The sender copied the lent memory of the peer's frames up to a sequence number.
    Read = 5,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Result<FrameKind, FrameError> {
        match byte {
            1 => Ok(FrameKind::Message),
            2 => Ok(FrameKind::Bye),
            3 => Ok(FrameKind::Lent),
            4 => Ok(FrameKind::Offer),
            5 => Ok(FrameKind::Read),
            other => Err(FrameError::UnknownKind(other)),
        }
    }
}

/// Why a frame, or the stream of frames of a link, is malformed. Any of these closes the link.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length field is above [`FRAME_PAYLOAD_MAX`].
    #[error("frame length {0} exceeds FRAME_PAYLOAD_MAX")]
    TooLong(u32),
    /// The kind byte names no kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Reserved header bytes are not zero.
    #[error("reserved frame header bytes are not zero")]
    Reserved,
    /// The checksum does not match the frame's bytes.
    #[error("frame checksum mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    Checksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// The sequence number is not the next one on the link.
    #[error("frame sequence gap: expected {expected}, got {got}")]
    Sequence {
        /// The next sequence number of the link.
        expected: u64,
        /// The one the frame carries.
        got: u64,
    },
    /// A lending frame is malformed, or its lent memory could not be read.
    #[error("{0}")]
    Loan(String),
    /// The view id is lower than one the link already carried.
    #[error("frame view {got} is below view {floor} already seen on the link")]
    ViewWentBack {
        /// The lowest view id the link accepts now.
        floor: u32,
        /// The one the frame carries.
        got: u32,
    },
}

/// A frame header, decoded and checked for everything that does not need the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame carries.
    pub kind: FrameKind,
    /// The sender's view id.
    pub view_id: u32,
    /// The frame's sequence number on its link and direction.
    pub seq: u64,
    /// Payload length, at most [`FRAME_PAYLOAD_MAX`].
    pub len: u32,
    stored_crc: u32,
    /// Bytes 0..4 and 8..24, which the checksum covers after the payload.
    fields: [u8; FRAME_HEADER_BYTES - 4],
}

impl FrameHeader {
    /// Checks the payload against the header's checksum.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        debug_assert_eq!(payload.len(), self.len as usize);
        self.check_sum(crc32c::crc32c(payload))
    }

    /// Checks the frame's checksum as `sum` says it was made: over the payload and the header's
    /// fields ([`PayloadSum::Summed`], as [`FrameHeader::check_payload`]), or over the header's
    /// fields only ([`PayloadSum::HeaderOnly`]).
    pub fn check(&self, payload: &[u8], sum: PayloadSum) -> Result<(), FrameError> {
        match sum {
            PayloadSum::Summed => self.check_payload(payload),
            PayloadSum::HeaderOnly => self.check_sum(0),
        }
    }

    fn check_sum(&self, payload_crc: u32) -> Result<(), FrameError> {
        let computed = crc32c::crc32c_append(payload_crc, &self.fields);
        if computed != self.stored_crc {
            return Err(FrameError::Checksum {
                stored: self.stored_crc,
                computed,
            });
        }
        Ok(())
    }
}

/// What a link's frame checksums cover.
///
/// On TCP, the payload and the header's fields. On a Unix-domain socket, whose bytes never leave
/// the kernel's memory between two processes of one machine, the header's fields only: the
/// checksum of a frame with an empty payload, so that a frame boundary lost by a bug is still
/// caught, while the payload's bytes are not summed twice more per link (they are summed again
/// where they are kept, in the log's records).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadSum {
    /// The checksum covers the payload, then the header's fields.
    Summed,
    /// The checksum covers the header's fields only.
    HeaderOnly,
}

impl PayloadSum {
    /// What frames on a link of `kind` are summed over.
    pub fn of(kind: super::stream::LinkKind) -> PayloadSum {
        match kind {
            super::stream::LinkKind::Tcp => PayloadSum::Summed,
            super::stream::LinkKind::Local => PayloadSum::HeaderOnly,
        }
    }
}

/// A whole frame, borrowed from the buffer it was decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What the frame carries.
    pub kind: FrameKind,
    /// The sender's view id.
    pub view_id: u32,
    /// The frame's sequence number.
    pub seq: u64,
    /// The payload.
    pub payload: &'a [u8],
}

/// Appends one frame to `out`.
///
/// # Panics
/// If `payload` is longer than [`FRAME_PAYLOAD_MAX`]: callers check lengths they accept from
/// their own callers, so a longer payload here is a programmer error.
pub fn encode_frame(out: &mut Vec<u8>, kind: FrameKind, view_id: u32, seq: u64, payload: &[u8]) {
    out.extend_from_slice(&encode_header(kind, view_id, seq, payload));
    out.extend_from_slice(payload);
}

/// The header of a frame carrying `payload`; the payload follows it on the wire.
///
/// # Panics
/// As [`encode_frame`].
pub fn encode_header(
    kind: FrameKind,
    view_id: u32,
    seq: u64,
    payload: &[u8],
) -> [u8; FRAME_HEADER_BYTES] {
    assert!(
        payload.len() <= FRAME_PAYLOAD_MAX,
        "frame payload above FRAME_PAYLOAD_MAX"
    );
    let mut header = header_fields(kind, view_id, seq, payload.len());
    let crc = seal(crc32c::crc32c(payload), &header);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The header of a frame whose payload is `len` bytes with CRC-32C `payload_crc`: the same
/// bytes as [`encode_header`], for a payload sent on several links whose checksum is computed
/// once (each frame's checksum continues the payload's over its own header fields).
///
/// # Panics
/// If `len` is above [`FRAME_PAYLOAD_MAX`], as [`encode_frame`].
pub fn encode_header_with_crc(
    kind: FrameKind,
    view_id: u32,
    seq: u64,
    len: usize,
    payload_crc: u32,
) -> [u8; FRAME_HEADER_BYTES] {
    assert!(
        len <= FRAME_PAYLOAD_MAX,
        "frame payload above FRAME_PAYLOAD_MAX"
    );
    let mut header = header_fields(kind, view_id, seq, len);
    let crc = seal(payload_crc, &header);
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    header
}

/// A header with every field but the checksum.
fn header_fields(kind: FrameKind, view_id: u32, seq: u64, len: usize) -> [u8; FRAME_HEADER_BYTES] {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    header[8] = kind as u8;
    header[12..16].copy_from_slice(&view_id.to_le_bytes());
    header[16..24].copy_from_slice(&seq.to_le_bytes());
    header
}

/// Bytes 0..4 and 8..24 of a header: the fields the checksum covers.
fn fields(header: &[u8; FRAME_HEADER_BYTES]) -> [u8; FRAME_HEADER_BYTES - 4] {
    let mut out = [0u8; FRAME_HEADER_BYTES - 4];
    out[0..4].copy_from_slice(&header[0..4]);
    out[4..].copy_from_slice(&header[8..24]);
    out
}

/// The frame checksum: the payload's CRC-32C continued over the header's fields.
fn seal(payload_crc: u32, header: &[u8; FRAME_HEADER_BYTES]) -> u32 {
    crc32c::crc32c_append(payload_crc, &fields(header))
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(bytes);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

/// Decodes a frame header. The payload's checksum is checked later, by
/// [`FrameHeader::check_payload`], once its `len` bytes are read.
pub fn decode_header(header: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
    let len = le_u32(&header[0..4]);
    if len as usize > FRAME_PAYLOAD_MAX {
        return Err(FrameError::TooLong(len));
    }
    let kind = FrameKind::from_byte(header[8])?;
    if header[9..12] != [0, 0, 0] {
        return Err(FrameError::Reserved);
    }
    Ok(FrameHeader {
        kind,
        view_id: le_u32(&header[12..16]),
        seq: le_u64(&header[16..24]),
        len,
        stored_crc: le_u32(&header[4..8]),
        fields: fields(header),
    })
}

/// Decodes the frame at the start of `buf`: `Ok(None)` if `buf` holds only part of it, otherwise
/// the frame and the number of bytes it took. Checks the frame alone; the order of frames on a
/// link is [`Inbound`]'s job.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    let Some(header_bytes) = buf.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(None);
    };
    let header = decode_header(header_bytes)?;
    let end = FRAME_HEADER_BYTES + header.len as usize;
    let Some(payload) = buf.get(FRAME_HEADER_BYTES..end) else {
        return Ok(None);
    };
    header.check_payload(payload)?;
    let frame = Frame {
        kind: header.kind,
        view_id: header.view_id,
        seq: header.seq,
        payload,
    };
    Ok(Some((frame, end)))
}

/// The receiving end of one direction of a link: checks that sequence numbers go up by exactly
/// one and that view ids never go back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    next_seq: u64,
    view_floor: u32,
}

impl Inbound {
    /// A direction whose sender declared `view_id` in the handshake.
    pub fn new(view_id: u32) -> Inbound {
        Inbound {
            next_seq: 1,
            view_floor: view_id,
        }
    }

    /// Accepts the next frame's header, or says why the link must close.
    pub fn accept(&mut self, header: &FrameHeader) -> Result<(), FrameError> {
        if header.seq != self.next_seq {
            return Err(FrameError::Sequence {
                expected: self.next_seq,
                got: header.seq,
            });
        }
        if header.view_id < self.view_floor {
            return Err(FrameError::ViewWentBack {
                floor: self.view_floor,
                got: header.view_id,
            });
        }
        self.next_seq += 1;
        self.view_floor = header.view_id;
        Ok(())
    }
}

/// Whether `local` dials `remote` (rather than waiting for `remote` to dial): the lower node id
/// dials, so each pair of nodes has exactly one link.
pub fn dials(local: NodeId, remote: NodeId) -> bool {
    local < remote
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_from_the_payload_checksum_equals_the_header_from_the_payload() {
        let mut rng = Rng(7);
        for len in [0usize, 1, 7, 64, 1000, 65_536, 1 << 20] {
            let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let seq = rng.next();
            assert_eq!(
                encode_header_with_crc(FrameKind::Message, 3, seq, len, crc32c::crc32c(&payload)),
                encode_header(FrameKind::Message, 3, seq, &payload),
                "payload of {len} bytes"
            );
        }
    }

    /// A small deterministic generator, so a failing seed reruns exactly.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn frame_roundtrip_keeps_every_field() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, FrameKind::Message, 7, 1, b"hello");
        encode_frame(&mut buf, FrameKind::Bye, 8, 2, b"");
        let (first, used) = decode_frame(&buf).unwrap().unwrap();
        assert_eq!(used, FRAME_HEADER_BYTES + 5);
        assert_eq!(
            first,
            Frame {
                kind: FrameKind::Message,
                view_id: 7,
                seq: 1,
                payload: b"hello"
            }
        );
        let (second, used2) = decode_frame(&buf[used..]).unwrap().unwrap();
        assert_eq!(
            (second.kind, second.view_id, second.seq),
            (FrameKind::Bye, 8, 2)
        );
        assert_eq!(used + used2, buf.len());
    }

    #[test]
    fn frame_header_layout_is_the_documented_one() {
        let header = encode_header(
            FrameKind::Message,
            0x0102_0304,
            0x0A0B_0C0D_0E0F_1011,
            b"xyz",
        );
        assert_eq!(&header[0..4], &[3, 0, 0, 0]);
        assert_eq!(header[8], 1);
        assert_eq!(&header[9..12], &[0, 0, 0]);
        assert_eq!(&header[12..16], &[4, 3, 2, 1]);
        assert_eq!(
            &header[16..24],
            &[0x11, 0x10, 0x0F, 0x0E, 0x0D, 0x0C, 0x0B, 0x0A]
        );
        let mut covered = b"xyz".to_vec();
        covered.extend_from_slice(&header[0..4]);
        covered.extend_from_slice(&header[8..24]);
        assert_eq!(le_u32(&header[4..8]), crc32c::crc32c(&covered));
    }

    #[test]
    fn a_header_only_checksum_covers_the_header_fields_and_not_the_payload() {
        let payload = b"some payload";
        let len = payload.len();
        let header_only = encode_header_with_crc(FrameKind::Message, 3, 9, len, 0);
        let summed = encode_header(FrameKind::Message, 3, 9, payload);
        let decoded = decode_header(&header_only).unwrap();
        // The checksum of a frame with an empty payload, over the same fields.
        let mut empty = encode_header(FrameKind::Message, 3, 9, b"");
        empty[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        assert_eq!(
            le_u32(&header_only[4..8]),
            crc32c::crc32c_append(0, &fields(&empty))
        );
        assert_eq!(decoded.check(payload, PayloadSum::HeaderOnly), Ok(()));
        assert_eq!(
            decoded.check(b"other bytes!", PayloadSum::HeaderOnly),
            Ok(())
        );
        assert!(decoded.check(payload, PayloadSum::Summed).is_err());
        let summed_decoded = decode_header(&summed).unwrap();
        assert_eq!(summed_decoded.check(payload, PayloadSum::Summed), Ok(()));
        assert!(summed_decoded
            .check(payload, PayloadSum::HeaderOnly)
            .is_err());
        // Every covered header byte is still checked: flip each bit of the view id and sequence.
        for byte in 12..24 {
            for bit in 0..8 {
                let mut flipped = header_only;
                flipped[byte] ^= 1 << bit;
                let header = decode_header(&flipped).unwrap();
                assert!(
                    matches!(
                        header.check(payload, PayloadSum::HeaderOnly),
                        Err(FrameError::Checksum { .. })
                    ),
                    "byte {byte} bit {bit}"
                );
            }
        }
    }

    #[test]
    fn frame_decoder_waits_for_a_whole_frame() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, FrameKind::Message, 1, 1, &[9; 100]);
        for cut in 0..buf.len() {
            assert_eq!(decode_frame(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn frame_decoder_rejects_each_malformed_header_field() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, FrameKind::Message, 1, 1, b"abc");

        let mut long = buf.clone();
        long[0..4].copy_from_slice(&(FRAME_PAYLOAD_MAX as u32 + 1).to_le_bytes());
        assert_eq!(
            decode_frame(&long),
            Err(FrameError::TooLong(FRAME_PAYLOAD_MAX as u32 + 1))
        );

        let mut kind = buf.clone();
        kind[8] = 9;
        assert_eq!(decode_frame(&kind), Err(FrameError::UnknownKind(9)));

        let mut reserved = buf.clone();
        reserved[10] = 1;
        assert_eq!(decode_frame(&reserved), Err(FrameError::Reserved));

        let mut payload = buf.clone();
        payload[FRAME_HEADER_BYTES + 1] ^= 0x40;
        assert!(matches!(
            decode_frame(&payload),
            Err(FrameError::Checksum { .. })
        ));

        let mut view = buf.clone();
        view[13] ^= 1;
        assert!(matches!(
            decode_frame(&view),
            Err(FrameError::Checksum { .. })
        ));
    }

    #[test]
    fn inbound_rejects_gaps_repeats_and_views_going_back() {
        let header = |view_id, seq| {
            decode_header(&encode_header(FrameKind::Message, view_id, seq, b"")).unwrap()
        };
        let mut inbound = Inbound::new(3);
        assert_eq!(
            inbound.accept(&header(2, 1)),
            Err(FrameError::ViewWentBack { floor: 3, got: 2 })
        );
        assert_eq!(inbound.accept(&header(3, 1)), Ok(()));
        assert_eq!(inbound.accept(&header(4, 2)), Ok(()));
        assert_eq!(
            inbound.accept(&header(4, 2)),
            Err(FrameError::Sequence {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            inbound.accept(&header(4, 4)),
            Err(FrameError::Sequence {
                expected: 3,
                got: 4
            })
        );
        assert_eq!(
            inbound.accept(&header(3, 3)),
            Err(FrameError::ViewWentBack { floor: 4, got: 3 })
        );
    }

    /// Fuzz: random bytes never panic the decoder and never decode to a frame.
    #[test]
    fn frame_decoder_fuzz_random_bytes_yield_no_frame() {
        let seed = 0x5EED_0001;
        let mut rng = Rng(seed);
        let mut buf = Vec::new();
        for round in 0..20_000 {
            buf.clear();
            let len = rng.below(200) as usize;
            buf.extend((0..len).map(|_| rng.next() as u8));
            // Half the time, make the header plausible so the checksum path is exercised too.
            if len >= FRAME_HEADER_BYTES && rng.below(2) == 0 {
                let payload = (len - FRAME_HEADER_BYTES) as u32;
                buf[0..4].copy_from_slice(&payload.to_le_bytes());
                buf[8] = 1 + rng.below(2) as u8;
                buf[9..12].fill(0);
            }
            let result = decode_frame(&buf);
            assert!(
                !matches!(result, Ok(Some(_))),
                "seed {seed:#x} round {round}: random bytes decoded as a frame"
            );
        }
    }

    /// Fuzz: a stream of frames with a few bits flipped decodes only to frames that were encoded,
    /// in order, and then stops at an error or a partial frame.
    #[test]
    fn frame_decoder_fuzz_bit_flips_never_yield_a_frame_not_encoded() {
        let seed = 0x5EED_0002;
        let mut rng = Rng(seed);
        for round in 0..2_000 {
            let mut sent = Vec::new();
            let mut stream = Vec::new();
            for seq in 1..=(1 + rng.below(8)) {
                let payload: Vec<u8> = (0..rng.below(300)).map(|_| rng.next() as u8).collect();
                let view_id = rng.below(4) as u32;
                encode_frame(&mut stream, FrameKind::Message, view_id, seq, &payload);
                sent.push((view_id, seq, payload));
            }
            let flips = 1 + rng.below(3) as usize;
            let mut flipped = Vec::new();
            while flipped.len() < flips {
                let bit = rng.below(stream.len() as u64 * 8) as usize;
                if !flipped.contains(&bit) {
                    flipped.push(bit);
                    stream[bit / 8] ^= 1 << (bit % 8);
                }
            }
            let mut at = 0;
            let mut index = 0;
            while let Ok(Some((frame, used))) = decode_frame(&stream[at..]) {
                let (view_id, seq, payload) = &sent[index];
                assert_eq!(
                    (frame.view_id, frame.seq, frame.payload),
                    (*view_id, *seq, payload.as_slice()),
                    "seed {seed:#x} round {round}: decoded a frame that was not encoded"
                );
                at += used;
                index += 1;
            }
            assert!(
                index < sent.len(),
                "seed {seed:#x} round {round}: a flipped bit went unnoticed"
            );
        }
    }
}
