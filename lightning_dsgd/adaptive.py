"""``constants="adaptive"``: per-layer constants corrected by the curvature actually met.

``L_i = m_i · base_i(w)``, where ``base_i`` is the certified constant where one exists and
otherwise a cheap estimate. After layer ``i`` moved by ``Δ`` under the constant ``L``, the next
gradient of that layer gives the curvature met along the step (the mean of the Hessian's
quadratic form over the segment, exact in full batch)::

    κ = ⟨g_i(w + Δ) − g_i(w), Δ⟩ / ‖Δ‖²_(i)

and the multiplier follows ``target = safety · κ``: it **grows at once** when the step
disappointed (``target > L``: ``L ← target``) and **shrinks slowly** when it was safe
(``L ← max(target, shrink · L)``). A layer that did not move shrinks by ``idle_shrink`` per step,
so a layer whose constant is too pessimistic to ever be chosen greedily gets tried, and measured
(every step stays within the trust region ``max_relative_step``, see
[TrustRegion][lightning_dsgd.adaptive.TrustRegion]); once measured, idling takes it at most to ``idle_reach``
times its last measured value — by default 1.0, i.e. a measured layer keeps its constant until it
moves again. (0.7 reaches low losses faster on tanh MLPs but made a transformer stall and cyclic
selection diverge on a CNN and a transformer in ``benchmarks/harness.py``.)
Certified layers never go above their certified constant (``m ≤ 1``). Everything stays on the
device: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dsgd.distributed import full, version_key
from lightning_dsgd.geometry import Geometry, augment
from lightning_dsgd.layers import Layer
from lightning_dsgd.norm_bounds import NormBounds
from lightning_dsgd.precision import device_constant


@dataclass
class _Pending:
    step: Tensor  # Δ, as the layer's block matrix
    grad_dot_step: Tensor  # ⟨g_i(w), Δ⟩
    step_norm_sq: Tensor  # ‖Δ‖²_(i)
    constant: Tensor  # the L used for the step


#: Each tuning option of the adaptive constants and the open/closed range it must lie in.
_RANGES = {
    "safety": (0.0, float("inf")),
    "shrink": (0.0, 1.0),
    "idle_shrink": (0.0, 1.0),
    "idle_reach": (0.0, float("inf")),
    "floor": (0.0, float("inf")),
    "max_relative_step": (0.0, float("inf")),
}


def check_adaptive_options(options: dict | None) -> None:
    """``adaptive_options`` must name known options with finite values > 0 (``shrink`` below 1,
    ``idle_shrink`` at most 1): a floor or safety of 0 would allow a zero constant, i.e. an
    infinite step."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise TypeError(f"adaptive_options must be a dict such as {{'floor': 1e-3}}, got {options!r}.")
    unknown = sorted(set(options) - set(_RANGES))
    if unknown:
        raise ValueError(f"Unknown adaptive_options {unknown}; the options are {sorted(_RANGES)}.")
    for name, value in options.items():
        low, high = _RANGES[name]
        closed = name == "idle_shrink"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and low < value and (value <= high if closed else value < high)):
            raise ValueError(
                f"adaptive_options[{name!r}] must be a number in ({low}, {high}{']' if closed else ')'}, got {value!r}."
            )


class AdaptiveConstants:
    """Multipliers ``m_i`` of the base constants, and the steps awaiting their curvature."""

    def __init__(
        self,
        certified: list[bool],
        *,
        safety: float = 1.0,
        shrink: float = 0.5,
        idle_shrink: float = 0.9,
        idle_reach: float = 1.0,
        floor: float = 1e-3,
        max_relative_step: float = 0.2,
    ) -> None:
        check_adaptive_options(
            dict(
                safety=safety,
                shrink=shrink,
                idle_shrink=idle_shrink,
                idle_reach=idle_reach,
                floor=floor,
                max_relative_step=max_relative_step,
            )
        )
        self.safety = safety
        self.shrink = shrink
        self.idle_shrink = idle_shrink
        self.idle_reach = idle_reach
        self.max_relative_step = max_relative_step
        self.floor = floor
        self.ceiling = [1.0 if c else float("inf") for c in certified]
        self.multipliers: Tensor | None = None
        self.pending: dict[int, _Pending] = {}
        self.measured = [False] * len(certified)
        self.anchors: Tensor | None = None  # multipliers at their last measurement (floor until then)

    def constants(self, base: Tensor) -> Tensor:
        """``m ⊙ base`` (multipliers start at 1)."""
        if self.multipliers is None:
            self.multipliers = torch.ones_like(base)
        self.multipliers = self.multipliers.to(device=base.device, dtype=base.dtype)
        return self.multipliers * base

    def curvature(self, index: int, new_grad: Tensor) -> Tensor:
        """``κ`` met along layer ``index``'s pending step, from its new gradient (block matrix)."""
        pending = self.pending[index]
        return ((new_grad.to(pending.step.dtype) * pending.step).sum() - pending.grad_dot_step) / pending.step_norm_sq

    def observe(self, curvatures: dict[int, Tensor], base: Tensor) -> None:
        """Correct the multiplier of every layer that moved last step from the curvature met along
        its step (``curvatures[i]``, see ``curvature``); ``base`` are the current base constants."""
        if self.multipliers is None or not self.pending:
            return
        ceiling = device_constant(tuple(self.ceiling), base.dtype, base.device)
        if self.anchors is None:
            self.anchors = torch.full_like(self.multipliers, self.floor / self.idle_reach)
        idle = [i for i in range(len(self.measured)) if i not in self.pending]
        if idle:
            lowest = (self.anchors[idle] * self.idle_reach).clamp(min=self.floor)
            self.multipliers[idle] = torch.maximum(self.multipliers[idle] * self.idle_shrink, lowest)
        for i in self.pending:
            curvature = curvatures.get(i)
            if curvature is None:
                continue
            target = self.safety * curvature
            used = self.multipliers[i] * base[i]  # the model's constant, before any step cap
            new_constant = torch.where(target > used, target, torch.maximum(target, self.shrink * used))
            multiplier = (new_constant / base[i]).clamp(min=self.floor)
            multiplier = torch.where(torch.isfinite(multiplier), multiplier, self.multipliers[i])
            self.multipliers[i] = torch.minimum(multiplier, ceiling[i])
            self.anchors[i] = self.multipliers[i]
            self.measured[i] = True
        self.pending = {}

    def remember(self, index: int, step: Tensor, grad_dot_step: Tensor, step_norm: Tensor, constant: Tensor) -> None:
        """Layer ``index`` moved by ``step`` (block matrix) under ``constant``; ``grad_dot_step`` is
        ``⟨g_i(w), step⟩`` at its gradient before the move and ``step_norm`` is ``‖step‖_(i)``."""
        self.pending[index] = _Pending(
            step=step.detach(),
            grad_dot_step=grad_dot_step,
            step_norm_sq=step_norm.square(),
            constant=constant.detach(),
        )

    def grow(self, index: int, factor: float) -> None:
        """Multiply one layer's multiplier (after an undone step)."""
        if self.multipliers is not None:
            self.multipliers[index] = torch.clamp(self.multipliers[index] * factor, max=self.ceiling[index])

    def state_dict(self) -> dict:
        return {
            "multipliers": self.multipliers,
            "measured": list(self.measured),
            "anchors": self.anchors,
            "pending": {i: vars(p) for i, p in self.pending.items()},
        }

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        m = state["multipliers"]
        self.multipliers = None if m is None else m.to(device)
        self.measured = list(state["measured"])
        self.anchors = None if state["anchors"] is None else state["anchors"].to(device)
        self.pending = {
            int(i): _Pending(**{k: v.to(device) for k, v in fields.items()}) for i, fields in state["pending"].items()
        }


class TrustRegion:
    """Uncertified constants are estimates: raise ``L_i`` where needed so that a step moves its
    layer by at most ``max_relative_step · max(‖[W_i, b_i]‖, 1)`` (``‖Δ_i‖ = η ‖g_i‖_* / L_i``) — a
    trust region against an estimate far below the curvature (before the first measurement) or
    driven down by mini-batch noise (after it). The weight norms are upper bounds followed across
    steps ([NormBounds][lightning_dsgd.norm_bounds.NormBounds]), with a loose tolerance (the region
    is a heuristic): few exact norms (SVDs) when every layer moves every step. On device, no host sync.
    """

    def __init__(
        self, layers: Sequence[Layer], geometry_of: Callable[[Layer], Geometry], max_relative_step: float
    ) -> None:
        self.layers = list(layers)
        self._geometry_of = geometry_of
        self.max_relative_step = max_relative_step
        self.weight_norms = NormBounds(self._exact_weight_norms, tolerance=0.25)
        self.radii: Tensor | None = None  # this step's max_relative_step · max(‖[W_i, b_i]‖, 1)

    def cap(self, constants: Tensor, dual_norms: Tensor, etas: Sequence[float]) -> Tensor:
        """``max(L_i, η_i ‖g_i‖_* / r_i)`` with the radii ``r_i = max_relative_step ·
        max(‖[W_i, b_i]‖, 1)`` (kept in ``radii`` for steps along another direction)."""
        # One η (the usual case, scheduled or not) multiplies as a Python number: no upload per value.
        eta = etas[0] if len(set(etas)) == 1 else device_constant(tuple(etas), dual_norms.dtype, dual_norms.device)
        self.radii = self.max_relative_step * self._block_norms().to(dual_norms.dtype).clamp(min=1.0)
        return torch.maximum(constants, eta * dual_norms / self.radii)

    def limit(self, index: int, scale: Tensor, direction_norm: Tensor) -> Tensor:
        """The step size ``scale`` along a direction of norm ``direction_norm`` (momentum's
        velocity, up to ``1/(1 − μ)`` longer than ``ρ(g)``), cut to the layer's radius."""
        assert self.radii is not None, "cap() sets this step's radii"
        tiny = torch.finfo(direction_norm.dtype).tiny
        return torch.minimum(scale, self.radii[index] / direction_norm.clamp(min=tiny))

    def before_step(self, layer: Layer) -> tuple:
        """The version of the layer's weight and bias before a step (see ``after_step``)."""
        return block_key(layer)

    def after_step(self, index: int, before: tuple, bound: Tensor, step_shape: Sequence[int]) -> None:
        """Advance the weight-norm bound of layer ``index`` by ``bound ≥ ‖Δ‖`` (triangle inequality)."""
        layer = self.layers[index]
        self.weight_norms.advance(index, before, block_key(layer), bound, layer.weight.dtype, min(step_shape))

    def _block_norms(self) -> Tensor:
        """Upper bounds on ``‖[W_i, b_i]‖_(i)`` of every layer, followed across steps."""
        keys = [block_key(layer) for layer in self.layers]
        return torch.stack(self.weight_norms.values(range(len(self.layers)), keys))

    def _exact_weight_norms(self, indices: list[int]) -> Tensor:
        values = []
        for i in indices:
            layer = self.layers[i]
            weight = layer.weight_matrix(full(layer.weight.detach()))
            bias = None if layer.bias is None else layer.bias_vector(full(layer.bias.detach()))
            values.append(self._geometry_of(layer).norm(augment(weight, bias)))
        return torch.stack(values)


def block_key(layer: Layer) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Changes whenever the layer's weight or bias is written."""
    return version_key(layer.weight), None if layer.bias is None else version_key(layer.bias)
