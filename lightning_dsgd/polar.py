"""The matmul-only spectral path: a certified Polar-Express direction.

The maths: docs/theory.md, "The matmul path: a certified Polar-Express direction".

For a block ``G`` (``m × n``, oriented so that ``m ≤ n``) the odd polynomial iteration

    ``X₀ = G / ‖G‖_F``,    ``X_{k+1} = a_k X_k + (b_k A_k + c_k A_k²) X_k``,  ``A_k = X_k X_kᵀ``

applies the composed odd polynomial ``p = q_K ∘ … ∘ q_1`` (``q_k(x) = a_k x + b_k x³ + c_k x⁵``) to
every singular value: ``X_K = U p(Σ/‖G‖_F) Vᵀ ≈ U Vᵀ`` (Polar Express coefficients, Amsel et al.
2025: ``p([10⁻³, 1]) ⊂ [1 − 10⁻⁹, 1]``). Its first stages run in bfloat16 (the polynomial
only has to be roughly followed), the last in the block's reduction dtype.

**Certificate.** The result is scaled to ``D = X_K / (B (1 + μ))`` with ``B`` the proved maximum
of ``|p|`` on ``[0, 1]`` ([polynomial_bound][lightning_dsgd.polar.polynomial_bound], exact interval
images stage by stage) and ``μ`` a margin for rounding; then ``‖D‖₂ ≤ 1`` is *proved for the
stored D*, whatever the rounding of the iteration: a float64 Cholesky factorisation of
``(1 − s) I − fl(D Dᵀ)`` that runs to completion shows ``λ_max(D Dᵀ) ≤ 1``
([certify_unit_norm][lightning_dsgd.polar.certify_unit_norm], ``s`` covers the rounding of the
Gram and of the factorisation). Where it fails (rounding beyond ``μ``), ``D`` is divided by a
Gershgorin bound instead — looser, still certified. The score is ``c = ⟨G, D⟩`` accumulated in
float64 minus its rounding bound, so ``c ≤ ⟨G, D⟩`` exactly, and the step ``ρ = c · D`` has

    ``f(W − (η/L) ρ) ≤ f(W) − (η/L) c ⟨G, D⟩ + (η²/2L) c² ‖D‖₂² ≤ f(W) − η(1 − η/2) c²/L``,

the guaranteed decrease of the direction actually applied; ``c ≤ ‖G‖_*`` since ``‖D‖₂ ≤ 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
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
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
#: Safety factor of the Polar Express paper: ``q(x/1.01)`` tolerates singular values 1% above the
#: interval each stage was designed for. Without it a bfloat16 or float32 run diverges on some
#: blocks (seen on 1024 × 256: ``‖X₇‖₂ = 1.56`` where ``p ≤ 1``; the certificate then falls back).
SAFETY = 1.01
POLAR_EXPRESS: Coefficients = (
    *((a / SAFETY, b / SAFETY**3, c / SAFETY**5) for a, b, c in _PE_RAW),
    (1.5, -0.5, 0.0),
)
"""Polar Express quintics for ``ℓ = 10⁻³`` (Amsel, Persson, Musco, Gower 2025, Alg. 1) with their
safety factor, then the cubic Newton–Schulz step ``1.5 x − 0.5 x³`` (two matmuls;
``1 ± ε ↦ 1 − 1.5 ε² ∓ 0.5 ε³``, never above 1 near 1)."""
#: Stages run in bfloat16; the last (the clean-up of the bfloat16 rounding) in the reduction dtype,
#: so that ``μ`` can be small.
FAST_STAGES = 7
#: Margin ``μ`` for the rounding of the float32 clean-up (its largest singular value was at most
#: ``1 + 4·10⁻⁷`` on blocks up to 1024 × 1025); a miss only costs tightness (Gershgorin fallback).
ROUNDING_MARGIN = 1e-4

_U64 = torch.finfo(torch.float64).eps / 2


@dataclass(frozen=True)
class PolarDirection:
    """A block's direction computed while scoring: ``D`` with ``‖D‖₂ ≤ 1`` and ``c ≤ ⟨G, D⟩`` (the
    recorded dual norm, 0-dim); ``ρ = c · D``. The matmul path proves ``‖D‖₂ ≤ 1``; the exact path
    hands ``U Vᵀ`` of its SVD (``c = ‖G_r‖_*``) when every layer moves."""

    direction: Tensor
    inner: Tensor


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


def _gamma(n: int) -> float:
    """``γ_n = n u / (1 − n u)`` in float64: the relative rounding bound of an ``n``-term dot product."""
    return n * _U64 / (1 - n * _U64)


def _gram(direction: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Ŝ = fl(D Dᵀ)`` in float64 (products of float32 entries are exact there), ``tr Ŝ`` and
    ``γ_n tr Ŝ (1 + γ_n) ≥ ‖Ŝ − D Dᵀ‖₂`` (``|Ŝ − D Dᵀ| ≤ γ_n |D||D|ᵀ``, ``‖|D|‖²₂ ≤ ‖D‖²_F``)."""
    d = direction.to(torch.float64)
    n = d.shape[-1]
    gram = d @ d.mT
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    return gram, trace, _gamma(n) * trace * (1 + _gamma(n))


def certify_unit_norm(direction: Tensor, gram: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Per matrix of a ``(batch, m, n)`` stack: True where ``‖D‖₂ ≤ 1`` is proved.

    With ``Ŝ`` from ``_gram``, a float64 Cholesky of the symmetric ``M = fl(t I − Ŝ)`` that
    completes proves ``λ_min(M) ≥ −γ_{m+1} tr(M)/(1 − γ_{m+1})`` (Demmel's backward error
    ``|ΔM| ≤ γ_{m+1} |R|ᵀ|R|`` and ``‖|R|ᵀ|R|‖₂ ≤ tr(|R|ᵀ|R|) = tr(M + ΔM)``, ``tr M ≤ m``); the
    diagonal subtraction errs by ``u (t + max Ŝ_ii)``. With ``t = 1 −`` twice the sum of these and
    of the Gram's error, ``λ_max(D Dᵀ) ≤ 1``."""
    gram, _, gram_error = _gram(direction) if gram is None else gram
    m = gram.shape[-1]
    diag_max = gram.diagonal(dim1=-2, dim2=-1).amax(-1)
    slack = gram_error + _gamma(m + 1) * m / (1 - _gamma(m + 1)) + _U64 * (1 + diag_max)
    t = 1.0 - 2.0 * slack
    eye = torch.eye(m, dtype=torch.float64, device=gram.device)
    _, info = torch.linalg.cholesky_ex(t[:, None, None] * eye - gram)
    return (info == 0) & (t > 0)


def gershgorin_scale(direction: Tensor, gram: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Per matrix of a ``(batch, m, n)`` stack: ``s`` with ``‖fl(D / s)‖₂ ≤ 1`` proved, from
    ``λ_max(D Dᵀ) ≤ max_i Σ_j |Ŝ_ij| + ‖Ŝ − D Dᵀ‖₂`` (Gershgorin), times ``1 + 2u√m`` for the
    entry-wise rounding of the division (``‖D ∘ δ‖₂ ≤ u ‖D‖_F ≤ u √m ‖D‖₂``)."""
    gram, _, gram_error = _gram(direction) if gram is None else gram
    m = gram.shape[-1]
    bound = (gram.abs().sum(-1).amax(-1) + gram_error) * (1 + _gamma(m + 1))
    u = torch.finfo(direction.dtype).eps
    return bound.sqrt() * (1 + 2 * u * math.sqrt(m)) * (1 + 2 * u)


def certified_inner(grads: Tensor, direction: Tensor, direction_trace: Tensor | None = None) -> Tensor:
    """``c ≤ ⟨G, D⟩`` per matrix: the float64 dot product minus its rounding bound
    ``γ_{N+1} Σ|G ∘ D| ≤ γ_{N+1} ‖G‖_F ‖D‖_F`` (doubled, which covers the rounding of the norms;
    ``direction_trace``: ``‖D‖²_F`` if known), clamped at 0."""
    g, d = grads.to(torch.float64).flatten(1), direction.to(torch.float64).flatten(1)
    trace = torch.linalg.vector_norm(d, dim=1).square() if direction_trace is None else direction_trace
    error = 2 * _gamma(g.shape[1] + 1) * torch.linalg.vector_norm(g, dim=1) * trace.sqrt()
    return (torch.linalg.vecdot(g, d) - error).clamp(min=0.0)


def polar_directions(stack: Tensor, coefficients: Coefficients = POLAR_EXPRESS) -> tuple[Tensor, Tensor, Tensor]:
    """For a finite ``(batch, m, n)`` stack of float32/float64 blocks: directions ``D`` with
    ``‖D_j‖₂ ≤ 1`` proved, and ``c_j ≤ ⟨G_j, D_j⟩`` (hence ``c_j ≤ ‖G_j‖_*``), both in the stack's
    dtype; and where the Gershgorin fallback was needed (bool: a looser, still certified ``c_j``)."""
    dtype = stack.dtype
    with full_precision([stack.device.type]):  # no autocast, IEEE float32 products (μ assumes them)
        wide = stack.shape[-2] <= stack.shape[-1]
        x = stack if wide else stack.mT.contiguous()
        tiny = torch.finfo(dtype).tiny
        x = x / x.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=tiny)  # no overflow in ‖·‖_F
        x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=tiny)
        for k, (a, b, c) in enumerate(coefficients):
            x = _stage(x.to(torch.bfloat16 if k < FAST_STAGES else dtype), a, b, c)
        x = x.to(dtype) / (polynomial_bound(coefficients) * (1 + ROUNDING_MARGIN))
        x, trace, fell_back = _certified(x)
        direction = x if wide else x.mT
        inner = certified_inner(stack, direction, trace)
        rounded = inner.to(dtype)  # rounded toward zero, so that it stays ≤ ⟨G, D⟩
        above = rounded.to(torch.float64) > inner
        return direction, torch.where(above, torch.nextafter(rounded, torch.zeros_like(rounded)), rounded), fell_back


def _stage(x: Tensor, a: float, b: float, c: float) -> Tensor:
    """``a X + (b A + c A²) X`` with ``A = X Xᵀ`` (``c = 0``: one matmul fewer)."""
    gram = x @ x.mT
    poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if c != 0.0 else gram
    return torch.baddbmm(x, poly, x, beta=a, alpha=1.0 if c != 0.0 else b)


def _certified(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` where ``‖x_j‖₂ ≤ 1`` is proved by ``certify_unit_norm``, else ``x_j`` divided by its
    Gershgorin scale (no host synchronisation); an upper bound on ``‖x_j‖²_F`` (float64); and
    where the fallback was taken."""
    gram = _gram(x)
    ok = certify_unit_norm(x, gram)
    scale = torch.where(ok, torch.ones_like(gram[1]), gershgorin_scale(x, gram))
    trace = (gram[1] + gram[2]) / scale.square() * (1 + 8 * torch.finfo(x.dtype).eps)
    return x / scale.to(x.dtype)[:, None, None], trace, ~ok


# ---------------------------------------------------------------------------------------------- when to use it
#: Smallest ``min(m, n)`` from which the matmul path beats the exact path (``svdvals`` of every
#: block on its tall orientation, plus one ``svd``), per device type; ``None``: never. CPU (2-core
#: Xeon with AMX, 1 thread; ``benchmarks/bench_polar.py`` and the GPT section of docs/benchmarks.md):
#: LAPACK's SVD is 1.2–2.7× faster from 128 × 129 to 2048 × 513, a tie at 1024 × 1025 (0.94×), and
#: the GPT-shaped step at width 1024 took 1.6× longer with the matmul path on its ≥ 1024 blocks —
#: so never. CUDA: unmeasured (no GPU run yet); an SVD per block is latency-bound there.
POLAR_MIN_SIDE: dict[str, int | None] = {"cpu": None, "cuda": 64}
#: Device types whose crossover has not been measured.
UNMEASURED: frozenset[str] = frozenset({"cuda"})


def use_polar(shape: Sequence[int], device: torch.device) -> bool:
    """Whether a block of this shape takes the matmul path on this device (measured crossover)."""
    side = POLAR_MIN_SIDE.get(device.type)
    return side is not None and min(shape[-2:]) >= side
