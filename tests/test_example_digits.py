"""examples/digits end to end, as its README runs it: scikit-learn's digits -> PNGs -> LMDBs
(our convert_imageset) -> `caffe2torch train` (LeNet, the shipped solver: 600 iterations) ->
`caffe2torch test` on the snapshot -> OpenCV's dnn agrees with caffe2torch on every image."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = REPO_ROOT / "examples" / "digits"
SOURCES = ("make_data.py", "check_opencv.py", "lenet_train_test.prototxt",
           "lenet_solver.prototxt", "lenet_deploy.prototxt")
ITERS = 600        # the solver's max_iter; measured accuracy 0.98 (0.973 at 400)


def run(args: list[str], cwd: Path) -> str:
    # One thread: ~36 iter/s on a loaded 2-core machine (two threads there lose to contention)
    # and it leaves the other core to the rest of the suite (pytest -n 2).
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{output[-4000:]}"
    return output


def test_digits_example_trains_tests_and_exports(tmp_path: Path) -> None:
    work = tmp_path / "examples" / "digits"
    work.mkdir(parents=True)
    for name in SOURCES:
        shutil.copy(EXAMPLE / name, work / name)
    assert f"max_iter: {ITERS}\n" in (work / "lenet_solver.prototxt").read_text()

    run(["examples/digits/make_data.py"], tmp_path)
    assert (work / "test.txt").read_text().count("\n") == 450
    assert (work / "train.txt").read_text().count("\n") == 1347

    log = run(["-m", "caffe2torch.cli", "train", "-solver", "examples/digits/lenet_solver.prototxt"],
              tmp_path)
    assert "Optimization Done." in log
    tests = re.findall(r"Test net output #0: accuracy = ([0-9.]+)", log)
    assert len(tests) == 4, log[-4000:]                  # iterations 0, 200, 400, 600
    assert float(tests[-1]) >= 0.95, log[-4000:]    # the README's claim
    weights = work / f"lenet_iter_{ITERS}.caffemodel"
    assert weights.is_file() and (work / f"lenet_iter_{ITERS}.solverstate").is_file()

    log = run(["-m", "caffe2torch.cli", "test", "-model",
               "examples/digits/lenet_train_test.prototxt", "-weights", str(weights),
               "-iterations", "9"], tmp_path)
    accuracy = float(re.findall(r"\] accuracy = ([0-9.]+)", log)[-1])
    assert abs(accuracy - float(tests[-1])) < 1e-6, log[-2000:]

    out = run(["examples/digits/check_opencv.py", str(weights),
               "examples/digits/lenet_deploy.prototxt"], tmp_path)
    assert "predictions agree: 450/450" in out, out
    accs = [float(a) for a in re.findall(r"accuracy:\s+([0-9.]+)", out)]
    assert len(accs) == 2 and accs[0] == accs[1] and abs(accs[0] - accuracy) < 1e-3, out
