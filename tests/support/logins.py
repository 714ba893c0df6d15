"""A login as the PAM hook makes it: a new process carrying the user's
login UID asks ausd for its session (`session open`). Shared by the kernel
tests and the benchmarks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from aus.agent import control


def session_open(sock: Path, loginuid: int, timeout: float = 30) -> tuple[dict, float]:
    """`session open` from a forked process whose login UID is
    ``loginuid``; ausd's reply and the request's round trip in seconds,
    timed inside that process once connected. Raises RuntimeError with
    what went wrong there."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            with open("/proc/self/loginuid", "w") as f:
                f.write(str(loginuid))
            with control.Client(sock, timeout=timeout) as c:
                t0 = time.perf_counter()
                reply = c.request("session_open")
                took = time.perf_counter() - t0
            os.write(w, json.dumps({"reply": reply, "s": took}).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    res = json.loads(data)
    if "error" in res:
        raise RuntimeError(f"session open for login UID {loginuid}: {res['error']}")
    return res["reply"], res["s"]
