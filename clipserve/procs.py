"""Process plumbing shared by the server, the benchmarks, the demo and the tests: free TCP
ports, child processes in a process group of their own, and their CPU time from Linux /proc.

A child started with :func:`start_group` leads a new session, so one signal to its group
reaches everything it spawned (Triton's Python stubs, a server's workers) and a Ctrl-C in the
terminal reaches us, not it. :func:`stop_group` asks the group to stop, then kills what is left
and waits until nothing of it runs.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_GONE_POLL_S = 0.05


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port the kernel just handed out on ``host`` (IPv6 if it contains ":").

    Another process may take it before the caller binds it; callers that start a server on it
    should detect "address in use" and pick again where that matters.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_group(args, **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(args, **popen_kwargs)`` leading a new session and process group
    (its pid is the group id)."""
    return subprocess.Popen(args, start_new_session=True, **popen_kwargs)


def _stat_fields(stat_text: str) -> list[str]:
    # The command name, in parentheses, may hold spaces and ")"; the fields after the last
    # ")" are state, ppid, pgrp, session, tty_nr, tpgid, flags, minflt, cminflt, majflt,
    # cmajflt, utime, stime, ...
    return stat_text.rsplit(")", 1)[1].split()


def _group_stats(pgid: int):
    """(pid, fields after the command name) of every process of group ``pgid``."""
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat_file.read_text())
            if int(fields[2]) == pgid:
                yield int(stat_file.parent.name), fields
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked


def group_members(pgid: int) -> list[int]:
    """Pids of process group ``pgid`` that are not zombies (Linux /proc; empty elsewhere)."""
    return [pid for pid, fields in _group_stats(pgid) if fields[0] not in ("Z", "X")]


def group_cpu_s(pgid: int) -> float:
    """User+system CPU seconds of the processes now in group ``pgid`` (Linux /proc).

    A member that has exited no longer counts, so take differences over a window in which the
    group's processes live."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _pid, fields in _group_stats(pgid))
    return ticks / _CLK_TCK


def _proc_stat_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's ``cpu`` line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    return total - idle, total


def busy_cores(seconds: float = 2.0) -> float:
    """How many cores' worth of CPU the whole machine used over the next ``seconds`` (Linux
    /proc/stat), in 0..os.cpu_count(). Unlike the load average, which decays over minutes and
    still shows a job that just ended, this says what runs now."""
    busy0, total0 = _proc_stat_jiffies()
    time.sleep(seconds)
    busy1, total1 = _proc_stat_jiffies()
    if total1 <= total0:
        return 0.0
    return (os.cpu_count() or 1) * (busy1 - busy0) / (total1 - total0)


def self_cpu_s() -> float:
    """User+system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to group ``pgid``; False if no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no live (non-zombie) process of group ``pgid`` is left; False on timeout.

    Zombies count as gone: they run nothing and hold no memory. A killed leader's children
    stay zombies until PID 1 reaps them, which can take a second or more.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # Orphans are re-parented to us when we are PID 1 (a container without an init);
            # reap them so they do not pile up as zombies.
            os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not group_members(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(_GONE_POLL_S)


def kill_group(proc: subprocess.Popen, gone_timeout_s: float = 5.0) -> bool:
    """SIGKILL the group ``proc`` leads, reap ``proc`` and wait for the rest of the group to
    go; False if some of it still ran after ``gone_timeout_s``."""
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    return wait_group_gone(proc.pid, gone_timeout_s)


def stop_group(proc: subprocess.Popen | None, grace_s: float = 10.0,
               gone_timeout_s: float = 5.0) -> bool:
    """Stop the group that ``proc`` (from :func:`start_group`) leads: SIGTERM to the group,
    up to ``grace_s`` for ``proc`` to exit, then SIGKILL to whatever of the group is left.
    Idempotent; does nothing for None.

    Returns:
        True once no process of the group runs; False if some still ran ``gone_timeout_s``
        after the SIGKILL.
    """
    if proc is None:
        return True
    if proc.poll() is None:
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
    return kill_group(proc, gone_timeout_s)
