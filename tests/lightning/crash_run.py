"""A training run that can kill itself with SIGKILL (kill -9) during training or while a checkpoint
is being saved, then be resumed. Saves the final weights and DSGD's counters to --out/final.pt.

    python tests/lightning/crash_run.py --out DIR --ckpt DIR [--kill-during train|save --kill-at STEP]
                                        [--resume CKPT] [--epochs N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from helpers.lightning_models import DSGDClassifier
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dsgd import DSGDSettings


class KillSelf(Callback):
    def __init__(self, during: str, step: int) -> None:
        self.during, self.step = during, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.during == "train" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.during == "save" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint is assembled, not yet written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--kill-during", choices=["train", "save"], default=None)
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--selection", default="random")
    parser.add_argument("--constants", default="adaptive")
    args = parser.parse_args()
    settings = DSGDSettings(selection=args.selection, constants=args.constants, seed=5)
    callbacks: list[Callback] = [
        ModelCheckpoint(args.ckpt, every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    ]
    if args.kill_during:
        callbacks.append(KillSelf(args.kill_during, args.kill_at))
    model = DSGDClassifier(batch_size=8, dsgd=settings)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        default_root_dir=args.out,
    )
    trainer.fit(model, ckpt_path=args.resume)
    dsgd = model.dsgd_optimizer
    torch.save(
        {
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "steps_taken": dsgd.steps_taken,
            "global_step": trainer.global_step,
            "skipped": dsgd.skipped_steps,
        },
        Path(args.out) / "final.pt",
    )


if __name__ == "__main__":
    main()
