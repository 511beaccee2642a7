//! One shard replica's state machines (K/V and file system, [`Machine`]) and its persister
//! thread.
//!
//! The driver applies delivered versions to the machines on the async runtime (appends are
//! buffered in memory), and hands the `fdatasync` of the log to persister threads so the
//! runtime never waits on the disk. Persist requests are coalesced: a thread syncs up to the
//! newest version asked for, reports it through a shared cell, and wakes the driver. Under
//! `fsync` a shard has [`SYNCS_IN_FLIGHT`] such threads, so versions asked for while a sync
//! runs start the next `fdatasync` at once instead of waiting for it to end (a disk completes
//! several flushes in parallel); the log reports a sync's versions persisted only once every
//! sync begun before it succeeded ([`Log::finish_sync`]). A log on
//! tmpfs, where no disk is waited for, syncs on the driver's thread instead ([`syncs_inline`]):
//! the hand-off would cost two thread wake-ups per version and save nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use derechofs_core::{ShardId, Version};
use derechofs_storage::backend::FileBackend;
use derechofs_storage::{Log, LogConfig, LogError, Prefiller, SyncPolicy};
use tokio::sync::Notify;

use super::machine::Machine;

/// The first byte of the engine state this driver keeps in each log's metadata (format 2: the
/// view id, then the file chunk size; `docs/FORMATS.md`, "Metadata").
const ENGINE_STATE_FORMAT: u8 = 2;
/// Format 1, the view id alone (written before the chunk size was recorded): still read, as
/// no recorded chunk size.
const ENGINE_STATE_FORMAT_1: u8 = 1;

/// `f_type` of a tmpfs in `statfs(2)`: its files live in memory, so an `fdatasync` there waits
/// for no device.
const TMPFS_MAGIC: i128 = 0x0102_1994;

/// Syncs a shard's persister keeps running at once under [`SyncPolicy::Fsync`] (one thread
/// each). The disk completes several flushes in parallel; a few cover the gap between one
/// sync's start and the next delivery. `batch_ms` and `none` keep one, so the interval of
/// `batch_ms` stays the time between the end of a sync and the start of the next.
pub const SYNCS_IN_FLIGHT: usize = 4;

const _: () = assert!(SYNCS_IN_FLIGHT <= derechofs_storage::SYNCS_IN_FLIGHT_MAX);

/// Under [`SyncPolicy::Fsync`], the longest a persister waits, after the last sync ended, before
/// it syncs versions that nobody waits for (a version whose every request wrote nothing: K/V
/// conditional puts that failed, stale retries). A version someone may wait for is synced at
/// once, and covers the ones before it. Each `fdatasync` costs CPU in the kernel; in a
/// contended run most versions are failed attempts that nobody waits to be durable.
pub const LAZY_SYNC_MS: u64 = 2;

/// Pace of the zero-filling ahead of a log's append point (MiB a second), on a log that syncs
/// to a disk ([`Log::prefiller`]): an `fdatasync` after appends into written blocks skips the
/// inode write that appends into the fallocated (unwritten) blocks of a new segment cost. The
/// bound keeps the zeros a small share of what the disk writes; a log that fills faster than
/// this overtakes them, and the zero-filler then rests (`PREFILL_BACKOFF`).
pub const PREFILL_MIB_PER_S: u64 = 64;

/// The persister threads of a log under `sync`.
fn persister_threads(sync: SyncPolicy) -> usize {
    match sync {
        SyncPolicy::Fsync => SYNCS_IN_FLIGHT,
        SyncPolicy::BatchMs(_) | SyncPolicy::None => 1,
    }
}

/// What the persister threads are asked and what they did.
#[derive(Debug, Default)]
struct PersistCell {
    /// The newest version the engine asked to persist.
    wanted: Option<Version>,
    /// The newest version asked to persist at once (someone may wait for it); versions above
    /// it and up to `wanted` wait up to [`LAZY_SYNC_MS`] after the last sync ended.
    urgent: Option<Version>,
    /// Threads asleep until that interval ends: a version nobody waits for wakes none of them.
    timed: usize,
    /// The newest version a sync begun covers (or, while it is being begun, was asked to):
    /// a version at most this needs no new sync.
    begun: Option<Version>,
    /// The newest version the threads made durable (at most `wanted`).
    done: Option<Version>,
    /// The newest version a finished sync made durable, asked for or not: a sync may cover
    /// versions delivered after the newest one asked for, and end before they are asked for.
    synced: Option<Version>,
    /// A sync failed: the log is poisoned and this replica must stop.
    failed: Option<String>,
    stop: bool,
    /// Syncs running.
    in_flight: usize,
    /// When the last sync ended (for the interval of `batch_ms`).
    last_end: Option<Instant>,
    /// Threads asleep on the condition variable, and wake-ups sent to them not yet taken: a
    /// new version wakes one only when none is on its way (each wake-up is a system call). A
    /// thread that ends a sync reads `wanted` again before sleeping, so it needs none.
    sleeping: usize,
    wakes: usize,
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
    threads: Vec<JoinHandle<()>>,
    /// The last persisted version reported to the engine.
    reported: Option<Version>,
    /// The log syncs on the caller's thread, not the persister's ([`syncs_inline`]).
    inline: bool,
    /// The thread zero-filling ahead of the log's append point, if the log has one.
    prefill: Option<(Prefiller, JoinHandle<()>)>,
    sync: SyncPolicy,
    /// Wakes the driver to take what became durable.
    notify: Arc<Notify>,
    /// Whether every version delivered since the last [`ShardStore::persist`] wrote nothing
    /// that anyone may wait to be durable (`None`: nothing delivered since).
    delivered_idle: Option<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in the persister leaves the store as consistent as the log itself, which reports
    // its own poisoning; use it as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the node records in a log's metadata (its engine state) each time it opens the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineState {
    /// The view the node ran when it opened the log.
    pub view_id: u32,
    /// Bytes of a file chunk (`layout.chunk_size`) the log's machines used; `None` in a log
    /// written before it was recorded (format 1).
    pub chunk_size: Option<u32>,
}

impl EngineState {
    /// The bytes of format 2: the format, the view id, the chunk size (little-endian).
    fn encode(view_id: u32, chunk_size: u32) -> [u8; 9] {
        let mut out = [ENGINE_STATE_FORMAT, 0, 0, 0, 0, 0, 0, 0, 0];
        out[1..5].copy_from_slice(&view_id.to_le_bytes());
        out[5..].copy_from_slice(&chunk_size.to_le_bytes());
        out
    }

    /// The state in `bytes`, of format 2 or 1; `None` for anything else (a new log's empty
    /// state).
    fn decode(bytes: &[u8]) -> Option<EngineState> {
        match bytes {
            [ENGINE_STATE_FORMAT, a, b, c, d, e, f, g, h] => Some(EngineState {
                view_id: u32::from_le_bytes([*a, *b, *c, *d]),
                chunk_size: Some(u32::from_le_bytes([*e, *f, *g, *h])),
            }),
            [ENGINE_STATE_FORMAT_1, a, b, c, d] => Some(EngineState {
                view_id: u32::from_le_bytes([*a, *b, *c, *d]),
                chunk_size: None,
            }),
            _ => None,
        }
    }

    /// The state recorded in `log`, if any.
    pub fn of(log: &Log) -> Option<EngineState> {
        EngineState::decode(log.engine_state())
    }
}

/// The view id stored in a log's engine state, if any.
pub fn stored_view(log: &Log) -> Option<u32> {
    EngineState::of(log).map(|s| s.view_id)
}

/// Refuses the log of `shard` under `data_dir` if it holds data and records a file chunk size
/// other than `chunk_size`: its files would be read and written with the wrong chunk
/// boundaries. A log that records none (format 1) cannot be checked and passes; so does one
/// without a version, which holds no chunk.
pub fn check_chunk_size(
    log: &Log,
    data_dir: &Path,
    shard: ShardId,
    chunk_size: u32,
) -> Result<(), String> {
    match EngineState::of(log).and_then(|s| s.chunk_size) {
        Some(recorded) if recorded != chunk_size && log.latest().is_some() => Err(format!(
            "layout.chunk_size changed: the log of {shard} in {} was written with \
             layout.chunk_size = {recorded}, the configuration says {chunk_size}; the chunk \
             size of existing data cannot change (set layout.chunk_size = {recorded} again)",
            data_dir.display()
        )),
        _ => Ok(()),
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
    /// Starts the persister of `log`, recording `view_id` and `chunk_size` durably in its
    /// engine state first; the machines over it use file chunks of `chunk_size` bytes (checked
    /// by the caller, against the value and against what the log recorded:
    /// [`check_chunk_size`]). An `inline` log (see [`syncs_inline`]) gets no thread:
    /// [`ShardStore::persist`] syncs it.
    pub fn start(
        shard: ShardId,
        mut log: Log,
        view_id: u32,
        sync: SyncPolicy,
        inline: bool,
        notify: Arc<Notify>,
        chunk_size: u32,
    ) -> Result<ShardStore, LogError> {
        log.set_engine_state(&EngineState::encode(view_id, chunk_size))?;
        // On tmpfs an `fdatasync` waits for nothing, and a log that never syncs has no sync to
        // speed up: no zero-filling there.
        let prefiller = (!inline && sync != SyncPolicy::None).then(|| log.prefiller());
        let machine = Machine::new(log, chunk_size);
        let kv = Arc::new(Mutex::new(machine));
        let persist = Arc::new(PersistShared::default());
        let mut store = ShardStore {
            kv,
            persist,
            threads: Vec::new(),
            reported: None,
            inline,
            sync,
            prefill: None,
            notify: notify.clone(),
            delivered_idle: None,
        };
        if let Some(prefiller) = prefiller {
            let worker = prefiller.clone();
            let thread = std::thread::Builder::new()
                .name(format!("prefill-{}", shard.0))
                .spawn(move || {
                    if let Err(e) = worker.run(PREFILL_MIB_PER_S) {
                        tracing::warn!(%shard, error = %e, "zero-filling ahead of the log stopped");
                    }
                })
                .map_err(|e| LogError::Io {
                    what: "starting the zero-filling thread".into(),
                    source: e,
                })?;
            store.prefill = Some((prefiller, thread));
        }
        let count = if inline { 0 } else { persister_threads(sync) };
        for i in 0..count {
            let kv = store.kv.clone();
            let persist = store.persist.clone();
            let notify = notify.clone();
            let thread = std::thread::Builder::new()
                .name(format!("persist-{}-{i}", shard.0))
                .spawn(move || persister(kv, persist, sync, notify))
                // Dropping the store stops and joins the threads started so far.
                .map_err(|e| LogError::Io {
                    what: "starting a persister thread".into(),
                    source: e,
                })?;
            store.threads.push(thread);
        }
        Ok(store)
    }

    /// The log syncs on the caller's thread: [`ShardStore::persist`] only records what is
    /// wanted, and [`ShardStore::sync_inline`] syncs it, with its outcome ready for
    /// [`ShardStore::take_persisted`] when it returns; no one is woken.
    pub fn syncs_inline(&self) -> bool {
        self.inline
    }

    /// Syncs an inline log up to the newest version asked for, if that is not durable yet.
    pub fn sync_inline(&self) {
        {
            let cell = lock(&self.persist.cell);
            if cell.failed.is_some() || cell.wanted <= cell.done {
                return;
            }
        }
        let result = sync_log(&self.kv, self.sync, |_| ());
        record_sync(&mut lock(&self.persist.cell), result);
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

    /// Records that versions were delivered whose requests may (`waited`) or may not have
    /// a client waiting until they are durable: a write that wrote, or any file system
    /// request. Every replica decides it alike, from the replies it computed.
    pub fn delivered(&mut self, waited: bool) {
        self.delivered_idle = Some(self.delivered_idle.unwrap_or(true) && !waited);
    }

    /// Asks the persister to make everything up to `version` durable (an inline log: records
    /// it for the next [`ShardStore::sync_inline`]): at once, unless everything delivered since
    /// the last call was recorded as waited for by nobody ([`ShardStore::delivered`]) and the
    /// log is synced by persister threads under `fsync`: then within [`LAZY_SYNC_MS`] after the
    /// last sync ended, or with the next version asked for at once.
    pub fn persist(&mut self, version: Version) {
        let lazy = self.delivered_idle.take() == Some(true)
            && !self.inline
            && self.sync == SyncPolicy::Fsync;
        let mut cell = lock(&self.persist.cell);
        cell.wanted = cell.wanted.max(Some(version));
        if !lazy {
            cell.urgent = cell.urgent.max(Some(version));
        }
        if cell.report_synced() {
            // A sync that ended already covered it: no sync is owed, only the report.
            self.notify.notify_one();
        }
        if self.inline {
            return;
        }
        // A sync begun covers it, or a thread is already on its way, or (a version nobody
        // waits for) one already waits out the interval: no wake-up.
        if cell.wanted > cell.begun && cell.sleeping > cell.wakes && (!lazy || cell.timed == 0) {
            cell.wakes += 1;
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
        self.persist.wake.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        // Versions asked for lazily, and not synced when the threads stopped: a clean stop
        // leaves nothing it was asked to persist behind.
        let owed = {
            let cell = lock(&self.persist.cell);
            !self.inline && cell.failed.is_none() && cell.wanted > cell.synced
        };
        if owed {
            if let Err(e) = sync_log(&self.kv, self.sync, |_| ()) {
                tracing::warn!(error = %e, "the last sync of a stopping store failed");
            }
        }
        if let Some((prefiller, thread)) = self.prefill.take() {
            prefiller.stop();
            let _ = thread.join();
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One persister thread: waits for a version to persist that no running sync covers and for
/// a free slot (under `batch_ms`, also for the interval since the last sync ended), syncs,
/// reports. The threads of a shard share the cell; a failure stops them all.
fn persister(
    kv: Arc<Mutex<Machine>>,
    persist: Arc<PersistShared>,
    sync: SyncPolicy,
    notify: Arc<Notify>,
) {
    let slots = persister_threads(sync);
    loop {
        {
            let mut cell = lock(&persist.cell);
            loop {
                if cell.stop || cell.failed.is_some() {
                    return;
                }
                let mut timeout = None;
                if cell.wanted > cell.begun && cell.in_flight < slots {
                    let due = match (sync, cell.last_end) {
                        (SyncPolicy::BatchMs(ms), Some(at)) => Some(at + Duration::from_millis(ms)),
                        (SyncPolicy::Fsync, Some(at)) if cell.urgent <= cell.begun => {
                            Some(at + Duration::from_millis(LAZY_SYNC_MS))
                        }
                        _ => None,
                    };
                    match due {
                        Some(due) if due > Instant::now() => timeout = Some(due - Instant::now()),
                        _ => break,
                    }
                }
                cell.sleeping += 1;
                cell = match timeout {
                    Some(t) => {
                        cell.timed += 1;
                        let mut cell = persist
                            .wake
                            .wait_timeout(cell, t)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        cell.timed -= 1;
                        cell
                    }
                    None => persist.wake.wait(cell).unwrap_or_else(|p| p.into_inner()),
                };
                cell.sleeping -= 1;
                cell.wakes = cell.wakes.saturating_sub(1);
            }
            // Claim what is wanted now; the sync's own cover replaces it once begun.
            cell.in_flight += 1;
            cell.begun = cell.wanted;
        }
        let result = sync_log(&kv, sync, |covers| {
            let mut cell = lock(&persist.cell);
            cell.begun = cell.begun.max(covers);
        });
        let mut cell = lock(&persist.cell);
        cell.in_flight -= 1;
        cell.last_end = Some(Instant::now());
        let before = cell.done;
        let ok = record_sync(&mut cell, result);
        let news = !ok || cell.done != before;
        if !ok {
            persist.wake.notify_all();
        }
        drop(cell);
        if news {
            notify.notify_one();
        }
    }
}

/// Makes the log durable up to its last record, by the policy; returns the persisted version.
/// `begun` hears what a sync covers as soon as it is begun, before its `fdatasync` runs.
fn sync_log(
    kv: &Mutex<Machine>,
    sync: SyncPolicy,
    begun: impl FnOnce(Option<Version>),
) -> Result<Option<Version>, LogError> {
    match sync {
        SyncPolicy::None => lock(kv).log_mut().commit(now_ms()),
        // The `fdatasync` runs without the store's lock, so applies and reads (time reads
        // included) go on while the disk works, and other threads begin syncs of what is
        // delivered meanwhile. The guard taken to begin the sync must be released before the
        // sync runs: bind it in its own statement.
        _ => {
            let started = lock(kv).log_mut().begin_sync();
            let pending = started?;
            begun(pending.covers());
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

impl PersistCell {
    /// Reports as done what finished syncs made durable, up to the newest version asked for;
    /// returns whether `done` moved.
    fn report_synced(&mut self) -> bool {
        let covered = self.synced.min(self.wanted);
        if covered > self.done {
            self.done = covered;
            return true;
        }
        false
    }
}

/// Records the outcome of a sync; returns whether it succeeded. The first failure is kept.
fn record_sync(cell: &mut PersistCell, result: Result<Option<Version>, LogError>) -> bool {
    match result {
        Ok(persisted) => {
            // The log may have synced versions delivered after the newest one asked for; the
            // engine hears only of versions it asked to persist, the rest when asked.
            cell.synced = cell.synced.max(persisted);
            cell.report_synced();
            true
        }
        Err(e) => {
            if cell.failed.is_none() {
                cell.failed = Some(e.to_string());
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use derechofs_core::Hlc;
    use derechofs_storage::backend::{CrashOptions, CrashingBackend};

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
    fn engine_state_round_trips_with_the_chunk_size_and_reads_format_1_without_it() {
        let bytes = EngineState::encode(7, 1 << 16);
        assert_eq!(bytes, [2, 7, 0, 0, 0, 0, 0, 1, 0]);
        let state = EngineState {
            view_id: 7,
            chunk_size: Some(1 << 16),
        };
        assert_eq!(EngineState::decode(&bytes), Some(state));
        // Format 1: the view id alone, so no chunk size to check against.
        let old = EngineState {
            view_id: 7,
            chunk_size: None,
        };
        assert_eq!(EngineState::decode(&[1, 7, 0, 0, 0]), Some(old));
        // A new log's empty state, a length that is not its format's, an unknown format.
        for bad in [
            &[][..],
            &bytes[..5],
            &[1, 7, 0, 0, 0, 0],
            &[3, 7, 0, 0, 0, 0, 0, 1, 0],
        ] {
            assert_eq!(EngineState::decode(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_log_with_data_refuses_another_chunk_size_naming_the_key_and_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path();
        let open = || open_log(data, ShardId(0), SyncPolicy::Fsync).unwrap();
        let check = |log: &Log, chunk_size| check_chunk_size(log, data, ShardId(0), chunk_size);
        assert_eq!(check(&open(), 1 << 16), Ok(()), "a new log records nothing");
        // Started with 1 MiB chunks, but without a version: it holds no chunk.
        drop(inline_store(data));
        let log = open();
        let recorded = EngineState {
            view_id: 1,
            chunk_size: Some(1 << 20),
        };
        assert_eq!(EngineState::of(&log), Some(recorded));
        assert_eq!(check(&log, 1 << 16), Ok(()));
        drop(log);
        let mut store = inline_store(data);
        let version = (1u64 << 32) | 1;
        append(&store, version).unwrap();
        store.persist(version);
        store.sync_inline();
        drop(store);
        let mut log = open();
        assert_eq!(check(&log, 1 << 20), Ok(()));
        let err = check(&log, 1 << 16).unwrap_err();
        for part in [
            "layout.chunk_size = 1048576",
            "the configuration says 65536",
            "shard 0",
        ] {
            assert!(err.contains(part), "{part:?} in {err}");
        }
        // A log of format 1 records no chunk size: nothing to check against.
        log.set_engine_state(&[1, 1, 0, 0, 0]).unwrap();
        assert_eq!(check(&log, 1 << 16), Ok(()));
    }

    /// Bound on the waits below for the persister threads to catch up (a liveness bound, not a
    /// speed check).
    const CATCH_UP_POLLS: u32 = 20_000;

    fn threaded_store(cb: &CrashingBackend) -> ShardStore {
        let config = LogConfig {
            sync: SyncPolicy::Fsync,
            segment_bytes: 16 << 10,
            checkpoint_every_versions: 50,
            ..LogConfig::default()
        };
        let log = Log::open(Arc::new(cb.clone()), config).unwrap();
        let notify = Arc::new(Notify::new());
        let store = ShardStore::start(
            ShardId(0),
            log,
            1,
            SyncPolicy::Fsync,
            false,
            notify,
            1 << 20,
        )
        .unwrap();
        assert_eq!(store.threads.len(), SYNCS_IN_FLIGHT);
        store
    }

    fn append(store: &ShardStore, version: Version) -> Result<(), LogError> {
        let value = [version as u8; 300];
        let write = derechofs_storage::Write {
            key: b"k",
            value: Some(&value),
        };
        store
            .kv()
            .log_mut()
            .append(version, Hlc::at(version), &[write])
    }

    /// The last version a process restarted after a power cut now finds.
    fn after_power_cut(cb: &CrashingBackend, seed: u64) -> Option<Version> {
        let options = CrashOptions {
            torn_writes: true,
            garbage: true,
        };
        let log = Log::open(Arc::new(cb.crash(seed, options)), LogConfig::default()).unwrap();
        log.latest().map(|(v, _)| v)
    }

    /// Appends versions 1..=`last` to a threaded store and asks each persisted, after telling
    /// the store whether a client may wait for it (`waited`, if it says); checks that every
    /// version reported survives a power cut then, that `last` is reported without another
    /// request (polls, bounded), and that a power cut after the store stops keeps it.
    fn persist_each_and_check(last: Version, waited: impl Fn(Version) -> Option<bool>) {
        let cb = CrashingBackend::new();
        let mut store = threaded_store(&cb);
        let mut reported = None;
        let mut check = |store: &mut ShardStore, seed: u64| {
            if let Some(v) = store.take_persisted().unwrap() {
                assert!(Some(v) > reported, "{v} reported after {reported:?}");
                reported = Some(v);
                let survived = after_power_cut(&cb, seed);
                assert!(
                    survived >= Some(v),
                    "reported {v}, a power cut keeps {survived:?}"
                );
            }
            reported
        };
        for v in 1..=last {
            append(&store, v).unwrap();
            if let Some(waited) = waited(v) {
                store.delivered(waited);
            }
            store.persist(v);
            check(&mut store, v);
        }
        let mut polls = 0;
        while check(&mut store, polls.into()) < Some(last) {
            polls += 1;
            assert!(polls < CATCH_UP_POLLS, "the persisters stalled");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(store);
        assert_eq!(after_power_cut(&cb, 0), Some(last));
    }

    #[test]
    fn overlapping_syncs_report_only_versions_that_survive_a_power_cut() {
        persist_each_and_check(400, |_| None);
    }

    #[test]
    fn versions_nobody_waits_for_are_made_durable_without_another_request() {
        // Every tenth version may have a client waiting (a write that wrote); the others
        // (failed conditional puts) are synced within the lazy interval or with the next
        // waited one. The last ones are of the second kind: nothing asks again after them.
        persist_each_and_check(205, |v| Some(v % 10 == 0));
    }

    #[test]
    fn a_store_stopped_cleanly_makes_what_it_was_asked_to_persist_lazily_durable() {
        let cb = CrashingBackend::new();
        let mut store = threaded_store(&cb);
        for v in 1..=5 {
            append(&store, v).unwrap();
            store.delivered(false);
            store.persist(v);
        }
        drop(store);
        assert_eq!(after_power_cut(&cb, 0), Some(5));
    }

    /// Polls (bounded) until the store reports a version at least `want`; returns the last
    /// version it reported.
    fn wait_reported(store: &mut ShardStore, want: Version) -> Option<Version> {
        let mut reported = None;
        for _ in 0..CATCH_UP_POLLS {
            if let Some(v) = store.take_persisted().unwrap() {
                reported = Some(v);
            }
            if reported >= Some(want) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        reported
    }

    #[test]
    fn a_version_a_finished_sync_already_covered_is_reported_when_asked_for() {
        // The driver appends a delivery, then asks for it to be persisted; a sync begun in
        // between covers it, and ends before the ask. (A view change's trim is the last
        // delivery for a while, and the member installs the next view only once it hears of
        // it.)
        let cb = CrashingBackend::new();
        let mut store = threaded_store(&cb);
        append(&store, 1).unwrap();
        append(&store, 2).unwrap();
        store.persist(1);
        assert_eq!(
            wait_reported(&mut store, 1),
            Some(1),
            "the version asked for"
        );
        assert_eq!(
            store.kv().log().persisted(),
            Some(2),
            "the sync covered both"
        );
        store.persist(2);
        assert_eq!(
            wait_reported(&mut store, 2),
            Some(2),
            "the later ask hears of the sync that covered it"
        );
    }

    #[test]
    fn a_failing_disk_stops_every_persister_and_nothing_is_reported_after_the_failure() {
        for fail_after in [3u64, 10, 40] {
            let cb = CrashingBackend::new();
            let mut store = threaded_store(&cb);
            cb.fail_after(Some(fail_after));
            let mut failed = None;
            let mut polls = 0;
            let mut v: Version = 0;
            while failed.is_none() {
                v += 1;
                if append(&store, v).is_ok() {
                    store.persist(v);
                }
                match store.take_persisted() {
                    Ok(Some(p)) => {
                        let survived = after_power_cut(&cb, v);
                        assert!(survived >= Some(p), "reported {p}, kept {survived:?}");
                    }
                    Ok(None) => {}
                    Err(e) => failed = Some(e),
                }
                polls += 1;
                assert!(polls < CATCH_UP_POLLS, "the failure was never reported");
                std::thread::sleep(Duration::from_micros(100));
            }
            for _ in 0..10 {
                assert_eq!(store.take_persisted().err(), failed, "the failure stays");
            }
            // Dropping the store joins every persister thread.
            drop(store);
        }
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
