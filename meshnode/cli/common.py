"""What the commands share: a parser whose errors are one line (exit 2), exit codes, output, times,
file reading and the passphrases of encrypted key files."""

from __future__ import annotations

import argparse
import getpass
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from ..authority_store import KeyFile, NewPassphrases
    from ..keyfile import Passphrase

# The errors, key files and names are imported where they are used: ``meshctl`` imports this module
# for its parser, and its start-up (``--help``, ``policy publish``) should not pay for nacl and the
# trust layer until a command needs them.

EXIT_OK = 0
EXIT_INVALID = 1
"""Verification failed (or the command could not do what it was asked)."""
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
"""An input file is missing or cannot be read."""
READ_LIMIT_BYTES = 4 << 20
MAX_PASSPHRASE_BYTES = 4096

EXIT_CODES_EPILOG = ("exit codes: 0 valid/done, 1 invalid (verification failed or the command was refused), "
                     "2 usage error, 3 unreadable input (a missing or unreadable file)")


class CliParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("epilog", EXIT_CODES_EPILOG)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class VersionAction(argparse.Action):
    """``--version``: the installed version, looked up (importlib.metadata) only when asked."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="show program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from .. import version_string

        out(version_string(parser.prog.split()[0]))
        parser.exit()


def exit_code(exc: BaseException) -> int:
    """The exit code for an error a command raised."""
    from ..authority_store import UnreadableInput, UsageError

    if isinstance(exc, UnreadableInput):
        return EXIT_UNREADABLE
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    return EXIT_INVALID


def out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def now() -> int:
    return int(time.time())


def read(path: str | Path, what: str, limit: int = READ_LIMIT_BYTES) -> bytes:
    from ..authority_store import CliError, UnreadableInput

    p = Path(path)
    try:
        if p.stat().st_size > limit:
            raise CliError(f"{p}: {what} is larger than {limit} bytes")
        return p.read_bytes()
    except OSError as exc:
        raise UnreadableInput(f"{p}: cannot read {what}: {exc.strerror or exc}") from None


def read_passphrase_file(path: str | Path) -> bytes:
    """The passphrase in ``path``: its first line, without the line ending."""
    from ..authority_store import CliError

    data = read(path, "passphrase file", MAX_PASSPHRASE_BYTES)
    phrase = data.split(b"\n", 1)[0].rstrip(b"\r")
    if not phrase:
        raise CliError(f"{path}: the passphrase file is empty")
    return phrase


def passphrase_source(passphrase_file: str | None) -> Passphrase | None:
    """How encrypted key files are opened: the --passphrase-file, else a prompt when stdin is a terminal,
    else nothing (reading an encrypted key is then a clear error)."""
    if passphrase_file:
        phrase = read_passphrase_file(passphrase_file)
        return lambda _path: phrase
    if sys.stdin.isatty():
        return lambda path: getpass.getpass(f"passphrase for {path}: ").encode()
    return None


def signing_keys(paths: list[str] | None, passphrase_file: str | None, what: str) -> list[KeyFile]:
    """The key files named with --key, opened; none named is a usage error that says how to name them."""
    from ..authority_store import UsageError, read_key

    if not paths:
        raise UsageError(f"name the {what} key(s) to sign with: --key KEYFILE (repeatable); "
                         "no key is used unless it is named")
    source = passphrase_source(passphrase_file)
    return [read_key(Path(p), source) for p in paths]


def new_key_passphrases(values: list[str] | None) -> NewPassphrases:
    """``[HOLDER=]FILE`` values: the passphrase for HOLDER's new keys, or (no HOLDER) for every new key."""
    from protocol.trust.names import is_name

    from ..authority_store import UsageError

    phrases: NewPassphrases = {}
    for value in values or []:
        holder, sep, file = value.partition("=")
        if not sep or not is_name(holder):
            holder, file = "", value
        key = holder or None
        if key in phrases:
            raise UsageError(f"--passphrase-file {value}: a second passphrase for {holder or 'every key'}")
        phrases[key] = read_passphrase_file(file)
    return phrases
