"""DSGD settings of a LightningModule: the optimizer's arguments plus the loop settings that
Lightning cannot apply in manual optimization (accumulation, clipping, η schedules).

The option values are defined once, by the optimizer's types (`lightning_dsgd.optimizer`), and
every setting is checked when ``DSGDSettings`` is built — before any Trainer or logger exists."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable

from lightning_dsgd.optimizer import (
    DEFAULT_CONSTANTS,
    DSGD,
    ConstantsMode,
    LossName,
    NonFinitePolicy,
    NormName,
    Selection,
    check_options,
)


@dataclass
class DSGDSettings:
    """DSGD's settings: the optimizer's arguments, then the loop's (which replace Trainer flags).

    Everything the mixin needs to build and drive the DSGD optimizer: the first group
    goes to the optimizer; the second replaces Trainer flags refused in manual optimization.

    Args:
        norm: Per-layer norm: 'spectral' (the paper's U·Vᵀ map), 'frobenius' (layer-wise gradient
            descent), 'linf' (ℓ∞→ℓ∞ operator norm) or 'rows' (largest row norm).
        constants: Smoothness constants: 'data' (inputs measured per batch; certified on tanh/sigmoid
            MLP chains with cross-entropy), 'architecture' (worst case from widths; certified) or
            'adaptive' (the default: estimates corrected by the curvature met; not certified).
        eta: Step multiplier η in (0, 2); η = 1 maximises the guaranteed decrease η(1 − η/2)·s.
        selection: Layer choice per step: 'greedy' (largest guaranteed decrease), 'random' or 'cyclic'.
        loss: The loss on the model's outputs: 'cross_entropy' (certified) or 'mse' (estimated).
        data_bound: Bound on ‖x‖ over the data for constants='architecture' (None: each batch's own).
        overrides: Per-module settings, {fnmatch pattern: {'norm': ..., 'grouping': ...}}.
        nonfinite: On an inf/NaN gradient or constant: 'skip' the step (no weight changes) or 'raise'.
        seed: Seed of the random layer choice (rank 0's choice is used on every rank).
        momentum: Momentum μ in [0, 1) per layer (not covered by the guarantee).
        layers_per_step: Update the best k layers (or 'all') per step; k > 1 is a heuristic. None (the
            default): every layer with adaptive greedy constants, one layer otherwise (certified).
        full_batch: Every step sees the same data: the realized decrease is recorded beside the promise.
        undo_shortfalls: With full_batch, undo a step that decreased the loss by less than its promise.
        adaptive_options: Tuning of the adaptive constants: safety, shrink, idle_shrink, idle_reach,
            floor, max_relative_step (each > 0).
        share_work: Under DDP/FSDP2, split the layers among the ranks (each scores its own and computes
            their directions); None (the default): on unless momentum > 0; False: every rank scores all.
        accumulate_grad_batches: Sum gradients over this many batches (no DDP/FSDP sync on all but the
            last) and let DSGD choose on the sum; replaces Trainer(accumulate_grad_batches).
        gradient_clip_val: Clip the unscaled gradients right before DSGD scores them (None: no clipping);
            replaces Trainer(gradient_clip_val).
        gradient_clip_algorithm: 'norm' or 'value' clipping.
        eta_scheduler: A callable optimizer → LRScheduler scheduling η (the param groups' lr), which
            must stay in (0, 2).
        eta_scheduler_interval: Step the η schedule every 'step' or every 'epoch'.
        eta_scheduler_frequency: Step the η schedule every this many intervals.
    """

    norm: NormName = "spectral"
    constants: ConstantsMode = DEFAULT_CONSTANTS
    eta: float = 1.0
    selection: Selection = "greedy"
    loss: LossName = "cross_entropy"
    data_bound: float | None = None
    overrides: dict[str, dict[str, str]] | None = None
    nonfinite: NonFinitePolicy = "skip"
    seed: int = 0
    momentum: float = 0.0
    layers_per_step: int | Literal["all"] | None = None
    full_batch: bool = False
    undo_shortfalls: bool = False
    adaptive_options: dict[str, float] | None = None
    share_work: bool | None = None

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    eta_scheduler: LRSchedulerCallable | None = None
    eta_scheduler_interval: Literal["step", "epoch"] = "step"
    eta_scheduler_frequency: int = 1

    def __post_init__(self) -> None:
        checked = check_options(**self.optimizer_kwargs())
        for name in ("eta", "seed", "momentum", "data_bound"):
            setattr(self, name, checked[name])
        for name in ("accumulate_grad_batches", "eta_scheduler_frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}.")
        clip = self.gradient_clip_val
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ValueError(f"gradient_clip_val must be > 0, or None for no clipping; got {self.gradient_clip_val}.")
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}."
            )
        if self.eta_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"eta_scheduler_interval must be 'step' or 'epoch', got {self.eta_scheduler_interval!r}.")
        if self.eta_scheduler is not None and not callable(self.eta_scheduler):
            raise TypeError(f"eta_scheduler must be a callable optimizer → LRScheduler, got {self.eta_scheduler!r}.")

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of [DSGD][lightning_dsgd.DSGD]."""
        return {name: getattr(self, name) for name in _OPTIMIZER_FIELDS}

    def describe(self) -> dict[str, Any]:
        """Every setting as a plain value for a logger's config (a schedule by its name)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if callable(value):
                value = getattr(value, "__qualname__", None) or repr(value)
            out[field.name] = value
        return out


#: The settings that are DSGD's keyword arguments, read from its signature (in its order).
_OPTIMIZER_FIELDS = tuple(
    name
    for name in inspect.signature(DSGD.__init__).parameters
    if name in {field.name for field in dataclasses.fields(DSGDSettings)}
)


def as_settings(value: DSGDSettings | Mapping[str, Any]) -> DSGDSettings:
    """``DSGDSettings`` as given, or built from a dict of its fields (unknown keys refused)."""
    if isinstance(value, DSGDSettings):
        return value
    if isinstance(value, Mapping):
        known = {field.name for field in dataclasses.fields(DSGDSettings)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"Unknown DSGD setting(s) {unknown}; the settings are {sorted(known)}.")
        return DSGDSettings(**value)
    raise TypeError(
        f"dsgd must be a DSGDSettings or a dict of its fields (e.g. {{'norm': 'linf'}}), got {type(value).__name__}."
    )
