"""The ``dawin-ext`` command line (``eval``, ``bench``, ``demo``): the top layer, which nothing else imports."""

from __future__ import annotations

from .main import build_parser, main

__all__ = ["build_parser", "main"]
