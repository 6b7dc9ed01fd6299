"""The matmul-only spectral path: a certified Polar-Express direction.

The maths: docs/theory.md, "The matmul path: a certified Polar-Express direction".

For a block ``G`` (``m × n``; written here for ``m ≤ n``, a tall block uses ``A = XᵀX`` and
right products) the odd polynomial iteration

    ``X₀ = G / N`` (``N ≥ ‖G‖_F``),    ``X_{k+1} = a_k X_k + (b_k A_k + c_k A_k²) X_k``,  ``A_k = X_k X_kᵀ``

applies the composed odd polynomial ``p = q_K ∘ … ∘ q_1`` (``q_k(x) = a_k x + b_k x³ + c_k x⁵``) to
every singular value: ``X_K = U p(Σ/‖G‖_F) Vᵀ ≈ U Vᵀ`` (six Polar Express quintics, Amsel et al.
2025: ``p([10⁻³, 1]) ⊂ [0.993 B, B]``), all in bfloat16: the polynomial only has to be roughly
followed, since what is applied is certified afterwards.

**Certificate.** The result is scaled to ``D = X_K / (B (1 + μ))`` with ``B`` the proved maximum
of ``|p|`` on ``[0, 1]`` ([polynomial_bound][lightning_dsgd.polar.polynomial_bound], exact interval
images stage by stage) and ``μ`` a margin for the bfloat16 rounding; then ``‖D‖₂ ≤ 1`` is *proved
for the stored D*, whatever the rounding of the iteration: a Cholesky factorisation of
``t I − Ŝ`` (``Ŝ`` the Gram of ``X_K``, float32 over column chunks with a proved rounding bound, or
float64) that runs to completion shows ``λ_max(X_K X_Kᵀ) ≤ (B (1 + μ))²``
([certify_unit_norm][lightning_dsgd.polar.certify_unit_norm], ``t`` covers the rounding of the
Gram and of the factorisation). Where it fails (rounding beyond ``μ``), ``X_K`` is divided by a
Gershgorin bound instead — looser, still certified. The score is ``c = ⟨G, D⟩`` (row dot products
summed in float64) minus its rounding bound, so ``c ≤ ⟨G, D⟩`` exactly, and the step ``ρ = c · D``
has

    ``f(W − (η/L) ρ) ≤ f(W) − (η/L) c ⟨G, D⟩ + (η²/2L) c² ‖D‖₂² ≤ f(W) − η(1 − η/2) c²/L``,

the guaranteed decrease of the direction actually applied; ``c ≤ ‖G‖_*`` since ``‖D‖₂ ≤ 1``. The
same proof is made on every step, certified or not (every layer moving with estimated constants).

**Floating-point model.** IEEE float32/float64 arithmetic for everything but the iteration (which
needs none), subnormals possibly flushed to zero (at most ``2⁻¹²⁶`` per flush, in the bounds), and
Gram products with exact products and float32 sums in any order. On the CPU the Gram of the
bfloat16 ``X_K`` runs in oneDNN's bfloat16 math mode (``_bf16_products``): its inputs are bfloat16
values, so rounding them to bfloat16 is exact, and their products are accumulated in float32 — the
model, 3–6× faster than IEEE float32 products; tests/test_polar.py attacks it against float64.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dsgd.precision import full_precision

Coefficients = tuple[tuple[float, float, float], ...]

_PE_RAW: Coefficients = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
)
#: Safety factor of the Polar Express paper: ``q(x/1.01)`` tolerates singular values 1% above the
#: interval each stage was designed for. Without it a bfloat16 run diverges on some blocks (seen on
#: 1024 × 256: ``‖X₇‖₂ = 1.56`` where ``p ≤ 1``; the certificate then falls back).
SAFETY = 1.01
POLAR_EXPRESS: Coefficients = tuple((a / SAFETY, b / SAFETY**3, c / SAFETY**5) for a, b, c in _PE_RAW)
"""The first six Polar Express quintics for ``ℓ = 10⁻³`` (Amsel, Persson, Musco, Gower 2025, Alg. 1)
with their safety factor: ``p([10⁻³, 1]) ⊂ [0.993 B, B]``, ``B = max_{[0,1]} |p| ≈ 1.0012``. Six
stages, not the paper's eight: the score only has to be within a few percent of ``‖G‖_*`` (the
seventh and eighth stages took ``0.993`` to ``1 − 10⁻⁹`` for a third more matrix products)."""
#: Margin ``μ`` for the bfloat16 rounding of the iteration: the certificate checks
#: ``‖X_K‖₂ ≤ B (1 + μ)`` (seen: at most ``1.003 B`` on the GPT-shaped model's gradients and the
#: test families); a block beyond it is scaled by its Gershgorin bound instead (looser, certified).
#: ``(1 + μ)² − 1.003² ≈ 0.025`` leaves room for the float32 Gram and Cholesky rounding bounds
#: (``2 (ε + γ_{m+1} m) ≤ 0.024`` with ``GRAM_TOLERANCE``), at a cost of 1.6% of tightness.
ROUNDING_MARGIN = 1.0 / 64
#: Largest relative rounding bound ``ε`` (of ``tr D Dᵀ``) allowed for a float32 Gram; shapes where no
#: chunking reaches it use a float64 product (``_gram_chunks``).
GRAM_TOLERANCE = 4e-3
#: Looser ``ε`` for a first try with bfloat16 products on the CPU, where it needs fewer chunks than
#: ``GRAM_TOLERANCE`` or no float64 product (long sides of about 4096 next to a side of 1024):
#: ``2ε ≤ 0.02`` still fits the room ``ROUNDING_MARGIN`` leaves when the iterate is within
#: ``1.003 B``; the blocks whose Cholesky test fails with that Gram are redone with the
#: ``GRAM_TOLERANCE`` one (``certify_iteration``). Each test uses the bound of the Gram it was
#: given, so either way what passes is proved.
FIRST_TRY_GRAM_TOLERANCE = 1e-2
#: Most column chunks of a float32 Gram: beyond, thin products and ``C`` additions of ``m × m``
#: partials cost more than one float64 product (measured on 1024 × 1025 blocks, 27 chunks).
MAX_GRAM_CHUNKS = 8
#: The same with bfloat16 products (``_bf16_products``, 3–6× faster than IEEE float32 ones): 32 chunks
#: of 4 × 512 × 2049 blocks took 26 ms, one float64 product 44 ms (2-core AMX Xeon, 1 thread).
MAX_BF16_GRAM_CHUNKS = 32

#: Alignment of the sides of the bfloat16 iteration (``_padded``): AMX tiles are 16 rows of 32 bytes.
ALIGN = 16

_U64 = torch.finfo(torch.float64).eps / 2


@dataclass(frozen=True)
class PolarDirection:
    """A block's direction computed while scoring: ``D`` with ``‖D‖₂ ≤ 1`` and ``c ≤ ⟨G, D⟩`` (the
    recorded dual norm, 0-dim); ``ρ = c · D``. The matmul path proves ``‖D‖₂ ≤ 1``; the exact path
    hands ``U Vᵀ`` of its SVD (``c = ‖G_r‖_*``) when every layer moves."""

    direction: Tensor
    inner: Tensor
    #: ``⟨G, D⟩`` as computed while scoring (the matmul path's, before its rounding bound is
    #: subtracted); ``None``: ``inner`` itself (``⟨G, U Vᵀ⟩ = ‖G_r‖_*``).
    dot: Tensor | None = None


def _quintic_range(a: float, b: float, c: float, lo: float, hi: float) -> tuple[float, float]:
    """The exact image ``q([lo, hi])`` of ``q(x) = a x + b x³ + c x⁵`` (values at the ends and at the
    critical points inside: roots of ``q'(x) = a + 3b x² + 5c x⁴``), widened outward by ``10⁻¹²``
    relative, which covers the float64 evaluation."""
    points = [lo, hi]
    if c != 0.0:
        disc = 9 * b * b - 20 * a * c
        if disc >= 0:
            for y in ((-3 * b + math.sqrt(disc)) / (10 * c), (-3 * b - math.sqrt(disc)) / (10 * c)):
                if y > 0 and lo < math.sqrt(y) < hi:
                    points.append(math.sqrt(y))
    elif b != 0.0 and -a / (3 * b) > 0 and lo < math.sqrt(-a / (3 * b)) < hi:
        points.append(math.sqrt(-a / (3 * b)))
    values = [a * x + b * x**3 + c * x**5 for x in points]
    widen = 1e-12 * max(abs(v) for v in values) + 1e-300
    return min(values) - widen, max(values) + widen


@functools.lru_cache(maxsize=8)
def polynomial_bound(coefficients: Coefficients = POLAR_EXPRESS) -> float:
    """A proved upper bound on ``max_{x∈[0,1]} |p(x)|`` for the composed polynomial: the image of an
    interval under a continuous map is an interval, so propagating exact images stage by stage is
    exact (up to the outward widening)."""
    lo, hi = 0.0, 1.0
    for a, b, c in coefficients:
        lo, hi = _quintic_range(a, b, c, lo, hi)
    return max(abs(lo), abs(hi))


@functools.lru_cache(maxsize=32)
def expected_top(coefficients: Coefficients, side: int) -> float:
    """``min p([s, 1])``, ``s = 0.99/√side``: where ``‖X_K‖₂`` of a nonzero block lands in exact
    arithmetic (``X₀ = G/N`` has ``σ_max ≥ ‖G‖_F/(N √side)``), about ``0.993 B``; a screen for the
    certificate's cost (``certify_unit_norm``'s ``expected``), not a bound."""
    lo, hi = 0.99 / math.sqrt(side), 1.0
    for a, b, c in coefficients:
        lo, hi = _quintic_range(a, b, c, lo, hi)
    return lo


def certified_bound(coefficients: Coefficients = POLAR_EXPRESS) -> float:
    """``b (1 + ROUNDING_MARGIN)`` with ``b = polynomial_bound(coefficients)``: the bound on ``‖X‖₂``
    that ``polar_directions`` asks ``certify_unit_norm`` to prove before dividing ``X`` by it."""
    return polynomial_bound(coefficients) * (1 + ROUNDING_MARGIN)


def _gamma(n: int, u: float = _U64) -> float:
    """``γ_n = n u / (1 − n u)``: the relative rounding bound of an ``n``-term dot product."""
    return n * u / (1 - n * u)


def _power_of_two_scale(t: Tensor) -> tuple[Tensor, Tensor]:
    """Per matrix of a stack: ``2^{-e}`` (in ``t``'s dtype) and ``e`` with ``max |t| · 2^{-e} ∈ [½, 1)``
    (``e = 0`` for a zero or non-finite matrix): scaling by it is exact (up to underflow)."""
    peak = t.abs().amax(dim=(-2, -1), keepdim=True)  # NaN propagates (and is 12× faster than ord=inf)
    peak = torch.where(torch.isfinite(peak) & (peak > 0), peak, 1.0)
    _, exponent = torch.frexp(peak)
    return torch.ldexp(torch.ones_like(peak), -exponent), exponent


def _small_gram(x: Tensor, wide: bool) -> Tensor:
    """``X Xᵀ`` (``wide``) or ``Xᵀ X``: the Gram on the block's smaller side (no transposed copy: the
    products read ``X`` in place)."""
    return x @ x.mT if wide else x.mT @ x


def _gram_chunks(m: int, n: int, most: int = MAX_GRAM_CHUNKS, tolerance: float = GRAM_TOLERANCE) -> int | None:
    """Fewest column chunks ``C ≤ most`` for which the float32 Gram of an ``m × n`` block errs by at
    most ``tolerance · tr`` (``(γ_k + γ_C) m ≤ ε``, ``k = ⌈n/C⌉``); ``None``: none."""
    u32 = torch.finfo(torch.float32).eps / 2
    for chunks in range(1, most + 1):
        if (-(-n // chunks) + chunks) * u32 * m <= tolerance:
            return chunks
    return None


@contextlib.contextmanager
def _bf16_products(enabled: bool) -> Iterator[None]:
    """Inside: float32 CPU matrix products in oneDNN's bfloat16 math mode (AMX/AVX-512-BF16), which
    rounds the float32 inputs to bfloat16 and accumulates their products in float32. On inputs that
    are bfloat16 values it computes what an IEEE float32 product does — products exact, sums rounded
    in float32 — 3–6× faster; the rounding bound ``γ_k`` of ``_gram`` holds for any order of the
    sums, and tests/test_polar.py attacks it against float64. Without bfloat16 support oneDNN runs
    IEEE float32 products (the same bound). The user's setting is put back."""
    if not enabled:
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = saved


def _gram(
    direction: Tensor, normalized: bool = False, tolerance: float = GRAM_TOLERANCE
) -> tuple[Tensor, Tensor, Tensor]:
    """``Ŝ ≈ D Dᵀ`` (float32 or float64, as computed), ``tr Ŝ`` and ``e ≥ ‖Ŝ − D Dᵀ‖₂`` (float64),
    where ``|Ŝ − D Dᵀ| ≤ γ |D||D|ᵀ`` plus ``n`` underflows per entry, and ``‖|D||D|ᵀ‖₂ ≤
    tr(|D||D|ᵀ) = ‖D‖²_F ≤ tr Ŝ / (1 − γ)`` (the diagonal sums non-negative terms). float64 stacks,
    and float32 shapes of ``_gram_chunks(m, n) = None``: one float64 product, ``γ = γ_n``. Otherwise
    float32 products over ``C`` column chunks of at most ``k`` columns, added in float32:
    ``γ = γ_k + γ_C (1 + γ_k)`` (float32 ``u``) — less than half the cost of a float64 product on a
    CPU; a bfloat16 stack on the CPU uses bfloat16 products with float32 sums (``_bf16_products``,
    exact products: the same ``γ``) and up to ``MAX_BF16_GRAM_CHUNKS`` chunks. Flushes of subnormal
    inputs, products or partial sums to zero (DAZ/FTZ) err by at most ``2⁻¹²⁶`` each: ``2mn`` of them
    per Gram, in ``e``. A stack that is not ``normalized`` (``max |D| ≤ 1``) is first scaled by a power of two
    (exact), so that nothing overflows. ``tolerance``: the ``ε`` the chunking must reach (``_gram_chunks``)."""
    rows, cols = direction.shape[-2:]
    m, n = min(rows, cols), max(rows, cols)  # Ŝ is m × m: D Dᵀ or Dᵀ D, the same largest eigenvalue
    bf16 = direction.dtype == torch.bfloat16 and direction.device.type == "cpu"
    most = MAX_BF16_GRAM_CHUNKS if bf16 else MAX_GRAM_CHUNKS
    chunks = None if direction.dtype == torch.float64 else _gram_chunks(m, n, most, tolerance)
    d = direction.to(torch.float64 if chunks is None else torch.float32)
    u = torch.finfo(d.dtype).eps / 2
    unscale = None
    if not normalized:
        scale, exponent = _power_of_two_scale(d)
        d, unscale = d * scale, torch.ldexp(torch.ones_like(scale, dtype=torch.float64), 2 * exponent)
    wide = rows <= cols
    parts = torch.tensor_split(d, chunks or 1, dim=-1 if wide else -2)  # chunks of the long side
    with _bf16_products(bf16 and chunks is not None):
        gram = _small_gram(parts[0], wide)
        partial = torch.empty_like(gram) if len(parts) > 1 else gram
        for part in parts[1:]:  # each partial product rounded on its own, then added: γ_k + γ_C, not γ_n
            gram.add_(torch.matmul(part, part.mT, out=partial) if wide else torch.matmul(part.mT, part, out=partial))
    k = parts[0].shape[-1 if wide else -2]
    gamma = _gamma(k, u) + (_gamma(chunks, u) * (1 + _gamma(k, u)) if chunks is not None else 0.0)
    # ≥ tr Ŝ (float64 sum of the stored diagonal)
    trace = gram.diagonal(dim1=-2, dim2=-1).to(torch.float64).sum(-1) * (1 + _gamma(m))
    error = gamma / (1 - gamma) * trace + 2 * m * n * torch.finfo(d.dtype).tiny
    if unscale is not None:  # exact: powers of two in float64
        gram = gram.to(torch.float64) * unscale
        trace, error = trace * unscale.flatten(), error * unscale.flatten()
    return gram, trace, error


def certify_unit_norm(
    direction: Tensor, gram: tuple[Tensor, Tensor, Tensor] | None = None, bound: float = 1.0, expected: float = 0.0
) -> Tensor:
    """Per matrix of a ``(batch, m, n)`` stack: True where ``‖D‖₂² = λ_max(D Dᵀ) ≤ bound`` is proved.

    With ``Ŝ`` and its error ``e`` from ``_gram``, a Cholesky factorisation of the symmetric
    ``M = fl(t I − Ŝ)`` that completes proves ``λ_min(M) ≥ −γ_{m+1} tr(M)/(1 − γ_{m+1})`` (Demmel's
    backward error ``|ΔM| ≤ γ_{m+1} |R|ᵀ|R|`` and ``‖|R|ᵀ|R|‖₂ ≤ tr(|R|ᵀ|R|) = tr(M + ΔM)``, with
    ``tr M ≤ m t − tr Ŝ``); the diagonal subtraction errs by ``u (t + max Ŝ_ii)``. With ``t = bound −``
    twice the sum of these and of ``e``, ``λ_max(D Dᵀ) ≤ bound``. The factorisation runs in float32
    where ``Ŝ`` is float32. Where ``γ_{m+1} m ≤ 2·GRAM_TOLERANCE`` (``m ≤ 365``) even a rank-deficient
    ``Ŝ`` (``tr M ≈ m``) passes in float32; larger blocks are refactorised in float64 where float32
    did not certify them (on the CPU, where the host read is free; elsewhere they run in float64).
    ``expected``: a value ``λ_max(D Dᵀ)`` is expected to reach; a float32 first try skips the blocks
    it shows hopeless (``_cholesky_certifies``), which only saves time."""
    gram, trace, gram_error = _gram(direction) if gram is None else gram
    m = gram.shape[-1]
    if gram.dtype != torch.float32:
        return _cholesky_certifies(gram, trace, gram_error, bound, torch.float64)
    u32 = torch.finfo(torch.float32).eps / 2
    if _gamma(m + 1, u32) * m <= 2 * GRAM_TOLERANCE:
        return _cholesky_certifies(gram, trace, gram_error, bound, torch.float32)
    if gram.device.type != "cpu":
        return _cholesky_certifies(gram, trace, gram_error, bound, torch.float64)
    ok = _cholesky_certifies(gram, trace, gram_error, bound, torch.float32, screen=expected)
    redo = ~ok
    if bool(redo.any()):
        ok[redo] = _cholesky_certifies(gram[redo], trace[redo], gram_error[redo], bound, torch.float64)
    return ok


def _cholesky_certifies(
    gram: Tensor, trace: Tensor, gram_error: Tensor, bound: float, dtype: torch.dtype, screen: float = 0.0
) -> Tensor:
    """The test of ``certify_unit_norm``, with the factorisation in ``dtype``. On the CPU a side that
    is a multiple of 128 gets a zero row and column (``diag(Ŝ, 0)`` is the Gram of ``D`` with a zero
    row appended: the same ``‖D‖₂``, trace and error; LAPACK factorises such sides 2–3× slower:
    1024: 17 ms, 1025: 6 ms), and blocks whose ``t`` does not exceed ``max Ŝ_ii`` (``M`` has a
    diagonal entry ≤ 0, so it cannot be positive definite) fail without a factorisation. ``screen``
    (in a first try that a wider ``dtype`` redoes): a value ``λ_max(Ŝ)`` is expected to reach; blocks
    whose ``t`` does not exceed it are not factorised either (seen: every 1024 × 1025 block of the
    GPT-shaped model in float32, where the reduction ``2γ_{m+1} tr M`` of a gradient of deficient
    rank leaves ``t`` below ``λ_max``). Only factorisations that complete certify, so what is
    skipped changes the cost, never what is proved."""
    cpu = gram.device.type == "cpu"
    if cpu and gram.shape[-1] % 128 == 0:
        gram = torch.nn.functional.pad(gram, (0, 1, 0, 1))
    m = gram.shape[-1]
    u = torch.finfo(dtype).eps / 2
    gram = gram.to(dtype)
    diag_max = gram.diagonal(dim1=-2, dim2=-1).amax(-1).to(torch.float64)
    subtraction = u * (bound + diag_max)
    t = bound - 2.0 * (gram_error + subtraction)
    trace_m = m * t - trace * (1 - 3 * _gamma(m)) + m * subtraction  # ≥ tr M as stored
    t = t - 2.0 * _gamma(m + 1, u) * trace_m.clamp(min=0.0) / (1 - _gamma(m + 1, u))
    if not cpu:
        return _factorises(gram, t, dtype)
    lower = diag_max
    if screen > 0:
        lower = lower.clamp(min=screen)
    chance = t > lower  # a host read is free on the CPU
    if bool(chance.all()):
        return _factorises(gram, t, dtype)
    ok = torch.zeros_like(t, dtype=torch.bool)
    if bool(chance.any()):
        ok[chance] = _factorises(gram[chance], t[chance], dtype)
    return ok


def _factorises(gram: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
    """Per block: whether the Cholesky factorisation of ``fl(t I − Ŝ)`` completes in ``dtype`` (and ``t > 0``)."""
    shifted = gram.neg()  # M = t I − Ŝ: −Ŝ_ij exact, fl(t − Ŝ_ii) on the diagonal
    shifted.diagonal(dim1=-2, dim2=-1).add_(t.to(dtype)[:, None])
    _, info = torch.linalg.cholesky_ex(shifted)
    return (info == 0) & (t > 0)


def gershgorin_scale(direction: Tensor, gram: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Per matrix of a ``(batch, m, n)`` stack: ``s`` with ``‖fl(D / s)‖₂ ≤ 1`` proved (``fl`` in
    ``D``'s dtype), from ``λ_max(D Dᵀ) ≤ max_i Σ_j |Ŝ_ij| + ‖Ŝ − D Dᵀ‖₂`` (Gershgorin)."""
    gram = _gram(direction) if gram is None else gram
    return _gershgorin_bound(gram).sqrt() * _division_margin(direction.dtype, direction.shape[-2])


def _gershgorin_bound(gram: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """``≥ λ_max(D Dᵀ)``: the largest absolute row sum of ``Ŝ`` (rounded in its dtype) plus its error."""
    s, _, error = gram
    rows = torch.linalg.matrix_norm(s, ord=math.inf).to(torch.float64)
    return (rows * (1 + _gamma(s.shape[-1] + 1, torch.finfo(s.dtype).eps / 2)) + error) * (1 + _gamma(2))


def _division_margin(dtype: torch.dtype, m: int) -> float:
    """``1 + 2u√m`` (and ``1 + 2u``): ``fl(D / s) = D/s + (D/s) ∘ δ`` with ``|δ| ≤ u`` and
    ``‖D ∘ δ‖₂ ≤ u ‖D‖_F ≤ u √m ‖D‖₂``; the second factor covers the rounding of ``s`` itself."""
    u = torch.finfo(dtype).eps
    return (1 + 2 * u * math.sqrt(m)) * (1 + 2 * u)


def certified_inner(
    grads: Tensor,
    direction: Tensor,
    direction_trace: Tensor | None = None,
    grads_norm: Tensor | None = None,
    computed: list[Tensor] | None = None,
) -> Tensor:
    """``c ≤ ⟨G, D⟩`` per matrix of finite stacks: row dot products in the inputs' dtype (float32 or
    wider), summed in float64, minus the rounding bound ``(γ_n + γ_m(1 + γ_n)) Σ_i |G_i|·|D_i| ≤ …
    ‖G‖_F ‖D‖_F`` (doubled, which covers the rounding of the norms; ``direction_trace``: a bound on
    ``‖D‖²_F``, ``grads_norm``: a float64 bound ``≥ ‖G‖_F``, if known) and ``2 m n`` underflows; clamped at 0.
    A row sum overflows (giving NaN) only where ``‖G‖_F ‖D‖_F`` exceeds the dtype's range.
    ``computed``: a list that receives ``⟨G, D⟩`` as computed (float64 row sums, the bound not subtracted)."""
    dtype = torch.promote_types(torch.promote_types(grads.dtype, direction.dtype), torch.float32)
    g, d = grads.to(dtype), direction.to(dtype)
    m, n = g.shape[-2], g.shape[-1]
    rows = (g * d).sum(-1, dtype=dtype).to(torch.float64).sum(-1)  # products, then sums: γ_{n+1}; faster than vecdot
    if computed is not None:
        computed.append(rows)
    if direction_trace is None:
        direction_trace = torch.linalg.vector_norm(d, dim=(-2, -1), dtype=torch.float64).square()
    if grads_norm is None:
        grads_norm = torch.linalg.vector_norm(g, dim=(-2, -1), dtype=torch.float64)
    u = torch.finfo(dtype).eps / 2
    gamma = _gamma(n + 1, u) + _gamma(m) * (1 + _gamma(n + 1, u))
    underflow = 2 * m * n * torch.finfo(dtype).tiny  # a product or partial sum flushed to zero (FTZ/DAZ)
    error = 2 * gamma * grads_norm * direction_trace.sqrt() + underflow
    return (rows - error).clamp(min=0.0)


def polar_directions(
    stack: Tensor, coefficients: Coefficients = POLAR_EXPRESS, computed: list[Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """For a ``(batch, m, n)`` stack of float32/float64 blocks: directions ``D`` with ``‖D_j‖₂ ≤ 1``
    proved, and ``c_j ≤ ⟨G_j, D_j⟩`` (hence ``c_j ≤ ‖G_j‖_*``), both in the stack's dtype; and where
    the Gershgorin fallback was needed (bool: a looser, still certified ``c_j``). A block holding
    inf/NaN gets ``c_j = NaN`` (and a meaningless ``D_j``; the other blocks are unaffected).
    ``computed``: a list that receives ``⟨G_j, D_j⟩`` as computed (see ``certified_inner``)."""
    dtype = stack.dtype
    with full_precision([stack.device.type]):  # no autocast, IEEE float32 products (the bounds assume them)
        norm = _frobenius_norms(stack)  # ≥ ‖G‖_F; inf/NaN exactly where a block is not finite
        finite = torch.isfinite(norm)
        x = polar_iteration(stack, torch.where(finite & (norm > 0), 1.0 / norm, 0.0), coefficients)
        bound = certified_bound(coefficients)
        gram, ok = certify_iteration(x, coefficients)
        side = min(stack.shape[-2:])
        if stack.device.type == "cpu" and bool(ok.all()):  # a host read is free on the CPU: skip Gershgorin
            scale = torch.full_like(norm, bound) * _division_margin(dtype, side)
        else:
            scale = torch.where(ok, bound, _gershgorin_bound(gram).sqrt()) * _division_margin(dtype, side)
        direction = x / scale.to(dtype)[:, None, None]  # the bfloat16 values divided in the stack's dtype
        # ‖D‖²_F ≤ ‖X‖²_F / s² (1 + u)², ‖X‖²_F ≤ tr Ŝ + e.
        trace = (gram[1] + gram[2]) / scale.square() * (1 + 4 * torch.finfo(dtype).eps)
        inner = torch.where(finite, certified_inner(stack, direction, trace, norm, computed), math.nan)
        rounded = inner.to(dtype)  # rounded toward zero, so that it stays ≤ ⟨G, D⟩
        above = rounded.to(torch.float64) > inner
        rounded = torch.where(above, torch.nextafter(rounded, torch.zeros_like(rounded)), rounded)
        return direction, rounded, ~ok & finite


def certify_iteration(
    x: Tensor, coefficients: Coefficients = POLAR_EXPRESS
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """The Gram of ``polar_iteration``'s iterates (``_gram``) and where ``‖X‖₂ ≤ certified_bound``
    is proved with it (``certify_unit_norm``, ``expected`` from ``expected_top``). A CPU bfloat16
    stack whose Gram needs fewer chunks (or no float64 product) within ``FIRST_TRY_GRAM_TOLERANCE``
    than within ``GRAM_TOLERANCE`` tries that Gram first; the blocks that fail get the
    ``GRAM_TOLERANCE`` one and a second test (one host read, free on the CPU)."""
    rows, cols = x.shape[-2:]
    m, n = min(rows, cols), max(rows, cols)
    bound, expected = certified_bound(coefficients) ** 2, expected_top(coefficients, m) ** 2
    strict = _gram_chunks(m, n, MAX_BF16_GRAM_CHUNKS)
    cheaper = _gram_chunks(m, n, MAX_BF16_GRAM_CHUNKS, FIRST_TRY_GRAM_TOLERANCE)
    first_try = x.dtype == torch.bfloat16 and x.device.type == "cpu" and cheaper is not None and cheaper < (strict or n)
    if not first_try:
        gram = _gram(x, normalized=True)
        return gram, certify_unit_norm(x, gram, bound, expected=expected)
    gram = _gram(x, normalized=True, tolerance=FIRST_TRY_GRAM_TOLERANCE)
    ok = certify_unit_norm(x, gram, bound, expected=expected)
    redo = ~ok
    if not bool(redo.any()):
        return gram, ok
    redone = _gram(x[redo], normalized=True)  # within GRAM_TOLERANCE: more chunks, or float64
    s, trace, error = (t.to(r.dtype) for t, r in zip(gram, redone, strict=True))
    s[redo], trace[redo], error[redo] = redone
    ok[redo] = certify_unit_norm(x[redo], redone, bound, expected=expected)
    return (s, trace, error), ok


def polar_iteration(stack: Tensor, factor: Tensor, coefficients: Coefficients = POLAR_EXPRESS) -> Tensor:
    """The uncertified part of ``polar_directions``: ``X = p_k(… p_1(fl(G_j · factor_j)))`` per block,
    in bfloat16, of the stack's shape (``factor_j = 1/‖G_j‖_F`` there; ``p_i(X) = a X + (b A + c A²) X``,
    ``_stage``), computed in a zero-padded buffer (``_padded``). Nothing about ``‖X‖₂`` is proved here:
    ``certify_unit_norm`` does that."""
    # One pass: scale and round to bfloat16, into a buffer padded with zeros to aligned sides.
    x = _padded(stack)
    torch.mul(stack, factor.to(stack.dtype)[:, None, None], out=x[:, : stack.shape[-2], : stack.shape[-1]])
    wide = stack.shape[-2] <= stack.shape[-1]
    for a, b, c in coefficients:
        x = _stage(x, a, b, c, wide)
    return x[:, : stack.shape[-2], : stack.shape[-1]]  # the padding stays exactly zero


def _padded(stack: Tensor) -> Tensor:
    """A bfloat16 buffer for the iteration, zero-filled and each side of at least ``16 ALIGN`` rounded
    up to a multiple of ``ALIGN`` (at most 6% more work): zero rows and columns stay exactly zero
    through every stage (``A`` and ``q(A)`` get zero rows and columns; products with zeros are exact
    zeros), so the block's iteration is unchanged, and aligned sides are 3–15% faster in bfloat16
    products (measured on the GPT-shaped model's ``… × 257`` and ``… × 513`` blocks)."""
    sides = [-(-s // ALIGN) * ALIGN if s >= 16 * ALIGN else s for s in stack.shape[-2:]]
    if sides == list(stack.shape[-2:]):
        return torch.empty_like(stack, dtype=torch.bfloat16)
    return stack.new_zeros((stack.shape[0], *sides), dtype=torch.bfloat16)


def _frobenius_norms(stack: Tensor) -> Tensor:
    """``N ≥ ‖G‖_F`` per block, in float64, within ``γ_{n+1}`` of it; inf/NaN exactly where a block is
    not finite. float32 blocks on the CPU: row norms in float32 (``fl(Σ_j g²)`` errs by at most
    ``γ_{n+1}`` relatively in any order of the sums, the square root by ``u``, and squares below
    ``2⁻¹²⁶`` may be lost, flushed or not: ``n 2⁻¹²⁶`` per row), added in float64 — a fifth of the cost of a float64
    copy. Blocks where a row overflowed, or whose bound is below ``√(mn) 2⁻⁴⁴`` (where lost squares
    could matter), are recomputed in float64 (one host read, free on the CPU), as are other dtypes
    and devices."""
    m, n = stack.shape[-2:]
    if stack.dtype != torch.float32 or stack.device.type != "cpu":
        return torch.linalg.vector_norm(stack, dim=(-2, -1), dtype=torch.float64) * (1 + 1e-12)
    u = torch.finfo(torch.float32).eps / 2
    rows = torch.linalg.vector_norm(stack, dim=-1).to(torch.float64)
    squares = (rows / (1 - u)).square() / (1 - _gamma(n + 1, u)) + n * 2.0**-126
    norm = (squares.sum(-1) * (1 + _gamma(m))).sqrt() * (1 + 1e-12)
    redo = ~torch.isfinite(norm) | (norm < math.sqrt(m * n) * 2.0**-44)
    if bool(redo.any()):
        norm[redo] = torch.linalg.vector_norm(stack[redo], dim=(-2, -1), dtype=torch.float64) * (1 + 1e-12)
    return norm


def _stage(x: Tensor, a: float, b: float, c: float, wide: bool = True) -> Tensor:
    """``a X + (b A + c A²) X`` with ``A = X Xᵀ`` on a wide stack, ``a X + X (b A + c A²)`` with
    ``A = Xᵀ X`` on a tall one (the same odd polynomial of the singular values; ``A`` is the smaller
    side, and no transposed copy is made); ``c = 0``: one matmul fewer."""
    gram = _small_gram(x, wide)
    poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if c != 0.0 else gram
    alpha = 1.0 if c != 0.0 else b
    return torch.baddbmm(x, poly, x, beta=a, alpha=alpha) if wide else torch.baddbmm(x, x, poly, beta=a, alpha=alpha)


# ---------------------------------------------------------------------------------------------- when to use it
#: Smallest ``min(m, n)`` from which the matmul path beats the exact path, per device type and mode
#: of the step; ``None``: never. One layer moves (certified greedy: the exact path is ``svdvals`` of
#: every block plus one ``svd``); every layer moves (estimated constants: an ``svd`` of every block).
#: CPU (2-core Xeon with AMX, 1 thread, ``python -m benchmarks.bench_polar``, matmul ÷ exact): one
#: layer: 6.6× at 64 × 65, 2.6× at 128 × 129, 0.87–1.23 at 256 × 257, 1024 × 257 and 256 × 1025,
#: 0.56–0.76 from 512 × 513 to 1024 × 1025 (2048 × 2049, one block: 0.74 s against 1.79 s for
#: ``svdvals``) — from 512; every layer: 3.1× at 64 × 65, 0.54 at 128 × 129, 0.34–0.69 from
#: 128 × 513 to 1024 × 1025 — from 128. CUDA: unmeasured (no GPU run yet); an SVD per block is
#: latency-bound there.
POLAR_MIN_SIDE: dict[str, int | None] = {"cpu": 512, "cuda": 64}
POLAR_MIN_SIDE_EVERY_LAYER: dict[str, int | None] = {"cpu": 128, "cuda": 64}
#: Device types whose crossover has not been measured.
UNMEASURED: frozenset[str] = frozenset({"cuda"})


def use_polar(shape: Sequence[int], device: torch.device, every_layer: bool = False) -> bool:
    """Whether a block of this shape takes the matmul path on this device (measured crossover),
    when one layer moves per step or (``every_layer``) every layer does."""
    side = (POLAR_MIN_SIDE_EVERY_LAYER if every_layer else POLAR_MIN_SIDE).get(device.type)
    return side is not None and min(shape[-2:]) >= side
