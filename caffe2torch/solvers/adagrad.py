"""Caffe's AdaGrad solver (``adagrad_solver.cpp``)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .base import CaffeOptimizer, Scalars, TensorListOps, f32


class AdaGrad(CaffeOptimizer):
    """``h += g^2;  W -= local_rate * g / (sqrt(h) + delta)``.

    ``momentum`` is accepted only so a driver can pass the SolverParameter through: Caffe
    refuses any non-zero value ("Momentum cannot be used with AdaGrad").
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, *,
                 delta: float = 1e-8, momentum: float = 0.0, weight_decay: float = 0.0,
                 regularization: str = "L2", foreach: bool = True) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, regularization=regularization,
                         foreach=foreach, delta=delta, momentum=momentum)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            raise ValueError("Momentum cannot be used with AdaGrad "
                             f"(got momentum={group['momentum']})")

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        return {"delta": f32(group["delta"])}

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        (sum_sq,) = history
        ops.add_(sum_sq, ops.mul(grads, grads))
        ops.sub_scaled_(params, ops.rms_normalized(grads, sum_sq, s["delta"]), s["local_rate"])
