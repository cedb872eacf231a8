"""Injected randomness for the sans-IO core.

The node never imports ``random`` or reads ``os.urandom`` itself.  It is given either a callable
``n -> n bytes`` (the daemon passes ``os.urandom``) or a seeded generator object with ``randrange``
and ``random`` methods (the simulator passes ``random.Random(seed)``), and wraps it here.
"""

from __future__ import annotations

from collections.abc import Callable, MutableSequence, Sequence
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class _Generator(Protocol):
    def randrange(self, stop: int) -> int: ...

    def random(self) -> float: ...


class Entropy:
    __slots__ = ("_gen", "_bytes", "_bits")

    def __init__(self, source: Callable[[int], bytes] | _Generator | Any) -> None:
        self._gen: _Generator | None = None
        self._bytes: Callable[[int], bytes] | None = None
        # A plain ``random.Random``: ``randrange(n)`` is ``getrandbits(n.bit_length())`` drawn until
        # below n (CPython's ``_randbelow_with_getrandbits``); done here, the same numbers come out
        # without three Python-level calls per draw (the simulator draws millions).
        self._bits: Callable[[int], int] | None = None
        if hasattr(source, "randrange") and hasattr(source, "random"):
            self._gen = source
            cls = type(source)
            if cls.__module__ == "random" and cls.__name__ == "Random":
                self._bits = getattr(source, "getrandbits")  # noqa: B009 (not on the _Generator protocol)
        elif callable(source):
            self._bytes = source
        else:
            raise TypeError("entropy must be a callable n -> bytes or an object with randrange()/random()")

    def below(self, n: int) -> int:
        """Uniform integer in [0, n)."""
        if n <= 1:
            return 0
        bits = self._bits
        if bits is not None and type(n) is int:
            k = n.bit_length()
            r = bits(k)
            while r >= n:
                r = bits(k)
            return r
        if self._gen is not None:
            return self._gen.randrange(n)
        assert self._bytes is not None
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            v = int.from_bytes(self._bytes(8), "big")
            if v < limit:
                return v % n

    def jitter(self, value_ms: int, fraction: float = 0.1) -> int:
        """``value_ms`` spread uniformly by +-fraction (desynchronises periodic timers)."""
        span = int(value_ms * fraction)
        if span <= 0:
            return value_ms
        return value_ms - span + self.below(2 * span + 1)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.below(len(seq))]

    def shuffle(self, seq: MutableSequence[T]) -> None:
        for i in range(len(seq) - 1, 0, -1):
            j = self.below(i + 1)
            seq[i], seq[j] = seq[j], seq[i]

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        n = len(seq)
        if k >= n:
            out = list(seq)
            self.shuffle(out)
            return out
        picked: dict[int, None] = {}
        while len(picked) < k:
            picked[self.below(n)] = None
        return [seq[i] for i in picked]

    def token(self, nbytes: int = 8) -> int:
        if self._bytes is not None:
            return int.from_bytes(self._bytes(nbytes), "big")
        assert self._gen is not None
        return self._gen.randrange(1 << (8 * nbytes))
