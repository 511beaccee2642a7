//! The keys the file system's state machines write in a shard's log (`docs/FORMATS.md`).
//!
//! Every key starts with [`FS_KEY_PREFIX`] and a one-byte tag; integers in keys are big-endian so
//! that byte order is numeric order, which makes a directory's entries, an inode's extended
//! attributes and a file's chunks contiguous ranges that a prefix scan reads in order.

use crate::inode::Ino;

/// First byte of every file system key (the K/V store keeps `0xFF` for itself).
pub const FS_KEY_PREFIX: u8 = 0xFE;

/// Namespace: the next inode number to allocate.
pub const TAG_NEXT_INO: u8 = b'N';
/// Namespace: an inode record.
pub const TAG_INODE: u8 = b'I';
/// Namespace: a directory entry.
pub const TAG_DIRENT: u8 = b'D';
/// Namespace: an extended attribute.
pub const TAG_XATTR: u8 = b'X';
/// Both: the last request applied for a client, with its reply.
pub const TAG_CLIENT: u8 = b'C';
/// Data: a chunk's state (base length, extents since the base).
pub const TAG_CHUNK: u8 = b'M';
/// Data: a chunk's base (compacted contents).
pub const TAG_BASE: u8 = b'B';
/// Data: one extent written after a chunk's base.
pub const TAG_EXTENT: u8 = b'E';

fn with(tag: u8, capacity: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + capacity);
    k.push(FS_KEY_PREFIX);
    k.push(tag);
    k
}

/// The key of the inode-number counter.
pub fn next_ino() -> Vec<u8> {
    with(TAG_NEXT_INO, 0)
}

/// The key of inode `ino`.
pub fn inode(ino: Ino) -> Vec<u8> {
    let mut k = with(TAG_INODE, 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// The inode an inode-record key names; `None` for every other key.
pub fn inode_of(key: &[u8]) -> Option<Ino> {
    match key {
        [FS_KEY_PREFIX, TAG_INODE, rest @ ..] => Some(Ino::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

/// The inode an extended-attribute key names; `None` for every other key.
pub fn xattr_inode_of(key: &[u8]) -> Option<Ino> {
    match key {
        [FS_KEY_PREFIX, TAG_XATTR, rest @ ..] if rest.len() >= 8 => {
            Some(Ino::from_be_bytes(rest[..8].try_into().ok()?))
        }
        _ => None,
    }
}

/// The directory and name a directory-entry key names; `None` for every other key.
pub fn dirent_of(key: &[u8]) -> Option<(Ino, &[u8])> {
    match key {
        [FS_KEY_PREFIX, TAG_DIRENT, rest @ ..] if rest.len() >= 8 => {
            let (parent, name) = rest.split_at(8);
            Some((Ino::from_be_bytes(parent.try_into().ok()?), name))
        }
        _ => None,
    }
}

/// The prefix of every entry of directory `parent`.
pub fn dirents(parent: Ino) -> Vec<u8> {
    let mut k = with(TAG_DIRENT, 8);
    k.extend_from_slice(&parent.to_be_bytes());
    k
}

/// The key of entry `name` of directory `parent`.
pub fn dirent(parent: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = dirents(parent);
    k.extend_from_slice(name);
    k
}

/// The prefix of every extended attribute of `ino`.
pub fn xattrs(ino: Ino) -> Vec<u8> {
    let mut k = with(TAG_XATTR, 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// The key of extended attribute `name` of `ino`.
pub fn xattr(ino: Ino, name: &[u8]) -> Vec<u8> {
    let mut k = xattrs(ino);
    k.extend_from_slice(name);
    k
}

/// The key of a client's last applied request.
pub fn client(client: u64) -> Vec<u8> {
    let mut k = with(TAG_CLIENT, 8);
    k.extend_from_slice(&client.to_be_bytes());
    k
}

fn chunk_key(tag: u8, ino: Ino, index: u64, extra: usize) -> Vec<u8> {
    let mut k = with(tag, 16 + extra);
    k.extend_from_slice(&ino.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The prefix of the chunk states of every chunk of `ino`.
pub fn chunks(ino: Ino) -> Vec<u8> {
    let mut k = with(TAG_CHUNK, 8);
    k.extend_from_slice(&ino.to_be_bytes());
    k
}

/// The key of the state of chunk `index` of `ino`.
pub fn chunk(ino: Ino, index: u64) -> Vec<u8> {
    chunk_key(TAG_CHUNK, ino, index, 0)
}

/// The index of the chunk a chunk-state key names.
pub fn chunk_index_of(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.get(10..18)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

/// The key of the base of chunk `index` of `ino`.
pub fn base(ino: Ino, index: u64) -> Vec<u8> {
    chunk_key(TAG_BASE, ino, index, 0)
}

/// The key of extent `slot` of chunk `index` of `ino`.
pub fn extent(ino: Ino, index: u64, slot: u32) -> Vec<u8> {
    let mut k = chunk_key(TAG_EXTENT, ino, index, 4);
    k.extend_from_slice(&slot.to_be_bytes());
    k
}
