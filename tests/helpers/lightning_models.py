"""LightningModules written the ordinary way (automatic optimization, own optimizer), used by the
Lightning tests. Module-level so ``ddp_spawn`` workers can import them."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dsgd import DSGDMixin, DSGDSettings


def dataset(n: int = 64, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


class Classifier(LightningModule):
    """An ordinary module: tanh MLP, cross-entropy, Adam + StepLR, its own dataloaders."""

    def __init__(self, features: int = 6, hidden: int = 8, classes: int = 3, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)}

    def train_dataloader(self) -> DataLoader:
        data = dataset(features=self.hparams.features, classes=self.hparams.classes)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Rank r reads samples r, r+2, … in order (use with Trainer(use_distributed_sampler=False)),
            # so the ranks' batches t together are the single-process batch t of twice the size.
            sampler = torch.utils.data.DistributedSampler(data, shuffle=False)
            return DataLoader(data, batch_size=self.hparams.batch_size, sampler=sampler)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(dataset(32, self.hparams.features, self.hparams.classes, seed=1), batch_size=16)


class DSGDClassifier(DSGDMixin, Classifier):
    """The same module with DSGD: nothing else changes (the certified algorithm, whose records the
    tests check)."""

    dsgd = DSGDSettings(constants="data")


class ShardedDSGDClassifier(DSGDClassifier):
    """For ModelParallelStrategy (FSDP2): shard every Linear, then the root."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in self.net:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


class RecordChoices(Callback):
    """Keeps DSGD's record of every step; optionally saves it per rank (for spawned workers)."""

    def __init__(self, out_dir: str | None = None) -> None:
        self.layers: list[int | None] = []
        self.etas: list[float] = []
        self.records = []
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        if opt.last_step is not None and (not self.records or opt.last_step.step != self.records[-1].step):
            self.layers.append(opt.last_step.layer)
            self.etas.append(opt.last_step.eta)
            self.records.append(opt.last_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.out_dir is None:
            return
        from lightning_dsgd.distributed import full

        weights = {k: full(v).detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(
            {
                "layers": self.layers,
                "weights": weights,
                "optimizer": type(trainer.optimizers[0]).__name__,
                "constants": [r.constants.detach().cpu() for r in self.records],
                "dual_norms": [r.dual_norms.detach().cpu() for r in self.records],
            },
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


def quiet_trainer(tmp_path, **kwargs) -> Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar, summary or validation; ``kwargs``
    override any of these."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)
