//! The stability frontier of one shard: a stamp at or below which the shard's history can no
//! longer change, so a read at a time at or below it returns the same answer forever.
//!
//! Every member publishes, with its row, a *floor*: every version its own messages will still
//! create has a stamp above the floor (the floor is below its clock and below the stamp of its
//! oldest own message not yet delivered and persisted). It publishes with it the sequence
//! numbers it had delivered then, which hold every version its older messages created. The
//! minimum of the members' floors bounds every future version of the shard; a replica may use
//! a member's floor once its own persisted log covers the sequence numbers published with it,
//! because only then does it hold every version at or below that floor.
//!
//! Under load a member publishes new floors faster than this replica persists what came with
//! them, so the replica remembers a bounded history of each member's floors and uses the newest
//! one its log already covers.

use std::collections::VecDeque;

use derechofs_storage::Hlc;

use crate::bounds::FLOOR_HISTORY_MAX;

#[derive(Debug)]
pub(crate) struct Stability {
    /// Per member: floors published and not yet covered by this replica's persisted log, oldest
    /// first, each with the delivered counter published with it.
    waiting: Vec<VecDeque<(Hlc, u64)>>,
    /// Per member: the newest floor this replica may use.
    usable: Vec<Hlc>,
    frontier: Hlc,
}

impl Stability {
    pub(crate) fn new(members: usize) -> Stability {
        Stability {
            waiting: vec![VecDeque::new(); members],
            usable: vec![Hlc::ZERO; members],
            frontier: Hlc::ZERO,
        }
    }

    /// The stability of a shard in a new view, whose frontier was `frontier` in the view before:
    /// a frontier never goes back.
    pub(crate) fn starting_at(members: usize, frontier: Hlc) -> Stability {
        Stability {
            frontier,
            ..Stability::new(members)
        }
    }

    /// The member of shard rank `member` published `floor` with `delivered`.
    pub(crate) fn publish(&mut self, member: usize, floor: Hlc, delivered: u64, persisted: u64) {
        let waiting = &mut self.waiting[member];
        if floor > self.usable[member] && waiting.back() != Some(&(floor, delivered)) {
            if waiting.len() == FLOOR_HISTORY_MAX {
                // The newest floor replaces the last one kept: it needs more of the log, so the
                // older ones in front still become usable as early as before.
                *waiting.back_mut().expect("the history is full") = (floor, delivered);
            } else {
                waiting.push_back((floor, delivered));
            }
        }
        self.advance(persisted);
    }

    /// This replica's persisted log now covers every sequence number below `persisted`.
    pub(crate) fn advance(&mut self, persisted: u64) {
        for (waiting, usable) in self.waiting.iter_mut().zip(&mut self.usable) {
            while let Some(&(floor, delivered)) = waiting.front() {
                if delivered > persisted {
                    break;
                }
                *usable = (*usable).max(floor);
                waiting.pop_front();
            }
        }
        let candidate = self.usable.iter().copied().min().unwrap_or(Hlc::ZERO);
        self.frontier = self.frontier.max(candidate);
    }

    /// Every version with a stamp at or below it is persisted here and final.
    pub(crate) fn frontier(&self) -> Hlc {
        self.frontier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frontier_is_the_lowest_floor() {
        let mut stability = Stability::new(3);
        stability.publish(0, Hlc::at(30), 0, 0);
        stability.publish(1, Hlc::at(10), 0, 0);
        assert_eq!(
            stability.frontier(),
            Hlc::ZERO,
            "member 2 has published nothing yet"
        );
        stability.publish(2, Hlc::at(20), 0, 0);
        assert_eq!(stability.frontier(), Hlc::at(10));
    }

    #[test]
    fn a_floor_waits_until_this_replica_persisted_what_came_with_it() {
        let mut stability = Stability::new(1);
        stability.publish(0, Hlc::at(50), 7, 3);
        assert_eq!(stability.frontier(), Hlc::ZERO);
        stability.advance(7);
        assert_eq!(stability.frontier(), Hlc::at(50));
    }

    #[test]
    fn under_load_an_older_covered_floor_is_used_while_newer_ones_wait() {
        let mut stability = Stability::new(1);
        for step in 1..=100u64 {
            // Each floor arrives with more delivered than this replica has persisted so far.
            stability.publish(
                0,
                Hlc::at(step * 10),
                step * 5,
                (step * 5).saturating_sub(10),
            );
        }
        assert!(stability.frontier() >= Hlc::at(970));
    }

    #[test]
    fn the_frontier_never_goes_back() {
        let mut stability = Stability::new(2);
        stability.publish(0, Hlc::at(40), 0, 0);
        stability.publish(1, Hlc::at(40), 0, 0);
        stability.publish(1, Hlc::at(20), 0, 0);
        assert_eq!(stability.frontier(), Hlc::at(40));
    }
}
