//! The DerechoFS group engine, sans-IO.
//!
//! A [`Node`] is the protocol state machine of one member of a view. Its driver (the TCP node
//! process, or the simulator in `derechofs-tests`) feeds it inputs with the current time,
//! `node.step(now_us, input, &mut actions)`, and carries out the [`Action`]s it returns: send a
//! message to a peer, deliver ordered requests to the state machine, persist versions. The engine
//! never reads a clock, a socket or a file, so a whole cluster runs deterministically in one thread.
//!
//! Words, each with one meaning:
//! - *received*: a message arrived from its sender on the FIFO link; counted per sender in the row.
//! - *stable*: every member of the shard has received it (the minimum of the rows covers it).
//! - *delivered*: handed to the state machine, in sequence order, once stable.
//! - *persisted*: made durable on this member's log; *durable*: persisted on every member.
//! - *version*: `(view_id << 32) | seq` of a delivered non-null message.
//! - *stamp*: the hybrid logical clock of a version, identical at every replica.
//! - *frontier*: the persistence frontier (highest version durable) and the stability frontier
//!   (a stamp at or below which the shard's history can no longer change).
//!
//! A suspicion wedges the node; the leader then runs the view change (`view_change`): it
//! decides who leaves and each shard's ragged trim, members log the decision, deliver exactly
//! up to the trims, persist, and install the next view. Nodes join through any member
//! (`Node::joining`), are added by the same decision, and get the logs of the shards they are
//! given by state transfer (`transfer`), in bounded pieces. After every member stopped, they
//! come back with `Node::restarting` and a quorum restarts the group from the longest logs.

mod bounds;
mod config;
mod error;
pub mod hlc;
pub mod kv;
mod layout;
mod lease;
mod message;
mod multicast;
mod node;
pub mod protocol;
mod row;
mod stability;
mod suspicion;
mod transfer;
pub mod transport;
mod view;
mod view_change;
mod wire;

pub use bounds::*;
pub use config::{Config, ConfigError};
pub use derechofs_storage::{version_of, Hlc, Version};
pub use error::{Rejection, StepError, SubmitError};
pub use layout::{Layout, LayoutError, LayoutSpec, Shard, ShardId, Subgroup};
pub use message::{Batch, Body, Decision, Message, Record, Request};
pub use multicast::Barrier;
pub use node::{Action, Counters, Delivery, Input, Membership, Node, Now, ShardStatus};
pub use row::Row;
pub use view::{NodeId, View, ViewError};
pub use wire::DecodeError;
