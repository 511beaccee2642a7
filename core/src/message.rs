//! The messages members exchange. Every message carries the sender's view id.

use std::net::SocketAddr;

use bytes::Bytes;
use derechofs_storage::{Hlc, Version};

use crate::layout::ShardId;
use crate::row::Row;
use crate::view::{NodeId, View};

/// A client request as the engine sees it: opaque bytes, the HLC the client carried, and an id
/// the submitting node's driver chose so it can match the delivery to its client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Chosen by the submitting node's driver; opaque to the engine, delivered with the request.
    pub id: u64,
    /// The client's hybrid logical clock when it sent the request, ticked past every stamp the
    /// client has seen, so the request's version is stamped strictly after all of them.
    pub client_hlc: Hlc,
    /// The operation, for the shard's state machine to decode.
    pub payload: Bytes,
}

/// Requests a sender multicasts together as one message, hence one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The sender's stamp: its wall clock at send, or a later client HLC of the requests.
    pub stamp: Hlc,
    /// The requests, applied in this order within the version.
    pub requests: Vec<Request>,
}

/// What a multicast message carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Consumes its sequence number so the round-robin order keeps moving; creates no version.
    Null,
    /// A batch of requests; creates one version.
    Batch(Batch),
}

/// A message between members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Message number `index` of its sender in `shard`'s multicast; its sequence number is
    /// `index * senders + sender rank`.
    Data {
        /// The sender's view.
        view_id: u32,
        /// The shard it is multicast in.
        shard: ShardId,
        /// How many messages the sender sent in this shard before this one.
        index: u64,
        /// Null or a batch.
        body: Body,
    },
    /// The sender's newest row of counters for `shard`; it replaces any older row.
    Row {
        /// The sender's view.
        view_id: u32,
        /// The shard the row belongs to.
        shard: ShardId,
        /// The counters.
        row: Row,
    },
    /// Liveness, and the sender's suspicions over view ranks for the members outside its shards.
    /// Sent to each peer on its own, so it also carries that peer's read lease (see
    /// `Node::holds_read_lease`).
    Heartbeat {
        /// The sender's view.
        view_id: u32,
        /// Bit `r` set: the sender suspects the member of view rank `r`.
        suspicions: u64,
        /// The sender's timer clock (`Now::mono_us`) when it sent this heartbeat, in µs.
        sent_us: u64,
        /// The `sent_us` of the newest heartbeat the sender received from the receiver in this
        /// view; 0 if none, or if the sender ever suspected the receiver in this view.
        echo_us: u64,
    },
    /// View change, phase 1: the leader asks every member it does not suspect to promise
    /// `round` and to report what it received.
    Propose {
        /// The view being changed.
        view_id: u32,
        /// The leader's round: `attempt * VIEW_MEMBERS_MAX + leader rank`, unique per leader.
        round: u64,
        /// The leader's suspicions; the member adopts them, which wedges it.
        suspicions: u64,
    },
    /// View change, phase 1 answer. `promised > round` refuses: a higher round was promised.
    Ack {
        /// The view being changed.
        view_id: u32,
        /// The round answered.
        round: u64,
        /// The highest round the member promised.
        promised: u64,
        /// The member's suspicions.
        suspicions: u64,
        /// Per shard the member replicates: its received counters, frozen since it wedged.
        counts: Vec<(ShardId, Vec<u64>)>,
        /// The decision the member accepted in an earlier round, with that round.
        accepted: Option<(u64, Decision)>,
        /// In a total restart, per shard whose log the member holds: the last record of its
        /// log (`None`: empty). Empty in an ordinary view change.
        logs: Vec<(ShardId, Option<(Version, Hlc)>)>,
        /// Per shard the member replicates (as for `counts`): the highest stability floor it
        /// published in the view. Empty in a total restart.
        floors: Vec<(ShardId, Hlc)>,
    },
    /// View change, phase 2: the leader asks the members to log `decision` and accept it.
    Accept {
        /// The view being changed.
        view_id: u32,
        /// The leader's round.
        round: u64,
        /// The proposed change and its ragged trims.
        decision: Decision,
    },
    /// View change, phase 2 answer, the echo of the trim: the member logged the decision.
    Accepted {
        /// The view being changed.
        view_id: u32,
        /// The round accepted.
        round: u64,
    },
    /// The decision is chosen (logged by a majority of the view): apply it. Also the answer to
    /// any message of the view it ends, so a member that missed the commit catches up.
    Commit {
        /// The view being changed.
        view_id: u32,
        /// The round that chose it.
        round: u64,
        /// The chosen change and its ragged trims.
        decision: Decision,
    },
    /// A node asks to join the group. `view_id` is the last view it installed (0 if none): a
    /// member of the current view that asks again in that same view restarted.
    Join {
        /// The last view the joiner installed.
        view_id: u32,
        /// Where the members reach the joiner (its listening address), if it announces one:
        /// the decision that adds it carries it into the view, for members whose configuration
        /// does not list the joiner.
        addr: Option<SocketAddr>,
    },
    /// The answer of a member that does not lead: ask `leader` instead.
    Redirect {
        /// The member's view.
        view_id: u32,
        /// The leader, as the member sees it.
        leader: NodeId,
    },
    /// The view a joiner was added to, sent by its members when they install it.
    Welcome {
        /// The view.
        view: View,
    },
    /// State transfer: a member that joined `shard` asks a member that has its log for the
    /// records after `after` (from the start if `None`) up to where the shard's log stood when
    /// `view_id` began.
    Fetch {
        /// The current view of both.
        view_id: u32,
        /// The shard.
        shard: ShardId,
        /// The joiner's last record.
        after: Option<Version>,
    },
    /// State transfer: the answer to a `Fetch`, records after `after` in version order, at
    /// most `TRANSFER_PIECE_BYTES_MAX` bytes of them (or one larger record alone).
    Piece {
        /// The current view of both.
        view_id: u32,
        /// The shard.
        shard: ShardId,
        /// The `after` of the fetch it answers.
        after: Option<Version>,
        /// Where the shard's log stood when the view began, the end of the transfer; `None`
        /// if the log was empty. Absent when the member cannot serve (it is catching up
        /// itself): `ready` is then false and the joiner asks another member.
        end: Option<(Version, Hlc)>,
        /// The member can serve this shard.
        ready: bool,
        /// The stamp every version of the shard in this view is above (the view change's
        /// floor, `Decision::floors`): the joiner starts stamping above it and the end's stamp.
        floor: Hlc,
        /// The records.
        records: Vec<Record>,
    },
}

/// One version of a shard's log as state transfer carries it: the driver's encoding of the
/// version's delta, opaque to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The version.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
    /// The delta, as the driver encodes it.
    pub payload: Bytes,
}

/// The outcome of one view change: who leaves, who joins, and where each shard's old view
/// ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Bit `r` set: the member of old view rank `r` is not in the next view.
    pub removed: u64,
    /// Nodes added, in the rank order they take after the members that stay. A node removed
    /// by this decision may join again in it (it restarted).
    pub joined: Vec<NodeId>,
    /// Per shard of the old layout, in shard id order: per sender (shard rank), how many of its
    /// messages every member delivers in the old view — the ragged trim.
    pub trims: Vec<Vec<u64>>,
    /// Empty in an ordinary change. In a total restart (the change of a view every member of
    /// which stopped), per shard of the old layout, in shard id order: the last record of the
    /// longest log the restart quorum reported, where the shard's log stands when the next
    /// view begins; members whose log is shorter fetch the rest by state transfer.
    pub ends: Vec<Option<(Version, Hlc)>>,
    /// The addresses the nodes of `joined` announced in their joins, in the order of `joined`
    /// (a joiner that announced none has no entry). The next view carries them.
    pub addrs: Vec<(NodeId, SocketAddr)>,
    /// Empty in a total restart. Otherwise, per shard of the old layout, in shard id order: the
    /// highest stability floor the reporting members of the shard published in the old view.
    /// Every version of the shard in the next view is stamped above it, so no frontier built
    /// in the old view, at any member, is passed by a later version, whatever the clock of the
    /// member that sends it (one new to the shard may run behind).
    pub floors: Vec<Hlc>,
}

impl Message {
    /// The view the sender was in.
    pub fn view_id(&self) -> u32 {
        match self {
            Message::Join { view_id, .. }
            | Message::Redirect { view_id, .. }
            | Message::Fetch { view_id, .. }
            | Message::Piece { view_id, .. } => *view_id,
            Message::Welcome { view } => view.view_id,
            Message::Data { view_id, .. }
            | Message::Row { view_id, .. }
            | Message::Heartbeat { view_id, .. }
            | Message::Propose { view_id, .. }
            | Message::Ack { view_id, .. }
            | Message::Accept { view_id, .. }
            | Message::Accepted { view_id, .. }
            | Message::Commit { view_id, .. } => *view_id,
        }
    }
}

impl Body {
    /// Bytes of request payload it carries.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Body::Null => 0,
            Body::Batch(batch) => batch.requests.iter().map(|r| r.payload.len()).sum(),
        }
    }
}
