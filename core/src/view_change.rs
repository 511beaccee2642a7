//! The state of one view change at one member, and the pure rules it follows.
//!
//! The change is a single-decree Paxos over the *decision* that ends the view: who leaves, and
//! per shard the ragged trim. The leader (the lowest-ranked member it does not suspect) runs
//! two phases: `Propose`/`Ack` (every member it does not suspect promises the round, and
//! reports its received counters, frozen since it wedged, and any decision it accepted), then
//! `Accept`/`Accepted` (members log the decision before echoing it). Once a majority of the
//! view logged it, the decision is chosen and the leader sends `Commit`. A new leader's phase 1
//! meets that majority, so it adopts the chosen decision instead of computing another: the
//! proposals of a failed leader survive it. `docs/ARCHITECTURE.md` ("View change") gives the
//! whole argument.

use std::collections::BTreeMap;

use derechofs_storage::{Hlc, Version};

use crate::bounds::{ROUND_MAX, VIEW_MEMBERS_MAX};
use crate::layout::{Layout, ShardId};
use crate::message::Decision;
use crate::view::NodeId;

/// What one member reported to the leader in phase 1.
#[derive(Clone, Debug)]
pub(crate) struct Report {
    /// Per shard the member replicates: its frozen received counters.
    pub(crate) counts: Vec<(ShardId, Vec<u64>)>,
    /// The decision it accepted, with the round.
    pub(crate) accepted: Option<(u64, Decision)>,
    /// In a total restart, per shard it replicates: the last record of its log.
    pub(crate) logs: Vec<(ShardId, Option<(Version, Hlc)>)>,
    /// Per shard it replicates (as for `counts`): the highest stability floor it published.
    pub(crate) floors: Vec<(ShardId, Hlc)>,
}

/// The leader's side of one round.
#[derive(Clone, Debug)]
pub(crate) struct Leading {
    pub(crate) round: u64,
    /// Phase 1 answers, by view rank (the leader's own included).
    pub(crate) reports: BTreeMap<usize, Report>,
    /// Phase 2: the decision sent for acceptance.
    pub(crate) proposal: Option<Decision>,
    /// Phase 2: view ranks that logged and echoed the proposal.
    pub(crate) accepted_by: u64,
}

/// One member's state of the change of its current view.
#[derive(Clone, Debug, Default)]
pub(crate) struct ViewChange {
    /// The highest round this member promised; it accepts no lower one.
    pub(crate) promised: u64,
    /// The decision this member accepted last, with its round.
    pub(crate) accepted: Option<(u64, Decision)>,
    /// Who to echo the accepted decision to once it is logged.
    pub(crate) accepted_from: Option<NodeId>,
    /// The round whose acceptance was echoed.
    pub(crate) echoed: Option<u64>,
    /// A decision the driver was asked to log and has not confirmed.
    pub(crate) logging: Option<(u64, Decision)>,
    /// The decision last confirmed on disk.
    pub(crate) logged: Option<(u64, Decision)>,
    /// This member leads a round.
    pub(crate) leading: Option<Leading>,
    /// The chosen decision, once known.
    pub(crate) decided: Option<(u64, Decision)>,
    /// The trims of the decision were delivered.
    pub(crate) trimmed: bool,
}

impl ViewChange {
    /// Whether `decision` is on disk here.
    pub(crate) fn is_logged(&self, decision: &Decision) -> bool {
        self.logged.as_ref().is_some_and(|(_, d)| d == decision)
    }
}

/// The first round of the leader of view rank `rank` above every round promised so far.
pub(crate) fn next_round(promised: u64, rank: usize) -> u64 {
    assert!(promised <= ROUND_MAX, "rounds beyond ROUND_MAX are refused");
    let members = VIEW_MEMBERS_MAX as u64;
    (promised / members + 1) * members + rank as u64
}

/// Whether `live` members are a majority of a view of `members`.
pub(crate) fn is_majority(live: usize, members: usize) -> bool {
    2 * live > members
}

/// The decision of a new leader: the accepted decision of the highest round among the
/// reports if there is one (it may have been chosen), else a fresh one removing the suspected
/// members, adding the nodes that asked the leader to join (as many as the view bound
/// allows), with each shard's trim the minimum, per sender, over the shard's live members of
/// what they received (members still catching up the shard report nothing for it and deliver
/// none of it). `None` if a shard has no live member with its log left: it cannot be trimmed
/// safely without a total restart.
pub(crate) fn decide(
    layout: &Layout,
    members: &[NodeId],
    suspected: u64,
    joins: &[NodeId],
    reports: &BTreeMap<usize, Report>,
) -> Option<Decision> {
    let adopted = reports
        .values()
        .filter_map(|report| report.accepted.as_ref())
        .max_by_key(|(round, _)| *round);
    if let Some((_, decision)) = adopted {
        return Some(decision.clone());
    }
    let mut trims = Vec::with_capacity(layout.shards().len());
    let mut floors = Vec::with_capacity(layout.shards().len());
    for shard in layout.shards() {
        let mut trim: Option<Vec<u64>> = None;
        let mut floor = Hlc::ZERO;
        for &member in &shard.members {
            let rank = members
                .iter()
                .position(|&m| m == member)
                .expect("shard members are view members");
            if suspected & (1 << rank) != 0 {
                continue;
            }
            let report = reports.get(&rank).expect("every live member reported");
            let Some((_, counts)) = report.counts.iter().find(|(id, _)| *id == shard.id) else {
                continue;
            };
            if let Some(&(_, published)) = report.floors.iter().find(|(id, _)| *id == shard.id) {
                floor = floor.max(published);
            }
            trim = Some(match trim {
                None => counts.clone(),
                Some(low) => low.iter().zip(counts).map(|(a, b)| *a.min(b)).collect(),
            });
        }
        trims.push(trim?);
        floors.push(floor);
    }
    let survivors = members.len() - suspected.count_ones() as usize;
    let joined = joins
        .iter()
        .copied()
        .filter(|node| {
            members
                .iter()
                .position(|m| m == node)
                .is_none_or(|rank| suspected & (1 << rank) != 0)
        })
        .take(VIEW_MEMBERS_MAX.saturating_sub(survivors))
        .collect();
    Some(Decision {
        removed: suspected,
        joined,
        trims,
        ends: Vec::new(),
        addrs: Vec::new(),
        floors,
    })
}

/// The decision of a restart leader: the accepted decision of the highest round among the
/// reports if there is one (it may have been chosen before the stop), else a fresh one
/// removing the suspected members (those not back), adding no one, and ending each shard's
/// log at the longest log a live member of the shard reported. Its trim keeps, in the ended
/// view `view_id`, exactly the versions of that longest log (so a log cut back to the logged
/// trim keeps it). `None` if some shard has no live member that reported its log: nothing
/// says where that shard's log ends, and a version durable on all its replicas could be lost.
pub(crate) fn decide_restart(
    layout: &Layout,
    view_id: u32,
    members: &[NodeId],
    suspected: u64,
    reports: &BTreeMap<usize, Report>,
) -> Option<Decision> {
    let adopted = reports
        .values()
        .filter_map(|report| report.accepted.as_ref())
        .max_by_key(|(round, _)| *round);
    if let Some((_, decision)) = adopted {
        return Some(decision.clone());
    }
    let mut trims = Vec::with_capacity(layout.shards().len());
    let mut ends = Vec::with_capacity(layout.shards().len());
    for shard in layout.shards() {
        let mut end: Option<Option<(Version, Hlc)>> = None;
        for &member in &shard.members {
            let rank = members
                .iter()
                .position(|&m| m == member)
                .expect("shard members are view members");
            if suspected & (1 << rank) != 0 {
                continue;
            }
            let Some(report) = reports.get(&rank) else {
                continue;
            };
            let Some((_, last)) = report.logs.iter().find(|(id, _)| *id == shard.id) else {
                continue;
            };
            end = Some(match end {
                Some(longest) if longest.map(|(v, _)| v) >= last.map(|(v, _)| v) => longest,
                _ => *last,
            });
        }
        let end = end?;
        trims.push(trim_keeping(view_id, shard.members.len(), end));
        ends.push(end);
    }
    Some(Decision {
        removed: suspected,
        joined: Vec::new(),
        trims,
        ends,
        addrs: Vec::new(),
        floors: Vec::new(),
    })
}

/// The ragged trim of view `view_id` in a shard of `senders` members that keeps exactly the
/// versions up to `end` (message `i` of the sender of rank `r` is sequence `i * senders + r`).
pub(crate) fn trim_keeping(view_id: u32, senders: usize, end: Option<(Version, Hlc)>) -> Vec<u64> {
    let senders = senders as u64;
    let start = u64::from(view_id) << 32;
    let last_seq = end.and_then(|(version, _)| {
        version
            .checked_sub(start)
            .filter(|_| version >> 32 == u64::from(view_id))
    });
    (0..senders)
        .map(|rank| match last_seq {
            Some(seq) if seq >= rank => (seq - rank) / senders + 1,
            _ => 0,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::LayoutSpec;

    /// The layout of a view of members 1, 2 and 3: one namespace shard, `data_shards` data
    /// shards, shards of `replicas`.
    fn three_members(data_shards: u16, replicas: u16) -> (Layout, [NodeId; 3]) {
        let spec = LayoutSpec {
            namespace_shards: 1,
            data_shards,
            replicas,
            replicas_min: 1,
        };
        let members = [1, 2, 3];
        (Layout::assign(spec, &members, None).unwrap(), members)
    }

    fn report(counts: Vec<(ShardId, Vec<u64>)>, accepted: Option<(u64, Decision)>) -> Report {
        Report {
            counts,
            accepted,
            logs: Vec::new(),
            floors: Vec::new(),
        }
    }

    fn restart_report(logs: Vec<(ShardId, Option<(Version, Hlc)>)>) -> Report {
        Report {
            counts: Vec::new(),
            accepted: None,
            logs,
            floors: Vec::new(),
        }
    }

    #[test]
    fn a_decision_carries_the_highest_floor_the_shards_live_members_published() {
        let (layout, members) = three_members(0, 3);
        let with_floor = |wall_us| Report {
            counts: vec![(ShardId(0), vec![4, 4, 4])],
            accepted: None,
            logs: Vec::new(),
            floors: vec![(ShardId(0), Hlc::at(wall_us))],
        };
        let mut reports = BTreeMap::new();
        reports.insert(0, with_floor(300));
        reports.insert(1, with_floor(700));
        let decision = decide(&layout, &members, 0b100, &[], &reports).unwrap();
        assert_eq!(decision.floors, vec![Hlc::at(700)]);
        // A suspected member's report does not count.
        reports.insert(2, with_floor(900));
        let decision = decide(&layout, &members, 0b100, &[], &reports).unwrap();
        assert_eq!(decision.floors, vec![Hlc::at(700)]);
    }

    #[test]
    fn a_restart_ends_each_shard_at_the_longest_reported_log() {
        let (layout, members) = three_members(1, 3);
        let view = 5u64 << 32;
        let long = Some((view + 7, Hlc::at(70)));
        let short = Some((view + 2, Hlc::at(20)));
        let older = Some((4u64 << 32 | 9, Hlc::at(9)));
        let mut reports = BTreeMap::new();
        reports.insert(
            0,
            restart_report(vec![(ShardId(0), short), (ShardId(1), older)]),
        );
        reports.insert(
            1,
            restart_report(vec![(ShardId(0), long), (ShardId(1), older)]),
        );
        // Rank 2 is not back: it is removed, and what its log held does not count.
        let decision = decide_restart(&layout, 5, &members, 0b100, &reports).unwrap();
        assert_eq!(decision.removed, 0b100);
        assert!(decision.joined.is_empty());
        assert_eq!(decision.ends, vec![long, older]);
        // Sequence 7 of 3 senders: messages 0..=2 of rank 0 and 1 (seqs 0,3,6 and 1,4,7), two
        // of rank 2 (2,5); nothing of view 5 in shard 1.
        assert_eq!(decision.trims, vec![vec![3, 3, 2], vec![0, 0, 0]]);
        // A shard none of whose live members reported cannot be ended.
        let mut partial = BTreeMap::new();
        partial.insert(0, restart_report(vec![(ShardId(0), short)]));
        assert_eq!(decide_restart(&layout, 5, &members, 0b110, &partial), None);
    }

    #[test]
    fn a_restart_adopts_a_decision_logged_before_the_stop() {
        let (layout, members) = three_members(0, 3);
        let logged = Decision {
            removed: 0b010,
            joined: vec![],
            trims: vec![vec![1, 1, 1]],
            ends: vec![],
            addrs: vec![],
            floors: vec![],
        };
        let mut reports = BTreeMap::new();
        reports.insert(0, restart_report(vec![(ShardId(0), None)]));
        let mut with_logged = restart_report(vec![(ShardId(0), None)]);
        with_logged.accepted = Some((64, logged.clone()));
        reports.insert(2, with_logged);
        assert_eq!(
            decide_restart(&layout, 5, &members, 0b010, &reports),
            Some(logged)
        );
    }

    #[test]
    fn rounds_grow_and_name_their_leader() {
        let first = next_round(0, 2);
        assert_eq!(first % VIEW_MEMBERS_MAX as u64, 2);
        let second = next_round(first, 0);
        assert!(second > first);
        assert_eq!(second % VIEW_MEMBERS_MAX as u64, 0);
    }

    #[test]
    fn majority_is_strict() {
        assert!(is_majority(2, 3));
        assert!(!is_majority(2, 4));
        assert!(is_majority(3, 5));
    }

    #[test]
    fn the_trim_is_the_minimum_over_live_members_per_sender() {
        let (layout, members) = three_members(0, 3);
        let mut reports = BTreeMap::new();
        reports.insert(0, report(vec![(ShardId(0), vec![5, 3, 9])], None));
        reports.insert(1, report(vec![(ShardId(0), vec![4, 3, 7])], None));
        // Rank 2 is suspected; what it received does not count.
        let decision = decide(&layout, &members, 0b100, &[9], &reports).unwrap();
        assert_eq!(decision.joined, vec![9]);
        assert_eq!(decision.removed, 0b100);
        assert_eq!(decision.trims, vec![vec![4, 3, 7]]);
    }

    #[test]
    fn a_new_leader_adopts_the_highest_accepted_decision() {
        let (layout, members) = three_members(0, 2);
        let old = Decision {
            removed: 0b001,
            joined: vec![],
            trims: vec![vec![1, 1]],
            ends: vec![],
            addrs: vec![],
            floors: vec![],
        };
        let newer = Decision {
            removed: 0b001,
            joined: vec![7],
            trims: vec![vec![2, 1]],
            ends: vec![],
            addrs: vec![],
            floors: vec![],
        };
        let mut reports = BTreeMap::new();
        reports.insert(1, report(vec![(ShardId(0), vec![9, 9])], Some((64, old))));
        reports.insert(2, report(vec![], Some((128, newer.clone()))));
        assert_eq!(decide(&layout, &members, 0b001, &[], &reports), Some(newer));
    }
}
