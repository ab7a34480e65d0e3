"""Hydra configs of dawin-ext's fusion_bench methods; add ``pkg://dawin_ext.integrations.fusion_bench_config`` to
``hydra.searchpath`` (a package so that Hydra's ``pkg://`` source can find it)."""
