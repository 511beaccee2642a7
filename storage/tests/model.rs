//! The model test: random sequences of operations (appends of multi-key deltas with puts and
//! deletes, rejected appends, commits, syncs, checkpoints, trims, truncations, restarts and power
//! cuts with torn and scribbled writes) applied to a log over the crashing backend and to the
//! reference model, comparing every read.
//!
//! After every restart or crash: each version reported persisted survived, the log holds a prefix
//! of what was appended (the reference is cut back to the recovered latest version), and every
//! read matches. Each case derives from one seed; a failure prints `seed = N`, and
//! `DERECHOFS_SEED=N cargo test -p derechofs-storage --test model` reruns exactly that case.

mod common;

use std::sync::Arc;

use common::{assert_matches, for_each_seed, value_of, KeyWrite, Reference, Rng};
use derechofs_storage::backend::{Backend, CrashOptions, CrashingBackend};
use derechofs_storage::{version_of, Hlc, Log, LogConfig, LogError, SyncPolicy, Version, Write};

const KEYS: &[&[u8]] = &[b"a", b"a/1", b"a/2", b"ab", b"b/1", b"b/2", b"c"];
const PREFIXES: &[&[u8]] = &[b"", b"a", b"a/", b"b/", b"d"];
/// Cases in the default batch.
const SEEDS: u64 = 300;

#[test]
fn model_random_operations_and_crashes_match_the_reference() {
    for_each_seed("model", SEEDS, run);
}

struct Case {
    rng: Rng,
    config: LogConfig,
    backend: CrashingBackend,
    log: Log,
    reference: Reference,
    /// The highest version the log reported persisted in a way that promises durability.
    durable: Option<Version>,
    now_ms: u64,
    seed: u64,
}

fn run(seed: u64) {
    let mut rng = Rng::new(seed);
    let sync = match rng.below(3) {
        0 => SyncPolicy::Fsync,
        1 => SyncPolicy::BatchMs(1 + rng.below(10)),
        _ => SyncPolicy::None,
    };
    let config = LogConfig {
        sync,
        segment_bytes: *rng.pick(&[4096, 4096, 8192, 1 << 20]),
        write_buffer_bytes: *rng.pick(&[1, 100, 700, 4096]),
        checkpoint_every_versions: *rng.pick(&[0, 0, 3, 10]),
    };
    let backend = CrashingBackend::new();
    let log = Log::open(Arc::new(backend.clone()), config.clone()).expect("open an empty log");
    let mut case = Case {
        rng,
        config,
        backend,
        log,
        reference: Reference::default(),
        durable: None,
        now_ms: 0,
        seed,
    };
    let steps = 40 + case.rng.below(80);
    if std::env::var_os("DERECHOFS_TRACE").is_some() {
        eprintln!("{:?}", case.config);
    }
    for _ in 0..steps {
        case.step();
    }
    case.log.sync().expect("final sync");
    case.durable = case.log.persisted();
    case.check_all();
    case.crash();
}

impl Case {
    fn step(&mut self) {
        self.now_ms += self.rng.below(4);
        let op = self.rng.below(100);
        if std::env::var_os("DERECHOFS_TRACE").is_some() {
            eprintln!(
                "op {op:2} latest {:?} persisted {:?} durable {:?}",
                self.log.latest().map(|l| l.0),
                self.log.persisted(),
                self.durable
            );
        }
        match op {
            0..=49 => self.append(),
            50..=54 => self.append_out_of_order(),
            55..=64 => {
                let persisted = self.log.commit(self.now_ms).expect("commit");
                // Under `None`, a commit hands records to the backend without syncing.
                if self.config.sync != SyncPolicy::None {
                    self.note_durable(persisted);
                }
            }
            65..=67 => {
                let persisted = self.log.sync().expect("sync");
                self.note_durable(persisted);
            }
            68..=70 => {
                self.log.checkpoint().expect("checkpoint");
                self.note_durable(self.log.persisted());
            }
            71..=74 => self.trim(),
            75..=77 => self.truncate(),
            78..=81 => self.restart(),
            82..=89 => self.crash(),
            _ => self.spot_check(),
        }
    }

    fn note_durable(&mut self, persisted: Option<Version>) {
        assert!(
            persisted <= self.reference.latest().map(|l| l.0),
            "persisted {persisted:?} past the latest version"
        );
        self.durable = self.durable.max(persisted);
    }

    fn next_version(&mut self) -> (Version, Hlc) {
        let (last, last_hlc) = self
            .reference
            .latest()
            .unwrap_or((version_of(1, 0), Hlc::at(1)));
        let version = if self.rng.chance(1, 15) {
            version_of((last >> 32) as u32 + 1, 0)
        } else {
            last + 1 + self.rng.below(2)
        };
        let hlc = if self.rng.chance(1, 2) {
            last_hlc.tick()
        } else {
            Hlc::at(last_hlc.wall_us + 1 + self.rng.below(5))
        };
        (version, hlc)
    }

    fn random_delta(&mut self, version: Version) -> Vec<KeyWrite> {
        let n = 1 + self.rng.below(4);
        (0..n)
            .map(|_| {
                let key = self.rng.pick(KEYS).to_vec();
                let value = if self.rng.chance(1, 4) {
                    None
                } else {
                    let len = if self.rng.chance(1, 40) {
                        5000 // larger than a small segment
                    } else {
                        self.rng.below(60) as usize
                    };
                    // Salted with the seed's stream, so a version rewritten after a truncation
                    // gets other values.
                    let salt = self.rng.next();
                    let mut v = value_of(version ^ salt, &key, len);
                    v.truncate(len);
                    Some(v)
                };
                (key, value)
            })
            .collect()
    }

    fn append(&mut self) {
        let (version, hlc) = self.next_version();
        let writes = self.random_delta(version);
        let as_writes: Vec<Write<'_>> = writes
            .iter()
            .map(|(k, v)| Write {
                key: k,
                value: v.as_deref(),
            })
            .collect();
        self.log
            .append(version, hlc, &as_writes)
            .unwrap_or_else(|e| panic!("append {version:#x}: {e}"));
        self.reference.append(version, hlc, &writes);
    }

    fn append_out_of_order(&mut self) {
        let Some((last, last_hlc)) = self.reference.latest() else {
            return;
        };
        let (version, hlc) = if self.rng.chance(1, 2) {
            (last - self.rng.below(3).min(last), last_hlc.tick())
        } else {
            (
                last + 1,
                Hlc::at(last_hlc.wall_us.saturating_sub(self.rng.below(3))),
            )
        };
        let r = self.log.append(version, hlc, &[Write::put(b"a", b"never")]);
        match r {
            Err(LogError::VersionNotIncreasing { last: l, got }) => {
                assert_eq!((l, got), (last, version));
            }
            Err(LogError::StampNotIncreasing { last: l, got }) => {
                assert!(version > last);
                assert_eq!((l, got), (last_hlc, hlc));
            }
            other => panic!("append of {version:#x} at {hlc} after {last:#x}: {other:?}"),
        }
    }

    /// A version near the log's range: an existing one, one in a gap, or one outside.
    fn some_version(&mut self) -> Version {
        let versions = &self.reference.versions;
        if versions.is_empty() || self.rng.chance(1, 10) {
            return self.rng.below(4);
        }
        let (v, _) = *self.rng.pick(versions);
        v + self.rng.below(2)
    }

    fn trim(&mut self) {
        let before = self.some_version();
        let horizon = self.reference.horizon;
        let got = self.log.trim(before).expect("trim");
        assert_eq!(got, self.reference.trim(before), "trim({before:#x})");
        if self.reference.horizon != horizon {
            // A trim that moved the horizon synced everything first.
            self.note_durable(self.log.persisted());
            assert_eq!(self.log.persisted(), self.reference.latest().map(|l| l.0));
        }
    }

    fn truncate(&mut self) {
        let after = self.some_version();
        match self.log.truncate_after(after) {
            Ok(()) => {
                assert!(
                    self.reference.horizon.is_none_or(|(h, _)| after >= h),
                    "truncate_after({after:#x}) below the horizon succeeded"
                );
                let before = self.reference.latest();
                self.reference.truncate_after(after);
                let latest = self.reference.latest().map(|l| l.0);
                assert_eq!(self.log.latest().map(|l| l.0), latest);
                if self.reference.latest() != before {
                    // The cut is durable and nothing above it is left to promise.
                    assert_eq!(self.log.persisted(), latest);
                    self.durable = latest;
                }
            }
            Err(LogError::Trimmed { .. }) => {
                assert!(
                    self.reference.horizon.is_some_and(|(h, _)| after < h),
                    "truncate_after({after:#x}) refused above the horizon"
                );
            }
            Err(e) => panic!("truncate_after({after:#x}): {e}"),
        }
    }

    /// The process restarts: the log is reopened on the same files, whatever was not written out.
    fn restart(&mut self) {
        let backend: Arc<dyn Backend> = Arc::new(self.backend.clone());
        self.reopen(backend, "restart");
    }

    /// The power fails: only what was synced is certain; in-flight writes may be torn and
    /// scribbled on.
    fn crash(&mut self) {
        let options = CrashOptions {
            torn_writes: self.rng.chance(3, 4),
            garbage: self.rng.chance(1, 2),
        };
        let crash_seed = self.rng.next();
        self.backend = self.backend.crash(crash_seed, options);
        let backend: Arc<dyn Backend> = Arc::new(self.backend.clone());
        self.reopen(backend, "crash");
    }

    fn reopen(&mut self, backend: Arc<dyn Backend>, how: &str) {
        let seed = self.seed;
        self.log = Log::open(backend, self.config.clone())
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after {how}: {e}"));
        let latest = self.log.latest();
        if std::env::var_os("DERECHOFS_TRACE").is_some() {
            let mut files = self.backend.list().unwrap_or_default();
            files.sort();
            eprintln!("{how}: {:?} files {files:?}", self.log.recovery_report());
        }
        assert!(
            latest.map(|l| l.0) >= self.durable,
            "{how}: version {:?} was reported persisted, the log recovered up to {latest:?}",
            self.durable
        );
        match latest {
            Some((v, s)) => {
                assert_eq!(
                    self.reference.stamp_of(v),
                    Some(s),
                    "{how}: recovered {v:#x} at {s}, which was not appended"
                );
                self.reference.truncate_after(v);
            }
            None => {
                assert_eq!(self.reference.horizon, None, "{how}: the horizon was lost");
                self.reference = Reference::default();
            }
        }
        // Recovery syncs what it found: all of it is durable now.
        assert_eq!(self.log.persisted(), latest.map(|l| l.0), "{how}");
        self.durable = latest.map(|l| l.0);
        self.check_all();
    }

    fn check_all(&self) {
        assert_matches(&self.log, &self.reference, KEYS, PREFIXES);
    }

    /// A handful of random reads, cheaper than comparing everything.
    fn spot_check(&mut self) {
        for _ in 0..8 {
            let key = *self.rng.pick(KEYS);
            let v = self.some_version();
            let got = common::read("get", self.log.get(key, v), |b| b.map(|b| b.to_vec()));
            let want = self.reference.get(key, v);
            assert_eq!(got, want, "get({key:?}, {v:#x})");
            // A part of the value: what slicing the whole value gives, with its length.
            let from = self.rng.below(80);
            let len = self.rng.below(80) as usize;
            let got = common::read("get_range", self.log.get_range(key, v, from, len), |r| {
                r.map(|(b, total)| (b.to_vec(), total))
            });
            let want = match want {
                common::Read::Ok(w) => common::Read::Ok(w.map(|w| {
                    let start = (from as usize).min(w.len());
                    let end = (start + len).min(w.len());
                    (w[start..end].to_vec(), w.len() as u64)
                })),
                common::Read::Trimmed => common::Read::Trimmed,
            };
            assert_eq!(got, want, "get_range({key:?}, {v:#x}, {from}, {len})");
        }
        if self.rng.chance(1, 4) {
            self.check_all();
        }
    }
}
