"""Sample-wise handling of the raw parameters of open_clip's towers.

open_clip uses some parameters outside any nn.Linear / nn.LayerNorm: the class token, the positional embeddings,
the final projections and the attention-pool projections of ModifiedResNet. The wrappers below own the code that
uses them and otherwise call the (already transformed) submodules of the wrapped tower, mirroring open_clip 3.x.
open_clip is never imported here: towers are recognised by class name and module, so it stays optional.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import AffineStack, CoefficientState, VectorStack, _per_source

__all__ = ["is_open_clip", "OPEN_CLIP_RAW_PARAMS"]


def is_open_clip(module: nn.Module, cls_name: str) -> bool:
    t = type(module)
    return t.__name__ == cls_name and t.__module__.startswith("open_clip")


# Raw (non-submodule) parameters each wrapper takes over, by open_clip class name.
OPEN_CLIP_RAW_PARAMS = {
    "VisionTransformer": ("class_embedding", "positional_embedding", "proj"),
    "TextTransformer": ("positional_embedding", "text_projection", "cls_emb"),
    "CLIP": ("positional_embedding", "text_projection"),
}


def _proj_stack(sources, key: str, state: CoefficientState, name: str) -> AffineStack:
    """``x @ P`` with P ``[in, out]`` is F.linear with weight ``P^T``."""
    return AffineStack([sd[key].t() for sd in sources], None, state, name)


def _batch_expand(stack: VectorStack, batch: int) -> Tensor:
    """A merged parameter is ``[B, ...]`` when it varies and unbatched when constant; make it ``[B, ...]``."""
    p = stack.merged()
    return p if stack.varies else p.unsqueeze(0).expand(batch, *p.shape)


class SampleWiseVisionTransformer(nn.Module):
    """open_clip VisionTransformer with per-sample class token, positional embedding and output projection."""

    def __init__(self, vit: nn.Module, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState):
        super().__init__()
        self.name = prefix.rstrip(".") or "VisionTransformer"
        if getattr(vit, "attn_pool", None) is not None:
            raise ValueError(f"{self.name}: VisionTransformer with attentional pooling is not supported")
        for attr in ("_pool", "patch_dropout", "ln_pre", "transformer", "conv1"):
            if not hasattr(vit, attr):
                raise ValueError(f"{self.name}: unsupported open_clip VisionTransformer version (no {attr!r})")
        self.vit = vit
        self.state = state
        self.class_embedding = VectorStack(_per_source(sources, prefix + "class_embedding"), state)
        self.positional_embedding = VectorStack(_per_source(sources, prefix + "positional_embedding"), state)
        self.proj = _proj_stack(sources, prefix + "proj", state, self.name + ".proj") if vit.proj is not None else None
        # The wrapper owns these now; free the tower's copies.
        for attr in ("class_embedding", "positional_embedding", "proj"):
            if getattr(vit, attr, None) is not None:
                delattr(vit, attr)
                setattr(vit, attr, None)

    def forward(self, x: Tensor):
        vit = self.vit
        self.state.check_batch(x.shape[0], self.name)
        x = vit.conv1(x)
        b = x.shape[0]
        x = x.reshape(b, x.shape[1], -1).permute(0, 2, 1)
        cls = _batch_expand(self.class_embedding, b).to(x.dtype)
        x = torch.cat([cls.unsqueeze(1), x], dim=1)
        x = x + self.positional_embedding.merged().to(x.dtype)
        x = vit.patch_dropout(x)
        x = vit.ln_pre(x)
        x = vit.transformer(x)
        pooled, tokens = vit._pool(x)
        if self.proj is not None:
            pooled = self.proj.linear(pooled)
        if vit.output_tokens:
            return pooled, tokens
        return pooled


class SampleWiseAttentionPool2d(nn.Module):
    """open_clip ModifiedResNet's AttentionPool2d with per-sample positional embedding and q/k/v/c projections.

    Only the query of the pooled (mean) token reaches the output, so only that query is projected.
    """

    def __init__(self, pool: nn.Module, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState):
        super().__init__()
        self.name = prefix.rstrip(".")
        self.state = state
        self.num_heads = pool.num_heads
        self.positional_embedding = VectorStack(_per_source(sources, prefix + "positional_embedding"), state)

        def stack(names: Sequence[str], label: str) -> AffineStack:
            w = [torch.cat([sd[prefix + f"{n}.weight"] for n in names], 0) for sd in sources]
            bias = [torch.cat([sd[prefix + f"{n}.bias"] for n in names], 0) for sd in sources]
            return AffineStack(w, bias, state, f"{self.name}.{label}")

        self.q = stack(["q_proj"], "q_proj")
        self.kv = stack(["k_proj", "v_proj"], "k_proj+v_proj")
        self.c = stack(["c_proj"], "c_proj")

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        self.state.check_batch(b, self.name)
        x = x.reshape(b, c, -1).permute(0, 2, 1)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        x = x + self.positional_embedding.merged().to(x.dtype)
        h = self.num_heads
        hd = c // h
        q = self.q.linear(x[:, :1]).view(b, 1, h, hd).transpose(1, 2)
        k, v = self.kv.linear(x).split(c, dim=-1)
        k = k.reshape(b, -1, h, hd).transpose(1, 2)
        v = v.reshape(b, -1, h, hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, hd]
        return self.c.linear(o.transpose(1, 2).reshape(b, c))


def _project(stack: AffineStack | nn.Module | None, pooled: Tensor) -> Tensor:
    return pooled if stack is None else (stack.linear(pooled) if isinstance(stack, AffineStack) else stack(pooled))


class SampleWiseTextTransformer(nn.Module):
    """open_clip TextTransformer with per-sample positional embedding, class token and text projection."""

    def __init__(self, tt: nn.Module, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState):
        super().__init__()
        self.name = prefix.rstrip(".") or "TextTransformer"
        for attr in ("_build_additive_mask", "transformer", "ln_final", "token_embedding"):
            if not hasattr(tt, attr):
                raise ValueError(f"{self.name}: unsupported open_clip TextTransformer version (no {attr!r})")
        self.tt = tt
        self.state = state
        self.positional_embedding = VectorStack(_per_source(sources, prefix + "positional_embedding"), state)
        self.cls_emb = VectorStack(_per_source(sources, prefix + "cls_emb"), state) if tt.cls_emb is not None else None
        self.text_projection = None
        if isinstance(tt.text_projection, nn.Parameter):
            self.text_projection = _proj_stack(
                sources, prefix + "text_projection", state, self.name + ".text_projection"
            )
        elif tt.text_projection is not None:
            self.text_projection = tt.text_projection  # an nn.Linear: transformed like any other
        # tt.cls_emb stays: _build_additive_mask tests it for presence (its value is never read from there).
        delattr(tt, "positional_embedding")
        tt.positional_embedding = None
        if isinstance(self.text_projection, AffineStack):
            delattr(tt, "text_projection")
            tt.text_projection = None

    def forward(self, text: Tensor):
        tt = self.tt
        self.state.check_batch(text.shape[0], self.name)
        from open_clip.transformer import text_global_pool

        cast_dtype = tt.transformer.get_cast_dtype()
        b, seq_len = text.shape
        x = tt.token_embedding(text).to(cast_dtype)
        if self.cls_emb is not None:
            x = torch.cat([x, _batch_expand(self.cls_emb, b).unsqueeze(1).to(x.dtype)], 1)
            seq_len += 1
        attn_mask = tt.attn_mask
        if tt.use_pad_mask or self.cls_emb is not None:
            add_mask = tt._build_additive_mask(text, seq_len, x.dtype)
            attn_mask = add_mask if attn_mask is None else attn_mask[:seq_len, :seq_len].unsqueeze(0) + add_mask
        pos = self.positional_embedding.merged()
        x = x + pos[..., :seq_len, :].to(cast_dtype)
        x = tt.transformer(x, attn_mask=attn_mask)
        if self.cls_emb is not None:
            pooled = tt.ln_final(text_global_pool(x, pool_type="last"))
            tokens = x[:, :-1]
        else:
            x = tt.ln_final(x)
            pooled = text_global_pool(x, text, pool_type=tt.pool_type, eos_token_id=getattr(tt, "eos_id", None))
            tokens = x
        pooled = _project(self.text_projection, pooled)
        if tt.output_tokens:
            return pooled, tokens
        return pooled


class SampleWiseCLIP(nn.Module):
    """open_clip CLIP whose text tower lives inline; owns ``encode_text``'s raw parameters.

    ``logit_scale`` / ``logit_bias`` enter through exp() / outside any affine op, so they must be identical in all
    sources (checked by the transform, which refuses otherwise).
    """

    def __init__(self, clip: nn.Module, sources: Sequence[dict[str, Tensor]], prefix: str, state: CoefficientState):
        super().__init__()
        self.name = prefix.rstrip(".") or "CLIP"
        self.clip = clip
        self.state = state
        self.positional_embedding = VectorStack(_per_source(sources, prefix + "positional_embedding"), state)
        self.text_projection = None
        if isinstance(clip.text_projection, nn.Parameter):
            self.text_projection = _proj_stack(
                sources, prefix + "text_projection", state, self.name + ".text_projection"
            )
            delattr(clip, "text_projection")
            clip.text_projection = None
        elif clip.text_projection is not None:
            self.text_projection = clip.text_projection
        delattr(clip, "positional_embedding")
        clip.positional_embedding = None

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        features = self.clip.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        from open_clip.transformer import text_global_pool

        clip = self.clip
        self.state.check_batch(text.shape[0], self.name + ".encode_text")
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype)
        x = x + self.positional_embedding.merged().to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        x = text_global_pool(x, text, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        x = _project(self.text_projection, x)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: Tensor | None = None, text: Tensor | None = None):
        clip = self.clip
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True) if text is not None else None
        if clip.output_dict:
            out = {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": clip.logit_scale.exp(),
            }
            if clip.logit_bias is not None:
                out["logit_bias"] = clip.logit_bias
            return out
        if clip.logit_bias is not None:
            return image_features, text_features, clip.logit_scale.exp(), clip.logit_bias
        return image_features, text_features, clip.logit_scale.exp()
