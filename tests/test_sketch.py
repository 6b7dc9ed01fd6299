"""The sketched spectral geometry for low-rank gradients (``SpectralGeometry`` docstring).

What must hold, and fails on a wrong basis, a missing ``Qᵀ`` or a score that does not match the
step: for any orthonormal basis the applied direction ``D`` satisfies ``⟨G, D⟩ = s²`` and
``‖D‖₂ = s`` with ``s`` the sketched dual norm (so ``s²/L`` is the guaranteed decrease of the step
taken); ``s ≤ ‖G‖_*`` always, with equality and ``D = ρ(G)`` when the rank bound holds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from torch import nn

from lightning_dsgd import DSGD
from lightning_dsgd.geometry import SpectralGeometry


def polar_reference(g: np.ndarray) -> np.ndarray:
    """``‖G‖_* · U Vᵀ`` on the numerical rank, with numpy (docs/theory.md, "Norms, dual norms and duality maps")."""
    u, s, vh = np.linalg.svd(g, full_matrices=False)
    rank = int((s > s[0] * max(g.shape) * np.finfo(g.dtype).eps).sum())
    return s[:rank].sum() * u[:, :rank] @ vh[:rank]


def low_rank(m: int, n: int, rank: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=dtype) @ torch.randn(rank, n, generator=g, dtype=dtype)


def sketched(block: torch.Tensor, rank_bound: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    geometry = SpectralGeometry()
    weight, bias = block[:, :-1], block[:, -1]
    norms, bases = geometry.dual_norms_and_bases([(weight, bias)], [rank_bound], seed)
    return norms[0], bases[0]


@pytest.mark.parametrize(("m", "n", "rank"), [(80, 65, 12), (65, 80, 12), (120, 121, 40), (64, 200, 1)])
def test_sketch_is_exact_when_the_rank_bound_holds(m, n, rank):
    block = low_rank(m, n, rank)
    norm, basis = sketched(block, rank)
    assert basis is not None and basis.shape == (n, rank + SpectralGeometry.SKETCH_OVERSAMPLING)
    exact = np.linalg.svd(block.numpy(), compute_uv=False).sum()
    assert norm.item() == pytest.approx(exact, rel=1e-10)
    direction = SpectralGeometry().duality_map(block, basis)
    np.testing.assert_allclose(direction.numpy(), polar_reference(block.numpy()), rtol=0, atol=1e-9 * exact)


@pytest.mark.parametrize("seed", range(4))
def test_sketch_certificate_holds_for_the_applied_step_even_with_a_wrong_rank_bound(seed):
    block = low_rank(90, 91, 50, seed=seed)  # rank 50, sketched with 13 columns: an under-estimate
    norm, basis = sketched(block, 5, seed)
    assert basis is not None
    s = norm.item()
    direction = SpectralGeometry().duality_map(block, basis)
    # ⟨G, D⟩ = s² and ‖D‖₂ = s: the decrease bound s²/L holds for this very step ...
    assert (block * direction).sum().item() == pytest.approx(s**2, rel=1e-10)
    assert torch.linalg.matrix_norm(direction, ord=2).item() == pytest.approx(s, rel=1e-10)
    # ... and s is a lower bound of the exact dual norm, strictly here (the sketch missed a part).
    exact = torch.linalg.svdvals(block).sum().item()
    assert s < 0.9 * exact


def test_sketch_only_where_it_pays_and_batched_like_the_exact_path():
    geometry = SpectralGeometry()
    assert geometry.sketch_size((256, 257), 128) == 136
    assert geometry.sketch_size((256, 257), 150) is None  # 158 > 0.6 · 256
    assert geometry.sketch_size((10, 257), 1) is None
    assert geometry.sketch_size((256, 257), None) is None
    # per device type; a device type without its own value uses the CPU's
    geometry.SKETCH_MAX_FRACTION = {"cpu": 0.6, "cuda": 0.9}  # type: ignore[misc]
    assert geometry.sketch_size((256, 257), 200, "cuda") == 208
    assert geometry.sketch_size((256, 257), 200, "cpu") is None
    assert geometry.sketch_size((256, 257), 128, "xpu") == 136
    assert geometry.sketch_size((256, 257), 200, "xpu") is None
    geometry = SpectralGeometry()
    blocks = [low_rank(100, 101, 10, seed=s) for s in range(3)] + [low_rank(10, 101, 3)]
    grads = [(b[:, :-1], b[:, -1]) for b in blocks]
    norms, bases = geometry.dual_norms_and_bases(grads, [10, 10, 10, 3])
    assert [b is not None for b in bases] == [True, True, True, False]
    exact = torch.stack([torch.linalg.svdvals(b).sum() for b in blocks])
    torch.testing.assert_close(norms, exact, rtol=1e-10, atol=0)
    again, _ = geometry.dual_norms_and_bases(grads, [10, 10, 10, 3])  # the same seed draws the same sketch
    assert torch.equal(norms, again)


def test_nonfinite_sketched_block_is_reported_as_nan_and_others_are_kept():
    blocks = [low_rank(100, 101, 5, seed=s) for s in range(2)]
    blocks[1][3, 7] = float("inf")
    norms, _ = SpectralGeometry().dual_norms_and_bases([(b[:, :-1], b[:, -1]) for b in blocks], [5, 5])
    assert torch.isfinite(norms[0]) and torch.isnan(norms[1])


# ---------------------------------------------------------------------------- inside DSGD
def wide_model() -> nn.Sequential:
    return mlp([12, 96, 96, 4], seed=1)  # hidden blocks 96 × 97: a batch of 16 gives k = 24 ≤ 57


def test_rank_bounds_are_the_rows_of_every_forward_since_the_last_step():
    model = wide_model()
    x, y = classification_data(16, 12, 4)
    opt = DSGD(model, norm="spectral")
    seen: list[list[int | None]] = []
    original = opt.geometry.dual_norms_and_bases

    def spy(grads, rank_bounds=None, seed=0, directions=False):
        seen.append(list(rank_bounds))
        return original(grads, rank_bounds, seed, directions)

    opt.geometries["spectral"].dual_norms_and_bases = spy  # type: ignore[method-assign]
    opt.step(make_closure(model, opt, x, y))
    opt.zero_grad()
    for half in (x[:8], x[8:]):  # gradient accumulation: two forwards, one step
        nn.functional.cross_entropy(model(half), y[:8]).backward()
    opt.step()
    assert seen == [[16, 16, 16], [16, 16, 16]]


def test_sketched_dsgd_keeps_the_guarantee_and_matches_exact_scores():
    """Full batch, certified: every step decreases the loss by at least η(1 − η/2)·s, while the
    hidden layers are scored by the sketch; scores equal the exact ones to rounding."""
    model = wide_model()
    x, y = classification_data(16, 12, 4, seed=3)
    opt = DSGD(model, norm="spectral", eta=1.0, constants="data")
    exact_model = copy.deepcopy(model)
    picked = set()
    loss = full_batch_loss(model, x, y).item()
    for _ in range(25):
        # The same gradients scored without rank bounds (the exact SVD path).
        exact_model.load_state_dict(model.state_dict())
        exact_model.zero_grad()
        full_batch_loss(exact_model, x, y).backward()
        grads = [(m.weight.grad, m.bias.grad) for m in exact_model if isinstance(m, nn.Linear)]
        exact = SpectralGeometry().dual_norms(grads)

        opt.step(make_closure(model, opt, x, y))
        rec = opt.last_step
        torch.testing.assert_close(rec.dual_norms, exact, rtol=1e-9, atol=0)
        new = full_batch_loss(model, x, y).item()
        assert loss - new >= rec.guaranteed_decrease.item() * (1 - 1e-9)
        picked.add(rec.layer)
        loss = new
    assert picked & {1, 2}, "the sketched hidden layers must be chosen at least once"


def test_sketched_run_resumes_identically():
    x, y = classification_data(16, 12, 4, seed=4)
    model = wide_model()
    opt = DSGD(model, norm="spectral", constants="adaptive")
    closure = make_closure(model, opt, x, y)
    for _ in range(5):
        opt.step(closure)
    twin = copy.deepcopy(model)
    resumed = DSGD(twin, norm="spectral", constants="adaptive")
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_closure = make_closure(twin, resumed, x, y)
    for _ in range(5):
        opt.step(closure)
        resumed.step(twin_closure)
        assert torch.equal(opt.last_step.scores, resumed.last_step.scores)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rank_bounds_agree_across_ranks_through_the_max_reducer():
    """Every rank must sketch with the same k: the row counts go through the MAX reducer."""
    model = wide_model()
    x, y = classification_data(16, 12, 4)
    opt = DSGD(model, norm="spectral")
    reduced: list[torch.Tensor] = []

    def other_rank_saw_more(t: torch.Tensor) -> torch.Tensor:
        reduced.append(t.clone())
        return torch.maximum(t, torch.full_like(t, 20.0))

    opt.reduce_max = other_rank_saw_more
    opt.zero_grad()
    full_batch_loss(model, x, y).backward()
    batch = opt.constant_model.take_batch()
    assert batch.rank_bounds == [20, 20, 20]
    assert any(t.tolist() == [16.0, 16.0, 16.0] for t in reduced)


@pytest.mark.parametrize("data_bound", [None, 10.0])
def test_architecture_mode_takes_the_rank_bounds_from_the_first_layer(data_bound):
    """A chain passes every row of the batch through every layer: one hook suffices."""
    model = wide_model()
    x, y = classification_data(16, 12, 4)
    opt = DSGD(model, norm="spectral", constants="architecture", data_bound=data_bound)
    opt.zero_grad()
    full_batch_loss(model, x, y).backward()
    assert opt.constant_model.take_batch().rank_bounds == [16, 16, 16]
    opt.step(make_closure(model, opt, x, y))
    assert not opt.last_step.skipped and opt.last_step.certified


@pytest.mark.parametrize("shape", [(24, 37), (37, 24), (30, 30)])
@pytest.mark.parametrize("rank_bound", [None, 4])
def test_directions_handed_from_scoring_equal_the_map_computed_at_the_step(shape, rank_bound):
    """Every layer moves (the adaptive default): one SVD per block gives the dual norm and U Vᵀ;
    the direction must be the one the step would compute, with the same dual norm."""
    g = torch.Generator().manual_seed(3)
    m, n = shape
    weight = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    bias = torch.randn(m, generator=g, dtype=torch.float64)
    geometry = SpectralGeometry()
    bounds = [rank_bound]
    plain, plain_bases = geometry.dual_norms_and_bases([(weight, bias)], bounds, seed=5)
    direct, direct_bases = geometry.dual_norms_and_bases([(weight, bias)], bounds, seed=5, directions=True)
    block = torch.cat([weight, bias[:, None]], dim=1)
    torch.testing.assert_close(direct, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        geometry.duality_map(block, direct_bases[0]), geometry.duality_map(block, plain_bases[0]), rtol=1e-9, atol=1e-12
    )
    step = geometry.duality_map(block, direct_bases[0])
    torch.testing.assert_close((block * step).sum(), direct[0] ** 2, rtol=1e-10, atol=0)  # ⟨G, ρ⟩ = ‖G‖*²
    assert torch.linalg.matrix_norm(step, ord=2) <= direct[0] * (1 + 1e-12)  # ‖ρ‖₂ = ‖G‖*
