"""``instrument(client)``: record the usage of every call an existing ``openai`` or ``anthropic`` client
makes. Any other object is refused with a ``TypeError`` (recording nothing silently would look like no
usage at all).

What is returned is returned unchanged. A stream is the same ``Stream`` / ``AsyncStream`` object: its
iterator is wrapped, so the usage is recorded when the stream ends (or is closed, or abandoned).

OpenAI (``openai.OpenAI``, ``openai.AsyncOpenAI`` and their Azure subclasses): the ``create`` methods
of chat completions, completions, embeddings and responses are wrapped on that one client object.
OpenAI sends a stream's usage only when asked (``stream_options={"include_usage": True}``), as an extra
final chunk whose ``choices`` is empty. This does not ask on the caller's behalf by default, since that
extra chunk can break code that reads ``chunk.choices[0]``; pass ``include_usage=True`` to have it added
when the caller did not set ``stream_options``. A stream without usage is recorded from local counts
(the prompt as the gateway estimates it, the streamed text with the model's tokenizer) and flagged
``estimated``. (Through the Meterline gateway the server meters streams itself either way.)

Anthropic (``anthropic.Anthropic``, ``anthropic.AsyncAnthropic``): every ``POST /v1/messages`` of the
client's ``messages`` and ``beta.messages`` is observed where the SDK sends it (the resource's
``_post``), so ``create``, ``create(stream=True)``, the ``messages.stream(...)`` helper and ``parse`` are
all recorded, and ``count_tokens`` (not usage) is not. A stream's usage is read as the gateway reads it:
the prompt and cache side from ``message_start``, the final output count from ``message_delta``; a
stream that ends before ``message_delta`` is recorded with its output counted locally (``estimated``).

``with_raw_response`` / ``with_streaming_response`` calls are not recorded: they return HTTP responses.
Neither are calls of a copy made with ``client.with_options(...)`` or ``client.copy()``: instrument the
copy too (with the same tracker) if it makes calls.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from meterline.gateway.tokens import count_tokens, estimate_prompt_tokens
from meterline.sdk.usage_reading import Kind, as_mapping, read_usage

if TYPE_CHECKING:
    from meterline.sdk.tracker import UsageTracker

C = TypeVar("C")

# (attribute path on the client, kind of answer)
RESOURCES: tuple[tuple[str, Kind], ...] = (
    ("chat.completions", "chat"),
    ("completions", "completions"),
    ("embeddings", "embeddings"),
    ("responses", "responses"),
)
# The Anthropic resources whose requests are observed, and the path of a message request.
ANTHROPIC_RESOURCES = ("messages", "beta.messages")
MESSAGES_PATH = "/v1/messages"
_MARK = "_meterline_tracker"
# The client classes instrument() knows, by the module that defines them. The modules are looked up, not
# imported: a client of a module that was never imported cannot be one of its clients.
Flavor = Literal["openai", "anthropic"]
_CLIENTS: tuple[tuple[str, tuple[str, ...], Flavor], ...] = (
    ("openai", ("OpenAI", "AsyncOpenAI"), "openai"),
    ("anthropic", ("Anthropic", "AsyncAnthropic"), "anthropic"),
)
SUPPORTED = (
    "openai.OpenAI / openai.AsyncOpenAI (AzureOpenAI included) or anthropic.Anthropic / "
    "anthropic.AsyncAnthropic"
)


def instrument(
    client: C, tracker: UsageTracker | None = None, *, include_usage: bool = False
) -> UsageTracker:
    """Wrap ``client`` (an ``openai`` or ``anthropic`` client, sync or async) so that ``tracker`` records
    every call; returns the tracker. Instrumenting the same client again returns its existing tracker.
    ``TypeError`` for anything else. ``include_usage`` applies to OpenAI streams (see the module)."""
    from meterline.sdk.tracker import UsageTracker  # (with its price book: loaded when first used)

    flavor = client_flavor(client)
    existing = getattr(client, _MARK, None)
    if isinstance(existing, UsageTracker):
        return existing
    tracker = tracker or UsageTracker()
    if flavor == "anthropic":
        _instrument_anthropic(client, tracker)
    else:
        _instrument_openai(client, tracker, include_usage)
    setattr(client, _MARK, tracker)
    return tracker


def client_flavor(client: object) -> Flavor:
    """Which SDK ``client`` is a client of; ``TypeError`` naming what is supported when neither."""
    for module_name, class_names, flavor in _CLIENTS:
        module = sys.modules.get(module_name)
        classes = tuple(c for c in (getattr(module, n, None) for n in class_names) if isinstance(c, type))
        if classes and isinstance(client, classes):
            return flavor
    kind = type(client)
    raise TypeError(
        f"instrument() takes an {SUPPORTED} client, not {kind.__module__}.{kind.__qualname__}; "
        "record other answers with UsageTracker.record(response)"
    )


def _resource(client: object, path: str) -> Any:
    resource: Any = client
    for name in path.split("."):
        resource = getattr(resource, name, None)
    return resource


def _instrument_anthropic(client: object, tracker: UsageTracker) -> None:
    hooked = 0
    for path in ANTHROPIC_RESOURCES:
        resource = _resource(client, path)
        post = getattr(resource, "_post", None)
        if post is None:
            continue  # an older anthropic SDK without this API
        resource._post = _wrap_post(post, tracker)
        hooked += 1
    if not hooked:  # an SDK shaped otherwise: refuse rather than record nothing
        raise TypeError("this anthropic SDK's messages resource cannot be instrumented (no _post)")


def _wrap_post(post: Callable[..., Any], tracker: UsageTracker) -> Callable[..., Any]:
    # Every way of creating a message (create, create(stream=True), stream(), parse) ends in this call
    # with the request body; hooking it records them all, whichever helper the caller used.
    @functools.wraps(post)
    def wrapped(path: str, *args: Any, **kwargs: Any) -> Any:
        result = post(path, *args, **kwargs)
        if path.split("?")[0] != MESSAGES_PATH:
            return result  # count_tokens and the like: not usage
        body = kwargs.get("body")
        request = dict(body) if isinstance(body, Mapping) else {}
        if inspect.isawaitable(result):
            return _observe_later(result, "messages", request, tracker)
        return _observe(result, "messages", request, tracker)

    return wrapped


def _instrument_openai(client: object, tracker: UsageTracker, include_usage: bool) -> None:
    for path, kind in RESOURCES:
        resource = _resource(client, path)
        create = getattr(resource, "create", None)
        if create is None:
            continue  # an older openai SDK without this API
        resource.create = _wrap(create, kind, tracker, include_usage)


def _prepare(kind: Kind, kwargs: dict[str, Any], include_usage: bool) -> None:
    wants = include_usage and kind in ("chat", "completions") and kwargs.get("stream")
    if wants and "stream_options" not in kwargs:
        kwargs["stream_options"] = {"include_usage": True}


def _wrap(
    create: Callable[..., Any], kind: Kind, tracker: UsageTracker, include_usage: bool
) -> Callable[..., Any]:
    # The async client's methods are plain functions returning a coroutine (the SDK decorates them), so
    # what to do is decided by what comes back, not by the function's kind.
    @functools.wraps(create)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _prepare(kind, kwargs, include_usage)
        result = create(*args, **kwargs)
        if inspect.isawaitable(result):
            return _observe_later(result, kind, kwargs, tracker)
        return _observe(result, kind, kwargs, tracker)

    return wrapped


async def _observe_later(
    result: Awaitable[Any], kind: Kind, request: Mapping[str, Any], tracker: UsageTracker
) -> Any:
    return _observe(await result, kind, request, tracker)


def _observe(result: Any, kind: Kind, request: Mapping[str, Any], tracker: UsageTracker) -> Any:
    watch = StreamWatch(kind, dict(request), tracker)
    iterator = getattr(result, "_iterator", None)
    if iterator is not None and hasattr(iterator, "__anext__"):
        result._iterator = watch.async_iterator(iterator)
    elif iterator is not None and hasattr(iterator, "__next__"):
        result._iterator = watch.iterator(iterator)
    elif read_usage(result) is not None:
        tracker.record(result, model=_model(result, request))
    return result


def _model(result: object, request: Mapping[str, Any]) -> str | None:
    answered = getattr(result, "model", None)
    if isinstance(answered, str) and answered:
        return answered
    asked = request.get("model")
    return asked if isinstance(asked, str) else None


@dataclass
class StreamWatch:
    """What a stream has shown so far: its usage if it sent one, else its text for a local count."""

    kind: Kind
    request: dict[str, Any]
    tracker: UsageTracker
    usage: Any = None
    model: str | None = None
    text: list[str] = field(default_factory=list)
    done: bool = False
    started: dict[str, Any] | None = None  # Anthropic: message_start's usage (the prompt side)

    def iterator(self, items: Iterator[Any]) -> Iterator[Any]:
        try:
            for item in items:
                self.see(item)
                yield item
        finally:
            self.finish()

    async def async_iterator(self, items: AsyncIterator[Any]) -> AsyncIterator[Any]:
        try:
            async for item in items:
                self.see(item)
                yield item
        finally:
            self.finish()

    def see(self, item: Any) -> None:
        data = as_mapping(item)
        if data is None:
            return
        if self.kind == "messages":
            self._message_event(data)
            return
        if self.kind == "responses":
            if data.get("type") in ("response.completed", "response.incomplete", "response.failed"):
                self.usage = data.get("response")
            elif data.get("type") == "response.output_text.delta" and isinstance(data.get("delta"), str):
                self.text.append(data["delta"])
            return
        if isinstance(data.get("model"), str):
            self.model = data["model"]
        if data.get("usage"):
            self.usage = data
        for choice in data.get("choices") or ():
            self._choice_text(choice)

    def _message_event(self, data: Mapping[str, Any]) -> None:
        # As the gateway's StreamMeter reads it: message_start has the prompt and cache counts and a
        # provisional output count; message_delta the final, cumulative output (and repeats of the rest).
        kind = data.get("type")
        if kind == "message_start":
            message = as_mapping(data.get("message")) or {}
            if isinstance(message.get("model"), str):
                self.model = message["model"]
            usage = as_mapping(message.get("usage"))
            if usage is not None:
                self.started = dict(usage)
        elif kind == "message_delta":
            usage = as_mapping(data.get("usage"))
            if usage is not None and self.started is not None:
                reported = {k: v for k, v in usage.items() if v is not None}
                self.usage = {"type": "message", "usage": {**self.started, **reported}}
        elif kind == "content_block_delta":
            delta = as_mapping(data.get("delta")) or {}
            for name in ("text", "partial_json", "thinking"):
                if isinstance(delta.get(name), str):
                    self.text.append(delta[name])

    def _choice_text(self, choice: Mapping[str, Any]) -> None:
        if isinstance(choice.get("text"), str):
            self.text.append(choice["text"])
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
                self.text.append(function["arguments"])

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        model = self.model or _model(None, self.request)
        if self.usage is not None and read_usage(self.usage) is not None:
            self.tracker.record(self.usage, model=model)
            return
        if model is None:
            return
        completion = count_tokens("".join(self.text), model)
        if self.started is not None:
            # Cut before message_delta: the prompt side is the provider's, the output a local count.
            cut = {"type": "message", "usage": {**self.started, "output_tokens": completion}}
            self.tracker.record(cut, model=model, estimated=True)
            return
        prompt = estimate_prompt_tokens(self.kind, self.request, model)
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
        if self.kind == "messages":
            usage = {"type": "message", "usage": {"input_tokens": prompt, "output_tokens": completion}}
        elif self.kind == "responses":
            usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}
        self.tracker.record(usage, model=model, estimated=True)
