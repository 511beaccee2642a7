//! Lending: on a link between two processes of one machine, a frame's large payload parts stay
//! in the sender's memory and the receiver copies them straight into its own with
//! `process_vm_readv(2)`: one copy per part instead of two (into the socket, out of it), and
//! none of the socket's per-buffer work (docs/PERFORMANCE.md, "Lending large parts on local
//! links").
//!
//! Each direction of a local link decides on its own (docs/FORMATS.md, "Lending"):
//! 1. The sender writes an **offer** as its first frame: the address of 32 random bytes in its
//!    memory and the same bytes inline.
//! 2. The receiver reads the address from the sender's process (its pid as the kernel gave it for
//!    the socket, `SO_PEERCRED`). If it reads the same bytes it answers **read** with the offer's
//!    sequence number; if it cannot (another user, no permission, another pid namespace), or
//!    does not take loans (a client that did not ask to, [`super::ClientConn::take_loans`]), it
//!    answers nothing, and the sender never lends: every frame then carries its bytes inline.
//! 3. Once answered, the sender may send a message as a **lent** frame: a descriptor of segments,
//!    each inline bytes or the address and length of a part in its memory. It keeps the parts
//!    (and the link's byte budget they took) until the receiver answers **read** with a sequence
//!    number at or past the frame's: every lent frame up to it has been copied.
//!
//! Reading another process's memory needs the same permission as tracing it, so lending gives a
//! receiver nothing it could not take already. A sender's address that cannot be read breaks the
//! link as a malformed frame; the sender's own memory is all a bad address can reach.
//!
//! A pid names whichever process holds it now: once the sender has exited, another process may
//! be given its pid, and a read by pid would copy that process's bytes. So the receiver also
//! holds a pidfd of the sender ([`PeerProcess`]), bound to that very process, and trusts a read
//! only if the sender had not exited once the read was done (a process that still runs holds its
//! pid). A lent frame read after the sender exited ends the link as one cut inside a frame.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::frame::{FrameError, FRAME_PAYLOAD_MAX};
use super::BreakReason;

/// Payload parts of at least this many bytes are lent; smaller ones travel inline (a lent part
/// costs a system call at the receiver and a share of an answer frame).
pub(crate) const LEND_PART_MIN: usize = 64 << 10;

/// Bytes of an offer's probe.
pub(crate) const PROBE_BYTES: usize = 32;

/// Bytes of an offer frame's payload: the probe's address, then the probe.
pub(crate) const OFFER_BYTES: usize = 8 + PROBE_BYTES;

/// Bytes of a read frame's payload: a sequence number.
pub(crate) const READ_BYTES: usize = 8;

/// Most segments in one lent frame's descriptor.
pub(crate) const SEGMENTS_MAX: usize = 1024;

const SEGMENT_INLINE: u32 = 0;
const SEGMENT_LENT: u32 = 1;

/// The process at the other end of a local link, as the kernel named it when the connection was
/// made: its pid, by which its memory is read, and a pidfd, which stays bound to that process
/// and tells whether it has exited (after which its pid may name another process).
#[derive(Debug)]
pub(crate) struct PeerProcess {
    pid: i32,
    pidfd: OwnedFd,
}

impl PeerProcess {
    /// The process that made the connection `socket` (whose credentials named `pid`): the
    /// kernel's pidfd of it (`SO_PEERPIDFD`, Linux 6.5 and later), or else a pidfd opened for
    /// `pid` now (`pidfd_open`). The latter names another process only if the peer exited and
    /// its pid was handed out again in between; no probe reads back from that one, so nothing
    /// is lent. `None` when neither is available: this end then takes no loans.
    #[allow(unsafe_code)]
    pub(crate) fn of_socket(socket: BorrowedFd<'_>, pid: i32) -> Option<PeerProcess> {
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` and `len` are valid for the kernel to write an int and its size.
        let got = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERPIDFD,
                (&mut fd as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if got == 0 && fd >= 0 {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Some(PeerProcess { pid, pidfd });
        }
        PeerProcess::open(pid).ok()
    }

    /// A pidfd opened for `pid` now.
    #[allow(unsafe_code)]
    fn open(pid: i32) -> std::io::Result<PeerProcess> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        Ok(PeerProcess { pid, pidfd })
    }

    /// The pid by which the process's memory is read.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process has not exited: its pidfd is not readable yet. An error of `poll`
    /// counts as exited (a read is then not trusted).
    #[allow(unsafe_code)]
    pub(crate) fn runs(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid pollfd, no waiting.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            if n >= 0 {
                return n == 0;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}

/// Parts lent in one frame, kept until the receiver says it copied them.
#[derive(Debug)]
struct Loan {
    seq: u64,
    _parts: Vec<Bytes>,
    _budget: Option<OwnedSemaphorePermit>,
}

/// What this end lent and was told.
#[derive(Debug, Default)]
struct Loans {
    /// Sequence number of this end's offer (0: none sent).
    offer_seq: u64,
    /// Highest sequence number the peer may name in a read: the offer's or a lent frame's.
    last_lent: u64,
    /// The last read the peer answered.
    read: u64,
    loans: VecDeque<Loan>,
}

/// The lending state of one end of a local link, shared by its reader and its writer.
#[derive(Debug)]
pub(crate) struct Lending {
    /// The peer's process as the kernel named it for the socket; `None` when unknown, and then
    /// this end takes no loans.
    peer: Option<Arc<PeerProcess>>,
    /// This end's offer's probe, at a fixed address for the link's life.
    probe: Box<[u8; PROBE_BYTES]>,
    /// The peer read the probe: this end's writer may lend.
    lends: AtomicBool,
    loans: Mutex<Loans>,
    /// This end takes loans: it reads the peer's offer (a node always; a client once asked).
    taking: AtomicBool,
    /// This end read the peer's probe: the peer's lent frames are accepted.
    accepts: AtomicBool,
    /// The highest sequence number of the peer's whose lent memory this end copied (the offer's
    /// included), for this end's writer to report; 0: nothing yet.
    answer: AtomicU64,
    /// Wakes this end's writer to report `answer`.
    pub(crate) wake: Notify,
    /// The link, as logs name it; with `announce`, the start of lending is logged at info.
    label: String,
    announce: bool,
    /// Lent frames this end sent, and parts it copied from the peer (for tests and status).
    lent_frames: AtomicU64,
    copied_parts: AtomicU64,
}

impl Lending {
    /// The lending state of one end of a local link whose peer is process `peer`; with
    /// `taking`, this end takes loans from the peer if it can read the peer's memory. `label`
    /// names the link in logs; with `announce` the start of lending is logged at info level
    /// (links between nodes), else at debug level.
    pub fn new(
        peer: Option<Arc<PeerProcess>>,
        taking: bool,
        label: String,
        announce: bool,
    ) -> Arc<Lending> {
        let mut probe = [0u8; PROBE_BYTES];
        // A probe of zeros would still work (the receiver compares with the inline copy); the
        // random bytes only make an accidental match at a wrong address unlikely.
        let _ = getrandom::fill(&mut probe);
        Arc::new(Lending {
            peer,
            probe: Box::new(probe),
            lends: AtomicBool::new(false),
            loans: Mutex::new(Loans::default()),
            taking: AtomicBool::new(taking),
            accepts: AtomicBool::new(false),
            answer: AtomicU64::new(0),
            wake: Notify::new(),
            label,
            announce,
            lent_frames: AtomicU64::new(0),
            copied_parts: AtomicU64::new(0),
        })
    }

    /// Has this end take loans from now on (an offer read later is answered).
    pub fn take_loans(&self) {
        self.taking.store(true, Ordering::Release);
    }

    fn loans(&self) -> MutexGuard<'_, Loans> {
        self.loans.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The payload of this end's offer: the probe's address, then the probe.
    pub fn offer_payload(&self) -> [u8; OFFER_BYTES] {
        let mut out = [0u8; OFFER_BYTES];
        out[..8].copy_from_slice(&(self.probe.as_ptr() as u64).to_le_bytes());
        out[8..].copy_from_slice(&self.probe[..]);
        out
    }

    /// Records that this end's offer went out as frame `seq`.
    pub fn offered(&self, seq: u64) {
        let mut loans = self.loans();
        loans.offer_seq = seq;
        loans.last_lent = seq;
    }

    /// Whether this end's writer may lend.
    pub fn lends(&self) -> bool {
        self.lends.load(Ordering::Acquire)
    }

    /// Whether a message of `parts` is worth lending: this end may, and a part is large.
    pub fn worth(&self, parts: &[Bytes]) -> bool {
        self.lends() && parts.iter().any(|p| p.len() >= LEND_PART_MIN)
    }

    /// Records that frame `seq` lent `lent` (from [`describe`]), holding `budget` until the peer
    /// has read them.
    pub fn lend(&self, seq: u64, lent: Vec<Bytes>, budget: Option<OwnedSemaphorePermit>) {
        let mut loans = self.loans();
        loans.last_lent = seq;
        loans.loans.push_back(Loan {
            seq,
            _parts: lent,
            _budget: budget,
        });
        self.lent_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// The peer answered read `payload`: every lent frame up to its sequence number was copied
    /// (or the offer's probe, which lets this end lend).
    pub fn on_read(&self, payload: &[u8]) -> Result<(), FrameError> {
        let seq = parse_read(payload)?;
        let mut loans = self.loans();
        if loans.offer_seq == 0
            || seq < loans.read
            || seq > loans.last_lent
            || seq < loans.offer_seq
        {
            return Err(FrameError::Loan(format!(
                "a read of frame {seq}, where frames {}..={} were offered or lent and {} answered",
                loans.offer_seq, loans.last_lent, loans.read
            )));
        }
        loans.read = seq;
        while loans.loans.front().is_some_and(|l| l.seq <= seq) {
            loans.loans.pop_front();
        }
        drop(loans);
        if !self.lends.swap(true, Ordering::AcqRel) {
            let (link, pid) = (&self.label, self.peer.as_ref().map(|p| p.pid()));
            if self.announce {
                tracing::info!(%link, ?pid, "the peer reads this end's memory: large parts are lent");
            } else {
                tracing::debug!(%link, ?pid, "the peer reads this end's memory: large parts are lent");
            }
        }
        Ok(())
    }

    /// The peer offered loans in frame `seq` with `payload`: if this end can read the probe
    /// from the peer's memory, it accepts and its writer answers.
    pub fn on_offer(&self, seq: u64, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != OFFER_BYTES {
            return Err(FrameError::Loan(format!(
                "an offer of {} bytes (an offer is {OFFER_BYTES})",
                payload.len()
            )));
        }
        let Some(peer) = self
            .peer
            .as_ref()
            .filter(|_| self.taking.load(Ordering::Acquire))
        else {
            return Ok(());
        };
        let pid = peer.pid();
        let addr = le_u64(&payload[..8]);
        let mut seen = BytesMut::with_capacity(PROBE_BYTES);
        match read_remote(pid, addr, PROBE_BYTES, &mut seen) {
            Ok(()) if !peer.runs() => {
                tracing::debug!(pid, "a lending peer exited before its probe was checked")
            }
            Ok(()) if seen[..] == payload[8..] => {
                self.accepts.store(true, Ordering::Release);
                self.report(seq);
            }
            Ok(()) => {
                tracing::debug!(
                    pid,
                    "a lending peer's probe reads other bytes; its frames come inline"
                )
            }
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot read a lending peer's memory; its frames come inline")
            }
        }
        Ok(())
    }

    /// Copies the message of lent frame `seq` with `descriptor` out of the peer's memory. A
    /// peer process that is gone (it died after sending the frame, so its pid names no process
    /// or, once handed out again, another one) ends the link as one that ended inside a frame;
    /// any other failure is a malformed frame.
    pub fn take(&self, seq: u64, descriptor: &[u8]) -> Result<Bytes, BreakReason> {
        let peer = match &self.peer {
            Some(peer) if self.accepts.load(Ordering::Acquire) => peer,
            _ => {
                return Err(FrameError::Loan(
                    "a lent frame on a link whose loans this end did not accept".into(),
                )
                .into())
            }
        };
        let pid = peer.pid();
        let assembled = assemble(descriptor, |addr, len, out| {
            read_remote(pid, addr, len, out).map_err(|e| {
                FrameError::Loan(format!(
                    "reading {len} bytes at {addr:#x} of process {pid}: {e}"
                ))
            })
        });
        // Still running after the reads: its pid named it throughout, so the bytes (or the
        // failure) are its own. Not running: whatever the reads gave (a pid naming no process,
        // `ESRCH`, or another one) says nothing of the frame.
        if !peer.runs() {
            return Err(BreakReason::Truncated);
        }
        let (payload, copied) = assembled?;
        self.copied_parts.fetch_add(copied, Ordering::Relaxed);
        self.report(seq);
        Ok(payload)
    }

    /// Has this end's writer report that frames up to `seq` of the peer's were copied.
    fn report(&self, seq: u64) {
        self.answer.fetch_max(seq, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// What this end's writer should report now, if anything past `reported`.
    pub fn answer_after(&self, reported: u64) -> Option<u64> {
        let answer = self.answer.load(Ordering::Acquire);
        (answer > reported).then_some(answer)
    }

    /// Lent frames this end sent.
    pub fn lent_frames(&self) -> u64 {
        self.lent_frames.load(Ordering::Relaxed)
    }

    /// Lent parts this end copied from its peer.
    pub fn copied_parts(&self) -> u64 {
        self.copied_parts.load(Ordering::Relaxed)
    }

    /// Loans not yet answered.
    pub fn outstanding(&self) -> usize {
        self.loans().loans.len()
    }
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("four bytes"))
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("eight bytes"))
}

/// The payload of a read frame naming `seq`.
pub(crate) fn read_payload(seq: u64) -> [u8; READ_BYTES] {
    seq.to_le_bytes()
}

fn parse_read(payload: &[u8]) -> Result<u64, FrameError> {
    if payload.len() != READ_BYTES {
        return Err(FrameError::Loan(format!(
            "a read of {} bytes (a read is {READ_BYTES})",
            payload.len()
        )));
    }
    Ok(le_u64(payload))
}

/// The descriptor of a message of `parts` (docs/FORMATS.md, "Lending"), and the parts it lends.
/// Small parts are copied inline, adjacent ones into one segment.
pub(crate) fn describe(parts: &[Bytes]) -> (BytesMut, Vec<Bytes>) {
    let total: usize = parts.iter().map(Bytes::len).sum();
    let inline: usize = parts
        .iter()
        .filter(|p| p.len() < LEND_PART_MIN)
        .map(Bytes::len)
        .sum();
    let mut out = BytesMut::with_capacity(8 + inline + parts.len() * 16);
    out.put_u32_le(total as u32);
    out.put_u32_le(0); // segment count, set below
    let mut segments = 0u32;
    let mut lent = Vec::new();
    let mut open_inline: Option<usize> = None; // offset of the open inline segment's length
    for part in parts.iter().filter(|p| !p.is_empty()) {
        if part.len() >= LEND_PART_MIN {
            open_inline = None;
            out.put_u32_le(part.len() as u32);
            out.put_u32_le(SEGMENT_LENT);
            out.put_u64_le(part.as_ptr() as u64);
            lent.push(part.clone());
            segments += 1;
        } else {
            match open_inline {
                Some(at) => {
                    let len = le_u32(&out[at..at + 4]) + part.len() as u32;
                    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
                }
                None => {
                    open_inline = Some(out.len());
                    out.put_u32_le(part.len() as u32);
                    out.put_u32_le(SEGMENT_INLINE);
                    segments += 1;
                }
            }
            out.extend_from_slice(part);
        }
    }
    out[4..8].copy_from_slice(&segments.to_le_bytes());
    (out, lent)
}

/// The message a descriptor describes, its lent segments fetched by `fetch(address, length,
/// out)` (which appends exactly `length` bytes or fails), and the number of lent segments.
/// Every field is checked before anything is fetched or allocated beyond the stated total.
pub(crate) fn assemble(
    descriptor: &[u8],
    mut fetch: impl FnMut(u64, usize, &mut BytesMut) -> Result<(), FrameError>,
) -> Result<(Bytes, u64), FrameError> {
    let bad = |what: String| Err(FrameError::Loan(format!("lent frame descriptor: {what}")));
    if descriptor.len() < 8 {
        return bad(format!(
            "{} bytes, shorter than its 8-byte head",
            descriptor.len()
        ));
    }
    let total = le_u32(&descriptor[0..4]) as usize;
    let count = le_u32(&descriptor[4..8]) as usize;
    if total > FRAME_PAYLOAD_MAX {
        return bad(format!(
            "a message of {total} bytes, above FRAME_PAYLOAD_MAX"
        ));
    }
    if count == 0 || count > SEGMENTS_MAX {
        return bad(format!("{count} segments (1 to {SEGMENTS_MAX})"));
    }
    // First pass: the segments' shapes, so a bad descriptor fetches nothing.
    let mut at = 8;
    let mut sum = 0usize;
    for i in 0..count {
        let Some(head) = descriptor.get(at..at + 8) else {
            return bad(format!("segment {i} of {count} is cut off"));
        };
        let len = le_u32(&head[0..4]) as usize;
        let kind = le_u32(&head[4..8]);
        if len == 0 {
            return bad(format!("segment {i} is empty"));
        }
        at += 8 + match kind {
            SEGMENT_INLINE => len,
            SEGMENT_LENT => 8,
            other => return bad(format!("segment {i} of unknown kind {other}")),
        };
        if at > descriptor.len() {
            return bad(format!("segment {i} of {count} is cut off"));
        }
        sum += len;
    }
    if at != descriptor.len() {
        return bad(format!(
            "{} bytes after the last segment",
            descriptor.len() - at
        ));
    }
    if sum != total {
        return bad(format!("segments of {sum} bytes for a message of {total}"));
    }
    let mut out = BytesMut::with_capacity(total);
    let mut at = 8;
    let mut copied = 0u64;
    for _ in 0..count {
        let len = le_u32(&descriptor[at..at + 4]) as usize;
        let kind = le_u32(&descriptor[at + 4..at + 8]);
        at += 8;
        if kind == SEGMENT_INLINE {
            out.extend_from_slice(&descriptor[at..at + len]);
            at += len;
        } else {
            let addr = le_u64(&descriptor[at..at + 8]);
            at += 8;
            let before = out.len();
            fetch(addr, len, &mut out)?;
            debug_assert_eq!(out.len(), before + len);
            copied += 1;
        }
    }
    Ok((out.freeze(), copied))
}

/// Appends `len` bytes at `addr` of process `pid` to `out`, copied by the kernel.
#[allow(unsafe_code)]
fn read_remote(pid: i32, addr: u64, len: usize, out: &mut BytesMut) -> std::io::Result<()> {
    out.reserve(len);
    let spare = out.spare_capacity_mut();
    let local = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` covers `len` bytes of `out`'s spare capacity (reserved above), which the
    // kernel only writes; `remote` names memory of another process, which the kernel checks and
    // this process never dereferences.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != len {
        return Err(std::io::Error::other(format!("copied {n} of {len} bytes")));
    }
    // SAFETY: the kernel wrote the `len` bytes after the initialized part.
    unsafe { out.set_len(out.len() + len) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(sizes: &[usize]) -> Vec<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from((0..n).map(|j| (i * 31 + j) as u8).collect::<Vec<u8>>()))
            .collect()
    }

    /// Fetches from this process's own memory: the descriptor names real addresses of `lent`.
    fn fetch_own(addr: u64, len: usize, out: &mut BytesMut) -> Result<(), FrameError> {
        read_remote(std::process::id() as i32, addr, len, out)
            .map_err(|e| FrameError::Loan(e.to_string()))
    }

    #[test]
    fn a_described_message_is_assembled_byte_for_byte() {
        for sizes in [
            vec![10],
            vec![LEND_PART_MIN],
            vec![7, LEND_PART_MIN + 3, 100, 5, 2 * LEND_PART_MIN, 9],
            vec![0, LEND_PART_MIN, 0, 0, 1],
        ] {
            let parts = parts(&sizes);
            let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
            let (descriptor, lent) = describe(&parts);
            assert_eq!(
                lent.len(),
                sizes.iter().filter(|&&n| n >= LEND_PART_MIN).count()
            );
            let inline: usize = sizes.iter().filter(|&&n| n < LEND_PART_MIN).sum();
            assert!(descriptor.len() <= inline + 8 + 16 * sizes.len());
            let (payload, copied) = assemble(&descriptor, fetch_own).unwrap();
            assert_eq!(&payload[..], &whole[..], "sizes {sizes:?}");
            assert_eq!(copied, lent.len() as u64);
        }
    }

    #[test]
    fn a_malformed_descriptor_is_refused_before_anything_is_fetched() {
        let parts = parts(&[5, LEND_PART_MIN, 6]);
        let (good, _lent) = describe(&parts);
        let never = |_: u64, _: usize, _: &mut BytesMut| -> Result<(), FrameError> {
            panic!("fetched from a malformed descriptor")
        };
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        cases.push((good[..7].to_vec(), "head"));
        let mut c = good.to_vec();
        c[0..4].copy_from_slice(&((FRAME_PAYLOAD_MAX + 1) as u32).to_le_bytes());
        cases.push((c, "above FRAME_PAYLOAD_MAX"));
        let mut c = good.to_vec();
        c[0..4].copy_from_slice(&((5 + LEND_PART_MIN + 7) as u32).to_le_bytes());
        cases.push((c, "segments of"));
        let mut c = good.to_vec();
        c[4..8].copy_from_slice(&0u32.to_le_bytes());
        cases.push((c, "0 segments"));
        let mut c = good.to_vec();
        c[4..8].copy_from_slice(&4u32.to_le_bytes());
        cases.push((c, "cut off"));
        let mut c = good.to_vec();
        c[12..16].copy_from_slice(&7u32.to_le_bytes());
        cases.push((c, "unknown kind 7"));
        let mut c = good.to_vec();
        c.push(0);
        cases.push((c, "after the last segment"));
        cases.push((good[..good.len() - 1].to_vec(), "cut off"));
        let mut c = good.to_vec();
        c[8..12].copy_from_slice(&0u32.to_le_bytes());
        cases.push((c, "empty"));
        for (bytes, why) in cases {
            let e = assemble(&bytes, never).unwrap_err().to_string();
            assert!(e.contains(why), "{e:?} should say {why:?}");
        }
    }

    #[test]
    fn an_unreadable_address_is_an_error_not_a_crash() {
        let mut descriptor = BytesMut::new();
        descriptor.put_u32_le(4096);
        descriptor.put_u32_le(1);
        descriptor.put_u32_le(4096);
        descriptor.put_u32_le(SEGMENT_LENT);
        descriptor.put_u64_le(8); // the first page is never mapped
        let e = assemble(&descriptor, fetch_own).unwrap_err().to_string();
        assert!(e.contains("Bad address") || e.contains("copied"), "{e}");
    }

    /// This process, as a link's peer.
    fn this_process() -> Option<Arc<PeerProcess>> {
        Some(Arc::new(
            PeerProcess::open(std::process::id() as i32).unwrap(),
        ))
    }

    /// A child process that has exited and been reaped, with the pidfd opened while it ran.
    fn exited_child() -> PeerProcess {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let peer = PeerProcess::open(child.id() as i32).unwrap();
        assert!(peer.runs(), "a child that runs");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!peer.runs(), "a child that exited");
        peer
    }

    #[test]
    fn a_lender_that_is_gone_ends_the_link_as_one_cut_inside_a_frame() {
        // A process that has exited and been reaped: its pid names no process (until the
        // kernel hands it out again, which it does not do at once).
        let receiver = Lending::new(Some(Arc::new(exited_child())), true, "test".into(), false);
        receiver.accepts.store(true, Ordering::Release);
        let big = parts(&[LEND_PART_MIN]);
        let (descriptor, _lent) = describe(&big);
        assert_eq!(
            receiver.take(2, &descriptor).unwrap_err(),
            BreakReason::Truncated
        );
        // This process's own memory at an address never mapped: malformed, not gone.
        let mine = Lending::new(this_process(), true, "test".into(), false);
        mine.accepts.store(true, Ordering::Release);
        let mut bad = BytesMut::new();
        bad.put_u32_le(4096);
        bad.put_u32_le(1);
        bad.put_u32_le(4096);
        bad.put_u32_le(SEGMENT_LENT);
        bad.put_u64_le(8);
        assert!(matches!(
            mine.take(2, &bad),
            Err(BreakReason::Malformed(FrameError::Loan(_)))
        ));
    }

    #[test]
    fn bytes_read_by_the_pid_of_a_lender_that_exited_are_not_trusted() {
        // The lender exited and its pid was handed out again, to a process whose memory holds
        // readable bytes at the lent address (here: this process, whose pid the peer's pid
        // stands for, with the pidfd still bound to the exited child).
        let reused = || {
            let gone = exited_child();
            Some(Arc::new(PeerProcess {
                pid: std::process::id() as i32,
                pidfd: gone.pidfd,
            }))
        };
        let receiver = Lending::new(reused(), true, "test".into(), false);
        receiver.accepts.store(true, Ordering::Release);
        let big = parts(&[LEND_PART_MIN, 100, LEND_PART_MIN]);
        let (descriptor, _lent) = describe(&big);
        assert_eq!(
            receiver.take(2, &descriptor).unwrap_err(),
            BreakReason::Truncated
        );
        assert_eq!(receiver.answer_after(0), None, "nothing reported copied");
        // The same frame from a lender that runs is taken whole.
        let live = Lending::new(this_process(), true, "test".into(), false);
        live.accepts.store(true, Ordering::Release);
        let taken = live.take(2, &descriptor).unwrap();
        assert_eq!(taken, big.concat());
        // Nor is an offer accepted whose probe was read by the pid of a lender that exited,
        // even though the bytes match.
        let sender = Lending::new(None, true, "test".into(), false);
        let offer = sender.offer_payload();
        let late = Lending::new(reused(), true, "test".into(), false);
        late.on_offer(1, &offer).unwrap();
        assert_eq!(late.answer_after(0), None);
    }

    #[test]
    fn loans_are_kept_until_read_and_reads_are_checked() {
        let lending = Lending::new(this_process(), true, "test".into(), false);
        // No offer yet: a read is malformed.
        assert!(lending.on_read(&read_payload(1)).is_err());
        lending.offered(1);
        assert!(!lending.lends());
        lending.on_read(&read_payload(1)).unwrap();
        assert!(lending.lends());
        let big = parts(&[LEND_PART_MIN]);
        for seq in 2..=4 {
            lending.lend(seq, describe(&big).1, None);
        }
        assert_eq!(lending.outstanding(), 3);
        // Past the last frame lent: malformed.
        assert!(lending.on_read(&read_payload(5)).is_err());
        lending.on_read(&read_payload(3)).unwrap();
        assert_eq!(lending.outstanding(), 1);
        // Going back: malformed.
        assert!(lending.on_read(&read_payload(2)).is_err());
        // A read of the wrong size: malformed.
        assert!(lending.on_read(&[1, 2, 3]).is_err());
        lending.on_read(&read_payload(4)).unwrap();
        assert_eq!(lending.outstanding(), 0);
    }

    #[test]
    fn an_offer_is_accepted_only_when_the_probe_reads_back() {
        let sender = Lending::new(None, true, "test".into(), false);
        let offer = sender.offer_payload();
        sender.offered(1);
        // A receiver that knows the sender's process (here: this one) reads the probe.
        let receiver = Lending::new(this_process(), true, "test".into(), false);
        receiver.on_offer(1, &offer).unwrap();
        assert_eq!(receiver.answer_after(0), Some(1));
        // The probe's bytes differ from the inline copy: no answer.
        let mut wrong = offer;
        wrong[8] ^= 1;
        let other = Lending::new(this_process(), true, "test".into(), false);
        other.on_offer(1, &wrong).unwrap();
        assert_eq!(other.answer_after(0), None);
        assert!(matches!(
            other.take(2, &describe(&parts(&[3])).0),
            Err(BreakReason::Malformed(FrameError::Loan(_)))
        ));
        // A receiver that does not know its peer's process never answers.
        let blind = Lending::new(None, true, "test".into(), false);
        blind.on_offer(1, &offer).unwrap();
        assert_eq!(blind.answer_after(0), None);
        // Nor one that does not take loans, until asked to.
        let client = Lending::new(this_process(), false, "test".into(), false);
        client.on_offer(1, &offer).unwrap();
        assert_eq!(client.answer_after(0), None);
        client.take_loans();
        client.on_offer(2, &offer).unwrap();
        assert_eq!(client.answer_after(0), Some(2));
        // An offer of the wrong size is malformed.
        assert!(receiver.on_offer(1, &offer[..10]).is_err());
    }
}
