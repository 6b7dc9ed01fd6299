"""Where each step's ``L_i(w)`` come from: the constant regimes behind ``constants=``, one type each.

* [CertifiedConstants][lightning_dsgd.constants.CertifiedConstants] — ``"data"`` on a rigorous
  chain: the certified MLP constants of [lightning_dsgd.smoothness][], each layer's input bounded
  by its largest norm in the batch.
* [ArchitectureConstants][lightning_dsgd.constants.ArchitectureConstants] — ``"architecture"``
  on a rigorous chain: the same constants with the inputs bounded from ``data_bound`` through the
  activations (only the first layer's input is measured).
* [EstimatedConstants][lightning_dsgd.constants.EstimatedConstants] — outside the rigorous class:
  ``H · R_i²`` from the layer's measured input bound ``R_i``, as if the layer fed the loss directly.
  Not certified, so never used alone.
* [AdaptiveConstants][lightning_dsgd.adaptive.AdaptiveConstants] — ``"adaptive"``, or ``"data"``
  outside the rigorous class: one of the above (certified where it exists, else estimated) times
  multipliers corrected by the curvature met, within a trust region. Not certified.

[make_constant_model][lightning_dsgd.constants.make_constant_model] picks the regime from the
chain and ``constants=``. The optimizer talks to the one object it returns through the protocol
[ConstantModel][lightning_dsgd.constants.ConstantModel], whose names are stable:

* ``certified`` — every constant it gives is a certified bound (the step's guarantee may hold);
* ``recorder`` — the [InputNormRecorder][lightning_dsgd.input_norms.InputNormRecorder] of the
  layers' input norms (``reset``, ``enabled``, ``remove``, ``precision_reason``);
* ``reduce_max`` — the MAX all-reduce over data-parallel ranks (``None``: one process);
* ``take_batch()`` — the batch's input and rank bounds, once per step, before the dual norms;
* this step's constants, one per layer, in three stages (so that, with shared work, each rank
  measures its own layers and the measurements travel in the step's one collective,
  [lightning_dsgd.plan][]): ``base_constants(batch, dtype, device)`` — the regime's constants
  before any correction; ``curvatures(grads)`` — the curvature met along each pending step whose
  new gradient is in ``grads`` (``{}`` outside the adaptive regime); ``adjust(base, curvatures,
  dual_norms, etas)`` — the constants used (``base`` itself outside the adaptive regime);
* ``measures_curvature`` — whether ``after_step`` needs ``⟨g, Δ⟩`` (the adaptive regime);
  ``pending`` — the steps awaiting their curvature, by layer (empty outside the adaptive regime);
* ``before_step(index)`` / ``after_step(index, before, bound, step, grad_dot_step, step_norm,
  constant, shape)`` — around each layer's step (what moved, to follow norms and measure
  curvature; ``step`` may be a stand-in of the block ``shape`` on a rank that did not compute it,
  or the block's weight part and bias column, with ``shape``);
* ``limit(index, scale, direction_norm)`` — the step size along a direction other than ``ρ(g)``
  (momentum), cut where the regime bounds steps;
* ``grow(index, factor)`` — a step of layer ``index`` broke its promise and was undone;
* ``state_dict()`` / ``load_state_dict(state, device)`` — what a resumed run needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dsgd.adaptive import AdaptiveConstants, PendingStep
from lightning_dsgd.chain import Chain
from lightning_dsgd.distributed import Reducer, version_key
from lightning_dsgd.geometry import BlockGrad, BlockStep, Geometry, reduction_dtype
from lightning_dsgd.input_norms import InputNormRecorder
from lightning_dsgd.layers import Layer
from lightning_dsgd.norm_bounds import NormBounds
from lightning_dsgd.precision import device_constant
from lightning_dsgd.smoothness import LossBounds, architecture_input_bounds, mlp_constants

#: Input bound assumed for blocks whose input is not measured: an embedding reads one-hot rows
#: (‖e_j‖ = 1), a normalisation affine reads standardised values (|x̂| ≲ 3, with the bias 1).
UNMEASURED_INPUT_BOUND = {"embedding": 1.0, "norm": math.sqrt(10.0), "parameter": 1.0}


@dataclass(frozen=True)
class BatchInputs:
    """What the forward hooks recorded for the batch being stepped on, MAX-reduced over ranks:
    ``input_bounds[i]`` bounds the norm of layer ``i``'s augmented input (``None``: not measured);
    ``rank_bounds[i]`` bounds the rank of its gradient (``None``: unknown)."""

    input_bounds: list[Tensor | None] | None
    rank_bounds: list[int | None]


class ConstantModel(Protocol):
    """What the optimizer asks of a constant regime (see the module docstring)."""

    certified: bool
    recorder: InputNormRecorder
    reduce_max: Reducer | None

    measures_curvature: bool

    @property
    def pending(self) -> Mapping[int, PendingStep]: ...

    def take_batch(self) -> BatchInputs: ...

    def base_constants(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor: ...

    def curvatures(self, grads: list[BlockGrad | None]) -> dict[int, Tensor]: ...

    def adjust(
        self, base: Tensor, curvatures: Mapping[int, Tensor], dual_norms: Tensor, etas: list[float]
    ) -> Tensor: ...

    def before_step(self, index: int) -> tuple: ...

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
    ) -> None: ...

    def limit(self, index: int, scale: Tensor, direction_norm: Tensor) -> Tensor: ...

    def followed_norms(self) -> list[tuple[NormBounds, list[int], list[Hashable]]]: ...

    def grow(self, index: int, factor: float) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping, device: torch.device) -> None: ...


def make_constant_model(
    layers: list[Layer],
    geometry: Geometry,
    loss: LossBounds,
    chain: Chain | None,
    mode: str,
    data_bound: float | None,
    adaptive_options: Mapping[str, float] | None,
    geometry_of: Callable[[Layer], Geometry],
    full_batch: bool = False,
) -> ConstantModel:
    """The regime of ``constants=mode`` on ``layers`` (``chain``: the rigorous chain they form, if
    any): certified constants on a chain unless ``"adaptive"``, the adaptive ones around them (or
    around the estimates, off a chain) otherwise."""
    if chain is None or mode == "adaptive":
        base: _Measured = (
            EstimatedConstants(layers, geometry, loss, mode)
            if chain is None
            else CertifiedConstants(layers, geometry, loss, chain, mode)
        )
        return AdaptiveConstants(base, layers, geometry_of, full_batch=full_batch, **(adaptive_options or {}))
    if adaptive_options:
        raise ValueError(
            f"adaptive_options={dict(adaptive_options)} tune the adaptive constants, but constants={mode!r} "
            "are certified and fixed: drop adaptive_options, or use constants='adaptive'."
        )
    if mode == "architecture":
        return ArchitectureConstants(layers, geometry, loss, chain, data_bound)
    return CertifiedConstants(layers, geometry, loss, chain, mode)


class _Measured:
    """What every regime shares: the recorder of the layers' input norms (``recorded``, a prefix of
    ``layers``) and the batch's bounds taken from it, MAX-reduced over ranks by ``reduce_max``."""

    certified = False

    def __init__(
        self, layers: list[Layer], geometry: Geometry, loss: LossBounds, mode: str, recorded: Sequence[Layer]
    ) -> None:
        self.layers = layers
        self.geometry = geometry
        self.mode = mode  # the constants= it serves (for messages)
        self.g, self.h = loss.bounds(geometry.activation_norm)
        self.reduce_max: Reducer | None = None
        self.recorder = InputNormRecorder(recorded, geometry.activation_norm)

    def take_batch(self) -> BatchInputs:
        """The recorded input bounds of this step's batch (MAX-reduced over ranks) and the
        gradients' rank bounds (the input rows, times the number of data-parallel ranks); the
        recorder starts afresh."""
        # Only the spectral geometry uses rank bounds.
        rows = [r if layer.norm == "spectral" else None for layer, r in zip(self.layers, self._rows(), strict=True)]
        counted = [i for i, r in enumerate(rows) if r is not None]
        if self.reduce_max is not None and counted:
            # Every rank must sketch alike: its rank bound is the largest local count × world size.
            local = device_constant(tuple(float(rows[i]) for i in counted), torch.float64, self.layers[0].weight.device)
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            for i, r in zip(counted, self.reduce_max(local).tolist(), strict=True):
                rows[i] = int(r) * world
        return BatchInputs(self._take_input_norms(), rows)

    def _rows(self) -> list[int | None]:
        """The input rows each layer multiplied in this batch."""
        return self.recorder.rows

    def _take_input_norms(self) -> list[Tensor | None] | None:
        maxima = list(self.recorder.maxima)
        watched = [i for i, layer in enumerate(self.recorder.layers) if layer.kind in InputNormRecorder.WATCHED]
        reduced = self._needed(maxima, watched)
        self.recorder.reset()
        if reduced is None:
            return None
        if reduced:
            stacked = torch.stack([maxima[i] for i in reduced])  # type: ignore[misc]
            if self.reduce_max is not None:
                stacked = self.reduce_max(stacked)
            for k, i in enumerate(reduced):
                maxima[i] = stacked[k]
        return maxima

    def _needed(self, maxima: list[Tensor | None], watched: list[int]) -> list[int] | None:
        """The watched layers whose bounds this regime uses (``None``: none, for this batch);
        raises when the batch lacks one it cannot do without."""
        if any(maxima[i] is None for i in watched):
            self._no_forward()
        return watched

    def _no_forward(self) -> NoReturn:
        raise RuntimeError(
            f"constants={self.mode!r} needs the input norms of the batch being stepped on, and no "
            "forward pass with gradients enabled ran since the last step. Run the forward "
            "(and backward) before step(), e.g. inside the closure, or use constants='architecture'."
        )

    # ------------------------------------------------------------------ the protocol's defaults
    measures_curvature = False

    @property
    def pending(self) -> Mapping[int, PendingStep]:
        """No step awaits a curvature measurement."""
        return {}

    def curvatures(self, grads: list[BlockGrad | None]) -> dict[int, Tensor]:
        """No curvature is measured."""
        return {}

    def adjust(self, base: Tensor, curvatures: Mapping[int, Tensor], dual_norms: Tensor, etas: list[float]) -> Tensor:
        """The constants are ``base`` itself (in the dtype of ``dual_norms``)."""
        return base.to(dual_norms.dtype)

    def before_step(self, index: int) -> tuple:
        """What [after_step][lightning_dsgd.constants.CertifiedConstants.after_step] needs of
        layer ``index`` before it moves: the version of its weight."""
        return version_key(self.layers[index].weight)

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
        """Layer ``index`` moved by ``step`` with ``‖step‖ ≤ bound``: nothing to follow here."""

    def followed_norms(self) -> list[tuple[NormBounds, list[int], list[Hashable]]]:
        """No norm is followed across steps."""
        return []

    def limit(self, index: int, scale: Tensor, direction_norm: Tensor) -> Tensor:
        """Steps are not bounded: the step size stays ``scale``."""
        return scale

    def grow(self, index: int, factor: float) -> None:
        """Fixed constants do not grow."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping, device: torch.device) -> None:
        """Nothing to restore ("measured_data_bound" of older checkpoints is not used: each step
        measures its own batch)."""


class CertifiedConstants(_Measured):
    """The certified MLP constants of a rigorous chain
    ([mlp_constants][lightning_dsgd.smoothness.mlp_constants]), each layer's input bounded by its
    largest norm in the batch; the operator norms ``a_j`` are followed across DSGD's own steps
    ([NormBounds][lightning_dsgd.norm_bounds.NormBounds])."""

    certified = True

    def __init__(
        self,
        layers: list[Layer],
        geometry: Geometry,
        loss: LossBounds,
        chain: Chain,
        mode: str,
        recorded: Sequence[Layer] | None = None,
    ) -> None:
        super().__init__(layers, geometry, loss, mode, layers if recorded is None else recorded)
        self.chain = chain
        self.operator_norms = NormBounds(
            reads=lambda j: [layers[j].weight.detach()],
            exact=lambda indices, tensors: self.geometry.operator_norms([t[0] for t in tensors]),
        )
        self._s_tensors: tuple[tuple[torch.dtype, torch.device], Tensor, Tensor] | None = None
        self._s1 = [0.0] + [a.s1 for a in chain.activations[1:]]  # type: ignore[union-attr]
        self._s2 = [0.0] + [a.s2 for a in chain.activations[1:]]  # type: ignore[union-attr]

    def base_constants(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor:
        """This step's certified constants, in ``dtype``."""
        norms = self._operator_norms().to(dtype)
        s1, s2 = self._activation_bounds(norms)
        return mlp_constants(norms, self._input_bounds(batch, dtype, device), s1, s2, self.g, self.h)

    def _input_bounds(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``‖[x_i; 1]‖`` of every layer's input in this batch."""
        return torch.stack([b.to(device=device, dtype=dtype) for b in batch.input_bounds])  # type: ignore[union-attr]

    def _activation_bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``s1``, ``s2`` of the chain as tensors like ``like`` (made once per dtype and device)."""
        key = (like.dtype, like.device)
        if self._s_tensors is None or self._s_tensors[0] != key:
            self._s_tensors = (key, like.new_tensor(self._s1), like.new_tensor(self._s2))
        return self._s_tensors[1], self._s_tensors[2]

    def _operator_norms(self) -> Tensor:
        """``a_j`` of every layer above the first (``a_0`` never enters a constant): exact for a
        weight changed from outside (its version counter moved), else followed across DSGD's own
        steps by [after_step][lightning_dsgd.constants.CertifiedConstants.after_step] (see
        [lightning_dsgd.norm_bounds][])."""
        (_, above, keys), *_ = self.followed_norms()
        values = self.operator_norms.values(above, keys)
        first = self.layers[0].weight
        zero = torch.zeros((), dtype=reduction_dtype(first.dtype), device=first.device)
        return torch.stack([zero] + [v.to(zero.dtype) for v in values])

    def followed_norms(self) -> list[tuple[NormBounds, list[int], list[Hashable]]]:
        """The operator-norm bounds, of every layer above the first, and their weights' versions."""
        above = list(range(1, len(self.layers)))
        return [(self.operator_norms, above, [version_key(self.layers[j].weight) for j in above])]

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
        """Layer ``index`` moved by a block step with ``‖Δ‖_(i) ≤ bound`` from weight version
        ``before``: its operator norm (never above the layer norm) follows by the triangle
        inequality where recomputing it would take an SVD."""
        if not self.geometry.expensive_operator_norm:
            return
        weight = self.layers[index].weight
        self.operator_norms.advance(
            index, before, version_key(weight), bound, weight.dtype, min(self.layers[index].weight_matrix(weight).shape)
        )

    def state_dict(self) -> dict:
        return {"operator_norms": self.operator_norms.state_dict()}

    def load_state_dict(self, state: Mapping, device: torch.device) -> None:
        self.operator_norms.load_state_dict(state.get("operator_norms", {}), device)


class ArchitectureConstants(CertifiedConstants):
    """``constants="architecture"``: the certified constants with every input bounded from
    ``‖x‖`` through the activations ([architecture_input_bounds][lightning_dsgd.smoothness.architecture_input_bounds]);
    ``‖x‖`` is ``data_bound``, raised to the batch's own where that is larger, or the batch's alone
    without ``data_bound``. Only the first layer is measured: its input norms and the rows of the
    batch, which every layer of a chain sees alike (the spectral rank bounds)."""

    def __init__(
        self, layers: list[Layer], geometry: Geometry, loss: LossBounds, chain: Chain, data_bound: float | None
    ) -> None:
        super().__init__(layers, geometry, loss, chain, "architecture", recorded=layers[:1])
        self._fixed_data_bound = data_bound
        self._measured_data_bound: Tensor | None = None

    def _rows(self) -> list[int | None]:
        return self.recorder.rows[:1] * len(self.layers)

    def _needed(self, maxima: list[Tensor | None], watched: list[int]) -> list[int] | None:
        # Without a forward the bound falls back on data_bound (or fails in _data_bound).
        return None if any(maxima[i] is None for i in watched) else watched

    def _take_input_norms(self) -> list[Tensor | None] | None:
        maxima = super()._take_input_norms()
        # This batch's own bound: rigorous for this batch's loss, and one bad batch (inf/NaN
        # or huge inputs) affects its own step only — nothing is carried to later steps.
        self._measured_data_bound = None if maxima is None else maxima[0]
        return maxima

    def _input_bounds(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor:
        return architecture_input_bounds(
            self._data_bound(dtype, device),
            [layer.in_features for layer in self.layers],
            self.chain.activations,
            self.geometry.activation_norm,
        )

    def _data_bound(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``data_bound``, raised to this batch's measured ‖x‖ where the batch exceeds it (the
        certificate then still holds), or the batch's ‖x‖ without ``data_bound``."""
        measured = self._measured_data_bound
        self._measured_data_bound = None
        fixed = self._fixed_data_bound
        fixed = None if fixed is None else device_constant(float(fixed), dtype, device)
        if measured is None:
            if fixed is not None:
                return fixed
            raise RuntimeError(
                "constants='architecture' without data_bound measures ‖x‖ from the batches, and no "
                "forward pass with gradients enabled ran yet. Run the forward before step(), or "
                "pass data_bound=max ‖x‖ over your data set."
            )
        # The recorder measures ‖[x; 1]‖; the data bound is on ‖x‖ itself.
        value = measured.to(device=device, dtype=dtype)
        if self.geometry.activation_norm == "l2":
            value = value.square().sub(1.0).clamp(min=0.0).sqrt()
        return value if fixed is None else torch.maximum(fixed, value)


class EstimatedConstants(_Measured):
    """``H · R_i²``: the exact constant of a layer that feeds the loss directly, from its measured
    input bound ``R_i`` (or [UNMEASURED_INPUT_BOUND][lightning_dsgd.constants.UNMEASURED_INPUT_BOUND]).
    A module called functionally (MHA's ``out_proj``) stays unmeasured; the batch must measure at
    least one watched layer."""

    def __init__(self, layers: list[Layer], geometry: Geometry, loss: LossBounds, mode: str) -> None:
        super().__init__(layers, geometry, loss, mode, layers)

    def _needed(self, maxima: list[Tensor | None], watched: list[int]) -> list[int] | None:
        measured = [i for i in watched if maxima[i] is not None]
        if watched and not measured:
            self._no_forward()
        return measured

    def base_constants(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor:
        """This step's estimates, in ``dtype``."""
        bounds = []
        for i, layer in enumerate(self.layers):
            measured = None if batch.input_bounds is None else batch.input_bounds[i]
            if measured is None:
                measured = device_constant(UNMEASURED_INPUT_BOUND.get(layer.kind, 1.0), dtype, device)
            bounds.append(measured.to(device=device, dtype=dtype))
        return self.h * torch.stack(bounds).square()
