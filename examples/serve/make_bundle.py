"""Writes a servable bundle: an open_clip classifier pair at random init, a DaWin fitted on random images, saved.

A real deployment writes the same files from its own checkpoints: ``theta_zs.safetensors`` and
``theta_ft.safetensors`` (``dawin_ext.save_state_dict``), ``model.json`` (architecture, class names) and
``dawin/`` (``DaWin.save`` after ``fit`` on a calibration set).

Run: ``python examples/serve/make_bundle.py OUT_DIR [--arch ViT-B-32]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def make_bundle(out: str | Path, arch: str = "dawin-tiny-vit", n_classes: int = 10, seed: int = 0) -> Path:
    from dawin_ext import save_state_dict
    from dawin_ext.integrations.openclip import CLIPClassifier, create_clip_model, register_tiny_configs
    from dawin_ext.methods.dawin import DaWin

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    register_tiny_configs()
    torch.manual_seed(seed)
    clip, _, tok = create_clip_model(arch)
    classnames = [f"class {i}" for i in range(n_classes)]
    clf = CLIPClassifier.from_clip(clip, tok, classnames, templates="classname").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    zs = {k: v.detach().clone() for k, v in clf.state_dict().items()}
    ft = {
        k: v + 0.3 * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=gen)
        if v.is_floating_point()
        else v.clone()
        for k, v in zs.items()
    }
    size = clf.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    calib = [
        torch.randn(8, 3, size, size, generator=gen) * torch.rand(8, 1, 1, 1, generator=gen).mul(3) for _ in range(4)
    ]
    dawin = DaWin(clf, zs, ft, temperatures=(0.9576, 0.9733), n_clusters=3, seed=1).fit(calib)
    save_state_dict(out / "theta_zs.safetensors", zs)
    save_state_dict(out / "theta_ft.safetensors", ft)
    (out / "model.json").write_text(json.dumps({"arch": arch, "classnames": classnames}, indent=1))
    dawin.save(out / "dawin")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--arch", default="dawin-tiny-vit")
    args = parser.parse_args()
    print(make_bundle(args.out, args.arch))
