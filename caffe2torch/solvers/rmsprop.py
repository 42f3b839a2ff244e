"""Caffe's RMSProp solver (``rmsprop_solver.cpp``)."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .base import CaffeOptimizer, Scalars, TensorListOps, f32


class RMSProp(CaffeOptimizer):
    """``h = rms_decay*h + (1-rms_decay)*g^2;  W -= local_rate * g / (sqrt(h) + delta)``.

    No momentum and no centering (Caffe refuses momentum != 0 and rms_decay outside [0, 1)).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, *,
                 rms_decay: float = 0.99, delta: float = 1e-8, momentum: float = 0.0,
                 weight_decay: float = 0.0, regularization: str = "L2",
                 foreach: bool = True) -> None:
        super().__init__(params, lr, weight_decay=weight_decay, regularization=regularization,
                         foreach=foreach, rms_decay=rms_decay, delta=delta, momentum=momentum)

    def _check_group(self, group: dict[str, Any]) -> None:
        if group["momentum"] != 0:
            raise ValueError("Momentum cannot be used with RMSProp "
                             f"(got momentum={group['momentum']})")
        if not 0 <= group["rms_decay"] < 1:
            raise ValueError(f"rms_decay should lie in [0, 1), got {group['rms_decay']}")

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        rms_decay = f32(group["rms_decay"])
        return {"rms_decay": rms_decay, "one_minus_decay": f32(1.0 - rms_decay),
                "delta": f32(group["delta"])}

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        (mean_sq,) = history
        ops.axpby_(s["one_minus_decay"], ops.mul(grads, grads), s["rms_decay"], mean_sq)
        ops.sub_scaled_(params, ops.rms_normalized(grads, mean_sq, s["delta"]), s["local_rate"])
