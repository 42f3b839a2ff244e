"""The solver driver: pycaffe's solver surface and ``caffe2torch train|test|time|device_query``.

Everything runs on a tiny self-made problem (40 HDF5 rows of 1x8x8, 3 classes, batch 4), so a
training iteration takes milliseconds; the golden comparisons with real Caffe are in
test_golden_solvers.py.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from caffe2torch.errors import CaffeError, FormatError
from caffe2torch.formats import read_caffemodel
from caffe2torch.solver import (AdamSolver, NesterovSolver, SGDSolver, Solver, TrainingError,
                                get_solver)
from golden import shared_root

ROOT = Path(__file__).resolve().parents[1]

NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
        hdf5_data_param { source: "train_list.txt" batch_size: 4 } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
        hdf5_data_param { source: "train_list.txt" batch_size: 5 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3
                            weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
        inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
        include { phase: TEST } }
"""

SOLVER = {"net": '"train.prototxt"', "base_lr": "0.02", "momentum": "0.9",
          "weight_decay": "0.005", "lr_policy": '"fixed"', "max_iter": "20", "display": "1",
          "snapshot_prefix": '"snap"', "solver_mode": "CPU", "random_seed": "7"}


def write_solver(folder: Path, name: str = "solver.prototxt", **fields: str | None) -> Path:
    """A solver prototxt: SOLVER's fields with ``fields`` overriding them (None removes one)."""
    merged = {**SOLVER, **fields}
    text = "".join(f"{k}: {v}\n" for k, v in merged.items() if v is not None)
    (folder / name).write_text(text)
    return folder / name


@pytest.fixture
def problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny problem in ``tmp_path`` (also the working directory): data, net, solver."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = np.argmax(x.reshape(40, -1) @ rng.standard_normal((64, 3)), 1).astype(np.float32)
    for k in range(2):
        with h5py.File(tmp_path / f"train_{k}.h5", "w") as f:
            f["data"], f["label"] = x[20 * k:20 * (k + 1)], y[20 * k:20 * (k + 1)]
    (tmp_path / "train_list.txt").write_text("train_0.h5\ntrain_1.h5\n")
    (tmp_path / "train.prototxt").write_text(NET)
    write_solver(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def weights(solver: Solver) -> list[np.ndarray]:
    return [blob.data.copy() for blobs in solver.net.params.values() for blob in blobs]


# -- pycaffe surface ----------------------------------------------------------------------------

def test_solver_classes(problem: Path) -> None:
    write_solver(problem, "adam.prototxt", type='"Adam"')
    assert isinstance(get_solver("adam.prototxt"), AdamSolver)
    forced = NesterovSolver("adam.prototxt")          # pycaffe: the class's type wins
    assert forced.param.type == "Nesterov" and type(forced.optimizer).__name__ == "Nesterov"
    write_solver(problem, "old.prototxt", solver_type="ADAGRAD", momentum=None)
    assert type(get_solver("old.prototxt").optimizer).__name__ == "AdaGrad"


def test_base_lr_under_a_policy(problem: Path) -> None:
    write_solver(problem, lr_policy='"step"', gamma="0.5", stepsize="5")
    solver = SGDSolver("solver.prototxt")
    solver.step(7)
    assert solver.get_base_lr() == pytest.approx(0.02)
    assert solver.lr == np.float32(0.01)
    solver.set_base_lr(0.1)
    assert solver.get_base_lr() == np.float32(0.1)
    assert solver.lr == np.float32(np.float32(0.1) * 0.5)
    solver.step(3)                                     # the step policy continues from base_lr
    assert solver.optimizer.param_groups[0]["lr"] == np.float32(np.float32(0.1) * 0.5)
    assert solver.lr == np.float32(np.float32(0.1) * 0.25)


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_restore_round_trip_is_exact(problem: Path, fmt: str) -> None:
    """10 iterations (one epoch), snapshot, 10 more == restore the snapshot, 10 more."""
    write_solver(problem, snapshot_format=fmt, lr_policy='"multistep"', gamma="0.5",
                 stepvalue="12")
    first = AdamSolver("solver.prototxt")
    first.step(10)
    model, state = first.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert model == f"snap_iter_10.caffemodel{suffix}"
    assert state == f"snap_iter_10.solverstate{suffix}"
    first.step(10)
    assert first.current_step == 1
    resumed = AdamSolver("solver.prototxt")
    resumed.restore(state)
    assert (resumed.iter, resumed.current_step) == (10, 0)
    resumed.step(10)
    for a, b in zip(weights(first), weights(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(first.optimizer.history(), resumed.optimizer.history()):
        np.testing.assert_array_equal(a.cpu().numpy(), b.cpu().numpy())
    solved = AdamSolver("solver.prototxt")
    solved.solve(resume=state)                         # solve(resume) goes on to max_iter
    assert solved.iter == 20 and Path(f"snap_iter_20.caffemodel{suffix}").is_file()
    for a, b in zip(weights(first), weights(solved)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind, field, text", [
    ("SGD", "momentum", "0.5"), ("SGD", "weight_decay", "0.05"),
    ("SGD", "regularization_type", '"L1"'), ("Nesterov", "momentum", "0"),
    ("Adam", "momentum2", "0.99"), ("Adam", "delta", "0.001"),
    ("RMSProp", "rms_decay", "0.9"), ("AdaDelta", "momentum", "0.5"),
])
def test_param_changes_count_from_the_next_update(problem: Path, kind: str, field: str,
                                                   text: str) -> None:
    """Caffe's ApplyUpdate reads ``param_`` at every update: a field changed on
    ``solver.param`` after 10 iterations acts like a solver file carrying the new value that
    restores the iteration-10 snapshot (the history carries over)."""
    fields = {"type": f'"{kind}"', "momentum": None if kind == "RMSProp" else "0.9",
              "delta": "1e-4"}
    base = write_solver(problem, "base.prototxt", **fields)
    changed_file = write_solver(problem, "changed.prototxt", **{**fields, field: text})
    changed = get_solver(base)
    changed.step(10)                                   # one epoch: the data start over
    value = getattr(get_solver(changed_file).param, field)
    setattr(changed.param, field, value)
    changed.step(5)

    reference = get_solver(base)
    reference.step(10)
    _, state = reference.snapshot()
    resumed = get_solver(changed_file)
    resumed.restore(state)
    resumed.step(5)
    reference.step(5)
    for a, b in zip(weights(changed), weights(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(changed.optimizer.history(), resumed.optimizer.history()):
        np.testing.assert_array_equal(a.cpu().numpy(), b.cpu().numpy())
    assert any(not np.array_equal(a, b) for a, b in zip(weights(changed), weights(reference)))


def test_unknown_regularization_type_set_later_is_refused(problem: Path) -> None:
    solver = SGDSolver("solver.prototxt")
    solver.param.regularization_type = "L3"
    with pytest.raises(CaffeError, match="Unknown regularization type: L3"):
        solver.step(1)


def test_restore_checks_history_count(problem: Path) -> None:
    adam = AdamSolver("solver.prototxt")
    adam.step(1)
    _, state = adam.snapshot()
    with pytest.raises(FormatError, match="holds 12 history blobs.*keeps 6"):
        SGDSolver("solver.prototxt").restore(state)


def test_callbacks_and_blobs(problem: Path) -> None:
    solver = SGDSolver("solver.prototxt")
    events: list[tuple[str, int]] = []
    solver.add_callback(lambda: events.append(("start", solver.iter)),
                        lambda: events.append(("ready", solver.iter)))

    class Counter:
        calls = 0

        def on_start(self) -> None:
            self.calls += 1

        def on_gradients_ready(self) -> None:
            self.calls += 1

    counter = Counter()
    solver.add_callback(counter)
    solver.step(2)
    assert events == [("start", 0), ("ready", 0), ("start", 1), ("ready", 1)]
    assert counter.calls == 4 and solver.iter == 2
    with h5py.File("train_0.h5") as f:                 # iteration 1 read rows 4..7
        np.testing.assert_array_equal(solver.net.blobs["data"].data, f["data"][4:8])
    solver.step(1)
    assert solver.net.blobs["loss"].data == pytest.approx(float(solver.smoothed_loss), rel=1e-6)


def test_apply_update_leaves_iter(problem: Path) -> None:
    solver = SGDSolver("solver.prototxt")
    before = weights(solver)
    solver.net.forward()
    solver.net.backward()
    solver.apply_update()
    assert solver.iter == 0
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights(solver)))


def test_test_nets_share_trained_weights(problem: Path) -> None:
    write_solver(problem, test_iter="2", test_interval="5")
    solver = SGDSolver("solver.prototxt")
    solver.step(5)
    test_conv = solver.test_nets[0].params["conv1"][0].data
    np.testing.assert_array_equal(test_conv, solver.net.params["conv1"][0].data)
    solver.net.params["conv1"][0].data[...] = 0.5
    assert (solver.test_nets[0].params["conv1"][0].data == 0.5).all()
    scores = solver.test(0)
    assert len(scores) == 2 and 0 <= scores[0] <= 1  # accuracy, then loss (Caffe's name order)


def test_input_blobs_are_fed_from_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nets with Input layers train on what the user wrote into ``solver.net.blobs``."""
    monkeypatch.chdir(tmp_path)
    net = NET.split('layer { name: "conv1"')[1]
    (tmp_path / "train.prototxt").write_text(
        'name: "tiny"\nlayer { name: "in" type: "Input" top: "data" top: "label"\n'
        '  input_param { shape { dim: 4 dim: 1 dim: 8 dim: 8 } shape { dim: 4 } } }\n'
        'layer { name: "conv1"' + net.split('layer { name: "accuracy"')[0])
    write_solver(tmp_path)
    solver = SGDSolver("solver.prototxt")
    rng = np.random.default_rng(1)
    solver.net.blobs["data"].data[...] = rng.standard_normal((4, 1, 8, 8))
    solver.net.blobs["label"].data[...] = [0, 1, 2, 1]
    expected = solver.net.forward()["loss"].item()
    solver.step(1)
    assert float(solver.smoothed_loss) == pytest.approx(expected, rel=1e-6)
    assert list(solver.net.blobs["label"].data) == [0, 1, 2, 1]


def test_nan_loss_stops_without_touching_snapshots(problem: Path) -> None:
    write_solver(problem, snapshot="2")
    solver = SGDSolver("solver.prototxt")

    def poison() -> None:
        if solver.iter == 3:
            solver.net.params["ip2"][0].data[...] = np.nan

    solver.add_callback(poison, lambda: None)
    with pytest.raises(TrainingError, match=r"iteration 3: the training loss is nan.*"
                                            r"snap_iter_2\.solverstate"):
        solver.step(10)
    assert solver.iter == 3
    assert not Path("snap_iter_4.caffemodel").exists()
    (ip2,) = [r for r in read_caffemodel("snap_iter_2.caffemodel") if r.name == "ip2"]
    assert all(np.isfinite(blob.data).all() for blob in ip2.blobs)


def test_snapshot_prefix_rules(problem: Path) -> None:
    """Caffe's UpgradeSnapshotPrefixProperty: unset -> the solver path minus its extension;
    a directory -> that directory plus the solver's stem."""
    write_solver(problem, "unset.prototxt", snapshot_prefix=None)
    assert SGDSolver("unset.prototxt").param.snapshot_prefix == "unset"
    (problem / "snaps").mkdir()
    write_solver(problem, "indir.prototxt", snapshot_prefix='"snaps"', snapshot="5")
    solver = SGDSolver("indir.prototxt")
    solver.step(5)
    assert Path("snaps/indir_iter_5.solverstate").is_file()


def test_paths_resolve_beside_the_solver(problem: Path, tmp_path_factory) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    os.chdir(elsewhere)
    solver = SGDSolver(problem / "solver.prototxt")     # net and data found beside the file
    solver.step(1)
    assert solver.iter == 1


# -- command line -------------------------------------------------------------------------------

GLOG = re.compile(r"^[IWEF](?:\d{4})?\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ \S+:\d+\] ")


def cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caffe2torch.cli", *args], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=600, **kw)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def messages(stderr: str) -> list[str]:
    lines = [line for line in stderr.splitlines() if GLOG.match(line)]
    return [GLOG.sub("", line) for line in lines]


def test_cli_train(problem: Path) -> None:
    write_solver(problem, max_iter="6", snapshot="3")
    done = cli("train", "-solver", "solver.prototxt", cwd=problem)
    assert done.returncode == 0, done.stderr
    # glog's classic prefix, which Caffe's tools/extra/parse_log.py reads (month/day first)
    first = next(line for line in done.stderr.splitlines() if GLOG.match(line))
    assert re.match(r"I(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) ", first)
    log = messages(done.stderr)
    for expected in ("Use CPU.", "Solving tiny", "Learning Rate Policy: fixed",
                     "Iteration 0, lr = 0.02", "Starting Optimization",
                     "Snapshotting to binary proto file snap_iter_3.caffemodel",
                     "Snapshotting solver state to binary proto file snap_iter_3.solverstate",
                     "Snapshotting to binary proto file snap_iter_6.caffemodel",
                     "Optimization Done."):
        assert expected in log, expected
    assert any(re.fullmatch(r"Iteration 5 \(\S+ iter/s, \S+s/1 iters\), loss = [\d.e-]+", m)
               for m in log)
    assert any(re.fullmatch(r"    Train net output #0: loss = \S+ \(\* 1 = \S+ loss\)", m)
               for m in log)
    assert any(re.fullmatch(r"Iteration 6, loss = \S+", m) for m in log)
    assert {p.name for p in problem.glob("snap_*")} == {
        "snap_iter_3.caffemodel", "snap_iter_3.solverstate",
        "snap_iter_6.caffemodel", "snap_iter_6.solverstate"}


@pytest.mark.parametrize("args, message", [
    ((), "Need a solver definition"),
    (("-solver", "solver.prototxt", "-snapshot", "a.solverstate", "-weights", "w.caffemodel"),
     "not both"),
    (("-solver", "missing.prototxt"), "missing.prototxt"),
])
def test_cli_train_errors(problem: Path, args: tuple[str, ...], message: str) -> None:
    done = cli("train", *args, cwd=problem)
    assert done.returncode == 1
    assert "caffe2torch: error:" in done.stderr and message in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_sigint_snapshots_and_resumes(problem: Path) -> None:
    """SIGINT (sigint_effect stop): a snapshot at the current iteration, exit status 0; then
    ``-snapshot`` resumes from it."""
    write_solver(problem, max_iter="100000")
    proc = subprocess.Popen([sys.executable, "-m", "caffe2torch.cli", "train", "-solver",
                             "solver.prototxt"], cwd=problem, env=_env(),
                            stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(300, proc.kill)
    timer.start()
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "] Iteration 3 (" in line:
                proc.send_signal(signal.SIGINT)
                break
        seen += proc.stderr.readlines()
        assert proc.wait() == 0, "".join(seen)
    finally:
        timer.cancel()
    log = messages("".join(seen))
    assert "Optimization stopped early." in log
    states = sorted(problem.glob("snap_iter_*.solverstate"))
    assert len(states) == 1
    stopped = int(re.search(r"_iter_(\d+)", states[0].name).group(1))
    assert stopped >= 4
    write_solver(problem, "more.prototxt", max_iter=str(stopped + 2))
    done = cli("train", "-solver", "more.prototxt", "-snapshot", states[0].name, cwd=problem)
    assert done.returncode == 0, done.stderr
    log = messages(done.stderr)
    assert f"Resuming from {states[0].name}" in log
    assert not any(m.startswith(f"Iteration {stopped - 1} (") for m in log)
    assert any(m.startswith(f"Iteration {stopped + 1} (") for m in log)
    assert (problem / f"snap_iter_{stopped + 2}.caffemodel").is_file()


def test_cli_test(problem: Path) -> None:
    SGDSolver("solver.prototxt").snapshot()
    done = cli("test", "-model", "train.prototxt", "-weights", "snap_iter_0.caffemodel",
               "-iterations", "3", cwd=problem)
    assert done.returncode == 0, done.stderr
    log = messages(done.stderr)
    batches = [re.fullmatch(r"Batch (\d), (\w+) = (\S+)", m) for m in log]
    batches = [b.groups() for b in batches if b]
    assert [(i, name) for i, name, _ in batches] == \
        [(str(i), name) for i in range(3) for name in ("accuracy", "loss")]
    losses = [float(v) for _, name, v in batches if name == "loss"]
    accuracy = [float(v) for _, name, v in batches if name == "accuracy"]
    tail = log[-3:]
    assert re.fullmatch(r"Loss: \S+", tail[0])
    assert float(tail[0].split()[1]) == pytest.approx(np.mean(losses), rel=1e-5)
    assert float(tail[1].split(" = ")[1]) == pytest.approx(np.mean(accuracy), rel=1e-5)
    mean = float(tail[2].split()[2])
    assert tail[2] == f"loss = {mean:g} (* 1 = {mean:g} loss)"


def test_cli_test_matches_caffe(tmp_path: Path) -> None:
    """golden/tools/caffe_test: the same per-batch and mean lines as ``caffe test``."""
    case = shared_root() / "golden" / "tools" / "caffe_test"
    done = cli("test", "-model", str(case / "net.prototxt"), "-weights",
               str(case / "weights.caffemodel"), "-iterations", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    def results(text: str) -> list[str]:
        return [m for m in messages(text) if re.match(r"Running for|Batch \d|Loss: |\w+ = ", m)]

    assert results(done.stderr) == results((case / "output.log").read_text())


def test_cli_time_matches_caffes_report(tmp_path: Path) -> None:
    case = shared_root() / "golden" / "tools" / "caffe_time"
    done = cli("time", "-model", str(case / "net.prototxt"), "-iterations", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    def shape(text: str) -> list[str]:
        log = messages(text)
        body = log[log.index("Performing Forward"):log.index("*** Benchmark ends ***") + 1]
        return [re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", m) for m in body]

    assert shape(done.stderr) == shape((case / "output.log").read_text())


def test_cli_device_query(tmp_path: Path) -> None:
    import torch

    done = cli("device_query", "-gpu", "0", cwd=tmp_path)
    if torch.cuda.is_available():
        assert done.returncode == 0 and "Name:" in done.stderr
    else:
        assert done.returncode == 1 and "no CUDA device" in done.stderr


def test_cli_lists_caffe_commands() -> None:
    done = subprocess.run([sys.executable, "-m", "caffe2torch.cli", "--help"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    for command in ("train", "test", "time", "device_query"):
        assert command in done.stdout
