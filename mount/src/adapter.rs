//! The FUSE adapter of DerechoFS: every kernel request is one call of
//! [`derechofs_fs::FileSystem`], its result translated into the reply (attributes into
//! `FileAttr`, `FsError::errno` into the error). No file system logic lives here; what the
//! adapter adds is only what the kernel protocol needs and the facade has no notion of:
//!
//! - cache lifetimes: snapshot inodes (which can never change) for [`SNAPSHOT_TTL`]; live
//!   entries and attributes of files that the client's cache holds as given, for [`KEPT_TTL`],
//!   dropped from the kernel when the cache's feed reports a change of them or ends (a thread
//!   passes each [`KernelDrop`] to the kernel); other live entries and attributes, and every
//!   directory's, for [`LIVE_TTL`];
//! - directory handles: the kernel resumes a listing by offset, the facade by the last name;
//!   a handle keeps the entries returned so far so offsets stay valid, and adds `.` and `..`;
//! - open files: the facade has no open state, so handles are 0; opening a snapshot inode for
//!   writing is refused with EROFS up front rather than at the first write; opening a live
//!   inode reads its attributes behind a barrier (`FileSystem::open`, close-to-open) and tells
//!   the kernel to drop its cached attributes when they differ from those it was last given;
//! - writes: each goes into the file system's write-back buffer for the file
//!   (`FileSystem::write_buffered_then`: the reply goes out once the write is accepted, and a
//!   buffer it filled is sent afterwards on the same worker, so with more than one worker the
//!   next writes overlap its sending); `flush` (every close) and `release` send it
//!   (`FileSystem::flush`), and report an error of an earlier deferred send; `fsync` sends every
//!   buffered write and waits until the client's writes are durable (`FileSystem::fsync_file`:
//!   on a cluster, on every replica); `fsyncdir` likewise (`FileSystem::fsync`). The kernel's
//!   writeback cache mode is not requested: every write reaches this adapter in order.
//!
//! Permissions are checked by the kernel from the attributes (`default_permissions`, always on
//! for DerechoFS mounts); the facade is told the caller's uid and gid for the files it creates.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use derechofs_fs::attr_cache::KernelDrop;
use derechofs_fs::snapshot::is_snapshot;
use derechofs_fs::AttrCache;
use derechofs_fs::{
    Attr, Creds, Fallocate, FileKind, FileSystem, FsError, SetAttr, SetTime, Shards, Timespec,
};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenAccMode, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

/// How long the kernel may trust a live entry or attributes before asking again. Other clients'
/// changes become visible after at most this long (close-to-open, DESIGN §4).
pub const LIVE_TTL: Duration = Duration::from_secs(1);
/// How long the kernel may trust a live entry or attributes of a file (not a directory) that
/// the client's attribute cache holds as given: the cache's feed reporting a change of them, or
/// ending, makes the kernel drop them sooner (`AttrCache::keep_attr_in_kernel`). A directory's
/// attributes change with every entry made in it, and the kernel drops them itself after each
/// change of this client; they keep [`LIVE_TTL`].
pub const KEPT_TTL: Duration = Duration::from_secs(60);
/// How much longer than the kernel's lifetime the cache remembers what the kernel was let keep
/// (the kernel counts from when it takes the reply, a little after it was made).
const KEPT_MARGIN: Duration = Duration::from_secs(1);
/// How long the kernel may trust a snapshot entry or attributes: a snapshot never changes.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Entries one directory read asks the file system for.
const READDIR_BATCH: usize = 512;
/// Most entries a directory handle keeps (a listing longer than this fails with EOVERFLOW
/// rather than growing without bound).
const DIR_HANDLE_ENTRIES_MAX: usize = 10_000_000;
/// Most directory handles open at once.
const DIR_HANDLES_MAX: usize = 65_536;
/// Most inodes whose attributes, as last given to the kernel, the adapter remembers (to tell at
/// an open whether the kernel may hold older ones); past it the memory starts over, and an
/// inode not remembered has its kernel attributes dropped at its next open.
const KERNEL_ATTRS_MAX: usize = 65_536;

/// What an open compares between the attributes the kernel was last given and fresh ones.
type KernelAttrs = (u64, Timespec, Timespec);

/// The lifetime of what the kernel is given of `ino` when it is not let keep it longer.
fn ttl(ino: u64) -> Duration {
    if is_snapshot(ino) {
        SNAPSHOT_TTL
    } else {
        LIVE_TTL
    }
}

/// Passes what the kernel is to drop, until the cache that sends it is gone: an inode's
/// attributes at once (the kernel takes no lock for that), an entry through `entries`, another
/// thread's queue (the kernel takes the directory's lock for it, which a request in that
/// directory holds while the cluster answers: seconds during a view change, which must not hold
/// back the drops of other inodes).
fn pass_drops(
    drops: mpsc::Receiver<KernelDrop>,
    entries: &mpsc::Sender<(u64, Bytes)>,
    notifier: &fuser::Notifier,
) {
    for d in drops {
        match d {
            // Attributes only (offset -1): the page cache is dropped at the next open.
            KernelDrop::Inode(ino) => {
                if let Err(e) = notifier.inval_inode(INodeNo(ino), -1, 0) {
                    tracing::debug!("telling the kernel to drop the attributes of {ino}: {e}");
                }
            }
            KernelDrop::Entry(parent, name) => {
                if let Err(mpsc::SendError((parent, name))) = entries.send((parent, name)) {
                    // The entries' thread is gone: drop it here (it may wait for the lock).
                    drop_entry(notifier, parent, &name);
                }
            }
        }
    }
}

/// Passes the entries the kernel is to drop, until `pass_drops` ends.
fn pass_entry_drops(entries: mpsc::Receiver<(u64, Bytes)>, notifier: &fuser::Notifier) {
    for (parent, name) in entries {
        drop_entry(notifier, parent, &name);
    }
}

/// Tells the kernel to drop the entry `name` in `parent`.
fn drop_entry(notifier: &fuser::Notifier, parent: u64, name: &[u8]) {
    if let Err(e) = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(name)) {
        tracing::debug!(
            "telling the kernel to drop {:?} in {parent}: {e}",
            String::from_utf8_lossy(name)
        );
    }
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno)
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

fn system_time(t: Timespec) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + Duration::new(0, t.nanos)
    }
}

fn timespec(t: SystemTime) -> Timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timespec {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos(),
        },
        Err(e) => {
            let d = e.duration();
            // Saturates: a time further before the epoch than an i64 of seconds is clamped.
            let secs = i64::try_from(d.as_secs()).map_or(i64::MIN, |s| -s);
            let (mut secs, mut nanos) = (secs, d.subsec_nanos());
            if nanos > 0 {
                secs = secs.saturating_sub(1);
                nanos = 1_000_000_000 - nanos;
            }
            Timespec { secs, nanos }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timespec(t)),
    })
}

/// The kernel's attributes of an inode.
pub fn file_attr(a: &Attr, block_size: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.crtime),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: block_size,
        flags: 0,
    }
}

fn creds(req: &Request) -> Creds {
    Creds {
        uid: req.uid(),
        gid: req.gid(),
    }
}

/// One entry of a directory listing as the kernel gets it.
#[derive(Debug)]
struct Listed {
    name: Vec<u8>,
    ino: u64,
    kind: FileType,
}

/// An open directory: the entries listed so far, and whether the file system has more.
#[derive(Debug)]
struct DirHandle {
    ino: u64,
    entries: Vec<Listed>,
    more: bool,
}

/// DerechoFS as a fuser file system.
#[derive(Debug)]
pub struct DerechoFs<S: Shards> {
    fs: Arc<FileSystem<S>>,
    dirs: Mutex<HashMap<u64, DirHandle>>,
    next_fh: AtomicU64,
    /// The session's notifier, once mounted ([`DerechoFs::on_mounted`]).
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// Per live inode, the size, mtime and ctime last given to the kernel.
    kernel_attrs: Mutex<HashMap<u64, KernelAttrs>>,
}

impl<S: Shards> DerechoFs<S> {
    /// The adapter over a file system.
    pub fn new(fs: FileSystem<S>) -> DerechoFs<S> {
        DerechoFs {
            fs: Arc::new(fs),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            notifier: Arc::new(OnceLock::new()),
            kernel_attrs: Mutex::new(HashMap::new()),
        }
    }

    /// What the mount runs once mounted (`serve`'s `on_mounted`), with the session's notifier:
    /// keeps it for opens (without it an open cannot make the kernel drop attributes it
    /// caches), and, if the client keeps an attribute cache, starts the thread that passes the
    /// cache's [`KernelDrop`]s to the kernel. Only from then on is the kernel let keep entries
    /// and attributes for [`KEPT_TTL`].
    pub fn on_mounted(&self) -> impl FnOnce(fuser::Notifier) + Send + 'static
    where
        S: 'static,
    {
        let slot = self.notifier.clone();
        let fs: Weak<FileSystem<S>> = Arc::downgrade(&self.fs);
        move |n| {
            if fs
                .upgrade()
                .is_some_and(|fs| fs.shards().attr_cache().is_some())
            {
                let (entries, entry_drops) = mpsc::channel();
                let notifier = n.clone();
                let started = std::thread::Builder::new()
                    .name("kernel-entries".into())
                    .spawn(move || pass_entry_drops(entry_drops, &notifier))
                    .and_then(|_| {
                        let notifier = n.clone();
                        std::thread::Builder::new()
                            .name("kernel-drops".into())
                            .spawn(move || {
                                // Asked for here, so that nothing is kept longer unless both
                                // threads run; the file system is not held (the drops end with
                                // it, and the entries' thread with this one).
                                let drops = fs.upgrade().and_then(|fs| {
                                    fs.shards().attr_cache().map(|c| c.kernel_drops())
                                });
                                if let Some(drops) = drops {
                                    pass_drops(drops, &entries, &notifier);
                                }
                            })
                    });
                if let Err(e) = started {
                    tracing::warn!(
                        "no thread to pass the feed's changes to the kernel ({e}): it keeps \
                         live entries and attributes for {LIVE_TTL:?} only"
                    );
                }
            }
            // Set once, here: the slot is new.
            let _ = slot.set(n);
        }
    }

    /// The lifetime of `a` as the kernel is given it now, outside an entry.
    fn attr_ttl(&self, a: &Attr) -> Duration {
        self.kept_or_ttl(a, |c, until| c.keep_attr_in_kernel(a, until))
    }

    /// The lifetime of the entry `name` in `parent` and of its attributes `a`.
    fn entry_ttl(&self, parent: u64, name: &[u8], a: &Attr) -> Duration {
        self.kept_or_ttl(a, |c, until| c.keep_entry_in_kernel(parent, name, a, until))
    }

    /// [`KEPT_TTL`] for a live file's `a` if the client's cache lets the kernel keep it
    /// (`keep`), else [`ttl`].
    fn kept_or_ttl(&self, a: &Attr, keep: impl FnOnce(&AttrCache, Instant) -> bool) -> Duration {
        if is_snapshot(a.ino) || a.kind == FileKind::Directory {
            return ttl(a.ino);
        }
        match self.fs.shards().attr_cache() {
            Some(c) if keep(c, Instant::now() + KEPT_TTL + KEPT_MARGIN) => KEPT_TTL,
            _ => LIVE_TTL,
        }
    }

    /// Remembers the attributes given to the kernel for a live inode.
    fn given(&self, a: &Attr) {
        if is_snapshot(a.ino) {
            return;
        }
        let mut given = self.kernel_attrs.lock().unwrap_or_else(|p| p.into_inner());
        if given.len() >= KERNEL_ATTRS_MAX && !given.contains_key(&a.ino) {
            given.clear();
        }
        given.insert(a.ino, (a.size, a.mtime, a.ctime));
    }

    /// The file system underneath.
    pub fn fs(&self) -> &FileSystem<S> {
        &self.fs
    }

    fn dirs(&self) -> MutexGuard<'_, HashMap<u64, DirHandle>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        self.given(a);
        file_attr(a, self.fs.layout().chunk_size)
    }

    fn entry(&self, reply: ReplyEntry, parent: INodeNo, name: &OsStr, r: Result<Attr, FsError>) {
        match r {
            Ok(a) => reply.entry(
                &self.entry_ttl(parent.0, name.as_bytes(), &a),
                &self.attr(&a),
                Generation(0),
            ),
            Err(e) => {
                tracing::debug!("entry: {e}");
                reply.error(errno(&e))
            }
        }
    }

    fn empty(reply: ReplyEmpty, r: Result<(), FsError>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::debug!("{e}");
                reply.error(errno(&e))
            }
        }
    }

    /// Makes sure the handle holds entry `index` (counting `.` and `..`) if the directory has it.
    fn fill(&self, dir: &mut DirHandle, index: usize) -> Result<(), FsError> {
        while dir.more && dir.entries.len() <= index {
            let after = dir
                .entries
                .last()
                .filter(|_| dir.entries.len() > 2)
                .map(|e| e.name.clone());
            let (entries, more) = self.fs.readdir(dir.ino, after.as_deref(), READDIR_BATCH)?;
            if dir.entries.len() + entries.len() > DIR_HANDLE_ENTRIES_MAX {
                return Err(FsError::new(
                    libc_eoverflow(),
                    "directory listing longer than a handle holds",
                ));
            }
            dir.more = more && !entries.is_empty();
            dir.entries.extend(entries.into_iter().map(|e| Listed {
                name: e.name.to_vec(),
                ino: e.ino,
                kind: kind(e.kind),
            }));
        }
        Ok(())
    }
}

fn libc_eoverflow() -> i32 {
    Errno::EOVERFLOW.code()
}

impl<S: Shards + 'static> fuser::Filesystem for DerechoFs<S> {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(
            reply,
            parent,
            name,
            self.fs.lookup(parent.0, name.as_bytes()),
        );
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&self.attr_ttl(&a), &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        match self.fs.setattr(ino.0, set) {
            Ok(a) => reply.attr(&self.attr_ttl(&a), &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = match FileKind::from_mode(mode) {
            Some(k) => self.fs.mknod(
                parent.0,
                name.as_bytes(),
                k,
                (mode & 0o7777) as u16,
                rdev,
                creds(req),
            ),
            None => Err(FsError::new(
                Errno::EINVAL.code(),
                "mknod of an unknown kind",
            )),
        };
        self.entry(reply, parent, name, r);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.fs.mkdir(
            parent.0,
            name.as_bytes(),
            (mode & 0o7777) as u16,
            creds(req),
        );
        self.entry(reply, parent, name, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.unlink(parent.0, name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.rmdir(parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.fs.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            creds(req),
        );
        self.entry(reply, parent, link_name, r);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        if r.is_ok() {
            // The kernel moved its dentry (or, exchanging, both) with the lifetime it had under
            // the other name, which the cache does not know it by.
            if let Some(c) = self.fs.shards().attr_cache() {
                c.drop_entry_from_kernel(newparent.0, newname.as_bytes());
                if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    c.drop_entry_from_kernel(parent.0, name.as_bytes());
                }
            }
        }
        Self::empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.fs.link(ino.0, newparent.0, newname.as_bytes());
        self.entry(reply, newparent, newname, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if is_snapshot(ino.0) && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // A snapshot's bytes never change: let the kernel keep its page cache across opens.
        if is_snapshot(ino.0) {
            return reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
        // Close-to-open: the attributes as they are once every change made before this open is
        // in (`FileSystem::open`). Without FOPEN_KEEP_CACHE the kernel drops the file's pages
        // itself; its cached attributes (the size a read stops at, what `stat` shows) it drops
        // when told, if they may differ. Only the attributes (offset -1): dropping pages from
        // inside a handler can wait on a page lock a pending request holds, attributes cannot.
        let fresh = match self.fs.open(ino.0) {
            Ok(a) => a,
            Err(e) => return reply.error(errno(&e)),
        };
        let known = {
            let given = self.kernel_attrs.lock().unwrap_or_else(|p| p.into_inner());
            given.get(&ino.0).copied()
        };
        if known != Some((fresh.size, fresh.mtime, fresh.ctime)) {
            if let Some(notifier) = self.notifier.get() {
                // ENOENT: the kernel holds nothing of the inode; nothing to drop.
                if let Err(e) = notifier.inval_inode(ino, -1, 0) {
                    tracing::debug!("dropping the kernel's attributes of {}: {e}", ino.0);
                }
            }
            self.given(&fresh);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(ino.0, offset, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        // The reply goes out as soon as the write is accepted; a buffer it filled is sent
        // afterwards on this worker while the next writes come in on the others.
        let len = data.len() as u32;
        self.fs
            .write_buffered_then(ino.0, offset, data, |r| match r {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno(&e)),
            });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Close: the buffered writes go out, data before the size (close-to-open).
        Self::empty(reply, self.fs.flush(ino.0));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.flush(ino.0));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Buffered writes go out; then wait until they are durable on every replica.
        Self::empty(reply, self.fs.fsync_file(ino.0));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        const KEEP_SIZE: i32 = rustix::fs::FallocateFlags::KEEP_SIZE.bits() as i32;
        const PUNCH_HOLE: i32 = rustix::fs::FallocateFlags::PUNCH_HOLE.bits() as i32;
        let mode = match mode {
            0 => Fallocate::Allocate,
            KEEP_SIZE => Fallocate::KeepSize,
            m if m == PUNCH_HOLE | KEEP_SIZE => Fallocate::PunchHole,
            // Collapse, insert, zero range, unshare: not supported (docs/SEMANTICS.md).
            _ => return reply.error(Errno::EOPNOTSUPP),
        };
        Self::empty(
            reply,
            self.fs.fallocate(ino.0, mode, offset, length).map(drop),
        );
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The directory must exist and be one.
        match self.fs.getattr(ino.0) {
            Ok(a) if a.kind == FileKind::Directory => {}
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(errno(&e)),
        }
        let mut dirs = self.dirs();
        if dirs.len() >= DIR_HANDLES_MAX {
            return reply.error(Errno::EMFILE);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let dot = |name: &[u8]| Listed {
            name: name.to_vec(),
            ino: ino.0,
            kind: FileType::Directory,
        };
        dirs.insert(
            fh,
            DirHandle {
                ino: ino.0,
                entries: vec![dot(b"."), dot(b"..")],
                more: true,
            },
        );
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Some(mut dir) = self.dirs().remove(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        let start = offset as usize;
        let mut index = start;
        let result = loop {
            if let Err(e) = self.fill(&mut dir, index) {
                break Err(e);
            }
            let Some(e) = dir.entries.get(index) else {
                break Ok(());
            };
            if reply.add(
                INodeNo(e.ino),
                index as u64 + 1,
                e.kind,
                OsStr::from_bytes(&e.name),
            ) {
                break Ok(());
            }
            index += 1;
        };
        self.dirs().insert(fh.0, dir);
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.fsync());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => {
                let bs = u64::from(s.block_size.max(1));
                reply.statfs(
                    s.total_bytes / bs,
                    s.free_bytes / bs,
                    s.free_bytes / bs,
                    s.inodes.saturating_add(s.inodes_free),
                    s.inodes_free,
                    s.block_size,
                    s.name_len_max,
                    s.block_size,
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let r = self
            .fs
            .setxattr(ino.0, name.as_bytes(), value, flags as u32);
        Self::empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(names) => {
                let mut list = Vec::new();
                for n in names {
                    list.extend_from_slice(&n);
                    list.push(0);
                }
                if size == 0 {
                    reply.size(list.len() as u32)
                } else if list.len() <= size as usize {
                    reply.data(&list)
                } else {
                    reply.error(Errno::ERANGE)
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.removexattr(ino.0, name.as_bytes()));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are the kernel's (default_permissions); this only checks existence.
        Self::empty(reply, self.fs.getattr(ino.0).map(drop));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.fs.create(
            parent.0,
            name.as_bytes(),
            (mode & 0o7777) as u16,
            creds(req),
        ) {
            Ok(a) => reply.created(
                &self.entry_ttl(parent.0, name.as_bytes(), &a),
                &self.attr(&a),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a time more than 2^63 seconds before the epoch made the negation of its
    /// seconds overflow (a panic in a debug build); it saturates instead.
    #[test]
    fn a_time_too_far_before_the_epoch_saturates_instead_of_overflowing() {
        use std::time::Duration;
        if let Some(t) = UNIX_EPOCH.checked_sub(Duration::new(1 << 63, 0)) {
            assert_eq!(timespec(t).secs, i64::MIN);
        }
        if let Some(t) = UNIX_EPOCH.checked_sub(Duration::new(1 << 62, 5)) {
            let ts = timespec(t);
            assert_eq!((ts.secs, ts.nanos), (-(1 << 62) - 1, 999_999_995));
        }
    }

    #[test]
    fn times_survive_the_round_trip_through_system_time_before_and_after_the_epoch() {
        for (secs, nanos) in [
            (0, 0),
            (1, 1),
            (1_763_720_100, 999_999_999),
            (-1, 0),
            (-1, 500_000_000),
            (-2_000_000_000, 1),
        ] {
            let t = Timespec { secs, nanos };
            assert_eq!(timespec(system_time(t)), t, "{t:?}");
        }
    }

    #[test]
    fn snapshot_inodes_are_cached_long_and_live_ones_briefly() {
        assert_eq!(ttl(derechofs_fs::ROOT_INO), LIVE_TTL);
        assert_eq!(ttl(derechofs_fs::snapshot::SNAPSHOT_BIT | 5), SNAPSHOT_TTL);
    }
}
