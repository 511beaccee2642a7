//! The file backend: real files in one directory, written with `pwrite`, read through memory maps.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;
use memmap2::Mmap;

use super::{check_name, eof, Backend, BackendFile, FilePlace};

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A backend over one directory of the local file system.
#[derive(Debug, Clone)]
pub struct FileBackend {
    dir: PathBuf,
}

impl FileBackend {
    /// Uses `dir` as the backend, creating it if needed.
    pub fn open(dir: impl AsRef<Path>) -> io::Result<FileBackend> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir)?;
        Ok(FileBackend { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> io::Result<PathBuf> {
        check_name(name)?;
        Ok(self.dir.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Backend for FileBackend {
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                if let Some(name) = entry.file_name().to_str() {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BackendFile>> {
        let path = self.path(name)?;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(&path)?;
        if !existed {
            // The new name must survive a crash once the file's data is synced.
            self.sync_dir()?;
        }
        let meta = file.metadata()?;
        let place = FilePlace {
            path: fs::canonicalize(&path)?,
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok(Arc::new(MappedFile {
            file,
            map: RwLock::new(None),
            place,
        }))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.path(name)?) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn read_all(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.path(name)?) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn replace(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path(name)?;
        let temp = self.dir.join(format!(".{name}.tmp"));
        {
            let mut file = File::create(&temp)?;
            file.write_all(data)?;
            file.sync_all()?;
        }
        fs::rename(&temp, &path)?;
        self.sync_dir()
    }
}

/// A file with a cached read-only map of its whole length. Writes go through `pwrite`; on Linux
/// the page cache is shared, so the map sees them at once.
#[derive(Debug)]
struct MappedFile {
    file: File,
    map: RwLock<Option<Bytes>>,
    place: FilePlace,
}

impl MappedFile {
    /// The bytes `start..end` from the map, remapping once if the file grew past it; `None` when
    /// the file is shorter than `end`.
    fn mapped(&self, start: u64, end: u64) -> io::Result<Option<Bytes>> {
        let range = start as usize..end as usize;
        if let Some(map) = self
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if map.len() as u64 >= end {
                // Slicing under the read lock costs one reference count, not three.
                return Ok(Some(map.slice(range)));
            }
        }
        let file_len = self.file.metadata()?.len();
        if file_len < end || file_len == 0 {
            return Ok(None);
        }
        let map = Bytes::from_owner(map_file(&self.file)?);
        let bytes = map.slice(range);
        *self.map.write().unwrap_or_else(PoisonError::into_inner) = Some(map);
        Ok(Some(bytes))
    }
}

/// Maps the whole file read-only.
#[allow(unsafe_code)]
fn map_file(file: &File) -> io::Result<Mmap> {
    // SAFETY: the map is read-only and the log never shrinks a file it has open (the backend
    // contract: `allocate` only grows, and logical truncation overwrites bytes instead of
    // cutting the file), so no access through the map can fall past the end of the file. Bytes
    // that the log overwrites while a reader holds them change under that reader; the log only
    // overwrites bytes past its last valid record, which no reader was handed.
    unsafe { Mmap::map(file) }
}

impl BackendFile for MappedFile {
    fn place(&self) -> Option<&FilePlace> {
        Some(&self.place)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| eof(offset, len, u64::MAX))?;
        if len == 0 {
            // Nothing to map, but a read that starts past the end still fails, as the contract
            // says and the other backends do.
            let file_len = self.len()?;
            return if offset <= file_len {
                Ok(Bytes::new())
            } else {
                Err(eof(offset, len, file_len))
            };
        }
        match self.mapped(offset, end)? {
            Some(bytes) => Ok(bytes),
            None => Err(eof(offset, len, self.len()?)),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn write_vectored_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let mut slices: Vec<IoSlice<'_>> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| IoSlice::new(p))
            .collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        while !rest.is_empty() {
            let n = rest.len().min(IOV_MAX);
            match rustix::io::pwritev(&self.file, &rest[..n], at) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(written) => {
                    at += written as u64;
                    IoSlice::advance_slices(&mut rest, written);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        if self.file.metadata()?.len() >= len {
            return Ok(());
        }
        // Reserve the blocks up front so appends do not allocate; fall back to a sparse extension
        // where the file system cannot preallocate.
        match rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => self.file.set_len(len),
            Err(e) => Err(e.into()),
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
