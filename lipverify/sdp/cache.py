"""On-disk cache of LipSDP bounds: one JSON file per network fingerprint and configuration.

LipSDP bounds are input-independent and expensive (45 SDPs for the class pairs of a 10-class
network), so they are kept across runs. The key includes everything the values depend on: the
weights' fingerprint, the form and the split. Files are written atomically (temporary file,
then rename); a file that cannot be read is ignored and rewritten, never trusted in part.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_ENV = "LIPVERIFY_CACHE_DIR"
CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """`$LIPVERIFY_CACHE_DIR`, else `~/.cache/lipverify`."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lipverify"


class BoundCache:
    """Bounds of one network configuration: named scalar entries, read and written as JSON."""

    def __init__(self, directory: Path | str | None, key: str) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.key = key
        self.path = self.directory / f"lipsdp-{key}.json"
        self._entries: dict[str, float] = {}
        self._meta: dict[str, Any] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != CACHE_VERSION or data.get("key") != self.key:
                return
            entries = {str(k): float(v) for k, v in data["entries"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable LipSDP cache %s: %s", self.path, exc)
            return
        if all(math.isfinite(v) and v >= 0 for v in entries.values()):
            self._entries = entries
            self._meta = dict(data.get("meta", {}))

    def get(self, name: str) -> float | None:
        """The cached value of entry `name`, if any."""
        return self._entries.get(name)

    def put(self, name: str, value: float, meta: dict[str, Any] | None = None) -> None:
        """Record an entry and write the file (failures to write are logged, not raised)."""
        self._entries[name] = float(value)
        if meta:
            self._meta[name] = meta
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            payload = json.dumps({"version": CACHE_VERSION, "key": self.key,
                                  "entries": self._entries, "meta": self._meta}, indent=1,
                                 default=str)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".lipsdp-", suffix=".json")
            with os.fdopen(fd, "w") as handle:
                handle.write(payload)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("could not write LipSDP cache %s: %s", self.path, exc)

    def solve_seconds(self) -> float | None:
        """Mean measured seconds of the solves recorded here (None before the first)."""
        seconds = [m["seconds"] for m in self._meta.values()
                   if isinstance(m, dict) and isinstance(m.get("seconds"), (int, float))]
        return sum(seconds) / len(seconds) if seconds else None

    def __contains__(self, name: str) -> bool:
        return name in self._entries
