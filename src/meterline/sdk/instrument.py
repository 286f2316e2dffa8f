"""``instrument(openai_client)``: record the usage of every call an existing ``openai`` client makes.

The client's ``create`` methods (chat completions, completions, embeddings, responses) are wrapped on
that one client object; what they return is returned unchanged. A stream is the same ``Stream`` object:
its iterator is wrapped, so the usage is recorded when the stream ends (or is closed, or abandoned).

Streams and usage: OpenAI sends a stream's usage only when asked (``stream_options={"include_usage":
True}``), as an extra final chunk whose ``choices`` is empty. This does not ask on the caller's behalf by
default, since that extra chunk can break code that reads ``chunk.choices[0]``; pass
``include_usage=True`` to have it added when the caller did not set ``stream_options``. A stream without
usage is recorded from local counts (the prompt as the gateway estimates it, the streamed text with the
model's tokenizer) and flagged ``estimated``. (Through the Meterline gateway the server meters streams
itself either way.)

``with_raw_response`` / ``with_streaming_response`` calls are not recorded: they return HTTP responses.
Neither are calls of a copy made with ``client.with_options(...)`` or ``client.copy()``: instrument the
copy too (with the same tracker) if it makes calls.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meterline.gateway.tokens import count_tokens, estimate_prompt_tokens
from meterline.sdk.tracker import UsageTracker
from meterline.sdk.usage_reading import Kind, as_mapping, read_usage

C = TypeVar("C")

# (attribute path on the client, kind of answer)
RESOURCES: tuple[tuple[str, Kind], ...] = (
    ("chat.completions", "chat"),
    ("completions", "completions"),
    ("embeddings", "embeddings"),
    ("responses", "responses"),
)
_MARK = "_meterline_tracker"


def instrument(
    client: C, tracker: UsageTracker | None = None, *, include_usage: bool = False
) -> UsageTracker:
    """Wrap ``client`` (``openai.OpenAI`` or ``openai.AsyncOpenAI``) so that ``tracker`` records every
    call; returns the tracker. Instrumenting the same client again returns its existing tracker."""
    existing = getattr(client, _MARK, None)
    if isinstance(existing, UsageTracker):
        return existing
    tracker = tracker or UsageTracker()
    for path, kind in RESOURCES:
        resource: Any = client
        for name in path.split("."):
            resource = getattr(resource, name, None)
        create = getattr(resource, "create", None)
        if create is None:
            continue  # an older openai SDK without this API
        resource.create = _wrap(create, kind, tracker, include_usage)
    setattr(client, _MARK, tracker)
    return tracker


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
        api = "chat" if self.kind == "messages" else self.kind
        prompt = estimate_prompt_tokens(api, self.request, model)
        completion = count_tokens("".join(self.text), model)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        if self.kind == "responses":
            usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion}
        self.tracker.record(usage, model=model, estimated=True)
