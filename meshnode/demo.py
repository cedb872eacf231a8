"""`meshctl demo`: a local mesh of real meshnode processes on loopback addresses.

Every node listens on its own loopback address (127.0.0.x). Between the nodes sits a userspace
fault-injecting proxy run by the demo: each node's advertised mesh address is a proxy port that
forwards to the node, and each node dials from its own address, so the proxy knows both ends of every
connection and can cut a region off (and heal it) without root. Enforcement uses the `file` backend as
a visible, labelled override unless `--netns` is given (root: one network namespace per node and real
nftables).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from .authority_store import CliError
from .client import OperatorError
from .demo_mesh import CONVERGE_TIMEOUT_S, DemoMesh
from .demo_proxy import DemoNode, Proxy
from .status_view import format_status


class Demo(DemoMesh):
    """The demo tour on a `DemoMesh`: publish, authority outage, partition and heal, each measured."""

    def publish_and_wait(self, name: str, via: DemoNode, targets: list[DemoNode],
                         must_hold: dict[DemoNode, int] | None = None) -> dict[str, Any]:
        data = self.sign(f'\n[[allow]]\nname = "step-{self.serial + 1}"\nfrom = ["role:web"]\nto = ["role:web"]\n'
                         f'ports = ["tcp/{9000 + self.serial + 1}"]\n')
        serial = self.serial
        t0 = time.monotonic()
        try:
            reply = self._publish(via, data)
        except OperatorError as exc:
            raise CliError(f"publish through {via.node_id} failed: {exc}") from None
        if not reply.get("ok"):
            raise CliError(f"{via.node_id} refused serial {serial}: {reply.get('reason')}")
        self._say(f"[{name}] published serial {serial} through {via.node_id}")
        done: dict[str, float] = {}
        deadline = t0 + CONVERGE_TIMEOUT_S
        last_print = 0.0
        while time.monotonic() < deadline:
            for n in targets:
                if n.node_id not in done and self.enforced(n) >= serial:
                    done[n.node_id] = (time.monotonic() - t0) * 1000
            if len(done) == len(targets):
                break
            if time.monotonic() - last_print > 1.0:
                self._say(f"  ... {len(done)}/{len(targets)} nodes enforce serial {serial}")
                last_print = time.monotonic()
            time.sleep(self.poll_s)
        converged = len(done) == len(targets)
        ms = max(done.values()) if converged else None
        held_ok = True
        for n, expect in (must_hold or {}).items():
            got = self.enforced(n)
            if got != expect:
                held_ok = False
            self._say(f"  {n.node_id} ({n.region}, partitioned) enforces serial {got} (expected {expect})")
        step = {"name": name, "serial": serial, "converged": converged and held_ok,
                "ms": round(ms, 1) if ms is not None else None, "nodes": len(targets), "applied": len(done),
                "via": via.node_id}
        self.steps.append(step)
        self._say(f"  {len(done)}/{len(targets)} nodes enforce serial {serial}"
                  + (f" after {ms:.0f} ms" if ms is not None else " (timed out)"))
        return step

    def tour(self) -> None:
        first = self.nodes[0]
        self.publish_and_wait("publish-v1", first, self.nodes)
        if self.lab is not None and len(self.nodes) >= 3:
            self.enforcement_check()
        # Authority outage: the node the operator published through goes away.
        self.stop_node(first)
        self._say(f"[authority-outage] stopped {first.node_id}; publishing through another node")
        live = [n for n in self.nodes if n.alive]
        self.publish_and_wait("authority-outage-v2", live[0], live)
        # Partition the last region.
        cut_region = self.nodes[-1].region
        inside = [n for n in live if n.region == cut_region]
        outside = [n for n in live if n.region != cut_region]
        if self.lab is not None:
            self.lab.cut([n.index for n in inside], [n.ip for n in self.nodes if n.region != cut_region])
        else:
            self.proxy.cut({cut_region})
        self._say(f"[partition] {cut_region} cut off from the rest ({len(inside)} nodes)")
        held = self.serial
        self.publish_and_wait("partition-v3", outside[0], outside, must_hold=dict.fromkeys(inside, held))
        if self.lab is not None:
            self.lab.heal([n.index for n in inside])
        else:
            self.proxy.heal()
        self._say(f"[heal] {cut_region} reconnected")
        t0 = time.monotonic()
        serial = self.serial
        deadline = t0 + CONVERGE_TIMEOUT_S
        while time.monotonic() < deadline and not all(self.enforced(n) >= serial for n in live):
            time.sleep(self.poll_s)
        ok = all(self.enforced(n) >= serial for n in live)
        ms = (time.monotonic() - t0) * 1000
        self.steps.append({"name": "heal", "serial": serial, "converged": ok, "ms": round(ms, 1) if ok else None,
                           "nodes": len(live), "applied": sum(1 for n in live if self.enforced(n) >= serial),
                           "via": None})
        self._say(f"  {'all' if ok else 'NOT all'} {len(live)} live nodes enforce serial {serial}"
                  + (f" {ms:.0f} ms after the heal" if ok else ""))

    def enforcement_check(self) -> None:
        """Real TCP through real nftables: web -> app:8080 is allowed, web -> db:5432 is not."""
        assert self.lab is not None
        web, app, db = self.nodes[0], self.nodes[1], self.nodes[2]
        # The member directory reaches enforcement debounced (about a second): give it a few tries.
        allowed = False
        for _ in range(5):
            allowed = self.lab.tcp_check(web.index, app.index, 8080)
            if allowed:
                break
            time.sleep(1.0)
        refused = not self.lab.tcp_check(web.index, db.index, 5432)
        self._say(f"[enforcement] {web.node_id}(web) -> {app.node_id}(app):8080 "
                  f"{'connects' if allowed else 'DOES NOT connect'} (allowed by web-to-app); "
                  f"{web.node_id}(web) -> {db.node_id}(db):5432 {'refused' if refused else 'CONNECTS'} (no rule)")
        self.steps.append({"name": "enforcement-check", "serial": self.serial, "converged": allowed and refused,
                           "ms": None, "nodes": 3, "applied": 3, "via": None})

    def report(self) -> dict[str, Any]:
        return {
            "nodes": len(self.nodes),
            "regions": self.args.regions,
            "all_converged": all(s["converged"] for s in self.steps) and bool(self.steps),
            "steps": self.steps,
            "enforcement": ("nftables in one network namespace per node" if self.lab is not None
                            else "file backend (override allow_file_backend: nothing enforced in the kernel)"),
            "dir": str(self.dir),
        }

    async def _run_async(self) -> int:
        self.proxy = Proxy(self.nodes)
        if self.lab is None:
            await self.proxy.start()
        loop = asyncio.get_running_loop()
        for n in self.nodes:
            self.start_node(n)
        await loop.run_in_executor(None, self.wait_up, self.nodes)
        await loop.run_in_executor(None, self.wait_formed)
        how = ("real nftables, one network namespace per node" if self.lab is not None else
               "file backend override (labelled: nothing is enforced; use --netns as root for real nftables)")
        self._say(f"{len(self.nodes)} meshnode processes up in {self.args.regions} regions "
                  f"(work dir {self.dir}); enforcement: {how}")
        if self.args.once:
            await loop.run_in_executor(None, self.tour)
            rep = self.report()
            if self.args.json:
                Path(self.args.json).write_text(json.dumps(rep, indent=2) + "\n")
            self._say(json.dumps({k: rep[k] for k in ("nodes", "regions", "all_converged")}))
            return 0 if rep["all_converged"] else 1
        await loop.run_in_executor(None, self.publish_and_wait, "publish-v1", self.nodes[0], self.nodes)
        st = await loop.run_in_executor(None, self.converged_view, self.nodes[-1])
        self._say("")
        self._say(format_status(st))
        self._say("")
        self._say("The mesh keeps running. Try, in another shell (`deploy/dev.sh shell` puts meshctl on the PATH):")
        self._say(f"  meshctl status --node {self.nodes[-1].advertise} --identity {self.operator}")
        self._say(f"  curl -s http://127.0.0.1:{self.nodes[0].admin_port}/metrics | grep policymesh_")
        self._say(f"  meshctl policy sign POLICY.toml --authority {self.auth.path} --key {self.policy_key} "
                  "--out p.msgpack && "
                  f"meshctl policy publish p.msgpack --node {self.nodes[1].advertise} --identity {self.operator}")
        self._say("Press Ctrl-C to stop.")
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        return 0

    def run(self) -> int:
        try:
            if self.lab is not None:
                self.lab.setup()
            self.setup()
            return asyncio.run(self._run_async())
        finally:
            for n in self.nodes:
                self.stop_node(n)
            if getattr(self, "proxy", None) is not None:
                self.proxy.close()
            if self.lab is not None:
                self.lab.teardown()
            if self.tmp and self.args.once and not self.args.dir:
                shutil.rmtree(self.tmp, ignore_errors=True)


def run_demo(args: argparse.Namespace) -> int:
    return Demo(args).run()
