"""torchmetrics metrics of DSGD's decisions."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class LayerSelectionFrequency(Metric):
    """How often each layer was chosen: ``compute()`` returns the count per layer (an int64 tensor
    of length ``num_layers``), summed over the ranks.

    Every ``update(layer_index)`` counts one choice. Data-parallel ranks all make the same choice
    on every step, so record each step on **one** rank only ([DSGDMonitor][lightning_dsgd.DSGDMonitor] updates on
    global rank 0): the sum over ranks then counts each step once, and ``compute()`` gives every
    rank the same true counts. ``compute()`` is a collective under ``torch.distributed``: call it
    on all ranks.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    counts: Tensor

    def __init__(self, num_layers: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_layers < 1:
            raise ValueError(f"num_layers must be ≥ 1, got {num_layers}.")
        self.num_layers = num_layers
        self.add_state("counts", torch.zeros(num_layers, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, layer_index: int | Tensor) -> None:
        """Count one choice of layer ``layer_index``, or one per entry of a tensor of indices (an
        empty tensor counts nothing: a rank that records no choice still marks the metric updated)."""
        if isinstance(layer_index, int):  # the per-step path: no host synchronisation
            if not 0 <= layer_index < self.num_layers:
                raise ValueError(f"layer index {layer_index} out of range [0, {self.num_layers}).")
            self.counts[layer_index] += 1
            return
        index = layer_index.to(self.counts.device).reshape(-1).long()
        if index.numel() and bool(((index < 0) | (index >= self.num_layers)).any()):
            raise ValueError(f"layer index out of range [0, {self.num_layers}): {index.tolist()}")
        self.counts += torch.bincount(index, minlength=self.num_layers)

    def compute(self) -> Tensor:
        return self.counts.clone()
