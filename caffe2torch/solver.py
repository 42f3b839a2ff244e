"""Caffe's ``Solver``/``SGDSolver`` driver (solver.cpp, sgd_solver.cpp), pycaffe's solver classes.

One :class:`Solver` owns the train net (a pycaffe :class:`~caffe2torch.net.Net` view over a
compiled :class:`~caffe2torch.compiler.CaffeNet`), the test nets (sharing the trained
parameter tensors by layer name, BatchNorm statistics included) and one of Caffe's update rules
from :mod:`caffe2torch.solvers`. ``step``/``solve``/``test``/``snapshot``/``restore`` follow
Caffe's order of operations, float32 scalar arithmetic and log text, so a run reproduces real
Caffe's losses, rates, weights and ``.solverstate`` files.

Training pass and pycaffe blobs: each iteration runs the net once per ``iter_size`` and
back-propagates from the weighted loss only. Unlike ``Net.backward`` it does not retain a
gradient for every activation blob (that costs time and memory on every iteration), so after
``step`` ``solver.net.blobs[name].data`` holds the last forward's values (losses included) but
activation ``diff`` arrays are not the training gradients. Parameter diffs keep the
accumulated gradients after the update (Caffe leaves the update step there), which is also
what ``snapshot_diff`` stores.

The nets run on pycaffe's mode (``caffe2torch.mode.set_mode_gpu``), as in Caffe, where a
solver file's ``solver_mode``/``device_id`` are read by ``caffe train`` only
(:mod:`caffe2torch.caffe_tool`).
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import sys
import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

import numpy as np
import torch

from .compiler import CaffeNet, Step
from .errors import CaffeError, FormatError
from .formats import (SolverStateRecord, read_hdf5_weights, read_net, read_solver,
                      read_solverstate, to_text, write_solverstate)
from .graph import build_graph
from .mode import device, set_random_seed
from .net import Net
from .proto import caffe_pb2
from .solvers import OPTIMIZERS, CaffeOptimizer, clip_gradients_, learning_rate, scale_gradients_
from .solvers.base import REGULARIZATION_TYPES
from .weights import copy_weights, save_caffemodel, save_hdf5

log = logging.getLogger("caffe2torch")

F32 = np.float32
SolverSource = Union[str, Path, caffe_pb2.SolverParameter]
_HYPER = ("momentum", "momentum2", "delta", "rms_decay")


class TrainingError(CaffeError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


class SolverAction(Enum):
    """What an external request (Caffe's ``SolverAction``, e.g. a signal) asks the solver to do."""

    NONE = "none"
    STOP = "stop"
    SNAPSHOT = "snapshot"


# -- log text ---------------------------------------------------------------------------------

class GlogFormatter(logging.Formatter):
    """glog's line prefix, ``I1125 18:02:58.359618 18873 solver.py:239] ``.

    Caffe's log parsers (tools/extra/parse_log.py, extract_seconds.py) read the month/day and
    time from the first two fields and the rest by regex, so our logs parse like Caffe's.
    """

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created)
        prefix = (f"{record.levelname[:1]}{when:%m%d %H:%M:%S}.{when.microsecond:06d} "
                  f"{record.process:5d} {record.filename}:{record.lineno}] ")
        text = prefix + record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def log_to_stderr(level: int = logging.INFO) -> logging.Handler:
    """Print the ``caffe2torch`` log to stderr in glog's format, as Caffe's tools do."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(GlogFormatter())
    log.addHandler(handler)
    log.setLevel(level)
    return handler


def fmt(value: float) -> str:
    """A number as C++'s ``ostream << float`` prints it (6 significant digits)."""
    return "%g" % float(value)


def _loss_note(weight: float, value: float) -> str:
    return f" (* {fmt(weight)} = {fmt(F32(weight) * F32(value))} loss)" if weight else ""


# -- building the nets ------------------------------------------------------------------------

def _find(path: str, solver_dir: Path | None, what: str) -> Path:
    """A path named in a solver: from the working directory as in Caffe, else beside the solver."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    beside = solver_dir / candidate if solver_dir is not None else None
    if beside is not None and not candidate.is_absolute() and beside.exists():
        return beside
    where = f" or in {solver_dir}" if solver_dir is not None else ""
    raise FormatError(path, f"{what} not found (looked in the working directory{where})")


# -- running nets -----------------------------------------------------------------------------

Outputs = list[tuple[str, np.ndarray]]


def feed_inputs(net: Net, device: torch.device) -> dict[str, torch.Tensor]:
    """Input blobs from the Net view, where pycaffe users write them."""
    return {name: net.blobs[name]._data.to(device) for name in net.module.input_names}


def _run(net: Net, feed: dict[str, torch.Tensor], seen: dict[str, torch.Tensor]
         ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """One forward pass of the compiled net, remembering each blob's last value in ``seen``."""
    def record(step: Step, outs: tuple[torch.Tensor, ...]) -> None:
        for top, value in zip(step.tops, outs):
            seen[top] = value
    return net.module.run(feed, keep_all=False, observer=record)


def _publish(net: Net, seen: dict[str, torch.Tensor]) -> None:
    """Show a pass's blob values in the Net view (references, not copies)."""
    for name, value in seen.items():
        net.blobs[name]._set(value)


def _flat_outputs(module: CaffeNet, env: dict[str, torch.Tensor]) -> Outputs:
    return [(name, env[name].detach().to("cpu", torch.float32).reshape(-1).numpy())
            for name in module.output_names]


def forward_scores(net: Net, device: torch.device) -> tuple[np.float32, Outputs]:
    """Caffe's ``Net::Forward(&loss)`` without gradients: the loss and every output element
    (Caffe's output order); the Net view's blobs get the pass's values."""
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        env, loss = _run(net, feed_inputs(net, device), seen)
    _publish(net, seen)
    return F32(0 if loss is None else loss.item()), _flat_outputs(net.module, env)


class OutputSums:
    """Float32 running sums of the loss and of every output element over batches, as
    ``Solver::Test`` and ``caffe test`` keep them."""

    def __init__(self) -> None:
        self.loss = F32(0)
        self.outputs: Outputs = []

    def add(self, loss: np.float32, outputs: Outputs) -> None:
        self.loss = F32(self.loss + loss)
        self.outputs = outputs if not self.outputs else \
            [(name, total + out) for (name, total), (_, out) in zip(self.outputs, outputs)]

    def means(self, count: int) -> Outputs:
        return [(name, (total / F32(count)).astype(F32)) for name, total in self.outputs]


def output_lines(net: Net, values: Outputs) -> list[tuple[int, str, str]]:
    """``(index, name, "value (* w = x loss)")`` for every output element, as Caffe logs them."""
    weights = {name: 0.0 for name in net.module.output_names}
    for step in net.module.steps:
        for top, weight in zip(step.tops, step.loss_weights):
            if top in weights and weight:
                weights[top] = weight
    lines = []
    for name, array in values:
        for value in array:
            lines.append((len(lines), name, fmt(value) + _loss_note(weights[name], value)))
    return lines


def upgrade_snapshot_prefix(param: caffe_pb2.SolverParameter, solver_file: str | Path) -> None:
    """Caffe's ``UpgradeSnapshotPrefixProperty`` (applied when a solver is read from a file).

    Unset: the solver file's path without its extension. A directory: that directory plus the
    solver file's stem.
    """
    path = Path(solver_file)
    if not param.HasField("snapshot_prefix"):
        param.snapshot_prefix = str(path.with_suffix(""))
        log.info("snapshot_prefix was not specified and is set to %s", param.snapshot_prefix)
    elif Path(param.snapshot_prefix).is_dir():
        param.snapshot_prefix = str(Path(param.snapshot_prefix) / path.stem)
        log.info("snapshot_prefix was a directory and is replaced to %s", param.snapshot_prefix)


def _load_solver_param(source: SolverSource) -> tuple[caffe_pb2.SolverParameter, Path | None]:
    """The (upgraded) SolverParameter and the folder of its file (None for a message)."""
    if isinstance(source, caffe_pb2.SolverParameter):
        param = caffe_pb2.SolverParameter()
        param.CopyFrom(source)
        return param, None
    param = read_solver(source)
    upgrade_snapshot_prefix(param, source)
    return param, Path(source).parent


def _read_weights(module: CaffeNet, path: str | Path) -> None:
    """Caffe's ``CopyTrainedLayersFrom``: a binary .caffemodel, or HDF5 for ``*.h5``."""
    copy_weights(module, read_hdf5_weights(path) if str(path).endswith(".h5") else path)


# -- the solver -------------------------------------------------------------------------------

class Solver:
    """Caffe's solver: ``Solver(path_or_SolverParameter)``; pycaffe's ``caffe.get_solver``.

    Subclasses (``SGDSolver``, ``AdamSolver``, ...) fix the update rule as pycaffe's classes do;
    on this base class the file's ``type`` decides.

    ``param`` is the solver's own SolverParameter, Caffe's ``param_``, which ``ApplyUpdate``
    reads at every update: a change to ``base_lr`` or the lr policy's fields, ``momentum``,
    ``momentum2``, ``delta``, ``rms_decay``, ``weight_decay``, ``regularization_type``,
    ``clip_gradients`` or ``iter_size`` counts from the next update on, the history carrying
    over as in Caffe. (BVLC pycaffe's ``solver.param`` is a copy, with only ``max_iter``,
    ``display``, ``layer_wise_reduce`` and ``base_lr`` exposed, so changing it there does
    nothing; NVIDIA Caffe's ``solver.param = p`` replaces the parameters, as assigning does
    here.)
    """

    solver_type: ClassVar[str | None] = None

    def __init__(self, solver: SolverSource, *, solver_dir: str | Path | None = None):
        param, own_dir = _load_solver_param(solver)
        self.solver_dir = Path(solver_dir) if solver_dir is not None else own_dir
        if self.solver_type is not None:
            param.type = self.solver_type
        self.param = param
        log.info("Initializing solver from parameters: \n%s", to_text(param))
        if param.average_loss < 1:
            raise CaffeError(f"average_loss should be >= 1, got {param.average_loss}")
        if param.type not in OPTIMIZERS:
            raise CaffeError(f"unknown solver type '{param.type}'; known types: "
                             f"{', '.join(OPTIMIZERS)}")
        self._check_snapshot_prefix()
        if param.random_seed >= 0:
            set_random_seed(param.random_seed)
        self.device = device()
        self.net = self._train_net()
        self.test_nets = self._test_nets()
        for test_net in self.test_nets:
            test_net.share_with(self.net)
        self.optimizer = self._make_optimizer()
        self._update_values = self._hyper_parameters()
        self._params = [lp.param for lp in self.net.module.learnable]
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self.action_request: Callable[[], SolverAction] | None = None
        self.test_scores: list[list[float]] = [[] for _ in self.test_nets]
        self._callbacks: list[tuple[Callable[[], None], Callable[[], None]]] = []
        self._losses: list[np.float32] = []
        self.smoothed_loss = F32(0)
        self._last_snapshot: Path | None = None
        log.info("Solver scaffolding done.")

    # -- construction -----------------------------------------------------------------------
    def _check_snapshot_prefix(self) -> None:
        """Caffe's ``CheckSnapshotWritePermissions``: fail now, not after hours of training."""
        if not self.param.snapshot:
            return
        if not self.param.HasField("snapshot_prefix"):
            raise CaffeError("In solver params, snapshot is specified but snapshot_prefix is not")
        folder = Path(self.param.snapshot_prefix).parent
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise CaffeError(f"Cannot write to snapshot prefix '{self.param.snapshot_prefix}'. "
                             "Make sure that the directory exists and is writeable.")

    def _build(self, source: str | caffe_pb2.NetParameter, phase: int,
               state: caffe_pb2.NetState | None, what: str) -> Net:
        """A net with Caffe's NetState precedence: phase < the net's own state < the solver's."""
        if isinstance(source, str):
            path = _find(source, self.solver_dir, what)
            net_param, locations = read_net(path)
            base_dir: Path | None = path.parent
        else:
            net_param, locations = read_net(source)
            base_dir = self.solver_dir
        net_state = caffe_pb2.NetState(phase=phase)
        net_state.MergeFrom(net_param.state)
        if state is not None:
            net_state.MergeFrom(state)
        module = CaffeNet(build_graph(net_param, net_state, locations), base_dir=base_dir)
        for weights in self.param.weights:  # Caffe's LoadNetWeights, for every net it builds
            for name in weights.split(","):
                log.info("Finetuning from %s", name)
                _read_weights(module, _find(name, self.solver_dir, "weights file"))
        return Net(source, net_state.phase, module=module)

    def _train_net(self) -> Net:
        p = self.param
        given = [f for f in ("net", "net_param", "train_net", "train_net_param") if p.HasField(f)]
        if len(given) != 1:
            raise CaffeError("SolverParameter must specify exactly one train net using one of "
                             f"these fields: net, net_param, train_net, train_net_param (got "
                             f"{', '.join(given) or 'none'})")
        field = given[0]
        source = getattr(p, field)
        log.info("Creating training net %s", f"from {field} file: {source}"
                 if isinstance(source, str) else f"specified in {field}.")
        return self._build(source, caffe_pb2.TRAIN, p.train_state, "train net")

    def _test_nets(self) -> list[Net]:
        """Caffe's ``InitTestNets``: test_net_param, test_net files, then the generic net."""
        p = self.param
        sources: list[tuple[str, str | caffe_pb2.NetParameter]] = \
            [("test_net_param", m) for m in p.test_net_param]
        sources += [(f"test_net file: {f}", f) for f in p.test_net]
        if p.HasField("net") and p.HasField("net_param"):
            raise CaffeError("Both net_param and net_file may not be specified.")
        generic = p.HasField("net") or p.HasField("net_param")
        if len(p.test_iter) < len(sources) or (not generic and len(p.test_iter) != len(sources)):
            raise CaffeError(f"test_iter must be specified for each test network: "
                             f"{len(p.test_iter)} test_iter for {len(sources)} test nets")
        for _ in range(len(p.test_iter) - len(sources)):
            sources.append(("net_param", p.net_param) if p.HasField("net_param")
                           else (f"net file: {p.net}", p.net))
        if p.test_state and len(p.test_state) != len(sources):
            raise CaffeError("test_state must be unspecified or specified once per test net.")
        if sources and p.test_interval <= 0:
            raise CaffeError("test_interval must be > 0 when the solver has test nets")
        nets = []
        for i, (label, source) in enumerate(sources):
            log.info("Creating test net (#%d) specified by %s", i, label)
            state = p.test_state[i] if p.test_state else None
            nets.append(self._build(source, caffe_pb2.TEST, state, f"test net #{i}"))
        return nets

    def _make_optimizer(self) -> CaffeOptimizer:
        """The update rule, one param group per run of params with equal lr/decay multipliers.

        Groups keep Caffe's ``learnable_params`` order, which is the history order.
        """
        cls = OPTIMIZERS[self.param.type]
        groups: list[dict[str, Any]] = []
        for lp in self.net.module.learnable:
            if groups and (groups[-1]["lr_mult"], groups[-1]["decay_mult"]) == \
                    (lp.lr_mult, lp.decay_mult):
                groups[-1]["params"].append(lp.param)
            else:
                groups.append({"params": [lp.param], "lr_mult": lp.lr_mult,
                               "decay_mult": lp.decay_mult})
        accepted = inspect.signature(cls.__init__).parameters
        hyper = {k: getattr(self.param, k) for k in _HYPER if k in accepted}
        try:
            return cls(groups, self.param.base_lr, weight_decay=self.param.weight_decay,
                       regularization=self.param.regularization_type, **hyper)
        except ValueError as exc:
            raise CaffeError(f"{self.param.type} solver: {exc}") from None

    def _hyper_parameters(self) -> tuple[Any, ...]:
        """``weight_decay``, ``regularization_type``, then the ``_HYPER`` fields, from ``param``."""
        p = self.param
        return (p.weight_decay, p.regularization_type, *[getattr(p, k) for k in _HYPER])

    def _sync_hyper_parameters(self) -> None:
        """Give the update rule ``param``'s current values (Caffe reads ``param_`` at every
        update); the groups are only written when a value changed."""
        values = self._hyper_parameters()
        if values == self._update_values:
            return
        weight_decay, regularization = values[:2]
        if regularization not in REGULARIZATION_TYPES:
            raise CaffeError(f"Unknown regularization type: {regularization}")
        for group in self.optimizer.param_groups:
            group["weight_decay"], group["regularization"] = weight_decay, regularization
            for key, value in zip(_HYPER, values[2:]):
                if key in group:
                    group[key] = value
        self._update_values = values

    # -- pycaffe surface --------------------------------------------------------------------
    @property
    def max_iter(self) -> int:
        return self.param.max_iter

    @property
    def lr(self) -> float:
        """The rate the next update will use (``GetLearningRate`` without advancing state)."""
        return self._learning_rate()[0]

    def get_base_lr(self) -> float:
        return self.param.base_lr

    def set_base_lr(self, base_lr: float) -> None:
        """Change ``base_lr``; every lr policy scales from it, from the next update on."""
        self.param.base_lr = base_lr

    def add_callback(self, on_start: Any, on_gradients_ready: Callable[[], None] | None = None
                     ) -> None:
        """pycaffe's ``add_callback(on_start, on_gradients_ready)`` (or one object with both)."""
        if on_gradients_ready is None:
            on_start, on_gradients_ready = on_start.on_start, on_start.on_gradients_ready
        self._callbacks.append((on_start, on_gradients_ready))

    def share_weights(self, net: Net) -> None:
        """Make ``net`` use this solver's trained parameters (pycaffe's ``share_weights``)."""
        net.share_with(self.net)

    # -- training ---------------------------------------------------------------------------
    def _requested_action(self) -> SolverAction:
        return self.action_request() if self.action_request is not None else SolverAction.NONE

    def _learning_rate(self) -> tuple[float, int]:
        p = self.param
        return learning_rate(p.lr_policy, p.base_lr, self.iter, gamma=p.gamma, power=p.power,
                             stepsize=p.stepsize, stepvalues=list(p.stepvalue),
                             max_iter=p.max_iter, current_step=self.current_step)

    def _display(self) -> bool:
        return bool(self.param.display) and self.iter % self.param.display == 0

    def _clear_diffs(self) -> None:
        """Caffe's ``ClearParamDiffs``, without a zero-fill pass: autograd writes fresh diffs."""
        for p in self._params:
            p.grad = None

    def _complete_diffs(self) -> None:
        """Params no gradient reached (frozen, BatchNorm statistics, unused) get Caffe's zero
        diff, so weight decay and the history still see them as in Caffe."""
        for p in self._params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _forward_backward(self) -> tuple[np.float32, dict[str, torch.Tensor],
                                         dict[str, torch.Tensor]]:
        """``iter_size`` ForwardBackward passes; the loss is their float32 mean."""
        feed = feed_inputs(self.net, self.device)
        total = F32(0)
        env: dict[str, torch.Tensor] = {}
        seen: dict[str, torch.Tensor] = {}
        for _ in range(self.param.iter_size):
            seen.clear()
            env, loss = _run(self.net, feed, seen)
            if loss is not None:
                if loss.requires_grad:
                    loss.backward()
                total = F32(total + F32(loss.item()))
        return F32(total / F32(self.param.iter_size)), env, seen

    def _update_smoothed_loss(self, loss: np.float32, start_iter: int) -> None:
        """Caffe's ``UpdateSmoothedLoss``: a running mean over the last ``average_loss`` values."""
        average = self.param.average_loss
        if len(self._losses) < average:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = F32((self.smoothed_loss * F32(size - 1) + loss) / F32(size))
        else:
            idx = (self.iter - start_iter) % average
            self.smoothed_loss = F32(self.smoothed_loss
                                     + (loss - self._losses[idx]) / F32(average))
            self._losses[idx] = loss

    def step(self, iters: int) -> None:
        """Caffe's ``Solver::Step``: ``iters`` updates, testing and snapshotting on schedule."""
        p = self.param
        start_iter, stop_iter = self.iter, self.iter + int(iters)
        self._losses, self.smoothed_loss = [], F32(0)
        timer, iterations_last = time.perf_counter(), self.iter
        seen: dict[str, torch.Tensor] = {}
        while self.iter < stop_iter:
            self._clear_diffs()
            if p.test_interval and self.iter % p.test_interval == 0 and \
                    (self.iter > 0 or p.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            for on_start, _ in self._callbacks:
                on_start()
            loss, env, seen = self._forward_backward()
            self._update_smoothed_loss(loss, start_iter)
            if self._display():
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iterations_last) / (lapse or 1)
                log.info("Iteration %d (%s iter/s, %ss/%d iters), loss = %s", self.iter,
                         fmt(per_s), fmt(lapse), p.display, fmt(self.smoothed_loss))
                timer, iterations_last = time.perf_counter(), self.iter
                for index, name, text in output_lines(self.net,
                                                      _flat_outputs(self.net.module, env)):
                    log.info("    Train net output #%d: %s = %s", index, name, text)
            if not math.isfinite(loss):
                _publish(self.net, seen)
                last = self._last_snapshot
                raise TrainingError(
                    f"iteration {self.iter}: the training loss is {fmt(loss)}; stopped before "
                    f"updating the weights (last snapshot: {last or 'none'}). Lower base_lr, "
                    "set clip_gradients, or check the data and the loss layer's inputs.")
            if self._callbacks:
                _publish(self.net, seen)
            for _, on_gradients_ready in self._callbacks:
                on_gradients_ready()
            self.apply_update()
            self.iter += 1
            request = self._requested_action()
            if (p.snapshot and self.iter % p.snapshot == 0) or request == SolverAction.SNAPSHOT:
                self.snapshot()
            if request == SolverAction.STOP:
                self.requested_early_exit = True
                break
        _publish(self.net, seen)

    def apply_update(self) -> None:
        """``SGDSolver::ApplyUpdate``: rate, clip, normalize, regularize, update; no ``iter++``."""
        p = self.param
        rate, step = self._learning_rate()
        if p.lr_policy == "multistep" and step != self.current_step:
            log.info("MultiStep Status: Iteration %d, step = %d", self.iter, step)
        self.current_step = step
        if self._display():
            log.info("Iteration %d, lr = %s", self.iter, fmt(rate))
        self._complete_diffs()
        if p.clip_gradients >= 0:
            norm = clip_gradients_(self._params, p.clip_gradients)
            if norm > F32(p.clip_gradients):
                log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale "
                         "factor %s", fmt(norm), fmt(p.clip_gradients),
                         fmt(F32(p.clip_gradients) / F32(norm)))
        if p.iter_size != 1:
            scale_gradients_(self._params, 1.0 / p.iter_size)
        self._sync_hyper_parameters()
        self.optimizer.set_lr(rate)
        self.optimizer.set_iteration(self.iter)
        self.optimizer.step()

    def solve(self, resume: str | Path | None = None) -> None:
        """Caffe's ``Solver::Solve``: train to ``max_iter``, snapshot, then a last display/test."""
        p = self.param
        log.info("Solving %s", self.net.module.name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume is not None:
            log.info("Restoring previous solver status from %s", resume)
            self.restore(resume)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if self._display():
            loss, _ = forward_scores(self.net, self.device)
            self._update_smoothed_loss(loss, start_iter)
            log.info("Iteration %d, loss = %s", self.iter, fmt(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        log.info("Optimization Done.")

    # -- testing ----------------------------------------------------------------------------
    def test_all(self) -> None:
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            self.test(i)

    def test(self, test_net_id: int = 0) -> list[float]:
        """Caffe's ``Solver::Test``: each output element's mean over ``test_iter`` batches."""
        p = self.param
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        iters = p.test_iter[test_net_id]
        sums = OutputSums()
        for _ in range(iters):
            request = self._requested_action()
            while request != SolverAction.NONE:
                if request == SolverAction.SNAPSHOT:
                    self.snapshot()
                elif request == SolverAction.STOP:
                    self.requested_early_exit = True
                request = self._requested_action()
            if self.requested_early_exit:
                break
            sums.add(*forward_scores(net, self.device))
        if self.requested_early_exit:
            log.info("Test interrupted.")
            return []
        if p.test_compute_loss:
            log.info("Test loss: %s", fmt(F32(sums.loss / F32(iters))))
        means = sums.means(iters)
        for index, name, text in output_lines(net, means):
            log.info("    Test net output #%d: %s = %s", index, name, text)
        self.test_scores[test_net_id] = [float(v) for _, m in means for v in m]
        return self.test_scores[test_net_id]

    # -- snapshots --------------------------------------------------------------------------
    def snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self) -> tuple[str, str]:
        """Caffe's ``Snapshot``: the weights, then the solver state; returns both paths."""
        hdf5 = self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5
        model = self.snapshot_filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        log.info("Snapshotting to %s %s", "HDF5 file" if hdf5 else "binary proto file", model)
        save = save_hdf5 if hdf5 else save_caffemodel
        save(self.net.module, model, write_diff=self.param.snapshot_diff)
        state = self.snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        log.info("Snapshotting solver state to %s %s",
                 "HDF5 file" if hdf5 else "binary proto file", state)
        history = [h.detach().cpu().numpy() for h in self.optimizer.history()]
        write_solverstate(state, SolverStateRecord(self.iter, model, history, self.current_step))
        self._last_snapshot = Path(state)
        return model, state

    def restore(self, state_file: str | Path) -> None:
        """Caffe's ``Restore``: iteration, weights (``learned_net``), history and current_step.

        Reads our snapshots and Caffe's own, binary or HDF5.
        """
        path = Path(state_file)
        state = read_solverstate(path)
        if state.learned_net:
            _read_weights(self.net.module, self._learned_net(state.learned_net, path))
        targets = self.optimizer.history()
        if len(state.history) != len(targets):
            raise FormatError(path, f"holds {len(state.history)} history blobs, but this "
                                    f"{self.param.type} solver on net '{self.net.module.name}' "
                                    f"keeps {len(targets)} ({len(self._params)} learnable params "
                                    f"x {len(targets) // max(len(self._params), 1)}); was it "
                                    "written for another net or solver type?")
        log.info("%sSolver: restoring history", self.param.type)
        try:
            self.optimizer.load_history(state.history)
        except ValueError as exc:
            raise FormatError(path, str(exc)) from None
        self.iter = int(state.iter)
        self.current_step = int(state.current_step)

    @staticmethod
    def _learned_net(stored: str, state_file: Path) -> Path:
        """``learned_net`` as stored (Caffe: from the working directory), else beside the state."""
        for candidate in (Path(stored), state_file.parent / stored,
                          state_file.parent / Path(stored).name):
            if candidate.exists():
                return candidate
        raise FormatError(state_file, f"its learned_net '{stored}' was not found (looked in the "
                                      f"working directory and in {state_file.parent})")


def _solver_class(type_name: str) -> type[Solver]:
    return type(f"{type_name}Solver", (Solver,), {
        "solver_type": type_name, "__module__": __name__,
        "__doc__": f"pycaffe's ``caffe.{type_name}Solver(path)``: Caffe's {type_name} update "
                   "rule whatever the file's ``type`` says."})


SGDSolver = _solver_class("SGD")
NesterovSolver = _solver_class("Nesterov")
AdaGradSolver = _solver_class("AdaGrad")
RMSPropSolver = _solver_class("RMSProp")
AdaDeltaSolver = _solver_class("AdaDelta")
AdamSolver = _solver_class("Adam")


SOLVERS: dict[str, type[Solver]] = {cls.solver_type: cls for cls in (
    SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver, AdaDeltaSolver, AdamSolver)}


def get_solver(solver: SolverSource) -> Solver:
    """pycaffe's ``caffe.get_solver``: an instance of the class named by the file's ``type``."""
    param = solver if isinstance(solver, caffe_pb2.SolverParameter) else read_solver(solver)
    return SOLVERS.get(param.type, Solver)(solver)


__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "GlogFormatter", "NesterovSolver",
           "OutputSums", "RMSPropSolver", "SGDSolver", "SOLVERS", "Solver", "SolverAction",
           "TrainingError", "feed_inputs", "fmt", "forward_scores", "get_solver", "log_to_stderr",
           "output_lines", "upgrade_snapshot_prefix"]
