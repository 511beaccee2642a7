//! The two kinds of connection a link runs on: TCP, and a Unix-domain stream socket between
//! processes on the same machine. The byte stream is the same on both (handshake, frames); only
//! the way it is carried differs.
//!
//! A node that listens on TCP address A may also listen on a socket file named after A
//! ([`local_socket_name`]) in a directory of its configuration. Whoever dials A with the same
//! directory tries that file first and falls back to TCP on any connect error (a stale file, a
//! node that stopped, a path too long): owning A on TCP is what lets a node bind the file, so
//! the file leads to the node that owns A.
//!
//! A local connection is registered with the runtime for readability only ([`LocalStream`]).
//! The kernel signals a Unix stream socket writable each time its peer reads what it sent, so a
//! socket registered for both (as tokio's `UnixStream` is) wakes its owner once more for every
//! message it sends, after the peer took it: one extra wake-up per request and per reply, which on
//! this machine's idle vCPUs costs ~100 us each. A TCP socket signals room only once its sender had
//! run out of it. So a local connection writes without asking, and only when the socket is full
//! registers a second handle of it for writability, until the write goes through.

use std::fmt;
use std::io::{self, IoSlice, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{tcp, TcpListener, TcpStream, UnixListener, UnixStream};

use super::lend::PeerProcess;

/// The directory of the local sockets when the configuration does not name one.
pub const LOCAL_SOCKET_DIR_DEFAULT: &str = "/run/derechofs";

/// Bytes of a socket file's path, without its terminating NUL, that fit in a `sockaddr_un`
/// (108 bytes of `sun_path` on Linux).
pub const SOCKET_PATH_MAX: usize = 107;

/// Bytes of the longest socket file name of an IPv4 address (`255.255.255.255:65535.sock`).
pub const SOCKET_NAME_V4_MAX: usize = 26;

/// Send buffer asked for on each end of a local connection (the kernel doubles it, within
/// `net.core.wmem_max`). A Unix stream socket's bytes in flight are bounded by the sender's
/// buffer alone (about 208 KiB by default, where loopback TCP grows to 4 MiB), so a 1 MiB frame
/// would otherwise cross in five or more rounds of the writer blocking and the reader waking.
pub const LOCAL_SEND_BUFFER_BYTES: usize = 2 << 20;

/// Widens the send buffer of a local connection; one that cannot be widened works as it is.
fn widen(stream: &UnixStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(LOCAL_SEND_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot widen a local socket's send buffer");
    }
}

/// Registers `inner` with the runtime for `interest`. `AsyncFd::with_interest` is deprecated
/// because a type may hand out a raw descriptor it does not own or that changes; the two types
/// registered here (a std `UnixStream`, an `OwnedFd`) own theirs and always return the same one,
/// until the `AsyncFd` drops them.
#[allow(deprecated)]
fn register<T: std::os::fd::AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    AsyncFd::with_interest(inner, interest)
}

/// One end of a local connection, registered for readability only (the module's doc says why).
/// Both halves of a split share the socket; the write half registers a duplicate of it for
/// writability only while a write finds the socket full.
#[derive(Debug)]
pub(crate) struct LocalStream {
    socket: Arc<AsyncFd<std::os::unix::net::UnixStream>>,
    /// Registered for writability while a write waits for room; `None` otherwise.
    room: Option<AsyncFd<OwnedFd>>,
    /// The process at the other end, as the kernel recorded it when the connection was made
    /// (`SO_PEERCRED`, and its pidfd), if it runs as this process's user; `None` otherwise, or
    /// if the kernel could not say.
    peer: Option<Arc<PeerProcess>>,
}

impl LocalStream {
    /// Takes a connected socket from tokio's registration into one for readability only.
    fn new(stream: UnixStream) -> io::Result<LocalStream> {
        widen(&stream);
        // Only a peer of this process's own user is one whose memory it may read (a node run as
        // root must not read another user's process, or a process that took its pid later). A
        // peer outside this process's pid namespace is reported as pid 0: not one either.
        let peer = stream
            .peer_cred()
            .ok()
            .filter(|cred| cred.uid() == effective_uid())
            .and_then(|cred| cred.pid())
            .filter(|&pid| pid > 0)
            .and_then(|pid| PeerProcess::of_socket(stream.as_fd(), pid))
            .map(Arc::new);
        let std = stream.into_std()?;
        Ok(LocalStream {
            socket: Arc::new(register(std, Interest::READABLE)?),
            room: None,
            peer,
        })
    }

    /// The other half of a split: the same socket.
    fn half(&self) -> LocalStream {
        LocalStream {
            socket: Arc::clone(&self.socket),
            room: None,
            peer: self.peer.clone(),
        }
    }

    /// The process at the other end, if the kernel said.
    pub(crate) fn peer(&self) -> Option<Arc<PeerProcess>> {
        self.peer.clone()
    }

    /// Writes what the socket takes now; when it is full, waits for room.
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&std::os::unix::net::UnixStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            match write(self.socket.get_ref()) {
                Ok(n) => {
                    // Room again: stop listening for it, so the peer's reads wake no one.
                    self.room = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.room.is_none() {
                // Registering reports the socket's present state, so room made since the failed
                // write is not missed.
                let dup = self.socket.get_ref().as_fd().try_clone_to_owned()?;
                self.room = Some(register(dup, Interest::WRITABLE)?);
            }
            let room = self.room.as_ref().expect("registered just above");
            let mut guard = ready!(room.poll_write_ready(cx))?;
            // Cleared before the write is tried again: room made after this is a new edge.
            guard.clear_ready();
        }
    }
}

impl AsFd for LocalStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.get_ref().as_fd()
    }
}

/// This process's effective user id.
#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: `geteuid` takes nothing, touches no memory, and cannot fail.
    unsafe { libc::geteuid() }
}

/// Receives into `buf`'s unfilled part, which may be uninitialized, and marks what came in as
/// filled. Zeroing the unfilled part first (`ReadBuf::initialize_unfilled`) would write the
/// whole spare capacity of a large frame's buffer again at every read of it: for a 1 MiB frame,
/// which arrives in several reads, more bytes than the frame.
#[allow(unsafe_code)]
fn recv_into(socket: &std::os::unix::net::UnixStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: `recv` only writes into the slice (socket2 takes it as `MaybeUninit`), so nothing
    // initialized is made uninitialized.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n = socket2::SockRef::from(socket).recv(unfilled)?;
    // SAFETY: the kernel wrote the first `n` bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

impl AsyncRead for LocalStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.socket.poll_read_ready(cx))?;
            let room = buf.remaining();
            match guard.try_io(|socket| recv_into(socket.get_ref(), buf)) {
                Ok(Ok(())) => {
                    // A read that did not fill the room found the socket drained (a stream
                    // socket's `recv` copies until the room or the queue ends): wait for the next
                    // edge rather than try a read that can only say "would block". Bytes that
                    // arrived since are a newer edge, which this does not clear.
                    let read = room - buf.remaining();
                    if read > 0 && read < room {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Not readable after all: the guard cleared the readiness; wait again.
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for LocalStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_write_with(cx, |mut socket| socket.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered here: a write is in the socket once it returns.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket.get_ref().shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The kind of connection a link runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LinkKind {
    /// TCP.
    Tcp,
    /// A Unix-domain stream socket on this machine.
    Local,
}

impl fmt::Display for LinkKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Local => "local",
        })
    }
}

/// Where the other end of a link is, as far as this end knows it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LinkAddr {
    /// A TCP connection: the peer's address (for an accepted connection, its source address).
    Tcp(SocketAddr),
    /// A Unix-domain connection through this socket file: the node's own file for an accepted
    /// connection (the dialing process has no address), the file dialed otherwise.
    Local(PathBuf),
}

impl LinkAddr {
    /// The kind of connection.
    pub fn kind(&self) -> LinkKind {
        match self {
            LinkAddr::Tcp(_) => LinkKind::Tcp,
            LinkAddr::Local(_) => LinkKind::Local,
        }
    }
}

impl fmt::Display for LinkAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkAddr::Tcp(addr) => write!(f, "{addr}"),
            LinkAddr::Local(path) => write!(f, "local:{}", path.display()),
        }
    }
}

/// The name of the socket file of a node listening on TCP address `addr`: the address as
/// written by [`SocketAddr`]'s `Display` (`127.0.0.1:7070`, `[::1]:7070`) and `.sock`.
pub fn local_socket_name(addr: SocketAddr) -> String {
    format!("{addr}.sock")
}

/// The socket file of the node listening on `addr`, in `dir`.
pub fn local_socket_path(dir: &Path, addr: SocketAddr) -> PathBuf {
    dir.join(local_socket_name(addr))
}

/// Checks a local socket directory from outside input: the path of a socket file of an IPv4
/// address in it must fit in a `sockaddr_un`. An empty path means no local sockets and passes.
pub fn check_local_socket_dir(dir: &Path) -> Result<(), String> {
    let len = dir.as_os_str().len();
    if len > 0 && len + 1 + SOCKET_NAME_V4_MAX > SOCKET_PATH_MAX {
        return Err(format!(
            "{} is {len} bytes: the socket files in it would not fit the {SOCKET_PATH_MAX} bytes of a Unix socket address (at most {} bytes)",
            dir.display(),
            SOCKET_PATH_MAX - 1 - SOCKET_NAME_V4_MAX
        ));
    }
    Ok(())
}

/// A connection of either kind.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Local(LocalStream),
}

impl Stream {
    /// Dials the node listening on TCP address `addr`: through its socket file in `local_dir`
    /// if there is one that accepts, else over TCP.
    pub async fn connect(
        addr: SocketAddr,
        local_dir: Option<&Path>,
    ) -> io::Result<(Stream, LinkAddr)> {
        let mut missing = None;
        if let Some(dir) = local_dir {
            let path = local_socket_path(dir, addr);
            match UnixStream::connect(&path).await {
                Ok(stream) => {
                    return Ok((
                        Stream::Local(LocalStream::new(stream)?),
                        LinkAddr::Local(path),
                    ));
                }
                // No file: the node is elsewhere or does not listen locally; the ordinary case.
                Err(e) if e.kind() == io::ErrorKind::NotFound => missing = Some(path),
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "local socket refused; dialing over TCP")
                }
            }
        }
        let stream = TcpStream::connect(addr).await?;
        if let Some(path) = missing {
            // A node binds its socket file before its TCP socket listens, so if it listens
            // locally the file is there now; it was missing a moment ago only if the node was
            // starting in between (peers started together). Local, then: the TCP connection
            // closes before its handshake.
            if let Ok(local) = UnixStream::connect(&path).await {
                return Ok((
                    Stream::Local(LocalStream::new(local)?),
                    LinkAddr::Local(path),
                ));
            }
        }
        stream.set_nodelay(true)?;
        Ok((Stream::Tcp(stream), LinkAddr::Tcp(addr)))
    }

    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Stream::Local(s) => {
                let w = s.half();
                (ReadHalf::Local(s), WriteHalf::Local(w))
            }
        }
    }
}

/// The reading half of a [`Stream`].
#[derive(Debug)]
pub(crate) enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Local(LocalStream),
}

/// The writing half of a [`Stream`].
#[derive(Debug)]
pub(crate) enum WriteHalf {
    Tcp(tcp::OwnedWriteHalf),
    Local(LocalStream),
}

macro_rules! impl_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Local(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! impl_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Local(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Local(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Tcp(s) => s.is_write_vectored(),
                    Self::Local(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Local(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Local(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

impl_read!(Stream);
impl_read!(ReadHalf);
impl_write!(Stream);
impl_write!(WriteHalf);

/// A listener of either kind.
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(TcpListener),
    /// With the path of its socket file.
    Local(UnixListener, PathBuf),
}

impl Listener {
    /// The next connection, and where it came from.
    pub async fn accept(&self) -> io::Result<(Stream, LinkAddr)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, addr) = listener.accept().await?;
                // A connection whose option cannot be set still works, only slower.
                let _ = stream.set_nodelay(true);
                Ok((Stream::Tcp(stream), LinkAddr::Tcp(addr)))
            }
            Listener::Local(listener, path) => {
                let (stream, _unnamed) = listener.accept().await?;
                Ok((
                    Stream::Local(LocalStream::new(stream)?),
                    LinkAddr::Local(path.clone()),
                ))
            }
        }
    }
}

/// Why the local socket of a node could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum LocalSocketError {
    /// The directory could not be created.
    #[error("cannot create the directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Something other than a socket has the socket file's name; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A stale socket file could not be removed.
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Binding failed (a path too long for a socket address, no permission, ...).
    #[error("cannot bind {path}: {source}")]
    Bind {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Binds the socket file of the node that owns TCP address `addr` (the caller has bound it):
/// creates `dir` if needed and removes a stale socket of that name first.
pub(crate) fn bind_local(
    dir: &Path,
    addr: SocketAddr,
) -> Result<(UnixListener, PathBuf), LocalSocketError> {
    std::fs::create_dir_all(dir).map_err(|source| LocalSocketError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = local_socket_path(dir, addr);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(&path).map_err(|source| LocalSocketError::RemoveStale {
                path: path.clone(),
                source,
            })?
        }
        Ok(_) => return Err(LocalSocketError::NotASocket(path)),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path).map_err(|source| LocalSocketError::Bind {
        path: path.clone(),
        source,
    })?;
    Ok((listener, path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (LocalStream, LocalStream) {
        let (a, b) = UnixStream::pair().expect("a socket pair");
        (
            LocalStream::new(a).expect("registered"),
            LocalStream::new(b).expect("registered"),
        )
    }

    /// Small writes from another thread, some back to back and some apart, read with a buffer
    /// far larger than any: nearly every read is short, and marks the socket drained. Bytes that
    /// arrive while a read runs are a newer edge, so none is left unread: everything arrives, in
    /// order, without the reader hanging.
    #[tokio::test(flavor = "current_thread")]
    async fn short_reads_wait_for_the_next_edge_and_miss_no_bytes() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("a socket pair");
        b.set_nonblocking(true).expect("non-blocking");
        let b = UnixStream::from_std(b).expect("registered with the runtime");
        let mut reader = LocalStream::new(b).expect("registered");
        const WRITES: usize = 20_000;
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let mut a = a;
            for i in 0..WRITES {
                let piece = [(i % 251) as u8; 7];
                a.write_all(&piece).expect("a write");
                if i % 97 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        });
        let mut got = Vec::with_capacity(WRITES * 7);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(30), reader.read(&mut buf))
                .await
                .expect("bytes within 30 s: no edge was lost")
                .expect("a read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        writer.join().expect("the writer");
        assert_eq!(got.len(), WRITES * 7);
        for (i, piece) in got.chunks(7).enumerate() {
            assert!(piece.iter().all(|&b| b == (i % 251) as u8), "piece {i}");
        }
    }

    /// Many times the send buffer written while the reader takes its time: every write that
    /// finds the socket full waits for room (the write interest registered only then) and the
    /// bytes arrive whole and in order.
    #[tokio::test(flavor = "current_thread")]
    async fn a_local_write_that_finds_the_socket_full_waits_for_room_and_loses_nothing() {
        let (a, b) = pair();
        let (mut a_read, mut a_write) = Stream::Local(a).into_split();
        let (mut b_read, mut b_write) = Stream::Local(b).into_split();
        const TOTAL: usize = 8 * LOCAL_SEND_BUFFER_BYTES;
        let bytes: Vec<u8> = (0..TOTAL).map(|i| (i % 251) as u8).collect();
        let sent = bytes.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(96 << 10) {
                let parts = [
                    IoSlice::new(&chunk[..chunk.len() / 2]),
                    IoSlice::new(&chunk[chunk.len() / 2..]),
                ];
                let mut written = 0;
                while written < chunk.len() {
                    // A vectored write of what is left of the two parts.
                    let n = if written < parts[0].len() {
                        a_write
                            .write_vectored(&[IoSlice::new(&parts[0][written..]), parts[1]])
                            .await
                            .expect("a write")
                    } else {
                        a_write
                            .write(&parts[1][written - parts[0].len()..])
                            .await
                            .expect("a write")
                    };
                    written += n;
                }
            }
            a_write.shutdown().await.expect("a shutdown");
            a_write
        });
        let mut got = Vec::with_capacity(TOTAL);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = tokio::time::timeout(std::time::Duration::from_secs(30), b_read.read(&mut buf))
                .await
                .expect("bytes within 30 s: a writer waiting for room was woken")
                .expect("a read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() % (1 << 20) < n {
                // Let the writer find the socket full now and then.
                tokio::task::yield_now().await;
            }
        }
        let _a_write = writer.await.expect("the writer");
        assert_eq!(got.len(), TOTAL);
        assert!(got == bytes, "the bytes arrived changed or out of order");
        // The other direction still works after the first one ended.
        b_write.write_all(b"back").await.expect("a write back");
        let mut back = [0u8; 4];
        a_read.read_exact(&mut back).await.expect("read back");
        assert_eq!(&back, b"back");
    }
}
