"""The daemon's TaskGroup as the parts see it: start a task while the daemon serves, and nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSpawner:
    """Every task the daemon starts lives in its one TaskGroup. Before the group exists (still starting)
    and once it is shutting down, nothing new starts: a coroutine offered then is closed unstarted."""

    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None

    @property
    def serving(self) -> bool:
        return self._group is not None

    def open(self, group: asyncio.TaskGroup) -> None:
        self._group = group

    def close(self) -> None:
        self._group = None

    def start(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        """Start a task that the caller holds (and may cancel); only while serving."""
        assert self._group is not None
        return self._group.create_task(coro, name=name)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start a task that ends by itself (a close, a dial, a webhook POST), if the daemon still serves."""
        if self._group is not None:
            try:
                self._group.create_task(coro)
                return
            except RuntimeError:  # the TaskGroup is shutting down: nothing new starts
                pass
        coro.close()
