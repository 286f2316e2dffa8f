"""An incremental Server-Sent Events parser that keeps every byte (WHATWG HTML, "event stream").

The gateway passes a stream through unchanged, so each ``SSEEvent`` carries the exact bytes it came
from (``raw``, its terminating blank line included): forwarding the ``raw`` of every event returned
by ``feed`` and ``flush``, in order, reproduces the upstream's bytes exactly. That is why blocks
the standard would not dispatch (comments only, e.g. keep-alives; stray blank lines) are returned
too, as events with no data.

Lines end with ``\\r\\n``, ``\\n`` or ``\\r``, and a chunk may end anywhere, even inside a
multi-byte UTF-8 character or between the ``\\r`` and ``\\n`` of one line ending: only complete
lines are decoded. Memory is bounded: an event that grows past ``max_event_bytes`` without ending
raises ``SSEEventTooLarge`` (the gateway ends the stream rather than buffer without limit).
"""

from __future__ import annotations

import re
from typing import NamedTuple

DEFAULT_MAX_EVENT_BYTES = 8 * 1024 * 1024

_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEEvent(NamedTuple):
    """One event block. ``event`` is its ``event:`` field (None when absent; the standard's default
    type is "message"); ``data`` joins its ``data:`` lines with "\\n" ("" when it has none).

    A NamedTuple: one is made per upstream event on the hot path, and a frozen dataclass costs an
    ``object.__setattr__`` per field."""

    raw: bytes
    event: str | None
    data: str


class SSEEventTooLarge(ValueError):
    """An upstream event exceeded the parser's size limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a server-sent event grew to {size} bytes without ending (limit {limit} bytes)")
        self.size = size
        self.limit = limit


class SSEParser:
    """Feed it the response body chunk by chunk; call ``flush`` once at the end of the body."""

    __slots__ = (
        "_buffer",
        "_carriage_returns",
        "_data",
        "_event",
        "_limit",
        "_scan",
        "_searched",
        "_started",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._limit = max_event_bytes
        self._buffer = bytearray()  # the unfinished event's bytes (its lines so far, then a partial line)
        self._scan = 0  # where the next unparsed line starts in _buffer
        # _buffer[:_searched] holds no line end after _scan: a long line arriving in many chunks is
        # searched once, not once per chunk.
        self._searched = 0
        self._event: str | None = None
        self._data: list[str] = []
        self._started = False  # past the stream's first line (where a byte order mark may be)
        # Upstreams end lines with "\n"; until a "\r" is seen, lines are found with bytearray.find,
        # several times faster than the regular expression that handles all three line endings.
        self._carriage_returns = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``, in order (often none, sometimes many)."""
        buffer = self._buffer
        buffer += chunk
        if not self._carriage_returns and b"\r" in chunk:
            self._carriage_returns = True
        carriage_returns = self._carriage_returns
        events: list[SSEEvent] = []
        size = len(buffer)
        start = 0  # where the current event begins in buffer
        scan = self._scan
        searched = max(scan, self._searched)
        while True:
            if carriage_returns:
                match = _LINE_END.search(buffer, searched)
                if match is None:
                    searched = size
                    break
                line_end, end = match.span()
                if end == size and buffer[end - 1] == 0x0D:  # a "\r" that may be half of "\r\n": wait
                    searched = line_end
                    break
            else:
                line_end = buffer.find(b"\n", searched)
                if line_end < 0:
                    searched = size
                    break
                end = line_end + 1
            if line_end == scan:  # a blank line ends the event
                data = self._data
                events.append(
                    SSEEvent(
                        bytes(buffer[start:end]), self._event, data[0] if len(data) == 1 else "\n".join(data)
                    )
                )
                self._event = None
                self._data = []
                start = end
            else:
                self._field(buffer, scan, line_end)
            scan = searched = end
        if start:
            del buffer[:start]
        self._scan = scan - start
        self._searched = searched - start
        if len(buffer) > self._limit:
            raise SSEEventTooLarge(len(buffer), self._limit)
        return events

    def flush(self) -> list[SSEEvent]:
        """At the end of the body: the unfinished event, if any bytes are left, as a last event.

        (With bare "\r" line endings an event ending the body is only known complete here.)"""
        buffer = self._buffer
        if not buffer:
            return []
        end = len(buffer)
        if buffer.endswith(b"\r"):
            end -= 1
        if self._scan < end:
            self._field(buffer, self._scan, end)
        event = SSEEvent(bytes(buffer), self._event, "\n".join(self._data))
        self._buffer = bytearray()
        self._scan = self._searched = 0
        self._event = None
        self._data = []
        return [event]

    def _field(self, buffer: bytearray, begin: int, end: int) -> None:
        """The line ``buffer[begin:end]``: slices are decoded in place, without copying the line first."""
        if not self._started:
            self._started = True
            if buffer.startswith(_BOM, begin, end):
                begin += len(_BOM)
        colon = buffer.find(b":", begin, end)
        if colon == begin:  # a comment
            return
        if colon < 0:
            name_end = value_start = end
        else:
            name_end, value_start = colon, colon + 1
            if value_start < end and buffer[value_start] == 0x20:
                value_start += 1
        name_size = name_end - begin
        if name_size == 4 and buffer.startswith(b"data", begin):
            self._data.append(buffer[value_start:end].decode("utf-8", "replace"))
        elif name_size == 5 and buffer.startswith(b"event", begin):
            self._event = buffer[value_start:end].decode("utf-8", "replace")
        # id and retry concern a reconnecting client, which sees them in ``raw``; others are ignored.
