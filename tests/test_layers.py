"""The package's layers import downwards only, and only ``dawin_ext/ops`` names the compiled ops.

Layers, lowest first (README, "Architecture"):

- ``ops``: the compiled ops' wrappers, fakes, autograd rules, the loader and the state-dict checks;
- ``exact``: the per-sample engine (imports ops);
- ``methods``: WiSE-FT, DaWin, multi-task DaWin, AdaWiSE, mixtures, persistence (imports ops, exact);
- ``integrations``: open_clip, Hugging Face CLIP, checkpoints, LoRA/PEFT, fusion_bench (imports the layers below);
- the package root ``dawin_ext/__init__.py``: the public facade (imports the layers above, never cli/testing);
- ``cli``: ``dawin-ext eval|bench|demo`` (imports anything).

``testing`` (the plain-PyTorch mirrors) stands aside: it imports nothing from the package but itself, so a bug
cannot pass by being on both sides of a comparison, and only ``cli`` (the benchmarks) imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dawin_ext"

LAYERS = ("ops", "exact", "methods", "integrations", "api", "cli")
ALLOWED = {layer: set(LAYERS[: i + 1]) for i, layer in enumerate(LAYERS)}
ALLOWED["cli"].add("testing")
ALLOWED["testing"] = {"testing"}


def layer_of(module: str) -> str:
    """``dawin_ext.methods.dawin`` -> ``methods``; the root package and its non-layer modules -> ``api``."""
    parts = module.split(".")
    assert parts[0] == "dawin_ext", module
    if len(parts) > 1 and (parts[1] in ALLOWED or parts[1] == "_C"):
        return "ops" if parts[1] == "_C" else parts[1]
    return "api"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, dawin_ext module) for every import of the package in ``source``, lazy ones included."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dawin_ext"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dawin_ext":
                continue
            if target == "dawin_ext":  # `from dawin_ext import ops` names a layer; `import X` of the root is api
                found += [(node.lineno, f"dawin_ext.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def names_compiled_ops(source: str) -> list[int]:
    """Lines that spell ``torch.ops.dawin_ext``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "dawin_ext"
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ops"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "torch"
        ):
            lines.append(node.lineno)
    return lines


def violations(path: Path, source: str) -> list[str]:
    module = module_name(path)
    layer = layer_of(module)
    out = []
    for line, target in imported_modules(source, module, path.name == "__init__.py"):
        if layer_of(target) not in ALLOWED[layer]:
            out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer} imports {target} ({layer_of(target)})")
    if layer != "ops":
        out += [
            f"{path.relative_to(PACKAGE.parent)}:{line}: names torch.ops.dawin_ext"
            for line in names_compiled_ops(source)
        ]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_layer():
    top_level = {p.name for p in PACKAGE.glob("*.py")}
    assert top_level == {"__init__.py"}, f"modules outside the layer folders: {sorted(top_level - {'__init__.py'})}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(ALLOWED) - {"api"}, folders


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    assert violations(path, path.read_text()) == []


@pytest.mark.parametrize(
    ("where", "source"),
    [
        ("ops/wrappers.py", "from ..methods import dawin"),
        ("ops/wrappers.py", "import dawin_ext.exact.engine"),
        ("exact/transform.py", "def f():\n    from ..methods.blended import BlendedModels"),
        ("methods/dawin.py", "from ..integrations import openclip"),
        ("methods/dawin.py", "from .. import cli"),
        ("integrations/lora.py", "from dawin_ext.cli import bench"),
        ("__init__.py", "from .testing import reference_ops"),
        ("testing/reference_methods.py", "from ..ops import blend"),
        ("methods/wise_ft.py", "from ..testing.reference_ops import interpolation_reference"),
        ("exact/engine.py", "import torch\nop = torch.ops.dawin_ext.blend_"),
    ],
)
def test_the_check_catches_an_upward_import(where, source):
    assert violations(PACKAGE / where, source), f"{where}: {source!r} should be refused"


def test_the_check_allows_downward_imports():
    assert (
        violations(
            PACKAGE / "methods/dawin.py", "from ..ops import blend\nfrom ..exact import X\nfrom . import mixture"
        )
        == []
    )
    assert violations(PACKAGE / "cli/bench.py", "from ..testing.reference_ops import entropy_reference") == []
