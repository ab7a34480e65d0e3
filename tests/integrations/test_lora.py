"""LoRA adapters as sources: the samplewise_lora op against float64, and the low-rank exact engine against merging
each sample's weights (torch model with nn.MultiheadAttention, open_clip tiny ViT, timm tiny ViT, DaWin exact mode).

Every model is random-init; adapters are created with peft at random init (PEFT sets B = 0, so B is perturbed) and
saved with save_pretrained to tmp_path.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, FLOAT_DTYPES
from torch import nn

from dawin_ext.ops import samplewise_lora, samplewise_lora_factors

peft = pytest.importorskip("peft")

from dawin_ext.exact import (  # noqa: E402
    SampleWiseInterpolator,
    UnsupportedParameterError,
    task_vector_coefficients,
)
from dawin_ext.integrations import lora  # noqa: E402

# fp32: two GEMMs and a scaling in fp32. fp16/bf16: the shrink h is rounded to the dtype before the expand.
TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 6e-2, "rtol": 4e-2},
}


# ------------------------------------------------------------------------------------------------- the op
def reference64(x, a, b, c, w=None, bias=None):
    """Per sample: F.linear with the merged float64 weight ``W + sum_s c[b, s] B_s A_s``."""
    x, a, b, c = x.double().cpu(), a.double().cpu(), b.double().cpu(), c.double().cpu()
    n_out, n_in = b.shape[1], a.shape[2]
    w = torch.zeros(n_out, n_in, dtype=torch.float64) if w is None else w.double().cpu()
    bias = None if bias is None else bias.double().cpu()
    outs = [F.linear(x[i], w + torch.einsum("s,sor,sri->oi", c[i], b, a), bias) for i in range(x.shape[0])]
    return torch.stack(outs) if outs else torch.empty(*x.shape[:-1], n_out, dtype=torch.float64)


def make(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


# (B, middle dims, IN, OUT, R, S): B=1, L=1, no middle dim ([B, IN]), R=1, IN/OUT not multiples of 8, several dims,
# several adapters, an empty batch.
SHAPES = [
    (1, (1,), 1, 1, 1, 1),
    (1, (), 7, 5, 1, 1),
    (3, (5,), 13, 11, 2, 2),
    (2, (50,), 77, 129, 16, 1),
    (4, (2, 3), 33, 17, 3, 3),
    (2, (9,), 768, 100, 4, 2),
    (0, (3,), 8, 5, 2, 2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-M{s[1]}-IN{s[2]}-OUT{s[3]}-R{s[4]}-S{s[5]}")
@pytest.mark.parametrize("base", ["weight+bias", "weight", "bias", "none"])
def test_op_matches_float64(device, dtype, shape, base):
    bsz, mid, n_in, n_out, r, s = shape
    x = make((bsz, *mid, n_in), dtype, device)
    a = make((s, r, n_in), dtype, device, scale=n_in**-0.5)
    b = make((s, n_out, r), dtype, device, scale=r**-0.5)
    w = make((n_out, n_in), dtype, device, scale=n_in**-0.5) if "weight" in base else None
    bias = make((n_out,), dtype, device) if "bias" in base else None
    c = torch.randn(bsz, s, dtype=torch.float64).float().to(device)
    inputs = [t for t in (x, a, b, c, w, bias) if t is not None]
    before = [t.clone() for t in inputs]
    with torch.no_grad():
        got = samplewise_lora(x, a, b, c, w, bias)
    for t, t0 in zip(inputs, before, strict=True):
        assert torch.equal(t, t0), "samplewise_lora modified an input"
    assert got.dtype == dtype and got.shape == (bsz, *mid, n_out) and got.device == x.device
    torch.testing.assert_close(got.cpu().double(), reference64(x, a, b, c, w, bias), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_op_layouts_and_coefficient_dtypes(device):
    """The [S, R, OUT] storage of samplewise_lora_factors, a plain [S, OUT, R] B, a strided input and float64
    coefficients give the same numbers; the caller's tensors are not modified."""
    x = make((3, 11, 40, 2), torch.float32, device)[..., 0]  # strided along IN
    a_list = [make((4, 40), torch.float32, device) for _ in range(2)]
    b_list = [make((24, 4), torch.float32, device) for _ in range(2)]
    a, b_fast = samplewise_lora_factors(a_list, b_list)
    assert b_fast.shape == (2, 24, 4) and b_fast.transpose(1, 2).is_contiguous()
    b_plain = torch.stack(b_list)
    c = torch.tensor([[0.3, 0.7], [1.0, 0.0], [-0.5, 1.5]], dtype=torch.float64, device=device)
    before = [t.clone() for t in (x, a, b_plain, c)]
    with torch.no_grad():
        fast = samplewise_lora(x, a, b_fast, c)
        plain = samplewise_lora(x, a, b_plain, c)
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.cpu().double(), reference64(x, a, b_plain, c), rtol=2e-5, atol=2e-5)
    for t, t0 in zip((x, a, b_plain, c), before, strict=True):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("rows", [1, 5, 6, 50])
def test_op_base_weight_layouts(rows):
    """A base weight stored [IN, OUT] (the engine's layout: the fp32 CPU brgemm base GEMM from 6 rows per sample)
    and a plain [OUT, IN] one (at::mm) give the same numbers, with and without bias."""
    x = make((3, rows, 70), torch.float32, "cpu")
    a, b = samplewise_lora_factors([make((5, 70), torch.float32, "cpu")], [make((90, 5), torch.float32, "cpu")])
    w = make((90, 70), torch.float32, "cpu", scale=0.1)
    fast = w.t().contiguous().t()
    bias = make((90,), torch.float32, "cpu")
    c = torch.rand(3, 1)
    for bs in (bias, None):
        with torch.no_grad():
            got_fast = samplewise_lora(x, a, b, c, fast, bs)
            got_plain = samplewise_lora(x, a, b, c, w, bs)
        ref = reference64(x, a, b, c, w, bs)
        torch.testing.assert_close(got_fast.double(), ref, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(got_plain.double(), ref, rtol=2e-5, atol=2e-5)


def test_op_argument_errors():
    x, a, b, c = torch.randn(2, 3, 8), torch.randn(1, 2, 8), torch.randn(1, 5, 2), torch.rand(2, 1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="lora_a has in_features 7"):
            samplewise_lora(x, torch.randn(1, 2, 7), b, c)
        with pytest.raises(ValueError, match="lora_b shape"):
            samplewise_lora(x, a, torch.randn(1, 5, 3), c)
        with pytest.raises(ValueError, match=r"coefficients must be \[B, S\] = \[2, 1\]"):
            samplewise_lora(x, a, b, torch.rand(3, 1))
        with pytest.raises(ValueError, match="weight must be"):
            samplewise_lora(x, a, b, c, torch.randn(5, 9))
        with pytest.raises(TypeError, match="lora_a are"):
            samplewise_lora(x, a.double(), b, c)
    with pytest.raises(RuntimeError, match="no backward"):
        samplewise_lora(x.requires_grad_(), a, b, c)
    with pytest.raises(ValueError, match="rank"):
        samplewise_lora_factors([torch.randn(2, 8)], [torch.randn(5, 3)])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(2, 3, 40, device=device)
    a, b = samplewise_lora_factors(
        list(torch.randn(2, 4, 40, device=device)), list(torch.randn(2, 24, 4, device=device))
    )
    c = torch.rand(2, 2, device=device)
    op = torch.ops.dawin_ext.samplewise_lora.default
    torch.library.opcheck(op, (x, a, b, c, torch.randn(24, 40, device=device), torch.randn(24, device=device)))
    torch.library.opcheck(op, (x.bfloat16(), a.bfloat16(), b.bfloat16(), c, None, None))
    torch.library.opcheck(op, (x[:, 0], a, b, c))


# -------------------------------------------------------------------------------------------- adapters
def save_adapter(base: nn.Module, path, targets, seed: int, r: int = 4, **config) -> None:
    """A PEFT LoRA adapter for ``base`` at random init with B perturbed (PEFT starts B at zero)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **config)
    )
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path))


def merge_loop(base: nn.Module, sources: lora.LoraSources, rows: torch.Tensor, call) -> torch.Tensor:
    """The reference: for each sample, merge its weights (float64, rounded once) into a copy and run it alone."""
    sds = [sources.merged_state_dict(s) for s in range(sources.num_sources)]
    outs = []
    for b in range(rows.shape[0]):
        m = copy.deepcopy(base).eval()
        c = rows[b].double()
        m.load_state_dict(
            {k: sum(c[s] * sds[s][k].double() for s in range(len(sds))).to(v.dtype) for k, v in sds[0].items()}
        )
        with torch.no_grad():
            outs.append(call(m, b))
    return torch.cat(outs)


class AttnNet(nn.Module):
    """nn.Linear + nn.MultiheadAttention (self-attention: packed in_proj; cross: chunked in_proj) + nn.Linear."""

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.cross = cross
        self.inp = nn.Linear(13, 12)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = self.inp(x)
        k = h.flip(1) if self.cross else h  # a different key tensor takes MHA's chunked in_proj path
        h = self.attn(h, k, k if self.cross else h, need_weights=False)[0]
        return self.head(h).mean(1)


@pytest.mark.parametrize("cross", [False, True], ids=["self-attention", "cross-attention"])
def test_torch_model_exact_two_adapters(tmp_path, cross):
    """Two adapters of different rank (one rsLoRA) on Linear + MHA: equal to merging each sample's weights."""
    torch.manual_seed(0)
    net = AttnNet(cross).eval()
    save_adapter(net, tmp_path / "a1", ["inp", "attn", "head"], seed=1, r=4)
    save_adapter(net, tmp_path / "a2", ["inp", "head"], seed=2, r=2, use_rslora=True)
    sources = lora.load_lora_sources(net, [tmp_path / "a1", tmp_path / "a2"])
    assert set(sources.factors) == {"inp.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"}
    scales = {src: sc for src, _, _, sc in sources.factors["inp.weight"]}
    assert scales == pytest.approx({1: 2.0, 2: 4 / 2**0.5})
    swi = sources.interpolator(strict=True)
    x = torch.randn(5, 7, 13)
    rows = torch.cat([torch.softmax(torch.randn(4, 3), 1), torch.tensor([[1.0, 0.0, 0.0]])])
    got = swi(x, rows)
    ref = merge_loop(net, sources, rows, lambda m, b: m(x[b : b + 1]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert swi.last_materialized == []  # every adapted weight went through the op (or a low-rank view)
    # the full-weight engine over the merged state dicts agrees too
    full = SampleWiseInterpolator(net, [sources.merged_state_dict(s) for s in range(3)])
    torch.testing.assert_close(got, full(x, rows), rtol=1e-4, atol=1e-4)


def test_multi_task_rows_and_caller_untouched(tmp_path):
    """Task-arithmetic rows over several adapters on one base; base and the adapter files are not modified."""
    torch.manual_seed(0)
    net = AttnNet().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    dirs = []
    for t in range(3):
        save_adapter(net, tmp_path / f"t{t}", ["inp", "attn", "head"], seed=10 + t, r=3)
        dirs.append(tmp_path / f"t{t}")
    sources = lora.load_lora_sources(net, dirs)
    swi = sources.interpolator()
    x = torch.randn(4, 6, 13)
    rows = task_vector_coefficients(0.6 * torch.rand(4, 3))
    got = swi(x, rows)
    torch.testing.assert_close(got, merge_loop(net, sources, rows, lambda m, b: m(x[b : b + 1])), rtol=1e-4, atol=1e-4)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in net.modules())

    # Multi-task DaWin with the adapters as task vectors: its exact mode through the low-rank engine equals the
    # full-weight engine over the merged state dicts.
    from dawin_ext import DaWinMultiTask

    xs = torch.randn(12, 6, 13)
    merged = [sources.merged_state_dict(s) for s in range(4)]
    mt = DaWinMultiTask(net, merged[0], merged[1:], n_clusters=2, seed=0).fit([xs])
    full = mt.predict(xs, mode="exact")
    lora.use_lora_exact(mt, sources, strict=True)
    low_rank = mt.predict(xs, mode="exact")
    torch.testing.assert_close(low_rank, full, rtol=1e-4, atol=1e-4)
    assert mt._exact.last_materialized == []  # no merged weight was formed
    with pytest.raises(ValueError, match="mixes 4 sources"):
        lora.use_lora_exact(mt, lora.load_lora_sources(net, dirs[:2]))


def test_open_clip_tiny_vit_and_dawin_exact(tmp_path):
    """open_clip's tiny ViT classifier (nn.MultiheadAttention blocks): LoRA on every attention and MLP linear, the
    exact engine against the per-sample merge loop, and DaWin's exact mode switched to the low-rank engine."""
    from dawin_ext import DaWin
    from dawin_ext.integrations import openclip

    openclip.register_tiny_configs()
    torch.manual_seed(3)
    model, _, tok = openclip.create_clip_model("dawin-tiny-vit")
    clf = openclip.CLIPClassifier.from_clip(model, tok, ["cat", "dog", "car", "tree", "boat"], templates="classname")
    clf.eval()
    save_adapter(clf, tmp_path / "ft", ["attn", "c_fc", "c_proj"], seed=5, r=4)
    sources = lora.load_lora_sources(clf, [tmp_path / "ft"])
    assert any(k.endswith("attn.in_proj_weight") for k in sources.factors)
    assert any(k.endswith("mlp.c_fc.weight") for k in sources.factors)
    x = torch.randn(6, 3, 32, 32)
    lam = torch.rand(6)
    rows = torch.stack([1 - lam, lam], 1)
    swi = sources.interpolator(strict=True)
    got = swi(x, rows)
    torch.testing.assert_close(got, merge_loop(clf, sources, rows, lambda m, b: m(x[b : b + 1])), rtol=1e-4, atol=1e-4)

    dw = DaWin(clf, sources.merged_state_dict(0), sources.merged_state_dict(1), n_clusters=2, seed=1).fit(
        [x[:3], x[3:]]
    )
    full = dw.predict(x, mode="exact")
    lora.use_lora_exact(dw, sources)
    torch.testing.assert_close(dw.predict(x, mode="exact"), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="mixes 2 sources"):
        lora.use_lora_exact(dw, lora.load_lora_sources(clf, [tmp_path / "ft", tmp_path / "ft"]))


def test_timm_tiny_vit(tmp_path):
    """timm's ViT (packed qkv nn.Linear, fused attention): LoRA on qkv, proj, fc1, fc2."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=7).eval()
    targets = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"  # not patch_embed.proj (a conv)
    save_adapter(net, tmp_path / "ft", targets, seed=3, r=4)
    sources = lora.load_lora_sources(net, [tmp_path / "ft"])
    x = torch.randn(3, 3, 32, 32)
    rows = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.0, 1.0]])
    got = sources.interpolator()(x, rows)
    torch.testing.assert_close(got, merge_loop(net, sources, rows, lambda m, b: m(x[b : b + 1])), rtol=1e-4, atol=1e-4)


class UsesWeightDirectly(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)

    def forward(self, x):
        return self.lin(x) + self.lin.weight.sum(0)  # a non-linear-layer use of the adapted weight


def test_other_uses_are_exact_or_refused_by_name(tmp_path):
    torch.manual_seed(0)
    small = UsesWeightDirectly(6).eval()
    save_adapter(small, tmp_path / "s", ["lin"], seed=1, r=2)
    src = lora.load_lora_sources(small, [tmp_path / "s"])
    x = torch.randn(3, 6)
    rows = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.1, 0.9]])
    swi = src.interpolator()
    torch.testing.assert_close(
        swi(x, rows), merge_loop(small, src, rows, lambda m, b: m(x[b : b + 1])), rtol=1e-4, atol=1e-4
    )
    assert swi.last_materialized == [("lin.weight", (6, 6))]

    big = UsesWeightDirectly(1100).eval()  # 1.21M entries: never copied per sample
    save_adapter(big, tmp_path / "b", ["lin"], seed=1, r=2)
    swi = lora.load_lora_sources(big, [tmp_path / "b"]).interpolator()
    with pytest.raises(UnsupportedParameterError, match="'lin.weight'"):
        swi(torch.randn(2, 1100), torch.tensor([[0.5, 0.5], [0.2, 0.8]]))


def test_dora_is_refused_by_module(tmp_path):
    torch.manual_seed(0)
    net = AttnNet().eval()
    save_adapter(net, tmp_path / "dora", ["inp", "head"], seed=1, use_dora=True)
    with pytest.raises(lora.UnsupportedAdapterError, match=r"DoRA.*'inp'|'inp'.*DoRA"):
        lora.load_lora_sources(net, [tmp_path / "dora"])


class ConvEmb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.lin = nn.Linear(8, 4)

    def forward(self, idx):
        return self.lin(self.conv(self.emb(idx).transpose(1, 2)).mean(-1))


@pytest.mark.parametrize(("target", "what"), [("conv", "Conv1d"), ("emb", "embedding")])
def test_conv_and_embedding_lora_refused_by_module(tmp_path, target, what):
    torch.manual_seed(0)
    net = ConvEmb().eval()
    save_adapter(net, tmp_path / "a", [target, "lin"], seed=1)
    with pytest.raises(lora.UnsupportedAdapterError, match=rf"'{target}'.*{what}|{what}.*'{target}'"):
        lora.load_lora_sources(net, [tmp_path / "a"])


def test_trained_full_tensors_refused(tmp_path):
    torch.manual_seed(0)
    net = AttnNet().eval()
    save_adapter(net, tmp_path / "m", ["inp"], seed=1, modules_to_save=["head"])
    with pytest.raises(lora.UnsupportedAdapterError, match="head"):
        lora.load_lora_sources(net, [tmp_path / "m"])


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"dawin-ext\[lora\]"):
        lora.load_lora_sources(nn.Linear(2, 2), ["nowhere"])


def test_core_import_does_not_import_peft():
    code = "import sys, dawin_ext, dawin_ext.exact; assert 'peft' not in sys.modules, 'peft imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
