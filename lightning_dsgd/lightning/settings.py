"""DSGD settings of a LightningModule: the optimizer's arguments plus the loop settings that
Lightning cannot apply in manual optimization (accumulation, clipping, η schedules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.cli import LRSchedulerCallable

from lightning_dsgd.optimizer import DEFAULT_CONSTANTS


@dataclass
class DSGDSettings:
    """Everything the mixin needs to build and drive the DSGD optimizer.

    The first group is passed to the optimizer (see [DSGD][lightning_dsgd.DSGD] for each
    argument and its effect on the guarantee). The second replaces the
    ``Trainer`` flags that Lightning refuses in manual optimization:

    * ``accumulate_grad_batches``: sum gradients over this many batches (without DDP/FSDP
      gradient sync on all but the last) and let DSGD choose on the accumulated gradient.
    * ``gradient_clip_val`` / ``gradient_clip_algorithm``: clip the unscaled gradients right
      before DSGD scores them (the guarantee then holds for the clipped direction's bound).
    * ``eta_scheduler``: a callable ``optimizer → LRScheduler``; it schedules ``η`` (the param
      groups' ``lr``), stepped every ``eta_scheduler_frequency`` optimizer steps or epochs as
      ``eta_scheduler_interval`` says. ``η`` must stay in ``(0, 2)``.
    """

    norm: Literal["spectral", "frobenius", "linf"] = "spectral"
    constants: Literal["data", "architecture", "adaptive"] = DEFAULT_CONSTANTS
    eta: float = 1.0
    selection: Literal["greedy", "random", "cyclic"] = "greedy"
    loss: str = "cross_entropy"
    data_bound: float | None = None
    overrides: dict[str, dict[str, str]] | None = None
    nonfinite: Literal["skip", "raise"] = "skip"
    seed: int = 0
    momentum: float = 0.0
    layers_per_step: int | Literal["all"] | None = None
    full_batch: bool = False
    undo_shortfalls: bool = False
    adaptive_options: dict[str, float] | None = None

    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    eta_scheduler: LRSchedulerCallable | None = None
    eta_scheduler_interval: Literal["step", "epoch"] = "step"
    eta_scheduler_frequency: int = 1

    def __post_init__(self) -> None:
        if self.accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be ≥ 1, got {self.accumulate_grad_batches}.")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be > 0, or None for no clipping; got {self.gradient_clip_val}.")
        if self.gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}."
            )
        if self.eta_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"eta_scheduler_interval must be 'step' or 'epoch', got {self.eta_scheduler_interval!r}.")
        if self.eta_scheduler_frequency < 1:
            raise ValueError(f"eta_scheduler_frequency must be ≥ 1, got {self.eta_scheduler_frequency}.")

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of [DSGD][lightning_dsgd.DSGD]."""
        names = (
            "norm",
            "constants",
            "eta",
            "selection",
            "loss",
            "data_bound",
            "overrides",
            "nonfinite",
            "seed",
            "momentum",
            "layers_per_step",
            "full_batch",
            "undo_shortfalls",
            "adaptive_options",
        )
        return {name: getattr(self, name) for name in names}
