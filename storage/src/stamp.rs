//! Versions and hybrid logical clock stamps: the two orders every log entry carries.

use std::fmt;

/// A version number: `(view_id << 32) | seq` as assigned by the group engine. Versions of one
/// log strictly increase, with gaps.
pub type Version = u64;

/// Builds the version of message `seq` delivered in view `view_id`.
pub const fn version_of(view_id: u32, seq: u32) -> Version {
    ((view_id as u64) << 32) | seq as u64
}

/// A hybrid logical clock stamp: microseconds of wall time, then a logical counter that orders
/// stamps sharing the same microsecond. Stamps compare lexicographically.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hlc {
    /// Microseconds since the Unix epoch.
    pub wall_us: u64,
    /// Tie-breaker among stamps with the same `wall_us`.
    pub logical: u32,
}

impl Hlc {
    /// The smallest stamp.
    pub const ZERO: Hlc = Hlc {
        wall_us: 0,
        logical: 0,
    };
    /// The largest stamp.
    pub const MAX: Hlc = Hlc {
        wall_us: u64::MAX,
        logical: u32::MAX,
    };

    /// A stamp at `wall_us` with logical part 0.
    pub const fn at(wall_us: u64) -> Hlc {
        Hlc {
            wall_us,
            logical: 0,
        }
    }

    /// The next stamp after `self`: one more logical tick, carrying into the wall part.
    pub const fn tick(self) -> Hlc {
        if self.logical == u32::MAX {
            Hlc {
                wall_us: self.wall_us.saturating_add(1),
                logical: 0,
            }
        } else {
            Hlc {
                wall_us: self.wall_us,
                logical: self.logical + 1,
            }
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:06}+{}",
            self.wall_us / 1_000_000,
            self.wall_us % 1_000_000,
            self.logical
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_strictly_increasing_even_at_the_logical_limit() {
        let a = Hlc {
            wall_us: 7,
            logical: u32::MAX,
        };
        assert!(a.tick() > a);
        let b = Hlc::at(7);
        assert!(b.tick() > b);
    }

    #[test]
    fn version_packs_view_above_sequence() {
        assert!(version_of(1, 0) > version_of(0, u32::MAX));
        assert_eq!(version_of(2, 5) >> 32, 2);
    }
}
