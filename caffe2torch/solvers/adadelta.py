"""Caffe's AdaDelta solver (``adadelta_solver.cpp``)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .base import CaffeOptimizer, Scalars, TensorListOps, f32


class AdaDelta(CaffeOptimizer):
    """AdaDelta with Caffe's ``momentum`` as rho and a learning rate on top::

        h1 = m*h1 + (1-m)*g^2
        u  = g * sqrt((h2 + delta) / (h1 + delta))     # one root of the quotient, as Caffe
        h2 = m*h2 + (1-m)*u^2
        W -= local_rate * u

    History is two full sets, ``[h1_0..h1_{n-1}, h2_0..h2_{n-1}]``, as in the solverstate.
    """

    history_slots = ("sq_grad", "sq_update")

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, *,
                 momentum: float = 0.0, delta: float = 1e-8, weight_decay: float = 0.0,
                 regularization: str = "L2", foreach: bool = True) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, regularization=regularization,
                         foreach=foreach, momentum=momentum, delta=delta)

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        momentum = f32(group["momentum"])
        return {"momentum": momentum, "one_minus_momentum": f32(1.0 - momentum),
                "delta": f32(group["delta"])}

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        sq_grad, sq_update = history
        ops.axpby_(s["one_minus_momentum"], ops.mul(grads, grads), s["momentum"], sq_grad)
        ratio = ops.add(sq_update, s["delta"])
        ops.div_(ratio, ops.add(sq_grad, s["delta"]))
        update = ops.sqrt(ratio)
        ops.mul_(update, grads)  # g * root: the product commutes, bit for bit
        ops.axpby_(s["one_minus_momentum"], ops.mul(update, update), s["momentum"], sq_update)
        ops.sub_scaled_(params, update, s["local_rate"])
