"""Port audit against the real kernel: real listening sockets in this process, read back from /proc/net,
audited against a synthetic ruleset."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from meshnode.checks import Finding, diff_findings
from meshnode.checks.ports import (
    Listener,
    audit_ports,
    decode_address,
    exposing_rules,
    parse_expected,
    parse_proc_net,
    read_listeners,
)
from meshnode.enforce.model import AddressSet, FilterRule, Ruleset


def _listen(proto: str, host: str) -> socket.socket:
    if proto == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((host, 0))
        s.listen(4)
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
    return s


@pytest.fixture
def sockets() -> Iterator[dict[str, socket.socket]]:
    socks = {
        "exposed_tcp": _listen("tcp", "0.0.0.0"),
        "declared_tcp": _listen("tcp", "0.0.0.0"),
        "unexposed_tcp": _listen("tcp", "0.0.0.0"),
        "loopback_tcp": _listen("tcp", "127.0.0.1"),
        "exposed_udp": _listen("udp", "0.0.0.0"),
    }
    yield socks
    for s in socks.values():
        s.close()


def _port(s: socket.socket) -> int:
    return int(s.getsockname()[1])


def _ruleset(socks: dict[str, socket.socket]) -> Ruleset:
    sets = (
        AddressSet("breakglass_v4", "ip", True, ("192.0.2.0/24",)),
        AddressSet("role_app_v4", "ip", False, ("10.0.0.1",)),
        AddressSet("role_web_v6", "ip6", False, ("fd00::1",)),
    )
    p = {name: _port(s) for name, s in socks.items()}
    rules = (
        FilterRule("accept", "established", ct_state=("established", "related")),
        FilterRule("accept", "loopback", iif="lo"),
        FilterRule("accept", "break-glass override", source_set="breakglass_v4"),
        FilterRule("accept", "allow app", source_set="role_app_v4", proto="tcp",
                   ports=((p["exposed_tcp"], p["exposed_tcp"]), (p["declared_tcp"], p["declared_tcp"]),
                          (p["loopback_tcp"], p["loopback_tcp"]))),
        FilterRule("accept", "allow web", source_set="role_web_v6", proto="tcp",
                   ports=((p["unexposed_tcp"], p["unexposed_tcp"]),)),  # IPv6 only: the socket is IPv4
        FilterRule("accept", "allow dns", source_set="role_app_v4", proto="udp",
                   ports=((p["exposed_udp"], p["exposed_udp"]),)),
        FilterRule("drop", "default"),
    )
    return Ruleset("policymesh", sets, rules)


def test_audit_of_real_listeners(sockets: dict[str, socket.socket]) -> None:
    ports = {name: _port(s) for name, s in sockets.items()}
    mine = {f"tcp/{ports[n]}" for n in ("exposed_tcp", "declared_tcp", "unexposed_tcp", "loopback_tcp")}
    mine.add(f"udp/{ports['exposed_udp']}")
    listeners = [x for x in read_listeners() if x.subject in mine]
    assert {x.subject for x in listeners} == mine - {f"tcp/{ports['loopback_tcp']}"}, "loopback listener ignored"
    assert all(x.process == f"{_comm()}[{os.getpid()}]" for x in listeners)

    expected = [f"tcp/{ports['declared_tcp']}", f"tcp/{ports['loopback_tcp']}"]
    findings = audit_ports(listeners, _ruleset(sockets), expected)
    exposed, udp, loop = f"tcp/{ports['exposed_tcp']}", f"udp/{ports['exposed_udp']}", f"tcp/{ports['loopback_tcp']}"
    assert set(findings) == {exposed, udp, loop}
    assert findings[exposed].kind == "undeclared_listener"
    assert findings[exposed].details["rules"] == ["allow app from role_app_v4"]  # not break-glass
    assert str(os.getpid()) in findings[exposed].summary and "allow app" in findings[exposed].summary
    assert findings[udp].kind == "undeclared_listener" and findings[udp].details["rules"] == ["allow dns from role_app_v4"]
    # Declared, but listening on loopback only: nothing reachable is listening.
    assert findings[loop].kind == "missing_listener"

    info = audit_ports(listeners, _ruleset(sockets), expected, include_info=True)
    assert info[f"tcp/{ports['unexposed_tcp']}"].kind == "unexposed_listener"
    assert info[f"tcp/{ports['unexposed_tcp']}"].severity == "info"


def test_closing_the_listener_resolves_its_finding(sockets: dict[str, socket.socket]) -> None:
    ruleset = _ruleset(sockets)
    subject = f"tcp/{_port(sockets['exposed_tcp'])}"

    def round_() -> dict[str, Finding]:
        return {s: f for s, f in audit_ports(read_listeners(), ruleset, []).items() if s == subject}

    first = round_()
    assert diff_findings({}, first).raised == (first[subject],)
    assert diff_findings(first, round_()).raised == ()  # holds: nothing new
    sockets["exposed_tcp"].close()
    changes = diff_findings(first, round_())
    assert changes.resolved == (subject,) and changes.raised == ()


def _comm() -> str:
    with open(f"/proc/{os.getpid()}/comm") as f:
        return f.read().strip()


def test_parse_proc_net_tables() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
        "   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1\n"
        "   2: 0A00000A:0016 0B00000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 333 1\n"
    )
    got = parse_proc_net(tcp, "tcp")
    assert [(x.address, x.port, x.inode) for x in got] == [("127.0.0.1", 8080, 111), ("0.0.0.0", 22, 222)]
    assert got[0].is_loopback() and not got[1].is_loopback()
    udp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref\n"
        "  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 444 2\n"
        "  11: 0A00000A:D431 0808080808:0035 01 00000000:00000000 00:00000000 00000000     0        0 555 2\n"
    )
    assert [(x.proto, x.port) for x in parse_proc_net(udp, "udp")] == [("udp", 53)]
    assert decode_address("00000000000000000000000001000000") == "::1"
    assert decode_address("B80D0120000000000000000001000000") == "2001:db8::1"
    assert Listener("tcp", "::ffff:127.0.0.1", 1, 0).is_loopback()


def test_exposure_respects_families_and_ignores_state_rules() -> None:
    rs = Ruleset("t", (AddressSet("role_a_v6", "ip6", False, ("fd00::1",)),), (
        FilterRule("accept", "established", ct_state=("established",)),
        FilterRule("accept", "allow a", source_set="role_a_v6", proto="tcp", ports=((80, 90),)),
        FilterRule("accept", "default (log mode)"),
    ))
    assert [r.comment for r in exposing_rules(rs, "tcp", 85, ("ip",))] == ["default (log mode)"]
    assert [r.comment for r in exposing_rules(rs, "tcp", 85, ("ip6",))] == ["allow a", "default (log mode)"]
    # the unspecified IPv6 address takes IPv4 too
    dual = audit_ports([Listener("tcp", "::", 85, 1, "x[1]")], rs, [])
    assert dual["tcp/85"].details["rules"] == ["allow a from role_a_v6", "default (log mode) from anyone"]
    assert audit_ports([Listener("tcp", "::", 85, 1)], None, []) == {}


def test_expected_listeners_are_validated() -> None:
    assert parse_expected(["TCP/5432", "udp/53"]) == {"tcp/5432", "udp/53"}
    for bad in ("tcp/0", "sctp/1", "tcp", "tcp/70000", "5432"):
        with pytest.raises(ValueError):
            parse_expected([bad])
