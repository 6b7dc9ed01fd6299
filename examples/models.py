"""Ordinary LightningModules used by the examples: written for automatic optimization with Adam,
as anyone would write them. DSGD trains them unchanged — through ``DSGDMixin``, a DSGD strategy,
or the ``lightning-dsgd`` command. ``tanh_mlp`` is the one builder of the tanh MLP, which the
plain-PyTorch example and the benchmarks use too."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn


def tanh_mlp(widths: Sequence[int]) -> nn.Sequential:
    """``Linear`` layers ``fc1, fc2, …`` through ``widths`` with ``Tanh`` (``tanh1, …``) between them
    and linear logits: DSGD's rigorous class with cross-entropy. PyTorch's default initialisation,
    layer by layer from the input, so a seed fixes the weights."""
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for k, (n_in, n_out) in enumerate(pairwise(widths), start=1):
        if k > 1:
            modules[f"tanh{k - 1}"] = nn.Tanh()
        modules[f"fc{k}"] = nn.Linear(n_in, n_out)
    return nn.Sequential(modules)


class Classifier(LightningModule):
    """Cross-entropy on ``(x, y)`` batches; logs ``train/loss``, ``val/loss``, ``val/acc`` (and
    ``test/…``). Subclasses set ``self.net``. ``lr`` is Adam's, used only when DSGD is not."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        accuracy = (logits.argmax(-1) == y).float().mean()
        self.log(f"{stage}/loss", self.loss(logits, y), prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)  # replaced by DSGD


class TanhMLP(Classifier):
    """``Linear`` layers ``fc1, fc2, …`` with ``Tanh`` between them and linear logits: DSGD's
    rigorous class with cross-entropy, so its steps are certified. Under ``ModelParallelStrategy``
    (FSDP2) ``configure_model`` shards every layer; elsewhere it does nothing.

    Args:
        widths: input, hidden and output sizes (64-128-128-10 fits the 8×8 digits).
        lr: Adam's learning rate when DSGD does not train the module.
    """

    def __init__(self, widths: list[int] | None = None, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.net = tanh_mlp(widths or [64, 128, 128, 10])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    def configure_model(self) -> None:
        if self.device_mesh is None:  # not under ModelParallelStrategy
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)
