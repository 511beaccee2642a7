//! The namespace state machine: inodes and directory entries, decided in the order.
//!
//! [`apply`] applies one [`NsOp`] against the state of the shard where the operation stands in
//! the order (a [`Store`] read at `Version::MAX`, which includes the earlier operations of the
//! same version through an [`crate::store::Overlay`]), and returns the reply and the delta. Every
//! errno is decided here, by every replica alike: EEXIST, ENOENT, ENOTEMPTY are never decided by
//! a client that read first. Times are the stamp of the version (identical at every replica).
//! [`read`] answers a client's [`NsRead`] at a version.
//!
//! Permissions are not checked here: the mount relies on the kernel's `default_permissions`
//! (the rules `docs/SEMANTICS.md` lists).

use std::collections::BTreeMap;

use bytes::Bytes;
use derechofs_storage::{Hlc, Version};

use crate::error::{Fail, FsError};
use crate::inode::{
    Attr, FileKind, Ino, Inode, Timespec, FILE_SIZE_MAX, LIVE_INO_MAX, NAME_LEN_MAX, NLINK_MAX,
    ROOT_INO, SYMLINK_LEN_MAX,
};
use crate::key;
use crate::op::{
    Creds, DirEntry, HistoryEntry, NsOp, NsRead, NsReply, ReadReply, SetTime, HISTORY_MAX,
    READDIR_ENTRIES_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE, XATTRS_MAX, XATTR_CREATE,
    XATTR_NAME_LEN_MAX, XATTR_REPLACE, XATTR_VALUE_LEN_MAX,
};
use crate::store::{Delta, Store};
use crate::{fs_bail, fs_err};

/// The first inode number allocated after the root.
const FIRST_INO: Ino = ROOT_INO + 1;
/// Namespaces of extended attributes that may be set (Linux's; others are ENOTSUP).
const XATTR_NAMESPACES: [&[u8]; 4] = [b"user.", b"trusted.", b"security.", b"system."];
/// Extended attributes under this prefix are the file system's own, computed, never stored.
pub const VIRTUAL_XATTR_PREFIX: &[u8] = b"user.derechofs.";

/// The writes of one operation, with the inodes it changed, read back by the operation itself.
struct Tx<'a, S: Store + ?Sized> {
    store: &'a S,
    inodes: BTreeMap<Ino, Option<Inode>>,
    writes: BTreeMap<Vec<u8>, Option<Bytes>>,
    now: Timespec,
    /// The directories whose entries changed, in the order first touched.
    touched: Vec<Ino>,
}

impl<'a, S: Store + ?Sized> Tx<'a, S> {
    fn get(&self, key: &[u8]) -> Result<Option<Bytes>, Fail> {
        if let Some(v) = self.writes.get(key) {
            return Ok(v.clone());
        }
        Ok(self.store.get(key, Version::MAX)?)
    }

    fn put(&mut self, key: Vec<u8>, value: Option<Bytes>) {
        self.writes.insert(key, value);
    }

    fn inode(&self, ino: Ino) -> Result<Option<Inode>, Fail> {
        if let Some(i) = self.inodes.get(&ino) {
            return Ok(i.clone());
        }
        load_inode(self.store, ino, Version::MAX)
    }

    /// The inode, or ENOENT.
    fn need(&self, ino: Ino) -> Result<Inode, Fail> {
        match self.inode(ino)? {
            Some(i) => Ok(i),
            None => fs_bail!(libc::ENOENT, "no inode {ino}"),
        }
    }

    /// The directory `ino`, or ENOENT / ENOTDIR; a removed directory (nlink 0) is ENOENT.
    fn dir(&self, ino: Ino) -> Result<Inode, Fail> {
        let i = self.need(ino)?;
        if i.attr.kind != FileKind::Directory {
            fs_bail!(libc::ENOTDIR, "inode {ino} is not a directory");
        }
        if i.attr.nlink == 0 {
            fs_bail!(libc::ENOENT, "directory {ino} was removed");
        }
        Ok(i)
    }

    fn save(&mut self, inode: Inode) {
        self.inodes.insert(inode.attr.ino, Some(inode));
    }

    fn entry(&self, parent: Ino, name: &[u8]) -> Result<Option<(Ino, FileKind)>, Fail> {
        match self.get(&key::dirent(parent, name))? {
            Some(v) => Ok(Some(decode_dirent(&v)?)),
            None => Ok(None),
        }
    }

    fn set_entry(&mut self, parent: Ino, name: &[u8], target: Option<(Ino, FileKind)>) {
        let value = target.map(|(ino, kind)| encode_dirent(ino, kind));
        self.put(key::dirent(parent, name), value);
    }

    fn is_empty_dir(&self, ino: Ino) -> Result<bool, Fail> {
        let prefix = key::dirents(ino);
        // Entries this operation wrote count too.
        for (k, v) in self.writes.range(prefix.clone()..) {
            if !k.starts_with(&prefix) {
                break;
            }
            if v.is_some() {
                return Ok(false);
            }
        }
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .store
                .scan(&prefix, Version::MAX, after.as_deref(), 16)?;
            for (k, _) in &page {
                if !matches!(self.writes.get(k), Some(None)) {
                    return Ok(false);
                }
            }
            if page.len() < 16 {
                return Ok(true);
            }
            after = page.last().map(|(k, _)| k.clone());
        }
    }

    /// Touches a directory whose entries changed.
    fn touch_dir(&mut self, ino: Ino, nlink_delta: i32) -> Result<(), Fail> {
        let mut d = self.need(ino)?;
        d.attr.mtime = self.now;
        d.attr.ctime = self.now;
        d.attr.nlink = d.attr.nlink.saturating_add_signed(nlink_delta);
        self.save(d);
        if !self.touched.contains(&ino) {
            self.touched.push(ino);
        }
        Ok(())
    }

    fn allocate(&mut self) -> Result<Ino, Fail> {
        let next = match self.get(&key::next_ino())? {
            Some(v) => {
                let b: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| Fail::from(crate::codec::DecodeError::Bad("inode counter")))?;
                u64::from_le_bytes(b)
            }
            None => FIRST_INO,
        };
        if next > LIVE_INO_MAX {
            fs_bail!(libc::ENOSPC, "every inode number is used");
        }
        self.put(
            key::next_ino(),
            Some(Bytes::copy_from_slice(&(next + 1).to_le_bytes())),
        );
        Ok(next)
    }

    fn finish(mut self) -> Delta {
        for (ino, inode) in std::mem::take(&mut self.inodes) {
            self.writes
                .insert(key::inode(ino), inode.map(|i| i.encode()));
        }
        self.writes.into_iter().collect()
    }
}

fn encode_dirent(ino: Ino, kind: FileKind) -> Bytes {
    let mut v = Vec::with_capacity(9);
    v.push(kind.code());
    v.extend_from_slice(&ino.to_le_bytes());
    Bytes::from(v)
}

fn decode_dirent(v: &[u8]) -> Result<(Ino, FileKind), Fail> {
    let bad = || Fail::from(crate::codec::DecodeError::Bad("directory entry"));
    if v.len() != 9 {
        return Err(bad());
    }
    let kind = FileKind::from_code(v[0]).ok_or_else(bad)?;
    let ino = u64::from_le_bytes(v[1..9].try_into().map_err(|_| bad())?);
    Ok((ino, kind))
}

fn load_inode<S: Store + ?Sized>(
    store: &S,
    ino: Ino,
    version: Version,
) -> Result<Option<Inode>, Fail> {
    match store.get(&key::inode(ino), version)? {
        Some(v) => Ok(Some(Inode::decode(ino, &v)?)),
        None => Ok(None),
    }
}

/// Checks a name for a new or existing entry.
pub fn check_name(name: &[u8]) -> Result<(), FsError> {
    if name.len() > NAME_LEN_MAX {
        return Err(fs_err!(
            libc::ENAMETOOLONG,
            "a name of {} bytes is above {NAME_LEN_MAX}",
            name.len()
        ));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(fs_err!(
            libc::EINVAL,
            "{:?} is not a name for an entry",
            String::from_utf8_lossy(name)
        ));
    }
    Ok(())
}

fn new_inode(
    ino: Ino,
    kind: FileKind,
    perm: u16,
    creds: Creds,
    parent: &Inode,
    now: Timespec,
) -> Inode {
    // A directory with set-group-id passes its group on, and to subdirectories the bit itself.
    let sgid_parent = parent.attr.perm & libc::S_ISGID as u16 != 0;
    let gid = if sgid_parent {
        parent.attr.gid
    } else {
        creds.gid
    };
    let perm = if sgid_parent && kind == FileKind::Directory {
        perm | libc::S_ISGID as u16
    } else {
        perm
    };
    Inode {
        attr: Attr {
            ino,
            kind,
            perm: perm & 0o7777,
            uid: creds.uid,
            gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: 0,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        },
        target: Bytes::new(),
        parent: if kind == FileKind::Directory {
            parent.attr.ino
        } else {
            0
        },
    }
}

/// Applies one namespace operation at stamp `hlc` against `store` (its latest state). Returns
/// the reply and the writes; a failure of the store itself is returned as `Err`, and the replica
/// must stop, because it can no longer apply what the others apply.
pub fn apply<S: Store + ?Sized>(
    store: &S,
    hlc: Hlc,
    op: &NsOp,
) -> Result<(Result<NsReply, FsError>, Delta), derechofs_storage::LogError> {
    let mut tx = Tx {
        store,
        inodes: BTreeMap::new(),
        writes: BTreeMap::new(),
        now: Timespec::from_us(hlc.wall_us),
        touched: Vec::new(),
    };
    match run(&mut tx, op).and_then(|reply| with_dirs(&tx, reply)) {
        Ok(reply) => Ok((Ok(reply), tx.finish())),
        Err(Fail::Fs(e)) => Ok((Err(e), Vec::new())),
        Err(Fail::Store(e)) => Err(e),
    }
}

/// A reply of a change that touched directories' entries, with those directories' attributes
/// after it ([`NsReply::Entries`]); other replies as they are.
fn with_dirs<S: Store + ?Sized>(tx: &Tx<'_, S>, reply: NsReply) -> Result<NsReply, Fail> {
    if tx.touched.is_empty() {
        return Ok(reply);
    }
    assert!(
        tx.touched.len() <= crate::op::ENTRY_DIRS_MAX,
        "one change touched {} directories",
        tx.touched.len()
    );
    let dirs = tx
        .touched
        .iter()
        .map(|&d| tx.need(d).map(|i| i.attr))
        .collect::<Result<Vec<_>, _>>()?;
    let attr = match reply {
        NsReply::Attr(a) => Some(a),
        NsReply::Done => None,
        NsReply::Entries { attr, .. } => attr,
    };
    Ok(NsReply::Entries { attr, dirs })
}

fn attr_of(tx: &Tx<'_, impl Store + ?Sized>, ino: Ino) -> Result<NsReply, Fail> {
    Ok(NsReply::Attr(tx.need(ino)?.attr))
}

fn run<S: Store + ?Sized>(tx: &mut Tx<'_, S>, op: &NsOp) -> Result<NsReply, Fail> {
    let now = tx.now;
    match op {
        NsOp::Init { creds } => {
            if tx.inode(ROOT_INO)?.is_none() {
                let root = Inode {
                    attr: Attr {
                        ino: ROOT_INO,
                        kind: FileKind::Directory,
                        perm: 0o755,
                        uid: creds.uid,
                        gid: creds.gid,
                        nlink: 2,
                        size: 0,
                        rdev: 0,
                        atime: now,
                        mtime: now,
                        ctime: now,
                        crtime: now,
                    },
                    target: Bytes::new(),
                    parent: ROOT_INO,
                };
                tx.save(root);
            }
            attr_of(tx, ROOT_INO)
        }
        NsOp::Create {
            parent,
            name,
            kind,
            perm,
            rdev,
            creds,
        } => {
            if matches!(kind, FileKind::Directory | FileKind::Symlink) {
                fs_bail!(libc::EINVAL, "create makes no {kind:?}");
            }
            let (p, ino) = prepare_new(tx, *parent, name)?;
            let mut inode = new_inode(ino, *kind, *perm, *creds, &p, now);
            if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
                inode.attr.rdev = *rdev;
            }
            let attr = inode.attr.clone();
            tx.save(inode);
            tx.set_entry(*parent, name, Some((ino, *kind)));
            tx.touch_dir(*parent, 0)?;
            Ok(NsReply::Attr(attr))
        }
        NsOp::Mkdir {
            parent,
            name,
            perm,
            creds,
        } => {
            let (p, ino) = prepare_new(tx, *parent, name)?;
            if p.attr.nlink >= NLINK_MAX {
                fs_bail!(
                    libc::EMLINK,
                    "directory {parent} has too many subdirectories"
                );
            }
            let inode = new_inode(ino, FileKind::Directory, *perm, *creds, &p, now);
            let attr = inode.attr.clone();
            tx.save(inode);
            tx.set_entry(*parent, name, Some((ino, FileKind::Directory)));
            tx.touch_dir(*parent, 1)?;
            Ok(NsReply::Attr(attr))
        }
        NsOp::Symlink {
            parent,
            name,
            target,
            creds,
        } => {
            if target.is_empty() {
                fs_bail!(libc::ENOENT, "a symbolic link needs a target");
            }
            if target.len() > SYMLINK_LEN_MAX {
                fs_bail!(
                    libc::ENAMETOOLONG,
                    "a target of {} bytes is too long",
                    target.len()
                );
            }
            let (p, ino) = prepare_new(tx, *parent, name)?;
            let mut inode = new_inode(ino, FileKind::Symlink, 0o777, *creds, &p, now);
            inode.attr.perm = 0o777;
            inode.attr.size = target.len() as u64;
            inode.target = target.clone();
            let attr = inode.attr.clone();
            tx.save(inode);
            tx.set_entry(*parent, name, Some((ino, FileKind::Symlink)));
            tx.touch_dir(*parent, 0)?;
            Ok(NsReply::Attr(attr))
        }
        NsOp::Link { ino, parent, name } => {
            check_name(name)?;
            let mut i = tx.need(*ino)?;
            tx.dir(*parent)?;
            if i.attr.kind == FileKind::Directory {
                fs_bail!(libc::EPERM, "no hard links to directories");
            }
            if i.attr.nlink == 0 {
                fs_bail!(libc::ENOENT, "inode {ino} has no name left to link to");
            }
            if i.attr.nlink >= NLINK_MAX {
                fs_bail!(libc::EMLINK, "inode {ino} has too many links");
            }
            if tx.entry(*parent, name)?.is_some() {
                fs_bail!(libc::EEXIST, "{} exists", show(name));
            }
            i.attr.nlink += 1;
            i.attr.ctime = now;
            let attr = i.attr.clone();
            tx.save(i);
            tx.set_entry(*parent, name, Some((*ino, attr.kind)));
            tx.touch_dir(*parent, 0)?;
            Ok(NsReply::Attr(attr))
        }
        NsOp::Unlink { parent, name } => {
            check_name(name)?;
            tx.dir(*parent)?;
            let Some((ino, kind)) = tx.entry(*parent, name)? else {
                fs_bail!(libc::ENOENT, "no entry {}", show(name));
            };
            if kind == FileKind::Directory {
                fs_bail!(libc::EISDIR, "{} is a directory", show(name));
            }
            tx.set_entry(*parent, name, None);
            drop_link(tx, ino)?;
            tx.touch_dir(*parent, 0)?;
            Ok(NsReply::Done)
        }
        NsOp::Rmdir { parent, name } => {
            if name.as_ref() == b"." {
                fs_bail!(libc::EINVAL, "cannot remove \".\"");
            }
            if name.as_ref() == b".." {
                fs_bail!(libc::ENOTEMPTY, "cannot remove \"..\"");
            }
            check_name(name)?;
            tx.dir(*parent)?;
            let Some((ino, kind)) = tx.entry(*parent, name)? else {
                fs_bail!(libc::ENOENT, "no entry {}", show(name));
            };
            if kind != FileKind::Directory {
                fs_bail!(libc::ENOTDIR, "{} is not a directory", show(name));
            }
            if !tx.is_empty_dir(ino)? {
                fs_bail!(libc::ENOTEMPTY, "{} is not empty", show(name));
            }
            tx.set_entry(*parent, name, None);
            drop_link(tx, ino)?;
            tx.touch_dir(*parent, -1)?;
            Ok(NsReply::Done)
        }
        NsOp::Rename {
            parent,
            name,
            new_parent,
            new_name,
            flags,
        } => rename(tx, *parent, name, *new_parent, new_name, *flags),
        NsOp::SetAttr { ino, set } => {
            let mut i = tx.need(*ino)?;
            if let Some(size) = set.size {
                match i.attr.kind {
                    FileKind::Regular => {}
                    FileKind::Directory => fs_bail!(libc::EISDIR, "inode {ino} is a directory"),
                    _ => fs_bail!(libc::EINVAL, "inode {ino} is not a regular file"),
                }
                if size > FILE_SIZE_MAX {
                    fs_bail!(libc::EFBIG, "size {size} is above the largest file");
                }
            }
            let mut changed = false;
            if let Some(perm) = set.perm {
                i.attr.perm = perm & 0o7777;
                changed = true;
            }
            if let Some(uid) = set.uid {
                i.attr.uid = uid;
                changed = true;
            }
            if let Some(gid) = set.gid {
                i.attr.gid = gid;
                changed = true;
            }
            if let Some(size) = set.size {
                i.attr.size = size;
                i.attr.mtime = now;
                changed = true;
            }
            let pick = |t: SetTime| match t {
                SetTime::Now => now,
                SetTime::At(t) => t,
            };
            if let Some(t) = set.atime {
                i.attr.atime = pick(t);
                changed = true;
            }
            if let Some(t) = set.mtime {
                i.attr.mtime = pick(t);
                changed = true;
            }
            if changed {
                i.attr.ctime = now;
            }
            let attr = i.attr.clone();
            tx.save(i);
            Ok(NsReply::Attr(attr))
        }
        NsOp::Written { ino, end } => {
            let mut i = tx.need(*ino)?;
            match i.attr.kind {
                FileKind::Regular => {}
                FileKind::Directory => fs_bail!(libc::EISDIR, "inode {ino} is a directory"),
                _ => fs_bail!(libc::EINVAL, "inode {ino} is not a regular file"),
            }
            if *end > FILE_SIZE_MAX {
                fs_bail!(libc::EFBIG, "end {end} is above the largest file");
            }
            i.attr.size = i.attr.size.max(*end);
            i.attr.mtime = now;
            i.attr.ctime = now;
            let attr = i.attr.clone();
            tx.save(i);
            Ok(NsReply::Attr(attr))
        }
        NsOp::SetXattr {
            ino,
            name,
            value,
            flags,
        } => {
            check_xattr_name(name)?;
            if name.starts_with(VIRTUAL_XATTR_PREFIX) {
                fs_bail!(libc::EPERM, "{} is computed by the file system", show(name));
            }
            if value.len() > XATTR_VALUE_LEN_MAX {
                fs_bail!(libc::E2BIG, "a value of {} bytes is too large", value.len());
            }
            if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0
                || *flags == XATTR_CREATE | XATTR_REPLACE
            {
                fs_bail!(libc::EINVAL, "bad setxattr flags {flags:#x}");
            }
            let mut i = tx.need(*ino)?;
            let k = key::xattr(*ino, name);
            let exists = tx.get(&k)?.is_some();
            if exists && flags & XATTR_CREATE != 0 {
                fs_bail!(libc::EEXIST, "attribute {} exists", show(name));
            }
            if !exists && flags & XATTR_REPLACE != 0 {
                fs_bail!(libc::ENODATA, "no attribute {}", show(name));
            }
            if !exists && count_xattrs(tx.store, *ino)? >= XATTRS_MAX {
                fs_bail!(libc::ENOSPC, "inode {ino} has {XATTRS_MAX} attributes");
            }
            tx.put(k, Some(value.clone()));
            i.attr.ctime = now;
            tx.save(i);
            Ok(NsReply::Done)
        }
        NsOp::RemoveXattr { ino, name } => {
            check_xattr_name(name)?;
            let mut i = tx.need(*ino)?;
            let k = key::xattr(*ino, name);
            if tx.get(&k)?.is_none() {
                fs_bail!(libc::ENODATA, "no attribute {}", show(name));
            }
            tx.put(k, None);
            i.attr.ctime = now;
            tx.save(i);
            Ok(NsReply::Done)
        }
    }
}

fn count_xattrs<S: Store + ?Sized>(store: &S, ino: Ino) -> Result<usize, Fail> {
    let page = store.scan(&key::xattrs(ino), Version::MAX, None, XATTRS_MAX)?;
    Ok(page.len())
}

fn check_xattr_name(name: &[u8]) -> Result<(), FsError> {
    if name.is_empty() || name.len() > XATTR_NAME_LEN_MAX {
        return Err(fs_err!(
            libc::ERANGE,
            "an attribute name of {} bytes",
            name.len()
        ));
    }
    if !XATTR_NAMESPACES.iter().any(|ns| name.starts_with(ns)) {
        return Err(fs_err!(
            libc::ENOTSUP,
            "attribute {} is in no known namespace",
            show(name)
        ));
    }
    Ok(())
}

fn show(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// Checks what creating `name` in `parent` needs, and allocates the inode number.
fn prepare_new<S: Store + ?Sized>(
    tx: &mut Tx<'_, S>,
    parent: Ino,
    name: &[u8],
) -> Result<(Inode, Ino), Fail> {
    check_name(name)?;
    let p = tx.dir(parent)?;
    if tx.entry(parent, name)?.is_some() {
        fs_bail!(libc::EEXIST, "{} exists", show(name));
    }
    let ino = tx.allocate()?;
    Ok((p, ino))
}

/// Removes one name of `ino`. A directory's count drops to 0; other inodes lose one link. An
/// inode with no link left stays, so that open files keep working and history keeps it.
fn drop_link<S: Store + ?Sized>(tx: &mut Tx<'_, S>, ino: Ino) -> Result<(), Fail> {
    let mut i = tx.need(ino)?;
    if i.attr.kind == FileKind::Directory {
        i.attr.nlink = 0;
    } else {
        i.attr.nlink = i.attr.nlink.saturating_sub(1);
    }
    i.attr.ctime = tx.now;
    tx.save(i);
    Ok(())
}

/// Whether `dir` is `ancestor` or lies below it.
fn is_within<S: Store + ?Sized>(tx: &Tx<'_, S>, mut dir: Ino, ancestor: Ino) -> Result<bool, Fail> {
    // Bounded by the depth of the tree; a cycle would be corruption, caught by the bound.
    for _ in 0..=LIVE_INO_MAX.min(1 << 20) {
        if dir == ancestor {
            return Ok(true);
        }
        if dir == ROOT_INO {
            return Ok(false);
        }
        let d = tx.need(dir)?;
        dir = d.parent;
    }
    Err(Fail::from(crate::codec::DecodeError::Bad(
        "directory parents form a cycle",
    )))
}

fn rename<S: Store + ?Sized>(
    tx: &mut Tx<'_, S>,
    parent: Ino,
    name: &[u8],
    new_parent: Ino,
    new_name: &[u8],
    flags: u32,
) -> Result<NsReply, Fail> {
    if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
        || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
    {
        fs_bail!(libc::EINVAL, "bad rename flags {flags:#x}");
    }
    check_name(name)?;
    check_name(new_name)?;
    tx.dir(parent)?;
    tx.dir(new_parent)?;
    let Some((src, src_kind)) = tx.entry(parent, name)? else {
        fs_bail!(libc::ENOENT, "no entry {}", show(name));
    };
    let dst = tx.entry(new_parent, new_name)?;
    let now = tx.now;
    if flags & RENAME_EXCHANGE != 0 {
        let Some((dst, dst_kind)) = dst else {
            fs_bail!(libc::ENOENT, "no entry {} to exchange with", show(new_name));
        };
        if src == dst {
            return Ok(NsReply::Done);
        }
        if src_kind == FileKind::Directory && is_within(tx, new_parent, src)? {
            fs_bail!(libc::EINVAL, "cannot move a directory below itself");
        }
        if dst_kind == FileKind::Directory && is_within(tx, parent, dst)? {
            fs_bail!(libc::EINVAL, "cannot move a directory below itself");
        }
        tx.set_entry(parent, name, Some((dst, dst_kind)));
        tx.set_entry(new_parent, new_name, Some((src, src_kind)));
        for (ino, kind, to) in [(src, src_kind, new_parent), (dst, dst_kind, parent)] {
            let mut i = tx.need(ino)?;
            i.attr.ctime = now;
            if kind == FileKind::Directory {
                i.parent = to;
            }
            tx.save(i);
        }
        let moved = |k: FileKind| i32::from(k == FileKind::Directory);
        if parent != new_parent {
            let delta = moved(dst_kind) - moved(src_kind);
            tx.touch_dir(parent, delta)?;
            tx.touch_dir(new_parent, -delta)?;
        } else {
            tx.touch_dir(parent, 0)?;
        }
        return Ok(NsReply::Done);
    }
    if let Some((dst, dst_kind)) = dst {
        if flags & RENAME_NOREPLACE != 0 {
            fs_bail!(libc::EEXIST, "{} exists", show(new_name));
        }
        if src == dst {
            // Two names of one inode: POSIX says do nothing.
            return Ok(NsReply::Done);
        }
        match (
            src_kind == FileKind::Directory,
            dst_kind == FileKind::Directory,
        ) {
            (true, false) => fs_bail!(libc::ENOTDIR, "{} is not a directory", show(new_name)),
            (false, true) => fs_bail!(libc::EISDIR, "{} is a directory", show(new_name)),
            (true, true) if !tx.is_empty_dir(dst)? => {
                fs_bail!(libc::ENOTEMPTY, "{} is not empty", show(new_name))
            }
            _ => {}
        }
    }
    if src_kind == FileKind::Directory && is_within(tx, new_parent, src)? {
        fs_bail!(libc::EINVAL, "cannot move a directory below itself");
    }
    let src_dir = src_kind == FileKind::Directory;
    if src_dir && parent != new_parent {
        let np = tx.need(new_parent)?;
        let replaces_dir = matches!(dst, Some((_, FileKind::Directory)));
        if !replaces_dir && np.attr.nlink >= NLINK_MAX {
            fs_bail!(
                libc::EMLINK,
                "directory {new_parent} has too many subdirectories"
            );
        }
    }
    // Decided: now the changes.
    let mut new_parent_links = 0;
    if let Some((dst, dst_kind)) = dst {
        drop_link(tx, dst)?;
        if dst_kind == FileKind::Directory {
            new_parent_links -= 1;
        }
    }
    tx.set_entry(parent, name, None);
    tx.set_entry(new_parent, new_name, Some((src, src_kind)));
    let mut s = tx.need(src)?;
    s.attr.ctime = now;
    if src_dir {
        s.parent = new_parent;
    }
    tx.save(s);
    if src_dir && parent != new_parent {
        tx.touch_dir(parent, -1)?;
        new_parent_links += 1;
    }
    tx.touch_dir(new_parent, new_parent_links)?;
    if parent != new_parent {
        tx.touch_dir(parent, 0)?;
    }
    Ok(NsReply::Done)
}

/// Answers a read at `version` (`Version::MAX`: the latest state). Errors are the errno the
/// client sees; a failure of the store reads as EIO, and history trimmed away as ENOENT.
pub fn read<S: Store + ?Sized>(
    store: &S,
    version: Version,
    read: &NsRead,
) -> Result<ReadReply, FsError> {
    match serve(store, version, read) {
        Ok(r) => Ok(r),
        Err(Fail::Fs(e)) => Err(e),
        Err(Fail::Store(e)) => Err(FsError::from(e)),
    }
}

fn need_at<S: Store + ?Sized>(store: &S, ino: Ino, version: Version) -> Result<Inode, Fail> {
    match load_inode(store, ino, version)? {
        Some(i) => Ok(i),
        None => fs_bail!(libc::ENOENT, "no inode {ino}"),
    }
}

fn serve<S: Store + ?Sized>(store: &S, version: Version, read: &NsRead) -> Result<ReadReply, Fail> {
    match read {
        NsRead::Lookup { parent, name } => {
            if name.len() > NAME_LEN_MAX {
                fs_bail!(libc::ENAMETOOLONG, "a name of {} bytes", name.len());
            }
            let p = need_at(store, *parent, version)?;
            if p.attr.kind != FileKind::Directory {
                fs_bail!(libc::ENOTDIR, "inode {parent} is not a directory");
            }
            let target = match name.as_ref() {
                b"." => *parent,
                b".." => p.parent,
                _ => match store.get(&key::dirent(*parent, name), version)? {
                    Some(v) => decode_dirent(&v)?.0,
                    None => fs_bail!(libc::ENOENT, "no entry {}", show(name)),
                },
            };
            Ok(ReadReply::Attr(need_at(store, target, version)?.attr))
        }
        NsRead::GetAttr { ino } => Ok(ReadReply::Attr(need_at(store, *ino, version)?.attr)),
        NsRead::ReadDir { ino, after, limit } => {
            let d = need_at(store, *ino, version)?;
            if d.attr.kind != FileKind::Directory {
                fs_bail!(libc::ENOTDIR, "inode {ino} is not a directory");
            }
            let prefix = key::dirents(*ino);
            let after_key = after.as_ref().map(|a| key::dirent(*ino, a));
            let limit = (*limit as usize).clamp(1, READDIR_ENTRIES_MAX);
            let page = store.scan(&prefix, version, after_key.as_deref(), limit + 1)?;
            let more = page.len() > limit;
            let mut entries = Vec::with_capacity(page.len().min(limit));
            for (k, v) in page.into_iter().take(limit) {
                let (ino, kind) = decode_dirent(&v)?;
                entries.push(DirEntry {
                    name: Bytes::copy_from_slice(&k[prefix.len()..]),
                    ino,
                    kind,
                });
            }
            Ok(ReadReply::Dir { entries, more })
        }
        NsRead::ReadLink { ino } => {
            let i = need_at(store, *ino, version)?;
            if i.attr.kind != FileKind::Symlink {
                fs_bail!(libc::EINVAL, "inode {ino} is not a symbolic link");
            }
            Ok(ReadReply::Bytes(i.target))
        }
        NsRead::GetXattr { ino, name } => {
            check_xattr_name(name)?;
            need_at(store, *ino, version)?;
            match store.get(&key::xattr(*ino, name), version)? {
                Some(v) => Ok(ReadReply::Bytes(v)),
                None => fs_bail!(libc::ENODATA, "no attribute {}", show(name)),
            }
        }
        NsRead::ListXattr { ino } => {
            need_at(store, *ino, version)?;
            let prefix = key::xattrs(*ino);
            let page = store.scan(&prefix, version, None, XATTRS_MAX)?;
            Ok(ReadReply::Names(
                page.into_iter()
                    .map(|(k, _)| Bytes::copy_from_slice(&k[prefix.len()..]))
                    .collect(),
            ))
        }
        NsRead::History { ino } => {
            need_at(store, *ino, version)?;
            // Only the newest HISTORY_MAX: the rest of a long history is neither read nor copied.
            let newest = store.history_newest(&key::inode(*ino), version, HISTORY_MAX);
            Ok(ReadReply::History(
                newest
                    .into_iter()
                    .map(|c| HistoryEntry {
                        version: c.version,
                        hlc: c.hlc,
                    })
                    .collect(),
            ))
        }
        NsRead::StatFs => {
            let next = match store.get(&key::next_ino(), version)? {
                Some(v) if v.len() == 8 => u64::from_le_bytes(v[..].try_into().unwrap_or([0; 8])),
                _ => FIRST_INO,
            };
            Ok(ReadReply::StatFs {
                inodes: next.saturating_sub(1),
            })
        }
    }
}
