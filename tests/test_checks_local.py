"""The daemon's side of the local checks, with a recording alert sink and a virtual clock."""

from __future__ import annotations

from typing import Any

from meshnode.checks.local import ABUSE, PORT_AUDIT, LocalChecks, deliver
from meshnode.checks.ports import Listener
from meshnode.config import ValidateSection
from meshnode.enforce import RenderOptions, render
from simulations.identities import make_authority, make_node


class Sink:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def raise_(self, check: str, subject: str, severity: Any, summary: str, details: Any, now: float) -> None:
        self.calls.append(("raise", check, subject, severity))

    def resolve(self, check: str, subject: str, now: float) -> None:
        self.calls.append(("resolve", check, subject))


def _ruleset(abuse_block: bool):  # type: ignore[no-untyped-def]
    auth = make_authority()
    a = make_node(auth, "node-a", roles=("db",), addresses=("10.9.0.1",))
    b = make_node(auth, "node-b", roles=("app",), addresses=("10.9.0.2",))
    return render(None, a.cert, [b.cert], RenderOptions(mesh_port=7946, abuse_block=abuse_block,
                                                        mesh_join_cidrs=("0.0.0.0/0",)))


def test_port_audit_rounds_raise_once_and_resolve() -> None:
    listening = [Listener("tcp", "0.0.0.0", 7946, 1, "meshnode[1]")]
    checks = LocalChecks(ValidateSection(expected_listeners=["tcp/5432"]), table="policymesh", mesh_port=7946,
                         listeners=lambda: listening)
    sink, ruleset = Sink(), _ruleset(False)
    deliver(sink, PORT_AUDIT, checks.port_audit(ruleset), 1.0)  # own mesh port implicitly declared
    assert sink.calls == [("raise", "port_audit", "tcp/5432", "warning")]
    deliver(sink, PORT_AUDIT, checks.port_audit(ruleset), 2.0)
    assert len(sink.calls) == 1
    listening.append(Listener("tcp", "0.0.0.0", 5432, 2, "postgres[2]"))
    deliver(sink, PORT_AUDIT, checks.port_audit(ruleset), 3.0)
    assert sink.calls[1:] == [("resolve", "port_audit", "tcp/5432")]


def test_abuse_episode_and_block_decision() -> None:
    validate = ValidateSection(abuse_threshold=3, abuse_window_s=10, block_abusers_s=600)
    checks = LocalChecks(validate, table="policymesh", mesh_port=7946, listeners=list)
    sink, ruleset = Sink(), _ruleset(True)
    argvs = [checks.bad_handshake("203.0.113.9", "rate_limited", ruleset, 100 + i) for i in range(50)]
    assert argvs[2] == ["nft", "add", "element", "inet", "policymesh", "abusers_v4", "{ 203.0.113.9 timeout 600s }"]
    assert [a for i, a in enumerate(argvs) if i != 2] == [None] * 49  # once per episode
    # members, loopback: detected, never blocked
    assert [checks.bad_handshake("10.9.0.2", "handshake_failed", ruleset, 145 + i) for i in range(3)] == [None] * 3
    assert [checks.bad_handshake("127.0.0.1", "rate_limited", ruleset, 145 + i) for i in range(3)] == [None] * 3
    assert [checks.bad_handshake("?", "rate_limited", ruleset, 145 + i) for i in range(3)] == [None] * 3
    deliver(sink, ABUSE, checks.abuse_round(150), 150)
    assert sorted(sink.calls) == [("raise", "handshake_abuse", s, "warning")
                                  for s in ("10.9.0.2", "127.0.0.1", "203.0.113.9")]
    deliver(sink, ABUSE, checks.abuse_round(155), 155)
    assert len(sink.calls) == 3
    assert checks.next_abuse_deadline() == 147 + 10  # the member and loopback went quiet first
    deliver(sink, ABUSE, checks.abuse_round(160), 160)
    assert sorted(sink.calls[3:]) == [("resolve", "handshake_abuse", s) for s in ("10.9.0.2", "127.0.0.1", "203.0.113.9")]

    # Without the block sets in force (or with blocking off) nothing is blocked.
    plain = LocalChecks(validate, table="policymesh", mesh_port=7946, listeners=list)
    assert [plain.bad_handshake("203.0.113.9", "x", _ruleset(False), i) for i in range(3)] == [None] * 3
    off = LocalChecks(ValidateSection(abuse_threshold=3), table="policymesh", mesh_port=7946, listeners=list)
    assert [off.bad_handshake("203.0.113.9", "x", ruleset, i) for i in range(3)] == [None] * 3
