//! The invariants of a static view (DESIGN §9), checked after every step of a simulation.
//!
//! - *Agreement*: the replicas of a shard deliver the same sequence; one replica's log is a
//!   prefix of another's. The checker keeps one canonical log per shard, the longest delivered
//!   anywhere, and every delivery must match it or extend it.
//! - *Equal states at equal versions*: each log entry carries a hash chain over every version,
//!   stamp, sender and request before it, so two replicas at the same version hold the same state.
//! - *HLC order is log order*: versions and stamps both strictly increase along the log.
//! - *Nothing acknowledged is lost, nothing applied twice*: a request appears at most once in a
//!   log; at the end every acknowledged request is in every replica's log.
//! - *Time reads never change*: a read at `T` answered by a replica whose stability frontier
//!   passed `T` returns the versions stamped at or below `T`; no replica ever delivers another
//!   version stamped at or below `T`, and every later answer at `T` is the same.
//! - *Frontiers*: the stability frontier never goes back; the persistence frontier never goes
//!   back and never runs ahead of what members actually persisted.
//!
//! Across views (DESIGN §2 "Failures, view change"):
//! - *Views agree*: every node that installs view `v` installs the same members and layout.
//! - *Partition safety*: a view is installed only with a majority of the previous one (joiners
//!   aside).
//! - *Nothing persisted is lost*: a node that restarts finds on its disk every version it
//!   reported persisted, and its log is a prefix of the shard's log.
//! - *State transfer*: the records a joiner receives are the shard's log, in order (checked
//!   as deliveries at their positions).
//! - *The trim loses nothing and adds nothing*: a node installing the next view delivered, in
//!   each shard it replicated, exactly the versions of the view it leaves and earlier ones that
//!   were delivered anywhere. So nothing delivered at any member (even one that failed since) is
//!   lost, and nothing beyond the ragged trim was delivered anywhere: a later old-view version
//!   would break version order after the new view's first versions. (A member that installs the
//!   next view late may find the others delivered that view's versions already.)

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};

use derechofs_core::{Delivery, Hlc, NodeId, ShardId, Version, View};

/// An invariant that did not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! violation {
    ($($arg:tt)*) => { Err(Violation(format!($($arg)*))) };
}

/// One version of a shard's log as the checker sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its version.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
    /// The hash chain of the log up to and including it.
    pub digest: u64,
}

#[derive(Debug, Default)]
struct ShardLog {
    canonical: Vec<Entry>,
    requests: HashSet<u64>,
    /// Time reads answered: the time, and how many versions were at or below it.
    answers: BTreeMap<Hlc, usize>,
    answered_max: Option<Hlc>,
    /// Tails a total restart cut, by the position of their first entry: a node that comes
    /// back late may still hold one until it learns where the restart ended the log.
    cut: Vec<(usize, Vec<Entry>)>,
    /// The highest persistence frontier any node reported: durable on every replica.
    durable_max: Option<Version>,
}

/// The state every invariant is checked against.
#[derive(Debug)]
pub struct Checker {
    shards: Vec<ShardLog>,
    /// Per node, per shard: how many entries of the canonical log it delivered.
    delivered: Vec<Vec<usize>>,
    /// Per node, per shard: the highest version it persisted.
    persisted: Vec<Vec<Option<Version>>>,
    stability: Vec<Vec<Hlc>>,
    durable: Vec<Vec<Option<Version>>>,
    /// Time reads answered, over all shards.
    pub time_reads: u64,
    /// Every view installed anywhere, by id.
    views: BTreeMap<u32, View>,
}

impl Checker {
    /// A checker for `nodes` nodes and `shards` shards, before anything happened.
    pub fn new(nodes: usize, shards: usize) -> Checker {
        Checker {
            shards: (0..shards).map(|_| ShardLog::default()).collect(),
            delivered: vec![vec![0; shards]; nodes],
            persisted: vec![vec![None; shards]; nodes],
            stability: vec![vec![Hlc::ZERO; shards]; nodes],
            durable: vec![vec![None; shards]; nodes],
            time_reads: 0,
            views: BTreeMap::new(),
        }
    }

    /// Node `node` left view `old` (none if it joined) and installed `new`, having delivered
    /// the ragged trim of the shards in `trimmed`.
    pub fn install(
        &mut self,
        node: usize,
        old: Option<&View>,
        new: &View,
        trimmed: &[ShardId],
    ) -> Result<(), Violation> {
        if let Some(old) = old {
            if new.view_id != old.view_id + 1 {
                return violation!(
                    "node {node} went from view {} to view {}",
                    old.view_id,
                    new.view_id
                );
            }
        }
        if let Some(previous) = self.views.get(&(new.view_id - 1)) {
            let stay = new
                .members
                .iter()
                .filter(|m| previous.members.contains(m))
                .count();
            if 2 * stay <= previous.members.len() {
                return violation!(
                    "partition safety: node {node} installed view {} with {:?}, no majority of \
                     {:?}",
                    new.view_id,
                    new.members,
                    previous.members
                );
            }
        }
        // Addresses travel with the joins that announce them: a view carries one only for a
        // member, the one that member announced (every simulated node announces
        // `announced_addr(id)`), ids rising.
        for (i, &(id, addr)) in new.addrs.iter().enumerate() {
            if !new.members.contains(&id)
                || addr != announced_addr(id)
                || new.addrs[..i].iter().any(|(n, _)| *n >= id)
            {
                return violation!(
                    "node {node} installed view {} with addresses {:?} for members {:?}",
                    new.view_id,
                    new.addrs,
                    new.members
                );
            }
        }
        if let Some(earlier) = self.views.get(&new.view_id) {
            if earlier != new {
                return violation!(
                    "views diverge: node {node} installed {new:?}, another node {earlier:?}"
                );
            }
        } else {
            self.views.insert(new.view_id, new.clone());
        }
        // The versions of the view it leaves and of those before it: a member that installs the
        // next view late may find that view ended already, its versions delivered by the others
        // (in the trim that ended it) and the member removed from the view after it.
        let left = u64::from(new.view_id.saturating_sub(1));
        for shard in trimmed {
            let s = usize::from(shard.0);
            let delivered = self.delivered[node][s];
            let longest = self.shards[s]
                .canonical
                .partition_point(|e| e.version >> 32 <= left);
            if delivered != longest {
                return violation!(
                    "ragged trim: node {node} leaves view {left} having delivered {delivered} \
                     versions of {shard}, {longest} were delivered somewhere",
                );
            }
        }
        Ok(())
    }

    /// View `view_id`, if some node installed it.
    pub fn view(&self, view_id: u32) -> Option<&View> {
        self.views.get(&view_id)
    }

    /// The newest view installed anywhere.
    pub fn latest_view(&self) -> Option<&View> {
        self.views.values().next_back()
    }

    /// Node `node` became a member of `shard` it did not replicate (or is still catching up):
    /// its frontiers start again from nothing.
    pub fn join_shard(&mut self, node: usize, shard: ShardId) {
        let s = usize::from(shard.0);
        self.stability[node][s] = Hlc::ZERO;
        self.durable[node][s] = None;
    }

    /// Node `node` restarted with `records` in its log of `shard`, all synced: they must be a
    /// prefix of the shard's log.
    pub fn restart(
        &mut self,
        node: usize,
        shard: ShardId,
        records: &[derechofs_core::Record],
    ) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let canonical = &self.shards[s].canonical;
        for (at, record) in records.iter().enumerate() {
            let same = canonical
                .get(at)
                .is_some_and(|e| e.version == record.version && e.hlc == record.hlc);
            if !same {
                return violation!(
                    "its log of {shard} holds {:#x} at position {at}, not the shard's log",
                    record.version
                );
            }
        }
        if let Some(persisted) = self.persisted[node][s] {
            if records.last().map(|r| r.version) < Some(persisted) {
                return violation!("its disk lost {persisted:#x} of {shard}, reported persisted");
            }
        }
        self.delivered[node][s] = records.len();
        self.persisted[node][s] = records.last().map(|r| r.version);
        self.join_shard(node, shard);
        Ok(())
    }

    /// A total restart ended `shard`'s log at `end`: versions delivered beyond it are gone.
    /// None of them may have been durable on every replica (in a persistence frontier some
    /// node reported) or below a time read already answered.
    pub fn cut(&mut self, shard: ShardId, end: Option<Version>) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let log = &mut self.shards[s];
        let keep = log.canonical.partition_point(|e| Some(e.version) <= end);
        if log.canonical.get(keep.wrapping_sub(1)).map(|e| e.version) != end
            && !(end.is_none() && keep == 0)
        {
            return violation!(
                "total restart: {shard} ends at {end:?}, which no replica delivered"
            );
        }
        if log.durable_max > end {
            return violation!(
                "durability: a total restart ended {shard} at {end:?}, below the persistence                  frontier {:?} reached before",
                log.durable_max
            );
        }
        if let Some(answered) = log.answered_max {
            if log.canonical[keep..].iter().any(|e| e.hlc <= answered) {
                return violation!(
                    "time read: a total restart cut versions of {shard} a read at {answered}                      was answered with"
                );
            }
        }
        if keep == log.canonical.len() {
            return Ok(());
        }
        let tail = log.canonical.split_off(keep);
        log.cut.push((keep, tail));
        for delivered in &mut self.delivered {
            delivered[s] = delivered[s].min(keep);
        }
        Ok(())
    }

    /// Node `node` comes back after a total restart with `records` in its log of `shard`: a
    /// prefix of the shard's log, perhaps followed by part of a tail a restart cut. It counts
    /// as having delivered the prefix.
    pub fn recover(
        &mut self,
        node: usize,
        shard: ShardId,
        records: &[derechofs_core::Record],
    ) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let log = &self.shards[s];
        let mut prefix = 0;
        for (at, record) in records.iter().enumerate() {
            let same = |e: &Entry| e.version == record.version && e.hlc == record.hlc;
            if prefix == at && log.canonical.get(at).is_some_and(same) {
                prefix += 1;
                continue;
            }
            let in_cut = log
                .cut
                .iter()
                .any(|(first, tail)| at >= *first && tail.get(at - first).is_some_and(same));
            if !in_cut {
                return violation!(
                    "its log of {shard} holds {:#x} at position {at}, not the shard's log nor                      a tail a restart cut",
                    record.version
                );
            }
        }
        if let Some(persisted) = self.persisted[node][s] {
            if records.last().map(|r| r.version) < Some(persisted) {
                return violation!("its disk lost {persisted:#x} of {shard}, reported persisted");
            }
        }
        self.delivered[node][s] = prefix;
        self.persisted[node][s] = prefix.checked_sub(1).map(|i| records[i].version);
        self.join_shard(node, shard);
        Ok(())
    }

    /// Node `node` cut its log of `shard` to its first `kept` records, which must be what it
    /// delivered of the shard's log.
    pub fn truncate(&mut self, node: usize, shard: ShardId, kept: usize) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        if kept > self.delivered[node][s] {
            return violation!(
                "node {node} kept {kept} records of {shard} after a cut, but only {} are the                  shard's log",
                self.delivered[node][s]
            );
        }
        self.delivered[node][s] = kept;
        let last = kept
            .checked_sub(1)
            .map(|i| self.shards[s].canonical[i].version);
        self.persisted[node][s] = self.persisted[node][s].min(last);
        Ok(())
    }

    /// The longest log of `shard` delivered anywhere.
    pub fn canonical(&self, shard: ShardId) -> &[Entry] {
        &self.shards[usize::from(shard.0)].canonical
    }

    /// How many versions of `shard` node `node` delivered.
    pub fn delivered(&self, node: usize, shard: ShardId) -> usize {
        self.delivered[node][usize::from(shard.0)]
    }

    /// The highest version of `shard` node `node` persisted.
    pub fn persisted(&self, node: usize, shard: ShardId) -> Option<Version> {
        self.persisted[node][usize::from(shard.0)]
    }

    /// Whether a request with this id was delivered in `shard`.
    pub fn contains_request(&self, shard: ShardId, id: u64) -> bool {
        self.shards[usize::from(shard.0)].requests.contains(&id)
    }

    /// Node `node` delivered `deliveries` in `shard`.
    pub fn deliver(
        &mut self,
        node: usize,
        shard: ShardId,
        deliveries: &[Delivery],
    ) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let log = &mut self.shards[s];
        for delivery in deliveries {
            let at = self.delivered[node][s];
            let previous = at.checked_sub(1).map(|i| log.canonical[i]);
            let digest = chain(previous.map_or(0, |e| e.digest), delivery);
            let entry = Entry {
                version: delivery.version,
                hlc: delivery.hlc,
                digest,
            };
            if let Some(expected) = log.canonical.get(at) {
                if *expected != entry {
                    return violation!(
                        "agreement: node {node} delivered {entry:?} at position {at} of {shard}, \
                         another replica delivered {expected:?} there"
                    );
                }
            } else {
                if let Some(previous) = previous {
                    if entry.version <= previous.version || entry.hlc <= previous.hlc {
                        return violation!(
                            "HLC order: {shard} log has {previous:?} followed by {entry:?}"
                        );
                    }
                }
                if let Some(answered) = log.answered_max {
                    if entry.hlc <= answered {
                        return violation!(
                            "time read: {shard} delivered {entry:?} after a read at {answered} \
                             was answered"
                        );
                    }
                }
                for request in &delivery.requests {
                    if !log.requests.insert(request.id) {
                        return violation!(
                            "exactly once: request {:#x} delivered twice in {shard}",
                            request.id
                        );
                    }
                }
                log.canonical.push(entry);
            }
            self.delivered[node][s] = at + 1;
        }
        Ok(())
    }

    /// Node `node` persisted `shard` up to `version`.
    pub fn persist(
        &mut self,
        node: usize,
        shard: ShardId,
        version: Version,
    ) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let delivered = self.delivered[node][s];
        let last = delivered
            .checked_sub(1)
            .map(|i| self.shards[s].canonical[i].version);
        if Some(version) > last {
            return violation!(
                "node {node} persisted {version:#x} of {shard} before delivering it"
            );
        }
        let persisted = &mut self.persisted[node][s];
        *persisted = (*persisted).max(Some(version));
        Ok(())
    }

    /// Node `node` reports these frontiers for `shard`; `members` are the nodes replicating it.
    pub fn frontiers(
        &mut self,
        node: usize,
        shard: ShardId,
        members: &[usize],
        stability: Hlc,
        durable: Option<Version>,
    ) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let before = &mut self.stability[node][s];
        if stability < *before {
            return violation!("node {node}: stability frontier of {shard} went back");
        }
        *before = stability;
        let log = &mut self.shards[s];
        log.durable_max = log.durable_max.max(durable);
        let before = &mut self.durable[node][s];
        if durable < *before {
            return violation!("node {node}: persistence frontier of {shard} went back");
        }
        *before = durable;
        let actual = members
            .iter()
            .map(|&m| self.persisted[m][s])
            .min()
            .flatten();
        if durable > actual {
            return violation!(
                "node {node}: persistence frontier {durable:?} of {shard} beyond what every \
                 member persisted ({actual:?})"
            );
        }
        Ok(())
    }

    /// Node `node`, whose stability frontier for `shard` is at or above `at`, answers a read at
    /// time `at` from its own log.
    pub fn time_read(&mut self, node: usize, shard: ShardId, at: Hlc) -> Result<(), Violation> {
        let s = usize::from(shard.0);
        let log = &mut self.shards[s];
        let local = &log.canonical[..self.delivered[node][s]];
        let count = local.partition_point(|entry| entry.hlc <= at);
        let everywhere = log.canonical.partition_point(|entry| entry.hlc <= at);
        if count != everywhere {
            return violation!(
                "time read: node {node} answers {count} versions of {shard} at {at}, but \
                 {everywhere} are delivered somewhere"
            );
        }
        if let Some(entry) = count.checked_sub(1).map(|i| local[i]) {
            if Some(entry.version) > self.persisted[node][s] {
                return violation!(
                    "time read: node {node} answers at {at} with {:#x} of {shard} not persisted",
                    entry.version
                );
            }
        }
        if let Some(&earlier) = log.answers.get(&at) {
            if earlier != count {
                return violation!(
                    "time read: {shard} at {at} answered {earlier} versions, now {count}"
                );
            }
        } else {
            log.answers.insert(at, count);
        }
        log.answered_max = log.answered_max.max(Some(at));
        self.time_reads += 1;
        Ok(())
    }
}

/// The next link of a log's hash chain.
fn chain(previous: u64, delivery: &Delivery) -> u64 {
    let mut hasher = DefaultHasher::new();
    previous.hash(&mut hasher);
    delivery.version.hash(&mut hasher);
    delivery.hlc.hash(&mut hasher);
    delivery.sender.hash(&mut hasher);
    for request in &delivery.requests {
        request.id.hash(&mut hasher);
        request.client_hlc.hash(&mut hasher);
        request.payload.hash(&mut hasher);
    }
    hasher.finish()
}

/// The address simulated node `id` announces when it asks to join (the simulator's network
/// routes by node id; the address is only carried, and checked).
pub fn announced_addr(id: NodeId) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([10, 0, (id >> 8) as u8, id as u8], 7000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use derechofs_core::{version_of, Request};

    fn delivery(seq: u32, wall_us: u64, id: u64) -> Delivery {
        let request = Request {
            id,
            client_hlc: Hlc::ZERO,
            payload: Bytes::from_static(b"x"),
        };
        Delivery {
            version: version_of(1, seq),
            hlc: Hlc::at(wall_us),
            sender: 1,
            requests: vec![request],
        }
    }

    #[test]
    fn a_replica_that_diverges_is_caught() {
        let mut checker = Checker::new(2, 1);
        checker
            .deliver(0, ShardId(0), &[delivery(0, 10, 1)])
            .unwrap();
        assert!(checker
            .deliver(1, ShardId(0), &[delivery(0, 10, 2)])
            .is_err());
    }

    #[test]
    fn a_stamp_that_goes_back_is_caught() {
        let mut checker = Checker::new(1, 1);
        checker
            .deliver(0, ShardId(0), &[delivery(0, 10, 1)])
            .unwrap();
        assert!(checker
            .deliver(0, ShardId(0), &[delivery(1, 10, 2)])
            .is_err());
    }

    #[test]
    fn a_version_below_an_answered_read_is_caught() {
        let mut checker = Checker::new(1, 1);
        checker
            .deliver(0, ShardId(0), &[delivery(0, 10, 1)])
            .unwrap();
        checker.persist(0, ShardId(0), version_of(1, 0)).unwrap();
        checker.time_read(0, ShardId(0), Hlc::at(20)).unwrap();
        assert!(checker
            .deliver(0, ShardId(0), &[delivery(1, 15, 2)])
            .is_err());
    }

    /// A member that installs view 2 late, after the others delivered a version of view 2 in
    /// the trim that ended it (as fault seed 1732 did before removals waited out read leases):
    /// it must have delivered the versions of view 1, not view 2's.
    #[test]
    fn a_member_leaving_a_view_late_owes_only_that_views_versions() {
        let spec = derechofs_core::LayoutSpec {
            namespace_shards: 1,
            data_shards: 0,
            replicas: 3,
            replicas_min: 1,
        };
        let views: Vec<View> = (1..=2)
            .map(|id| View::initial(id, vec![1, 2, 3], spec).unwrap())
            .collect();
        let mut later = delivery(0, 30, 3);
        later.version = version_of(2, 0);
        let mut checker = Checker::new(3, 1);
        for node in 0..2 {
            let log = [delivery(0, 10, 1), delivery(1, 20, 2), later.clone()];
            checker.deliver(node, ShardId(0), &log).unwrap();
            checker.install(node, None, &views[0], &[]).unwrap();
        }
        checker
            .deliver(2, ShardId(0), &[delivery(0, 10, 1)])
            .unwrap();
        checker.install(2, None, &views[0], &[]).unwrap();
        assert!(
            checker
                .install(2, Some(&views[0]), &views[1], &[ShardId(0)])
                .is_err(),
            "a version of view 1 is missing"
        );
        let mut checker = Checker::new(3, 1);
        for node in 0..3 {
            let log = [delivery(0, 10, 1), delivery(1, 20, 2), later.clone()];
            let log = if node == 2 { &log[..2] } else { &log[..] };
            checker.deliver(node, ShardId(0), log).unwrap();
            checker.install(node, None, &views[0], &[]).unwrap();
        }
        checker
            .install(2, Some(&views[0]), &views[1], &[ShardId(0)])
            .unwrap();
    }

    #[test]
    fn a_request_delivered_twice_is_caught() {
        let mut checker = Checker::new(1, 1);
        checker
            .deliver(0, ShardId(0), &[delivery(0, 10, 1)])
            .unwrap();
        assert!(checker
            .deliver(0, ShardId(0), &[delivery(1, 11, 1)])
            .is_err());
    }
}
