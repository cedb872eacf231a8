"""Durable state: atomic writes, crash during save, corrupt files, cold-boot re-verification."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import meshnode.fsutil as fsutil
from meshnode.state import StateStore
from protocol.testing import T0, derive_seed, make_authority, sign_sample
from protocol.trust import TrustedState

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
