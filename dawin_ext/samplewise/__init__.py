"""Exact per-sample weight interpolation for a whole batch in one forward pass (issue 4)."""

from __future__ import annotations

from .transform import SampleWiseInterpolator, UnsupportedParameterError, task_vector_coefficients

__all__ = ["SampleWiseInterpolator", "UnsupportedParameterError", "task_vector_coefficients"]
