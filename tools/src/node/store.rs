//! One shard replica's state machines (K/V and file system, [`Machine`]) and its persister
//! thread.
//!
//! The driver applies delivered versions to the machines on the async runtime (appends are
//! buffered in memory), and hands the `fdatasync` of the log to a thread per shard so the
//! runtime never waits on the disk. Persist requests are coalesced: the thread syncs up to the
//! newest version asked for, reports it through a shared cell, and wakes the driver. A log on
//! tmpfs, where no disk is waited for, syncs on the driver's thread instead ([`syncs_inline`]):
//! the hand-off would cost two thread wake-ups per version and save nothing.

use std::path::{Path, PathBuf};
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

/// `f_type` of a tmpfs in `statfs(2)`: its files live in memory, so an `fdatasync` there waits
/// for no device.
const TMPFS_MAGIC: i128 = 0x0102_1994;

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
    /// The log syncs on the caller's thread, not the persister's ([`syncs_inline`]).
    inline: bool,
    sync: SyncPolicy,
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

/// The directory of the log of `shard` under `data_dir`.
fn shard_dir(data_dir: &Path, shard: ShardId) -> PathBuf {
    data_dir.join(format!("shard-{}", shard.0))
}

/// Whether the log of `shard` under `data_dir` syncs on the driver's thread rather than on a
/// persister thread: yes on tmpfs, where a sync (a write of the buffered records to memory and
/// an `fdatasync` that waits for nothing) costs less than the two thread wake-ups of the
/// hand-off, with a policy that syncs whenever asked (`fsync`, `none`). A `batch_ms` log keeps
/// its thread, which waits out the interval; a log on any other file system, or on one that
/// cannot be told, keeps it so the event loop never waits on a disk.
pub fn syncs_inline(data_dir: &Path, shard: ShardId, sync: SyncPolicy) -> bool {
    !matches!(sync, SyncPolicy::BatchMs(_))
        && rustix::fs::statfs(shard_dir(data_dir, shard))
            .is_ok_and(|fs| i128::from(fs.f_type) == TMPFS_MAGIC)
}

/// Opens (recovering) the log of `shard` under `data_dir`.
pub fn open_log(data_dir: &Path, shard: ShardId, sync: SyncPolicy) -> Result<Log, LogError> {
    let dir = shard_dir(data_dir, shard);
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
    /// the machines over it use file chunks of `chunk_size` bytes (checked by the caller). An
    /// `inline` log (see [`syncs_inline`]) gets no thread: [`ShardStore::persist`] syncs it.
    pub fn start(
        shard: ShardId,
        mut log: Log,
        view_id: u32,
        sync: SyncPolicy,
        inline: bool,
        notify: Arc<Notify>,
        chunk_size: u32,
    ) -> Result<ShardStore, LogError> {
        let mut state = vec![ENGINE_STATE_FORMAT];
        state.extend_from_slice(&view_id.to_le_bytes());
        log.set_engine_state(&state)?;
        let machine = Machine::new(log, chunk_size);
        let kv = Arc::new(Mutex::new(machine));
        let persist = Arc::new(PersistShared::default());
        let thread = if inline {
            None
        } else {
            let kv = kv.clone();
            let persist = persist.clone();
            let thread = std::thread::Builder::new()
                .name(format!("persist-{}", shard.0))
                .spawn(move || persister(kv, persist, sync, notify))
                .map_err(|e| LogError::Io {
                    what: "starting the persister thread".into(),
                    source: e,
                })?;
            Some(thread)
        };
        Ok(ShardStore {
            kv,
            persist,
            thread,
            reported: None,
            inline,
            sync,
        })
    }

    /// The log syncs on the caller's thread: [`ShardStore::persist`] only records what is
    /// wanted, and [`ShardStore::sync_inline`] syncs it, with its outcome ready for
    /// [`ShardStore::take_persisted`] when it returns; no one is woken.
    pub fn syncs_inline(&self) -> bool {
        self.inline
    }

    /// Syncs an inline log up to the newest version asked for, if that is not durable yet.
    pub fn sync_inline(&self) {
        let wanted = {
            let cell = lock(&self.persist.cell);
            if cell.failed.is_some() || cell.wanted <= cell.done {
                return;
            }
            cell.wanted.expect("a version is wanted above the one done")
        };
        let result = sync_log(&self.kv, self.sync);
        record_sync(&mut lock(&self.persist.cell), result, wanted);
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

    /// Asks the persister to make everything up to `version` durable (an inline log: records
    /// it for the next [`ShardStore::sync_inline`]).
    pub fn persist(&self, version: Version) {
        let mut cell = lock(&self.persist.cell);
        cell.wanted = cell.wanted.max(Some(version));
        if self.inline {
            return;
        }
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
                .expect("the thread waits for a wanted version above the one done")
        };
        if let (SyncPolicy::BatchMs(ms), Some(at)) = (sync, last_sync) {
            let due = at + Duration::from_millis(ms);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let result = sync_log(&kv, sync);
        last_sync = Some(Instant::now());
        let mut cell = lock(&persist.cell);
        let failed = !record_sync(&mut cell, result, wanted);
        drop(cell);
        notify.notify_one();
        if failed {
            break;
        }
    }
}

/// Makes the log durable up to its last record, by the policy; returns the persisted version.
fn sync_log(kv: &Mutex<Machine>, sync: SyncPolicy) -> Result<Option<Version>, LogError> {
    match sync {
        SyncPolicy::None => lock(kv).log_mut().commit(now_ms()),
        // The `fdatasync` runs without the store's lock, so applies and reads (time reads
        // included) go on while the disk works. The guard taken to begin the sync must be
        // released before the sync runs: bind it in its own statement.
        _ => {
            let begun = lock(kv).log_mut().begin_sync();
            let pending = begun?;
            let outcome = pending.run();
            let mut store = lock(kv);
            let log = store.log_mut();
            let persisted = log.finish_sync(pending, outcome)?;
            if log.checkpoint_due() {
                log.checkpoint()?;
            }
            Ok(persisted)
        }
    }
}

/// Records the outcome of a sync asked up to `wanted`; returns whether it succeeded.
fn record_sync(
    cell: &mut PersistCell,
    result: Result<Option<Version>, LogError>,
    wanted: Version,
) -> bool {
    match result {
        Ok(persisted) => {
            // The log may have synced versions delivered after the one asked for; the engine
            // hears only of versions it asked to persist.
            cell.done = cell.done.max(persisted.min(Some(wanted)));
            true
        }
        Err(e) => {
            cell.failed = Some(e.to_string());
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use derechofs_core::Hlc;

    use super::*;

    fn inline_store(dir: &Path) -> ShardStore {
        let log = open_log(dir, ShardId(0), SyncPolicy::Fsync).unwrap();
        let notify = Arc::new(Notify::new());
        ShardStore::start(ShardId(0), log, 1, SyncPolicy::Fsync, true, notify, 1 << 20).unwrap()
    }

    #[test]
    fn an_inline_log_syncs_only_when_told_and_reports_only_the_version_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = inline_store(dir.path());
        let (first, second) = ((1u64 << 32) | 1, (1u64 << 32) | 2);
        for (version, at) in [(first, 10), (second, 20)] {
            let mut machine = store.kv();
            let write = derechofs_storage::Write {
                key: b"k",
                value: Some(b"v"),
            };
            machine
                .log_mut()
                .append(version, Hlc::at(at), &[write])
                .unwrap();
        }
        store.persist(first);
        assert_eq!(
            store.take_persisted(),
            Ok(None),
            "nothing synced before sync_inline"
        );
        assert_eq!(store.kv().log().persisted(), None);
        store.sync_inline();
        assert_eq!(store.take_persisted(), Ok(Some(first)));
        assert_eq!(store.take_persisted(), Ok(None), "reported once");
        assert_eq!(store.kv().log().persisted(), Some(second));
        drop(store);
        let reopened = open_log(dir.path(), ShardId(0), SyncPolicy::Fsync).unwrap();
        assert_eq!(reopened.latest().map(|(v, _)| v), Some(second));
    }

    #[test]
    fn a_log_on_tmpfs_syncs_inline_unless_its_policy_batches() {
        let shm = Path::new("/dev/shm");
        let on_tmpfs = rustix::fs::statfs(shm).is_ok_and(|fs| i128::from(fs.f_type) == TMPFS_MAGIC);
        if !on_tmpfs {
            return;
        }
        let dir = tempfile::tempdir_in(shm).unwrap();
        std::fs::create_dir(shard_dir(dir.path(), ShardId(0))).unwrap();
        assert!(syncs_inline(dir.path(), ShardId(0), SyncPolicy::Fsync));
        assert!(syncs_inline(dir.path(), ShardId(0), SyncPolicy::None));
        assert!(!syncs_inline(
            dir.path(),
            ShardId(0),
            SyncPolicy::BatchMs(5)
        ));
        assert!(
            !syncs_inline(dir.path(), ShardId(1), SyncPolicy::Fsync),
            "no such directory"
        );
    }
}
