//! The in-memory indexes of a log: the version table (version → stamp, and stamp → version) and
//! the multi-version key index (key → its versions, each pointing at its value in a file).
//!
//! Memory is what bounds a replica, so the layout is columnar: a version costs 20 bytes in the
//! version table, and each key write 20 bytes in its key's history.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::{Hlc, Version};

/// The file id of the base file written by trim (segments use their sequence numbers).
pub(crate) const BASE_FILE: u32 = u32::MAX;
const TOMBSTONE: u32 = u32::MAX;

/// Where one version of one key lives: in file `file`, `len` bytes at `offset`, or a tombstone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    version: [u32; 2],
    pub(crate) file: u32,
    pub(crate) offset: u32,
    len: u32,
}

impl Entry {
    pub(crate) fn new(version: Version, file: u32, offset: u32, len: Option<u32>) -> Entry {
        debug_assert!(len != Some(TOMBSTONE));
        Entry {
            version: [(version >> 32) as u32, version as u32],
            file,
            offset,
            len: len.unwrap_or(TOMBSTONE),
        }
    }

    pub(crate) fn version(&self) -> Version {
        (u64::from(self.version[0]) << 32) | u64::from(self.version[1])
    }

    /// The value's length, or `None` for a tombstone.
    pub(crate) fn len(&self) -> Option<u32> {
        (self.len != TOMBSTONE).then_some(self.len)
    }

    pub(crate) fn to_words(self) -> [u32; 5] {
        [
            self.version[0],
            self.version[1],
            self.file,
            self.offset,
            self.len,
        ]
    }

    pub(crate) fn from_words(w: [u32; 5]) -> Entry {
        Entry {
            version: [w[0], w[1]],
            file: w[2],
            offset: w[3],
            len: w[4],
        }
    }
}

/// Versions in log order with their stamps, as parallel columns.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct VersionTable {
    pub(crate) versions: Vec<u64>,
    pub(crate) walls: Vec<u64>,
    pub(crate) logicals: Vec<u32>,
}

impl VersionTable {
    pub(crate) fn len(&self) -> usize {
        self.versions.len()
    }

    pub(crate) fn push(&mut self, version: Version, hlc: Hlc) {
        self.versions.push(version);
        self.walls.push(hlc.wall_us);
        self.logicals.push(hlc.logical);
    }

    pub(crate) fn stamp_at(&self, i: usize) -> Hlc {
        Hlc {
            wall_us: self.walls[i],
            logical: self.logicals[i],
        }
    }

    pub(crate) fn last(&self) -> Option<(Version, Hlc)> {
        let i = self.len().checked_sub(1)?;
        Some((self.versions[i], self.stamp_at(i)))
    }

    pub(crate) fn first(&self) -> Option<(Version, Hlc)> {
        (self.len() > 0).then(|| (self.versions[0], self.stamp_at(0)))
    }

    /// The stamp of exactly `version`, if the table holds it.
    pub(crate) fn stamp_of(&self, version: Version) -> Option<Hlc> {
        self.versions
            .binary_search(&version)
            .ok()
            .map(|i| self.stamp_at(i))
    }

    /// Index of the last version ≤ `version`.
    pub(crate) fn at_or_below(&self, version: Version) -> Option<usize> {
        self.versions
            .partition_point(|&v| v <= version)
            .checked_sub(1)
    }

    /// Index of the last version whose stamp is ≤ `t`.
    pub(crate) fn at_time(&self, t: Hlc) -> Option<usize> {
        // Stamps strictly increase, so the columns are sorted as pairs: binary search on them.
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.stamp_at(mid) <= t {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo.checked_sub(1)
    }

    pub(crate) fn truncate(&mut self, len: usize) {
        self.versions.truncate(len);
        self.walls.truncate(len);
        self.logicals.truncate(len);
    }

    pub(crate) fn drop_before(&mut self, start: usize) {
        self.versions.drain(..start);
        self.walls.drain(..start);
        self.logicals.drain(..start);
    }
}

/// The multi-version key index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct KeyIndex {
    pub(crate) keys: BTreeMap<Box<[u8]>, Vec<Entry>>,
}

impl KeyIndex {
    /// Records that `entry.version()` wrote `key`; a second write of the same key by the same
    /// version replaces the first, as it would when applied in order.
    pub(crate) fn record(&mut self, key: &[u8], entry: Entry) {
        match self.keys.get_mut(key) {
            Some(entries) => match entries.last_mut() {
                Some(last) if last.version() == entry.version() => *last = entry,
                _ => {
                    debug_assert!(entries.last().is_none_or(|l| l.version() < entry.version()));
                    entries.push(entry);
                }
            },
            None => {
                self.keys.insert(key.into(), vec![entry]);
            }
        }
    }

    /// The entry of `key` in force at `version`.
    pub(crate) fn at(&self, key: &[u8], version: Version) -> Option<Entry> {
        let entries = self.keys.get(key)?;
        entry_at(entries, version)
    }

    /// Keys from `start` (inclusive or not) onwards, with their histories.
    pub(crate) fn range_from<'a>(
        &'a self,
        start: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a [Entry])> + 'a {
        self.keys
            .range::<[u8], _>((start, Bound::Unbounded))
            .map(|(k, v)| (&**k, v.as_slice()))
    }

    /// Forgets every entry above `version`.
    pub(crate) fn truncate_after(&mut self, version: Version) {
        self.keys.retain(|_, entries| {
            let keep = entries.partition_point(|e| e.version() <= version);
            entries.truncate(keep);
            !entries.is_empty()
        });
    }
}

pub(crate) fn entry_at(entries: &[Entry], version: Version) -> Option<Entry> {
    let n = entries.partition_point(|e| e.version() <= version);
    n.checked_sub(1).map(|i| entries[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_lookup_finds_the_last_version_at_or_before_a_stamp() {
        let mut t = VersionTable::default();
        t.push(
            10,
            Hlc {
                wall_us: 5,
                logical: 0,
            },
        );
        t.push(
            11,
            Hlc {
                wall_us: 5,
                logical: 3,
            },
        );
        t.push(
            12,
            Hlc {
                wall_us: 9,
                logical: 0,
            },
        );
        assert_eq!(
            t.at_time(Hlc {
                wall_us: 4,
                logical: 9
            }),
            None
        );
        assert_eq!(
            t.at_time(Hlc {
                wall_us: 5,
                logical: 0
            }),
            Some(0)
        );
        assert_eq!(
            t.at_time(Hlc {
                wall_us: 5,
                logical: 2
            }),
            Some(0)
        );
        assert_eq!(
            t.at_time(Hlc {
                wall_us: 5,
                logical: 3
            }),
            Some(1)
        );
        assert_eq!(
            t.at_time(Hlc {
                wall_us: 8,
                logical: 0
            }),
            Some(1)
        );
        assert_eq!(t.at_time(Hlc::MAX), Some(2));
    }

    #[test]
    fn an_entry_costs_twenty_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 20);
    }

    #[test]
    fn a_second_write_of_a_key_in_one_version_replaces_the_first() {
        let mut k = KeyIndex::default();
        k.record(b"a", Entry::new(1, 0, 0, Some(1)));
        k.record(b"a", Entry::new(1, 0, 8, None));
        assert_eq!(k.keys[&b"a"[..]].len(), 1);
        assert_eq!(k.at(b"a", 1).and_then(|e| e.len()), None);
    }
}
