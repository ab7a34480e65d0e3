"""`dawin-ext bench`: the rows are real measurements with the documented keys, and the CLI prints them.

Only the structure is checked here: timings belong to the benchmarks, never to assertions in tests.
"""

from __future__ import annotations

import math

import torch

from dawin_ext import cli
from dawin_ext.cli.bench import format_table, pipeline_rows


def test_pipeline_rows_on_the_tiny_vit() -> None:
    rows = pipeline_rows(torch.device("cpu"), quick=True, repeats=1)
    assert [r["op"] for r in rows] == ["forward", "dawin cluster", "dawin exact", "dawin exact"]
    for r in rows:
        assert r["ours_s"] > 0 and math.isfinite(r["ours_s"])
    for r in rows[1:]:
        assert r["reference_s"] > 0
        assert r["speedup"] == r["reference_s"] / r["ours_s"]
        assert "x plain forward" in r["reference"]
    table = format_table(rows)
    assert "dawin exact" in table and "per-sample merge" in table


def test_bench_cli_writes_json(tmp_path, monkeypatch) -> None:
    import dawin_ext.cli.bench as bench

    # The CLI path with the heavy kernel rows swapped for one cheap real row.
    def few_rows(device, quick=False, repeats=None):
        return bench.entropy_rows(torch.device(device), True, 1, None)[:1]

    monkeypatch.setattr(bench, "kernel_rows", few_rows)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--json", str(out)]) == 0
    import json

    data = json.loads(out.read_text())
    assert data["quick"] is True and data["rows"][0]["op"] == "softmax_entropy"
    assert data["environment"]["dawin_ext"]["version"]


def test_samplewise_depthwise_row() -> None:
    import dawin_ext.cli.bench as bench

    (row,) = bench.samplewise_depthwise_rows(torch.device("cpu"), True, 1)
    assert row["op"] == "samplewise_dw" and "C=40 16x16" in row["case"]
    assert row["ours_s"] > 0 and row["reference_s"] > 0 and "one plain depthwise conv" in row["reference"]
