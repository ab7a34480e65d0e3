"""Hugging Face ``transformers`` CLIP as a model family: loading, zero-shot heads, a classifier module, and key
conversion to and from open_clip.

``transformers`` is an optional dependency (``pip install 'dawin-ext[hf]'``); it is imported only when a function
here needs it. Everything works offline: models load from local ``save_pretrained`` directories (safetensors only,
``local_files_only=True``), and a CLIP tokenizer can be built from the BPE file that ships with open_clip
(:func:`clip_tokenizer_from_open_clip`).

The module whose state dict gets interpolated is :class:`HFCLIPClassifier`: ``vision_model.*`` (the HF vision
transformer), ``visual_projection.weight`` and ``head.weight`` / ``head.bias``, where the head rows are the
normalized class embeddings times ``exp(logit_scale)``. Its logits equal HF's ``logits_per_image`` for the prompts,
the same contract as :class:`dawin_ext.integrations.openclip.CLIPClassifier`, so its state dicts go straight into
:func:`dawin_ext.wise_ft`, :class:`dawin_ext.DaWin` and the other methods.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.statedict import StateDict, check_keys_and_shapes
from .openclip import Template, _check_classnames, _HeadClassifier, get_templates

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = [
    "HFCLIPClassifier",
    "HFClassifierPair",
    "build_hf_zero_shot_head",
    "check_same_vision_architecture",
    "hf_image_transform",
    "clip_tokenizer_from_open_clip",
    "hf_config_from_open_clip",
    "hf_to_open_clip",
    "load_hf_classifier_pair",
    "load_hf_clip",
    "load_hf_tokenizer",
    "open_clip_to_hf",
]

_EXTRA = "pip install 'dawin-ext[hf]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"dawin_ext.integrations.hf_clip needs the 'transformers' package, which is not installed; install the extra: {_EXTRA}"
        ) from e
    return transformers


# ---------------------------------------------------------------------------------------------------- loading
_SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")


def _check_dir(path: str | os.PathLike[str]) -> Path:
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"Hugging Face model directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is not a directory; pass a save_pretrained directory")
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} has no config.json; is it a save_pretrained directory?")
    if not any((d / f).is_file() for f in _SAFETENSORS_FILES):
        pickles = sorted(p.name for p in d.glob("*.bin"))
        what = f" (it holds {pickles[0]!r}, a pickle)" if pickles else ""
        raise FileNotFoundError(
            f"{str(d)!r} has no {' or '.join(_SAFETENSORS_FILES)}{what}; dawin-ext loads Hugging Face weights from "
            "safetensors only: re-save them with model.save_pretrained(dir) (safetensors is its default)"
        )
    return d


def load_hf_clip(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Loads a ``CLIPModel`` or ``CLIPVisionModel`` from a local ``save_pretrained`` directory, in eval mode.

    The class follows the directory's ``config.json`` (``model_type`` ``"clip"`` or ``"clip_vision_model"``). Weights
    are read from safetensors only, with ``local_files_only=True`` (nothing is downloaded). Like the open_clip loader,
    the checkpoint must match the architecture exactly: a missing, unexpected or differently shaped key, or a NaN/Inf
    weight, raises :class:`ValueError` naming the first offending key (transformers would only warn and leave missing
    weights at random init).
    """
    tf = _transformers()
    d = _check_dir(path)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(d / 'config.json')!r} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type")
    classes = {"clip": tf.CLIPModel, "clip_vision_model": tf.CLIPVisionModel}
    if model_type not in classes:
        raise ValueError(
            f"{str(d)!r}: config.json has model_type {model_type!r}; dawin_ext.integrations.hf_clip loads {sorted(classes)} "
            "(a CLIPModel or a CLIPVisionModel)"
        )
    model, info = classes[model_type].from_pretrained(
        str(d),
        local_files_only=True,
        use_safetensors=True,
        output_loading_info=True,
        dtype=dtype,
        ignore_mismatched_sizes=True,  # reported in `info` and refused below, with the key named
    )
    problems = [
        ("is missing key", info.get("missing_keys")),
        ("has unexpected key", info.get("unexpected_keys")),
        ("has a wrongly shaped key", info.get("mismatched_keys")),
        ("failed to load", info.get("error_msgs")),
    ]
    for what, keys in problems:
        if keys:
            first = sorted(keys, key=str)[0]
            detail = ""
            if isinstance(first, tuple):  # mismatched keys come as (key, checkpoint shape, model shape)
                if len(first) == 3:
                    detail = f" (checkpoint shape {tuple(first[1])}, model shape {tuple(first[2])})"
                first = first[0]
            raise ValueError(
                f"{str(d)!r}: the checkpoint {what} {str(first)!r}{detail} for its {classes[model_type].__name__} "
                f"config ({len(keys)} such key(s))"
            )
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{str(d)!r}: key {key!r} holds NaN or Inf")
    return model.to(device).eval()


def load_hf_tokenizer(path: str | os.PathLike[str]) -> Callable:
    """Loads the CLIP tokenizer saved in a local directory (``tokenizer.save_pretrained``), without downloading."""
    tf = _transformers()
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(d)!r} does not exist or is not a directory")
    return tf.CLIPTokenizer.from_pretrained(str(d), local_files_only=True)


def clip_tokenizer_from_open_clip(directory: str | os.PathLike[str]) -> Callable:
    """Builds OpenAI CLIP's tokenizer (49408 tokens) offline from the BPE file bundled with open_clip.

    Writes ``vocab.json`` and ``merges.txt`` into ``directory`` and returns a ``transformers.CLIPTokenizer``; its
    ids equal open_clip's ``SimpleTokenizer`` (same vocabulary construction: bytes, bytes + ``</w>``, merges, then
    ``<|startoftext|>`` and ``<|endoftext|>``), which is the vocabulary of the released ViT-B/32, B/16 and L/14.
    """
    tf = _transformers()
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    # from_pretrained on the directory rather than the constructor: its file arguments were renamed in
    # transformers 5 (vocab_file/merges_file -> vocab/merges), and fusion_bench still needs 4.x.
    return tf.CLIPTokenizer.from_pretrained(str(d), local_files_only=True)


class _ProcessorTransform:
    """PIL image -> ``[3, H, W]`` tensor through a ``CLIPImageProcessor`` (a class, so DataLoader workers can pickle it)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def hf_image_transform(path: str | os.PathLike[str], image_size: int) -> tuple[Callable[[Any], Tensor], str | None]:
    """The image transform of a ``save_pretrained`` directory: ``(transform, note)``.

    With a ``preprocessor_config.json`` in ``path`` the transform is that ``CLIPImageProcessor`` (its crop must be
    ``image_size``, the vision config's input size, else :class:`ValueError`). Without one it is CLIP's standard
    preprocessing at ``image_size`` (bicubic resize of the short side, centre crop, OpenAI mean/std), and ``note``
    says so, so that the caller can report it rather than apply it silently.
    """
    tf = _transformers()
    d = Path(path)
    if (d / "preprocessor_config.json").is_file():
        proc = tf.CLIPImageProcessor.from_pretrained(str(d), local_files_only=True)
        crop = proc.crop_size if getattr(proc, "do_center_crop", True) else proc.size
        size = dict(crop) if isinstance(crop, Mapping) else {k: getattr(crop, k, None) for k in ("height", "width")}
        hw = (size.get("height"), size.get("width"))
        if hw != (image_size, image_size):
            raise ValueError(
                f"{str(d / 'preprocessor_config.json')!r} produces {hw[0]}x{hw[1]} images but the vision config's "
                f"image_size is {image_size}"
            )
        return _ProcessorTransform(proc), None
    proc = tf.CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    note = (
        f"{str(d)!r} has no preprocessor_config.json: using CLIP's standard preprocessing at {image_size}x{image_size} "
        "(bicubic resize, centre crop, OpenAI mean/std)"
    )
    return _ProcessorTransform(proc), note


# ---------------------------------------------------------------------------------------------------- heads
def _text_features(model: nn.Module, tokenizer: Callable, texts: list[str], device: torch.device) -> Tensor:
    max_len = int(model.config.text_config.max_position_embeddings)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
    out = model.text_model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
    return model.text_projection(pooled)


@torch.no_grad()
def build_hf_zero_shot_head(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: str | Sequence[Template] = "openai",
) -> tuple[Tensor, Tensor]:
    """Zero-shot head ``(weight [C, D], bias [C])`` from a ``CLIPModel``'s text tower, class names and templates.

    As in open_clip's ``build_zero_shot_classifier``: per class, the mean of the normalized prompt embeddings,
    renormalized; the weight is scaled by ``exp(model.logit_scale)`` and the bias is zero, so
    ``normalize(image_features) @ weight.T + bias`` equals HF's ``logits_per_image``. ``tokenizer`` is a
    ``transformers`` CLIP tokenizer (e.g. :func:`load_hf_tokenizer`, :func:`clip_tokenizer_from_open_clip`).
    """
    names = _check_classnames(classnames)
    temps = get_templates(templates)
    for attr in ("text_model", "text_projection", "logit_scale"):
        if not hasattr(model, attr):
            raise TypeError(
                f"build_hf_zero_shot_head: the model ({type(model).__name__}) has no {attr!r}; pass a CLIPModel "
                "(a CLIPVisionModel has no text tower)"
            )
    device = model.logit_scale.device
    rows = []
    for name in names:
        texts = [t(name) if callable(t) else t.format(name) for t in temps]
        emb = F.normalize(_text_features(model, tokenizer, texts, device).float(), dim=-1).mean(0)
        rows.append(F.normalize(emb, dim=0))
    text_features = torch.stack(rows)  # [C, D]
    if not bool(torch.isfinite(text_features).all()):
        bad = int((~torch.isfinite(text_features)).any(1).nonzero()[0])
        raise ValueError(f"the text tower produced non-finite embeddings for class {bad} ({names[bad]!r})")
    weight = (model.logit_scale.exp().float() * text_features).contiguous()
    return weight, torch.zeros(len(names), device=weight.device, dtype=weight.dtype)


class HFCLIPClassifier(_HeadClassifier):
    """HF CLIP vision tower + projection + linear head:
    ``logits = normalize(visual_projection(vision_model(x).pooler_output)) @ head.weight.T + head.bias``.

    Same contract as :class:`dawin_ext.integrations.openclip.CLIPClassifier` (images ``[B, 3, H, W]`` -> logits ``[B, C]``). Its
    state dict (``vision_model.*``, ``visual_projection.weight``, ``head.*``) is what the methods interpolate. It holds
    the given modules themselves; :meth:`from_clip` copies.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module,
        head_weight: Tensor,
        head_bias: Tensor | None = None,
        classnames: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        from .openclip import linear_head

        head = linear_head(
            head_weight,
            head_bias,
            classnames,
            getattr(visual_projection, "out_features", None),
            "the visual projection",
        )
        self.vision_model = vision_model
        self.visual_projection = visual_projection
        self._set_head(head, classnames)  # registered last: the state dict keeps its key order

    def _image_features(self, images: Tensor) -> Tensor:
        out = self.vision_model(pixel_values=images)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.visual_projection(pooled)

    # The same call shape as the open_clip CLIPClassifier.from_clip on purpose: one way to build either family.
    @classmethod
    def from_clip(
        cls,
        model: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        templates: str | Sequence[Template] = "openai",
        *,
        vision_model: nn.Module | None = None,
    ) -> HFCLIPClassifier:
        """Zero-shot classifier from a ``CLIPModel``: copies of its vision tower and projection plus the head built
        from its text tower.

        ``vision_model`` (a ``CLIPVisionModel`` or its ``.vision_model``) replaces the image tower, e.g. a fine-tuned
        one from a fusion_bench-style pool whose head and projection come from the pretrained ``model``.
        """
        weight, bias = build_hf_zero_shot_head(model, tokenizer, classnames, templates)
        tower = model.vision_model if vision_model is None else getattr(vision_model, "vision_model", vision_model)
        if vision_model is not None:
            check_keys_and_shapes(
                tower.state_dict(),
                model.vision_model.state_dict(),
                "from_clip: vision_model",
                "the CLIPModel's vision tower",
            )
        return cls(copy.deepcopy(tower), copy.deepcopy(model.visual_projection), weight, bias, list(classnames))


# Vision config fields that change the image tower's forward: two checkpoints are interpolated only if they agree.
# (Shapes alone miss e.g. QuickGELU against GELU, which leaves every weight the same shape.)
_VISION_ARCH_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


def _vision_config(model: nn.Module) -> Any:
    cfg = model.config
    return getattr(cfg, "vision_config", cfg)  # CLIPModel holds it; a CLIPVisionModel's config is it


def check_same_vision_architecture(a: nn.Module, b: nn.Module, names: Sequence[str] = ("first", "second")) -> None:
    """Raises :class:`ValueError` naming the first vision config field (:data:`_VISION_ARCH_FIELDS`) in which two
    HF CLIP models (``CLIPModel`` or ``CLIPVisionModel``) differ; their image towers must be the same architecture
    for their weights to be interpolated."""
    ca, cb = _vision_config(a), _vision_config(b)
    for field in _VISION_ARCH_FIELDS:
        va, vb = getattr(ca, field, None), getattr(cb, field, None)
        if va != vb:
            raise ValueError(
                f"the {names[0]} and {names[1]} image towers are different architectures: vision config "
                f"{field} is {va!r} in the {names[0]} and {vb!r} in the {names[1]}"
            )


class HFClassifierPair(NamedTuple):
    """What :func:`load_hf_classifier_pair` returns."""

    model: HFCLIPClassifier  #: the architecture, holding the zero-shot weights, in eval mode
    theta_zs: StateDict  #: zero-shot classifier state dict
    theta_ft: StateDict  #: fine-tuned classifier state dict


def load_hf_classifier_pair(
    zeroshot: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    classnames: Sequence[str],
    templates: str | Sequence[Template] = "openai",
    *,
    tokenizer: Callable,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> HFClassifierPair:
    """Zero-shot and fine-tuned :class:`HFCLIPClassifier` state dicts from two ``save_pretrained`` directories.

    ``zeroshot`` must hold a ``CLIPModel`` (its text tower builds the head). ``finetuned`` holds a ``CLIPModel``
    (whose own text tower and projection then build its head, as fine-tuning both towers implies) or a
    ``CLIPVisionModel`` (the fusion_bench layout: only the image tower is fine-tuned; the projection and head come
    from the zero-shot model). The result plugs into the methods, e.g. ``DaWin(pair.model, pair.theta_zs,
    pair.theta_ft)``.
    """
    from ..ops.statedict import check_compatible

    names = _check_classnames(classnames)
    temps = get_templates(templates)
    base = load_hf_clip(zeroshot, dtype=dtype, device=device)
    tf = _transformers()
    if not isinstance(base, tf.CLIPModel):
        raise ValueError(f"zero-shot directory {str(zeroshot)!r} holds a {type(base).__name__}; it must be a CLIPModel")
    zs = HFCLIPClassifier.from_clip(base, tokenizer, names, temps)
    ft_model = load_hf_clip(finetuned, dtype=dtype, device=device)
    check_same_vision_architecture(base, ft_model, (f"zero-shot {str(zeroshot)!r}", f"fine-tuned {str(finetuned)!r}"))
    if isinstance(ft_model, tf.CLIPModel):
        ft = HFCLIPClassifier.from_clip(ft_model, tokenizer, names, temps)
    else:
        ft = HFCLIPClassifier.from_clip(base, tokenizer, names, temps, vision_model=ft_model)
    theta_zs = {k: v.detach().clone() for k, v in zs.state_dict().items()}
    theta_ft = {k: v.detach().clone() for k, v in ft.state_dict().items()}
    check_compatible([theta_zs, theta_ft], names=[f"zero-shot {str(zeroshot)!r}", f"fine-tuned {str(finetuned)!r}"])
    return HFClassifierPair(zs, theta_zs, theta_ft)


# ---------------------------------------------------------------------------------------------------- conversion
# open_clip key (per block, relative) <-> HF key; in_proj is split into q/k/v separately.
_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Whole-model keys with no reshaping.
_PLAIN = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
# Transposed: open_clip multiplies x @ proj, HF uses nn.Linear (x @ W.T).
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)
# Derived buffers that either side may carry in a state dict; they are rebuilt by the model, not converted.
_OPEN_CLIP_DERIVED = ("attn_mask",)
_HF_DERIVED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")


def _plain_copy(sd: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    if not isinstance(sd, Mapping):
        raise TypeError(f"{name}: expected a state dict (mapping of str to Tensor), got {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(sd)


def open_clip_to_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Converts an open_clip ViT CLIP state dict (``visual.*`` + text transformer) into HF ``CLIPModel`` keys.

    Applies to open_clip's standard ViT CLIPs (ViT-B/32, B/16, L/14 and the like: class-token pooling, ``ln_pre``,
    argmax text pooling, bias-free projections). The activation is not in the weights: OpenAI's checkpoints use
    QuickGELU (``hidden_act="quick_gelu"``, HF's default), most LAION ones GELU (``"gelu"``); see
    :func:`hf_config_from_open_clip`. Keys without an HF counterpart (timm or HF text towers, attentional pooling,
    ``logit_bias``...) raise :class:`ValueError` naming the key. The input is not modified; tensors are new
    (contiguous) copies.
    """
    sd = _plain_copy(state_dict, "open_clip_to_hf")
    out: StateDict = {}
    for key, t in sd.items():
        if key in _OPEN_CLIP_DERIVED:
            continue
        if key in _PLAIN:
            out[_PLAIN[key]] = t.clone()
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = t.t().contiguous()
            continue
        for oc_prefix, hf_prefix in _TOWERS:
            if key.startswith(oc_prefix):
                idx, _, rest = key[len(oc_prefix) :].partition(".")
                base = f"{hf_prefix}{idx}."
                if rest in _BLOCK:
                    out[base + _BLOCK[rest]] = t.clone()
                elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                    if t.shape[0] % 3:
                        raise ValueError(
                            f"open_clip_to_hf: {key!r} has {t.shape[0]} rows, not a multiple of 3 (q, k, v)"
                        )
                    suffix = "weight" if rest.endswith("weight") else "bias"
                    for part, chunk in zip(("q", "k", "v"), t.chunk(3, dim=0), strict=True):
                        out[f"{base}self_attn.{part}_proj.{suffix}"] = chunk.clone()
                else:
                    raise ValueError(f"open_clip_to_hf: key {key!r} has no Hugging Face CLIP counterpart")
                break
        else:
            raise ValueError(
                f"open_clip_to_hf: key {key!r} has no Hugging Face CLIP counterpart (only open_clip's standard ViT "
                "CLIP layout converts)"
            )
    return out


def hf_to_open_clip(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Converts an HF ``CLIPModel`` state dict into open_clip ViT CLIP keys (the inverse of :func:`open_clip_to_hf`).

    A key without an open_clip counterpart, or a block lacking one of its q/k/v projections, raises
    :class:`ValueError` naming it. The input is not modified.
    """
    sd = _plain_copy(state_dict, "hf_to_open_clip")
    plain = {v: k for k, v in _PLAIN.items()}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in sd.items():
        if key in _HF_DERIVED:
            continue
        if key in plain:
            out[plain[key]] = t.clone()
            continue
        if key in transposed:
            out[transposed[key]] = t.t().contiguous()
            continue
        for oc_prefix, hf_prefix in _TOWERS:
            if key.startswith(hf_prefix):
                idx, _, rest = key[len(hf_prefix) :].partition(".")
                base = f"{oc_prefix}{idx}."
                if rest in block:
                    out[base + block[rest]] = t.clone()
                elif rest.startswith("self_attn.") and rest[len("self_attn.") :][:7] in (
                    "q_proj.",
                    "k_proj.",
                    "v_proj.",
                ):
                    part, suffix = rest[len("self_attn.")], rest.rsplit(".", 1)[1]
                    qkv.setdefault((base, suffix), {})[part] = t
                else:
                    raise ValueError(f"hf_to_open_clip: key {key!r} has no open_clip counterpart")
                break
        else:
            raise ValueError(f"hf_to_open_clip: key {key!r} has no open_clip counterpart (expected an HF CLIPModel)")
    for (base, suffix), parts in qkv.items():
        for part in "qkv":
            if part not in parts:
                hf_base = next(h for o, h in _TOWERS if base.startswith(o))
                idx = base.rstrip(".").rsplit(".", 1)[1]
                raise ValueError(f"hf_to_open_clip: '{hf_base}{idx}.self_attn.{part}_proj.{suffix}' is missing")
        out[f"{base}attn.in_proj_{suffix}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# open_clip config fields that change the architecture away from HF CLIP's, with the value that HF CLIP matches.
_VISION_MUST = {
    "timm_model_name": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pool_type": "tok",
    "ls_init_value": None,
    "output_tokens": False,
}
_TEXT_MUST = {
    "hf_model_name": None,
    "ls_init_value": None,
    "pool_type": "argmax",
    "proj_bias": False,
    "embed_cls": False,
}


def hf_config_from_open_clip(model_cfg: Mapping[str, Any], *, quick_gelu: bool) -> transformers.CLIPConfig:
    """The HF ``CLIPConfig`` of an open_clip ViT CLIP architecture config (``open_clip.get_model_config(arch)``).

    ``quick_gelu`` must be given: it is not in the weights (OpenAI checkpoints: True; most LAION/DataComp ones:
    False) and changes every output. Fields that make the architecture differ from HF CLIP's raise
    :class:`ValueError` naming the field.
    """
    tf = _transformers()
    vis = dict(model_cfg.get("vision_cfg", {}))
    txt = dict(model_cfg.get("text_cfg", {}))
    if "embed_dim" not in model_cfg:
        raise ValueError("hf_config_from_open_clip: model_cfg lacks 'embed_dim'")
    if isinstance(vis.get("layers", 12), (list, tuple)):
        raise ValueError("hf_config_from_open_clip: vision_cfg.layers is a list (a ResNet tower); only ViTs convert")
    for where, cfg, must in (("vision_cfg", vis, _VISION_MUST), ("text_cfg", txt, _TEXT_MUST)):
        for field, ok in must.items():
            if cfg.get(field, ok) != ok:
                raise ValueError(
                    f"hf_config_from_open_clip: {where}.{field}={cfg[field]!r} has no HF CLIP equivalent "
                    f"(HF CLIP matches {ok!r})"
                )
    if model_cfg.get("quick_gelu") is not None and bool(model_cfg["quick_gelu"]) != quick_gelu:
        raise ValueError(f"hf_config_from_open_clip: model_cfg says quick_gelu={model_cfg['quick_gelu']}")
    act = "quick_gelu" if quick_gelu else "gelu"
    v_width = int(vis.get("width", 768))
    t_width = int(txt.get("width", 512))
    vision_config = {
        "hidden_size": v_width,
        "intermediate_size": int(v_width * float(vis.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vis.get("layers", 12)),
        "num_attention_heads": v_width // int(vis.get("head_width", 64)),
        "image_size": int(vis.get("image_size", 224)),
        "patch_size": int(vis.get("patch_size", 16)),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }
    text_config = {
        "hidden_size": t_width,
        "intermediate_size": int(t_width * float(txt.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(txt.get("layers", 12)),
        "num_attention_heads": int(txt.get("heads", 8)),
        "max_position_embeddings": int(txt.get("context_length", 77)),
        "vocab_size": int(txt.get("vocab_size", 49408)),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    }
    return tf.CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=int(model_cfg["embed_dim"])
    )
