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

Speed: a step runs each elementwise operation once over all params (``torch._foreach_*``) on
lists and per-param scalars that are prepared once and kept while no param group changes
(:class:`_Plan`). On CPU, ``y + s*x`` is one ``addcmul`` pass where that rounds exactly as
Caffe's multiply-then-add does (:func:`fused_scaled_add_is_exact`).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import Tensor

REGULARIZATION_TYPES = ("L2", "L1")


_F32 = struct.Struct("f")


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 value, as Caffe's float arithmetic would."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # finite double beyond float32 range: C's cast gives infinity
        return math.copysign(math.inf, x)


Scalars = list[float]


def _inexact_sqrt(x: Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu"


_FUSED_EXACT: dict[tuple[torch.device, torch.dtype], bool] = {}


def fused_scaled_add_is_exact(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``addcmul(y, x, ones, value=s)`` gives ``y + s*x`` rounded twice, as Caffe does.

    ATen's CPU kernel evaluates ``y + s*x*1`` left to right: ``s*x`` is rounded first, and a
    compiler's fused multiply-add of the rest, ``fma(s*x, 1, y)``, rounds like the plain sum.
    So one pass replaces a multiply pass and an add pass without changing a bit. This is
    checked once per device and dtype on random data (vector body and scalar tail), never
    assumed; elsewhere (CUDA computes ``y + s*(x*1)``, which a fused multiply-add rounds once)
    the two multi-tensor ops are kept.
    """
    key = (device, dtype)
    if key not in _FUSED_EXACT:
        exact = device.type == "cpu" and dtype in (torch.float32, torch.float64)
        if exact:
            gen = torch.Generator().manual_seed(0)
            x, y = (torch.randn(4099, generator=gen, dtype=dtype) for _ in range(2))
            ones, s = torch.ones((), dtype=dtype).expand_as(x), f32(0.1234567)
            want = y + x * s
            exact = (torch.equal(torch._foreach_addcmul([y], [x], [ones], [s])[0], want)
                     and torch.equal(y.clone().addcmul_(x, ones, value=s), want))
        _FUSED_EXACT[key] = exact
    return _FUSED_EXACT[key]


class TensorListOps:
    """Elementwise ops over lists of tensors: multi-tensor ``torch._foreach_*`` or one at a time.

    Each update rule is written once against this interface, so the fast path
    (``foreach=True``) and the per-tensor path run the same primitive ops in the same order and
    round identically. Second operands are lists (one tensor or Python scalar per tensor).

    ``ones``: where :func:`fused_scaled_add_is_exact` holds, broadcast 1s shaped like the
    tensors the rule works on (its params, in order); :meth:`add_scaled_` and friends then make
    one ``addcmul`` pass instead of a multiply and an add, with the same result.
    """

    def __init__(self, foreach: bool, ones: list[Tensor] | None = None) -> None:
        self.foreach = foreach
        self.ones = ones

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

    def div_(self, xs: list[Tensor], ys: Sequence[Any]) -> None:
        self._apply("div_", xs, ys)

    def sqrt(self, xs: list[Tensor]) -> list[Tensor]:
        """Correctly rounded roots (new tensors), as Caffe's ``powx(x, 0.5)`` and CUDA's
        ``sqrtf`` give.

        torch's float32 sqrt on CPU (MKL VML) is 1 ulp off for ~1 element in 6, and its float64
        one is slow on some CPUs; numpy's float32 sqrt is the IEEE instruction, exact and fast.
        """
        inexact = [_inexact_sqrt(x) for x in xs]
        if not any(inexact):
            return self._apply("sqrt", xs)
        with np.errstate(invalid="ignore"):  # negative -> NaN, as torch gives it
            return [torch.from_numpy(np.sqrt(x.detach().numpy())) if d else x.sqrt()
                    for x, d in zip(xs, inexact)]

    def sign(self, xs: list[Tensor]) -> list[Tensor]:
        return self._apply("sign", xs)

    def add_scaled_(self, ys: list[Tensor], xs: list[Tensor], a: Scalars) -> None:
        """``ys += a*xs`` in place, the product rounded before the sum (``caffe_axpy``)."""
        if self.ones is None:
            self.add_(ys, self.mul(xs, a))
        elif self.foreach:
            torch._foreach_addcmul_(ys, xs, self.ones, a)
        else:
            for y, x, one, value in zip(ys, xs, self.ones, a):
                y.addcmul_(x, one, value=value)

    def add_scaled(self, ys: list[Tensor], xs: list[Tensor], a: Scalars) -> list[Tensor]:
        """``ys + a*xs`` as new tensors, the product rounded before the sum."""
        if self.ones is None:
            return self.add(ys, self.mul(xs, a))
        if self.foreach:
            return torch._foreach_addcmul(ys, xs, self.ones, a)
        return [torch.addcmul(y, x, one, value=value)
                for y, x, one, value in zip(ys, xs, self.ones, a)]

    def sub_scaled_(self, ys: list[Tensor], xs: list[Tensor], a: Scalars) -> None:
        """``ys -= a*xs`` in place (``W -= local_rate * update``), the product rounded first."""
        if self.ones is None:
            self.sub_(ys, self.mul(xs, a))
        else:  # y + (-a)*x: negation is exact, so this rounds as y - a*x
            self.add_scaled_(ys, xs, [-value for value in a])

    def axpby_(self, a: Scalars, xs: list[Tensor], b: Scalars, ys: list[Tensor]) -> None:
        """``ys = a*xs + b*ys`` in place, as ``caffe_cpu_axpby`` does it: scale ``ys``, then add."""
        self.mul_(ys, b)
        self.add_scaled_(ys, xs, a)

    def rms_normalized(self, xs: list[Tensor], hs: list[Tensor], delta: Scalars) -> list[Tensor]:
        """``xs / (sqrt(hs) + delta)``: AdaGrad/RMSProp/Adam add delta *after* the root."""
        denominators = self.sqrt(hs)  # new tensors, so the shift can be in place
        self.add_(denominators, delta)
        return self.div(xs, denominators)


class _Plan:
    """One step's operands, kept between steps: params, history, broadcast 1s, scalars.

    Params are ordered by regularization (L2-decayed, L1-decayed, then undecayed) so that
    Regularize is one multi-tensor op per kind; within a kind they keep the groups' order.
    ``scalars[name]`` has one value per param, in the same order.
    """

    __slots__ = ("foreach", "params", "history", "ones", "scalars", "n_l2", "n_l1", "ops",
                 "l2_ops", "l1_ops")

    def __init__(self, foreach: bool, params: list[Tensor], history: list[list[Tensor]],
                 ones: list[Tensor] | None, scalars: dict[str, Scalars], n_l2: int,
                 n_l1: int) -> None:
        self.foreach, self.params, self.history, self.ones = foreach, params, history, ones
        self.scalars, self.n_l2, self.n_l1 = scalars, n_l2, n_l1
        self.ops = TensorListOps(foreach, ones)
        cut = n_l2 + n_l1
        self.l2_ops = TensorListOps(foreach, None if ones is None else ones[:n_l2])
        self.l1_ops = TensorListOps(foreach, None if ones is None else ones[n_l2:cut])

    def select(self, keep: list[int]) -> _Plan:
        """The plan for the params at positions ``keep`` only (those that have a gradient)."""
        kinds = sum(i < self.n_l2 for i in keep), sum(i < self.n_l2 + self.n_l1 for i in keep)
        return _Plan(self.foreach, [self.params[i] for i in keep],
                     [[slot[i] for i in keep] for slot in self.history],
                     None if self.ones is None else [self.ones[i] for i in keep],
                     {name: [values[i] for i in keep] for name, values in self.scalars.items()},
                     kinds[0], kinds[1] - kinds[0])

    def regularize(self, grads: list[Tensor]) -> list[Tensor]:
        """Caffe's Regularize: ``g + decay*W`` (L2) or ``g + decay*sign(W)`` (L1), skipped at
        decay 0. Returns new gradient tensors; ``.grad`` itself is left as backward produced it.
        """
        n_l2, cut = self.n_l2, self.n_l2 + self.n_l1
        decays = self.scalars["local_decay"]
        if n_l2 == len(grads):
            return self.l2_ops.add_scaled(grads, self.params, decays)
        out = []
        if n_l2:
            out += self.l2_ops.add_scaled(grads[:n_l2], self.params[:n_l2], decays[:n_l2])
        if cut > n_l2:
            signs = self.l1_ops.sign(self.params[n_l2:cut])
            out += self.l1_ops.add_scaled(grads[n_l2:cut], signs, decays[n_l2:cut])
        return out + grads[cut:]


class _Layout:
    """The param order of a :class:`_Plan` (by regularization kind, then group order) with the
    history lists and broadcast 1s in that order; kept while params and kinds stay."""

    def __init__(self, optimizer: CaffeOptimizer, key: Any, kinds: list[int]) -> None:
        self.key = key
        order = sorted((kind, g, p) for g, kind in enumerate(kinds)
                       for p in range(len(optimizer.param_groups[g]["params"])))
        self.group_of = [g for _, g, _ in order]
        self.params = [optimizer.param_groups[g]["params"][p] for _, g, p in order]
        optimizer._ensure_history(self.params)
        self.history = [[optimizer.state[p][slot] for p in self.params]
                        for slot in optimizer.history_slots]
        self.ones = _broadcast_ones(self.params)
        counts = [kind for kind, _, _ in order]
        self.n_l2, self.n_l1 = counts.count(_KINDS["L2"]), counts.count(_KINDS["L1"])

    def plan(self, foreach: bool, group_scalars: list[dict[str, float]]) -> _Plan:
        """The plan with ``group_scalars[g]`` (one dict per param group) spread per param."""
        names = group_scalars[0] if group_scalars else {}
        scalars = {name: [group_scalars[g][name] for g in self.group_of] for name in names}
        return _Plan(foreach, self.params, self.history, self.ones, scalars, self.n_l2,
                     self.n_l1)


class CaffeOptimizer(torch.optim.Optimizer):
    """Base of the Caffe update rules: param groups, Regularize, history blobs, iteration.

    Param group keys: ``lr`` (the solver's current rate, as ``GetLearningRate`` returns it),
    ``lr_mult`` and ``decay_mult`` (the layer's ``param {}`` multipliers, default 1),
    ``weight_decay`` (default 0) and ``regularization`` (``"L2"`` or ``"L1"``), plus the
    subclass's hyper-parameters. Caffe's ``local_rate = lr * lr_mult`` and
    ``local_decay = weight_decay * decay_mult`` are per group. Every step reads the groups'
    current values, as Caffe reads its ``param_`` at every update: change ``momentum`` (or any
    other key) in a group and the next step uses it.

    Iteration: :meth:`step` uses :attr:`iteration` as Caffe's ``iter_`` (Adam's ``t`` is
    ``iteration + 1``) and then increments it, as ``Solver::Step`` does after each update, so
    a plain PyTorch loop behaves like Caffe. A driver restoring a ``.solverstate`` calls
    :meth:`set_iteration`; it sets the rate with :meth:`set_lr` before each step.

    Params whose ``.grad`` is None are skipped (their history is left untouched). Caffe
    always has a diff, zero when unused, and still decays history and applies weight decay to
    such params: a driver wanting Caffe's exact behaviour gives them zero gradients.

    The param lists are the groups' own: add params with :meth:`add_param_group`, not by
    changing a group's ``params`` list in place.
    """

    #: State keys of the history blobs, in the order Caffe appends them to ``history_``.
    history_slots: ClassVar[tuple[str, ...]] = ("history",)
    #: Whether :meth:`_rule_scalars` depends on :attr:`iteration` (Adam's bias correction).
    scalars_use_iteration: ClassVar[bool] = False

    _values: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
    _plan: _Plan | None = None
    _plan_key: Any = None
    _layout: _Layout | None = None

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
        _check_regularization(type(self).__name__, group["regularization"])
        self._check_group(group)
        self._plan_key = None

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
        self._plan_key = self._layout = None  # the history tensors were replaced

    # -- history blobs (the .solverstate contents) ----------------------------------------

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _ensure_history(self, params: list[Tensor] | None = None) -> None:
        """Create zero history for every param: Caffe keeps a slot even for never-updated ones."""
        for p in self._all_params() if params is None else params:
            state = self.state[p]
            for slot in self.history_slots:
                if slot not in state:
                    state[slot] = torch.zeros_like(p)

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

    def _current_plan(self) -> _Plan:
        """The plan of the last step while no group's params or values (nor, for Adam, the
        iteration) changed. Otherwise the scalars are computed again, once per distinct set of
        group values, and the param order and history lists are kept unless a param or a
        regularization kind changed."""
        groups = self.param_groups
        if self._values is None:
            self._values = itemgetter(*self.defaults)
        values = list(map(self._values, groups))
        key = (self.foreach, self.iteration if self.scalars_use_iteration else None,
               [tuple(map(id, group["params"])) for group in groups], values)
        if self._plan is not None and key == self._plan_key:
            return self._plan
        name = type(self).__name__
        by_values: dict[tuple[Any, ...], dict[str, float]] = {}
        for group, group_values in zip(groups, values):
            _check_regularization(name, group["regularization"])
            if group_values not in by_values:
                by_values[group_values] = self._group_scalars(group)
        scalars = [by_values[v] for v in values]
        kinds = [_KINDS[group["regularization"]] if s["local_decay"] != 0 else _UNDECAYED
                 for group, s in zip(groups, scalars)]
        layout_key = (key[2], kinds)
        if self._layout is None or self._layout.key != layout_key:
            self._layout = _Layout(self, layout_key, kinds)
        self._plan = self._layout.plan(self.foreach, scalars)
        self._plan_key = key
        return self._plan

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Caffe update (Regularize, ComputeUpdateValue, W -= step), then ``iteration += 1``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._current_plan()
        grads = [p.grad for p in plan.params]
        if any(g is None or g.is_sparse for g in grads):
            if any(g is not None and g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            keep = [i for i, g in enumerate(grads) if g is not None]
            plan, grads = plan.select(keep), [grads[i] for i in keep]
        if grads:
            self._update(plan.ops, plan.params, plan.regularize(grads), plan.history,
                         plan.scalars)
        self.iteration += 1
        return loss


_KINDS = {"L2": 0, "L1": 1}
_UNDECAYED = 2  # Caffe skips Regularize where local_decay == 0


def _check_regularization(name: str, kind: str) -> None:
    if kind not in REGULARIZATION_TYPES:
        raise ValueError(f"{name}: unknown regularization type {kind!r}; expected one of "
                         f"{', '.join(REGULARIZATION_TYPES)}")


def _broadcast_ones(params: list[Tensor]) -> list[Tensor] | None:
    """A broadcast 1 shaped like each param, or None where the fused ops would not be exact."""
    if not all(fused_scaled_add_is_exact(p.device, p.dtype) for p in params):
        return None
    bases: dict[tuple[torch.device, torch.dtype], Tensor] = {}
    for p in params:
        if (p.device, p.dtype) not in bases:
            bases[p.device, p.dtype] = torch.ones((), dtype=p.dtype, device=p.device)
    return [bases[p.device, p.dtype].expand_as(p) for p in params]


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
