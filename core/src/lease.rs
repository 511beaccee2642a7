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
//! Removing a member starts with some member suspecting it, and a member suspects a peer only
//! once it has not heard from it for `suspect_after` of its own running time (a broken link is
//! not a shortcut: messages from the peer stop counting, and its silence does the rest). Each
//! heartbeat carries the sender's clock when it sent it, and echoes back to each peer the send
//! time of the last heartbeat it received from that peer, as long as it never suspected the peer
//! in this view. A member that holds, from every other member of its view, an echo of a
//! heartbeat it sent less than `suspect_after - margin` ago knows that none of them can have
//! suspected it yet: each heard it after that send, and suspects it at the earliest
//! `suspect_after` later. Durations are measured on each member's own clock, so the clocks'
//! offsets do not matter; the margin covers their rates differing and the tick granularity.

/// The part of the suspicion timeout a lease does not use.
pub(crate) const LEASE_MARGIN_DIVISOR: u64 = 4;

#[derive(Debug)]
pub(crate) struct Lease {
    rank: usize,
    /// Per rank: the send time (that member's clock) of the newest heartbeat received from it.
    heard_sent_us: Vec<u64>,
    /// Per rank: the newest send time (this member's clock) of its own heartbeats that member
    /// echoed; 0 if none.
    echoed_us: Vec<u64>,
    /// Ranks this member suspected at any time in this view: it echoes none of their
    /// heartbeats any more, even once it trusts them again.
    withheld: u64,
    /// How long an echo stays good, counted from the send it echoes.
    lease_us: u64,
}

impl Lease {
    pub(crate) fn new(rank: usize, members: usize, suspect_after_us: u64) -> Lease {
        Lease {
            rank,
            heard_sent_us: vec![0; members],
            echoed_us: vec![0; members],
            withheld: 0,
            lease_us: suspect_after_us - suspect_after_us / LEASE_MARGIN_DIVISOR,
        }
    }

    /// A heartbeat from `rank`, sent at `sent_us` of its clock, echoing `echo_us` of this
    /// member's clock. The caller checked `echo_us` is not in this member's future.
    pub(crate) fn heard(&mut self, rank: usize, sent_us: u64, echo_us: u64) {
        let sent = &mut self.heard_sent_us[rank];
        *sent = (*sent).max(sent_us);
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

    /// Whether no other member can have suspected this one at `now_us`.
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
        let mut lease = Lease::new(0, 3, 1_000);
        assert!(!lease.holds(10), "no echo yet");
        lease.heard(1, 5, 100);
        assert!(!lease.holds(200), "rank 2 echoed nothing");
        lease.heard(2, 7, 150);
        assert!(lease.holds(200));
        assert!(lease.holds(849), "750 µs after the older echoed send");
        assert!(!lease.holds(850));
        lease.heard(1, 9, 90);
        assert!(!lease.holds(850), "an older echo does not extend the lease");
        lease.heard(1, 9, 600);
        assert!(
            lease.holds(899) && !lease.holds(900),
            "rank 2's echo bounds it now"
        );
    }

    #[test]
    fn a_single_member_holds_its_lease_and_a_suspected_peer_gets_no_echo() {
        assert!(Lease::new(0, 1, 1_000).holds(5));
        let mut lease = Lease::new(1, 3, 1_000);
        lease.heard(0, 42, 0);
        assert_eq!(lease.echo_for(0), 42);
        lease.withhold(0b001);
        lease.heard(0, 50, 0);
        assert_eq!(
            lease.echo_for(0),
            0,
            "suspected once in this view, never echoed again"
        );
        assert_eq!(lease.echo_for(2), 0, "nothing heard from rank 2");
    }
}
