//! A member's protocol state machine: inputs in, actions out.

use std::collections::{BTreeMap, VecDeque};

use derechofs_storage::{Hlc, Version};

use crate::bounds::{FUTURE_MESSAGES_MAX, ROUND_MAX, VIEW_MEMBERS_MAX};
use crate::config::{Config, ConfigError};
use crate::error::{Rejection, StepError, SubmitError};
use crate::layout::{Layout, ShardId};
use crate::message::{Decision, Message, Request};
use crate::multicast::Multicast;
use crate::row::Row;
use crate::suspicion::Suspicion;
use crate::view::{NodeId, View};
use crate::view_change::{decide, is_majority, next_round, Leading, Report, ViewChange};

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
    /// The transport lost its link to `peer`. A link is never reconnected silently inside a
    /// view: the peer is suspected (and the peer suspects this node in turn).
    LinkBroken {
        /// The peer at the other end.
        peer: NodeId,
    },
    /// The driver made the decision of [`Action::LogTrim`] for `view_id` and `round` durable.
    TrimLogged {
        /// The view the decision ends.
        view_id: u32,
        /// Its round.
        round: u64,
    },
}

/// Where this node stands in the membership.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Membership {
    /// Multicasting in its view.
    Active,
    /// Stopped, changing the view with a majority of it.
    Wedged,
    /// Stopped, and the members it still trusts are no majority of its view: it installs no
    /// next view, refuses writes, and answers reads only at or below its stability frontier.
    NoMajority,
    /// The next view left it out.
    Removed,
    /// The next view is chosen but inadequate (a shard below its minimum): waiting for joins.
    Inadequate,
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
    /// change. Reported once per view.
    Wedge,
    /// Make this decision of the change of view `view_id` durable (with the view, atomically),
    /// then report it with [`Input::TrimLogged`]. The node uses the trims only once they are
    /// logged: after a total restart, the logged trim is where each shard's old view ends.
    LogTrim {
        /// The view the decision ends.
        view_id: u32,
        /// The round that proposed it.
        round: u64,
        /// Who leaves, and the ragged trim of every shard.
        decision: Decision,
    },
    /// This node installed `view`: record it durably, and send from now on to its members.
    /// Every delivery of the previous view came before this action.
    InstallView {
        /// The new view.
        view: View,
    },
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
    /// Views installed after the first.
    pub views_installed: u64,
    /// View change rounds this node started as leader.
    pub rounds_led: u64,
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
    membership: Membership,
    change: ViewChange,
    /// The previous view and the decision that ended it, to answer its laggards.
    previous: Option<(View, u64, Decision)>,
    /// Ranks of the previous view already sent the decision.
    told: u64,
    /// Per peer: messages of later views, in arrival order, until this node installs them.
    future: BTreeMap<NodeId, VecDeque<Message>>,
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
            membership: Membership::Active,
            change: ViewChange::default(),
            previous: None,
            told: 0,
            future: BTreeMap::new(),
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
                let view_id = self.view.view_id;
                match self.shard_mut(shard) {
                    Some(multicast) => multicast.persisted(version),
                    // A late confirmation for a shard this node left with its last view.
                    None => assert!(
                        version >> 32 < u64::from(view_id),
                        "persisted a shard this node does not replicate"
                    ),
                }
                Ok(())
            }
            Input::LinkBroken { peer } => {
                if let Some(rank) = self.view.rank_of(peer).filter(|&r| r != self.rank) {
                    self.suspect(1 << rank, out);
                }
                Ok(())
            }
            Input::TrimLogged { view_id, round } => {
                if view_id == self.view.view_id {
                    let confirmed = self
                        .change
                        .logging
                        .as_ref()
                        .is_some_and(|(r, _)| *r == round);
                    if confirmed {
                        self.change.logged = self.change.logging.take();
                    }
                }
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
        match self.membership() {
            Membership::Removed => return Err(SubmitError::Removed),
            Membership::Inadequate => return Err(SubmitError::Inadequate),
            Membership::NoMajority => return Err(SubmitError::NoMajority),
            Membership::Active | Membership::Wedged => {}
        }
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
        if from == self.config.node_id {
            return Err(Rejection::FromSelf);
        }
        let view_id = message.view_id();
        if view_id < self.view.view_id {
            self.answer_laggard(from, view_id, out);
            return Ok(());
        }
        if view_id > self.view.view_id {
            return self.buffer_future(from, message);
        }
        let from_rank = self
            .view
            .rank_of(from)
            .ok_or(Rejection::UnknownSender(from))?;
        if self.suspicion.suspected() & (1 << from_rank) != 0
            && !matches!(message, Message::Commit { .. })
        {
            // A suspected member is never trusted again in this view; only a chosen decision,
            // which is safe from anyone, is taken from it.
            return Ok(());
        }
        let round = match &message {
            Message::Propose { round, .. }
            | Message::Accept { round, .. }
            | Message::Accepted { round, .. }
            | Message::Commit { round, .. } => *round,
            Message::Ack {
                round, promised, ..
            } => (*round).max(*promised),
            _ => 0,
        };
        if round > ROUND_MAX {
            return Err(Rejection::OutOfRange("view change round"));
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
            Message::Propose {
                round, suspicions, ..
            } => self.on_propose(from, round, suspicions, out),
            Message::Ack {
                round,
                promised,
                suspicions,
                counts,
                accepted,
                ..
            } => {
                self.check_suspicions(suspicions)?;
                if let Some((_, decision)) = &accepted {
                    self.check_decision(decision)?;
                }
                self.suspect(suspicions, out);
                self.on_ack(from_rank, round, promised, Report { counts, accepted })
            }
            Message::Accept {
                round, decision, ..
            } => {
                self.check_decision(&decision)?;
                self.on_accept(from, round, decision, out)
            }
            Message::Accepted { round, .. } => {
                if let Some(leading) = &mut self.change.leading {
                    if leading.round == round && leading.proposal.is_some() {
                        leading.accepted_by |= 1 << from_rank;
                    }
                }
                Ok(())
            }
            Message::Commit {
                round, decision, ..
            } => {
                self.check_decision(&decision)?;
                self.on_commit(round, decision, out);
                Ok(())
            }
        }
    }

    /// A member of the previous view still sends in it: it missed the commit. Send it the
    /// decision once, so it can finish the change (or learn that it was removed).
    fn answer_laggard(&mut self, from: NodeId, view_id: u32, out: &mut Vec<Action>) {
        let Some((previous, round, decision)) = &self.previous else {
            return;
        };
        if previous.view_id != view_id {
            return;
        }
        let Some(rank) = previous.rank_of(from) else {
            return;
        };
        if self.told & (1 << rank) != 0 {
            return;
        }
        self.told |= 1 << rank;
        let message = Message::Commit {
            view_id,
            round: *round,
            decision: decision.clone(),
        };
        out.push(Action::Send { to: from, message });
    }

    /// Keeps a message of a later view until this node installs it: a peer that installed
    /// first already sends in the new view on the same FIFO link.
    fn buffer_future(&mut self, from: NodeId, message: Message) -> Result<(), Rejection> {
        if matches!(message, Message::Heartbeat { .. }) {
            return Ok(());
        }
        if !self.future.contains_key(&from) && self.future.len() >= VIEW_MEMBERS_MAX {
            return Err(Rejection::OutOfRange("peers sending in a later view"));
        }
        let queue = self.future.entry(from).or_default();
        if let Message::Row { view_id, shard, .. } = &message {
            // Only the newest row matters; it counts all data sent before it.
            let (view_id, shard) = (*view_id, *shard);
            queue.retain(|m| {
                !matches!(m, Message::Row { view_id: v, shard: s, .. } if *v == view_id && *s == shard)
            });
        }
        if queue.len() >= FUTURE_MESSAGES_MAX {
            return Err(Rejection::OutOfRange("messages of a later view"));
        }
        queue.push_back(message);
        Ok(())
    }

    /// Checks that a decision fits this view: removals within the view, one trim per shard of
    /// the layout with one counter per sender, applicable to this node's shards.
    fn check_decision(&self, decision: &Decision) -> Result<(), Rejection> {
        self.check_suspicions(decision.removed)?;
        let shards = self.view.layout.shards();
        if decision.trims.len() != shards.len() {
            return Err(Rejection::OutOfRange("decision of the wrong shape"));
        }
        for (shard, trim) in shards.iter().zip(&decision.trims) {
            if trim.len() != shard.members.len() {
                return Err(Rejection::OutOfRange("decision of the wrong shape"));
            }
            // Once the trims are delivered, a repeated decision needs only its shape checked.
            if decision.removed & (1 << self.rank) == 0 && !self.change.trimmed {
                if let Some(multicast) = self.shard_ref(shard.id) {
                    multicast.check_trim(trim)?;
                }
            }
        }
        Ok(())
    }

    fn on_propose(
        &mut self,
        leader: NodeId,
        round: u64,
        suspicions: u64,
        out: &mut Vec<Action>,
    ) -> Result<(), Rejection> {
        self.check_suspicions(suspicions)?;
        self.suspect(suspicions, out);
        if !self.wedged {
            return Err(Rejection::OutOfRange(
                "a view change proposal suspecting no one",
            ));
        }
        if let Some((decided_round, decision)) = &self.change.decided {
            let message = Message::Commit {
                view_id: self.view.view_id,
                round: *decided_round,
                decision: decision.clone(),
            };
            out.push(Action::Send {
                to: leader,
                message,
            });
            return Ok(());
        }
        if round > self.change.promised {
            self.change.promised = round;
            if self
                .change
                .leading
                .as_ref()
                .is_some_and(|l| l.round < round)
            {
                self.change.leading = None;
            }
        }
        let report = self.report();
        let message = Message::Ack {
            view_id: self.view.view_id,
            round,
            promised: self.change.promised,
            suspicions: self.suspicion.suspected(),
            counts: report.counts,
            accepted: report.accepted,
        };
        out.push(Action::Send {
            to: leader,
            message,
        });
        Ok(())
    }

    fn on_ack(
        &mut self,
        from_rank: usize,
        round: u64,
        promised: u64,
        report: Report,
    ) -> Result<(), Rejection> {
        let Some(leading) = &mut self.change.leading else {
            return Ok(());
        };
        if leading.round != round || leading.proposal.is_some() {
            return Ok(());
        }
        if promised > round {
            // Refused: a higher round was promised; start above it.
            self.change.promised = self.change.promised.max(promised);
            self.change.leading = None;
            return Ok(());
        }
        let member = self.view.members[from_rank];
        for (shard, counts) in &report.counts {
            let Some(layout_shard) = self.view.layout.shard(*shard) else {
                return Err(Rejection::UnknownShard(*shard));
            };
            if !layout_shard.members.contains(&member) {
                return Err(Rejection::NotInShard {
                    shard: *shard,
                    node: member,
                });
            }
            if counts.len() != layout_shard.members.len() {
                return Err(Rejection::OutOfRange(
                    "received counters of the wrong shape",
                ));
            }
        }
        for shard in self.view.layout.shards_of(member) {
            if !report.counts.iter().any(|(id, _)| *id == shard.id) {
                return Err(Rejection::OutOfRange("a report missing a shard"));
            }
        }
        leading.reports.insert(from_rank, report);
        Ok(())
    }

    fn on_accept(
        &mut self,
        leader: NodeId,
        round: u64,
        decision: Decision,
        out: &mut Vec<Action>,
    ) -> Result<(), Rejection> {
        if let Some((decided_round, decided)) = &self.change.decided {
            let message = Message::Commit {
                view_id: self.view.view_id,
                round: *decided_round,
                decision: decided.clone(),
            };
            out.push(Action::Send {
                to: leader,
                message,
            });
            return Ok(());
        }
        if round < self.change.promised || !self.wedged {
            return Ok(());
        }
        self.change.promised = round;
        self.accept(leader, round, decision, out);
        Ok(())
    }

    /// Accepts `decision` of `round`: logs it, and echoes it to `leader` once logged.
    fn accept(&mut self, leader: NodeId, round: u64, decision: Decision, out: &mut Vec<Action>) {
        self.ensure_logged(round, &decision, out);
        self.change.accepted = Some((round, decision));
        self.change.accepted_from = Some(leader);
    }

    fn ensure_logged(&mut self, round: u64, decision: &Decision, out: &mut Vec<Action>) {
        if self.change.is_logged(decision)
            || self
                .change
                .logging
                .as_ref()
                .is_some_and(|(_, d)| d == decision)
        {
            return;
        }
        self.change.logging = Some((round, decision.clone()));
        out.push(Action::LogTrim {
            view_id: self.view.view_id,
            round,
            decision: decision.clone(),
        });
    }

    fn on_commit(&mut self, round: u64, decision: Decision, out: &mut Vec<Action>) {
        if self.change.decided.is_some() {
            return;
        }
        if !self.wedged {
            // Someone decided the end of this view before this node noticed a failure.
            self.suspect(decision.removed, out);
            self.wedge(out);
        }
        self.ensure_logged(round, &decision, out);
        self.change.decided = Some((round, decision));
        self.change.leading = None;
    }

    /// What this member tells a leader in phase 1.
    fn report(&self) -> Report {
        let counts = self
            .shards
            .iter()
            .flatten()
            .map(|m| (m.shard(), m.received().to_vec()))
            .collect();
        Report {
            counts,
            accepted: self.change.accepted.clone(),
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
        self.wedge(out);
    }

    fn wedge(&mut self, out: &mut Vec<Action>) {
        let suspicions = self.suspicion.suspected();
        for multicast in self.shards.iter_mut().flatten() {
            multicast.set_suspicions(suspicions);
            multicast.wedge();
        }
        if !self.wedged {
            self.wedged = true;
            if self.membership == Membership::Active {
                self.membership = Membership::Wedged;
            }
            out.push(Action::Wedge);
        }
    }

    /// After any input: deliver what became stable, send what the window allows, and push the
    /// rows that changed, after the data they count.
    fn progress(&mut self, out: &mut Vec<Action>) {
        loop {
            for multicast in self.shards.iter_mut().flatten() {
                let delivered = multicast.deliver(out);
                self.counters.versions_delivered += delivered as u64;
                let (batches, nulls) = multicast.send(self.now_us, &self.config, out);
                self.counters.batches_sent += batches;
                self.counters.nulls_sent += nulls;
                self.counters.rows_sent += multicast.push_row(out) as u64;
            }
            if !self.change_view(out) {
                break;
            }
        }
    }

    /// Moves the view change on as far as it can; returns whether a new view was installed.
    fn change_view(&mut self, out: &mut Vec<Action>) -> bool {
        if !self.wedged
            || matches!(
                self.membership,
                Membership::Removed | Membership::Inadequate
            )
        {
            return false;
        }
        self.echo(out);
        if self.change.decided.is_some() {
            return self.finish(out);
        }
        self.lead(out);
        self.echo(out);
        if self.change.decided.is_some() {
            return self.finish(out);
        }
        false
    }

    /// Echoes the accepted decision to its leader once it is logged.
    fn echo(&mut self, out: &mut Vec<Action>) {
        let Some((round, decision)) = &self.change.accepted else {
            return;
        };
        let round = *round;
        if self.change.echoed == Some(round) || !self.change.is_logged(decision) {
            return;
        }
        let Some(leader) = self.change.accepted_from else {
            return;
        };
        self.change.echoed = Some(round);
        if leader == self.config.node_id {
            if let Some(leading) = &mut self.change.leading {
                if leading.round == round {
                    leading.accepted_by |= 1 << self.rank;
                }
            }
        } else {
            let message = Message::Accepted {
                view_id: self.view.view_id,
                round,
            };
            out.push(Action::Send {
                to: leader,
                message,
            });
        }
    }

    /// The leader's part: phase 1, phase 2, commit.
    fn lead(&mut self, out: &mut Vec<Action>) {
        let members = self.view.members.len();
        let suspected = self.suspicion.suspected();
        let leader = (0..members).find(|&r| suspected & (1 << r) == 0);
        if leader != Some(self.rank) {
            self.change.leading = None;
            return;
        }
        let live = (0..members).filter(|&r| suspected & (1 << r) == 0).count();
        if !is_majority(live, members) {
            // A minority stays wedged: it can install no view.
            return;
        }
        if self.change.leading.is_none() {
            let round = next_round(self.change.promised, self.rank);
            self.change.promised = round;
            let mut reports = BTreeMap::new();
            reports.insert(self.rank, self.report());
            self.change.leading = Some(Leading {
                round,
                reports,
                proposal: None,
                accepted_by: 0,
            });
            self.counters.rounds_led += 1;
            for (rank, &peer) in self.view.members.iter().enumerate() {
                if rank != self.rank && suspected & (1 << rank) == 0 {
                    let message = Message::Propose {
                        view_id: self.view.view_id,
                        round,
                        suspicions: suspected,
                    };
                    out.push(Action::Send { to: peer, message });
                }
            }
        }
        let leading = self.change.leading.as_ref().expect("leading a round");
        let round = leading.round;
        match &leading.proposal {
            None => {
                let all_reported = (0..members)
                    .all(|r| suspected & (1 << r) != 0 || leading.reports.contains_key(&r));
                if !all_reported {
                    return;
                }
                let Some(decision) = decide(
                    &self.view.layout,
                    &self.view.members,
                    suspected,
                    &leading.reports,
                ) else {
                    // Every replica of some shard failed: only a total restart recovers it.
                    return;
                };
                for (rank, &peer) in self.view.members.iter().enumerate() {
                    if rank != self.rank && decision.removed & (1 << rank) == 0 {
                        let message = Message::Accept {
                            view_id: self.view.view_id,
                            round,
                            decision: decision.clone(),
                        };
                        out.push(Action::Send { to: peer, message });
                    }
                }
                let leading = self.change.leading.as_mut().expect("leading a round");
                leading.proposal = Some(decision.clone());
                let me = self.config.node_id;
                self.accept(me, round, decision, out);
            }
            Some(decision) => {
                if !is_majority(leading.accepted_by.count_ones() as usize, members) {
                    return;
                }
                let decision = decision.clone();
                for (rank, &peer) in self.view.members.iter().enumerate() {
                    if rank != self.rank && decision.removed & (1 << rank) == 0 {
                        let message = Message::Commit {
                            view_id: self.view.view_id,
                            round,
                            decision: decision.clone(),
                        };
                        out.push(Action::Send { to: peer, message });
                    }
                }
                self.on_commit(round, decision, out);
            }
        }
    }

    /// Applies the chosen decision: once it is logged, delivers each shard exactly up to its
    /// trim; once everything delivered is persisted, installs the next view. Returns whether
    /// it installed one.
    fn finish(&mut self, out: &mut Vec<Action>) -> bool {
        let (round, decision) = self.change.decided.clone().expect("decided");
        if decision.removed & (1 << self.rank) != 0 {
            self.membership = Membership::Removed;
            return false;
        }
        if !self.change.is_logged(&decision) {
            self.ensure_logged(round, &decision, out);
            return false;
        }
        if !self.change.trimmed {
            self.change.trimmed = true;
            for (index, trim) in decision.trims.iter().enumerate() {
                if let Some(Some(multicast)) = self.shards.get_mut(index) {
                    let delivered = multicast.deliver_trim(trim, out);
                    self.counters.versions_delivered += delivered as u64;
                    self.counters.rows_sent += multicast.push_row(out) as u64;
                }
            }
        }
        if !self.shards.iter().flatten().all(Multicast::all_persisted) {
            return false;
        }
        let members: Vec<NodeId> = self
            .view
            .members
            .iter()
            .enumerate()
            .filter(|&(rank, _)| decision.removed & (1 << rank) == 0)
            .map(|(_, &node)| node)
            .collect();
        let spec = self.view.layout.spec();
        let Ok(layout) = Layout::assign(spec, &members, Some(&self.view.layout)) else {
            self.membership = Membership::Inadequate;
            return false;
        };
        let view = View {
            view_id: self.view.view_id + 1,
            members,
            layout,
        };
        self.install(view, round, decision, out);
        true
    }

    fn install(&mut self, view: View, round: u64, decision: Decision, out: &mut Vec<Action>) {
        let me = self.config.node_id;
        let rank = view.rank_of(me).expect("a survivor is in the next view");
        let mut old: Vec<Option<Multicast>> = std::mem::take(&mut self.shards);
        self.shards = view
            .layout
            .shards()
            .iter()
            .map(|shard| {
                let position = shard.members.iter().position(|&m| m == me)?;
                let members = shard.members.clone();
                let previous = old.get_mut(usize::from(shard.id.0)).and_then(Option::take);
                Some(match previous {
                    Some(multicast) => {
                        multicast.successor(view.view_id, members, position, &self.config)
                    }
                    // A shard new to this node starts empty: state transfer brings its log.
                    None => Multicast::new(shard.id, view.view_id, members, position, &self.config),
                })
            })
            .collect();
        let old_view = std::mem::replace(&mut self.view, view.clone());
        self.rank = rank;
        self.suspicion = Suspicion::new(
            rank,
            view.members.len(),
            self.config.suspect_after_ms.saturating_mul(1000),
        );
        self.suspicion.start(self.now_us);
        self.wedged = false;
        self.membership = Membership::Active;
        self.change = ViewChange::default();
        self.previous = Some((old_view, round, decision));
        self.told = 0;
        self.counters.views_installed += 1;
        out.push(Action::InstallView { view });
        // Replay what peers already sent in the new view, in their order.
        let future = std::mem::take(&mut self.future);
        for (from, queue) in future {
            for message in queue {
                if self.receive(from, message, out).is_err() {
                    self.counters.messages_rejected += 1;
                }
            }
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

    /// Where this node stands in the membership. A node in [`Membership::NoMajority`] takes no
    /// write; reads at a time at or below [`Node::stability_frontier`] stay correct there,
    /// since that frontier no longer moves and no view can change what lies below it.
    pub fn membership(&self) -> Membership {
        if self.membership == Membership::Wedged {
            let members = self.view.members.len();
            let live = members - (self.suspicion.suspected().count_ones() as usize);
            if !is_majority(live, members) {
                return Membership::NoMajority;
            }
        }
        self.membership
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
