"""Per-layer norms, their dual norms and duality maps (docs/theory.md, "Norms, dual norms and duality maps").

A layer block is the augmented matrix ``[W, b]`` of shape ``out × (in + 1)``: the bias is folded
in as the last column, matching the augmented input ``[x; 1]``. Every geometry provides

* ``dual_norms(grads)``: ``‖G_i‖_(i)*`` for a list of blocks, batched across layers;
* ``duality_map(G)``: ``ρ(G)`` with ``⟨G, ρ(G)⟩ = ‖G‖²_*`` and ``‖ρ(G)‖ = ‖G‖_*``, returned
  in the reduction dtype (the caller casts the update to the parameter dtype);
* ``dual_norms_and_bases(grads, rank_bounds, seed)``: the dual norms together with, per block,
  an optional basis that the same block's ``duality_map(G, basis)`` must then be given — the
  spectral geometry's randomized range finder for low-rank gradients, or its certified
  matmul-path direction ([SpectralGeometry][lightning_dsgd.geometry.SpectralGeometry],
  [lightning_dsgd.polar][lightning_dsgd.polar]);
* ``direction(G, basis)`` then ``step_along(ρ, …)``, or both as
  ``scaled_step(G, basis, ‖G‖_*, s, split)``: the step ``Δ = −s·ρ(G)`` (as a block, or ``split``
  in contiguous weight and bias parts) and ``⟨G, Δ⟩`` from what scoring computed, without a second
  pass over ``G`` (the adaptive curvature's slope);
* ``norm(M)``: the primal layer norm ``‖M‖_(i)``;
* ``operator_norms(weights)``: the operator norm ``a(W)`` of the non-bias part of each weight,
  as a certified upper bound (never an under-estimate), used by the smoothness constants;
* ``activation_norm``: the vector norm on activations in which the constants are derived
  (ℓ2 for Frobenius and spectral, ℓ∞ for the ℓ∞→ℓ∞ operator norm).

Reductions are computed in at least float32, whatever the parameter dtype (``DSGD`` calls these
inside [full_precision][lightning_dsgd.precision.full_precision]: no autocast, IEEE float32 matmuls). Every
tensor made here lives on the gradients' device, and no value is read back to the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from lightning_dsgd.polar import PolarDirection, polar_directions, use_polar
from lightning_dsgd.precision import device_constant

NormName = Literal["frobenius", "spectral", "linf", "rows"]
ActivationNorm = Literal["l2", "linf"]

#: A layer gradient: ``(grad of W, grad of b or None)``; ``None`` for a layer with no gradient.
BlockGrad = tuple[Tensor, Tensor | None] | None
#: What scoring hands a block's duality map: a sketch basis, a certified direction, or nothing.
Basis = Tensor | PolarDirection | None
#: A step on a block: the matrix ``[ΔW, Δb]``, or (``split``) its weight part ``ΔW`` and bias column
#: ``Δb`` (``None`` without a bias), each contiguous — added to the parameters and multiplied with
#: the next gradient without strided reads.
BlockStep = Tensor | tuple[Tensor, Tensor | None]
#: ``ρ(G)`` as a block, or the direction ``D`` (``ρ = c D``) handed over while scoring.
Direction = Tensor | PolarDirection


def reduction_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for low-precision tensors, the tensor's own dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def augment(weight: Tensor, bias: Tensor | None) -> Tensor:
    """The block ``[W, b]`` (``out × (in+1)``), or ``W`` itself when there is no bias."""
    if bias is None:
        return weight
    return torch.cat([weight, bias.unsqueeze(1)], dim=1)


def block_inner(grad: tuple[Tensor, Tensor | None], step: BlockStep) -> Tensor:
    """``⟨[W, b], Δ⟩`` for ``grad = (W, b)`` and a block step ``Δ`` of the same shape (without its
    bias column when ``b`` is ``None``), without building ``[W, b]``; in ``Δ``'s dtype."""
    weight, bias = grad
    if isinstance(step, Tensor):
        k = weight.shape[1]
        step = (step[:, :k], None if bias is None else step[:, k])
    inner = _dot(weight, step[0])
    return inner if bias is None else inner + _dot(bias, step[1])  # type: ignore[arg-type]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ a ∘ b`` in ``b``'s dtype, as one BLAS dot of contiguous copies (4× faster than row by row
    on a 2048 × 512 block; a strided operand is copied first, since BLAS sums a strided vector in
    another order): the same sum whatever the layout, so that a step held as a block (loaded from a
    checkpoint) or in parts measures alike."""
    return torch.dot(a.to(b.dtype).contiguous().reshape(-1), b.contiguous().reshape(-1))


def scale_block(block: Tensor, factor: Tensor, bias: bool, split: bool, in_place: bool = False) -> BlockStep:
    """``factor · M`` (one pass over ``M``): the block, scaled in place if allowed, or (``split``)
    its weight part and bias column (``bias``: ``M``'s last column is one), each a new contiguous tensor."""
    factor = factor.to(block.dtype)
    if not split:
        return block.mul_(factor) if in_place else block * factor
    if not bias:
        return (block.mul_(factor) if in_place else block * factor), None
    return block[:, :-1] * factor, block[:, -1] * factor


def rounding_margin(dtype: torch.dtype, size: int) -> float:
    """Relative inflation ``1 + 16·(size + 1)·eps`` that turns a computed operator norm into an
    upper bound. A backward-stable SVD, or a sum of ``size`` positive terms, errs by a small
    multiple of ``size·eps`` relative to the result (a float32 SVD of a 2×2 matrix was seen
    2.3·eps low); 16 leaves room for that multiple, and costs < 1% in float32 up to size 4096."""
    return 1.0 + 16 * (size + 1) * torch.finfo(dtype).eps


class Geometry:
    """Base class: one per-layer norm with its dual norm, duality map and operator norm."""

    name: ClassVar[NormName]
    activation_norm: ClassVar[ActivationNorm]
    #: ``operator_norms`` needs an SVD: worth tracking by a bound across steps (``norm_bounds``).
    expensive_operator_norm: ClassVar[bool] = False

    def dual_norms(self, grads: Sequence[BlockGrad]) -> Tensor:
        raise NotImplementedError

    def dual_norms_and_bases(
        self,
        grads: Sequence[BlockGrad],
        rank_bounds: Sequence[int | None] | None = None,
        seed: int = 0,
        directions: bool = False,
    ) -> tuple[Tensor, list[Basis]]:
        """``dual_norms(grads)`` and, per block, the basis its ``duality_map`` must use (``None``:
        none). ``rank_bounds[i] ≥ rank(G_i)`` (``None``: unknown) may let a geometry work in a
        smaller space; ``seed`` fixes any randomness (the same on every rank). ``directions``: every
        block will be stepped on, so a geometry may hand back the direction itself when it comes
        with the dual norm (the spectral map's SVD)."""
        return self.dual_norms(grads), [None] * len(grads)

    def duality_map(self, block: Tensor, basis: Basis = None) -> Tensor:
        raise NotImplementedError

    def direction(self, grad: tuple[Tensor, Tensor | None], basis: Basis) -> Direction:
        """``ρ(G)`` of the gradient ``grad = (W, b)`` as a block or, where scoring handed one over,
        its direction ``D`` with ``ρ = c D`` (no work then): what ``step_along`` scales into the step.
        Shared work forms it while scoring and drops the gradient ([lightning_dsgd.plan][])."""
        return basis if isinstance(basis, PolarDirection) else self.duality_map(augment(*grad), basis)

    @staticmethod
    def step_along(
        direction: Direction, bias: bool, dual_norm: Tensor, scale: Tensor, split: bool = False
    ) -> tuple[BlockStep, Tensor]:
        """The block step ``Δ = −scale · ρ(G)`` (``split``: as its weight part and bias column, see
        ``BlockStep``; ``bias``: the block's last column is one) and ``⟨G, Δ⟩``, without a second
        pass over ``G``: ``⟨G, Δ⟩ = −scale · ⟨G, ρ⟩`` with ``⟨G, ρ(G)⟩ = ‖G‖²_*`` (the duality map's
        defining identity, ``dual_norm`` as scored) and, for a direction handed over while scoring
        (``ρ = c D``, ``c`` the scored dual norm), ``⟨G, ρ⟩ = c ⟨G, D⟩`` with ``⟨G, D⟩`` as computed
        then (the exact path's ``⟨G, U Vᵀ⟩ = ‖G_r‖_*``). Equal to ``Σ G ∘ Δ`` up to rounding: of the
        dual norm's reduction or, with an SVD here, of its singular values. Consumes such a
        direction: ``D`` may be scaled into ``Δ`` in place."""
        if isinstance(direction, PolarDirection):
            factor = -scale * direction.inner
            dot = direction.inner if direction.dot is None else direction.dot
            return scale_block(direction.direction, factor, bias, split, in_place=True), factor * dot
        # Not in place: a duality map may return the gradient itself (Frobenius).
        return scale_block(direction, -scale, bias, split), -scale * dual_norm.square()

    def scaled_step(
        self, grad: tuple[Tensor, Tensor | None], basis: Basis, dual_norm: Tensor, scale: Tensor, split: bool = False
    ) -> tuple[BlockStep, Tensor]:
        """``step_along`` the ``direction`` of ``grad``."""
        return self.step_along(self.direction(grad, basis), grad[1] is not None, dual_norm, scale, split)

    def norm(self, block: Tensor) -> Tensor:
        raise NotImplementedError

    def norms(self, blocks: Sequence[Tensor]) -> Tensor:
        """``norm`` of every block, as one tensor."""
        return torch.stack([self.norm(b) for b in blocks])

    def operator_norms(self, weights: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _device(grads: Sequence[BlockGrad]) -> torch.device:
        for g in grads:
            if g is not None:
                return g[0].device
        return torch.device("cpu")


class FrobeniusGeometry(Geometry):
    """``‖W‖_F``: self-dual, ``ρ(G) = G`` (layer-wise gradient descent with step ``η/L_i``).

    The constants use the spectral operator norm and ℓ2 activations, valid since
    ``‖Δ‖_2 ≤ ‖Δ‖_F``.
    """

    name = "frobenius"
    activation_norm = "l2"
    expensive_operator_norm = True

    def dual_norms(self, grads: Sequence[BlockGrad]) -> Tensor:
        device = self._device(grads)
        tensors: list[Tensor] = []
        owner: list[int] = []
        for i, g in enumerate(grads):
            if g is None:
                continue
            for t in g:
                if t is not None:
                    tensors.append(t)
                    owner.append(i)
        out = torch.zeros(len(grads), device=device, dtype=torch.float32)
        if not tensors:
            return out
        dtype = reduction_dtype(tensors[0].dtype)
        norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
        out = out.to(dtype).index_add_(0, device_constant(tuple(owner), torch.int64, device), norms.square())
        return out.sqrt()

    def duality_map(self, block: Tensor, basis: Basis = None) -> Tensor:
        return block.to(reduction_dtype(block.dtype))

    def norm(self, block: Tensor) -> Tensor:
        return torch.linalg.matrix_norm(block.to(reduction_dtype(block.dtype)), ord="fro")

    def operator_norms(self, weights: Sequence[Tensor]) -> Tensor:
        return spectral_norms(weights)


def signal_singular_values(s: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Singular values (descending, last dim) with those below the numerical-rank tolerance
    ``σ_max · max(m, n) · eps`` (as in ``torch.linalg.matrix_rank``) set to zero.

    A cross-entropy output gradient is rank-deficient (its rows sum to zero); its null singular
    values come out as rounding noise, and keeping them would add an arbitrary ``u vᵀ`` to the
    step. DSGD works with the numerically truncated gradient ``G_r`` instead: its nuclear norm is
    the dual norm used for scoring and ``ρ(G_r)`` the direction, so ``⟨G, ρ(G_r)⟩ = ‖G_r‖²_*``
    and the guaranteed decrease is exact for the step taken; ``‖G_r‖_*`` differs from ``‖G‖_*``
    only at the rounding level.
    """
    threshold = s[..., :1] * max(shape[-2:]) * torch.finfo(s.dtype).eps
    return torch.where(s > threshold, s, torch.zeros((), dtype=s.dtype, device=s.device))


class SpectralGeometry(Geometry):
    """``‖W‖_{2→2}``: dual is the nuclear norm ``Σσ_k``; ``ρ(G) = ‖G‖_* · U Vᵀ`` from the reduced
    SVD ``G = U Σ Vᵀ``, both taken on the gradient without its rounding-noise singular values
    ([signal_singular_values][lightning_dsgd.geometry.signal_singular_values]). Nuclear norms of same-shape layers
    share one batched SVD.

    **Low-rank gradients** (a layer fed ``N`` input rows per step has ``rank G ≤ N``): with a rank
    bound ``r`` and ``k = r + SKETCH_OVERSAMPLING ≤ SKETCH_MAX_FRACTION · min(m, n)``, a randomized
    range finder replaces the ``m × n`` SVD: ``Q = qr((ΩG)ᵀ)`` (``Ω`` Gaussian ``k × m``) is an
    orthonormal ``n × k`` basis of the row space, ``B = G Q`` is ``m × k``, and with ``B = U Σ Vᵀ``

        ``‖G‖_* ≈ ‖B‖_* = Σσ_k(B)``,    ``ρ(G) = ‖B‖_* · U (Q V)ᵀ``.

    For *any* orthonormal ``Q`` this direction has ``‖U (QV)ᵀ‖₂ = 1`` and
    ``⟨G, U (QV)ᵀ⟩ = tr(Uᵀ G Q V) = ‖B‖_*``, so ``‖B‖²_*/L`` is exactly the guaranteed decrease of
    the step actually applied (rigorous even if the rank bound were wrong); when ``Q`` spans the row
    space (almost surely, if ``rank G ≤ k``), ``‖B‖_* = ‖G‖_*`` up to rounding. The score and the
    step use the same ``Q`` (the basis handed from ``dual_norms_and_bases`` to ``duality_map``).

    **Matmul path** ([lightning_dsgd.polar][lightning_dsgd.polar]), for the shapes where it beats the SVD on the
    device (``use_polar``, measured; ``polar="always"``/``"never"`` overrides): a Polar-Express
    direction ``D`` with ``‖D‖₂ ≤ 1`` proved and ``c ≤ ⟨G, D⟩`` computed in float64; the dual norm
    recorded is ``c ≤ ‖G‖_*`` and the step ``ρ = c·D`` (handed over as the block's basis), so
    ``c²/L`` is the guaranteed decrease of the step applied.
    """

    name = "spectral"
    activation_norm = "l2"
    expensive_operator_norm = True

    #: Extra sketch columns beyond the rank bound (robustness of the QR to rounding).
    SKETCH_OVERSAMPLING = 8
    #: Per device type, sketch only when ``k`` is at most this fraction of the block's smaller side
    #: (else the exact SVD is as fast); other device types use the CPU value.
    #: cpu: measured on one core, the sketch wins 1.3× at k/min = 0.53 and loses at 0.8.
    #: cuda: NOT MEASURED — the CPU value until a GPU run of ``benchmarks/bench_profile.py`` sets it.
    #: cuSOLVER's SVD runs per matrix even for a batch (gesvdj, and a host sync for its convergence
    #: check), while the sketch is matmuls, a QR and an ``m × k`` SVD, so the GPU crossover is
    #: expected at or above the CPU one: 0.6 errs towards the exact SVD, never towards a worse bound
    #: (the sketched step is rigorous for any basis; only the speed depends on this number).
    SKETCH_MAX_FRACTION: ClassVar[Mapping[str, float]] = {"cpu": 0.6, "cuda": 0.6}

    def __init__(self, polar: Literal["auto", "always", "never"] = "auto") -> None:
        self.polar = polar
        #: Blocks whose matmul-path direction needed the Gershgorin fallback (looser, still
        #: certified scores), counted on the device without a host sync; expected to stay 0.
        self.polar_fallbacks: Tensor | int = 0

    def uses_polar(self, shape: Sequence[int], device: torch.device, every_layer: bool = False) -> bool:
        """Whether a block that is not sketched takes the matmul path (``every_layer``: every layer
        moves this step, so the exact path would need an ``svd`` of every block)."""
        return self.polar == "always" or (self.polar == "auto" and use_polar(shape, device, every_layer))

    def dual_norms(self, grads: Sequence[BlockGrad]) -> Tensor:
        return self.dual_norms_and_bases(grads)[0]

    def sketch_size(self, shape: Sequence[int], rank_bound: int | None, device_type: str = "cpu") -> int | None:
        """Columns ``k`` of the range finder for a block of this shape on this device type, or
        ``None`` (exact SVD)."""
        if rank_bound is None:
            return None
        k = rank_bound + self.SKETCH_OVERSAMPLING
        fraction = self.SKETCH_MAX_FRACTION.get(device_type, self.SKETCH_MAX_FRACTION["cpu"])
        return k if k <= fraction * min(shape[-2:]) else None

    def dual_norms_and_bases(
        self,
        grads: Sequence[BlockGrad],
        rank_bounds: Sequence[int | None] | None = None,
        seed: int = 0,
        directions: bool = False,
    ) -> tuple[Tensor, list[Basis]]:
        """With ``directions`` (every layer moves) one batched SVD per group gives both the nuclear
        norm and ``U Vᵀ`` (handed to ``duality_map`` as a [PolarDirection][lightning_dsgd.polar.PolarDirection]
        ``(U Vᵀ, ‖G_r‖_*)``), instead of ``svdvals`` now and a second SVD per layer at the step."""
        device = self._device(grads)
        groups: dict[tuple[tuple[int, ...], torch.dtype, int | str | None], list[int]] = defaultdict(list)
        for i, g in enumerate(grads):
            if g is None:
                continue
            shape = (g[0].shape[0], g[0].shape[1] + (g[1] is not None))
            k: int | str | None = self.sketch_size(shape, None if rank_bounds is None else rank_bounds[i], device.type)
            if k is None and self.uses_polar(shape, device, directions):
                k = "polar"
            block_dtype = g[0].dtype if g[1] is None else torch.promote_types(g[0].dtype, g[1].dtype)
            groups[(shape, reduction_dtype(block_dtype), k)].append(i)
        dtype = next(iter(groups))[1] if groups else torch.float32
        values: list[Tensor | None] = [None] * len(grads)
        bases: list[Basis] = [None] * len(grads)
        generator = _generator(device, seed)
        for (shape, group_dtype, k), idx in groups.items():
            if k == "polar":  # inf/NaN blocks: a NaN score, from polar_directions
                stack = _stack_blocks([grads[i] for i in idx], shape, group_dtype, device)  # type: ignore[misc]
                computed: list[Tensor] = []  # ⟨G, D⟩ as computed, for the step's ⟨G, Δ⟩ (scaled_step)
                polar, inner, fell_back = polar_directions(stack, computed=computed)
                self.polar_fallbacks = self.polar_fallbacks + fell_back.sum()
                inner, dots = inner.to(dtype), computed[0].to(dtype)
                for j, i in enumerate(idx):
                    bases[i] = PolarDirection(polar[j], inner[j], dots[j])
                    values[i] = inner[j]
                continue
            omega = _randn((k, shape[0]), generator, device, group_dtype) if isinstance(k, int) else None
            # Every block's direction (every layer moves): one block at a time (LAPACK's SVD loops over
            # a batch anyway), so that only its stack and factors are alive at once and its U Vᵀ owns
            # its storage (freed once its layer has moved).
            for chunk in [[i] for i in idx] if directions else [idx]:
                stack = _stack_blocks([grads[i] for i in chunk], shape, group_dtype, device)  # type: ignore[misc]
                nuclear, found = self._exact_or_sketched(stack, shape, omega, directions)
                del stack
                for i, value, basis in zip(chunk, nuclear.to(dtype), found, strict=True):
                    values[i] = value
                    bases[i] = PolarDirection(basis, value) if directions else basis
        zero = torch.zeros((), device=device, dtype=dtype)
        return torch.stack([zero if v is None else v for v in values]), bases

    @staticmethod
    def _exact_or_sketched(
        stack: Tensor, shape: tuple[int, int], omega: Tensor | None, directions: bool
    ) -> tuple[Tensor, list[Tensor | None]]:
        """Nuclear norms of a stack of same-shape blocks (NaN for a block holding inf/NaN), exact or
        through the range finder of the sketch ``omega``, and per block its ``U Vᵀ`` (``directions``)
        or sketch basis (else ``None``)."""
        stack, finite = _without_nonfinite(stack)
        basis = None
        if omega is not None:
            basis = torch.linalg.qr((omega @ stack).mT).Q  # (batch, n, k), orthonormal columns
            stack = stack @ basis
        # LAPACK is faster on tall matrices (2.8× on a 256 × 1025 block, 1 CPU thread).
        wide = shape[0] < shape[1]
        oriented = stack.mT if wide else stack
        found: list[Tensor | None] = [None] * stack.shape[0] if basis is None else list(basis)
        if directions:
            u, s, vh = torch.linalg.svd(oriented, full_matrices=False)
            singular = signal_singular_values(s, shape)
            unit = (u * (singular > 0).unsqueeze(-2).to(u.dtype)) @ vh  # U Vᵀ of the signal part
            unit = unit.mT if wide else unit
            if basis is not None:
                unit = unit @ basis.mT  # U (QV)ᵀ, the sketch's direction
            found = list(unit)
        else:
            singular = signal_singular_values(torch.linalg.svdvals(oriented), shape)
        return _nan_where_not(finite, singular.sum(-1)), found

    def duality_map(self, block: Tensor, basis: Basis = None) -> Tensor:
        g = block.to(reduction_dtype(block.dtype))
        if isinstance(basis, PolarDirection):
            return basis.inner * basis.direction
        u, s, vh = torch.linalg.svd(g if basis is None else g @ basis, full_matrices=False)
        s = signal_singular_values(s, block.shape)
        right = vh if basis is None else vh @ basis.mT
        return s.sum() * ((u * (s > 0)) @ right)

    def norm(self, block: Tensor) -> Tensor:
        """``σ_max``; NaN for a block holding inf/NaN (LAPACK's SVD would raise on it)."""
        stack, finite = _without_nonfinite(block.to(reduction_dtype(block.dtype)).unsqueeze(0))
        return _nan_where_not(finite, torch.linalg.matrix_norm(_tall(stack), ord=2))[0]

    def norms(self, blocks: Sequence[Tensor]) -> Tensor:
        """``σ_max`` of every block (NaN where it holds inf/NaN); same-shape blocks share one
        batched SVD, on their tall orientation."""
        return _grouped(blocks, lambda stack, shape, dtype: torch.linalg.matrix_norm(_tall(stack), ord=2))

    def operator_norms(self, weights: Sequence[Tensor]) -> Tensor:
        return spectral_norms(weights)


class LinfGeometry(Geometry):
    """``‖W‖_{∞→∞} = max_r Σ_j |W_rj|``: dual ``Σ_r max_j |G_rj|``; ``ρ(G)`` puts
    ``‖G‖_* · sign(G_rj)`` at ``j = argmax_j |G_rj|`` in each row ``r`` and zero elsewhere."""

    name = "linf"
    activation_norm = "linf"

    def dual_norms(self, grads: Sequence[BlockGrad]) -> Tensor:
        device = self._device(grads)
        rows: list[Tensor | None] = []
        for g in grads:
            if g is None:
                rows.append(None)
                continue
            weight, bias = g
            dtype = reduction_dtype(weight.dtype)
            row_max = weight.abs().amax(dim=1).to(dtype)
            if bias is not None:
                row_max = torch.maximum(row_max, bias.abs().to(dtype))
            rows.append(row_max.sum())
        present = [r for r in rows if r is not None]
        dtype = present[0].dtype if present else torch.float32
        zero = torch.zeros((), device=device, dtype=dtype)
        return torch.stack([zero if r is None else r.to(dtype) for r in rows])

    def duality_map(self, block: Tensor, basis: Basis = None) -> Tensor:
        dtype = reduction_dtype(block.dtype)
        g = block.to(dtype)
        row_max, col = g.abs().max(dim=1)
        picked = g.gather(1, col.unsqueeze(1)).sign()
        return torch.zeros_like(g).scatter_(1, col.unsqueeze(1), picked * row_max.sum())

    def norm(self, block: Tensor) -> Tensor:
        return block.to(reduction_dtype(block.dtype)).abs().sum(dim=1).amax()

    def operator_norms(self, weights: Sequence[Tensor]) -> Tensor:
        out = []
        for w in weights:
            dtype = reduction_dtype(w.dtype)
            out.append(w.to(dtype).abs().sum(dim=1).amax() * rounding_margin(dtype, w.shape[1]))
        return torch.stack(out)


class RowsGeometry(Geometry):
    """``‖W‖_{1→2} = max_r ‖W_r‖_2`` (the largest row norm: the operator norm on one-hot inputs,
    as for an embedding table): dual ``Σ_r ‖G_r‖_2``; ``ρ(G)_r = ‖G‖_* · G_r / ‖G_r‖_2`` (rows
    with a zero gradient stay zero)."""

    name = "rows"
    activation_norm = "l2"

    def dual_norms(self, grads: Sequence[BlockGrad]) -> Tensor:
        device = self._device(grads)
        out: list[Tensor] = []
        for g in grads:
            if g is None:
                out.append(torch.zeros((), device=device, dtype=torch.float32))
                continue
            block = augment(*g)
            out.append(torch.linalg.vector_norm(block, dim=1, dtype=reduction_dtype(block.dtype)).sum())
        dtype = max((t.dtype for t in out), key=lambda d: torch.finfo(d).bits)
        return torch.stack([t.to(dtype) for t in out])

    def duality_map(self, block: Tensor, basis: Basis = None) -> Tensor:
        g = block.to(reduction_dtype(block.dtype))
        rows = torch.linalg.vector_norm(g, dim=1, keepdim=True)
        unit = torch.where(rows > 0, g / rows.clamp(min=torch.finfo(g.dtype).tiny), torch.zeros_like(g))
        return rows.sum() * unit

    def norm(self, block: Tensor) -> Tensor:
        return torch.linalg.vector_norm(block.to(reduction_dtype(block.dtype)), dim=1).amax()

    def operator_norms(self, weights: Sequence[Tensor]) -> Tensor:
        out = []
        for w in weights:
            dtype = reduction_dtype(w.dtype)
            out.append(torch.linalg.vector_norm(w.to(dtype), dim=1).amax() * rounding_margin(dtype, w.shape[1]))
        return torch.stack(out)


def spectral_norms(weights: Sequence[Tensor]) -> Tensor:
    """Largest singular value of each matrix, inflated by its rounding margin; same-shape
    matrices share one batched SVD."""
    return _grouped(
        weights,
        lambda stack, shape, dtype: torch.linalg.matrix_norm(_tall(stack), ord=2) * rounding_margin(dtype, max(shape)),
    )


def _grouped(blocks: Sequence[Tensor], measure: Callable[[Tensor, tuple[int, ...], torch.dtype], Tensor]) -> Tensor:
    """``measure`` of each block, called once per stack of same-shape blocks (in their reduction
    dtype, inf/NaN blocks zeroed and measured as NaN)."""
    by_shape: dict[tuple[tuple[int, ...], torch.dtype], list[int]] = defaultdict(list)
    for i, b in enumerate(blocks):
        by_shape[(tuple(b.shape), reduction_dtype(b.dtype))].append(i)
    values: list[Tensor | None] = [None] * len(blocks)
    for (shape, dtype), same in by_shape.items():
        for idx in batches(same, blocks[same[0]].device):
            stack, finite = _without_nonfinite(torch.stack([blocks[i].to(dtype) for i in idx]))
            measured = _nan_where_not(finite, measure(stack, shape, dtype))
            for k, i in enumerate(idx):
                values[i] = measured[k]
    return torch.stack([v for v in values if v is not None])


#: The most blocks measured in one batched call, per device type. The CPU's LAPACK loops over a
#: batch anyway: batching buys no time there and would hold a copy of every block at once.
MAX_BATCH = {"cpu": 1}
#: Elsewhere (a GPU: one launch instead of many; unmeasured).
DEFAULT_MAX_BATCH = 16


def batches(indices: Sequence[int], device: torch.device) -> list[list[int]]:
    """``indices`` in runs of at most the device's ``MAX_BATCH``."""
    size = MAX_BATCH.get(device.type, DEFAULT_MAX_BATCH)
    return [list(indices[k : k + size]) for k in range(0, len(indices), size)]


def _tall(stack: Tensor) -> Tensor:
    """The stack on its tall orientation (a view): LAPACK's SVD of a 256 × 1025 block takes 2.5× as
    long as that of its transpose (1 CPU thread)."""
    return stack.mT if stack.shape[-2] < stack.shape[-1] else stack


def _stack_blocks(
    grads: Sequence[tuple[Tensor, Tensor | None]], shape: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> Tensor:
    """The blocks ``[W, b]`` of same-shape layers as one ``(batch, out, in (+1))`` stack in ``dtype``,
    each entry copied once (no ``cat`` then ``stack``)."""
    stack = torch.empty((len(grads), *shape), dtype=dtype, device=device)
    for j, (weight, bias) in enumerate(grads):
        stack[j, :, : weight.shape[1]].copy_(weight)
        if bias is not None:
            stack[j, :, -1].copy_(bias)
    return stack


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` that draws on ``device`` (on the CPU where the device
    type has no generator of its own): the same draws on every rank with the same device type."""
    where = device if device.type in ("cpu", "cuda", "xpu", "mps") else torch.device("cpu")
    return torch.Generator(device=where).manual_seed(seed)


def _randn(size: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Gaussian draws on ``device``, made where ``generator`` lives (one copy if that is the CPU)."""
    return torch.randn(size, generator=generator, device=generator.device, dtype=dtype).to(device)


def _without_nonfinite(stack: Tensor) -> tuple[Tensor, Tensor]:
    """Zero the matrices of a stack that hold inf/NaN (LAPACK raises on NaN input) and say which
    were finite, without a host synchronisation."""
    finite = torch.isfinite(stack.abs().amax(dim=(1, 2)))  # amax propagates NaN; 10× faster than isfinite().all()
    return torch.where(finite[:, None, None], stack, torch.zeros((), dtype=stack.dtype, device=stack.device)), finite


def _nan_where_not(finite: Tensor, values: Tensor) -> Tensor:
    return torch.where(finite, values, torch.full_like(values, float("nan")))


GEOMETRIES: dict[str, type[Geometry]] = {
    g.name: g for g in (FrobeniusGeometry, SpectralGeometry, LinfGeometry, RowsGeometry)
}


def make_geometry(norm: str) -> Geometry:
    """The geometry for a norm name, or a ``ValueError`` listing the valid names."""
    try:
        return GEOMETRIES[norm]()
    except KeyError:
        raise ValueError(
            f"Unknown norm {norm!r}. Use one of {sorted(GEOMETRIES)}: 'spectral' (the paper's "
            "U·Vᵀ map), 'frobenius' (layer-wise gradient descent), 'linf' (ℓ∞→ℓ∞ operator norm) or "
            "'rows' (largest row norm, for embeddings)."
        ) from None
