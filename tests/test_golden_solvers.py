"""Real Caffe training runs (golden/solvers, protocol in golden/FORMAT.md "kind solver") replayed
through caffe2torch's solver: per-iteration loss and lr, test outputs, final weights, history
blobs, snapshots field by field, restoring Caffe's own .solverstate, and the log text of
``caffe train`` itself.

Every run happens in a fresh working directory (snapshots land there, never in the read-only
reference data); the solver file is given by its absolute path, so net and data paths resolve
beside it as Caffe's working-directory-relative paths would not.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from caffe2torch.formats import read_caffemodel, read_solverstate
from caffe2torch.proto import caffe_pb2
from caffe2torch.solver import Solver, get_solver
from golden import cases, shared_root

CASES = cases("solvers")
# Our replay stays well inside each case's suggested tolerance; compare params and history
# ten times tighter than case.json suggests, so drift shows up long before it matters.
TIGHTEN = 10


@dataclass
class Case:
    dir: Path
    spec: dict

    @property
    def rtol(self) -> float:
        return self.spec["rtol"]

    @property
    def atol(self) -> float:
        return self.spec["atol"]

    @property
    def trajectory(self):
        return np.load(self.dir / "trajectory.npz")


@dataclass
class Run:
    solver: Solver
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    tests: dict[int, list[list[float]]] = field(default_factory=dict)


def load_case(name: str) -> Case:
    case_dir = shared_root() / "golden" / "solvers" / name
    return Case(case_dir, json.loads((case_dir / "case.json").read_text()))


def make_solver(case: Case) -> Solver:
    """A solver for the case, started from init.caffemodel (all its nets, as ``-weights``)."""
    solver = get_solver(case.dir / case.spec["solver"])
    for net in (solver.net, *solver.test_nets):
        net.copy_from(case.dir / case.spec["weights"])
    return solver


def record(solver: Solver, case: Case) -> Run:
    """Hook the solver like the golden harness read pycaffe: the smoothed loss and ``solver.lr``
    just before each update, the test outputs at each test point."""
    run = Run(solver)
    points = {int(k): v for k, v in case.spec.get("test_points", {}).items()}

    def on_start() -> None:
        for net, iters in points.items():
            if solver.iter in iters:
                run.tests.setdefault(net, []).append(list(solver.test_scores[net]))

    def on_gradients_ready() -> None:
        run.loss.append(float(solver.smoothed_loss))
        run.lr.append(solver.lr)

    solver.add_callback(on_start, on_gradients_ready)
    return run


def close(what: str, ours, theirs, rtol: float, atol: float) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float32), np.asarray(theirs, dtype=np.float32)
    assert ours.size == theirs.size, f"{what}: {ours.size} values, Caffe {theirs.size}"
    np.testing.assert_allclose(ours.reshape(theirs.shape), theirs, rtol=rtol, atol=atol,
                               err_msg=what)


def check_params(solver: Solver, trajectory, prefix: str, case: Case) -> None:
    keys = [k for k in trajectory.files if k.startswith(prefix)]
    assert keys, f"no {prefix}* arrays in the trajectory"
    for key in keys:
        layer, i = key[len(prefix):].rsplit("/", 1)
        close(key, solver.net.params[layer][int(i)].data, trajectory[key],
              case.rtol / TIGHTEN, case.atol / TIGHTEN)


@pytest.mark.parametrize("name", CASES)
def test_solver_trajectory(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``solver.step(max_iter)`` from init.caffemodel reproduces Caffe's whole run."""
    case = load_case(name)
    monkeypatch.chdir(tmp_path)
    run = record(make_solver(case), case)
    run.solver.step(case.spec["max_iter"])
    t = case.trajectory
    close("loss (smoothed, as logged)", run.loss, t["loss"], case.rtol, case.atol)
    close("lr", run.lr, t["lr"], 1e-7, 0)
    for net, test_net in enumerate(run.solver.test_nets):
        keys = [f"test/{net}/{o}" for o in test_net.outputs]
        if not any(k in t.files for k in keys):
            continue
        got = np.array(run.tests.get(net, []))
        for j, key in enumerate(keys):
            close(key, got[:, j], t[key], case.rtol, case.atol)
    check_params(run.solver, t, "final/", case)
    history = run.solver.optimizer.history()
    keys = sorted((k for k in t.files if k.startswith("history/")), key=lambda k: int(k[8:]))
    assert len(history) == len(keys), f"{len(history)} history blobs, Caffe {len(keys)}"
    for key, blob in zip(keys, history):
        close(key, blob.cpu().numpy(), t[key], case.rtol / TIGHTEN, case.atol / TIGHTEN)


def cases_with(file: str) -> list[str]:
    """The cases holding ``file`` (the missing-data marker passes through, to fail loudly)."""
    if not CASES or CASES[0].startswith("<"):
        return CASES
    return [c for c in CASES if (shared_root() / "golden" / "solvers" / c / file).is_file()]


SNAPSHOT_CASES = cases_with("snapshot_iter_20.solverstate")


def layer_messages(path) -> list[str]:
    """Every LayerParameter of a .caffemodel except its blobs, as text (Net::ToProto's fields)."""
    net = caffe_pb2.NetParameter()
    net.ParseFromString(Path(path).read_bytes())
    for layer in net.layer:
        del layer.blobs[:]
    return [text_format.MessageToString(layer) for layer in net.layer]


@pytest.mark.parametrize("name", SNAPSHOT_CASES)
def test_snapshot_matches_caffe(name: str, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Our snapshot of the same run equals Caffe's .caffemodel and .solverstate field by field."""
    case = load_case(name)
    monkeypatch.chdir(tmp_path)
    solver = make_solver(case)
    solver.step(case.spec["snapshot_iter"])
    stem = f"snapshot_iter_{case.spec['snapshot_iter']}"
    assert (tmp_path / f"{stem}.caffemodel").is_file()
    ours = read_solverstate(f"{stem}.solverstate")
    theirs = read_solverstate(case.dir / f"{stem}.solverstate")
    assert (ours.iter, ours.learned_net, ours.current_step) == \
        (theirs.iter, theirs.learned_net, theirs.current_step)
    assert [h.shape for h in ours.history] == [h.shape for h in theirs.history]
    for i, (a, b) in enumerate(zip(ours.history, theirs.history)):
        close(f"history {i}", a, b, case.rtol / TIGHTEN, case.atol / TIGHTEN)
    assert layer_messages(f"{stem}.caffemodel") == \
        layer_messages(case.dir / f"{stem}.caffemodel")
    ours_net = read_caffemodel(f"{stem}.caffemodel")
    theirs_net = read_caffemodel(case.dir / f"{stem}.caffemodel")
    for a, b in zip(ours_net, theirs_net):
        assert [x.shape for x in a.blobs] == [x.shape for x in b.blobs], a.name
        for i, (x, y) in enumerate(zip(a.blobs, b.blobs)):
            close(f"{a.name}/{i}", x.data, y.data, case.rtol / TIGHTEN, case.atol / TIGHTEN)


@pytest.mark.parametrize("name", SNAPSHOT_CASES)
@pytest.mark.parametrize("source", ["caffe", "ours"])
def test_resume(name: str, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restoring a snapshot (Caffe's own or ours) and running on reaches Caffe's resume/final."""
    case = load_case(name)
    n = case.spec["snapshot_iter"]
    state = case.dir / f"snapshot_iter_{n}.solverstate"
    if source == "ours":
        (tmp_path / "run").mkdir()
        monkeypatch.chdir(tmp_path / "run")
        make_solver(case).step(n)
        state = tmp_path / "run" / f"snapshot_iter_{n}.solverstate"
    (tmp_path / "resume").mkdir()
    monkeypatch.chdir(tmp_path / "resume")   # learned_net then resolves beside the state file
    solver = get_solver(case.dir / case.spec["solver"])
    solver.restore(state)
    assert solver.iter == n
    solver.step(case.spec["max_iter"] - n)
    check_params(solver, case.trajectory, "resume/final/", case)


# -- caffe train's log ----------------------------------------------------------------------

LOG_CASES = cases_with("train.log")
# The log lines that carry results (and the ones parse_log.py reads), in Caffe's order.
KEPT = re.compile(r"Iteration \d+|net output #|Snapshotting|Optimization Done|Solving|"
                  r"Learning Rate Policy|Finetuning from|Creating (test|training) net|Use CPU")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


def log_messages(text: str) -> list[str]:
    """Messages of glog lines worth comparing, with the rate/timing fields blanked."""
    out = []
    for line in text.splitlines():
        head, sep, message = line.partition("] ")
        if not sep or not re.match(r"[IWEF]\d{4}", head) or not KEPT.search(message):
            continue
        out.append(re.sub(r"\(\S+ iter/s, \S+s/(\d+) iters\)", r"(? iter/s, ?s/\1 iters)",
                          message))
    return out


def same_message(ours: str, theirs: str) -> bool:
    if NUMBER.sub("#", ours) != NUMBER.sub("#", theirs):
        return False
    return all(np.isclose(float(a), float(b), rtol=2e-5, atol=1e-6)
               for a, b in zip(NUMBER.findall(ours), NUMBER.findall(theirs)))


@pytest.mark.parametrize("name", LOG_CASES)
def test_train_log(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    """``caffe2torch train`` prints what ``caffe train`` printed, line for line."""
    from caffe2torch.cli import main

    case = load_case(name)
    work = tmp_path / name
    shutil.copytree(case.dir, work)
    for stale in work.glob("snapshot_iter_*"):
        stale.unlink()
    monkeypatch.chdir(work)
    command = (case.dir / "train.command.txt").read_text()
    assert "caffe train -solver solver.prototxt -weights init.caffemodel" in command
    assert main(["train", "-solver", "solver.prototxt", "-weights", "init.caffemodel"]) == 0
    ours = log_messages(capsys.readouterr().err)
    theirs = log_messages((case.dir / "train.log").read_text())
    assert len(ours) == len(theirs), "\n".join(
        f"{a!r:80} | {b!r}" for a, b in zip(ours + [""] * len(theirs), theirs + [""] * len(ours)))
    for a, b in zip(ours, theirs):
        assert same_message(a, b), f"ours: {a}\nCaffe: {b}"
    assert (work / f"snapshot_iter_{case.spec['max_iter']}.caffemodel").is_file()


def test_hdf5_snapshot_with_shared_weights(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """HDF5 snapshots store a shared param under its owner only (Net::ToHDF5) and restore
    exactly; the solver is built from a SolverParameter message with ``solver_dir``."""
    from caffe2torch.formats import read_hdf5_weights, read_solver
    from caffe2torch.solver import SGDSolver

    case = load_case("weight_sharing")
    monkeypatch.chdir(tmp_path)
    param = read_solver(case.dir / "solver.prototxt")
    param.snapshot_format = caffe_pb2.SolverParameter.HDF5
    first = SGDSolver(param, solver_dir=case.dir)
    first.net.copy_from(case.dir / "init.caffemodel")
    first.step(10)
    model, state = first.snapshot()
    stored = {r.name: len(r.blobs) for r in read_hdf5_weights(model)}
    assert stored["ip_a"] == 2 and stored["ip_b"] == 0
    first.step(10)
    resumed = SGDSolver(param, solver_dir=case.dir)
    resumed.restore(state)
    resumed.step(10)
    for layer, blobs in first.net.params.items():
        for a, b in zip(blobs, resumed.net.params[layer]):
            np.testing.assert_array_equal(a.data, b.data)
