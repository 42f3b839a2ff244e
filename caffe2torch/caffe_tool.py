"""Caffe's ``tools/caffe.cpp``: ``train``, ``test``, ``time`` and ``device_query``.

Flags keep Caffe's names and defaults (``-solver``, ``-weights a,b``, ``-snapshot``, ``-gpu
0|0,1|all``, ``-iterations 50``, ``-sigint_effect stop``, ``-sighup_effect snapshot``,
``-level``, ``-stage a,b``, ``-phase``); the log goes to stderr in glog's format, as Caffe's.
``--progress`` adds a tqdm bar to ``train``. Exit status: 0 on success (a run stopped by a
signal included, as in Caffe), 1 on an error.

Only the argument declarations are imported by the command line's start-up; torch and the
nets are imported when a command runs.
"""
from __future__ import annotations

import argparse
import functools
import logging
import signal
import time as clock
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .errors import CaffeError

if TYPE_CHECKING:
    import torch

    from .net import Net
    from .solver import Solver, SolverAction

log = logging.getLogger("caffe2torch")

SIGNAL_EFFECTS = ("stop", "snapshot", "none")


# -- arguments --------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="",
                        help="run in GPU mode on the given device IDs separated by ','; 'all' "
                             "for every GPU (only the first one is used)")
    parser.add_argument("--level", type=int, default=0, help="network level")
    parser.add_argument("--stage", default="", help="network stages, separated by ','")
    parser.add_argument("--iterations", type=int, default=50, help="number of iterations")


def train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--solver", default="", help="the solver definition prototxt")
    parser.add_argument("--weights", default="",
                        help="pretrained weights to finetune from, separated by ','; not "
                             "together with --snapshot")
    parser.add_argument("--snapshot", default="", help="a .solverstate to resume training from")
    parser.add_argument("--sigint_effect", default="stop", choices=SIGNAL_EFFECTS,
                        help="what SIGINT (Ctrl-C) does: snapshot, stop or none")
    parser.add_argument("--sighup_effect", default="snapshot", choices=SIGNAL_EFFECTS,
                        help="what SIGHUP does: snapshot, stop or none")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    _common(parser)


def test_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="the model definition prototxt")
    parser.add_argument("--weights", default="", help="the trained weights to score")
    _common(parser)


def time_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="", help="the model definition prototxt")
    parser.add_argument("--phase", default="", help="network phase (TRAIN or TEST); TRAIN "
                                                    "if unset")
    _common(parser)


def device_query_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="", help="device IDs separated by ',', or 'all'")


# -- shared pieces ----------------------------------------------------------------------------

def _logged(command: Callable[[argparse.Namespace], int]
            ) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` with the log on stderr in glog's format, as Caffe's tools print it."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from .solver import log_to_stderr
        handler = log_to_stderr()
        try:
            return command(args)
        finally:
            log.removeHandler(handler)
    return run


def _require(value: str, message: str) -> None:
    if not value:
        raise CaffeError(message)


def _stages(flag: str) -> list[str]:
    return [s for s in flag.split(",") if s]


def _gpus(flag: str) -> list[int]:
    """Caffe's ``get_gpus``: ids separated by ',' or 'all'."""
    import torch
    if flag == "all":
        return list(range(torch.cuda.device_count()))
    try:
        return [int(g) for g in flag.split(",") if g.strip()]
    except ValueError:
        raise CaffeError(f"-gpu takes device ids separated by ',' or 'all', got '{flag}'") \
            from None


def _set_mode(gpus: list[int], single: bool) -> None:
    """Caffe's mode selection: CPU without ids; the first GPU otherwise (CPU, with a warning,
    when PyTorch has no CUDA device)."""
    import torch

    from .mode import set_device, set_mode_cpu, set_mode_gpu
    if gpus and not torch.cuda.is_available():
        log.warning("GPU %s requested but PyTorch sees no CUDA device: running on the CPU",
                    ", ".join(map(str, gpus)))
        gpus = []
    if not gpus:
        log.info("Use CPU.")
        set_mode_cpu()
        return
    if len(gpus) > 1:
        log.warning("Only one GPU is used (GPU %d); multi-GPU training is not supported, so "
                    "the effective batch size is not multiplied by %d", gpus[0], len(gpus))
    if single:
        log.info("Use GPU with device ID %d", gpus[0])
    else:
        log.info("Using GPUs %d", gpus[0])
    log.info("GPU %d: %s", gpus[0], torch.cuda.get_device_name(gpus[0]))
    set_device(gpus[0])
    set_mode_gpu()


def _phase(flag: str, default: int) -> int:
    from .proto import caffe_pb2
    if not flag:
        return default
    if flag not in ("TRAIN", "TEST"):
        raise CaffeError(f'phase must be "TRAIN" or "TEST", got "{flag}"')
    return caffe_pb2.Phase.Value(flag)


# -- train ------------------------------------------------------------------------------------

class SignalHandler:
    """Caffe's ``SignalHandler``: SIGINT/SIGHUP become solver actions, read once each."""

    def __init__(self, sigint_effect: str, sighup_effect: str):
        from .solver import SolverAction
        self.effects: dict[int, SolverAction] = {}   # checked in this order: SIGHUP first
        if hasattr(signal, "SIGHUP"):
            self.effects[signal.SIGHUP] = SolverAction(sighup_effect)
        self.effects[signal.SIGINT] = SolverAction(sigint_effect)
        self.pending: set[int] = set()

    def _handle(self, signum: int, frame: object) -> None:
        self.pending.add(signum)

    def action(self) -> SolverAction:
        """The requested action: SIGHUP's first, then SIGINT's (clearing the request)."""
        from .solver import SolverAction
        for signum in self.effects:
            if signum in self.pending:
                self.pending.discard(signum)
                return self.effects[signum]
        return SolverAction.NONE

    @contextmanager
    def installed(self) -> Iterator[SignalHandler]:
        previous = {s: signal.signal(s, self._handle) for s in self.effects}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@_logged
def train_command(args: argparse.Namespace) -> int:
    """``caffe train``: train or finetune a model from a solver prototxt."""
    _require(args.solver, "Need a solver definition to train (-solver).")
    if args.snapshot and args.weights:
        raise CaffeError("Give a snapshot to resume training or weights to finetune but not both.")
    from .formats import read_solver
    from .proto import caffe_pb2
    from .solver import SOLVERS, Solver, upgrade_snapshot_prefix
    param = read_solver(args.solver)
    upgrade_snapshot_prefix(param, args.solver)
    param.train_state.level = args.level
    param.train_state.stage.extend(_stages(args.stage))
    gpu_flag = args.gpu
    if not gpu_flag and param.solver_mode == caffe_pb2.SolverParameter.GPU:
        gpu_flag = str(param.device_id)
    gpus = _gpus(gpu_flag)
    _set_mode(gpus, single=False)
    if args.iterations != 50:
        log.warning("-iterations is ignored by train, as in Caffe: the solver's max_iter (%d) "
                    "decides", param.max_iter)
    if args.weights:
        param.weights.append(args.weights)
    handler = SignalHandler(args.sigint_effect, args.sighup_effect)
    with handler.installed():
        solver = SOLVERS.get(param.type, Solver)(param, solver_dir=Path(args.solver).parent)
        solver.action_request = handler.action
        if args.snapshot:
            log.info("Resuming from %s", args.snapshot)
            solver.restore(args.snapshot)
        log.info("Starting Optimization")
        with _progress(solver, args.progress):
            solver.solve()
    log.info("Optimization Done.")
    return 0


@contextmanager
def _progress(solver: Solver, enabled: bool) -> Iterator[None]:
    """A tqdm bar that advances once per iteration."""
    if not enabled:
        yield
        return
    from tqdm import tqdm
    with tqdm(total=solver.max_iter, initial=solver.iter, unit="iter") as bar:
        solver.add_callback(lambda: None, lambda: bar.update(1))
        yield


# -- test -------------------------------------------------------------------------------------

@_logged
def test_command(args: argparse.Namespace) -> int:
    """``caffe test``: score a model; per-batch outputs, then their means."""
    _require(args.model, "Need a model definition to score (-model).")
    _require(args.weights, "Need model weights to score (-weights).")
    from .mode import device
    from .net import TEST, Net
    from .solver import F32, OutputSums, fmt, forward_scores, output_lines
    _set_mode(_gpus(args.gpu), single=True)
    net = Net(args.model, TEST, level=args.level, stages=_stages(args.stage),
              weights=args.weights)
    log.info("Running for %d iterations.", args.iterations)
    sums = OutputSums()
    for i in range(args.iterations):
        loss, outputs = forward_scores(net, device())
        sums.add(loss, outputs)
        for name, values in outputs:
            for value in values:
                log.info("Batch %d, %s = %s", i, name, fmt(value))
    log.info("Loss: %s", fmt(F32(sums.loss / F32(args.iterations))))
    for _, name, text in output_lines(net, sums.means(args.iterations)):
        log.info("%s = %s", name, text)
    return 0


# -- time -------------------------------------------------------------------------------------

class _LayerClock:
    """Per-layer forward and backward times of one compiled net, as ``caffe time`` reports.

    Forward: the time between consecutive layer outputs. Backward: autograd runs the layers'
    backward functions one after the other, so a layer's backward lasts from the moment the
    gradient of its output is complete to the start of the next layer's backward. Every
    layer runs on its own (no BatchNorm+Scale fusion), as in Caffe.
    """

    def __init__(self, net: Net, device: torch.device):
        self.net, self.device = net, device
        net.module.fuse = False
        self.names = [step.name for step in net.module.steps]
        self.reset()

    def _now(self) -> float:
        if self.device.type == "cuda":
            import torch
            torch.cuda.synchronize(self.device)
        return clock.perf_counter()

    def iteration(self) -> float:
        """One timed forward and backward pass; returns the forward's loss."""
        import torch

        from .solver import feed_inputs
        starts: list[tuple[float, int]] = []
        last, index = self._now(), 0

        def observe(step, outs) -> None:
            nonlocal last, index
            now = self._now()
            self.forward_us[index] += int((now - last) * 1e6)
            for value in outs:
                if value.requires_grad:
                    value.register_hook(lambda grad, i=index: starts.append((self._now(), i)))
            last, index = now, index + 1

        env, loss = self.net.module.run(feed_inputs(self.net, self.device), observer=observe)
        tails = [env[name] for name in self.net.module.output_names if env[name].requires_grad]
        if tails:
            torch.autograd.backward(tails, [torch.ones_like(t) for t in tails])
        end = self._now()
        starts.sort()
        for (start, i), (stop, _) in zip(starts, starts[1:] + [(end, -1)]):
            self.backward_us[i] += int((stop - start) * 1e6)
        return 0.0 if loss is None else float(loss)

    def reset(self) -> None:
        self.forward_us = [0] * len(self.names)
        self.backward_us = [0] * len(self.names)


@_logged
def time_command(args: argparse.Namespace) -> int:
    """``caffe time``: average forward and backward time per layer."""
    _require(args.model, "Need a model definition to time (-model).")
    from .mode import device
    from .net import TRAIN, Net
    from .solver import fmt
    _set_mode(_gpus(args.gpu), single=True)
    net = Net(args.model, _phase(args.phase, TRAIN), level=args.level,
              stages=_stages(args.stage))
    layer_clock = _LayerClock(net, device())
    log.info("Performing Forward")
    initial_loss = layer_clock.iteration()  # a clean forward and backward, as Caffe's warm-up
    log.info("Initial loss: %s", fmt(initial_loss))
    log.info("Performing Backward")
    layer_clock.reset()
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", args.iterations)
    total = clock.perf_counter()
    forward_sum = backward_sum = 0
    for j in range(args.iterations):
        before = (sum(layer_clock.forward_us), sum(layer_clock.backward_us))
        began = clock.perf_counter()
        layer_clock.iteration()
        forward_sum += sum(layer_clock.forward_us) - before[0]
        backward_sum += sum(layer_clock.backward_us) - before[1]
        log.info("Iteration: %d forward-backward time: %d ms.", j + 1,
                 int((clock.perf_counter() - began) * 1000))
    total_ms = int((clock.perf_counter() - total) * 1000)
    n = args.iterations
    log.info("Average time per layer: ")
    for name, fwd, bwd in zip(layer_clock.names, layer_clock.forward_us,
                              layer_clock.backward_us):
        log.info("%10s\tforward: %s ms.", name, fmt(fwd / 1000 / n))
        log.info("%10s\tbackward: %s ms.", name, fmt(bwd / 1000 / n))
    log.info("Average Forward pass: %s ms.", fmt(forward_sum / 1000 / n))
    log.info("Average Backward pass: %s ms.", fmt(backward_sum / 1000 / n))
    log.info("Average Forward-Backward: %s ms.", fmt(total_ms / n))
    log.info("Total Time: %d ms.", total_ms)
    log.info("*** Benchmark ends ***")
    return 0


# -- device_query -----------------------------------------------------------------------------

@_logged
def device_query_command(args: argparse.Namespace) -> int:
    """``caffe device_query``: what PyTorch knows about each requested GPU."""
    import torch
    log.info("Querying GPUs %s", args.gpu)
    gpus = _gpus(args.gpu)
    if gpus and not torch.cuda.is_available():
        raise CaffeError("device_query: PyTorch sees no CUDA device")
    for gpu in gpus:
        if gpu >= torch.cuda.device_count():
            raise CaffeError(f"device_query: no GPU {gpu} (PyTorch sees "
                             f"{torch.cuda.device_count()})")
        p = torch.cuda.get_device_properties(gpu)
        for label, value in (("Device id", gpu), ("Major revision number", p.major),
                             ("Minor revision number", p.minor), ("Name", p.name),
                             ("Total global memory", p.total_memory),
                             ("Number of multiprocessors", p.multi_processor_count)):
            log.info("%-26s%s", label + ":", value)
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace], int]]] = {
    "train": ("train or finetune a model (Caffe's caffe train)", train_flags, train_command),
    "test": ("score a model (Caffe's caffe test)", test_flags, test_command),
    "time": ("benchmark model execution time per layer (Caffe's caffe time)",
             time_flags, time_command),
    "device_query": ("show GPU diagnostic information (Caffe's caffe device_query)",
                     device_query_flags, device_query_command),
}
