"""Durable state: atomic writes, crash during save, corrupt files, cold-boot re-verification."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import structlog.testing

import meshnode.fsutil as fsutil
import meshnode.state as state_mod
from meshnode.state import DIRECTORY_MEMBERS, MAX_DIRECTORY_FILE_BYTES, MAX_STATE_FILE_BYTES, StateStore
from protocol.gossip import MemberEntry
from protocol.trust import TrustedState
from simulations.identities import T0, derive_seed, make_authority, make_node
from tests.fixtures import sign_sample

DAY = 86400


def boot(anchor: bytes, store: StateStore, now: float = T0) -> tuple[TrustedState, list[str]]:
    trust = TrustedState(anchor)
    report = store.load_into(trust, now)
    return trust, report.problems


def test_cold_boot_reverifies_roots_and_policy(tmp_path):
    auth = make_authority()
    anchor = auth.root_bytes
    store = StateStore(tmp_path)
    r2 = auth.rotate(T0, new_seeds={"policy": [derive_seed("p2")]})
    store.save_root(2, r2)
    store.save_policy(4, sign_sample(auth, 4))
    trust, problems = boot(anchor, store)
    assert problems == []
    assert trust.root_version == 2 and trust.serial == 4 and trust.policy_state(T0) == "fresh"


def test_forged_stored_policy_is_not_loaded(tmp_path):
    auth = make_authority()
    other = make_authority(label="evil")
    store = StateStore(tmp_path)
    store.save_policy(3, sign_sample(auth, 3))
    # An attacker with disk access drops a forged newer policy: boot refuses it and keeps serial 3.
    (tmp_path / "policy" / "9.msgpack").write_bytes(sign_sample(other, 9))
    trust, problems = boot(auth.root_bytes, store)
    assert trust.serial == 3
    assert any("9.msgpack" in p and "signature" in p for p in problems)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_policy_falls_back_to_previous(tmp_path, damage):
    auth = make_authority()
    store = StateStore(tmp_path)
    store.save_policy(1, sign_sample(auth, 1))
    store.save_policy(2, sign_sample(auth, 2))
    path = tmp_path / "policy" / "2.msgpack"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        b = bytearray(data)
        b[len(b) // 2] ^= 0xFF
        path.write_bytes(bytes(b))
    else:
        path.write_bytes(b"")
    trust, problems = boot(auth.root_bytes, store)
    assert trust.serial == 1
    assert len(problems) == 1 and "2.msgpack" in problems[0]


def test_corrupt_root_stops_chain_but_keeps_anchor(tmp_path):
    auth = make_authority()
    anchor = auth.root_bytes
    store = StateStore(tmp_path)
    store.save_root(2, auth.rotate(T0))
    (tmp_path / "roots" / "root.2.msgpack").write_bytes(b"\x93garbage")
    trust, problems = boot(anchor, store)
    assert trust.root_version == 1 and problems


def test_expired_policy_still_enforced_after_reboot(tmp_path):
    auth = make_authority()
    store = StateStore(tmp_path)
    store.save_policy(5, sign_sample(auth, 5, valid_s=DAY))
    trust, problems = boot(auth.root_bytes, store, now=T0 + 10 * DAY)
    assert trust.serial == 5
    assert trust.policy_state(T0 + 10 * DAY) == "stale"
    assert any("fail-static" in p for p in problems)


def test_crash_during_save_keeps_previous_state(tmp_path, monkeypatch):
    auth = make_authority()
    store = StateStore(tmp_path)
    store.save_policy(1, sign_sample(auth, 1))

    real_replace = os.replace

    def crash(*args, **kwargs):
        raise OSError("simulated power loss before rename")

    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(OSError):
        store.save_policy(1, sign_sample(auth, 1, revocations=None, now=T0 + 1))
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    # The temp file may linger; the real file is intact and the next boot loads it.
    trust, problems = boot(auth.root_bytes, store)
    assert trust.serial == 1 and problems == []


def test_crash_midway_through_write_leaves_only_temp(tmp_path, monkeypatch):
    auth = make_authority()
    store = StateStore(tmp_path)
    good = sign_sample(auth, 1)
    store.save_policy(1, good)
    calls = {"n": 0}
    real_write = os.write

    def partial_write(fd, data):
        calls["n"] += 1
        real_write(fd, bytes(data[:10]))
        raise OSError("disk full")

    monkeypatch.setattr(fsutil.os, "write", partial_write)
    with pytest.raises(OSError):
        store.save_policy(1, sign_sample(auth, 1, now=T0 + 2))
    monkeypatch.undo()
    assert (tmp_path / "policy" / "1.msgpack").read_bytes() == good


def test_keeps_only_newest_policies(tmp_path):
    auth = make_authority()
    store = StateStore(tmp_path)
    for s in range(1, 7):
        store.save_policy(s, sign_sample(auth, s))
    names = sorted(p.name for p in (tmp_path / "policy").iterdir())
    assert names == ["4.msgpack", "5.msgpack", "6.msgpack"]


def test_secret_files_are_private(tmp_path):
    path = Path(tmp_path) / "secrets" / "k.key"
    fsutil.write_secret(path, b"seed")
    assert (path.stat().st_mode & 0o777) == 0o600
    with pytest.raises(FileExistsError):
        fsutil.write_secret(path, b"other")


# -- the member directory at scale (issue 10, item 7) ----------------------------------------------


def _entry(node_id: str, cert: bytes) -> MemberEntry:
    return MemberEntry(node_id, "10.1.2.3:7946", "eu-west-1", cert)


def _directory(cert: bytes, n: int) -> list[MemberEntry]:
    """``n`` members with a real certificate's size: the store checks sizes and shapes, not signatures."""
    return [_entry(f"node-{i:06d}", cert) for i in range(n)]


def test_100k_members_survive_a_reboot(tmp_path):
    auth = make_authority()
    cert = make_node(auth, "node-000000", region="eu-west-1", roles=("app", "web"),
                     addresses=("10.1.2.3", "2001:db8::1:2")).cert_bytes
    members = _directory(cert, DIRECTORY_MEMBERS)
    store = StateStore(tmp_path)
    store.save_members(members)
    assert (tmp_path / "directory.msgpack").stat().st_size > 1 << 20  # the old limit loaded this as empty
    again = StateStore(tmp_path)
    report = again.load_into(TrustedState(auth.root_bytes), T0)
    assert report.problems == []
    assert report.members_loaded == DIRECTORY_MEMBERS
    assert again.load_members() == members


def test_the_two_directory_files_of_earlier_versions_are_read_once_then_replaced(tmp_path):
    auth = make_authority()
    a, b = (make_node(auth, n).cert_bytes for n in ("node-a", "node-b"))
    old_peers = [{"node_id": "node-a", "address": "10.0.0.1:7946", "region": "r1", "cert": a},
                 {"node_id": "node-c", "address": "10.0.0.3:7946", "region": "r1"}]  # no certificate
    (tmp_path / "peers.msgpack").write_bytes(msgspec.msgpack.encode(old_peers))
    (tmp_path / "members.msgpack").write_bytes(msgspec.msgpack.encode({"node-a": a, "node-b": b}))
    store = StateStore(tmp_path)
    report = store.load_into(TrustedState(auth.root_bytes), T0)
    assert report.problems == [] and report.members_loaded == 3
    assert store.load_members() == [MemberEntry("node-a", "10.0.0.1:7946", "r1", a),
                                     MemberEntry("node-c", "10.0.0.3:7946", "r1", b""),
                                     MemberEntry("node-b", "", "", b)]
    store.save_members([MemberEntry("node-a", "10.0.0.1:7946", "r1", a)])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["directory.msgpack"]
    assert StateStore(tmp_path).load_members() == [MemberEntry("node-a", "10.0.0.1:7946", "r1", a)]


def test_directory_limit_fits_100k_of_the_largest_legitimate_certificates():
    auth = make_authority()
    big = make_node(auth, "n" * 64, region="r" * 64, roles=tuple(f"role{j}-" + "q" * 57 for j in range(8)),
                    addresses=tuple(f"2001:db8:ffff:ffff:ffff:ffff:ffff:{j:04x}" for j in range(4)))
    entry = MemberEntry(big.node_id, "[2001:db8:ffff:ffff:ffff:ffff:ffff:0000]:65535", "r" * 64, big.cert_bytes)
    entry_bytes = len(msgspec.msgpack.encode([entry]))
    assert DIRECTORY_MEMBERS * entry_bytes < MAX_DIRECTORY_FILE_BYTES
    assert MAX_STATE_FILE_BYTES < MAX_DIRECTORY_FILE_BYTES


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x93garbage")
    elif how == "wrong-shape":
        path.write_bytes(msgspec.msgpack.encode({"not": "a directory"}))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncate", "garbage", "wrong-shape", "empty"])
def test_a_damaged_member_file_loads_its_previous_copy_and_says_so(tmp_path, how):
    auth = make_authority()
    cert = make_node(auth, "node-000000").cert_bytes
    store = StateStore(tmp_path)
    old, new = _directory(cert, 3), _directory(cert, 5)
    store.save_members(old)
    store.save_members(new)
    _damage(tmp_path / "directory.msgpack", how)
    again = StateStore(tmp_path)
    report = again.load_into(TrustedState(auth.root_bytes), T0)
    assert len(report.problems) == 1
    assert "directory.msgpack" in report.problems[0] and "previous copy" in report.problems[0]
    assert again.load_members() == old


def test_an_oversize_member_file_is_a_problem_not_a_silent_empty(tmp_path, monkeypatch):
    auth = make_authority()
    cert = make_node(auth, "node-000000").cert_bytes
    store = StateStore(tmp_path)
    store.save_members(_directory(cert, 50))
    monkeypatch.setattr(state_mod, "MAX_DIRECTORY_FILE_BYTES", 1000)
    again = StateStore(tmp_path)
    report = again.load_into(TrustedState(auth.root_bytes), T0)
    assert len(report.problems) == 1, report.problems
    assert "directory.msgpack" in report.problems[0] and "limit of 1000 bytes" in report.problems[0]
    assert "no usable copy" in report.problems[0]
    assert report.members_loaded == 0


def test_state_problems_reach_the_daemon_log_and_metric(tmp_path, monkeypatch):
    """The daemon logs and counts LoadReport.problems (state.problem, policymesh_state_problems_total)."""
    from meshnode.cli.meshctl import main as meshctl
    from meshnode.config import load_config
    from meshnode.daemon import MeshDaemon

    assert meshctl(["authority", "init", str(tmp_path / "auth"), "--cluster", "t1"]) == 0
    assert meshctl(["node", "enroll", "--authority", str(tmp_path / "auth"), "--node-id", "n1", "--region", "r1",
                    "--role", "app", "--address", "127.0.0.1", "--backend", "file",
                    "--out", str(tmp_path / "n1"), "--key", str(tmp_path / "auth/secrets/enroll-1-1.key")]) == 0
    lc = load_config(tmp_path / "n1" / "node.toml")
    daemon = MeshDaemon(lc)
    daemon.store.ensure()
    (daemon.store.members_path).write_bytes(b"\x93garbage")
    stale_ruleset = tmp_path / "n1" / f".ruleset.nft.tmp.{_dead_pid()}"
    stale_ruleset.write_bytes(b"partial")
    with structlog.testing.capture_logs() as logs:
        daemon.load_state()
        asyncio.run(daemon.enforcer.setup())
    assert daemon.metrics.registry.get_sample_value("policymesh_state_problems_total") == 2
    members, ruleset = [e["problem"] for e in logs if e["event"] == "state.problem"]
    assert "directory.msgpack" in members and "no usable copy" in members
    assert str(stale_ruleset) in ruleset and not stale_ruleset.exists()


# -- temp files of interrupted writes ----------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_are_removed_when_the_state_is_opened(tmp_path):
    auth = make_authority()
    store = StateStore(tmp_path)
    store.save_policy(1, sign_sample(auth, 1))
    store.save_members([MemberEntry("a", "", "", b"x")])
    dead = _dead_pid()
    stale = [
        tmp_path / f".members.msgpack.tmp.{dead}",
        tmp_path / f".peers.msgpack.tmp.{os.getpid()}",  # our pid, before our first write: a past life's
        tmp_path / f".members.msgpack.bak.tmp.{dead}",
        tmp_path / "policy" / f".2.msgpack.tmp.{dead}",
        tmp_path / "roots" / f".root.2.msgpack.tmp.{dead}",
    ]
    old_live = tmp_path / f".peers.msgpack.tmp.{os.getppid()}"
    kept = [
        tmp_path / f".members.msgpack.tmp.{os.getppid()}",  # a live process may be writing it
        tmp_path / "notes.txt",
        tmp_path / f".notes.txt.tmp.{dead}",  # not one of our files
        tmp_path / ".members.msgpack.tmp.abc",  # not our pattern
        tmp_path / f"members.msgpack.tmp.{dead}",
    ]
    for p in [*stale, *kept, old_live]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"partial")
    an_hour_ago = time.time() - fsutil.STALE_TEMP_AGE_S - 1
    os.utime(old_live, (an_hour_ago, an_hour_ago))  # whatever its pid, nobody writes for an hour
    report = StateStore(tmp_path).load_into(TrustedState(auth.root_bytes), T0)
    assert report.temps_removed == len(stale) + 1
    assert not any(p.exists() for p in [*stale, old_live])
    assert all(p.exists() for p in kept)
    assert len(report.problems) == 1 and "removed 6 temp file(s)" in report.problems[0]
    assert report.policy_serial == 1 and report.members_loaded == 1


def test_read_only_tools_leave_temp_files_alone(tmp_path):
    auth = make_authority()
    temp = tmp_path / f".members.msgpack.tmp.{_dead_pid()}"
    tmp_path.mkdir(exist_ok=True)
    temp.write_bytes(b"partial")
    report = StateStore(tmp_path).load_into(TrustedState(auth.root_bytes), T0, clean_temps=False)
    assert temp.exists() and report.temps_removed == 0


def test_a_failed_write_removes_its_own_temp_file(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise OSError("simulated I/O error before rename")

    monkeypatch.setattr(fsutil.os, "replace", crash)
    with pytest.raises(OSError):
        StateStore(tmp_path).save_members([MemberEntry("a", "", "", b"x")])
    assert not any(".tmp." in p.name for p in tmp_path.iterdir())


_WRITER = """
import sys
from meshnode.state import StateStore
from protocol.gossip.events import MemberEntry
store = StateStore(sys.argv[1])
members = [MemberEntry(f"node-{i:06d}", "", "", bytes(380)) for i in range(20000)]
store.save_members(members)
print("written", flush=True)
while True:
    store.save_members(members)
"""


def test_kill9_mid_write_then_open_leaves_no_temp_and_a_whole_directory(tmp_path):
    auth = make_authority()
    members = [MemberEntry(f"node-{i:06d}", "", "", bytes(380)) for i in range(20000)]
    left = 0
    for _ in range(20):  # until a kill lands mid-write (most land mid-write: the writes are 8 MB)
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert proc.stdout is not None and proc.stdout.readline() == b"written\n"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not list(tmp_path.glob(".*.tmp.*")):
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        left = len(list(tmp_path.glob(".*.tmp.*")))
        if left:
            break
    assert left, "no kill landed mid-write"
    store = StateStore(tmp_path)
    report = store.load_into(TrustedState(auth.root_bytes), T0)
    assert report.temps_removed == left
    assert not list(tmp_path.glob(".*.tmp.*"))
    assert store.load_members() == members  # the last complete write, never a torn one


def test_file_backend_removes_stale_temps_of_its_ruleset_file(tmp_path):
    from meshnode.enforce import FileBackend

    dead = _dead_pid()
    stale = tmp_path / f".ruleset.nft.tmp.{dead}"
    other = tmp_path / f".other.nft.tmp.{dead}"
    stale.write_bytes(b"partial")
    other.write_bytes(b"partial")
    backend = FileBackend("policymesh", tmp_path / "ruleset.nft")
    assert backend.temps_removed == [stale]
    assert not stale.exists() and other.exists()
