"""Audio durations for transcriptions (``meterline.gateway.audio``): exact for WAV, unknown otherwise,
never an exception."""

from __future__ import annotations

import io
import struct
import wave
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterline.gateway.audio import audio_seconds


def wav(frames: int, rate: int = 16_000, channels: int = 1, width: int = 2) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(b"\x01" * (frames * channels * width))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("frames", "rate", "channels", "width", "expected"),
    [
        (16_000, 16_000, 1, 2, "1.000"),
        (24_000, 16_000, 1, 2, "1.500"),
        (44_100 * 3, 44_100, 2, 2, "3.000"),
        (1, 44_100, 1, 2, "0.001"),  # 22.7 µs rounds up to a millisecond
        (44_101, 44_100, 1, 1, "1.001"),  # 1.0000227 s rounds up
        (8_000 * 61, 8_000, 1, 3, "61.000"),
        (0, 16_000, 1, 2, "0.000"),
        (22_050, 22_050, 6, 4, "1.000"),
    ],
)
def test_wav_duration_is_exact(frames: int, rate: int, channels: int, width: int, expected: str) -> None:
    seconds = audio_seconds("speech.wav", "audio/wav", wav(frames, rate, channels, width))
    assert seconds == Decimal(expected)
    assert str(seconds) == expected  # milliseconds, as the ledger keeps them


def test_the_bytes_decide_not_the_name() -> None:
    data = wav(8_000, 8_000)
    assert audio_seconds("speech.mp3", "audio/mpeg", data) == Decimal("1.000")
    assert audio_seconds(None, None, data) == Decimal("1.000")
    assert audio_seconds("speech.wav", "audio/wav", b"ID3\x04\x00" + b"\x00" * 100) is None


def test_a_truncated_or_streamed_wav_is_billed_for_what_it_holds() -> None:
    data = wav(16_000)  # 1 s of 16-bit mono
    assert audio_seconds(None, None, data[:-16_000]) == Decimal("0.500")
    # A streaming encoder writes 0xFFFFFFFF as the data size (unknown length): not 37 hours.
    streamed = data.replace(b"data" + struct.pack("<I", 32_000), b"data" + struct.pack("<I", 0xFFFFFFFF))
    assert streamed != data
    assert audio_seconds(None, None, streamed) == Decimal("1.000")


def test_float_wav_is_unknown_with_this_python() -> None:
    data = bytearray(wav(16_000, width=4))
    data[20:22] = struct.pack("<H", 3)  # WAVE_FORMAT_IEEE_FLOAT, which the wave module does not read
    assert audio_seconds(None, None, bytes(data)) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RIFF",
        b"RIFF\x00\x00\x00\x00WAVE",
        b"RIFF\xff\xff\xff\xffWAVEfmt \x10\x00\x00\x00",
        b"RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00"
        b"\x01\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x10\x00data",
        b"OggS\x00\x02" + b"\x00" * 50,
        b"fLaC" + b"\x00" * 50,
        b"\x00" * 1_000,
    ],
)
def test_garbage_is_unknown(data: bytes) -> None:
    assert audio_seconds("x.wav", "audio/wav", data) is None


def test_a_zero_sample_rate_is_unknown() -> None:
    data = bytearray(wav(100))
    data[24:28] = struct.pack("<I", 0)
    assert audio_seconds(None, None, bytes(data)) is None


@settings(max_examples=500, deadline=None)
@given(
    frames=st.integers(0, 200),
    edits=st.lists(st.tuples(st.integers(0, 500), st.integers(0, 255)), max_size=6),
    keep=st.integers(0, 1_000),
)
def test_corrupted_wavs_never_raise(frames: int, edits: list[tuple[int, int]], keep: int) -> None:
    data = bytearray(wav(frames, rate=8_000, channels=2))
    for position, value in edits:
        if position < len(data):
            data[position] = value
    seconds = audio_seconds(None, None, bytes(data[:keep]))
    assert seconds is None or seconds >= 0
