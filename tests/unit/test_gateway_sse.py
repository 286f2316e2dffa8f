"""The incremental SSE parser (``meterline.gateway.sse``): fields as the WHATWG standard reads them, every
byte kept for forwarding, any chunking giving the same events, and a bound on memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.gateway.sse import SSEEvent, SSEEventTooLarge, SSEParser


def parse_all(chunks: list[bytes], parser: SSEParser | None = None) -> list[SSEEvent]:
    parser = parser or SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events + parser.flush()


# One stream with every line ending, a comment, a multi-line event, a named event, a multi-byte
# character, id/retry fields, a field without a colon, a BOM and a trailing partial event.
TRANSCRIPT = (
    b"\xef\xbb\xbf: OPENROUTER PROCESSING\n\n"
    b'data: {"choices":[{"delta":{"content":"caf\xc3\xa9 \xf0\x9f\xa6\x9c"}}]}\n\n'
    b"event: message_start\r\n"
    b'data: {"type":"message_start"}\r\n\r\n'
    b"id: 7\rretry: 1000\revent: multi\rdata: line one\rdata:line two\rdata\r\r"
    b"data: [DONE]\n\n"
    b"data: partial"
)
EXPECTED = [
    (None, ""),
    (None, '{"choices":[{"delta":{"content":"café 🦜"}}]}'),
    ("message_start", '{"type":"message_start"}'),
    ("multi", "line one\nline two\n"),
    (None, "[DONE]"),
    (None, "partial"),
]


def shape(events: list[SSEEvent]) -> list[tuple[str | None, str]]:
    return [(event.event, event.data) for event in events]


def test_one_chunk() -> None:
    events = parse_all([TRANSCRIPT])
    assert shape(events) == EXPECTED
    assert b"".join(event.raw for event in events) == TRANSCRIPT
    assert events[2].raw == b'event: message_start\r\ndata: {"type":"message_start"}\r\n\r\n'


def test_split_at_every_byte_position_gives_the_same_events() -> None:
    whole = parse_all([TRANSCRIPT])
    for cut in range(len(TRANSCRIPT) + 1):
        assert parse_all([TRANSCRIPT[:cut], TRANSCRIPT[cut:]]) == whole, cut


def test_split_at_every_pair_of_positions_gives_the_same_events() -> None:
    whole = parse_all([TRANSCRIPT])
    size = len(TRANSCRIPT)
    for first in range(0, size + 1, 3):
        for second in range(first, size + 1, 5):
            chunks = [TRANSCRIPT[:first], TRANSCRIPT[first:second], TRANSCRIPT[second:]]
            assert parse_all(chunks) == whole, (first, second)


def test_one_byte_at_a_time() -> None:
    assert parse_all([bytes([byte]) for byte in TRANSCRIPT]) == parse_all([TRANSCRIPT])


def test_events_are_returned_as_soon_as_they_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    (event,) = parser.feed(b"\ndata: b")
    assert (event.raw, event.data) == (b"data: a\n\n", "a")
    assert parser.feed(b"\n") == []
    assert shape(parser.feed(b"\n")) == [(None, "b")]
    assert parser.flush() == []


def test_crlf_split_between_cr_and_lf() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n\r") == []  # the "\r" may still be the start of "\r\n"
    first, second = parser.feed(b"\ndata: y\r\n\r\n")
    assert (first.raw, first.data) == (b"data: x\r\n\r\n", "x")
    assert (second.raw, second.data) == (b"data: y\r\n\r\n", "y")
    assert parser.flush() == []


def test_field_parsing() -> None:
    events = parse_all(
        [
            b"data:no space\n\n"
            b"data:  two spaces\n\n"
            b"data\n\n"
            b"data:\ndata:\n\n"
            b"event:\ndata: e\n\n"
            b"Data: case matters\n\n"
            b"dat: a typo\n\n"
            b"data: a: colon\n\n"
            b"event: first\nevent: second\ndata: x\n\n"
        ]
    )
    assert shape(events) == [
        (None, "no space"),
        (None, " two spaces"),
        (None, ""),
        (None, "\n"),
        ("", "e"),
        (None, ""),
        (None, ""),
        (None, "a: colon"),
        ("second", "x"),
    ]


def test_blank_lines_and_comments_are_events_with_no_data() -> None:
    events = parse_all([b"\n\n: ping\n\n:\n\r\n"])
    assert [event.raw for event in events] == [b"\n", b"\n", b": ping\n\n", b":\n\r\n"]
    assert shape(events) == [(None, "")] * 4


def test_invalid_utf8_is_replaced_not_raised() -> None:
    (event,) = parse_all([b"data: \xff\xfe ok\n\n"])
    assert event.data == "\ufffd\ufffd ok"


def test_multibyte_character_split_across_chunks() -> None:
    text = "Ζεύς 東京 🦜".encode()
    body = b"data: " + text + b"\n\n"
    for cut in range(len(body)):
        (event,) = parse_all([body[:cut], body[cut:]])
        assert event.data == "Ζεύς 東京 🦜"


def test_flush() -> None:
    parser = SSEParser()
    assert parser.flush() == []
    parser.feed(b'data: {"usage": 1}')
    (event,) = parser.flush()
    assert (event.raw, event.data) == (b'data: {"usage": 1}', '{"usage": 1}')
    assert parser.flush() == []
    parser.feed(b"data: x\r")
    (event,) = parser.flush()
    assert (event.raw, event.data) == (b"data: x\r", "x")
    parser.feed(b"data: y\r\r")  # complete, but only known so at the end with bare "\r" endings
    (event,) = parser.flush()
    assert (event.raw, event.data) == (b"data: y\r\r", "y")


def test_an_event_over_the_limit_raises() -> None:
    parser = SSEParser(max_event_bytes=1_000)
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(SSEEventTooLarge, match="limit 1000 bytes"):
        parser.feed(b"x" * 200)


def test_many_events_in_one_chunk_are_not_over_the_limit() -> None:
    parser = SSEParser(max_event_bytes=1_000)
    chunk = b"data: 0123456789\n\n" * 1_000
    assert len(parser.feed(chunk)) == 1_000


def test_a_long_line_in_small_chunks_is_not_rescanned() -> None:
    parser = SSEParser()
    for _ in range(4_000):  # 4 MB in 1 KB chunks; quadratic rescans would take minutes
        assert parser.feed(b"x" * 1_000) == []
    (event,) = parser.feed(b"\n\n")
    assert len(event.raw) == 4_000_002


PIECES = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b"event: ",
        b"id: 1",
        b":",
        b"\n",
        b"\r",
        b"\r\n",
        b"x",
        b"\xc3\xa9",
        b"\xf0\x9f",
        b" ",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(PIECES, max_size=40), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6)
)
def test_any_stream_and_any_chunking_keep_every_byte_and_the_same_events(
    pieces: list[bytes], cuts: list[int]
) -> None:
    body = b"".join(pieces)
    whole = parse_all([body])
    assert b"".join(event.raw for event in whole) == body
    points = sorted({min(cut, len(body)) for cut in cuts})
    chunks = [body[start:end] for start, end in zip([0, *points], [*points, len(body)], strict=True)]
    assert parse_all(chunks) == whole
