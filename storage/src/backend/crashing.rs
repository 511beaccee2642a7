//! The crashing backend: a memory backend that also keeps the image a disk would hold after a
//! power cut, so tests can crash at any point, tear the writes that were in flight, and inject
//! I/O failures.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

use super::memory::write_into;
use super::{check_name, eof, Backend, BackendFile};

/// What a crash does to the writes that were not yet synced.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrashOptions {
    /// Keep a random prefix of the unsynced operations of each file, the last one possibly cut
    /// in the middle (a torn write). When false, every unsynced operation is lost.
    pub torn_writes: bool,
    /// Also scribble random bytes over the part of a torn write that was kept.
    pub garbage: bool,
}

/// A memory backend with a separate durable image. [`CrashingBackend::crash`] returns the backend
/// a restarted process would find.
#[derive(Debug, Clone, Default)]
pub struct CrashingBackend {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    files: Mutex<BTreeMap<String, Arc<CrashFile>>>,
    /// Mutating operations left before every one of them fails; `u64::MAX` means never.
    fail_countdown: AtomicU64,
}

#[derive(Debug, Default)]
struct CrashFile {
    shared: std::sync::Weak<Shared>,
    state: Mutex<FileState>,
}

#[derive(Debug, Default, Clone)]
struct FileState {
    current: Vec<u8>,
    /// What survives a crash; `None` until the file's existence is durable.
    durable: Option<Vec<u8>>,
    /// Operations since the last sync, in order.
    pending: Vec<Pending>,
}

#[derive(Debug, Clone)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Allocate { len: u64 },
}

impl CrashingBackend {
    /// An empty backend that never fails.
    pub fn new() -> CrashingBackend {
        let backend = CrashingBackend::default();
        backend
            .shared
            .fail_countdown
            .store(u64::MAX, Ordering::SeqCst);
        backend
    }

    /// After `ops` more mutating operations (write, allocate, sync, replace, remove), every
    /// mutating operation fails with an I/O error. `None` disables failures.
    pub fn fail_after(&self, ops: Option<u64>) {
        self.shared
            .fail_countdown
            .store(ops.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// The backend a process restarted after a power cut would see now: every synced byte, plus,
    /// depending on `options`, a torn prefix of what was in flight, chosen from `seed`.
    pub fn crash(&self, seed: u64, options: CrashOptions) -> CrashingBackend {
        let mut rng = SplitMix64(seed);
        let after = CrashingBackend::new();
        let files = self
            .shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut new_files = after
            .shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (name, file) in files.iter() {
            let state = file.state.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(mut image) = state.durable.clone() else {
                continue;
            };
            if options.torn_writes && !state.pending.is_empty() {
                let kept = rng.below(state.pending.len() as u64 + 1) as usize;
                for (i, op) in state.pending.iter().take(kept + 1).enumerate() {
                    match op {
                        Pending::Allocate { len } if i < kept => {
                            if (image.len() as u64) < *len {
                                image.resize(*len as usize, 0);
                            }
                        }
                        Pending::Write { offset, data } => {
                            let cut = if i < kept {
                                data.len()
                            } else {
                                rng.below(data.len() as u64 + 1) as usize
                            };
                            let mut piece = data[..cut].to_vec();
                            if options.garbage && i == kept && !piece.is_empty() {
                                for _ in 0..1 + rng.below(4) {
                                    let at = rng.below(piece.len() as u64) as usize;
                                    piece[at] = rng.next() as u8;
                                }
                            }
                            // Offsets were valid when written, so this cannot overflow memory.
                            let _ = write_into(&mut image, *offset, &piece);
                        }
                        Pending::Allocate { .. } => {}
                    }
                }
            }
            let file = CrashFile {
                shared: Arc::downgrade(&after.shared),
                state: Mutex::new(FileState {
                    current: image.clone(),
                    durable: Some(image),
                    pending: Vec::new(),
                }),
            };
            new_files.insert(name.clone(), Arc::new(file));
        }
        drop(new_files);
        after
    }

    /// The current (not necessarily durable) bytes of every file, for tests that corrupt them.
    pub fn corrupt(&self, name: &str, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let files = self
            .shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let file = files
            .get(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_owned()))?;
        let mut state = file.state.lock().unwrap_or_else(PoisonError::into_inner);
        write_into(&mut state.current, offset, bytes)?;
        if let Some(durable) = state.durable.as_mut() {
            write_into(durable, offset, bytes)?;
        }
        Ok(())
    }
}

impl Shared {
    fn charge(&self) -> io::Result<()> {
        let left = self.fail_countdown.load(Ordering::SeqCst);
        if left == u64::MAX {
            return Ok(());
        }
        if left == 0 {
            return Err(io::Error::other("injected I/O failure"));
        }
        self.fail_countdown.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

impl CrashFile {
    fn charge(&self) -> io::Result<()> {
        match self.shared.upgrade() {
            Some(shared) => shared.charge(),
            None => Ok(()),
        }
    }
}

impl Backend for CrashingBackend {
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self
            .shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect())
    }

    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BackendFile>> {
        check_name(name)?;
        let mut files = self
            .shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(file) = files.get(name) {
            return Ok(file.clone());
        }
        if !create {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no file {name}"),
            ));
        }
        self.shared.charge()?;
        let file = Arc::new(CrashFile {
            shared: Arc::downgrade(&self.shared),
            state: Mutex::default(),
        });
        files.insert(name.to_owned(), file.clone());
        Ok(file)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.shared.charge()?;
        self.shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        Ok(())
    }

    fn read_all(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        check_name(name)?;
        let files = self
            .shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(files.get(name).map(|f| {
            f.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .current
                .clone()
        }))
    }

    fn replace(&self, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        self.shared.charge()?;
        let file = CrashFile {
            shared: Arc::downgrade(&self.shared),
            state: Mutex::new(FileState {
                current: data.to_vec(),
                durable: Some(data.to_vec()),
                pending: Vec::new(),
            }),
        };
        self.shared
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), Arc::new(file));
        Ok(())
    }
}

impl BackendFile for CrashFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .current
            .len() as u64)
    }

    fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let data = &state.current;
        match offset
            .checked_add(len as u64)
            .filter(|&e| e <= data.len() as u64)
        {
            Some(end) => Ok(Bytes::copy_from_slice(&data[offset as usize..end as usize])),
            None => Err(eof(offset, len, data.len() as u64)),
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.charge()?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        write_into(&mut state.current, offset, data)?;
        state.pending.push(Pending::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.charge()?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if (state.current.len() as u64) < len {
            let len = usize::try_from(len).map_err(|_| io::Error::other("allocation too large"))?;
            state.current.resize(len, 0);
        }
        state.pending.push(Pending::Allocate { len });
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.charge()?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *state;
        match state.durable.as_mut() {
            // Replaying the pending operations costs what they wrote, not the file's size.
            Some(durable) => {
                for op in state.pending.drain(..) {
                    match op {
                        Pending::Write { offset, data } => write_into(durable, offset, &data)?,
                        Pending::Allocate { len } => {
                            if (durable.len() as u64) < len {
                                durable.resize(len as usize, 0);
                            }
                        }
                    }
                }
            }
            None => {
                state.durable = Some(state.current.clone());
                state.pending.clear();
            }
        }
        Ok(())
    }
}

/// A small deterministic generator, so a crash is reproduced by its seed alone.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}
