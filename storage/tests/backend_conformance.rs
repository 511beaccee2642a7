//! The backend contract (`storage/src/backend/mod.rs`, "To ensure correctness"), checked clause by
//! clause against every backend: each suite function takes a factory of fresh backends and is run
//! for the file, memory and crashing backends. The crashing backend's own promises (what a crash
//! keeps, what it may drop, injected failures) follow.

#[macro_use]
mod common;

use std::io::ErrorKind;
use std::sync::Arc;

use common::{Backends, Kind, Rng};
use derechofs_storage::backend::{Backend, BackendFile, CrashOptions, CrashingBackend};

type Factory<'a> = &'a dyn Fn() -> Arc<dyn Backend>;

fn read(file: &dyn BackendFile, offset: u64, len: usize) -> Vec<u8> {
    file.read_at(offset, len)
        .unwrap_or_else(|e| panic!("read of {len} at {offset}: {e}"))
        .to_vec()
}

fn write_is_readable_before_any_sync(new: Factory<'_>) {
    let b = new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, b"hello").unwrap();
    f.write_at(5, b" world").unwrap();
    assert_eq!(read(&*f, 0, 11), b"hello world");
    assert_eq!(f.len().unwrap(), 11);
    // An overwrite in place is seen at once, through the same handle and through another one.
    f.write_at(1, b"EL").unwrap();
    assert_eq!(read(&*f, 0, 5), b"hELlo");
    let g = b.open("a.log", false).unwrap();
    assert_eq!(read(&*g, 0, 11), b"hELlo world");
    g.write_at(11, b"!").unwrap();
    assert_eq!(read(&*f, 6, 6), b"world!");
}

fn a_write_past_the_end_grows_the_file_with_zeros_in_between(new: Factory<'_>) {
    let b = new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, b"ab").unwrap();
    f.write_at(10, b"z").unwrap();
    assert_eq!(f.len().unwrap(), 11);
    assert_eq!(read(&*f, 0, 11), b"ab\0\0\0\0\0\0\0\0z");
}

fn a_read_past_the_end_fails_with_unexpected_eof(new: Factory<'_>) {
    let b = new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, &[7; 100]).unwrap();
    assert_eq!(read(&*f, 0, 100), vec![7; 100]);
    assert_eq!(read(&*f, 100, 0), b"");
    for (offset, len) in [
        (0, 101),
        (99, 2),
        (100, 1),
        (101, 0),
        (1000, 1),
        (u64::MAX, 1),
        (1, usize::MAX),
    ] {
        let err = f
            .read_at(offset, len)
            .expect_err("a read past the end must fail");
        assert_eq!(
            err.kind(),
            ErrorKind::UnexpectedEof,
            "read of {len} at {offset}"
        );
    }
    // Growing the file makes the same read succeed.
    f.allocate(200).unwrap();
    assert_eq!(read(&*f, 100, 100), vec![0; 100]);
}

fn allocate_only_grows_and_fills_with_zeros(new: Factory<'_>) {
    let b = new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, &[9; 64]).unwrap();
    f.allocate(4096).unwrap();
    assert_eq!(f.len().unwrap(), 4096);
    let all = read(&*f, 0, 4096);
    assert_eq!(&all[..64], &[9; 64]);
    assert!(all[64..].iter().all(|&x| x == 0), "new space is zeros");
    // A smaller allocation never shrinks the file nor touches its bytes.
    f.allocate(10).unwrap();
    f.allocate(0).unwrap();
    assert_eq!(f.len().unwrap(), 4096);
    assert_eq!(read(&*f, 0, 64), vec![9; 64]);
    // Writes inside the allocated space do not change the length.
    f.write_at(4000, b"xyz").unwrap();
    assert_eq!(f.len().unwrap(), 4096);
    assert_eq!(read(&*f, 3999, 5), b"\0xyz\0");
}

fn bytes_handed_out_stay_valid_while_the_file_grows(new: Factory<'_>) {
    let b = new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, b"stable").unwrap();
    let held = f.read_at(0, 6).unwrap();
    f.allocate(1 << 20).unwrap();
    f.write_at(1 << 19, b"far away").unwrap();
    f.write_at(6, b" and more").unwrap();
    assert_eq!(&held[..], b"stable");
    assert_eq!(read(&*f, 0, 15), b"stable and more");
    assert_eq!(read(&*f, 1 << 19, 8), b"far away");
}

fn open_without_create_of_a_missing_file_fails_with_not_found(new: Factory<'_>) {
    let b = new();
    let err = b.open("missing.log", false).expect_err("no such file");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(
        b.list().unwrap().is_empty(),
        "a failed open creates nothing"
    );
    // Creating is idempotent: a second open with `create` keeps the contents.
    let f = b.open("x.log", true).unwrap();
    f.write_at(0, b"kept").unwrap();
    let g = b.open("x.log", true).unwrap();
    assert_eq!(read(&*g, 0, 4), b"kept");
}

fn list_and_remove_see_exactly_the_files_present(new: Factory<'_>) {
    let b = new();
    let mut names = vec!["seg-00000001.log", "meta", "index.ckpt", "base-1.log"];
    for n in &names {
        b.open(n, true).unwrap().write_at(0, n.as_bytes()).unwrap();
    }
    let mut listed = b.list().unwrap();
    listed.sort();
    names.sort();
    assert_eq!(listed, names);
    b.remove("meta").unwrap();
    b.remove("meta").unwrap(); // removing a missing file is not an error
    b.remove("never-was").unwrap();
    let mut listed = b.list().unwrap();
    listed.sort();
    names.retain(|n| *n != "meta");
    assert_eq!(listed, names);
    assert_eq!(b.read_all("meta").unwrap(), None);
    assert!(b.open("meta", false).is_err());
    assert_eq!(
        b.read_all("index.ckpt").unwrap().as_deref(),
        Some(&b"index.ckpt"[..])
    );
}

fn replace_swaps_the_whole_file(new: Factory<'_>) {
    let b = new();
    assert_eq!(b.read_all("meta").unwrap(), None);
    b.replace("meta", b"first version, long").unwrap();
    assert_eq!(b.read_all("meta").unwrap().unwrap(), b"first version, long");
    b.replace("meta", b"second").unwrap();
    assert_eq!(b.read_all("meta").unwrap().unwrap(), b"second");
    b.replace("meta", b"").unwrap();
    assert_eq!(b.read_all("meta").unwrap().unwrap(), b"");
    // No temporary file is left behind under a name the log would read.
    let listed = b.list().unwrap();
    assert_eq!(
        listed.iter().filter(|n| !n.starts_with('.')).count(),
        1,
        "{listed:?}"
    );
    assert!(listed.contains(&"meta".to_owned()));
    // The replaced file opens with the new contents.
    let f = b.open("meta", false).unwrap();
    b.replace("meta", b"third").unwrap();
    let g = b.open("meta", false).unwrap();
    assert_eq!(read(&*g, 0, 5), b"third");
    drop(f);
}

fn bad_names_are_rejected_by_every_operation(new: Factory<'_>) {
    let b = new();
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "../escape",
        "/abs",
        "sp ace",
        "nul\0",
        "é",
    ] {
        let kind = |r: std::io::Result<()>| r.expect_err(bad).kind();
        assert_eq!(
            kind(b.open(bad, true).map(drop)),
            ErrorKind::InvalidInput,
            "open {bad:?}"
        );
        assert_eq!(
            kind(b.remove(bad)),
            ErrorKind::InvalidInput,
            "remove {bad:?}"
        );
        assert_eq!(
            kind(b.read_all(bad).map(drop)),
            ErrorKind::InvalidInput,
            "read_all {bad:?}"
        );
        assert_eq!(
            kind(b.replace(bad, b"x")),
            ErrorKind::InvalidInput,
            "replace {bad:?}"
        );
    }
    assert!(b.list().unwrap().is_empty(), "nothing was created");
}

fn random_writes_read_back_like_a_byte_array(new: Factory<'_>) {
    // A small model check: random writes, allocations and reads against a Vec<u8>.
    for seed in 0..20 {
        let mut rng = Rng::new(seed);
        let b = new();
        let f = b.open("r.log", true).unwrap();
        let mut model: Vec<u8> = Vec::new();
        for _ in 0..200 {
            match rng.below(4) {
                0 => {
                    let len = rng.below(9000) as usize;
                    f.allocate(len as u64).unwrap();
                    if model.len() < len {
                        model.resize(len, 0);
                    }
                }
                1 | 2 => {
                    let at = rng.below(model.len() as u64 + 100) as usize;
                    let len = rng.below(300) as usize;
                    let data = rng.bytes(len);
                    f.write_at(at as u64, &data).unwrap();
                    if model.len() < at + data.len() {
                        model.resize(at + data.len(), 0);
                    }
                    model[at..at + data.len()].copy_from_slice(&data);
                }
                _ => {
                    let at = rng.below(model.len() as u64 + 10) as usize;
                    let len = rng.below(400) as usize;
                    match f.read_at(at as u64, len) {
                        Ok(got) => assert_eq!(&got[..], &model[at..at + len], "seed {seed}"),
                        Err(e) => {
                            assert!(at + len > model.len(), "seed {seed}: {e}");
                            assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
                        }
                    }
                }
            }
            assert_eq!(f.len().unwrap(), model.len() as u64, "seed {seed}");
        }
        f.sync_data().unwrap();
        assert_eq!(read(&*f, 0, model.len()), model, "seed {seed}");
    }
}

conformance!(
    write_is_readable_before_any_sync,
    a_write_past_the_end_grows_the_file_with_zeros_in_between,
    a_read_past_the_end_fails_with_unexpected_eof,
    allocate_only_grows_and_fills_with_zeros,
    bytes_handed_out_stay_valid_while_the_file_grows,
    open_without_create_of_a_missing_file_fails_with_not_found,
    list_and_remove_see_exactly_the_files_present,
    replace_swaps_the_whole_file,
    bad_names_are_rejected_by_every_operation,
    random_writes_read_back_like_a_byte_array,
);

// The crashing backend's promises about crashes and failures.

fn contents(b: &CrashingBackend, name: &str) -> Option<Vec<u8>> {
    b.read_all(name).unwrap()
}

#[test]
fn crashing_synced_bytes_survive_a_crash_whatever_the_options() {
    for seed in 0..50 {
        let b = CrashingBackend::new();
        let f = b.open("a.log", true).unwrap();
        f.allocate(64).unwrap();
        f.write_at(0, b"durable").unwrap();
        f.sync_data().unwrap();
        f.write_at(7, b" and then some").unwrap();
        f.write_at(0, b"DURABLE").unwrap();
        f.allocate(128).unwrap();
        for options in [
            CrashOptions::default(),
            CrashOptions {
                torn_writes: true,
                garbage: false,
            },
        ] {
            let after = b.crash(seed, options);
            let got = contents(&after, "a.log").expect("a synced file exists after a crash");
            assert!(
                got.len() >= 64,
                "seed {seed}: the synced allocation survives"
            );
            let head = &got[..7];
            // Each byte is the synced one or the one of the unsynced overwrite (a torn overwrite
            // mixes both).
            for (i, &x) in head.iter().enumerate() {
                assert!(
                    x == b"durable"[i] || x == b"DURABLE"[i],
                    "seed {seed}: {head:?}"
                );
            }
            if !options.torn_writes {
                assert_eq!(head, b"durable", "seed {seed}: unsynced overwrite dropped");
                assert_eq!(got.len(), 64, "seed {seed}: unsynced allocation dropped");
                assert!(got[7..].iter().all(|&x| x == 0), "seed {seed}");
            }
        }
        // The crash leaves the original backend as it was.
        assert_eq!(&contents(&b, "a.log").unwrap()[..7], b"DURABLE");
    }
}

#[test]
fn crashing_unsynced_writes_and_files_are_lost_without_torn_writes() {
    let b = CrashingBackend::new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, b"never synced").unwrap();
    let g = b.open("b.log", true).unwrap();
    g.write_at(0, b"synced").unwrap();
    g.sync_data().unwrap();
    g.write_at(6, b" tail").unwrap();
    let after = b.crash(1, CrashOptions::default());
    assert_eq!(
        contents(&after, "a.log"),
        None,
        "a never-synced file is gone"
    );
    assert_eq!(contents(&after, "b.log").unwrap(), b"synced");
    assert_eq!(after.list().unwrap(), vec!["b.log".to_owned()]);
}

#[test]
fn crashing_torn_writes_keep_a_prefix_of_the_unsynced_writes() {
    // Sequential appends after a sync: whatever survives is the synced part followed by a prefix
    // of the appended bytes (without garbage). Over many seeds, every outcome from "nothing" to
    // "everything" shows up, including cuts inside a write.
    let (mut none, mut all, mut inside) = (false, false, false);
    for seed in 0..200 {
        let b = CrashingBackend::new();
        let f = b.open("a.log", true).unwrap();
        f.write_at(0, b"base").unwrap();
        f.sync_data().unwrap();
        let mut appended = Vec::new();
        for i in 0..4u8 {
            let piece = vec![b'a' + i; 10];
            f.write_at(4 + appended.len() as u64, &piece).unwrap();
            appended.extend_from_slice(&piece);
        }
        let after = b.crash(
            seed,
            CrashOptions {
                torn_writes: true,
                garbage: false,
            },
        );
        let got = contents(&after, "a.log").unwrap();
        assert_eq!(&got[..4], b"base", "seed {seed}");
        let kept = &got[4..];
        assert_eq!(kept, &appended[..kept.len()], "seed {seed}: a prefix");
        none |= kept.is_empty();
        all |= kept.len() == appended.len();
        inside |= kept.len() % 10 != 0;
    }
    assert!(none && all && inside, "torn crashes cover every outcome");
}

#[test]
fn crashing_garbage_only_touches_the_torn_write() {
    for seed in 0..200 {
        let b = CrashingBackend::new();
        let f = b.open("a.log", true).unwrap();
        f.write_at(0, &[1; 32]).unwrap();
        f.sync_data().unwrap();
        f.write_at(32, &[2; 32]).unwrap();
        f.write_at(64, &[3; 32]).unwrap();
        let after = b.crash(
            seed,
            CrashOptions {
                torn_writes: true,
                garbage: true,
            },
        );
        let got = contents(&after, "a.log").unwrap();
        assert_eq!(&got[..32], &[1; 32], "seed {seed}: synced bytes untouched");
        assert!(got.len() <= 96, "seed {seed}");
    }
}

#[test]
fn crashing_replace_is_durable_at_once_and_atomic() {
    let b = CrashingBackend::new();
    b.replace("meta", b"one").unwrap();
    b.replace("meta", b"two").unwrap();
    for seed in 0..20 {
        let after = b.crash(
            seed,
            CrashOptions {
                torn_writes: true,
                garbage: true,
            },
        );
        assert_eq!(contents(&after, "meta").unwrap(), b"two", "seed {seed}");
    }
    // A replace that fails leaves the old contents.
    b.fail_after(Some(0));
    assert!(b.replace("meta", b"three").is_err());
    b.fail_after(None);
    assert_eq!(contents(&b, "meta").unwrap(), b"two");
    assert_eq!(
        contents(&b.crash(0, CrashOptions::default()), "meta").unwrap(),
        b"two"
    );
}

#[test]
fn crashing_fail_after_fails_every_mutating_operation_once_used_up() {
    let b = CrashingBackend::new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, b"ok").unwrap();
    b.fail_after(Some(2));
    f.write_at(2, b"1").unwrap();
    f.sync_data().unwrap();
    let before = contents(&b, "a.log").unwrap();
    let checks: Vec<(&str, std::io::Result<()>)> = vec![
        ("write", f.write_at(0, b"no")),
        ("allocate", f.allocate(1000)),
        ("sync", f.sync_data()),
        ("replace", b.replace("meta", b"x")),
        ("remove", b.remove("a.log")),
        ("create", b.open("new.log", true).map(drop)),
    ];
    for (what, r) in checks {
        assert!(r.is_err(), "{what} after the countdown must fail");
    }
    // A failed operation changes nothing, and reads keep working.
    assert_eq!(contents(&b, "a.log").unwrap(), before);
    assert_eq!(read(&*f, 0, 3), b"ok1");
    assert!(b.list().unwrap().contains(&"a.log".to_owned()));
    assert!(
        b.open("a.log", false).is_ok(),
        "opening an existing file is a read"
    );
    // Turning failures off makes the backend usable again.
    b.fail_after(None);
    f.write_at(0, b"OK").unwrap();
    f.sync_data().unwrap();
    assert_eq!(
        contents(&b.crash(0, CrashOptions::default()), "a.log").unwrap(),
        b"OK1"
    );
}

#[test]
fn crashing_corrupt_changes_both_the_current_and_the_durable_bytes() {
    let b = CrashingBackend::new();
    let f = b.open("a.log", true).unwrap();
    f.write_at(0, b"abcdef").unwrap();
    f.sync_data().unwrap();
    b.corrupt("a.log", 2, b"XY").unwrap();
    assert_eq!(read(&*f, 0, 6), b"abXYef");
    assert_eq!(
        contents(&b.crash(0, CrashOptions::default()), "a.log").unwrap(),
        b"abXYef"
    );
    assert!(b.corrupt("missing", 0, b"x").is_err());
}

/// Regression: the file backend answered a zero-length read that starts past the end of the file
/// with empty bytes, while the memory and crashing backends (and the contract) fail it with
/// `UnexpectedEof`. It returned early for `len == 0` before looking at the file's length, so code
/// tested on the memory backend could behave differently on disk. Found by the conformance case
/// `a_read_past_the_end_fails_with_unexpected_eof`.
#[test]
fn regression_file_backend_zero_length_read_past_the_end_succeeded() {
    let b = Backends::new(Kind::File);
    let f = b.fresh().open("a.log", true).unwrap();
    f.write_at(0, b"four").unwrap();
    assert!(f.read_at(4, 0).unwrap().is_empty(), "at the end is fine");
    let err = f.read_at(5, 0).expect_err("past the end");
    assert_eq!(err.kind(), ErrorKind::UnexpectedEof);
}
