"""The validation summary in the signed status: wire compatibility both ways, the size caps, when the
node signs a new status, and what the cluster view makes of the members' reports."""

from __future__ import annotations

import msgspec
import pytest

from protocol.errors import RemoteProtocolError
from protocol.gossip.events import ValidationReported
from protocol.gossip.wire import (
    MAX_REPORT_PORTS,
    MAX_STATUS_BYTES,
    MAX_VALIDATIONS,
    ProbeReport,
    StatusBody,
    decode_payload,
    encode,
    encode_status,
)
from simulations.fakelink import FakeLink


class StatusBodyV1(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """The status as the first release knew it (what an old node decodes)."""

    node_id: str
    seq: int
    serial: int
    policy_hash: bytes
    ruleset_hash: bytes
    state: str
    trusted_serial: int = 0
    trusted_hash: bytes = b""
    equivocation_serial: int = 0
    equivocation: tuple[bytes, ...] = ()


def _body(**kw) -> StatusBody:  # type: ignore[no-untyped-def]
    return StatusBody("n1", 7, 3, b"\1" * 8, b"\2" * 8, "fresh", 3, b"\1" * 8, **kw)


def test_a_status_without_a_summary_is_written_as_before() -> None:
    body = _body()
    old = StatusBodyV1("n1", 7, 3, b"\1" * 8, b"\2" * 8, "fresh", 3, b"\1" * 8)
    assert encode_status(body) == msgspec.msgpack.encode(old)  # byte for byte: old signatures still verify
    assert decode_payload(msgspec.msgpack.encode(old)) == body


def test_an_old_node_reads_a_new_status() -> None:
    body = _body(validations=(ProbeReport("n2", 1_700_000_000, 4, (9999,)),), alerts_open=(1, 0, 2, 0))
    data = encode_status(body)
    assert decode_payload(data) == body
    old = msgspec.msgpack.decode(data, type=StatusBodyV1)  # trailing fields are ignored
    assert (old.node_id, old.seq, old.serial) == ("n1", 7, 3)


@pytest.mark.parametrize("body", [
    _body(validations=tuple(ProbeReport(f"n{i}", 1, 1) for i in range(MAX_VALIDATIONS + 1))),
    _body(validations=(ProbeReport("n2", 1, 1, tuple(range(1, MAX_REPORT_PORTS + 2))),)),
    _body(validations=(ProbeReport("n2", 1, 1, (0,)),)),
    _body(validations=(ProbeReport("x" * 65, 1, 1),)),
    _body(alerts_open=(1, 2, 3, 4, 5)),
    _body(alerts_open=(-1,)),
])
def test_oversize_or_malformed_summaries_are_refused(body: StatusBody) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_payload(encode(body))


def test_the_largest_summary_fits_a_status_item() -> None:
    ports = tuple(range(60000, 60000 + MAX_REPORT_PORTS))
    body = _body(validations=tuple(ProbeReport("n" * 64, (1 << 32) - 1, (1 << 32) - 1, ports, ports)
                                   for _ in range(MAX_VALIDATIONS)), alerts_open=((1 << 32) - 1,) * 4)
    size = len(encode_status(body)) + 64
    assert decode_payload(encode_status(body)) == body
    assert size < MAX_STATUS_BYTES / 2, size


def _joined(n: int = 3) -> FakeLink:
    link = FakeLink(n=n)
    link.start()
    link.run_for(8000)
    return link


def test_reports_travel_in_the_signed_status_and_the_view_gathers_them() -> None:
    link = _joined(3)
    seq0 = link.hosts["n0"].node.membership.own.status_seq
    at = int(link.now().wall)
    link.feed("n0", ValidationReported((ProbeReport("n1", at, 5, (9999,)), ProbeReport("n2", at, 6)), (1, 0, 0, 2)))
    link.feed("n2", ValidationReported((ProbeReport("n1", at + 1, 4),), (0, 0, 0, 0)))
    assert link.hosts["n0"].node.membership.own.status_seq > seq0
    link.run_for(45_000)  # statuses reconcile by anti-entropy
    view = link.hosts["n1"].node.status(link.now())
    by_id = {m["node_id"]: m for m in view["members"]}
    v1 = by_id["n1"]["validated"]
    assert v1["target"] == "n1" and v1["by"] == 2 and v1["probers"] == ["n0", "n2"] and v1["last_at"] == at + 1
    assert v1["holes"] == [{"port": 9999, "by": "n0", "at": at}]
    assert by_id["n2"]["validated"]["by"] == 1 and by_id["n2"]["validated"]["holes"] == []
    assert by_id["n0"]["validated"] is None
    assert by_id["n0"]["alerts_open"] == {"critical": 1, "error": 0, "warning": 0, "info": 2}
    assert by_id["n1"]["alerts_open"] is None  # n1 never reported
    assert view["alerts"] == {"critical": 1, "error": 0, "warning": 0, "info": 2}
    assert view["validation"] == {"validated": 2, "holes": ["n1 tcp/9999 (seen by n0)"]}


def test_a_new_probe_time_alone_is_signed_only_after_the_refresh_interval() -> None:
    link = _joined(2)
    node = link.hosts["n0"].node
    at = int(link.now().wall)
    link.feed("n0", ValidationReported((ProbeReport("n1", at, 5),), (0, 0, 0, 0)))
    seq = node.membership.own.status_seq
    link.feed("n0", ValidationReported((ProbeReport("n1", at + 30, 5),), (0, 0, 0, 0)))
    assert node.membership.own.status_seq == seq  # same findings: not worth a status
    link.feed("n0", ValidationReported((ProbeReport("n1", at + 60, 5, (22,)),), (1, 0, 0, 0)))
    assert node.membership.own.status_seq > seq  # a hole: signed at once
    seq = node.membership.own.status_seq
    link.run_for(node.cfg.validation_refresh_ms + 1000)
    link.feed("n0", ValidationReported((ProbeReport("n1", at + 400, 5, (22,)),), (1, 0, 0, 0)))
    assert node.membership.own.status_seq > seq
    assert node.members.status_of("n0").validations[0].at == at + 400  # type: ignore[union-attr]


def test_member_summary_is_the_cheap_liveness_view() -> None:
    link = _joined(3)
    node = link.hosts["n0"].node
    summary = node.member_summary()
    view = {m["node_id"]: m for m in node.status(link.now())["members"]}
    assert sorted(summary) == sorted((n, m["region"], m["liveness"], m["address"]) for n, m in view.items())
