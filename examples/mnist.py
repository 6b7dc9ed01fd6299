"""MNIST with a tanh MLP and cross-entropy — the paper's setting — full batch or mini-batch.

The data are the four standard IDX files, read from ``data_dir`` (gzipped or not). When they are
missing they are downloaded once (if the network allows); otherwise the run stops with a message
saying which files to put where.

    python -m examples.mnist                  # mini-batch: examples/configs/mnist.yaml
    python -m examples.mnist --full-batch     # full batch: examples/configs/mnist_full_batch.yaml
    lightning-dsgd fit --config examples/configs/mnist.yaml --data.init_args.data_dir ~/data/mnist
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import Tensor

if __package__ in (None, ""):  # run as a file: the imports below need the repository root on sys.path
    sys.exit(f"Run the examples from the repository root as modules: python -m examples.{Path(__file__).stem}")

from examples.common import TensorDataModule
from examples.datasets import ensure_mnist, load_mnist


class MNISTDataModule(TensorDataModule):
    """MNIST from the IDX files in ``data_dir`` (default ``data/mnist``): 60 000 training images
    (or the first ``train_size``), the 10 000 test images for validation and test; pixels scaled
    to [0, 1] and flattened to 784. The arguments are those of ``examples.common.TensorDataModule``."""

    default_dir = "data/mnist"
    eval_batch_size = 2000

    def fetch(self) -> None:
        ensure_mnist(self.data_dir, self.download)

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return load_mnist(self.data_dir, download_missing=False)


if __name__ == "__main__":
    from examples.common import run_config

    argv = sys.argv[1:]
    full_batch = "--full-batch" in argv
    run_config("mnist_full_batch.yaml" if full_batch else "mnist.yaml", [a for a in argv if a != "--full-batch"])
