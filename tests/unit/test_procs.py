"""Process plumbing (clipserve.procs): free ports, process groups, /proc CPU accounting."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from clipserve import procs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A child that starts a grandchild in its own group, prints the grandchild's pid, then waits.
# Both ignore SIGTERM, so only the SIGKILL to the group can end them.
_STUBBORN_TREE = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def _start_tree(script: str) -> tuple[subprocess.Popen, int]:
    proc = procs.start_group([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    grandchild = int(proc.stdout.readline())
    return proc, grandchild


def _wait_members(pgid: int, count: int) -> list[int]:
    deadline = time.monotonic() + 30
    while len(members := procs.group_members(pgid)) < count:
        assert time.monotonic() < deadline, f"group {pgid} has {members}"
        time.sleep(0.05)
    return members


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_free_port_can_be_bound_and_listened_on(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        port = procs.free_port(host)
    except OSError:
        pytest.skip(f"no {host} on this machine")
    assert 0 < port < 65536
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
        sock.listen()


def test_started_child_leads_its_own_group():
    proc, grandchild = _start_tree(_STUBBORN_TREE)
    try:
        members = _wait_members(proc.pid, 2)
        assert set(members) == {proc.pid, grandchild}
        assert os.getpgid(0) != proc.pid  # not ours: a signal to it spares the tests
    finally:
        procs.kill_group(proc)


def test_stop_group_takes_down_a_child_and_grandchild_that_ignore_sigterm():
    proc, grandchild = _start_tree(_STUBBORN_TREE)
    _wait_members(proc.pid, 2)
    assert procs.stop_group(proc, grace_s=0.5)
    assert proc.returncode == -signal.SIGKILL  # SIGTERM was ignored; the SIGKILL ended it
    assert procs.group_members(proc.pid) == []
    assert procs.stop_group(proc, grace_s=0.5)  # idempotent


def test_stop_group_kills_a_grandchild_left_behind_by_a_leader_that_exits_on_sigterm():
    # The leader exits on SIGTERM at once; its grandchild ignores it and must still go.
    script = _STUBBORN_TREE.replace("signal.signal(signal.SIGTERM, signal.SIG_IGN)\ngrand",
                                    "grand", 1)
    proc, grandchild = _start_tree(script)
    _wait_members(proc.pid, 2)
    assert procs.stop_group(proc, grace_s=10)
    assert proc.returncode == -signal.SIGTERM
    assert grandchild not in procs.group_members(proc.pid)
    assert procs.group_members(proc.pid) == []


def test_stop_group_of_none_does_nothing():
    assert procs.stop_group(None)


def test_group_cpu_grows_while_a_child_spins_and_self_cpu_counts_this_process():
    proc = procs.start_group([sys.executable, "-c", "while True: pass"])
    try:
        _wait_members(proc.pid, 1)
        before = procs.group_cpu_s(proc.pid)
        deadline = time.monotonic() + 30
        while procs.group_cpu_s(proc.pid) < before + 0.2:
            assert time.monotonic() < deadline, "a spinning child used no CPU"
            time.sleep(0.05)
    finally:
        procs.stop_group(proc, grace_s=5)
    assert procs.group_cpu_s(proc.pid) == 0.0  # nothing of the group is left to count

    start = procs.self_cpu_s()
    end = time.process_time() + 0.1
    while time.process_time() < end:
        pass
    assert procs.self_cpu_s() - start >= 0.09


def test_busy_cores_sees_a_spinning_child_and_stays_within_the_cores():
    n = os.cpu_count() or 1
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = procs.busy_cores(1.0)
    finally:
        spinner.kill()
        spinner.wait()
    # one spinning process keeps about one core busy, whatever else runs here
    assert 0.7 <= busy <= n + 1e-6, busy
