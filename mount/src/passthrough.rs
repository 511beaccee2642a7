//! A FUSE passthrough of a local directory: every request is the same system call on the
//! directory below, so what it measures is the cost of FUSE itself (the "FUSE passthrough" limit
//! of the benchmarks), and what it passes is what the FUSE test harness expects of a correct file
//! system (it validates the harness before it runs against DerechoFS).
//!
//! Design (after libfuse's `passthrough_ll`): every inode the kernel knows is an `O_PATH` file
//! descriptor of the underlying file, keyed by its `(st_dev, st_ino)` so hard links share one
//! inode, counted by the kernel's lookups and dropped on `forget`. Operations address the file
//! through that descriptor (`*at` calls with an empty path, or `/proc/self/fd/N`), never by a path
//! string, so renames by anyone never confuse it. Open files and directories are ordinary
//! descriptors. Requests run as the mounting user (root in tests and benchmarks); mount with
//! `default_permissions` so the kernel checks permissions, and new files are given to the caller's
//! uid and gid, as a local file system would.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use rustix::fs::{AtFlags, Mode, OFlags, Stat, Timestamps};

/// How long the kernel may cache attributes and entries. The directory below may change behind
/// the mount's back only if someone writes to it directly, which the benchmarks and tests do not.
const TTL: Duration = Duration::from_secs(1);
/// Largest read answered at once (the kernel asks for at most `max_read`, 128 KiB by default, or
/// 1 MiB with big reads).
const READ_MAX: u32 = 16 << 20;
/// Most entries a directory listing snapshot may hold.
const DIR_ENTRIES_MAX: usize = 10_000_000;

#[derive(Debug)]
struct Node {
    fd: Arc<OwnedFd>,
    key: (u64, u64),
    lookups: u64,
}

#[derive(Debug, Default)]
struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

#[derive(Debug)]
struct DirEntry {
    name: Vec<u8>,
    ino: u64,
    kind: FileType,
}

#[derive(Debug)]
enum Handle {
    File(Arc<OwnedFd>),
    Dir(Arc<Vec<DirEntry>>),
}

/// The changes one `setattr` asks for.
#[derive(Debug)]
struct SetAttr {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: Option<TimeOrNow>,
    mtime: Option<TimeOrNow>,
    fh: Option<FileHandle>,
}

/// The passthrough file system of one directory.
#[derive(Debug)]
pub struct Passthrough {
    source: PathBuf,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

/// Why the passthrough could not start.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("source directory {path}: {source}")]
    Source {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("source {0} is not a directory")]
    NotADirectory(PathBuf),
}

type Res<T> = Result<T, Errno>;

fn errno(e: rustix::io::Errno) -> Errno {
    Errno::from_i32(e.raw_os_error())
}

fn proc_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = nsec.clamp(0, 999_999_999) as u32;
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::new(0, nsec)
    }
}

fn kind_of(mode: u32) -> FileType {
    match rustix::fs::FileType::from_raw_mode(mode) {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dirent_kind(t: rustix::fs::FileType) -> FileType {
    match t {
        rustix::fs::FileType::Directory => FileType::Directory,
        rustix::fs::FileType::Symlink => FileType::Symlink,
        rustix::fs::FileType::Fifo => FileType::NamedPipe,
        rustix::fs::FileType::Socket => FileType::Socket,
        rustix::fs::FileType::CharacterDevice => FileType::CharDevice,
        rustix::fs::FileType::BlockDevice => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, st: &Stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec as i64),
        mtime: time(st.st_mtime, st.st_mtime_nsec as i64),
        ctime: time(st.st_ctime, st.st_ctime_nsec as i64),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timestamp(t: Option<TimeOrNow>) -> rustix::fs::Timespec {
    match t {
        None => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let (sec, nsec) = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, i64::from(d.subsec_nanos())),
                Err(e) => {
                    let d = e.duration();
                    let mut sec = -(d.as_secs() as i64);
                    let mut nsec = -i64::from(d.subsec_nanos());
                    if nsec < 0 {
                        sec -= 1;
                        nsec += 1_000_000_000;
                    }
                    (sec, nsec)
                }
            };
            rustix::fs::Timespec {
                tv_sec: sec,
                tv_nsec: nsec as _,
            }
        }
    }
}

impl Passthrough {
    /// A passthrough of `source`, which must be an existing directory. Sets the process umask to
    /// 0: the kernel has already applied the caller's umask to every mode it sends.
    pub fn new(source: &Path) -> Result<Passthrough, PassthroughError> {
        let err = |e: rustix::io::Errno| PassthroughError::Source {
            path: source.to_path_buf(),
            source: e.into(),
        };
        let fd =
            rustix::fs::open(source, OFlags::PATH | OFlags::CLOEXEC, Mode::empty()).map_err(err)?;
        let st = rustix::fs::fstat(&fd).map_err(err)?;
        if kind_of(st.st_mode) != FileType::Directory {
            return Err(PassthroughError::NotADirectory(source.to_path_buf()));
        }
        rustix::process::umask(Mode::empty());
        let mut inodes = Inodes {
            next: INodeNo::ROOT.0 + 1,
            ..Inodes::default()
        };
        let key = (st.st_dev, st.st_ino);
        inodes.by_key.insert(key, INodeNo::ROOT.0);
        inodes.by_ino.insert(
            INodeNo::ROOT.0,
            Node {
                fd: Arc::new(fd),
                key,
                // The root is never forgotten.
                lookups: u64::MAX / 2,
            },
        );
        Ok(Passthrough {
            source: source.to_path_buf(),
            inodes: Mutex::new(inodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        })
    }

    /// The directory passed through.
    pub fn source(&self) -> &Path {
        &self.source
    }

    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn node(&self, ino: INodeNo) -> Res<Arc<OwnedFd>> {
        self.inodes()
            .by_ino
            .get(&ino.0)
            .map(|n| n.fd.clone())
            .ok_or(Errno::ESTALE)
    }

    fn file(&self, fh: FileHandle) -> Res<Arc<OwnedFd>> {
        match self.handles().get(&fh.0) {
            Some(Handle::File(fd)) => Ok(fd.clone()),
            _ => Err(Errno::EBADF),
        }
    }

    fn add_handle(&self, h: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles().insert(fh, h);
        FileHandle(fh)
    }

    /// Looks `name` up in `parent` and counts one kernel lookup of the result.
    fn lookup_name(&self, parent: &OwnedFd, name: &OsStr) -> Res<FileAttr> {
        let fd = rustix::fs::openat(
            parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let st = rustix::fs::fstat(&fd).map_err(errno)?;
        let key = (st.st_dev, st.st_ino);
        let mut inodes = self.inodes();
        let ino = match inodes.by_key.get(&key).copied() {
            Some(ino) => {
                let node = inodes
                    .by_ino
                    .get_mut(&ino)
                    .expect("by_key and by_ino agree");
                node.lookups += 1;
                ino
            }
            None => {
                let ino = inodes.next;
                inodes.next += 1;
                inodes.by_key.insert(key, ino);
                inodes.by_ino.insert(
                    ino,
                    Node {
                        fd: Arc::new(fd),
                        key,
                        lookups: 1,
                    },
                );
                ino
            }
        };
        Ok(attr(ino, &st))
    }

    fn stat_ino(&self, ino: INodeNo) -> Res<FileAttr> {
        let fd = self.node(ino)?;
        let st = rustix::fs::fstat(&*fd).map_err(errno)?;
        Ok(attr(ino.0, &st))
    }

    /// Gives a file just created by this (root) process to the caller, as the kernel would have:
    /// the caller's uid, and its gid unless the parent directory is set-group-id.
    fn give_to_caller(&self, req: &Request, parent: &OwnedFd, name: &OsStr, mode: u32) -> Res<()> {
        if req.uid() == 0 && req.gid() == 0 {
            return Ok(());
        }
        let pst = rustix::fs::fstat(parent).map_err(errno)?;
        let gid = if pst.st_mode & 0o2000 != 0 {
            None
        } else {
            Some(rustix::fs::Gid::from_raw(req.gid()))
        };
        rustix::fs::chownat(
            parent,
            name,
            Some(rustix::fs::Uid::from_raw(req.uid())),
            gid,
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(errno)?;
        // chown clears set-user-id and set-group-id bits of files; put back what was asked.
        if mode & 0o6000 != 0 && kind_of(mode) == FileType::RegularFile {
            rustix::fs::chmodat(
                parent,
                name,
                Mode::from_raw_mode(mode & 0o7777),
                AtFlags::empty(),
            )
            .map_err(errno)?;
        }
        Ok(())
    }

    fn reply_entry(reply: ReplyEntry, r: Res<FileAttr>) {
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn reply_empty(reply: ReplyEmpty, r: Res<()>) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn do_setattr(&self, ino: INodeNo, change: SetAttr) -> Res<FileAttr> {
        let SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        } = change;
        let fd = self.node(ino)?;
        if let Some(mode) = mode {
            rustix::fs::chmod(proc_path(&*fd), Mode::from_raw_mode(mode & 0o7777))
                .map_err(errno)?;
        }
        if uid.is_some() || gid.is_some() {
            rustix::fs::chownat(
                &*fd,
                "",
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        if let Some(size) = size {
            match fh.map(|fh| self.file(fh)) {
                Some(Ok(f)) => rustix::fs::ftruncate(&*f, size).map_err(errno)?,
                _ => {
                    let f = rustix::fs::open(
                        proc_path(&*fd),
                        OFlags::WRONLY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(errno)?;
                    rustix::fs::ftruncate(&f, size).map_err(errno)?;
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let times = Timestamps {
                last_access: timestamp(atime),
                last_modification: timestamp(mtime),
            };
            rustix::fs::utimensat(
                &*fd,
                "",
                &times,
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        self.stat_ino(ino)
    }

    fn read_dir(&self, ino: INodeNo) -> Res<Vec<DirEntry>> {
        let node = self.node(ino)?;
        let fd = rustix::fs::open(
            proc_path(&*node),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let mut entries = Vec::new();
        for entry in rustix::fs::Dir::new(fd).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            if entries.len() >= DIR_ENTRIES_MAX {
                return Err(Errno::EFBIG);
            }
            entries.push(DirEntry {
                name: entry.file_name().to_bytes().to_vec(),
                ino: entry.ino(),
                kind: dirent_kind(entry.file_type()),
            });
        }
        Ok(entries)
    }

    fn xattr_path(&self, ino: INodeNo) -> Res<(Arc<OwnedFd>, String)> {
        let fd = self.node(ino)?;
        let p = proc_path(&*fd);
        Ok((fd, p))
    }
}

fn open_flags(flags: OpenFlags) -> OFlags {
    // The kernel has done O_CREAT/O_EXCL/O_TRUNC's work or sends them as separate requests;
    // O_DIRECT is FUSE's business (the directory below, tmpfs, may refuse it); O_NOFOLLOW would
    // refuse the /proc magic link.
    let drop = libc_bits::O_CREAT
        | libc_bits::O_EXCL
        | libc_bits::O_NOCTTY
        | libc_bits::O_DIRECT
        | libc_bits::O_NOFOLLOW;
    OFlags::from_bits_retain((flags.0 & !drop) as _) | OFlags::CLOEXEC
}

/// Open flag bits, from rustix so no libc dependency is needed.
mod libc_bits {
    use rustix::fs::OFlags;
    pub const O_CREAT: i32 = OFlags::CREATE.bits() as i32;
    pub const O_EXCL: i32 = OFlags::EXCL.bits() as i32;
    pub const O_NOCTTY: i32 = OFlags::NOCTTY.bits() as i32;
    pub const O_DIRECT: i32 = OFlags::DIRECT.bits() as i32;
    pub const O_NOFOLLOW: i32 = OFlags::NOFOLLOW.bits() as i32;
}

impl fuser::Filesystem for Passthrough {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = self.node(parent).and_then(|p| self.lookup_name(&p, name));
        Self::reply_entry(reply, r);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inodes = self.inodes();
        let gone = match inodes.by_ino.get_mut(&ino.0) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(nlookup);
                (node.lookups == 0).then_some(node.key)
            }
            None => None,
        };
        if let Some(key) = gone {
            inodes.by_ino.remove(&ino.0);
            inodes.by_key.remove(&key);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let r = match fh.map(|fh| self.file(fh)) {
            Some(Ok(f)) => rustix::fs::fstat(&*f)
                .map(|st| attr(ino.0, &st))
                .map_err(errno),
            _ => self.stat_ino(ino),
        };
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
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
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        };
        match self.do_setattr(ino, change) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let r = self
            .node(ino)
            .and_then(|fd| rustix::fs::readlinkat(&*fd, "", Vec::new()).map_err(errno));
        match r {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(e),
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
        let r = self.node(parent).and_then(|p| {
            rustix::fs::mknodat(
                &*p,
                name,
                rustix::fs::FileType::from_raw_mode(mode),
                Mode::from_raw_mode(mode & 0o7777),
                u64::from(rdev),
            )
            .map_err(errno)?;
            self.give_to_caller(req, &p, name, mode)?;
            self.lookup_name(&p, name)
        });
        Self::reply_entry(reply, r);
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
        let r = self.node(parent).and_then(|p| {
            rustix::fs::mkdirat(&*p, name, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
            self.give_to_caller(req, &p, name, 0o040000 | mode)?;
            self.lookup_name(&p, name)
        });
        Self::reply_entry(reply, r);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .node(parent)
            .and_then(|p| rustix::fs::unlinkat(&*p, name, AtFlags::empty()).map_err(errno));
        Self::reply_empty(reply, r);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .node(parent)
            .and_then(|p| rustix::fs::unlinkat(&*p, name, AtFlags::REMOVEDIR).map_err(errno));
        Self::reply_empty(reply, r);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.node(parent).and_then(|p| {
            rustix::fs::symlinkat(target, &*p, link_name).map_err(errno)?;
            self.give_to_caller(req, &p, link_name, 0o120777)?;
            self.lookup_name(&p, link_name)
        });
        Self::reply_entry(reply, r);
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
        let r = self.node(parent).and_then(|p| {
            let np = self.node(newparent)?;
            rustix::fs::renameat_with(
                &*p,
                name,
                &*np,
                newname,
                rustix::fs::RenameFlags::from_bits_retain(flags.bits()),
            )
            .map_err(errno)
        });
        Self::reply_empty(reply, r);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self.node(ino).and_then(|fd| {
            let np = self.node(newparent)?;
            rustix::fs::linkat(&*fd, "", &*np, newname, AtFlags::EMPTY_PATH).map_err(errno)?;
            self.lookup_name(&np, newname)
        });
        Self::reply_entry(reply, r);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.node(ino).and_then(|fd| {
            rustix::fs::open(proc_path(&*fd), open_flags(flags), Mode::empty()).map_err(errno)
        });
        match r {
            Ok(f) => reply.opened(
                self.add_handle(Handle::File(Arc::new(f))),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.file(fh).and_then(|f| {
            let mut buf = vec![0u8; size.min(READ_MAX) as usize];
            let mut done = 0;
            while done < buf.len() {
                let n = rustix::io::pread(&*f, &mut buf[done..], offset + done as u64)
                    .map_err(errno)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            buf.truncate(done);
            Ok(buf)
        });
        match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.file(fh).and_then(|f| {
            let mut done = 0;
            while done < data.len() {
                done +=
                    rustix::io::pwrite(&*f, &data[done..], offset + done as u64).map_err(errno)?;
            }
            Ok(done)
        });
        match r {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles().remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.file(fh).and_then(|f| {
            if datasync {
                rustix::fs::fdatasync(&*f).map_err(errno)
            } else {
                rustix::fs::fsync(&*f).map_err(errno)
            }
        });
        Self::reply_empty(reply, r);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.read_dir(ino) {
            Ok(entries) => reply.opened(
                self.add_handle(Handle::Dir(Arc::new(entries))),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.handles().get(&fh.0) {
            Some(Handle::Dir(e)) => e.clone(),
            _ => return reply.error(Errno::EBADF),
        };
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(e.ino),
                i as u64 + 1,
                e.kind,
                OsStr::from_bytes(&e.name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.node(ino).and_then(|fd| {
            let d = rustix::fs::open(
                proc_path(&*fd),
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            rustix::fs::fsync(&d).map_err(errno)
        });
        Self::reply_empty(reply, r);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let r = self
            .node(ino)
            .and_then(|fd| rustix::fs::fstatvfs(&*fd).map_err(errno));
        match r {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
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
        let r = self.xattr_path(ino).and_then(|(_fd, p)| {
            rustix::fs::lsetxattr(
                p.as_str(),
                name,
                value,
                rustix::fs::XattrFlags::from_bits_retain(flags as _),
            )
            .map_err(errno)
        });
        Self::reply_empty(reply, r);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let r = self.xattr_path(ino).and_then(|(_fd, p)| {
            let mut buf = vec![0u8; size as usize];
            let n = rustix::fs::getxattr(p.as_str(), name, &mut buf[..]).map_err(errno)?;
            buf.truncate(n);
            Ok((n, buf))
        });
        match r {
            Ok((n, _)) if size == 0 => reply.size(n as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let r = self.xattr_path(ino).and_then(|(_fd, p)| {
            let mut buf = vec![0u8; size as usize];
            let n = rustix::fs::listxattr(p.as_str(), &mut buf[..]).map_err(errno)?;
            buf.truncate(n);
            Ok((n, buf))
        });
        match r {
            Ok((n, _)) if size == 0 => reply.size(n as u32),
            Ok((_, buf)) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self
            .xattr_path(ino)
            .and_then(|(_fd, p)| rustix::fs::removexattr(p.as_str(), name).map_err(errno));
        Self::reply_empty(reply, r);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.node(parent).and_then(|p| {
            let f = rustix::fs::openat(
                &*p,
                name,
                open_flags(OpenFlags(flags)) | OFlags::CREATE | OFlags::EXCL,
                Mode::from_raw_mode(mode & 0o7777),
            )
            .map_err(errno)?;
            self.give_to_caller(req, &p, name, mode)?;
            let a = self.lookup_name(&p, name)?;
            Ok((a, f))
        });
        match r {
            Ok((a, f)) => {
                let fh = self.add_handle(Handle::File(Arc::new(f)));
                reply.created(&TTL, &a, Generation(0), fh, FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.file(fh).and_then(|f| {
            rustix::fs::fallocate(
                &*f,
                rustix::fs::FallocateFlags::from_bits_retain(mode as _),
                offset,
                length,
            )
            .map_err(errno)
        });
        Self::reply_empty(reply, r);
    }
}
