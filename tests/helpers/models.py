"""Small models and data shared by the tests (no downloads)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def mlp(
    widths: Sequence[int],
    activation: str | Sequence[str] = "tanh",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    weight_scale: float = 1.0,
) -> nn.Sequential:
    """``Linear(widths[0], widths[1]) act … Linear(widths[-2], widths[-1])`` with seeded weights."""
    n = len(widths) - 1
    acts = [activation] * (n - 1) if isinstance(activation, str) else list(activation)
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for k in range(n):
        modules.append(nn.Linear(widths[k], widths[k + 1], dtype=dtype))
        if k < n - 1:
            modules.append(ACTIVATIONS[acts[k]]())
    model = nn.Sequential(*modules)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(weight_scale)
    return model


def classification_data(
    n: int, features: int, classes: int, *, seed: int = 0, scale: float = 1.0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs with labels from a random linear teacher (learnable, not separable by chance)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=dtype) * scale
    teacher = torch.randn(features, classes, generator=g, dtype=dtype)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=g, dtype=dtype)).argmax(1)
    return x, y


def full_batch_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def make_closure(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        opt.zero_grad()
        loss = full_batch_loss(model, x, y)
        loss.backward()
        return loss

    return closure
