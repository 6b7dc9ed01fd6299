"""What the examples share: a one-line-per-epoch printout, quieter Lightning start-up messages,
and running a config through the ``lightning-dsgd`` command from a script."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Sequence, Sized
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"


class EpochShuffle(RandomSampler):
    """A new order each epoch, drawn from ``seed + epoch``: Lightning calls ``set_epoch`` at the start
    of every epoch, with the epoch restored from a checkpoint on resume, so a resumed run sees the
    same batches as an uninterrupted one. (A generator seeded once would restart its sequence on
    resume.) Under DDP Lightning replaces it by a ``DistributedSampler``, which does the same."""

    def __init__(self, data: Sized, seed: int) -> None:
        super().__init__(data, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


def shuffled_batches(data: Dataset, batch_size: int, seed: int) -> DataLoader:
    """Training batches: shuffled anew each epoch (``EpochShuffle``), or the whole set each step
    (``batch_size <= 0``, full batch)."""
    if batch_size <= 0:
        return DataLoader(data, batch_size=len(data))  # type: ignore[arg-type]
    return DataLoader(data, batch_size=batch_size, sampler=EpochShuffle(data, seed))  # type: ignore[arg-type]


class TensorDataModule(LightningDataModule):
    """A data set held in memory as tensors: training split (the first ``train_size`` samples, or
    all), the test split for validation and test, shuffled mini-batches or the full batch
    (``batch_size=0``). Subclasses name their folder (``default_dir``) and say how to fetch (rank 0),
    load and preprocess the arrays.

    Args:
        data_dir: folder of the files (relative paths are taken from the current directory;
            ``None``: the data set's own folder, ``data/mnist`` or ``data/cifar10``).
        batch_size: training batch size; ``0`` = full batch (every step sees the whole training set).
        train_size: use only the first ``train_size`` training samples (``None``: all).
        download: try to download missing files (a short attempt; offline it fails with instructions).
        seed: the shuffling order.
    """

    default_dir = "data"
    eval_batch_size = 1000

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        train_size: int | None = None,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = self.default_dir if data_dir is None else data_dir
        self.batch_size = batch_size
        self.train_size = train_size
        self.download = download
        self.seed = seed
        self.train: TensorDataset | None = None
        self.test: TensorDataset | None = None

    def fetch(self) -> None:
        """Make the files present (downloading once if allowed), or fail with instructions."""
        raise NotImplementedError

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x_train, y_train, x_test, y_test`` as model inputs and labels."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        self.fetch()  # rank 0 only: downloads at most once

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x_train, y_train, x_test, y_test = self.load()
        if self.train_size is not None:
            x_train, y_train = x_train[: self.train_size], y_train[: self.train_size]
        self.train = TensorDataset(x_train, y_train)
        self.test = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return shuffled_batches(self.train, self.batch_size, self.seed)

    def val_dataloader(self) -> DataLoader:
        assert self.test is not None
        return DataLoader(self.test, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class EpochTable(Callback):
    """Prints one line per epoch (rank 0): the mean training loss over the epoch's batches, the
    validation metrics named in ``metrics`` (as logged by the module), and for DSGD where the
    epoch's steps went. One layer per step: how many steps chose each layer. Several layers per
    step (the default with adaptive constants: every layer moves): each layer's share of the
    epoch's promised decrease ``Σ_t ‖g_i‖²_*/L_i`` over the steps that moved it (the step sizes
    ``‖g_i‖_*/L_i`` in each layer's norm follow from it), largest first, and the greedy pick —
    how often each layer had the largest promise, the layer one-layer DSGD would have moved.
    The run's totals stay in ``picks`` and ``decrease`` (tensor, on the model's device).

    Args:
        metrics: keys of ``trainer.callback_metrics`` to print (missing ones are left blank).
        every_n_epochs: print every n-th epoch (and the last); full-batch runs have one step per epoch.
        show: how many layers the shares and picks name, largest first.
    """

    def __init__(
        self, metrics: Sequence[str] = ("val/loss", "val/acc"), every_n_epochs: int = 1, show: int = 4
    ) -> None:
        self.metrics = list(metrics)
        self.every_n_epochs = every_n_epochs
        self.show = show
        self._losses: list[torch.Tensor] = []
        self._counts: list[int] = []
        self._names: list[str] = []
        self._several = False
        self._start = 0.0
        self.picks: list[int] = []
        self.decrease: Tensor | None = None
        self._epoch_picks: list[int] = []
        self._epoch_decrease: Tensor | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._names = list(getattr(optimizer, "layer_names", []))
        self._several = getattr(optimizer, "layers_per_step", 1) > 1
        self.picks = [0] * len(self._names)
        self.decrease = None
        self._start = time.perf_counter()
        columns = "".join(f"{m:>12}" for m in ["train loss", *self.metrics])
        dsgd = ("share of the estimated decrease | greedy pick" if self._several else "layer choices") * bool(
            self._names
        )
        self._print(f"{'epoch':>5}{columns}  {dsgd}")

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._counts = list(getattr(optimizer, "selection_counts", []))  # after a resume, too
        self._epoch_picks = [0] * len(self._names)
        self._epoch_decrease = None
        self._losses = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
        record = getattr(trainer.optimizers[0], "last_step", None) if trainer.optimizers else None
        if record is None or record.skipped or record.layer is None:
            return
        self._epoch_picks[record.layer] += 1
        moved = torch.zeros_like(record.scores, dtype=torch.bool)
        moved[list(record.layers)] = True  # no host read: the promise stays on the device
        promise = torch.where(moved, record.scores, 0.0)
        self._epoch_decrease = promise if self._epoch_decrease is None else self._epoch_decrease + promise

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        losses, self._losses = self._losses, []
        optimizer = trainer.optimizers[0]
        counts = list(getattr(optimizer, "selection_counts", []))
        epoch_counts = [now - before for now, before in zip(counts, self._counts, strict=False)]
        self._counts = counts
        self.picks = [a + b for a, b in zip(self.picks, self._epoch_picks, strict=True)]
        if self._epoch_decrease is not None:
            self.decrease = self._epoch_decrease if self.decrease is None else self.decrease + self._epoch_decrease
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch == trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        loss = torch.stack(losses).mean().item() if losses else float("nan")
        values = [loss] + [_number(trainer.callback_metrics.get(m)) for m in self.metrics]
        row = "".join(f"{v:>12.4f}" if v is not None else f"{'':>12}" for v in values)
        if self._several:
            picks = dict(zip(self._names, self._epoch_picks, strict=True))
            choices = f"{_top(self.shares(self._epoch_decrease), self.show, '{:.0%}')} | {_top(picks, self.show, '{}')}"
        else:
            choices = " ".join(f"{n}:{c}" for n, c in zip(self._names, epoch_counts, strict=False) if c)
        self._print(f"{epoch:>5}{row}  {choices}")

    def shares(self, decrease: Tensor | None = None) -> dict[str, float]:
        """Each layer's share of the promised decrease (the run's, unless ``decrease`` is given)."""
        decrease = self.decrease if decrease is None else decrease
        if decrease is None or not self._names:
            return {}
        total = decrease.sum().clamp(min=torch.finfo(decrease.dtype).tiny)
        return dict(zip(self._names, (decrease / total).tolist(), strict=True))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._print(f"training took {time.perf_counter() - self._start:.1f} s")

    @rank_zero_only
    def _print(self, text: str) -> None:
        print(text, flush=True)


def _top(values: dict[str, float] | dict[str, int], count: int, form: str) -> str:
    """``name:value`` of the ``count`` largest non-zero values, largest first."""
    ranked = sorted(((v, n) for n, v in values.items() if v), reverse=True)[:count]
    return " ".join(f"{n}:{form.format(v)}" for v, n in ranked)


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return float(value) if isinstance(value, (int, float)) else None


def quiet_lightning() -> None:
    """Hide Lightning's start-up notices (accelerator availability, few dataloader workers) so
    that a script's own output stays readable; warnings about real problems still show."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")


def run_config(name: str, argv: Sequence[str] | None = None) -> Any:
    """``lightning-dsgd fit --config examples/configs/<name> ARGV`` from a script; a missing data set
    stops the script with the message that says where to put which files."""
    from examples.datasets import DataNotFoundError
    from lightning_dsgd.cli import cli

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return cli(["fit", "--config", str(CONFIGS / name), *args])
    except DataNotFoundError as error:  # the message says what to do; no traceback needed
        raise SystemExit(f"error: {error}") from None
