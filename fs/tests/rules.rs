//! One test per POSIX rule the state machines decide: each errno, link counts, times, and the
//! rules of snapshot names. Through the facade over in-process shards on real logs.

use std::sync::atomic::AtomicU64;

use derechofs_fs::chunk::TRUNCATE_DELETES_MAX;
use derechofs_fs::inode::{FILE_SIZE_MAX, SYMLINK_LEN_MAX};
use derechofs_fs::key;
use derechofs_fs::snapshot::is_snapshot;
use derechofs_fs::{
    Attr, Clock, Creds, Fallocate, FileKind, FileSystem, FsConfig, FsError, Ino, LocalShards,
    SetAttr, SetTime, ShardRef, Shards, Timespec, HISTORY_XATTR, RENAME_EXCHANGE, RENAME_NOREPLACE,
    ROOT_INO, XATTR_CREATE, XATTR_REPLACE,
};
use derechofs_storage::Version;

const ME: Creds = Creds {
    uid: 1000,
    gid: 100,
};
const T0: u64 = 1_800_000_000_000_000;

fn fs() -> FileSystem<LocalShards> {
    let shards = LocalShards::new(3, 4096, Clock::Manual(AtomicU64::new(T0))).unwrap();
    let config = FsConfig {
        client_base: 7 << 32,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    FileSystem::new(shards, config).unwrap()
}

fn errno<T: std::fmt::Debug>(r: Result<T, FsError>) -> i32 {
    r.expect_err("the operation should fail").errno
}

fn file<S: Shards>(fs: &FileSystem<S>, parent: Ino, name: &str) -> Attr {
    fs.create(parent, name.as_bytes(), 0o644, ME).unwrap()
}

fn dir<S: Shards>(fs: &FileSystem<S>, parent: Ino, name: &str) -> Attr {
    fs.mkdir(parent, name.as_bytes(), 0o755, ME).unwrap()
}

fn at(us: u64) -> Timespec {
    Timespec::from_us(us)
}

#[test]
fn create_fails_with_enoent_enotdir_eexist_enametoolong_einval() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    assert_eq!(errno(fs.create(999, b"x", 0o644, ME)), libc::ENOENT);
    assert_eq!(errno(fs.create(f.ino, b"x", 0o644, ME)), libc::ENOTDIR);
    assert_eq!(errno(fs.create(ROOT_INO, b"f", 0o644, ME)), libc::EEXIST);
    assert_eq!(errno(fs.mkdir(ROOT_INO, b"f", 0o755, ME)), libc::EEXIST);
    assert_eq!(
        errno(fs.create(ROOT_INO, &[b'n'; 256], 0o644, ME)),
        libc::ENAMETOOLONG
    );
    for bad in [&b""[..], b".", b"..", b"a/b"] {
        assert_eq!(
            errno(fs.create(ROOT_INO, bad, 0o644, ME)),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    assert!(fs.create(ROOT_INO, &[b'n'; 255], 0o644, ME).is_ok());
}

#[test]
fn creating_in_a_removed_directory_is_enoent() {
    let fs = fs();
    let d = dir(&fs, ROOT_INO, "d");
    fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(errno(fs.create(d.ino, b"x", 0o644, ME)), libc::ENOENT);
}

#[test]
fn inode_numbers_are_allocated_in_order_and_never_reused() {
    let fs = fs();
    let a = file(&fs, ROOT_INO, "a");
    fs.unlink(ROOT_INO, b"a").unwrap();
    let b = file(&fs, ROOT_INO, "a");
    assert_eq!(a.ino, 2);
    assert_eq!(b.ino, 3);
    assert_eq!(fs.statfs().unwrap().inodes, 3);
}

#[test]
fn mkdir_and_rmdir_count_the_parents_links() {
    let fs = fs();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 2);
    let d = dir(&fs, ROOT_INO, "d");
    assert_eq!(d.nlink, 2);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
    dir(&fs, d.ino, "e");
    assert_eq!(fs.getattr(d.ino).unwrap().nlink, 3);
    assert_eq!(errno(fs.rmdir(ROOT_INO, b"d")), libc::ENOTEMPTY);
    fs.rmdir(d.ino, b"e").unwrap();
    fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 2);
    assert_eq!(fs.getattr(d.ino).unwrap().nlink, 0);
}

#[test]
fn rmdir_fails_with_enotdir_enoent_einval_enotempty() {
    let fs = fs();
    file(&fs, ROOT_INO, "f");
    assert_eq!(errno(fs.rmdir(ROOT_INO, b"f")), libc::ENOTDIR);
    assert_eq!(errno(fs.rmdir(ROOT_INO, b"nothing")), libc::ENOENT);
    assert_eq!(errno(fs.rmdir(ROOT_INO, b".")), libc::EINVAL);
    assert_eq!(errno(fs.rmdir(ROOT_INO, b"..")), libc::ENOTEMPTY);
}

#[test]
fn unlink_of_a_directory_is_eisdir_and_of_nothing_enoent() {
    let fs = fs();
    dir(&fs, ROOT_INO, "d");
    assert_eq!(errno(fs.unlink(ROOT_INO, b"d")), libc::EISDIR);
    assert_eq!(errno(fs.unlink(ROOT_INO, b"x")), libc::ENOENT);
}

#[test]
fn an_unlinked_file_keeps_working_by_its_inode_number() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    fs.write(f.ino, 0, b"still here").unwrap();
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(errno(fs.lookup(ROOT_INO, b"f")), libc::ENOENT);
    assert_eq!(fs.getattr(f.ino).unwrap().nlink, 0);
    fs.write(f.ino, 10, b"!").unwrap();
    assert_eq!(&fs.read(f.ino, 0, 100).unwrap()[..], b"still here!");
    assert_eq!(errno(fs.link(f.ino, ROOT_INO, b"again")), libc::ENOENT);
}

#[test]
fn link_counts_names_and_refuses_directories_and_existing_names() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    let d = dir(&fs, ROOT_INO, "d");
    assert_eq!(fs.link(f.ino, d.ino, b"g").unwrap().nlink, 2);
    assert_eq!(errno(fs.link(d.ino, ROOT_INO, b"dd")), libc::EPERM);
    assert_eq!(errno(fs.link(f.ino, ROOT_INO, b"d")), libc::EEXIST);
    assert_eq!(errno(fs.link(999, ROOT_INO, b"x")), libc::ENOENT);
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(fs.lookup(d.ino, b"g").unwrap().nlink, 1);
}

#[test]
fn rename_replaces_an_empty_directory_and_keeps_link_counts() {
    let fs = fs();
    let a = dir(&fs, ROOT_INO, "a");
    let b = dir(&fs, ROOT_INO, "b");
    let sub = dir(&fs, a.ino, "sub");
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 4);
    // Move sub from a into b under the name "x", then replace the empty b by a.
    fs.rename(a.ino, b"sub", b.ino, b"x", 0).unwrap();
    assert_eq!(fs.getattr(a.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 3);
    assert_eq!(fs.lookup(b.ino, b"..").unwrap().ino, ROOT_INO);
    assert_eq!(fs.lookup(sub.ino, b"..").unwrap().ino, b.ino);
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0)),
        libc::ENOTEMPTY
    );
    fs.rmdir(b.ino, b"x").unwrap();
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", 0).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"b").unwrap().ino, a.ino);
    assert_eq!(fs.getattr(b.ino).unwrap().nlink, 0);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
}

#[test]
fn rename_fails_with_enotdir_eisdir_einval_eexist_enoent() {
    let fs = fs();
    let d = dir(&fs, ROOT_INO, "d");
    let e = dir(&fs, d.ino, "e");
    file(&fs, ROOT_INO, "f");
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"d", ROOT_INO, b"f", 0)),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"f", ROOT_INO, b"d", 0)),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"d", e.ino, b"x", 0)),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"d", d.ino, b"x", 0)),
        libc::EINVAL
    );
    let noreplace = fs.rename(ROOT_INO, b"f", d.ino, b"e", RENAME_NOREPLACE);
    assert_eq!(errno(noreplace), libc::EEXIST);
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"nothing", ROOT_INO, b"y", 0)),
        libc::ENOENT
    );
    let both = RENAME_NOREPLACE | RENAME_EXCHANGE;
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"f", ROOT_INO, b"y", both)),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs.rename(ROOT_INO, b"f", ROOT_INO, b"y", 4)),
        libc::EINVAL
    );
    let exchange = fs.rename(ROOT_INO, b"f", ROOT_INO, b"y", RENAME_EXCHANGE);
    assert_eq!(errno(exchange), libc::ENOENT);
}

#[test]
fn rename_exchange_swaps_a_file_and_a_directory_across_parents() {
    let fs = fs();
    let p = dir(&fs, ROOT_INO, "p");
    let q = dir(&fs, ROOT_INO, "q");
    let f = file(&fs, p.ino, "f");
    let d = dir(&fs, q.ino, "d");
    fs.rename(p.ino, b"f", q.ino, b"d", RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(fs.lookup(p.ino, b"f").unwrap().ino, d.ino);
    assert_eq!(fs.lookup(q.ino, b"d").unwrap().ino, f.ino);
    assert_eq!(fs.getattr(p.ino).unwrap().nlink, 3);
    assert_eq!(fs.getattr(q.ino).unwrap().nlink, 2);
    assert_eq!(fs.lookup(d.ino, b"..").unwrap().ino, p.ino);
    // A directory cannot be exchanged with something below it.
    let inner = dir(&fs, d.ino, "inner");
    let swap = fs.rename(p.ino, b"f", inner.ino, b"x", RENAME_EXCHANGE);
    assert_eq!(errno(swap), libc::ENOENT);
    file(&fs, inner.ino, "x");
    let swap = fs.rename(p.ino, b"f", inner.ino, b"x", RENAME_EXCHANGE);
    assert_eq!(errno(swap), libc::EINVAL);
}

#[test]
fn rename_onto_another_name_of_the_same_file_does_nothing() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    fs.link(f.ino, ROOT_INO, b"g").unwrap();
    fs.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"f").unwrap().ino, f.ino);
    assert_eq!(fs.getattr(f.ino).unwrap().nlink, 2);
}

#[test]
fn symlinks_need_a_target_of_at_most_4095_bytes_and_readlink_needs_a_symlink() {
    let fs = fs();
    let l = fs.symlink(ROOT_INO, b"l", b"target/path", ME).unwrap();
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(l.size, 11);
    assert_eq!(&fs.readlink(l.ino).unwrap()[..], b"target/path");
    assert_eq!(errno(fs.symlink(ROOT_INO, b"e", b"", ME)), libc::ENOENT);
    let long = vec![b'x'; SYMLINK_LEN_MAX + 1];
    assert_eq!(
        errno(fs.symlink(ROOT_INO, b"e", &long, ME)),
        libc::ENAMETOOLONG
    );
    assert_eq!(errno(fs.readlink(ROOT_INO)), libc::EINVAL);
}

#[test]
fn mknod_makes_fifos_sockets_and_devices_with_their_rdev() {
    let fs = fs();
    for (name, kind) in [("p", FileKind::Fifo), ("s", FileKind::Socket)] {
        let a = fs
            .mknod(ROOT_INO, name.as_bytes(), kind, 0o600, 77, ME)
            .unwrap();
        assert_eq!((a.kind, a.rdev), (kind, 0));
    }
    let c = fs
        .mknod(ROOT_INO, b"c", FileKind::CharDevice, 0o600, 0x0103, ME)
        .unwrap();
    assert_eq!(fs.getattr(c.ino).unwrap().rdev, 0x0103);
    let d = fs.mknod(ROOT_INO, b"d", FileKind::Directory, 0o600, 0, ME);
    assert_eq!(errno(d), libc::EINVAL);
}

#[test]
fn setattr_size_fails_on_directories_special_files_and_past_the_largest_file() {
    let fs = fs();
    let d = dir(&fs, ROOT_INO, "d");
    let p = fs
        .mknod(ROOT_INO, b"p", FileKind::Fifo, 0o600, 0, ME)
        .unwrap();
    let f = file(&fs, ROOT_INO, "f");
    let size = |s| SetAttr {
        size: Some(s),
        ..SetAttr::default()
    };
    assert_eq!(errno(fs.setattr(d.ino, size(0))), libc::EISDIR);
    assert_eq!(errno(fs.setattr(p.ino, size(0))), libc::EINVAL);
    assert_eq!(
        errno(fs.setattr(f.ino, size(FILE_SIZE_MAX + 1))),
        libc::EFBIG
    );
    assert_eq!(errno(fs.setattr(999, size(0))), libc::ENOENT);
    assert_eq!(errno(fs.write(f.ino, FILE_SIZE_MAX, b"x")), libc::EFBIG);
}

#[test]
fn times_are_the_stamps_of_the_operations_and_follow_the_ctime_rules() {
    let fs = fs();
    let clock = |us| fs.shards().set_now_us(us);
    clock(T0 + 10);
    let f = file(&fs, ROOT_INO, "f");
    assert_eq!(
        (f.mtime, f.ctime, f.atime, f.crtime),
        (at(T0 + 10), at(T0 + 10), at(T0 + 10), at(T0 + 10))
    );
    assert_eq!(
        fs.getattr(ROOT_INO).unwrap().mtime,
        at(T0 + 10),
        "creating changes the parent"
    );
    clock(T0 + 20);
    let w = fs.write(f.ino, 0, b"abc").unwrap();
    assert_eq!((w.mtime, w.ctime), (at(T0 + 20), at(T0 + 20)));
    clock(T0 + 30);
    let chmod = SetAttr {
        perm: Some(0o600),
        ..SetAttr::default()
    };
    let c = fs.setattr(f.ino, chmod).unwrap();
    assert_eq!(
        (c.mtime, c.ctime, c.perm),
        (at(T0 + 20), at(T0 + 30), 0o600),
        "chmod: ctime only"
    );
    clock(T0 + 40);
    let trunc = SetAttr {
        size: Some(1),
        ..SetAttr::default()
    };
    let t = fs.setattr(f.ino, trunc).unwrap();
    assert_eq!((t.mtime, t.ctime, t.size), (at(T0 + 40), at(T0 + 40), 1));
    clock(T0 + 50);
    let explicit = Timespec {
        secs: -5,
        nanos: 999_999_999,
    };
    let times = SetAttr {
        atime: Some(SetTime::At(explicit)),
        mtime: Some(SetTime::Now),
        ..SetAttr::default()
    };
    let u = fs.setattr(f.ino, times).unwrap();
    assert_eq!(
        (u.atime, u.mtime, u.ctime),
        (explicit, at(T0 + 50), at(T0 + 50))
    );
    clock(T0 + 60);
    assert_eq!(
        fs.setattr(f.ino, SetAttr::default()).unwrap().ctime,
        at(T0 + 50),
        "nothing set, nothing changes"
    );
    fs.link(f.ino, ROOT_INO, b"g").unwrap();
    assert_eq!(
        fs.getattr(f.ino).unwrap().ctime,
        at(T0 + 60),
        "a new link changes ctime"
    );
    clock(T0 + 70);
    fs.rename(ROOT_INO, b"g", ROOT_INO, b"h", 0).unwrap();
    assert_eq!(
        fs.getattr(f.ino).unwrap().ctime,
        at(T0 + 70),
        "rename changes ctime"
    );
    assert_eq!(fs.getattr(ROOT_INO).unwrap().mtime, at(T0 + 70));
}

#[test]
fn a_set_group_id_directory_passes_its_group_and_the_bit_on() {
    let fs = fs();
    let d = fs
        .mkdir(ROOT_INO, b"d", 0o2775, Creds { uid: 1, gid: 50 })
        .unwrap();
    let f = fs.create(d.ino, b"f", 0o644, ME).unwrap();
    let e = fs.mkdir(d.ino, b"e", 0o755, ME).unwrap();
    assert_eq!((f.gid, f.perm), (50, 0o644));
    assert_eq!((e.gid, e.perm), (50, 0o2755));
    let plain = fs.create(ROOT_INO, b"p", 0o644, ME).unwrap();
    assert_eq!(plain.gid, ME.gid);
}

#[test]
fn xattrs_follow_the_create_and_replace_flags_and_report_enodata() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    let i = f.ino;
    assert_eq!(errno(fs.getxattr(i, b"user.a")), libc::ENODATA);
    assert_eq!(
        errno(fs.setxattr(i, b"user.a", b"1", XATTR_REPLACE)),
        libc::ENODATA
    );
    fs.setxattr(i, b"user.a", b"1", XATTR_CREATE).unwrap();
    assert_eq!(
        errno(fs.setxattr(i, b"user.a", b"2", XATTR_CREATE)),
        libc::EEXIST
    );
    fs.setxattr(i, b"user.a", b"2", XATTR_REPLACE).unwrap();
    fs.setxattr(i, b"trusted.b", b"", 0).unwrap();
    assert_eq!(&fs.getxattr(i, b"user.a").unwrap()[..], b"2");
    let names = fs.listxattr(i).unwrap();
    assert_eq!(names, vec![&b"trusted.b"[..], &b"user.a"[..]]);
    fs.removexattr(i, b"user.a").unwrap();
    assert_eq!(errno(fs.removexattr(i, b"user.a")), libc::ENODATA);
    assert_eq!(errno(fs.setxattr(i, b"other.x", b"", 0)), libc::ENOTSUP);
    assert_eq!(errno(fs.setxattr(i, b"", b"", 0)), libc::ERANGE);
    assert_eq!(errno(fs.setxattr(i, &[b'u'; 256], b"", 0)), libc::ERANGE);
    assert_eq!(
        errno(fs.setxattr(i, b"user.big", &vec![0; 65_537], 0)),
        libc::E2BIG
    );
    assert_eq!(errno(fs.setxattr(i, HISTORY_XATTR, b"", 0)), libc::EPERM);
    assert_eq!(errno(fs.setxattr(i, b"user.a", b"", 3)), libc::EINVAL);
    assert_eq!(errno(fs.setxattr(999, b"user.a", b"", 0)), libc::ENOENT);
}

#[test]
fn files_past_4_gib_are_sparse_and_read_zeros_in_their_holes() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "big");
    let off = (5u64 << 30) + 4000;
    fs.write(f.ino, off, b"far away").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, off + 8);
    assert_eq!(
        &fs.read(f.ino, off - 4, 20).unwrap()[..],
        b"\0\0\0\0far away"
    );
    assert!(fs
        .read(f.ino, 1 << 32, 8192)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn truncating_down_then_up_reads_zeros_where_data_was() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    fs.write(f.ino, 0, &[7u8; 20_000]).unwrap();
    let size = |s| SetAttr {
        size: Some(s),
        ..SetAttr::default()
    };
    fs.setattr(f.ino, size(5000)).unwrap();
    fs.setattr(f.ino, size(20_000)).unwrap();
    let back = fs.read(f.ino, 0, 20_000).unwrap();
    assert!(back[..5000].iter().all(|&b| b == 7));
    assert!(back[5000..].iter().all(|&b| b == 0));
    fs.write(f.ino, 30_000, b"x").unwrap();
    assert!(fs
        .read(f.ino, 20_000, 10_000)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn punching_or_truncating_a_file_of_more_chunks_than_one_request_may_remove_removes_them_all() {
    // 3 data shards of 4 KiB chunks: more than TRUNCATE_DELETES_MAX chunks on at least one of
    // them, so its truncation takes several requests.
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    let chunks = 3 * TRUNCATE_DELETES_MAX as u64 + 300;
    for i in 0..chunks {
        fs.write(f.ino, i * 4096 + 4000, &[9u8; 10]).unwrap();
    }
    fs.flush(f.ino).unwrap();
    let states = || -> usize {
        (0..3)
            .map(|d| {
                fs.shards()
                    .with_log(ShardRef::Data(d), |log| {
                        log.scan(&key::chunks(f.ino), Version::MAX, None, 1 << 20)
                            .unwrap()
                            .items
                            .len()
                    })
                    .unwrap()
            })
            .sum()
    };
    // A hole over all but the first and last chunks drops them all, in several requests.
    fs.fallocate(
        f.ino,
        Fallocate::PunchHole,
        4096 + 4000,
        (chunks - 2) * 4096,
    )
    .unwrap();
    assert_eq!(
        states(),
        3,
        "the first chunk, the last, and the one partly punched"
    );
    assert_eq!(fs.read(f.ino, 4000, 10).unwrap().as_ref(), &[9u8; 10]);
    assert_eq!(
        fs.read(f.ino, 4096 + 4000, 10).unwrap().as_ref(),
        &[0u8; 10]
    );
    assert_eq!(
        fs.read(f.ino, 7 * 4096 + 4000, 10).unwrap().as_ref(),
        &[0u8; 10]
    );
    let last = (chunks - 1) * 4096 + 4000;
    assert_eq!(fs.read(f.ino, last, 10).unwrap().as_ref(), &[9u8; 10]);
    let size = |s| SetAttr {
        size: Some(s),
        ..SetAttr::default()
    };
    fs.setattr(f.ino, size(4002)).unwrap();
    assert_eq!(states(), 1, "only the chunk holding the new end is left");
    fs.setattr(f.ino, size(chunks * 4096)).unwrap();
    let back = fs.read(f.ino, 0, 8192).unwrap();
    assert!(back[..4000].iter().all(|&b| b == 0));
    assert_eq!(&back[4000..4002], &[9, 9]);
    assert!(back[4002..].iter().all(|&b| b == 0));
    let last = fs.read(f.ino, (chunks - 1) * 4096, 4096).unwrap();
    assert!(last.iter().all(|&b| b == 0), "no cut chunk comes back");
}

#[test]
fn fallocate_sets_mtime_and_ctime_only_when_it_changes_the_file() {
    let fs = fs();
    fs.shards().set_now_us(T0 + 1_000);
    let f = file(&fs, ROOT_INO, "f");
    fs.write(f.ino, 0, &[5u8; 10_000]).unwrap();
    let before = fs.getattr(f.ino).unwrap();
    fs.shards().set_now_us(T0 + 2_000);
    // Nothing changes: within the size, keep-size, a hole wholly past the end.
    for (mode, offset, len) in [
        (Fallocate::Allocate, 0, 10_000),
        (Fallocate::KeepSize, 0, 1 << 30),
        (Fallocate::PunchHole, 10_000, 4096),
    ] {
        let a = fs.fallocate(f.ino, mode, offset, len).unwrap();
        assert_eq!(a, before, "{mode:?} at {offset} len {len}");
    }
    let grown = fs
        .fallocate(f.ino, Fallocate::Allocate, 9_000, 3_000)
        .unwrap();
    assert_eq!(grown.size, 12_000);
    assert!(grown.mtime > before.mtime && grown.ctime > before.ctime);
    fs.shards().set_now_us(T0 + 3_000);
    let punched = fs
        .fallocate(f.ino, Fallocate::PunchHole, 100, 5_000)
        .unwrap();
    assert_eq!(punched.size, 12_000);
    assert!(punched.mtime > grown.mtime && punched.ctime > grown.ctime);
    let back = fs.read(f.ino, 0, 12_000).unwrap();
    assert!(back[..100].iter().all(|&b| b == 5));
    assert!(back[100..5_100].iter().all(|&b| b == 0));
    assert!(back[5_100..10_000].iter().all(|&b| b == 5));
    assert!(back[10_000..].iter().all(|&b| b == 0));
    // The errnos of fallocate(2).
    let d = dir(&fs, ROOT_INO, "d");
    let p = fs
        .mknod(ROOT_INO, b"p", FileKind::Fifo, 0o644, 0, ME)
        .unwrap();
    let s = fs
        .mknod(ROOT_INO, b"s", FileKind::Socket, 0o644, 0, ME)
        .unwrap();
    assert_eq!(
        errno(fs.fallocate(f.ino, Fallocate::Allocate, 0, 0)),
        libc::EINVAL
    );
    assert_eq!(
        errno(fs.fallocate(d.ino, Fallocate::Allocate, 0, 1)),
        libc::EISDIR
    );
    assert_eq!(
        errno(fs.fallocate(p.ino, Fallocate::Allocate, 0, 1)),
        libc::ESPIPE
    );
    assert_eq!(
        errno(fs.fallocate(s.ino, Fallocate::Allocate, 0, 1)),
        libc::ENODEV
    );
    assert_eq!(
        errno(fs.fallocate(f.ino, Fallocate::Allocate, FILE_SIZE_MAX, 1)),
        libc::EFBIG
    );
    assert_eq!(
        errno(fs.fallocate(999, Fallocate::KeepSize, 0, 1)),
        libc::ENOENT
    );
}

#[test]
fn many_small_overwrites_of_one_chunk_read_back_through_compaction() {
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    let mut want = vec![0u8; 4096];
    for i in 0..400u32 {
        let off = (i * 37 % 4000) as usize;
        let data = [(i % 251) as u8; 50];
        let end = (off + 50).min(4096);
        want[off..end].copy_from_slice(&data[..end - off]);
        fs.write(f.ino, off as u64, &data[..end - off]).unwrap();
    }
    let len = fs.getattr(f.ino).unwrap().size as usize;
    assert_eq!(&fs.read(f.ino, 0, 4096).unwrap()[..], &want[..len]);
}

#[test]
fn snapshot_names_resolve_to_the_past_and_literal_names_win() {
    let fs = fs();
    fs.shards().set_now_us(T0 + 1_000);
    let f = file(&fs, ROOT_INO, "f");
    fs.write(f.ino, 0, b"old").unwrap();
    fs.shards().set_now_us(T0 + 2_000);
    fs.write(f.ino, 0, b"NEW").unwrap();
    let old = fs
        .lookup(ROOT_INO, format!("f@{}us", T0 + 1_500).as_bytes())
        .unwrap();
    assert!(is_snapshot(old.ino));
    assert_eq!(&fs.read(old.ino, 0, 10).unwrap()[..], b"old");
    let again = fs
        .lookup(ROOT_INO, format!("f@{}us", T0 + 1_500).as_bytes())
        .unwrap();
    assert_eq!(again.ino, old.ino, "stable for (inode, T)");
    // Before it existed, and later than now plus the skew: ENOENT.
    assert_eq!(
        errno(fs.lookup(ROOT_INO, format!("f@{}us", T0 + 500).as_bytes())),
        libc::ENOENT
    );
    assert_eq!(
        errno(fs.lookup(ROOT_INO, format!("f@{}us", T0 + 1_002_001).as_bytes())),
        libc::ENOENT
    );
    assert!(
        fs.lookup(ROOT_INO, format!("f@{}us", T0 + 900_000).as_bytes())
            .is_ok(),
        "within the skew"
    );
    // A literal name wins; a suffix that is no time is an ordinary name.
    let literal = file(&fs, ROOT_INO, &format!("f@{}us", T0 + 1_500));
    assert_eq!(
        fs.lookup(ROOT_INO, format!("f@{}us", T0 + 1_500).as_bytes())
            .unwrap()
            .ino,
        literal.ino
    );
    assert_eq!(errno(fs.lookup(ROOT_INO, b"f@yesterday")), libc::ENOENT);
    // Inside a snapshot tree a second @ is an ordinary name.
    let root_then = fs
        .lookup(ROOT_INO, format!("@{}us", T0 + 1_500).as_bytes())
        .unwrap();
    assert_eq!(fs.lookup(root_then.ino, b"f").unwrap().ino, old.ino);
    let nested = fs.lookup(root_then.ino, format!("f@{}us", T0 + 1_200).as_bytes());
    assert_eq!(errno(nested), libc::ENOENT);
    // Snapshots do not appear in listings.
    let (names, _) = fs.readdir(ROOT_INO, None, 100).unwrap();
    assert_eq!(names.len(), 2);
}

#[test]
fn every_change_inside_a_snapshot_is_erofs() {
    let fs = fs();
    fs.shards().set_now_us(T0 + 1_000);
    dir(&fs, ROOT_INO, "d");
    let snap = fs
        .lookup(ROOT_INO, format!("d@{}us", T0 + 1_000).as_bytes())
        .unwrap();
    let s = snap.ino;
    let erofs = [
        errno(fs.create(s, b"x", 0o644, ME)),
        errno(fs.mkdir(s, b"x", 0o755, ME)),
        errno(fs.symlink(s, b"x", b"t", ME)),
        errno(fs.mknod(s, b"x", FileKind::Fifo, 0o644, 0, ME)),
        errno(fs.unlink(s, b"x")),
        errno(fs.rmdir(s, b"x")),
        errno(fs.rename(s, b"x", ROOT_INO, b"y", 0)),
        errno(fs.rename(ROOT_INO, b"d", s, b"y", 0)),
        errno(fs.link(s, ROOT_INO, b"y")),
        errno(fs.setattr(s, SetAttr::default())),
        errno(fs.write(s, 0, b"x")),
        errno(fs.setxattr(s, b"user.a", b"", 0)),
        errno(fs.removexattr(s, b"user.a")),
        errno(fs.fallocate(s, Fallocate::KeepSize, 0, 1)),
        errno(fs.fallocate(s, Fallocate::PunchHole, 0, 1)),
    ];
    assert!(erofs.iter().all(|&e| e == libc::EROFS), "{erofs:?}");
}

#[test]
fn a_time_before_the_retention_horizon_is_enoent() {
    let fs = fs();
    fs.shards().set_now_us(T0 + 1_000);
    file(&fs, ROOT_INO, "f");
    fs.shards().set_now_us(T0 + 2_000);
    file(&fs, ROOT_INO, "g");
    let name = format!("f@{}us", T0 + 1_500);
    assert!(fs.lookup(ROOT_INO, name.as_bytes()).is_ok());
    let horizon = derechofs_storage::Hlc::at(T0 + 2_000);
    fs.shards()
        .with_log_mut(ShardRef::Namespace, |log| {
            log.trim_before_time(horizon).unwrap()
        })
        .unwrap();
    assert_eq!(errno(fs.lookup(ROOT_INO, name.as_bytes())), libc::ENOENT);
    assert!(fs
        .lookup(ROOT_INO, format!("f@{}us", T0 + 2_000).as_bytes())
        .is_ok());
}

#[test]
fn the_history_xattr_lists_every_change_of_an_inode_up_to_the_snapshot_time() {
    let fs = fs();
    fs.shards().set_now_us(T0 + 1_000_000);
    let f = file(&fs, ROOT_INO, "f");
    fs.shards().set_now_us(T0 + 2_000_000);
    fs.write(f.ino, 0, b"a").unwrap();
    fs.shards().set_now_us(T0 + 3_000_000);
    fs.write(f.ino, 0, b"b").unwrap();
    let h = fs.history(f.ino).unwrap();
    let walls: Vec<u64> = h.iter().map(|e| e.hlc.wall_us).collect();
    assert_eq!(walls, vec![T0 + 1_000_000, T0 + 2_000_000, T0 + 3_000_000]);
    let text = String::from_utf8(fs.getxattr(f.ino, HISTORY_XATTR).unwrap().to_vec()).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.starts_with("2027-01-15T08:00:01.000000Z 0x"), "{text}");
    assert!(!fs
        .listxattr(f.ino)
        .unwrap()
        .iter()
        .any(|n| n.starts_with(b"user.derechofs.")));
    let then = fs
        .lookup(ROOT_INO, format!("f@{}us", T0 + 2_500_000).as_bytes())
        .unwrap();
    assert_eq!(fs.history(then.ino).unwrap().len(), 2);
}

#[test]
fn more_threads_than_client_slots_each_get_every_request_applied_once() {
    let fs = fs();
    let threads = derechofs_fs::filesystem::CLIENT_SLOTS_MAX as usize + 16;
    std::thread::scope(|s| {
        for t in 0..threads {
            let fs = &fs;
            s.spawn(move || {
                let d = fs
                    .mkdir(ROOT_INO, format!("t{t}").as_bytes(), 0o755, ME)
                    .unwrap();
                for i in 0..10 {
                    let f = fs
                        .create(d.ino, format!("f{i}").as_bytes(), 0o644, ME)
                        .unwrap();
                    fs.write(f.ino, 0, format!("{t}.{i}").as_bytes()).unwrap();
                }
            });
        }
    });
    let (dirs, more) = fs.readdir(ROOT_INO, None, 4096).unwrap();
    assert!(!more);
    assert_eq!(dirs.len(), threads);
    for d in dirs {
        let t = String::from_utf8(d.name[1..].to_vec()).unwrap();
        let (files, _) = fs.readdir(d.ino, None, 100).unwrap();
        assert_eq!(files.len(), 10);
        for (i, f) in files.iter().enumerate() {
            let want = format!("{t}.{}", String::from_utf8_lossy(&f.name[1..]));
            assert_eq!(
                fs.read(f.ino, 0, 100).unwrap(),
                want.as_bytes(),
                "file {i} of {t}"
            );
        }
    }
    assert_eq!(fs.statfs().unwrap().inodes, 1 + threads as u64 * 11);
}

#[test]
fn a_client_restarted_with_the_same_ids_is_not_taken_for_a_stale_retry() {
    let shards = LocalShards::new(1, 4096, Clock::Manual(AtomicU64::new(T0))).unwrap();
    let config = FsConfig {
        client_base: 42,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    let first = FileSystem::new(shards, config.clone()).unwrap();
    for i in 0..5 {
        file(&first, ROOT_INO, &format!("f{i}"));
    }
    let shards = first.into_shards();
    shards.set_now_us(T0 + 1_000_000);
    let again = FileSystem::new(shards, config).unwrap();
    file(&again, ROOT_INO, "after restart");
    assert_eq!(again.readdir(ROOT_INO, None, 100).unwrap().0.len(), 6);
}

#[test]
fn no_time_sees_a_size_with_its_bytes_cut_during_a_truncation() {
    // Every operation gets a microsecond of its own, so that times fall between the namespace's
    // and the data shards' parts of one truncation.
    let shards = LocalShards::new(3, 4096, Clock::Ticking(AtomicU64::new(T0))).unwrap();
    let config = FsConfig {
        client_base: 1,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    let fs = FileSystem::new(shards, config).unwrap();
    let f = file(&fs, ROOT_INO, "f");
    fs.write(f.ino, 0, &[9u8; 10_000]).unwrap();
    let start = fs.shards().now_us();
    for size in [3000u64, 12_000, 500, 9000] {
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        fs.setattr(f.ino, set).unwrap();
    }
    let end = fs.shards().now_us();
    let mut longest = 10_000;
    for t in start..end {
        let then = fs.lookup(ROOT_INO, format!("f@{t}us").as_bytes()).unwrap();
        let bytes = fs.read(then.ino, 0, 20_000).unwrap();
        assert_eq!(bytes.len() as u64, then.size, "at {t}");
        let nines = bytes.iter().take_while(|&&b| b == 9).count() as u64;
        assert!(
            bytes[nines as usize..].iter().all(|&b| b == 0),
            "at {t}: data after zeros"
        );
        // The bytes kept are those below every size the file had so far.
        longest = longest.min(then.size);
        assert_eq!(nines, longest, "at {t}: size {}", then.size);
    }
}

#[test]
fn buffered_writes_are_read_by_their_writer_at_once_and_seen_at_past_times_only_once_flushed() {
    let fs = fs();
    fs.shards().set_now_us(T0 + 1_000);
    let f = file(&fs, ROOT_INO, "f");
    fs.write(f.ino, 0, b"old").unwrap();
    let versions_before = fs.history(f.ino).unwrap().len();
    fs.shards().set_now_us(T0 + 2_000);
    // Contiguous writes across a chunk boundary (chunks of 4096 bytes) join one run.
    fs.write_buffered(f.ino, 0, &[b'a'; 3000]).unwrap();
    fs.write_buffered(f.ino, 3000, &[b'b'; 3000]).unwrap();
    fs.shards().set_now_us(T0 + 3_000);
    // A read at a time while the bytes were buffered sees the file as sent before it.
    let past = fs
        .lookup(ROOT_INO, format!("f@{}us", T0 + 2_500).as_bytes())
        .unwrap();
    assert_eq!(past.size, 3);
    assert_eq!(&fs.read(past.ino, 0, 10).unwrap()[..], b"old");
    // The writer's own attributes and reads include them (and send them).
    assert_eq!(fs.getattr(f.ino).unwrap().size, 6000);
    let now = fs.read(f.ino, 2990, 20).unwrap();
    assert_eq!(&now[..10], &[b'a'; 10]);
    assert_eq!(&now[10..], &[b'b'; 10]);
    // One size update for the whole run, not one per write.
    assert_eq!(fs.history(f.ino).unwrap().len(), versions_before + 1);
    fs.flush(f.ino).unwrap();
    // After the send, a time after it sees the bytes.
    fs.shards().set_now_us(T0 + 4_000);
    let later = fs
        .lookup(ROOT_INO, format!("f@{}us", T0 + 3_500).as_bytes())
        .unwrap();
    assert_eq!(later.size, 6000);
}

#[test]
fn an_error_of_a_deferred_write_is_returned_at_the_next_flush_of_the_file() {
    let fs = fs();
    let d = dir(&fs, ROOT_INO, "d");
    let f = file(&fs, ROOT_INO, "f");
    // Another file's buffer being sent must not report this one's error, nor the reverse.
    fs.write_buffered(d.ino, 0, b"not a file").unwrap();
    fs.write_buffered(f.ino, 0, b"fine").unwrap();
    fs.flush(f.ino).unwrap();
    assert_eq!(errno(fs.flush(d.ino)), libc::EISDIR);
    // Reported once: the buffer is gone with its error.
    fs.flush(d.ino).unwrap();
    // An error of a send that another operation triggered is returned by it and again at
    // fsync of the file.
    fs.write_buffered(d.ino, 0, b"again").unwrap();
    assert_eq!(errno(fs.read(d.ino, 0, 1)), libc::EISDIR);
    assert_eq!(errno(fs.fsync_file(d.ino)), libc::EISDIR);
    fs.fsync_file(f.ino).unwrap();
    assert_eq!(&fs.read(f.ino, 0, 10).unwrap()[..], b"fine");
}

/// Two clients of the same shards: `keeps` answers a `getattr` of a directory it changed from
/// the reply of its change (for an hour), `reads` always reads the shards.
fn two_clients() -> (
    FileSystem<std::sync::Arc<LocalShards>>,
    FileSystem<std::sync::Arc<LocalShards>>,
) {
    let shards =
        std::sync::Arc::new(LocalShards::new(3, 4096, Clock::Manual(AtomicU64::new(T0))).unwrap());
    let config = |client_base, dir_attr_ttl_us| FsConfig {
        client_base,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us,
    };
    let keeps = FileSystem::new(shards.clone(), config(1 << 32, 3_600_000_000)).unwrap();
    let reads = FileSystem::new(shards, config(2 << 32, 0)).unwrap();
    (keeps, reads)
}

#[test]
fn every_change_of_entries_returns_its_directories_attributes_as_the_shards_then_hold_them() {
    let (keeps, reads) = two_clients();
    let tick = |n: u64| keeps.shards().set_now_us(T0 + n * 1000);
    let a = dir(&keeps, ROOT_INO, "a");
    let b = dir(&keeps, ROOT_INO, "b");
    let f = file(&keeps, a.ino, "f");
    let check = |dirs: &[Ino], what: &str| {
        for &d in dirs {
            // Read by the other client first: the kept attributes cannot come from this read.
            let fresh = reads.getattr(d).unwrap();
            assert_eq!(keeps.getattr(d).unwrap(), fresh, "{what}: directory {d}");
        }
    };
    let steps = [
        ("create", vec![a.ino]),
        ("mkdir", vec![a.ino]),
        ("mknod", vec![a.ino]),
        ("symlink", vec![b.ino]),
        ("link", vec![b.ino]),
        ("unlink", vec![b.ino]),
        ("rename across", vec![a.ino, b.ino]),
        ("exchange", vec![a.ino, b.ino]),
        ("rmdir", vec![a.ino]),
    ];
    for (n, (what, dirs)) in steps.into_iter().enumerate() {
        tick(n as u64 + 1);
        match what {
            "create" => _ = file(&keeps, a.ino, "g"),
            "mkdir" => _ = dir(&keeps, a.ino, "d"),
            "mknod" => {
                _ = keeps
                    .mknod(a.ino, b"p", FileKind::Fifo, 0o644, 0, ME)
                    .unwrap()
            }
            "symlink" => _ = keeps.symlink(b.ino, b"l", b"/x", ME).unwrap(),
            "link" => _ = keeps.link(f.ino, b.ino, b"h").unwrap(),
            "unlink" => keeps.unlink(b.ino, b"h").unwrap(),
            "rename across" => keeps.rename(a.ino, b"d", b.ino, b"d2", 0).unwrap(),
            // The file g and the directory d2 change places.
            "exchange" => keeps
                .rename(a.ino, b"g", b.ino, b"d2", RENAME_EXCHANGE)
                .unwrap(),
            "rmdir" => keeps.rmdir(a.ino, b"g").unwrap(),
            other => unreachable!("{other}"),
        }
        check(&dirs, what);
    }
}

#[test]
fn kept_directory_attributes_answer_one_getattr_and_never_hide_the_clients_own_changes() {
    let (keeps, reads) = two_clients();
    let d = dir(&keeps, ROOT_INO, "d");
    file(&keeps, d.ino, "f");
    let after_create = reads.getattr(d.ino).unwrap();
    // Another client changes the directory: the next getattr of the client that made the
    // create answers what its reply carried (stale within the bound), the one after reads.
    keeps.shards().set_now_us(T0 + 1000);
    dir(&reads, d.ino, "sub");
    let now = reads.getattr(d.ino).unwrap();
    assert_eq!(now.nlink, after_create.nlink + 1);
    assert_eq!(keeps.getattr(d.ino).unwrap(), after_create);
    assert_eq!(keeps.getattr(d.ino).unwrap(), now);
    // A later change of the client itself drops what it kept.
    file(&keeps, d.ino, "g");
    let set = SetAttr {
        perm: Some(0o700),
        ..SetAttr::default()
    };
    keeps.setattr(d.ino, set).unwrap();
    assert_eq!(keeps.getattr(d.ino).unwrap().perm, 0o700);
    // A client with the bound 0 keeps nothing.
    dir(&reads, d.ino, "sub2");
    dir(&keeps, d.ino, "sub3");
    assert_eq!(reads.getattr(d.ino).unwrap(), keeps.getattr(d.ino).unwrap());
    assert_eq!(reads.getattr(d.ino).unwrap().nlink, now.nlink + 2);
}

#[test]
fn reading_a_stored_xattr_leaves_the_write_back_buffer_unsent() {
    // The kernel reads `security.capability` before every write to a file through the mount:
    // that read must not send the buffer, or no buffer would hold more than one write.
    let fs = fs();
    let f = file(&fs, ROOT_INO, "f");
    fs.setxattr(f.ino, b"user.k", b"v", 0).unwrap();
    let versions = fs.history(f.ino).unwrap().len();
    fs.write_buffered(f.ino, 0, b"abc").unwrap();
    assert_eq!(
        errno(fs.getxattr(f.ino, b"security.capability")),
        libc::ENODATA
    );
    assert_eq!(&fs.getxattr(f.ino, b"user.k").unwrap()[..], b"v");
    fs.write_buffered(f.ino, 3, b"def").unwrap();
    // Nothing sent yet: the history xattr, which does send the buffer first, shows one version
    // more, with both writes in it.
    let history = fs.getxattr(f.ino, HISTORY_XATTR).unwrap();
    assert_eq!(
        history.iter().filter(|&&b| b == b'\n').count(),
        versions + 1
    );
    assert_eq!(&fs.read(f.ino, 0, 10).unwrap()[..], b"abcdef");
}
