"""Caffe's SGD solver (``sgd_solver.cpp``): momentum on the *scaled* step."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .base import CaffeOptimizer, Scalars, TensorListOps, f32


class SGD(CaffeOptimizer):
    """``V = momentum*V + local_rate*g;  W -= V``.

    Unlike ``torch.optim.SGD`` (``v = m*v + g; W -= lr*v``) the rate is folded into the
    history, so the two differ as soon as the rate changes (step/inv/poly... policies).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, *,
                 momentum: float = 0.0, weight_decay: float = 0.0, regularization: str = "L2",
                 foreach: bool = True) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, regularization=regularization,
                         foreach=foreach, momentum=momentum)

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        return {"momentum": f32(group["momentum"])}

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        (velocity,) = history
        ops.axpby_(s["local_rate"], grads, s["momentum"], velocity)
        ops.sub_(params, velocity)
