"""The daemon's enforcer confirms what the kernel enforces: serial, ruleset hash and policy hash."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from meshnode.authority_store import AuthorityDir
from meshnode.cli.meshctl import main as meshctl
from meshnode.config import load_config
from meshnode.daemon import MeshDaemon
from protocol.trust import build_policy, decode_envelope, parse_policy_toml, payload_hash, sign_policy
from tests.daemon_helpers import BASE_POLICY


def _daemon(tmp_path: Path) -> tuple[MeshDaemon, AuthorityDir]:
    assert meshctl(["authority", "init", str(tmp_path / "auth"), "--cluster", "t1"]) == 0
    assert meshctl(["node", "enroll", "--authority", str(tmp_path / "auth"), "--node-id", "n1", "--region", "r1",
                    "--role", "app", "--address", "127.0.0.1", "--backend", "file",
                    "--out", str(tmp_path / "n1"), "--key", str(tmp_path / "auth/secrets/enroll-1-1.key")]) == 0
    return MeshDaemon(load_config(tmp_path / "n1" / "node.toml")), AuthorityDir(tmp_path / "auth")


def test_an_equivocation_resolved_to_the_same_ruleset_is_still_confirmed(tmp_path: Path) -> None:
    """Two same-serial policies with identical rules render the same ruleset; switching to the lower
    hash must still be confirmed to the core (else it reports trusted-but-not-enforced forever)."""
    daemon, adir = _daemon(tmp_path)
    root = adir.root()
    seeds = adir.role_seeds(root, "policy")
    doc, rev = parse_policy_toml(BASE_POLICY)
    now = int(time.time())
    envs = [sign_policy(build_policy(root.cluster, 7, now, now + 3600 + k, root.version, doc, rev), seeds)
            for k in range(2)]
    envs.sort(key=lambda e: payload_hash(decode_envelope(e, "policy").payload), reverse=True)  # higher first
    confirmed: list[tuple[int, str, str]] = []
    daemon.enforcer.on_applied = lambda s, r, p: confirmed.append((s, r, p))

    async def run() -> None:
        await daemon.enforcer.setup()
        for env in envs:
            daemon.trust.accept_policy(env, time.time())
            assert daemon.trust.policy is not None
            assert await daemon.enforcer.apply_now(daemon.trust.policy, [daemon.identity.cert], daemon.trust.policy_hash)

    asyncio.run(run())
    hashes = [payload_hash(decode_envelope(e, "policy").payload) for e in envs]
    assert [c[0] for c in confirmed] == [7, 7]
    assert confirmed[0][1] == confirmed[1][1], "same rules, same ruleset"
    assert [c[2] for c in confirmed] == hashes
    assert daemon.enforcer.status()["policy_hash"] == hashes[1]
