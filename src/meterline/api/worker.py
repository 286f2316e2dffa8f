"""One worker of ``meterline serve --workers N``: uvicorn's supervisor imports this in each process it
starts (and restarts) and calls ``application()``.

The parent process has already migrated the database, made the signing key file and claimed the
database for shared counters (``storage/counter_claim.py``). A worker reads the settings the way the
parent did (the config file, the environment, the command's options, passed in ``WORKER_ARGS``), so
every worker serves the same deployment, and keeps its quota counters where every other worker sees
them (the database, or Redis: ``Settings.counter_store``)."""

from __future__ import annotations

import json
import os
from typing import Any

WORKER_ARGS = "METERLINE_SERVE_WORKER_ARGS"


def application() -> Any:
    from meterline.api.access_log import configure_access_log
    from meterline.api.app import create_app
    from meterline.config import load_settings

    args: dict[str, Any] = json.loads(os.environ[WORKER_ARGS])
    settings = load_settings(
        args.get("config"),
        database_url=args.get("database_url"),
        host=args["host"],
        port=args["port"],
        workers=args["workers"],  # so that ``counter_store`` chooses what the parent chose
    )
    # Each worker writes its own access-log lines (a line is one write: appends do not interleave).
    configure_access_log(settings.access_log)
    return create_app(settings)
