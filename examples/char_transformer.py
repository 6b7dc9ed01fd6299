"""A small character-level transformer on a text file of your choice (bytes as tokens, so any
UTF-8 text works). Embeddings, attention, layer norms and MLPs are outside DSGD's rigorous class:
DSGD estimates their constants and corrects them by the curvature it meets (not certified).

    python -m examples.char_transformer                     # the bundled sample, examples/data/sample.txt
    python -m examples.char_transformer --data.init_args.path my_book.txt --trainer.max_epochs 20
    lightning-dsgd fit --config examples/configs/char_transformer.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # run as a file: the imports below need the repository root on sys.path
    sys.exit(f"Run the examples from the repository root as modules: python -m examples.{Path(__file__).stem}")

from examples.common import ROOT
from examples.models import Classifier

SAMPLE = "examples/data/sample.txt"


def read_tokens(path: str | Path, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """The file's bytes as tokens: the first ``1 − val_fraction`` (training) and the rest."""
    tokens = torch.tensor(list(Path(path).read_bytes()), dtype=torch.long)
    split = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:split], tokens[split:]


class Windows(Dataset):
    """``(x, y)`` pairs of ``block_size`` tokens, ``y`` shifted by one, starting every ``stride`` tokens."""

    def __init__(self, tokens: Tensor, block_size: int, stride: int) -> None:
        if len(tokens) <= block_size:
            raise ValueError(f"The text has {len(tokens)} bytes: it needs more than block_size={block_size}.")
        self.tokens, self.block_size = tokens, block_size
        self.starts = list(range(0, len(tokens) - block_size, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = self.starts[index]
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]

    def tensors(self) -> tuple[Tensor, Tensor]:
        """Every pair at once: ``x`` and ``y`` of shape ``(len(self), block_size)``."""
        rows = torch.stack([self.tokens[s : s + self.block_size + 1] for s in self.starts])
        return rows[:, :-1], rows[:, 1:]


class CharDataModule(LightningDataModule):
    """The bytes of a text file: the first ``1 − val_fraction`` for training, the rest for validation.

    Args:
        path: the text file; a relative path is looked up from the current directory, then from
            the repository root (so the bundled sample is found from anywhere).
        block_size: tokens per training sequence.
        batch_size: sequences per batch.
        stride: tokens between the starts of consecutive sequences (default ``block_size // 2``).
        val_fraction: share of the text (its end) held out for validation.
        seed: the shuffling order.
    """

    def __init__(
        self,
        path: str = SAMPLE,
        block_size: int = 64,
        batch_size: int = 32,
        stride: int | None = None,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path = path
        self.block_size = block_size
        self.batch_size = batch_size
        self.stride = stride or max(block_size // 2, 1)
        self.val_fraction = val_fraction
        self.seed = seed
        self.train: Windows | None = None
        self.val: Windows | None = None

    def text_path(self) -> Path:
        path = Path(self.path).expanduser()
        if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
            path = ROOT / path
        if not path.is_file():
            raise FileNotFoundError(
                f"No text file at {path.resolve()}: pass a UTF-8 text file as data.init_args.path "
                f"(the bundled sample is {SAMPLE})."
            )
        return path

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        train, val = read_tokens(self.text_path(), self.val_fraction)
        self.train = Windows(train, self.block_size, self.stride)
        self.val = Windows(val, min(self.block_size, len(val) - 1), self.block_size)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None
        return DataLoader(self.val, batch_size=256)


class CharTransformer(Classifier):
    """Token and position embeddings, ``layers`` pre-norm causal encoder layers, a final layer
    norm and a linear head over the 256 byte values (an ordinary module, for Adam).

    Args:
        width: embedding width. heads: attention heads. layers: encoder layers.
        max_length: the longest sequence (positions). lr: Adam's learning rate without DSGD.
    """

    def __init__(
        self, width: int = 64, heads: int = 4, layers: int = 2, max_length: int = 256, lr: float = 1e-3
    ) -> None:
        super().__init__(lr)
        self.save_hyperparameters()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Embedding(max_length, width)
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

    @torch.no_grad()
    def generate(self, prompt: str, length: int = 200, temperature: float = 0.8, seed: int = 0) -> str:
        """Sample ``length`` bytes after ``prompt``."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        tokens = torch.tensor([list(prompt.encode())], dtype=torch.long, device=self.device)
        for _ in range(length):
            logits = self(tokens[:, -self.hparams.max_length :])[:, -1] / temperature
            choice = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens = torch.cat([tokens, choice], dim=1)
        return bytes(tokens[0].tolist()).decode("utf-8", errors="replace")


class SampleText(Callback):
    """Prints a sample of generated text at the end of training (rank 0).

    Args:
        prompt: the text to continue. length: bytes to generate.
    """

    def __init__(self, prompt: str = "The ", length: int = 160) -> None:
        self.prompt = prompt
        self.length = length
        self.text: str | None = None

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(pl_module, CharTransformer):
            was_training = pl_module.training
            pl_module.eval()
            self.text = pl_module.generate(self.prompt, self.length)
            pl_module.train(was_training)
            print(f"sample: {self.text!r}", flush=True)


if __name__ == "__main__":
    from examples.common import run_config

    run_config("char_transformer.yaml")
