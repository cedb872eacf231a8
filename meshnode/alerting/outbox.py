"""A durable, bounded outbox of alert events in a directory of the node's state.

Each event is its own file ``<seq>.json`` (16 digits, a monotonic sequence), written atomically (temp,
fsync, rename, fsync directory) by :meth:`Outbox.flush`, which the delivery worker calls as soon as it
wakes (the next loop iteration after an append) and the daemon calls at shutdown. ``cursors.json`` records, per destination, the last sequence number it
has taken (delivered, or refused for good); a file is deleted once every destination is past it. On
start the pending events are loaded in order, so what was raised while a receiver or the network was
down is delivered after it returns, also across a restart (at least once: a crash between a delivery and
its cursor write repeats that one event).

Bounded by event count and bytes. When full, triggers are dropped oldest first, info/warning before
error/critical (a new info/warning event is dropped rather than an older error/critical one), and only
events no destination has taken or is sending. Resolves are never dropped, except together with the
trigger that opened their episode when neither was sent (the receivers then never hear of it at all); a
resolve is accepted over the bound rather than lost (the alert book bounds how many can exist). Corrupt
files are moved to ``corrupt/``, counted and skipped.
"""

from __future__ import annotations

import bisect
import os
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from ..fsutil import atomic_write, remove_stale_temps
from .model import SEVERITY_RANK, AlertEvent

DEFAULT_MAX_EVENTS = 1000
DEFAULT_MAX_BYTES = 4 << 20
MAX_EVENT_FILE_BYTES = 64 * 1024  # an event is at most ~10 KiB (summary 1 KiB, details 8 KiB)
CURSORS_FILE = "cursors.json"
CORRUPT_DIR = "corrupt"
_EVENT_RE = re.compile(r"\A(?P<seq>[0-9]{16})\.json\Z")
_NEW = -1  # a victim marker: the event being appended


class _Cursors(msgspec.Struct, forbid_unknown_fields=True):
    delivered: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event: AlertEvent
    size: int


class Outbox:
    """Pending alert events for a fixed set of destinations (ids such as ``pagerduty``)."""

    def __init__(self, directory: Path, destinations: Sequence[str], *, log: Any,
                 max_events: int = DEFAULT_MAX_EVENTS, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_events < 1 or max_bytes < MAX_EVENT_FILE_BYTES:
            raise ValueError(f"an outbox holds at least 1 event and {MAX_EVENT_FILE_BYTES} bytes")
        self.directory = Path(directory)
        self.destinations = tuple(dict.fromkeys(destinations))
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.log = log
        self.dropped = 0  # events dropped to stay within the bounds
        self.corrupt = 0  # files found damaged at load (moved to corrupt/)
        self.write_failures = 0  # events or cursors that could not be made durable (kept in memory)
        self._entries: dict[int, StoredEvent] = {}
        self._seqs: list[int] = []
        self._by_key: dict[str, list[int]] = {}
        self._opens: set[int] = set()
        self._droppable: tuple[deque[int], deque[int]] = (deque(), deque())  # info/warning, error/critical
        self._bytes = 0
        self._unwritten: dict[int, bytes] = {}  # appended, not yet on disk (see flush)
        self._cursor: dict[str, int] = {}
        self._claimed: dict[str, int] = {}
        self._load()

    # -- reading -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def events(self) -> list[StoredEvent]:
        return [self._entries[s] for s in self._seqs]

    def pending(self, destination: str) -> int:
        """How many events ``destination`` has still to take."""
        return len(self._seqs) - bisect.bisect_right(self._seqs, self._cursor[destination])

    def next_event(self, destination: str) -> StoredEvent | None:
        """The oldest event ``destination`` has not taken; from now on it is being sent (never dropped)."""
        i = bisect.bisect_right(self._seqs, self._cursor[destination])
        if i == len(self._seqs):
            return None
        seq = self._seqs[i]
        self._claimed[destination] = seq
        return self._entries[seq]

    # -- writing -----------------------------------------------------------------------------------------
    def append(self, event: AlertEvent) -> int | None:
        """Queue ``event`` for every destination (in memory: :meth:`flush` makes it durable); its sequence
        number, or None when it was dropped (bounds) or there is no destination to deliver it to."""
        if not self.destinations:
            return None
        data = msgspec.json.encode(event)
        while len(self._entries) + 1 > self.max_events or self._bytes + len(data) > self.max_bytes:
            victim = self._victim(event)
            if victim is None:
                break  # only resolves and events being sent left: a resolve goes over the bound
            if victim == _NEW:
                self._count_drop(event)
                return None
            self._drop(victim)
        seq = self._next_seq
        self._next_seq += 1
        self._insert(StoredEvent(seq, event, len(data)))
        self._unwritten[seq] = data
        return seq

    def flush(self) -> int:
        """Write every queued event to its own file, oldest first; returns how many were written. A storm
        appended within one loop iteration costs one write per event that survived the bounds, not one per
        event raised. A write that fails is logged and counted; the event stays queued in memory."""
        written = 0
        for seq, data in list(self._unwritten.items()):
            try:
                atomic_write(self._path(seq), data, 0o600)
            except OSError as exc:
                self.write_failures += 1
                self.log.error("alert.outbox_write_failed", seq=seq,
                               error=f"{type(exc).__name__}: {exc.strerror or exc}",
                               note="kept in memory: delivered unless the process stops first")
                break
            del self._unwritten[seq]
            written += 1
        return written

    @property
    def unwritten(self) -> int:
        return len(self._unwritten)

    def ack(self, destination: str, seq: int) -> None:
        """``destination`` has taken every event up to ``seq`` (delivered it, or refused it for good)."""
        if seq <= self._cursor[destination]:
            return
        self._cursor[destination] = seq
        self._write_cursors()
        floor = min(self._cursor[d] for d in self.destinations)
        while self._seqs and self._seqs[0] <= floor:
            self._remove(self._seqs[0])

    # -- bounds ------------------------------------------------------------------------------------------
    def _victim(self, new: AlertEvent) -> int | None:
        new_class = _class_of(new) if new.action == "trigger" else None
        for cls, queue in enumerate(self._droppable):
            while queue and (queue[0] not in self._entries or self._taken(queue[0])):
                queue.popleft()  # gone already, or a destination has it: never droppable again
            if queue:
                return queue[0]
            if new_class == cls:
                return _NEW
        return None

    def _drop(self, seq: int) -> None:
        stored = self._entries[seq]
        opened = seq in self._opens
        self._remove(seq)
        self._count_drop(stored.event)
        if not opened:
            return
        later = [s for s in self._by_key.get(stored.event.dedup_key, ()) if s > seq]
        if later:
            nxt = self._entries[later[0]]
            if nxt.event.action == "resolve" and not self._taken(nxt.seq):
                self._remove(nxt.seq)  # the receivers never heard of this episode: its resolve goes too
                self._count_drop(nxt.event)
            elif nxt.event.action == "trigger":
                self._opens.add(nxt.seq)  # the escalation now opens the episode for the receivers

    def _count_drop(self, event: AlertEvent) -> None:
        self.dropped += 1
        self.log.warning("alert.outbox_dropped", dedup_key=event.dedup_key, action=event.action,
                         severity=event.severity, dropped_total=self.dropped)

    def _taken(self, seq: int) -> bool:
        return any(seq <= max(self._cursor[d], self._claimed.get(d, 0)) for d in self.destinations)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _insert(self, stored: StoredEvent) -> None:
        seq, event = stored.seq, stored.event
        self._entries[seq] = stored
        self._seqs.append(seq)
        self._by_key.setdefault(event.dedup_key, []).append(seq)
        self._bytes += stored.size
        if event.action == "trigger":
            self._droppable[_class_of(event)].append(seq)
            if event.opens_episode:
                self._opens.add(seq)

    def _remove(self, seq: int) -> None:
        stored = self._entries.pop(seq)
        self._seqs.remove(seq)
        seqs = self._by_key[stored.event.dedup_key]
        seqs.remove(seq)
        if not seqs:
            del self._by_key[stored.event.dedup_key]
        self._opens.discard(seq)
        self._bytes -= stored.size
        if self._unwritten.pop(seq, None) is not None:
            return  # never reached the disk
        try:
            self._path(seq).unlink(missing_ok=True)
        except OSError as exc:
            self.log.warning("alert.outbox_unlink_failed", seq=seq, error=exc.strerror or str(exc))

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:016d}.json"

    def _write_cursors(self) -> None:
        try:
            atomic_write(self.directory / CURSORS_FILE, msgspec.json.encode(_Cursors(dict(self._cursor))), 0o600)
        except OSError as exc:
            self.write_failures += 1
            self.log.error("alert.outbox_write_failed", file=CURSORS_FILE, error=exc.strerror or str(exc),
                           note="a restart would deliver the last events again")

    def _load(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temps(self.directory, lambda name: name == CURSORS_FILE or bool(_EVENT_RE.match(name)))
        cursors = self._load_cursors()
        self._cursor = {d: cursors.get(d, 0) for d in self.destinations}
        found: list[tuple[int, str]] = []
        with os.scandir(self.directory) as it:
            for entry in it:
                m = _EVENT_RE.match(entry.name)
                if m is not None and entry.is_file(follow_symlinks=False):
                    found.append((int(m.group("seq")), entry.name))
        found.sort()
        for seq, name in found:
            try:
                with open(self.directory / name, "rb") as f:
                    data = f.read(MAX_EVENT_FILE_BYTES + 1)
                if len(data) > MAX_EVENT_FILE_BYTES:
                    raise ValueError(f"larger than {MAX_EVENT_FILE_BYTES} bytes")
                event = msgspec.json.decode(data, type=AlertEvent)
            except (OSError, ValueError, msgspec.DecodeError) as exc:
                self._set_aside(name, str(exc))
                continue
            self._insert(StoredEvent(seq, event, len(data)))
        self._next_seq = max([0, *cursors.values(), *(s for s, _ in found)]) + 1
        if self.destinations:
            floor = min(self._cursor.values())
            while self._seqs and self._seqs[0] <= floor:
                self._remove(self._seqs[0])  # already taken by every destination (e.g. one was removed)
        if self._entries:
            self.log.info("alert.outbox_loaded", events=len(self._entries), bytes=self._bytes,
                          corrupt=self.corrupt, next_seq=self._next_seq)

    def _load_cursors(self) -> dict[str, int]:
        path = self.directory / CURSORS_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self.log.error("alert.outbox_cursor_unreadable", error=exc.strerror or str(exc))
            return {}
        try:
            cursors = msgspec.json.decode(data, type=_Cursors).delivered
        except (msgspec.DecodeError, ValueError) as exc:
            self._set_aside(CURSORS_FILE, str(exc))  # every pending event is then delivered again: none lost
            return {}
        return {d: s for d, s in cursors.items() if s >= 0}

    def _set_aside(self, name: str, reason: str) -> None:
        self.corrupt += 1
        aside = self.directory / CORRUPT_DIR
        try:
            aside.mkdir(exist_ok=True, mode=0o700)
            os.replace(self.directory / name, aside / name)
        except OSError as exc:
            reason += f"; could not move it aside ({exc.strerror or exc}), left in place and skipped"
        self.log.warning("alert.outbox_corrupt", file=name, reason=reason[:300], corrupt_total=self.corrupt)


def _class_of(event: AlertEvent) -> int:
    """0: info/warning (dropped first), 1: error/critical."""
    return 0 if SEVERITY_RANK[event.severity] <= SEVERITY_RANK["warning"] else 1
