//! The log of one shard replica: appends, group commit, reads at any version or time, checkpoints,
//! trim, truncation and crash recovery.

use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use crate::backend::{Backend, BackendFile, FilePlace};
use crate::checkpoint::{self, Position, SegmentRange, CHECKPOINT_FILE};
use crate::error::{io_err, LogError, Result};
use crate::index::{entry_at, Entry, Key, KeyIndex, VersionTable, BASE_FILE};
use crate::meta::{Meta, ENGINE_STATE_MAX, META_FILE};
use crate::prefill::{self, Prefiller};
use crate::record::{
    decode_record, decode_segment_header, encode_record, encode_record_split,
    encode_segment_header, parse_payload, payload_len, Decoded, RecordKind, Write, WriteSpan,
    RECORD_HEADER_LEN, RECORD_PAYLOAD_MAX, SEGMENT_HEADER_LEN,
};
use crate::{Hlc, Version};

/// When appended records are made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every [`Log::commit`] syncs: one `fdatasync` covers every record appended since the last.
    Fsync,
    /// [`Log::commit`] syncs when at least this many milliseconds passed since the last sync;
    /// [`Log::sync_due_at`] tells the caller when to commit again.
    BatchMs(u64),
    /// Never sync: [`Log::commit`] hands the records to the operating system and reports them
    /// persisted. For volatile benchmarks and tests only.
    None,
}

/// How a log is laid out and persisted.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// When records become durable.
    pub sync: SyncPolicy,
    /// Size each new segment file is preallocated to; a larger record gets a segment of its own.
    pub segment_bytes: u64,
    /// Appends are gathered in memory up to this many bytes before they are written out.
    pub write_buffer_bytes: usize,
    /// Write an index checkpoint at the first commit after this many new versions; 0 never does.
    pub checkpoint_every_versions: u64,
}

/// Smallest segment size accepted.
pub const SEGMENT_BYTES_MIN: u64 = 4096;
/// Values of at least this many bytes are not copied into the write buffer: a record holding
/// one is written at once, in one vectored write from the caller's memory (the buffered records
/// before it first). Its bytes are the same.
pub const OUT_OF_LINE_VALUE_MIN: usize = 64 << 10;
/// Largest segment size accepted (offsets inside a segment are 32-bit).
pub const SEGMENT_BYTES_MAX: u64 = 1 << 31;

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            sync: SyncPolicy::Fsync,
            segment_bytes: 64 << 20,
            write_buffer_bytes: 1 << 20,
            checkpoint_every_versions: 1 << 20,
        }
    }
}

/// What recovery found when the log was opened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The index was loaded from a checkpoint, and only the tail after it was scanned.
    pub from_checkpoint: bool,
    /// Records read and checked during the scan.
    pub records_scanned: u64,
    /// Where the scan stopped before the end of the written data, and why: a torn write or
    /// garbage. Everything before it was kept.
    pub torn: Option<(String, u64, &'static str)>,
    /// Segment files removed because they came after the torn record.
    pub dropped_segments: Vec<String>,
}

/// One change in the history of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    /// The version that made the change.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
    /// The length of the new value, or `None` for a deletion.
    pub value_len: Option<u32>,
}

/// A sync taken out of the log by [`Log::begin_sync`], to run without holding the log. Several
/// may be out at once; each must be handed back to [`Log::finish_sync`], in any order.
#[derive(Debug)]
pub struct PendingSync {
    file: Option<Arc<dyn BackendFile>>,
    segment: u32,
    covers: Option<Version>,
    /// Its place in the order syncs were begun ([`Syncs`]).
    ticket: u64,
}

/// Largest number of syncs begun and not yet finished ([`Log::begin_sync`] refuses more): the
/// callers keep a few in flight. Syncs that finished before an earlier one are held apart from
/// these and do not count: any number of them may finish while one slow sync runs.
pub const SYNCS_IN_FLIGHT_MAX: usize = 64;

/// The syncs begun and not yet released. A sync that succeeds counts only once every sync
/// begun before it succeeded too: on Linux an `fdatasync` error is reported once per open file
/// and then consumed, so a later sync can return success although pages an earlier one waited
/// for were lost; the earlier one's failure then poisons the log before anything past it is
/// reported persisted.
#[derive(Debug, Default)]
struct Syncs {
    /// The ticket of the next sync begun.
    next: u64,
    /// Every sync before this ticket finished successfully and was released.
    released: u64,
    /// Syncs that succeeded before an earlier one finished, as runs of consecutive tickets
    /// `(first, last, newest cover of the run)`, in ticket order, never two runs adjacent. The
    /// gaps between runs are syncs still running, so there are at most one more runs than
    /// syncs running, however many are held.
    held: Vec<(u64, u64, Option<Version>)>,
    /// Syncs in `held`.
    held_count: u64,
}

impl Syncs {
    /// Syncs begun and not finished.
    fn running(&self) -> u64 {
        self.next - self.released - self.held_count
    }

    /// Holds the finished sync `ticket` covering `covers`, joined to the runs it touches.
    fn hold(&mut self, ticket: u64, covers: Option<Version>) {
        let at = self.held.partition_point(|&(_, last, _)| last < ticket);
        let joins_before = at > 0 && self.held[at - 1].1 + 1 == ticket;
        let joins_after = at < self.held.len() && self.held[at].0 == ticket + 1;
        match (joins_before, joins_after) {
            (true, true) => {
                let (_, last, c) = self.held.remove(at);
                let before = &mut self.held[at - 1];
                before.1 = last;
                before.2 = before.2.max(covers).max(c);
            }
            (true, false) => {
                let before = &mut self.held[at - 1];
                before.1 = ticket;
                before.2 = before.2.max(covers);
            }
            (false, true) => {
                let after = &mut self.held[at];
                after.0 = ticket;
                after.2 = after.2.max(covers);
            }
            (false, false) => self.held.insert(at, (ticket, ticket, covers)),
        }
        self.held_count += 1;
    }

    /// Releases the run of held syncs that starts at the oldest unreleased ticket, if there is
    /// one: the newest cover among them.
    fn release(&mut self) -> Option<Option<Version>> {
        let &(first, last, covers) = self.held.first()?;
        if first != self.released {
            return None;
        }
        self.held.remove(0);
        self.held_count -= last - first + 1;
        self.released = last + 1;
        Some(covers)
    }
}

impl PendingSync {
    /// The last version this sync makes durable.
    pub fn covers(&self) -> Option<Version> {
        self.covers
    }

    /// Runs the `fdatasync`.
    pub fn run(&self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }
}

/// One page of a prefix scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanPage {
    /// Keys with their values, in key order.
    pub items: Vec<(Vec<u8>, Bytes)>,
    /// Pass this as `after` to read the next page; `None` when the scan is complete.
    pub resume_after: Option<Vec<u8>>,
}

/// One record read back by [`Log::read_records`]: its version, stamp and delta payload as
/// stored (drawn in `docs/FORMATS.md`, "Delta payload").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRecord {
    /// The version.
    pub version: Version,
    /// Its stamp.
    pub hlc: Hlc,
    /// The delta payload, shared with the file's memory where the backend maps it.
    pub payload: Bytes,
}

/// Where [`Log::read_records`] stopped: pass it back to resume there without rescanning the
/// segment. It stays valid while nothing at or before it is truncated or trimmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordCursor {
    seq: u32,
    offset: u64,
    chain: u32,
    version: Version,
}

#[derive(Debug)]
struct Segment {
    seq: u32,
    file: Arc<dyn BackendFile>,
    versions: Option<(Version, Version)>,
}

/// The write position in the last segment.
#[derive(Debug, Default)]
struct Tail {
    /// Offset after the last record, counting buffered bytes.
    end: u64,
    /// Bytes before this offset were handed to the backend.
    flushed: u64,
    /// Bytes from `flushed` to `end`.
    buf: Vec<u8>,
    /// Size of the segment file.
    capacity: u64,
    /// Offset of the last record in the segment, 0 if it holds none.
    last_at: u64,
    /// The segment has bytes that were written but not synced.
    dirty: bool,
    /// Bytes below this offset are reserved for the appender: the prefiller, if there is one,
    /// writes no zeros there ([`Log::reserve`]).
    granted: u64,
}

/// Where a value lies ([`Log::locate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// The key has no value at that version (never written, or deleted).
    Absent,
    /// The value's bytes are in a file of the local file system.
    File(Located),
    /// The value exists but not where another process could read it.
    Elsewhere,
}

/// A value's bytes in a log file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// The file.
    pub place: FilePlace,
    /// Where the value's first byte is in it.
    pub offset: u64,
    /// The value's length.
    pub len: u32,
}

/// The persistent versioned log of one shard replica. Writes take `&mut self`; reads take `&self`.
#[derive(Debug)]
pub struct Log {
    backend: Arc<dyn Backend>,
    config: LogConfig,
    segments: Vec<Segment>,
    base: Option<Arc<dyn BackendFile>>,
    tail: Tail,
    chain: u32,
    versions: VersionTable,
    keys: KeyIndex,
    meta: Meta,
    appended: Option<Version>,
    written: Option<Version>,
    persisted: Option<Version>,
    synced_at_ms: Option<u64>,
    since_checkpoint: u64,
    poisoned: bool,
    syncs: Syncs,
    spans: Vec<WriteSpan>,
    /// The record without its out-of-line values, and where they go ([`Log::append`]).
    split: Vec<u8>,
    gaps: Vec<(usize, usize)>,
    report: RecoveryReport,
    /// Shared with the prefiller that zero-fills ahead of the append point, once made.
    prefill: Option<Arc<prefill::Shared>>,
}

impl Drop for Log {
    fn drop(&mut self) {
        if let Some(p) = &self.prefill {
            p.stop();
        }
    }
}

fn segment_name(seq: u32) -> String {
    format!("seg-{seq:08x}.log")
}

fn base_name(version: Version) -> String {
    format!("base-{version:016x}.log")
}

fn parse_name(name: &str, prefix: &str, digits: usize) -> Option<u64> {
    let hex = name.strip_prefix(prefix)?.strip_suffix(".log")?;
    if hex.len() != digits || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn corrupt(file: &str, offset: u64, reason: impl Into<String>) -> LogError {
    LogError::Corrupt {
        file: file.to_owned(),
        offset,
        reason: reason.into(),
    }
}

/// How a scan of one segment's records ended.
enum ScanEnd {
    /// Zeros or the end of the file.
    Clean,
    /// A record that does not check.
    Bad(&'static str),
}

/// Walks the records of `bytes` from `pos`, checking the chain, and calls `each` with every valid
/// record's offset, header and bytes. Returns where it stopped, the chain there, and why.
fn scan_records(
    bytes: &[u8],
    mut pos: usize,
    mut chain: u32,
    mut each: impl FnMut(
        usize,
        &crate::record::RecordHeader,
        &[u8],
    ) -> std::result::Result<(), &'static str>,
) -> (usize, u32, ScanEnd) {
    loop {
        let rest = bytes.get(pos..).unwrap_or_default();
        if rest.is_empty() {
            return (pos, chain, ScanEnd::Clean);
        }
        match decode_record(rest, chain) {
            Decoded::End => return (pos, chain, ScanEnd::Clean),
            Decoded::Bad(reason) => return (pos, chain, ScanEnd::Bad(reason)),
            Decoded::Record(h) => {
                let len = h.record_len();
                if let Err(reason) = each(pos, &h, &rest[..len]) {
                    return (pos, chain, ScanEnd::Bad(reason));
                }
                chain = h.crc;
                pos += len;
            }
        }
    }
}

impl Log {
    /// Opens the log stored in `backend`, recovering from a crash if needed: a torn or corrupt
    /// tail is cut at the first record that does not check, and everything before it is kept.
    pub fn open(backend: Arc<dyn Backend>, config: LogConfig) -> Result<Log> {
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&config.segment_bytes) {
            return Err(LogError::Invalid(format!(
                "segment size {} outside {SEGMENT_BYTES_MIN}..={SEGMENT_BYTES_MAX}",
                config.segment_bytes
            )));
        }
        let meta = match backend
            .read_all(META_FILE)
            .map_err(io_err("read of meta"))?
        {
            Some(bytes) => Meta::decode(&bytes).map_err(|r| corrupt(META_FILE, 0, r))?,
            None => Meta::default(),
        };
        let mut log = Log {
            backend,
            config,
            segments: Vec::new(),
            base: None,
            tail: Tail::default(),
            chain: 0,
            versions: VersionTable::default(),
            keys: KeyIndex::default(),
            meta,
            appended: None,
            written: None,
            persisted: None,
            synced_at_ms: None,
            since_checkpoint: 0,
            poisoned: false,
            syncs: Syncs::default(),
            spans: Vec::new(),
            split: Vec::new(),
            gaps: Vec::new(),
            report: RecoveryReport::default(),
            prefill: None,
        };
        log.recover()?;
        Ok(log)
    }

    fn recover(&mut self) -> Result<()> {
        let names = self
            .backend
            .list()
            .map_err(io_err("listing of the log directory"))?;
        let mut seqs = Vec::new();
        for name in &names {
            if let Some(seq) = parse_name(name, "seg-", 8) {
                if seq < u64::from(BASE_FILE) {
                    seqs.push(seq as u32);
                }
            } else if let Some(v) = parse_name(name, "base-", 16) {
                // A base file the metadata does not name is left from an interrupted trim.
                if self.meta.horizon.map(|h| h.0) != Some(v) {
                    self.backend
                        .remove(name)
                        .map_err(io_err(format!("removal of {name}")))?;
                }
            } else if name.starts_with('.') && name.ends_with(".tmp") {
                self.backend
                    .remove(name)
                    .map_err(io_err(format!("removal of {name}")))?;
            }
        }
        seqs.sort_unstable();
        if let Some((h, hs)) = self.meta.horizon {
            self.load_base(h, hs)?;
        }
        let mut files = Vec::with_capacity(seqs.len());
        for &seq in &seqs {
            let name = segment_name(seq);
            let file = self
                .backend
                .open(&name, false)
                .map_err(io_err(format!("open of {name}")))?;
            files.push((seq, file));
        }

        // Start from the checkpoint when it is consistent with the files, else from the start.
        let mut start = 0usize;
        let mut resume: Option<(u64, u32)> = None;
        let mut resume_range: Option<(Version, Version)> = None;
        if let Some(ckpt) = self.load_checkpoint(&files)? {
            start = files
                .iter()
                .position(|(s, _)| *s == ckpt.position.segment)
                .unwrap_or(0);
            for range in &ckpt.segments {
                if let Some((_, file)) = files.iter().find(|(s, _)| *s == range.seq) {
                    if range.seq < ckpt.position.segment {
                        self.segments.push(Segment {
                            seq: range.seq,
                            file: file.clone(),
                            versions: range.versions,
                        });
                    }
                }
            }
            if self.segments.len() != start {
                // The checkpoint does not describe the segments before its position: distrust it.
                self.segments.clear();
                start = 0;
                self.versions = VersionTable::default();
                self.keys = KeyIndex::default();
                if let Some((h, hs)) = self.meta.horizon {
                    self.load_base(h, hs)?;
                }
            } else {
                self.versions = ckpt.versions;
                self.keys = ckpt.keys;
                self.chain = ckpt.position.last_crc;
                self.tail.last_at = ckpt.position.last_at;
                resume = Some((ckpt.position.end, ckpt.position.last_crc));
                self.report.from_checkpoint = true;
                let range = ckpt
                    .segments
                    .iter()
                    .find(|r| r.seq == ckpt.position.segment);
                resume_range = range.and_then(|r| r.versions);
            }
        }

        let mut stopped = false;
        for (i, (seq, file)) in files.iter().enumerate().skip(start) {
            let name = segment_name(*seq);
            if stopped {
                self.report.dropped_segments.push(name);
                continue;
            }
            let len = file.len().map_err(io_err(format!("size of {name}")))?;
            let bytes = if len == 0 {
                Bytes::new()
            } else {
                file.read_at(0, len as usize)
                    .map_err(io_err(format!("read of {name}")))?
            };
            let (mut pos, mut chain, mut versions) = (SEGMENT_HEADER_LEN, self.chain, None);
            let mut last_at = 0u64;
            if let (true, Some((end, crc))) = (i == start, resume) {
                pos = end as usize;
                chain = crc;
                versions = resume_range.take();
                last_at = self.tail.last_at;
            } else {
                match decode_segment_header(&bytes) {
                    Ok((s, seed))
                        if s == u64::from(*seq) && (self.segments.is_empty() || seed == chain) =>
                    {
                        chain = seed;
                    }
                    Ok(_) => {
                        self.note_torn(&name, 0, "segment header out of sequence");
                        stopped = true;
                    }
                    Err(reason) => {
                        self.note_torn(&name, 0, reason);
                        stopped = true;
                    }
                }
                if stopped {
                    // A segment whose header never reached the disk holds nothing.
                    self.report.dropped_segments.push(name);
                    continue;
                }
            }
            let horizon = self.meta.horizon.map(|h| h.0);
            let (versions_table, keys, scanned) = (
                &mut self.versions,
                &mut self.keys,
                &mut self.report.records_scanned,
            );
            let (end, new_chain, how) = scan_records(&bytes, pos, chain, |at, h, rec| {
                if h.kind != RecordKind::Delta {
                    return Err("record kind not allowed in a segment");
                }
                // Records at or below the horizon are covered by the base file, whose horizon
                // already ends the version table: only later records must increase past it.
                let below_horizon = horizon.is_some_and(|hv| h.version <= hv);
                if let Some((lv, ls)) = versions_table.last().filter(|_| !below_horizon) {
                    if h.version <= lv || h.hlc <= ls {
                        return Err("version or stamp does not increase");
                    }
                }
                let mut spans = Vec::new();
                parse_payload(rec, |s| spans.push(s))?;
                *scanned += 1;
                last_at = at as u64;
                versions = Some((versions.map_or(h.version, |(f, _)| f), h.version));
                if below_horizon {
                    return Ok(());
                }
                versions_table.push(h.version, h.hlc);
                for s in spans {
                    let key = &rec[s.key_at as usize..][..s.key_len as usize];
                    let value_at = at as u32 + s.value_at;
                    keys.record(key, Entry::new(h.version, *seq, value_at, s.value_len));
                }
                Ok(())
            });
            chain = new_chain;
            if let ScanEnd::Bad(reason) = how {
                // The log rolled to the next segment right here if that segment's header chains
                // from this point (a roll syncs the segment it leaves): the bytes that do not
                // check are left from a torn write that an earlier recovery cut off, not a torn
                // tail, and the next segment is part of the log.
                let rolled_here = files.get(i + 1).is_some_and(|(next, f)| {
                    f.read_at(0, SEGMENT_HEADER_LEN)
                        .ok()
                        .and_then(|h| decode_segment_header(&h).ok())
                        .is_some_and(|(s, seed)| {
                            *next == seq + 1 && s == u64::from(*next) && seed == chain
                        })
                });
                if !rolled_here {
                    self.note_torn(&name, end as u64, reason);
                    stopped = true;
                }
            }
            self.chain = chain;
            self.segments.push(Segment {
                seq: *seq,
                file: file.clone(),
                versions,
            });
            self.tail = Tail {
                end: end as u64,
                flushed: end as u64,
                buf: Vec::new(),
                capacity: len,
                last_at,
                dirty: true,
                granted: 0,
            };
        }

        let last = self.versions.last().map(|l| l.0);
        if let Some(p) = self.meta.persisted {
            if last.is_none_or(|l| l < p) {
                return Err(corrupt(
                    "log",
                    0,
                    format!(
                        "the log ends at {last:?} but version {p:#x} was recorded as persisted"
                    ),
                ));
            }
        }
        // Only now that the log is known to hold every persisted version are the segments after
        // the cut removed: if the check above failed, they stay for an administrator to inspect.
        for name in &self.report.dropped_segments {
            self.backend
                .remove(name)
                .map_err(io_err(format!("removal of {name}")))?;
        }
        self.appended = last;
        self.written = last;
        // What survived a process crash may still sit only in the page cache: sync it before
        // reporting it persisted.
        self.sync()?;
        Ok(())
    }

    fn note_torn(&mut self, file: &str, offset: u64, reason: &'static str) {
        if self.report.torn.is_none() {
            self.report.torn = Some((file.to_owned(), offset, reason));
        }
    }

    fn load_base(&mut self, h: Version, hs: Hlc) -> Result<()> {
        let name = base_name(h);
        let file = self
            .backend
            .open(&name, false)
            .map_err(|_| corrupt(&name, 0, "the base file named by the metadata is missing"))?;
        let len = file.len().map_err(io_err(format!("size of {name}")))?;
        let bytes = file
            .read_at(0, len as usize)
            .map_err(io_err(format!("read of {name}")))?;
        let (written, seed) = decode_segment_header(&bytes).map_err(|r| corrupt(&name, 0, r))?;
        if written != len {
            return Err(corrupt(
                &name,
                len,
                format!("the base file holds {len} bytes, {written} were written"),
            ));
        }
        self.versions = VersionTable::default();
        self.keys = KeyIndex::default();
        self.versions.push(h, hs);
        let keys = &mut self.keys;
        let (end, _, how) = scan_records(&bytes, SEGMENT_HEADER_LEN, seed, |at, head, rec| {
            if head.kind != RecordKind::Base || head.version != h || head.hlc != hs {
                return Err("base record does not match the horizon");
            }
            parse_payload(rec, |s| {
                let key = &rec[s.key_at as usize..][..s.key_len as usize];
                keys.record(
                    key,
                    Entry::new(h, BASE_FILE, at as u32 + s.value_at, s.value_len),
                );
            })
        });
        if let ScanEnd::Bad(reason) = how {
            return Err(corrupt(&name, end as u64, reason));
        }
        if end as u64 != len {
            // A base file is written whole and synced before it is named: zeros before its end
            // are damage, not the end of a torn tail.
            return Err(corrupt(
                &name,
                end as u64,
                "records end before the end of the file",
            ));
        }
        self.base = Some(file);
        Ok(())
    }

    fn load_checkpoint(
        &mut self,
        files: &[(u32, Arc<dyn BackendFile>)],
    ) -> Result<Option<checkpoint::Checkpoint>> {
        let Some(bytes) = self
            .backend
            .read_all(CHECKPOINT_FILE)
            .map_err(io_err("read of the checkpoint"))?
        else {
            return Ok(None);
        };
        let Ok(ckpt) = checkpoint::decode(&bytes) else {
            return Ok(None);
        };
        if ckpt.horizon != self.meta.horizon {
            return Ok(None);
        }
        let p = ckpt.position;
        let Some((_, file)) = files.iter().find(|(s, _)| *s == p.segment) else {
            return Ok(None);
        };
        // The record the checkpoint ends with must still be there, with the same checksum.
        let ok = if p.last_at == 0 {
            file.read_at(0, SEGMENT_HEADER_LEN)
                .ok()
                .and_then(|h| decode_segment_header(&h).ok())
                .is_some_and(|(_, seed)| seed == p.last_crc && p.end == SEGMENT_HEADER_LEN as u64)
        } else {
            file.read_at(p.last_at, RECORD_HEADER_LEN)
                .ok()
                .is_some_and(|h| {
                    let len = crate::record::u32_at(&h, 0) as u64;
                    crate::record::u32_at(&h, 4) == p.last_crc
                        && p.last_at + RECORD_HEADER_LEN as u64 + len == p.end
                })
        };
        Ok(ok.then_some(ckpt))
    }
}

impl Log {
    /// Appends version `version`, stamped `hlc`, whose delta is `writes`. Versions and stamps must
    /// strictly increase. The record is buffered; [`Log::commit`] or [`Log::sync`] persists it.
    pub fn append(&mut self, version: Version, hlc: Hlc, writes: &[Write<'_>]) -> Result<()> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        if let Some((last, last_hlc)) = self.versions.last() {
            if version <= last {
                return Err(LogError::VersionNotIncreasing { last, got: version });
            }
            if hlc <= last_hlc {
                return Err(LogError::StampNotIncreasing {
                    last: last_hlc,
                    got: hlc,
                });
            }
        }
        let len = RECORD_HEADER_LEN
            + payload_len(writes).map_err(|(what, len, max)| LogError::TooLarge {
                what,
                len,
                max,
            })?;
        if self.segments.is_empty() || self.tail.end + len as u64 > self.tail.capacity {
            self.roll(len as u64)?;
        }
        let seq = self.segments.last().map_or(0, |s| s.seq);
        let at = self.tail.end;
        let direct = writes
            .iter()
            .any(|w| w.value.is_some_and(|v| v.len() >= OUT_OF_LINE_VALUE_MIN));
        let crc = if direct {
            // Buffered records first, then this one straight from the caller's memory.
            self.flush()?;
            self.write_split(at, version, hlc, writes)?
        } else {
            encode_record(
                &mut self.tail.buf,
                &mut self.spans,
                self.chain,
                version,
                hlc,
                RecordKind::Delta,
                writes,
            )
        };
        self.versions.push(version, hlc);
        for (w, s) in writes.iter().zip(&self.spans) {
            self.keys.record(
                w.key,
                Entry::new(version, seq, at as u32 + s.value_at, s.value_len),
            );
        }
        if let Some(segment) = self.segments.last_mut() {
            segment.versions = Some((segment.versions.map_or(version, |(f, _)| f), version));
        }
        self.chain = crc;
        self.tail.last_at = at;
        self.tail.end = at + len as u64;
        self.appended = Some(version);
        if direct {
            self.tail.flushed = self.tail.end;
            self.tail.dirty = true;
            self.written = self.appended;
        }
        self.since_checkpoint += 1;
        if self.tail.buf.len() >= self.config.write_buffer_bytes {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the delta record of `writes` at `at` of the last segment, whose buffer is empty,
    /// in one vectored write: its headers and small values from a scratch buffer, its values of
    /// at least [`OUT_OF_LINE_VALUE_MIN`] bytes from where they are. The bytes are those
    /// `encode_record` gives. Returns the record's checksum.
    fn write_split(
        &mut self,
        at: u64,
        version: Version,
        hlc: Hlc,
        writes: &[Write<'_>],
    ) -> Result<u32> {
        debug_assert!(self.tail.buf.is_empty() && self.tail.flushed == at);
        let mut head = std::mem::take(&mut self.split);
        let mut gaps = std::mem::take(&mut self.gaps);
        head.clear();
        let crc = encode_record_split(
            &mut head,
            &mut self.spans,
            &mut gaps,
            self.chain,
            version,
            hlc,
            RecordKind::Delta,
            writes,
            OUT_OF_LINE_VALUE_MIN,
        );
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * gaps.len() + 1);
        let mut pos = 0;
        for &(g, i) in &gaps {
            parts.push(&head[pos..g]);
            parts.push(writes[i].value.unwrap_or_default());
            pos = g;
        }
        parts.push(&head[pos..]);
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.reserve(at + len as u64);
        let segment = self
            .segments
            .last()
            .expect("append rolls a segment before writing");
        let outcome = segment.file.write_vectored_at(at, &parts);
        drop(parts);
        self.split = head;
        self.gaps = gaps;
        if let Err(e) = outcome {
            self.poisoned = true;
            return Err(io_err(format!("write of {}", segment_name(segment.seq)))(e));
        }
        Ok(crc)
    }

    /// Makes appended records durable as the sync policy says, given the current time in
    /// milliseconds, and writes a checkpoint when one is due. Returns the persisted version.
    pub fn commit(&mut self, now_ms: u64) -> Result<Option<Version>> {
        match self.config.sync {
            SyncPolicy::Fsync => {
                self.sync()?;
            }
            SyncPolicy::BatchMs(ms) => {
                let due = self
                    .synced_at_ms
                    .is_none_or(|t| now_ms >= t.saturating_add(ms));
                if self.persisted != self.appended && due {
                    self.sync()?;
                    self.synced_at_ms = Some(now_ms);
                }
            }
            SyncPolicy::None => {
                self.flush()?;
                self.persisted = self.written;
            }
        }
        if self.config.checkpoint_every_versions > 0
            && self.since_checkpoint >= self.config.checkpoint_every_versions
        {
            self.checkpoint()?;
        }
        Ok(self.persisted)
    }

    /// Under [`SyncPolicy::BatchMs`], the time (ms) at which a commit will sync the records
    /// appended so far; `None` when nothing waits.
    pub fn sync_due_at(&self) -> Option<u64> {
        match self.config.sync {
            SyncPolicy::BatchMs(ms) if self.persisted != self.appended => {
                Some(self.synced_at_ms.map_or(0, |t| t.saturating_add(ms)))
            }
            _ => None,
        }
    }

    /// Writes out buffered records and returns the sync that makes them durable, to run without
    /// holding the log (so appends and reads go on during the `fdatasync`); hand its outcome to
    /// [`Log::finish_sync`]. Several may run at once (at most [`SYNCS_IN_FLIGHT_MAX`] begun and
    /// not yet released). A segment roll in between syncs the segment it leaves by itself.
    pub fn begin_sync(&mut self) -> Result<PendingSync> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let running = self.syncs.running();
        if running >= SYNCS_IN_FLIGHT_MAX as u64 {
            return Err(LogError::Invalid(format!(
                "{running} syncs begun and not finished: at most {SYNCS_IN_FLIGHT_MAX}"
            )));
        }
        self.flush()?;
        let segment = self.segments.last();
        let ticket = self.syncs.next;
        self.syncs.next += 1;
        Ok(PendingSync {
            file: segment.filter(|_| self.tail.dirty).map(|s| s.file.clone()),
            segment: segment.map_or(0, |s| s.seq),
            covers: self.written,
            ticket,
        })
    }

    /// Records the outcome of a [`PendingSync`]: on failure the log is poisoned (the kernel may
    /// have dropped the pages that failed). On success the versions it covers are persisted once
    /// every sync begun before it has succeeded too (a later `fdatasync` can succeed where an
    /// earlier one is about to report the loss of pages both waited for): until then it is held,
    /// and the sync that completes the run releases it. The persisted
    /// version only grows, and never passes the data written before a released sync began.
    /// Returns the persisted version.
    pub fn finish_sync(
        &mut self,
        pending: PendingSync,
        outcome: std::io::Result<()>,
    ) -> Result<Option<Version>> {
        if let Err(e) = outcome {
            self.poisoned = true;
            return Err(io_err(format!("sync of {}", segment_name(pending.segment)))(e));
        }
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        assert!(
            pending.ticket >= self.syncs.released && pending.ticket < self.syncs.next,
            "a sync is finished once, by the log that began it"
        );
        self.syncs.hold(pending.ticket, pending.covers);
        if let Some(covers) = self.syncs.release() {
            // A truncation in between may have cut what the syncs covered: never report more
            // than the log holds (the next sync reports what is left).
            if covers > self.persisted && covers <= self.written {
                self.persisted = covers;
            }
        }
        // Nothing written since this sync began: the segment is clean (whether or not the
        // sync was released, its `fdatasync` returned; an earlier one failing poisons the log).
        let active = self.segments.last().map(|s| s.seq);
        if self.written == pending.covers
            && self.tail.buf.is_empty()
            && active == Some(pending.segment)
        {
            self.tail.dirty = false;
        }
        Ok(self.persisted)
    }

    /// A checkpoint is due under `checkpoint_every_versions` (for callers that persist with
    /// [`Log::begin_sync`] instead of [`Log::commit`]).
    pub fn checkpoint_due(&self) -> bool {
        self.config.checkpoint_every_versions > 0
            && self.since_checkpoint >= self.config.checkpoint_every_versions
    }

    /// Writes out buffered records and syncs them, whatever the policy. Returns the persisted
    /// version.
    pub fn sync(&mut self) -> Result<Option<Version>> {
        if self.poisoned {
            // A sync retried after a failed one can succeed although the kernel dropped the
            // pages that failed to write: only a reopen, which rereads the files, can tell.
            return Err(LogError::Poisoned);
        }
        // Taken in turn with the syncs begun outside the log, so that it too reports nothing
        // past one of them still running (which may yet fail).
        let pending = self.begin_sync()?;
        let outcome = pending.run();
        self.finish_sync(pending, outcome)
    }

    /// Hands the buffered records to the backend (without syncing them), so that
    /// [`Log::read_records`] returns every appended record.
    pub fn flush_buffer(&mut self) -> Result<()> {
        self.flush()
    }

    fn flush(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        if self.tail.buf.is_empty() {
            return Ok(());
        }
        if self.segments.is_empty() {
            return Ok(());
        }
        self.reserve(self.tail.end);
        let Some(segment) = self.segments.last() else {
            return Ok(());
        };
        if let Err(e) = segment.file.write_at(self.tail.flushed, &self.tail.buf) {
            self.poisoned = true;
            return Err(io_err(format!("write of {}", segment_name(segment.seq)))(e));
        }
        self.tail.flushed = self.tail.end;
        self.tail.buf.clear();
        self.tail.dirty = true;
        self.written = self.appended;
        Ok(())
    }

    /// Starts a new segment with room for a record of `need` bytes. The previous segment is synced
    /// first, so a torn write can only ever be in the last segment.
    fn roll(&mut self, need: u64) -> Result<()> {
        // No zeros go into the segment left after its last sync: detach the prefiller first.
        if let Some(shared) = &self.prefill {
            shared.attach(None, 0, 0);
        }
        if !self.segments.is_empty() {
            self.sync()?;
        }
        let seq = self.segments.last().map_or(1, |s| s.seq + 1);
        if seq == BASE_FILE {
            return Err(LogError::Invalid("segment numbers exhausted".into()));
        }
        let name = segment_name(seq);
        let capacity = self
            .config
            .segment_bytes
            .max(SEGMENT_HEADER_LEN as u64 + need);
        let file = match self.backend.open(&name, true) {
            Ok(file) => file,
            Err(e) => return Err(io_err(format!("creation of {name}"))(e)),
        };
        if let Err(e) = file.allocate(capacity) {
            self.poisoned = true;
            return Err(io_err(format!("allocation of {name}"))(e));
        }
        self.segments.push(Segment {
            seq,
            file,
            versions: None,
        });
        self.tail = Tail {
            end: SEGMENT_HEADER_LEN as u64,
            flushed: 0,
            buf: encode_segment_header(u64::from(seq), self.chain).to_vec(),
            capacity,
            last_at: 0,
            dirty: true,
            granted: 0,
        };
        self.attach_prefill();
        Ok(())
    }

    /// The zero-filler of this log: it writes zeros ahead of the append point of the active
    /// segment, so the appender's syncs find blocks already written (see [`crate::prefill`]).
    /// Run it on a thread of its own ([`Prefiller::run`]); it stops when the log is dropped.
    /// Every call hands out the same work.
    pub fn prefiller(&mut self) -> Prefiller {
        let shared = match &self.prefill {
            Some(shared) => shared.clone(),
            None => {
                let shared = Arc::new(prefill::Shared::default());
                self.prefill = Some(shared.clone());
                self.attach_prefill();
                shared
            }
        };
        Prefiller::new(shared)
    }

    /// Points the prefiller at the active segment, through a file of its own, the appender
    /// holding everything below the end of its records.
    fn attach_prefill(&mut self) {
        let Some(shared) = &self.prefill else {
            return;
        };
        // The prefiller's own open file (its own descriptor on the file backend); if it cannot
        // be had, the segment is simply not zero-filled.
        let own = self
            .segments
            .last()
            .and_then(|s| self.backend.open(&segment_name(s.seq), false).ok());
        let capacity = if own.is_some() { self.tail.capacity } else { 0 };
        self.tail.granted = shared.attach(own, capacity, self.tail.end.max(self.tail.flushed));
    }

    /// Reserves the active segment below `end` for the appender, which is about to write there.
    fn reserve(&mut self, end: u64) {
        if end > self.tail.granted {
            if let Some(shared) = &self.prefill {
                self.tail.granted = shared.reserve(end);
            }
        }
    }

    /// Writes a checkpoint of the indexes (after syncing), so the next open scans only what comes
    /// after it, and records the persisted version in the metadata.
    pub fn checkpoint(&mut self) -> Result<()> {
        self.sync()?;
        let Some(active) = self.segments.last() else {
            return Ok(());
        };
        let position = Position {
            segment: active.seq,
            end: self.tail.end,
            last_at: self.tail.last_at,
            last_crc: self.chain,
        };
        let ranges: Vec<SegmentRange> = self
            .segments
            .iter()
            .map(|s| SegmentRange {
                seq: s.seq,
                versions: s.versions,
            })
            .collect();
        let bytes = checkpoint::encode(
            position,
            &ranges,
            self.meta.horizon,
            &self.versions,
            &self.keys,
        );
        self.backend
            .replace(CHECKPOINT_FILE, &bytes)
            .map_err(io_err("write of the checkpoint"))?;
        self.meta.persisted = self.persisted;
        self.write_meta()?;
        self.since_checkpoint = 0;
        Ok(())
    }

    fn write_meta(&mut self) -> Result<()> {
        self.backend
            .replace(META_FILE, &self.meta.encode())
            .map_err(io_err("write of meta"))
    }

    /// Replaces the engine's opaque state (its view, ragged trims) in the metadata, durably.
    pub fn set_engine_state(&mut self, state: &[u8]) -> Result<()> {
        if state.len() > ENGINE_STATE_MAX {
            return Err(LogError::TooLarge {
                what: "engine state",
                len: state.len(),
                max: ENGINE_STATE_MAX,
            });
        }
        self.meta.engine = state.to_vec();
        self.write_meta()
    }

    /// The engine's opaque state as last set.
    pub fn engine_state(&self) -> &[u8] {
        &self.meta.engine
    }
}

impl Log {
    /// The last version and its stamp.
    pub fn latest(&self) -> Option<(Version, Hlc)> {
        self.versions.last()
    }

    /// The oldest readable version and its stamp (the trim horizon, once trimmed).
    pub fn oldest(&self) -> Option<(Version, Hlc)> {
        self.versions.first()
    }

    /// Versions appended and not removed by trim or truncation.
    pub fn version_count(&self) -> usize {
        self.versions.len()
    }

    /// Distinct keys with a history.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// The highest version known to be persisted under the sync policy.
    pub fn persisted(&self) -> Option<Version> {
        self.persisted
    }

    /// The trim horizon: reads before it fail.
    pub fn horizon(&self) -> Option<(Version, Hlc)> {
        self.meta.horizon
    }

    /// What recovery found when the log was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The stamp of exactly `version`, if the log holds it.
    pub fn stamp_of(&self, version: Version) -> Option<Hlc> {
        self.versions.stamp_of(version)
    }

    fn check_version(&self, at: Version) -> Result<()> {
        match self.meta.horizon {
            Some((h, hs)) if at < h => Err(LogError::Trimmed {
                horizon: h,
                horizon_stamp: hs,
                asked: format!("version {at:#x}"),
            }),
            _ => Ok(()),
        }
    }

    /// The version in force at time `t`: the last one stamped at or before `t`, or `None` if the
    /// log had no version yet then.
    pub fn version_at(&self, t: Hlc) -> Result<Option<Version>> {
        if let Some((h, hs)) = self.meta.horizon {
            if t < hs {
                return Err(LogError::Trimmed {
                    horizon: h,
                    horizon_stamp: hs,
                    asked: format!("time {t}"),
                });
            }
        }
        Ok(self.versions.at_time(t).map(|i| self.versions.versions[i]))
    }

    /// The value of `key` at `version`; `None` if it did not exist then.
    pub fn get(&self, key: &[u8], version: Version) -> Result<Option<Bytes>> {
        self.check_version(version)?;
        match self.keys.at(key, version) {
            Some(entry) => self.read_value(entry),
            None => Ok(None),
        }
    }

    /// Bytes `from..from + len` of the value of `key` at `version`, cut at the value's end (empty
    /// when `from` is past it), with the whole value's length; `None` if the key did not exist
    /// then. Reads only those bytes from the backend: a few bytes of a large value cost a few
    /// bytes of copy (memory) or of mapped pages touched (file), not the value's size. Like
    /// [`Log::get`] it does not verify a checksum: records are verified when the log is opened
    /// and when they are read for state transfer, not on each value read.
    pub fn get_range(
        &self,
        key: &[u8],
        version: Version,
        from: u64,
        len: usize,
    ) -> Result<Option<(Bytes, u64)>> {
        self.check_version(version)?;
        let Some(entry) = self.keys.at(key, version) else {
            return Ok(None);
        };
        let Some(total) = entry.len() else {
            return Ok(None);
        };
        let total = u64::from(total);
        let start = from.min(total);
        let end = start.saturating_add(len as u64).min(total);
        let bytes = self.read_part(entry, start, (end - start) as u32)?;
        Ok(Some((bytes, total)))
    }

    /// Where the value of `key` at `version` lies in the log's files, for a reader in another
    /// process on the same machine that reads those files itself (a client's local reads,
    /// docs/ARCHITECTURE.md). [`Location::Elsewhere`] when a reader could not find it there:
    /// the record is still in the write buffer, or the backend keeps no files in the local file
    /// system. The bytes a location names never change while the file exists: the log writes a
    /// record once and overwrites only bytes past its last valid record, which no location
    /// names.
    pub fn locate(&self, key: &[u8], version: Version) -> Result<Location> {
        self.check_version(version)?;
        let Some(entry) = self.keys.at(key, version) else {
            return Ok(Location::Absent);
        };
        let Some(len) = entry.len() else {
            return Ok(Location::Absent);
        };
        let offset = u64::from(entry.offset);
        let file = if entry.file == BASE_FILE {
            self.base.as_ref()
        } else {
            let i = self.segments.partition_point(|s| s.seq < entry.file);
            match self.segments.get(i).filter(|s| s.seq == entry.file) {
                Some(_)
                    if i + 1 == self.segments.len()
                        && offset + u64::from(len) > self.tail.flushed =>
                {
                    return Ok(Location::Elsewhere)
                }
                segment => segment.map(|s| &s.file),
            }
        };
        let file = file.ok_or_else(|| corrupt("log", offset, "index names a missing file"))?;
        Ok(match file.place() {
            Some(place) => Location::File(Located {
                place: place.clone(),
                offset,
                len,
            }),
            None => Location::Elsewhere,
        })
    }

    /// The latest value of `key`.
    pub fn get_latest(&self, key: &[u8]) -> Result<Option<Bytes>> {
        self.get(key, Version::MAX)
    }

    /// The value of `key` at time `t`.
    pub fn get_at_time(&self, key: &[u8], t: Hlc) -> Result<Option<Bytes>> {
        match self.version_at(t)? {
            Some(v) => self.get(key, v),
            None => Ok(None),
        }
    }

    /// The version and stamp of the change of `key` in force at `version`, if any.
    pub fn key_version(&self, key: &[u8], version: Version) -> Result<Option<(Version, Hlc)>> {
        self.check_version(version)?;
        Ok(self.keys.at(key, version).and_then(|e| {
            let v = e.version();
            self.versions.stamp_of(v).map(|s| (v, s))
        }))
    }

    /// Every change of `key` still in the log, oldest first (the first may be the trim horizon).
    pub fn history(&self, key: &[u8]) -> Vec<Change> {
        let Some(entries) = self.keys.get(key) else {
            return Vec::new();
        };
        entries
            .iter()
            .filter_map(|e| {
                let version = e.version();
                let hlc = self.versions.stamp_of(version)?;
                Some(Change {
                    version,
                    hlc,
                    value_len: e.len(),
                })
            })
            .collect()
    }

    /// The newest `limit` changes of `key` at or before `version` still in the log, oldest
    /// first: what [`Log::history`] holds up to `version`, its last `limit`, without walking
    /// or copying the older ones (the index keeps a key's changes in version order).
    pub fn history_newest(&self, key: &[u8], version: Version, limit: usize) -> Vec<Change> {
        let Some(entries) = self.keys.get(key) else {
            return Vec::new();
        };
        let end = entries.partition_point(|e| e.version() <= version);
        let mut newest: Vec<Change> = entries[..end]
            .iter()
            .rev()
            .filter_map(|e| {
                let version = e.version();
                let hlc = self.versions.stamp_of(version)?;
                Some(Change {
                    version,
                    hlc,
                    value_len: e.len(),
                })
            })
            .take(limit)
            .collect();
        newest.reverse();
        newest
    }

    /// Up to `limit` keys starting with `prefix` that exist at `version`, in order, after the key
    /// `after` when resuming. `limit` is at least 1.
    pub fn scan(
        &self,
        prefix: &[u8],
        version: Version,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<ScanPage> {
        self.check_version(version)?;
        if limit == 0 {
            // An empty page without a resume key would read as "no such keys".
            return Err(LogError::Invalid(
                "a scan page holds at least one key".into(),
            ));
        }
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let mut page = ScanPage::default();
        for (key, entries) in self.keys.range_from(start) {
            if !key.starts_with(prefix) {
                break;
            }
            if page.items.len() == limit {
                page.resume_after = page.items.last().map(|(k, _)| k.clone());
                break;
            }
            if let Some(entry) = entry_at(entries, version) {
                if let Some(value) = self.read_value(entry)? {
                    page.items.push((key.to_vec(), value));
                }
            }
        }
        Ok(page)
    }

    fn read_value(&self, entry: Entry) -> Result<Option<Bytes>> {
        let Some(len) = entry.len() else {
            return Ok(None);
        };
        self.read_part(entry, 0, len).map(Some)
    }

    /// Bytes `from..from + len` of the value `entry` points at (the caller keeps them inside it).
    fn read_part(&self, entry: Entry, from: u64, len: u32) -> Result<Bytes> {
        debug_assert!(entry
            .len()
            .is_some_and(|n| from + u64::from(len) <= u64::from(n)));
        let offset = u64::from(entry.offset) + from;
        let file = if entry.file == BASE_FILE {
            self.base.as_ref()
        } else {
            let i = self.segments.partition_point(|s| s.seq < entry.file);
            let segment = self.segments.get(i).filter(|s| s.seq == entry.file);
            if let Some(s) = segment {
                if i + 1 == self.segments.len() && offset >= self.tail.flushed {
                    let start = (offset - self.tail.flushed) as usize;
                    let bytes =
                        self.tail
                            .buf
                            .get(start..start + len as usize)
                            .ok_or_else(|| {
                                corrupt(
                                    &segment_name(s.seq),
                                    offset,
                                    "index points past the buffer",
                                )
                            })?;
                    return Ok(Bytes::copy_from_slice(bytes));
                }
            }
            segment.map(|s| &s.file)
        };
        let file = file.ok_or_else(|| corrupt("log", offset, "index names a missing file"))?;
        // The error's text is made only on an error: this runs for every read of a value.
        let bytes = file
            .read_at(offset, len as usize)
            .map_err(|e| io_err(format!("read of file {:#x} at {offset}", entry.file))(e))?;
        Ok(bytes)
    }
}

impl Log {
    /// Up to `records_max` records and `bytes_max` bytes of delta payload (at least one
    /// record, if any is left and `records_max` is not 0) of the records with versions after `after` (from the first if `None`) and at most `end`, in
    /// version order, for state transfer. Reads only what was handed to the backend (records
    /// still in the write buffer are not returned). `resume`, the cursor of the previous call
    /// whose last record was `after`, saves rescanning the segment. Reading before the trim
    /// horizon fails with [`LogError::Trimmed`].
    pub fn read_records(
        &self,
        after: Option<Version>,
        end: Version,
        bytes_max: usize,
        records_max: usize,
        resume: Option<RecordCursor>,
    ) -> Result<(Vec<StoredRecord>, Option<RecordCursor>)> {
        if let Some((horizon, stamp)) = self.meta.horizon {
            if after.is_none_or(|a| a < horizon) {
                return Err(LogError::Trimmed {
                    horizon,
                    horizon_stamp: stamp,
                    asked: format!("records after {after:?}"),
                });
            }
        }
        let resume = resume.filter(|c| Some(c.version) == after);
        let first = match resume {
            Some(cursor) => self.segments.iter().position(|s| s.seq == cursor.seq),
            None => self
                .segments
                .iter()
                .position(|s| s.versions.is_some_and(|(_, last)| Some(last) > after)),
        };
        let Some(first) = first else {
            return Ok((Vec::new(), None));
        };
        let mut records = Vec::new();
        let mut bytes_read = 0usize;
        let mut cursor = None;
        for (i, segment) in self.segments.iter().enumerate().skip(first) {
            let name = segment_name(segment.seq);
            let len = segment
                .file
                .len()
                .map_err(io_err(format!("size of {name}")))?;
            // Only what reached the backend: the rest of the last segment is in the buffer.
            let len = if i + 1 == self.segments.len() {
                len.min(self.tail.flushed)
            } else {
                len
            };
            if len <= SEGMENT_HEADER_LEN as u64 {
                continue;
            }
            let bytes = segment
                .file
                .read_at(0, len as usize)
                .map_err(io_err(format!("read of {name}")))?;
            let (pos, chain) = match resume.filter(|c| c.seq == segment.seq) {
                Some(c) => (c.offset as usize, c.chain),
                None => {
                    let (_, seed) =
                        decode_segment_header(&bytes).map_err(|r| corrupt(&name, 0, r))?;
                    (SEGMENT_HEADER_LEN, seed)
                }
            };
            let mut full = false;
            scan_records(&bytes, pos, chain, |at, h, _| {
                if full || h.version > end {
                    full = true;
                    return Err("stop");
                }
                let payload_len = h.payload_len as usize;
                if Some(h.version) > after {
                    if records.len() >= records_max
                        || (!records.is_empty() && bytes_read + payload_len > bytes_max)
                    {
                        full = true;
                        return Err("stop");
                    }
                    let start = at + RECORD_HEADER_LEN;
                    records.push(StoredRecord {
                        version: h.version,
                        hlc: h.hlc,
                        payload: bytes.slice(start..start + payload_len),
                    });
                    bytes_read += payload_len;
                }
                cursor = Some(RecordCursor {
                    seq: segment.seq,
                    offset: (at + h.record_len()) as u64,
                    chain: h.crc,
                    version: h.version,
                });
                Ok(())
            });
            if full {
                break;
            }
        }
        Ok((records, cursor))
    }

    /// Appends a version whose delta payload is `payload`, as [`Log::read_records`] returns
    /// it (state transfer copies records between replicas this way). The payload is checked.
    pub fn append_payload(&mut self, version: Version, hlc: Hlc, payload: &[u8]) -> Result<()> {
        let mut record = vec![0u8; RECORD_HEADER_LEN];
        record.extend_from_slice(payload);
        let mut spans = Vec::new();
        parse_payload(&record, |span| spans.push(span))
            .map_err(|reason| LogError::Invalid(format!("a delta payload: {reason}")))?;
        let writes: Vec<Write<'_>> = spans
            .iter()
            .map(|span| {
                let key_at = span.key_at as usize;
                let key = &record[key_at..key_at + usize::from(span.key_len)];
                let value = span.value_len.map(|len| {
                    let at = span.value_at as usize;
                    &record[at..at + len as usize]
                });
                Write { key, value }
            })
            .collect();
        self.append(version, hlc, &writes)
    }

    /// Drops history before `before`: the horizon becomes the last version at or before it, each
    /// key keeps its state at the horizon, and reads before the horizon fail. Returns the horizon.
    pub fn trim(&mut self, before: Version) -> Result<Option<Version>> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        let Some(i) = self.versions.at_or_below(before) else {
            // Nothing at or before `before`: any horizon already set stays where it is.
            return Ok(self.meta.horizon.map(|(h, _)| h));
        };
        let (h, hs) = (self.versions.versions[i], self.versions.stamp_at(i));
        if self.meta.horizon.is_some_and(|(old, _)| old >= h) {
            return Ok(self.meta.horizon.map(|x| x.0));
        }
        self.sync()?;

        // 1. Write the state at the horizon into a new base file and make it durable.
        let name = base_name(h);
        let file = self
            .backend
            .open(&name, true)
            .map_err(io_err(format!("creation of {name}")))?;
        let mut out = encode_segment_header(0, 0).to_vec();
        let mut chain = 0u32;
        let mut spans = Vec::new();
        let mut new_entries: Vec<(Key, Entry)> = Vec::new();
        let mut batch: Vec<(Key, Bytes)> = Vec::new();
        let mut batch_len = 4usize;
        let keys: Vec<(Key, Entry)> = self
            .keys
            .iter()
            .filter_map(|(k, es)| entry_at(es, h).map(|e| (k.clone(), e)))
            .collect();
        let mut flush_batch = |batch: &mut Vec<(Key, Bytes)>, out: &mut Vec<u8>| {
            let writes: Vec<Write<'_>> = batch
                .iter()
                .map(|(k, v)| Write::put(k, v.as_ref()))
                .collect();
            let at = out.len() as u32;
            chain = encode_record(out, &mut spans, chain, h, hs, RecordKind::Base, &writes);
            for ((k, _), s) in batch.iter().zip(&spans) {
                new_entries.push((
                    k.clone(),
                    Entry::new(h, BASE_FILE, at + s.value_at, s.value_len),
                ));
            }
            batch.clear();
        };
        for (key, entry) in keys {
            let Some(value) = self.read_value(entry)? else {
                continue;
            };
            let len = crate::record::WRITE_HEADER_LEN + key.len() + value.len();
            if batch_len + len > RECORD_PAYLOAD_MAX && !batch.is_empty() {
                flush_batch(&mut batch, &mut out);
                batch_len = 4;
            }
            batch_len += len;
            batch.push((key, value));
        }
        if !batch.is_empty() {
            flush_batch(&mut batch, &mut out);
        }
        if out.len() as u64 > u64::from(u32::MAX) {
            return Err(LogError::TooLarge {
                what: "state at the trim horizon",
                len: out.len(),
                max: u32::MAX as usize,
            });
        }
        // The header's sequence field holds the file's length, so that a base file cut short at
        // a record boundary (which would otherwise read as "fewer keys") is caught on load.
        let header = encode_segment_header(out.len() as u64, 0);
        out[..SEGMENT_HEADER_LEN].copy_from_slice(&header);
        file.write_at(0, &out)
            .and_then(|()| file.sync_data())
            .map_err(io_err(format!("write of {name}")))?;

        // 2. Switch the metadata to the new horizon: from here on the trim has happened.
        let old_base = self.meta.horizon.map(|(v, _)| base_name(v));
        self.meta.horizon = Some((h, hs));
        self.meta.persisted = self.persisted;
        self.write_meta()?;

        // 3. Update the indexes and drop what nothing refers to any more.
        self.versions.drop_before(i);
        let mut new_entries = new_entries.into_iter().peekable();
        for (key, entries) in self.keys.iter_mut() {
            let keep = entries.partition_point(|e| e.version() <= h);
            entries.drain(..keep);
            if new_entries.peek().is_some_and(|(k, _)| k == key) {
                if let Some((_, e)) = new_entries.next() {
                    entries.insert(0, e);
                }
            }
        }
        self.keys.retain(|_, es| !es.is_empty());
        self.base = Some(file);
        if let Some(old) = old_base {
            self.backend
                .remove(&old)
                .map_err(io_err(format!("removal of {old}")))?;
        }
        let active = self.segments.len() - 1;
        let mut removed = 0;
        for s in &self.segments[..active] {
            if s.versions.is_none_or(|(_, last)| last <= h) {
                let n = segment_name(s.seq);
                self.backend
                    .remove(&n)
                    .map_err(io_err(format!("removal of {n}")))?;
                removed += 1;
            } else {
                break;
            }
        }
        self.segments.drain(..removed);
        self.checkpoint()?;
        Ok(Some(h))
    }

    /// Drops history before time `t`; see [`Log::trim`].
    pub fn trim_before_time(&mut self, t: Hlc) -> Result<Option<Version>> {
        match self.versions.at_time(t) {
            Some(i) => self.trim(self.versions.versions[i]),
            None => Ok(None),
        }
    }

    /// Removes every version above `version` (the restart path cuts logs back to the ragged
    /// trim). The cut is durable when this returns.
    pub fn truncate_after(&mut self, version: Version) -> Result<()> {
        if self.poisoned {
            return Err(LogError::Poisoned);
        }
        self.check_version(version)?;
        if self.versions.last().is_none_or(|(last, _)| last <= version) {
            return Ok(());
        }
        self.sync()?;
        // The checkpoint may cover what is cut: remove it before cutting.
        self.backend
            .remove(CHECKPOINT_FILE)
            .map_err(io_err("removal of the checkpoint"))?;
        // The segments change under the prefiller: detach it before removing any.
        if let Some(shared) = &self.prefill {
            shared.attach(None, 0, 0);
            self.tail.granted = u64::MAX;
        }
        // Keep the first segment that holds a version above the cut, and drop the later ones.
        let keep = self
            .segments
            .iter()
            .position(|s| s.versions.is_some_and(|(_, last)| last > version))
            .unwrap_or(0);
        for s in self.segments.drain(keep + 1..) {
            let n = segment_name(s.seq);
            self.backend
                .remove(&n)
                .map_err(io_err(format!("removal of {n}")))?;
        }
        let segment = &mut self.segments[keep];
        let name = segment_name(segment.seq);
        let len = segment
            .file
            .len()
            .map_err(io_err(format!("size of {name}")))?;
        let bytes = segment
            .file
            .read_at(0, len as usize)
            .map_err(io_err(format!("read of {name}")))?;
        let (_, seed) = decode_segment_header(&bytes).map_err(|r| corrupt(&name, 0, r))?;
        let (mut cut, mut cut_chain, mut last_at, mut range) =
            (SEGMENT_HEADER_LEN, seed, 0u64, None);
        let (end, _, _) = scan_records(&bytes, SEGMENT_HEADER_LEN, seed, |at, h, _| {
            if h.version <= version {
                cut = at + h.record_len();
                cut_chain = h.crc;
                last_at = at as u64;
                range = Some((range.map_or(h.version, |(f, _)| f), h.version));
            }
            Ok(())
        });
        drop(bytes);
        // Overwrite the cut records with zeros instead of shrinking the file, so maps stay valid.
        let zeros = vec![0u8; end.saturating_sub(cut)];
        segment
            .file
            .write_at(cut as u64, &zeros)
            .and_then(|()| segment.file.sync_data())
            .map_err(io_err(format!("truncation of {name}")))?;
        segment.versions = range;
        self.chain = cut_chain;
        self.tail = Tail {
            end: cut as u64,
            flushed: cut as u64,
            buf: Vec::new(),
            capacity: len,
            last_at,
            dirty: false,
            granted: 0,
        };
        self.attach_prefill();
        let n = self.versions.at_or_below(version).map_or(0, |i| i + 1);
        self.versions.truncate(n);
        self.keys.truncate_after(version);
        let last = self.versions.last().map(|l| l.0);
        self.appended = last;
        self.written = last;
        self.persisted = last;
        if self
            .meta
            .persisted
            .is_some_and(|p| last.is_none_or(|l| p > l))
        {
            self.meta.persisted = last;
            self.write_meta()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CrashOptions, CrashingBackend};

    fn stamp(v: Version) -> Hlc {
        Hlc {
            wall_us: 1_000 + v,
            logical: 0,
        }
    }

    fn config(segment_bytes: u64) -> LogConfig {
        LogConfig {
            sync: SyncPolicy::Fsync,
            segment_bytes,
            write_buffer_bytes: 1 << 20,
            checkpoint_every_versions: 0,
        }
    }

    fn append(log: &mut Log, versions: std::ops::RangeInclusive<Version>) {
        for v in versions {
            log.append(v, stamp(v), &[Write::put(b"k", &[v as u8; 200])])
                .unwrap();
        }
    }

    /// The last version a process restarted after a power cut now finds.
    fn after_power_cut(cb: &CrashingBackend, seed: u64) -> Option<Version> {
        let after = cb.crash(
            seed,
            CrashOptions {
                torn_writes: true,
                garbage: true,
            },
        );
        let log = Log::open(Arc::new(after), config(4096)).unwrap();
        log.latest().map(|(v, _)| v)
    }

    fn new_log(cb: &CrashingBackend, segment_bytes: u64) -> Log {
        Log::open(Arc::new(cb.clone()), config(segment_bytes)).unwrap()
    }

    #[test]
    fn syncs_finished_out_of_order_report_a_version_only_when_every_earlier_sync_succeeded() {
        let cb = CrashingBackend::new();
        let mut log = new_log(&cb, 1 << 20);
        append(&mut log, 1..=5);
        let a = log.begin_sync().unwrap();
        append(&mut log, 6..=10);
        let b = log.begin_sync().unwrap();
        append(&mut log, 11..=15);
        let c = log.begin_sync().unwrap();
        assert_eq!(
            (a.covers(), b.covers(), c.covers()),
            (Some(5), Some(10), Some(15))
        );
        append(&mut log, 16..=20);

        // The last one finishes first: held, since the first may yet fail.
        let outcome = c.run();
        assert_eq!(log.finish_sync(c, outcome).unwrap(), None);
        let outcome = b.run();
        assert_eq!(log.finish_sync(b, outcome).unwrap(), None);
        assert_eq!(log.persisted(), None);
        // The first releases the run, up to the newest cover: never the versions appended
        // after the last sync began.
        let outcome = a.run();
        assert_eq!(log.finish_sync(a, outcome).unwrap(), Some(15));
        assert!(after_power_cut(&cb, 1) >= Some(15));

        // In order, each reports its own cover at once, and the frontier never goes back.
        let d = log.begin_sync().unwrap();
        append(&mut log, 21..=25);
        let e = log.begin_sync().unwrap();
        let outcome = d.run();
        assert_eq!(log.finish_sync(d, outcome).unwrap(), Some(20));
        let outcome = e.run();
        assert_eq!(log.finish_sync(e, outcome).unwrap(), Some(25));
        assert_eq!(log.persisted(), Some(25));
        assert!(after_power_cut(&cb, 2) >= Some(25));
    }

    #[test]
    fn a_failed_sync_between_successes_poisons_the_log_and_nothing_after_it_is_reported() {
        for failing in 0..3usize {
            let cb = CrashingBackend::new();
            let mut log = new_log(&cb, 1 << 20);
            let mut syncs = Vec::new();
            for (i, first) in [1u64, 6, 11].into_iter().enumerate() {
                append(&mut log, first..=first + 4);
                syncs.push((i, log.begin_sync().unwrap()));
            }
            // The others succeed first (the later ones before the earlier), then the failure.
            let mut order: Vec<_> = syncs.into_iter().rev().collect();
            let at = order.iter().position(|(i, _)| *i == failing).unwrap();
            let failed = order.remove(at);
            order.push(failed);
            // Versions the successes before the failing sync released.
            let released = (failing > 0).then(|| 5 * failing as Version);
            for (i, pending) in order {
                let outcome = if i == failing {
                    Err(std::io::Error::other("injected"))
                } else {
                    pending.run()
                };
                let result = log.finish_sync(pending, outcome);
                if i == failing {
                    assert!(matches!(result, Err(LogError::Io { .. })), "{result:?}");
                } else {
                    let persisted = result.unwrap();
                    assert!(persisted <= released, "{persisted:?} past {released:?}");
                }
            }
            assert_eq!(log.persisted(), released, "failing sync {failing}");
            assert!(matches!(log.begin_sync(), Err(LogError::Poisoned)));
            assert!(matches!(log.sync(), Err(LogError::Poisoned)));
        }
    }

    #[test]
    fn a_success_finished_after_a_failure_reports_nothing() {
        let cb = CrashingBackend::new();
        let mut log = new_log(&cb, 1 << 20);
        append(&mut log, 1..=5);
        let a = log.begin_sync().unwrap();
        append(&mut log, 6..=10);
        let b = log.begin_sync().unwrap();
        let failed = log.finish_sync(b, Err(std::io::Error::other("injected")));
        assert!(matches!(failed, Err(LogError::Io { .. })), "{failed:?}");
        let outcome = a.run();
        assert!(matches!(
            log.finish_sync(a, outcome),
            Err(LogError::Poisoned)
        ));
        assert_eq!(log.persisted(), None);
    }

    #[test]
    fn a_segment_roll_between_begin_and_finish_keeps_the_new_segment_to_sync() {
        let cb = CrashingBackend::new();
        let mut log = new_log(&cb, 4096);
        append(&mut log, 1..=3);
        let a = log.begin_sync().unwrap();
        let first = log.segments.last().map(|s| s.seq);
        // Enough to roll to a new segment (the roll syncs the segment it leaves).
        append(&mut log, 4..=40);
        assert_ne!(log.segments.last().map(|s| s.seq), first, "rolled");
        // The roll's own sync was begun after `a`: held until `a` finishes.
        assert_eq!(log.persisted(), None);
        let outcome = a.run();
        let persisted = log.finish_sync(a, outcome).unwrap();
        assert!(
            persisted >= Some(3) && persisted < Some(40),
            "{persisted:?}"
        );
        assert!(
            log.tail.dirty,
            "the new segment still holds unsynced records"
        );
        let b = log.begin_sync().unwrap();
        assert!(
            b.file.is_some(),
            "the sync after the roll syncs the new segment"
        );
        let outcome = b.run();
        assert_eq!(log.finish_sync(b, outcome).unwrap(), Some(40));
        assert_eq!(after_power_cut(&cb, 3), Some(40));
    }

    #[test]
    fn any_number_of_syncs_may_finish_while_an_earlier_one_runs() {
        // Regression: syncs held behind a slow one counted against the bound of syncs in
        // flight, so a slow disk made `begin_sync` (and a segment roll's sync) fail.
        let cb = CrashingBackend::new();
        let mut log = new_log(&cb, 1 << 20);
        append(&mut log, 1..=1);
        let slow = log.begin_sync().unwrap();
        // Later syncs finish in every order around the slow one: in order, and in pairs
        // finished newest first.
        for v in 2..(4 * SYNCS_IN_FLIGHT_MAX as Version) {
            append(&mut log, v..=v);
            let a = log.begin_sync().unwrap();
            if v % 2 == 0 {
                let outcome = a.run();
                assert_eq!(log.finish_sync(a, outcome).unwrap(), None);
            } else {
                let b = log.begin_sync().unwrap();
                let outcome = b.run();
                assert_eq!(log.finish_sync(b, outcome).unwrap(), None);
                let outcome = a.run();
                assert_eq!(log.finish_sync(a, outcome).unwrap(), None);
            }
        }
        assert_eq!(log.syncs.held.len(), 1, "the held syncs are one run");
        let last = 4 * SYNCS_IN_FLIGHT_MAX as Version - 1;
        let outcome = slow.run();
        assert_eq!(log.finish_sync(slow, outcome).unwrap(), Some(last));
        assert!(log.syncs.held.is_empty());
        assert!(after_power_cut(&cb, 4) >= Some(last));
    }

    #[test]
    fn more_syncs_begun_than_the_bound_are_refused() {
        let cb = CrashingBackend::new();
        let mut log = new_log(&cb, 1 << 20);
        append(&mut log, 1..=1);
        let open: Vec<_> = (0..SYNCS_IN_FLIGHT_MAX)
            .map(|_| log.begin_sync().unwrap())
            .collect();
        assert!(matches!(log.begin_sync(), Err(LogError::Invalid(_))));
        for pending in open.into_iter().rev() {
            let outcome = pending.run();
            log.finish_sync(pending, outcome).unwrap();
        }
        assert_eq!(log.persisted(), Some(1));
        assert!(log.begin_sync().is_ok());
    }
}
