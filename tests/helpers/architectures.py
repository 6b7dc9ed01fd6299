"""Models outside the rigorous class, built here (no downloads): a ReLU CNN, a small residual
network and a small transformer, each with a learnable synthetic task."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ReluCNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, features: int = 10, width: int = 16, depth: int = 3, classes: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(Residual(width) for _ in range(depth))
        self.out = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


class TinyTransformer(nn.Module):
    """Token embedding + learned positions + one pre-norm encoder layer + a linear head."""

    def __init__(self, vocab: int = 12, length: int = 8, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(length, width))
        self.encoder = nn.TransformerEncoderLayer(
            width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.position))


def image_task(n: int = 96, seed: int = 0) -> tuple[Tensor, Tensor]:
    """8×8 images whose class is the quadrant holding a bright blob."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for i, label in enumerate(y.tolist()):
        r, c = [(0, 0), (0, 4), (4, 0)][label]
        x[i, 0, r : r + 4, c : c + 4] += 1.0
    return x, y


def vector_task(n: int = 128, features: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (torch.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] > 0).long() + (x[:, 3] > 1).long()
    return x, y


def sequence_task(n: int = 64, length: int = 8, vocab: int = 12, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Predict, at every position, the token one step back (a copy task needing attention)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, length), generator=g)
    return tokens, torch.roll(tokens, 1, dims=1)
