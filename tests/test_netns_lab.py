"""The network-namespace lab of the demo, the chaos drill and the benchmarks, after its owner was killed
(SIGKILL, a CI timeout: no teardown ran), on the real kernel.

A killed lab leaves its namespaces, the processes still running in them and its bridge, which holds the
lab's subnet address: the next lab on that subnet would route the operator's traffic into the dead one.
``NetnsLab.setup`` removes a lab whose owner (recorded in the bridge's alias) is gone, refuses to start
beside one whose owner still runs, and refuses a foreign bridge holding its address.  Uses subnet
10.219.0 and the prefixes ``pmtl`` / ``pmtlb`` / ``pmtv``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode.authority_store import CliError
from meshnode.demo_netns import NetnsLab

pytestmark = pytest.mark.root

SUBNET = "10.219.0"
KW = {"prefix": "pmtl", "bridge_prefix": "pmtlb", "veth_prefix": "pmtv", "subnet": SUBNET}
OWNER = f"""
import subprocess, sys, time
from meshnode.demo_netns import NetnsLab
lab = NetnsLab(2, **{KW!r})
lab.setup()
subprocess.Popen(lab.exec_argv(0, ["sleep", "600"]))  # a node's process, left running when the owner dies
print(lab.bridge, lab.ns(0), lab.ns(1), flush=True)
time.sleep(600)
"""


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def start_owner() -> tuple[subprocess.Popen[str], str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert len(line) == 3, f"the owner did not build its lab (exit {proc.poll()})"
    return proc, line[0], line[1:]


def reaches(lab: NetnsLab, i: int, port: int) -> bool:
    """From the root namespace (where the operator is), connect to a listener in node ``i``'s namespace."""
    listener = subprocess.Popen(
        lab.exec_argv(i, [sys.executable, "-c",
                          "import socket,sys;s=socket.socket();s.bind(('0.0.0.0',int(sys.argv[1])));s.listen();"
                          "print('up',flush=True);s.settimeout(10);s.accept()", str(port)]),
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        listener.stdout.readline()
        try:
            socket.create_connection((lab.ip(i), port), timeout=3).close()
            return True
        except OSError:
            return False
    finally:
        listener.kill()
        listener.wait()


def test_a_killed_lab_is_cleared_and_a_live_one_is_not_touched() -> None:
    owner, bridge, namespaces = start_owner()
    lab = NetnsLab(2, **KW)
    try:
        # its owner runs: the lab is live, and a second one on its subnet is refused, nothing removed
        with pytest.raises(CliError, match="another lab is running"):
            lab.setup()
        assert link_exists(bridge) and set(namespaces) <= netns_names()

        # the owner is killed: no teardown ran, the node's process still runs in its namespace
        sleeper = subprocess.run(["ip", "netns", "pids", namespaces[0]], capture_output=True, text=True).stdout.split()
        assert sleeper, "the owner's node process runs in its namespace"
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert link_exists(bridge) and set(namespaces) <= netns_names()

        lab.setup()
        assert lab.cleared == [f"{bridge} (2 namespaces)"]
        assert not link_exists(bridge)
        assert not set(namespaces) & netns_names()
        for pid in sleeper:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not Path(f"/proc/{pid}").exists(), "the dead lab's process was killed"
        # the new lab works: the operator reaches a node through the new bridge
        assert reaches(lab, 1, 7199)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        lab.teardown()
        NetnsLab(0, **KW).clear_stale()
    assert not link_exists(lab.bridge)


def test_a_foreign_bridge_on_the_labs_address_is_refused_not_removed() -> None:
    name = f"pmtlx{os.getpid() % 10000}"
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{SUBNET}.1/24", "dev", name], check=True)
        lab = NetnsLab(1, **KW)
        with pytest.raises(CliError, match=f"bridge {name} holds {SUBNET}.1"):
            lab.setup()
        assert link_exists(name)
        assert not link_exists(lab.bridge)
    finally:
        subprocess.run(["ip", "link", "delete", name], check=False)
