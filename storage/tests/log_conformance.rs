//! How a log behaves, run against every backend: appends and their ordering rules, every kind of
//! read at every version and time, deletes, reopening (with and without a checkpoint), segment
//! rolling, trim, truncation, engine state, sync policies and poisoning. Reads are compared with
//! the reference model in `common`.

#[macro_use]
mod common;

use std::sync::Arc;

use common::{assert_matches, scan_all, stamp, value_of, Backends, KeyWrite, Kind, Reference, Rng};
use derechofs_storage::backend::{Backend, CrashOptions, CrashingBackend};
use derechofs_storage::{
    version_of, Hlc, Log, LogConfig, LogError, SyncPolicy, Version, Write, ENGINE_STATE_MAX,
    OUT_OF_LINE_VALUE_MIN,
};

type Factory<'a> = &'a dyn Fn() -> Arc<dyn Backend>;

const KEYS: &[&[u8]] = &[b"a", b"a/1", b"a/2", b"a/3", b"ab", b"b/1", b"b/2", b"c"];
const PREFIXES: &[&[u8]] = &[b"", b"a", b"a/", b"b/", b"c", b"d"];
const CHECKPOINT_FILE: &str = "index.ckpt";

fn config(segment_bytes: u64) -> LogConfig {
    LogConfig {
        sync: SyncPolicy::Fsync,
        segment_bytes,
        write_buffer_bytes: 512,
        checkpoint_every_versions: 0,
    }
}

fn open(backend: &Arc<dyn Backend>, config: LogConfig) -> Log {
    Log::open(backend.clone(), config).unwrap_or_else(|e| panic!("open: {e}"))
}

fn as_writes(writes: &[KeyWrite]) -> Vec<Write<'_>> {
    writes
        .iter()
        .map(|(k, v)| Write {
            key: k,
            value: v.as_deref(),
        })
        .collect()
}

/// The log and the reference it must agree with.
struct Pair {
    log: Log,
    reference: Reference,
}

impl Pair {
    fn new(backend: &Arc<dyn Backend>, config: LogConfig) -> Pair {
        Pair {
            log: open(backend, config),
            reference: Reference::default(),
        }
    }

    fn append(&mut self, version: Version, hlc: Hlc, writes: &[KeyWrite]) {
        self.log
            .append(version, hlc, &as_writes(writes))
            .unwrap_or_else(|e| panic!("append {version:#x}: {e}"));
        self.reference.append(version, hlc, writes);
    }

    /// Appends `n` versions of random deltas (puts, deletes, several keys, sometimes a large
    /// value), versions with gaps and an occasional new view.
    fn fill(&mut self, rng: &mut Rng, n: u64, value_len_max: usize) {
        for _ in 0..n {
            let (last, last_hlc) = self
                .reference
                .latest()
                .unwrap_or((version_of(1, 0), stamp(0)));
            let version = if rng.chance(1, 10) {
                version_of((last >> 32) as u32 + 1, 0)
            } else {
                last + 1 + rng.below(3)
            };
            let hlc = if rng.chance(1, 2) {
                last_hlc.tick()
            } else {
                Hlc::at(last_hlc.wall_us + 1 + rng.below(20))
            };
            let writes = random_delta(rng, version, value_len_max);
            self.append(version, hlc, &writes);
        }
    }

    fn check(&self) {
        assert_matches(&self.log, &self.reference, KEYS, PREFIXES);
    }

    fn reopen(&mut self, backend: &Arc<dyn Backend>, config: LogConfig) {
        self.log.sync().unwrap();
        self.log = open(backend, config);
    }
}

fn random_delta(rng: &mut Rng, version: Version, value_len_max: usize) -> Vec<KeyWrite> {
    let n = 1 + rng.below(3);
    (0..n)
        .map(|_| {
            let key = rng.pick(KEYS).to_vec();
            let value = if rng.chance(1, 4) {
                None
            } else {
                let len = rng.below(value_len_max as u64 + 1) as usize;
                Some(value_of(version, &key, len))
            };
            (key, value)
        })
        .collect()
}

fn put(key: &[u8], value: &[u8]) -> KeyWrite {
    (key.to_vec(), Some(value.to_vec()))
}

fn del(key: &[u8]) -> KeyWrite {
    (key.to_vec(), None)
}

fn segment_files(backend: &Arc<dyn Backend>) -> Vec<String> {
    let mut names: Vec<String> = backend
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("seg-"))
        .collect();
    names.sort();
    names
}

// The suite.

fn appends_are_read_back_at_every_version_and_time(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    p.check(); // an empty log
    let mut rng = Rng::new(1);
    p.fill(&mut rng, 60, 40);
    p.check();
    p.log.commit(0).unwrap();
    p.check();
}

fn a_version_or_stamp_that_does_not_increase_is_rejected_with_a_typed_error(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    p.append(10, stamp(10), &[put(b"a", b"1")]);
    let rejected = |log: &mut Log, v: Version, h: Hlc| log.append(v, h, &[Write::put(b"a", b"x")]);
    for v in [10, 9, 0] {
        match rejected(&mut p.log, v, stamp(20)) {
            Err(LogError::VersionNotIncreasing { last: 10, got }) => assert_eq!(got, v),
            other => panic!("version {v}: {other:?}"),
        }
    }
    for h in [stamp(10), stamp(9), Hlc::ZERO] {
        match rejected(&mut p.log, 11, h) {
            Err(LogError::StampNotIncreasing { last, got }) => {
                assert_eq!((last, got), (stamp(10), h));
            }
            other => panic!("stamp {h}: {other:?}"),
        }
    }
    // A rejected append changes nothing; the log goes on taking valid ones.
    p.check();
    p.append(11, stamp(10).tick(), &[put(b"a", b"2")]);
    p.check();
    // The same rules hold against the last version recovered after a reopen.
    p.reopen(&b, config(1 << 20));
    assert!(matches!(
        rejected(&mut p.log, 11, stamp(30)),
        Err(LogError::VersionNotIncreasing { last: 11, .. })
    ));
    assert!(matches!(
        rejected(&mut p.log, 12, stamp(10)),
        Err(LogError::StampNotIncreasing { .. })
    ));
    p.check();
    // Bad writes are rejected too: an empty key.
    assert!(matches!(
        p.log.append(12, stamp(40), &[Write::put(b"", b"x")]),
        Err(LogError::TooLarge { .. } | LogError::Invalid(_))
    ));
    p.check();
}

fn version_at_finds_the_version_in_force_at_a_time(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    assert_eq!(p.log.version_at(Hlc::MAX).unwrap(), None, "empty log");
    let t = |wall_us, logical| Hlc { wall_us, logical };
    p.append(5, t(100, 0), &[put(b"a", b"v5")]);
    p.append(7, t(100, 4), &[put(b"a", b"v7")]);
    p.append(9, t(250, 0), &[del(b"a")]);
    let cases = [
        (t(0, 0), None),
        (t(99, 9), None),
        (t(100, 0), Some(5)),
        (t(100, 3), Some(5)),
        (t(100, 4), Some(7)),
        (t(249, u32::MAX), Some(7)),
        (t(250, 0), Some(9)),
        (Hlc::MAX, Some(9)),
    ];
    for (time, want) in cases {
        assert_eq!(p.log.version_at(time).unwrap(), want, "at {time}");
    }
    assert_eq!(
        p.log.get_at_time(b"a", t(100, 2)).unwrap().unwrap(),
        &b"v5"[..]
    );
    assert_eq!(
        p.log.get_at_time(b"a", t(200, 0)).unwrap().unwrap(),
        &b"v7"[..]
    );
    assert_eq!(p.log.get_at_time(b"a", t(300, 0)).unwrap(), None);
    assert_eq!(p.log.get_at_time(b"a", t(1, 0)).unwrap(), None);
    p.check();
}

fn scan_pages_through_a_prefix_in_order_skipping_tombstones(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    let keys: Vec<Vec<u8>> = (0..12).map(|i| format!("d/{i:02}").into_bytes()).collect();
    let writes: Vec<KeyWrite> = keys.iter().map(|k| put(k, k)).collect();
    p.append(1, stamp(1), &writes);
    p.append(
        2,
        stamp(2),
        &[del(b"d/03"), del(b"d/04"), del(b"d/11"), put(b"e", b"x")],
    );
    p.append(3, stamp(3), &[put(b"d/04", b"back"), put(b"d", b"bare")]);
    let at = |v: Version| -> Vec<Vec<u8>> {
        scan_all(&p.log, b"d/", v, 3)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    assert_eq!(at(1), keys);
    let without = |drop: &[&str]| -> Vec<Vec<u8>> {
        keys.iter()
            .filter(|k| !drop.contains(&std::str::from_utf8(k).unwrap()))
            .cloned()
            .collect()
    };
    assert_eq!(at(2), without(&["d/03", "d/04", "d/11"]));
    assert_eq!(at(3), without(&["d/03", "d/11"]));
    assert_eq!(at(0), Vec::<Vec<u8>>::new());
    // One page, then resuming after its last key.
    let first = p.log.scan(b"d/", 3, None, 4).unwrap();
    let names: Vec<&[u8]> = first.items.iter().map(|(k, _)| &k[..]).collect();
    assert_eq!(names, [&b"d/00"[..], b"d/01", b"d/02", b"d/04"]);
    assert_eq!(first.resume_after.as_deref(), Some(&b"d/04"[..]));
    let next = p.log.scan(b"d/", 3, Some(b"d/04"), 2).unwrap();
    let names: Vec<&[u8]> = next.items.iter().map(|(k, _)| &k[..]).collect();
    assert_eq!(names, [&b"d/05"[..], b"d/06"]);
    assert_eq!(&next.items[1].1[..], b"d/06");
    // Resuming from a key that is not there, before the prefix, or past it.
    let from = |after: &[u8]| -> Vec<Vec<u8>> {
        let page = p.log.scan(b"d/", 3, Some(after), 100).unwrap();
        assert_eq!(page.resume_after, None);
        page.items.into_iter().map(|(k, _)| k).collect()
    };
    assert_eq!(
        from(b"d/035"),
        without(&["d/00", "d/01", "d/02", "d/03", "d/11"])
    );
    assert_eq!(from(b"c"), without(&["d/03", "d/11"]));
    assert_eq!(from(b"e"), Vec::<Vec<u8>>::new());
    assert_eq!(from(b"d/10"), Vec::<Vec<u8>>::new());
    p.check();
}

fn a_scan_with_a_limit_of_zero_is_refused_rather_than_reported_complete(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    p.append(1, stamp(1), &[put(b"k", b"v")]);
    match p.log.scan(b"", 1, None, 0) {
        Err(LogError::Invalid(_)) => {}
        Ok(page) => assert!(
            page.resume_after.is_some(),
            "an empty page that says the scan is complete hides the key: {page:?}"
        ),
        Err(e) => panic!("{e}"),
    }
}

fn history_lists_every_change_of_a_key_with_its_stamp(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    p.append(1, stamp(1), &[put(b"a", b"one")]);
    p.append(2, stamp(2), &[put(b"b", b"x")]);
    p.append(3, stamp(3), &[del(b"a")]);
    p.append(4, stamp(4), &[put(b"a", b"four!")]);
    let h = p.log.history(b"a");
    let got: Vec<_> = h.iter().map(|c| (c.version, c.hlc, c.value_len)).collect();
    assert_eq!(
        got,
        vec![
            (1, stamp(1), Some(3)),
            (3, stamp(3), None),
            (4, stamp(4), Some(5))
        ]
    );
    assert!(p.log.history(b"zz").is_empty());
    // The newest `limit` up to a version are the tail of the history up to it.
    for version in 0..=5 {
        for limit in 0..=4 {
            let upto: Vec<_> = h.iter().filter(|c| c.version <= version).cloned().collect();
            let tail = upto[upto.len().saturating_sub(limit)..].to_vec();
            assert_eq!(
                p.log.history_newest(b"a", version, limit),
                tail,
                "version {version} limit {limit}"
            );
        }
    }
    assert!(p.log.history_newest(b"zz", 9, 4).is_empty());
    assert_eq!(p.log.key_version(b"a", 2).unwrap(), Some((1, stamp(1))));
    assert_eq!(p.log.key_version(b"a", 3).unwrap(), Some((3, stamp(3))));
    assert_eq!(p.log.key_version(b"a", 0).unwrap(), None);
    p.check();
}

fn a_delete_hides_the_key_from_then_on_and_a_later_put_revives_it(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    p.append(1, stamp(1), &[put(b"a", b"1"), put(b"a/1", b"x")]);
    p.append(2, stamp(2), &[del(b"a"), del(b"never-written")]);
    p.append(3, stamp(3), &[put(b"a", b"")]); // an empty value is a value, not a deletion
    assert_eq!(p.log.get(b"a", 1).unwrap().unwrap(), &b"1"[..]);
    assert_eq!(p.log.get(b"a", 2).unwrap(), None);
    assert_eq!(p.log.get(b"a", 3).unwrap().unwrap(), &b""[..]);
    assert_eq!(p.log.get(b"never-written", 3).unwrap(), None);
    assert_eq!(
        p.log.history(b"never-written").len(),
        1,
        "the tombstone is a change"
    );
    p.check();
    p.reopen(&b, config(1 << 20));
    p.check();
}

fn a_key_written_twice_in_one_delta_keeps_the_last_write(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(1 << 20));
    p.append(1, stamp(1), &[put(b"a", b"first"), put(b"a", b"second")]);
    p.append(2, stamp(2), &[put(b"b", b"x"), del(b"b")]);
    p.append(
        3,
        stamp(3),
        &[del(b"c"), put(b"c", b"revived"), put(b"a", b"third")],
    );
    assert_eq!(p.log.get(b"a", 1).unwrap().unwrap(), &b"second"[..]);
    assert_eq!(p.log.get(b"b", 2).unwrap(), None);
    assert_eq!(p.log.get(b"c", 3).unwrap().unwrap(), &b"revived"[..]);
    assert_eq!(p.log.history(b"a").len(), 2, "one change per version");
    p.check();
    // Recovery replays the delta in order too.
    p.reopen(&b, config(1 << 20));
    p.check();
}

fn reopening_reads_the_same_with_and_without_a_checkpoint(new: Factory<'_>) {
    let b = new();
    let cfg = config(8192);
    let mut p = Pair::new(&b, cfg.clone());
    let mut rng = Rng::new(2);
    p.fill(&mut rng, 80, 200);
    p.reopen(&b, cfg.clone());
    assert!(!p.log.recovery_report().from_checkpoint);
    p.check();
    p.log.checkpoint().unwrap();
    p.fill(&mut rng, 30, 200);
    p.reopen(&b, cfg.clone());
    let report = p.log.recovery_report().clone();
    assert!(report.from_checkpoint, "{report:?}");
    assert!(report.records_scanned <= 30, "{report:?}");
    assert_eq!(report.torn, None);
    p.check();
    // A checkpoint at the very end: nothing left to scan.
    p.log.checkpoint().unwrap();
    p.reopen(&b, cfg.clone());
    assert!(p.log.recovery_report().from_checkpoint);
    assert_eq!(p.log.recovery_report().records_scanned, 0);
    p.check();
    // Without the checkpoint file the whole log is scanned, to the same result.
    b.remove(CHECKPOINT_FILE).unwrap();
    p.reopen(&b, cfg.clone());
    assert!(!p.log.recovery_report().from_checkpoint);
    assert_eq!(
        p.log.recovery_report().records_scanned,
        p.reference.versions.len() as u64
    );
    p.check();
    // Appends after a checkpoint-based reopen continue the chain: a full rescan accepts them.
    p.log.checkpoint().unwrap();
    p.reopen(&b, cfg.clone());
    p.fill(&mut rng, 20, 200);
    p.reopen(&b, cfg.clone());
    p.check();
    b.remove(CHECKPOINT_FILE).unwrap();
    p.reopen(&b, cfg);
    assert_eq!(p.log.recovery_report().torn, None);
    p.check();
}

fn automatic_checkpoints_are_written_every_n_versions(new: Factory<'_>) {
    let b = new();
    let cfg = LogConfig {
        checkpoint_every_versions: 10,
        ..config(4096)
    };
    let mut p = Pair::new(&b, cfg.clone());
    let mut rng = Rng::new(3);
    for _ in 0..25 {
        p.fill(&mut rng, 1, 100);
        p.log.commit(0).unwrap();
    }
    assert!(b.read_all(CHECKPOINT_FILE).unwrap().is_some());
    p.reopen(&b, cfg);
    let report = p.log.recovery_report();
    assert!(
        report.from_checkpoint && report.records_scanned <= 10,
        "{report:?}"
    );
    p.check();
}

fn segments_roll_and_a_record_larger_than_a_segment_gets_its_own(new: Factory<'_>) {
    let b = new();
    let cfg = config(4096);
    let mut p = Pair::new(&b, cfg.clone());
    let mut rng = Rng::new(4);
    p.fill(&mut rng, 60, 300);
    assert!(segment_files(&b).len() >= 4, "{:?}", segment_files(&b));
    let huge = value_of(0xbeef, b"a/2", 10_000);
    let (v, h) = p.reference.latest().unwrap();
    p.append(v + 1, h.tick(), &[put(b"a/2", &huge), put(b"c", b"small")]);
    p.fill(&mut rng, 20, 300);
    assert_eq!(p.log.get(b"a/2", v + 1).unwrap().unwrap(), &huge[..]);
    p.check();
    p.reopen(&b, cfg.clone());
    p.check();
    p.log.checkpoint().unwrap();
    p.reopen(&b, cfg.clone());
    p.check();
    b.remove(CHECKPOINT_FILE).unwrap();
    p.reopen(&b, cfg);
    assert_eq!(p.log.recovery_report().torn, None);
    p.check();
}

fn trim_keeps_each_keys_state_at_the_horizon_and_refuses_older_reads(new: Factory<'_>) {
    let b = new();
    let cfg = config(4096);
    let mut p = Pair::new(&b, cfg.clone());
    let mut rng = Rng::new(5);
    p.append(
        version_of(1, 1),
        stamp(1),
        &[put(b"a", b"early"), put(b"c", b"gone")],
    );
    p.append(version_of(1, 2), stamp(2), &[del(b"c")]);
    p.fill(&mut rng, 60, 300);
    let segments_before = segment_files(&b).len();
    assert_eq!(
        p.log.trim(0).unwrap(),
        None,
        "nothing at or before version 0"
    );
    assert_eq!(p.log.horizon(), None);

    // Trim before a version that may not exist: the horizon is the last one at or before it.
    let before = p.reference.versions[40].0 + 1;
    let cut = p.reference.trim(before).unwrap();
    assert_eq!(p.log.trim(before).unwrap(), Some(cut));
    assert_eq!(p.log.horizon().map(|h| h.0), Some(cut));
    assert!(
        matches!(p.log.get(b"a", cut - 1), Err(LogError::Trimmed { horizon, .. }) if horizon == cut)
    );
    assert!(matches!(
        p.log.get_at_time(b"a", Hlc::ZERO),
        Err(LogError::Trimmed { .. })
    ));
    assert!(matches!(
        p.log.scan(b"", 0, None, 5),
        Err(LogError::Trimmed { .. })
    ));
    assert!(
        segment_files(&b).len() < segments_before,
        "old segments removed"
    );
    p.check();
    for how in ["checkpoint", "full scan"] {
        if how == "full scan" {
            b.remove(CHECKPOINT_FILE).unwrap();
        }
        p.reopen(&b, cfg.clone());
        assert_eq!(p.log.recovery_report().torn, None, "{how}");
        p.check();
    }

    // Trimming at or below the horizon changes nothing; a later trim moves it on.
    assert_eq!(p.log.trim(cut - 1).unwrap(), Some(cut));
    assert_eq!(p.log.trim(cut).unwrap(), Some(cut));
    p.fill(&mut rng, 20, 300);
    let later = p.reference.versions[30].0;
    assert_eq!(p.log.trim(later).unwrap(), p.reference.trim(later));
    p.check();
    let bases: Vec<String> = b
        .list()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("base-"))
        .collect();
    assert_eq!(bases.len(), 1, "the old base file is removed: {bases:?}");
    for how in ["checkpoint", "full scan"] {
        if how == "full scan" {
            b.remove(CHECKPOINT_FILE).unwrap();
        }
        p.reopen(&b, cfg.clone());
        p.check();
    }
    // Trim by time, to the latest version: the whole state moves into the base.
    let (_, last_stamp) = p.reference.latest().unwrap();
    let h = p.log.trim_before_time(last_stamp.tick()).unwrap();
    assert_eq!(h, p.reference.trim(p.reference.latest().unwrap().0));
    p.check();
    p.fill(&mut rng, 5, 300);
    p.reopen(&b, cfg.clone());
    p.check();
    b.remove(CHECKPOINT_FILE).unwrap();
    p.reopen(&b, cfg);
    p.check();
}

fn truncate_after_cuts_the_tail_and_appends_go_on_from_the_cut(new: Factory<'_>) {
    let b = new();
    let cfg = config(4096);
    let mut p = Pair::new(&b, cfg.clone());
    let mut rng = Rng::new(6);
    p.fill(&mut rng, 80, 300);
    p.log.checkpoint().unwrap();
    p.fill(&mut rng, 10, 300);
    // At or after the latest version: nothing to do.
    let (last, _) = p.reference.latest().unwrap();
    p.log.truncate_after(last).unwrap();
    p.log.truncate_after(last + 100).unwrap();
    p.check();
    // Back into an earlier segment, before the checkpoint.
    let cut = p.reference.versions[25].0;
    p.log.truncate_after(cut).unwrap();
    p.reference.truncate_after(cut);
    assert_eq!(p.log.persisted(), Some(cut));
    p.check();
    // The versions that were cut can be written again, with other contents.
    p.fill(&mut rng, 30, 300);
    p.check();
    for how in ["as left", "checkpoint", "full scan"] {
        match how {
            "checkpoint" => p.log.checkpoint().unwrap(),
            "full scan" => b.remove(CHECKPOINT_FILE).unwrap(),
            _ => {}
        }
        p.reopen(&b, cfg.clone());
        assert_eq!(p.log.recovery_report().torn, None, "{how}");
        p.check();
    }
    // A cut inside the last segment, then to before the first version.
    let cut = p.reference.versions[p.reference.versions.len() - 2].0;
    p.log.truncate_after(cut).unwrap();
    p.reference.truncate_after(cut);
    p.check();
    p.log.truncate_after(0).unwrap();
    p.reference.truncate_after(0);
    assert_eq!(p.log.latest(), None);
    p.check();
    p.fill(&mut rng, 10, 300);
    p.reopen(&b, cfg.clone());
    p.check();
    // After a trim, a cut below the horizon is refused and a cut at the horizon keeps it.
    p.fill(&mut rng, 20, 300);
    let h = p.reference.versions[10].0;
    p.log.trim(h).unwrap();
    p.reference.trim(h);
    assert!(matches!(
        p.log.truncate_after(h - 1),
        Err(LogError::Trimmed { .. })
    ));
    p.log.truncate_after(h).unwrap();
    p.reference.truncate_after(h);
    p.check();
    p.fill(&mut rng, 5, 300);
    p.reopen(&b, cfg.clone());
    p.check();
    b.remove(CHECKPOINT_FILE).unwrap();
    p.reopen(&b, cfg);
    p.check();
}

fn engine_state_is_replaced_durably_and_kept_across_reopen_and_trim(new: Factory<'_>) {
    let b = new();
    let cfg = config(4096);
    let mut p = Pair::new(&b, cfg.clone());
    assert_eq!(p.log.engine_state(), b"");
    p.log.set_engine_state(b"view 1").unwrap();
    assert_eq!(p.log.engine_state(), b"view 1");
    p.reopen(&b, cfg.clone());
    assert_eq!(p.log.engine_state(), b"view 1");
    let mut rng = Rng::new(7);
    p.fill(&mut rng, 20, 100);
    p.log.set_engine_state(b"view 2, longer").unwrap();
    p.log.checkpoint().unwrap();
    p.log.trim(p.reference.versions[5].0).unwrap();
    p.reference.trim(p.reference.versions[5].0);
    p.reopen(&b, cfg.clone());
    assert_eq!(p.log.engine_state(), b"view 2, longer");
    p.check();
    let big = vec![1u8; ENGINE_STATE_MAX + 1];
    assert!(matches!(
        p.log.set_engine_state(&big),
        Err(LogError::TooLarge { .. })
    ));
    assert_eq!(p.log.engine_state(), b"view 2, longer");
    p.log.set_engine_state(b"").unwrap();
    p.reopen(&b, cfg);
    assert_eq!(p.log.engine_state(), b"");
}

fn fsync_commit_persists_every_appended_version(new: Factory<'_>) {
    let b = new();
    let mut p = Pair::new(&b, config(4096));
    assert_eq!(p.log.persisted(), None);
    let mut rng = Rng::new(8);
    for round in 0..10 {
        p.fill(&mut rng, 1 + round, 300);
        let latest = p.reference.latest().map(|l| l.0);
        assert!(
            p.log.persisted() < latest,
            "not persisted before the commit"
        );
        assert_eq!(p.log.commit(round).unwrap(), latest);
        assert_eq!(p.log.persisted(), latest);
    }
}

fn batch_commit_syncs_only_when_due(new: Factory<'_>) {
    let b = new();
    let cfg = LogConfig {
        sync: SyncPolicy::BatchMs(10),
        ..config(1 << 20)
    };
    let mut p = Pair::new(&b, cfg);
    assert_eq!(p.log.sync_due_at(), None, "nothing waits");
    p.append(1, stamp(1), &[put(b"a", b"1")]);
    assert_eq!(p.log.sync_due_at(), Some(0), "never synced: due at once");
    assert_eq!(p.log.commit(100).unwrap(), Some(1));
    assert_eq!(p.log.sync_due_at(), None);
    p.append(2, stamp(2), &[put(b"a", b"2")]);
    assert_eq!(p.log.sync_due_at(), Some(110));
    assert_eq!(p.log.commit(105).unwrap(), Some(1), "not due yet");
    assert_eq!(p.log.commit(109).unwrap(), Some(1));
    p.append(3, stamp(3), &[put(b"a", b"3")]);
    assert_eq!(p.log.sync_due_at(), Some(110));
    assert_eq!(
        p.log.commit(110).unwrap(),
        Some(3),
        "due: one sync covers both"
    );
    assert_eq!(p.log.persisted(), Some(3));
    assert_eq!(p.log.sync_due_at(), None);
    // Nothing new: a commit does not move the clock of the last sync.
    assert_eq!(p.log.commit(200).unwrap(), Some(3));
    p.append(4, stamp(4), &[put(b"a", b"4")]);
    assert_eq!(p.log.sync_due_at(), Some(120));
    assert_eq!(p.log.commit(120).unwrap(), Some(4));
    // An explicit sync persists whatever the policy.
    p.append(5, stamp(5), &[put(b"a", b"5")]);
    assert_eq!(p.log.sync().unwrap(), Some(5));
    assert_eq!(p.log.sync_due_at(), None);
    p.check();
}

fn no_sync_policy_reports_written_versions_as_persisted(new: Factory<'_>) {
    let b = new();
    let cfg = LogConfig {
        sync: SyncPolicy::None,
        ..config(4096)
    };
    let mut p = Pair::new(&b, cfg.clone());
    let mut rng = Rng::new(9);
    p.fill(&mut rng, 30, 300);
    let latest = p.reference.latest().map(|l| l.0);
    assert_eq!(p.log.commit(0).unwrap(), latest);
    assert_eq!(p.log.sync_due_at(), None);
    // Handed to the backend: a reopen without sync (a process restart) sees all of it.
    p.log = open(&b, cfg);
    p.check();
}

/// State transfer reads records in pieces and appends them to another log: the copy reads the
/// same at every version, whatever the piece size, with or without resuming from a cursor.
fn records_read_in_pieces_and_appended_elsewhere_make_the_same_log(new: Factory<'_>) {
    let source_backend = new();
    let mut source = open(&source_backend, config(4096));
    let mut rng = Rng::new(41);
    let mut versions = Vec::new();
    for i in 0..120u32 {
        let writes: Vec<KeyWrite> = (0..1 + rng.below(3))
            .map(|_| {
                let key = KEYS[rng.below(KEYS.len() as u64) as usize].to_vec();
                let value = (rng.below(4) != 0).then(|| vec![i as u8; rng.below(300) as usize]);
                (key, value)
            })
            .collect();
        let version = version_of(1 + i / 50, i);
        source
            .append(version, stamp(u64::from(i) + 1), &as_writes(&writes))
            .unwrap();
        versions.push(version);
    }
    source.sync().unwrap();
    let end = versions[100];
    for (bytes_max, records_max, resume) in [
        (1, 4096, false),
        (700, 4096, true),
        (700, 4096, false),
        (1 << 20, 4096, true),
        (1 << 20, 3, true),
        (1 << 20, 1, false),
    ] {
        let mut copy = open(&new(), config(4096));
        let (mut after, mut cursor) = (None, None);
        loop {
            let (records, next) = source
                .read_records(
                    after,
                    end,
                    bytes_max,
                    records_max,
                    if resume { cursor } else { None },
                )
                .unwrap();
            let Some(last) = records.last() else { break };
            let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
            assert!(
                records.len() == 1 || bytes <= bytes_max,
                "a piece beyond its bound"
            );
            assert!(records.len() <= records_max, "a piece beyond its count");
            after = Some(last.version);
            cursor = next;
            for record in &records {
                copy.append_payload(record.version, record.hlc, &record.payload)
                    .unwrap();
            }
        }
        assert_eq!(after, Some(end), "bytes_max {bytes_max}");
        for &version in versions.iter().take(101) {
            assert_eq!(copy.stamp_of(version), source.stamp_of(version));
            for key in KEYS {
                assert_eq!(
                    copy.get(key, version).unwrap(),
                    source.get(key, version).unwrap()
                );
            }
        }
        assert_eq!(copy.latest().map(|l| l.0), Some(end));
    }
    assert!(source
        .append_payload(versions[119] + 1, stamp(1000), b"junk")
        .is_err());
}

/// Records holding a value of at least `OUT_OF_LINE_VALUE_MIN` bytes are written straight from
/// the caller's memory instead of through the write buffer: mixed with buffered records, in one
/// delta with small values, at a segment's end, they read back the same at every version, before
/// and after a reopen, and the records state transfer reads from them append elsewhere alike.
fn records_with_large_values_read_back_like_buffered_ones(new: Factory<'_>) {
    let b = new();
    let big = OUT_OF_LINE_VALUE_MIN;
    let mut p = Pair::new(&b, config(1 << 20));
    let mut rng = Rng::new(7);
    for i in 0..40u64 {
        let version = version_of(1, i as u32 + 1);
        let writes: Vec<KeyWrite> = (0..1 + rng.below(3))
            .map(|_| {
                let key = rng.pick(KEYS).to_vec();
                let len = match rng.below(5) {
                    0 => big - 1,
                    1 => big,
                    2 => big + rng.below(3 * big as u64) as usize,
                    _ => rng.below(200) as usize,
                };
                let value = (!rng.chance(1, 6)).then(|| value_of(version, &key, len));
                (key, value)
            })
            .collect();
        p.append(version, stamp(i + 1), &writes);
        if i % 7 == 0 {
            p.check();
        }
    }
    p.check();
    p.reopen(&b, config(1 << 20));
    p.check();
    let (records, _) = p
        .log
        .read_records(None, version_of(1, 40), usize::MAX, 4096, None)
        .unwrap();
    assert_eq!(records.len(), 40);
    let mut copy = open(&new(), config(1 << 20));
    for r in &records {
        copy.append_payload(r.version, r.hlc, &r.payload).unwrap();
    }
    assert_matches(&copy, &p.reference, KEYS, PREFIXES);
}

conformance!(
    records_with_large_values_read_back_like_buffered_ones,
    records_read_in_pieces_and_appended_elsewhere_make_the_same_log,
    appends_are_read_back_at_every_version_and_time,
    a_version_or_stamp_that_does_not_increase_is_rejected_with_a_typed_error,
    version_at_finds_the_version_in_force_at_a_time,
    scan_pages_through_a_prefix_in_order_skipping_tombstones,
    a_scan_with_a_limit_of_zero_is_refused_rather_than_reported_complete,
    history_lists_every_change_of_a_key_with_its_stamp,
    a_delete_hides_the_key_from_then_on_and_a_later_put_revives_it,
    a_key_written_twice_in_one_delta_keeps_the_last_write,
    reopening_reads_the_same_with_and_without_a_checkpoint,
    automatic_checkpoints_are_written_every_n_versions,
    segments_roll_and_a_record_larger_than_a_segment_gets_its_own,
    trim_keeps_each_keys_state_at_the_horizon_and_refuses_older_reads,
    truncate_after_cuts_the_tail_and_appends_go_on_from_the_cut,
    engine_state_is_replaced_durably_and_kept_across_reopen_and_trim,
    fsync_commit_persists_every_appended_version,
    batch_commit_syncs_only_when_due,
    no_sync_policy_reports_written_versions_as_persisted,
);

// What "persisted" promises across a power cut, and what a failing disk does: these need the
// crashing backend.

fn crash(b: &CrashingBackend, seed: u64) -> Arc<dyn Backend> {
    Arc::new(b.crash(
        seed,
        CrashOptions {
            torn_writes: true,
            garbage: true,
        },
    ))
}

#[test]
fn crashing_each_policy_keeps_what_it_reported_persisted_across_a_power_cut() {
    for policy in [SyncPolicy::Fsync, SyncPolicy::BatchMs(10), SyncPolicy::None] {
        for seed in 0..10 {
            let cb = CrashingBackend::new();
            let b: Arc<dyn Backend> = Arc::new(cb.clone());
            let cfg = LogConfig {
                sync: policy,
                ..config(4096)
            };
            let mut p = Pair::new(&b, cfg.clone());
            let mut rng = Rng::new(seed);
            let mut durable = None;
            for now in 0..30 {
                let n = 1 + rng.below(3);
                p.fill(&mut rng, n, 300);
                let persisted = p.log.commit(now * 3).unwrap();
                if policy != SyncPolicy::None {
                    durable = persisted; // under `None` a commit promises nothing durable
                }
            }
            let after = crash(&cb, seed);
            let log = open(&after, cfg);
            assert!(
                log.latest().map(|l| l.0) >= durable,
                "{policy:?} seed {seed}: reported {durable:?}, recovered {:?}",
                log.latest()
            );
            let mut reference = p.reference.clone();
            if let Some((v, _)) = log.latest() {
                assert!(
                    reference.stamp_of(v).is_some(),
                    "a version that was appended"
                );
                reference.truncate_after(v);
            } else {
                reference = Reference::default();
            }
            assert_matches(&log, &reference, KEYS, PREFIXES);
        }
    }
}

#[test]
fn crashing_a_failed_write_poisons_the_log_and_reopening_recovers_a_consistent_prefix() {
    let mut poisoned_seen = 0;
    for fail_after in 0..120 {
        let cb = CrashingBackend::new();
        let b: Arc<dyn Backend> = Arc::new(cb.clone());
        let cfg = LogConfig {
            write_buffer_bytes: 300,
            checkpoint_every_versions: 7,
            ..config(4096)
        };
        let mut p = Pair::new(&b, cfg.clone());
        let mut rng = Rng::new(fail_after);
        let mut durable = None;
        let mut failed = None;
        cb.fail_after(Some(fail_after));
        for now in 0..60u64 {
            let (last, last_hlc) = p.reference.latest().unwrap_or((0, Hlc::ZERO));
            let writes = random_delta(&mut rng, last + 1, 300);
            let r = p.log.append(last + 1, last_hlc.tick(), &as_writes(&writes));
            match r {
                Ok(()) => p.reference.append(last + 1, last_hlc.tick(), &writes),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
            match p.log.commit(now) {
                Ok(persisted) => durable = persisted,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let Some(err) = failed else {
            panic!("fail_after {fail_after}: the injected failure never surfaced");
        };
        assert!(
            matches!(err, LogError::Io { .. }),
            "fail_after {fail_after}: the first failure is an I/O error: {err}"
        );
        // A failure to replace the checkpoint or the metadata, or to create a segment, leaves
        // the log's records as they were: it goes on once the disk does. Once a record write or
        // sync failed, the log takes no more writes.
        let harmless = matches!(&err, LogError::Io { what, .. }
            if what.contains("checkpoint") || what.contains("meta") || what.contains("creation"));
        let (last, last_hlc) = p.reference.latest().unwrap_or((0, Hlc::ZERO));
        let (v, h) = (last + 10, last_hlc.tick().tick());
        if harmless {
            cb.fail_after(None);
            p.log.append(v, h, &[Write::put(b"a", b"x")]).unwrap();
            p.reference.append(v, h, &[put(b"a", b"x")]);
            durable = p.log.commit(1000).unwrap();
            assert_eq!(durable, Some(v));
        } else {
            poisoned_seen += 1;
            let again = p.log.append(v, h, &[Write::put(b"a", b"x")]);
            assert!(
                matches!(again, Err(LogError::Poisoned)),
                "fail_after {fail_after}: after {err}: {again:?}"
            );
            cb.fail_after(None);
            assert!(matches!(p.log.sync(), Err(LogError::Poisoned)));
            assert!(matches!(p.log.commit(1000), Err(LogError::Poisoned)));
            assert!(matches!(p.log.trim(last), Err(LogError::Poisoned)));
            assert!(matches!(p.log.truncate_after(0), Err(LogError::Poisoned)));
        }
        // Reopening, on the same backend (a process restart) and after a power cut, recovers a
        // prefix that holds everything reported persisted.
        for (how, backend) in [
            ("restart", b.clone()),
            ("power cut", crash(&cb, fail_after)),
        ] {
            let log = Log::open(backend, cfg.clone())
                .unwrap_or_else(|e| panic!("fail_after {fail_after}, {how}: {e}"));
            let latest = log.latest().map(|l| l.0);
            assert!(
                latest >= durable,
                "fail_after {fail_after}, {how}: {latest:?} < {durable:?}"
            );
            let mut reference = p.reference.clone();
            match latest {
                Some(v) => {
                    assert!(reference.stamp_of(v).is_some(), "fail_after {fail_after}");
                    reference.truncate_after(v);
                }
                None => reference = Reference::default(),
            }
            assert_matches(&log, &reference, KEYS, PREFIXES);
        }
    }
    assert!(
        poisoned_seen > 30,
        "most failures poison the log: {poisoned_seen}"
    );
}

/// Regression: after a trim, reopening without a usable checkpoint (it was deleted, or
/// `truncate_after` had removed it, or the process died between trim's metadata switch and its
/// checkpoint) lost every version after the horizon. Recovery loads the base file first, so the
/// version table already ends at the horizon; the active segment still holds the records at and
/// below the horizon, and the "versions must increase" check ran before the check that skips
/// them, so the first such record was taken for garbage: the scan stopped there as if the tail
/// were torn, dropped the later segments, and the open failed or came back holding only the
/// horizon. Found by `trim_keeps_each_keys_state_at_the_horizon_and_refuses_older_reads`.
#[test]
fn regression_a_full_rescan_after_trim_stopped_at_the_first_record_below_the_horizon() {
    let b: Arc<dyn Backend> = Arc::new(derechofs_storage::backend::MemoryBackend::new());
    let mut p = Pair::new(&b, config(4096));
    for v in 1..=3 {
        p.append(v, stamp(v), &[put(b"a", &[v as u8])]);
    }
    p.log.trim(2).unwrap();
    p.reference.trim(2);
    b.remove(CHECKPOINT_FILE).unwrap();
    p.reopen(&b, config(4096));
    assert_eq!(p.log.recovery_report().torn, None);
    assert_eq!(p.log.latest(), Some((3, stamp(3))));
    p.check();
}

/// Regression: `scan` with `limit` 0 returned an empty page with no resume key, which is how a
/// finished scan looks, so a caller paging with a computed limit that reached 0 concluded that no
/// key had the prefix. The limit check ran before any key was looked at and took the resume key
/// from the (empty) page. A limit of 0 is now refused.
#[test]
fn regression_a_scan_with_limit_zero_looked_complete_and_empty() {
    let b: Arc<dyn Backend> = Arc::new(derechofs_storage::backend::MemoryBackend::new());
    let mut p = Pair::new(&b, config(4096));
    p.append(1, stamp(1), &[put(b"k", b"v")]);
    assert!(matches!(
        p.log.scan(b"k", 1, None, 0),
        Err(LogError::Invalid(_))
    ));
    assert_eq!(p.log.scan(b"k", 1, None, 1).unwrap().items.len(), 1);
}

/// Regression: `trim(before)` with `before` older than the current horizon returned `None`, as if
/// the log had no horizon, while `trim` at the horizon itself returned it. Nothing at or before
/// `before` is left in the version table once trimmed, and that case returned early without
/// looking at the horizon. Found by `trim_keeps_each_keys_state_at_the_horizon_and_refuses_older_reads`.
#[test]
fn regression_trim_before_the_horizon_reported_no_horizon() {
    let b: Arc<dyn Backend> = Arc::new(derechofs_storage::backend::MemoryBackend::new());
    let mut p = Pair::new(&b, config(4096));
    for v in 10..=12 {
        p.append(v, stamp(v), &[put(b"a", &[v as u8])]);
    }
    assert_eq!(
        p.log.trim(5).unwrap(),
        None,
        "no horizon yet, nothing to trim"
    );
    assert_eq!(p.log.trim(11).unwrap(), Some(11));
    assert_eq!(p.log.trim(5).unwrap(), Some(11));
    assert_eq!(p.log.horizon().map(|h| h.0), Some(11));
}

/// Regression: after a failed sync poisoned the log, calling `sync` (or `commit`) again went on
/// to sync the file a second time and, when that succeeded, reported every written version
/// persisted. On Linux a failed `fdatasync` may already have dropped the dirty pages it could not
/// write, so the second, successful one proves nothing. `sync` only refused when records were
/// still buffered, not when they had been written and the sync of them failed.
#[test]
fn regression_a_sync_retried_after_a_failed_sync_reported_the_records_persisted() {
    let cb = CrashingBackend::new();
    let b: Arc<dyn Backend> = Arc::new(cb.clone());
    let mut p = Pair::new(&b, config(4096));
    p.append(1, stamp(1), &[put(b"a", b"1")]);
    assert_eq!(p.log.commit(0).unwrap(), Some(1));
    p.append(2, stamp(2), &[put(b"a", b"2")]);
    cb.fail_after(Some(1)); // the write goes through, its sync fails
    assert!(matches!(p.log.commit(1), Err(LogError::Io { .. })));
    cb.fail_after(None);
    assert!(matches!(p.log.sync(), Err(LogError::Poisoned)));
    assert!(matches!(p.log.commit(2), Err(LogError::Poisoned)));
    assert!(matches!(p.log.checkpoint(), Err(LogError::Poisoned)));
    assert_eq!(p.log.persisted(), Some(1));
}

/// Regression (model seed 112): versions synced and reported persisted were lost at the second
/// power cut after a torn write. The first recovery cut the torn record off the tail of a segment
/// but left its bytes there; the next append was too large for the rest of the segment and rolled
/// to a new one, which was synced. The second recovery met the leftover bytes at the end of the
/// old segment, took them for a torn tail, and dropped every later segment. A roll syncs the
/// segment it leaves and chains the new segment's header from the last record, so recovery now
/// goes on into the next segment when its header chains from the point where the scan stopped.
#[test]
fn regression_leftover_torn_bytes_before_a_roll_dropped_the_later_segments() {
    let cb = CrashingBackend::new();
    let b: Arc<dyn Backend> = Arc::new(cb.clone());
    let cfg = config(4096);
    let mut p = Pair::new(&b, cfg.clone());
    p.append(1, stamp(1), &[put(b"a", b"1")]);
    p.log.sync().unwrap();
    // A record of 32 + 4 + 7 + 1 + 1 bytes after the 32-byte segment header: the log ends at 77.
    // What a torn write left after it:
    cb.corrupt("seg-00000001.log", 77, b"torn write leftovers")
        .unwrap();
    p.log = open(&b, cfg.clone());
    let torn = p.log.recovery_report().torn.clone();
    assert_eq!(
        torn.map(|t| (t.0, t.1)),
        Some(("seg-00000001.log".into(), 77))
    );
    // Too large for the rest of the segment: rolls to segment 2.
    p.append(2, stamp(2), &[put(b"b", &[7; 4050])]);
    p.append(3, stamp(3), &[put(b"c", b"3")]);
    assert_eq!(p.log.sync().unwrap(), Some(3));
    assert!(segment_files(&b).len() >= 2);
    let after = crash(&cb, 0);
    let log = open(&after, cfg);
    assert_eq!(
        log.latest(),
        Some((3, stamp(3))),
        "{:?}",
        log.recovery_report()
    );
    assert_matches(&log, &p.reference, KEYS, PREFIXES);
}

/// Recovery used to remove the segments after a corrupt record before it checked that the log
/// still held the persisted version, and only then failed: a corruption in the middle of the log
/// destroyed the later segments that an administrator could still have recovered by hand. The
/// failing open must leave every file in place.
#[test]
fn regression_a_failed_open_removed_the_segments_after_a_corrupt_record() {
    let cb = CrashingBackend::new();
    let b: Arc<dyn Backend> = Arc::new(cb.clone());
    let cfg = config(4096);
    let mut p = Pair::new(&b, cfg.clone());
    for v in 1..=40u64 {
        p.append(v, stamp(v), &[put(b"a", &[v as u8; 300])]);
    }
    p.log.checkpoint().unwrap();
    drop(p);
    let before = segment_files(&b);
    assert!(before.len() >= 3, "{before:?}");
    // Damage the first record of the first segment: everything after it is cut, below the
    // persisted version that the checkpoint recorded in the metadata.
    cb.corrupt("seg-00000001.log", 40, b"damage").unwrap();
    b.remove(CHECKPOINT_FILE).unwrap();
    match Log::open(b.clone(), cfg) {
        Err(LogError::Corrupt { .. }) => {}
        other => panic!("expected a corrupt log, got {other:?}"),
    }
    assert_eq!(segment_files(&b), before);
}

/// A sync taken out of the log covers exactly what was appended before it began: appends made
/// while it runs are not reported persisted by it, everything it covers survives a power cut,
/// and a failed one poisons the log.
#[test]
fn a_sync_run_outside_the_log_persists_exactly_what_it_covers() {
    let cb = CrashingBackend::new();
    let b: Arc<dyn Backend> = Arc::new(cb.clone());
    let cfg = LogConfig {
        sync: SyncPolicy::BatchMs(1_000_000),
        ..config(4096)
    };
    let mut log = open(&b, cfg.clone());
    for v in 1..=5u64 {
        log.append(v, stamp(v), &[Write::put(b"a", &[v as u8; 100])])
            .unwrap();
    }
    let pending = log.begin_sync().unwrap();
    assert_eq!(pending.covers(), Some(5));
    // Appends go on while the sync runs, including across a segment roll.
    for v in 6..=60u64 {
        log.append(v, stamp(v), &[Write::put(b"a", &[v as u8; 100])])
            .unwrap();
    }
    let outcome = pending.run();
    let persisted = log.finish_sync(pending, outcome).unwrap();
    assert!(
        persisted >= Some(5) && persisted <= Some(60),
        "{persisted:?}"
    );
    let recovered = open(&crash(&cb, 7), cfg.clone());
    let last = recovered.latest().map(|l| l.0);
    assert!(
        last >= persisted,
        "persisted {persisted:?}, recovered {last:?}"
    );

    // A failure poisons the log: nothing more is reported persisted.
    let pending = log.begin_sync().unwrap();
    let failed = log.finish_sync(pending, Err(std::io::Error::other("injected")));
    assert!(matches!(failed, Err(LogError::Io { .. })), "{failed:?}");
    assert!(matches!(log.begin_sync(), Err(LogError::Poisoned)));
    assert!(matches!(
        log.append(61, stamp(61), &[]),
        Err(LogError::Poisoned)
    ));
}
