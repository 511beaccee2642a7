//! DerechoFS mounted for real on a three-node cluster: time travel through the mount (a random
//! history of changes, then every recorded time read back through `@T` paths and compared with
//! the model of `mount/tests/support/time_travel.rs`), identical through two mounts that read
//! through different nodes, and still identical after a node is killed; the mount's errors for an
//! unreachable cluster, a bad option and a missing mount point; close-to-open across two
//! mounts on different members (a write closed through one, then at once opened and read
//! through the other, round after round); what one mount's kernel keeps dropped when another
//! mount changes it (attributes, entries, renames, links); `O_DIRECT` descriptors, which read
//! the client's own writes before the close and show them through the other mount after it.
//!
//! Needs root and `/dev/fuse`, as CI has. Every process is stopped by its pid and every mount
//! unmounted when a test ends, failed or not; every wait is bounded. The seed is printed;
//! `DERECHOFS_SEED=N` replays one.

mod common;
#[path = "../../mount/tests/support/time_travel.rs"]
mod time_travel;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{is_mounted, Cluster, BIN};

/// Longest a mount may take to appear.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const STEPS: usize = 40;
/// Write-close-open-read rounds of the close-to-open test.
const ROUNDS: usize = 150;

/// `derechofs mount` in the foreground; unmounted and stopped by pid when dropped.
struct Mount {
    path: PathBuf,
    child: Option<Child>,
}

impl Mount {
    fn start(cluster: &Cluster, name: &str, contacts: &str, options: &str) -> Mount {
        let path = cluster.path(name);
        std::fs::create_dir(&path).expect("mount point");
        let log = std::fs::File::create(cluster.path(&format!("{name}.log"))).expect("log");
        // Linked to the members over their local sockets, as a mount beside its nodes is: its
        // reads of live files come from the members' log files (local reads).
        let child = Command::new(BIN)
            .args(["mount", contacts])
            .arg("--local-socket-dir")
            .arg(cluster.socket_dir())
            .arg(&path)
            .args(["-o", options])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start derechofs mount");
        let mut m = Mount {
            path,
            child: Some(child),
        };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(&m.path) {
            if let Some(Some(status)) = m.child.as_mut().map(|c| c.try_wait().expect("wait")) {
                panic!(
                    "the mount exited ({status}): {}",
                    std::fs::read_to_string(cluster.path(&format!("{name}.log")))
                        .unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "the mount did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A started three-node cluster (`extra` appended to every node's configuration) with mount
/// `a` linked to node 1 and mount `b` to node 2. Bound as `let (cluster, a, b) = …`, the mounts
/// go first when the test ends, failed or not, then the nodes (`Cluster`'s drop stops them).
fn two_mounts(test: u8, extra: &str) -> (Cluster, Mount, Mount) {
    let cluster = Cluster::new(test, 3, extra);
    cluster.start_all();
    cluster.wait_active();
    let a = Mount::start(&cluster, "a", &cluster.contacts_of(&[1]), "prefer=1");
    let b = Mount::start(&cluster, "b", &cluster.contacts_of(&[2]), "prefer=2");
    (cluster, a, b)
}

/// The next value of a xorshift generator (`x` never 0).
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn seed() -> u64 {
    let seed = std::env::var("DERECHOFS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(time_travel::now_us);
    eprintln!("seed {seed} (replay with DERECHOFS_SEED={seed})");
    seed
}

#[test]
fn time_travel_through_two_mounts_on_different_nodes_is_identical_and_survives_a_killed_node() {
    let seed = seed();
    let (cluster, a, b) = two_mounts(61, "suspect_after_ms = 2000\ntime_read_wait_ms = 5000\n");

    let history = time_travel::record(&a.path, "tree", STEPS, seed);
    time_travel::check(&a.path, "tree", &history, seed);
    time_travel::check(&b.path, "tree", &history, seed);

    cluster.kill(3);
    // The survivors are a majority: they change views and go on; the past reads the same.
    time_travel::check(&b.path, "tree", &history, seed);
    time_travel::check(&a.path, "tree", &history, seed);
    std::fs::write(b.path.join("tree/after-the-kill"), b"still writable").expect("a write");
    // Another client sees the change once its own member delivered it (docs/SEMANTICS.md,
    // "Read your writes"): mount a reads through node 1, which may deliver it a little after
    // node 2 answered mount b. Wait for it, bounded; never a different content.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::read(a.path.join("tree/after-the-kill")) {
            Ok(bytes) if bytes == b"still writable" => break,
            Ok(bytes) => assert!(
                bytes.is_empty() && std::time::Instant::now() < deadline,
                "the other mount read {bytes:?}, not the write, within 10 s"
            ),
            Err(e) => assert!(
                e.kind() == std::io::ErrorKind::NotFound && std::time::Instant::now() < deadline,
                "read through the other mount: {e}"
            ),
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn mount_refuses_an_unreachable_cluster_a_bad_option_and_a_missing_mount_point() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mnt");
    // A port nothing listens on: bound, then released.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run derechofs mount");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let m = mnt.to_str().expect("utf-8");
    let (code, err) = run(&["mount", &free, m, "-o", "connect_timeout_ms=300"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    let (code, err) = run(&["mount", &free, m, "-o", "ro,bogus"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown mount option `bogus`"), "{err}");
    let (code, err) = run(&["mount", &free, m, "-o", "atime"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("mount option `atime`: not supported"), "{err}");
    let missing = dir.path().join("missing");
    let (code, err) = run(&["mount", &free, missing.to_str().expect("utf-8")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn an_open_through_one_mount_after_a_close_through_another_returned_sees_the_new_size_and_bytes() {
    let seed = seed();
    // The writer and the reader on different members; the reader's kernel holds the file's
    // attributes from the stat of the round before (within LIVE_TTL), its client its cache.
    let (_cluster, a, b) = two_mounts(62, "");
    let (at_a, at_b) = (a.path.join("f"), b.path.join("f"));
    let mut x = seed | 1;
    for round in 0..ROUNDS {
        // Sizes from empty to several pages, growing and shrinking from round to round.
        let len = (xorshift(&mut x) % 20_000) as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (round * 31 + i * 7) as u8).collect();
        if round > 0 {
            let _ = std::fs::metadata(&at_b).expect("stat at b");
        }
        std::fs::write(&at_a, &bytes).expect("write and close at a");
        let mtime = std::fs::metadata(&at_a).expect("stat at a").modified().ok();
        let mut file = std::fs::File::open(&at_b).expect("open at b");
        let meta = file.metadata().expect("fstat at b");
        assert_eq!(
            meta.len(),
            len as u64,
            "round {round} (seed {seed}): size at b"
        );
        assert_eq!(
            meta.modified().ok(),
            mtime,
            "round {round} (seed {seed}): mtime at b"
        );
        let mut read = Vec::new();
        std::io::Read::read_to_end(&mut file, &mut read).expect("read at b");
        assert!(
            read == bytes,
            "round {round} (seed {seed}): {} bytes read at b, {len} written, or other bytes",
            read.len()
        );
    }
}

/// How long a change through one mount may take to show in the other's `stat` and lookups in
/// the test below: far below `KEPT_TTL` (60 s), so a kernel left holding what it was given
/// fails it.
const SHOWS_WITHIN: Duration = Duration::from_secs(20);

/// What `stat` at b tells of a path: absent, or its mode bits and size.
fn seen(path: &std::path::Path) -> Option<(u32, u64)> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| (m.permissions().mode() & 0o7777, m.len()))
}

#[test]
fn what_one_mounts_kernel_keeps_is_dropped_when_another_mount_changes_it() {
    let (_cluster, a, b) = two_mounts(63, "");
    std::fs::create_dir(a.path.join("d")).expect("mkdir at a");
    for name in ["mode", "gone", "moved", "grown", "d/inner", "linked"] {
        std::fs::write(a.path.join(name), b"0123456789").expect("create at a");
    }
    std::fs::hard_link(a.path.join("linked"), a.path.join("d/link")).expect("link at a");
    let names = [
        "mode", "gone", "moved", "grown", "d/inner", "linked", "d/link",
    ];
    // The names appear at b within the bound (negative lookups are not kept); then b's kernel
    // is given every entry and its attributes, twice (the second from its caches).
    let deadline = Instant::now() + SHOWS_WITHIN;
    while names.iter().any(|n| seen(&b.path.join(n)).is_none()) {
        assert!(Instant::now() < deadline, "the files never showed at b");
        std::thread::sleep(Duration::from_millis(20));
    }
    for n in names {
        assert_eq!(seen(&b.path.join(n)), Some((0o644, 10)), "{n} at b");
    }
    // Changes at a, each of an attribute, an entry or both.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(a.path.join("mode"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod at a");
    std::fs::remove_file(a.path.join("gone")).expect("unlink at a");
    std::fs::rename(a.path.join("moved"), a.path.join("d/moved")).expect("rename at a");
    std::fs::write(a.path.join("grown"), vec![7u8; 5000]).expect("write at a");
    std::fs::remove_file(a.path.join("d/inner")).expect("unlink in d at a");
    std::fs::write(a.path.join("d/inner"), b"x").expect("create again in d at a");
    // A link's count and ctime change: both names show it.
    std::fs::remove_file(a.path.join("linked")).expect("unlink of a linked name at a");
    let want: [(&str, Option<(u32, u64)>); 8] = [
        ("mode", Some((0o600, 10))),
        ("gone", None),
        ("moved", None),
        ("d/moved", Some((0o644, 10))),
        ("grown", Some((0o644, 5000))),
        ("d/inner", Some((0o644, 1))),
        ("linked", None),
        ("d/link", Some((0o644, 10))),
    ];
    let deadline = Instant::now() + SHOWS_WITHIN;
    loop {
        let got: Vec<_> = want.iter().map(|(n, _)| seen(&b.path.join(n))).collect();
        if want.iter().zip(&got).all(|((_, w), g)| w == g) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b still sees {got:?}, not {want:?}, {SHOWS_WITHIN:?} after the changes at a"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let nlink = |p: PathBuf| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.nlink()).ok()
    };
    let deadline = Instant::now() + SHOWS_WITHIN;
    while nlink(b.path.join("d/link")) != Some(1) {
        assert!(Instant::now() < deadline, "the link count at b stayed 2");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes of the file the `O_DIRECT` test writes, and the size of its pieces (page multiples, as
/// direct I/O asks).
const DIRECT_FILE_BYTES: usize = 64 << 12;
const DIRECT_PIECE_BYTES: usize = 4 << 12;

/// A buffer of `len` bytes at a page-aligned address, inside a vector it borrows from.
fn aligned(store: &mut Vec<u8>, len: usize) -> &mut [u8] {
    store.clear();
    store.resize(len + 4096, 0);
    let off = store.as_ptr().align_offset(4096);
    &mut store[off..off + len]
}

/// Opens `path` with `O_DIRECT` (and `O_CREAT` when `create`), for reading and writing.
fn open_direct(path: &std::path::Path, create: bool) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} with O_DIRECT: {e}", path.display()))
}

/// The whole of `file`, read with page-aligned reads (the file's size a page multiple).
fn read_direct(file: &std::fs::File, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut store = Vec::new();
    let buf = aligned(&mut store, len);
    let mut done = 0;
    while done < len {
        let n = file
            .read_at(&mut buf[done..], done as u64)
            .expect("direct read");
        assert!(n > 0, "direct read ended at {done} of {len} bytes");
        done += n;
    }
    buf.to_vec()
}

/// Writes a piece of random bytes from `next` at `at` of `file` with one direct write, and
/// records it in `want`, the reference.
fn write_direct_piece(
    file: &std::fs::File,
    at: usize,
    want: &mut [u8],
    next: &mut impl FnMut() -> u64,
) {
    use std::os::unix::fs::FileExt;
    let mut store = Vec::new();
    let buf = aligned(&mut store, DIRECT_PIECE_BYTES);
    for byte in buf.iter_mut() {
        *byte = next() as u8;
    }
    file.write_all_at(buf, at as u64)
        .unwrap_or_else(|e| panic!("direct write at {at}: {e}"));
    want[at..at + DIRECT_PIECE_BYTES].copy_from_slice(buf);
}

/// Asserts that `file`, read directly, is `want`, size and bytes.
fn assert_direct_holds(file: &std::fs::File, want: &[u8], what: &str) {
    assert_eq!(
        file.metadata().expect("fstat").len(),
        want.len() as u64,
        "{what}: size"
    );
    assert!(read_direct(file, want.len()) == want, "{what}: bytes");
}

#[test]
fn direct_io_through_a_cluster_mount_reads_its_own_writes_and_shows_them_elsewhere_after_close() {
    let seed = seed();
    let (_cluster, a, b) = two_mounts(64, "");
    let (at_a, at_b) = (a.path.join("direct"), b.path.join("direct"));
    // The reference: what the file holds after every write so far.
    let mut want = vec![0u8; DIRECT_FILE_BYTES];
    let mut x = seed | 1;
    let mut next = move || xorshift(&mut x);
    let writer = open_direct(&at_a, true);
    // The pieces in a shuffled order, so the writes are not one run.
    let pieces = DIRECT_FILE_BYTES / DIRECT_PIECE_BYTES;
    let mut order: Vec<usize> = (0..pieces).collect();
    for i in (1..pieces).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    for &piece in &order {
        write_direct_piece(&writer, piece * DIRECT_PIECE_BYTES, &mut want, &mut next);
    }
    // Before the writer closes, a second direct descriptor of the same client reads it all.
    let reader = open_direct(&at_a, false);
    assert_direct_holds(
        &reader,
        &want,
        &format!("seed {seed}: the client's own direct writes, read back before the close"),
    );
    drop(reader);
    drop(writer);
    // Closed: another mount, on another member, opens it and reads it all, directly.
    let at_other = open_direct(&at_b, false);
    assert_direct_holds(
        &at_other,
        &want,
        &format!("seed {seed}: at b after the close at a"),
    );
    // And back: a direct overwrite at b, fsynced and closed, is what a new open at a reads.
    let at = (next() as usize % pieces) * DIRECT_PIECE_BYTES;
    write_direct_piece(&at_other, at, &mut want, &mut next);
    at_other.sync_all().expect("fsync at b");
    drop(at_other);
    let again = open_direct(&at_a, false);
    assert_direct_holds(
        &again,
        &want,
        &format!("seed {seed}: at a after the overwrite at b was closed"),
    );
}

#[test]
fn derechofs_log_takes_its_cluster_from_a_mount_and_refuses_one_whose_source_is_a_name() {
    let cluster = Cluster::new(17, 3, "");
    cluster.start_all();
    cluster.wait_active();
    let plain = Mount::start(&cluster, "plain", &cluster.contacts(), "");
    std::fs::write(plain.path.join("f"), b"x").expect("write");
    let path = plain.path.join("f");
    let path = path.to_str().expect("utf-8");
    let socket_dir = cluster.socket_dir();
    let socket_dir = socket_dir.to_str().expect("utf-8");
    let run = cluster.run(&["log", "--local-socket-dir", socket_dir, path]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("regular"), "{run:?}");
    // Mounted with `fsname=`: the source shows the name, not the contacts, so the command
    // cannot know the cluster and says which path to give with --contacts.
    let named = Mount::start(&cluster, "named", &cluster.contacts(), "fsname=mydfs");
    let path = named.path.join("f");
    let path = path.to_str().expect("utf-8");
    let run = cluster.run(&["log", path]);
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("give the path from the root of its file system, `/f`, with --contacts"),
        "{run:?}"
    );
    let contacts = cluster.contacts();
    let run = cluster.run(&["log", "--contacts", &contacts, "/f"]);
    assert_eq!(run.code, 0, "{run:?}");
    drop((plain, named));
    cluster.stop_all();
}
