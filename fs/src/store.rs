//! The read side of a shard's versioned state, as the state machines see it.
//!
//! [`Store`] is "the state of one shard at version `v`": the operations decide against it, and
//! the read requests of clients are answered from it. [`derechofs_storage::Log`] is the real
//! implementation; [`Overlay`] puts the writes of the operations already applied in the version
//! being built on top of a store, so that later operations of the same batch see them.

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;
use derechofs_storage::{Change, Hlc, Location, Log, LogError, Version};

/// Results of a store's reads.
pub type StoreResult<T> = Result<T, LogError>;

/// The state of one shard's keys at any version it holds.
///
/// To ensure correctness, an implementation must answer every read at a version exactly as the
/// log prefix up to that version determines it: the same answer at every replica and every time
/// it is asked, never one influenced by later versions. Reads before the trim horizon fail with
/// the log's `Trimmed`.
pub trait Store {
    /// The value of `key` at `version` (`Version::MAX`: the latest state).
    fn get(&self, key: &[u8], version: Version) -> StoreResult<Option<Bytes>>;
    /// Bytes `from..from + len` of the value of `key` at `version`, cut at the value's end, with
    /// the whole value's length: what slicing [`Store::get`]'s value gives, reading only those
    /// bytes where the store can.
    fn get_range(
        &self,
        key: &[u8],
        version: Version,
        from: u64,
        len: usize,
    ) -> StoreResult<Option<(Bytes, u64)>> {
        Ok(self.get(key, version)?.map(|v| slice_value(v, from, len)))
    }
    /// Up to `limit` (≥ 1) keys starting with `prefix` that exist at `version`, in byte order,
    /// after `after` when given.
    fn scan(
        &self,
        prefix: &[u8],
        version: Version,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Bytes)>>;
    /// The version of the change of `key` in force at `version`, if any (a deletion counts).
    fn key_version(&self, key: &[u8], version: Version) -> StoreResult<Option<Version>>;
    /// The last version stamped at or before `t`; `None` if there was none yet.
    fn version_at(&self, t: Hlc) -> StoreResult<Option<Version>>;
    /// The last version and its stamp.
    fn latest(&self) -> Option<(Version, Hlc)>;
    /// The newest `limit` changes of `key` at or before `version` still held, oldest first.
    fn history_newest(&self, key: &[u8], version: Version, limit: usize) -> Vec<Change>;
    /// Where the value of `key` at `version` lies in the store's files, for a reader on the same
    /// machine ([`Log::locate`]); a store without such files says `Elsewhere`.
    fn locate(&self, key: &[u8], version: Version) -> StoreResult<Location> {
        let _ = (key, version);
        Ok(Location::Elsewhere)
    }
}

/// Bytes `from..from + len` of `value`, cut at its end, with its length.
fn slice_value(value: Bytes, from: u64, len: usize) -> (Bytes, u64) {
    let total = value.len() as u64;
    let start = from.min(total);
    let end = start.saturating_add(len as u64).min(total);
    (value.slice(start as usize..end as usize), total)
}

impl Store for Log {
    fn get(&self, key: &[u8], version: Version) -> StoreResult<Option<Bytes>> {
        Log::get(self, key, version)
    }

    fn get_range(
        &self,
        key: &[u8],
        version: Version,
        from: u64,
        len: usize,
    ) -> StoreResult<Option<(Bytes, u64)>> {
        Log::get_range(self, key, version, from, len)
    }

    fn scan(
        &self,
        prefix: &[u8],
        version: Version,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Bytes)>> {
        Ok(Log::scan(self, prefix, version, after, limit.max(1))?.items)
    }

    fn key_version(&self, key: &[u8], version: Version) -> StoreResult<Option<Version>> {
        Ok(Log::key_version(self, key, version)?.map(|(v, _)| v))
    }

    fn version_at(&self, t: Hlc) -> StoreResult<Option<Version>> {
        Log::version_at(self, t)
    }

    fn latest(&self) -> Option<(Version, Hlc)> {
        Log::latest(self)
    }

    fn history_newest(&self, key: &[u8], version: Version, limit: usize) -> Vec<Change> {
        Log::history_newest(self, key, version, limit)
    }

    fn locate(&self, key: &[u8], version: Version) -> StoreResult<Location> {
        Log::locate(self, key, version)
    }
}

/// The keys written by the operations of one version so far, over the latest state of a store.
/// Reads at any version other than `Version::MAX` go to the store unchanged.
#[derive(Debug)]
pub struct Overlay<'a, S: Store + ?Sized> {
    base: &'a S,
    writes: BTreeMap<Vec<u8>, Option<Bytes>>,
}

impl<'a, S: Store + ?Sized> Overlay<'a, S> {
    /// No writes yet over `base`.
    pub fn new(base: &'a S) -> Overlay<'a, S> {
        Overlay {
            base,
            writes: BTreeMap::new(),
        }
    }

    /// Records the writes of one operation (later writes of a key win).
    pub fn apply(&mut self, delta: Delta) {
        for (k, v) in delta {
            self.writes.insert(k, v);
        }
    }

    /// The merged writes, in key order: the delta of the version.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Bytes>> {
        self.writes
    }
}

/// The writes of one operation: keys with their new values, `None` for a deletion.
pub type Delta = Vec<(Vec<u8>, Option<Bytes>)>;

impl<S: Store + ?Sized> Store for Overlay<'_, S> {
    fn get(&self, key: &[u8], version: Version) -> StoreResult<Option<Bytes>> {
        if version == Version::MAX {
            if let Some(v) = self.writes.get(key) {
                return Ok(v.clone());
            }
        }
        self.base.get(key, version)
    }

    fn get_range(
        &self,
        key: &[u8],
        version: Version,
        from: u64,
        len: usize,
    ) -> StoreResult<Option<(Bytes, u64)>> {
        if version == Version::MAX {
            if let Some(v) = self.writes.get(key) {
                return Ok(v.clone().map(|v| slice_value(v, from, len)));
            }
        }
        self.base.get_range(key, version, from, len)
    }

    fn scan(
        &self,
        prefix: &[u8],
        version: Version,
        after: Option<&[u8]>,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Bytes)>> {
        if version != Version::MAX || self.writes.is_empty() {
            return self.base.scan(prefix, version, after, limit);
        }
        let limit = limit.max(1);
        let mut out = Vec::new();
        let mut cursor: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
        // Merge the base's pages with the overlay's keys, page by page, until `limit` keys.
        loop {
            let page = self.base.scan(prefix, version, cursor.as_deref(), limit)?;
            let page_end = if page.len() < limit {
                None
            } else {
                page.last().map(|(k, _)| k.clone())
            };
            let lower = match &cursor {
                Some(c) => Bound::Excluded(c.clone()),
                None => Bound::Included(prefix.to_vec()),
            };
            let upper = match &page_end {
                Some(e) => Bound::Included(e.clone()),
                None => Bound::Unbounded,
            };
            let mut ours = self
                .writes
                .range::<Vec<u8>, _>((lower, upper))
                .take_while(|(k, _)| k.starts_with(prefix))
                .peekable();
            let mut theirs = page.into_iter().peekable();
            loop {
                let take_ours = match (ours.peek(), theirs.peek()) {
                    (None, None) => break,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (Some((a, _)), Some((b, _))) => a.as_slice() <= b.as_slice(),
                };
                if take_ours {
                    let (k, v) = ours.next().expect("peeked");
                    if theirs.peek().is_some_and(|(b, _)| b == k) {
                        theirs.next();
                    }
                    if let Some(v) = v {
                        out.push((k.clone(), v.clone()));
                    }
                } else {
                    out.push(theirs.next().expect("peeked"));
                }
                if out.len() == limit {
                    return Ok(out);
                }
            }
            match page_end {
                Some(e) => cursor = Some(e),
                None => return Ok(out),
            }
        }
    }

    fn key_version(&self, key: &[u8], version: Version) -> StoreResult<Option<Version>> {
        if version == Version::MAX && self.writes.contains_key(key) {
            // Written by the version being built, which has no number yet.
            return Ok(Some(Version::MAX));
        }
        self.base.key_version(key, version)
    }

    fn version_at(&self, t: Hlc) -> StoreResult<Option<Version>> {
        self.base.version_at(t)
    }

    fn latest(&self) -> Option<(Version, Hlc)> {
        self.base.latest()
    }

    fn history_newest(&self, key: &[u8], version: Version, limit: usize) -> Vec<Change> {
        self.base.history_newest(key, version, limit)
    }
}
