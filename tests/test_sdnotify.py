"""sd_notify(3) over a real AF_UNIX datagram socket, as systemd's manager receives it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from meshnode.sdnotify import Notifier


def _receiver(tmp_path: Path) -> tuple[socket.socket, str]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    return sock, path


def test_messages_reach_the_notify_socket(tmp_path: Path) -> None:
    sock, path = _receiver(tmp_path)
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.enabled and n.watchdog_interval_s == 15.0
    assert n.ready("enforcing serial 3")
    assert sock.recv(4096) == b"READY=1\nSTATUS=enforcing serial 3"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert n.status("two\nlines")
    assert sock.recv(4096) == b"STATUS=two lines"  # one field per line: a newline cannot forge another
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    n.close()
    sock.close()


def test_abstract_socket_names_are_supported(tmp_path: Path) -> None:
    name = f"policymesh-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    assert n.watchdog() and sock.recv(64) == b"WATCHDOG=1"
    sock.close()


def test_outside_systemd_nothing_is_sent_and_nothing_fails() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval_s is None and not n.ready("x")


def test_a_watchdog_meant_for_another_process_is_ignored(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval_s is None


def test_a_vanished_manager_is_counted_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert not n.ready("x") and n.failures == 1
