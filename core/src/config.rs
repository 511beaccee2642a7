//! The per-node parameters of the engine.

use std::net::SocketAddr;

use crate::bounds::{BATCH_BYTES_MAX, PENDING_REQUESTS_MAX, WINDOW_MAX};
use crate::view::NodeId;

/// Parameters of one node's engine. `window` and `batch_bytes_max` should agree across the
/// group for fair flow control, but a mismatch is tolerated: receivers enforce only the bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// This node's id; it must be a member of the view the node starts in.
    pub node_id: NodeId,
    /// Interval between heartbeats to every view member, and between stability floor updates.
    pub heartbeat_ms: u64,
    /// A peer silent this long is suspected.
    pub suspect_after_ms: u64,
    /// Messages a sender may have outstanding beyond the slowest member's delivered counter.
    pub window: u32,
    /// Bytes of requests a sender batches into one message (a larger request travels alone).
    pub batch_bytes_max: usize,
    /// Local requests queued per shard while the window is closed; beyond it submits fail.
    pub pending_requests_max: usize,
    /// The address this node announces when it asks to join (`Message::Join`), so that
    /// members that do not know it can reach it; `None` announces none.
    pub addr: Option<SocketAddr>,
}

impl Config {
    /// The defaults for a node: 20 ms heartbeats, suspicion after 1 s of silence, a window of 16
    /// messages of up to 1 MiB of batched requests.
    pub fn new(node_id: NodeId) -> Config {
        Config {
            node_id,
            heartbeat_ms: 20,
            suspect_after_ms: 1000,
            window: 16,
            batch_bytes_max: 1 << 20,
            pending_requests_max: 1 << 14,
            addr: None,
        }
    }

    /// Checks every value against its bound.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_ms == 0 {
            return Err(ConfigError::Invalid("heartbeat_ms must be positive"));
        }
        if self.suspect_after_ms <= self.heartbeat_ms {
            return Err(ConfigError::Invalid(
                "suspect_after_ms must exceed heartbeat_ms",
            ));
        }
        if self.window == 0 || self.window > WINDOW_MAX {
            return Err(ConfigError::Invalid("window must be in 1..=WINDOW_MAX"));
        }
        if self.batch_bytes_max == 0 || self.batch_bytes_max > BATCH_BYTES_MAX {
            return Err(ConfigError::Invalid(
                "batch_bytes_max must be in 1..=BATCH_BYTES_MAX",
            ));
        }
        if self.pending_requests_max == 0 || self.pending_requests_max > PENDING_REQUESTS_MAX {
            return Err(ConfigError::Invalid(
                "pending_requests_max must be in 1..=PENDING_REQUESTS_MAX",
            ));
        }
        Ok(())
    }
}

/// Why a node cannot start with a configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A parameter is out of its range.
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
    /// The node is not a member of the view it was asked to start in.
    #[error("node {0} is not a member of the view")]
    NotAMember(NodeId),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::new(1).validate(), Ok(()));
    }

    #[test]
    fn suspicion_must_be_slower_than_heartbeats() {
        let config = Config {
            suspect_after_ms: 20,
            ..Config::new(1)
        };
        assert!(config.validate().is_err());
    }
}
