"""The ``meterline`` command."""

from meterline.cli.main import app, main

__all__ = ["app", "main"]
