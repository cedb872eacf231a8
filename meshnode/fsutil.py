"""Durable file writes: temp file, fsync, rename, fsync directory.

A write goes through ``.<name>.tmp.<pid>`` next to its target.  A process killed mid-write leaves that
temp file behind; :func:`remove_stale_temps` removes such leftovers at start (store open, backend setup).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

# `.<name>.tmp.<pid>`: exactly what atomic_write creates, nothing else (a user's `.x.tmp` is left alone).
_TEMP_RE = re.compile(r"\A\.(?P<name>[^/\x00-\x1f]+)\.tmp\.(?P<pid>[1-9][0-9]{0,9})\Z")
# A temp file this old is abandoned whatever its pid says (after a reboot the pid may belong to another
# process); a write, even of a 200 MB directory, takes seconds.
STALE_TEMP_AGE_S = 3600
BACKUP_SUFFIX = ".bak"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def backup_path(path: Path) -> Path:
    """Where ``atomic_write(..., keep_previous=True)`` keeps the content it replaced."""
    return path.with_name(path.name + BACKUP_SUFFIX)


def atomic_write(path: Path, data: bytes, mode: int = 0o644, *, keep_previous: bool = False) -> None:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves the old or the new content.

    ``keep_previous`` first hard-links the current content to ``<path>.bak`` (atomically too), so a
    reader that finds ``path`` damaged can fall back to the previous good copy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        if keep_previous:
            _keep_previous(path, mode)
        os.replace(tmp, path)
    except BaseException:
        # A failed write in a live process cleans up after itself; only a killed process leaves a temp.
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def _keep_previous(path: Path, mode: int) -> None:
    bak = backup_path(path)
    btmp = temp_path(bak)
    btmp.unlink(missing_ok=True)
    try:
        os.link(path, btmp)
    except FileNotFoundError:
        return  # nothing to keep yet
    except OSError:
        # A filesystem without hard links: copy instead.
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        atomic_write(bak, data, mode)
        return
    os.replace(btmp, bak)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # callers run this before their own first write: a temp with our pid is a past life's
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temps(directory: Path, owns: Callable[[str], bool] = lambda name: True) -> list[Path]:
    """Delete the temp files that interrupted :func:`atomic_write` calls left in ``directory``.

    Only names of our own pattern (``.<name>.tmp.<pid>``) whose ``<name>`` the caller ``owns`` are
    touched, and only when the writing process is gone (or the file is older than STALE_TEMP_AGE_S):
    a live daemon's write in progress is never pulled from under it.  Call it before the caller's first
    write.  Returns what was removed."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or not owns(m.group("name")):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        if _pid_alive(int(m.group("pid"))) and now - st.st_mtime < STALE_TEMP_AGE_S:
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        removed.append(Path(entry.path))
    return removed


def write_secret(path: Path, data: bytes) -> None:
    """Create a private file (mode 0600) atomically; refuses to overwrite an existing secret."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite a secret")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, mode=0o600)
