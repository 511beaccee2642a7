//! Failure detection: who has been silent too long, and who is suspected by anyone.
//!
//! Suspicions are a mask over view ranks. They only grow within a view: a suspected member is
//! never trusted again, which is what makes the view change that follows well defined. The
//! exceptions are a total restart, where a member is suspected only for not being back yet,
//! and a node left without a majority of members it trusts, which trusts again a member it
//! hears from (see `Node::forgive`). A node never suspects itself, whatever others report, and
//! silence is counted only over time this node was running: a pause of its own (a long step, a
//! descheduled process) is not held against its peers.

#[derive(Debug)]
pub(crate) struct Suspicion {
    rank: usize,
    last_heard_us: Vec<u64>,
    suspected: u64,
    suspect_after_us: u64,
}

impl Suspicion {
    pub(crate) fn new(rank: usize, members: usize, suspect_after_us: u64) -> Suspicion {
        Suspicion {
            rank,
            last_heard_us: vec![0; members],
            suspected: 0,
            suspect_after_us,
        }
    }

    /// The clock starts: every member counts as just heard.
    pub(crate) fn start(&mut self, now_us: u64) {
        self.last_heard_us.fill(now_us);
    }

    pub(crate) fn heard(&mut self, rank: usize, now_us: u64) {
        let last = &mut self.last_heard_us[rank];
        *last = (*last).max(now_us);
    }

    /// Members silent for too long and not yet suspected.
    pub(crate) fn silent(&self, now_us: u64) -> u64 {
        let mut silent = 0;
        for (rank, &last) in self.last_heard_us.iter().enumerate() {
            if rank != self.rank && now_us.saturating_sub(last) >= self.suspect_after_us {
                silent |= 1 << rank;
            }
        }
        silent & !self.suspected
    }

    /// This node did not run for `pause_us` (its own steps came late): every peer gets that
    /// much more time before its silence counts.
    pub(crate) fn paused(&mut self, pause_us: u64) {
        for last in &mut self.last_heard_us {
            *last = last.saturating_add(pause_us);
        }
    }

    /// Adds `mask` to the suspicions, except this node itself (a peer that reports this node
    /// silent says what the view change will do, not that this node failed); returns the
    /// members newly suspected.
    pub(crate) fn merge(&mut self, mask: u64) -> u64 {
        let mask = mask & !(1 << self.rank);
        let new = mask & !self.suspected;
        self.suspected |= mask;
        new
    }

    /// Trusts `rank` again (in a total restart, a member that was not back yet; and in a node
    /// without a majority it trusts, a member it hears from).
    pub(crate) fn forgive(&mut self, rank: usize) {
        self.suspected &= !(1 << rank);
    }

    /// How many members this node does not suspect (itself among them).
    pub(crate) fn trusted(&self) -> usize {
        self.last_heard_us.len() - self.suspected.count_ones() as usize
    }

    pub(crate) fn suspected(&self) -> u64 {
        self.suspected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_silent_for_the_timeout_is_reported_once_suspected() {
        let mut suspicion = Suspicion::new(0, 3, 100);
        suspicion.start(1_000);
        suspicion.heard(1, 1_050);
        assert_eq!(suspicion.silent(1_099), 0);
        assert_eq!(suspicion.silent(1_100), 0b100);
        assert_eq!(suspicion.merge(0b100), 0b100);
        assert_eq!(suspicion.silent(1_100), 0, "already suspected");
        assert_eq!(suspicion.merge(0b110), 0b010);
        assert_eq!(suspicion.suspected(), 0b110);
    }

    #[test]
    fn a_node_never_suspects_itself_even_when_a_peer_reports_it() {
        let mut suspicion = Suspicion::new(1, 3, 10);
        assert_eq!(suspicion.merge(0b111), 0b101);
        assert_eq!(suspicion.suspected(), 0b101);
        assert_eq!(suspicion.trusted(), 1);
    }

    #[test]
    fn a_pause_of_this_node_is_not_counted_as_silence_of_its_peers() {
        let mut suspicion = Suspicion::new(0, 2, 100);
        suspicion.start(1_000);
        suspicion.paused(500);
        assert_eq!(suspicion.silent(1_599), 0);
        assert_eq!(suspicion.silent(1_600), 0b10);
    }

    #[test]
    fn a_node_never_suspects_itself_for_silence() {
        let mut suspicion = Suspicion::new(1, 2, 10);
        suspicion.start(0);
        assert_eq!(suspicion.silent(1_000) & 0b10, 0);
    }
}
