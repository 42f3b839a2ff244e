"""What Caffe's six solvers share, as a ``torch.optim.Optimizer`` base class.

Caffe's ``SGDSolver::ApplyUpdate`` runs, for each learnable param: ``ClipGradients`` and
``Normalize`` (both driver-level here: see :func:`clip_gradients_`, :func:`scale_gradients_`),
then ``Regularize`` (weight decay into the gradient), then the solver's
``ComputeUpdateValue`` (which turns the gradient into the step and updates the history),
and finally ``Net::Update`` (``W -= step``). :class:`CaffeOptimizer` does Regularize, calls
the subclass's update rule and applies the step; subclasses only state their rule.

Caffe trains in float32 (``caffe train`` and pycaffe only instantiate ``Solver<float>``), and
every scalar it derives (``local_rate = rate * lr_mult``, ``1 - momentum``, Adam's bias
correction) is a float32 value: the scalars here are rounded the same way (:func:`f32`) so
that updates match Caffe to the last bit or two.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

REGULARIZATION_TYPES = ("L2", "L1")


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 value, as Caffe's float arithmetic would."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:  # finite double beyond float32 range: C's cast gives infinity
        return math.copysign(math.inf, x)


Scalars = list[float]


def _inexact_sqrt(x: Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu"


class TensorListOps:
    """Elementwise ops over lists of tensors: multi-tensor ``torch._foreach_*`` or one at a time.

    Each update rule is written once against this interface, so the fast path
    (``foreach=True``) and the per-tensor path run the same primitive ops in the same order and
    round identically. Second operands are lists (one tensor or Python scalar per tensor).
    """

    def __init__(self, foreach: bool) -> None:
        self.foreach = foreach

    def _apply(self, name: str, xs: list[Tensor], *others: Sequence[Any]) -> list[Tensor]:
        if self.foreach:
            return getattr(torch, f"_foreach_{name}")(xs, *others)
        return [getattr(x, name)(*args) for x, *args in zip(xs, *others)]

    def add(self, xs: list[Tensor], ys: Sequence[Any]) -> list[Tensor]:
        return self._apply("add", xs, ys)

    def add_(self, xs: list[Tensor], ys: Sequence[Any]) -> None:
        self._apply("add_", xs, ys)

    def sub_(self, xs: list[Tensor], ys: Sequence[Any]) -> None:
        self._apply("sub_", xs, ys)

    def mul(self, xs: list[Tensor], ys: Sequence[Any]) -> list[Tensor]:
        return self._apply("mul", xs, ys)

    def mul_(self, xs: list[Tensor], ys: Sequence[Any]) -> None:
        self._apply("mul_", xs, ys)

    def div(self, xs: list[Tensor], ys: Sequence[Any]) -> list[Tensor]:
        return self._apply("div", xs, ys)

    def sqrt(self, xs: list[Tensor]) -> list[Tensor]:
        """Correctly rounded root, as Caffe's ``powx(x, 0.5)`` and CUDA's ``sqrtf`` give.

        torch's float32 sqrt on CPU (MKL VML) is 1 ulp off for ~1 element in 6; the root of
        the float64 value, rounded back, is exact.
        """
        if not any(_inexact_sqrt(x) for x in xs):
            return self._apply("sqrt", xs)
        roots = self._apply("sqrt", [x.double() if _inexact_sqrt(x) else x for x in xs])
        return [r.to(x.dtype) for r, x in zip(roots, xs)]

    def sign(self, xs: list[Tensor]) -> list[Tensor]:
        return self._apply("sign", xs)

    def axpby_(self, a: Scalars, xs: list[Tensor], b: Scalars, ys: list[Tensor]) -> None:
        """``ys = a*xs + b*ys`` in place, as ``caffe_cpu_axpby`` does it: scale ``ys``, then add."""
        self.mul_(ys, b)
        self.add_(ys, self.mul(xs, a))

    def rms_scaled(self, xs: list[Tensor], hs: list[Tensor], delta: Scalars,
                   rate: Scalars) -> list[Tensor]:
        """``rate * xs / (sqrt(hs) + delta)``: AdaGrad/RMSProp/Adam add delta *after* the root."""
        return self.mul(self.div(xs, self.add(self.sqrt(hs), delta)), rate)


class CaffeOptimizer(torch.optim.Optimizer):
    """Base of the Caffe update rules: param groups, Regularize, history blobs, iteration.

    Param group keys: ``lr`` (the solver's current rate, as ``GetLearningRate`` returns it),
    ``lr_mult`` and ``decay_mult`` (the layer's ``param {}`` multipliers, default 1),
    ``weight_decay`` (default 0) and ``regularization`` (``"L2"`` or ``"L1"``), plus the
    subclass's hyper-parameters. Caffe's ``local_rate = lr * lr_mult`` and
    ``local_decay = weight_decay * decay_mult`` are per group.

    Iteration: :meth:`step` uses :attr:`iteration` as Caffe's ``iter_`` (Adam's ``t`` is
    ``iteration + 1``) and then increments it, as ``Solver::Step`` does after each update, so
    a plain PyTorch loop behaves like Caffe. A driver restoring a ``.solverstate`` calls
    :meth:`set_iteration`; it sets the rate with :meth:`set_lr` before each step.

    Params whose ``.grad`` is None are skipped (their history is left untouched). Caffe
    always has a diff, zero when unused, and still decays history and applies weight decay to
    such params: a driver wanting Caffe's exact behaviour gives them zero gradients.
    """

    #: State keys of the history blobs, in the order Caffe appends them to ``history_``.
    history_slots: ClassVar[tuple[str, ...]] = ("history",)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], lr: float, *,
                 weight_decay: float = 0.0, regularization: str = "L2", foreach: bool = True,
                 **hyper: float) -> None:
        defaults = dict(lr=lr, lr_mult=1.0, decay_mult=1.0, weight_decay=weight_decay,
                        regularization=regularization, **hyper)
        super().__init__(params, defaults)
        self.foreach = foreach
        self.iteration = 0

    # -- configuration --------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["regularization"] not in REGULARIZATION_TYPES:
            raise ValueError(f"{type(self).__name__}: unknown regularization type "
                             f"{group['regularization']!r}; expected one of "
                             f"{', '.join(REGULARIZATION_TYPES)}")
        self._check_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Reject hyper-parameters Caffe's constructor would CHECK-fail on."""

    def set_lr(self, rate: float) -> None:
        """Set the solver's current rate (``GetLearningRate``'s result) in every group."""
        for group in self.param_groups:
            group["lr"] = rate

    def set_iteration(self, iteration: int) -> None:
        """Set Caffe's ``iter_`` (completed updates), e.g. after restoring a solverstate."""
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        self.iteration = int(iteration)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["iteration"] = self.iteration
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.iteration = int(state_dict.get("iteration", 0))

    # -- history blobs (the .solverstate contents) ----------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _ensure_history(self) -> None:
        """Create zero history for every param: Caffe keeps a slot even for never-updated ones."""
        for p in self._all_params():
            state = self.state[p]
            for slot in self.history_slots:
                if slot not in state:
                    state[slot] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    def history(self) -> list[Tensor]:
        """History blobs in ``.solverstate`` order: slot-major, then param order over groups.

        The tensors are the live optimizer state, not copies.
        """
        self._ensure_history()
        params = self._all_params()
        return [self.state[p][slot] for slot in self.history_slots for p in params]

    def load_history(self, blobs: Sequence[Tensor | np.ndarray]) -> None:
        """Copy history blobs (e.g. from a ``.solverstate``) into the state, checked first.

        A blob may carry extra leading 1s (legacy 4-D ``num/channels/height/width`` blobs).
        """
        name = type(self).__name__
        targets = self.history()
        if len(blobs) != len(targets):
            raise ValueError(f"{name}: expected {len(targets)} history blobs, got {len(blobs)}")
        n_params = len(self._all_params())
        sources = []
        for i, (target, blob) in enumerate(zip(targets, blobs)):
            source = torch.as_tensor(blob)
            if _strip_leading_ones(source.shape) != _strip_leading_ones(target.shape):
                raise ValueError(f"{name}: history blob {i} (param {i % n_params}) has shape "
                                 f"{tuple(source.shape)}, expected {tuple(target.shape)}")
            sources.append(source.reshape(target.shape))
        for target, source in zip(targets, sources):
            target.copy_(source)

    # -- the update -----------------------------------------------------------------------

    def _rule_scalars(self, group: dict[str, Any], local_rate: float) -> dict[str, float]:
        """The subclass's per-group float32 scalars, from its hyper-parameters."""
        raise NotImplementedError

    def _update(self, ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                history: list[list[Tensor]], s: dict[str, Scalars]) -> None:
        """Caffe's ComputeUpdateValue + Net::Update on regularized gradients.

        ``history[k]`` holds slot ``k``'s tensors and ``s[name]`` one scalar per tensor.
        """
        raise NotImplementedError

    def _group_scalars(self, group: dict[str, Any]) -> dict[str, float]:
        local_rate = f32(f32(group["lr"]) * f32(group["lr_mult"]))
        local_decay = f32(f32(group["weight_decay"]) * f32(group["decay_mult"]))
        return {"local_rate": local_rate, "local_decay": local_decay,
                **self._rule_scalars(group, local_rate)}

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Caffe update (Regularize, ComputeUpdateValue, W -= step), then ``iteration += 1``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_history()
        params: list[Tensor] = []
        grads: list[Tensor] = []
        l1: list[bool] = []
        history: list[list[Tensor]] = [[] for _ in self.history_slots]
        scalars: dict[str, Scalars] = {}
        for group in self.param_groups:
            group_scalars = self._group_scalars(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                params.append(p)
                grads.append(p.grad)
                l1.append(group["regularization"] == "L1")
                for slot, tensors in zip(self.history_slots, history):
                    tensors.append(self.state[p][slot])
                for key, value in group_scalars.items():
                    scalars.setdefault(key, []).append(value)
        if params:
            ops = TensorListOps(self.foreach)
            grads = _regularize(ops, params, grads, scalars["local_decay"], l1)
            self._update(ops, params, grads, history, scalars)
        self.iteration += 1
        return loss


def _regularize(ops: TensorListOps, params: list[Tensor], grads: list[Tensor],
                decays: Scalars, l1: list[bool]) -> list[Tensor]:
    """Caffe's Regularize: ``g + decay*W`` (L2) or ``g + decay*sign(W)`` (L1), skipped at decay 0.

    Returns new gradient tensors; ``.grad`` itself is left as backward produced it.
    """
    grads = list(grads)
    for use_l1 in (False, True):
        idx = [i for i, (d, k) in enumerate(zip(decays, l1)) if d != 0 and k == use_l1]
        if not idx:
            continue
        weights = [params[i] for i in idx]
        penalty = ops.mul(ops.sign(weights) if use_l1 else weights, [decays[i] for i in idx])
        for i, g in zip(idx, ops.add([grads[i] for i in idx], penalty)):
            grads[i] = g
    return grads


def _strip_leading_ones(shape: Sequence[int]) -> tuple[int, ...]:
    dims = list(shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    return tuple(dims)


def _grads(params: Iterable[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


@torch.no_grad()
def clip_gradients_(params: Iterable[Tensor], clip: float) -> float:
    """Caffe's ClipGradients: scale all diffs by ``clip/norm`` when their global L2 norm > clip.

    Returns the norm (computed before scaling). A negative ``clip`` (Caffe's default -1) is
    "off": nothing is scaled. Params without ``.grad`` count as zero.
    """
    grads = _grads(params)
    if not grads:
        return 0.0
    device = grads[0].device
    norms = torch.stack([torch.linalg.vector_norm(g).to(device) for g in grads])
    norm = f32(float(torch.linalg.vector_norm(norms)))
    if 0 <= clip < norm:
        torch._foreach_mul_(grads, f32(f32(clip) / norm))
    return norm


@torch.no_grad()
def scale_gradients_(params: Iterable[Tensor], factor: float) -> None:
    """Scale every diff in place (Caffe's Normalize uses ``factor = 1/iter_size``)."""
    grads = _grads(params)
    if grads:
        torch._foreach_mul_(grads, f32(factor))
