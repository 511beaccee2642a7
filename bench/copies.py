#!/usr/bin/env python3
"""What moving data costs this machine's CPUs, whatever system runs on it.

    bench/copies.py [--dir /dev/shm] [--address 127.0.0.1] [--gib 1] [--runs 3]

Prints one table, each row the median of --runs runs, CPU seconds from getrusage (system and user
time of the process doing the work; for a transfer, of each side):
- tmpfs: writing GIB into a new file in --dir (1 MiB writes), overwriting that file in place,
  reading it back: what a log append on tmpfs costs per GiB, fresh pages against reused ones;
- loopback TCP and a Unix-domain stream socket: GIB sent in 1 MiB writes, received into one
  reused 1 MiB buffer: the CPU of the sender and of the receiver per GiB;
- a 100-byte message echoed back 20,000 times on each kind (TCP_NODELAY): latency p50 / p99 and
  the CPU of both sides per round trip.
Nothing else should run meanwhile. The files and sockets it makes are removed at the end.
"""

import argparse
import os
import resource
import socket
import statistics
import sys
import tempfile
import time

MIB = 1 << 20
ECHOES = 20_000


def cpu(who=resource.RUSAGE_SELF):
    r = resource.getrusage(who)
    return r.ru_stime + r.ru_utime


def tmpfs_costs(directory, gib):
    """CPU seconds of: write into a new file, overwrite it in place, read it."""
    buf = b"\x5a" * MIB
    fd, path = tempfile.mkstemp(prefix="copies-", dir=directory)
    try:
        c0 = cpu()
        for _ in range(gib * 1024):
            os.write(fd, buf)
        c1 = cpu()
        os.lseek(fd, 0, os.SEEK_SET)
        for _ in range(gib * 1024):
            os.write(fd, buf)
        c2 = cpu()
        os.lseek(fd, 0, os.SEEK_SET)
        rb = bytearray(MIB)
        while os.readv(fd, [rb]) > 0:
            pass
        c3 = cpu()
    finally:
        os.close(fd)
        os.unlink(path)
    return c1 - c0, c2 - c1, c3 - c2


def listener(kind, address, sock_dir):
    if kind == "tcp":
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind((address, 0))
        target = (address, srv.getsockname()[1])
    else:
        target = os.path.join(sock_dir, "copies.sock")
        if os.path.exists(target):
            os.unlink(target)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(target)
    srv.listen(1)
    return srv, target


def dial(kind, target):
    fam = socket.AF_INET if kind == "tcp" else socket.AF_UNIX
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.connect(target)
    if kind == "tcp":
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def child_cpu_after(pid):
    """Waits for the child and returns its CPU seconds (it is the only child at a time)."""
    before = cpu(resource.RUSAGE_CHILDREN)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        sys.exit(f"copies.py: a child failed with status {status}")
    return cpu(resource.RUSAGE_CHILDREN) - before


def transfer(kind, address, sock_dir, gib):
    """CPU seconds of the sender and of the receiver of GIB in 1 MiB sends."""
    srv, target = listener(kind, address, sock_dir)
    pid = os.fork()
    if pid == 0:
        srv.close()
        c = dial(kind, target)
        buf = b"\xa5" * MIB
        for _ in range(gib * 1024):
            c.sendall(buf)
        c.close()
        os._exit(0)
    s, _ = srv.accept()
    srv.close()
    rb = bytearray(MIB)
    view = memoryview(rb)
    got = 0
    c0 = cpu()
    while True:
        n = s.recv_into(view)
        if n == 0:
            break
        got += n
    receiver = cpu() - c0
    s.close()
    sender = child_cpu_after(pid)
    if got != gib << 30:
        sys.exit(f"copies.py: {kind} moved {got} bytes, expected {gib << 30}")
    return sender, receiver


def echo(kind, address, sock_dir):
    """p50 and p99 of a 100-byte round trip in microseconds, and CPU of both sides per trip."""
    srv, target = listener(kind, address, sock_dir)
    pid = os.fork()
    if pid == 0:
        srv.close()
        c = dial(kind, target)
        while True:
            m = c.recv(256)
            if not m:
                break
            c.sendall(m)
        os._exit(0)
    s, _ = srv.accept()
    srv.close()
    if kind == "tcp":
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"m" * 100
    lat = []
    c0 = cpu()
    for _ in range(ECHOES):
        t = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            got += len(s.recv(256))
        lat.append(time.perf_counter_ns() - t)
    mine = cpu() - c0
    s.close()
    theirs = child_cpu_after(pid)
    lat.sort()
    return lat[len(lat) // 2] / 1e3, lat[len(lat) * 99 // 100] / 1e3, (mine + theirs) / ECHOES * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/dev/shm", help="where the tmpfs file goes (default /dev/shm)")
    p.add_argument("--address", default="127.0.0.1", help="loopback address for TCP")
    p.add_argument("--gib", type=int, default=1, help="GiB per run (1..16)")
    p.add_argument("--runs", type=int, default=3, help="runs per row (1..20)")
    a = p.parse_args()
    if not 1 <= a.gib <= 16:
        p.error(f"--gib {a.gib} is outside 1..16")
    if not 1 <= a.runs <= 20:
        p.error(f"--runs {a.runs} is outside 1..20")
    if not os.path.isdir(a.dir):
        p.error(f"--dir {a.dir} is not a directory")
    try:
        socket.inet_aton(a.address)
    except OSError:
        p.error(f"--address {a.address} is not an IPv4 address")
    sock_dir = tempfile.mkdtemp(prefix="copies-")
    try:
        rows = []
        t = [tmpfs_costs(a.dir, a.gib) for _ in range(a.runs)]
        med = lambda xs: statistics.median(xs) / a.gib
        rows.append(("tmpfs: write into a new file", "", f"{med([x[0] for x in t]):.3f}"))
        rows.append(("tmpfs: overwrite in place", "", f"{med([x[1] for x in t]):.3f}"))
        rows.append(("tmpfs: read", "", f"{med([x[2] for x in t]):.3f}"))
        for kind in ("tcp", "unix"):
            r = [transfer(kind, a.address, sock_dir, a.gib) for _ in range(a.runs)]
            rows.append((f"{kind}: 1 MiB sends", f"{med([x[0] for x in r]):.3f}", f"{med([x[1] for x in r]):.3f}"))
        print(f"CPU seconds per GiB (median of {a.runs} runs of {a.gib} GiB), tmpfs in {a.dir}")
        print()
        print("| what | sender | receiver / the process |")
        print("|---|---:|---:|")
        for what, s, r in rows:
            print(f"| {what} | {s} | {r} |")
        print()
        print(f"100-byte echo, {ECHOES} round trips per run")
        print()
        print("| kind | p50 us | p99 us | CPU us per round trip (both sides) |")
        print("|---|---:|---:|---:|")
        for kind in ("tcp", "unix"):
            e = [echo(kind, a.address, sock_dir) for _ in range(a.runs)]
            print(
                f"| {kind} | {statistics.median(x[0] for x in e):.1f} | "
                f"{statistics.median(x[1] for x in e):.1f} | {statistics.median(x[2] for x in e):.1f} |"
            )
    finally:
        for f in os.listdir(sock_dir):
            os.unlink(os.path.join(sock_dir, f))
        os.rmdir(sock_dir)


if __name__ == "__main__":
    main()
