"""`meshctl policy publish` to several nodes at once, on real daemons: the first node that verified and
stored the policy answers, a node that never answers is cancelled (its connection closed), unreachable
nodes are named, a refusal is reported, and the nodes come from the operator config when no --node is
given."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
from collections.abc import Iterator

import pytest

from meshnode.cli.meshctl import main as meshctl_main
from meshnode.client import OperatorError, publish_first
from tests.daemon_helpers import Cluster, NodeProc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SUBNET = 170


class BlackHole:
    """A TCP listener that accepts and never answers; records when a client closes on it."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.client_closed = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            self.accepted.set()
            conn.settimeout(120)
            with conn:
                while conn.recv(65536):  # the HTTP upgrade request arrives and stays unanswered
                    pass
                self.client_closed.set()

    def close(self) -> None:
        self.sock.close()


class FirstConnectionSwallowed:
    """A TCP relay to ``target`` whose first connection is accepted and never answered (as if its
    segments were lost); later connections are relayed both ways."""

    def __init__(self, host: str, target: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        th, tp = target.rsplit(":", 1)
        self.target = (th, int(tp))
        self.connections = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        held = []
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.connections += 1
                if self.connections == 1:
                    held.append(conn)
                    continue
                upstream = socket.create_connection(self.target)
                for a, b in ((conn, upstream), (upstream, conn)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[NodeProc]]]:
    c = Cluster(tmp_path_factory.mktemp("publish"), subnet=SUBNET)
    try:
        nodes = [c.add_node(f"pub-{i + 1}", "region-a") for i in range(3)]
        c.start(nodes)
        c.wait_members(nodes)
        yield c, nodes
    finally:
        c.close()


def run_meshctl(*args: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = meshctl_main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_the_first_node_that_stored_it_answers_and_a_silent_node_is_cancelled(cluster) -> None:
    c, nodes = cluster
    hole = BlackHole(c.ip(11))
    try:
        serial, data = c.sign()
        answer = publish_first([hole.address, nodes[1].mesh], c.operator, data, timeout_s=60)
        assert answer.node == nodes[1].mesh and answer.reply["ok"] and answer.reply["serial"] == serial
        assert hole.accepted.wait(10)
        # The request to the silent node was cancelled and its connection closed, not left to time out.
        assert hole.client_closed.wait(30), "the losing request's connection was not closed"
        c.wait_serial(serial, nodes)
    finally:
        hole.close()


def test_cli_publishes_to_every_node_given_and_names_the_unreachable(cluster) -> None:
    c, nodes = cluster
    serial, data = c.sign()
    envelope = c.root / f"publish-{serial}.msgpack"
    envelope.write_bytes(data)
    dead = f"{c.ip(10)}:9"  # nothing listens there
    rc, out, err = run_meshctl("policy", "publish", envelope, "--identity", c.operator, "--node", dead,
                               "--node", nodes[2].mesh, "--json")
    assert rc == 0, err
    reply = json.loads(out)
    assert reply["ok"] and reply["serial"] == serial and reply["node"] == nodes[2].mesh
    assert reply["asked"] == [dead, nodes[2].mesh]
    c.wait_serial(serial, nodes)


def test_operator_config_seeds_are_the_default_targets(cluster) -> None:
    c, nodes = cluster
    serial, data = c.sign()
    envelope = c.root / f"publish-{serial}.msgpack"
    envelope.write_bytes(data)
    config = c.operator / "operator.toml"
    config.write_text("[mesh]\nseeds = [" + ", ".join(f'"{n.mesh}"' for n in nodes) + "]\n")
    try:
        rc, out, err = run_meshctl("policy", "publish", envelope, "--identity", c.operator)
    finally:
        config.unlink()
    assert rc == 0, err
    assert "accepted by" in out and f"serial {serial} stored" in out
    c.wait_serial(serial, nodes)
    # Without --node and without a config: a usage error that says what is missing.
    rc, _, err = run_meshctl("policy", "publish", envelope, "--identity", c.operator)
    assert rc == 2 and "no --node given" in err


def test_a_refusal_is_reported_and_no_node_at_all_is_an_error(cluster) -> None:
    c, nodes = cluster
    _, data = c.sign()
    forged = bytearray(data)
    forged[-5] ^= 0xFF  # inside the last signature
    answer = publish_first([nodes[0].mesh, nodes[1].mesh], c.operator, bytes(forged), timeout_s=30)
    assert not answer.reply["ok"] and answer.reply["reason"]
    with pytest.raises(OperatorError, match="cannot reach"):
        publish_first([f"{c.ip(10)}:9", f"{c.ip(10)}:7"], c.operator, data, timeout_s=10)



def test_a_silent_first_connection_is_hedged_by_a_second_one(cluster) -> None:
    c, nodes = cluster
    relay = FirstConnectionSwallowed(c.ip(9), nodes[0].mesh)
    try:
        serial, data = c.sign()
        answer = publish_first([relay.address], c.operator, data, timeout_s=60)
        assert answer.reply["ok"] and answer.reply["serial"] == serial
        assert relay.connections >= 2  # the request was asked again on a new connection
        c.wait_serial(serial, nodes)
    finally:
        relay.close()
