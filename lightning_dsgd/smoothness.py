"""Per-layer smoothness constants ``L_i(w)`` (docs/theory.md, "The per-layer constants").

For an MLP ``z_k = W_k [x_{k-1}; 1]``, ``x_k = σ_k(z_k)`` with linear logits and a loss whose
gradient and curvature in the output norm are bounded by ``G`` and ``H``, and for every ``Δ``
supported on layer ``i``::

    f(w + Δ) ≤ f(w) + ⟨∇_i f(w), Δ⟩ + ½ L_i(w) ‖Δ‖²_(i)                                  (★)

    L_i = R_{i-1}² · [ H·P_{i,n}² + G · Σ_{k=i}^{n-1} s2_{k+1} · a_{k+1} · P_{i,k}² · Π_{j=k+2}^{n} s1_j a_j ]

with ``a_j`` the operator norm of ``W_j`` (non-bias part), ``s1_j, s2_j`` the bounds on ``|σ'|,
|σ''|`` of the activation applied before layer ``j``, ``P_{i,k} = Π_{j=i+1}^{k} s1_j a_j`` and
``R_{i-1}`` a bound on the norm of layer ``i``'s augmented input. ``L_i`` never depends on
``W_i`` or on the layers below ``i``, so (★) holds along the whole single-layer step.

This module is the maths only; indices are 0-based below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_dsgd.precision import device_constant


@dataclass(frozen=True)
class ActivationBounds:
    """``s0 = sup|σ|``, ``s1 = sup|σ'|``, ``s2 = sup|σ''|``."""

    s0: float
    s1: float
    s2: float


TANH = ActivationBounds(s0=1.0, s1=1.0, s2=4.0 / (3.0 * math.sqrt(3.0)))
SIGMOID = ActivationBounds(s0=1.0, s1=0.25, s2=1.0 / (6.0 * math.sqrt(3.0)))
ACTIVATION_BOUNDS: dict[type[nn.Module], ActivationBounds] = {nn.Tanh: TANH, nn.Sigmoid: SIGMOID}


@dataclass(frozen=True)
class LossBounds:
    """Bounds on the loss as a function of the model's outputs ``z``: ``G ≥ ‖∇_z ℓ‖_dual`` and
    ``H ≥ D²ℓ[v, v] / ‖v‖²``, in the ℓ2 and in the ℓ∞ output norm (dual ℓ2, resp. ℓ1).
    ``certified=False`` marks estimates: steps then are never reported as certified."""

    name: str
    g_l2: float
    h_l2: float
    g_linf: float
    h_linf: float
    certified: bool = True

    def bounds(self, activation_norm: str) -> tuple[float, float]:
        return (self.g_l2, self.h_l2) if activation_norm == "l2" else (self.g_linf, self.h_linf)


#: Softmax cross-entropy (mean over the batch): ``∇ = p − y`` with ``‖p−y‖_2 ≤ √2``,
#: ``‖p−y‖_1 ≤ 2``; Hessian ``diag(p) − ppᵀ`` with ``λ_max ≤ ½`` and ``vᵀ(·)v = Var_p(v) ≤ ‖v‖²_∞``.
CROSS_ENTROPY = LossBounds("cross_entropy", g_l2=math.sqrt(2.0), h_l2=0.5, g_linf=2.0, h_linf=1.0)
#: Mean squared error ``mean_j (z_j − y_j)²`` per sample has curvature ``2/k ≤ 2`` but an unbounded
#: gradient: usable for estimated constants only.
MSE = LossBounds("mse", g_l2=math.inf, h_l2=2.0, g_linf=math.inf, h_linf=2.0, certified=False)
LOSSES: dict[str, LossBounds] = {loss.name: loss for loss in (CROSS_ENTROPY, MSE)}


def mlp_constants(
    operator_norms: Tensor,
    input_bounds: Tensor,
    s1: Tensor,
    s2: Tensor,
    g: float,
    h: float,
) -> Tensor:
    """``L_i`` for every layer of a chain (0-based), vectorised over layers.

    Args:
        operator_norms: ``a_j``, shape ``(n,)``.
        input_bounds: ``R_{i-1}``, the bound on the norm of layer ``i``'s augmented input, ``(n,)``.
        s1, s2: bounds of the activation applied *before* layer ``j``, ``(n,)`` (entry 0 unused).
        g, h: the loss bounds ``G`` and ``H`` in the activation norm.
    """
    n = operator_norms.shape[0]
    c = s1 * operator_norms  # c_j = s1_j a_j
    idx = torch.arange(n, device=c.device)
    # P[i, k] = Π_{j=i+1}^{k} c_j (= 1 for k ≤ i): a cumulative product of c masked to j > i.
    masked = torch.where(idx[None, :] > idx[:, None], c[None, :], torch.ones_like(c)[None, :])
    p = torch.cumprod(masked, dim=1)
    # tail[k] = Π_{j=k+2}^{n-1} c_j, with an empty product 1.
    suffix = torch.cat([torch.flip(torch.cumprod(torch.flip(c, [0]), 0), [0]), c.new_ones(2)])
    tail = suffix[2 : n + 2]
    # term[k] = s2_{k+1} a_{k+1} tail[k] for k ≤ n-2, summed over k ≥ i with weight P[i, k]².
    nxt = torch.cat([s2[1:] * operator_norms[1:], c.new_zeros(1)])
    curvature = torch.where(idx[None, :] >= idx[:, None], p.square() * (nxt * tail)[None, :], 0.0).sum(1)
    return input_bounds.square() * (h * p[:, n - 1].square() + g * curvature)


def architecture_input_bounds(
    data_bound: Tensor, widths: list[int], activations: list[ActivationBounds | None], activation_norm: str
) -> Tensor:
    """Worst-case ``R_{i-1}``: ``R_0² = B_x² + 1`` and ``R_k² = d_k s0² + 1`` in ℓ2,
    ``R_0 = max(B_x, 1)`` and ``R_k = max(s0, 1)`` in ℓ∞ (``d_k`` the input width of layer k)."""
    first = data_bound.square().add(1.0).sqrt() if activation_norm == "l2" else data_bound.clamp(min=1.0)
    rest = []
    for width, act in zip(widths[1:], activations[1:], strict=True):
        assert act is not None
        rest.append(math.sqrt(width * act.s0**2 + 1.0) if activation_norm == "l2" else max(act.s0, 1.0))
    return torch.cat([first.reshape(1), device_constant(tuple(rest), first.dtype, first.device)])
