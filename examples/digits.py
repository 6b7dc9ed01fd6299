"""DSGD on scikit-learn's handwritten digits (ships with scikit-learn: no download), with Lightning.

The model is an ordinary LightningModule (a tanh MLP 64-128-128-10 with cross-entropy, written for
Adam); ``DSGDMixin`` makes DSGD train it without touching its ``training_step``, with DSGD's
defaults: adaptive constants, every layer stepping along its own duality map with its own ``η/L_i``
(not certified). Then, as the contrast, it trains the same net from the same weights with the
paper's certified algorithm (``constants="data"``: one layer per step, each step's decrease proved)
and prints the two side by side. ``DSGDMonitor`` logs every step's layers and bounds to every
logger — a CSV file always, and W&B when wandb is installed (offline by default: no account
needed) — and draws the chart ``dsgd_layers.png`` at the end of each run. The first run's last
checkpoint is ``<log dir>/checkpoints/last.ckpt``.

    python -m examples.digits                          # what `make demo` runs
    python -m examples.digits --constants data --contrast off      # the certified algorithm alone
    python -m examples.digits --epochs 5 --norm linf --batch-size 0 --wandb off
    python -m examples.digits --epochs 40 --ckpt-path lightning_logs/digits/version_0/checkpoints/last.ckpt
    lightning-dsgd fit --config examples/configs/digits.yaml      # the first run with the CLI
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import DataLoader, TensorDataset

if __package__ in (None, ""):  # run as a file: the imports below need the repository root on sys.path
    sys.exit(f"Run the examples from the repository root as modules: python -m examples.{Path(__file__).stem}")

from examples.common import EpochTable, quiet_lightning, shuffled_batches
from examples.datasets import digits_split
from examples.models import TanhMLP
from lightning_dsgd import DSGDMixin, DSGDMonitor, DSGDSettings
from lightning_dsgd.optimizer import DEFAULT_CONSTANTS


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 1797 digits (8×8 pixels scaled to [0, 1]), split into train/validation
    (stratified, fixed by ``seed``).

    Args:
        batch_size: training batch size; ``0`` = full batch (the same whole split every step).
        val_fraction: share of the data held out for validation.
        seed: the split and the shuffling order (epoch ``e`` is shuffled from ``seed + e``, so that a
            run resumed from a checkpoint continues exactly).
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.train: TensorDataset | None = None
        self.val: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        x_train, y_train, x_val, y_val = digits_split(self.val_fraction, self.seed)
        self.train = TensorDataset(x_train, y_train)
        self.val = TensorDataset(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        assert self.train is not None
        return shuffled_batches(self.train, self.batch_size, self.seed)  # resumes exactly: seed + epoch

    def val_dataloader(self) -> DataLoader:
        assert self.val is not None
        return DataLoader(self.val, batch_size=len(self.val))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class DSGDTanhMLP(DSGDMixin, TanhMLP):
    """The ordinary module of ``examples/models.py``, trained by DSGD: nothing else changes."""


def make_loggers(root: str, wandb_mode: str, name: str = "digits") -> list[Logger]:
    """A CSV logger always (first, so that the chart lands beside ``metrics.csv``), and an offline
    (or online) W&B logger when wandb is installed and ``wandb_mode`` is not ``off``."""
    loggers: list[Logger] = [CSVLogger(root, name=name)]
    if wandb_mode != "off":
        try:
            import wandb
        except ImportError:
            print("wandb is not installed: logging to CSV only (pip install wandb for W&B charts).")
        else:
            settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
            offline = wandb_mode == "offline"
            logger = WandbLogger(project="lightning-dsgd", save_dir=root, offline=offline, settings=settings)
            logger._wandb_init.pop("anonymous", None)  # Lightning 2.6 passes anonymous=None; wandb 0.31 warns
            loggers.append(logger)
    return loggers


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: no limit)")
    parser.add_argument("--batch-size", type=int, default=64, help="0 = full batch")
    parser.add_argument("--norm", choices=["spectral", "frobenius", "linf"], default="spectral")
    parser.add_argument(
        "--constants",
        choices=["data", "architecture", "adaptive"],
        default=DEFAULT_CONSTANTS,
        help=f"{DEFAULT_CONSTANTS} (DSGD's default): every layer steps, not certified; data / architecture: "
        "the paper's certified algorithm, one layer per step",
    )
    parser.add_argument("--selection", choices=["greedy", "random", "cyclic"], default="greedy")
    parser.add_argument("--eta", type=float, default=1.0, help="step multiplier in (0, 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wandb", choices=["offline", "online", "off"], default="offline")
    parser.add_argument("--log-every", type=int, default=1, help="log DSGD's decisions every n steps")
    parser.add_argument("--out", default="lightning_logs", help="folder for the logs and the chart")
    parser.add_argument(
        "--ckpt-path", default=None, help="resume from this checkpoint (e.g. a previous run's last.ckpt)"
    )
    parser.add_argument(
        "--contrast",
        choices=["on", "off"],
        default="on",
        help="then train the same net from the same weights with the other kind of constants (the paper's "
        "certified algorithm after estimated constants, adaptive after certified ones) and compare the two",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1 is the fastest for a model this small)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train with the requested settings (the defaults: adaptive constants, every layer steps), then,
    with ``--contrast on``, the same net with the other constants; print and return both."""
    args = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(args.threads)
    result = train(args, args.constants, name="digits", main=True)
    if args.contrast == "off":
        return {**result, "contrast": None}
    other = "data" if args.constants == "adaptive" else "adaptive"
    print(f"\nThe contrast, constants={other}: {_KIND[other]}. The same net, data and initial weights:")
    contrast = train(args, other, name=f"digits_{other}", main=False)
    print()
    _compare([result, contrast])
    return {**result, "contrast": contrast}


_KIND = {
    "adaptive": "estimated constants, every layer steps (greedy selection), not certified",
    "data": "the paper's certified algorithm, one layer per step, its decrease proved",
    "architecture": "the paper's certified algorithm (worst-case input bounds), one layer per step",
}


def train(args: argparse.Namespace, constants: str, name: str, main: bool) -> dict[str, Any]:
    """One fit of the tanh MLP from the seed's weights. The main run logs to W&B too, saves the last
    checkpoint, resumes from ``--ckpt-path`` and prints every epoch; the contrast run logs to CSV
    (and its own chart) only and prints every 10th epoch."""
    seed_everything(args.seed, verbose=False)
    settings = DSGDSettings(
        norm=args.norm,
        constants=constants,  # type: ignore[arg-type]
        eta=args.eta,
        selection=args.selection,
        seed=args.seed,
        full_batch=args.batch_size == 0,
    )
    model = DSGDTanhMLP(widths=[64, 128, 128, 10], dsgd=settings)
    data = DigitsDataModule(batch_size=args.batch_size, seed=args.seed)
    loggers = make_loggers(args.out, args.wandb if main else "off", name)
    monitor = DSGDMonitor(full_batch=args.batch_size == 0)
    table = EpochTable(every_n_epochs=1 if main else 10)
    callbacks: list[Callback] = [monitor, table]
    checkpoint = ModelCheckpoint(save_top_k=0, save_last=True)  # <log dir>/checkpoints/last.ckpt, every epoch
    if main:
        callbacks.append(checkpoint)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        logger=loggers,
        callbacks=callbacks,
        log_every_n_steps=args.log_every,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=main,
        num_sanity_val_steps=0,
    )
    if main:
        print(
            f"DSGD on scikit-learn digits: tanh MLP 64-128-128-10, norm={args.norm}, constants={constants}, "
            f"selection={args.selection}, eta={args.eta}, batch={args.batch_size or 'full'}"
        )
    trainer.fit(model, data, ckpt_path=args.ckpt_path if main else None)
    opt = model.dsgd_optimizer
    val = trainer.validate(model, data, verbose=False)[0]
    wandb_dir = _finish_wandb(loggers)
    csv_dir = Path(loggers[0].log_dir)
    counts = dict(zip(opt.layer_names, opt.selection_counts, strict=True))
    picks = dict(zip(opt.layer_names, table.picks, strict=True))
    shares = table.shares()
    moved = opt.steps_taken - opt.skipped_steps
    certified = "every step certified" if opt.certified else "not certified: estimated constants"
    if opt.layers_per_step > 1:
        print(
            f"layer choices over {opt.steps_taken} steps: every layer moved at every step "
            f"({opt.skipped_steps} skipped; {certified})"
        )
        print("  share of the estimated decrease: " + ", ".join(f"{n} {v:.0%}" for n, v in shares.items()))
        print(
            "  greedy pick (the largest estimated decrease, the layer one-layer DSGD would move): "
            + ", ".join(f"{n} {c}" for n, c in picks.items())
        )
    else:
        print(f"layer choices over {opt.steps_taken} steps: {counts} ({opt.skipped_steps} skipped; {certified})")
    print(f"validation: loss {val['val/loss']:.4f}, accuracy {val['val/acc']:.2%}")
    only = [n for n, c in counts.items() if c == moved]
    if len(only) == 1 and moved > 1 and opt.certified:
        print(
            f"({only[0]} won every step: the certified constants of the layers below it grow with its weights — "
            "bottom panel of the chart.)"
        )
    print(f"metrics (CSV):      {csv_dir / 'metrics.csv'}")
    if main:
        print(f"checkpoint:         {checkpoint.last_model_path}  (resume: see docs/guide/checkpoints.md)")
    if monitor.png_path is not None:
        print(f"layer-choice chart: {monitor.png_path}")
    if wandb_dir is not None:
        hint = f"  (offline; to upload: wandb sync {wandb_dir})" if "offline" in wandb_dir.name else ""
        print(f"W&B run:            {wandb_dir}{hint}")
    return {
        "constants": constants,
        "steps": opt.steps_taken,
        "layers_per_step": opt.layers_per_step,
        "choice_counts": counts,
        "greedy_picks": picks,
        "decrease_shares": shares,
        "skipped_steps": opt.skipped_steps,
        "certified": opt.certified,
        "val_loss": val["val/loss"],
        "val_accuracy": val["val/acc"],
        "metrics_csv": csv_dir / "metrics.csv",
        "checkpoint": Path(checkpoint.last_model_path) if main else None,
        "png": monitor.png_path,
        "wandb_dir": wandb_dir,
    }


def _compare(results: list[dict[str, Any]]) -> None:
    """The two runs side by side: what moved, how well it trained, what is proved."""
    print(f"{'constants':<13}{'steps':>6}  {'layers moved':<34}{'val/loss':>9}{'val/acc':>9}  certified")
    for r in results:
        if r["layers_per_step"] > 1:
            moved = f"every layer, every step ({len(r['choice_counts'])})"
        else:
            moved = " ".join(f"{n}:{c}" for n, c in r["choice_counts"].items() if c)
        certified = "every step" if r["certified"] else "no (estimated)"
        numbers = f"{r['val_loss']:>9.4f}{r['val_accuracy']:>9.2%}"
        print(f"{r['constants']:<13}{r['steps']:>6}  {moved:<34}{numbers}  {certified}")


def _finish_wandb(loggers: list[Logger]) -> Path | None:
    """Close the W&B run (Lightning leaves it open) and return its folder."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            run_dir = Path(logger.experiment.dir).parent
            wandb.finish()
            return run_dir
    return None


if __name__ == "__main__":
    main()
