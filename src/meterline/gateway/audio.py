"""Duration of an uploaded audio file, for transcriptions billed per audio second (SPEC §3).

Only WAV (PCM) is read, with the stdlib ``wave`` module: its duration is exact arithmetic on the
header (frames / sample rate), no decoder needed. Compressed formats (mp3, m4a, ogg, webm, flac)
would need a decoder; for them this answers None and the gateway relies on the duration the
upstream reports (``usage.type == "duration"``). Garbage never raises: it is "unknown" (None).
"""

from __future__ import annotations

import io
import struct
import wave
from decimal import Decimal

_MILLIS_PER_SECOND = 1000


def audio_seconds(filename: str | None, content_type: str | None, data: bytes) -> Decimal | None:
    """Seconds of audio in ``data``, rounded UP to the millisecond (``Decimal("1.501")``); None: unknown.

    The bytes decide, not the name or the declared type (clients mislabel uploads); ``filename`` and
    ``content_type`` are accepted so that other formats can be recognised by them later.
    """
    del filename, content_type
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    stream = io.BytesIO(data)
    try:
        with wave.open(stream, "rb") as wav:
            rate = wav.getframerate()
            frame_size = wav.getsampwidth() * wav.getnchannels()
            declared = wav.getnframes()
            # wave stops at the start of the data chunk's samples: what follows is what was sent. A
            # streamed or truncated file declares more (often 0xFFFFFFFF) than it holds; bill what it holds.
            present = (len(data) - stream.tell()) // frame_size if frame_size > 0 else 0
    # What ``wave`` raises on malformed headers; RuntimeError comes from its chunk reader seeking past
    # the end of a chunk whose declared size is a lie.
    except (wave.Error, EOFError, struct.error, ValueError, OverflowError, RuntimeError):
        return None
    if rate <= 0:
        return None
    frames = max(0, min(declared, present))
    millis = -(-frames * _MILLIS_PER_SECOND // rate)  # ceiling division: exact integers, no float
    return Decimal(millis).scaleb(-3)
