//! Failure detection: who has been silent too long, and who is suspected by anyone.
//!
//! Suspicions are a mask over view ranks. They only grow within a view: a suspected member is
//! never trusted again, which is what makes the view change that follows well defined. The
//! one exception is a total restart, where a member is suspected only for not being back yet.

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

    /// Adds `mask` to the suspicions; returns the members newly suspected.
    pub(crate) fn merge(&mut self, mask: u64) -> u64 {
        let new = mask & !self.suspected;
        self.suspected |= mask;
        new
    }

    /// Trusts `rank` again (only in a total restart, before any decision: a member that was
    /// not back yet is).
    pub(crate) fn forgive(&mut self, rank: usize) {
        self.suspected &= !(1 << rank);
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
    fn a_node_never_suspects_itself_for_silence() {
        let mut suspicion = Suspicion::new(1, 2, 10);
        suspicion.start(0);
        assert_eq!(suspicion.silent(1_000) & 0b10, 0);
    }
}
