//! The DerechoFS file system (DESIGN §4–§5): inodes, directory entries and file chunks as
//! versioned objects in shards; the deterministic state machines that apply file system
//! operations in each shard's order; snapshot views at a time; errors as errno. No FUSE types:
//! the mount adapter calls [`FileSystem`] method by method.
//!
//! The layers, bottom up:
//! - [`store`]: the read trait over "a shard's state at version v" ([`Store`]), which
//!   `derechofs_storage::Log` implements, and the overlay of a version being built;
//! - [`key`], [`inode`], [`op`]: the key layout, inode records, the typed operations, reads and
//!   replies with their byte encodings (`docs/FORMATS.md`);
//! - [`namespace`] and [`chunk`]: the two state machines (inodes and entries; file data as bases
//!   and extents, placed on data shards by [`chunk::placement`]);
//! - [`shard`]: one shard replica's machine, with per-client deduplication, and reads at a
//!   version or time;
//! - [`shards`]: how a client reaches shards ([`Shards`]), and [`LocalShards`] in process;
//! - [`filesystem`]: the client facade, with `NAME@STAMP` resolution ([`snapshot`], [`time`]),
//!   and [`attr_cache`], its cache of live attributes kept coherent by the namespace feed.

pub mod attr_cache;
pub mod chunk;
pub mod codec;
mod error;
pub mod filesystem;
pub mod inode;
pub mod key;
pub mod local;
pub mod namespace;
pub mod op;
pub mod shard;
pub mod shards;
pub mod snapshot;
pub mod store;
pub mod time;

pub use attr_cache::AttrCache;
pub use derechofs_core::kv::ReadAt;
pub use error::{errno_name, FsError, FsResult};
pub use filesystem::{Fallocate, FileSystem, FsConfig, StatFs, HISTORY_XATTR};
pub use inode::{Attr, FileKind, Ino, Timespec, ROOT_INO};
pub use op::{
    Creds, DirEntry, SetAttr, SetTime, RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE,
    XATTR_REPLACE,
};
pub use shard::FsShard;
pub use shards::{Clock, FsLayout, LocalShards, ShardRef, Shards, Space};
pub use store::Store;
