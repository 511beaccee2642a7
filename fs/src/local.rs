//! Local reads: a client on the same machine as a member of a data shard reads file bytes from
//! that member's log files itself, by the chunk's plan ([`ChunkPlan`], docs/ARCHITECTURE.md,
//! "Local reads"), instead of asking the member for them.
//!
//! Only the files a plan names are opened, read-only, each checked to be the file the member
//! meant (its device and inode numbers): a path that names another file now is never read. Any
//! failure to open or read makes the caller read through the member as before.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use derechofs_storage::backend::FilePlace;

use crate::chunk::ChunkPlan;

/// Most log files held open for local reads; when full, all are closed and opened again as
/// needed (a member's segments are large, so a working set is a few files).
pub const LOCAL_FILES_MAX: usize = 64;
/// Every file held open is closed this long after the first of them was opened, and opened
/// again when next needed: a segment the member trimmed (deleted) meanwhile then stops holding
/// its disk space through this client (at most [`LOCAL_FILES_MAX`] 64 MiB segments, for this
/// long), and its plans fail over to the member and are asked again.
pub const LOCAL_FILES_KEPT: Duration = Duration::from_secs(30);

/// How long local reads rest after one failed or a member had no plan to give: the reads go
/// through the members meanwhile, so a client whose local reads cannot work (files it may not
/// open, a member that keeps no files) does not pay a plan read before every read.
pub const LOCAL_REST: Duration = Duration::from_secs(2);

/// Whether `path` ends in the name of a log's segment (`seg-XXXXXXXX.log`) or base file
/// (`base-XXXXXXXXXXXXXXXX.log`), the only files a plan may name: a member is trusted with the
/// data it serves, but not to have this client read its other files.
pub fn is_log_file_name(path: &std::path::Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    match name.strip_suffix(".log") {
        Some(stem) => match (stem.strip_prefix("seg-"), stem.strip_prefix("base-")) {
            (Some(seq), _) => hex(seq, 8),
            (_, Some(version)) => hex(version, 16),
            _ => false,
        },
        None => false,
    }
}

/// The log files a client holds open for local reads.
#[derive(Debug, Default)]
pub struct LocalFiles {
    open: Mutex<OpenFiles>,
    /// Local reads are not tried before this time ([`LOCAL_REST`]).
    rest_until: Mutex<Option<Instant>>,
}

/// The files open, and when the first of them was opened.
#[derive(Debug, Default)]
struct OpenFiles {
    files: HashMap<FilePlace, Arc<File>>,
    since: Option<Instant>,
}

impl LocalFiles {
    /// No file open yet.
    pub fn new() -> LocalFiles {
        LocalFiles::default()
    }

    fn lock(&self) -> MutexGuard<'_, OpenFiles> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file `place` names, opened read-only if it is not yet, and checked to be that file.
    fn file(&self, place: &FilePlace) -> io::Result<Arc<File>> {
        {
            let mut open = self.lock();
            if open.since.is_some_and(|t| t.elapsed() >= LOCAL_FILES_KEPT) {
                open.files.clear();
                open.since = None;
            }
            if let Some(f) = open.files.get(place) {
                return Ok(f.clone());
            }
        }
        if !is_log_file_name(&place.path) {
            return Err(io::Error::other(format!(
                "{} is not named as a log file",
                place.path.display()
            )));
        }
        let file = File::open(&place.path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other(format!(
                "{} is not a regular file",
                place.path.display()
            )));
        }
        if meta.dev() != place.dev || meta.ino() != place.ino {
            return Err(io::Error::other(format!(
                "{} is not the file the member named (device {:#x} inode {}, not {:#x} {})",
                place.path.display(),
                meta.dev(),
                meta.ino(),
                place.dev,
                place.ino
            )));
        }
        let file = Arc::new(file);
        let mut open = self.lock();
        if open.files.len() >= LOCAL_FILES_MAX {
            open.files.clear();
            open.since = None;
        }
        open.since.get_or_insert_with(Instant::now);
        open.files.insert(place.clone(), file.clone());
        Ok(file)
    }

    /// Bytes `offset..offset + want` of the chunk `plan` describes, cut at its length, read
    /// from the files it names.
    pub fn read(&self, plan: &ChunkPlan, offset: u32, want: u32) -> io::Result<Bytes> {
        plan.read(offset, want, |file, at, buf| {
            let place = plan
                .files
                .get(file as usize)
                .ok_or_else(|| io::Error::other("a plan piece names no file"))?;
            self.file(place)?.read_exact_at(buf, at)
        })
    }

    /// Local reads rest for [`LOCAL_REST`] from now.
    pub fn rest(&self) {
        *self.rest_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + LOCAL_REST);
    }

    /// Whether local reads rest now.
    pub fn resting(&self) -> bool {
        let mut until = self.rest_until.lock().unwrap_or_else(|e| e.into_inner());
        match *until {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *until = None;
                false
            }
            None => false,
        }
    }

    /// Closes every file (a member's files may have been replaced).
    pub fn close_all(&self) {
        let mut open = self.lock();
        open.files.clear();
        open.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::PlanPiece;

    fn place_of(path: &std::path::Path) -> FilePlace {
        let meta = std::fs::metadata(path).unwrap();
        FilePlace {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    #[test]
    fn a_plan_reads_its_pieces_from_the_files_with_zeros_between_and_stops_at_its_length() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            dir.path().join("seg-00000001.log"),
            dir.path().join("base-00000001000000a2.log"),
        );
        std::fs::write(&a, b"0123456789").unwrap();
        std::fs::write(&b, b"abcdefghij").unwrap();
        let plan = ChunkPlan {
            len: 12,
            files: vec![place_of(&a), place_of(&b)],
            pieces: vec![
                PlanPiece {
                    at: 1,
                    len: 3,
                    file: 0,
                    offset: 5,
                },
                PlanPiece {
                    at: 6,
                    len: 4,
                    file: 1,
                    offset: 2,
                },
            ],
        };
        plan.check().unwrap();
        let files = LocalFiles::new();
        assert_eq!(
            &files.read(&plan, 0, 100).unwrap()[..],
            b"\x00567\x00\x00cdef\x00\x00"
        );
        assert_eq!(&files.read(&plan, 2, 5).unwrap()[..], b"67\0\0c");
        assert_eq!(&files.read(&plan, 12, 5).unwrap()[..], b"");
    }

    /// A plan of a 4-byte chunk: the first 4 bytes of `place`.
    fn four_bytes_of(place: FilePlace) -> ChunkPlan {
        ChunkPlan {
            len: 4,
            files: vec![place],
            pieces: vec![PlanPiece {
                at: 0,
                len: 4,
                file: 0,
                offset: 0,
            }],
        }
    }

    #[test]
    fn a_file_that_is_not_the_one_named_or_not_named_as_a_log_file_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("passwd");
        std::fs::write(&other, b"secret").unwrap();
        let plan = four_bytes_of(place_of(&other));
        let err = LocalFiles::new().read(&plan, 0, 4).unwrap_err();
        assert!(err.to_string().contains("not named as a log file"), "{err}");
        for bad in [
            "seg-1.log",
            "seg-0000000g.log",
            "base-00.log",
            "seg-00000001.logx",
            "x",
        ] {
            assert!(!is_log_file_name(std::path::Path::new(bad)), "{bad}");
        }
        let a = dir.path().join("seg-0000abcd.log");
        std::fs::write(&a, b"0123456789").unwrap();
        let mut place = place_of(&a);
        // The name now names another file.
        std::fs::remove_file(&a).unwrap();
        std::fs::write(dir.path().join("other"), b"x").unwrap();
        std::fs::write(&a, b"9876543210").unwrap();
        if place_of(&a).ino == place.ino {
            place.ino += 1;
        }
        let plan = four_bytes_of(place);
        let err = LocalFiles::new().read(&plan, 0, 4).unwrap_err();
        assert!(err.to_string().contains("not the file"), "{err}");
    }
}
