"""A 2-process CPU (gloo) run with DSGDMonitor, launched as a script so that Lightning's popen
launcher can re-execute it for rank 1. Each rank saves what its monitor computed to --out.

    python tests/lightning/monitor_run.py --mode {dsgd,observe,full_batch} --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from helpers.lightning_models import Classifier, DSGDClassifier
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, DistributedSampler

from lightning_dsgd import DSGDSettings
from lightning_dsgd.cli import release_process_group
from lightning_dsgd.lightning.callback import DSGDMonitor


def shard_in_order(model: LightningModule, batch_size: int) -> None:
    """Rank r reads samples r, r+2, … in order (Lightning's own sampler would shuffle)."""
    data = model.train_dataloader().dataset

    def train_dataloader() -> DataLoader:
        return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, shuffle=False))

    model.train_dataloader = train_dataloader  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["dsgd", "observe", "full_batch"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    monitor = DSGDMonitor(full_batch=args.mode == "full_batch", plot=False)
    if args.mode == "dsgd":  # 8 steps of 2×4 samples per epoch; random choices so the counts vary
        model, batch_size, epochs = DSGDClassifier(dsgd=DSGDSettings(selection="random", seed=3)), 4, 2
    elif args.mode == "observe":  # Adam, observed at every 2nd step
        model, batch_size, epochs = Classifier(), 4, 2
    else:  # each rank holds half of the 64 samples: every step is a full-batch step
        model, batch_size, epochs = DSGDClassifier(), 32, 6
    shard_in_order(model, batch_size)
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        max_epochs=epochs,
        log_every_n_steps=1 if args.mode != "observe" else 2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[monitor],
        default_root_dir=args.out,
    )
    try:
        trainer.fit(model)
    finally:
        release_process_group()
    torch.save(
        {
            "epoch_counts": monitor.epoch_counts,
            "steps": monitor.history.steps,
            "layers": monitor.history.layers,
            "realized": monitor.history.realized,
            "guaranteed": monitor.history.guaranteed,
            "violations": monitor.bound_violations,
            "local_counts": monitor.selection.counts.tolist(),
        },
        f"{args.out}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
