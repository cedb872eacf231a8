"""Handshake abuse: sources that fail or are refused handshakes on the mesh port, one alert per episode,
and the optional temporary block of such a source in the nftables timeout sets.

    detector = AbuseDetector(threshold=20, window_s=60)
    detector.record("203.0.113.9", "rate_limited", now)      # from the mesh listener, per refusal
    findings = detector.findings(now)                          # {"203.0.113.9": Finding(...)}; the caller diffs
    guard = BlockGuard.from_ruleset(ruleset)                   # members, break-glass, loopback: never blocked
    if guard.may_block(addr): run(block_argv(table, addr, seconds))

An **episode** opens when a source reaches ``threshold`` bad handshakes within ``window_s`` seconds and
stays open while it keeps failing; it closes after ``quiet_s`` (default: one window) without any. Between
the two the source is one finding (check ``handshake_abuse``, subject the source address), however many
attempts it makes. Time is an argument: one clock throughout (the daemon uses ``time.monotonic()``, the
clock of its scheduler, so :meth:`AbuseDetector.next_deadline` can be a scheduler deadline).

Memory is bounded by ``max_sources``: when full, the least recently seen source is forgotten (an open
episode forgotten that way closes early; a flood of that many distinct sources is itself visible in the
handshake metrics).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..enforce.model import Ruleset
from ..enforce.render import ABUSERS, FAMILY_SUFFIX
from .findings import Finding

CHECK = "handshake_abuse"
MAX_SOURCES = 4096


@dataclass(slots=True)
class _Source:
    recent: deque[float] = field(default_factory=deque)  # times of the last bad handshakes, within the window
    last_s: float = 0.0
    in_episode: bool = False
    episode_count: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class AbuseDetector:
    """Per-source count of bad handshakes over a sliding window; an episode per source over threshold."""

    def __init__(self, threshold: int, window_s: float, *, quiet_s: float | None = None,
                 max_sources: int = MAX_SOURCES) -> None:
        if threshold < 1 or window_s <= 0 or max_sources < 1:
            raise ValueError("threshold, window_s and max_sources must be positive")
        self.threshold = threshold
        self.window_s = window_s
        self.quiet_s = window_s if quiet_s is None else quiet_s
        self._max_sources = max_sources
        self._sources: OrderedDict[str, _Source] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources)

    def record(self, source: str, reason: str, now: float) -> bool:
        """One failed or refused handshake from ``source``. True when this attempt opened an episode
        (the moment to block the source, if blocking is on)."""
        entry = self._sources.get(source)
        if entry is None:
            if len(self._sources) >= self._max_sources:
                self._sources.popitem(last=False)
            entry = self._sources[source] = _Source()
        self._sources.move_to_end(source)
        self._close_if_quiet(entry, now)
        entry.last_s = now
        entry.recent.append(now)
        while entry.recent and entry.recent[0] <= now - self.window_s:
            entry.recent.popleft()
        if len(entry.recent) > self.threshold:  # only whether the threshold is reached matters
            entry.recent.popleft()
        if entry.in_episode:
            entry.episode_count += 1
            entry.reasons[reason] = entry.reasons.get(reason, 0) + 1
            return False
        if len(entry.recent) < self.threshold:
            return False
        entry.in_episode = True
        entry.episode_count = len(entry.recent)
        entry.reasons = {reason: 1}
        return True

    def _close_if_quiet(self, entry: _Source, now: float) -> None:
        if entry.in_episode and now - entry.last_s >= self.quiet_s:
            entry.in_episode = False
            entry.recent.clear()

    def findings(self, now: float) -> dict[str, Finding]:
        """The open episodes, by source; closes those quiet for ``quiet_s`` and forgets idle sources."""
        out: dict[str, Finding] = {}
        for source in list(self._sources):
            entry = self._sources[source]
            self._close_if_quiet(entry, now)
            if not entry.in_episode:
                if now - entry.last_s >= self.window_s:
                    del self._sources[source]
                continue
            out[source] = Finding(
                CHECK, source, "handshake_abuse", "warning",
                f"{source}: {entry.episode_count} failed or refused handshakes"
                f" (at least {self.threshold} within {self.window_s:g} s)",
                {"source": source, "attempts": entry.episode_count,
                 "reasons": dict(sorted(entry.reasons.items())), "threshold": self.threshold,
                 "window_s": self.window_s},
            )
        return out

    def next_deadline(self) -> float | None:
        """When the earliest open episode closes if its source stays quiet (for a timer), or None."""
        due = [e.last_s + self.quiet_s for e in self._sources.values() if e.in_episode]
        return min(due) if due else None


@dataclass(frozen=True, slots=True)
class BlockGuard:
    """Who may never be put in the block sets: the members (their certificates' addresses), the
    break-glass CIDRs, and loopback (the operator's publish path)."""

    members: frozenset[str]
    protected_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def from_ruleset(cls, ruleset: Ruleset, extra_cidrs: Iterable[str] = ()) -> BlockGuard:
        """Members from the ruleset's ``members_*`` sets, protected networks from its ``breakglass_*``
        sets plus ``extra_cidrs``."""
        members: set[str] = set()
        nets = [ipaddress.ip_network(c, strict=False) for c in extra_cidrs]
        for s in ruleset.sets:
            if s.name.startswith("members_"):
                members.update(s.elements)
            elif s.name.startswith("breakglass_"):
                nets.extend(ipaddress.ip_network(e, strict=False) for e in s.elements)
        return cls(frozenset(str(ipaddress.ip_address(m)) for m in members), tuple(nets))

    def may_block(self, source: str) -> bool:
        try:
            addr = ipaddress.ip_address(source)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if addr.is_loopback or addr.is_unspecified or str(addr) in self.members:
            return False
        return not any(addr in net for net in self.protected_networks)


def block_set(source: str) -> str:
    """The block set for a source's family: ``abusers_v4`` or ``abusers_v6``."""
    addr = ipaddress.ip_address(source)
    return f"{ABUSERS}_{FAMILY_SUFFIX['ip' if addr.version == 4 else 'ip6']}"


def block_argv(table: str, source: str, seconds: int, nft: str = "nft") -> list[str]:
    """``nft add element inet <table> abusers_v4 { ADDR timeout Ns }``: drop ``source`` for ``seconds``
    (re-adding an element already there fails; the caller may ignore that, the block holds)."""
    addr = ipaddress.ip_address(source)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if seconds < 1:
        raise ValueError("a block lasts at least a second")
    return [nft, "add", "element", "inet", table, block_set(str(addr)), f"{{ {addr} timeout {int(seconds)}s }}"]
