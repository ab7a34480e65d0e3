"""Model zoo for the exact per-sample mode: every model against per-sample merging.

The reference merges theta_b = sum_s c[b, s] theta_s for every sample, loads it into a copy of the model and runs the
plain module on that sample alone. All models are tiny, built at random init from configs (no downloads).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed_sources
from torch import nn

from dawin_ext import SampleWiseInterpolator
from dawin_ext.exact import task_vector_coefficients

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")

B = 3


def rows_for(num_sources: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if num_sources == 2:
        lam = torch.rand(B, generator=g) * 1.4 - 0.2  # extrapolation too
        return torch.stack([1 - lam, lam], 1)
    return task_vector_coefficients(torch.rand(B, num_sources - 1, generator=g) * 0.8)


def merged(sources: list[dict], row: torch.Tensor) -> dict:
    out = {}
    for k, v in sources[0].items():
        if v.is_floating_point():
            acc = float(row[0]) * v.double()
            for s in range(1, len(sources)):
                acc = acc + float(row[s]) * sources[s][k].double()
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v
    return out


def run_case(model: nn.Module, inputs: dict, call: Callable, num_sources: int, seed: int = 0, shared=(), **kw):
    """Exact mode vs per-sample merging; ``inputs`` with the batch at dim 0 except the keys in ``shared``."""
    model = model.eval()
    sources = perturbed_sources({k: v.detach().clone() for k, v in model.state_dict().items()}, num_sources, seed)
    rows = rows_for(num_sources, seed + 1)
    sw = SampleWiseInterpolator(model, sources, **kw)
    with torch.no_grad():
        with sw.coefficients(rows):
            got = call(sw.module, **inputs)
        ref = copy.deepcopy(model).eval()
        want = []
        for b in range(B):
            ref.load_state_dict(merged(sources, rows[b]))
            one = {
                k: (v if k in shared or not isinstance(v, torch.Tensor) else v[b : b + 1]) for k, v in inputs.items()
            }
            want.append(call(ref, **one))
        want = torch.cat(want)
        base = call(model, **inputs)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err}"
    assert (base.float() - want.float()).abs().max().item() > 1e-3, "the sources do not change the output"
    return sw


def img(c=3, size=32, seed=0):
    return torch.randn(B, c, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# the zoo
# ---------------------------------------------------------------------------------------------------------------
def timm_model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kw)


TIMM = {
    "vit": lambda: timm_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, init_values=0.5
    ),
    "deit": lambda: timm_model(
        "deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2
    ),
    "convnext": lambda: timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), ls_init_value=0.5),
    "resnet": lambda: timm_model("resnet18", layers=(1, 1, 1, 1)),
    "mobilenetv3": lambda: timm_model("mobilenetv3_small_050"),
}


@pytest.mark.parametrize("num_sources", [2, 4])
@pytest.mark.parametrize("name", list(TIMM))
def test_timm(name, num_sources):
    size = 64 if name in ("resnet", "mobilenetv3", "convnext") else 32
    run_case(TIMM[name](), {"x": img(size=size)}, lambda m, x: m(x), num_sources)


def hf_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    return CLIPModel(cfg)


def test_transformers_clip_vision_model():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    model = CLIPVisionModel(cfg)
    for s in (2, 4):
        run_case(model, {"pixel_values": img()}, lambda m, pixel_values: m(pixel_values=pixel_values).pooler_output, s)
        run_case(model, {"pixel_values": img()}, lambda m, pixel_values: m(pixel_values).last_hidden_state, s)


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("num_sources", [2, 4])
def test_transformers_clip_model_image_and_text_features(num_sources):
    model = hf_clip()
    run_case(
        model,
        {"pixel_values": img()},
        lambda m, pixel_values: _features(m.get_image_features(pixel_values=pixel_values)),
        num_sources,
    )
    ids = torch.randint(1, 59, (B, 10), generator=torch.Generator().manual_seed(3))
    # Every row padded: transformers branches in Python on the mask (fast_all(mask)); the engine follows a branch
    # that every sample takes, and refuses one that differs between samples (tested below).
    mask = torch.ones(B, 10, dtype=torch.long)
    mask[:, 8:] = 0
    mask[0, 6:] = 0
    run_case(
        model,
        {"input_ids": ids, "attention_mask": mask},
        lambda m, input_ids, attention_mask: _features(
            m.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        ),
        num_sources,
    )


def test_control_flow_that_differs_between_samples_is_refused():
    from dawin_ext.exact import DataDependentControlFlowError

    model = hf_clip()
    sources = perturbed_sources(model.state_dict(), 2, 0)
    sw = SampleWiseInterpolator(model, sources)
    ids = torch.randint(1, 59, (B, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, 10, dtype=torch.long)
    mask[0, 7:] = 0  # only row 0 padded: transformers' `if fast_all(mask)` differs between samples
    with (
        pytest.raises(DataDependentControlFlowError, match=r"Tensor.__bool__.*masking_utils.py"),
        torch.no_grad(),
        sw.coefficients(rows_for(2, 1)),
    ):
        sw.module.get_text_features(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("num_sources", [2, 4])
def test_torch_transformer_encoder_and_decoder_with_masks(num_sources):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, 6, 16, generator=g)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    pad = torch.zeros(B, 6, dtype=torch.bool)
    pad[1, 4:] = True
    run_case(
        enc,
        {"src": x, "mask": causal, "src_key_padding_mask": pad},
        lambda m, src, mask, src_key_padding_mask: m(src, mask=mask, src_key_padding_mask=src_key_padding_mask),
        num_sources,
        shared=("mask",),
    )
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
    memory = torch.randn(B, 5, 16, generator=g)
    run_case(
        dec,
        {"tgt": x, "memory": memory, "tgt_mask": causal, "memory_key_padding_mask": pad[:, :5]},
        lambda m, tgt, memory, tgt_mask, memory_key_padding_mask: m(
            tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_key_padding_mask
        ),
        num_sources,
        shared=("tgt_mask",),
    )


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c1g = nn.Conv1d(8, 8, 3, groups=8, padding="same", bias=False)
        self.c2 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2g = nn.Conv2d(8, 8, 3, groups=2, padding=1, padding_mode="reflect")
        self.c3 = nn.Conv3d(2, 4, 3, padding=1, dilation=1)
        self.c3d = nn.Conv3d(4, 4, 3, groups=4, padding=2, dilation=2)
        self.head = nn.Linear(8 + 8 + 4, 5)

    def forward(self, seq, image, volume):
        a = self.c1g(F.relu(self.c1(seq))).mean(-1)
        b = self.c2g(F.relu(self.c2(image))).mean((-1, -2))
        c = self.c3d(F.relu(self.c3(volume))).mean((-1, -2, -3))
        return self.head(torch.cat([a, b, c], 1))


@pytest.mark.parametrize("num_sources", [2, 4])
def test_conv1d_conv2d_conv3d(num_sources):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    inputs = {
        "seq": torch.randn(B, 3, 12, generator=g),
        "image": torch.randn(B, 3, 10, 10, generator=g),
        "volume": torch.randn(B, 2, 5, 5, 5, generator=g),
    }
    run_case(Convs(), inputs, lambda m, **kw: m(**kw), num_sources)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(6, 8, num_layers=2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("num_sources", [2, 4])
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_gru_and_lstm(cell, num_sources):
    torch.manual_seed(0)
    x = torch.randn(B, 7, 6, generator=torch.Generator().manual_seed(6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the recurrent op has no batching rule: a warned per-sample loop
        run_case(Recurrent(cell), {"x": x}, lambda m, x: m(x), num_sources)


def open_clip_vit():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)


def open_clip_resnet():
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(0)
    return ModifiedResNet(layers=[1, 1, 1, 1], output_dim=16, heads=2, image_size=64, width=8)


@pytest.mark.parametrize("num_sources", [2, 4])
@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_open_clip_towers(tower, num_sources):
    model = open_clip_vit() if tower == "vit" else open_clip_resnet()
    run_case(model, {"x": img(size=32 if tower == "vit" else 64)}, lambda m, x: m(x), num_sources)


def test_open_clip_full_model_methods_and_logit_scale():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip = CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=8, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=12, vocab_size=50, width=32, heads=4, layers=2),
    )
    tokens = torch.randint(1, 50, (B, 12), generator=torch.Generator().manual_seed(7))
    run_case(clip, {"image": img()}, lambda m, image: m.encode_image(image), 2)
    run_case(clip, {"text": tokens}, lambda m, text: m.encode_text(text), 4)
    # logit_scale differs between sources and enters through exp(): exact per sample
    run_case(clip, {"image": img(), "text": tokens}, lambda m, image, text: m(image, text)[2].reshape(-1, 1), 2)


# ---------------------------------------------------------------------------------------------------------------
# dtypes, memory rule, refusals
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_vit(dtype):
    model = TIMM["vit"]().to(dtype).eval()
    sources = perturbed_sources(model.state_dict(), 2, 0)
    rows = rows_for(2, 1)
    x = img().to(dtype)
    sw = SampleWiseInterpolator(model, sources)
    with torch.no_grad():
        got = sw(x, rows).float()
        ref = copy.deepcopy(model)
        want = []
        for b in range(B):
            ref.load_state_dict(merged(sources, rows[b]))
            want.append(ref(x[b : b + 1]).float())
        want = torch.cat(want)
    tol = 0.05 if dtype == torch.bfloat16 else 0.01  # a few units in the last place of the logits' magnitude
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


# ---------------------------------------------------------------------------------------------------------------
# DaWin.predict(mode="exact") and the multi-task exact mode on a timm ViT and a transformers CLIP model
# ---------------------------------------------------------------------------------------------------------------
class HFImageClassifier(nn.Module):
    """transformers CLIPModel image features + a linear head (or the features alone with head=None)."""

    def __init__(self, clip: nn.Module, num_classes: int | None) -> None:
        super().__init__()
        self.clip = clip
        self.head = nn.Linear(16, num_classes) if num_classes else None

    def forward(self, x):
        f = _features(self.clip.get_image_features(pixel_values=x))
        return self.head(f) if self.head is not None else f


def _classifier(kind: str, num_classes: int | None) -> nn.Module:
    if kind == "timm-vit":
        torch.manual_seed(0)
        return timm.create_model(
            "vit_tiny_patch16_224", pretrained=False, num_classes=num_classes or 0, img_size=32, patch_size=8,
            depth=2, embed_dim=32, num_heads=2,
        ).eval()  # fmt: skip
    return HFImageClassifier(hf_clip(), num_classes).eval()


@pytest.mark.parametrize("kind", ["timm-vit", "hf-clip"])
def test_dawin_exact_predict(kind):
    from dawin_ext import DaWin
    from dawin_ext.testing.reference_ops import interpolation_reference

    model = _classifier(kind, 5)
    zs = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ft = perturbed_sources(zs, 2, 11, rel=0.5)[1]
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    dw = DaWin(model, zs, ft).fit([x[:6], x[6:]])
    out = dw.predict(x[:6], mode="exact")
    lam = dw.coefficients(x[:6])
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        for i in range(6):
            ref.load_state_dict(interpolation_reference(float(lam[i]), zs, ft))
            torch.testing.assert_close(out[i], ref(x[i : i + 1])[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["timm-vit", "hf-clip"])
def test_multitask_exact_predict(kind):
    from dawin_ext import DaWinMultiTask

    base = _classifier(kind, None)
    theta_0 = {k: v.detach().clone() for k, v in base.state_dict().items()}
    thetas = perturbed_sources(theta_0, 3, 12, rel=0.5)[1:]
    torch.manual_seed(1)
    dim = 32 if kind == "timm-vit" else 16
    head = nn.Linear(dim, 4)
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    mt = DaWinMultiTask(base, theta_0, thetas, head=head, n_clusters=2).fit([x])
    out = mt.predict(x[:5], mode="exact")
    pi = mt.coefficients(x[:5])
    ref = copy.deepcopy(base).eval()
    with torch.no_grad():
        for i in range(5):
            scales = [mt.multiplier * float(p) for p in pi[i]]
            row = torch.tensor([1.0 - sum(scales), *scales], dtype=torch.float64)
            ref.load_state_dict(merged([theta_0, *thetas], row))
            torch.testing.assert_close(out[i], head(ref(x[i : i + 1]))[0], rtol=1e-4, atol=1e-4)
