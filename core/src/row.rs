//! A member's row of the shared state table of one shard.
//!
//! Each member writes only its own row and pushes it to the shard's other members on the same
//! FIFO link as its data, after the data the row counts. So when a peer's row arrives, every
//! message that row says its sender sent has already arrived, and only the newest row matters.

use derechofs_storage::{Hlc, Version};

use crate::bounds::{SEQ_MAX, SHARD_MEMBERS_MAX};
use crate::error::Rejection;
use crate::layout::ShardId;

/// The counters one member publishes for one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// Per sender rank of the shard: messages received from it (for the member itself: sent).
    /// A ragged trim is the minimum of these over live members.
    pub received: Vec<u64>,
    /// Sequence numbers delivered: every seq below it is delivered, nulls included.
    pub delivered: u64,
    /// The highest version persisted on this member, if any.
    pub persisted: Option<Version>,
    /// Every version this member's own messages will still create has a stamp above `floor`.
    pub floor: Hlc,
    /// The `delivered` counter this member had when it published `floor`: a replica may use
    /// `floor` once its own persisted log covers these sequence numbers.
    pub floor_delivered: u64,
    /// Bit `r` set: this member suspects the member of view rank `r`.
    pub suspicions: u64,
    /// This member stopped sending and delivering new messages, awaiting a view change.
    pub wedged: bool,
    /// Sequence numbers below it this member waits to see persisted on every member (a client
    /// of its waits for durability): the others push their rows as soon as their logs persist
    /// more of them, instead of at their next push. Never goes back in a view.
    pub wants: u64,
}

impl Row {
    /// The row of a member that has done nothing yet, in a shard of `senders` members.
    pub fn new(senders: usize) -> Row {
        assert!((1..=SHARD_MEMBERS_MAX).contains(&senders));
        Row {
            received: vec![0; senders],
            delivered: 0,
            persisted: None,
            floor: Hlc::ZERO,
            floor_delivered: 0,
            suspicions: 0,
            wedged: false,
            wants: 0,
        }
    }

    /// Checks that `next`, pushed by the member of rank `sender`, can follow `self`: same shape,
    /// no counter going back (links are FIFO, so rows arrive in the order they were written),
    /// and values a correct member could publish.
    pub(crate) fn check_successor(
        &self,
        next: &Row,
        shard: ShardId,
        sender: u32,
    ) -> Result<(), Rejection> {
        let regressed = Rejection::RowRegressed { shard, sender };
        if next.received.len() != self.received.len() {
            return Err(Rejection::RowShape { shard, sender });
        }
        if next.delivered > SEQ_MAX + 1 || next.floor_delivered > next.delivered {
            return Err(Rejection::OutOfRange("row delivered counter"));
        }
        if next.wants > SEQ_MAX + 1 {
            return Err(Rejection::OutOfRange("row wanted counter"));
        }
        if next.received.iter().any(|&count| count > SEQ_MAX + 1) {
            return Err(Rejection::OutOfRange("row received counter"));
        }
        if next
            .received
            .iter()
            .zip(&self.received)
            .any(|(new, old)| new < old)
            || next.delivered < self.delivered
            || next.persisted < self.persisted
            || next.floor_delivered < self.floor_delivered
            || next.wants < self.wants
            || (self.wedged && !next.wedged)
            || next.suspicions & self.suspicions != self.suspicions
        {
            return Err(regressed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_whose_counters_go_back_is_rejected() {
        let mut old = Row::new(3);
        old.received = vec![4, 2, 2];
        old.delivered = 6;
        let mut next = old.clone();
        next.received[1] = 1;
        assert_eq!(
            old.check_successor(&next, ShardId(0), 1),
            Err(Rejection::RowRegressed {
                shard: ShardId(0),
                sender: 1
            })
        );
        let mut unwedged = old.clone();
        old.wedged = true;
        unwedged.wedged = false;
        assert!(old.check_successor(&unwedged, ShardId(0), 1).is_err());
    }

    #[test]
    fn a_row_of_another_shape_is_rejected() {
        let old = Row::new(3);
        assert_eq!(
            old.check_successor(&Row::new(2), ShardId(4), 0),
            Err(Rejection::RowShape {
                shard: ShardId(4),
                sender: 0
            })
        );
    }

    #[test]
    fn a_row_that_only_grows_is_accepted() {
        let old = Row::new(3);
        let mut next = old.clone();
        next.received = vec![1, 1, 0];
        next.delivered = 1;
        next.persisted = Some(1);
        next.suspicions = 0b100;
        assert_eq!(old.check_successor(&next, ShardId(0), 2), Ok(()));
    }
}
