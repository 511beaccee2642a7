//! The I/O of one established link: reading frames, writing frames, and reporting the end.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::frame::{
    decode_header, encode_header, encode_header_with_crc, FrameKind, Inbound, FRAME_HEADER_BYTES,
};
use super::BreakReason;

/// Bytes of the read and write buffers of one connection.
pub(crate) const IO_BUFFER_BYTES: usize = 64 << 10;

/// One frame waiting in a link's queue, holding its share of the link's byte budget.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub view_id: u32,
    pub bytes: Bytes,
    /// The payload's CRC-32C when the sender computed it once for several links.
    pub payload_crc: Option<u32>,
    pub _budget: Option<OwnedSemaphorePermit>,
}

fn read_failure(e: std::io::Error) -> BreakReason {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BreakReason::Truncated
    } else {
        BreakReason::Io(e.to_string())
    }
}

/// Reads the next message frame: its view id and payload. A bye, the end of the stream, an I/O
/// error or a malformed frame ends the link with the reason.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    inbound: &mut Inbound,
) -> Result<(u32, Bytes), BreakReason> {
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
    header.check_payload(&payload)?;
    inbound.accept(&header)?;
    match header.kind {
        FrameKind::Message => Ok((header.view_id, payload.freeze())),
        FrameKind::Bye => Err(BreakReason::PeerClosed),
    }
}

/// The sending end of one direction of a link.
#[derive(Debug)]
pub(crate) struct Outbound {
    last_seq: u64,
    view_id: u32,
}

impl Outbound {
    /// A direction whose sender declared `view_id` in the handshake.
    pub fn new(view_id: u32) -> Outbound {
        Outbound {
            last_seq: 0,
            view_id,
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
        self.write_with_crc(writer, kind, view_id, payload, None)
            .await
    }

    /// As [`Outbound::write`], with the payload's CRC-32C if it is already known.
    pub async fn write_with_crc<W: AsyncWrite + Unpin>(
        &mut self,
        writer: &mut W,
        kind: FrameKind,
        view_id: u32,
        payload: &[u8],
        payload_crc: Option<u32>,
    ) -> std::io::Result<()> {
        self.last_seq += 1;
        self.view_id = self.view_id.max(view_id);
        let header = match payload_crc {
            Some(crc) => encode_header_with_crc(kind, view_id, self.last_seq, payload.len(), crc),
            None => encode_header(kind, view_id, self.last_seq, payload),
        };
        writer.write_all(&header).await?;
        writer.write_all(payload).await
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

/// The writer task of a node's link: writes `prefix` (the acceptor's verdict byte), then every
/// queued frame, flushing whenever the queue is empty. When the queue closes (the link was
/// disconnected locally) it writes a bye and shuts the connection down; when writing fails it
/// reports the reason to the link's supervisor.
pub(crate) async fn write_frames<W: AsyncWrite + Unpin>(
    write: W,
    mut queue: mpsc::Receiver<Outgoing>,
    prefix: Option<u8>,
    local_view: u32,
    failed: oneshot::Sender<BreakReason>,
) {
    let mut writer = tokio::io::BufWriter::with_capacity(IO_BUFFER_BYTES, write);
    let mut outbound = Outbound::new(local_view);
    let result: std::io::Result<()> = async {
        if let Some(byte) = prefix {
            writer.write_all(&[byte]).await?;
        }
        loop {
            let next = match queue.try_recv() {
                Ok(frame) => Some(frame),
                Err(mpsc::error::TryRecvError::Empty) => {
                    writer.flush().await?;
                    queue.recv().await
                }
                Err(mpsc::error::TryRecvError::Disconnected) => None,
            };
            let Some(frame) = next else { break };
            outbound
                .write_with_crc(
                    &mut writer,
                    FrameKind::Message,
                    frame.view_id,
                    &frame.bytes,
                    frame.payload_crc,
                )
                .await?;
        }
        outbound.write_bye(&mut writer).await?;
        writer.flush().await?;
        writer.shutdown().await
    }
    .await;
    if let Err(e) = result {
        let _ = failed.send(BreakReason::Io(e.to_string()));
    }
}
