//! The file system on a real cluster: three `derechofs node` processes on loopback, and
//! `FileSystem` over `RemoteShards` in this process, checked against the same operations on
//! in-process `LocalShards`, through every replica, at past times, and in the logs afterwards.
//!

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{connect_remote, Cluster, FORMING_TIMEOUT};
use derechofs_client::RemoteShards;
use derechofs_fs::{
    Attr, Creds, FileKind, FileSystem, FsConfig, FsError, Ino, LocalShards, SetAttr, Shards,
    HISTORY_XATTR, ROOT_INO,
};

const NODES: usize = 3;
/// Chunks small enough that the sequence's writes span several chunks and data shards.
const CHUNK_SIZE: u32 = 4096;

/// A 3-node cluster with two data shards of small chunks.
fn cluster(test: u8, extra: &str) -> Cluster {
    let cluster = Cluster::new(
        test,
        NODES,
        &format!("{extra}\n[layout]\ndata_shards = 2\nchunk_size = {CHUNK_SIZE}\n"),
    );
    cluster.start_all();
    cluster
}

/// `RemoteShards` to the cluster, once it answers; with `prefer`, requests go to that member.
fn connect(cluster: &Cluster, prefer: Option<u32>) -> RemoteShards {
    let mut config = cluster.remote_config();
    config.prefer = prefer;
    connect_remote(config)
}

fn fs_config(client_base: u64) -> FsConfig {
    FsConfig {
        client_base,
        skew_max_us: 1_000_000,
        root_owner: Creds { uid: 0, gid: 0 },
        dir_attr_ttl_us: derechofs_fs::filesystem::DIR_ATTR_TTL_US_DEFAULT,
    }
}

/// A xorshift generator: the sequence is a function of the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What a result shows that does not depend on the clock: the stamps (times) differ between a
/// cluster and in-process shards, everything else must not.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Attr {
        ino: Ino,
        kind: FileKind,
        perm: u16,
        nlink: u32,
        size: u64,
    },
    Bytes(Vec<u8>),
    Names(Vec<(Vec<u8>, Ino)>),
    Done,
    Errno(i32),
}

fn attr(a: &Attr) -> Seen {
    Seen::Attr {
        ino: a.ino,
        kind: a.kind,
        perm: a.perm,
        nlink: a.nlink,
        size: a.size,
    }
}

fn seen<T>(r: Result<T, FsError>, f: impl FnOnce(T) -> Seen) -> Seen {
    match r {
        Ok(t) => f(t),
        Err(e) => Seen::Errno(e.errno),
    }
}

const NAMES: [&[u8]; 5] = [b"a", b"b", b"c", b"d", b"e"];

/// One random operation, applied to `fs`; the inodes it picks are among `inos`, the directories
/// it creates in among `dirs` (both file systems allocate the same numbers: in the order).
fn step<S: Shards>(fs: &FileSystem<S>, op: u64, r: &[u64; 6], inos: &[Ino], dirs: &[Ino]) -> Seen {
    let ino = inos[(r[0] % inos.len() as u64) as usize];
    let dir = dirs[(r[1] % dirs.len() as u64) as usize];
    let name = NAMES[(r[2] % NAMES.len() as u64) as usize];
    let other = NAMES[(r[3] % NAMES.len() as u64) as usize];
    let c = Creds { uid: 0, gid: 0 };
    match op {
        0 => seen(fs.create(dir, name, 0o644, c), |a| attr(&a)),
        1 => seen(fs.mkdir(dir, name, 0o755, c), |a| attr(&a)),
        2..=4 => {
            let offset = r[4] % (3 * u64::from(CHUNK_SIZE));
            let len = (r[5] % (2 * u64::from(CHUNK_SIZE))) as usize + 1;
            let data: Vec<u8> = (0..len).map(|i| (r[5] as usize + i) as u8).collect();
            seen(fs.write(ino, offset, &data), |a| attr(&a))
        }
        5 => seen(
            fs.read(ino, r[4] % (4 * u64::from(CHUNK_SIZE)), 3 * CHUNK_SIZE),
            |b| Seen::Bytes(b.to_vec()),
        ),
        6 => seen(fs.unlink(dir, name), |()| Seen::Done),
        7 => seen(fs.rmdir(dir, name), |()| Seen::Done),
        8 => seen(fs.rename(dir, name, ino, other, 0), |()| Seen::Done),
        9 => {
            let set = SetAttr {
                size: Some(r[4] % (3 * u64::from(CHUNK_SIZE))),
                ..SetAttr::default()
            };
            seen(fs.setattr(ino, set), |a| attr(&a))
        }
        10 => seen(fs.setxattr(ino, b"user.k", name, 0), |()| Seen::Done),
        11 => seen(fs.getxattr(ino, b"user.k"), |b| Seen::Bytes(b.to_vec())),
        12 => seen(fs.symlink(dir, name, other, c), |a| attr(&a)),
        13 => seen(fs.link(ino, dir, name), |a| attr(&a)),
        14 => seen(fs.readdir(ino, None, 100), |(entries, _)| {
            Seen::Names(
                entries
                    .into_iter()
                    .map(|e| (e.name.to_vec(), e.ino))
                    .collect(),
            )
        }),
        15 => seen(fs.removexattr(ino, b"user.k"), |()| Seen::Done),
        16 => seen(fs.getxattr(ino, b"security.capability"), |b| {
            Seen::Bytes(b.to_vec())
        }),
        _ => seen(fs.lookup(dir, name), |a| attr(&a)),
    }
}

/// The tree under `dir` as the file system shows it: path → (attributes without times,
/// contents or link target).
type Tree = BTreeMap<Vec<u8>, (Seen, Vec<u8>)>;

fn walk<S: Shards>(fs: &FileSystem<S>, dir: Ino, path: &[u8], tree: &mut Tree) {
    let mut after: Option<Bytes> = None;
    loop {
        let (entries, more) = fs
            .readdir(dir, after.as_deref(), 64)
            .unwrap_or_else(|e| panic!("readdir of {dir:#x}: {e}"));
        for e in &entries {
            let mut p = path.to_vec();
            p.push(b'/');
            p.extend_from_slice(&e.name);
            let a = fs
                .getattr(e.ino)
                .unwrap_or_else(|err| panic!("getattr {p:?}: {err}"));
            let mut shown = attr(&a);
            if let Seen::Attr { ino, .. } = &mut shown {
                // Snapshot inode numbers differ from live ones (the steps compare live ones).
                *ino = 0;
            }
            let contents = match a.kind {
                FileKind::Regular => fs.read(e.ino, 0, a.size as u32).expect("read").to_vec(),
                FileKind::Symlink => fs.readlink(e.ino).expect("readlink").to_vec(),
                _ => Vec::new(),
            };
            tree.insert(p.clone(), (shown, contents));
            if a.kind == FileKind::Directory {
                walk(fs, e.ino, &p, tree);
            }
        }
        if !more {
            return;
        }
        after = entries.last().map(|e| e.name.clone());
    }
}

fn tree_at<S: Shards>(fs: &FileSystem<S>, at_us: Option<u64>) -> Tree {
    let root = match at_us {
        None => ROOT_INO,
        Some(us) => {
            fs.lookup(ROOT_INO, format!("@{us}us").as_bytes())
                .unwrap_or_else(|e| panic!("the root at {us}: {e}"))
                .ino
        }
    };
    let mut tree = Tree::new();
    walk(fs, root, b"", &mut tree);
    tree
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

#[test]
fn t20_fs_on_a_cluster_matches_local_shards_reads_the_past_alike_on_every_replica_and_logs_agree() {
    let seed = 0x5eed_f5c1_u64 ^ u64::from(std::process::id());
    eprintln!("seed {seed:#x}");
    let cluster = cluster(20, "suspect_after_ms = 5000\ntime_read_wait_ms = 5000");
    let remote = FileSystem::new(connect(&cluster, Some(1)), fs_config(1 << 32)).expect("mount");
    let local = FileSystem::new(
        LocalShards::new(2, CHUNK_SIZE, derechofs_fs::Clock::System).expect("local shards"),
        fs_config(1 << 32),
    )
    .expect("local file system");
    let mut rng = Rng(seed | 1);
    let mut inos: Vec<Ino> = vec![ROOT_INO];
    let mut dirs: Vec<Ino> = vec![ROOT_INO];
    // Trees after some steps, with a time between that step and the next.
    let mut past: Vec<(u64, Tree)> = Vec::new();
    for i in 0..300 {
        let op = rng.below(18);
        let r = [
            rng.next(),
            rng.next(),
            rng.next(),
            rng.next(),
            rng.next(),
            rng.next(),
        ];
        let got = step(&remote, op, &r, &inos, &dirs);
        let want = step(&local, op, &r, &inos, &dirs);
        assert_eq!(
            got, want,
            "step {i} (op {op}) differs from local shards; seed {seed:#x}"
        );
        if let Seen::Attr { ino, kind, .. } = got {
            if !inos.contains(&ino) {
                inos.push(ino);
                if kind == FileKind::Directory {
                    dirs.push(ino);
                }
            }
        }
        if i % 60 == 59 {
            // Every stamp so far is at or below this time, and every later one above it: the
            // next request is stamped by a clock that has moved past it.
            std::thread::sleep(Duration::from_millis(2));
            let t = now_us();
            std::thread::sleep(Duration::from_millis(2));
            past.push((t, tree_at(&remote, None)));
        }
    }
    let live = tree_at(&remote, None);
    assert_eq!(
        live,
        tree_at(&local, None),
        "the trees differ; seed {seed:#x}"
    );
    eprintln!(
        "{} paths now; {:?} paths at the past times",
        live.len(),
        past.iter().map(|p| p.1.len()).collect::<Vec<_>>()
    );
    assert!(past.iter().any(|p| p.1.len() > 3), "the trees grew");

    // Every replica, through its own client, shows the same past.
    for node in 1..=NODES as u32 {
        let fs = FileSystem::new(
            connect(&cluster, Some(node)),
            fs_config(u64::from(node) << 40),
        )
        .expect("mount through one member");
        for (t, tree) in &past {
            assert_eq!(
                &tree_at(&fs, Some(*t)),
                tree,
                "node {node} at {t} differs from the tree then; seed {seed:#x}"
            );
        }
        let history = fs.getxattr(ROOT_INO, HISTORY_XATTR).expect("history");
        assert!(
            history.split(|&b| b == b'\n').count() > 1,
            "the root has a history"
        );
    }

    // The disk space the members report, and the history of a path for people.
    let statfs = remote.statfs().expect("statfs");
    assert!(statfs.free_bytes <= statfs.total_bytes && statfs.total_bytes > 0);
    let contacts = cluster.addrs.join(",");
    let file = live
        .iter()
        .find(|(_, (a, _))| {
            matches!(
                a,
                Seen::Attr {
                    kind: FileKind::Regular,
                    ..
                }
            )
        })
        .map(|(p, (a, _))| {
            (
                String::from_utf8(p.clone()).expect("utf-8 names"),
                a.clone(),
            )
        });
    if let Some((path, Seen::Attr { size, .. })) = file {
        let mut ino = ROOT_INO;
        for part in path.trim_start_matches('/').split('/') {
            ino = remote.lookup(ino, part.as_bytes()).expect("lookup").ino;
        }
        let changes = remote.history(ino).expect("history").len();
        let run = cluster.run(&["log", "--contacts", &contacts, &path]);
        let out = run.stdout;
        assert_eq!(run.code, 0, "log {path}: {out} {}", run.stderr);
        eprintln!("derechofs log {path}:\n{out}");
        let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("| 20")).collect();
        assert_eq!(rows.len(), changes.min(100), "one row per change: {out}");
        let last = rows.last().expect("a change");
        assert!(
            last.split('|')
                .nth(3)
                .is_some_and(|c| c.trim() == size.to_string()),
            "the last change shows the size now ({size}): {out}"
        );
    }
    let run = cluster.run(&["log", "--contacts", &contacts, "/no/such/path"]);
    assert_eq!(run.code, 2, "a path that does not exist: {run:?}");

    // Everything the client wrote is durable on every replica; then the logs agree.
    remote.fsync().expect("fsync");
    drop(remote);
    cluster.stop_all();
    let dumps: Vec<String> = (1..=NODES).map(|n| cluster.dump(n)).collect();
    assert!(
        dumps[0].contains("fe49"),
        "the dump shows inode keys: {}",
        dumps[0]
    );
    for (n, dump) in dumps.iter().enumerate() {
        assert_eq!(dump, &dumps[0], "node {} differs from node 1", n + 1);
    }
}

#[test]
fn t30_fs_through_a_member_killed_mid_sequence_resends_applies_once_and_keeps_the_past() {
    let seed = 0x5eed_f530_u64 ^ u64::from(std::process::id());
    eprintln!("seed {seed:#x}");
    let cluster = cluster(30, "suspect_after_ms = 400\ntime_read_wait_ms = 2000");
    // Every request goes to node 3 while it lives: the kill lands on requests in flight there.
    let remote = FileSystem::new(connect(&cluster, Some(3)), fs_config(1 << 32)).expect("mount");
    let local = FileSystem::new(
        LocalShards::new(2, CHUNK_SIZE, derechofs_fs::Clock::System).expect("local shards"),
        fs_config(1 << 32),
    )
    .expect("local file system");
    let mut rng = Rng(seed | 1);
    let mut inos: Vec<Ino> = vec![ROOT_INO];
    let mut dirs: Vec<Ino> = vec![ROOT_INO];
    let mut past: Vec<(u64, Tree)> = Vec::new();
    let kill_now = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let deadline = Instant::now() + FORMING_TIMEOUT;
            while !kill_now.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            // A little later, while the sequence's requests are in flight at node 3.
            std::thread::sleep(Duration::from_millis(3));
            cluster.kill(3);
        });
        for i in 0..240 {
            if i == 80 {
                kill_now.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let op = rng.below(18);
            let r = [
                rng.next(),
                rng.next(),
                rng.next(),
                rng.next(),
                rng.next(),
                rng.next(),
            ];
            let got = step(&remote, op, &r, &inos, &dirs);
            let want = step(&local, op, &r, &inos, &dirs);
            assert_eq!(
                got, want,
                "step {i} (op {op}) differs from local shards; seed {seed:#x}"
            );
            if let Seen::Attr { ino, kind, .. } = got {
                if !inos.contains(&ino) {
                    inos.push(ino);
                    if kind == FileKind::Directory {
                        dirs.push(ino);
                    }
                }
            }
            if i % 40 == 39 {
                std::thread::sleep(Duration::from_millis(2));
                let t = now_us();
                std::thread::sleep(Duration::from_millis(2));
                past.push((t, tree_at(&remote, None)));
            }
        }
    });
    assert!(cluster.pid(3).is_none(), "node 3 was killed");
    assert_eq!(
        tree_at(&remote, None),
        tree_at(&local, None),
        "the trees differ; seed {seed:#x}"
    );
    for node in 1..=2u32 {
        let fs = FileSystem::new(
            connect(&cluster, Some(node)),
            fs_config(u64::from(node) << 40),
        )
        .expect("mount through one member");
        for (t, tree) in &past {
            assert_eq!(
                &tree_at(&fs, Some(*t)),
                tree,
                "node {node} at {t} differs from the tree then; seed {seed:#x}"
            );
        }
    }
    remote.fsync().expect("fsync");
    drop(remote);
    cluster.stop_all();
    let (one, two) = (cluster.dump(1), cluster.dump(2));
    assert_eq!(one, two, "the survivors' logs differ");
}

/// The contents thread `t` writes to its file `i`.
fn contents(t: usize, i: usize) -> Vec<u8> {
    (0..2000 + 700 * i)
        .map(|b| (b * 7 + t * 13 + i) as u8)
        .collect()
}

#[test]
fn t40_fs_threads_share_one_remote_client_and_every_replica_then_holds_their_files() {
    const THREADS: usize = 8;
    const FILES: usize = 12;
    let cluster = cluster(40, "suspect_after_ms = 5000\ntime_read_wait_ms = 5000");
    let fs = FileSystem::new(connect(&cluster, None), fs_config(1 << 32)).expect("mount");
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let fs = &fs;
            scope.spawn(move || {
                let c = Creds { uid: 0, gid: 0 };
                let dir = fs
                    .mkdir(ROOT_INO, format!("t{t}").as_bytes(), 0o755, c)
                    .expect("mkdir");
                for i in 0..FILES {
                    let name = format!("f{i}");
                    let file = fs
                        .create(dir.ino, name.as_bytes(), 0o644, c)
                        .expect("create");
                    let data = contents(t, i);
                    let attr = fs.write(file.ino, 0, &data).expect("write");
                    assert_eq!(attr.size, data.len() as u64);
                    // Read-your-writes, whichever member answers.
                    let back = fs.read(file.ino, 0, data.len() as u32).expect("read");
                    assert_eq!(back.as_ref(), data.as_slice(), "thread {t} file {i}");
                }
            });
        }
    });
    fs.fsync().expect("fsync");
    for node in 1..=NODES as u32 {
        let other = FileSystem::new(
            connect(&cluster, Some(node)),
            fs_config(u64::from(node) << 40),
        )
        .expect("mount through one member");
        let tree = tree_at(&other, None);
        assert_eq!(tree.len(), THREADS * (FILES + 1), "node {node}");
        for t in 0..THREADS {
            for i in 0..FILES {
                let path = format!("/t{t}/f{i}").into_bytes();
                let (_, got) = &tree[&path];
                assert_eq!(got, &contents(t, i), "node {node}: {path:?}");
            }
        }
    }
}

/// Longest a test waits for a feed to subscribe or to report a version.
const FEED_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits (bounded) until `remote`'s namespace feed has reported `version` (or, with `None`,
/// until it is subscribed at all).
fn wait_feed(remote: &RemoteShards, version: Option<u64>, what: &str) {
    let deadline = Instant::now() + FEED_TIMEOUT;
    loop {
        let position = remote.cache_stats().position;
        if position.is_some_and(|p| version.is_none_or(|v| p >= v)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the feed did not reach {version:?} (at {position:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

type Client = FileSystem<RemoteShards>;

/// Two clients: `a` with its requests on node 1, `b` with its requests and its feed on node
/// `b_node`; returns once `b`'s feed is subscribed.
fn two_clients(cluster: &Cluster, b_node: u32) -> (Client, Client) {
    let a = FileSystem::new(connect(cluster, Some(1)), fs_config(1 << 40)).expect("client a");
    let b = FileSystem::new(
        connect(cluster, Some(b_node)),
        fs_config(u64::from(b_node) << 40),
    )
    .expect("client b");
    wait_feed(b.shards(), None, "b subscribed");
    (a, b)
}

/// Waits (bounded) until `b`'s feed has reported every namespace change `a` made so far.
fn wait_reported(a: &Client, b: &Client, what: &str) {
    let v = a.shards().namespace_version().expect("a wrote");
    wait_feed(b.shards(), Some(v), what);
}

fn plain_file(fs: &FileSystem<RemoteShards>, parent: Ino, name: &[u8]) -> Attr {
    fs.create(parent, name, 0o644, Creds { uid: 0, gid: 0 })
        .expect("create")
}

#[test]
fn t50_fs_a_stat_cached_by_one_client_shows_another_clients_change_once_the_feed_reported_it() {
    let cluster = cluster(50, "");
    // Two clients, each with its requests and its feed on another member.
    let (a, b) = two_clients(&cluster, 2);
    let dir = a
        .mkdir(ROOT_INO, b"d", 0o755, Creds { uid: 0, gid: 0 })
        .expect("mkdir")
        .ino;
    let f = plain_file(&a, dir, b"f");
    let g = plain_file(&a, dir, b"g");
    wait_reported(&a, &b, "a's creates");

    // b reads each once from the cluster, then from its cache.
    let f_attr = b.lookup(dir, b"f").expect("lookup f");
    assert_eq!(f_attr.ino, f.ino);
    assert_eq!(b.getattr(g.ino).expect("getattr g").ino, g.ino);
    let hits = b.shards().cache_stats().hits;
    assert_eq!(b.lookup(dir, b"f").expect("lookup f"), f_attr);
    assert_eq!(b.getattr(g.ino).expect("getattr g"), g);
    assert_eq!(
        b.shards().cache_stats().hits,
        hits + 2,
        "the second lookup and getattr are answered from b's cache"
    );

    // a changes both files and the names; each change shows at b once the feed reported it.
    let set = SetAttr {
        perm: Some(0o600),
        size: Some(123),
        ..SetAttr::default()
    };
    let f_new = a.setattr(f.ino, set).expect("setattr");
    assert_eq!(f_new.size, 123);
    a.write(g.ino, 0, b"hello").expect("write");
    let g_new = a.getattr(g.ino).expect("getattr g at a");
    a.rename(dir, b"f", dir, b"f2", 0).expect("rename");
    let h = plain_file(&a, dir, b"f");
    wait_reported(&a, &b, "a's changes");
    let f_b = b.getattr(f.ino).expect("getattr f at b");
    assert_eq!((f_b.perm, f_b.size), (0o600, 123), "b sees the setattr");
    assert_eq!(f_b.ctime, a.getattr(f.ino).expect("getattr f at a").ctime);
    assert_eq!(b.getattr(g.ino).expect("getattr g at b"), g_new);
    assert_eq!(b.lookup(dir, b"f").expect("lookup f").ino, h.ino);
    assert_eq!(b.lookup(dir, b"f2").expect("lookup f2").ino, f.ino);

    // An unlink: b's cached name goes once the feed reported it.
    assert_eq!(b.lookup(dir, b"f2").expect("lookup f2").ino, f.ino);
    a.unlink(dir, b"f2").expect("unlink");
    wait_reported(&a, &b, "a's unlink");
    assert_eq!(
        b.lookup(dir, b"f2").map(|a| a.ino).map_err(|e| e.errno),
        Err(libc::ENOENT)
    );
    assert_eq!(b.getattr(f.ino).expect("an unlinked inode").nlink, 0);
    drop((a, b));
    cluster.stop_all();
}

#[test]
fn t51_fs_a_broken_feed_clears_the_cache_and_a_new_one_serves_the_changes_made_meanwhile() {
    let cluster = cluster(51, "suspect_after_ms = 400");
    // b's requests and feed go to node 3, which is killed.
    let (a, b) = two_clients(&cluster, 3);
    let f = plain_file(&a, ROOT_INO, b"f");
    wait_reported(&a, &b, "a's create");
    assert_eq!(b.getattr(f.ino).expect("getattr"), f);
    let before = b.shards().cache_stats();
    assert_eq!(b.getattr(f.ino).expect("getattr"), f);
    assert_eq!(b.shards().cache_stats().hits, before.hits + 1, "cached");
    assert!(before.entries >= 1);

    cluster.kill(3);
    let deadline = Instant::now() + FEED_TIMEOUT;
    while b.shards().cache_stats().breaks == before.breaks {
        assert!(Instant::now() < deadline, "b's feed did not break");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Changed while b's feed is down or on its way to another member.
    let set = SetAttr {
        perm: Some(0o640),
        ..SetAttr::default()
    };
    a.setattr(f.ino, set).expect("setattr");
    wait_reported(&a, &b, "b's new feed");
    let after = b.shards().cache_stats();
    assert!(
        after.subscriptions > before.subscriptions,
        "subscribed again"
    );
    assert_eq!(b.getattr(f.ino).expect("getattr").perm, 0o640);
    assert_eq!(
        b.shards().cache_stats().hits,
        after.hits,
        "the cache was cleared: the first getattr after the break is a read of the cluster"
    );
    assert_eq!(b.getattr(f.ino).expect("getattr").perm, 0o640);
    assert_eq!(b.shards().cache_stats().hits, after.hits + 1);
    drop((a, b));
    cluster.stop_all();
}

#[test]
fn t52_fs_a_directory_one_client_created_answers_its_negative_lookups_until_another_creates_the_name(
) {
    let cluster = cluster(52, "");
    let (a, b) = two_clients(&cluster, 2);
    let creds = Creds { uid: 0, gid: 0 };
    let dir = b.mkdir(ROOT_INO, b"d", 0o755, creds).expect("mkdir").ino;
    let v = b.shards().namespace_version().expect("b wrote");
    wait_feed(b.shards(), Some(v), "b's mkdir");
    let hits = b.shards().cache_stats().hits;
    let enoent = |r: Result<Attr, FsError>| r.map(|a| a.ino).map_err(|e| e.errno);
    assert_eq!(enoent(b.lookup(dir, b"x")), Err(libc::ENOENT));
    assert_eq!(
        b.shards().cache_stats().hits,
        hits + 1,
        "answered from the complete directory"
    );
    // What the namespace does not answer ENOENT is never answered absent from the cache.
    assert_eq!(enoent(b.lookup(dir, &[b'n'; 256])), Err(libc::ENAMETOOLONG));
    assert_eq!(enoent(b.lookup(dir, b".")), Ok(dir));
    assert_eq!(enoent(b.lookup(dir, b"..")), Ok(ROOT_INO));
    // b's own create, then a's create of another name and a's removal of b's.
    let y = plain_file(&b, dir, b"y");
    let x = plain_file(&a, dir, b"x");
    a.rename(dir, b"y", dir, b"z", 0).expect("rename");
    wait_reported(&a, &b, "a's changes");
    assert_eq!(enoent(b.lookup(dir, b"x")), Ok(x.ino));
    assert_eq!(enoent(b.lookup(dir, b"y")), Err(libc::ENOENT));
    assert_eq!(enoent(b.lookup(dir, b"z")), Ok(y.ino));
    assert_eq!(enoent(b.lookup(dir, b"w")), Err(libc::ENOENT));
    // The `NAME@STAMP` form still resolves in a complete directory (the literal name is absent
    // there, from the cache).
    std::thread::sleep(Duration::from_millis(2));
    let now = now_us();
    std::thread::sleep(Duration::from_millis(2));
    let at = derechofs_fs::time::format_rfc3339(now);
    let past = b
        .lookup(dir, format!("z@{at}").as_bytes())
        .expect("z at a past time");
    assert_ne!(past.ino, y.ino, "a snapshot inode");
    assert_eq!(past.size, y.size);
    drop((a, b));
    cluster.stop_all();
}

/// The bytes of round `round` of a close-to-open test: a length that changes every round
/// (growing and shrinking across chunks and data shards) and bytes that name the round.
fn round_contents(round: u64, rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(3 * u64::from(CHUNK_SIZE) + 1) as usize;
    (0..len)
        .map(|i| (round as usize * 31 + i * 7) as u8)
        .collect()
}

#[test]
fn t53_fs_an_open_after_another_clients_close_returned_sees_its_size_mtime_and_bytes() {
    let cluster = cluster(53, "");
    // The writer and the reader on different members, each with its attribute cache.
    let (a, b) = two_clients(&cluster, 2);
    let f = plain_file(&a, ROOT_INO, b"f");
    // b learns of the file by opening it (close-to-open): b's member may not have delivered a's
    // create yet, and a getattr by inode number before any open may then find no inode.
    b.open(f.ino).expect("first open at b");
    let mut rng = Rng(0x5eed_0053);
    for round in 0..200 {
        let bytes = round_contents(round, &mut rng);
        // b holds the file's attributes in its cache, as a reader that stats it does.
        let _ = b.getattr(f.ino).expect("getattr at b");
        a.setattr(
            f.ino,
            SetAttr {
                size: Some(0),
                ..SetAttr::default()
            },
        )
        .expect("truncate");
        a.write_buffered(f.ino, 0, &bytes).expect("write");
        a.flush(f.ino).expect("close");
        let written = a.getattr(f.ino).expect("getattr at a");
        // At once: no wait for b's feed or for b's member to deliver.
        let opened = b.open(f.ino).expect("open at b");
        assert_eq!(
            opened.size,
            bytes.len() as u64,
            "round {round}: size at open"
        );
        assert_eq!(opened.mtime, written.mtime, "round {round}: mtime at open");
        assert_eq!(
            b.getattr(f.ino).expect("getattr at b").size,
            bytes.len() as u64,
            "round {round}: a getattr after the open"
        );
        let read = b.read(f.ino, 0, 4 * CHUNK_SIZE).expect("read at b");
        assert!(read == bytes, "round {round}: the bytes read at b differ");
    }
    drop((a, b));
    cluster.stop_all();
}

/// `RemoteShards` to the cluster over its members' local sockets (`transport.local_socket_dir`
/// of the test cluster), or over TCP alone.
fn connect_local(cluster: &Cluster, local: bool) -> RemoteShards {
    let mut config = cluster.remote_config();
    config.local_socket_dir = local.then(|| cluster.socket_dir());
    connect_remote(config)
}

#[test]
fn t57_fs_a_files_local_reads_come_from_one_members_log_files_and_files_spread_over_members() {
    // A reader in order of one file reads one member's log files in order (which the kernel's
    // readahead follows), not every third chunk from each member's; different files spread.
    let cluster = cluster(57, "");
    let a = FileSystem::new(connect(&cluster, Some(1)), fs_config(1 << 40)).expect("client a");
    // Shared shards, as several file systems of one process hold them: through `Arc` too, the
    // attribute cache, the plans and the local reads are the shards' own.
    let b = FileSystem::new(
        std::sync::Arc::new(connect_local(&cluster, true)),
        fs_config(2 << 40),
    )
    .expect("client b");
    let root = Creds { uid: 0, gid: 0 };
    const FILES: usize = 8;
    const CHUNKS: u64 = 4;
    let bytes: Vec<u8> = (0..CHUNKS as usize * CHUNK_SIZE as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    let files: Vec<Ino> = (0..FILES)
        .map(|i| {
            let f = a
                .create(ROOT_INO, format!("f{i}").as_bytes(), 0o644, root)
                .expect("create")
                .ino;
            a.write(f, 0, &bytes).expect("write");
            a.flush(f).expect("close");
            f
        })
        .collect();
    let cache = b.shards().attr_cache().expect("b keeps a cache");
    // The member whose data directory a plan's files are in (`dataN`, by the test cluster).
    let member_of = |place: &derechofs_storage::backend::FilePlace| -> String {
        let rel = place
            .path
            .strip_prefix(cluster.path(""))
            .unwrap_or_else(|_| panic!("a plan names {:?}, outside the cluster", place.path));
        rel.components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .expect("a data directory")
    };
    // The space of the file system is asked of every member: this thread is then linked to
    // all three, so that each plan could come from any of them.
    b.statfs().expect("statfs");
    let mut used = std::collections::BTreeSet::new();
    for &f in &files {
        b.open(f).expect("open");
        let v = b.shards().namespace_version();
        wait_feed(b.shards(), v, "the open");
        // Reads until every chunk's plan is held (the first reads of a thread go through the
        // members while its local links are made).
        let deadline = Instant::now() + Duration::from_secs(10);
        let plans = loop {
            let got = b.read(f, 0, CHUNKS as u32 * CHUNK_SIZE).expect("read");
            assert!(got == bytes, "file {f}: the bytes read differ");
            let plans: Vec<_> = (0..CHUNKS).filter_map(|i| cache.plan(f, i)).collect();
            if plans.len() == CHUNKS as usize {
                break plans;
            }
            assert!(
                Instant::now() < deadline,
                "file {f}: plans of {} of {CHUNKS} chunks after 10 s: {:?}",
                plans.len(),
                b.shards().cache_stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let members: std::collections::BTreeSet<String> = plans
            .iter()
            .flat_map(|p| p.files.iter().map(&member_of))
            .collect();
        assert_eq!(
            members.len(),
            1,
            "file {f}: its chunks' plans name the files of {members:?}"
        );
        used.extend(members);
    }
    assert!(
        used.len() > 1,
        "the plans of {FILES} files all name one member's files: {used:?}"
    );
    drop((a, b));
    cluster.stop_all();
}

#[test]
fn t56_fs_extended_attributes_come_from_the_cache_until_another_client_changes_them() {
    let cluster = cluster(56, "");
    let (a, b) = two_clients(&cluster, 2);
    let f = plain_file(&a, ROOT_INO, b"f");
    wait_reported(&a, &b, "a's create");
    let cap = b"security.capability";
    let errno = |r: Result<Bytes, FsError>| r.map_err(|e| e.errno);

    // The kernel asks for the capability before every write: after the first, b answers it.
    assert_eq!(errno(b.getxattr(f.ino, cap)), Err(libc::ENODATA));
    let hits = b.shards().cache_stats().hits;
    for i in 0..8u64 {
        assert_eq!(errno(b.getxattr(f.ino, cap)), Err(libc::ENODATA));
        b.write_buffered(f.ino, i * 4096, &[7; 4096])
            .expect("buffered write");
    }
    assert_eq!(
        b.shards().cache_stats().hits,
        hits + 8,
        "every capability check between buffered writes came from b's cache"
    );
    b.flush(f.ino).expect("flush");
    // The size and mtime updates that the flushes send change the inode's record, not its
    // attributes: once the feed reported them, the checks still come from the cache.
    for i in 8..12u64 {
        b.write_buffered(f.ino, i * 4096, &[7; 4096])
            .expect("buffered write");
        b.flush(f.ino).expect("flush");
        wait_reported(&b, &b, "b's size update");
        let hits = b.shards().cache_stats().hits;
        assert_eq!(errno(b.getxattr(f.ino, cap)), Err(libc::ENODATA));
        assert_eq!(
            b.shards().cache_stats().hits,
            hits + 1,
            "the check after size update {i} came from b's cache"
        );
    }

    // a sets and removes attributes; b sees each once the feed reported it.
    a.setxattr(f.ino, b"user.k", b"v1", 0).expect("setxattr");
    a.setxattr(f.ino, cap, b"c", 0)
        .expect("setxattr capability");
    wait_reported(&a, &b, "a's setxattr");
    assert_eq!(errno(b.getxattr(f.ino, cap)), Ok(Bytes::from_static(b"c")));
    assert_eq!(
        errno(b.getxattr(f.ino, b"user.k")),
        Ok(Bytes::from_static(b"v1"))
    );
    let hits = b.shards().cache_stats().hits;
    assert_eq!(
        errno(b.getxattr(f.ino, b"user.k")),
        Ok(Bytes::from_static(b"v1"))
    );
    assert_eq!(b.shards().cache_stats().hits, hits + 1, "cached");
    a.removexattr(f.ino, b"user.k").expect("removexattr");
    wait_reported(&a, &b, "a's removexattr");
    assert_eq!(errno(b.getxattr(f.ino, b"user.k")), Err(libc::ENODATA));

    // b's own change shows to b at once (read-your-writes), with no wait for its feed.
    assert_eq!(errno(b.getxattr(f.ino, b"user.k")), Err(libc::ENODATA));
    b.setxattr(f.ino, b"user.k", b"v2", 0)
        .expect("b's setxattr");
    assert_eq!(
        errno(b.getxattr(f.ino, b"user.k")),
        Ok(Bytes::from_static(b"v2"))
    );
    b.removexattr(f.ino, cap).expect("b's removexattr");
    assert_eq!(errno(b.getxattr(f.ino, cap)), Err(libc::ENODATA));
    drop((a, b));
    cluster.stop_all();
}

#[test]
fn t54_fs_reads_on_a_members_machine_come_from_its_log_files_and_see_each_close_at_the_next_open() {
    // Client a writes; client b, linked to the members over local sockets, reads the file's
    // bytes from the members' log files by each chunk's plan (local reads); client c, over TCP
    // alone, reads through the members. Every read equals what was written; b sees its own
    // writes at once and a's changes at its next open.
    let cluster = cluster(54, "");
    let a = FileSystem::new(connect(&cluster, Some(1)), fs_config(1 << 40)).expect("client a");
    let b = FileSystem::new(connect_local(&cluster, true), fs_config(2 << 40)).expect("client b");
    let c = FileSystem::new(connect_local(&cluster, false), fs_config(3 << 40)).expect("client c");
    let root = Creds { uid: 0, gid: 0 };
    let f = a.create(ROOT_INO, b"f", 0o644, root).expect("create").ino;
    // Three chunks and a part, over both data shards.
    let mut want: Vec<u8> = (0..3 * CHUNK_SIZE + 1000)
        .map(|i| (i % 253) as u8)
        .collect();
    a.write(f, 0, &want).expect("write");
    a.flush(f).expect("close");

    let read_all = |fs: &FileSystem<RemoteShards>, what: &str| -> Vec<u8> {
        let got = fs.read(f, 0, 8 * CHUNK_SIZE).expect(what).to_vec();
        // And a few ranges across chunk edges.
        for (offset, len) in [(100u64, 50u32), (4090, 20), (8000, 5000), (12_200, 100)] {
            let part = fs.read(f, offset, len).expect(what);
            let from = (offset as usize).min(got.len());
            let to = (offset as usize + len as usize).min(got.len());
            assert!(part == got[from..to], "{what}: {offset}+{len}");
        }
        got
    };
    let local_reads = |fs: &FileSystem<RemoteShards>| fs.shards().cache_stats().local_reads;
    // Every round of reads returns what was written; within a bounded time a whole round is
    // local (until then a read may go through the members: one still marked down since the
    // cluster started, or local reads resting after a plan read that failed meanwhile).
    let reads_become_local = |fs: &FileSystem<RemoteShards>, want: &[u8], what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = local_reads(fs);
            assert!(read_all(fs, what) == want, "{what}");
            if local_reads(fs) == before + 5 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no round of reads was all local: {:?}",
                fs.shards().cache_stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // b opens the file; once its feed caught up with the open's version, reads are local.
    let open_and_wait = |fs: &FileSystem<RemoteShards>| {
        fs.open(f).expect("open");
        let v = fs.shards().namespace_version();
        wait_feed(fs.shards(), v, "the open");
    };
    open_and_wait(&b);
    assert!(read_all(&b, "b's first reads") == want, "b's first reads");
    reads_become_local(&b, &want, "b's reads");
    open_and_wait(&c);
    assert!(read_all(&c, "c's reads") == want, "c's reads");
    assert_eq!(
        local_reads(&c),
        0,
        "c has no member on its machine's sockets"
    );

    // b's own write: seen by its next read.
    b.write(f, 5000, b"own bytes").expect("b's write");
    want[5000..5009].copy_from_slice(b"own bytes");
    assert!(
        read_all(&b, "b after its write") == want,
        "b after its write"
    );

    // a overwrites, grows, then shrinks the file: b sees each at its next open.
    for (offset, bytes, size) in [
        (10u64, vec![7u8; 6000], None),
        (3 * u64::from(CHUNK_SIZE) + 500, vec![9u8; 3000], None),
        (0, vec![], Some(6000u64)),
    ] {
        open_and_wait(&a);
        if !bytes.is_empty() {
            a.write(f, offset, &bytes).expect("a's write");
            let end = offset as usize + bytes.len();
            if want.len() < end {
                want.resize(end, 0);
            }
            want[offset as usize..end].copy_from_slice(&bytes);
        }
        if let Some(size) = size {
            let set = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            a.setattr(f, set).expect("truncate");
            want.truncate(size as usize);
        }
        a.flush(f).expect("a's close");
        open_and_wait(&b);
        assert!(
            read_all(&b, "b after a's change") == want,
            "b after a's change"
        );
        reads_become_local(&b, &want, "b's reads after a's change");
    }
    assert_eq!(b.shards().cache_stats().local_failures, 0);
    drop((a, b, c));
    cluster.stop_all();
}

/// The versions delivered and persisted on each member, per shard, from `derechofs status`:
/// `(shard name, delivered, persisted here)` for every row (`namespace/0`, `data/1`, …).
fn persisted_rows(cluster: &Cluster) -> Vec<(String, Option<u64>, Option<u64>)> {
    fn version(text: &str) -> Option<u64> {
        let (view, seq) = text.split_once('.')?;
        Some((view.parse::<u64>().ok()? << 32) | seq.parse::<u64>().ok()?)
    }
    let run = cluster.status(&cluster.contacts());
    let rows: Vec<_> = run
        .stdout
        .lines()
        .filter_map(|line| {
            let at = line.find("namespace/").or_else(|| line.find("data/"))?;
            let name = line[at..].split_whitespace().next()?.to_string();
            let mut after = line[at..].split_once(']')?.1.split_whitespace();
            let delivered = version(after.next()?);
            let persisted = version(after.next()?);
            Some((name, delivered, persisted))
        })
        .collect();
    assert_eq!(rows.len(), 3 * 3, "a row per member and shard: {run:?}");
    rows
}

#[test]
fn t58_fs_a_sync_clients_operations_and_a_dirsync_clients_namespace_operations_are_durable_when_answered(
) {
    // The nodes sync at most every 2 s: an answer given at delivery would come before the
    // versions are persisted, which the rows below would show.
    let cluster = cluster(58, "[persistence]\npolicy = \"batch\"\nbatch_ms = 2000\n");
    let root = Creds { uid: 0, gid: 0 };
    // `dirsync`: names, directories and attributes durable before the answer.
    let mut config = cluster.remote_config();
    config.durable_namespace = true;
    let a = FileSystem::new(connect_remote(config), fs_config(1 << 40)).expect("client a");
    for i in 0..3 {
        a.mkdir(ROOT_INO, format!("d{i}").as_bytes(), 0o755, root)
            .expect("mkdir");
        let version = a
            .shards()
            .namespace_version()
            .expect("a wrote the namespace");
        for (name, _, persisted) in persisted_rows(&cluster) {
            if name.starts_with("namespace/") {
                assert!(
                    persisted >= Some(version),
                    "mkdir {i} answered at {version:#x}, persisted {persisted:?} on a member"
                );
            }
        }
    }
    drop(a);
    // `sync`: file data too. Nobody else writes, so every version delivered is this client's.
    let mut config = cluster.remote_config();
    config.durable_writes = true;
    let b = FileSystem::new(connect_remote(config), fs_config(2 << 40)).expect("client b");
    let f = b.create(ROOT_INO, b"f", 0o644, root).expect("create").ino;
    for i in 0..3u8 {
        b.write(f, u64::from(i) * u64::from(CHUNK_SIZE), &[i; 100])
            .expect("write");
        b.flush(f).expect("close");
        for (name, delivered, persisted) in persisted_rows(&cluster) {
            assert!(
                persisted >= delivered,
                "write {i}: {name} delivered {delivered:?}, persisted {persisted:?} on a member"
            );
        }
    }
    drop(b);
    cluster.stop_all();
}
