"""Exact per-sample weight interpolation for a whole batch in one forward pass (see the README, "Exact mode")."""

from __future__ import annotations

from .engine import (
    DataDependentControlFlowError,
    InPlaceUpdateError,
    MaterializationBudgetError,
    NoBatchingRuleError,
    NoBatchingRuleWarning,
    UnsupportedParameterError,
)
from .transform import SampleWiseInterpolator, task_vector_coefficients

__all__ = [
    "SampleWiseInterpolator",
    "UnsupportedParameterError",
    "MaterializationBudgetError",
    "DataDependentControlFlowError",
    "InPlaceUpdateError",
    "NoBatchingRuleError",
    "NoBatchingRuleWarning",
    "task_vector_coefficients",
]
