"""Norm bounds followed across steps by the triangle inequality (``lightning_dsgd.norm_bounds``).

The contract that matters for the certified constants: the value is never below the true norm of
the weight as stored, however many steps it followed, and it is recomputed exactly after an
outside change or once it has grown past the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from helpers.models import classification_data, make_closure, mlp

from lightning_dsgd import DSGD
from lightning_dsgd.distributed import version_key
from lightning_dsgd.geometry import spectral_norms
from lightning_dsgd.norm_bounds import NormBounds


def spectral(weights: list[torch.Tensor]):
    """Exact values as the package computes them: σ_max with its rounding margin."""
    return lambda indices: spectral_norms([weights[i] for i in indices])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bound_stays_above_the_true_norm_through_many_steps(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 30, generator=g).to(dtype)
    bounds = NormBounds(spectral([w]), tolerance=0.05)
    computed = 0
    for step in range(200):
        before = bounds.exact_computations
        value = bounds.values([0], [version_key(w)])[0]
        computed += bounds.exact_computations - before
        true = torch.linalg.matrix_norm(w.double(), ord=2).item()
        assert value.item() >= true * (1 - 1e-12), step
        assert value.item() <= true * 1.05 + 0.2  # never looser than the tolerance plus the last steps
        delta = 0.01 * torch.randn(40, 30, generator=g).to(dtype)
        key = version_key(w)
        w.add_(delta)
        bounds.advance(0, key, version_key(w), torch.linalg.matrix_norm(delta.double(), ord=2), dtype, 30)
    if dtype == torch.bfloat16:
        # u√r ≈ 0.02 per step: past the 5% tolerance within two steps, recomputed one call later
        assert computed >= 60
    else:
        assert computed < 60


def test_outside_change_and_unknown_start_force_an_exact_value():
    w = torch.eye(3)
    bounds = NormBounds(spectral([w]))
    assert bounds.values([0], [version_key(w)])[0].item() == pytest.approx(1.0, rel=1e-4)
    key = version_key(w)
    w.mul_(5.0)  # not announced: the version moved
    assert bounds.values([0], [version_key(w)])[0].item() == pytest.approx(5.0, rel=1e-4)
    bounds.advance(0, key, version_key(w), torch.tensor(1.0), torch.float32, 3)  # stale `before`: dropped
    assert bounds.values([0], [version_key(w)])[0].item() == pytest.approx(5.0, rel=1e-4)
    assert bounds.exact_computations == 3


def test_dsgd_constants_stay_certified_with_followed_operator_norms():
    """Over a run, every constant is at least the one computed from exact operator norms, and the
    SVDs of some moved layers are saved (more as steps get small against the weights)."""
    model = mlp([6, 40, 40, 40, 3], seed=2, dtype=torch.float32)
    x, y = classification_data(64, 6, 3, dtype=torch.float32)
    opt = DSGD(model, norm="frobenius", constants="data")
    closure = make_closure(model, opt, x, y)
    moved_above_first = 0
    for _ in range(60):
        opt.step(closure)
        moved_above_first += opt.last_step.layer != 0
        layers = opt.constant_model.layers
        followed = opt.constant_model._operator_norms()
        exact = torch.stack([torch.linalg.matrix_norm(layer.weight.detach(), ord=2) for layer in layers[1:]])
        assert (followed[1:] >= exact).all()
    assert moved_above_first > 10
    assert opt.constant_model.operator_norms.exact_computations < 3 + moved_above_first


def test_resumed_run_follows_the_same_bounds():
    """Small steps keep the followed bounds within the tolerance, so an uninterrupted run uses
    them for many steps: a resume must carry them (main recomputed them and drifted apart)."""
    import io

    from torch import nn

    x, y = classification_data(128, 20, 5, seed=8)
    batches = [(x[i], y[i]) for i in torch.randperm(128, generator=torch.Generator().manual_seed(0)).split(32)]

    def train(model, opt, steps, start):
        for t in range(start, start + steps):
            xb, yb = batches[t % len(batches)]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()

    model = mlp([20, 64, 64, 5], seed=8)
    opt = DSGD(model, selection="random", seed=3, eta=0.05)
    train(model, opt, 5, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 9, 5)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = mlp([20, 64, 64, 5], seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = DSGD(resumed_model, selection="random", seed=3, eta=0.05)
    resumed.load_state_dict(saved["opt"])
    train(resumed_model, resumed, 9, 5)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loaded_bound_on_other_weights_is_still_an_upper_bound():
    w = torch.eye(4)
    bounds = NormBounds(spectral([w]))
    bounds.values([0], [version_key(w)])
    state = bounds.state_dict()
    other = torch.eye(4) * 3.0  # not the checkpoint's weight: the saved 1.0 would under-estimate
    restored = NormBounds(spectral([other]))
    restored.load_state_dict(state, torch.device("cpu"))
    assert restored.values([0], [version_key(other)])[0].item() >= 3.0


def test_due_values_provided_by_owners_replace_the_computation():
    """Shared work: ``due`` names the values the next call needs (unknown, changed from outside,
    grown past the tolerance), ``provide`` hands them in, and ``values`` then computes nothing and
    holds exactly what a bounds computing them itself would hold."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(6, 4, generator=g), torch.randn(5, 5, generator=g)]
    calls: list[list[int]] = []

    def compute(indices):
        calls.append(list(indices))
        return spectral_norms([weights[i] for i in indices])

    shared, alone = NormBounds(compute, tolerance=0.05), NormBounds(spectral(weights), tolerance=0.05)
    for step in range(6):
        keys = [version_key(w) for w in weights]
        due = shared.due([0, 1], keys)
        assert shared.due([0, 1], keys) == due  # asking again changes nothing
        if step == 0:
            assert due == [0, 1]
        exact = spectral_norms([weights[i] for i in due]) if due else []
        shared.provide({i: exact[k] for k, i in enumerate(due)})
        got, expected = shared.values([0, 1], keys), alone.values([0, 1], keys)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), step
        assert shared.exact_computations == alone.exact_computations
        for i, w in enumerate(weights):  # a step of 4% of the norm: past 5% within two
            before = version_key(w)
            delta = 0.04 * got[i] * torch.randn(w.shape, generator=g) / w.numel() ** 0.5
            w.add_(delta)
            norm = torch.linalg.matrix_norm(delta, ord=2)
            for bounds in (shared, alone):
                bounds.advance(i, before, version_key(w), norm, w.dtype, min(w.shape))
    assert calls == []  # every exact value came from the owners
    assert shared.exact_computations > 2  # and some were recomputed after growing
