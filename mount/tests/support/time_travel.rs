//! Time travel through a mount, checked against a model: a random history of changes to a tree
//! (files written, overwritten, extended, truncated, renamed, removed; directories made, renamed,
//! removed; symbolic links), with the wall time taken after each step, then every recorded time
//! read back through `@T` paths and compared with what the tree was then.
//!
//! Shared by the FUSE tests of every kind of mount (in-memory shards, a cluster): `record` makes
//! the history through one mount, `check` reads it back through any mount of the same file
//! system, as often as wanted (a read at `T` never changes once answered).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Most bytes a file of the history grows to.
const FILE_LEN_MAX: usize = 3 << 20;
/// Pause after each step, so the next step's stamps are past the recorded time.
const STEP_PAUSE: Duration = Duration::from_millis(2);

/// What one path is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    File(Vec<u8>),
    Link(PathBuf),
}

/// A tree: relative path → node (the root is implied).
pub type Tree = BTreeMap<PathBuf, Node>;

/// The tree after each step and the time just after it (microseconds since the epoch).
#[derive(Debug, Default)]
pub struct History {
    /// A time before the history's directory was made.
    pub before: u64,
    pub steps: Vec<(u64, Tree)>,
}

/// xorshift64*: small, deterministic from the seed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let fill = self.next() as u8;
        let mut v: Vec<u8> = (0..n).map(|i| fill.wrapping_add((i * 7) as u8)).collect();
        // Some bytes that differ from step to step, so stale data shows.
        for _ in 0..n.min(16) {
            let i = self.below(n as u64) as usize;
            v[i] = self.next() as u8;
        }
        v
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after the epoch")
        .as_micros() as u64
}

fn dirs(tree: &Tree) -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = vec![PathBuf::new()];
    d.extend(
        tree.iter()
            .filter(|(_, n)| **n == Node::Dir)
            .map(|(p, _)| p.clone()),
    );
    d
}

fn files(tree: &Tree) -> Vec<PathBuf> {
    tree.iter()
        .filter(|(_, n)| matches!(n, Node::File(_)))
        .map(|(p, _)| p.clone())
        .collect()
}

/// Applies one random change through the mount at `root` and to the model.
fn step(root: &Path, tree: &mut Tree, rng: &mut Rng, n: usize) {
    let dirs = dirs(tree);
    let files = files(tree);
    match rng.below(10) {
        // New file.
        0 | 1 => {
            let dir = rng.pick(&dirs).expect("root").clone();
            let p = dir.join(format!("f{n}"));
            let len = match rng.below(4) {
                0 => 0,
                1 => rng.below(100) as usize,
                2 => rng.below(70_000) as usize,
                _ => rng.below(FILE_LEN_MAX as u64 / 2) as usize,
            };
            let data = rng.bytes(len);
            eprintln!("step {n}: create {} ({len} bytes)", p.display());
            std::fs::write(root.join(&p), &data).expect("create a file");
            tree.insert(p, Node::File(data));
        }
        // Overwrite or extend part of a file.
        2 | 3 => {
            let Some(p) = rng.pick(&files).cloned() else {
                return;
            };
            let Some(Node::File(data)) = tree.get_mut(&p) else {
                unreachable!()
            };
            let at = rng.below(data.len() as u64 + 5000) as usize;
            let len = 1 + rng.below(20_000) as usize;
            if at + len > FILE_LEN_MAX {
                return;
            }
            let piece = rng.bytes(len);
            eprintln!("step {n}: write {} at {at} ({len} bytes)", p.display());
            use std::io::{Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(root.join(&p))
                .expect("open for writing");
            f.seek(SeekFrom::Start(at as u64)).expect("seek");
            f.write_all(&piece).expect("write");
            drop(f);
            if data.len() < at + len {
                data.resize(at + len, 0);
            }
            data[at..at + len].copy_from_slice(&piece);
        }
        // Truncate (shorter or longer).
        4 => {
            let Some(p) = rng.pick(&files).cloned() else {
                return;
            };
            let Some(Node::File(data)) = tree.get_mut(&p) else {
                unreachable!()
            };
            let len = rng.below(data.len() as u64 * 2 + 10) as usize;
            eprintln!("step {n}: truncate {} to {len}", p.display());
            std::fs::OpenOptions::new()
                .write(true)
                .open(root.join(&p))
                .and_then(|f| f.set_len(len as u64))
                .expect("truncate");
            data.resize(len, 0);
        }
        // New directory.
        5 => {
            let dir = rng.pick(&dirs).expect("root").clone();
            let p = dir.join(format!("d{n}"));
            eprintln!("step {n}: mkdir {}", p.display());
            std::fs::create_dir(root.join(&p)).expect("mkdir");
            tree.insert(p, Node::Dir);
        }
        // Rename a file or a directory (into any directory not inside itself).
        6 => {
            let names: Vec<PathBuf> = tree.keys().cloned().collect();
            let Some(from) = rng.pick(&names).cloned() else {
                return;
            };
            let targets: Vec<PathBuf> = dirs
                .iter()
                .filter(|d| !d.starts_with(&from))
                .cloned()
                .collect();
            let Some(into) = rng.pick(&targets).cloned() else {
                return;
            };
            let to = into.join(format!("r{n}"));
            eprintln!("step {n}: rename {} to {}", from.display(), to.display());
            std::fs::rename(root.join(&from), root.join(&to)).expect("rename");
            let moved: Vec<(PathBuf, Node)> = tree
                .iter()
                .filter(|(p, _)| p.starts_with(&from))
                .map(|(p, node)| (p.clone(), node.clone()))
                .collect();
            for (p, node) in moved {
                tree.remove(&p);
                let rest = p.strip_prefix(&from).expect("prefix");
                // Joining an empty path would add a trailing slash.
                let moved_to = if rest.as_os_str().is_empty() {
                    to.clone()
                } else {
                    to.join(rest)
                };
                tree.insert(moved_to, node);
            }
        }
        // Remove a file, a link, or an empty directory.
        7 => {
            let names: Vec<PathBuf> = tree
                .iter()
                .filter(|(p, node)| {
                    **node != Node::Dir || !tree.keys().any(|q| q != *p && q.starts_with(p))
                })
                .map(|(p, _)| p.clone())
                .collect();
            let Some(p) = rng.pick(&names).cloned() else {
                return;
            };
            eprintln!("step {n}: remove {}", p.display());
            if tree[&p] == Node::Dir {
                std::fs::remove_dir(root.join(&p)).expect("rmdir");
            } else {
                std::fs::remove_file(root.join(&p)).expect("unlink");
            }
            tree.remove(&p);
        }
        // Symbolic link.
        8 => {
            let dir = rng.pick(&dirs).expect("root").clone();
            let p = dir.join(format!("l{n}"));
            let target = PathBuf::from(format!("target-{}", rng.below(1000)));
            eprintln!("step {n}: symlink {}", p.display());
            std::os::unix::fs::symlink(&target, root.join(&p)).expect("symlink");
            tree.insert(p, Node::Link(target));
        }
        // Append.
        _ => {
            let Some(p) = rng.pick(&files).cloned() else {
                return;
            };
            let Some(Node::File(data)) = tree.get_mut(&p) else {
                unreachable!()
            };
            let len = 1 + rng.below(5000) as usize;
            let piece = rng.bytes(len);
            if data.len() + piece.len() > FILE_LEN_MAX {
                return;
            }
            eprintln!("step {n}: append {} ({len} bytes)", p.display());
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(root.join(&p))
                .and_then(|mut f| f.write_all(&piece))
                .expect("append");
            data.extend_from_slice(&piece);
        }
    }
}

/// Makes `steps` random changes under `root/dir` (created first), from `seed`; returns the tree
/// under `dir` after each change, with the time just after it.
pub fn record(root: &Path, dir: &str, steps: usize, seed: u64) -> History {
    let base = root.join(dir);
    let mut history = History {
        before: now_us(),
        steps: Vec::new(),
    };
    std::thread::sleep(STEP_PAUSE);
    std::fs::create_dir(&base).expect("the history's directory");
    let mut rng = Rng::new(seed);
    let mut tree = Tree::new();
    std::thread::sleep(STEP_PAUSE);
    history.steps.push((now_us(), tree.clone()));
    for n in 0..steps {
        std::thread::sleep(STEP_PAUSE);
        step(&base, &mut tree, &mut rng, n);
        std::thread::sleep(STEP_PAUSE);
        history.steps.push((now_us(), tree.clone()));
    }
    history
}

/// Reads the tree under `dir` through the snapshot path `dir@T`.
pub fn read_tree(dir: &Path) -> std::io::Result<Tree> {
    fn walk(base: &Path, rel: &Path, out: &mut Tree) -> std::io::Result<()> {
        for e in std::fs::read_dir(base.join(rel))? {
            let e = e?;
            let p = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(base.join(&p))?;
            if m.is_dir() {
                out.insert(p.clone(), Node::Dir);
                walk(base, &p, out)?;
            } else if m.file_type().is_symlink() {
                out.insert(p.clone(), Node::Link(std::fs::read_link(base.join(&p))?));
            } else {
                let data = std::fs::read(base.join(&p))?;
                assert_eq!(
                    m.size(),
                    data.len() as u64,
                    "{}: size and bytes read",
                    p.display()
                );
                out.insert(p, Node::File(data));
            }
        }
        Ok(())
    }
    let mut t = Tree::new();
    walk(dir, Path::new(""), &mut t)?;
    Ok(t)
}

fn describe(t: &Tree) -> String {
    t.iter()
        .map(|(p, n)| match n {
            Node::Dir => format!("{}/", p.display()),
            Node::File(d) => format!("{} ({} bytes)", p.display(), d.len()),
            Node::Link(l) => format!("{} -> {}", p.display(), l.display()),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks every recorded time through `root` (any mount of the file system the history was made
/// in): the whole tree through `dir@T`, the root snapshot `@T/dir`, single files through
/// `file@T`, EROFS for a write into a snapshot, and ENOENT for `dir@T` before `dir` existed.
pub fn check(root: &Path, dir: &str, history: &History, seed: u64) {
    let mut rng = Rng::new(seed ^ 0xC0FFEE);
    for (i, (t, want)) in history.steps.iter().enumerate() {
        let stamp = format!("{t}us");
        let snap = root.join(format!("{dir}@{stamp}"));
        let got = read_tree(&snap)
            .unwrap_or_else(|e| panic!("seed {seed}: reading {} (step {i}): {e}", snap.display()));
        assert!(
            &got == want,
            "seed {seed}: {} (step {i}) differs from the model:\n got  {}\n want {}",
            snap.display(),
            describe(&got),
            describe(want)
        );
        // The same through the root's snapshot, for one step in four.
        if i % 4 == 0 {
            let via_root = root.join(format!("@{stamp}")).join(dir);
            let got = read_tree(&via_root).unwrap_or_else(|e| {
                panic!(
                    "seed {seed}: reading {} (step {i}): {e}",
                    via_root.display()
                )
            });
            assert!(&got == want, "seed {seed}: {} differs", via_root.display());
        }
        // One file read by its own snapshot name.
        let files = files(want);
        if let Some(p) = rng.pick(&files) {
            let name = format!(
                "{}@{stamp}",
                p.file_name().expect("a name").to_string_lossy()
            );
            let path = root.join(dir).join(p.parent().expect("parent")).join(name);
            // The live parent may since have been renamed or removed; then the name is absent.
            match std::fs::read(&path) {
                Ok(data) => assert!(
                    Some(&Node::File(data)) == want.get(p),
                    "seed {seed}: {} (step {i}) differs from the model",
                    path.display()
                ),
                Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{}: {e}", path.display()),
            }
        }
        // Snapshots are read-only.
        let err = std::fs::write(snap.join("new-file"), b"x").expect_err("a write into a snapshot");
        assert_eq!(
            err.raw_os_error(),
            Some(30),
            "EROFS expected in {}: {err}",
            snap.display()
        );
    }
    // Before the directory existed, its snapshot name is absent.
    let before = history.before;
    let err = std::fs::metadata(root.join(format!("{dir}@{before}us")))
        .expect_err("the directory before it existed");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}
