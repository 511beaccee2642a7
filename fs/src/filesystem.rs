//! The file system as a client sees it: a synchronous facade over [`Shards`] that the FUSE
//! adapter calls method by method, with `NAME@STAMP` snapshot resolution.
//!
//! Every method takes inode numbers as the kernel does. A live inode is read at the latest
//! state; a snapshot inode (top bit set, [`crate::snapshot`]) is read at its time in every shard
//! it touches, and refuses changes with EROFS. Writes send the data to the data shards first and
//! then the new size to the namespace shard (close-to-open, DESIGN §4), so that a reader who sees
//! the size also sees the bytes.
//!
//! [`FileSystem::write_buffered`] keeps contiguous writes to a file in a bounded write-back
//! buffer ([`WRITE_BUFFER_BYTES_MAX`] per file, [`WRITE_BUFFERS_MAX`] files) and sends them at
//! the next [`FileSystem::flush`] (close), [`FileSystem::fsync_file`], when the buffer is full or
//! a write is not contiguous, and before any other operation of this client on the file (read,
//! getattr, setattr, lookup, unlink, rename, link; not the reading of a stored xattr, which no
//! buffered write changes and which the kernel does before every write): one data request per
//! chunk piece, the data shards in parallel, then one size update. An error of a deferred send is returned by the call
//! that triggered it and again at the next flush or fsync of the file (as NFS does).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use derechofs_core::kv::ReadAt;
use derechofs_storage::Hlc;

use crate::chunk::placement;
use crate::error::{FsError, FsResult};
use crate::inode::{Attr, FileKind, Ino, FILE_SIZE_MAX, NAME_LEN_MAX, ROOT_INO};
use crate::local::LocalFiles;
use crate::namespace::VIRTUAL_XATTR_PREFIX;
use crate::op::{
    decode_read_reply, Creds, DataOp, DataRead, DataReply, DirEntry, HistoryEntry, NsOp, NsRead,
    NsReply, Op, ReadReply, Reply, Request, SetAttr, READDIR_ENTRIES_MAX, XATTR_VALUE_LEN_MAX,
};
use crate::shards::{FsLayout, ShardRef, Shards, Space};
use crate::snapshot::{is_snapshot, snapshot_stamp, split_snapshot, SnapshotTable};
use crate::time::format_rfc3339;
use crate::{fs_bail, fs_err};

/// The virtual extended attribute that lists the times and versions at which an inode changed.
pub const HISTORY_XATTR: &[u8] = b"user.derechofs.history";
/// Most requests one [`FileSystem`] has in flight at once (each uses its own client id).
pub const CLIENT_SLOTS_MAX: u64 = 64;
/// The default allowed clock skew: a snapshot time later than now plus this is ENOENT.
pub const SKEW_MAX_US_DEFAULT: u64 = 1_000_000;

/// Most bytes one file's write-back buffer holds; a buffer that reaches it is sent.
pub const WRITE_BUFFER_BYTES_MAX: usize = 8 << 20;
/// Most files with buffered writes at once; a new one past this sends another file's buffer.
pub const WRITE_BUFFERS_MAX: usize = 64;
/// Most bytes of full write-back buffers one client has on their way at once (sent while the
/// writes after them go on, [`FileSystem::write_buffered_then`]); a buffer that fills past this
/// waits, before its write is acknowledged, until earlier ones have been applied.
pub const WRITE_BACK_IN_FLIGHT_BYTES_MAX: usize = 3 * WRITE_BUFFER_BYTES_MAX;
/// Data operations in flight at once from one `data_many` call (half the client ids, so other
/// callers keep some).
const DATA_WAVE_MAX: usize = (CLIENT_SLOTS_MAX / 2) as usize;
/// Most reads one `read` call has in flight at once (the attributes and chunk pieces); a longer
/// read goes out in groups of this many.
pub const READS_IN_FLIGHT_MAX: usize = 16;
/// Most deferred-write errors kept for files not yet flushed (past this, an error is only
/// returned to the call that triggered the send).
const WRITE_ERRORS_MAX: usize = 4096;
/// Times a request is resent while its shard answers `Retry` (each version it reached was full)
/// before the operation fails with EAGAIN.
pub const RETRIES_MAX: u64 = 1000;
/// Pause before the third sending of a request answered `Retry`, growing by as much with each
/// further one up to [`RETRY_PAUSE_MAX_MS`] (the second goes at once).
pub const RETRY_PAUSE_MS: u64 = 1;
/// Longest pause between two sendings of a request answered `Retry`.
pub const RETRY_PAUSE_MAX_MS: u64 = 20;

/// The default for [`FsConfig::dir_attr_ttl_us`]: the kernel's attribute cache lifetime of live
/// inodes at the mount (1 s).
pub const DIR_ATTR_TTL_US_DEFAULT: u64 = 1_000_000;

/// Directory attributes a change of entries returned ([`NsReply::Entries`]), kept to answer the
/// next `getattr` of each directory (once) within [`FsConfig::dir_attr_ttl_us`].
#[derive(Debug, Default)]
struct DirAttrs {
    /// Counts the namespace changes this client started; a reply's directories are kept only if
    /// no other change started after it, so that no kept attributes miss a change of this client.
    started: u64,
    /// At most [`crate::op::ENTRY_DIRS_MAX`]: the directories of the last change, with when the
    /// reply came.
    entries: Vec<(Attr, std::time::Instant)>,
}

/// Buffered bytes of one file: a contiguous run from `start`.
#[derive(Debug)]
struct Run {
    start: u64,
    data: BytesMut,
}

/// The runs of one file on their way to the shards.
#[derive(Debug, Default)]
struct Flight {
    /// Runs being sent.
    sending: u32,
    /// The number the next run of the file gets.
    next: u64,
    /// Runs (in number order) whose size update is done or given up: run `n` sends its size
    /// update only once this is `n`, so no size covers a run whose data is not applied yet.
    sized: u64,
    /// A run of this flight failed: the later ones send no size update (it would cover a hole).
    failed: bool,
    /// End of the last run started: a write there may be buffered while the runs are on their
    /// way (it comes after all of them); any other write waits until they are applied.
    end: u64,
}

/// The write-back state of a client.
#[derive(Debug, Default)]
struct WriteBack {
    runs: HashMap<Ino, Run>,
    /// Files with runs on their way; an entry is removed once its last run is done.
    flights: HashMap<Ino, Flight>,
    /// Bytes of all runs on their way (at most about [`WRITE_BACK_IN_FLIGHT_BYTES_MAX`]).
    bytes_in_flight: usize,
    /// Errors of deferred sends, reported at the file's next write, flush or fsync.
    errors: HashMap<Ino, FsError>,
}

impl WriteBack {
    /// Keeps the first unreported error of a file.
    fn remember(&mut self, ino: Ino, e: &FsError) {
        if self.errors.len() < WRITE_ERRORS_MAX || self.errors.contains_key(&ino) {
            self.errors.entry(ino).or_insert_with(|| e.clone());
        }
    }

    /// Whether `ino` has writes of this client not yet applied.
    fn pending(&self, ino: Ino) -> bool {
        self.runs.contains_key(&ino) || self.flights.contains_key(&ino)
    }

    /// Starts sending `len` bytes of `ino` ending at `end`: the run's number.
    fn begin(&mut self, ino: Ino, len: usize, end: u64) -> u64 {
        let f = self.flights.entry(ino).or_default();
        let n = f.next;
        f.next += 1;
        f.sending += 1;
        f.end = end;
        self.bytes_in_flight += len;
        n
    }
}

/// Settings of a [`FileSystem`].
#[derive(Clone, Debug)]
pub struct FsConfig {
    /// Base of the client ids this file system uses (`base..base + CLIENT_SLOTS_MAX`); must be
    /// unique among the clients running at once (a random 64-bit value is). A request's number
    /// is the client's clock in microseconds, or one more than the slot's last if that is
    /// higher, so a client restarted later with the same ids numbers above what it sent before.
    pub client_base: u64,
    /// A snapshot time later than the client's clock plus this gives ENOENT.
    pub skew_max_us: u64,
    /// Owner of the root directory if this client creates it.
    pub root_owner: Creds,
    /// For how long (µs) the attributes of a directory returned with a change of its entries
    /// by this client answer the next `getattr` of that directory, instead of a read of the
    /// cluster; 0 never. [`DIR_ATTR_TTL_US_DEFAULT`] equals the kernel's attribute cache
    /// lifetime, the staleness the mount allows already (docs/SEMANTICS.md).
    pub dir_attr_ttl_us: u64,
}

/// The modes of `fallocate(2)` the file system supports; any other is EOPNOTSUPP at the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallocate {
    /// Mode 0: the file is at least `offset + len` bytes long afterwards; new bytes read as
    /// zeros (a hole: no space is reserved).
    Allocate,
    /// `FALLOC_FL_KEEP_SIZE`: nothing changes (no space is reserved ahead of writes).
    KeepSize,
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: the bytes of the range inside the file read
    /// as zeros afterwards; the size stays.
    PunchHole,
}

/// `statfs` numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    /// Bytes in all.
    pub total_bytes: u64,
    /// Bytes free.
    pub free_bytes: u64,
    /// Inode numbers used.
    pub inodes: u64,
    /// Inode numbers left.
    pub inodes_free: u64,
    /// Preferred I/O size: the chunk size.
    pub block_size: u32,
    /// Longest name.
    pub name_len_max: u32,
}

/// Where an inode is read: its live number and the state it is read at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct View {
    ino: Ino,
    at: Option<Hlc>,
}

impl View {
    fn read_at(self) -> ReadAt {
        match self.at {
            None => ReadAt::Latest,
            Some(t) => ReadAt::Time(t),
        }
    }
}

/// The file system over a set of shards.
#[derive(Debug)]
pub struct FileSystem<S: Shards> {
    shards: S,
    layout: FsLayout,
    config: FsConfig,
    /// Free client slots: `(client id, last request number)`.
    slots: Mutex<Vec<(u64, u64)>>,
    /// Signalled when a slot is returned.
    slot_free: Condvar,
    snapshots: Mutex<SnapshotTable>,
    /// Buffered writes and the runs on their way.
    write_back: Mutex<WriteBack>,
    /// Signalled when a run on its way is done.
    run_done: Condvar,
    /// Directory attributes returned by the last change of entries.
    dir_attrs: Mutex<DirAttrs>,
    /// Log files of members on this machine, open for local reads.
    local: LocalFiles,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn bad_reply(e: impl std::fmt::Display) -> FsError {
    fs_err!(libc::EIO, "a shard answered what is not a reply: {e}")
}

impl<S: Shards> FileSystem<S> {
    /// The file system over `shards`; creates the root directory if the cluster has none.
    pub fn new(shards: S, config: FsConfig) -> FsResult<FileSystem<S>> {
        let layout = shards.layout();
        crate::chunk::check_chunk_size(layout.chunk_size)
            .map_err(|e| fs_err!(libc::EINVAL, "{e}"))?;
        if layout.data_shards == 0 {
            fs_bail!(libc::EINVAL, "a layout needs at least one data shard");
        }
        let slots = (0..CLIENT_SLOTS_MAX)
            .map(|i| (config.client_base.wrapping_add(i), 0))
            .collect();
        let fs = FileSystem {
            shards,
            layout,
            config,
            slots: Mutex::new(slots),
            slot_free: Condvar::new(),
            snapshots: Mutex::new(SnapshotTable::default()),
            write_back: Mutex::new(WriteBack::default()),
            run_done: Condvar::new(),
            dir_attrs: Mutex::new(DirAttrs::default()),
            local: LocalFiles::new(),
        };
        let creds = fs.config.root_owner;
        fs.ns(NsOp::Init { creds })?;
        Ok(fs)
    }

    /// The shards underneath.
    pub fn shards(&self) -> &S {
        &self.shards
    }

    /// Gives the shards back.
    pub fn into_shards(self) -> S {
        self.shards
    }

    /// The layout.
    pub fn layout(&self) -> FsLayout {
        self.layout
    }

    /// Submits `op` to `shard`; the reply and the version that applied it, when known.
    fn submit(&self, shard: ShardRef, op: Op) -> FsResult<(Reply, Option<u64>)> {
        let (client, number) = {
            let mut slots = lock(&self.slots);
            // Bounded: CLIENT_SLOTS_MAX requests in flight; more callers than that wait.
            loop {
                if let Some((c, n)) = slots.pop() {
                    break (c, (n + 1).max(self.shards.now_us()));
                }
                slots = self
                    .slot_free
                    .wait(slots)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let request = Request { client, number, op }.encode();
        let result = self.submit_until_applied(shard, &request);
        lock(&self.slots).push((client, number));
        self.slot_free.notify_one();
        match result? {
            (Reply::Stale { last }, _) => Err(fs_err!(
                libc::EIO,
                "request {number} of client {client} was answered as stale (last {last})"
            )),
            r => Ok(r),
        }
    }

    /// Applies data operations that touch distinct chunks, all in flight at once (each under
    /// a client id of its own, so their order does not matter), at most `CLIENT_SLOTS_MAX / 2`
    /// at a time; the first error, if any, once every one has finished.
    fn data_many(&self, ops: Vec<(u32, DataOp)>) -> FsResult<()> {
        let mut ops = ops.into_iter().peekable();
        let mut first_err = None;
        while ops.peek().is_some() {
            // Take as many slots as are free (at least one, waiting for it), up to the wave.
            let taken: Vec<(u64, u64)> = {
                let mut slots = lock(&self.slots);
                while slots.is_empty() {
                    slots = self
                        .slot_free
                        .wait(slots)
                        .unwrap_or_else(|e| e.into_inner());
                }
                let n = slots.len().min(DATA_WAVE_MAX).min(ops.len());
                let now = self.shards.now_us();
                (0..n)
                    .map(|_| {
                        let (c, n) = slots.pop().expect("counted");
                        (c, (n + 1).max(now))
                    })
                    .collect()
            };
            let wave: Vec<(ShardRef, Bytes)> = taken
                .iter()
                .zip(ops.by_ref())
                .map(|(&(client, number), (shard, op))| {
                    let op = Op::Data(op);
                    (
                        ShardRef::Data(shard),
                        Request { client, number, op }.encode(),
                    )
                })
                .collect();
            let results = self.shards.submit_many(wave.clone());
            for ((&(client, number), (shard, request)), result) in
                taken.iter().zip(&wave).zip(results)
            {
                let reply = result.and_then(|(bytes, version)| {
                    let reply = Reply::decode(&bytes).map_err(bad_reply)?;
                    if reply == Reply::Retry {
                        // No room in that version: the same bytes again, one at a time.
                        return self.submit_until_applied(*shard, request);
                    }
                    Ok((reply, version))
                });
                let outcome = match reply {
                    Ok((Reply::Data(Ok(_)), _)) => Ok(()),
                    Ok((Reply::Data(Err(e)), _)) => Err(e),
                    Ok((Reply::Stale { last }, _)) => Err(fs_err!(
                        libc::EIO,
                        "request {number} of client {client} was answered as stale (last {last})"
                    )),
                    Ok((other, _)) => Err(bad_reply(format!("{other:?}"))),
                    Err(e) => Err(e),
                };
                if let Err(e) = outcome {
                    first_err.get_or_insert(e);
                }
            }
            let mut slots = lock(&self.slots);
            slots.extend(taken);
            drop(slots);
            self.slot_free.notify_all();
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Submits `request` and resends the same bytes while the shard answers `Retry` (its
    /// version had no room left for the request's changes): a later version applies it, once.
    fn submit_until_applied(
        &self,
        shard: ShardRef,
        request: &Bytes,
    ) -> FsResult<(Reply, Option<u64>)> {
        for attempt in 0..RETRIES_MAX {
            let (bytes, version) = self.shards.submit_versioned(shard, request.clone())?;
            let reply = Reply::decode(&bytes).map_err(bad_reply)?;
            if reply != Reply::Retry {
                return Ok((reply, version));
            }
            if attempt > 0 {
                let pause = RETRY_PAUSE_MS
                    .saturating_mul(attempt)
                    .min(RETRY_PAUSE_MAX_MS);
                std::thread::sleep(std::time::Duration::from_millis(pause));
            }
        }
        Err(fs_err!(
            libc::EAGAIN,
            "{shard:?} had no room for the request in {RETRIES_MAX} versions in a row"
        ))
    }

    /// Applies a namespace change. Any directory attributes kept from an earlier change are
    /// dropped first; those the reply carries are kept if no other change started meanwhile.
    /// The attribute cache, if any, learns the version and takes the attributes (and the name
    /// created) the reply carries, as of that version.
    fn ns(&self, op: NsOp) -> FsResult<NsReply> {
        let started = {
            let mut d = lock(&self.dir_attrs);
            d.started += 1;
            d.entries.clear();
            d.started
        };
        let named = match &op {
            NsOp::Create { parent, name, .. }
            | NsOp::Mkdir { parent, name, .. }
            | NsOp::Symlink { parent, name, .. }
            | NsOp::Link { parent, name, .. } => Some((*parent, name.clone())),
            _ => None,
        };
        let mkdir = matches!(op, NsOp::Mkdir { .. });
        // A name this change removes (for a rename, moves away from), which a kernel in front of
        // this client drops itself as it carries the change out.
        let removed = match &op {
            NsOp::Unlink { parent, name } | NsOp::Rmdir { parent, name } => {
                Some((*parent, name.clone()))
            }
            NsOp::Rename {
                parent,
                name,
                flags,
                ..
            } if flags & crate::RENAME_EXCHANGE == 0 => Some((*parent, name.clone())),
            _ => None,
        };
        let cache = self.shards.attr_cache();
        if let (Some(cache), Some((parent, name))) = (cache, &removed) {
            cache.removing_here(*parent, name);
        }
        let submitted = self.submit(ShardRef::Namespace, Op::Ns(op));
        if let (Some(cache), Some((parent, name))) = (cache, &removed) {
            if !matches!(submitted, Ok((Reply::Ns(Ok(_)), _))) {
                // Not removed (or not known to be): the kernel keeps its dentry.
                cache.drop_entry_from_kernel(*parent, name);
            }
        }
        let (reply, version) = submitted?;
        if let (Some(cache), Some(v)) = (self.shards.attr_cache(), version) {
            match &reply {
                Reply::Ns(Ok(NsReply::Attr(a))) => cache.insert_attr(a, v),
                Reply::Ns(Ok(NsReply::Entries { attr, dirs })) => {
                    for d in dirs {
                        cache.insert_attr(d, v);
                    }
                    if let Some(a) = attr {
                        cache.insert_attr(a, v);
                        if let Some((parent, name)) = &named {
                            cache.insert_name(*parent, name, a.ino, v);
                        }
                        if mkdir {
                            // Empty at `v`: its negative lookups can be answered here.
                            cache.insert_empty_dir(a.ino, v);
                        }
                    }
                }
                _ => {}
            }
        }
        match reply {
            Reply::Ns(Ok(NsReply::Entries { attr, dirs })) => {
                if self.config.dir_attr_ttl_us > 0 {
                    let mut d = lock(&self.dir_attrs);
                    if d.started == started {
                        let now = std::time::Instant::now();
                        d.entries = dirs.into_iter().map(|a| (a, now)).collect();
                    }
                }
                Ok(attr.map_or(NsReply::Done, NsReply::Attr))
            }
            Reply::Ns(r) => r,
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// The attributes of directory `ino` returned by this client's last change of entries, if
    /// kept and younger than [`FsConfig::dir_attr_ttl_us`]; each answers one `getattr`.
    fn kept_dir_attr(&self, ino: Ino) -> Option<Attr> {
        let mut d = lock(&self.dir_attrs);
        let at = d.entries.iter().position(|(a, _)| a.ino == ino)?;
        let (attr, when) = d.entries.swap_remove(at);
        let ttl = std::time::Duration::from_micros(self.config.dir_attr_ttl_us);
        (when.elapsed() <= ttl).then_some(attr)
    }

    fn data(&self, shard: u32, op: DataOp) -> FsResult<DataReply> {
        let ino = op.ino();
        self.forget_plans(ino);
        let r = self.submit(ShardRef::Data(shard), Op::Data(op));
        self.forget_plans(ino);
        match r?.0 {
            Reply::Data(r) => r,
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// Forgets the chunk plans of `ino` kept for local reads: this client changes its bytes
    /// (before the change, and again once it is applied, so that no plan fetched meanwhile is
    /// kept), or opens it.
    fn forget_plans(&self, ino: Ino) {
        if let Some(cache) = self.shards.attr_cache() {
            cache.forget_plans(ino);
        }
    }

    fn ns_attr(&self, op: NsOp) -> FsResult<Attr> {
        match self.ns(op)? {
            NsReply::Attr(a) => Ok(a),
            NsReply::Done | NsReply::Entries { .. } => Err(bad_reply("no attributes")),
        }
    }

    fn ns_read(&self, at: ReadAt, read: NsRead) -> FsResult<ReadReply> {
        self.ns_read_versioned(at, read).map(|(r, _)| r)
    }

    /// A namespace read, with the version it was answered at (a read at the latest state of
    /// shards that know it).
    fn ns_read_versioned(&self, at: ReadAt, read: NsRead) -> FsResult<(ReadReply, Option<u64>)> {
        let (reply, version) = self.ns_read_answer(at, read)?;
        Ok((reply?, version))
    }

    /// A namespace read whose answer may be the namespace's error (ENODATA, …), with the
    /// version it was answered at, as [`FileSystem::ns_read_versioned`].
    fn ns_read_answer(
        &self,
        at: ReadAt,
        read: NsRead,
    ) -> FsResult<(FsResult<ReadReply>, Option<u64>)> {
        let (reply, version) =
            self.shards
                .read_versioned(ShardRef::Namespace, at, read.encode())?;
        let version = version.filter(|_| at == ReadAt::Latest);
        Ok((decode_read_reply(&reply).map_err(bad_reply)?, version))
    }

    fn view(&self, ino: Ino) -> FsResult<View> {
        if is_snapshot(ino) {
            // A past time sees every run this client had on its way.
            self.drain_all();
        } else {
            self.settle(ino)?;
        }
        self.view_unsettled(ino)
    }

    /// Where `ino` is read, leaving its buffered writes buffered: for reads that no buffered
    /// write can change (a stored extended attribute; the kernel asks for
    /// `security.capability` before every write to a file).
    fn view_unsettled(&self, ino: Ino) -> FsResult<View> {
        if !is_snapshot(ino) {
            return Ok(View { ino, at: None });
        }
        match lock(&self.snapshots).resolve(ino) {
            Some((ino, t)) => Ok(View { ino, at: Some(t) }),
            None => fs_bail!(
                libc::ENOENT,
                "snapshot inode {ino:#x} is unknown to this mount"
            ),
        }
    }

    /// The live inode a change applies to; EROFS for snapshot inodes.
    fn live(&self, ino: Ino) -> FsResult<Ino> {
        if is_snapshot(ino) {
            fs_bail!(libc::EROFS, "snapshots are read-only");
        }
        self.settle(ino)?;
        Ok(ino)
    }

    /// Sends the buffered writes of `ino`, if any, and waits until its runs on their way are
    /// applied, before another operation on it (read-your-writes). A failure is also kept for
    /// the file's next flush.
    fn settle(&self, ino: Ino) -> FsResult<()> {
        let mut wb = lock(&self.write_back);
        let mut sent = Ok(());
        if let Some(run) = wb.runs.remove(&ino) {
            let end = run.start + run.data.len() as u64;
            let n = wb.begin(ino, run.data.len(), end);
            drop(wb);
            sent = self.send_run(ino, run.start, run.data.freeze(), n);
            wb = lock(&self.write_back);
        }
        while wb.flights.contains_key(&ino) {
            wb = self.run_done.wait(wb).unwrap_or_else(|e| e.into_inner());
        }
        sent
    }

    /// Waits until no run of this client is on its way.
    fn drain_all(&self) {
        let mut wb = lock(&self.write_back);
        while !wb.flights.is_empty() {
            wb = self.run_done.wait(wb).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Sends run number `n` of `ino` (begun with [`WriteBack::begin`]): its data, then — once
    /// every earlier run of the file has its size update done — its size update. Any failure
    /// is kept for the file's next write, flush or fsync, and returned.
    fn send_run(&self, ino: Ino, start: u64, data: Bytes, n: u64) -> FsResult<()> {
        let len = data.len();
        let end = start + len as u64;
        let data_sent = self.send_data(ino, start, data);
        let mut wb = lock(&self.write_back);
        while wb.flights.get(&ino).expect("begun").sized != n {
            wb = self.run_done.wait(wb).unwrap_or_else(|e| e.into_inner());
        }
        let earlier_failed = wb.flights.get(&ino).expect("begun").failed;
        drop(wb);
        let r = match data_sent {
            Ok(()) if earlier_failed => Err(fs_err!(
                libc::EIO,
                "size update of inode {ino} not sent: an earlier write-back of the file failed"
            )),
            Ok(()) => self.ns_attr(NsOp::Written { ino, end }).map(drop),
            Err(e) => Err(e),
        };
        let mut wb = lock(&self.write_back);
        let f = wb.flights.get_mut(&ino).expect("begun");
        f.sized += 1;
        f.sending -= 1;
        f.failed |= r.is_err();
        if f.sending == 0 {
            wb.flights.remove(&ino);
        }
        wb.bytes_in_flight -= len;
        if let Err(e) = &r {
            wb.remember(ino, e);
        }
        drop(wb);
        self.run_done.notify_all();
        r
    }

    /// Sends the buffered writes of the file a name in `parent` names, if any file has some.
    fn settle_name(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        let idle = {
            let wb = lock(&self.write_back);
            wb.runs.is_empty() && wb.flights.is_empty()
        };
        if idle {
            return Ok(());
        }
        let r = self.ns_read(
            ReadAt::Latest,
            NsRead::Lookup {
                parent,
                name: Bytes::copy_from_slice(name),
            },
        );
        if let Ok(ReadReply::Attr(a)) = r {
            self.settle(a.ino)?;
        }
        Ok(())
    }

    /// Sends `data` at `start` of `ino`: one data request per chunk piece, each data shard's
    /// pieces in order and the shards in parallel, then the size update once all are answered.
    fn send(&self, ino: Ino, start: u64, data: Bytes) -> FsResult<()> {
        let end = start + data.len() as u64;
        self.send_data(ino, start, data)?;
        self.ns_attr(NsOp::Written { ino, end }).map(drop)
    }

    /// Sends the data of a write at `start` of `ino` (no size update): one data request per
    /// chunk piece, all in flight at once.
    fn send_data(&self, ino: Ino, start: u64, data: Bytes) -> FsResult<()> {
        let end = start + data.len() as u64;
        let cs = u64::from(self.layout.chunk_size);
        let mut pieces: Vec<(u32, DataOp)> = Vec::new();
        let mut pos = start;
        while pos < end {
            let index = pos / cs;
            let within = (pos % cs) as u32;
            let n = (cs - u64::from(within)).min(end - pos);
            let from = (pos - start) as usize;
            pieces.push((
                placement(ino, index, self.layout.data_shards),
                DataOp::Write {
                    ino,
                    index,
                    offset: within,
                    data: data.slice(from..from + n as usize),
                },
            ));
            pos += n;
        }
        // Every piece in flight at once: they touch distinct chunks.
        self.forget_plans(ino);
        let r = self.data_many(pieces);
        self.forget_plans(ino);
        r
    }

    /// Attributes as the caller sees them: with the snapshot inode number inside a snapshot.
    fn present(&self, mut attr: Attr, at: Option<Hlc>) -> FsResult<Attr> {
        if let Some(t) = at {
            attr.ino = lock(&self.snapshots).ino(attr.ino, t).ok_or_else(|| {
                fs_err!(
                    libc::EIO,
                    "no snapshot inode number for inode {:#x}: too many snapshot times in use, \
                         or a node replied an inode number beyond the live range",
                    attr.ino
                )
            })?;
        }
        Ok(attr)
    }

    fn attr_reply(&self, r: ReadReply, at: Option<Hlc>) -> FsResult<Attr> {
        match r {
            ReadReply::Attr(a) => self.present(a, at),
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// Checks a snapshot time: ENOENT beyond now plus the allowed skew.
    fn check_time(&self, us: u64) -> FsResult<Hlc> {
        let now = self.shards.now_us();
        if us > now.saturating_add(self.config.skew_max_us) {
            fs_bail!(libc::ENOENT, "time {} is in the future", format_rfc3339(us));
        }
        Ok(snapshot_stamp(us))
    }

    /// Looks up `name` in directory `parent`. In a live directory a name that does not exist
    /// and has the form `NAME@STAMP` is `NAME` as it was at `STAMP` (an empty `NAME`: `parent`
    /// itself then); inside a snapshot, names are taken literally.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        let p = self.view(parent)?;
        let cache = self.shards.attr_cache().filter(|_| p.at.is_none());
        if let Some(attr) = cache.and_then(|c| c.lookup(p.ino, name)) {
            if !lock(&self.write_back).pending(attr.ino) {
                return Ok(attr);
            }
        }
        // Only a name the namespace would look up as an entry may be answered absent: an
        // overlong one is ENAMETOOLONG there, `.` and `..` are the directory and its parent.
        let plain = name.len() <= NAME_LEN_MAX && name != b"." && name != b"..";
        let literal = if plain && cache.is_some_and(|c| c.absent(p.ino, name)) {
            Err(fs_err!(libc::ENOENT, "no entry (cached)"))
        } else {
            let read = NsRead::Lookup {
                parent: p.ino,
                name: Bytes::copy_from_slice(name),
            };
            self.shards
                .read_versioned(ShardRef::Namespace, p.read_at(), read.encode())
                .and_then(|(bytes, version)| {
                    let reply = decode_read_reply(&bytes).map_err(bad_reply)?;
                    match (cache, version, &reply) {
                        (Some(c), Some(v), Ok(ReadReply::Attr(a))) => {
                            c.insert_attr(a, v);
                            c.insert_name(p.ino, name, a.ino, v);
                        }
                        (Some(c), Some(v), Err(e)) if e.errno == libc::ENOENT => {
                            c.insert_absent(p.ino, name, v);
                        }
                        _ => {}
                    }
                    reply
                })
        };
        match literal {
            Err(e) if e.errno == libc::ENOENT && p.at.is_none() => {
                let Some((base, us)) = split_snapshot(name) else {
                    return Err(e);
                };
                let t = self.check_time(us)?;
                self.drain_all();
                let read = if base.is_empty() {
                    NsRead::GetAttr { ino: p.ino }
                } else {
                    NsRead::Lookup {
                        parent: p.ino,
                        name: Bytes::copy_from_slice(base),
                    }
                };
                let r = self.ns_read(ReadAt::Time(t), read)?;
                self.attr_reply(r, Some(t))
            }
            other => {
                let attr = self.attr_reply(other?, p.at)?;
                if p.at.is_none() && lock(&self.write_back).pending(attr.ino) {
                    // The attributes include this client's buffered writes.
                    return self.getattr(attr.ino);
                }
                Ok(attr)
            }
        }
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: Ino) -> FsResult<Attr> {
        let v = self.view(ino)?;
        let cache = self.shards.attr_cache().filter(|_| v.at.is_none());
        if v.at.is_none() {
            if let Some(a) = self.kept_dir_attr(v.ino) {
                return Ok(a);
            }
            if let Some(a) = cache.and_then(|c| c.attr(v.ino)) {
                return Ok(a);
            }
        }
        let (r, version) = self.ns_read_versioned(v.read_at(), NsRead::GetAttr { ino: v.ino })?;
        if let (Some(c), Some(version), ReadReply::Attr(a)) = (cache, version, &r) {
            c.insert_attr(a, version);
        }
        self.attr_reply(r, v.at)
    }

    /// Opens `ino`: returns its attributes as they are once every change another client
    /// made before this call began is in (close-to-open consistency: after a writer's `close`
    /// returned, an open anywhere sees its size, mtime and bytes). On a cluster this is one
    /// barrier read of the namespace shard (`Shards::read_barrier`), which also makes the next
    /// read of every data shard a barrier read; the attributes replace what the attribute
    /// cache held. This client's own buffered writes of the file are sent first. A snapshot
    /// inode needs no barrier (it never changes): its attributes as `getattr` gives them.
    pub fn open(&self, ino: Ino) -> FsResult<Attr> {
        let v = self.view(ino)?;
        if v.at.is_some() {
            return self.getattr(ino);
        }
        self.forget_plans(v.ino);
        let (reply, version) = self
            .shards
            .read_barrier(ShardRef::Namespace, NsRead::GetAttr { ino: v.ino }.encode())?;
        let r = decode_read_reply(&reply).map_err(bad_reply)??;
        if let (Some(c), Some(version), ReadReply::Attr(a)) =
            (self.shards.attr_cache(), version, &r)
        {
            c.insert_attr(a, version);
        }
        self.attr_reply(r, None)
    }

    /// Changes attributes. A size change also cuts the data shards at the smaller of the old and
    /// new sizes, so that bytes past the end never reappear when the file grows again: after the
    /// new size when the file shrinks, before it when the file grows. So no time sees a size
    /// with bytes cut below it.
    pub fn setattr(&self, ino: Ino, set: SetAttr) -> FsResult<Attr> {
        let ino = self.live(ino)?;
        let Some(size) = set.size else {
            return self.ns_attr(NsOp::SetAttr { ino, set });
        };
        let current = self.getattr(ino)?;
        match current.kind {
            FileKind::Regular => {}
            FileKind::Directory => fs_bail!(libc::EISDIR, "inode {ino} is a directory"),
            _ => fs_bail!(libc::EINVAL, "inode {ino} is not a regular file"),
        }
        if size > FILE_SIZE_MAX {
            fs_bail!(libc::EFBIG, "size {size} is above the largest file");
        }
        if size > current.size {
            self.cut(ino, current.size)?;
        }
        let attr = self.ns_attr(NsOp::SetAttr { ino, set })?;
        if size < current.size {
            self.cut(ino, size)?;
        }
        Ok(attr)
    }

    /// Cuts every data shard's chunks of `ino` at `at`.
    fn cut(&self, ino: Ino, at: u64) -> FsResult<()> {
        for shard in 0..self.layout.data_shards {
            // A shard removes a bounded number of chunks per request: ask again (each time
            // removing more) until it has none left past the cut.
            while self.data(shard, DataOp::Truncate { ino, size: at })? == DataReply::More {}
        }
        Ok(())
    }

    /// `fallocate(2)` on file `ino` for `len` (≥ 1) bytes at `offset`, in one of the supported
    /// modes ([`Fallocate`]); returns the attributes after it. Errors: EINVAL for a zero length,
    /// EISDIR for a directory, ESPIPE for a fifo, ENODEV for any other inode that is not a
    /// regular file, EFBIG past the largest file, EROFS in a snapshot.
    pub fn fallocate(&self, ino: Ino, mode: Fallocate, offset: u64, len: u64) -> FsResult<Attr> {
        let ino = self.live(ino)?;
        if len == 0 {
            fs_bail!(libc::EINVAL, "fallocate of zero bytes");
        }
        let current = self.getattr(ino)?;
        match current.kind {
            FileKind::Regular => {}
            FileKind::Directory => fs_bail!(libc::EISDIR, "inode {ino} is a directory"),
            FileKind::Fifo => fs_bail!(libc::ESPIPE, "inode {ino} is a fifo"),
            _ => fs_bail!(libc::ENODEV, "inode {ino} is not a regular file"),
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= FILE_SIZE_MAX)
            .ok_or_else(|| fs_err!(libc::EFBIG, "fallocate past the largest file"))?;
        match mode {
            // Space is not reserved (there is no block allocation to do); only the size moves.
            Fallocate::KeepSize => Ok(current),
            Fallocate::Allocate if end <= current.size => Ok(current),
            Fallocate::Allocate => {
                // As a truncation that grows the file: cut at the old size first, so that no
                // byte left past it comes back, then the size (and mtime, ctime).
                self.cut(ino, current.size)?;
                self.ns_attr(NsOp::Written { ino, end })
            }
            Fallocate::PunchHole => {
                let hi = end.min(current.size);
                if offset >= hi {
                    // Nothing of the file is in the range.
                    return Ok(current);
                }
                self.punch(ino, offset, hi)?;
                // mtime and ctime; the size stays (`end` is inside the file).
                self.ns_attr(NsOp::Written { ino, end: offset })
            }
        }
    }

    /// Makes bytes `lo..hi` of `ino` read as zeros: chunks wholly inside are dropped (every
    /// data shard, a bounded number per request), the pieces of the chunks at either end get
    /// zeros.
    fn punch(&self, ino: Ino, lo: u64, hi: u64) -> FsResult<()> {
        let cs = u64::from(self.layout.chunk_size);
        let (first_whole, end_whole) = (lo.div_ceil(cs), hi / cs);
        let zero = |from: u64, to: u64| -> FsResult<()> {
            if from >= to {
                return Ok(());
            }
            let index = from / cs;
            let op = DataOp::Zero {
                ino,
                index,
                offset: (from % cs) as u32,
                len: (to - from) as u32,
            };
            self.data(placement(ino, index, self.layout.data_shards), op)
                .map(drop)
        };
        if first_whole >= end_whole {
            // Within one chunk, or across the boundary of two with neither whole.
            let boundary = (lo / cs + 1) * cs;
            zero(lo, hi.min(boundary))?;
            zero(boundary.max(lo), hi)?;
            return Ok(());
        }
        zero(lo, first_whole * cs)?;
        for shard in 0..self.layout.data_shards {
            let op = || DataOp::Punch {
                ino,
                from: first_whole,
                to: end_whole,
            };
            while self.data(shard, op())? == DataReply::More {}
        }
        zero(end_whole * cs, hi)
    }

    /// Creates a regular file.
    pub fn create(&self, parent: Ino, name: &[u8], perm: u16, creds: Creds) -> FsResult<Attr> {
        self.mknod(parent, name, FileKind::Regular, perm, 0, creds)
    }

    /// Creates a regular file, a fifo, a socket or a device.
    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        kind: FileKind,
        perm: u16,
        rdev: u32,
        creds: Creds,
    ) -> FsResult<Attr> {
        let parent = self.live(parent)?;
        self.ns_attr(NsOp::Create {
            parent,
            name: Bytes::copy_from_slice(name),
            kind,
            perm,
            rdev,
            creds,
        })
    }

    /// Creates a directory.
    pub fn mkdir(&self, parent: Ino, name: &[u8], perm: u16, creds: Creds) -> FsResult<Attr> {
        let parent = self.live(parent)?;
        self.ns_attr(NsOp::Mkdir {
            parent,
            name: Bytes::copy_from_slice(name),
            perm,
            creds,
        })
    }

    /// Creates a symbolic link.
    pub fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], creds: Creds) -> FsResult<Attr> {
        let parent = self.live(parent)?;
        self.ns_attr(NsOp::Symlink {
            parent,
            name: Bytes::copy_from_slice(name),
            target: Bytes::copy_from_slice(target),
            creds,
        })
    }

    /// The target of a symbolic link.
    pub fn readlink(&self, ino: Ino) -> FsResult<Bytes> {
        let v = self.view(ino)?;
        match self.ns_read(v.read_at(), NsRead::ReadLink { ino: v.ino })? {
            ReadReply::Bytes(b) => Ok(b),
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// Adds the name `name` in `parent` for `ino`.
    pub fn link(&self, ino: Ino, parent: Ino, name: &[u8]) -> FsResult<Attr> {
        let ino = self.live(ino)?;
        let parent = self.live(parent)?;
        self.ns_attr(NsOp::Link {
            ino,
            parent,
            name: Bytes::copy_from_slice(name),
        })
    }

    /// Removes a name that is not a directory.
    pub fn unlink(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        let parent = self.live(parent)?;
        self.settle_name(parent, name)?;
        self.ns(NsOp::Unlink {
            parent,
            name: Bytes::copy_from_slice(name),
        })
        .map(drop)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> FsResult<()> {
        let parent = self.live(parent)?;
        self.ns(NsOp::Rmdir {
            parent,
            name: Bytes::copy_from_slice(name),
        })
        .map(drop)
    }

    /// Renames, with `RENAME_NOREPLACE` / `RENAME_EXCHANGE` flags.
    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> FsResult<()> {
        let parent = self.live(parent)?;
        let new_parent = self.live(new_parent)?;
        self.settle_name(parent, name)?;
        self.settle_name(new_parent, new_name)?;
        self.ns(NsOp::Rename {
            parent,
            name: Bytes::copy_from_slice(name),
            new_parent,
            new_name: Bytes::copy_from_slice(new_name),
            flags,
        })
        .map(drop)
    }

    /// Up to `limit` entries of directory `ino` after the name `after`, in name order, and
    /// whether more follow. Snapshot names never appear; `.` and `..` are the caller's to add.
    pub fn readdir(
        &self,
        ino: Ino,
        after: Option<&[u8]>,
        limit: usize,
    ) -> FsResult<(Vec<DirEntry>, bool)> {
        let v = self.view(ino)?;
        let read = NsRead::ReadDir {
            ino: v.ino,
            after: after.map(Bytes::copy_from_slice),
            limit: limit.clamp(1, READDIR_ENTRIES_MAX) as u32,
        };
        match self.ns_read(v.read_at(), read)? {
            ReadReply::Dir { mut entries, more } => {
                if let Some(t) = v.at {
                    let mut table = lock(&self.snapshots);
                    for e in &mut entries {
                        e.ino = table.ino(e.ino, t).ok_or_else(|| {
                            fs_err!(
                                libc::EIO,
                                "no snapshot inode number for inode {:#x}: too many \
                                     snapshot times, or beyond the live range",
                                e.ino
                            )
                        })?;
                    }
                }
                Ok((entries, more))
            }
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// Up to `len` bytes of file `ino` at `offset`: fewer at the end of the file; holes read as
    /// zeros.
    ///
    /// The attributes (for the size) and the chunk pieces of the range are read at once, in
    /// groups of up to [`READS_IN_FLIGHT_MAX`] reads; the bytes are then cut at the size. Each read is
    /// at the file's view (live: a state with every change this client had answered; snapshot:
    /// its time).
    pub fn read(&self, ino: Ino, offset: u64, len: u32) -> FsResult<Bytes> {
        let v = self.view(ino)?;
        let cs = u64::from(self.layout.chunk_size);
        let end = offset.saturating_add(u64::from(len)).min(FILE_SIZE_MAX);
        let mut pieces: Vec<(u64, u32)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let want = (cs - pos % cs).min(end - pos) as u32;
            pieces.push((pos, want));
            pos += u64::from(want);
        }
        let chunk_read = |&(pos, want): &(u64, u32)| {
            let read = DataRead::Chunk {
                ino: v.ino,
                index: pos / cs,
                offset: (pos % cs) as u32,
                len: want,
            };
            let shard = placement(v.ino, pos / cs, self.layout.data_shards);
            (ShardRef::Data(shard), v.read_at(), read.encode())
        };
        if v.at.is_none() {
            if let Some(bytes) = self.read_local(v.ino, offset, end, &pieces) {
                return Ok(bytes);
            }
        }
        let first = pieces.len().min(READS_IN_FLIGHT_MAX - 1);
        let mut reads = vec![(
            ShardRef::Namespace,
            v.read_at(),
            NsRead::GetAttr { ino: v.ino }.encode(),
        )];
        reads.extend(pieces[..first].iter().map(chunk_read));
        let mut replies = self.shards.read_many(reads).into_iter();
        let attr = match decode_read_reply(
            &replies
                .next()
                .unwrap_or_else(|| Err(fs_err!(libc::EIO, "a read was not answered")))?,
        )
        .map_err(bad_reply)??
        {
            ReadReply::Attr(a) => a,
            other => return Err(bad_reply(format!("{other:?}"))),
        };
        match attr.kind {
            FileKind::Regular => {}
            FileKind::Directory => fs_bail!(libc::EISDIR, "inode {ino} is a directory"),
            _ => fs_bail!(libc::EINVAL, "inode {ino} is not a regular file"),
        }
        let end = end.min(attr.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let needed = pieces.iter().take_while(|(pos, _)| *pos < end).count();
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        let mut done = 0;
        let mut replies: Vec<FsResult<Bytes>> = replies.collect();
        while done < needed {
            if replies.is_empty() {
                let upto = needed.min(done + READS_IN_FLIGHT_MAX);
                replies = self
                    .shards
                    .read_many(pieces[done..upto].iter().map(chunk_read).collect());
            }
            for reply in std::mem::take(&mut replies) {
                if done == needed {
                    break;
                }
                let (pos, want) = pieces[done];
                let bytes = match decode_read_reply(&reply?).map_err(bad_reply)?? {
                    ReadReply::Bytes(b) => b,
                    other => return Err(bad_reply(format!("{other:?}"))),
                };
                if bytes.len() > want as usize {
                    return Err(bad_reply("a chunk read longer than asked"));
                }
                // Holes read as zeros; the last piece is cut at the size.
                let keep = (end - pos).min(u64::from(want)) as usize;
                if needed == 1 && bytes.len() >= keep {
                    // The whole read in one piece, all bytes there: the reply's own buffer.
                    return Ok(bytes.slice(..keep));
                }
                let have = bytes.len().min(keep);
                out.extend_from_slice(&bytes[..have]);
                out.resize(out.len() + (keep - have), 0);
                done += 1;
            }
        }
        Ok(out.freeze())
    }

    /// A live read of bytes `offset..end` of `ino` (cut into the chunk `pieces`) answered
    /// from the log files of members on this machine (docs/ARCHITECTURE.md, "Local reads"):
    /// the size from the attribute cache, each chunk piece by its plan, kept in that cache or
    /// asked of a member on this machine. `None` when it cannot be (no cached attributes, no
    /// member here, a plan not ready, a file that fails): the read then goes through the
    /// members as before.
    fn read_local(&self, ino: Ino, offset: u64, end: u64, pieces: &[(u64, u32)]) -> Option<Bytes> {
        let cache = self.shards.attr_cache()?;
        if self.local.resting() {
            return None;
        }
        let attr = cache.attr_for_read(ino)?;
        if attr.kind != FileKind::Regular {
            // The read through the members gives the error.
            return None;
        }
        let end = end.min(attr.size);
        let cs = u64::from(self.layout.chunk_size);
        let needed = pieces.iter().take_while(|(pos, _)| *pos < end).count();
        let mut out = BytesMut::with_capacity(end.saturating_sub(offset) as usize);
        for &(pos, want) in &pieces[..needed] {
            let index = pos / cs;
            let plan = match cache.plan(ino, index) {
                Some(plan) => plan,
                None => {
                    let epoch = cache.plan_epoch();
                    let shard = ShardRef::Data(placement(ino, index, self.layout.data_shards));
                    let reply = self.shards.read_plan(
                        shard,
                        ino,
                        DataRead::Plan { ino, index }.encode(),
                    )?;
                    let Ok(reply) = reply else {
                        // The members could not answer (a view change, a failure): the read
                        // through them will wait or fail as any read does.
                        self.local.rest();
                        return None;
                    };
                    match decode_read_reply(&reply) {
                        Ok(Ok(ReadReply::Plan(Some(plan)))) => {
                            let plan = Arc::new(plan);
                            cache.insert_plan(ino, index, plan.clone(), epoch);
                            plan
                        }
                        _ => {
                            // No plan to be had (or a failed read): not asked again for a while,
                            // or every read would cost a plan read and a read.
                            self.local.rest();
                            return None;
                        }
                    }
                }
            };
            let keep = (end - pos).min(u64::from(want)) as u32;
            let bytes = match self.local.read(&plan, (pos % cs) as u32, keep) {
                Ok(bytes) => bytes,
                Err(_) => {
                    cache.count_local_failure();
                    cache.forget_plans(ino);
                    self.local.close_all();
                    self.local.rest();
                    return None;
                }
            };
            if needed == 1 && bytes.len() == keep as usize {
                cache.count_local_read();
                return Some(bytes);
            }
            out.extend_from_slice(&bytes);
            out.resize(out.len() + (keep as usize - bytes.len()), 0);
        }
        cache.count_local_read();
        Some(out.freeze())
    }

    /// Writes `data` at `offset` of file `ino` at once: any buffered writes of the file, then
    /// the bytes to the data shards, then the size and modification time to the namespace
    /// shard. Returns the attributes after the write.
    pub fn write(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<Attr> {
        self.write_buffered(ino, offset, data)?;
        self.flush(ino)?;
        self.getattr(ino)
    }

    /// Writes `data` at `offset` of file `ino` into the file's write-back buffer, as
    /// [`FileSystem::write_buffered_then`], and returns once any send it made is done.
    pub fn write_buffered(&self, ino: Ino, offset: u64, data: &[u8]) -> FsResult<()> {
        let mut out = Ok(());
        self.write_buffered_then(ino, offset, data, |r| out = r);
        out
    }

    /// Writes `data` at `offset` of file `ino` into the file's write-back buffer and calls
    /// `ack` once with the write's result. A write contiguous with the buffered run joins it;
    /// when that fills the run (`WRITE_BUFFER_BYTES_MAX`), the run is handed off: `ack` is
    /// called first and then this call sends the run (so the caller's next write can go on
    /// meanwhile; at most [`WRITE_BACK_IN_FLIGHT_BYTES_MAX`] of such runs per client are on
    /// their way, a run past it waits before its `ack`). A write at the end of the file's runs
    /// on their way starts a new run; any other write first sends the buffered run and waits
    /// until every run of the file is applied. The bytes reach the shards at the latest at the
    /// next [`FileSystem::flush`] or fsync of the file, and before any other operation of this
    /// client on it. An unreported error of an earlier send of the file is this write's result
    /// (and is kept for the next flush or fsync).
    pub fn write_buffered_then(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
        ack: impl FnOnce(FsResult<()>),
    ) {
        if is_snapshot(ino) {
            return ack(Err(fs_err!(libc::EROFS, "snapshots are read-only")));
        }
        if offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= FILE_SIZE_MAX)
            .is_none()
        {
            return ack(Err(fs_err!(libc::EFBIG, "a write past the largest file")));
        }
        if data.is_empty() {
            // Nothing to buffer: the size and time update goes out now, after the buffer.
            return ack(self
                .settle(ino)
                .and_then(|()| self.send(ino, offset, Bytes::new())));
        }
        let mut wb = lock(&self.write_back);
        loop {
            if let Some(e) = wb.errors.get(&ino) {
                return ack(Err(e.clone()));
            }
            if let Some(run) = wb.runs.get_mut(&ino) {
                let joins = run.start + run.data.len() as u64 == offset
                    && run.data.len() + data.len() <= WRITE_BUFFER_BYTES_MAX;
                if joins {
                    if run.data.capacity() < WRITE_BUFFER_BYTES_MAX {
                        // A second write: the file is written in a run. Room for the whole
                        // buffer at once, rather than growing it by doubling, which copies
                        // what it holds at every step.
                        run.data.reserve(WRITE_BUFFER_BYTES_MAX - run.data.len());
                    }
                    run.data.extend_from_slice(data);
                    if run.data.len() < WRITE_BUFFER_BYTES_MAX {
                        return ack(Ok(()));
                    }
                    // Full: handed off once there is room among the bytes on their way. It
                    // stays buffered meanwhile (it is the file's latest run; an operation on the
                    // file may send it itself). A run waiting here holds no run number, so the
                    // runs on their way, which wait only for earlier numbers, all finish.
                    let start = run.start;
                    let len = run.data.len();
                    while wb.bytes_in_flight > 0
                        && wb.bytes_in_flight + len > WRITE_BACK_IN_FLIGHT_BYTES_MAX
                    {
                        wb = self.run_done.wait(wb).unwrap_or_else(|e| e.into_inner());
                    }
                    let ours = wb
                        .runs
                        .get(&ino)
                        .is_some_and(|r| r.start == start && r.data.len() == len);
                    if !ours {
                        // Another call sent it (an error is kept for the file, as always).
                        drop(wb);
                        return ack(Ok(()));
                    }
                    let run = wb.runs.remove(&ino).expect("present");
                    let n = wb.begin(ino, len, start + len as u64);
                    drop(wb);
                    ack(Ok(()));
                    // A failure is kept for the file's next write, flush or fsync.
                    self.send_run(ino, run.start, run.data.freeze(), n).ok();
                    return;
                }
            }
            let follows =
                !wb.runs.contains_key(&ino) && wb.flights.get(&ino).is_none_or(|f| f.end == offset);
            if follows {
                break;
            }
            // Not contiguous: the file's earlier writes are applied first.
            drop(wb);
            if let Err(e) = self.settle(ino) {
                return ack(Err(e));
            }
            wb = lock(&self.write_back);
        }
        if data.len() >= WRITE_BUFFER_BYTES_MAX {
            let n = wb.begin(ino, data.len(), offset + data.len() as u64);
            drop(wb);
            return ack(self.send_run(ino, offset, Bytes::copy_from_slice(data), n));
        }
        if wb.runs.len() >= WRITE_BUFFERS_MAX {
            let other = *wb.runs.keys().next().expect("not empty");
            let run = wb.runs.remove(&other).expect("present");
            let len = run.data.len();
            let n = wb.begin(other, len, run.start + len as u64);
            drop(wb);
            // A failure is kept for that file's next write, flush or fsync.
            self.send_run(other, run.start, run.data.freeze(), n).ok();
            wb = lock(&self.write_back);
            let changed = wb.runs.contains_key(&ino)
                || wb.errors.contains_key(&ino)
                || wb.flights.get(&ino).is_some_and(|f| f.end != offset);
            if changed {
                // Another write of the file came meanwhile: start over.
                drop(wb);
                return self.write_buffered_then(ino, offset, data, ack);
            }
        }
        wb.runs.insert(
            ino,
            Run {
                start: offset,
                data: BytesMut::from(data),
            },
        );
        drop(wb);
        ack(Ok(()))
    }

    /// Sends the buffered writes of `ino` (the data, then one size update), waits until every
    /// run of the file on its way is applied, and reports any error of an earlier deferred
    /// send of the file (`close`).
    pub fn flush(&self, ino: Ino) -> FsResult<()> {
        let sent = self.settle(ino);
        let earlier = lock(&self.write_back).errors.remove(&ino);
        match earlier {
            Some(e) => Err(e),
            None => sent,
        }
    }

    /// Sends every file's buffered writes and waits until no run is on its way; returns the
    /// first error (each is also kept for its file's next flush).
    fn flush_all(&self) -> FsResult<()> {
        let runs: Vec<(Ino, Run, u64)> = {
            let mut wb = lock(&self.write_back);
            let runs: Vec<(Ino, Run)> = wb.runs.drain().collect();
            runs.into_iter()
                .map(|(ino, run)| {
                    let len = run.data.len();
                    let n = wb.begin(ino, len, run.start + len as u64);
                    (ino, run, n)
                })
                .collect()
        };
        let mut first = None;
        for (ino, run, n) in runs {
            if let Err(e) = self.send_run(ino, run.start, run.data.freeze(), n) {
                first.get_or_insert(e);
            }
        }
        self.drain_all();
        first.map_or(Ok(()), Err)
    }

    /// `fsync` of file `ino`: sends every buffered write of this client, reports the file's
    /// deferred-write errors, and returns once all of it is durable on every replica.
    pub fn fsync_file(&self, ino: Ino) -> FsResult<()> {
        // A failed send is kept for its file; this file's is taken just below.
        self.flush_all().ok();
        let earlier = lock(&self.write_back).errors.remove(&ino);
        if let Some(e) = earlier {
            return Err(e);
        }
        self.shards.sync()
    }

    /// Sets an extended attribute.
    pub fn setxattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32) -> FsResult<()> {
        let ino = self.live(ino)?;
        self.change_xattrs(
            ino,
            NsOp::SetXattr {
                ino,
                name: Bytes::copy_from_slice(name),
                value: Bytes::copy_from_slice(value),
                flags,
            },
        )
    }

    /// One extended attribute; [`HISTORY_XATTR`] is computed: one line per change of the inode,
    /// oldest first, `RFC3339-TIME VERSION` with the version in hex — the newest changes that fit
    /// in 64 KiB ([`FileSystem::history`] has them all).
    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> FsResult<Bytes> {
        let v = if name == HISTORY_XATTR {
            self.view(ino)?
        } else {
            self.view_unsettled(ino)?
        };
        if name == HISTORY_XATTR {
            // The newest changes that fit in one attribute value, oldest first.
            let mut lines = Vec::new();
            let mut len = 0;
            for e in self.history(ino)?.iter().rev() {
                let line = format!("{} {:#x}\n", format_rfc3339(e.hlc.wall_us), e.version);
                if len + line.len() > XATTR_VALUE_LEN_MAX {
                    break;
                }
                len += line.len();
                lines.push(line);
            }
            lines.reverse();
            return Ok(Bytes::from(lines.concat()));
        }
        let cache = self.shards.attr_cache().filter(|_| v.at.is_none());
        if let Some(cached) = cache.and_then(|c| c.xattr(v.ino, name)) {
            return cached.ok_or_else(|| {
                fs_err!(
                    libc::ENODATA,
                    "no attribute {:?}",
                    String::from_utf8_lossy(name)
                )
            });
        }
        let read = NsRead::GetXattr {
            ino: v.ino,
            name: Bytes::copy_from_slice(name),
        };
        let (r, version) = self.ns_read_answer(v.read_at(), read)?;
        if let (Some(c), Some(version)) = (cache, version) {
            match &r {
                Ok(ReadReply::Bytes(b)) => c.insert_xattr(v.ino, name, Some(b), version),
                Err(e) if e.errno == libc::ENODATA => c.insert_xattr(v.ino, name, None, version),
                _ => {}
            }
        }
        match r? {
            ReadReply::Bytes(b) => Ok(b),
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// The names of the extended attributes (the computed ones are not listed).
    pub fn listxattr(&self, ino: Ino) -> FsResult<Vec<Bytes>> {
        let v = self.view(ino)?;
        match self.ns_read(v.read_at(), NsRead::ListXattr { ino: v.ino })? {
            ReadReply::Names(n) => Ok(n
                .into_iter()
                .filter(|n| !n.starts_with(VIRTUAL_XATTR_PREFIX))
                .collect()),
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: Ino, name: &[u8]) -> FsResult<()> {
        let ino = self.live(ino)?;
        self.change_xattrs(
            ino,
            NsOp::RemoveXattr {
                ino,
                name: Bytes::copy_from_slice(name),
            },
        )
    }

    /// Applies `op`, a change of an extended attribute of `ino`, forgetting the attributes of
    /// `ino` cached here before the change and again once it is applied, so that no value read
    /// meanwhile is kept.
    fn change_xattrs(&self, ino: Ino, op: NsOp) -> FsResult<()> {
        let forget = || {
            if let Some(cache) = self.shards.attr_cache() {
                cache.forget_xattrs(ino);
            }
        };
        forget();
        let r = self.ns(op);
        forget();
        r.map(drop)
    }

    /// The versions and stamps at which inode `ino` changed (its attributes, its size and times
    /// with every write, its entries for a directory), oldest first; for a snapshot inode, up to
    /// its time.
    pub fn history(&self, ino: Ino) -> FsResult<Vec<HistoryEntry>> {
        let v = self.view(ino)?;
        match self.ns_read(v.read_at(), NsRead::History { ino: v.ino })? {
            ReadReply::History(h) => Ok(h),
            other => Err(bad_reply(format!("{other:?}"))),
        }
    }

    /// `statfs`.
    pub fn statfs(&self) -> FsResult<StatFs> {
        let inodes = match self.ns_read(ReadAt::Latest, NsRead::StatFs)? {
            ReadReply::StatFs { inodes } => inodes,
            other => return Err(bad_reply(format!("{other:?}"))),
        };
        let Space {
            total_bytes,
            free_bytes,
        } = self.shards.space()?;
        Ok(StatFs {
            total_bytes,
            free_bytes,
            inodes,
            inodes_free: crate::inode::LIVE_INO_MAX.saturating_sub(inodes),
            block_size: self.layout.chunk_size,
            name_len_max: crate::inode::NAME_LEN_MAX as u32,
        })
    }

    /// `fsync`: returns once every change this client made (to any file) is durable on every
    /// replica of its shard.
    pub fn fsync(&self) -> FsResult<()> {
        self.flush_all()?;
        self.shards.sync()
    }

    /// The root directory's inode number.
    pub fn root(&self) -> Ino {
        ROOT_INO
    }
}
