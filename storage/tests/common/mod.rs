//! What the integration suites share: a seeded generator, a run-every-seed harness, the backends
//! under test, and a reference model of the log to compare every read with.

// Each suite uses a different part of this module.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;

use derechofs_storage::backend::{Backend, CrashingBackend, FileBackend, MemoryBackend};
use derechofs_storage::{Hlc, Log, LogError, Version};

/// Runs each named suite function, which takes a factory of fresh backends, once per backend
/// kind: `conformance!(f, g)` makes the tests `file::f`, `memory::f`, `crashing::f`, and so on.
#[allow(unused_macros)] // Only the conformance suites use it.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod file {
            use super::*;
            $( #[test] fn $name() { let b = Backends::new(Kind::File); super::$name(&|| b.fresh()) } )*
        }
        mod memory {
            use super::*;
            $( #[test] fn $name() { let b = Backends::new(Kind::Memory); super::$name(&|| b.fresh()) } )*
        }
        mod crashing {
            use super::*;
            $( #[test] fn $name() { let b = Backends::new(Kind::Crashing); super::$name(&|| b.fresh()) } )*
        }
    };
}

/// A small deterministic generator: a test case is reproduced by its seed alone.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }
}

/// Runs `case` for every seed of the batch (`seeds` of them, or `DERECHOFS_SEEDS` for a longer
/// hunt), or only for `DERECHOFS_SEED` when it is set. A failing case prints its seed and the
/// command that reruns exactly that seed.
pub fn for_each_seed(test: &str, seeds: u64, case: impl Fn(u64)) {
    let env = |name: &str| {
        std::env::var(name).ok().map(|s| {
            s.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a u64"))
        })
    };
    let run: Vec<u64> = match env("DERECHOFS_SEED") {
        Some(seed) => vec![seed],
        None => (0..env("DERECHOFS_SEEDS").unwrap_or(seeds)).collect(),
    };
    for seed in run {
        let guard = SeedGuard { test, seed };
        case(seed);
        std::mem::forget(guard);
    }
}

/// Prints the seed when a case panics (dropped during unwinding; forgotten on success).
struct SeedGuard<'a> {
    test: &'a str,
    seed: u64,
}

impl Drop for SeedGuard<'_> {
    fn drop(&mut self) {
        eprintln!(
            "seed = {seed}\nrerun: DERECHOFS_SEED={seed} cargo test -p derechofs-storage --test {test}",
            seed = self.seed,
            test = self.test
        );
    }
}

/// Hands out backends of one kind; file backends live in temporary directories removed when the
/// factory is dropped.
pub struct Backends {
    kind: Kind,
    dirs: RefCell<Vec<tempfile::TempDir>>,
}

#[derive(Clone, Copy, Debug)]
pub enum Kind {
    File,
    Memory,
    Crashing,
}

impl Backends {
    pub fn new(kind: Kind) -> Backends {
        Backends {
            kind,
            dirs: RefCell::new(Vec::new()),
        }
    }

    /// A fresh, empty backend.
    pub fn fresh(&self) -> Arc<dyn Backend> {
        match self.kind {
            Kind::File => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let backend = FileBackend::open(dir.path()).expect("file backend");
                self.dirs.borrow_mut().push(dir);
                Arc::new(backend)
            }
            Kind::Memory => Arc::new(MemoryBackend::new()),
            Kind::Crashing => Arc::new(CrashingBackend::new()),
        }
    }
}

/// Stamps for tests: one per version, strictly increasing, with gaps so that "between two
/// stamps" exists.
pub fn stamp(i: u64) -> Hlc {
    Hlc {
        wall_us: 1_000 + 10 * i,
        logical: (i % 3) as u32,
    }
}

/// A value that says which version and key wrote it, of a length that varies.
pub fn value_of(version: Version, key: &[u8], len: usize) -> Vec<u8> {
    let mut v = format!("{version:x}:{}:", String::from_utf8_lossy(key)).into_bytes();
    let mut x = version.wrapping_mul(31).wrapping_add(key.len() as u64);
    while v.len() < len {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.push((x >> 56) as u8);
    }
    v.truncate(len.max(1));
    v
}

/// The reference model: every version with its stamp, and each key's history as a list of
/// `(version, value or tombstone)`, with the same trim and truncation semantics as the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reference {
    pub versions: Vec<(Version, Hlc)>,
    pub keys: BTreeMap<Vec<u8>, History>,
    pub horizon: Option<(Version, Hlc)>,
}

/// A key's changes in the reference: `(version, value or tombstone)`, oldest first.
pub type History = Vec<(Version, Option<Vec<u8>>)>;
/// One key write: a value, or a tombstone.
pub type KeyWrite = (Vec<u8>, Option<Vec<u8>>);
/// Keys with their values, as a scan returns them.
pub type Items = Vec<(Vec<u8>, Vec<u8>)>;

/// What the reference says a read gives: a value or a trim error.
#[derive(Debug, PartialEq, Eq)]
pub enum Read<T> {
    Ok(T),
    Trimmed,
}

impl Reference {
    pub fn latest(&self) -> Option<(Version, Hlc)> {
        self.versions.last().copied()
    }

    pub fn append(&mut self, version: Version, hlc: Hlc, writes: &[KeyWrite]) {
        if let Some((v, h)) = self.latest() {
            assert!(
                version > v && hlc > h,
                "the reference only takes valid appends"
            );
        }
        self.versions.push((version, hlc));
        for (key, value) in writes {
            let history = self.keys.entry(key.clone()).or_default();
            match history.last_mut() {
                Some(last) if last.0 == version => last.1 = value.clone(),
                _ => history.push((version, value.clone())),
            }
        }
    }

    fn trimmed_at(&self, version: Version) -> bool {
        self.horizon.is_some_and(|(h, _)| version < h)
    }

    pub fn get(&self, key: &[u8], version: Version) -> Read<Option<Vec<u8>>> {
        if self.trimmed_at(version) {
            return Read::Trimmed;
        }
        Read::Ok(self.value_at(key, version))
    }

    fn value_at(&self, key: &[u8], version: Version) -> Option<Vec<u8>> {
        let history = self.keys.get(key)?;
        let n = history.partition_point(|(v, _)| *v <= version);
        n.checked_sub(1).and_then(|i| history[i].1.clone())
    }

    pub fn version_at(&self, t: Hlc) -> Read<Option<Version>> {
        if self.horizon.is_some_and(|(_, hs)| t < hs) {
            return Read::Trimmed;
        }
        let n = self.versions.partition_point(|(_, s)| *s <= t);
        Read::Ok(n.checked_sub(1).map(|i| self.versions[i].0))
    }

    pub fn get_at_time(&self, key: &[u8], t: Hlc) -> Read<Option<Vec<u8>>> {
        match self.version_at(t) {
            Read::Trimmed => Read::Trimmed,
            Read::Ok(None) => Read::Ok(None),
            Read::Ok(Some(v)) => self.get(key, v),
        }
    }

    /// Every key with `prefix` that has a value at `version`, in order.
    pub fn scan(&self, prefix: &[u8], version: Version) -> Read<Items> {
        if self.trimmed_at(version) {
            return Read::Trimmed;
        }
        Read::Ok(
            self.keys
                .keys()
                .filter(|k| k.starts_with(prefix))
                .filter_map(|k| self.value_at(k, version).map(|v| (k.clone(), v)))
                .collect(),
        )
    }

    /// The key's changes still in the log: `(version, stamp, value length)`.
    pub fn history(&self, key: &[u8]) -> Vec<(Version, Hlc, Option<u32>)> {
        let Some(history) = self.keys.get(key) else {
            return Vec::new();
        };
        history
            .iter()
            .map(|(v, value)| {
                let stamp = self.stamp_of(*v).expect("every change has a version");
                (*v, stamp, value.as_ref().map(|x| x.len() as u32))
            })
            .collect()
    }

    pub fn stamp_of(&self, version: Version) -> Option<Hlc> {
        self.versions
            .binary_search_by_key(&version, |(v, _)| *v)
            .ok()
            .map(|i| self.versions[i].1)
    }

    /// Trims before `before`, as [`Log::trim`] does; returns the horizon it reports.
    pub fn trim(&mut self, before: Version) -> Option<Version> {
        let n = self.versions.partition_point(|(v, _)| *v <= before);
        let Some(i) = n.checked_sub(1) else {
            return self.horizon.map(|(h, _)| h);
        };
        let (h, hs) = self.versions[i];
        if let Some((old, _)) = self.horizon {
            if old >= h {
                return Some(old);
            }
        }
        self.horizon = Some((h, hs));
        self.versions.drain(..i);
        for history in self.keys.values_mut() {
            let keep = history.partition_point(|(v, _)| *v <= h);
            let at_horizon = keep.checked_sub(1).and_then(|j| history[j].1.clone());
            history.drain(..keep);
            if let Some(value) = at_horizon {
                history.insert(0, (h, Some(value)));
            }
        }
        self.keys.retain(|_, h| !h.is_empty());
        Some(h)
    }

    /// Drops every version above `version`, as [`Log::truncate_after`] does (the caller checks
    /// the horizon).
    pub fn truncate_after(&mut self, version: Version) {
        let n = self.versions.partition_point(|(v, _)| *v <= version);
        self.versions.truncate(n);
        for history in self.keys.values_mut() {
            let keep = history.partition_point(|(v, _)| *v <= version);
            history.truncate(keep);
        }
        self.keys.retain(|_, h| !h.is_empty());
    }
}

/// Converts a log read into the reference's shape; any error other than `Trimmed` fails the test.
pub fn read<T, U>(what: &str, r: Result<T, LogError>, f: impl FnOnce(T) -> U) -> Read<U> {
    match r {
        Ok(x) => Read::Ok(f(x)),
        Err(LogError::Trimmed { .. }) => Read::Trimmed,
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

fn bytes_opt(b: Option<bytes::Bytes>) -> Option<Vec<u8>> {
    b.map(|b| b.to_vec())
}

/// Reads a whole prefix scan from the log, page by page, checking the paging rules on the way.
pub fn scan_all(
    log: &Log,
    prefix: &[u8],
    version: Version,
    limit: usize,
) -> Result<Items, LogError> {
    let mut out: Items = Vec::new();
    let mut after: Option<Vec<u8>> = None;
    for _ in 0..10_000 {
        let page = log.scan(prefix, version, after.as_deref(), limit)?;
        assert!(
            page.items.len() <= limit,
            "a page holds at most `limit` items"
        );
        for (k, v) in &page.items {
            assert!(
                k.starts_with(prefix),
                "scan returned {k:?} outside {prefix:?}"
            );
            if let Some((last, _)) = out.last() {
                assert!(k > last, "scan out of order: {k:?} after {last:?}");
            }
            out.push((k.clone(), v.to_vec()));
        }
        match page.resume_after {
            None => return Ok(out),
            Some(a) => {
                assert_eq!(
                    Some(&a),
                    page.items.last().map(|(k, _)| k),
                    "resume_after is the last key handed out"
                );
                after = Some(a);
            }
        }
    }
    panic!("scan of {prefix:?} did not end");
}

/// Checks every read of `log` against `reference`: the version table, each key at every version
/// (and between and before them), time lookups at every stamp and between, histories and scans.
pub fn assert_matches(log: &Log, reference: &Reference, keys: &[&[u8]], prefixes: &[&[u8]]) {
    assert_eq!(log.latest(), reference.latest(), "latest");
    assert_eq!(log.oldest(), reference.versions.first().copied(), "oldest");
    assert_eq!(
        log.version_count(),
        reference.versions.len(),
        "version count"
    );
    assert_eq!(log.key_count(), reference.keys.len(), "key count");
    assert_eq!(log.horizon(), reference.horizon, "horizon");

    let mut probe_versions: Vec<Version> = vec![0, Version::MAX];
    for &(v, _) in &reference.versions {
        probe_versions.extend([v.saturating_sub(1), v, v.saturating_add(1)]);
    }
    if let Some((h, _)) = reference.horizon {
        probe_versions.extend([0, h.saturating_sub(1), h]);
    }
    probe_versions.sort_unstable();
    probe_versions.dedup();

    let mut probe_times: Vec<Hlc> = vec![Hlc::ZERO, Hlc::MAX];
    for &(_, s) in &reference.versions {
        probe_times.push(s);
        probe_times.push(s.tick());
        if s.logical > 0 {
            probe_times.push(Hlc {
                wall_us: s.wall_us,
                logical: s.logical - 1,
            });
        } else if s.wall_us > 0 {
            probe_times.push(Hlc {
                wall_us: s.wall_us - 1,
                logical: u32::MAX,
            });
        }
    }
    if let Some((_, hs)) = reference.horizon {
        probe_times.push(Hlc {
            wall_us: hs.wall_us.saturating_sub(1),
            logical: 0,
        });
    }

    for &t in &probe_times {
        assert_eq!(
            read("version_at", log.version_at(t), |v| v),
            reference.version_at(t),
            "version_at({t})"
        );
    }
    for &(v, s) in &reference.versions {
        assert_eq!(log.stamp_of(v), Some(s), "stamp_of({v:#x})");
    }

    for &key in keys {
        for &v in &probe_versions {
            assert_eq!(
                read("get", log.get(key, v), bytes_opt),
                reference.get(key, v),
                "get({:?}, {v:#x})",
                String::from_utf8_lossy(key)
            );
        }
        assert_eq!(
            read("get_latest", log.get_latest(key), bytes_opt),
            reference.get(key, Version::MAX),
            "get_latest({:?})",
            String::from_utf8_lossy(key)
        );
        for &t in &probe_times {
            assert_eq!(
                read("get_at_time", log.get_at_time(key, t), bytes_opt),
                reference.get_at_time(key, t),
                "get_at_time({:?}, {t})",
                String::from_utf8_lossy(key)
            );
        }
        let history: Vec<_> = log
            .history(key)
            .into_iter()
            .map(|c| (c.version, c.hlc, c.value_len))
            .collect();
        assert_eq!(
            history,
            reference.history(key),
            "history({:?})",
            String::from_utf8_lossy(key)
        );
    }

    for &prefix in prefixes {
        for (n, &v) in probe_versions.iter().enumerate() {
            let limit = 1 + n % 3;
            assert_eq!(
                read("scan", scan_all(log, prefix, v, limit), |x| x),
                reference.scan(prefix, v),
                "scan({:?}, {v:#x}, limit {limit})",
                String::from_utf8_lossy(prefix)
            );
        }
    }
}
