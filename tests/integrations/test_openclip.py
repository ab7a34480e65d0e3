"""open_clip helpers: offline tokenizer, zero-shot head vs open_clip's own logits, checkpoint layouts."""

from __future__ import annotations

import copy
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dawin_ext.integrations.openclip import (
    CLIPClassifier,
    build_zero_shot_head,
    classifier_state_dict,
    create_clip_model,
    get_templates,
    register_model_config,
    register_tiny_configs,
)

CLASSES = ["cat", "dog", "golden retriever", "airplane"]
ARCHS = register_tiny_configs()


pytestmark = pytest.mark.usefixtures("one_thread_per_module")  # tiny models: threads only add spinning


@pytest.fixture(scope="module", params=ARCHS)
def clip(request):
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip_model(request.param)
    return request.param, model, preprocess, tokenizer


def test_tokenizer_is_offline_simple_tokenizer(clip):
    arch, _, _, tokenizer = clip
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    tokens = tokenizer(["a photo of a cat.", "a photo of a golden retriever."])
    ctx = open_clip.get_model_config(arch)["text_cfg"]["context_length"]
    assert tokens.shape == (2, ctx)
    assert tokens[0, 0] == tokenizer.sot_token_id
    assert tokens[0].tolist() != tokens[1].tolist()
    assert "cat" in open_clip.decode(tokens[0])


def test_classifier_logits_match_open_clip(clip):
    """With one template per class, the head reproduces open_clip's image-text logits."""
    _, model, _, tokenizer = clip
    torch.manual_seed(1)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)  # a scale other than the init, so a missing exp() would show
    images = torch.randn(5, 3, 32, 32)
    classifier = CLIPClassifier.from_clip(model, tokenizer, CLASSES, templates=["a photo of a {}."])
    with torch.no_grad():
        image_features, text_features, scale = model(images, tokenizer([f"a photo of a {c}." for c in CLASSES]))
        expected = scale * image_features @ text_features.T
        got = classifier(images)
    assert got.shape == (5, len(CLASSES))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert classifier.classnames == CLASSES and classifier.num_classes == len(CLASSES)
    # The image tower is a copy: changing the classifier leaves the open_clip model alone.
    next(classifier.visual.parameters()).data.add_(1)
    with torch.no_grad():
        torch.testing.assert_close(model(images, None)[0], image_features)


def test_template_averaging(clip):
    """Several templates: each class row is the renormalized mean of its normalized prompt embeddings."""
    _, model, _, tokenizer = clip
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    weight, bias = build_zero_shot_head(model, tokenizer, CLASSES, templates)
    with torch.no_grad():
        rows = []
        for c in CLASSES:
            emb = F.normalize(model.encode_text(tokenizer([t.format(c) for t in templates])).double(), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=0))
        expected = model.logit_scale.exp().double() * torch.stack(rows)
    torch.testing.assert_close(weight.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(bias, torch.zeros(len(CLASSES)))


def test_named_template_sets(clip):
    _, model, _, tokenizer = clip
    assert len(get_templates("openai")) == len(open_clip.OPENAI_IMAGENET_TEMPLATES)
    w_simple, _ = build_zero_shot_head(model, tokenizer, CLASSES, "simple")
    w_openai, _ = build_zero_shot_head(model, tokenizer, CLASSES, "openai")
    assert w_simple.shape == w_openai.shape == (len(CLASSES), model.visual.output_dim)
    assert not torch.allclose(w_simple, w_openai)


def test_templates_file_and_errors(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\n  itap of a {}.  \n")
    assert get_templates(str(path)) == ["a photo of a {}.", "itap of a {}."]
    path.write_text("a photo of a thing.\n")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(str(path))
    with pytest.raises(ValueError, match="neither a known set"):
        get_templates("no-such-set")
    with pytest.raises(ValueError, match="holds no templates"):
        get_templates([])


def test_classname_validation(clip):
    _, model, _, tokenizer = clip
    with pytest.raises(ValueError, match="'cat' appears twice"):
        build_zero_shot_head(model, tokenizer, ["cat", "dog", "cat"], "simple")
    with pytest.raises(ValueError, match="at least 2"):
        build_zero_shot_head(model, tokenizer, ["cat"], "simple")
    with pytest.raises(TypeError, match="sequence of str"):
        build_zero_shot_head(model, tokenizer, "cat,dog", "simple")


def test_classifier_state_dict_layouts(clip):
    arch, model, _, tokenizer = clip
    torch.manual_seed(2)
    reference = CLIPClassifier.from_clip(model, tokenizer, CLASSES, "simple")
    expected = reference.state_dict()
    # 1. A whole CLIP state dict: the head is built from its text tower.
    from_clip = classifier_state_dict(model.state_dict(), model, tokenizer, CLASSES, "simple")
    assert list(from_clip) == list(expected)
    for k in expected:
        torch.testing.assert_close(from_clip[k], expected[k])
    # ... another CLIP's weights give that CLIP's head, and the module passed in is left untouched.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other_clip = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in before.items()}
    other = copy.deepcopy(model)
    other.load_state_dict(other_clip)
    got = classifier_state_dict(other_clip, model, tokenizer, CLASSES, "simple")
    want = CLIPClassifier.from_clip(other, tokenizer, CLASSES, "simple").state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # 2. The classifier layout passes through (a missing bias becomes zeros).
    no_bias = {k: v for k, v in expected.items() if k != "head.bias"}
    out = classifier_state_dict(no_bias, model, tokenizer, CLASSES)
    assert torch.equal(out["head.bias"], torch.zeros(len(CLASSES)))
    # 3. The wise-ft ImageClassifier layout, text tower included, maps onto the same keys.
    wise = {f"image_encoder.model.{k}": v for k, v in model.state_dict().items()}
    wise["classification_head.weight"] = expected["head.weight"] * 2
    wise["classification_head.bias"] = torch.ones(len(CLASSES))
    out = classifier_state_dict(wise, model, tokenizer, CLASSES)
    assert sorted(out) == sorted(expected)
    assert torch.equal(out["head.weight"], expected["head.weight"] * 2)
    loaded = CLIPClassifier(model.visual, torch.zeros(len(CLASSES), model.visual.output_dim))
    loaded.load_state_dict(out)


def test_classifier_state_dict_errors(clip):
    arch, model, _, tokenizer = clip
    sd = CLIPClassifier.from_clip(model, tokenizer, CLASSES, "simple").state_dict()
    with pytest.raises(ValueError, match=r"'head.weight' has 4 rows \(classes\) but 3 class names"):
        classifier_state_dict(sd, model, tokenizer, CLASSES[:3], name="FT")
    first_visual = next(k for k in sd if k.startswith("visual."))
    missing = {k: v for k, v in sd.items() if k != first_visual}
    with pytest.raises(ValueError, match=f"ZS is missing key '{first_visual}'"):
        classifier_state_dict(missing, model, tokenizer, CLASSES, name="ZS")
    wrong = dict(sd)
    wrong[first_visual] = torch.zeros(3)
    with pytest.raises(ValueError, match=f"key '{first_visual}' has shape \\(3,\\)"):
        classifier_state_dict(wrong, model, tokenizer, CLASSES)
    with pytest.raises(ValueError, match="unexpected key 'extra'"):
        classifier_state_dict({**sd, "extra": torch.ones(1)}, model, tokenizer, CLASSES)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        classifier_state_dict({"fc.weight": torch.ones(2, 2)}, model, tokenizer, CLASSES)
    visual_only = {k: v for k, v in sd.items() if k.startswith("visual.")}
    with pytest.raises(ValueError, match="neither a classification head"):
        classifier_state_dict(visual_only, model, tokenizer, CLASSES)


def test_register_model_config(tmp_path):
    cfg = json.loads(json.dumps(open_clip.get_model_config("dawin-tiny-vit")))
    assert register_model_config(cfg, "dawin-tiny-vit") == "dawin-tiny-vit"  # same config again: no-op
    cfg["embed_dim"] = 8
    with pytest.raises(ValueError, match="already registered with a different config"):
        register_model_config(cfg, "dawin-tiny-vit")
    path = tmp_path / "dawin-test-file-cfg.json"
    path.write_text(json.dumps(cfg))
    assert register_model_config(path) == "dawin-test-file-cfg"
    model, _, _ = create_clip_model("dawin-test-file-cfg")
    assert model.visual.output_dim == 8
    bad = tmp_path / "dawin-bad.json"
    bad.write_text(json.dumps({"embed_dim": 8, "vision_cfg": {}}))
    with pytest.raises(ValueError, match="lacks 'text_cfg'"):
        register_model_config(bad)
    with pytest.raises(ValueError, match="unknown open_clip architecture 'dawin-tiny-vti'.*dawin-tiny-vit"):
        create_clip_model("dawin-tiny-vti")


def test_pretrained_config_metadata_without_download():
    """A pretrained tag's metadata (QuickGELU, mean/std) is applied; nothing is fetched (no network here)."""

    def quick_gelu_count(model):
        return sum(type(m).__name__ == "QuickGELU" for m in model.modules())

    plain, _, _ = create_clip_model("RN50")
    tagged, _, _ = create_clip_model("RN50", pretrained_config="openai")
    assert quick_gelu_count(plain) == 0
    assert quick_gelu_count(tagged) > 0, "the openai tag was trained with QuickGELU"
    with pytest.raises(ValueError, match="no pretrained config 'nope'"):
        create_clip_model("RN50", pretrained_config="nope")


def test_hub_tokenizers_refused():
    with pytest.raises(ValueError, match="Hugging Face hub"):
        create_clip_model("ViT-B-16-SigLIP")


def test_classifier_module_validation(clip):
    _, model, _, _ = clip
    dim = model.visual.output_dim
    with pytest.raises(ValueError, match="embed_dim 3"):
        CLIPClassifier(model.visual, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"head_bias must have shape \(4,\)"):
        CLIPClassifier(model.visual, torch.zeros(4, dim), torch.zeros(5))
    with pytest.raises(ValueError, match="3 class names for a head with 4 rows"):
        CLIPClassifier(model.visual, torch.zeros(4, dim), classnames=["a", "b", "c"])


def test_load_classifier_pair(clip, tmp_path):
    from dawin_ext.integrations.checkpoints import save_state_dict
    from dawin_ext.integrations.openclip import load_classifier_pair
    from dawin_ext.ops.statedict import IncompatibleStateDictsError, check_compatible

    arch, model, _, tokenizer = clip
    expected_zs = CLIPClassifier.from_clip(model, tokenizer, CLASSES, "simple").state_dict()
    ft = {k: v + 0.1 if v.is_floating_point() else v for k, v in expected_zs.items()}
    save_state_dict(tmp_path / "zs.safetensors", model.state_dict())  # whole CLIP: head built from text
    torch.save({"state_dict": {f"module.{k}": v for k, v in ft.items()}}, tmp_path / "ft.pt")
    pair = load_classifier_pair(arch, tmp_path / "zs.safetensors", tmp_path / "ft.pt", CLASSES, "simple")
    check_compatible([pair.model.state_dict(), pair.theta_zs, pair.theta_ft])
    for k, v in expected_zs.items():
        torch.testing.assert_close(pair.theta_zs[k], v)
        torch.testing.assert_close(pair.model.state_dict()[k], v)
        torch.testing.assert_close(pair.theta_ft[k], ft[k])
    assert not pair.model.training
    assert pair.preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)

    # fp16 checkpoints: converted to fp32 by default, or kept (with a fp16 module) when dtype=None.
    half = {k: v.half() if v.is_floating_point() else v for k, v in ft.items()}
    save_state_dict(
        tmp_path / "zs16.safetensors", {k: v.half() if v.is_floating_point() else v for k, v in expected_zs.items()}
    )
    save_state_dict(tmp_path / "ft16.safetensors", half)
    pair32 = load_classifier_pair(arch, tmp_path / "zs16.safetensors", tmp_path / "ft16.safetensors", CLASSES)
    assert {v.dtype for v in pair32.theta_ft.values() if v.is_floating_point()} == {torch.float32}
    pair16 = load_classifier_pair(
        arch, tmp_path / "zs16.safetensors", tmp_path / "ft16.safetensors", CLASSES, dtype=None
    )
    assert pair16.model.head.weight.dtype == torch.float16
    assert torch.equal(pair16.theta_ft["head.weight"], half["head.weight"])
    # A dtype difference between the two is an error that names the key and both files.
    with pytest.raises(IncompatibleStateDictsError, match=r"key 'visual\..*zs.safetensors.*ft16.safetensors"):
        load_classifier_pair(arch, tmp_path / "zs.safetensors", tmp_path / "ft16.safetensors", CLASSES, "simple")
