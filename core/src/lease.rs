//! The read lease: whether this member may answer a read of the latest state from its own
//! counters, or may have been removed from its view without having heard of it yet.
//!
//! A member answers a barrier read (`Node::barrier`) from what it has received. That is right as
//! long as it is in the view the others run: no version is delivered anywhere before every
//! member of the shard has received it, except by the ragged trim of a view change, which counts
//! only the members it keeps. A member that stopped for longer than the suspicion timeout (a
//! stalled process, a paused machine) may have been removed meanwhile, and the trim may have
//! delivered versions it never received; until it hears of the next view, its counters say
//! nothing about them.
//!
//! Each heartbeat carries the sender's clock when it sent it, and echoes back to each peer the
//! send time of the last heartbeat it took from that peer, as long as it never suspected the
//! peer in this view. A member holds its lease while every other member of its view echoed a
//! heartbeat it sent less than the lease's length ago (an eighth of `suspect_after`, at least
//! four heartbeat intervals: 125 ms by default). The length is free: safety rests on the other
//! side, and a longer lease only lets a member go longer without fresh echoes at the cost of a
//! longer wait when a member is removed. The other
//! side: a member delivers the trim of a decision that removes a peer only once the lease's
//! length and an eighth more have passed, on its own clock, since it last took a heartbeat from
//! that peer. Every echo it gave was of a heartbeat sent before it took it, so by then the
//! removed member's lease, which needed that echo, has run out: it took its last barrier before
//! any trim that leaves it out was delivered anywhere. Durations are measured on each member's
//! own timer clock (`Now::mono_us`, monotonic: a wall clock set back or forward does not move
//! it), so offsets between clocks do not matter; the eighth covers clocks that run at slightly
//! different rates. A member that suspects a peer stops echoing it and stops counting
//! its heartbeats, so the wait for a removed member is bounded however long it keeps sending.

/// A lease lasts this part of the suspicion timeout (an eighth: 125 ms by default)...
pub(crate) const LEASE_DIVISOR: u64 = 8;

/// ...and at least this many heartbeat intervals, so that echoes arriving on time keep it.
pub(crate) const LEASE_HEARTBEATS_MIN: u64 = 4;

#[derive(Debug)]
pub(crate) struct Lease {
    rank: usize,
    /// Per rank: the send time (that member's clock) of the newest heartbeat received from it.
    heard_sent_us: Vec<u64>,
    /// Per rank: when (this member's clock) it last took a heartbeat from that member.
    heard_at_us: Vec<u64>,
    /// Per rank: the newest send time (this member's clock) of its own heartbeats that member
    /// echoed; 0 if none.
    echoed_us: Vec<u64>,
    /// Ranks this member suspected at any time in this view: it echoes none of their
    /// heartbeats any more, even once it trusts them again.
    withheld: u64,
    /// How long an echo stays good, counted from the send it echoes.
    lease_us: u64,
}

/// How long after it last took a heartbeat from a peer a member waits before delivering a trim
/// that removes the peer: the lease, and an eighth more for clock rates.
fn removal_wait_us(lease_us: u64) -> u64 {
    lease_us.saturating_add(lease_us / 8)
}

impl Lease {
    pub(crate) fn new(
        rank: usize,
        members: usize,
        suspect_after_us: u64,
        heartbeat_us: u64,
    ) -> Lease {
        Lease {
            rank,
            heard_sent_us: vec![0; members],
            heard_at_us: vec![0; members],
            echoed_us: vec![0; members],
            withheld: 0,
            lease_us: (suspect_after_us / LEASE_DIVISOR)
                .max(heartbeat_us.saturating_mul(LEASE_HEARTBEATS_MIN)),
        }
    }

    /// This member starts counting at `now_us` (its first step, or the install of the view):
    /// it may have echoed any member's heartbeats up to then, in this process's earlier view
    /// (a member that installs the view late may still hold a lease of that view resting on
    /// those echoes), so a removal waits out a lease from now at least.
    pub(crate) fn start(&mut self, now_us: u64) {
        for (rank, at) in self.heard_at_us.iter_mut().enumerate() {
            if rank != self.rank {
                *at = (*at).max(now_us);
            }
        }
    }

    /// A heartbeat from `rank`, sent at `sent_us` of its clock, echoing `echo_us` of this
    /// member's clock, taken at `now_us`. The caller checked `echo_us` is not in this member's
    /// future.
    pub(crate) fn heard(&mut self, rank: usize, sent_us: u64, echo_us: u64, now_us: u64) {
        if self.withheld & (1 << rank) == 0 {
            let sent = &mut self.heard_sent_us[rank];
            *sent = (*sent).max(sent_us);
            let at = &mut self.heard_at_us[rank];
            *at = (*at).max(now_us);
        }
        let echoed = &mut self.echoed_us[rank];
        *echoed = (*echoed).max(echo_us);
    }

    /// This member suspects the ranks of `mask`: it echoes none of their heartbeats again in
    /// this view.
    pub(crate) fn withhold(&mut self, mask: u64) {
        self.withheld |= mask;
    }

    /// What to echo in the heartbeat to `rank`: 0 (nothing) once this member suspected it.
    pub(crate) fn echo_for(&self, rank: usize) -> u64 {
        if self.withheld & (1 << rank) != 0 {
            0
        } else {
            self.heard_sent_us[rank]
        }
    }

    /// From when this member may deliver a trim that removes the members of `removed` (a mask
    /// over view ranks): no lease any of them holds rests on an echo of this member by then.
    pub(crate) fn removable_at(&self, removed: u64) -> u64 {
        let wait_us = removal_wait_us(self.lease_us);
        self.heard_at_us
            .iter()
            .enumerate()
            .filter(|&(rank, &at)| removed & (1 << rank) != 0 && at != 0)
            .map(|(_, &at)| at.saturating_add(wait_us))
            .max()
            .unwrap_or(0)
    }

    /// Whether no trim that leaves this member out can have been delivered at `now_us`.
    pub(crate) fn holds(&self, now_us: u64) -> bool {
        self.echoed_us.iter().enumerate().all(|(rank, &echo)| {
            rank == self.rank || (echo != 0 && now_us.saturating_sub(echo) < self.lease_us)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_needs_a_fresh_echo_from_every_other_member() {
        let mut lease = Lease::new(0, 3, 8_000, 20);
        assert!(!lease.holds(10), "no echo yet");
        lease.heard(1, 5, 100, 110);
        assert!(!lease.holds(200), "rank 2 echoed nothing");
        lease.heard(2, 7, 150, 160);
        assert!(lease.holds(200));
        assert!(lease.holds(1_099), "1,000 µs after the older echoed send");
        assert!(!lease.holds(1_100));
        lease.heard(1, 9, 90, 170);
        assert!(
            !lease.holds(1_100),
            "an older echo does not extend the lease"
        );
        lease.heard(1, 9, 600, 180);
        assert!(
            lease.holds(1_149) && !lease.holds(1_150),
            "rank 2's echo bounds it now"
        );
    }

    #[test]
    fn a_lease_lasts_at_least_four_heartbeats() {
        let mut lease = Lease::new(0, 2, 1_000, 50);
        lease.heard(1, 1, 100, 100);
        assert!(lease.holds(299) && !lease.holds(300));
    }

    #[test]
    fn a_removal_waits_out_a_lease_from_the_start_of_the_view() {
        let mut lease = Lease::new(0, 3, 1_000, 10);
        lease.start(5_000);
        assert_eq!(lease.removable_at(0b010), 5_140);
        lease.heard(1, 1, 0, 6_000);
        assert_eq!(lease.removable_at(0b110), 6_140);
    }

    #[test]
    fn a_single_member_holds_its_lease_and_a_suspected_peer_gets_no_echo() {
        assert!(Lease::new(0, 1, 1_000, 10).holds(5));
        let mut lease = Lease::new(1, 3, 1_000, 10);
        lease.heard(0, 42, 0, 1_000);
        assert_eq!(lease.echo_for(0), 42);
        assert_eq!(lease.removable_at(0b001), 1_000 + 125 + 15);
        assert_eq!(lease.removable_at(0b100), 0, "nothing heard from rank 2");
        lease.withhold(0b001);
        lease.heard(0, 50, 0, 5_000);
        assert_eq!(
            lease.echo_for(0),
            0,
            "suspected once in this view, never echoed again"
        );
        assert_eq!(
            lease.removable_at(0b001),
            1_140,
            "its heartbeats no longer count"
        );
        assert_eq!(lease.echo_for(2), 0, "nothing heard from rank 2");
    }
}
