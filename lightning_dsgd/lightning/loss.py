"""The loss of the global batch, written once for the mixin and the monitor."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def global_mean_loss(trainer: Any, loss: Tensor) -> Tensor:
    """``mean_r loss_r``, a detached copy: data-parallel ranks each hold the loss of their share of
    the batch (equal shares), so the batch's mean loss is the mean over ranks; on one rank, the loss."""
    loss = loss.detach().clone()
    if trainer.world_size > 1:
        loss = trainer.strategy.reduce(loss, reduce_op="mean")
    return loss
