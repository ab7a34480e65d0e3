"""The request path of a fitted DaWin: ``DaWinPredictor(batch) -> scores``, with no avoidable work per request.

Everything that does not depend on the request (expert and cluster models, the exact engine, compiled modules) is
built once in the constructor; a request then costs the expert pass (both experts in one engine pass for small
batches, see ``fused_experts``), the coefficients and the answer pass. Engine passes switch process-global torch
settings, so they are serialised by a lock; any number of threads may call one predictor. See the README, "Serving",
for the passes, threading and ``torch.compile``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..exact import SampleWiseInterpolator
from .dawin import DaWin
from .inference import check_logits_finite, check_mode, route

__all__ = ["DaWinPredictor", "BadRequestError"]


def _functional_forward(template: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """``f(params, x)``: ``template``'s forward with the given parameters and buffers (a private eval copy, so
    that the caller's module is never touched)."""
    import copy

    base = copy.deepcopy(template).eval().requires_grad_(False)

    def forward(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.func.functional_call(base, params, (x,))

    return forward


class _BoundForward:
    """``model(x)`` through a shared compiled ``f(params, x)`` with ``model``'s own (live) tensors."""

    def __init__(self, fn: Callable[[dict[str, Tensor], Tensor], Tensor], model: nn.Module) -> None:
        self.fn = fn
        self.params = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(self.params, x)


#: ``fused_experts="auto"`` fuses the expert pass up to this batch size. Measured on the 2-core CPU (ViT-B-32,
#: benchmarks/RESULTS.md): fusing was 3-5% faster at batch 1 and 12-20% slower at batch 8 and 32, where the
#: forward is compute-bound; on GPUs, where small batches are bound by reading weights, not yet measured.
AUTO_FUSE_MAX_BATCH = 2


class BadRequestError(ValueError):
    """The request itself is wrong (shape, dtype, empty or non-finite batch): a client error, not a server one."""


class DaWinPredictor:
    """Answers ``predictor(x) -> scores [B, C]`` for a fitted :class:`~dawin_ext.DaWin` (see the module docstring).

    Args:
        dawin: a fitted (or loaded) DaWin. Its models are shared, not copied; do not re-``fit`` it while serving.
        mode: ``"cluster"`` (each sample through its cluster's model) or ``"exact"`` (per-sample weights).
        fused_experts: compute both experts' logits in one pass of the exact engine: True, False, or ``"auto"``
            (fuse batches of at most :data:`AUTO_FUSE_MAX_BATCH`; see the module docstring).
        compile: wrap the models of the request path with ``torch.compile`` (compiled on the first call of each
            batch shape; call :meth:`warmup` to pay that before serving).
        compile_options: keyword arguments for ``torch.compile`` (e.g. ``{"dynamic": False}``).
        input_shape: the shape of one sample (e.g. ``(3, 224, 224)``); requests with another shape are refused
            with :class:`BadRequestError`. None: not checked here (the model raises on a mismatch).

    Scores are what ``dawin.predict(x, mode)`` returns: logits for weight-space expertise, the chosen model's logits
    for "selective", mixed probabilities for "output_ensemble". They equal ``dawin.predict``'s up to floating-point
    rounding (the fused expert pass sums in another order than a plain forward; ``fused_experts=False`` and
    ``compile=False`` give bit-identical cluster-mode answers).
    """

    def __init__(
        self,
        dawin: DaWin,
        mode: str = "cluster",
        *,
        fused_experts: bool | str = "auto",
        compile: bool = False,
        compile_options: dict | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        if not isinstance(dawin, DaWin):
            raise TypeError(f"DaWinPredictor: expected a DaWin, got {type(dawin).__name__}")
        dawin._check_fitted()
        check_mode(mode, "DaWinPredictor")
        if dawin.expertise == "cross_entropy" and dawin.pseudo_label == "true":
            raise ValueError("DaWinPredictor: pseudo_label='true' needs labels, which requests do not carry")
        self.dawin = dawin
        self.mode = mode
        if fused_experts not in (True, False, "auto"):
            raise ValueError(f"DaWinPredictor: fused_experts must be True, False or 'auto', got {fused_experts!r}")
        self.fused_experts = fused_experts
        self.input_shape = tuple(int(s) for s in input_shape) if input_shape is not None else None
        self.device = dawin.device
        self._lock = threading.Lock()  # serialises requests that pass through the exact engine (see above)
        # Expert coefficient rows: zero-shot, fine-tuned and, for merged pseudo labels, the merged model.
        rows = [[1.0, 0.0], [0.0, 1.0]]
        if dawin._needs_merged:
            rows.append([1.0 - dawin.merged_alpha, dawin.merged_alpha])
        self._expert_rows = torch.tensor(rows, dtype=torch.float32, device=self.device)
        needs_engine = dawin.weight_space and mode == "exact" or self.fused_experts is not False
        self.engine: SampleWiseInterpolator | None = None
        if needs_engine:
            self.engine = SampleWiseInterpolator(dawin.model, [dawin.theta_zs, dawin.theta_ft])
        self.experts: list[nn.Module] = list(dawin.experts.models)
        self.clusters: list[nn.Module] = list(dawin.clusters.models) if dawin.clusters is not None else []
        self._engine_call: Callable[[Tensor, Tensor], Tensor] | None = self.engine
        if compile:
            opts = dict(compile_options or {})
            # One compiled function serves every plain model: the parameters are its inputs, not constants, so the
            # K cluster models and the experts share one graph instead of compiling K + 2 times.
            plain = torch.compile(_functional_forward(dawin.model), **opts)
            self.experts = [_BoundForward(plain, m) for m in self.experts]
            self.clusters = [_BoundForward(plain, m) for m in self.clusters]

    # ------------------------------------------------------------------ pieces
    def modules(self) -> list[nn.Module]:
        """Every module of the request path (for inspection: parameters, memory)."""
        mods = [*self.dawin.experts.models]
        if self.dawin.clusters is not None:
            mods += self.dawin.clusters.models
        if self.engine is not None:
            mods.append(self.engine)
        return mods

    def _check(self, x) -> Tensor:
        if not isinstance(x, Tensor):
            raise BadRequestError(f"expected a tensor batch, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise BadRequestError(f"empty batch (shape {tuple(x.shape)})")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise BadRequestError(
                f"each sample must have shape {self.input_shape}, got a batch of shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise BadRequestError(f"the batch must be floating point, got {x.dtype}")
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            raise BadRequestError(f"sample {int(bad.nonzero()[0, 0])} holds NaN or Inf")
        return x.to(self.device)

    def _engine(self, x: Tensor, rows: Tensor) -> Tensor:
        assert self._engine_call is not None
        return self._engine_call(x, rows)

    def expert_logits(self, x: Tensor) -> list[Tensor]:
        """The experts' logits of a (checked) batch: zero-shot, fine-tuned (and merged where needed)."""
        n = self._expert_rows.shape[0]
        b = x.shape[0]
        fuse = b <= AUTO_FUSE_MAX_BATCH if self.fused_experts == "auto" else self.fused_experts
        if not fuse:
            return [m(x) for m in self.experts[:n]]
        xr = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
        out = self._engine(xr, self._expert_rows.repeat_interleave(b, dim=0))
        return list(out.view(n, b, *out.shape[1:]).unbind(0))

    # ------------------------------------------------------------------ request
    @torch.inference_mode()
    def __call__(self, x: Tensor) -> Tensor:
        """Scores [B, C] of batch ``x`` (see the class docstring). Raises :class:`BadRequestError` for a bad batch."""
        x = self._check(x)
        if self.engine is None:
            return self._answer(x)
        with self._lock:  # the engine's global torch settings must not meet another thread's forward
            return self._answer(x)

    def _answer(self, x: Tensor) -> Tensor:
        dw = self.dawin
        logits = self.expert_logits(x)
        for name, z in zip(("zero-shot model", "fine-tuned model", "merged model"), logits, strict=False):
            check_logits_finite(z, name)
        lam, _ = dw._coefficients(logits, None, dw.offset_)
        if not dw.weight_space:
            return dw._output_space(logits[0], logits[1], lam)
        if self.mode == "exact":
            lam = lam.to(device=x.device, dtype=torch.float32)
            return self._engine(x, torch.stack([1.0 - lam, lam], dim=1))
        return route(self.clusters, x, dw.assign(lam))

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Runs one request per batch size on zeros-like random data (compiles, faults in pages); needs
        ``input_shape``."""
        if self.input_shape is None:
            raise ValueError("DaWinPredictor.warmup: needs input_shape")
        g = torch.Generator().manual_seed(0)
        for b in batch_sizes:
            self(torch.randn((int(b), *self.input_shape), generator=g).to(self.device))
