//! The ordering rules of runs of the write-back buffer that are on their way while the writer
//! goes on (`FileSystem::write_buffered_then`): read-your-writes, errors reported at the next
//! write, close and fsync, and size updates that never cover bytes not yet applied. Through the
//! facade over in-process shards, with a gate in front of them that holds chosen data writes.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use derechofs_fs::filesystem::WRITE_BUFFER_BYTES_MAX;
use derechofs_fs::op::{DataOp, NsOp, Op, Request};
use derechofs_fs::{
    Clock, Creds, FileSystem, FsConfig, FsError, FsLayout, FsResult, LocalShards, ReadAt, ShardRef,
    Shards, Space, ROOT_INO,
};

const T0: u64 = 1_800_000_000_000_000;
const CHUNK: u32 = 1 << 16;
const RUN: u64 = WRITE_BUFFER_BYTES_MAX as u64;

/// What the gate saw and does.
#[derive(Default)]
struct GateState {
    /// Data writes of chunks with an index below this wait while `holding`.
    hold_below: u64,
    holding: bool,
    /// Data writes fail with EIO.
    failing: bool,
    /// Chunk indices whose data writes were applied.
    applied: BTreeSet<u64>,
    /// Chunk indices whose data writes are waiting at the gate.
    waiting: BTreeSet<u64>,
    /// Each size update (`Written`) in arrival order, with whether every chunk below its end
    /// was applied when it arrived.
    sizes: Vec<(u64, bool)>,
    /// Reads that reached the shards while a data write was waiting.
    reads_while_held: u64,
}

/// In-process shards behind a gate.
struct Gated {
    inner: Arc<LocalShards>,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl Gated {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap()
    }

    fn wait_until(&self, cond: impl Fn(&GateState) -> bool) {
        let mut s = self.state();
        while !cond(&s) {
            s = self.changed.wait(s).unwrap();
        }
    }

    fn release(&self) {
        self.state().holding = false;
        self.changed.notify_all();
    }

    /// Lets `request` pass the gate; an error if the gate fails it.
    fn pass(&self, request: &Bytes) -> FsResult<()> {
        let Ok(r) = Request::decode(request) else {
            return Ok(());
        };
        let mut s = self.state();
        match r.op {
            Op::Data(DataOp::Write { index, .. }) => {
                if s.failing {
                    return Err(FsError::new(libc::EIO, "the gate fails data writes"));
                }
                if s.holding && index < s.hold_below {
                    s.waiting.insert(index);
                    self.changed.notify_all();
                    while s.holding {
                        s = self.changed.wait(s).unwrap();
                    }
                    s.waiting.remove(&index);
                }
                s.applied.insert(index);
            }
            Op::Ns(NsOp::Written { end, .. }) => {
                let chunks = end.div_ceil(u64::from(CHUNK));
                let covered = (0..chunks).all(|i| s.applied.contains(&i));
                s.sizes.push((end, covered));
            }
            _ => {}
        }
        self.changed.notify_all();
        Ok(())
    }

    fn saw_read(&self) {
        let mut s = self.state();
        if !s.waiting.is_empty() {
            s.reads_while_held += 1;
        }
    }
}

impl Shards for Gated {
    fn layout(&self) -> FsLayout {
        self.inner.layout()
    }
    fn submit(&self, shard: ShardRef, request: Bytes) -> FsResult<Bytes> {
        self.pass(&request)?;
        self.inner.submit(shard, request)
    }
    fn submit_versioned(&self, shard: ShardRef, request: Bytes) -> FsResult<(Bytes, Option<u64>)> {
        self.pass(&request)?;
        self.inner.submit_versioned(shard, request)
    }
    fn read(&self, shard: ShardRef, at: ReadAt, request: Bytes) -> FsResult<Bytes> {
        self.saw_read();
        self.inner.read(shard, at, request)
    }
    fn read_versioned(
        &self,
        shard: ShardRef,
        at: ReadAt,
        request: Bytes,
    ) -> FsResult<(Bytes, Option<u64>)> {
        self.saw_read();
        self.inner.read_versioned(shard, at, request)
    }
    fn now_us(&self) -> u64 {
        self.inner.now_us()
    }
    fn space(&self) -> FsResult<Space> {
        self.inner.space()
    }
}

fn config(client_base: u64) -> FsConfig {
    FsConfig {
        client_base,
        skew_max_us: 1_000_000,
        root_owner: Creds::default(),
        dir_attr_ttl_us: 0,
    }
}

/// A client behind a gate and a second client of the same shards.
fn clients() -> (Arc<FileSystem<Gated>>, FileSystem<Arc<LocalShards>>) {
    let inner = Arc::new(LocalShards::new(3, CHUNK, Clock::Manual(AtomicU64::new(T0))).unwrap());
    let gated = Gated {
        inner: inner.clone(),
        state: Mutex::new(GateState::default()),
        changed: Condvar::new(),
    };
    let writer = Arc::new(FileSystem::new(gated, config(1 << 32)).unwrap());
    let other = FileSystem::new(inner, config(2 << 32)).unwrap();
    (writer, other)
}

fn pattern(start: u64, len: u64) -> Vec<u8> {
    (start..start + len).map(|i| (i % 251) as u8 + 1).collect()
}

/// Writes `[start, start + RUN)` as two writes; the second fills the buffer and hands it off
/// (its acknowledgement is sent on `acked` before the run goes out).
fn write_run(fs: &FileSystem<Gated>, ino: u64, start: u64, acked: &mpsc::Sender<FsResult<()>>) {
    let data = pattern(start, RUN);
    let half = (RUN / 2) as usize;
    fs.write_buffered(ino, start, &data[..half]).unwrap();
    fs.write_buffered_then(ino, start + half as u64, &data[half..], |r| {
        acked.send(r).unwrap()
    });
}

#[test]
fn a_full_buffer_is_acknowledged_before_it_is_applied_and_a_read_of_the_file_waits_for_it() {
    let (fs, other) = clients();
    let f = fs.create(ROOT_INO, b"f", 0o644, Creds::default()).unwrap();
    {
        let mut s = fs.shards().state();
        s.hold_below = u64::MAX;
        s.holding = true;
    }
    let (acked, acks) = mpsc::channel();
    std::thread::scope(|scope| {
        let writer = fs.clone();
        scope.spawn(move || write_run(&writer, f.ino, 0, &acked));
        // The write returns while its run's data is held at the gate.
        acks.recv().unwrap().unwrap();
        fs.shards().wait_until(|s| !s.waiting.is_empty());
        let reader = fs.clone();
        let read = scope.spawn(move || {
            let size = reader.getattr(f.ino).unwrap().size;
            (size, reader.read(f.ino, RUN - 100, 100).unwrap())
        });
        // Give the reader the chance to overtake the run if it could.
        std::thread::sleep(std::time::Duration::from_millis(50));
        fs.shards().release();
        let (size, bytes) = read.join().unwrap();
        assert_eq!(size, RUN);
        assert_eq!(&bytes[..], &pattern(RUN - 100, 100)[..]);
    });
    assert_eq!(fs.shards().state().reads_while_held, 0);
    // Close returns once the run is applied: another client sees it all.
    fs.flush(f.ino).unwrap();
    assert_eq!(other.open(f.ino).unwrap().size, RUN);
    assert_eq!(
        &other.read(f.ino, 0, 4096).unwrap()[..],
        &pattern(0, 4096)[..]
    );
}

#[test]
fn a_later_runs_size_update_waits_for_every_earlier_run_so_no_size_covers_a_hole() {
    let (fs, other) = clients();
    let f = fs.create(ROOT_INO, b"f", 0o644, Creds::default()).unwrap();
    {
        let mut s = fs.shards().state();
        // The first run's chunks are held; the second run's go through at once.
        s.hold_below = RUN / u64::from(CHUNK);
        s.holding = true;
    }
    let (acked, acks) = mpsc::channel();
    std::thread::scope(|scope| {
        let (w1, a1) = (fs.clone(), acked.clone());
        scope.spawn(move || write_run(&w1, f.ino, 0, &a1));
        acks.recv().unwrap().unwrap();
        fs.shards().wait_until(|s| !s.waiting.is_empty());
        // The next run follows the first one without waiting for it.
        let (w2, a2) = (fs.clone(), acked.clone());
        scope.spawn(move || write_run(&w2, f.ino, RUN, &a2));
        acks.recv().unwrap().unwrap();
        let second: Vec<u64> = (RUN / u64::from(CHUNK)..2 * RUN / u64::from(CHUNK)).collect();
        fs.shards()
            .wait_until(|s| second.iter().all(|i| s.applied.contains(i)));
        // Give the second run the chance to send its size update if it could.
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Meanwhile another client sees no size past the first run's held bytes.
        assert_eq!(other.open(f.ino).unwrap().size, 0);
        fs.shards().release();
    });
    fs.flush(f.ino).unwrap();
    let sizes = fs.shards().state().sizes.clone();
    assert_eq!(sizes, vec![(RUN, true), (2 * RUN, true)]);
    assert_eq!(other.open(f.ino).unwrap().size, 2 * RUN);
    assert_eq!(
        &other.read(f.ino, RUN - 50, 100).unwrap()[..],
        &pattern(RUN - 50, 100)[..]
    );
}

#[test]
fn an_error_of_a_handed_off_buffer_is_returned_by_the_next_write_and_by_close_and_fsync() {
    let (fs, other) = clients();
    let f = fs.create(ROOT_INO, b"f", 0o644, Creds::default()).unwrap();
    fs.shards().state().failing = true;
    let (acked, acks) = mpsc::channel();
    // The write that filled the buffer was accepted; its send failed afterwards.
    write_run(&fs, f.ino, 0, &acked);
    acks.recv().unwrap().unwrap();
    fs.shards().state().failing = false;
    assert_eq!(
        fs.write_buffered(f.ino, RUN, b"x").unwrap_err().errno,
        libc::EIO
    );
    assert_eq!(fs.flush(f.ino).unwrap_err().errno, libc::EIO);
    // Reported once; no size covers the bytes that never arrived.
    fs.flush(f.ino).unwrap();
    assert_eq!(other.open(f.ino).unwrap().size, 0);
    // Again, reported by fsync this time.
    fs.shards().state().failing = true;
    write_run(&fs, f.ino, 0, &acked);
    acks.recv().unwrap().unwrap();
    fs.shards().state().failing = false;
    assert_eq!(fs.fsync_file(f.ino).unwrap_err().errno, libc::EIO);
    fs.fsync_file(f.ino).unwrap();
    // The file works again afterwards.
    fs.write(f.ino, 0, b"fine").unwrap();
    fs.flush(f.ino).unwrap();
    assert_eq!(&other.read(f.ino, 0, 4).unwrap()[..], b"fine");
}
