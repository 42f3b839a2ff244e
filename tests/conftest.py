"""pytest configuration shared by caffe2torch's tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_ENV = "CAFFE2TORCH_SHARED"


def shared_dir() -> Path:
    """Root of the read-only reference data (corpus/, golden/, notes/).

    Taken from $CAFFE2TORCH_SHARED, else ``<repo root>/../shared``.  Raises
    when the directory is missing, so tests that need it fail instead of
    being skipped.
    """
    raw = os.environ.get(SHARED_ENV)
    path = Path(raw).expanduser() if raw else REPO_ROOT.parent / "shared"
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared reference data not found at {path}; "
            f"set {SHARED_ENV} to its location"
        )
    return path.resolve()


def shared_path(*parts: str) -> Path:
    """A path inside the shared reference data (see shared_dir)."""
    return shared_dir().joinpath(*parts)


def pytest_configure(config: pytest.Config) -> None:
    """``CAFFE2TORCH_TEST_DEVICE=cuda`` builds the pycaffe nets of the run in GPU mode
    (``caffe.set_mode_gpu()``) to replay the golden cases and run the device-aware tests
    on a GPU (README, Testing); tests using the ``cpu_mode`` fixture stay on the CPU."""
    if os.environ.get("CAFFE2TORCH_TEST_DEVICE", "cpu") == "cuda":
        import caffe2torch

        caffe2torch.set_mode_gpu()


@pytest.fixture
def cpu_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """pycaffe nets built in the test live on the CPU even in a GPU-mode run: for tests
    that feed host tensors to ``net.module`` or check CPU-only code paths."""
    from caffe2torch import mode

    monkeypatch.setitem(mode._state, "gpu", False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Fixture form of shared_dir()."""
    return shared_dir()
