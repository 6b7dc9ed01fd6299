"""``constants="adaptive"``: per-layer constants corrected by the curvature actually met.

``L_i = m_i · base_i(w)``, where ``base`` is another regime: the certified constants where they
exist, otherwise the estimate ([lightning_dsgd.constants][]). After layer ``i`` moved by ``Δ``
under the constant ``L``, the next gradient of that layer gives the curvature met along the step
(the mean of the Hessian's quadratic form over the segment, exact in full batch)::

    κ = ⟨g_i(w + Δ) − g_i(w), Δ⟩ / ‖Δ‖²_(i)

and the multiplier follows ``target = safety · κ``: it **grows at once** when the step
disappointed (``target > L``: ``L ← target``) and **shrinks slowly** when it was safe
(``L ← max(target, shrink · L)``). A layer that did not move shrinks by ``idle_shrink`` per step
(0.9; 0.8 full batch, where measurements are exact), so a layer whose constant is too
pessimistic to ever be chosen greedily gets tried, and measured (every step stays within the
trust region ``max_relative_step``, see [TrustRegion][lightning_dsgd.adaptive.TrustRegion]);
once measured, idling takes it at most to ``idle_reach`` times its last measured value — by
default 1.0, i.e. a measured layer keeps its constant until it moves again. (0.7 reaches low
losses faster on tanh MLPs but made a transformer stall and cyclic selection diverge on a CNN and
a transformer in ``benchmarks/harness.py``.) Certified layers never go above their certified
constant (``m ≤ 1``). Everything stays on the device: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_dsgd.distributed import Reducer, version_key
from lightning_dsgd.geometry import BlockGrad, BlockStep, Geometry, augment, batches, block_inner
from lightning_dsgd.input_norms import InputNormRecorder
from lightning_dsgd.layers import Layer
from lightning_dsgd.norm_bounds import NormBounds
from lightning_dsgd.precision import device_constant

if TYPE_CHECKING:  # constants.py builds this regime around its own
    from lightning_dsgd.constants import BatchInputs, ConstantModel


@dataclass
class PendingStep:
    """A step awaiting its curvature measurement (at the layer's next gradient)."""

    # Δ, as the block matrix or its (weight part, bias column) (a stand-in on a rank that did not
    # compute it, and once measured)
    step: BlockStep
    grad_dot_step: Tensor  # ⟨g_i(w), Δ⟩
    step_norm_sq: Tensor  # ‖Δ‖²_(i)
    constant: Tensor  # the L used for the step

    def block(self) -> Tensor:
        """Δ as the block matrix ``[ΔW, Δb]`` (how a checkpoint holds it)."""
        return self.step if isinstance(self.step, Tensor) else augment(*self.step)

    def release(self) -> None:
        """Drop Δ once measured (an empty stand-in stays)."""
        self.step = (self.step if isinstance(self.step, Tensor) else self.step[0]).new_empty(0)


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
    """The adaptive regime: ``L_i = m_i · base_i(w)`` with ``base`` another regime (certified where
    one exists, else estimated), within a [TrustRegion][lightning_dsgd.adaptive.TrustRegion]; it
    owns the multipliers, the steps awaiting their curvature and the trust region, and speaks the
    [ConstantModel][lightning_dsgd.constants.ConstantModel] protocol. Not certified."""

    certified = False

    def __init__(
        self,
        base: ConstantModel,
        layers: Sequence[Layer],
        geometry_of: Callable[[Layer], Geometry],
        *,
        full_batch: bool = False,
        safety: float = 1.0,
        shrink: float = 0.5,
        idle_shrink: float | None = None,
        idle_reach: float = 1.0,
        floor: float = 1e-3,
        max_relative_step: float = 0.2,
    ) -> None:
        # Full batch, curvature measurements are exact: idle layers can be tried sooner.
        idle_shrink = (0.8 if full_batch else 0.9) if idle_shrink is None else idle_shrink
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
        self.base = base
        self.layers = list(layers)
        self.safety = safety
        self.shrink = shrink
        self.idle_shrink = idle_shrink
        self.idle_reach = idle_reach
        self.max_relative_step = max_relative_step
        self.floor = floor
        # Certified base constants are bounds already: never go above them (m ≤ 1).
        self.ceiling = [1.0 if base.certified else float("inf")] * len(self.layers)
        self.multipliers: Tensor | None = None
        self.pending: dict[int, PendingStep] = {}
        self.measured = [False] * len(self.layers)
        self.anchors: Tensor | None = None  # multipliers at their last measurement (floor until then)
        self.trust_region = TrustRegion(self.layers, geometry_of, max_relative_step)

    # ------------------------------------------------------------------ the base regime's inputs
    @property
    def recorder(self) -> InputNormRecorder:
        return self.base.recorder

    @property
    def reduce_max(self) -> Reducer | None:
        return self.base.reduce_max

    @reduce_max.setter
    def reduce_max(self, reducer: Reducer | None) -> None:
        self.base.reduce_max = reducer

    def take_batch(self) -> BatchInputs:
        return self.base.take_batch()

    # ------------------------------------------------------------------ the constants
    measures_curvature = True

    def base_constants(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The base regime's constants (before the multipliers); the trust region's weight norms are
        brought up to date with them (both read only the weights: DSGD asks before it gathers any
        full gradient, so their exact norms' workspaces never add to the gradients')."""
        self.trust_region.prepare()
        return self.base.base_constants(batch, dtype, device)

    def curvatures(self, grads: list[BlockGrad | None]) -> dict[int, Tensor]:
        """The curvature met along each pending step, for the layers whose new gradient is in
        ``grads`` (see [curvature][lightning_dsgd.adaptive.AdaptiveConstants.curvature]). Measured
        once: each measured step is released (a stand-in), the multipliers read only the curvatures
        (shared work measures its layers one at a time, [lightning_dsgd.plan][])."""
        measured = {}
        for i, pending in self.pending.items():
            if (grad := grads[i]) is not None:
                measured[i] = self.curvature(i, grad)
                pending.release()
        return measured

    def adjust(self, base: Tensor, curvatures: Mapping[int, Tensor], dual_norms: Tensor, etas: list[float]) -> Tensor:
        """This step's constants (in the dtype of ``dual_norms``): the multipliers first see the
        curvatures met against the current ``base`` constants, and ``m ⊙ base`` is capped by the
        trust region."""
        self.observe(curvatures, base)
        constants = self.constants(base).to(dual_norms.dtype)
        return self.trust_region.cap(constants, dual_norms, etas)

    def constants(self, base: Tensor) -> Tensor:
        """``m ⊙ base`` (multipliers start at 1)."""
        if self.multipliers is None:
            self.multipliers = torch.ones_like(base)
        self.multipliers = self.multipliers.to(device=base.device, dtype=base.dtype)
        return self.multipliers * base

    def curvature(self, index: int, new_grad: tuple[Tensor, Tensor | None]) -> Tensor:
        """``κ`` met along layer ``index``'s pending step, from its new gradient ``(W, b)``."""
        pending = self.pending[index]
        return (block_inner(new_grad, pending.step) - pending.grad_dot_step) / pending.step_norm_sq

    def observe(self, curvatures: Mapping[int, Tensor], base: Tensor) -> None:
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
        moved = [i for i in self.pending if i in curvatures]
        self.pending = {}
        if not moved:
            return
        # Every measured layer at once (element-wise, as one layer at a time: the same values).
        index = device_constant(tuple(moved), torch.int64, base.device)
        target = self.safety * torch.stack([curvatures[i] for i in moved])
        old, base_moved = self.multipliers[index], base[index]
        used = old * base_moved  # the model's constant, before any step cap
        new_constant = torch.where(target > used, target, torch.maximum(target, self.shrink * used))
        multiplier = (new_constant / base_moved).clamp(min=self.floor)
        multiplier = torch.where(torch.isfinite(multiplier), multiplier, old)
        self.multipliers[index] = torch.minimum(multiplier, ceiling[index]).to(self.multipliers.dtype)
        self.anchors[index] = self.multipliers[index]
        for i in moved:
            self.measured[i] = True

    # ------------------------------------------------------------------ the steps taken
    def before_step(self, index: int) -> tuple:
        """What [after_step][lightning_dsgd.adaptive.AdaptiveConstants.after_step] needs of layer
        ``index`` before it moves: the base regime's, and the versions of its weight and bias."""
        return self.base.before_step(index), block_key(self.layers[index])

    def after_step(
        self,
        index: int,
        before: tuple,
        bound: Tensor,
        step: BlockStep,
        grad_dot_step: Tensor | None,
        step_norm: Tensor,
        constant: Tensor,
        shape: Sequence[int] | None = None,
    ) -> None:
        """Layer ``index`` moved by the block ``step`` (``‖step‖ ≤ bound``; ``step_norm`` as
        computed) under ``constant``, with ``⟨g, step⟩ = grad_dot_step`` at the gradient before it:
        the base regime and the trust region follow their norms, and the curvature along the step
        is measured at the next gradient. ``shape``: the block's, where ``step`` is a stand-in (the
        rank that computed the step keeps it, see [lightning_dsgd.plan][]) or split in parts."""
        base_before, block_before = before
        self.base.after_step(index, base_before, bound, step, grad_dot_step, step_norm, constant, shape)
        if shape is None:
            assert isinstance(step, Tensor), "a step split in parts comes with its block's shape"
            shape = step.shape
        self.trust_region.after_step(index, block_before, bound, shape)
        assert grad_dot_step is not None, "adaptive constants need ⟨g, step⟩ (measures_curvature)"
        self.remember(index, step, grad_dot_step, step_norm, constant)

    def remember(self, index: int, step: BlockStep, grad_dot_step: Tensor, step_norm: Tensor, constant: Tensor) -> None:
        """Layer ``index`` moved by ``step`` (block step) under ``constant``; ``grad_dot_step`` is
        ``⟨g_i(w), step⟩`` at its gradient before the move and ``step_norm`` is ``‖step‖_(i)``."""
        self.pending[index] = PendingStep(
            step=step.detach() if isinstance(step, Tensor) else step,
            grad_dot_step=grad_dot_step,
            step_norm_sq=step_norm.square(),
            constant=constant.detach(),
        )

    def followed_norms(self) -> list[tuple[NormBounds, list[int], list[Hashable]]]:
        """The base regime's followed norms and the trust region's."""
        return self.base.followed_norms() + self.trust_region.followed_norms()

    def limit(self, index: int, scale: Tensor, direction_norm: Tensor) -> Tensor:
        """The step size along another direction than ``ρ(g)``, cut to the trust region."""
        return self.trust_region.limit(index, scale, direction_norm)

    def grow(self, index: int, factor: float) -> None:
        """Multiply one layer's multiplier (after an undone step)."""
        if self.multipliers is not None:
            self.multipliers[index] = torch.clamp(self.multipliers[index] * factor, max=self.ceiling[index])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            **self.base.state_dict(),
            "adaptive": {
                "multipliers": self.multipliers,
                "measured": list(self.measured),
                "anchors": self.anchors,
                "pending": {i: {**vars(p), "step": p.block()} for i, p in self.pending.items()},
            },
            "weight_norms": self.trust_region.state_dict(),
        }

    def load_state_dict(self, state: Mapping, device: torch.device) -> None:
        self.base.load_state_dict(state, device)
        self.trust_region.load_state_dict(state.get("weight_norms", {}), device)
        adaptive = state.get("adaptive")
        if adaptive is None:
            return
        self._check_state(adaptive)
        m = adaptive["multipliers"]
        self.multipliers = None if m is None else m.to(device, copy=True)
        self.measured = list(adaptive["measured"])
        self.anchors = None if adaptive["anchors"] is None else adaptive["anchors"].to(device, copy=True)
        self.pending = {
            int(i): PendingStep(**{k: v.to(device, copy=True) for k, v in fields.items()})
            for i, fields in adaptive["pending"].items()
        }

    def _check_state(self, state: Mapping) -> None:
        """Refuse adaptive state saved for other layers (a size mismatch would surface steps later)."""
        n = len(self.layers)
        multipliers = state.get("multipliers")
        problem = None
        if multipliers is not None and multipliers.shape != (n,):
            problem = f"{multipliers.numel()} layers, this model has {n}"
        for i, pending in state.get("pending", {}).items():
            layer = self.layers[int(i)] if int(i) < n else None
            shape = None if layer is None else (layer.weight_matrix(layer.weight).shape[0], layer.in_features + 1)
            step = tuple(pending["step"].shape)
            if shape is None or step[0] != shape[0] or step[1] not in (shape[1], shape[1] - 1):
                problem = f"a pending step of shape {list(step)} for layer {i}, which is {list(shape or [])} here"
        if problem is not None:
            raise ValueError(
                f"The adaptive constants' state was saved for another model ({problem}): resume with the model "
                "it was saved with, or start a new optimizer for this one."
            )


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
        self.weight_norms = NormBounds(
            tolerance=0.25,
            reads=lambda i: [p.detach() for p in self.layers[i].params],
            exact=self._exact_weight_norms,
        )
        self.radii: Tensor | None = None  # this step's max_relative_step · max(‖[W_i, b_i]‖, 1)
        self._prepared: tuple[list, Tensor] | None = None  # (block keys, their norms) from prepare()

    def cap(self, constants: Tensor, dual_norms: Tensor, etas: Sequence[float]) -> Tensor:
        """``max(L_i, η_i ‖g_i‖_* / r_i)`` with the radii ``r_i = max_relative_step ·
        max(‖[W_i, b_i]‖, 1)`` (kept in ``radii`` for steps along another direction)."""
        # One η (the usual case, scheduled or not) multiplies as a Python number: no upload per value.
        eta = etas[0] if len(set(etas)) == 1 else device_constant(tuple(etas), dual_norms.dtype, dual_norms.device)
        prepared, self._prepared = self._prepared, None
        keys = [block_key(layer) for layer in self.layers]
        norms = prepared[1] if prepared is not None and prepared[0] == keys else self._block_norms()
        self.radii = self.max_relative_step * norms.to(dual_norms.dtype).clamp(min=1.0)
        return torch.maximum(constants, eta * dual_norms / self.radii)

    def prepare(self) -> None:
        """Bring the weight-norm bounds up to date now (once per step: a second call would read the
        previous call's growth check); ``cap`` takes them while the weights are unchanged."""
        keys = [block_key(layer) for layer in self.layers]
        if self._prepared is None or self._prepared[0] != keys:
            self._prepared = (keys, self._block_norms())

    def limit(self, index: int, scale: Tensor, direction_norm: Tensor) -> Tensor:
        """The step size ``scale`` along a direction of norm ``direction_norm`` (momentum's
        velocity, up to ``1/(1 − μ)`` longer than ``ρ(g)``), cut to the layer's radius."""
        assert self.radii is not None, "cap() sets this step's radii"
        tiny = torch.finfo(direction_norm.dtype).tiny
        return torch.minimum(scale, self.radii[index] / direction_norm.clamp(min=tiny))

    def after_step(self, index: int, before: tuple, bound: Tensor, step_shape: Sequence[int]) -> None:
        """Advance the weight-norm bound of layer ``index`` by ``bound ≥ ‖Δ‖`` (triangle inequality),
        from the ``block_key`` of its weight and bias ``before`` the step."""
        layer = self.layers[index]
        self.weight_norms.advance(index, before, block_key(layer), bound, layer.weight.dtype, min(step_shape))

    def state_dict(self) -> dict:
        """The followed weight-norm bounds (a resumed run caps its steps alike)."""
        return self.weight_norms.state_dict()

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self._prepared = None
        self.weight_norms.load_state_dict(state, device)

    def _block_norms(self) -> Tensor:
        """Upper bounds on ``‖[W_i, b_i]‖_(i)`` of every layer, followed across steps."""
        keys = [block_key(layer) for layer in self.layers]
        return torch.stack(self.weight_norms.values(range(len(self.layers)), keys))

    def followed_norms(self) -> list[tuple[NormBounds, list[int], list[Hashable]]]:
        """The weight-norm bounds, the layers they cover and those layers' versions now."""
        return [(self.weight_norms, list(range(len(self.layers))), [block_key(layer) for layer in self.layers])]

    def _exact_weight_norms(self, indices: list[int], tensors: list[list[Tensor]]) -> Tensor:
        """``‖[W_i, b_i]‖_(i)`` from the full parameters; same-geometry blocks measured together
        (same-shape spectral blocks in one batched SVD)."""
        by_geometry: dict[int, tuple[Geometry, list[int]]] = {}
        for k, i in enumerate(indices):
            geometry = self._geometry_of(self.layers[i])
            by_geometry.setdefault(id(geometry), (geometry, []))[1].append(k)
        values: list[Tensor | None] = [None] * len(indices)
        for geometry, same in by_geometry.values():
            for ks in batches(same, tensors[same[0]][0].device):  # the [W, b] copies of one batch at a time
                blocks = [self._block(indices[k], tensors[k]) for k in ks]
                for k, value in zip(ks, geometry.norms(blocks), strict=True):
                    values[k] = value
        return torch.stack([v for v in values if v is not None])

    def _block(self, index: int, params: list[Tensor]) -> Tensor:
        layer = self.layers[index]
        bias = None if layer.bias is None else layer.bias_vector(params[1])
        return augment(layer.weight_matrix(params[0]), bias)


def block_key(layer: Layer) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """Changes whenever the layer's weight or bias is written."""
    return version_key(layer.weight), None if layer.bias is None else version_key(layer.bias)
