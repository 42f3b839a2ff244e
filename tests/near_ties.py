"""Explain a whole-net backward gap by decisions that tie within float32 rounding.

A MAX-pooling window whose two largest inputs differ by less than float32's resolution
routes its gradient to whichever one the forward ranked first, and a ReLU input within
rounding of zero passes or blocks its gradient by its sign; both depend on the order in
which the layers below summed their products. Real Caffe (OpenBLAS GEMM) and caffe2torch
(oneDNN) sum in different orders, so now and then they decide one of these the other way,
and every gradient below it differs in a patch the size of its receptive field (VGG-16's
golden case: one ``pool3`` window whose top two inputs differ by 6e-8 relative explains
the whole 2e-3 gap).

:func:`explain` replays a case in float64, lists every such near-tie, ranks them all at
once by how much deciding them the other way would move our gradients towards Caffe's
(one directional derivative by central differences), computes the exact gradient change
of the best few (one vector-Jacobian product each) and keeps, greedily, those that bring
our gradients onto Caffe's.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from caffe2torch.layers.activation import ReLU
from caffe2torch.layers.pooling import MAX, Pooling

# A decision is a near-tie when a MAX window's two largest inputs differ by less than this
# fraction of the first, or a ReLU input is smaller than this fraction of its blob's
# largest magnitude: a few float32 ulps of the deep forward's accumulated rounding.
NEAR_TIE = 1e-6
# How many of the best-ranked near-ties get their exact gradient change computed, and the
# least share of the squared residual one must be ranked to explain to be examined at all.
EXAMINED = 16
MEANINGFUL = 1e-2
_H = 1e-10  # central-difference step, relative to the residual's largest element


@dataclass
class Flip:
    """One near-tie decided the other way: where, how close, and what it changes."""

    layer: str
    where: tuple[int, ...]
    gap: float
    effect: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Site:
    """A near-tie: the layer input ``x`` gets gradient ``-grad`` at ``lose``, ``+grad`` at
    ``gain`` (flattened indices) when decided the other way."""

    layer: str
    x: torch.Tensor
    where: torch.Tensor       # (K, d) where the decision is (a pooled output or an input)
    gap: torch.Tensor         # (K,)
    grad: torch.Tensor        # (K,)
    lose: torch.Tensor        # (K,) flat index into x, or -1
    gain: torch.Tensor        # (K,) flat index into x, or -1


def _pool_sites(layer: Pooling, x: torch.Tensor, top: torch.Tensor) -> _Site:
    kernel = layer.kernel or tuple(x.shape[-2:])
    (ph, pw), (sh, sw) = layer.pad, layer.stride
    ho, wo = top.shape[-2:]
    extra_h = (ho - 1) * sh + kernel[0] - x.shape[-2] - 2 * ph
    extra_w = (wo - 1) * sw + kernel[1] - x.shape[-1] - 2 * pw
    xd = x.detach()
    xp = F.pad(xd, (pw, pw + extra_w, ph, ph + extra_h), value=float("-inf"))
    cols = xp.unfold(2, kernel[0], sh).unfold(3, kernel[1], sw)
    best = cols.reshape(*cols.shape[:4], -1).topk(2, dim=-1)
    first, second = best.values[..., 0], best.values[..., 1]
    gap = (first - second) / first.abs().clamp(min=1e-300)
    near = (gap < NEAR_TIE) & (first != second) & torch.isfinite(second) & (top.grad != 0)
    where = near.nonzero()
    n, c, i, j = where.unbind(1)

    def flat(slot: torch.Tensor) -> torch.Tensor:
        row = i * sh + torch.div(slot, kernel[1], rounding_mode="floor") - ph
        col = j * sw + slot % kernel[1] - pw
        return ((n * x.shape[1] + c) * x.shape[2] + row) * x.shape[3] + col

    # One float32 comparison orders a tied pair in every window that holds both: the pair,
    # not the window, is the decision, and its gradient is the sum over those windows.
    pairs = torch.stack([flat(best.indices[..., 0][near]), flat(best.indices[..., 1][near])])
    pairs, which = pairs.unique(dim=1, return_inverse=True)
    grad = torch.zeros(pairs.shape[1], dtype=x.dtype).index_add_(0, which, top.grad[near])
    gaps = torch.full((pairs.shape[1],), float("inf"), dtype=x.dtype)
    gaps = gaps.scatter_reduce(0, which, gap[near], "amin")
    first_window = torch.full((pairs.shape[1],), len(which), dtype=torch.long)
    first_window = first_window.scatter_reduce(0, which, torch.arange(len(which)), "amin")
    return _Site(layer.layer_name, x, where[first_window], gaps, grad, pairs[0], pairs[1])


def _relu_sites(layer: ReLU, x: torch.Tensor, top: torch.Tensor) -> _Site:
    xd = x.detach()
    near = (xd.abs() < NEAR_TIE * xd.abs().max()) & (xd != 0) & (top.grad != 0)
    where = near.nonzero()
    index = torch.arange(x.numel()).view(x.shape)[near]
    passing = xd[near] > 0
    none = torch.full_like(index, -1)
    return _Site(layer.layer_name, x, where, xd[near].abs() / xd.abs().max(),
                 top.grad[near] * (1 - layer.negative_slope),
                 torch.where(passing, index, none), torch.where(passing, none, index))


def _delta(site: _Site, k: int) -> torch.Tensor:
    delta = torch.zeros(site.x.numel(), dtype=site.x.dtype)
    if site.lose[k] >= 0:
        delta[site.lose[k]] -= site.grad[k]
    if site.gain[k] >= 0:
        delta[site.gain[k]] += site.grad[k]
    return delta.view(site.x.shape)


def explain(net, feed: dict[str, np.ndarray], topdiff: dict[str, np.ndarray],
            caffe: dict[str, np.ndarray],
            enough: Callable[[dict[str, np.ndarray]], bool] = lambda grads: False
            ) -> tuple[dict[str, np.ndarray], list[Flip]]:
    """Our float64 gradients of the keys of ``caffe`` (``diff/<blob>``,
    ``param_diff/<layer>/<i>``) with the near-tie flips that best explain Caffe's; none
    are looked for when ``enough(gradients)`` says the float64 gradients already do."""
    module = copy.deepcopy(net.module).to("cpu", torch.float64)  # a float64 reference, on the host
    params = {s.name: module.layers[s.key].blobs for s in module.steps}
    record: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(layer, args, out):
        top = out if isinstance(out, torch.Tensor) else out[0]
        if top.requires_grad:
            top.retain_grad()
        record.append((layer, args[0], top))

    def forward(shift: dict[str, torch.Tensor] | None = None):
        record.clear()
        inputs = {n: torch.tensor(v, dtype=torch.float64) for n, v in feed.items()}
        for name in inputs:
            if shift is None:
                inputs[name].requires_grad_(True)
            elif f"diff/{name}" in shift:
                inputs[name] = inputs[name] + shift[f"diff/{name}"]
        first, final = dict(inputs), {}

        def observe(step, outs):
            for top, value in zip(step.tops, outs):
                if top not in first:
                    first[top] = value
                    if value.requires_grad and value.grad_fn is not None:
                        value.retain_grad()
                final[top] = value

        with torch.set_grad_enabled(shift is None):
            module.run(inputs, observer=observe)
        return first, final

    handles = [layer.register_forward_hook(hook) for layer in module.layers.values()
               if isinstance(layer, ReLU) or (isinstance(layer, Pooling) and layer.method == MAX)]
    try:
        first, final = forward()
        base = list(record)
        targets = {k: first[k[5:]] if k.startswith("diff/") else
                   params[k[11:].rsplit("/", 1)[0]][int(k.rsplit("/", 1)[1])] for k in caffe}
        torch.autograd.backward([final[b] for b in topdiff],
                                [torch.tensor(v, dtype=torch.float64) for v in topdiff.values()],
                                retain_graph=True)
        ours = {k: (t.grad.numpy().copy() if t.grad is not None else np.zeros(t.shape))
                for k, t in targets.items()}
        sites = [(_pool_sites if isinstance(layer, Pooling) else _relu_sites)(layer, x, top)
                 for layer, x, top in base if top.grad is not None]
        sites = [s for s in sites if len(s.gap)]
        if not sites or enough(ours):
            return ours, []
        # Rank every near-tie by <residual, its gradient change> = <J r, delta>, with J r the
        # change of the layer input when inputs and parameters move along the residual r.
        weight = {k: 1.0 / max(float(np.linalg.norm(v)), 1e-30) ** 2 for k, v in caffe.items()}
        residual = {k: caffe[k].astype(np.float64).reshape(ours[k].shape) - ours[k] for k in caffe}
        direction = {k: torch.from_numpy(residual[k] * weight[k]) for k in caffe
                     if k.startswith("param_diff/") or k[5:] in feed}
        scale = max(float(np.abs(v.numpy()).max()) for v in direction.values()) or 1.0
        moved = []
        for sign in (1.0, -1.0):
            step = {k: sign * _H / scale * v for k, v in direction.items()}
            saved = {k: targets[k].data.clone() for k in step if k.startswith("param_diff/")}
            for k in saved:     # through .data: the graph kept for the VJPs stays valid
                targets[k].data.add_(step[k].view(saved[k].shape))
            forward(step)
            moved.append([x.detach().clone() for layer, x, top in record])
            for k, value in saved.items():
                targets[k].data.copy_(value)
        ranked = []
        for site in sites:
            i = next(i for i, (layer, x, top) in enumerate(base) if x is site.x)
            jr = ((moved[0][i] - moved[1][i]) * (scale / (2 * _H))).flatten()
            gain = torch.where(site.gain >= 0, jr[site.gain.clamp(min=0)], 0.0)
            lose = torch.where(site.lose >= 0, jr[site.lose.clamp(min=0)], 0.0)
            score = site.grad * (gain - lose)
            ranked.extend((float(s), site, k) for k, s in enumerate(score))
        ranked.sort(key=lambda t: -t[0])
        flips = []
        total = sum(float(np.vdot(r, r)) * weight[k] for k, r in residual.items())
        for score, site, k in ranked[:EXAMINED]:
            if score < MEANINGFUL * total:
                break
            live = {key: t for key, t in targets.items() if t.requires_grad}
            change = dict(zip(live, torch.autograd.grad(site.x, list(live.values()), _delta(site, k),
                                                        retain_graph=True, allow_unused=True)))
            flips.append(Flip(site.layer, tuple(site.where[k].tolist()), float(site.gap[k]),
                              {key: (change[key].numpy().copy() if change.get(key) is not None
                                     else np.zeros(t.shape)) for key, t in targets.items()}))
    finally:
        for handle in handles:
            handle.remove()
    return ours, _pick(residual, weight, flips)


def _pick(residual: dict[str, np.ndarray], weight: dict[str, float],
          flips: list[Flip]) -> list[Flip]:
    """Greedily the flips that shrink the weighted squared residual the most."""
    residual = {k: v.copy() for k, v in residual.items()}
    chosen, left = [], list(flips)
    while left:
        def gain(flip: Flip) -> float:
            return sum((2 * np.vdot(residual[k], e) - np.vdot(e, e)) * weight[k]
                       for k, e in flip.effect.items())
        best = max(left, key=gain)
        if gain(best) <= 0:
            break
        chosen.append(best)
        left.remove(best)
        for k, e in best.effect.items():
            residual[k] -= e
    return chosen
