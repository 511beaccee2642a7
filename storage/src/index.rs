//! The in-memory indexes of a log: the version table (version → stamp, and stamp → version) and
//! the multi-version key index (key → its versions, each pointing at its value in a file).
//!
//! Memory is what bounds a replica, so the layout is columnar: a version costs 20 bytes in the
//! version table, and each key write 20 bytes in its key's history.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::{btree_map, BTreeMap};
use std::ops::{Bound, Deref};

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

/// Bytes of a key held inside the index's own nodes; longer keys are allocated apart.
pub(crate) const KEY_INLINE_MAX: usize = 22;

/// A key of the index. Short keys (most: K/V keys, client records, file system records) are
/// held inline, so that comparing keys while walking the map reads the node already in cache
/// instead of following a pointer to each key's own allocation; ordered as its bytes.
#[derive(Clone)]
pub(crate) enum Key {
    Inline {
        len: u8,
        bytes: [u8; KEY_INLINE_MAX],
    },
    Heap(Box<[u8]>),
}

impl Key {
    pub(crate) fn new(key: &[u8]) -> Key {
        if key.len() <= KEY_INLINE_MAX {
            let mut bytes = [0u8; KEY_INLINE_MAX];
            bytes[..key.len()].copy_from_slice(key);
            Key::Inline {
                len: key.len() as u8,
                bytes,
            }
        } else {
            Key::Heap(key.into())
        }
    }
}

impl Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Key::Heap(b) => b,
        }
    }
}

impl Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl From<&[u8]> for Key {
    fn from(key: &[u8]) -> Key {
        Key::new(key)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        **self == **other
    }
}

impl Eq for Key {}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Key) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Key {
    fn cmp(&self, other: &Key) -> Ordering {
        (**self).cmp(&**other)
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// Keys that begin with this byte are indexed apart (see [`KeyIndex`]).
pub(crate) const HIGH_KEY_BYTE: u8 = 0xFF;

type Histories = BTreeMap<Key, Vec<Entry>>;

/// The multi-version key index, in two maps split at the first byte [`HIGH_KEY_BYTE`]: every
/// key that begins with it sorts after every other key, so the two maps one after the other are
/// the keys in order. The state machines keep their own records there (the K/V store's last
/// reply per client, read and written by every request): reaching them walks a map of a few
/// keys instead of one as deep as the user keys, whose nodes are rarely in cache.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct KeyIndex {
    low: Histories,
    high: Histories,
}

impl KeyIndex {
    /// The index of `sorted`, keys in strictly increasing order (checked by the caller).
    pub(crate) fn from_sorted(sorted: impl IntoIterator<Item = (Key, Vec<Entry>)>) -> KeyIndex {
        let mut index = KeyIndex::default();
        for (key, entries) in sorted {
            index.map_mut(&key).insert(key, entries);
        }
        index
    }

    fn map(&self, key: &[u8]) -> &Histories {
        if key.first() == Some(&HIGH_KEY_BYTE) {
            &self.high
        } else {
            &self.low
        }
    }

    fn map_mut(&mut self, key: &[u8]) -> &mut Histories {
        if key.first() == Some(&HIGH_KEY_BYTE) {
            &mut self.high
        } else {
            &mut self.low
        }
    }

    /// Keys indexed.
    pub(crate) fn len(&self) -> usize {
        self.low.len() + self.high.len()
    }

    /// The history of `key`, oldest first.
    pub(crate) fn get(&self, key: &[u8]) -> Option<&Vec<Entry>> {
        self.map(key).get(key)
    }

    /// Every key with its history, in key order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Key, &Vec<Entry>)> {
        self.low.iter().chain(self.high.iter())
    }

    /// Every key with its history, in key order, histories mutable.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (&Key, &mut Vec<Entry>)> {
        self.low.iter_mut().chain(self.high.iter_mut())
    }

    /// Keeps the keys whose history `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Key, &mut Vec<Entry>) -> bool) {
        self.low.retain(&mut keep);
        self.high.retain(&mut keep);
    }

    /// Records that `entry.version()` wrote `key`; a second write of the same key by the same
    /// version replaces the first, as it would when applied in order.
    pub(crate) fn record(&mut self, key: &[u8], entry: Entry) {
        fn add(entries: &mut Vec<Entry>, entry: Entry) {
            match entries.last_mut() {
                Some(last) if last.version() == entry.version() => *last = entry,
                _ => {
                    debug_assert!(entries.last().is_none_or(|l| l.version() < entry.version()));
                    entries.push(entry);
                }
            }
        }
        let map = self.map_mut(key);
        if key.len() <= KEY_INLINE_MAX {
            // Building a short key allocates nothing: one walk of the map, found or not.
            match map.entry(Key::new(key)) {
                btree_map::Entry::Occupied(found) => add(found.into_mut(), entry),
                btree_map::Entry::Vacant(slot) => {
                    slot.insert(vec![entry]);
                }
            }
            return;
        }
        match map.get_mut(key) {
            Some(entries) => add(entries, entry),
            None => {
                map.insert(Key::new(key), vec![entry]);
            }
        }
    }

    /// The entry of `key` in force at `version`.
    pub(crate) fn at(&self, key: &[u8], version: Version) -> Option<Entry> {
        let entries = self.get(key)?;
        entry_at(entries, version)
    }

    /// Keys from `start` (inclusive or not) onwards, with their histories.
    pub(crate) fn range_from<'a>(
        &'a self,
        start: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], &'a [Entry])> + 'a {
        let low = self.low.range::<[u8], _>((start, Bound::Unbounded));
        let high = self.high.range::<[u8], _>((start, Bound::Unbounded));
        low.chain(high).map(|(k, v)| (&**k, v.as_slice()))
    }

    /// Forgets every entry above `version`.
    pub(crate) fn truncate_after(&mut self, version: Version) {
        self.retain(|_, entries| {
            let keep = entries.partition_point(|e| e.version() <= version);
            entries.truncate(keep);
            !entries.is_empty()
        });
    }
}

pub(crate) fn entry_at(entries: &[Entry], version: Version) -> Option<Entry> {
    // Most reads are of the latest state (a client's last request on every request): no
    // binary search over a long history for them.
    match entries.last() {
        Some(last) if last.version() <= version => return Some(*last),
        _ => {}
    }
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
    fn keys_order_as_their_bytes_inline_or_not() {
        let long = [7u8; KEY_INLINE_MAX + 1];
        let mut raw: Vec<Vec<u8>> = vec![
            Vec::new(),
            vec![0],
            vec![0, 0],
            vec![7; KEY_INLINE_MAX],
            long.to_vec(),
            vec![7; KEY_INLINE_MAX + 9],
            vec![8],
            vec![0xFF; 3],
        ];
        let mut keys: Vec<Key> = raw.iter().map(|k| Key::new(k)).collect();
        raw.sort();
        keys.sort();
        let as_bytes: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        assert_eq!(as_bytes, raw);
        assert!(matches!(Key::new(&long), Key::Heap(_)));
        assert!(matches!(Key::new(&long[1..]), Key::Inline { .. }));
        assert_eq!(std::mem::size_of::<Key>(), 24);
    }

    #[test]
    fn the_index_walks_its_keys_in_order_across_the_split() {
        let raw: Vec<&[u8]> = vec![
            b"",
            b"a",
            b"\xfe\xff",
            b"\xff",
            b"\xff\x00",
            b"\xffc12345678",
            b"\xff\xff",
        ];
        let mut k = KeyIndex::default();
        for (i, key) in raw.iter().enumerate().rev() {
            k.record(key, Entry::new(i as u64 + 1, 0, 0, Some(1)));
        }
        assert_eq!(k.len(), raw.len());
        let walked: Vec<&[u8]> = k.iter().map(|(key, _)| &**key).collect();
        assert_eq!(walked, raw);
        for (i, start) in raw.iter().enumerate() {
            let from: Vec<&[u8]> = k
                .range_from(Bound::Included(start))
                .map(|(key, _)| key)
                .collect();
            assert_eq!(from, raw[i..]);
            let after: Vec<&[u8]> = k
                .range_from(Bound::Excluded(start))
                .map(|(key, _)| key)
                .collect();
            assert_eq!(after, raw[i + 1..]);
        }
        k.truncate_after(4);
        let kept: Vec<&[u8]> = k.iter().map(|(key, _)| &**key).collect();
        assert_eq!(kept, raw[..4]);
        assert_eq!(
            KeyIndex::from_sorted(k.iter().map(|(key, e)| (key.clone(), e.clone()))),
            k
        );
    }

    #[test]
    fn an_entry_costs_twenty_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 20);
    }

    #[test]
    fn the_entry_at_a_version_is_the_last_one_written_at_or_before_it() {
        for n in 0..6u64 {
            let entries: Vec<Entry> = (1..=n).map(|i| Entry::new(2 * i, 0, 0, Some(1))).collect();
            for version in (0..2 * n + 3).chain([Version::MAX]) {
                let reference = entries
                    .iter()
                    .rev()
                    .find(|e| e.version() <= version)
                    .copied();
                assert_eq!(
                    entry_at(&entries, version),
                    reference,
                    "{n} entries, at {version}"
                );
            }
        }
    }

    #[test]
    fn a_second_write_of_a_key_in_one_version_replaces_the_first() {
        let mut k = KeyIndex::default();
        k.record(b"a", Entry::new(1, 0, 0, Some(1)));
        k.record(b"a", Entry::new(1, 0, 8, None));
        assert_eq!(k.get(b"a").map(Vec::len), Some(1));
        assert_eq!(k.at(b"a", 1).and_then(|e| e.len()), None);
    }
}
