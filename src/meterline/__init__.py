"""Meterline: self-hosted usage metering, quotas, credits and cost tracking for LLM APIs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("meterline")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"

__all__ = ["__version__"]
