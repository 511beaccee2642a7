//! A client's connection to one node: the same handshake and frames as between nodes, driven
//! directly by the caller instead of by background tasks.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};

use super::frame::{Inbound, PayloadSum};
use super::lend::Lending;
use super::link::{read_frame, Outbound, IO_BUFFER_BYTES};
use super::stream::{LinkKind, ReadHalf, Stream, WriteHalf};
use super::{
    handshake, BreakReason, ClientId, ConnectError, HandshakeError, Peer, Secret, SendError,
    FRAME_PAYLOAD_MAX, HANDSHAKE_TIMEOUT_MS,
};
use crate::view::NodeId;

/// A client's link to a node. Split it to send and receive from different tasks.
#[derive(Debug)]
pub struct ClientConn {
    node_id: NodeId,
    kind: LinkKind,
    sender: ClientSender,
    receiver: ClientReceiver,
}

/// The sending half of a [`ClientConn`].
#[derive(Debug)]
pub struct ClientSender {
    writer: BufWriter<WriteHalf>,
    outbound: Outbound,
    /// On a local link, what this end lent and read ([`ClientConn::take_loans`]).
    lending: Option<Arc<Lending>>,
    /// The last read frame sent: the node's lent frames up to it were copied.
    reported: u64,
}

/// The receiving half of a [`ClientConn`].
#[derive(Debug)]
pub struct ClientReceiver {
    reader: BufReader<ReadHalf>,
    inbound: Inbound,
    sum: PayloadSum,
    lending: Option<Arc<Lending>>,
    /// The copies of the node's loans already said to be due ([`ClientReceiver::loans_to_answer`]).
    seen: u64,
}

impl ClientConn {
    /// Connects over TCP to the node at `addr` as client `client_id`, proving it holds
    /// `secret`. With `expected`, the link is refused unless that node answers.
    pub async fn connect(
        addr: SocketAddr,
        client_id: ClientId,
        secret: &Secret,
        expected: Option<NodeId>,
    ) -> Result<ClientConn, ConnectError> {
        ClientConn::connect_via(addr, None, client_id, secret, expected).await
    }

    /// As [`ClientConn::connect`], through the node's socket file in `local_dir` if it has one
    /// there that accepts, else over TCP (see [`super::stream`]).
    pub async fn connect_via(
        addr: SocketAddr,
        local_dir: Option<&Path>,
        client_id: ClientId,
        secret: &Secret,
        expected: Option<NodeId>,
    ) -> Result<ClientConn, ConnectError> {
        let handshake = async {
            let (mut stream, link_addr) = Stream::connect(addr, local_dir)
                .await
                .map_err(ConnectError::Connect)?;
            let acceptor = handshake::dial(
                &mut stream,
                secret,
                Peer::Client(client_id),
                expected,
                0,
                None,
            )
            .await?;
            Ok::<_, ConnectError>((stream, link_addr.kind(), acceptor))
        };
        let (stream, kind, acceptor) =
            tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
                .await
                .unwrap_or(Err(ConnectError::Handshake(HandshakeError::TimedOut)))
                .inspect_err(|e| {
                    if matches!(e, ConnectError::Handshake(HandshakeError::Authentication)) {
                        tracing::warn!(client = client_id, %addr, "refused node: it does not hold the cluster secret");
                    }
                })?;
        // A client lends its large requests (file data) to a node on this machine, and takes
        // its loans only once asked to (`take_loans`): it must then answer them.
        let lending = match &stream {
            Stream::Local(local) => Some(Lending::new(
                local.peer(),
                false,
                format!("client {client_id} to node {}", acceptor.node_id),
                false,
            )),
            Stream::Tcp(_) => None,
        };
        let (read, write) = stream.into_split();
        let mut sender = ClientSender {
            writer: BufWriter::with_capacity(IO_BUFFER_BYTES, write),
            outbound: Outbound::new(0, PayloadSum::of(kind)),
            lending: lending.clone(),
            reported: 0,
        };
        if let Some(lending) = &lending {
            // Queued, not flushed: it leaves with the first request.
            sender
                .outbound
                .write_offer(&mut sender.writer, lending)
                .await
                .map_err(ConnectError::Connect)?;
        }
        Ok(ClientConn {
            node_id: acceptor.node_id,
            kind,
            sender,
            receiver: ClientReceiver {
                reader: BufReader::with_capacity(IO_BUFFER_BYTES, read),
                inbound: Inbound::new(acceptor.view_id),
                sum: PayloadSum::of(kind),
                lending,
                seen: 0,
            },
        })
    }

    /// The node at the other end.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// The kind of connection the link runs on.
    pub fn kind(&self) -> LinkKind {
        self.kind
    }

    /// Takes the node's loans on a local link: large parts of its replies are copied straight
    /// out of the node's memory. The caller must then answer them: after each message received,
    /// when [`ClientReceiver::loans_to_answer`] says so, [`ClientSender::answer_loans`]; the
    /// node keeps each loan until then. Call before the first receive (the node's offer is
    /// read there). Nothing on TCP.
    pub fn take_loans(&self) {
        if let Some(lending) = &self.sender.lending {
            lending.take_loans();
        }
    }

    /// Sends one message; see [`ClientSender::send`].
    pub async fn send(&mut self, view_id: u32, payload: &[u8]) -> Result<(), ClientSendError> {
        self.sender.send(view_id, payload).await
    }

    /// Sends one message in parts; see [`ClientSender::send_parts`].
    pub async fn send_parts(
        &mut self,
        view_id: u32,
        parts: &[&[u8]],
    ) -> Result<(), ClientSendError> {
        self.sender.send_parts(view_id, parts).await
    }

    /// Receives the next message; see [`ClientReceiver::recv`].
    pub async fn recv(&mut self) -> Result<(u32, Bytes), BreakReason> {
        self.receiver.recv().await
    }

    /// The two halves, to use from different tasks.
    pub fn into_split(self) -> (ClientSender, ClientReceiver) {
        (self.sender, self.receiver)
    }
}

/// Why a client's message was not sent.
#[derive(Debug, thiserror::Error)]
pub enum ClientSendError {
    /// The payload is too large for a frame.
    #[error(transparent)]
    Frame(#[from] SendError),
    /// Writing failed; the link is broken.
    #[error("link broken: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientSender {
    /// Writes one message frame and flushes it. `view_id` must not decrease between calls.
    pub async fn send(&mut self, view_id: u32, payload: &[u8]) -> Result<(), ClientSendError> {
        self.send_parts(view_id, &[payload]).await
    }

    /// [`ClientSender::send`] of the message made of `parts` one after the other, each written
    /// from its own memory.
    pub async fn send_parts(
        &mut self,
        view_id: u32,
        parts: &[&[u8]],
    ) -> Result<(), ClientSendError> {
        self.queue_parts(view_id, parts).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Writes one message frame, made of `parts` one after the other, into the link's buffer
    /// without flushing it, so that several frames leave in one write: [`ClientSender::flush`]
    /// sends them (a full buffer is written on the way).
    pub async fn queue_parts(
        &mut self,
        view_id: u32,
        parts: &[&[u8]],
    ) -> Result<(), ClientSendError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > FRAME_PAYLOAD_MAX {
            return Err(SendError::TooLarge(len).into());
        }
        self.outbound
            .write_parts(&mut self.writer, view_id, parts)
            .await?;
        Ok(())
    }

    /// [`ClientSender::queue_parts`] of the message made of the shared `parts`:
    /// on a local link whose node accepted loans, large parts are lent ([`super::lend`]) and
    /// kept until the node has copied them.
    pub async fn queue_payload(
        &mut self,
        view_id: u32,
        parts: &[Bytes],
    ) -> Result<(), ClientSendError> {
        let len: usize = parts.iter().map(Bytes::len).sum();
        if len > FRAME_PAYLOAD_MAX {
            return Err(SendError::TooLarge(len).into());
        }
        self.outbound
            .write_lending(&mut self.writer, view_id, parts, self.lending.as_deref())
            .await?;
        Ok(())
    }

    /// [`ClientSender::queue_payload`], then a flush.
    pub async fn send_payload(
        &mut self,
        view_id: u32,
        parts: &[Bytes],
    ) -> Result<(), ClientSendError> {
        self.queue_payload(view_id, parts).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Frames lent so far whose parts the node has not said it copied.
    pub fn loans_outstanding(&self) -> usize {
        self.lending.as_ref().map_or(0, |l| l.outstanding())
    }

    /// Frames sent with lent parts so far.
    pub fn lent_frames(&self) -> u64 {
        self.lending.as_ref().map_or(0, |l| l.lent_frames())
    }

    /// Tells the node which of its loans this end has copied, if any since the last time, and
    /// flushes ([`ClientConn::take_loans`]).
    pub async fn answer_loans(&mut self) -> Result<(), ClientSendError> {
        let Some(seq) = self
            .lending
            .as_ref()
            .and_then(|l| l.answer_after(self.reported))
        else {
            return Ok(());
        };
        self.outbound.write_read(&mut self.writer, seq).await?;
        self.writer.flush().await?;
        self.reported = seq;
        Ok(())
    }

    /// Writes every frame queued so far.
    pub async fn flush(&mut self) -> Result<(), ClientSendError> {
        self.writer.flush().await?;
        Ok(())
    }

    /// Closes the link in order: a bye, then the end of the stream.
    pub async fn close(mut self) -> std::io::Result<()> {
        self.outbound.write_bye(&mut self.writer).await?;
        self.writer.flush().await?;
        self.writer.shutdown().await
    }
}

impl ClientReceiver {
    /// The next message from the node, with the node's view id; an error ends the link.
    pub async fn recv(&mut self) -> Result<(u32, Bytes), BreakReason> {
        read_frame(
            &mut self.reader,
            &mut self.inbound,
            self.sum,
            self.lending.as_deref(),
        )
        .await
    }

    /// Whether this end copied loans of the node's since it last said so: the sender must then
    /// [`ClientSender::answer_loans`].
    pub fn loans_to_answer(&mut self) -> bool {
        match self
            .lending
            .as_ref()
            .and_then(|l| l.answer_after(self.seen))
        {
            Some(seq) => {
                self.seen = seq;
                true
            }
            None => false,
        }
    }
}
