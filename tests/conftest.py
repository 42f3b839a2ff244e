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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Fixture form of shared_dir()."""
    return shared_dir()
