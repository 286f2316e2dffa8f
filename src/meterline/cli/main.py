"""``meterline``: run the server, manage tenants and credits without it, and seed a demo.

Every management command goes through the same services as the admin API, against the database the
configuration names, so the CLI and the API can never disagree about a rule.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from meterline.cli import reports
from meterline.cli.common import (
    ConfigOption,
    DatabaseOption,
    JsonOption,
    emit,
    err,
    fail,
    out,
    services_for,
    settings_from,
    sqlite_database,
)
from meterline.cli.quarantine import quarantine_app
from meterline.errors import MeterlineError

# What only some commands need is imported by them: a command that asks a server (usage, history, top,
# export) never loads the database's stack, and starts in about half the time.
if TYPE_CHECKING:
    from meterline.config import Settings
    from meterline.services import Services
    from meterline.storage.redis_counters import RedisMark

app = typer.Typer(
    help="Meterline: usage metering, quotas and cost tracking for LLM APIs.", no_args_is_help=True
)
orgs_app = typer.Typer(help="Organizations (the billing entities).", no_args_is_help=True)
workspaces_app = typer.Typer(help="Workspaces of an organization.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys of a workspace, and the deployment's signing keys (rotate).", no_args_is_help=True
)
credits_app = typer.Typer(help="Bonus credits.", no_args_is_help=True)
app.add_typer(orgs_app, name="orgs")
app.add_typer(workspaces_app, name="workspaces")
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
app.add_typer(quarantine_app, name="quarantine")


# -- server ------------------------------------------------------------------------------------
@app.command()
def serve(
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080).")] = None,
    workers: Annotated[
        str | None,
        typer.Option(help='Processes behind the port (default 1; "auto": one per CPU). Config: workers.'),
    ] = None,
) -> None:
    """Run the HTTP server (migrates the database first)."""
    count: int | str | None = workers
    if workers is not None and workers != "auto":
        count = int(workers) if workers.isdigit() else workers
    settings = settings_from(config, database_url, host=host, port=port, workers=count)
    _run(
        settings,
        worker_args={"config": None if config is None else str(config), "database_url": database_url},
    )


def _run(
    settings: Settings, services: Services | None = None, *, worker_args: dict[str, Any] | None = None
) -> None:
    """Serve ``settings`` in this process, or in ``settings.workers`` processes behind one port: then
    this one migrates the database and reads the signing key once, holds the counters' claim, and
    uvicorn's supervisor starts (and restarts) the workers and stops them gracefully."""
    count = settings.worker_count
    if count > 1 and settings.counter_store == "memory":
        fail(
            f'counters = "memory" keeps quota counters in one process: with {count} workers each would count '
            'alone. Leave counters at "auto" (the database then holds them) or set redis_url'
        )
    if count > 1 and (services is not None or worker_args is None):
        fail("workers: this command serves one process")
    _warn_when_connections_short(settings, count)
    mark = _redis_mark(settings) if settings.counter_store == "redis" else None
    try:
        _claim_and_serve(settings, services, worker_args, mark)
    finally:
        _close(mark)  # on every way out: refused, failed, served


# Idle kept-alive connections stay open this long (uvicorn's default is 5 s): longer than a load balancer
# keeps its own to a backend (AWS ALB 60 s, nginx 60 s), which otherwise sends a request on a connection
# the server is closing and gets nothing back (a 502, "server disconnected"); a server too busy to read a
# request within 5 s closed its connection the same way.
KEEP_ALIVE_S = 75
# ``--workers N``: the supervisor kills (SIGKILL) a worker that does not answer its health check within
# this long. uvicorn's 5 s killed workers that were only slow to answer (starved of CPU on a loaded machine,
# a long pause), cutting every request in flight there; a hung worker is still replaced, after as long as
# gunicorn's own worker timeout. The supervisor waits that long for an answer before it acts on a signal.
WORKER_HEALTHCHECK_S = 30

# The database's own error says why (it went away meanwhile, a file it cannot write, ...).
_CLAIM_FAILED = "cannot claim the counters of the database: {}"


def _claim_and_serve(
    settings: Settings,
    services: Services | None,
    worker_args: dict[str, Any] | None,
    mark: RedisMark | None,
) -> None:
    # The web application is imported only where it serves (one process, or each worker): a refused
    # start says so without loading it, and a supervisor never does.
    from sqlalchemy.exc import DBAPIError

    from meterline.api.worker import WORKER_ARGS
    from meterline.storage.counter_claim import claim_counters

    count, store = settings.worker_count, settings.counter_store
    try:
        # Before anything is served: a process whose counters would not see the others' must not start.
        claim = claim_counters(settings.database_url, store, mark)
    except MeterlineError as exc:
        fail(exc.message)
    except DBAPIError as exc:
        fail(_CLAIM_FAILED.format(exc.orig))
    try:
        if claim.alone and store != "memory":
            _first_of_shared(settings, store)
        claim.share()
    except BaseException as exc:
        claim.give_back()  # its threads too, whatever ended the start
        if isinstance(exc, MeterlineError):
            fail(exc.message)
        if isinstance(exc, DBAPIError):
            fail(_CLAIM_FAILED.format(exc.orig))
        raise
    lost: list[str] = []

    def stop(why: str) -> None:
        # Another process took the claim while this one's PostgreSQL session was gone: graceful shutdown
        # (in-flight requests settle), as uvicorn (or its supervisor, with the workers) does on SIGTERM.
        lost.append(why)
        logging.getLogger("meterline.counters").error("%s", why)
        signal.raise_signal(signal.SIGTERM)

    def after_serving(sig: int, _frame: Any) -> None:
        # Reached before uvicorn handles SIGTERM, and when it raises the signal it shut down for again
        # once it has. For the stop asked above (starting up or shut down: uvicorn's own start-up failure
        # would exit 3 without the reason), this process ends saying why; for any other SIGTERM it ends
        # as it would have.
        if lost:
            fail(lost[0])
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)

    previous = signal.signal(signal.SIGTERM, after_serving)
    claim.keep_alive(stop)
    stopped_by = None
    try:
        if count == 1:
            _serve_one(settings, services)
        else:
            assert worker_args is not None
            _prepare_workers(settings)
            # Each worker reads the same settings the way this process did (file, environment, options).
            os.environ[WORKER_ARGS] = json.dumps(
                worker_args
                | {"host": settings.host, "port": settings.port, "workers": count, "supervisor": os.getpid()}
            )
            stopped_by = _serve_workers(settings, count)
    finally:
        claim.give_back()
        signal.signal(signal.SIGTERM, previous)
    if lost:  # the workers' supervisor stops on SIGTERM without raising it again
        fail(lost[0])
    if stopped_by is not None:  # ... so this process ends by the signal itself, as one process does
        signal.signal(stopped_by, signal.SIG_DFL)
        signal.raise_signal(stopped_by)


_REDIS_WAIT_S = 30.0  # how long a process counting in Redis waits for it at start


def _redis_mark(settings: Settings) -> RedisMark:
    """Which Redis this process counts in, for its claim of the database (``counter_claim``): it must
    know that before it serves, so it waits for Redis (a while: Redis starting beside it), then gives up
    saying why (a service manager starts it again)."""
    from meterline.storage.redis_counters import RedisMark, redacted

    assert settings.redis_url is not None
    deadline = time.monotonic() + _REDIS_WAIT_S
    said = False
    while True:
        mark = None
        try:
            mark = RedisMark(settings.redis_url)  # a cluster's client asks its nodes at once
            mark.read()
            # Said once per start, by the process that starts the workers.
            err.print(
                f"Meterline: counting in Redis at {mark.where} with {mark.counting_with()}", soft_wrap=True
            )
            return mark
        except Exception as exc:  # whatever the client raises: unreachable, or a URL it cannot use
            _close(mark)
            if time.monotonic() > deadline or isinstance(exc, ValueError):
                fail(
                    f"cannot reach Redis at {redacted(settings.redis_url)} (redis_url): "
                    f"{str(exc).rstrip('.')}. A process "
                    "counting in Redis starts once it can tell which Redis that is (every process serving "
                    "one database must count in the same one)"
                )
            if not said:
                logging.getLogger("meterline.counters").warning(
                    "waiting up to %.0f s for Redis at %s: %s",
                    _REDIS_WAIT_S,
                    redacted(settings.redis_url),
                    exc,
                )
                said = True
            time.sleep(1.0)


def _close(mark: RedisMark | None) -> None:
    if mark is not None:
        mark.close()


def _warn_when_connections_short(settings: Settings, count: int) -> None:
    """PostgreSQL: say so when this server's workers, each opening up to its pool and overflow while it
    is busiest, could need more connections than the server has free: requests would then fail with
    503s under load ("too many clients already"). A warning, not a refusal: the peak is rare, and the
    free slots change as other machines come and go."""
    from meterline.storage.database import connections_free

    try:
        free = connections_free(settings.database_url)
    except Exception:
        return  # unreachable, or no rights to look: serving meets that with its own message
    if free is None:
        return
    available, most = free
    each = settings.database_pool_size + settings.database_max_overflow
    needed = count * each + 1  # and the counters' claim, held by the serving process (``counter_claim``)
    if needed <= available:
        return
    err.print(
        f"[yellow]warning:[/] {count} worker(s) may open up to {needed} PostgreSQL connections "
        f"(database_pool_size {settings.database_pool_size} + database_max_overflow "
        f"{settings.database_max_overflow} each, and one for the counters' claim), but the server has "
        f"{max(available, 0)} free of "
        f"max_connections {most}: under load, requests would fail with 503s. Lower workers, "
        "database_pool_size or database_max_overflow, or raise PostgreSQL's max_connections (every "
        "machine's workers count).",
        highlight=False,
    )


def _serve_workers(settings: Settings, count: int) -> int | None:
    """``count`` workers started, restarted and stopped by uvicorn's supervisor, each with a listening
    socket of its own where the system allows (``OwnListener``: the kernel spreads connections over
    them), else sharing one."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from meterline.api.worker import OwnListener, reuse_port_available
    from meterline.gateway.metrics import SHARED_DIR

    config = uvicorn.Config(
        "meterline.api.worker:application",
        factory=True,
        workers=count,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_S,
    )
    log = logging.getLogger("uvicorn.error")
    why_not = reuse_port_available(settings.host, settings.port)
    sockets: list[Any]
    if why_not is None:
        sockets = OwnListener(settings.host, settings.port)
        log.info("Meterline: %d workers on http://%s:%d, a socket each", count, settings.host, settings.port)
    else:
        log.info("Meterline: %d workers share one socket (%s)", count, why_not)
        sockets = [config.bind_socket()]  # exits with uvicorn's message when the port cannot be bound
    # Every worker keeps its metrics in files here, and each answers /metrics for all of them
    # (``gateway/metrics.py``). A fresh directory each run: values left by an earlier run would add up.
    # Named after this process, so that the next start removes it if this one is killed outright.
    _remove_orphaned_metrics()
    shared = tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")
    os.environ[SHARED_DIR] = shared

    class Supervisor(Multiprocess):
        """uvicorn's, noting the signal that stopped it: ``serve`` ends by it once the workers have
        ended, as one process (uvicorn's server) does."""

        stopped_by: int | None = None

        def handle_int(self) -> None:
            self.stopped_by = signal.SIGINT
            super().handle_int()

        def handle_term(self) -> None:
            self.stopped_by = signal.SIGTERM
            super().handle_term()

    supervisor = Supervisor(config, sockets=sockets)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            supervisor.run()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    return supervisor.stopped_by


_METRICS_PREFIX = "meterline-metrics-"


def _remove_orphaned_metrics() -> None:
    """The metrics directories of supervisors that are gone without removing theirs (SIGKILL, the OOM
    killer): this user's, in the temporary directory, named after a process that no longer runs."""
    root = Path(tempfile.gettempdir())
    for found in root.glob(f"{_METRICS_PREFIX}*-*"):
        pid = found.name.removeprefix(_METRICS_PREFIX).partition("-")[0]
        try:
            if not pid.isdigit() or found.stat().st_uid != os.getuid():
                continue
            if int(pid) == os.getpid():  # a process before this one with this id (pid 1 in a container)
                raise ProcessLookupError
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(found, ignore_errors=True)
        except OSError:
            continue  # gone meanwhile, or a process of another user's: not ours to judge


def _serve_one(settings: Settings, services: Services | None) -> None:
    import uvicorn

    from meterline.api.access_log import configure_access_log
    from meterline.api.app import create_app

    try:
        close_access_log = configure_access_log(settings.access_log)
    except OSError as exc:
        fail(f"access_log: cannot open {settings.access_log}: {exc.strerror or exc}")
    try:
        application = create_app(settings, services=services, tune_collector=True)
    except MeterlineError as exc:
        close_access_log()
        fail(exc.message)
    try:
        # Uvicorn's own access log stays off: ours (meterline.access) has the metering fields.
        uvicorn.run(
            application,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    finally:
        close_access_log()


def _first_of_shared(settings: Settings, store: str) -> None:
    """The only serving process of a database with shared counters (none other holds a claim): every
    reservation left in the database belongs to a process that is gone, so it is settled now, and
    counters kept in the database are dropped first (another kind of counters may have served since they
    were last written; they reload from the ledger as they are needed)."""
    from meterline.services import build_services
    from meterline.storage.sql_counters import reset_counters

    services = build_services(settings)
    try:
        if store == "database":
            with services.db.write() as conn:
                reset_counters(conn)
        services.reservations.recover_all(everything=True)
    finally:
        services.close()


def _prepare_workers(settings: Settings) -> None:
    """What must happen once before N workers start: the migration, and the signing key file (created
    here if missing, so the workers never race to create it)."""
    from meterline.key_file import KeyFile
    from meterline.storage.database import Database
    from meterline.storage.migrate import upgrade_if_behind

    try:
        db = Database(settings.database_url)
        try:
            upgrade_if_behind(db)
        finally:
            db.dispose()
        KeyFile(settings.signing_key_file, lazy=False)
    except MeterlineError as exc:
        fail(exc.message)


@app.command()
def demo(
    database: Annotated[Path, typer.Option(help="SQLite file for the demo.")] = Path("meterline-demo.db"),
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    days: Annotated[int, typer.Option(min=30, max=120, help="Days of generated history.")] = 45,
    seed_only: Annotated[bool, typer.Option("--seed-only", help="Create the demo data and exit.")] = False,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Route to the upstreams of this TOML file, not a simulated one."),
    ] = None,
) -> None:
    """Serve on an embedded SQLite database filled with realistic sample usage, with the gateway routed
    to a simulated upstream (or to the upstreams of --config)."""
    from rich.progress import Progress

    from meterline.cli.demo_setup import print_banner, print_keys, simulated_routes, start_simulated_upstream
    from meterline.demo import is_seeded, seed_demo
    from meterline.services import build_services

    admin_key = "ml_admin_" + secrets.token_hex(16)
    upstream = None if seed_only or config is not None else start_simulated_upstream()
    try:
        routes = None if upstream is None else simulated_routes(upstream)
        settings = settings_from(
            config,
            f"sqlite:///{database.resolve()}",
            host=host,
            port=port,
            admin_key=admin_key,
            upstreams=routes,
        )
        services = build_services(settings)
        keys_file = database.with_suffix(".keys.json")
        if not is_seeded(services):
            with Progress(console=err, transient=True) as progress:
                task = progress.add_task("Generating demo usage", total=None)

                def step(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                data = seed_demo(services, days=days, progress=step)
            keys = [
                {
                    "organization": k.organization,
                    "workspace": k.workspace,
                    "name": k.name,
                    "scope": k.scope,
                    "key": k.secret,
                }
                for k in data.keys
            ]
            keys_file.write_text(json.dumps(keys, indent=2), encoding="utf-8")
            keys_file.chmod(0o600)
            err.print(f"Seeded {data.rows} ledger rows into {database}.")
        keys = json.loads(keys_file.read_text(encoding="utf-8")) if keys_file.exists() else []
        print_keys(err, keys, keys_file)
        first = next((k["key"] for k in keys if k["scope"] == "workspace"), None)
        print_banner(
            err, base=f"http://{host}:{port}", admin_key=admin_key, first_key=first, upstream=upstream
        )
        if seed_only:
            services.close()
            return
        _run(settings, services)
    finally:
        if upstream is not None:
            upstream.stop()


@app.command()
def migrate(config: ConfigOption = None, database_url: DatabaseOption = None) -> None:
    """Bring the database schema up to date."""
    from meterline.storage.migrate import current_revision

    with services_for(config, database_url, create=True) as services:
        out.print(f"database at revision {current_revision(services.db)}")


@app.command("redis-module")
def redis_module(
    output: Annotated[
        str, typer.Argument(help="Where to write it: a file, or a directory (for meterline_counters.so).")
    ] = "meterline_counters.so",
) -> None:
    """Build Meterline's Redis module (C, with $CC or cc): the counter store's calls in native code, for a
    fraction of the script's Redis time per decision. Load it in every Redis that keeps Meterline's
    counters (loadmodule); a Redis without it runs the script. Build it again after an upgrade."""
    from meterline.storage.redis_module import ModuleBuildError, build

    path = Path(output)
    if output.endswith(("/", os.sep)) or path.is_dir():
        path = path / "meterline_counters.so"
    try:
        built = build(path)
    except ModuleBuildError as exc:
        fail(str(exc))
    # Paths are printed whole (soft_wrap): a wrapped one could not be copied into redis.conf.
    out.print(f"built {built}", soft_wrap=True)
    out.print(f"load it in redis.conf (and in its replicas'): loadmodule {built}", soft_wrap=True)
    out.print(f"or start Redis with: redis-server --loadmodule {built}", soft_wrap=True)
    out.print(
        'Meterline then counts with it: its start-up line says "counting in Redis at … with'
        " Meterline's Redis module\". A Redis without it runs the script."
    )


@app.command()
def keygen() -> None:
    """Print a new random admin key (for METERLINE_ADMIN_KEY)."""
    typer.echo("ml_admin_" + secrets.token_hex(24))


# -- organizations -----------------------------------------------------------------------------
def _decimal_option(value: str | None, what: str) -> Decimal | None:
    if value is None:
        return None
    from meterline.money import parse_decimal

    try:
        return parse_decimal(value, what=what)
    except ValueError as exc:
        fail(str(exc))


@orgs_app.command("create")
def orgs_create(
    name: str,
    plan: Annotated[str, typer.Option(help="free, pro, enterprise or a configured plan.")] = "free",
    currency: Annotated[str | None, typer.Option(help="USD, EUR, …")] = None,
    spend_cap: Annotated[str | None, typer.Option(help="Monthly money cap (BYOM), e.g. 250.00.")] = None,
    anchor_day: Annotated[int | None, typer.Option(help="Billing anchor day, 1-31.")] = None,
    discount_pct: Annotated[int, typer.Option(help="Discount in percent, 0-100.")] = 0,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an organization."""
    from meterline.api import render

    with services_for(config, database_url, create=True) as services:
        org = services.tenancy.create_organization(
            name,
            plan,
            currency=currency,
            spend_cap=_decimal_option(spend_cap, "spend cap"),
            billing_anchor_day=anchor_day,
            discount_pct=discount_pct,
        )
        emit([render.organization(org)], ["id", "name", "plan", "currency", "spend_cap"], as_json, "Created")


@orgs_app.command("list")
def orgs_list(
    config: ConfigOption = None, database_url: DatabaseOption = None, as_json: JsonOption = False
) -> None:
    """List organizations."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        orgs, _ = services.tenancy.list_organizations(limit=10_000)
        emit(
            [render.organization(o) for o in orgs],
            ["id", "name", "plan", "currency", "spend_cap", "billing_anchor_day", "discount_pct"],
            as_json,
            "Organizations",
        )


# -- workspaces --------------------------------------------------------------------------------
@workspaces_app.command("create")
def workspaces_create(
    organization_id: str,
    name: str,
    group: Annotated[str | None, typer.Option(help="Workspace group label.")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a workspace in an organization."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        ws = services.tenancy.create_workspace(organization_id, name, group)
        emit([render.workspace(ws)], ["id", "organization_id", "name", "group"], as_json, "Created")


@workspaces_app.command("list")
def workspaces_list(
    organization_id: Annotated[str | None, typer.Option("--org", help="Only this organization.")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """List workspaces."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        items, _ = services.tenancy.list_workspaces(organization_id, limit=10_000)
        emit(
            [render.workspace(w) for w in items],
            ["id", "organization_id", "name", "group"],
            as_json,
            "Workspaces",
        )


# -- keys --------------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    workspace_id: str,
    name: str,
    scope: Annotated[
        str, typer.Option(help="workspace, or organization for an organization-wide read key.")
    ] = "workspace",
    source: Annotated[str | None, typer.Option(help="Default source label (web, cli, api).")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an API key. The key is printed once and cannot be shown again."""
    from meterline.api import render

    if scope not in ("workspace", "organization"):
        fail("--scope must be 'workspace' or 'organization'")
    with services_for(config, database_url) as services:
        new = services.tenancy.create_key(workspace_id, name, scope=scope, default_source=source)  # type: ignore[arg-type]
        row = {**render.api_key(new.key), "key": new.secret}
        if as_json:
            typer.echo(json.dumps(row, indent=2))
            return
        emit([row], ["id", "workspace_id", "name", "key_prefix", "scope"], False, "Created")
        out.print(f"key (shown only now): [bold]{new.secret}[/]", highlight=False)


@keys_app.command("list")
def keys_list(
    workspace_id: Annotated[str | None, typer.Option("--workspace", help="Only this workspace.")] = None,
    organization_id: Annotated[str | None, typer.Option("--org", help="Only this organization.")] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """List API keys (prefixes only: secrets are never stored)."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        items, _ = services.tenancy.list_keys(
            workspace_id=workspace_id, organization_id=organization_id, limit=10_000
        )
        emit(
            [render.api_key(k) for k in items],
            ["id", "workspace_id", "name", "key_prefix", "scope", "last_used_at", "revoked_at"],
            as_json,
            "API keys",
        )


@keys_app.command("revoke")
def keys_revoke(
    key_id: str, config: ConfigOption = None, database_url: DatabaseOption = None, as_json: JsonOption = False
) -> None:
    """Revoke an API key; it stops working at once."""
    from meterline.api import render

    with services_for(config, database_url) as services:
        key = services.tenancy.revoke_key(key_id)
        emit([render.api_key(key)], ["id", "name", "key_prefix", "revoked_at"], as_json, "Revoked")


@keys_app.command("rotate")
def keys_rotate(
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
    reseal: Annotated[
        bool,
        typer.Option(
            "--reseal/--no-reseal",
            help="Re-seal stored webhook secrets with the new data key now (servers also do it at start).",
        ),
    ] = True,
) -> None:
    """Rotate the deployment's keys: the signing key (access tokens, receipts) and the data key that
    seals webhook secrets in the database.

    New keys sign and seal from now on. The old signing keys stay in the key file (public part) and in
    /.well-known/jwks.json, so everything they signed still verifies; the old data keys stay in the key
    file, so every stored secret still opens. Running servers pick the new keys up at their next
    request. Then the stored webhook secrets are re-sealed with the new data key (``--no-reseal``:
    left to the next server start). The key file must exist: rotating a file no server reads (the
    default path is relative to the working directory) would seal the secrets with keys no server has.
    """
    from meterline.key_file import rotate_keys
    from meterline.services import build_services

    settings = settings_from(config, database_url)
    key_file = Path(settings.signing_key_file)
    if not key_file.is_file():
        fail(
            f"no key file at {key_file.absolute()}: nothing to rotate. Run this where the servers run, or "
            "set signing_key_file (METERLINE_SIGNING_KEY_FILE) to the deployment's key file"
        )
    try:
        ring = rotate_keys(key_file)
    except MeterlineError as exc:
        fail(exc.message)
    resealed: int | None = None
    skipped: int | None = None
    if reseal and _database_exists(settings.database_url):  # never create a database to re-seal nothing
        try:
            services = build_services(settings)
            try:
                result = services.seal_webhook_secrets()
            finally:
                services.close()
            resealed, skipped = result.sealed, result.skipped
        except Exception as exc:  # the rotation itself is done; servers re-seal when they start
            err.print(f"[yellow]warning:[/] stored webhook secrets not re-sealed now: {exc}", highlight=False)
    retired = [kid for kid, _ in ring.signing.retired]
    older = [key.kid for key in ring.data.older]
    row = {
        "active": ring.signing.kid,
        "retired": retired,
        "data_key": ring.data.sealing_kid,
        "older_data_keys": older,
        # null: not re-sealed now (--no-reseal, no database yet, or it failed: see stderr).
        "webhook_secrets_resealed": resealed,
        "webhook_secrets_skipped": skipped,
        "file": settings.signing_key_file,
    }
    if skipped:
        err.print(
            f"[yellow]warning:[/] {skipped} stored webhook secrets could not be re-sealed (logged above); "
            "they stay as they were",
            highlight=False,
        )
    if as_json:
        typer.echo(json.dumps(row, indent=2))
        return
    out.print(f"new active signing key: [bold]{ring.signing.kid}[/]", highlight=False)
    out.print(f"kept for verification: {', '.join(retired)}", highlight=False)
    out.print(f"new active data key: [bold]{ring.data.sealing_kid}[/]", highlight=False)
    out.print(f"kept for decryption: {', '.join(older)}", highlight=False)
    if resealed is not None:
        out.print(
            f"stored webhook secrets sealed with the new data key: {resealed}; left as they were: {skipped}",
            highlight=False,
        )


def _database_exists(url: str) -> bool:
    name = sqlite_database(url)
    return name is None or Path(name).is_file()


# -- receipts ----------------------------------------------------------------------------------
@app.command()
def verify(
    organization: Annotated[
        str | None, typer.Option("--organization", "--org", help="Only this organization's chain.")
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(
            envvar="METERLINE_URL",
            help="Verify a running server over HTTP instead (with --api-key); default $METERLINE_URL.",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="An organization-scoped key, for --url.", envvar="METERLINE_API_KEY")
    ] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check every receipt: signature (any key of the set), chain links and order, and that it matches its
    ledger row. Prints OK, or the first broken link of each broken chain and exits with status 1."""
    from meterline.cli.verify import verify_database, verify_remote

    if url is not None:
        if not api_key:
            fail("--url needs --api-key (an organization-scoped key)", 2)
        if organization is not None:
            fail("--organization is for the local database; over HTTP the key names the organization", 2)
        try:
            result = verify_remote(url, api_key, err, show_progress=not as_json)
        except MeterlineError as exc:
            fail(exc.message)
    else:
        with services_for(config, database_url) as services:
            result = verify_database(services, organization, err, show_progress=not as_json)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
    else:
        result.print(out)
    if not result.ok:
        raise typer.Exit(1)


# -- projections -------------------------------------------------------------------------------
@app.command()
def reconcile(
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Rewrite every projection from the ledger first.")
    ] = False,
    url: Annotated[
        str | None, typer.Option("--url", help="Ask a running server instead (with --admin-key).")
    ] = None,
    admin_key: Annotated[
        str | None, typer.Option("--admin-key", envvar="METERLINE_ADMIN_KEY", help="For --url.")
    ] = None,
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Recompute the hourly rollups and credit usage from the ledger and print every entry that differs
    (key, stored value, ledger value), or "0 drift". Exits with status 1 on drift.

    It reads the whole ledger, so it runs where the database is: against a server, --url with
    --admin-key asks the server to check (never to rebuild) through the admin API."""
    from meterline.cli.reconcile import print_report
    from meterline.storage import reconcile as projections

    if url is not None:
        from meterline.cli.remote_admin import reconcile_remote

        if rebuild:
            fail(
                "--rebuild rewrites tables: run it with the database (--config/--database-url), not --url", 2
            )
        if not admin_key:
            fail(
                "--url needs --admin-key (the server's METERLINE_ADMIN_KEY): reconcile is an operator check",
                2,
            )
        raise typer.Exit(reconcile_remote(url, admin_key, as_json))

    with services_for(config, database_url) as services:
        result = projections.rebuild(services.db) if rebuild else projections.reconcile(services.db)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
    else:
        print_report(result, out)
    if not result.ok:
        raise typer.Exit(1)


# -- credits -----------------------------------------------------------------------------------
@credits_app.command("grant")
def credits_grant(
    organization_id: str,
    amount: str,
    reason: Annotated[str, typer.Option(help="Why (referral, promotion, …).")] = "Operator grant",
    config: ConfigOption = None,
    database_url: DatabaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """Grant bonus credits (they never reset)."""
    from meterline.api import render

    credits = _decimal_option(amount, "amount")
    assert credits is not None
    with services_for(config, database_url) as services:
        grant = services.grant_credits(organization_id, credits, reason)
        emit([render.credit_grant(grant)], ["id", "organization_id", "amount", "reason"], as_json, "Granted")


# -- usage, history, top, export: from a server or the local database (cli/reports.py) ---------------
reports.register(app)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
