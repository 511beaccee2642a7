//! The backend seam: where the bytes of a log live.
//!
//! A backend is a flat directory of named files. The log only ever appends to files, reads them,
//! grows them, syncs them, removes whole files, and replaces small files atomically. Three
//! implementations share one contract and one conformance suite (`tests/backend_conformance.rs`):
//! [`FileBackend`] (real files, reads through memory maps), [`MemoryBackend`] (volatile), and
//! [`CrashingBackend`] (keeps a separate durable image, and can crash, tear writes and fail I/O on
//! purpose).
//!
//! # To ensure correctness
//! Implementations must provide:
//! - `write_at` followed by `read_at` of the same range returns the written bytes, before any sync;
//! - after `sync_data` on a file returns, every byte written to it before the call survives a
//!   crash, and so does the file's existence;
//! - `replace` is atomic across a crash: afterwards the file holds the old bytes or the new ones,
//!   and once it returns the new bytes survive a crash;
//! - `allocate` never shrinks a file and fills new space with zeros;
//! - files never shrink while open, so a memory map handed out by `read_at` stays valid.

mod crashing;
mod file;
mod memory;

use std::fmt::Debug;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

pub use crashing::{CrashOptions, CrashingBackend};
pub use file::FileBackend;
pub use memory::MemoryBackend;

/// A flat directory of named files.
pub trait Backend: Send + Sync + Debug {
    /// Names of the files present, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens `name`, creating it empty if `create` is set and it does not exist.
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BackendFile>>;
    /// Removes `name`; removing a missing file is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Reads a whole small file, or `None` if it does not exist.
    fn read_all(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Replaces `name` with `data` atomically and durably (temp file, sync, rename, sync the
    /// directory).
    fn replace(&self, name: &str, data: &[u8]) -> io::Result<()>;
}

/// Where a backend file lies in the local file system, for a reader in another process on the
/// same machine: its path, and the device and inode numbers that name it (a reader checks them
/// on the file it opens, so a path that now names another file is never read).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FilePlace {
    /// The file's path.
    pub path: std::path::PathBuf,
    /// `st_dev` of the file.
    pub dev: u64,
    /// `st_ino` of the file.
    pub ino: u64,
}

/// One open file of a backend.
#[allow(clippy::len_without_is_empty)] // An empty file is not a state the log asks about.
pub trait BackendFile: Send + Sync + Debug {
    /// Where the file lies in the local file system; `None` for a file that is not one there
    /// (the memory backends).
    fn place(&self) -> Option<&FilePlace> {
        None
    }
    /// The file's length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Reads `len` bytes at `offset`; fails with `UnexpectedEof` past the end of the file.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes>;
    /// Writes `data` at `offset`, growing the file if needed.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Writes `parts` one after the other from `offset`, as `write_at` of their concatenation
    /// would (a crash may tear it the same way).
    fn write_vectored_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let mut at = offset;
        for p in parts {
            self.write_at(at, p)?;
            at += p.len() as u64;
        }
        Ok(())
    }
    /// Grows the file to at least `len` bytes, filled with zeros; never shrinks it.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes every byte written so far durable.
    fn sync_data(&self) -> io::Result<()>;
}

pub(crate) fn eof(offset: u64, len: usize, file_len: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at {offset} past the end of the file ({file_len} bytes)"),
    )
}

pub(crate) fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad file name {name:?}"),
        ))
    }
}
