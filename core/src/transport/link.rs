//! The I/O of one established link: reading frames, writing frames, and reporting the end.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::{Arc, OnceLock};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::frame::{
    decode_header, encode_header_with_crc, FrameError, FrameKind, Inbound, PayloadSum,
    FRAME_HEADER_BYTES,
};
use super::lend::{describe, read_payload, Lending, OFFER_BYTES, READ_BYTES};
use super::BreakReason;

/// Bytes of the read and write buffers of one connection.
pub(crate) const IO_BUFFER_BYTES: usize = 64 << 10;

/// Payload parts of at most this many bytes, and frame headers, are copied into the link's write
/// buffer, so that many small frames leave in one write; larger parts are written from their own
/// memory.
pub(crate) const INLINE_PART_MAX: usize = 4 << 10;

/// A link writes what it has buffered once it holds this many bytes, even if more frames wait.
const WRITE_AT_BYTES: usize = IO_BUFFER_BYTES;

/// Most buffers handed to one vectored write.
const IOVECS_MAX: usize = 64;

/// A frame's payload: one buffer, or parts shared by the links a message goes to.
#[derive(Clone, Debug)]
pub(crate) enum Parts {
    One(Bytes),
    Many(Arc<[Bytes]>),
}

impl Parts {
    pub fn as_slice(&self) -> &[Bytes] {
        match self {
            Parts::One(bytes) => std::slice::from_ref(bytes),
            Parts::Many(parts) => parts,
        }
    }

    pub fn len(&self) -> usize {
        self.as_slice().iter().map(Bytes::len).sum()
    }
}

/// The CRC-32C of the payload parts `parts`, one after the other.
pub(crate) fn sum_parts<P: AsRef<[u8]>>(parts: &[P]) -> u32 {
    parts
        .iter()
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part.as_ref()))
}

/// A payload's CRC-32C, shared by the links its message goes to: computed once, by the first
/// of them that sums payloads (a TCP link, [`PayloadSum`]), and never if none does.
#[derive(Clone, Debug, Default)]
pub(crate) struct SharedCrc(Arc<OnceLock<u32>>);

impl SharedCrc {
    /// The CRC-32C of `parts`, the payload this was made for.
    pub fn of(&self, parts: &[Bytes]) -> u32 {
        *self.0.get_or_init(|| sum_parts(parts))
    }
}

/// One frame waiting in a link's queue, holding its share of the link's byte budget.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub view_id: u32,
    pub parts: Parts,
    /// The payload's CRC-32C when several links share it.
    pub payload_crc: Option<SharedCrc>,
    pub _budget: Option<OwnedSemaphorePermit>,
}

fn read_failure(e: std::io::Error) -> BreakReason {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BreakReason::Truncated
    } else {
        BreakReason::Io(e.to_string())
    }
}

/// Reads the next message frame: its view id and payload, its checksum checked as `sum` says
/// the link's frames are summed. A bye, the end of the stream, an I/O error or a malformed frame
/// ends the link with the reason. On a local link, `lending` is this end's lending state: the
/// frames that lend ([`super::lend`]) are handled here, a lent message's parts copied from the
/// peer; on a link without it they are malformed.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    inbound: &mut Inbound,
    sum: PayloadSum,
    lending: Option<&Lending>,
) -> Result<(u32, Bytes), BreakReason> {
    loop {
        if reader.fill_buf().await.map_err(read_failure)?.is_empty() {
            return Err(BreakReason::Eof);
        }
        let mut header_bytes = [0u8; FRAME_HEADER_BYTES];
        reader
            .read_exact(&mut header_bytes)
            .await
            .map_err(read_failure)?;
        let header = decode_header(&header_bytes)?;
        // Bounded by FRAME_PAYLOAD_MAX, which decode_header checked. Read into spare capacity:
        // zeroing a buffer the socket overwrites at once costs as much as a copy of the payload.
        let len = header.len as usize;
        let mut payload = BytesMut::with_capacity(len);
        while payload.len() < len {
            let missing = len - payload.len();
            let mut rest = (&mut payload).limit(missing);
            if reader.read_buf(&mut rest).await.map_err(read_failure)? == 0 {
                return Err(BreakReason::Truncated);
            }
        }
        header.check(&payload, sum)?;
        inbound.accept(&header)?;
        match (header.kind, lending) {
            (FrameKind::Message, _) => return Ok((header.view_id, payload.freeze())),
            (FrameKind::Bye, _) => return Err(BreakReason::PeerClosed),
            (FrameKind::Lent, Some(lending)) => {
                return Ok((header.view_id, lending.take(header.seq, &payload)?))
            }
            (FrameKind::Offer, Some(lending)) => lending.on_offer(header.seq, &payload)?,
            (FrameKind::Read, Some(lending)) => lending.on_read(&payload)?,
            (kind, None) => {
                return Err(FrameError::Loan(format!(
                    "a {kind:?} frame on a link that does not lend (TCP)"
                ))
                .into())
            }
        }
    }
}

/// The sending end of one direction of a link.
#[derive(Debug)]
pub(crate) struct Outbound {
    last_seq: u64,
    view_id: u32,
    sum: PayloadSum,
}

impl Outbound {
    /// A direction whose sender declared `view_id` in the handshake, its frames summed as `sum`
    /// says.
    pub fn new(view_id: u32, sum: PayloadSum) -> Outbound {
        Outbound {
            last_seq: 0,
            view_id,
            sum,
        }
    }

    /// Writes one frame into `writer` (which the caller flushes).
    pub async fn write<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        kind: FrameKind,
        view_id: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let header = self.header(kind, view_id, payload.len(), || crc32c::crc32c(payload));
        writer.write_all(&header).await?;
        writer.write_all(payload).await
    }

    /// Writes one message frame whose payload is `parts` one after the other, each from its own
    /// memory, into `writer` (which the caller flushes).
    pub async fn write_parts<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        view_id: u32,
        parts: &[&[u8]],
    ) -> std::io::Result<()> {
        let len = parts.iter().map(|p| p.len()).sum();
        let header = self.header(FrameKind::Message, view_id, len, || sum_parts(parts));
        writer.write_all(&header).await?;
        for part in parts {
            writer.write_all(part).await?;
        }
        Ok(())
    }

    /// Writes this direction's offer to lend ([`super::lend`]) into `writer`.
    pub async fn write_offer<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        lending: &Lending,
    ) -> std::io::Result<()> {
        let (header, payload) = self.offer_frame(lending);
        writer.write_all(&header).await?;
        writer.write_all(&payload).await
    }

    /// Writes a read frame naming `seq` (the peer's lent frames up to it were copied) into
    /// `writer`.
    pub async fn write_read<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        seq: u64,
    ) -> std::io::Result<()> {
        let (header, payload) = self.answer_frame(seq);
        writer.write_all(&header).await?;
        writer.write_all(&payload).await
    }

    /// Writes the message of `parts` into `writer` as a lent frame when `lending` allows it and a
    /// part is worth lending ([`Lending::worth`]), else as a message frame.
    pub async fn write_lending<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        view_id: u32,
        parts: &[Bytes],
        lending: Option<&Lending>,
    ) -> std::io::Result<()> {
        match lending.filter(|l| l.worth(parts)) {
            Some(lending) => {
                let (header, descriptor) = self.lent_frame(view_id, parts, lending, None);
                writer.write_all(&header).await?;
                writer.write_all(&descriptor).await
            }
            None => {
                let slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                self.write_parts(writer, view_id, &slices).await
            }
        }
    }

    /// The header and payload of this direction's offer, recorded in `lending`.
    fn offer_frame(&mut self, lending: &Lending) -> ([u8; FRAME_HEADER_BYTES], [u8; OFFER_BYTES]) {
        let payload = lending.offer_payload();
        let view_id = self.view_id;
        let header = self.header(FrameKind::Offer, view_id, OFFER_BYTES, || {
            crc32c::crc32c(&payload)
        });
        lending.offered(self.last_seq);
        (header, payload)
    }

    /// The header and payload of a read frame naming `seq`.
    fn answer_frame(&mut self, seq: u64) -> ([u8; FRAME_HEADER_BYTES], [u8; READ_BYTES]) {
        let payload = read_payload(seq);
        let view_id = self.view_id;
        let header = self.header(FrameKind::Read, view_id, READ_BYTES, || {
            crc32c::crc32c(&payload)
        });
        (header, payload)
    }

    /// The header and descriptor of a lent frame of the message of `parts`, its large parts
    /// recorded in `lending` with `budget` (the link's bytes the frame holds), both kept until
    /// the peer has read them.
    fn lent_frame(
        &mut self,
        view_id: u32,
        parts: &[Bytes],
        lending: &Lending,
        budget: Option<OwnedSemaphorePermit>,
    ) -> ([u8; FRAME_HEADER_BYTES], BytesMut) {
        let (descriptor, lent) = describe(parts);
        let header = self.header(FrameKind::Lent, view_id, descriptor.len(), || {
            crc32c::crc32c(&descriptor)
        });
        lending.lend(self.last_seq, lent, budget);
        (header, descriptor)
    }

    /// The header of the next frame, whose payload is `len` bytes with CRC-32C `payload_crc()`
    /// (asked for only if this direction sums payloads).
    fn header(
        &mut self,
        kind: FrameKind,
        view_id: u32,
        len: usize,
        payload_crc: impl FnOnce() -> u32,
    ) -> [u8; FRAME_HEADER_BYTES] {
        self.last_seq += 1;
        self.view_id = self.view_id.max(view_id);
        // A header-only checksum is that of a frame with an empty payload (whose CRC is 0).
        let crc = match self.sum {
            PayloadSum::Summed => payload_crc(),
            PayloadSum::HeaderOnly => 0,
        };
        encode_header_with_crc(kind, view_id, self.last_seq, len, crc)
    }

    /// Writes a bye in the highest view sent so far.
    pub async fn write_bye<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        let view_id = self.view_id;
        self.write(writer, FrameKind::Bye, view_id, &[]).await
    }
}

/// Bytes of frames gathered for the next write: headers and small parts copied into one buffer,
/// large parts shared.
#[derive(Debug, Default)]
struct Gather {
    /// Buffers to write, in order.
    ready: VecDeque<Bytes>,
    /// Small pieces not yet moved to `ready`.
    small: BytesMut,
    /// Bytes in `ready` and `small`.
    bytes: usize,
}

impl Gather {
    fn put_copied(&mut self, bytes: &[u8]) {
        if self.small.capacity() - self.small.len() < bytes.len() {
            self.small.reserve(IO_BUFFER_BYTES.max(bytes.len()));
        }
        self.small.extend_from_slice(bytes);
        self.bytes += bytes.len();
    }

    fn put_part(&mut self, part: &Bytes) {
        if part.len() <= INLINE_PART_MAX {
            self.put_copied(part);
        } else {
            self.seal();
            self.ready.push_back(part.clone());
            self.bytes += part.len();
        }
    }

    /// Moves the small pieces gathered so far to `ready`.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.ready.push_back(self.small.split().freeze());
        }
    }

    /// Writes everything gathered, with as few (vectored) writes as the socket allows.
    async fn write_out<W: AsyncWrite + Unpin>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.seal();
        while !self.ready.is_empty() {
            let mut written = {
                let slices: Vec<IoSlice<'_>> = self
                    .ready
                    .iter()
                    .take(IOVECS_MAX)
                    .map(|b| IoSlice::new(b))
                    .collect();
                writer.write_vectored(&slices).await?
            };
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.bytes -= written;
            while written > 0 {
                let front = self.ready.front_mut().expect("written bytes were gathered");
                if front.len() <= written {
                    written -= front.len();
                    self.ready.pop_front();
                } else {
                    front.advance(written);
                    written = 0;
                }
            }
        }
        Ok(())
    }
}

/// The writer task of a node's link: writes `prefix` (the acceptor's verdict byte), then every
/// queued frame, writing whenever the queue is empty or [`WRITE_AT_BYTES`] are gathered, so that
/// frames queued together leave in one vectored write. When the queue closes (the link was
/// disconnected locally) it writes a bye and shuts the connection down; when writing fails it
/// reports the reason to the link's supervisor. Frames are summed as `sum` says. On a local
/// link (`lending`), it first offers to lend, lends large parts once the peer has read the
/// offer, and reports what this end read of the peer's loans.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: mpsc::Receiver<Outgoing>,
    prefix: Option<u8>,
    (local_view, sum): (u32, PayloadSum),
    lending: Option<Arc<Lending>>,
    failed: oneshot::Sender<BreakReason>,
) {
    let mut gather = Gather::default();
    let mut outbound = Outbound::new(local_view, sum);
    let mut reported = 0u64;
    let lending = lending.as_deref();
    let result: std::io::Result<()> = async {
        if let Some(byte) = prefix {
            gather.put_copied(&[byte]);
        }
        if let Some(lending) = lending {
            let (header, payload) = outbound.offer_frame(lending);
            gather.put_copied(&header);
            gather.put_copied(&payload);
        }
        loop {
            let next = match queue.try_recv() {
                Ok(frame) => Some(frame),
                Err(mpsc::error::TryRecvError::Empty) => {
                    put_answer(&mut gather, &mut outbound, lending, &mut reported);
                    gather.write_out(&mut writer).await?;
                    match lending {
                        None => queue.recv().await,
                        Some(lending) => loop {
                            tokio::select! {
                                biased;
                                frame = queue.recv() => break frame,
                                () = lending.wake.notified() => {
                                    put_answer(&mut gather, &mut outbound, Some(lending), &mut reported);
                                    gather.write_out(&mut writer).await?;
                                }
                            }
                        },
                    }
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(frame) = next else { break };
            let parts = frame.parts.as_slice();
            match lending.filter(|l| l.worth(parts)) {
                Some(lending) => {
                    let (header, descriptor) =
                        outbound.lent_frame(frame.view_id, parts, lending, frame._budget);
                    gather.put_copied(&header);
                    gather.put_copied(&descriptor);
                }
                None => {
                    let crc = || match &frame.payload_crc {
                        Some(shared) => shared.of(parts),
                        None => sum_parts(parts),
                    };
                    let header =
                        outbound.header(FrameKind::Message, frame.view_id, frame.parts.len(), crc);
                    gather.put_copied(&header);
                    for part in parts {
                        gather.put_part(part);
                    }
                }
            }
            if gather.bytes >= WRITE_AT_BYTES {
                put_answer(&mut gather, &mut outbound, lending, &mut reported);
                gather.write_out(&mut writer).await?;
            }
        }
        let view_id = outbound.view_id;
        let header = outbound.header(FrameKind::Bye, view_id, 0, || 0);
        gather.put_copied(&header);
        gather.write_out(&mut writer).await?;
        writer.flush().await?;
        writer.shutdown().await
    }
    .await;
    if let Err(e) = result {
        let _ = failed.send(BreakReason::Io(e.to_string()));
    }
}

/// Gathers a read frame if this end copied lent memory of the peer's since it last said so.
fn put_answer(
    gather: &mut Gather,
    outbound: &mut Outbound,
    lending: Option<&Lending>,
    reported: &mut u64,
) {
    let Some(answer) = lending.and_then(|l| l.answer_after(*reported)) else {
        return;
    };
    let (header, payload) = outbound.answer_frame(answer);
    gather.put_copied(&header);
    gather.put_copied(&payload);
    *reported = answer;
}
