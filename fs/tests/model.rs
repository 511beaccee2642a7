//! The file system against a reference model: random operation sequences, including reads of
//! the whole tree at random past times, applied to the real state machines over real logs (one
//! namespace shard and three data shards, through the `FileSystem` facade and the op encodings)
//! and to a plain in-memory tree; every reply, errno and the whole visible tree must agree.
//!
//! Some writes go through the client's write-back buffer (`write_buffered`) and are sent at a
//! later flush point (`flush`, `fsync`, or any other operation on the file): every read agrees
//! with the model at once (read-your-writes); a read at a past time T sees only what was sent
//! before T, so past times are checked only where nothing was buffered.
//!
//! Each run prints its seed; `DERECHOFS_FS_SEED=N cargo test -p derechofs-fs --test model`
//! reruns exactly that one, and `DERECHOFS_FS_SEEDS=N` runs N seeds instead of the default.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use derechofs_fs::inode::{FILE_SIZE_MAX, NAME_LEN_MAX};
use derechofs_fs::{
    Attr, Clock, Creds, Fallocate, FileKind, FileSystem, FsConfig, FsError, Ino, LocalShards,
    SetAttr, RENAME_EXCHANGE, RENAME_NOREPLACE, ROOT_INO, XATTR_CREATE, XATTR_REPLACE,
};
use derechofs_tests::rng::Rng;

const CHUNK: u32 = 4096;
const PAGE: u64 = 1024;
const START_US: u64 = 1_700_000_000_000_000;
const STEPS: usize = 400;
const SEEDS_DEFAULT: u64 = 5;
const NAMES: [&[u8]; 7] = [b"a", b"b", b"c", b"dir", b"a@5ms", b"x@y", b"f.txt"];
const XNAMES: [&[u8]; 3] = [b"user.one", b"user.two", b"trusted.t"];

/// One inode of the model.
#[derive(Clone, Debug)]
struct MInode {
    kind: FileKind,
    perm: u16,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    rdev: u32,
    target: Vec<u8>,
    parent: Ino,
    /// Data in pages of `PAGE` bytes; a missing page is zeros.
    pages: BTreeMap<u64, Vec<u8>>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The reference: inodes, and each directory's entries, in plain maps.
#[derive(Clone, Debug)]
struct Model {
    inodes: BTreeMap<Ino, MInode>,
    entries: BTreeMap<Ino, BTreeMap<Vec<u8>, Ino>>,
    next: Ino,
}

type R<T> = Result<T, i32>;

fn check_name(name: &[u8]) -> R<()> {
    if name.len() > NAME_LEN_MAX {
        return Err(libc::ENAMETOOLONG);
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

/// What of an inode's attributes the model predicts (not times).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    ino: Ino,
    kind: FileKind,
    perm: u16,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u64,
    rdev: u32,
}

fn seen(a: &Attr) -> Seen {
    Seen {
        ino: a.ino,
        kind: a.kind,
        perm: a.perm,
        uid: a.uid,
        gid: a.gid,
        nlink: a.nlink,
        size: a.size,
        rdev: a.rdev,
    }
}

impl Model {
    fn new() -> Model {
        let mut m = Model {
            inodes: BTreeMap::new(),
            entries: BTreeMap::new(),
            next: 2,
        };
        m.inodes.insert(
            ROOT_INO,
            m.fresh(FileKind::Directory, 0o755, Creds::default(), ROOT_INO),
        );
        m.entries.insert(ROOT_INO, BTreeMap::new());
        m
    }

    fn fresh(&self, kind: FileKind, perm: u16, c: Creds, parent: Ino) -> MInode {
        MInode {
            kind,
            perm,
            uid: c.uid,
            gid: c.gid,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            size: 0,
            rdev: 0,
            target: Vec::new(),
            parent: if kind == FileKind::Directory {
                parent
            } else {
                0
            },
            pages: BTreeMap::new(),
            xattrs: BTreeMap::new(),
        }
    }

    fn seen(&self, ino: Ino) -> Seen {
        let i = &self.inodes[&ino];
        Seen {
            ino,
            kind: i.kind,
            perm: i.perm,
            uid: i.uid,
            gid: i.gid,
            nlink: i.nlink,
            size: i.size,
            rdev: i.rdev,
        }
    }

    fn need(&self, ino: Ino) -> R<&MInode> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn dir(&self, ino: Ino) -> R<()> {
        let i = self.need(ino)?;
        if i.kind != FileKind::Directory {
            return Err(libc::ENOTDIR);
        }
        if i.nlink == 0 {
            return Err(libc::ENOENT);
        }
        Ok(())
    }

    fn entry(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        self.entries.get(&parent)?.get(name).copied()
    }

    fn kind(&self, ino: Ino) -> FileKind {
        self.inodes[&ino].kind
    }

    fn prepare_new(&mut self, parent: Ino, name: &[u8]) -> R<Ino> {
        check_name(name)?;
        self.dir(parent)?;
        if self.entry(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        let ino = self.next;
        self.next += 1;
        Ok(ino)
    }

    fn add(&mut self, parent: Ino, name: &[u8], ino: Ino, mut inode: MInode) -> Seen {
        let p = &self.inodes[&parent];
        if p.perm & libc::S_ISGID as u16 != 0 {
            inode.gid = p.gid;
            if inode.kind == FileKind::Directory {
                inode.perm |= libc::S_ISGID as u16;
            }
        }
        if inode.kind == FileKind::Directory {
            self.entries.insert(ino, BTreeMap::new());
            self.inodes.get_mut(&parent).unwrap().nlink += 1;
        }
        self.inodes.insert(ino, inode);
        self.entries
            .get_mut(&parent)
            .unwrap()
            .insert(name.to_vec(), ino);
        self.seen(ino)
    }

    fn create(
        &mut self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u16,
        rdev: u32,
        c: Creds,
    ) -> R<Seen> {
        let ino = self.prepare_new(parent, name)?;
        let mut i = self.fresh(kind, perm, c, parent);
        if matches!(kind, FileKind::CharDevice | FileKind::BlockDevice) {
            i.rdev = rdev;
        }
        Ok(self.add(parent, name, ino, i))
    }

    fn mkdir(&mut self, parent: Ino, name: &[u8], perm: u16, c: Creds) -> R<Seen> {
        let ino = self.prepare_new(parent, name)?;
        let i = self.fresh(FileKind::Directory, perm, c, parent);
        Ok(self.add(parent, name, ino, i))
    }

    fn symlink(&mut self, parent: Ino, name: &[u8], target: &[u8], c: Creds) -> R<Seen> {
        if target.is_empty() {
            return Err(libc::ENOENT);
        }
        let ino = self.prepare_new(parent, name)?;
        let mut i = self.fresh(FileKind::Symlink, 0o777, c, parent);
        i.size = target.len() as u64;
        i.target = target.to_vec();
        Ok(self.add(parent, name, ino, i))
    }

    fn link(&mut self, ino: Ino, parent: Ino, name: &[u8]) -> R<Seen> {
        check_name(name)?;
        let i = self.need(ino)?;
        let (kind, nlink) = (i.kind, i.nlink);
        self.dir(parent)?;
        if kind == FileKind::Directory {
            return Err(libc::EPERM);
        }
        if nlink == 0 {
            return Err(libc::ENOENT);
        }
        if self.entry(parent, name).is_some() {
            return Err(libc::EEXIST);
        }
        self.inodes.get_mut(&ino).unwrap().nlink += 1;
        self.entries
            .get_mut(&parent)
            .unwrap()
            .insert(name.to_vec(), ino);
        Ok(self.seen(ino))
    }

    fn drop_link(&mut self, ino: Ino) {
        let i = self.inodes.get_mut(&ino).unwrap();
        if i.kind == FileKind::Directory {
            i.nlink = 0;
        } else {
            i.nlink -= 1;
        }
    }

    fn unlink(&mut self, parent: Ino, name: &[u8]) -> R<()> {
        check_name(name)?;
        self.dir(parent)?;
        let ino = self.entry(parent, name).ok_or(libc::ENOENT)?;
        if self.kind(ino) == FileKind::Directory {
            return Err(libc::EISDIR);
        }
        self.entries.get_mut(&parent).unwrap().remove(name);
        self.drop_link(ino);
        Ok(())
    }

    fn rmdir(&mut self, parent: Ino, name: &[u8]) -> R<()> {
        check_name(name)?;
        self.dir(parent)?;
        let ino = self.entry(parent, name).ok_or(libc::ENOENT)?;
        if self.kind(ino) != FileKind::Directory {
            return Err(libc::ENOTDIR);
        }
        if !self.entries[&ino].is_empty() {
            return Err(libc::ENOTEMPTY);
        }
        self.entries.get_mut(&parent).unwrap().remove(name);
        self.drop_link(ino);
        self.inodes.get_mut(&parent).unwrap().nlink -= 1;
        Ok(())
    }

    fn within(&self, mut dir: Ino, ancestor: Ino) -> bool {
        loop {
            if dir == ancestor {
                return true;
            }
            if dir == ROOT_INO {
                return false;
            }
            dir = self.inodes[&dir].parent;
        }
    }

    fn rename(&mut self, parent: Ino, name: &[u8], np: Ino, nn: &[u8], flags: u32) -> R<()> {
        if flags & !3 != 0 || flags == 3 {
            return Err(libc::EINVAL);
        }
        check_name(name)?;
        check_name(nn)?;
        self.dir(parent)?;
        self.dir(np)?;
        let src = self.entry(parent, name).ok_or(libc::ENOENT)?;
        let dst = self.entry(np, nn);
        let sdir = self.kind(src) == FileKind::Directory;
        if flags == RENAME_EXCHANGE {
            let dst = dst.ok_or(libc::ENOENT)?;
            if src == dst {
                return Ok(());
            }
            let ddir = self.kind(dst) == FileKind::Directory;
            if (sdir && self.within(np, src)) || (ddir && self.within(parent, dst)) {
                return Err(libc::EINVAL);
            }
            self.entries
                .get_mut(&parent)
                .unwrap()
                .insert(name.to_vec(), dst);
            self.entries.get_mut(&np).unwrap().insert(nn.to_vec(), src);
            if sdir {
                self.inodes.get_mut(&src).unwrap().parent = np;
            }
            if ddir {
                self.inodes.get_mut(&dst).unwrap().parent = parent;
            }
            if parent != np {
                let delta = i32::from(ddir) - i32::from(sdir);
                let p = self.inodes.get_mut(&parent).unwrap();
                p.nlink = p.nlink.checked_add_signed(delta).unwrap();
                let q = self.inodes.get_mut(&np).unwrap();
                q.nlink = q.nlink.checked_add_signed(-delta).unwrap();
            }
            return Ok(());
        }
        if let Some(dst) = dst {
            if flags == RENAME_NOREPLACE {
                return Err(libc::EEXIST);
            }
            if src == dst {
                return Ok(());
            }
            let ddir = self.kind(dst) == FileKind::Directory;
            match (sdir, ddir) {
                (true, false) => return Err(libc::ENOTDIR),
                (false, true) => return Err(libc::EISDIR),
                (true, true) if !self.entries[&dst].is_empty() => return Err(libc::ENOTEMPTY),
                _ => {}
            }
        }
        if sdir && self.within(np, src) {
            return Err(libc::EINVAL);
        }
        if let Some(dst) = dst {
            self.drop_link(dst);
            if self.kind(dst) == FileKind::Directory {
                self.inodes.get_mut(&np).unwrap().nlink -= 1;
            }
        }
        self.entries.get_mut(&parent).unwrap().remove(name);
        self.entries.get_mut(&np).unwrap().insert(nn.to_vec(), src);
        if sdir {
            self.inodes.get_mut(&src).unwrap().parent = np;
            if parent != np {
                self.inodes.get_mut(&parent).unwrap().nlink -= 1;
                self.inodes.get_mut(&np).unwrap().nlink += 1;
            }
        }
        Ok(())
    }

    fn read(&self, ino: Ino, offset: u64, len: u64) -> R<Vec<u8>> {
        let i = self.need(ino)?;
        match i.kind {
            FileKind::Regular => {}
            FileKind::Directory => return Err(libc::EISDIR),
            _ => return Err(libc::EINVAL),
        }
        let end = (offset.saturating_add(len)).min(i.size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (page, within) = (pos / PAGE, pos % PAGE);
            let n = (PAGE - within).min(end - pos);
            match i.pages.get(&page) {
                Some(p) => out.extend_from_slice(&p[within as usize..(within + n) as usize]),
                None => out.resize(out.len() + n as usize, 0),
            }
            pos += n;
        }
        Ok(out)
    }

    fn write(&mut self, ino: Ino, offset: u64, data: &[u8]) -> R<Seen> {
        let i = self.inodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        // Byte by byte keeps the model obviously right; data in tests is small.
        for (pos, &b) in (offset..).zip(data) {
            let (page, within) = (pos / PAGE, pos % PAGE);
            i.pages
                .entry(page)
                .or_insert_with(|| vec![0; PAGE as usize])[within as usize] = b;
        }
        i.size = i.size.max(offset + data.len() as u64);
        Ok(self.seen(ino))
    }

    fn truncate(&mut self, ino: Ino, size: u64) {
        let i = self.inodes.get_mut(&ino).unwrap();
        i.pages.retain(|&p, _| p * PAGE < size);
        if let Some(p) = i.pages.get_mut(&(size / PAGE)) {
            p[(size % PAGE) as usize..].fill(0);
        }
        i.size = size;
    }

    fn fallocate(&mut self, ino: Ino, mode: Fallocate, offset: u64, len: u64) -> R<Seen> {
        if len == 0 {
            return Err(libc::EINVAL);
        }
        let i = self.need(ino)?;
        match i.kind {
            FileKind::Regular => {}
            FileKind::Directory => return Err(libc::EISDIR),
            FileKind::Fifo => return Err(libc::ESPIPE),
            _ => return Err(libc::ENODEV),
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= FILE_SIZE_MAX)
            .ok_or(libc::EFBIG)?;
        let size = i.size;
        match mode {
            Fallocate::KeepSize => {}
            Fallocate::Allocate => {
                if end > size {
                    self.truncate(ino, end);
                }
            }
            Fallocate::PunchHole => {
                let hi = end.min(size);
                let i = self.inodes.get_mut(&ino).unwrap();
                if offset < hi {
                    for (&page, bytes) in i.pages.range_mut(offset / PAGE..=(hi - 1) / PAGE) {
                        let from = offset.max(page * PAGE);
                        let to = hi.min((page + 1) * PAGE);
                        bytes[(from - page * PAGE) as usize..(to - page * PAGE) as usize].fill(0);
                    }
                }
            }
        }
        Ok(self.seen(ino))
    }

    fn setattr(&mut self, ino: Ino, set: &SetAttr) -> R<Seen> {
        let i = self.need(ino)?;
        if let Some(size) = set.size {
            match i.kind {
                FileKind::Regular => {}
                FileKind::Directory => return Err(libc::EISDIR),
                _ => return Err(libc::EINVAL),
            }
            if size > FILE_SIZE_MAX {
                return Err(libc::EFBIG);
            }
            self.truncate(ino, size);
        }
        let i = self.inodes.get_mut(&ino).unwrap();
        if let Some(p) = set.perm {
            i.perm = p;
        }
        if let Some(u) = set.uid {
            i.uid = u;
        }
        if let Some(g) = set.gid {
            i.gid = g;
        }
        Ok(self.seen(ino))
    }

    fn setxattr(&mut self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> R<()> {
        let i = self.inodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        let exists = i.xattrs.contains_key(name);
        if exists && flags & XATTR_CREATE != 0 {
            return Err(libc::EEXIST);
        }
        if !exists && flags & XATTR_REPLACE != 0 {
            return Err(libc::ENODATA);
        }
        i.xattrs.insert(name.to_vec(), value.to_vec());
        Ok(())
    }

    fn removexattr(&mut self, ino: Ino, name: &[u8]) -> R<()> {
        let i = self.inodes.get_mut(&ino).ok_or(libc::ENOENT)?;
        i.xattrs.remove(name).map(drop).ok_or(libc::ENODATA)
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> R<Seen> {
        let p = self.need(parent)?;
        if p.kind != FileKind::Directory {
            return Err(libc::ENOTDIR);
        }
        let ino = match name {
            b"." => parent,
            b".." => p.parent,
            _ => self.entry(parent, name).ok_or(libc::ENOENT)?,
        };
        Ok(self.seen(ino))
    }
}

fn errno<T>(r: Result<T, FsError>) -> R<T> {
    r.map_err(|e| e.errno)
}

struct Run {
    rng: Rng,
    fs: FileSystem<LocalShards>,
    model: Model,
    now: u64,
    /// The model after each step, with the clock of that step's operations.
    past: Vec<(u64, Model)>,
    /// Per entry of `past`: whether nothing was buffered after that step, so that the shards
    /// held exactly that model until the next step.
    past_exact: Vec<bool>,
    /// Files that may have buffered writes.
    buffered: Vec<Ino>,
    /// End of the last buffered write, to make the next one contiguous sometimes.
    last_end: Option<(Ino, u64)>,
    seed: u64,
    step: usize,
}

impl Run {
    fn new(seed: u64) -> Run {
        let shards = LocalShards::new(3, CHUNK, Clock::Manual(AtomicU64::new(START_US))).unwrap();
        let config = FsConfig {
            client_base: seed << 8,
            skew_max_us: 1_000,
            root_owner: Creds::default(),
            dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
        };
        let fs = FileSystem::new(shards, config).unwrap();
        let model = Model::new();
        Run {
            rng: Rng::new(seed),
            fs,
            past: vec![(START_US, model.clone())],
            past_exact: vec![true],
            buffered: Vec::new(),
            last_end: None,
            model,
            now: START_US,
            seed,
            step: 0,
        }
    }

    fn ctx(&self) -> String {
        format!("seed {} step {}", self.seed, self.step)
    }

    fn pick_ino(&mut self) -> Ino {
        if self.rng.chance(3) {
            return self.model.next + self.rng.below(3);
        }
        let n = self.model.inodes.len() as u64;
        *self
            .model
            .inodes
            .keys()
            .nth(self.rng.below(n) as usize)
            .unwrap()
    }

    fn pick_dir(&mut self) -> Ino {
        let dirs: Vec<Ino> = self
            .model
            .inodes
            .iter()
            .filter(|(_, i)| i.kind == FileKind::Directory && (i.nlink > 0 || self.rng.chance(10)))
            .map(|(&k, _)| k)
            .collect();
        if dirs.is_empty() || self.rng.chance(4) {
            return self.pick_ino();
        }
        dirs[self.rng.below(dirs.len() as u64) as usize]
    }

    fn pick_file(&mut self) -> Option<Ino> {
        let files: Vec<Ino> = self
            .model
            .inodes
            .iter()
            .filter(|(_, i)| i.kind == FileKind::Regular)
            .map(|(&k, _)| k)
            .collect();
        if files.is_empty() {
            return None;
        }
        Some(files[self.rng.below(files.len() as u64) as usize])
    }

    fn pick_name(&mut self) -> Vec<u8> {
        match self.rng.below(40) {
            0 => vec![b'n'; NAME_LEN_MAX + 1],
            1 => b".".to_vec(),
            2 => Vec::new(),
            _ => NAMES[self.rng.below(NAMES.len() as u64) as usize].to_vec(),
        }
    }

    fn creds(&mut self) -> Creds {
        Creds {
            uid: self.rng.below(3) as u32 * 1000,
            gid: self.rng.below(3) as u32 * 1000,
        }
    }

    fn data(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0 => 0,
            1..=6 => self.rng.between(1, 300),
            _ => self.rng.between(300, 3 * u64::from(CHUNK)),
        };
        let b = self.rng.next_u64() as u8;
        (0..len).map(|i| b.wrapping_add(i as u8)).collect()
    }

    fn offset(&mut self) -> u64 {
        match self.rng.below(20) {
            0 => (5 << 30) + self.rng.below(3 * u64::from(CHUNK)),
            1..=3 => self.rng.below(6 * u64::from(CHUNK)),
            _ => self.rng.below(2 * u64::from(CHUNK)),
        }
    }

    fn step(&mut self) {
        let c = self.ctx();
        let r = self.rng.below(100);
        match r {
            0..=9 => {
                let (p, n, perm, cr) = (
                    self.pick_dir(),
                    self.pick_name(),
                    self.rng.below(0o1000) as u16,
                    self.creds(),
                );
                let kind = [
                    FileKind::Regular,
                    FileKind::Fifo,
                    FileKind::Socket,
                    FileKind::CharDevice,
                ][self.rng.below(4) as usize];
                let rdev = self.rng.below(1000) as u32;
                let got = errno(self.fs.mknod(p, &n, kind, perm, rdev, cr)).map(|a| seen(&a));
                assert_eq!(
                    got,
                    self.model.create(p, &n, kind, perm, rdev, cr),
                    "{c}: mknod {p} {n:?}"
                );
            }
            10..=17 => {
                let (p, n, cr) = (self.pick_dir(), self.pick_name(), self.creds());
                let perm = if self.rng.chance(20) { 0o2755 } else { 0o755 };
                let got = errno(self.fs.mkdir(p, &n, perm, cr)).map(|a| seen(&a));
                assert_eq!(
                    got,
                    self.model.mkdir(p, &n, perm, cr),
                    "{c}: mkdir {p} {n:?}"
                );
            }
            18..=20 => {
                let (p, n, cr) = (self.pick_dir(), self.pick_name(), self.creds());
                let target: &[u8] = if self.rng.chance(10) {
                    b""
                } else {
                    b"../some/where"
                };
                let got = errno(self.fs.symlink(p, &n, target, cr)).map(|a| seen(&a));
                assert_eq!(got, self.model.symlink(p, &n, target, cr), "{c}: symlink");
            }
            21..=24 => {
                let (i, p, n) = (self.pick_ino(), self.pick_dir(), self.pick_name());
                let got = errno(self.fs.link(i, p, &n)).map(|a| seen(&a));
                assert_eq!(got, self.model.link(i, p, &n), "{c}: link {i} {p} {n:?}");
            }
            25..=31 => {
                let (p, n) = (self.pick_dir(), self.pick_name());
                assert_eq!(
                    errno(self.fs.unlink(p, &n)),
                    self.model.unlink(p, &n),
                    "{c}: unlink {p} {n:?}"
                );
            }
            32..=36 => {
                let (p, n) = (self.pick_dir(), self.pick_name());
                assert_eq!(
                    errno(self.fs.rmdir(p, &n)),
                    self.model.rmdir(p, &n),
                    "{c}: rmdir {p} {n:?}"
                );
            }
            37..=46 => {
                let (p, n, q, m) = (
                    self.pick_dir(),
                    self.pick_name(),
                    self.pick_dir(),
                    self.pick_name(),
                );
                let flags = match self.rng.below(10) {
                    0..=5 => 0,
                    6 | 7 => RENAME_NOREPLACE,
                    8 => RENAME_EXCHANGE,
                    _ => self.rng.below(8) as u32,
                };
                assert_eq!(
                    errno(self.fs.rename(p, &n, q, &m, flags)),
                    self.model.rename(p, &n, q, &m, flags),
                    "{c}: rename {p} {n:?} {q} {m:?} {flags}"
                );
            }
            47..=51 => {
                let i = if self.rng.chance(70) {
                    self.pick_file().unwrap_or(1)
                } else {
                    self.pick_ino()
                };
                let mut set = SetAttr::default();
                if self.rng.chance(40) {
                    set.perm = Some(self.rng.below(0o10000) as u16);
                }
                if self.rng.chance(20) {
                    set.uid = Some(self.rng.below(5) as u32);
                }
                if self.rng.chance(20) {
                    set.gid = Some(self.rng.below(5) as u32);
                }
                if self.rng.chance(50) {
                    set.size = Some(if self.rng.chance(5) {
                        FILE_SIZE_MAX + 1
                    } else {
                        self.offset()
                    });
                }
                let got = errno(self.fs.setattr(i, set.clone())).map(|a| seen(&a));
                assert_eq!(got, self.model.setattr(i, &set), "{c}: setattr {i} {set:?}");
            }
            66..=69 => {
                let i = if self.rng.chance(85) {
                    self.pick_file().unwrap_or(1)
                } else {
                    self.pick_ino()
                };
                let mode = match self.rng.below(10) {
                    0..=3 => Fallocate::Allocate,
                    4 | 5 => Fallocate::KeepSize,
                    _ => Fallocate::PunchHole,
                };
                let offset = self.offset();
                let len = match self.rng.below(20) {
                    0 => 0,
                    1 => FILE_SIZE_MAX,
                    2 => 4 * u64::from(CHUNK) + self.rng.below(20 * u64::from(CHUNK)),
                    _ => self.rng.between(1, 3 * u64::from(CHUNK)),
                };
                let got = errno(self.fs.fallocate(i, mode, offset, len)).map(|a| seen(&a));
                let want = self.model.fallocate(i, mode, offset, len);
                assert_eq!(
                    got, want,
                    "{c}: fallocate {i} {mode:?} at {offset} len {len}"
                );
            }
            52..=65 => {
                let Some(i) = self.pick_file() else { return };
                let (off, data) = (self.offset(), self.data());
                let got = errno(self.fs.write(i, off, &data)).map(|a| seen(&a));
                let want = self.model.write(i, off, &data);
                assert_eq!(got, want, "{c}: write {i} at {off} len {}", data.len());
            }
            70..=79 => {
                let i = if self.rng.chance(85) {
                    self.pick_file().unwrap_or(1)
                } else {
                    self.pick_ino()
                };
                let (off, len) = (self.offset(), self.rng.below(3 * u64::from(CHUNK)));
                let got = errno(self.fs.read(i, off, len as u32)).map(|b| b.to_vec());
                match (got, self.model.read(i, off, len)) {
                    (Ok(g), Ok(w)) => {
                        same_bytes(&g, &w, &format!("{c}: read {i} at {off} len {len}"))
                    }
                    (g, w) => assert_eq!(g.err(), w.err(), "{c}: read {i} at {off}"),
                }
            }
            80..=85 => {
                let i = self.pick_ino();
                let n = XNAMES[self.rng.below(3) as usize];
                let flags = self.rng.below(3) as u32;
                let v = self.data();
                let v = &v[..v.len().min(100)];
                assert_eq!(
                    errno(self.fs.setxattr(i, n, v, flags)),
                    self.model.setxattr(i, n, v, flags),
                    "{c}: setxattr {i}"
                );
            }
            86..=88 => {
                let i = self.pick_ino();
                let n = XNAMES[self.rng.below(3) as usize];
                assert_eq!(
                    errno(self.fs.removexattr(i, n)),
                    self.model.removexattr(i, n),
                    "{c}: removexattr"
                );
            }
            89..=93 => {
                let (p, n) = (self.pick_dir(), self.pick_name());
                if n.len() > NAME_LEN_MAX || n.is_empty() {
                    return;
                }
                let got = errno(self.fs.lookup(p, &n)).map(|a| seen(&a));
                assert_eq!(got, self.model.lookup(p, &n), "{c}: lookup {p} {n:?}");
            }
            94..=96 => self.compare_latest(),
            _ => self.compare_past(),
        }
    }

    /// Every inode the model knows (named or not) reads back the same, and the next number
    /// is free.
    fn compare_latest(&mut self) {
        let c = self.ctx();
        for (&ino, i) in &self.model.inodes {
            let a = self
                .fs
                .getattr(ino)
                .unwrap_or_else(|e| panic!("{c}: getattr {ino}: {e}"));
            assert_eq!(seen(&a), self.model.seen(ino), "{c}: attributes of {ino}");
            let x: BTreeMap<Vec<u8>, Vec<u8>> = self
                .fs
                .listxattr(ino)
                .unwrap()
                .into_iter()
                .map(|n| (n.to_vec(), self.fs.getxattr(ino, &n).unwrap().to_vec()))
                .collect();
            assert_eq!(x, i.xattrs, "{c}: xattrs of {ino}");
            match i.kind {
                FileKind::Directory => {
                    let page = 1 + self.rng.below(3) as usize;
                    let entries = read_all(&self.fs, ino, page);
                    let got: BTreeMap<Vec<u8>, Ino> = entries
                        .into_iter()
                        .map(|e| (e.name.to_vec(), e.ino))
                        .collect();
                    assert_eq!(got, self.model.entries[&ino], "{c}: entries of {ino}");
                }
                FileKind::Symlink => {
                    assert_eq!(self.fs.readlink(ino).unwrap().to_vec(), i.target, "{c}");
                }
                FileKind::Regular => compare_data(&self.fs, &self.model, ino, ino, &c),
                _ => {}
            }
        }
        let next = self.model.next;
        assert_eq!(
            errno(self.fs.getattr(next)).map(|a| a.ino),
            Err(libc::ENOENT),
            "{c}"
        );
    }

    /// A write into the write-back buffer: the model changes at once, the shards later.
    fn buffered_write(&mut self) {
        let c = self.ctx();
        let Some(i) = self.pick_file() else { return };
        let data = self.data();
        let off = match self.last_end {
            Some((f, end)) if f == i && self.rng.chance(70) => end,
            _ => self.offset(),
        };
        self.fs
            .write_buffered(i, off, &data)
            .unwrap_or_else(|e| panic!("{c}: buffered write {i} at {off}: {e}"));
        self.model.write(i, off, &data).unwrap();
        self.last_end = Some((i, off + data.len() as u64));
        if !self.buffered.contains(&i) {
            self.buffered.push(i);
        }
        if self.rng.chance(20) {
            // Read-your-writes: the attributes and bytes include the buffered write.
            let got = seen(&self.fs.getattr(i).unwrap());
            assert_eq!(
                got,
                self.model.seen(i),
                "{c}: getattr {i} after a buffered write"
            );
            compare_data(&self.fs, &self.model, i, i, &c);
        }
    }

    /// A flush point: `flush` of each buffered file (close) or `fsync`.
    fn flush_point(&mut self) {
        let c = self.ctx();
        if self.rng.chance(30) {
            self.fs
                .fsync()
                .unwrap_or_else(|e| panic!("{c}: fsync: {e}"));
        } else {
            for i in std::mem::take(&mut self.buffered) {
                self.fs
                    .flush(i)
                    .unwrap_or_else(|e| panic!("{c}: flush {i}: {e}"));
            }
        }
        self.buffered.clear();
        self.last_end = None;
    }

    /// The whole tree at a random past time, through `@T`, equals the model then.
    fn compare_past(&mut self) {
        let c = self.ctx();
        let exact: Vec<usize> = (0..self.past.len())
            .filter(|&k| self.past_exact[k])
            .collect();
        let k = exact[self.rng.below(exact.len() as u64) as usize];
        let (t0, model) = self.past[k].clone();
        let t = match self.past.get(k + 1) {
            Some((t1, _)) if *t1 > t0 + 1 => self.rng.between(t0, t1 - 1),
            _ => t0,
        };
        let name = format!("@{t}us");
        let root = self
            .fs
            .lookup(ROOT_INO, name.as_bytes())
            .unwrap_or_else(|e| panic!("{c}: root at {t}: {e}"));
        assert_ne!(root.ino, ROOT_INO);
        assert_eq!(
            Seen {
                ino: ROOT_INO,
                ..seen(&root)
            },
            model.seen(ROOT_INO),
            "{c}: root at {t}"
        );
        assert_eq!(
            errno(self.fs.mkdir(root.ino, b"new", 0o755, Creds::default())),
            Err(libc::EROFS)
        );
        let mut stack = vec![(ROOT_INO, root.ino)];
        while let Some((live, view)) = stack.pop() {
            let page = 1 + self.rng.below(3) as usize;
            let entries = read_all(&self.fs, view, page);
            let names: Vec<Vec<u8>> = entries.iter().map(|e| e.name.to_vec()).collect();
            let want: Vec<Vec<u8>> = model.entries[&live].keys().cloned().collect();
            assert_eq!(names, want, "{c}: entries of {live} at {t}");
            for e in entries {
                let ino = model.entries[&live][&e.name.to_vec()];
                let a = self.fs.lookup(view, &e.name).unwrap();
                assert_eq!(a.ino, e.ino, "{c}: snapshot numbers agree");
                assert!(
                    a.ino > derechofs_fs::inode::LIVE_INO_MAX,
                    "{c}: a snapshot number"
                );
                assert_eq!(
                    Seen { ino, ..seen(&a) },
                    model.seen(ino),
                    "{c}: {ino} at {t}"
                );
                let i = &model.inodes[&ino];
                let x: BTreeMap<Vec<u8>, Vec<u8>> = self
                    .fs
                    .listxattr(a.ino)
                    .unwrap()
                    .into_iter()
                    .map(|n| (n.to_vec(), self.fs.getxattr(a.ino, &n).unwrap().to_vec()))
                    .collect();
                assert_eq!(x, i.xattrs, "{c}: xattrs of {ino} at {t}");
                match i.kind {
                    FileKind::Directory => stack.push((ino, a.ino)),
                    FileKind::Regular => compare_data(&self.fs, &model, ino, a.ino, &c),
                    FileKind::Symlink => {
                        assert_eq!(self.fs.readlink(a.ino).unwrap().to_vec(), i.target)
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A whole directory, read in pages of `page` entries, each resuming after the last name.
fn read_all(fs: &FileSystem<LocalShards>, dir: Ino, page: usize) -> Vec<derechofs_fs::DirEntry> {
    let mut all: Vec<derechofs_fs::DirEntry> = Vec::new();
    loop {
        let after = all.last().map(|e| e.name.clone());
        let (entries, more) = fs.readdir(dir, after.as_deref(), page).unwrap();
        assert!(entries.len() <= page);
        all.extend(entries);
        if !more {
            return all;
        }
    }
}

/// Compares a file's bytes with the model's: every page the model holds, the page after each,
/// the start and the last bytes. `read_as` is the inode number to read through (a snapshot's).
fn compare_data(fs: &FileSystem<LocalShards>, model: &Model, ino: Ino, read_as: Ino, ctx: &str) {
    let i = &model.inodes[&ino];
    let mut windows: Vec<u64> = i
        .pages
        .keys()
        .flat_map(|p| [p * PAGE, (p + 1) * PAGE])
        .collect();
    windows.push(i.size.saturating_sub(PAGE / 2));
    windows.push(0);
    for off in windows {
        let got = fs.read(read_as, off, 2 * PAGE as u32).unwrap().to_vec();
        same_bytes(
            &got,
            &model.read(ino, off, 2 * PAGE).unwrap(),
            &format!("{ctx}: data of {ino} at {off}"),
        );
    }
}

/// Asserts equal bytes, naming the first difference instead of printing both.
fn same_bytes(got: &[u8], want: &[u8], what: &str) {
    if got != want {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        panic!(
            "{what}: {} bytes read, {} expected; first difference at {at}: {:?} against {:?}",
            got.len(),
            want.len(),
            got.get(at),
            want.get(at)
        );
    }
}

fn run_seed(seed: u64) {
    eprintln!("fs model: seed {seed} (rerun with DERECHOFS_FS_SEED={seed})");
    let mut run = Run::new(seed);
    for step in 0..STEPS {
        run.step = step;
        run.now += run.rng.between(1, 2000);
        run.fs.shards().set_now_us(run.now);
        match run.rng.below(100) {
            0..=14 => run.buffered_write(),
            15..=19 => run.flush_point(),
            _ => run.step(),
        }
        run.past.push((run.now, run.model.clone()));
        run.past_exact.push(run.buffered.is_empty());
    }
    run.compare_latest();
}

#[test]
fn the_file_system_agrees_with_a_reference_model_now_and_at_every_past_time() {
    if let Ok(seed) = std::env::var("DERECHOFS_FS_SEED") {
        run_seed(seed.parse().expect("DERECHOFS_FS_SEED is a number"));
        return;
    }
    let seeds = std::env::var("DERECHOFS_FS_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS_DEFAULT);
    for seed in 1..=seeds {
        run_seed(seed);
    }
}
