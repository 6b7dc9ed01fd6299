"""MNIST with a tanh MLP and cross-entropy — the paper's setting — full batch or mini-batch.

The data are the four standard IDX files, read from ``data_dir`` (gzipped or not). When they are
missing they are downloaded once (if the network allows); otherwise the run stops with a message
saying which files to put where.

    python examples/mnist.py                  # mini-batch: examples/configs/mnist.yaml
    python examples/mnist.py --full-batch     # full batch: examples/configs/mnist_full_batch.yaml
    lightning-dsgd fit --config examples/configs/mnist.yaml --data.init_args.data_dir ~/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a script: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.datasets import ensure_mnist, load_mnist


class MNISTDataModule(LightningDataModule):
    """MNIST from the IDX files: 60 000 training images (or the first ``train_size``), the
    10 000 test images for validation and test; pixels scaled to [0, 1] and flattened to 784.

    Args:
        data_dir: folder of the IDX files (relative paths are taken from the current directory).
        batch_size: training batch size; ``0`` = full batch (every step sees the whole training set).
        train_size: use only the first ``train_size`` training images (``None``: all).
        download: try to download missing files (a short attempt; offline it fails with instructions).
        seed: the shuffling order.
    """

    def __init__(
        self,
        data_dir: str = "data/mnist",
        batch_size: int = 128,
        train_size: int | None = None,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.train_size = train_size
        self.download = download
        self.seed = seed
        self.train: TensorDataset | None = None
        self.test: TensorDataset | None = None

    def prepare_data(self) -> None:
        ensure_mnist(self.data_dir, self.download)  # rank 0 only: downloads at most once

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x_train, y_train, x_test, y_test = load_mnist(self.data_dir, download_missing=False)
        if self.train_size is not None:
            x_train, y_train = x_train[: self.train_size], y_train[: self.train_size]
        self.train = TensorDataset(x_train, y_train)
        self.test = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        if self.batch_size <= 0:
            return DataLoader(self.train, batch_size=len(self.train))
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self.test is not None
        return DataLoader(self.test, batch_size=2000)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


if __name__ == "__main__":
    from examples.common import run_config

    argv = sys.argv[1:]
    full_batch = "--full-batch" in argv
    run_config("mnist_full_batch.yaml" if full_batch else "mnist.yaml", [a for a in argv if a != "--full-batch"])
