//! One shard replica's state machines (K/V and file system, [`Machine`]) and its persister
//! thread.
//!
//! The driver applies delivered versions to the machines on the async runtime (appends are
//! buffered in memory), and hands the `fdatasync` of the log to a thread per shard so the
//! runtime never waits on the disk. Persist requests are coalesced: the thread syncs up to the
//! newest version asked for, reports it through a shared cell, and wakes the driver.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use derechofs_core::{ShardId, Version};
use derechofs_storage::backend::FileBackend;
use derechofs_storage::{Log, LogConfig, LogError, SyncPolicy};
use tokio::sync::Notify;

use super::machine::Machine;

/// The first byte of the engine state this driver keeps in each log's metadata.
const ENGINE_STATE_FORMAT: u8 = 1;

/// What the persister thread is asked and what it did.
#[derive(Debug, Default)]
struct PersistCell {
    /// The newest version the engine asked to persist.
    wanted: Option<Version>,
    /// The newest version the thread made durable (at most `wanted`).
    done: Option<Version>,
    /// A sync failed: the log is poisoned and this replica must stop.
    failed: Option<String>,
    stop: bool,
    /// The thread sleeps on the condition variable: a new version must wake it. While it
    /// syncs it reads `wanted` again before sleeping, so it needs no wake-up (each one is a
    /// system call).
    idle: bool,
}

#[derive(Debug, Default)]
struct PersistShared {
    cell: Mutex<PersistCell>,
    wake: Condvar,
}

/// A shard replica: its machines, shared with its persister thread.
#[derive(Debug)]
pub struct ShardStore {
    kv: Arc<Mutex<Machine>>,
    persist: Arc<PersistShared>,
    thread: Option<JoinHandle<()>>,
    /// The last persisted version reported to the engine.
    reported: Option<Version>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in the persister leaves the store as consistent as the log itself, which reports
    // its own poisoning; use it as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The view id stored in a log's engine state, if any.
pub fn stored_view(log: &Log) -> Option<u32> {
    match log.engine_state() {
        [ENGINE_STATE_FORMAT, a, b, c, d] => Some(u32::from_le_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Opens (recovering) the log of `shard` under `data_dir`.
pub fn open_log(data_dir: &Path, shard: ShardId, sync: SyncPolicy) -> Result<Log, LogError> {
    let dir = data_dir.join(format!("shard-{}", shard.0));
    std::fs::create_dir_all(&dir).map_err(|e| LogError::Io {
        what: format!("creating {}", dir.display()),
        source: e,
    })?;
    let backend = FileBackend::open(&dir).map_err(|e| LogError::Io {
        what: format!("opening {}", dir.display()),
        source: e,
    })?;
    Log::open(
        Arc::new(backend),
        LogConfig {
            sync,
            ..LogConfig::default()
        },
    )
}

impl ShardStore {
    /// Starts the persister of `log`, recording `view_id` durably in its engine state first;
    /// the machines over it use file chunks of `chunk_size` bytes (checked by the caller).
    pub fn start(
        shard: ShardId,
        mut log: Log,
        view_id: u32,
        sync: SyncPolicy,
        notify: Arc<Notify>,
        chunk_size: u32,
    ) -> Result<ShardStore, LogError> {
        let mut state = vec![ENGINE_STATE_FORMAT];
        state.extend_from_slice(&view_id.to_le_bytes());
        log.set_engine_state(&state)?;
        let machine = Machine::new(log, chunk_size);
        let kv = Arc::new(Mutex::new(machine));
        let persist = Arc::new(PersistShared::default());
        let thread = {
            let kv = kv.clone();
            let persist = persist.clone();
            std::thread::Builder::new()
                .name(format!("persist-{}", shard.0))
                .spawn(move || persister(kv, persist, sync, notify))
                .map_err(|e| LogError::Io {
                    what: "starting the persister thread".into(),
                    source: e,
                })?
        };
        Ok(ShardStore {
            kv,
            persist,
            thread: Some(thread),
            reported: None,
        })
    }

    /// The machines, for applying and reading.
    pub fn kv(&self) -> MutexGuard<'_, Machine> {
        lock(&self.kv)
    }

    /// The machines, shared: for work on the log that waits on the disk, done on the blocking
    /// pool rather than the event loop.
    pub fn machine(&self) -> Arc<Mutex<Machine>> {
        self.kv.clone()
    }

    /// Asks the persister to make everything up to `version` durable.
    pub fn persist(&self, version: Version) {
        let mut cell = lock(&self.persist.cell);
        cell.wanted = cell.wanted.max(Some(version));
        if cell.idle {
            cell.idle = false;
            self.persist.wake.notify_one();
        }
    }

    /// A version newly made durable since the last call, to report to the engine; or the
    /// failure that stopped the persister.
    pub fn take_persisted(&mut self) -> Result<Option<Version>, String> {
        let cell = lock(&self.persist.cell);
        if let Some(failure) = &cell.failed {
            return Err(failure.clone());
        }
        if cell.done > self.reported {
            self.reported = cell.done;
            return Ok(cell.done);
        }
        Ok(None)
    }
}

impl Drop for ShardStore {
    fn drop(&mut self) {
        lock(&self.persist.cell).stop = true;
        self.persist.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The persister: waits for a version to persist, waits out the batching interval, syncs.
fn persister(
    kv: Arc<Mutex<Machine>>,
    persist: Arc<PersistShared>,
    sync: SyncPolicy,
    notify: Arc<Notify>,
) {
    let mut last_sync: Option<Instant> = None;
    loop {
        let wanted = {
            let mut cell = lock(&persist.cell);
            while !cell.stop && cell.wanted <= cell.done {
                cell.idle = true;
                cell = persist.wake.wait(cell).unwrap_or_else(|p| p.into_inner());
            }
            cell.idle = false;
            if cell.stop {
                break;
            }
            cell.wanted
        };
        if let (SyncPolicy::BatchMs(ms), Some(at)) = (sync, last_sync) {
            let due = at + Duration::from_millis(ms);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let result = match sync {
            SyncPolicy::None => lock(&kv).log_mut().commit(now_ms()),
            // The `fdatasync` runs without the store's lock, so applies and reads (time reads
            // included) go on while the disk works. The guard taken to begin the sync must be
            // released before the sync runs: bind it in its own statement.
            _ => {
                let begun = lock(&kv).log_mut().begin_sync();
                match begun {
                    Ok(pending) => {
                        let outcome = pending.run();
                        let mut store = lock(&kv);
                        let log = store.log_mut();
                        log.finish_sync(pending, outcome).and_then(|persisted| {
                            if log.checkpoint_due() {
                                log.checkpoint()?;
                            }
                            Ok(persisted)
                        })
                    }
                    Err(e) => Err(e),
                }
            }
        };
        last_sync = Some(Instant::now());
        let mut cell = lock(&persist.cell);
        match result {
            Ok(persisted) => {
                // The log may have synced versions delivered after the one asked for; the
                // engine hears only of versions it asked to persist.
                cell.done = cell.done.max(persisted.min(wanted));
            }
            Err(e) => {
                cell.failed = Some(e.to_string());
                drop(cell);
                notify.notify_one();
                break;
            }
        }
        drop(cell);
        notify.notify_one();
    }
}
