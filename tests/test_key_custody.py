"""Key custody: signing only with named keys, per-holder key files, passphrase-encrypted keys, the exit
codes and JSON output of the checking commands, and the runbook's key ceremony run end to end."""

from __future__ import annotations

import json
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from meshnode.cli.meshctl import main as meshctl_main
from meshnode.examples import sample_policy_toml
from meshnode.keyfile import key_header, read_key

RUNBOOK = Path(__file__).resolve().parent.parent / "deploy" / "RUNBOOK.md"
HOLDERS = ("alice", "bob", "carol")


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "meshnode.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def ceremony_commands() -> list[tuple[list[str], int]]:
    """The meshctl lines of the runbook's key ceremony block, each with the exit code its comment names."""
    text = RUNBOOK.read_text()
    section = text[text.index("## Key ceremony"):]
    block = section[section.index("```sh\n") + 6:section.index("```", section.index("```sh\n") + 6)]
    commands = []
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = re.search(r"#\s*exit (\d)\s*$", line)
        words = shlex.split(line, comments=True)
        assert words[0] == "meshctl", line
        commands.append((words[1:], int(m.group(1)) if m else 0))
    return commands


def write_passphrases(ws: Path) -> None:
    for h in HOLDERS:
        (ws / f"{h}.pass").write_text(f"correct horse {h} staple\n")
        (ws / f"{h}.pass").chmod(0o600)


def test_runbook_key_ceremony_end_to_end(tmp_path: Path) -> None:
    write_passphrases(tmp_path)
    (tmp_path / "policy.toml").write_text(sample_policy_toml())
    commands = ceremony_commands()
    assert len(commands) >= 12
    for argv, expected in commands:
        proc = run(*argv, cwd=tmp_path)
        assert proc.returncode == expected, f"meshctl {shlex.join(argv)}: exit {proc.returncode}\n{proc.stderr}"
        if argv[:2] == ["policy", "verify"] and expected == 1:
            assert proc.stderr.startswith("invalid:"), proc.stderr
    auth = tmp_path / "auth"
    # Every key is its holder's, encrypted, 0600 in a 0700 directory; no plaintext seed anywhere.
    for h in HOLDERS:
        d = auth / "secrets" / h
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        for f in d.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600
            assert key_header(f)["encrypted"] and "ed25519_seed" not in f.read_text()
    assert not list((auth / "secrets").glob("*.key"))
    assert sorted(p.name for p in (auth / "secrets" / "carol").iterdir()) == [
        "policy-1-3.key", "policy-2-3.key", "root-1-3.key"]
    show = json.loads(run("authority", "show", "auth", "--json", cwd=tmp_path).stdout)
    assert show["root_version"] == 2
    assert show["roles"]["policy"]["threshold"] == 2 and show["roles"]["root"]["threshold"] == 2
    # The new policy keys are the ones in the v2 files (and each opens only with its holder's passphrase).
    v2_policy = set(show["roles"]["policy"]["keys"][i]["key_id"] for i in range(3))
    carol = read_key(auth / "secrets" / "carol" / "policy-2-3.key", lambda _p: b"correct horse carol staple")
    assert carol.key_id in v2_policy
    verify = run("policy", "verify", "p2.msgpack", "--root", "auth/root.msgpack", "--json", cwd=tmp_path)
    info = json.loads(verify.stdout)
    assert verify.returncode == 0 and info["valid"] and info["valid_signatures"] == 2 and info["root_version"] == 2
    assert info["serial"] == 1  # new policy keys: serials start again at 1 (also through a pending root)


def test_below_threshold_verify_says_so(tmp_path: Path) -> None:
    write_passphrases(tmp_path)
    (tmp_path / "policy.toml").write_text(sample_policy_toml())
    assert meshctl_main(["authority", "init", str(tmp_path / "auth"), "--holders", "alice,bob", "--policy-keys", "2",
                         "--policy-threshold", "2"]) == 0
    assert meshctl_main(["policy", "sign", str(tmp_path / "policy.toml"), "--authority", str(tmp_path / "auth"),
                         "--key", str(tmp_path / "auth/secrets/alice/policy-1-1.key"),
                         "--out", str(tmp_path / "p.msgpack")]) == 0
    proc = run("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", "--json", cwd=tmp_path)
    assert proc.returncode == 1
    assert "1 valid signature" in proc.stderr and "threshold is 2" in proc.stderr
    assert json.loads(proc.stdout)["valid"] is False


@pytest.fixture
def plain_authority(tmp_path: Path) -> Path:
    assert meshctl_main(["authority", "init", str(tmp_path / "auth"), "--cluster", "t1"]) == 0
    (tmp_path / "policy.toml").write_text(sample_policy_toml())
    return tmp_path


def test_sign_without_key_is_a_usage_error_that_says_how(plain_authority: Path) -> None:
    ws = plain_authority
    proc = run("policy", "sign", "policy.toml", "--authority", "auth", "--out", "p.msgpack", cwd=ws)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--key KEYFILE" in proc.stderr
    assert not (ws / "p.msgpack").exists()
    proc = run("authority", "rotate-root", "auth", "--rotate", "policy", cwd=ws)
    assert proc.returncode == 2 and "--key KEYFILE" in proc.stderr
    assert json.loads(run("authority", "show", "auth", "--json", cwd=ws).stdout)["root_version"] == 1


def test_signing_key_of_the_wrong_role_is_refused(plain_authority: Path) -> None:
    proc = run("policy", "sign", "policy.toml", "--authority", "auth", "--key", "auth/secrets/enroll-1-1.key",
               "--out", "p.msgpack", cwd=plain_authority)
    assert proc.returncode == 1 and "not a policy key" in proc.stderr
    proc = run("authority", "rotate-root", "auth", "--rotate", "policy", "--key", "auth/secrets/policy-1-1.key",
               cwd=plain_authority)
    assert proc.returncode == 1 and "not a root key" in proc.stderr


def test_encrypted_key_needs_the_right_passphrase(tmp_path: Path) -> None:
    write_passphrases(tmp_path)
    (tmp_path / "wrong.pass").write_text("not it\n")
    (tmp_path / "policy.toml").write_text(sample_policy_toml())
    assert run("authority", "init", "auth", "--passphrase-file", "alice.pass", cwd=tmp_path).returncode == 0
    key = tmp_path / "auth/secrets/policy-1-1.key"
    raw = json.loads(key.read_text())
    assert raw["format"] == 2 and raw["kdf"]["name"] == "argon2id" and "ed25519_seed" not in raw
    sign = ("policy", "sign", "policy.toml", "--authority", "auth", "--key", str(key), "--out", "p.msgpack")
    proc = run(*sign, cwd=tmp_path)  # stdin is not a terminal: no prompt, a clear error
    assert proc.returncode == 1 and "encrypted" in proc.stderr and "--passphrase-file" in proc.stderr
    proc = run(*sign, "--passphrase-file", "wrong.pass", cwd=tmp_path)
    assert proc.returncode == 1 and "wrong passphrase" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "p.msgpack").exists()
    proc = run(*sign, "--passphrase-file", "missing.pass", cwd=tmp_path)
    assert proc.returncode == 3
    assert run(*sign, "--passphrase-file", "alice.pass", cwd=tmp_path).returncode == 0
    enroll = ("node", "enroll", "--authority", "auth", "--node-id", "n1", "--region", "eu", "--role", "db",
              "--backend", "file", "--out")
    proc = run(*enroll, "n1", cwd=tmp_path)  # no --key: the encrypted enroll key is not opened implicitly
    assert proc.returncode == 2 and "--key" in proc.stderr and not (tmp_path / "n1").exists()
    assert run(*enroll, "n1", "--key", "auth/secrets/enroll-1-1.key", "--passphrase-file", "alice.pass",
               cwd=tmp_path).returncode == 0
    assert run("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", cwd=tmp_path).returncode == 0


def test_holders_must_cover_every_key(tmp_path: Path) -> None:
    proc = run("authority", "init", "auth", "--holders", "alice,bob", "--policy-keys", "3", cwd=tmp_path)
    assert proc.returncode == 1 and "defeats the threshold" in proc.stderr
    proc = run("authority", "init", "auth2", "--holders", "alice", "--passphrase-file", "bob=x.pass", cwd=tmp_path)
    assert proc.returncode != 0


def test_exit_codes_and_json(plain_authority: Path) -> None:
    ws = plain_authority
    assert run("policy", "verify", "nope.msgpack", "--root", "auth/root.msgpack", cwd=ws).returncode == 3
    assert run("policy", "verify", "policy.toml", "--root", "nope", cwd=ws).returncode == 3
    assert run("policy", "verify", "--root", "auth/root.msgpack", cwd=ws).returncode == 2
    assert run("policy", "sign", "nope.toml", "--authority", "auth", "--key", "auth/secrets/policy-1-1.key",
               "--out", "x", cwd=ws).returncode == 3
    (ws / "junk").write_bytes(b"\x00junk")
    assert run("policy", "verify", "junk", "--root", "auth/root.msgpack", cwd=ws).returncode == 1
    help_text = run("policy", "verify", "--help", cwd=ws).stdout
    assert "3 unreadable input" in help_text and "1 invalid" in help_text
    proc = run("node", "enroll", "--authority", "auth", "--node-id", "db1", "--region", "eu", "--role", "db",
               "--address", "10.1.0.5", "--out", "db1", "--backend", "file", "--json",
               "--key", "auth/secrets/enroll-1-1.key", cwd=ws)
    enrolled = json.loads(proc.stdout)
    assert enrolled["node_id"] == "db1" and enrolled["config"].endswith("node.toml")
    check = subprocess.run([sys.executable, "-m", "meshnode.cli.meshnode", "check-config", "--config",
                            "db1/node.toml", "--json"], cwd=ws, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["valid"] and json.loads(check.stdout)["node_id"] == "db1"
    (ws / "db1/node.cert").unlink()
    check = subprocess.run([sys.executable, "-m", "meshnode.cli.meshnode", "check-config", "--config",
                            "db1/node.toml", "--json"], cwd=ws, capture_output=True, text=True, timeout=60)
    assert check.returncode == 3 and json.loads(check.stdout)["valid"] is False
    check = subprocess.run([sys.executable, "-m", "meshnode.cli.meshnode", "check-config", "--config", "none.toml"],
                           cwd=ws, capture_output=True, text=True, timeout=60)
    assert check.returncode == 3


def test_prompts_for_the_passphrase_on_a_terminal(tmp_path: Path) -> None:
    import os
    import pty
    import select

    write_passphrases(tmp_path)
    (tmp_path / "policy.toml").write_text(sample_policy_toml())
    assert run("authority", "init", "auth", "--passphrase-file", "alice.pass", cwd=tmp_path).returncode == 0
    pid, fd = pty.fork()
    if pid == 0:  # the child: meshctl on a terminal
        os.chdir(tmp_path)
        os.execv(sys.executable, [sys.executable, "-m", "meshnode.cli", "policy", "sign", "policy.toml",
                                  "--authority", "auth", "--key", "auth/secrets/policy-1-1.key", "--out", "p.msgpack"])
    def read_some() -> bytes:
        if not select.select([fd], [], [], 60)[0]:
            os.kill(pid, 9)
            raise AssertionError(f"meshctl on a terminal is silent; so far: {seen!r}")
        try:
            return os.read(fd, 1024)
        except OSError:  # the child closed the terminal
            return b""

    seen = b""
    while b"passphrase for" not in seen:
        seen += read_some()
    os.write(fd, b"correct horse alice staple\n")
    while chunk := read_some():
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
    assert b"correct horse" not in seen  # not echoed
    assert run("policy", "verify", "p.msgpack", "--root", "auth/root.msgpack", cwd=tmp_path).returncode == 0


def test_publish_json_and_refusal_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import meshnode.client

    (tmp_path / "p.msgpack").write_bytes(b"signed")
    replies = iter([{"ok": True, "serial": 3}, {"ok": False, "reason": "rollback"}])
    monkeypatch.setattr(meshnode.client, "publish_first",
                        lambda nodes, *a, **k: meshnode.client.Answer(nodes[0], next(replies), {}))
    argv = ["policy", "publish", str(tmp_path / "p.msgpack"), "--node", "127.0.0.1:1", "--identity", str(tmp_path),
            "--json"]
    assert meshctl_main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"node": "127.0.0.1:1", "asked": ["127.0.0.1:1"], "unreachable": {},
                                                   "ok": True, "serial": 3}
    assert meshctl_main(argv) == 1
    assert json.loads(capsys.readouterr().out)["reason"] == "rollback"
    assert meshctl_main([*argv[:2], str(tmp_path / "missing"), *argv[3:]]) == 3
