//! Standard output and standard error of the commands, written without panics.
//!
//! Rust ignores SIGPIPE, so a write to a pipe whose reader has gone (`derechofs kv history K |
//! head -1`) fails with EPIPE, and `println!` turns that failure into a panic. The commands
//! print through [`outln!`] instead: it returns a [`StdoutError`] that travels up with `?`, so
//! the command stops where it is, its guards stop the processes it started and its
//! connections close, and `main` then ends the process as SIGPIPE ends `cat` or `ls`
//! ([`exit_closed_stdout`]). SIGPIPE itself stays ignored: the long-running commands (`node`,
//! `mount`, `up`) rely on EPIPE errors from their sockets, and a signal in the middle of a
//! benchmark would leave its node processes behind. Messages to standard error go through
//! [`errln!`], which drops a failed write: there is nowhere left to report it.

use std::fmt;
use std::io::Write;

/// A write to standard output failed.
#[derive(Debug, thiserror::Error)]
#[error("writing to standard output: {0}")]
pub struct StdoutError(#[from] pub std::io::Error);

impl StdoutError {
    /// Whether the reader of standard output has gone (EPIPE), as opposed to an error to
    /// report (a full disk, say).
    pub fn is_closed(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes one line to `out`.
pub fn write_line(out: &mut impl Write, args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    out.write_fmt(args)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Writes one line to standard output (flushed at the newline, so a closed reader shows at
/// once).
pub fn line(args: fmt::Arguments<'_>) -> Result<(), StdoutError> {
    write_line(&mut std::io::stdout().lock(), args)
}

/// Writes one line to standard error; a failed write is dropped.
pub fn error_line(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Ends the process after its standard output's reader has gone, the way SIGPIPE's default
/// action ends `cat`: killed by SIGPIPE, so a shell shows status 141 and prints nothing. Call
/// it only once the command has returned (its guards have run).
pub fn exit_closed_stdout() -> ! {
    // Resets SIGPIPE to its default action and raises it; should that fail, the status a
    // shell would show.
    let _ = signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGPIPE);
    std::process::exit(128 + signal_hook::consts::SIGPIPE)
}

/// `println!` that returns a [`StdoutError`] instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

/// `eprintln!` that drops a failed write instead of panicking.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::error_line(format_args!($($arg)*))
    };
}

pub(crate) use {errln, outln};
