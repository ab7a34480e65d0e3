"""Hugging Face CLIP family: loading with key checks, zero-shot classifier, methods on it, open_clip <-> HF conversion.

Offline throughout: every model is a tiny random-init one saved to a temporary directory, and the tokenizer is built
from the BPE file bundled with open_clip.
"""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import open_clip  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from dawin_ext import DaWin, wise_ft  # noqa: E402
from dawin_ext.integrations import hf_clip, openclip  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

ARCH = "dawin-tiny-vit"
CLASSES = ["cat", "dog", "car", "tree", "boat"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return hf_clip.clip_tokenizer_from_open_clip(tmp_path_factory.mktemp("tok"))


def _hf_model(quick_gelu: bool = False, seed: int = 0) -> transformers.CLIPModel:
    openclip.register_tiny_configs()
    cfg = hf_clip.hf_config_from_open_clip(open_clip.get_model_config(ARCH), quick_gelu=quick_gelu)
    torch.manual_seed(seed)
    return transformers.CLIPModel(cfg).eval()


def _open_clip_model(quick_gelu: bool = False, seed: int = 0):
    openclip.register_tiny_configs()
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None, force_quick_gelu=quick_gelu).eval()
    return model, open_clip.get_tokenizer(ARCH)


def _tower(vision_model):
    # transformers 4 wraps the vision transformer in CLIPVisionModel.vision_model; 5 makes it the model itself.
    return getattr(vision_model, "vision_model", vision_model)


@torch.no_grad()
def _hf_features(model, images, tokens):
    img = model.visual_projection(model.vision_model(pixel_values=images).pooler_output)
    txt = model.text_projection(model.text_model(input_ids=tokens).pooler_output)
    return img, txt


def _perturbed(sd, seed: int, noise: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + noise * v.std().nan_to_num(0.1) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in sd.items()
    }


# ------------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_to_hf_gives_equal_features(quick_gelu: bool) -> None:
    oc, tok = _open_clip_model(quick_gelu, seed=1)
    hf = _hf_model(quick_gelu, seed=2)  # different random init: every weight must come from the conversion
    before = {k: v.clone() for k, v in oc.state_dict().items()}
    hf.load_state_dict(hf_clip.open_clip_to_hf(oc.state_dict()), strict=True)
    assert all(torch.equal(before[k], v) for k, v in oc.state_dict().items())  # input untouched
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens = tok(["a cat", "a photo of a big dog", "tree"])
    img, txt = _hf_features(hf, images, tokens)
    with torch.no_grad():
        torch.testing.assert_close(img, oc.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(txt, oc.encode_text(tokens), atol=1e-5, rtol=1e-5)
    assert float(img.abs().max()) > 1e-3  # not trivially zero


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_hf_to_open_clip_gives_equal_features(quick_gelu: bool) -> None:
    hf = _hf_model(quick_gelu, seed=4)
    oc, tok = _open_clip_model(quick_gelu, seed=5)
    oc.load_state_dict(hf_clip.hf_to_open_clip(hf.state_dict()), strict=True)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    tokens = tok(["a boat", "a photo of a car"])
    img, txt = _hf_features(hf, images, tokens)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images), img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(oc.encode_text(tokens), txt, atol=1e-5, rtol=1e-5)


def test_conversion_round_trip_is_identity() -> None:
    sd = _hf_model(seed=7).state_dict()
    back = hf_clip.open_clip_to_hf(hf_clip.hf_to_open_clip(sd))
    assert back.keys() == {k for k in sd if not k.endswith("position_ids")}
    assert all(torch.equal(back[k], sd[k]) for k in back)


def test_conversion_names_keys_it_cannot_map() -> None:
    oc, _ = _open_clip_model()
    sd = dict(oc.state_dict(), logit_bias=torch.zeros(()))
    with pytest.raises(ValueError, match="'logit_bias'"):
        hf_clip.open_clip_to_hf(sd)
    hf_sd = dict(_hf_model().state_dict())
    del hf_sd["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"vision_model\.encoder\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        hf_clip.hf_to_open_clip(hf_sd)
    with pytest.raises(ValueError, match="ResNet"):
        hf_clip.hf_config_from_open_clip(open_clip.get_model_config("dawin-tiny-rn"), quick_gelu=False)
    with pytest.raises(ValueError, match="attentional_pool"):
        cfg = open_clip.get_model_config(ARCH)
        hf_clip.hf_config_from_open_clip(
            dict(cfg, vision_cfg=dict(cfg["vision_cfg"], attentional_pool=True)), quick_gelu=False
        )


# ------------------------------------------------------------------------------------------------ loading
def test_save_pretrained_round_trip(tmp_path) -> None:
    hf = _hf_model(seed=8)
    hf.save_pretrained(tmp_path / "clip")
    loaded = hf_clip.load_hf_clip(tmp_path / "clip")
    assert isinstance(loaded, transformers.CLIPModel) and not loaded.training
    ref = hf.state_dict()
    assert loaded.state_dict().keys() == ref.keys()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())

    vision = transformers.CLIPVisionModel(hf.config.vision_config)
    _tower(vision).load_state_dict(hf.vision_model.state_dict())
    vision.save_pretrained(tmp_path / "vision")
    loaded_v = hf_clip.load_hf_clip(tmp_path / "vision")
    assert isinstance(loaded_v, transformers.CLIPVisionModel)
    tower_ref = hf.vision_model.state_dict()
    assert all(torch.equal(v, tower_ref[k]) for k, v in _tower(loaded_v).state_dict().items())


def _rewrite(path, edit) -> None:
    f = path / "model.safetensors"
    sd = dict(load_file(str(f)))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_loader_key_checks(tmp_path) -> None:
    hf = _hf_model(seed=9)
    cases = {
        "missing key 'text_model.final_layer_norm.bias'": lambda sd: sd.pop("text_model.final_layer_norm.bias"),
        "unexpected key 'extra.weight'": lambda sd: sd.__setitem__("extra.weight", torch.zeros(2)),
        "wrongly shaped key": lambda sd: sd.__setitem__("visual_projection.weight", torch.zeros(3, 32)),
        "'logit_scale' holds NaN": lambda sd: sd.__setitem__("logit_scale", torch.tensor(float("nan"))),
    }
    for i, (msg, edit) in enumerate(cases.items()):
        d = tmp_path / f"case{i}"
        hf.save_pretrained(d)
        _rewrite(d, edit)
        with pytest.raises(ValueError, match=msg):
            hf_clip.load_hf_clip(d)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_clip.load_hf_clip(tmp_path / "nowhere")
    d = tmp_path / "pickle"
    hf.save_pretrained(d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        hf_clip.load_hf_clip(d)


def test_missing_transformers_names_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"dawin-ext\[hf\]"):
        hf_clip.load_hf_clip("anywhere")


# ------------------------------------------------------------------------------------------------ classifier
def test_zero_shot_classifier_equals_hf_logits(tokenizer) -> None:
    hf = _hf_model(seed=10)
    templates = ["a photo of a {}.", "a {}"]
    clf = hf_clip.HFCLIPClassifier.from_clip(hf, tokenizer, CLASSES, templates).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        logits = clf(images)
        assert logits.shape == (4, len(CLASSES))
        # Single template: the head is exactly HF's logits_per_image for the prompts.
        one = hf_clip.HFCLIPClassifier.from_clip(hf, tokenizer, CLASSES, ["a photo of a {}."]).eval()
        batch = tokenizer([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
        ref = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=images)
        torch.testing.assert_close(one(images), ref.logits_per_image, atol=1e-5, rtol=1e-5)
        # Two templates: same head as open_clip's builder on the converted weights (tokenizers agree).
        oc, oc_tok = _open_clip_model(seed=12)
        oc.load_state_dict(hf_clip.hf_to_open_clip(hf.state_dict()))
        oc_clf = openclip.CLIPClassifier.from_clip(oc, oc_tok, CLASSES, templates).eval()
        torch.testing.assert_close(logits, oc_clf(images), atol=1e-4, rtol=1e-5)
    assert set(clf.state_dict()) >= {"head.weight", "head.bias", "visual_projection.weight"}
    assert all(k.startswith(("vision_model.", "visual_projection.", "head.")) for k in clf.state_dict())


@pytest.fixture(scope="module")
def hf_pair(tokenizer):
    hf = _hf_model(seed=13)
    clf = hf_clip.HFCLIPClassifier.from_clip(hf, tokenizer, CLASSES, "classname").eval()
    zs = {k: v.clone() for k, v in clf.state_dict().items()}
    return clf, zs, _perturbed(zs, seed=14, noise=0.3)


@torch.no_grad()
def _forward_with(clf, sd, x):
    return torch.func.functional_call(clf, sd, (x,))


def test_wise_ft_on_hf_classifier_matches_plain_torch(hf_pair) -> None:
    clf, zs, ft = hf_pair
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(15))
    merged = wise_ft(zs, ft, 0.3)
    plain = {k: 0.7 * zs[k] + 0.3 * ft[k] for k in zs}
    assert merged.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(merged[k], plain[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(_forward_with(clf, merged, x), _forward_with(clf, plain, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_forward_with(clf, zs, x), _forward_with(clf, plain, x))


def _fitted_dawin(hf_pair, seed: int, batch: int, n_batches: int):
    """DaWin (K=2) fitted on ``n_batches`` random 32x32 image batches drawn under ``seed``; returns it and them."""
    clf, zs, ft = hf_pair
    g = torch.Generator().manual_seed(seed)
    loader = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(n_batches)]
    return DaWin(clf, zs, ft, n_clusters=2, seed=1).fit(loader), loader


def _merged_per_sample(clf, zs, ft, lam, x):
    """The plain computation: each sample through ``clf`` with its own merged weights ``(1 - lam_i) zs + lam_i ft``."""
    ref = []
    for i in range(x.shape[0]):
        a = float(lam[i])
        sd = {k: (1 - a) * zs[k] + a * ft[k] for k in zs}
        ref.append(_forward_with(clf, sd, x[i : i + 1]))
    return torch.cat(ref)


def test_dawin_cluster_on_hf_classifier_matches_plain_torch(hf_pair) -> None:
    clf, zs, ft = hf_pair
    dw, loader = _fitted_dawin(hf_pair, seed=16, batch=8, n_batches=3)
    got = dw.predict_dataset(loader, mode="cluster")
    lam = dw.cluster_coefficients_[dw.labels_]
    torch.testing.assert_close(got, _merged_per_sample(clf, zs, ft, lam, torch.cat(loader)), atol=1e-5, rtol=1e-5)
    # Streaming prediction routes the same way.
    torch.testing.assert_close(dw.predict(loader[0], mode="cluster"), got[:8], atol=1e-5, rtol=1e-5)


def test_dawin_exact_on_hf_classifier_matches_per_sample_merging(hf_pair) -> None:
    # HF uses class_embedding through expand(); the exact engine runs HF's own forward with per-sample weights.
    clf, zs, ft = hf_pair
    dw, loader = _fitted_dawin(hf_pair, seed=19, batch=6, n_batches=2)
    got = dw.predict_dataset(loader, mode="exact")
    lam = dw.coefficients_
    assert float(lam.max() - lam.min()) > 1e-3  # samples really get different weights
    torch.testing.assert_close(got, _merged_per_sample(clf, zs, ft, lam, torch.cat(loader)), atol=1e-4, rtol=1e-4)


def test_load_hf_classifier_pair_from_vision_model_dir(tmp_path, tokenizer) -> None:
    hf = _hf_model(seed=17)
    hf.save_pretrained(tmp_path / "zs")
    vision = transformers.CLIPVisionModel(hf.config.vision_config)
    _tower(vision).load_state_dict(_perturbed(hf.vision_model.state_dict(), seed=18))
    vision.save_pretrained(tmp_path / "ft")
    pair = hf_clip.load_hf_classifier_pair(tmp_path / "zs", tmp_path / "ft", CLASSES, "classname", tokenizer=tokenizer)
    # Only the image tower differs: the projection and head come from the zero-shot CLIPModel.
    for k in ("head.weight", "head.bias", "visual_projection.weight"):
        assert torch.equal(pair.theta_zs[k], pair.theta_ft[k])
    for k, v in _tower(vision).state_dict().items():
        assert torch.equal(pair.theta_ft[f"vision_model.{k}"], v)
        assert torch.equal(pair.theta_zs[f"vision_model.{k}"], hf.vision_model.state_dict()[k])
    with pytest.raises(ValueError, match="must be a CLIPModel"):
        hf_clip.load_hf_classifier_pair(tmp_path / "ft", tmp_path / "zs", CLASSES, "classname", tokenizer=tokenizer)
