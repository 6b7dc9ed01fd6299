"""The certified matmul path of spectral DSGD (``lightning_dsgd.polar``).

What must hold, and fails on a wrong polynomial bound, a direction of norm above 1, a score above the
exact dual norm or a certificate that accepts too much: ``‖D‖₂ ≤ 1`` (float64 SVD of the stored
``D``), ``c ≤ ⟨G, D⟩`` (exactly rounded sum) and so ``c ≤ ‖G‖_*``, ``c ≥ 0.95 ‖G‖_*`` on
ill-conditioned, rank-deficient, low-rank, tall, wide and bfloat16-stored gradients; full-batch
certified runs on the matmul path with no step below its promise.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from helpers.models import classification_data, full_batch_loss, make_closure, mlp
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_dsgd import DSGD
from lightning_dsgd import polar as P
from lightning_dsgd.geometry import SpectralGeometry


def composed(coefficients: P.Coefficients, x: np.ndarray) -> np.ndarray:
    y = x.copy()
    for a, b, c in coefficients:
        y = a * y + b * y**3 + c * y**5
    return y


def with_spectrum(singular: torch.Tensor, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` in float64 with random orthonormal ``U`` (``m × r``), ``V`` (``n × r``)."""
    g = torch.Generator().manual_seed(seed)
    r = len(singular)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (u * singular.to(torch.float64)) @ v.T


def spectral_norm(t: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(t.to(torch.float64), ord=2).max().item()


# ---------------------------------------------------------------------------------------------- the bound
def test_polynomial_bound_is_the_max_of_the_composed_polynomial_on_the_unit_interval():
    x = np.linspace(0.0, 1.0, 2_000_001)
    sampled = np.abs(composed(P.POLAR_EXPRESS, x)).max()
    bound = P.polynomial_bound(P.POLAR_EXPRESS)
    assert sampled <= bound <= sampled + 1e-9
    assert bound <= 1.002  # the safety factor keeps p near 1
    # tight where the docstring says: p([10⁻³, 1]) ⊂ [0.993 B, B]
    assert composed(P.POLAR_EXPRESS, x[x >= 1e-3]).min() >= 0.993 * bound


@pytest.mark.parametrize(
    ("coefficients", "interval"),
    [(((1.5, -0.5, 0.0),), 1.5), (P.POLAR_EXPRESS[:1], 1.0), (P.POLAR_EXPRESS[:3], 1.0), (((3.0, -16.0, 20.0),), 1.0)],
)
def test_interval_images_include_the_interior_critical_points(coefficients, interval):
    """``q(x) = 1.5x − 0.5x³`` on ``[0, 1.5]``: the ends give 0.5625, the maximum 1 is inside; a
    bound from the ends alone (or a wrong critical point) is caught here."""
    lo, hi = 0.0, interval
    for a, b, c in coefficients:
        lo, hi = P._quintic_range(a, b, c, lo, hi)
    x = np.linspace(0.0, interval, 1_000_001)
    y = composed(coefficients, x)
    assert lo <= y.min() and y.max() <= hi
    assert hi - y.max() <= 1e-9 * max(1.0, abs(hi)) and y.min() - lo <= 1e-9 * max(1.0, abs(lo))


def test_a_bound_too_small_is_caught_by_the_certificate(monkeypatch):
    """Claiming ``max |p| = 0.5`` scales ``D`` up to ``‖D‖₂ ≈ 2``: the Cholesky certificate must
    refuse it and the Gershgorin fallback bring it back to ``‖D‖₂ ≤ 1``."""
    monkeypatch.setattr(P, "polynomial_bound", lambda coefficients=P.POLAR_EXPRESS: 0.5)
    g = torch.randn(2, 40, 60, generator=torch.Generator().manual_seed(0))
    direction, inner, fell_back = P.polar_directions(g)
    assert spectral_norm(direction) <= 1.0 and fell_back.all()
    assert (inner.double() <= torch.linalg.svdvals(g.double()).sum(-1)).all()


# ---------------------------------------------------------------------------------------------- the certificate
@pytest.mark.parametrize("rank", [1, 7, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certificate_accepts_norm_just_below_one_and_refuses_just_above(rank, dtype):
    # float32: the Gram is float32 (chunked), its rounding bound γ_k tr(D Dᵀ) ≈ 10⁻⁴ here.
    # float64: 3·10⁻¹⁴ above 1 is below the certificate's own slack (~10⁻¹²) had it been added.
    below, above = (1e-3, 1e-6) if dtype == torch.float32 else (1e-11, 3e-14)
    for top, expected in ((1.0 - below, True), (1.0 + above, False)):
        s = torch.linspace(top, 0.5, rank, dtype=torch.float64)
        d = with_spectrum(s, 30, 45, seed=rank).to(dtype)
        exact = spectral_norm(d)
        assert (exact <= 1.0) == expected  # the stored matrix, after the cast
        assert bool(P.certify_unit_norm(d[None])[0]) == expected


def test_large_blocks_are_refactorised_in_float64_only_where_float32_did_not_certify(monkeypatch):
    """Smaller side 400 (> 365): a full-rank ``D`` of norm 0.995 is certified by the float32
    factorisation (``tr M`` small); a rank-7 one (``tr M ≈ m``, a float32 rounding bound ≈ 0.02) only
    by the float64 one it then gets; a ``D`` of norm ``1 + 10⁻⁵`` by neither."""
    dtypes = []
    original = P._cholesky_certifies
    monkeypatch.setattr(P, "_cholesky_certifies", lambda *a, **k: dtypes.append((a[4], len(a[0]))) or original(*a, **k))
    full = with_spectrum(torch.linspace(0.995, 0.97, 400, dtype=torch.float64), 400, 420, seed=1)
    low = with_spectrum(torch.linspace(0.995, 0.5, 7, dtype=torch.float64), 400, 420, seed=2)
    above = with_spectrum(torch.linspace(1 + 1e-5, 0.9, 400, dtype=torch.float64), 400, 420, seed=3)
    d = torch.stack([full, low, above]).float()
    assert [spectral_norm(b) <= 1.0 for b in d] == [True, True, False]
    assert P.certify_unit_norm(d, P._gram(d, normalized=True)).tolist() == [True, True, False]
    assert dtypes == [(torch.float32, 3), (torch.float64, 2)]


def test_the_expected_top_screens_float32_factorisations_without_changing_a_verdict(monkeypatch):
    """The first (float32) try skips the blocks whose ``t`` is below ``expected``; the float64 test
    they then get decides, so the verdicts are those without the screen, on blocks that pass, fail,
    and pass only in float64."""
    full = with_spectrum(torch.linspace(0.995, 0.97, 400, dtype=torch.float64), 400, 420, seed=1)
    low = with_spectrum(torch.linspace(0.995, 0.5, 7, dtype=torch.float64), 400, 420, seed=2)
    above = with_spectrum(torch.linspace(1 + 1e-5, 0.9, 400, dtype=torch.float64), 400, 420, seed=3)
    d = torch.stack([full, low, above]).float()
    gram = P._gram(d, normalized=True)
    factorised = []
    original = P._factorises
    monkeypatch.setattr(P, "_factorises", lambda g, t, dt: factorised.append((dt, len(g))) or original(g, t, dt))
    assert P.certify_unit_norm(d, gram).tolist() == [True, True, False]
    assert factorised == [(torch.float32, 3), (torch.float64, 2)]
    factorised.clear()
    # t of the float32 try: ≈ 0.999 for the full-rank block, ≈ 0.98 for the rank-7 one
    assert P.certify_unit_norm(d, gram, expected=0.99).tolist() == [True, True, False]
    assert factorised == [(torch.float32, 2), (torch.float64, 2)]  # the rank-7 block skipped float32
    factorised.clear()
    assert P.certify_unit_norm(d, gram, expected=2.0).tolist() == [True, True, False]
    assert factorised == [(torch.float64, 3)]  # nothing left to try in float32


def test_expected_top_is_where_a_nonzero_blocks_iterate_lands():
    """``expected_top`` (a screen, not a bound) lies below ``B`` and at or below the computed
    ``‖X₆‖₂`` of ill-conditioned, rank-one and Gaussian blocks, within the bfloat16 rounding."""
    bound = P.polynomial_bound()
    for side in (64, 257, 1024):
        assert 0.99 * bound < P.expected_top(P.POLAR_EXPRESS, side) < bound
    g = torch.Generator().manual_seed(0)
    stacks = [
        torch.randn(3, 64, 200, generator=g),
        with_spectrum(torch.logspace(0, -6, 64, dtype=torch.float64), 64, 200, seed=7)[None].float(),
        (torch.randn(64, 1, generator=g) @ torch.randn(1, 200, generator=g))[None],
    ]
    for stack in stacks:
        x = P.polar_iteration(stack, 1 / torch.linalg.vector_norm(stack, dim=(-2, -1)))
        top = torch.linalg.matrix_norm(x.double(), ord=2)
        assert (top >= 0.995 * P.expected_top(P.POLAR_EXPRESS, 64)).all(), top


@pytest.mark.parametrize(("m", "n", "first", "strict"), [(257, 1025, 2, 4), (500, 4096, 13, None)])
def test_a_first_try_gram_that_does_not_certify_is_redone_within_the_strict_tolerance(monkeypatch, m, n, first, strict):
    """Blocks whose Gram reaches ``FIRST_TRY_GRAM_TOLERANCE`` with fewer chunks than ``GRAM_TOLERANCE``
    (``None``: a float64 product). With ``λ_max`` between the two tests' ``t``, the first try fails
    and the redone Gram certifies the block; a block far below passes the first try; one above
    ``bound`` fails both; the merged Gram (float64 where a float64 one was merged in) has an error
    bound that covers every block's exact error."""
    assert P._gram_chunks(m, n, P.MAX_BF16_GRAM_CHUNKS, P.FIRST_TRY_GRAM_TOLERANCE) == first
    assert P._gram_chunks(m, n, P.MAX_BF16_GRAM_CHUNKS) == strict
    bound = 1.0

    def block(top: float, seed: int) -> torch.Tensor:
        return with_spectrum(torch.linspace(top, 0.97, m, dtype=torch.float64), m, n, seed=seed).bfloat16()

    def verdict(x: torch.Tensor, tolerance: float) -> bool:
        return bool(P.certify_unit_norm(x[None], P._gram(x[None], normalized=True, tolerance=tolerance), bound)[0])

    between = next(
        x
        for top in torch.linspace(0.995, 0.985, 21).tolist()
        for x in [block(top, 11)]
        if not verdict(x, P.FIRST_TRY_GRAM_TOLERANCE) and verdict(x, P.GRAM_TOLERANCE)
    )
    low, above = block(0.9, 12), block(1.001, 13)
    grams = []
    original = P._gram
    monkeypatch.setattr(P, "_gram", lambda x, *a, **k: grams.append(len(x)) or original(x, *a, **k))
    monkeypatch.setattr(P, "certified_bound", lambda coefficients: bound)
    (s, trace, error), ok = P.certify_iteration(torch.stack([low, between, above]))
    assert ok.tolist() == [True, True, False]
    assert grams == [3, 2]  # the whole stack at the first try, then the two blocks it failed
    assert s.dtype == (torch.float32 if strict else torch.float64) and trace.shape == error.shape == (3,)
    exact = torch.stack([low, between, above]).double()
    assert ((s - exact @ exact.mT).abs().amax((-2, -1)) <= error).all()


@pytest.mark.parametrize("side", [128, 256])
def test_a_side_multiple_of_128_is_padded_and_keeps_the_verdict(monkeypatch, side):
    """On the CPU the Gram gets a zero row and column (a side LAPACK factorises 2–3× faster): the
    factorised matrix has side ``m + 1``, and norms just below / just above 1 keep their verdict; a
    ``D`` whose ``t`` cannot exceed its largest Gram diagonal (norm 1.5) fails without a factorisation."""
    sides = []
    original = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda a, **k: sides.append(a.shape[-1]) or original(a, **k))
    s_below = torch.linspace(1 - 1e-3, 0.5, side, dtype=torch.float64)
    s_above = torch.linspace(1 + 1e-5, 0.5, side, dtype=torch.float64)
    d = torch.stack([with_spectrum(s_below, side, side + 40, seed=4), with_spectrum(s_above, side, side + 40, seed=5)])
    assert P.certify_unit_norm(d).tolist() == [True, False]
    assert set(sides) == {side + 1}
    sides.clear()
    far = with_spectrum(torch.linspace(1.5, 0.5, side, dtype=torch.float64), side, side + 40, seed=6)
    assert P.certify_unit_norm(far[None]).tolist() == [False]
    assert sides == []


@pytest.mark.parametrize("shape", [(1, 50), (30, 30), (17, 300)])
def test_gershgorin_scale_is_an_upper_bound_even_where_it_is_tight(shape):
    m, n = shape
    flat = torch.full((1, m, n), 1.0 / math.sqrt(m * n))  # rank one, ‖D‖₂ = 1: Gershgorin is exact
    g = torch.Generator().manual_seed(1)
    rand = torch.randn(3, m, n, generator=g)
    for d in (flat, rand, rand * 1e-30, rand * 1e30):
        scaled = d / P.gershgorin_scale(d).to(d.dtype)[:, None, None]
        assert spectral_norm(scaled) <= 1.0
    assert P.gershgorin_scale(flat).item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("shape", [(3, 30, 45), (2, 256, 257), (2, 64, 1025), (1, 600, 1200)])
def test_gram_error_bound_covers_the_exact_error(shape):
    """``e ≥ ‖Ŝ − D Dᵀ‖₂`` for the float32 chunked Gram (and the float64 one where no chunking is
    tight enough, 600 × 1200), on bfloat16 directions, on entries of mixed sign and magnitude
    (cancellation) and on unnormalized 10³⁰-scaled stacks."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(*shape, generator=g)
    mixed = base * torch.logspace(0, -20, shape[-1]) + 1.0  # large common part: cancellation in D Dᵀ - S
    for d, normalized in ((base.to(torch.bfloat16) / shape[-1] ** 0.5, True), (mixed, False), (base * 1e30, False)):
        gram, trace, error = P._gram(d, normalized)
        exact = d.double() @ d.double().mT  # float32 × float32 products are exact in float64
        assert (torch.linalg.matrix_norm(gram.double() - exact, ord=2) <= error).all()
        assert (trace + error >= exact.diagonal(dim1=-2, dim2=-1).sum(-1)).all()  # ‖D‖²_F, as polar_directions uses it
    chunks = P._gram_chunks(shape[-2], shape[-1])
    u = torch.finfo(torch.float32).eps / 2
    if chunks is not None:
        assert (-(-shape[-1] // chunks) + chunks) * u * shape[-2] <= P.GRAM_TOLERANCE
    else:
        assert all((-(-shape[-1] // c) + c) * u * shape[-2] > P.GRAM_TOLERANCE for c in range(1, P.MAX_GRAM_CHUNKS + 1))


def _bf16_attack(case: str) -> torch.Tensor:
    """bfloat16 stacks built to break the model of ``_bf16_products`` if it does not hold."""
    g = torch.Generator().manual_seed(11)
    if case == "biased products":  # (1 + 2⁻⁷)² = 1 + 2⁻⁶ + 2⁻¹⁴: every product rounded to bfloat16 drops 2⁻¹⁴
        x = torch.full((2, 16, 257), 1 + 2.0**-7)
        return (x * torch.where(torch.rand(2, 16, 257, generator=g) < 0.5, 1.0, 1 + 2.0**-6)).to(torch.bfloat16)
    if case == "long sums":  # 2¹⁴ positive terms per entry
        return torch.rand(2, 8, 16384, generator=g).to(torch.bfloat16)
    if case == "cancellation":  # alternating signs: S_ij ≈ 0 while (|X||X|ᵀ)_ij ≈ n
        signs = torch.tensor([1.0, -1.0]).repeat(1024)
        return (signs * (1 + torch.rand(2, 32, 2048, generator=g) * 2.0**-5)).to(torch.bfloat16)
    if case == "subnormal":  # bfloat16 subnormals next to normal entries: products far below 2⁻¹⁴⁹
        x = torch.randn(2, 24, 300, generator=g) * 2.0**-130
        x[:, :, ::7] = torch.randn(2, 24, 43, generator=g)
        return x.to(torch.bfloat16)
    # mixed exponents, 2⁻⁶⁰ to 1, mixed signs
    return (torch.randn(2, 40, 513, generator=g) * 2.0 ** -torch.randint(0, 60, (2, 40, 513), generator=g)).to(
        torch.bfloat16
    )


@pytest.mark.parametrize("case", ["biased products", "long sums", "cancellation", "subnormal", "mixed exponents"])
def test_bf16_products_have_exact_products_and_float32_sums(case):
    """The model behind the fast certificate Gram: under ``_bf16_products``, a float32 product of
    bfloat16 values errs entrywise by at most ``γ_n (|X||X|ᵀ)_ij + 2n·2⁻¹²⁶`` (exact products, float32
    sums in any order, flushes of subnormals) against float64 — which is exact here up to ``n u₆₄``.
    Rounding the products (``biased products``: ~1000 u₃₂ per entry) or the result (2⁻⁹) to bfloat16,
    or a lower-precision accumulation, breaks it. The user's flag is put back."""
    x = _bf16_attack(case)
    n = x.shape[-1]
    xf = x.float()
    before = torch.backends.mkldnn.matmul.fp32_precision
    with P._bf16_products(True):
        gram = xf @ xf.mT
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    exact = x.double() @ x.double().mT
    absolute = x.double().abs() @ x.double().abs().mT
    u32 = torch.finfo(torch.float32).eps / 2
    allowed = P._gamma(n, u32) * absolute * (1 + 1e-9) + 2 * n * 2.0**-126 + P._gamma(n) * absolute
    assert ((gram.double() - exact).abs() <= allowed).all()
    # and the whole certificate Gram (chunked, bf16 products) stays within its spectral bound
    s, trace, error = P._gram(x, normalized=False)
    assert (torch.linalg.matrix_norm(s.double() - exact, ord=2) <= error).all()
    assert (trace + error >= exact.diagonal(dim1=-2, dim2=-1).sum(-1)).all()


def test_the_certificate_gram_of_a_bf16_stack_uses_bf16_products_on_the_cpu(monkeypatch):
    seen = []
    original = P._bf16_products
    monkeypatch.setattr(P, "_bf16_products", lambda enabled: seen.append(enabled) or original(enabled))
    x = torch.randn(2, 64, 65).to(torch.bfloat16)
    P._gram(x, normalized=False)
    P._gram(x.float(), normalized=False)  # float32 inputs would be rounded: IEEE products
    assert seen == [True, False]


def test_every_layer_mode_mixes_matmul_and_exact_blocks():
    """Every layer moving, ``"auto"`` on the CPU: a 256 × 257 block takes the matmul path and a
    32 × 33 block the exact SVD in the same call; both hand a certified direction with a score
    between 0.95 and 1 of the exact nuclear norm."""
    g = torch.Generator().manual_seed(8)
    blocks = [torch.randn(256, 257, generator=g), torch.randn(32, 33, generator=g)]
    geometry = SpectralGeometry()
    assert geometry.uses_polar((256, 257), torch.device("cpu"), True)
    assert not geometry.uses_polar((32, 33), torch.device("cpu"), True)
    norms, bases = geometry.dual_norms_and_bases([(b[:, :-1], b[:, -1]) for b in blocks], directions=True)
    for k, block in enumerate(blocks):
        exact = torch.linalg.svdvals(block.double()).sum().item()
        assert isinstance(bases[k], P.PolarDirection)
        assert 0.95 * exact <= norms[k].item() <= exact
        # proved ≤ 1 on the matmul path; U Vᵀ of a float32 SVD is 1 up to rounding (DSGD's step
        # bound inflates it by rounding_margin)
        assert spectral_norm(bases[k].direction) <= (1.0 if k == 0 else 1.0 + 1e-5)


def test_frobenius_norms_bound_from_above_and_survive_overflow_underflow_and_nan():
    """float32 row norms with their rounding bound: ``N ≥ ‖G‖_F`` within ``γ_{n+1}``; a block whose rows
    overflow float32 (10²⁵ entries), or so small that squares underflow (10⁻³⁰), is redone in
    float64; inf/NaN blocks stay non-finite, a zero block is 0."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(6, 70, 90, generator=g) * torch.logspace(0, -5, 90)
    stack = torch.stack([base[0], base[1] * 1e25, base[2] * 1e-30, base[3], torch.zeros(70, 90), base[5]])
    stack[3, 5, 7], stack[5, 0, 0] = math.inf, math.nan
    norm = P._frobenius_norms(stack)
    exact = torch.linalg.vector_norm(stack.double(), dim=(-2, -1))
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(norm), finite) and norm[4] == 0
    assert (norm[finite] >= exact[finite]).all() and (norm[finite] <= exact[finite] * (1 + 100 * 2.0**-24)).all()


def test_certified_inner_product_is_below_the_exactly_rounded_one():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 64, 65, generator=g) * torch.logspace(0, -6, 65)
    b = torch.randn(3, 64, 65, generator=g)
    for x, y in ((a, b), (a.double(), b.double()), (a * 1e30, b), (a * 1e-30, b)):
        c = P.certified_inner(x, y)
        u = torch.finfo(x.dtype).eps / 2
        for k in range(3):
            exact = math.fsum(float(p) for p in (x[k].double() * y[k].double()).flatten().tolist())
            assert c[k].item() <= max(exact, 0.0)
            # no looser than the documented bound 2 (γ_n + γ_m) ‖G‖_F ‖D‖_F (with room for its own rounding)
            gamma = 66 * u + 64 * torch.finfo(torch.float64).eps / 2
            allowed = 2.2 * gamma * x[k].double().norm() * y[k].double().norm()
            assert exact - c[k].item() <= allowed.item()


# ---------------------------------------------------------------------------------------------- tightness
def families() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ce = torch.randn(10, 97, generator=g, dtype=torch.float64)
    ce -= ce.mean(0)  # a cross-entropy output gradient: rows sum to zero, rank 9
    return {
        "gaussian square": torch.randn(128, 129, generator=g, dtype=torch.float64),
        "ill-conditioned": with_spectrum(torch.logspace(0, -6, 100), 120, 101),
        "tail of tiny values": with_spectrum(torch.cat([torch.ones(1), torch.full((199,), 1e-4)]), 200, 257),
        "rank-deficient": with_spectrum(torch.rand(20, generator=g) + 0.1, 150, 97),
        "low rank": with_spectrum(torch.ones(1), 64, 300),
        "tall": torch.randn(400, 65, generator=g, dtype=torch.float64),
        "wide": torch.randn(33, 500, generator=g, dtype=torch.float64),
        "tall, both sides padded": torch.randn(1000, 300, generator=g, dtype=torch.float64),  # to 1008 × 304
        "cross-entropy": ce,
        "bfloat16-stored": torch.randn(96, 129, generator=g).to(torch.bfloat16).double(),
        "large entries": torch.randn(40, 41, generator=g, dtype=torch.float64) * 1e25,
        "tiny entries": torch.randn(40, 41, generator=g, dtype=torch.float64) * 1e-30,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(families()))
def test_direction_is_certified_and_the_score_is_tight(name, dtype):
    block = families()[name].to(dtype)
    direction, inner, fell_back = P.polar_directions(block[None])
    assert not fell_back.any()
    exact = torch.linalg.svdvals(block.double()).sum().item()  # of the block as stored
    c = inner[0].item()
    assert spectral_norm(direction) <= 1.0
    dot = math.fsum((block.double() * direction[0].double()).flatten().tolist())
    assert c <= dot and c <= exact
    assert c >= 0.95 * exact, f"{name}: c / ‖G‖_* = {c / exact:.4f}"


def test_zero_gradient_scores_zero_with_a_zero_direction():
    direction, inner, _ = P.polar_directions(torch.zeros(2, 8, 9))
    assert inner.tolist() == [0.0, 0.0] and direction.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------- the geometry hook
def test_geometry_hands_the_certified_direction_from_score_to_step():
    g = torch.Generator().manual_seed(4)
    blocks = [torch.randn(40, 31, generator=g, dtype=torch.float64) for _ in range(2)]
    blocks.append(torch.full((40, 31), float("nan"), dtype=torch.float64))
    grads = [(b[:, :-1], b[:, -1]) for b in blocks] + [None]
    geometry = SpectralGeometry(polar="always")
    norms, bases = geometry.dual_norms_and_bases(grads)
    exact = SpectralGeometry(polar="never").dual_norms(grads[:2])
    assert torch.isnan(norms[2]) and norms[3] == 0 and bases[3] is None
    assert int(geometry.polar_fallbacks) == 0
    for k in range(2):
        basis = bases[k]
        assert isinstance(basis, P.PolarDirection) and basis.inner == norms[k]
        assert 0.95 * exact[k] <= norms[k] <= exact[k]
        step = geometry.duality_map(blocks[k], basis)
        assert spectral_norm(step) <= norms[k].item()  # ‖ρ‖₂ ≤ c: the step-norm bound DSGD records
        assert (blocks[k] * step).sum().item() >= norms[k].item() ** 2 * (1 - 1e-12)


def test_sketch_takes_precedence_and_auto_follows_the_measured_crossover():
    geometry = SpectralGeometry()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # one layer moving: svdvals of every block; the matmul path wins from 512 on this CPU
    assert not geometry.uses_polar((256, 257), cpu) and geometry.uses_polar((512, 513), cpu)
    assert geometry.uses_polar((2048, 2049), cpu)
    # every layer moving needs an svd per block: the matmul path wins from 128 on this CPU
    assert geometry.uses_polar((256, 257), cpu, every_layer=True) and not geometry.uses_polar((64, 65), cpu, True)
    assert geometry.uses_polar((256, 257), cuda) and not geometry.uses_polar((16, 17), cuda)
    assert SpectralGeometry(polar="always").uses_polar((4, 5), cpu)
    assert not SpectralGeometry(polar="never").uses_polar((4096, 4097), cuda)
    assert "cuda" in P.UNMEASURED and "cpu" not in P.UNMEASURED
    block = torch.randn(96, 97, dtype=torch.float64) @ torch.diag(torch.rand(97, dtype=torch.float64))
    _, bases = SpectralGeometry(polar="always").dual_norms_and_bases([(block[:, :-1], block[:, -1])], [8])
    assert isinstance(bases[0], torch.Tensor)  # a sketch basis: the rank bound makes the sketch cheaper


# ---------------------------------------------------------------------------------------------- certified runs
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_full_batch_certified_run_on_the_matmul_path_never_misses_its_promise(dtype, tolerance):
    model = mlp([12, 64, 64, 4], seed=2, dtype=dtype)
    x, y = classification_data(80, 12, 4, seed=5, scale=5.0, dtype=dtype)  # 80 rows: no sketch
    opt = DSGD(model, norm="spectral", constants="data", eta=1.0, full_batch=True)
    opt.geometries["spectral"].polar = "always"
    assert opt.certified
    loss = full_batch_loss(model, x, y).item()
    misses, picked = 0, set()
    for _ in range(40):
        opt.step(make_closure(model, opt, x, y))
        rec = opt.last_step
        assert rec.certified and not rec.skipped
        new = full_batch_loss(model, x, y).item()
        misses += loss - new < rec.guaranteed_decrease.item() * (1 - tolerance) - tolerance * abs(loss) * 1e-3
        picked.add(rec.layer)
        loss = new
        grads = [(m.weight.grad, m.bias.grad) for m in model if isinstance(m, torch.nn.Linear)]
        exact = SpectralGeometry(polar="never").dual_norms(grads)
        assert (rec.dual_norms <= exact).all() and (rec.dual_norms >= 0.95 * exact).all()
    assert misses == 0 and int(opt.geometries["spectral"].polar_fallbacks) == 0
    assert picked & {1}, "the hidden layer must be moved along a certified polar direction"


def test_autocast_and_reduced_float32_matmul_precision_do_not_weaken_the_certificate():
    g = torch.randn(2, 64, 80, generator=torch.Generator().manual_seed(6))
    exact = torch.linalg.svdvals(g.double()).sum(-1)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # float32 products may run in bfloat16 (oneDNN)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            direction, inner, fell_back = P.polar_directions(g)
        assert torch.get_float32_matmul_precision() == "medium"  # the user's setting is put back
    finally:
        torch.set_float32_matmul_precision(previous)
    assert direction.dtype == torch.float32 and inner.dtype == torch.float32 and not fell_back.any()
    assert spectral_norm(direction) <= 1.0
    assert (inner.double() <= exact).all() and (inner.double() >= 0.95 * exact).all()


def test_matmul_path_keeps_every_tensor_on_the_device_and_one_host_sync_per_step(monkeypatch):
    """Parameters on the ``meta`` device stand for a GPU (tests/helpers/devices.py): the matmul
    path makes nothing on the CPU and reads nothing back (its fallback is chosen on the device)."""
    from helpers.devices import host_reads_per_step
    from test_gpu_readiness import _draw_on_device, _mlp_case

    _draw_on_device(monkeypatch)
    model, settings, loss_fn = _mlp_case(256)()
    opt = DSGD(model, **settings)
    opt.geometries["spectral"].polar = "always"
    per_step, host = host_reads_per_step(opt, loss_fn, 5)
    assert per_step[3:] == [1, 1], (per_step, dict(host.syncs), dict(host.uploads))
    assert opt.geometries["spectral"].polar_fallbacks.device.type == "meta"  # the matmul path ran


def test_matmul_path_run_resumes_identically():
    """The iteration is deterministic: a resumed run scores and steps bit for bit alike."""
    model = mlp([12, 64, 64, 4], seed=2, dtype=torch.float32)
    x, y = classification_data(80, 12, 4, seed=5, scale=5.0, dtype=torch.float32)
    opt = DSGD(model, norm="spectral", constants="adaptive")
    opt.geometries["spectral"].polar = "always"
    closure = make_closure(model, opt, x, y)
    for _ in range(4):
        opt.step(closure)
    twin = copy.deepcopy(model)
    resumed = DSGD(twin, norm="spectral", constants="adaptive")
    resumed.geometries["spectral"].polar = "always"
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin_closure = make_closure(twin, resumed, x, y)
    for _ in range(4):
        opt.step(closure)
        resumed.step(twin_closure)
        assert torch.equal(opt.last_step.scores, resumed.last_step.scores)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    rank=st.integers(1, 40),
    decades=st.floats(0.0, 12.0),
    scale=st.floats(-30.0, 30.0),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_certified_and_never_above_the_exact_dual_norm(m, n, rank, decades, scale, bf16, seed):
    """Any shape, spectrum (up to 12 decades, rank-deficient), scale and storage: ‖D‖₂ ≤ 1 and
    c ≤ ⟨G, D⟩ ≤ ‖G‖_*; tight (≥ 0.95) whenever no singular value lies below 10⁻³ ‖G‖_F."""
    rank = min(rank, m, n)
    g = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, -decades, rank, dtype=torch.float64)[torch.randperm(rank, generator=g)]
    block = (with_spectrum(spectrum, m, n, seed) * 10.0**scale).float()
    if bf16:
        block = block.to(torch.bfloat16).float()
    direction, inner, _ = P.polar_directions(block[None])
    singular = torch.linalg.svdvals(block.double())
    exact = singular.sum().item()
    c = inner[0].item()
    assert spectral_norm(direction) <= 1.0
    assert c <= math.fsum((block.double() * direction[0].double()).flatten().tolist()) and c <= exact
    if exact > 0 and singular[singular > 0].min() >= 1e-3 * torch.linalg.vector_norm(singular):
        assert c >= 0.95 * exact
