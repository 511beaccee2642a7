//! A member's protocol state machine: inputs in, actions out.

use derechofs_storage::{Hlc, Version};

use crate::config::{Config, ConfigError};
use crate::error::{Rejection, StepError, SubmitError};
use crate::layout::ShardId;
use crate::message::{Message, Request};
use crate::multicast::Multicast;
use crate::row::Row;
use crate::suspicion::Suspicion;
use crate::view::{NodeId, View};

/// Something that happened to the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Time passed; heartbeats, floors and suspicions are due on ticks. Drive it at least every
    /// few milliseconds.
    Tick,
    /// A message from a peer, decoded, in the order the FIFO link from that peer carried it.
    Message {
        /// The peer it came from, as authenticated by the transport.
        from: NodeId,
        /// The message.
        message: Message,
    },
    /// A local client request to be multicast in `shard`, which this node must replicate.
    Submit {
        /// The shard that owns the request.
        shard: ShardId,
        /// The request.
        request: Request,
    },
    /// The driver made every version of `shard` up to `version` durable in this node's log.
    Persisted {
        /// The shard.
        shard: ShardId,
        /// The highest version now durable; one the node asked to persist, or below it.
        version: Version,
    },
}

/// One delivered message: one version, identical at every replica of the shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// `(view_id << 32) | seq`.
    pub version: Version,
    /// The version's stamp; strictly increasing along the shard's log.
    pub hlc: Hlc,
    /// The member that multicast it; its driver matches `requests` to its clients by id.
    pub sender: NodeId,
    /// The requests, to apply in this order.
    pub requests: Vec<Request>,
}

/// What the driver must do, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `message` to `to` on the FIFO link to it. Messages to one peer must leave in the
    /// order of the actions: a row counts the data sent before it.
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        message: Message,
    },
    /// Apply these versions to the shard's state machine, in order, and append them to its log.
    Deliver {
        /// The shard.
        shard: ShardId,
        /// The versions, in log order.
        deliveries: Vec<Delivery>,
    },
    /// Make every version of `shard` up to `version` durable, then report it with
    /// [`Input::Persisted`]; requests may be merged (persisting a later version covers this one).
    Persist {
        /// The shard.
        shard: ShardId,
        /// The highest version to persist.
        version: Version,
    },
    /// This node now suspects `node` (silent, or suspected by another member).
    Suspect {
        /// The suspected member.
        node: NodeId,
    },
    /// Every shard of this node stopped sending and delivering new messages: the view must
    /// change. Reported once.
    Wedge,
}

/// What happened so far, for status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Peer messages refused.
    pub messages_rejected: u64,
    /// Local requests not taken.
    pub submits_refused: u64,
    /// Multicast messages sent that carry requests.
    pub batches_sent: u64,
    /// Null multicast messages sent.
    pub nulls_sent: u64,
    /// Row pushes sent.
    pub rows_sent: u64,
    /// Heartbeats sent.
    pub heartbeats_sent: u64,
    /// Versions delivered, over all shards.
    pub versions_delivered: u64,
}

/// A snapshot of one shard at this node, for `derechofs status` and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardStatus {
    /// The shard.
    pub shard: ShardId,
    /// Its members in rank order.
    pub members: Vec<NodeId>,
    /// This node's row, as last written.
    pub row: Row,
    /// The last version delivered here and its stamp.
    pub last_delivered: Option<(Version, Hlc)>,
    /// The highest version persisted on every member.
    pub persistence_frontier: Option<Version>,
    /// Every version stamped at or below it is persisted here and final.
    pub stability_frontier: Hlc,
    /// Local requests waiting for the window.
    pub pending_requests: usize,
    /// Stopped until the view changes.
    pub wedged: bool,
}

/// A member's protocol state machine for one view.
#[derive(Debug)]
pub struct Node {
    config: Config,
    view: View,
    rank: usize,
    /// Indexed by shard id; `None` for shards this node does not replicate.
    shards: Vec<Option<Multicast>>,
    suspicion: Suspicion,
    now_us: u64,
    started: bool,
    next_heartbeat_us: u64,
    wedged: bool,
    counters: Counters,
}

impl Node {
    /// The state machine of `config.node_id` in `view`, before anything happened.
    pub fn new(config: Config, view: View) -> Result<Node, ConfigError> {
        config.validate()?;
        let rank = view
            .rank_of(config.node_id)
            .ok_or(ConfigError::NotAMember(config.node_id))?;
        let shards = view
            .layout
            .shards()
            .iter()
            .map(|shard| {
                let position = shard.members.iter().position(|&m| m == config.node_id)?;
                let members = shard.members.clone();
                Some(Multicast::new(
                    shard.id,
                    view.view_id,
                    members,
                    position,
                    &config,
                ))
            })
            .collect();
        let suspicion = Suspicion::new(
            rank,
            view.members.len(),
            config.suspect_after_ms.saturating_mul(1000),
        );
        Ok(Node {
            config,
            rank,
            shards,
            suspicion,
            now_us: 0,
            started: false,
            next_heartbeat_us: 0,
            wedged: false,
            counters: Counters::default(),
            view,
        })
    }

    /// Handles one input at time `now_us` (microseconds since the Unix epoch, from this node's
    /// clock; a clock going back is treated as standing still) and appends the resulting actions
    /// to `out`. An error reports a refused message or request; everything else the step had to
    /// do is done and its actions are in `out` all the same.
    pub fn step(
        &mut self,
        now_us: u64,
        input: Input,
        out: &mut Vec<Action>,
    ) -> Result<(), StepError> {
        self.now_us = self.now_us.max(now_us);
        if !self.started {
            self.started = true;
            self.suspicion.start(self.now_us);
            self.next_heartbeat_us = self.now_us;
        }
        let result = match input {
            Input::Tick => {
                self.tick(out);
                Ok(())
            }
            Input::Message { from, message } => {
                self.receive(from, message, out).map_err(|rejection| {
                    self.counters.messages_rejected += 1;
                    StepError::Rejected { from, rejection }
                })
            }
            Input::Submit { shard, request } => self.submit(shard, request).map_err(|error| {
                self.counters.submits_refused += 1;
                StepError::Submit(error)
            }),
            Input::Persisted { shard, version } => {
                self.shard_mut(shard)
                    .expect("persisted a shard this node does not replicate")
                    .persisted(version);
                Ok(())
            }
        };
        self.progress(out);
        result
    }

    fn shard_mut(&mut self, shard: ShardId) -> Option<&mut Multicast> {
        self.shards
            .get_mut(usize::from(shard.0))
            .and_then(Option::as_mut)
    }

    fn shard_ref(&self, shard: ShardId) -> Option<&Multicast> {
        self.shards
            .get(usize::from(shard.0))
            .and_then(Option::as_ref)
    }

    fn submit(&mut self, shard: ShardId, request: Request) -> Result<(), SubmitError> {
        let multicast = self
            .shard_mut(shard)
            .ok_or(SubmitError::NotReplica(shard))?;
        multicast.submit(request)
    }

    fn tick(&mut self, out: &mut Vec<Action>) {
        let silent = self.suspicion.silent(self.now_us);
        if silent != 0 {
            self.suspect(silent, out);
        }
        if self.now_us >= self.next_heartbeat_us {
            self.next_heartbeat_us = self.now_us + self.config.heartbeat_ms * 1000;
            let suspicions = self.suspicion.suspected();
            for (rank, &peer) in self.view.members.iter().enumerate() {
                if rank != self.rank {
                    let message = Message::Heartbeat {
                        view_id: self.view.view_id,
                        suspicions,
                    };
                    out.push(Action::Send { to: peer, message });
                    self.counters.heartbeats_sent += 1;
                }
            }
            for multicast in self.shards.iter_mut().flatten() {
                multicast.publish_floor(self.now_us);
            }
        }
    }

    fn receive(
        &mut self,
        from: NodeId,
        message: Message,
        out: &mut Vec<Action>,
    ) -> Result<(), Rejection> {
        let from_rank = self
            .view
            .rank_of(from)
            .ok_or(Rejection::UnknownSender(from))?;
        if from_rank == self.rank {
            return Err(Rejection::FromSelf);
        }
        let view_id = message.view_id();
        if view_id != self.view.view_id {
            return Err(Rejection::WrongView {
                got: view_id,
                expected: self.view.view_id,
            });
        }
        self.suspicion.heard(from_rank, self.now_us);
        match message {
            Message::Data {
                shard, index, body, ..
            } => {
                let (multicast, sender) = self.shard_member(shard, from)?;
                multicast.receive_data(sender, index, body)
            }
            Message::Row { shard, row, .. } => {
                self.check_suspicions(row.suspicions)?;
                let (multicast, sender) = self.shard_member(shard, from)?;
                let suspicions = multicast.receive_row(sender, row)?;
                self.suspect(suspicions, out);
                Ok(())
            }
            Message::Heartbeat { suspicions, .. } => {
                self.check_suspicions(suspicions)?;
                self.suspect(suspicions, out);
                Ok(())
            }
        }
    }

    fn check_suspicions(&self, suspicions: u64) -> Result<(), Rejection> {
        let members = self.view.members.len();
        if members < 64 && suspicions >> members != 0 {
            return Err(Rejection::OutOfRange("suspicion of a rank beyond the view"));
        }
        Ok(())
    }

    /// The multicast of `shard` and the shard rank of `from` in it.
    fn shard_member(
        &mut self,
        shard: ShardId,
        from: NodeId,
    ) -> Result<(&mut Multicast, usize), Rejection> {
        if self.view.layout.shard(shard).is_none() {
            return Err(Rejection::UnknownShard(shard));
        }
        let me = self.config.node_id;
        let multicast = self
            .shard_mut(shard)
            .ok_or(Rejection::NotInShard { shard, node: me })?;
        let sender = multicast
            .rank_of(from)
            .ok_or(Rejection::NotInShard { shard, node: from })?;
        Ok((multicast, sender))
    }

    /// Adds suspicions (a mask over view ranks); any suspicion wedges every shard of this node.
    fn suspect(&mut self, mask: u64, out: &mut Vec<Action>) {
        let new = self.suspicion.merge(mask);
        if new == 0 {
            return;
        }
        for (rank, &node) in self.view.members.iter().enumerate() {
            if new & (1 << rank) != 0 {
                out.push(Action::Suspect { node });
            }
        }
        let suspicions = self.suspicion.suspected();
        for multicast in self.shards.iter_mut().flatten() {
            multicast.set_suspicions(suspicions);
            multicast.wedge();
        }
        if !self.wedged {
            self.wedged = true;
            out.push(Action::Wedge);
        }
    }

    /// After any input: deliver what became stable, send what the window allows, and push the
    /// rows that changed, after the data they count.
    fn progress(&mut self, out: &mut Vec<Action>) {
        for multicast in self.shards.iter_mut().flatten() {
            let delivered = multicast.deliver(out);
            self.counters.versions_delivered += delivered as u64;
            let (batches, nulls) = multicast.send(self.now_us, &self.config, out);
            self.counters.batches_sent += batches;
            self.counters.nulls_sent += nulls;
            self.counters.rows_sent += multicast.push_row(out) as u64;
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// The view this node is in.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// What happened so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether this node stopped its shards, awaiting a view change.
    pub fn is_wedged(&self) -> bool {
        self.wedged
    }

    /// The members this node suspects.
    pub fn suspected(&self) -> Vec<NodeId> {
        let mask = self.suspicion.suspected();
        let members = self.view.members.iter().enumerate();
        members
            .filter(|&(rank, _)| mask & (1 << rank) != 0)
            .map(|(_, &node)| node)
            .collect()
    }

    /// The shards this node replicates.
    pub fn shards(&self) -> impl Iterator<Item = ShardId> + '_ {
        self.shards
            .iter()
            .enumerate()
            .filter(|(_, m)| m.is_some())
            .map(|(i, _)| ShardId(i as u16))
    }

    /// The stamp at or below which `shard`'s history is final and persisted here: a read at a
    /// time `T` at or below it may be answered from this replica's log, and every replica
    /// answers it the same. `None` if this node does not replicate the shard.
    pub fn stability_frontier(&self, shard: ShardId) -> Option<Hlc> {
        self.shard_ref(shard).map(Multicast::stability_frontier)
    }

    /// The highest version of `shard` persisted on every member, as far as this node knows: a
    /// write at or below it is durable. `None` if nothing is durable yet or this node does not
    /// replicate the shard.
    pub fn persistence_frontier(&self, shard: ShardId) -> Option<Version> {
        self.shard_ref(shard)
            .and_then(Multicast::persistence_frontier)
    }

    /// A snapshot of `shard` at this node.
    pub fn status(&self, shard: ShardId) -> Option<ShardStatus> {
        let multicast = self.shard_ref(shard)?;
        Some(ShardStatus {
            shard,
            members: multicast.members().to_vec(),
            row: multicast.own_row().clone(),
            last_delivered: multicast.last_delivered(),
            persistence_frontier: multicast.persistence_frontier(),
            stability_frontier: multicast.stability_frontier(),
            pending_requests: multicast.pending_requests(),
            wedged: multicast.is_wedged(),
        })
    }
}
