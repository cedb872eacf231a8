"""What the commands share: a parser whose errors are one line (exit 2), output, times, file reading."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from ..authority_store import CliError

EXIT_INVALID = 1
EXIT_USAGE = 2
READ_LIMIT_BYTES = 4 << 20


class CliParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def now() -> int:
    return int(time.time())


def read(path: str | Path, what: str, limit: int = READ_LIMIT_BYTES) -> bytes:
    p = Path(path)
    try:
        if p.stat().st_size > limit:
            raise CliError(f"{p}: {what} is larger than {limit} bytes")
        return p.read_bytes()
    except OSError as exc:
        raise CliError(f"{p}: cannot read {what}: {exc.strerror or exc}") from None
