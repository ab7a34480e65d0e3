"""Integrations of dawin-ext with other frameworks, each in its own module with its own optional dependency.

- :mod:`dawin_ext.integrations.fusion_bench`: WiSE-FT, DaWin and multi-task DaWin as fusion_bench algorithms
  (``pip install 'dawin-ext[fusion_bench]'``).

Nothing here is imported by ``import dawin_ext``.
"""
