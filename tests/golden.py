"""Replay of ../shared/golden cases (protocol in golden/FORMAT.md) against caffe2torch."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from conftest import shared_dir

shared_root = shared_dir


def cases(group: str) -> list[str]:
    """Case folder names of ``golden/<group>``; missing data fails collection loudly."""
    path = shared_dir() / "golden" / group
    return sorted(p.name for p in path.iterdir() if (p / "case.json").is_file())


def _recipe(case_dir: Path) -> dict[str, list[np.ndarray]]:
    spec = importlib.util.spec_from_file_location("golden_recipe", shared_root() / "golden" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.recipe_params(str(case_dir))


def _close(what: str, ours: np.ndarray, theirs: np.ndarray, rtol: float, atol: float) -> None:
    ours = np.asarray(ours)
    if ours.shape == () and theirs.shape == (1,):
        # Caffe blobs with 0 axes (losses, a shared PReLU slope) are recorded as (1,).
        ours = ours.reshape(1)
    assert ours.shape == theirs.shape, f"{what}: shape {list(ours.shape)}, Caffe {list(theirs.shape)}"
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=what)


# Whole-net cases (group "nets") are compared per blob against the blob's scale, not per
# element: float32 sums taken in another order (oneDNN vs Caffe's OpenBLAS GEMM) differ by
# ~1e-7 relative per operation, and through 20-200 layers a near-zero element of a blob whose
# other elements are large cannot meet an element-wise rtol. Forward blobs and parameters must
# satisfy max|ours - caffe| <= atol + rtol * max|caffe| with the case's own rtol/atol, and so
# must diffs, except where they cannot, for two float32 reasons outside the semantics:
# * MAX-pooling or ReLU decisions that tie within float32 rounding, decided one way by Caffe's
#   sums and the other by ours (tests/near_ties.py): a patch of the gradients below them
#   differs wholly. With those decided Caffe's way, our float64 gradients must meet the bound;
# * Caffe's Softmax backward takes sum(dy * y) with OpenBLAS's AVX-512 sdot (float32 lanes, 64
#   products at a time); after a peaked softmax, dy - sum(dy * y) cancels most digits and that
#   rounding reaches 1e-4 of the blob's scale (SqueezeNet), so diffs are held to
#   NET_BACKWARD_RTOL of their scale when the case's rtol is tighter.
# Our float32 diffs then keep a relative L2 distance of at most NET_BACKWARD_REL_L2 from
# Caffe's: they may decide a near-tie differently from both Caffe and float64.
NET_BACKWARD_RTOL = 1e-3
NET_BACKWARD_REL_L2 = 2e-2


def _net_close(what: str, ours: np.ndarray, theirs: np.ndarray, rtol: float, atol: float) -> None:
    error = _net_error(what, ours, theirs, rtol, atol)
    assert error is None, error


def _net_error(what: str, ours: np.ndarray, theirs: np.ndarray, rtol: float, atol: float
               ) -> str | None:
    """Why ``ours`` misses Caffe's recorded blob by more than its scale allows, or None."""
    ours = np.asarray(ours, dtype=np.float64)
    if ours.size == theirs.size:
        ours = ours.reshape(theirs.shape)
    if ours.shape != theirs.shape:
        return f"{what}: shape {list(ours.shape)}, Caffe {list(theirs.shape)}"
    ref = theirs.astype(np.float64)
    worst = np.abs(ours - ref).max() if ref.size else 0.0
    scale = np.abs(ref).max() if ref.size else 0.0
    if worst <= atol + rtol * scale:
        return None
    return f"{what}: max |ours - caffe| = {worst:.3g} > {atol + rtol * scale:.3g} (scale {scale:.3g})"


def _net_backward(net, spec: dict, blobs, rtol: float, atol: float) -> None:
    """Compare a net case's diffs; explain any miss by float32 near-ties (see above)."""
    from near_ties import explain

    keys = [k for k in blobs.files if k.startswith(("diff/", "param_diff/"))]

    def ours(key: str) -> np.ndarray:
        kind, _, rest = key.partition("/")
        if kind == "diff":
            return net.blobs[rest].diff
        layer, i = rest.rsplit("/", 1)
        return net.params[layer][int(i)].diff

    misses = [e for e in (_net_error(k, ours(k), blobs[k], rtol, atol) for k in keys) if e]
    if not misses:
        return
    feed = {n: blobs[f"data/{n}"] for n in net.inputs}
    topdiff = {b: blobs[f"topdiff/{b}"] for b in spec.get("topdiff", [])}
    bound = max(rtol, NET_BACKWARD_RTOL)

    def enough(grads: dict[str, np.ndarray]) -> bool:
        return not any(_net_error(k, grads[k], blobs[k], bound, atol) for k in keys)

    exact, flips = explain(net, feed, topdiff, {k: blobs[k] for k in keys}, enough)
    for key in keys:
        moved = sum((flip.effect[key] for flip in flips), np.zeros_like(exact[key]))
        _net_close(f"{key} (float64, {len(flips)} near-tie(s) decided Caffe's way; "
                   f"first misses: {misses[:3]})", exact[key] + moved, blobs[key], bound, atol)
        ref = blobs[key].astype(np.float64)
        err = np.linalg.norm(np.asarray(ours(key), np.float64).reshape(ref.shape) - ref)
        assert err <= NET_BACKWARD_REL_L2 * max(np.linalg.norm(ref), 1e-30), \
            f"{key}: float32 relative L2 error {err / np.linalg.norm(ref):.3g}"


def replay(group: str, name: str, diverging: frozenset[str] = frozenset()):
    """Build the case's net, feed its inputs, and compare forward, params and backward.

    Keys in ``diverging`` (recorded values that come from a Caffe defect) are left out of
    the comparison; the net is returned so that the caller can check them its own way.
    """
    import caffe2torch as caffe

    case_dir = shared_root() / "golden" / group / name
    assert case_dir.is_dir(), f"golden case {case_dir} is missing"
    spec = json.loads((case_dir / "case.json").read_text())
    rtol, atol = spec.get("rtol", 1e-5), spec.get("atol", 1e-6)
    phase = caffe.TRAIN if spec.get("phase") == "TRAIN" else caffe.TEST
    weights = case_dir / spec["weights"] if spec.get("weights") else None
    net = caffe.Net(str(case_dir / spec["model"]), phase, weights=weights,
                    level=spec.get("level", 0), stages=spec.get("stages", []))
    if weights is None and spec.get("weights_recipe"):
        for layer, values in _recipe(case_dir).items():
            for i, value in enumerate(values):
                net.params[layer][i].data[...] = value
    close = _net_close if group == "nets" else _close
    blobs = np.load(case_dir / "blobs.npz")
    for name_ in net.inputs:
        value = blobs[f"data/{name_}"]
        net.blobs[name_].reshape(*value.shape)
        net.blobs[name_].data[...] = value
    net.reshape()
    net.forward()

    def compare(blob_kind: str, param_kind: str, field: str) -> None:
        for key in blobs.files:
            kind, _, rest = key.partition("/")
            if key in diverging:
                continue
            if kind == blob_kind:
                close(key, getattr(net.blobs[rest], field), blobs[key], rtol, atol)
            elif kind == param_kind:
                layer, i = rest.rsplit("/", 1)
                close(key, getattr(net.params[layer][int(i)], field), blobs[key], rtol, atol)

    compare("data", "param", "data")
    if not spec.get("backward"):
        return net
    for blob in spec.get("topdiff", []):
        net.blobs[blob].diff[...] = blobs[f"topdiff/{blob}"]
    for params in net.params.values():
        for p in params:
            p.diff[...] = 0
    net.backward()
    if group == "nets":
        _net_backward(net, spec, blobs, rtol, atol)
    else:
        compare("diff", "param_diff", "diff")
    return net
