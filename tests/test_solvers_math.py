"""Caffe's update rules and lr policies against plain numpy float32 versions of Caffe's formulas.

The numpy references below are written from Caffe's solver sources (``*_solver.cpp``), in
Caffe's order of float operations; the lr policies are also checked against the rates real
Caffe used in the golden solver runs.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from caffe2torch.solvers import (
    LR_POLICIES, OPTIMIZERS, SGD, AdaDelta, AdaGrad, Adam, Nesterov, RMSProp,
    clip_gradients_, learning_rate, scale_gradients_,
)
from golden import shared_root

F = np.float32
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- numpy references: one Caffe ComputeUpdateValue each, on float32 arrays ---------------

def ref_sgd(w, g, hist, lr, hp, t):
    (v,) = hist
    v[...] = F(hp["momentum"]) * v + lr * g
    return w - v


def ref_nesterov(w, g, hist, lr, hp, t):
    (v,) = hist
    m = F(hp["momentum"])
    v_old = v.copy()
    v[...] = m * v + lr * g
    return w - ((F(1) + m) * v - m * v_old)


def ref_adagrad(w, g, hist, lr, hp, t):
    (h,) = hist
    h[...] = h + g * g
    return w - lr * (g / (np.sqrt(h) + F(hp["delta"])))


def ref_rmsprop(w, g, hist, lr, hp, t):
    (h,) = hist
    rd = F(hp["rms_decay"])
    h[...] = rd * h + (F(1) - rd) * (g * g)
    return w - lr * (g / (np.sqrt(h) + F(hp["delta"])))


def ref_adadelta(w, g, hist, lr, hp, t):
    h1, h2 = hist
    m, delta = F(hp["momentum"]), F(hp["delta"])
    h1[...] = m * h1 + (F(1) - m) * (g * g)
    u = g * np.sqrt((h2 + delta) / (h1 + delta))
    h2[...] = m * h2 + (F(1) - m) * (u * u)
    return w - lr * u


def ref_adam(w, g, hist, lr, hp, t):
    m, v = hist
    b1, b2 = F(hp["momentum"]), F(hp["momentum2"])
    m[...] = b1 * m + (F(1) - b1) * g
    v[...] = b2 * v + (F(1) - b2) * (g * g)
    correction = F(math.sqrt(1 - float(b2) ** t) / (1 - float(b1) ** t))
    return w - (lr * correction) * (m / (np.sqrt(v) + F(hp["delta"])))


RULES = {
    "SGD": (ref_sgd, 1, dict(momentum=0.9)),
    "Nesterov": (ref_nesterov, 1, dict(momentum=0.9)),
    "AdaGrad": (ref_adagrad, 1, dict(delta=1e-6)),
    "RMSProp": (ref_rmsprop, 1, dict(rms_decay=0.95, delta=1e-6)),
    "AdaDelta": (ref_adadelta, 2, dict(momentum=0.95, delta=1e-6)),
    "Adam": (ref_adam, 2, dict(momentum=0.9, momentum2=0.999, delta=1e-8)),
}

# Four params in Caffe's order, as (shape, group index); groups are consecutive runs, so the
# optimizer's param order (and history order) is this order. Param 1 has no gradient for the
# first two steps; group 1 has decay_mult 0 (Caffe skips Regularize); group 2 uses L1.
PARAMS = [((4, 3), 0), ((6,), 0), ((3,), 1), ((2, 5), 2)]
GROUPS = [dict(lr_mult=1.0, decay_mult=1.0, regularization="L2"),
          dict(lr_mult=2.0, decay_mult=0.0, regularization="L2"),
          dict(lr_mult=1.5, decay_mult=0.5, regularization="L1")]
RATES = [0.1, 0.1, 0.05, 0.01]
WEIGHT_DECAY = 0.01


def _scenario(seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal(shape).astype(F) for shape, _ in PARAMS]
    grads = [[None if (i == 1 and step < 2) else rng.standard_normal(shape).astype(F)
              for i, (shape, _) in enumerate(PARAMS)] for step in range(len(RATES))]
    return weights, grads


def _param_groups(params: list[torch.Tensor]) -> list[dict]:
    return [dict(params=[p for p, (_, k) in zip(params, PARAMS) if k == g], **GROUPS[g])
            for g in range(len(GROUPS))]


def run_reference(name: str, first_iteration: int = 0):
    """Caffe's ApplyUpdate per param: Regularize, ComputeUpdateValue, W -= diff."""
    rule, n_slots, hp = RULES[name]
    weights, grads = _scenario()
    hist = [[np.zeros_like(w) for w in weights] for _ in range(n_slots)]
    for step, rate in enumerate(RATES):
        t = first_iteration + step + 1
        for i, w in enumerate(weights):
            g = grads[step][i]
            if g is None:
                continue
            group = GROUPS[PARAMS[i][1]]
            decay = F(WEIGHT_DECAY) * F(group["decay_mult"])
            if decay != 0:
                reg = np.sign(w) if group["regularization"] == "L1" else w
                g = g + decay * reg
            local_rate = F(rate) * F(group["lr_mult"])
            weights[i] = rule(w, g, [h[i] for h in hist], local_rate, hp, t)
    return weights, [h for slot in hist for h in slot]


def run_torch(name: str, foreach: bool, device: str = "cpu", first_iteration: int = 0):
    _, _, hp = RULES[name]
    weights, grads = _scenario()
    params = [torch.nn.Parameter(torch.tensor(w, device=device)) for w in weights]
    opt = OPTIMIZERS[name](_param_groups(params), lr=RATES[0], weight_decay=WEIGHT_DECAY, foreach=foreach,
                           **hp)
    opt.set_iteration(first_iteration)
    for step, rate in enumerate(RATES):
        for p, g in zip(params, grads[step]):
            p.grad = None if g is None else torch.tensor(g, device=device)
        opt.set_lr(rate)
        opt.step()
    assert opt.iteration == first_iteration + len(RATES)
    return opt, [p.detach().cpu().numpy() for p in params], [h.cpu().numpy() for h in opt.history()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(RULES))
def test_update_rule_matches_numpy_reference(name: str, device: str) -> None:
    ref_w, ref_h = run_reference(name)
    results = {fe: run_torch(name, fe, device) for fe in (True, False)}
    for foreach, (_, weights, history) in results.items():
        assert len(history) == len(ref_h) == RULES[name][1] * len(PARAMS)
        for got, want in zip(weights + history, ref_w + ref_h):
            if device == "cpu":  # same IEEE float32 ops in the same order: the same bits
                np.testing.assert_array_equal(got, want, err_msg=f"{name} foreach={foreach}")
            else:
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7,
                                           err_msg=f"{name} foreach={foreach}")
    # The multi-tensor and per-tensor paths run the same ops: bit-identical results.
    for a, b in zip(results[True][1] + results[True][2], results[False][1] + results[False][2]):
        np.testing.assert_array_equal(a, b)


def test_adam_bias_correction_uses_iteration() -> None:
    ref_w, _ = run_reference("Adam", first_iteration=7)
    _, weights, _ = run_torch("Adam", True, first_iteration=7)
    for got, want in zip(weights, ref_w):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_history_complete_and_in_caffe_order() -> None:
    a, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(4))
    opt = Adam([{"params": [a]}, {"params": [b], "lr_mult": 2.0}], lr=0.1, momentum=0.9)
    history = opt.history()  # before any step: zeros for every param, m's then v's
    assert [tuple(h.shape) for h in history] == [(2, 3), (4,), (2, 3), (4,)]
    a.grad = torch.ones(2, 3)  # b has no gradient: its slots stay zero
    opt.step()
    m_a, m_b, v_a, v_b = opt.history()
    assert torch.allclose(m_a, torch.full((2, 3), 0.1))
    assert torch.allclose(v_a, torch.full((2, 3), 0.001))
    assert not m_b.any() and not v_b.any()


def test_load_history_resumes_exactly() -> None:
    full_opt, full_w, _ = run_torch("AdaDelta", True)
    # Run the first two steps, hand the history to a fresh optimizer, run the rest there.
    _, _, hp = RULES["AdaDelta"]
    weights, grads = _scenario()
    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]

    def make():
        return AdaDelta(_param_groups(params), lr=0.0, weight_decay=WEIGHT_DECAY, **hp)

    def run(opt, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = None if g is None else torch.tensor(g)
            opt.set_lr(RATES[step])
            opt.step()

    first = make()
    run(first, range(2))
    saved = [h.clone().numpy() for h in first.history()]
    second = make()
    second.load_history(saved)
    second.set_iteration(first.iteration)
    run(second, range(2, len(RATES)))
    for p, want in zip(params, full_w):
        np.testing.assert_array_equal(p.detach().numpy(), want)
    for got, want in zip(second.history(), full_opt.history()):
        assert torch.equal(got, want)


CHANGED = {"momentum": 0.5, "momentum2": 0.99, "delta": 1e-4, "rms_decay": 0.9}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", list(RULES))
def test_group_values_changed_between_steps_take_effect(name: str, foreach: bool) -> None:
    """Every step reads the groups' current values, as Caffe reads ``param_`` at every update:
    changing them after two steps == a fresh optimizer made with the new values that takes
    over the weights and the history."""
    _, _, hp = RULES[name]
    weights, grads = _scenario()
    new_hp = {k: CHANGED.get(k, v) for k, v in hp.items()}
    groups = [dict(g, lr_mult=2 * g["lr_mult"], regularization="L2") for g in GROUPS]

    def run(opt, params, steps):
        for step in steps:
            for p, g in zip(params, grads[step]):
                p.grad = None if g is None else torch.tensor(g)
            opt.set_lr(RATES[step])
            opt.step()

    params = [torch.nn.Parameter(torch.tensor(w)) for w in weights]
    changed = OPTIMIZERS[name](_param_groups(params), lr=0.0, weight_decay=WEIGHT_DECAY,
                               foreach=foreach, **hp)
    run(changed, params, range(2))
    taken_over = [torch.nn.Parameter(p.detach().clone()) for p in params]
    history = [h.clone() for h in changed.history()]
    for group, values in zip(changed.param_groups, groups):
        group.update(values, weight_decay=2 * WEIGHT_DECAY, **new_hp)
    run(changed, params, range(2, len(RATES)))

    fresh_groups = [dict(params=[p for p, (_, k) in zip(taken_over, PARAMS) if k == g],
                         **groups[g]) for g in range(len(groups))]
    fresh = OPTIMIZERS[name](fresh_groups, lr=0.0, weight_decay=2 * WEIGHT_DECAY,
                             foreach=foreach, **new_hp)
    fresh.load_history(history)
    fresh.set_iteration(2)
    run(fresh, taken_over, range(2, len(RATES)))
    for a, b in zip(params + changed.history(), taken_over + fresh.history()):
        assert torch.equal(a, b)
    assert not torch.equal(params[0], torch.tensor(run_reference(name)[0][0]))


def test_load_history_checks_count_and_shape() -> None:
    a, b = torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = SGD([a, b], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="expected 2 history blobs, got 3"):
        opt.load_history([torch.zeros(3, 2), torch.zeros(2), torch.zeros(2)])
    with pytest.raises(ValueError, match=r"history blob 1 \(param 1\) has shape \(3,\)"):
        opt.load_history([torch.zeros(3, 2), torch.zeros(3)])
    # A legacy 4-D blob (num, channels, height, width) with leading 1s is accepted.
    opt.load_history([torch.ones(1, 1, 3, 2), np.full(2, 2.0, np.float32)])
    assert torch.equal(opt.history()[0], torch.ones(3, 2))
    assert torch.equal(opt.history()[1], torch.full((2,), 2.0))


def test_state_dict_round_trip_keeps_history_and_iteration() -> None:
    opt, _, history = run_torch("Adam", True)
    clone = Adam(_param_groups([torch.nn.Parameter(torch.zeros(s)) for s, _ in PARAMS]), lr=0.1)
    clone.load_state_dict(opt.state_dict())
    assert clone.iteration == opt.iteration
    for got, want in zip(clone.history(), history):
        np.testing.assert_array_equal(got.numpy(), want)


def test_sgd_differs_from_torch_sgd_only_after_rate_change() -> None:
    w_caffe, w_torch = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    caffe, ref = SGD([w_caffe], lr=1.0, momentum=0.9), torch.optim.SGD([w_torch], lr=1.0,
                                                                          momentum=0.9)
    for rate in (1.0, 1.0, 0.1):
        for opt, w in ((caffe, w_caffe), (ref, w_torch)):
            w.grad = torch.ones(1)
            for group in opt.param_groups:
                group["lr"] = rate
            opt.step()
        if rate == 1.0:
            assert torch.equal(w_caffe, w_torch)
    # Caffe's history holds lr*g, so the old velocity is not rescaled by the new rate.
    assert w_caffe.item() == pytest.approx(1 - 1 - 1.9 - (0.9 * 1.9 + 0.1))
    assert w_torch.item() == pytest.approx(1 - 1 - 1.9 - 0.1 * (0.9 * 1.9 + 1))


def test_plain_pytorch_loop_trains() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    for cls, kw in [(SGD, dict(lr=0.05, momentum=0.9)), (Nesterov, dict(lr=0.05, momentum=0.9)),
                    (AdaGrad, dict(lr=0.5)), (RMSProp, dict(lr=0.01)),
                    (AdaDelta, dict(lr=1.0, momentum=0.9, delta=1e-2)),
                    (Adam, dict(lr=0.05, momentum=0.9))]:
        model = torch.nn.Linear(4, 1)
        opt = cls(model.parameters(), weight_decay=1e-4, **kw)
        first = None
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        assert loss.item() < 0.5 * first, cls.__name__


def test_constructor_checks_mirror_caffe() -> None:
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Momentum cannot be used with AdaGrad"):
        AdaGrad(p, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="Momentum cannot be used with RMSProp"):
        RMSProp(p, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="rms_decay"):
        RMSProp(p, lr=0.1, rms_decay=1.0)
    with pytest.raises(ValueError, match="'L3'"):
        SGD(p, lr=0.1, regularization="L3")
    defaults = Adam(p, lr=0.1).defaults
    assert (defaults["delta"], defaults["momentum2"], defaults["momentum"]) == (1e-8, 0.999, 0.0)
    assert RMSProp(p, lr=0.1).defaults["rms_decay"] == 0.99


def test_clip_and_scale_gradients() -> None:
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # c.grad is None
    assert clip_gradients_([a, b, c], 10.0) == 5.0
    assert torch.equal(a.grad, torch.tensor([3.0, 0.0]))  # under the threshold: untouched
    assert clip_gradients_([a, b, c], -1.0) == 5.0  # Caffe's default -1: off
    assert clip_gradients_([a, b, c], 2.5) == 5.0
    assert torch.allclose(a.grad, torch.tensor([1.5, 0.0]))
    assert torch.allclose(b.grad, torch.tensor([0.0, 2.0]))
    scale_gradients_([a, b, c], 1 / 3)
    assert torch.allclose(b.grad, torch.tensor([0.0, 2.0 / 3]))


# --- lr policies ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy, kwargs, iteration, want", [
    ("fixed", {}, 123, 0.1),
    ("step", dict(gamma=0.1, stepsize=10), 25, 0.1 * 0.1 ** 2),
    ("exp", dict(gamma=0.9), 5, 0.1 * 0.9 ** 5),
    ("inv", dict(gamma=0.1, power=0.75), 10, 0.1 * (1 + 0.1 * 10) ** -0.75),
    ("poly", dict(power=2.0, max_iter=100), 25, 0.1 * (1 - 25 / 100) ** 2),
    ("sigmoid", dict(gamma=0.5, stepsize=10), 12, 0.1 / (1 + math.exp(-0.5 * (12 - 10)))),
])
def test_lr_policy_values(policy, kwargs, iteration, want) -> None:
    rate, _ = learning_rate(policy, 0.1, iteration, **kwargs)
    assert rate == pytest.approx(want, rel=1e-6)
    assert rate == float(F(rate))  # Caffe's rate is a float


def test_step_policy_sets_current_step() -> None:
    assert learning_rate("step", 1.0, 25, gamma=0.5, stepsize=10, current_step=0)[1] == 2


def test_multistep_advances_at_most_one_step_per_call() -> None:
    kw = dict(gamma=0.1, stepvalues=[5, 5, 6])
    current, rates = 0, []
    for it in range(4, 9):
        rate, current = learning_rate("multistep", 1.0, it, current_step=current, **kw)
        rates.append((it, current))
    assert rates == [(4, 0), (5, 1), (6, 2), (7, 3), (8, 3)]
    # Resuming late with current_step 0 climbs one step per iteration, as in Caffe.
    assert learning_rate("multistep", 1.0, 100, current_step=0, **kw) == (
        pytest.approx(0.1), 1)


def test_unknown_policy_names_it_and_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="'cosine'.*fixed, step, exp, inv, multistep, poly"):
        learning_rate("cosine", 0.1, 0)
    with pytest.raises(ValueError, match="stepsize"):
        learning_rate("step", 0.1, 0, gamma=0.1)


def _read_solver_prototxt(path: Path) -> dict[str, list[str]]:
    """Top-level ``key: value`` fields (enough for the lr fields; values unquoted)."""
    fields: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*(\w+)\s*:\s*(.*?)\s*(#.*)?$", line)
        if m:
            fields.setdefault(m.group(1), []).append(m.group(2).strip('"'))
    return fields


def test_lr_policies_reproduce_golden_caffe_rates() -> None:
    cases = sorted(p.parent for p in (shared_root() / "golden" / "solvers").glob(
        "*/solver.prototxt"))
    assert cases, "no golden solver cases found"
    seen = set()
    for case in cases:
        f = _read_solver_prototxt(case / "solver.prototxt")
        want = np.load(case / "trajectory.npz")["lr"]
        policy = f.get("lr_policy", [""])[0]
        seen.add(policy)
        one = {k: float(f[k][0]) for k in ("gamma", "power") if k in f}
        ints = {k: int(f[k][0]) for k in ("stepsize", "max_iter") if k in f}
        current, got = 0, []
        for it in range(len(want)):
            rate, current = learning_rate(policy, float(f["base_lr"][0]), it, current_step=current,
                                          stepvalues=[int(v) for v in f.get("stepvalue", [])],
                                          **one, **ints)
            got.append(rate)
        np.testing.assert_allclose(np.array(got, F), want, rtol=1e-6, err_msg=case.name)
        # Caffe's float/double mix (see lr_policy.py) reproduces its rates bit for bit.
        np.testing.assert_array_equal(np.array(got, F), want, err_msg=f"{case.name}: bit-exact")
    assert seen == set(LR_POLICIES)
