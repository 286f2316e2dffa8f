"""What every fake provider shares: the generated piece, prompt counting, modes and the SSE frame format."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

# One token in both o200k_base and cl100k_base, and N copies are exactly N tokens in both (the leading
# space keeps every copy its own word, so BPE never merges across copies): outputs are exactly countable.
PIECE: Final = " tok"
MESSAGE_OVERHEAD: Final = 3

MODES: Final = frozenset({"ok", "no_usage", "cache", "slow", "status", "cut", "hang", "drip", "replay"})

# Parameters every request sees unless its mode or the caller overrides them.
BASE_PARAMS: Final[Mapping[str, Any]] = {
    "default_pieces": 16,
    "max_pieces": 4096,
    "delay_ms": 0,
    "chunk_delay_ms": 0,
    "reasoning_tokens": 0,
}
MODE_DEFAULTS: Final[Mapping[str, Mapping[str, Any]]] = {
    "ok": {},
    "no_usage": {},
    "cache": {"cached_tokens": 1024, "cache_read_tokens": 1024, "cache_creation_tokens": 256},
    "slow": {"delay_ms": 200, "chunk_delay_ms": 20},
    "status": {"code": 500, "retry_after": 1},
    "cut": {"after": 2},
    "hang": {},
    "drip": {"pieces": 1000, "chunk_delay_ms": 50},
    "replay": {},
}


@functools.cache
def _o200k() -> Any:
    # Imported lazily: the encoder tables take ~60 ms to load, paid once per server at start-up. The
    # package reads them through a deprecated importlib API; that is its business, not a test failure.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai  # type: ignore[import-untyped, unused-ignore]

        return bpe_openai.get_encoding("o200k_base")


def warm_up() -> None:
    _o200k()


def count_tokens(text: str) -> int:
    if not text:
        return 0
    return len(_o200k().encode_ordinary(text))


def texts_of(value: Any) -> list[str]:
    """The text a provider would tokenize in a message content: strings and text parts, not images."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for item in value for text in texts_of(item)]
    if isinstance(value, dict):
        for key in ("text", "content", "output"):
            if key in value:
                return texts_of(value[key])
    return []


def prompt_tokens(texts: list[str], messages: int, token_ids: int = 0) -> int:
    return count_tokens("\n".join(texts)) + token_ids + MESSAGE_OVERHEAD * messages


@dataclass(frozen=True, slots=True)
class Plan:
    """How one request is answered: its mode, the merged parameters, and how many pieces to generate."""

    mode: str
    params: Mapping[str, Any]
    pieces: int
    capped: bool  # True when the request's own limit was cut down (finish reason "stop", not "length")

    @property
    def reports_usage(self) -> bool:
        return self.mode != "no_usage"

    @property
    def cached(self) -> int:
        return int(self.params.get("cached_tokens", 0)) if self.mode == "cache" else 0

    @property
    def cache_read(self) -> int:
        return int(self.params.get("cache_read_tokens", 0)) if self.mode == "cache" else 0

    @property
    def cache_write(self) -> int:
        return int(self.params.get("cache_creation_tokens", 0)) if self.mode == "cache" else 0

    @property
    def reasoning(self) -> int:
        return int(self.params.get("reasoning_tokens", 0))

    @property
    def piece(self) -> str:
        """The text of each generated piece (``piece`` param; chat completions streams)."""
        return str(self.params.get("piece", PIECE))

    @property
    def text(self) -> str:
        return self.piece * self.pieces


def make_plan(mode: str, params: Mapping[str, Any], request_limit: int | None) -> Plan:
    forced = params.get("pieces")
    wanted = int(forced) if forced is not None else request_limit
    if wanted is None:
        wanted = int(params["default_pieces"])
    cap = int(params["max_pieces"])
    return Plan(mode=mode, params=params, pieces=max(0, min(wanted, cap)), capped=wanted > cap)


def merged_params(mode: str, params: Mapping[str, Any]) -> dict[str, Any]:
    return {**BASE_PARAMS, **MODE_DEFAULTS[mode], **params}


def request_limit(body: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def sse(data: Any, event: str | None = None) -> bytes:
    payload = orjson.dumps(data)
    if event is None:
        return b"data: " + payload + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + payload + b"\n\n"


DONE: Final = b"data: [DONE]\n\n"


@dataclass(slots=True)
class StreamBody:
    """An SSE answer: frames before the text, one frame per piece, and the frames that end the stream.

    ``piece(i)`` gives the frame carrying piece ``i`` (of ``count``); ``tail()`` the frames after the last.
    """

    count: int
    head: list[bytes]
    piece: Callable[[int], bytes]
    tail: Callable[[], list[bytes]]


@dataclass(slots=True)
class Exchange:
    """One parsed request, as the provider handlers see it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any  # the decoded JSON body, or None when the body is not JSON
    number: int  # the request's sequence number in this server: ids are derived from it
    created: int  # unix seconds


@dataclass(slots=True)
class JsonBody:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]


def replay(exchange: Exchange, params: Mapping[str, Any]) -> JsonBody | StreamBody:
    """The ``replay`` mode: a provider's answer as given, ``json`` for a plain request and ``events``
    (``[{"event": name or null, "data": object or text}, ...]``) for a stream."""
    body = exchange.json if isinstance(exchange.json, dict) else {}
    if not body.get("stream"):
        return JsonBody(200, orjson.dumps(params["json"]), [(b"content-type", b"application/json")])
    frames = [
        (b"event: " + str(e["event"]).encode() + b"\n" if e.get("event") else b"")
        + b"data: "
        + (e["data"].encode() if isinstance(e["data"], str) else orjson.dumps(e["data"]))
        + b"\n\n"
        for e in params["events"]
    ]
    return StreamBody(0, frames, lambda _: b"", list)
