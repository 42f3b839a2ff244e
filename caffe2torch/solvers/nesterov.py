"""Caffe's Nesterov solver (``nesterov_solver.cpp``)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import Scalars, TensorListOps, f32
from .sgd import SGD


class Nesterov(SGD):
    """``V_new = m*V + local_rate*g;  W -= (1+m)*V_new - m*V_old`` (step back, then over-step).

    Same constructor and history as :class:`SGD`, as in Caffe where it derives from SGDSolver.
    """

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        momentum = f32(group["momentum"])
        return {"momentum": momentum, "neg_momentum": -momentum,
                "one_plus_momentum": f32(1.0 + momentum)}

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        (velocity,) = history
        step = ops.mul(velocity, s["neg_momentum"])  # -m*V_old, then (1+m)*V_new added to it
        ops.axpby_(s["local_rate"], grads, s["momentum"], velocity)
        ops.add_scaled_(step, velocity, s["one_plus_momentum"])
        ops.sub_(params, step)
