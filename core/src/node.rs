//! A member's protocol state machine: inputs in, actions out.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use derechofs_storage::{Hlc, Version};

use crate::bounds::{
    FUTURE_MESSAGES_MAX, JOINS_PENDING_MAX, PAUSE_HEARTBEATS, ROUND_MAX, STUCK_CHANGE_TIMEOUTS,
    TRANSFER_PIECE_BYTES_MAX, TRANSFER_PIECE_RECORDS_MAX, TRANSFER_RECORD_BYTES_MAX,
    VIEW_MEMBERS_MAX,
};
use crate::config::{Config, ConfigError};
use crate::error::{Rejection, StepError, SubmitError};
use crate::layout::{Layout, LayoutSpec, ShardId};
use crate::lease::Lease;
use crate::message::{Decision, Message, Record, Request};
use crate::multicast::{Barrier, Multicast};
use crate::row::Row;
use crate::suspicion::Suspicion;
use crate::transfer::{Held, Piece};
use crate::view::{NodeId, View};
use crate::view_change::{
    decide, decide_restart, is_majority, next_round, Leading, Report, ViewChange,
};

/// A node's two clocks at a step, in microseconds.
///
/// `wall_us` (since the Unix epoch) stamps versions and stability floors: times that mean
/// something to readers of the past. `mono_us` times durations: heartbeats, suspicion, the read
/// lease and retries. It must not be stepped (a monotonic clock, slewed at most), so that a
/// wall clock set back or forward while the node runs does not stretch a lease or suspect a
/// live peer; its origin is free, but it must be above 0. A `u64` gives both the same reading
/// (the simulator and the tests, whose clocks are not stepped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// The wall clock.
    pub wall_us: u64,
    /// The timer clock.
    pub mono_us: u64,
}

impl From<u64> for Now {
    fn from(us: u64) -> Now {
        Now {
            wall_us: us,
            mono_us: us,
        }
    }
}

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
        /// Its client waits until it is durable on every member: the members push their rows
        /// as soon as their logs persist it (otherwise persistence is reported with the next
        /// row, at the latest at the next tick).
        durable: bool,
    },
    /// A client of this node waits until `version` of `shard` is durable on every member (a
    /// file system `fsync`): the members push their rows as soon as their logs persist it.
    WantPersisted {
        /// The shard.
        shard: ShardId,
        /// The version.
        version: Version,
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
    /// The driver read the records [`Action::ReadRecords`] asked for.
    RecordsRead {
        /// The member they are for.
        to: NodeId,
        /// The shard.
        shard: ShardId,
        /// The view of the read.
        view_id: u32,
        /// The `after` of the read.
        after: Option<Version>,
        /// The records after `after`, in version order, none beyond the read's `end`.
        records: Vec<Record>,
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
    /// Not a member: it asks the group to add it (a new node, a restarted one, or one the last
    /// view change removed) and waits to be welcomed into a view.
    Joining,
    /// In a view that is inadequate (a shard below its minimum): wedged, waiting for joins.
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
    /// Every delivery of the previous view came before this action. Shards new to this node
    /// are caught up by state transfer before they deliver.
    InstallView {
        /// The new view.
        view: View,
    },
    /// State transfer, at the member that serves it: read from `shard`'s log the records with
    /// versions after `after` (from the first if `None`) and at most `end`, in version order,
    /// gathering at most `records_max` records and `bytes_max` bytes of payload (a larger
    /// record alone; at least one record when any is left), and answer
    /// [`Input::RecordsRead`]. The log holds every version up to `end` durably. What the
    /// driver answers is checked: records beyond these bounds are not sent, and a record the
    /// wire cannot carry is refused and counted in [`Counters::pieces_unservable`].
    ReadRecords {
        /// The member they are for.
        to: NodeId,
        /// The shard.
        shard: ShardId,
        /// The current view, to echo.
        view_id: u32,
        /// The last record the member has.
        after: Option<Version>,
        /// The last record to read.
        end: Version,
        /// Payload bytes to gather at most.
        bytes_max: usize,
        /// Records to gather at most.
        records_max: usize,
    },
    /// State transfer, at the member catching up: append these records to `shard`'s log as
    /// they are (versions, stamps, deltas), after what it holds. A [`Action::Persist`] follows.
    AppendRecords {
        /// The shard.
        shard: ShardId,
        /// The records, in version order.
        records: Vec<Record>,
    },
    /// Remove from `shard`'s log every record after `after` (every record if `None`), durably,
    /// before the records that follow: a total restart ended the shard's log before them (they
    /// were never durable on every replica). A [`Action::Persist`] or
    /// [`Action::AppendRecords`] may follow.
    TruncateLog {
        /// The shard.
        shard: ShardId,
        /// The last record to keep.
        after: Option<Version>,
    },
    /// The log of `shard` holds, persisted, every version the shard had when this view began:
    /// the shard now delivers, takes requests and answers reads here.
    CaughtUp {
        /// The shard.
        shard: ShardId,
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
    /// Steps that came after a pause of this node (see [`PAUSE_HEARTBEATS`]).
    pub pauses: u64,
    /// Suspected members trusted again by this node while it trusted no majority.
    pub forgiven: u64,
    /// Versions delivered, over all shards.
    pub versions_delivered: u64,
    /// Views installed after the first.
    pub views_installed: u64,
    /// View change rounds this node started as leader.
    pub rounds_led: u64,
    /// Join requests this node sent.
    pub joins_sent: u64,
    /// Records this node received by state transfer.
    pub records_transferred: u64,
    /// Shards this node caught up by state transfer.
    pub shards_caught_up: u64,
    /// State transfer reads this node could not serve: the driver's answer started with a
    /// record the wire cannot carry (beyond `TRANSFER_RECORD_BYTES_MAX`), outside the range
    /// asked, or was empty. Nothing is sent; the member catching up asks another contact.
    pub pieces_unservable: u64,
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
    /// New to the shard, its log still being transferred.
    pub catching_up: bool,
}

/// A node's attempt to join the group.
#[derive(Clone, Debug)]
struct Joining {
    /// Members to ask, in turn.
    contacts: Vec<NodeId>,
    /// The contact to ask next.
    next: usize,
    /// When to ask again.
    next_try_us: u64,
    /// A redirect was followed since the last try: follow no other until the next one.
    redirected: bool,
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
    /// Whether this member may answer reads of the latest state (see [`Node::holds_read_lease`]).
    lease: Lease,
    /// The wall clock of the last step (µs since the Unix epoch, never going back): stamps and
    /// stability floors.
    now_us: u64,
    /// The timer clock of the last step (µs, never going back, not stepped with the wall
    /// clock): heartbeats, suspicion, the read lease, retries.
    mono_us: u64,
    started: bool,
    /// The time of the last step: a longer gap to the next one is a pause of this node.
    last_step_us: u64,
    /// When this node wedged in its view.
    wedged_at_us: u64,
    next_heartbeat_us: u64,
    wedged: bool,
    membership: Membership,
    change: ViewChange,
    /// The previous view and the decision that ended it, to answer its laggards.
    previous: Option<(View, u64, Decision)>,
    /// Ranks of the previous view already sent the decision.
    told: u64,
    /// The last view a total restart ended and its decision, to tell members of it that come
    /// back late (any number of views later) where their logs end.
    last_restart: Option<(View, u64, Decision)>,
    /// Ranks of that view already told.
    told_restart: u64,
    /// Per peer: messages of later views, in arrival order, until this node installs them.
    future: BTreeMap<NodeId, VecDeque<Message>>,
    /// Set while this node is not a member and asks to join.
    joining: Option<Joining>,
    /// At the leader: nodes that asked to join, for the next view change.
    joins_pending: Vec<NodeId>,
    /// The addresses those of `joins_pending` that announced one gave (at most one per node).
    join_addrs: BTreeMap<NodeId, SocketAddr>,
    /// The last record of this node's log of each shard it holds a log of and does not
    /// replicate now: where a state transfer resumes if it is given the shard again.
    held: BTreeMap<ShardId, Held>,
    /// Back from a total restart: the view is the one recorded on disk, wedged, and only a
    /// restart decision (or a decision logged before the stop) ends it.
    restarting: bool,
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
        let lease = Lease::new(
            rank,
            view.members.len(),
            config.suspect_after_ms.saturating_mul(1000),
            config.heartbeat_ms.saturating_mul(1000),
        );
        Ok(Node {
            config,
            rank,
            shards,
            suspicion,
            lease,
            now_us: 0,
            mono_us: 0,
            started: false,
            last_step_us: 0,
            wedged_at_us: 0,
            next_heartbeat_us: 0,
            wedged: false,
            membership: Membership::Active,
            change: ViewChange::default(),
            previous: None,
            told: 0,
            last_restart: None,
            told_restart: 0,
            future: BTreeMap::new(),
            joining: None,
            joins_pending: Vec::new(),
            join_addrs: BTreeMap::new(),
            held: BTreeMap::new(),
            restarting: false,
            counters: Counters::default(),
            view,
        })
    }

    /// The state machine of a member coming back after every member of its group stopped
    /// (total restart): `recorded` is the last view it installed, `logged` the decision it
    /// logged for that view, if any, and `logs` the last record of each shard log it holds,
    /// synced and already cut back to the logged trim. It starts wedged in `recorded` and
    /// changes it with whichever members of it come back: the leader (the lowest-ranked member
    /// not suspected) waits for a majority of `recorded`, picks per shard the longest log, and
    /// the next view has the members that reported; a member whose log of a shard is shorter
    /// fetches the rest by state transfer. `docs/ARCHITECTURE.md` ("Total restart").
    pub fn restarting(
        config: Config,
        recorded: View,
        logged: Option<(u64, Decision)>,
        logs: Vec<(ShardId, Option<(Version, Hlc)>)>,
    ) -> Result<Node, ConfigError> {
        let mut node = Node::new(config, recorded)?;
        let me = node.config.node_id;
        let mut shards = Vec::with_capacity(node.view.layout.shards().len());
        for shard in node.view.layout.shards() {
            let last = logs
                .iter()
                .find(|(id, _)| *id == shard.id)
                .and_then(|(_, last)| *last);
            let multicast = shard.members.iter().position(|&m| m == me).map(|position| {
                Multicast::restarted(
                    shard.id,
                    node.view.view_id,
                    shard.members.clone(),
                    position,
                    &node.config,
                    last,
                )
            });
            shards.push(multicast);
        }
        node.shards = shards;
        for (shard, last) in logs {
            let replicated = node.shard_ref(shard).is_some();
            if let (false, Some((version, hlc))) = (replicated, last) {
                let held = Held {
                    last: (version, hlc),
                    persisted: Some(version),
                };
                node.held.insert(shard, held);
            }
        }
        // Set before the logged decision is checked: its trims were not delivered and never
        // will be (nothing received survived), so they are not checked against the fresh
        // multicasts.
        node.restarting = true;
        if let Some((round, decision)) = logged {
            node.check_decision(&decision)
                .map_err(|_| ConfigError::Invalid("the logged decision does not fit the view"))?;
            node.change.promised = round;
            node.change.accepted = Some((round, decision.clone()));
            node.change.logged = Some((round, decision));
        }
        node.restarting = true;
        node.wedged = true;
        node.membership = Membership::Wedged;
        Ok(node)
    }

    /// The state machine of a node that is not a member and asks to join through `contacts`
    /// (members, or former members, of the group): a new node, a restarted one, or one that
    /// was removed. `held` is the last record of each shard log it holds on disk, synced, from
    /// which state transfer resumes; `last_view_id` is the last view it installed (0 if none).
    pub fn joining(
        config: Config,
        contacts: Vec<NodeId>,
        held: Vec<(ShardId, Version, Hlc)>,
        last_view_id: u32,
    ) -> Result<Node, ConfigError> {
        config.validate()?;
        let me = config.node_id;
        if contacts.is_empty() || contacts.len() > VIEW_MEMBERS_MAX || contacts.contains(&me) {
            return Err(ConfigError::Invalid(
                "a joiner needs 1..=VIEW_MEMBERS_MAX contacts other than itself",
            ));
        }
        let view = placeholder(me, last_view_id);
        let mut node = Node::new(config, view)?;
        node.shards.clear();
        node.membership = Membership::Joining;
        node.joining = Some(Joining {
            contacts,
            next: 0,
            next_try_us: 0,
            redirected: false,
        });
        node.held = held
            .into_iter()
            .map(|(shard, version, hlc)| {
                let held = Held {
                    last: (version, hlc),
                    persisted: Some(version),
                };
                (shard, held)
            })
            .collect();
        Ok(node)
    }

    /// Handles one input at time `now` (this node's clocks: see [`Now`]; a clock going back is
    /// treated as standing still) and appends the resulting actions to `out`. An error reports a refused message or request; everything else the step had to
    /// do is done and its actions are in `out` all the same.
    pub fn step(
        &mut self,
        now: impl Into<Now>,
        input: Input,
        out: &mut Vec<Action>,
    ) -> Result<(), StepError> {
        let result = self.step_queued(now, input, out);
        self.progress(out);
        result
    }

    /// Handles one input as [`Node::step`] does, without moving the engine on: nothing is
    /// delivered, sent or pushed for it until the next step or [`Node::flush`]. A driver that
    /// takes several messages at once hands them all this way and then flushes once, so that
    /// what they make stable is delivered as one batch and each peer gets one row for them all
    /// (a step per message delivers, persists and pushes a row for each).
    pub fn step_queued(
        &mut self,
        now: impl Into<Now>,
        input: Input,
        out: &mut Vec<Action>,
    ) -> Result<(), StepError> {
        self.advance_clock(now.into());
        self.handle(input, out)
    }

    fn handle(&mut self, input: Input, out: &mut Vec<Action>) -> Result<(), StepError> {
        match input {
            Input::Tick if self.joining.is_some() => {
                self.ask_to_join(out);
                Ok(())
            }
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
            Input::Submit {
                shard,
                request,
                durable,
            } => self.submit(shard, request, durable).map_err(|error| {
                self.counters.submits_refused += 1;
                StepError::Submit(error)
            }),
            Input::WantPersisted { shard, version } => {
                if let Some(multicast) = self.shard_mut(shard) {
                    multicast.want_persisted(version);
                }
                Ok(())
            }
            Input::Persisted { shard, version } => {
                match self.shard_mut(shard) {
                    Some(multicast) => multicast.persisted(version),
                    // A late confirmation for a log this node keeps without replicating it.
                    None => {
                        if let Some(held) = self.held.get_mut(&shard) {
                            held.persisted = held.persisted.max(Some(version));
                        }
                    }
                }
                Ok(())
            }
            Input::RecordsRead {
                to,
                shard,
                view_id,
                after,
                records,
            } => {
                self.send_piece(to, shard, view_id, after, records, out);
                Ok(())
            }
            Input::LinkBroken { .. } if self.joining.is_some() => Ok(()),
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
        }
    }

    /// Queues `request` for `shard` as [`Input::Submit`] does, without moving the engine on:
    /// nothing is sent until the next step or [`Node::flush`]. A driver that takes several
    /// requests at once queues them all and then flushes once, so that they leave together in
    /// one message even while the window is open (a step per request sends one message each).
    pub fn queue(
        &mut self,
        shard: ShardId,
        request: Request,
        durable: bool,
    ) -> Result<(), SubmitError> {
        self.submit(shard, request, durable).inspect_err(|_| {
            self.counters.submits_refused += 1;
        })
    }

    /// Moves the engine on at `now` without a new input: sends what the window allows (the
    /// requests of [`Node::queue`] among them), delivers what became stable, pushes rows. The
    /// actions go to `out`, as from [`Node::step`].
    pub fn flush(&mut self, now: impl Into<Now>, out: &mut Vec<Action>) {
        self.advance_clock(now.into());
        self.progress(out);
    }

    /// Takes the time of a step; the first one starts the suspicion timers and heartbeats.
    /// Steps further apart than [`PAUSE_HEARTBEATS`] heartbeats mean this node itself did not
    /// run (a long step before, its process descheduled): what it missed meanwhile waits
    /// unread, so the excess of the gap is not counted as its peers' silence.
    fn advance_clock(&mut self, now: Now) {
        self.now_us = self.now_us.max(now.wall_us);
        self.mono_us = self.mono_us.max(now.mono_us);
        if !self.started {
            self.started = true;
            self.suspicion.start(self.mono_us);
            self.lease.start(self.mono_us);
            self.next_heartbeat_us = self.mono_us;
        } else {
            let normal_us = self
                .config
                .heartbeat_ms
                .saturating_mul(1000 * PAUSE_HEARTBEATS);
            let gap_us = self.mono_us - self.last_step_us;
            if gap_us > normal_us {
                self.suspicion.paused(gap_us - normal_us);
                self.counters.pauses += 1;
            }
        }
        self.last_step_us = self.mono_us;
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

    fn submit(
        &mut self,
        shard: ShardId,
        request: Request,
        durable: bool,
    ) -> Result<(), SubmitError> {
        match self.membership() {
            Membership::Joining => return Err(SubmitError::Joining),
            Membership::Inadequate => return Err(SubmitError::Inadequate),
            Membership::NoMajority => return Err(SubmitError::NoMajority),
            Membership::Active | Membership::Wedged => {}
        }
        let multicast = self
            .shard_mut(shard)
            .ok_or(SubmitError::NotReplica(shard))?;
        multicast.submit(request, durable)
    }

    fn tick(&mut self, out: &mut Vec<Action>) {
        let silent = self.suspicion.silent(self.mono_us);
        if silent != 0 {
            self.suspect(silent, out);
        }
        for multicast in self.shards.iter_mut().flatten() {
            multicast.push_persisted();
        }
        if self.mono_us >= self.next_heartbeat_us {
            self.next_heartbeat_us = self.mono_us + self.config.heartbeat_ms * 1000;
            let suspicions = self.suspicion.suspected();
            for (rank, &peer) in self.view.members.iter().enumerate() {
                if rank != self.rank {
                    let message = Message::Heartbeat {
                        view_id: self.view.view_id,
                        suspicions,
                        sent_us: self.mono_us,
                        echo_us: self.lease.echo_for(rank),
                    };
                    out.push(Action::Send { to: peer, message });
                    self.counters.heartbeats_sent += 1;
                }
            }
            for multicast in self.shards.iter_mut().flatten() {
                multicast.publish_floor(self.now_us);
            }
            if self.restarting || self.change_stuck() {
                self.resend_round(out);
            }
        }
    }

    /// In a total restart or a stuck view change, the round this node leads is sent again,
    /// every heartbeat, to the members that did not answer it: the proposal (phase 1) to those
    /// not suspected, the decision (phase 2) to those it keeps. A member may have dropped it
    /// while it suspected this node and trust it again later (see [`Node::forgive`]); in a
    /// total restart, members come back at any time.
    fn resend_round(&mut self, out: &mut Vec<Action>) {
        let Some(leading) = &self.change.leading else {
            return;
        };
        if let Some(decision) = &leading.proposal {
            for (rank, &peer) in self.view.members.iter().enumerate() {
                if rank != self.rank
                    && decision.removed & (1 << rank) == 0
                    && leading.accepted_by & (1 << rank) == 0
                {
                    let message = Message::Accept {
                        view_id: self.view.view_id,
                        round: leading.round,
                        decision: decision.clone(),
                    };
                    out.push(Action::Send { to: peer, message });
                }
            }
            return;
        }
        let suspected = self.suspicion.suspected();
        for (rank, &peer) in self.view.members.iter().enumerate() {
            if rank != self.rank
                && suspected & (1 << rank) == 0
                && !leading.reports.contains_key(&rank)
            {
                let message = Message::Propose {
                    view_id: self.view.view_id,
                    round: leading.round,
                    suspicions: suspected,
                };
                out.push(Action::Send { to: peer, message });
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
        if self.joining.is_some() {
            return self.receive_joining(from, message, out);
        }
        match message {
            Message::Join { view_id, addr } => {
                self.on_join(from, view_id, addr, out);
                return Ok(());
            }
            // For joiners only; a member may get them late, after it was welcomed.
            Message::Redirect { .. } | Message::Welcome { .. } => return Ok(()),
            _ => {}
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
            && !self.forgive(from_rank)
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
        self.suspicion.heard(from_rank, self.mono_us);
        if self.restarting && matches!(message, Message::Data { .. } | Message::Row { .. }) {
            // The multicast of a view a total restart ends carries nothing any more.
            return Ok(());
        }
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
                self.adopt_suspicions(suspicions, out);
                Ok(())
            }
            Message::Heartbeat {
                suspicions,
                sent_us,
                echo_us,
                ..
            } => {
                self.check_suspicions(suspicions)?;
                if echo_us > self.mono_us {
                    return Err(Rejection::OutOfRange(
                        "heartbeat echoing a time not yet come",
                    ));
                }
                self.lease.heard(from_rank, sent_us, echo_us, self.mono_us);
                self.adopt_suspicions(suspicions, out);
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
                logs,
                floors,
                ..
            } => {
                self.check_suspicions(suspicions)?;
                if let Some((_, decision)) = &accepted {
                    self.check_decision(decision)?;
                }
                self.adopt_suspicions(suspicions, out);
                let report = Report {
                    counts,
                    accepted,
                    logs,
                    floors,
                };
                self.on_ack(from_rank, round, promised, report)
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
            Message::Fetch { shard, after, .. } => self.on_fetch(from, shard, after, out),
            Message::Piece {
                shard,
                after,
                end,
                ready,
                floor,
                records,
                ..
            } => {
                let now_us = self.mono_us;
                let retry_us = self.config.heartbeat_ms * 1000;
                let (multicast, sender) = self.shard_member(shard, from)?;
                let piece = Piece {
                    after,
                    end,
                    ready,
                    floor,
                    records,
                };
                let appended = multicast.receive_piece(sender, piece, now_us, retry_us, out)?;
                self.counters.records_transferred += appended as u64;
                Ok(())
            }
            Message::Join { .. } | Message::Redirect { .. } | Message::Welcome { .. } => {
                unreachable!("handled above")
            }
        }
    }

    /// What a node that is not a member does with a message: follows a redirect, installs
    /// the view it is welcomed into, keeps messages of later views for it, and drops the rest
    /// (messages of a view it was in before it restarted or was removed).
    fn receive_joining(
        &mut self,
        from: NodeId,
        message: Message,
        out: &mut Vec<Action>,
    ) -> Result<(), Rejection> {
        match message {
            Message::Redirect { leader, .. } => {
                let joining = self.joining.as_mut().expect("joining");
                if !joining.redirected && leader != self.config.node_id {
                    joining.redirected = true;
                    self.counters.joins_sent += 1;
                    let message = Message::Join {
                        view_id: self.view.view_id,
                        addr: self.config.addr,
                    };
                    out.push(Action::Send {
                        to: leader,
                        message,
                    });
                }
                Ok(())
            }
            Message::Welcome { view } => {
                let me = self.config.node_id;
                if view.view_id <= self.view.view_id || !view.members.contains(&from) {
                    return Ok(());
                }
                if view.rank_of(me).is_none() {
                    return Err(Rejection::OutOfRange(
                        "a welcome into a view without the joiner",
                    ));
                }
                self.install_welcome(view, out);
                Ok(())
            }
            message if message.view_id() > self.view.view_id => self.buffer_future(from, message),
            _ => Ok(()),
        }
    }

    /// A joiner asks its next contact, every suspicion timeout until it is welcomed.
    fn ask_to_join(&mut self, out: &mut Vec<Action>) {
        let retry_us = self.config.suspect_after_ms * 1000;
        let now_us = self.mono_us;
        let view_id = self.view.view_id;
        let joining = self.joining.as_mut().expect("joining");
        if now_us < joining.next_try_us {
            return;
        }
        joining.next_try_us = now_us + retry_us;
        joining.redirected = false;
        let to = joining.contacts[joining.next % joining.contacts.len()];
        joining.next = (joining.next + 1) % joining.contacts.len();
        self.counters.joins_sent += 1;
        out.push(Action::Send {
            to,
            message: Message::Join {
                view_id,
                addr: self.config.addr,
            },
        });
    }

    /// A node asks to join. The leader keeps it for the next view change (which it starts if
    /// none runs); any other member redirects it to the leader. A member of this view asking
    /// again from this same view restarted: it is suspected, then joins like any node. A member
    /// asking from an earlier view is a stale retry of a join that made it a member.
    fn on_join(
        &mut self,
        from: NodeId,
        last_view_id: u32,
        addr: Option<SocketAddr>,
        out: &mut Vec<Action>,
    ) {
        if !matches!(
            self.membership(),
            Membership::Active | Membership::Wedged | Membership::Inadequate
        ) {
            return;
        }
        if let Some(rank) = self.view.rank_of(from) {
            if last_view_id < self.view.view_id {
                return;
            }
            self.suspect(1 << rank, out);
        }
        let suspected = self.suspicion.suspected();
        let Some(leader) = (0..self.view.members.len()).find(|&r| suspected & (1 << r) == 0) else {
            return;
        };
        if leader == self.rank {
            if !self.joins_pending.contains(&from) && self.joins_pending.len() < JOINS_PENDING_MAX {
                self.joins_pending.push(from);
            }
            if self.joins_pending.contains(&from) {
                match addr {
                    Some(addr) => self.join_addrs.insert(from, addr),
                    None => self.join_addrs.remove(&from),
                };
            }
        } else {
            let message = Message::Redirect {
                view_id: self.view.view_id,
                leader: self.view.members[leader],
            };
            out.push(Action::Send { to: from, message });
        }
    }

    /// A member new to a shard asks for its log: ask the driver for the next piece, or say
    /// this member cannot serve it (it is catching up itself).
    fn on_fetch(
        &mut self,
        from: NodeId,
        shard: ShardId,
        after: Option<Version>,
        out: &mut Vec<Action>,
    ) -> Result<(), Rejection> {
        let view_id = self.view.view_id;
        let (multicast, _) = self.shard_member(shard, from)?;
        let Some(end) = multicast.transfer_end() else {
            let message = Message::Piece {
                view_id,
                shard,
                after,
                end: None,
                ready: false,
                floor: Hlc::ZERO,
                records: Vec::new(),
            };
            out.push(Action::Send { to: from, message });
            return Ok(());
        };
        let end_version = end.map(|(v, _)| v);
        let floor = multicast.stamp_floor();
        // A fetch after the end comes from a member holding a tail a total restart cut: the
        // end alone tells it where to cut.
        if after >= end_version {
            let message = Message::Piece {
                view_id,
                shard,
                after,
                end,
                ready: true,
                floor,
                records: Vec::new(),
            };
            out.push(Action::Send { to: from, message });
            return Ok(());
        }
        out.push(Action::ReadRecords {
            to: from,
            shard,
            view_id,
            after,
            end: end_version.expect("a log with records past `after`"),
            bytes_max: TRANSFER_PIECE_BYTES_MAX,
            records_max: TRANSFER_PIECE_RECORDS_MAX,
        });
        Ok(())
    }

    /// The driver read a piece: send it, if the view and the shard are still those it was
    /// read for.
    fn send_piece(
        &mut self,
        to: NodeId,
        shard: ShardId,
        view_id: u32,
        after: Option<Version>,
        records: Vec<Record>,
        out: &mut Vec<Action>,
    ) {
        if view_id != self.view.view_id || self.joining.is_some() {
            return;
        }
        let Some(multicast) = self.shard_ref(shard) else {
            return;
        };
        let Some(end) = multicast.transfer_end() else {
            return;
        };
        let floor = multicast.stamp_floor();
        let end_version = end.map(|(v, _)| v);
        // What the driver read comes from disk: check it instead of trusting it. Keep the
        // longest prefix that is in the range asked and within the piece's bounds.
        let mut last = after;
        let mut bytes = 0;
        let mut keep = 0;
        for record in &records {
            let len = record.payload.len();
            let fits = Some(record.version) > last
                && Some(record.version) <= end_version
                && len <= TRANSFER_RECORD_BYTES_MAX
                && keep < TRANSFER_PIECE_RECORDS_MAX
                && (keep == 0 || bytes + len <= TRANSFER_PIECE_BYTES_MAX);
            if !fits {
                break;
            }
            last = Some(record.version);
            bytes += len;
            keep += 1;
        }
        if keep == 0 {
            self.counters.pieces_unservable += 1;
            return;
        }
        let mut records = records;
        records.truncate(keep);
        let message = Message::Piece {
            view_id,
            shard,
            after,
            end,
            ready: true,
            floor,
            records,
        };
        out.push(Action::Send { to, message });
    }

    /// A member of the previous view still sends in it: it missed the commit. Send it the
    /// decision once, so it can finish the change (or learn that it was removed).
    fn answer_laggard(&mut self, from: NodeId, view_id: u32, out: &mut Vec<Action>) {
        let (ended, told) = match (&self.previous, &self.last_restart) {
            (Some(previous), _) if previous.0.view_id == view_id => (previous, &mut self.told),
            (_, Some(restart)) if restart.0.view_id == view_id => (restart, &mut self.told_restart),
            _ => return,
        };
        let (previous, round, decision) = ended;
        let Some(rank) = previous.rank_of(from) else {
            return;
        };
        if *told & (1 << rank) != 0 {
            return;
        }
        *told |= 1 << rank;
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
        let survivors = (0..self.view.members.len())
            .filter(|&r| decision.removed & (1 << r) == 0)
            .count();
        if survivors + decision.joined.len() > VIEW_MEMBERS_MAX {
            return Err(Rejection::OutOfRange("a next view beyond VIEW_MEMBERS_MAX"));
        }
        for (i, node) in decision.joined.iter().enumerate() {
            let survives = self
                .view
                .rank_of(*node)
                .is_some_and(|r| decision.removed & (1 << r) == 0);
            if survives || decision.joined[..i].contains(node) {
                return Err(Rejection::OutOfRange("a joiner that is already a member"));
            }
        }
        for (i, (node, _)) in decision.addrs.iter().enumerate() {
            if !decision.joined.contains(node) || decision.addrs[..i].iter().any(|(n, _)| n == node)
            {
                return Err(Rejection::OutOfRange(
                    "an address for a node that does not join, or two for one",
                ));
            }
        }
        let shards = self.view.layout.shards();
        if decision.trims.len() != shards.len()
            || !(decision.ends.is_empty() || decision.ends.len() == shards.len())
            || !(decision.floors.is_empty() || decision.floors.len() == shards.len())
        {
            return Err(Rejection::OutOfRange("decision of the wrong shape"));
        }
        // A restart decision's trims say where each log ends (they come from the logs, not
        // from what this member received).
        let restart = self.restarting || !decision.ends.is_empty();
        for (shard, trim) in shards.iter().zip(&decision.trims) {
            if trim.len() != shard.members.len() {
                return Err(Rejection::OutOfRange("decision of the wrong shape"));
            }
            // Once the trims are delivered, a repeated decision needs only its shape checked.
            if decision.removed & (1 << self.rank) == 0 && !self.change.trimmed && !restart {
                if let Some(multicast) = self.shard_ref(shard.id) {
                    if multicast.catch_up().is_none() {
                        multicast.check_trim(trim)?;
                    }
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
        self.adopt_suspicions(suspicions, out);
        // A proposal that suspects no one adds joiners: it wedges this member all the same.
        self.wedge(out);
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
        self.send_ack(leader, round, out);
        Ok(())
    }

    /// Answers `leader`'s `round` with this member's promise, suspicions and report.
    fn send_ack(&self, leader: NodeId, round: u64, out: &mut Vec<Action>) {
        let report = self.report();
        let message = Message::Ack {
            view_id: self.view.view_id,
            round,
            promised: self.change.promised,
            suspicions: self.suspicion.suspected(),
            counts: report.counts,
            accepted: report.accepted,
            logs: report.logs,
            floors: report.floors,
        };
        out.push(Action::Send {
            to: leader,
            message,
        });
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
        if leading.round != round {
            return Ok(());
        }
        if promised > round {
            // Refused (the proposal, or in phase 2 the decision): a higher round was promised;
            // start above it.
            self.change.promised = self.change.promised.max(promised);
            self.change.leading = None;
            return Ok(());
        }
        if leading.proposal.is_some() {
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
        for (shard, _) in &report.logs {
            let in_shard = self
                .view
                .layout
                .shard(*shard)
                .is_some_and(|s| s.members.contains(&member));
            if !in_shard {
                return Err(Rejection::NotInShard {
                    shard: *shard,
                    node: member,
                });
            }
        }
        // A member may leave out a shard it is still catching up: it delivers none of its trim.
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
        if round < self.change.promised {
            // Refused: tell the leader, which otherwise waits for ever in phase 2 (members
            // that trusted it only again later promised others meanwhile).
            self.send_ack(leader, round, out);
            return Ok(());
        }
        if !self.wedged {
            return Ok(());
        }
        if self.change.echoed == Some(round) {
            // Sent again: the leader may have dropped the echo while it suspected this node.
            self.change.echoed = None;
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
        if self.restarting {
            // Nothing received before the stop survived it: the logs are what counts.
            let logs = self
                .shards
                .iter()
                .flatten()
                .map(|m| (m.shard(), m.held().map(|h| h.last)))
                .collect();
            return Report {
                counts: Vec::new(),
                accepted: self.change.accepted.clone(),
                logs,
                floors: Vec::new(),
            };
        }
        let current = || {
            self.shards
                .iter()
                .flatten()
                .filter(|m| m.catch_up().is_none())
        };
        let counts = current()
            .map(|m| (m.shard(), m.received().to_vec()))
            .collect();
        let floors = current()
            .map(|m| (m.shard(), m.published_floor()))
            .collect();
        Report {
            counts,
            accepted: self.change.accepted.clone(),
            logs: Vec::new(),
            floors,
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

    /// Adds the suspicions a peer reports. A restarting node keeps only its own: who is back
    /// differs from node to node while members come back, and a member it hears from again is
    /// trusted again (see [`Node::forgive`]).
    /// A node that trusts no majority keeps only its own as well: it trusts again whom it hears
    /// from, and a peer's stale report must not undo that.
    fn adopt_suspicions(&mut self, mask: u64, out: &mut Vec<Action>) {
        if !self.keeps_own_suspicions() {
            self.suspect(mask, out);
        }
    }

    /// Whether this node keeps only its own suspicions and trusts again a member it hears
    /// from: in a total restart, while it trusts no majority, and once the view change is
    /// stuck — wedged for [`STUCK_CHANGE_TIMEOUTS`] suspicion timeouts without a new view.
    /// Members that suspected each other falsely can hold trust that no leader gathers: each
    /// trusts a majority, but not the same one, or the members trusted hold no replica of
    /// some shard; those alive are heard from, and trusting them again ends the change.
    fn keeps_own_suspicions(&self) -> bool {
        self.restarting || self.lacks_majority() || self.change_stuck()
    }

    /// Whether this node has been wedged for [`STUCK_CHANGE_TIMEOUTS`] suspicion timeouts.
    fn change_stuck(&self) -> bool {
        let stuck_us = (self.config.suspect_after_ms * 1000).saturating_mul(STUCK_CHANGE_TIMEOUTS);
        self.wedged && self.mono_us.saturating_sub(self.wedged_at_us) >= stuck_us
    }

    /// Whether the members this node trusts (itself among them) are no majority of its view.
    fn lacks_majority(&self) -> bool {
        !is_majority(self.suspicion.trusted(), self.view.members.len())
    }

    /// In a total restart, a member suspected for its silence (it was not back yet) is
    /// trusted again once heard from: suspicions there only say whom a leader waits for, and
    /// every member must answer every leader for the rounds to converge. The same holds for a
    /// node whose view change is stuck (see [`Node::keeps_own_suspicions`]), and for a node
    /// that trusts no majority of its view: it can neither lead nor follow a change, so
    /// without this, members that suspected each other falsely (all slow at once) would stay
    /// wedged for ever; a member it hears from is alive, and trusting it again lets a majority
    /// form. Safety does not rest on suspicions (the rounds, promises and accepted decisions
    /// of the change do), and the shards stay wedged. A round this node leads, still in phase 1
    /// without it, starts over to include it.
    fn forgive(&mut self, rank: usize) -> bool {
        if !self.keeps_own_suspicions() {
            return false;
        }
        if !self.restarting {
            self.counters.forgiven += 1;
        }
        self.suspicion.forgive(rank);
        if self
            .change
            .leading
            .as_ref()
            .is_some_and(|l| l.proposal.is_none() && !l.reports.contains_key(&rank))
        {
            self.change.leading = None;
        }
        true
    }

    /// Adds suspicions (a mask over view ranks); any suspicion wedges every shard of this node.
    /// This node's own rank is never added: a peer that suspects it only wedges it (the view
    /// changes, and this node learns whether it is still a member).
    fn suspect(&mut self, mask: u64, out: &mut Vec<Action>) {
        let reports_me = mask & (1 << self.rank) != 0;
        let new = self.suspicion.merge(mask);
        self.lease.withhold(new);
        if new == 0 {
            if reports_me {
                self.wedge(out);
            }
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
            self.wedged_at_us = self.mono_us;
            if self.membership == Membership::Active {
                self.membership = Membership::Wedged;
            }
            out.push(Action::Wedge);
        }
    }

    /// After any input: deliver what became stable, send what the window allows, and push the
    /// rows that changed, after the data they count.
    fn progress(&mut self, out: &mut Vec<Action>) {
        if self.joining.is_some() {
            return;
        }
        loop {
            let view_id = self.view.view_id;
            for multicast in self.shards.iter_mut().flatten() {
                if multicast.finish_catch_up() {
                    self.counters.shards_caught_up += 1;
                    let shard = multicast.shard();
                    out.push(Action::CaughtUp { shard });
                }
                if let Some((to, after)) = multicast.next_fetch(self.mono_us) {
                    let shard = multicast.shard();
                    let message = Message::Fetch {
                        view_id,
                        shard,
                        after,
                    };
                    out.push(Action::Send { to, message });
                }
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
        if !self.wedged {
            // The leader of a quiet view starts a change to add the nodes that asked to join.
            if self.joins_pending.is_empty() || self.rank != 0 {
                return false;
            }
            self.wedge(out);
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
        let idle = self.change.leading.is_none() && self.change.accepted.is_none();
        if idle
            && self.membership == Membership::Inadequate
            && suspected == 0
            && self.joins_pending.is_empty()
        {
            // An inadequate view changes once a node asks to join (or a member fails).
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
                let decision = if self.restarting {
                    decide_restart(
                        &self.view.layout,
                        self.view.view_id,
                        &self.view.members,
                        suspected,
                        &leading.reports,
                    )
                } else {
                    decide(
                        &self.view.layout,
                        &self.view.members,
                        suspected,
                        &self.joins_pending,
                        &leading.reports,
                    )
                    .map(|mut decision| {
                        decision.addrs = decision
                            .joined
                            .iter()
                            .filter_map(|node| Some((*node, *self.join_addrs.get(node)?)))
                            .collect();
                        decision
                    })
                };
                let Some(decision) = decision else {
                    // No replica of some shard is trusted. If they all failed, only a total
                    // restart recovers it; if some were suspected falsely, this node trusts
                    // again those it hears from once the change is stuck (see `forgive`).
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
        let members = next_members(&self.view.members, &decision);
        if decision.removed & (1 << self.rank) != 0 {
            // Left out: join again through the members of the next view.
            let me = self.config.node_id;
            let contacts = members.into_iter().filter(|&m| m != me).collect();
            let cuts = self.restart_cuts(&decision);
            self.become_joiner(contacts);
            for (shard, end) in cuts {
                out.push(Action::TruncateLog {
                    shard,
                    after: end.map(|(v, _)| v),
                });
                match end {
                    Some(last) => {
                        let held = Held {
                            last,
                            persisted: Some(last.0),
                        };
                        self.held.insert(shard, held);
                    }
                    None => {
                        self.held.remove(&shard);
                    }
                }
            }
            return false;
        }
        if !self.change.is_logged(&decision) {
            self.ensure_logged(round, &decision, out);
            return false;
        }
        // Whether or not this member suspected them, the removed members get no more echoes
        // from it and their heartbeats no longer move the wait below.
        self.lease.withhold(decision.removed);
        if !self.change.trimmed && self.mono_us < self.lease.removable_at(decision.removed) {
            // A removed member may still hold a read lease resting on this member's echo:
            // nothing it never received is delivered, in the trim or in the next view, before
            // that lease ran out (see `lease.rs`). The tick that comes after tries again.
            return false;
        }
        if !self.change.trimmed && (self.restarting || !decision.ends.is_empty()) {
            // Nothing is delivered in a view a total restart ends: what was delivered is in
            // the logs, and the next view starts from the longest.
            self.change.trimmed = true;
        }
        if !self.change.trimmed {
            self.change.trimmed = true;
            for (index, trim) in decision.trims.iter().enumerate() {
                if let Some(Some(multicast)) = self.shards.get_mut(index) {
                    if multicast.catch_up().is_some() {
                        // The trimmed versions reach it by transfer in the next view.
                        continue;
                    }
                    let delivered = multicast.deliver_trim(trim, out);
                    self.counters.versions_delivered += delivered as u64;
                    self.counters.rows_sent += multicast.push_row(out) as u64;
                }
            }
        }
        if !self.shards.iter().flatten().all(Multicast::all_persisted) {
            return false;
        }
        let spec = self.view.layout.spec();
        // The decision was checked: its members are distinct and within the bounds.
        let layout = Layout::assign_allowing_inadequate(spec, &members, Some(&self.view.layout))
            .expect("a checked decision lays out");
        let addrs = next_addrs(&self.view, &members, &decision);
        let view = View {
            view_id: self.view.view_id + 1,
            members,
            layout,
            addrs,
        };
        self.install(view, round, decision, out);
        true
    }

    /// A member a total restart left out (it came back late) may hold a longer log of a shard
    /// than the restart kept: every log of the ended view is a prefix of one sequence, so the
    /// versions beyond the shard's end were on no member of the quorum, never durable on every
    /// replica. The shards whose logs must be cut, and where.
    fn restart_cuts(&self, decision: &Decision) -> Vec<(ShardId, Option<(Version, Hlc)>)> {
        let mut cuts = Vec::new();
        for multicast in self.shards.iter().flatten() {
            let Some(&end) = decision.ends.get(usize::from(multicast.shard().0)) else {
                continue;
            };
            let last = multicast.held().map(|h| h.last.0);
            if last > end.map(|(v, _)| v) {
                cuts.push((multicast.shard(), end));
            }
        }
        cuts
    }

    fn install(&mut self, view: View, round: u64, decision: Decision, out: &mut Vec<Action>) {
        let old: Vec<Option<Multicast>> = std::mem::take(&mut self.shards);
        let old_view = self.view.clone();
        let restarting = self.restarting;
        self.enter(view.clone(), old, &decision.ends, &decision.floors, out);
        if !decision.ends.is_empty() {
            self.last_restart = Some((old_view.clone(), round, decision.clone()));
            self.told_restart = 0;
        }
        self.previous = Some((old_view, round, decision.clone()));
        self.counters.views_installed += 1;
        if restarting && decision.ends.is_empty() {
            // A decision logged before the stop was adopted: the group restarts again from the
            // view it installs. Its joiners are not told: the restart leaves out whoever is not
            // back, and they join again.
            self.restarting = true;
            self.wedged = true;
            self.membership = Membership::Wedged;
            for multicast in self.shards.iter_mut().flatten() {
                multicast.wedge();
            }
            self.replay_future(out);
            return;
        }
        for &joiner in &decision.joined {
            let message = Message::Welcome { view: view.clone() };
            out.push(Action::Send {
                to: joiner,
                message,
            });
        }
        self.replay_future(out);
    }

    /// A joiner was welcomed into `view`: every shard it replicates there is new to it.
    fn install_welcome(&mut self, view: View, out: &mut Vec<Action>) {
        self.joining = None;
        self.enter(view, Vec::new(), &[], &[], out);
        self.counters.views_installed += 1;
        self.replay_future(out);
    }

    /// Enters `view`: continues the shards of `old` this node keeps, starts the others by
    /// state transfer (resuming from the logs it holds), and wedges at once if the view is
    /// inadequate.
    ///
    /// `ends` is empty, or, after a total restart, per shard the end of the longest log: a
    /// log that ends elsewhere is caught up from a member whose log ends there.
    fn enter(
        &mut self,
        view: View,
        mut old: Vec<Option<Multicast>>,
        ends: &[Option<(Version, Hlc)>],
        floors: &[Hlc],
        out: &mut Vec<Action>,
    ) {
        let me = self.config.node_id;
        let rank = view.rank_of(me).expect("a node enters a view it is in");
        let mut shards = Vec::with_capacity(view.layout.shards().len());
        for shard in view.layout.shards() {
            let Some(position) = shard.members.iter().position(|&m| m == me) else {
                shards.push(None);
                continue;
            };
            let members = shard.members.clone();
            let previous = old.get_mut(usize::from(shard.id.0)).and_then(Option::take);
            let end = ends.get(usize::from(shard.id.0));
            // A total restart carries no floor (none is on disk), and every member starts its
            // stamps over from its log, whatever floor it had kept: all start equal.
            let floor = if ends.is_empty() {
                Some(
                    floors
                        .get(usize::from(shard.id.0))
                        .copied()
                        .unwrap_or(Hlc::ZERO),
                )
            } else {
                None
            };
            let multicast = match previous {
                Some(multicast)
                    if multicast.catch_up().is_none()
                        && end.is_none_or(|&end| multicast.last_delivered() == end) =>
                {
                    multicast.successor(view.view_id, members, position, &self.config, floor)
                }
                Some(multicast) => Multicast::joining(
                    shard.id,
                    view.view_id,
                    members,
                    position,
                    &self.config,
                    multicast.held(),
                ),
                None => Multicast::joining(
                    shard.id,
                    view.view_id,
                    members,
                    position,
                    &self.config,
                    self.held.remove(&shard.id),
                ),
            };
            shards.push(Some(multicast));
        }
        // Shards this node no longer replicates: their logs stay on its disk.
        for multicast in old.into_iter().flatten() {
            self.hold(&multicast);
        }
        self.shards = shards;
        self.rank = rank;
        self.suspicion = Suspicion::new(
            rank,
            view.members.len(),
            self.config.suspect_after_ms.saturating_mul(1000),
        );
        self.suspicion.start(self.mono_us);
        self.lease = Lease::new(
            rank,
            view.members.len(),
            self.config.suspect_after_ms.saturating_mul(1000),
            self.config.heartbeat_ms.saturating_mul(1000),
        );
        self.lease.start(self.mono_us);
        self.wedged = false;
        self.restarting = false;
        self.membership = Membership::Active;
        self.change = ViewChange::default();
        self.told = 0;
        self.joins_pending
            .retain(|node| !view.members.contains(node));
        let pending = &self.joins_pending;
        self.join_addrs.retain(|node, _| pending.contains(node));
        self.view = view.clone();
        out.push(Action::InstallView { view });
        if !self.view.layout.is_adequate() {
            self.wedge(out);
            self.membership = Membership::Inadequate;
        }
    }

    /// Remembers the last record of a shard log this node keeps on disk without replicating
    /// the shard.
    fn hold(&mut self, multicast: &Multicast) {
        if let Some(held) = multicast.held() {
            self.held.insert(multicast.shard(), held);
        }
    }

    /// Leaves the view: keeps its logs, and asks `contacts` to be added again.
    fn become_joiner(&mut self, contacts: Vec<NodeId>) {
        for multicast in std::mem::take(&mut self.shards).into_iter().flatten() {
            self.hold(&multicast);
        }
        let me = self.config.node_id;
        self.view = placeholder(me, self.view.view_id);
        self.rank = 0;
        self.wedged = false;
        self.restarting = false;
        self.membership = Membership::Joining;
        self.change = ViewChange::default();
        self.previous = None;
        self.told = 0;
        self.future.clear();
        self.joins_pending.clear();
        self.join_addrs.clear();
        self.joining = Some(Joining {
            contacts,
            next: 0,
            next_try_us: self.mono_us,
            redirected: false,
        });
    }

    /// Replays what peers already sent in the view just entered, in their order.
    fn replay_future(&mut self, out: &mut Vec<Action>) {
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

    /// Whether this node is back from a total restart and its group has not installed the
    /// view that ends it yet.
    pub fn is_restarting(&self) -> bool {
        self.restarting
    }

    /// Where this node stands in the membership. A node in [`Membership::NoMajority`] takes no
    /// write; reads at a time at or below [`Node::stability_frontier`] stay correct there,
    /// since that frontier no longer moves and no view can change what lies below it.
    pub fn membership(&self) -> Membership {
        if self.membership == Membership::Wedged && self.joining.is_none() {
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

    /// Whether this node may take a [`Node::barrier`] at `now` (its clocks, read when the
    /// barrier is taken, not at its last step): every other member of its view echoed one of
    /// its heartbeats sent less than an eighth of the suspicion timeout ago (at least four
    /// heartbeat intervals), and a member
    /// delivers the trim of a decision that removes a peer only once such a lease resting on
    /// its echo has run out; so no view change can have removed this node and delivered, in its
    /// ragged trim, what it never received. False while it joins; true alone in its view.
    pub fn holds_read_lease(&self, now: impl Into<Now>) -> bool {
        let mono_us = now.into().mono_us.max(self.mono_us);
        self.joining.is_none() && self.lease.holds(mono_us)
    }

    /// A barrier of `shard` at this node now (`None` if it does not replicate the shard): once
    /// [`Node::barrier_reached`] says so, this node delivered every version any member of the
    /// shard had delivered when the barrier was taken.
    pub fn barrier(&self, shard: ShardId) -> Option<Barrier> {
        self.shard_ref(shard).map(Multicast::barrier)
    }

    /// This node delivered everything `barrier` of `shard` covers. `false` if it does not
    /// replicate the shard (or is still receiving its history).
    pub fn barrier_reached(&self, shard: ShardId, barrier: Barrier) -> bool {
        self.shard_ref(shard)
            .is_some_and(|multicast| multicast.barrier_reached(barrier))
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
            catching_up: multicast.catch_up().is_some(),
        })
    }
}

/// The members of the view after `decision`: those that stay, in rank order, then the joiners.
fn next_members(members: &[NodeId], decision: &Decision) -> Vec<NodeId> {
    let stay = members
        .iter()
        .enumerate()
        .filter(|&(rank, _)| decision.removed & (1 << rank) == 0)
        .map(|(_, &node)| node);
    stay.chain(decision.joined.iter().copied()).collect()
}

/// The stand-in view of a node that is not a member: itself alone, numbered as the last view
/// it was in, so messages of that view and earlier ones are recognised as stale.
fn placeholder(me: NodeId, view_id: u32) -> View {
    let spec = LayoutSpec {
        namespace_shards: 1,
        data_shards: 0,
        replicas: 1,
        replicas_min: 1,
    };
    let layout = Layout::assign(spec, &[me], None).expect("a one-member layout");
    View {
        view_id,
        members: vec![me],
        layout,
        addrs: Vec::new(),
    }
}

/// The addresses the next view carries: those of the old view for members that stay (and did
/// not join again with a new one), and those the decision's joiners announced; in id order.
fn next_addrs(view: &View, members: &[NodeId], decision: &Decision) -> Vec<(NodeId, SocketAddr)> {
    let mut addrs: Vec<(NodeId, SocketAddr)> = view
        .addrs
        .iter()
        .filter(|(node, _)| members.contains(node) && !decision.joined.contains(node))
        .chain(&decision.addrs)
        .copied()
        .collect();
    addrs.sort_by_key(|(node, _)| *node);
    addrs
}
