"""The tasks of the quality benchmark: data (built here or read from local files, no downloads)
and the model each is trained with.

The models and data sets the examples also use are built by the examples' own builders
(``examples.models.tanh_mlp``, ``examples.datasets``, ``examples.char_transformer``); the ones only
the benchmarks use are built here.

* ``digits``: scikit-learn's 1797 handwritten digits (8×8, ``X / 16``), a fixed 1437 / 360
  train / validation split (random, seed 0); tanh MLP 64-128-128-10 — the rigorous class, where
  ``DSGD(model, constants="data")``
  uses certified data constants. Full batch and mini-batches of 64.
* ``rings``: a generated task on which the hidden layers must learn. ``x ~ N(0, I_16)``; the
  class (4 of them, balanced) is the ring (``‖z‖² ≷`` its median) and the sign of ``sin 2θ`` of
  the point ``z = P x`` in a hidden random 2-D subspace ``P``. Random tanh features of ``x`` do not
  express it: the output layer alone plateaus near the chance loss ``ln 4`` (see the page).
  Tanh MLP 16-128-128-4, full batch on 1024 samples.
* ``cnn``: the digits as 1×8×8 images, a ReLU CNN (two 3×3 convolutions, the second strided, a
  hidden linear layer, linear logits). Mini-batches of 64. Outside the rigorous class:
  every ``constants`` mode is estimated and adaptive.
* ``transformer``: sequence reversal (output ``t`` is input token ``T−1−t``; vocabulary 16, length
  10): token embedding + learned positions + one pre-norm encoder layer (width 32, 2 heads,
  feed-forward 64) + linear head. Mini-batches of 64.
* ``charlm``: a character-level language model on the bundled text ``examples/data/sample.txt``
  (bytes as tokens; the first 90% for training, windows of 32 every 16 bytes; the rest held out):
  token and position embeddings, two pre-norm causal encoder layers (width 64, 4 heads,
  feed-forward 256), a final layer norm and a linear head over the 256 byte values (the model of
  ``examples/char_transformer.py``). Mini-batches of 16. Not used while the adaptive rules were
  developed (the held-out check of ``docs/benchmarks.md``).
* ``mnist``: only when the IDX files are present (``--mnist-dir``, ``$MNIST_DIR``, or ``data/MNIST/raw``
  under the repository): tanh MLP 784-256-256-10 on the 60000 training images, mini-batches of 128,
  validated on the 10000 test images.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from benchmarks.bench_common import ROOT, Device
from examples.char_transformer import SAMPLE, CharTransformer, Windows, read_tokens
from examples.datasets import DataNotFoundError, ensure_mnist, load_digits, load_mnist
from examples.models import tanh_mlp

Split = tuple[Tensor, Tensor, Tensor, Tensor]  # train_x, train_y, val_x, val_y


@dataclass(frozen=True, kw_only=True)
class Task:
    """One quality benchmark: data on the device, a seeded model factory and the run budget.

    ``batch_size=None`` is full batch. The training loss is evaluated every ``eval_every`` steps on
    ``eval_x, eval_y`` (the whole training set, or a fixed subset of it for the large ones)."""

    name: str
    title: str
    make_model: Callable[[], nn.Module]
    train_x: Tensor
    train_y: Tensor
    eval_x: Tensor
    eval_y: Tensor
    val_x: Tensor
    val_y: Tensor
    batch_size: int | None
    steps: int
    eval_every: int
    targets: tuple[float, ...]
    model_text: str
    rigorous: bool

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None

    @property
    def regime(self) -> str:
        return "full batch" if self.batch_size is None else f"batch {self.batch_size}"


@dataclass(frozen=True, kw_only=True)
class Net:
    """A task's model: its factory (seeded by the caller), the page's description of it, and whether
    it lies in DSGD's rigorous class (certified constants)."""

    build: Callable[[], nn.Module]
    text: str
    rigorous: bool = False


def mlp(widths: list[int]) -> Net:
    """The tanh MLP through ``widths`` (``examples.models.tanh_mlp``): the rigorous class."""
    return Net(build=lambda: tanh_mlp(widths), text=f"tanh MLP {'-'.join(map(str, widths))}", rigorous=True)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """How a task is built: its data (``None`` when its files are absent), its model and its budget
    at ``step_scale`` 1. Mini-batch tasks evaluate every ``eval_every`` steps (at least four times a
    run); ``eval_subset`` samples of the training set, drawn once (seed 0), stand for it when set."""

    title: str  # "{n}": the number of training samples
    data: Callable[[], Split | None]
    net: Net
    batch_size: int | None
    steps: int
    targets: tuple[float, ...]
    eval_every: int = 10
    eval_subset: int | None = None
    missing: str = ""  # the note when ``data`` returns None


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over samples (and over positions for sequence outputs)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


# ---------------------------------------------------------------------------------------------- data
@functools.cache
def digits_data() -> Split:
    """The digits with the benchmark's fixed split: 360 validation samples drawn at random (seed 0)."""
    x, y = load_digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[360:], order[:360]
    return x[train], y[train], x[val], y[val]


def digits_images() -> Split:
    tx, ty, vx, vy = digits_data()
    return tx.reshape(-1, 1, 8, 8), ty, vx.reshape(-1, 1, 8, 8), vy


def rings_data(n: int, seed: int, dim: int = 16) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, I)``; class = 2·[‖Px‖² > median] + [sin 2θ(Px) > 0] for a fixed random 2-D ``P``."""
    basis = torch.linalg.qr(torch.randn(dim, 2, generator=torch.Generator().manual_seed(1234)))[0].T
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    z = x @ basis.T
    ring = (z.square().sum(1) > 2 * math.log(2)).long()  # the median of a χ²₂ variable
    half = (torch.sin(2 * torch.atan2(z[:, 1], z[:, 0])) > 0).long()
    return x, 2 * ring + half


def reversal_data(n: int, seed: int, length: int = 10, vocab: int = 16) -> tuple[Tensor, Tensor]:
    tokens = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return tokens, tokens.flip(1)


def text_data(block: int = 32, stride: int = 16) -> Split:
    """Windows of ``block`` bytes of the bundled text every ``stride`` bytes, from its first 90% and
    from the rest (the data of ``examples/char_transformer.py``)."""
    train, val = read_tokens(os.path.join(ROOT, SAMPLE), val_fraction=0.1)
    return (*Windows(train, block, stride).tensors(), *Windows(val, block, stride).tensors())


def find_mnist(directory: str | None) -> str | None:
    """The first candidate folder that holds the four MNIST IDX files (plain or ``.gz``), or None:
    ``directory``, ``$MNIST_DIR``, ``data/MNIST/raw`` and ``data`` under the repository."""
    candidates = [directory, os.environ.get("MNIST_DIR"), os.path.join(ROOT, "data", "MNIST", "raw")]
    for folder in [*candidates, os.path.join(ROOT, "data")]:
        if folder and os.path.isdir(folder):
            try:
                ensure_mnist(folder, download_missing=False)
            except DataNotFoundError:
                continue
            return folder
    return None


def mnist_data(directory: str | None) -> Split | None:
    folder = find_mnist(directory)
    return None if folder is None else load_mnist(folder, download_missing=False)


# ---------------------------------------------------------------------------------------------- models
class ReluCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class TinyTransformer(nn.Module):
    """Token embedding + learned positions + one pre-norm encoder layer + a linear head."""

    def __init__(self, vocab: int = 16, length: int = 10, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.1 * torch.randn(length, width))
        self.encoder = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=2 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position))


# ---------------------------------------------------------------------------------------------- tasks
def recipes(mnist_dir: str | None = None) -> dict[str, Recipe]:
    """Every task by name (nothing is loaded until a recipe's ``data`` is called)."""
    digits = Recipe(
        title="digits, full batch",
        data=digits_data,
        net=mlp([64, 128, 128, 10]),
        batch_size=None,
        steps=200,
        targets=(0.5, 0.1),
    )
    return {
        "digits-full": digits,
        "digits-64": replace(digits, title="digits, batch 64", batch_size=64, steps=400),
        "rings": Recipe(
            title="rings (hidden 2-D subspace), full batch",
            data=lambda: (*rings_data(1024, seed=1), *rings_data(1024, seed=2)),
            net=mlp([16, 128, 128, 4]),
            batch_size=None,
            steps=300,
            targets=(1.0, 0.3),
        ),
        "cnn": Recipe(
            title="digits as images, ReLU CNN, batch 64",
            data=digits_images,
            net=Net(
                build=ReluCNN,
                text="conv 1→16 3×3, ReLU, conv 16→32 3×3 stride 2, ReLU, linear 512→64, ReLU, linear 64→10",
            ),
            batch_size=64,
            steps=300,
            targets=(0.5, 0.1),
        ),
        "transformer": Recipe(
            title="sequence reversal, tiny transformer, batch 64",
            data=lambda: (*reversal_data(2048, seed=1), *reversal_data(512, seed=2)),
            net=Net(
                build=TinyTransformer,
                text="embedding 16×32 + positions, 1 pre-norm encoder layer (2 heads, ff 64), linear 32→16",
            ),
            batch_size=64,
            steps=300,
            targets=(1.5, 0.5),
        ),
        "charlm": Recipe(
            title="character language model, bundled text, batch 16",
            data=text_data,
            net=Net(
                build=lambda: CharTransformer(width=64, heads=4, layers=2, max_length=32),
                text="byte embedding 256×64 + positions, 2 pre-norm causal encoder layers (4 heads, ff 256), "
                "layer norm, linear 64→256",
            ),
            batch_size=16,
            steps=300,
            targets=(2.2, 1.2),
        ),
        "mnist": Recipe(
            title="MNIST ({n} train), batch 128",
            data=lambda: mnist_data(mnist_dir),
            net=mlp([784, 256, 256, 10]),
            batch_size=128,
            steps=600,
            eval_every=50,
            eval_subset=4096,
            targets=(0.5, 0.2),
            missing="MNIST: skipped — the IDX files (train-images-idx3-ubyte[.gz], …) were not found in "
            "--mnist-dir, $MNIST_DIR or data/MNIST/raw (the harness downloads nothing).",
        ),
    }


ALL_TASKS = tuple(recipes())


def build_task(name: str, recipe: Recipe, data: Split, device: Device, step_scale: float = 1.0) -> Task:
    """The task of ``recipe`` on ``data``, its tensors on the device and its budget times ``step_scale``."""
    steps = max(10, round(recipe.steps * step_scale))
    tx, ty, vx, vy = data
    ex, ey = tx, ty
    if recipe.eval_subset is not None:
        subset = torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))[: recipe.eval_subset]
        ex, ey = tx[subset], ty[subset]
    tx, ty, vx, vy, ex, ey = (t.to(device.torch_device) for t in (tx, ty, vx, vy, ex, ey))
    return Task(
        name=name,
        title=recipe.title.format(n=len(ty)),
        make_model=lambda: recipe.net.build().to(device.torch_device),
        train_x=tx,
        train_y=ty,
        eval_x=ex,
        eval_y=ey,
        val_x=vx,
        val_y=vy,
        batch_size=recipe.batch_size,
        steps=steps,
        eval_every=1 if recipe.batch_size is None else max(1, min(recipe.eval_every, steps // 4)),
        targets=recipe.targets,
        model_text=recipe.net.text,
        rigorous=recipe.net.rigorous,
    )


def make_tasks(
    names: list[str], device: Device, step_scale: float = 1.0, mnist_dir: str | None = None
) -> tuple[list[Task], list[str]]:
    """The requested tasks (their step budgets times ``step_scale``), and notes on the ones that
    could not be built (MNIST files absent)."""
    known = recipes(mnist_dir)
    tasks: list[Task] = []
    notes: list[str] = []
    unknown = [name for name in names if name not in known]
    if unknown:  # before any data are loaded
        raise SystemExit(f"unknown task {unknown[0]!r}; known: {', '.join(ALL_TASKS)}")
    for name in names:
        data = known[name].data()
        if data is None:
            notes.append(known[name].missing)
        else:
            tasks.append(build_task(name, known[name], data, device, step_scale))
    return tasks, notes
