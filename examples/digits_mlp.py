"""Train a tanh MLP (64-128-128-10) on scikit-learn's handwritten digits with DSGD, in plain PyTorch.

Each ``DSGD.step`` scores every layer and updates only the one with the largest guaranteed
decrease. Per epoch this script prints the loss on the whole train split, the validation
accuracy, how often each layer was chosen, the mean guaranteed decrease
``η(1 − η/2)·‖g_i‖²_* / L_i`` of the steps (a certified bound on each step's drop of its
mini-batch loss) and the last step's stationarity measure ``max_i ‖g_i‖_* / √L_i``.

    python -m examples.digits_mlp                          # spectral norm, data constants, greedy
    python -m examples.digits_mlp --norm linf --selection cyclic --batch-size 0
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from itertools import groupby
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a file: the imports below need the repository root on sys.path
    sys.exit(f"Run the examples from the repository root as modules: python -m examples.{Path(__file__).stem}")

from examples.datasets import digits_split
from examples.models import tanh_mlp
from lightning_dsgd import DSGD, StepRecord


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on a whole split (no grad, so DSGD's input-norm hooks skip it)."""
    logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def train_step(model: nn.Module, opt: DSGD, x: Tensor, y: Tensor) -> StepRecord:
    """One DSGD step on a batch; the closure's forward also records the input norms DSGD needs."""

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_step is not None
    return opt.last_step


def run_length(choices: list[str], limit: int = 40) -> str:
    """``fc3*5 fc2 fc3*2 ...`` for the first ``limit`` choices."""
    runs = [(name, len(list(group))) for name, group in groupby(choices[:limit])]
    text = " ".join(name if n == 1 else f"{name}*{n}" for name, n in runs)
    return text + (" ..." if len(choices) > limit else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", choices=["spectral", "frobenius", "linf"], default="spectral")
    parser.add_argument("--constants", choices=["data", "architecture"], default="data")
    parser.add_argument("--selection", choices=["greedy", "random", "cyclic"], default="greedy")
    parser.add_argument("--eta", type=float, default=1.0, help="step multiplier in (0, 2)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64, help="0 = full batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0.0 < args.eta < 2.0:
        parser.error(f"--eta must lie in (0, 2), got {args.eta}")
    if args.epochs < 0 or args.batch_size < 0:
        parser.error("--epochs and --batch-size must be >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    x_train, y_train, x_val, y_val = digits_split(seed=args.seed)
    batch_size = args.batch_size if args.batch_size > 0 else len(x_train)
    loader = DataLoader(
        TensorDataset(x_train, y_train),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = tanh_mlp([64, 128, 128, 10])
    opt = DSGD(model, norm=args.norm, constants=args.constants, eta=args.eta, selection=args.selection, seed=args.seed)
    names = opt.layer_names

    print(
        f"DSGD norm={args.norm} constants={args.constants} selection={args.selection} eta={args.eta} | "
        f"digits: {len(x_train)} train / {len(x_val)} val, batch {batch_size}, {len(loader)} steps/epoch"
    )
    loss0, _ = evaluate(model, x_train, y_train)
    _, acc0 = evaluate(model, x_val, y_val)
    choice_header = " ".join(f"{name:>4}" for name in names)
    print(f"{'epoch':>5} {'train loss':>10} {'val acc':>8}  {choice_header}  {'mean decr.':>10} {'stationarity':>12}")
    print(f"{0:>5} {loss0:>10.4f} {acc0:>8.2%}")

    choices: list[str] = []
    start = time.perf_counter()
    train_loss, val_acc = loss0, acc0
    for epoch in range(1, args.epochs + 1):
        epoch_choices: list[str] = []
        decreases: list[Tensor] = []
        for xb, yb in loader:
            record = train_step(model, opt, xb, yb)
            epoch_choices.append(record.layer_name or "skipped")
            decreases.append(record.guaranteed_decrease)
        choices += epoch_choices
        train_loss, _ = evaluate(model, x_train, y_train)
        _, val_acc = evaluate(model, x_val, y_val)
        counts = Counter(epoch_choices)
        row = " ".join(f"{counts[name]:>4}" for name in names)
        mean_decrease = torch.stack(decreases).mean().item()
        print(
            f"{epoch:>5} {train_loss:>10.4f} {val_acc:>8.2%}  {row}  {mean_decrease:>10.2e} "
            f"{record.stationarity.item():>12.3e}"  # the last step's max_i ‖g_i‖_* / √L_i
        )
    elapsed = time.perf_counter() - start

    totals = Counter(choices)
    summary = ", ".join(f"{name} {totals[name]}" for name in [*names, "skipped"] if totals[name])
    print(f"\nlayer choices over {len(choices)} steps: {summary}")
    print(f"first choices: {run_length(choices)}")
    print(f"train loss {loss0:.4f} -> {train_loss:.4f}; final val accuracy {val_acc:.2%} ({elapsed:.1f} s training)")
    return {
        "initial_train_loss": loss0,
        "train_loss": train_loss,
        "val_accuracy": val_acc,
        "choice_counts": {name: totals[name] for name in names},
        "skipped_steps": opt.skipped_steps,
        "steps": len(choices),
    }


if __name__ == "__main__":
    main()
