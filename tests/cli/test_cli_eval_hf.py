"""``dawin-ext eval --family hf`` end to end on tiny random-init Hugging Face CLIP checkpoints (offline).

The zero-shot checkpoint is a ``CLIPModel`` ``save_pretrained`` directory (with its tokenizer and image processor),
the fine-tuned one a ``CLIPVisionModel`` directory (fusion_bench's layout: only the image tower fine-tuned) trained a
few Adam steps, so the methods' predictions differ. Every method's per-sample output, as the command reports it, is
recomputed with test_cli_eval's plain computations on a stock module built from HF's own pieces
(``CLIPModel.vision_model``, ``visual_projection``, ``get_text_features``), itself checked against HF's
``logits_per_image``; the package's HFCLIPClassifier is not used for expected values.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from eval_setup import (  # noqa: E402  (tests/ is on sys.path under pytest: tests/eval_setup.py)
    ALL_METHODS,
    ARCH,
    BATCH,
    CLASSNAMES,
    PER_CLASS,
    TRAIN_NOISE,
    assert_matches_expected,
    assert_methods_differ,
    expected_outputs,
    image_batch,
    load_set,
    run_eval_all_methods,
    tiny_hf_clip,
    train_adam,
    vision_tower,
    write_test_sets,
)

from dawin_ext import cli  # noqa: E402
from dawin_ext.integrations import hf_clip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")
IMAGE_SIZE = 32  # the tiny config's
# Few enough steps that lambda spreads: with 2 or 4 (lr 2e-3) steps two methods predict alike on every sample.
TRAIN_STEPS = 3
TRAIN_LR = 3e-3


class _StockHF(nn.Module):
    """HF's vision tower and projection plus a linear head from HF's text features: the state-dict layout the
    command interpolates (vision_model.*, visual_projection.weight, head.*), built without dawin_ext."""

    def __init__(self, clip, tokenizer) -> None:
        super().__init__()
        self.vision_model = copy.deepcopy(clip.vision_model)
        self.visual_projection = copy.deepcopy(clip.visual_projection)
        batch = tokenizer(list(CLASSNAMES), padding=True, return_tensors="pt")  # template "classname": "{}"
        with torch.no_grad():
            text = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            text = getattr(text, "pooler_output", text)
            self.head = nn.Linear(text.shape[1], text.shape[0])
            self.head.weight.copy_(clip.logit_scale.exp() * F.normalize(text, dim=-1))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(F.normalize(self.visual_projection(self.vision_model(pixel_values=x).pooler_output), dim=-1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval_hf")
    tokenizer = hf_clip.clip_tokenizer_from_open_clip(tmp / "bpe")
    clip = tiny_hf_clip(seed=0)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    zs_dir = tmp / "zs"
    clip.save_pretrained(zs_dir)
    tokenizer.save_pretrained(zs_dir)
    processor.save_pretrained(zs_dir)

    def preprocess(img):
        return processor(images=img, return_tensors="pt")["pixel_values"][0]

    stock = _StockHF(clip, tokenizer).eval()
    # The stock module is HF's zero-shot classifier: its logits are HF's logits_per_image for the prompts.
    x, _ = image_batch(preprocess, 5, 2, 60.0)
    batch = tokenizer(list(CLASSNAMES), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=x)
        torch.testing.assert_close(stock(x), ref.logits_per_image, atol=1e-5, rtol=1e-5)
    theta_zs = {k: v.detach().clone() for k, v in stock.state_dict().items()}
    # Fine-tuned: only the image tower trains (the CLIPVisionModel layout), a few Adam steps on clean images.
    xt, yt = image_batch(preprocess, 99, 8, TRAIN_NOISE)
    ft_model = copy.deepcopy(stock).train()
    train_adam(ft_model, ft_model.vision_model.parameters(), xt, yt, TRAIN_STEPS, TRAIN_LR)
    ft_model.eval()
    theta_ft = {k: v.detach().clone() for k, v in ft_model.state_dict().items()}
    vision = transformers.CLIPVisionModel(clip.config.vision_config)
    vision_tower(vision).load_state_dict(ft_model.vision_model.state_dict())
    ft_dir = tmp / "ft"
    vision.save_pretrained(ft_dir)
    sets = write_test_sets(tmp)
    # test_cli_eval's expected_outputs computes every method with this module; arch=ARCH asks it for AdaWiSE too.
    return {
        "arch": ARCH,
        "tmp": tmp,
        "zs": zs_dir,
        "ft": ft_dir,
        "sets": sets,
        "stock": stock,
        "theta_zs": theta_zs,
        "theta_ft": theta_ft,
        "preprocess": preprocess,
        "clip": clip,
    }


def eval_args(setup, *extra, zs=None, ft=None, data=None) -> list[str]:
    return [
        "eval",
        "--family",
        "hf",
        "--zeroshot",
        str(zs or setup["zs"]),
        "--finetuned",
        str(ft or setup["ft"]),
        "--classnames",
        ",".join(CLASSNAMES),
        "--templates",
        "classname",
        "--data",
        *[str(d) for d in (data or setup["sets"])],
        "--batch-size",
        str(BATCH),
        "--workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_eval_hf_all_methods_match_plain_computation(setup, capsys, per_sample):  # noqa: F811
    results, captured = run_eval_all_methods(eval_args(setup), setup["tmp"] / "results.json", capsys)
    assert results["model"] == f"hf:{setup['zs'].resolve()}"
    expected = [expected_outputs(setup, root) for root in setup["sets"]]
    assert_methods_differ(expected, ALL_METHODS)
    for root, exp in zip(setup["sets"], expected, strict=True):
        assert_matches_expected(per_sample, results["accuracy"], exp, ALL_METHODS, root.name)
        assert results["test_sets"][root.name]["samples"] == PER_CLASS * len(CLASSNAMES)
    assert "preprocessor_config.json" not in captured.err  # the directory has one: no note


def test_eval_hf_clip_model_finetuned_and_openai_tokenizer(setup, capsys, per_sample):  # noqa: F811
    """A fine-tuned CLIPModel directory (both towers): its head comes from its own text tower; no tokenizer or
    processor files in the zero-shot directory (--tokenizer openai; CLIP's standard preprocessing, reported)."""
    tmp = setup["tmp"]
    bare = tmp / "zs_bare"
    setup["clip"].save_pretrained(bare)
    ft_clip = tiny_hf_clip(seed=0)
    with torch.no_grad():
        for p in ft_clip.text_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ft_dir = tmp / "ft_clip"
    ft_clip.save_pretrained(ft_dir)
    out_json = tmp / "clip_ft.json"
    data = setup["sets"][:1]
    rc = cli.main(
        eval_args(
            setup,
            "--methods",
            "finetuned",
            "--tokenizer",
            "openai",
            "--json",
            str(out_json),
            zs=bare,
            ft=ft_dir,
            data=data,
        )
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "has no preprocessor_config.json: using CLIP's standard preprocessing at 32x32" in captured.err
    tokenizer = hf_clip.clip_tokenizer_from_open_clip(tmp / "bpe2")
    stock_ft = _StockHF(ft_clip, tokenizer).eval()
    x, _ = load_set(data[0], setup["preprocess"])
    with torch.no_grad():
        exp = stock_ft(x)  # the fine-tuned CLIPModel's own zero-shot classifier
    got = per_sample["finetuned"][data[0].name].scores
    torch.testing.assert_close(got, exp, rtol=0, atol=1e-4)
    # and not the zero-shot model's head:
    assert float((got - expected_outputs(setup, data[0])["zeroshot"]).abs().max()) > 1e-2


def _vision_dir(tmp, name, **overrides):
    cfg = copy.deepcopy(tiny_hf_clip(seed=0).config.vision_config)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    d = tmp / name
    transformers.CLIPVisionModel(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("width", "vision config hidden_size is 32 in the zero-shot"),
        ("act", "vision config hidden_act is 'gelu' in the zero-shot"),
        ("file", "--finetuned"),
        ("model-flag", "--model is for --family open_clip"),
        ("no-tokenizer", "holds no CLIP tokenizer"),
        ("vision-zs", "must be a CLIPModel"),
    ],
)
def test_eval_hf_bad_input(setup, capsys, case, fragment):
    tmp = setup["tmp"]
    kwargs, extra = {}, []
    if case == "width":
        kwargs["ft"] = _vision_dir(tmp, "ft_wide", hidden_size=48, intermediate_size=192)
    elif case == "act":
        kwargs["ft"] = _vision_dir(tmp, "ft_quick", hidden_act="quick_gelu")
    elif case == "file":
        kwargs["ft"] = setup["ft"] / "model.safetensors"
    elif case == "model-flag":
        extra = ["--model", "ViT-B-32"]
    elif case == "no-tokenizer":
        bare = tmp / "zs_no_tok"
        if not bare.exists():
            setup["clip"].save_pretrained(bare)
        kwargs["zs"] = bare
    elif case == "vision-zs":
        kwargs["zs"] = setup["ft"]
        extra = ["--tokenizer", str(setup["zs"])]
    rc = cli.main(eval_args(setup, "--methods", "zeroshot", *extra, **kwargs))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert fragment in err


def test_eval_hf_without_transformers_names_the_extra(setup, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    rc = cli.main(eval_args(setup, "--methods", "zeroshot"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "pip install 'dawin-ext[hf]'" in err and "--family hf" in err


def test_open_clip_family_still_requires_model(setup, capsys):
    args = [a for a in eval_args(setup, "--methods", "zeroshot") if a not in ("--family", "hf")]
    rc = cli.main(args)
    assert rc == 2
    assert "--model ARCH is required with --family open_clip" in capsys.readouterr().err
    rc = cli.main([*args, "--model", "ViT-B-32", "--tokenizer", "openai"])
    assert rc == 2
    assert "--tokenizer is for --family hf" in capsys.readouterr().err
