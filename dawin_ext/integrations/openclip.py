"""open_clip helpers: zero-shot heads from class names, and image encoder + head as one classifier module.

Everything here works offline: models are always created with ``pretrained=None`` (random init) and real weights
come from checkpoint files (:mod:`dawin_ext.integrations.checkpoints`). The zero-shot head is built with open_clip's own
:func:`open_clip.build_zero_shot_classifier` and tokenizer (:func:`open_clip.get_tokenizer`); architectures whose
tokenizer lives on the Hugging Face hub would need the network and are refused with a message.

The module whose state dict gets interpolated is :class:`CLIPClassifier`: ``visual.*`` (open_clip's image tower)
plus ``head.weight`` / ``head.bias``, where the head rows are the normalized class embeddings times
``exp(logit_scale)``. Its logits equal open_clip's ``logit_scale.exp() * image_features @ text_features.T``
(``+ logit_bias`` for SigLIP-style models).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.statedict import StateDict, check_keys_and_shapes

__all__ = [
    "CLIPClassifier",
    "ClassifierPair",
    "load_classifier_pair",
    "TEMPLATE_SETS",
    "TINY_MODEL_CONFIGS",
    "build_zero_shot_head",
    "classifier_state_dict",
    "create_clip_model",
    "get_templates",
    "register_model_config",
    "register_tiny_configs",
]

Template = str | Callable[[str], str]

#: Named template sets: open_clip's 80 OpenAI ImageNet prompts, its 2 "simple" ones, or a bare class name.
TEMPLATE_SETS: dict[str, Sequence[Template]] = {
    "openai": tuple(open_clip.OPENAI_IMAGENET_TEMPLATES),
    "simple": tuple(open_clip.SIMPLE_IMAGENET_TEMPLATES),
    "classname": ("{}",),
}

_TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
#: Tiny architectures (random init in well under a second) for tests and examples; the text vocabulary must stay
#: 49408 because the offline SimpleTokenizer produces ids up to that size.
TINY_MODEL_CONFIGS: dict[str, dict] = {
    "dawin-tiny-vit": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": dict(_TINY_TEXT),
    },
    "dawin-tiny-rn": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16, "patch_size": None},
        "text_cfg": dict(_TINY_TEXT),
    },
}

_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_config_dir: Path | None = None


def register_model_config(config: Mapping | str | os.PathLike[str], name: str | None = None) -> str:
    """Makes an architecture config known to open_clip (``open_clip.add_model_config``); returns its name.

    ``config`` is a JSON file (its stem becomes the name, as in open_clip) or a dict together with ``name``.
    Registering the same name twice with the same config is a no-op; with a different config it is an error.
    """
    global _config_dir
    if isinstance(config, Mapping):
        if not name:
            raise ValueError("register_model_config: a dict config needs a name")
        cfg = json.loads(json.dumps(config))  # a plain-JSON copy; also rejects non-serializable values
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"model config {str(path)!r} does not exist or is not a file")
        if path.suffix != ".json":
            raise ValueError(f"model config {str(path)!r} must be a .json file (open_clip only scans .json)")
        if name is not None and name != path.stem:
            raise ValueError(f"open_clip names a config file after its stem ({path.stem!r}), not {name!r}")
        name = path.stem
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"model config {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"model config {name!r} must be a JSON object, got {type(cfg).__name__}")
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        # open_clip silently skips such files; say why the name would not be found.
        raise ValueError(f"model config {name!r} lacks {missing[0]!r} (open_clip needs {list(_REQUIRED_CONFIG_KEYS)})")
    existing = open_clip.get_model_config(name)
    if existing is not None:
        if existing == cfg:
            return name
        raise ValueError(f"an open_clip architecture named {name!r} is already registered with a different config")
    if isinstance(config, Mapping):
        if _config_dir is None:
            _config_dir = Path(tempfile.mkdtemp(prefix="dawin_ext_model_configs_"))
        path = _config_dir / f"{name}.json"
        path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    if open_clip.get_model_config(name) is None:
        raise RuntimeError(f"open_clip did not pick up the model config {name!r} from {str(path)!r}")
    return name


def register_tiny_configs() -> list[str]:
    """Registers :data:`TINY_MODEL_CONFIGS` with open_clip and returns their names."""
    return [register_model_config(cfg, name) for name, cfg in TINY_MODEL_CONFIGS.items()]


def _check_arch(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        import difflib

        close = difflib.get_close_matches(arch, open_clip.list_models(), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown open_clip architecture {arch!r}{hint} (open_clip.list_models() lists the known ones; "
            "register a JSON config with register_model_config / --model-config)"
        )
    text_cfg = cfg.get("text_cfg", {})
    needs_hub = [k for k in ("hf_tokenizer_name", "hf_model_name") if text_cfg.get(k)]
    if needs_hub or "siglip" in arch.lower():
        what = text_cfg.get(needs_hub[0]) if needs_hub else "a SigLIP tokenizer"
        raise ValueError(
            f"open_clip architecture {arch!r} needs {what!r} from the Hugging Face hub, which dawin-ext does not "
            "fetch (it works offline); use an architecture with open_clip's built-in SimpleTokenizer"
        )
    return cfg


def _drop_random_init_warning(record: logging.LogRecord) -> bool:
    # open_clip warns that the model is randomly initialized; here that is by design (weights come from
    # checkpoints afterwards), so only that one message is dropped.
    return not str(record.msg).startswith("No pretrained weights loaded")


def create_clip_model(
    arch: str,
    *,
    pretrained_config: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> tuple[nn.Module, Callable, Callable]:
    """Creates an open_clip model at random init (``pretrained=None``); returns ``(model, preprocess, tokenizer)``.

    ``preprocess`` is open_clip's evaluation transform and ``tokenizer`` its offline tokenizer for ``arch``.
    ``pretrained_config`` names an open_clip pretrained tag (e.g. ``"openai"``) whose *metadata* is applied without
    downloading anything: its QuickGELU setting (which the weights alone do not reveal and which changes the
    outputs) and its preprocessing mean/std/interpolation/resize mode. Load the actual weights from a checkpoint
    afterwards. The model is returned in eval mode.
    """
    _check_arch(arch)
    kwargs: dict = {}
    if pretrained_config is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_config)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise ValueError(f"open_clip has no pretrained config {pretrained_config!r} for {arch!r}; known: {tags}")
        kwargs = {
            "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
            "image_mean": tag_cfg.get("mean"),
            "image_std": tag_cfg.get("std"),
            "image_interpolation": tag_cfg.get("interpolation"),
            "image_resize_mode": tag_cfg.get("resize_mode"),
        }
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_random_init_warning)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch,
            pretrained=None,
            precision=precision,
            device=device,
            pretrained_image=False,
            pretrained_text=False,  # never download base tower weights
            **kwargs,
        )
    finally:
        root_logger.removeFilter(_drop_random_init_warning)
    tokenizer = open_clip.get_tokenizer(arch)
    model.eval()
    return model, preprocess, tokenizer


def get_templates(spec: str | Sequence[Template] = "openai") -> list[Template]:
    """Resolves prompt templates: a name in :data:`TEMPLATE_SETS`, a text file with one ``{}`` template per line,
    or a sequence of ``str.format`` templates / callables."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return list(TEMPLATE_SETS[spec])
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"templates {spec!r} is neither a known set ({', '.join(TEMPLATE_SETS)}) nor an existing file"
            )
        templates: list[Template] = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        where = f"templates file {spec!r}"
    else:
        templates = list(spec)
        where = "templates"
    if not templates:
        raise ValueError(f"{where} holds no templates")
    for i, t in enumerate(templates):
        if isinstance(t, str):
            if t.count("{}") != 1:
                raise ValueError(f"{where}: template {i} ({t!r}) must contain exactly one '{{}}' for the class name")
        elif not callable(t):
            raise TypeError(f"{where}: template {i} is a {type(t).__name__}, not a str or callable")
    return templates


def _check_classnames(classnames: Sequence[str]) -> list[str]:
    if isinstance(classnames, str) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a sequence of str, got {type(classnames).__name__}")
    names = list(classnames)
    if len(names) < 2:
        raise ValueError(f"a classifier needs at least 2 class names, got {len(names)}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip():
            raise ValueError(f"class name {i} ({n!r}) must be a non-empty string")
        if n in seen:
            raise ValueError(f"class name {n!r} appears twice (positions {seen[n]} and {i})")
        seen[n] = i
    return names


@torch.no_grad()
def build_zero_shot_head(
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: str | Sequence[Template] = "openai",
    *,
    device: str | torch.device | None = None,
    use_tqdm: bool = False,
) -> tuple[Tensor, Tensor]:
    """Zero-shot head ``(weight [C, D], bias [C])`` from class names and prompt templates.

    Uses :func:`open_clip.build_zero_shot_classifier` (per class: mean of the normalized prompt embeddings,
    renormalized). The weight is scaled by ``exp(model.logit_scale)`` and the bias is ``model.logit_bias`` (zero when
    the model has none), so ``normalize(image_features) @ weight.T + bias`` are open_clip's logits.
    """
    names = _check_classnames(classnames)
    temps = get_templates(templates)
    for attr in ("encode_text", "logit_scale"):
        if not hasattr(model, attr):
            raise TypeError(f"build_zero_shot_head: the model ({type(model).__name__}) has no {attr!r}; pass a CLIP")
    if device is None:
        device = model.logit_scale.device
    text_features = open_clip.build_zero_shot_classifier(
        model, tokenizer, names, temps, num_classes_per_batch=10, device=device, use_tqdm=use_tqdm
    )  # [D, C]
    if not bool(torch.isfinite(text_features).all()):
        bad = int((~torch.isfinite(text_features)).any(0).nonzero()[0])
        raise ValueError(f"the text tower produced non-finite embeddings for class {bad} ({names[bad]!r})")
    weight = (model.logit_scale.exp().float() * text_features.float().T).contiguous()
    bias = torch.zeros(len(names), device=weight.device, dtype=weight.dtype)
    if getattr(model, "logit_bias", None) is not None:
        bias += model.logit_bias.float().to(weight.device)
    return weight, bias


def linear_head(
    head_weight: Tensor, head_bias: Tensor | None, classnames: Sequence[str] | None, out_dim: int | None, what: str
) -> nn.Linear:
    """A classification head (a copy of ``head_weight`` [C, D] and ``head_bias`` [C] or zeros) checked against the
    ``out_dim`` features that ``what`` produces (None: not checked) and the class names; errors name the shape."""
    if head_weight.dim() != 2:
        raise ValueError(f"head_weight must be [num_classes, embed_dim], got shape {tuple(head_weight.shape)}")
    num_classes, dim = head_weight.shape
    if out_dim is not None and out_dim != dim:
        raise ValueError(f"head_weight has embed_dim {dim} but {what} outputs {out_dim} features")
    if head_bias is not None and tuple(head_bias.shape) != (num_classes,):
        raise ValueError(f"head_bias must have shape ({num_classes},), got {tuple(head_bias.shape)}")
    if classnames is not None and len(classnames) != num_classes:
        raise ValueError(f"{len(classnames)} class names for a head with {num_classes} rows")
    head = nn.Linear(dim, num_classes, bias=True, device=head_weight.device, dtype=head_weight.dtype)
    with torch.no_grad():
        head.weight.copy_(head_weight)
        if head_bias is None:
            head.bias.zero_()
        else:
            head.bias.copy_(head_bias)
    return head


class _HeadClassifier(nn.Module):
    """The contract both CLIP classifiers share: ``logits = head(normalize(image_features(x)))``, with ``head`` a
    linear layer over ``classnames``. Subclasses register their towers, then call :meth:`_set_head` (the state
    dict keeps registration order), and define :meth:`_image_features`."""

    head: nn.Linear
    classnames: list[str] | None

    def _set_head(self, head: nn.Linear, classnames: Sequence[str] | None) -> None:
        self.head = head
        self.classnames = list(classnames) if classnames is not None else None

    def _image_features(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, images: Tensor) -> Tensor:
        return self.head(F.normalize(self._image_features(images), dim=-1))


class CLIPClassifier(_HeadClassifier):
    """open_clip image encoder + linear head: ``logits = normalize(visual(x)) @ head.weight.T + head.bias``.

    Its state dict (``visual.*``, ``head.weight``, ``head.bias``) is what WiSE-FT / DaWin / AdaWiSE interpolate.
    Like any container module it holds ``visual`` itself, not a copy (:meth:`from_clip` copies); the head
    tensors are copied.
    """

    def __init__(
        self,
        visual: nn.Module,
        head_weight: Tensor,
        head_bias: Tensor | None = None,
        classnames: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        head = linear_head(head_weight, head_bias, classnames, getattr(visual, "output_dim", None), "the image encoder")
        self.visual = visual  # registered before the head: the state dict keeps its key order
        self._set_head(head, classnames)

    def _image_features(self, images: Tensor) -> Tensor:
        return self.visual(images)

    @classmethod
    def from_clip(
        cls,
        model: nn.Module,
        tokenizer: Callable,
        classnames: Sequence[str],
        templates: str | Sequence[Template] = "openai",
    ) -> CLIPClassifier:
        """Zero-shot classifier from a whole open_clip model: a copy of its image tower plus the text-built head."""
        weight, bias = build_zero_shot_head(model, tokenizer, classnames, templates)
        return cls(copy.deepcopy(model.visual), weight, bias, classnames=list(classnames))


class _TextTower(nn.Module):
    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, text: Tensor, normalize: bool = False) -> Tensor:
        return self.clip.encode_text(text, normalize=normalize)


class _StatelessCLIP:
    """``encode_text`` / ``logit_scale`` / ``logit_bias`` of ``clip`` with a checkpoint's weights, without loading
    them into ``clip`` (the caller's module stays as it was)."""

    def __init__(self, clip: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
        ref = clip.state_dict()
        # Same device and dtype as the module's own tensors, as load_state_dict would copy them.
        params = {k: v.to(device=ref[k].device, dtype=ref[k].dtype) for k, v in state_dict.items()}
        self._tower = _TextTower(clip)
        self._params = {f"clip.{k}": v for k, v in params.items()}
        self.logit_scale = params["logit_scale"]
        self.logit_bias = params.get("logit_bias")

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        return torch.func.functional_call(self._tower, self._params, (text,), {"normalize": normalize})


# Checkpoint layouts that classifier_state_dict understands.
_WISE_FT_VISUAL = "image_encoder.model.visual."
_WISE_FT_HEAD = "classification_head."


def _first(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f" ... ({len(keys)} keys)" if len(keys) > n else ""
    return ", ".join(map(repr, keys[:n])) + more


def classifier_state_dict(
    state_dict: Mapping[str, Tensor],
    model: nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: str | Sequence[Template] = "openai",
    *,
    name: str = "checkpoint",
) -> StateDict:
    """Turns a checkpoint's state dict into the :class:`CLIPClassifier` layout (``visual.*``, ``head.*``).

    Understood layouts:

    * the classifier layout itself (``visual.*`` + ``head.weight`` [+ ``head.bias``; zero when absent]);
    * the wise-ft / DaWin-reference ``ImageClassifier`` layout (``image_encoder.model.visual.*`` +
      ``classification_head.weight/bias``; the text tower it may carry is ignored);
    * a whole open_clip CLIP state dict (``visual.*`` + text tower, no head): it is loaded into ``model``
      and the head is built from ``classnames`` and ``templates`` with its own text tower (run statelessly with
      :func:`torch.func.functional_call`: ``model`` itself is not modified).

    The visual keys must match ``model.visual`` exactly, and the head must have ``len(classnames)`` rows; errors
    name the checkpoint (``name``) and the first offending key.
    """
    names = _check_classnames(classnames)
    sd = dict(state_dict)
    if any(k.startswith(_WISE_FT_VISUAL) for k in sd) and f"{_WISE_FT_HEAD}weight" in sd:
        out = {"visual." + k[len(_WISE_FT_VISUAL) :]: v for k, v in sd.items() if k.startswith(_WISE_FT_VISUAL)}
        out["head.weight"] = sd[f"{_WISE_FT_HEAD}weight"]
        if f"{_WISE_FT_HEAD}bias" in sd:
            out["head.bias"] = sd[f"{_WISE_FT_HEAD}bias"]
        sd = out
    if "head.weight" in sd:
        extra = [k for k in sd if not (k.startswith("visual.") or k in ("head.weight", "head.bias"))]
        if extra:
            raise ValueError(f"{name}: classifier checkpoint has unexpected key {extra[0]!r} besides visual.*/head.*")
        weight = sd["head.weight"]
        if weight.dim() != 2:
            raise ValueError(f"{name}: 'head.weight' must be 2-D [classes, dim], got shape {tuple(weight.shape)}")
        if weight.shape[0] != len(names):
            raise ValueError(
                f"{name}: 'head.weight' has {weight.shape[0]} rows (classes) but {len(names)} class names were given"
            )
        bias = sd.get("head.bias")
        if bias is None:
            sd["head.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        elif tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: 'head.bias' has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
        head = {"head.weight": weight, "head.bias": sd["head.bias"]}
    else:
        clip_keys = set(model.state_dict().keys())
        if not any(k.startswith("visual.") for k in sd):
            raise ValueError(
                f"{name}: unrecognised checkpoint layout (first keys: {_first(sd)}); expected a CLIPClassifier "
                "(visual.*, head.*), an open_clip CLIP (visual.*, text tower) or a wise-ft ImageClassifier "
                "(image_encoder.model.visual.*, classification_head.*) state dict"
            )
        if not any(k in clip_keys and not k.startswith("visual.") for k in sd):
            raise ValueError(
                f"{name}: holds image-encoder weights but neither a classification head ('head.weight') nor a text "
                "tower to build one from"
            )
        check_keys_and_shapes(sd, model.state_dict(), name, "this open_clip architecture")
        weight, bias = build_zero_shot_head(_StatelessCLIP(model, sd), tokenizer, names, templates)
        # The head takes the checkpoint's floating dtype so that zero-shot and fine-tuned layouts stay comparable.
        dtype = next(v.dtype for k, v in sd.items() if k.startswith("visual.") and v.is_floating_point())
        head = {"head.weight": weight.to(dtype), "head.bias": bias.to(dtype)}
    out = {k: v for k, v in sd.items() if k.startswith("visual.")}
    check_keys_and_shapes(out, model.visual.state_dict(), name, "this architecture's image encoder", prefix="visual.")
    out.update(head)
    if out["head.weight"].shape[1] != getattr(model.visual, "output_dim", out["head.weight"].shape[1]):
        raise ValueError(
            f"{name}: 'head.weight' has {out['head.weight'].shape[1]} columns but the image encoder outputs "
            f"{model.visual.output_dim} features"
        )
    return out


class ClassifierPair(NamedTuple):
    """What :func:`load_classifier_pair` returns."""

    model: CLIPClassifier  #: the architecture, holding the zero-shot weights, in eval mode
    theta_zs: StateDict  #: zero-shot classifier state dict
    theta_ft: StateDict  #: fine-tuned classifier state dict
    preprocess: Callable  #: open_clip's evaluation image transform


def load_classifier_pair(
    arch: str,
    zeroshot: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    classnames: Sequence[str],
    templates: str | Sequence[Template] = "openai",
    *,
    pretrained_config: str | None = None,
    trust_pickle: bool = False,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> ClassifierPair:
    """Loads a zero-shot and a fine-tuned open_clip checkpoint as two :class:`CLIPClassifier` state dicts.

    The files are read with :func:`dawin_ext.integrations.checkpoints.load_state_dict` (safetensors or
    ``torch.load(weights_only=True)``; ``trust_pickle`` as documented there) and converted with
    :func:`classifier_state_dict`; a checkpoint without a head gets the zero-shot head from ``classnames`` and
    ``templates``. Before returning, NaN/Inf weights and any key, shape or dtype difference between the two
    raise an error naming the file and the first offending key. Floating tensors are then converted to
    ``dtype`` (fp32 by default; ``None`` keeps the checkpoints' dtype and converts the module instead).

    The result plugs straight into the methods, e.g. ``DaWin(pair.model, pair.theta_zs, pair.theta_ft)``.
    """
    from ..ops.statedict import check_compatible
    from .checkpoints import load_state_dict

    names = _check_classnames(classnames)
    temps = get_templates(templates)
    model, preprocess, tokenizer = create_clip_model(arch, pretrained_config=pretrained_config)
    thetas = []
    for label, path in (("zero-shot checkpoint", zeroshot), ("fine-tuned checkpoint", finetuned)):
        raw = load_state_dict(path, map_location="cpu", trust_pickle=trust_pickle)
        for key, t in raw.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{label} {str(path)!r}: key {key!r} holds NaN or Inf")
        thetas.append(classifier_state_dict(raw, model, tokenizer, names, temps, name=f"{label} {str(path)!r}"))
    theta_zs, theta_ft = thetas
    check_compatible([theta_zs, theta_ft], names=[f"zero-shot {str(zeroshot)!r}", f"fine-tuned {str(finetuned)!r}"])
    classifier = CLIPClassifier(model.visual, torch.zeros(len(names), model.visual.output_dim), classnames=names)
    if dtype is None:
        floating = {t.dtype for t in theta_zs.values() if t.is_floating_point()}
        if len(floating) > 1:
            raise ValueError(f"the checkpoints mix floating dtypes {sorted(map(str, floating))}; pass dtype=")
        dtype = floating.pop()
    classifier = classifier.to(device=device, dtype=dtype).eval()
    module_dtypes = {k: v.dtype for k, v in classifier.state_dict().items()}

    def convert(sd: StateDict) -> StateDict:
        return {k: v.to(device=device, dtype=module_dtypes[k]) for k, v in sd.items()}

    theta_zs, theta_ft = convert(theta_zs), convert(theta_ft)
    classifier.load_state_dict(theta_zs)
    return ClassifierPair(classifier, theta_zs, theta_ft, preprocess)
