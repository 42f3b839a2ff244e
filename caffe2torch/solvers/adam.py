"""Caffe's Adam solver (``adam_solver.cpp``)."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .base import CaffeOptimizer, Scalars, TensorListOps, f32


class Adam(CaffeOptimizer):
    """Adam with the bias correction folded into the rate (``t = iteration + 1``)::

        m = b1*m + (1-b1)*g;   v = b2*v + (1-b2)*g^2
        W -= (local_rate * sqrt(1-b2^t)/(1-b1^t)) * m / (sqrt(v) + delta)

    ``delta`` is added to the *uncorrected* ``sqrt(v)`` (torch.optim.Adam adds eps after the
    correction), and weight decay is plain L2 into ``g`` (Adam, not AdamW). ``momentum`` is
    b1 and ``momentum2`` is b2. History: ``[m_0..m_{n-1}, v_0..v_{n-1}]``.
    """

    history_slots = ("m", "v")
    scalars_use_iteration = True

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, *,
                 momentum: float = 0.0, momentum2: float = 0.999, delta: float = 1e-8,
                 weight_decay: float = 0.0, regularization: str = "L2",
                 foreach: bool = True) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, regularization=regularization,
                         foreach=foreach, momentum=momentum, momentum2=momentum2, delta=delta)

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        beta1, beta2 = f32(group["momentum"]), f32(group["momentum2"])
        t = self.iteration + 1
        # Caffe: pow(float, int) promotes to double; the quotient is then stored as float.
        correction = f32(math.sqrt(1.0 - math.pow(beta2, t)) / (1.0 - math.pow(beta1, t)))
        return {"beta1": beta1, "one_minus_beta1": f32(1.0 - beta1),
                "beta2": beta2, "one_minus_beta2": f32(1.0 - beta2),
                "delta": f32(group["delta"]), "step_size": f32(local_rate * correction)}

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        m, v = history
        ops.axpby_(s["one_minus_beta1"], grads, s["beta1"], m)
        ops.axpby_(s["one_minus_beta2"], ops.mul(grads, grads), s["beta2"], v)
        ops.sub_scaled_(params, ops.rms_normalized(m, v, s["delta"]), s["step_size"])
