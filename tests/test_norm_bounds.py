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
        assert computed >= 100  # u√r ≈ 0.02 per step: past the 5% tolerance within two steps
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
