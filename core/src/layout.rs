//! The shard layout: which members replicate which shard.
//!
//! The layout is a pure function of the layout parameters, the next membership and the previous
//! layout, so every member computes the same one without talking. It is *sticky*: a member keeps
//! the shards it had, spare members refill the gaps (least loaded first), and a view whose shards
//! cannot all reach their minimum size is *inadequate*: the group then waits for joins instead of
//! installing it.

use std::collections::HashMap;
use std::fmt;

use crate::bounds::{SHARDS_MAX, SHARD_MEMBERS_MAX};
use crate::view::NodeId;

/// A replicated type. Each subgroup is split into shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Subgroup {
    /// Directories and inodes.
    Namespace,
    /// File chunks.
    Data,
}

/// A shard's index in the layout, over all subgroups: namespace shards first, then data shards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard {}", self.0)
    }
}

/// How many shards each subgroup has and how many members each shard wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayoutSpec {
    /// Shards of the namespace subgroup.
    pub namespace_shards: u16,
    /// Shards of the data subgroup.
    pub data_shards: u16,
    /// Members each shard wants.
    pub replicas: u16,
    /// Members below which a shard, and so the view, is inadequate.
    pub replicas_min: u16,
}

impl Default for LayoutSpec {
    /// One namespace shard and one data shard of 3 replicas each, adequate down to 2 replicas
    /// (a majority of each shard).
    fn default() -> LayoutSpec {
        LayoutSpec {
            namespace_shards: 1,
            data_shards: 1,
            replicas: 3,
            replicas_min: 2,
        }
    }
}

/// One shard: its subgroup, its index within the subgroup, and its members in rank order (the
/// order of senders in the round-robin multicast).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Its id in the layout.
    pub id: ShardId,
    /// The subgroup it belongs to.
    pub subgroup: Subgroup,
    /// Its index within the subgroup.
    pub index: u16,
    /// Its members in rank order.
    pub members: Vec<NodeId>,
}

/// The assignment of members to every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    spec: LayoutSpec,
    shards: Vec<Shard>,
}

/// Why no layout can be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The layout parameters are out of range.
    #[error("invalid layout: {0}")]
    Invalid(&'static str),
    /// The membership lists a node twice.
    #[error("node {0} appears twice in the membership")]
    DuplicateMember(NodeId),
    /// Some shard cannot reach its minimum size with this membership.
    #[error("inadequate view: {subgroup:?} shard {index} gets {members} members, needs {needed}")]
    Inadequate {
        /// The subgroup of the shard.
        subgroup: Subgroup,
        /// The index of the shard within its subgroup.
        index: u16,
        /// The members it could get.
        members: usize,
        /// Its minimum size.
        needed: usize,
    },
}

impl Layout {
    /// Assigns `members` (in view rank order) to the shards of `spec`, keeping the assignments of
    /// `previous` where possible.
    ///
    /// Members of a previous shard that are still in the membership stay in it, in their order;
    /// then each shard short of `replicas` takes, one at a time, the member holding the fewest
    /// shards so far (ties go to the lower view rank) that it does not already have. A member
    /// may therefore replicate several shards when the group is small.
    pub fn assign(
        spec: LayoutSpec,
        members: &[NodeId],
        previous: Option<&Layout>,
    ) -> Result<Layout, LayoutError> {
        let layout = Layout::assign_allowing_inadequate(spec, members, previous)?;
        layout.check_adequate()?;
        Ok(layout)
    }

    /// As [`Layout::assign`], but a shard may stay below `replicas_min`: the layout of an
    /// inadequate view, which is installed wedged and waits for joins.
    pub fn assign_allowing_inadequate(
        spec: LayoutSpec,
        members: &[NodeId],
        previous: Option<&Layout>,
    ) -> Result<Layout, LayoutError> {
        let shard_count = usize::from(spec.namespace_shards) + usize::from(spec.data_shards);
        if shard_count == 0 || shard_count > SHARDS_MAX {
            return Err(LayoutError::Invalid(
                "shard count must be in 1..=SHARDS_MAX",
            ));
        }
        if spec.replicas == 0 || usize::from(spec.replicas) > SHARD_MEMBERS_MAX {
            return Err(LayoutError::Invalid(
                "replicas must be in 1..=SHARD_MEMBERS_MAX",
            ));
        }
        if spec.replicas_min == 0 || spec.replicas_min > spec.replicas {
            return Err(LayoutError::Invalid("replicas_min must be in 1..=replicas"));
        }
        let mut rank: HashMap<NodeId, usize> = HashMap::with_capacity(members.len());
        for (index, &node) in members.iter().enumerate() {
            if rank.insert(node, index).is_some() {
                return Err(LayoutError::DuplicateMember(node));
            }
        }

        let names = (0..spec.namespace_shards)
            .map(|index| (Subgroup::Namespace, index))
            .chain((0..spec.data_shards).map(|index| (Subgroup::Data, index)));
        let mut shards: Vec<Shard> = names
            .enumerate()
            .map(|(id, (subgroup, index))| Shard {
                id: ShardId(id as u16),
                subgroup,
                index,
                members: Vec::with_capacity(usize::from(spec.replicas)),
            })
            .collect();

        let replicas = usize::from(spec.replicas);
        let mut load = vec![0usize; members.len()];
        if let Some(previous) = previous {
            for shard in &mut shards {
                let Some(old) = previous.shard_named(shard.subgroup, shard.index) else {
                    continue;
                };
                for node in &old.members {
                    if shard.members.len() == replicas {
                        break;
                    }
                    if let Some(&r) = rank.get(node) {
                        shard.members.push(*node);
                        load[r] += 1;
                    }
                }
            }
        }
        for shard in &mut shards {
            while shard.members.len() < replicas {
                let candidate = (0..members.len())
                    .filter(|&r| !shard.members.contains(&members[r]))
                    .min_by_key(|&r| (load[r], r));
                let Some(r) = candidate else { break };
                shard.members.push(members[r]);
                load[r] += 1;
            }
        }
        Ok(Layout { spec, shards })
    }

    /// Whether every shard has at least `replicas_min` members.
    pub fn is_adequate(&self) -> bool {
        self.check_adequate().is_ok()
    }

    fn check_adequate(&self) -> Result<(), LayoutError> {
        for shard in &self.shards {
            if shard.members.len() < usize::from(self.spec.replicas_min) {
                return Err(LayoutError::Inadequate {
                    subgroup: shard.subgroup,
                    index: shard.index,
                    members: shard.members.len(),
                    needed: usize::from(self.spec.replicas_min),
                });
            }
        }
        Ok(())
    }

    /// A layout received from a peer: `shard_members` in shard id order, each a list of
    /// distinct members of `view_members` of at most `spec.replicas`. Checks everything; the
    /// layout may be inadequate.
    pub fn from_parts(
        spec: LayoutSpec,
        shard_members: Vec<Vec<NodeId>>,
        view_members: &[NodeId],
    ) -> Result<Layout, LayoutError> {
        // The spec is checked by laying out the view's members from scratch.
        let mut layout = Layout::assign_allowing_inadequate(spec, view_members, None)?;
        if shard_members.len() != layout.shards.len() {
            return Err(LayoutError::Invalid("shard count differs from the spec"));
        }
        for (shard, members) in layout.shards.iter_mut().zip(shard_members) {
            if members.len() > usize::from(spec.replicas) {
                return Err(LayoutError::Invalid(
                    "a shard has more members than replicas",
                ));
            }
            for (i, node) in members.iter().enumerate() {
                if !view_members.contains(node) {
                    return Err(LayoutError::Invalid("a shard member is not in the view"));
                }
                if members[..i].contains(node) {
                    return Err(LayoutError::DuplicateMember(*node));
                }
            }
            shard.members = members;
        }
        Ok(layout)
    }

    /// The parameters this layout was made from.
    pub fn spec(&self) -> LayoutSpec {
        self.spec
    }

    /// Every shard, in id order.
    pub fn shards(&self) -> &[Shard] {
        &self.shards
    }

    /// The shard with this id, if the layout has it.
    pub fn shard(&self, id: ShardId) -> Option<&Shard> {
        self.shards.get(usize::from(id.0))
    }

    /// The shard with this index in this subgroup.
    pub fn shard_named(&self, subgroup: Subgroup, index: u16) -> Option<&Shard> {
        self.shards
            .iter()
            .find(|shard| shard.subgroup == subgroup && shard.index == index)
    }

    /// The shards `node` replicates, in id order.
    pub fn shards_of(&self, node: NodeId) -> impl Iterator<Item = &Shard> + '_ {
        self.shards
            .iter()
            .filter(move |shard| shard.members.contains(&node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(namespace_shards: u16, data_shards: u16, replicas: u16) -> LayoutSpec {
        LayoutSpec {
            namespace_shards,
            data_shards,
            replicas,
            replicas_min: 2,
        }
    }

    #[test]
    fn three_nodes_replicate_both_subgroups_on_all_three() {
        let layout = Layout::assign(LayoutSpec::default(), &[10, 20, 30], None).unwrap();
        assert_eq!(layout.shards().len(), 2);
        for shard in layout.shards() {
            let mut members = shard.members.clone();
            members.sort();
            assert_eq!(members, vec![10, 20, 30]);
        }
    }

    #[test]
    fn enough_members_give_disjoint_shards() {
        let members: Vec<NodeId> = (1..=9).collect();
        let layout = Layout::assign(spec(1, 2, 3), &members, None).unwrap();
        let mut all: Vec<NodeId> = layout
            .shards()
            .iter()
            .flat_map(|s| s.members.clone())
            .collect();
        all.sort();
        assert_eq!(all, members);
    }

    #[test]
    fn loads_differ_by_at_most_one_without_a_previous_layout() {
        for n in 3..12u32 {
            let members: Vec<NodeId> = (0..n).collect();
            let layout = Layout::assign(spec(2, 5, 3), &members, None).unwrap();
            let loads: Vec<usize> = members
                .iter()
                .map(|&m| layout.shards_of(m).count())
                .collect();
            let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(max - min <= 1, "n={n} loads={loads:?}");
            for shard in layout.shards() {
                let mut members = shard.members.clone();
                members.dedup();
                assert_eq!(members.len(), 3, "a shard never holds a member twice");
            }
        }
    }

    #[test]
    fn the_layout_is_a_pure_function_of_its_inputs() {
        let members = [5, 3, 9, 1, 7];
        let a = Layout::assign(spec(1, 3, 3), &members, None).unwrap();
        let b = Layout::assign(spec(1, 3, 3), &members, None).unwrap();
        assert_eq!(a, b);
        let c = Layout::assign(spec(1, 3, 3), &members, Some(&a)).unwrap();
        assert_eq!(a, c, "the same membership keeps the same layout");
    }

    #[test]
    fn survivors_keep_their_shards_and_spares_refill_the_gap() {
        let members: Vec<NodeId> = (1..=7).collect();
        let before = Layout::assign(spec(1, 1, 3), &members, None).unwrap();
        let failed = before.shards()[0].members[1];
        let next: Vec<NodeId> = members.iter().copied().filter(|&m| m != failed).collect();
        let after = Layout::assign(spec(1, 1, 3), &next, Some(&before)).unwrap();
        for (old, new) in before.shards().iter().zip(after.shards()) {
            let survivors: Vec<NodeId> = old
                .members
                .iter()
                .copied()
                .filter(|&m| m != failed)
                .collect();
            assert_eq!(&new.members[..survivors.len()], &survivors[..]);
            assert_eq!(new.members.len(), 3);
        }
        let spare = after.shards()[0].members[2];
        assert!(!before.shards().iter().any(|s| s.members.contains(&spare)));
    }

    #[test]
    fn a_shard_below_its_minimum_makes_the_view_inadequate() {
        let error = Layout::assign(spec(1, 1, 3), &[1], None).unwrap_err();
        assert!(matches!(
            error,
            LayoutError::Inadequate {
                members: 1,
                needed: 2,
                ..
            }
        ));
        assert!(Layout::assign(spec(1, 1, 3), &[1, 2], None).is_ok());
    }

    #[test]
    fn duplicate_members_and_bad_parameters_are_refused() {
        assert_eq!(
            Layout::assign(spec(1, 1, 3), &[1, 2, 1], None),
            Err(LayoutError::DuplicateMember(1))
        );
        assert!(Layout::assign(spec(0, 0, 3), &[1, 2, 3], None).is_err());
        assert!(Layout::assign(spec(1, 1, 0), &[1, 2, 3], None).is_err());
    }
}
