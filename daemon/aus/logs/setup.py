"""The one logging setup of ausd and aus-server.

Under systemd, stderr is a stream to the journal and systemd says so in
``JOURNAL_STREAM`` (``device:inode`` of that stream). Then each record goes
to the journal's native socket as one entry with fields:

    MESSAGE            the message (and traceback)
    PRIORITY           syslog level: debug 7, info 6, warning 4, error 3,
                       critical 2 (``journalctl -p warning`` filters on it)
    SYSLOG_IDENTIFIER  ausd or aus-server
    CODE_FILE, CODE_LINE, CODE_FUNC, LOGGER, TID
    AUS_*              what the call passes with ``extra=fields(...)``,
                       e.g. AUS_LOGIN_UID, AUS_USER

An entry the socket does not take (no journald there, its queue full, an
entry too large) is written to stderr instead, each line prefixed with
``<N>``, the priority journald reads from a stream (SyslogLevelPrefix=, on
by default): the priority is never lost, only the extra fields. The socket
is non-blocking, so a stalled journald never holds a log call.

When stderr is not the journal's stream (a terminal, a file, a pipe, or
stderr redirected under systemd): plain ``LEVEL name: message`` lines.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from ..core import journal

PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6))
DEBUG_PRIORITY = 7
PLAIN_FORMAT = "%(levelname)s %(name)s: %(message)s"
TIMED_FORMAT = "%(asctime)s " + PLAIN_FORMAT     # aus-server's: no journal adds the time
_FIELDS = "aus_fields"


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, pri in PRIORITIES:
        if levelno >= level:
            return pri
    return DEBUG_PRIORITY


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """``extra=`` for a log call: journal fields AUS_<NAME>; None values
    are left out. Plain stderr output ignores them."""
    return {_FIELDS: {f"AUS_{k.upper()}": v for k, v in values.items() if v is not None}}


def stderr_is_journal(env: dict[str, str] | None = None) -> bool:
    """Whether stderr is the stream systemd connected to the journal: set
    ``JOURNAL_STREAM`` alone is not enough (a child whose stderr was
    redirected inherits it)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalHandler(logging.Handler):
    """Native journal entries, with ``<N>``-prefixed stderr lines when the
    socket refuses one."""

    def __init__(self, identifier: str, path: Path = journal.SOCKET, stream=None):
        super().__init__()
        self.identifier = identifier
        self.path = str(path)
        self.stream = stream
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            pri = priority(record.levelno)
            entry = [("MESSAGE", message), ("PRIORITY", pri),
                     ("SYSLOG_IDENTIFIER", self.identifier),
                     ("CODE_FILE", record.pathname), ("CODE_LINE", record.lineno),
                     ("CODE_FUNC", record.funcName), ("LOGGER", record.name),
                     ("TID", threading.get_native_id())]
            entry += list(getattr(record, _FIELDS, {}).items())
            try:
                self.sock.sendto(journal.entry(entry), self.path)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN,
                                     errno.ENOBUFS, errno.EMSGSIZE, errno.EACCES,
                                     errno.EPERM, errno.ENOTSOCK):
                    raise
            stream = self.stream or sys.stderr
            stream.write("".join(f"<{pri}>{record.name}: {line}\n"
                                 for line in message.splitlines() or [""]))
            stream.flush()
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def early_error(program: str, text: str) -> None:
    """An error before the logging setup (a bad configuration, which holds
    the log level): "program: text" on stderr, each line at priority 3
    when stderr is the journal's stream, so ``journalctl -p err`` shows it."""
    prefix = f"<{priority(logging.ERROR)}>" if stderr_is_journal() else ""
    lines = f"{program}: {text}".splitlines()
    sys.stderr.write("".join(f"{prefix}{line}\n" for line in lines))
    sys.stderr.flush()


def setup(level: str | int, identifier: str, *, plain_format: str = PLAIN_FORMAT,
          journal_socket: Path = journal.SOCKET) -> logging.Handler:
    """Configure the root logger (replacing its handlers) for the journal
    when stderr is its stream, else plain stderr lines; the handler."""
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler(identifier, journal_socket)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(plain_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
