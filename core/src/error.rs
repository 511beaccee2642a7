//! Errors of one step: input from a peer that the engine refuses, and local submits it cannot
//! take. Neither is a bug of this node; both are counted and reported, never a panic.

use crate::layout::ShardId;
use crate::view::NodeId;

/// Why a message from a peer was refused. The message is dropped and counted; nothing of it is
/// applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The message belongs to another view.
    #[error("message of view {got}, this node is in view {expected}")]
    WrongView {
        /// The view id in the message.
        got: u32,
        /// This node's view id.
        expected: u32,
    },
    /// The sender is not a member of this view.
    #[error("node {0} is not a member of this view")]
    UnknownSender(NodeId),
    /// A message claims to come from this node itself.
    #[error("a message claims to come from this node")]
    FromSelf,
    /// The shard is not in this view's layout.
    #[error("{0} is not in the layout")]
    UnknownShard(ShardId),
    /// The sender, or this node, is not a member of the shard.
    #[error("{shard}: node {node} is not a member")]
    NotInShard {
        /// The shard.
        shard: ShardId,
        /// The node that is not a member.
        node: NodeId,
    },
    /// A data message that is not the next one of its sender: FIFO was broken.
    #[error("{shard}: sender rank {sender} sent message {got}, expected {expected}")]
    OutOfOrder {
        /// The shard.
        shard: ShardId,
        /// The sender's rank in the shard.
        sender: u32,
        /// The index this node expected.
        expected: u64,
        /// The index in the message.
        got: u64,
    },
    /// A sender ran further ahead than any window allows.
    #[error("{shard}: sender rank {sender} exceeded the flow control window")]
    WindowExceeded {
        /// The shard.
        shard: ShardId,
        /// The sender's rank in the shard.
        sender: u32,
    },
    /// A row whose number of senders does not match the shard.
    #[error("{shard}: row of sender rank {sender} has the wrong shape")]
    RowShape {
        /// The shard.
        shard: ShardId,
        /// The sender's rank in the shard.
        sender: u32,
    },
    /// A row with a counter below the previous row of the same member, or one that counts data
    /// that has not arrived.
    #[error("{shard}: row of sender rank {sender} goes back or runs ahead of its data")]
    RowRegressed {
        /// The shard.
        shard: ShardId,
        /// The sender's rank in the shard.
        sender: u32,
    },
    /// A value outside what any correct member sends.
    #[error("value out of range: {0}")]
    OutOfRange(&'static str),
}

/// Why a local request was not taken. The client may retry later or at another replica.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// This node does not replicate the shard.
    #[error("this node does not replicate {0}")]
    NotReplica(ShardId),
    /// The shard is wedged until the next view; the request must be retried then.
    #[error("{0} is wedged awaiting a view change")]
    Wedged(ShardId),
    /// The payload exceeds `REQUEST_BYTES_MAX`.
    #[error("request of {0} bytes is too large")]
    TooLarge(usize),
    /// This node is wedged and the members it still trusts are no majority of its view: it can
    /// install no next view, so it takes no write. It may still answer reads at times at or
    /// below its stability frontier, which can no longer change.
    #[error("no majority of the view is reachable: writes are refused")]
    NoMajority,
    /// The next view left this node out; it must join again.
    #[error("this node was removed from the view")]
    Removed,
    /// The view is inadequate (some shard is below its minimum size): the group waits for
    /// joins.
    #[error("the view is inadequate; waiting for joins")]
    Inadequate,
    /// This node is not a member yet: it is joining the group.
    #[error("this node is joining the group")]
    Joining,
    /// This node joined the shard and is still receiving its state: it serves once caught up.
    #[error("{0} is still being transferred to this node")]
    CatchingUp(ShardId),
    /// The shard's queue of requests waiting for the window is full.
    #[error("{0}: too many requests waiting; retry later")]
    QueueFull(ShardId),
}

/// What went wrong in one step. The step still did everything else it could.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// A peer's message was refused.
    #[error("message from node {from} refused: {rejection}")]
    Rejected {
        /// The peer.
        from: NodeId,
        /// Why.
        rejection: Rejection,
    },
    /// A local request was not taken.
    #[error(transparent)]
    Submit(#[from] SubmitError),
}
