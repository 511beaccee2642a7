//! A client's cache of live attributes and names, kept coherent by a feed of the namespace
//! shard's changes (docs/SEMANTICS.md, "Consistency").
//!
//! The shards underneath subscribe to the namespace shard's applied versions (`FsWatch`): after
//! each version a member reports the inodes whose records it changed, in version order. The
//! cache holds attributes by inode and names by `(parent, name)`, each tagged with the version
//! it was read at, and drops an entry when the feed reports a change of its inode record (for a
//! name: of that directory entry) at a later version.
//!
//! Rules, all here and unit-tested:
//! - An entry answers only while the feed is subscribed (`subscribed` until `broken`) and has
//!   reported every version this client knows exists (`saw`: its own writes and the versions
//!   its reads were answered at), so an answer never goes behind what the client saw.
//! - A read answered at version `r` is cached only if no change of its inode after `r` has
//!   already streamed past: `r` is at least the `floor` (every change reported after it is
//!   remembered, in a bounded window) and no remembered change of the inode is after `r`.
//! - A broken feed clears everything; a new subscription starts empty from its `from`.
//! - *Complete directories* answer negative lookups: a directory this client created is empty
//!   at the version that created it; from then on every entry change the feed reports in it
//!   makes that name *unknown* unless the cache holds the name as of that version or later, and
//!   a name read (or created) later is known again. A name neither cached nor unknown in a
//!   complete directory does not exist. Past [`UNKNOWN_NAMES_MAX`] unknown names the directory
//!   stops being complete.
//!
//! - *Extended attributes* are cached by inode and name, the value or its absence (ENODATA), under
//!   the rules of attributes, where the change that counts is one the feed reports of the
//!   inode's extended attributes (any of them), not of its record: a write that changes the
//!   file's size and mtime leaves them cached. Only values up to
//!   [`XATTR_CACHE_VALUE_LEN_MAX`] bytes are kept. The kernel asks for `security.capability`
//!   before every write to a file; this answers it without a round trip to the cluster.
//!
//! - *Chunk plans* for local reads (`crate::local`) are kept here too, by inode and chunk
//!   index, and answer under the same condition as attributes. A reported change of an inode's
//!   record drops its plans; so do this client's writes and opens of it
//!   ([`AttrCache::forget_plans`]), and a plan fetched across any such drop is not kept (the
//!   plan epoch).
//!
//! - *The kernel's cache* (a mount's): the mount may let the kernel keep an inode's attributes
//!   or a directory entry for longer than its short lifetime when this cache holds them as
//!   given ([`AttrCache::keep_attr_in_kernel`], [`AttrCache::keep_entry_in_kernel`]). The cache
//!   then remembers the version they were given at, and when the feed reports a change of
//!   them after that version, or breaks, it sends a [`KernelDrop`] for each to the receiver of
//!   [`AttrCache::kernel_drops`], whose owner tells the kernel to drop them.
//!
//! Sans-IO: the shards call [`AttrCache::subscribed`], [`AttrCache::changed`] and
//! [`AttrCache::broken`] from their feed; the file system calls the rest.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::chunk::ChunkPlan;

use crate::inode::{Attr, Ino};

/// A namespace version number (the engine's `Version`).
pub type Version = u64;

/// Most inodes whose attributes are cached; past it new ones are not cached.
pub const ATTR_CACHE_ENTRIES_MAX: usize = 1 << 17;
/// Most names cached; past it new ones are not cached.
pub const NAME_CACHE_ENTRIES_MAX: usize = 1 << 17;
/// Most extended attributes (values or absences) cached, over every inode; past it new ones are
/// not cached.
pub const XATTR_CACHE_ENTRIES_MAX: usize = 1 << 14;
/// Longest extended attribute value cached (a file capability is 20 bytes).
pub const XATTR_CACHE_VALUE_LEN_MAX: usize = 256;
/// Most directories kept complete (every entry known); past it new ones are not.
pub const COMPLETE_DIRS_MAX: usize = 4096;
/// Most names of a complete directory that changed while not cached; past it the directory is
/// no longer complete.
pub const UNKNOWN_NAMES_MAX: usize = 4096;
/// Most reported changes remembered to check reads answered before them; older ones raise the
/// floor below which no read is cached.
pub const RECENT_CHANGES_MAX: usize = 1 << 14;
/// Most pieces and files of the chunk plans kept for local reads, counted together (a plan of
/// a chunk written once is one piece and one file, about 100 bytes); past it new ones are not
/// kept.
pub const PLAN_CACHE_ITEMS_MAX: usize = 1 << 18;

/// Most inodes and entries the kernel is let keep for longer, counted together; past it (once
/// the expired ones are swept) no more are.
pub const KERNEL_KEPT_MAX: usize = 1 << 17;
/// Least time between two sweeps of the expired items the kernel was let keep.
const KERNEL_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// What the kernel is to drop from its cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelDrop {
    /// An inode's attributes.
    Inode(Ino),
    /// A directory entry: the directory and the name.
    Entry(Ino, Bytes),
}

/// What a reported change is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// An inode's record (its attributes).
    Inode(Ino),
    /// Any extended attribute of an inode.
    Xattrs(Ino),
    /// A directory entry: the directory and the name.
    Entry(Ino, Bytes),
}

/// What [`AttrCache::stats`] counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Subscriptions started.
    pub subscriptions: u64,
    /// Subscriptions that broke.
    pub breaks: u64,
    /// Answers from the cache.
    pub hits: u64,
    /// Attributes, names and extended attributes cached now.
    pub entries: usize,
    /// The last version the feed reported, if subscribed.
    pub position: Option<Version>,
    /// File reads answered from the members' log files on this machine (local reads).
    pub local_reads: u64,
    /// Local reads that failed and went through a member.
    pub local_failures: u64,
}

#[derive(Debug, Default)]
struct State {
    live: bool,
    /// The feed's last reported version (its `from` before the first report).
    position: Version,
    /// Every change reported after this version is in `recent`.
    floor: Version,
    /// The newest version this client knows exists.
    seen: Version,
    attrs: HashMap<Ino, (Attr, Version)>,
    /// By directory and name: the inode and the version read at.
    names: HashMap<(Ino, Bytes), (Ino, Version)>,
    recent: VecDeque<(Version, Key)>,
    last_change: HashMap<Key, Version>,
    /// Per directory, the last reported change of any of its entries (within `recent`).
    dir_change: HashMap<Ino, Version>,
    /// Complete directories, with the names that changed while not cached.
    complete: HashMap<Ino, HashSet<Bytes>>,
    /// Extended attributes by inode and name: the value (`None`: absent) and the version read at.
    xattrs: HashMap<Ino, HashMap<Bytes, (Option<Bytes>, Version)>>,
    /// Entries in `xattrs`, over every inode.
    xattr_count: usize,
    /// Chunk plans for local reads, by inode and chunk index ([`AttrCache::plan`]).
    plans: HashMap<Ino, HashMap<u64, Arc<ChunkPlan>>>,
    /// Items of the plans held ([`plan_items`]), over every inode.
    plan_count: usize,
    /// Bumped whenever plans are forgotten: a plan fetched across a bump is not cached.
    plan_epoch: u64,
    /// Where what the kernel is to drop goes, once asked for ([`AttrCache::kernel_drops`]).
    drops: Option<mpsc::Sender<KernelDrop>>,
    /// What the kernel was let keep for longer: the version it was given at, and until when.
    kernel: HashMap<Key, (Version, Instant)>,
    /// When the kernel's expired items were last swept.
    kernel_swept: Option<Instant>,
    stats: CacheStats,
}

impl State {
    fn clear(&mut self) {
        self.attrs.clear();
        self.names.clear();
        self.recent.clear();
        self.last_change.clear();
        self.dir_change.clear();
        self.complete.clear();
        self.xattrs.clear();
        self.xattr_count = 0;
        self.forget_all_plans();
    }

    /// Drops the extended attributes of `ino` cached at a version before `version`.
    fn forget_xattrs_before(&mut self, ino: Ino, version: Version) {
        if let Some(names) = self.xattrs.get_mut(&ino) {
            let before = names.len();
            names.retain(|_, (_, v)| *v >= version);
            self.xattr_count -= before - names.len();
            if names.is_empty() {
                self.xattrs.remove(&ino);
            }
        }
    }

    fn forget_plans(&mut self, ino: Ino) {
        if let Some(p) = self.plans.remove(&ino) {
            self.plan_count -= p.values().map(|p| plan_items(p)).sum::<usize>();
        }
        self.plan_epoch += 1;
    }

    fn forget_all_plans(&mut self) {
        self.plans.clear();
        self.plan_count = 0;
        self.plan_epoch += 1;
    }

    /// The kernel is to drop `key`: sent if it was let keep it, or if `always`.
    fn drop_from_kernel(&mut self, key: Key, always: bool) {
        let kept = self.kernel.remove(&key).is_some();
        if let (true, Some(tx)) = (kept || always, &self.drops) {
            let d = match key {
                Key::Inode(ino) => KernelDrop::Inode(ino),
                Key::Entry(parent, name) => KernelDrop::Entry(parent, name),
                // The kernel is never let keep extended attributes.
                Key::Xattrs(_) => return,
            };
            if tx.send(d).is_err() {
                // The receiver is gone (the mount ending, or its thread): nothing can be
                // dropped from the kernel any more, so nothing more is let keep longer.
                self.drops = None;
                self.kernel.clear();
            }
        }
    }

    /// A change at `version` was reported for `key`: the kernel drops it if it was given it
    /// at an earlier version.
    fn changed_in_kernel(&mut self, key: Key, version: Version) {
        if self.kernel.get(&key).is_some_and(|&(v, _)| v < version) {
            self.drop_from_kernel(key, false);
        }
    }

    /// The kernel drops everything it was let keep (the feed ended or starts over).
    fn drop_all_from_kernel(&mut self) {
        let keys: Vec<Key> = self.kernel.keys().cloned().collect();
        for key in keys {
            self.drop_from_kernel(key, false);
        }
    }

    /// The version `attr` is cached at, if the cache holds exactly these attributes.
    fn version_of(&self, attr: &Attr) -> Option<Version> {
        self.attrs
            .get(&attr.ino)
            .and_then(|(a, v)| (a == attr).then_some(*v))
    }

    /// Lets the kernel keep `key`, cached at `version`, until `until`, if there is room.
    fn keep_in_kernel(&mut self, key: Key, version: Version, until: Instant) -> bool {
        if self.drops.is_none() || !self.live {
            return false;
        }
        if self.kernel.len() >= KERNEL_KEPT_MAX && !self.kernel.contains_key(&key) {
            let now = Instant::now();
            if self
                .kernel_swept
                .is_none_or(|t| now.duration_since(t) >= KERNEL_SWEEP_INTERVAL)
            {
                self.kernel_swept = Some(now);
                self.kernel.retain(|_, &mut (_, u)| u > now);
            }
            if self.kernel.len() >= KERNEL_KEPT_MAX {
                return false;
            }
        }
        let until = self.kernel.get(&key).map_or(until, |&(_, u)| u.max(until));
        self.kernel.insert(key, (version, until));
        true
    }

    /// A name of complete directory `parent` is no longer known (if the directory is complete).
    fn unknown(&mut self, parent: Ino, name: &Bytes) {
        if let Some(unknown) = self.complete.get_mut(&parent) {
            unknown.insert(name.clone());
            if unknown.len() > UNKNOWN_NAMES_MAX {
                self.complete.remove(&parent);
            }
        }
    }

    /// May a read of `key` answered at `version` be cached?
    fn may_cache(&self, key: &Key, version: Version) -> bool {
        self.live
            && version >= self.floor
            && self.last_change.get(key).is_none_or(|&c| c <= version)
    }

    fn record(&mut self, version: Version, key: Key) {
        self.last_change.insert(key.clone(), version);
        self.recent.push_back((version, key));
    }

    fn answers(&self) -> bool {
        self.live && self.position >= self.seen
    }
}

/// What a plan counts for against [`PLAN_CACHE_ITEMS_MAX`].
fn plan_items(plan: &ChunkPlan) -> usize {
    1 + plan.pieces.len() + plan.files.len()
}

/// The cache; see the module documentation.
#[derive(Debug, Default)]
pub struct AttrCache {
    state: Mutex<State>,
}

impl AttrCache {
    /// An empty cache with no feed.
    pub fn new() -> AttrCache {
        AttrCache::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change below leaves the state consistent before it can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A feed is subscribed: it reports every version after `from`. Starts empty.
    pub fn subscribed(&self, from: Version) {
        let mut s = self.lock();
        s.clear();
        s.drop_all_from_kernel();
        s.live = true;
        s.position = from;
        s.floor = from;
        s.stats.subscriptions += 1;
    }

    /// The feed broke (its link ended, its member left the shard, a view change): nothing
    /// cached answers until a new subscription.
    pub fn broken(&self) {
        let mut s = self.lock();
        s.clear();
        s.drop_all_from_kernel();
        if s.live {
            s.stats.breaks += 1;
        }
        s.live = false;
    }

    /// The feed reports that `version` changed the records of `inodes` and the directory
    /// `entries` (directory, name). A version at or before the position (which a feed never
    /// sends) is ignored.
    pub fn changed(
        &self,
        version: Version,
        inodes: &[Ino],
        entries: &[(Ino, Bytes)],
        xattrs: &[Ino],
    ) {
        let mut s = self.lock();
        if !s.live || version <= s.position {
            return;
        }
        s.position = version;
        for &ino in inodes {
            if s.attrs.get(&ino).is_some_and(|&(_, v)| v < version) {
                s.attrs.remove(&ino);
            }
            // The inode's record changed (its size, mtime, ...): whatever a writer did to its
            // bytes before that, a plan from before may miss.
            s.forget_plans(ino);
            s.changed_in_kernel(Key::Inode(ino), version);
            s.record(version, Key::Inode(ino));
        }
        // A change of the record alone (a write's new size and mtime) leaves the extended
        // attributes as they were: only these drop them.
        for &ino in xattrs {
            s.forget_xattrs_before(ino, version);
            s.record(version, Key::Xattrs(ino));
        }
        for (parent, name) in entries {
            let key = (*parent, name.clone());
            match s.names.get(&key) {
                Some(&(_, v)) if v >= version => {}
                Some(_) => {
                    s.names.remove(&key);
                    s.unknown(*parent, name);
                }
                None => s.unknown(*parent, name),
            }
            s.changed_in_kernel(Key::Entry(*parent, name.clone()), version);
            s.record(version, Key::Entry(*parent, name.clone()));
            s.dir_change.insert(*parent, version);
        }
        while s.recent.len() > RECENT_CHANGES_MAX {
            let Some((v, key)) = s.recent.pop_front() else {
                break;
            };
            s.floor = s.floor.max(v);
            if s.last_change.get(&key) == Some(&v) {
                s.last_change.remove(&key);
            }
            if let Key::Entry(parent, _) = key {
                if s.dir_change.get(&parent) == Some(&v) {
                    s.dir_change.remove(&parent);
                }
            }
        }
    }

    /// The client learnt that `version` exists (a write of its own applied at it, or a read
    /// answered at it): nothing cached answers until the feed has reported it.
    pub fn saw(&self, version: Version) {
        let mut s = self.lock();
        s.seen = s.seen.max(version);
    }

    /// Caches `attr`, read (or written) at `version`, if the rules allow.
    pub fn insert_attr(&self, attr: &Attr, version: Version) {
        let mut s = self.lock();
        if !s.may_cache(&Key::Inode(attr.ino), version) {
            return;
        }
        let full = s.attrs.len() >= ATTR_CACHE_ENTRIES_MAX;
        match s.attrs.get_mut(&attr.ino) {
            Some(e) if e.1 <= version => *e = (attr.clone(), version),
            Some(_) => {}
            None if full => {}
            None => {
                s.attrs.insert(attr.ino, (attr.clone(), version));
            }
        }
    }

    /// Caches that `name` in `parent` named `ino` at `version`, if the rules allow (checked on
    /// the entry).
    pub fn insert_name(&self, parent: Ino, name: &[u8], ino: Ino, version: Version) {
        let name = Bytes::copy_from_slice(name);
        let mut s = self.lock();
        if !s.may_cache(&Key::Entry(parent, name.clone()), version) {
            return;
        }
        let full = s.names.len() >= NAME_CACHE_ENTRIES_MAX;
        match s.names.get_mut(&(parent, name.clone())) {
            Some(e) if e.1 <= version => *e = (ino, version),
            Some(_) => {}
            // Not cached: in a complete directory the name is not known then.
            None if full => s.unknown(parent, &name),
            None => {
                if let Some(unknown) = s.complete.get_mut(&parent) {
                    unknown.remove(&name);
                }
                s.names.insert((parent, name), (ino, version));
            }
        }
    }

    /// `name` did not exist in `parent` at `version` (a negative lookup): in a complete
    /// directory it is known again, if the rules allow.
    pub fn insert_absent(&self, parent: Ino, name: &[u8], version: Version) {
        let name = Bytes::copy_from_slice(name);
        let mut s = self.lock();
        if s.may_cache(&Key::Entry(parent, name.clone()), version)
            && !s.names.contains_key(&(parent, name.clone()))
        {
            if let Some(unknown) = s.complete.get_mut(&parent) {
                unknown.remove(&name);
            }
        }
    }

    /// Directory `dir` was created empty at `version` (a `mkdir` of this client): complete
    /// from then on, if no change of its entries after `version` has streamed past already.
    pub fn insert_empty_dir(&self, dir: Ino, version: Version) {
        let mut s = self.lock();
        let allowed = s.live
            && version >= s.floor
            && s.dir_change.get(&dir).is_none_or(|&c| c <= version)
            && s.complete.len() < COMPLETE_DIRS_MAX;
        if allowed {
            s.complete.entry(dir).or_default();
        }
    }

    /// Whether `name` is known not to exist in `parent` (a complete directory), if the cache
    /// answers now.
    pub fn absent(&self, parent: Ino, name: &[u8]) -> bool {
        let mut s = self.lock();
        if !s.answers() {
            return false;
        }
        let name = Bytes::copy_from_slice(name);
        let absent = s
            .complete
            .get(&parent)
            .is_some_and(|unknown| !unknown.contains(&name))
            && !s.names.contains_key(&(parent, name));
        if absent {
            s.stats.hits += 1;
        }
        absent
    }

    /// Caches extended attribute `name` of `ino` as read at `version`: its value, or `None`
    /// when it was absent (ENODATA), if the rules allow and the value is short enough.
    pub fn insert_xattr(&self, ino: Ino, name: &[u8], value: Option<&Bytes>, version: Version) {
        if value.is_some_and(|v| v.len() > XATTR_CACHE_VALUE_LEN_MAX) {
            return;
        }
        let mut s = self.lock();
        if !s.may_cache(&Key::Xattrs(ino), version) {
            return;
        }
        let full = s.xattr_count >= XATTR_CACHE_ENTRIES_MAX;
        let names = s.xattrs.entry(ino).or_default();
        match names.get_mut(name) {
            Some(e) if e.1 <= version => *e = (value.cloned(), version),
            Some(_) => {}
            None if full => {
                if names.is_empty() {
                    s.xattrs.remove(&ino);
                }
            }
            None => {
                names.insert(Bytes::copy_from_slice(name), (value.cloned(), version));
                s.xattr_count += 1;
            }
        }
    }

    /// Extended attribute `name` of `ino`, if the cache answers now: `Some(None)` when it is
    /// known absent.
    pub fn xattr(&self, ino: Ino, name: &[u8]) -> Option<Option<Bytes>> {
        let mut s = self.lock();
        if !s.answers() {
            return None;
        }
        let (value, _) = s.xattrs.get(&ino)?.get(name)?.clone();
        s.stats.hits += 1;
        Some(value)
    }

    /// Forgets every extended attribute of `ino` (this client is about to change one, or has).
    pub fn forget_xattrs(&self, ino: Ino) {
        self.lock().forget_xattrs_before(ino, Version::MAX);
    }

    /// Forgets `ino`'s attributes (a change of this client whose reply does not carry them).
    pub fn forget_attr(&self, ino: Ino) {
        self.lock().attrs.remove(&ino);
    }

    /// The cached attributes of `ino`, if the cache answers now.
    pub fn attr(&self, ino: Ino) -> Option<Attr> {
        let mut s = self.lock();
        if !s.answers() {
            return None;
        }
        let a = s.attrs.get(&ino).map(|(a, _)| a.clone())?;
        s.stats.hits += 1;
        Some(a)
    }

    /// [`AttrCache::attr`] without counting a hit: for a local read, which counts itself.
    pub fn attr_for_read(&self, ino: Ino) -> Option<Attr> {
        let s = self.lock();
        if !s.answers() {
            return None;
        }
        s.attrs.get(&ino).map(|(a, _)| a.clone())
    }

    /// The attributes of what `name` in `parent` names, if both the name and those attributes
    /// are cached and the cache answers now.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Attr> {
        let mut s = self.lock();
        if !s.answers() {
            return None;
        }
        let &(ino, _) = s.names.get(&(parent, Bytes::copy_from_slice(name)))?;
        let a = s.attrs.get(&ino).map(|(a, _)| a.clone())?;
        s.stats.hits += 1;
        Some(a)
    }

    /// The plan of chunk `index` of `ino` kept for a local read, if the cache answers now.
    pub fn plan(&self, ino: Ino, index: u64) -> Option<Arc<ChunkPlan>> {
        let s = self.lock();
        if !s.answers() {
            return None;
        }
        s.plans.get(&ino)?.get(&index).cloned()
    }

    /// The plans' epoch now: give it back to [`AttrCache::insert_plan`] with a plan fetched
    /// after this call.
    pub fn plan_epoch(&self) -> u64 {
        self.lock().plan_epoch
    }

    /// Keeps `plan` for chunk `index` of `ino`, fetched after [`AttrCache::plan_epoch`] gave
    /// `epoch`: unless plans were forgotten since (a change of the inode reported by the feed,
    /// a write or an open of this client), the feed broke, or the cache is full.
    pub fn insert_plan(&self, ino: Ino, index: u64, plan: Arc<ChunkPlan>, epoch: u64) {
        let mut s = self.lock();
        let items = plan_items(&plan);
        if !s.live || s.plan_epoch != epoch || s.plan_count + items > PLAN_CACHE_ITEMS_MAX {
            return;
        }
        let old = s.plans.entry(ino).or_default().insert(index, plan);
        s.plan_count += items;
        if let Some(old) = old {
            s.plan_count -= plan_items(&old);
        }
    }

    /// Forgets the plans of `ino`: this client is about to change its bytes, has changed them,
    /// or opens it (close-to-open: the open's barrier read starts afresh).
    pub fn forget_plans(&self, ino: Ino) {
        self.lock().forget_plans(ino);
    }

    /// Where, from now on, what the kernel is to drop goes: a mount passes each to the kernel
    /// (`FUSE_NOTIFY_INVAL_INODE`, `FUSE_NOTIFY_INVAL_ENTRY`). Until this is called nothing is
    /// let keep for longer; calling it again starts over (the earlier receiver gets nothing
    /// more).
    pub fn kernel_drops(&self) -> mpsc::Receiver<KernelDrop> {
        let (tx, rx) = mpsc::channel();
        let mut s = self.lock();
        s.kernel.clear();
        s.drops = Some(tx);
        rx
    }

    /// Whether the kernel may keep `attr` until `until`: yes if the cache holds exactly these
    /// attributes of the inode now (whether or not it answers), and the feed will tell — the
    /// kernel drops them when the feed reports a change of the inode after the version they
    /// were cached at, or breaks. No before [`AttrCache::kernel_drops`], while no feed is
    /// subscribed, or past [`KERNEL_KEPT_MAX`].
    pub fn keep_attr_in_kernel(&self, attr: &Attr, until: Instant) -> bool {
        let mut s = self.lock();
        let Some(version) = s.version_of(attr) else {
            return false;
        };
        s.keep_in_kernel(Key::Inode(attr.ino), version, until)
    }

    /// Whether the kernel may keep the entry `name` in `parent`, naming the inode of `attr`,
    /// and `attr`, until `until`: as [`AttrCache::keep_attr_in_kernel`], for both the name and
    /// the attributes (both or neither).
    pub fn keep_entry_in_kernel(
        &self,
        parent: Ino,
        name: &[u8],
        attr: &Attr,
        until: Instant,
    ) -> bool {
        let name = Bytes::copy_from_slice(name);
        let mut s = self.lock();
        let Some(attr_version) = s.version_of(attr) else {
            return false;
        };
        let Some(name_version) = s
            .names
            .get(&(parent, name.clone()))
            .and_then(|&(ino, v)| (ino == attr.ino).then_some(v))
        else {
            return false;
        };
        if !s.keep_in_kernel(Key::Inode(attr.ino), attr_version, until) {
            return false;
        }
        if !s.keep_in_kernel(Key::Entry(parent, name), name_version, until) {
            // The attributes alone are kept; the reply gives both the short lifetime.
            return false;
        }
        true
    }

    /// This client is about to remove the entry `name` in `parent` (an unlink, a rmdir, the
    /// source of a rename) through a kernel that drops its dentry itself as it carries the
    /// change out, holding the directory's lock meanwhile (so it is given no newer dentry of
    /// the name): what it was let keep of the entry needs no drop. If the removal fails, the
    /// caller sends one ([`AttrCache::drop_entry_from_kernel`]).
    pub fn removing_here(&self, parent: Ino, name: &[u8]) {
        let key = Key::Entry(parent, Bytes::copy_from_slice(name));
        self.lock().kernel.remove(&key);
    }

    /// The kernel is to drop the entry `name` in `parent` whatever it was let keep: a rename
    /// of this client moved a dentry there that kept the lifetime it had under its old name.
    pub fn drop_entry_from_kernel(&self, parent: Ino, name: &[u8]) {
        self.lock()
            .drop_from_kernel(Key::Entry(parent, Bytes::copy_from_slice(name)), true);
    }

    /// Counts a read answered from local files.
    pub fn count_local_read(&self) {
        self.lock().stats.local_reads += 1;
    }

    /// Counts a local read that failed (a file missing or not the one named), so that the
    /// read went through a member.
    pub fn count_local_failure(&self) {
        self.lock().stats.local_failures += 1;
    }

    /// Counters and the feed's position.
    pub fn stats(&self) -> CacheStats {
        let s = self.lock();
        CacheStats {
            entries: s.attrs.len() + s.names.len() + s.xattr_count,
            position: s.live.then_some(s.position),
            ..s.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inode::{FileKind, Timespec};

    fn attr(ino: Ino, size: u64) -> Attr {
        let t = Timespec::default();
        Attr {
            ino,
            kind: FileKind::Regular,
            perm: 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            size,
            rdev: 0,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    fn drained(rx: &mpsc::Receiver<KernelDrop>) -> Vec<KernelDrop> {
        rx.try_iter().collect()
    }

    fn entry(parent: Ino, name: &str) -> KernelDrop {
        KernelDrop::Entry(parent, Bytes::copy_from_slice(name.as_bytes()))
    }

    #[test]
    fn the_kernel_keeps_only_attributes_the_cache_holds_as_given_and_drops_them_at_a_later_change()
    {
        let c = AttrCache::new();
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 12);
        // No receiver yet: nothing is kept longer.
        assert!(!c.keep_attr_in_kernel(&attr(5, 1), later()));
        let rx = c.kernel_drops();
        assert!(
            !c.keep_attr_in_kernel(&attr(5, 2), later()),
            "other attributes"
        );
        assert!(!c.keep_attr_in_kernel(&attr(6, 1), later()), "not cached");
        assert!(c.keep_attr_in_kernel(&attr(5, 1), later()));
        // The change that gave them, or one of another inode: nothing to drop.
        c.changed(12, &[5], &[], &[]);
        c.changed(13, &[6], &[], &[]);
        assert_eq!(drained(&rx), vec![]);
        c.changed(14, &[5], &[], &[]);
        assert_eq!(drained(&rx), vec![KernelDrop::Inode(5)]);
        // Dropped once: a later change sends nothing more until the kernel is given them again.
        c.changed(15, &[5], &[], &[]);
        assert_eq!(drained(&rx), vec![]);
        assert!(
            !c.keep_attr_in_kernel(&attr(5, 1), later()),
            "the change dropped them from the cache"
        );
        c.insert_attr(&attr(5, 3), 15);
        assert!(c.keep_attr_in_kernel(&attr(5, 3), later()));
        c.changed(16, &[5], &[], &[]);
        assert_eq!(drained(&rx), vec![KernelDrop::Inode(5)]);
    }

    #[test]
    fn the_kernel_keeps_an_entry_only_with_its_attributes_and_drops_each_at_its_own_change() {
        let c = AttrCache::new();
        let rx = c.kernel_drops();
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 11);
        c.insert_name(1, b"a", 5, 11);
        c.insert_name(1, b"b", 7, 11);
        assert!(
            !c.keep_entry_in_kernel(1, b"b", &attr(5, 1), later()),
            "another inode"
        );
        assert!(
            !c.keep_entry_in_kernel(1, b"c", &attr(5, 1), later()),
            "no such name"
        );
        assert!(
            !c.keep_entry_in_kernel(1, b"a", &attr(5, 2), later()),
            "other attributes"
        );
        assert!(c.keep_entry_in_kernel(1, b"a", &attr(5, 1), later()));
        c.changed(12, &[], &[(1, Bytes::from_static(b"b"))], &[]);
        assert_eq!(drained(&rx), vec![]);
        c.changed(13, &[], &[(1, Bytes::from_static(b"a"))], &[]);
        assert_eq!(drained(&rx), vec![entry(1, "a")]);
        c.changed(14, &[5], &[], &[]);
        assert_eq!(drained(&rx), vec![KernelDrop::Inode(5)]);
    }

    #[test]
    fn a_broken_feed_or_a_new_subscription_drops_everything_the_kernel_was_let_keep() {
        let c = AttrCache::new();
        let rx = c.kernel_drops();
        assert!(!c.keep_attr_in_kernel(&attr(5, 1), later()), "no feed");
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 11);
        c.insert_attr(&attr(6, 1), 11);
        c.insert_name(1, b"a", 6, 11);
        assert!(c.keep_attr_in_kernel(&attr(5, 1), later()));
        assert!(c.keep_entry_in_kernel(1, b"a", &attr(6, 1), later()));
        c.broken();
        let mut got = drained(&rx);
        got.sort_by_key(|d| format!("{d:?}"));
        assert_eq!(
            got,
            vec![entry(1, "a"), KernelDrop::Inode(5), KernelDrop::Inode(6)]
        );
        assert!(!c.keep_attr_in_kernel(&attr(5, 1), later()), "broken");
        c.subscribed(20);
        c.insert_attr(&attr(5, 1), 21);
        assert!(c.keep_attr_in_kernel(&attr(5, 1), later()));
        c.subscribed(30);
        assert_eq!(drained(&rx), vec![KernelDrop::Inode(5)]);
        // A rename's target is dropped whether or not the kernel was let keep it.
        c.drop_entry_from_kernel(2, b"z");
        assert_eq!(drained(&rx), vec![entry(2, "z")]);
    }

    #[test]
    fn an_entry_this_client_removes_needs_no_drop_but_its_inode_does() {
        let c = AttrCache::new();
        let rx = c.kernel_drops();
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 11);
        c.insert_name(1, b"a", 5, 11);
        assert!(c.keep_entry_in_kernel(1, b"a", &attr(5, 1), later()));
        c.removing_here(1, b"a");
        c.changed(12, &[5], &[(1, Bytes::from_static(b"a"))], &[]);
        // The inode's attributes may still be held (another link, an open file): dropped.
        assert_eq!(drained(&rx), vec![KernelDrop::Inode(5)]);
        // Given again later (the name made again): its next change drops it.
        c.insert_attr(&attr(6, 1), 14);
        c.insert_name(1, b"a", 6, 14);
        assert!(c.keep_entry_in_kernel(1, b"a", &attr(6, 1), later()));
        c.changed(15, &[], &[(1, Bytes::from_static(b"a"))], &[]);
        assert_eq!(drained(&rx), vec![entry(1, "a")]);
    }

    #[test]
    fn once_the_receiver_is_gone_nothing_more_is_let_keep_longer() {
        let c = AttrCache::new();
        let rx = c.kernel_drops();
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 11);
        c.insert_attr(&attr(6, 1), 11);
        assert!(c.keep_attr_in_kernel(&attr(5, 1), later()));
        drop(rx);
        c.changed(12, &[5], &[], &[]);
        assert!(!c.keep_attr_in_kernel(&attr(6, 1), later()));
    }

    #[test]
    fn past_its_bound_the_kernel_is_let_keep_nothing_more_until_what_it_kept_expires() {
        let c = AttrCache::new();
        let _rx = c.kernel_drops();
        c.subscribed(10);
        let n = KERNEL_KEPT_MAX / 2;
        for i in 0..n as u64 {
            c.insert_attr(&attr(100 + i, 1), 11);
            c.insert_name(1, &i.to_le_bytes(), 100 + i, 11);
            assert!(c.keep_entry_in_kernel(1, &i.to_le_bytes(), &attr(100 + i, 1), later()));
        }
        c.insert_attr(&attr(5, 1), 11);
        assert!(!c.keep_attr_in_kernel(&attr(5, 1), later()), "full");
        // What is kept already may be kept again.
        assert!(c.keep_attr_in_kernel(&attr(100, 1), later()));
        // Items given until now expire at once and are swept to make room.
        let d = AttrCache::new();
        let _rx = d.kernel_drops();
        d.subscribed(10);
        for i in 0..n as u64 {
            d.insert_attr(&attr(100 + i, 1), 11);
            d.insert_name(1, &i.to_le_bytes(), 100 + i, 11);
            assert!(d.keep_entry_in_kernel(1, &i.to_le_bytes(), &attr(100 + i, 1), Instant::now()));
        }
        d.insert_attr(&attr(5, 1), 11);
        assert!(d.keep_attr_in_kernel(&attr(5, 1), later()), "swept");
    }

    fn a_plan(len: u32) -> Arc<ChunkPlan> {
        Arc::new(ChunkPlan {
            len,
            files: Vec::new(),
            pieces: Vec::new(),
        })
    }

    #[test]
    fn plans_are_dropped_by_a_reported_change_a_forget_or_a_break_and_one_fetched_across_a_drop_is_not_kept(
    ) {
        let c = AttrCache::new();
        let epoch = c.plan_epoch();
        c.insert_plan(5, 0, a_plan(1), epoch);
        assert_eq!(c.plan(5, 0), None, "no feed: nothing is kept");
        c.subscribed(10);
        let epoch = c.plan_epoch();
        c.insert_plan(5, 0, a_plan(1), epoch);
        c.insert_plan(5, 1, a_plan(2), epoch);
        c.insert_plan(6, 0, a_plan(3), epoch);
        assert_eq!(c.plan(5, 1), Some(a_plan(2)));
        c.saw(11);
        assert_eq!(c.plan(5, 1), None, "the feed is behind what the client saw");
        c.changed(11, &[5], &[], &[]);
        assert_eq!(c.plan(5, 0), None, "a change of inode 5 drops its plans");
        assert_eq!(c.plan(5, 1), None);
        assert_eq!(c.plan(6, 0), Some(a_plan(3)), "inode 6's stay");
        // A plan fetched before a drop (any inode's) is refused; one fetched after is kept.
        let before = c.plan_epoch();
        c.forget_plans(9);
        c.insert_plan(5, 0, a_plan(4), before);
        assert_eq!(c.plan(5, 0), None);
        c.insert_plan(5, 0, a_plan(4), c.plan_epoch());
        assert_eq!(c.plan(5, 0), Some(a_plan(4)));
        c.forget_plans(5);
        assert_eq!(c.plan(5, 0), None, "this client's write or open drops them");
        c.broken();
        c.subscribed(20);
        assert_eq!(c.plan(6, 0), None, "a broken feed drops every plan");
    }

    #[test]
    fn nothing_answers_without_a_feed_and_a_broken_feed_clears_everything() {
        let c = AttrCache::new();
        c.insert_attr(&attr(5, 1), 10);
        assert_eq!(c.attr(5), None, "no feed: nothing is cached");
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 10);
        c.insert_name(1, b"f", 5, 10);
        assert_eq!(c.attr(5), Some(attr(5, 1)));
        assert_eq!(c.lookup(1, b"f"), Some(attr(5, 1)));
        c.broken();
        assert_eq!(c.attr(5), None);
        assert_eq!(c.lookup(1, b"f"), None);
        assert_eq!(c.stats().entries, 0);
        c.subscribed(12);
        assert_eq!(c.attr(5), None, "a new subscription starts empty");
        assert_eq!(c.stats().breaks, 1);
        assert_eq!(c.stats().subscriptions, 2);
    }

    #[test]
    fn a_change_reported_after_the_read_drops_the_entry_and_one_at_or_before_it_does_not() {
        let c = AttrCache::new();
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 12);
        c.insert_attr(&attr(6, 1), 12);
        c.saw(12);
        assert_eq!(c.attr(5), None, "the feed has not reached version 12 yet");
        c.changed(11, &[5], &[], &[]);
        c.changed(12, &[6], &[], &[]);
        assert_eq!(c.attr(5), Some(attr(5, 1)), "11 is in the state read at 12");
        assert_eq!(c.attr(6), Some(attr(6, 1)), "12 is the state read");
        c.changed(13, &[5], &[], &[]);
        assert_eq!(c.attr(5), None);
        assert_eq!(c.attr(6), Some(attr(6, 1)));
    }

    #[test]
    fn a_read_answered_before_a_change_that_already_streamed_past_is_not_cached() {
        let c = AttrCache::new();
        c.subscribed(10);
        c.changed(11, &[5], &[], &[]);
        c.changed(12, &[7], &[], &[]);
        // A lagging replica answered at 10, before the change of 5 at 11.
        c.insert_attr(&attr(5, 1), 10);
        assert_eq!(c.attr(5), None);
        // 7 did not change between 11 and 12... but it did at 12: a read at 11 is refused,
        // one at 12 is kept.
        c.insert_attr(&attr(7, 1), 11);
        assert_eq!(c.attr(7), None);
        c.insert_attr(&attr(7, 2), 12);
        assert_eq!(c.attr(7), Some(attr(7, 2)));
        // An inode with no change since the subscription: any read from `from` on is kept.
        c.insert_attr(&attr(8, 1), 10);
        assert_eq!(c.attr(8), Some(attr(8, 1)));
        // Before the subscription's `from`: unknown changes may lie between; refused.
        c.insert_attr(&attr(9, 1), 9);
        assert_eq!(c.attr(9), None);
    }

    #[test]
    fn forgotten_changes_raise_the_floor_below_which_nothing_is_cached() {
        let c = AttrCache::new();
        c.subscribed(0);
        for v in 1..=(RECENT_CHANGES_MAX as u64 + 10) {
            c.changed(v, &[1000 + v], &[], &[]);
        }
        // The changes of versions 1..=10 are forgotten: a read at 5 of any inode is refused
        // (it could be older than a forgotten change), one at 10 of an inode unchanged since is
        // kept.
        c.insert_attr(&attr(5, 1), 5);
        assert_eq!(c.attr(5), None);
        c.insert_attr(&attr(5, 1), 10);
        assert_eq!(c.attr(5), Some(attr(5, 1)));
        let last = RECENT_CHANGES_MAX as u64 + 10;
        c.insert_attr(&attr(1000 + last, 1), last - 1);
        assert_eq!(
            c.attr(1000 + last),
            None,
            "still remembered: changed at {last}"
        );
    }

    #[test]
    fn nothing_answers_until_the_feed_reports_every_version_the_client_saw() {
        let c = AttrCache::new();
        c.subscribed(10);
        c.insert_attr(&attr(5, 1), 10);
        assert_eq!(c.attr(5), Some(attr(5, 1)));
        // This client's own write at 14 (or a read answered at 14): the feed must get there.
        c.saw(14);
        assert_eq!(c.attr(5), None);
        c.changed(13, &[], &[], &[]);
        assert_eq!(c.attr(5), None);
        c.changed(14, &[6], &[], &[]);
        assert_eq!(c.attr(5), Some(attr(5, 1)));
    }

    #[test]
    fn a_name_is_dropped_when_its_entry_changes_not_when_others_in_its_directory_do_and_a_newer_entry_is_never_replaced_by_an_older(
    ) {
        let c = AttrCache::new();
        c.subscribed(10);
        c.insert_attr(&attr(5, 3), 12);
        c.insert_attr(&attr(5, 2), 11);
        c.insert_name(1, b"f", 5, 11);
        c.saw(12);
        c.changed(12, &[1], &[(1, Bytes::from_static(b"g"))], &[]);
        assert_eq!(c.attr(5), Some(attr(5, 3)), "the newer attributes stay");
        assert_eq!(
            c.lookup(1, b"f"),
            Some(attr(5, 3)),
            "another name of the directory changed"
        );
        c.changed(13, &[1], &[(1, Bytes::from_static(b"f"))], &[]);
        assert_eq!(
            c.lookup(1, b"f"),
            None,
            "the entry changed after it was read"
        );
        assert_eq!(c.attr(5), Some(attr(5, 3)));
        c.insert_name(1, b"f", 5, 12);
        assert_eq!(
            c.lookup(1, b"f"),
            None,
            "read before the entry's change at 13"
        );
        c.insert_name(1, b"f", 5, 13);
        assert_eq!(c.lookup(1, b"f"), Some(attr(5, 3)));
        c.forget_attr(5);
        assert_eq!(
            c.lookup(1, b"f"),
            None,
            "a name answers only with its attributes"
        );
        assert_eq!(c.stats().entries, 1);
    }

    fn name(n: &str) -> (Ino, Bytes) {
        (7, Bytes::copy_from_slice(n.as_bytes()))
    }

    #[test]
    fn a_directory_created_here_answers_negative_lookups_until_a_name_changes_without_being_cached()
    {
        let c = AttrCache::new();
        c.subscribed(10);
        assert!(!c.absent(7, b"a"), "not complete");
        c.insert_empty_dir(7, 11);
        c.saw(11);
        assert!(!c.absent(7, b"a"), "the feed has not reached the mkdir");
        c.changed(11, &[1, 7], &[(1, Bytes::from_static(b"d"))], &[]);
        assert!(c.absent(7, b"a"));
        // This client creates "a" at 12 (reply before the feed's report), another client "b"
        // at 13.
        c.insert_attr(&attr(20, 0), 12);
        c.insert_name(7, b"a", 20, 12);
        c.saw(12);
        c.changed(12, &[7, 20], &[name("a")], &[]);
        c.changed(13, &[7, 21], &[name("b")], &[]);
        assert_eq!(c.lookup(7, b"a"), Some(attr(20, 0)));
        assert!(!c.absent(7, b"a"), "it exists");
        assert!(!c.absent(7, b"b"), "changed elsewhere: unknown");
        assert!(c.absent(7, b"c"));
        // A lookup of "b" read at 13 makes it known again.
        c.insert_attr(&attr(21, 0), 13);
        c.insert_name(7, b"b", 21, 13);
        assert_eq!(c.lookup(7, b"b"), Some(attr(21, 0)));
        // "a" removed at 14: unknown until a negative lookup read at 14 or later.
        c.changed(14, &[7, 20], &[name("a")], &[]);
        assert_eq!(c.lookup(7, b"a"), None);
        assert!(!c.absent(7, b"a"));
        c.insert_absent(7, b"a", 13);
        assert!(!c.absent(7, b"a"), "read before the removal");
        c.insert_absent(7, b"a", 14);
        assert!(c.absent(7, b"a"));
        // The feed reports the change before this client's own reply is handled.
        c.changed(15, &[7, 22], &[name("e")], &[]);
        assert!(!c.absent(7, b"e"));
        c.insert_attr(&attr(22, 0), 15);
        c.insert_name(7, b"e", 22, 15);
        assert_eq!(c.lookup(7, b"e"), Some(attr(22, 0)));
        c.broken();
        c.subscribed(16);
        assert!(!c.absent(7, b"c"), "a new feed: nothing is complete");
    }

    #[test]
    fn a_directory_whose_entries_changed_after_its_creation_was_read_is_not_complete() {
        let c = AttrCache::new();
        c.subscribed(10);
        c.changed(11, &[7], &[], &[]);
        c.changed(12, &[7, 30], &[name("x")], &[]);
        // The mkdir reply at 11 is handled after the feed reported "x" created at 12.
        c.insert_empty_dir(7, 11);
        assert!(!c.absent(7, b"x"));
        assert!(!c.absent(7, b"y"), "not complete at all");
        // Too many unknown names: no longer complete.
        c.insert_empty_dir(8, 12);
        assert!(c.absent(8, b"y"));
        for i in 0..=UNKNOWN_NAMES_MAX {
            c.changed(
                13 + i as u64,
                &[],
                &[(8, Bytes::from(format!("n{i}")))],
                &[],
            );
        }
        assert!(!c.absent(8, b"y"));
    }

    #[test]
    fn an_extended_attribute_or_its_absence_answers_until_a_later_change_of_the_inodes_attributes()
    {
        let c = AttrCache::new();
        let cap = b"security.capability";
        c.insert_xattr(5, cap, None, 11);
        assert_eq!(c.xattr(5, cap), None, "no feed: nothing cached");
        c.subscribed(10);
        c.insert_xattr(5, cap, None, 11);
        c.insert_xattr(5, b"user.a", Some(&Bytes::from_static(b"1")), 11);
        c.insert_xattr(6, b"user.a", Some(&Bytes::from_static(b"2")), 11);
        assert_eq!(c.xattr(5, cap), Some(None));
        assert_eq!(c.xattr(5, b"user.a"), Some(Some(Bytes::from_static(b"1"))));
        assert_eq!(c.xattr(5, b"user.b"), None, "never read");
        assert_eq!(c.stats().entries, 3);
        // The change the reads saw, and one of another inode, drop nothing.
        c.changed(11, &[5], &[], &[5]);
        c.changed(12, &[6], &[], &[6]);
        assert_eq!(c.xattr(5, cap), Some(None));
        assert_eq!(
            c.xattr(6, b"user.a"),
            None,
            "inode 6's attributes changed after the read"
        );
        // A later change of the record alone (a write's size and mtime) keeps them.
        c.changed(13, &[5], &[], &[]);
        assert_eq!(c.xattr(5, cap), Some(None));
        assert_eq!(c.xattr(5, b"user.a"), Some(Some(Bytes::from_static(b"1"))));
        // A later change of any of them (with the record's ctime) drops them all.
        c.changed(14, &[5], &[], &[5]);
        assert_eq!(c.xattr(5, cap), None);
        assert_eq!(c.xattr(5, b"user.a"), None);
        assert_eq!(c.stats().entries, 0);
        // A read answered before a change of the attributes that has already streamed past
        // is not kept; one answered before a change of the record alone is.
        c.insert_xattr(5, cap, None, 13);
        assert_eq!(c.xattr(5, cap), None);
        c.changed(15, &[5], &[], &[]);
        c.insert_xattr(5, cap, None, 14);
        assert_eq!(c.xattr(5, cap), Some(None));
        // A version this client knows of and the feed has not reported: no answer until it has.
        c.saw(16);
        assert_eq!(c.xattr(5, cap), None);
        c.changed(16, &[7], &[], &[]);
        assert_eq!(c.xattr(5, cap), Some(None));
        // This client's own change of an attribute forgets the inode's at once.
        c.forget_xattrs(5);
        assert_eq!(c.xattr(5, cap), None);
        assert_eq!(c.stats().entries, 0);
    }

    #[test]
    fn extended_attributes_are_bounded_in_length_and_number_and_a_broken_feed_drops_them() {
        let c = AttrCache::new();
        c.subscribed(10);
        let long = Bytes::from(vec![b'x'; XATTR_CACHE_VALUE_LEN_MAX + 1]);
        let short = Bytes::from(vec![b'x'; XATTR_CACHE_VALUE_LEN_MAX]);
        c.insert_xattr(5, b"user.long", Some(&long), 11);
        c.insert_xattr(5, b"user.short", Some(&short), 11);
        assert_eq!(c.xattr(5, b"user.long"), None);
        assert_eq!(c.xattr(5, b"user.short"), Some(Some(short)));
        for ino in 0..XATTR_CACHE_ENTRIES_MAX as u64 + 10 {
            c.insert_xattr(100 + ino, b"user.a", None, 11);
        }
        assert_eq!(c.stats().entries, XATTR_CACHE_ENTRIES_MAX);
        // Full: a newer read of a cached one still replaces it.
        c.insert_xattr(5, b"user.short", None, 12);
        assert_eq!(c.xattr(5, b"user.short"), Some(None));
        c.broken();
        assert_eq!(c.stats().entries, 0);
        c.subscribed(20);
        assert_eq!(c.xattr(5, b"user.short"), None);
    }
}
