"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``), bit-exact.

Caffe computes the rate as a float (``Dtype rate``) from float proto fields, and C++'s
overloads decide the precision of each step: ``pow(float, int)`` promotes to double (step, exp,
multistep: the product with ``base_lr`` is done in double, then stored as float), while
``pow(float, float)`` and ``exp(float)`` stay float (inv, poly, sigmoid: every operation rounds
to float). Mirroring that reproduces real Caffe's rates bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .base import f32

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def _pow(x: float, y: float) -> float:
    """C's ``pow`` in double: infinities and NaN instead of Python's exceptions."""
    try:
        return math.pow(x, y)
    except OverflowError:
        return math.inf
    except ValueError:  # 0 ** negative is a pole (inf); negative ** fraction is NaN
        return math.inf if x == 0 else math.nan


def _powf(x: float, y: float) -> float:
    """C++'s ``pow(float, float)``: the double result rounded to float."""
    return f32(_pow(x, y))


def _expf(x: float) -> float:
    try:
        return f32(math.exp(x))
    except OverflowError:
        return math.inf


def _require(ok: bool, policy: str, message: str) -> None:
    if not ok:
        raise ValueError(f"lr_policy {policy!r}: {message}")


def learning_rate(policy: str, base_lr: float, iteration: int, *, gamma: float = 0.0,
                  power: float = 0.0, stepsize: int = 0, stepvalues: Sequence[int] = (),
                  max_iter: int = 0, current_step: int = 0) -> tuple[float, int]:
    """The rate for Caffe's ``iter_ == iteration``, and the new ``current_step_``.

    Call once per update, like Caffe: ``multistep`` advances ``current_step`` by at most one
    per call, and ``step`` sets it to ``iteration // stepsize``; the driver keeps it (it is
    saved in the solverstate). Keyword defaults are the SolverParameter defaults (all 0).
    The rate returned is a float32 value.
    """
    base = f32(base_lr)
    g = f32(gamma)
    it = f32(iteration)
    if policy == "fixed":
        rate = base
    elif policy == "step":
        _require(stepsize > 0, policy, f"stepsize must be > 0, got {stepsize}")
        _require(g >= 0, policy, f"gamma must be >= 0, got {gamma}")
        current_step = iteration // stepsize
        rate = f32(base * _pow(g, current_step))
    elif policy == "exp":
        _require(g >= 0, policy, f"gamma must be >= 0, got {gamma}")
        rate = f32(base * _pow(g, iteration))
    elif policy == "inv":
        _require(g >= 0, policy, f"gamma must be >= 0, got {gamma}")
        rate = f32(base * _powf(f32(1.0 + f32(g * it)), -f32(power)))
    elif policy == "multistep":
        if current_step < len(stepvalues) and iteration >= stepvalues[current_step]:
            current_step += 1
        _require(g >= 0, policy, f"gamma must be >= 0, got {gamma}")
        rate = f32(base * _pow(g, current_step))
    elif policy == "poly":
        _require(max_iter > 0, policy, f"max_iter must be > 0, got {max_iter}")
        rate = f32(base * _powf(f32(1.0 - f32(it / f32(max_iter))), f32(power)))
    elif policy == "sigmoid":
        _require(g >= 0, policy, f"gamma must be >= 0, got {gamma}")
        _require(stepsize > 0, policy, f"stepsize must be > 0, got {stepsize}")
        e = _expf(f32(-g * f32(it - f32(stepsize))))
        rate = f32(base * f32(1.0 / f32(1.0 + e)))
    else:
        raise ValueError(f"unknown lr_policy {policy!r}; Caffe supports: {', '.join(LR_POLICIES)}")
    return rate, current_step
