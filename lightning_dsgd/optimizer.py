"""``DSGD``: duality structure gradient descent as a ``torch.optim.Optimizer`` (ALGORITHM.md §4).

Each ``step``::

    g_i  = ∇_{W_i} f(w)                      # from the closure's backward, for every layer
    s_i  = ‖g_i‖²_(i)* / L_i(w)              # twice the guaranteed decrease of layer i
    i*   = argmax_i s_i                      # ties → lowest index; non-finite never wins
    W_i* ← W_i* − (η / L_i*) · ρ_i*(g_i*)    # only this layer moves

Full batch, the loss then drops by at least ``η(1 − η/2)·s_i*``. ``η`` is the param groups'
``lr`` (one group per layer), so LR schedulers schedule ``η``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_dsgd.distributed import Reducer, full, shard_like, version_key
from lightning_dsgd.geometry import BlockGrad, augment, make_geometry, reduction_dtype
from lightning_dsgd.layers import Chain, InputNormRecorder, Layer, find_chain
from lightning_dsgd.smoothness import LOSSES, LossBounds, architecture_input_bounds, mlp_constants

ConstantsMode = Literal["data", "architecture"]
Selection = Literal["greedy", "random", "cyclic"]
NonFinitePolicy = Literal["skip", "raise"]

_CONSTANTS = ("data", "architecture")
_SELECTIONS = ("greedy", "random", "cyclic")
_POLICIES = ("skip", "raise")


@dataclass(frozen=True)
class StepRecord:
    """What one ``DSGD.step`` decided. Tensors stay on the parameters' device (reading them as
    Python numbers is the caller's choice); per-layer tensors have one entry per layer in
    forward order."""

    step: int
    layer: int | None
    layer_name: str | None
    scores: Tensor
    constants: Tensor
    dual_norms: Tensor
    stationarity: Tensor
    guaranteed_decrease: Tensor
    eta: float
    selection: str
    certified: bool
    skipped: bool
    skip_reason: str | None
    loss: Tensor | None


@dataclass(frozen=True)
class _Scored:
    """Everything one evaluation of the layers produced (internal)."""

    etas: list[float]
    grads: list[BlockGrad]
    dual_norms: Tensor
    constants: Tensor
    scores: Tensor
    masked: Tensor
    best: int
    nonfinite: bool
    skip_reason: str | None


class DSGD(torch.optim.Optimizer):
    """Duality structure gradient descent (Flynn, arXiv 1708.00523).

    Args:
        model: the module to train; DSGD finds its layers itself, in forward order.
        norm: per-layer norm: ``"spectral"`` (nuclear dual, ``ρ = ‖G‖_*·UVᵀ``), ``"frobenius"``
            (``ρ = G``) or ``"linf"`` (ℓ∞→ℓ∞ operator norm).
        constants: ``"data"`` bounds each layer's input by its largest norm in the current batch
            (recorded by forward hooks, so run the forward with gradients enabled before
            ``step``); ``"architecture"`` uses worst-case bounds from widths and a data bound.
        eta: step multiplier ``η ∈ (0, 2)``; ``η = 1`` maximises ``η(1 − η/2)``.
        selection: ``"greedy"`` (the best bound), ``"random"`` or ``"cyclic"`` layer choice;
            every choice uses the same step rule and keeps its guaranteed decrease.
        loss: the loss applied to the model's logits (mean over the batch): ``"cross_entropy"``,
            or :class:`LossBounds` for a loss whose bounds you have derived.
        data_bound: ``B_x ≥ max ‖x‖`` over the data, for ``constants="architecture"``; ``None``
            measures the running maximum over every batch seen (rigorous for each batch's loss).
        chain: the model's layers and activations in forward order, when they are not inside an
            ``nn.Sequential`` (e.g. ``[model.fc1, nn.Tanh(), model.fc2]``).
        nonfinite: on an inf/NaN gradient or constant, ``"skip"`` the step (no weight changes,
            recorded as skipped) or ``"raise"`` a ``FloatingPointError``.
        seed: seed of the random layer choice (the same on every rank, so ranks agree).
        reduce_max: element-wise MAX over data-parallel ranks, applied to the measured input norms
            so that every rank uses the constants of the global batch (the Lightning integration
            sets it; see :mod:`lightning_dsgd.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        norm: str = "spectral",
        constants: ConstantsMode = "data",
        eta: float = 1.0,
        selection: Selection = "greedy",
        loss: str | LossBounds = "cross_entropy",
        data_bound: float | None = None,
        chain: Sequence[nn.Module] | None = None,
        nonfinite: NonFinitePolicy = "skip",
        seed: int = 0,
        reduce_max: Reducer | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"DSGD needs the model itself (an nn.Module), got {type(model).__name__}: "
                "write DSGD(model) rather than DSGD(model.parameters()); DSGD finds the layers "
                "from the module structure."
            )
        _check_eta(eta)
        self.geometry = make_geometry(norm)
        _check_choice("constants", constants, _CONSTANTS)
        _check_choice("selection", selection, _SELECTIONS)
        _check_choice("nonfinite", nonfinite, _POLICIES)
        self.loss_bounds = _loss_bounds(loss)
        if data_bound is not None:
            if constants != "architecture":
                raise ValueError(
                    "data_bound is used only with constants='architecture' (data mode measures "
                    "every layer's input itself): drop data_bound or set constants='architecture'."
                )
            if not (data_bound >= 0 and data_bound < float("inf")):
                raise ValueError(f"data_bound must be a finite number ≥ 0 bounding ‖x‖, got {data_bound}.")

        self.chain: Chain = find_chain(model, chain)
        self.layers: list[Layer] = self.chain.layers
        self.constants_mode = constants
        self.selection = selection
        self.nonfinite = nonfinite
        self.reduce_max = reduce_max
        groups = [{"params": layer.params, "lr": eta, "layer_name": layer.name} for layer in self.layers]
        super().__init__(groups, {"lr": eta})

        activation_norm = self.geometry.activation_norm
        self._g, self._h = self.loss_bounds.bounds(activation_norm)
        self._s1 = [0.0] + [a.s1 for a in self.chain.activations[1:]]  # type: ignore[union-attr]
        self._s2 = [0.0] + [a.s2 for a in self.chain.activations[1:]]  # type: ignore[union-attr]
        self._fixed_data_bound = data_bound
        watched = self.layers if constants == "data" else self.layers[:1]
        self._recorder = (
            InputNormRecorder(watched, activation_norm) if constants == "data" or data_bound is None else None
        )
        self._operator_norm_cache: list[tuple[tuple[int, int], Tensor] | None] = [None] * len(self.layers)
        self._generator = torch.Generator().manual_seed(seed)
        self._cursor = 0
        self._measured_data_bound: Tensor | None = None
        self.steps_taken = 0
        self.skipped_steps = 0
        self.selection_counts = [0] * len(self.layers)
        self.last_step: StepRecord | None = None

    # ------------------------------------------------------------------ public properties
    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def certified(self) -> bool:
        """True when every step that is not skipped carries the guaranteed decrease: the model is
        in the rigorous class and the constants are rigorous. ``find_chain`` admits only such
        models, so this holds for every model DSGD accepts."""
        return True

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Run the closure (if given), score every layer, update the best one; return the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scored = self._score()
        if scored.nonfinite and self.nonfinite == "raise":
            raise FloatingPointError(
                f"DSGD step {self.steps_taken}: {scored.skip_reason}. No weight was changed. Check the "
                "loss for inf/NaN (torch.autograd.detect_anomaly helps); under float16 use a "
                "GradScaler (precision='16-mixed'); or pass nonfinite='skip' to skip such steps."
            )
        index = None
        if scored.skip_reason is None:
            index = self._choose(scored.best)
            grad = scored.grads[index]
            if grad is not None:
                self._update(self.layers[index], grad, scored.etas[index] / scored.constants[index])
        record = self._record(scored, index, loss)
        if record.skipped:
            self.skipped_steps += 1
        else:
            self.selection_counts[index] += 1  # type: ignore[index]
        self.last_step = record
        self.steps_taken += 1
        return loss

    @torch.no_grad()
    def score(self) -> StepRecord:
        """What a greedy ``step()`` would decide on the current gradients, without changing any
        weight, counter or random state (for observing a model trained by another optimizer).
        Consumes the recorded input norms like ``step()`` does."""
        scored = self._score()
        return self._record(scored, None if scored.skip_reason else scored.best, None)

    def _score(self) -> _Scored:
        """Dual norms, constants and scores of every layer, and the greedy choice."""
        etas = [group["lr"] for group in self.param_groups]
        for eta in etas:
            _check_eta(eta)
        input_norms = self._take_input_norms()
        grads = [self._block_grad(layer) for layer in self.layers]
        dual_norms = self.geometry.dual_norms(grads)
        constants = self._constants(input_norms).to(dual_norms.dtype)
        scores = dual_norms.square() / constants
        finite = torch.isfinite(scores)
        masked = torch.where(finite, scores, torch.full_like(scores, float("-inf")))
        # The one host synchronisation of a step: the greedy choice, finiteness and best score.
        best, all_finite, best_score = torch.stack(
            [masked.argmax().to(scores.dtype), finite.all().to(scores.dtype), masked.max()]
        ).tolist()
        skip_reason = None
        if not all_finite:
            skip_reason = self._nonfinite_reason(dual_norms, constants)
        elif self.selection == "greedy" and best_score <= 0.0:
            skip_reason = "every layer's gradient is zero or missing (did the closure call backward()?)"
        return _Scored(etas, grads, dual_norms, constants, scores, masked, int(best), not all_finite, skip_reason)

    def _block_grad(self, layer: Layer) -> BlockGrad:
        """The layer's gradient as full tensors (all-gathered where sharded)."""
        if layer.weight.grad is None:
            return None
        bias_grad = None
        if layer.bias is not None:
            bias_grad = full(layer.bias.grad) if layer.bias.grad is not None else torch.zeros_like(full(layer.bias))
        return full(layer.weight.grad), bias_grad

    def _choose(self, greedy_index: int) -> int:
        if self.selection == "greedy":
            return greedy_index
        if self.selection == "random":
            return int(torch.randint(len(self.layers), (1,), generator=self._generator))
        index = self._cursor
        self._cursor = (self._cursor + 1) % len(self.layers)
        return index

    def _update(self, layer: Layer, grad: tuple[Tensor, Tensor | None], scale: Tensor) -> None:
        """``W ← W − scale · ρ(g)`` on the augmented block, in place (on each rank's shard)."""
        direction = self.geometry.duality_map(augment(*grad)).mul_(scale)
        weight_step = direction[:, : layer.in_features].to(layer.weight.dtype)
        layer.weight.sub_(shard_like(layer.weight, weight_step))
        if layer.bias is not None:
            bias_step = direction[:, layer.in_features].to(layer.bias.dtype)
            layer.bias.sub_(shard_like(layer.bias, bias_step))

    def _record(self, scored: _Scored, index: int | None, loss: Tensor | None) -> StepRecord:
        skipped = index is None
        eta = scored.etas[0 if index is None else index]
        return StepRecord(
            step=self.steps_taken,
            layer=index,
            layer_name=None if index is None else self.layers[index].name,
            scores=scored.scores,
            constants=scored.constants,
            dual_norms=scored.dual_norms,
            stationarity=scored.masked.max().clamp(min=0.0).sqrt(),
            guaranteed_decrease=scored.scores.new_zeros(())
            if index is None
            else eta * (1.0 - eta / 2.0) * scored.scores[index],
            eta=eta,
            selection=self.selection,
            certified=self.certified and not skipped,
            skipped=skipped,
            skip_reason=scored.skip_reason if skipped else None,
            loss=None if loss is None else loss.detach(),
        )

    def record_skip(self, reason: str) -> None:
        """Record a step that was decided outside DSGD not to happen (e.g. a GradScaler that found
        inf/NaN gradients and never called ``step``): no weight changes, ``skipped=True``."""
        if self._recorder is not None:
            self._recorder.reset()
        nan = torch.full((len(self.layers),), float("nan"), device=self.layers[0].weight.device)
        etas = [group["lr"] for group in self.param_groups]
        scored = _Scored(etas, [], nan, nan, nan, nan, 0, False, reason)
        self.last_step = self._record(scored, None, None)
        self.skipped_steps += 1
        self.steps_taken += 1

    def _nonfinite_reason(self, dual_norms: Tensor, constants: Tensor) -> str:
        bad_grads = [self.layers[i].name for i in torch.nonzero(~torch.isfinite(dual_norms)).flatten().tolist()]
        if bad_grads:
            return f"non-finite gradient (inf/NaN) in layer(s) {bad_grads}"
        bad = [self.layers[i].name for i in torch.nonzero(~torch.isfinite(constants)).flatten().tolist()]
        return f"non-finite smoothness constant for layer(s) {bad}: the weights above them hold inf/NaN"

    # ------------------------------------------------------------------ constants
    def _constants(self, input_norms: Tensor | None) -> Tensor:
        """``L_i(w)`` for every layer (smoothness.mlp_constants)."""
        norms = self._operator_norms()
        bounds = self._input_bounds(input_norms, norms.dtype, norms.device)
        s1 = norms.new_tensor(self._s1)
        s2 = norms.new_tensor(self._s2)
        return mlp_constants(norms, bounds, s1, s2, self._g, self._h)

    def _operator_norms(self) -> Tensor:
        """``a_j`` of every layer above the first (``a_0`` never enters a constant), reusing the
        value of any weight that has not changed since it was computed (tracked by the tensor's
        version counter, which every in-place write bumps)."""
        keys = [version_key(layer.weight) for layer in self.layers]
        stale = [
            j
            for j in range(1, len(self.layers))
            if self._operator_norm_cache[j] is None or self._operator_norm_cache[j][0] != keys[j]  # type: ignore[index]
        ]
        if stale:
            fresh = self.geometry.operator_norms([full(self.layers[j].weight.detach()) for j in stale])
            for k, j in enumerate(stale):
                self._operator_norm_cache[j] = (keys[j], fresh[k])
        first = self.layers[0].weight
        zero = torch.zeros((), dtype=reduction_dtype(first.dtype), device=first.device)
        return torch.stack([zero] + [entry[1].to(zero.dtype) for entry in self._operator_norm_cache[1:]])  # type: ignore[index]

    def _take_input_norms(self) -> Tensor | None:
        """The recorded ``‖[x; 1]‖`` maxima of this step's batch (MAX-reduced over ranks), folding
        them into the running data bound in architecture mode; the recorder starts afresh."""
        if self._recorder is None:
            return None
        maxima = self._recorder.maxima
        if any(m is None for m in maxima):
            if self.constants_mode == "data":
                raise RuntimeError(
                    "constants='data' needs the input norms of the batch being stepped on, and no "
                    "forward pass with gradients enabled ran since the last step. Run the forward "
                    "(and backward) before step(), e.g. inside the closure, or use "
                    "constants='architecture'."
                )
            return None
        self._recorder.reset()
        stacked = torch.stack(maxima)  # type: ignore[arg-type]
        if self.reduce_max is not None:
            stacked = self.reduce_max(stacked)
        if self.constants_mode == "architecture":
            previous = self._measured_data_bound
            self._measured_data_bound = stacked[0] if previous is None else torch.maximum(previous, stacked[0])
        return stacked

    def _input_bounds(self, input_norms: Tensor | None, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``R_{i-1}`` per layer: measured in data mode, worst case in architecture mode."""
        if self.constants_mode == "data":
            return input_norms.to(device=device, dtype=dtype)  # type: ignore[union-attr]
        return architecture_input_bounds(
            self._data_bound(dtype, device),
            [layer.in_features for layer in self.layers],
            self.chain.activations,
            self.geometry.activation_norm,
        )

    def _data_bound(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self._fixed_data_bound is not None:
            return torch.tensor(self._fixed_data_bound, dtype=dtype, device=device)
        if self._measured_data_bound is None:
            raise RuntimeError(
                "constants='architecture' without data_bound measures ‖x‖ from the batches, and no "
                "forward pass with gradients enabled ran yet. Run the forward before step(), or "
                "pass data_bound=max ‖x‖ over your data set."
            )
        # The recorder measures ‖[x; 1]‖; the data bound is on ‖x‖ itself.
        augmented = self._measured_data_bound.to(device=device, dtype=dtype)
        if self.geometry.activation_norm == "l2":
            return augmented.square().sub(1.0).clamp(min=0.0).sqrt()
        return augmented

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["dsgd"] = {
            "norm": self.geometry.name,
            "constants": self.constants_mode,
            "selection": self.selection,
            "layer_names": self.layer_names,
            "steps_taken": self.steps_taken,
            "skipped_steps": self.skipped_steps,
            "selection_counts": list(self.selection_counts),
            "cursor": self._cursor,
            "generator": self._generator.get_state(),
            "measured_data_bound": self._measured_data_bound,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("dsgd", None)
        if extra is None:
            raise ValueError("This state dict was not saved by DSGD (it has no 'dsgd' entry).")
        for key, mine in (
            ("norm", self.geometry.name),
            ("constants", self.constants_mode),
            ("selection", self.selection),
            ("layer_names", self.layer_names),
        ):
            if extra[key] != mine:
                raise ValueError(
                    f"The DSGD state was saved with {key}={extra[key]!r} but this optimizer has "
                    f"{key}={mine!r}: build the optimizer with the same settings and model to resume."
                )
        super().load_state_dict(state_dict)
        self.steps_taken = extra["steps_taken"]
        self.skipped_steps = extra["skipped_steps"]
        self.selection_counts = list(extra["selection_counts"])
        self._cursor = extra["cursor"]
        self._generator.set_state(extra["generator"])
        bound = extra["measured_data_bound"]
        device = self.layers[0].weight.device
        self._measured_data_bound = None if bound is None else bound.to(device)

    def remove_hooks(self) -> None:
        """Detach the forward hooks that record input norms (after training, if the model lives on)."""
        if self._recorder is not None:
            self._recorder.remove()


def _check_eta(eta: float) -> None:
    if not (isinstance(eta, (int, float)) and 0.0 < eta < 2.0):
        raise ValueError(
            f"eta must be a number in (0, 2), got {eta!r}: the guaranteed decrease η(1 − η/2)·s "
            "vanishes at 0 and 2; eta=1 maximises it."
        )


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name}={value!r}; use one of {list(allowed)}.")


def _loss_bounds(loss: str | LossBounds) -> LossBounds:
    if isinstance(loss, LossBounds):
        return loss
    if loss not in LOSSES:
        raise ValueError(
            f"Unsupported loss {loss!r}. The rigorous losses are {sorted(LOSSES)}; for another loss "
            "pass loss=LossBounds(...) with bounds on its gradient and curvature in the logits."
        )
    return LOSSES[loss]
