"""Adding DSGD to an existing LightningModule: before and after.

BEFORE — an ordinary module, automatic optimization, its own optimizer::

    class LitClassifier(LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    Trainer(max_epochs=3).fit(LitClassifier(), data)

AFTER — any one of three ways; ``training_step`` stays as it is, DSGD replaces the optimizer:

1. the mixin, first among the bases::

       class DSGDClassifier(DSGDMixin, LitClassifier):
           dsgd = DSGDSettings(norm="spectral")          # optional: these are the defaults

2. no code change at all, a strategy::

       Trainer(strategy=DSGDSingleDeviceStrategy(dsgd=DSGDSettings()))   # or strategy="dsgd"

3. an existing instance, in place::

       model = with_dsgd(LitClassifier(), DSGDSettings())

This script trains the module before (Adam) and after (the three ways, which are the same DSGD
run) on the digits and prints, for each, the validation accuracy and loss, the number of steps
and which layers DSGD updated.

    python -m examples.add_dsgd [--epochs 2]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a file: the imports below need the repository root on sys.path
    sys.exit(f"Run the examples from the repository root as modules: python -m examples.{Path(__file__).stem}")

from examples.common import quiet_lightning
from examples.digits import DigitsDataModule
from examples.models import tanh_mlp
from lightning_dsgd import DSGD, DSGDMixin, DSGDSettings, DSGDSingleDeviceStrategy, with_dsgd


# ---------------------------------------------------------------------- before
class LitClassifier(LightningModule):
    """An ordinary LightningModule: a tanh MLP for the 8×8 digits, trained with Adam."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tanh_mlp([64, 128, 128, 10])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


# ---------------------------------------------------------------------- after (1): the mixin
class DSGDClassifier(DSGDMixin, LitClassifier):
    dsgd = DSGDSettings(norm="spectral")  # optional: the defaults


@dataclass
class Result:
    """What one run did: its validation accuracy and loss, its steps, and (DSGD) how often it
    chose each layer."""

    accuracy: float
    loss: float
    steps: int
    choices: dict[str, int] | None

    def __str__(self) -> str:
        what = "every layer each step (Adam)"
        if self.choices is not None and set(self.choices.values()) == {self.steps}:
            what = "every layer each step (DSGD, each its own η/L_i)"
        elif self.choices is not None:
            what = "layers moved: " + ", ".join(f"{name} ×{n}" for name, n in self.choices.items() if n)
        return f"accuracy {self.accuracy:6.2%}  loss {self.loss:.4f}  {self.steps} steps, {what}"


def train(model: LightningModule, epochs: int, max_steps: int = -1, strategy: object = "auto") -> Result:
    """Fit on the digits and return what the run did, measured on the validation split."""
    data = DigitsDataModule(batch_size=64)
    trainer = Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_epochs=epochs,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, data)
    x, y = data.val.tensors  # type: ignore[union-attr]
    with torch.no_grad():
        logits = model(x)
    optimizer = trainer.optimizers[0]
    choices = None
    if isinstance(optimizer, DSGD):
        choices = dict(zip(optimizer.layer_names, optimizer.selection_counts, strict=True))
    return Result(
        accuracy=(logits.argmax(1) == y).float().mean().item(),
        loss=F.cross_entropy(logits, y).item(),
        steps=trainer.global_step,
        choices=choices,
    )


def main(argv: list[str] | None = None) -> dict[str, Result]:
    parser = argparse.ArgumentParser(description="Adding DSGD to an existing LightningModule: before and after.")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(1)
    results: dict[str, Result] = {}
    budget = (args.epochs, args.max_steps)
    runs = {
        "before: Adam": lambda: train(LitClassifier(), *budget),
        "after (1): DSGDMixin": lambda: train(DSGDClassifier(), *budget),
        "after (2): DSGDSingleDeviceStrategy": lambda: train(
            LitClassifier(), *budget, strategy=DSGDSingleDeviceStrategy(dsgd=DSGDSettings())
        ),
        "after (3): with_dsgd(instance)": lambda: train(with_dsgd(LitClassifier(), DSGDSettings()), *budget),
    }
    print(f"validation split of the digits after {args.epochs} epoch(s) of batches of 64, from the same weights:")
    for name, run in runs.items():
        seed_everything(0, verbose=False)  # the same initial weights for every run
        results[name] = run()
        print(f"{name:<36} {results[name]}", flush=True)
    print("The three 'after' runs are one and the same DSGD run, reached three ways.")
    after = results["after (1): DSGDMixin"]
    counts = list((after.choices or {}).values())
    if counts and set(counts) == {after.steps}:
        print(
            "With the defaults DSGD moved every layer at every step, each with its own η/L_i (adaptive constants, "
            "not certified); DSGDSettings(constants='data') is the paper's certified algorithm, one layer per "
            "step — python -m examples.digits trains both."
        )
    return results


if __name__ == "__main__":
    main()
