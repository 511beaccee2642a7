//! The transport: reliable FIFO links between the nodes of a group, and between nodes and
//! their clients, carrying the engine's encoded messages as opaque bytes.
//!
//! Links run over TCP, or over a Unix-domain stream socket between processes on the same
//! machine ([`stream`]): a node that listens on TCP address A can also listen on a socket file
//! named after A, and whoever dials A with the same socket directory tries that file first. The
//! byte stream (handshake, frames) is the same on both kinds.
//!
//! Each node listens on one port that serves peers and clients; the [handshake](handshake) says
//! which one connects and proves, in both directions, that each side holds the cluster
//! [`Secret`]. A connection that fails it is refused and logged. Each pair of nodes has exactly
//! one link: the lower node id dials ([`frame::dials`]) and the acceptor refuses a second one.
//!
//! On a link, [frames](frame) carry a checksum, the sender's view id and a sequence number that
//! goes up by one per frame in each direction. A malformed frame, an I/O error or the end of the
//! connection closes the link and is reported as [`LinkEvent::Broken`], never a panic. A broken
//! link between nodes is not reopened in the same view (DESIGN §2): the owner suspects the peer,
//! and the transport refuses to link the two nodes again until [`Transport::set_view`] moves to a
//! later view.
//!
//! Every queue is bounded: frames waiting on a link ([`LINK_QUEUE_MAX`], [`LINK_QUEUE_BYTES_MAX`])
//! make [`Transport::send`] wait, and events waiting for the owner ([`EVENT_QUEUE_MAX`]) make the
//! links stop reading, which pushes back on the peers through TCP.
//!
//! The frame codec and the handshake messages are pure functions ([`frame`], [`handshake`]) so
//! the simulator's network can reuse them without tokio.

mod client;
pub mod frame;
pub mod handshake;
mod lend;
mod link;
pub mod stream;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::AbortHandle;

pub use client::{ClientConn, ClientReceiver, ClientSendError, ClientSender};
pub use frame::{FrameError, FRAME_HEADER_BYTES, FRAME_PAYLOAD_MAX};
pub use handshake::{GroupSettings, HandshakeError, Refusal, Secret};
pub use stream::{
    check_local_socket_dir, local_socket_name, local_socket_path, LinkAddr, LinkKind,
    LocalSocketError, LOCAL_SOCKET_DIR_DEFAULT,
};

use crate::view::NodeId;
use frame::PayloadSum;
use frame::{dials, Inbound};
use lend::Lending;
use link::{read_frame, write_frames, Outgoing, Parts, SharedCrc, IO_BUFFER_BYTES};
use stream::{Listener, ReadHalf, Stream};

/// A client's id, chosen by the client; unique among the clients linked to one node at a time.
pub type ClientId = u64;

/// Frames waiting to be written on one link.
pub const LINK_QUEUE_MAX: usize = 1024;
/// Payload bytes waiting to be written on one link. At least [`FRAME_PAYLOAD_MAX`], so any frame
/// fits once the queue drains.
pub const LINK_QUEUE_BYTES_MAX: usize = 64 << 20;
/// Events waiting for the owner; beyond it the links stop reading.
pub const EVENT_QUEUE_MAX: usize = 4096;
/// Connections in their handshake at once; a connection beyond it is closed at once.
pub const HANDSHAKES_MAX: usize = 64;
/// Connections the kernel queues for the TCP listener before they are accepted.
pub const TCP_BACKLOG: u32 = 1024;
/// Time a connection has to finish its handshake (dialing included).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 5_000;
/// Time [`Transport::close`] waits for the links to write their queued frames and a bye.
pub const CLOSE_WAIT_MS: u64 = 500;

const _: () = assert!(LINK_QUEUE_BYTES_MAX >= FRAME_PAYLOAD_MAX);

/// The other end of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Peer {
    /// A node of the group.
    Node(NodeId),
    /// A client.
    Client(ClientId),
}

/// What the transport tells its owner. Per peer, events come in order: `Connected`, then its
/// frames in the order sent, then at most one `Broken`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link is up.
    Connected {
        /// The other end.
        peer: Peer,
        /// Where it is: its TCP address, or the socket file of a local link.
        addr: LinkAddr,
        /// The view it declared in the handshake.
        view_id: u32,
    },
    /// A message arrived.
    Frame {
        /// From whom.
        peer: Peer,
        /// The view the sender was in.
        view_id: u32,
        /// The message, as the sender passed it to `send`.
        bytes: Bytes,
    },
    /// A link ended. Between nodes it will not be reopened in the current view.
    Broken {
        /// The other end.
        peer: Peer,
        /// Why.
        reason: BreakReason,
    },
}

/// Why a link ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BreakReason {
    /// The peer closed the link in order (a bye frame).
    #[error("the peer closed the link")]
    PeerClosed,
    /// The connection ended between two frames, without a bye.
    #[error("the connection ended")]
    Eof,
    /// The connection ended inside a frame.
    #[error("the connection ended inside a frame")]
    Truncated,
    /// A frame was malformed.
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    /// Reading or writing failed.
    #[error("i/o error: {0}")]
    Io(String),
    /// The transport's owner dropped its event receiver.
    #[error("the transport is shutting down")]
    Shutdown,
}

/// Why [`Transport::connect`] did not make a link.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The lower node id dials; this node waits for `remote` to dial it.
    #[error("node {local} does not dial node {remote}: the lower id dials")]
    NotDialer {
        /// This node.
        local: NodeId,
        /// The peer.
        remote: NodeId,
    },
    /// A link with the peer exists, or is being made.
    #[error("a link with node {0} exists or is being made")]
    AlreadyLinked(NodeId),
    /// The link with the peer broke in the current view.
    #[error("the link with node {peer} broke in view {view_id}; it reopens in a later view")]
    BrokenInView {
        /// The peer.
        peer: NodeId,
        /// The current view.
        view_id: u32,
    },
    /// The connection could not be made.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// The transport is closing ([`Transport::close`]).
    #[error("the transport is closing")]
    Closing,
}

/// Why a frame was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The payload is above [`FRAME_PAYLOAD_MAX`].
    #[error("payload of {0} bytes exceeds FRAME_PAYLOAD_MAX")]
    TooLarge(usize),
    /// No link with the peer is up.
    #[error("no link with {0:?}")]
    NoLink(Peer),
    /// The link's queue is full (only from [`Transport::try_send`]).
    #[error("the queue of the link with {0:?} is full")]
    Full(Peer),
}

/// A message's bytes, as one or more parts sent back to back, for sending the same message to
/// several peers ([`Transport::send_payload`]): their CRC-32C is computed at most once, by the
/// first link that sums payloads ([`PayloadSum`]: TCP links do, local links do not). Parts are
/// written with vectored writes, so a large part goes to the socket without being copied.
#[derive(Clone, Debug)]
pub struct Payload {
    parts: Parts,
    crc: SharedCrc,
}

impl Payload {
    /// A payload of `bytes`.
    pub fn new(bytes: Bytes) -> Payload {
        Payload {
            parts: Parts::One(bytes),
            crc: SharedCrc::default(),
        }
    }

    /// A payload of the concatenation of `parts` (as made by
    /// [`crate::message::Message::to_parts`]).
    pub fn from_parts(mut parts: Vec<Bytes>) -> Payload {
        if parts.len() == 1 {
            return Payload::new(parts.pop().expect("one part"));
        }
        Payload {
            parts: Parts::Many(parts.into()),
            crc: SharedCrc::default(),
        }
    }

    /// Bytes in all parts.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[Bytes] {
        self.parts.as_slice()
    }
}

/// One node's endpoint: a listener for peers and clients, and its links.
///
/// Dropping it stops accepting and closes every link in order (queued frames, then a bye).
#[derive(Debug)]
pub struct Transport {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    acceptors: Vec<AbortHandle>,
    /// The socket file this transport listens on, until it is removed at a clean stop.
    local_socket: Mutex<Option<PathBuf>>,
}

#[derive(Debug)]
struct Shared {
    node_id: NodeId,
    secret: Secret,
    /// The settings this node states in every handshake ([`GroupSettings`]): a peer whose
    /// own differ never links. `None`: stated and checked by neither side.
    settings: Option<GroupSettings>,
    /// The directory of local sockets: peers are dialed through theirs first.
    local_dir: Option<PathBuf>,
    events: mpsc::Sender<LinkEvent>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    view_id: u32,
    links: HashMap<Peer, Link>,
    /// Nodes being dialed.
    dialing: HashSet<NodeId>,
    /// Nodes whose link broke, with the view it broke in.
    broken: HashMap<NodeId, u32>,
    /// This node left its view (it was removed while it ran) and is in none until a later
    /// view: links reopen whenever they break, since no view of its own can move on.
    outside: bool,
    /// [`Transport::close`] ran: no link is made any more.
    closing: bool,
    /// Dialers refused for their group settings, each logged once until it links.
    settings_refused: HashSet<Peer>,
    /// Nodes whose address this node has ([`Transport::know`]): links with them go by the
    /// direction rule. A node outside it may dial this node whatever the ids: it is joining
    /// and this node could not dial it ([`Transport::connect_joining`]).
    known: HashSet<NodeId>,
    next_serial: u64,
}

impl State {
    /// Whether the link with `peer` broke in the current view and may not reopen in it.
    fn broke_in_view(&self, peer: NodeId) -> bool {
        !self.outside && self.broken.get(&peer) == Some(&self.view_id)
    }
}

#[derive(Debug)]
struct Link {
    serial: u64,
    kind: LinkKind,
    queue: mpsc::Sender<Outgoing>,
    budget: Arc<Semaphore>,
    supervisor: AbortHandle,
    /// The writer, which writes a bye and ends once `queue` is dropped.
    writer: tokio::task::JoinHandle<()>,
    /// On a local link, what it lent and read ([`lend`]).
    lending: Option<Arc<Lending>>,
}

/// What one local link lent and read so far ([`Transport::lending`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LendingStats {
    /// Whether the peer read this end's offer, so that this end lends its large parts.
    pub lends: bool,
    /// Frames this end sent with parts lent.
    pub lent_frames: u64,
    /// Lent frames the peer has not said it read yet.
    pub outstanding: usize,
    /// Parts this end copied out of the peer's memory.
    pub copied_parts: u64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the transport, so a poisoned lock is used as it is.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Transport {
    /// Listens on `addr` over TCP only, as node `node_id` of the cluster that holds `secret`,
    /// and dials over TCP only. Returns the transport and the receiver of its events, which the
    /// owner must keep draining.
    pub async fn bind(
        addr: SocketAddr,
        node_id: NodeId,
        secret: Secret,
    ) -> std::io::Result<(Transport, mpsc::Receiver<LinkEvent>)> {
        Transport::bind_with(addr, node_id, secret, None, None).await
    }

    /// As [`Transport::bind`], and with `local_dir`, also listens on the socket file named
    /// after the TCP address in that directory ([`local_socket_path`]) and dials peers through
    /// theirs when they have one. The TCP address is bound first (a bind fails while another
    /// process listens on it), so a socket file of that name is a stale one and is replaced;
    /// the TCP socket listens only once the file is bound, so a peer that reaches the node over
    /// TCP would have found the file. If listening fails, the file is removed again. If the
    /// socket file cannot be bound, that is logged and the node serves TCP only. With
    /// `settings`, the node states them in every handshake and links with no node whose own
    /// differ ([`GroupSettings`]); both ends log what differs.
    pub async fn bind_with(
        addr: SocketAddr,
        node_id: NodeId,
        secret: Secret,
        local_dir: Option<&Path>,
        settings: Option<GroupSettings>,
    ) -> std::io::Result<(Transport, mpsc::Receiver<LinkEvent>)> {
        // Bound before it listens: the socket file is in place before the first TCP dial can
        // succeed, so peers that start together do not link over TCP for want of it.
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        let local_addr = socket.local_addr()?;
        let local = match local_dir {
            Some(dir) => match stream::bind_local(dir, local_addr) {
                Ok(bound) => Some(bound),
                Err(e) => {
                    tracing::warn!(node = node_id, error = %e, "no local socket; serving TCP only");
                    None
                }
            },
            None => None,
        };
        let listener = match socket.listen(TCP_BACKLOG) {
            Ok(listener) => listener,
            Err(e) => {
                // Another process listens on the address: the socket file is not this node's.
                if let Some((_, path)) = &local {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };
        let (events, receiver) = mpsc::channel(EVENT_QUEUE_MAX);
        let shared = Arc::new(Shared {
            node_id,
            secret,
            settings,
            local_dir: local_dir.map(Path::to_path_buf),
            events,
            state: Mutex::new(State::default()),
        });
        let handshakes = Arc::new(Semaphore::new(HANDSHAKES_MAX));
        let mut acceptors = vec![tokio::spawn(accept_loop(
            shared.clone(),
            Listener::Tcp(listener),
            handshakes.clone(),
        ))
        .abort_handle()];
        let mut local_socket = None;
        if let Some((listener, path)) = local {
            tracing::info!(node = node_id, %local_addr, path = %path.display(), "transport listening");
            local_socket = Some(path.clone());
            acceptors.push(
                tokio::spawn(accept_loop(
                    shared.clone(),
                    Listener::Local(listener, path),
                    handshakes,
                ))
                .abort_handle(),
            );
        } else {
            tracing::info!(node = node_id, %local_addr, "transport listening");
        }
        Ok((
            Transport {
                shared,
                local_addr,
                acceptors,
                local_socket: Mutex::new(local_socket),
            },
            receiver,
        ))
    }

    /// The socket file the transport listens on, if it does.
    pub fn local_socket(&self) -> Option<PathBuf> {
        self.local_socket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Removes the socket file (once): no process dials this node through it any more.
    fn remove_local_socket(&self) {
        let path = self
            .local_socket
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(path) = path {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(node = self.shared.node_id, path = %path.display(), error = %e, "cannot remove the local socket");
            }
        }
    }

    /// The links that are up, with the kind of connection each runs on, by peer.
    pub fn links(&self) -> Vec<(Peer, LinkKind)> {
        let mut links: Vec<(Peer, LinkKind)> = self
            .shared
            .state()
            .links
            .iter()
            .map(|(peer, link)| (*peer, link.kind))
            .collect();
        links.sort();
        links
    }

    /// What the link with `peer` lent and read, if it is up and local.
    pub fn lending(&self, peer: Peer) -> Option<LendingStats> {
        let state = self.shared.state();
        let lending = state.links.get(&peer)?.lending.as_ref()?;
        Some(LendingStats {
            lends: lending.lends(),
            lent_frames: lending.lent_frames(),
            outstanding: lending.outstanding(),
            copied_parts: lending.copied_parts(),
        })
    }

    /// The address the transport listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.node_id
    }

    /// Moves to view `view_id` (never back): links that broke in an earlier view may reopen, and
    /// new handshakes declare this view.
    pub fn set_view(&self, view_id: u32) {
        let mut state = self.shared.state();
        if view_id > state.view_id {
            state.outside = false;
        }
        state.view_id = state.view_id.max(view_id);
        let current = state.view_id;
        state.broken.retain(|_, broken_in| *broken_in >= current);
    }

    /// This node left its view (removed from the next one while it ran) and asks to join
    /// again: until [`Transport::set_view`] moves to a later view, a broken link may reopen at
    /// once. The rule that keeps a broken link closed protects a view's members from a peer
    /// they suspect; a node outside every view has none to protect.
    pub fn leave_view(&self) {
        let mut state = self.shared.state();
        state.outside = true;
        state.broken.clear();
    }

    /// Records that this node has the addresses of `nodes`: from now on a link with one of
    /// them is made only by the lower id, and this node refuses a dial from one of them in the
    /// other direction. (A dial from a node it does not know is accepted whatever the ids: a
    /// node that joins through this one announces its address only once linked.)
    pub fn know(&self, nodes: impl IntoIterator<Item = NodeId>) {
        self.shared.state().known.extend(nodes);
    }

    /// Dials node `peer` at `addr` and returns once the link is up ([`LinkEvent::Connected`] is
    /// reported too). Only the lower node id dials: see [`frame::dials`].
    pub async fn connect(&self, peer: NodeId, addr: SocketAddr) -> Result<(), ConnectError> {
        self.connect_directed(peer, addr, false).await
    }

    /// As [`Transport::connect`], whatever the ids: a node joining through `peer`, which does
    /// not know it yet (and so cannot dial it), dials it. `peer` refuses with
    /// [`Refusal::WrongDirection`] once it knows this node; it then dials this node itself.
    pub async fn connect_joining(
        &self,
        peer: NodeId,
        addr: SocketAddr,
    ) -> Result<(), ConnectError> {
        self.connect_directed(peer, addr, true).await
    }

    async fn connect_directed(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        any_direction: bool,
    ) -> Result<(), ConnectError> {
        let local = self.shared.node_id;
        if !any_direction && !dials(local, peer) {
            return Err(ConnectError::NotDialer {
                local,
                remote: peer,
            });
        }
        let view_id = {
            let mut state = self.shared.state();
            if state.closing {
                return Err(ConnectError::Closing);
            }
            if state.links.contains_key(&Peer::Node(peer)) || state.dialing.contains(&peer) {
                return Err(ConnectError::AlreadyLinked(peer));
            }
            if state.broke_in_view(peer) {
                return Err(ConnectError::BrokenInView {
                    peer,
                    view_id: state.view_id,
                });
            }
            state.dialing.insert(peer);
            state.view_id
        };
        let result = self.dial(peer, addr, view_id).await;
        let mut state = self.shared.state();
        state.dialing.remove(&peer);
        match result {
            Ok(_) if state.closing => Err(ConnectError::Closing),
            Ok((stream, link_addr, remote_view)) => {
                spawn_link(
                    &self.shared,
                    &mut state,
                    Peer::Node(peer),
                    stream,
                    link_addr,
                    (view_id, remote_view),
                    None,
                );
                Ok(())
            }
            Err(e) => {
                if matches!(e, ConnectError::Handshake(HandshakeError::Authentication)) {
                    tracing::warn!(node = local, peer, %addr, "refused link: the peer does not hold the cluster secret");
                }
                Err(e)
            }
        }
    }

    async fn dial(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        view_id: u32,
    ) -> Result<(Stream, LinkAddr, u32), ConnectError> {
        let handshake = async {
            let (mut stream, link_addr) = Stream::connect(addr, self.shared.local_dir.as_deref())
                .await
                .map_err(ConnectError::Connect)?;
            let acceptor = handshake::dial(
                &mut stream,
                &self.shared.secret,
                Peer::Node(self.shared.node_id),
                Some(peer),
                view_id,
                self.shared.settings.as_ref(),
            )
            .await?;
            Ok((stream, link_addr, acceptor.view_id))
        };
        tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
            .await
            .unwrap_or(Err(ConnectError::Handshake(HandshakeError::TimedOut)))
    }

    /// Queues a message for `peer`, waiting while its link's queue is full. `view_id` must not
    /// decrease from one call to the next for the same peer: the receiver breaks the link if it
    /// does.
    pub async fn send(&self, peer: Peer, view_id: u32, bytes: Bytes) -> Result<(), SendError> {
        self.send_outgoing(peer, view_id, Parts::One(bytes), None)
            .await
    }

    /// As [`Transport::send`], for a message that goes to several peers: its checksum was
    /// computed once, when the [`Payload`] was made, instead of once per link.
    pub async fn send_payload(
        &self,
        peer: Peer,
        view_id: u32,
        payload: &Payload,
    ) -> Result<(), SendError> {
        let (parts, crc) = (payload.parts.clone(), payload.crc.clone());
        self.send_outgoing(peer, view_id, parts, Some(crc)).await
    }

    async fn send_outgoing(
        &self,
        peer: Peer,
        view_id: u32,
        parts: Parts,
        payload_crc: Option<SharedCrc>,
    ) -> Result<(), SendError> {
        let len = parts.len();
        let (queue, budget) = self.link_queue(peer, len)?;
        let permit = budget
            .acquire_many_owned(permits(len))
            .await
            .map_err(|_| SendError::NoLink(peer))?;
        queue
            .send(Outgoing {
                view_id,
                parts,
                payload_crc,
                _budget: Some(permit),
            })
            .await
            .map_err(|_| SendError::NoLink(peer))
    }

    /// Queues a message for `peer` if its link's queue has room, without waiting.
    pub fn try_send(&self, peer: Peer, view_id: u32, bytes: Bytes) -> Result<(), SendError> {
        let (queue, budget) = self.link_queue(peer, bytes.len())?;
        let permit = budget
            .try_acquire_many_owned(permits(bytes.len()))
            .map_err(|_| SendError::Full(peer))?;
        queue
            .try_send(Outgoing {
                view_id,
                parts: Parts::One(bytes),
                payload_crc: None,
                _budget: Some(permit),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full(peer),
                mpsc::error::TrySendError::Closed(_) => SendError::NoLink(peer),
            })
    }

    /// As [`Transport::try_send`], for a [`Payload`] (its parts written without being copied,
    /// its checksum computed when it was made).
    pub fn try_send_payload(
        &self,
        peer: Peer,
        view_id: u32,
        payload: Payload,
    ) -> Result<(), SendError> {
        let Payload { parts, crc } = payload;
        let len = parts.len();
        let (queue, budget) = self.link_queue(peer, len)?;
        let permit = budget
            .try_acquire_many_owned(permits(len))
            .map_err(|_| SendError::Full(peer))?;
        queue
            .try_send(Outgoing {
                view_id,
                parts,
                payload_crc: Some(crc),
                _budget: Some(permit),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::Full(peer),
                mpsc::error::TrySendError::Closed(_) => SendError::NoLink(peer),
            })
    }

    fn link_queue(
        &self,
        peer: Peer,
        len: usize,
    ) -> Result<(mpsc::Sender<Outgoing>, Arc<Semaphore>), SendError> {
        if len > FRAME_PAYLOAD_MAX {
            return Err(SendError::TooLarge(len));
        }
        let state = self.shared.state();
        let link = state.links.get(&peer).ok_or(SendError::NoLink(peer))?;
        Ok((link.queue.clone(), link.budget.clone()))
    }

    /// Whether a link with `peer` is up.
    pub fn is_linked(&self, peer: Peer) -> bool {
        self.shared.state().links.contains_key(&peer)
    }

    /// Closes every link in order, as a node that stops does: each writes the frames queued,
    /// then a bye, so its peers learn that it stopped rather than find a dead connection. Waits
    /// for that at most [`CLOSE_WAIT_MS`]; no link is made afterwards. No event is reported for
    /// these links.
    pub async fn close(&self) {
        self.remove_local_socket();
        let links: Vec<Link> = {
            let mut state = self.shared.state();
            state.closing = true;
            state.links.drain().map(|(_, link)| link).collect()
        };
        let mut writers = Vec::with_capacity(links.len());
        for link in links {
            let Link {
                supervisor, writer, ..
            } = link;
            supervisor.abort();
            writers.push(writer);
        }
        let written = async {
            for writer in writers {
                let _ = writer.await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_WAIT_MS), written).await;
    }

    /// Closes the link with `peer` in order: frames already queued are written, then a bye. No
    /// event is reported for it. Returns whether there was a link.
    pub fn disconnect(&self, peer: Peer) -> bool {
        let link = self.shared.state().links.remove(&peer);
        match link {
            Some(link) => {
                link.supervisor.abort();
                true
            }
            None => false,
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        for acceptor in &self.acceptors {
            acceptor.abort();
        }
        self.remove_local_socket();
        let links: Vec<Link> = self
            .shared
            .state()
            .links
            .drain()
            .map(|(_, link)| link)
            .collect();
        for link in links {
            link.supervisor.abort();
        }
    }
}

/// Semaphore permits for a payload: its length, and at least one so empty frames count too.
fn permits(len: usize) -> u32 {
    // len <= FRAME_PAYLOAD_MAX <= u32::MAX, checked by the caller.
    len.max(1) as u32
}

async fn accept_loop(shared: Arc<Shared>, listener: Listener, handshakes: Arc<Semaphore>) {
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Running out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(node = shared.node_id, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::warn!(node = shared.node_id, %addr, "too many handshakes in progress; closing connection");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            accept_connection(shared, stream, addr).await;
            drop(permit);
        });
    }
}

async fn accept_connection(shared: Arc<Shared>, mut stream: Stream, addr: LinkAddr) {
    let node_id = shared.node_id;
    let view_id = {
        let state = shared.state();
        if state.closing {
            return;
        }
        state.view_id
    };
    let handshake = handshake::accept(
        &mut stream,
        &shared.secret,
        node_id,
        view_id,
        shared.settings.as_ref(),
    );
    let hello = match tokio::time::timeout(Duration::from_millis(HANDSHAKE_TIMEOUT_MS), handshake)
        .await
        .unwrap_or(Err(HandshakeError::TimedOut))
    {
        Ok(hello) => hello,
        Err(e) => {
            tracing::warn!(node = node_id, %addr, error = %e, "refused connection");
            return;
        }
    };
    let peer = hello.dialer;
    let refusal = {
        let mut state = shared.state();
        if state.closing {
            return;
        }
        let refusal = admit(&mut state, node_id, &hello, shared.settings.as_ref());
        if refusal.is_none() {
            // Its settings agree now: a later difference is logged again.
            state.settings_refused.remove(&hello.dialer);
            spawn_link(
                &shared,
                &mut state,
                peer,
                stream,
                addr,
                (view_id, hello.view_id),
                Some(handshake::VERDICT_ACCEPTED),
            );
            return;
        }
        refusal
    };
    if let Some(refusal) = refusal {
        tracing::warn!(node = node_id, ?peer, %addr, ?refusal, "refused link");
        let _ = stream.write_all(&[refusal as u8]).await;
        let _ = stream.shutdown().await;
    }
}

/// Decides whether an authenticated dialer gets a link.
fn admit(
    state: &mut State,
    node_id: NodeId,
    hello: &handshake::Hello,
    settings: Option<&GroupSettings>,
) -> Option<Refusal> {
    if hello.expected.is_some_and(|expected| expected != node_id) {
        return Some(Refusal::WrongNode);
    }
    if let Some(differences) = handshake::settings_differ(settings, hello.settings.as_ref()) {
        // Once per dialer: it dials again and again until its configuration changes.
        if state.settings_refused.insert(hello.dialer) {
            tracing::warn!(node = node_id, peer = ?hello.dialer, "refused link: the peer's group settings differ from this node's: {differences}; every member must have the same");
        }
        return Some(Refusal::SettingsDiffer);
    }
    if state.links.contains_key(&hello.dialer) {
        return Some(Refusal::Duplicate);
    }
    if let Peer::Node(peer) = hello.dialer {
        if peer == node_id || (!dials(peer, node_id) && state.known.contains(&peer)) {
            return Some(Refusal::WrongDirection);
        }
        if state.broke_in_view(peer) {
            return Some(Refusal::BrokenInView);
        }
    }
    None
}

/// Registers a link and starts its writer and its supervisor. `views` are the views this side
/// and the peer declared in the handshake.
fn spawn_link(
    shared: &Arc<Shared>,
    state: &mut State,
    peer: Peer,
    stream: Stream,
    addr: LinkAddr,
    views: (u32, u32),
    prefix: Option<u8>,
) {
    let (local_view, remote_view) = views;
    let serial = state.next_serial;
    state.next_serial += 1;
    let kind = addr.kind();
    let lending = match &stream {
        stream::Stream::Local(local) => Some(Lending::new(
            local.peer(),
            true,
            format!("node {} to {peer:?}", shared.node_id),
            matches!(peer, Peer::Node(_)),
        )),
        stream::Stream::Tcp(_) => None,
    };
    let (read, write) = stream.into_split();
    let (queue, queued) = mpsc::channel(LINK_QUEUE_MAX);
    let (failed, writer_failed) = oneshot::channel();
    let sum = PayloadSum::of(kind);
    let writer = tokio::spawn(write_frames(
        write,
        queued,
        prefix,
        (local_view, sum),
        lending.clone(),
        failed,
    ));
    let supervisor = tokio::spawn(supervise(
        shared.clone(),
        peer,
        serial,
        addr,
        remote_view,
        (read, lending.clone()),
        writer_failed,
        writer.abort_handle(),
    ));
    state.links.insert(
        peer,
        Link {
            serial,
            kind,
            queue,
            budget: Arc::new(Semaphore::new(LINK_QUEUE_BYTES_MAX)),
            supervisor: supervisor.abort_handle(),
            writer,
            lending,
        },
    );
}

/// Reports the link up, forwards its frames, and reports its end: the first of a read failure
/// and a write failure.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    shared: Arc<Shared>,
    peer: Peer,
    serial: u64,
    addr: LinkAddr,
    remote_view: u32,
    (read, lending): (ReadHalf, Option<Arc<Lending>>),
    writer_failed: oneshot::Receiver<BreakReason>,
    writer: AbortHandle,
) {
    let node = shared.node_id;
    let sum = PayloadSum::of(addr.kind());
    // Clients come and go all the time; only links between nodes are news.
    match peer {
        Peer::Node(_) => tracing::info!(node, ?peer, %addr, kind = %addr.kind(), "link up"),
        Peer::Client(_) => tracing::debug!(node, ?peer, %addr, kind = %addr.kind(), "link up"),
    }
    let connected = LinkEvent::Connected {
        peer,
        addr: addr.clone(),
        view_id: remote_view,
    };
    let reason = if shared.events.send(connected).await.is_err() {
        BreakReason::Shutdown
    } else {
        let forward = async {
            let mut reader = BufReader::with_capacity(IO_BUFFER_BYTES, read);
            let mut inbound = Inbound::new(remote_view);
            loop {
                let read = read_frame(&mut reader, &mut inbound, sum, lending.as_deref()).await;
                let (view_id, bytes) = match read {
                    Ok(frame) => frame,
                    Err(reason) => return reason,
                };
                let frame = LinkEvent::Frame {
                    peer,
                    view_id,
                    bytes,
                };
                if shared.events.send(frame).await.is_err() {
                    return BreakReason::Shutdown;
                }
            }
        };
        tokio::select! {
            reason = forward => reason,
            Ok(reason) = writer_failed => reason,
        }
    };
    writer.abort();
    let current = {
        let mut state = shared.state();
        let current = state
            .links
            .get(&peer)
            .is_some_and(|link| link.serial == serial);
        if current {
            state.links.remove(&peer);
            if let Peer::Node(peer) = peer {
                let view_id = state.view_id;
                state.broken.insert(peer, view_id);
            }
        }
        current
    };
    if current {
        // A client closing its link, in order or not, is ordinary; a node's link ending is not.
        match (peer, &reason) {
            (Peer::Client(_), BreakReason::PeerClosed | BreakReason::Eof) => {
                tracing::debug!(node, ?peer, %addr, %reason, "link closed")
            }
            _ => tracing::warn!(node, ?peer, %addr, %reason, "link broken"),
        }
        let _ = shared.events.send(LinkEvent::Broken { peer, reason }).await;
    }
}
