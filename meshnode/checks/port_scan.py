"""Port scans: sources whose packets the chain's default dropped on many distinct ports, seen in the
kernel's dynamic sets ``dropped_v4`` / ``dropped_v6`` (nftables only).

    argv = list_argv("policymesh", "dropped_v4")                # nft -j list set inet policymesh dropped_v4
    ports, bad = parse_listing(json.loads(stdout))             # {"203.0.113.9": {22, 23, 80, ...}}, 0
    detector = PortScanDetector(threshold=20, window_s=60)
    opened = detector.observe(ports, now)                      # sources whose episode opened this round
    findings = detector.findings()                             # {"203.0.113.9": Finding(...)}; the caller diffs

The renderer puts a ``record`` rule just before the default drop (or reject): every TCP/UDP packet that
reaches it adds ``saddr . dport`` to the set, where it expires ``window_s`` after it was first added
(``add`` does not refresh it). So the set holds, per source, the distinct destination ports dropped within
the last window; the kernel does the counting and the daemon only lists the set every few seconds.

An **episode** opens when a source has at least ``threshold`` distinct ports in one listing and stays open
while the source has any dropped attempt in the sets; it closes when the listings have not held the source
for another ``window_s`` (so a table replaced as a whole, which empties the sets, does not end an episode
that goes on; an episode thus resolves between one and two windows after the last attempt). Between the
two it is one finding (check ``port_scan``, subject the source address). Time is an argument (the daemon's
monotonic clock). Memory is bounded by the kernel set's size (65535 elements per family).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..enforce.model import Ruleset
from .findings import Finding

CHECK = "port_scan"
SAMPLE_PORTS = 20  # ports named in an alert's details, at most
PROBE_JITTER = 0.25  # the external probes' interval jitter (meshnode/daemon/peer_checks.py)


def probe_allowance(window_s: float, probe_interval_s: float, refused_per_round: int) -> int:
    """The most refused ports one member's external probes may try on this node within ``window_s``:
    rounds at the shortest jittered interval, each with ``refused_per_round`` ports plus the port of an
    open finding (assumes the members share this node's ``[validate]`` settings)."""
    rounds = math.ceil(window_s / (probe_interval_s * (1 - PROBE_JITTER)))
    return rounds * (refused_per_round + 1)


def list_argv(table: str, set_name: str, nft: str = "nft") -> list[str]:
    return [nft, "-j", "list", "set", "inet", table, set_name]


def record_sets(ruleset: Ruleset | None) -> list[str]:
    """The names of the (address . port) sets a ruleset records dropped attempts in (none: check off)."""
    return [s.name for s in ruleset.sets if s.with_port] if ruleset is not None else []


def _pair(elem: Any) -> tuple[str, int] | None:
    if isinstance(elem, dict) and "elem" in elem:  # {"elem": {"val": ..., "expires": 59}}
        elem = elem["elem"].get("val") if isinstance(elem["elem"], dict) else None
    if not isinstance(elem, dict) or not isinstance(elem.get("concat"), list) or len(elem["concat"]) != 2:
        return None
    addr, port = elem["concat"]
    if not isinstance(addr, str) or isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        return None
    try:
        parsed = ipaddress.ip_address(addr)
    except ValueError:
        return None
    return str(parsed), port


def parse_listing(doc: Any, into: dict[str, set[int]] | None = None) -> tuple[dict[str, set[int]], int]:
    """Distinct destination ports by source from ``nft -j list set`` output (merged into ``into``), and
    the number of elements that could not be read (skipped; the caller counts them)."""
    out: dict[str, set[int]] = {} if into is None else into
    bad = 0
    entries = doc.get("nftables") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return out, 1
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("set"), dict):
            continue
        elems = entry["set"].get("elem", [])
        for elem in elems if isinstance(elems, list) else [elems]:
            pair = _pair(elem)
            if pair is None:
                bad += 1
                continue
            out.setdefault(pair[0], set()).add(pair[1])
    return out, bad


@dataclass(slots=True)
class _Episode:
    last_s: float  # when a listing last held the source
    ports: set[int] = field(default_factory=set)  # every port seen dropped while the episode is open
    peak: int = 0  # most distinct ports within one window


class PortScanDetector:
    """One episode per source with at least ``threshold`` distinct dropped ports within ``window_s``."""

    def __init__(self, threshold: int, window_s: float) -> None:
        if threshold < 1 or window_s <= 0:
            raise ValueError("threshold and window_s must be positive")
        self.threshold = threshold
        self.window_s = window_s
        self._open: dict[str, _Episode] = {}

    def __len__(self) -> int:
        return len(self._open)

    def observe(self, ports: Mapping[str, Collection[int]], now: float, members: Collection[str] = (),
                member_allowance: int = 0) -> list[str]:
        """One listing of the sets: dropped ports by source. Returns the sources whose episode opened
        (sorted); closes the episodes of sources the listings have not held for ``window_s``. A source in ``members`` needs
        ``member_allowance`` more ports (the refused ports the members' external probes try on purpose)."""
        for source in [s for s, ep in self._open.items() if not ports.get(s) and now - ep.last_s >= self.window_s]:
            del self._open[source]
        opened = []
        for source, seen in ports.items():
            episode = self._open.get(source)
            if episode is None:
                if len(seen) < self.threshold + (member_allowance if source in members else 0):
                    continue
                episode = self._open[source] = _Episode(now)
                opened.append(source)
            if not seen:
                continue
            episode.last_s = now
            episode.ports.update(seen)
            episode.peak = max(episode.peak, len(seen))
        return sorted(opened)

    def adopt(self, sources: Iterable[str], now: float) -> None:
        """Treat ``sources`` as in an open episode (alerts restored after a restart): each stays open while
        the source is in the sets and closes when it is not."""
        for source in sources:
            self._open.setdefault(source, _Episode(now))

    def findings(self) -> dict[str, Finding]:
        out = {}
        for source, ep in sorted(self._open.items()):
            sample = sorted(ep.ports)[:SAMPLE_PORTS]
            out[source] = Finding(
                CHECK, source, "port_scan", "warning",
                f"{source}: dropped attempts on {len(ep.ports)} distinct ports"
                f" (at least {self.threshold} within {self.window_s:g} s)",
                {"source": source, "ports": len(ep.ports), "peak_ports_per_window": ep.peak,
                 "sample_ports": sample, "threshold": self.threshold, "window_s": self.window_s},
            )
        return out


def merge_listings(docs: Iterable[Any]) -> tuple[dict[str, set[int]], int]:
    """:func:`parse_listing` of several listings (the v4 and the v6 set) into one map."""
    out: dict[str, set[int]] = {}
    bad = 0
    for doc in docs:
        bad += parse_listing(doc, out)[1]
    return out, bad
