"""A fake OpenAI- and Anthropic-compatible upstream: a real HTTP server on loopback for tests and benchmarks.

Run it by hand::

    python -m meterline.testing.fake_upstream --port 8901 [--host 127.0.0.1] [--api-key KEY]
        [--mode MODE] [--delay-ms N] [--chunk-delay-ms N] [--max-pieces N] [--default-pieces N]
        [--param NAME=JSON ...]

or from a test (a subprocess on a free port, ready when ``start`` returns)::

    with FakeUpstream.start(api_key="sk-test") as upstream:
        client = openai.OpenAI(base_url=upstream.url, api_key="sk-test", max_retries=0)
        upstream.script("status", code=429)          # the next request gets a 429
        ...
        assert upstream.requests()[-1].json["stream_options"] == {"include_usage": True}

Endpoints: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/responses``,
``/v1/audio/transcriptions``, ``/v1/messages`` and ``/v1/messages/count_tokens`` (Anthropic; it answers
``{"input_tokens": P}``), and ``GET /v1/models`` (OpenAI's list, or Anthropic's when the request has an
``anthropic-version`` header; it always answers normally: modes neither apply to it nor are consumed by
it). ``.url`` is the OpenAI base URL (``…/v1``); Anthropic's SDK wants ``.origin`` (it appends
``/v1/messages`` itself).

Azure OpenAI's shapes of the OpenAI endpoints are served too, under ``.origin``:
``/openai/deployments/{deployment}/chat/completions`` (and ``completions``, ``embeddings``,
``audio/transcriptions``), ``/openai/responses`` and ``GET /openai/models``. They want an
``api-version`` query parameter (else 404, as Azure answers) and the key as ``api-key: KEY`` only (a
bearer token is refused). The recorded ``path`` and ``query`` are what was called.

Auth: started with an API key, every API route wants ``Authorization: Bearer KEY`` or
``x-api-key: KEY`` (Azure's shapes: ``api-key: KEY``), else 401 in the provider's error format. A
refused request (401, 404, 405, or 400 for a non-JSON body) is recorded but does not consume a scripted
behaviour.

Generated text
    ``N`` copies of :data:`PIECE` (``" tok"``), one token each in ``o200k_base`` and ``cl100k_base``,
    and ``N`` copies are exactly ``N`` tokens in both. ``N`` = the request's ``max_completion_tokens``
    / ``max_tokens`` / ``max_output_tokens``, else param ``default_pieces`` (16); param ``pieces`` forces
    ``N``; never more than ``max_pieces`` (4096). A stream sends one piece per chunk/event. Output
    tokens reported = ``N`` (+ param ``reasoning_tokens``, default 0, reported as reasoning tokens).
    One choice per answer (``n`` is ignored); no tool calls; the ``model`` field echoes the request's.

Prompt tokens ``P``
    ``P = o200k("\\n".join(texts)) + token_ids + 3 * messages``, where ``texts`` are the request's text
    strings in order (chat: each message's content, string or text parts; Anthropic: ``system`` then
    each message; Responses: ``instructions`` then ``input`` (a string or the items' content);
    completions: ``prompt``; embeddings: ``input``), ``token_ids`` counts prompts/inputs given as token
    arrays, and ``messages`` is the number of chat messages / Anthropic messages (+1 if ``system``) /
    Responses input items (+1 if ``instructions``), 0 for completions and embeddings. Tool definitions,
    images and other non-text parts count nothing.

Modes (``mode`` with its params; every mode also takes ``delay_ms`` before the first byte and
``chunk_delay_ms`` before every streamed piece, both 0 by default)
    ``ok``        normal answers; usage reported (OpenAI streams only with ``stream_options.include_usage``).
    ``no_usage``  no usage anywhere: no ``usage`` key in bodies, no usage chunk, no usage in events.
    ``cache``     ``cached_tokens`` C (1024), ``cache_read_tokens`` R (1024), ``cache_creation_tokens``
                  W (256). The counted prompt is the uncached part: OpenAI ``prompt_tokens`` /
                  Responses ``input_tokens`` = P + C with ``cached_tokens`` = C; Anthropic
                  ``input_tokens`` = P, ``cache_read_input_tokens`` = R, ``cache_creation_input_tokens`` = W.
    ``slow``      ``delay_ms`` (200), ``chunk_delay_ms`` (20).
    ``status``    ``code`` (500): answer that status with the provider's error JSON (optional
                  ``message``); 429 carries ``Retry-After: retry_after`` (1).
    ``cut``       ``after`` (2): a stream sends its opening events and ``after`` pieces, then the socket
                  is closed with no final event / ``[DONE]``; a non-stream answer sends its headers and
                  half the body, then closes.
    ``hang``      reads the request and never answers until the client goes away (timeout tests).
    ``drip``      ``pieces`` (1000), ``chunk_delay_ms`` (50): a long, slow stream that stops as soon as
                  the client disconnects (the request's ``outcome`` then says ``"disconnected"``).
    ``replay``    answers with a provider's own answer as given: ``json`` (the body of a plain answer)
                  or ``events`` (a stream: ``[{"event": name or null, "data": object or text}, ...]``).

``script(mode, count, **params)`` queues a behaviour for the next ``count`` API requests (FIFO); when
the queue is empty the default behaviour (``set_default``) applies. Every API request is recorded (the
last ``history`` = 1000) with its headers and body exactly as received; see :class:`RecordedRequest`.
Control endpoints: ``GET /_fake/health``, ``/_fake/requests``, ``/_fake/state``; ``POST
/_fake/script``, ``/_fake/default``, ``/_fake/clear``, ``/_fake/reset``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from meterline.testing._fake_common import BASE_PARAMS, MESSAGE_OVERHEAD, MODES, PIECE, warm_up

__all__ = ["MESSAGE_OVERHEAD", "MODES", "PIECE", "FakeUpstream", "RecordedRequest", "main"]

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One API request the fake received (control requests are not recorded)."""

    number: int  # 1, 2, … in arrival order since the server started
    method: str
    path: str  # without the query string and any trailing slash
    query: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "
    content_type: str
    body_size: int
    body: str | None  # the body exactly as received (UTF-8); None for multipart uploads
    json: Any  # the decoded JSON body, or None
    form: dict[str, Any] | None  # multipart: text fields by name; files as {filename, content_type, size}
    mode: str | None  # the behaviour applied; None when refused first (401, 404, 405, 400)
    params: dict[str, Any]  # the merged parameters of that behaviour
    status: int | None  # the HTTP status sent; None if nothing was sent (hang)
    pieces_sent: int  # streamed pieces sent so far
    # "pending", "completed", "cut" or "disconnected" (a client leaving is noticed only while the fake
    # waits: in delays, drip and hang; a fast stream to a vanished client still reads "completed").
    outcome: str

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RecordedRequest:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


class FakeUpstream:
    """A running fake upstream subprocess and the control client that drives it."""

    def __init__(self, process: subprocess.Popen[bytes], host: str, port: int, api_key: str | None) -> None:
        self.process = process
        self.host = host
        self.port = port
        self.api_key = api_key
        self.origin = f"http://{host}:{port}"
        self.url = f"{self.origin}/v1"
        self._control = httpx.Client(base_url=self.origin, timeout=10.0)
        self._finalizer = weakref.finalize(self, _terminate, process)

    @classmethod
    def start(
        cls,
        api_key: str | None = None,
        mode: str = "ok",
        *,
        host: str = HOST,
        max_pieces: int | None = None,
        default_pieces: int | None = None,
        history: int = 1000,
        startup_timeout: float = STARTUP_TIMEOUT,
        **params: Any,
    ) -> FakeUpstream:
        """Start the server on a free port of ``host`` and return once it answers.

        The parent binds the listening socket and hands it to the child, so there is no window in
        which another process can take the port; connections queue in the backlog until it serves.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(2048)
        port: int = sock.getsockname()[1]
        command = [sys.executable, "-m", "meterline.testing.fake_upstream", "--host", host]
        command += ["--fd", str(sock.fileno()), "--watch-stdin", "--mode", mode, "--history", str(history)]
        command += ["--param-json", orjson.dumps(params).decode()]
        if api_key is not None:
            command += ["--api-key", api_key]
        if max_pieces is not None:
            command += ["--max-pieces", str(max_pieces)]
        if default_pieces is not None:
            command += ["--default-pieces", str(default_pieces)]
        env = dict(os.environ)
        source_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
        try:
            # stdin is a pipe the child watches: if this process dies, the child sees EOF and exits.
            process = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments, no shell
                command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=[sock.fileno()], env=env
            )
        finally:
            sock.close()
        upstream = cls(process, host, port, api_key)
        try:
            upstream._wait_ready(startup_timeout)
        except BaseException:
            upstream.stop()
            raise
        return upstream

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"fake upstream exited with code {self.process.returncode} (see its stderr)"
                )
            try:
                if self._control.get("/_fake/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake upstream did not answer within {timeout} s")
            time.sleep(0.05)

    # -- control -----------------------------------------------------------------------------------------

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        response = self._control.post(path, content=orjson.dumps(payload))
        if response.status_code != 200:
            raise ValueError(f"fake upstream refused {path}: {response.text}")
        return response.json()

    def script(self, mode: str, count: int = 1, **params: Any) -> None:
        """Answer the next ``count`` API requests with ``mode`` (queued after earlier scripts)."""
        self._post("/_fake/script", {"mode": mode, "count": count, "params": params})

    def set_default(self, mode: str, **params: Any) -> None:
        """The behaviour for requests when no script is queued."""
        self._post("/_fake/default", {"mode": mode, "params": params})

    def requests(self) -> list[RecordedRequest]:
        """The recorded API requests, oldest first."""
        data = self._control.get("/_fake/requests").json()
        return [RecordedRequest.from_json(item) for item in data["requests"]]

    def last_request(self) -> RecordedRequest:
        recorded = self.requests()
        if not recorded:
            raise LookupError("the fake upstream has received no request")
        return recorded[-1]

    def wait_for_outcome(self, number: int, *outcomes: str, timeout: float = 5.0) -> RecordedRequest:
        """Poll until request ``number`` ends in one of ``outcomes`` (e.g. "disconnected")."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.requests() if r.number == number]
            if found and found[0].outcome in outcomes:
                return found[0]
            if time.monotonic() > deadline:
                state = found[0].outcome if found else "not recorded"
                raise TimeoutError(f"request {number} is {state}, not {' or '.join(outcomes)}")
            time.sleep(0.02)

    def state(self) -> dict[str, Any]:
        """The default behaviour and the scripted queue, as the server sees them."""
        data: dict[str, Any] = self._control.get("/_fake/state").json()
        return data

    def clear(self) -> None:
        """Forget recorded requests and pending scripts (the default behaviour stays)."""
        self._post("/_fake/clear", {})

    def reset(self) -> None:
        """``clear`` and restore the default behaviour the server started with."""
        self._post("/_fake/reset", {})

    def stop(self) -> None:
        self._control.close()
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the server process ------------------------------------------------------------------------------


class _DropCutTracebacks(logging.Filter):
    # A cut is the fake doing its job: keep uvicorn from logging it as an application error.
    def filter(self, record: logging.LogRecord) -> bool:
        from meterline.testing._fake_app import CutConnection

        return not (record.exc_info and isinstance(record.exc_info[1], CutConnection))


def _params(values: Sequence[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--param wants NAME=VALUE, got {item!r}")
        try:
            params[name] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            params[name] = raw
    return params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m meterline.testing.fake_upstream", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, help="TCP port to listen on (required unless --fd)")
    parser.add_argument("--api-key", help="require this key (Bearer or x-api-key)")
    parser.add_argument("--mode", default="ok", choices=sorted(MODES), help="default behaviour")
    parser.add_argument("--delay-ms", type=int, help="default delay before the first byte")
    parser.add_argument("--chunk-delay-ms", type=int, help="default delay before each streamed piece")
    parser.add_argument("--max-pieces", type=int, default=BASE_PARAMS["max_pieces"])
    parser.add_argument("--default-pieces", type=int, default=BASE_PARAMS["default_pieces"])
    parser.add_argument("--history", type=int, default=1000, help="how many requests to remember")
    parser.add_argument("--param", action="append", default=[], help="NAME=JSON parameter of --mode")
    parser.add_argument("--param-json", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)  # an inherited listening socket
    parser.add_argument("--watch-stdin", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    from meterline.testing._fake_app import FakeState, FakeUpstreamApp

    args = _parser().parse_args(argv)
    if args.port is None and args.fd is None:
        _parser().error("--port is required")
    params: dict[str, Any] = {**orjson.loads(args.param_json), **_params(args.param)}
    if args.delay_ms is not None:
        params["delay_ms"] = args.delay_ms
    if args.chunk_delay_ms is not None:
        params["chunk_delay_ms"] = args.chunk_delay_ms
    base = {"max_pieces": args.max_pieces, "default_pieces": args.default_pieces}
    state = FakeState(args.api_key, args.mode, params, base, args.history)
    warm_up()
    config = uvicorn.Config(
        FakeUpstreamApp(state),
        host=args.host,
        port=args.port or 0,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=1,
        # Longer than the gateway keeps an idle upstream connection (30 s, gateway/upstream.py), as a
        # provider's API does: else a request sent as the fake closes an idle connection is cut.
        timeout_keep_alive=75,
    )
    logging.getLogger("uvicorn.error").addFilter(_DropCutTracebacks())
    server = uvicorn.Server(config)
    if args.watch_stdin:

        def watch() -> None:
            sys.stdin.buffer.read()
            server.should_exit = True

        threading.Thread(target=watch, daemon=True).start()
    sockets = [socket.socket(fileno=args.fd)] if args.fd is not None else None
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
