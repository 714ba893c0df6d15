"""sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET.

A no-op outside systemd (no NOTIFY_SOCKET). This module is the one place
that reads the variable, because it is systemd's protocol, not a setting.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None):
        self.address = address
        if address and address.startswith("@"):
            self.address = "\0" + address[1:]

    @classmethod
    def from_env(cls) -> "Notifier":
        return cls(os.environ.get("NOTIFY_SOCKET"))

    def notify(self, **fields: str) -> bool:
        if not self.address:
            return False
        msg = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(msg, self.address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(ready="1", status=status)

    def watchdog(self) -> bool:
        return self.notify(watchdog="1")

    def stopping(self) -> bool:
        return self.notify(stopping="1")
