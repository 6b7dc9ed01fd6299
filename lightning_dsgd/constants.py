"""Where each step's ``L_i(w)`` come from: the constant models behind ``constants=``.

* ``"data"`` / ``"architecture"`` on a rigorous chain: the certified MLP constants of
  [lightning_dsgd.smoothness][], with input bounds measured in the batch or worst case.
* Any other model, or ``"adaptive"``: a base constant (the certified one where it exists, else
  the estimate ``H · R_i²`` from the layer's measured input bound ``R_i``, as if the layer fed the
  loss directly) times a multiplier corrected by the curvature met ([lightning_dsgd.adaptive][]).
  Such constants are not certified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_dsgd.adaptive import AdaptiveConstants, TrustRegion
from lightning_dsgd.chain import Chain
from lightning_dsgd.distributed import Reducer, full, version_key
from lightning_dsgd.geometry import BlockGrad, Geometry, augment, reduction_dtype
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


class ConstantModel:
    """Computes ``L_i(w)`` for every layer at each step (see the module docstring): the one object
    the optimizer asks for constants and tells about its steps; it owns the input-norm recorder,
    the followed operator norms and, with estimated constants, the adaptive multipliers and their
    trust region."""

    def __init__(
        self,
        layers: list[Layer],
        geometry: Geometry,
        loss: LossBounds,
        chain: Chain | None,
        mode: str,
        data_bound: float | None,
        adaptive_options: dict | None,
        geometry_of: Callable[[Layer], Geometry],
    ) -> None:
        self.layers = layers
        self.geometry = geometry
        self.chain = chain
        self.mode = mode
        self.certified = chain is not None and mode in ("data", "architecture")
        self.g, self.h = loss.bounds(geometry.activation_norm)
        self._fixed_data_bound = data_bound
        self._measured_data_bound: Tensor | None = None
        self.reduce_max: Reducer | None = None
        # Architecture mode measures the first layer only: its input norms (without data_bound) and
        # the rows of the batch, which every layer of a chain sees alike (the spectral rank bounds).
        self.recorder = InputNormRecorder(layers if mode != "architecture" else layers[:1], geometry.activation_norm)
        self.operator_norms = NormBounds(
            lambda indices: self.geometry.operator_norms([full(layers[j].weight.detach()) for j in indices])
        )
        self.adaptive = (
            AdaptiveConstants([chain is not None] * len(layers), **(adaptive_options or {}))
            if not self.certified
            else None
        )
        self.trust_region = (
            None if self.adaptive is None else TrustRegion(layers, geometry_of, self.adaptive.max_relative_step)
        )
        if chain is not None:
            self._s_tensors: tuple[tuple[torch.dtype, torch.device], Tensor, Tensor] | None = None
            self._s1 = [0.0] + [a.s1 for a in chain.activations[1:]]  # type: ignore[union-attr]
            self._s2 = [0.0] + [a.s2 for a in chain.activations[1:]]  # type: ignore[union-attr]

    def compute(
        self, batch: BatchInputs, grads: list[BlockGrad | None], dual_norms: Tensor, etas: list[float]
    ) -> Tensor:
        """This step's constants (in the dtype of ``dual_norms``) from the batch's inputs
        ([take_batch][lightning_dsgd.constants.ConstantModel.take_batch]): ``adjust`` of
        ``base_constants`` by the ``curvatures`` met at ``grads``."""
        base = self.base_constants(batch, dual_norms.dtype, dual_norms.device)
        return self.adjust(base, self.curvatures(grads), dual_norms, etas)

    def base_constants(self, batch: BatchInputs, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The certified constants, or the estimates ``H · R_i²`` (before any adaptive multiplier)."""
        if self.chain is not None:
            return self._certified(batch.input_bounds, dtype, device)
        return self._estimate(batch.input_bounds, dtype, device)

    def curvatures(self, grads: list[BlockGrad | None]) -> dict[int, Tensor]:
        """The curvature met along each pending adaptive step, for the layers whose new gradient is in ``grads``."""
        if self.adaptive is None:
            return {}
        return {
            i: self.adaptive.curvature(i, augment(*grads[i])) for i in self.adaptive.pending if grads[i] is not None
        }  # type: ignore[misc]

    def adjust(self, base: Tensor, curvatures: dict[int, Tensor], dual_norms: Tensor, etas: list[float]) -> Tensor:
        """Adaptive: the multipliers first see the curvatures met, and the constants ``m ⊙ base``
        are capped by the trust region; certified: ``base`` itself."""
        if self.adaptive is None or self.trust_region is None:
            return base.to(dual_norms.dtype)
        self.adaptive.observe(curvatures, base)
        constants = self.adaptive.constants(base).to(dual_norms.dtype)
        return self.trust_region.cap(constants, dual_norms, etas)

    # ------------------------------------------------------------------ the steps taken
    def before_step(self, index: int) -> tuple:
        """What [after_step][lightning_dsgd.constants.ConstantModel.after_step] needs of layer
        ``index`` before it moves: the versions of its weight (and bias)."""
        layer = self.layers[index]
        return version_key(layer.weight), None if self.trust_region is None else self.trust_region.before_step(layer)

    def after_step(
        self,
        index: int,
        before: tuple,
        bound: Tensor,
        step: Tensor,
        grad_dot_step: Tensor | None,
        step_norm: Tensor,
        constant: Tensor,
        shape: Sequence[int] | None = None,
    ) -> None:
        """Layer ``index`` moved by the block ``step`` (``‖step‖ ≤ bound``; ``step_norm`` as computed)
        under ``constant``, with ``⟨g, step⟩ = grad_dot_step`` at the gradient before it (needed only
        with ``adaptive``): follow its norms, and let the adaptive model measure the curvature along
        the step at the next gradient. ``shape``: the block's, where ``step`` is a stand-in (the
        rank that computed the step keeps it, see [lightning_dsgd.plan][])."""
        weight_before, block_before = before
        self.note_step(index, weight_before, bound)
        if self.trust_region is not None:
            self.trust_region.after_step(index, block_before, bound, step.shape if shape is None else shape)
        if self.adaptive is not None:
            assert grad_dot_step is not None, "adaptive constants need ⟨g, step⟩"
            self.adaptive.remember(index, step, grad_dot_step, step_norm, constant)

    def grow(self, index: int, factor: float) -> None:
        """Raise layer ``index``'s adaptive constant by ``factor`` (a step that broke its promise was undone)."""
        if self.adaptive is not None:
            self.adaptive.grow(index, factor)

    # ------------------------------------------------------------------ input norms
    def take_batch(self) -> BatchInputs:
        """The recorded input bounds of this step's batch (MAX-reduced over ranks), folding the
        first into the running data bound in architecture mode, and the gradients' rank bounds
        (the input rows, times the number of data-parallel ranks); the recorder starts afresh."""
        recorded = self.recorder.rows[:1] * len(self.layers) if self.mode == "architecture" else self.recorder.rows
        # Only the spectral geometry uses rank bounds (a chain passes the batch's rows to every layer).
        rows = [r if layer.norm == "spectral" else None for layer, r in zip(self.layers, recorded, strict=True)]
        counted = [i for i, r in enumerate(rows) if r is not None]
        if self.reduce_max is not None and counted:
            # Every rank must sketch alike: its rank bound is the largest local count × world size.
            local = device_constant(tuple(float(rows[i]) for i in counted), torch.float64, self.layers[0].weight.device)
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            for i, r in zip(counted, self.reduce_max(local).tolist(), strict=True):
                rows[i] = int(r) * world
        return BatchInputs(self._take_input_norms(), rows)

    def _take_input_norms(self) -> list[Tensor | None] | None:
        maxima = list(self.recorder.maxima)
        watched = [i for i, layer in enumerate(self.recorder.layers) if layer.kind in InputNormRecorder.WATCHED]
        missing = [i for i in watched if maxima[i] is None]
        if self.chain is None:  # estimates: a module called functionally (MHA's out_proj) stays unmeasured
            watched = [i for i in watched if maxima[i] is not None]
        if missing and (self.chain is not None or not watched):
            if self.mode != "architecture":
                raise RuntimeError(
                    f"constants={self.mode!r} needs the input norms of the batch being stepped on, and no "
                    "forward pass with gradients enabled ran since the last step. Run the forward "
                    "(and backward) before step(), e.g. inside the closure, or use constants='architecture'."
                )
            self.recorder.reset()
            self._measured_data_bound = None
            return None
        self.recorder.reset()
        if watched:
            stacked = torch.stack([maxima[i] for i in watched])  # type: ignore[misc]
            if self.reduce_max is not None:
                stacked = self.reduce_max(stacked)
            for k, i in enumerate(watched):
                maxima[i] = stacked[k]
        if self.mode == "architecture":
            # This batch's own bound: rigorous for this batch's loss, and one bad batch (inf/NaN
            # or huge inputs) affects its own step only — nothing is carried to later steps.
            self._measured_data_bound = maxima[0]
        return maxima

    # ------------------------------------------------------------------ certified
    def _certified(self, input_bounds: list[Tensor | None] | None, dtype: torch.dtype, device: torch.device) -> Tensor:
        norms = self._operator_norms().to(dtype)
        if self.mode == "architecture":
            bounds = architecture_input_bounds(
                self._data_bound(dtype, device),
                [layer.in_features for layer in self.layers],
                self.chain.activations,  # type: ignore[union-attr]
                self.geometry.activation_norm,
            )
        else:
            bounds = torch.stack([b.to(device=device, dtype=dtype) for b in input_bounds])  # type: ignore[union-attr]
        s1, s2 = self._activation_bounds(norms)
        return mlp_constants(norms, bounds, s1, s2, self.g, self.h)

    def _activation_bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """``s1``, ``s2`` of the chain as tensors like ``like`` (made once per dtype and device)."""
        key = (like.dtype, like.device)
        if self._s_tensors is None or self._s_tensors[0] != key:
            self._s_tensors = (key, like.new_tensor(self._s1), like.new_tensor(self._s2))
        return self._s_tensors[1], self._s_tensors[2]

    def _operator_norms(self) -> Tensor:
        """``a_j`` of every layer above the first (``a_0`` never enters a constant): exact for a
        weight changed from outside (its version counter moved), else followed across DSGD's own
        steps by [note_step][lightning_dsgd.constants.ConstantModel.note_step] (see [lightning_dsgd.norm_bounds][])."""
        above = range(1, len(self.layers))
        values = self.operator_norms.values(above, [version_key(self.layers[j].weight) for j in above])
        first = self.layers[0].weight
        zero = torch.zeros((), dtype=reduction_dtype(first.dtype), device=first.device)
        return torch.stack([zero] + [v.to(zero.dtype) for v in values])

    def note_step(self, index: int, before: tuple[int, int], step_norm: Tensor) -> None:
        """Layer ``index`` moved by a block step with ``‖Δ‖_(i) ≤ step_norm`` from weight version
        ``before``: its operator norm (never above the layer norm) follows by the triangle
        inequality where recomputing it would take an SVD."""
        if self.chain is None or not self.geometry.expensive_operator_norm:
            return
        weight = self.layers[index].weight
        self.operator_norms.advance(
            index,
            before,
            version_key(weight),
            step_norm,
            weight.dtype,
            min(self.layers[index].weight_matrix(weight).shape),
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

    # ------------------------------------------------------------------ estimate
    def _estimate(self, input_bounds: list[Tensor | None] | None, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``H · R_i²``: the exact constant of a layer that feeds the loss directly."""
        bounds = []
        for i, layer in enumerate(self.layers):
            measured = None if input_bounds is None else input_bounds[i]
            if measured is None:
                measured = device_constant(UNMEASURED_INPUT_BOUND.get(layer.kind, 1.0), dtype, device)
            bounds.append(measured.to(device=device, dtype=dtype))
        return self.h * torch.stack(bounds).square()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "adaptive": None if self.adaptive is None else self.adaptive.state_dict(),
            "operator_norms": self.operator_norms.state_dict(),
        }

    def _check_adaptive_state(self, state: dict) -> None:
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

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        # "measured_data_bound" of older checkpoints is not used: each step measures its own batch.
        self.operator_norms.load_state_dict(state.get("operator_norms", {}), device)
        adaptive = state.get("adaptive")
        if adaptive is not None:
            self._check_adaptive_state(adaptive)
        if self.adaptive is not None and state.get("adaptive") is not None:
            self.adaptive.load_state_dict(state["adaptive"], device)
