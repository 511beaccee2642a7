//! The file system through its facade over in-process shards: the everyday paths, end to end.

use std::sync::atomic::AtomicU64;

use derechofs_fs::{Clock, Creds, FileSystem, FsConfig, LocalShards, SetAttr, ROOT_INO};

const ROOT: Creds = Creds { uid: 0, gid: 0 };

fn fs(data_shards: u32, chunk_size: u32) -> FileSystem<LocalShards> {
    let shards = LocalShards::new(
        data_shards,
        chunk_size,
        Clock::Manual(AtomicU64::new(1_700_000_000_000_000)),
    )
    .unwrap();
    let config = FsConfig {
        client_base: 1000,
        skew_max_us: 1_000_000,
        root_owner: ROOT,
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    };
    FileSystem::new(shards, config).unwrap()
}

#[test]
fn files_written_across_chunks_and_shards_read_back_with_holes_as_zeros() {
    let fs = fs(3, 4096);
    let d = fs.mkdir(ROOT_INO, b"d", 0o755, ROOT).unwrap();
    let f = fs.create(d.ino, b"f", 0o644, ROOT).unwrap();
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    fs.write(f.ino, 100, &data).unwrap();
    fs.write(f.ino, 20_000, b"tail").unwrap();
    let attr = fs.getattr(f.ino).unwrap();
    assert_eq!(attr.size, 20_004);
    let all = fs.read(f.ino, 0, 30_000).unwrap();
    assert_eq!(all.len(), 20_004);
    assert!(all[..100].iter().all(|&b| b == 0));
    assert_eq!(&all[100..10_100], &data[..]);
    assert!(all[10_100..20_000].iter().all(|&b| b == 0));
    assert_eq!(&all[20_000..], b"tail");
}

#[test]
fn a_file_read_at_a_past_time_shows_its_contents_then() {
    let fs = fs(2, 4096);
    let f = fs.create(ROOT_INO, b"log", 0o644, ROOT).unwrap();
    fs.write(f.ino, 0, b"first").unwrap();
    let t1 = 1_700_000_000_500_000u64;
    fs.shards().set_now_us(t1 + 1);
    fs.write(f.ino, 0, b"SECOND version").unwrap();
    fs.setattr(
        f.ino,
        SetAttr {
            size: Some(3),
            ..SetAttr::default()
        },
    )
    .unwrap();
    assert_eq!(&fs.read(f.ino, 0, 100).unwrap()[..], b"SEC");
    let name = format!("log@{}.{:06}", t1 / 1_000_000, t1 % 1_000_000);
    let past = fs.lookup(ROOT_INO, name.as_bytes()).unwrap();
    assert_ne!(past.ino, f.ino);
    assert_eq!(past.size, 5);
    assert_eq!(&fs.read(past.ino, 0, 100).unwrap()[..], b"first");
    let err = fs.write(past.ino, 0, b"x").unwrap_err();
    assert_eq!(err.errno, libc::EROFS);
    let root_then = fs
        .lookup(ROOT_INO, format!("@{}us", t1).as_bytes())
        .unwrap();
    let (entries, more) = fs.readdir(root_then.ino, None, 10).unwrap();
    assert!(!more);
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].ino, past.ino);
}
