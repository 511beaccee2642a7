//! `fallocate(2)` through a real FUSE mount of DerechoFS over in-process shards in memory: the
//! supported modes (0, `FALLOC_FL_KEEP_SIZE`, `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`)
//! change the file as on a local file system, checked byte by byte against the expected
//! contents after each call, across chunk boundaries (1 MiB chunks); every other mode is
//! EOPNOTSUPP. Needs root and `/dev/fuse`, as CI has.

mod support {
    pub mod memory_mount;
}

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};

use rustix::fs::{fallocate, FallocateFlags};
use rustix::io::Errno;
use support::memory_mount::MemoryMount;

const MIB: u64 = 1 << 20;

/// The whole file as read through the mount, and its size as `stat` gives it.
fn contents(path: &std::path::Path) -> (Vec<u8>, u64) {
    let mut back = Vec::new();
    File::open(path)
        .expect("open for reading")
        .read_to_end(&mut back)
        .expect("read");
    (back, std::fs::metadata(path).expect("stat").size())
}

fn same(path: &std::path::Path, want: &[u8], what: &str) {
    let (got, size) = contents(path);
    assert_eq!(size, want.len() as u64, "{what}: size");
    assert_eq!(got.len(), want.len(), "{what}: bytes read");
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: byte {i} is {} where {} was expected",
            got[i], want[i]
        );
    }
}

#[test]
fn fallocate_extends_keeps_the_size_and_punches_holes_like_a_local_file_system() {
    let m = MemoryMount::start();
    let path = m.path.join("f");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("create");
    let mut want: Vec<u8> = (0..(5 * MIB / 2)).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all(&want).expect("write");
    f.flush().expect("flush");
    same(&path, &want, "written");

    // KEEP_SIZE: nothing visible changes, even far past the end.
    fallocate(&f, FallocateFlags::KEEP_SIZE, 0, 10 * MIB).expect("keep size");
    same(&path, &want, "keep size");

    // Mode 0 inside the file: nothing changes; past its end: the file grows, with zeros.
    fallocate(&f, FallocateFlags::empty(), MIB, MIB).expect("allocate inside");
    same(&path, &want, "allocate inside");
    fallocate(&f, FallocateFlags::empty(), 2 * MIB, 3 * MIB).expect("allocate past the end");
    want.resize(5 * MIB as usize, 0);
    same(&path, &want, "allocate past the end");

    // Punch a hole across a whole chunk (1..2 MiB) and pieces of the chunks on either side.
    let (lo, hi) = (100_000u64, 2 * MIB + 200_000);
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        lo,
        hi - lo,
    )
    .expect("punch");
    want[lo as usize..hi as usize].fill(0);
    same(&path, &want, "punched");

    // A hole inside one chunk, and one reaching past the end (the size stays).
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        3 * MIB + 10,
        4096,
    )
    .expect("punch inside a chunk");
    want[(3 * MIB + 10) as usize..(3 * MIB + 10 + 4096) as usize].fill(0);
    fallocate(
        &f,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        2 * MIB + 300_000,
        8 * MIB,
    )
    .expect("punch past the end");
    want[(2 * MIB + 300_000) as usize..].fill(0);
    same(&path, &want, "punched to the end");

    // Writing into a punched chunk again: the new bytes, zeros around them.
    f.write_all_at(b"again", MIB + 5)
        .expect("write in the hole");
    want[(MIB + 5) as usize..(MIB + 10) as usize].copy_from_slice(b"again");
    same(&path, &want, "rewritten in the hole");

    // Other modes are not supported.
    for mode in [
        FallocateFlags::ZERO_RANGE,
        FallocateFlags::COLLAPSE_RANGE,
        FallocateFlags::INSERT_RANGE,
        FallocateFlags::PUNCH_HOLE,
    ] {
        assert_eq!(
            fallocate(&f, mode, 0, MIB),
            Err(Errno::OPNOTSUPP),
            "mode {mode:?}"
        );
    }
    same(&path, &want, "after the refused modes");
}
