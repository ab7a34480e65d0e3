"""The methods compared by the demo, each built from the package's own implementation.

Weight merges that do not depend on the test input (WiSE-FT at a fixed alpha) are built once, before timing,
as a deployment would. Everything that depends on the test set (logits, λ, the Beta-mixture fit, the
per-cluster merges, AdaWiSE's search) is part of the timed prediction.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from .scoring import EvalContext, Method, Predict, optional_import

__all__ = ["all_methods", "merged_model"]


def merged_model(ctx: EvalContext, alpha: float) -> nn.Module:
    """A copy of the architecture holding the WiSE-FT merge at ``alpha`` (``dawin_ext.methods.wise_ft.wise_ft``)."""
    (wise_ft,) = optional_import("methods.wise_ft", "wise_ft")
    model = copy.deepcopy(ctx.generalist)
    model.load_state_dict(wise_ft(ctx.generalist, ctx.specialist, alpha))
    return model.eval()


def _plain(model: nn.Module) -> Predict:
    return lambda x: model(x).argmax(-1)


def _zero_shot(ctx: EvalContext) -> Predict:
    return _plain(ctx.generalist)


def _fine_tuned(ctx: EvalContext) -> Predict:
    return _plain(ctx.specialist)


def _wise_half(ctx: EvalContext) -> Predict:
    return _plain(merged_model(ctx, 0.5))


def _wise_val(ctx: EvalContext) -> Predict:
    return _plain(merged_model(ctx, ctx.alpha_val))


def _output_ensemble(ctx: EvalContext) -> Predict:
    (output_ensemble,) = optional_import("methods.wise_ft", "output_ensemble")
    g, s = ctx.generalist, ctx.specialist
    return lambda x: output_ensemble(g(x), s(x), 0.5).argmax(-1)


def _dawin(mode: str):
    """DaWin as in the reference protocol: per evaluation set, both models' logits, λ from the entropies, a
    K=3 Beta mixture fitted on that set's λ, then each sample through its cluster's merge (``cluster``), its own
    exact per-sample merge (``exact``), or the lower-entropy model (``selective``)."""

    def build(ctx: EvalContext) -> Predict:
        (dawin_cls,) = optional_import("methods.dawin", "DaWin")
        if mode == "exact":
            optional_import("exact", "SampleWiseInterpolator")
        expertise = "selective" if mode == "selective" else "entropy"
        method = dawin_cls(
            ctx.generalist, ctx.generalist, ctx.specialist, expertise=expertise, n_clusters=3, seed=ctx.seed
        )
        run_mode = "exact" if mode == "exact" else "cluster"

        def predict(x: Tensor) -> Tensor:
            method.fit([x])
            return method.predict_dataset([x], mode=run_mode).argmax(-1)

        return predict

    return build


#: AdaWiSE's batch: the whole evaluation set, so one alpha per set, like DaWin's one mixture fit per set (each
#: batch costs a few Gaussian-process fits, about a second on this benchmark's CPU).
ADAWISE_BATCH = 100_000


def _adawise(ctx: EvalContext) -> Predict:
    """AdaWiSE with its defaults (8 forward passes per batch, warm start within a set); the warm-start state is
    reset at the start of every set so that a set's result does not depend on the order of the sets."""
    (adawise_cls,) = optional_import("methods.adawise", "AdaWiSE")
    method = adawise_cls(ctx.generalist, ctx.generalist, ctx.specialist, seed=ctx.seed)

    def predict(x: Tensor) -> Tensor:
        method.reset()
        logits = method.predict_dataset(x.split(ADAWISE_BATCH))
        predict.details = "; ".join(
            f"chosen α {h['alpha']:.2f} (evaluated α: {', '.join(f'{a:.2f}' for a in h['alphas'])})"
            for h in method.history_
        )
        return logits.argmax(-1)

    predict.details = ""
    return predict


def all_methods(alpha_val: float) -> list[Method]:
    """The table's rows, in order."""
    return [
        Method("zero-shot (generalist)", _zero_shot, "the pretrained generalist alone"),
        Method("fine-tuned (specialist)", _fine_tuned, "the specialist alone"),
        Method("WiSE-FT α=0.5", _wise_half, "static weight merge"),
        Method(f"WiSE-FT α={alpha_val:.1f} (ID val)", _wise_val, "static merge, α best on the ID validation split"),
        Method("output ensemble", _output_ensemble, "mean of the two models' probabilities"),
        Method("DaWin cluster-wise K=3", _dawin("cluster"), "entropy λ, Beta mixture K=3, one merge per cluster"),
        Method("DaWin exact per-sample", _dawin("exact"), "entropy λ, per-sample merge by the exact transform"),
        Method("DaWin selective", _dawin("selective"), "per sample, the model with the lower entropy"),
        Method(
            "AdaWiSE",
            _adawise,
            "one α per set, by Bayesian optimisation of the prediction entropy (8 forward passes)",
        ),
    ]
