//! Ordered multicast inside one shard, as Derecho does it over reliable FIFO links.
//!
//! Every member is a sender. Message `i` of the sender of shard rank `r` has sequence number
//! `i * senders + r`. A message is *stable* once every member's row says it received it, and
//! stable messages are delivered in sequence order. A sender with nothing to send while a later
//! sequence number has arrived sends *null* messages to fill its slots, so the order keeps
//! moving; nulls create no version. A null is delivered as soon as it arrived here, without
//! waiting until every member received it: it carries nothing and creates no version, so every
//! member's log is the same whether a member delivers it or a ragged trim leaves it out (the trim
//! may end a sender below nulls delivered here, never below a batch delivered here). This saves
//! a round of rows on every message that follows a null: the slots of idle senders no longer
//! wait for their nulls to reach every member. A sender keeps at most `window` messages outstanding beyond
//! the slowest member's delivered counter, and batches waiting requests into one message.

use std::collections::VecDeque;

use derechofs_storage::{version_of, Hlc, Version};

use crate::bounds::{
    BATCH_REQUESTS_MAX, PENDING_BYTES_MAX, PERSIST_QUEUE_MAX, REQUEST_BYTES_MAX, SEQ_MAX,
    UNPERSISTED_STAMPS_MAX, WINDOW_MAX,
};
use crate::config::Config;
use crate::error::{Rejection, SubmitError};
use crate::hlc::{delivery_stamp, just_before, sender_stamp};
use crate::layout::ShardId;
use crate::message::{Batch, Body, Message, Request};
use crate::node::{Action, Delivery};
use crate::row::Row;
use crate::stability::Stability;
use crate::transfer::{check_piece, CatchUp, Held, Piece};
use crate::view::NodeId;

/// A point in a shard's order taken at one member: the end of everything it had received when
/// the barrier was taken. Once that member delivered up to it, it delivered every message that
/// any member of the shard had delivered when the barrier was taken: a batch is delivered
/// only once every member received it, so it was among the messages received here. This is
/// what a read needs to see every write whose reply was sent before it arrived, whichever
/// member answered that write (close-to-open consistency across clients).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Barrier {
    /// The view the barrier was taken in; any later view is past it.
    pub view_id: u32,
    /// One past the highest sequence number received when it was taken (0: none).
    pub seqs: u64,
}

/// This member's state of one shard's multicast.
#[derive(Debug)]
pub(crate) struct Multicast {
    shard: ShardId,
    view_id: u32,
    /// Members in shard rank order; all of them send.
    members: Vec<NodeId>,
    /// This member's shard rank.
    rank: usize,
    /// The shared state table: one row per member; only `rows[rank]` is written here.
    rows: Vec<Row>,
    /// The own row changed since it was last pushed.
    row_dirty: bool,
    /// The own `delivered` counter in the row last pushed.
    pushed_delivered: u64,
    /// `persisted_seqs` when the own row was last pushed. What the log persisted since goes out
    /// at once only if another member's row wants it (`Row::wants`), or while wedged; else with
    /// the next push (a message received, a delivery far ahead, a floor) or at the next tick.
    /// A version's persistence microseconds after its delivery would otherwise cost a push to
    /// every peer, each a wake-up there, where nobody waits for it.
    pushed_persisted_seqs: u64,
    /// The own `persisted` in the row last pushed.
    pushed_persisted: Option<Version>,
    /// How far `delivered` may run ahead of `pushed_delivered` while it waits to go out with
    /// the row that reports its versions persisted: half the send window (in sequence numbers,
    /// so each sender loses at most a few messages of its window to the wait), 0 for a window
    /// of 1 (every delivery pushed at once).
    delivered_lag_max: u64,
    /// Per sender: messages received (or, for this member, sent) and not yet delivered, oldest
    /// first. Bounded by `WINDOW_MAX` per sender.
    inbox: Vec<VecDeque<Body>>,
    /// Per sender: one past the index of the last batch (not null) delivered here; a ragged
    /// trim must keep at least these.
    batches_delivered: Vec<u64>,
    /// Local requests waiting for the window to open, each with whether its client waits
    /// until it is durable on every member (the batch that carries one sets the own row's
    /// `wants`).
    pending: VecDeque<(Request, bool)>,
    pending_bytes: usize,
    pending_max: usize,
    /// Sequence numbers and stamps of own batches not yet delivered and persisted here: the
    /// oldest bounds the floor this member publishes.
    own_unpersisted: VecDeque<(u64, Hlc)>,
    last_hlc: Hlc,
    last_version: Option<Version>,
    /// Every version of this view is stamped above it: the highest stability floor published
    /// in the previous view (`Decision::floors`), which the log's last stamp may be below.
    stamp_floor: Hlc,
    /// Persist requests not yet confirmed: the version asked for, and the delivered counter
    /// (nulls included) that becomes persisted with it.
    persist_queue: VecDeque<(Version, u64)>,
    /// Every sequence number below it is persisted here (or was a null).
    persisted_seqs: u64,
    stability: Stability,
    wedged: bool,
    /// The last version and stamp of the log when this view began: where a state transfer
    /// served by this member ends.
    start: Option<(Version, Hlc)>,
    /// The persistence frontier the previous view reached: durable on every member that had
    /// the shard then, and so never to go back while new members catch up.
    carried_durable: Option<Version>,
    /// Set while this member is new to the shard and its log is being transferred.
    catch_up: Option<CatchUp>,
}

impl Multicast {
    pub(crate) fn new(
        shard: ShardId,
        view_id: u32,
        members: Vec<NodeId>,
        rank: usize,
        config: &Config,
    ) -> Multicast {
        assert!(rank < members.len());
        let senders = members.len();
        Multicast {
            shard,
            view_id,
            rows: vec![Row::new(senders); senders],
            row_dirty: false,
            pushed_delivered: 0,
            pushed_persisted_seqs: 0,
            pushed_persisted: None,
            delivered_lag_max: u64::from(config.window / 2),
            inbox: vec![VecDeque::new(); senders],
            batches_delivered: vec![0; senders],
            pending: VecDeque::new(),
            pending_bytes: 0,
            pending_max: config.pending_requests_max,
            own_unpersisted: VecDeque::new(),
            last_hlc: Hlc::ZERO,
            last_version: None,
            stamp_floor: Hlc::ZERO,
            persist_queue: VecDeque::new(),
            persisted_seqs: 0,
            stability: Stability::new(senders),
            wedged: false,
            start: None,
            carried_durable: None,
            catch_up: None,
            members,
            rank,
        }
    }

    /// The multicast of a shard new to this member: it takes part in ordering at once, and
    /// delivers once state transfer brought its log up to where the shard stood when the view
    /// began. `held` is the log it already holds, if any.
    pub(crate) fn joining(
        shard: ShardId,
        view_id: u32,
        members: Vec<NodeId>,
        rank: usize,
        config: &Config,
        held: Option<Held>,
    ) -> Multicast {
        let mut multicast = Multicast::new(shard, view_id, members, rank, config);
        let (have, persisted) = held.map_or((None, None), |h| (Some(h.last), h.persisted));
        multicast.catch_up = Some(CatchUp::new(have, persisted));
        multicast
    }

    /// The multicast of a shard this member replicated in `view_id` before every member
    /// stopped: its log, durable on disk, ends at `last`. Wedged: a total restart only ends
    /// the view.
    pub(crate) fn restarted(
        shard: ShardId,
        view_id: u32,
        members: Vec<NodeId>,
        rank: usize,
        config: &Config,
        last: Option<(Version, Hlc)>,
    ) -> Multicast {
        let mut multicast = Multicast::new(shard, view_id, members, rank, config);
        if let Some((version, hlc)) = last {
            multicast.last_version = Some(version);
            multicast.last_hlc = hlc;
            multicast.rows[rank].persisted = Some(version);
        }
        multicast.start = last;
        multicast.wedge();
        // Its row means nothing to the others (nothing received survived): it is not pushed.
        multicast.row_dirty = false;
        multicast
    }

    /// The log this member holds of the shard: its last record and what of it is persisted.
    pub(crate) fn held(&self) -> Option<Held> {
        match &self.catch_up {
            Some(catch_up) => catch_up.have.map(|last| Held {
                last,
                persisted: catch_up.persisted,
            }),
            None => self.last_delivered().map(|last| Held {
                last,
                persisted: self.rows[self.rank].persisted,
            }),
        }
    }

    /// The transfer in progress, if this member is catching up.
    pub(crate) fn catch_up(&self) -> Option<&CatchUp> {
        self.catch_up.as_ref()
    }

    /// The stamp every version of this view is above (see `Decision::floors`); a transfer
    /// served by this member carries it.
    pub(crate) fn stamp_floor(&self) -> Hlc {
        self.stamp_floor
    }

    /// The highest stability floor this member published in this view.
    pub(crate) fn published_floor(&self) -> Hlc {
        self.rows[self.rank].floor
    }

    /// Where a transfer served by this member ends, or `None` if it cannot serve (it is
    /// catching up itself).
    pub(crate) fn transfer_end(&self) -> Option<Option<(Version, Hlc)>> {
        match self.catch_up {
            Some(_) => None,
            None => Some(self.start),
        }
    }

    /// The member to ask for the next piece and the `after` to ask with, if a fetch is due.
    pub(crate) fn next_fetch(&mut self, now_us: u64) -> Option<(NodeId, Option<Version>)> {
        let senders = self.members.len();
        let rank = self.rank;
        let catch_up = self.catch_up.as_mut()?;
        if senders < 2 || !catch_up.may_ask(now_us) {
            return None;
        }
        if catch_up.source % senders == rank {
            catch_up.source += 1;
        }
        catch_up.source %= senders;
        catch_up.asked = true;
        Some((self.members[catch_up.source], catch_up.have.map(|(v, _)| v)))
    }

    /// A piece from the member of shard rank `from`: hands its records to the driver to
    /// append and persist. Returns how many records it took.
    pub(crate) fn receive_piece(
        &mut self,
        from: usize,
        piece: Piece,
        now_us: u64,
        retry_us: u64,
        out: &mut Vec<Action>,
    ) -> Result<usize, Rejection> {
        let senders = self.members.len();
        let shard = self.shard;
        let Some(catch_up) = &mut self.catch_up else {
            // Late: caught up already.
            return Ok(0);
        };
        if !catch_up.asked
            || from != catch_up.source
            || piece.after != catch_up.have.map(|(v, _)| v)
        {
            // Not the answer to the outstanding fetch.
            return Ok(0);
        }
        catch_up.asked = false;
        if !piece.ready {
            catch_up.source = (catch_up.source + 1) % senders;
            catch_up.refused += 1;
            if catch_up.refused >= senders {
                // Nobody could serve yet: wait before asking around again.
                catch_up.refused = 0;
                catch_up.retry_at_us = now_us + retry_us;
            }
            return Ok(0);
        }
        catch_up.refused = 0;
        let end_version = piece.end.map(|(v, _)| v);
        if catch_up.have.is_some_and(|(v, _)| Some(v) > end_version) {
            // A total restart ended the shard's log before the tail this member holds (it
            // came back after the restart quorum, with versions no member of the quorum had):
            // that tail was never durable on every replica; cut it.
            catch_up.have = piece.end;
            catch_up.persisted = catch_up.persisted.min(end_version);
            catch_up.unpersisted.retain(|&v| Some(v) <= end_version);
            out.push(Action::TruncateLog {
                shard,
                after: end_version,
            });
        }
        if catch_up.end.is_some_and(|end| end != piece.end) {
            return Err(Rejection::OutOfRange("the end of a transfer changed"));
        }
        check_piece(catch_up.have, piece.end, &piece.records)?;
        catch_up.end = Some(piece.end);
        catch_up.floor = catch_up.floor.max(piece.floor);
        let Some(last) = piece.records.last() else {
            if catch_up.have.map(|(v, _)| v) != piece.end.map(|(v, _)| v) {
                return Err(Rejection::OutOfRange("an empty piece before the end"));
            }
            return Ok(0);
        };
        let version = last.version;
        catch_up.have = Some((version, last.hlc));
        catch_up.unpersisted.push_back(version);
        let count = piece.records.len();
        out.push(Action::AppendRecords {
            shard,
            records: piece.records,
        });
        out.push(Action::Persist { shard, version });
        Ok(count)
    }

    /// Ends the transfer once every record up to its end is persisted: the log now stands
    /// where the shard stood when the view began. Returns whether it ended now.
    pub(crate) fn finish_catch_up(&mut self) -> bool {
        let Some(catch_up) = &self.catch_up else {
            return false;
        };
        if self.wedged {
            // It reported no counters for this shard to the view change, so the trim may
            // exceed what it received: it must not deliver the trim. It finishes in the next
            // view, where its log already reaches this view's end.
            return false;
        }
        if !catch_up.is_done() {
            return false;
        }
        let end = catch_up.end.expect("a finished transfer knows its end");
        self.stamp_floor = catch_up.floor;
        self.catch_up = None;
        self.start = end;
        if let Some((version, hlc)) = end {
            self.last_version = Some(version);
            self.last_hlc = hlc;
            self.rows[self.rank].persisted = Some(version);
            self.row_dirty = true;
        }
        true
    }

    fn senders(&self) -> u64 {
        self.members.len() as u64
    }

    /// How many messages of the sender of rank `rank` have a sequence number below `seqs`.
    fn messages_below(&self, rank: usize, seqs: u64) -> u64 {
        let rank = rank as u64;
        if seqs > rank {
            (seqs - rank).div_ceil(self.senders())
        } else {
            0
        }
    }

    /// The multicast of the same shard in the next view `view_id`, with `members`, continuing
    /// this one: the log's last version and stamp, what this member persisted, the stability
    /// frontier, the stamp floor (raised to `stamp_floor`, the decision's), and the local
    /// requests still waiting. Every member of the new shard persisted
    /// this shard up to the ragged trim before installing.
    pub(crate) fn successor(
        mut self,
        view_id: u32,
        members: Vec<NodeId>,
        rank: usize,
        config: &Config,
        stamp_floor: Option<Hlc>,
    ) -> Multicast {
        assert!(
            self.all_persisted(),
            "a view is left once its log is persisted"
        );
        assert!(
            self.catch_up.is_none(),
            "a shard still catching up starts over"
        );
        let mut next = Multicast::new(self.shard, view_id, members, rank, config);
        next.last_hlc = self.last_hlc;
        next.last_version = self.last_version;
        // Frontiers carried from earlier views stay protected too; `None` (a total restart)
        // starts over from nothing, as members back from their logs do.
        next.stamp_floor = stamp_floor.map_or(Hlc::ZERO, |floor| self.stamp_floor.max(floor));
        next.start = self.last_version.map(|version| (version, self.last_hlc));
        // What every member persisted, as far as this one knows, stays durable. The rows of
        // the other members start from nothing: a member may still be catching up the shard
        // (it persisted nothing of it), and a row's persisted version never goes back.
        next.carried_durable = self.persistence_frontier();
        next.rows[rank].persisted = self.rows[self.rank].persisted;
        next.stability = Stability::starting_at(next.members.len(), self.stability.frontier());
        next.pending_bytes = self.pending_bytes;
        next.pending = std::mem::take(&mut self.pending);
        next
    }

    /// Every version delivered here is persisted here.
    pub(crate) fn all_persisted(&self) -> bool {
        self.catch_up.is_some() || self.rows[self.rank].persisted >= self.last_version
    }

    /// This member's received counters per sender (frozen once wedged).
    pub(crate) fn received(&self) -> &[u64] {
        &self.rows[self.rank].received
    }

    /// A barrier here now: the point this member's delivery reaches once it delivered every
    /// message it has received so far, from every sender (see [`Barrier`]).
    pub(crate) fn barrier(&self) -> Barrier {
        let senders = self.senders();
        let seqs = self.rows[self.rank]
            .received
            .iter()
            .enumerate()
            .filter(|(_, &count)| count > 0)
            .map(|(sender, &count)| (count - 1) * senders + sender as u64 + 1)
            .max()
            .unwrap_or(0);
        Barrier {
            view_id: self.view_id,
            seqs,
        }
    }

    /// This member delivered everything `barrier` covers: every sequence number below it in
    /// its view, or the view ended (a view is left only once everything any member delivered
    /// in it was delivered here: the ragged trim keeps every delivered message, and what it
    /// leaves out was delivered nowhere).
    pub(crate) fn barrier_reached(&self, barrier: Barrier) -> bool {
        if self.catch_up.is_some() {
            return false;
        }
        barrier.view_id < self.view_id
            || (barrier.view_id == self.view_id && self.rows[self.rank].delivered >= barrier.seqs)
    }

    pub(crate) fn shard(&self) -> ShardId {
        self.shard
    }

    pub(crate) fn members(&self) -> &[NodeId] {
        &self.members
    }

    pub(crate) fn rank_of(&self, node: NodeId) -> Option<usize> {
        self.members.iter().position(|&member| member == node)
    }

    pub(crate) fn own_row(&self) -> &Row {
        &self.rows[self.rank]
    }

    pub(crate) fn is_wedged(&self) -> bool {
        self.wedged
    }

    pub(crate) fn pending_requests(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn last_delivered(&self) -> Option<(Version, Hlc)> {
        self.last_version.map(|version| (version, self.last_hlc))
    }

    /// Zero while catching up: this member's log cannot answer any read yet.
    pub(crate) fn stability_frontier(&self) -> Hlc {
        match self.catch_up {
            Some(_) => Hlc::ZERO,
            None => self.stability.frontier(),
        }
    }

    /// The highest version persisted on every member (or on every member of the previous
    /// view, while new members catch up). `None` while this member is catching up.
    pub(crate) fn persistence_frontier(&self) -> Option<Version> {
        if self.catch_up.is_some() {
            return None;
        }
        let now = self.rows.iter().map(|row| row.persisted).min().flatten();
        now.max(self.carried_durable)
    }

    /// Queues a local request; `durable`: its client waits until it is durable on every member.
    pub(crate) fn submit(&mut self, request: Request, durable: bool) -> Result<(), SubmitError> {
        if self.catch_up.is_some() {
            return Err(SubmitError::CatchingUp(self.shard));
        }
        if self.wedged {
            return Err(SubmitError::Wedged(self.shard));
        }
        let bytes = request.payload.len();
        if bytes > REQUEST_BYTES_MAX {
            return Err(SubmitError::TooLarge(bytes));
        }
        if self.pending.len() >= self.pending_max || self.pending_bytes + bytes > PENDING_BYTES_MAX
        {
            return Err(SubmitError::QueueFull(self.shard));
        }
        self.pending_bytes += bytes;
        self.pending.push_back((request, durable));
        Ok(())
    }

    pub(crate) fn receive_data(
        &mut self,
        sender: usize,
        index: u64,
        body: Body,
    ) -> Result<(), Rejection> {
        if self.wedged {
            // The received counters froze when this member wedged: they are what it reports
            // for the ragged trim, and every row it pushes counts no more, so no member can
            // deliver a message the trim leaves out. Later messages are beyond the trim.
            return Ok(());
        }
        let expected = self.rows[self.rank].received[sender];
        if index != expected {
            let (shard, sender) = (self.shard, sender as u32);
            return Err(Rejection::OutOfOrder {
                shard,
                sender,
                expected,
                got: index,
            });
        }
        if index
            .saturating_mul(self.senders())
            .saturating_add(sender as u64)
            > SEQ_MAX
        {
            return Err(Rejection::OutOfRange("sequence number"));
        }
        if self.inbox[sender].len() >= WINDOW_MAX as usize {
            return Err(Rejection::WindowExceeded {
                shard: self.shard,
                sender: sender as u32,
            });
        }
        if let Body::Batch(batch) = &body {
            if batch.requests.is_empty() || batch.requests.len() > BATCH_REQUESTS_MAX {
                return Err(Rejection::OutOfRange("requests in a batch"));
            }
        }
        self.inbox[sender].push_back(body);
        self.rows[self.rank].received[sender] += 1;
        self.row_dirty = true;
        Ok(())
    }

    /// Takes the newest row of the member of rank `sender`; returns the suspicions it carries.
    pub(crate) fn receive_row(&mut self, sender: usize, row: Row) -> Result<u64, Rejection> {
        let (shard, rank) = (self.shard, self.rank);
        self.rows[sender].check_successor(&row, shard, sender as u32)?;
        // The row travels after the data it counts, so it can count no more than arrived here;
        // and nobody received more of this member's messages than it sent.
        let own = &self.rows[rank];
        // A wedged member dropped the data that arrived after it froze its counters.
        if !self.wedged
            && (row.received[sender] > own.received[sender]
                || row.received[rank] > own.received[rank])
        {
            return Err(Rejection::RowRegressed {
                shard,
                sender: sender as u32,
            });
        }
        self.stability
            .publish(sender, row.floor, row.floor_delivered, self.persisted_seqs);
        let suspicions = row.suspicions;
        if row.wants > self.pushed_persisted_seqs
            && self.persisted_seqs > self.pushed_persisted_seqs
        {
            // It waits for what this log persisted and no pushed row said yet.
            self.row_dirty = true;
        }
        self.rows[sender] = row;
        Ok(suspicions)
    }

    /// Delivers every message that became stable, in sequence order, as one batch, and asks the
    /// driver to persist the versions it created.
    pub(crate) fn deliver(&mut self, out: &mut Vec<Action>) -> usize {
        if self.wedged || self.catch_up.is_some() {
            return 0;
        }
        let senders = self.senders();
        let mut deliveries = Vec::new();
        let mut delivered_any = false;
        loop {
            let seq = self.rows[self.rank].delivered;
            if seq > SEQ_MAX {
                break;
            }
            let (sender, index) = ((seq % senders) as usize, seq / senders);
            if self.rows[self.rank].received[sender] <= index {
                break;
            }
            // A null received here needs no one else's row (see the module's comment); a
            // batch is delivered once every member received it.
            let null = matches!(self.inbox[sender].front(), Some(Body::Null));
            if !null && !self.rows.iter().all(|row| row.received[sender] > index) {
                break;
            }
            self.deliver_next(seq, sender, &mut deliveries);
            self.rows[self.rank].delivered = seq + 1;
            delivered_any = true;
        }
        if !delivered_any {
            return 0;
        }
        self.finish_delivery(deliveries, out)
    }

    /// Checks that a ragged trim can be applied here: one counter per sender, none below a batch
    /// this member already delivered (that would lose a delivered message; nulls delivered here
    /// beyond the trim create no version, so leaving them out changes no log) and none above
    /// what it received (it could not deliver them).
    pub(crate) fn check_trim(&self, trim: &[u64]) -> Result<(), Rejection> {
        if trim.len() != self.members.len() {
            return Err(Rejection::OutOfRange("trim of the wrong shape"));
        }
        for (sender, &kept) in trim.iter().enumerate() {
            if kept < self.batches_delivered[sender] {
                return Err(Rejection::OutOfRange("trim below what was delivered"));
            }
            if kept > self.rows[self.rank].received[sender] {
                return Err(Rejection::OutOfRange("trim beyond what was received"));
            }
        }
        Ok(())
    }

    /// Delivers, in sequence order, exactly the messages the ragged trim keeps: message `i` of
    /// the sender of rank `r` if `i < trim[r]`. Every member of the shard applies the same trim
    /// to the same received messages, so every member ends the view with the same log.
    pub(crate) fn deliver_trim(&mut self, trim: &[u64], out: &mut Vec<Action>) -> usize {
        assert!(self.wedged, "a trim is applied only once wedged");
        self.check_trim(trim).expect("the trim was checked");
        let senders = self.senders();
        let end = trim
            .iter()
            .enumerate()
            .filter(|(_, &kept)| kept > 0)
            .map(|(sender, &kept)| (kept - 1) * senders + sender as u64 + 1)
            .max()
            .unwrap_or(0);
        let mut deliveries = Vec::new();
        let mut seq = self.rows[self.rank].delivered;
        let delivered_any = seq < end;
        while seq < end {
            let (sender, index) = ((seq % senders) as usize, seq / senders);
            if index < trim[sender] {
                self.deliver_next(seq, sender, &mut deliveries);
            }
            seq += 1;
        }
        if !delivered_any {
            return 0;
        }
        self.rows[self.rank].delivered = end;
        // The end of a view: its row goes out at once, as every row of a view change does.
        self.row_dirty = true;
        self.finish_delivery(deliveries, out)
    }

    /// Delivers the oldest received message of `sender`, whose sequence number is `seq`.
    fn deliver_next(&mut self, seq: u64, sender: usize, deliveries: &mut Vec<Delivery>) {
        let body = self.inbox[sender]
            .pop_front()
            .expect("a delivered message was received here");
        if let Body::Batch(batch) = body {
            self.batches_delivered[sender] = seq / self.senders() + 1;
            let hlc = delivery_stamp(self.last_hlc.max(self.stamp_floor), batch.stamp);
            let version = version_of(self.view_id, seq as u32);
            self.last_hlc = hlc;
            self.last_version = Some(version);
            let sender = self.members[sender];
            deliveries.push(Delivery {
                version,
                hlc,
                sender,
                requests: batch.requests,
            });
        }
    }

    /// Records what was delivered and asks for it to be persisted. The new `delivered` counter
    /// normally goes out with the row that reports its versions persisted (`persisted` marks
    /// the row changed), not in a row of its own: a version's delivery and its persistence
    /// microseconds later would otherwise cost two pushes to every peer, each a wake-up there.
    /// The peers read `delivered` only for the send window, so it waits at most until
    /// `delivered_lag_max` sequence numbers are delivered and not pushed (a slow
    /// disk then costs a sender a few messages of its window, never all of it); a delivery of
    /// nulls alone with nothing to persist is pushed at once. Any other change of the row (a
    /// message received, a floor, a suspicion, the wedge) pushes it, with the counter.
    fn finish_delivery(&mut self, deliveries: Vec<Delivery>, out: &mut Vec<Action>) -> usize {
        let delivered = self.rows[self.rank].delivered;
        if delivered - self.pushed_delivered > self.delivered_lag_max {
            self.row_dirty = true;
        }
        let count = deliveries.len();
        if let Some(last) = deliveries.last() {
            let version = last.version;
            if self.persist_queue.len() == PERSIST_QUEUE_MAX {
                *self.persist_queue.back_mut().expect("the queue is full") = (version, delivered);
            } else {
                self.persist_queue.push_back((version, delivered));
            }
            out.push(Action::Deliver {
                shard: self.shard,
                deliveries,
            });
            out.push(Action::Persist {
                shard: self.shard,
                version,
            });
        } else if let Some(back) = self.persist_queue.back_mut() {
            // Trailing nulls are persisted together with the version before them.
            back.1 = delivered;
        } else {
            self.mark_persisted(delivered);
            self.row_dirty = true;
        }
        count
    }

    /// The driver made every version up to `version` durable on this member.
    pub(crate) fn persisted(&mut self, version: Version) {
        if let Some(catch_up) = &mut self.catch_up {
            catch_up.persisted(version);
            return;
        }
        if Some(version) <= self.rows[self.rank].persisted {
            // Persisted before: a late confirmation, possibly of an earlier view.
            return;
        }
        assert_eq!(
            version >> 32,
            u64::from(self.view_id),
            "persisted a version of another view"
        );
        assert!(
            Some(version) <= self.last_version,
            "persisted a version not yet delivered"
        );
        let own = &mut self.rows[self.rank];
        own.persisted = Some(version);
        let mut covered = (version & SEQ_MAX) + 1;
        while let Some(&(asked, delivered)) = self.persist_queue.front() {
            if asked > version {
                break;
            }
            covered = covered.max(delivered);
            self.persist_queue.pop_front();
        }
        self.mark_persisted(covered);
        if self.wedged || self.wanted_elsewhere() {
            self.row_dirty = true;
        }
    }

    /// Whether another member's row wants sequence numbers persisted that no row pushed from
    /// here reported persisted yet.
    fn wanted_elsewhere(&self) -> bool {
        self.rows
            .iter()
            .enumerate()
            .any(|(rank, row)| rank != self.rank && row.wants > self.pushed_persisted_seqs)
    }

    /// On a tick: what the log persisted since the last push goes out now.
    pub(crate) fn push_persisted(&mut self) {
        if self.persisted_seqs > self.pushed_persisted_seqs
            || self.rows[self.rank].persisted > self.pushed_persisted
        {
            self.row_dirty = true;
        }
    }

    /// A client of this member waits until `version` is durable on every member: the own row
    /// says so, and the others push theirs as their logs persist it.
    pub(crate) fn want_persisted(&mut self, version: Version) {
        if version >> 32 != u64::from(self.view_id) {
            // A version of an earlier view is durable on every member already.
            return;
        }
        self.want_seqs((version & SEQ_MAX) + 1);
    }

    fn want_seqs(&mut self, seqs: u64) {
        let own = &mut self.rows[self.rank];
        if seqs > own.wants {
            own.wants = seqs;
            self.row_dirty = true;
        }
    }

    fn mark_persisted(&mut self, seqs: u64) {
        self.persisted_seqs = self.persisted_seqs.max(seqs);
        while self
            .own_unpersisted
            .front()
            .is_some_and(|&(seq, _)| seq < self.persisted_seqs)
        {
            self.own_unpersisted.pop_front();
        }
        self.stability.advance(self.persisted_seqs);
    }

    /// Sends as many messages as the window allows: batches of waiting requests, or nulls when
    /// a later sequence number of another sender is waiting on this one.
    /// Returns how many batches and how many nulls it sent.
    pub(crate) fn send(
        &mut self,
        now_us: u64,
        config: &Config,
        out: &mut Vec<Action>,
    ) -> (u64, u64) {
        let mut sent_count = (0, 0);
        if self.wedged {
            return sent_count;
        }
        let senders = self.senders();
        let rank = self.rank;
        let highest_received = (0..self.members.len())
            .filter(|&sender| sender != rank && self.rows[rank].received[sender] > 0)
            .map(|sender| (self.rows[rank].received[sender] - 1) * senders + sender as u64)
            .max();
        let slowest = self
            .rows
            .iter()
            .map(|row| row.delivered)
            .min()
            .expect("a shard has members");
        let first_outstanding = self.messages_below(rank, slowest);
        loop {
            let sent = self.rows[rank].received[rank];
            let seq = sent * senders + rank as u64;
            if seq > SEQ_MAX || sent - first_outstanding >= u64::from(config.window) {
                break;
            }
            let body = if !self.pending.is_empty() {
                let (batch, durable) = self.take_batch(now_us, config.batch_bytes_max);
                if durable {
                    self.want_seqs(seq + 1);
                }
                self.remember_unpersisted(seq, batch.stamp);
                sent_count.0 += 1;
                Body::Batch(batch)
            } else if highest_received.is_some_and(|highest| seq < highest) {
                sent_count.1 += 1;
                Body::Null
            } else {
                break;
            };
            for &peer in &self.members {
                if peer != self.members[rank] {
                    let message = Message::Data {
                        view_id: self.view_id,
                        shard: self.shard,
                        index: sent,
                        body: body.clone(),
                    };
                    out.push(Action::Send { to: peer, message });
                }
            }
            self.inbox[rank].push_back(body);
            self.rows[rank].received[rank] = sent + 1;
            self.row_dirty = true;
        }
        sent_count
    }

    /// Remembers the stamp of an own message until it is persisted here. When a slow disk lets
    /// too many accumulate, the newest merges into the last one kept: only the oldest entry
    /// bounds the floor, and the merged entry leaves only once the newer message is persisted.
    fn remember_unpersisted(&mut self, seq: u64, stamp: Hlc) {
        if self.own_unpersisted.len() == UNPERSISTED_STAMPS_MAX {
            let last = self.own_unpersisted.back_mut().expect("the queue is full");
            *last = (seq, last.1.min(stamp));
        } else {
            self.own_unpersisted.push_back((seq, stamp));
        }
    }

    /// The next batch of pending requests, and whether any of their clients waits for
    /// durability.
    fn take_batch(&mut self, now_us: u64, batch_bytes_max: usize) -> (Batch, bool) {
        let mut requests = Vec::new();
        let mut durable = false;
        let mut bytes = 0;
        while let Some((next, _)) = self.pending.front() {
            let len = next.payload.len();
            if !requests.is_empty()
                && (bytes + len > batch_bytes_max || requests.len() == BATCH_REQUESTS_MAX)
            {
                break;
            }
            bytes += len;
            let (request, wants) = self.pending.pop_front().expect("the queue is not empty");
            requests.push(request);
            durable |= wants;
        }
        self.pending_bytes -= bytes;
        let batch = Batch {
            stamp: sender_stamp(now_us, &requests),
            requests,
        };
        (batch, durable)
    }

    /// Publishes a new floor: below the clock, and below the stamp of the oldest own message not
    /// yet delivered and persisted. A wedged member's floor stays where it is: its history may
    /// still change by the ragged trim.
    pub(crate) fn publish_floor(&mut self, now_us: u64) {
        if self.wedged {
            return;
        }
        let mut floor = just_before(Hlc::at(now_us));
        // Stamps need not grow in send order (a client's HLC may run ahead of this clock), but
        // the oldest bounds them all: a later own message comes later in the log, so its
        // version's HLC is above the oldest one's, which is at least the oldest stamp.
        if let Some(&(_, stamp)) = self.own_unpersisted.front() {
            floor = floor.min(just_before(stamp));
        }
        let own = &mut self.rows[self.rank];
        if floor <= own.floor {
            return;
        }
        own.floor = floor;
        own.floor_delivered = own.delivered;
        let delivered = own.delivered;
        self.stability
            .publish(self.rank, floor, delivered, self.persisted_seqs);
        self.row_dirty = true;
    }

    /// Publishes `suspicions` in the own row. A row's suspicions only grow (peers check it): a
    /// member this node trusts again stays in its row until the view changes.
    pub(crate) fn set_suspicions(&mut self, suspicions: u64) {
        let own = &mut self.rows[self.rank];
        let suspicions = own.suspicions | suspicions;
        if own.suspicions != suspicions {
            own.suspicions = suspicions;
            self.row_dirty = true;
        }
    }

    /// Stops sending and delivering new messages until the view changes.
    pub(crate) fn wedge(&mut self) {
        if !self.wedged {
            self.wedged = true;
            self.rows[self.rank].wedged = true;
            self.row_dirty = true;
        }
    }

    /// Pushes the own row to the other members if it changed, after the data it counts.
    pub(crate) fn push_row(&mut self, out: &mut Vec<Action>) -> usize {
        if !self.row_dirty {
            return 0;
        }
        self.row_dirty = false;
        self.pushed_delivered = self.rows[self.rank].delivered;
        self.pushed_persisted_seqs = self.persisted_seqs;
        self.pushed_persisted = self.rows[self.rank].persisted;
        let me = self.members[self.rank];
        let mut count = 0;
        for &peer in &self.members {
            if peer != me {
                let message = Message::Row {
                    view_id: self.view_id,
                    shard: self.shard,
                    row: self.rows[self.rank].clone(),
                };
                out.push(Action::Send { to: peer, message });
                count += 1;
            }
        }
        count
    }
}
