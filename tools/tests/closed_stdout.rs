//! Multi-process tests: a command whose standard output's reader has gone
//! (`derechofs kv history K | head -1`) ends as SIGPIPE ends `cat`, killed by SIGPIPE, quietly:
//! never a panic ("failed printing to stdout: Broken pipe", exit status 101), never an error
//! message. A failure to write that is not a closed reader (a full disk) is an error that names
//! standard output.
//!
//! Most runs give the command a pipe whose reader is closed before it starts, so its first
//! line meets EPIPE whatever the timing; one run reads a line and then closes, as `head -1`
//! does, on an output far larger than a pipe holds.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Cluster, BIN, COMMAND_TIMEOUT};
use derechofs_storage::backend::FileBackend;
use derechofs_storage::{Hlc, Log, LogConfig, SyncPolicy, Write};

/// Keys of the shard log `dump` prints: one line each, about 60 bytes, so the output (over
/// 1 MiB) is far more than a pipe holds (64 KiB by default).
const DUMP_KEYS: u64 = 20_000;

/// Waits for `child`, bounded by `COMMAND_TIMEOUT`; returns how it ended and its standard
/// error (written to `err`).
fn finish(mut child: Child, err: &Path, what: &str) -> (ExitStatus, String) {
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not finish in {COMMAND_TIMEOUT:?}");
            }
        }
    };
    (status, std::fs::read_to_string(err).unwrap_or_default())
}

/// Starts `derechofs ARGS…` with its standard output a pipe whose reader is already closed.
fn start_closed(dir: &Path, args: &[&str]) -> Child {
    let (reader, writer) = rustix::pipe::pipe().expect("a pipe");
    drop(reader);
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(writer))
        .stderr(File::create(dir.join("closed.err")).expect("error file"))
        .spawn()
        .expect("run derechofs")
}

/// Runs `derechofs ARGS…` with a closed standard output and checks how it ended.
fn run_closed(dir: &Path, args: &[&str]) {
    let child = start_closed(dir, args);
    let (status, stderr) = finish(child, &dir.join("closed.err"), &format!("{args:?}"));
    assert_ended_by_sigpipe(&format!("derechofs {args:?}"), status, &stderr);
}

fn assert_ended_by_sigpipe(what: &str, status: ExitStatus, stderr: &str) {
    assert!(
        !stderr.contains("panicked"),
        "{what} panicked on a closed standard output: {stderr}"
    );
    assert_ne!(status.code(), Some(101), "{what}: {stderr}");
    assert!(
        !stderr.contains("derechofs: error"),
        "{what} reported an error for a closed standard output: {stderr}"
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGPIPE),
        "{what} did not end by SIGPIPE ({status}): {stderr}"
    );
}

/// Writes a node data directory whose shard 0 log holds `DUMP_KEYS` keys.
fn write_data_dir(data: &Path) {
    let dir = data.join("shard-0");
    std::fs::create_dir_all(&dir).expect("shard directory");
    let backend = FileBackend::open(&dir).expect("backend");
    let config = LogConfig {
        sync: SyncPolicy::None,
        ..LogConfig::default()
    };
    let mut log = Log::open(Arc::new(backend), config).expect("log");
    let value = [0x5Au8; 100];
    for v in 1..=DUMP_KEYS {
        let key = format!("key-{v:08}");
        log.append(v, Hlc::at(1_000 + v), &[Write::put(key.as_bytes(), &value)])
            .expect("append");
    }
    log.sync().expect("sync");
}

#[test]
fn t16_dump_read_one_line_at_a_time_then_closed_ends_by_sigpipe_and_a_full_disk_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    write_data_dir(&data);
    let data = data.to_str().expect("utf-8 path");
    let err = dir.path().join("dump.err");

    // As `derechofs dump … | head -1`: one line read, then the reader closes.
    let mut child = Command::new(BIN)
        .args(["dump", "--data-dir", data])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&err).expect("error file"))
        .spawn()
        .expect("run derechofs dump");
    let mut first = String::new();
    {
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        reader.read_line(&mut first).expect("the first line");
    }
    assert!(
        first.starts_with(&format!("shard 0 versions {DUMP_KEYS} ")),
        "the first line of the dump: {first:?}"
    );
    let (status, stderr) = finish(child, &err, "dump | head -1");
    assert_ended_by_sigpipe("dump | head -1", status, &stderr);

    run_closed(dir.path(), &["dump", "--data-dir", data]);

    // Not a closed reader: a full device is reported, naming standard output.
    let child = Command::new(BIN)
        .args(["dump", "--data-dir", data])
        .stdin(Stdio::null())
        .stdout(
            File::options()
                .write(true)
                .open("/dev/full")
                .expect("/dev/full"),
        )
        .stderr(File::create(&err).expect("error file"))
        .spawn()
        .expect("run derechofs dump");
    let (status, stderr) = finish(child, &err, "dump > /dev/full");
    assert_eq!(status.code(), Some(1), "dump > /dev/full: {stderr}");
    assert!(
        stderr.contains("derechofs: error: writing to standard output")
            && !stderr.contains("panicked"),
        "dump > /dev/full: {stderr}"
    );
}

#[test]
fn t15_every_printing_command_with_a_closed_standard_output_ends_by_sigpipe_without_a_panic() {
    let cluster = Cluster::new(15, 3, "suspect_after_ms = 5000\ntime_read_wait_ms = 5000\n");
    cluster.start_all();
    cluster.wait_active();
    let contacts = cluster.contacts();
    let dir = cluster.dir.path();
    for i in 0..5 {
        cluster.kv_ok(&["put", "k", &format!("value {i}")]);
    }
    let kv = |args: &[&str]| {
        let mut all = vec!["kv", "--contacts", &contacts];
        all.extend_from_slice(args);
        run_closed(dir, &all);
    };
    kv(&["history", "k"]);
    kv(&["get", "k"]);
    kv(&["get", "--long", "k"]);
    kv(&["put", "k", "written with a closed output"]);
    run_closed(dir, &["status", "--contacts", &contacts]);
    // The file system's root has a history once a client opened the file system.
    let log = cluster.run(&["log", "--contacts", &contacts, "/"]);
    assert!(log.code == 0 && !log.stdout.is_empty(), "log /: {log:?}");
    run_closed(dir, &["log", "--contacts", &contacts, "/"]);

    // `kv watch` meets the closed output at its first change, and ends.
    let mut watch = start_closed(
        dir,
        &["kv", "--contacts", &contacts, "watch", "w/", "--count", "5"],
    );
    let err = dir.join("closed.err");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while !std::fs::read_to_string(&err)
        .unwrap_or_default()
        .contains("watching")
    {
        assert!(
            Instant::now() < deadline && matches!(watch.try_wait(), Ok(None)),
            "the watch did not start: {:?}",
            std::fs::read_to_string(&err)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.kv_ok(&["put", "w/1", "seen by the watch"]);
    let (status, stderr) = finish(watch, &err, "kv watch");
    assert_ended_by_sigpipe("kv watch", status, &stderr);

    // A benchmark stops at its first row.
    let files = dir.join("files");
    std::fs::create_dir(&files).expect("bench directory");
    run_closed(
        dir,
        &[
            "bench",
            "files",
            files.to_str().expect("utf-8 path"),
            "--count",
            "10",
        ],
    );
}
