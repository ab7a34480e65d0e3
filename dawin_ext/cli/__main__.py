"""``python -m dawin_ext.cli``: the ``dawin-ext`` command without the installed entry point."""

from __future__ import annotations

from .main import main

raise SystemExit(main())
