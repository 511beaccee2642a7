//! The typed operations of the file system, the reads clients send to a shard, their replies,
//! and their byte encodings (drawn in `docs/FORMATS.md`).
//!
//! A write operation travels as a [`Request`]: the client's id, its request number, and a
//! namespace or data operation. Every replica of the owning shard decodes it and applies it at its
//! position in the order (`namespace::apply`, `chunk::apply`); the reply, an errno or a result,
//! goes back to the client. A read ([`NsRead`], [`DataRead`]) is answered by one replica from its
//! state at a version or time. Every decoder here is safe on any bytes: it returns a
//! [`DecodeError`], never panics, and allocates no more than the input justifies.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use bytes::Bytes;
use derechofs_storage::backend::FilePlace;
use derechofs_storage::{Hlc, Version};

use crate::chunk::{ChunkPlan, PlanPiece, PLAN_FILES_MAX, PLAN_PIECES_MAX};
use crate::codec::{put_bytes, put_signed, put_varint, DecodeError, Reader};
use crate::error::FsError;
use crate::inode::{
    put_attr, read_attr, read_time, Attr, FileKind, Ino, Timespec, NAME_LEN_MAX, SYMLINK_LEN_MAX,
};

/// Largest value of one extended attribute (Linux's `XATTR_SIZE_MAX`).
pub const XATTR_VALUE_LEN_MAX: usize = 65_536;
/// Longest name of an extended attribute (Linux's `XATTR_NAME_MAX`).
pub const XATTR_NAME_LEN_MAX: usize = 255;
/// Largest data a write operation carries (one whole chunk of the largest size).
pub const WRITE_LEN_MAX: usize = 16 << 20;
/// Bytes before a write's data in its extent: the kind and the offset's varint.
const WRITE_EXTENT_HEAD_MAX: usize = 6;
/// Most entries one directory read returns.
pub const READDIR_ENTRIES_MAX: usize = 4096;
/// Most extended attribute names one listing returns.
pub const XATTRS_MAX: usize = 4096;
/// Most changes a history read returns (the newest ones).
pub const HISTORY_MAX: usize = 100_000;
/// Longest reason carried with an errno on the wire.
pub const REASON_LEN_MAX: usize = 256;

/// `rename` flag: fail with EEXIST if the target exists (Linux's `RENAME_NOREPLACE`).
pub const RENAME_NOREPLACE: u32 = 1;
/// `rename` flag: swap source and target, which must both exist (Linux's `RENAME_EXCHANGE`).
pub const RENAME_EXCHANGE: u32 = 2;
/// `setxattr` flag: fail with EEXIST if the attribute exists.
pub const XATTR_CREATE: u32 = 1;
/// `setxattr` flag: fail with ENODATA if the attribute does not exist.
pub const XATTR_REPLACE: u32 = 2;

/// Who asks: the owner and group a new inode gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Creds {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A time that `setattr` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    /// The stamp of the version that applies the operation (`UTIME_NOW`).
    Now,
    /// This time.
    At(Timespec),
}

/// What `setattr` changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits (`0o7777`).
    pub perm: Option<u16>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size (regular files only). The data shards are truncated before this is sent.
    pub size: Option<u64>,
    /// New access time.
    pub atime: Option<SetTime>,
    /// New modification time.
    pub mtime: Option<SetTime>,
}

/// An operation of the namespace shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsOp {
    /// Creates the root directory if it does not exist (mode 0755, owned by `creds`).
    Init {
        /// The root's owner.
        creds: Creds,
    },
    /// Creates a regular file or a special file (`create`, `mknod`) in `parent`.
    Create {
        /// The directory.
        parent: Ino,
        /// The new name.
        name: Bytes,
        /// Any kind but a directory or a symbolic link.
        kind: FileKind,
        /// Permission bits (`0o7777`, after the caller's umask).
        perm: u16,
        /// Device number, for character and block devices.
        rdev: u32,
        /// The owner.
        creds: Creds,
    },
    /// Creates a directory.
    Mkdir {
        /// The directory.
        parent: Ino,
        /// The new name.
        name: Bytes,
        /// Permission bits.
        perm: u16,
        /// The owner.
        creds: Creds,
    },
    /// Creates a symbolic link.
    Symlink {
        /// The directory.
        parent: Ino,
        /// The new name.
        name: Bytes,
        /// What the link points to.
        target: Bytes,
        /// The owner.
        creds: Creds,
    },
    /// Adds a hard link to `ino` in `parent`.
    Link {
        /// The existing inode (not a directory).
        ino: Ino,
        /// The directory.
        parent: Ino,
        /// The new name.
        name: Bytes,
    },
    /// Removes a name that is not a directory.
    Unlink {
        /// The directory.
        parent: Ino,
        /// The name.
        name: Bytes,
    },
    /// Removes an empty directory.
    Rmdir {
        /// The directory.
        parent: Ino,
        /// The name.
        name: Bytes,
    },
    /// Renames, with Linux's `renameat2` flags.
    Rename {
        /// The source directory.
        parent: Ino,
        /// The source name.
        name: Bytes,
        /// The target directory.
        new_parent: Ino,
        /// The target name.
        new_name: Bytes,
        /// [`RENAME_NOREPLACE`], [`RENAME_EXCHANGE`] or 0.
        flags: u32,
    },
    /// Changes attributes.
    SetAttr {
        /// The inode.
        ino: Ino,
        /// What to change.
        set: SetAttr,
    },
    /// Data up to `end` was written (to the data shards, before this): the size becomes at least
    /// `end`, and mtime and ctime the stamp of the version.
    Written {
        /// The file.
        ino: Ino,
        /// The end of the bytes written.
        end: u64,
    },
    /// Sets an extended attribute.
    SetXattr {
        /// The inode.
        ino: Ino,
        /// The name, with its namespace (`user.`, `trusted.`, …).
        name: Bytes,
        /// The value.
        value: Bytes,
        /// [`XATTR_CREATE`], [`XATTR_REPLACE`] or 0.
        flags: u32,
    },
    /// Removes an extended attribute.
    RemoveXattr {
        /// The inode.
        ino: Ino,
        /// The name.
        name: Bytes,
    },
}

/// An operation of a data shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataOp {
    /// Writes `data` at `offset` inside chunk `index` of `ino` (never across a chunk's end).
    Write {
        /// The file.
        ino: Ino,
        /// The chunk.
        index: u64,
        /// Where in the chunk.
        offset: u32,
        /// The bytes.
        data: Bytes,
    },
    /// Drops every byte at or after `size` of the chunks of `ino` this shard holds, so that they
    /// read as zeros if the file grows again.
    Truncate {
        /// The file.
        ino: Ino,
        /// The new size.
        size: u64,
    },
    /// Makes `len` bytes at `offset` inside chunk `index` of `ino` read as zeros, without
    /// changing how long the chunk is (never across a chunk's end). A chunk this shard does not
    /// hold reads as zeros already: nothing changes.
    Zero {
        /// The file.
        ino: Ino,
        /// The chunk.
        index: u64,
        /// Where in the chunk.
        offset: u32,
        /// How many bytes.
        len: u32,
    },
    /// Drops the chunks `from..to` of `ino` this shard holds (they read as zeros), at most
    /// [`crate::chunk::TRUNCATE_DELETES_MAX`] per request: the reply is `More` while more remain.
    Punch {
        /// The file.
        ino: Ino,
        /// The first chunk dropped.
        from: u64,
        /// The chunk after the last one dropped.
        to: u64,
    },
}

/// Either kind of operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// For the namespace shard.
    Ns(NsOp),
    /// For a data shard.
    Data(DataOp),
}

/// A write operation as a client sends it: applied once per `(client, number)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The client's id.
    pub client: u64,
    /// The client's request number, from 1; a retry carries the same number.
    pub number: u64,
    /// The operation.
    pub op: Op,
}

/// The result of a namespace operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsReply {
    /// The attributes of the inode the operation created, linked or changed.
    Attr(Attr),
    /// Done, nothing to return.
    Done,
    /// A change of directory entries (create, mknod, mkdir, symlink, link, unlink, rmdir,
    /// rename): the attributes of the inode created or linked, if any, and those of each
    /// directory whose entries changed, as they are right after the change (at most
    /// [`ENTRY_DIRS_MAX`], in the order first touched). The client may answer a `getattr` of
    /// such a directory from them for as long as the kernel caches attributes
    /// (docs/SEMANTICS.md).
    Entries {
        /// The inode created or linked (none for removals and renames).
        attr: Option<Attr>,
        /// The directories whose entries changed.
        dirs: Vec<Attr>,
    },
}

/// Most directories whose attributes one [`NsReply::Entries`] carries (a rename touches two).
pub const ENTRY_DIRS_MAX: usize = 2;

/// The result of a data operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataReply {
    /// Done.
    Done,
    /// Part done: a truncation removed [`crate::chunk::TRUNCATE_DELETES_MAX`] chunks and more
    /// remain past the cut. The client sends the truncation again (a new request) until `Done`.
    More,
}

/// A reply to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A namespace operation's result.
    Ns(Result<NsReply, FsError>),
    /// A data operation's result.
    Data(Result<DataReply, FsError>),
    /// The request number is below the last one applied for the client: a stale retry.
    Stale {
        /// The last number applied.
        last: u64,
    },
    /// Not applied: its changes would have brought its version's delta over
    /// `VERSION_DELTA_BYTES_MAX`. Nothing was recorded for the client; it resends the same
    /// request (same number), which a later version applies.
    Retry,
}

/// A read of the namespace shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NsRead {
    /// The attributes of the entry `name` of `parent`.
    Lookup {
        /// The directory.
        parent: Ino,
        /// The name.
        name: Bytes,
    },
    /// The attributes of `ino`.
    GetAttr {
        /// The inode.
        ino: Ino,
    },
    /// Up to `limit` entries of directory `ino` in name order, after `after`.
    ReadDir {
        /// The directory.
        ino: Ino,
        /// Resume after this name.
        after: Option<Bytes>,
        /// At most this many (≤ [`READDIR_ENTRIES_MAX`]).
        limit: u32,
    },
    /// The target of a symbolic link.
    ReadLink {
        /// The link.
        ino: Ino,
    },
    /// One extended attribute.
    GetXattr {
        /// The inode.
        ino: Ino,
        /// The name.
        name: Bytes,
    },
    /// The names of the extended attributes.
    ListXattr {
        /// The inode.
        ino: Ino,
    },
    /// The versions at which the inode changed, oldest first, up to the read's version.
    History {
        /// The inode.
        ino: Ino,
    },
    /// Counts for `statfs`.
    StatFs,
}

/// One directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// The name.
    pub name: Bytes,
    /// The inode it names.
    pub ino: Ino,
    /// The inode's kind.
    pub kind: FileKind,
}

/// One change in an inode's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The version that changed it.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
}

/// The answer to an [`NsRead`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadReply {
    /// Attributes (lookup, getattr).
    Attr(Attr),
    /// A page of directory entries; `more` when the directory continues after it.
    Dir {
        /// The entries, in name order.
        entries: Vec<DirEntry>,
        /// Whether more entries follow.
        more: bool,
    },
    /// Bytes (readlink, getxattr).
    Bytes(Bytes),
    /// Names (listxattr).
    Names(Vec<Bytes>),
    /// An inode's changes.
    History(Vec<HistoryEntry>),
    /// `statfs` counts.
    StatFs {
        /// Inode numbers allocated so far.
        inodes: u64,
    },
    /// Where a chunk's bytes lie in the answering member's log files (`DataRead::Plan`);
    /// `None` when some are not in a file yet (the log's write buffer) or the member keeps no
    /// files: the client reads the chunk through the member then.
    Plan(Option<ChunkPlan>),
}

/// A read of a data shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataRead {
    /// Up to `len` bytes at `offset` of chunk `index` of `ino`. The answer is shorter when the
    /// chunk ends earlier; what it does not hold reads as zeros.
    Chunk {
        /// The file.
        ino: Ino,
        /// The chunk.
        index: u64,
        /// Where in the chunk.
        offset: u32,
        /// How many bytes at most.
        len: u32,
    },
    /// Where the bytes of chunk `index` of `ino` lie in the member's log files, for a client
    /// on the same machine that reads them itself (docs/ARCHITECTURE.md, "Local reads").
    Plan {
        /// The file.
        ino: Ino,
        /// The chunk.
        index: u64,
    },
}

// Tags of the encodings; the tables in docs/FORMATS.md name each.
const REQ_NS: u8 = 1;
const REQ_DATA: u8 = 2;

const NS_INIT: u8 = 1;
const NS_CREATE: u8 = 2;
const NS_MKDIR: u8 = 3;
const NS_SYMLINK: u8 = 4;
const NS_LINK: u8 = 5;
const NS_UNLINK: u8 = 6;
const NS_RMDIR: u8 = 7;
const NS_RENAME: u8 = 8;
const NS_SETATTR: u8 = 9;
const NS_WRITTEN: u8 = 10;
const NS_SETXATTR: u8 = 11;
const NS_REMOVEXATTR: u8 = 12;

const DATA_WRITE: u8 = 1;
const DATA_TRUNCATE: u8 = 2;
const DATA_ZERO: u8 = 3;
const DATA_PUNCH: u8 = 4;

const REPLY_NS_OK: u8 = 1;
const REPLY_DATA_OK: u8 = 2;
const REPLY_ERR_NS: u8 = 3;
const REPLY_ERR_DATA: u8 = 4;
const REPLY_STALE: u8 = 5;
const REPLY_RETRY: u8 = 6;
const REPLY_DATA_MORE: u8 = 7;
const NS_REPLY_ATTR: u8 = 1;
const NS_REPLY_DONE: u8 = 2;
const NS_REPLY_ENTRIES: u8 = 3;

const READ_LOOKUP: u8 = 1;
const READ_GETATTR: u8 = 2;
const READ_READDIR: u8 = 3;
const READ_READLINK: u8 = 4;
const READ_GETXATTR: u8 = 5;
const READ_LISTXATTR: u8 = 6;
const READ_HISTORY: u8 = 7;
const READ_STATFS: u8 = 8;
const READ_CHUNK: u8 = 9;
const READ_PLAN: u8 = 10;

const READ_REPLY_ERR: u8 = 0;
const READ_REPLY_ATTR: u8 = 1;
const READ_REPLY_DIR: u8 = 2;
const READ_REPLY_BYTES: u8 = 3;
const READ_REPLY_NAMES: u8 = 4;
const READ_REPLY_HISTORY: u8 = 5;
const READ_REPLY_STATFS: u8 = 6;
const READ_REPLY_PLAN: u8 = 7;

/// Longest path of a file a plan names.
pub const PLAN_PATH_BYTES_MAX: usize = 4096;

fn put_creds(out: &mut Vec<u8>, c: Creds) {
    put_varint(out, u64::from(c.uid));
    put_varint(out, u64::from(c.gid));
}

fn read_creds(r: &mut Reader<'_>) -> Result<Creds, DecodeError> {
    Ok(Creds {
        uid: r.varint_u32("uid")?,
        gid: r.varint_u32("gid")?,
    })
}

fn read_name(r: &mut Reader<'_>) -> Result<Bytes, DecodeError> {
    // Names longer than NAME_LEN_MAX decode, so that the state machine answers ENAMETOOLONG.
    r.bytes("name", NAME_LEN_MAX * 4)
}

fn read_perm(r: &mut Reader<'_>) -> Result<u16, DecodeError> {
    let p = r.varint("perm")?;
    if p > 0o7777 {
        return Err(DecodeError::Bad("perm"));
    }
    Ok(p as u16)
}

fn put_set_time(out: &mut Vec<u8>, t: Option<SetTime>) {
    match t {
        None => out.push(0),
        Some(SetTime::Now) => out.push(1),
        Some(SetTime::At(t)) => {
            out.push(2);
            put_signed(out, t.secs);
            put_varint(out, u64::from(t.nanos));
        }
    }
}

fn read_set_time(r: &mut Reader<'_>) -> Result<Option<SetTime>, DecodeError> {
    Ok(match r.u8("set time")? {
        0 => None,
        1 => Some(SetTime::Now),
        2 => Some(SetTime::At(read_time(r)?)),
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "set time",
                tag,
            })
        }
    })
}

fn put_opt(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            put_varint(out, v);
        }
    }
}

fn read_opt(r: &mut Reader<'_>, what: &'static str) -> Result<Option<u64>, DecodeError> {
    Ok(match r.u8(what)? {
        0 => None,
        1 => Some(r.varint(what)?),
        _ => return Err(DecodeError::Bad(what)),
    })
}

fn read_opt_u32(r: &mut Reader<'_>, what: &'static str) -> Result<Option<u32>, DecodeError> {
    read_opt(r, what)?
        .map(|v| u32::try_from(v).map_err(|_| DecodeError::Bad(what)))
        .transpose()
}

fn put_error(out: &mut Vec<u8>, e: &FsError) {
    put_varint(out, e.errno as u32 as u64);
    let mut end = e.reason.len().min(REASON_LEN_MAX);
    while !e.reason.is_char_boundary(end) {
        end -= 1;
    }
    put_bytes(out, &e.reason.as_bytes()[..end]);
}

fn read_error(r: &mut Reader<'_>) -> Result<FsError, DecodeError> {
    let errno = r.varint_u32("errno")?;
    if errno == 0 || errno > 4095 {
        return Err(DecodeError::Bad("errno"));
    }
    let reason = r.bytes("reason", REASON_LEN_MAX)?;
    Ok(FsError::new(
        errno as i32,
        String::from_utf8_lossy(&reason).into_owned(),
    ))
}

impl NsOp {
    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            NsOp::Init { creds } => {
                out.push(NS_INIT);
                put_creds(out, *creds);
            }
            NsOp::Create {
                parent,
                name,
                kind,
                perm,
                rdev,
                creds,
            } => {
                out.push(NS_CREATE);
                put_varint(out, *parent);
                put_bytes(out, name);
                out.push(kind.code());
                put_varint(out, u64::from(*perm));
                put_varint(out, u64::from(*rdev));
                put_creds(out, *creds);
            }
            NsOp::Mkdir {
                parent,
                name,
                perm,
                creds,
            } => {
                out.push(NS_MKDIR);
                put_varint(out, *parent);
                put_bytes(out, name);
                put_varint(out, u64::from(*perm));
                put_creds(out, *creds);
            }
            NsOp::Symlink {
                parent,
                name,
                target,
                creds,
            } => {
                out.push(NS_SYMLINK);
                put_varint(out, *parent);
                put_bytes(out, name);
                put_bytes(out, target);
                put_creds(out, *creds);
            }
            NsOp::Link { ino, parent, name } => {
                out.push(NS_LINK);
                put_varint(out, *ino);
                put_varint(out, *parent);
                put_bytes(out, name);
            }
            NsOp::Unlink { parent, name } | NsOp::Rmdir { parent, name } => {
                out.push(if matches!(self, NsOp::Unlink { .. }) {
                    NS_UNLINK
                } else {
                    NS_RMDIR
                });
                put_varint(out, *parent);
                put_bytes(out, name);
            }
            NsOp::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                out.push(NS_RENAME);
                put_varint(out, *parent);
                put_bytes(out, name);
                put_varint(out, *new_parent);
                put_bytes(out, new_name);
                put_varint(out, u64::from(*flags));
            }
            NsOp::SetAttr { ino, set } => {
                out.push(NS_SETATTR);
                put_varint(out, *ino);
                put_opt(out, set.perm.map(u64::from));
                put_opt(out, set.uid.map(u64::from));
                put_opt(out, set.gid.map(u64::from));
                put_opt(out, set.size);
                put_set_time(out, set.atime);
                put_set_time(out, set.mtime);
            }
            NsOp::Written { ino, end } => {
                out.push(NS_WRITTEN);
                put_varint(out, *ino);
                put_varint(out, *end);
            }
            NsOp::SetXattr {
                ino,
                name,
                value,
                flags,
            } => {
                out.push(NS_SETXATTR);
                put_varint(out, *ino);
                put_bytes(out, name);
                put_bytes(out, value);
                put_varint(out, u64::from(*flags));
            }
            NsOp::RemoveXattr { ino, name } => {
                out.push(NS_REMOVEXATTR);
                put_varint(out, *ino);
                put_bytes(out, name);
            }
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<NsOp, DecodeError> {
        Ok(match r.u8("namespace op")? {
            NS_INIT => NsOp::Init {
                creds: read_creds(r)?,
            },
            NS_CREATE => {
                let parent = r.varint("parent")?;
                let name = read_name(r)?;
                let code = r.u8("kind")?;
                let kind = FileKind::from_code(code).ok_or(DecodeError::UnknownTag {
                    what: "kind",
                    tag: code,
                })?;
                NsOp::Create {
                    parent,
                    name,
                    kind,
                    perm: read_perm(r)?,
                    rdev: r.varint_u32("rdev")?,
                    creds: read_creds(r)?,
                }
            }
            NS_MKDIR => NsOp::Mkdir {
                parent: r.varint("parent")?,
                name: read_name(r)?,
                perm: read_perm(r)?,
                creds: read_creds(r)?,
            },
            NS_SYMLINK => NsOp::Symlink {
                parent: r.varint("parent")?,
                name: read_name(r)?,
                target: r.bytes("target", SYMLINK_LEN_MAX * 4)?,
                creds: read_creds(r)?,
            },
            NS_LINK => NsOp::Link {
                ino: r.varint("ino")?,
                parent: r.varint("parent")?,
                name: read_name(r)?,
            },
            NS_UNLINK => NsOp::Unlink {
                parent: r.varint("parent")?,
                name: read_name(r)?,
            },
            NS_RMDIR => NsOp::Rmdir {
                parent: r.varint("parent")?,
                name: read_name(r)?,
            },
            NS_RENAME => NsOp::Rename {
                parent: r.varint("parent")?,
                name: read_name(r)?,
                new_parent: r.varint("new parent")?,
                new_name: read_name(r)?,
                flags: r.varint_u32("rename flags")?,
            },
            NS_SETATTR => {
                let ino = r.varint("ino")?;
                let perm = read_opt(r, "perm")?;
                if perm.is_some_and(|p| p > 0o7777) {
                    return Err(DecodeError::Bad("perm"));
                }
                NsOp::SetAttr {
                    ino,
                    set: SetAttr {
                        perm: perm.map(|p| p as u16),
                        uid: read_opt_u32(r, "uid")?,
                        gid: read_opt_u32(r, "gid")?,
                        size: read_opt(r, "size")?,
                        atime: read_set_time(r)?,
                        mtime: read_set_time(r)?,
                    },
                }
            }
            NS_WRITTEN => NsOp::Written {
                ino: r.varint("ino")?,
                end: r.varint("end")?,
            },
            NS_SETXATTR => NsOp::SetXattr {
                ino: r.varint("ino")?,
                name: r.bytes("xattr name", XATTR_NAME_LEN_MAX * 4)?,
                // Larger values decode, so that the state machine answers E2BIG.
                value: r.bytes("xattr value", WRITE_LEN_MAX)?,
                flags: r.varint_u32("xattr flags")?,
            },
            NS_REMOVEXATTR => NsOp::RemoveXattr {
                ino: r.varint("ino")?,
                name: r.bytes("xattr name", XATTR_NAME_LEN_MAX * 4)?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "namespace op",
                    tag,
                })
            }
        })
    }
}

impl DataOp {
    /// The file the operation changes.
    pub fn ino(&self) -> Ino {
        match self {
            DataOp::Write { ino, .. }
            | DataOp::Truncate { ino, .. }
            | DataOp::Zero { ino, .. }
            | DataOp::Punch { ino, .. } => *ino,
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            DataOp::Write {
                ino,
                index,
                offset,
                data,
            } => {
                out.push(DATA_WRITE);
                put_varint(out, *ino);
                put_varint(out, *index);
                // The extent as a data shard stores it, so that a replica keeps a large write's
                // bytes where they arrived (`chunk::apply_framed`).
                let mut head = Vec::with_capacity(WRITE_EXTENT_HEAD_MAX);
                head.push(crate::chunk::EXTENT_DATA);
                put_varint(&mut head, u64::from(*offset));
                put_varint(out, (head.len() + data.len()) as u64);
                out.extend_from_slice(&head);
                out.extend_from_slice(data);
            }
            DataOp::Truncate { ino, size } => {
                out.push(DATA_TRUNCATE);
                put_varint(out, *ino);
                put_varint(out, *size);
            }
            DataOp::Zero {
                ino,
                index,
                offset,
                len,
            } => {
                out.push(DATA_ZERO);
                put_varint(out, *ino);
                put_varint(out, *index);
                put_varint(out, u64::from(*offset));
                put_varint(out, u64::from(*len));
            }
            DataOp::Punch { ino, from, to } => {
                out.push(DATA_PUNCH);
                put_varint(out, *ino);
                put_varint(out, *from);
                put_varint(out, *to);
            }
        }
    }

    fn decode_from(r: &mut Reader<'_>) -> Result<DataOp, DecodeError> {
        Ok(match r.u8("data op")? {
            DATA_WRITE => {
                let ino = r.varint("ino")?;
                let index = r.varint("chunk index")?;
                let extent = r.bytes("data extent", WRITE_LEN_MAX + WRITE_EXTENT_HEAD_MAX)?;
                let mut e = Reader::new(&extent);
                let kind = e.u8("data extent kind")?;
                if kind != crate::chunk::EXTENT_DATA {
                    return Err(DecodeError::UnknownTag {
                        what: "data extent kind",
                        tag: kind,
                    });
                }
                let offset = e.varint_u32("chunk offset")?;
                let data = extent.slice(extent.len() - e.remaining()..);
                if data.len() > WRITE_LEN_MAX {
                    return Err(DecodeError::TooLarge("data"));
                }
                DataOp::Write {
                    ino,
                    index,
                    offset,
                    data,
                }
            }
            DATA_TRUNCATE => DataOp::Truncate {
                ino: r.varint("ino")?,
                size: r.varint("size")?,
            },
            DATA_ZERO => DataOp::Zero {
                ino: r.varint("ino")?,
                index: r.varint("chunk index")?,
                offset: r.varint_u32("chunk offset")?,
                len: r.varint_u32("length")?,
            },
            DATA_PUNCH => DataOp::Punch {
                ino: r.varint("ino")?,
                from: r.varint("first chunk")?,
                to: r.varint("end chunk")?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "data op",
                    tag,
                })
            }
        })
    }
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(32);
        put_varint(&mut out, self.client);
        put_varint(&mut out, self.number);
        match &self.op {
            Op::Ns(op) => {
                out.push(REQ_NS);
                op.encode_into(&mut out);
            }
            Op::Data(op) => {
                out.push(REQ_DATA);
                op.encode_into(&mut out);
            }
        }
        Bytes::from(out)
    }

    /// Decodes a request; payloads share `b`'s memory. Never panics.
    pub fn decode(b: &Bytes) -> Result<Request, DecodeError> {
        let mut r = Reader::new(b);
        let client = r.varint("client")?;
        let number = r.varint("number")?;
        let op = match r.u8("request kind")? {
            REQ_NS => Op::Ns(NsOp::decode_from(&mut r)?),
            REQ_DATA => Op::Data(DataOp::decode_from(&mut r)?),
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "request kind",
                    tag,
                })
            }
        };
        r.finish()?;
        Ok(Request { client, number, op })
    }
}

impl Reply {
    /// The reply's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(64);
        match self {
            Reply::Ns(Ok(reply)) => {
                out.push(REPLY_NS_OK);
                match reply {
                    NsReply::Attr(a) => {
                        out.push(NS_REPLY_ATTR);
                        put_varint(&mut out, a.ino);
                        put_attr(&mut out, a);
                    }
                    NsReply::Done => out.push(NS_REPLY_DONE),
                    NsReply::Entries { attr, dirs } => {
                        assert!(dirs.len() <= ENTRY_DIRS_MAX, "{} directories", dirs.len());
                        out.push(NS_REPLY_ENTRIES);
                        match attr {
                            None => out.push(0),
                            Some(a) => {
                                out.push(1);
                                put_varint(&mut out, a.ino);
                                put_attr(&mut out, a);
                            }
                        }
                        put_varint(&mut out, dirs.len() as u64);
                        for d in dirs {
                            put_varint(&mut out, d.ino);
                            put_attr(&mut out, d);
                        }
                    }
                }
            }
            Reply::Data(Ok(DataReply::Done)) => out.push(REPLY_DATA_OK),
            Reply::Data(Ok(DataReply::More)) => out.push(REPLY_DATA_MORE),
            Reply::Ns(Err(e)) => {
                out.push(REPLY_ERR_NS);
                put_error(&mut out, e);
            }
            Reply::Data(Err(e)) => {
                out.push(REPLY_ERR_DATA);
                put_error(&mut out, e);
            }
            Reply::Stale { last } => {
                out.push(REPLY_STALE);
                put_varint(&mut out, *last);
            }
            Reply::Retry => out.push(REPLY_RETRY),
        }
        Bytes::from(out)
    }

    /// Decodes a reply. Never panics.
    pub fn decode(b: &Bytes) -> Result<Reply, DecodeError> {
        let mut r = Reader::new(b);
        let reply = match r.u8("reply")? {
            REPLY_NS_OK => match r.u8("namespace reply")? {
                NS_REPLY_ATTR => {
                    let ino = r.varint("ino")?;
                    Reply::Ns(Ok(NsReply::Attr(read_attr(&mut r, ino)?)))
                }
                NS_REPLY_DONE => Reply::Ns(Ok(NsReply::Done)),
                NS_REPLY_ENTRIES => {
                    let attr = match r.u8("attributes present")? {
                        0 => None,
                        1 => {
                            let ino = r.varint("ino")?;
                            Some(read_attr(&mut r, ino)?)
                        }
                        tag => {
                            return Err(DecodeError::UnknownTag {
                                what: "attributes present",
                                tag,
                            })
                        }
                    };
                    let n = r.varint("directory count")?;
                    if n > ENTRY_DIRS_MAX as u64 {
                        return Err(DecodeError::Bad("more directories than a change touches"));
                    }
                    let mut dirs = Vec::with_capacity(n as usize);
                    for _ in 0..n {
                        let ino = r.varint("ino")?;
                        dirs.push(read_attr(&mut r, ino)?);
                    }
                    Reply::Ns(Ok(NsReply::Entries { attr, dirs }))
                }
                tag => {
                    return Err(DecodeError::UnknownTag {
                        what: "namespace reply",
                        tag,
                    })
                }
            },
            REPLY_DATA_OK => Reply::Data(Ok(DataReply::Done)),
            REPLY_DATA_MORE => Reply::Data(Ok(DataReply::More)),
            REPLY_RETRY => Reply::Retry,
            REPLY_ERR_NS => Reply::Ns(Err(read_error(&mut r)?)),
            REPLY_ERR_DATA => Reply::Data(Err(read_error(&mut r)?)),
            REPLY_STALE => Reply::Stale {
                last: r.varint("last")?,
            },
            tag => return Err(DecodeError::UnknownTag { what: "reply", tag }),
        };
        r.finish()?;
        Ok(reply)
    }
}

impl NsRead {
    /// The read's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(32);
        match self {
            NsRead::Lookup { parent, name } => {
                out.push(READ_LOOKUP);
                put_varint(&mut out, *parent);
                put_bytes(&mut out, name);
            }
            NsRead::GetAttr { ino } => {
                out.push(READ_GETATTR);
                put_varint(&mut out, *ino);
            }
            NsRead::ReadDir { ino, after, limit } => {
                out.push(READ_READDIR);
                put_varint(&mut out, *ino);
                match after {
                    None => out.push(0),
                    Some(a) => {
                        out.push(1);
                        put_bytes(&mut out, a);
                    }
                }
                put_varint(&mut out, u64::from(*limit));
            }
            NsRead::ReadLink { ino } => {
                out.push(READ_READLINK);
                put_varint(&mut out, *ino);
            }
            NsRead::GetXattr { ino, name } => {
                out.push(READ_GETXATTR);
                put_varint(&mut out, *ino);
                put_bytes(&mut out, name);
            }
            NsRead::ListXattr { ino } => {
                out.push(READ_LISTXATTR);
                put_varint(&mut out, *ino);
            }
            NsRead::History { ino } => {
                out.push(READ_HISTORY);
                put_varint(&mut out, *ino);
            }
            NsRead::StatFs => out.push(READ_STATFS),
        }
        Bytes::from(out)
    }

    /// Decodes a namespace read. Never panics.
    pub fn decode(b: &Bytes) -> Result<NsRead, DecodeError> {
        let mut r = Reader::new(b);
        let read = match r.u8("namespace read")? {
            READ_LOOKUP => NsRead::Lookup {
                parent: r.varint("parent")?,
                name: read_name(&mut r)?,
            },
            READ_GETATTR => NsRead::GetAttr {
                ino: r.varint("ino")?,
            },
            READ_READDIR => {
                let ino = r.varint("ino")?;
                let after = match r.u8("readdir after")? {
                    0 => None,
                    1 => Some(read_name(&mut r)?),
                    _ => return Err(DecodeError::Bad("readdir after")),
                };
                let limit = r.varint_u32("readdir limit")?;
                if limit == 0 || limit as usize > READDIR_ENTRIES_MAX {
                    return Err(DecodeError::Bad("readdir limit"));
                }
                NsRead::ReadDir { ino, after, limit }
            }
            READ_READLINK => NsRead::ReadLink {
                ino: r.varint("ino")?,
            },
            READ_GETXATTR => NsRead::GetXattr {
                ino: r.varint("ino")?,
                name: r.bytes("xattr name", XATTR_NAME_LEN_MAX * 4)?,
            },
            READ_LISTXATTR => NsRead::ListXattr {
                ino: r.varint("ino")?,
            },
            READ_HISTORY => NsRead::History {
                ino: r.varint("ino")?,
            },
            READ_STATFS => NsRead::StatFs,
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "namespace read",
                    tag,
                })
            }
        };
        r.finish()?;
        Ok(read)
    }
}

impl DataRead {
    /// The read's bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(24);
        match self {
            DataRead::Chunk {
                ino,
                index,
                offset,
                len,
            } => {
                out.push(READ_CHUNK);
                put_varint(&mut out, *ino);
                put_varint(&mut out, *index);
                put_varint(&mut out, u64::from(*offset));
                put_varint(&mut out, u64::from(*len));
            }
            DataRead::Plan { ino, index } => {
                out.push(READ_PLAN);
                put_varint(&mut out, *ino);
                put_varint(&mut out, *index);
            }
        }
        Bytes::from(out)
    }

    /// Decodes a data read. Never panics.
    pub fn decode(b: &Bytes) -> Result<DataRead, DecodeError> {
        let mut r = Reader::new(b);
        let read = match r.u8("data read")? {
            READ_CHUNK => DataRead::Chunk {
                ino: r.varint("ino")?,
                index: r.varint("chunk index")?,
                offset: r.varint_u32("chunk offset")?,
                len: r.varint_u32("read length")?,
            },
            READ_PLAN => DataRead::Plan {
                ino: r.varint("ino")?,
                index: r.varint("chunk index")?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "data read",
                    tag,
                })
            }
        };
        r.finish()?;
        Ok(read)
    }
}

/// Whether the encoded read `request` is a [`DataRead::Plan`] (the node then hands its log's
/// buffered records to the files first, so that the plan can name them).
pub fn is_plan_read(request: &[u8]) -> bool {
    request.first() == Some(&READ_PLAN)
}

/// Encodes the answer to a read (namespace or data).
pub fn encode_read_reply(reply: &Result<ReadReply, FsError>) -> Bytes {
    let mut out = Vec::with_capacity(read_reply_len_hint(reply));
    put_read_reply(&mut out, reply);
    Bytes::from(out)
}

/// About the length of [`encode_read_reply`] of `reply` (exact or above for bytes).
pub fn read_reply_len_hint(reply: &Result<ReadReply, FsError>) -> usize {
    match reply {
        Ok(ReadReply::Bytes(b)) => 1 + 10 + b.len(),
        _ => 64,
    }
}

/// Appends what [`encode_read_reply`] of `Ok(ReadReply::Bytes(b))` puts before `b` itself, for
/// a `b` of `len` bytes: the reply is then this head followed by `b`.
pub fn put_read_reply_bytes_head(out: &mut Vec<u8>, len: usize) {
    out.push(READ_REPLY_BYTES);
    put_varint(out, len as u64);
}

/// Appends [`encode_read_reply`] of `reply` to `out`.
pub fn put_read_reply(out: &mut Vec<u8>, reply: &Result<ReadReply, FsError>) {
    match reply {
        Err(e) => {
            out.push(READ_REPLY_ERR);
            put_error(out, e);
        }
        Ok(ReadReply::Attr(a)) => {
            out.push(READ_REPLY_ATTR);
            put_varint(out, a.ino);
            put_attr(out, a);
        }
        Ok(ReadReply::Dir { entries, more }) => {
            out.push(READ_REPLY_DIR);
            out.push(u8::from(*more));
            put_varint(out, entries.len() as u64);
            for e in entries {
                put_bytes(out, &e.name);
                put_varint(out, e.ino);
                out.push(e.kind.code());
            }
        }
        Ok(ReadReply::Bytes(b)) => {
            put_read_reply_bytes_head(out, b.len());
            out.extend_from_slice(b);
        }
        Ok(ReadReply::Names(names)) => {
            out.push(READ_REPLY_NAMES);
            put_varint(out, names.len() as u64);
            for n in names {
                put_bytes(out, n);
            }
        }
        Ok(ReadReply::History(h)) => {
            out.push(READ_REPLY_HISTORY);
            put_varint(out, h.len() as u64);
            for e in h {
                put_varint(out, e.version);
                put_varint(out, e.hlc.wall_us);
                put_varint(out, u64::from(e.hlc.logical));
            }
        }
        Ok(ReadReply::StatFs { inodes }) => {
            out.push(READ_REPLY_STATFS);
            put_varint(out, *inodes);
        }
        Ok(ReadReply::Plan(None)) => {
            out.push(READ_REPLY_PLAN);
            out.push(0);
        }
        Ok(ReadReply::Plan(Some(plan))) => {
            out.push(READ_REPLY_PLAN);
            out.push(1);
            put_varint(out, u64::from(plan.len));
            put_varint(out, plan.files.len() as u64);
            for f in &plan.files {
                put_bytes(out, f.path.as_os_str().as_bytes());
                put_varint(out, f.dev);
                put_varint(out, f.ino);
            }
            put_varint(out, plan.pieces.len() as u64);
            for p in &plan.pieces {
                put_varint(out, u64::from(p.at));
                put_varint(out, u64::from(p.len));
                put_varint(out, u64::from(p.file));
                put_varint(out, p.offset);
            }
        }
    }
}

fn read_plan(r: &mut Reader<'_>) -> Result<Option<ChunkPlan>, DecodeError> {
    match r.u8("plan")? {
        0 => return Ok(None),
        1 => {}
        _ => return Err(DecodeError::Bad("plan")),
    }
    let len = r.varint_u32("plan length")?;
    let n = r.count("plan files", PLAN_FILES_MAX, 3)?;
    let mut files = Vec::with_capacity(n);
    for _ in 0..n {
        let path = r.bytes("plan file path", PLAN_PATH_BYTES_MAX)?;
        let path = PathBuf::from(OsStr::from_bytes(&path));
        if !path.is_absolute() {
            return Err(DecodeError::Bad("plan file path"));
        }
        files.push(FilePlace {
            path,
            dev: r.varint("plan file device")?,
            ino: r.varint("plan file inode")?,
        });
    }
    let n = r.count("plan pieces", PLAN_PIECES_MAX, 4)?;
    let mut pieces = Vec::with_capacity(n);
    for _ in 0..n {
        pieces.push(PlanPiece {
            at: r.varint_u32("plan piece start")?,
            len: r.varint_u32("plan piece length")?,
            file: r.varint_u32("plan piece file")?,
            offset: r.varint("plan piece offset")?,
        });
    }
    let plan = ChunkPlan { len, files, pieces };
    plan.check().map_err(DecodeError::Bad)?;
    Ok(Some(plan))
}

/// Decodes the answer to a read. Never panics.
pub fn decode_read_reply(b: &Bytes) -> Result<Result<ReadReply, FsError>, DecodeError> {
    let mut r = Reader::new(b);
    let reply = match r.u8("read reply")? {
        READ_REPLY_ERR => Err(read_error(&mut r)?),
        READ_REPLY_ATTR => {
            let ino = r.varint("ino")?;
            Ok(ReadReply::Attr(read_attr(&mut r, ino)?))
        }
        READ_REPLY_DIR => {
            let more = match r.u8("readdir more")? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Bad("readdir more")),
            };
            let n = r.count("directory entries", READDIR_ENTRIES_MAX, 3)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let name = read_name(&mut r)?;
                let ino = r.varint("ino")?;
                let code = r.u8("kind")?;
                let kind = FileKind::from_code(code).ok_or(DecodeError::UnknownTag {
                    what: "kind",
                    tag: code,
                })?;
                entries.push(DirEntry { name, ino, kind });
            }
            Ok(ReadReply::Dir { entries, more })
        }
        READ_REPLY_BYTES => Ok(ReadReply::Bytes(r.bytes("bytes", WRITE_LEN_MAX)?)),
        READ_REPLY_NAMES => {
            let n = r.count("xattr names", XATTRS_MAX, 1)?;
            let mut names = Vec::with_capacity(n);
            for _ in 0..n {
                names.push(r.bytes("xattr name", XATTR_NAME_LEN_MAX * 4)?);
            }
            Ok(ReadReply::Names(names))
        }
        READ_REPLY_HISTORY => {
            let n = r.count("history", HISTORY_MAX, 3)?;
            let mut h = Vec::with_capacity(n);
            for _ in 0..n {
                h.push(HistoryEntry {
                    version: r.varint("version")?,
                    hlc: Hlc {
                        wall_us: r.varint("stamp")?,
                        logical: r.varint_u32("stamp")?,
                    },
                });
            }
            Ok(ReadReply::History(h))
        }
        READ_REPLY_STATFS => Ok(ReadReply::StatFs {
            inodes: r.varint("inodes")?,
        }),
        READ_REPLY_PLAN => Ok(ReadReply::Plan(read_plan(&mut r)?)),
        tag => {
            return Err(DecodeError::UnknownTag {
                what: "read reply",
                tag,
            })
        }
    };
    r.finish()?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use derechofs_tests::rng::Rng;

    use super::*;
    use crate::inode::FileKind;

    fn attr(ino: Ino) -> Attr {
        Attr {
            ino,
            kind: FileKind::Symlink,
            perm: 0o4755,
            uid: u32::MAX,
            gid: 7,
            nlink: 3,
            size: u64::MAX,
            rdev: 0x0103,
            atime: Timespec {
                secs: -1,
                nanos: 999_999_999,
            },
            mtime: Timespec::from_us(5),
            ctime: Timespec::default(),
            crtime: Timespec {
                secs: i64::MAX,
                nanos: 0,
            },
        }
    }

    fn requests() -> Vec<Request> {
        let name = Bytes::from_static(b"name");
        let creds = Creds { uid: 1, gid: 2 };
        let ops = vec![
            Op::Ns(NsOp::Init { creds }),
            Op::Ns(NsOp::Create {
                parent: 1,
                name: name.clone(),
                kind: FileKind::CharDevice,
                perm: 0o7777,
                rdev: 9,
                creds,
            }),
            Op::Ns(NsOp::Mkdir {
                parent: u64::MAX,
                name: name.clone(),
                perm: 0,
                creds,
            }),
            Op::Ns(NsOp::Symlink {
                parent: 1,
                name: name.clone(),
                target: Bytes::from_static(b"t"),
                creds,
            }),
            Op::Ns(NsOp::Link {
                ino: 5,
                parent: 1,
                name: name.clone(),
            }),
            Op::Ns(NsOp::Unlink {
                parent: 1,
                name: name.clone(),
            }),
            Op::Ns(NsOp::Rmdir {
                parent: 1,
                name: name.clone(),
            }),
            Op::Ns(NsOp::Rename {
                parent: 1,
                name: name.clone(),
                new_parent: 2,
                new_name: Bytes::new(),
                flags: RENAME_EXCHANGE,
            }),
            Op::Ns(NsOp::SetAttr {
                ino: 3,
                set: SetAttr {
                    perm: Some(0o644),
                    uid: Some(0),
                    gid: None,
                    size: Some(1 << 40),
                    atime: Some(SetTime::Now),
                    mtime: Some(SetTime::At(Timespec {
                        secs: -100,
                        nanos: 1,
                    })),
                },
            }),
            Op::Ns(NsOp::SetAttr {
                ino: 3,
                set: SetAttr::default(),
            }),
            Op::Ns(NsOp::Written { ino: 3, end: 77 }),
            Op::Ns(NsOp::SetXattr {
                ino: 3,
                name: Bytes::from_static(b"user.x"),
                value: Bytes::from_static(b"v"),
                flags: XATTR_CREATE,
            }),
            Op::Ns(NsOp::RemoveXattr {
                ino: 3,
                name: Bytes::from_static(b"user.x"),
            }),
            Op::Data(DataOp::Write {
                ino: 3,
                index: 1 << 33,
                offset: 4095,
                data: Bytes::from_static(b"data"),
            }),
            Op::Data(DataOp::Truncate { ino: 3, size: 0 }),
            Op::Data(DataOp::Zero {
                ino: 3,
                index: 7,
                offset: 100,
                len: 4000,
            }),
            Op::Data(DataOp::Punch {
                ino: 3,
                from: 2,
                to: 1 << 30,
            }),
        ];
        ops.into_iter()
            .enumerate()
            .map(|(i, op)| Request {
                client: u64::MAX - i as u64,
                number: i as u64 + 1,
                op,
            })
            .collect()
    }

    fn replies() -> Vec<Reply> {
        vec![
            Reply::Ns(Ok(NsReply::Attr(attr(9)))),
            Reply::Ns(Ok(NsReply::Done)),
            Reply::Ns(Ok(NsReply::Entries {
                attr: Some(attr(12)),
                dirs: vec![attr(1)],
            })),
            Reply::Ns(Ok(NsReply::Entries {
                attr: None,
                dirs: vec![attr(1), attr(7)],
            })),
            Reply::Ns(Ok(NsReply::Entries {
                attr: None,
                dirs: vec![],
            })),
            Reply::Data(Ok(DataReply::Done)),
            Reply::Ns(Err(FsError::new(libc::ENOENT, "no entry \"é\""))),
            Reply::Data(Err(FsError::new(libc::EFBIG, ""))),
            Reply::Stale { last: 12 },
            Reply::Retry,
            Reply::Data(Ok(DataReply::More)),
        ]
    }

    fn reads() -> Vec<Bytes> {
        let name = Bytes::from_static(b"n");
        let ns = vec![
            NsRead::Lookup {
                parent: 1,
                name: name.clone(),
            },
            NsRead::GetAttr { ino: 2 },
            NsRead::ReadDir {
                ino: 1,
                after: Some(name.clone()),
                limit: 10,
            },
            NsRead::ReadDir {
                ino: 1,
                after: None,
                limit: 1,
            },
            NsRead::ReadLink { ino: 4 },
            NsRead::GetXattr {
                ino: 4,
                name: name.clone(),
            },
            NsRead::ListXattr { ino: 4 },
            NsRead::History { ino: 4 },
            NsRead::StatFs,
        ];
        let mut out: Vec<Bytes> = ns
            .into_iter()
            .map(|r| {
                let b = r.encode();
                assert_eq!(NsRead::decode(&b), Ok(r));
                b
            })
            .collect();
        let chunk = DataRead::Chunk {
            ino: 1,
            index: 2,
            offset: 3,
            len: 4,
        };
        assert_eq!(DataRead::decode(&chunk.encode()), Ok(chunk.clone()));
        out.push(chunk.encode());
        let plan = DataRead::Plan { ino: 1, index: 2 };
        assert_eq!(DataRead::decode(&plan.encode()), Ok(plan.clone()));
        out.push(plan.encode());
        out
    }

    fn plan() -> ChunkPlan {
        ChunkPlan {
            len: 9000,
            files: vec![
                FilePlace {
                    path: PathBuf::from("/run/x/shard-1/seg-00000001.log"),
                    dev: 0xfd01,
                    ino: 77,
                },
                FilePlace {
                    path: PathBuf::from("/b"),
                    dev: u64::MAX,
                    ino: 0,
                },
            ],
            pieces: vec![
                PlanPiece {
                    at: 0,
                    len: 10,
                    file: 1,
                    offset: 4096,
                },
                PlanPiece {
                    at: 100,
                    len: 8900,
                    file: 0,
                    offset: u64::from(u32::MAX) + 5,
                },
            ],
        }
    }

    #[test]
    fn a_plan_reply_that_breaks_its_rules_is_refused() {
        let mut bad = Vec::new();
        // Pieces overlapping, past the length, naming no file, and a relative path.
        for change in 0..4 {
            let mut p = plan();
            match change {
                0 => p.pieces[1].at = 5,
                1 => p.len = 8999,
                2 => p.pieces[0].file = 2,
                _ => p.files[1].path = PathBuf::from("rel"),
            }
            bad.push(encode_read_reply(&Ok(ReadReply::Plan(Some(p)))));
        }
        for b in bad {
            assert!(decode_read_reply(&b).is_err(), "{b:?} decoded");
        }
        let good = encode_read_reply(&Ok(ReadReply::Plan(Some(plan()))));
        assert_eq!(
            decode_read_reply(&good),
            Ok(Ok(ReadReply::Plan(Some(plan()))))
        );
    }

    fn read_replies() -> Vec<Result<ReadReply, FsError>> {
        vec![
            Ok(ReadReply::Attr(attr(1))),
            Ok(ReadReply::Dir {
                entries: vec![DirEntry {
                    name: Bytes::from_static(b"a"),
                    ino: 2,
                    kind: FileKind::Fifo,
                }],
                more: true,
            }),
            Ok(ReadReply::Bytes(Bytes::from_static(b"bytes"))),
            Ok(ReadReply::Names(vec![Bytes::from_static(b"user.a")])),
            Ok(ReadReply::History(vec![HistoryEntry {
                version: 1 << 32,
                hlc: Hlc {
                    wall_us: 5,
                    logical: 6,
                },
            }])),
            Ok(ReadReply::StatFs { inodes: 3 }),
            Ok(ReadReply::Plan(None)),
            Ok(ReadReply::Plan(Some(plan()))),
            Err(FsError::new(libc::EAGAIN, "wait")),
        ]
    }

    #[test]
    fn every_request_reply_read_and_read_reply_round_trips() {
        for r in requests() {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
        for r in replies() {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
        reads();
        for r in read_replies() {
            assert_eq!(decode_read_reply(&encode_read_reply(&r)), Ok(r));
        }
    }

    /// Runs every decoder on `b`: none may panic, and whatever decodes must encode back to a
    /// value that decodes the same (decoding is a function of the bytes).
    fn decode_everything(b: &Bytes) {
        if let Ok(r) = Request::decode(b) {
            assert_eq!(Request::decode(&r.encode()), Ok(r));
        }
        if let Ok(r) = Reply::decode(b) {
            assert_eq!(Reply::decode(&r.encode()), Ok(r));
        }
        if let Ok(r) = NsRead::decode(b) {
            assert_eq!(NsRead::decode(&r.encode()), Ok(r));
        }
        if let Ok(r) = DataRead::decode(b) {
            assert_eq!(DataRead::decode(&r.encode()), Ok(r));
        }
        if let Ok(r) = decode_read_reply(b) {
            assert_eq!(decode_read_reply(&encode_read_reply(&r)), Ok(r));
        }
        let _ = crate::inode::Inode::decode(1, b);
    }

    #[test]
    fn op_decoders_fuzz_random_bytes_bit_flips_and_truncations_never_panic() {
        let mut rng = Rng::new(0xF5);
        let mut valid: Vec<Bytes> = requests().iter().map(Request::encode).collect();
        valid.extend(replies().iter().map(Reply::encode));
        valid.extend(reads());
        valid.extend(read_replies().iter().map(encode_read_reply));
        for v in &valid {
            for cut in 0..v.len() {
                decode_everything(&v.slice(..cut));
            }
            for _ in 0..200 {
                let mut b = v.to_vec();
                for _ in 0..rng.between(1, 3) {
                    let i = rng.below(b.len() as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                decode_everything(&Bytes::from(b));
            }
        }
        for _ in 0..20_000 {
            let len = rng.below(40) as usize;
            let b: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            decode_everything(&Bytes::from(b));
        }
    }

    #[test]
    fn a_huge_count_in_a_short_input_allocates_nothing_and_fails() {
        // A directory page claiming 4096 entries in 3 bytes.
        let b = Bytes::from(vec![READ_REPLY_DIR, 0, 0x80, 0x20]);
        assert!(decode_read_reply(&b).is_err());
        let b = Bytes::from(vec![READ_REPLY_HISTORY, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]);
        assert!(decode_read_reply(&b).is_err());
    }
}
