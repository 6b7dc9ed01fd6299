"""Cost of :class:`~lightning_dsgd.lightning.callback.DSGDMonitor` on training speed.

Trains a tanh MLP (``--width`` wide, ``--depth`` layers) with DSGD for ``--steps`` steps, with and
without the monitor, at ``log_every_n_steps`` 50 and 1, and (observe-only mode) the same model
trained by Adam. Every arm logs to a ``CSVLogger``, so the baseline pays Lightning's own logging
too. The arms run alternately ``--repeats`` times (load drift hits all alike); the time per step is
measured from step ``--warmup`` to the end of training (setup and the end-of-fit picture excluded)
and the median is reported. The time is this process's CPU time (``--clock process``, robust to
other processes on a shared machine) or wall-clock time (``--clock wall``, for GPUs).

    python -m benchmarks.callback_overhead
    python -m benchmarks.callback_overhead --width 512 --steps 400 --threads 4
    python -m benchmarks.callback_overhead --observe-norm frobenius   # cheaper observation (no SVD)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_common import mlp_widths
from examples.models import tanh_mlp
from lightning_dsgd import DSGDMixin, DSGDSettings
from lightning_dsgd.lightning.callback import DSGDMonitor


class MLP(LightningModule):
    """Tanh MLP on fixed random data; Adam unless DSGDMixin is mixed in."""

    def __init__(self, features: int, width: int, depth: int, classes: int, batches: int, batch_size: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = tanh_mlp(mlp_widths(features, width, depth, classes))
        x = torch.randn(batches * batch_size, features)
        self.data = TensorDataset(x, (x @ torch.randn(features, classes)).argmax(1))
        self.batch_size = batch_size

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


class DSGDMLP(DSGDMixin, MLP):
    pass


class StepTimer(Callback):
    """Seconds per step from batch ``warmup`` to the end of training."""

    def __init__(self, warmup: int, clock: str) -> None:
        self.warmup = warmup
        self.clock = time.process_time if clock == "process" else time.perf_counter
        self.start = 0.0
        self.per_step = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = self.clock()

    def on_train_end(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.per_step = (self.clock() - self.start) / (trainer.global_step - self.warmup)


def run_arm(module_cls: type[MLP], monitor: bool, every: int, args: argparse.Namespace, root: str) -> float:
    timer = StepTimer(args.warmup, args.clock)
    observe = DSGDSettings(norm=args.observe_norm)
    callbacks: list[Callback] = [timer] + ([DSGDMonitor(plot=False, observe=observe)] if monitor else [])
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        log_every_n_steps=every,
        logger=CSVLogger(root),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    model = module_cls(args.features, args.width, args.depth, args.classes, args.batches, args.batch_size)
    trainer.fit(model)
    return timer.per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=50, help="batches per epoch")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--observe-norm", default="spectral", help="the norm observe-only mode scores with")
    parser.add_argument("--clock", choices=["process", "wall"], default="process")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(
            f"--warmup ({args.warmup}) must be at least 0 and less than --steps ({args.steps}): the time per step "
            "is measured over the steps after the warm-up; raise --steps or lower --warmup."
        )
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    arms = {
        (name, monitor, every): cls
        for name, cls in (("DSGD", DSGDMLP), ("Adam (observe-only)", MLP))
        for every in (50, 1)
        for monitor in (False, True)
    }
    times: dict[tuple, list[float]] = {key: [] for key in arms}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeats):
            for (name, monitor, every), cls in arms.items():
                times[(name, monitor, every)].append(run_arm(cls, monitor, every, args, root))

    print(
        f"MLP {args.features}→{args.width}×{args.depth - 1}→{args.classes}, batch {args.batch_size}, "
        f"{args.steps} steps ({args.warmup} warm-up), {args.threads} thread(s), {args.accelerator}, "
        f"{args.clock} time, median of {args.repeats}; "
        f"observe-only mode scores with norm={args.observe_norm!r}"
    )
    print(f"{'optimizer':<22}{'log_every_n_steps':>18}{'without (ms/step)':>20}{'with (ms/step)':>17}{'ratio':>8}")
    for name in ("DSGD", "Adam (observe-only)"):
        for every in (50, 1):
            without = statistics.median(times[(name, False, every)]) * 1e3
            with_ = statistics.median(times[(name, True, every)]) * 1e3
            print(f"{name:<22}{every:>18}{without:>20.3f}{with_:>17.3f}{with_ / without:>8.3f}")


if __name__ == "__main__":
    main()
