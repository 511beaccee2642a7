//! A view: the members of the group in rank order, and their shard layout.

use std::net::SocketAddr;

use crate::bounds::VIEW_MEMBERS_MAX;
use crate::layout::{Layout, LayoutError, LayoutSpec};

/// A node's id, stable across views.
pub type NodeId = u32;

/// One view of the group. Every message carries its view id; a message of another view is
/// rejected, which is what will let view change cut cleanly between views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Increases by one at every view change.
    pub view_id: u32,
    /// Members in rank order. The leader is the lowest-ranked member not suspected.
    pub members: Vec<NodeId>,
    /// The shard assignment of this view.
    pub layout: Layout,
    /// The addresses of members that announced one when they joined (`Message::Join`), in id
    /// order, one per member at most: how the other members reach a node that their own
    /// configuration does not list. Empty in a first view.
    pub addrs: Vec<(NodeId, SocketAddr)>,
}

/// Why a view cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ViewError {
    /// More members than suspicion masks can name, or none.
    #[error("a view has 1..={VIEW_MEMBERS_MAX} members, not {0}")]
    MemberCount(usize),
    /// The layout cannot be made.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

impl View {
    /// The first view of a group: `members` in rank order, laid out from scratch.
    pub fn initial(
        view_id: u32,
        members: Vec<NodeId>,
        spec: LayoutSpec,
    ) -> Result<View, ViewError> {
        if members.is_empty() || members.len() > VIEW_MEMBERS_MAX {
            return Err(ViewError::MemberCount(members.len()));
        }
        let layout = Layout::assign(spec, &members, None)?;
        Ok(View {
            view_id,
            members,
            layout,
            addrs: Vec::new(),
        })
    }

    /// The address member `node` announced when it joined, if it did.
    pub fn addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        self.addrs
            .iter()
            .find(|(id, _)| *id == node)
            .map(|(_, a)| *a)
    }

    /// The rank of `node` in this view.
    pub fn rank_of(&self, node: NodeId) -> Option<usize> {
        self.members.iter().position(|&member| member == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_follow_member_order() {
        let view = View::initial(1, vec![7, 3, 5], LayoutSpec::default()).unwrap();
        assert_eq!(view.rank_of(3), Some(1));
        assert_eq!(view.rank_of(4), None);
    }

    #[test]
    fn too_many_members_are_refused() {
        let members = (0..(VIEW_MEMBERS_MAX as u32 + 1)).collect();
        assert_eq!(
            View::initial(1, members, LayoutSpec::default()),
            Err(ViewError::MemberCount(VIEW_MEMBERS_MAX + 1))
        );
    }
}
