//! Zero-filling ahead of the append point.
//!
//! A segment is preallocated with `fallocate`, which leaves its blocks *unwritten*: the first
//! write into such a block converts it, and the `fdatasync` after an append then writes the
//! data, then the inode (the extent change, synchronously on a file system without a journal),
//! then flushes. Into blocks that were already written and synced, the same `fdatasync` writes
//! only the data. The [`Prefiller`] writes zeros, in chunks of [`PREFILL_CHUNK_BYTES`] each
//! followed by its own `fdatasync`, ahead of the append point of the active segment, on a
//! thread of the caller's, paced by [`Prefiller::run`], so the appender's syncs find written
//! blocks.
//!
//! The bytes are the same zeros `fallocate` gave: the on-disk format and recovery do not change
//! (zeros after the last record are the clean end of a segment).
//!
//! # The range each side writes
//! The appender *reserves* a prefix of the active segment, `[0, reserved)`, before it writes
//! into it ([`Shared::reserve`]), in steps of [`RESERVE_AHEAD_BYTES`]; the prefiller writes only
//! at or above `reserved`, and marks the chunk it is writing under the same lock. A reservation
//! that reaches into that chunk waits until its write returned. So a zero is never written over
//! a byte the appender wrote or is writing, whatever the interleaving (the appender's bytes are
//! all below `reserved` when written, and `reserved` only grows while a segment is active). When
//! the log changes segment (a roll, a truncation), it detaches the old one first, waiting for a
//! chunk being written to it.
//!
//! The prefiller writes through its own open file (its own descriptor): a write-back error is
//! reported to every descriptor open before it, so an `fdatasync` of the prefiller's that
//! consumes one leaves the appender's own syncs to report it too.

use std::fmt;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::backend::BackendFile;

/// Bytes of zeros the prefiller writes at a time, each chunk followed by an `fdatasync`.
pub const PREFILL_CHUNK_BYTES: u64 = 512 << 10;
/// The appender reserves this many bytes past its write at a time, so it takes the lock once
/// per this many bytes appended.
pub const RESERVE_AHEAD_BYTES: u64 = 64 << 10;
/// Zeros are written at most this far past the append point, plus as far again as the appender
/// has come in the segment: a log that stays small costs few zeros, one that grows gets them
/// ahead of it (at most as many as it wrote, plus this).
pub const PREFILL_LEAD_MIN_BYTES: u64 = 4 << 20;
/// How often a prefiller that is as far ahead as it may go looks again.
pub const PREFILL_POLL: Duration = Duration::from_millis(200);
/// How long the prefiller rests after the appender overtook every zero it wrote, or when the
/// log filled faster than [`Prefiller::run`]'s pace: such a log gains little from zeros, which
/// it passes at once.
pub const PREFILL_BACKOFF: Duration = Duration::from_secs(1);

/// What one [`Prefiller::step`] did.
#[derive(Debug)]
pub enum PrefillStep {
    /// Wrote and synced this many bytes of zeros.
    Wrote(u64),
    /// Nothing to do: no active segment, or it is zero-filled to its end.
    Idle,
    /// As far ahead of the append point as it may go ([`PREFILL_LEAD_MIN_BYTES`]).
    Ahead,
    /// The appender passed every zero written in the active segment: the log fills faster than
    /// the zeros are written. The next step starts again ahead of the append point.
    Overtaken,
    /// The log was dropped.
    Stopped,
    /// A write or sync of zeros failed. Zero-filling stops; the appender's own writes and syncs
    /// report any failure of theirs.
    Failed(io::Error),
}

#[derive(Default)]
struct State {
    /// The active segment, through the prefiller's own open file, and its size.
    file: Option<Arc<dyn BackendFile>>,
    capacity: u64,
    /// The appender writes only below this.
    reserved: u64,
    /// Zeros were written since the segment became active from some offset up to here; 0 when
    /// none were.
    zeroed: u64,
    /// The chunk being written, `[start, end)`.
    writing: Option<(u64, u64)>,
    stop: bool,
    failed: bool,
    /// Counts the changes of active segment.
    generation: u64,
    /// Bytes the appender reserved in all, over every segment: how fast the log fills.
    appended: u64,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("State")
            .field("active", &self.file.is_some())
            .field("capacity", &self.capacity)
            .field("reserved", &self.reserved)
            .field("zeroed", &self.zeroed)
            .field("writing", &self.writing)
            .field("stop", &self.stop)
            .finish()
    }
}

/// Whether a log that reserved `appended` bytes in `elapsed` fills faster than `rate` bytes a
/// second, judged on at least a chunk's worth of bytes (the appender reserves in steps).
pub fn fills_faster(appended: u64, elapsed: Duration, rate: u64) -> bool {
    appended >= PREFILL_CHUNK_BYTES && appended as f64 > rate as f64 * elapsed.as_secs_f64()
}

/// What the log and its prefiller share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled when a chunk's write ends and when the active segment changes or the log stops.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until no chunk is being written.
    fn idle<'a>(&self, mut guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        while guard.writing.is_some() {
            guard = self.wait(guard);
        }
        guard
    }

    /// Makes `file` (the prefiller's own open file of the new active segment, `capacity` bytes)
    /// the segment to fill, the appender having written or reserved below `reserved`; `None`
    /// detaches the old one. Returns the reservation the appender now holds.
    pub(crate) fn attach(
        &self,
        file: Option<Arc<dyn BackendFile>>,
        capacity: u64,
        reserved: u64,
    ) -> u64 {
        let mut st = self.idle(self.lock());
        let reserved = reserved.saturating_add(RESERVE_AHEAD_BYTES).min(capacity);
        st.file = file;
        st.capacity = capacity;
        st.reserved = reserved;
        st.zeroed = 0;
        st.generation += 1;
        drop(st);
        self.changed.notify_all();
        reserved
    }

    /// The appender is about to write below `end` of the active segment: extends its
    /// reservation past it (waiting for a chunk of zeros being written there) and returns it.
    pub(crate) fn reserve(&self, end: u64) -> u64 {
        let mut st = self.lock();
        while st.writing.is_some_and(|(start, _)| end > start) {
            st = self.wait(st);
        }
        let mut want = end.saturating_add(RESERVE_AHEAD_BYTES);
        if let Some((start, _)) = st.writing {
            want = want.min(start);
        }
        let reserved = st.reserved.max(want.max(end));
        st.appended += reserved - st.reserved;
        st.reserved = reserved;
        reserved
    }

    /// The log is going away: every later step returns [`PrefillStep::Stopped`].
    pub(crate) fn stop(&self) {
        let mut st = self.idle(self.lock());
        st.stop = true;
        st.file = None;
        drop(st);
        self.changed.notify_all();
    }
}

/// The zero-filling work of one log, to run on a thread of its own ([`Prefiller::run`]) or step
/// by step ([`Prefiller::step`]). Made by [`crate::Log::prefiller`].
#[derive(Debug, Clone)]
pub struct Prefiller {
    shared: Arc<Shared>,
    zeros: Arc<[u8]>,
}

impl Prefiller {
    pub(crate) fn new(shared: Arc<Shared>) -> Prefiller {
        Prefiller {
            shared,
            zeros: vec![0u8; PREFILL_CHUNK_BYTES as usize].into(),
        }
    }

    /// Stops the zero-filling for good (a [`Prefiller::run`] returns); the log goes on without.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// Writes and syncs the next chunk of zeros ahead of the append point, if there is one.
    pub fn step(&self) -> PrefillStep {
        let (file, start, end) = {
            let mut st = self.shared.lock();
            if st.stop {
                return PrefillStep::Stopped;
            }
            let Some(file) = st.file.clone().filter(|_| !st.failed) else {
                return PrefillStep::Idle;
            };
            if st.zeroed > 0 && st.reserved > st.zeroed {
                st.zeroed = 0;
                return PrefillStep::Overtaken;
            }
            let start = st.zeroed.max(st.reserved);
            if start >= st.capacity {
                return PrefillStep::Idle;
            }
            let lead = st
                .reserved
                .saturating_mul(2)
                .saturating_add(PREFILL_LEAD_MIN_BYTES);
            if start >= lead {
                return PrefillStep::Ahead;
            }
            // Chunks end on a multiple of their size, so a later start falls into step.
            let end = ((start / PREFILL_CHUNK_BYTES + 1) * PREFILL_CHUNK_BYTES)
                .min(st.capacity)
                .min(lead);
            st.writing = Some((start, end));
            (file, start, end)
        };
        let outcome = file.write_at(start, &self.zeros[..(end - start) as usize]);
        {
            let mut st = self.shared.lock();
            st.writing = None;
            if outcome.is_ok() {
                st.zeroed = end;
            } else {
                st.failed = true;
            }
        }
        self.shared.changed.notify_all();
        if let Err(e) = outcome {
            return PrefillStep::Failed(e);
        }
        // Outside the lock: the appender's reservations go on during the sync.
        if let Err(e) = file.sync_data() {
            self.shared.lock().failed = true;
            return PrefillStep::Failed(e);
        }
        PrefillStep::Wrote(end - start)
    }

    /// Zero-fills ahead of the append point at most `mib_per_s` MiB a second (at least 1), until
    /// the log is dropped or a write of zeros fails (returned). While the log fills faster than
    /// that ([`fills_faster`]), it writes nothing: the appender would pass the zeros at once,
    /// and its syncs are large, so the inode write they save is a small part of them.
    pub fn run(&self, mib_per_s: u64) -> io::Result<()> {
        let rate = mib_per_s.max(1) << 20;
        let mut seen = (Instant::now(), self.shared.lock().appended);
        loop {
            let (now, appended) = (Instant::now(), self.shared.lock().appended);
            let fast = fills_faster(appended - seen.1, now - seen.0, rate);
            seen = (now, appended);
            if fast {
                self.rest(Some(PREFILL_BACKOFF));
                continue;
            }
            let rest = match self.step() {
                PrefillStep::Stopped => return Ok(()),
                PrefillStep::Failed(e) => return Err(e),
                PrefillStep::Wrote(n) => {
                    Some(Duration::from_micros(n.saturating_mul(1_000_000) / rate))
                }
                PrefillStep::Overtaken => Some(PREFILL_BACKOFF),
                PrefillStep::Ahead => Some(PREFILL_POLL),
                PrefillStep::Idle => None,
            };
            self.rest(rest);
        }
    }

    /// Waits `time` (or, `None`, until the active segment changes), waking early when the log
    /// stops.
    fn rest(&self, time: Option<Duration>) {
        let mut st = self.shared.lock();
        let generation = st.generation;
        let until = time.map(|t| Instant::now() + t);
        loop {
            if st.stop {
                return;
            }
            match until {
                Some(until) => {
                    let now = Instant::now();
                    if now >= until {
                        return;
                    }
                    st = self
                        .shared
                        .changed
                        .wait_timeout(st, until - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                None => {
                    let work =
                        st.file.is_some() && !st.failed && st.zeroed.max(st.reserved) < st.capacity;
                    if st.generation != generation || work {
                        return;
                    }
                    st = self.shared.wait(st);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_filling_faster_than_the_pace_is_fast_judged_on_a_chunk_at_least() {
        let rate = 64 << 20;
        let ms = Duration::from_millis;
        // 100 MiB/s against 64: fast.
        assert!(fills_faster(100 << 20, ms(1000), rate));
        assert!(fills_faster(1 << 20, ms(10), rate));
        // 2.5 MB/s (many small synced puts): slow.
        assert!(!fills_faster(2_500_000, ms(1000), rate));
        // One reservation step in a short window is not a rate.
        assert!(!fills_faster(RESERVE_AHEAD_BYTES, ms(1), rate));
        assert!(!fills_faster(0, Duration::ZERO, rate));
    }
}
