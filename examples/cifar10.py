"""CIFAR-10 with a small ReLU CNN. ReLU networks and convolutions are outside DSGD's rigorous
class: DSGD estimates the constants and corrects them by the curvature it meets (``adaptive``),
and reports the steps as not certified.

The data are the CIFAR-10 python batches (``cifar-10-batches-py/``) or their archive
``cifar-10-python.tar.gz`` in ``data_dir``; missing, they are downloaded once if the network allows
(163 MB); otherwise the run stops with a message saying which files to put where.

    python -m examples.cifar10                                # examples/configs/cifar10.yaml
    lightning-dsgd fit --config examples/configs/cifar10.yaml --data.init_args.data_dir ~/data/cifar10
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a file: the imports below need the repository root on sys.path
    sys.exit(f"Run the examples from the repository root as modules: python -m examples.{Path(__file__).stem}")

from examples.common import TensorDataModule
from examples.datasets import ensure_cifar10, load_cifar10
from examples.models import Classifier

#: Per-channel mean and standard deviation of the CIFAR-10 training images (pixels in [0, 1]).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 from the batches or the archive in ``data_dir`` (default ``data/cifar10``): 50 000
    training images (or the first ``train_size``), the 10 000 test images for validation and test;
    standardised per channel. The arguments are those of ``examples.common.TensorDataModule``."""

    default_dir = "data/cifar10"
    eval_batch_size = 1000

    def fetch(self) -> None:
        ensure_cifar10(self.data_dir, self.download)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_train, y_train, x_test, y_test = load_cifar10(self.data_dir, download_missing=False)
        return standardise(x_train), y_train, standardise(x_test), y_test


def standardise(images: Tensor) -> Tensor:
    """uint8 ``(n, 3, 32, 32)`` → float32, zero mean and unit variance per channel."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


class SmallCNN(Classifier):
    """Two conv–ReLU–max-pool blocks and a two-layer ReLU head (an ordinary module, for Adam).

    Args:
        channels: output channels of the two convolutions.
        hidden: width of the hidden fully connected layer.
        lr: Adam's learning rate when DSGD does not train the module.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 8 * 8, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 10),
        )


if __name__ == "__main__":
    from examples.common import run_config

    run_config("cifar10.yaml")
