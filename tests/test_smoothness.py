"""The smoothness constants L_i(w) and the descent inequality (★) (docs/theory.md, "The per-layer constants")."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dsgd import DSGD, SIGMOID, TANH
from lightning_dsgd.geometry import augment
from lightning_dsgd.smoothness import CROSS_ENTROPY, architecture_input_bounds, mlp_constants

NORMS = ["spectral", "frobenius", "linf"]
MODES = ["data", "architecture"]


# ---------------------------------------------------------------------------- the formula
def reference_constants(a, r, s1, s2, g, h):
    """docs/theory.md, "The per-layer constants" written out literally, 1-based, in plain Python floats."""
    n = len(a)
    a = [None, *a]
    s1 = [None, *s1]
    s2 = [None, *s2]

    def prod(lo, hi):  # Π_{j=lo..hi} s1_j a_j
        return math.prod(s1[j] * a[j] for j in range(lo, hi + 1))

    out = []
    for i in range(1, n + 1):
        curvature = sum(a[k + 1] * s2[k + 1] * prod(i + 1, k) ** 2 * prod(k + 2, n) for k in range(i, n))
        out.append(r[i - 1] ** 2 * (h * prod(i + 1, n) ** 2 + g * curvature))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_constants_match_the_literal_formula(n, seed):
    rng = np.random.default_rng(seed)
    a, r = rng.uniform(0.1, 3.0, n), rng.uniform(1.0, 5.0, n)
    acts = [TANH if rng.random() < 0.5 else SIGMOID for _ in range(n)]
    s1 = [0.0] + [act.s1 for act in acts[1:]]
    s2 = [0.0] + [act.s2 for act in acts[1:]]
    got = mlp_constants(*(torch.tensor(v, dtype=torch.float64) for v in (a, r, s1, s2)), g=1.7, h=0.6)
    np.testing.assert_allclose(got.numpy(), reference_constants(list(a), list(r), s1, s2, 1.7, 0.6), rtol=1e-12)


def test_worked_examples_of_the_spec():
    """paper-reconstruction.md §3.2: one and two hidden layers, tanh, ℓ2 cross-entropy."""
    g, h, s1, s2 = CROSS_ENTROPY.g_l2, CROSS_ENTROPY.h_l2, TANH.s1, TANH.s2
    a2, a3, r0, r1, r2 = 1.3, 0.7, 2.0, 3.0, 4.0
    two = mlp_constants(
        torch.tensor([9.9, a2]), torch.tensor([r0, r1]), torch.tensor([0.0, s1]), torch.tensor([0.0, s2]), g, h
    )
    assert two.tolist() == pytest.approx([r0**2 * (h * s1**2 * a2**2 + g * s2 * a2), r1**2 * h])
    three = mlp_constants(
        torch.tensor([9.9, a2, a3]),
        torch.tensor([r0, r1, r2]),
        torch.tensor([0.0, s1, s1]),
        torch.tensor([0.0, s2, s2]),
        g,
        h,
    )
    expected = [
        r0**2 * (h * s1**4 * a2**2 * a3**2 + g * s2 * (s1 * a2 * a3 + s1**2 * a2**2 * a3)),
        r1**2 * (h * s1**2 * a3**2 + g * s2 * a3),
        r2**2 * h,
    ]
    assert three.tolist() == pytest.approx(expected, rel=1e-6)


def test_activation_and_loss_constants_are_the_true_suprema():
    z = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    for act, fn in ((TANH, torch.tanh), (SIGMOID, torch.sigmoid)):
        zz = z.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(fn(zz).sum(), zz, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), zz)
        assert d1.abs().max().item() == pytest.approx(act.s1, rel=1e-6)
        assert d2.abs().max().item() == pytest.approx(act.s2, rel=1e-6)
        assert fn(z).abs().max().item() <= act.s0
    assert CROSS_ENTROPY.bounds("l2") == (math.sqrt(2), 0.5)
    assert CROSS_ENTROPY.bounds("linf") == (2.0, 1.0)


def test_architecture_input_bounds():
    got = architecture_input_bounds(torch.tensor(3.0), [5, 7, 4], [None, TANH, SIGMOID], "l2")
    assert got.tolist() == pytest.approx([math.sqrt(10), math.sqrt(8), math.sqrt(5)])
    got = architecture_input_bounds(torch.tensor(0.5), [5, 7, 4], [None, TANH, SIGMOID], "linf")
    assert got.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------- constants from the optimizer
def layer_norm_bound(norm, weight):
    w = weight.detach().numpy()
    return np.abs(w).sum(1).max() if norm == "linf" else np.linalg.svd(w, compute_uv=False)[0]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_optimizer_constants_equal_an_independent_computation(norm, mode, activation):
    """One hidden layer: L_1 = R_0²(H s1² a_2² + G s2 a_2), L_2 = R_1² H, every input read by hand."""
    model = mlp([6, 9, 4], activation, seed=3)
    x, y = classification_data(40, 6, 4, seed=3, scale=2.0)
    opt = DSGD(model, norm=norm, constants=mode)
    hidden = model[1](model[0](x)).detach()
    a2 = layer_norm_bound(norm, model[2].weight)
    opt.step(make_closure(model, opt, x, y))
    act = TANH if activation == "tanh" else SIGMOID
    g, h = CROSS_ENTROPY.bounds("linf" if norm == "linf" else "l2")
    if norm == "linf":
        r0 = max(x.abs().amax().item(), 1.0)
        r1 = max(hidden.abs().amax().item(), 1.0) if mode == "data" else 1.0
    else:
        r0 = math.sqrt(x.square().sum(1).max().item() + 1)
        r1 = math.sqrt(hidden.square().sum(1).max().item() + 1) if mode == "data" else math.sqrt(9 + 1)
    constants = opt.last_step.constants.tolist()
    assert constants[0] == pytest.approx(r0**2 * (h * act.s1**2 * a2**2 + g * act.s2 * a2), rel=1e-6)
    assert constants[1] == pytest.approx(r1**2 * h, rel=1e-9)


# ---------------------------------------------------------------------------- (★)
def constants_at(model, norm, mode, x, y):
    """L_i(w), g_i and f(w) at the model's current weights, read from one DSGD step that is undone."""
    saved = copy.deepcopy(model.state_dict())
    opt = DSGD(model, norm=norm, constants=mode)
    loss = opt.step(make_closure(model, opt, x, y))
    grads = [(layer.weight.grad.clone(), layer.bias.grad.clone()) for layer in opt.layers]
    record = opt.last_step
    opt.remove_hooks()
    model.load_state_dict(saved)
    return opt, record, grads, loss.item()


def descent_gap(model, layer, delta, grad, x, y, f0):
    """f(w+Δ) − f(w) − ⟨g, Δ⟩ for Δ = (ΔW, Δb) on one layer (the layer is restored afterwards)."""
    dw, db = delta
    with torch.no_grad():
        layer.weight.add_(dw)
        layer.bias.add_(db)
        f1 = full_batch_loss(model, x, y).item()
        layer.weight.sub_(dw)
        layer.bias.sub_(db)
    return f1 - f0 - (grad[0] * dw).sum().item() - (grad[1] * db).sum().item()


def directions(opt, grad, rng, inputs):
    """Unit-norm directions on one layer: the DSGD direction, Gaussian ones, and rank-one ones
    aligned with the largest input (where the input bound is attained)."""
    block = augment(*grad)
    out = [-opt.geometry.duality_map(block)]
    for _ in range(4):
        out.append(torch.from_numpy(rng.standard_normal(block.shape)))
    if inputs is not None:
        aug = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], 1)
        v = aug[aug.norm(dim=1).argmax()]
        for _ in range(2):
            u = torch.from_numpy(rng.standard_normal(block.shape[0]))
            out.append(torch.outer(u, v))
    return [d / opt.geometry.norm(d) for d in out if opt.geometry.norm(d) > 0]


def check_descent_inequality(model, norm, mode, x, y, scales, seed):
    opt, record, grads, f0 = constants_at(model, norm, mode, x, y)
    rng = np.random.default_rng(seed)
    inputs = x
    worst = 0.0
    for i, layer in enumerate(opt.layers):
        L = record.constants[i].item()
        for d in directions(opt, grads[i], rng, inputs):
            for scale in scales:
                delta = d * scale
                gap = descent_gap(model, layer, (delta[:, :-1], delta[:, -1]), grads[i], x, y, f0)
                bound = 0.5 * L * opt.geometry.norm(delta).item() ** 2
                assert gap <= bound * (1 + 1e-9) + 1e-12, (norm, mode, i, scale, gap, bound)
                worst = max(worst, gap / bound)
        with torch.no_grad():
            inputs = model[2 * i + 1](layer.module(inputs)) if i + 1 < len(opt.layers) else None
    return worst


SCALES = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_descent_inequality_on_random_mlps(norm, mode, activation):
    model = mlp([8, 16, 12, 5], activation, seed=7, weight_scale=2.0)
    x, y = classification_data(64, 8, 5, seed=7, scale=1.5)
    check_descent_inequality(model, norm, mode, x, y, SCALES, seed=7)


@settings(max_examples=100, deadline=None)
@given(
    widths=st.lists(st.integers(1, 10), min_size=3, max_size=5),
    activation=st.sampled_from(["tanh", "sigmoid"]),
    norm=st.sampled_from(NORMS),
    mode=st.sampled_from(MODES),
    weight_scale=st.floats(0.1, 4.0),
    input_scale=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_descent_inequality_property(widths, activation, norm, mode, weight_scale, input_scale, seed):
    widths[-1] = max(widths[-1], 2)
    model = mlp(widths, activation, seed=seed, weight_scale=weight_scale)
    x, y = classification_data(16, widths[0], widths[-1], seed=seed, scale=input_scale)
    check_descent_inequality(model, norm, mode, x, y, SCALES, seed=seed)


@pytest.mark.parametrize("norm", NORMS)
def test_output_layer_constant_is_attained(norm):
    """The output constant R²H cannot be lowered: one example, two tied classes and a direction
    that splits them along the input give a gap of almost ½ L ‖Δ‖². A wrong H (e.g. ¼ in ℓ2,
    ½ in ℓ∞) fails here even though it would pass (★) on random directions."""
    model = mlp([3, 4, 3], "tanh", seed=0)
    x = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    y = torch.tensor([0])
    with torch.no_grad():
        out = model[2]
        out.weight.zero_()
        out.bias.copy_(torch.tensor([0.0, 0.0, -60.0], dtype=torch.float64))
    opt, record, grads, f0 = constants_at(model, norm, "data", x, y)
    hidden = model[1](model[0](x)).detach()
    v = torch.cat([hidden[0], torch.ones(1, dtype=torch.float64)])
    if norm == "linf":
        v = torch.sign(v)  # ℓ∞: every entry of Δ·[x;1] reaches ‖Δ‖·‖[x;1]‖_∞ … up to |x_j| ≤ 1
        direction = torch.zeros(3, 5, dtype=torch.float64)
        j = hidden[0].abs().argmax()
        direction[0, j], direction[1, j] = torch.sign(hidden[0, j]), -torch.sign(hidden[0, j])
        direction[0, -1], direction[1, -1] = 0.0, 0.0
    else:
        direction = torch.outer(torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64), v)
    direction = direction / opt.geometry.norm(direction)
    scale = 1e-3
    delta = direction * scale
    gap = descent_gap(model, model[2], (delta[:, :-1], delta[:, -1]), grads[1], x, y, f0)
    bound = 0.5 * record.constants[1].item() * scale**2
    ratio = gap / bound
    if norm == "linf":
        # ‖Δ[x;1]‖_∞ = |x_j|, so the attainable ratio is |x_j|²/max(‖x‖_∞,1)² · (H = Var ≤ 1).
        xj = hidden[0].abs().max().item()
        assert ratio == pytest.approx(xj**2, rel=1e-3)
    else:
        assert 0.999 <= ratio <= 1.0 + 1e-9
