//! Zero-filling ahead of the append point ([`Prefiller`]): a crash at any point of the
//! zero-filling, the appends and the segment rolls loses no synced record and recovery ends
//! after the last record that survived; the zero-filler never writes over a byte the appender
//! wrote, and the appender reads back every record it wrote while zeros are written around it.

mod common;

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{for_each_seed, stamp, value_of, Rng};
use derechofs_storage::backend::{
    Backend, BackendFile, CrashOptions, CrashingBackend, FileBackend,
};
use derechofs_storage::prefill::{PREFILL_CHUNK_BYTES, PREFILL_LEAD_MIN_BYTES};
use derechofs_storage::{Log, LogConfig, PrefillStep, SyncPolicy, Version, Write};

/// Segments of a few zero-filling chunks, so rolls happen while zeros are written.
const SEGMENT: u64 = 4 * PREFILL_CHUNK_BYTES;

/// A value's length: one in `one_in` is out of line (64 KiB and up to `large_extra` more), the
/// others `small.0` and up to `small.1` more.
fn value_len(rng: &mut Rng, one_in: u64, large_extra: usize, small: (usize, usize)) -> usize {
    if rng.chance(1, one_in) {
        64 * 1024 + rng.index(large_extra)
    } else {
        small.0 + rng.index(small.1)
    }
}

fn config() -> LogConfig {
    LogConfig {
        sync: SyncPolicy::Fsync,
        segment_bytes: SEGMENT,
        write_buffer_bytes: 1 << 20,
        checkpoint_every_versions: 0,
    }
}

fn key_of(v: Version) -> Vec<u8> {
    format!("k{}", v % 8).into_bytes()
}

/// Appends version `v` with a value of `len` bytes (at least 64 KiB goes out of line).
fn append(log: &mut Log, v: Version, len: usize) {
    let key = key_of(v);
    let value = value_of(v, &key, len);
    log.append(v, stamp(v), &[Write::put(&key, &value)])
        .unwrap_or_else(|e| panic!("append of {v}: {e}"));
}

/// Every version up to the log's latest reads back as written; returns the latest.
fn check_contents(log: &Log, lens: &BTreeMap<Version, usize>) -> Option<Version> {
    let latest = log.latest().map(|(v, _)| v);
    for v in 1..=latest.unwrap_or(0) {
        let key = key_of(v);
        let len = lens[&v];
        let got = log
            .get(&key, v)
            .unwrap_or_else(|e| panic!("read of {v}: {e}"));
        assert_eq!(
            got.as_deref(),
            Some(&value_of(v, &key, len)[..]),
            "version {v}"
        );
    }
    latest
}

#[test]
fn a_crash_at_any_point_of_zero_filling_and_rolls_loses_no_synced_record() {
    for_each_seed("prefill", 8, |seed| {
        let mut rng = Rng::new(seed);
        let cb = CrashingBackend::new();
        let mut log = Log::open(Arc::new(cb.clone()), config()).unwrap();
        let prefiller = log.prefiller();
        let mut lens = BTreeMap::new();
        let mut next: Version = 1;
        let mut zero_steps = 0;
        let mut zeroed_with_records = 0;
        for step in 0..80u64 {
            match rng.below(10) {
                0..=3 => {
                    let len = value_len(&mut rng, 4, 64 * 1024, (100, 20_000));
                    lens.insert(next, len);
                    append(&mut log, next, len);
                    next += 1;
                }
                4..=5 => {
                    log.sync().unwrap();
                }
                _ => match prefiller.step() {
                    PrefillStep::Wrote(n) => {
                        assert!(n > 0 && n <= PREFILL_CHUNK_BYTES);
                        zero_steps += 1;
                        if next > 1 {
                            zeroed_with_records += 1;
                        }
                    }
                    PrefillStep::Idle | PrefillStep::Overtaken | PrefillStep::Ahead => {}
                    other => panic!("step {step}: {other:?}"),
                },
            }
            if rng.chance(1, 6) {
                // A power cut now: what was synced is there, and recovery ends at a record
                // boundary at or after it, every record before it intact.
                let persisted = log.persisted();
                let after = cb.crash(
                    seed * 1000 + step,
                    CrashOptions {
                        torn_writes: true,
                        garbage: rng.chance(1, 2),
                    },
                );
                let recovered = Log::open(Arc::new(after), config())
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: recovery: {e}"));
                let latest = check_contents(&recovered, &lens);
                assert!(
                    latest >= persisted,
                    "seed {seed} step {step}: recovered {latest:?}, {persisted:?} was synced"
                );
                assert!(latest < Some(next), "recovered a version never appended");
            }
        }
        assert!(
            zero_steps > 0 && zeroed_with_records > 0,
            "zeros were written"
        );
        // A clean stop: everything synced is there and nothing is torn.
        log.sync().unwrap();
        let persisted = log.persisted();
        drop(log);
        assert!(matches!(prefiller.step(), PrefillStep::Stopped));
        let reopened =
            Log::open(Arc::new(cb.crash(seed, CrashOptions::default())), config()).unwrap();
        assert_eq!(reopened.recovery_report().torn, None);
        assert_eq!(check_contents(&reopened, &lens), persisted);
    });
}

#[test]
fn a_segment_zero_filled_to_its_end_recovers_to_its_last_record() {
    let cb = CrashingBackend::new();
    let mut log = Log::open(Arc::new(cb.clone()), config()).unwrap();
    let prefiller = log.prefiller();
    let mut lens = BTreeMap::new();
    for v in 1..=3 {
        lens.insert(v, 1000);
        append(&mut log, v, 1000);
    }
    log.sync().unwrap();
    let mut written = 0;
    while let PrefillStep::Wrote(n) = prefiller.step() {
        written += n;
    }
    assert!(matches!(prefiller.step(), PrefillStep::Idle));
    // Everything past the reservation is zeros now, to the end of the segment.
    assert!(written >= SEGMENT - 2 * PREFILL_CHUNK_BYTES, "{written}");
    let after = cb.crash(1, CrashOptions::default());
    let recovered = Log::open(Arc::new(after.clone()), config()).unwrap();
    assert_eq!(recovered.recovery_report().torn, None);
    assert_eq!(check_contents(&recovered, &lens), Some(3));
    // Appends go on into the zeros, across a roll, and recover.
    let mut log = recovered;
    let prefiller = log.prefiller();
    for v in 4..=60 {
        lens.insert(v, 50_000);
        append(&mut log, v, 50_000);
        if v % 7 == 0 {
            let _ = prefiller.step();
        }
    }
    log.sync().unwrap();
    drop(log);
    let recovered = Log::open(Arc::new(after.crash(2, CrashOptions::default())), config()).unwrap();
    assert_eq!(recovered.recovery_report().torn, None);
    assert_eq!(check_contents(&recovered, &lens), Some(60));
}

#[test]
fn a_log_filling_faster_than_the_zeros_overtakes_them_and_they_start_again_ahead() {
    let cb = CrashingBackend::new();
    let mut log = Log::open(Arc::new(cb.clone()), config()).unwrap();
    let prefiller = log.prefiller();
    append(&mut log, 1, 100);
    log.sync().unwrap();
    assert!(matches!(prefiller.step(), PrefillStep::Wrote(_)));
    // The appender passes every zero written.
    for v in 2..=12 {
        append(&mut log, v, 100_000);
    }
    log.sync().unwrap();
    assert!(matches!(prefiller.step(), PrefillStep::Overtaken));
    assert!(matches!(prefiller.step(), PrefillStep::Wrote(_)));
}

/// A byte range `[start, end)`.
type Range = (u64, u64);

/// Who wrote which bytes of each file: the appender (the test's thread) and the zero-filler
/// (the thread named [`FILLER`]), checked as they write.
#[derive(Debug, Default)]
struct Writes {
    /// Per file: the ranges the appender wrote, and the zero chunk being written.
    files: BTreeMap<String, (Vec<Range>, Option<Range>)>,
    violations: Vec<String>,
    zero_writes: u64,
}

const FILLER: &str = "zero-filler";

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[derive(Debug)]
struct Watched {
    inner: Arc<dyn Backend>,
    writes: Arc<Mutex<Writes>>,
}

#[derive(Debug)]
struct WatchedFile {
    name: String,
    inner: Arc<dyn BackendFile>,
    writes: Arc<Mutex<Writes>>,
}

impl Backend for Watched {
    fn list(&self) -> io::Result<Vec<String>> {
        self.inner.list()
    }
    fn open(&self, name: &str, create: bool) -> io::Result<Arc<dyn BackendFile>> {
        Ok(Arc::new(WatchedFile {
            name: name.to_owned(),
            inner: self.inner.open(name, create)?,
            writes: self.writes.clone(),
        }))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.writes.lock().unwrap().files.remove(name);
        self.inner.remove(name)
    }
    fn read_all(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.read_all(name)
    }
    fn replace(&self, name: &str, data: &[u8]) -> io::Result<()> {
        self.inner.replace(name, data)
    }
}

impl WatchedFile {
    fn watch(
        &self,
        offset: u64,
        len: u64,
        write: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let range = (offset, offset + len);
        let filler = std::thread::current().name() == Some(FILLER);
        {
            let mut w = self.writes.lock().unwrap();
            let w = &mut *w;
            let (appended, zeroing) = w.files.entry(self.name.clone()).or_default();
            if filler {
                if let Some(a) = appended.iter().find(|a| overlaps(**a, range)) {
                    w.violations.push(format!(
                        "{}: zeros {range:?} over appended {a:?}",
                        self.name
                    ));
                }
                *zeroing = Some(range);
                w.zero_writes += 1;
            } else {
                if let Some(z) = zeroing.filter(|z| overlaps(*z, range)) {
                    w.violations.push(format!(
                        "{}: append {range:?} into zeros {z:?} being written",
                        self.name
                    ));
                }
                appended.push(range);
            }
        }
        if filler {
            // Widen the window in which an append could run into the chunk.
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let outcome = write();
        if filler {
            if let Some((_, zeroing)) = self.writes.lock().unwrap().files.get_mut(&self.name) {
                *zeroing = None;
            }
        }
        outcome
    }
}

impl BackendFile for WatchedFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.inner.read_at(offset, len)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.watch(offset, data.len() as u64, || {
            self.inner.write_at(offset, data)
        })
    }
    fn write_vectored_at(&self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let len = parts.iter().map(|p| p.len() as u64).sum();
        self.watch(offset, len, || self.inner.write_vectored_at(offset, parts))
    }
    fn allocate(&self, len: u64) -> io::Result<()> {
        self.inner.allocate(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.inner.sync_data()
    }
}

/// Appends, syncs and reads on the test's thread while a thread writes zeros as fast as it can;
/// then `reopened` (the backend a restart finds) holds every record.
fn appender_and_zero_filler_side_by_side(
    inner: Arc<dyn Backend>,
    reopened: impl FnOnce() -> Arc<dyn Backend>,
) {
    let writes = Arc::new(Mutex::new(Writes::default()));
    let backend = Arc::new(Watched {
        inner,
        writes: writes.clone(),
    });
    let mut log = Log::open(backend.clone(), config()).unwrap();
    let prefiller = log.prefiller();
    let done = Arc::new(AtomicBool::new(false));
    let filler = {
        let (prefiller, done) = (prefiller.clone(), done.clone());
        std::thread::Builder::new()
            .name(FILLER.into())
            .spawn(move || {
                // Unpaced: as many zeros as the thread can write, so the two sides meet often.
                while !done.load(Ordering::SeqCst) {
                    match prefiller.step() {
                        PrefillStep::Stopped => return,
                        PrefillStep::Failed(e) => panic!("zero-filling failed: {e}"),
                        PrefillStep::Idle | PrefillStep::Overtaken | PrefillStep::Ahead => {
                            std::thread::yield_now()
                        }
                        PrefillStep::Wrote(_) => {}
                    }
                }
            })
            .unwrap()
    };
    let mut rng = Rng::new(7);
    let mut lens = BTreeMap::new();
    for v in 1..=300 {
        let len = value_len(&mut rng, 3, 32 * 1024, (50, 6_000));
        lens.insert(v, len);
        append(&mut log, v, len);
        if rng.chance(1, 3) {
            log.sync().unwrap();
        }
        if v % 50 == 0 {
            // Reads of what was appended, with zeros written ahead of it.
            log.flush_buffer().unwrap();
            check_contents(&log, &lens);
        }
    }
    log.sync().unwrap();
    done.store(true, Ordering::SeqCst);
    filler.join().unwrap();
    let w = writes.lock().unwrap();
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
    assert!(w.zero_writes > 10, "zeros were written: {}", w.zero_writes);
    drop(w);
    check_contents(&log, &lens);
    drop(log);
    let reopened = Log::open(reopened(), config()).unwrap();
    assert_eq!(reopened.recovery_report().torn, None);
    assert_eq!(check_contents(&reopened, &lens), Some(300));
}

#[test]
fn the_zero_filler_never_writes_where_the_appender_wrote_or_writes() {
    let cb = CrashingBackend::new();
    appender_and_zero_filler_side_by_side(Arc::new(cb.clone()), || {
        Arc::new(cb.crash(3, CrashOptions::default()))
    });
}

#[test]
fn the_zero_filler_writes_through_a_file_of_its_own_on_the_file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Arc::new(FileBackend::open(dir.path()).unwrap()) as Arc<dyn Backend>;
    appender_and_zero_filler_side_by_side(open(), open);
}

#[test]
fn a_log_that_stays_small_gets_zeros_only_a_lead_ahead_and_more_as_it_grows() {
    let cb = CrashingBackend::new();
    let config = LogConfig {
        segment_bytes: 4 * PREFILL_LEAD_MIN_BYTES,
        ..config()
    };
    let mut log = Log::open(Arc::new(cb.clone()), config).unwrap();
    let prefiller = log.prefiller();
    append(&mut log, 1, 100);
    log.sync().unwrap();
    let fill = || {
        let mut written = 0;
        loop {
            match prefiller.step() {
                PrefillStep::Wrote(n) => written += n,
                PrefillStep::Ahead => return written,
                other => panic!("{other:?}"),
            }
        }
    };
    let first = fill();
    assert!(
        first > 0 && first <= PREFILL_LEAD_MIN_BYTES + PREFILL_CHUNK_BYTES,
        "{first}"
    );
    // The log grows by a few MiB: the zeros go further, as far again as it came.
    for v in 2..=40 {
        append(&mut log, v, 100_000);
    }
    log.sync().unwrap();
    let more = fill();
    assert!(more > 0, "zeros went further");
    assert!(first + more <= 2 * 40 * 100_000 + 2 * PREFILL_LEAD_MIN_BYTES);
}
