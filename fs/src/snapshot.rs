//! Snapshot views: the `NAME@STAMP` grammar of a path component (DESIGN §5) and the inode
//! numbers of snapshot trees.
//!
//! A component `NAME@STAMP` whose literal name does not exist names `NAME` as it was at `STAMP`
//! (an empty `NAME`: the directory itself at `STAMP`). `STAMP` is an RFC 3339 time, Unix seconds
//! with an optional fraction, or an integer with a suffix `ms`, `us` or `ns` ([`crate::time`]).
//! The split is at the last `@`, so `a@b@1763720100` is `a@b` at `1763720100`; a suffix that does
//! not parse leaves the whole component an ordinary name.
//!
//! Snapshot inode numbers have the top bit set, which no live inode has (live numbers stay below
//! 2^40). Below it, bits 23..63 hold the live inode number and bits 0..23 a 23-bit tag of the
//! time: `1<<63 | ino<<23 | tag(T)`, with `tag(T)` a hash of the stamp. So the number of a given
//! `(inode, T)` is the same on every mount and every run, and differs from every live number.
//! Two different times of one mount whose tags collide (about one chance in 8 million a pair)
//! are told apart by taking the next free tag for the later one, which is then stable for the
//! life of the mount only.

use std::collections::HashMap;

use derechofs_storage::Hlc;

use crate::inode::{Ino, LIVE_INO_MAX};
use crate::time::parse_time_us;

/// The top bit: set in every snapshot inode number.
pub const SNAPSHOT_BIT: u64 = 1 << 63;
const TAG_BITS: u32 = 23;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// Most distinct times one mount keeps snapshot inode numbers for.
pub const SNAPSHOT_TIMES_MAX: usize = 1 << 20;

/// The stamp a snapshot at `us` (microseconds since the epoch) reads at: every version stamped
/// in or before that microsecond.
pub fn snapshot_stamp(us: u64) -> Hlc {
    Hlc {
        wall_us: us,
        logical: u32::MAX,
    }
}

/// Splits `NAME@STAMP` into the name and the time in microseconds; `None` when the component
/// has no `@` or its suffix is not a time (then it is an ordinary name).
pub fn split_snapshot(component: &[u8]) -> Option<(&[u8], u64)> {
    let at = component.iter().rposition(|&b| b == b'@')?;
    let stamp = std::str::from_utf8(&component[at + 1..]).ok()?;
    if stamp.is_empty() || stamp.trim() != stamp {
        return None;
    }
    let us = parse_time_us(stamp).ok()?;
    Some((&component[..at], us))
}

/// Whether `ino` is a snapshot inode number.
pub fn is_snapshot(ino: Ino) -> bool {
    ino & SNAPSHOT_BIT != 0
}

fn tag_of(t: Hlc) -> u64 {
    let mut z = t.wall_us ^ (u64::from(t.logical) << 32) ^ 0x5DEE_CE66_D1CE_4E5B;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & TAG_MASK
}

/// The times a mount has handed out snapshot inode numbers for.
#[derive(Debug, Default)]
pub struct SnapshotTable {
    by_tag: HashMap<u64, Hlc>,
    by_time: HashMap<Hlc, u64>,
}

impl SnapshotTable {
    /// The snapshot inode number of live inode `ino` at `t`; `None` when the table is full or
    /// `ino` is not a live inode number (it comes from a node's reply: checked, not trusted).
    pub fn ino(&mut self, ino: Ino, t: Hlc) -> Option<Ino> {
        if ino > LIVE_INO_MAX {
            return None;
        }
        let tag = match self.by_time.get(&t) {
            Some(&tag) => tag,
            None => {
                if self.by_time.len() >= SNAPSHOT_TIMES_MAX {
                    return None;
                }
                let mut tag = tag_of(t);
                while self.by_tag.contains_key(&tag) {
                    tag = (tag + 1) & TAG_MASK;
                }
                self.by_tag.insert(tag, t);
                self.by_time.insert(t, tag);
                tag
            }
        };
        Some(SNAPSHOT_BIT | (ino << TAG_BITS) | tag)
    }

    /// The live inode and time a snapshot inode number stands for; `None` if this mount never
    /// handed it out.
    pub fn resolve(&self, snapshot_ino: Ino) -> Option<(Ino, Hlc)> {
        if !is_snapshot(snapshot_ino) {
            return None;
        }
        let t = *self.by_tag.get(&(snapshot_ino & TAG_MASK))?;
        Some(((snapshot_ino & !SNAPSHOT_BIT) >> TAG_BITS, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_split_at_the_last_at_sign_when_the_suffix_is_a_time() {
        assert_eq!(
            split_snapshot(b"a.log@1763720100"),
            Some((&b"a.log"[..], 1_763_720_100_000_000))
        );
        assert_eq!(
            split_snapshot(b"@1763720100.25"),
            Some((&b""[..], 1_763_720_100_250_000))
        );
        assert_eq!(split_snapshot(b"a@b@5ms"), Some((&b"a@b"[..], 5_000)));
        assert_eq!(
            split_snapshot(b"x@2025-11-21T10:15:00Z"),
            Some((&b"x"[..], 1_763_720_100_000_000))
        );
        for ordinary in [
            &b"plain"[..],
            b"a@",
            b"a@b",
            b"a@12x",
            b"mail@example.com",
            b"a@ 5",
            b"a@\xff",
        ] {
            assert_eq!(split_snapshot(ordinary), None, "{ordinary:?}");
        }
    }

    /// Regression: a live inode number beyond `LIVE_INO_MAX` in a node's reply hit an assertion
    /// here and crashed the mount; it is refused instead.
    #[test]
    fn an_inode_number_beyond_the_live_range_gets_no_snapshot_number() {
        let mut table = SnapshotTable::default();
        assert_eq!(table.ino(LIVE_INO_MAX + 1, snapshot_stamp(1_000_000)), None);
        assert_eq!(table.ino(u64::MAX, snapshot_stamp(1_000_000)), None);
        assert!(table.ino(LIVE_INO_MAX, snapshot_stamp(1_000_000)).is_some());
    }

    #[test]
    fn snapshot_inode_numbers_are_stable_distinct_from_live_ones_and_resolve_back() {
        let mut a = SnapshotTable::default();
        let mut b = SnapshotTable::default();
        let t1 = snapshot_stamp(1_000_000);
        let t2 = snapshot_stamp(2_000_000);
        let x = a.ino(5, t1).unwrap();
        assert!(is_snapshot(x) && x > LIVE_INO_MAX);
        assert_eq!(b.ino(5, t1), Some(x), "another mount gives the same number");
        assert_eq!(a.ino(5, t1), Some(x));
        let y = a.ino(5, t2).unwrap();
        assert_ne!(x, y);
        assert_ne!(a.ino(6, t1).unwrap(), x);
        assert_eq!(a.resolve(x), Some((5, t1)));
        assert_eq!(a.resolve(y), Some((5, t2)));
        assert_eq!(a.resolve(5), None);
        assert_eq!(a.resolve(SNAPSHOT_BIT | 12345), None);
        assert_eq!(
            a.ino(LIVE_INO_MAX, t1).and_then(|i| a.resolve(i)),
            Some((LIVE_INO_MAX, t1))
        );
    }
}
