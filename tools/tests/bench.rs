//! Smoke tests of the benchmarks: each runs for a moment and must print well-formed rows whose
//! numbers are consistent (something was done, p50 ≤ p99). Timings are not checked: speed is
//! what the benchmarks report, not what tests assert.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_derechofs");
/// Longest a benchmark command may run before it is killed and the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `derechofs ARGS…` bounded by `COMMAND_TIMEOUT`; returns its stdout, or panics with
/// its stderr when it fails.
fn run(args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start derechofs");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("derechofs {args:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out.join().expect("stdout"), err.join().expect("stderr"));
    assert!(
        status.success(),
        "derechofs {args:?} failed ({status}):\n{err}"
    );
    out
}

/// The cells of the table rows (not the header or its rule) of Markdown output.
fn rows(output: &str) -> Vec<Vec<String>> {
    output
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("|---"))
        .skip(1)
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

fn number(cell: &str) -> f64 {
    cell.parse()
        .unwrap_or_else(|_| panic!("{cell:?} is not a number"))
}

#[test]
fn bench_kv_prints_one_row_per_run_with_work_done_and_ordered_percentiles() {
    let dir = tempfile::tempdir().expect("temp dir");
    for workload in ["put", "contended-cas"] {
        let out = run(&[
            "bench",
            "kv",
            "--dir",
            dir.path().join(workload).to_str().expect("utf-8 path"),
            "--workload",
            workload,
            "--clients",
            "2",
            // Both clients on one set of links: requests of two clients on each connection.
            "--conns",
            "1",
            "--seconds",
            "0.5",
            "--header",
        ]);
        let rows = rows(&out);
        assert_eq!(rows.len(), 1, "one row:\n{out}");
        let row = &rows[0];
        assert_eq!(row.len(), 7, "seven columns:\n{out}");
        assert_eq!(row[0], "derechofs");
        assert!(row[1].starts_with(workload), "{out}");
        assert_eq!(row[2], "100 B");
        assert_eq!(row[3], "2");
        let (ops, p50, p99) = (number(&row[4]), number(&row[5]), number(&row[6]));
        assert!(ops > 0.0, "{out}");
        assert!(p50 > 0.0 && p50 <= p99, "{out}");
    }
}

#[test]
fn bench_multicast_prints_a_row_per_size_with_deliveries_and_ordered_percentiles() {
    let out = run(&[
        "bench",
        "multicast",
        "--sizes",
        "100,4096",
        "--seconds",
        "1",
        "--warmup",
        "0.2",
        // Small batches and little in flight, so an unoptimized build moves data in a second.
        "--inflight-bytes",
        "262144",
        "--batch-bytes",
        "65536",
    ]);
    let rows = rows(&out);
    assert_eq!(rows.len(), 2, "one row per size:\n{out}");
    for (row, size) in rows.iter().zip(["100 B", "4 KiB"]) {
        assert_eq!(row.len(), 6, "six columns:\n{out}");
        assert_eq!(row[0], size);
        assert_eq!(row[1], "3");
        let (mb, msgs, p50, p99) = (
            number(&row[2]),
            number(&row[3]),
            number(&row[4]),
            number(&row[5]),
        );
        assert!(mb > 0.0 && msgs > 0.0, "{out}");
        assert!(p50 > 0.0 && p50 <= p99, "{out}");
    }
}

/// Over local links, with messages large enough to be lent, the members deliver as over TCP.
#[test]
fn bench_multicast_over_local_links_delivers_lent_messages() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sockets = dir.path().join("s");
    let out = run(&[
        "bench",
        "multicast",
        "--sizes",
        "131072",
        "--seconds",
        "1",
        "--warmup",
        "0.2",
        "--inflight-bytes",
        "1048576",
        "--local-socket-dir",
        sockets.to_str().expect("utf-8 path"),
    ]);
    let rows = rows(&out);
    assert_eq!(rows.len(), 1, "one row:\n{out}");
    assert_eq!(rows[0][0], "128 KiB");
    assert!(number(&rows[0][2]) > 0.0, "{out}");
}

#[test]
fn bench_restart_prints_a_row_per_size_whose_log_holds_what_was_written() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(&[
        "bench",
        "restart",
        "--dir",
        dir.path().to_str().expect("utf-8 path"),
        "--mib",
        "1",
        "--writers",
        "2",
    ]);
    let rows = rows(&out);
    assert_eq!(rows.len(), 1, "one row per size:\n{out}");
    let row = &rows[0];
    assert_eq!(row.len(), 5, "five columns:\n{out}");
    let (written, log) = (number(&row[0]), number(&row[1]));
    assert!(written >= 1.0, "{out}");
    assert!(
        log >= written,
        "each node's log holds every value written:\n{out}"
    );
    let (first, active) = (number(&row[3]), number(&row[4]));
    assert!(first > 0.0 && active > 0.0, "{out}");
}

#[test]
fn bench_join_prints_a_row_where_the_spare_took_a_killed_members_shard_with_every_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = run(&[
        "bench",
        "join",
        "--dir",
        dir.path().to_str().expect("utf-8 path"),
        "--mib",
        "1",
        "--writers",
        "2",
    ]);
    let rows = rows(&out);
    assert_eq!(rows.len(), 1, "one row per size:\n{out}");
    let row = &rows[0];
    assert_eq!(row.len(), 11, "eleven columns:\n{out}");
    let (written, versions, keys) = (number(&row[0]), number(&row[1]), number(&row[2]));
    assert!(written >= 1.0, "{out}");
    // 1 MiB of 64 KiB values under fresh keys: at least 16 keys reached the spare, in at
    // least one version.
    assert!(keys >= 16.0 && versions >= 1.0, "{out}");
    let (victim, spare) = row[3].split_once(" → ").expect("killed → spare");
    let (victim, spare) = (number(victim), number(spare));
    assert!(victim != spare && (1.0..=4.0).contains(&victim) && (1.0..=4.0).contains(&spare));
    let (new_view_ms, caught_up_s) = (number(&row[4]), number(&row[5]));
    assert!(
        caught_up_s * 1000.0 + 5.0 >= new_view_ms,
        "caught up before holding the shard:\n{out}"
    );
    for cell in &row[7..10] {
        number(cell);
    }
}
