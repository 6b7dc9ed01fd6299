"""The tasks of the quality benchmark: data (built here or read from local files, no downloads)
and the model each is trained with.

* ``digits``: scikit-learn's 1797 handwritten digits (8×8, ``X / 16``), a fixed 1437 / 360
  train / validation split; tanh MLP 64-128-128-10 — the rigorous class, where
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

import gzip
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from benchmarks.bench_common import ROOT, Device, tanh_mlp


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


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over samples (and over positions for sequence outputs)."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def accuracy(logits: Tensor, y: Tensor) -> float:
    return (logits.argmax(-1) == y).float().mean().item()


# ---------------------------------------------------------------------------------------------- data
def _split(n: int, n_val: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    x, y = sk_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


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


def _read_idx(path: str) -> Tensor:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    flat = torch.frombuffer(bytearray(data[4 + 4 * dims :]), dtype=torch.uint8)
    return flat[: math.prod(shape)].reshape(shape)


MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "val_x": "t10k-images-idx3-ubyte",
    "val_y": "t10k-labels-idx1-ubyte",
}


def find_mnist(directory: str | None) -> dict[str, str] | None:
    """Paths of the four MNIST IDX files (plain or ``.gz``) in the first candidate directory that
    holds all of them, or None."""
    candidates = [directory] if directory else []
    candidates += [os.environ.get("MNIST_DIR"), os.path.join(ROOT, "data", "MNIST", "raw"), os.path.join(ROOT, "data")]
    for folder in candidates:
        if not folder or not os.path.isdir(folder):
            continue
        found = {}
        for key, stem in MNIST_FILES.items():
            path = next(
                (
                    os.path.join(folder, stem + ext)
                    for ext in ("", ".gz")
                    if os.path.isfile(os.path.join(folder, stem + ext))
                ),
                None,
            )
            if path is None:
                break
            found[key] = path
        if len(found) == len(MNIST_FILES):
            return found
    return None


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


class CharLM(nn.Module):
    """Byte embeddings + learned positions + ``layers`` pre-norm causal encoder layers + a final
    layer norm + a linear head over the 256 byte values."""

    def __init__(self, width: int = 64, heads: int = 4, layers: int = 2, length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def text_windows(path: str, block: int = 32, stride: int = 16, held_out: float = 0.1) -> tuple[Tensor, ...]:
    """``(x, y)`` windows of ``block`` bytes (``y`` shifted by one) from the first ``1 − held_out``
    of the file's bytes and from the rest: ``train_x, train_y, val_x, val_y``."""
    with open(path, "rb") as handle:
        data = torch.tensor(list(handle.read()), dtype=torch.long)
    cut = int(len(data) * (1 - held_out))

    def windows(tokens: Tensor, step: int) -> tuple[Tensor, Tensor]:
        starts = range(0, len(tokens) - block, step)
        rows = torch.stack([tokens[s : s + block + 1] for s in starts])
        return rows[:, :-1], rows[:, 1:]

    return (*windows(data[:cut], stride), *windows(data[cut:], block // 2))


# ---------------------------------------------------------------------------------------------- tasks
def _on(device: Device, *tensors: Tensor) -> list[Tensor]:
    return [t.to(device.torch_device) for t in tensors]


def _factory(build: Callable[[], nn.Module], device: Device) -> Callable[[], nn.Module]:
    return lambda: build().to(device.torch_device)


def make_tasks(
    names: list[str], device: Device, step_scale: float = 1.0, mnist_dir: str | None = None
) -> tuple[list[Task], list[str]]:
    """The requested tasks (their step budgets times ``step_scale``), and notes on the ones that
    could not be built (MNIST files absent)."""
    tasks: list[Task] = []
    notes: list[str] = []

    def steps(n: int) -> int:
        return max(10, round(n * step_scale))

    def every(n: int, budget: int) -> int:
        return max(1, min(n, steps(budget) // 4))

    digits = None
    if any(n.startswith("digits") or n == "cnn" for n in names):
        x, y = load_digits()
        train, val = _split(len(y), 360)
        digits = (x[train], y[train], x[val], y[val])
    for name in names:
        if name in ("digits-full", "digits-64"):
            assert digits is not None
            tx, ty, vx, vy = _on(device, *digits)
            full = name == "digits-full"
            tasks.append(
                Task(
                    name=name,
                    title=f"digits, {'full batch' if full else 'batch 64'}",
                    make_model=_factory(lambda: tanh_mlp([64, 128, 128, 10]), device),
                    train_x=tx,
                    train_y=ty,
                    eval_x=tx,
                    eval_y=ty,
                    val_x=vx,
                    val_y=vy,
                    batch_size=None if full else 64,
                    steps=steps(200 if full else 400),
                    eval_every=1 if full else every(10, 400),
                    targets=(0.5, 0.1),
                    model_text="tanh MLP 64-128-128-10",
                    rigorous=True,
                )
            )
        elif name == "rings":
            tx, ty = rings_data(1024, seed=1)
            vx, vy = rings_data(1024, seed=2)
            tx, ty, vx, vy = _on(device, tx, ty, vx, vy)
            tasks.append(
                Task(
                    name=name,
                    title="rings (hidden 2-D subspace), full batch",
                    make_model=_factory(lambda: tanh_mlp([16, 128, 128, 4]), device),
                    train_x=tx,
                    train_y=ty,
                    eval_x=tx,
                    eval_y=ty,
                    val_x=vx,
                    val_y=vy,
                    batch_size=None,
                    steps=steps(300),
                    eval_every=1,
                    targets=(1.0, 0.3),
                    model_text="tanh MLP 16-128-128-4",
                    rigorous=True,
                )
            )
        elif name == "cnn":
            assert digits is not None
            tx, ty, vx, vy = _on(
                device, digits[0].reshape(-1, 1, 8, 8), digits[1], digits[2].reshape(-1, 1, 8, 8), digits[3]
            )
            tasks.append(
                Task(
                    name=name,
                    title="digits as images, ReLU CNN, batch 64",
                    make_model=_factory(ReluCNN, device),
                    train_x=tx,
                    train_y=ty,
                    eval_x=tx,
                    eval_y=ty,
                    val_x=vx,
                    val_y=vy,
                    batch_size=64,
                    steps=steps(300),
                    eval_every=every(10, 300),
                    targets=(0.5, 0.1),
                    model_text="conv 1→16 3×3, ReLU, conv 16→32 3×3 stride 2, ReLU, linear 512→64, ReLU, linear 64→10",
                    rigorous=False,
                )
            )
        elif name == "transformer":
            tx, ty = reversal_data(2048, seed=1)
            vx, vy = reversal_data(512, seed=2)
            tx, ty, vx, vy = _on(device, tx, ty, vx, vy)
            tasks.append(
                Task(
                    name=name,
                    title="sequence reversal, tiny transformer, batch 64",
                    make_model=_factory(TinyTransformer, device),
                    train_x=tx,
                    train_y=ty,
                    eval_x=tx,
                    eval_y=ty,
                    val_x=vx,
                    val_y=vy,
                    batch_size=64,
                    steps=steps(300),
                    eval_every=every(10, 300),
                    targets=(1.5, 0.5),
                    model_text="embedding 16×32 + positions, 1 pre-norm encoder layer (2 heads, ff 64), linear 32→16",
                    rigorous=False,
                )
            )
        elif name == "charlm":
            tx, ty, vx, vy = _on(device, *text_windows(os.path.join(ROOT, "examples", "data", "sample.txt")))
            tasks.append(
                Task(
                    name=name,
                    title="character language model, bundled text, batch 16",
                    make_model=_factory(CharLM, device),
                    train_x=tx,
                    train_y=ty,
                    eval_x=tx,
                    eval_y=ty,
                    val_x=vx,
                    val_y=vy,
                    batch_size=16,
                    steps=steps(300),
                    eval_every=every(10, 300),
                    targets=(2.2, 1.2),
                    model_text="byte embedding 256×64 + positions, 2 pre-norm causal encoder layers (4 heads, ff 256), "
                    "layer norm, linear 64→256",
                    rigorous=False,
                )
            )
        elif name == "mnist":
            files = find_mnist(mnist_dir)
            if files is None:
                notes.append(
                    "MNIST: skipped — the IDX files (train-images-idx3-ubyte[.gz], …) were not found in "
                    "--mnist-dir, $MNIST_DIR or data/MNIST/raw (the harness downloads nothing)."
                )
                continue
            tx = _read_idx(files["train_x"]).reshape(-1, 784).float() / 255.0
            ty = _read_idx(files["train_y"]).long()
            vx = _read_idx(files["val_x"]).reshape(-1, 784).float() / 255.0
            vy = _read_idx(files["val_y"]).long()
            subset = torch.randperm(len(ty), generator=torch.Generator().manual_seed(0))[: min(len(ty), 4096)]
            tx, ty, vx, vy, ex, ey = _on(device, tx, ty, vx, vy, tx[subset], ty[subset])
            tasks.append(
                Task(
                    name=name,
                    title=f"MNIST ({len(ty)} train), batch 128",
                    make_model=_factory(lambda: tanh_mlp([784, 256, 256, 10]), device),
                    train_x=tx,
                    train_y=ty,
                    eval_x=ex,
                    eval_y=ey,
                    val_x=vx,
                    val_y=vy,
                    batch_size=128,
                    steps=steps(600),
                    eval_every=every(50, 600),
                    targets=(0.5, 0.2),
                    model_text="tanh MLP 784-256-256-10",
                    rigorous=True,
                )
            )
        else:
            raise SystemExit(f"unknown task {name!r}; known: {', '.join(ALL_TASKS)}")
    return tasks, notes


ALL_TASKS = ("digits-full", "digits-64", "rings", "cnn", "transformer", "charlm", "mnist")
