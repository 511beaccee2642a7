//! Running one FUSE mount in the foreground until it is unmounted or the process is told to stop.
//!
//! `serve` mounts, answers the kernel with the given file system on `threads` workers, and
//! returns when the mount goes away: `umount` (or `umount -l`) from outside, or SIGINT/SIGTERM,
//! on which it unmounts itself. If the mount is busy (a file open, a process inside), it is
//! detached (`umount -l`) and the process exits at once, which ends the FUSE connection: the
//! process always ends, and leaves no dead mount behind; files still open there fail with
//! ENOTCONN. So a process that serves a mount must have nothing else to clean up after a signal. A process killed with SIGKILL cannot unmount: the kernel then
//! answers ENOTCONN on the mount point until `umount -l` (or `umount`) removes it, which always
//! works because nothing waits for the dead process.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::options::MountOptions;

/// Why a mount could not be made or served.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    MissingMountPoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting on {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving the mount on {path}: {source}")]
    Serve {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Checks that `path` is an existing directory, with an error that says which it is not.
pub fn check_mount_point(path: &Path) -> Result<(), MountError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(MountError::NotADirectory(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(MountError::MissingMountPoint(path.to_path_buf()))
        }
        // ENOTCONN: a dead FUSE mount is still there; say so rather than "not found".
        Err(source) => Err(MountError::MountPoint {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Mounts `fs` on `mountpoint` and serves it until the mount goes away (see the module doc).
/// `on_mounted` runs once the kernel has accepted the mount, before any request is served, with
/// the session's notifier (for the file system to drop what the kernel caches).
/// `fsname` is the source shown in `/proc/mounts` unless the options name one; the type shows as
/// `fuse.SUBTYPE`.
pub fn serve<FS: fuser::Filesystem>(
    fs: FS,
    mountpoint: &Path,
    options: &MountOptions,
    fsname: &str,
    subtype: &str,
    on_mounted: impl FnOnce(fuser::Notifier),
) -> Result<(), MountError> {
    check_mount_point(mountpoint)?;
    // Before mounting: afterwards, resolving the path would ask the mount, not yet served.
    let canonical = mountpoint
        .canonicalize()
        .map_err(|source| MountError::MountPoint {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let config = options.to_fuser(fsname, subtype);
    let mut session =
        fuser::Session::new(fs, mountpoint, &config).map_err(|source| MountError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let unmounter = Arc::new(Mutex::new(session.unmount_callable()));
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(MountError::Signals)?;
    let handle = signals.handle();
    let stopping = Arc::new(AtomicBool::new(false));
    let path = mountpoint.to_path_buf();
    let watcher = {
        let stopping = stopping.clone();
        let path = path.clone();
        std::thread::Builder::new()
            .name("mount-signals".into())
            .spawn(move || {
                for signal in signals.forever() {
                    // SIGHUP (a closed terminal) does not stop a mount; the others do.
                    if signal == SIGHUP {
                        continue;
                    }
                    if stopping.swap(true, Ordering::SeqCst) {
                        continue;
                    }
                    tracing::info!("signal {signal}: unmounting {}", path.display());
                    let result = unmounter.lock().map(|mut u| u.unmount());
                    if !matches!(result, Ok(Ok(()))) {
                        // Busy: detach it from the tree now, and end the connection by ending
                        // the process (closing /dev/fuse), so no user waits on a server that
                        // is going away: files still open there fail with ENOTCONN.
                        match lazy_unmount(&path) {
                            Ok(()) => tracing::warn!(
                                "{} was busy: detached; open files there now fail",
                                path.display()
                            ),
                            Err(e) => tracing::warn!("unmounting {}: {e}", path.display()),
                        }
                        std::process::exit(0);
                    }
                }
            })
            .map_err(MountError::Signals)?
    };
    if options.readahead_kb > 0 {
        set_readahead(&canonical, options.readahead_kb);
    }
    on_mounted(session.notifier());
    let result = session.run().map_err(|source| MountError::Serve {
        path: path.clone(),
        source,
    });
    handle.close();
    let _ = watcher.join();
    result
}

/// Sets the kernel's readahead window of the mount at `canonical` (the mount point's canonical
/// path, taken before mounting) to `kb` KiB. The kernel takes the window from the FUSE handshake,
/// where it cannot exceed its own 128 KiB default, so it is set after the handshake (which
/// `fuser::Session::new` completes): through the mount's `/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`,
/// the device found in `/proc/self/mountinfo` (nothing here sends the mount a request, which
/// would wait for a server not yet serving). If that fails (not root, no sysfs) the kernel's
/// default stays; the mount works either way.
fn set_readahead(canonical: &Path, kb: u32) {
    let result = mount_device(canonical).and_then(|device| {
        let file = format!("/sys/class/bdi/{device}/read_ahead_kb");
        std::fs::write(&file, format!("{kb}\n"))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{file}: {e}")))
    });
    match result {
        Ok(()) => tracing::debug!("readahead of {} set to {kb} KiB", canonical.display()),
        Err(e) => tracing::warn!(
            "readahead of {} left at the kernel's default: {e}",
            canonical.display()
        ),
    }
}

/// The `MAJOR:MINOR` of the newest mount at `canonical`, from `/proc/self/mountinfo`.
fn mount_device(canonical: &Path) -> std::io::Result<String> {
    use std::os::unix::ffi::OsStrExt;
    // mountinfo escapes these four bytes of a path as octal.
    let mut wanted = String::new();
    for &b in canonical.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => wanted.push_str(&format!("\\{b:03o}")),
            _ => wanted.push(char::from(b)),
        }
    }
    let info = std::fs::read("/proc/self/mountinfo")?;
    let info = String::from_utf8_lossy(&info);
    info.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
        .and_then(|l| l.split(' ').nth(2))
        .map(str::to_string)
        .ok_or_else(|| std::io::Error::other("the mount is not in /proc/self/mountinfo"))
}

/// `umount -l`: detaches the mount now; the kernel ends it when its last user leaves.
pub fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH).map_err(Into::into)
}
