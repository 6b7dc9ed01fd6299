"""A 2-process CPU (gloo) training run, launched as a script so that Lightning's popen launcher
can re-execute it for rank 1. Each rank saves its layer choices and full weights to --out.

    python tests/lightning/distributed_run.py --case dsgd_ddp --out DIR [--steps N] [--norm ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from helpers.lightning_models import Classifier, DSGDClassifier, RecordChoices, ShardedDSGDClassifier
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dsgd import DSGDDDPStrategy, DSGDModelParallelStrategy, DSGDSettings
from lightning_dsgd.cli import release_process_group


class PerturbRankOne(Callback):
    """Changes the weights of rank 1 only, after its third step: the verification must notice."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 3:
            with torch.no_grad():
                pl_module.net[0].weight.add_(0.1)


class BreakRankOneGradients(Callback):
    """Rank 1's gradients become inf/NaN in one layer before DSGD scores them, as if it had not
    synchronised them: the default agreement check must stop both ranks."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 2:
            pl_module.net[2].weight.grad.fill_(float("nan"))


class RecordWork(Callback):
    """Saves what DSGD's work plan made this rank do at every step (``work{rank}.pt``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        plan, pending = opt.work_plan, list(opt.constant_model.pending.values())
        self.steps.append(
            {
                "scored": plan.layers_scored,
                "gathered": plan.gradients_gathered,
                "bytes": plan.gathered_bytes,
                "alive": plan.most_gradients_alive,  # the most gathered full gradients alive at once
                "kept": sum(p.step.numel() * p.step.element_size() for p in pending),  # adaptive steps held
                "norms": list(plan.norms_computed),  # layers whose exact weight norms this rank computed
                # every followed weight-norm bound, as this rank holds it
                "bounds": [
                    {
                        i: {k: v.clone() if torch.is_tensor(v) else v for k, v in e.items()}
                        for i, e in b.state_dict().items()
                    }
                    for b, _, _ in opt.constant_model.followed_norms()
                ],
            }
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        full_bytes = sum(p.numel() * p.element_size() for layer in opt.layers for p in layer.params)
        torch.save(
            {
                "shared": opt.work_plan.shared,
                "owners": opt.work_plan.owners,
                "steps": self.steps,
                "full_gradient_bytes": full_bytes,
                "followed": [list(indices) for _, indices, _ in opt.constant_model.followed_norms()],
            },
            f"{self.out_dir}/work{trainer.global_rank}.pt",
        )


class StepTimer(Callback):
    """Wall time of every training batch (forward, backward, DSGD step) after a warm-up."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 5:
            self.times.append(time.perf_counter() - self._start)


def gather_cost(args: argparse.Namespace) -> None:
    """Median batch time with the default rank-agreement gather and without it (same run)."""
    import lightning_dsgd.lightning.mixin as mixin

    medians: dict[str, list[float]] = {"with": [], "without": []}
    for label in ("with", "without", "with", "without"):
        original = mixin.default_gatherer
        if label == "without":
            mixin.default_gatherer = lambda: None
        timer = StepTimer()
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
            default_root_dir=args.out,
        )
        trainer.fit(DSGDClassifier(batch_size=4, hidden=args.hidden, dsgd=DSGDSettings(norm=args.norm)))
        mixin.default_gatherer = original
        medians[label].append(sorted(timer.times)[len(timer.times) // 2])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        without, with_ = min(medians["without"]), min(medians["with"])
        print(
            f"batch time, median over {args.steps - 6} steps (best of 2 alternating runs): without the "
            f"agreement gather {without * 1e3:.3f} ms, with it {with_ * 1e3:.3f} ms (ratio {with_ / without:.3f})"
        )


def share_cost(args: argparse.Namespace) -> None:
    """Per rank, median time of DSGD's scoring (the dual norms) and of its whole step, with the
    work shared and with every rank scoring every layer (as one process does), alternating."""
    from torch import nn

    import lightning_dsgd.optimizer as optimizer

    class Deep(DSGDClassifier):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            h = self.hparams.hidden
            hidden = [m for _ in range(6) for m in (nn.Linear(h, h), nn.Tanh())]
            self.net = nn.Sequential(nn.Linear(6, h), nn.Tanh(), *hidden, nn.Linear(h, 3))

    times: dict[str, list[float]] = {}

    def timed(name: str, method):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = method(*a, **k)
            times.setdefault(name, []).append(time.perf_counter() - start)
            return out

        return wrapper

    original_norms, original_step = optimizer.DSGD._dual_norms, optimizer.DSGD.step
    medians: dict[tuple[str, bool], list[float]] = {}
    for share in (True, False, True, False):
        times.clear()
        optimizer.DSGD._dual_norms = timed("score", original_norms)
        optimizer.DSGD.step = timed("step", original_step)
        settings = DSGDSettings(norm=args.norm, constants=args.constants, share_work=share)
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            default_root_dir=args.out,
        )
        trainer.fit(Deep(batch_size=32, hidden=args.hidden, dsgd=settings))
        optimizer.DSGD._dual_norms, optimizer.DSGD.step = original_norms, original_step
        for name in ("score", "step"):
            warm = sorted(times[name][3:])
            medians.setdefault((name, share), []).append(warm[len(warm) // 2])
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    line = ", ".join(
        f"{name}: shared {min(medians[name, True]) * 1e3:.2f} ms vs every layer {min(medians[name, False]) * 1e3:.2f} "
        f"ms (ratio {min(medians[name, True]) / min(medians[name, False]):.2f})"
        for name in ("score", "step")
    )
    print(f"rank {rank}, hidden {args.hidden}, 8 layers, median over {args.steps - 3} steps, best of 2: {line}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--case",
        required=True,
        choices=[
            "dsgd_ddp",
            "ddp_with_mixin",
            "mixinless",
            "model_parallel",
            "diverge",
            "per_rank_seed",
            "unsynced",
            "gather_cost",
            "share_cost",
        ],
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="train whole epochs instead of --steps")
    parser.add_argument("--norm", default="spectral")
    parser.add_argument("--hidden", type=int, default=8, help="hidden width (48: the spectral blocks are sketched)")
    parser.add_argument("--constants", default="data")
    parser.add_argument("--selection", default="greedy")
    parser.add_argument("--checkpoints", default=None, help="save a checkpoint here after every epoch")
    parser.add_argument("--resume", default=None, help="resume from this checkpoint")
    parser.add_argument("--share-work", default="none", choices=["none", "true", "false"], help="DSGD's share_work")
    args = parser.parse_args()
    if args.case in ("gather_cost", "share_cost"):
        try:
            (gather_cost if args.case == "gather_cost" else share_cost)(args)
        finally:
            release_process_group()
        return
    share_work = {"none": None, "true": True, "false": False}[args.share_work]
    settings = DSGDSettings(
        norm=args.norm, constants=args.constants, selection=args.selection, seed=3, share_work=share_work
    )
    callbacks: list[Callback] = [RecordChoices(args.out), RecordWork(args.out)]
    if args.checkpoints:
        callbacks.append(
            ModelCheckpoint(args.checkpoints, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
        )
    ddp = DSGDDDPStrategy(dsgd=settings, verify_every_n_steps=1)
    if args.case == "dsgd_ddp":  # registered name, module with the mixin
        strategy, model = "dsgd_ddp", DSGDClassifier(batch_size=4, hidden=args.hidden, dsgd=settings)
    elif args.case == "ddp_with_mixin":  # Lightning's own DDP strategy: the mixin suffices
        strategy, model = "ddp", DSGDClassifier(batch_size=4, hidden=args.hidden, dsgd=settings)
    elif args.case == "mixinless":  # an unmodified automatic-optimization module
        strategy, model = ddp, Classifier(batch_size=4, hidden=args.hidden)
    elif args.case == "model_parallel":
        strategy = DSGDModelParallelStrategy(
            dsgd=settings, data_parallel_size=2, tensor_parallel_size=1, verify_every_n_steps=1
        )
        model = ShardedDSGDClassifier(batch_size=4, hidden=args.hidden)
    elif args.case == "per_rank_seed":  # random selection seeded differently on each rank
        rank_seed = DSGDSettings(selection="random", seed=int(os.environ.get("LOCAL_RANK", "0")))
        strategy, model = "ddp", DSGDClassifier(batch_size=4, hidden=args.hidden, dsgd=rank_seed)
    elif args.case == "unsynced":  # the default agreement check, no verify_every_n_steps
        strategy, model = "ddp", DSGDClassifier(batch_size=4, hidden=args.hidden, dsgd=settings)
        callbacks.append(BreakRankOneGradients())
    else:
        strategy, model = ddp, Classifier(batch_size=4, hidden=args.hidden)
        callbacks.append(PerturbRankOne())
    trainer = Trainer(
        accelerator="cpu",
        use_distributed_sampler=False,
        devices=2,
        strategy=strategy,
        max_steps=-1 if args.epochs else args.steps,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=bool(args.checkpoints),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=args.out,
    )
    try:
        trainer.fit(model, ckpt_path=args.resume)
    finally:
        release_process_group()


if __name__ == "__main__":
    main()
