"""Metering a streamed answer event by event, while the gateway passes it through.

Per flavor, what is read (shapes of the openai and anthropic SDKs' stream types):
* chat / completions: each ``data:`` chunk's ``choices[].delta`` (content, reasoning, refusal, tool
  call name and arguments) or ``choices[].text``; usage from a chunk's ``usage`` (the last chunk when
  ``stream_options.include_usage`` is set). ``data: [DONE]`` ends the stream.
* responses: ``response.*.delta`` events (output text, refusal, reasoning, function arguments...);
  usage from ``response.usage`` of ``response.completed`` / ``.incomplete`` / ``.failed``.
* messages (Anthropic): prompt and cache usage from ``message_start``; the final, cumulative
  ``output_tokens`` from ``message_delta``; text from ``content_block_delta`` (text, tool-input JSON,
  thinking).

Completion tokens are counted locally as the stream goes, one delta at a time (never re-tokenizing
the text so far), so a stream cut before the upstream reports usage is still metered, and credits
can be drawn while it streams. Upstream-reported counts win as soon as they arrive. An event that is
not JSON, or not of a known shape, is passed on and counts nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from meterline.gateway.flavors import Api, TokenUsage
from meterline.gateway.sse import SSEEvent
from meterline.gateway.tokens import RunningCount, count_margin, token_counter
from meterline.gateway.usage import anthropic_usage, openai_chat_usage, openai_responses_usage, token_count
from meterline.metering.records import NO_DETAIL

# Responses stream events whose ``delta`` is text the model generated (audio deltas are base64 audio).
RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.mcp_call_arguments.delta",
        "response.code_interpreter_call_code.delta",
        "response.audio.transcript.delta",
    }
)
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Chat delta fields holding generated text (reasoning fields are what several OpenAI-compatible
# servers use for reasoning models).
_CHAT_DELTA_TEXTS = ("content", "reasoning_content", "reasoning", "refusal")
_ANTHROPIC_DELTA_TEXTS = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}


@dataclass(frozen=True, slots=True)
class StreamError:
    """An error the upstream reported inside the stream (the stream's own error event)."""

    message: str
    type: str | None = None
    code: str | None = None


class StreamMeter:
    """Observe every event of one stream, in order; read the usage at any time.

    ``client_wants_usage``: the client's request itself set ``stream_options.include_usage: true``.
    When it did not, the gateway asked for usage on its behalf, and the usage-only chunk that answers
    (``"choices": []`` with ``usage``) is metered but not forwarded (``observe`` returns False).
    """

    __slots__ = (
        "_cache_read",
        "_cache_write",
        "_completion",
        "_count",
        "_detail",
        "_handle",
        "_local",
        "_message_usage",
        "_prompt",
        "_prompt_estimate",
        "_texts",
        "_wants_usage",
        "api",
        "error",
        "events_seen",
        "finished",
        "output_events",
        "output_texts",
    )

    def __init__(self, api: Api, model: str, prompt_estimate: int, client_wants_usage: bool) -> None:
        self.api = api
        self._count = token_counter(model)
        self._prompt_estimate = prompt_estimate
        self._wants_usage = client_wants_usage
        self._local = 0  # completion tokens counted here
        # One running count per kind of generated text (content, reasoning, tool arguments...): each is
        # counted joined, as the provider counts it, not delta by delta.
        self._texts: dict[str, RunningCount] = {}
        self._prompt: int | None = None  # as reported by the upstream
        self._completion: int | None = None  # as reported by the upstream (final or cumulative)
        self._cache_read = 0
        self._cache_write = 0
        self._detail = NO_DETAIL  # the rest of the usage vector, as the upstream reported it
        self._message_usage: Mapping[str, Any] = {}  # Anthropic's message_start usage
        self.events_seen = 0
        self.output_events = 0  # events that carried generated text
        self.output_texts = 0  # pieces of generated text seen
        self.finished = False  # the answer said it was complete (a finish or stop reason)
        self.error: StreamError | None = None
        handlers: dict[str, Callable[[dict[str, Any]], bool]] = {
            "responses": self._responses_event,
            "messages": self._anthropic_event,
        }
        self._handle = handlers.get(api, self._openai_chunk)

    # -- reading -----------------------------------------------------------------------------------
    @property
    def first_output_seen(self) -> bool:
        return self.output_events > 0

    @property
    def reported(self) -> bool:
        """The upstream has reported both prompt and completion tokens (its final usage)."""
        return self._prompt is not None and self._completion is not None

    def usage_so_far(self) -> TokenUsage:
        """Reported counts where the upstream gave them, else the prompt estimate and the local count."""
        prompt = self._prompt_estimate if self._prompt is None else self._prompt
        completion = self._local if self._completion is None else self._completion
        return TokenUsage(prompt, completion, self._cache_read, self._cache_write, self._detail)

    def progress_so_far(self) -> TokenUsage:
        """``usage_so_far`` as the live meter shows it: what the upstream reported as it is, a count made
        here less its margin (``tokens.count_margin``). The settle uses the provider's count, so it only
        moves the meter up, as long as that count is within the margin of ours (the usage bar once went
        75.04 -> 75.03 at a settle)."""
        if self._prompt is not None:
            prompt = self._prompt
        else:
            prompt = max(self._prompt_estimate - count_margin(self._prompt_estimate), 0)
        if self._completion is not None:
            completion = self._completion
        else:
            completion = max(self._local - count_margin(self._local), 0)
        prompt = max(prompt, self._cache_read + self._cache_write)
        return TokenUsage(prompt, completion, self._cache_read, self._cache_write, self._detail)

    def final(self) -> TokenUsage:
        """The usage to settle once the stream has ended, however it ended (same rule as ``usage_so_far``)."""
        return self.usage_so_far()

    @property
    def counted_completion_tokens(self) -> int:
        """Completion tokens counted locally, whatever the upstream reported (for comparisons)."""
        return self._local

    # -- observing ---------------------------------------------------------------------------------
    def observe(self, event: SSEEvent) -> bool:
        """Meter one event; True when it is to be forwarded to the client."""
        self.events_seen += 1
        data = event.data
        if not data or data == "[DONE]":
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(payload, dict):
            return True
        return self._handle(payload)

    def _add_output(self, text: object, channel: str = "text") -> None:
        if isinstance(text, str) and text:
            self._local += self._tokens(channel, text)
            self.output_events += 1

    def _tokens(self, channel: str, text: str) -> int:
        """The tokens ``text`` adds to the generated text of ``channel`` (counted joined)."""
        running = self._texts.get(channel)
        if running is None:
            running = self._texts[channel] = RunningCount(self._count)
        self.output_texts += 1
        return running.add(text)

    def _report(self, usage: TokenUsage | None) -> None:
        if usage is not None:
            self._prompt = usage.prompt_tokens
            self._completion = usage.completion_tokens
            self._cache_read = usage.cache_read_tokens
            self._cache_write = usage.cache_write_tokens
            self._detail = usage.detail

    def _openai_chunk(self, chunk: dict[str, Any]) -> bool:
        error = chunk.get("error")
        if error is not None:
            self.error = _stream_error(error)
            return True
        choices = chunk.get("choices")
        if isinstance(choices, list):
            before = self.output_texts
            for choice in choices:
                if isinstance(choice, dict):
                    self._choice(choice)
            if self.output_texts != before:
                self.output_events += 1
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._report(openai_chat_usage(usage, chunk.get("service_tier")))
            if not choices and not self._wants_usage:
                return False  # the usage-only chunk the gateway asked for on the client's behalf
        return True

    def _choice(self, choice: dict[str, Any]) -> None:
        if choice.get("finish_reason") is not None:
            self.finished = True
        index = choice.get("index", 0)
        total = 0
        text = choice.get("text")  # legacy completions
        if isinstance(text, str) and text:
            total += self._tokens(f"{index}:text", text)
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for key in _CHAT_DELTA_TEXTS:
                text = delta.get(key)
                if isinstance(text, str) and text:
                    total += self._tokens(f"{index}:{key}", text)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    if isinstance(call, dict):
                        total += self._function(f"{index}:call:{call.get('index', 0)}", call.get("function"))
            total += self._function(f"{index}:function", delta.get("function_call"))
        self._local += total

    def _function(self, channel: str, function: object) -> int:
        if not isinstance(function, dict):
            return 0
        total = 0
        for key in ("name", "arguments"):
            text = function.get(key)
            if isinstance(text, str) and text:
                total += self._tokens(f"{channel}:{key}", text)
        return total

    def _responses_event(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if not isinstance(kind, str):
            return True
        if kind in RESPONSES_TEXT_DELTAS:
            self._add_output(event.get("delta"), f"{kind}:{event.get('output_index', 0)}")
        elif kind in _RESPONSES_FINAL:
            self.finished = True
            response = event.get("response")
            if isinstance(response, dict):
                usage = response.get("usage")
                if isinstance(usage, dict):
                    self._report(openai_responses_usage(usage, response))
                if kind == "response.failed":
                    self.error = _stream_error(response.get("error"))
        elif kind == "error":
            nested = event.get("error")
            self.error = _stream_error(nested if isinstance(nested, dict) else event)
        return True

    def _anthropic_event(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                delta_type = delta.get("type")
                field = _ANTHROPIC_DELTA_TEXTS.get(delta_type) if isinstance(delta_type, str) else None
                if field is not None:
                    self._add_output(delta.get(field), f"{field}:{event.get('index', 0)}")
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason") is not None:
                self.finished = True
            usage = event.get("usage")
            if isinstance(usage, dict):
                self._message_delta(usage)
        elif kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._message_usage = usage
                started = anthropic_usage(usage, 0)
                if started is not None:  # the prompt is final here; the output is not yet
                    self._prompt = started.prompt_tokens
                    self._cache_read = started.cache_read_tokens
                    self._cache_write = started.cache_write_tokens
                    self._detail = started.detail
        elif kind == "content_block_start":
            block = event.get("content_block")
            if isinstance(block, dict):
                index = event.get("index", 0)
                self._add_output(block.get("name"), f"name:{index}")  # generated, not streamed
                self._add_output(block.get("text"), f"text:{index}")
        elif kind == "error":
            self.error = _stream_error(event.get("error"))
        return True

    def _message_delta(self, usage: dict[str, Any]) -> None:
        output = token_count(usage.get("output_tokens"))
        if output is None:
            return
        # Cumulative counts; input counts repeated here replace message_start's.
        merged = {**self._message_usage, **{key: value for key, value in usage.items() if value is not None}}
        reported = anthropic_usage(merged, output)
        if reported is None:  # no message_start seen: the prompt stays an estimate
            self._completion = output
        else:
            self._report(reported)


def _stream_error(error: object) -> StreamError:
    if not isinstance(error, Mapping):
        return StreamError(error if isinstance(error, str) and error else "upstream error in the stream")
    message = error.get("message")
    kind = error.get("type")
    code = error.get("code")
    return StreamError(
        message if isinstance(message, str) and message else "upstream error in the stream",
        kind if isinstance(kind, str) else None,
        code if isinstance(code, str) else str(code) if isinstance(code, int) else None,
    )
