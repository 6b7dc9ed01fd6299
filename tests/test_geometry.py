"""Duality identities of the per-layer geometries (docs/theory.md, "Norms, dual norms and duality maps").

For every norm the tests pin down, against references computed here with numpy and never with
the package:

* the primal norm ``geometry.norm`` (Frobenius, largest singular value, max row ℓ1 sum);
* the dual norm ``geometry.dual_norms`` (Frobenius, sum of singular values, sum of row maxima),
  and that it is the dual of ``geometry.norm``: Hölder ``⟨G, U⟩ ≤ ‖G‖_* ‖U‖`` holds for many
  ``U`` and is attained by ``U = ρ(G)/‖ρ(G)‖`` and by an independently built maximiser;
* the duality map: ``⟨G, ρ(G)⟩ = ‖G‖²_*`` and ``‖ρ(G)‖ = ‖G‖_*``;
* batching, dtypes and non-finite blocks of ``dual_norms``;
* ``operator_norms`` as certified upper bounds within a relative 1e-3 of the exact value.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import lightning_dsgd.geometry as geometry_module
from lightning_dsgd.geometry import Geometry, augment, make_geometry, spectral_norms

NORMS = ["frobenius", "spectral", "linf"]
Matrix = np.ndarray
Block = tuple[torch.Tensor, torch.Tensor | None]

RTOL = 1e-9  # float64 identities
HOLDER_SLACK = 1e-9


# ------------------------------------------------------------------ independent numpy references
def ref_norm(name: str, m: Matrix) -> float:
    """The primal layer norm ‖M‖_(i)."""
    if name == "frobenius":
        return float(np.sqrt(np.sum(m * m)))
    if name == "spectral":
        return float(np.linalg.svd(m, compute_uv=False).max())
    return float(np.abs(m).sum(axis=1).max())


def ref_dual(name: str, m: Matrix) -> float:
    """The dual norm ‖M‖_(i)*: Frobenius, nuclear, Σ_rows max_j |M_rj|."""
    if name == "frobenius":
        return float(np.sqrt(np.sum(m * m)))
    if name == "spectral":
        return float(np.linalg.svd(m, compute_uv=False).sum())
    return float(np.abs(m).max(axis=1).sum())


def ref_operator(name: str, w: Matrix) -> float:
    """The operator norm a(W) of docs/theory.md, "Norms, dual norms and duality maps":
    spectral for Frobenius and spectral."""
    if name in ("frobenius", "spectral"):
        return float(np.linalg.svd(w, compute_uv=False).max())
    return max(math.fsum(np.abs(row)) for row in w)  # correctly rounded row sums


def ref_maximiser(name: str, m: Matrix) -> Matrix:
    """A U with ‖U‖ = 1 and ⟨M, U⟩ = ‖M‖_*, built from the definitions (M ≠ 0)."""
    if name == "frobenius":
        return m / np.sqrt(np.sum(m * m))
    if name == "spectral":
        u, _, vh = np.linalg.svd(m, full_matrices=False)
        return u @ vh
    out = np.zeros_like(m)
    col = np.abs(m).argmax(axis=1)
    signs = np.sign(m[np.arange(m.shape[0]), col])
    out[np.arange(m.shape[0]), col] = np.where(signs == 0, 1.0, signs)
    return out


def ref_duality_map(name: str, m: Matrix) -> Matrix:
    """ρ(M) as tabulated in docs/theory.md, "Norms, dual norms and duality maps";
    unique for full-rank M without ties or zero rows."""
    if name == "frobenius":
        return m.copy()
    return ref_dual(name, m) * ref_maximiser(name, m)


# ------------------------------------------------------------------ helpers
def t(a: Matrix, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(np.asarray(a, dtype=np.float64)).to(dtype)  # a copy, never a view of ``a``


def inner(a: torch.Tensor | Matrix, b: torch.Tensor | Matrix) -> float:
    a_ = a.double().numpy() if isinstance(a, torch.Tensor) else a
    b_ = b.double().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.sum(a_ * b_))


def split(m: Matrix, bias: bool, dtype: torch.dtype = torch.float64) -> Block:
    """``(W, b)`` with ``augment(W, b) == m``: the last column is the bias when ``bias``."""
    if bias:
        return t(m[:, :-1], dtype), t(m[:, -1], dtype)
    return t(m, dtype), None


def close(got: float, want: float, scale: float, rtol: float = RTOL) -> None:
    """``got ≈ want`` relative to ``want`` and, for values near zero, to ``scale``."""
    assert math.isclose(got, want, rel_tol=rtol, abs_tol=rtol * scale), (got, want)


def dual_of(geometry: Geometry, block: Block) -> float:
    out = geometry.dual_norms([block])
    assert out.shape == (1,)
    return float(out[0])


def rng_matrix(rng: np.random.Generator, shape: tuple[int, int], scale: float = 1.0) -> Matrix:
    return rng.standard_normal(shape) * scale


def named_matrices() -> dict[str, Matrix]:
    rng = np.random.default_rng(1234)
    ties = np.array(
        [
            [3.0, -3.0, 1.0, 0.5],  # +/- tie
            [2.0, 2.0, 2.0, 2.0],  # all equal
            [-1.0, 0.0, -1.0, 1.0],  # three-way tie with signs
            [0.0, 0.0, 0.0, 0.0],  # zero row
            [0.25, -5.0, 5.0, -5.0],
        ]
    )
    low_rank = rng_matrix(rng, (7, 2)) @ rng_matrix(rng, (2, 6))
    return {
        "tall": rng_matrix(rng, (9, 3)),
        "wide": rng_matrix(rng, (3, 9)),
        "square": rng_matrix(rng, (6, 6)),
        "row_1xn": rng_matrix(rng, (1, 7)),
        "col_nx1": rng_matrix(rng, (7, 1)),
        "scalar_1x1": np.array([[-2.5]]),
        "rank_deficient": low_rank,
        "rank_one": np.outer(rng_matrix(rng, (5, 1)), rng_matrix(rng, (1, 4))),
        "linf_ties": ties,
        "linf_ties_scaled": ties * 1e-3,
        "zero": np.zeros((4, 5)),
        "tiny": rng_matrix(rng, (5, 4), 1e-3),
        "huge": rng_matrix(rng, (4, 5), 1e3),
        "integer_grid": rng.integers(-2, 3, size=(6, 5)).astype(np.float64),
        "large": rng_matrix(rng, (64, 24)),
    }


NAMED = named_matrices()


def check_identities(name: str, m: Matrix, bias: bool) -> None:
    """Every §1 identity for one block, against the numpy references."""
    geometry = make_geometry(name)
    block = split(m, bias)
    g = augment(*block)
    assert torch.equal(g, t(m))  # the bias is the last column of the block

    want = ref_dual(name, m)
    scale = float(np.abs(m).max(initial=0.0)) * max(m.shape)

    dual = geometry.dual_norms([block])
    assert dual.shape == (1,) and dual.dtype == torch.float64
    d = float(dual[0])
    close(d, want, scale)
    close(float(geometry.norm(g)), ref_norm(name, m), scale)

    rho = geometry.duality_map(g)
    assert rho.shape == g.shape and rho.dtype == torch.float64
    close(inner(g, rho), d * d, scale * scale)  # ⟨G, ρ(G)⟩ = ‖G‖²_*
    rho_norm = float(geometry.norm(rho))
    close(rho_norm, d, scale)  # ‖ρ(G)‖ = ‖G‖_*
    close(rho_norm, ref_norm(name, rho.numpy()), scale)

    if want == 0.0:
        assert d == 0.0 and not rho.any()
        return
    # Hölder is attained by ρ(G)/‖ρ(G)‖ and by the independent maximiser: ‖·‖_* is not too large...
    close(inner(g, rho) / rho_norm, d, scale)
    u = ref_maximiser(name, m)
    close(ref_norm(name, u), 1.0, 1.0)
    close(float(geometry.norm(t(u))), 1.0, 1.0)
    close(inner(m, u), d, scale)
    # ... and holds for every U tried: ‖·‖_* is not too small.
    check_holder(geometry, g, d, np.random.default_rng(zlib.crc32(m.tobytes())), u)


def check_holder(geometry: Geometry, g: torch.Tensor, d: float, rng: np.random.Generator, u_star: Matrix) -> None:
    """⟨G, U⟩ ≤ ‖G‖_* ‖U‖ for random U, random sign patterns, rank-one U and perturbed maximisers."""
    shape = tuple(g.shape)
    us = [rng.standard_normal(shape) for _ in range(8)]
    us += [np.sign(rng.standard_normal(shape)) for _ in range(4)]
    us += [np.outer(rng.standard_normal(shape[0]), rng.standard_normal(shape[1])) for _ in range(4)]
    us += [u_star + eps * rng.standard_normal(shape) for eps in (1e-1, 1e-3, 1e-6)]
    us += [np.sign(g.numpy()), g.numpy()]
    for u in us:
        lhs = inner(g, u)
        rhs = d * float(geometry.norm(t(u)))
        assert lhs <= rhs * (1 + HOLDER_SLACK) + 1e-300, (lhs, rhs)


# ------------------------------------------------------------------ identities on named shapes
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("case", sorted(NAMED))
@pytest.mark.parametrize("name", NORMS)
def test_duality_identities_on_named_shapes(name: str, case: str, bias: bool) -> None:
    m = NAMED[case]
    if bias and m.shape[1] < 2:
        pytest.skip("a bias needs at least one weight column")
    check_identities(name, m, bias)


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("case", ["tall", "wide", "square", "row_1xn", "col_nx1", "huge", "tiny"])
def test_duality_map_matches_the_tabulated_formula(name: str, case: str) -> None:
    """On full-rank matrices without ties ρ is unique; it must be the one of
    docs/theory.md, "Norms, dual norms and duality maps"."""
    m = NAMED[case]
    got = make_geometry(name).duality_map(t(m)).numpy()
    np.testing.assert_allclose(got, ref_duality_map(name, m), rtol=1e-9, atol=1e-12 * np.abs(got).max())


def test_duality_map_on_ties_puts_one_entry_per_row() -> None:
    m = NAMED["linf_ties"]
    rho = make_geometry("linf").duality_map(t(m)).numpy()
    dual = ref_dual("linf", m)
    assert ((rho != 0).sum(axis=1) == np.array([1, 1, 1, 0, 1])).all()
    nz = rho != 0
    np.testing.assert_array_equal(np.abs(rho[nz]), dual)
    np.testing.assert_array_equal(np.sign(rho[nz]), np.sign(m[nz]))  # sign of G at the argmax
    assert (np.abs(m[nz]) == np.abs(m).max(axis=1)[nz.any(axis=1)]).all()  # at an argmax of |G_r·|


def test_the_references_themselves() -> None:
    """The numpy references agree with textbook values, so the comparisons above mean something."""
    m = np.array([[3.0, 0.0], [0.0, -4.0]])
    assert ref_norm("frobenius", m) == ref_dual("frobenius", m) == 5.0
    assert ref_norm("spectral", m) == 4.0 and ref_dual("spectral", m) == 7.0
    assert ref_norm("linf", m) == 4.0 and ref_dual("linf", m) == 7.0
    ones = np.ones((2, 3))
    assert math.isclose(ref_norm("spectral", ones), math.sqrt(6)) and math.isclose(ref_dual("spectral", ones), 6**0.5)
    assert ref_norm("linf", ones) == 3.0 and ref_dual("linf", ones) == 2.0


# ------------------------------------------------------------------ property-based identities
@st.composite
def matrices(draw: st.DrawFn, min_cols: int = 1, shape: tuple[int, ...] | None = None) -> Matrix:
    """Random shapes up to 7×7 (or ``shape``); entries on a 2⁻¹² grid (zeros and exact ties are
    frequent), then scaled by 10^e for e in [-3, 3]."""
    if shape is None:
        shape = (draw(st.integers(1, 7)), draw(st.integers(min_cols, 7)))
    grid = draw(arrays(np.int64, shape, elements=st.integers(-(2**12), 2**12)))
    exponent = draw(st.floats(-3.0, 3.0))
    return grid.astype(np.float64) / 2**12 * 10.0**exponent


@pytest.mark.parametrize("name", NORMS)
@settings(max_examples=60, deadline=None)
@given(m=matrices(min_cols=2), bias=st.booleans())
def test_duality_identities_property(name: str, m: Matrix, bias: bool) -> None:
    check_identities(name, m, bias)


@pytest.mark.parametrize("name", NORMS)
@settings(max_examples=40, deadline=None)
@given(data=st.data(), m=matrices())
def test_holder_property(name: str, data: st.DataObject, m: Matrix) -> None:
    """⟨G, U⟩ ≤ ‖G‖_* ‖U‖ for arbitrary hypothesis-drawn U of the same shape (ties, zeros, signs)."""
    geometry = make_geometry(name)
    u = data.draw(matrices(shape=m.shape))
    d = dual_of(geometry, (t(m), None))
    lhs, rhs = inner(m, u), d * float(geometry.norm(t(u)))
    assert lhs <= rhs * (1 + HOLDER_SLACK) + 1e-300, (lhs, rhs)


# ------------------------------------------------------------------ batching and dtypes
BATCH_SPECS: list[tuple[tuple[int, int], bool] | None] = [
    ((4, 3), True),  # augmented 4×4
    None,
    ((4, 4), False),  # 4×4, same shape as the first: batched SVD
    ((2, 6), False),
    ((4, 3), True),
    None,
    ((1, 5), True),
    ((5, 1), False),
    ((4, 4), False),
    ((2, 6), False),
]


def batch(seed: int, zero_at: int | None = None) -> list[Matrix | None]:
    rng = np.random.default_rng(seed)
    out: list[Matrix | None] = []
    for k, spec in enumerate(BATCH_SPECS):
        if spec is None:
            out.append(None)
            continue
        (rows, cols), bias = spec
        m = rng_matrix(rng, (rows, cols + bias), 10.0 ** rng.uniform(-3, 3))
        out.append(np.zeros_like(m) if k == zero_at else m)
    return out


def blocks_of(ms: list[Matrix | None], dtype: torch.dtype = torch.float64) -> list[Block | None]:
    out: list[Block | None] = []
    for m, spec in zip(ms, BATCH_SPECS, strict=True):
        out.append(None if m is None or spec is None else split(m, spec[1], dtype))
    return out


def expected(name: str, blocks: list[Block | None]) -> np.ndarray:
    """References from the values actually held in ``blocks`` (after any rounding to low precision)."""
    return np.array([0.0 if b is None else ref_dual(name, augment(*b).double().numpy()) for b in blocks])


@pytest.mark.parametrize("zero_at", [None, 2])
@pytest.mark.parametrize("name", NORMS)
def test_batched_dual_norms_equal_per_block_values(name: str, zero_at: int | None) -> None:
    geometry = make_geometry(name)
    ms = batch(7, zero_at)
    blocks = blocks_of(ms)
    got = geometry.dual_norms(blocks)
    assert got.shape == (len(blocks),) and got.dtype == torch.float64
    singles = [0.0 if b is None else dual_of(geometry, b) for b in blocks]
    np.testing.assert_allclose(got.numpy(), singles, rtol=1e-12, atol=0.0)
    np.testing.assert_allclose(got.numpy(), expected(name, blocks), rtol=1e-9, atol=0.0)
    for k, b in enumerate(blocks):
        if b is None:
            assert got[k].item() == 0.0


@pytest.mark.parametrize("name", NORMS)
def test_all_none_gives_zeros(name: str) -> None:
    got = make_geometry(name).dual_norms([None, None, None])
    assert got.shape == (3,) and not got.any()


@pytest.mark.parametrize("name", NORMS)
def test_float32_is_reduced_in_float32(name: str) -> None:
    geometry = make_geometry(name)
    ms = batch(11)
    blocks = blocks_of(ms, torch.float32)
    got = geometry.dual_norms(blocks)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), expected(name, blocks), rtol=2e-5, atol=0.0)
    g = augment(*blocks[0])  # type: ignore[misc]
    rho = geometry.duality_map(g)
    assert rho.dtype == torch.float32 and geometry.norm(g).dtype == torch.float32
    d = float(got[0])
    assert math.isclose(inner(g, rho), d * d, rel_tol=1e-4)
    assert math.isclose(float(geometry.norm(rho)), d, rel_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("name", NORMS)
def test_low_precision_returns_float32(name: str, dtype: torch.dtype) -> None:
    geometry = make_geometry(name)
    rng = np.random.default_rng(3)
    ms = [None if s is None else rng_matrix(rng, (s[0][0], s[0][1] + s[1])) for s in BATCH_SPECS]
    blocks = blocks_of(ms, dtype)
    got = geometry.dual_norms(blocks)
    assert got.dtype == torch.float32
    # reduced in float32 from the rounded inputs: far tighter than a half-precision reduction
    np.testing.assert_allclose(got.double().numpy(), expected(name, blocks), rtol=2e-5, atol=0.0)
    g = augment(*blocks[0])  # type: ignore[misc]
    rho = geometry.duality_map(g)
    assert rho.dtype == torch.float32 and geometry.norm(g).dtype == torch.float32
    d = float(got[0])
    assert math.isclose(inner(g, rho), d * d, rel_tol=1e-4)
    assert math.isclose(float(geometry.norm(rho)), d, rel_tol=1e-4)
    weights = [b[0] for b in blocks if b is not None]
    ops = geometry.operator_norms(weights)
    assert ops.dtype == torch.float32
    exact = [ref_operator(name, w.double().numpy()) for w in weights]
    assert (ops.double().numpy() >= np.array(exact)).all()


# ------------------------------------------------------------------ non-finite blocks
@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NORMS)
def test_non_finite_block_poisons_only_itself(name: str, bad: float, where: str) -> None:
    geometry = make_geometry(name)
    ms = batch(5)
    blocks = blocks_of(ms)
    poisoned = 4  # ((4, 3), bias): its 4×4 block shares a batched SVD with blocks 0, 2 and 8
    weight, bias = blocks[poisoned]  # type: ignore[misc]
    assert bias is not None
    weight, bias = weight.clone(), bias.clone()
    (weight if where == "weight" else bias)[1] = bad
    blocks[poisoned] = (weight, bias)

    got = geometry.dual_norms(blocks).numpy()  # must not raise

    assert not np.isfinite(got[poisoned])
    want = expected(name, blocks_of(ms))
    others = np.arange(len(blocks)) != poisoned
    assert np.isfinite(got[others]).all()
    np.testing.assert_allclose(got[others], want[others], rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", NORMS)
def test_non_finite_weight_gives_non_finite_operator_norm(name: str, bad: float) -> None:
    """A finite 'bound' for a non-finite weight would be a lie; the others are unaffected."""
    rng = np.random.default_rng(9)
    ws = [rng_matrix(rng, (4, 3)) for _ in range(3)] + [rng_matrix(rng, (2, 5))]
    poisoned = [t(w) for w in ws]
    poisoned[1][2, 0] = bad
    got = make_geometry(name).operator_norms(poisoned).numpy()
    assert not np.isfinite(got[1])
    keep = [0, 2, 3]
    assert np.isfinite(got[keep]).all()
    np.testing.assert_allclose(got[keep], [ref_operator(name, ws[k]) for k in keep], rtol=1e-9)


# ------------------------------------------------------------------ operator norms
def check_upper_bound(name: str, weights: list[torch.Tensor], got: torch.Tensor, exact_rtol: float) -> None:
    """``exact ≤ got ≤ exact·(1 + 1e-3)``; ``exact`` is computed in float64 from the held values.

    For float64 spectral inputs the numpy SVD is itself rounded, so ``exact`` is taken with a
    relative slack ``exact_rtol`` of a few ulps; every other reference is exact enough to be strict.
    """
    assert got.shape == (len(weights),)
    for k, w in enumerate(weights):
        exact = ref_operator(name, w.double().numpy())
        value = float(got[k])
        assert value >= exact * (1 - exact_rtol), (k, value, exact)
        assert value <= exact * (1 + 1e-3), (k, value, exact)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", NORMS)
@settings(max_examples=40, deadline=None)
@given(ms=st.lists(matrices(), min_size=1, max_size=4), repeat=st.booleans())
def test_operator_norms_are_tight_upper_bounds(name: str, dtype: torch.dtype, ms: list[Matrix], repeat: bool) -> None:
    if repeat:  # same shapes share one batched SVD
        ms = ms + [m[::-1].copy() * 0.5 for m in ms]
    weights = [t(m, dtype) for m in ms]
    got = make_geometry(name).operator_norms(weights)
    assert got.dtype == dtype
    slack = 8 * torch.finfo(torch.float64).eps if (dtype == torch.float64 and name != "linf") else 0.0
    check_upper_bound(name, weights, got, slack)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", sorted(NAMED))
@pytest.mark.parametrize("name", NORMS)
def test_operator_norms_on_named_shapes(name: str, case: str, dtype: torch.dtype) -> None:
    weights = [t(NAMED[case], dtype)]
    slack = 8 * torch.finfo(torch.float64).eps if (dtype == torch.float64 and name != "linf") else 0.0
    check_upper_bound(name, weights, make_geometry(name).operator_norms(weights), slack)


def test_spectral_norms_is_the_largest_singular_value() -> None:
    rng = np.random.default_rng(21)
    ws = [rng_matrix(rng, s) for s in [(3, 5), (3, 5), (6, 2), (1, 1), (3, 5), (1, 8)]]
    got = spectral_norms([t(w) for w in ws])
    check_upper_bound("spectral", [t(w) for w in ws], got, 8 * torch.finfo(torch.float64).eps)


@pytest.mark.parametrize("name", NORMS)
def test_operator_norm_is_the_right_one(name: str) -> None:
    """Textbook matrices on which the Frobenius, spectral and max-row-ℓ1 norms differ, so the wrong
    one (e.g. the Frobenius norm as the Frobenius geometry's operator norm) fails."""
    cases: list[tuple[Matrix, float, float, float]] = [
        # (W, spectral, max row ℓ1, Frobenius)
        (np.eye(8), 1.0, 1.0, math.sqrt(8.0)),
        (np.ones((2, 3)), math.sqrt(6.0), 3.0, math.sqrt(6.0)),
        (np.array([[3.0, 0.0], [0.0, -4.0]]), 4.0, 4.0, 5.0),
        (np.array([[1.0, 1.0], [1.0, -1.0]]), math.sqrt(2.0), 2.0, 2.0),
        (np.array([[1.0, 2.0, -2.0]]), 3.0, 5.0, 3.0),
    ]
    got = make_geometry(name).operator_norms([t(c[0]) for c in cases]).numpy()
    want = [c[2] if name == "linf" else c[1] for c in cases]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    frobenius = [c[3] for c in cases]
    assert abs(got[0] - frobenius[0]) > 1.0  # 1 vs √8 for every geometry


# ------------------------------------------------------------------ construction
@pytest.mark.parametrize(("name", "activation"), [("frobenius", "l2"), ("spectral", "l2"), ("linf", "linf")], ids=NORMS)
def test_make_geometry(name: str, activation: str) -> None:
    geometry = make_geometry(name)
    assert isinstance(geometry, Geometry)
    assert geometry.name == name and geometry.activation_norm == activation


@pytest.mark.parametrize("bad", ["bogus", "Spectral", "", "l2"])
def test_unknown_norm_raises_naming_the_valid_ones(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        make_geometry(bad)
    message = str(info.value)
    assert repr(bad) in message
    for name in NORMS:
        assert f"'{name}'" in message


@pytest.mark.parametrize("max_batch", [1, 2, 16])  # the CPU's 1, and the batches a GPU takes
@pytest.mark.parametrize("name", ["spectral", "frobenius", "linf", "rows"])
def test_batched_norms_equal_per_block_values_and_the_true_norm(
    name: str, max_batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``norms`` (same-shape spectral blocks in batched SVDs of at most ``MAX_BATCH`` blocks, wide
    ones transposed) is each block's ``norm`` bit for bit, and the spectral one is σ_max itself;
    inf/NaN blocks give NaN."""
    monkeypatch.setitem(geometry_module.MAX_BATCH, "cpu", max_batch)
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 9), (7, 4), (5, 9), (7, 4), (5, 9), (3, 3)]
    blocks = [torch.randn(*s, generator=g) * (k + 1) for k, s in enumerate(shapes)]
    blocks.append(torch.randn(5, 9, generator=g, dtype=torch.float64))  # same shape, another dtype
    blocks.append(torch.randn(7, 4, generator=g).to(torch.bfloat16))  # reduced in float32
    blocks[2][1, 1] = float("nan")
    geometry = make_geometry(name)
    batched = geometry.norms(blocks)
    assert batched.shape == (len(blocks),)
    for k, block in enumerate(blocks):
        single = geometry.norm(block)
        assert torch.equal(batched[k], single.to(batched.dtype)) or (batched[k].isnan() and single.isnan()), k
    if name == "spectral":
        for k, block in enumerate(blocks):
            if k == 2:
                assert batched[k].isnan()
                continue
            true = torch.linalg.svdvals(block.double())[0]
            torch.testing.assert_close(batched[k].double(), true, rtol=1e-5, atol=0)


# ------------------------------------------------------------------ the step and its slope ⟨G, Δ⟩
def _paths() -> dict[str, tuple[Geometry, dict]]:
    """Every way a block's step is made: a duality map at the step (one layer moves), the exact
    path's ``U Vᵀ``, the sketch's ``U (QV)ᵀ`` and the matmul path's ``D`` handed over while scoring."""
    return {
        "frobenius": (make_geometry("frobenius"), {}),
        "linf": (make_geometry("linf"), {}),
        "rows": (make_geometry("rows"), {}),
        "spectral one layer": (geometry_module.SpectralGeometry(polar="never"), {}),
        "spectral exact directions": (geometry_module.SpectralGeometry(polar="never"), {"directions": True}),
        "spectral sketch directions": (
            geometry_module.SpectralGeometry(polar="never"),
            {"directions": True, "rank_bounds": [3, 3]},
        ),
        "spectral matmul": (geometry_module.SpectralGeometry(polar="always"), {"directions": True}),
    }


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("path", sorted(_paths()))
def test_the_slope_of_the_step_is_the_inner_product_actually_taken(path: str, bias: bool) -> None:
    """``scaled_step`` gives ``Δ = −s ρ`` and ``⟨G, Δ⟩`` from the scores, without a second pass over
    ``G`` (the adaptive curvature's ``⟨g, Δ⟩``): it must equal ``Σ G ∘ Δ`` summed here, for every
    path (a ``c²`` where the matmul path has ``c ⟨G, D⟩``, or a missing sign, fails by far more)."""
    geometry, options = _paths()[path]
    rng = np.random.default_rng(7)
    # Rank 3 (the sketch needs a rank bound), with a large spread of singular values.
    ms = [rng_matrix(rng, (40, 3)) @ rng_matrix(rng, (3, 70)) + 1e-3 * rng_matrix(rng, (40, 70)) for _ in range(2)]
    if path == "spectral sketch directions":
        ms = [rng_matrix(rng, (40, 3)) @ rng_matrix(rng, (3, 70)) for _ in range(2)]
    blocks = [split(m, bias) for m in ms]
    dual_norms, bases = geometry.dual_norms_and_bases(
        blocks, options.get("rank_bounds"), 0, options.get("directions", False)
    )
    for k, block in enumerate(blocks):
        scale = torch.tensor(0.37, dtype=torch.float64)
        step, slope = geometry.scaled_step(block, bases[k], dual_norms[k], scale)
        taken = (augment(*block) * step).sum()
        assert slope.item() < 0
        torch.testing.assert_close(slope, taken, rtol=1e-10, atol=0.0)
        if bases[k] is None or isinstance(bases[k], torch.Tensor):  # ρ made at the step: Δ = −s ρ(G)
            torch.testing.assert_close(
                step, -scale * geometry.duality_map(augment(*block), bases[k]), rtol=1e-14, atol=0
            )


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_block_inner_is_the_inner_product_with_the_augmented_block(bias: bool) -> None:
    rng = np.random.default_rng(3)
    weight, b = split(rng_matrix(rng, (5, 8)), bias)
    other = t(rng_matrix(rng, (5, 8)))
    got = geometry_module.block_inner((weight, b), other)
    assert got.dtype == other.dtype
    torch.testing.assert_close(got, (augment(weight, b) * other).sum(), rtol=1e-14, atol=0.0)
    # A float32 block: the product is taken in the block's dtype.
    assert geometry_module.block_inner((weight, b), other.float()).dtype == torch.float32


def test_the_matmul_path_slope_uses_the_computed_inner_product_not_the_certified_score() -> None:
    """float32: ``c`` is below ``⟨G, D⟩`` by its rounding bound (~10⁻⁴ relative here), so a slope
    ``−s c²`` would be off by that much; ``−s c ⟨G, D⟩`` matches the float64 sum to float32 rounding."""
    geometry = geometry_module.SpectralGeometry(polar="always")
    rng = np.random.default_rng(11)
    blocks = [split(rng_matrix(rng, (64, 200)), True, torch.float32) for _ in range(3)]
    dual_norms, bases = geometry.dual_norms_and_bases(blocks, None, 0, True)
    scale = torch.tensor(0.5)
    for k, block in enumerate(blocks):
        step, slope = geometry.scaled_step(block, bases[k], dual_norms[k], scale)
        taken = (augment(*block).double() * step.double()).sum()
        torch.testing.assert_close(slope.double(), taken, rtol=2e-6, atol=0.0)
        assert abs(-scale * dual_norms[k] ** 2 - taken) > 1e-5 * abs(taken)  # what c² would have given


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_block_inner_is_the_same_sum_for_a_block_and_its_parts(dtype: torch.dtype) -> None:
    """A step held as ``[ΔW, Δb]`` (shared work, a loaded checkpoint) or as contiguous parts gives
    the same bits: a resumed run measures the curvature exactly as the uninterrupted one."""
    rng = np.random.default_rng(5)
    grad = split(rng_matrix(rng, (33, 65)), True, dtype)
    block = t(rng_matrix(rng, (33, 65)), dtype)
    parts = (block[:, :-1].contiguous(), block[:, -1].contiguous())
    assert torch.equal(geometry_module.block_inner(grad, block), geometry_module.block_inner(grad, parts))
    scaled = geometry_module.scale_block(block, torch.tensor(-0.5, dtype=dtype), bias=True, split=True)
    assert isinstance(scaled, tuple) and all(p.is_contiguous() for p in scaled if p is not None)
    assert torch.equal(augment(*scaled), block * -0.5)  # type: ignore[arg-type]
