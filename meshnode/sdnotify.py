"""systemd's notify protocol (sd_notify(3)), without libsystemd: one datagram per state change to the
socket named by ``$NOTIFY_SOCKET``.

``READY=1`` once the stored policy is enforced (or the node has decided it has none) and the listeners
are up; ``WATCHDOG=1`` from the event loop itself, so a stalled loop stops the pings and systemd restarts
the unit after ``WatchdogSec=``; ``STATUS=`` lines for ``systemctl status``; ``STOPPING=1`` on shutdown.
Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        # "@name" is an abstract socket; anything else must be a path.
        self._address = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isascii() and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # systemd's advice: ping at half the interval.
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if wanted else None
        self._sock: socket.socket | None = None
        self.failures = 0

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (e.g. ``"READY=1"``, ``"STATUS=..."``) as one message; False if it failed
        (systemd gone, socket full): never raises, the daemon's work does not depend on it."""
        if not self._address:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self._address)
        except OSError:
            self.failures += 1
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
