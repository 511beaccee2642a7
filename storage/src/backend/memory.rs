//! The in-memory backend: volatile, for tests and for `sync = "none"` experiments.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;

use super::{check_name, eof, Backend, BackendFile};

/// A backend whose files live in memory. Sync is a no-op; nothing survives the process.
#[derive(Debug, Default, Clone)]
pub struct MemoryBackend {
    files: Arc<Mutex<BTreeMap<String, Arc<MemoryFile>>>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }
}

#[derive(Debug, Default)]
pub(crate) struct MemoryFile {
    pub(crate) data: RwLock<Vec<u8>>,
}

impl MemoryFile {
    pub(crate) fn with(data: Vec<u8>) -> MemoryFile {
        MemoryFile {
            data: RwLock::new(data),
        }
    }
}

impl Backend for MemoryBackend {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect())
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BackendFile>> {
        check_name(name)?;
        let mut files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = files.get(name) {
            return Ok(file.clone());
        }
        if !create {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no file {name}"),
            ));
        }
        let file = Arc::new(MemoryFile::default());
        files.insert(name.to_owned(), file.clone());
        Ok(file)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        Ok(())
    }

    fn read_all(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        check_name(name)?;
        let files = self.files.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(files.get(name).map(|f| {
            f.data
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }))
    }

    fn replace(&self, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        let file = Arc::new(MemoryFile::with(data.to_vec()));
        self.files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), file);
        Ok(())
    }
}

impl BackendFile for MemoryFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self
            .data
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64)
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let data = self.data.read().unwrap_or_else(PoisonError::into_inner);
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= data.len() as u64);
        match end {
            Some(end) => Ok(Bytes::copy_from_slice(&data[offset as usize..end as usize])),
            None => Err(eof(offset, len, data.len() as u64)),
        }
    }

    fn write_at(&self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        write_into(&mut data, offset, bytes)
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let mut data = self.data.write().unwrap_or_else(PoisonError::into_inner);
        let len = usize::try_from(len).map_err(|_| too_big(len))?;
        if data.len() < len {
            data.resize(len, 0);
        }
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
}

pub(crate) fn write_into(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) -> io::Result<()> {
    let start = usize::try_from(offset).map_err(|_| too_big(offset))?;
    let end = start
        .checked_add(bytes.len())
        .ok_or_else(|| too_big(offset))?;
    if data.len() < end {
        data.resize(end, 0);
    }
    data[start..end].copy_from_slice(bytes);
    Ok(())
}

fn too_big(n: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("offset {n} too large for memory"),
    )
}
