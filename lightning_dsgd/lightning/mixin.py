"""``DSGDMixin``: run DSGD inside Lightning's manual-optimization loop, around the user's own
``training_step``.

``class MyModel(DSGDMixin, MyExistingModule)`` keeps the user's ``training_step`` (it returns the
loss, as in automatic mode); per batch the mixin does one ``manual_backward`` and, at the end of
each accumulation window, one ``LightningOptimizer.step()`` — so ``global_step``, ``max_steps``,
step-based checkpoints and validation intervals behave as in automatic mode, and the precision
plugin unscales AMP gradients before DSGD sees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from lightning_dsgd.distributed import default_reducer
from lightning_dsgd.lightning.settings import DSGDSettings
from lightning_dsgd.optimizer import DSGD

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch without FSDP2
    FSDPModule = ()  # type: ignore[assignment,misc]


class DSGDMixin:
    """Mix in *before* a LightningModule: ``class MyModel(DSGDMixin, MyModule)``.

    Settings come from the class attribute ``dsgd`` or the constructor argument ``dsgd=`` (a
    [DSGDSettings][lightning_dsgd.DSGDSettings], also settable from a LightningCLI YAML as ``model.init_args.dsgd``).
    """

    dsgd: DSGDSettings = DSGDSettings()

    def __init__(self, *args: Any, dsgd: DSGDSettings | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # save_hyperparameters() in the user's __init__ also collects this frame's `dsgd`; keep it
        # out of the checkpoint's hyperparameters (an η-scheduler callable may not pickle).
        for hparams in (getattr(self, "_hparams", None), getattr(self, "_hparams_initial", None)):
            if hparams is not None:
                hparams.pop("dsgd", None)
        if dsgd is not None:
            self.dsgd = dsgd

    # ------------------------------------------------------------------ manual optimization
    @property
    def automatic_optimization(self) -> bool:
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        # LightningModule.__init__ assigns the attribute; remember what the user's own code asked for.
        self._automatic_optimization = value

    @property
    def dsgd_optimizer(self) -> DSGD:
        """The raw [DSGD][lightning_dsgd.DSGD] optimizer (reads and writes reach it, unlike the Lightning wrapper)."""
        return self.trainer.optimizers[0]  # type: ignore[attr-defined,return-value]

    def configure_optimizers(self) -> Any:
        settings = self.dsgd
        optimizer = DSGD(self, reduce_max=default_reducer(), **settings.optimizer_kwargs())  # type: ignore[arg-type]
        if settings.eta_scheduler is None:
            return optimizer
        scheduler = settings.eta_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": settings.eta_scheduler_interval,
                "frequency": settings.eta_scheduler_frequency,
            },
        }

    def configure_callbacks(self) -> Any:
        """Runs before Lightning validates the Trainer: refuse the flags manual optimization cannot
        honour, naming the DSGD setting that does the same job."""
        trainer = self.trainer  # type: ignore[attr-defined]
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) does not work with DSGD, which "
                "runs in manual optimization. Remove it from the Trainer and set "
                f"DSGDSettings(accumulate_grad_batches={trainer.accumulate_grad_batches}) instead."
            )
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) does not work with DSGD, which runs in "
                "manual optimization. Remove it from the Trainer and set "
                f"DSGDSettings(gradient_clip_val={trainer.gradient_clip_val}, gradient_clip_algorithm="
                f"{trainer.gradient_clip_algorithm or 'norm'!r}) instead."
            )
        return super().configure_callbacks()  # type: ignore[misc]

    # ------------------------------------------------------------------ the training step
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self, "_automatic_optimization", True):
            raise RuntimeError(
                f"{type(self).__name__} sets automatic_optimization = False and steps its own optimizers; "
                "DSGDMixin needs a training_step that returns the loss (as in automatic optimization)."
            )
        output = super().training_step(*args, **kwargs)  # type: ignore[misc]
        loss = _loss_of(output)
        if loss is None:  # the user skipped this batch, as automatic optimization allows
            return output
        window = self.dsgd.accumulate_grad_batches
        closes_window = self._closes_accumulation_window(window)
        with self._gradient_sync(enabled=closes_window):
            self.manual_backward(loss / window if window > 1 else loss)  # type: ignore[attr-defined]
        if closes_window:
            optimizer = self.optimizers()  # type: ignore[attr-defined]
            dsgd = self.dsgd_optimizer
            steps_before = dsgd.steps_taken
            # The loss reaches DSGD.step through Lightning's precision plugin (full_batch compares
            # consecutive losses, so data-parallel ranks hand it the loss of the global batch).
            step_loss = loss.detach()
            if self.dsgd.full_batch and self.trainer.world_size > 1:  # type: ignore[attr-defined]
                step_loss = self.trainer.strategy.reduce(step_loss.clone(), reduce_op="mean")  # type: ignore[attr-defined]
            optimizer.step(loss=step_loss)
            if dsgd.steps_taken == steps_before:
                scaler = getattr(self.trainer.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
                scale = f" (loss scale now {scaler.get_scale():g})" if scaler is not None else ""
                dsgd.record_skip(f"the GradScaler found inf/NaN in the float16 gradients{scale}")
            optimizer.zero_grad()
            self._step_eta_schedulers("step", self.trainer.global_step)  # type: ignore[attr-defined]
        return output

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are unscaled here (AMP) and DSGD has not scored them yet: clip now."""
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        if self.dsgd.gradient_clip_val is not None:
            self.clip_gradients(  # type: ignore[attr-defined]
                optimizer,
                gradient_clip_val=self.dsgd.gradient_clip_val,
                gradient_clip_algorithm=self.dsgd.gradient_clip_algorithm,
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """DSGD's own state also goes here: FSDP2's distributed optimizer checkpoint keeps only
        torch's ``state`` and ``param_groups``."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        if self.trainer.optimizers:  # type: ignore[attr-defined]
            checkpoint["dsgd"] = self.dsgd_optimizer.extra_state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._dsgd_checkpoint_state = checkpoint.get("dsgd")

    def on_train_start(self) -> None:
        """The optimizer state is restored by now: put DSGD's own state back on top of it."""
        super().on_train_start()  # type: ignore[misc]
        pending = getattr(self, "_dsgd_checkpoint_state", None)
        if pending is not None:
            self.dsgd_optimizer.load_extra_state_dict(pending)
            self._dsgd_checkpoint_state = None

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        self._step_eta_schedulers("epoch", self.trainer.current_epoch + 1)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ helpers
    def _closes_accumulation_window(self, window: int) -> bool:
        """True on the batch that ends an accumulation window (or the epoch), as Lightning decides
        in automatic mode."""
        if window == 1:
            return True
        trainer = self.trainer  # type: ignore[attr-defined]
        ready = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return ready % window == 0 or ready == trainer.num_training_batches

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the DDP all-reduce / FSDP2 reduce-scatter on the micro-batches inside a window."""
        if enabled:
            yield
            return
        fsdp_modules = [m for m in self.modules() if isinstance(m, FSDPModule)]  # type: ignore[attr-defined]
        for module in fsdp_modules:
            module.set_requires_gradient_sync(False, recurse=False)
        strategy = self.trainer.strategy  # type: ignore[attr-defined]
        block = getattr(strategy, "block_backward_sync", contextlib.nullcontext)
        try:
            with block():
                yield
        finally:
            for module in fsdp_modules:
                module.set_requires_gradient_sync(True, recurse=False)

    def _step_eta_schedulers(self, interval: str, count: int) -> None:
        """Manual optimization does not step schedulers: do it as automatic mode would."""
        for config in self.trainer.lr_scheduler_configs:  # type: ignore[attr-defined]
            if config.interval != interval or count % config.frequency != 0:
                continue
            config.scheduler.step()


def _loss_of(output: Any) -> Tensor | None:
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "loss" in output:
        return output["loss"]
    raise TypeError(
        "DSGDMixin needs training_step to return the loss: a Tensor, a mapping with a 'loss' key, or None "
        f"to skip the batch; got {type(output).__name__}."
    )


def with_dsgd(module: LightningModule, settings: DSGDSettings | None = None) -> LightningModule:
    """Turn an existing LightningModule instance into a DSGD one in place (its class becomes a
    subclass with [DSGDMixin][lightning_dsgd.DSGDMixin] first) and return it."""
    if not isinstance(module, DSGDMixin):
        cls = type(module)
        module.__class__ = type(cls.__name__, (DSGDMixin, cls), {"__module__": cls.__module__})
    if settings is not None:
        module.dsgd = settings  # type: ignore[attr-defined]
    return module
