"""meshctl as a new user runs it: real processes, real files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshnode.examples import sample_policy_toml

POLICY = sample_policy_toml()


def meshctl(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


KEY = ("--key", "auth/secrets/policy-1-1.key")


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    meshctl("authority", "init", "auth", "--cluster", "t1", cwd=tmp_path)
    (tmp_path / "pol.toml").write_text(POLICY)
    return tmp_path


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_walkthrough(ws):
    meshctl("node", "enroll", "--authority", "auth", "--node-id", "db1", "--region", "eu", "--role", "db",
            "--address", "10.1.0.5", "--out", "db1", "--key", "auth/secrets/enroll-1-1.key", cwd=ws)
    for f in ("node.toml", "node.cert", "root.msgpack", "secrets/identity.key", "secrets/static.key"):
        assert (ws / "db1" / f).exists(), f
    for f in (ws / "db1" / "secrets").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    for f in (ws / "auth" / "secrets").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    out = meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--out", "p1.msgpack", cwd=ws).stdout
    assert "serial 1" in out
    out = meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--out", "p2.msgpack", cwd=ws).stdout
    assert "serial 2" in out  # auto-increment
    v = meshctl("policy", "verify", "p2.msgpack", "--root", "auth/root.msgpack", cwd=ws)
    assert v.stdout.startswith("valid: serial 2")
    # Secrets never printed.
    seed_hex = (ws / "auth" / "secrets" / "policy-1-1.key").read_text().split('"ed25519_seed": "')[1][:64]
    show = meshctl("authority", "show", "auth", cwd=ws).stdout
    assert seed_hex not in show and seed_hex not in out
    insp = meshctl("policy", "inspect", "p2.msgpack", "--json", cwd=ws).stdout
    assert '"serial": 2' in insp and seed_hex not in insp


def test_serial_never_reused(ws):
    meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--serial", "5", "--out", "a", cwd=ws)
    err = one_line_error(meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--serial", "5", "--out", "b",
                                 cwd=ws, check=False))
    assert "already used" in err
    assert not (ws / "b").exists()


def test_tampered_file_refused(ws):
    meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--out", "p.msgpack", cwd=ws)
    data = bytearray((ws / "p.msgpack").read_bytes())
    i = data.find(b"5432")
    data[i : i + 4] = b"5433"
    (ws / "t.msgpack").write_bytes(bytes(data))
    err = one_line_error(meshctl("policy", "verify", "t.msgpack", "--root", "auth/root.msgpack", cwd=ws, check=False))
    assert err.startswith("invalid:") and "signature" in err


def test_other_authority_refused(ws):
    meshctl("authority", "init", "other", "--cluster", "t1", cwd=ws)
    meshctl("policy", "sign", "pol.toml", "--authority", "other", "--key", "other/secrets/policy-1-1.key",
            "--out", "p.msgpack", cwd=ws)
    err = one_line_error(meshctl("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", cwd=ws, check=False))
    assert "0 valid signature" in err


def test_expired_refused(ws):
    meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--expires", "1s", "--out", "p.msgpack", cwd=ws)
    time.sleep(2.1)
    err = one_line_error(meshctl("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", "--clock-skew", "0",
                                 cwd=ws, check=False))
    assert "expired" in err


def test_random_bytes_refused(ws):
    (ws / "junk").write_bytes(os.urandom(500))
    err = one_line_error(meshctl("policy", "verify", "junk", "--root", "auth/root.msgpack", cwd=ws, check=False))
    assert err.startswith("invalid:")
    err = one_line_error(meshctl("policy", "inspect", "junk", cwd=ws, check=False))
    assert "not a policymesh signed file" in err
    err = one_line_error(meshctl("policy", "verify", "junk", "--root", "junk", cwd=ws, check=False))
    assert "invalid" in err


def test_bad_policy_toml_names_rule_and_field(ws):
    (ws / "bad.toml").write_text(POLICY.replace("tcp/5432", "tcp/99999"))
    err = one_line_error(meshctl("policy", "sign", "bad.toml", "--authority", "auth", *KEY, "--out", "x", cwd=ws, check=False))
    assert "app-to-db" in err and "ports" in err
    (ws / "bad.toml").write_text(POLICY.replace('inbound = "drop"', 'inbound = "accept"'))
    err = one_line_error(meshctl("policy", "sign", "bad.toml", "--authority", "auth", *KEY, "--out", "x", cwd=ws, check=False))
    assert "inbound" in err


def test_threshold_signing_with_cosign(tmp_path):
    meshctl("authority", "init", "auth", "--policy-keys", "3", "--policy-threshold", "2", cwd=tmp_path)
    (tmp_path / "pol.toml").write_text(POLICY)
    meshctl("policy", "sign", "pol.toml", "--authority", "auth", "--key", "auth/secrets/policy-1-1.key",
            "--out", "p.msgpack", cwd=tmp_path)
    err = one_line_error(meshctl("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", cwd=tmp_path,
                                 check=False))
    assert "1 valid signature" in err and "threshold is 2" in err
    meshctl("policy", "cosign", "p.msgpack", "--key", "auth/secrets/policy-1-3.key", cwd=tmp_path)
    assert meshctl("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", cwd=tmp_path).returncode == 0
    insp = meshctl("policy", "inspect", "p.msgpack", "--root", "auth/root.msgpack", cwd=tmp_path).stdout
    assert "valid_signatures 2" in insp


def test_rotate_root_and_verify_through_chain(ws):
    meshctl("policy", "sign", "pol.toml", "--authority", "auth", *KEY, "--out", "old.msgpack", cwd=ws)
    anchor = (ws / "auth" / "root.msgpack").read_bytes()
    (ws / "pinned.msgpack").write_bytes(anchor)
    out = meshctl("authority", "rotate-root", "auth", "--rotate", "policy", "--key", "auth/secrets/root-1-1.key",
                  cwd=ws).stdout
    assert "root v2 installed" in out
    meshctl("policy", "sign", "pol.toml", "--authority", "auth", "--key", "auth/secrets/policy-2-1.key",
            "--out", "new.msgpack", cwd=ws)
    # A verifier pinned to the authority dir follows the chain; the old policy is now under an old root.
    assert meshctl("policy", "verify", "new.msgpack", "--root", "auth/root.msgpack", cwd=ws).returncode == 0
    err = one_line_error(meshctl("policy", "verify", "old.msgpack", "--root", "auth/root.msgpack", cwd=ws, check=False))
    assert "root v1" in err
    # A verifier holding only the old anchor is told which root it needs.
    err = one_line_error(meshctl("policy", "verify", "new.msgpack", "--root", "pinned.msgpack", cwd=ws, check=False))
    assert "needs root v2" in err


def test_help_everywhere(tmp_path):
    for args in (["--help"], ["authority", "init", "--help"], ["node", "enroll", "--help"],
                 ["policy", "sign", "--help"], ["policy", "verify", "--help"]):
        assert meshctl(*args, cwd=tmp_path).stdout.startswith("usage:")
    proc = meshctl("policy", "sign", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "required" in proc.stderr


def test_refuses_to_overwrite_authority(ws):
    err = one_line_error(meshctl("authority", "init", "auth", cwd=ws, check=False))
    assert "refusing to overwrite" in err


def test_enroll_signs_only_with_the_enroll_key_it_is_given(tmp_path):
    """No command signs with keys it was not given: without --key, enroll is a usage error (exit 2) that
    says how, even when plaintext enroll keys lie in the authority directory."""
    meshctl("authority", "init", "auth", "--cluster", "c1", cwd=tmp_path)
    proc = meshctl("node", "enroll", "--authority", "auth", "--node-id", "n1", "--region", "eu", "--role", "db",
                   "--address", "10.1.0.5", "--out", "n1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--key KEYFILE" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "n1").exists()
    proc = meshctl("node", "enroll", "--authority", "auth", "--node-id", "n1", "--region", "eu", "--role", "db",
                   "--address", "10.1.0.5", "--out", "n1", "--key", "auth/secrets/policy-1-1.key", cwd=tmp_path,
                   check=False)
    assert proc.returncode != 0 and not (tmp_path / "n1").exists(), "a policy key does not sign certificates"
