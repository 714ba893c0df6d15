"""The bundle cache: the last good bundle, with where and when it came
from, so a restart enforces it at once without waiting for the server.

Written atomically (temporary file, fsync, rename, fsync of the
directory), mode 0600: it is never seen half written, and it holds the
org's user names. A cache fetched from another URL is not used: another
org's policy must not be enforced here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.bundle import Bundle, bundle_from_data, loads_strict
from ..core.errors import PolicyError, PolicySourceError
from .privatefile import write_atomic

CACHE_FORMAT = 1


@dataclass(frozen=True)
class Cached:
    bundle: Bundle
    url: str
    etag: str | None
    fetched_at: float


def write_cache(path: Path, url: str, etag: str | None, bundle: Bundle,
                fetched_at: float | None = None) -> None:
    """Write the cache atomically (a temporary file, fsync, rename, fsync
    of the directory), mode 0600: it must never be seen half written, and
    it holds the org's user names. Raises PolicySourceError."""
    doc = {"cache_format": CACHE_FORMAT, "url": url, "etag": etag,
           "fetched_at": time.time() if fetched_at is None else fetched_at,
           "bundle": bundle.data}
    body = json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, body, tmp)
    except OSError as exc:
        raise PolicySourceError(
            "cache", f"cannot write the bundle cache {path}: {exc.strerror or exc}") from exc


def read_cache(path: Path, url: str) -> Cached | None:
    """The cached bundle, or None when there is no cache. Raises
    PolicyError when the file is unreadable, invalid, or was fetched from
    another URL (another org's policy must not be enforced here)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PolicyError(source, [f"cannot read the cache: {exc.strerror or exc}"]) from exc
    try:
        doc = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PolicyError(source, [f"not a bundle cache: {exc}"]) from exc
    if not isinstance(doc, dict) or doc.get("cache_format") != CACHE_FORMAT:
        raise PolicyError(source, [f"not a bundle cache of format {CACHE_FORMAT}"])
    if doc.get("url") != url:
        raise PolicyError(source, [
            f"the cached bundle came from {doc.get('url')!r}, not from the configured "
            f"{url!r}; it is not used"])
    etag = doc.get("etag")
    fetched_at = doc.get("fetched_at")
    bundle = bundle_from_data(doc.get("bundle"), source)
    return Cached(bundle, url, etag if isinstance(etag, str) else None,
                  float(fetched_at) if isinstance(fetched_at, (int, float)) else 0.0)
