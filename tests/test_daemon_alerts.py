"""Alert webhooks on a real daemon, received by a real HTTP server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from protocol.signing import decode_envelope, encode_envelope
from tests.daemon_helpers import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


class Receiver:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length", "0"))
                outer.bodies.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_forged_policy_raises_a_webhook_alert(tmp_path: Path) -> None:
    receiver = Receiver()
    cluster = Cluster(tmp_path, subnet=42)
    try:
        node = cluster.add_node("alert-1", "region-a")
        node.config.write_text(node.config.read_text() + f'\n[alerts]\nwebhook_urls = ["{receiver.url}"]\n')
        cluster.start([node])
        _, data = cluster.sign()
        env = decode_envelope(data, "policy")
        forged = encode_envelope(type(env)(type="policy", payload=env.payload[:-1] + b"\x00", signatures=env.signatures))
        reply = cluster.publish(node, forged)
        assert not reply["ok"]
        wait_until(lambda: any(b.get("event") == "policy.rejected" for b in receiver.bodies), 20, "webhook alert")
        alert = next(b for b in receiver.bodies if b.get("event") == "policy.rejected")
        assert alert["node"] == "alert-1" and alert["fields"]["source"].startswith("operator:")
        # Counted in metrics too.
        assert any(name == "policymesh_alerts_total" and ("event", "policy.rejected") in labels and v >= 1
                   for (name, labels), v in node.metrics().items())
    finally:
        cluster.close()
        receiver.close()
