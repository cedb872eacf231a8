"""``nft`` commands run in-process through libnftables, the library the ``nft`` tool is built on.

A ruleset load through the ``nft`` tool costs a process start (~2.5 ms CPU: exec and linking its
libraries), and its exit waits on closing its netlink socket (~9 ms here); the library keeps one
context and socket for the daemon's lifetime.  Measured in a network namespace with the 12-member /
50-rule bench policy: a full load 2.9 ms wall / 2.1 ms CPU in-process, against 24 ms wall / 6.7 ms CPU
through ``nft -j -f -``; a JSON listing of the table 1.8 ms.

:class:`InProcessNft` has :class:`~meshnode.enforce.backend.CommandRunner`'s ``run`` and takes the same
``nft`` argument lists (``[-j] -f -`` with the commands on stdin, or a command in the arguments), so the
backend's logic and its error messages are the same either way.  It works in the caller's network
namespace (the daemon's); a backend aimed at another namespace runs the tool with ``ip netns exec``.
"""

from __future__ import annotations

import ctypes
import subprocess
import threading

from .model import EnforcementError

LIBRARY = "libnftables.so.1"
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON


def _bind(lib: ctypes.CDLL) -> None:
    p, s = ctypes.c_void_p, ctypes.c_char_p
    for name, restype, argtypes in (
        ("nft_ctx_new", p, [ctypes.c_uint32]),
        ("nft_ctx_free", None, [p]),
        ("nft_ctx_output_set_flags", None, [p, ctypes.c_uint]),
        ("nft_ctx_buffer_output", ctypes.c_int, [p]),
        ("nft_ctx_unbuffer_output", ctypes.c_int, [p]),
        ("nft_ctx_buffer_error", ctypes.c_int, [p]),
        ("nft_ctx_unbuffer_error", ctypes.c_int, [p]),
        ("nft_ctx_get_output_buffer", s, [p]),
        ("nft_ctx_get_error_buffer", s, [p]),
        ("nft_run_cmd_from_buffer", ctypes.c_int, [p, s]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


class InProcessNft:
    """One libnftables context; :meth:`open` returns None where the library cannot be loaded.

    Calls are serialised across every context of the process, not only per context: libnftables keeps
    state shared by all contexts (datatypes of concatenated set keys, reference-counted without
    locks), and two threads listing at once through contexts of their own (the drill's per-namespace
    samplers) crashed it (``set_dtype_json: Assertion `__out' failed``, the process aborted)."""

    _lock = threading.Lock()  # one for the process (see above)

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        with self._lock:
            self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise EnforcementError("libnftables: cannot create a context")

    @classmethod
    def open(cls) -> InProcessNft | None:
        try:
            lib = ctypes.CDLL(LIBRARY)
            _bind(lib)
        except (OSError, AttributeError, MemoryError):  # not installed, too old, or refused by a sandbox
            return None
        return cls(lib)

    def run(self, argv: list[str], stdin: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``argv`` as for the ``nft`` tool (``argv[0]`` is the tool's name): ``-j`` for JSON, ``-f -``
        for the commands in ``stdin``, otherwise the command is the remaining arguments."""
        args = argv[1:]
        as_json = "-j" in args
        args = [a for a in args if a != "-j"]
        if args[:2] == ["-f", "-"]:
            command = stdin or b""
        elif args and not args[0].startswith("-"):
            command = " ".join(args).encode()
        else:
            raise EnforcementError(f"libnftables: unsupported nft arguments {args!r}")
        if b"\0" in command:
            raise EnforcementError("libnftables: a command with a NUL byte")
        lib, ctx = self._lib, self._ctx
        with self._lock:
            # fresh buffers per command: an old command's output or message is never read as this one's
            lib.nft_ctx_unbuffer_output(ctx)
            lib.nft_ctx_unbuffer_error(ctx)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON if as_json else 0)
            rc = lib.nft_run_cmd_from_buffer(ctx, command)
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
        code = 1 if rc != 0 else 0
        if check and code:
            from .backend import first_lines

            raise EnforcementError(f"{' '.join(argv[:3])} failed (libnftables): {first_lines(err)}")
        return subprocess.CompletedProcess(argv, code, out, err)

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
