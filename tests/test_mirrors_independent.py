"""The plain mirrors import nothing from the code they check.

Tests compare the accelerated path against ``dawin_ext/testing/reference_ops.py`` and
``dawin_ext/testing/reference_methods.py``; a helper shared by both sides (as the AdaWiSE mirror once shared ``make_gp``) would let a bug in it pass on both.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MIRRORS = Path(__file__).resolve().parents[1] / "dawin_ext" / "testing"
# What a mirror may import: the standard library, the numeric libraries, and the other mirror.
ALLOWED_TOP_LEVEL = {"__future__", "collections", "copy", "warnings", "math", "numpy", "scipy", "sklearn"}
ALLOWED_TOP_LEVEL |= {"threadpoolctl", "torch"}
ALLOWED_RELATIVE = {"reference_ops"}


@pytest.mark.parametrize("mirror", ["reference_ops.py", "reference_methods.py"])
def test_mirror_imports_only_libraries_and_mirrors(mirror):
    tree = ast.parse((MIRRORS / mirror).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.module in ALLOWED_RELATIVE, f"{mirror} imports .{node.module} (line {node.lineno})"
        elif isinstance(node, ast.ImportFrom):
            top = node.module.split(".")[0]
            assert top in ALLOWED_TOP_LEVEL, f"{mirror} imports from {node.module} (line {node.lineno})"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                assert top in ALLOWED_TOP_LEVEL, f"{mirror} imports {alias.name} (line {node.lineno})"


def test_adawise_mirror_runs_without_the_package_surrogate(monkeypatch):
    # Break the package's surrogate and acquisition: the mirror must not notice.
    import numpy as np
    import torch

    import dawin_ext.methods.adawise as adawise
    from dawin_ext.testing.reference_methods import adawise_reference

    def broken(*args, **kwargs):
        raise AssertionError("the mirror called dawin_ext.methods.adawise")

    monkeypatch.setattr(adawise, "make_gp", broken)
    monkeypatch.setattr(adawise, "expected_improvement", broken)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    zs = {k: v.clone() for k, v in model.state_dict().items()}
    ft = {k: v + 0.5 for k, v in zs.items()}
    alphas, logits = adawise_reference(model, zs, ft, [torch.randn(6, 4)], n_evals=5, n_init=3)
    assert len(alphas) == 1 and 0.0 <= alphas[0] <= 1.0 and logits[0].shape == (6, 3)
    assert np.isfinite(logits[0].numpy()).all()
