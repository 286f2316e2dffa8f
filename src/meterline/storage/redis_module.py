"""Meterline's Redis module: the counter store's script (``redis_counters.lua``) in C
(``redis_counters.c``), built here from the source shipped with Meterline.

A Redis that loads it (``loadmodule``) answers the store's calls with the module's command instead of the
script, for a fraction of the Redis time per decision (docs/benchmarks.md). Nothing else changes: the same
request, keys, answer and stored fields, so processes with and without it can share one Redis, and a
Redis without it (every managed Redis service) runs the script. The module is built for the script of
this Meterline version (its SHA-1) and refuses calls made for another, which then run the script: build
it again after an upgrade.

Built with the machine's C compiler (``$CC``, else ``cc``), for the machine it is built on: build it
where Redis runs (or for the same architecture and C library)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from importlib.resources import as_file, files
from pathlib import Path

from meterline.storage.redis_counters import SCRIPT_SHA

_SOURCE = files("meterline.storage") / "redis_counters.c"
# -fwrapv: arithmetic on numbers a malformed call carries wraps rather than being undefined
_FLAGS = ("-O2", "-std=gnu11", "-fwrapv", "-fPIC", "-shared", "-Wall")


class ModuleBuildError(Exception):
    """The module could not be built (no compiler, or the compiler failed): the message says why."""


def build(output: Path, *, compiler: str | None = None) -> Path:
    """Compiles the module into ``output`` (replaced whole: a Redis loading it never reads half a file).
    Returns the absolute path."""
    cc = compiler or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise ModuleBuildError(
            f"no C compiler {cc!r} on PATH: install one (Debian: apt-get install gcc) or name it with $CC"
        )
    output = output.expanduser().resolve()
    if output.is_dir():
        output = output / "meterline_counters.so"
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".meterline_counters.", suffix=".so", dir=output.parent)
    os.close(fd)
    try:
        with as_file(_SOURCE) as source:
            done = subprocess.run(  # noqa: S603 - the operator's compiler ($CC) on our own source
                [cc, *_FLAGS, f'-DMETERLINE_SCRIPT_SHA="{SCRIPT_SHA}"', "-o", partial, str(source)],
                capture_output=True,
                text=True,
                check=False,
            )
        if done.returncode != 0:
            raise ModuleBuildError(f"{cc} failed (exit {done.returncode}):\n{done.stderr.strip()}")
        os.chmod(partial, 0o755)  # noqa: S103 - Redis, often another user, must read and map it
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return output
