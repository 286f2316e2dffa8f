"""One worker of ``meterline serve --workers N``: uvicorn's supervisor imports this in each process it
starts (and restarts) and calls ``application()``.

The parent process has already migrated the database, made the signing key file and claimed the
database for shared counters (``storage/counter_claim.py``). A worker reads the settings the way the
parent did (the config file, the environment, the command's options, passed in ``WORKER_ARGS``), so
every worker serves the same deployment, and keeps its quota counters where every other worker sees
them (the database, or Redis: ``Settings.counter_store``)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
from typing import Any

WORKER_ARGS = "METERLINE_SERVE_WORKER_ARGS"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def application() -> Any:
    from meterline.api.access_log import configure_access_log
    from meterline.api.app import create_app
    from meterline.config import load_settings

    args: dict[str, Any] = json.loads(os.environ[WORKER_ARGS])
    end_with(args["supervisor"])
    settings = load_settings(
        args.get("config"),
        database_url=args.get("database_url"),
        host=args["host"],
        port=args["port"],
        workers=args["workers"],  # so that ``counter_store`` chooses what the parent chose
    )
    # Each worker writes its own access-log lines (a line is one write: appends do not interleave).
    configure_access_log(settings.access_log)
    return create_app(settings, tune_collector=True)


def end_with(supervisor: int) -> None:
    """This worker ends when ``supervisor`` (the process that started it) ends, however it ends: a
    SIGTERM, which uvicorn answers with a graceful shutdown (in-flight requests settle). The supervisor
    holds the counters' claim (``storage/counter_claim.py``): killed outright (SIGKILL, the OOM killer),
    it takes the claim with it, and workers serving on would be unclaimed, so that a process with
    in-process counters could start beside them. Linux: the kernel sends the signal (``prctl``) when
    the thread that started this process ends, which is the supervisor's main thread (uvicorn's
    ``Multiprocess`` starts and restarts workers only there); a supervisor already gone by then is
    caught by its process id. Elsewhere only that check is made."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != supervisor:
        signal.raise_signal(signal.SIGTERM)


class OwnListener(list[socket.socket]):
    """The listening sockets uvicorn's supervisor hands to every worker it starts: empty here, and in each
    worker a socket of that worker's own, bound to ``host:port`` with ``SO_REUSEPORT`` when the worker
    unpickles it (``__reduce__``).

    With one socket shared by every worker (uvicorn's way), whichever worker wakes first accepts a
    whole burst of connections: 64 keep-alive clients connecting at once often all landed on one worker
    while the other idled (docs/benchmarks.md, "One listening socket per worker"). With one socket per
    worker in a ``SO_REUSEPORT`` group, the kernel spreads new connections over the workers by a hash
    of their addresses. A worker that exits takes its socket out of the group; its replacement binds a
    new one. The parent holds no listening socket (``reuse_port_available`` checks the port first)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return _own_listener, (self.host, self.port)


def _own_listener(host: str, port: int) -> list[socket.socket]:
    """In a worker, as it starts: its socket. One that cannot bind (the port was taken since the parent
    looked) exits as uvicorn's startup failure, which stops the supervisor instead of restarting it."""
    try:
        return _listening(host, port)
    except OSError as exc:
        from uvicorn.config import STARTUP_FAILURE

        print(f"meterline: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        sys.exit(STARTUP_FAILURE)


def reuse_port_available(host: str, port: int) -> str | None:
    """None when each worker can listen on ``host:port`` with a socket of its own (Linux, a fixed port
    nobody else holds); else why not, and the workers share one socket."""
    if sys.platform != "linux" or not hasattr(socket, "SO_REUSEPORT"):
        return "SO_REUSEPORT spreads connections over sockets on Linux only"
    if port == 0:
        return "a port chosen by the system differs for each socket"
    # A plain bind: it fails where anyone listens on the port already, even in a SO_REUSEPORT group of
    # its own (which our workers' sockets would join, sharing its connections).
    with _tcp_socket(host) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return str(exc)
    return None


def _listening(host: str, port: int) -> list[socket.socket]:
    sock = _tcp_socket(host)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return [sock]


def _tcp_socket(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
