"""bpe-openai's public, tiktoken-compatible API: what the gateway's token counts are checked against
(``meterline.gateway.tokens`` counts with the package's compiled tokenizer directly)."""

from __future__ import annotations

import functools
import warnings
from typing import Any


@functools.cache
def encoding(name: str) -> Any:
    with warnings.catch_warnings():
        # bpe-openai reads its tables with importlib.resources.open_binary, deprecated in 3.11 and 3.12:
        # noise about the library's internals, not a failure of these tests.
        warnings.simplefilter("ignore", DeprecationWarning)
        import bpe_openai  # type: ignore[import-untyped, unused-ignore]

        return bpe_openai.get_encoding(name)
