//! Inodes: the attributes a namespace shard keeps for every file, directory, symbolic link and
//! special file, and their encoding as the value of an inode key (`docs/FORMATS.md`).

use bytes::Bytes;

use crate::codec::{put_bytes, put_signed, put_varint, DecodeError, Reader};

/// An inode number. Live inodes are numbered from [`ROOT_INO`] up to [`LIVE_INO_MAX`]; numbers
/// with the top bit set name snapshot inodes (`snapshot`).
pub type Ino = u64;

/// The root directory.
pub const ROOT_INO: Ino = 1;
/// The largest live inode number the namespace allocates (2^40 − 1); ENOSPC beyond.
pub const LIVE_INO_MAX: Ino = (1 << 40) - 1;
/// Longest name of a directory entry, in bytes.
pub const NAME_LEN_MAX: usize = 255;
/// Longest symbolic link target, in bytes.
pub const SYMLINK_LEN_MAX: usize = 4095;
/// Most hard links to one inode.
pub const NLINK_MAX: u32 = 65_000;
/// Largest file size: 2^63 − 1, the most `off_t` holds.
pub const FILE_SIZE_MAX: u64 = i64::MAX as u64;

/// The kind of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A named pipe.
    Fifo,
    /// A Unix domain socket.
    Socket,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
}

impl FileKind {
    /// The byte that encodes the kind.
    pub fn code(self) -> u8 {
        match self {
            FileKind::Regular => 1,
            FileKind::Directory => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::Socket => 5,
            FileKind::CharDevice => 6,
            FileKind::BlockDevice => 7,
        }
    }

    /// The kind a byte encodes.
    pub fn from_code(code: u8) -> Option<FileKind> {
        Some(match code {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::Socket,
            6 => FileKind::CharDevice,
            7 => FileKind::BlockDevice,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of the kind, as in `st_mode`.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::Regular => libc::S_IFREG,
            FileKind::Directory => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::Socket => libc::S_IFSOCK,
            FileKind::CharDevice => libc::S_IFCHR,
            FileKind::BlockDevice => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFBLK => FileKind::BlockDevice,
            _ => return None,
        })
    }
}

/// A point in time: seconds since the Unix epoch (negative before it) and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timespec {
    /// Whole seconds.
    pub secs: i64,
    /// Nanoseconds, below 1,000,000,000.
    pub nanos: u32,
}

impl Timespec {
    /// The time of a stamp's wall part (microseconds since the epoch).
    pub fn from_us(us: u64) -> Timespec {
        Timespec {
            secs: (us / 1_000_000) as i64,
            nanos: (us % 1_000_000) as u32 * 1000,
        }
    }
}

/// The attributes of an inode, as `stat` reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// The inode number.
    pub ino: Ino,
    /// What it is.
    pub kind: FileKind,
    /// Permission bits with set-user-id, set-group-id and sticky (`0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Hard links; for a directory 2 plus its subdirectories.
    pub nlink: u32,
    /// Size in bytes (a symbolic link: its target's length).
    pub size: u64,
    /// Device number of a character or block device.
    pub rdev: u32,
    /// Last access (changed only by `utimens`: reads do not update it, as with `noatime`).
    pub atime: Timespec,
    /// Last change of the contents.
    pub mtime: Timespec,
    /// Last change of the inode.
    pub ctime: Timespec,
    /// Creation.
    pub crtime: Timespec,
}

impl Attr {
    /// `st_mode`: the kind's bits and the permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | u32::from(self.perm)
    }
}

/// An inode as the namespace stores it: its attributes and, for a symbolic link, the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    /// The attributes.
    pub attr: Attr,
    /// The target of a symbolic link; empty for other kinds.
    pub target: Bytes,
    /// For a directory, the directory holding its entry (the root: itself); 0 for other kinds,
    /// which may have many names.
    pub parent: Ino,
}

const INODE_FORMAT: u8 = 1;

fn put_time(out: &mut Vec<u8>, t: Timespec) {
    put_signed(out, t.secs);
    put_varint(out, u64::from(t.nanos));
}

pub(crate) fn read_time(r: &mut Reader<'_>) -> Result<Timespec, DecodeError> {
    let secs = r.signed("time")?;
    let nanos = r.varint_u32("time")?;
    if nanos >= 1_000_000_000 {
        return Err(DecodeError::Bad("time nanoseconds"));
    }
    Ok(Timespec { secs, nanos })
}

/// Appends the attributes (without the inode number, which the key or message carries).
pub(crate) fn put_attr(out: &mut Vec<u8>, a: &Attr) {
    out.push(a.kind.code());
    put_varint(out, u64::from(a.perm));
    put_varint(out, u64::from(a.uid));
    put_varint(out, u64::from(a.gid));
    put_varint(out, u64::from(a.nlink));
    put_varint(out, a.size);
    put_varint(out, u64::from(a.rdev));
    for t in [a.atime, a.mtime, a.ctime, a.crtime] {
        put_time(out, t);
    }
}

pub(crate) fn read_attr(r: &mut Reader<'_>, ino: Ino) -> Result<Attr, DecodeError> {
    let code = r.u8("kind")?;
    let kind = FileKind::from_code(code).ok_or(DecodeError::UnknownTag {
        what: "kind",
        tag: code,
    })?;
    let perm = r.varint("perm")?;
    if perm > 0o7777 {
        return Err(DecodeError::Bad("perm"));
    }
    Ok(Attr {
        ino,
        kind,
        perm: perm as u16,
        uid: r.varint_u32("uid")?,
        gid: r.varint_u32("gid")?,
        nlink: r.varint_u32("nlink")?,
        size: r.varint("size")?,
        rdev: r.varint_u32("rdev")?,
        atime: read_time(r)?,
        mtime: read_time(r)?,
        ctime: read_time(r)?,
        crtime: read_time(r)?,
    })
}

impl Inode {
    /// The value stored under the inode's key.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(48 + self.target.len());
        out.push(INODE_FORMAT);
        put_attr(&mut out, &self.attr);
        put_bytes(&mut out, &self.target);
        put_varint(&mut out, self.parent);
        Bytes::from(out)
    }

    /// Decodes the value stored under the key of inode `ino`; never panics.
    pub fn decode(ino: Ino, value: &Bytes) -> Result<Inode, DecodeError> {
        let mut r = Reader::new(value);
        let format = r.u8("inode format")?;
        if format != INODE_FORMAT {
            return Err(DecodeError::UnknownTag {
                what: "inode format",
                tag: format,
            });
        }
        let attr = read_attr(&mut r, ino)?;
        let target = r.bytes("symlink target", SYMLINK_LEN_MAX)?;
        let parent = r.varint("parent")?;
        r.finish()?;
        Ok(Inode {
            attr,
            target,
            parent,
        })
    }
}
