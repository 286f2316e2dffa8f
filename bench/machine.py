"""What every benchmark records about the machine it ran on (each adds what it alone depends on)."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def host() -> dict[str, Any]:
    """Cores, CPU model, Python, SQLite and platform."""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }
